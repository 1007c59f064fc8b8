"""The cost of fake quantisation: a QAT training step against the full-precision step.

One process, the same threads, the same SFT batch: the first 8 bundled quick-start
multiple-choice items (``recipes/data/quickstart_mcq.jsonl``) rendered by the SFT stage's own
``medrl.align.stages.sft.build_example`` (chat template, generation prompt), the answer being the
correct option written out (``"B. Right coronary artery"``) plus the end-of-turn token.
Every contender runs the step the SFT / QAT stage runs: ``Learner.train_step_with(batch_loss,
batch, size_fn=batch_weight)`` under DeepSpeed ZeRO-0, one rank (gloo), fp32, AdamW, one
micro-batch holding the whole batch. Contenders, in interleaved rounds:

- ``fp``: the plain model (no QAT layers);
- ``hif8_off``: every ``nn.Linear`` but the LM head wrapped by ``enable_fake_quant(model,
  "hif8")`` through ``prepare_model``, quantisation switched off: the QAT stage's warm-up
  steps (the amax scalers still observe every forward);
- ``hif8``: the same, switched on (HiFloat8 W8A8 fake quantisation);
- ``e4m3``: the same with FP8 E4M3.

Reported: median seconds per step and the ratio to ``fp`` (median over rounds of the paired
ratio). Peak RSS comes from one fresh process per contender (``--rss-of NAME``, run
automatically by ``bench.common.peak_rss_per_contender``). A second table times the
quantiser alone, ``medrl.align.qat.quantize(x, fmt)`` on a 4M-element float32 tensor,
against ``x.clone()``.
Run from the repository root: ``python -m bench.bench_qat`` (``--quick`` to check it).
"""

from __future__ import annotations

from bench.common import (QUICKSTART_DATA, base_parser, finish_args, interleave, paired_ratio,
                          peak_rss_per_contender, rss_child, save_result, start_run, table)
from bench.models import count_parameters

MODULE = "bench.bench_qat"
LEARNING_RATE = 1e-5
MAX_GRAD_NORM = 1.0
# name -> (format or None for the plain model, quantisation switched on)
CONTENDERS: dict[str, tuple[str | None, bool]] = {
    "fp": (None, False),
    "hif8_off": ("hif8", False),
    "hif8": ("hif8", True),
    "e4m3": ("e4m3", True),
}
LABELS = {
    "fp": "full precision (plain nn.Linear)",
    "hif8_off": "HiF8 layers, quantisation off (QAT warm-up steps)",
    "hif8": "HiF8 W8A8 fake quantisation on",
    "e4m3": "E4M3 W8A8 fake quantisation on",
}


def parse_args():
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--elements", type=int, default=4 * 2**20,
                        help="elements of the tensor the quantiser is timed on")
    parser.add_argument("--rss-of", choices=list(CONTENDERS), default=None,
                        help="(internal) measure the peak RSS of one contender and exit")
    args = parser.parse_args()
    # A step takes well under a second: even the smoke run can afford 5 measured rounds.
    if args.repeat is None:
        args.repeat = 5
    return finish_args(args)


# --- the batch ----------------------------------------------------------------------------------


def make_batch(model_dir, n: int):
    """``n`` SFT examples from the bundled quick-start items, collated: (TrainBatch, source)."""
    from transformers import AutoTokenizer

    from medrl.align.batch import collate
    from medrl.align.stages.sft import ExampleSpec, build_example
    from medrl.launch.data import load_samples
    from medrl.launch.recipe import DataConfig

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    samples = load_samples(DataConfig(path=str(QUICKSTART_DATA), fields={"id": "id"}))
    if len(samples) < n:
        raise SystemExit(f"--batch {n}: {QUICKSTART_DATA.name} holds only {len(samples)} items")
    examples = []
    for s in samples[:n]:
        letter = str(s.row["answer"]).strip().upper()
        s.row["response"] = f"{letter}. {s.row['options'][letter]}"
        examples.append(build_example(tokenizer, s, ExampleSpec(response_field="response")))
    batch = collate(examples, pad_token_id=tokenizer.pad_token_id)
    source = (f"first {n} items of the bundled {QUICKSTART_DATA.name}, rendered by "
              "medrl.align.stages.sft.build_example; answer = the correct option written out")
    return batch, source


# --- the contenders -----------------------------------------------------------------------------


def quantise_with(fmt: str, on: bool):
    """A ``prepare_model`` hook: wrap every Linear but the LM head, quantisation ``on``/off."""

    def prepare(model) -> None:
        from medrl.align.qat import enable_fake_quant, set_fake_quant

        enable_fake_quant(model, fmt)
        set_fake_quant(model, on)

    return prepare


def build(name: str, model_dir, micro_batch_size: int):
    """The step function of contender ``name`` (its learner kept alive by the closure)."""
    from medrl.align.learner import Learner
    from medrl.align.stages.sft import batch_loss, batch_weight

    fmt, on = CONTENDERS[name]
    learner = Learner(model_dir, zero_stage=0, micro_batch_size=micro_batch_size,
                      optimizer="adamw", lr=LEARNING_RATE, weight_decay=0.0, warmup_steps=0,
                      lr_schedule="constant", max_grad_norm=MAX_GRAD_NORM, reference="none",
                      kl_coef=0.0, temperature=1.0, seed=0,
                      prepare_model=quantise_with(fmt, on) if fmt else None)
    if not fmt:
        return lambda batch: learner.train_step_with(batch_loss, batch, size_fn=batch_weight)
    from medrl.align.qat import end_qat_step

    def step(batch):  # as the QAT stage runs it: the scales move once per optimiser step
        metrics = learner.train_step_with(batch_loss, batch, size_fn=batch_weight)
        end_qat_step(learner.model)
        return metrics

    return step


def count_quantised(model_dir) -> tuple[int, int]:
    """(number of wrapped Linear layers, parameters they hold), on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from medrl.align.qat import enable_fake_quant

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
        layers = enable_fake_quant(model, "hif8")
    return len(layers), sum(layer.weight.numel() for layer in layers.values())


# --- the quantiser alone ------------------------------------------------------------------------


def time_quantiser(args):
    """Interleaved timings of clone / quantize(hif8) / quantize(e4m3) on one tensor."""
    import torch

    from medrl.align.qat import format_max, quantize

    gen = torch.Generator().manual_seed(0)
    # Spread over the formats' whole range (normals, denormals, a few saturating values).
    x = torch.randn(args.elements, generator=gen) * 2.0 ** torch.randint(
        -12, 12, (args.elements,), generator=gen).float()
    for fmt in ("hif8", "e4m3"):  # the tables are built once per dtype/device: not timed
        quantize(x[:16], fmt)
    kernels = {"clone": lambda: x.clone(),
               "hif8": lambda: quantize(x, "hif8"),
               "e4m3": lambda: quantize(x, "e4m3")}
    timing = interleave(kernels, repeat=args.repeat, warmup=args.warmup)
    saturated = {fmt: float((x.abs() > format_max(fmt)).float().mean()) for fmt in ("hif8", "e4m3")}
    return timing, saturated


# --- main ---------------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    if args.rss_of:
        rss_child(args, lambda model_dir: make_batch(model_dir, args.batch)[0], build)
        return
    started, machine, model_dir = start_run(args)
    params = count_parameters(model_dir)
    n_layers, quantised_params = count_quantised(model_dir)
    batch, source = make_batch(model_dir, args.batch)

    steps = {name: build(name, model_dir, batch.size) for name in CONTENDERS}
    # The first step of every contender starts from the same weights: its loss shows that
    # quantisation is on (a small shift from fp) and off (fp's loss exactly).
    first_loss = {name: f(batch)["loss"] for name, f in steps.items()}
    timing = interleave({name: (lambda f=f: f(batch)) for name, f in steps.items()},
                        repeat=args.repeat, warmup=args.warmup)
    del steps

    memory = peak_rss_per_contender(MODULE, CONTENDERS, [
        "--size", args.size, "--batch", str(args.batch), "--threads", str(args.threads),
        "--warmup", str(args.warmup)])

    kernel_timing, saturated = time_quantiser(args)

    growth = {n: m["peak_rss_mb"] - m["before_build_mb"] for n, m in memory.items()}
    rows = [[LABELS[name], timing[name].median, paired_ratio(timing[name], timing["fp"]),
             memory[name]["peak_rss_mb"], growth[name], growth[name] - growth["fp"],
             first_loss[name] - first_loss["fp"]] for name in CONTENDERS]
    tokens = int(batch.completion_mask.sum())
    columns = int(batch.input_ids.shape[1])
    step_table = table(
        f"QAT fake quantisation vs full precision: Learner.train_step_with (SFT loss), "
        f"{params / 1e6:.1f}M parameters, batch of {batch.size} sequences ({columns} columns, "
        f"{tokens} answer tokens), ZeRO-0, one rank, fp32, {args.threads} threads",
        ["contender", "median s/step", "x full precision", "peak RSS MiB",
         "growth in build + steps MiB", "growth vs full precision MiB",
         "first-step loss minus fp's"],
        rows,
        [f"batch: {source}",
         f"{n_layers} Linear layers wrapped (every one but the LM head), holding "
         f"{quantised_params / 1e6:.2f}M of the {params / 1e6:.2f}M parameters; W8A8: weight "
         "and input of each are fake-quantised with per-tensor delayed scaling (amax history 64)",
         f"median of {args.repeat} interleaved rounds after {args.warmup} warm-up (and one "
         "first step per contender before it); x full precision = median over rounds of "
         "contender time / full-precision time",
         "peak RSS: a fresh process per contender (imports torch, transformers, deepspeed), "
         f"{args.warmup + 2} steps; growth = peak minus the RSS once imports and batch were ready",
         f"first-step loss: every contender's first step from the same weights, minus full "
         f"precision's ({first_loss['fp']:.4f}); quantisation off must give 0, on a small shift"])

    kernel_rows = []
    for name, label in (("clone", "x.clone()"), ("hif8", 'quantize(x, "hif8")'),
                        ("e4m3", 'quantize(x, "e4m3")')):
        t = kernel_timing[name]
        kernel_rows.append([label, t.median * 1e3, paired_ratio(t, kernel_timing["clone"]),
                            args.elements / t.median / 1e6])
    kernel_table = table(
        f"The quantiser alone: {args.elements / 2**20:.0f}M-element float32 tensor, "
        f"{args.threads} threads",
        ["kernel", "median ms", "x clone", "M elements/s"], kernel_rows,
        ["x = randn * 2^k, k uniform in [-12, 12): values across both formats' ranges "
         f"(saturating share: hif8 {saturated['hif8']:.1e}, e4m3 {saturated['e4m3']:.1e})",
         "quantize: bucketize of |x| into the format's midpoints, a table gather, copysign, "
         "NaN pass-through (e4m3 also a tie-to-even fix-up); fake_quantize adds a scale "
         "multiply and divide, and W8A8 runs it on each layer's weight and input",
         f"median of {args.repeat} interleaved rounds after {args.warmup} warm-up"])

    save_result("qat", module=MODULE, args=args, machine=machine,
                settings={"size": args.size, "params": params, "batch": batch.size,
                          "columns": columns, "answer_tokens": tokens,
                          "quantised_layers": n_layers, "quantised_params": quantised_params,
                          "quantiser_elements": args.elements, "lr": LEARNING_RATE,
                          "batch_source": source},
                tables=[step_table, kernel_table],
                raw={"timing": {k: v.to_json() for k, v in timing.items()},
                     "quantiser_timing": {k: v.to_json() for k, v in kernel_timing.items()},
                     "memory": memory, "first_step_loss": first_loss}, started=started)


if __name__ == "__main__":
    main()
