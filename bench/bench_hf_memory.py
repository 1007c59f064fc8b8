"""Peak memory of Hugging Face generation: stored ``output_scores`` vs the engine's drawn log-probs.

The same model, prompts and forced completion length (``min_new_tokens = max_new_tokens``),
two ways to get each sampled token's log-prob:

- ``scores``: plain transformers, as a user writes it: ``model.generate`` with
  ``do_sample=True`` (temperature 1, top-k 0, top-p 1), ``output_scores=True`` and
  ``return_dict_in_generate=True``, then ``torch.log_softmax(step.float(), -1).gather(...)``
  over the tuple ``out.scores``. ``generate`` keeps every step's float32 ``[rows, vocab]``
  scores until it returns: rows x new tokens x vocab x 4 bytes.
- ``engine``: ``medrl.rollouts.hf_engine.HFEngine.generate`` with ``SamplingParams(
  max_new_tokens=N, min_new_tokens=N, n=G)``; its last logits processor keeps only the
  current step's scores and, once the next token is drawn, that token's log-prob.

Both encode the prompts with ``medrl.align.encode.encode_batch`` (chat template, left
padding; one row per completion, prompt-major) and draw under the same seed, so they sample
the same tokens; the table says whether they did. Wall time per call: median of interleaved
rounds in this process. Peak RSS: ``--rss-runs`` fresh processes per contender (median and
range: the output_scores way's peak varies between processes), each ``--rss-of NAME``, run
automatically by ``bench.common.peak_rss_per_contender``; each imports the same libraries,
loads its model, resets the peak (``VmHWM``) there, reads the peak above that baseline after
a call with one new token (the prefill alone), then after the full calls.
Run from the repository root: ``python -m bench.bench_hf_memory`` (``--quick`` to check it).
"""

from __future__ import annotations

import gc
import json
import statistics

from bench.common import (base_parser, current_rss_mb, finish_args, interleave, load_prompts,
                          paired_ratio, peak_rss_mb, peak_rss_per_contender, save_result, start_run,
                          table)
from bench.models import build_model, count_parameters

MODULE = "bench.bench_hf_memory"
SEED = 0  # every call of both contenders draws under this seed: the same work each time
CONTENDERS = {
    "scores": "generate with output_scores (log-probs from out.scores)",
    "engine": "HFEngine.generate (drawn log-probs, one step's scores held)",
}
MIB = 2**20


def reset_peak_rss() -> bool:
    """Set this process's peak RSS (``VmHWM``) back to its current RSS, so that a later
    :func:`peak_rss_mb` measures only what follows (writes ``5`` to /proc/self/clear_refs,
    Linux >= 4.0). Returns False where the kernel refuses: the peak then includes the past."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def parse_args():
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=None, help="MedQA prompts (2; quick 1)")
    parser.add_argument("--group", type=int, default=None,
                        help="completions per prompt, G (8; quick 4)")
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="forced completion length (512; quick 32)")
    parser.add_argument("--rss-calls", type=int, default=1,
                        help="full calls each peak-RSS process makes")
    parser.add_argument("--rss-runs", type=int, default=None,
                        help="peak-RSS processes per contender (3; quick 1): the peak of the "
                             "output_scores way varies from process to process")
    parser.add_argument("--rss-of", choices=list(CONTENDERS), default=None,
                        help="(internal) measure the peak RSS of one contender and exit")
    args = parser.parse_args()
    args.prompts = args.prompts or (1 if args.quick else 2)
    args.group = args.group or (4 if args.quick else 8)
    args.rss_runs = args.rss_runs or (1 if args.quick else 3)
    args.new_tokens = args.new_tokens or (32 if args.quick else 512)
    # A full call takes tens of seconds here: 3 rounds are "a few" (the figure that matters,
    # the peak memory, does not depend on the round count).
    if args.repeat is None:
        args.repeat = 3
    # The first call of each contender checks that both draw the same tokens: a warm-up call.
    args.warmup = max(args.warmup, 1)
    return finish_args(args)


# --- the contenders -----------------------------------------------------------------------------


class ScoresBaseline:
    """Log-probs the plain transformers way: ask ``generate`` for ``out.scores``, read them after.

    ``__call__(new_tokens)`` -> (completion ids ``[rows, new_tokens]``, log-probs
    ``[rows, new_tokens]`` float32), rows = prompts x ``group``.
    """

    def __init__(self, model_dir, prompts, group: int):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from medrl.align.encode import encode_batch

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.inputs = encode_batch(tokenizer, [p for p in prompts for _ in range(group)]).inputs

    def __call__(self, new_tokens: int):
        import torch
        from transformers import GenerationConfig

        defaults = self.model.generation_config
        config = GenerationConfig(
            do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
            max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            eos_token_id=defaults.eos_token_id, pad_token_id=defaults.pad_token_id,
            output_scores=True, return_dict_in_generate=True)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(SEED)
            out = self.model.generate(**self.inputs, generation_config=config)
            new = out.sequences[:, self.inputs["input_ids"].shape[1]:]
            logprobs = torch.stack(
                [torch.log_softmax(step.float(), -1).gather(-1, new[:, i, None]).squeeze(-1)
                 for i, step in enumerate(out.scores)], dim=1)
        return new, logprobs


class EngineContender:
    """``HFEngine.generate`` on the same prompts; same return as :class:`ScoresBaseline`."""

    def __init__(self, model_dir, prompts, group: int):
        from medrl.rollouts.hf_engine import HFEngine

        self.engine = HFEngine(model_dir, dtype="float32")
        self.prompts, self.group = prompts, group

    def __call__(self, new_tokens: int):
        import torch

        from medrl.rollouts.engine import SamplingParams

        sampling = SamplingParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  n=self.group, seed=SEED)
        samples = self.engine.generate(self.prompts, sampling)
        return (torch.tensor([s.completion_ids for s in samples]),
                torch.tensor([s.rollout_logprobs for s in samples]))


def build(name: str, model_dir, prompts, group: int):
    return (ScoresBaseline if name == "scores" else EngineContender)(model_dir, prompts, group)


# --- peak memory, in a fresh process ------------------------------------------------------------


def rss_child(args) -> None:
    """The ``--rss-of NAME`` side: baseline after imports + model load, then a one-token call
    (the prefill alone: its peak) and ``--rss-calls`` full calls (the peak of everything after
    the baseline); one JSON line on stdout."""
    import torch

    torch.set_num_threads(args.threads)
    # Both contenders' processes import the same libraries before the baseline.
    import transformers

    import medrl.rollouts.hf_engine

    del transformers, medrl.rollouts.hf_engine
    model_dir = build_model(args.size)
    prompts, _ = load_prompts(args.prompts)
    run = build(args.rss_of, model_dir, prompts, args.group)
    gc.collect()
    reset = reset_peak_rss()
    baseline = current_rss_mb()
    run(1)
    prefill_peak = peak_rss_mb()
    for _ in range(args.rss_calls):
        run(args.new_tokens)
    print(json.dumps({"peak_rss_mb": peak_rss_mb(), "before_build_mb": baseline,
                      "prefill_peak_rss_mb": prefill_peak, "peak_reset": reset}))


# --- main ---------------------------------------------------------------------------------------


def same_draws(outputs: dict, rows: int, steps: int) -> tuple[bool, float | None]:
    """Check the forced length of both contenders' first call; (same tokens drawn, largest
    |log-prob difference| where they are the same)."""
    import torch

    for name, (ids, _) in outputs.items():
        if tuple(ids.shape) != (rows, steps):
            raise SystemExit(f"{name}: {tuple(ids.shape)} completion tokens, expected "
                             f"{(rows, steps)} (forced length)")
    (ids_a, lp_a), (ids_b, lp_b) = outputs["scores"], outputs["engine"]
    if not torch.equal(ids_a, ids_b):
        return False, None
    return True, float((lp_a - lp_b).abs().max())


def result_table(args, *, params, vocab, prompt_columns, kv_bytes, held, memory, timing,
                 same, max_diff, source) -> dict:
    rows, steps = args.prompts * args.group, args.new_tokens
    growth = {n: [m["peak_rss_mb"] - m["before_build_mb"] for m in runs]
              for n, runs in memory.items()}
    prefill = {n: [m["prefill_peak_rss_mb"] - m["before_build_mb"] for m in runs]
               for n, runs in memory.items()}
    median = {n: statistics.median(g) for n, g in growth.items()}
    out = [[label, median[name], f"{min(growth[name]):.0f}-{max(growth[name]):.0f}",
            statistics.median(prefill[name]), held[name] / MIB, timing[name].median,
            paired_ratio(timing[name], timing["engine"])] for name, label in CONTENDERS.items()]
    reset = all(m["peak_reset"] for runs in memory.values() for m in runs)
    return table(
        f"HF generation memory, {params / 1e6:.1f}M parameters, vocabulary {vocab}: "
        f"{args.prompts} prompts x G {args.group} = {rows} rows x {steps} forced new tokens, "
        f"fp32, {args.threads} threads",
        ["contender", "peak RSS above baseline MiB", "range MiB", "1-token call (prefill) MiB",
         "scores held (arithmetic) MiB", "median s / call", "x engine time"],
        out,
        [f"prompts: {source}; longest prompt {prompt_columns} tokens (the others left-padded)",
         f"peak RSS: median (and range) over {args.rss_runs} fresh processes per contender, "
         f"each the peak (VmHWM) of a 1-token call and {args.rss_calls} full call(s) minus "
         "the baseline: the RSS once torch, transformers "
         "and medrl.rollouts.hf_engine are imported and the model is loaded, where the peak is "
         + ("reset" if reset else "NOT reset (the kernel refused: loading may set the peak)"),
         "median peak above baseline of the output_scores way minus the engine's: "
         f"{median['scores'] - median['engine']:.0f} MiB",
         f"scores held (arithmetic, not measured): output_scores keeps rows x steps x vocab x 4 "
         f"bytes = {rows} x {steps} x {vocab} x 4; the engine one step's rows x vocab x 4 plus "
         "rows x steps x 4 of log-probs",
         "KV cache at the last step (arithmetic), held by both: rows x (prompt columns + steps) "
         f"x layers x 2 x KV heads x head dim x 4 bytes = {kv_bytes / MIB:.0f} MiB",
         f"same seed, same tokens drawn by both: {same}"
         + (f"; largest |log-prob difference| {max_diff:.2e}" if max_diff is not None else ""),
         f"time: median of {args.repeat} interleaved rounds after {args.warmup} warm-up (the "
         "first: the same-tokens check); x engine time = median over rounds of contender time "
         "/ engine time (measured, not a target)"])


def main() -> None:
    args = parse_args()
    if args.rss_of:
        rss_child(args)
        return
    started, machine, model_dir = start_run(args)
    params = count_parameters(model_dir)
    prompts, source = load_prompts(args.prompts)
    runs = {name: build(name, model_dir, prompts, args.group) for name in CONTENDERS}
    config = runs["scores"].model.config
    prompt_columns = runs["scores"].inputs["input_ids"].shape[1]
    vocab, rows, steps = config.vocab_size, args.prompts * args.group, args.new_tokens

    # The first call of each is its first warm-up call, and shows that both draw the same.
    same, max_diff = same_draws({name: run(steps) for name, run in runs.items()}, rows, steps)
    timing = interleave({name: (lambda run=run: run(steps)) for name, run in runs.items()},
                        repeat=args.repeat, warmup=args.warmup - 1)
    del runs
    gc.collect()

    options = ["--size", args.size, "--prompts", str(args.prompts), "--group", str(args.group),
               "--new-tokens", str(steps), "--rss-calls", str(args.rss_calls),
               "--threads", str(args.threads)]
    # One list per contender of its processes' reports, the contenders alternating.
    memory = {name: [] for name in CONTENDERS}
    for _ in range(args.rss_runs):
        for name, report in peak_rss_per_contender(MODULE, CONTENDERS, options).items():
            memory[name].append(report)

    held = {"scores": rows * steps * vocab * 4, "engine": rows * vocab * 4 + rows * steps * 4}
    head_dim = config.hidden_size // config.num_attention_heads
    kv_bytes = (rows * (prompt_columns + steps) * config.num_hidden_layers * 2
                * config.num_key_value_heads * head_dim * 4)
    tables = [result_table(args, params=params, vocab=vocab, prompt_columns=prompt_columns,
                           kv_bytes=kv_bytes, held=held, memory=memory, timing=timing,
                           same=same, max_diff=max_diff, source=source)]
    save_result("hf_memory", module=MODULE, args=args, machine=machine,
                settings={"size": args.size, "params": params, "vocab": vocab,
                          "prompts": args.prompts, "group": args.group, "rows": rows,
                          "new_tokens": steps, "prompt_columns": prompt_columns,
                          "rss_calls": args.rss_calls, "rss_runs": args.rss_runs,
                          "prompt_source": source,
                          "scores_held_bytes": held, "kv_cache_bytes": kv_bytes,
                          "same_tokens": same, "max_logprob_diff": max_diff},
                tables=tables, raw={"timing": {k: v.to_json() for k, v in timing.items()},
                                    "memory": memory}, started=started)


if __name__ == "__main__":
    main()
