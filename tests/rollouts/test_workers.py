"""Rollout workers as real Ray actors (HF engine, tiny Qwen2, local cluster): groups stay
whole, samples carry the policy version, weights travel through the object store, and a
killed worker comes back with the pushed weights before its batch is served."""

from __future__ import annotations

import pytest
import torch

from medrl.align.models import load_model
from medrl.align.records import Sample
from medrl.rollouts.engine import SamplingParams
from medrl.rollouts.worker import RolloutWorker, split_prompts

ATOL = 1e-4


def prompts(k: int) -> list[Sample]:
    return [Sample(uid=f"p{i}", group_id=f"p{i}",
                   messages=[{"role": "user", "content": f"Case {i}: chest pain. Next step?"}])
            for i in range(k)]


def naive_logprobs(model, sample: Sample) -> list[float]:
    ids = torch.tensor([sample.prompt_ids + sample.completion_ids])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    p, c = len(sample.prompt_ids), torch.tensor(sample.completion_ids)
    return torch.log_softmax(logits[p - 1:-1], dim=-1).gather(1, c[:, None]).squeeze(1).tolist()


def test_split_prompts_keeps_order_and_balance():
    items = prompts(5)
    chunks = split_prompts(items, 2)
    assert [[s.uid for s in c] for c in chunks] == [["p0", "p1", "p2"], ["p3", "p4"]]
    assert [len(c) for c in split_prompts(items[:1], 3)] == [1, 0, 0]


def test_worker_class_runs_without_ray(tiny_qwen2):
    worker = RolloutWorker("hf", str(tiny_qwen2), {"seed": 0})
    model = load_model(tiny_qwen2)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.01)
    items = list(model.state_dict().items())
    assert worker.update_weights([items[:10], items[10:]], 3) == 3  # buckets given directly
    out = worker.generate(prompts(1), SamplingParams(n=2, max_new_tokens=4, seed=0))
    assert [s.policy_version for s in out] == [3, 3]
    for s, row in zip(out, worker.score(out)):
        assert torch.allclose(torch.tensor(row), torch.tensor(naive_logprobs(model, s)),
                              atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def group(ray_local, tiny_qwen2):
    from medrl.rollouts.worker import RolloutGroup

    g = RolloutGroup(2, "hf", str(tiny_qwen2), {"seed": 0}, num_cpus_per_worker=1,
                     max_restarts=2)
    yield g
    g.shutdown()


@pytest.fixture(scope="module")
def pushed_model(tiny_qwen2):
    """A changed copy of the policy (what a learner step would produce)."""
    model = load_model(tiny_qwen2).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


@pytest.mark.slow
def test_group_generates_whole_groups_in_prompt_order(group):
    out = group.generate(prompts(3), SamplingParams(n=2, max_new_tokens=5, seed=1))
    assert [s.uid for s in out] == [f"p{i}/{j}" for i in range(3) for j in range(2)]
    assert all(s.policy_version == group.policy_version == 0 for s in out)
    assert all(len(s.rollout_logprobs) == len(s.completion_ids) > 0 for s in out)


@pytest.mark.slow
def test_weights_pushed_through_object_store_reach_every_worker(group, pushed_model, ray_local):
    ray = ray_local
    items = list(pushed_model.state_dict().items())
    half = len(items) // 2
    refs = [ray.put(items[:half]), ray.put(items[half:])]
    group.update_weights_from_refs(refs, version=1)

    out = group.generate(prompts(2), SamplingParams(n=2, max_new_tokens=5, seed=2))
    assert all(s.policy_version == 1 for s in out)
    reference = [naive_logprobs(pushed_model, s) for s in out]
    per_worker = group.score_all(out)
    assert len(per_worker) == 2
    for scores in per_worker:
        for row, ref in zip(scores, reference):
            assert torch.allclose(torch.tensor(row), torch.tensor(ref), atol=ATOL, rtol=0)
    worst = group.verify_sync(lambda ss: [naive_logprobs(pushed_model, s) for s in ss],
                              out, atol=ATOL)
    assert worst <= ATOL


@pytest.mark.slow
def test_killed_worker_is_restarted_and_repushed(group, pushed_model, ray_local):
    ray = ray_local
    assert group.policy_version == 1  # after the push above
    handled = group.restarts_handled
    ray.kill(group.workers[0], no_restart=False)  # Ray restarts it with start-up weights

    out = group.generate(prompts(4), SamplingParams(n=2, max_new_tokens=5, seed=3))
    assert group.restarts_handled == handled + 1
    assert [s.uid for s in out] == [f"p{i}/{j}" for i in range(4) for j in range(2)]
    assert all(s.policy_version == 1 for s in out)
    for s in out:  # the restarted worker's half was generated with the pushed weights
        assert torch.allclose(torch.tensor(s.rollout_logprobs),
                              torch.tensor(naive_logprobs(pushed_model, s)), atol=ATOL, rtol=0)
