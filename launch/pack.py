"""Packing a recipe for a Ray cluster: the recipe plus exactly the local files it names.

What goes into the job's working folder (what Ray uploads):

- ``data.path`` / ``data.eval_path``: the file (or saved-dataset folder) and the images and
  volumes its rows name by relative path (``data.fields.images`` / ``data.fields.volume``),
  laid out as they are around the data file so the rows still find them; media the rows
  name by absolute path stay where they are (the cluster must see them);
- ``qat.probe_path``: the file;
- ``rewards.functions[*].name`` of the form ``path/to/file.py:fn``: the plugin file;
- ``model.policy`` when it is a local folder;
- the extra files given to ``medrl submit``.

Nothing else: the other files beside a data file (in the system's temporary folder, say) stay
behind. A shipped data file lands at ``data/`` (``eval_data/``, ``probe/``) plus its path from
the smallest folder that holds it and its media, and the recipe is rewritten to match. Symbolic
links are followed and the files they point to are what is counted and copied; the
whole upload holds at most ``SHIP_LIMIT_BYTES``. A path the recipe names relatively that would
take the upload over the limit is refused (the message names the path and its size); one named
by an absolute path is then left where it is, for a cluster that mounts the same storage (a
note says so), as is an absolute path that is not on this machine. A broken symbolic link, a
link loop, or a media file a row names that does not exist is refused.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import yaml

from medrl.align.records import UserError

if TYPE_CHECKING:  # the recipe module (pydantic) is imported when a recipe is packed
    from medrl.launch.recipe import DataConfig

# The whole upload, not each file: Ray sends the working folder in one gRPC message, and large
# models and datasets belong on storage the cluster mounts anyway.
SHIP_LIMIT_BYTES = 64 * 1024 * 1024


@dataclass
class Packed:
    """A working folder ready to upload: the recipe in it, the overrides still to pass."""

    folder: Path
    recipe_name: str
    overrides: list[str]
    notes: list[str] = field(default_factory=list)
    files: list[tuple[str, int]] = field(default_factory=list)  # (place in the folder, bytes)
    recipe: Any = None  # the validated Recipe (overrides applied, paths as the user gave them)

    @property
    def size(self) -> int:
        """Bytes of the packed files (the recipe itself not counted)."""
        return sum(size for _, size in self.files)

    def summary(self, limit: int = 10) -> str:
        """One line: how many files, their total size, and the first ``limit`` of them."""
        if not self.files:
            return "uploading the recipe alone (no local files to pack)"
        shown = ", ".join(f"{dest} ({_mib(size)})" for dest, size in self.files[:limit])
        more = f", and {len(self.files) - limit} more" if len(self.files) > limit else ""
        return (f"uploading {len(self.files)} file(s), {_mib(self.size)} of the "
                f"{SHIP_LIMIT_BYTES >> 20} MiB limit: {shown}{more}")


@dataclass(frozen=True)
class ShippedFile:
    """One file of the upload: its place in the working folder (posix), the real file it copies
    (links followed) and that file's size in bytes."""

    dest: str
    source: Path
    size: int


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


def _follow(path: Path, where: str) -> Path:
    """``path`` with every symbolic link followed; a broken link is a :class:`UserError`."""
    if path.is_symlink() and not path.exists():
        raise UserError(f"{where}: {path} is a symbolic link to {os.readlink(path)!r}, which "
                        "does not exist; fix the link or remove it.")
    return path.resolve()


def files_of(path: Path, dest: str, where: str) -> list[ShippedFile]:
    """Every file at or under ``path`` (a file or a folder), links followed, placed under
    ``dest``. ``where`` (the recipe field) starts each error message."""
    found: list[ShippedFile] = []

    def visit(entry: Path, place: str, folders_above: frozenset[Path]) -> None:
        real = _follow(entry, where)
        try:
            if real.is_dir():
                if real in folders_above:
                    raise UserError(f"{where}: {entry} links back to {real}, a folder that "
                                    "contains it; remove the link loop.")
                for child in sorted(real.iterdir()):
                    visit(entry / child.name, f"{place}/{child.name}", folders_above | {real})
            elif real.is_file():  # sockets and pipes are not data
                found.append(ShippedFile(place, real, real.stat().st_size))
        except OSError as exc:
            raise UserError(f"{where}: cannot read {entry} ({exc.strerror or exc}).") from None

    visit(path, dest, frozenset())
    return found


class Upload:
    """The files chosen so far for the working folder, and their total size in bytes."""

    def __init__(self, reserved: Iterable[str] = ()):
        self.files: dict[str, Path] = {}
        self.sizes: dict[str, int] = {}
        self.size = 0
        self.reserved = set(reserved)  # names written by the packer itself (the recipe)

    def size_with(self, files: list[ShippedFile]) -> int:
        """The upload's size if ``files`` were added (a file already in it counts once)."""
        return self.size + sum(f.size for f in files if f.dest not in self.files)

    def add(self, files: list[ShippedFile], where: str) -> None:
        for f in files:
            if f.dest in self.reserved or self.files.get(f.dest, f.source) != f.source:
                raise UserError(f"{where}: {f.source} would be packed as {f.dest}, where another "
                                "file already goes; rename one of them.")
            if f.dest not in self.files:
                self.files[f.dest] = f.source
                self.sizes[f.dest] = f.size
                self.size += f.size

    def copy_into(self, folder: Path) -> None:
        for dest, source in self.files.items():
            target = folder / dest
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
            except OSError as exc:
                raise UserError(f"cannot copy {source} into the job's folder {folder} "
                                f"({exc.strerror or exc}).") from None


def _path_refs(value: Any) -> list[str]:
    """The file paths in an images / volume cell: a path, a list of them, or datasets Image
    cells (``{"bytes", "path"}``) that have no embedded bytes."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [value["path"]] if isinstance(value.get("path"), str) and not value.get("bytes") \
            else []
    if isinstance(value, (list, tuple)):
        return [ref for item in value for ref in _path_refs(item)]
    return []


def row_media(path: Path, cfg: DataConfig, where: str) -> tuple[list[Path], int]:
    """The media files the rows of data file ``path`` name by relative path (normalised, in
    row order, each once), and how many the rows name by absolute path.

    ``cfg`` gives the columns, the format and ``max_samples``, as the loader uses them. A
    relative path that does not exist is refused.
    """
    columns = [(name, column) for name, column in (("images", cfg.fields.images),
                                                   ("volume", cfg.fields.volume)) if column]
    if not columns:
        return [], 0
    from medrl.launch.data_files import read_rows

    rows, _ = read_rows(path, cfg.format, cfg.split)
    found: dict[Path, None] = {}
    absolute = 0
    for i, row in enumerate(rows[: cfg.max_samples]):
        for name, column in columns:
            for ref in _path_refs(row.get(column)):
                if Path(ref).expanduser().is_absolute():
                    absolute += 1
                    continue
                media = Path(os.path.normpath(path.parent / ref))
                if not os.path.lexists(media):
                    raise UserError(f"{where}: row {i}: data.fields.{name} (column {column!r}) "
                                    f"names {ref!r}, which is not at {media}. Fix the path in "
                                    "the data, or name the file by an absolute path on storage "
                                    "the cluster sees.")
                found[media] = None
    return list(found), absolute


def pack_recipe(recipe_path: str | Path, overrides: Sequence[str], folder: Path,
                extra_files: Iterable[str | Path] = ()) -> Packed:
    """Copy the recipe and the local files it names into ``folder``; rewrite their paths.

    Overrides are applied first and the recipe is validated against the schema here, so a typo
    fails before anything is uploaded. Everything is chosen and counted before anything is
    copied. Raises :class:`UserError` for a missing relative path, an upload over
    ``SHIP_LIMIT_BYTES``, a broken link or link loop, or a missing media file.
    """
    from pydantic import ValidationError

    from medrl.launch.recipe import Recipe, apply_overrides, parse_override
    from medrl.launch.recipe_yaml import RecipeError, format_errors, read_yaml

    recipe_path = Path(recipe_path)
    # The shipped recipe is the user's file with the overrides applied (not the fully resolved
    # dump: the cluster fills in defaults with its own medrl version); local paths are rewritten.
    data = apply_overrides(read_yaml(recipe_path), list(overrides))
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(format_errors(str(recipe_path), err)) from None
    base = recipe_path.parent.absolute()
    recipe_name = recipe_path.name
    upload = Upload(reserved=[recipe_name])
    notes: list[str] = []
    rewritten: set[str] = set()

    def local(value: str) -> Path:
        p = Path(value).expanduser()
        return Path(os.path.normpath(p if p.is_absolute() else base / p))

    def named(value: str, where: str) -> Path | None:
        """The local path of a recipe value; None (with a note) when an absolute path is not on
        this machine, so the cluster resolves it."""
        source = local(value)
        if os.path.lexists(source):
            return source
        if not Path(value).expanduser().is_absolute():
            raise UserError(f"{recipe_path}: {where}: {value!r} does not exist (relative paths "
                            f"are read from the recipe's folder {base}).")
        notes.append(f"{where}: {value} is not on this machine; the cluster must see it there")
        return None

    def take(files: list[ShippedFile], where: str, value: str, *, what: str = "") -> bool:
        """Add ``files`` to the upload if they fit. Else an absolute path stays where it is (a
        note), and a relative one is refused."""
        if upload.size_with(files) <= SHIP_LIMIT_BYTES:
            upload.add(files, where)
            return True
        size = _mib(sum(f.size for f in files))
        limit = f"{SHIP_LIMIT_BYTES >> 20} MiB"
        if Path(value).expanduser().is_absolute():
            notes.append(f"{where}: {value} ({size}{what}) does not fit in the {limit} upload; "
                         "not shipped, the cluster must see it at that path")
            return False
        before = f" with the {_mib(upload.size)} packed before it" if upload.size else ""
        raise UserError(f"{recipe_path}: {where}: {value!r} is {size}{what}, symbolic links "
                        f"followed; that takes the upload{before} over the {limit} medrl submit "
                        "sends. Put it on storage the cluster mounts and name it by an absolute "
                        "path, or make it smaller.")

    def ship_data(section: str, key: str, slot: str, cfg: DataConfig | None) -> None:
        """A data file with the media its rows name; ``cfg`` None: the file alone."""
        value = (data.get(section) or {}).get(key)  # schema-checked above: a str when present
        where = f"{section}.{key}"
        source = named(value, where) if value else None
        if source is None:
            return
        own = files_of(source, source.name, where)
        if upload.size_with(own) > SHIP_LIMIT_BYTES:  # too big alone: the rows are not read
            take(own, where, value)  # refused, or left where it is with a note
            return
        media, absolute = row_media(source, cfg, where) if cfg is not None else ([], 0)
        # The smallest folder that holds the data file and its media: packed as it lies, so
        # the relative paths in the rows still lead to the media.
        root = Path(os.path.commonpath([source.parent, *(m.parent for m in media)]))
        lead = PurePosixPath(slot, source.parent.relative_to(root).as_posix())
        files = [ShippedFile(str(lead / f.dest), f.source, f.size) for f in own]
        for m in media:
            files += files_of(m, str(PurePosixPath(slot, m.relative_to(root).as_posix())), where)
        if take(files, where, value, what=f" with the {len(media)} media file(s) its rows name"):
            data[section][key] = str(lead / source.name)
            rewritten.add(where)
        if absolute:
            notes.append(f"{where}: {absolute} image/volume path(s) in the rows are absolute; "
                         "not shipped, the cluster must see them")

    ship_data("data", "path", "data", recipe.data)
    ship_data("data", "eval_path", "eval_data", recipe.data)
    ship_data("qat", "probe_path", "probe", None)

    policy = (data.get("model") or {}).get("policy")
    if policy and not str(policy).startswith("tiny:"):
        source = named(str(policy), "model.policy")
        if source is not None:
            if not _follow(source, "model.policy").is_dir():
                raise UserError(f"{recipe_path}: model.policy: {policy!r} is a file; name a "
                                "Hugging Face model folder or a run folder.")
            if take(files_of(source, "model", "model.policy"), "model.policy", str(policy)):
                data["model"]["policy"] = "model"
                rewritten.add("model.policy")

    for i, spec in enumerate((data.get("rewards") or {}).get("functions") or []):
        name = str(spec.get("name", ""))
        file_part, sep, fn = name.rpartition(":")
        if not sep or not file_part.endswith(".py"):
            continue  # a registered name or package.module:fn: installed on the cluster
        where = f"rewards.functions.{i}.name"
        source = local(file_part)
        if not os.path.lexists(source) or not _follow(source, where).is_file():
            raise UserError(f"{recipe_path}: {where}: reward file {file_part!r} not found "
                            f"(relative paths are read from {base}).")
        dest = f"rewards/{i}_{source.name}"
        if take(files_of(source, dest, where), where, file_part):
            spec["name"] = f"{dest}:{fn}"
            rewritten.add(where)
            notes.append(f"rewards.functions.{i}: shipped {source.name} alone; modules it "
                         "imports from its own folder must be installed on the cluster")

    for extra in extra_files:
        source = Path(extra).expanduser().absolute()
        where = f"extra file {source}"
        if not os.path.lexists(source):
            raise UserError(f"extra file {source} does not exist.")
        files = files_of(source, source.name, where)
        if upload.size_with(files) > SHIP_LIMIT_BYTES:
            raise UserError(f"{where} is {_mib(sum(f.size for f in files))}, symbolic links "
                            f"followed; with the {_mib(upload.size)} packed before it, that is "
                            f"over the {SHIP_LIMIT_BYTES >> 20} MiB medrl submit sends; leave it "
                            "out and put it on storage the cluster mounts.")
        upload.add(files, where)

    output_dir = str((data.get("run") or {}).get("output_dir", "runs"))
    if not Path(output_dir).expanduser().is_absolute():
        notes.append(f"run.output_dir {output_dir!r} is relative: on the cluster it lies inside "
                     "the job's temporary working folder; pass run.output_dir=/shared/path to "
                     "keep the results")

    upload.copy_into(folder)
    (folder / recipe_name).write_text(yaml.safe_dump(data, sort_keys=False))

    # Overrides already baked into the shipped recipe are passed again for the record, except
    # those whose path was rewritten (their local value means nothing on the cluster).
    def touches_rewritten(override: str) -> bool:
        key = ".".join(parse_override(override)[0])
        return any(r == key or r.startswith(key + ".") for r in rewritten)

    kept = [o for o in overrides if not touches_rewritten(o)]
    return Packed(folder=folder, recipe_name=recipe_name, overrides=kept, notes=notes,
                  files=sorted(upload.sizes.items()), recipe=recipe)
