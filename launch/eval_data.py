"""The datasets of ``medrl eval``: built-in presets for the public medical sets, or any file.

A preset names a file under the data root (``--data-root``, default ``$MEDRL_DATA_DIR``: a
folder laid out like the project's shared data, e.g. ``medqa/test.jsonl``) and how its rows
map onto the loader's fields (:class:`~medrl.launch.recipe.DataConfig`). Any other dataset is
a path, with the same field mapping a training recipe uses. Every item is a multiple-choice
row: options (letter -> text) and a gold letter (:func:`medrl.rewards.rules.gold_letter`);
a row without a gold answer is counted as unlabelled and left out, never silently scored.

| preset | file | options | per-category field |
| --- | --- | --- | --- |
| ``medqa`` | ``medqa/test.jsonl`` (USMLE, 4 options) | A-D | ``meta_info`` (step1, step2&3) |
| ``medmcqa`` | ``medmcqa/test.jsonl`` | A-D | |
| ``pubmedqa`` | ``pubmedqa/medagents_test.jsonl`` (context in the question) | yes/no/maybe | |
| ``pubmedqa_pqal`` | ``pubmedqa/ori_pqal.json`` (contexts apart) | yes/no/maybe | ``YEAR`` |
| ``healthbench`` | ``healthbench/oss_eval_sample.jsonl`` | rubric-graded free text | theme |
| ``ct_rate_mcq`` | ``ct_rate_mcq/sample_data.json`` (chest CT VQA) | A-D, on the volume | |

CT-RATE items name their volume (``VolumeName``) by the authors' own absolute paths: a volume
is read from that path when it exists, else from ``ct_rate_mcq/volumes/<file name>`` under the
data root; an item whose volume is in neither place is counted (``no_volume``) and left out.
Items with images or a volume are always generated (log-likelihood scoring is text-only).

A rubric dataset (``kind="rubric"``) holds conversations and physician rubrics instead of
options: its items need ``row["rubric"]``, and the theme is read from HealthBench's
``example_tags`` (``theme:<name>``) into ``row["theme"]``.

Two more kinds of data file are told apart by their field mapping (:data:`TASK_FIELDS`, read
here, not by the training loader): ``label=COLUMN`` makes a fact-checking set (the text in
``question``, its veracity label, optionally ``error_span=COLUMN``; the prompt is
:func:`medrl.launch.eval_tasks.factcheck_prompt`), ``record=COLUMN`` a structured-extraction
set (a dialogue in ``question``, the gold record, a mapping, in ``record``; the prompt is
``prompt_template`` filled from the row, or an instruction naming the dataset's record fields).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from medrl.align.records import Sample, UserError
from medrl.launch.recipe import VolumeConfig

DATA_ROOT_ENV = "MEDRL_DATA_DIR"
# eval-only field names (NAME=COLUMN): the kind of dataset they make
TASK_FIELDS = {"label": "factcheck", "error_span": "factcheck", "record": "extract"}
YES_NO_MAYBE = {"A": "yes", "B": "no", "C": "maybe"}
SHOWN_CHARS = 20  # a label value longer than this may be dataset text: messages do not show it


@dataclass(frozen=True)
class Preset:
    """path: under the data root. fields, template: as in a recipe's ``data`` section.
    kind: multiple-choice items, or conversations graded by a rubric.
    choices: what a log-likelihood continuation is, the option ``letters`` or the option
    ``words`` (yes / no / maybe). options: fixed options for rows that carry none.
    category: a row field to break the figures down by. volumes: the folder under the data
    root that holds the rows' volumes by file name, when their own paths do not exist."""

    path: str
    fields: dict[str, str] = field(default_factory=dict)
    template: Literal["mcq", "open", "chat"] = "mcq"
    kind: Literal["mcq", "rubric", "factcheck", "extract"] = "mcq"
    choices: Literal["letters", "words"] = "letters"
    options: dict[str, str] | None = None
    category: str | None = None
    volumes: str | None = None


PRESETS: dict[str, Preset] = {
    "medqa": Preset("medqa/test.jsonl", {"id": "realidx", "answer": "answer_idx"},
                    category="meta_info"),
    "medmcqa": Preset("medmcqa/test.jsonl", {"id": "realidx", "answer": "answer_idx"}),
    "pubmedqa": Preset("pubmedqa/medagents_test.jsonl", {"id": "realidx", "answer": "answer_idx"},
                       choices="words"),
    "pubmedqa_pqal": Preset("pubmedqa/ori_pqal.json",
                            {"question": "QUESTION", "context": "CONTEXTS",
                             "answer": "final_decision"},
                            template="open", choices="words", options=YES_NO_MAYBE,
                            category="YEAR"),
    "healthbench": Preset("healthbench/oss_eval_sample.jsonl",
                          {"id": "prompt_id", "messages": "prompt", "rubric": "rubrics"},
                          template="chat", kind="rubric", category="theme"),
    # the question already lists its options ("A) ... B) ..."): not rendered twice
    "ct_rate_mcq": Preset("ct_rate_mcq/sample_data.json", {"volume": "VolumeName"},
                          template="open", volumes="ct_rate_mcq/volumes"),
}


@dataclass
class EvalDataset:
    """One dataset's scorable items (loaded samples with ``row["gold"]`` set) and what was
    left out."""

    name: str
    path: Path
    items: list[Sample]
    choices: str
    category: str | None
    unlabelled: int = 0
    kind: str = "mcq"
    volume: VolumeConfig = field(default_factory=VolumeConfig)  # how a volume becomes slices
    no_volume: int = 0  # items left out: their volume file was not found

    @property
    def media(self) -> bool:
        """Whether the items carry images or a volume (a VLM's dataset)."""
        return any(s.images or s.volume is not None for s in self.items)


def data_root(given: str | Path | None) -> Path | None:
    """``--data-root``, else ``$MEDRL_DATA_DIR``, else None."""
    value = given or os.environ.get(DATA_ROOT_ENV)
    return Path(value).expanduser() if value else None


def preset_names() -> str:
    return ", ".join(sorted(PRESETS))


def load_eval_dataset(spec: str, *, root: Path | None, max_samples: int | None,
                      fields: dict[str, str] | None = None, system_prompt: str | None = None,
                      prompt_template: str | None = None) -> EvalDataset:
    """A preset name or a file path -> its items. Raises :class:`UserError` naming the preset
    or file when it cannot be found or holds no labelled item. ``system_prompt``: the system
    message of every prompt; ``prompt_template``: extraction sets' user message
    (``str.format_map`` of the row, e.g. an sft recipe's ``sft.prompt_template``)."""
    from medrl.launch.data import load_samples
    from medrl.launch.recipe import DataConfig
    from medrl.rewards.rules import gold_letter

    if spec in PRESETS:
        preset = PRESETS[spec]
        if root is None:
            raise UserError(f"dataset preset {spec!r} reads {preset.path} under a data root; "
                            f"pass --data-root DIR or set {DATA_ROOT_ENV}.")
        path, name = root / preset.path, spec
        if not path.is_file():
            raise UserError(f"dataset preset {spec!r}: {path} not found; the data root "
                            f"({root}) must hold {preset.path}.")
    elif Path(spec).expanduser().is_file():
        path, name, preset = Path(spec).expanduser(), Path(spec).stem, Preset(spec)
        if fields and "rubric" in fields:  # conversations (or questions) with a rubric
            preset = Preset(spec, kind="rubric", category="theme",
                            template="chat" if "messages" in fields else "open")
        kinds = {TASK_FIELDS[k] for k in fields or {} if k in TASK_FIELDS}
        if len(kinds) > 1:
            raise UserError(f"dataset {spec}: the fields label / error_span (fact checking) "
                            "and record (extraction) make different kinds of dataset; map "
                            "one kind per file.")
        if kinds:
            preset = Preset(spec, kind=kinds.pop(), template="open")
    else:
        raise UserError(f"dataset {spec!r} is neither a preset ({preset_names()}) nor a file.")
    mapping = {**preset.fields, **(fields or {})}
    task_columns = {k: mapping.pop(k) for k in list(mapping) if k in TASK_FIELDS}
    cfg = DataConfig(path=str(path), fields=mapping, template=preset.template,
                     max_samples=max_samples, system_prompt=system_prompt)
    if preset.kind == "rubric":
        return rubric_dataset(name, path, load_samples(cfg), preset)
    if preset.kind in ("factcheck", "extract"):
        items, unlabelled = task_dataset(preset.kind, path, load_samples(cfg), task_columns,
                                         prompt_template)
        return EvalDataset(name=name, path=path, items=items, choices="", category=None,
                           unlabelled=unlabelled, kind=preset.kind)
    items, unlabelled, no_volume = [], 0, 0
    for s in load_samples(cfg):
        if s.volume is not None and preset.volumes and not Path(s.volume).is_file():
            local = root / preset.volumes / Path(s.volume).name  # presets have a root
            if not local.is_file():
                no_volume += 1
                continue
            s = dataclasses.replace(s, volume=str(local))
        row = dict(s.row)
        if preset.options and not row.get("options"):
            row["options"] = dict(preset.options)
        try:
            gold = gold_letter(row)
        except ValueError as exc:
            raise UserError(f"{path}: sample {s.uid}: {exc}") from None
        if gold is None:
            unlabelled += 1
            continue
        row["gold"] = gold
        items.append(dataclasses.replace(s, row=row))
    if not items and no_volume:
        raise UserError(f"dataset {name!r}: none of its {no_volume} volume files was found, at "
                        f"the paths its rows name or in {root / preset.volumes}; put the "
                        "volumes there, named as in the rows.")
    if not items:
        raise UserError(f"{path}: no row has both options and a gold answer (after the field "
                        f"mapping {mapping}); check --fields.")
    return EvalDataset(name=name, path=path, items=items, choices=preset.choices,
                       category=preset.category, unlabelled=unlabelled, no_volume=no_volume)


def rubric_dataset(name: str, path: Path, samples: list[Sample], preset: Preset) -> EvalDataset:
    """A rubric-graded dataset: rows without a rubric are counted as unlabelled; the theme
    comes from ``example_tags`` (``theme:<name>``; "none" when a row has none)."""
    from medrl.rewards.rubric import parse_rubric

    items, unlabelled = [], 0
    for s in samples:
        if not s.row.get("rubric"):
            unlabelled += 1
            continue
        try:  # refused now, not after every completion is generated
            parse_rubric(s.row["rubric"], uid=s.uid)
        except UserError as exc:
            raise UserError(f"{path}: {exc}") from None
        tags = s.row.get("example_tags")
        if tags is not None and not isinstance(tags, (list, tuple)):
            raise UserError(f"{path}: sample {s.uid}: example_tags holds a value of type "
                            f"{type(tags).__name__}; it is a list of tags such as "
                            "theme:emergency_referrals.")
        theme = next((t.split(":", 1)[1] for t in tags or []
                      if isinstance(t, str) and t.startswith("theme:")), "none")
        items.append(dataclasses.replace(s, row={**s.row, "theme": theme}))
    if not items:
        raise UserError(f"{path}: no row has a rubric (data field 'rubric'); check --field "
                        "rubric=COLUMN.")
    return EvalDataset(name=name, path=path, items=items, choices="", category=preset.category,
                       unlabelled=unlabelled, kind="rubric")


def shown_text(row: dict) -> str:
    """The text a row shows the model: its prompt when mapped, else its question (the loader
    has checked that it is a non-empty text)."""
    return str(row["prompt"] if row.get("prompt") is not None else row["question"])


def user_message(sample: Sample, text: str) -> Sample:
    """The sample with ``text`` as its one user message (its system message kept)."""
    messages = [m for m in sample.messages if m.get("role") == "system"]
    return dataclasses.replace(sample, messages=messages + [{"role": "user", "content": text}])


def task_dataset(kind: str, path: Path, samples: list[Sample], columns: dict[str, str],
                 template: str | None) -> tuple[list[Sample], int]:
    """(items, unlabelled) of a fact-checking or extraction file (module docstring): each item
    with ``row["gold"]`` (fact checking: "error" / "correct", and ``row["gold_spans"]``;
    extraction: the gold record) and its task prompt. A bad label or record is a UserError
    naming the file and the sample, never its text."""
    from medrl.launch.eval_tasks import factcheck_prompt, gold_spans, gold_verdict

    items, unlabelled = [], 0
    if kind == "factcheck":
        label, span = columns.get("label", "label"), columns.get("error_span", "error_span")
        for s in samples:
            try:
                gold = gold_verdict(s.row, label)
                spans = gold_spans(s.row, span) if gold is not None else []
            except ValueError as exc:
                cause, value = str(exc), s.row.get(label)
                if isinstance(value, str) and len(value.strip()) > SHOWN_CHARS:  # not shown
                    cause = (f"label {label!r} is a {len(value.strip())}-character text, not "
                             "a veracity label; use 1 / error or 0 / correct")
                raise UserError(f"{path}: sample {s.uid}: {cause}.") from None
            if gold is None:
                unlabelled += 1
                continue
            row = {**s.row, "gold": "error" if gold else "correct", "gold_spans": spans}
            items.append(dataclasses.replace(user_message(s, factcheck_prompt(
                shown_text(s.row))), row=row))
        if not items:
            raise UserError(f"{path}: no row has a veracity label (column {label!r}); check "
                            "--field label=COLUMN.")
        return items, unlabelled
    column = columns["record"]
    records = []
    for s in samples:
        record = s.row.get(column)
        if isinstance(record, str) and record.strip().startswith("{"):
            import json

            try:
                record = json.loads(record)
            except json.JSONDecodeError:
                raise UserError(f"{path}: sample {s.uid}: column {column!r} is not valid "
                                "JSON; the gold record must be a mapping of field -> value "
                                "(or list of values).") from None
        if record is None:
            unlabelled += 1
            continue
        if not isinstance(record, dict):
            raise UserError(f"{path}: sample {s.uid}: column {column!r} holds a "
                            f"{type(record).__name__}; the gold record must be a mapping of "
                            "field -> value (or list of values).")
        records.append((s, record))
    if not records:
        raise UserError(f"{path}: no row has a gold record (column {column!r}); check "
                        "--field record=COLUMN.")
    names = list(dict.fromkeys(k for _, r in records for k in r))
    for s, record in records:
        if template:
            try:
                text = template.format_map(s.row)
            except (KeyError, IndexError, ValueError, AttributeError, TypeError) as exc:
                raise UserError(f"{path}: sample {s.uid}: the prompt template cannot be "
                                f"filled from the row ({type(exc).__name__}: {exc}); name only "
                                "columns the data has, and double literal braces.") from None
        else:
            text = (f"{shown_text(s.row)}\n\nWrite the medical record of this consultation "
                    f"as one JSON object with the fields {', '.join(names)} (a list for "
                    "several values, an empty string or list when it is not mentioned). "
                    "Return JSON only.")
        items.append(dataclasses.replace(user_message(s, text), row={**s.row, "gold": record}))
    return items, unlabelled
