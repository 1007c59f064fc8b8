"""The raw limit of one GRPO step: the same work as the other contenders, by hand, no framework.

One step = 2 prompts x G=8 completions:
HF ``generate`` of the 16 completions (forced length: min_new_tokens = max_new_tokens),
the letter reward (``bench.common.letter_reward``), group-normalised advantages, one
forward pass for the completion log-probs, the clipped GRPO loss (``token_mean``, old
log-probs = the detached current ones, as in a single on-policy epoch), backward, gradient
clipping at 1.0 and an AdamW step. Nothing else: no logging, no data loader, no callbacks.

:class:`RawGRPO` is imported by ``bench.bench_trl``, which runs it interleaved with TRL's
``GRPOTrainer`` in one process; run alone, this module prints the raw figures only.
Run from the repository root: ``python -m bench.bench_raw`` (``--quick`` to check it).
"""

from __future__ import annotations

import time

from bench.common import (base_parser, finish_args, letter_reward, load_prompts, measure,
                          save_result, start_run, table)
from bench.models import count_parameters

MODULE = "bench.bench_raw"
LEARNING_RATE = 1e-5
MAX_GRAD_NORM = 1.0


def add_grpo_args(parser) -> None:
    """The GRPO work shared by the raw loop and TRL."""
    parser.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    parser.add_argument("--prompts-per-step", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="forced completion length (64; quick 16)")


def finish_grpo_args(args):
    args.new_tokens = args.new_tokens or (16 if args.quick else 64)
    return finish_args(args)


class RawGRPO:
    """One model, one AdamW, one step at a time over ``prompts`` (Samples with messages).

    ``step()`` takes the next ``prompts_per_step`` prompts, in order, wrapping around.
    """

    def __init__(self, model_dir, prompts, *, group: int, prompts_per_step: int,
                 new_tokens: int, lr: float = LEARNING_RATE, seed: int = 0):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(seed)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.tokenizer.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.0)
        self.prompts, self.group = prompts, group
        self.prompts_per_step, self.new_tokens = prompts_per_step, new_tokens
        self.texts = [self.tokenizer.apply_chat_template(p.messages, add_generation_prompt=True,
                                                         tokenize=False) for p in prompts]
        self.cursor = 0
        self.last: dict[str, float] = {}

    def step(self) -> dict[str, float]:
        import torch

        from medrl.align.grpo import group_advantages, policy_loss

        picked = [(self.cursor + i) % len(self.prompts) for i in range(self.prompts_per_step)]
        self.cursor += self.prompts_per_step
        rows = [i for i in picked for _ in range(self.group)]
        enc = self.tokenizer([self.texts[i] for i in rows], return_tensors="pt", padding=True,
                             add_special_tokens=False)
        P = enc["input_ids"].shape[1]
        with torch.no_grad():
            out = self.model.generate(
                **enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                max_new_tokens=self.new_tokens, min_new_tokens=self.new_tokens,
                pad_token_id=self.tokenizer.pad_token_id)
        completion = out[:, P:]
        T = completion.shape[1]
        texts = self.tokenizer.batch_decode(completion, skip_special_tokens=True)
        rewards = [letter_reward(t, self.prompts[i].row) for t, i in zip(texts, rows)]
        adv = group_advantages(rewards, rows).advantages

        attention = torch.cat([enc["attention_mask"], torch.ones_like(completion)], dim=1)
        logits = self.model(input_ids=out, attention_mask=attention,
                            logits_to_keep=T + 1).logits[:, :-1].float()
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, completion[..., None]).squeeze(-1)
        mask = torch.ones_like(logprobs)
        loss, _ = policy_loss(logprobs, logprobs.detach(), adv, mask, agg="token_mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), MAX_GRAD_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last = {"loss": float(loss.detach()), "reward_mean": sum(rewards) / len(rewards),
                     "completions": len(rows), "tokens": len(rows) * T}
        return self.last


def main() -> None:
    parser = base_parser(__doc__.split("\n")[0])
    add_grpo_args(parser)
    args = finish_grpo_args(parser.parse_args())
    started, machine, model_dir = start_run(args)
    steps = args.warmup + args.repeat
    prompts, source = load_prompts(args.prompts_per_step * steps)
    t0 = time.perf_counter()
    raw = RawGRPO(model_dir, prompts, group=args.group, prompts_per_step=args.prompts_per_step,
                  new_tokens=args.new_tokens)
    startup = time.perf_counter() - t0
    timing = measure(raw.step, repeat=args.repeat, warmup=args.warmup)
    per_step = args.group * args.prompts_per_step
    tables = [table(
        f"Raw GRPO step (hand-written, one process), {count_parameters(model_dir) / 1e6:.1f}M "
        f"parameters, {args.prompts_per_step} prompts x G={args.group} x {args.new_tokens} "
        f"forced new tokens, {args.threads} threads",
        ["contender", "start-up s", "median s/step", "samples/s", "tokens/s"],
        [["raw (generate + loss + AdamW)", startup, timing.median, per_step / timing.median,
          per_step * args.new_tokens / timing.median]],
        [f"prompts: {source}", f"median of {args.repeat} steps after {args.warmup} warm-up"])]
    save_result("raw", module=MODULE, args=args, machine=machine,
                settings={"size": args.size, "group": args.group,
                          "prompts_per_step": args.prompts_per_step,
                          "new_tokens": args.new_tokens, "lr": LEARNING_RATE,
                          "prompt_source": source},
                tables=tables, raw={"raw": timing.to_json(), "startup_s": startup},
                started=started)


if __name__ == "__main__":
    main()
