"""The GRPO driver loop: generate -> score -> advantage -> learn -> sync -> checkpoint.

This module alone joins the rollout workers (``medrl.rollouts``), the rewards
(``medrl.rewards``) and the learner group (``medrl.align`` behind thin Ray actors). Each phase
runs under a named timer whose duration is logged as ``time/<phase>``.

Exact resume: everything random is a function of (run seed, step) or lives in the checkpoint.
The sampling seed of step k is a function of (seed, k); the prompt stream's cursor, the
learner's optimiser state and the driver's RNG states are saved in each checkpoint. A run of
6 steps and a run of 3 steps resumed for 3 more therefore see the same prompts, sample the
same completions and compute the same losses.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from medrl.align.records import Sample, UserError
from medrl.launch.recipe import Recipe
from medrl.launch.rundir import note

if TYPE_CHECKING:  # heavy imports (Ray, torch), needed only for the annotations
    from ray.util.placement_group import PlacementGroup

    from medrl.launch.learner_group import LearnerGroup
    from medrl.launch.monitor import Monitor, Timer
    from medrl.launch.rundir import PromptLog
    from medrl.launch.stream import PromptStream
    from medrl.rewards import RewardRunner
    from medrl.rollouts.worker import RolloutGroup


# Engine vs learner log-prob agreement after a sync, fp32 (DESIGN.md measured <= 6e-5 on
# an 86M model): a larger gap means the engine samples from other weights than it should.
SYNC_ATOL = 2e-4


class RunFailed(RuntimeError):
    """A component failed mid-run; the message says where to resume from."""


@dataclass
class Components:
    """Everything one run holds; built by :func:`build`, closed by :meth:`close`."""

    stream: PromptStream
    rollouts: RolloutGroup
    learner: LearnerGroup
    rewards: RewardRunner
    monitor: Monitor
    prompt_log: PromptLog
    policy_dir: Path
    start_step: int
    placement_group: PlacementGroup | None = None  # colocate: CPUs/GPUs held until close

    def close(self) -> None:
        self.rewards.close()
        self.rollouts.shutdown()
        self.learner.shutdown()
        self.monitor.close()
        if self.placement_group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.placement_group)


def sampling_for(recipe: Recipe, step: int, attempt: int = 0):
    """Sampling parameters of ``step`` (``attempt``: refill round of zero-variance filtering);
    the seed depends only on (run seed, step, attempt)."""
    from medrl.rollouts.engine import SamplingParams

    r = recipe.rollout
    return SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                          max_new_tokens=r.max_new_tokens, min_new_tokens=r.min_new_tokens,
                          stop=list(r.stop), n=r.group_size,
                          seed=(recipe.run.seed * 1_000_003 + step) * 4 + attempt)


def policy_folder(recipe: Recipe, run_dir: Path) -> Path:
    """The policy every stage starts from: ``model.policy`` resolved (relative to the recipe's
    folder), and with ``model.special_tokens`` a copy with them added in the run folder
    (reused on resume)."""
    from medrl.align.models import resolve_policy
    from medrl.align.special_tokens import POLICY_INIT, prepare_policy

    policy_dir = resolve_policy(recipe.model.policy, seed=recipe.run.seed,
                                base_dir=Path(recipe.run.recipe_dir or "."))
    return prepare_policy(policy_dir, recipe.model.special_tokens, run_dir / POLICY_INIT)


def monitor_for(recipe: Recipe, run_dir: Path, total: int, start: int) -> "Monitor":
    """The run's metrics, plots and progress bar from ``recipe.logging``: ``total`` steps,
    resumed after step ``start`` (0: a fresh run; later rows are dropped on resume)."""
    from medrl.launch.monitor import Monitor

    lg = recipe.logging
    return Monitor(run_dir, total_steps=total, start_step=start, tensorboard=lg.tensorboard,
                   plots=lg.plots, progress=lg.progress, every=lg.every,
                   checkpoint_every=recipe.checkpoint.every)


def learner_kwargs(recipe: Recipe) -> dict:
    """The recipe's learner and loss settings as the learner's plain keyword arguments."""
    from medrl.align.reference import reference_placement

    ln, alg = recipe.learner, recipe.algorithm
    kl_in_loss = alg.kl.where == "loss"
    rc = alg.rollout_correction
    return dict(
        zero_stage=ln.zero_stage, offload_optimizer=ln.offload_optimizer,
        micro_batch_size=ln.micro_batch_size,
        max_tokens_per_micro_batch=ln.max_tokens_per_micro_batch, optimizer=ln.optimizer, lr=ln.lr,
        weight_decay=ln.weight_decay, betas=tuple(ln.betas), warmup_steps=ln.warmup_steps,
        total_steps=recipe.run.max_steps * alg.ppo_epochs, lr_schedule=ln.lr_schedule,
        min_lr_ratio=ln.min_lr_ratio, max_grad_norm=ln.max_grad_norm,
        gradient_checkpointing=ln.gradient_checkpointing, logprob_chunk_size=ln.logprob_chunk_size,
        share_prompt=ln.share_prompt,
        temperature=recipe.rollout.temperature,
        # KL in the reward needs the reference as much as KL in the loss does
        reference=reference_placement(ln.ref_model, kl_coef=alg.kl.coef, lora=bool(ln.lora)),
        lora=ln.lora.model_dump() if ln.lora else None,
        dtype=recipe.model.dtype, attn_implementation=recipe.model.attn_implementation,
        clip_low=alg.clip_low, clip_high=alg.clip_high,
        kl_coef=alg.kl.coef if kl_in_loss else 0.0, kl_estimator=alg.kl.estimator,
        loss_agg=alg.loss_agg, max_completion_length=recipe.rollout.max_new_tokens,
        loss=alg.loss, entropy_coef=alg.entropy_coef, mask_truncated=alg.mask_truncated,
        old_logprobs=alg.old_logprobs, correction=rc.mode, correction_level=rc.level,
        correction_threshold=rc.threshold, seed=recipe.run.seed,
    )


def engine_kwargs(recipe: Recipe, policy_dir: Path) -> dict:
    """The rollout engines' settings: the learner's dtype, a context of
    ``rollout.max_prompt_tokens + max_new_tokens`` capped by the model's positions, and
    ``lora_rank`` when the engines serve LoRA adapters (``rollout.lora_sync``, resolved by
    :func:`medrl.rollouts.worker.lora_sync_mode`; :func:`push_weights` follows the engines)."""
    from medrl.align.models import context_length, is_vision_model
    from medrl.rollouts.worker import lora_sync_mode

    r = recipe.rollout
    positions = context_length(policy_dir)
    if positions is not None and r.max_new_tokens >= positions:
        raise UserError(f"rollout.max_new_tokens is {r.max_new_tokens}, but the policy "
                        f"{policy_dir} has only {positions} positions "
                        "(max_position_embeddings); lower max_new_tokens.")
    wanted = r.max_prompt_tokens + r.max_new_tokens
    kwargs = {"dtype": recipe.model.dtype, "attn_implementation": recipe.model.attn_implementation,
              "max_model_len": min(wanted, positions) if positions else wanted,
              "kv_cache_memory_bytes": r.kv_cache_memory_mb * 2**20,
              "num_threads": r.num_threads, "enforce_eager": r.enforce_eager}
    lora = recipe.learner.lora
    mode, why = lora_sync_mode(r.lora_sync, backend=r.backend, lora_rank=lora.r if lora else None,
                               vision=is_vision_model(policy_dir),
                               on_gpu=recipe.cluster.rollout_gpus > 0)
    if why:
        note(why)
    if mode == "adapter":
        kwargs["lora_rank"] = lora.r
    return kwargs


def sampling_note(policy_dir: Path) -> str | None:
    """What to tell the user when the policy's ``generation_config.json`` asks for sampling
    settings the engines ignore (None when it asks for none)."""
    from medrl.rollouts.engine import ignored_generation_defaults

    ignored = ignored_generation_defaults(policy_dir)
    if not ignored:
        return None
    shown = ", ".join(f"{k}={v!r}" for k, v in ignored.items())
    return (f"the policy's generation_config.json sets {shown}; rollouts ignore these and "
            "draw tokens with rollout.temperature, top_p and top_k only (no repetition "
            "penalty, min_p or n-gram block), so the learner recomputes the same "
            "distribution.")


def build(recipe: Recipe, run_dir: Path, *, resume_from: Path | None,
          timer: Timer) -> Components:
    """Start every component; with ``resume_from`` restore the checkpoint's exact state.
    ``timer`` takes the start-up phases (``startup/policy``, ``/data``, ``/actors``,
    ``/rewards``, ``/restore``)."""
    from medrl.align.checkpoint import read_state
    from medrl.align.rng_state import restore_rng
    from medrl.launch.cluster import placement, started
    from medrl.launch.learner_group import LearnerGroup
    from medrl.launch.reward_hooks import GenerateHook, policy_hook
    from medrl.launch.rundir import PromptLog
    from medrl.launch.stream import PromptStream
    from medrl.rewards import RewardContext, RewardRunner
    from medrl.rollouts.worker import RolloutGroup

    recipe_dir = Path(recipe.run.recipe_dir or ".")  # relative paths in the recipe start here
    with timer("startup/policy"):
        policy_dir = policy_folder(recipe, run_dir)
    if (text := sampling_note(policy_dir)) is not None:
        note(text)
    state = read_state(resume_from) if resume_from else None
    start_step = state["step"] if state else 0

    with timer("startup/data"):
        stream = PromptStream.from_recipe(recipe.data, seed=recipe.run.seed,
                                          recipe_dir=recipe_dir)
        stream.check_take(recipe.rollout.prompts_per_step)  # before any actor starts
    if state:
        stream.load_state(state["data_cursor"])
        restore_rng(state["rng"])

    c = recipe.cluster
    pg, rollout_bundles, learner_bundles = placement(recipe)
    # Side by side: each start is imports and a model load in the actors' own processes.
    with timer("startup/actors"), ThreadPoolExecutor(2, thread_name_prefix="medrl-start") as pool:
        learner, rollouts = started(
            pool.submit(LearnerGroup, recipe.learner.num_workers, policy_dir,
                        learner_kwargs(recipe), num_cpus_per_worker=c.learner_cpus,
                        num_gpus_per_worker=c.learner_gpus, placement_group=pg,
                        bundle_indices=learner_bundles, resources=c.learner_resources),
            pool.submit(RolloutGroup, recipe.rollout.num_workers, recipe.rollout.backend,
                        str(policy_dir), engine_kwargs(recipe, policy_dir),
                        num_cpus_per_worker=c.rollout_cpus, num_gpus_per_worker=c.rollout_gpus,
                        max_restarts=c.max_restarts, placement_group=pg,
                        bundle_indices=rollout_bundles, resources=c.rollout_resources))
    ctx = RewardContext(run_dir=run_dir, base_dir=recipe_dir, seed=recipe.run.seed,
                        policy_logprobs=policy_hook(learner, async_=recipe.algorithm.async_,
                                                    policy_dir=policy_dir),
                        generate=GenerateHook(rollouts, stop=tuple(recipe.rollout.stop)),
                        policy_dir=policy_dir)
    with timer("startup/rewards"):
        rewards = RewardRunner.from_config(recipe.rewards, base_dir=recipe_dir, ctx=ctx,
                                           max_restarts=c.max_restarts)
    if state:
        with timer("startup/restore"):
            learner.load(resume_from)
            push_weights(learner, rollouts, version=start_step)

    # on resume the monitor drops metrics logged after the checkpoint (no duplicate steps)
    monitor = monitor_for(recipe, run_dir, recipe.run.max_steps, start_step)
    monitor.restore((state or {}).get("metrics_row"))
    prompt_log = PromptLog(run_dir, resume_step=start_step if state else None)
    return Components(stream, rollouts, learner, rewards, monitor, prompt_log, policy_dir,
                      start_step, pg)


def push_weights(learner, rollouts, *, version: int) -> None:
    """Learner -> object store -> every rollout worker, in place: the LoRA adapter alone
    when the engines serve adapters (``rollouts.serves_adapters``), else the full weights
    bucket by bucket (LoRA merged)."""
    import ray

    if rollouts.serves_adapters:
        rollouts.update_adapter_from_ref(ray.put(learner.adapter_for_sync()), version)
        return
    rollouts.update_weights_from_refs(list(learner.sync_buckets()), version)


def generate_and_score(recipe: Recipe, c: Components, step: int) -> tuple[list[Sample], dict]:
    """P prompts x G completions, scored; zero-variance groups dropped and refilled if asked."""
    from medrl.align.grpo import group_advantages

    want = recipe.rollout.prompts_per_step
    kept: list[Sample] = []
    metrics = {"groups/zero_variance_dropped": 0.0, "samples/skipped_by_reward_errors": 0.0}
    reward_metrics: dict[str, float] = {}
    taken: set[str] = set()  # a refill never re-takes a prompt of this step
    for attempt in range(3 if recipe.algorithm.filter_zero_variance else 1):
        prompts = c.stream.take(want - len({s.group_id for s in kept}), exclude=taken)
        if not prompts:
            break
        taken.update(p.uid for p in prompts)
        samples = c.rollouts.generate(prompts, sampling_for(recipe, step, attempt))
        report = c.rewards.score(samples, step=step)
        if attempt == 0:  # per-reward statistics describe the step's first batch
            reward_metrics = report.metrics
        dropped = set(report.dropped)
        metrics["samples/skipped_by_reward_errors"] += len(dropped)
        samples = [s for s in samples if s.uid not in dropped]
        if recipe.algorithm.filter_zero_variance and samples:
            adv = group_advantages([s.reward for s in samples], [s.group_id for s in samples])
            metrics["groups/zero_variance_dropped"] += adv.num_zero_variance_groups
            samples = [s for s, z in zip(samples, adv.zero_variance.tolist()) if not z]
        kept += samples
        if len({s.group_id for s in kept}) >= want:
            break
    metrics.update(reward_metrics)
    return kept, metrics


def compute_advantages(recipe: Recipe, c: Components, samples: list[Sample]) -> dict:
    """Rewards (minus KL when it lives in the reward) -> group-relative advantages, and
    per-token advantages where rewards marked the tokens an answer went wrong at."""
    from medrl.align.grpo import group_advantages
    from medrl.align.process import apply_token_marks

    alg = recipe.algorithm
    metrics: dict[str, float] = {}
    if alg.kl.coef > 0 and alg.kl.where == "reward":
        from medrl.rewards.combine import subtract_penalty

        kl = sequence_kls(c.learner, samples, estimator=alg.kl.estimator)
        # A smaller penalty must not lift a vetoed (unsafe) answer above a safe one.
        penalised = subtract_penalty(
            [s.reward for s in samples], [alg.kl.coef * k for k in kl],
            [bool(s.reward_info.get("_veto")) for s in samples], [s.group_id for s in samples],
            floor=recipe.rewards.floor, margin=recipe.rewards.veto_margin)
        for s, r in zip(samples, penalised):
            s.reward = r
        metrics["kl"] = sum(kl) / len(kl)
    adv = group_advantages([s.reward for s in samples], [s.group_id for s in samples],
                           scale=alg.advantage_scale, eps=alg.advantage_eps)
    for s, a in zip(samples, adv.advantages.tolist()):
        s.advantage = a  # token weights from rewards scale it per token in the loss
    if any(s.token_marks for s in samples):  # where answers went wrong -> token advantages
        p = alg.process
        metrics.update(apply_token_marks(samples, adv.zero_variance.tolist(), mode=p.mode,
                                         alpha=p.alpha,
                                         failed_group_advantage=p.failed_group_advantage))
    metrics["groups/zero_variance"] = float(adv.num_zero_variance_groups)
    metrics["advantage/abs_mean"] = float(adv.advantages.abs().mean())
    return metrics


def sequence_kls(learner, samples: list[Sample], *, estimator: str) -> list[float]:
    """KL(policy || reference) of each completion, the mean over its tokens."""
    import torch

    from medrl.align.grpo import sequence_kl

    current = learner.logprobs(samples)
    reference = learner.logprobs(samples, reference=True)
    return [float(sequence_kl(lp[None], ref[None], torch.ones(1, len(lp)), estimator=estimator))
            for lp, ref in zip(current, reference)]


def step_metrics(samples: list[Sample]) -> dict[str, float]:
    lengths = [len(s.completion_ids) for s in samples]
    rewards = [s.reward for s in samples]
    mean = sum(rewards) / len(rewards)
    return {
        "reward/mean": mean,
        "reward/std": math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards)),
        "completion/length_mean": sum(lengths) / len(lengths),
        "completion/truncated_share": sum(s.finish_reason == "length" for s in samples) / len(samples),
        "samples/count": float(len(samples)),
    }


def staleness(recipe: Recipe, samples: list[Sample], *, learner_version: int) -> dict:
    """How many updates behind the learner the samples' policy is; bounded in async mode."""
    lag = max((learner_version - s.policy_version for s in samples), default=0)
    bound = recipe.algorithm.max_staleness if recipe.algorithm.async_ else 0
    if lag > bound:
        raise RunFailed(f"samples are {lag} policy versions behind the learner, more than the "
                        f"allowed {bound}; the rollout workers missed a weight update.")
    return {"async/staleness": float(lag)}


def checkpoint(recipe: Recipe, c: Components, run_dir: Path, step: int, *,
               cursor: dict | None = None, row: dict | None = None) -> Path:
    """Save step ``step``; ``cursor``: the data cursor to resume from (default: the stream's);
    ``row``: the step's metrics row as it stands (the checkpoint's own timing not in it)."""
    from medrl.align.checkpoint import save_checkpoint
    from medrl.align.rng_state import capture_rng

    state = {"step": step, "policy_version": step, "data_cursor": cursor or c.stream.state(),
             "rng": capture_rng(), "rewards": c.rewards.identity(),
             "policy_source": str(c.policy_dir), "metrics_row": row}
    path = save_checkpoint(run_dir, step, write=c.learner.save, state=state,
                           keep_last=recipe.checkpoint.keep_last)
    c.monitor.plot()
    return path


def train(recipe: Recipe, run_dir: Path, *, resume_from: Path | None = None,
          callbacks: Sequence[Callable[[int, Components], None]] = ()) -> Path | None:
    """Run (or resume) a GRPO stage; returns the last checkpoint written.

    ``callbacks`` run after each step (after its checkpoint) with ``(step, components)`` and
    may return metrics to log with the step's: the tests that kill a worker mid-run. The
    recipe's ``evaluation`` (:mod:`medrl.launch.eval_hook`) runs inside the step, after the
    sync, so that its figures are part of the record a checkpoint covers.
    """
    from medrl.launch.eval_hook import grpo_evaluation

    from medrl.launch.cluster import start_ray
    from medrl.launch.monitor import Timer
    from medrl.launch.reward_hooks import logprob_lists

    startup = Timer()  # logged with the first step: time/startup/<phase>
    with startup("startup/ray"):
        start_ray(recipe)
    with startup("startup/evaluation_data"):
        evaluation = grpo_evaluation(recipe, run_dir)  # its datasets load before any actor
    c = build(recipe, run_dir, resume_from=resume_from, timer=startup)
    last_ckpt = resume_from
    every, last_step = recipe.checkpoint.every, recipe.run.max_steps
    # One-step off-policy mode: a background thread generates and scores step k+1 while the
    # learner trains on step k (the engines take the new weights once that batch is done).
    pool = ThreadPoolExecutor(1, thread_name_prefix="medrl-rollouts") \
        if recipe.algorithm.async_ else None
    pending = None  # (future of the next step's batch, data cursor before its prompts)
    try:
        for step in range(c.start_step + 1, last_step + 1):
            timer = Timer()
            with timer("step"):
                with timer("generate"):  # async: the wait for the batch made during step k-1
                    samples, metrics = _rollout_call(last_ckpt, step, lambda: (
                        pending[0].result() if pending else generate_and_score(recipe, c, step)))
                    pending = None
                    if pool and step < last_step:
                        cursor = c.stream.state()
                        pending = (pool.submit(generate_and_score, recipe, c, step + 1), cursor)
                metrics.update(staleness(recipe, samples, learner_version=step - 1))
                if not samples:
                    raise RunFailed(f"step {step}: every sample was dropped (reward errors or "
                                    "zero-variance groups); nothing to learn from.")
                with timer("advantage"):
                    metrics.update(compute_advantages(recipe, c, samples))
                with timer("learn"):
                    metrics.update(_learner_call(c, last_ckpt, step, lambda: c.learner.train_step(
                        samples, ppo_epochs=recipe.algorithm.ppo_epochs,
                        policy_version=step - 1)))
                with timer("sync"):
                    _rollout_call(last_ckpt, step, lambda: _learner_call(
                        c, last_ckpt, step,
                        lambda: push_weights(c.learner, c.rollouts, version=step)))
                if recipe.rollout.verify_sync_every and step % recipe.rollout.verify_sync_every == 0:
                    with timer("verify_sync"):
                        metrics["sync/max_abs_diff"] = c.rollouts.verify_sync(
                            lambda s: logprob_lists(c.learner, s, temperature=1.0),
                            samples[: recipe.rollout.group_size], atol=SYNC_ATOL)
                if evaluation is not None:  # benchmarks on the weights the engines now hold
                    metrics.update(evaluation(step, c))
                metrics.update(step_metrics(samples))
                # The step's record is on disk before a checkpoint covers it: its prompt-log
                # rows here, its metrics row inside the checkpoint (resume rebuilds the row
                # from there when a kill came between COMPLETE and the append below).
                c.prompt_log.write(step, sorted({s.group_id for s in samples}))
                if recipe.logging.log_completions:  # patient text: only when the recipe asks
                    c.prompt_log.write_completions(step, samples)
                if (every and step % every == 0) or step == last_step:
                    with timer("checkpoint"):  # async: resume re-takes the in-flight prompts
                        last_ckpt = checkpoint(recipe, c, run_dir, step,
                                               cursor=pending[1] if pending else None,
                                               row=c.monitor.preview(step, {
                                                   **metrics, **timer.metrics()}))
            metrics.update(timer.metrics(), **startup.pop())  # start-up: first step only
            for callback in callbacks:
                metrics.update(callback(step, c) or {})
            c.monitor.log(step, metrics)
    finally:
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)
        c.close()
    c.monitor.summary(last_checkpoint=last_ckpt)
    return last_ckpt


def _learner_call(c: Components, last_ckpt: Path | None, step: int, fn):
    """Run a learner phase; a learner failure stops the run, naming where to resume."""
    import ray

    try:
        return fn()
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, UserError):  # bad input, not a crash: say what to fix
            raise exc.cause from None
        raise _stopped("the learner", exc, last_ckpt, step) from exc
    except ray.exceptions.RayActorError as exc:
        raise _stopped("the learner", exc, last_ckpt, step) from exc


def _rollout_call(last_ckpt: Path | None, step: int, fn):
    """Run the generate phase; a rollout worker that is gone for good (its node lost and no
    other to restart on) stops the run, naming where to resume."""
    from medrl.rollouts.worker import WorkerLost

    try:
        return fn()
    except WorkerLost as exc:
        raise _stopped("a rollout worker", exc, last_ckpt, step) from exc


def _stopped(what: str, exc: Exception, last_ckpt: Path | None, step: int) -> RunFailed:
    where = (f"the last complete checkpoint is {last_ckpt}; continue with "
             f"`medrl resume {last_ckpt.parent.parent}`" if last_ckpt
             else "no checkpoint was written yet; start the run again")
    return RunFailed(f"{what} failed at step {step}: {exc.__class__.__name__}. "
                     f"The run stopped cleanly; {where}.")


__all__ = ["train", "RunFailed", "UserError"]
