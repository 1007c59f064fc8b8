"""Scoring of generated completions for fact checking and structured extraction in
``medrl eval``: pure functions on strings, dicts and lists (docs/eval.md).

- Fact checking (MedFact, He et al. 2025): the model says whether a medical text contains an
  error (:func:`parse_verdict` reads its ``Verdict:`` and ``Error:`` lines) and quotes it;
  :func:`factcheck_metrics` scores the verdicts (positive class: an error) and the quoted
  passages against the gold spans (:func:`span_scores`).
- Structured extraction (EMRModel, Zhao et al. 2025): a dialogue becomes a record;
  :func:`parse_record` finds it in a completion, :func:`record_facts` turns it into (field,
  normalised value) facts, :func:`extraction_metrics` scores micro and per-field F1.

Precision, recall and F1 carry a seeded percentile bootstrap interval over items
(:data:`RESAMPLES` draws of the items with replacement, the statistic recomputed on each).
A zero denominator gives 0.0, except that nothing to find and nothing claimed
(tp = fp = fn = 0) scores 1.0 on all three: no NaN reaches a report.
"""

from __future__ import annotations

import ast
import json
import math
import re
import unicodedata
from collections import Counter
from typing import Any, Sequence

from medrl.launch.eval_metrics import bootstrap_statistics, mean_with_interval, proportion

RESAMPLES = 1000
LEVEL = 0.95

# ----------------------------------------------------------------------------- normalising

_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty".split())}
_ARTICLES = {"a", "an", "the"}
# CJK ideographs are tokens on their own (Chinese is written without spaces)
_TOKEN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\s\u3400-\u4dbf\u4e00-\u9fff"
                    r"\uf900-\ufaff]+")


def _words(value: Any) -> list[str]:
    """The words of :func:`normalise_value`, articles still in."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = unicodedata.normalize("NFKC", str(value)).lower()
    chars = []
    for i, c in enumerate(text):
        decimal = (c == "." and 0 < i < len(text) - 1 and text[i - 1].isdigit()
                   and text[i + 1].isdigit())
        chars.append(" " if unicodedata.category(c).startswith("P") and not decimal else c)
    return [_NUMBER_WORDS.get(w, w) for w in "".join(chars).split()]


def normalise_value(value: Any) -> str:
    """A value as compared: NFKC, lower case, punctuation (Unicode category P) to spaces except
    a decimal point between digits, number words zero..twenty to digits, the articles a / an /
    the dropped, whitespace collapsed. Non-strings via ``str`` (a whole float as an int)."""
    return " ".join(w for w in _words(value) if w not in _ARTICLES)


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(normalise_value(text))


# ---------------------------------------------------------------------- precision / recall


def prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    """(precision, recall, F1) of counts; see the module docstring for zero denominators."""
    if tp == fp == fn == 0:
        return 1.0, 1.0, 1.0
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def prf_figures(rows: Sequence[tuple[int, int, int]], seed: int,
                ns: tuple[int, int, int] | None = None) -> dict[str, dict[str, float]]:
    """``precision``, ``recall``, ``f1`` of per-item (tp, fp, fn) rows, summed, each with a
    seeded percentile bootstrap interval over the rows (widened to hold the point value when
    a small sample's resamples all fall on one side of it). ``ns``: the n of each figure
    (default: the number of rows)."""
    n = len(rows)
    ns = ns or (n, n, n)
    if n == 0:
        return {k: {"value": math.nan, "n": 0, "low": math.nan, "high": math.nan}
                for k in ("precision", "recall", "f1")}
    def counts(sample):
        return prf(*(sum(col) for col in zip(*sample)))

    values = counts(rows)
    intervals = bootstrap_statistics(rows, counts, seed=seed, resamples=RESAMPLES, level=LEVEL)
    return {name: {"value": values[k], "n": ns[k], "low": intervals[k][0],
                   "high": intervals[k][1]}
            for k, name in enumerate(("precision", "recall", "f1"))}


# ---------------------------------------------------------------------------- fact checking

FACTCHECK_INSTRUCTION = (
    "Does the medical text above contain a factual error? Answer on a line \"Verdict: error\" "
    "if it contains an error, or \"Verdict: correct\" if it does not. If it contains an error, "
    "add a line \"Error: \" followed by the erroneous passage, quoted exactly from the text.")


def factcheck_prompt(text: str) -> str:
    """The user message of a fact-checking item: the text, a blank line, the instruction."""
    return f"{text.strip()}\n\n{FACTCHECK_INSTRUCTION}"


_MARKUP = r"[\s>#*_`\-]*"
_VERDICT_LINE = re.compile(rf"^{_MARKUP}(?:final\s+)?verdict[\s*_`]*[:：=\-–—][\s*_`]*(.*)$",
                           re.IGNORECASE)
_ERROR_LINE = re.compile(rf"^{_MARKUP}(?:error|erroneous\s+passage)[\s*_`]*[:：][\s*_`]*(.*)$",
                         re.IGNORECASE)
# the verdict word, after an optional "the text is / contains (an)"
_VERDICT_WORD = re.compile(
    r"^[\s\"'“”‘’\[(]*(?:(?:the\s+)?(?:text|statement|passage|it)\s+(?:is|contains|has)\s+"
    r"|contains\s+|has\s+)?(?:an?\s+)?(no\s+errors?|errors?|erroneous|incorrect|false|"
    r"correct|true|accurate)(?![\w\-])", re.IGNORECASE)  # not "error-free", "correctly"
_QUOTES = " \t*_`\"'“”‘’「」『』"


def _strip_span(text: str) -> str:
    while True:
        stripped = text.strip(_QUOTES).rstrip(".。")
        if stripped == text:
            return text
        text = stripped


def parse_verdict(completion: str) -> tuple[bool | None, str | None]:
    """(contains an error, the quoted passage) of a completion. The verdict is read only on a
    ``Verdict:`` line (markdown bold, case, ``Final verdict:`` accepted) and the last such line
    decides (reasoning models think first): error / errors / erroneous / incorrect / false ->
    True; correct / no error / true / accurate -> False; anything else there, or no such line
    -> (None, None). The passage is the first ``Error:`` line after that verdict line (else the
    last one before it), stripped of markdown and surrounding quotes; None when the verdict is
    correct or no passage is given."""
    lines = completion.splitlines()
    at = next((i for i in reversed(range(len(lines))) if _VERDICT_LINE.match(lines[i])), None)
    if at is None:
        return None, None
    word = _VERDICT_WORD.match(_VERDICT_LINE.match(lines[at]).group(1))
    if word is None:
        return None, None
    w = word.group(1).lower()
    if w.startswith("no") or w in ("correct", "true", "accurate"):
        return False, None
    errors = [(i, m.group(1)) for i, line in enumerate(lines) if (m := _ERROR_LINE.match(line))]
    after = [s for i, s in errors if i > at]
    before = [s for i, s in errors if i < at]
    span = _strip_span(after[0] if after else before[-1] if before else "")
    return True, span or None


# accepted gold strings (lower case, spaces and hyphens as underscores). "true" / "false" are
# veracity words (the text is true), unlike a boolean or 0 / 1, which flag an error
GOLD_ERROR = ("error", "incorrect", "contains_error", "has_error", "erroneous", "1")
GOLD_CORRECT = ("correct", "no_error", "0")
# "true" / "false" as text could mean "is correct" or "has an error" (a boolean error flag
# exported as text): refused rather than guessed; a real boolean is an error flag


def gold_verdict(row: dict[str, Any], label_field: str = "label") -> bool | None:
    """The gold label of a row: True when the text contains an error. Booleans, 0 / 1 (1: an
    error), and the strings of :data:`GOLD_ERROR` / :data:`GOLD_CORRECT`; None when the field is
    missing, null, empty or NaN (an unlabelled row); anything else a ValueError naming it."""
    value = row.get(label_field)
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()  # numpy scalars from Parquet / pandas
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        key = re.sub(r"[\s\-]+", "_", value.strip().lower())
        if not key:
            return None
        if key in GOLD_ERROR:
            return True
        if key in GOLD_CORRECT:
            return False
        if key in ("true", "false"):
            raise ValueError(f"label {label_field!r} is the text {value.strip()!r}, which does "
                             "not say whether true means correct or has an error; write "
                             "error / correct, or a boolean error flag (true: an error)")
    # a long value is likely a text column mapped by mistake: it is not repeated
    shown = repr(value) if len(str(value)) <= 24 else f"a {len(str(value))}-character value"
    raise ValueError(f"label {label_field!r} is {shown}; use 1 or one of "
                     f"{', '.join(GOLD_ERROR[:-1])} for a text with an error, 0 or one of "
                     f"{', '.join(GOLD_CORRECT[:-1])} for a correct one")


def gold_spans(row: dict[str, Any], span_field: str = "error_span") -> list[str]:
    """The gold erroneous passages of a row: a string or a list of strings (empty ones
    dropped; missing -> [])."""
    value = row.get(span_field)
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{span_field!r} must be a string or a list of strings, got "
                         f"{type(value).__name__}")
    return [v for v in value if v.strip()]


def token_f1(predicted: str, gold: str) -> float:
    """SQuAD's bag-of-tokens F1 of two passages after :func:`normalise_value` (CJK characters
    one token each)."""
    p, g = _tokens(predicted), _tokens(gold)
    if not p or not g:
        return float(p == g)
    same = sum((Counter(p) & Counter(g)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def span_scores(predicted: str | None, gold: Sequence[str]) -> tuple[bool, float]:
    """(exact: the normalised passage equals a normalised gold span, overlap: the best token F1
    against any gold span); (False, 0.0) without a passage or without gold spans."""
    if predicted is None or not gold:
        return False, 0.0
    norm = normalise_value(predicted)
    exact = any(norm == normalise_value(g) for g in gold)
    return exact, max(token_f1(predicted, g) for g in gold)


def factcheck_metrics(items: Sequence[tuple[bool, list[str], bool | None, str | None]],
                      seed: int) -> dict[str, dict[str, float]]:
    """The figures of (gold error, gold spans, predicted error, predicted passage) items; the
    positive class is "contains an error". An unanswered item (predicted None) is a miss: a
    false negative when the text has an error, neither a true nor a false positive when it is
    correct; it is wrong in ``accuracy`` either way.

    ``precision`` (n: items flagged), ``recall`` (n: items with an error), ``f1`` (n: all
    items), bootstrap intervals; ``accuracy``, ``over_criticism`` (share of correct texts
    flagged as an error), ``answered`` (share with a verdict), Wilson intervals. When some
    item has gold spans: ``loc_exact`` (share of exact passages) and ``loc_overlap`` (mean best
    token F1, bootstrap interval) over the true positives with gold spans."""
    rows = [(int(g and p is True), int(not g and p is True), int(g and p is not True))
            for g, _, p, _ in items]
    n = len(items)
    flagged = sum(p is True for _, _, p, _ in items)
    with_error = sum(bool(g) for g, _, _, _ in items)
    out = prf_figures(rows, seed, ns=(flagged, with_error, n))
    out["accuracy"] = proportion(sum(p is not None and p == g for g, _, p, _ in items), n)
    out["over_criticism"] = proportion(sum(fp for _, fp, _ in rows), n - with_error)
    out["answered"] = proportion(sum(p is not None for _, _, p, _ in items), n)
    if any(g and spans for g, spans, _, _ in items):
        located = [span_scores(span, spans) for g, spans, p, span in items
                   if g and p is True and spans]
        out["loc_exact"] = proportion(sum(e for e, _ in located), len(located))
        out["loc_overlap"] = mean_with_interval([o for _, o in located], seed)
    return out


# ----------------------------------------------------------------------- structured records

_FENCE = re.compile(r"```[ \t]*(?:json|python|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def _balanced_end(text: str, start: int) -> int | None:
    """The index after the ``}`` closing the ``{`` at ``start`` (strings in either quote
    skipped), or None when it never closes."""
    depth, quote, i = 0, None, start
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "\"'":
            quote = c
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def _as_dict(candidate: str) -> dict | None:
    try:
        value = json.loads(candidate)
    except (ValueError, RecursionError):
        try:  # Python literals ('single quotes', True, None): literals only, nothing runs
            value = ast.literal_eval(candidate)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return None
    return value if isinstance(value, dict) else None


def _first_object(text: str) -> dict | None:
    at = text.find("{")
    while at != -1:
        end = _balanced_end(text, at)
        if end is None:  # an unclosed object (a cut-off completion): no inner part counts
            return None
        if (record := _as_dict(text[at:end])) is not None:
            return record
        at = text.find("{", end)
    return None


def parse_record(completion: str) -> dict | None:
    """The record of a completion: the first object in a fenced code block (```json), else the
    first object in the text (prose around it ignored), as JSON or as a Python literal; None
    when nothing parses to a dict."""
    for block in _FENCE.findall(completion):
        if (record := _first_object(block)) is not None:
            return record
    return _first_object(completion)


EMPTY_VALUES = frozenset({"", "none", "null", "n a", "unknown", "not mentioned"})


def _field_name(key: Any) -> str:
    return re.sub(r"[\s\-]+", "_", unicodedata.normalize("NFKC", str(key)).strip().lower())


def _walk(prefix: str, value: Any, facts: set[tuple[str, str]], fields: set[str]) -> None:
    if isinstance(value, dict):
        if not value and prefix:
            fields.add(prefix)
        for k, v in value.items():
            _walk(f"{prefix}.{_field_name(k)}" if prefix else _field_name(k), v, facts, fields)
        return
    if isinstance(value, (list, tuple, set)):
        if not value:
            fields.add(prefix)
        for v in value:
            _walk(prefix, v, facts, fields)
        return
    fields.add(prefix)
    # emptiness is judged with the articles in: "N/A" is "n a", not the value "n"
    if value is not None and " ".join(_words(value)) not in EMPTY_VALUES:
        facts.add((prefix, normalise_value(value)))


def record_facts(record: dict) -> set[tuple[str, str]]:
    """(field, normalised value) facts of a record: one per scalar, one per list element;
    nested dicts give dotted field names (``vitals.pulse``); field names lower case with
    spaces and hyphens as underscores. Empty values ("", None, [], {}, and the normalised
    values of :data:`EMPTY_VALUES`) give no fact: an empty field is a correct "nothing found",
    scored by the absence of false positives."""
    facts: set[tuple[str, str]] = set()
    _walk("", record, facts, set())
    return facts


def record_fields(record: dict) -> set[str]:
    """Every leaf field name of a record, empty ones included."""
    fields: set[str] = set()
    _walk("", record, set(), fields)
    return fields


def extraction_counts(predicted: dict | None, gold: dict) -> dict[str, tuple[int, int, int]]:
    """(tp, fp, fn) of facts per field, for every field of the gold record and every field
    the prediction has facts in (an invented field: false positives under its own name). A
    None prediction (nothing parsed) makes every gold fact a false negative."""
    gold_facts = record_facts(gold)
    pred_facts = record_facts(predicted) if predicted is not None else set()
    names = record_fields(gold) | {f for f, _ in pred_facts}
    return {name: (sum(f == name for f, _ in pred_facts & gold_facts),
                   sum(f == name for f, _ in pred_facts - gold_facts),
                   sum(f == name for f, _ in gold_facts - pred_facts))
            for name in sorted(names)}


def extraction_metrics(items: Sequence[tuple[dict[str, tuple[int, int, int]], bool]],
                       seed: int) -> dict[str, dict[str, float]]:
    """The figures of (per-field counts, parsed) items. Micro ``precision`` (n: predicted
    facts), ``recall`` (n: gold facts) and ``f1`` (n: items) over all facts, bootstrap
    intervals over items; ``parsed`` (share of completions with a record) and ``exact_record``
    (parsed, with no false positive and no false negative), Wilson intervals; one
    ``field:<name>/f1`` per field with a gold fact in some item, micro over the items where the
    field has a fact (n), bootstrap interval."""
    rows = [tuple(sum(c[k] for c in counts.values()) for k in range(3)) for counts, _ in items]
    tp, fp, fn = (sum(col) for col in zip(*rows)) if rows else (0, 0, 0)
    out = prf_figures(rows, seed, ns=(tp + fp, tp + fn, len(items)))
    out["parsed"] = proportion(sum(bool(p) for _, p in items), len(items))
    out["exact_record"] = proportion(sum(bool(p) and r[1] == r[2] == 0
                                         for (_, p), r in zip(items, rows)), len(items))
    fields = sorted({f for counts, _ in items for f, c in counts.items() if c[0] + c[2]})
    for name in fields:
        field_rows = [counts[name] for counts, _ in items if sum(counts.get(name, (0, 0, 0)))]
        out[f"field:{name}/f1"] = prf_figures(field_rows, seed)["f1"]
    return out
