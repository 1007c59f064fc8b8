"""The learner's ``train_step`` against raw torch on the same padded batch, and peak memory.

One process, the same threads, the same batch (``Learner.collate`` of 2 MedQA prompts x 8
completions of a fixed 64 tokens, advantages and old log-probs set), three contenders run
in interleaved rounds:

- raw: forward (completion logits only), log-softmax, the clipped GRPO loss
  (``medrl.align.grpo.policy_loss``, token mean), backward, gradient clipping, AdamW step;
- ``medrl.align.learner.Learner.train_step`` under DeepSpeed ZeRO-0 and ZeRO-2 (one rank,
  gloo), AdamW from torch, one micro-batch holding the whole batch; each prompt of the batch
  runs once and its 8 completions on its cached keys and values (``share_prompt``, the
  default), and, to show what that buys, ZeRO-0 with every row run in full as raw does.

Reported: median seconds per step and the ratio to raw (target <= 1.10x). Peak RSS comes
from one fresh process per contender (``--rss-of NAME``, run automatically): build it, run
the same steps, report the peak resident set size and the part above the imports.
Run from the repository root: ``python -m bench.bench_learner`` (``--quick`` to check it).
"""

from __future__ import annotations

from bench.common import (base_parser, finish_args, interleave, load_prompts, paired_ratio,
                          peak_rss_per_contender, rss_child, save_result, start_run, table)
from bench.models import count_parameters

MODULE = "bench.bench_learner"
LEARNING_RATE = 1e-5
MAX_GRAD_NORM = 1.0
# name: (label, ZeRO stage, share_prompt); raw has no learner
CONTENDERS = {
    "raw": ("raw torch (forward + loss + backward + AdamW)", None, False),
    "zero0": ("Learner.train_step, ZeRO-0", 0, True),
    "zero0_full": ("Learner.train_step, ZeRO-0, every row in full (share_prompt off)", 0,
                   False),
    "zero2": ("Learner.train_step, ZeRO-2", 2, True),
}


def parse_args():
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--group", type=int, default=8, help="completions per prompt")
    parser.add_argument("--prompts-per-step", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="completion length (64; quick 16)")
    parser.add_argument("--rss-of", choices=list(CONTENDERS), default=None,
                        help="(internal) measure the peak RSS of one contender and exit")
    args = parser.parse_args()
    args.new_tokens = args.new_tokens or (16 if args.quick else 64)
    return finish_args(args)


def make_samples(model_dir, args):
    """Prompt x completion Samples with prompt ids, random completion ids, random advantages
    and (as placeholders) zero old log-probs; :func:`set_old_logprobs` fills the real ones."""
    import torch
    from transformers import AutoTokenizer

    from medrl.align.encode import encode_batch

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts, source = load_prompts(args.prompts_per_step)
    gen = torch.Generator().manual_seed(0)
    samples = []
    for prompt in prompts:
        ids = encode_batch(tokenizer, [prompt]).prompt_ids[0]  # as the rollout engines do
        for i in range(args.group):
            s = prompt.with_completion(i)
            s.prompt_ids = list(ids)
            s.completion_ids = torch.randint(0, len(tokenizer), (args.new_tokens,),
                                             generator=gen).tolist()
            s.rollout_logprobs = [0.0] * args.new_tokens
            s.advantage = float(torch.randn((), generator=gen))
            samples.append(s)
    return samples, source


class RawStep:
    """Forward + GRPO loss + backward + AdamW on a ``TrainBatch``, no framework."""

    def __init__(self, model_dir):
        import torch

        from medrl.align.models import load_model

        self.model = load_model(model_dir).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LEARNING_RATE,
                                           weight_decay=0.0)

    def logprobs(self, batch):
        import torch

        T = batch.num_completion_tokens
        positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            position_ids=positions, logits_to_keep=T + 1).logits[:, :-1].float()
        targets = batch.input_ids[:, -T:]
        return torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None]).squeeze(-1)

    def step(self, batch) -> float:
        import torch

        from medrl.align.grpo import policy_loss

        loss, _ = policy_loss(self.logprobs(batch), batch.old_logprobs, batch.advantages,
                              batch.completion_mask, agg="token_mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), MAX_GRAD_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def make_learner(model_dir, zero_stage: int, micro_batch_size: int, share_prompt: bool):
    from medrl.align.learner import Learner

    return Learner(model_dir, zero_stage=zero_stage, micro_batch_size=micro_batch_size,
                   share_prompt=share_prompt,
                   optimizer="adamw", lr=LEARNING_RATE, weight_decay=0.0, warmup_steps=0,
                   lr_schedule="constant", max_grad_norm=MAX_GRAD_NORM, reference="none",
                   kl_coef=0.0, loss_agg="token_mean", seed=0)


def build(name: str, model_dir, micro_batch_size: int):
    """The step function of contender ``name`` (its object kept alive by the closure)."""
    if name == "raw":
        raw = RawStep(model_dir)
        return lambda batch: raw.step(batch)
    _, zero_stage, share_prompt = CONTENDERS[name]
    learner = make_learner(model_dir, zero_stage, micro_batch_size, share_prompt)
    return lambda batch: learner.train_step(batch)


def prepare_batch(model_dir, args):
    """The shared batch, old log-probs = the starting policy's (ratios start at 1)."""
    import torch

    from medrl.align.batch import collate

    samples, source = make_samples(model_dir, args)
    from transformers import AutoTokenizer

    pad = AutoTokenizer.from_pretrained(model_dir).pad_token_id
    batch = collate(samples, pad_token_id=pad)
    with torch.no_grad():
        batch.old_logprobs = RawStep(model_dir).logprobs(batch) * batch.completion_mask
    return batch, source


def main() -> None:
    args = parse_args()
    if args.rss_of:
        rss_child(args, lambda model_dir: prepare_batch(model_dir, args)[0], build)
        return
    started, machine, model_dir = start_run(args)
    params = count_parameters(model_dir)
    batch, source = prepare_batch(model_dir, args)
    steps = {name: build(name, model_dir, batch.size) for name in CONTENDERS}
    timing = interleave({name: (lambda f=f: f(batch)) for name, f in steps.items()},
                        repeat=args.repeat, warmup=args.warmup)
    del steps

    memory = peak_rss_per_contender(MODULE, CONTENDERS, [
        "--size", args.size, "--group", str(args.group),
        "--prompts-per-step", str(args.prompts_per_step), "--new-tokens", str(args.new_tokens),
        "--threads", str(args.threads), "--warmup", str(args.warmup)])

    rows = []
    for name, (label, _, _) in CONTENDERS.items():
        mem = memory[name]
        rows.append([label, timing[name].median, paired_ratio(timing[name], timing["raw"]),
                     mem["peak_rss_mb"], mem["peak_rss_mb"] - mem["before_build_mb"]])
    tokens = int(batch.completion_mask.sum())
    prompt_columns = batch.input_ids.shape[1] - batch.num_completion_tokens
    tables = [table(
        f"Learner step vs raw torch, {params / 1e6:.1f}M parameters, batch of {batch.size} "
        f"samples ({batch.input_ids.shape[1]} columns, {tokens} completion tokens), one "
        f"rank, gloo, {args.threads} threads",
        ["contender", "median s/step", "x raw", "peak RSS MiB", "growth in build + steps MiB"], rows,
        [f"prompts: {source}; completions: random token ids of length {args.new_tokens}",
         f"median of {args.repeat} interleaved rounds after {args.warmup} warm-up; x raw = "
         "median over rounds of contender time / raw time; target <= 1.10",
         "peak RSS: a fresh process per contender (imports torch, transformers, deepspeed), "
         f"{args.warmup + 2} steps; growth = peak minus the RSS once imports and batch were ready",
         "the learner also computes per-token entropy (a logged metric) and recomputes the "
         "LM-head chunk in the backward pass (memory-light log-probs); raw does neither",
         f"share_prompt: {args.prompts_per_step} prompt passes of {prompt_columns} columns and "
         f"{batch.size} completion passes of {args.new_tokens} columns on their cached keys "
         f"and values, instead of {batch.size} passes of {batch.input_ids.shape[1]} columns"])]
    save_result("learner", module=MODULE, args=args, machine=machine,
                settings={"size": args.size, "params": params, "batch": batch.size,
                          "columns": int(batch.input_ids.shape[1]), "new_tokens": args.new_tokens,
                          "lr": LEARNING_RATE, "prompt_source": source},
                tables=tables, raw={"timing": {k: v.to_json() for k, v in timing.items()},
                                    "memory": memory}, started=started)


if __name__ == "__main__":
    main()
