"""Soak: a long quickstart run with a rollout worker killed every K steps.

The bundled quickstart recipe (tiny Qwen2, the bundled items, one rollout worker, one
learner rank, ZeRO 0), ``--steps`` steps (default 300) with a checkpoint every ``--kill-every``
steps, run by ``medrl.launch.driver.train`` in this process. After every ``--kill-every``-th
step a per-step callback kills the rollout worker (``ray.kill``, restart allowed): Ray
restarts it, the driver gives it the last weights again and retries the batch.

Each step the callback records the wall time since the previous step and the resident set
size of this process (the driver) and of every Ray worker process of the run
(``ray::RolloutWorker``, ``ray::LearnerWorker``, ...; a restarted worker is a new process,
followed under its name). Reported:

- the prompt log against an undisturbed prompt stream: prompts lost or repeated (0 and 0
  expected), and the metrics rows (each step once);
- per process, the RSS after its warm-up (its first ``--settle`` observed steps) and at its
  end, and its slope in MiB per 100 steps (least squares over the rest; a leak shows as a
  slope that stays positive across the run);
- step time: the median of the first and of the last 50 measured steps (kill steps and the
  step after each kill left out: they carry the restart), and their ratio.

Not in ``bench.run_all``'s default set (it runs for minutes): ``python -m bench.bench_soak``
(``--quick``: 30 steps, a kill every 10).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from bench.common import REPO, base_parser, finish_args, save_result, start_clock, table

MODULE = "bench.bench_soak"


def worker_rss_mb() -> dict[str, float]:
    """RSS (MiB) of this process and of every Ray worker process, by the actor class of a
    worker and its pid (``ray::RolloutWorker pid 123``): a restarted worker is a new series."""
    import os

    import psutil

    out = {"driver": psutil.Process(os.getpid()).memory_info().rss / 2**20}
    for proc in psutil.process_iter(["cmdline"]):
        title = " ".join(proc.info["cmdline"] or [])[:80]
        if not title.startswith("ray::") or "IDLE" in title:
            continue
        try:
            out[f"{title.split()[0].split('.')[0]} pid {proc.pid}"] = \
                proc.memory_info().rss / 2**20
        except psutil.Error:  # ended between the listing and the read
            continue
    return out


def slope_per_100(steps: list[int], values: list[float]) -> float:
    """Least-squares slope of ``values`` over ``steps``, in units per 100 steps."""
    n = len(steps)
    if n < 2:
        return float("nan")
    mx, my = sum(steps) / n, sum(values) / n
    sxx = sum((x - mx) ** 2 for x in steps)
    return 100 * sum((x - mx) * (y - my) for x, y in zip(steps, values)) / sxx if sxx else 0.0


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="steps (default 300)")
    parser.add_argument("--kill-every", type=int, default=None,
                        help="kill the rollout worker after every N-th step (default 50)")
    parser.add_argument("--settle", type=int, default=20,
                        help="each process's first N observed steps, left out of its slope")
    args = finish_args(parser.parse_args())
    steps = args.steps or (30 if args.quick else 300)
    every = args.kill_every or (10 if args.quick else 50)
    started, machine = start_clock()

    import ray

    from medrl.launch.driver import train
    from medrl.launch.recipe import load_recipe
    from medrl.launch.rundir import absolute_recipe, create_run_dir
    from medrl.launch.stream import PromptStream

    out = Path(tempfile.mkdtemp(prefix="medrl-soak-"))
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", [
        "run.name=soak", f"run.output_dir={out}", f"run.max_steps={steps}",
        f"checkpoint.every={every}", "checkpoint.keep_last=1", "logging.progress=false",
        "logging.tensorboard=false", "logging.plots=false",
        f"cluster.max_restarts={steps // every + 2}"])
    recipe = absolute_recipe(recipe, REPO / "recipes")
    run_dir = create_run_dir(recipe)
    times: dict[int, float] = {}
    rss: dict[str, dict[int, float]] = defaultdict(dict)
    last = [time.perf_counter()]
    kills: list[int] = []

    def observe(step: int, c) -> None:
        now = time.perf_counter()
        times[step] = now - last[0]
        for name, value in worker_rss_mb().items():
            rss[name][step] = value
        if step % every == 0 and step < steps:
            ray.kill(c.rollouts.workers[0], no_restart=False)
            kills.append(step)
        last[0] = time.perf_counter()

    train(recipe, run_dir, callbacks=[observe])

    from medrl.launch.monitor import read_jsonl

    stream = PromptStream.from_recipe(recipe.data, seed=recipe.run.seed)
    stream.load_media = False
    want = [sorted(s.uid for s in stream.take(recipe.rollout.prompts_per_step))
            for _ in range(steps)]
    got = [row["uids"] for row in read_jsonl(run_dir / "prompts.jsonl")]
    metric_steps = [row["step"] for row in read_jsonl(run_dir / "metrics.jsonl")]
    flat_want = [u for step in want for u in step]
    flat_got = [u for step in got for u in step]
    lost = sum(max(0, flat_want.count(u) - flat_got.count(u)) for u in set(flat_want))
    repeated = sum(max(0, flat_got.count(u) - flat_want.count(u)) for u in set(flat_got))
    record = table(f"The record after {steps} steps and {len(kills)} rollout-worker kills",
                   ["check", "value"],
                   [["steps logged in prompts.jsonl", len(got)],
                    ["prompts lost", lost], ["prompts repeated", repeated],
                    ["prompt log equals the undisturbed stream", got == want],
                    ["metrics rows, each step once", metric_steps == list(range(1, steps + 1))]])

    rows = []
    for name, series in sorted(rss.items()):
        settled = sorted(series)[args.settle:]  # each process's own warm-up left out
        if len(settled) < 2:
            continue
        rows.append([name, f"{min(series)}-{max(series)}", round(series[settled[0]], 1),
                     round(series[settled[-1]], 1),
                     round(slope_per_100(settled, [series[s] for s in settled]), 2)])
    memory = table("Resident memory per process (MiB)",
                   ["process", "steps", "RSS after warm-up", "RSS at its end",
                    "slope (MiB / 100 steps)"], rows,
                   notes=[f"each process's first {args.settle} observed steps are its warm-up, "
                          "left out; slope: least squares over the rest. A restarted worker is "
                          "a new process (new pid) and its own series"])

    disturbed = {k for s in kills for k in (s, s + 1)}
    clean = [s for s in sorted(times) if s not in disturbed and s > 1]
    first, final = clean[:50], clean[-50:]
    first_s = statistics.median(times[s] for s in first)
    final_s = statistics.median(times[s] for s in final)
    timing = table("Step time (s)", ["first 50 steps", "last 50 steps", "last / first",
                                     "kill steps (median)"],
                   [[round(first_s, 3), round(final_s, 3), round(final_s / first_s, 3),
                     round(statistics.median(times[s] for s in kills), 3) if kills else None]],
                   notes=["kill steps and the step after each are left out of the first two "
                          "columns; step 1 (start-up) too"])
    save_result("soak", module=MODULE, args=args, machine=machine,
                settings={"steps": steps, "kill_every": every, "settle": args.settle,
                          "kills": kills},
                tables=[record, memory, timing],
                raw={"step_seconds": times, "rss_mb": rss}, started=started)


if __name__ == "__main__":
    main()
