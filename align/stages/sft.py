"""Supervised fine-tuning: the weighted answer-token loss and the single-learner stage loop.

A training example is a :class:`~medrl.align.records.Sample` whose ``prompt_ids`` are the
prompt rendered exactly as a rollout renders it (``medrl.align.encode``: chat template,
generation prompt, image tokens expanded for a VLM) and whose ``completion_ids`` are the
answer followed by the end-of-turn token. The learner's ``collate`` pads it like a rollout
sample, so the loss only ever sees answer tokens: prompt tokens are masked by construction.

Loss (per optimiser step, over every answer token t of every example in the global batch):

    loss = sum_t w_t * CE_t / sum_t w_t,    CE_t = -log p(token_t | tokens before it)

Token weights ``w_t`` default to 1. A dataset can weight sentences: the answer is a list of
sentences, a label field gives one label per sentence, and sentences labelled abnormal weigh
``abnormal_weight`` (Med3D-R1's report SFT uses 1.10), the rest 1.0; the end-of-turn token
weighs 1.0.

The stage loop (:func:`run_stage`) is shared with the QAT stage, which plugs in through
:class:`StageHooks`. Exact resume: the data cursor, the RNG states and the learner's optimiser
and schedule are saved in every checkpoint; a run of N steps and a run of N/2 steps resumed
for N/2 more take the same batches and compute the same losses.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch

from medrl.align.records import Sample, UserError

ABNORMAL_LABELS = ("abnormal", "positive", "yes", "true", "1")
NORMAL_LABELS = ("normal", "negative", "no", "false", "0", "")


# ------------------------------------------------------------------------------- the loss


def sft_loss(logprobs: torch.Tensor, completion_mask: torch.Tensor,
             token_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted mean cross-entropy of the answer tokens: sum(w * -logp) / sum(w).

    ``logprobs``, ``completion_mask``, ``token_weights``: [B, T] (weights default to 1; the
    mask zeroes padding). Returns the loss (0-dim, differentiable) and metrics ``tokens``
    (answer tokens counted) and ``weight_mean`` (mean weight per answer token).
    """
    weights = completion_mask if token_weights is None else token_weights * completion_mask
    total = weights.sum()
    loss = -(logprobs * weights).sum() / total.clamp(min=1e-12)
    tokens = float(completion_mask.sum())
    return loss, {"tokens": tokens, "weight_mean": float(total) / max(tokens, 1.0)}


def batch_weight(mb) -> float:
    """A micro-batch's share of the global normaliser: its summed answer-token weights."""
    if mb.token_weights is None:
        return float(mb.completion_mask.sum())
    return float((mb.token_weights * mb.completion_mask).sum())


def batch_loss(logprobs: torch.Tensor, mb) -> tuple[torch.Tensor, dict[str, float]]:
    """:func:`sft_loss` of a :class:`~medrl.align.batch.TrainBatch` (the learner's loss_fn)."""
    return sft_loss(logprobs, mb.completion_mask, mb.token_weights)


# ------------------------------------------------------------------------ building examples


def sentence_weight(label: Any, abnormal_weight: float, *, uid: str, index: int) -> float:
    """A per-sentence label -> its weight: abnormal -> ``abnormal_weight``, normal -> 1.0."""
    text = str(label).strip().lower() if not isinstance(label, bool) else str(label).lower()
    if text in ABNORMAL_LABELS:
        return float(abnormal_weight)
    if text in NORMAL_LABELS:
        return 1.0
    raise UserError(f"sample {uid}: sentence label {index} is {label!r}; use true/false, 1/0 "
                    "or 'abnormal'/'normal' (sft.weight_field).")


def encode_weighted_text(tokenizer, sentences: Sequence[str],
                         weights: Sequence[float]) -> tuple[list[int], list[float]]:
    """Token ids of ``" ".join(sentences)`` and each token's weight.

    Sentence i owns its characters and the space before it; a token takes the weight of the
    sentence that holds its last character (needs a fast tokenizer's offsets).
    """
    text, ends = "", []
    for i, sentence in enumerate(sentences):
        text += (" " if i else "") + sentence
        ends.append(len(text))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for start, end in enc["offset_mapping"]:
        pos = max(start, end - 1)
        sentence = next((i for i, e in enumerate(ends) if pos < e), len(ends) - 1)
        out.append(float(weights[sentence]))
    return list(enc["input_ids"]), out


def response_text(value: Any) -> str:
    """The answer as text: a string as is, a list of sentences joined by spaces, a mapping
    (a structured record) as indented JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return " ".join(value)
    return json.dumps(value, ensure_ascii=False, indent=1)


@dataclass
class ExampleSpec:
    """How a data row becomes an SFT example (the recipe's ``sft`` section, as plain values)."""

    response_field: str = "response"
    weight_field: str | None = None
    abnormal_weight: float = 1.10
    max_length: int = 1024
    prompt_template: str | None = None


def _templated(sample: Sample, template: str) -> Sample:
    """The sample with its user message's text replaced by ``template.format_map(row)``."""
    from medrl.align.prompts import count_image_parts, user_content

    try:
        text = template.format_map(sample.row)
    except (KeyError, IndexError, ValueError) as exc:
        raise UserError(f"sample {sample.uid}: sft.prompt_template cannot be filled from the "
                        f"row ({type(exc).__name__}: {exc}); name only columns the data has, "
                        "and double literal braces ({{ }}).") from None
    messages = [m for m in sample.messages if m.get("role") == "system"]
    messages.append({"role": "user",
                     "content": user_content(text, count_image_parts(sample.messages))})
    return replace(sample, messages=messages)


def build_example(tokenizer_or_processor, sample: Sample, spec: ExampleSpec) -> Sample:
    """A loaded sample (media as images) -> the sample with prompt/answer ids and weights.

    The answer ends with the chat template's own end-of-turn token
    (:func:`~medrl.align.encode.end_of_turn_id`), the token both rollout engines stop at.
    Raises :class:`UserError` naming the sample when the answer is missing, the labels do not
    match the sentences, or the prompt alone fills ``max_length``. An answer that does not fit
    is cut at ``max_length`` (the end-of-turn token is then dropped too).
    """
    from medrl.align.encode import encode_prompt, end_of_turn_id, text_tokenizer

    if spec.prompt_template:
        sample = _templated(sample, spec.prompt_template)
    if spec.response_field not in sample.row or sample.row[spec.response_field] is None:
        raise UserError(f"sample {sample.uid}: no answer in column {spec.response_field!r} "
                        "(sft.response_field); every training row needs one.")
    prompt_ids = encode_prompt(tokenizer_or_processor, sample).prompt_ids[0]
    tok = text_tokenizer(tokenizer_or_processor)
    answer = sample.row[spec.response_field]
    weights: list[float] | None = None
    if spec.weight_field:
        labels = sample.row.get(spec.weight_field)
        if not isinstance(answer, (list, tuple)) or not isinstance(labels, (list, tuple)) \
                or len(labels) != len(answer):
            raise UserError(
                f"sample {sample.uid}: sft.weight_field {spec.weight_field!r} needs the answer "
                f"({spec.response_field!r}) as a list of sentences and one label per sentence; "
                f"got {type(answer).__name__} and {type(labels).__name__}"
                + (f" of {len(answer)} and {len(labels)}" if isinstance(answer, (list, tuple))
                   and isinstance(labels, (list, tuple)) else "") + ".")
        sentence_weights = [sentence_weight(lab, spec.abnormal_weight, uid=sample.uid, index=i)
                            for i, lab in enumerate(labels)]
        ids, weights = encode_weighted_text(tok, [str(s) for s in answer], sentence_weights)
    else:
        ids = tok(response_text(answer), add_special_tokens=False)["input_ids"]
    # the template's own end of turn, which rollouts stop at too (not always the eos)
    ids = list(ids) + [end_of_turn_id(tokenizer_or_processor)]
    weights = None if weights is None else weights + [1.0]
    room = spec.max_length - len(prompt_ids)
    if room < 1:
        raise UserError(f"sample {sample.uid}: the prompt has {len(prompt_ids)} tokens, which "
                        f"leaves no room for the answer within sft.max_length "
                        f"{spec.max_length}; raise sft.max_length or shorten the prompt.")
    ids = ids[:room]
    out = replace(sample, prompt_ids=list(prompt_ids), completion_ids=ids)
    out.token_weights = {"sft": weights[:room]} if weights is not None else {}
    return out


# ------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def eval_loss(learner, examples: Sequence[Sample], batch_size: int) -> float:
    """The weighted answer-token loss over ``examples`` (no update), as in training."""
    num, den = 0.0, 0.0
    for i in range(0, len(examples), batch_size):
        batch = learner.collate(list(examples[i:i + batch_size]))
        lp = learner.logprobs(batch, temperature=1.0)
        w = batch.completion_mask if batch.token_weights is None else \
            batch.token_weights * batch.completion_mask
        num += float(-(lp.cpu() * w).sum())
        den += float(w.sum())
    return num / den if den else float("nan")


# ------------------------------------------------------------------------------ stage loop


class StageHooks(Protocol):
    """What a stage adds to the SFT loop (the QAT stage implements it)."""

    def prepare_model(self, model: torch.nn.Module) -> None: ...
    def start(self, learner, resume_from: Path | None, state: dict | None) -> dict: ...
    def before_step(self, step: int) -> None: ...
    def after_step(self, step: int, metrics: dict[str, float]) -> None: ...
    def write(self, ckpt_dir: Path) -> None: ...
    def state(self) -> dict: ...


@dataclass
class StageIO:
    """What the launcher hands a stage loop; everything comes from the recipe.

    ``stream``: a ``medrl.launch.stream.PromptStream`` (``take(n)`` loaded samples, ``state()``,
    ``load_state(cursor)``); ``monitor_factory(total_steps, start_step)`` a ``Monitor``;
    ``learner_kwargs`` the learner's keyword arguments (``total_steps`` is set here);
    ``evaluate(step, learner) -> metrics``: benchmarks on the current weights after a step
    (the recipe's ``evaluation``), which must leave the training stream as it found it.
    """

    policy_dir: Path
    stream: Any
    eval_samples: list[Sample]
    monitor_factory: Callable[[int, int], Any]
    learner_kwargs: dict[str, Any]
    spec: ExampleSpec
    batch_size: int
    max_steps: int
    epochs: int | None = None
    eval_every: int = 0
    checkpoint_every: int = 0
    keep_last: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    evaluate: Callable[[int, Any], dict[str, float]] | None = None


def total_steps(*, max_steps: int, epochs: int | None, num_train: int, batch_size: int) -> int:
    """Optimiser steps of the stage: ``ceil(epochs * N / batch_size)`` when epochs are set,
    else ``max_steps``."""
    if epochs is None:
        return max_steps
    return max(1, math.ceil(epochs * num_train / batch_size))


def run_stage(io: StageIO, run_dir: Path, *, resume_from: Path | None = None,
              hooks: StageHooks | None = None, stage: str = "sft") -> Path:
    """Run (or resume) an SFT-style stage; returns the last checkpoint folder.

    Step k: take ``batch_size`` examples from the stream, one optimiser step on the weighted
    answer-token loss (micro-batches of the learner's size), ``eval/loss`` on the held-out
    examples every ``eval_every`` steps, a checkpoint every ``checkpoint_every`` steps and at
    the end.
    """
    from medrl.align.checkpoint import read_state, save_checkpoint
    from medrl.align.rng_state import restore_rng, stage_state
    from medrl.align.learner import Learner

    steps = total_steps(max_steps=io.max_steps, epochs=io.epochs,
                        num_train=len(io.stream.samples), batch_size=io.batch_size)
    state = read_state(resume_from) if resume_from else None
    start = int(state["step"]) if state else 0
    kwargs = dict(io.learner_kwargs, total_steps=steps, temperature=1.0)
    if hooks is not None:
        kwargs["prepare_model"] = hooks.prepare_model
        # the scalers measure clip shares per forward: one pass per micro-batch keeps each
        # share a whole micro-batch's (shared prompts would measure prompt and answer apart)
        kwargs["share_prompt"] = False
    learner = Learner(io.policy_dir, **kwargs)
    if state:
        learner.load(resume_from)
        io.stream.load_state(state["data_cursor"])
        restore_rng(state["rng"])
    extra_state = hooks.start(learner, resume_from, state) if hooks else {}
    tok = learner.tokenizer
    eval_examples = [build_example(tok, s, io.spec) for s in io.eval_samples]
    monitor = io.monitor_factory(steps, start)
    monitor.restore((state or {}).get("metrics_row"))  # a kill after COMPLETE, before the row
    if extra_state.get("metrics"):  # e.g. the probe of the starting checkpoint, logged once
        monitor.log(0, extra_state["metrics"])
    last = resume_from
    try:
        for step in range(start + 1, steps + 1):
            if hooks:
                hooks.before_step(step)
            examples = [build_example(tok, s, io.spec) for s in io.stream.take(io.batch_size)]
            metrics = learner.train_step_with(batch_loss, learner.collate(examples),
                                              size_fn=batch_weight)
            metrics["epoch"] = float(io.stream.epoch)
            if eval_examples and io.eval_every and (step % io.eval_every == 0 or step == steps):
                metrics["eval/loss"] = eval_loss(learner, eval_examples, io.batch_size)
            if io.evaluate is not None:
                metrics.update(io.evaluate(step, learner))
            if hooks:
                hooks.after_step(step, metrics)
            if (io.checkpoint_every and step % io.checkpoint_every == 0) or step == steps:
                ckpt_state = stage_state(stage, step, cursor=io.stream.state(),
                                         policy_source=str(io.policy_dir),
                                         metrics_row=monitor.preview(step, metrics),
                                         **(hooks.state() if hooks else {}))

                def write(tmp: Path) -> None:
                    learner.save(tmp)
                    if hooks:
                        hooks.write(tmp)

                last = save_checkpoint(run_dir, step, write=write, state=ckpt_state,
                                       keep_last=io.keep_last)
                monitor.plot()
            monitor.log(step, metrics)
    finally:
        monitor.close()
    monitor.summary(last_checkpoint=last)
    return last
