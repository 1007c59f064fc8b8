"""Rollout engines side by side: generation speed, the Ray worker's overhead, weight updates.

One process, one model (``bench.models.build_model``), the same MedQA prompts and forced
completion lengths (``min_new_tokens == max_new_tokens``) for every contender:

1. throughput: vLLM (in-process, ``medrl.rollouts.vllm_engine.VLLMEngine``) vs Hugging Face
   ``generate`` (``medrl.rollouts.hf_engine.HFEngine``): completion tokens per second;
2. the Ray worker: the HF engine used directly vs the same engine inside a one-worker
   ``RolloutGroup`` actor: the overhead ratio (the samples are pickled both ways);
3. weight updates: ``update_weights`` of each engine and the object-store path
   (``ray.put`` of the buckets + ``RolloutGroup.update_weights_from_refs``) against a plain
   ``Tensor.copy_`` of the same tensors into preallocated ones (the memory-bandwidth limit),
   for each model size in ``--sizes``.

Run from the repository root: ``python -m bench.bench_rollouts`` (``--quick`` to check it).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

from bench.common import (base_parser, finish_args, interleave, load_prompts, paired_ratio,
                          save_result, start_clock, table)
from bench.models import build_model, count_parameters

MODULE = "bench.bench_rollouts"
KV_CACHE_BYTES = 256 * 2**20
BUCKET_MB = 256  # the learner's default bucket size (Learner.state_dict_for_sync)


def parse_args():
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=None, help="prompts per call (2)")
    parser.add_argument("--group", type=int, default=None, help="completions per prompt (8; quick 4)")
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="forced completion length (64; quick 16)")
    parser.add_argument("--overhead-tokens", type=int, default=16,
                        help="forced completion length of the Ray-overhead calls (16): the "
                             "overhead is per call, so short calls show it best")
    parser.add_argument("--sizes", default=None,
                        help="model sizes for the weight updates (5m,40m; quick 5m)")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray measurements")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="vLLM without graph compilation (faster start, slower decode)")
    args = parser.parse_args()
    args.prompts = args.prompts or 2  # one GRPO step of the other benchmarks: 2 prompts x G=8
    args.group = args.group or (4 if args.quick else 8)
    args.new_tokens = args.new_tokens or (16 if args.quick else 64)
    args.sizes = (args.sizes or ("5m" if args.quick else "5m,40m")).split(",")
    return finish_args(args)


def bucketed(named, bucket_mb: float = BUCKET_MB):
    """``[(name, tensor)]`` split into buckets of about ``bucket_mb`` MiB, as the learner
    streams them."""
    buckets, current, size = [], [], 0
    for name, tensor in named:
        current.append((name, tensor))
        size += tensor.numel() * tensor.element_size()
        if size >= bucket_mb * 2**20:
            buckets.append(current)
            current, size = [], 0
    if current:
        buckets.append(current)
    return buckets


def state_dict_for_push(model_dir):
    """The policy's parameters (tied weights once, as the learner pushes them), cloned and
    nudged so that an update really changes the engine's weights."""
    import torch

    from medrl.align.models import load_model

    model = load_model(model_dir)
    with torch.no_grad():
        named = [(n, p.detach().clone().mul_(1.001)) for n, p in model.named_parameters()]
    del model
    return named


def main() -> None:
    args = parse_args()
    started, machine = start_clock()
    import torch

    from medrl.rollouts.engine import SamplingParams
    from medrl.rollouts.hf_engine import HFEngine
    from medrl.rollouts.vllm_engine import VLLMEngine

    torch.set_num_threads(args.threads)  # before vLLM starts: it freezes the setting
    prompts, source = load_prompts(args.prompts)
    sampling = SamplingParams(temperature=1.0, top_p=1.0, top_k=-1, n=args.group,
                              max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    rows = args.prompts * args.group
    new_tokens = rows * args.new_tokens
    ray_mod = None
    if not args.no_ray:
        import ray as ray_mod

        ray_mod.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
                                               "TOKENIZERS_PARALLELISM": "false"}})
    from medrl.rollouts.worker import RolloutGroup

    tables, raw = [], {"startup_s": {}, "throughput": {}, "ray_overhead": {}, "weights": {}}
    settings = {"prompts": args.prompts, "group": args.group, "new_tokens": args.new_tokens,
                "prompt_source": source, "sizes": args.sizes, "enforce_eager": args.enforce_eager,
                "kv_cache_bytes": KV_CACHE_BYTES, "bucket_mb": BUCKET_MB,
                "overhead_tokens": args.overhead_tokens}
    weight_rows, overhead_rows = [], []
    for size_index, size in enumerate(args.sizes):
        model_dir = build_model(size)
        params = count_parameters(model_dir)
        engine_kwargs = {"num_threads": args.threads}
        # Larger sizes serve only the weight path: skip vLLM's graph compilation there.
        vllm_kwargs = dict(engine_kwargs, kv_cache_memory_bytes=KV_CACHE_BYTES,
                           enforce_eager=args.enforce_eager or size_index > 0)
        t0 = time.perf_counter()
        hf = HFEngine(model_dir, **engine_kwargs)
        t1 = time.perf_counter()
        vllm = VLLMEngine(model_dir, **vllm_kwargs)
        t2 = time.perf_counter()
        raw["startup_s"][size] = {"hf": t1 - t0, "vllm": t2 - t1}
        engines = {"hf": hf, "vllm": vllm}
        print(f"\n[{size}: {params / 1e6:.2f}M parameters] engines up: HF {t1 - t0:.1f} s, "
              f"vLLM {t2 - t1:.1f} s; torch threads {torch.get_num_threads()}", flush=True)

        if size_index == 0:  # generation: the comparison model only
            gen = interleave({name: (lambda e=e: e.generate(prompts, sampling))
                              for name, e in engines.items()},
                             repeat=args.repeat, warmup=args.warmup)
            check = vllm.generate(prompts, sampling)
            if any(len(s.completion_ids) != args.new_tokens for s in check):
                raise RuntimeError("vLLM did not produce the forced completion length")
            raw["throughput"] = {k: v.to_json() for k, v in gen.items()}
            ratio = paired_ratio(gen["hf"], gen["vllm"])
            tables.append(table(
                f"Generation, {params / 1e6:.1f}M-parameter model, {args.prompts} prompts x "
                f"{args.group} completions x {args.new_tokens} forced new tokens "
                f"({rows} completions, {new_tokens} tokens), {args.threads} threads",
                ["engine", "start-up s", "median s / call", "tokens/s", "speed vs HF"],
                [["HF generate", raw["startup_s"][size]["hf"], gen["hf"].median,
                  new_tokens / gen["hf"].median, 1.0],
                 ["vLLM (in-process)", raw["startup_s"][size]["vllm"], gen["vllm"].median,
                  new_tokens / gen["vllm"].median, ratio]],
                [f"prompts: {source}; prompt lengths "
                 f"{min(len(s.prompt_ids) for s in check)}-"
                 f"{max(len(s.prompt_ids) for s in check)} tokens",
                 "speed vs HF: median over rounds of HF time / vLLM time; vLLM's start-up "
                 "includes importing vllm and compiling its graphs",
                 f"vLLM enforce_eager={args.enforce_eager}"]))

        named = state_dict_for_push(model_dir)
        megabytes = sum(t.numel() * t.element_size() for _, t in named) / 2**20
        buckets = bucketed(named)
        targets = [torch.empty_like(t) for _, t in named]

        def memcpy():
            with torch.no_grad():
                for dst, (_, src) in zip(targets, named):
                    dst.copy_(src)

        version = iter(range(1, 10**6))
        upd = interleave({
            "memcpy": memcpy,
            "hf": lambda: [hf.update_weights(b, v, last_bucket=i == len(buckets) - 1)
                           for v in [next(version)] for i, b in enumerate(buckets)],
            "vllm": lambda: [vllm.update_weights(b, v, last_bucket=i == len(buckets) - 1)
                             for v in [next(version)] for i, b in enumerate(buckets)],
        }, repeat=args.repeat, warmup=args.warmup)
        raw["weights"][size] = {"mb": megabytes, "params": params, "buckets": len(buckets),
                                "direct": {k: v.to_json() for k, v in upd.items()}}
        weight_rows += [[size, megabytes, "plain copy_ (limit)", upd["memcpy"].median,
                         megabytes / upd["memcpy"].median, 1.0],
                        [size, megabytes, "HF engine update_weights", upd["hf"].median,
                         megabytes / upd["hf"].median, paired_ratio(upd["hf"], upd["memcpy"])],
                        [size, megabytes, "vLLM engine update_weights", upd["vllm"].median,
                         megabytes / upd["vllm"].median,
                         paired_ratio(upd["vllm"], upd["memcpy"])]]

        if ray_mod is not None:
            for backend, engine in engines.items():
                # The vLLM actor serves the weight path only: no graph compilation (~30 s).
                kwargs = dict(vllm_kwargs, enforce_eager=True) if backend == "vllm" \
                    else engine_kwargs
                t0 = time.perf_counter()
                group = RolloutGroup(1, backend, str(model_dir), kwargs,
                                     num_cpus_per_worker=args.threads, max_restarts=0)
                raw["startup_s"][size][f"ray_{backend}"] = time.perf_counter() - t0
                if size_index == 0 and backend == "hf":
                    # The overhead is the hop and the pickling of prompts and samples, the
                    # same for either engine: measured once, around the HF engine.
                    short = dataclasses.replace(sampling, max_new_tokens=args.overhead_tokens,
                                                min_new_tokens=args.overhead_tokens)
                    over = interleave({"direct": lambda e=engine: e.generate(prompts, short),
                                       "ray": lambda g=group: g.generate(prompts, short)},
                                      repeat=args.repeat, warmup=args.warmup)
                    raw["ray_overhead"][backend] = {k: v.to_json() for k, v in over.items()}
                    overhead_rows.append([backend, over["direct"].median, over["ray"].median,
                                          paired_ratio(over["ray"], over["direct"])])
                put_s, push_s = [], []

                def push(g=group):
                    v = next(version)
                    s0 = time.perf_counter()
                    refs = [ray_mod.put(b) for b in buckets]
                    s1 = time.perf_counter()
                    g.update_weights_from_refs(refs, v)
                    s2 = time.perf_counter()
                    put_s.append(s1 - s0)
                    push_s.append(s2 - s1)

                timing = interleave({"object store": push, "memcpy": memcpy},
                                    repeat=args.repeat, warmup=args.warmup)
                put_med = sorted(put_s[args.warmup:])[len(put_s[args.warmup:]) // 2]
                push_med = sorted(push_s[args.warmup:])[len(push_s[args.warmup:]) // 2]
                raw["weights"][size][f"ray_{backend}"] = {
                    "total": timing["object store"].to_json(), "put_s": put_s[args.warmup:],
                    "update_from_refs_s": push_s[args.warmup:], "memcpy": timing["memcpy"].to_json()}
                weight_rows.append([size, megabytes,
                                    f"Ray {backend}: put {put_med:.3f} s + update {push_med:.3f} s",
                                    timing["object store"].median,
                                    megabytes / timing["object store"].median,
                                    paired_ratio(timing["object store"], timing["memcpy"])])
                group.shutdown()
        vllm.shutdown()  # the next size rebinds the other names and frees their memory

    if overhead_rows:
        tables.append(table(
            f"Ray worker overhead: the same generate call ({args.prompts} prompts x "
            f"{args.group} completions x {args.overhead_tokens} forced new tokens), engine in "
            f"this process vs a one-worker RolloutGroup actor ({args.threads} threads each)",
            ["engine", "direct s", "via Ray s", "Ray / direct"], overhead_rows,
            ["Ray / direct: median over rounds; includes pickling prompts and samples (the "
             "same for either engine)",
             "actor start-up (s): " + ", ".join(
                 f"{k.removeprefix('ray_').replace('vllm', 'vllm (eager)')} {v:.1f}" for k, v in raw["startup_s"][args.sizes[0]].items()
                 if k.startswith("ray_"))]))
    tables.append(table(
        "Weight update: one push of the whole state dict (fp32) vs a plain copy_ of the same "
        "tensors into preallocated ones",
        ["model", "MB", "path", "median s", "MB/s", "x copy_ time"], weight_rows,
        [f"buckets of {BUCKET_MB} MiB as the learner streams them; the Ray rows include "
         "ray.put in the driver and ray.get + load in the actor",
         "x copy_ time: median over rounds of path time / copy_ time",
         "vLLM engines in Ray actors, and of the sizes after the first, with "
         "enforce_eager=True (the weight path is the same)"]))
    if ray_mod is not None:
        ray_mod.shutdown()
    save_result("rollouts", module=MODULE, args=args, machine=machine, settings=settings,
                tables=tables, raw=raw, started=started)
    print(f"total {time.time() - started:.0f} s")
    sys.stdout.flush()
    os._exit(0)  # vLLM's in-process engine can leave non-daemon threads behind


if __name__ == "__main__":
    main()
