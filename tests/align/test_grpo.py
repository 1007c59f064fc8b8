"""GRPO maths: hand-computed cases for every option, gradients, errors, and agreement with TRL."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from medrl.align import group_advantages, policy_loss
from medrl.align.grpo import rollout_correction, sequence_kl

# ---------------------------------------------------------------------------------------------
# group_advantages


def test_group_advantages_group_scale_by_hand():
    # Groups interleaved and of different sizes: a = [1, 0], b = [0.5] (alone), c = [2, 2].
    res = group_advantages([1.0, 0.5, 2.0, 0.0, 2.0], ["a", "b", "c", "a", "c"])
    s = math.sqrt(0.5)  # unbiased std of [1, 0]
    expected = torch.tensor([0.5 / (s + 1e-6), 0.0, 0.0, -0.5 / (s + 1e-6), 0.0])
    torch.testing.assert_close(res.advantages, expected)
    assert res.zero_variance.tolist() == [False, True, True, False, True]
    assert (res.num_groups, res.num_zero_variance_groups) == (3, 2)
    assert res.advantages.dtype == torch.float32


def test_group_advantages_batch_and_none_scales():
    rewards, ids = [1.0, 0.5, 2.0, 0.0, 3.0], ["a", "b", "c", "a", "c"]
    none = group_advantages(rewards, ids, scale="none").advantages
    torch.testing.assert_close(none, torch.tensor([0.5, 0.0, -0.5, -0.5, 0.5]))
    batch = group_advantages(rewards, ids, scale="batch", eps=0.0).advantages
    torch.testing.assert_close(batch, none / statistics.stdev(rewards))


def test_zero_variance_is_judged_on_the_std_not_the_mean():
    # Continuous rewards: a constant group with a non-zero mean, a group equal up to float
    # noise, and a group that differs by a real (small) amount.
    res = group_advantages(torch.tensor([0.3, 0.3, 0.3, 0.7, 0.7 + 1e-12, 0.30, 0.31],
                                        dtype=torch.float64),
                           [1, 1, 1, 2, 2, 3, 3])
    assert res.zero_variance.tolist() == [True] * 5 + [False] * 2
    assert res.num_zero_variance_groups == 2
    assert res.advantages.dtype == torch.float64
    assert res.advantages[:5].abs().max() == 0
    assert res.advantages[5] < 0 < res.advantages[6]


def test_group_std_is_the_unbiased_one_as_in_trl():
    """TRL's GRPOTrainer scales by trl.trainer.utils.nanstd (Bessel-corrected). Its advantage
    code is inline in the trainer, not a callable function, so the convention is checked through
    TRL's own std function on contiguous groups of equal size."""
    from trl.trainer.utils import nanstd

    torch.manual_seed(0)
    rewards = torch.rand(12, dtype=torch.float64)
    grouped = rewards.view(3, 4)
    mean = grouped.mean(1, keepdim=True)
    trl_adv = ((grouped - mean) / (nanstd(grouped, dim=1, keepdim=True) + 1e-4)).flatten()
    ours = group_advantages(rewards, [i // 4 for i in range(12)], eps=1e-4).advantages
    torch.testing.assert_close(ours, trl_adv)


@pytest.mark.parametrize("rewards, ids, scale, match", [
    ([1.0, 2.0], ["a"], "group", "group_ids"),
    ([1.0, float("nan")], ["a", "a"], "group", "rewards"),
    ([1.0, float("inf")], ["a", "a"], "group", "rewards"),
    ([[1.0, 2.0]], ["a"], "group", "rewards"),
    ([1.0, 2.0], ["a", "a"], "whole", "scale"),
    ([1.0, 2.0], [["a"], ["a"]], "group", "group_ids"),
])
def test_group_advantages_errors(rewards, ids, scale, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(rewards, ids, scale=scale)


# ---------------------------------------------------------------------------------------------
# policy_loss: one hand-computed batch. Ratios row 0: 1.5, 0.7, 1.0 (A = +1);
# row 1: 1.1, 0.5, padding (A = -2).

RATIOS = torch.tensor([[1.5, 0.7, 1.0], [1.1, 0.5, 1.0]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
ADV = torch.tensor([1.0, -2.0], dtype=torch.float64)


def _batch():
    old = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.5, -0.7]], dtype=torch.float64)
    lp = (old + RATIOS.log()).requires_grad_(True)
    return lp, old


# Per-token objective: row 0 -> 1.2 (clipped high), 0.7, 1.0; row 1 -> -2.2, -1.6 (clipped low)
@pytest.mark.parametrize("agg, expected", [
    ("token_mean", 0.9 / 5),
    ("seq_mean", -((1.2 + 0.7 + 1.0) / 3 + (-2.2 - 1.6) / 2) / 2),
    ("seq_sum_norm", 0.9 / (2 * 5)),  # B x L, L = 5 the run's maximum, not the width 3
])
def test_policy_loss_aggregations_by_hand(agg, expected):
    lp, old = _batch()
    loss, m = policy_loss(lp, old, ADV, MASK, agg=agg, max_completion_length=5)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert m["clip_frac_high"] == pytest.approx(1 / 5)
    assert m["clip_frac_low"] == pytest.approx(1 / 5)
    assert m["clip_frac"] == pytest.approx(2 / 5)
    assert (m["ratio_min"], m["ratio_max"]) == pytest.approx((0.5, 1.5))
    assert m["ratio_mean"] == pytest.approx(4.8 / 5)
    assert m["masked_token_share"] == pytest.approx(1 / 6)
    assert m["tokens"] == 5
    r = [1.5, 0.7, 1.0, 1.1, 0.5]
    assert m["approx_kl"] == pytest.approx(sum(x - 1 - math.log(x) for x in r) / 5)
    assert "kl" not in m and "entropy" not in m
    assert all(isinstance(v, float) for v in m.values())


def test_clip_higher_is_asymmetric():
    lp, old = _batch()
    # A wider upper clip lets the 1.5 ratio count up to 1.28.
    loss, m = policy_loss(lp, old, ADV, MASK, clip_low=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx(-(1.28 + 0.7 + 1.0 - 2.2 - 1.6) / 5)
    assert m["clip_frac_high"] == pytest.approx(1 / 5)
    # A wider lower clip (floor 0.4) releases the 0.5 ratio of the negative advantage.
    loss, m = policy_loss(lp, old, ADV, MASK, clip_low=0.6, clip_high=0.2)
    assert loss.item() == pytest.approx(-(1.2 + 0.7 + 1.0 - 2.2 - 1.0) / 5)
    assert m["clip_frac_low"] == 0


def test_per_token_advantages_and_token_weights():
    lp, old = _batch()
    expanded, _ = policy_loss(lp, old, ADV[:, None].expand(2, 3).clone(), MASK)
    per_seq, _ = policy_loss(lp, old, ADV, MASK)
    assert expanded.item() == pytest.approx(per_seq.item(), abs=1e-12)

    adv = torch.tensor([[1.0, 0.0, 2.0], [-1.0, 3.0, 9.0]], dtype=torch.float64)  # 9 is padding
    loss, _ = policy_loss(lp, old, adv, MASK)
    assert loss.item() == pytest.approx(-(1.2 + 0.0 + 2.0 - 1.1 + 1.5) / 5)

    w = torch.tensor([[0.5, 1.0, 2.0], [1.0, 0.0, 7.0]], dtype=torch.float64)  # 7 is padding
    loss, _ = policy_loss(lp, old, ADV, MASK, token_weights=w)
    assert loss.item() == pytest.approx(-(0.6 + 0.7 + 2.0 - 2.2 + 0.0) / 5)


@pytest.mark.parametrize("estimator, k", [
    ("k1", -math.log(2)),
    ("k2", 0.5 * math.log(2) ** 2),
    ("k3", 2 - math.log(2) - 1),
])
def test_kl_estimators_by_hand(estimator, k):
    lp, old = _batch()
    ref = lp.detach() + math.log(2)  # log pi_ref - log pi = log 2 on every token
    base, _ = policy_loss(lp, old, ADV, MASK)
    loss, m = policy_loss(lp, old, ADV, MASK, ref_logprobs=ref, kl_coef=0.1, kl_estimator=estimator)
    assert loss.item() == pytest.approx(base.item() + 0.1 * k, abs=1e-12)
    assert m["kl"] == pytest.approx(k)
    # Reported but not penalised when kl_coef is 0.
    loss0, m0 = policy_loss(lp, old, ADV, MASK, ref_logprobs=ref, kl_estimator=estimator)
    assert loss0.item() == pytest.approx(base.item()) and m0["kl"] == pytest.approx(k)


def test_sequence_kl():
    lp = torch.zeros(2, 3, dtype=torch.float64)
    ref = torch.tensor([[math.log(2)] * 3, [math.log(0.5)] * 2 + [float("nan")]],
                       dtype=torch.float64)
    kl = sequence_kl(lp, ref, MASK)
    torch.testing.assert_close(kl, torch.tensor([1 - math.log(2), 0.5 + math.log(2) - 1],
                                                dtype=torch.float64))
    torch.testing.assert_close(sequence_kl(lp, ref, MASK, estimator="k1"),
                               torch.tensor([-math.log(2), math.log(2)], dtype=torch.float64))
    with pytest.raises(ValueError, match="estimator"):
        sequence_kl(lp, ref, MASK, estimator="k4")


def test_entropy_metric():
    lp, old = _batch()
    ent = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]])
    _, m = policy_loss(lp, old, ADV, MASK, entropy=ent)
    assert m["entropy"] == pytest.approx(3.0)


# ---------------------------------------------------------------------------------------------
# gradients


def test_clipped_tokens_get_zero_gradient():
    lp, old = _batch()
    loss, _ = policy_loss(lp, old, ADV, MASK)
    loss.backward()
    # d(-mean obj)/d lp = -A * ratio / N on unclipped tokens; 0 on clipped and padded ones.
    expected = torch.tensor([[0.0, -0.7, -1.0], [2.2, 0.0, 0.0]], dtype=torch.float64) / 5
    torch.testing.assert_close(lp.grad, expected)


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean", "seq_sum_norm"])
def test_gradcheck(agg):
    g = torch.Generator().manual_seed(1)
    lp = (-torch.rand(3, 4, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    old = lp.detach() + 0.3 * torch.randn(3, 4, generator=g, dtype=torch.float64)
    ref = lp.detach() + 0.2 * torch.randn(3, 4, generator=g, dtype=torch.float64)
    adv = torch.randn(3, 4, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    w = torch.rand(3, 4, generator=g, dtype=torch.float64)

    def f(x):
        return policy_loss(x, old, adv, mask, ref_logprobs=ref, kl_coef=0.05, agg=agg,
                           token_weights=w, clip_high=0.28, max_completion_length=6)[0]

    assert torch.autograd.gradcheck(f, (lp,))


def test_nan_in_padding_does_not_leak():
    lp, old = _batch()
    with torch.no_grad():
        lp[1, 2] = float("nan")
    old[1, 2] = float("inf")
    adv = torch.tensor([[1.0, 1.0, 1.0], [-2.0, -2.0, float("nan")]], dtype=torch.float64)
    loss, m = policy_loss(lp, old, adv, MASK)
    loss.backward()
    assert loss.item() == pytest.approx(0.9 / 5)
    assert torch.isfinite(lp.grad).all() and lp.grad[1, 2] == 0
    assert all(math.isfinite(v) for v in m.values())


# ---------------------------------------------------------------------------------------------
# errors


def _err(match, **changes):
    lp, old = _batch()
    args = dict(logprobs=lp, old_logprobs=old, advantages=ADV, mask=MASK)
    args.update(changes)
    with pytest.raises(ValueError, match=match):
        policy_loss(**args)


def test_policy_loss_errors():
    lp, old = _batch()
    _err("old_logprobs", old_logprobs=old[:, :2])
    _err("advantages", advantages=ADV[:1])
    _err("ref_logprobs", ref_logprobs=old[:1])
    _err("token_weights", token_weights=torch.ones(2, 2))
    _err("mask", mask=torch.full((2, 3), 0.5))
    _err("logprobs", logprobs=lp[0])
    bad = lp.detach().clone()
    bad[0, 1] = float("nan")
    _err("logprobs", logprobs=bad)
    _err("advantages", advantages=torch.tensor([float("nan"), 1.0], dtype=torch.float64))
    _err("agg", agg="sum")
    _err("kl_estimator", kl_estimator="k4")
    _err("ref_logprobs", kl_coef=0.1)
    _err("clip_low", clip_low=-0.1)
    _err("clip_low", clip_low=1.0)


# ---------------------------------------------------------------------------------------------
# agreement with TRL's GRPOTrainer


class _OneProcess:
    """The few Accelerator methods the loss reads, for a single process."""

    num_processes = 1

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


class _TRLLoss:
    """Just enough of a GRPOTrainer for TRL's own ``GRPOTrainer._compute_loss`` to run.

    The trainer's forward pass is replaced by the prepared log-probs; everything after it (the
    ratio, clipping, k3 KL, masking and aggregation) is TRL's code. The model is in eval mode
    so that no gradient-accumulation factor enters, and:
    - dr_grpo divides by B * max_completion_length, a constant of the run: it is set larger
      than the mask's width T, as in a real batch, and our seq_sum_norm gets the same one;
    - dapo divides by num_items_in_batch / num_processes: one process and num_items_in_batch =
      the number of unmasked tokens make it our token_mean.
    """

    def __init__(self, loss_type, logprobs, *, eps_low, eps_high, beta, max_completion_length):
        self.loss_type, self.beta = loss_type, beta
        self.epsilon_low, self.epsilon_high = eps_low, eps_high
        self.top_entropy_quantile = 1.0
        self.off_policy_mask_threshold = None
        self.importance_sampling_level = "token"
        self.args = SimpleNamespace(delta=None, use_bias_correction_kl=False)
        self.use_vllm = False
        self.vllm_importance_sampling_correction = False
        self.model = SimpleNamespace(training=False)
        self.current_gradient_accumulation_steps = 1
        self.max_completion_length = max_completion_length
        self.accelerator = _OneProcess()
        self._entropy_bonus_enabled = False
        self.aux_loss_enabled = False
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._logprobs = logprobs

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                           **kwargs):
        assert logits_to_keep == self._logprobs.size(1)
        return self._logprobs, torch.zeros_like(self._logprobs), None

    def loss(self, old, ref, adv, mask):
        from trl import GRPOTrainer

        B, T = mask.shape
        inputs = {
            "prompt_ids": torch.ones(B, 2, dtype=torch.long),
            "prompt_mask": torch.ones(B, 2, dtype=torch.long),
            "completion_ids": torch.ones(B, T, dtype=torch.long),
            "completion_mask": mask,
            "advantages": adv,
            "old_per_token_logps": old,
            "ref_per_token_logps": ref,
            "num_items_in_batch": mask.sum(),
        }
        return GRPOTrainer._compute_loss(self, None, inputs)


@pytest.mark.parametrize("trl_type, agg", [("grpo", "seq_mean"), ("dapo", "token_mean"),
                                           ("dr_grpo", "seq_sum_norm")])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_matches_trl_grpo_loss(trl_type, agg, beta):
    g = torch.Generator().manual_seed(7)
    B, T = 4, 6
    base = -torch.rand(B, T, generator=g, dtype=torch.float64) * 4
    old = base + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = base + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    lengths = torch.tensor([6, 3, 1, 5])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()

    lp_trl = base.clone().requires_grad_(True)
    max_len = T + 3  # no completion of this batch reached the run's maximum length
    trl = _TRLLoss(trl_type, lp_trl, eps_low=0.2, eps_high=0.28, beta=beta,
                   max_completion_length=max_len)
    trl_loss = trl.loss(old, ref, adv, mask)
    trl_loss.backward()

    lp = base.clone().requires_grad_(True)
    loss, m = policy_loss(lp, old, adv, mask, ref_logprobs=ref, clip_low=0.2, clip_high=0.28,
                          kl_coef=beta, kl_estimator="k3", agg=agg, max_completion_length=max_len)
    loss.backward()

    torch.testing.assert_close(loss, trl_loss)
    torch.testing.assert_close(lp.grad, lp_trl.grad)
    metrics = trl._metrics["eval"]
    assert m["clip_frac_low"] == pytest.approx(metrics["clip_ratio/low_mean"][0])
    assert m["clip_frac_high"] == pytest.approx(metrics["clip_ratio/high_mean"][0])
    assert m["clip_frac"] == pytest.approx(metrics["clip_ratio/region_mean"][0])
    assert m["clip_frac"] > 0  # the case really exercises clipping
    if beta:
        assert m["kl"] == pytest.approx(metrics["kl"][0])


def test_seq_sum_norm_needs_the_runs_maximum_length():
    lp, old = _batch()
    with pytest.raises(ValueError, match="max_completion_length"):
        policy_loss(lp, old, ADV, MASK, agg="seq_sum_norm")
    with pytest.raises(ValueError, match="max_completion_length"):  # shorter than the batch
        policy_loss(lp, old, ADV, MASK, agg="seq_sum_norm", max_completion_length=2)


def test_seq_sum_norm_does_not_depend_on_the_batch_width():
    """Dr. GRPO's constant normaliser: padding a batch wider changes nothing."""
    lp, old = _batch()
    narrow, _ = policy_loss(lp, old, ADV, MASK, agg="seq_sum_norm", max_completion_length=8)
    pad = torch.zeros(2, 2, dtype=torch.float64)
    wide, _ = policy_loss(torch.cat([lp, pad], 1), torch.cat([old, pad], 1), ADV,
                          torch.cat([MASK, pad.long()], 1), agg="seq_sum_norm",
                          max_completion_length=8)
    assert wide.item() == pytest.approx(narrow.item(), abs=1e-15)


def _ratios(old_minus_rollout):
    """A [1, 3] batch whose learner old log-probs exceed the rollout's by the given amounts."""
    rollout = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64)
    return rollout + torch.tensor([old_minus_rollout], dtype=torch.float64), rollout


def test_truncated_importance_weights_by_hand():
    old, rollout = _ratios([math.log(3.0), math.log(0.5), 0.0])
    mask = torch.tensor([[1, 1, 1]])
    w, m = rollout_correction(old, rollout, mask, mode="truncate", threshold=2.0)
    assert w[0].tolist() == pytest.approx([2.0, 0.5, 1.0])  # min(rho, C)
    assert m["rollout_mismatch/truncated_share"] == pytest.approx(1 / 3)
    expected = (math.log(3.0) + math.log(2.0)) / 3
    assert m["rollout_mismatch/logprob_abs_diff"] == pytest.approx(expected)


def test_masked_importance_weights_token_and_sequence_level():
    old, rollout = _ratios([math.log(3.0), math.log(0.25), math.log(1.5)])
    mask = torch.tensor([[1, 1, 1]])
    w, m = rollout_correction(old, rollout, mask, mode="mask", threshold=2.0)
    assert w.tolist() == [[0.0, 0.0, 1.0]]  # rho outside [1/2, 2] is dropped
    assert m["rollout_mismatch/masked_share"] == pytest.approx(2 / 3)
    # Sequence level: rho = 3 * 0.25 * 1.5 = 1.125 lies inside [1/2, 2]: the row is kept.
    w, m = rollout_correction(old, rollout, mask, mode="mask", level="sequence", threshold=2.0)
    assert w.tolist() == [[1.0, 1.0, 1.0]]
    w, _ = rollout_correction(old, rollout, mask, mode="truncate", level="sequence",
                              threshold=1.1)
    assert w[0].tolist() == pytest.approx([1.1, 1.1, 1.1])


def test_importance_weights_ignore_padding():
    old, rollout = _ratios([math.log(3.0), 0.0, 0.0])
    rollout[0, 2] = float("nan")
    w, m = rollout_correction(old, rollout, torch.tensor([[1, 1, 0]]), mode="truncate")
    assert w[0].tolist() == pytest.approx([2.0, 1.0, 0.0])
    assert m["rollout_mismatch/truncated_share"] == pytest.approx(1 / 2)
