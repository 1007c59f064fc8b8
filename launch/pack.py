"""Packing a recipe for a Ray cluster: the recipe plus the local files it names.

What is packed into the job's working folder:

- ``data.path`` / ``data.eval_path`` / ``qat.probe_path``: the file together with its folder
  when the folder is small (rows may name images or volumes relative to it), else the file;
- ``rewards.functions[*].name`` of the form ``path/to/file.py:fn``: the plugin file;
- ``model.policy`` when it is a local folder of at most ``SHIP_LIMIT_BYTES``.

Paths that are absolute and not found here, or too large to ship, are left as they are: the
cluster must see them (a shared file system). Each such decision is reported as a note.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import yaml

from medrl.align.records import UserError

SHIP_LIMIT_BYTES = 64 * 1024 * 1024


@dataclass
class Packed:
    """A working folder ready to upload: the recipe in it, the overrides still to pass."""

    folder: Path
    recipe_name: str
    overrides: list[str]
    notes: list[str] = field(default_factory=list)


def _size_at_most(path: Path, limit: int) -> bool:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            total += os.path.getsize(os.path.join(root, name))
            if total > limit:
                return False
    return True


def _ship(source: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, dest)
    else:
        shutil.copy2(source, dest)


def pack_recipe(recipe_path: str | Path, overrides: Sequence[str], folder: Path,
                extra_files: Iterable[str | Path] = ()) -> Packed:
    """Copy the recipe and the local files it names into ``folder``; rewrite their paths.

    Overrides are applied first and the recipe is validated against the schema here, so a typo
    fails before anything is uploaded. Files that do not exist here are checked on the cluster.
    """
    from pydantic import ValidationError

    from medrl.launch.recipe import Recipe, apply_overrides, parse_override
    from medrl.launch.recipe_yaml import RecipeError, format_errors, read_yaml

    recipe_path = Path(recipe_path)
    # The shipped recipe is the user's file with the overrides applied (not the fully resolved
    # dump: the cluster fills in defaults with its own medrl version); local paths are rewritten.
    data = apply_overrides(read_yaml(recipe_path), list(overrides))
    try:
        Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(format_errors(str(recipe_path), err)) from None
    base = recipe_path.parent
    notes: list[str] = []
    rewritten: set[str] = set()

    def local(value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else base / p

    def ship_data(section: str, key: str, slot: str) -> None:
        value = (data.get(section) or {}).get(key)  # schema-checked above: a str when present
        if not value:
            return
        source = local(value)
        where = f"{section}.{key}"
        if not source.exists():
            if not Path(value).expanduser().is_absolute():
                raise UserError(f"{recipe_path}: {where}: {value!r} does not exist (relative "
                                f"paths are read from the recipe's folder {base}).")
            notes.append(f"{where}: {value} is not on this machine; the cluster must see it there")
            return
        parent = source if source.is_dir() else source.parent
        if source.is_file() and parent != base and _size_at_most(parent, SHIP_LIMIT_BYTES):
            _ship(parent, folder / slot)  # keep images/volumes the rows name relative to it
            new = f"{slot}/{source.name}"
        elif source.is_dir() and _size_at_most(source, SHIP_LIMIT_BYTES):
            _ship(source, folder / slot / source.name)
            new = f"{slot}/{source.name}"
        elif source.is_file() and source.stat().st_size <= SHIP_LIMIT_BYTES:
            _ship(source, folder / slot / source.name)
            new = f"{slot}/{source.name}"
            why = ("it sits in the recipe's folder" if parent == base
                   else f"its folder is larger than {SHIP_LIMIT_BYTES >> 20} MiB")
            notes.append(f"{where}: shipped {source.name} alone ({why}); images or volumes its "
                         "rows name by relative path are not shipped: give them absolute paths "
                         "on storage the cluster sees")
        else:
            notes.append(f"{where}: {source} is larger than {SHIP_LIMIT_BYTES >> 20} MiB; not "
                         f"shipped, the cluster must see {source.resolve()}")
            new = str(source.resolve())
        data[section][key] = new
        rewritten.add(where)

    ship_data("data", "path", "data")
    ship_data("data", "eval_path", "eval_data")
    ship_data("qat", "probe_path", "probe")

    policy = (data.get("model") or {}).get("policy")
    if policy and not str(policy).startswith("tiny:"):
        source = local(str(policy))
        if source.is_dir() and _size_at_most(source, SHIP_LIMIT_BYTES):
            _ship(source, folder / "model")
            data["model"]["policy"] = "model"
        elif source.exists():
            data["model"]["policy"] = str(source.resolve())
            notes.append(f"model.policy: {source} is larger than {SHIP_LIMIT_BYTES >> 20} MiB; "
                         f"not shipped, the cluster must see {source.resolve()}")
        elif Path(str(policy)).expanduser().is_absolute():
            notes.append(f"model.policy: {policy} is not on this machine; the cluster must see it")
        else:
            raise UserError(f"{recipe_path}: model.policy: {policy!r} does not exist (relative "
                            f"paths are read from the recipe's folder {base}).")
        rewritten.add("model.policy")

    for i, spec in enumerate((data.get("rewards") or {}).get("functions") or []):
        name = str(spec.get("name", ""))
        file_part, sep, fn = name.rpartition(":")
        if not sep or not file_part.endswith(".py"):
            continue  # a registered name or package.module:fn: installed on the cluster
        source = local(file_part)
        if not source.is_file():
            raise UserError(f"{recipe_path}: rewards.functions.{i}.name: reward file "
                            f"{file_part!r} not found (relative paths are read from {base}).")
        dest = Path("rewards") / f"{i}_{source.name}"
        _ship(source, folder / dest)
        spec["name"] = f"{dest.as_posix()}:{fn}"
        rewritten.add(f"rewards.functions.{i}.name")
        notes.append(f"rewards.functions.{i}: shipped {source.name} alone; modules it imports "
                     "from its own folder must be installed on the cluster")

    for extra in extra_files:
        source = Path(extra).expanduser()
        if not source.exists():
            raise UserError(f"extra file {source} does not exist.")
        _ship(source, folder / source.name)

    output_dir = str((data.get("run") or {}).get("output_dir", "runs"))
    if not Path(output_dir).expanduser().is_absolute():
        notes.append(f"run.output_dir {output_dir!r} is relative: on the cluster it lies inside "
                     "the job's temporary working folder; pass run.output_dir=/shared/path to "
                     "keep the results")

    recipe_name = recipe_path.name
    (folder / recipe_name).write_text(yaml.safe_dump(data, sort_keys=False))
    # Overrides already baked into the shipped recipe are passed again for the record, except
    # those whose path was rewritten (their local value means nothing on the cluster).
    def touches_rewritten(override: str) -> bool:
        key = ".".join(parse_override(override)[0])
        return any(r == key or r.startswith(key + ".") for r in rewritten)

    kept = [o for o in overrides if not touches_rewritten(o)]
    return Packed(folder=folder, recipe_name=recipe_name, overrides=kept, notes=notes)
