"""Calling one reward and checking what it returned.

:class:`RewardWorker` holds one loaded reward and calls it (in the driver, or as the body of
a Ray actor); each call runs under the reward's ``timeout_s``. What comes back is checked
against its samples (:func:`check_batch`: count, finite numbers, token-weight lengths); a
call that raised, timed out or returned something unusable becomes a :class:`Failure`,
which the runner's failure policy then handles.
"""

from __future__ import annotations

import math
import numbers
import threading
import traceback
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from medrl.align.records import Sample
from medrl.rewards.api import RewardContext, RewardResult
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


# What a reward's call may raise and still count as a reward failure: any error, and
# SystemExit (a plugin calling sys.exit would otherwise end the run without a word).
# KeyboardInterrupt still stops the run.
CAUGHT = (Exception, SystemExit)


def _failure(exc: BaseException, timeout_s: float | None) -> Failure:
    if isinstance(exc, _TimedOut):
        return Failure(f"exceeded its timeout of {timeout_s:g} s", timed_out=True)
    try:
        text = str(exc)
    except Exception:  # noqa: BLE001 - an exception whose __str__ fails is still a failure
        text = "(its message could not be read)"
    return Failure(f"raised {type(exc).__name__}: {text}", traceback=traceback.format_exc())


def call_function_reward(fn, kwargs: Mapping[str, Any], samples: Sequence[Sample],
                         timeout_s: float | None) -> list[Any]:
    """One raw result (or Failure) per sample; the timeout applies to each call."""
    out: list[Any] = []
    for sample in samples:
        try:
            out.append(_call_with_timeout(lambda: fn(sample, **kwargs), timeout_s))
        except CAUGHT as exc:  # recorded as a Failure; the policy decides what happens
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
        if not callable(fn):
            return {}
        values = fn()
        if not isinstance(values, Mapping):
            raise TypeError(f"batch_metrics() returned a {type(values).__name__}, not a "
                            "mapping of name -> number")
        return dict(values)

    def score(self, samples: list[Sample]) -> list[Any] | Failure:
        r = self.loaded
        if r.kind == "class" and self.instance is None:  # a restarted actor sets up again
            self.setup()
        if r.kind == "function":
            return call_function_reward(r.target, r.kwargs, samples, r.timeout_s)
        try:
            return _call_with_timeout(lambda: self.instance(samples), r.timeout_s)
        except CAUGHT as exc:  # recorded as a Failure for the whole batch
            return _failure(exc, r.timeout_s)


SCORE_RULE = "a score is a finite number, or None when the reward does not apply"


def _number_problem(value: Any) -> str | None:
    """None for a usable number (a finite real: bools and numpy scalars included); else
    ``"type"`` (not a real number: a str, a tensor, ...), ``"huge"`` (an int too large for a
    float) or ``"non-finite"``. Messages built on it show a wrong value's type, never the
    value, unless it is a non-finite number (a reward may return the completion's text)."""
    if not isinstance(value, numbers.Real):
        return "type"
    try:
        return None if math.isfinite(float(value)) else "non-finite"
    except OverflowError:
        return "huge"


def _score_failure(value: Any, problem: str, top_level: bool) -> Failure:
    if problem == "non-finite":
        return Failure(f"returned a non-finite score ({value!r}); {SCORE_RULE}")
    if problem == "huge":
        return Failure(f"returned a score too large for a float; {SCORE_RULE}")
    if top_level:
        return Failure(f"returned a {type(value).__name__}; expected a float, None or a "
                       "RewardResult")
    return Failure(f"returned a RewardResult whose score is a {type(value).__name__}; "
                   f"{SCORE_RULE}")


def _value_failure(value: Any, problem: str, what: str) -> Failure:
    """A dim's or a token weight's problem: ``what`` says which (``dim 'safety'``)."""
    if problem == "non-finite":
        return Failure(f"returned a non-finite {what} ({value!r})")
    if problem == "huge":
        return Failure(f"returned a {what} too large for a float")
    kind = "None" if value is None else f"a {type(value).__name__}"
    return Failure(f"returned {kind} as the {what}; it is a finite number")


def _check_dims(dims: Any) -> dict[str, float | None] | Failure:
    if not isinstance(dims, Mapping):
        return Failure(f"returned dims of type {type(dims).__name__}; dims map a name to a "
                       "finite number, or to None where it does not apply")
    for key, value in dims.items():  # a dim of None: that sub-score does not apply here
        problem = None if value is None else _number_problem(value)
        if problem == "non-finite":  # the message tests and users know
            return Failure(f"returned a non-finite value for dim {key!r} ({value!r})")
        if problem:
            return _value_failure(value, problem, f"value for dim {key!r}")
    return {str(k): None if v is None else float(v) for k, v in dims.items()}


def _check_token_weights(weights: Any, n: int) -> list[float] | Failure:
    if not isinstance(weights, (list, tuple, np.ndarray)):
        return Failure(f"returned token_weights of type {type(weights).__name__}; they are a "
                       "list with one number per token of completion_ids")
    if isinstance(weights, np.ndarray) and weights.ndim != 1:
        return Failure(f"returned token_weights of shape {weights.shape}; they are a list with "
                       "one number per token of completion_ids")
    if len(weights) != n:
        return Failure(f"returned {len(weights)} token weights for a completion "
                       f"of {n} tokens (one weight per token of completion_ids)")
    for i, w in enumerate(weights):
        problem = _number_problem(w)
        if problem == "non-finite":
            return Failure(f"returned a non-finite token weight ({w!r}) at position {i}")
        if problem:
            return _value_failure(w, problem, f"token weight at position {i}")
        if float(w) < 0:  # it would flip the sign of the clipped objective at that token
            return Failure(f"returned a negative token weight ({float(w)!r}) at position {i}; "
                           "weights scale the policy objective and are >= 0 (to push a token "
                           "down, lower the reward or return token_marks)")
    return [float(w) for w in weights]


def _check_token_marks(marks: Any, n: int) -> list[float] | Failure:
    if isinstance(marks, np.ndarray):
        if marks.ndim != 1:
            return Failure(f"returned token_marks of shape {marks.shape}; they are a list "
                           "with one number per token of completion_ids")
        marks = marks.tolist()
    if not isinstance(marks, (list, tuple)):
        return Failure(f"returned token_marks of type {type(marks).__name__}; they are a list "
                       "with one number in [0, 1] per token of completion_ids")
    if len(marks) != n:
        return Failure(f"returned {len(marks)} token marks for a completion of {n} tokens "
                       "(one mark per token of completion_ids)")
    for i, m in enumerate(marks):
        problem = _number_problem(m)
        if problem:
            return _value_failure(m, problem, f"token mark at position {i}")
        if not 0.0 <= float(m) <= 1.0:
            return Failure(f"returned a token mark of {float(m)!r} at position {i}; marks are "
                           "in [0, 1] (1: this token is where the answer went wrong)")
    return [float(m) for m in marks]


def check_result(raw: Any, sample: Sample) -> RewardResult | Failure:
    """Validate one raw reward output against its sample."""
    if isinstance(raw, Failure):
        return raw
    if raw is None:
        return RewardResult(None)
    if not isinstance(raw, RewardResult):
        problem = _number_problem(raw)
        return _score_failure(raw, problem, True) if problem else RewardResult(float(raw))
    problem = None if raw.score is None else _number_problem(raw.score)
    if problem:
        return _score_failure(raw.score, problem, False)
    dims = None
    if raw.dims is not None:
        dims = _check_dims(raw.dims)
        if isinstance(dims, Failure):
            return dims
    weights = None
    if raw.token_weights is not None:
        weights = _check_token_weights(raw.token_weights, len(sample.completion_ids))
        if isinstance(weights, Failure):
            return weights
    marks = None
    if raw.token_marks is not None:
        marks = _check_token_marks(raw.token_marks, len(sample.completion_ids))
        if isinstance(marks, Failure):
            return marks
    score = None if raw.score is None else float(raw.score)
    return RewardResult(score, dims, weights, raw.info, token_marks=marks)


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
