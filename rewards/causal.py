"""MedCausalX rewards (docs/rewards.md, "MedCausalX"): ``reflection_format`` (R_format),
``causal_attribution`` (R_acc plus marks from the first wrong step), ``causal_consistency``
(R_causal) and ``box_iou`` (grounding).

Published (arXiv 2603.23085): R = R_acc + R_format + R_causal; R_acc = 1[y_hat = y*];
R_format = the share of tokens in valid reflection blocks; R_causal = (1/(|S|-1)) sum_i
Cons(s_i, s_{i+1}), a binary consistency of adjacent reasoning steps; the error of a wrong
chain is attributed to t_fail, the first step whose similarity to the gold step is below
tau = 0.7. What a valid block is, how steps are cut, the similarity, the rule consistency and
the box format are this project's readings, said where they are made.
"""

from __future__ import annotations

import difflib
import math
import numbers
import re
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, Protocol, Sequence

from pydantic import Field

from medrl.align.records import Sample, UserError
from medrl.rewards.api import RewardContext, RewardResult, is_class_reward, registered, reward
from medrl.rewards.repair import StepUnit, step_spans, token_offsets

Reasoning = Literal["last_verify", "all"]

# ------------------------------------------------------------------------ reflection blocks

_TAGS = re.compile(r"<(/?)(causal|verify)>")
_ANY_TAG = re.compile(r"</?(?:causal|verify|step|think|answer)>")


class Block(NamedTuple):
    """A valid reflection block: its tag and character spans (tags included, and inner)."""

    tag: str
    start: int
    end: int
    inner_start: int
    inner_end: int


def reflection_blocks(text: str) -> list[Block]:
    """The valid ``<causal>`` / ``<verify>`` blocks of ``text``, in order of their start.

    Valid (our reading of the paper's "valid reflection blocks"): opened and closed by the
    same tag, properly nested (a block may hold another), with some text inside besides
    tags. A closing tag that does not close the innermost open block (a stray or crossing
    tag) makes every block still open invalid; a block never closed is invalid. Blocks
    inside an invalid block stay valid.
    """
    stack: list[tuple[str, re.Match]] = []
    out = []
    for m in _TAGS.finditer(text):
        closing, tag = m.group(1) == "/", m.group(2)
        if not closing:
            stack.append((tag, m))
        elif stack and stack[-1][0] == tag:
            opening = stack.pop()[1]
            if _TAGS.sub("", text[opening.end():m.start()]).strip():
                out.append(Block(tag, opening.start(), m.end(), opening.end(), m.start()))
        else:
            stack.clear()
    return sorted(out, key=lambda b: b.start)


def covered(offsets: Sequence[tuple[int, int]], blocks: Sequence[Block]) -> int:
    """How many of the spans ``offsets`` lie wholly inside some block (tags included)."""
    return sum(any(b.start <= a and e <= b.end for b in blocks) for a, e in offsets)


class TokenText(NamedTuple):
    """A completion as its tokens' text: ``text`` = the pieces joined, ``offsets`` each
    token's span in it, ``core`` the tokens before the trailing special ones (end of turn)."""

    text: str
    offsets: list[tuple[int, int]]
    core: int


def token_text(tokenizer, special: set[int], completion_ids: Sequence[int]) -> TokenText:
    core = len(completion_ids)
    while core and completion_ids[core - 1] in special:
        core -= 1
    pieces = [tokenizer.decode([t]) for t in completion_ids[:core]]
    return TokenText("".join(pieces), token_offsets(pieces), core)


def _policy_tokenizer(ctx: RewardContext, name: str):
    from medrl.align.encode import text_tokenizer
    from medrl.align.models import load_tokenizer

    if ctx.policy_dir is None:
        raise UserError(f"{name} counts the policy's tokens and needs its tokenizer "
                        "(ctx.policy_dir); run it inside a GRPO run"
                        + (", or set kwargs.unit: char." if name == "reflection_format" else "."))
    tokenizer = text_tokenizer(load_tokenizer(ctx.policy_dir))
    return tokenizer, set(tokenizer.all_special_ids)


@reward("reflection_format")
class ReflectionFormat:
    """R_format: the share of the completion inside valid reflection blocks, 0 without any.

    unit: ``token`` (the policy's tokens, the trailing end-of-turn left out of the count) or
    ``char`` (characters of ``completion_text``; needs no tokenizer).
    """

    def __init__(self, *, unit: Literal["token", "char"] = "token"):
        self.unit = unit

    def setup(self, ctx: RewardContext) -> None:
        if self.unit == "token":
            self.tokenizer, self.special = _policy_tokenizer(ctx, "reflection_format")

    def score(self, sample: Sample) -> float:
        if self.unit == "char":
            text = sample.completion_text
            offsets = [(i, i + 1) for i in range(len(text))]
        else:
            text, offsets, _ = token_text(self.tokenizer, self.special, sample.completion_ids)
        blocks = reflection_blocks(text)
        return covered(offsets, blocks) / len(offsets) if blocks and offsets else 0.0

    def __call__(self, samples: list[Sample]) -> list[RewardResult]:
        return [RewardResult(self.score(s)) for s in samples]


# ----------------------------------------------------------------------------- steps

_ENUMERATION = re.compile(r"^(?:step\s*)?\d+\s*[.):-]?\s*", re.I)


def normalised_words(text: str) -> list[str]:
    """Lower-case words of a step, its tags and a leading "Step 2:" / "2." dropped."""
    text = _ENUMERATION.sub("", _ANY_TAG.sub(" ", text).strip())
    return re.findall(r"[^\W_]+", text.lower())


def reasoning_span(text: str, reasoning: Reasoning) -> tuple[int, int]:
    """Where the steps are read: ``last_verify``: inside the last valid ``<verify>`` block
    (the corrected chain the answer rests on), or the whole text when there is none;
    ``all``: the whole text."""
    if reasoning == "last_verify":
        verify = [b for b in reflection_blocks(text) if b.tag == "verify"]
        if verify:
            return verify[-1].inner_start, verify[-1].inner_end
    return 0, len(text)


def reasoning_steps(text: str, unit: StepUnit, reasoning: Reasoning) -> list[tuple[int, int]]:
    """The character spans of the steps of ``text`` that hold a word (see
    :func:`reasoning_span`, and :func:`medrl.rewards.repair.step_spans` for ``unit``)."""
    a, b = reasoning_span(text, reasoning)
    return [(s + a, e + a) for s, e in step_spans(text[a:b], unit)
            if normalised_words(text[s + a:e + a])]


def gold_steps(row: dict[str, Any], field: str, unit: StepUnit) -> list[str] | None:
    """The gold chain of a row: ``row[field]`` as a list of steps, or a string cut into
    steps by ``unit``; None when the row has none. A value of another type is a ValueError
    naming the field (never its text)."""
    value = row.get(field)
    if value is None:
        return None
    if isinstance(value, str):
        steps = [value[a:b] for a, b in step_spans(value, unit)]
    elif isinstance(value, (list, tuple)):
        bad = [i for i, v in enumerate(value) if not isinstance(v, str)]
        if bad:
            raise ValueError(f"the row's field {field!r} is a list whose entry {bad[0]} is not "
                             "a string; a gold chain is a string or a list of step strings")
        steps = list(value)
    else:
        raise ValueError(f"the row's field {field!r} is a {type(value).__name__}; a gold "
                         "chain is a string or a list of step strings")
    steps = [s.strip() for s in steps if normalised_words(s)]
    return steps or None


class StepSimilarity(Protocol):
    """``score(pairs) -> list[float]``: for each (step, gold step) a similarity in [0, 1].
    One call per batch, so an embedding model or a judge can batch its work."""

    def score(self, pairs: Sequence[tuple[str, str]]) -> list[float]: ...


class WordRatio:
    """difflib's ratio 2M/T over the two steps' normalised words (:func:`normalised_words`):
    1 for the same words in the same order, whatever the case, punctuation and numbering."""

    def score(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        return [difflib.SequenceMatcher(None, normalised_words(a), normalised_words(b),
                                        autojunk=False).ratio() for a, b in pairs]


def first_failed_step(similarities: Sequence[float], num_steps: int, tau: float) -> int | None:
    """t_fail: the first step whose similarity to its gold step is below ``tau``, or, when
    all those match, the first step past the gold chain (what follows the shared correct
    prefix); None when every step has a gold step and matches it.

    similarities: one per step that has a gold step (the first min(steps, gold) steps)."""
    for i, sim in enumerate(similarities):
        if sim < tau:
            return i
    return len(similarities) if num_steps > len(similarities) else None


def _outcome(name: str, outcome: str):
    target = registered().get(outcome)
    if target is None or is_class_reward(target):
        names = sorted(n for n, t in registered().items() if not is_class_reward(t))
        raise UserError(f"{name}: outcome {outcome!r} is not a registered function reward; "
                        f"choose one of {', '.join(names)}.")
    return target


def _similarity(ref: str, base_dir: Path | None) -> StepSimilarity:
    if ref == "word_ratio":
        return WordRatio()
    from medrl.rewards.loader import resolve

    target = resolve(ref, base_dir=base_dir, where="causal_attribution: kwargs.similarity")[0]
    scorer = target() if isinstance(target, type) else target
    if not callable(getattr(scorer, "score", None)):
        raise UserError(f"causal_attribution: kwargs.similarity {ref!r} has no score(pairs) "
                        "method; give a StepSimilarity class or object.")
    return scorer


@reward("causal_attribution")
class CausalAttribution:
    """R_acc (the ``outcome`` reward's score) plus error marks from the first wrong step.

    A sample whose score is below ``threshold`` and whose row has a gold chain
    (``gold_chain_field``) is attributed: its steps (:func:`reasoning_steps` with ``unit``
    and ``reasoning``) are compared with the gold steps in order by ``similarity``
    (``word_ratio``, or a ``module:Class`` / ``file.py:Class`` reference to a
    :class:`StepSimilarity`), t_fail is :func:`first_failed_step` with ``tau``, and
    ``token_marks`` are 1 on every token from the start of step t_fail to the end of the
    completion (its final answer included), never on the trailing end-of-turn token.
    A correct answer, a row without a chain and a failed answer whose steps all match get
    no marks. info: ``t_fail`` (None when unmarked), ``steps``, ``gold_steps``,
    ``similarities``. batch_metrics: ``failed``, ``attributed``, ``no_chain``, ``unmarked``
    (failed, with a chain, nothing to mark), ``t_fail_mean``, ``marked_token_share``.
    """

    def __init__(self, *, outcome: str = "mcq_letter", outcome_kwargs: dict[str, Any] | None = None,
                 threshold: float = 0.5, gold_chain_field: str = "gold_chain",
                 unit: StepUnit = "sentence", reasoning: Reasoning = "last_verify",
                 tau: Annotated[float, Field(ge=0, le=1)] = 0.7, similarity: str = "word_ratio"):
        self.outcome = _outcome("causal_attribution", outcome)
        self.outcome_kwargs, self.threshold = dict(outcome_kwargs or {}), threshold
        self.field, self.unit, self.reasoning = gold_chain_field, unit, reasoning
        self.tau, self.similarity_ref = tau, similarity
        self.stats: dict[str, float] = {}

    def setup(self, ctx: RewardContext) -> None:
        self.tokenizer, self.special = _policy_tokenizer(ctx, "causal_attribution")
        self.similarity = _similarity(self.similarity_ref, ctx.base_dir)

    def __call__(self, samples: list[Sample]) -> list[RewardResult]:
        scores = [self.outcome(s, **self.outcome_kwargs) for s in samples]
        chains: dict[int, list[str] | None] = {}  # a group's completions share their row
        todo = []  # (sample index, token text, step spans, gold steps)
        failed = no_chain = 0
        for i, (s, score) in enumerate(zip(samples, scores)):
            if score is None or score >= self.threshold:
                continue
            failed += 1
            if id(s.row) not in chains:
                chains[id(s.row)] = gold_steps(s.row, self.field, self.unit)
            gold = chains[id(s.row)]
            if gold is None:
                no_chain += 1
                continue
            view = token_text(self.tokenizer, self.special, s.completion_ids)
            todo.append((i, view, reasoning_steps(view.text, self.unit, self.reasoning), gold))
        pairs = [(view.text[a:b], gold[k]) for _, view, steps, gold in todo
                 for k, (a, b) in enumerate(steps[:len(gold)])]
        sims = [float(x) for x in self.similarity.score(pairs)] if pairs else []
        if len(sims) != len(pairs):
            raise ValueError(f"the similarity scorer returned {len(sims)} values for "
                             f"{len(pairs)} step pairs")
        results = [RewardResult(None if sc is None else float(sc)) for sc in scores]
        at = marked = tokens = 0
        t_fails = []
        for i, view, steps, gold in todo:
            mine = sims[at:at + min(len(steps), len(gold))]
            at += len(mine)
            t_fail = first_failed_step(mine, len(steps), self.tau)
            marks = None
            if t_fail is not None:  # every token reaching past the start of step t_fail
                start = steps[t_fail][0]
                marks = [float(end > start) for _, end in view.offsets[:view.core]]
                marks += [0.0] * (len(samples[i].completion_ids) - view.core)
                t_fails.append(t_fail)
                marked, tokens = marked + int(sum(marks)), tokens + len(marks)
            results[i] = RewardResult(float(scores[i]), token_marks=marks, info={
                "t_fail": t_fail, "steps": len(steps), "gold_steps": len(gold),
                "similarities": [round(x, 4) for x in mine]})
        self.stats = {"failed": float(failed), "attributed": float(len(t_fails)),
                      "no_chain": float(no_chain), "unmarked": float(len(todo) - len(t_fails)),
                      "t_fail_mean": sum(t_fails) / len(t_fails) if t_fails else 0.0,
                      "marked_token_share": marked / tokens if tokens else 0.0}
        return results

    def batch_metrics(self) -> dict[str, float]:
        return dict(self.stats)


# ------------------------------------------------------------------------- consistency

CONSISTENCY_CRITERION = (
    "Step 2 follows from Step 1: it is consistent with Step 1, does not contradict it, and "
    "continues the same line of reasoning.")
# Words too common to show that two steps talk about the same thing (the rule scorer).
_STOPWORDS = frozenset(
    "about also because been being both could does each from have here into more most must "
    "only other same should since some such than that their them then there these they this "
    "those thus very were what when where which while will with would answer option step "
    "therefore".split())


def shares_content_word(prev: str, nxt: str, *, min_length: int = 4) -> bool:
    """The rule Cons(s_i, s_{i+1}): the next step repeats a content word (``min_length``
    letters or more, not a stop word) of the previous one. A weak lexical heuristic: it
    says the two steps talk about the same thing, not that one follows from the other."""
    def content(text: str) -> set[str]:
        return {w for w in normalised_words(text) if len(w) >= min_length and w not in _STOPWORDS}

    return bool(content(prev) & content(nxt))


def step_pair_text(prev: str, nxt: str) -> str:
    """The response a judge reads for one pair of adjacent steps."""
    def clean(text: str) -> str:
        return " ".join(_ANY_TAG.sub(" ", text).split())

    return f"Step 1: {clean(prev)}\nStep 2: {clean(nxt)}"


@reward("causal_consistency")
class CausalConsistency:
    """R_causal: the mean over adjacent step pairs of a binary verdict Cons(s_i, s_{i+1});
    None for a completion with fewer than 2 steps (steps as in ``causal_attribution``).

    scorer: ``rule`` (:func:`shares_content_word`; no model), or, through the shared judges
    of :mod:`medrl.rewards.judge` with the model folder ``model``: ``judge`` (a causal LM
    answering whether :data:`CONSISTENCY_CRITERION` is met by :func:`step_pair_text`) or
    ``reward_model`` (a criterion-conditioned reward model on the same text). A verdict at
    or above 0.5 counts as consistent; a pair the judge calls not applicable (or a malformed
    answer under ``on_malformed: not_applicable``) is left out of the mean. The judge
    kwargs are the ``rubric`` reward's. info: ``pairs``, ``consistent``.
    """

    def __init__(self, *, scorer: Literal["rule", "judge", "reward_model"] = "rule",
                 model: str | None = None, unit: StepUnit = "sentence",
                 reasoning: Reasoning = "last_verify",
                 min_word_length: Annotated[int, Field(ge=1)] = 4,
                 batch_size: Annotated[int, Field(gt=0)] = 16,
                 max_length: Annotated[int, Field(gt=0)] = 2048,
                 dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32",
                 max_new_tokens: Annotated[int, Field(gt=0)] | None = None,
                 max_retries: Annotated[int, Field(ge=0)] | None = None,
                 on_malformed: Literal["error", "not_applicable"] | None = None,
                 replicas: Annotated[int, Field(gt=0)] = 1,
                 judge_num_cpus: Annotated[float, Field(ge=0)] = 1.0,
                 judge_num_gpus: Annotated[float, Field(ge=0)] = 0.0,
                 judge_timeout_s: Annotated[float, Field(gt=0)] | None = None):
        from medrl.rewards.rubric import judge_options

        if (scorer == "rule") != (model is None):
            raise UserError("causal_consistency: kwargs.model names the judge's folder for "
                            "scorer: judge or reward_model, and the rule scorer takes none; "
                            "set both or neither.")
        self.scorer_kind, self.model_path, self.unit, self.reasoning, self.dtype = \
            scorer, model, unit, reasoning, dtype
        self.min_word_length, self.batch_size, self.max_length, self.replicas = \
            min_word_length, batch_size, max_length, replicas
        self.judge_num_cpus, self.judge_num_gpus, self.judge_timeout_s = \
            judge_num_cpus, judge_num_gpus, judge_timeout_s
        self.max_new_tokens, self.max_retries, self.on_malformed = judge_options(
            "reward_model" if scorer == "rule" else scorer, max_new_tokens, max_retries,
            on_malformed, reward_name="causal_consistency")
        self.judge = None

    @staticmethod
    def identity_extra(kwargs: dict[str, Any], base_dir: Path | None) -> dict[str, Any]:
        """Pins the judge's model folder in checkpoints (a hash over the whole folder)."""
        if not kwargs.get("model"):
            return {}
        from medrl.rewards.loader import hash_folder
        from medrl.rewards.rubric_scorers import scorer_model

        folder, _ = scorer_model(kwargs["model"], base_dir)
        return {"model_dir": str(folder), "model_sha256": hash_folder(folder)}

    def setup(self, ctx: RewardContext) -> None:
        if self.scorer_kind == "rule":
            return
        from medrl.rewards.rubric import connect_criterion_judge

        self.judge = connect_criterion_judge(self, ctx)

    def __call__(self, samples: list[Sample]) -> list[RewardResult]:
        from medrl.rewards.rubric_scorers import CriterionPair

        steps = [[s.completion_text[a:b] for a, b in reasoning_steps(
            s.completion_text, self.unit, self.reasoning)] for s in samples]
        adjacent = [list(zip(st, st[1:])) for st in steps]
        if self.judge is None:
            verdicts = [float(shares_content_word(a, b, min_length=self.min_word_length))
                        for pairs in adjacent for a, b in pairs]
        else:
            pairs = [CriterionPair(Sample(uid=s.uid, group_id=s.group_id, messages=s.messages,
                                          completion_text=step_pair_text(a, b)),
                                   CONSISTENCY_CRITERION, k)
                     for s, mine in zip(samples, adjacent) for k, (a, b) in enumerate(mine)]
            verdicts = self.judge.score(pairs) if pairs else []
            if len(verdicts) != len(pairs):
                raise ValueError(f"the {self.scorer_kind} judge returned {len(verdicts)} "
                                 f"verdicts for {len(pairs)} step pairs")
        out, at = [], 0
        for mine in adjacent:
            given = [float(v >= 0.5) for v in verdicts[at:at + len(mine)] if v is not None]
            at += len(mine)
            out.append(RewardResult(sum(given) / len(given) if given else None,
                                    info={"pairs": len(mine), "consistent": int(sum(given))}))
        return out

    def batch_metrics(self) -> dict[str, float]:
        return self.judge.metrics() if self.judge else {}


# -------------------------------------------------------------------------------- boxes

_BOX = re.compile(r"<box>(.*?)</box>", re.S | re.I)
_NUMBER = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$")
Box = tuple[float, float, float, float]  # x1, y1, x2, y2 with x1 <= x2 and y1 <= y2


def corners(a: float, b: float, c: float, d: float) -> Box:
    """The box two corners span, given in either order (a swapped box is the same box)."""
    return min(a, c), min(b, d), max(a, c), max(b, d)


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two sorted boxes; 0 when disjoint (or both of no area)."""
    inter = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0) * \
        max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def parse_box(text: str) -> Box | None:
    """The box of ``<box>`` contents ``x1,y1,x2,y2`` (four numbers, commas, spaces allowed,
    optionally in brackets), None when malformed."""
    parts = [p.strip() for p in text.strip().strip("[]()").split(",")]
    if len(parts) != 4 or not all(_NUMBER.match(p) for p in parts):
        return None
    values = [float(p) for p in parts]
    return corners(*values) if all(math.isfinite(v) for v in values) else None


def row_box(value: Any, field: str) -> Box:
    """The row's gold box: a list of 4 finite numbers spanning a non-zero area."""
    ok = isinstance(value, (list, tuple)) and len(value) == 4 and all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
        for v in value)
    box = corners(*map(float, value)) if ok else None
    if box is None or box[0] == box[2] or box[1] == box[3]:
        raise ValueError(f"the row's field {field!r} is not a box: expected a list of 4 "
                         "finite numbers [x1, y1, x2, y2] spanning a non-zero area")
    return box


@reward("box_iou")
def box_iou(sample: Sample, *, box_field: str = "box") -> float | None:
    """IoU of the completion's last ``<box>x1,y1,x2,y2</box>`` with ``row[box_field]``
    (the same coordinate system, e.g. pixels; corners in either order); 0 for a missing or
    malformed box, None when the row has no box."""
    gold = sample.row.get(box_field)
    if gold is None:
        return None
    gold_box = row_box(gold, box_field)
    found = _BOX.findall(sample.completion_text)
    predicted = parse_box(found[-1]) if found else None
    return 0.0 if predicted is None else iou(predicted, gold_box)
