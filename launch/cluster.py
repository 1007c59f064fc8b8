"""Ray: an embedded local cluster by default, or an existing one at ``cluster.address``.

The embedded cluster listens on loopback only and starts no dashboard unless the recipe asks
for one (``cluster.include_dashboard``, bound to ``cluster.dashboard_host``, 127.0.0.1 by
default). Ray's CPU count is a scheduling resource, not a thread count: the embedded cluster
gets at least as many logical CPUs as the recipe's actors ask for, so a 2-core laptop can run
one rollout worker, one learner and a reward actor side by side.
"""

from __future__ import annotations

import os

from medrl.launch.recipe import Recipe

# Environment every actor needs: DeepSpeed on CPU picks its CPU accelerator, vLLM runs its
# engine in the actor's own process (its multiprocessing mode ignores Ray's CPU allocation),
# no hub access, zero-copy tensors through the object store for weight sync.
ACTOR_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1",
}


# Set by Ray's job manager in the environment of a submitted job's entrypoint.
IN_RAY_JOB = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def cpus_needed(recipe: Recipe) -> float:
    """Logical CPUs the recipe's actors reserve."""
    c = recipe.cluster
    rewards = sum(r.num_cpus for r in recipe.rewards.functions if r.actor)
    return (recipe.rollout.num_workers * c.rollout_cpus
            + recipe.learner.num_workers * c.learner_cpus + rewards)


def start_ray(recipe: Recipe) -> None:
    """Join ``cluster.address`` or start an embedded loopback-only cluster."""
    import ray

    if ray.is_initialized():
        return
    env = dict(ACTOR_ENV)
    if not _has_cuda():
        env["DS_ACCELERATOR"] = "cpu"
    runtime_env = {"env_vars": env}
    c = recipe.cluster
    # `medrl submit` runs `medrl run` as a Ray job: the job's driver joins the job's cluster
    # (Ray merges these env_vars into the job's runtime_env, working_dir included).
    address = c.address or ("auto" if IN_RAY_JOB in os.environ else None)
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        return
    num_cpus = c.num_cpus or max(os.cpu_count() or 1, int(cpus_needed(recipe) + 0.999))
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=c.include_dashboard,
        dashboard_host=c.dashboard_host,
        runtime_env=runtime_env,
        log_to_driver=True,
        _node_ip_address="127.0.0.1",
    )


def placement(recipe: Recipe):
    """Where the rollout workers and learner ranks go.

    ``cluster.colocate: false`` (default): no placement group; Ray spreads the actors by
    their CPU/GPU requests. ``true``: one STRICT_PACK placement group, one bundle per rollout
    worker then one per learner rank, so they share a node (and, with fractional
    ``rollout_gpus`` / ``learner_gpus`` such as 0.5 each, the same GPUs). Returns
    ``(placement_group, rollout_bundles, learner_bundles)`` or ``(None, None, None)``.
    """
    import ray
    from ray.util.placement_group import placement_group

    c = recipe.cluster
    if not c.colocate:
        return None, None, None
    rollout = [{"CPU": c.rollout_cpus, **({"GPU": c.rollout_gpus} if c.rollout_gpus else {})}
               for _ in range(recipe.rollout.num_workers)]
    learner = [{"CPU": c.learner_cpus, **({"GPU": c.learner_gpus} if c.learner_gpus else {})}
               for _ in range(recipe.learner.num_workers)]
    pg = placement_group(rollout + learner, strategy="STRICT_PACK")
    ray.get(pg.ready(), timeout=300)
    n = len(rollout)
    return pg, list(range(n)), list(range(n, n + len(learner)))


def stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
