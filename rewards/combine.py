"""Combining several rewards into one number per sample, and the statistics to log.

Pure functions on plain lists (no samples, no config objects), so they are easy to test:

- weighted sum: ``r = sum_k w_k * s_k`` over the rewards that apply (a None score adds 0);
- ``normalize="group"``: each reward's scores are first standardised within their GRPO group,
  ``(s - mean_g) / (std_g + eps)`` over the group's applicable scores, so rewards on
  different scales weigh as their weights say (a constant reward in a group contributes 0);
- veto: when the vetoing score (a reward, or one of its dims) is below ``threshold`` the
  combined reward is ``floor`` whatever else the sample earned; a None vetoing score does
  not veto;
- token weights of several rewards multiply element-wise.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Sequence


def group_normalize(scores: Sequence[float | None], group_ids: Sequence[str], *,
                    eps: float = 1e-6) -> list[float | None]:
    """Standardise scores within each group; None stays None. Population std (ddof 0)."""
    by_group: dict[str, list[float]] = defaultdict(list)
    for s, g in zip(scores, group_ids):
        if s is not None:
            by_group[g].append(s)
    stats = {g: _mean_std(v) for g, v in by_group.items()}
    return [None if s is None else (s - stats[g][0]) / (stats[g][1] + eps)
            for s, g in zip(scores, group_ids)]


def combine_scores(scores: dict[str, Sequence[float | None]], weights: dict[str, float],
                   group_ids: Sequence[str], *, normalize: str = "none",
                   veto_scores: Sequence[float | None] | None = None,
                   veto_threshold: float = 0.5, floor: float = 0.0,
                   eps: float = 1e-6) -> tuple[list[float], list[bool]]:
    """Combined reward per sample, and which samples the veto floored.

    scores: reward name -> one score (or None) per sample, all lists of the same length.
    weights: reward name -> weight. group_ids: one GRPO group id per sample.
    veto_scores: the vetoing score per sample (None: no veto configured or not applicable).
    """
    n = len(group_ids)
    total = [0.0] * n
    for name, values in scores.items():
        if len(values) != n:
            raise ValueError(f"reward {name!r}: {len(values)} scores for {n} samples")
        if normalize == "group":
            values = group_normalize(values, group_ids, eps=eps)
        elif normalize != "none":
            raise ValueError(f"normalize must be 'none' or 'group', not {normalize!r}")
        w = weights[name]
        for i, v in enumerate(values):
            if v is not None:
                total[i] += w * v
    vetoed = [False] * n
    if veto_scores is not None:
        for i, v in enumerate(veto_scores):
            if v is not None and v < veto_threshold:
                total[i], vetoed[i] = floor, True
    return total, vetoed


def multiply_token_weights(weights: Sequence[Sequence[float]]) -> list[float] | None:
    """Element-wise product of several per-token weight lists of equal length (None if none)."""
    if not weights:
        return None
    out = [1.0] * len(weights[0])
    for w in weights:
        if len(w) != len(out):
            raise ValueError(f"token weights of lengths {len(out)} and {len(w)} cannot multiply")
        out = [a * b for a, b in zip(out, w)]
    return out


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / len(values))


def score_stats(prefix: str, values: Sequence[float | None]) -> dict[str, float]:
    """``{prefix}/mean``, ``/std`` over the applicable values, ``/not_applicable`` (share)."""
    applicable = [v for v in values if v is not None]
    out = {f"{prefix}/not_applicable": (1 - len(applicable) / len(values)) if values else 0.0}
    if applicable:
        m, s = _mean_std(applicable)
        out[f"{prefix}/mean"], out[f"{prefix}/std"] = m, s
    return out
