"""What the user sees while a run trains: metrics file, TensorBoard, progress bar, plots.

``RUN_DIR/metrics.jsonl`` is the record of truth: one JSON object per logged step
(``{"step", "time", <metric>: float | null, ...}``), flushed line by line, so a crash loses
at most the line being written. With ``every=N`` a row is written every N steps, at every
checkpoint step and at the last step, and holds each metric's mean over the steps since the
previous row (over the steps that have it), as TRL's ``logging_steps`` does; closing a
checkpoint's window there makes a resumed run write the same rows as an uninterrupted one.
TensorBoard scalars (``RUN_DIR/tensorboard/``) and the PNGs in ``RUN_DIR/plots/`` are views
of the same numbers; the plots are drawn from the file, so after ``medrl resume`` they cover
the whole run. The closing summary also counts the reward failures that
``rewards.on_error: skip_sample`` dropped (``RUN_DIR/reward_failures.jsonl``).

Metric names the views know about (the driver produces them):
``reward/mean``, ``rewards/<name>/mean`` (one per reward function), ``kl``,
``completion/length_mean`` and ``time/<phase>`` (seconds; ``time/step`` is the whole step).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from rich.console import Console
from rich.panel import Panel
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from medrl.align.checkpoint import fsync_dir
from medrl.align.records import UserError

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
PLOTS_DIR = "plots"


# ----------------------------------------------------------------------------- phase timing


class Timer:
    """Collects how long each phase of a step takes.

    >>> timer = Timer()
    >>> with timer.timed("generate"):
    ...     pass
    >>> sorted(timer.pop())
    ['time/generate']

    A phase entered twice in one step adds up; ``timer("name")`` is short for
    ``timer.timed("name")``. :meth:`metrics` returns ``{"time/<name>": seconds}``; :meth:`pop`
    returns the same and starts the next step from zero.
    """

    def __init__(self) -> None:
        self._durations: dict[str, float] = {}

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:  # a phase that raised still took its time; the error propagates
            self._durations[name] = self._durations.get(name, 0.0) + time.perf_counter() - start

    __call__ = timed

    def metrics(self) -> dict[str, float]:
        return {f"time/{name}": seconds for name, seconds in self._durations.items()}

    def pop(self) -> dict[str, float]:
        out = self.metrics()
        self._durations = {}
        return out


# ----------------------------------------------------------------------------- metrics file


def _clean(key: str, value: Any) -> float | None:
    """A metric value as a JSON number; None, NaN and inf become null (JSON has no NaN)."""
    if value is None:
        return None
    try:
        number = float(value)  # numpy and 0-d torch scalars convert here
    except (TypeError, ValueError):
        raise TypeError(f"metric {key!r}: {value!r} is not a number") from None
    return number if math.isfinite(number) else None


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every line of ``RUN_DIR/metrics.jsonl``; a torn last line (crash mid-write) is skipped."""
    return read_jsonl(Path(run_dir) / METRICS_FILE)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every row of a JSON-lines log of the run folder (metrics, prompts, completions, ...).

    A crash in the middle of an append can tear only the last line: that one is skipped with
    a warning. A bad line anywhere else means the file was damaged or edited: a UserError
    names the file and line (never its content, which may be patient text).
    """
    if not path.exists():
        return []
    rows = []
    lines = path.read_text(errors="replace").splitlines()
    last = max((n for n, line in enumerate(lines, 1) if line.strip()), default=0)
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        elif number == last and row is None:  # torn by a crash mid-append
            warnings.warn(f"{path}:{number}: dropped a partly written last line (the run "
                          "stopped while writing it)")
        else:
            raise UserError(f"{path}, line {number}: not a JSON object, so the log is damaged "
                            "(a crash can only tear the last line). Delete or repair that line, "
                            "then run the command again.")
    return rows


def truncate_metrics(run_dir: str | Path, step: int) -> int:
    """Drop lines with ``step`` greater than ``step`` (and a torn last line); return how many.

    A resumed run replays the steps after its checkpoint, so without this the file would hold
    those steps twice. The file is rewritten through a temporary file and ``os.replace``.
    """
    return truncate_jsonl(Path(run_dir) / METRICS_FILE, step)


def truncate_jsonl(path: Path, step: int) -> int:
    """:func:`truncate_metrics` for any JSON-lines log whose rows carry a ``step``."""
    if not path.exists():
        return 0
    rows = read_jsonl(path)
    kept = [row for row in rows if int(row.get("step", 0)) <= step]
    raw_lines = sum(1 for line in path.read_text().splitlines() if line.strip())
    write_jsonl_atomic(path, kept)
    return raw_lines - len(kept)


def append_durably(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Append ``rows`` to a JSON-lines log and fsync it: on disk when this returns."""
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_jsonl_atomic(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Replace ``path`` with ``rows``: a crash leaves the old file or the new one, never half.

    Written to a hidden file beside it, flushed to disk, renamed over it, the folder synced.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


# ----------------------------------------------------------------------------- the monitor


def _fmt(value: Any, spec: str, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:{spec}}{suffix}"


class Monitor:
    """Logs one step at a time to every view, and draws the plots at the end.

    ``start_step``: the step the run starts after (0 for a fresh run, the checkpoint's step
    when resuming). Lines in ``metrics.jsonl`` and ``reward_failures.jsonl`` after it are
    dropped at once, and TensorBoard is told to hide its own older events from that step on
    (``purge_step``).
    ``every``: write a row every N steps (the mean over them); ``checkpoint_every``: the run's
    checkpoint interval (0: only at the end), whose steps always get a row.
    ``console``: where the progress bar and the summary go (default: stderr).
    """

    def __init__(self, run_dir: str | Path, *, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True, plots: bool = True, progress: bool = True,
                 every: int = 1, checkpoint_every: int = 0,
                 console: Console | None = None) -> None:
        from medrl.rewards.runner import FAILURES_FILE

        if not (isinstance(every, int) and every >= 1):
            raise ValueError(f"logging: every must be a whole number >= 1, not {every!r}")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.total_steps = total_steps
        self.every, self.checkpoint_every = every, checkpoint_every
        self.plots_enabled = plots
        self.console = console or Console(stderr=True)
        self.timer = Timer()
        self.dropped_lines = truncate_metrics(self.run_dir, start_step)
        self._failures_path = self.run_dir / FAILURES_FILE
        truncate_jsonl(self._failures_path, start_step)
        self._file = open(self.run_dir / METRICS_FILE, "a")
        self._last_log = time.perf_counter()
        self._window: list[dict[str, Any]] = []  # the steps' rows since the last written row

        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_DIR),
                                         purge_step=start_step + 1 if start_step > 0 else None)

        self._progress = None
        if progress:
            self._progress = Progress(
                TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                TextColumn("reward {task.fields[reward]}  kl {task.fields[kl]}  "
                           "{task.fields[step_time]}/step"),
                console=self.console, transient=False)
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step,
                                                 reward="-", kl="-", step_time="-")
            self._progress.start()

    def restore(self, row: Mapping[str, Any] | None) -> bool:
        """Append a resumed checkpoint's own metrics row (kept in its state) when the file
        lacks it: the run stopped after the checkpoint was complete, before the row was
        written. Returns whether it was missing."""
        if not row or any(r.get("step") == row.get("step") for r in read_metrics(self.run_dir)):
            return False
        self._file.close()
        append_durably(self.run_dir / METRICS_FILE, [row])
        self._file = open(self.run_dir / METRICS_FILE, "a")
        return True

    def truncate_after(self, step: int) -> int:
        """Drop metrics.jsonl lines after ``step`` (already done for ``start_step`` at start)."""
        self._window = [row for row in self._window if row["step"] <= step]
        self._file.close()
        dropped = truncate_metrics(self.run_dir, step)
        self._file = open(self.run_dir / METRICS_FILE, "a")
        return dropped

    def timed(self, name: str):
        """``with monitor.timed("generate"):`` adds ``time/generate`` to the next :meth:`log`."""
        return self.timer.timed(name)

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any] | None:
        """Record ``metrics`` for ``step``; return the row written to metrics.jsonl (None while
        the step's logging window is still open, see ``every``).

        Phase times from :meth:`timed` are added; ``time/step`` defaults to the wall time since
        the previous call. The progress bar shows every step's own values.
        """
        now = time.perf_counter()
        values = {**self.timer.pop(), **dict(metrics)}
        values.setdefault("time/step", now - self._last_log)
        self._last_log = now
        row: dict[str, Any] = {"step": int(step)}
        for key, value in values.items():
            if key in ("step", "time"):
                raise ValueError(f"metric name {key!r} is reserved in {METRICS_FILE}")
            row[key] = _clean(key, value)
        self._window.append(row)
        if self._progress is not None:
            self._progress.update(
                self._task, completed=min(int(step), self.total_steps),
                reward=_fmt(row.get("reward/mean"), ".3f"), kl=_fmt(row.get("kl"), ".4f"),
                step_time=_fmt(row.get("time/step"), ".2f", "s"))
        closes = (step % self.every == 0 or step >= self.total_steps
                  or (self.checkpoint_every and step % self.checkpoint_every == 0))
        return self._write_window() if closes else None

    def preview(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """The row :meth:`log` would write for ``step`` with ``metrics`` if its window closed
        now (nothing recorded): what a checkpoint keeps of its step's metrics."""
        row = {"step": int(step), **{k: _clean(k, v) for k, v in metrics.items()}}
        return mean_row([*self._window, row])

    def _write_window(self) -> dict[str, Any] | None:
        """Write the open window's mean row (at its last step) to every view, on disk (fsync)
        before this returns."""
        if not self._window:
            return None
        row = mean_row(self._window)
        self._window = []
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._writer is not None:
            for key, value in row.items():
                if key not in ("step", "time") and value is not None:
                    self._writer.add_scalar(key, value, global_step=row["step"])
            self._writer.flush()
        return row

    def plot(self) -> list[Path]:
        """Draw the PNGs from metrics.jsonl; return the files written (empty if plots are off)."""
        if not self.plots_enabled:
            return []
        self._file.flush()
        return write_plots(self.run_dir)

    def close(self) -> None:
        """Write a window a stopped run left open, then close every view."""
        if not self._file.closed:
            self._write_window()
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def summary(self, text_lines: Iterable[str] = (), *,
                last_checkpoint: str | Path | None = None) -> None:
        """Print the closing panel: the caller's lines, then where everything is.

        ``last_checkpoint``: the folder to name (default: the newest complete one on disk).
        """
        from medrl.align.checkpoint import list_checkpoints

        if isinstance(text_lines, (str, os.PathLike)):
            raise TypeError("summary(text_lines) takes a list of lines; pass the checkpoint as "
                            "last_checkpoint=")
        lines = list(text_lines)
        if last_checkpoint is None:
            checkpoints = list_checkpoints(self.run_dir)
            last_checkpoint = checkpoints[-1] if checkpoints else None
        if last_checkpoint is not None:
            lines.append(f"checkpoint: {last_checkpoint}")
            lines.append(f"resume:     medrl resume {self.run_dir}")
        else:
            lines.append("checkpoint: none saved")
        lines.append(f"metrics:    {self.run_dir / METRICS_FILE}")
        lines += self._failure_lines()
        if self.plots_enabled:
            lines.append(f"plots:      {self.run_dir / PLOTS_DIR}")
        if self._writer is not None or (self.run_dir / TENSORBOARD_DIR).is_dir():
            lines.append(f"tensorboard --logdir {self.run_dir / TENSORBOARD_DIR}")
        self.console.print(Panel("\n".join(lines), title=f"run {self.run_dir.name}",
                                 expand=False), highlight=False)


    def _failure_lines(self, first: int = 3) -> list[str]:
        """How many reward failures ``on_error: skip_sample`` dropped, and the first few."""
        failures = read_jsonl(self._failures_path)
        if not failures:
            return []
        out = [f"reward failures: {len(failures)} skipped ({self._failures_path})"]
        for f in failures[:first]:
            cause = str(f.get("cause", ""))
            cause = cause if len(cause) <= 160 else cause[:157] + "..."
            out.append(f"  step {f.get('step')}  {f.get('reward')}  sample {f.get('uid')!r}: "
                       f"{cause}")
        if len(failures) > first:
            out.append(f"  and {len(failures) - first} more")
        return out


def mean_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One metrics row for several steps' rows: the last step, and each metric's mean over
    the rows that have a number for it (null when none has)."""
    out: dict[str, Any] = {"step": rows[-1]["step"], "time": time.time()}
    keys = dict.fromkeys(k for row in rows for k in row if k != "step")
    for key in keys:
        numbers = [row[key] for row in rows if row.get(key) is not None]
        out[key] = sum(numbers) / len(numbers) if numbers else None
    return out


# ----------------------------------------------------------------------------- plots


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for row in rows:
        value = row.get(key)
        if value is not None:
            steps.append(row["step"])
            values.append(value)
    return steps, values


def _figure(title: str, ylabel: str):
    from matplotlib.figure import Figure

    # A bare Figure uses the Agg canvas and never touches pyplot's global backend state.
    fig = Figure(figsize=(7, 4), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def save_figure(fig, path: Path, **kwargs) -> None:
    """``fig`` as ``path`` (PNG), atomically: a run killed mid-plot leaves the old picture or
    the new one, never a truncated file."""
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, **kwargs)
    os.replace(tmp, path)


def _line_plot(rows, keys: dict[str, str], title: str, ylabel: str, path: Path) -> Path | None:
    """One line per ``{metric key: legend label}``; nothing written when no key has data."""
    fig, ax = _figure(title, ylabel)
    drawn = 0
    for key, label in keys.items():
        steps, values = _series(rows, key)
        if steps:
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3,
                    label=label)
            drawn += 1
    if not drawn:
        return None
    if drawn > 1:
        ax.legend(loc="best", fontsize="small")
    save_figure(fig, path)
    return path


def _time_plot(rows, path: Path) -> Path | None:
    """Stacked bars, one colour per phase; the whole step's time as a line over them."""
    phases = sorted({k for row in rows for k in row if k.startswith("time/") and k != "time/step"})
    if not phases and not any(row.get("time/step") is not None for row in rows):
        return None
    fig, ax = _figure("time per step", "seconds")
    steps = [row["step"] for row in rows]
    gaps = [b - a for a, b in zip(steps, steps[1:]) if b > a]
    width = 0.8 * (min(gaps) if gaps else 1)
    bottom = [0.0] * len(rows)
    for phase in phases:
        heights = [row.get(phase) or 0.0 for row in rows]
        ax.bar(steps, heights, width=width, bottom=bottom, label=phase[len("time/"):])
        bottom = [b + h for b, h in zip(bottom, heights)]
    total_steps, total = _series(rows, "time/step")
    if total_steps:
        ax.plot(total_steps, total, color="black", linewidth=1, label="step (total)")
    ax.legend(loc="best", fontsize="small")
    save_figure(fig, path)
    return path


def write_plots(run_dir: str | Path) -> list[Path]:
    """Reward, evaluation, KL, completion length and step-time PNGs in ``RUN_DIR/plots/``."""
    run_dir = Path(run_dir)
    rows = sorted(read_metrics(run_dir), key=lambda row: row["step"])
    out = run_dir / PLOTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    reward_keys = {"reward/mean": "combined"}
    for key in sorted({k for row in rows for k in row}):
        parts = key.split("/")
        # per reward function: "rewards/<name>/mean" (the reward runner's metric names)
        if len(parts) == 3 and parts[0] == "rewards" and parts[2] == "mean" \
                and parts[1] != "combined":
            reward_keys[key] = parts[1]
    # benchmarks during the run (launch/eval_hook.py): eval/<dataset>/acc or .../score
    eval_keys = {k: k.split("/")[1] for k in sorted({k for row in rows for k in row})
                 if k.startswith("eval/") and k.count("/") == 2
                 and k.rsplit("/", 1)[1] in ("acc", "score")}
    written = [
        _line_plot(rows, reward_keys, "reward", "mean reward", out / "reward.png"),
        _line_plot(rows, eval_keys, "benchmarks on the current weights",
                   "accuracy / score", out / "evaluation.png"),
        _line_plot(rows, {"kl": "kl"}, "KL to the reference policy", "KL", out / "kl.png"),
        _line_plot(rows, {"completion/length_mean": "mean"}, "completion length", "tokens",
                   out / "completion_length.png"),
        _time_plot(rows, out / "step_time.png"),
    ]
    return [p for p in written if p is not None]
