"""Med3D-R1 rewards (docs/rewards.md, "Med3D-R1: format, accuracy and consistency"):
``med3d_format``, ``med3d_accuracy`` and ``med3d_consistency``.

Published (Med3D-R1, the authors' code laihaoran/Med3D-R1, ``stage2_rl``): three rewards
summed with equal weights; a format reward (exactly one ``<think>`` and one ``<answer>``
block, both non-empty, think first, no other tag, nothing else outside them); an accuracy
reward from the text of the answer tag (1 for the exact answer, 0.5 for the answer followed
by ``)`` or ``:``); a consistency reward: a sequence-classification reward model scores the
conversation [question, response, "The correct answer is <option text>"] and its raw logit
is quantised by the edges 0, 0.2, 0.5, 1.0, 1.6 onto 0, 0.2, 0.4, 0.6, 0.8, 1.0.

The published accuracy reward compares the answer with the correct option's *text* while its
prompt asks for the option *letter*, so a correct letter scores 0 there; ``med3d_accuracy``
reads the letter (and the option text) instead. What counts as punctuation after a letter,
letter case, the text normalisation and the rendering of the conversation are our readings.
"""

from __future__ import annotations

import bisect
import math
import re
from pathlib import Path
from typing import Annotated, Any, Sequence

from pydantic import Field

from medrl.align.records import Sample, UserError
from medrl.rewards.api import RewardContext, RewardResult, reward
from medrl.rewards.judge import JudgeClient, JudgeSpec, connect_judge
from medrl.rewards.rubric_scorers import CriterionPair, Dtype, RmRendering, scorer_model
# the multiple-choice row readers every built-in MCQ reward shares
from medrl.rewards.rules import _norm, _options, gold_letter, think_answer_format

# Published (Med3D-R1's quantisation operator Q): logit < edges[0] -> values[0], ...,
# edges[i-1] <= logit < edges[i] -> values[i], logit >= edges[-1] -> values[-1].
DEFAULT_EDGES: tuple[float, ...] = (0.0, 0.2, 0.5, 1.0, 1.6)
DEFAULT_VALUES: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
# Published: the last turn of the conversation the reward model scores.
ANSWER_TURN = "The correct answer is {answer}"

# ----------------------------------------------------------------------------------- format

_ANY_TAG = re.compile(r"</?\w+>")
_OWN_TAGS = frozenset({"<think>", "</think>", "<answer>", "</answer>"})


@reward("med3d_format")
def med3d_format(sample: Sample) -> float:
    """1.0 for ``<think>…</think><answer>…</answer>`` as :func:`think_answer_format` reads it
    (each tag once, both blocks non-empty, think first, only whitespace around them) that
    holds no other ``<word>`` / ``</word>`` tag (Med3D-R1's extra condition: ``<b>``, a second
    kind of block, an upper-case ``<THINK>`` all score 0), else 0.0. Tags are case-sensitive.
    """
    text = sample.completion_text
    if any(tag not in _OWN_TAGS for tag in _ANY_TAG.findall(text)):
        return 0.0
    return think_answer_format(sample)


# --------------------------------------------------------------------------------- accuracy

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
# a letter with punctuation, maybe followed by text: "D)", "D:", "D.", "(D)", "D) Emphysema"
_LETTER_MARK = re.compile(r"^\(?\s*([A-Za-z])\s*[):.]\s*(.*)$", re.S)


def answer_text(text: str) -> str | None:
    """The stripped text of the first ``<answer>…</answer>`` of ``text`` (case-sensitive
    tags, as the published reward reads it), or None without one."""
    m = _ANSWER.search(text)
    return m.group(1).strip() if m else None


def _text_key(text: str) -> str:
    """An option text compared without case, spacing and a final full stop."""
    return _norm(text).rstrip(".").strip()


def letter_accuracy(answer: str, gold: str, options: dict[str, str], *,
                    partial: float) -> float:
    """The score of one answer's text against the gold letter of ``options``.

    1.0: the letter alone (either case), or the text of the gold option (case, spacing and
    a final full stop aside). ``partial``: the gold letter with punctuation (``D)``, ``D:``,
    ``D.``, ``(D)``), alone or before some text, unless that text is another option's text.
    0.0 otherwise (another letter, another option's text, anything else).
    """
    if len(answer) == 1 and answer.upper() in options:
        return float(answer.upper() == gold)
    key = _text_key(answer)
    if key and key == _text_key(options[gold]):
        return 1.0
    m = _LETTER_MARK.match(answer)
    if m and m.group(1).upper() == gold:
        rest = _text_key(m.group(2) or "")
        others = {_text_key(v) for k, v in options.items() if k != gold}
        if rest and rest in others and rest != _text_key(options[gold]):
            return 0.0  # "D) Atelectasis" when D is Emphysema: the text contradicts the letter
        return partial
    return 0.0


@reward("med3d_accuracy")
def med3d_accuracy(sample: Sample, *,
                   partial: Annotated[float, Field(ge=0, le=1)] = 0.5) -> float | None:
    """Multiple-choice accuracy on the text of the first ``<answer>…</answer>`` (see
    :func:`letter_accuracy`): 1.0 for the gold letter alone or the gold option's text,
    ``partial`` (published: 0.5) for the letter with punctuation, 0.0 for anything else and
    for a completion without an answer tag. None when the row has no answer."""
    gold = gold_letter(sample.row)
    if gold is None:
        return None
    answer = answer_text(sample.completion_text)
    if not answer:
        return 0.0
    return letter_accuracy(answer, gold, _options(sample.row), partial=partial)


# ------------------------------------------------------------------------------ consistency


def check_bins(edges: Sequence[float], values: Sequence[float]
               ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The bins as tuples; raises :class:`UserError` unless the edges are finite and
    strictly increasing and there is one more value than edges, each finite."""
    edges, values = tuple(float(e) for e in edges), tuple(float(v) for v in values)
    if not edges or not all(math.isfinite(e) for e in edges) \
            or any(a >= b for a, b in zip(edges, edges[1:])):
        raise UserError(f"med3d_consistency: kwargs.edges {list(edges)} must be one or more "
                        "finite numbers in strictly increasing order (the logits where the "
                        "reward steps up).")
    if len(values) != len(edges) + 1 or not all(math.isfinite(v) for v in values):
        raise UserError(f"med3d_consistency: kwargs.values has {len(values)} entries for "
                        f"{len(edges)} edges; give one finite reward per bin, i.e. "
                        f"{len(edges) + 1} (below the first edge, between each pair, from "
                        "the last edge on).")
    return edges, values


def bin_logit(logit: float, edges: Sequence[float], values: Sequence[float]) -> float:
    """``values[i]`` for the bin of ``logit``: i = the number of edges at or below it (an
    edge belongs to the bin above it). edges: [n] increasing; values: [n + 1]."""
    if not math.isfinite(logit):
        raise ValueError(f"the reward model gave the logit {logit!r}; a finite number is "
                         "needed to bin it")
    return values[bisect.bisect_right(edges, logit)]


@reward("med3d_consistency")
class Med3DConsistency:
    """The reward model's logit on [question, response, :data:`ANSWER_TURN` with the gold
    option's text], binned by ``edges`` / ``values`` (:func:`bin_logit`; published defaults
    :data:`DEFAULT_EDGES`, :data:`DEFAULT_VALUES`). None when the row has no answer.

    model: a local one-label ``AutoModelForSequenceClassification`` folder (relative to the
    recipe), a ``reward_model`` stage run folder, or ``tiny:qwen2`` (random: smoke runs).
    rendering: ``chat`` (the conversation through the reward model's chat template, as
    published) or ``criterion`` (the answer turn as the criterion of the ``rubric`` reward
    model's text, for a criterion reward model trained here). answer_turn: the last turn,
    ``{answer}`` the gold option's text. The model runs in the shared judge actors of
    :mod:`medrl.rewards.judge` (``replicas``, ``judge_num_cpus``, ``judge_num_gpus``,
    ``judge_timeout_s``) asked for raw logits, so it is never shared with a rubric reward
    reading probabilities from the same folder. info: ``logit``.
    """

    def __init__(self, model: str, *, edges: tuple[float, ...] = DEFAULT_EDGES,
                 values: tuple[float, ...] = DEFAULT_VALUES, rendering: RmRendering = "chat",
                 answer_turn: str = ANSWER_TURN,
                 batch_size: Annotated[int, Field(gt=0)] = 16,
                 max_length: Annotated[int, Field(gt=0)] = 2048, dtype: Dtype = "float32",
                 replicas: Annotated[int, Field(gt=0)] = 1,
                 judge_num_cpus: Annotated[float, Field(ge=0)] = 1.0,
                 judge_num_gpus: Annotated[float, Field(ge=0)] = 0.0,
                 judge_timeout_s: Annotated[float, Field(gt=0)] | None = None):
        self.edges, self.values = check_bins(edges, values)
        if "{answer}" not in answer_turn:
            raise UserError("med3d_consistency: kwargs.answer_turn must hold {answer}, where "
                            "the correct option's text goes.")
        self.model_path, self.rendering, self.answer_turn = model, rendering, answer_turn
        self.batch_size, self.max_length, self.dtype = batch_size, max_length, dtype
        self.replicas, self.judge_timeout_s = replicas, judge_timeout_s
        self.judge_num_cpus, self.judge_num_gpus = judge_num_cpus, judge_num_gpus
        self.judge: JudgeClient | None = None

    @staticmethod
    def identity_extra(kwargs: dict[str, Any], base_dir: Path | None) -> dict[str, Any]:
        """Pins the reward model in checkpoints (a hash over the whole folder)."""
        from medrl.rewards.loader import hash_folder

        folder, _ = scorer_model(kwargs["model"], base_dir)
        return {"model_dir": str(folder), "model_sha256": hash_folder(folder)}

    def spec(self, ctx: RewardContext) -> JudgeSpec:
        """The judge this reward scores on: the reward model, asked for raw logits."""
        folder, tiny = scorer_model(self.model_path, ctx.base_dir)
        return JudgeSpec("reward_model", str(folder.resolve()), tiny, self.dtype,
                         self.batch_size, self.max_length, ctx.device, output="logit",
                         rendering=self.rendering)

    def setup(self, ctx: RewardContext) -> None:
        self.judge = connect_judge(self.spec(ctx), run_dir=ctx.run_dir, replicas=self.replicas,
                                   num_cpus=self.judge_num_cpus, num_gpus=self.judge_num_gpus,
                                   timeout_s=self.judge_timeout_s)

    def __call__(self, samples: list[Sample]) -> list[RewardResult]:
        turns: dict[int, str | None] = {}  # a group's completions share their row
        pairs, scored = [], []
        for i, s in enumerate(samples):
            if id(s.row) not in turns:
                gold = gold_letter(s.row)
                turns[id(s.row)] = None if gold is None else \
                    self.answer_turn.format(answer=_options(s.row)[gold])
            if turns[id(s.row)] is not None:
                pairs.append(CriterionPair(s, turns[id(s.row)], 0))
                scored.append(i)
        logits = self.judge.score(pairs) if pairs else []  # one call for the whole batch
        if len(logits) != len(pairs):
            raise ValueError(f"the reward model returned {len(logits)} logits for "
                             f"{len(pairs)} samples")
        out = [RewardResult(None) for _ in samples]
        for i, logit in zip(scored, logits):
            out[i] = RewardResult(bin_logit(float(logit), self.edges, self.values),
                                  info={"logit": round(float(logit), 6)})
        return out

    def batch_metrics(self) -> dict[str, float]:
        """The last call's judge metrics (judge_seconds, judge_pairs, judge_pairs_per_s)."""
        return self.judge.metrics() if self.judge else {}

