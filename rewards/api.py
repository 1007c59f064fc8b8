"""The reward plugin API: what a reward is, what it returns, and what it may ask of the run.

Two shapes of reward, both registered with :func:`reward`:

- a **function** ``fn(sample, **kwargs) -> float | None | RewardResult``, called once per
  sample; cheap rule rewards;
- a **class** whose ``__init__(**kwargs)`` only stores its arguments, whose ``setup(ctx)``
  loads what is expensive (a model, once, on ``ctx.device``), and whose
  ``__call__(samples) -> list[RewardResult | float | None]`` scores a whole batch, one result
  per sample, in order; batched and model-based rewards.

``None`` (or ``RewardResult(score=None)``) means "not applicable to this sample": it is left
out of that reward's statistics and adds nothing to the combined reward.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from medrl.align.records import Sample, UserError


class RewardError(UserError):
    """A reward failed on a sample (raised, returned NaN/inf, wrong count or token-weight
    length, or ran past ``timeout_s``). Names the reward, the sample uid(s) and the cause."""

    def __init__(self, message: str, *, reward: str = "", uids: Sequence[str] = (),
                 cause: str = ""):
        super().__init__(message)
        self.reward = reward
        self.uids = list(uids)
        self.cause = cause


def error_message(name: str, uids: Sequence[str], cause: str) -> str:
    """The one-paragraph message of a reward failure (RewardError's, and the logs')."""
    where = f"sample {uids[0]!r}" if len(uids) == 1 else \
        "samples " + ", ".join(repr(u) for u in uids)
    return (f"reward {name!r} failed on {where}: {cause}. Fix the reward, or set "
            "rewards.on_error: skip_sample to drop such samples and go on.")


@dataclass
class RewardFailure:
    """A reward failure on one sample that ``on_error: skip_sample`` dropped (not raised).

    cause: what went wrong, as in RewardError (the reward's exception type and message, a
    non-finite value, a wrong count); never the sample's text unless the reward put it there.
    """

    reward: str
    uid: str
    cause: str

    @property
    def message(self) -> str:
        return error_message(self.reward, [self.uid], self.cause)


@dataclass
class RewardResult:
    """What a reward says about one sample.

    score: the scalar reward, or None when the reward does not apply to this sample.
    dims: named sub-scores (e.g. rubric tiers, a safety score), each a finite float, or None
        where that sub-score does not apply to this sample (left out of the dim's statistics,
        counted in its ``not_applicable``; a veto reading it does not fire).
    token_weights: one weight per completion token (``len(sample.completion_ids)``), a list,
        a tuple or a 1-D numpy array of finite numbers; weights from several rewards multiply
        and scale the per-token policy objective.
        Weights are >= 0: a negative weight would turn the clipped objective upside down.
    info: anything JSON-able for logging (kept in ``sample.reward_info[name]``).
    token_marks: one mark in [0, 1] per completion token, 1 where the reasoning went wrong
        (a span a repair changed, the steps after the first wrong one). Unlike weights,
        marks do not scale the objective directly: the advantage phase turns them into
        per-token advantages once the sample's advantage (and its sign) is known
        (:mod:`medrl.align.process`); marks from several rewards combine by their maximum.
    """

    score: float | None
    dims: dict[str, float | None] | None = None
    token_weights: list[float] | None = None
    info: dict[str, Any] | None = None
    token_marks: list[float] | None = None


@dataclass
class RewardContext:
    """What a run hands to ``setup(ctx)`` of a class reward.

    run_dir: the run folder (a reward may write caches or artefacts under it).
    base_dir: the recipe's folder; relative paths in reward arguments resolve here.
    device: the device the reward's model should live on, set by the runner from the
        reward's own reservation: "cuda" for an actor with ``num_gpus > 0`` (the GPUs Ray
        gave it, ``cuda:0`` onwards in its process), "cpu" otherwise.
    seed: the run seed (seed your own sampling from it for exact resumes).
    policy_logprobs: ``policy_logprobs(samples) -> list[list[float]]``: log-probabilities of
        each sample's ``completion_ids`` under the *current* policy, given the sample's prompt
        (``prompt_ids``, ``messages``, ``images`` / ``volume`` as the sample carries them).
        Counterfactual rewards change a copy of the sample (mask an image region, drop a
        sentence of the prompt) and compare. None when the run provides no policy. For
        rewards with ``actor: true`` the hook is sent to the actor, so it must be picklable
        (e.g. a function that calls a Ray actor handle).
    generate: ``generate(prompts, *, max_new_tokens, temperature=0.0, seed=None) ->
        list[Sample]``: one completion per prompt sample (its ``messages``, rendered with the
        policy's chat template, or its ``prompt_ids``) from the run's rollout engines, i.e.
        the *current* policy; the returned samples carry ``completion_ids`` and
        ``completion_text``. Greedy by default (temperature 0), so a resumed run gets the
        same completions; give ``seed`` when sampling. Repairers of failed answers use it.
        None when the run has no engines; available to rewards that run in the driver
        (``actor: false``).
    policy_dir: the policy's model folder (its tokenizer tokenises like the engines).
    extra: free-form values a run wants to pass on.
    """

    run_dir: Path | None = None
    base_dir: Path | None = None
    device: str = "cpu"
    seed: int = 0
    policy_logprobs: Callable[[list[Sample]], list[list[float]]] | None = None
    generate: Callable[..., list[Sample]] | None = None
    policy_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def resolve(self, path: str | Path) -> Path:
        """A path from a reward argument: absolute, ``~``, or relative to the recipe's folder."""
        p = Path(path).expanduser()
        if p.is_absolute() or self.base_dir is None:
            return p
        return Path(self.base_dir) / p


@runtime_checkable
class BatchReward(Protocol):
    """The class form. ``__init__(**kwargs)`` must be cheap (it runs on ``medrl validate``'s
    side of things only as a signature check, and once per process that runs the reward)."""

    def setup(self, ctx: RewardContext) -> None: ...

    def __call__(self, samples: list[Sample]) -> list[RewardResult | float | None]: ...


# name -> the function or class registered under it (built-ins, plugins imported so far).
_REGISTRY: dict[str, Any] = {}


def _origin(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def reward(name: str) -> Callable[[Any], Any]:
    """Register a function or class reward under ``name`` (the name recipes use).

    Registering the same name again from the same module and qualified name replaces the old
    entry (module reloads, notebooks); a different object under a taken name is an error.
    """
    if not isinstance(name, str) or not name or ":" in name:
        raise UserError(f"@reward({name!r}): a reward name is a non-empty string without ':' "
                        "(':' separates module and attribute in recipe references).")

    def register(obj: Any) -> Any:
        old = _REGISTRY.get(name)
        if old is not None and old is not obj and _origin(old) != _origin(obj):
            raise UserError(f"@reward({name!r}): the name is already taken by {_origin(old)}; "
                            f"{_origin(obj)} needs another name.")
        obj.__medrl_reward_name__ = name
        _REGISTRY[name] = obj
        return obj

    return register


def registered() -> dict[str, Any]:
    """A copy of the registry: name -> function or class."""
    return dict(_REGISTRY)


def is_class_reward(obj: Any) -> bool:
    return isinstance(obj, type)


def finite(x: Any) -> bool:
    """A real number (bools and numpy scalars included) that is neither NaN nor infinite
    (nor an int too large for a float)."""
    try:
        return isinstance(x, numbers.Real) and math.isfinite(float(x))
    except OverflowError:
        return False
