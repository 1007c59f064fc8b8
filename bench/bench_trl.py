"""TRL's GRPOTrainer vs the raw limit: the same GRPO work in one process, step for step.

The work (see ``bench.bench_raw``): the same model (``bench.models.build_model``), the same
MedQA prompts in the same order (2 per step), G=8 completions of a forced 64 new tokens, the
same letter reward, the token-mean clipped loss without KL, AdamW (lr 1e-5, no weight decay,
constant schedule), gradient clipping at 1.0. TRL 1.16 runs on the CPU (``use_cpu=True``,
``bf16=False``) with its Hugging Face ``generate`` path (it supports vLLM 0.22-0.31 only).

Both run in this process, interleaved: a callback runs one raw step at the start of each
TRL step, outside TRL's timing, so both see the same background load and the same prompts.
TRL's seconds per step are the intervals between its step starts (generation, reward,
loss, optimiser, logging: everything the trainer does per step) minus the raw step.
Start-up (constructing the trainer, and from ``train()`` to the first step) is reported
separately. Run from the repository root: ``python -m bench.bench_trl`` (``--quick``).
"""

from __future__ import annotations

import tempfile
import time

from bench.bench_raw import (LEARNING_RATE, MAX_GRAD_NORM, RawGRPO, add_grpo_args,
                             finish_grpo_args)
from bench.common import (Timing, base_parser, letter_reward, load_prompts, paired_ratio,
                          save_result, start_run, table)
from bench.models import count_parameters

MODULE = "bench.bench_trl"


def make_reward(samples):
    """TRL's reward-function form around :func:`bench.common.letter_reward`: the dataset's
    ``row_index`` column says which prompt Sample each completion answers."""

    def letter_accuracy(prompts, completions, row_index, **kwargs):
        out = []
        for completion, index in zip(completions, row_index):
            text = completion[-1]["content"] if isinstance(completion, list) else completion
            out.append(letter_reward(text, samples[index].row))
        return out

    return letter_accuracy


class InterleavedRaw:
    """A transformers ``TrainerCallback`` (built lazily so this module imports without
    transformers) that times TRL's steps and runs one raw step before each of them."""

    def __new__(cls, raw: RawGRPO):
        from transformers import TrainerCallback

        class Callback(TrainerCallback):
            def __init__(self):
                self.trl_s: list[float] = []
                self.raw_s: list[float] = []
                self.first_step_at: float | None = None
                self._step_started: float | None = None

            def on_step_begin(self, args, state, control, **kwargs):
                now = time.perf_counter()
                if self.first_step_at is None:
                    self.first_step_at = now
                if self._step_started is not None:
                    self.trl_s.append(now - self._step_started)
                start = time.perf_counter()
                raw.step()
                self.raw_s.append(time.perf_counter() - start)
                self._step_started = time.perf_counter()

        return Callback()


def measure_trl_and_raw(model_dir, prompts, *, group: int, prompts_per_step: int,
                        new_tokens: int, warmup: int, repeat: int) -> dict:
    """TRL's GRPOTrainer for ``warmup + repeat + 1`` steps over ``prompts`` (Samples with
    messages, at least ``prompts_per_step`` per step), one raw step before each of its steps.

    Returns ``{"trl": Timing, "raw": Timing}`` (the measured steps, paired round by round),
    the start-up parts in seconds (``raw_startup_s``, ``trl_import_s``, ``trl_construct_s``,
    ``trl_to_first_step_s``) and TRL's mean completion length per step (``lengths``).
    """
    import torch

    steps = warmup + repeat + 1
    t0 = time.perf_counter()
    raw = RawGRPO(model_dir, prompts, group=group, prompts_per_step=prompts_per_step,
                  new_tokens=new_tokens)
    raw_startup = time.perf_counter() - t0

    t0 = time.perf_counter()
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    trl_import = time.perf_counter() - t0
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    dataset = Dataset.from_list([{"prompt": p.messages, "row_index": i}
                                 for i, p in enumerate(prompts)])
    callback = InterleavedRaw(raw)
    with tempfile.TemporaryDirectory(prefix="bench-trl-") as out_dir:
        config = GRPOConfig(
            output_dir=out_dir, use_cpu=True, bf16=False, seed=0,
            per_device_train_batch_size=prompts_per_step * group,
            gradient_accumulation_steps=1, num_generations=group,
            max_completion_length=new_tokens,
            generation_kwargs={"min_new_tokens": new_tokens},
            temperature=1.0, top_p=1.0, top_k=0, beta=0.0, epsilon=0.2, loss_type="dapo",
            scale_rewards="group", num_iterations=1, shuffle_dataset=False,
            learning_rate=LEARNING_RATE, lr_scheduler_type="constant", warmup_steps=0,
            weight_decay=0.0, optim="adamw_torch", max_grad_norm=MAX_GRAD_NORM,
            max_steps=steps, logging_steps=1, save_strategy="no", report_to="none",
            disable_tqdm=True, dataloader_num_workers=0)
        trainer = GRPOTrainer(model=model, reward_funcs=[make_reward(prompts)], args=config,
                              train_dataset=dataset, processing_class=tokenizer,
                              callbacks=[callback])
        trl_construct = time.perf_counter() - t0
        t_train = time.perf_counter()
        trainer.train()
    trl_to_first_step = callback.first_step_at - t_train

    lengths = [h["completions/mean_length"] for h in trainer.state.log_history
               if "completions/mean_length" in h]
    if lengths and (min(lengths) != new_tokens or max(lengths) != new_tokens):
        raise RuntimeError(f"TRL completions were not of the forced length {new_tokens}: "
                           f"mean lengths per step {lengths}")
    return {"trl": Timing(callback.trl_s[warmup:]),
            "raw": Timing(callback.raw_s[warmup:len(callback.trl_s)]),
            "raw_startup_s": raw_startup, "trl_import_s": trl_import,
            "trl_construct_s": trl_construct, "trl_to_first_step_s": trl_to_first_step,
            "lengths": lengths}


def main() -> None:
    parser = base_parser(__doc__.split("\n")[0])
    add_grpo_args(parser)
    args = finish_grpo_args(parser.parse_args())
    started, machine, model_dir = start_run(args)
    params = count_parameters(model_dir)
    # One more TRL step than measured: the last interval ends where the extra step begins.
    steps = args.warmup + args.repeat + 1
    prompts, source = load_prompts(args.prompts_per_step * steps)

    m = measure_trl_and_raw(model_dir, prompts, group=args.group,
                            prompts_per_step=args.prompts_per_step, new_tokens=args.new_tokens,
                            warmup=args.warmup, repeat=args.repeat)
    trl, rawt, lengths = m["trl"], m["raw"], m["lengths"]
    raw_startup, trl_import = m["raw_startup_s"], m["trl_import_s"]
    trl_construct, trl_to_first_step = m["trl_construct_s"], m["trl_to_first_step_s"]
    per_step = args.group * args.prompts_per_step
    tokens = per_step * args.new_tokens
    ratio = paired_ratio(trl, rawt)
    tables = [table(
        f"GRPO step, TRL GRPOTrainer vs raw, {params / 1e6:.1f}M parameters, "
        f"{args.prompts_per_step} prompts x G={args.group} x {args.new_tokens} forced new "
        f"tokens, {args.threads} threads, CPU",
        ["contender", "start-up s", "median s/step", "samples/s", "tokens/s", "x raw"],
        [["TRL 1.16 GRPOTrainer (HF generate)", trl_construct + trl_to_first_step,
          trl.median, per_step / trl.median, tokens / trl.median, ratio],
         ["raw (hand-written)", raw_startup, rawt.median, per_step / rawt.median,
          tokens / rawt.median, 1.0]],
        [f"prompts: {source}; both contenders take the same prompts in the same order",
         f"median of {args.repeat} interleaved steps after {args.warmup} warm-up; x raw = "
         "median over steps of TRL time / raw time",
         f"TRL start-up = constructing GRPOTrainer {trl_construct:.1f} s + train() to the "
         f"first step {trl_to_first_step:.1f} s (importing trl: {trl_import:.1f} s, not "
         "included)"])]
    save_result("trl", module=MODULE, args=args, machine=machine,
                settings={"size": args.size, "params": params, "group": args.group,
                          "prompts_per_step": args.prompts_per_step,
                          "new_tokens": args.new_tokens, "lr": LEARNING_RATE,
                          "prompt_source": source},
                tables=tables,
                raw={"trl": trl.to_json(), "raw": rawt.to_json(),
                     "trl_construct_s": trl_construct, "trl_to_first_step_s": trl_to_first_step,
                     "trl_import_s": trl_import, "raw_startup_s": raw_startup,
                     "trl_mean_lengths": lengths},
                started=started)


if __name__ == "__main__":
    main()
