"""Prompts from data files: loading, field mapping, held-out splits, media loading.

``load_samples(cfg)`` reads the file named by the recipe's ``data`` section (JSON and JSON
lines with Python's json module; Parquet, or a folder written by ``save_to_disk``, through
the ``datasets`` library), maps the recipe's ``data.fields`` onto canonical names, checks
each mapped cell's type and renders each row into chat messages (``medrl.align.prompts``).
The result is one :class:`Sample` per row:

- ``uid`` = ``group_id`` = the row's id column (``fields.id``), or the key of a JSON file
  keyed by id, or ``<file stem>-<row index>``; ids must be unique;
- ``row``: every column as stored, plus the mapped fields under their canonical names
  (``question``, ``prompt``, ``context``, ``options``, ``answer``, ``rubric``, ``messages``),
  so rewards can rely on ``row["answer"]`` and ``row["options"]`` (a ``{letter: text}``
  dict). A canonical name that shadows a different stored column keeps that column's value
  under ``<name>_original`` (MedQA mapped with ``answer: answer_idx`` has the letter in
  ``row["answer"]`` and the option text in ``row["answer_original"]``);
- ``images`` (paths, or encoded images from a saved dataset) and ``volume`` (a path), with
  relative paths resolved against the data file's folder (``data_dir``).

Pixels are not read here: :func:`load_media` reads them for the prompts a step takes
(:class:`medrl.launch.stream.PromptStream`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np

from medrl.align.records import Sample, UserError
from medrl.launch.data_files import read_rows
from medrl.launch.recipe import DataConfig, VolumeConfig, resolve_path
from medrl.rollouts.multimodal import load_image, load_volume, volume_to_slices
from medrl.align.prompts import count_image_parts, letter_options, render_messages

# Canonical row keys filled from data.fields (images, volume and id go to Sample fields).
CANONICAL = ("prompt", "question", "context", "options", "answer", "rubric", "messages")
# Ids name samples in every log and message: a longer one is a text column mapped by mistake.
MAX_ID_CHARS = 256


# --- field mapping ------------------------------------------------------------------------------


def _column_plan(cfg: DataConfig, key_column: str | None) -> tuple[dict[str, str], dict[str, bool]]:
    """``{field name: column}`` for every mapped field, and whether each one must exist.

    Fields mapped to another column than their default must exist (judged on the value, not
    on whether the key was written, so a saved, fully resolved recipe behaves like the
    original). Of the defaults, ``question`` is needed unless a
    ``prompt`` column or the chat template gives the text, ``options`` by the mcq template and
    ``messages`` by the chat template; a default ``options``/``answer`` column that is absent
    is simply skipped (open questions without options, unlabelled evaluation data).
    """
    fields = cfg.fields
    explicit = {name for name, info in type(fields).model_fields.items()
                if getattr(fields, name) != info.default}
    plan: dict[str, str] = {}
    required: dict[str, bool] = {}
    for name in ("prompt", "question", "context", "options", "answer", "rubric", "images",
                 "volume", "id", "messages"):
        column = getattr(fields, name)
        if column is None:
            continue
        if name == "messages" and cfg.template != "chat" and name not in explicit:
            continue
        plan[name] = column
        required[name] = name in explicit
    if cfg.template != "chat" and fields.prompt is None:
        required["question"] = True
    if cfg.template == "mcq" and "options" in plan:
        required["options"] = True
    if cfg.template == "chat":
        required["messages"] = True
        if "question" not in explicit:
            required["question"] = False
    if "id" not in plan and key_column is not None:
        plan["id"] = key_column
        required["id"] = True
    return plan, required


def _media_paths(value: Any, data_dir: Path) -> list[Any]:
    """An images cell -> a list: paths resolved against ``data_dir``, encoded images kept."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        if item is None:
            continue
        out.append(_resolve_media(item, data_dir) if isinstance(item, str) else item)
    return out


def _resolve_media(value: str, data_dir: Path) -> str:
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else data_dir / p)


def _type_name(value: Any) -> str:
    """``a str``, ``an int``, ``a boolean``: a value's type, for messages that never show it."""
    if isinstance(value, bool):
        return "a boolean"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _is_scalar_text(value: Any) -> bool:
    """A value an option may hold: a text, or a number or boolean written as text."""
    return isinstance(value, (str, int, float, np.generic))


def _cell_problem(name: str, value: Any, column: str, template: str) -> str | None:
    """What is wrong with one mapped cell for ``template`` (None: nothing), in words that
    name the column and the type, never the value."""
    where = f"column {column!r} (data.fields.{name})"
    if name in ("question", "prompt") and template != "chat" and not isinstance(value, str):
        return f"{where} holds {_type_name(value)}; the {name} is a text"
    if name == "context" and template != "chat":
        parts = value if isinstance(value, (list, tuple)) else [value]
        if not all(p is None or isinstance(p, str) for p in parts):
            return f"{where} holds {_type_name(value)}; a context is a text or a list of texts"
    if name == "options":
        items = (list(value.items()) if isinstance(value, dict) else
                 list(enumerate(value, 1)) if isinstance(value, (list, tuple)) else [])
        for key, item in items:  # a mapping's None: a key only other rows have (Arrow)
            if item is None and not isinstance(value, dict):
                return f"{where}: option {key} is null; every listed option needs a text"
            if item is not None and not _is_scalar_text(item):
                return f"{where}: option {key} is {_type_name(item)}; each option is a text"
    if name == "messages" and template == "chat" and isinstance(value, (list, tuple)):
        for i, m in enumerate(value):
            content = m.get("content") if isinstance(m, dict) else None
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                return (f"{where}: message {i} is not a {{'role': text, 'content': ...}} "
                        "mapping")
            if isinstance(content, list):
                if not all(isinstance(p, dict) and isinstance(p.get("type"), str)
                           for p in content):
                    return (f"{where}: message {i} has a content part that is not a "
                            "{'type': ...} mapping")
            elif not isinstance(content, str):
                return (f"{where}: message {i} has content of {_type_name(content)}; content "
                        "is a text or a list of {'type': ...} parts")
    return None


def _media_problem(name: str, value: Any, column: str) -> str | None:
    """An images cell holds paths, encoded images or datasets Image cells (or a list of
    them); a volume cell a path or an array (nested lists)."""
    where = f"column {column!r} (data.fields.{name})"
    if name == "images":
        items = value if isinstance(value, (list, tuple)) else [value]
        for item in items:
            if item is not None and not isinstance(item, (str, dict, bytes, Path)) \
                    and not hasattr(item, "mode"):  # a PIL image from a saved dataset
                return (f"{where} holds {_type_name(item)}; give an image path or a list of "
                        "paths")
    elif value is not None and not isinstance(value, (str, Path, list, np.ndarray)):
        return f"{where} holds {_type_name(value)}; give a volume path or a [D, H, W] array"
    return None


def _map_row(raw: dict, index: int, plan: dict[str, str], cfg: DataConfig, *, path: Path,
             data_dir: Path) -> Sample:
    uid = f"{path.stem}-{index}"
    if "id" in plan:
        value = raw.get(plan["id"])
        if value is None or str(value) == "":
            raise UserError(f"{path}: row {index} has no id in column {plan['id']!r} "
                            "(data.fields.id); every row needs one, or unset data.fields.id to "
                            "number the rows.")
        if isinstance(value, bool) or not isinstance(value, (str, int, float, np.generic)):
            raise UserError(f"{path}: row {index}: the id in column {plan['id']!r} "
                            f"(data.fields.id) is {_type_name(value)}; an id is a text or a "
                            "number.")
        uid = str(value)
        if len(uid) > MAX_ID_CHARS:  # every message about the sample repeats its id
            raise UserError(f"{path}: row {index}: the id in column {plan['id']!r} "
                            f"(data.fields.id) is {len(uid)} characters long; an id is a short "
                            f"name (at most {MAX_ID_CHARS} characters), not a text. Check "
                            "data.fields.id.")
    canon = {name: raw[plan[name]] for name in CANONICAL
             if name in plan and plan[name] in raw}
    media = {name: raw.get(plan[name]) for name in ("images", "volume") if name in plan}
    for name, value in {**canon, **media}.items():
        if value is None or (name == "question" and canon.get("prompt") is not None):
            continue  # nothing to check; or a prompt is shown instead of the question
        problem = (_media_problem(name, value, plan[name]) if name in ("images", "volume")
                   else _cell_problem(name, value, plan[name], cfg.template))
        if problem:
            raise UserError(f"{path}: sample {uid} (row {index}): {problem}. Fix the row, or "
                            "map the field to another column.")
    shown = "prompt" if canon.get("prompt") is not None else "question"
    if cfg.template == "open" and isinstance(canon.get(shown), str) \
            and not canon[shown].strip():
        raise UserError(f"{path}: sample {uid} (row {index}): the {shown} is empty (template "
                        "'open'); every row needs a text to show.")
    if canon.get("options") is not None:
        try:
            canon["options"] = letter_options(canon["options"])
        except (TypeError, ValueError) as exc:
            raise UserError(f"{path}: sample {uid} (row {index}): bad options in column "
                            f"{plan['options']!r}: {exc}. Options must be a dict "
                            '{"A": text, ...} or a list of texts.') from None
    row = dict(raw)
    for name, value in canon.items():
        if plan[name] != name and name in raw:
            row[f"{name}_original"] = raw[name]
        row[name] = value
    images = _media_paths(raw.get(plan["images"]), data_dir) if "images" in plan else []
    volume = raw.get(plan["volume"]) if "volume" in plan else None
    if isinstance(volume, str):
        volume = _resolve_media(volume, data_dir)
    num_images = len(images) + (cfg.volume.num_slices if volume is not None else 0)
    try:
        messages = render_messages(canon, template=cfg.template, system_prompt=cfg.system_prompt,
                                   num_images=num_images)
    except UserError as exc:
        raise UserError(f"{path}: sample {uid} (row {index}): {exc} (template "
                        f"{cfg.template!r}; check data.fields and data.template).") from None
    return Sample(uid=uid, group_id=uid, row=row, messages=messages, images=images,
                  volume=volume, data_dir=str(data_dir))


def load_samples(cfg: DataConfig, *, base_dir: str | Path | None = None,
                 path: str | Path | None = None) -> list[Sample]:
    """One :class:`Sample` per row of ``cfg.path`` (or ``path``, e.g. ``cfg.eval_path``).

    Relative paths are read from ``base_dir`` (the recipe's folder; default: the working
    folder). ``cfg.max_samples`` keeps the first rows of the file. Raises :class:`UserError`
    for a missing or unreadable file, a mapped column the file lacks (naming the columns it
    has), an empty dataset, duplicate ids, or a row the template cannot render.
    """
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    data_path = resolve_path(base, str(path if path is not None else cfg.path))
    rows, key_column = read_rows(data_path, cfg.format, cfg.split)
    if not rows:
        raise UserError(f"{data_path}: the dataset is empty; it needs at least one row.")
    plan, required = _column_plan(cfg, key_column)
    columns = list(rows[0])
    for name, column in plan.items():
        if required.get(name) and column not in columns:
            raise UserError(f"{data_path}: column {column!r} (data.fields.{name}) not found. "
                            f"The data has the columns: {', '.join(columns)}. Set "
                            f"data.fields.{name} to the column that holds it.")
    if cfg.max_samples is not None:
        rows = rows[: cfg.max_samples]
    data_dir = data_path.parent
    samples = [_map_row(raw, i, plan, cfg, path=data_path, data_dir=data_dir)
               for i, raw in enumerate(rows)]
    seen: dict[str, int] = {}
    for i, s in enumerate(samples):
        if s.uid in seen:
            raise UserError(f"{data_path}: id {s.uid!r} appears in rows {seen[s.uid]} and {i}; "
                            f"ids (data.fields.id = {plan.get('id')!r}) must be unique because "
                            "each one names a GRPO group. Fix the data or unset data.fields.id.")
        seen[s.uid] = i
    return samples


def load_dataset_rows(cfg: DataConfig, recipe_dir: str | Path | None = None) -> list[Sample]:
    """``load_samples(cfg, base_dir=recipe_dir)``: what ``medrl validate`` checks."""
    return load_samples(cfg, base_dir=recipe_dir)


# --- held-out split -----------------------------------------------------------------------------

MediaPaths = Literal["absolute", "relative"]
EVAL_ROWS_SHOWN = 5  # pairs of row numbers named when an eval file repeats training rows


def content_hash(sample: Sample, *, media: MediaPaths = "absolute") -> str:
    """The sha256 (hex) of what the model is shown and scored against; ids are left out.

    It covers the row's canonical fields (``prompt``, ``question``, ``context``, ``options``,
    ``messages``, ``answer``, ``rubric``, as ``data.fields`` mapped them; None counts as
    absent), the images and the volume. A media path counts as the file it names:
    ``media="absolute"`` takes the real path (symbolic links followed), so ``img/1.png`` beside
    two different data files are two images; ``media="relative"`` takes the path from the data
    file's folder, so the hash stays the same when the data folder is moved or copied. Encoded
    images and arrays count by their bytes. The template and system prompt are not part of it:
    a row hashes the same in every stage that maps the same fields.
    """
    content = {name: sample.row[name] for name in CANONICAL if sample.row.get(name) is not None}
    refs = {"images": [_media_ref(item, sample.data_dir, media) for item in sample.images],
            "volume": (None if sample.volume is None
                       else _media_ref(sample.volume, sample.data_dir, media))}
    text = json.dumps([content, refs], sort_keys=True, ensure_ascii=False, default=_plain)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _media_ref(item: Any, data_dir: str | None, media: MediaPaths) -> str:
    """One image or volume as a string that names its file or its bytes."""
    from PIL import Image

    if isinstance(item, dict) and item.get("bytes"):  # a datasets Image cell
        item = item["bytes"]
    elif isinstance(item, dict) and item.get("path"):
        item = item["path"]
    if isinstance(item, (str, Path)):
        path = os.path.normpath(str(item))
        if media == "relative" and data_dir is not None:
            rel = os.path.relpath(path, os.path.normpath(data_dir))
            return "path:" + (rel if not rel.startswith("..") else path)
        return "path:" + os.path.realpath(path)
    if isinstance(item, Image.Image):
        item = np.asarray(item)
    if isinstance(item, np.ndarray):
        return f"array:{item.dtype}:{item.shape}:" + _sha(np.ascontiguousarray(item).tobytes())
    if isinstance(item, (bytes, bytearray)):
        return "bytes:" + _sha(bytes(item))
    return f"{type(item).__name__}:{item}"


def _plain(value: Any) -> Any:
    """JSON for the cell types ``datasets`` returns beside the plain ones (numpy, bytes)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (bytes, bytearray)):
        return "bytes:" + _sha(bytes(value))
    return str(value)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _split_draw(digest: str, split_seed: int) -> float:
    """A number in [0, 1) fixed by a row's content hash and the split seed alone."""
    return int(_sha(f"{split_seed}:{digest}".encode())[:16], 16) / float(1 << 64)


def split_eval(samples: list[Sample], fraction: float,
               split_seed: int) -> tuple[list[Sample], list[Sample]]:
    """Hold out about ``fraction`` of ``samples``: ``(train, eval)``, each in the original order.

    Each row decides for itself: it is held out when its draw
    ``_split_draw(content_hash(row, media="relative"), split_seed)`` is below ``fraction``.
    So a row's side depends on its content and ``split_seed`` only, never on ``run.seed``, the
    row's position, its id or the other rows: every stage holds out the same rows, adding,
    removing or reordering rows moves no other row across, and rows with the same content land
    on the same side. The number held out is about ``fraction * n`` (not exactly); with
    ``fraction > 0`` it is at least one (the row with the smallest draw), and ``fraction == 0``
    holds out nothing.
    """
    if fraction <= 0:
        return list(samples), []
    draws = [_split_draw(content_hash(s, media="relative"), split_seed) for s in samples]
    held = {i for i, draw in enumerate(draws) if draw < fraction}
    if not held:
        held = {int(np.argmin(draws))}
    if len(held) == len(samples):
        raise UserError(f"data.eval_fraction {fraction} holds out all {len(samples)} row(s) "
                        f"(data.split_seed {split_seed}), leaving no training rows; use a "
                        "smaller fraction, more data, or a separate data.eval_path.")
    return ([s for i, s in enumerate(samples) if i not in held],
            [s for i, s in enumerate(samples) if i in held])


def load_train_eval(cfg: DataConfig, *,
                    base_dir: str | Path | None = None) -> tuple[list[Sample], list[Sample]]:
    """Training and held-out samples: ``eval_path`` if set, else ``eval_fraction`` of ``path``.

    An ``eval_path`` row whose :func:`content_hash` equals a training row's is refused (the
    message gives the count and row numbers, never the text); ids are not compared. The
    ``eval_fraction`` split is :func:`split_eval` with ``cfg.split_seed``.
    """
    if cfg.eval_path and cfg.eval_fraction > 0:
        raise UserError("data.eval_path and data.eval_fraction are both set; choose one way to "
                        "hold out evaluation data.")
    train = load_samples(cfg, base_dir=base_dir)
    if not cfg.eval_path:
        try:
            return split_eval(train, cfg.eval_fraction, cfg.split_seed)
        except UserError as exc:  # split_eval sees samples only: name their file here
            data_path = resolve_path(Path(base_dir) if base_dir is not None else Path.cwd(),
                                     str(cfg.path))
            raise UserError(f"{data_path}: {exc}") from None
    held = load_samples(cfg, base_dir=base_dir, path=cfg.eval_path)
    first_row = {}
    for i, s in enumerate(train):
        first_row.setdefault(content_hash(s), i)
    repeats = [(j, first_row[h]) for j, s in enumerate(held) if (h := content_hash(s)) in first_row]
    if repeats:
        shown = ", ".join(f"eval row {j} = training row {i}"
                          for j, i in repeats[:EVAL_ROWS_SHOWN])
        more = (f" and {len(repeats) - EVAL_ROWS_SHOWN} more"
                if len(repeats) > EVAL_ROWS_SHOWN else "")
        raise UserError(f"data.eval_path {cfg.eval_path!r}: {len(repeats)} of its {len(held)} "
                        f"row(s) repeat rows of data.path {cfg.path!r} (the same prompt fields, "
                        f"answer and media, whatever their ids): {shown}{more} (rows counted "
                        "from 0). Held-out rows must not be trained on: remove them from one "
                        "of the two files.")
    return train, held


# --- media --------------------------------------------------------------------------------------


def load_media(sample: Sample, volume: VolumeConfig | None = None) -> Sample:
    """A copy of ``sample`` whose ``images`` are RGB PIL images, the volume's slices last.

    Each image (a path, encoded bytes, a datasets Image cell, an array or a PIL image) goes
    through the one loader ``medrl.rollouts.multimodal.load_image``. The volume (a path or a
    ``[D, H, W]`` array) is read and checked by ``load_volume`` and becomes
    ``volume.num_slices`` slices by ``volume_to_slices``; ``sample.volume`` keeps its path.
    """
    images = [load_image(item, uid=sample.uid) for item in sample.images]
    if sample.volume is not None:
        vc = volume or VolumeConfig()
        array = load_volume(sample.volume, uid=sample.uid)
        images += volume_to_slices(array, num_slices=vc.num_slices, axis=vc.axis,
                                   window_center=vc.window_center, window_width=vc.window_width)
    parts = count_image_parts(sample.messages)
    if parts != len(images):  # e.g. a stream built with other volume settings than the loader
        raise UserError(f"sample {sample.uid}: the prompt has {parts} image part(s) but "
                        f"{len(images)} image(s) were loaded; load the data and build the "
                        "prompt stream with the same data.volume settings.")
    return dataclasses.replace(sample, images=images)
