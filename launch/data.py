"""Prompts from data files: loading, field mapping, held-out splits, media loading.

``load_samples(cfg)`` reads the file named by the recipe's ``data`` section through the
``datasets`` library (JSON, JSON lines, Parquet, or a folder written by ``save_to_disk``),
maps the recipe's ``data.fields`` onto canonical names and renders each row into chat
messages (``medrl.align.prompts``). The result is one :class:`Sample` per row:

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
from medrl.launch.recipe import DataConfig, VolumeConfig, resolve_path
from medrl.rollouts.multimodal import load_image, load_volume, volume_to_slices
from medrl.align.prompts import count_image_parts, letter_options, render_messages

FORMATS_BY_SUFFIX = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl",
                     ".parquet": "parquet", ".pq": "parquet"}
HF_DISK_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")
# Canonical row keys filled from data.fields (images, volume and id go to Sample fields).
CANONICAL = ("prompt", "question", "context", "options", "answer", "rubric", "messages")


# --- reading a table ----------------------------------------------------------------------------


def detect_format(path: Path, fmt: str = "auto") -> str:
    """``fmt`` unless it is ``auto``; then a folder is ``hf_disk``, a file goes by suffix."""
    if fmt != "auto":
        return fmt
    if path.is_dir():
        return "hf_disk"
    fmt = FORMATS_BY_SUFFIX.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"{path}: cannot tell the data format from the suffix {path.suffix!r}. "
                        f"Use one of {', '.join(sorted(FORMATS_BY_SUFFIX))}, a folder written by "
                        "datasets' save_to_disk, or set data.format.")
    return fmt


def read_rows(path: Path, fmt: str = "auto",
              split: str | None = None) -> tuple[list[dict], str | None]:
    """All rows of a data file as plain dicts, and the name of the key column if any.

    A JSON file may hold a list of records or a mapping ``{id: record}`` (PubMedQA's
    ``ori_pqal.json``); a mapping's keys become an ``id`` column (the key column returned).
    ``split`` picks a split of a saved ``DatasetDict``; single files have only ``train``.
    """
    if not path.exists():
        raise UserError(f"{path}: data file not found. Check data.path (relative paths are read "
                        "from the recipe's folder).")
    fmt = detect_format(path, fmt)
    if fmt != "hf_disk" and path.is_dir():
        raise UserError(f"{path} is a folder, but data.format is {fmt!r}; name the file, or use "
                        "format hf_disk for a folder written by save_to_disk.")
    if fmt != "hf_disk" and split not in (None, "train"):
        raise UserError(f"{path}: data.split {split!r} was set, but a single {fmt} file has only "
                        "one split; remove data.split (or point at a saved DatasetDict folder).")
    if fmt == "hf_disk":
        return _read_hf_disk(path, split), None
    head = _leading_chars(path, 2) if fmt in ("json", "jsonl") else ""
    if fmt in ("json", "jsonl") and (head == "" or head == "[]"):
        raise UserError(f"{path}: the dataset is empty; it needs at least one row.")
    if fmt == "parquet" and _parquet_rows(path) == 0:
        raise UserError(f"{path}: the dataset is empty; it needs at least one row.")
    if fmt == "json" and head[:1] == "{":
        keyed = _read_keyed_json(path)
        if keyed is not None:
            return keyed, "id"
        fmt = "jsonl"  # several objects, one per line, in a file named .json
    builder = "parquet" if fmt == "parquet" else "json"
    return _read_with_datasets(path, builder), None


def _leading_chars(path: Path, n: int) -> str:
    """The first ``n`` characters of a text file that are not white space."""
    out = ""
    with path.open("r", encoding="utf-8", errors="replace") as f:
        while len(out) < n:
            char = f.read(1)
            if not char:
                break
            if not char.isspace():
                out += char
    return out


def _parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    try:
        return pq.read_metadata(path).num_rows
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise UserError(f"{path}: cannot read the data file as parquet ({exc}).") from None


def _read_keyed_json(path: Path) -> list[dict] | None:
    """``{id: record, ...}`` -> records with the key in ``id``; None if the file is JSON lines."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # a second object follows the first: JSON lines
            return None
        raise UserError(f"{path}: not valid JSON ({exc}).") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the data file ({exc}).") from None
    if not data:
        raise UserError(f"{path}: the JSON mapping is empty; it needs at least one record.")
    bad = [k for k, v in data.items() if not isinstance(v, dict)]
    if bad:
        raise UserError(f"{path}: a JSON object at the top level must map ids to records "
                        f"(objects), but the value of {bad[0]!r} is a "
                        f"{type(data[bad[0]]).__name__}."
                        " Use a list of records, JSON lines, or {id: {field: value}}.")
    return [{"id": str(key), **record} for key, record in data.items()]


def _read_with_datasets(path: Path, builder: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except (datasets.exceptions.DatasetGenerationError, ValueError, OSError, StopIteration,
            TypeError) as exc:
        cause = exc.__cause__ or exc
        raise UserError(f"{path}: cannot read the data file as {builder} "
                        f"({type(cause).__name__}: {cause}).") from None
    return ds.to_list()


def _read_hf_disk(path: Path, split: str | None) -> list[dict]:
    import datasets

    if not any((path / m).exists() for m in HF_DISK_MARKERS):
        raise UserError(f"{path}: this folder was not written by datasets' save_to_disk (none of "
                        f"{', '.join(HF_DISK_MARKERS)} found). Point data.path at such a folder "
                        "or at a JSON / JSON lines / Parquet file.")
    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise UserError(f"{path}: cannot read the saved dataset ({exc}).") from None
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        if split is None and len(names) == 1:
            split = names[0]
        if split not in ds:
            raise UserError(f"{path}: saved DatasetDict with splits {', '.join(names)}; set "
                            "data.split to one of them." if split is None else
                            f"{path}: no split {split!r}; the splits are {', '.join(names)}.")
        ds = ds[split]
    elif split not in (None, "train"):
        raise UserError(f"{path}: data.split {split!r} was set, but this folder holds a single "
                        "Dataset with no splits; remove data.split.")
    return ds.to_list()


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


def _map_row(raw: dict, index: int, plan: dict[str, str], cfg: DataConfig, *, path: Path,
             data_dir: Path) -> Sample:
    uid = f"{path.stem}-{index}"
    if "id" in plan:
        value = raw.get(plan["id"])
        if value is None or str(value) == "":
            raise UserError(f"{path}: row {index} has no id in column {plan['id']!r} "
                            "(data.fields.id); every row needs one, or unset data.fields.id to "
                            "number the rows.")
        uid = str(value)
    canon = {name: raw[plan[name]] for name in CANONICAL
             if name in plan and plan[name] in raw}
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
        return split_eval(train, cfg.eval_fraction, cfg.split_seed)
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
