"""Running the loaded rewards on a batch of samples, once per step.

Where each reward runs:

- ``actor: true``: its own Ray actor (``num_cpus``/``num_gpus`` from the recipe) that builds the
  class once, calls ``setup(ctx)`` once (loads its model once) and scores every step;
- function rewards with ``task_pool > 0`` (and Ray initialised): the batch is split into that
  many Ray tasks;
- everything else: in the calling (driver) process.

Every reward's output is checked in the driver (count, finite numbers, token-weight lengths),
then the failure policy applies: ``on_error="raise"`` stops with a :class:`RewardError` naming
the reward, the sample uid(s) and the cause; ``on_error="skip_sample"`` drops the failed
samples (their uids are returned and counted), appends one line per failure to
``RUN_DIR/reward_failures.jsonl`` and goes on.

A class reward may also report batch-level numbers (timings, throughput): an optional
``batch_metrics() -> dict[str, float]`` method, read after each successful call (in its actor
for ``actor: true``) and logged as ``rewards/<name>/<key>``.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from medrl.align.records import Sample, UserError
from medrl.rewards.api import (RewardContext, RewardError, RewardFailure, RewardResult,
                               error_message, finite)
from medrl.rewards.calls import Failure, RewardWorker, call_function_reward, check_batch
from medrl.rewards.combine import (combine_scores, multiply_token_weights, score_stats,
                                   veto_fires)
from medrl.rewards.loader import LoadedReward, Veto, VetoInput, load_rewards, resolve_vetoes

# One JSON line per (reward, sample) failure skipped under ``on_error: skip_sample``:
# {"step", "reward", "uid", "cause"}; never the sample's text.
FAILURES_FILE = "reward_failures.jsonl"


@dataclass
class ScoreReport:
    """What ``RewardRunner.score`` returns.

    samples: the samples that were scored (dropped ones removed), in their original order.
    dropped: uids dropped under ``on_error: skip_sample``.
    metrics: flat ``{"rewards/<name>/mean": ...}`` dict for logging (see ``RewardRunner.score``).
    failures: one record per failed (reward, sample) under ``skip_sample``.
    """

    samples: list[Sample]
    dropped: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    failures: list[RewardFailure] = field(default_factory=list)


def combined_token_weights(sample: Sample) -> list[float] | None:
    """The product of every reward's token weights for this sample (None when none gave any)."""
    return multiply_token_weights(list(sample.token_weights.values()))


# How long a crashed reward actor may take to come back before its batch counts as failed.
RESTART_TIMEOUT_S = 180.0
# Added to a reward actor's time limit for its batch: Ray's round trip and a slow first call.
BACKSTOP_SLACK_S = 30.0


def actor_backstop_s(timeout_s: float | None, calls: int) -> float | None:
    """How long the driver waits for a reward actor's batch before calling it timed out.

    ``timeout_s`` applies to each call inside the actor, one per sample for a function reward
    (``calls`` = the number of samples) and one per batch for a class reward (``calls`` = 1),
    so an actor that honours it answers within ``timeout_s * calls``; the backstop only catches
    one that does not (a call that holds the GIL), after that plus :data:`BACKSTOP_SLACK_S`.
    Never under ``2 * timeout_s`` plus the slack: room for the ``setup`` a restarted actor runs
    before a class reward's one call.
    """
    if timeout_s is None:
        return None
    return timeout_s * max(calls, 2) + BACKSTOP_SLACK_S


def reward_device(r: LoadedReward) -> str:
    """``ctx.device`` of a reward: "cuda" for an actor that reserved GPUs, else "cpu"."""
    return "cuda" if r.actor and r.num_gpus > 0 else "cpu"


class RewardRunner:
    """Scores batches with the loaded rewards; created once per run.

    rewards: from :func:`load_rewards`. ctx: handed to every class reward's ``setup``; its
    ``run_dir`` (when set) receives ``reward_failures.jsonl``.
    normalize, veto, veto_threshold, floor, veto_margin, on_error: the recipe's rewards-level
    options (``veto`` in any form :func:`medrl.rewards.loader.resolve_vetoes` takes).
    task_pool: number of Ray tasks a batch of a function reward is split across (0: in the
    driver). max_restarts: Ray restarts of a crashed reward actor (it sets up again on its
    next call; the call in flight when it died fails).
    ``start()`` builds driver-side rewards and starts actors (needs ``ray.init`` when any
    reward has ``actor: true``); ``score`` starts them on first use; ``close()`` stops actors.
    """

    def __init__(self, rewards: list[LoadedReward], *, ctx: RewardContext | None = None,
                 normalize: str = "none", veto: VetoInput = None, veto_threshold: float = 0.5,
                 floor: float = 0.0, veto_margin: float = 1.0, on_error: str = "raise",
                 task_pool: int = 0, max_restarts: int = 0):
        if on_error not in ("raise", "skip_sample"):
            raise UserError(f"rewards.on_error must be 'raise' or 'skip_sample', not {on_error!r}")
        if normalize not in ("none", "group"):
            raise UserError(f"rewards.normalize must be 'none' or 'group', not {normalize!r}")
        if not (finite(veto_margin) and veto_margin > 0):
            raise UserError(f"rewards.veto_margin must be a number > 0 (how far below the "
                            f"group's lowest unvetoed reward a vetoed one goes), not "
                            f"{veto_margin!r}")
        self.rewards = list(rewards)
        self.vetoes: list[Veto] = resolve_vetoes(veto, [r.name for r in self.rewards],
                                                 veto_threshold=veto_threshold)
        self.ctx = ctx or RewardContext()
        self.normalize, self.floor, self.veto_margin = normalize, floor, veto_margin
        self.on_error, self.task_pool, self.max_restarts = on_error, task_pool, max_restarts
        self._workers: dict[str, Any] = {}  # name -> RewardWorker or Ray actor handle
        self._task_fn = None
        self._started = False

    @classmethod
    def from_config(cls, config: Any, *, base_dir=None, ctx: RewardContext | None = None,
                    task_pool: int = 0, max_restarts: int = 0) -> "RewardRunner":
        """From the recipe's ``rewards`` section (a RewardsConfig or the same as a dict)."""
        data = config.model_dump() if hasattr(config, "model_dump") else dict(config)
        threshold = data.get("veto_threshold")
        threshold = 0.5 if threshold is None else threshold
        loaded = load_rewards(list(data.get("functions", [])), base_dir=base_dir,
                              veto=data.get("veto"), veto_threshold=threshold)
        return cls(loaded, ctx=ctx, normalize=data.get("normalize", "none"),
                   veto=data.get("veto"), veto_threshold=threshold,
                   floor=data.get("floor", 0.0), veto_margin=data.get("veto_margin", 1.0),
                   on_error=data.get("on_error", "raise"), task_pool=task_pool,
                   max_restarts=max_restarts)

    def identities(self) -> list[dict[str, Any]]:
        """Provenance of every reward (see ``LoadedReward.identity``), for checkpoints."""
        return [r.identity() for r in self.rewards]

    identity = identities

    def actors(self) -> dict[str, Any]:
        """The Ray actor handle of every ``actor: true`` reward, by name (for health checks)."""
        return {r.name: self._workers[r.name] for r in self.rewards
                if r.actor and r.name in self._workers}

    # -- life cycle -------------------------------------------------------------------
    def start(self) -> None:
        for r in self.rewards:
            if r.name not in self._workers:
                self._workers[r.name] = self._start_one(r)
        self._started = True

    def _uses_ray(self, r: LoadedReward) -> bool:
        return r.actor or (r.kind == "function" and self.task_pool > 0)

    def _start_one(self, r: LoadedReward):
        if self._uses_ray(r):
            import ray
            import ray.cloudpickle

            if not ray.is_initialized():
                raise UserError(f"reward {r.name!r} runs in Ray (actor: true or a task pool) "
                                "but Ray is not initialised; call ray.init() first.")
            if r.file_module:  # a reward from a .py file is not importable on the workers
                ray.cloudpickle.register_pickle_by_value(sys.modules[r.file_module])
        # A reward's model goes where its own reservation is: the GPU(s) Ray gave its actor
        # (which that process sees as cuda:0...), else the CPU, never a GPU it did not reserve.
        ctx = replace(self.ctx, device=reward_device(r))
        if r.actor:
            actor = ray.remote(RewardWorker).options(
                num_cpus=r.num_cpus, num_gpus=r.num_gpus,
                max_restarts=self.max_restarts).remote(r, ctx)
            try:
                ray.get(actor.setup.remote())
            except Exception as exc:
                ray.kill(actor)
                raise RewardError(f"reward {r.name!r} failed in setup(ctx) in its actor: {exc}",
                                  reward=r.name, cause=str(exc)) from exc
            return actor
        worker = RewardWorker(r, ctx)
        try:
            worker.setup()
        except (Exception, SystemExit) as exc:  # the plugin's __init__ or setup(ctx)
            raise RewardError(f"reward {r.name!r} failed in setup(ctx): "
                              f"{type(exc).__name__}: {exc}", reward=r.name,
                              cause=str(exc)) from exc
        return worker

    def close(self) -> None:
        """Stop reward actors (idempotent)."""
        for name, w in list(self._workers.items()):
            if not isinstance(w, RewardWorker):
                import ray

                ray.kill(w)
            del self._workers[name]
        self._started = False

    # -- scoring ----------------------------------------------------------------------
    def _dispatch(self, r: LoadedReward, samples: list[Sample]):
        """Start the reward on the batch; returns a zero-argument function that gathers."""
        worker = self._workers[r.name]
        if r.actor:
            import ray

            ref = worker.score.remote(samples)
            backstop = actor_backstop_s(r.timeout_s, len(samples) if r.kind == "function" else 1)

            def gather():
                try:
                    return ray.get(ref, timeout=backstop)
                except ray.exceptions.GetTimeoutError:
                    return Failure(f"exceeded its timeout of {r.timeout_s:g} s", timed_out=True)
                except ray.exceptions.RayActorError as exc:
                    if self.max_restarts > 0:  # Ray restarts it: retry the batch once
                        return self._retry_after_restart(r, samples, backstop, exc)
                    return Failure(f"its actor died ({exc})")
                except ray.exceptions.RayTaskError as exc:  # setup() again after a restart
                    return Failure(f"raised in its actor: {exc}")
            return gather
        if r.kind == "function" and self.task_pool > 0:
            import ray

            if self._task_fn is None:
                self._task_fn = ray.remote(call_function_reward)
            size = -(-len(samples) // self.task_pool)
            chunks = [samples[i:i + size] for i in range(0, len(samples), size)]
            refs = [self._task_fn.options(num_cpus=r.num_cpus).remote(
                r.target, r.kwargs, chunk, r.timeout_s) for chunk in chunks]
            return lambda: [x for part in ray.get(refs) for x in part]
        return lambda: worker.score(samples)

    def _retry_after_restart(self, r: LoadedReward, samples: list[Sample],
                             timeout: float | None, died: Exception):
        """The actor died mid-batch and Ray is restarting it (it sets up again on its first
        call): wait until it answers, then score the same batch once more."""
        import time

        import ray

        worker = self._workers[r.name]
        deadline = time.monotonic() + RESTART_TIMEOUT_S
        while True:
            try:
                return ray.get(worker.score.remote(samples), timeout=timeout)
            except (ray.exceptions.ActorUnavailableError, ray.exceptions.ActorDiedError) as exc:
                # calls fail at once while the actor restarts; past max_restarts it stays dead
                if time.monotonic() > deadline:
                    return Failure(f"its actor died ({died}) and did not come back within "
                                   f"{RESTART_TIMEOUT_S:.0f} s ({type(exc).__name__})")
                time.sleep(1.0)
            except ray.exceptions.GetTimeoutError:
                return Failure(f"exceeded its timeout of {r.timeout_s:g} s", timed_out=True)
            except ray.exceptions.RayTaskError as exc:
                return Failure(f"raised in its actor after a restart: {exc}")

    def _restart_after_timeout(self, r: LoadedReward) -> None:
        """A timed-out actor may still be busy: replace it before the next step."""
        if r.actor:
            import ray

            ray.kill(self._workers.pop(r.name))
            self._workers[r.name] = self._start_one(r)

    def score(self, samples: list[Sample], *, step: int | None = None) -> ScoreReport:
        """Score a batch: fills ``sample.rewards/reward_dims/token_weights/token_marks/
        reward_info[name]``
        and ``sample.reward`` (combined).

        step: the training step, written beside each skipped failure in
        ``reward_failures.jsonl``; default: the batch's policy version + 1, the step during
        which a batch made by those weights is scored.
        Metrics (over the kept samples): ``rewards/<name>/{mean,std,not_applicable,errors}``,
        ``rewards/<name>/<key>`` for each ``batch_metrics()`` key of a class reward whose
        call on the batch succeeded (e.g. the rubric reward's ``judge_seconds``),
        ``rewards/<name>/<dim>/{mean,std,not_applicable}``, ``rewards/combined/{mean,std}``,
        ``rewards/vetoed`` (share of samples any veto fired on), ``rewards/vetoed/<score>`` (share
        each veto fired on), ``rewards/skipped_samples`` (count).
        """
        if not self._started:
            self.start()
        uids = [s.uid for s in samples]
        if len(set(uids)) != len(uids):
            raise ValueError("RewardRunner.score: sample uids must be unique within a batch "
                             "(dropped samples are reported by uid)")
        if not samples:
            return ScoreReport([], [], {"rewards/skipped_samples": 0.0}, [])
        gathers = [(r, self._dispatch(r, samples)) for r in self.rewards]
        results: dict[str, list[RewardResult | Failure]] = {}
        batch_metrics: dict[str, float] = {}
        for r, gather in gathers:
            results[r.name] = check_batch(gather(), samples)
            if any(isinstance(x, Failure) and x.timed_out for x in results[r.name]):
                if self.on_error == "skip_sample":
                    self._restart_after_timeout(r)
            elif not any(isinstance(x, Failure) for x in results[r.name]):
                batch_metrics.update(self._batch_metrics(r))
        self._check_veto_dims(results)

        failures, dropped, errors = [], set(), {r.name: 0 for r in self.rewards}
        for r in self.rewards:
            failed = [(s, x) for s, x in zip(samples, results[r.name]) if isinstance(x, Failure)]
            if not failed:
                continue
            if self.on_error == "raise":
                cause = failed[0][1].cause
                batch = all(x is failed[0][1] for _, x in failed) and len(failed) > 1
                uids = [s.uid for s, _ in failed] if batch else [failed[0][0].uid]
                err = RewardError(error_message(r.name, uids, cause), reward=r.name,
                                  uids=uids, cause=cause)
                err.details = failed[0][1].traceback
                raise err
            errors[r.name] = len(failed)
            for s, x in failed:
                dropped.add(s.uid)
                failures.append(RewardFailure(r.name, s.uid, x.cause))
        if failures:
            if step is None:
                step = max(s.policy_version for s in samples) + 1
            self._log_failures(failures, step)

        keep = [i for i, s in enumerate(samples) if s.uid not in dropped]
        kept = [samples[i] for i in keep]
        fired = self._fill(kept, {n: [v[i] for i in keep] for n, v in results.items()})
        overflow = [s.uid for s in kept if not math.isfinite(s.reward)]
        if overflow:  # finite scores whose weighted sum is not: no advantage can be made
            names = ", ".join(repr(r.name) for r in self.rewards)
            raise RewardError(f"the combined reward of {len(overflow)} sample(s) ("
                              f"{', '.join(map(repr, overflow[:5]))}) overflows a float: the "
                              f"weighted scores of {names} reach about 1e308. Keep scores and "
                              "weights in a moderate range.", uids=overflow,
                              cause="combined reward overflow")
        metrics = self._metrics(kept, errors, fired)
        metrics.update(batch_metrics)
        metrics["rewards/skipped_samples"] = float(len(dropped))
        return ScoreReport(kept, [s.uid for s in samples if s.uid in dropped], metrics, failures)

    def _batch_metrics(self, r: LoadedReward) -> dict[str, float]:
        """A class reward's optional ``batch_metrics() -> {key: number}`` after its call on
        the batch, as ``rewards/<name>/<key>``."""
        if r.kind != "class":
            return {}
        worker = self._workers[r.name]
        try:
            if r.actor:
                import ray

                values = ray.get(worker.batch_metrics.remote(), timeout=BACKSTOP_SLACK_S)
            else:
                values = worker.batch_metrics()
        except Exception as exc:  # the plugin's method; in its actor a RayTaskError, whose
            exc = getattr(exc, "cause", None) or exc  # cause is what the method raised
            raise RewardError(f"reward {r.name!r}: batch_metrics() failed: "
                              f"{type(exc).__name__}: {exc}. Fix the reward's batch_metrics, "
                              "or remove it.", reward=r.name, cause=str(exc)) from None
        for key, value in values.items():
            if not finite(value):
                shown = repr(value) if isinstance(value, (int, float)) else \
                    f"a {type(value).__name__}"
                raise RewardError(f"reward {r.name!r}: batch_metrics()[{key!r}] is {shown}; "
                                  "batch metrics are finite numbers.", reward=r.name)
        return {f"rewards/{r.name}/{k}": float(v) for k, v in values.items()}

    def _log_failures(self, failures: list[RewardFailure], step: int) -> None:
        """Append the skipped failures to ``RUN_DIR/reward_failures.jsonl`` (no run folder:
        they stay in the report only)."""
        if self.ctx.run_dir is None:
            return
        path = Path(self.ctx.run_dir) / FAILURES_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            for f in failures:
                fh.write(json.dumps({"step": int(step), "reward": f.reward, "uid": f.uid,
                                     "cause": f.cause}) + "\n")

    def _check_veto_dims(self, results) -> None:
        for veto in self.vetoes:
            if veto.dim is None:
                continue
            name, dim = veto.reward, veto.dim
            for i, x in enumerate(results[name]):
                if isinstance(x, RewardResult) and x.score is not None \
                        and dim not in (x.dims or {}):
                    results[name][i] = Failure(
                        f"returned no dim {dim!r}, which rewards.veto ({veto.score}) needs "
                        f"(dims: {', '.join(sorted(x.dims or {})) or 'none'})")

    def _fill(self, kept: list[Sample],
              results: dict[str, list[RewardResult]]) -> dict[str, list[bool]]:
        """Write the results into the samples; return where each veto fired (by its score)."""
        for r in self.rewards:
            for s, x in zip(kept, results[r.name]):
                s.rewards[r.name] = x.score
                if x.dims:
                    s.reward_dims[r.name] = x.dims
                if x.token_weights is not None:
                    s.token_weights[r.name] = x.token_weights
                if x.token_marks is not None:
                    s.token_marks[r.name] = x.token_marks
                if x.info:
                    s.reward_info[r.name] = x.info
        fired = {v.score: veto_fires([v.read(s) for s in kept], threshold=v.threshold,
                                  when=v.when) for v in self.vetoes}
        combined = combine_scores(
            {r.name: [s.rewards[r.name] for s in kept] for r in self.rewards},
            {r.name: r.weight for r in self.rewards}, [s.group_id for s in kept],
            normalize=self.normalize, floor=self.floor, margin=self.veto_margin,
            vetoed=[any(f[i] for f in fired.values()) for i in range(len(kept))]
            if fired else None)
        for i, (s, c) in enumerate(zip(kept, combined)):
            s.reward = c
            which = [name for name, f in fired.items() if f[i]]
            if which:  # the vetoes that fired on this sample
                s.reward_info["_veto"] = which
        return fired

    def _metrics(self, kept: list[Sample], errors: dict[str, int],
                 fired: dict[str, list[bool]]) -> dict[str, float]:
        m: dict[str, float] = {}
        for r in self.rewards:
            prefix = f"rewards/{r.name}"
            m.update(score_stats(prefix, [s.rewards[r.name] for s in kept]))
            m[f"{prefix}/errors"] = float(errors[r.name])
            dims = sorted({d for s in kept for d in s.reward_dims.get(r.name, {})})
            for d in dims:
                m.update(score_stats(f"{prefix}/{d}",
                                     [s.reward_dims.get(r.name, {}).get(d) for s in kept]))
        m.update(score_stats("rewards/combined", [s.reward for s in kept]))
        m.pop("rewards/combined/not_applicable", None)
        if kept:
            m["rewards/vetoed"] = sum(bool(s.reward_info.get("_veto")) for s in kept) / len(kept)
            for name, f in fired.items():
                m[f"rewards/vetoed/{name}"] = sum(f) / len(kept)
        return m
