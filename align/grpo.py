"""GRPO maths: group-relative advantages, the clipped policy loss, and per-sequence KL.

Pure tensor functions with plain arguments; the learner and the driver loop call them. Bad
arguments raise ``ValueError`` naming the argument, because they are programming errors of
the caller rather than recipe mistakes.

Conventions (``B`` sequences, ``T`` completion tokens per sequence, right-padded):

- ``mask`` is ``[B, T]`` of 0/1 (bool, int or float): 1 marks a completion token that enters
  the loss. Values at masked positions of every other ``[B, T]`` argument are ignored, even
  NaN (padding may hold anything).
- The objective is maximised; the returned loss is its negative.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import NamedTuple

import torch

SCALES = ("group", "batch", "none")
LOSSES = ("grpo", "gspo", "gspo_token", "cispo")
AGGREGATIONS = ("token_mean", "seq_mean", "seq_sum_norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
CORRECTIONS = ("none", "truncate", "mask")
CORRECTION_LEVELS = ("token", "sequence")

# A group whose reward std is at most this share of its largest |reward| (or of 1, whichever
# is larger) counts as zero-variance: float noise must not turn into a learning signal.
ZERO_STD_RTOL = 1e-6


class GroupAdvantages(NamedTuple):
    """Result of :func:`group_advantages`.

    advantages: float Tensor[N], in input order (0 for every sample of a zero-variance group).
    zero_variance: bool Tensor[N], True for samples whose group has zero reward std.
    num_groups: number of distinct group ids.
    num_zero_variance_groups: how many of them have zero reward std.
    """

    advantages: torch.Tensor
    zero_variance: torch.Tensor
    num_groups: int
    num_zero_variance_groups: int


def group_advantages(rewards: torch.Tensor | Sequence[float], group_ids: Sequence[Hashable], *,
                     scale: str = "group", eps: float = 1e-6) -> GroupAdvantages:
    """Group-relative advantages A_i = (r_i - mean_g) / (std_g + eps).

    rewards: Tensor[N] or list of N floats (finite). group_ids: N hashable ids, one per
    sample, in any order; groups may differ in size.
    scale: ``"group"`` divides by the group's std, ``"batch"`` by the std of all N rewards,
    ``"none"`` only subtracts the group mean (Dr. GRPO).

    The std is the unbiased one (Bessel's correction, N-1), as TRL's GRPOTrainer computes it,
    so advantages agree with TRL for the same eps. A group of one sample has zero variance.
    Zero variance is judged on the std (relative tolerance ``ZERO_STD_RTOL``), never on the
    mean, so continuous rewards work; such groups get advantage exactly 0 under every scale.
    The result has the rewards' dtype when they are a floating tensor, float32 otherwise;
    the arithmetic runs in float64.
    """
    if scale not in SCALES:
        raise ValueError(f"scale: {scale!r} is not one of {', '.join(SCALES)}.")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps: must be a finite number >= 0, got {eps!r}.")
    out_dtype = (rewards.dtype if isinstance(rewards, torch.Tensor) and rewards.is_floating_point()
                 else torch.float32)
    device = rewards.device if isinstance(rewards, torch.Tensor) else None
    r = torch.as_tensor(rewards, dtype=torch.float64, device=device).detach()
    if r.dim() != 1:
        raise ValueError(f"rewards: expected a 1-D tensor or list, got shape {tuple(r.shape)}.")
    ids = list(group_ids)
    if len(ids) != r.numel():
        raise ValueError(f"group_ids: has {len(ids)} entries but rewards has {r.numel()}; "
                         "give one group id per reward.")
    bad = (~torch.isfinite(r)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"rewards: non-finite value(s) at index {bad[:5]} "
                         f"({r[bad[0]].item()!r} first); rewards must be finite numbers.")
    n = r.numel()
    if n == 0:
        empty = torch.zeros(0, dtype=out_dtype, device=device)
        return GroupAdvantages(empty, torch.zeros(0, dtype=torch.bool, device=device), 0, 0)

    # Map ids to 0..G-1 in order of first appearance, then reduce per group with index_add.
    index_of: dict[Hashable, int] = {}
    try:
        g = torch.tensor([index_of.setdefault(i, len(index_of)) for i in ids], device=r.device)
    except TypeError as exc:  # an unhashable id
        raise ValueError(f"group_ids: every id must be hashable ({exc}).") from exc
    num_groups = len(index_of)
    count = torch.zeros(num_groups, dtype=torch.float64, device=r.device).index_add_(
        0, g, torch.ones_like(r))
    mean = torch.zeros_like(count).index_add_(0, g, r) / count
    centred = r - mean[g]
    sq = torch.zeros_like(count).index_add_(0, g, centred * centred)
    std = torch.where(count > 1, (sq / (count - 1).clamp(min=1)).sqrt(), torch.zeros_like(sq))
    peak = torch.zeros_like(count).scatter_reduce_(0, g, r.abs(), "amax", include_self=False)
    zero_group = std <= ZERO_STD_RTOL * peak.clamp(min=1.0)

    if scale == "group":
        adv = centred / (std[g] + eps)
    elif scale == "batch":
        batch_std = r.std(correction=1) if n > 1 else r.new_zeros(())
        adv = centred / (batch_std + eps)
    else:
        adv = centred
    zero = zero_group[g]
    adv = torch.where(zero, torch.zeros_like(adv), adv)
    return GroupAdvantages(adv.to(out_dtype), zero, num_groups, int(zero_group.sum().item()))


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                 estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's k1/k2/k3).

    With d = log pi_ref - log pi: k1 = -d, k2 = d^2 / 2, k3 = exp(d) - d - 1 (>= 0, unbiased).
    Shapes broadcast; no masking here.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator: {estimator!r} is not one of {', '.join(KL_ESTIMATORS)}.")
    d = ref_logprobs - logprobs
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    return torch.exp(d) - d - 1


def _check_2d(name: str, x: torch.Tensor | None, shape: torch.Size) -> None:
    if x is None:
        return
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor of shape {tuple(shape)}, "
                         f"got {type(x).__name__}.")
    if x.shape != shape:
        raise ValueError(f"{name}: shape {tuple(x.shape)} does not match logprobs' {tuple(shape)}.")


def _check_finite(name: str, x: torch.Tensor, keep: torch.Tensor) -> None:
    bad = keep & ~torch.isfinite(x.detach())
    if bool(bad.any()):
        where = bad.nonzero()[0].tolist()
        raise ValueError(f"{name}: non-finite value at unmasked position {where} "
                         f"({x[tuple(where)].item()!r}); check the forward pass or the rollout.")


def _check_mask(mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    _check_2d("mask", mask, shape)
    m = mask.detach()
    if not bool(((m == 0) | (m == 1)).all()):
        raise ValueError("mask: values must be 0 or 1 (use token_weights for soft weights).")
    return m.bool()


def loss_clip_defaults(loss: str) -> tuple[float, float]:
    """``(clip_low, clip_high)`` when the recipe leaves them unset.

    grpo: 0.2 / 0.2 (PPO). gspo, gspo_token: 3e-4 / 4e-4, the GSPO paper's ranges for its
    sequence-level ratio (arXiv 2507.18071). cispo: no lower bound on the importance weight
    (clip_low 1: weights >= 0), as MiniMax-M1 sets it (arXiv 2506.13585); the upper 0.28 is
    ours (the paper tunes it without publishing one value).
    """
    return {"grpo": (0.2, 0.2), "gspo": (3e-4, 4e-4), "gspo_token": (3e-4, 4e-4),
            "cispo": (1.0, 0.28)}[loss]


def sequence_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                   keep: torch.Tensor) -> torch.Tensor:
    """GSPO's s_i = exp(mean_t (log pi_theta - log pi_old)) over each row's kept tokens:
    Tensor[B] (1 for a row without tokens). Inputs [B, T]; ``keep`` bool [B, T]."""
    n = keep.sum(-1).clamp(min=1)
    return torch.exp(((logprobs - old_logprobs) * keep).sum(-1) / n)


def surrogate(loss: str, lp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor,
              keep: torch.Tensor, clip_low: float, clip_high: float):
    """The per-token objective of each loss, ``(obj, ratio, clipped_low, clipped_high)``,
    all [B, T]. ``lp`` carries the gradient; ``old``, ``adv`` are detached, zero where
    ``keep`` is False.

    grpo:       r = pi/pi_old per token; obj = min(r A, clip(r) A).
    gspo:       r = s_i (:func:`sequence_ratio`) for every token of row i; same min/clip.
    gspo_token: r = sg(s_i) * pi / sg(pi): the value of s_i, the gradient of a token ratio.
    cispo:      obj = sg(clip(r)) * A * log pi: the weight is clipped, never the gradient.
    clipped_low / clipped_high mark where the clip bound (r < 1-low, r > 1+high) acts.
    """
    lo, hi = 1 - clip_low, 1 + clip_high
    if loss in ("gspo", "gspo_token"):
        s = sequence_ratio(lp, old, keep)
        ratio = (s.detach()[:, None] * torch.exp(lp - lp.detach()) if loss == "gspo_token"
                 else s[:, None].expand_as(lp))
    else:
        ratio = torch.exp(lp - old)
    if loss == "cispo":
        obj = torch.clamp(ratio, lo, hi).detach() * adv * lp
        return obj, ratio, ratio < lo, ratio > hi
    obj = torch.minimum(ratio * adv, torch.clamp(ratio, lo, hi) * adv)
    return obj, ratio, (ratio < lo) & (adv < 0), (ratio > hi) & (adv > 0)


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, *, ref_logprobs: torch.Tensor | None = None,
                clip_low: float = 0.2, clip_high: float = 0.2, kl_coef: float = 0.0,
                kl_estimator: str = "k3", agg: str = "token_mean",
                token_weights: torch.Tensor | None = None,
                entropy: torch.Tensor | None = None, entropy_coef: float = 0.0,
                loss: str = "grpo",
                max_completion_length: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped GRPO-family surrogate loss and its metrics.

    logprobs: Tensor[B, T], log pi_theta of the completion tokens (carries the gradient).
    old_logprobs: Tensor[B, T], log pi_old of the same tokens (the policy that sampled them).
    advantages: Tensor[B] (one per sequence) or Tensor[B, T] (per token).
    mask: Tensor[B, T] of 0/1. ref_logprobs: Tensor[B, T], needed when kl_coef != 0.
    token_weights: Tensor[B, T], multiplies the clipped surrogate of each token (process-level
    masks, abnormality weights). The KL penalty is not weighted: it regularises every token
    the same, whatever the reward thinks of it. entropy: Tensor[B, T] (carrying the gradient
    when ``entropy_coef > 0``); reported, and with ``entropy_coef`` added as a bonus.
    loss: one of ``LOSSES`` (:func:`surrogate`). gspo refuses ``token_weights`` and per-token
    advantages that vary within a row (its ratio is one number per sequence): use gspo_token.

    Per token: obj = w * surrogate (grpo: min(ratio*A, clip(ratio, 1-clip_low, 1+clip_high)*A)
    with ratio = exp(logprobs - old_logprobs)) - kl_coef * KL + entropy_coef * H,
    KL by ``kl_estimator`` (see :func:`kl_per_token`). loss = -agg(obj) with
      token_mean   = sum(obj*mask) / sum(mask)                       (DAPO),
      seq_mean     = mean_b( sum_t(obj*mask) / max(1, sum_t mask) )  (DeepSeekMath GRPO),
      seq_sum_norm = sum(obj*mask) / (B * L)                         (Dr. GRPO),
    L = ``max_completion_length``, a constant of the run (the recipe's maximum completion
    length), required for seq_sum_norm: never the batch's padded width, which changes with
    every batch and micro-batch split.
    Under seq_mean a sequence without tokens contributes 0 but still counts in the mean over B,
    as in TRL. A mask without any token (every completion of a micro-batch masked out, e.g.
    truncated ones) gives a zero loss with a zero gradient and ``tokens`` 0.

    Returns (loss: 0-dim tensor, metrics: dict of floats). Metrics, over unmasked tokens:
    clip_frac_low (ratio < 1-clip_low with A < 0: gradient cut), clip_frac_high (ratio >
    1+clip_high with A > 0), clip_frac (either), approx_kl (KL(pi_old || pi_theta), k3 from
    the sampled tokens), kl (vs the reference, with the chosen estimator, when given),
    ratio_min/max/mean, masked_token_share (share of the B x T positions the mask excludes),
    tokens (number of unmasked tokens), entropy (mean, when given).
    """
    if not isinstance(logprobs, torch.Tensor) or logprobs.dim() != 2:
        shape = tuple(logprobs.shape) if isinstance(logprobs, torch.Tensor) else type(logprobs)
        raise ValueError(f"logprobs: expected a [B, T] tensor, got {shape}.")
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg: {agg!r} is not one of {', '.join(AGGREGATIONS)}.")
    if loss not in LOSSES:
        raise ValueError(f"loss: {loss!r} is not one of {', '.join(LOSSES)}.")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator: {kl_estimator!r} is not one of "
                         f"{', '.join(KL_ESTIMATORS)}.")
    for name, value in (("clip_low", clip_low), ("clip_high", clip_high), ("kl_coef", kl_coef),
                        ("entropy_coef", entropy_coef)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name}: must be a finite number >= 0, got {value!r}.")
    if clip_low > 1 or (clip_low == 1 and loss != "cispo"):
        raise ValueError(f"clip_low: must be < 1 (the ratio floor is 1 - clip_low; 1, no "
                         f"floor, only for cispo's weights), got {clip_low}.")
    if entropy_coef and entropy is None:
        raise ValueError("entropy: required when entropy_coef != 0.")
    if kl_coef != 0 and ref_logprobs is None:
        raise ValueError("ref_logprobs: required when kl_coef != 0.")
    shape = logprobs.shape
    B, T = shape
    if agg == "seq_sum_norm" and not (isinstance(max_completion_length, int)
                                      and max_completion_length >= T):
        raise ValueError(f"max_completion_length: seq_sum_norm needs the run's maximum "
                         f"completion length (an int >= the batch width {T}), got "
                         f"{max_completion_length!r}.")
    _check_2d("old_logprobs", old_logprobs, shape)
    _check_2d("ref_logprobs", ref_logprobs, shape)
    _check_2d("token_weights", token_weights, shape)
    _check_2d("entropy", entropy, shape)
    if not isinstance(advantages, torch.Tensor):
        raise ValueError(f"advantages: expected a tensor, got {type(advantages).__name__}.")
    if advantages.shape == (B,):
        advantages = advantages.unsqueeze(1).expand(B, T)
    elif advantages.shape != shape:
        raise ValueError(f"advantages: shape {tuple(advantages.shape)} is neither [B]=({B},) nor "
                         f"[B, T]={tuple(shape)}.")
    keep = _check_mask(mask, shape)
    if loss == "gspo" and token_weights is not None:
        raise ValueError("token_weights: gspo has one ratio per sequence, which per-token "
                         "weights cannot scale; use loss gspo_token.")
    named = [("logprobs", logprobs), ("old_logprobs", old_logprobs), ("advantages", advantages),
             ("ref_logprobs", ref_logprobs), ("token_weights", token_weights)]
    for name, x in named:
        if x is not None:
            _check_finite(name, x, keep)

    # Zero the ignored positions first, so NaN padding cannot leak into values or gradients.
    def clean(x: torch.Tensor) -> torch.Tensor:
        return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))

    lp, old, adv = clean(logprobs), clean(old_logprobs).detach(), clean(advantages).detach()
    if loss == "gspo" and bool(((adv - adv[:, :1]).abs() * keep).max() > 0):
        raise ValueError("advantages: gspo needs one advantage per sequence, and these vary "
                         "within a row; use loss gspo_token.")
    obj, ratio, low, high = surrogate(loss, lp, old, adv, keep, clip_low, clip_high)
    if token_weights is not None:
        obj = obj * clean(token_weights).detach()
    if entropy_coef:
        obj = obj + entropy_coef * clean(entropy)
    kl = None
    if ref_logprobs is not None:
        kl = kl_per_token(lp, clean(ref_logprobs).detach(), kl_estimator)
        if kl_coef != 0:
            obj = obj - kl_coef * kl

    maskf = keep.to(obj.dtype)
    if not bool(keep.any()):  # nothing to learn here; the graph stays, with zero gradients
        return (obj * maskf).sum(), _empty_metrics(kl is not None, entropy is not None)
    if agg == "token_mean":
        total = (obj * maskf).sum() / maskf.sum()
    elif agg == "seq_mean":
        total = ((obj * maskf).sum(-1) / maskf.sum(-1).clamp(min=1)).mean()
    else:
        total = (obj * maskf).sum() / (B * max_completion_length)
    loss = -total

    with torch.no_grad():
        n = keep.sum()
        r = ratio.detach()
        low, high = low & keep, high & keep
        log_r = (lp.detach() - old)
        metrics = {
            "clip_frac_low": (low.sum() / n).item(),
            "clip_frac_high": (high.sum() / n).item(),
            "clip_frac": ((low | high).sum() / n).item(),
            "approx_kl": (((r - 1) - log_r)[keep].mean()).item(),
            "ratio_min": r[keep].min().item(),
            "ratio_max": r[keep].max().item(),
            "ratio_mean": r[keep].mean().item(),
            "masked_token_share": 1.0 - (n / keep.numel()).item(),
            "tokens": float(n.item()),
        }
        if kl is not None:
            metrics["kl"] = kl.detach()[keep].mean().item()
        if entropy is not None:
            metrics["entropy"] = entropy.detach()[keep].mean().item()
    return loss, metrics


def _empty_metrics(with_kl: bool, with_entropy: bool) -> dict[str, float]:
    """policy_loss's metric keys for a mask without tokens (the same keys on every rank:
    the learner all-reduces them); extremes are the identities of min and max."""
    out = {"clip_frac_low": 0.0, "clip_frac_high": 0.0, "clip_frac": 0.0, "approx_kl": 0.0,
           "ratio_min": math.inf, "ratio_max": -math.inf, "ratio_mean": 1.0,
           "masked_token_share": 1.0, "tokens": 0.0}
    return {**out, **({"kl": 0.0} if with_kl else {}),
            **({"entropy": 0.0} if with_entropy else {})}


def sequence_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, *,
                estimator: str = "k3") -> torch.Tensor:
    """Mean per-token KL(pi || pi_ref) of each sequence: Tensor[B] (0 for a sequence with no
    tokens). For KL in the reward: the loop subtracts coef * sequence_kl from each reward.

    logprobs, ref_logprobs, mask: Tensor[B, T]. Differentiable; detach for use as a reward.
    """
    if not isinstance(logprobs, torch.Tensor) or logprobs.dim() != 2:
        raise ValueError("logprobs: expected a [B, T] tensor.")
    _check_2d("ref_logprobs", ref_logprobs, logprobs.shape)
    _check_2d("mask", mask, logprobs.shape)
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator: {estimator!r} is not one of {', '.join(KL_ESTIMATORS)}.")
    keep = mask.detach().bool()
    for name, x in (("logprobs", logprobs), ("ref_logprobs", ref_logprobs)):
        _check_finite(name, x, keep)
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    kl = kl_per_token(torch.where(keep, logprobs, zero), torch.where(keep, ref_logprobs, zero),
                      estimator)
    maskf = keep.to(kl.dtype)
    return (kl * maskf).sum(-1) / maskf.sum(-1).clamp(min=1)


def rollout_correction(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor,
                       mask: torch.Tensor, *, mode: str = "truncate", level: str = "token",
                       threshold: float = 2.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Importance weights for tokens sampled by another policy than the learner's old one.

    The engine that sampled the tokens (another process, other kernels, weights one or more
    updates old in async mode) is not exactly the learner's pi_old, so the clipped surrogate
    is taken under pi_old and re-weighted by rho = pi_old / pi_rollout (decoupled PPO):

      token level:    log rho_t = old_t - rollout_t
      sequence level: log rho_t = sum_t'(old_t' - rollout_t') for every t of the sequence
      mode "truncate" (truncated IS):  w = min(rho, threshold)
      mode "mask"     (masked IS):     w = 1 if 1/threshold <= rho <= threshold else 0

    old_logprobs, rollout_logprobs, mask: Tensor[B, T] (mask 0/1; masked positions ignored).
    threshold: C > 1. Returns (weights: float Tensor[B, T], detached, 0 on masked positions;
    metrics): ``rollout_mismatch/logprob_abs_diff`` (mean |old - rollout| over tokens),
    ``rollout_mismatch/truncated_share`` or ``/masked_share`` (share of tokens whose weight
    the correction changed), ``rollout_mismatch/log_rho_abs_max`` (largest |log rho|).
    """
    if mode not in CORRECTIONS or mode == "none":
        raise ValueError(f"mode: {mode!r} is not one of truncate, mask.")
    if level not in CORRECTION_LEVELS:
        raise ValueError(f"level: {level!r} is not one of {', '.join(CORRECTION_LEVELS)}.")
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold > 1):
        raise ValueError(f"threshold: must be a finite number > 1, got {threshold!r}.")
    _check_2d("rollout_logprobs", rollout_logprobs, old_logprobs.shape)
    keep = _check_mask(mask, old_logprobs.shape)
    for name, x in (("old_logprobs", old_logprobs), ("rollout_logprobs", rollout_logprobs)):
        _check_finite(name, x, keep)
    zero = torch.zeros((), dtype=old_logprobs.dtype, device=old_logprobs.device)
    diff = torch.where(keep, old_logprobs.detach() - rollout_logprobs.detach(), zero)
    log_rho = diff if level == "token" else diff.sum(-1, keepdim=True).expand_as(diff)
    log_c = math.log(threshold)
    if mode == "truncate":
        weights = torch.exp(log_rho.clamp(max=log_c))
        changed = log_rho > log_c
    else:
        changed = log_rho.abs() > log_c
        weights = (~changed).to(diff.dtype)
    weights = torch.where(keep, weights, zero)
    n = keep.sum()
    share = "truncated_share" if mode == "truncate" else "masked_share"
    metrics = {
        "rollout_mismatch/logprob_abs_diff": (diff.abs()[keep].mean()).item(),
        f"rollout_mismatch/{share}": ((changed & keep).sum() / n).item(),
        "rollout_mismatch/log_rho_abs_max": log_rho.abs()[keep].max().item(),
    }
    return weights, metrics
