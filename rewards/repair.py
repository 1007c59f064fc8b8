"""Difference Feedback: repair a failed answer, align it with its repair, mark what changed.

Process-level supervision without a process reward model: for a rollout whose outcome reward
is below a threshold, a **repairer** writes a minimally corrected answer; the token-level
**alignment** of the failed completion with its repair marks the tokens the repair replaced or
deleted (m_t = 1), optionally **widened** to the reasoning step that holds them; the marks go
back as ``RewardResult.token_marks`` and the advantage phase turns them into per-token
advantages (:mod:`medrl.align.process`).

The published method (arXiv 2603.27482) describes only this idea in its abstract; the
repairers, the alignment rule, the widening and the prompt below are this project's design
(docs/rewards.md says so).

Repairers (:class:`Repairer`):

- ``rule``: replace the final answer span with the gold answer (an ``<answer>`` tag, "the
  answer is (B)", "Answer: yes"), or append one when there is none. Cheap, deterministic,
  marks only the answer: a baseline and the tests' repairer.
- ``policy``: the run's rollout engines (the current policy, or whatever model they serve)
  rewrite the answer given the question, the failed answer and the reference (gold answer,
  and the row's rationale when ``rationale_field`` names one: PubMedQA's
  ``answer_rationale``), through ``ctx.generate``; greedy by default, so a resumed run makes
  the same repairs.
"""

from __future__ import annotations

import difflib
import re
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Protocol, Sequence

from pydantic import Field

from medrl.align.records import Sample, UserError
from medrl.rewards.api import RewardContext, RewardResult, is_class_reward, registered, reward
from medrl.rewards.rules import _ANSWER_PHRASE, _TAG, _YNM, _YNM_PHRASE, _norm, _options, \
    gold_letter

StepUnit = Literal["token", "line", "sentence", "block"]

# --------------------------------------------------------------------------- the alignment


def difference_marks(failed: Sequence[int], repaired: Sequence[int]) -> list[float]:
    """m_t for each token of ``failed``: 1.0 where the repair replaced or deleted it, else 0.0.

    A pure insertion (the repair adds tokens the failed answer lacks) marks the failed token at
    the insertion point (the first one after it, or the last token when the repair appends), so
    an omission is not blame-free. ``difflib.SequenceMatcher`` over token ids, without its
    popularity heuristic (which would treat frequent tokens of long answers as junk).
    """
    marks = [0.0] * len(failed)
    if not failed:
        return marks
    matcher = difflib.SequenceMatcher(a=list(failed), b=list(repaired), autojunk=False)
    for tag, i1, i2, _, _ in matcher.get_opcodes():
        if tag in ("replace", "delete"):
            marks[i1:i2] = [1.0] * (i2 - i1)
        elif tag == "insert":
            marks[min(i1, len(failed) - 1)] = 1.0
    return marks


def token_offsets(pieces: Sequence[str]) -> list[tuple[int, int]]:
    """Character span of each token in ``"".join(pieces)`` (pieces: each token's text)."""
    out, at = [], 0
    for piece in pieces:
        out.append((at, at + len(piece)))
        at += len(piece)
    return out


_SENTENCE_END = re.compile(r"[.!?](?=\s)|\n")
_BLOCK = re.compile(r"<(step|causal|verify|think)>.*?</\1>", re.S)


def step_spans(text: str, unit: StepUnit) -> list[tuple[int, int]]:
    """The reasoning steps of ``text`` as character spans covering it, in order.

    line: up to and including each newline. sentence: up to a ``.``/``!``/``?`` followed by
    whitespace, or a newline. block: each ``<step>``, ``<causal>``, ``<verify>`` or
    ``<think>`` block (tags included) is one step; text between blocks splits by lines.
    token: every character its own step (no widening).
    """
    if unit == "token":
        return [(i, i + 1) for i in range(len(text))]
    if unit == "block":
        spans, at = [], 0
        for m in _BLOCK.finditer(text):
            spans += [(a + at, b + at) for a, b in step_spans(text[at:m.start()], "line")]
            spans.append((m.start(), m.end()))
            at = m.end()
        return spans + [(a + at, b + at) for a, b in step_spans(text[at:], "line")]
    pattern = re.compile(r"\n") if unit == "line" else _SENTENCE_END
    spans, start = [], 0
    for m in pattern.finditer(text):
        spans.append((start, m.end()))
        start = m.end()
    if start < len(text):
        spans.append((start, len(text)))
    return spans


def widen_marks(marks: Sequence[float], offsets: Sequence[tuple[int, int]],
                spans: Sequence[tuple[int, int]]) -> list[float]:
    """Each mark spread to every token of its step: a token belongs to the step holding its
    first character (an empty token: the step holding the position it sits at); a step takes
    the largest mark of its tokens. marks, offsets: one per token; spans: from
    :func:`step_spans`."""
    starts = [a for a, _ in spans]

    def step_of(pos: int) -> int:
        lo, hi = 0, len(starts) - 1
        while lo < hi:  # the last span starting at or before pos
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if starts[mid] <= pos else (lo, mid - 1)
        return lo

    if not spans:
        return list(marks)
    steps = [step_of(a) for a, _ in offsets]
    best: dict[int, float] = {}
    for step, m in zip(steps, marks):
        best[step] = max(best.get(step, 0.0), float(m))
    return [best[step] for step in steps]


# ----------------------------------------------------------------------------- repairers


@dataclass(frozen=True)
class Reference:
    """What a repair may know: the gold ``answer`` as it should be written (an option letter
    for MCQ rows, yes/no/maybe, or free text), the gold option's text when there is one, and
    the row's rationale (None when it has none)."""

    answer: str
    option_text: str | None = None
    rationale: str | None = None


def reference_of(row: dict[str, Any], rationale_field: str | None = None) -> Reference | None:
    """The reference answer of a dataset row (None when the row has no answer)."""
    rationale = row.get(rationale_field) if rationale_field else None
    rationale = rationale.strip() if isinstance(rationale, str) and rationale.strip() else None
    if row.get("options"):
        letter = gold_letter(row)
        if letter is None:
            return None
        return Reference(letter, _options(row)[letter], rationale)
    answer = row.get("answer")
    if not isinstance(answer, str) or not answer.strip():
        return None
    return Reference(answer.strip(), None, rationale)


class Repairer(Protocol):
    """Repairs failed answers: one corrected completion text per sample (None: no repair)."""

    def repair(self, samples: list[Sample], references: list[Reference]) -> list[str | None]: ...


def _replace_span(text: str, start: int, end: int, new: str) -> str:
    return text[:start] + new + text[end:]


class RuleRepairer:
    """Put the gold answer where the completion states its answer (the last ``<answer>`` tag,
    else the last answer phrase naming an option letter or yes/no/maybe); append
    "The answer is (X)." / "Answer: X" when it states none."""

    def repair(self, samples: list[Sample], references: list[Reference]) -> list[str | None]:
        return [self.repair_one(s.completion_text, ref, _options(s.row) if s.row.get("options")
                                else {}) for s, ref in zip(samples, references)]

    @staticmethod
    def repair_one(text: str, ref: Reference, options: dict[str, str]) -> str:
        """text: the failed completion; options: the row's {letter: text} ({} without)."""
        ynm = ref.option_text is not None and _norm(ref.option_text) in _YNM
        tags = list(_TAG.finditer(text))
        if tags:
            m = tags[-1]
            inner = ref.answer if ref.option_text is None or not ynm else _norm(ref.option_text)
            return _replace_span(text, m.start(1), m.end(1), inner)
        if ref.option_text is not None:
            letters = [m for m in _ANSWER_PHRASE.finditer(text) if m.group(1).upper() in options
                       and (m.group(1).isupper() or "(" in m.group(0))]
            if letters:
                m = letters[-1]
                return _replace_span(text, m.start(1), m.end(1), ref.answer)
            said = list(_YNM_PHRASE.finditer(text)) if ynm else []
            if said:
                m = said[-1]
                return _replace_span(text, m.start(1), m.end(1), _norm(ref.option_text))
            return text.rstrip() + f"\nThe answer is ({ref.answer})."
        return text.rstrip() + f"\nAnswer: {ref.answer}"


REPAIR_SYSTEM = (
    "You correct answers to medical questions. Rewrite the answer below with as few changes as "
    "possible so that its reasoning and its final answer are correct: keep every correct "
    "sentence word for word, change only what is wrong, and keep the answer's format. Reply "
    "with the corrected answer only.")


def repair_messages(question: str, failed: str, ref: Reference, *,
                    system: str = REPAIR_SYSTEM) -> list[dict[str, str]]:
    """The chat a policy repairer answers: the question, the answer to correct, and the
    reference answer (with its option text and rationale when known)."""
    gold = ref.answer if ref.option_text is None else f"({ref.answer}) {ref.option_text}"
    parts = [f"Question:\n{question}", f"Answer to correct:\n{failed}",
             f"Correct final answer: {gold}"]
    if ref.rationale:
        parts.append(f"Explanation of the correct answer:\n{ref.rationale}")
    return [{"role": "system", "content": system}, {"role": "user", "content": "\n\n".join(parts)}]


def question_text(sample: Sample) -> str:
    """The text of the prompt's user turns (image parts left out: repairs are text-only)."""
    out = []
    for message in sample.messages:
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            out.append(content)
        else:
            out += [p.get("text", "") for p in content or [] if p.get("type") == "text"]
    return "\n".join(out)


class PolicyRepairer:
    """Repairs written by the run's rollout engines through ``ctx.generate``."""

    def __init__(self, generate, *, max_new_tokens: int, temperature: float = 0.0,
                 seed: int = 0, system: str = REPAIR_SYSTEM):
        self.generate, self.max_new_tokens = generate, max_new_tokens
        self.temperature, self.seed, self.system = temperature, seed, system

    def repair(self, samples: list[Sample], references: list[Reference]) -> list[str | None]:
        if not samples:
            return []
        prompts = [Sample(uid=f"repair/{s.uid}", group_id=f"repair/{s.uid}", row={},
                          messages=repair_messages(question_text(s), s.completion_text, ref,
                                                   system=self.system))
                   for s, ref in zip(samples, references)]
        # Sampled repairs are seeded by (run seed, the batch's policy version): a resumed
        # run repairs the same batch with the same random numbers.
        seed = None if self.temperature == 0 else \
            (self.seed * 1_000_003 + max(s.policy_version for s in samples) + 1) * 2 + 1
        out = self.generate(prompts, max_new_tokens=self.max_new_tokens,
                            temperature=self.temperature, seed=seed)
        return [o.completion_text.strip() or None for o in out]


# ------------------------------------------------------------------------------ the reward


@reward("difference_feedback")
class DifferenceFeedback:
    """An outcome reward plus Difference Feedback marks on its failures.

    The score is the ``outcome`` reward's (a registered function reward: ``mcq_letter``,
    ``yes_no_maybe``, ...): list this reward *instead of* the outcome reward. A sample whose
    score is below ``threshold`` is repaired (``repairer``), aligned with its repair, and gets
    ``token_marks`` on the tokens the repair changed, widened to ``widen`` steps. End-of-turn
    and other special tokens at the end of a completion are never marked.

    info per sample: ``repaired`` (a repair was made), ``marked`` (marked tokens).
    batch_metrics: ``failed``, ``repaired``, ``repair_missing`` (failed samples the repairer
    gave no text for, or without a reference answer), ``unchanged`` (repairs equal to the
    failed answer), ``marked_token_share``, ``repair_seconds``, ``align_seconds``.
    """

    def __init__(self, *, outcome: str = "mcq_letter", outcome_kwargs: dict[str, Any] | None = None,
                 threshold: float = 0.5, repairer: Literal["rule", "policy"] = "rule",
                 widen: StepUnit = "token", rationale_field: str | None = None,
                 max_new_tokens: Annotated[int, Field(gt=0)] = 256,
                 temperature: Annotated[float, Field(ge=0)] = 0.0,
                 system_prompt: str | None = None):
        target = registered().get(outcome)
        if target is None or is_class_reward(target):
            names = sorted(n for n, t in registered().items() if not is_class_reward(t))
            raise UserError(f"difference_feedback: outcome {outcome!r} is not a registered "
                            f"function reward; choose one of {', '.join(names)}.")
        self.outcome, self.outcome_kwargs = target, dict(outcome_kwargs or {})
        self.threshold, self.repairer_kind, self.widen = threshold, repairer, widen
        self.rationale_field, self.max_new_tokens = rationale_field, max_new_tokens
        self.temperature, self.system = temperature, system_prompt or REPAIR_SYSTEM
        self.stats: dict[str, float] = {}

    def setup(self, ctx: RewardContext) -> None:
        from medrl.align.models import load_tokenizer

        if ctx.policy_dir is None:
            raise UserError("difference_feedback needs the policy's tokenizer (ctx.policy_dir) "
                            "to align answers token by token; run it inside a GRPO run.")
        self.tokenizer = load_tokenizer(ctx.policy_dir)
        self.special = set(self.tokenizer.all_special_ids)
        if self.repairer_kind == "rule":
            self.repairer: Repairer = RuleRepairer()
        elif ctx.generate is None:
            raise UserError("difference_feedback: repairer 'policy' needs the run's rollout "
                            "engines (ctx.generate), and this run provides none; use "
                            "repairer: rule.")
        else:
            self.repairer = PolicyRepairer(ctx.generate, max_new_tokens=self.max_new_tokens,
                                           temperature=self.temperature, seed=ctx.seed,
                                           system=self.system)

    def marks(self, completion_ids: Sequence[int], repaired_text: str) -> list[float]:
        """The widened marks of one failed completion against its repaired text."""
        core = len(completion_ids)
        while core and completion_ids[core - 1] in self.special:
            core -= 1  # the end-of-turn token is not part of what a repair rewrites
        ids = list(completion_ids[:core])
        repaired = self.tokenizer(repaired_text, add_special_tokens=False)["input_ids"]
        marks = difference_marks(ids, repaired)
        if self.widen != "token" and any(marks):
            pieces = [self.tokenizer.decode([t]) for t in ids]
            marks = widen_marks(marks, token_offsets(pieces),
                                step_spans("".join(pieces), self.widen))
        return marks + [0.0] * (len(completion_ids) - core)

    def __call__(self, samples: list[Sample]) -> list[RewardResult]:
        scores = [self.outcome(s, **self.outcome_kwargs) for s in samples]
        refs = [reference_of(s.row, self.rationale_field) for s in samples]
        failed = [i for i, score in enumerate(scores)
                  if score is not None and score < self.threshold]
        todo = [i for i in failed if refs[i] is not None]
        t0 = time.perf_counter()
        texts = self.repairer.repair([samples[i] for i in todo], [refs[i] for i in todo])
        t1 = time.perf_counter()
        results = [RewardResult(None if sc is None else float(sc)) for sc in scores]
        repaired = marked = tokens = unchanged = 0
        for i, text in zip(todo, texts):
            if text is None:
                continue
            marks = self.marks(samples[i].completion_ids, text)
            repaired += 1
            unchanged += not any(marks)
            marked += int(sum(marks))
            tokens += len(marks)
            results[i] = RewardResult(float(scores[i]), token_marks=marks,
                                      info={"repaired": True, "marked": int(sum(marks))})
        self.stats = {"failed": float(len(failed)), "repaired": float(repaired),
                      "repair_missing": float(len(failed) - repaired),
                      "unchanged": float(unchanged),
                      "marked_token_share": marked / tokens if tokens else 0.0,
                      "repair_seconds": t1 - t0, "align_seconds": time.perf_counter() - t1}
        return results

    def batch_metrics(self) -> dict[str, float]:
        return dict(self.stats)
