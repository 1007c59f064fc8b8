"""MedCausalX end to end: the shipped GRPO recipe in-process, two steps, its special tokens in
the checkpoint's tokenizer, its reward terms logged, and a resume that reuses the prepared
policy and continues exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "grpo_medcausalx.yaml"
QUIET = ["logging.progress=false", "logging.tensorboard=false", "logging.plots=false"]


def rows_of(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text()
                                      .splitlines())}


def test_the_recipe_trains_with_its_tokens_and_resumes(ray_local, tmp_path):
    from transformers import AutoTokenizer

    from medrl.launch.driver import train
    from medrl.launch.recipe import load_recipe
    from medrl.launch.rundir import absolute_recipe, create_run_dir

    recipe = load_recipe(RECIPE, ["run.name=cx", f"run.output_dir={tmp_path}",
                                  "run.max_steps=2", "checkpoint.every=1",
                                  "checkpoint.keep_last=null", "rollout.max_new_tokens=16",
                                  *QUIET])
    recipe = absolute_recipe(recipe, REPO / "recipes")
    run_dir = create_run_dir(recipe)
    train(recipe, run_dir)

    policy = run_dir / "checkpoints" / "step-000002" / "policy"
    tok = AutoTokenizer.from_pretrained(policy)
    ids = [tok("<causal>", add_special_tokens=False)["input_ids"],
           tok("<verify>", add_special_tokens=False)["input_ids"]]
    assert ids == [[len(tok) - 2], [len(tok) - 1]]
    assert json.loads((policy / "config.json").read_text())["vocab_size"] == len(tok)
    rows = rows_of(run_dir)
    assert sorted(rows) == [1, 2]
    for r in rows.values():
        for name in ("causal_attribution", "reflection_format"):
            assert 0.0 <= r[f"rewards/{name}/mean"] <= 1.0
        assert "rewards/causal_consistency/not_applicable" in r
        # the random tiny model answers wrongly: its wrong answers are attributed and marked
        assert r["rewards/causal_attribution/failed"] > 0
        assert r["rewards/causal_attribution/attributed"] > 0
        assert r["process/marked_samples"] > 0

    # resumed from step 1: the prepared policy is reused as it is, step 2 comes out the same
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000002")
    prepared = resumed / "policy_init" / "model.safetensors"
    stamp = prepared.stat().st_mtime_ns
    train(recipe, resumed, resume_from=resumed / "checkpoints" / "step-000001")
    assert prepared.stat().st_mtime_ns == stamp
    again = rows_of(resumed)
    for key in ("loss", "reward/mean", "rewards/causal_attribution/marked_token_share"):
        assert again[2][key] == rows[2][key], key
