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

A rubric dataset (``kind="rubric"``) holds conversations and physician rubrics instead of
options: its items need ``row["rubric"]``, and the theme is read from HealthBench's
``example_tags`` (``theme:<name>``) into ``row["theme"]``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from medrl.align.records import Sample, UserError

DATA_ROOT_ENV = "MEDRL_DATA_DIR"
YES_NO_MAYBE = {"A": "yes", "B": "no", "C": "maybe"}


@dataclass(frozen=True)
class Preset:
    """path: under the data root. fields, template: as in a recipe's ``data`` section.
    kind: multiple-choice items, or conversations graded by a rubric.
    choices: what a log-likelihood continuation is, the option ``letters`` or the option
    ``words`` (yes / no / maybe). options: fixed options for rows that carry none.
    category: a row field to break the figures down by."""

    path: str
    fields: dict[str, str] = field(default_factory=dict)
    template: Literal["mcq", "open", "chat"] = "mcq"
    kind: Literal["mcq", "rubric"] = "mcq"
    choices: Literal["letters", "words"] = "letters"
    options: dict[str, str] | None = None
    category: str | None = None


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


def data_root(given: str | Path | None) -> Path | None:
    """``--data-root``, else ``$MEDRL_DATA_DIR``, else None."""
    value = given or os.environ.get(DATA_ROOT_ENV)
    return Path(value).expanduser() if value else None


def preset_names() -> str:
    return ", ".join(sorted(PRESETS))


def load_eval_dataset(spec: str, *, root: Path | None, max_samples: int | None,
                      fields: dict[str, str] | None = None) -> EvalDataset:
    """A preset name or a file path -> its items. Raises :class:`UserError` naming the preset
    or file when it cannot be found or holds no labelled multiple-choice item."""
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
    else:
        raise UserError(f"dataset {spec!r} is neither a preset ({preset_names()}) nor a file.")
    mapping = {**preset.fields, **(fields or {})}
    cfg = DataConfig(path=str(path), fields=mapping, template=preset.template,
                     max_samples=max_samples)
    if preset.kind == "rubric":
        return rubric_dataset(name, path, load_samples(cfg), preset)
    items, unlabelled = [], 0
    for s in load_samples(cfg):
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
    if not items:
        raise UserError(f"{path}: no row has both options and a gold answer (after the field "
                        f"mapping {mapping}); check --fields.")
    return EvalDataset(name=name, path=path, items=items, choices=preset.choices,
                       category=preset.category, unlabelled=unlabelled)


def rubric_dataset(name: str, path: Path, samples: list[Sample], preset: Preset) -> EvalDataset:
    """A rubric-graded dataset: rows without a rubric are counted as unlabelled; the theme
    comes from ``example_tags`` (``theme:<name>``; "none" when a row has none)."""
    items, unlabelled = [], 0
    for s in samples:
        if not s.row.get("rubric"):
            unlabelled += 1
            continue
        tags = s.row.get("example_tags") or []
        theme = next((t.split(":", 1)[1] for t in tags if str(t).startswith("theme:")), "none")
        items.append(dataclasses.replace(s, row={**s.row, "theme": theme}))
    if not items:
        raise UserError(f"{path}: no row has a rubric (data field 'rubric'); check --field "
                        "rubric=COLUMN.")
    return EvalDataset(name=name, path=path, items=items, choices="", category=preset.category,
                       unlabelled=unlabelled, kind="rubric")
