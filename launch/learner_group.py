"""N learner ranks as Ray actors, driven as one learner.

Each actor wraps one :class:`medrl.align.learner.Learner` (one DeepSpeed rank). Every public
method of :class:`LearnerGroup` calls all ranks at once (the learner's methods are
collective: ZeRO reduces gradients and gathers weights across ranks) and returns one
answer. The global batch is split evenly by rank in order; the learner weights each rank's
micro-batches so that the update equals one pass over the whole batch on one rank.

Samples travel through the object store once: the group puts the list and hands every rank
the reference wrapped in a list, so Ray does not resolve it before the call and each rank
fetches it itself.
"""

from __future__ import annotations

import collections
import hashlib
import os
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

import ray

from medrl.align.records import Sample, UserError


def shard(samples: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """Rank ``rank``'s contiguous share of ``samples`` (sizes differ by at most one)."""
    n = len(samples)
    return list(samples[rank * n // world_size:(rank + 1) * n // world_size])


class LearnerWorker:
    """One learner rank (a Ray actor; construct through :class:`LearnerGroup`)."""

    def __init__(self, rank: int, world_size: int, model_dir: str,
                 learner_kwargs: dict[str, Any]):
        from medrl.align.distributed import pin_accelerator

        # From the GPUs Ray gave this actor, before DeepSpeed is imported in its process.
        pin_accelerator(bool(ray.get_gpu_ids()))
        self.rank, self.world_size = rank, world_size
        self.model_dir, self.learner_kwargs = model_dir, dict(learner_kwargs)
        self.learner = None
        # The collective calls this rank ran, in order: every rank's must be the same.
        self.history: collections.deque[str] = collections.deque(maxlen=1000)

    def call_history(self) -> list[str]:
        """The names of the collective calls this rank ran, oldest first (the last 1000)."""
        return list(self.history)

    def node(self) -> tuple[str, str]:
        """(Ray node id, node IP address) of this rank."""
        context = ray.get_runtime_context()
        return context.get_node_id(), ray.util.get_node_ip_address()

    def accelerator(self) -> dict[str, str]:
        """What this rank computes on: DeepSpeed's accelerator and the collectives' backend."""
        from medrl.align.distributed import process_group_backend

        return {"accelerator": os.environ["DS_ACCELERATOR"], "backend": process_group_backend()}

    def free_port(self) -> int:
        from medrl.align.distributed import free_port

        return free_port()

    def setup(self, master_addr: str, master_port: int) -> None:
        from medrl.align.distributed import init_distributed
        from medrl.align.learner import Learner

        init_distributed(self.rank, self.world_size, master_addr, master_port)
        self.learner = Learner(self.model_dir, **self.learner_kwargs)

    def _shard(self, samples_ref: list, unit: int = 1) -> list[Sample]:
        samples = ray.get(samples_ref[0])
        units = [samples[i:i + unit] for i in range(0, len(samples), unit)]
        return [s for u in shard(units, self.rank, self.world_size) for s in u]

    def train_step(self, samples_ref: list, ppo_epochs: int,
                   policy_version: int | None) -> dict[str, float]:
        self.history.append("train_step")
        batch = self.learner.collate(self._shard(samples_ref))
        return self.learner.train_step(batch, ppo_epochs=ppo_epochs,
                                       policy_version=policy_version)

    def logprobs(self, samples_ref: list, temperature: float | None = None,
                 reference: bool = False) -> list:
        self.history.append("logprobs")
        samples = self._shard(samples_ref)
        batch = self.learner.collate(samples)
        lp = (self.learner.ref_logprobs(batch) if reference
              else self.learner.logprobs(batch, temperature=temperature))
        if lp is None:
            raise UserError("reference log-probs were asked for but the learner has no "
                            "reference model; set learner.ref_model to cpu or auto.")
        return [lp[i, :len(s.completion_ids)].cpu() for i, s in enumerate(samples)]

    def train_step_with(self, samples_ref: list, loss_fn, size_fn, unit: int) -> dict[str, float]:
        self.history.append("train_step_with")
        batch = self.learner.collate(self._shard(samples_ref, unit))
        return self.learner.train_step_with(loss_fn, batch, size_fn=size_fn)

    def values(self, samples_ref: list, unit: int) -> list[float]:
        self.history.append("values")
        return self.learner.logprobs(self.learner.collate(self._shard(samples_ref, unit))).tolist()

    def sync_buckets(self, bucket_mb: float):
        """Rank 0: yield each bucket (a streaming generator). Other ranks: gather only."""
        self.history.append("sync")
        for bucket in self.learner.state_dict_for_sync(bucket_mb=bucket_mb):
            if self.rank == 0:
                yield bucket

    def drain_sync(self, bucket_mb: float) -> int:
        """The non-zero ranks' side of :meth:`sync_buckets` (they take part in gathers)."""
        self.history.append("sync")
        return sum(1 for _ in self.learner.state_dict_for_sync(bucket_mb=bucket_mb))

    def adapter_for_sync(self):
        """Rank 0: the LoRA adapter ``(tensors, config)``; other ranks take part in the
        gathers (ZeRO-3) and return None (see ``Learner.adapter_for_sync``)."""
        self.history.append("sync")
        adapter = self.learner.adapter_for_sync()
        return adapter if self.rank == 0 else None

    def fingerprint(self) -> str:
        """SHA-256 of this rank's view of the full weights (collective under ZeRO-3)."""
        self.history.append("fingerprint")
        digest = hashlib.sha256()
        for bucket in self.learner.state_dict_for_sync():
            for name, tensor in bucket:
                digest.update(name.encode())
                digest.update(tensor.float().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def save(self, out_dir: str) -> None:
        self.history.append("save")
        self.learner.save(out_dir)

    def load(self, out_dir: str) -> None:
        self.history.append("load")
        self.learner.load(out_dir)


class LearnerGroup:
    """``num_workers`` learner ranks as Ray actors.

    learner_kwargs: keyword arguments of :class:`~medrl.align.learner.Learner` (the same on
    every rank). placement_group / bundle_indices: optional Ray placement, one bundle per rank.
    resources: custom Ray resources each rank asks for (``{"learner_slot": 1}``): ranks land
    only on nodes that have them.
    """

    def __init__(self, num_workers: int, model_dir: str | Path, learner_kwargs: dict[str, Any],
                 num_cpus_per_worker: float = 1.0, num_gpus_per_worker: float = 0.0, *,
                 placement_group=None, bundle_indices: Sequence[int] | None = None,
                 resources: dict[str, float] | None = None):
        if num_workers < 1:
            raise UserError(f"learner.num_workers must be >= 1, got {num_workers}.")
        self.num_workers = num_workers
        # The ranks' methods are collective: two driver threads (async mode's rollout thread
        # scoring with the policy log-prob hook, and the training loop) must not interleave
        # their calls, or the ranks would meet in their collectives in different orders.
        self._serial = threading.RLock()
        actor_cls = ray.remote(LearnerWorker)
        self.workers = []
        try:  # a rank that cannot be placed or set up ends the ones already running
            for rank in range(num_workers):
                options: dict[str, Any] = dict(num_cpus=num_cpus_per_worker,
                                               num_gpus=num_gpus_per_worker,
                                               resources=dict(resources or {}))
                if placement_group is not None:
                    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

                    index = bundle_indices[rank] if bundle_indices is not None else rank
                    options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                        placement_group=placement_group, placement_group_bundle_index=index)
                self.workers.append(actor_cls.options(**options).remote(
                    rank, num_workers, str(model_dir), dict(learner_kwargs)))
            # Ranks meet on a free port of rank 0: over loopback when the group shares one node
            # (Ray may report the node's interface address even for a loopback-only cluster),
            # at rank 0's node address otherwise.
            nodes = ray.get([w.node.remote() for w in self.workers])
            address = "127.0.0.1" if len({n for n, _ in nodes}) == 1 else nodes[0][1]
            port = ray.get(self.workers[0].free_port.remote())
            ray.get([w.setup.remote(address, port) for w in self.workers])
        except BaseException:
            self.shutdown()
            raise

    def __getstate__(self) -> dict:
        # A copy in another process (a reward actor's policy log-prob hook) gets a lock of
        # its own: the driver's cannot travel, and it serialises that process's calls only.
        return {k: v for k, v in self.__dict__.items() if k != "_serial"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._serial = threading.RLock()

    def _put(self, samples: Sequence[Sample] | ray.ObjectRef) -> list:
        ref = samples if isinstance(samples, ray.ObjectRef) else ray.put(list(samples))
        return [ref]  # wrapped: Ray passes it to the actor unresolved

    def _check_size(self, samples, unit: int = 1) -> None:
        if not isinstance(samples, ray.ObjectRef) and len(samples) < self.num_workers * unit:
            what = "samples" if unit == 1 else f"samples ({len(samples) // unit} units of {unit})"
            raise UserError(f"The learner step got {len(samples)} {what} for "
                            f"{self.num_workers} learner workers; each needs at least one. "
                            "Raise the batch size or lower learner.num_workers.")

    def train_step(self, samples: Sequence[Sample] | ray.ObjectRef, *, ppo_epochs: int = 1,
                   policy_version: int | None = None) -> dict[str, float]:
        """One learner step on the global batch; returns the global metrics (rank 0's).

        ``policy_version``: the version of the learner's current weights (samples of an older
        one are off-policy; see ``Learner.train_step``)."""
        self._check_size(samples)
        ref = self._put(samples)
        with self._serial:
            results = ray.get([w.train_step.remote(ref, ppo_epochs, policy_version)
                               for w in self.workers])
        return results[0]

    def logprobs(self, samples: Sequence[Sample] | ray.ObjectRef, *,
                 temperature: float | None = None, reference: bool = False) -> list:
        """Log-probs of each sample's completion: one 1-D tensor per sample, in order.

        Under the current policy at the training temperature (``temperature`` None) or the
        one given; with ``reference=True`` under the frozen reference policy.
        """
        self._check_size(samples)
        ref = self._put(samples)
        with self._serial:
            parts = ray.get([w.logprobs.remote(ref, temperature, reference)
                             for w in self.workers])
        return [lp for part in parts for lp in part]

    def train_step_with(self, loss_fn, samples: Sequence[Sample], size_fn, *,
                        unit: int = 1) -> dict[str, float]:
        """One optimiser step with another stage's loss (``Learner.train_step_with``); the
        global list is sharded by whole units of ``unit`` consecutive samples (a preference
        pair is two). ``loss_fn`` and ``size_fn`` travel to the ranks: module-level
        functions."""
        if len(samples) % unit:
            raise ValueError(f"{len(samples)} samples do not make whole units of {unit}")
        self._check_size(samples, unit)
        ref = self._put(samples)
        with self._serial:
            return ray.get([w.train_step_with.remote(ref, loss_fn, size_fn, unit)
                            for w in self.workers])[0]

    def values(self, samples: Sequence[Sample], *, unit: int = 1) -> list[float]:
        """A value-head learner's value of each sample, in order (sharded like
        :meth:`train_step_with`). Every rank runs the forward pass (it is collective), so a
        list of fewer units than ranks is padded with copies of its first unit, whose values
        are dropped."""
        n, samples = len(samples), list(samples)
        while len(samples) < self.num_workers * unit:
            samples += samples[:unit]
        ref = self._put(samples)
        with self._serial:
            parts = ray.get([w.values.remote(ref, unit) for w in self.workers])
        return [v for part in parts for v in part][:n]

    def sync_buckets(self, bucket_mb: float = 256) -> Iterator[ray.ObjectRef]:
        """The full weights as object refs, one per bucket, each a ``list[(name, tensor)]``.

        Consume the iterator to the end: the other ranks finish their gathers alongside, and
        no other learner call starts until it is done.
        """
        with self._serial:
            others = [w.drain_sync.remote(bucket_mb) for w in self.workers[1:]]
            yield from self.workers[0].sync_buckets.options(
                num_returns="streaming").remote(bucket_mb)
            ray.get(others)

    def adapter_for_sync(self) -> tuple[dict, dict]:
        """The LoRA adapter alone, ``(tensors, config)`` (``Learner.adapter_for_sync``), from
        rank 0; every rank takes part."""
        with self._serial:
            return ray.get([w.adapter_for_sync.remote() for w in self.workers])[0]

    def call_histories(self) -> list[list[str]]:
        """Each rank's collective calls in order (see ``LearnerWorker.call_history``)."""
        return ray.get([w.call_history.remote() for w in self.workers])

    def fingerprints(self) -> list[str]:
        """Each rank's SHA-256 of the full weights: all equal unless ranks diverged."""
        with self._serial:
            return ray.get([w.fingerprint.remote() for w in self.workers])

    def save(self, out_dir: str | Path) -> None:
        """Checkpoint every rank into ``out_dir`` (see ``Learner.save``)."""
        with self._serial:
            ray.get([w.save.remote(str(out_dir)) for w in self.workers])

    def load(self, out_dir: str | Path) -> None:
        """Restore every rank from ``out_dir`` (see ``Learner.load``)."""
        with self._serial:
            ray.get([w.load.remote(str(out_dir)) for w in self.workers])

    def shutdown(self) -> None:
        """End the actors."""
        for w in self.workers:
            ray.kill(w)
        self.workers = []
