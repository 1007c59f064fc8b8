"""Combining several rewards into one number per sample, and the statistics to log.

Pure functions on plain lists (no samples, no config objects), so they are easy to test:

- weighted sum: ``r = sum_k w_k * s_k`` over the rewards that apply (a None score adds 0);
- ``normalize="group"``: each reward's scores are first standardised within their GRPO group,
  ``(s - mean_g) / (std_g + eps)`` over the group's applicable scores, so rewards on
  different scales weigh as their weights say (a constant reward in a group contributes 0);
- veto: a sample some veto fired on (:func:`veto_fires`) ranks last in its group whatever
  else it earned: its combined reward is ``min(floor, lowest - margin)``, ``lowest`` the
  lowest combined reward of the group's samples no veto fired on (``floor`` when there are
  none). ``floor`` is what a vetoed sample gets whenever that ranks it last; under
  ``normalize="group"`` it is in z-score units. Ranking within the group is enough: every
  advantage scale subtracts the group mean, so a vetoed sample's advantage is below every
  other sample's of its group, and below 0 when the group holds one that is not vetoed;
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


def veto_fires(values: Sequence[float | None], *, threshold: float,
               when: str = "below") -> list[bool]:
    """Where one veto fires: the value is below (``when="below"``) or above (``"above"``)
    ``threshold``. A None value (the vetoing reward does not apply) never fires."""
    if when not in ("below", "above"):
        raise ValueError(f"when must be 'below' or 'above', not {when!r}")
    return [v is not None and (v < threshold if when == "below" else v > threshold)
            for v in values]


def combine_scores(scores: dict[str, Sequence[float | None]], weights: dict[str, float],
                   group_ids: Sequence[str], *, normalize: str = "none",
                   vetoed: Sequence[bool] | None = None, floor: float = 0.0,
                   margin: float = 1.0, eps: float = 1e-6) -> list[float]:
    """Combined reward per sample.

    scores: reward name -> one score (or None) per sample, all lists of the same length N.
    weights: reward name -> weight. group_ids: one GRPO group id per sample (N).
    vetoed: N bools, True where a veto fired (None: no veto). floor, margin (> 0): see the
    module docstring.
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
    if vetoed is not None:
        total = rank_vetoed_last(total, vetoed, group_ids, floor=floor, margin=margin)
    return total


def rank_vetoed_last(total: Sequence[float], vetoed: Sequence[bool], group_ids: Sequence[str],
                     *, floor: float, margin: float) -> list[float]:
    """``total`` with every vetoed sample set to ``min(floor, lowest - margin)`` of its group.

    The result is strictly below ``lowest`` even where ``margin`` is lost to rounding.
    """
    if len(vetoed) != len(total):
        raise ValueError(f"vetoed: {len(vetoed)} flags for {len(total)} samples")
    if not margin > 0:
        raise ValueError(f"margin must be > 0, not {margin!r}")
    lowest: dict[str, float] = {}
    for t, v, g in zip(total, vetoed, group_ids):
        if not v:
            lowest[g] = min(t, lowest.get(g, math.inf))
    out = list(total)
    for i, (v, g) in enumerate(zip(vetoed, group_ids)):
        if v:
            low = lowest.get(g, math.inf)
            out[i] = min(floor, low - margin)
            if out[i] >= low:
                out[i] = math.nextafter(low, -math.inf)
    return out


def subtract_penalty(total: Sequence[float], penalty: Sequence[float], vetoed: Sequence[bool],
                     group_ids: Sequence[str], *, floor: float, margin: float) -> list[float]:
    """``total - penalty`` per sample (e.g. the KL in the reward), vetoed samples ranked last
    again: a smaller penalty must not lift an unsafe answer above a safe one."""
    out = [t - p for t, p in zip(total, penalty, strict=True)]
    if any(vetoed):
        out = rank_vetoed_last(out, vetoed, group_ids, floor=floor, margin=margin)
    return out


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
    """Mean and population std of finite values; scores near a float's limit (1e154 and
    more, whose squares overflow) are scaled down first, so neither becomes inf."""
    n = len(values)
    m = sum(values) / n
    try:
        s = math.sqrt(sum((v - m) ** 2 for v in values) / n)
    except OverflowError:
        s = math.inf
    if math.isfinite(m) and math.isfinite(s):
        return m, s
    scale = max(abs(v) for v in values)
    m, s = _mean_std([v / scale for v in values])
    return m * scale, s * scale


def score_stats(prefix: str, values: Sequence[float | None]) -> dict[str, float]:
    """``{prefix}/mean``, ``/std`` over the applicable values, ``/not_applicable`` (share)."""
    applicable = [v for v in values if v is not None]
    out = {f"{prefix}/not_applicable": (1 - len(applicable) / len(values)) if values else 0.0}
    if applicable:
        m, s = _mean_std(applicable)
        out[f"{prefix}/mean"], out[f"{prefix}/std"] = m, s
    return out
