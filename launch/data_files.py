"""Data files as rows: JSON (a list of records, or a mapping keyed by id) and JSON lines read
with Python's ``json`` module (``datasets``' pyarrow reader crashed the process on some
inputs, a first line of ``null`` among them, and quoted cell values in its errors); Parquet
and folders written by ``save_to_disk`` through the ``datasets`` library. Every problem is a
UserError naming the file and the line or item, never a cell's content.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medrl.align.records import UserError

FORMATS_BY_SUFFIX = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl",
                     ".parquet": "parquet", ".pq": "parquet"}
HF_DISK_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")


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
    if fmt in ("json", "jsonl"):
        return _read_json_records(path, head), None
    return _read_with_datasets(path, "parquet"), None


def _leading_chars(path: Path, n: int) -> str:
    """The first ``n`` characters of a text file that are not white space."""
    out = ""
    with path.open("r", encoding="utf-8-sig", errors="replace") as f:
        while len(out) < n:
            char = f.read(1)
            if not char:
                break
            if not char.isspace():
                out += char
    return out


def _json_kind(value: Any) -> str:
    """What a JSON value is, in words (never the value itself)."""
    if value is None:
        return "null"
    return {bool: "a boolean", str: "a string", list: "a list", dict: "an object"}.get(
        type(value), "a number")


def _json_lines(path: Path):
    """``(line number, text)`` of each line of a file that must be UTF-8."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise UserError(f"{path}: line {number} is not UTF-8 text (byte {exc.start + 1} "
                                "of the line); save the file as UTF-8.") from None


def _read_json_records(path: Path, head: str) -> list[dict]:
    """The records of a JSON list (``head`` starts with ``[``) or JSON lines file.

    Read with Python's json module, not pyarrow's JSON reader, which crashes the process on
    some files (a first line ``null``, mixed types across large rows), lets bytes that are
    not UTF-8 through and repeats cell values in its errors. A record that is not an object
    is refused naming its line or item number, never the text; a column that only some
    records hold is None in the others, as in a table (:func:`_table_rows`).
    """
    shape = ("every record is an object {field: value}: one per line, a list of them, or "
             "{id: object}")
    if head[:1] == "[":
        text = "".join(line for _, line in _json_lines(path))
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column "
                            f"{exc.colno}).") from None
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise UserError(f"{path}: item {i} of the JSON list is {_json_kind(item)}, not "
                                f"an object; {shape}.")
        return _table_rows(items)
    records = []
    for number, line in _json_lines(path):
        if not line.strip():
            continue
        try:
            value = json.loads(line.rstrip("\r\n"))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: line {number} is not valid JSON ({exc.msg} at column "
                            f"{exc.pos + 1}); a JSON lines file holds one object per "
                            "line.") from None
        if not isinstance(value, dict):
            raise UserError(f"{path}: line {number} holds {_json_kind(value)}, not an object; "
                            f"{shape}.")
        records.append(value)
    return _table_rows(records)


def _table_rows(records: list[dict]) -> list[dict]:
    """Records with the same columns, in order of first appearance; a column a record lacks
    is None there (what a Parquet file or a saved dataset of the same rows gives)."""
    columns = list(dict.fromkeys(key for record in records for key in record))
    return [{c: record.get(c) for c in columns} for record in records]


def _parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    try:
        return pq.read_metadata(path).num_rows
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise UserError(f"{path}: cannot read the data file as parquet ({exc}).") from None


def _read_keyed_json(path: Path) -> list[dict] | None:
    """``{id: record, ...}`` -> records with the key in ``id``; None if the file is JSON lines."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
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
    return _table_rows([{"id": str(key), **record} for key, record in data.items()])


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
