"""The rubric reward's cost: (sample x criterion) pairs/s against a plain forward, and per step.

One process, a criterion reward model and a judge of the same body (:func:`build_scorer_model`:
Qwen2-shaped, random weights, hidden 256, 4 layers, the bundled tokenizer; the reward model a
``Qwen2ForSequenceClassification`` with one label, the judge a ``Qwen2ForCausalLM``), real
HealthBench rows from ``../shared/data`` through the project's own data loader (HealthBench
layout: ``prompt`` conversation, ``rubrics`` items):

1. ``RubricReward`` (``scorer: reward_model``) on one step's batch: P prompts x G
   completions, every criterion of each row's rubric, against **raw**: the same pairs' texts
   (``rm_input``, built beforehand) through the tokenizer and the same model in batches of
   the same size, in the same length order, with the same ``max_length``. The reward adds
   rubric parsing, the text rendering, the verdict checks and the aggregation; target
   <= 1.15x raw. Both must give the same verdicts (the table says how close).
2. The cost of one step as G and the number of criteria per rubric grow (G in {4, 8} x
   criteria in {4, 16}, the first criteria of rubrics that have at least 16): median
   seconds per step of the reward with ``scorer: reward_model`` and with ``scorer: judge``
   (in this process, Ray not started; ``max_retries`` 0, ``on_malformed: not_applicable``).
   A random judge never writes a verdict nor an end of turn, so every answer runs its full
   ``--judge-new-tokens``: the judge's cost at that answer budget, with no retry.

Completions are physician-written HealthBench text (each row's ideal and reference
completions, pooled), cut to seeded lengths between ``--min-completion-tokens`` and
``--max-completion-tokens``: the reward-model cost depends on token counts, not on which
answer is paired with which prompt. Without ``../shared/data`` the benchmark is skipped (it
says so and writes no result). Run from the repository root: ``python -m bench.bench_rubric``
(``--quick`` to check it).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from bench.common import (SHARED_DATA, base_parser, finish_args, interleave, paired_ratio,
                          save_result, start_clock, table)
from bench.models import bench_cache_dir, qwen2_folder

MODULE = "bench.bench_rubric"
HEALTHBENCH = SHARED_DATA / "healthbench" / "oss_eval_sample.jsonl"
# The criterion reward model: every size keeps head_dim 64; no vocabulary head (one label).
RM_CONFIG = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2)
GRID_GROUPS = (4, 8)
GRID_CRITERIA = (4, 16)


def parse_args():
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=None,
                        help="prompts in the step of part 1 (the file's first rows; 2)")
    parser.add_argument("--group", type=int, default=8, help="completions per prompt (part 1)")
    parser.add_argument("--grid-prompts", type=int, default=1,
                        help="prompts per step in the grid (rows with >= 16 criteria)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="pairs per forward pass (the reward's default)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="longest reward-model input in tokens (256; quick 128)")
    parser.add_argument("--min-completion-tokens", type=int, default=16)
    parser.add_argument("--max-completion-tokens", type=int, default=None,
                        help="longest completion (64; quick 32)")
    parser.add_argument("--judge-new-tokens", type=int, default=16,
                        help="the judge's answer budget (max_new_tokens)")
    args = parser.parse_args()
    args.prompts = args.prompts or (1 if args.quick else 2)
    args.max_length = args.max_length or (128 if args.quick else 256)
    args.max_completion_tokens = args.max_completion_tokens or (32 if args.quick else 64)
    return finish_args(args)


def build_scorer_model(kind: str, *, seed: int = 0) -> Path:
    """A scorer's model folder: ``kind`` "rm", a one-label ``Qwen2ForSequenceClassification``;
    "judge", a causal LM (tied embeddings). Both :data:`RM_CONFIG`, random weights seeded by
    ``seed``, the bundled tokenizer; written once into the benchmark cache."""
    out_dir = bench_cache_dir() / f"qwen2-{kind}-h{RM_CONFIG['hidden_size']}-" \
        f"l{RM_CONFIG['num_hidden_layers']}-seed{seed}"
    return qwen2_folder(out_dir, RM_CONFIG, seed=seed, head="value" if kind == "rm" else "lm",
                        tie_word_embeddings=kind == "judge")


# --- the batch ----------------------------------------------------------------------------------


def load_rows():
    """Every HealthBench row as a prompt Sample (``messages`` from ``prompt``, ``rubric`` from
    ``rubrics``), in file order, through ``medrl.launch.data``."""
    from medrl.launch.data import load_samples
    from medrl.launch.recipe import DataConfig

    cfg = DataConfig(path=str(HEALTHBENCH), template="chat", shuffle=False,
                     fields={"messages": "prompt", "rubric": "rubrics", "id": "prompt_id"})
    return load_samples(cfg)


def completion_pool(rows, tokenizer, args) -> list[str]:
    """Physician-written answers of the file (ideal and reference completions), each cut to
    a seeded, log-uniform length in [min, max] completion tokens."""
    import random

    texts = []
    for row in rows:
        data = row.row.get("ideal_completions_data") or {}
        texts += [data.get("ideal_completion") or ""]
        texts += [ref.get("completion", "") if isinstance(ref, dict) else str(ref)
                  for ref in data.get("ideal_completions_ref_completions") or []]
    texts = [t for t in texts if t.strip()]
    rng = random.Random(0)
    lo, hi = math.log(args.min_completion_tokens), math.log(args.max_completion_tokens)
    out = []
    for text in texts:
        n = round(math.exp(rng.uniform(lo, hi)))
        out.append(tokenizer.decode(tokenizer(text)["input_ids"][:n]))
    return out


def step_samples(prompts, group: int, pool: list[str], criteria: int | None = None):
    """G completions of each prompt (texts taken in turn from ``pool``); ``criteria``: keep
    each rubric's first that many items (None: all)."""
    samples, at = [], 0
    for prompt in prompts:
        if criteria is not None:
            prompt = dataclasses.replace(prompt, row={**prompt.row,
                                                      "rubric": prompt.row["rubric"][:criteria]})
        for i in range(group):
            s = prompt.with_completion(i)
            s.completion_text = pool[at % len(pool)]
            at += 1
            samples.append(s)
    return samples


# --- the contenders -----------------------------------------------------------------------------


def make_reward(model_dir: Path, args, scorer: str = "reward_model"):
    """The rubric reward on ``model_dir``, set up in this process (Ray is not started)."""
    from medrl.rewards.api import RewardContext
    from medrl.rewards.rubric import RubricReward

    judge = {"max_new_tokens": args.judge_new_tokens, "max_retries": 0,
             "on_malformed": "not_applicable"} if scorer == "judge" else {}
    reward = RubricReward(model=str(model_dir), scorer=scorer, batch_size=args.batch_size,
                          max_length=args.max_length, **judge)
    reward.setup(RewardContext(device="cpu"))
    return reward


class RawForward:
    """The plain forward of the same texts: tokenize ``batch_size`` texts at a time (in the
    order given: the caller sorts them as the scorer does), run the model, sigmoid."""

    def __init__(self, model, tokenizer, *, batch_size: int, max_length: int):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_length = batch_size, max_length

    def __call__(self, texts: list[str]) -> list[float]:
        import torch

        out = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[start:start + self.batch_size], return_tensors="pt",
                                 padding=True, truncation=True, max_length=self.max_length)
            with torch.no_grad():
                out += torch.sigmoid(self.model(**enc).logits.float()[:, 0]).tolist()
        return out


def pair_texts(samples) -> list[str]:
    """The reward model's input of every (sample, criterion) pair, in the reward's order."""
    from medrl.rewards.rubric_scorers import instruction_text, rm_input

    return [rm_input(instruction_text(s.messages), item["criterion"], s.completion_text)
            for s in samples for item in s.row["rubric"]]


def token_stats(tokenizer, texts: list[str], max_length: int) -> tuple[int, float]:
    """(tokens the model reads in all, mean per pair) after truncation to ``max_length``."""
    lengths = [min(len(ids), max_length) for ids in tokenizer(texts)["input_ids"]]
    return sum(lengths), sum(lengths) / len(lengths)


# --- main ---------------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    if not HEALTHBENCH.is_file():
        print(f"skipped: the HealthBench rows are not at {HEALTHBENCH} (they live beside the "
              "project checkout, in ../shared/data); nothing measured, no result written")
        return
    started, machine = start_clock()
    import torch

    torch.set_num_threads(args.threads)
    rm_dir = build_scorer_model("rm")
    reward = make_reward(rm_dir, args)
    judge = make_reward(build_scorer_model("judge"), args, scorer="judge")
    scorer = reward.scorer  # the loaded model and tokenizer: raw runs the very same ones
    raw = RawForward(scorer.model, scorer.tokenizer, batch_size=args.batch_size,
                     max_length=args.max_length)
    params = sum(p.numel() for p in scorer.model.parameters())
    rows = load_rows()
    pool = completion_pool(rows, scorer.tokenizer, args)

    # 1. one step's batch: the reward against the plain forward of the same texts
    prompts = rows[:args.prompts]
    samples = step_samples(prompts, args.group, pool)
    texts = pair_texts(samples)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # the scorer's order
    sorted_texts = [texts[i] for i in order]
    verdicts = [v for r in reward(samples) for v in r.info["verdicts"]]
    raw_sorted = raw(sorted_texts)
    raw_verdicts = [0.0] * len(texts)
    for i, v in zip(order, raw_sorted):
        raw_verdicts[i] = v
    diff = max(abs(a - b) for a, b in zip(verdicts, raw_verdicts))
    timing = interleave({"reward": lambda: reward(samples), "raw": lambda: raw(sorted_texts)},
                        repeat=args.repeat, warmup=args.warmup)
    tokens, mean_tokens = token_stats(scorer.tokenizer, texts, args.max_length)
    n = len(texts)
    criteria = [len(p.row["rubric"]) for p in prompts]
    labels = {"reward": "RubricReward (scorer reward_model), one call for the batch",
              "raw": "raw: tokenizer + model forward of the same texts, same batches"}
    tables = [table(
        f"Rubric reward vs a plain forward: {len(prompts)} HealthBench prompts x G "
        f"{args.group} = {len(samples)} completions, {sum(criteria)} criteria "
        f"({', '.join(map(str, criteria))}) = {n} (sample, criterion) pairs, "
        f"{params / 1e6:.1f}M-parameter criterion RM, {args.threads} threads",
        ["contender", "median s/step", "pairs/s", "x raw"],
        [[labels[k], timing[k].median, n / timing[k].median,
          paired_ratio(timing[k], timing["raw"])] for k in ("reward", "raw")],
        [f"prompts: the first {len(prompts)} rows of HealthBench "
         f"({HEALTHBENCH.relative_to(SHARED_DATA.parent)}) through medrl.launch.data "
         "(fields messages: prompt, rubric: rubrics); every criterion of each rubric",
         f"completions: physician-written HealthBench answers cut to "
         f"{args.min_completion_tokens}-{args.max_completion_tokens} tokens; inputs: "
         f"rm_input(instruction, criterion, response), {mean_tokens:.0f} tokens per pair on "
         f"average after truncation at max_length {args.max_length} ({tokens} in all), "
         f"batch_size {args.batch_size}",
         "criterion RM: Qwen2ForSequenceClassification, num_labels 1, random weights, "
         + ", ".join(f"{k} {v}" for k, v in RM_CONFIG.items()),
         f"median of {args.repeat} interleaved rounds after {args.warmup} warm-up; x raw = "
         "median over rounds of reward time / raw time; target <= 1.15",
         f"largest |verdict difference| between the reward and raw: {diff:.2e}"])]

    # 2. the cost of one step as G and the criteria per rubric grow
    wide = [p for p in rows if len(p.row["rubric"]) >= max(GRID_CRITERIA)][:args.grid_prompts]
    cells = {(g, c): step_samples(wide, g, pool, criteria=c)
             for g in GRID_GROUPS for c in GRID_CRITERIA}
    scorers = {"rm": reward, "judge": judge}
    grid = interleave({f"{k}-G{g}-C{c}": (lambda r=r, s=s: r(s)) for (g, c), s in cells.items()
                       for k, r in scorers.items()}, repeat=args.repeat, warmup=args.warmup)
    first = f"G{GRID_GROUPS[0]}-C{GRID_CRITERIA[0]}"
    grid_rows = []
    for (g, c), s in cells.items():
        rm_t, judge_t = grid[f"rm-G{g}-C{c}"], grid[f"judge-G{g}-C{c}"]
        pairs = len(s) * c
        grid_rows.append([g, c, pairs, rm_t.median, pairs / rm_t.median,
                          paired_ratio(rm_t, grid[f"rm-{first}"]), judge_t.median,
                          pairs / judge_t.median, paired_ratio(judge_t, rm_t)])
    tables.append(table(
        f"Rubric reward per step as G and the criteria grow: {len(wide)} prompt(s) per step, "
        f"the first C criteria of rubrics with at least {max(GRID_CRITERIA)}",
        ["G", "criteria", "pairs", "reward_model s/step", "pairs/s",
         f"x G{GRID_GROUPS[0]} C{GRID_CRITERIA[0]}", "judge s/step", "judge pairs/s",
         "judge x reward_model"],
        grid_rows,
        ["one RubricReward call per step; same batch_size, max_length and model body as above "
         "(the judge: a Qwen2ForCausalLM, tied embeddings, reading judge_messages through the "
         "bundled chat template)",
         f"judge: greedy, max_new_tokens {args.judge_new_tokens} ({{\"verdict\": \"not_met\"}} "
         "is 12 tokens of the bundled vocabulary), max_retries 0, on_malformed not_applicable; "
         "random weights write no verdict and no end of turn, so every answer runs the full "
         "budget (each retry would add one more generate of the malformed pairs)",
         f"median of {args.repeat} interleaved rounds after {args.warmup} warm-up; x G"
         f"{GRID_GROUPS[0]} C{GRID_CRITERIA[0]} and judge x reward_model: median over rounds "
         "of the time ratios"]))
    save_result("rubric", module=MODULE, args=args, machine=machine,
                settings={"rm": RM_CONFIG, "params": params, "prompts": len(prompts),
                          "judge_new_tokens": args.judge_new_tokens,
                          "group": args.group, "pairs": n, "batch_size": args.batch_size,
                          "max_length": args.max_length, "tokens": tokens,
                          "grid_prompts": len(wide)},
                tables=tables,
                raw={"timing": {k: v.to_json() for k, v in timing.items()},
                     "grid": {k: v.to_json() for k, v in grid.items()},
                     "max_verdict_diff": diff}, started=started)


if __name__ == "__main__":
    main()
