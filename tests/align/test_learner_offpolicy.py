"""The learner's old log-probs and precision: behaviour-policy ratios for stale samples,
importance-weight corrections, dropout-free policy-gradient passes, and model.dtype."""

from __future__ import annotations

import math

import pytest
import torch

from learner_samples import make_samples
from medrl.align.records import UserError


def _with_rollout(learner, samples, shift: float, version: int):
    """Give ``samples`` rollout log-probs equal to the learner's own minus ``shift``, as if
    the policy ``version`` had sampled them."""
    lp = learner.logprobs(learner.collate(samples))
    for i, s in enumerate(samples):
        s.rollout_logprobs = (lp[i, :len(s.completion_ids)] - shift).tolist()
        s.policy_version = version
    return samples


def test_stale_samples_take_the_behaviour_policys_log_probs(make_learner):
    """Samples of policy 0 trained by a learner at version 1: the ratio is
    pi_theta / pi_behaviour, not 1 as a recomputation with the current weights would give."""
    learner = make_learner(zero_stage=2, lr=1e-3, lr_schedule="constant")
    samples = _with_rollout(learner, make_samples(3), shift=0.1, version=0)
    metrics = learner.train_step(learner.collate(samples), policy_version=1)
    assert metrics["ratio_min"] == pytest.approx(math.exp(0.1), rel=1e-5)
    assert metrics["ratio_max"] == pytest.approx(math.exp(0.1), rel=1e-5)
    assert metrics["rollout_mismatch/logprob_abs_diff"] == pytest.approx(0.1, rel=1e-4)

    # The same samples sampled by the current policy: recomputed old log-probs, ratio 1.
    fresh = _with_rollout(learner, make_samples(3), shift=0.1, version=1)
    metrics = learner.train_step(learner.collate(fresh), policy_version=1)
    assert metrics["ratio_min"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["ratio_max"] == pytest.approx(1.0, abs=1e-6)


def test_rollout_old_logprobs_are_the_engines(make_learner):
    learner = make_learner(zero_stage=2, old_logprobs="rollout")
    samples = _with_rollout(learner, make_samples(2), shift=-0.2, version=0)
    metrics = learner.train_step(learner.collate(samples), policy_version=0)
    assert metrics["ratio_max"] == pytest.approx(math.exp(-0.2), rel=1e-5)
    samples[0].rollout_logprobs, samples[1].rollout_logprobs = [], []
    with pytest.raises(UserError, match="old_logprobs is rollout"):
        learner.train_step(learner.collate(samples))


@pytest.mark.parametrize("mode, shift, changed", [("truncate", 1.0, True),
                                                  ("truncate", -1.0, False),
                                                  ("mask", -1.0, True),
                                                  ("mask", 0.3, False)])
def test_rollout_correction_reweights_stale_tokens(make_learner, mode, shift, changed):
    """Decoupled PPO: the clip is anchored at the learner's recomputation (ratio 1) and each
    token is weighted by pi_old / pi_rollout = exp(shift), truncated at 2 or masked outside
    [1/2, 2]."""
    learner = make_learner(zero_stage=2, correction=mode, correction_threshold=2.0)
    samples = _with_rollout(learner, make_samples(3), shift=shift, version=0)
    metrics = learner.train_step(learner.collate(samples), policy_version=1)
    assert metrics["ratio_min"] == pytest.approx(1.0, abs=1e-6)
    share = "truncated_share" if mode == "truncate" else "masked_share"
    assert metrics[f"rollout_mismatch/{share}"] == pytest.approx(1.0 if changed else 0.0)
    assert metrics["rollout_mismatch/log_rho_abs_max"] == pytest.approx(abs(shift), rel=1e-4)


def test_correction_needs_recomputed_old_logprobs(make_learner):
    with pytest.raises(UserError, match="old_logprobs"):
        make_learner(zero_stage=2, correction="truncate", old_logprobs="rollout")


def test_lora_dropout_does_not_enter_the_ratio(make_learner):
    """With LoRA dropout the policy-gradient pass must compute the same function as the
    recomputed old log-probs: with a learning rate too small to move the ratio, every token's
    ratio stays 1 (to 1e-4) in both PPO epochs. LoRA's B starts at 0, which would hide
    dropout: it is drawn at random here (ZeRO-0 keeps no separate master copy)."""
    learner = make_learner(zero_stage=0, lr=1e-7, lora=dict(r=4, alpha=8, dropout=0.5))
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for name, p in learner.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    metrics = learner.train_step(learner.collate(make_samples(3)), ppo_epochs=2)
    assert metrics["ratio_min"] == pytest.approx(1.0, abs=1e-4)
    assert metrics["ratio_max"] == pytest.approx(1.0, abs=1e-4)


def test_one_epoch_takes_old_logprobs_from_the_gradient_pass(make_learner):
    """One PPO epoch: pi_old is the policy-gradient pass's own (detached) log-probs, so the
    ratio is exactly 1 and the update equals the one with a separate recomputation."""
    samples = make_samples(3)
    a = make_learner(zero_stage=0, lr=1e-3, lr_schedule="constant")
    one = a.train_step(a.collate(samples))
    b = make_learner(zero_stage=0, lr=1e-3, lr_schedule="constant")
    batch = b.collate(samples)
    batch.old_logprobs = b.logprobs(batch)  # the separate recomputation, given explicitly
    separate = b.train_step(batch)
    assert one["ratio_min"] == one["ratio_max"] == 1.0
    assert one["loss"] == pytest.approx(separate["loss"], abs=1e-6)
    assert one["grad_norm"] == pytest.approx(separate["grad_norm"], rel=1e-5)


@pytest.mark.parametrize("name, dtype", [("float32", torch.float32),
                                         ("bfloat16", torch.bfloat16),
                                         ("auto", torch.float32)])
def test_model_dtype_reaches_deepspeed_and_the_weights(make_learner, name, dtype):
    learner = make_learner(zero_stage=2, dtype=name)
    assert learner.ds_config["bf16"]["enabled"] is (dtype == torch.bfloat16)
    assert learner.ds_config["fp16"]["enabled"] is False
    assert {p.dtype for p in learner.model.parameters()} == {dtype}
    metrics = learner.train_step(learner.collate(make_samples(2)))
    assert math.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0


def test_fp16_turns_on_deepspeeds_fp16_mode():
    from medrl.align.distributed import deepspeed_config
    from medrl.align.models import resolve_dtype

    dtype = resolve_dtype("float16", on_gpu=False)
    config = deepspeed_config(zero_stage=2, micro_batch_size=1, dtype=dtype, max_grad_norm=1.0,
                              offload_optimizer=False, optimizer="adamw", lr=1e-5,
                              betas=(0.9, 0.999), weight_decay=0.0)
    assert dtype == torch.float16 and config["fp16"]["enabled"] and not config["bf16"]["enabled"]
    assert resolve_dtype("auto", on_gpu=True) == torch.bfloat16
    with pytest.raises(UserError, match="model.dtype"):
        resolve_dtype("fp8", on_gpu=False)


def test_attn_implementation_reaches_the_policy_and_the_reference(make_learner):
    from medrl.align.reference import Reference

    learner = make_learner(zero_stage=2, attn_implementation="eager", kl_coef=0.1,
                           reference=Reference.CPU)
    assert learner.model.config._attn_implementation == "eager"
    assert learner.ref_model.policy.config._attn_implementation == "eager"
