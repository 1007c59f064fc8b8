"""One-step off-policy mode with two learner ranks and a reward that calls the policy
log-prob hook from the background rollout thread while the loop trains on the same ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def async_recipe(tmp_path, name: str, *, hook_in_actor: bool = False, steps: int = 4):
    from medrl.launch.recipe import load_recipe
    from medrl.launch.rundir import absolute_recipe, create_run_dir

    plugin = HERE / "varied_reward.py"
    rewards = (f"rewards.functions=[{{name: '{plugin}:first_token_bucket'}}, "
               f"{{name: '{plugin}:MeanPolicyLogprob', weight: 0.1, "
               f"actor: {str(hook_in_actor).lower()}}}]")
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", [
        f"run.name={name}", f"run.output_dir={tmp_path}", f"run.max_steps={steps}",
        "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=8",
        "learner.num_workers=2", "learner.zero_stage=2", "learner.micro_batch_size=2",
        "learner.lr=1e-2", "learner.lr_schedule=constant", "algorithm.async=true",
        "algorithm.rollout_correction.mode=truncate", "logging.progress=false",
        "logging.tensorboard=false", "logging.plots=false", rewards])
    recipe = absolute_recipe(recipe, REPO / "recipes")
    return recipe, create_run_dir(recipe)


def test_async_with_two_ranks_and_a_policy_hook_reward(ray_local, tmp_path):
    from medrl.launch.driver import train

    recipe, run_dir = async_recipe(tmp_path, "async2")
    fingerprints = []

    def check_ranks(step, c):
        fingerprints.append(c.learner.fingerprints())

    train(recipe, run_dir, callbacks=[check_ranks])
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["async/staleness"] for r in rows] == [0.0, 1.0, 1.0, 1.0]
    for r in rows:
        assert "rollout_mismatch/logprob_abs_diff" in r and "rollout_mismatch/truncated_share" in r
    # Stale batches: the learner's old policy is one update ahead of the engine's.
    assert rows[0]["rollout_mismatch/logprob_abs_diff"] < 1e-3
    diff = [r["rollout_mismatch/logprob_abs_diff"] for r in rows]
    assert diff[2] > diff[0]
    # Both ranks still hold the same weights after every step: no collective met out of order.
    assert all(a == b for a, b in fingerprints) and len(fingerprints) == 4


def test_async_refuses_the_hook_from_a_reward_actor(ray_local, tmp_path):
    """A reward in its own process would reach the learner ranks unserialised."""
    from medrl.launch.driver import train
    from medrl.rewards import RewardError

    recipe, run_dir = async_recipe(tmp_path, "async-actor", hook_in_actor=True, steps=2)
    with pytest.raises(RewardError, match="actor: false"):
        train(recipe, run_dir)
