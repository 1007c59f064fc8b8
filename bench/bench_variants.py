"""Loss variants against GRPO on one batch, and token-budget against fixed micro-batches.

One process, one model (``bench.models.build_model``), MedQA prompts through the project's
loader (``bench.bench_learner.make_samples``), old log-probs set to the starting policy's:

1. ``Learner.train_step`` (ZeRO-2, one rank, gloo) with ``loss`` = grpo, gspo, gspo_token,
   cispo, and grpo with an entropy bonus, each its own learner, run in interleaved rounds on
   the same batch of fixed-length completions: median seconds per step and the paired ratio
   to grpo (they should cost the same: within 5%);
2. a batch with very unequal completion lengths (8 to 512 tokens, log-uniform): the same
   learner with ``micro_batch_size`` rows per micro-batch against
   ``max_tokens_per_micro_batch`` (a token budget), interleaved: seconds per step, the
   padding share of the forward passes (``batch/padding_share``), and peak RSS from a fresh
   process per contender (``--rss-of NAME``, run automatically).

Run from the repository root: ``python -m bench.bench_variants`` (``--quick`` to check it).
"""

from __future__ import annotations

import math

from bench.bench_learner import LEARNING_RATE, MAX_GRAD_NORM, make_samples
from bench.common import (base_parser, finish_args, interleave, paired_ratio,
                          peak_rss_per_contender, rss_child, save_result, start_run, table)
from bench.models import count_parameters

MODULE = "bench.bench_variants"
# name: learner keyword arguments beyond the shared ones
VARIANTS = {
    "grpo": {"loss": "grpo"},
    "gspo": {"loss": "gspo", "clip_low": 3e-4, "clip_high": 4e-4},
    "gspo_token": {"loss": "gspo_token", "clip_low": 3e-4, "clip_high": 4e-4},
    "cispo": {"loss": "cispo", "clip_low": 1.0, "clip_high": 0.28},
    "grpo_entropy": {"loss": "grpo", "entropy_coef": 0.01},
}
SPLITS = ("fixed", "budget")


def parse_args():
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--group", type=int, default=8, help="completions per prompt")
    parser.add_argument("--prompts-per-step", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="completion length of the variants' batch (64; quick 16)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="longest completion of the unequal batch (512; quick 64)")
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--rss-of", choices=list(SPLITS), default=None,
                        help="(internal) measure the peak RSS of one split and exit")
    args = parser.parse_args()
    args.new_tokens = args.new_tokens or (16 if args.quick else 64)
    args.max_new_tokens = args.max_new_tokens or (64 if args.quick else 512)
    return finish_args(args)


def make_learner(model_dir, **kwargs):
    from medrl.align.learner import Learner

    options = dict(zero_stage=2, micro_batch_size=10_000, optimizer="adamw", lr=LEARNING_RATE,
                   weight_decay=0.0, warmup_steps=0, lr_schedule="constant",
                   max_grad_norm=MAX_GRAD_NORM, reference="none", kl_coef=0.0,
                   loss_agg="token_mean", seed=0)
    return Learner(model_dir, **{**options, **kwargs})


def with_old_logprobs(learner, samples):
    """The batch of ``samples`` with the starting policy's log-probs as pi_old."""
    batch = learner.collate(samples)
    batch.old_logprobs = learner.logprobs(batch)
    return batch


def unequal_samples(model_dir, args):
    """The variants' samples with completions cut to log-uniform lengths in
    [8, --max-new-tokens] (fresh random ids, seeded)."""
    import torch

    args_long = type(args)(**{**vars(args), "new_tokens": args.max_new_tokens})
    samples, source = make_samples(model_dir, args_long)
    gen = torch.Generator().manual_seed(1)
    lo, hi = math.log(8), math.log(args.max_new_tokens)
    for s in samples:
        n = int(round(math.exp(lo + (hi - lo) * float(torch.rand((), generator=gen)))))
        s.completion_ids = s.completion_ids[:n]
        s.rollout_logprobs = s.rollout_logprobs[:n]
    return samples, source


def budget_for(samples, micro_batch_size: int) -> int:
    """The token budget that holds, on average, as many tokens as a fixed micro-batch of the
    same batch would if it were trimmed: micro_batch_size x the mean row length."""
    mean = sum(len(s.prompt_ids) + len(s.completion_ids) for s in samples) / len(samples)
    return int(micro_batch_size * mean)


def split_learner(name: str, model_dir, samples, micro_batch_size: int):
    budget = budget_for(samples, micro_batch_size) if name == "budget" else None
    return make_learner(model_dir, micro_batch_size=micro_batch_size,
                        max_tokens_per_micro_batch=budget)


def main() -> None:
    args = parse_args()
    if args.rss_of:
        def prepare(model_dir):
            return unequal_samples(model_dir, args)[0]

        def build(name, model_dir, _size):
            samples = unequal_samples(model_dir, args)[0]
            learner = split_learner(name, model_dir, samples, args.micro_batch_size)
            batch = with_old_logprobs(learner, samples)
            return lambda _batch: learner.train_step(batch)

        rss_child(args, _Sized.of(prepare), build)
        return
    started, machine, model_dir = start_run(args)
    params = count_parameters(model_dir)

    samples, source = make_samples(model_dir, args)
    learners = {name: make_learner(model_dir, **kw) for name, kw in VARIANTS.items()}
    batch = with_old_logprobs(learners["grpo"], samples)
    timing = interleave({name: (lambda ln=ln: ln.train_step(batch))
                         for name, ln in learners.items()}, repeat=args.repeat,
                        warmup=args.warmup)
    del learners
    rows = [[name, timing[name].median, paired_ratio(timing[name], timing["grpo"])]
            for name in VARIANTS]
    tables = [table(
        f"Loss variants vs GRPO: Learner.train_step, ZeRO-2, {params / 1e6:.1f}M parameters, "
        f"{batch.size} samples x {args.new_tokens} completion tokens, one micro-batch",
        ["loss", "median s/step", "x grpo"], rows,
        [f"prompts: {source}; completions: random token ids; old log-probs: the start policy's",
         f"median of {args.repeat} interleaved rounds after {args.warmup} warm-up; x grpo = "
         "median over rounds of variant time / grpo time; target within 5%",
         "gspo / gspo_token with the paper's clip ranges (3e-4 / 4e-4), cispo without a lower "
         "bound and 0.28 above, grpo_entropy with entropy_coef 0.01"])]

    unequal, _ = unequal_samples(model_dir, args)
    split = {name: split_learner(name, model_dir, unequal, args.micro_batch_size)
             for name in SPLITS}
    batches = {name: with_old_logprobs(ln, unequal) for name, ln in split.items()}
    padding = {name: ln.train_step(batches[name])["batch/padding_share"]
               for name, ln in split.items()}
    split_timing = interleave({name: (lambda ln=ln, b=batches[name]: ln.train_step(b))
                               for name, ln in split.items()}, repeat=args.repeat,
                              warmup=args.warmup)
    del split, batches
    memory = peak_rss_per_contender(MODULE, SPLITS, [
        "--size", args.size, "--group", str(args.group),
        "--prompts-per-step", str(args.prompts_per_step),
        "--max-new-tokens", str(args.max_new_tokens),
        "--micro-batch-size", str(args.micro_batch_size),
        "--threads", str(args.threads), "--warmup", str(args.warmup)])
    budget = budget_for(unequal, args.micro_batch_size)
    lengths = sorted(len(s.completion_ids) for s in unequal)
    labels = {"fixed": f"micro_batch_size {args.micro_batch_size}",
              "budget": f"max_tokens_per_micro_batch {budget}"}
    tables.append(table(
        f"Token-budget vs fixed micro-batches: {len(unequal)} samples, completions of "
        f"{lengths[0]} to {lengths[-1]} tokens (median {lengths[len(lengths) // 2]})",
        ["micro-batches", "median s/step", "x fixed", "padding share", "peak RSS MiB"],
        [[labels[name], split_timing[name].median,
          paired_ratio(split_timing[name], split_timing["fixed"]), padding[name],
          memory[name]["peak_rss_mb"]] for name in SPLITS],
        ["both split in consecutive rows (GRPO groups stay together) and trim each "
         "micro-batch to its own widths; the budget is micro_batch_size x the mean row length",
         "padding share: padded positions / all positions the forward passes ran",
         f"peak RSS: a fresh process per contender, {args.warmup + 2} steps"]))
    save_result("variants", module=MODULE, args=args, machine=machine,
                settings={"size": args.size, "params": params, "batch": batch.size,
                          "new_tokens": args.new_tokens, "max_new_tokens": args.max_new_tokens,
                          "micro_batch_size": args.micro_batch_size, "budget": budget},
                tables=tables,
                raw={"timing": {k: v.to_json() for k, v in timing.items()},
                     "split_timing": {k: v.to_json() for k, v in split_timing.items()},
                     "padding": padding, "memory": memory}, started=started)


class _Sized(list):
    """A list of samples with the ``size`` that ``bench.common.rss_child`` reads."""

    @property
    def size(self) -> int:
        return len(self)

    @classmethod
    def of(cls, prepare):
        return lambda model_dir: cls(prepare(model_dir))


if __name__ == "__main__":
    main()
