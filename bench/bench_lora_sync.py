"""LoRA weight sync: a push of the adapter alone vs the full model with the adapters merged.

One process, one LoRA learner (``medrl.align.learner.Learner``, ZeRO-2, the adapters nudged
off zero so that a push changes the policy) and two in-process vLLM engines on the same base
model (``medrl.rollouts.vllm_engine.VLLMEngine``): one started with LoRA, one without.
For each model size in ``--sizes`` and the one LoRA rank ``--rank``, interleaved rounds of:

- **merged**: ``Learner.state_dict_for_sync`` (every weight, LoRA deltas merged, in the
  learner's 256 MiB buckets) then ``VLLMEngine.update_weights`` of every bucket;
- **adapter**: ``Learner.adapter_for_sync`` (the adapters' tensors and config) then
  ``VLLMEngine.update_adapter`` (written as a PEFT folder, loaded under a fresh id).

Reported: bytes pushed, median seconds of the push (export + load, and each part), and the
largest difference between each engine's log-probs of fixed completions and the learner's
after the pushes. A second table times one generate call on each engine: serving an adapter
costs the LoRA matmuls on every token, the merged engine does not.

Run from the repository root: ``python -m bench.bench_lora_sync`` (``--quick`` to check it).
"""

from __future__ import annotations

import os
import sys
import time

from bench.common import (base_parser, finish_args, interleave, load_prompts, paired_ratio,
                          save_result, start_clock, table)
from bench.models import build_model, count_parameters

MODULE = "bench.bench_lora_sync"
KV_CACHE_BYTES = 64 * 2**20
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]  # learner.lora's default target modules


def parse_args():
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--sizes", default=None, help="model sizes (5m,40m; quick 5m)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank r (16)")
    parser.add_argument("--group", type=int, default=None,
                        help="completions per prompt of the generate call (8; quick 2)")
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="forced completion length of the generate call (32; quick 8)")
    args = parser.parse_args()
    args.sizes = (args.sizes or ("5m" if args.quick else "5m,40m")).split(",")
    args.group = args.group or (2 if args.quick else 8)
    args.new_tokens = args.new_tokens or (8 if args.quick else 32)
    return finish_args(args)


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def fixed_samples():
    """Three fixed prompt + completion pairs (ids >= 100: no special tokens)."""
    import torch

    from medrl.align.records import Sample

    g = torch.Generator().manual_seed(0)
    return [Sample(uid=f"s{i}", group_id=f"s{i}",
                   prompt_ids=torch.randint(100, 1000, (16 + 8 * i,), generator=g).tolist(),
                   completion_ids=torch.randint(100, 1000, (8,), generator=g).tolist())
            for i in range(3)]


def sync_gap(engine, learner, samples) -> float:
    """Largest |engine log-prob - learner log-prob| over the fixed completions."""
    import torch

    ref = learner.logprobs(learner.collate(samples), temperature=1.0)
    return max((torch.tensor(row) - ref[i, :len(row)]).abs().max().item()
               for i, row in enumerate(engine.score(samples)))


def main() -> None:
    args = parse_args()
    started, machine = start_clock()
    import torch

    from medrl.align.learner import Learner
    from medrl.rollouts.engine import SamplingParams
    from medrl.rollouts.vllm_engine import VLLMEngine

    torch.set_num_threads(args.threads)  # before vLLM starts: it freezes the setting
    prompts, source = load_prompts(2)
    sampling = SamplingParams(n=args.group, max_new_tokens=args.new_tokens,
                              min_new_tokens=args.new_tokens)
    lora = dict(r=args.rank, alpha=2.0 * args.rank, dropout=0.0, target_modules=TARGETS)
    settings = {"sizes": args.sizes, "rank": args.rank, "target_modules": TARGETS,
                "kv_cache_bytes": KV_CACHE_BYTES, "prompt_source": source,
                "group": args.group, "new_tokens": args.new_tokens}
    raw, push_rows, gen_rows = {}, [], []
    samples = fixed_samples()
    kept = []
    for size in args.sizes:
        model_dir = build_model(size)
        params = count_parameters(model_dir)
        learner = Learner(model_dir, zero_stage=2, lora=lora, lr=1e-3)
        with torch.no_grad():  # PEFT starts B at zero; a nudge makes each push a new policy
            for name, p in learner.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.02)
        engines = dict(
            merged=VLLMEngine(model_dir, kv_cache_memory_bytes=KV_CACHE_BYTES,
                              num_threads=args.threads, enforce_eager=True),
            adapter=VLLMEngine(model_dir, kv_cache_memory_bytes=KV_CACHE_BYTES,
                               num_threads=args.threads, enforce_eager=True,
                               lora_rank=args.rank))
        version = iter(range(1, 10**6))
        parts = {"merged": ([], []), "adapter": ([], [])}  # (export s, load s) per push
        sizes = {}

        def merged():
            t0 = time.perf_counter()
            buckets = list(learner.state_dict_for_sync())
            t1 = time.perf_counter()
            v = next(version)
            for i, bucket in enumerate(buckets):
                engines["merged"].update_weights(bucket, v, last_bucket=i == len(buckets) - 1)
            parts["merged"][0].append(t1 - t0)
            parts["merged"][1].append(time.perf_counter() - t1)
            sizes["merged"] = nbytes(t for b in buckets for _, t in b)

        def adapter():
            t0 = time.perf_counter()
            tensors, config = learner.adapter_for_sync()
            t1 = time.perf_counter()
            engines["adapter"].update_adapter(tensors, config, next(version))
            parts["adapter"][0].append(t1 - t0)
            parts["adapter"][1].append(time.perf_counter() - t1)
            sizes["adapter"] = nbytes(tensors.values())

        push = interleave({"merged": merged, "adapter": adapter}, repeat=args.repeat,
                          warmup=args.warmup)
        gaps = {name: sync_gap(engine, learner, samples) for name, engine in engines.items()}
        gen = interleave({name: (lambda e=engine: e.generate(prompts, sampling))
                          for name, engine in engines.items()},
                         repeat=args.repeat, warmup=args.warmup)
        raw[size] = {"params": params, "bytes": sizes, "gap": gaps,
                     "push": {k: v.to_json() for k, v in push.items()},
                     "export_s": {k: v[0][args.warmup:] for k, v in parts.items()},
                     "load_s": {k: v[1][args.warmup:] for k, v in parts.items()},
                     "generate": {k: v.to_json() for k, v in gen.items()}}
        speedup = paired_ratio(push["merged"], push["adapter"])
        for name in ("merged", "adapter"):
            export, load = (median(v[args.warmup:]) for v in parts[name])
            push_rows.append([size, f"{params / 1e6:.1f}M", name, sizes[name] / 2**20,
                              export, load, push[name].median,
                              1.0 if name == "merged" else speedup, gaps[name]])
        gen_rows.append([size, gen["merged"].median, gen["adapter"].median,
                         paired_ratio(gen["adapter"], gen["merged"])])
        # Shut down at the end only: vLLM's shutdown in this process also tears down the
        # torch.distributed group that the next size's learner joins.
        kept.append((learner, engines))

    tables = [
        table(f"One weight push, LoRA rank {args.rank} on {', '.join(TARGETS)}: the full model "
              "with the adapters merged vs the adapter alone (vLLM engine in this process)",
              ["model", "params", "push", "MB", "export s", "load s", "median s",
               "x faster", "max diff vs learner"], push_rows,
              ["export: the learner's state_dict_for_sync (buckets of 256 MiB) or "
               "adapter_for_sync; load: update_weights of every bucket, or update_adapter "
               "(PEFT folder written, loaded under a fresh id, the previous one removed)",
               "x faster: median over rounds of merged time / adapter time",
               "max diff vs learner: the largest |engine - learner| log-prob of 3 fixed "
               "completions after the last push",
               "fp32; both engines with enforce_eager=True"]),
        table(f"Generation with the adapter served vs merged weights: one call of 2 prompts x "
              f"{args.group} completions x {args.new_tokens} forced new tokens",
              ["model", "merged engine s", "adapter engine s", "adapter / merged"], gen_rows,
              [f"prompts: {source}", "adapter / merged: median over rounds"]),
    ]
    for _, engines in kept:
        for engine in engines.values():
            engine.shutdown()
    save_result("lora_sync", module=MODULE, args=args, machine=machine, settings=settings,
                tables=tables, raw=raw, started=started)
    print(f"total {time.time() - started:.0f} s")
    sys.stdout.flush()
    os._exit(0)  # vLLM's in-process engine can leave non-daemon threads behind


if __name__ == "__main__":
    main()
