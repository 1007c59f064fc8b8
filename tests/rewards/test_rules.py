"""Built-in rule rewards on the real answer formats of MedQA, MedMCQA, PubMedQA and CT-RATE."""

from __future__ import annotations

import json

import pytest

from medrl.align.records import Sample
from medrl.rewards.rules import (gold_letter, mcq_letter, overlong_penalty, think_answer_format,
                                 yes_no_maybe)


def rows(path, n):
    with open(path) as fh:
        return [json.loads(next(fh)) for _ in range(n)]


def sample(row, text, n_tokens=4):
    return Sample(uid="g/0", group_id="g", row=row, completion_text=text,
                  completion_ids=list(range(n_tokens)))


TOLERANT_FORMS = ["Answer: {L}", "({L})", "{L})", "the answer is {L}", "<answer>{L}</answer>",
                  "{L}", "After weighing it up, the correct option is **{L}**.",
                  "<think>A looks tempting, but no.</think><answer>{L}</answer>"]


@pytest.mark.parametrize("name", ["medqa/test.jsonl", "medmcqa/test.jsonl"])
def test_mcq_letter_on_real_rows(shared_data, name):
    for row in rows(shared_data / name, 25):
        gold = row["answer_idx"]
        wrong = next(k for k in row["options"] if k != gold)
        # MedQA/MedMCQA: `answer` is the option text, `answer_idx` the letter
        assert gold_letter(row) == gold
        for form in TOLERANT_FORMS:
            assert mcq_letter(sample(row, form.format(L=gold))) == 1.0, form
            assert mcq_letter(sample(row, form.format(L=wrong))) == 0.0, form
        # an echo of the option text counts, in the tolerant mode only
        echo = f"I would go with: {row['options'][gold]}"
        if sum(row["options"][gold].lower() in v.lower() for v in row["options"].values()) == 1:
            assert mcq_letter(sample(row, echo)) == 1.0
        assert mcq_letter(sample(row, echo), strict=True) == 0.0
        assert mcq_letter(sample(row, f"<answer>{gold}</answer>"), strict=True) == 1.0
        assert mcq_letter(sample(row, f"Answer: {gold}"), strict=True) == 0.0


def test_mcq_letter_ct_rate_letter_answers(shared_data):
    items = json.loads((shared_data / "ct_rate_mcq" / "sample_data.json").read_text())
    for row in items:
        assert gold_letter(row) == row["answer"]  # CT-RATE rows give the letter as `answer`
        text = f"Findings point to {row['options'][row['answer']]}."
        assert mcq_letter(sample(row, text)) == 1.0


def test_mcq_letter_edge_cases():
    row = {"options": {"A": "Pleural effusion", "B": "Effusion", "C": "Atelectasis"},
           "answer_idx": "B", "answer": "Effusion"}
    assert mcq_letter(sample({"options": row["options"]}, "B")) is None  # no answer: n/a
    assert mcq_letter(sample(row, "The answer is a pneumothorax")) == 0.0  # "a" is no letter
    # "Effusion" inside "Pleural effusion" is not evidence for B on its own
    assert mcq_letter(sample(row, "Pleural effusion")) == 0.0
    assert mcq_letter(sample(row, "Answer: A ... on reflection, the final answer is B")) == 1.0
    assert mcq_letter(sample(row, "The answer is B, not option A")) == 1.0
    assert mcq_letter(sample(row, "<answer>B</answer><answer>B</answer>"), strict=True) == 0.0
    with pytest.raises(ValueError, match="neither an option letter nor the text"):
        mcq_letter(sample({"options": row["options"], "answer": "Pneumothorax"}, "A"))


def test_yes_no_maybe_on_pubmedqa(shared_data):
    for row in rows(shared_data / "pubmedqa" / "medagents_test.jsonl", 40):
        gold = row["answer"]
        other = "no" if gold != "no" else "yes"
        for form in ["{a}", "{A}.", "Answer: {a}", "<answer>{a}</answer>",
                     "<think>mixed evidence</think><answer>{a}</answer>",
                     "The answer is {a} because the trial was small."]:
            assert yes_no_maybe(sample(row, form.format(a=gold, A=gold.capitalize()))) == 1.0
            assert yes_no_maybe(sample(row, form.format(a=other, A=other.capitalize()))) == 0.0
        letter = row["answer_idx"]  # options {"A": "yes", "B": "no", "C": "maybe"}
        assert yes_no_maybe(sample(row, f"({letter})")) == 1.0
        assert yes_no_maybe(sample(row, f"Answer: {gold}"), strict=True) == 0.0
        assert yes_no_maybe(sample(row, f"<answer> {gold} </answer>"), strict=True) == 1.0
    assert yes_no_maybe(sample({"question": "q"}, "yes")) is None


def test_think_answer_format():
    ok = "<think>reasoning</think>\n<answer>B</answer>"
    assert think_answer_format(sample({}, ok)) == 1.0
    for bad in ["<answer>B</answer>", "<think></think><answer>B</answer>",
                "<think>x</think><answer>B</answer> trailing", "prefix <think>x</think><answer>B</answer>",
                "<think>x</think><think>y</think><answer>B</answer>", "<think>x</think>B"]:
        assert think_answer_format(sample({}, bad)) == 0.0, bad
    assert think_answer_format(sample({}, "<answer>B</answer>"), require_think=False) == 1.0


def test_overlong_penalty_dapo_ramp():
    # max_length 10, buffer 4: free up to 6 tokens, then -1/4 per token, -1 beyond 10
    got = [overlong_penalty(sample({}, "", n), max_length=10, buffer=4) for n in (0, 6, 7, 8, 10, 11)]
    assert got == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    with pytest.raises(ValueError, match="must not exceed max_length"):
        overlong_penalty(sample({}, "", 3), max_length=4, buffer=5)


@pytest.mark.parametrize("name,row", [
    ("mcq_letter", {"options": {"A": "Aspirin", "B": "Heparin"},
                    "answer": "Warfarin for Mrs Jones after her stroke"}),
    ("yes_no_maybe", {"options": {"A": "yes", "B": "no", "C": "maybe"},
                      "answer": "Probably, given Mrs Jones's stroke"}),
    ("mcq_letter", {"options": "A) Aspirin for Mrs Jones B) Heparin", "answer": "A"}),
])
def test_rule_failures_name_field_and_sample_not_the_text(name, row, tmp_path):
    from medrl.rewards import RewardContext, RewardError, RewardRunner, load_rewards

    row = {**row, "question": "Mrs Jones, 81, had a stroke last week. What now?"}
    s = Sample(uid="medqa-17/3", group_id="medqa-17", row=row,
               completion_text="Mrs Jones should get heparin.", completion_ids=[1, 2])
    runner = RewardRunner(load_rewards([{"name": name}]))
    with pytest.raises(RewardError) as err:
        runner.score([s])
    message = str(err.value)
    assert "Mrs Jones" not in message and "stroke" not in message
    field = "options" if isinstance(row["options"], str) else "answer"
    assert f"'{field}'" in message and "'medqa-17/3'" in message
    # the same cause goes to the run folder's failures log under skip_sample
    skipping = RewardRunner(load_rewards([{"name": name}]), on_error="skip_sample",
                            ctx=RewardContext(run_dir=tmp_path))
    skipping.score([s], step=1)
    logged = (tmp_path / "reward_failures.jsonl").read_text()
    assert "Mrs Jones" not in logged and "medqa-17/3" in logged


@pytest.mark.parametrize("answer", [["Aspirin"], {"text": "Aspirin"}])
def test_an_answer_that_is_a_list_or_mapping_is_refused_not_matched(answer):
    row = {"options": {"A": "Aspirin", "B": "Heparin"}, "answer": answer}
    with pytest.raises(ValueError, match=r"the row's field 'answer' is a (list|dict); expected "
                                         "an option letter"):
        gold_letter(row)
