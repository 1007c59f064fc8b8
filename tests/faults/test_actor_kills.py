"""Actors killed in the middle of a step's phases, in a real local Ray cluster (the driver
in-process, the kill wrapped around the real phase): a rollout worker while the learner
trains (the sync then meets a restarted worker) and right before the sync, and a learner
rank right before the sync. The run either finishes with every step's prompts exactly once
and the engines holding the learner's weights, or stops cleanly and resumes to the same
record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TINY = ["rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=8",
        "learner.micro_batch_size=8", "learner.zero_stage=0", "logging.progress=false",
        "logging.tensorboard=false", "logging.plots=false", "cluster.max_restarts=2",
        "rollout.verify_sync_every=1", "run.max_steps=3"]


def make_run(tmp_path: Path, name: str, *overrides: str):
    from medrl.launch.recipe import load_recipe
    from medrl.launch.rundir import absolute_recipe, create_run_dir

    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml",
                         [f"run.name={name}", f"run.output_dir={tmp_path}", *TINY, *overrides])
    recipe = absolute_recipe(recipe, REPO / "recipes")
    return recipe, create_run_dir(recipe)


def rows(run_dir: Path, name: str) -> list[dict]:
    return [json.loads(x) for x in (run_dir / name).read_text().splitlines() if x.strip()]


def expected_prompts(recipe, steps: int) -> list[list[str]]:
    from medrl.launch.stream import PromptStream

    stream = PromptStream.from_recipe(recipe.data, seed=recipe.run.seed)
    stream.load_media = False
    return [sorted(s.uid for s in stream.take(recipe.rollout.prompts_per_step))
            for _ in range(steps)]


def wrap(monkeypatch, owner, name: str, before):
    """``owner.name`` with ``before(*args, **kwargs)`` run first (the kill)."""
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        before(*args, **kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapped)


@pytest.mark.parametrize("phase", ["learn", "sync"])
def test_a_rollout_worker_killed_mid_step_is_restarted_and_the_step_completes(
        ray_local, tmp_path, monkeypatch, phase):
    import ray

    import medrl.launch.driver as driver
    from medrl.launch.learner_group import LearnerGroup

    recipe, run_dir = make_run(tmp_path, f"rollout-{phase}")
    seen: dict = {}

    def kill_rollout_worker(*args, **kwargs):
        c = seen["c"]
        if seen.get("step") == 2 and not seen.get("killed"):
            seen["killed"] = True
            ray.kill(c.rollouts.workers[0], no_restart=False)

    if phase == "learn":  # killed while the learner trains: the sync meets the new worker
        wrap(monkeypatch, LearnerGroup, "train_step", kill_rollout_worker)
    else:
        wrap(monkeypatch, driver, "push_weights", kill_rollout_worker)
    original = driver.generate_and_score

    def generate(recipe, c, step, *args, **kwargs):
        seen.update(c=c, step=step)
        return original(recipe, c, step, *args, **kwargs)

    monkeypatch.setattr(driver, "generate_and_score", generate)
    driver.train(recipe, run_dir)
    assert seen["killed"]
    assert [r["uids"] for r in rows(run_dir, "prompts.jsonl")] == expected_prompts(recipe, 3)
    metrics = rows(run_dir, "metrics.jsonl")
    assert [r["step"] for r in metrics] == [1, 2, 3]
    # after every sync, restart included, the engine's log-probs equal the learner's
    assert all(r["sync/max_abs_diff"] < 2e-4 for r in metrics)


def test_a_learner_rank_killed_before_the_sync_stops_cleanly_and_resumes(ray_local, tmp_path,
                                                                         monkeypatch):
    import ray

    import medrl.launch.driver as driver
    from medrl.align.checkpoint import latest_checkpoint

    recipe, run_dir = make_run(tmp_path, "learner-sync", "checkpoint.every=1")
    original = driver.push_weights

    def kill_then_push(learner, rollouts, *, version):
        if version == 2:
            ray.kill(learner.workers[0], no_restart=True)
        return original(learner, rollouts, version=version)

    monkeypatch.setattr(driver, "push_weights", kill_then_push)
    with pytest.raises(driver.RunFailed) as err:
        driver.train(recipe, run_dir)
    assert "the learner failed at step 2" in str(err.value)
    assert "step-000001" in str(err.value)
    monkeypatch.setattr(driver, "push_weights", original)
    driver.train(recipe, run_dir, resume_from=latest_checkpoint(run_dir))
    assert [r["uids"] for r in rows(run_dir, "prompts.jsonl")] == expected_prompts(recipe, 3)
    assert [r["step"] for r in rows(run_dir, "metrics.jsonl")] == [1, 2, 3]
