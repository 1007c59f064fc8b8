"""Preference pairs for the reward_model stage: lexicographic pairs from graded responses, one
example per criterion that separates them, explicit pairs, and errors that name the row."""

from __future__ import annotations

import json

import pytest

from medrl.align.records import Sample, UserError
from medrl.launch.preferences import (criterion_examples, lexicographic_pairs, preference_pairs,
                                      rubric_pairs)
from medrl.rewards.rubric_scorers import rm_input

RUBRIC = [{"criterion": "names the dose", "tier": "main", "weight": 0.6},
          {"criterion": "asks about allergies", "tier": "main", "weight": 0.4},
          {"criterion": "cites a guideline", "tier": "bonus"},
          {"criterion": "advises doubling the dose", "tier": "veto"}]


def row(uid="r1", responses=None, rubric=RUBRIC, **extra) -> Sample:
    return Sample(uid=uid, group_id=uid, messages=[{"role": "user", "content": "Dose?"}],
                  row={"rubric": rubric, "responses": responses, **extra})


def test_lexicographic_pairs_follow_vetoes_then_s1_then_bonus():
    tiers, weights = ["main", "main", "bonus", "veto"], [0.6, 0.4, 1.0, 1.0]
    graded = [
        [1, 1, 0, 1],     # 0: the best S1, but a veto violation
        [1, 0, 0, 0],     # 1: S1 0.6
        [0, 1, 1, 0],     # 2: S1 0.4, one bonus
        [1, 0, 1, 0],     # 3: S1 0.6, one bonus: beats 1 on the bonus
        [1, 0, 0, 0],     # 4: ties with 1 exactly: no pair
    ]
    pairs = lexicographic_pairs(tiers, weights, graded)
    assert set(pairs) == {(1, 0), (2, 0), (3, 0), (4, 0), (1, 2), (3, 1), (3, 2), (3, 4),
                          (4, 2)}
    assert (1, 4) not in pairs and (4, 1) not in pairs


def test_each_pair_gives_one_example_per_criterion_that_separates_it():
    # winner meets 0, loser meets 1; both None on 2; equal on 3
    assert criterion_examples([1.0, 0.0, None, 0.0], [0.0, 1.0, None, 0.0]) == \
        [(0, True), (1, False)]


def test_rubric_rows_become_criterion_conditioned_texts():
    good = {"text": "Take 5 mg; any allergies?", "verdicts": [1, 1, 0, 0]}
    unsafe = {"text": "Double it.", "verdicts": [1, 0, 0, 1]}
    pairs = rubric_pairs(row(responses=[good, unsafe]), responses_field="responses")
    # good wins (no veto); they differ on "asks about allergies" (good meets it) and on the
    # veto criterion (the unsafe one does what it describes, so it is that example's chosen)
    assert [p.row["tier"] for p in pairs] == ["main", "veto"]
    instruction = "user: Dose?"
    assert pairs[0].row["chosen"] == rm_input(instruction, "asks about allergies", good["text"])
    assert pairs[0].row["rejected"] == rm_input(instruction, "asks about allergies",
                                                unsafe["text"])
    assert pairs[1].row["chosen"] == rm_input(instruction, "advises doubling the dose",
                                              unsafe["text"])
    assert [p.uid for p in pairs] == ["r1/0", "r1/1"]


def test_healthbench_rubrics_and_json_strings_are_read():
    rubric = json.dumps([{"criterion": "urges emergency care", "points": 5},
                         {"criterion": "suggests waiting", "points": -4}])
    graded = [{"text": "Call 911.", "verdicts": [True, False]},
              {"text": "Wait.", "verdicts": [False, True]}]
    pairs = rubric_pairs(row(responses=graded, rubric=rubric), responses_field="responses")
    assert [p.row["tier"] for p in pairs] == ["main", "veto"]


def test_explicit_pairs_take_criterion_and_tier_or_none():
    s = row(chosen="yes", rejected="no", criterion="says yes", tier="main")
    (pair,) = preference_pairs([s], source="explicit", chosen_field="chosen",
                               rejected_field="rejected", criterion_field="criterion",
                               tier_field="tier", responses_field="responses")
    assert pair.row == {"chosen": rm_input("user: Dose?", "says yes", "yes"),
                        "rejected": rm_input("user: Dose?", "says yes", "no"), "tier": "main"}
    (plain,) = preference_pairs([row(chosen="yes", rejected="no")], source="explicit",
                                chosen_field="chosen", rejected_field="rejected",
                                criterion_field=None, tier_field=None,
                                responses_field="responses")
    assert plain.row["tier"] == "" and "Criterion:\n\n" in plain.row["chosen"]


@pytest.mark.parametrize("responses, message", [
    ([{"text": "a", "verdicts": [1, 1, 0, 0]}], "at least two graded responses"),
    ([{"text": "a", "verdicts": [1, 1, 0]}, {"text": "b", "verdicts": [0, 0, 0, 0]}],
     r"response 0: \"verdicts\" must hold one verdict per rubric criterion \(4\), got 3"),
    ([{"text": "a", "verdicts": [1, 2, 0, 0]}, {"text": "b", "verdicts": [0, 0, 0, 0]}],
     r"response 0, verdict 1: a verdict must be a number in \[0, 1\]"),
    ([{"text": "", "verdicts": [1, 1, 0, 0]}, {"text": "b", "verdicts": [0, 0, 0, 0]}],
     "non-empty \"text\""),
])
def test_bad_graded_responses_name_the_row_and_the_response(responses, message):
    with pytest.raises(UserError, match=f"sample r1.*{message}"):
        rubric_pairs(row(responses=responses), responses_field="responses")


def test_a_missing_explicit_response_names_the_row_and_column():
    with pytest.raises(UserError, match=r"sample r1: the rejected in column 'rejected' "
                                        r"\(reward_model.rejected_field\) must be a non-empty "
                                        r"string, not null"):
        preference_pairs([row(chosen="yes")], source="explicit", chosen_field="chosen",
                         rejected_field="rejected", criterion_field="criterion",
                         tier_field=None, responses_field="responses")
