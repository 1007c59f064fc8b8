"""Data loading: formats, field mapping, errors, held-out splits, the prompt stream, real data."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import AutoTokenizer

from medrl.align.models import load_tokenizer
from medrl.align.records import Sample, UserError
from medrl.launch.data import load_samples, load_train_eval, read_rows, split_eval
from medrl.launch.recipe import DataConfig, VolumeConfig, load_recipe
from medrl.launch.stream import PromptStream
from medrl.align.prompts import MCQ_INSTRUCTION

REPO = Path(__file__).resolve().parents[2]
ROWS = [
    {"qid": "q1", "stem": "Which artery?", "choices": {"A": "LAD", "B": "RCA"}, "key": "B",
     "topic": "cardio"},
    {"qid": "q2", "stem": "Which drug?", "choices": {"A": "Metformin", "B": "Insulin"},
     "key": "A", "topic": "endo"},
    {"qid": "q3", "stem": "Which sign?", "choices": {"A": "Shadow", "B": "Mass"}, "key": "A",
     "topic": "imaging"},
]
FIELDS = {"id": "qid", "question": "stem", "options": "choices", "answer": "key"}


def cfg(path, **kw) -> DataConfig:
    kw.setdefault("fields", FIELDS)
    return DataConfig(path=str(path), **kw)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- formats ------------------------------------------------------------------------------------


def test_every_format_gives_the_same_samples(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps(ROWS))
    write_jsonl(tmp_path / "lines.jsonl", ROWS)
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "table.parquet"))
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:1]),
                          "test": datasets.Dataset.from_list(ROWS)}).save_to_disk(
        str(tmp_path / "dd"))
    write_jsonl(tmp_path / "lines.txt", ROWS)
    expected = [(s.uid, s.messages, s.row) for s in load_samples(cfg(tmp_path / "list.json"))]
    assert [u for u, _, _ in expected] == ["q1", "q2", "q3"]
    for path, extra in [("lines.jsonl", {}), ("table.parquet", {}), ("saved", {}),
                        ("dd", {"split": "test"}), ("lines.txt", {"format": "jsonl"})]:
        got = [(s.uid, s.messages, s.row) for s in load_samples(cfg(tmp_path / path, **extra))]
        assert got == expected, path


def test_json_keyed_by_id_and_jsonl_named_json(tmp_path):
    keyed = {r["qid"]: {k: v for k, v in r.items() if k != "qid"} for r in ROWS}
    (tmp_path / "keyed.json").write_text(json.dumps(keyed, indent=2))
    fields = {k: v for k, v in FIELDS.items() if k != "id"}
    samples = load_samples(cfg(tmp_path / "keyed.json", fields=fields))
    assert [s.uid for s in samples] == ["q1", "q2", "q3"]
    assert samples[0].row["id"] == "q1" and samples[0].row["topic"] == "cardio"
    write_jsonl(tmp_path / "lines.json", ROWS)
    assert [s.uid for s in load_samples(cfg(tmp_path / "lines.json"))] == ["q1", "q2", "q3"]


def test_saved_datasetdict_needs_a_split(tmp_path):
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                          "test": datasets.Dataset.from_list(ROWS)}).save_to_disk(
        str(tmp_path / "dd"))
    with pytest.raises(UserError, match="splits train, test; set data.split"):
        load_samples(cfg(tmp_path / "dd"))
    with pytest.raises(UserError, match="no split 'val'; the splits are train, test"):
        load_samples(cfg(tmp_path / "dd", split="val"))


# --- mapping ------------------------------------------------------------------------------------


def test_field_mapping_and_pass_through(tmp_path):
    path = write_jsonl(tmp_path / "items.jsonl", ROWS)
    s = load_samples(cfg(path, system_prompt="Sys."))[0]
    assert s.uid == s.group_id == "q1"
    assert s.data_dir == str(tmp_path)
    # mapped columns under canonical names, every stored column kept as it is
    assert s.row == {**ROWS[0], "question": "Which artery?", "options": {"A": "LAD", "B": "RCA"},
                     "answer": "B"}
    assert s.messages == [
        {"role": "system", "content": "Sys."},
        {"role": "user", "content": f"Which artery?\n\nA. LAD\nB. RCA\n\n{MCQ_INSTRUCTION}"}]


def test_shadowed_column_and_list_options(tmp_path):
    rows = [{"question": "Q?", "options": ["yes", "no", "maybe"], "answer": "no",
             "answer_idx": "B"}]
    path = write_jsonl(tmp_path / "pq.jsonl", rows)
    s = load_samples(DataConfig(path=str(path), fields={"answer": "answer_idx"}))[0]
    assert s.uid == "pq-0"  # no id column: <file stem>-<row index>
    assert s.row["options"] == {"A": "yes", "B": "no", "C": "maybe"}
    assert s.row["answer"] == "B" and s.row["answer_original"] == "no"


def test_struct_union_drops_absent_options(tmp_path):
    rows = [{"question": "Q1", "options": {"A": "a", "B": "b", "C": "c", "D": "d", "E": "e"}},
            {"question": "Q2", "options": {"A": "a", "B": "b", "C": "c", "D": "d"}}]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    samples = load_samples(DataConfig(path=str(path)))
    assert list(samples[1].row["options"]) == ["A", "B", "C", "D"]
    assert "E." not in samples[1].messages[0]["content"]


def test_open_template_without_options_and_max_samples(tmp_path):
    rows = [{"prompt": f"Summarise finding {i}.", "report": "r"} for i in range(5)]
    path = write_jsonl(tmp_path / "open.jsonl", rows)
    samples = load_samples(DataConfig(path=str(path), template="open", max_samples=2,
                                      fields={"prompt": "prompt"}))
    assert [s.messages for s in samples] == [
        [{"role": "user", "content": f"Summarise finding {i}."}] for i in range(2)]
    assert "options" not in samples[0].row


def test_chat_template(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Hi"}], "id": "c1"}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    s = load_samples(DataConfig(path=str(path), template="chat", system_prompt="S",
                                fields={"id": "id"}))[0]
    assert s.messages == [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]


def test_media_paths_resolve_against_the_data_folder(tmp_path):
    sub = tmp_path / "data"
    sub.mkdir()
    rows = [{"question": "Q?", "options": ["x", "y"], "img": ["a.png", "/abs/b.png"],
             "vol": "vols/v.npy"}]
    path = write_jsonl(sub / "mm.jsonl", rows)
    s = load_samples(DataConfig(path="data/mm.jsonl", fields={"images": "img", "volume": "vol"},
                                volume={"num_slices": 3}), base_dir=tmp_path)[0]
    assert s.images == [str(sub / "a.png"), "/abs/b.png"]
    assert s.volume == str(sub / "vols" / "v.npy")
    content = s.messages[0]["content"]
    assert [p["type"] for p in content] == ["image"] * 5 + ["text"]  # 2 images + 3 slices


# --- errors -------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(UserError) as err:
        load_samples(cfg(tmp_path / "nope.jsonl"))
    assert str(err.value) == (f"{tmp_path / 'nope.jsonl'}: data file not found. Check data.path "
                              "(relative paths are read from the recipe's folder).")


def test_missing_column_lists_the_existing_ones(tmp_path):
    path = write_jsonl(tmp_path / "items.jsonl", ROWS)
    with pytest.raises(UserError) as err:
        load_samples(cfg(path, fields={**FIELDS, "answer": "solution"}))
    assert str(err.value) == (
        f"{path}: column 'solution' (data.fields.answer) not found. The data has the columns: "
        "qid, stem, choices, key, topic. Set data.fields.answer to the column that holds it.")
    with pytest.raises(UserError, match=r"column 'question' \(data.fields.question\) not found"):
        load_samples(DataConfig(path=str(path)))


@pytest.mark.parametrize("name,content", [("e.jsonl", ""), ("e.json", " [ ]\n"),
                                           ("e.parquet", None)])
def test_empty_dataset(tmp_path, name, content):
    path = tmp_path / name
    if content is None:
        datasets.Dataset.from_dict({"question": []}).to_parquet(str(path))
    else:
        path.write_text(content)
    with pytest.raises(UserError) as err:
        load_samples(DataConfig(path=str(path)))
    assert str(err.value) == f"{path}: the dataset is empty; it needs at least one row."


def test_unreadable_and_malformed_files(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"question": "Q"}\n{"question": \n')
    with pytest.raises(UserError, match=r"bad\.jsonl: line 2 is not valid JSON \(Expecting "
                                        r"value at column 14\)"):
        load_samples(DataConfig(path=str(tmp_path / "bad.jsonl")))
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(UserError, match=r"bad\.parquet: cannot read the data file as parquet"):
        load_samples(DataConfig(path=str(tmp_path / "bad.parquet")))
    (tmp_path / "rows.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="cannot tell the data format from the suffix '.csv'"):
        load_samples(DataConfig(path=str(tmp_path / "rows.csv")))
    (tmp_path / "folder").mkdir()
    with pytest.raises(UserError, match="not written by datasets' save_to_disk"):
        load_samples(DataConfig(path=str(tmp_path / "folder")))


def test_duplicate_ids_and_bad_rows(tmp_path):
    path = write_jsonl(tmp_path / "dup.jsonl", [ROWS[0], ROWS[1], ROWS[0]])
    with pytest.raises(UserError, match="id 'q1' appears in rows 0 and 2"):
        load_samples(cfg(path))
    path = write_jsonl(tmp_path / "noopt.jsonl", [{**ROWS[0], "choices": None}])
    with pytest.raises(UserError, match=r"sample q1 \(row 0\): the mcq template needs options"):
        load_samples(cfg(path))


def test_a_jsonl_file_starting_with_null_is_refused_not_a_crash(tmp_path):
    """pyarrow's JSON reader kills the process on such a file: run it in a child process."""
    import subprocess
    import sys

    path = tmp_path / "nulls.jsonl"
    path.write_text("null\n" + json.dumps(ROWS[0]) + "\n")
    code = ("from medrl.launch.data import load_samples\n"
            "from medrl.launch.recipe import DataConfig\n"
            "from medrl.align.records import UserError\n"
            f"try:\n    load_samples(DataConfig(path={str(path)!r}))\n"
            "except UserError as exc:\n    print(exc)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{path}: line 1 holds null, not an object" in done.stdout


@pytest.mark.parametrize("content,says", [
    (json.dumps(ROWS[0]).encode() + b"\n" + json.dumps(ROWS[1]).encode().replace(
        b"drug", b"dr\xffug") + b"\n", "line 2 is not UTF-8 text"),
    (json.dumps(ROWS[0]).encode() + b"\n[1, 2]\n", "line 2 holds a list, not an object"),
    (b'["Which artery supplies the anterior wall?", "Which drug?"]',
     "item 0 of the JSON list is a string, not an object"),
    (b'[' + json.dumps(ROWS[0]).encode() + b', 5]', "item 1 of the JSON list is a number"),
])
def test_records_that_are_not_utf8_objects_are_refused_by_line(tmp_path, content, says):
    path = tmp_path / ("rows.json" if content.startswith(b"[") else "rows.jsonl")
    path.write_bytes(content)
    with pytest.raises(UserError) as err:
        load_samples(cfg(path))
    assert str(err.value).startswith(f"{path}: {says}"), str(err.value)
    assert "anterior wall" not in str(err.value)


CASE = "A 62-year-old woman with crushing chest pain"


@pytest.mark.parametrize("bad,template,says", [
    ({"stem": [CASE]}, "mcq", "column 'stem' (data.fields.question) holds a list; the question "
                              "is a text"),
    ({"stem": {"text": CASE}}, "mcq", "column 'stem' (data.fields.question) holds a dict"),
    ({"choices": [CASE, None]}, "mcq", "column 'choices' (data.fields.options): option 2 is "
                                       "null"),
    ({"choices": {"A": [CASE], "B": "Insulin"}}, "mcq",
     "column 'choices' (data.fields.options): option A is a list"),
    ({"context": 7}, "mcq", "column 'context' (data.fields.context) holds an int; a context is "
                            "a text or a list of texts"),
    ({"messages": [{"role": "user", "content": [1, 2]}]}, "chat",
     "column 'messages' (data.fields.messages): message 0 has a content part that is not a "
     "{'type': ...} mapping"),
    ({"messages": [{"role": "user", "content": 5}]}, "chat",
     "column 'messages' (data.fields.messages): message 0 has content of an int"),
    ({"messages": [{"role": 3, "content": CASE}]}, "chat",
     "column 'messages' (data.fields.messages): message 0 is not a {'role'"),
    ({"images": 5}, "mcq", "column 'images' (data.fields.images) holds an int"),
    ({"volume": {"path": CASE}}, "mcq", "column 'volume' (data.fields.volume) holds a dict"),
])
def test_cells_of_the_wrong_type_are_refused_naming_sample_and_column(tmp_path, bad, template,
                                                                       says):
    rows = [dict(r, messages=[{"role": "user", "content": r["stem"]}], context=None,
                 images=None, volume=None) for r in ROWS]
    rows[1].update(bad)
    path = write_jsonl(tmp_path / "items.jsonl", rows)
    fields = {**FIELDS, "context": "context", "images": "images", "volume": "volume"}
    with pytest.raises(UserError) as err:
        load_samples(cfg(path, fields=fields, template=template))
    assert str(err.value).startswith(f"{path}: sample q2 (row 1): {says}"), str(err.value)
    assert CASE not in str(err.value)


def test_an_empty_prompt_is_refused_by_the_open_template(tmp_path):
    rows = [{"qid": "q1", "ask": "Which artery?"}, {"qid": "q2", "ask": " "}]
    path = write_jsonl(tmp_path / "prompts.jsonl", rows)
    with pytest.raises(UserError, match=r"sample q2 \(row 1\): the prompt is empty \(template "
                                        "'open'\)"):
        load_samples(DataConfig(path=str(path), template="open",
                                fields={"id": "qid", "prompt": "ask"}))


def test_an_id_that_is_a_list_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "ids.jsonl", [{**ROWS[0], "qid": ["q", 1]}])
    with pytest.raises(UserError, match=r"row 0: the id in column 'qid' \(data.fields.id\) is "
                                        "a list; an id is a text or a number"):
        load_samples(cfg(path))


def test_an_id_that_is_a_long_text_is_refused_without_showing_it(tmp_path):
    path = write_jsonl(tmp_path / "ids.jsonl", [{**ROWS[0], "qid": "chest pain " * 30}])
    with pytest.raises(UserError) as err:
        load_samples(cfg(path))
    assert str(err.value).startswith(f"{path}: row 0: the id in column 'qid' (data.fields.id) "
                                     "is 330 characters long; an id is a short name")
    assert "chest pain" not in str(err.value)


def test_a_split_that_holds_out_every_row_names_the_file(tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", ROWS[:1])
    with pytest.raises(UserError) as err:
        load_train_eval(cfg(path, eval_fraction=0.5))
    assert str(err.value).startswith(f"{path}: data.eval_fraction 0.5 holds out all 1 row(s)")


# --- held-out split -----------------------------------------------------------------------------


def make_samples(n: int) -> list[Sample]:
    return [Sample(uid=f"s{i}", group_id=f"s{i}", messages=[{"role": "user", "content": str(i)}],
                   row={"question": f"Q{i}?"}) for i in range(n)]


def test_split_eval():
    samples = make_samples(200)
    train, held = split_eval(samples, 0.25, split_seed=3)
    assert 30 <= len(held) <= 70 and len(train) + len(held) == 200  # each row draws for itself
    assert {s.uid for s in train} | {s.uid for s in held} == {s.uid for s in samples}
    assert not {s.uid for s in train} & {s.uid for s in held}
    assert [s.uid for s in held] == [s.uid for s in split_eval(samples, 0.25, split_seed=3)[1]]
    assert [s.uid for s in held] != [s.uid for s in split_eval(samples, 0.25, split_seed=4)[1]]
    assert split_eval(samples, 0.0, split_seed=3) == (samples, [])
    assert len(split_eval(samples[:2], 0.01, split_seed=0)[1]) == 1  # at least one row held out
    with pytest.raises(UserError, match="holds out all 1 row.*no training rows"):
        split_eval(make_samples(1), 0.5, split_seed=0)


def test_split_follows_each_rows_content_not_its_position_or_id():
    samples = make_samples(60)
    train, held = split_eval(samples, 0.3, split_seed=0)
    questions = lambda part: {s.row["question"] for s in part}  # noqa: E731
    renamed = [Sample(uid=f"other-{i}", group_id=f"other-{i}", messages=s.messages, row=s.row)
               for i, s in enumerate(samples)]
    more = make_samples(90)[60:]
    shuffled = list(reversed(renamed[10:])) + more  # rows dropped, reordered, renamed, added
    train2, held2 = split_eval(shuffled, 0.3, split_seed=0)
    assert questions(held2) & questions(samples) == questions(held) - questions(samples[:10])
    assert questions(train2) & questions(samples) == questions(train) - questions(samples[:10])


def test_held_out_rows_do_not_depend_on_run_seed(tmp_path):
    rows = [{"id": f"r{i}", "question": f"Q{i}?", "options": ["x", "y"]} for i in range(30)]
    write_jsonl(tmp_path / "items.jsonl", rows)
    data = DataConfig(path="items.jsonl", fields={"id": "id"}, eval_fraction=0.2)
    # An sft stage (run.seed 1) and the grpo stage after it (run.seed 7) on the same file.
    first = PromptStream.from_recipe(data, seed=1, recipe_dir=tmp_path)
    later = PromptStream.from_recipe(data, seed=7, recipe_dir=tmp_path)
    assert first.eval_samples and uids(first.eval_samples) == uids(later.eval_samples)
    assert set(uids(first.samples)) == set(uids(later.samples))
    other = DataConfig(path="items.jsonl", fields={"id": "id"}, eval_fraction=0.2, split_seed=5)
    assert uids(PromptStream.from_recipe(other, seed=1, recipe_dir=tmp_path).eval_samples) != \
        uids(first.eval_samples)


def test_split_seed_is_recorded_in_the_run_folder(tmp_path):
    from medrl.launch.rundir import create_run_dir

    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", [f"run.output_dir={tmp_path}"])
    saved = yaml.safe_load((create_run_dir(recipe) / "recipe.yaml").read_text())
    assert saved["data"]["split_seed"] == 0 and saved["run"]["seed"] == recipe.run.seed


def test_load_train_eval(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS[:2])
    write_jsonl(tmp_path / "eval.jsonl", ROWS[2:])
    train, held = load_train_eval(cfg("train.jsonl", eval_path="eval.jsonl"), base_dir=tmp_path)
    assert [s.uid for s in train] == ["q1", "q2"] and [s.uid for s in held] == ["q3"]
    train, held = load_train_eval(cfg("eval.jsonl", eval_fraction=0.0), base_dir=tmp_path)
    assert held == []
    with pytest.raises(UserError, match="both set"):
        load_train_eval(cfg("train.jsonl", eval_path="eval.jsonl", eval_fraction=0.5),
                        base_dir=tmp_path)


def test_eval_rows_that_repeat_training_content_are_refused_whatever_their_ids(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS[:2])
    renamed = [{**ROWS[2], "qid": "new-1"}, {**ROWS[1], "qid": "new-2", "topic": "other"}]
    write_jsonl(tmp_path / "leak.jsonl", renamed)
    with pytest.raises(UserError) as err:
        load_train_eval(cfg("train.jsonl", eval_path="leak.jsonl"), base_dir=tmp_path)
    message = str(err.value)
    assert "1 of its 2 row(s) repeat rows of data.path" in message
    assert "eval row 1 = training row 1" in message
    assert not any(text in message for text in ("Which drug", "Metformin", "Insulin", "q2"))
    # Without ids (default ids <stem>-<row>) the same content is caught just the same.
    no_ids = {k: v for k, v in FIELDS.items() if k != "id"}
    write_jsonl(tmp_path / "a.jsonl", ROWS)
    write_jsonl(tmp_path / "b.jsonl", [ROWS[0]])
    with pytest.raises(UserError, match="eval row 0 = training row 0"):
        load_train_eval(cfg("a.jsonl", eval_path="b.jsonl", fields=no_ids), base_dir=tmp_path)


def test_same_file_name_in_two_folders_with_other_content_is_accepted(tmp_path):
    no_ids = {k: v for k, v in FIELDS.items() if k != "id"}
    for name, rows in (("train", ROWS[:2]), ("eval", ROWS[2:])):
        (tmp_path / name).mkdir()
        write_jsonl(tmp_path / name / "items.jsonl", rows)
    train, held = load_train_eval(cfg("train/items.jsonl", eval_path="eval/items.jsonl",
                                      fields=no_ids), base_dir=tmp_path)
    assert [s.uid for s in train] == ["items-0", "items-1"] and [s.uid for s in held] == ["items-0"]
    # Same text, same relative image name, but each folder's own image: different samples.
    no_ids["images"] = "img"
    for name in ("train", "eval"):
        write_jsonl(tmp_path / name / "items.jsonl", [{**ROWS[0], "img": "scan.png"}])
    train, held = load_train_eval(cfg("train/items.jsonl", eval_path="eval/items.jsonl",
                                      fields=no_ids), base_dir=tmp_path)
    assert len(train) == len(held) == 1
    # Both naming the one image file: the same sample.
    write_jsonl(tmp_path / "eval" / "items.jsonl", [{**ROWS[0], "img": "../train/scan.png"}])
    with pytest.raises(UserError, match="1 of its 1 row"):
        load_train_eval(cfg("train/items.jsonl", eval_path="eval/items.jsonl", fields=no_ids),
                        base_dir=tmp_path)


# --- the prompt stream --------------------------------------------------------------------------


def uids(samples) -> list[str]:
    return [s.uid for s in samples]


def test_stream_order_epochs_and_exact_counts():
    samples = make_samples(5)
    stream = PromptStream(samples, seed=7)
    order0 = [f"s{i}" for i in np.random.default_rng(7).permutation(5)]  # s2 s0 s4 s1 s3
    order1 = [f"s{i}" for i in np.random.default_rng(8).permutation(5)]  # s3 s0 s1 s2 s4
    assert uids(stream.take(3)) == order0[:3]
    # epoch 1 starts with s3, already in this call: deferred to the next call
    assert uids(stream.take(3)) == order0[3:] + ["s0"]
    assert stream.state()["deferred"] == [3]
    assert uids(stream.take(4)) == ["s3", "s1", "s2", "s4"]
    assert stream.state()["epoch"] == 2 and stream.state()["position"] == 0
    assert stream.state()["deferred"] == []
    assert uids(PromptStream(samples, shuffle=False).take(5)) == ["s0", "s1", "s2", "s3", "s4"]
    with pytest.raises(ValueError):
        stream.take(0)


def test_take_more_than_the_dataset_is_a_user_error():
    stream = PromptStream(make_samples(5), seed=0)
    with pytest.raises(UserError) as err:
        stream.take(6)
    assert str(err.value) == (
        "rollout.prompts_per_step (sft.batch_size in the sft and qat stages) is 6, but the "
        "training data has only 5 prompts (after the held-out rows), and a step never holds "
        "the same prompt twice; set it to at most 5, or use more data.")
    with pytest.raises(UserError, match=r"^rollout.prompts_per_step is 6, .* at most 5"):
        stream.check_take(6)
    stream.check_take(5)
    assert stream.state()["epoch"] == 0 and stream.state()["position"] == 0  # nothing taken


def handed_out(stream: PromptStream, taken: list[str]) -> None:
    """Every epoch hands out every prompt once: the taken uids are ``epoch`` whole epochs plus
    the current epoch's order up to the cursor, minus the prompts still deferred."""
    from collections import Counter

    st = stream.state()
    expected = Counter(uids(stream.samples) * st["epoch"])
    expected.update(f"s{i}" for i in stream.order(st["epoch"])[: st["position"]])
    expected.subtract(f"s{i}" for i in st["deferred"])
    assert Counter(taken) == +expected and not -expected


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 9), seed=st.integers(0, 2**31), shuffle=st.booleans(),
       takes=st.lists(st.integers(1, 9), min_size=1, max_size=12))
def test_no_prompt_twice_in_a_take_and_every_epoch_complete(n, seed, shuffle, takes):
    stream = PromptStream(make_samples(n), seed=seed, shuffle=shuffle)
    taken = []
    for k in takes:
        k = min(k, n)
        got = uids(stream.take(k))
        assert len(got) == k and len(set(got)) == k
        taken += got
        handed_out(stream, taken)
        owed = stream.state()["deferred"]
        assert len(set(owed)) == len(owed) < n  # owed prompts never pile up


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 9), seed=st.integers(0, 2**31), k=st.integers(1, 9))
def test_steps_of_one_size_hand_a_deferred_prompt_out_in_the_next_step(n, seed, k):
    k = min(k, n)
    stream = PromptStream(make_samples(n), seed=seed)
    for _ in range(3 * n):
        owed = [f"s{i}" for i in stream.state()["deferred"]]
        assert len(owed) < k
        assert uids(stream.take(k))[: len(owed)] == owed


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(2, 9), seed=st.integers(0, 2**31), data=st.data())
def test_refills_with_exclude_never_repeat_a_prompt_of_the_step(n, seed, data):
    """A step takes P prompts, then refills dropped groups with the step's uids excluded."""
    stream = PromptStream(make_samples(n), seed=seed)
    taken = []
    for _ in range(data.draw(st.integers(1, 6))):
        step = uids(stream.take(data.draw(st.integers(1, n))))
        for _ in range(data.draw(st.integers(0, 2))):
            k = data.draw(st.integers(1, n))
            refill = uids(stream.take(k, exclude=step))
            assert not set(refill) & set(step) and len(set(refill)) == len(refill)
            assert len(refill) == min(k, n - len(step))
            step += refill
        taken += step
        handed_out(stream, taken)


def test_exclude_defers_and_a_short_refill_returns_what_is_left():
    stream = PromptStream(make_samples(4), shuffle=False)
    assert uids(stream.take(2, exclude={"s0", "other"})) == ["s1", "s2"]
    assert stream.state()["deferred"] == [0]
    assert uids(stream.take(3)) == ["s0", "s3", "s1"]  # the deferred prompt comes first
    step = ["s2", "s3", "s0"]
    assert uids(stream.take(3, exclude=step)) == ["s1"]  # only one prompt is outside the step
    assert stream.take(1, exclude=["s0", "s1", "s2", "s3"]) == []


def test_different_seeds_give_different_orders():
    samples = make_samples(30)
    def order(seed):
        return uids(PromptStream(samples, seed=seed).take(30))

    assert order(0) != order(1)
    assert order(5) == order(5)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 9), seed=st.integers(0, 2**31),
       takes=st.lists(st.tuples(st.integers(1, 9), st.integers(0, 3)), min_size=2, max_size=8),
       cut=st.integers(1, 7))
def test_resumed_stream_continues_exactly(n, seed, takes, cut):
    """``takes``: (n, how many of the previous call's uids to exclude), across epochs."""
    samples = make_samples(n)

    def run(stream, plan, previous):
        out = []
        for k, held in plan:
            previous = uids(stream.take(min(k, n), exclude=previous[:held]))
            out.append(previous)
        return out, previous

    expected, _ = run(PromptStream(samples, seed=seed), takes, [])
    cut = min(cut, len(takes) - 1)
    first = PromptStream(samples, seed=seed)
    got, previous = run(first, takes[:cut], [])
    state = json.loads(json.dumps(first.state()))  # as stored in state.json
    resumed = PromptStream.from_state(samples, state)
    got += run(resumed, takes[cut:], previous)[0]
    assert got == expected


def test_resume_refuses_changed_data():
    stream = PromptStream(make_samples(4), seed=0)
    stream.take(2)
    with pytest.raises(UserError, match="the data changed since this run was saved: it had 4"):
        PromptStream.from_state(make_samples(5), stream.state())
    renamed = make_samples(4)
    renamed[0].uid = "other"
    with pytest.raises(UserError, match="the data changed"):
        PromptStream.from_state(renamed, stream.state())
    old_state = {k: v for k, v in stream.state().items() if k != "deferred"}
    assert PromptStream.from_state(make_samples(4), old_state).state() == stream.state()
    with pytest.raises(UserError, match="deferred prompt index"):
        PromptStream.from_state(make_samples(4), {**stream.state(), "deferred": [4]})


def test_from_recipe_holds_out_eval_rows_and_load_state(tmp_path):
    rows = [{"id": f"r{i}", "question": f"Q{i}?", "options": ["x", "y"]} for i in range(10)]
    write_jsonl(tmp_path / "items.jsonl", rows)
    data = DataConfig(path="items.jsonl", fields={"id": "id"}, eval_fraction=0.2)
    stream = PromptStream.from_recipe(data, seed=1, recipe_dir=tmp_path)
    n = len(stream.samples)
    assert n >= 5 and stream.eval_samples and n + len(stream.eval_samples) == 10
    streamed = set(uids(stream.take(n)))
    assert streamed == set(uids(stream.samples))
    assert not streamed & set(uids(stream.eval_samples))
    saved = stream.state()
    expected = uids(stream.take(5))
    again = PromptStream.from_recipe(data, seed=1, recipe_dir=tmp_path)
    again.load_state(saved)
    assert uids(again.take(5)) == expected


def test_media_load_lazily_for_taken_prompts_only(tmp_path):
    Image.fromarray(np.full((4, 6, 3), 90, dtype=np.uint8)).save(tmp_path / "ok.png")
    np.save(tmp_path / "v.npy", np.linspace(-500, 500, 4 * 5 * 6, dtype=np.float32)
            .reshape(4, 5, 6))
    rows = [{"id": "good", "question": "Q?", "options": ["x", "y"], "img": "ok.png",
             "vol": "v.npy"},
            {"id": "broken", "question": "Q?", "options": ["x", "y"], "img": "gone.png",
             "vol": None}]
    path = write_jsonl(tmp_path / "mm.jsonl", rows)
    data = DataConfig(path=str(path), fields={"id": "id", "images": "img", "volume": "vol"},
                      shuffle=False, volume={"num_slices": 2})
    samples = load_samples(data)  # a missing image is not an error until it is used
    stream = PromptStream.from_config(samples, data, seed=0)
    taken = stream.take(1)[0]
    assert len(taken.images) == 3 and all(isinstance(i, Image.Image) for i in taken.images)
    assert taken.images[0].size == (6, 4) and taken.images[1].size == (6, 5)
    assert samples[0].images == [str(tmp_path / "ok.png")]  # the dataset keeps paths
    assert taken.volume == str(tmp_path / "v.npy")
    mismatched = PromptStream(samples, shuffle=False, volume=VolumeConfig(num_slices=3))
    with pytest.raises(UserError, match="sample good: the prompt has 3 image part.s. but 4"):
        mismatched.take(1)
    with pytest.raises(UserError) as err:
        stream.take(1)
    missing = tmp_path / "gone.png"
    assert str(err.value).startswith(f"sample broken: image {missing} does not exist.")


def test_volume_prompt_through_the_vl_processor(tmp_path, tiny_qwen2_vl):
    np.save(tmp_path / "ct.npy", np.random.default_rng(0).normal(0, 300, (12, 20, 24))
            .astype(np.float32))
    rows = [{"VolumeName": "ct.npy", "question": "Finding?", "options": {"A": "x", "B": "y"},
             "answer": "A"}]
    data = DataConfig(path=str(write_jsonl(tmp_path / "ct.jsonl", rows)),
                      fields={"volume": "VolumeName"}, volume={"num_slices": 3})
    sample = PromptStream.from_config(load_samples(data), data, seed=0).take(1)[0]
    proc = load_tokenizer(tiny_qwen2_vl)
    text = proc.apply_chat_template(sample.messages, tokenize=False, add_generation_prompt=True)
    batch = proc(text=[text], images=sample.images, return_tensors="pt")
    assert batch["image_grid_thw"].shape[0] == 3  # one grid per slice
    pad = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    merged = int((batch["image_grid_thw"].prod(-1) // 4).sum())  # 2x2 patch merge
    assert int((batch["input_ids"] == pad).sum()) == merged


def test_quickstart_recipe_data_loads():
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml")
    samples = load_samples(recipe.data, base_dir=REPO / "recipes")
    assert samples[0].uid == "qs-000" and samples[0].row["id"] == "qs-000"
    assert samples[0].row["answer"] == "B" and len(samples) == 40
    assert samples[0].messages[0]["role"] == "system"


# --- the real evaluation sets in ../shared/data -------------------------------------------------


def render(tok, sample) -> str:
    return tok.apply_chat_template(sample.messages, tokenize=False, add_generation_prompt=True)


def test_medqa_and_medmcqa(shared_data, tiny_qwen2):
    tok = AutoTokenizer.from_pretrained(tiny_qwen2)
    for name, count in (("medqa", 1273), ("medmcqa", 2816)):
        data = DataConfig(path=str(shared_data / name / "test.jsonl"),
                          fields={"id": "realidx", "answer": "answer_idx"})
        samples = load_samples(data)
        assert len(samples) == count and len({s.uid for s in samples}) == count
        s = samples[0]
        assert set(s.row["options"]) == {"A", "B", "C", "D"} and s.row["answer"] in "ABCD"
        assert s.row["answer_original"] == s.row["options"][s.row["answer"]]
        text = render(tok, s)
        opts = "".join(f"\n{k}. {v}" for k, v in s.row["options"].items())
        assert text == (f"<|im_start|>user\n{s.row['question'].strip()}\n{opts}\n\n"
                        f"{MCQ_INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n")
    medqa0 = load_samples(DataConfig(path=str(shared_data / "medqa" / "test.jsonl"),
                                     max_samples=1))[0]
    assert medqa0.uid == "test-0" and medqa0.row["answer"].startswith("Tell the attending")


def test_pubmedqa_medagents_and_ori(shared_data, tiny_qwen2):
    tok = AutoTokenizer.from_pretrained(tiny_qwen2)
    data = DataConfig(path=str(shared_data / "pubmedqa" / "medagents_test.jsonl"),
                      fields={"id": "realidx", "answer": "answer_idx"}, max_samples=20)
    samples = load_samples(data)
    for s in samples:
        assert s.row["options"] == {"A": "yes", "B": "no", "C": "maybe"}
        assert s.row["options"][s.row["answer"]] == s.row["answer_original"]
    assert render(tok, samples[0]).endswith(
        "\n\nA. yes\nB. no\nC. maybe\n\n" + MCQ_INSTRUCTION + "<|im_end|>\n<|im_start|>assistant\n")
    ori = DataConfig(path=str(shared_data / "pubmedqa" / "ori_pqal.json"), template="open",
                     fields={"question": "QUESTION", "context": "CONTEXTS",
                             "answer": "final_decision"})
    samples = load_samples(ori)
    assert len(samples) == 1000 and samples[0].uid == "21645374"
    s = samples[0]
    assert s.row["answer"] in ("yes", "no", "maybe") and "LONG_ANSWER" in s.row
    content = s.messages[0]["content"]
    assert content.startswith(s.row["CONTEXTS"][0].strip())
    assert content.endswith("\n\n" + s.row["QUESTION"].strip())
    labels = shared_data / "pubmedqa" / "test_ground_truth.json"  # {id: label}, not records
    with pytest.raises(UserError, match=r"must map ids to records .* the value of '12377809' "
                                        "is a str"):
        read_rows(labels)


def test_ct_rate_mcq(shared_data, tiny_qwen2):
    tok = AutoTokenizer.from_pretrained(tiny_qwen2)
    data = DataConfig(path=str(shared_data / "ct_rate_mcq" / "sample_data.json"),
                      fields={"volume": "VolumeName"}, volume={"num_slices": 4})
    samples = load_samples(data)
    assert len(samples) == 10 and samples[0].uid == "sample_data-0"
    s = samples[0]
    assert s.volume == s.row["VolumeName"] and s.volume.endswith(".nii.gz")  # absolute: kept
    assert s.row["answer"] == "D" and s.row["options"]["D"] == "Emphysema"
    text = render(tok, s)
    assert text.startswith("<|im_start|>user\n" + "<|vision_start|><|image_pad|><|vision_end|>" * 4
                           + "What unusual finding is present in this image?")
    assert "\n\nA. Hiatal hernia\nB. Atelectasis\nC. Pleural effusion\nD. Emphysema\n\n" in text
    with pytest.raises(UserError) as err:
        PromptStream(samples, seed=0, shuffle=False, volume=data.volume).take(1)
    assert str(err.value).startswith(f"sample sample_data-0: volume {s.volume} does not exist.")
