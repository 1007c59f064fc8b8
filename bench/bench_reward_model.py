"""The reward_model stage's step against raw torch on the same batch of preference pairs.

One process, the same threads, the same batch: P pairs built from the real HealthBench rows
(``../shared/data/healthbench``) through the project's loaders: each text is
``rm_input(conversation, criterion, response)`` with another criterion of the same rubric as a
stand-in response (only the lengths matter for the timing), cut to ``--max-length`` tokens and
encoded by ``medrl.align.stages.reward_model.encode_pairs``. Contenders, interleaved rounds:

- raw: ``AutoModelForSequenceClassification`` forward of the padded batch (positions from the
  attention mask), the Bradley-Terry loss, backward, gradient clipping, AdamW step;
- ``Learner.train_step_with(pair_loss)`` with ``head="value"``, ZeRO-0 and ZeRO-2 (one rank,
  gloo), one micro-batch holding the whole batch.

Reported: median seconds per step and the ratio to raw (target <= 1.10x). Run from the
repository root: ``python -m bench.bench_reward_model`` (``--quick`` to check it).
"""

from __future__ import annotations

from bench.common import (REPO, base_parser, finish_args, interleave, paired_ratio, save_result,
                          start_run, table)
from bench.models import count_parameters

MODULE = "bench.bench_reward_model"
HEALTHBENCH = REPO.parent / "shared" / "data" / "healthbench" / "oss_eval_sample.jsonl"
LEARNING_RATE = 1e-5
MAX_GRAD_NORM = 1.0
CONTENDERS = {
    "raw": ("raw torch (classifier forward + BT loss + backward + AdamW)", None),
    "zero0": ("Learner.train_step_with(pair_loss), value head, ZeRO-0", 0),
    "zero2": ("Learner.train_step_with(pair_loss), value head, ZeRO-2", 2),
}


def parse_args():
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=None, help="pairs per step (16; quick 4)")
    parser.add_argument("--max-length", type=int, default=384, help="tokens per text")
    args = parser.parse_args()
    args.pairs = args.pairs or (4 if args.quick else 16)
    return finish_args(args)


def make_pairs(n: int) -> tuple[list, str]:
    """``n`` pair samples from the HealthBench rows (criterion i of a rubric, responses: two
    other criteria of it), through the data loader and ``rm_input``."""
    from medrl.launch.data import load_samples
    from medrl.launch.preferences import explicit_pairs
    from medrl.launch.recipe import DataConfig

    if not HEALTHBENCH.is_file():
        raise SystemExit(f"the HealthBench rows are not at {HEALTHBENCH}; this benchmark reads "
                         "them (they live beside the project checkout).")
    rows = load_samples(DataConfig(path=str(HEALTHBENCH), template="chat",
                                   fields={"id": "prompt_id", "messages": "prompt",
                                           "rubric": "rubrics"}))
    pairs = []
    while len(pairs) < n:
        for s in rows:
            texts = [c["criterion"] for c in s.row["rubric"]]
            if len(texts) < 3 or len(pairs) >= n:
                continue
            k = len(pairs) % (len(texts) - 2)
            s.row.update(chosen=texts[k + 1], rejected=texts[k + 2], criterion=texts[k])
            pairs += explicit_pairs(s, chosen_field="chosen", rejected_field="rejected",
                                    criterion_field="criterion", tier_field=None)
    return pairs, f"HealthBench ({HEALTHBENCH.name}), {len(rows)} rows"


class RawStep:
    """Classifier forward + Bradley-Terry loss + backward + AdamW, no framework."""

    def __init__(self, model_dir):
        import torch

        from medrl.align.models import load_model

        self.model = load_model(model_dir, head="value").train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LEARNING_RATE,
                                           weight_decay=0.0)

    def step(self, batch) -> float:
        import torch
        import torch.nn.functional as F

        positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
        values = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            position_ids=positions, use_cache=False).logits[:, 0]
        values = values.float().view(-1, 2)  # [P, 2]: chosen, rejected
        loss = F.softplus(values[:, 1] - values[:, 0]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), MAX_GRAD_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def build(name: str, model_dir, micro_batch_size: int):
    """The step function of contender ``name`` (its object kept alive by the closure)."""
    if name == "raw":
        raw = RawStep(model_dir)
        return raw.step
    from medrl.align.learner import Learner
    from medrl.align.stages.reward_model import pair_count, pair_loss

    learner = Learner(model_dir, zero_stage=CONTENDERS[name][1], head="value",
                      micro_batch_size=micro_batch_size, optimizer="adamw", lr=LEARNING_RATE,
                      weight_decay=0.0, warmup_steps=0, lr_schedule="constant",
                      max_grad_norm=MAX_GRAD_NORM, reference="none", seed=0)
    return lambda batch: learner.train_step_with(pair_loss, batch, size_fn=pair_count)


def main() -> None:
    from transformers import AutoTokenizer

    from medrl.align.batch import collate
    from medrl.align.stages.reward_model import encode_pairs

    args = parse_args()
    started, machine, model_dir = start_run(args)
    params = count_parameters(model_dir)
    pairs, source = make_pairs(args.pairs)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batch = collate(encode_pairs(tokenizer, pairs, args.max_length),
                    pad_token_id=tokenizer.pad_token_id)
    steps = {name: build(name, model_dir, batch.size) for name in CONTENDERS}
    timing = interleave({name: (lambda f=f: f(batch)) for name, f in steps.items()},
                        repeat=args.repeat, warmup=args.warmup)
    rows = [[label, timing[name].median, paired_ratio(timing[name], timing["raw"])]
            for name, (label, _) in CONTENDERS.items()]
    tokens = int(batch.attention_mask.sum())
    tables = [table(
        f"Reward-model step vs raw torch, {params / 1e6:.1f}M parameters + a one-output head, "
        f"{args.pairs} pairs ({batch.size} texts, {batch.input_ids.shape[1]} columns, "
        f"{tokens} tokens), one rank, gloo, {args.threads} threads",
        ["contender", "median s/step", "x raw"], rows,
        [f"texts: rm_input(conversation, criterion, response) of {source}; stand-in "
         f"responses are other criteria of the same rubric; cut to {args.max_length} tokens",
         f"median of {args.repeat} interleaved rounds after {args.warmup} warm-up; x raw = "
         "median over rounds of contender time / raw time; target <= 1.10"])]
    save_result("reward_model", module=MODULE, args=args, machine=machine,
                settings={"size": args.size, "params": params, "pairs": args.pairs,
                          "columns": int(batch.input_ids.shape[1]), "tokens": tokens,
                          "lr": LEARNING_RATE, "source": source},
                tables=tables, raw={"timing": {k: v.to_json() for k, v in timing.items()}},
                started=started)


if __name__ == "__main__":
    main()
