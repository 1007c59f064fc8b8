"""The checkpoint format: one folder per saved step, complete or ignored.

```
RUN_DIR/checkpoints/step-000200/
    policy/      Hugging Face folder (written by the learner)
    learner/     optimiser / ZeRO state, scheduler (written by the learner)
    state.json   step, policy version, data cursor, RNG states (medrl.align.rng_state),
                 anything JSON-able
    COMPLETE     written last: {"step", "created", "files": {relative path: sha256},
                 "marker_sha256": sha256 of the other fields, so COMPLETE itself is checked}
```

A save is built in a hidden temporary folder (``checkpoints/.tmp-...``) and renamed into
place only after ``COMPLETE`` is on disk, so a crash at any moment leaves either the previous
checkpoints untouched or a folder that :func:`list_checkpoints` ignores. Only one process
writes checkpoints for a run at a time (the driver, holding the run folder's lock:
``launch/rundir.py``); the learner ranks write *into* the temporary folder the driver hands
them.

Resuming from an earlier step K moves the checkpoints after K to
``RUN_DIR/abandoned/<time>-from-step-K/`` (:func:`set_aside_newer`), and ``keep_last``
counts only the checkpoints up to the one just saved, so retention never prunes the line a
run is on in favour of one it left.

``medrl resume`` continues only from a checkpoint that :func:`verified_checkpoint` passes:
every file hashed again (streamed in 1 MiB blocks) and compared with ``COMPLETE``; a damaged
one is refused with the name of the file and of the newest earlier checkpoint that verifies.

Nothing here unpickles: states are JSON, tensors travel as base64 of their raw bytes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping

from medrl.align.records import UserError

CHECKPOINTS_DIR = "checkpoints"
ABANDONED_DIR = "abandoned"  # checkpoints after the step a resume went back to
STATE_FILE = "state.json"
COMPLETE_FILE = "COMPLETE"
FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    """``200`` -> ``"step-000200"``."""
    return f"step-{int(step):06d}"


def checkpoint_step(path: str | Path) -> int:
    """The step number encoded in a checkpoint folder's name."""
    match = _STEP_RE.match(Path(path).name)
    if not match:
        raise UserError(f"{path}: not a checkpoint folder (expected a name like step-000200).")
    return int(match.group(1))


# ----------------------------------------------------------------------------- saving


def save_checkpoint(run_dir: str | Path, step: int, *, write: Callable[[Path], None],
                    state: Mapping[str, Any], keep_last: int | None = None) -> Path:
    """Save step ``step`` of a run and return its folder ``RUN_DIR/checkpoints/step-%06d``.

    ``write(tmp)`` fills the temporary folder (the learner writes ``policy/`` and ``learner/``
    there). ``state`` is any JSON-able mapping (policy version, data cursor, RNG states from
    :func:`capture_rng`, reward identities, ...); ``step`` is stored in it too. An existing
    checkpoint of the same step is replaced. ``keep_last``: after the save, delete all but the
    newest ``keep_last`` complete checkpoints (never the one just written).
    """
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(root)
    name = step_dir_name(step)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    try:
        # mkdtemp makes 0700; a checkpoint is shared like any folder the user makes (the
        # umask decides), so a team on shared storage can read it.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        write(tmp)
        _write_json(tmp / STATE_FILE, {**dict(state), "step": int(step)})
        marker = {"format": FORMAT_VERSION, "step": int(step),
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "files": _hash_tree(tmp, fsync=True)}
        _write_json(tmp / COMPLETE_FILE, {**marker, "marker_sha256": _marker_sha256(marker)})
        _fsync_dirs(tmp)
        final = root / name
        _move_into_place(tmp, final)
    except BaseException as exc:
        full = isinstance(exc, Exception) and out_of_space_error(exc, root)
        shutil.rmtree(tmp, ignore_errors=True)  # the error itself propagates unchanged
        if full:
            raise UserError(out_of_space(run_dir, step, exc)) from None
        raise
    if keep_last is not None:
        apply_retention(run_dir, keep_last, protect=final)
    return final


def out_of_space_error(exc: Exception, root: Path) -> bool:
    """Whether a failed checkpoint write failed for want of space: ENOSPC / EDQUOT (an actor's
    error arrives wrapped, its ``cause`` the original), an error whose message is the OS's
    for them, or any error while the disk is full (torch's zip writer reports a full disk as
    a ``RuntimeError`` about its stream)."""
    cause = getattr(exc, "cause", None) or exc
    if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if any(os.strerror(code) in str(cause) for code in (errno.ENOSPC, errno.EDQUOT)):
        return True  # a library that words the OS error into its own (safetensors)
    try:
        return shutil.disk_usage(root).free < 2**20
    except OSError:
        return False


def out_of_space(run_dir: str | Path, step: int, exc: Exception) -> str:
    """What a checkpoint that did not fit on the disk tells the user."""
    complete = list_checkpoints(run_dir)
    kept = (f"the last complete checkpoint, {complete[-1].name}, is untouched"
            if complete else "no earlier checkpoint exists")
    cause = getattr(exc, "cause", None) or exc
    said = cause.strerror if isinstance(cause, OSError) and cause.strerror else \
        f"{type(cause).__name__} while the disk was full"
    return (f"checkpoint step {step} did not fit on the disk of {Path(run_dir) / CHECKPOINTS_DIR} "
            f"({said}); its partial files were removed and {kept}. Free space "
            "there (or set checkpoint.keep_last, or run.output_dir on a larger disk), then "
            f"`medrl resume {run_dir}` continues from the last complete checkpoint.")


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is moved aside first, then deleted.

    ``os.replace`` cannot overwrite a non-empty folder, hence the three steps. Between them a
    crash leaves the old copy under a hidden ``.old-`` name, which no reader looks at.
    """
    old = None
    if final.exists():
        old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        _delete_checkpoint_dir(old)


def apply_retention(run_dir: str | Path, keep_last: int, *,
                    protect: Path | None = None) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints; return the deleted ones.

    With ``protect`` (the checkpoint just written) only the current line of checkpoints
    counts: steps up to ``protect``'s. A newer one can only come from a line that a resume
    from an earlier step abandoned; it is neither counted nor deleted here
    (:func:`set_aside_newer` moves such checkpoints out of the way when the resume starts).
    """
    complete = list_checkpoints(run_dir)
    if protect is not None:
        complete = [p for p in complete if checkpoint_step(p) <= checkpoint_step(protect)]
    doomed = complete[:-keep_last] if len(complete) > keep_last else []
    if protect is not None:
        doomed = [p for p in doomed if p.resolve() != Path(protect).resolve()]
    for path in doomed:
        _delete_checkpoint_dir(path)
    return doomed


def set_aside_newer(run_dir: str | Path, step: int, *, stamp: str | None = None) -> list[Path]:
    """Move every checkpoint folder after ``step`` to ``RUN_DIR/abandoned/<stamp>-from-step-K/``.

    Resuming from an earlier step ``K`` starts a new line of checkpoints; the later ones
    belong to the line it abandons. They are kept (nothing is lost), but out of
    ``checkpoints/``: a later plain resume continues the new line, and retention counts it
    alone. Incomplete step folders after ``K`` move too. ``stamp`` defaults to the local time
    (``20261201-220100``). Returns the new paths, oldest step first (empty: nothing moved).
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    newer = []
    for child in root.iterdir() if root.is_dir() else ():
        match = _STEP_RE.match(child.name)
        if match and child.is_dir() and int(match.group(1)) > step:
            newer.append((int(match.group(1)), child))
    newer.sort()
    if not newer:
        return []
    stamp = stamp or time.strftime("%Y%m%d-%H%M%S")
    dest = Path(run_dir) / ABANDONED_DIR / f"{stamp}-from-{step_dir_name(step)}"
    while dest.exists():  # two resumes within one second
        dest = dest.with_name(f"{dest.name}-{uuid.uuid4().hex[:4]}")
    dest.mkdir(parents=True)
    moved = []
    for _, path in newer:
        os.replace(path, dest / path.name)
        moved.append(dest / path.name)
    fsync_dir(root)
    fsync_dir(dest)
    return moved


def _delete_checkpoint_dir(path: Path) -> None:
    # COMPLETE goes first: if deletion stops halfway, the remains no longer look complete.
    marker = path / COMPLETE_FILE
    if marker.exists():
        marker.unlink()
    shutil.rmtree(path)


def _remove_leftovers(root: Path) -> None:
    """Hidden folders of an interrupted earlier save (one writer per run, so none is live)."""
    for child in root.iterdir():
        if child.is_dir() and (child.name.startswith(".tmp-") or child.name.startswith(".old-")):
            shutil.rmtree(child)


def _write_json(path: Path, obj: Any) -> None:
    try:
        text = json.dumps(obj, indent=2, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"checkpoint {path.name}: the state must be JSON-able ({exc}); convert "
                        "tensors with capture_rng-style base64 or plain lists first") from exc
    with open(path, "w") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())


def _sha256(path: Path, *, fsync: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
        if fsync:  # the learner's files reach the disk before COMPLETE claims they are there
            os.fsync(f.fileno())
    return digest.hexdigest()


def _marker_sha256(marker: Mapping[str, Any]) -> str:
    """sha256 of COMPLETE's fields but this one, in a canonical JSON form."""
    fields = {k: v for k, v in marker.items() if k != "marker_sha256"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _hash_tree(folder: Path, *, fsync: bool = False) -> dict[str, str]:
    """{relative posix path: sha256} for every file under ``folder`` except COMPLETE."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel != COMPLETE_FILE:
            files[rel] = _sha256(path, fsync=fsync)
    return files


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dirs(folder: Path) -> None:
    for path in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
        fsync_dir(path)


# ----------------------------------------------------------------------------- loading


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest step first (folders without COMPLETE are skipped)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_RE.match(child.name)
        if match and child.is_dir() and (child / COMPLETE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def step_folders(run_dir: str | Path) -> list[Path]:
    """Every ``step-N`` folder under the run's checkpoints, complete or not, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    found = [(int(m.group(1)), child) for child in (root.iterdir() if root.is_dir() else ())
             if (m := _STEP_RE.match(child.name)) and child.is_dir()]
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: str | Path, step: int | None = None) -> Path:
    """The newest complete checkpoint, or the one of ``step``. Raises UserError when absent."""
    complete = list_checkpoints(run_dir)
    if not complete:
        raise UserError(
            f"{run_dir}: no complete checkpoint under {Path(run_dir) / CHECKPOINTS_DIR} (a step "
            "folder without a COMPLETE file is an interrupted save and is ignored). Check the run "
            "folder, or start the run again with `medrl run`.")
    if step is None:
        return complete[-1]
    for path in complete:
        if checkpoint_step(path) == step:
            return path
    steps = ", ".join(str(checkpoint_step(p)) for p in complete)
    raise UserError(f"{run_dir}: no complete checkpoint for step {step}; available steps: {steps}.")


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: missing; {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc}); {what}") from None


def verify_checkpoint(path: str | Path) -> dict[str, str]:
    """Recompute every checksum listed in COMPLETE; return {file: sha256} when all match.

    Raises UserError naming the first file that is missing, changed (a flipped byte, a
    truncation), or not listed, or a COMPLETE that is itself damaged or belongs to another
    step (a renamed folder). Files are hashed in 1 MiB blocks, so any size fits in memory.
    """
    path = Path(path)
    damaged = f"so checkpoint {path.name} is damaged."
    marker = _read_json(path / COMPLETE_FILE, f"checkpoint {path.name} is damaged.")
    listed = marker.get("files") if isinstance(marker, dict) else None
    if not isinstance(listed, dict):
        raise UserError(f"{path / COMPLETE_FILE}: has no file list, {damaged}")
    if "marker_sha256" in marker and marker["marker_sha256"] != _marker_sha256(marker):
        raise UserError(f"{path / COMPLETE_FILE}: its own checksum does not match (the file "
                        f"changed after the save), {damaged}")
    match = _STEP_RE.match(path.name)
    if match and marker.get("step") != int(match.group(1)):
        raise UserError(f"{path / COMPLETE_FILE}: written for step {marker.get('step')}, but the "
                        f"folder is named {path.name} (renamed or copied), {damaged}")
    actual = _hash_tree(path)
    for rel, expected in sorted(listed.items()):
        if rel not in actual:
            raise UserError(f"{path / rel}: listed in COMPLETE but missing, {damaged}")
        if actual[rel] != expected:
            raise UserError(f"{path / rel}: checksum does not match the one in COMPLETE (the file "
                            f"changed after the save), {damaged}")
    extra = sorted(set(actual) - set(listed))
    if extra:
        raise UserError(f"{path / extra[0]}: not part of the saved checkpoint (added after the "
                        f"save), {damaged} Remove the file if you added it.")
    return actual


def verifies(path: Path) -> bool:
    """Whether :func:`verify_checkpoint` passes on ``path``."""
    try:
        verify_checkpoint(path)
    except UserError:
        return False
    return True


def resume_advice(run_dir: str | Path, good: Path | None) -> str:
    """What to do when a checkpoint of ``run_dir`` is damaged; ``good``: one that verifies."""
    if good is None:
        return ("No earlier checkpoint of this run verifies; start the run again with "
                f"`medrl run` (pass --force to replace {run_dir}).")
    step = checkpoint_step(good)
    return (f"The newest earlier checkpoint that verifies is step {step}; resume from it with "
            f"`medrl resume {run_dir} --step {step}`.")


def verified_checkpoint(run_dir: str | Path, step: int | None = None) -> Path:
    """:func:`latest_checkpoint` (the newest, or ``step``), refused unless it verifies.

    A damaged checkpoint raises a UserError naming the damaged file, the newest earlier
    checkpoint that verifies and the command that resumes from it. So does a step folder newer
    than the newest complete one that has lost its COMPLETE: a save renames a checkpoint into
    place only once COMPLETE is in it, so such a folder was damaged afterwards, and resuming
    from an older step is the user's choice (``step``), never made silently.
    """
    path = latest_checkpoint(run_dir, step)
    newer = [p for p in step_folders(run_dir) if checkpoint_step(p) > checkpoint_step(path)]
    try:
        if step is None and newer:
            raise UserError(f"{newer[-1] / COMPLETE_FILE}: missing, so checkpoint "
                            f"{newer[-1].name} is damaged.")
        verify_checkpoint(path)
    except UserError as exc:
        last = checkpoint_step(path) + (1 if step is None and newer else 0)  # path may do
        earlier = [p for p in list_checkpoints(run_dir) if checkpoint_step(p) < last]
        good = next((p for p in reversed(earlier) if verifies(p)), None)
        raise UserError(f"{exc} {resume_advice(run_dir, good)}") from None
    return path


def read_state(path: str | Path) -> dict[str, Any]:
    """The ``state.json`` of a checkpoint folder."""
    state = _read_json(Path(path) / STATE_FILE, "the checkpoint is damaged; resume from an "
                       "earlier step instead.")
    if not isinstance(state, dict):
        raise UserError(f"{Path(path) / STATE_FILE}: expected a JSON object.")
    return state
