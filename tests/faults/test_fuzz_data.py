"""Fuzzing the data loaders: generated dataset files (rows with missing fields, values of the
wrong type, empty and huge texts, duplicate ids, bytes that are not UTF-8, JSON of every
top-level shape, cut lines) through ``load_samples``, ``load_train_eval``, the prompt stream
and ``medrl eval``'s file datasets, and broken images and volumes through ``load_media``.

Every case ends as a valid result or a UserError that names the file (the data file, or the
sample and its media file) and repeats none of the rows' text. `MEDRL_FUZZ_EXAMPLES` sets the
number of cases per test (CI: the default; thousands: MEDRL_FUZZ_EXAMPLES=5000)."""

from __future__ import annotations

import gzip
import io
import itertools
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from medrl.align.records import Sample, UserError
from medrl.launch.data import load_media, load_samples, load_train_eval
from medrl.launch.eval_data import load_eval_dataset
from medrl.launch.recipe import DataConfig, VolumeConfig
from medrl.launch.stream import PromptStream

EXAMPLES = int(os.environ.get("MEDRL_FUZZ_EXAMPLES", "120"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example])
SECRET_LEN = 20  # row text longer than this never appears in a message
NOT_TEXT = ("id", "images", "volume")  # columns that name things: messages may repeat them
HUGE = 100_000
NAMES = itertools.count()


# --- media files, made once -------------------------------------------------------------------


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    import nibabel as nib

    folder = tmp_path_factory.mktemp("media")
    Image.new("RGB", (6, 5), (10, 200, 30)).save(folder / "ok.png")
    rng = np.random.default_rng(0)
    (folder / "random.png").write_bytes(rng.bytes(300))
    (folder / "empty.png").write_bytes(b"")
    volume = rng.normal(0, 100, (6, 5, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), folder / "ok.nii.gz")
    whole = (folder / "ok.nii.gz").read_bytes()
    (folder / "cut.nii.gz").write_bytes(whole[: len(whole) // 2])
    (folder / "random.nii.gz").write_bytes(rng.bytes(300))
    return {p.name: p for p in folder.iterdir()} | {"missing.png": folder / "missing.png",
                                                   "missing.nii.gz": folder / "missing.nii.gz"}


# --- what a message may say -------------------------------------------------------------------


def row_texts(value: Any) -> list[str]:
    """Every string longer than SECRET_LEN in a row's values (the text no message repeats)."""
    if isinstance(value, str):
        return [value] if len(value) > SECRET_LEN else []
    if isinstance(value, dict):
        return [t for k, v in value.items() for t in row_texts(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in row_texts(v)]
    return []


def texts_of(rows: Any, fields: dict[str, str] | None = None) -> list[str]:
    """The row text of a file's rows, but for the columns that name things (ids, media
    paths: by default or as ``fields`` maps them), which messages may repeat."""
    names = set(NOT_TEXT) | {v for k, v in (fields or {}).items() if k in NOT_TEXT}
    if isinstance(rows, dict):
        rows = list(rows.values())
    if not isinstance(rows, list):
        return row_texts(rows)
    ids = [str(r[k]) for r in rows if isinstance(r, dict) for k in names if k in r]
    texts = [t for r in rows for t in (
        [t for k, v in r.items() if k not in names for t in row_texts(v)]
        if isinstance(r, dict) else row_texts(r))]
    return [t for t in texts if not any(t in i for i in ids)]  # an id may repeat a text


def check_error(exc: UserError, *, files: list[Path], secrets: list[str]) -> None:
    """A message names one of ``files`` (or a sample and its media) and repeats no row text."""
    text = str(exc)
    assert text.strip(), "an error says what is wrong"
    if currently_in_test_context():  # --hypothesis-show-statistics counts the kinds seen
        for f in files:
            text = text.replace(str(f), "FILE")
        event(re.sub(r"sample \S+( \(row \d+\))?", "sample", " ".join(text.split()[:9]))[:70])
        text = str(exc)
    # the loader names the data file; a media error (at take time) the sample and the media
    assert any(str(f) in text for f in files) or text.startswith("sample "), text[:500]
    for secret in secrets:
        assert secret not in text, f"row text in the message: {text[:500]}"
    assert len(text) < 4000, "one paragraph, not a dump"


# --- generated rows and files -----------------------------------------------------------------

SHORT = st.text(max_size=12)
LONG = st.text(min_size=SECRET_LEN + 1, max_size=60)
TEXT = st.one_of(SHORT, LONG, st.just(""), st.just("   "),
                 st.builds(lambda c: c * HUGE, st.sampled_from("ab\u00e9\u4e2d")))
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20),
                   st.floats(allow_nan=True, allow_infinity=True))
ANY = st.recursive(st.one_of(SCALAR, TEXT),
                   lambda inner: st.one_of(st.lists(inner, max_size=3),
                                           st.dictionaries(SHORT, inner, max_size=3)),
                   max_leaves=6)
OPTIONS = st.one_of(
    st.dictionaries(st.sampled_from("ABCDE"), st.one_of(TEXT, ANY), max_size=5),
    st.lists(st.one_of(TEXT, ANY), max_size=5),
    st.lists(TEXT, min_size=27, max_size=28), TEXT, ANY)
PART = st.one_of(st.fixed_dictionaries({"type": st.sampled_from(["text", "image"]),
                                        "text": TEXT}), ANY)
MESSAGE = st.one_of(
    st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["user", "assistant", "system"]),
                                             ANY),
                           "content": st.one_of(TEXT, st.lists(PART, max_size=3), ANY)}),
    st.dictionaries(st.sampled_from(["role", "content", "name"]), ANY, max_size=3), ANY)
RUBRIC_ITEM = st.one_of(
    st.fixed_dictionaries({"criterion": TEXT, "points": st.one_of(st.integers(-10, 10), ANY)},
                          optional={"tags": st.lists(st.one_of(SHORT, ANY), max_size=2)}),
    st.fixed_dictionaries({"criterion": TEXT, "tier": st.sampled_from(["main", "bonus", "veto"]),
                           "weight": st.one_of(st.just(1.0), ANY)}), ANY)


def media_refs(kind: str) -> st.SearchStrategy:
    names = (["ok.png", "random.png", "empty.png", "missing.png"] if kind == "images"
             else ["ok.nii.gz", "cut.nii.gz", "random.nii.gz", "missing.nii.gz"])
    ref = st.one_of(st.sampled_from(names), ANY)
    return st.one_of(ref, st.lists(ref, max_size=3)) if kind == "images" else ref


COLUMNS = {
    "id": st.one_of(st.integers(0, 3), st.sampled_from(["a", "b", "1"]), ANY),
    "question": st.one_of(TEXT, TEXT, ANY),
    "prompt": st.one_of(TEXT, ANY),
    "context": st.one_of(TEXT, st.lists(st.one_of(TEXT, st.none()), max_size=3), ANY),
    "options": OPTIONS,
    "answer": st.one_of(st.sampled_from(["A", "B", "c", " d "]), TEXT, ANY),
    "answer_idx": st.one_of(st.sampled_from(["A", "B"]), ANY),
    "messages": st.one_of(st.lists(MESSAGE, max_size=3), ANY),
    "images": media_refs("images"),
    "volume": media_refs("volume"),
    "label": st.one_of(st.sampled_from(["error", "correct", "true", 1, 0, True, "", None]),
                       TEXT, ANY),
    "error_span": st.one_of(TEXT, st.lists(TEXT, max_size=2), ANY),
    "record": st.one_of(st.dictionaries(SHORT, st.one_of(TEXT, ANY), max_size=3),
                        st.builds(json.dumps, st.dictionaries(SHORT, SHORT, max_size=2)),
                        st.just("{not json"), ANY),
    "rubric": st.one_of(st.lists(RUBRIC_ITEM, max_size=3),
                        st.builds(json.dumps, st.lists(st.fixed_dictionaries(
                            {"criterion": SHORT, "points": st.integers(-3, 3)}), max_size=2)),
                        ANY),
    "example_tags": st.one_of(st.lists(st.one_of(st.just("theme:emergency"), SHORT, ANY),
                                       max_size=3), ANY),
}


WELL_FORMED = {  # what most rows hold, so that most cases reach the rows' own checks
    "question": st.one_of(SHORT, LONG), "options": st.lists(st.one_of(SHORT, LONG), min_size=2,
                                                            max_size=4),
    "answer": st.sampled_from(["A", "B"]),
    "messages": st.builds(lambda t: [{"role": "user", "content": t}], st.one_of(SHORT, LONG)),
    "id": st.builds(str, st.integers(0, 10**6)),
    "label": st.sampled_from(["error", "correct", 0, 1, True]),
    "record": st.dictionaries(st.sampled_from(["diagnosis", "drugs"]),
                              st.one_of(SHORT, st.lists(SHORT, max_size=2)), min_size=1),
    "rubric": st.lists(st.fixed_dictionaries({"criterion": st.one_of(SHORT, LONG),
                                              "points": st.sampled_from([-5, -1, 1, 2, 5])}),
                       min_size=1, max_size=3),
    "example_tags": st.lists(st.sampled_from(["theme:emergency", "theme:context"]),
                             max_size=2)}


@st.composite
def rows(draw, min_size: int = 1) -> list[Any]:
    """Rows of a dataset: objects that mostly hold well-formed columns, with some cells
    drawn from anything (wrong types, empty or huge texts), some columns left out and some
    added; now and then another JSON value where a row should be."""
    out = []
    for _ in range(draw(st.integers(min_size, 5))):
        if draw(st.integers(0, 39)) == 0:
            out.append(draw(ANY))
            continue
        row = {}
        for key in sorted(COLUMNS):
            if key in WELL_FORMED and draw(st.integers(0, 9)) < 9:
                row[key] = draw(WELL_FORMED[key] if draw(st.integers(0, 9)) else COLUMNS[key])
            elif key not in WELL_FORMED and draw(st.integers(0, 3)) == 0:
                row[key] = draw(COLUMNS[key])
        out.append(row)
    return out


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)  # NaN / Infinity as Python writes them


@st.composite
def data_files(draw) -> tuple[bytes, str, Any]:
    """(file bytes, suffix, what was written): JSON lines, a JSON list, a JSON object keyed by
    id, or a JSON scalar, then maybe damaged (bytes that are not UTF-8, a cut line, a line
    that is not JSON)."""
    data = draw(rows())
    shape = draw(st.sampled_from(["jsonl"] * 6 + ["list"] * 3 + ["keyed"] * 2 + ["scalar"]))
    if shape == "jsonl":
        content, suffix = "".join(dumps(r) + "\n" for r in data), ".jsonl"
    elif shape == "list":
        content, suffix = dumps(data), ".json"
    elif shape == "keyed":
        data = {f"k{i}" if draw(st.booleans()) else draw(SHORT): r for i, r in enumerate(data)}
        content, suffix = dumps(data), ".json"
    else:
        data = draw(st.one_of(SCALAR, TEXT))
        content, suffix = dumps(data), draw(st.sampled_from([".json", ".jsonl"]))
    raw = bytearray(content.encode("utf-8"))
    damage = draw(st.sampled_from(["none"] * 7 + ["bytes", "cut", "garbage"]))
    if damage == "bytes":
        at = draw(st.integers(0, len(raw)))
        raw[at:at] = draw(st.sampled_from([b"\xff", b"\xc3", b"\x80\x80", b"\xed\xa0\x80",
                                           b"\x00"]))
    elif damage == "cut" and raw:
        del raw[draw(st.integers(0, len(raw) - 1)):]
    elif damage == "garbage":
        raw += draw(st.sampled_from([b"{\"question\": \"cut", b"null\n", b"[1, 2]\n", b"}\n",
                                     b"5\n"]))
    return bytes(raw), suffix, data


FIELD_CHOICES = {"id": "id", "context": "context", "prompt": "prompt", "images": "images",
                 "volume": "volume", "answer": "answer_idx", "options": "options",
                 "messages": "messages", "rubric": "rubric"}
# data.fields: mostly the columns of the same name, sometimes another column
FIELDS = st.one_of(st.just({}), st.dictionaries(
    st.sampled_from(sorted(FIELD_CHOICES)), st.sampled_from(sorted(COLUMNS)), max_size=3).map(
        lambda d: {k: (FIELD_CHOICES[k] if v in WELL_FORMED else v) for k, v in d.items()}))
CONFIG = st.fixed_dictionaries({
    "template": st.sampled_from(["mcq", "open", "chat"]),
    "fields": FIELDS,
    "max_samples": st.one_of(st.none(), st.integers(1, 3)),
    "system_prompt": st.one_of(st.none(), st.just("You are a careful clinician.")),
})


def write(folder: Path, content: bytes, suffix: str) -> Path:
    path = folder / f"data{next(NAMES)}{suffix}"
    path.write_bytes(content)
    return path


def relink_media(content: bytes, media: dict[str, Path]) -> bytes:
    """Media names in the rows point into the media folder (relative names stay relative to
    the data file otherwise)."""
    for name, path in media.items():
        content = content.replace(f'"{name}"'.encode(), json.dumps(str(path)).encode())
    return content


# --- the loaders ------------------------------------------------------------------------------


@FUZZ
@given(file=data_files(), config=CONFIG)
def test_generated_files_load_or_give_clear_errors(tmp_path, media, file, config):
    content, suffix, data = file
    path = write(tmp_path, relink_media(content, media), suffix)
    try:
        samples = load_samples(DataConfig(path=str(path), **config))
    except UserError as exc:
        check_error(exc, files=[path], secrets=texts_of(data, config["fields"]))
        return
    event("loaded")
    assert samples and len({s.uid for s in samples}) == len(samples)
    for s in samples:  # a valid result is a prompt the chat template can take
        assert s.messages and all(isinstance(m["role"], str) for m in s.messages)
        options = s.row.get("options")
        assert options is None or all(isinstance(v, str) for v in options.values())
        for m in s.messages:
            assert isinstance(m["content"], str) or all(isinstance(p, dict)
                                                        for p in m["content"])


@FUZZ
@given(train=data_files(), held=st.one_of(st.none(), data_files()), config=CONFIG,
       fraction=st.sampled_from([0.0, 0.0, 0.3, 0.9]), take=st.integers(1, 3))
def test_train_eval_and_the_stream_load_or_give_clear_errors(tmp_path, media, train, held,
                                                             config, fraction, take):
    path = write(tmp_path, relink_media(train[0], media), train[1])
    files, secrets = [path], texts_of(train[2], config["fields"])
    extra: dict[str, Any] = {"eval_fraction": fraction}
    if held is not None:
        eval_path = write(tmp_path, relink_media(held[0], media), held[1])
        files.append(eval_path)
        secrets += texts_of(held[2], config["fields"])
        extra = {"eval_path": str(eval_path)}
    cfg = DataConfig(path=str(path), **config, **extra)
    try:
        train_samples, held_samples = load_train_eval(cfg, base_dir=tmp_path)
        stream = PromptStream.from_recipe(cfg, seed=0, recipe_dir=tmp_path)
        assert [s.uid for s in stream.samples] == [s.uid for s in train_samples]
        assert [s.uid for s in stream.eval_samples] == [s.uid for s in held_samples]
        for _ in range(2):
            taken = stream.take(min(take, len(stream.samples)))
            assert len({s.uid for s in taken}) == len(taken)
            assert all(isinstance(im, Image.Image) for s in taken for im in s.images)
        event("loaded")
    except UserError as exc:
        check_error(exc, files=files, secrets=secrets)


EVAL_FIELDS = st.one_of(
    st.dictionaries(st.sampled_from(["id", "question", "options", "answer", "context"]),
                    st.sampled_from(sorted(COLUMNS)), max_size=3),
    st.builds(lambda f, o: {"label": f, **o}, st.sampled_from(["label", "answer", "question"]),
              st.dictionaries(st.sampled_from(["error_span", "id", "question"]),
                              st.sampled_from(sorted(COLUMNS)), max_size=2)),
    st.builds(lambda f, o: {"record": f, **o}, st.sampled_from(["record", "question"]),
              st.dictionaries(st.sampled_from(["id", "question", "prompt"]),
                              st.sampled_from(sorted(COLUMNS)), max_size=2)),
    st.builds(lambda f, o: {"rubric": f, **o}, st.sampled_from(["rubric", "options"]),
              st.dictionaries(st.sampled_from(["messages", "id", "question"]),
                              st.sampled_from(sorted(COLUMNS)), max_size=2)))


@FUZZ
@given(file=data_files(), fields=EVAL_FIELDS, max_samples=st.one_of(st.none(), st.integers(1, 3)),
       template=st.one_of(st.none(), st.just("{question}"), st.just("Read: {record}")))
def test_eval_file_datasets_load_or_give_clear_errors(tmp_path, media, file, fields,
                                                      max_samples, template):
    content, suffix, data = file
    path = write(tmp_path, relink_media(content, media), suffix)
    try:
        ds = load_eval_dataset(str(path), root=None, max_samples=max_samples, fields=fields,
                               prompt_template=template)
    except UserError as exc:
        check_error(exc, files=[path], secrets=texts_of(data, fields))
        return
    event(f"loaded {ds.kind}")
    assert ds.items, "a dataset that loads has items to score"
    for s in ds.items:
        assert "gold" in s.row or ds.kind == "rubric"
        assert all(isinstance(m.get("content"), (str, list)) for m in s.messages)


# --- chosen cases: each kind of damage once, with the row or sample named -------------------

GOOD = [{"id": f"q{i}", "question": f"Which finding fits case {i}?",
         "options": {"A": "Effusion", "B": "Nodule"}, "answer": "A"} for i in range(4)]
CASE_TEXT = "The patient is a 62-year-old woman with chest pain"
ROW_CASES = {
    # name: (the bad row, data.template, data.fields, what the message must say)
    "question missing": ({"id": "q2", "options": ["a", "b"]}, "mcq", {}, "q2"),
    "question a number": ({"id": "q2", "question": 12345, "options": ["a", "b"]}, "mcq", {},
                          "q2"),
    "question a list": ({"id": "q2", "question": [CASE_TEXT], "options": ["a", "b"]}, "mcq",
                        {}, "q2"),
    "question a dict": ({"id": "q2", "question": {"text": CASE_TEXT}, "options": ["a", "b"]},
                        "mcq", {}, "q2"),
    "question empty": ({"id": "q2", "question": "", "options": ["a", "b"]}, "mcq", {}, "q2"),
    "prompt empty": ({"id": "q2", "prompt": " ", "question": "x"}, "open",
                     {"prompt": "prompt"}, "q2"),
    "question huge and options a string": (
        {"id": "q2", "question": "x" * HUGE, "options": CASE_TEXT}, "mcq", {}, "q2"),
    "options nested": ({"id": "q2", "question": "Which?", "options": [[CASE_TEXT], ["b"]]},
                       "mcq", {}, "q2"),
    "option null in a list": ({"id": "q2", "question": "Which?", "options": [CASE_TEXT, None]},
                              "mcq", {}, "q2"),
    "context a number": ({"id": "q2", "question": "Which?", "options": ["a", "b"],
                          "context": 7}, "mcq", {"context": "context"}, "q2"),
    "context a dict": ({"id": "q2", "question": "Which?", "options": ["a", "b"],
                        "context": {"note": CASE_TEXT}}, "mcq", {"context": "context"}, "q2"),
    "message content numbers": ({"id": "q2", "messages": [{"role": "user", "content": [1, 2]}]},
                                "chat", {}, "q2"),
    "message content a number": ({"id": "q2", "messages": [{"role": "user", "content": 5}]},
                                 "chat", {}, "q2"),
    "message role a number": ({"id": "q2", "messages": [{"role": 3, "content": CASE_TEXT}]},
                              "chat", {}, "q2"),
    "id a list": ({"id": ["q", 2], "question": "Which?", "options": ["a", "b"]}, "mcq", {},
                  "row 2"),
    "image a number": ({"id": "q2", "question": "Which?", "options": ["a", "b"], "images": 5},
                       "mcq", {"images": "images"}, "q2"),
    "volume a mapping": ({"id": "q2", "question": "Which?", "options": ["a", "b"],
                          "volume": {"path": CASE_TEXT}}, "mcq", {"volume": "volume"}, "q2"),
}


@pytest.mark.parametrize("case", sorted(ROW_CASES))
def test_a_bad_row_among_good_ones_is_named(tmp_path, case):
    bad, template, fields, says = ROW_CASES[case]
    good = [dict(r, messages=[{"role": "user", "content": r["question"]}]) for r in GOOD]
    data = good[:2] + [bad] + good[2:]
    path = tmp_path / "items.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    with pytest.raises(UserError) as err:
        load_samples(DataConfig(path=str(path), template=template,
                                fields={"id": "id", **fields}))
    check_error(err.value, files=[path], secrets=texts_of(data))
    assert str(path) in str(err.value) and says in str(err.value)


LINE = json.dumps(GOOD[0]) + "\n"
FILE_CASES = {
    # name: (file name, bytes, what the message must say)
    "a byte that is not UTF-8": ("bad.jsonl", (LINE + LINE.replace("Which", "Wh\xffich"))
                                 .encode("latin-1"), "line 2"),
    "a cut last line": ("cut.jsonl", (LINE * 2 + LINE[:30]).encode(), "line 3"),
    "a line that is not an object": ("scalar.jsonl", (LINE + "null\n" + LINE).encode(),
                                     "line 2"),
    "null as the whole file": ("null.json", b"null", "null"),
    "a number as the whole file": ("five.json", b"5", "a number"),
    "a string as the whole file": ("text.jsonl", json.dumps(CASE_TEXT).encode(), "a string"),
    "a list of strings": ("texts.json", json.dumps([CASE_TEXT, CASE_TEXT]).encode(),
                         "item 0"),
    "a list with a number": ("mixed.json", json.dumps([GOOD[0], 5]).encode(), "item 1"),
    "a mapping of scalars": ("keyed.json", json.dumps({"q1": CASE_TEXT}).encode(), "'q1'"),
    "duplicate ids": ("dup.jsonl", (LINE * 2).encode(), "rows 0 and 1"),
}


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_damaged_files_are_refused_naming_the_file_and_line(tmp_path, case):
    name, content, says = FILE_CASES[case]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError) as err:
        load_samples(DataConfig(path=str(path), fields={"id": "id"}))
    check_error(err.value, files=[path], secrets=[CASE_TEXT, GOOD[0]["question"]])
    assert str(path) in str(err.value) and says in str(err.value), str(err.value)


def test_huge_texts_load(tmp_path):
    rows_ = [dict(r, question=r["question"] + " " + "x" * HUGE) for r in GOOD]
    path = tmp_path / "huge.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows_))
    samples = load_samples(DataConfig(path=str(path), fields={"id": "id"}))
    assert len(samples) == 4 and len(samples[0].messages[0]["content"]) > HUGE


# --- broken images and volumes through load_media -------------------------------------------


def png_bytes() -> bytes:
    out = io.BytesIO()
    Image.new("L", (7, 4), 90).save(out, "PNG")
    return out.getvalue()


def jpeg_bytes() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(out, "JPEG")
    return out.getvalue()


def nifti_bytes(compressed: bool) -> bytes:
    import nibabel as nib

    img = nib.Nifti1Image(np.arange(60, dtype=np.int16).reshape(5, 4, 3), np.eye(4))
    raw = img.to_bytes()
    return gzip.compress(raw) if compressed else raw


@st.composite
def damaged(draw, original: bytes) -> bytes:
    """Random bytes, an empty file, or ``original`` cut short or with bytes overwritten."""
    kind = draw(st.sampled_from(["random", "empty", "cut", "overwrite"]))
    if kind == "random":
        return draw(st.binary(min_size=1, max_size=600))
    if kind == "empty":
        return b""
    data = bytearray(original)
    if kind == "cut":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, min(len(data), 400) - 1))
        data[at] = draw(st.integers(0, 255))
    return bytes(data)


IMAGE_FILES = st.one_of(
    st.tuples(st.just(".png"), damaged(png_bytes())),
    st.tuples(st.just(".jpg"), damaged(jpeg_bytes())),
    st.tuples(st.just(".dcm"), st.binary(max_size=400)))
# a NIfTI header overwritten byte by byte can claim any shape and data type: the loader must
# refuse a claim the file cannot hold before it allocates the voxels
VOLUME_FILES = st.one_of(
    st.tuples(st.just(".nii.gz"), damaged(nifti_bytes(True))),
    st.tuples(st.just(".nii"), damaged(nifti_bytes(False))),
    st.tuples(st.just(".npy"), st.binary(max_size=300)))


def media_sample(image: str | None, volume: str | None, data_dir: Path) -> Sample:
    content: list[dict] = [{"type": "image"}] * ((image is not None) + 8 * (volume is not None))
    return Sample(uid="case-7", group_id="case-7", images=[image] if image else [],
                  volume=volume, data_dir=str(data_dir),
                  messages=[{"role": "user", "content": content + [{"type": "text",
                                                                    "text": "Describe."}]}])


@FUZZ
@given(image=st.one_of(st.none(), IMAGE_FILES), volume=st.one_of(st.none(), VOLUME_FILES),
       missing=st.sampled_from([None, "image", "volume"]))
def test_broken_media_give_clear_errors(tmp_path, image, volume, missing):
    n = next(NAMES)
    paths = {}
    for kind, item in (("image", image), ("volume", volume)):
        if item is not None:
            path = tmp_path / f"{kind}{n}{item[0]}"
            if missing != kind:
                path.write_bytes(item[1])
            paths[kind] = path
    if not paths:
        return
    sample = media_sample(str(paths.get("image")) if "image" in paths else None,
                          str(paths.get("volume")) if "volume" in paths else None, tmp_path)
    try:
        loaded = load_media(sample, VolumeConfig())
    except UserError as exc:
        text = str(exc)
        assert "sample case-7" in text and any(str(p) in text for p in paths.values()), text
        assert len(text) < 2000
        return
    assert all(im.mode == "RGB" for im in loaded.images)


MEDIA_CASES = {
    "random bytes named .png": ("x.png", os.urandom(64)),
    "an empty .png": ("x.png", b""),
    "a png of 10^10 pixels": ("x.png", None),
    "random bytes named .nii.gz": ("x.nii.gz", os.urandom(64)),
    "a cut NIfTI": ("x.nii.gz", nifti_bytes(True)[:-20]),
    "a NIfTI of the wrong data type": ("x.nii", None),
    "a NIfTI of negative shape": ("x.nii", None),
    "a NIfTI claiming 30000^3 voxels": ("x.nii.gz", None),
    "a NIfTI with a zero affine": ("x.nii", None),
}


def special_media(case: str) -> bytes:
    import struct
    import zlib

    if case == "a png of 10^10 pixels":
        def chunk(kind: bytes, data: bytes) -> bytes:
            return (struct.pack(">I", len(data)) + kind + data
                    + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000,
                                                                  8, 0, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b""))
    header = bytearray(nifti_bytes(False))
    if case == "a NIfTI of the wrong data type":
        struct.pack_into("<h", header, 70, 1234)  # datatype
    elif case == "a NIfTI of negative shape":
        struct.pack_into("<8h", header, 40, 3, -5, 4, 3, 1, 1, 1, 1)
    elif case == "a NIfTI claiming 30000^3 voxels":
        struct.pack_into("<8h", header, 40, 3, 30000, 30000, 30000, 1, 1, 1, 1)
        return gzip.compress(bytes(header))
    elif case == "a NIfTI with a zero affine":
        struct.pack_into("<hh", header, 252, 0, 1)  # qform unset, sform set ...
        struct.pack_into("<12f", header, 280, *([0.0] * 12))  # ... to all zeros
    return bytes(header)


@pytest.mark.parametrize("case", sorted(MEDIA_CASES))
def test_broken_media_files_are_refused_naming_sample_and_path(tmp_path, case):
    name, content = MEDIA_CASES[case]
    path = tmp_path / name
    path.write_bytes(content if content is not None else special_media(case))
    is_volume = ".nii" in name
    sample = media_sample(None if is_volume else str(path), str(path) if is_volume else None,
                          tmp_path)
    with pytest.raises(UserError) as err:
        load_media(sample, VolumeConfig())
    assert "sample case-7" in str(err.value) and str(path) in str(err.value), str(err.value)


@pytest.mark.parametrize("name", ["gone.png", "gone.nii.gz"])
def test_missing_media_paths_are_refused(tmp_path, name):
    path = tmp_path / name
    is_volume = ".nii" in name
    sample = media_sample(None if is_volume else str(path), str(path) if is_volume else None,
                          tmp_path)
    with pytest.raises(UserError, match="does not exist") as err:
        load_media(sample, VolumeConfig())
    assert "sample case-7" in str(err.value) and str(path) in str(err.value)
