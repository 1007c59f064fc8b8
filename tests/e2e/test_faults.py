"""Lost workers and a lost learner, in a real local Ray cluster: the driver loop in-process,
the actors killed by a per-step callback."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

TINY = ["rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=8",
        "learner.micro_batch_size=8", "learner.zero_stage=0", "logging.progress=false",
        "logging.tensorboard=false", "cluster.max_restarts=2"]


def make_run(tmp_path: Path, name: str, overrides: list[str]):
    from medrl.launch.recipe import load_recipe
    from medrl.launch.rundir import absolute_recipe, create_run_dir

    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml",
                         [f"run.name={name}", f"run.output_dir={tmp_path}", *TINY, *overrides])
    recipe = absolute_recipe(recipe, REPO / "recipes")
    return recipe, create_run_dir(recipe)


def expected_prompts(recipe, steps: int) -> list[list[str]]:
    """What an undisturbed stream hands out: P prompts per step, in order."""
    from medrl.launch.stream import PromptStream

    stream = PromptStream.from_recipe(recipe.data, seed=recipe.run.seed)
    stream.load_media = False
    return [sorted(s.uid for s in stream.take(recipe.rollout.prompts_per_step))
            for _ in range(steps)]


def logged_prompts(run_dir: Path) -> list[list[str]]:
    rows = [json.loads(x) for x in (run_dir / "prompts.jsonl").read_text().splitlines()]
    return [r["uids"] for r in rows]


def test_a_killed_rollout_worker_is_restarted_and_no_prompt_is_lost(ray_local, tmp_path):
    import ray

    from medrl.launch.driver import train

    # colocated placement and a sync check every step ride along on this run
    recipe, run_dir = make_run(tmp_path, "rollout-kill", ["run.max_steps=3", "cluster.colocate=true",
                                                          "rollout.verify_sync_every=1"])
    seen = {}

    def kill_after_first_step(step, c):
        if step == 1:
            ray.kill(c.rollouts.workers[0], no_restart=False)
        seen["restarts"] = c.rollouts.restarts_handled

    train(recipe, run_dir, callbacks=[kill_after_first_step])
    assert seen["restarts"] >= 1  # the batch of step 2 was retried on the restarted worker
    assert logged_prompts(run_dir) == expected_prompts(recipe, 3)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # the engine's log-probs equal the learner's after every sync, restart included
    assert all(r["sync/max_abs_diff"] < 2e-4 for r in rows)


def test_a_killed_reward_actor_is_restarted_and_its_batch_retried(ray_local, tmp_path):
    import ray

    from medrl.launch.driver import train

    plugin = f"{HERE / 'actor_plugin.py'}:AnswerLength"
    recipe, run_dir = make_run(tmp_path, "reward-kill", [
        "run.max_steps=3", f"rewards.functions=[{{name: '{plugin}', actor: true}}]",
        "logging.log_completions=true"])
    killed = []

    def kill_reward_actor(step, c):
        if step == 1:
            (handle,) = c.rewards.actors().values()
            ray.kill(handle, no_restart=False)
            killed.append(step)

    train(recipe, run_dir, callbacks=[kill_reward_actor])
    assert killed == [1]
    assert logged_prompts(run_dir) == expected_prompts(recipe, 3)
    rows = [json.loads(x) for x in (run_dir / "completions.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rows} == {1, 2, 3} and all(r["reward"] is not None for r in rows)


def test_a_learner_failure_stops_cleanly_and_the_run_resumes(ray_local, tmp_path):
    import ray

    from medrl.align.checkpoint import latest_checkpoint
    from medrl.launch.driver import RunFailed, train

    recipe, run_dir = make_run(tmp_path, "learner-kill", ["run.max_steps=4", "checkpoint.every=2"])

    def kill_learner(step, c):
        if step == 2:
            ray.kill(c.learner.workers[0], no_restart=True)

    with pytest.raises(RunFailed) as err:
        train(recipe, run_dir, callbacks=[kill_learner])
    assert "learner failed at step 3" in str(err.value)
    assert "step-000002" in str(err.value) and "medrl resume" in str(err.value)

    ckpt = latest_checkpoint(run_dir)
    assert ckpt.name == "step-000002"
    train(recipe, run_dir, resume_from=ckpt)
    assert logged_prompts(run_dir) == expected_prompts(recipe, 4)


def test_a_rollout_worker_gone_for_good_stops_cleanly(ray_local, tmp_path):
    """A worker that cannot come back (past its restarts) is not retried for minutes: the run
    stops at once with the checkpoint to resume from, not with a traceback."""
    import ray

    from medrl.launch.driver import RunFailed, train

    recipe, run_dir = make_run(tmp_path, "rollout-gone", ["run.max_steps=3", "checkpoint.every=1"])

    def kill_for_good(step, c):
        if step == 1:
            ray.kill(c.rollouts.workers[0], no_restart=True)

    with pytest.raises(RunFailed) as err:
        train(recipe, run_dir, callbacks=[kill_for_good])
    assert "a rollout worker failed at step 2: WorkerLost" in str(err.value)
    assert "step-000001" in str(err.value) and "medrl resume" in str(err.value)


def test_one_step_off_policy_mode_overlaps_and_bounds_staleness(ray_local, tmp_path):
    from medrl.launch.driver import train

    recipe, run_dir = make_run(tmp_path, "async", ["run.max_steps=4", "algorithm.async=true",
                                                   "logging.log_completions=true"])
    train(recipe, run_dir)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["async/staleness"] for r in rows] == [0.0, 1.0, 1.0, 1.0]
    versions = {}
    for r in (json.loads(x) for x in (run_dir / "completions.jsonl").read_text().splitlines()):
        versions.setdefault(r["step"], set()).add(r["policy_version"])
    # step k trains on samples from policy k-2 (k-1 updates done; one step behind)
    assert versions == {1: {0}, 2: {0}, 3: {1}, 4: {2}}
    assert logged_prompts(run_dir) == expected_prompts(recipe, 4)


def test_when_one_group_fails_to_start_the_one_that_started_is_shut_down(ray_local, tmp_path):
    """The learner ranks and the rollout workers start side by side: a learner that cannot be
    built stops the start with its own error, and the rollout worker already up is killed, not
    left holding its CPUs."""
    from concurrent.futures import ThreadPoolExecutor

    import ray

    from medrl.launch.cluster import started
    from medrl.launch.driver import engine_kwargs, policy_folder
    from medrl.launch.learner_group import LearnerGroup
    from medrl.rollouts.worker import RolloutGroup

    recipe, run_dir = make_run(tmp_path, "start-fails", [])
    policy = policy_folder(recipe, run_dir)
    handles = []

    def rollout_group():
        group = RolloutGroup(1, "hf", str(policy), engine_kwargs(recipe, policy))
        handles.extend(group.workers)
        return group

    with ThreadPoolExecutor(2) as pool:
        rollouts = pool.submit(rollout_group)
        rollouts.result()  # up before the learner's start fails
        learner = pool.submit(LearnerGroup, 1, policy, {"no_such_setting": 1})
        with pytest.raises(Exception, match="no_such_setting"):
            started(learner, rollouts)
    assert len(handles) == 1
    deadline = time.monotonic() + 60  # ray.kill is asynchronous: a call just after may run
    while True:
        try:
            ray.get(handles[0].ready.remote(), timeout=30)
        except ray.exceptions.RayActorError:
            break
        assert time.monotonic() < deadline, "the rollout worker outlived the failed start"
        time.sleep(0.2)
