"""``medrl eval`` throughput: items per second on MedQA, vLLM vs HF, log-likelihood and greedy
generation, and the log-likelihood path against a raw forward pass of the same requests.

One process, one model (``bench.models.build_model``), the first ``--items`` MedQA test
questions through ``medrl.launch.eval_data`` (the ``medqa`` preset). Contenders, in
interleaved rounds, each scoring every item with ``medrl.launch.evaluate.evaluate_dataset``
on an in-process engine (the engine a ``medrl eval`` worker holds):

- loglik on the HF engine and on the vLLM engine (4 option continuations per item);
- loglik raw: the same requests through a plain ``AutoModelForCausalLM`` forward in batches
  of 16 (full-vocabulary log-softmax of every position), what a hand-written loop does;
- generate (greedy, ``--new-tokens`` tokens, answers extracted) on each engine.

Reported: median seconds per pass over the items, items/s, and the accuracies, which must be
equal across the log-likelihood contenders (the same definition on the same weights).
Run from the repository root: ``python -m bench.bench_eval`` (``--quick`` to check it).
"""

from __future__ import annotations

from bench.common import (SHARED_DATA, base_parser, finish_args, interleave, paired_ratio,
                          save_result, start_run, table)
from bench.models import count_parameters

MODULE = "bench.bench_eval"
RAW_BATCH = 16


def parse_args():
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=None, help="MedQA items (32; quick 8)")
    parser.add_argument("--new-tokens", type=int, default=16, help="generate: new tokens")
    args = parser.parse_args()
    args.items = args.items or (8 if args.quick else 32)
    return finish_args(args)


class RawLoglik:
    """The loglik requests through a plain HF forward pass, batch by batch (right padding)."""

    def __init__(self, model_dir):
        import torch
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def score(self, samples):
        import torch

        out = []
        for i in range(0, len(samples), RAW_BATCH):
            chunk = samples[i:i + RAW_BATCH]
            rows = [s.prompt_ids + s.completion_ids for s in chunk]
            width = max(map(len, rows))
            ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
            with torch.no_grad():
                logp = torch.log_softmax(self.model(input_ids=ids, attention_mask=mask)
                                         .logits.float(), -1)
            for row, s in enumerate(chunk):
                p = len(s.prompt_ids)
                out.append([float(logp[row, p + j - 1, t]) for j, t in enumerate(s.completion_ids)])
        return out


def main() -> None:
    from transformers import AutoTokenizer

    from medrl.launch.eval_data import load_eval_dataset
    from medrl.launch.eval_scoring import metrics_of
    from medrl.launch.evaluate import EvalOptions, evaluate_dataset
    from medrl.rollouts.hf_engine import HFEngine
    from medrl.rollouts.vllm_engine import VLLMEngine

    args = parse_args()
    if not (SHARED_DATA / "medqa" / "test.jsonl").is_file():
        raise SystemExit(f"MedQA is not at {SHARED_DATA / 'medqa'}; this benchmark reads it.")
    started, machine, model_dir = start_run(args)
    params = count_parameters(model_dir)
    ds = load_eval_dataset("medqa", root=SHARED_DATA, max_samples=args.items)
    tok = AutoTokenizer.from_pretrained(model_dir)
    engines = {"hf": HFEngine(model_dir, seed=0, num_threads=args.threads),
               "vllm": VLLMEngine(model_dir, seed=0, num_threads=args.threads,
                                  max_model_len=4096)}
    engines["raw"] = RawLoglik(model_dir)
    loglik, generate = EvalOptions(mode="loglik"), EvalOptions(
        mode="generate", max_new_tokens=args.new_tokens)
    last: dict[str, list] = {}

    def run(name, engine, opts):
        def call():
            last[name], _ = evaluate_dataset(engine, tok, ds, opts, 4096)
        return call

    contenders = {"loglik_raw": run("loglik_raw", engines["raw"], loglik),
                  "loglik_hf": run("loglik_hf", engines["hf"], loglik),
                  "loglik_vllm": run("loglik_vllm", engines["vllm"], loglik),
                  "generate_hf": run("generate_hf", engines["hf"], generate),
                  "generate_vllm": run("generate_vllm", engines["vllm"], generate)}
    timing = interleave(contenders, repeat=args.repeat, warmup=args.warmup)
    labels = {"loglik_raw": "loglik, plain HF forward (full logits, batches of 16)",
              "loglik_hf": "loglik, HF engine", "loglik_vllm": "loglik, vLLM engine",
              "generate_hf": f"generate greedy {args.new_tokens} tokens, HF engine",
              "generate_vllm": f"generate greedy {args.new_tokens} tokens, vLLM engine"}
    rows = []
    for name, label in labels.items():
        mode = "loglik" if name.startswith("loglik") else "generate"
        acc = metrics_of(last[name], mode)["acc"]["value"]
        base = "loglik_raw" if mode == "loglik" else "generate_hf"
        rows.append([label, timing[name].median, args.items / timing[name].median,
                     paired_ratio(timing[name], timing[base]), acc])
    tables = [table(
        f"medrl eval on {args.items} MedQA items, {params / 1e6:.1f}M parameters, in-process "
        f"engines, {args.threads} threads",
        ["contender", "median s/pass", "items/s", "x baseline", "acc"], rows,
        ["baseline: loglik rows against the raw forward, generate rows against the HF engine",
         "loglik: 4 option continuations per item (lm-evaluation-harness's definition); the "
         "accuracies of the three loglik rows must match (same definition, same weights)",
         f"median of {args.repeat} interleaved rounds after {args.warmup} warm-up",
         "lm-evaluation-harness itself, beside medrl: bench/bench_lmeval.py (section 10b)"])]
    save_result("eval", module=MODULE, args=args, machine=machine,
                settings={"size": args.size, "params": params, "items": args.items,
                          "new_tokens": args.new_tokens},
                tables=tables, raw={"timing": {k: v.to_json() for k, v in timing.items()}},
                started=started)


if __name__ == "__main__":
    main()
