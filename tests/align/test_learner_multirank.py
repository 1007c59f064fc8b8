"""Two learner ranks as Ray actors (DeepSpeed over gloo) against one rank on the same batch."""

from __future__ import annotations

import pytest
import torch

from learner_samples import make_samples

pytestmark = pytest.mark.slow


def full_weights(learner) -> dict[str, torch.Tensor]:
    return {name: t for bucket in learner.state_dict_for_sync() for name, t in bucket}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_ranks_equal_one_rank_on_the_global_batch(ray_local, tiny_qwen2, tmp_path,
                                                      zero_stage):
    from medrl.align.learner import Learner
    from medrl.launch.learner_group import LearnerGroup

    # 5 samples: shards of 2 and 3, so with micro-batches of 1 the ranks run 2 and 3 passes
    # (the short rank pads with a zero-weight pass, as ZeRO-3's collective forward needs).
    samples = make_samples(5)
    kwargs = dict(zero_stage=zero_stage, micro_batch_size=1, lr=1e-4, kl_coef=0.05,
                  lr_schedule="constant", seed=0, reference="beside")
    group = LearnerGroup(2, tiny_qwen2, kwargs, num_cpus_per_worker=1)
    try:
        multi = group.train_step(samples)
        fingerprints = group.fingerprints()
        synced = {name: t for ref in group.sync_buckets(bucket_mb=0.3)
                  for name, t in ray_local.get(ref)}
        multi_lp = group.logprobs(samples)
        group.save(tmp_path / "ckpt")
        assert (tmp_path / "ckpt" / "policy" / "model.safetensors").is_file()
        onward = group.train_step(samples)
        group.load(tmp_path / "ckpt")  # back one step: the same step again, exactly
        assert group.train_step(samples) == onward
    finally:
        group.shutdown()

    single = Learner(tiny_qwen2, **kwargs)
    batch = single.collate(samples)
    one = single.train_step(batch)
    # Gradients are summed over ranks in another order than over micro-batches on one rank:
    # float rounding only (Adam turns it into ~1e-6 weight differences at lr 1e-4).
    assert multi["loss"] == pytest.approx(one["loss"], abs=1e-6)
    assert multi["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
    assert multi["tokens"] == one["tokens"] == batch.completion_mask.sum().item()
    assert fingerprints[0] == fingerprints[1]
    assert max_diff(synced, full_weights(single)) < 2e-5
    lp = single.logprobs(batch)
    for i, s in enumerate(samples):
        assert torch.allclose(multi_lp[i], lp[i, :len(s.completion_ids)], atol=1e-5)


def test_calls_from_two_threads_reach_every_rank_in_the_same_order(ray_local, tiny_qwen2):
    """Async mode calls the learner from the rollout thread (the policy log-prob hook) while
    the loop trains: the group serialises its calls, so both ranks run one sequence."""
    import sys
    import threading

    from medrl.launch.learner_group import LearnerGroup

    group = LearnerGroup(2, tiny_qwen2, dict(zero_stage=2, micro_batch_size=2),
                         num_cpus_per_worker=1)
    try:
        samples = make_samples(4)
        threads = [threading.Thread(target=lambda: [group.logprobs(samples) for _ in range(30)]),
                   threading.Thread(target=lambda: [group.fingerprints() for _ in range(30)])]
        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)  # switch threads often: between the two ranks' submissions
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=300)
        finally:
            sys.setswitchinterval(interval)
        first, second = group.call_histories()
        assert sorted(first) == ["fingerprint"] * 30 + ["logprobs"] * 30
        assert first == second
    finally:
        group.shutdown()
