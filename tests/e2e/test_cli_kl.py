"""KL-regularised GRPO through the real CLI: KL in the loss and in the reward, every
estimator, the reference beside the policy (auto) and on the CPU; 2 steps each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SMALL = [
    "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=8",
    "learner.micro_batch_size=8", "learner.lr_schedule=constant", "learner.lr=1e-2",
    "logging.progress=false", "logging.plots=false", "logging.tensorboard=false",
    "run.max_steps=2",
]


# Each place the KL is applied and each reference placement once, with the signed estimator
# (k1) and a positive one (k3); every estimator's values and gradients are checked against
# hand computations in tests/align/test_grpo.py. beta = 0.04 as published GRPO recipes use.
@pytest.mark.parametrize("where, estimator, ref_model", [
    ("loss", "k1", "cpu"), ("reward", "k3", "auto")])
def test_kl_run(tmp_path, where, estimator, ref_model):
    env = dict(os.environ, MEDRL_CACHE=str(tmp_path / "cache"), RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")
    recipe = REPO / "recipes" / "quickstart.yaml"
    args = [sys.executable, "-m", "medrl.launch.cli", "run", str(recipe),
            "run.name=kl", f"run.output_dir={tmp_path / 'runs'}", *SMALL,
            "algorithm.kl.coef=0.04", f"algorithm.kl.where={where}",
            f"algorithm.kl.estimator={estimator}", f"learner.ref_model={ref_model}",
            f"rewards.functions=[{{name: '{Path(__file__).parent / 'varied_reward.py'}:"
            "first_token_bucket'}]"]
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    rows = {r["step"]: r for r in map(json.loads,
                                       (tmp_path / "runs" / "kl" / "metrics.jsonl").read_text()
                                       .splitlines())}
    assert sorted(rows) == [1, 2]
    assert rows[1]["kl"] == pytest.approx(0.0, abs=1e-6)  # the reference is the start policy
    # After one update the policy has moved away from its reference. k1 is an unbiased but
    # signed estimate; k2 and k3 are positive per token.
    assert rows[2]["kl"] != 0.0 if estimator == "k1" else rows[2]["kl"] > 0.0
