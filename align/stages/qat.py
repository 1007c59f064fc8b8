"""The QAT stage: full-precision warm-up, then HiF8 / E4M3 W8A8 fake-quantised training.

It is the SFT loop (:func:`medrl.align.stages.sft.run_stage`, same loss, data, checkpoints and
resume) with :class:`QATHooks` plugged in:

- every ``nn.Linear`` but the LM head becomes a :class:`~medrl.align.qat.QATLinear` before
  DeepSpeed wraps the model; quantisation is off for steps ``1..warmup_steps`` (the scalers
  still observe, so their amax histories are warm) and on from step ``warmup_steps + 1``, when
  the base learning rate also switches from ``learner.lr`` to ``qat_lr`` (the warm-up +
  cosine factor of the learner's schedule still applies);
- delayed scaling counts optimiser steps: each scale is frozen for the step, and after it
  the step's amax (the max over its micro-batches; a forward recomputed by gradient
  checkpointing repeats one of them exactly) enters the history
  (:func:`~medrl.align.qat.end_qat_step`);
- amax saturation: after each step the share of values clipped at the format maximum (the
  largest over the step's micro-batches), per layer type (``qat/clip/<group>/<weight|input>``,
  ``qat/clip/max``); when quantisation is on and ``qat/clip/max`` exceeds
  ``clip_warn_threshold`` a console warning is printed and ``qat/clip/warn`` is 1;
- forgetting: a knowledge probe (multiple-choice items) scored by the log-likelihood of each
  option letter after the prompt; the pick is the most likely letter. The full-precision
  starting checkpoint is scored once (``qat/probe/*_start``, logged at step 0); every
  ``probe_every`` steps the current model is scored as training runs it (fake-quantised once
  QAT is on), and ``qat/probe/accuracy_drop`` / ``qat/probe/gold_logprob_drop`` are start
  minus now (positive = knowledge lost);
- checkpoints also hold ``learner/qat_state.safetensors`` (every scaler's history and scale,
  restored exactly on resume), ``policy/qat/`` (the same state and ``qat.json``, so the
  exported Hugging Face folder carries its scales) and, with ``export_fake_quant``,
  ``policy_fake_quant/``: the policy with every quantised weight stored as
  quantise-dequantise(weight) under its current scale, i.e. what the training forward saw.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from medrl.align.records import Sample, UserError

QAT_STATE_FILE = "qat_state.safetensors"


# ------------------------------------------------------------------------ knowledge probe


@dataclass
class ProbeItem:
    """One multiple-choice probe question: its prompt and the ids of each option letter."""

    uid: str
    prompt_ids: list[int]
    letters: dict[str, list[int]]  # option letter -> its token ids
    gold: str
    images: list[Any]


def probe_items(tokenizer_or_processor, samples: Sequence[Sample],
                gold_letter: Callable[[dict], str | None]) -> list[ProbeItem]:
    """Rendered probe items; rows without a gold letter are skipped (unlabelled).

    gold_letter(row): the row's correct option letter, None when unlabelled; raises
    ``ValueError`` for a malformed row (the answer extractor, passed in by the caller).
    """
    from medrl.align.encode import encode_prompt, text_tokenizer

    tok = text_tokenizer(tokenizer_or_processor)
    items = []
    for s in samples:
        options = s.row.get("options") or {}
        try:
            gold = gold_letter(s.row)
        except ValueError as exc:
            raise UserError(f"qat.probe_path: sample {s.uid}: {exc}") from None
        if gold is None or len(options) < 2:
            continue
        letters = {k: list(tok(k, add_special_tokens=False)["input_ids"]) for k in options}
        items.append(ProbeItem(s.uid, encode_prompt(tokenizer_or_processor, s).prompt_ids[0],
                               letters, gold, list(s.images)))
    if not items:
        raise UserError("qat.probe_path: no probe row has options and a gold answer; the "
                        "knowledge probe needs multiple-choice rows (question, options, answer).")
    return items


@torch.no_grad()
def score_probe(learner, items: Sequence[ProbeItem], batch_size: int = 16) -> dict[str, float]:
    """Accuracy (most likely option letter == gold) and the mean gold-letter log-prob."""
    rows = [(item, letter, Sample(uid=f"{item.uid}:{letter}", group_id=item.uid,
                                  prompt_ids=item.prompt_ids, completion_ids=ids,
                                  images=item.images))
            for item in items for letter, ids in item.letters.items()]
    scores: dict[str, dict[str, float]] = {}
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        batch = learner.collate([s for _, _, s in chunk])
        lp = (learner.logprobs(batch, temperature=1.0).cpu() * batch.completion_mask).sum(-1)
        for (item, letter, _), value in zip(chunk, lp.tolist()):
            scores.setdefault(item.uid, {})[letter] = value
    correct = [max(scores[it.uid], key=scores[it.uid].get) == it.gold for it in items]
    return {"accuracy": sum(correct) / len(items),
            "gold_logprob": sum(scores[it.uid][it.gold] for it in items) / len(items)}


# ------------------------------------------------------------------------------ the hooks


class QATHooks:
    """The QAT stage's additions to the SFT loop (see the module docstring).

    ``gold_letter(row)``: the answer extractor that labels the probe rows (needed with
    ``probe_samples``; ``medrl.rewards.rules.gold_letter`` from the launcher).
    """

    def __init__(self, *, fmt: str = "hif8", warmup_steps: int = 500, qat_lr: float = 1e-5,
                 history: int = 64, reduction: str = "max", margin: int = 0,
                 clip_warn_threshold: float = 0.01, probe_samples: Sequence[Sample] = (),
                 probe_every: int = 0, export_fake_quant: bool = False, console=None,
                 gold_letter: Callable[[dict], str | None] | None = None):
        self.fmt, self.warmup_steps, self.qat_lr = fmt, warmup_steps, qat_lr
        self.history, self.reduction, self.margin = history, reduction, margin
        self.clip_warn_threshold = clip_warn_threshold
        self.probe_samples, self.probe_every = list(probe_samples), probe_every
        self.export_fake_quant = export_fake_quant
        self.console = console
        self.gold_letter = gold_letter
        if self.probe_samples and gold_letter is None:
            raise ValueError("gold_letter: needed to label the probe samples")
        self.learner = None
        self.items: list[ProbeItem] = []
        self.baseline: dict[str, float] | None = None

    # -- set-up
    def prepare_model(self, model: torch.nn.Module) -> None:
        from medrl.align.qat import enable_fake_quant, set_fake_quant

        enable_fake_quant(model, self.fmt, self.history, self.reduction, margin=self.margin,
                          sync_amax=torch.distributed.is_initialized()
                          and torch.distributed.get_world_size() > 1)
        set_fake_quant(model, False)

    def start(self, learner, resume_from: Path | None, state: dict | None) -> dict:
        """Restore the scalers (resume) or score the full-precision start (fresh run)."""
        from safetensors.torch import load_file

        from medrl.align.qat import load_qat_state_dict, set_fake_quant

        if learner.lora:
            raise UserError("the qat stage does not combine with learner.lora; train the "
                            "adapters in an sft stage and point model.policy at its run folder "
                            "(its policy/ holds merged weights).")
        self.learner = learner
        if self.probe_samples:
            self.items = probe_items(learner.tokenizer, self.probe_samples, self.gold_letter)
        if state is not None:
            path = Path(resume_from) / "learner" / QAT_STATE_FILE
            if not path.is_file():
                raise UserError(f"{path}: missing; this checkpoint was not written by the qat "
                                "stage, so its scaling state cannot be restored.")
            load_qat_state_dict(learner.model, load_file(str(path)))
            self.baseline = state.get("qat", {}).get("probe_start")
            return {}
        if not self.items:
            return {}
        set_fake_quant(learner.model, False)
        self.baseline = score_probe(learner, self.items)
        return {"metrics": {f"qat/probe/{k}_start": v for k, v in self.baseline.items()}}

    # -- every step
    def quantised(self, step: int) -> bool:
        return step > self.warmup_steps

    def before_step(self, step: int) -> None:
        from medrl.align.qat import set_fake_quant

        on = self.quantised(step)
        set_fake_quant(self.learner.model, on)
        if on:
            switch_base_lr(self.learner.scheduler, self.qat_lr)

    def after_step(self, step: int, metrics: dict[str, float]) -> None:
        from medrl.align.qat import clip_stats, end_qat_step

        end_qat_step(self.learner.model)  # the step's amaxes enter the histories (collective)
        on = self.quantised(step)
        stats = clip_stats(self.learner.model)
        metrics.update(stats)
        metrics["qat/enabled"] = float(on)
        warn = on and stats["qat/clip/max"] > self.clip_warn_threshold
        metrics["qat/clip/warn"] = float(warn)
        if warn and self.console is not None:
            worst = max((k for k in stats if k != "qat/clip/max"), key=stats.get)
            self.console.print(f"[yellow]warning:[/yellow] step {step}: {stats['qat/clip/max']:.2%}"
                               f" of values clipped at the {self.fmt} maximum (worst: {worst}); "
                               "above qat.clip_warn_threshold "
                               f"{self.clip_warn_threshold:.2%}. Use a shorter amax history or a "
                               "margin, or lower the learning rate.", highlight=False)
        if self.items and self.probe_every and step % self.probe_every == 0:
            now = score_probe(self.learner, self.items)
            for key, value in now.items():
                metrics[f"qat/probe/{key}"] = value
                if self.baseline:
                    metrics[f"qat/probe/{key}_drop"] = self.baseline[key] - value

    # -- checkpoints
    def state(self) -> dict:
        return {"qat": {"format": self.fmt, "warmup_steps": self.warmup_steps,
                        "probe_start": self.baseline}}

    def config(self) -> dict:
        return {"format": self.fmt, "amax_history": self.history,
                "amax_reduction": self.reduction, "margin": self.margin,
                "exclude": ["lm_head"]}

    def write(self, ckpt_dir: Path) -> None:
        """Write the scaling state (and the fake-quant export). Collective under ZeRO-3."""
        from safetensors.torch import save_file

        from medrl.align.qat import qat_state_dict

        # Every rank takes part in gathering the partitioned weights; rank 0 writes.
        weights = fake_quant_weights(self.learner) if self.export_fake_quant else None
        if self.learner.rank != 0:
            return
        state = qat_state_dict(self.learner.model)
        save_file(state, str(ckpt_dir / "learner" / QAT_STATE_FILE))
        # Beside the exported weights, in a subfolder: loaders that take every top-level
        # *.safetensors file as weights (vLLM) must not see it.
        qat_dir = ckpt_dir / "policy" / "qat"
        qat_dir.mkdir(parents=True, exist_ok=True)
        save_file(state, str(qat_dir / "scales.safetensors"))
        (qat_dir / "qat.json").write_text(json.dumps(self.config(), indent=1))
        if weights is not None:
            export_fake_quant(weights, ckpt_dir / "policy", ckpt_dir / "policy_fake_quant")


def switch_base_lr(scheduler, lr: float) -> None:
    """Make ``lr`` the base learning rate of a LambdaLR schedule from now on (idempotent).

    The current factor is kept: every group's lr becomes ``lr * factor(step)``. The base lrs
    are part of the schedule's saved state, so a resumed run keeps the switched value.
    """
    if all(base == lr for base in scheduler.base_lrs):
        return
    factors = [group["lr"] / base if base else 0.0
               for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs)]
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    for group, factor in zip(scheduler.optimizer.param_groups, factors):
        group["lr"] = lr * factor
    # get_last_lr() reports this list; LambdaLR refreshes it only on its next step.
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


@torch.no_grad()
def fake_quant_weights(learner) -> dict[str, torch.Tensor]:
    """{"<layer>.weight": fake_quantize(weight, fmt, its current scale)} for every quantised
    layer, on the CPU: what the training forward sees; empty on ranks other than 0. Collective:
    under ZeRO-3 each weight is gathered from its partitions in turn (every rank calls this)."""
    from medrl.align.learner_state import gathered
    from medrl.align.qat import fake_quantize, qat_layers

    out = {}
    for name, layer in qat_layers(learner.model).items():
        with gathered(learner, [layer.weight]):
            if learner.rank == 0:  # the only rank that writes: the others just gather
                w = layer.weight.detach()
                scale = layer.weight_scaler.current_scale(w)
                out[f"{name}.weight"] = fake_quantize(w, layer.fmt, scale).cpu()
    return out


def export_fake_quant(quantised: dict[str, torch.Tensor], policy_dir: Path,
                      out_dir: Path) -> int:
    """Copy ``policy_dir`` to ``out_dir`` with the weights named in ``quantised`` (from
    :func:`fake_quant_weights`) replaced. Returns the number of weights replaced."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(policy_dir, out_dir, ignore=shutil.ignore_patterns("qat"))
    replaced = 0
    for path in sorted(out_dir.glob("*.safetensors")):
        tensors = load_file(str(path))
        for key in tensors:
            if key in quantised:
                tensors[key] = quantised[key].to(tensors[key].dtype).contiguous()
                replaced += 1
        save_file(tensors, str(path), metadata={"format": "pt"})
    if replaced != len(quantised):
        raise RuntimeError(f"export_fake_quant: replaced {replaced} of {len(quantised)} "
                           f"quantised weights in {out_dir}; the saved weight names do not "
                           "match the model's layer names.")
    return replaced
