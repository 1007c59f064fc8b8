"""GPU placement on a cluster, with Ray's fake GPUs (``ray.init(num_gpus=2)`` on this CPU
machine): Ray hands out GPU ids and sets ``CUDA_VISIBLE_DEVICES`` as on a real node, so
where each actor lands and what it decides from its own GPUs can be checked without one.

Each case runs in a fresh Python process with a cluster of its own (the session's cluster
has no GPUs). The driver of that process exports ``DS_ACCELERATOR=cpu``, as a head node
without GPUs would.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

PRELUDE = """
import json, os
os.environ["DS_ACCELERATOR"] = "cpu"  # what a driver on a head node without GPUs has
import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from medrl.launch.cluster import keep_loopback_node_ip
with keep_loopback_node_ip():
    ray.init(num_cpus=8, num_gpus=2, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")
"""


def run_on_fake_gpus(body: str) -> dict:
    """Run PRELUDE + ``body`` in a fresh process; ``body`` prints one JSON line last."""
    done = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_each_learner_rank_picks_its_accelerator_from_its_own_gpus():
    out = run_on_fake_gpus("""
        from medrl.launch.learner_group import LearnerWorker
        rank = ray.remote(LearnerWorker)
        on_gpu = rank.options(num_cpus=1, num_gpus=1).remote(0, 2, "unused", {})
        on_cpu = rank.options(num_cpus=1, num_gpus=0).remote(1, 2, "unused", {})
        print(json.dumps({"gpu": ray.get(on_gpu.accelerator.remote()),
                          "cpu": ray.get(on_cpu.accelerator.remote())}))
    """)
    # A GPU rank trains on CUDA over NCCL whatever the driver had; a rank without GPUs on
    # a GPU node stays on the CPU over gloo.
    assert out["gpu"] == {"accelerator": "cuda", "backend": "nccl"}
    assert out["cpu"] == {"accelerator": "cpu", "backend": "gloo"}


def test_colocated_pairs_share_a_gpu_and_learner_ranks_never_do():
    out = run_on_fake_gpus(f"""
        from medrl.launch.cluster import placement
        from medrl.launch.recipe import load_recipe

        recipe = load_recipe({str(REPO / "recipes" / "quickstart.yaml")!r}, [
            "cluster.colocate=true", "rollout.num_workers=2", "learner.num_workers=2",
            "cluster.rollout_gpus=0.5", "cluster.learner_gpus=0.5",
            "cluster.rollout_cpus=1", "cluster.learner_cpus=1"])
        pg, rollout_bundles, learner_bundles = placement(recipe)

        @ray.remote
        class Probe:
            def gpus(self):
                return [str(g) for g in ray.get_gpu_ids()]

        def probes(bundles):
            return [Probe.options(num_cpus=1, num_gpus=0.5,
                                  scheduling_strategy=PlacementGroupSchedulingStrategy(
                                      placement_group=pg, placement_group_bundle_index=b)
                                  ).remote() for b in bundles]

        # Started as the groups start them: workers first, then ranks, by bundle index.
        workers, ranks = probes(rollout_bundles), probes(learner_bundles)
        print(json.dumps({{"workers": ray.get([p.gpus.remote() for p in workers]),
                          "ranks": ray.get([p.gpus.remote() for p in ranks])}}))
    """)
    workers, ranks = out["workers"], out["ranks"]
    assert all(len(g) == 1 for g in workers + ranks)
    assert ranks[0] != ranks[1]  # NCCL refuses two ranks on one GPU
    assert workers == ranks  # worker i and rank i share a GPU


def test_a_reward_model_goes_where_its_own_reservation_is(tmp_path):
    plugin = tmp_path / "where.py"
    plugin.write_text(textwrap.dedent("""
        import os
        from medrl.rewards import RewardResult, reward

        @reward("where_am_i")
        class WhereAmI:
            def setup(self, ctx):
                self.device = ctx.device
                self.visible = os.environ.get("CUDA_VISIBLE_DEVICES")

            def __call__(self, samples):
                return [RewardResult(0.0, info={"device": self.device,
                                                "visible": self.visible})
                        for _ in samples]
    """))
    out = run_on_fake_gpus(f"""
        from medrl.align.records import Sample
        from medrl.rewards import RewardRunner

        functions = [
            {{"name": {str(plugin) + ":WhereAmI"!r}, "alias": "reserved", "actor": True,
              "num_gpus": 1, "num_cpus": 1}},
            {{"name": {str(plugin) + ":WhereAmI"!r}, "alias": "cpu_actor", "actor": True,
              "num_cpus": 1}},
            {{"name": {str(plugin) + ":WhereAmI"!r}, "alias": "in_driver"}},
        ]
        runner = RewardRunner.from_config({{"functions": functions}})
        sample = Sample(uid="a/0", group_id="a", completion_text="x")
        runner.score([sample])
        print(json.dumps(sample.reward_info))
    """)
    assert out["reserved"]["device"] == "cuda" and out["reserved"]["visible"] not in (None, "")
    assert out["cpu_actor"]["device"] == "cpu"
    assert out["in_driver"]["device"] == "cpu"
