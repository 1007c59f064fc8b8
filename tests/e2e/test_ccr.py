"""CCR end to end through the CLI: the shipped recipe on the tiny VLM, its counterfactual
reward in its own actor scoring masked copies through the policy log-prob hook of two learner
ranks (the copies' images reach the learner: the log-prob drop is not zero)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_the_ccr_recipe_runs_with_the_reward_in_an_actor_and_two_learner_ranks(tmp_path):
    env = dict(os.environ, MEDRL_CACHE=str(tmp_path / "cache"), RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")
    proc = subprocess.run(
        [sys.executable, "-m", "medrl.launch.cli", "run", str(REPO / "recipes" / "grpo_ccr.yaml"),
         "run.name=ccr", f"run.output_dir={tmp_path / 'runs'}", "run.max_steps=2",
         "learner.num_workers=2", "rewards.functions.1.actor=true",
         "rewards.functions.1.kwargs.control=true", "logging.progress=false",
         "logging.tensorboard=false", "logging.plots=false"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    run_dir = tmp_path / "runs" / "ccr"
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    scored = [r for r in rows if r["rewards/ccr/not_applicable"] < r["samples/count"]]
    assert scored, "no step drew a row with a region"
    for r in scored:
        # masked images reached the learner: a random model's log-probs move when they change
        assert r["rewards/ccr/raw_mean"] != 0.0
        assert abs(r["rewards/ccr/mean"]) <= 5.0
        assert 0.0 < r["rewards/ccr/region_area_share"] < 1.0
        assert "rewards/ccr/control_gap" in r
    assert (run_dir / "checkpoints" / "step-000002" / "COMPLETE").is_file()
