"""Difference Feedback's cost: the token alignment per 1k pairs, and the repair path per step.

1. **Alignment.** Pairs of (failed, repaired) completions made from real MedQA question text
   (``bench.common.load_prompts``; the bundled items without ``../shared/data``), tokenised
   with the bundled tokenizer and cut to L tokens, L in {64, 256, 512}; the repair rewrites
   one sentence in the middle (its words replaced by others of the same text), as a policy
   repair would. Contenders, per 1k pairs: **raw**, the cheapest exact alignment of a single
   edit (trim the common prefix and suffix of the id lists, mark what is left); the
   project's ``difference_marks`` (difflib over token ids, no junk heuristic: any number of
   edits); and ``DifferenceFeedback.marks`` (tokenise the repaired text, align, widen to
   sentences), which is what the reward runs per failed sample.
2. **Per step.** The shipped ``recipes/grpo_difference_feedback.yaml`` (tiny Qwen2, P = 2
   prompts x G = 4, 32 new tokens, one rollout worker and one learner rank) run by
   ``medrl.launch.driver.train`` in this process for ``--steps`` steps, three ways: plain
   GRPO (``mcq_letter``: the same score, no marks), the rule repairer, and the policy
   repairer (the rollout engine samples a 64-token repair of every failed answer: a random
   model's greedy repair would be blank lines, with nothing to align). Reported:
   the median step time over the steps after the first, its ratio to plain GRPO, and the
   repair and alignment seconds the reward logs, as a share of the step.

Run from the repository root: ``python -m bench.bench_repair`` (``--quick`` to check it).
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from bench.common import (REPO, base_parser, finish_args, interleave, load_prompts,
                          paired_ratio, save_result, start_clock, table)

MODULE = "bench.bench_repair"
RECIPE = REPO / "recipes" / "grpo_difference_feedback.yaml"
LENGTHS = (64, 256, 512)


def parse_args():
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=None, help="pairs per length (200)")
    parser.add_argument("--steps", type=int, default=None, help="GRPO steps per run (8)")
    args = parser.parse_args()
    args.pairs = args.pairs or (40 if args.quick else 200)
    args.steps = args.steps or (3 if args.quick else 8)
    return finish_args(args)


# --- part 1: the alignment ---------------------------------------------------------------------


def make_pairs(tokenizer, n: int, length: int) -> list[tuple[list[int], str, list[int]]]:
    """``n`` (failed ids, repaired text, repaired ids) of ``length`` tokens from MedQA text."""
    import random

    prompts, _ = load_prompts(n)
    rng = random.Random(length)
    text = " ".join(p.messages[-1]["content"] if isinstance(p.messages[-1]["content"], str)
                    else "" for p in prompts)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    words = text.split()
    out = []
    for i in range(n):
        start = rng.randrange(0, max(1, len(ids) - length))
        failed = ids[start:start + length]
        failed_text = tokenizer.decode(failed)
        sentences = failed_text.split(". ")
        k = len(sentences) // 2
        sentences[k] = " ".join(rng.choice(words) for _ in sentences[k].split())
        repaired = ". ".join(sentences)
        out.append((failed, repaired, tokenizer(repaired, add_special_tokens=False)["input_ids"]))
    return out


def trim_marks(failed: list[int], repaired: list[int]) -> list[float]:
    """Raw: everything between the common prefix and the common suffix is marked."""
    n, m = len(failed), len(repaired)
    a = 0
    while a < min(n, m) and failed[a] == repaired[a]:
        a += 1
    b = 0
    while b < min(n, m) - a and failed[n - 1 - b] == repaired[m - 1 - b]:
        b += 1
    return [0.0] * a + [1.0] * (n - a - b) + [0.0] * b


def alignment_part(args) -> dict:
    from medrl.align.models import resolve_policy
    from medrl.rewards.api import RewardContext
    from medrl.rewards.repair import DifferenceFeedback, difference_marks

    policy = resolve_policy("tiny:qwen2")
    reward = DifferenceFeedback(widen="sentence")
    reward.setup(RewardContext(policy_dir=policy))
    rows = []
    for length in LENGTHS:
        pairs = make_pairs(reward.tokenizer, args.pairs, length)
        share = {fn.__name__: statistics.mean(sum(fn(f, r)) / len(f) for f, _, r in pairs)
                 for fn in (trim_marks, difference_marks)}
        per_k = 1000 / len(pairs)
        t = interleave({
            "raw": lambda: [trim_marks(f, r) for f, _, r in pairs],
            "difference_marks": lambda: [difference_marks(f, r) for f, _, r in pairs],
            "reward.marks": lambda: [reward.marks(f, text) for f, text, _ in pairs],
        }, repeat=args.repeat, warmup=args.warmup)
        rows.append([length, round(t["raw"].median * per_k * 1e3, 2),
                     round(t["difference_marks"].median * per_k * 1e3, 1),
                     round(paired_ratio(t["difference_marks"], t["raw"]), 1),
                     round(t["reward.marks"].median * per_k * 1e3, 1),
                     f"{share['trim_marks']:.1%}", f"{share['difference_marks']:.1%}"])
    return table(
        f"Alignment of (failed, repaired) token sequences, ms per 1k pairs ({args.pairs} "
        "pairs per length)",
        ["tokens", "raw: prefix/suffix trim", "difference_marks", "x raw",
         "reward.marks (tokenise + align + widen)", "marked share: raw",
         "marked share: difference_marks"], rows,
        ["pairs: MedQA question text cut to L tokens of the bundled tokenizer, one middle "
         "sentence rewritten with other words of the text",
         "raw marks everything between the common prefix and suffix: exact for one edit, "
         "no use for several; difference_marks handles any number of edits, and inside a "
         "rewritten sentence leaves unmarked the tokens the repair kept (spaces, shared "
         "words), hence its smaller marked share",
         f"median of {args.repeat} interleaved rounds after {args.warmup} warm-up"])


# --- part 2: per step ---------------------------------------------------------------------------


def run_once(name: str, steps: int, overrides: list[str]) -> list[dict]:
    from medrl.launch.driver import train
    from medrl.launch.monitor import read_jsonl
    from medrl.launch.recipe import load_recipe
    from medrl.launch.rundir import absolute_recipe, create_run_dir

    out = Path(tempfile.mkdtemp(prefix="medrl-bench-repair-"))
    recipe = load_recipe(RECIPE, [
        f"run.name={name}", f"run.output_dir={out}", f"run.max_steps={steps}",
        "checkpoint.every=0", "logging.progress=false", "logging.tensorboard=false",
        "logging.plots=false", *overrides])
    recipe = absolute_recipe(recipe, REPO / "recipes")
    run_dir = create_run_dir(recipe)
    train(recipe, run_dir)
    return list(read_jsonl(run_dir / "metrics.jsonl"))


CONFIGS = {
    "plain GRPO (mcq_letter)": ["rewards.functions.0.name=mcq_letter",
                                "rewards.functions.0.kwargs={}"],
    "rule repairer": [],
    # sampled: a random model's greedy repair is blank lines (no text, nothing to align)
    "policy repairer (64 tokens)": ["rewards.functions.0.kwargs.repairer=policy",
                                    "rewards.functions.0.kwargs.temperature=1.0"],
}


def step_part(args) -> dict:
    rows, per = [], {}
    for name, overrides in CONFIGS.items():
        per[name] = run_once(name.split()[0], args.steps, overrides)[1:]  # after the first
    base = statistics.median(r["time/step"] for r in per["plain GRPO (mcq_letter)"])
    for name, metrics in per.items():
        step = statistics.median(r["time/step"] for r in metrics)
        repair = statistics.median(r.get("rewards/difference_feedback/repair_seconds", 0.0)
                                   for r in metrics)
        align = statistics.median(r.get("rewards/difference_feedback/align_seconds", 0.0)
                                  for r in metrics)
        failed = statistics.median(r.get("rewards/difference_feedback/failed", 0.0)
                                   for r in metrics)
        rows.append([name, round(step, 3), round(step / base, 2), round(repair, 4),
                     round(align, 4), f"{(repair + align) / step:.1%}", failed])
    return table(
        f"A GRPO step with Difference Feedback: recipes/grpo_difference_feedback.yaml, "
        f"{args.steps} steps per run", ["contender", "median s/step", "x plain",
                                        "repair s", "align s", "repair + align share",
                                        "failed samples/step"], rows,
        ["tiny Qwen2 (random weights), P 2 x G 4, 32 new tokens, HF engine, 1 rollout worker, "
         "1 learner rank (ZeRO 0); medians over the steps after the first of one run each",
         "repair s: the reward's repairer call per step (the policy repairer: one batched "
         "generate of every failed answer on the rollout worker); align s: tokenise + "
         "align + widen"])


def main() -> None:
    args = parse_args()
    started, machine = start_clock()
    import torch

    torch.set_num_threads(args.threads)
    tables = [alignment_part(args), step_part(args)]
    save_result("repair", module=MODULE, args=args, machine=machine,
                settings={"pairs": args.pairs, "steps": args.steps, "lengths": LENGTHS},
                tables=tables, started=started)


if __name__ == "__main__":
    main()
