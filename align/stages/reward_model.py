"""Reward-model training: the Bradley-Terry pairwise loss and the stage loop.

A training example is one preference pair, carried as a :class:`~medrl.align.records.Sample`
whose ``row`` holds two texts, ``chosen`` and ``rejected``, and a ``tier`` label (the launcher
renders each text with its instruction and criterion, so this module knows nothing of rubrics;
see ``medrl.launch.preferences``). A criterion-conditioned reward model r(y | x, c) is the
special case where the criterion is part of both texts.

Encoding: each text is tokenised and cut from the left to ``max_length`` tokens (the launcher
puts the criterion and the response last, so they survive); its last token goes into the
learner's one-token completion block, so the value head reads every row at the last column
(:func:`medrl.align.logprobs.sequence_values`). Pair i is samples 2i (chosen) and 2i + 1
(rejected); a micro-batch holds whole pairs.

Loss over the P pairs of a step, r_w and r_l the values of the chosen and rejected texts:

    L = (1 / P) * sum_p -log sigmoid(r_w - r_l) = (1 / P) * sum_p softplus(r_l - r_w)

Metrics: ``loss``, ``accuracy`` (share of pairs with r_w > r_l; a tie counts one half),
``margin`` (mean r_w - r_l), and on the held-out pairs ``eval/loss``, ``eval/accuracy``,
``eval/margin`` and ``eval/accuracy/<tier>`` per tier.

The stage trains through a learner group (one or more DeepSpeed ranks, each a
:class:`~medrl.align.learner.Learner` with ``head="value"``); checkpoints hold ``policy/``, a
folder ``AutoModelForSequenceClassification.from_pretrained`` loads (the ``rubric`` reward
names it as ``model:``), and resume exactly like the other stages.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
import torch.nn.functional as F

from medrl.align.records import Sample, UserError

# ------------------------------------------------------------------------------- the loss


def bt_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Bradley-Terry loss of P pairs: mean softplus(r_l - r_w) = mean -log sigmoid(r_w - r_l).

    chosen, rejected: [P] values. Returns the loss (0-dim, differentiable) and metrics
    ``accuracy`` (r_w > r_l; ties count 1/2) and ``margin`` (mean r_w - r_l).
    """
    margin = chosen.float() - rejected.float()
    loss = F.softplus(-margin).mean()
    seen = margin.detach()
    right = (seen > 0).float() + 0.5 * (seen == 0).float()
    return loss, {"accuracy": float(right.mean()), "margin": float(seen.mean())}


def pair_loss(values: torch.Tensor, mb) -> tuple[torch.Tensor, dict[str, float]]:
    """The learner's ``loss_fn``: ``values`` [2P], chosen and rejected interleaved."""
    pairs = values.view(-1, 2)
    return bt_loss(pairs[:, 0], pairs[:, 1])


def pair_count(mb) -> float:
    """A micro-batch's share of the global normaliser: its number of pairs."""
    return mb.size / 2


# ------------------------------------------------------------------------ building examples


def encode_text(tokenizer, text: str, max_length: int) -> list[int]:
    """Token ids of ``text``, its left end cut to ``max_length`` tokens."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(ids[-max_length:])


def encode_pair(tokenizer, pair: Sample, max_length: int) -> list[Sample]:
    """A pair sample -> [chosen, rejected] samples in the learner's layout (the last token
    of each text as a one-token completion). Raises :class:`UserError` naming the pair when a
    text is empty."""
    out = []
    for side in ("chosen", "rejected"):
        ids = encode_text(tokenizer, pair.row[side], max_length)
        if len(ids) < 2:
            raise UserError(f"preference pair {pair.uid}: the {side} text has {len(ids)} "
                            "token(s); a reward model needs at least two.")
        out.append(replace(pair, uid=f"{pair.uid}/{side}", prompt_ids=ids[:-1],
                           completion_ids=ids[-1:], token_weights={}))
    return out


def encode_pairs(tokenizer, pairs: Sequence[Sample], max_length: int) -> list[Sample]:
    """:func:`encode_pair` of every pair, flattened: 2 samples per pair, in order."""
    return [s for pair in pairs for s in encode_pair(tokenizer, pair, max_length)]


# ------------------------------------------------------------------------------ evaluation


def pair_metrics(values: Sequence[float], tiers: Sequence[str]) -> dict[str, float]:
    """``eval/*`` metrics of pairs from their values [2P] (chosen, rejected interleaved) and
    their tiers [P]."""
    v = torch.tensor(list(values), dtype=torch.float64).view(-1, 2)
    loss, metrics = bt_loss(v[:, 0], v[:, 1])
    out = {"eval/loss": float(loss), "eval/accuracy": metrics["accuracy"],
           "eval/margin": metrics["margin"]}
    by_tier: dict[str, list[int]] = defaultdict(list)
    for i, tier in enumerate(tiers):
        if tier:  # pairs without a tier count in the overall figures only
            by_tier[tier].append(i)
    for tier, rows in sorted(by_tier.items()):
        out[f"eval/accuracy/{tier}"] = bt_loss(v[rows, 0], v[rows, 1])[1]["accuracy"]
    return out


# ------------------------------------------------------------------------------ stage loop


class PairLearner(Protocol):
    """The learner group the stage drives (``medrl.launch.learner_group.LearnerGroup``):
    every call is collective over its ranks and shards the global list by whole units."""

    def train_step_with(self, loss_fn: Callable, samples: Sequence[Sample], size_fn: Callable,
                        *, unit: int = 1) -> dict[str, float]: ...
    def values(self, samples: Sequence[Sample], *, unit: int = 1) -> list[float]: ...
    def save(self, out_dir: str | Path) -> None: ...
    def load(self, out_dir: str | Path) -> None: ...


@dataclass
class RewardModelIO:
    """What the launcher hands the stage loop; everything comes from the recipe.

    stream: a ``medrl.launch.stream.PromptStream`` over pair samples (``take``, ``state``,
    ``load_state``, ``epoch``, ``samples``); eval_pairs: held-out pair samples;
    make_learner(total_steps): the started learner group; tokenizer: the model's.
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
    epochs: int | None = None
    eval_every: int = 0
    checkpoint_every: int = 0
    keep_last: int | None = None


def evaluate(learner: PairLearner, encoded: Sequence[Sample], tiers: Sequence[str],
             batch_size: int) -> dict[str, float]:
    """``eval/*`` metrics (:func:`pair_metrics`) of held-out pairs, no update. encoded: their
    :func:`encode_pairs` (2 samples per pair); tiers: one per pair; batch_size: in pairs."""
    values: list[float] = []
    for i in range(0, len(encoded), 2 * batch_size):
        values += learner.values(encoded[i:i + 2 * batch_size], unit=2)
    return pair_metrics(values, tiers)


def run_stage(io: RewardModelIO, run_dir: Path, *, resume_from: Path | None = None) -> Path:
    """Run (or resume) the reward-model stage; returns the last checkpoint folder.

    Step k: take ``batch_size`` pairs from the stream, one optimiser step on the Bradley-Terry
    loss (micro-batches of whole pairs, all ranks), the held-out metrics every ``eval_every``
    steps and at the last, a checkpoint every ``checkpoint_every`` steps and at the end.
    """
    from medrl.align.checkpoint import read_state, save_checkpoint
    from medrl.align.rng_state import restore_rng, stage_state
    from medrl.align.stages.sft import total_steps

    steps = total_steps(max_steps=io.max_steps, epochs=io.epochs,
                        num_train=len(io.stream.samples), batch_size=io.batch_size)
    state = read_state(resume_from) if resume_from else None
    start = int(state["step"]) if state else 0
    learner = io.make_learner(steps)
    if state:
        learner.load(resume_from)
        io.stream.load_state(state["data_cursor"])
        restore_rng(state["rng"])
    held_out = encode_pairs(io.tokenizer, io.eval_pairs, io.max_length)  # once, for every eval
    tiers = [str(p.row.get("tier") or "") for p in io.eval_pairs]
    monitor = io.monitor_factory(steps, start)
    monitor.restore((state or {}).get("metrics_row"))  # a kill after COMPLETE, before the row
    last = resume_from
    try:
        for step in range(start + 1, steps + 1):
            pairs = io.stream.take(io.batch_size)
            batch = encode_pairs(io.tokenizer, pairs, io.max_length)
            metrics = learner.train_step_with(pair_loss, batch, pair_count, unit=2)
            metrics["epoch"] = float(io.stream.epoch)
            if io.eval_pairs and io.eval_every and (step % io.eval_every == 0 or step == steps):
                metrics.update(evaluate(learner, held_out, tiers, io.batch_size))
            if (io.checkpoint_every and step % io.checkpoint_every == 0) or step == steps:
                ckpt_state = stage_state("reward_model", step, cursor=io.stream.state(),
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
