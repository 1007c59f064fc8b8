"""Distillation from a privileged teacher branch (MedSynapse-V's intrinsic memory transition).

A training example is one data row seen twice: the **student** branch gets the plain input
(the prompt as a rollout renders it), the **teacher** branch the same row with privileged
inputs (a gold rationale, the report, a region-mask image: :func:`teacher_sample`). Both score
the same completion tokens, the row's response (as in SFT: the answer closed with the chat
template's end-of-turn token), and the loss moves the teacher's next-token distribution into
the student's.

Loss (per optimiser step, over every completion token t of every example in the global batch):

    L = sum_t JSD_beta(P_t || S_t) / (number of tokens)
    M = beta * P + (1 - beta) * S
    JSD_beta(P || S) = beta * KL(P || M) + (1 - beta) * KL(S || M)

with P the teacher's and S the student's distribution over the full vocabulary at token t,
both from logits divided by ``temperature``. At the end points the mixture form is 0 whatever
P and S are, so, as GKD (Agarwal et al., 2024) does, beta = 0 is the forward KL(P || S) and
beta = 1 the reverse KL(S || P) (:func:`jsd_beta`). Gradients reach the student only.

Memory: neither branch materialises [B, T, V]. The teacher's backbone runs under ``no_grad``
and keeps only the hidden states that predict completion tokens; the student's runs with
gradients. Both are then projected through their LM heads ``chunk_size`` tokens at a time,
teacher first (no grad), then the student, and each chunk is recomputed in the backward pass
(activation checkpointing), so one chunk of logits per branch exists at a time.

Layout on the learner: example i is two samples, 2i the teacher's (privileged prompt +
completion) and 2i + 1 the student's (plain prompt + the same completion); a micro-batch and a
rank hold whole examples, and the learner runs :class:`DistillForward` inside its engine's
forward (``Learner.train_step_with``: a loss with a ``model_forward``), so LoRA, ZeRO and
several ranks work as in the other stages.

Teacher: ``DistillForward.teacher_dir`` None is the policy itself with its LoRA adapters
switched off (the starting checkpoint, no second copy); a folder is a frozen copy loaded on
every learner rank beside the policy, in the policy's dtype (the launcher passes the starting
policy's folder when the recipe names no teacher and trains without LoRA). Either way the
teacher stays the starting weights: a teacher that followed the student could meet it by
ignoring the privileged input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
from torch.utils.checkpoint import checkpoint

from medrl.align.records import Sample, UserError
from medrl.align.stages.sft import ExampleSpec

__all__ = ["DistillForward", "DistillLoss", "chunked_jsd", "encode_example", "encode_examples",
           "jsd_beta", "run_stage", "student_tokens", "teacher_sample"]

# ------------------------------------------------------------------------------- the loss


def jsd_beta(teacher_logits: torch.Tensor, student_logits: torch.Tensor, *, beta: float,
             temperature: float = 1.0) -> torch.Tensor:
    """Generalised JSD between the teacher's and the student's next-token distributions.

    teacher_logits, student_logits: [..., V] (any float dtype; computed in float32).
    beta in [0, 1]: 0 gives KL(P_teacher || P_student), 1 gives KL(P_student || P_teacher),
    in between the mixture form of the module docstring. Returns [...] float32, >= 0.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    lt = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    ls = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    if beta == 0.0:
        return (lt.exp() * (lt - ls)).sum(-1)
    if beta == 1.0:
        return (ls.exp() * (ls - lt)).sum(-1)
    # log M = log(beta * P + (1 - beta) * S), without leaving log space
    lm = torch.logsumexp(torch.stack([lt + math.log(beta), ls + math.log1p(-beta)]), dim=0)
    return beta * (lt.exp() * (lt - lm)).sum(-1) + (1 - beta) * (ls.exp() * (ls - lm)).sum(-1)


def _chunk_jsd(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
               student_head: torch.nn.Module, teacher_head: torch.nn.Module, beta: float,
               temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """JSD and argmax agreement of one chunk of hidden states [n, H] -> ([n], [n])."""
    with torch.no_grad():  # recomputed in the backward pass too, still without a graph
        teacher_logits = teacher_head(teacher_hidden).float()
    student_logits = student_head(student_hidden).float()
    jsd = jsd_beta(teacher_logits, student_logits, beta=beta, temperature=temperature)
    agree = (teacher_logits.argmax(-1) == student_logits.detach().argmax(-1)).float()
    return jsd, agree


def chunked_jsd(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                student_head: torch.nn.Module, teacher_head: torch.nn.Module, *, beta: float,
                temperature: float = 1.0, chunk_size: int = 1024
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token :func:`jsd_beta` from hidden states, ``chunk_size`` tokens at a time.

    student_hidden, teacher_hidden: [N, H] (the states that predict the same N tokens);
    the heads map [n, H] -> [n, V]. With gradients on, each chunk's student logits are
    recomputed in the backward pass, so one chunk of [chunk_size, V] logits per branch exists
    at a time; the teacher's never carry gradients. Returns (jsd [N] float32, agreement [N]:
    1.0 where both branches' most likely token is the same).
    """
    if student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(f"{student_hidden.shape[0]} student and {teacher_hidden.shape[0]} "
                         "teacher positions; both branches score the same tokens")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    teacher_hidden = teacher_hidden.detach()
    recompute = torch.is_grad_enabled() and student_hidden.requires_grad
    jsds, agrees = [], []
    for start in range(0, student_hidden.shape[0], chunk_size):
        args = (student_hidden[start:start + chunk_size], teacher_hidden[start:start + chunk_size],
                student_head, teacher_head, beta, temperature)
        jsd, agree = (checkpoint(_chunk_jsd, *args, use_reentrant=False) if recompute
                      else _chunk_jsd(*args))
        jsds.append(jsd)
        agrees.append(agree)
    return torch.cat(jsds), torch.cat(agrees)


# -------------------------------------------------------------------- the two branches


def _rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: list[int],
          model_inputs: dict[str, torch.Tensor], merge: int) -> tuple[torch.Tensor, ...]:
    """``rows`` of a [B, L] batch, without the prompt columns that are padding in all of them,
    and their share of the image inputs (images are in row order; a row's image tokens in
    ``mm_token_type_ids`` tell how many of them are its own)."""
    ids, mask = input_ids[rows], attention_mask[rows]
    first = int(mask.any(0).nonzero()[0])  # rows are left-padded: drop all-pad columns
    ids, mask = ids[:, first:], mask[:, first:]
    extra: dict[str, torch.Tensor] = {}
    if "mm_token_type_ids" in model_inputs:
        extra["mm_token_type_ids"] = model_inputs["mm_token_type_ids"][rows][:, first:]
    if "pixel_values" in model_inputs:
        grid = model_inputs["image_grid_thw"]
        patches = grid.prod(-1)
        tokens = (patches // (merge * merge)).tolist()
        per_row = model_inputs["mm_token_type_ids"].sum(-1).tolist()
        owner, image = [], 0
        for r, need in enumerate(per_row):  # images of row r until its image tokens are met
            while need > 0:
                owner.append(r)
                need -= tokens[image]
                image += 1
        starts = torch.cat([patches.new_zeros(1), patches.cumsum(0)]).tolist()
        mine = [i for i, r in enumerate(owner) if r in set(rows)]
        if mine:
            extra["image_grid_thw"] = grid[mine]
            extra["pixel_values"] = torch.cat([model_inputs["pixel_values"][starts[i]:starts[i + 1]]
                                               for i in mine])
    return ids, mask, extra


def completion_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      num_completion_tokens: int, **model_inputs):
    """Hidden states [B, T, H] that predict the last T tokens, and the LM head of ``model``.

    The same backbone call as :func:`medrl.align.logprobs.token_logprobs` (positions from each
    row's first real token for text models; VLMs embed their completions as text).
    """
    from medrl.align.logprobs import _backbone_and_head
    from medrl.align.models import text_embedded_completions

    body, head = _backbone_and_head(model)
    B, L = input_ids.shape
    T = int(num_completion_tokens)
    is_text = not hasattr(getattr(model, "config", None), "vision_config")
    if is_text and "position_ids" not in model_inputs:
        model_inputs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    ids = {"input_ids": input_ids} if is_text else text_embedded_completions(
        body, input_ids, L - T)
    out = body(**ids, attention_mask=attention_mask, use_cache=False, **model_inputs)
    return out.last_hidden_state[:, L - T - 1:L - 1, :], head


_TEACHERS: dict[tuple[str, str, str], torch.nn.Module] = {}  # one frozen copy per process


def _frozen_teacher(folder: str, dtype: torch.dtype, device: torch.device,
                    attn_implementation: str) -> torch.nn.Module:
    key = (folder, str(dtype), str(device))
    if key not in _TEACHERS:
        from medrl.align.models import load_model

        model = load_model(folder, dtype=dtype, attn_implementation=attn_implementation)
        model.eval()
        model.requires_grad_(False)
        _TEACHERS[key] = model.to(device)
    return _TEACHERS[key]


@dataclass(frozen=True)
class DistillForward:
    """The learner's ``model_forward`` (picklable: it travels to every rank).

    Called with the policy (a Hugging Face or PEFT model), input_ids / attention_mask
    [2b, L] (teacher rows even, student rows odd, the same completion in the last T columns)
    and the image inputs; returns (jsd [b, T], agreement [b, T]) of the student rows.
    ``teacher_dir`` None: the policy with its adapters off (needs LoRA).
    """

    beta: float = 0.5
    temperature: float = 1.0
    teacher_dir: str | None = None
    chunk_size: int = 1024
    attn_implementation: str = "sdpa"

    def __call__(self, policy, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 num_completion_tokens: int, **model_inputs) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = input_ids.shape[0], int(num_completion_tokens)
        if B % 2:
            raise ValueError(f"a distill micro-batch holds teacher/student pairs; got {B} rows")
        vision = getattr(getattr(policy, "config", None), "vision_config", None)
        merge = int(getattr(vision, "spatial_merge_size", 2) or 2)
        t_ids, t_mask, t_extra = _rows(input_ids, attention_mask, list(range(0, B, 2)),
                                       model_inputs, merge)
        s_ids, s_mask, s_extra = _rows(input_ids, attention_mask, list(range(1, B, 2)),
                                       model_inputs, merge)
        s_hidden, s_head = completion_hidden(policy, s_ids, s_mask, T, **s_extra)
        with torch.no_grad():
            if self.teacher_dir is None:
                if not hasattr(policy, "disable_adapter"):
                    raise UserError("the distill stage's teacher is the starting policy with "
                                    "its LoRA adapters off, but the policy has no adapters; "
                                    "name a teacher folder (distill.teacher) or use learner.lora.")
                with policy.disable_adapter():
                    t_hidden, t_head = completion_hidden(policy, t_ids, t_mask, T, **t_extra)
                t_head = getattr(t_head, "base_layer", t_head)  # an adapted head, adapters off
            else:
                teacher = _frozen_teacher(self.teacher_dir, s_head.weight.dtype,
                                          s_hidden.device, self.attn_implementation)
                t_hidden, t_head = completion_hidden(teacher, t_ids, t_mask, T, **t_extra)
        H = s_hidden.shape[-1]
        jsd, agree = chunked_jsd(s_hidden.reshape(-1, H),
                                 t_hidden.reshape(-1, t_hidden.shape[-1]).to(s_hidden.device),
                                 s_head, t_head, beta=self.beta, temperature=self.temperature,
                                 chunk_size=self.chunk_size)
        return jsd.view(B // 2, T), agree.view(B // 2, T)


def student_tokens(mb) -> float:
    """A micro-batch's share of the global normaliser: its student rows' completion tokens."""
    return float(mb.completion_mask[1::2].sum())


@dataclass(frozen=True)
class DistillLoss:
    """The learner's ``loss_fn``: the token mean of the student rows' JSD (module docstring).
    Gets ``model_forward``'s (jsd, agreement) and the micro-batch; metrics ``jsd``,
    ``agreement`` (share of tokens where both branches' argmax agree), ``tokens``."""

    model_forward: DistillForward

    def __call__(self, out, mb) -> tuple[torch.Tensor, dict[str, float]]:
        jsd, agree = out
        mask = mb.completion_mask[1::2].to(jsd.device, jsd.dtype)
        total = mask.sum()
        loss = (jsd * mask).sum() / total.clamp(min=1e-12)
        n = float(total)
        return loss, {"jsd": float(loss.detach()), "tokens": n,
                      "agreement": float((agree * mask).sum()) / max(n, 1.0)}


# ------------------------------------------------------------------------ building examples


@dataclass
class TeacherSpec:
    """How the teacher's input is built from a row (the recipe's ``distill`` section).

    privileged_field: a row column appended to the user text as ``prefix + value``;
    prompt_template: a ``str.format`` template over the row (``{prompt}`` is the student's
    user text) that replaces the teacher's user text instead; images: the teacher's images
    (loaded), replacing the student's (None: the student's).
    """

    privileged_field: str | None = None
    prompt_template: str | None = None
    prefix: str = "\n\nReference: "


def _user_text(messages: Sequence[dict]) -> str:
    content = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if p.get("type") == "text")


def teacher_sample(sample: Sample, spec: TeacherSpec, images: list | None = None) -> Sample:
    """The sample as the teacher sees it: its user message rebuilt with the privileged text
    (and ``images`` in place of the student's). Raises :class:`UserError` naming the sample and
    the field when the row lacks the privileged column or the template cannot be filled."""
    from medrl.align.prompts import user_content

    text = _user_text(sample.messages)
    if spec.prompt_template:
        try:
            text = spec.prompt_template.format_map({**sample.row, "prompt": text})
        except (KeyError, IndexError, ValueError) as exc:
            raise UserError(f"sample {sample.uid}: distill.teacher_prompt_template cannot be "
                            f"filled from the row ({type(exc).__name__}: {exc}); name only "
                            "columns the data has (or {prompt}), and double literal braces."
                            ) from None
    elif spec.privileged_field:
        value = sample.row.get(spec.privileged_field)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise UserError(f"sample {sample.uid}: no privileged input in column "
                            f"{spec.privileged_field!r} (distill.privileged_field); every "
                            "training row needs one.")
        text = text + spec.prefix + (value if isinstance(value, str) else str(value))
    images = list(sample.images) if images is None else list(images)
    messages = [m for m in sample.messages if m.get("role") == "system"]
    messages.append({"role": "user", "content": user_content(text, len(images))})
    return replace(sample, uid=f"{sample.uid}/teacher", messages=messages, images=images)


def encode_example(tokenizer_or_processor, student: Sample, teacher: Sample,
                   spec: ExampleSpec) -> list[Sample]:
    """One row -> [teacher, student] samples in the learner's layout: each its own prompt,
    both the same completion (the response, as SFT encodes it), cut so that both fit
    ``spec.max_length``. Raises :class:`UserError` when the teacher's prompt leaves no room."""
    from medrl.align.encode import encode_prompt
    from medrl.align.stages.sft import build_example

    s = build_example(tokenizer_or_processor, student, spec)
    t_prompt = list(encode_prompt(tokenizer_or_processor, teacher).prompt_ids[0])
    room = spec.max_length - len(t_prompt)
    if room < 1:
        raise UserError(f"sample {student.uid}: the teacher's prompt has {len(t_prompt)} "
                        f"tokens, which leaves no room for the answer within "
                        f"distill.max_length {spec.max_length}; raise it or shorten the "
                        "privileged input.")
    ids = s.completion_ids[:room]
    return [replace(teacher, prompt_ids=t_prompt, completion_ids=ids, token_weights={}),
            replace(s, completion_ids=ids, token_weights={})]


def encode_examples(tokenizer_or_processor, samples: Sequence[Sample],
                    teacher_of: Callable[[Sample], Sample], spec: ExampleSpec) -> list[Sample]:
    """:func:`encode_example` of every row, flattened: 2 samples per row, in order."""
    return [x for s in samples
            for x in encode_example(tokenizer_or_processor, s, teacher_of(s), spec)]


# ------------------------------------------------------------------------------ stage loop


class DistillLearner(Protocol):
    """The learner group the stage drives (``medrl.launch.learner_group.LearnerGroup``)."""

    def train_step_with(self, loss_fn: Callable, samples: Sequence[Sample], size_fn: Callable,
                        *, unit: int = 1) -> dict[str, float]: ...
    def logprobs(self, samples: Sequence[Sample], *, temperature: float | None = None,
                 reference: bool = False) -> list: ...
    def save(self, out_dir: str | Path) -> None: ...
    def load(self, out_dir: str | Path) -> None: ...


@dataclass
class DistillIO:
    """What the launcher hands the stage loop; everything comes from the recipe.

    stream: a ``medrl.launch.stream.PromptStream`` over loaded samples; eval_samples:
    held-out rows (loaded); teacher_of(sample): its teacher view (:func:`teacher_sample`);
    make_learner(total_steps): the started learner group; num_workers: its ranks.
    """

    stream: Any
    eval_samples: list[Sample]
    teacher_of: Callable[[Sample], Sample]
    make_learner: Callable[[int], DistillLearner]
    tokenizer: Any
    monitor_factory: Callable[[int, int], Any]
    policy_source: str
    forward: DistillForward
    spec: ExampleSpec
    batch_size: int
    max_steps: int
    epochs: int | None = 3
    eval_every: int = 0
    checkpoint_every: int = 0
    keep_last: int | None = None
    num_workers: int = 1


def held_out_nll(learner: DistillLearner, examples: Sequence[Sample], num_workers: int) -> float:
    """The student's mean answer-token NLL on held-out examples (student rows only)."""
    students = list(examples[1::2])
    while len(students) < num_workers:  # every rank runs the collective forward
        students.append(students[0])
    lps = learner.logprobs(students, temperature=1.0)[:len(examples) // 2]
    total, count = sum(float(-lp.double().sum()) for lp in lps), sum(len(lp) for lp in lps)
    return total / count if count else float("nan")


def run_stage(io: DistillIO, run_dir: Path, *, resume_from: Path | None = None) -> Path:
    """Run (or resume) the distill stage; returns the last checkpoint folder.

    Step k: take ``batch_size`` rows from the stream, build their teacher and student views,
    one optimiser step on the JSD (micro-batches of whole rows, all ranks), the student's
    held-out answer NLL (``eval/nll``) every ``eval_every`` steps and at the last, a
    checkpoint every ``checkpoint_every`` steps and at the end.
    """
    from medrl.align.checkpoint import read_state, save_checkpoint
    from medrl.align.rng_state import restore_rng, stage_state
    from medrl.align.stages.sft import total_steps

    steps = total_steps(max_steps=io.max_steps, epochs=io.epochs,
                        num_train=len(io.stream.samples), batch_size=io.batch_size)
    state = read_state(resume_from) if resume_from else None
    start = int(state["step"]) if state else 0
    loss_fn = DistillLoss(model_forward=io.forward)
    held_out = encode_examples(io.tokenizer, io.eval_samples, io.teacher_of, io.spec)
    learner = io.make_learner(steps)
    if state:
        learner.load(resume_from)
        io.stream.load_state(state["data_cursor"])
        restore_rng(state["rng"])
    monitor = io.monitor_factory(steps, start)
    monitor.restore((state or {}).get("metrics_row"))  # a kill after COMPLETE, before the row
    last = resume_from
    try:
        for step in range(start + 1, steps + 1):
            batch = encode_examples(io.tokenizer, io.stream.take(io.batch_size), io.teacher_of,
                                    io.spec)
            metrics = learner.train_step_with(loss_fn, batch, student_tokens, unit=2)
            metrics["epoch"] = float(io.stream.epoch)
            if held_out and io.eval_every and (step % io.eval_every == 0 or step == steps):
                metrics["eval/nll"] = held_out_nll(learner, held_out, io.num_workers)
            if (io.checkpoint_every and step % io.checkpoint_every == 0) or step == steps:
                ckpt_state = stage_state("distill", step, cursor=io.stream.state(),
                                         policy_source=io.policy_source,
                                         metrics_row=monitor.preview(step, metrics))
                last = save_checkpoint(run_dir, step, write=learner.save, state=ckpt_state,
                                       keep_last=io.keep_last)
                monitor.plot()
            monitor.log(step, metrics)
    finally:
        monitor.close()
    monitor.summary(last_checkpoint=last)
    return last
