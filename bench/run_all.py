"""Run every benchmark, each in its own process, then refresh the tables in BENCHMARKS.md.

``make bench`` runs ``python -m bench.run_all`` from the repository root. Each benchmark is
a separate process (vLLM fixes the torch thread count of its process, and peak memory is per
process); its output streams through, its JSON lands in ``bench/results/``, and
``bench.report`` renders those files into ``BENCHMARKS.md``. The whole suite is sized to
finish within :data:`BUDGET_S` on a quiet 2-core machine.

Options: ``--quick`` (smoke settings, passed to every benchmark), ``--only NAME[,NAME]``,
``--no-report`` (leave BENCHMARKS.md alone).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from bench.common import REPO

BUDGET_S = 15 * 60

# (name, module, extra arguments): run in this order.
BENCHMARKS: list[tuple[str, str, list[str]]] = [
    ("rollouts", "bench.bench_rollouts", []),
    ("trl", "bench.bench_trl", []),  # TRL's GRPOTrainer and the raw loop, interleaved
    ("learner", "bench.bench_learner", []),
]

# ---------------------------------------------------------------------------------------------
# PLANNED (not measured yet; they need the GRPO driver loop, `medrl run`):
#   - "e2e": `medrl run` vs TRL (bench.bench_trl) on the same GRPO work, sync and async
#     modes, HF and vLLM rollout engines: seconds per step, samples/s, tokens/s, x TRL;
#   - "scaling": G = 4 / 8 / 16, completion length 32 / 64 / 128, 1 vs 2 rollout workers;
#   - "memory": peak RSS of the driver, learner and rollout processes.
# Each becomes a bench/bench_<name>.py built from bench.common (build_model, load_prompts,
# letter_reward, interleave / measure, table, save_result, machine_info), an entry in
# BENCHMARKS above, and a `<!-- results:<name> -->` block in BENCHMARKS.md.
PLANNED = ["e2e", "scaling", "memory"]
# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke settings for every benchmark")
    parser.add_argument("--only", default=None, help="comma-separated benchmark names")
    parser.add_argument("--no-report", action="store_true", help="do not touch BENCHMARKS.md")
    args = parser.parse_args()
    known = [name for name, _, _ in BENCHMARKS]
    chosen = args.only.split(",") if args.only else known
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(known)}")

    started = time.perf_counter()
    walls, failed = {}, []
    for name, module, extra in BENCHMARKS:
        if name not in chosen:
            continue
        cmd = [sys.executable, "-m", module, *extra, *(["--quick"] if args.quick else [])]
        print(f"\n=== {name}: {' '.join(['python', '-m', module, *cmd[3:]])}", flush=True)
        t0 = time.perf_counter()
        code = subprocess.run(cmd, cwd=REPO).returncode
        walls[name] = time.perf_counter() - t0
        if code != 0:
            failed.append(f"{name} (exit code {code})")
    total = time.perf_counter() - started

    print("\n=== summary")
    for name, wall in walls.items():
        print(f"{name:10s} {wall:6.0f} s")
    print(f"{'total':10s} {total:6.0f} s (budget {BUDGET_S} s)")
    print(f"planned, not measured yet: {', '.join(PLANNED)}")
    if total > BUDGET_S:
        print(f"warning: the suite took longer than its {BUDGET_S} s budget")
    if not args.no_report:
        from bench.report import main as report

        report()
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
