"""The dpo stage from a recipe: preference pairs from data rows, and the learner group.

Each pair is a :class:`~medrl.align.records.Sample` with the row's chat messages (the prompt,
rendered by the data loader from ``data.template`` and ``data.fields``) and a ``row`` of two
response texts, ``chosen`` and ``rejected`` (:mod:`medrl.align.stages.dpo` encodes and trains
them). Two sources (``dpo.pairs``):

- ``explicit``: a row is one pair; its responses are in ``dpo.chosen_field`` and
  ``dpo.rejected_field`` (non-empty strings).
- ``mcq``: an ordinary multiple-choice row (``question``, ``options``, ``answer``, as the
  loader reads MedQA / MedMCQA: the letter in ``answer_idx`` or ``answer``, or the text of one
  option in ``answer``). The chosen response names the correct option, ``"Answer: B. <its
  text>"``; the rejected one names a distractor in the same words. The distractor is drawn by
  ``random.Random(f"{run.seed}/{row uid}")`` from the other letters in order: the same seed
  gives the same pairs whatever the row order, and another seed other distractors.

Pair uids are the row uids; the held-out split is made on rows (``data.eval_fraction``,
``data.eval_path``) before pairs are built, as in every stage.
"""

from __future__ import annotations

import random
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Literal, Sequence

from medrl.align.records import Sample, UserError
from medrl.launch.recipe import Recipe

PairSource = Literal["explicit", "mcq"]


def _response(row: dict, field: str, uid: str, side: str) -> str:
    value = row.get(field)
    if not isinstance(value, str) or not value.strip():
        got = ("missing or null" if value is None else "empty" if isinstance(value, str)
               else f"a {type(value).__name__}")
        raise UserError(f"sample {uid}: the {side} response in column {field!r} "
                        f"(dpo.{side}_field) must be a non-empty string; it is {got}. Fix "
                        f"the row, or set dpo.{side}_field to the column that holds it.")
    return value


def _pair(sample: Sample, chosen: str, rejected: str) -> Sample:
    return replace(sample, row={"chosen": chosen, "rejected": rejected})


def explicit_pair(sample: Sample, *, chosen_field: str, rejected_field: str) -> Sample:
    """The one pair of an explicit-pair row."""
    return _pair(sample, _response(sample.row, chosen_field, sample.uid, "chosen"),
                 _response(sample.row, rejected_field, sample.uid, "rejected"))


def mcq_answer(letter: str, text: str) -> str:
    """The response that names option ``letter``."""
    return f"Answer: {letter}. {text}".rstrip()


def mcq_pair(sample: Sample, *, seed: int) -> Sample:
    """The correct option against a distractor picked by ``seed`` (module docstring)."""
    from medrl.rewards.rules import gold_letter  # the answer key, read as the rewards read it

    options = sample.row.get("options")
    if not isinstance(options, dict) or len(options) < 2:
        raise UserError(f"sample {sample.uid}: dpo.pairs is mcq, but the row has no options "
                        "(or fewer than two); map data.fields.options to its options column.")
    try:
        gold = gold_letter(sample.row)
    except ValueError as exc:
        raise UserError(f"sample {sample.uid}: {exc}.") from None
    if gold is None:
        raise UserError(f"sample {sample.uid}: dpo.pairs is mcq, but the row has no answer; "
                        "map data.fields.answer to the column with the correct option.")
    wrong = sorted(k for k in options if k != gold)
    distractor = random.Random(f"{seed}/{sample.uid}").choice(wrong)
    return _pair(sample, mcq_answer(gold, str(options[gold])),
                 mcq_answer(distractor, str(options[distractor])))


def dpo_pairs(samples: Sequence[Sample], *, source: PairSource, chosen_field: str = "chosen",
              rejected_field: str = "rejected", seed: int = 0) -> list[Sample]:
    """One pair per row of ``samples`` (loaded rows), in row order."""
    if source == "mcq":
        return [mcq_pair(s, seed=seed) for s in samples]
    return [explicit_pair(s, chosen_field=chosen_field, rejected_field=rejected_field)
            for s in samples]


def recipe_pairs(recipe: Recipe, recipe_dir: Path | str | None
                 ) -> tuple[list[Sample], list[Sample]]:
    """(training pairs, held-out pairs) of a dpo recipe, from its rows split as every stage
    splits them; relative paths start at ``recipe_dir``."""
    from medrl.launch.data import load_train_eval
    from medrl.launch.recipe_dpo import DPOConfig

    d = recipe.dpo or DPOConfig()
    train, held = load_train_eval(recipe.data, base_dir=recipe_dir)
    options = dict(source=d.pairs, chosen_field=d.chosen_field, rejected_field=d.rejected_field,
                   seed=recipe.run.seed)
    return dpo_pairs(train, **options), dpo_pairs(held, **options)


def learner_problem(recipe: Recipe) -> str | None:
    """Why the recipe's learner settings cannot train the dpo stage, or None."""
    ln = recipe.learner
    if ln.ref_model == "none":
        return ("the dpo stage scores every response against a frozen reference model, but "
                "learner.ref_model is none; set it to auto (beside the policy) or cpu (with "
                "learner.lora the reference is the policy with its adapters off either way).")
    if ln.max_tokens_per_micro_batch is not None:
        return ("learner.max_tokens_per_micro_batch is not used by the dpo stage (a "
                "micro-batch holds whole preference pairs); set learner.micro_batch_size "
                "(pairs per micro-batch) instead.")
    return None


def check_dpo(recipe: Recipe, recipe_dir: Path | str | None) -> str:
    """What ``medrl validate`` reports for a dpo recipe: its pairs load, and its step count."""
    from medrl.align.stages.sft import total_steps
    from medrl.launch.recipe_dpo import DPOConfig

    problem = learner_problem(recipe)
    if problem:
        raise UserError(problem)
    d = recipe.dpo or DPOConfig()
    train, held = recipe_pairs(recipe, recipe_dir)
    steps = total_steps(max_steps=recipe.run.max_steps, epochs=d.epochs, num_train=len(train),
                        batch_size=d.batch_size)
    return f"dpo: {len(train)} training and {len(held)} held-out pairs, {steps} steps"


def run_dpo(recipe: Recipe, run_dir: Path, *, resume_from: Path | None = None):
    """The dpo stage: a learner group of ``learner.num_workers`` ranks (Ray actors, on the
    embedded or the given cluster), each with the frozen reference, trains on the pairs."""
    from medrl.align.models import load_tokenizer
    from medrl.align.reference import Reference
    from medrl.align.stages.dpo import DPOIO, run_stage
    from medrl.launch.driver import learner_kwargs, monitor_for, policy_folder
    from medrl.launch.stages import StageLearner
    from medrl.launch.recipe_dpo import DPOConfig
    from medrl.launch.stream import PromptStream

    d, ln = recipe.dpo or DPOConfig(), recipe.learner
    problem = learner_problem(recipe)
    if problem:
        raise UserError(problem)
    train, held = recipe_pairs(recipe, recipe.run.recipe_dir)
    stream = PromptStream(train, seed=recipe.run.seed, shuffle=recipe.data.shuffle,
                          load_media=False)
    stream.check_take(d.batch_size, field="dpo.batch_size")
    policy_dir = policy_folder(recipe, run_dir)
    # The reference is the starting policy: with LoRA the policy with its adapters off (no
    # second copy), else a frozen copy beside the policy or on the CPU.
    reference = (Reference.ADAPTERS if ln.lora else
                 Reference.CPU if ln.ref_model == "cpu" else Reference.BESIDE)
    # A micro-batch of learner.micro_batch_size pairs is twice as many responses.
    kwargs = dict(learner_kwargs(recipe), reference=reference, kl_coef=0.0,
                  micro_batch_size=2 * ln.micro_batch_size, temperature=1.0)
    make_learner = StageLearner(recipe, policy_dir, kwargs)

    io = DPOIO(
        stream=stream, eval_pairs=held, make_learner=make_learner,
        tokenizer=load_tokenizer(policy_dir), policy_source=str(policy_dir),
        monitor_factory=partial(monitor_for, recipe, run_dir),
        batch_size=d.batch_size, max_length=d.max_length, max_steps=recipe.run.max_steps,
        beta=d.beta, label_smoothing=d.label_smoothing, average_logprobs=d.average_logprobs,
        contrast=d.contrast, epochs=d.epochs, eval_every=d.eval_every,
        checkpoint_every=recipe.checkpoint.every, keep_last=recipe.checkpoint.keep_last,
        num_workers=ln.num_workers)
    try:
        return run_stage(io, run_dir, resume_from=resume_from)
    finally:
        make_learner.close()
