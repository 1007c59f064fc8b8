"""Med3D-R1 end to end: the shipped GRPO recipe in-process for one step on its bundled CT
volume, the three rewards (the consistency one through its judge actor) in metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "grpo_med3d_r1.yaml"
QUIET = ["logging.progress=false", "logging.tensorboard=false", "logging.plots=false"]


def test_the_recipe_trains_a_step_with_its_three_rewards(ray_local, tmp_path):
    from medrl.launch.driver import train
    from medrl.launch.recipe import load_recipe
    from medrl.launch.rundir import absolute_recipe, create_run_dir

    recipe = load_recipe(RECIPE, ["run.name=m3", f"run.output_dir={tmp_path}",
                                  "run.max_steps=1", "rollout.max_new_tokens=16", *QUIET])
    assert (recipe.rollout.group_size, recipe.rollout.temperature, recipe.algorithm.kl.coef,
            recipe.algorithm.clip_low, recipe.learner.lr) == (4, 0.9, 0.04, 0.2, 1e-6)
    recipe = absolute_recipe(recipe, REPO / "recipes")
    run_dir = create_run_dir(recipe)
    train(recipe, run_dir)

    [row] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert row["step"] == 1
    for name in ("med3d_format", "med3d_accuracy"):
        assert 0.0 <= row[f"rewards/{name}/mean"] <= 1.0
        assert row[f"rewards/{name}/errors"] == 0.0
    # the mean of 8 bin values (multiples of 0.2): a multiple of 0.025, from the judge actor
    mean = row["rewards/med3d_consistency/mean"]
    assert 0.0 <= mean <= 1.0 and abs(mean * 40 - round(mean * 40)) < 1e-6
    assert row["rewards/med3d_consistency/not_applicable"] == 0.0
    assert row["rewards/med3d_consistency/judge_pairs"] == 8.0
    assert (run_dir / "checkpoints" / "step-000001" / "COMPLETE").exists()
