"""The policy learner: one DeepSpeed ZeRO engine per rank, a reference model, optional LoRA.

Life cycle (the same on one rank or many; every method that runs the model is *collective*:
with several ranks, all of them call it, in the same order, each with its own shard):

1. ``init_distributed(rank, world_size, addr, port)`` joins the process group (a single
   ``Learner`` in a plain process does this itself on a free loopback port).
2. ``Learner(model_dir, ...)`` loads the policy from a Hugging Face folder (partitioned at
   load time under ZeRO-3), wraps it with LoRA adapters if asked, builds the optimiser and the
   warm-up + cosine/constant schedule, and the reference model when the KL term needs one
   (a frozen copy; ZeRO-3 inference under ZeRO-3; the adapters switched off with LoRA).
3. Each GRPO step: ``batch = learner.collate(samples)`` then ``learner.train_step(batch)``:
   old log-probs are the rollout's (or recomputed), reference log-probs are computed, and per
   PPO epoch one optimiser step is taken over the whole batch, in micro-batches whose losses
   are weighted so that the update equals one pass over the global batch (all ranks).
4. ``state_dict_for_sync()`` streams the full weights (LoRA merged) bucket by bucket for the
   rollout engines (weights out and in live in :mod:`medrl.align.learner_state`);
   ``adapter_for_sync()`` gives the LoRA adapter alone, for engines that serve adapters.
5. ``save(dir)`` writes ``policy/`` (loads with ``from_pretrained``), ``learner/`` (DeepSpeed
   optimiser and schedule state, RNG) and ``adapter/`` with LoRA; to resume, build the learner
   from the *original* model folder (the reference model stays the starting policy) and call
   ``load(dir)``.

DeepSpeed writes its checkpoint with ``torch.save`` and reads it back with
``torch.load(weights_only=False)``, i.e. full unpickling. ``load`` swaps in a checkpoint
engine that reads the same files with ``weights_only=True`` and an allowlist of the few
DeepSpeed/Python types DeepSpeed puts in them, so a tampered file cannot run code.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from medrl.align import learner_state
from medrl.align.batch import TrainBatch, collate
from medrl.align.distributed import (LRSchedule, deepspeed_config, free_port, init_distributed,
                                     partitioned_loading)
from medrl.align.logprobs import Scorer, ValueScorer
from medrl.align.models import (Head, add_lora, is_vision_model, load_model, load_tokenizer,
                                resolve_dtype)
from medrl.align.records import Sample, UserError
from medrl.align.reference import Reference, load_reference


class Learner:
    """A DeepSpeed ZeRO policy learner (see the module docstring for its life cycle).

    ``total_steps`` and ``warmup_steps`` count optimiser steps (train steps x PPO epochs).
    ``dtype``: a ``torch.dtype`` or a ``model.dtype`` name; "auto"/None is bf16 on GPU and fp32
    on CPU (:func:`medrl.align.models.resolve_dtype`), and DeepSpeed's bf16/fp16 mode follows
    it. ``reference``: where the frozen reference policy lives (:class:`Reference`, resolved
    from the recipe by :func:`~medrl.align.reference.reference_placement`); its KL is
    reported whenever it exists and penalised with ``kl_coef``. ``lora``: ``{"r", "alpha",
    "dropout", "target_modules"}``. Loss options are those of
    :func:`medrl.align.grpo.policy_loss` (``loss_agg`` is its ``agg``; ``max_completion_length``
    its normaliser for ``seq_sum_norm``; ``loss`` the surrogate, ``entropy_coef`` the entropy
    bonus). ``mask_truncated``: completions that ran out of tokens (finish_reason "length")
    are left out of the loss (:func:`medrl.align.batch.collate`).
    ``max_tokens_per_micro_batch``: micro-batches by a token budget instead of
    ``micro_batch_size`` samples (:meth:`TrainBatch.split`). ``old_logprobs``:
    "recompute" (the learner's own, before the update) or "rollout" (the engine's);
    ``correction`` ("none", "truncate",
    "mask"), ``correction_level`` and ``correction_threshold`` re-weight tokens by
    pi_old / pi_rollout (:func:`medrl.align.grpo.rollout_correction`). ``prepare_model(model)``
    runs on the freshly loaded Hugging Face model before LoRA and DeepSpeed wrap it (the QAT
    stage swaps in fake-quantised layers there). ``share_prompt``: rows of a micro-batch that
    share a prompt run it once (:func:`medrl.align.logprobs.token_logprobs`).
    ``zero3_param_persistence_threshold``: under ZeRO-3, parameters smaller than this stay
    whole on every rank (None: DeepSpeed's default; 0: every parameter is partitioned).
    ``head``: "lm" (a policy, scored per token) or "value" (a reward model, one value per
    row: ``logprobs`` and the loss functions of ``train_step_with`` then see [B] values).
    """

    def __init__(self, model_dir: str | Path, *, zero_stage: int = 2,
                 offload_optimizer: bool = False, micro_batch_size: int = 4,
                 optimizer: str = "adamw", lr: float = 1e-5, weight_decay: float = 0.0,
                 betas: Sequence[float] = (0.9, 0.999), warmup_steps: int = 0,
                 total_steps: int = 1000, lr_schedule: str = "cosine", min_lr_ratio: float = 0.0,
                 max_grad_norm: float = 1.0, gradient_checkpointing: bool = False,
                 logprob_chunk_size: int = 1024, share_prompt: bool = True,
                 temperature: float = 1.0, reference: Reference = Reference.NONE,
                 lora: dict[str, Any] | None = None, dtype: torch.dtype | str | None = None,
                 attn_implementation: str = "sdpa", clip_low: float = 0.2,
                 clip_high: float = 0.2, kl_coef: float = 0.0, kl_estimator: str = "k3",
                 loss_agg: str = "token_mean", max_completion_length: int | None = None,
                 loss: str = "grpo", entropy_coef: float = 0.0, mask_truncated: bool = False,
                 max_tokens_per_micro_batch: int | None = None,
                 old_logprobs: str = "recompute", correction: str = "none",
                 correction_level: str = "token", correction_threshold: float = 2.0,
                 seed: int = 0, prepare_model: Callable[[torch.nn.Module], Any] | None = None,
                 zero3_param_persistence_threshold: int | None = None, head: Head = "lm"):
        import deepspeed
        import torch.distributed as dist
        from deepspeed.accelerator import get_accelerator

        if zero_stage not in (0, 1, 2, 3):
            raise UserError(f"learner.zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}.")
        if optimizer not in ("adamw", "deepspeed_adam"):
            raise UserError("learner.optimizer must be adamw or deepspeed_adam, "
                            f"got {optimizer!r}.")
        reference = Reference(reference)
        if kl_coef > 0 and reference is Reference.NONE:
            raise UserError("algorithm.kl.coef > 0 needs a reference model, but the learner has "
                            "none; set learner.ref_model: auto (or cpu), or the coefficient to 0.")
        if old_logprobs not in ("recompute", "rollout"):
            raise UserError(f"algorithm.old_logprobs must be recompute or rollout, "
                            f"got {old_logprobs!r}.")
        if correction != "none" and old_logprobs != "recompute":
            raise UserError("algorithm.rollout_correction needs algorithm.old_logprobs: "
                            "recompute (it re-weights by the learner's old log-probs over the "
                            "rollout's).")
        if not dist.is_initialized():
            init_distributed(0, 1, "127.0.0.1", free_port())
        self.model_dir = Path(model_dir)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.zero_stage, self.micro_batch_size = zero_stage, micro_batch_size
        self.temperature, self.logprob_chunk_size = temperature, logprob_chunk_size
        self.loss_options = dict(clip_low=clip_low, clip_high=clip_high, kl_coef=kl_coef,
                                 kl_estimator=kl_estimator, agg=loss_agg, loss=loss,
                                 entropy_coef=entropy_coef,
                                 max_completion_length=max_completion_length)
        self.mask_truncated = mask_truncated
        self.max_tokens_per_micro_batch = max_tokens_per_micro_batch
        self.old_logprobs = old_logprobs
        self.correction = dict(mode=correction, level=correction_level,
                               threshold=correction_threshold)
        self.lora = dict(lora) if lora else None
        self.on_gpu = get_accelerator().device_name() != "cpu"
        self.device = torch.device(get_accelerator().current_device_name()
                                   if self.on_gpu else "cpu")
        self.dtype = resolve_dtype(dtype, on_gpu=self.on_gpu)
        torch.manual_seed(seed)

        self.tokenizer = load_tokenizer(self.model_dir)  # a processor for VLMs
        self.is_vlm = is_vision_model(self.model_dir)
        tok = self.tokenizer.tokenizer if self.is_vlm else self.tokenizer
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

        self.ds_config = deepspeed_config(
            zero_stage=zero_stage, micro_batch_size=micro_batch_size, dtype=self.dtype,
            max_grad_norm=max_grad_norm, offload_optimizer=offload_optimizer, optimizer=optimizer,
            lr=lr, betas=betas, weight_decay=weight_decay,
            zero3_param_persistence_threshold=zero3_param_persistence_threshold)

        if head == "value" and reference is not Reference.NONE:
            raise UserError("a reward model (a value head) trains without a reference model; "
                            "set learner.ref_model: none.")
        if reference is Reference.ADAPTERS and not self.lora:
            raise UserError("the reference 'adapters' needs LoRA (learner.lora).")
        self.reference = reference
        scorer = dict(temperature=temperature, chunk_size=logprob_chunk_size,
                      share_prompt=share_prompt)
        self.ref_model = load_reference(
            self.model_dir, reference, dtype=self.dtype, device=self.device,
            zero_stage=zero_stage, ds_config=self.ds_config, scorer_kwargs=scorer,
            attn_implementation=attn_implementation)
        with partitioned_loading(self.ds_config, zero_stage):
            model = load_model(self.model_dir, dtype=self.dtype,
                               attn_implementation=attn_implementation, head=head)
        if prepare_model is not None:  # e.g. fake quantisation: before PEFT and DeepSpeed wrap it
            prepare_model(model)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        if self.lora:
            model = add_lora(model, self.lora, seed=seed, head=head)
        self.model = model
        params = [p for p in model.parameters() if p.requires_grad]
        torch_opt = None
        if optimizer == "adamw":
            torch_opt = torch.optim.AdamW(params, lr=lr, betas=tuple(betas),
                                          weight_decay=weight_decay)
        schedule = LRSchedule(warmup_steps, total_steps, lr_schedule, min_lr_ratio)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=Scorer(model, **scorer) if head == "lm" else ValueScorer(model),
            model_parameters=params, optimizer=torch_opt,
            config=self.ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))

    # ------------------------------------------------------------------------- batches
    def collate(self, samples: Sequence[Sample]) -> TrainBatch:
        """Samples -> :class:`TrainBatch` with this policy's pad id and image processor."""
        return collate(samples, pad_token_id=self.pad_token_id,
                       processor=self.tokenizer if self.is_vlm else None,
                       mask_truncated=self.mask_truncated)

    def _micro_batches(self, batch: TrainBatch) -> list[tuple[TrainBatch, bool]]:
        """Micro-batches as ``(batch, real)``; padded to the same count on every rank.

        ZeRO-3 gathers weights inside each forward pass and ZeRO-2 reduces gradients inside
        each backward pass, so every rank must run as many as the busiest rank. Extra ones
        repeat the first micro-batch and carry zero weight.
        """
        micro = batch.split(self.micro_batch_size, self.max_tokens_per_micro_batch)
        count = int(self._all_reduce(torch.tensor([len(micro)]), "max")[0])
        out = [(mb, True) for mb in micro] + [(micro[0], False)] * (count - len(micro))
        if self.is_vlm and self.zero_stage == 3 and self.world_size > 1:
            # The vision tower's weights are gathered only by ranks that run it: a micro-batch
            # with images on one rank and none on another would deadlock the gathers.
            flags = torch.tensor([mb.pixel_values is not None for mb, _ in out], dtype=torch.long)
            if not torch.equal(self._all_reduce(flags.clone(), "max"),
                               self._all_reduce(flags.clone(), "min")):
                raise UserError("learner.zero_stage 3 with several learner workers needs every "
                                "micro-batch position to hold images on all ranks or on none; "
                                "this batch mixes image and text-only micro-batches. Use "
                                "zero_stage 2, or give every sample of a VLM batch an image.")
        return out

    def _padding_share(self, micro: list[tuple[TrainBatch, bool]]) -> float:
        """The share of the positions the forward passes ran that were padding (all ranks)."""
        real = [mb for mb, is_real in micro if is_real]
        counts = torch.tensor([sum(float(mb.attention_mask.sum()) for mb in real),
                               sum(float(mb.attention_mask.numel()) for mb in real)],
                              dtype=torch.float64)
        tokens, positions = self._all_reduce(counts).tolist()
        return 1.0 - tokens / positions if positions else 0.0

    def _all_reduce(self, values: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """All-reduce a small CPU tensor of float64 (or int64) over the learner ranks."""
        import torch.distributed as dist

        if self.world_size == 1:
            return values
        reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                     "min": dist.ReduceOp.MIN}[op]
        out = values.to(self.device)
        dist.all_reduce(out, op=reduce_op)
        return out.cpu()

    # ------------------------------------------------------------------------ log-probs
    def _token_logprobs(self, scorer, mb: TrainBatch, with_entropy: bool = False):
        """[B, T] log-probs (and entropies) of a micro-batch; ``scorer`` a :class:`Scorer`
        or a DeepSpeed engine around one."""
        return scorer(mb.input_ids, mb.attention_mask, mb.num_completion_tokens,
                      with_entropy=with_entropy, model_inputs=mb.model_inputs())

    @torch.no_grad()
    def logprobs(self, batch: TrainBatch, *, temperature: float | None = None) -> torch.Tensor:
        """Log-probs of the completion tokens under the current policy, [B, T] float32.

        ``temperature`` None: the training temperature; 1.0 gives raw log-probs (what the
        rollout engines' ``score`` returns, for sync verification).
        """
        self.engine.eval()
        scorer = self.engine.module
        trained = scorer.temperature
        scorer.temperature = trained if temperature is None else temperature
        try:
            return self._run_no_grad(self.engine, batch)
        finally:
            scorer.temperature = trained

    def _run_no_grad(self, model, batch: TrainBatch, device: torch.device | None = None
                     ) -> torch.Tensor:
        device = device or self.device
        parts, T = [], batch.num_completion_tokens
        for mb, real in self._micro_batches(batch):
            lp = self._token_logprobs(model, mb.to(device)).float().to(self.device)
            if real:  # trimmed micro-batches: back to the batch's completion width
                parts.append(lp if lp.dim() == 1 else  # values [b] of a value head
                             torch.nn.functional.pad(lp, (0, T - lp.shape[1])))
        return torch.cat(parts)

    @torch.no_grad()
    def ref_logprobs(self, batch: TrainBatch) -> torch.Tensor | None:
        """Log-probs under the reference policy, [B, T] float32; None without one."""
        if self.reference is Reference.NONE:
            return None
        if self.reference is Reference.ADAPTERS:
            self.engine.eval()
            with self.model.disable_adapter():
                return self._run_no_grad(self.engine, batch)
        if self.reference is Reference.CPU:
            return self._run_no_grad(self.ref_model, batch, torch.device("cpu"))
        return self._run_no_grad(self.ref_model, batch)

    # ------------------------------------------------------------------------- training
    def _weights(self, micro: list[tuple[TrainBatch, bool]]) -> list[float]:
        """Each micro-batch's share of the global loss (all ranks' shares sum to 1).

        ``policy_loss`` normalises within the micro-batch it sees; scaling by these shares
        turns the sum of micro-batch losses into the loss of the global batch.
        """
        agg = self.loss_options["agg"]
        sizes = []
        for mb, real in micro:
            if agg == "token_mean":
                size = float(mb.completion_mask.sum()) if real else 0.0
            else:  # seq_mean and seq_sum_norm (a constant length) normalise per sample
                size = float(mb.size) if real else 0.0
            sizes.append(size)
        total = self._all_reduce(torch.tensor([sum(sizes)], dtype=torch.float64))[0].item()
        return [s / total if total > 0 else 0.0 for s in sizes]

    def train_step(self, batch: TrainBatch, *, ppo_epochs: int = 1,
                   policy_version: int | None = None) -> dict[str, float]:
        """PPO epochs over ``batch`` (this rank's shard), one optimiser step per epoch.

        Old log-probs (the clip's anchor) are ``batch.old_logprobs`` when the caller set them;
        else, with ``old_logprobs="rollout"``, the engine's; with "recompute", the current
        policy's before the first update (with one PPO epoch, the detached log-probs of the
        policy-gradient pass itself), except for rows sampled by an older policy than
        ``policy_version`` (the version of the learner's current weights; async mode): the
        learner no longer holds those weights, so such rows keep the rollout's log-probs
        unless a ``correction`` re-weights them by pi_old / pi_rollout instead.
        Returns the global batch's metrics, averaged over epochs: loss, grad_norm, lr,
        ``policy_loss``'s metrics (weighted like the loss; ``*max`` / ``*min`` keys reduced
        by max / min) and ``rollout_mismatch/*`` when rollout log-probs are there.
        """
        from medrl.align.grpo import policy_loss, rollout_correction

        batch = batch.to(self.device)
        rollout, correcting = batch.rollout_logprobs, self.correction["mode"] != "none"
        if correcting and rollout is None:
            raise UserError("algorithm.rollout_correction needs the rollout's log-probs, but the "
                            "samples carry none.")
        given = batch.old_logprobs is not None  # set by the caller: used as they are
        if not given and self.old_logprobs == "rollout":
            if rollout is None:
                raise UserError("algorithm.old_logprobs is rollout, but the samples carry no "
                                "rollout log-probs; set old_logprobs: recompute.")
            batch.old_logprobs = rollout
        # With one PPO epoch no weight changes before every micro-batch has run, so the
        # detached log-probs of the policy-gradient pass are the recomputation itself: no
        # extra forward pass. More epochs recompute once, before the first update.
        from_forward = not given and self.old_logprobs == "recompute" and ppo_epochs == 1
        if not given and self.old_logprobs == "recompute" and not from_forward:
            batch.old_logprobs = self.logprobs(batch)
        recomputed = not given and self.old_logprobs == "recompute"
        ref = self.ref_logprobs(batch)  # also reported as "kl" when its coefficient is 0
        micro = self._micro_batches(batch)
        # Reference log-probs per micro-batch (its rows, its trimmed completion width);
        # padding micro-batches repeat the first one.
        refs, start = [], 0
        for mb, real in micro:
            if ref is None or not real:
                refs.append(refs[0] if refs else None)
                continue
            refs.append(ref[start:start + mb.size, :mb.num_completion_tokens])
            start += mb.size
        shares = self._weights(micro)
        # sum |log pi_old - log pi_rollout| and tokens; pi_old is the same in every epoch, so
        # summing over epochs leaves the mean as it is
        mismatch = torch.zeros(2, dtype=torch.float64)

        def loss_of(i: int, mb: TrainBatch):
            logprobs, entropy = self._token_logprobs(self.engine, mb, with_entropy=True)
            logprobs = logprobs.float()
            old, weights, extra = mb.old_logprobs, mb.token_weights, {}
            if recomputed:
                old = logprobs.detach() if from_forward else mb.old_logprobs  # the learner's own
                if rollout is not None and micro[i][1]:
                    keep = mb.completion_mask.bool()
                    mismatch.add_(torch.tensor([(old - mb.rollout_logprobs).abs()[keep].sum()
                                                .item(), float(keep.sum())], dtype=torch.float64))
                if correcting:  # pi_old anchors the clip; rho = pi_old / pi_rollout weights
                    w, extra = rollout_correction(old, mb.rollout_logprobs, mb.completion_mask,
                                                  **self.correction)
                    weights = w if weights is None else weights * w
                elif (rollout is not None and policy_version is not None
                      and mb.policy_versions is not None):
                    stale = mb.policy_versions != policy_version  # sampled by an older policy
                    old = torch.where(stale[:, None], mb.rollout_logprobs, old)
            loss, metrics = policy_loss(
                logprobs, old, mb.advantage_tensor(), mb.completion_mask,
                ref_logprobs=refs[i], token_weights=weights, entropy=entropy,
                **self.loss_options)
            return loss, {**metrics, **extra}

        summed: dict[str, float] = {}
        extremes: dict[str, float] = {}
        for _ in range(ppo_epochs):
            # No dropout in the policy-gradient pass: the ratio must compare pi_theta with
            # pi_old as the same function (old log-probs are computed without dropout too).
            self._optimizer_step(micro, shares, loss_of, summed, extremes, dropout=False)
        out = self._reduce_metrics(summed, extremes, ppo_epochs)
        out["batch/padding_share"] = self._padding_share(micro)
        if recomputed and rollout is not None:
            total = self._all_reduce(mismatch)
            out["rollout_mismatch/logprob_abs_diff"] = (total[0] / total[1].clamp(min=1)).item()
        return out

    # ------------------------------------------------- other losses (SFT, QAT stages)
    def train_step_with(self, loss_fn: Callable[[torch.Tensor, TrainBatch], tuple[torch.Tensor, dict]],
                        batch: TrainBatch, *, size_fn: Callable[[TrainBatch], float]
                        ) -> dict[str, float]:
        """One optimiser step over ``batch`` with a loss other than GRPO's. Collective.

        ``loss_fn(logprobs, mb) -> (loss, metrics)`` gets the [B, T] log-probs of a
        micro-batch's completion tokens (at the learner's temperature) and returns the loss
        *normalised within that micro-batch*; ``size_fn(mb)`` is the micro-batch's size in the
        global normaliser (e.g. its summed token weights). Losses are scaled by their share of
        the global size, so the update equals one pass over the whole batch on all ranks, with
        the same accumulation, clipping and schedule as :meth:`train_step`. Returns the global
        ``loss``, ``loss_fn``'s metrics (weighted like the loss), ``grad_norm`` and ``lr``.
        A ``loss_fn`` with a ``model_forward(policy, input_ids, attention_mask, T, **images)``
        gets its output instead, run inside the engine's forward (the distill stage).
        """
        forward = getattr(loss_fn, "model_forward", None)
        batch = batch.to(self.device)
        micro = self._micro_batches(batch)
        sizes = [float(size_fn(mb)) if real else 0.0 for mb, real in micro]
        total = self._all_reduce(torch.tensor([sum(sizes)], dtype=torch.float64))[0].item()
        shares = [s / total if total > 0 else 0.0 for s in sizes]
        summed: dict[str, float] = {}
        extremes: dict[str, float] = {}
        self._optimizer_step(
            micro, shares, lambda i, mb: loss_fn(
                self._token_logprobs(self.engine, mb).float() if forward is None else
                self.engine(mb.input_ids, mb.attention_mask, mb.num_completion_tokens,
                            model_inputs=mb.model_inputs(), fn=forward), mb),
            summed, extremes, dropout=True)
        return self._reduce_metrics(summed, extremes, 1)

    # ------------------------------------------------------- the shared optimiser step
    def _optimizer_step(self, micro: list[tuple[TrainBatch, bool]], shares: list[float],
                        loss_of: Callable[[int, TrainBatch], tuple[torch.Tensor, dict]],
                        summed: dict[str, float], extremes: dict[str, float], *,
                        dropout: bool) -> None:
        """Backward every micro-batch's loss scaled by its share, then one optimiser step;
        metrics are added into ``summed`` / ``extremes`` (see :func:`_tally`). ``dropout``:
        whether dropout layers (LoRA's included) are active; the rest is in training mode."""
        self.engine.train()
        if not dropout:
            for module in self.engine.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.eval()
        lr = self.scheduler.get_last_lr()[0]
        for i, ((mb, real), share) in enumerate(zip(micro, shares)):
            self.engine.set_gradient_accumulation_boundary(i == len(micro) - 1)
            loss, metrics = loss_of(i, mb)
            # DeepSpeed averages gradients over ranks: scale up by the world size.
            self.engine.backward(loss * (share * self.world_size), scale_wrt_gas=False)
            _tally(summed, extremes, {"loss": loss.item(), **metrics}, share, real)
        grad_norm = self._stage0_grad_norm() if self.zero_stage == 0 else None
        self.engine.step()
        if grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm()
        # grad_norm and lr are the same on every rank: divided so that the all-reduced sum
        # in _reduce_metrics is the value.
        summed["grad_norm"] = summed.get("grad_norm", 0.0) + float(
            grad_norm if grad_norm is not None else float("nan")) / self.world_size
        summed["lr"] = summed.get("lr", 0.0) + lr / self.world_size

    def _reduce_metrics(self, summed: dict[str, float], extremes: dict[str, float],
                        steps: int) -> dict[str, float]:
        """Global metrics over ranks, averaged over ``steps`` optimiser steps."""
        keys = sorted(summed)
        total = self._all_reduce(torch.tensor([summed[k] for k in keys], dtype=torch.float64))
        out = {k: v / steps for k, v in zip(keys, total.tolist())}
        for key in sorted(extremes):
            op = "max" if key.endswith("max") else "min"
            value = torch.tensor([extremes[key]], dtype=torch.float64)
            out[key] = self._all_reduce(value, op)[0].item()
            if not math.isfinite(out[key]):  # no micro-batch had a token (all masked out)
                del out[key]
        return out

    def _stage0_grad_norm(self) -> float:
        """Without ZeRO, DeepSpeed clips but does not keep the norm: measure it before the step."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))) if grads else 0.0

    # ------------------------------------------------- weights out and in (learner_state)
    def state_dict_for_sync(self, bucket_mb: float = 256
                            ) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """The full weights, bucket by bucket (:func:`learner_state.state_dict_for_sync`)."""
        return learner_state.state_dict_for_sync(self, bucket_mb)

    def adapter_for_sync(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The LoRA adapter alone, ``(tensors, config)`` as a PEFT adapter folder holds them
        (:func:`learner_state.adapter_for_sync`); collective under ZeRO-3."""
        return learner_state.adapter_for_sync(self)

    def save(self, out_dir: str | Path) -> None:
        """Write ``policy/``, ``learner/`` and (LoRA) ``adapter/``; collective
        (:func:`learner_state.save`)."""
        learner_state.save(self, out_dir)

    def load(self, out_dir: str | Path) -> None:
        """Restore what :meth:`save` wrote; collective (:func:`learner_state.load`)."""
        learner_state.load(self, out_dir)


def _tally(summed: dict, extremes: dict, metrics: dict, share: float, real: bool) -> None:
    """Add one micro-batch's metrics: weighted by its loss share, ``tokens`` counted, and
    ``*_max`` / ``*_min`` kept as extremes (padding micro-batches count for nothing)."""
    for key, value in metrics.items():
        value = float(value)
        if key.endswith(("max", "min")):
            if real:
                pick = max if key.endswith("max") else min
                extremes[key] = pick(extremes.get(key, value), value)
        else:
            weight = (1.0 if real else 0.0) if key == "tokens" else share
            summed[key] = summed.get(key, 0.0) + value * weight
