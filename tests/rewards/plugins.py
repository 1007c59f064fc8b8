"""Rewards used by the tests, loaded the way users load theirs: as ``plugins.py:<name>``.

Each misbehaves in one specific way when the sample's row asks it to.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

from medrl.rewards import RewardResult, reward


def ok_or_boom(sample):
    if sample.row.get("boom"):
        raise ValueError("bad row")
    return 1.0


def nan_when_asked(sample):
    return math.nan if sample.row.get("nan") else 0.5


def inf_dim(sample):
    return RewardResult(1.0, dims={"safety": math.inf if sample.row.get("inf") else 1.0})


def short_token_weights(sample):
    n = len(sample.completion_ids) - (1 if sample.row.get("short") else 0)
    return RewardResult(1.0, token_weights=[0.5] * n)


def sleepy(sample, *, seconds: float = 0.0):
    if sample.row.get("sleep"):
        time.sleep(seconds)
    return 1.0


def length_score(sample, *, scale: float = 1.0):
    """Completion length in tokens x scale; None when the row says the reward does not apply."""
    if sample.row.get("na"):
        return None
    return scale * len(sample.completion_ids)


def ramp_weights(sample):
    n = len(sample.completion_ids)
    return RewardResult(0.0, token_weights=[(i + 1) / n for i in range(n)])


def where_am_i(sample):
    return RewardResult(1.0, info={"pid": os.getpid()})


@reward("test_rubric")
class Rubric:
    """A batched reward with dims: accuracy and safety come from the row."""

    def __init__(self, *, bonus: float = 0.0):
        self.bonus = bonus

    def setup(self, ctx):
        self.ready = True

    def __call__(self, samples):
        out = []
        for s in samples:
            if "safety" not in s.row:
                out.append(RewardResult(None))
                continue
            dims = {"accuracy": float(s.row["accuracy"]), "safety": float(s.row["safety"])}
            out.append(RewardResult(dims["accuracy"] + self.bonus, dims=dims))
        return out


class WrongCount:
    def setup(self, ctx):
        pass

    def __call__(self, samples):
        return [1.0] * (len(samples) - 1)


class CountingSetup:
    """Reports how often setup ran in its process, and where (to prove: once, in an actor)."""

    setups = 0

    def setup(self, ctx):
        type(self).setups += 1
        self.device = ctx.device

    def __call__(self, samples):
        return [RewardResult(1.0, info={"setups": type(self).setups, "pid": os.getpid(),
                                        "device": self.device}) for _ in samples]


class SleepyBatch:
    def __init__(self, *, seconds: float):
        self.seconds = seconds

    def setup(self, ctx):
        pass

    def __call__(self, samples):
        if any(s.row.get("sleep") for s in samples):
            time.sleep(self.seconds)
        return [1.0 for _ in samples]


class PromptSupport:
    """Counterfactual reward: how much the completion's log-prob depends on a prompt span.

    Replaces the prompt tokens in [start, stop) with ``mask_id`` and compares the policy's
    log-probs of the same completion with and without the change (``ctx.policy_logprobs``).
    score: mean over tokens of (log p_original - log p_masked); token_weights: 1 + |difference|.
    """

    def __init__(self, *, start: int, stop: int, mask_id: int = 0):
        self.start, self.stop, self.mask_id = start, stop, mask_id

    def setup(self, ctx):
        if ctx.policy_logprobs is None:
            raise RuntimeError("PromptSupport needs ctx.policy_logprobs")
        self.policy_logprobs = ctx.policy_logprobs

    def __call__(self, samples):
        masked = [dataclasses.replace(
            s, prompt_ids=[self.mask_id if self.start <= i < self.stop else t
                           for i, t in enumerate(s.prompt_ids)]) for s in samples]
        base, changed = self.policy_logprobs(samples), self.policy_logprobs(masked)
        out = []
        for b, c in zip(base, changed):
            diff = [x - y for x, y in zip(b, c)]
            out.append(RewardResult(sum(diff) / len(diff),
                                    token_weights=[1.0 + abs(d) for d in diff]))
        return out


def row_value(sample, *, key: str = "score"):
    """The row's value under ``key`` (None when absent): lets a test choose every score."""
    return sample.row.get(key)


def returns_row_value(sample):
    """Returns ``row["value"]`` as it is: lets a test return anything at all."""
    return sample.row["value"]


def raises_row_error(sample):
    raise sample.row["error"]


class MetricsFromRow:
    """Scores 1.0; ``batch_metrics`` returns the first row's ``metrics`` (raised when an
    exception)."""

    def setup(self, ctx):
        self.metrics = None

    def __call__(self, samples):
        self.metrics = samples[0].row["metrics"]
        return [1.0 for _ in samples]

    def batch_metrics(self):
        if isinstance(self.metrics, BaseException):
            raise self.metrics
        return self.metrics


class ExitsInSetup:
    def setup(self, ctx):
        raise SystemExit(2)

    def __call__(self, samples):
        return [1.0 for _ in samples]
