"""Rollout workers as real Ray actors (HF engine, tiny Qwen2, local cluster): groups stay
whole, samples carry the policy version, weights travel through the object store, and a
killed worker comes back with the pushed weights before its batch is served."""

from __future__ import annotations

import time

import pytest
import torch
from engine_backends import wait_until_restarted

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
    version, scores = worker.score(out)
    assert version == 3
    for s, row in zip(out, scores):
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
    wait_until_restarted(ray, group.workers[0], pushed=1)  # the kill is asynchronous

    out = group.generate(prompts(4), SamplingParams(n=2, max_new_tokens=5, seed=3))
    assert group.restarts_handled == handled + 1
    assert [s.uid for s in out] == [f"p{i}/{j}" for i in range(4) for j in range(2)]
    assert all(s.policy_version == 1 for s in out)
    for s in out:  # the restarted worker's half was generated with the pushed weights
        assert torch.allclose(torch.tensor(s.rollout_logprobs),
                              torch.tensor(naive_logprobs(pushed_model, s)), atol=ATOL, rtol=0)


@pytest.mark.slow
def test_verify_sync_catches_up_a_worker_that_restarted_since_the_push(group, pushed_model,
                                                                       ray_local):
    """A restarted worker scores with its start-up weights: that is a restart to handle,
    not a failed weight sync."""
    ray = ray_local
    assert group.policy_version == 1
    out = group.generate(prompts(2), SamplingParams(n=2, max_new_tokens=5, seed=4))
    handled = group.restarts_handled
    ray.kill(group.workers[1], no_restart=False)
    deadline = time.monotonic() + 60  # the kill lands asynchronously: wait until it is back,
    while group._wait_alive(group.workers[1]) != 0:  # answering with its start-up weights
        assert time.monotonic() < deadline
        time.sleep(0.2)
    worst = group.verify_sync(lambda ss: [naive_logprobs(pushed_model, s) for s in ss],
                              out, atol=ATOL)
    assert worst <= ATOL and group.restarts_handled == handled + 1


@pytest.mark.slow
def test_workers_draw_different_random_numbers_for_the_same_prompt(group):
    """The same question on two workers, one seed for the call: two different groups."""
    twins = [Sample(uid=f"t{i}", group_id=f"t{i}", messages=prompts(1)[0].messages)
             for i in range(2)]
    out = group.generate(twins, SamplingParams(n=2, max_new_tokens=8, seed=5))
    assert [s.uid for s in out] == ["t0/0", "t0/1", "t1/0", "t1/1"]
    assert out[0].completion_ids != out[2].completion_ids


@pytest.mark.slow
def test_a_worker_that_cannot_start_leaves_no_actor_behind(ray_local, tiny_qwen2):
    """Worker 0 starts, worker 1 cannot be placed: worker 0 must not keep its bundle."""
    from ray.util.placement_group import placement_group, remove_placement_group

    from medrl.rollouts.worker import RolloutGroup

    ray = ray_local
    pg = placement_group([{"CPU": 0.5}])
    ray.get(pg.ready())
    slot = f"CPU_group_0_{pg.id.hex()}"

    def bundle_free() -> bool:  # Ray's resource view lags: poll
        deadline = time.monotonic() + 30
        while ray.available_resources().get(slot) != 0.5 and time.monotonic() < deadline:
            time.sleep(0.5)
        return ray.available_resources().get(slot) == 0.5

    try:
        assert bundle_free()
        with pytest.raises(ValueError, match="bundle index") as failure:
            RolloutGroup(2, "hf", str(tiny_qwen2), {"seed": 0}, num_cpus_per_worker=0.5,
                         placement_group=pg, bundle_indices=[0, 5])
        # While the error is held (a CLI reporting it, a notebook's last traceback), its
        # frames keep the half-built group alive: its workers must be ended already.
        assert failure.tb is not None and bundle_free()
    finally:
        remove_placement_group(pg)
