"""Built-in rule rewards: answer accuracy and format, and a soft length penalty.

The answer readers are written against the real evaluation sets' formats: MedQA / MedMCQA
rows carry ``options`` {letter: text}, ``answer`` (the option *text*) and ``answer_idx`` (the
letter); CT-RATE style rows carry ``answer`` as the letter; PubMedQA rows carry ``answer``
"yes" / "no" / "maybe" with ``options`` {"A": "yes", "B": "no", "C": "maybe"}.

A row these rewards cannot read raises a ValueError that names the row field and never its
text (dataset answers and options are patient text); the runner adds the sample uid.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import Field

from medrl.align.records import Sample
from medrl.rewards.api import reward

_TAG = re.compile(r"<answer>(.*?)</answer>", re.S | re.I)
_BARE_LETTER = re.compile(r"^[\s*_`]*\(?\s*([A-Za-z])\s*\)?[\s.:*_`]*$")
# "the answer is (B)", "Answer: B", "correct option: **C**", "final answer is B."
_ANSWER_PHRASE = re.compile(
    r"(?:answer|option|choice)\s*(?:is|:|=|-)?\s*(?:option|choice)?\s*[:\-]?\s*[*_`]*"
    r"\(?([A-Z])\)?(?![A-Za-z])", re.I)
# a line that starts with the letter: "B) ...", "(B) ...", "B. ...", "B: ..."
_LEADING_LETTER = re.compile(r"^\s*[*_`]*\(?([A-Z])[).:][*_`]*(?:\s|$)", re.M)


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w%./-]+", " ", text.lower()).split())


def _options(row: dict[str, Any]) -> dict[str, str]:
    options = row.get("options") or {}
    if isinstance(options, list):  # ["text A", "text B", ...] -> A, B, ...
        options = {chr(ord("A") + i): o for i, o in enumerate(options)}
    if not isinstance(options, dict):
        raise ValueError(f"the row's field 'options' is a {type(options).__name__}; expected a "
                         "mapping letter -> text or a list of option texts")
    return {str(k).strip().upper(): str(v) for k, v in options.items()}


def gold_letter(row: dict[str, Any]) -> str | None:
    """The correct option letter of a multiple-choice row, or None when the row has no answer.

    Looks at ``answer_idx`` (MedQA/MedMCQA), then ``answer`` as a letter (CT-RATE), then
    ``answer`` as the text of one option.
    """
    options = _options(row)
    for key in ("answer_idx", "answer"):
        value = row.get(key)
        if isinstance(value, str) and value.strip().upper() in options:
            return value.strip().upper()
    answer = row.get("answer")
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        return None
    if isinstance(answer, (list, tuple, dict)):  # its text would match an option by accident
        raise ValueError(f"the row's field 'answer' is a {type(answer).__name__}; expected an "
                         "option letter or the text of one option")
    matches = [k for k, v in options.items() if _norm(v) == _norm(str(answer))]
    if len(matches) == 1:
        return matches[0]
    found = f"{len(matches)} options" if matches else "no option"
    raise ValueError(f"the row's field 'answer' is neither an option letter nor the text of "
                     f"exactly one option (options {', '.join(options) or 'none'}; its text "
                     f"matches {found}); fix the row, or point data.fields.answer at the column "
                     "holding the letter (the text is not shown: it is dataset content)")


def _letter_in(text: str, options: dict[str, str]) -> str | None:
    """A letter written as the whole text ("B", "(B)", "B.", "**B**")."""
    m = _BARE_LETTER.match(text)
    if m and m.group(1).upper() in options:
        return m.group(1).upper()
    return None


def _echoed_option(text: str, options: dict[str, str]) -> str | None:
    """The option whose text the completion repeats (the unique longest one found)."""
    norm = _norm(text)
    if not norm:
        return None
    found = {k: _norm(v) for k, v in options.items()
             if _norm(v) and re.search(rf"(?<!\w){re.escape(_norm(v))}(?!\w)", norm)}
    # an option contained in a longer found option ("effusion" in "pleural effusion") is not
    # evidence of its own
    found = {k: v for k, v in found.items()
             if not any(v != w and v in w for w in found.values())}
    return next(iter(found)) if len(found) == 1 else None


def extract_letter(text: str, options: dict[str, str], *, strict: bool = False) -> str | None:
    """The option letter a completion chose, or None when it chose none (or several)."""
    tags = _TAG.findall(text)
    if strict:
        return _letter_in(tags[-1], options) if len(tags) == 1 else None
    if tags:
        inner = tags[-1]
        return (_letter_in(inner, options) or _from_phrases(inner, options)
                or _echoed_option(inner, options))
    return (_letter_in(text, options) or _from_phrases(text, options)
            or _echoed_option(text, options))


def _from_phrases(text: str, options: dict[str, str]) -> str | None:
    said = [(m.group(0).lower().startswith("answer"), m.group(1).upper())
            for m in _ANSWER_PHRASE.finditer(text)
            if m.group(1).upper() in options and (m.group(1).isupper() or "(" in m.group(0))]
    answers = [letter for is_answer, letter in said if is_answer]
    if answers or said:  # "answer is B" beats "option A"; the final answer beats earlier ones
        return (answers or [letter for _, letter in said])[-1]
    leading = [m.group(1) for m in _LEADING_LETTER.finditer(text) if m.group(1) in options]
    return leading[0] if len(set(leading)) == 1 else None


@reward("mcq_letter")
def mcq_letter(sample: Sample, *, strict: bool = False) -> float | None:
    """1.0 when the completion picks the correct option letter, else 0.0; None without answer.

    Tolerant by default: ``<answer>B</answer>``, ``Answer: B``, ``the answer is (B)``, ``B)``,
    ``(B)``, a bare ``B``, or the text of the option. ``strict=True`` accepts only exactly one
    ``<answer>B</answer>`` tag holding the letter.
    """
    gold = gold_letter(sample.row)
    if gold is None:
        return None
    picked = extract_letter(sample.completion_text, _options(sample.row), strict=strict)
    return float(picked == gold)


_YNM = ("yes", "no", "maybe")
_YNM_PHRASE = re.compile(r"(?:answer|decision|conclusion)\s*(?:is|:|=|-)?\s*[*_`\"']*"
                         r"(yes|no|maybe)\b", re.I)


def extract_yes_no_maybe(text: str, options: dict[str, str], *,
                         strict: bool = False) -> str | None:
    """"yes" / "no" / "maybe" from a completion (an answer tag, an answer phrase, the whole
    text or its first word, or an option letter mapping to one of them)."""
    tags = _TAG.findall(text)
    if strict:
        if len(tags) != 1:
            return None
        inner = _norm(tags[0])
        return inner if inner in _YNM else None
    body = tags[-1] if tags else text
    norm = _norm(body)
    if norm in _YNM:
        return norm
    said = [m.group(1).lower() for m in _YNM_PHRASE.finditer(body)]
    if said:
        return said[-1]
    first = norm.split(" ", 1)[0].rstrip(".") if norm else ""
    if first in _YNM:
        return first
    letter = _letter_in(body, options) or _from_phrases(body, options)
    if letter and _norm(options[letter]) in _YNM:
        return _norm(options[letter])
    return None


@reward("yes_no_maybe")
def yes_no_maybe(sample: Sample, *, strict: bool = False) -> float | None:
    """PubMedQA accuracy: 1.0 when the completion's yes/no/maybe equals the row's answer.

    None when the row has no answer. ``strict=True`` accepts only one ``<answer>…</answer>``
    tag holding exactly yes, no or maybe.
    """
    options = _options(sample.row)
    answer = sample.row.get("answer")
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        return None
    gold = _norm(str(answer))
    if gold not in _YNM and gold.upper() in options:  # the answer given as a letter
        gold = _norm(options[gold.upper()])
    if gold not in _YNM:
        raise ValueError("the row's field 'answer' is not yes, no or maybe, nor the letter of "
                         "an option that is (the text is not shown: it is dataset content)")
    return float(extract_yes_no_maybe(sample.completion_text, options, strict=strict) == gold)


_THINK_ANSWER = re.compile(r"^\s*<think>(.+?)</think>\s*<answer>(.+?)</answer>\s*$", re.S)


@reward("think_answer_format")
def think_answer_format(sample: Sample, *, require_think: bool = True) -> float:
    """1.0 for ``<think>…</think><answer>…</answer>`` (each once, non-empty, nothing around
    them), else 0.0. With ``require_think=False`` a lone ``<answer>…</answer>`` also counts."""
    text = sample.completion_text
    counts = [text.count(t) for t in ("<think>", "</think>", "<answer>", "</answer>")]
    m = _THINK_ANSWER.match(text)
    if m and counts == [1, 1, 1, 1] and m.group(1).strip() and m.group(2).strip():
        return 1.0
    if not require_think and counts == [0, 0, 1, 1]:
        m = re.match(r"^\s*<answer>(.+?)</answer>\s*$", text, re.S)
        return float(bool(m and m.group(1).strip()))
    return 0.0


@reward("overlong_penalty")
def overlong_penalty(sample: Sample, *, max_length: Annotated[int, Field(gt=0)],
                     buffer: Annotated[int, Field(gt=0)]) -> float:
    """DAPO's soft overlong punishment on the completion's token count L:

    0 when L <= max_length - buffer; a linear ramp ((max_length - buffer) - L) / buffer down to
    -1 at L = max_length; -1 beyond. Add it to an accuracy reward (weight 1).
    """
    if buffer > max_length:
        raise ValueError(f"buffer ({buffer}) must not exceed max_length ({max_length})")
    n = len(sample.completion_ids)
    start = max_length - buffer
    if n <= start:
        return 0.0
    if n <= max_length:
        return (start - n) / buffer
    return -1.0
