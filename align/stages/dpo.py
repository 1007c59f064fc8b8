"""Direct Preference Optimisation: the DPO loss and the stage loop, with MedCausalX's variant.

A training example is one preference pair, carried as a :class:`~medrl.align.records.Sample`
whose ``messages`` are the question (rendered by the data loader) and whose ``row`` holds two
response texts, ``chosen`` and ``rejected`` (the launcher builds them: ``medrl.launch.dpo_stage``).

Encoding (:func:`encode_pair`): the prompt is rendered exactly as a rollout renders it
(:func:`medrl.align.encode.encode_prompt`), each response is tokenised and closed with the
chat template's end-of-turn token (as SFT answers are), and both are cut to
``max_length - prompt`` tokens. Pair i is samples 2i (chosen) and 2i + 1 (rejected); a
micro-batch holds whole pairs, and a rank whole pairs.

Loss over the P pairs of a step. With s(y) the score of response y (its summed log-probs, or
with ``average_logprobs`` its per-token mean) under the policy (pi) and the frozen reference
(ref), and z_p = beta * ((pi(y_w) - ref(y_w)) - (pi(y_l) - ref(y_l))) the reward margin:

    L = (1 / P) * sum_p [(1 - eps) * -log sigmoid(z_p) + eps * -log sigmoid(-z_p)]

(eps = ``label_smoothing``, 0 by default: plain DPO). Metrics: ``loss``, ``accuracy`` (share
of pairs with z_p > 0; a tie counts as wrong, so a step where policy = reference reads 0),
``margin`` (mean z_p), ``reward_chosen`` / ``reward_rejected`` (mean implicit rewards
beta * (pi - ref)), and on held-out pairs ``eval/loss``, ``eval/accuracy``, ``eval/margin``.

**MedCausalX's variant** (``contrast="after_shared_prefix"``). The longest common token
prefix of the two responses (after the prompt) is moved into the context: both samples get
prompt + prefix as their prompt and only the tokens after it as their completion, so the prefix
is scored by neither response. With *summed* log-probs this changes nothing: the prefix tokens
have the same context in both responses, so their log-probs are equal in s(y_w) and s(y_l)
(under the policy and under the reference alike) and cancel exactly in the margin; the loss,
its gradient and every metric are those of ``contrast="full"``, and no computation is saved
(the prefix still runs through the model, as context). Only with ``average_logprobs=True``
does the variant change the loss. With k shared tokens of summed log-prob S (the same in both
responses), responses of n_w and n_l tokens and tails T_w, T_l (the sums after the prefix),
the full contrast scores (S + T_w) / n_w and (S + T_l) / n_l: the prefix stays in the margin
as S * (1/n_w - 1/n_l) whenever the lengths differ, and it dilutes the tails by 1/n; the
variant scores T_w / (n_w - k) and T_l / (n_l - k), where the prefix plays no part at all.
``tests/align/test_dpo.py`` checks both facts. If the prefix would swallow a whole response (a
response that is a prefix of the other after cutting to ``max_length``), one token is left to
each; identical responses are refused.

**Reference.** The learner's frozen reference policy (``Learner(reference=...)``: a copy of
the starting policy beside it or on the CPU, or with LoRA the policy itself with its adapters
off). Its per-token log-probs are computed for each step's pairs (one forward pass without
gradient) and travel to the loss in the samples' ``rollout_logprobs``: the one per-token field
that :meth:`~medrl.align.learner.Learner.train_step_with` hands to a loss untouched (these are
the log-probs of the completion tokens under a fixed policy that is not trained, which is what
that field holds in GRPO too). Computed per step, never cached across steps, so a resumed run
recomputes exactly what the uninterrupted one did; the held-out pairs' reference log-probs are
computed once, in a fixed layout.

The stage trains through a learner group (``medrl.launch.learner_group.LearnerGroup``: one or
more DeepSpeed ranks as Ray actors); checkpoints hold ``policy/`` (``from_pretrained`` loads
it; LoRA merged, ``adapter/`` beside it) and resume exactly like the other stages.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Literal, Protocol, Sequence

import torch
import torch.nn.functional as F

from medrl.align.records import Sample, UserError
from medrl.align.stages.reward_model import pair_count

Contrast = Literal["full", "after_shared_prefix"]
CONTRASTS: tuple[str, ...] = ("full", "after_shared_prefix")

__all__ = ["DPOLoss", "dpo_loss", "encode_pair", "encode_pairs", "pair_count", "pair_metrics",
           "response_scores", "run_stage", "shared_prefix_length"]

# ------------------------------------------------------------------------------- the loss


def response_scores(logprobs: torch.Tensor, mask: torch.Tensor, *, average: bool
                    ) -> torch.Tensor:
    """Each row's score: the sum of its scored tokens' log-probs, or their mean.

    logprobs, mask: [B, T] (mask 1 on the tokens that count, 0 on padding and on anything
    moved out of the contrast). Returns [B]; a row with no scored token scores 0.
    """
    mask = mask.to(logprobs.dtype)
    total = (logprobs * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1.0) if average else total


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, *, beta: float,
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """The DPO loss of P pairs from their response scores (module docstring).

    policy_chosen, policy_rejected, ref_chosen, ref_rejected: [P] scores (summed or averaged
    log-probs) of the chosen / rejected response under the policy and the reference; only the
    policy's carry gradients. beta > 0; label_smoothing in [0, 0.5). Returns the mean loss
    (0-dim) and metrics ``accuracy``, ``margin``, ``reward_chosen``, ``reward_rejected``.
    """
    reward_chosen = beta * (policy_chosen.float() - ref_chosen.float())
    reward_rejected = beta * (policy_rejected.float() - ref_rejected.float())
    z = reward_chosen - reward_rejected
    per_pair = -F.logsigmoid(z)
    if label_smoothing:
        per_pair = (1.0 - label_smoothing) * per_pair - label_smoothing * F.logsigmoid(-z)
    seen = z.detach()
    return per_pair.mean(), {"accuracy": float((seen > 0).float().mean()),
                             "margin": float(seen.mean()),
                             "reward_chosen": float(reward_chosen.detach().mean()),
                             "reward_rejected": float(reward_rejected.detach().mean())}


@dataclass(frozen=True)
class DPOLoss:
    """The learner's ``loss_fn`` (a picklable callable: it travels to every rank).

    Called with ``logprobs`` [2P, T] (the policy's, chosen and rejected interleaved) and the
    micro-batch, whose ``rollout_logprobs`` [2P, T] hold the reference's log-probs of the same
    tokens and ``completion_mask`` [2P, T] the tokens that are scored.
    """

    beta: float
    label_smoothing: float = 0.0
    average_logprobs: bool = False

    def __call__(self, logprobs: torch.Tensor, mb) -> tuple[torch.Tensor, dict[str, float]]:
        if mb.rollout_logprobs is None:
            raise UserError("the dpo stage's batch carries no reference log-probs; compute "
                            "them (learner.logprobs(..., reference=True)) before the step.")
        policy = response_scores(logprobs, mb.completion_mask,
                                 average=self.average_logprobs).view(-1, 2)
        ref = response_scores(mb.rollout_logprobs.to(logprobs.device), mb.completion_mask,
                              average=self.average_logprobs).view(-1, 2)
        return dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta=self.beta,
                        label_smoothing=self.label_smoothing)


def pair_metrics(policy: Sequence[torch.Tensor], ref: Sequence[torch.Tensor], *, beta: float,
                 label_smoothing: float = 0.0, average_logprobs: bool = False
                 ) -> dict[str, float]:
    """``eval/*`` metrics of pairs from each sample's completion log-probs (1-D tensors, chosen
    and rejected interleaved, 2P of them) under the policy and the reference."""
    def scores(rows: Sequence[torch.Tensor]) -> torch.Tensor:
        out = [float(r.double().mean() if average_logprobs else r.double().sum()) for r in rows]
        return torch.tensor(out, dtype=torch.float64).view(-1, 2)

    pi, rf = scores(policy), scores(ref)
    loss, m = dpo_loss(pi[:, 0], pi[:, 1], rf[:, 0], rf[:, 1], beta=beta,
                       label_smoothing=label_smoothing)
    return {"eval/loss": float(loss), "eval/accuracy": m["accuracy"], "eval/margin": m["margin"]}


# ------------------------------------------------------------------------ building examples


def shared_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """The number of leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode_response(tokenizer_or_processor, text: str) -> list[int]:
    """A response's token ids, closed with the chat template's end-of-turn token."""
    from medrl.align.encode import end_of_turn_id, text_tokenizer

    ids = text_tokenizer(tokenizer_or_processor)(text, add_special_tokens=False)["input_ids"]
    return list(ids) + [end_of_turn_id(tokenizer_or_processor)]


def encode_pair(tokenizer_or_processor, pair: Sample, *, max_length: int,
                contrast: Contrast = "full") -> list[Sample]:
    """A pair sample -> [chosen, rejected] samples in the learner's layout (module docstring).

    Raises :class:`UserError` naming the pair when it has images (the stage trains text
    models), when the prompt leaves no room within ``max_length``, or when the two responses
    are the same tokens.
    """
    from medrl.align.encode import encode_prompt

    if contrast not in CONTRASTS:
        raise UserError(f"dpo.contrast must be one of {', '.join(CONTRASTS)}, got {contrast!r}.")
    if pair.images or pair.volume is not None:
        raise UserError(f"preference pair {pair.uid}: the row has images or a volume, but the "
                        "dpo stage trains text models on text pairs; drop the media columns "
                        "from data.fields.")
    prompt = list(encode_prompt(tokenizer_or_processor, pair).prompt_ids[0])
    room = max_length - len(prompt)
    if room < 1:
        raise UserError(f"preference pair {pair.uid}: the prompt has {len(prompt)} tokens, "
                        f"which leaves no room for a response within dpo.max_length "
                        f"{max_length}; raise dpo.max_length or shorten the prompt.")
    full = {side: encode_response(tokenizer_or_processor, pair.row[side])
            for side in ("chosen", "rejected")}
    chosen, rejected = full["chosen"][:room], full["rejected"][:room]
    if chosen == rejected:
        cut = (f" once cut to dpo.max_length {max_length}" if full["chosen"] != full["rejected"]
               else "")
        raise UserError(f"preference pair {pair.uid}: the chosen and rejected responses are "
                        f"the same tokens{cut}; a pair must differ somewhere (raise "
                        "dpo.max_length, or fix the row).")
    shared = 0
    if contrast == "after_shared_prefix":  # leave each side at least one scored token
        shared = min(shared_prefix_length(chosen, rejected), len(chosen) - 1,
                     len(rejected) - 1)
    context = prompt + chosen[:shared]
    return [replace(pair, uid=f"{pair.uid}/{side}", prompt_ids=list(context),
                    completion_ids=ids[shared:], token_weights={}, rollout_logprobs=[])
            for side, ids in (("chosen", chosen), ("rejected", rejected))]


def encode_pairs(tokenizer_or_processor, pairs: Sequence[Sample], *, max_length: int,
                 contrast: Contrast = "full") -> list[Sample]:
    """:func:`encode_pair` of every pair, flattened: 2 samples per pair, in order."""
    return [s for p in pairs for s in encode_pair(tokenizer_or_processor, p,
                                                  max_length=max_length, contrast=contrast)]


def with_reference(samples: Sequence[Sample], ref: Sequence[torch.Tensor]) -> list[Sample]:
    """Copies of ``samples`` carrying the reference's per-token log-probs (1-D tensors, one per
    sample, as long as its completion) in ``rollout_logprobs``."""
    out = []
    for s, lp in zip(samples, ref, strict=True):
        if len(lp) != len(s.completion_ids):
            raise ValueError(f"{s.uid}: {len(lp)} reference log-probs for "
                             f"{len(s.completion_ids)} completion tokens")
        out.append(replace(s, rollout_logprobs=[float(v) for v in lp]))
    return out


# ------------------------------------------------------------------------------ stage loop


class PairLearner(Protocol):
    """The learner group the stage drives (``medrl.launch.learner_group.LearnerGroup``): every
    call is collective over its ranks and shards the global list (by whole units of ``unit``)."""

    def train_step_with(self, loss_fn: Callable, samples: Sequence[Sample], size_fn: Callable,
                        *, unit: int = 1) -> dict[str, float]: ...
    def logprobs(self, samples: Sequence[Sample], *, temperature: float | None = None,
                 reference: bool = False) -> list: ...
    def save(self, out_dir: str | Path) -> None: ...
    def load(self, out_dir: str | Path) -> None: ...


@dataclass
class DPOIO:
    """What the launcher hands the stage loop; everything comes from the recipe.

    stream: a ``medrl.launch.stream.PromptStream`` over pair samples (``take``, ``state``,
    ``load_state``, ``epoch``, ``samples``); eval_pairs: held-out pair samples;
    make_learner(total_steps): the started learner group (with a reference model);
    tokenizer: the model's; num_workers: its ranks (a held-out chunk gets one sample each).
    """

    stream: Any
    eval_pairs: list[Sample]
    make_learner: Callable[[int], PairLearner]
    tokenizer: Any
    monitor_factory: Callable[[int, int], Any]
    policy_source: str
    batch_size: int
    max_length: int
    max_steps: int
    beta: float = 0.1
    label_smoothing: float = 0.0
    average_logprobs: bool = False
    contrast: Contrast = "full"
    epochs: int | None = 2
    eval_every: int = 0
    checkpoint_every: int = 0
    keep_last: int | None = None
    num_workers: int = 1


def _chunked_logprobs(learner: PairLearner, samples: Sequence[Sample], size: int,
                      num_workers: int, *, reference: bool) -> list[torch.Tensor]:
    """Completion log-probs of ``samples`` in chunks of ``size``; a chunk smaller than the
    number of ranks is padded with copies of its first sample, whose results are dropped."""
    out: list[torch.Tensor] = []
    for i in range(0, len(samples), size):
        chunk = list(samples[i:i + size])
        n = len(chunk)
        while len(chunk) < num_workers:
            chunk.append(chunk[0])
        out += learner.logprobs(chunk, temperature=1.0, reference=reference)[:n]
    return out


def run_stage(io: DPOIO, run_dir: Path, *, resume_from: Path | None = None) -> Path:
    """Run (or resume) the dpo stage; returns the last checkpoint folder.

    Step k: take ``batch_size`` pairs from the stream, encode them, compute their reference
    log-probs, one optimiser step on the DPO loss (micro-batches of whole pairs, all ranks),
    the held-out metrics every ``eval_every`` steps and at the last, a checkpoint every
    ``checkpoint_every`` steps and at the end.
    """
    from medrl.align.checkpoint import read_state, save_checkpoint
    from medrl.align.rng_state import restore_rng, stage_state
    from medrl.align.stages.sft import total_steps

    steps = total_steps(max_steps=io.max_steps, epochs=io.epochs,
                        num_train=len(io.stream.samples), batch_size=io.batch_size)
    state = read_state(resume_from) if resume_from else None
    start = int(state["step"]) if state else 0
    loss_fn = DPOLoss(beta=io.beta, label_smoothing=io.label_smoothing,
                      average_logprobs=io.average_logprobs)
    encode = dict(max_length=io.max_length, contrast=io.contrast)
    held_out = encode_pairs(io.tokenizer, io.eval_pairs, **encode)  # before the ranks start
    learner = io.make_learner(steps)
    if state:
        learner.load(resume_from)
        io.stream.load_state(state["data_cursor"])
        restore_rng(state["rng"])
    chunk = 2 * io.batch_size
    held_ref: list[torch.Tensor] | None = None  # the reference is frozen: computed once
    monitor = io.monitor_factory(steps, start)
    monitor.restore((state or {}).get("metrics_row"))  # a kill after COMPLETE, before the row
    last = resume_from
    try:
        for step in range(start + 1, steps + 1):
            batch = encode_pairs(io.tokenizer, io.stream.take(io.batch_size), **encode)
            batch = with_reference(batch, learner.logprobs(batch, temperature=1.0,
                                                           reference=True))
            metrics = learner.train_step_with(loss_fn, batch, pair_count, unit=2)
            metrics["epoch"] = float(io.stream.epoch)
            if held_out and io.eval_every and (step % io.eval_every == 0 or step == steps):
                if held_ref is None:
                    held_ref = _chunked_logprobs(learner, held_out, chunk, io.num_workers,
                                                 reference=True)
                policy = _chunked_logprobs(learner, held_out, chunk, io.num_workers,
                                           reference=False)
                metrics.update(pair_metrics(policy, held_ref, beta=io.beta,
                                            label_smoothing=io.label_smoothing,
                                            average_logprobs=io.average_logprobs))
            if (io.checkpoint_every and step % io.checkpoint_every == 0) or step == steps:
                ckpt_state = stage_state("dpo", step, cursor=io.stream.state(),
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
