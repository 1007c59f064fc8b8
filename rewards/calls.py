"""Calling one reward and checking what it returned.

:class:`RewardWorker` holds one loaded reward and calls it (in the driver, or as the body of
a Ray actor); each call runs under the reward's ``timeout_s``. What comes back is checked
against its samples (:func:`check_batch`: count, finite numbers, token-weight lengths); a
call that raised, timed out or returned something unusable becomes a :class:`Failure`,
which the runner's failure policy then handles.
"""

from __future__ import annotations

import threading
import traceback
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from medrl.align.records import Sample
from medrl.rewards.api import RewardContext, RewardResult, finite
from medrl.rewards.loader import LoadedReward


@dataclass
class Failure:
    """A reward call that did not produce a usable result (travels back from Ray as data)."""

    cause: str
    timed_out: bool = False
    traceback: str = ""


class _TimedOut(Exception):
    pass


def _call_with_timeout(fn, timeout_s: float | None):
    """Run ``fn()``; past ``timeout_s`` raise _TimedOut. The stuck call keeps running in a
    daemon thread (Python cannot stop it); the run either stops or moves on without it."""
    if timeout_s is None:
        return fn()
    box: dict[str, Any] = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed back to the caller below, never lost
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True, name="medrl-reward")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise _TimedOut()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _failure(exc: BaseException, timeout_s: float | None) -> Failure:
    if isinstance(exc, _TimedOut):
        return Failure(f"exceeded its timeout of {timeout_s:g} s", timed_out=True)
    return Failure(f"raised {type(exc).__name__}: {exc}", traceback=traceback.format_exc())


def call_function_reward(fn, kwargs: Mapping[str, Any], samples: Sequence[Sample],
                         timeout_s: float | None) -> list[Any]:
    """One raw result (or Failure) per sample; the timeout applies to each call."""
    out: list[Any] = []
    for sample in samples:
        try:
            out.append(_call_with_timeout(lambda: fn(sample, **kwargs), timeout_s))
        except Exception as exc:  # recorded as a Failure; the policy decides what happens
            out.append(_failure(exc, timeout_s))
    return out


class RewardWorker:
    """Holds one reward and calls it; used as is in the driver and wrapped as a Ray actor."""

    def __init__(self, loaded: LoadedReward, ctx: RewardContext):
        self.loaded, self.ctx, self.instance = loaded, ctx, None

    def setup(self) -> None:
        if self.loaded.kind == "class":
            self.instance = self.loaded.target(**self.loaded.kwargs)
            self.instance.setup(self.ctx)

    def batch_metrics(self) -> dict[str, float]:
        """The class reward's ``batch_metrics()`` for its last call ({} when it has none)."""
        fn = getattr(self.instance, "batch_metrics", None)
        return dict(fn()) if callable(fn) else {}

    def score(self, samples: list[Sample]) -> list[Any] | Failure:
        r = self.loaded
        if r.kind == "class" and self.instance is None:  # a restarted actor sets up again
            self.setup()
        if r.kind == "function":
            return call_function_reward(r.target, r.kwargs, samples, r.timeout_s)
        try:
            return _call_with_timeout(lambda: self.instance(samples), r.timeout_s)
        except Exception as exc:  # recorded as a Failure for the whole batch
            return _failure(exc, r.timeout_s)


def check_result(raw: Any, sample: Sample) -> RewardResult | Failure:
    """Validate one raw reward output against its sample."""
    if isinstance(raw, Failure):
        return raw
    if raw is None:
        return RewardResult(None)
    if not isinstance(raw, RewardResult):
        if not finite(raw):
            if isinstance(raw, (int, float)):
                return Failure(f"returned a non-finite score ({raw!r}); a score is a finite "
                               "number, or None when the reward does not apply")
            return Failure(f"returned a {type(raw).__name__}; expected a float, None or a "
                           "RewardResult")
        return RewardResult(float(raw))
    if raw.score is not None and not finite(raw.score):
        return Failure(f"returned a non-finite score ({raw.score!r}); a score is a finite "
                       "number, or None when the reward does not apply")
    dims = None
    if raw.dims is not None:  # a dim of None: that sub-score does not apply to this sample
        for key, value in raw.dims.items():
            if value is not None and not finite(value):
                return Failure(f"returned a non-finite value for dim {key!r} ({value!r})")
        dims = {str(k): None if v is None else float(v) for k, v in raw.dims.items()}
    weights = None
    if raw.token_weights is not None:
        n = len(sample.completion_ids)
        if len(raw.token_weights) != n:
            return Failure(f"returned {len(raw.token_weights)} token weights for a completion "
                           f"of {n} tokens (one weight per token of completion_ids)")
        for i, w in enumerate(raw.token_weights):
            if not finite(w):
                return Failure(f"returned a non-finite token weight ({w!r}) at position {i}")
        weights = [float(w) for w in raw.token_weights]
    score = None if raw.score is None else float(raw.score)
    return RewardResult(score, dims, weights, raw.info)


def check_batch(raw: Any, samples: Sequence[Sample]) -> list[RewardResult | Failure]:
    if isinstance(raw, Failure):
        return [raw] * len(samples)
    if not isinstance(raw, (list, tuple)) or len(raw) != len(samples):
        got = f"{len(raw)} results" if isinstance(raw, (list, tuple)) else \
            f"a {type(raw).__name__}"
        failure = Failure(f"returned {got} for {len(samples)} samples (a batched reward "
                          "returns a list with one result per sample, in order)")
        return [failure] * len(samples)
    return [check_result(r, s) for r, s in zip(raw, samples)]
