"""A GRPO run over two Ray nodes, and the loss of one of them mid-run.

Two nodes on this machine (``ray.cluster_utils.Cluster``), each with one ``learner_slot`` and
one ``rollout_slot``: a recipe that asks every learner rank and every rollout worker for one
slot (``cluster.learner_resources`` / ``rollout_resources``) puts one of each on each node.
The cluster and the run live in a subprocess of their own (this file run as a script), so
the test works alone and beside the session's in-process Ray cluster alike.

The fault: after step 1 (checkpointed) node b is removed and a fresh node c with the same
slots joins, as when a machine is replaced. The rollout worker of node b is restarted on c
like any lost worker, but the learner rank of node b cannot be replaced inside a DeepSpeed
group: the run stops with ``RunFailed`` naming the step-1 checkpoint, and resuming from it
finishes the run on nodes a and c.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SLOTS = {"learner_slot": 1, "rollout_slot": 1}
OVERRIDES = [
    "run.max_steps=2", "checkpoint.every=1", "learner.num_workers=2", "learner.zero_stage=2",
    "rollout.num_workers=2", "rollout.prompts_per_step=2", "rollout.group_size=4",
    "rollout.max_new_tokens=8", "learner.micro_batch_size=4", "learner.lr_schedule=constant",
    "learner.lr=1e-3", "logging.progress=false", "logging.tensorboard=false",
    "logging.plots=false", "cluster.learner_resources={learner_slot: 1}",
    "cluster.rollout_resources={rollout_slot: 1}", "cluster.max_restarts=2",
]


# ----------------------------------------------------------------------------- the subprocess


def _node_id(actor_instance) -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def placement_of(c) -> dict[str, list[str]]:
    """The Ray node id of every learner rank and rollout worker of a run's components."""
    import ray

    return {"learner": [node for node, _ in ray.get([w.node.remote() for w in c.learner.workers])],
            "rollout": ray.get([w.__ray_call__.remote(_node_id) for w in c.rollouts.workers])}


def scenario(out: Path) -> None:
    """Two nodes, a run that loses one after step 1, and its resume; results to ``out``."""
    from ray.cluster_utils import Cluster

    from medrl.align.checkpoint import latest_checkpoint
    from medrl.launch.driver import RunFailed, train
    from medrl.launch.recipe import load_recipe
    from medrl.launch.rundir import absolute_recipe, create_run_dir

    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 2, "resources": {"node_a": 1, **SLOTS}})
    node_b = cluster.add_node(num_cpus=2, resources={"node_b": 1, **SLOTS})
    result: dict = {"nodes": {"a": cluster.head_node.node_id, "b": node_b.node_id}}
    try:
        recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", [
            "run.name=multinode", f"run.output_dir={out.parent / 'runs'}",
            f"cluster.address={cluster.address}", *OVERRIDES])
        recipe = absolute_recipe(recipe, REPO / "recipes")
        run_dir = create_run_dir(recipe)
        seen = {}

        def lose_node_b(step, c):
            if step == 1:
                result["step1"] = placement_of(c)
                cluster.remove_node(node_b)
                result["nodes"]["c"] = cluster.add_node(
                    num_cpus=2, resources={"node_c": 1, **SLOTS}).node_id
            seen["rollouts"] = c.rollouts

        try:
            train(recipe, run_dir, callbacks=[lose_node_b])
            result["outcome"] = "finished"
        except RunFailed as exc:
            result["outcome"], result["message"] = "RunFailed", str(exc)
        result["rollout_restarts"] = seen["rollouts"].restarts_handled

        def record(step, c):
            result["resumed"] = placement_of(c)

        ckpt = latest_checkpoint(run_dir)
        result["resumed_from"] = ckpt.name
        train(recipe, run_dir, resume_from=ckpt, callbacks=[record])
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        result["steps"] = [r["step"] for r in rows]
    finally:
        out.write_text(json.dumps(result))
        import ray

        ray.shutdown()
        cluster.shutdown()


# ----------------------------------------------------------------------------- the tests


def test_placement_resources_are_custom_and_positive():
    from medrl.launch.cluster import resources_needed
    from medrl.launch.recipe import RecipeError, load_recipe

    quickstart = REPO / "recipes" / "quickstart.yaml"
    recipe = load_recipe(quickstart, ["cluster.learner_resources={learner_slot: 1}",
                                      "cluster.rollout_resources={rollout_slot: 0.5}"])
    assert recipe.cluster.learner_resources == {"learner_slot": 1.0}
    assert recipe.cluster.rollout_resources == {"rollout_slot": 0.5}
    recipe = load_recipe(quickstart, ["learner.num_workers=2", "rollout.num_workers=3",
                                      "cluster.learner_resources={slot: 1, big: 2}",
                                      "cluster.rollout_resources={slot: 0.5}"])
    assert resources_needed(recipe) == {"slot": 3.5, "big": 4.0}  # the embedded cluster's
    with pytest.raises(RecipeError, match="GPU is not a custom resource.*learner_gpus"):
        load_recipe(quickstart, ["cluster.learner_resources={GPU: 1}"])
    with pytest.raises(RecipeError, match="rollout_resources.slot: the amount must be > 0"):
        load_recipe(quickstart, ["cluster.rollout_resources={slot: 0}"])


@pytest.fixture(scope="module")
def two_node_run(tmp_path_factory, model_cache) -> dict:
    tmp = tmp_path_factory.mktemp("multinode")
    out = tmp / "result.json"
    env = dict(os.environ, MEDRL_CACHE=str(model_cache), RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")
    env.pop("RAY_ADDRESS", None)  # the subprocess's own cluster, not the session's
    proc = subprocess.run([sys.executable, __file__, str(out)], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=600)
    assert out.exists(), f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    result = json.loads(out.read_text())
    assert proc.returncode == 0, f"{result}\n{proc.stderr[-6000:]}"
    return result


@pytest.mark.slow
def test_learner_ranks_and_rollout_workers_spread_over_two_nodes(two_node_run):
    nodes, step1 = two_node_run["nodes"], two_node_run["step1"]
    assert nodes["a"] != nodes["b"]
    # one learner rank and one rollout worker on each node (they trained step 1 together)
    assert sorted(step1["learner"]) == sorted([nodes["a"], nodes["b"]])
    assert sorted(step1["rollout"]) == sorted([nodes["a"], nodes["b"]])


@pytest.mark.slow
def test_a_lost_node_stops_the_run_cleanly_and_it_resumes_on_the_new_node(two_node_run):
    run = two_node_run
    assert run["outcome"] == "RunFailed"
    assert "learner failed at step 2" in run["message"]
    assert "step-000001" in run["message"] and "medrl resume" in run["message"]
    # the rollout worker of the lost node came back on the new one before the learner failed
    assert run["rollout_restarts"] >= 1
    assert run["resumed_from"] == "step-000001"
    assert run["steps"] == [1, 2]
    nodes = run["nodes"]
    assert sorted(run["resumed"]["learner"]) == sorted([nodes["a"], nodes["c"]])
    assert sorted(run["resumed"]["rollout"]) == sorted([nodes["a"], nodes["c"]])


if __name__ == "__main__":
    scenario(Path(sys.argv[1]))
