"""medrl end to end: the GRPO driver vs TRL's GRPOTrainer and the raw limit; scaling; memory.

The work is ``bench.bench_trl``'s: the 5M model (``bench.models.build_model``), the first
MedQA test prompts in file order, 2 prompts per step, G=8 completions of a forced 64 new
tokens, the letter reward (``bench.common.letter_reward``, as the plugin
``bench/e2e_reward.py:bench_letter``), the token-mean clipped loss without KL, AdamW (lr 1e-5,
no weight decay, constant schedule), gradient clipping at 1.0.

medrl runs through its own driver in this process (``medrl.launch.driver.train`` on a recipe
read by ``load_recipe``; one rollout worker and one learner rank as Ray actors, ZeRO stage 0,
micro-batch 16, old log-probs taken from the rollout as in a single on-policy epoch), in
four configurations: synchronous and one-step off-policy (``algorithm.async``), each with the
Hugging Face and the vLLM rollout engine. A per-step callback timestamps every step; the
seconds of a step are the interval between two timestamps (everything the driver does,
logging included), minus the final checkpoint on the last step. Start-up (from ``train()``
to the first step) is reported separately.

Order in the one process: medrl synchronous HF first (so that this process's peak memory is
a driver's, before TRL has run in it), then TRL interleaved with the raw loop
(``bench.bench_trl.measure_trl_and_raw``), then the other medrl configurations, then the
scaling points (medrl only, synchronous). The medrl / TRL ratios compare medians of runs
made one after the other (not interleaved step by step): they need a quiet machine.

Run from the repository root: ``python -m bench.bench_e2e`` (``--quick`` to check it).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.bench_raw import LEARNING_RATE, MAX_GRAD_NORM, add_grpo_args, finish_grpo_args
from bench.common import (MEDQA_TEST, QUICKSTART_DATA, Timing, base_parser, load_prompts,
                          peak_rss_mb, save_result, start_run, table)
from bench.models import count_parameters

MODULE = "bench.bench_e2e"
REWARD_PLUGIN = Path(__file__).resolve().with_name("e2e_reward.py")

# (label, rollout backend, one-step off-policy); the first one runs before TRL
CONFIGS = [("sync, HF", "hf", False), ("sync, vLLM", "vllm", False),
           ("async, HF", "hf", True), ("async, vLLM", "vllm", True)]


# --- one medrl run ------------------------------------------------------------------------------


def base_recipe_yaml(model_dir: Path, *, group: int, prompts_per_step: int, new_tokens: int,
                     steps: int) -> dict:
    """The benchmark's recipe as a YAML mapping (overrides vary it per configuration)."""
    if MEDQA_TEST.is_file():
        data = {"path": str(MEDQA_TEST), "fields": {"id": "realidx", "answer": "answer_idx"},
                "max_samples": prompts_per_step * steps}
    else:  # the same fallback as bench.common.load_prompts (it prints the note)
        data = {"path": str(QUICKSTART_DATA), "fields": {"id": "id"}}
    return {
        "run": {"name": "e2e", "seed": 0, "stage": "grpo", "max_steps": steps},
        "model": {"policy": str(model_dir), "dtype": "float32"},
        "data": {**data, "template": "mcq", "shuffle": False},  # file order, as TRL takes them
        "rollout": {"prompts_per_step": prompts_per_step, "group_size": group,
                    "max_new_tokens": new_tokens, "min_new_tokens": new_tokens,
                    "temperature": 1.0, "top_p": 1.0, "top_k": -1},
        "rewards": {"functions": [{"name": f"{REWARD_PLUGIN}:bench_letter"}]},
        "algorithm": {"loss_agg": "token_mean", "kl": {"coef": 0.0}, "clip_low": 0.2,
                      "clip_high": 0.2, "ppo_epochs": 1, "old_logprobs": "recompute"},
        "learner": {"num_workers": 1, "zero_stage": 0, "micro_batch_size": 16,
                    "optimizer": "adamw", "lr": LEARNING_RATE, "weight_decay": 0.0,
                    "lr_schedule": "constant", "max_grad_norm": MAX_GRAD_NORM},
        "checkpoint": {"every": 0},
        # TRL runs with report_to="none": no TensorBoard, plots or progress bar here either
        "logging": {"tensorboard": False, "plots": False, "progress": False},
    }


def actor_memory(handles) -> list[float]:
    """Peak RSS (VmHWM, MiB) of each actor's process, read inside the actor."""
    import ray

    def vmhwm(_self) -> float:  # defined here: pickled by value, runs in the actor
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    return ray.get([h.__ray_call__.remote(vmhwm) for h in handles])


def run_medrl(work_dir: Path, name: str, base: dict, overrides: list[str], *, warmup: int,
              repeat: int, extra_step: bool, new_tokens: int) -> dict[str, Any]:
    """One ``train()`` run; returns step times, phase medians, start-up and actor memory.

    Steps 1..warmup are warm-up; steps warmup+1 .. warmup+repeat are measured. With
    ``extra_step`` one more step runs unmeasured (async: the last step has nothing to overlap).
    """
    import yaml

    from medrl.launch.driver import train
    from medrl.launch.recipe import load_recipe
    from medrl.launch.rundir import absolute_recipe, create_run_dir

    steps = warmup + repeat + (1 if extra_step else 0)
    recipe_path = work_dir / f"{name}.yaml"
    recipe_path.write_text(yaml.safe_dump(base, sort_keys=False))
    recipe = load_recipe(recipe_path, [f"run.name={name}", f"run.output_dir={work_dir}",
                                       f"run.max_steps={steps}", *overrides])
    recipe = absolute_recipe(recipe, work_dir)
    run_dir = create_run_dir(recipe)

    stamps: dict[int, float] = {}
    memory: dict[str, list[float]] = {}

    def on_step(step: int, c) -> None:
        stamps[step] = time.perf_counter()
        if step == steps:  # peaks so far, before the actors are ended
            memory["rollout"] = actor_memory(c.rollouts.workers)
            memory["learner"] = actor_memory(c.learner.workers)

    t0 = time.perf_counter()
    train(recipe, run_dir, callbacks=[on_step])
    wall = time.perf_counter() - t0
    rows = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    lengths = sorted({r["completion/length_mean"] for r in rows.values()})
    if lengths != [new_tokens]:
        raise RuntimeError(f"medrl run {name}: completions were not of the forced length "
                           f"{new_tokens} (mean lengths {lengths})")
    measured = range(warmup + 1, warmup + repeat + 1)
    step_s = [stamps[k] - stamps[k - 1] - rows[k].get("time/checkpoint", 0.0) for k in measured]
    phases = {p: statistics.median(rows[k].get(f"time/{p}", 0.0) for k in measured)
              for p in ("generate", "learn", "sync")}
    # start-up: from train() to the start of step 1 (its duration is the timer's)
    startup = stamps[1] - t0 - rows[1]["time/step"]
    return {"timing": Timing(step_s), "phases": phases, "startup_s": startup,
            "startup_phases": {k.removeprefix("time/startup/"): v for k, v in rows[1].items()
                               if k.startswith("time/startup/")},
            "first_step_s": rows[1]["time/step"], "wall_s": wall, "memory": memory}


# --- the benchmark ------------------------------------------------------------------------------


def main() -> None:
    parser = base_parser(__doc__.split("\n")[0])
    add_grpo_args(parser)
    parser.add_argument("--scaling-repeat", type=int, default=None,
                        help="measured steps per scaling point (3; quick 1)")
    parser.add_argument("--scaling-backend", choices=["auto", "hf", "vllm"], default="auto",
                        help="engine of the scaling runs (auto: vLLM if its synchronous step "
                             "is >= 20%% faster than HF's, else HF)")
    parser.add_argument("--kv-cache-mb", type=int, default=512,
                        help="vLLM KV cache (rollout.kv_cache_memory_mb)")
    parser.add_argument("--skip-trl", action="store_true", help="medrl only (no ratios to TRL)")
    parser.add_argument("--skip-scaling", action="store_true", help="no scaling points")
    args = parser.parse_args()
    if args.quick and args.repeat is None:
        args.repeat = 2
    args = finish_grpo_args(args)
    args.warmup = max(1, args.warmup)  # step 1 carries the engines' first-call costs
    args.scaling_repeat = args.scaling_repeat or (1 if args.quick else 3)
    started, machine, model_dir = start_run(args)
    params = count_parameters(model_dir)
    P, G, T = args.prompts_per_step, args.group, args.new_tokens
    steps = args.warmup + args.repeat + 1  # the most any run takes (async: one extra)
    prompts, source = load_prompts(P * steps)
    base = base_recipe_yaml(model_dir, group=G, prompts_per_step=P, new_tokens=T, steps=steps)
    threads = args.threads
    half = max(1, threads // 2)
    # Ray CPUs are a scheduling resource: room for the largest layout below.
    cluster = [f"cluster.num_cpus={2 * threads}", "cluster.max_restarts=0"]

    def layout(backend: str, async_: bool, workers: int = 1) -> list[str]:
        # sync: rollouts and learner take turns, each gets every core; async: they run at
        # once, so they split the cores (oversubscribed OpenMP threads spin against each
        # other); several rollout workers split the cores among themselves.
        r_threads = max(1, (half if async_ else threads) // workers)
        l_threads = half if async_ else threads
        # async: the batch of the previous policy is re-weighted by pi_old / pi_rollout (the
        # forced length masks eos, so the engine's log-probs alone would be wrong in the loss)
        correction = ["algorithm.rollout_correction.mode=truncate"] if async_ else []
        return [f"rollout.backend={backend}", f"algorithm.async={str(async_).lower()}",
                *correction, f"rollout.num_workers={workers}", f"rollout.num_threads={r_threads}",
                f"cluster.rollout_cpus={r_threads}", f"cluster.learner_cpus={l_threads}",
                f"rollout.kv_cache_memory_mb={args.kv_cache_mb}", *cluster]

    from medrl.launch.cluster import start_ray, stop_ray
    from medrl.launch.recipe import Recipe

    t0 = time.perf_counter()
    start_ray(Recipe.model_validate({**base, "cluster": {"num_cpus": 2 * threads}}))
    ray_init_s = time.perf_counter() - t0

    results: dict[str, dict] = {}
    trl_m: dict | None = None
    driver_peak_mb = None
    try:
        with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
            work = Path(tmp)
            for i, (label, backend, async_) in enumerate(CONFIGS):
                print(f"\n--- medrl {label}", flush=True)
                results[label] = run_medrl(
                    work, f"e2e-{i}", base, layout(backend, async_), warmup=args.warmup,
                    repeat=args.repeat, extra_step=async_, new_tokens=T)
                print(f"    median {results[label]['timing'].median:.2f} s/step", flush=True)
                if i == 0:
                    driver_peak_mb = peak_rss_mb()  # before TRL runs in this process
                    if not args.skip_trl:
                        print("\n--- TRL GRPOTrainer interleaved with the raw loop", flush=True)
                        from bench.bench_trl import measure_trl_and_raw

                        trl_m = measure_trl_and_raw(model_dir, prompts, group=G,
                                                    prompts_per_step=P, new_tokens=T,
                                                    warmup=args.warmup, repeat=args.repeat)
                        import torch  # TRL changes the thread count: set it back

                        torch.set_num_threads(args.threads)

            # scaling: medrl only, synchronous, one engine
            hf_s, vllm_s = results["sync, HF"]["timing"], results["sync, vLLM"]["timing"]
            backend = args.scaling_backend
            if backend == "auto":
                backend = "vllm" if vllm_s.median <= 0.8 * hf_s.median else "hf"
            base_label = "sync, HF" if backend == "hf" else "sync, vLLM"
            points = ([("G", g, T, 1) for g in (G // 2, 2 * G)]
                      + [("T", G, t, 1) for t in (T // 2, 2 * T)] + [("workers", G, T, 2)])
            # vLLM compiles its graphs at every start (~30 s here): the scaling runs skip
            # that (enforce_eager), so their base point is run again the same way.
            eager = backend == "vllm" and not args.skip_scaling
            scaling = {} if eager else {("base", G, T, 1): results[base_label]}
            if eager:
                points.insert(0, ("base", G, T, 1))
            if args.skip_scaling:
                points = []
            for j, (kind, g, t, w) in enumerate(points):
                print(f"\n--- scaling {backend}: G={g}, T={t}, rollout workers={w}", flush=True)
                b = dict(base, rollout={**base["rollout"], "group_size": g,
                                        "max_new_tokens": t, "min_new_tokens": t})
                scaling[(kind, g, t, w)] = run_medrl(
                    work, f"scaling-{j}", b,
                    [*layout(backend, False, w), f"rollout.enforce_eager={str(eager).lower()}"],
                    warmup=1, repeat=args.scaling_repeat, extra_step=False, new_tokens=t)
    finally:
        stop_ray()

    tables = [e2e_table(results, trl_m, args, params, source, ray_init_s),
              scaling_table(scaling, backend, eager, args, P, G, T),
              memory_table(results, driver_peak_mb, scaling.get(("workers", G, T, 2)))]
    save_result("e2e", module=MODULE, args=args, machine=machine,
                settings={"size": args.size, "params": params, "group": G,
                          "prompts_per_step": P, "new_tokens": T, "lr": LEARNING_RATE,
                          "prompt_source": source, "scaling_backend": backend,
                          "scaling_repeat": args.scaling_repeat, "kv_cache_mb": args.kv_cache_mb},
                tables=tables,
                raw={"medrl": {k: to_json(v) for k, v in results.items()},
                     "scaling": {f"{k[0]} G={k[1]} T={k[2]} workers={k[3]}": to_json(v)
                                 for k, v in scaling.items()},
                     "trl": {k: (v.to_json() if isinstance(v, Timing) else v)
                             for k, v in (trl_m or {}).items()},
                     "ray_init_s": ray_init_s, "driver_peak_rss_mb": driver_peak_mb},
                started=started)


def to_json(r: dict) -> dict:
    return {**r, "timing": r["timing"].to_json()}


# --- tables -------------------------------------------------------------------------------------


def e2e_table(results: dict, trl_m: dict | None, args, params: int, source: str,
              ray_init_s: float) -> dict:
    P, G, T = args.prompts_per_step, args.group, args.new_tokens
    n = P * G
    trl = trl_m["trl"].median if trl_m else None
    raw = trl_m["raw"].median if trl_m else None
    rows = []
    if trl_m:
        rows.append(["TRL 1.16 GRPOTrainer (HF generate)",
                     trl_m["trl_construct_s"] + trl_m["trl_to_first_step_s"], trl, n / trl,
                     n * T / trl, 1.0, trl / raw, "-", "-", "-"])
        rows.append(["raw (hand-written)", trl_m["raw_startup_s"], raw, n / raw, n * T / raw,
                     trl / raw, 1.0, "-", "-", "-"])
    for label, r in results.items():
        s = r["timing"].median
        ph = r["phases"]
        rows.append([f"medrl, {label}", r["startup_s"], s, n / s, n * T / s,
                     trl / s if trl else "-", s / raw if raw else "-",
                     ph["generate"], ph["learn"], ph["sync"]])
    half = max(1, args.threads // 2)
    return table(
        f"GRPO end to end, {params / 1e6:.1f}M parameters, {P} prompts x G={G} x {T} forced "
        f"new tokens, {args.threads} cores, CPU",
        ["contender", "start-up s", "median s/step", "samples/s", "tokens/s", "speed vs TRL",
         "time x raw", "generate s", "learn s", "sync s"], rows,
        [f"prompts: {source}; every contender takes the same prompts in the same order",
         f"median of {args.repeat} steps after {args.warmup} warm-up; TRL and raw interleaved "
         "step by step; the medrl runs one after the other (TRL ran between the first medrl "
         "run and the others): speed vs TRL = TRL median / medrl median, time x raw = medrl "
         "median / raw median",
         "medrl: one rollout worker and one learner rank (Ray actors), ZeRO-0, micro-batch 16, "
         "old log-probs recomputed (one PPO epoch: the gradient pass's own, no extra forward); "
         "async: truncated importance weights pi_old / pi_rollout; "
         f"sync: each actor {args.threads} threads (they take "
         f"turns); async: {half} thread(s) each (they run at once); no TensorBoard, plots or "
         "progress bar (TRL: report_to none)",
         "generate / learn / sync: medians of the driver's phase timers; in async mode "
         "'generate' is the wait for the batch made during the previous step, and 'sync' "
         "includes waiting for the engine to finish the batch in flight (an actor runs its "
         "calls in order; the new weights go in between two batches)",
         f"start-up: medrl from train() to its first step (actors, engines, data; Ray was "
         f"started once before, {ray_init_s:.1f} s); TRL: building the trainer + train() to "
         "its first step",
         *[f"medrl, {label}, start-up by phase (time/startup/* of its first step): " + ", ".join(
             f"{k} {v:.2f} s" for k, v in r["startup_phases"].items())
           for label, r in results.items()]])


def scaling_table(scaling: dict, backend: str, eager: bool, args, P: int, G: int, T: int
                  ) -> dict:
    base = scaling[("base", G, T, 1)]["timing"].median
    rows = []
    for (kind, g, t, w), r in sorted(scaling.items(), key=lambda kv: (kv[0][1], kv[0][2],
                                                                      kv[0][3])):
        s = r["timing"].median
        work = (g * t) / (G * T)  # completion tokens relative to the base point
        rows.append([g, t, w, P * g * t, s, s / base, work, r["phases"]["generate"],
                     r["phases"]["learn"], r["phases"]["sync"], r["startup_s"]])
    base_note = (f"every point: median of {args.scaling_repeat} step(s) after 1 warm-up; vLLM "
                 "with enforce_eager (no graph compilation: start-up in seconds, generation "
                 "slower than in the table above)" if eager else
                 f"base point G={G}, {T} tokens, 1 worker: the end-to-end run above "
                 f"({args.repeat} measured steps); other points: median of "
                 f"{args.scaling_repeat} step(s) after 1 warm-up")
    return table(
        f"Scaling, medrl synchronous, {backend} engine, {P} prompts per step",
        ["G", "new tokens", "rollout workers", "tokens/step", "median s/step", "x base time",
         "x base tokens", "generate s", "learn s", "sync s", "start-up s"], rows,
        [base_note,
         f"2 rollout workers: one prompt each, {max(1, args.threads // 2)} thread(s) each; "
         f"1 worker: {args.threads} threads"])


def memory_table(results: dict, driver_peak_mb: float | None, two_workers: dict | None) -> dict:
    rows = [["driver (this process, after the first run; before TRL)", "sync, HF",
             driver_peak_mb]]
    for label, r in results.items():
        for role in ("learner", "rollout"):
            for i, mb in enumerate(r["memory"].get(role, [])):
                rows.append([f"{role} actor {i}", label, mb])
    if two_workers:
        for i, mb in enumerate(two_workers["memory"].get("rollout", [])):
            rows.append([f"rollout actor {i} of 2", "scaling, sync", mb])
    return table("Peak memory (VmHWM) of each process", ["process", "run", "peak RSS MiB"],
                 rows, ["actors: read inside each actor after its run's last step; the driver's "
                        "peak includes importing torch, transformers, Ray and building the "
                        "prompts"])


if __name__ == "__main__":
    main()
