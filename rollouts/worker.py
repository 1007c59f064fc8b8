"""Rollout engines as Ray actors, and a group of them that behaves like one engine.

:class:`RolloutWorker` is a plain class (it works without Ray) holding one engine;
:class:`RolloutGroup` turns it into actors with ``ray.remote`` at call time and:

- spreads prompts over the workers, each prompt's whole GRPO group on one worker;
- pushes weights through the Ray object store: the caller ``ray.put``s each bucket (or, when
  the engines serve LoRA adapters, the adapter alone) and passes the refs; the refs travel
  wrapped in a list so Ray hands them to the worker unresolved, and each worker fetches them
  itself;
- survives a worker restart: Ray restarts a dead actor (``max_restarts``) with its start-up
  weights, so the group remembers the refs of the last push, re-pushes them to a worker that
  came back, and retries that worker's batch once. A result tagged with an older policy
  version than the group's (a worker that restarted between calls) is treated the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from medrl.align.records import Sample, UserError
from medrl.rollouts.engine import RolloutEngine, SamplingParams, WeightSyncError, verify_sync
from medrl.rollouts.vllm_engine import VLLM_LORA_RANKS  # a constant: vLLM is imported lazily

LoraSync = Literal["auto", "adapter", "merged"]


def lora_sync_mode(requested: LoraSync, *, backend: str, lora_rank: int | None,
                   vision: bool, on_gpu: bool) -> tuple[Literal["adapter", "merged"], str | None]:
    """How a run's weight pushes reach the engines (``rollout.lora_sync``), decided once.

    ``lora_rank``: ``learner.lora.r`` (None without LoRA); ``vision``: the policy is a
    vision-language model; ``on_gpu``: the rollout workers have GPUs. "adapter": the engines
    serve the base model with LoRA and each push is the adapter alone; "merged": each push
    is the full weights with the adapters merged. "auto" is "adapter" where it can be used
    (vLLM, a text model, rank <= 512) and pays: on GPUs. On CPUs vLLM's LoRA kernels make
    every generate call over twice as slow, far more than a merged push costs
    (BENCHMARKS.md, section 1b), so there "auto" is "merged" and "adapter" must be asked for.
    Returns ``(mode, note)``: the note says why "auto" chose "merged" for a LoRA policy.
    Raises :class:`UserError` when "adapter" is asked for where it cannot be used.
    """
    if lora_rank is None:
        if requested == "adapter":
            raise UserError("rollout.lora_sync: adapter pushes LoRA adapters to the engines, "
                            "but the learner has none (learner.lora is unset); set "
                            "learner.lora, or rollout.lora_sync: auto.")
        return "merged", None  # no adapters: the full weights are the policy
    if requested == "merged":
        return "merged", None
    reasons = []
    if backend != "vllm":
        reasons.append(f"the {backend} engine loads full weights only")
    if vision:
        reasons.append("adapters are served for text models only (a vision-language "
                       "model's adapters are not checked against vLLM's vision layers)")
    if lora_rank > VLLM_LORA_RANKS[-1]:
        reasons.append(f"vLLM serves adapters up to rank {VLLM_LORA_RANKS[-1]} and "
                       f"learner.lora.r is {lora_rank}")
    if not reasons and (on_gpu or requested == "adapter"):
        return "adapter", None
    if not reasons:  # auto on CPU engines
        return "merged", ("rollout.lora_sync: auto pushes full weights with the LoRA adapters "
                          "merged, since the rollout workers have no GPU (cluster.rollout_gpus: "
                          "0) and vLLM's CPU LoRA kernels slow generation more than an "
                          "adapter-only push saves; set rollout.lora_sync: adapter to push "
                          "adapters anyway.")
    if requested == "adapter":
        raise UserError(f"rollout.lora_sync: adapter cannot be used here: {'; '.join(reasons)}. "
                        "Set rollout.lora_sync: merged (or auto) to push full weights with the "
                        "adapters merged.")
    return "merged", (f"rollout.lora_sync: auto pushes full weights with the LoRA adapters "
                      f"merged, since {'; '.join(reasons)}.")


def create_engine(backend: str, model_dir: str, **engine_kwargs: Any) -> RolloutEngine:
    """The engine for ``rollout.backend``: "hf" (:class:`~medrl.rollouts.hf_engine.HFEngine`)
    or "vllm" (:class:`~medrl.rollouts.vllm_engine.VLLMEngine`)."""
    if backend == "hf":
        from medrl.rollouts.hf_engine import HFEngine

        engine_kwargs.pop("kv_cache_memory_bytes", None)  # vLLM-only settings
        engine_kwargs.pop("enforce_eager", None)
        if engine_kwargs.pop("lora_rank", None) is not None:
            raise UserError("rollout.backend: hf loads full weights only; LoRA adapters are "
                            "served by vLLM (rollout.lora_sync: merged for the hf engine).")
        return HFEngine(model_dir, **engine_kwargs)
    if backend == "vllm":
        from medrl.rollouts.vllm_engine import VLLMEngine

        engine_kwargs.pop("attn_implementation", None)  # vLLM picks its attention backend
        return VLLMEngine(model_dir, **engine_kwargs)
    raise UserError(f"rollout.backend: unknown backend {backend!r}; choose 'hf' or 'vllm'.")


class WorkerLost(RuntimeError):
    """A rollout worker died and did not come back (no node left for it, or past
    ``max_restarts``); the run cannot go on without it."""


class RolloutWorker:
    """One rollout engine; the body of a Ray actor (methods are called as ``.remote``)."""

    def __init__(self, backend: str, model_dir: str, engine_kwargs: dict[str, Any]):
        self.engine = create_engine(backend, model_dir, **dict(engine_kwargs))

    def ready(self) -> int:
        """The engine's policy version (a cheap liveness probe)."""
        return self.engine.policy_version

    def generate(self, prompts: list[Sample], sampling: SamplingParams) -> list[Sample]:
        return self.engine.generate(prompts, sampling)

    def update_weights(self, bucket_refs: list[Any], version: int) -> int:
        """Fetch each bucket (a list of ``(name, tensor)``) from the object store and load it.

        ``bucket_refs`` are ``ObjectRef``s (or, without Ray, the buckets themselves).
        Returns the new policy version.
        """
        import ray

        for i, ref in enumerate(bucket_refs):
            bucket = ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref
            self.engine.update_weights(bucket, version, last_bucket=i == len(bucket_refs) - 1)
        return self.engine.policy_version

    def serves_adapters(self) -> bool:
        """Whether the engine takes LoRA adapters (:meth:`update_adapter`) instead of full
        weights (engines without the attribute take full weights)."""
        return bool(getattr(self.engine, "serves_adapters", False))

    def update_adapter(self, adapter_ref: list[Any], version: int) -> int:
        """Fetch a LoRA adapter ``(tensors, config)`` (``Learner.adapter_for_sync``) from the
        object store and serve it. ``adapter_ref``: one ``ObjectRef`` in a list (or, without
        Ray, the adapter itself). Returns the new policy version."""
        import ray

        ref = adapter_ref[0]
        tensors, config = ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref
        self.engine.update_adapter(tensors, config, version)
        return self.engine.policy_version

    def score(self, samples: list[Sample]) -> tuple[int, list[list[float]]]:
        """``(policy version, log-probs)``: scores of a worker that restarted since the last
        push (start-up weights) must be told apart from a real sync failure."""
        return self.engine.policy_version, self.engine.score(samples)


def split_prompts(prompts: Sequence[Sample], parts: int) -> list[list[Sample]]:
    """Contiguous, near-equal chunks (the first ones one longer), one per part: empty ones when
    there are fewer prompts than parts."""
    size, extra = divmod(len(prompts), parts)
    chunks, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        chunks.append(list(prompts[start:end]))
        start = end
    return chunks


@dataclass(frozen=True)
class _Push:
    """One weight push, kept to re-push to a worker that restarted with its start-up weights.

    ``refs``: the refs of the full weights' buckets, or the one ref of a LoRA adapter."""

    refs: tuple[Any, ...]
    version: int
    adapter: bool

    def submit(self, worker) -> Any:
        if self.adapter:
            return worker.update_adapter.remote(list(self.refs), self.version)
        return worker.update_weights.remote(list(self.refs), self.version)


class RolloutGroup:
    """``num_workers`` rollout actors used as one engine.

    ``backend``: "hf" | "vllm"; ``engine_kwargs`` go to the engine constructor;
    ``num_cpus_per_worker``: the actor's Ray CPUs (and its OMP/torch threads unless
    ``engine_kwargs["num_threads"]`` says otherwise); ``max_restarts``: how often Ray may
    restart a dead worker; ``restart_timeout_s``: how long to wait for one to come back;
    ``resources``: custom Ray resources each worker asks for (it lands only on nodes that
    have them, a restarted one too).
    """

    def __init__(self, num_workers: int, backend: str, model_dir: str,
                 engine_kwargs: dict[str, Any] | None = None, *,
                 num_cpus_per_worker: float = 1, num_gpus_per_worker: float = 0,
                 max_restarts: int = 1, restart_timeout_s: float = 180.0,
                 placement_group=None, bundle_indices: Sequence[int] | None = None,
                 resources: dict[str, float] | None = None):
        import ray

        engine_kwargs = dict(engine_kwargs or {})
        threads = engine_kwargs.get("num_threads") or max(1, int(num_cpus_per_worker))
        engine_kwargs["num_threads"] = threads
        options: dict[str, Any] = dict(
            num_cpus=num_cpus_per_worker, num_gpus=num_gpus_per_worker,
            resources=dict(resources or {}), max_restarts=max_restarts,
            max_task_retries=0,  # retries are ours: weights must be re-pushed first
            runtime_env={"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                                      "OMP_NUM_THREADS": str(threads)}})
        self.workers = []
        try:  # a worker that cannot be placed or started ends the ones already running
            for i in range(num_workers):
                if placement_group is not None:  # one bundle per worker (see launch.cluster)
                    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

                    options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                        placement_group=placement_group,
                        placement_group_bundle_index=bundle_indices[i] if bundle_indices else i)
                actor = ray.remote(RolloutWorker).options(**options)
                # Calls without a sampling seed draw from the engine's own: one per worker.
                kwargs = dict(engine_kwargs, seed=engine_kwargs.get("seed", 0) + 1_000_003 * i)
                self.workers.append(actor.remote(backend, str(model_dir), kwargs))
            ray.get([w.ready.remote() for w in self.workers])
            # The engines say what they take: a LoRA adapter, or full weights (all alike).
            self.serves_adapters = all(ray.get([w.serves_adapters.remote()
                                                for w in self.workers]))
        except BaseException:
            self.shutdown()
            raise
        self.restart_timeout_s = restart_timeout_s
        self.policy_version = 0
        self._last_push: _Push | None = None
        self.restarts_handled = 0

    # -- recovery -----------------------------------------------------------------------

    def _wait_alive(self, worker) -> int:
        """Block until a restarting worker answers; returns its policy version."""
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError

        deadline = time.monotonic() + self.restart_timeout_s
        while True:
            try:
                return ray.get(worker.ready.remote(), timeout=30)
            except ActorDiedError as err:  # past max_restarts (or killed for good): gone
                raise WorkerLost(f"rollout worker died and will not restart ({err}); raise "
                                 "cluster.max_restarts or check the worker's log for why it "
                                 "died") from err
            except (ActorUnavailableError, GetTimeoutError) as err:
                # Calls during a restart fail at once; a restart may wait for a node.
                if time.monotonic() > deadline:
                    raise WorkerLost(
                        f"rollout worker did not come back within {self.restart_timeout_s:.0f} "
                        f"s ({type(err).__name__}: {err}); raise cluster.max_restarts or check "
                        "the worker's log for why it died") from err
                time.sleep(1.0)

    def _catch_up(self, worker) -> None:
        """Re-push the last weights to a worker that (re)started with older ones."""
        import ray

        version = self._wait_alive(worker)
        if self._last_push is not None and version != self._last_push.version:
            ray.get(self._last_push.submit(worker))
        self.restarts_handled += 1

    def _call_all(self, submit: Callable[[Any, int], Any],
                  check: Callable[[Any], bool] = lambda result: True) -> list[Any]:
        """``submit(worker, i)`` on every worker in parallel; a worker whose call dies, or
        whose result fails ``check``, is caught up and retried once."""
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError

        pending = [submit(w, i) for i, w in enumerate(self.workers)]
        results = []
        for i, (worker, ref) in enumerate(zip(self.workers, pending)):
            try:
                result = ray.get(ref)
                stale = not check(result)
            except (ActorDiedError, ActorUnavailableError):
                stale = True  # died mid-call: Ray restarts it with its start-up weights
            if not stale:
                results.append(result)
                continue
            self._catch_up(worker)
            result = ray.get(submit(worker, i))
            if not check(result):
                raise WeightSyncError(f"rollout worker {i} still serves old weights after a "
                                      f"re-push (group version {self.policy_version})")
            results.append(result)
        return results

    # -- the engine-like API ------------------------------------------------------------

    def generate(self, prompts: list[Sample], sampling: SamplingParams) -> list[Sample]:
        """Prompts in, ``len(prompts) * sampling.n`` samples out, in prompt order."""
        chunks = split_prompts(prompts, len(self.workers))
        # Seeds follow each prompt's place in the whole batch, so two workers never draw the
        # same random numbers (vLLM seeds request k of a chunk with seed + k * n).
        starts = [sum(len(c) for c in chunks[:i]) for i in range(len(chunks))]
        # The version pushed before this call: a worker restarted with its start-up weights
        # is behind it. A push made while the batch is in flight (one-step off-policy mode)
        # lands after the batch on each worker, so the batch may carry this version exactly.
        expected = self.policy_version

        def submit(worker, i):
            seeded = (sampling if sampling.seed is None
                      else sampling.replace(seed=sampling.seed + starts[i] * sampling.n))
            return worker.generate.remote(chunks[i], seeded)

        def current(samples):
            return all(s.policy_version >= expected for s in samples)

        return [s for part in self._call_all(submit, current) for s in part]

    def update_weights_from_refs(self, bucket_refs: Sequence[Any], version: int) -> None:
        """Push weights that the caller put in the object store (one ref per bucket of
        ``(name, tensor)`` pairs) to every worker; remembered for re-pushes."""
        self._push(_Push(tuple(bucket_refs), version, adapter=False))

    def update_adapter_from_ref(self, adapter_ref: Any, version: int) -> None:
        """Push a LoRA adapter ``(tensors, config)`` that the caller put in the object store
        (``adapter_ref``, from ``Learner.adapter_for_sync``) to every worker; remembered for
        re-pushes. Only for a group whose engines serve adapters (:attr:`serves_adapters`)."""
        if not self.serves_adapters:
            raise WeightSyncError("this group's engines take full weights, not LoRA adapters; "
                                  "push with update_weights_from_refs.")
        self._push(_Push((adapter_ref,), version, adapter=True))

    def _push(self, push: _Push) -> None:
        self._last_push = push
        self.policy_version = push.version
        self._call_all(lambda worker, i: push.submit(worker),
                       lambda result: result == push.version)

    def update_weights_nccl(self, *args: Any, **kwargs: Any) -> None:
        """Seam for the GPU path: broadcast weights from learner rank 0 to the engines over
        an NCCL group (learner rank 0 + one rank per rollout GPU), bucket by bucket, each
        worker loading what it receives through the same engine ``update_weights``. Skips the
        object store's host copy; needs CUDA on both sides. Not implemented here: use
        :meth:`update_weights_from_refs`."""
        raise NotImplementedError("NCCL weight broadcast is not implemented; use "
                                  "update_weights_from_refs (the Ray object store path).")

    def score(self, samples: list[Sample]) -> list[list[float]]:
        """Temperature-1 log-probs of each sample's completion, the samples split between the
        workers (contiguous chunks), in order."""
        chunks = split_prompts(samples, len(self.workers))
        results = self._call_all(lambda worker, i: worker.score.remote(chunks[i]) if chunks[i]
                                 else worker.ready.remote())  # nothing to score: a no-op
        return [scores for chunk, result in zip(chunks, results) if chunk
                for scores in result[1]]

    def score_all(self, samples: list[Sample]) -> list[list[list[float]]]:
        """Every worker's temperature-1 log-probs of the samples' completions, each worker on
        the group's current weights (one that restarted since the push is caught up first)."""
        results = self._call_all(lambda worker, i: worker.score.remote(samples),
                                 lambda result: result[0] == self.policy_version)
        return [scores for _, scores in results]

    def verify_sync(self, reference_logprobs_fn: Callable[[Sequence[Sample]],
                                                          list[list[float]]],
                    samples: Sequence[Sample], atol: float) -> float:
        """:func:`medrl.rollouts.engine.verify_sync` against every worker; the worst diff."""
        samples = [s for s in samples if s.completion_ids]
        reference = reference_logprobs_fn(samples)
        worst = 0.0
        for scores in self.score_all(list(samples)):
            worst = max(worst, verify_sync(_Scored(scores, self.policy_version),
                                           lambda _: reference, samples, atol))
        return worst

    def shutdown(self) -> None:
        import ray

        for worker in self.workers:
            ray.kill(worker, no_restart=True)
        self.workers = []


class _Scored:
    """Scores already computed by a worker, seen through the engine interface."""

    def __init__(self, scores: list[list[float]], policy_version: int):
        self._scores, self.policy_version = scores, policy_version

    def score(self, samples):
        return self._scores
