"""Ray: an embedded local cluster by default, or an existing one at ``cluster.address``.

The embedded cluster listens on loopback only: every Ray server (GCS, raylet, object manager,
core workers, dashboard agent, runtime-env agent, metrics) binds the node's IP address, and
that address is kept at 127.0.0.1. It starts no dashboard unless the recipe asks for one
(``cluster.include_dashboard``, bound to ``cluster.dashboard_host``, 127.0.0.1 by default; a
host other than loopback needs ``cluster.allow_remote: true``, since the Jobs API served there
runs any code it is sent). Ray's CPU count is a scheduling resource, not a thread count: the
embedded cluster gets at least as many logical CPUs as the recipe's actors ask for, so a
2-core laptop can run one rollout worker, one learner and a reward actor side by side.

On an existing cluster (``cluster.address``) ``cluster.learner_resources`` and
``cluster.rollout_resources`` place the actors: each learner rank / rollout worker asks for
those custom Ray resources, so it lands only on a node that has them. The embedded cluster
holds as many of them as the actors ask for, so such a recipe also runs on one machine.
"""

from __future__ import annotations

import collections
import ipaddress
import os
import warnings
from concurrent.futures import Future
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the recipe imports is_loopback from here
    from medrl.launch.recipe import ClusterConfig, Recipe

# Environment every actor needs (a learner rank adds its accelerator): vLLM runs its
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

LOOPBACK = "127.0.0.1"  # the embedded cluster's node address: every Ray server binds it


def cpus_needed(recipe: Recipe) -> float:
    """Logical CPUs the recipe's actors reserve (reward actors and judge actors included)."""
    from medrl.rewards.rubric import judge_cpus

    c = recipe.cluster
    rewards = sum(r.num_cpus for r in recipe.rewards.functions if r.actor)
    rewards += judge_cpus([r.model_dump() for r in recipe.rewards.functions])
    if recipe.evaluation is not None and recipe.evaluation.judge:  # its rubric grader's actor
        rewards += 1.0
    return (recipe.rollout.num_workers * c.rollout_cpus
            + recipe.learner.num_workers * c.learner_cpus + rewards)


def resources_needed(recipe: Recipe) -> dict[str, float]:
    """The custom Ray resources all the recipe's learner ranks and rollout workers ask for."""
    c = recipe.cluster
    total: dict[str, float] = {}
    for per_actor, count in ((c.learner_resources, recipe.learner.num_workers),
                             (c.rollout_resources, recipe.rollout.num_workers)):
        for name, amount in per_actor.items():
            total[name] = total.get(name, 0.0) + amount * count
    return total


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an IP address, ``[v6]`` or ``localhost``) names this machine only.

    Any other host name counts as remote: it may resolve to an outward interface.
    """
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return (mapped or ip).is_loopback


def dashboard_exposure(include_dashboard: bool, dashboard_host: str) -> str | None:
    """The warning for an embedded cluster's dashboard on a non-loopback host, else None.

    The recipe refuses such a host unless ``cluster.allow_remote`` is set (see
    ``ClusterConfig``); this is what a run that allows it says when it starts.
    """
    if not include_dashboard or is_loopback(dashboard_host):
        return None
    return (f"cluster.dashboard_host is {dashboard_host} (cluster.allow_remote: true): the "
            "Ray dashboard and its Jobs API, which runs any code it is sent, are reachable "
            "from other machines, guarded only by the cluster's token and sent over plain "
            "HTTP.")


def start_ray(recipe: Recipe) -> None:
    """Join ``cluster.address`` or start an embedded loopback-only cluster."""
    start_cluster(recipe.cluster, cpus=cpus_needed(recipe), resources=resources_needed(recipe))


def start_cluster(c: ClusterConfig, *, cpus: float, resources: dict[str, float]) -> None:
    """Join ``c.address`` or start an embedded loopback-only cluster with at least ``cpus``
    logical CPUs and the custom ``resources`` (no-op when Ray is already initialised)."""
    import ray

    if ray.is_initialized():
        return
    env = dict(ACTOR_ENV)  # each learner rank picks its accelerator itself (its own GPUs)
    runtime_env = {"env_vars": env}
    # `medrl submit` runs `medrl run` as a Ray job: the job's driver joins the job's cluster
    # (Ray merges these env_vars into the job's runtime_env, working_dir included).
    address = c.address or ("auto" if IN_RAY_JOB in os.environ else None)
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        return
    risk = dashboard_exposure(c.include_dashboard, c.dashboard_host)
    if risk:
        warnings.warn(risk, stacklevel=2)
    # The learners' collectives listen on the interface these name (gloo would take the one
    # the host name resolves to, NCCL the first outward one): loopback, like the rest.
    lo = _loopback_interface()
    for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        if lo and name not in os.environ:
            env[name] = lo
    num_cpus = c.num_cpus or max(os.cpu_count() or 1, int(cpus + 0.999))
    with keep_loopback_node_ip():
        ray.init(
            # a new cluster even when this machine runs one started by `ray start` (which a
            # bare ray.init() would join, refusing num_cpus): cluster.address joins one
            address="local",
            num_cpus=num_cpus,
            resources=resources,
            include_dashboard=c.include_dashboard,
            dashboard_host=c.dashboard_host if c.include_dashboard else LOOPBACK,
            runtime_env=runtime_env,
            log_to_driver=True,
            _node_ip_address=LOOPBACK,
        )
    node_ip = ray.util.get_node_ip_address()
    if not is_loopback(node_ip):
        warnings.warn(f"the embedded Ray cluster took the node address {node_ip} instead of "
                      f"{LOOPBACK}: its servers listen on that interface.", stacklevel=2)


@contextmanager
def keep_loopback_node_ip():
    """Let ``ray.init(_node_ip_address="127.0.0.1")`` keep the loopback address.

    Ray (2.60) replaces a loopback node address with the machine's outward one unless it
    believes it runs a single-machine session (its constant ``ENABLE_RAY_CLUSTER``, read from
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` when Ray is imported, so setting the variable now
    would be too late). Every Ray server binds the node address, so the outward address would
    expose them all. The switch is flipped only around the call that starts the node: the
    processes it starts receive the address on their command lines.
    """
    from ray._private import ray_constants

    saved = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if saved is None:
            del ray_constants.ENABLE_RAY_CLUSTER
        else:
            ray_constants.ENABLE_RAY_CLUSTER = saved


def placement(recipe: Recipe):
    """Where the rollout workers and learner ranks go.

    ``cluster.colocate: false`` (default): no placement group; Ray places the actors by
    their CPU/GPU requests and custom resources (``cluster.learner_resources`` /
    ``rollout_resources``). ``true``: one STRICT_PACK placement group with one bundle per
    rollout-worker / learner-rank pair (worker i and rank i share bundle i; the longer group's
    extra members get bundles of their own), so each pair shares a node and, with fractional
    ``rollout_gpus`` / ``learner_gpus`` such as 0.5 each, one GPU. One bundle per actor would
    let Ray pack two workers' halves onto one GPU and both ranks onto the other, where NCCL
    refuses ranks that share a GPU. Returns ``(placement_group, rollout_bundles,
    learner_bundles)`` or ``(None, None, None)``.
    """
    import ray
    from ray.util.placement_group import placement_group

    c = recipe.cluster
    if not c.colocate:
        return None, None, None
    rollout = {"CPU": c.rollout_cpus, "GPU": c.rollout_gpus, **c.rollout_resources}
    learner = {"CPU": c.learner_cpus, "GPU": c.learner_gpus, **c.learner_resources}
    n_rollout, n_learner = recipe.rollout.num_workers, recipe.learner.num_workers
    bundles = []
    for i in range(max(n_rollout, n_learner)):
        members = ([rollout] if i < n_rollout else []) + ([learner] if i < n_learner else [])
        bundle = collections.Counter()
        for member in members:
            bundle.update(member)
        bundles.append({k: v for k, v in bundle.items() if v})
    pg = placement_group(bundles, strategy="STRICT_PACK")
    ray.get(pg.ready(), timeout=300)
    return pg, list(range(n_rollout)), list(range(n_learner))


def _loopback_interface() -> str | None:
    """The name of the network interface that holds 127.0.0.1 (``lo`` on Linux)."""
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address == LOOPBACK for a in addresses):
            return name
    return None


def stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def started(*starts: Future) -> list:
    """The groups of actors that ``starts`` (futures of their constructors) made, in order;
    when one failed, the groups that did start are shut down and the first failure raised."""
    groups, failures = [], []
    for start in starts:
        try:
            groups.append(start.result())
        except BaseException as exc:  # noqa: BLE001 (raised below, after the clean-up)
            failures.append(exc)
    if failures:
        for group in groups:
            group.shutdown()
        raise failures[0]
    return groups
