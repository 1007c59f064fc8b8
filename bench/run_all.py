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
    # LoRA weight push: the adapter alone vs the merged full model (bytes, seconds)
    ("lora_sync", "bench.bench_lora_sync", []),
    ("learner", "bench.bench_learner", []),
    # loss variants vs GRPO; token-budget vs fixed micro-batches on unequal lengths
    ("variants", "bench.bench_variants", []),
    # rubric reward vs a plain forward of its reward model; cost per step as G and criteria grow
    ("rubric", "bench.bench_rubric", []),
    ("repair", "bench.bench_repair", []),  # Difference Feedback: alignment, repair path per step
    ("ccr", "bench.bench_ccr", []),  # CCR: the counterfactual reward vs one learner forward
    # the reward_model stage's Bradley-Terry step vs raw torch on the same pairs
    ("reward_model", "bench.bench_reward_model", []),
    # medrl eval: MedQA items/s, log-likelihood and generation, HF vs vLLM vs a plain forward
    ("eval", "bench.bench_eval", []),
    ("qat", "bench.bench_qat", []),  # fake-quantised (HiF8 / E4M3) step vs full precision; quantiser alone
    # medrl's driver vs TRL's GRPOTrainer and the raw loop (interleaved in its process); scaling; memory
    ("e2e", "bench.bench_e2e", []),
]
# Only with --only: TRL vs raw alone (bench_e2e measures the same pair in its run), and
# the long memory benchmark.
# hf_memory: peak memory of HF generation, generate's stored output_scores vs HFEngine's drawn
# log-probs (about 13 minutes on a 2-core machine: over the suite's budget on its own).
EXTRA: list[tuple[str, str, list[str]]] = [("trl", "bench.bench_trl", []),
                                           ("hf_memory", "bench.bench_hf_memory", [])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke settings for every benchmark")
    parser.add_argument("--only", default=None, help="comma-separated benchmark names")
    parser.add_argument("--no-report", action="store_true", help="do not touch BENCHMARKS.md")
    args = parser.parse_args()
    known = [name for name, _, _ in BENCHMARKS + EXTRA]
    chosen = args.only.split(",") if args.only else [name for name, _, _ in BENCHMARKS]
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(known)}")

    started = time.perf_counter()
    walls, failed = {}, []
    for name, module, extra in BENCHMARKS + EXTRA:
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
    if total > BUDGET_S:
        print(f"warning: the suite took longer than its {BUDGET_S} s budget")
    if not args.no_report:
        from bench.report import main as report

        report()
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
