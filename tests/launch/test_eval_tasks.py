"""Fact-checking and structured-extraction scoring of medrl eval on constructed completions,
with every expected figure worked out by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from medrl.launch.eval_tasks import (FACTCHECK_INSTRUCTION, extraction_counts,
                                     extraction_metrics, factcheck_metrics, factcheck_prompt,
                                     gold_spans, gold_verdict, normalise_value, parse_record,
                                     parse_verdict, record_facts, span_scores)

EMR_ROWS = Path(__file__).resolve().parents[2] / "recipes" / "data" / "sft_emr_dialogues.jsonl"


# ---------------------------------------------------------------------------- fact checking


def test_prompt_is_the_text_then_the_instruction():
    prompt = factcheck_prompt("  Aspirin is an anticoagulant.\n")
    assert prompt == "Aspirin is an anticoagulant.\n\n" + FACTCHECK_INSTRUCTION
    assert "Verdict: error" in FACTCHECK_INSTRUCTION and "Verdict: correct" in FACTCHECK_INSTRUCTION
    assert "Error:" in FACTCHECK_INSTRUCTION


@pytest.mark.parametrize("completion, expected", [
    ("Verdict: error\nError: aspirin 5 g daily", (True, "aspirin 5 g daily")),
    ("**Verdict:** Correct", (False, None)),
    # the final verdict line wins over the reasoning before it
    ("Let me think.\nVerdict: correct\nWait, the dose is wrong.\nVerdict: ERROR\n"
     "Error: “10 mg/kg”", (True, "10 mg/kg")),
    ("Verdict: **error**\n**Error:** 'warfarin is an antibiotic'.",
     (True, "warfarin is an antibiotic")),
    ("Verdict: correct\nError: the dose", (False, None)),
    ('Error: "metformin"\nVerdict: error', (True, "metformin")),  # passage before the verdict
    ("Verdict: error\n", (True, None)),
    ("**Verdict: Error**\n**Error:** “剂量为5克”。", (True, "剂量为5克")),
    ("### Final verdict: The text contains an error\n- Error: left kidney", (True, "left kidney")),
    ("verdict - no error", (False, None)),
    ("Verdict: incorrect\nError: [\"the right lung\"]", (True, "[\"the right lung\"]")),
    ("The text has an error in the dosage.", (None, None)),  # a plain word off a verdict line
    ("I judge it correct.", (None, None)),
    ("Verdict: error-free", (None, None)),
    ("Verdict: error\nError: x\nVerdict: unsure", (None, None)),  # the last verdict line decides
    ("", (None, None)),
])
def test_parse_verdict(completion, expected):
    assert parse_verdict(completion) == expected


def test_gold_verdict_accepts_the_documented_labels():
    for value in (True, 1, 1.0, "error", "Incorrect", "contains error", "contains-error",
                  "has_error", "erroneous", "1"):
        assert gold_verdict({"label": value}) is True, value
    for value in (False, 0, 0.0, "correct", "no_error", "No error", "0"):
        assert gold_verdict({"label": value}) is False, value
    for row in ({}, {"label": None}, {"label": ""}, {"label": "  "}, {"label": math.nan}):
        assert gold_verdict(row) is None
    assert gold_verdict({"veracity": "error"}, label_field="veracity") is True


def test_gold_verdict_refuses_other_values_without_repeating_long_text():
    with pytest.raises(ValueError, match="'maybe'"):
        gold_verdict({"label": "maybe"})
    with pytest.raises(ValueError, match="2"):
        gold_verdict({"label": 2})
    for text in ("True", "false"):  # which way round? refused, not guessed
        with pytest.raises(ValueError, match="does not say whether true means correct"):
            gold_verdict({"label": text})
    text = "The patient was given 50 mg of metoprolol twice daily."
    with pytest.raises(ValueError) as err:
        gold_verdict({"label": text})
    assert "metoprolol" not in str(err.value) and f"{len(text)}-character" in str(err.value)


def test_gold_spans():
    assert gold_spans({"error_span": "5 g"}) == ["5 g"]
    assert gold_spans({"error_span": ["a", " ", "b"]}) == ["a", "b"]
    assert gold_spans({}) == [] and gold_spans({"error_span": ""}) == []
    assert gold_spans({"spans": ("x",)}, span_field="spans") == ["x"]
    with pytest.raises(ValueError, match="error_span"):
        gold_spans({"error_span": 5})


def test_span_scores_exact_and_token_f1():
    # "dose is 50 mg daily" (5 tokens, "the" dropped) vs "dose 5 mg daily" (4): 3 shared,
    # P = 3/5, R = 3/4, F1 = 2 * 0.6 * 0.75 / 1.35 = 2/3
    exact, overlap = span_scores("The dose is 50 mg daily", ["dose 5 mg daily"])
    assert exact is False and overlap == pytest.approx(2 / 3)
    assert span_scores("“Three tablets.”", ["3 tablets", "other"]) == (True, 1.0)
    # best gold: "left kidney stone", 2 shared of 2 / 3 -> F1 = 2 * 1 * (2/3) / (5/3) = 0.8
    # (against "right kidney": 1 shared of 2 / 2 -> 0.5)
    assert span_scores("left kidney", ["right kidney", "left kidney stone"]) == (
        False, pytest.approx(0.8))
    # a bag of tokens: "mg" counts once against one gold "mg": P = 1/3, R = 1/2, F1 = 0.4
    assert span_scores("mg mg mg", ["mg dose"])[1] == pytest.approx(0.4)
    # Chinese: one token per character, 1 shared of 2 / 2 -> 0.5
    assert span_scores("左肾", ["右肾"]) == (False, pytest.approx(0.5))
    # a decimal point stays: "0.5" and "5" differ, "mg" is shared -> 0.5
    assert span_scores("0.5 mg", ["5 mg."]) == (False, pytest.approx(0.5))
    assert span_scores(None, ["x"]) == (False, 0.0)
    assert span_scores("x", []) == (False, 0.0)


def test_factcheck_metrics_on_a_worked_example():
    E, C = True, False
    items = [
        (E, ["aspirin 5 g"], E, "Aspirin 5 g."),            # TP, exact, F1 1
        (E, ["left kidney stone"], E, "left kidney"),        # TP, F1 0.8
        (E, ["the dose is 50 mg"], E, None),                 # TP, no passage: F1 0
        (E, [], E, "x"),                                     # TP without gold span
        (E, ["y"], C, None),                                 # FN
        (E, ["z"], None, None),                              # unanswered: FN
        (C, [], E, "foo"),                                   # FP
        (C, [], C, None),                                    # TN
        (C, [], C, None),                                    # TN
        (C, [], None, None),                                 # unanswered: neither, wrong
    ]
    m = factcheck_metrics(items, seed=0)
    # TP 4, FP 1, FN 2, TN 2
    assert m["precision"]["value"] == pytest.approx(4 / 5) and m["precision"]["n"] == 5
    assert m["recall"]["value"] == pytest.approx(4 / 6) and m["recall"]["n"] == 6
    # F1 = 2 * 0.8 * (2/3) / (0.8 + 2/3) = 8/11
    assert m["f1"]["value"] == pytest.approx(8 / 11) and m["f1"]["n"] == 10
    assert m["accuracy"]["value"] == pytest.approx(6 / 10) and m["accuracy"]["n"] == 10
    assert m["over_criticism"]["value"] == pytest.approx(1 / 4) and m["over_criticism"]["n"] == 4
    assert m["answered"]["value"] == pytest.approx(8 / 10)
    # localisation over the 3 true positives with gold spans: exact 1 of 3, F1 (1 + 0.8 + 0) / 3
    assert m["loc_exact"]["value"] == pytest.approx(1 / 3) and m["loc_exact"]["n"] == 3
    assert m["loc_overlap"]["value"] == pytest.approx(0.6) and m["loc_overlap"]["n"] == 3
    for fig in m.values():
        assert set(fig) == {"value", "n", "low", "high"}
        assert fig["low"] <= fig["value"] <= fig["high"]


def test_factcheck_without_gold_spans_reports_no_localisation_and_no_nan():
    assert "loc_exact" not in factcheck_metrics([(True, [], True, "x")], seed=0)
    # nothing to find and nothing flagged: P = R = F1 = 1
    m = factcheck_metrics([(False, [], False, None)] * 3, seed=0)
    assert [m[k]["value"] for k in ("precision", "recall", "f1")] == [1.0, 1.0, 1.0]
    # errors to find and nothing flagged: precision is 0.0 (n = 0 flagged), not NaN
    m = factcheck_metrics([(True, [], False, None)] * 3, seed=0)
    assert [m[k]["value"] for k in ("precision", "recall", "f1")] == [0.0, 0.0, 0.0]
    assert m["precision"]["n"] == 0


def test_factcheck_f1_interval_is_seeded_and_holds_the_value():
    # 60 items: 20 TP, 10 FN, 10 FP, 20 TN
    items = ([(True, [], True, None)] * 20 + [(True, [], False, None)] * 10
             + [(False, [], True, None)] * 10 + [(False, [], False, None)] * 20)
    a, b = factcheck_metrics(items, seed=5)["f1"], factcheck_metrics(items, seed=5)["f1"]
    assert a == b
    assert a["value"] == pytest.approx(40 / 60)  # 2 * 20 / (2 * 20 + 10 + 10)
    assert 0.0 <= a["low"] < a["value"] < a["high"] <= 1.0
    assert a["high"] - a["low"] < 0.5
    assert factcheck_metrics(items, seed=6)["f1"] != a
    perfect = factcheck_metrics([(True, [], True, None), (False, [], False, None)] * 5, seed=0)
    assert (perfect["f1"]["low"], perfect["f1"]["high"]) == (1.0, 1.0)


# ----------------------------------------------------------------------- structured records


def test_parse_record():
    assert parse_record('```json\n{"a": 1, "b": [1, 2]}\n```') == {"a": 1, "b": [1, 2]}
    assert parse_record('Here is the record: {"chief_complaint": "cough"} Hope this helps.') == {
        "chief_complaint": "cough"}
    assert parse_record("{'a': 'x', 'b': True, 'c': None}") == {"a": "x", "b": True, "c": None}
    assert parse_record('{"note": "patient\'s knee", "vitals": {"pulse": 80}}') == {
        "note": "patient's knee", "vitals": {"pulse": 80}}
    assert parse_record('Fields {like this} follow: {"a": "b"}') == {"a": "b"}
    # a fenced block beats an object in the reasoning before it
    assert parse_record('<think>maybe {"a": 1}</think>\n```json\n{"a": 2}\n```') == {"a": 2}
    for garbage in ("no record here", "{not json at all}", "[1, 2]", "{1, 2}",
                    '{"a": 1, "b": {"c": 2}',  # cut off: its inner object is not the record
                    "{'a': __import__('os').getcwd()}"):  # literals only, nothing runs
        assert parse_record(garbage) is None, garbage


@pytest.mark.parametrize("value, expected", [
    ("Three days", "3 days"),
    ("The patient's BP: 120/80.", "patient s bp 120 80"),
    ("0.5 mg", "0.5 mg"),
    ("1.5.", "1.5"),
    ("ＡＢＣ", "abc"),
    ("  A   fever  ", "fever"),
    ("An itchy rash, twelve hours", "itchy rash 12 hours"),
    ("twenty", "20"),
    (38.0, "38"),
    (38.5, "38.5"),
    (True, "true"),
])
def test_normalise_value(value, expected):
    assert normalise_value(value) == expected


def test_record_facts_flattens_lists_and_nesting_and_skips_empties():
    record = {"Chief Complaint": "Cough", "symptoms": ["cough", "Fever", "", None],
              "allergies": [], "vitals": {"pulse": 80, "BP": "N/A", "temp": {}},
              "notes": "Not mentioned.", "meds": [{"name": "Ibuprofen", "dose": "two tablets"}],
              "empty": None, "x": "unknown", "y": "None"}
    assert record_facts(record) == {
        ("chief_complaint", "cough"), ("symptoms", "cough"), ("symptoms", "fever"),
        ("vitals.pulse", "80"), ("meds.name", "ibuprofen"), ("meds.dose", "2 tablets")}
    assert record_facts({}) == set()


def test_extraction_counts_per_field():
    gold = {"symptoms": ["cough", "fever"], "allergies": [], "duration": "3 days"}
    pred = {"symptoms": ["Cough", "headache"], "allergies": ["penicillin"],
            "duration": "three days", "temperature": "38.5"}
    assert extraction_counts(pred, gold) == {"symptoms": (1, 1, 1), "allergies": (0, 1, 0),
                                             "duration": (1, 0, 0), "temperature": (0, 1, 0)}
    assert extraction_counts(None, gold) == {"symptoms": (0, 0, 2), "allergies": (0, 0, 0),
                                             "duration": (0, 0, 1)}


def test_extraction_metrics_on_a_worked_example():
    gold = {"symptoms": ["cough", "fever"], "allergies": [], "duration": "3 days"}
    pred = {"symptoms": ["Cough", "headache"], "allergies": ["penicillin"],
            "duration": "three days", "temperature": "38.5"}
    items = [(extraction_counts(pred, gold), True), (extraction_counts(None, gold), False)]
    m = extraction_metrics(items, seed=0)
    # tp 2, fp 3, fn 1 + 3 = 4
    assert m["precision"]["value"] == pytest.approx(2 / 5) and m["precision"]["n"] == 5
    assert m["recall"]["value"] == pytest.approx(2 / 6) and m["recall"]["n"] == 6
    assert m["f1"]["value"] == pytest.approx(4 / 11) and m["f1"]["n"] == 2  # 2tp/(2tp+fp+fn)
    assert m["parsed"]["value"] == 0.5 and m["exact_record"]["value"] == 0.0
    # symptoms: tp 1, fp 1, fn 3 -> 2/6; duration: tp 1, fn 1 -> 2/3; no allergies gold fact,
    # temperature invented: neither has a per-field figure
    assert m["field:symptoms/f1"]["value"] == pytest.approx(1 / 3)
    assert m["field:duration/f1"]["value"] == pytest.approx(2 / 3)
    assert m["field:duration/f1"]["n"] == 2
    assert not {"field:allergies/f1", "field:temperature/f1"} & set(m)


def test_extraction_metrics_undefined_ratios():
    nothing = extraction_metrics([({"allergies": (0, 0, 0)}, True)], seed=0)
    assert [nothing[k]["value"] for k in ("precision", "recall", "f1", "exact_record")] == [
        1.0, 1.0, 1.0, 1.0]
    missed = extraction_metrics([({"allergies": (0, 0, 3)}, True)], seed=0)
    assert [missed[k]["value"] for k in ("precision", "recall", "f1")] == [0.0, 0.0, 0.0]
    assert missed["precision"]["n"] == 0 and missed["exact_record"]["value"] == 0.0
    # an unparsed completion of an empty gold record is not an exact record
    assert extraction_metrics([({"allergies": (0, 0, 0)}, False)], seed=0)[
        "exact_record"]["value"] == 0.0


def test_extraction_on_the_recipe_dialogues():
    gold = {r["id"]: r["record"] for r in map(json.loads, EMR_ROWS.read_text().splitlines())}
    completions = {
        # python literal in prose: "three days" = "3 days", "(rash)" punctuation, "none" empty;
        # "headache" invented, "painful swallowing" missed
        "emr-001": "Here is the record:\n{'chief_complaint': 'Sore throat and fever.', "
                   "'duration': 'three days', 'symptoms': ['sore throat', 'fever', "
                   "'mild cough', 'headache'], 'allergies': ['Penicillin (rash)'], "
                   "'medications': 'none'}",
        "emr-002": "```json\n" + json.dumps(gold["emr-002"]) + "\n```",
        "emr-003": "I cannot produce a record.",
    }
    items = []
    for uid, text in completions.items():
        record = parse_record(text)
        items.append((extraction_counts(record, gold[uid]), record is not None))
    assert items[0][0] == {"chief_complaint": (1, 0, 0), "duration": (1, 0, 0),
                           "symptoms": (3, 1, 1), "allergies": (1, 0, 0),
                           "medications": (0, 0, 0)}
    m = extraction_metrics(items, seed=0)
    # tp 6 + 5 + 0, fp 1, fn 1 + 0 + 5 (chief complaint, duration, 2 symptoms, 1 medication)
    assert m["precision"]["value"] == pytest.approx(11 / 12) and m["precision"]["n"] == 12
    assert m["recall"]["value"] == pytest.approx(11 / 17) and m["recall"]["n"] == 17
    assert m["f1"]["value"] == pytest.approx(22 / 29)
    assert m["parsed"]["value"] == pytest.approx(2 / 3)
    assert m["exact_record"]["value"] == pytest.approx(1 / 3)
    assert m["field:symptoms/f1"]["value"] == pytest.approx(10 / 14)   # tp 5, fp 1, fn 3
    assert m["field:chief_complaint/f1"]["value"] == pytest.approx(4 / 5)
    assert m["field:medications/f1"]["value"] == pytest.approx(2 / 3)
    assert m["field:medications/f1"]["n"] == 2  # emr-001 has no medication fact either side
    assert m["field:allergies/f1"]["value"] == 1.0
    for fig in m.values():
        assert fig["low"] <= fig["value"] <= fig["high"]
