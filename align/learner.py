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
   rollout engines.
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

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from medrl.align.batch import TrainBatch, collate
from medrl.align.distributed import (LRSchedule, WeightsOnlyCheckpointEngine, deepspeed_config,
                                     free_port, init_distributed)
from medrl.align.models import is_vision_model, load_model, load_tokenizer
from medrl.align.records import Sample, UserError

TAG = "state"  # the DeepSpeed checkpoint tag inside learner/
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


class Learner:
    """A DeepSpeed ZeRO policy learner (see the module docstring for its life cycle).

    ``total_steps`` and ``warmup_steps`` count optimiser steps (train steps x PPO epochs).
    ``dtype`` defaults to bf16 on GPU and fp32 on CPU. ``ref_model``: ``auto`` is none when
    ``kl_coef == 0``, else a frozen copy beside the policy (a forward-only ZeRO-3 engine under
    ZeRO-3); ``cpu`` keeps a whole frozen copy on the CPU (its KL is reported even when
    ``kl_coef == 0``); with LoRA the reference is the policy with its adapters switched off.
    ``lora``: ``{"r", "alpha", "dropout", "target_modules"}``. Loss options are those of
    :func:`medrl.align.grpo.policy_loss` (``loss_agg`` is its ``agg``). ``prepare_model(model)``
    runs on the freshly loaded Hugging Face model before LoRA and DeepSpeed wrap it (the QAT
    stage swaps in fake-quantised layers there). ``share_prompt``: rows of a micro-batch that
    share a prompt run it once (:func:`medrl.align.logprobs.token_logprobs`).
    """

    def __init__(self, model_dir: str | Path, *, zero_stage: int = 2,
                 offload_optimizer: bool = False, micro_batch_size: int = 4,
                 optimizer: str = "adamw", lr: float = 1e-5, weight_decay: float = 0.0,
                 betas: Sequence[float] = (0.9, 0.999), warmup_steps: int = 0,
                 total_steps: int = 1000, lr_schedule: str = "cosine", min_lr_ratio: float = 0.0,
                 max_grad_norm: float = 1.0, gradient_checkpointing: bool = False,
                 logprob_chunk_size: int = 1024, share_prompt: bool = True,
                 temperature: float = 1.0, ref_model: str = "auto",
                 lora: dict[str, Any] | None = None,
                 dtype: torch.dtype | None = None, clip_low: float = 0.2, clip_high: float = 0.2,
                 kl_coef: float = 0.0, kl_estimator: str = "k3", loss_agg: str = "token_mean",
                 seed: int = 0, prepare_model: Callable[[torch.nn.Module], Any] | None = None):
        import deepspeed
        import torch.distributed as dist
        from deepspeed.accelerator import get_accelerator

        if zero_stage not in (0, 1, 2, 3):
            raise UserError(f"learner.zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}.")
        if optimizer not in ("adamw", "deepspeed_adam"):
            raise UserError("learner.optimizer must be adamw or deepspeed_adam, "
                            f"got {optimizer!r}.")
        if ref_model not in ("auto", "cpu", "none"):
            raise UserError(f"learner.ref_model must be auto, cpu or none, got {ref_model!r}.")
        if kl_coef > 0 and ref_model == "none":
            raise UserError("algorithm.kl.coef > 0 needs a reference model, but learner.ref_model "
                            "is none; set ref_model: auto (or cpu), or the KL coefficient to 0.")
        if not dist.is_initialized():
            init_distributed(0, 1, "127.0.0.1", free_port())
        self.model_dir = Path(model_dir)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.zero_stage, self.micro_batch_size = zero_stage, micro_batch_size
        self.temperature, self.logprob_chunk_size = temperature, logprob_chunk_size
        self.loss_options = dict(clip_low=clip_low, clip_high=clip_high, kl_coef=kl_coef,
                                 kl_estimator=kl_estimator, agg=loss_agg)
        self.lora = dict(lora) if lora else None
        self.on_gpu = get_accelerator().device_name() != "cpu"
        self.device = torch.device(get_accelerator().current_device_name()
                                   if self.on_gpu else "cpu")
        self.dtype = dtype or (torch.bfloat16 if self.on_gpu else torch.float32)
        torch.manual_seed(seed)

        self.tokenizer = load_tokenizer(self.model_dir)  # a processor for VLMs
        self.is_vlm = is_vision_model(self.model_dir)
        tok = self.tokenizer.tokenizer if self.is_vlm else self.tokenizer
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

        self.ds_config = deepspeed_config(
            zero_stage=zero_stage, micro_batch_size=micro_batch_size, dtype=self.dtype,
            max_grad_norm=max_grad_norm, offload_optimizer=offload_optimizer, optimizer=optimizer,
            lr=lr, betas=betas, weight_decay=weight_decay)

        self.ref_mode = self._resolve_ref_mode(ref_model, kl_coef)
        scorer = dict(temperature=temperature, chunk_size=logprob_chunk_size,
                      share_prompt=share_prompt)
        self.ref_model = self._load_reference(scorer) if self.ref_mode in ("cpu", "copy") else None
        with self._partitioned_loading():
            model = load_model(self.model_dir, dtype=self.dtype)
        if prepare_model is not None:  # e.g. fake quantisation: before PEFT and DeepSpeed wrap it
            prepare_model(model)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        if self.lora:
            from peft import LoraConfig, get_peft_model

            torch.manual_seed(seed)  # the adapters' initial values do not depend on the above

            model = get_peft_model(model, LoraConfig(
                r=int(self.lora.get("r", 8)), lora_alpha=float(self.lora.get("alpha", 16.0)),
                lora_dropout=float(self.lora.get("dropout", 0.0)),
                target_modules=list(self.lora.get("target_modules",
                                                  ["q_proj", "k_proj", "v_proj", "o_proj"]))))
        self.model = model
        params = [p for p in model.parameters() if p.requires_grad]
        torch_opt = None
        if optimizer == "adamw":
            torch_opt = torch.optim.AdamW(params, lr=lr, betas=tuple(betas),
                                          weight_decay=weight_decay)
        schedule = LRSchedule(warmup_steps, total_steps, lr_schedule, min_lr_ratio)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=_Scorer(model, **scorer), model_parameters=params, optimizer=torch_opt,
            config=self.ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))

    # ----------------------------------------------------------------------------- set-up
    def _resolve_ref_mode(self, ref_model: str, kl_coef: float) -> str:
        """none | adapters (LoRA switched off) | cpu (whole copy on CPU) | copy (beside policy).

        ``ref_model``: "auto" (none when kl_coef is 0), "none", "cpu" or "copy" (wanted even
        with kl_coef 0 when the KL lives in the reward).
        """
        if ref_model == "none" or (ref_model == "auto" and kl_coef == 0):
            return "none"
        if self.lora:
            return "adapters"
        return "cpu" if ref_model == "cpu" else "copy"

    def _load_reference(self, scorer: dict) -> torch.nn.Module:
        """A frozen copy of the starting policy: on the CPU ("cpu"), as a forward-only ZeRO-3
        engine under ZeRO-3, else beside the policy. The CPU copy loads whole."""
        import deepspeed

        on_cpu = self.ref_mode == "cpu"
        with contextlib.nullcontext() if on_cpu else self._partitioned_loading():
            ref = _Scorer(load_model(self.model_dir, dtype=self.dtype), **scorer)
        ref.eval()
        ref.requires_grad_(False)
        if on_cpu:
            return ref
        if self.zero_stage != 3:
            return ref.to(self.device)
        config = {k: v for k, v in self.ds_config.items()
                  if k not in ("optimizer", "gradient_clipping")}
        engine, *_ = deepspeed.initialize(model=ref, config=config)
        engine.eval()
        return engine

    @contextlib.contextmanager
    def _partitioned_loading(self):
        """Under ZeRO-3, make ``from_pretrained`` partition weights while it loads them.

        transformers reads a process-wide (weakly held) DeepSpeed config; it is set only for
        the duration of the loads so that other models in the process load whole.
        """
        if self.zero_stage != 3:
            yield
            return
        from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

        hf_config = HfDeepSpeedConfig(self.ds_config)  # registers itself while alive
        try:
            yield
        finally:
            unset_hf_deepspeed_config()
            del hf_config

    # ------------------------------------------------------------------------- batches
    def collate(self, samples: Sequence[Sample]) -> TrainBatch:
        """Samples -> :class:`TrainBatch` with this policy's pad id and image processor."""
        return collate(samples, pad_token_id=self.pad_token_id,
                       processor=self.tokenizer if self.is_vlm else None)

    def _micro_batches(self, batch: TrainBatch) -> list[tuple[TrainBatch, bool]]:
        """Micro-batches as ``(batch, real)``; padded to the same count on every rank.

        ZeRO-3 gathers weights inside each forward pass and ZeRO-2 reduces gradients inside
        each backward pass, so every rank must run as many as the busiest rank. Extra ones
        repeat the first micro-batch and carry zero weight.
        """
        micro = batch.split(self.micro_batch_size)
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
        """[B, T] log-probs (and entropies) of a micro-batch; ``scorer`` a :class:`_Scorer`
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
        parts = []
        for mb, real in self._micro_batches(batch):
            lp = self._token_logprobs(model, mb.to(device)).float().to(self.device)
            if real:
                parts.append(lp)
        return torch.cat(parts)

    @torch.no_grad()
    def ref_logprobs(self, batch: TrainBatch) -> torch.Tensor | None:
        """Log-probs under the reference policy, [B, T] float32; None without one."""
        if self.ref_mode == "none":
            return None
        if self.ref_mode == "adapters":
            self.engine.eval()
            with self.model.disable_adapter():
                return self._run_no_grad(self.engine, batch)
        if self.ref_mode == "cpu":
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
            else:  # seq_mean: samples; seq_sum_norm: samples x padded length
                size = float(mb.size) if real else 0.0
            sizes.append(size)
        total = self._all_reduce(torch.tensor([sum(sizes)], dtype=torch.float64))[0].item()
        if agg == "seq_sum_norm":  # the global padded length normalises every sequence
            t_local = torch.tensor([micro[0][0].num_completion_tokens], dtype=torch.float64)
            t_max = self._all_reduce(t_local, "max")[0].item()
            return [s * mb.num_completion_tokens / (total * t_max) for s, (mb, _) in
                    zip(sizes, micro)]
        return [s / total if total > 0 else 0.0 for s in sizes]

    def train_step(self, batch: TrainBatch, *, ppo_epochs: int = 1,
                   recompute_old_logprobs: bool = False) -> dict[str, float]:
        """PPO epochs over ``batch`` (this rank's shard), one optimiser step per epoch.

        Old log-probs are ``batch.old_logprobs`` (the rollout's) unless absent or
        ``recompute_old_logprobs``, then the current policy's before the first update.
        Returns the global batch's metrics, averaged over epochs: loss, grad_norm, lr and
        ``policy_loss``'s metrics (weighted like the loss; ``*max`` / ``*min`` keys reduced
        by max / min).
        """
        from medrl.align.grpo import policy_loss

        batch = batch.to(self.device)
        if batch.old_logprobs is None or recompute_old_logprobs:
            batch.old_logprobs = self.logprobs(batch)
        ref = self.ref_logprobs(batch)  # also reported as "kl" when its coefficient is 0
        micro = self._micro_batches(batch)
        # Reference log-probs per micro-batch; padding micro-batches repeat the first one.
        refs = list(ref.split(self.micro_batch_size)) if ref is not None else [None]
        refs += [refs[0]] * (len(micro) - len(refs))
        shares = self._weights(micro)

        def loss_of(i: int, mb: TrainBatch):
            logprobs, entropy = self._token_logprobs(self.engine, mb, with_entropy=True)
            return policy_loss(
                logprobs.float(), mb.old_logprobs, mb.advantage_tensor(), mb.completion_mask,
                ref_logprobs=refs[i], token_weights=mb.token_weights, entropy=entropy,
                **self.loss_options)

        summed: dict[str, float] = {}
        extremes: dict[str, float] = {}
        for _ in range(ppo_epochs):
            self._optimizer_step(micro, shares, loss_of, summed, extremes)
        return self._reduce_metrics(summed, extremes, ppo_epochs)

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
        """
        batch = batch.to(self.device)
        micro = self._micro_batches(batch)
        sizes = [float(size_fn(mb)) if real else 0.0 for mb, real in micro]
        total = self._all_reduce(torch.tensor([sum(sizes)], dtype=torch.float64))[0].item()
        shares = [s / total if total > 0 else 0.0 for s in sizes]
        summed: dict[str, float] = {}
        extremes: dict[str, float] = {}
        self._optimizer_step(
            micro, shares, lambda i, mb: loss_fn(self._token_logprobs(self.engine, mb).float(), mb),
            summed, extremes)
        return self._reduce_metrics(summed, extremes, 1)

    # ------------------------------------------------------- the shared optimiser step
    def _optimizer_step(self, micro: list[tuple[TrainBatch, bool]], shares: list[float],
                        loss_of: Callable[[int, TrainBatch], tuple[torch.Tensor, dict]],
                        summed: dict[str, float], extremes: dict[str, float]) -> None:
        """Backward every micro-batch's loss scaled by its share, then one optimiser step;
        metrics are added into ``summed`` / ``extremes`` (see :func:`_tally`)."""
        self.engine.train()
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
        return out

    def _stage0_grad_norm(self) -> float:
        """Without ZeRO, DeepSpeed clips but does not keep the norm: measure it before the step."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))) if grads else 0.0

    # ------------------------------------------------------------------------- weights
    def _gathered(self, params: list[torch.nn.Parameter]):
        """Under ZeRO-3, the full values of ``params`` inside the block (collective)."""
        if self.zero_stage != 3:
            return contextlib.nullcontext()
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        return GatheredParameters(params, modifier_rank=None)

    def _sync_entries(self) -> list[tuple[str, torch.nn.Parameter, torch.nn.Module | None]]:
        """(HF name, parameter, LoRA layer whose delta is added or None), in model order.

        With LoRA the adapter parameters are left out and the base weights are renamed from
        ``base_model.model.<name>.base_layer.weight`` to ``<name>.weight``.
        """
        if not self.lora:
            return [(name, p, None) for name, p in self.model.named_parameters()]
        from peft.tuners.lora import LoraLayer

        layers = {name: m for name, m in self.model.named_modules() if isinstance(m, LoraLayer)}
        out = []
        for name, p in self.model.named_parameters():
            if ".lora_" in name or "lora_embedding" in name:
                continue
            owner, _, leaf = name.rpartition(".")
            layer = None
            if owner.endswith(".base_layer") and leaf == "weight":
                layer = layers.get(owner[: -len(".base_layer")])
            hf_name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
            out.append((hf_name, p, layer))
        return out

    def state_dict_for_sync(self, bucket_mb: float = 256
                            ) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """The policy's full weights in Hugging Face naming, bucket by bucket (CPU tensors).

        Collective under ZeRO-3: every rank iterates to the end, and only the weights of one
        bucket are gathered at a time. LoRA deltas are merged into their base weights. Tied
        weights appear once (under the name ``named_parameters`` gives them).
        """
        limit = bucket_mb * 2**20
        bucket: list[tuple[str, torch.nn.Parameter, Any]] = []
        size = 0

        def flush():
            params = [p for _, p, _ in bucket]
            for _, _, layer in bucket:
                if layer is not None:
                    params += [p for n, p in layer.named_parameters() if "lora_" in n]
            with self._gathered(params), torch.no_grad():
                out = []
                for name, p, layer in bucket:
                    value = p.detach()
                    if layer is not None:
                        for adapter in layer.active_adapters:
                            value = value + layer.get_delta_weight(adapter).to(value.dtype)
                    out.append((name, value.to("cpu", copy=True)))
            return out

        for entry in self._sync_entries():
            p = entry[1]
            size += getattr(p, "ds_numel", p.numel()) * p.element_size()
            bucket.append(entry)
            if size >= limit:
                yield flush()
                bucket, size = [], 0
        if bucket:
            yield flush()

    # ------------------------------------------------------------------- checkpoints
    def save(self, out_dir: str | Path) -> None:
        """Write ``policy/``, ``learner/`` and (LoRA) ``adapter/`` under ``out_dir``. Collective.

        ``policy/`` holds merged weights: ``from_pretrained`` loads it as it is.
        """
        import torch.distributed as dist
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        full: dict[str, torch.Tensor] = {}
        for bucket in self.state_dict_for_sync():
            if self.rank == 0:
                full.update(bucket)
        if self.rank == 0:
            self._write_policy(out_dir / "policy", full)
        del full
        if self.lora:
            self._write_adapter(out_dir / "adapter")
        learner_dir = out_dir / "learner"
        self.engine.save_checkpoint(str(learner_dir), tag=TAG, save_latest=False)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, str(learner_dir / f"rng-rank{self.rank}.safetensors"))
        if self.rank == 0:
            (learner_dir / "learner.json").write_text(json.dumps({
                "world_size": self.world_size, "zero_stage": self.zero_stage,
                "lora": self.lora, "global_steps": self.engine.global_steps}, indent=1))
        dist.barrier()

    def _hf_model(self) -> torch.nn.Module:
        """The Hugging Face model inside the (PEFT-wrapped) policy."""
        return self.model.get_base_model() if self.lora else self.model

    def _write_policy(self, policy_dir: Path, state: dict[str, torch.Tensor]) -> None:
        """save_pretrained with the gathered weights, plus the tokenizer/processor files."""
        policy_dir.mkdir(parents=True, exist_ok=True)
        self._hf_model().save_pretrained(policy_dir, state_dict=state, safe_serialization=True)
        for src in self.model_dir.iterdir():
            if (src.is_file() and not src.name.endswith(WEIGHT_FILES)
                    and not (policy_dir / src.name).exists()):
                shutil.copy2(src, policy_dir / src.name)

    def _write_adapter(self, adapter_dir: Path) -> None:
        with self._gathered([p for n, p in self.model.named_parameters() if "lora_" in n]):
            if self.rank == 0:
                self.model.save_pretrained(adapter_dir, safe_serialization=True)

    def load(self, out_dir: str | Path) -> None:
        """Restore the optimiser, schedule, weights and RNG saved by :meth:`save`. Collective.

        Build the learner with the same settings and number of ranks first.
        """
        from safetensors.torch import load_file

        learner_dir = Path(out_dir) / "learner"
        meta_path = learner_dir / "learner.json"
        if not meta_path.is_file():
            raise UserError(f"{learner_dir}: no learner.json; this is not a learner checkpoint "
                            "written by medrl (or it was not finished).")
        meta = json.loads(meta_path.read_text())
        lora = json.loads(json.dumps(self.lora))  # as saved (tuples become lists)
        for key, mine in (("world_size", self.world_size), ("zero_stage", self.zero_stage),
                          ("lora", lora)):
            if meta.get(key) != mine:
                raise UserError(f"{learner_dir}: saved with {key}={meta.get(key)!r}, but this "
                                f"learner has {key}={mine!r}; resume with the same learner "
                                "settings and number of learner workers.")
        if not isinstance(self.engine.checkpoint_engine, WeightsOnlyCheckpointEngine):
            self.engine.checkpoint_engine = WeightsOnlyCheckpointEngine(
                self.engine.checkpoint_engine)
        path, _ = self.engine.load_checkpoint(str(learner_dir), tag=TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise UserError(f"{learner_dir}: DeepSpeed found no checkpoint tagged {TAG!r}.")
        rng = load_file(str(learner_dir / f"rng-rank{self.rank}.safetensors"))
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])


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


class _Scorer(torch.nn.Module):
    """The policy behind one ``forward`` that returns completion log-probs.

    DeepSpeed hooks its ZeRO bookkeeping (gradient accumulation, ZeRO-3 gathering) onto the
    engine's forward, while ``token_logprobs`` calls the model's backbone and LM head
    separately; wrapping it in a module lets each micro-batch pass through the engine once.
    """

    def __init__(self, policy: torch.nn.Module, *, temperature: float, chunk_size: int,
                 share_prompt: bool):
        super().__init__()
        self.policy = policy
        self.temperature, self.chunk_size = temperature, chunk_size
        self.share_prompt = share_prompt

    def forward(self, input_ids, attention_mask, num_completion_tokens: int, *,
                with_entropy: bool = False, model_inputs: dict | None = None):
        from medrl.align.logprobs import token_logprobs

        return token_logprobs(self.policy, input_ids, attention_mask,
                              num_completion_tokens=num_completion_tokens,
                              temperature=self.temperature, chunk_size=self.chunk_size,
                              with_entropy=with_entropy, share_prompt=self.share_prompt,
                              **(model_inputs or {}))
