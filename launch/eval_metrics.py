"""The statistics of ``medrl eval``: pure functions on plain lists.

- :func:`wilson_interval`: the Wilson score interval of a proportion (accuracy): unlike the
  normal approximation it stays inside [0, 1] and is honest for small n and for p near 0 or 1;
- :func:`bootstrap_interval`: a percentile bootstrap interval of a mean (rubric scores, reward
  means), seeded, so a report is reproducible;
- :func:`pass_at_k`: the unbiased pass@k estimator of Chen et al. (2021) from n samples of
  which c are correct, 1 - C(n - c, k) / C(n, k);
- :func:`majority`: the most frequent answer of k samples (maj@k), ties broken by first
  appearance;
- :func:`choose_option`: the log-likelihood choice of a multiple-choice item, as
  lm-evaluation-harness defines ``acc`` (argmax of the summed log-probs of each option's
  continuation) and ``acc_norm`` (argmax of that sum divided by the choice's length in
  characters, the space that delimits it not counted);
- :func:`proportion` / :func:`mean_with_interval`: a figure as reports hold it,
  ``{"value", "n", "low", "high"}``;
- :func:`expected_calibration_error` / :func:`calibration_bins`: how well the probability a
  model gives its chosen option (:func:`option_confidence`) matches how often it is right.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import Hashable, Sequence

# z for a two-sided 95% interval
Z95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """(low, high) of the Wilson score interval for ``successes`` of ``n``; (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, {n}], got {successes}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # the interval holds p exactly; at p = 0 or 1 rounding would put a bound past it
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def bootstrap_interval(values: Sequence[float], *, seed: int = 0, resamples: int = 1000,
                       level: float = 0.95) -> tuple[float, float]:
    """(low, high) percentile bootstrap interval of the mean of ``values`` (NaN, NaN when
    empty). ``seed`` fixes the resamples."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    rng = random.Random(seed)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n
                   for _ in range(resamples))
    tail = (1 - level) / 2
    low = means[max(0, int(math.floor(tail * resamples)))]
    high = means[min(resamples - 1, int(math.ceil((1 - tail) * resamples)) - 1)]
    return low, high


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples with ``c`` correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority(answers: Sequence[Hashable | None]) -> Hashable | None:
    """The most frequent non-None answer (ties: the one seen first); None when there is none."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


def choose_option(logprob_sums: Sequence[float], lengths: Sequence[int]
                  ) -> tuple[int, int]:
    """(choice by summed log-prob, choice by log-prob per character of the choice) of one
    item's options; ties go to the first option, as an argmax does."""
    if not logprob_sums or len(logprob_sums) != len(lengths):
        raise ValueError("one log-prob sum and one length per option are needed")
    plain = max(range(len(logprob_sums)), key=lambda i: (logprob_sums[i], -i))
    normed = max(range(len(logprob_sums)),
                 key=lambda i: (logprob_sums[i] / max(lengths[i], 1), -i))
    return plain, normed


def proportion(successes: float, n: int) -> dict[str, float]:
    """``{"value", "n", "low", "high"}`` with the Wilson interval (successes may be a mean
    of per-item shares, e.g. pass@1 over samples: the interval then uses its rounding)."""
    low, high = wilson_interval(int(round(successes)), n)
    return {"value": successes / n if n else math.nan, "n": n, "low": low, "high": high}


def mean_with_interval(values: Sequence[float], seed: int) -> dict[str, float]:
    """``{"value", "n", "low", "high"}``: the mean and its 95% bootstrap interval."""
    low, high = bootstrap_interval(values, seed=seed)
    return {"value": sum(values) / len(values) if values else math.nan, "n": len(values),
            "low": low, "high": high}


def option_confidence(logprob_sums: Sequence[float]) -> float:
    """The probability the model gives its chosen option, its options renormalised:
    max softmax of the summed log-probs (what a reliability diagram bins)."""
    top = max(logprob_sums)
    return 1.0 / sum(math.exp(x - top) for x in logprob_sums)


def calibration_bins(confidences: Sequence[float], correct: Sequence[bool], bins: int = 10
                     ) -> list[tuple[float, float, int]]:
    """(mean confidence, accuracy, count) of each of ``bins`` equal-width confidence bins
    over [0, 1] (the last bin holds 1.0); empty bins are (NaN, NaN, 0)."""
    groups: list[list[tuple[float, bool]]] = [[] for _ in range(bins)]
    for c, ok in zip(confidences, correct):
        groups[min(int(c * bins), bins - 1)].append((c, ok))
    return [(sum(c for c, _ in g) / len(g), sum(ok for _, ok in g) / len(g), len(g)) if g
            else (math.nan, math.nan, 0) for g in groups]


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[bool],
                               bins: int = 10) -> float:
    """ECE: sum over bins of (share of items) x |accuracy - mean confidence| (Guo et al. 2017,
    equal-width bins); NaN with no item."""
    n = len(confidences)
    if n == 0:
        return math.nan
    return sum(count / n * abs(acc - conf)
               for conf, acc, count in calibration_bins(confidences, correct, bins) if count)


def bootstrap_statistics(items: Sequence, statistic, *, seed: int = 0, resamples: int = 1000,
                         level: float = 0.95) -> list[tuple[float, float]]:
    """(low, high) percentile bootstrap intervals of each value of ``statistic(items) ->
    tuple of floats`` (micro F1, ECE: statistics that are no mean of per-item values), the
    items drawn with replacement ``resamples`` times, seeded; each interval widened to hold
    the point value (a small sample's resamples can all fall on one side of it)."""
    point = statistic(items)
    rng = random.Random(seed)
    draws = [statistic(rng.choices(items, k=len(items))) for _ in range(resamples)]
    tail = (1 - level) / 2
    lo_at = max(0, int(math.floor(tail * resamples)))
    hi_at = min(resamples - 1, int(math.ceil((1 - tail) * resamples)) - 1)
    out = []
    for k, value in enumerate(point):
        stats = sorted(d[k] for d in draws)
        out.append((min(stats[lo_at], value), max(stats[hi_at], value)))
    return out
