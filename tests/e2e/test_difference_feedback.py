"""Difference Feedback end to end: the shipped recipe through the `medrl` CLI with the rule
repairer on two learner ranks, and repairs written by the policy's own engines through the
generate hook, resumed exactly."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "grpo_difference_feedback.yaml"
QUIET = ["logging.progress=false", "logging.tensorboard=false", "logging.plots=false"]


def rows_of(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text()
                                      .splitlines())}


def test_the_recipe_runs_through_the_cli_on_two_ranks(tmp_path):
    env = dict(os.environ, MEDRL_CACHE=str(tmp_path / "cache"),
               RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")
    proc = subprocess.run(
        [sys.executable, "-m", "medrl.launch.cli", "run", str(RECIPE), "run.name=df",
         f"run.output_dir={tmp_path / 'runs'}", "run.max_steps=2", "learner.num_workers=2",
         "learner.zero_stage=2", "learner.micro_batch_size=2", *QUIET],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    run_dir = tmp_path / "runs" / "df"
    assert (run_dir / "checkpoints" / "step-000002" / "COMPLETE").is_file()
    rows = rows_of(run_dir)
    assert sorted(rows) == [1, 2]
    for r in rows.values():
        assert math.isfinite(r["loss"])
        # a random tiny model fails (nearly) every item: each failure is repaired and marked
        assert r["rewards/difference_feedback/repaired"] == r["rewards/difference_feedback/failed"]
        assert r["rewards/difference_feedback/failed"] > 0
    assert sum(r.get("process/marked_samples", 0) for r in rows.values()) > 0
    assert sum(r.get("process/failed_group_samples", 0) for r in rows.values()) > 0


def policy_recipe(tmp_path: Path, name: str):
    from medrl.launch.recipe import load_recipe
    from medrl.launch.rundir import absolute_recipe, create_run_dir

    recipe = load_recipe(RECIPE, [
        f"run.name={name}", f"run.output_dir={tmp_path}", "run.max_steps=3",
        "rollout.max_new_tokens=12", "learner.num_workers=2", "learner.zero_stage=2",
        "learner.micro_batch_size=4", "checkpoint.every=1", "checkpoint.keep_last=null",
        "rewards.functions.0.kwargs.repairer=policy",
        "rewards.functions.0.kwargs.max_new_tokens=12",
        "rewards.functions.0.kwargs.temperature=1.0", *QUIET])
    recipe = absolute_recipe(recipe, REPO / "recipes")
    return recipe, create_run_dir(recipe)


def test_policy_repairs_come_from_the_engines_and_resume_exactly(ray_local, tmp_path):
    from medrl.launch.driver import train

    recipe, run_dir = policy_recipe(tmp_path, "policy")
    calls = []
    train(recipe, run_dir, callbacks=[lambda step, c: calls.append(c.rewards.ctx.generate.calls)])
    full = rows_of(run_dir)
    assert calls == [1, 2, 3]  # one batched repair call per step, through the rollout workers
    assert all(full[s]["rewards/difference_feedback/repaired"] > 0 for s in full)

    # the same run, resumed from its step-1 checkpoint: steps 2 and 3 again, the same repairs
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed_dir)
    for step in (2, 3):
        shutil.rmtree(resumed_dir / "checkpoints" / f"step-00000{step}")
    train(recipe, resumed_dir, resume_from=resumed_dir / "checkpoints" / "step-000001")
    again = rows_of(resumed_dir)
    for step in (2, 3):
        for key in ("loss", "reward/mean", "rewards/difference_feedback/marked_token_share",
                    "process/marked_token_share", "advantage/abs_mean"):
            assert again[step][key] == full[step][key], (step, key)
