"""Process-level credit: error marks from rewards -> per-token advantages.

An outcome reward gives every token of a failed answer the same blame. A reward that knows
*where* the answer went wrong (a repair of it, the first wrong reasoning step) returns
``token_marks``: one number in [0, 1] per completion token, 1 where the error is. Marks do
not scale the objective by themselves, because what they should do depends on the sign of the
sample's advantage, known only after the group statistics; this module turns them into
per-token advantages ``A_t`` once the scalar advantage ``A`` is known:

- ``A < 0`` (a worse-than-group answer), ``mode="weight"``:  A_t = A * (1 + alpha * m_t).
  Since 1 + alpha * m_t > 0, this equals token weights w_t = 1 + alpha * m_t on that sample
  (min(w r A, w clip(r) A) = w min(r A, clip(r) A)): the error tokens carry more of the
  negative signal, every other token keeps its plain GRPO share. alpha = 0 is plain GRPO.
- ``A < 0``, ``mode="marked_only"``:  A_t = A * m_t: the negative signal only on marked
  tokens; the rest of a failed answer is neither pushed down nor up.
- ``A >= 0``: A_t = A. A better-than-group answer is not blamed where a repair would
  have changed it.
- a sample of a **zero-variance group** (every rollout of the prompt got the same reward,
  so GRPO's advantage is 0) that carries marks: A_t = -c * m_t, c =
  ``failed_group_advantage``. This is the group where every answer failed and repairs
  exist; without it the group teaches nothing. c = 0 leaves such groups at 0 (plain GRPO).
  Only samples whose marks are non-zero receive it (a repair that changed nothing, or a
  correct answer, marks nothing).

Samples without marks keep their scalar advantage (``token_advantages`` stays None).

How zero-valued ``A_t`` count in the loss: a token whose advantage is 0 (``marked_only`` on an
unmarked token, an unmarked token of a zero-variance group) stays in the completion mask, so
it counts in every ``loss_agg`` normaliser exactly as in plain GRPO: ``token_mean`` divides
by all completion tokens of the batch, ``seq_mean`` by each sequence's token count,
``seq_sum_norm`` by the constant B * L. Its surrogate term is 0 but its KL penalty and entropy
bonus (when set) still apply.

Pure functions over plain numbers and :class:`~medrl.align.records.Sample` records.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from medrl.align.records import Sample

ProcessMode = Literal["weight", "marked_only"]
PROCESS_MODES = ("weight", "marked_only")


def token_advantages(advantage: float, marks: Sequence[float], *, zero_variance: bool,
                     mode: ProcessMode = "weight", alpha: float = 1.0,
                     failed_group_advantage: float = 1.0) -> list[float] | None:
    """Per-token advantages of one completion from its scalar advantage and error marks.

    advantage: the sample's group-relative advantage A (0 in a zero-variance group).
    marks: T numbers in [0, 1], one per completion token. zero_variance: the sample's group
    had zero reward variance. Returns T floats, or None where the scalar A already says it all
    (no marked token, A >= 0, or a zero-variance group with ``failed_group_advantage`` 0).
    """
    if mode not in PROCESS_MODES:
        raise ValueError(f"mode: {mode!r} is not one of {', '.join(PROCESS_MODES)}.")
    for name, value in (("alpha", alpha), ("failed_group_advantage", failed_group_advantage)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name}: must be a finite number >= 0, got {value!r}.")
    if not math.isfinite(advantage):
        raise ValueError(f"advantage: must be finite, got {advantage!r}.")
    m = [float(x) for x in marks]
    if any(not 0.0 <= x <= 1.0 for x in m):
        raise ValueError("marks: every mark must be in [0, 1].")
    if not any(m):
        return None
    if zero_variance:
        if failed_group_advantage == 0:
            return None
        return [-failed_group_advantage * x for x in m]
    if advantage >= 0:
        return None
    if mode == "weight":
        return [advantage * (1.0 + alpha * x) for x in m]
    return [advantage * x for x in m]


def combined_marks(sample: Sample) -> list[float] | None:
    """The element-wise maximum of every reward's marks on ``sample`` (None when none)."""
    rows = list(sample.token_marks.values())
    if not rows:
        return None
    return [max(col) for col in zip(*rows)]


def apply_token_marks(samples: Sequence[Sample], zero_variance: Sequence[bool], *,
                      mode: ProcessMode = "weight", alpha: float = 1.0,
                      failed_group_advantage: float = 1.0) -> dict[str, float]:
    """Set ``token_advantages`` on every sample whose rewards marked tokens (see the module
    docstring); ``sample.advantage`` must be set. zero_variance: one flag per sample.

    Returns metrics: ``process/marked_samples`` (samples with a marked token),
    ``process/marked_token_share`` (marked tokens / completion tokens, over those samples),
    ``process/failed_group_samples`` (samples given the zero-variance process signal).
    """
    if len(zero_variance) != len(samples):
        raise ValueError(f"zero_variance: {len(zero_variance)} flags for {len(samples)} samples.")
    marked = tokens = flagged = 0
    marked_tokens = 0.0
    for s, zero in zip(samples, zero_variance):
        marks = combined_marks(s)
        if marks is None or not any(marks):
            continue
        marked += 1
        tokens += len(marks)
        marked_tokens += sum(marks)
        s.token_advantages = token_advantages(
            float(s.advantage), marks, zero_variance=bool(zero), mode=mode, alpha=alpha,
            failed_group_advantage=failed_group_advantage)
        flagged += bool(zero) and s.token_advantages is not None
    return {"process/marked_samples": float(marked),
            "process/marked_token_share": marked_tokens / tokens if tokens else 0.0,
            "process/failed_group_samples": float(flagged)}
