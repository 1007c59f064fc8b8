"""medrl eval's scoring on a tiny model and real items: the log-likelihood choice against an
independent computation of the same definition, generation metrics on known completions,
the datasets and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medrl.align.records import Sample, UserError
from medrl.launch.eval_data import EvalDataset, load_eval_dataset
from medrl.launch.eval_scoring import dataset_results, metrics_of
from medrl.launch.evaluate import (EvalOptions, evaluate_dataset, generate_prediction,
                                   loglik_context)


class InProcess:
    """The engine group's score / generate on one in-process HF engine."""

    def __init__(self, model_dir):
        from medrl.rollouts.hf_engine import HFEngine

        self.engine = HFEngine(model_dir, seed=0)

    def score(self, samples):
        return self.engine.score(samples)

    def generate(self, prompts, sampling):
        return self.engine.generate(prompts, sampling)


@pytest.fixture(scope="module")
def tiny(tiny_qwen2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (tiny_qwen2, AutoTokenizer.from_pretrained(tiny_qwen2),
            AutoModelForCausalLM.from_pretrained(tiny_qwen2).eval(), InProcess(tiny_qwen2))


def by_hand(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of the continuation tokens' log-probs given the context: one forward pass of the
    two encoded apart and joined (the definition, computed without medrl's code)."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    return float(sum(logp[len(ctx) + j - 1, t] for j, t in enumerate(cont)))


@pytest.mark.parametrize("preset", ["medqa", "pubmedqa"])
def test_loglik_choice_equals_an_independent_computation(shared_data, tiny, preset):
    model_dir, tok, model, group = tiny
    ds = load_eval_dataset(preset, root=shared_data, max_samples=6)
    preds, too_long = evaluate_dataset(group, tok, ds, EvalOptions(mode="loglik"), 4096)
    assert too_long == 0 and len(preds) == 6
    for item, p in zip(ds.items, preds):
        context = loglik_context(item.row, ds.choices)
        conts = ([f" {k}" for k in item.row["options"]] if ds.choices == "letters"
                 else [f" {v}" for v in item.row["options"].values()])
        sums = [by_hand(model, tok, context, c) for c in conts]
        assert p.logprobs == pytest.approx(sums, abs=2e-4)
        letters = list(item.row["options"])
        assert p.choice == letters[max(range(len(sums)), key=sums.__getitem__)]
        per_char = [s / len(c.lstrip(" ")) for s, c in zip(sums, conts)]  # the choice's chars
        assert p.choice_norm == letters[max(range(len(sums)), key=per_char.__getitem__)]
    m = metrics_of(preds, "loglik")
    assert m["acc"]["value"] == sum(p.choice == p.gold for p in preds) / 6


def test_acc_norm_divides_by_the_choice_not_its_delimiting_space():
    from medrl.launch.evaluate import loglik_prediction

    row = {"options": {"A": "yes", "B": "no", "C": "maybe"}, "gold": "C"}
    item = Sample(uid="q", group_id="q", row=row)
    # per character of the choice: -4/3, -3.1/2, -6/5 -> maybe; counting the space, -4/4 and
    # -6/6 would tie and pick yes
    p = loglik_prediction(item, [[-4.0], [-3.1], [-6.0]], "words", None)
    assert p.choice == "B" and p.choice_norm == "C"


def test_contexts_follow_the_harness_layout(shared_data):
    medqa = load_eval_dataset("medqa", root=shared_data, max_samples=1).items[0].row
    text = loglik_context(medqa, "letters")
    assert text.startswith("Question: ") and text.endswith("\nD. " + medqa["options"]["D"] +
                                                           "\nAnswer:")
    pqal = load_eval_dataset("pubmedqa_pqal", root=shared_data, max_samples=1).items[0].row
    text = loglik_context(pqal, "words")
    assert text.startswith("Abstract: ") and "\nQuestion: " in text and "A. yes" not in text
    # the harness's pubmedqa: passages one per line, nothing stripped
    assert text == ("Abstract: " + "\n".join(pqal["context"]) + "\nQuestion: "
                    + pqal["question"] + "\nAnswer:")
    assert pqal["gold"] in ("A", "B", "C")


def test_items_too_long_for_the_context_are_counted(shared_data, tiny):
    _, tok, _, group = tiny
    ds = load_eval_dataset("medqa", root=shared_data, max_samples=4)
    preds, too_long = evaluate_dataset(group, tok, ds, EvalOptions(mode="loglik"), 40)
    assert too_long == 4 and preds == []


def completion(text: str) -> Sample:
    return Sample(uid="c", group_id="c", completion_text=text)


def test_generation_metrics_on_known_completions():
    row = {"options": {"A": "aspirin", "B": "heparin", "C": "rest"}, "gold": "B"}
    item = Sample(uid="q1", group_id="q1", row=row)
    p1 = generate_prediction(item, [completion("B"), completion("The answer is A"),
                                    completion("heparin"), completion("no idea")],
                             "letters", None)
    assert p1.answers == ["B", "A", "B", None]
    p2 = generate_prediction(Sample(uid="q2", group_id="q2", row=dict(row, gold="C")),
                             [completion("A")] * 4, "letters", None)
    m = metrics_of([p1, p2], "generate")
    assert m["acc"]["value"] == pytest.approx((2 / 4 + 0) / 2)  # pass@1 over the samples
    assert m["maj@4"]["value"] == 0.5  # q1: B twice beats A once; q2: A
    assert m["pass@4"]["value"] == 0.5
    assert m["answered"]["value"] == pytest.approx((3 / 4 + 1) / 2)


def test_greedy_generation_on_the_engine_is_one_sample_per_item(shared_data, tiny):
    _, tok, _, group = tiny
    ds = load_eval_dataset("medqa", root=shared_data, max_samples=2)
    preds, too_long = evaluate_dataset(group, tok, ds, EvalOptions(
        mode="generate", max_new_tokens=4), 4096)
    assert too_long == 0 and [len(p.answers) for p in preds] == [1, 1]
    assert set(metrics_of(preds, "generate")) == {"acc", "answered"}


def test_dataset_errors_name_what_and_where(tmp_path):
    with pytest.raises(UserError, match="neither a preset .*medqa.* nor a file"):
        load_eval_dataset("medqb", root=tmp_path, max_samples=None)
    with pytest.raises(UserError, match="preset 'medqa' reads medqa/test.jsonl under a data "
                                        "root; pass --data-root"):
        load_eval_dataset("medqa", root=None, max_samples=None)
    with pytest.raises(UserError, match=r"medqa/test.jsonl not found"):
        load_eval_dataset("medqa", root=tmp_path, max_samples=None)
    path = tmp_path / "open.jsonl"
    path.write_text(json.dumps({"question": "Q?", "answer": "yes"}) + "\n")
    with pytest.raises(UserError, match=r"open.jsonl: column 'options' \(data.fields.options\) "
                                        r"not found"):
        load_eval_dataset(str(path), root=None, max_samples=None)
    path.write_text(json.dumps({"question": "Q?", "options": None, "answer": "yes"}) + "\n")
    with pytest.raises(UserError, match=r"open.jsonl: sample open-0 \(row 0\): the mcq template "
                                        r"needs options"):
        load_eval_dataset(str(path), root=None, max_samples=None)


def test_rows_without_a_gold_answer_are_counted_not_scored(tmp_path):
    path = tmp_path / "mcq.jsonl"
    rows = [{"question": "Q1?", "options": {"A": "x", "B": "y"}, "answer": "A"},
            {"question": "Q2?", "options": {"A": "x", "B": "y"}, "answer": None}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds: EvalDataset = load_eval_dataset(str(path), root=None, max_samples=None)
    assert [s.row["gold"] for s in ds.items] == ["A"] and ds.unlabelled == 1


def test_healthbench_grades_follow_the_published_formula(shared_data, tiny):
    """Rubric datasets end to end on the shared HealthBench rows: each completion's score is
    HealthBench's points-met / positive points (clipped) of the verdicts it was given."""
    from medrl.launch.evaluate import rubric_grader

    _, tok, _, group = tiny
    ds = load_eval_dataset("healthbench", root=shared_data, max_samples=3)
    assert ds.kind == "rubric" and all(s.row["theme"] != "none" for s in ds.items)
    opts = EvalOptions(mode="generate", max_new_tokens=8, judge="tiny:qwen2")
    grader = rubric_grader(opts, shared_data / "unused")
    preds, too_long = evaluate_dataset(group, tok, ds, opts, 4096, grader)
    assert too_long == 0 and len(preds) == 3
    for item, p in zip(ds.items, preds):
        points = [c["points"] for c in item.row["rubric"]]
        (verdicts,) = p.verdicts
        assert len(verdicts) == len(points)
        earned = sum(pt for pt, v in zip(points, verdicts) if v >= 0.5)
        assert p.scores[0] == pytest.approx(min(max(earned / sum(x for x in points if x > 0),
                                                    0.0), 1.0))
    m = metrics_of(preds, "rubric")
    assert m["score"]["value"] == pytest.approx(sum(p.scores[0] for p in preds) / 3)
    assert m["score"]["low"] <= m["score"]["value"] <= m["score"]["high"]
    assert any(k.startswith("axis:") for k in m)


def test_rubric_metrics_average_each_items_samples_and_count_ungraded():
    from medrl.launch.evaluate import Prediction

    preds = [Prediction(uid="a", gold="", scores=[0.2, 0.6], dims={"axis:x": 0.5}),
             Prediction(uid="b", gold="", scores=[None, 1.0]),
             Prediction(uid="c", gold="", scores=[None, None])]
    m = metrics_of(preds, "rubric")
    assert m["score"]["value"] == pytest.approx((0.4 + 1.0) / 2) and m["score"]["n"] == 2
    assert m["graded"]["value"] == pytest.approx(3 / 6)
    assert m["axis:x"]["value"] == 0.5 and m["axis:x"]["n"] == 1


def test_rubric_datasets_need_a_judge(shared_data, tmp_path):
    from medrl.launch.evaluate import rubric_grader

    with pytest.raises(UserError, match="pass --judge MODEL"):
        rubric_grader(EvalOptions(), tmp_path)


def test_a_file_with_a_rubric_column_is_a_rubric_dataset(tmp_path):
    path = tmp_path / "consults.jsonl"
    row = {"qid": "c1", "question": "Chest pain at rest?",
           "crit": [{"criterion": "urges emergency care", "points": 5}]}
    path.write_text(json.dumps(row) + "\n")
    ds = load_eval_dataset(str(path), root=None, max_samples=None,
                           fields={"id": "qid", "rubric": "crit"})
    assert ds.kind == "rubric" and ds.items[0].row["rubric"] == row["crit"]
    assert ds.items[0].messages[-1]["content"] == "Chest pain at rest?"


RUBRIC = [{"criterion": "urges emergency care", "points": 5}]
CASE = "the patient has diabetes"  # a short dataset text, mapped as a label by mistake


@pytest.mark.parametrize("row,fields,says", [
    ({"question": "Chest pain?", "crit": RUBRIC, "example_tags": 5}, {"rubric": "crit"},
     "sample c-0: example_tags holds a value of type int; it is a list of tags"),
    ({"question": "Chest pain?", "crit": RUBRIC, "example_tags": "theme:emergency"},
     {"rubric": "crit"}, "sample c-0: example_tags holds a value of type str"),
    ({"question": "Chest pain?", "crit": 5}, {"rubric": "crit"},
     "sample 'c-0': the rubric must be a non-empty list of criteria, not a int"),
    ({"question": "Is it right?", "verdict": CASE}, {"label": "verdict"},
     "sample c-0: label 'verdict' is a 24-character text, not a veracity label"),
    ({"question": "Is it right?", "verdict": 1, "span": 5},
     {"label": "verdict", "error_span": "span"},
     "sample c-0: 'span' must be a string or a list of strings, got int"),
])
def test_bad_task_rows_are_refused_naming_file_and_sample(tmp_path, row, fields, says):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(UserError) as err:
        load_eval_dataset(str(path), root=None, max_samples=None, fields=fields)
    assert str(err.value).startswith(f"{path}: {says}"), str(err.value)
    assert CASE not in str(err.value)


@pytest.mark.parametrize("kind,column,value", [("label", "label", "error"),
                                               ("record", "record", {"diagnosis": "flu"})])
def test_task_files_may_map_a_prompt_instead_of_a_question(tmp_path, kind, column, value):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"text": "Fever for three days.", column: value}) + "\n")
    ds = load_eval_dataset(str(path), root=None, max_samples=None,
                           fields={kind: column, "prompt": "text"})
    assert ds.items[0].messages[-1]["content"].startswith("Fever for three days.\n\n")


@pytest.mark.parametrize("template", ["{question.upper.x}", "{count[0]}"])  # no such part
def test_a_prompt_template_that_cannot_be_filled_is_refused(tmp_path, template):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"question": "Fever?", "count": 3, "record": {"a": "b"}}) + "\n")
    with pytest.raises(UserError, match=r"sample t-0: the prompt template cannot be filled"):
        load_eval_dataset(str(path), root=None, max_samples=None, fields={"record": "record"},
                          prompt_template=template)


def test_reward_plugins_are_metrics_of_generated_items(tmp_path):
    from medrl.launch.evaluate import reward_metric_fn

    row = {"options": {"A": "aspirin", "B": "heparin"}, "answer": "B", "gold": "B"}
    items = [Sample(uid=u, group_id=u, row=row) for u in ("q1", "q2")]
    texts = [["B", "A"], ["heparin", "no idea"]]  # two samples per item
    completions = [Sample(uid=f"{it.uid}/{j}", group_id=it.uid, row=row, completion_text=t)
                   for it, ts in zip(items, texts) for j, t in enumerate(ts)]
    values = reward_metric_fn([{"name": "mcq_letter"}])(completions)
    assert values == {"mcq_letter": [1.0, 0.0, 1.0, 0.0]}
    preds = [generate_prediction(it, completions[2 * i:2 * i + 2], "letters", None)
             for i, it in enumerate(items)]
    for i, p in enumerate(preds):
        p.rewards = {"mcq_letter": values["mcq_letter"][2 * i:2 * i + 2]}
    m = metrics_of(preds, "generate")
    # the rule reward and the answer extractor agree: the reward's mean is pass@1
    assert m["reward:mcq_letter"]["value"] == m["acc"]["value"] == 0.5


def test_reward_arguments_reach_the_reward():
    from medrl.launch.cli import reward_specs
    from medrl.launch.evaluate import reward_metric_fn

    row = {"options": {"A": "aspirin", "B": "heparin"}, "answer": "B", "gold": "B"}
    texts = ["<answer>B</answer>", "B"]
    completions = [Sample(uid=f"q/{j}", group_id="q", row=row, completion_text=t)
                   for j, t in enumerate(texts)]
    specs = reward_specs(["mcq_letter"], ["mcq_letter.strict=true"])
    assert specs == ({"name": "mcq_letter", "kwargs": {"strict": True}},)
    # strict accepts only the tag: the bare letter no longer counts
    assert reward_metric_fn(specs)(completions) == {"mcq_letter": [1.0, 0.0]}
    for bad in ("strict=true", "other.strict=true", "mcq_letter.strict"):
        with pytest.raises(UserError, match="--reward-arg"):
            reward_specs(["mcq_letter"], [bad])


RECIPE_DATA = Path(__file__).resolve().parents[2] / "recipes" / "data"


def test_a_fact_checking_file_is_prompted_and_scored_as_such(tiny):
    from medrl.launch.eval_tasks import FACTCHECK_INSTRUCTION
    from medrl.launch.evaluate import task_prediction

    ds = load_eval_dataset(str(RECIPE_DATA / "factcheck_sample.jsonl"), root=None,
                           max_samples=None, fields={"id": "id", "question": "text",
                                                     "label": "label"})
    assert ds.kind == "factcheck" and len(ds.items) == 8
    first = ds.items[0]
    assert first.row["gold"] == "error" and first.row["gold_spans"] == [first.row["error_span"]]
    assert FACTCHECK_INSTRUCTION in first.messages[-1]["content"]
    # known completions: every error flagged, its passage quoted for fc-001 only; the
    # correct texts of fc-002 and fc-004 also flagged (over-criticism), fc-006 unanswered
    said = {"fc-001": f"Verdict: error\nError: {first.row['error_span']}",
            "fc-002": "Verdict: error\nError: Aspirin", "fc-004": "Verdict: error",
            "fc-006": "I am not sure."}
    preds = []
    for item in ds.items:
        text = said.get(item.uid, "Verdict: error\nError: something else"
                        if item.row["gold"] == "error" else "Verdict: correct")
        preds.append(task_prediction(item, [Sample(uid=f"{item.uid}/0", group_id=item.uid,
                                                   row=item.row, completion_text=text)],
                                     "factcheck"))
    m = dataset_results(ds, preds, "generate", too_long=0)["metrics"]
    # 4 errors all flagged (tp 4), 2 of the 4 correct texts flagged (fp 2), 1 unanswered
    assert m["precision"]["value"] == pytest.approx(4 / 6) and m["recall"]["value"] == 1.0
    assert m["f1"]["value"] == pytest.approx(2 * (4 / 6) / (4 / 6 + 1))
    assert m["over_criticism"]["value"] == pytest.approx(2 / 4)
    assert m["accuracy"]["value"] == pytest.approx(5 / 8)
    assert m["answered"]["value"] == pytest.approx(7 / 8)
    assert m["loc_exact"]["value"] == pytest.approx(1 / 4) and m["loc_exact"]["n"] == 4
    assert "spans" not in preds[0].record(log_text=False)  # the item's own text stays out

    with pytest.raises(UserError, match=r"factcheck_sample.jsonl: no row has a veracity label"):
        load_eval_dataset(str(RECIPE_DATA / "factcheck_sample.jsonl"), root=None,
                          max_samples=None, fields={"question": "text", "label": "verdict"})


def test_an_extraction_file_scores_field_level_f1(tiny):
    from medrl.launch.evaluate import task_prediction

    fields = {"id": "id", "question": "dialogue", "record": "record"}
    ds = load_eval_dataset(str(RECIPE_DATA / "sft_emr_dialogues.jsonl"), root=None,
                           max_samples=2, fields=fields)
    assert ds.kind == "extract" and ds.items[0].row["gold"]["allergies"] == ["penicillin (rash)"]
    prompt = ds.items[0].messages[-1]["content"]
    assert "chief_complaint, duration, symptoms, allergies, medications" in prompt
    gold = ds.items[0].row["gold"]
    wrong = dict(ds.items[1].row["gold"], medications=["aspirin"])  # one fp, one fn
    texts = [f"```json\n{json.dumps(gold)}\n```", json.dumps(wrong)]
    preds = [task_prediction(item, [Sample(uid=f"{item.uid}/0", group_id=item.uid,
                                           row=item.row, completion_text=t)], "extract")
             for item, t in zip(ds.items, texts)]
    m = dataset_results(ds, preds, "generate", too_long=0)["metrics"]
    facts = sum(len(v) if isinstance(v, list) else 1 for i in ds.items
                for v in i.row["gold"].values() if v not in ("", []))
    assert m["recall"]["value"] == pytest.approx((facts - 1) / facts)
    assert m["precision"]["value"] == pytest.approx((facts - 1) / facts)
    assert m["exact_record"]["value"] == 0.5 and m["parsed"]["value"] == 1.0
    assert m["field:medications/f1"]["value"] == pytest.approx(0.0)

    # the same set on the tiny engine: every item generated, counted, none parsed
    opts = EvalOptions(mode="generate", max_new_tokens=4)
    out, too_long = evaluate_dataset(tiny[3], tiny[1], ds, opts, max_len=4096)
    assert len(out) == 2 and too_long == 0
    assert dataset_results(ds, out, "generate", 0)["metrics"]["recall"]["value"] == 0.0
    with pytest.raises(UserError, match="sample emr-001: the prompt template cannot be filled"):
        load_eval_dataset(str(RECIPE_DATA / "sft_emr_dialogues.jsonl"), root=None,
                          max_samples=1, fields=fields, prompt_template="{transcript}")


def test_ct_rate_items_are_scored_on_their_volumes_when_present(shared_data, tiny_qwen2_vl,
                                                                 tmp_path):
    """The CT-RATE preset on the shared items, with one real MR volume (nibabel's test data)
    standing in for one chest CT under the data root; the others have no volume here."""
    import gzip

    import nibabel

    rows = json.loads((shared_data / "ct_rate_mcq" / "sample_data.json").read_text())
    root = tmp_path / "data"
    (root / "ct_rate_mcq" / "volumes").mkdir(parents=True)
    (root / "ct_rate_mcq" / "sample_data.json").symlink_to(
        shared_data / "ct_rate_mcq" / "sample_data.json")
    with pytest.raises(UserError, match=r"none of its 10 volume files was found"):
        load_eval_dataset("ct_rate_mcq", root=root, max_samples=None)
    mr = Path(nibabel.__file__).parent / "tests" / "data" / "anatomical.nii"
    target = root / "ct_rate_mcq" / "volumes" / Path(rows[0]["VolumeName"]).name
    target.write_bytes(gzip.compress(mr.read_bytes()))  # named .nii.gz as the rows name it

    ds = load_eval_dataset("ct_rate_mcq", root=root, max_samples=None)
    found = sum(Path(r["VolumeName"]).name == Path(rows[0]["VolumeName"]).name for r in rows)
    assert len(ds.items) == found and ds.no_volume == 10 - found and ds.media
    assert ds.items[0].volume == str(root / "ct_rate_mcq" / "volumes" /
                                     Path(rows[0]["VolumeName"]).name)
    engine = InProcess(tiny_qwen2_vl)
    opts = EvalOptions(mode="loglik", max_new_tokens=4)  # volumes are always generated
    preds, too_long = evaluate_dataset(engine, engine.engine.processor, ds, opts, max_len=8192)
    assert len(preds) == found and too_long == 0 and len(preds[0].answers) == 1
    result = dataset_results(ds, preds, "loglik", too_long)
    assert result["skipped"] == {"too_long": 0, "unlabelled": 0, "no_volume": 10 - found}
    assert "answered" in result["metrics"] and "acc_norm" not in result["metrics"]
