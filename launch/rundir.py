"""The run folder: created once, never silently overwritten, resumable from what it holds.

```
RUN_DIR/recipe.yaml      the fully resolved recipe, paths made absolute (what resume reads)
RUN_DIR/run.lock         while a process writes the run: its pid, host and start time
RUN_DIR/prompts.jsonl    per step: the uids of the prompts used (no text) - proves that no
                         prompt was lost or repeated across retries and resumes
RUN_DIR/metrics.jsonl, tensorboard/, plots/, checkpoints/
RUN_DIR/abandoned/<time>-from-step-K/   checkpoints (and logs) a resume from step K left
```

One process writes a run folder at a time: ``medrl run`` and ``medrl resume`` hold
:class:`RunLock` for the whole run, and ``--force`` replaces only a run folder (one holding
``recipe.yaml``) that nobody is writing.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from medrl.align.records import UserError
from medrl.launch.recipe import Recipe, dump_recipe, resolve_path

LOCK_FILE = "run.lock"
RUN_LOGS = ("metrics.jsonl", "prompts.jsonl", "completions.jsonl", "reward_failures.jsonl")


def note(text: str) -> None:
    """The default way to tell the user something that does not stop the run (stderr)."""
    print(f"note: {text}", file=sys.stderr)


def absolute_recipe(recipe: Recipe, recipe_dir: Path) -> Recipe:
    """A copy with every local path made absolute, so the saved recipe works from anywhere."""
    r = recipe.model_copy(deep=True)
    r.run.recipe_dir = str(recipe_dir.resolve())
    if r.data is not None:
        r.data.path = str(resolve_path(recipe_dir, r.data.path).resolve())
    if r.data is not None and r.data.eval_path:
        r.data.eval_path = str(resolve_path(recipe_dir, r.data.eval_path).resolve())
    if not r.model.policy.startswith("tiny:") and resolve_path(recipe_dir, r.model.policy).exists():
        r.model.policy = str(resolve_path(recipe_dir, r.model.policy).resolve())
    for spec in r.rewards.functions:  # path/to/file.py:function plugins
        file, sep, fn = spec.name.rpartition(":")
        if sep and file.endswith(".py"):
            spec.name = f"{resolve_path(recipe_dir, file).resolve()}:{fn}"
    if r.qat and r.qat.probe_path:
        r.qat.probe_path = str(resolve_path(recipe_dir, r.qat.probe_path).resolve())
    return r


def run_dir_of(recipe: Recipe) -> Path:
    """``run.output_dir / run.name`` (the schema keeps ``run.name`` one plain folder name)."""
    return Path(recipe.run.output_dir).expanduser() / recipe.run.name


@contextmanager
def new_run(recipe: Recipe, *, force: bool = False,
            say: Callable[[str], None] = note) -> Iterator[Path]:
    """Create the run folder, write ``recipe.yaml``, and hold its lock until the block ends.

    A non-empty folder is refused, unless ``force`` and it is a medrl run folder (it holds
    ``recipe.yaml``) that no live process is writing: then its contents are deleted under the
    lock. Anything else that ``run.output_dir / run.name`` names is left untouched.
    """
    run_dir = run_dir_of(recipe)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} exists and is a file, not a folder; pick another "
                        "name (run.name=...) or run.output_dir.")
    if _has_contents(run_dir):
        if not force:
            raise UserError(
                f"run folder {run_dir} already exists and is not empty. Resume it with "
                f"`medrl resume {run_dir}`, pick another name (run.name=...), or pass --force "
                "to delete it and start again.")
        if not (run_dir / "recipe.yaml").is_file():
            raise UserError(
                f"{run_dir} is not a medrl run folder (it has no recipe.yaml), so --force does "
                "not delete it: --force replaces only a folder that `medrl run` made. Nothing "
                "was deleted; pick another name (run.name=...) or run.output_dir.")
    run_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(run_dir, say=say):
        if _has_contents(run_dir):
            if not force:  # another process filled it since the check above
                raise UserError(f"run folder {run_dir} is no longer empty; another `medrl run` "
                                "may have started it. Pick another name (run.name=...).")
            _clear_run_dir(run_dir)
            say(f"--force: deleted the previous contents of {run_dir}")
        (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))
        yield run_dir


def create_run_dir(recipe: Recipe, *, force: bool = False) -> Path:
    """:func:`new_run` without holding the lock afterwards (for library use and tests)."""
    with new_run(recipe, force=force) as run_dir:
        return run_dir


def _has_contents(folder: Path) -> bool:
    return folder.is_dir() and any(p.name != LOCK_FILE for p in folder.iterdir())


def _clear_run_dir(run_dir: Path) -> None:
    """Delete everything in ``run_dir`` but the lock file (the caller holds the lock)."""
    for child in run_dir.iterdir():
        if child.name == LOCK_FILE:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:  # a file, or a link: the link goes, never what it points to
            child.unlink()


def load_run_recipe(run_dir: Path, overrides: list[str] = (), *, save: bool = True) -> Recipe:
    """The recipe saved in a run folder (validated again: it may have been edited).

    Overrides given on resume are written back (``save``), so the folder always holds the
    recipe that its latest steps ran with; ``save=False`` leaves the file as it is (``medrl
    validate RUN_DIR``, and ``medrl resume`` until the checkpoint has verified).
    """
    from medrl.launch.recipe import load_recipe

    if not (run_dir / "recipe.yaml").exists():
        raise UserError(f"{run_dir} is not a medrl run folder (no recipe.yaml). Pass the folder "
                        "that `medrl run` created, e.g. runs/quickstart.")
    recipe = load_recipe(run_dir / "recipe.yaml", list(overrides))
    if overrides and save:
        save_run_recipe(run_dir, recipe)
    return recipe


def save_run_recipe(run_dir: Path, recipe: Recipe) -> None:
    """Write ``recipe`` as the run folder's recipe.yaml (what the next resume reads)."""
    (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))


class RunLock:
    """``RUN_DIR/run.lock``: held by the one process that writes a run, released on exit.

    The file holds the owner's pid, host and start time (JSON) and is locked with ``flock``,
    which the operating system releases when the owner dies, however it dies. A lock file
    left behind by a dead process (same host, pid not alive) is taken over with a note; a live
    owner, or one on another host that cannot be checked, refuses with a UserError naming it.
    Use as a context manager; leaving the block (normally, on an error, on Ctrl-C) releases it.
    """

    def __init__(self, run_dir: Path, *, say: Callable[[str], None] = note):
        self.path = Path(run_dir) / LOCK_FILE
        self.say = say
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def acquire(self) -> None:
        while self._fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise UserError(self._held_message(read_lock(self.path), alive=True)) from None
            if not _same_file(fd, self.path):  # released and removed while we opened it
                os.close(fd)
                continue
            try:
                self._take_over(fd)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd

    def _take_over(self, fd: int) -> None:
        """We hold the flock; decide about what an earlier owner left in the file."""
        owner = read_lock(self.path)
        if owner:
            if owner.get("host") != socket.gethostname():
                raise UserError(self._held_message(owner, alive=None))
            if _pid_alive(owner.get("pid")):  # not holding the flock: its pid may be reused
                raise UserError(self._held_message(owner, alive=None))
            self.say(f"{self.path}: taking over the lock of process {owner.get('pid')} (started "
                     f"{owner.get('started', '?')}), which is no longer running")
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)

    def _held_message(self, owner: dict, *, alive: bool | None) -> str:
        who = (f"process {owner.get('pid', '?')} on {owner.get('host', '?')} (started "
               f"{owner.get('started', '?')})") if owner else "another process"
        run_dir = self.path.parent
        if alive is None:  # another host, or a live pid that does not hold the lock
            return (f"run folder {run_dir} is locked by {who}, and whether that run is still "
                    f"going cannot be checked from here. If it has ended, delete {self.path} "
                    "and run the command again; two processes writing one run folder delete "
                    "each other's checkpoints.")
        return (f"run folder {run_dir} is in use by {who}: one process writes a run at a time. "
                f"Wait for it to finish (or stop it), then run the command again; to start a "
                f"separate run, pick another name (run.name=...).")

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:  # unlink first: a process that opened the old file sees it gone and retries
            if _same_file(fd, self.path):
                self.path.unlink()
        finally:
            os.close(fd)


def read_lock(path: Path) -> dict:
    """The owner record in a lock file ({} if absent, empty or unreadable)."""
    try:
        owner = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, it is someone else's
        return True
    return True


def set_aside_after(run_dir: Path, checkpoint: Path, *,
                    say: Callable[[str], None] = note) -> Path | None:
    """Before resuming from ``checkpoint``, move the checkpoints after it out of the way.

    They go to ``RUN_DIR/abandoned/<time>-from-step-K/`` with a copy of the run's logs as they
    were (the logs themselves drop the rows after K when the run starts). Returns that folder,
    or None when no later checkpoint exists. The caller holds the run's lock.
    """
    from medrl.align.checkpoint import checkpoint_step, set_aside_newer

    step = checkpoint_step(checkpoint)
    moved = set_aside_newer(run_dir, step)
    if not moved:
        return None
    folder = moved[0].parent
    for name in RUN_LOGS:
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, folder / name)
    steps = ", ".join(str(int(p.name.split("-")[1])) for p in moved)
    say(f"resuming from step {step}: the later checkpoints (steps {steps}) are set aside in "
        f"{folder}; this run continues from step {step} and they are no longer resumed or "
        "pruned (move them back into checkpoints/ to use them again)")
    return folder


def check_run_logs(run_dir: Path) -> None:
    """Read every JSON-lines log of the run: a damaged one is refused before anything starts."""
    from medrl.launch.monitor import read_jsonl

    for name in RUN_LOGS:
        read_jsonl(run_dir / name)


class PromptLog:
    """Appends the uids each step trained on; truncated to the resume point on resume.

    On resume ``prompts.jsonl`` and ``completions.jsonl`` drop the rows after the resumed step
    (and a torn last line), each rewritten atomically, as ``metrics.jsonl`` is.
    """

    def __init__(self, run_dir: Path, *, resume_step: int | None = None):
        from medrl.launch.monitor import truncate_jsonl

        self.path = run_dir / "prompts.jsonl"
        if resume_step is not None:
            for path in (self.path, run_dir / "completions.jsonl"):
                truncate_jsonl(path, resume_step)

    def write(self, step: int, uids: list[str]) -> None:
        """The uids step ``step`` trained on, on disk (fsync) when this returns."""
        from medrl.launch.monitor import append_durably

        append_durably(self.path, [{"step": step, "uids": uids}])

    def write_completions(self, step: int, samples) -> None:
        """Prompts and completions with their rewards, for a recipe that asks to log text."""
        from medrl.launch.monitor import append_durably

        append_durably(self.path.parent / "completions.jsonl",
                       [{"step": step, **s.to_log(include_text=True)} for s in samples])

    def read(self) -> list[dict]:
        from medrl.launch.monitor import read_jsonl

        return read_jsonl(self.path)
