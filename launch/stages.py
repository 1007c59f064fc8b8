"""Checks a recipe beyond its schema before anything starts, and dispatches stages.

``check_recipe`` is what ``medrl validate`` runs after the schema: the policy resolves to a
local model, the data loads with the field mapping, the rewards load and their keyword
arguments bind to their signatures. It returns a short list of what it checked.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from medrl.launch.recipe import (RUNNABLE_STAGES, QATConfig, Recipe, qat_schedule_problem,
                                 resolve_path, stage_not_runnable)


def check_recipe(recipe: Recipe, recipe_dir: Path) -> list[str]:
    checked = ["schema"]
    if recipe.model.policy.startswith("tiny:"):
        from medrl.align.models import TINY_ARCHS, tiny_config

        arch = recipe.model.policy.split(":", 1)[1]
        if arch not in TINY_ARCHS:
            tiny_config(arch, 0, {})  # raises a UserError naming the choices
        checked.append(f"policy {recipe.model.policy}")
    else:
        from medrl.align.models import resolve_policy

        resolve_policy(recipe.model.policy, base_dir=recipe_dir)
        checked.append("policy folder")

    if recipe.data is not None:
        from medrl.launch.data import load_dataset_rows

        rows = load_dataset_rows(recipe.data, recipe_dir)
        checked.append(f"data: {len(rows)} rows from "
                       f"{resolve_path(recipe_dir, recipe.data.path).name}")
    if recipe.evaluation is not None:
        from medrl.launch.eval_hook import load_datasets

        loaded_eval = load_datasets(recipe, recipe_dir)
        checked.append("evaluation: " + ", ".join(f"{d.name} ({len(d.items)} items)"
                                                  for d in loaded_eval))
    if recipe.run.stage == "reward_model":
        train, held = reward_model_pairs(recipe, recipe_dir)
        checked.append(f"reward_model: {len(train)} training and {len(held)} held-out pairs")
    if recipe.run.stage == "dpo":
        from medrl.launch.dpo_stage import check_dpo

        checked.append(check_dpo(recipe, recipe_dir))
    if recipe.run.stage == "distill":
        from medrl.launch.distill_stage import check_distill

        checked.append(check_distill(recipe, recipe_dir))
    if recipe.run.stage == "qat" and recipe.sft is not None and recipe.sft.epochs is not None:
        checked.append(_check_qat_epochs(recipe, recipe_dir))

    if recipe.rewards.functions:
        from medrl.rewards import load_rewards

        loaded = load_rewards([s.model_dump() for s in recipe.rewards.functions],
                              base_dir=recipe_dir,
                              veto=[v.model_dump() for v in recipe.rewards.veto])
        for r in loaded:  # a class reward's __init__ is cheap and checks its own arguments
            if r.kind == "class":
                r.target(**r.kwargs)
        checked.append(f"{len(loaded)} reward(s) loaded, arguments bound")
    return checked


def _check_qat_epochs(recipe: Recipe, recipe_dir: Path) -> str:
    """With sft.epochs the qat stage's step count depends on the training rows: it must exceed
    the warm-up (the schema checks run.max_steps when sft.epochs is not set)."""
    from medrl.align.records import UserError
    from medrl.align.stages.sft import total_steps
    from medrl.launch.data import load_train_eval

    sft = recipe.sft
    train, _ = load_train_eval(recipe.data, base_dir=recipe_dir)  # split by data.split_seed
    steps = total_steps(max_steps=recipe.run.max_steps, epochs=sft.epochs,
                        num_train=len(train), batch_size=sft.batch_size)
    problem = qat_schedule_problem(steps, (recipe.qat or QATConfig()).warmup_steps,
                                   f"sft.epochs {sft.epochs} x {len(train)} training rows / "
                                   f"sft.batch_size {sft.batch_size}")
    if problem:
        raise UserError(problem)
    return f"qat: {steps} steps"


def run_stage(recipe: Recipe, run_dir: Path, *, resume_from: Path | None = None):
    """Dispatch on ``run.stage``; returns the last checkpoint folder."""
    stage = recipe.run.stage
    if stage not in RUNNABLE_STAGES:  # the schema refuses these; a hand-built Recipe may not
        from medrl.align.records import UserError

        raise UserError(stage_not_runnable(stage))
    if stage == "grpo":
        from medrl.launch.driver import train

        return train(recipe, run_dir, resume_from=resume_from)
    if stage == "reward_model":
        return run_reward_model(recipe, run_dir, resume_from=resume_from)
    if stage == "dpo":
        from medrl.launch.dpo_stage import run_dpo

        return run_dpo(recipe, run_dir, resume_from=resume_from)
    if stage == "distill":
        from medrl.launch.distill_stage import run_distill

        return run_distill(recipe, run_dir, resume_from=resume_from)
    if stage == "eval":
        from medrl.align.records import UserError
        from medrl.launch.eval_hook import run_eval_stage

        if resume_from is not None:
            raise UserError("an eval stage has no checkpoint to resume from: start it again "
                            "with `medrl run` (or `medrl eval RECIPE`).")
        return run_eval_stage(recipe, run_dir)
    from medrl.align.stages.sft import run_stage as run_sft_stage

    return run_sft_stage(stage_io(recipe, run_dir), run_dir, resume_from=resume_from,
                         hooks=qat_hooks(recipe) if stage == "qat" else None, stage=stage)


def stage_io(recipe: Recipe, run_dir: Path):
    """The sft / qat stage's inputs from the recipe: policy, data stream, monitor, learner."""
    from medrl.align.records import UserError
    from medrl.align.stages.sft import ExampleSpec, StageIO
    from medrl.launch.data import load_media
    from medrl.launch.eval_hook import sft_evaluation
    from medrl.launch.stream import PromptStream
    from medrl.launch.driver import learner_kwargs, monitor_for, policy_folder
    from medrl.launch.recipe import SFTConfig

    if recipe.learner.num_workers != 1:
        raise UserError(f"learner.num_workers is {recipe.learner.num_workers}, but the "
                        f"{recipe.run.stage} stage trains one learner in the launching process; "
                        "set learner.num_workers: 1.")
    sft = recipe.sft or SFTConfig()
    stream = PromptStream.from_recipe(recipe.data, seed=recipe.run.seed,
                                      recipe_dir=Path(recipe.run.recipe_dir or "."))
    stream.check_take(sft.batch_size, field="sft.batch_size")
    kwargs = dict(learner_kwargs(recipe), reference="none", kl_coef=0.0)
    return StageIO(
        policy_dir=policy_folder(recipe, run_dir),
        stream=stream,
        eval_samples=[load_media(s, recipe.data.volume) for s in stream.eval_samples],
        monitor_factory=partial(monitor_for, recipe, run_dir),
        learner_kwargs=kwargs,
        spec=ExampleSpec(response_field=sft.response_field, weight_field=sft.weight_field,
                         abnormal_weight=sft.abnormal_weight, max_length=sft.max_length,
                         prompt_template=sft.prompt_template),
        batch_size=sft.batch_size, max_steps=recipe.run.max_steps, epochs=sft.epochs,
        eval_every=sft.eval_every, checkpoint_every=recipe.checkpoint.every,
        keep_last=recipe.checkpoint.keep_last,
        evaluate=sft_evaluation(recipe, run_dir) if recipe.run.stage == "sft" else None)


def qat_hooks(recipe: Recipe):
    """The qat stage's hooks from ``recipe.qat``; the probe rows load like any MCQ data."""
    from rich.console import Console

    from medrl.align.stages.qat import QATHooks
    from medrl.rewards.rules import gold_letter  # the answer extractor labels the probe
    from medrl.launch.data import load_media, load_samples
    from medrl.launch.recipe import DataConfig, QATConfig

    q = recipe.qat or QATConfig()
    probe = []
    if q.probe_path:
        cfg = DataConfig(path=q.probe_path, template="mcq", system_prompt=recipe.data.system_prompt,
                         max_samples=q.probe_max_samples, volume=recipe.data.volume)
        probe = [load_media(s, recipe.data.volume)
                 for s in load_samples(cfg, base_dir=recipe.run.recipe_dir)]
    return QATHooks(fmt=q.format, warmup_steps=q.warmup_steps, qat_lr=q.qat_lr,
                    history=q.amax_history, reduction=q.amax_reduction, margin=q.margin,
                    clip_warn_threshold=q.clip_warn_threshold, probe_samples=probe,
                    probe_every=q.probe_every, export_fake_quant=q.export_fake_quant,
                    console=Console(stderr=True), gold_letter=gold_letter)


def reward_model_pairs(recipe: Recipe, recipe_dir: Path | str | None):
    """(training pairs, held-out pairs) of a reward_model recipe (:mod:`medrl.launch.preferences`),
    from its rows split as every stage splits them; relative paths start at ``recipe_dir``."""
    from medrl.launch.data import load_train_eval
    from medrl.launch.preferences import preference_pairs
    from medrl.launch.recipe import RewardModelConfig

    rm = recipe.reward_model or RewardModelConfig()
    train, held = load_train_eval(recipe.data, base_dir=recipe_dir)
    options = dict(source=rm.pairs, chosen_field=rm.chosen_field,
                   rejected_field=rm.rejected_field, criterion_field=rm.criterion_field,
                   tier_field=rm.tier_field, responses_field=rm.responses_field)
    return preference_pairs(train, **options), preference_pairs(held, **options)


class StageLearner:
    """A stage's learner group, started when the stage loop asks for it (it knows the total
    steps only after reading its data): ``learner.num_workers`` ranks with the recipe's
    cluster reservations, on the embedded or the given cluster; ``close()`` shuts it down.
    kwargs: the learner's plain keyword arguments (``total_steps`` is added)."""

    def __init__(self, recipe: Recipe, policy_dir: Path, kwargs: dict):
        self.recipe, self.policy_dir, self.kwargs = recipe, policy_dir, kwargs
        self.group = None

    def __call__(self, total: int):
        from medrl.launch.cluster import start_ray
        from medrl.launch.learner_group import LearnerGroup

        ln, c = self.recipe.learner, self.recipe.cluster
        start_ray(self.recipe)
        self.group = LearnerGroup(ln.num_workers, self.policy_dir,
                                  dict(self.kwargs, total_steps=total),
                                  num_cpus_per_worker=c.learner_cpus,
                                  num_gpus_per_worker=c.learner_gpus,
                                  resources=c.learner_resources)
        return self.group

    def close(self) -> None:
        if self.group is not None:
            self.group.shutdown()


def run_reward_model(recipe: Recipe, run_dir: Path, *, resume_from: Path | None = None):
    """The reward_model stage: a learner group of ``learner.num_workers`` ranks (Ray actors,
    on the embedded or the given cluster) trains a value head on preference pairs."""
    from medrl.align.models import load_tokenizer
    from medrl.align.records import UserError
    from medrl.align.stages.reward_model import RewardModelIO, run_stage as run_rm_stage
    from medrl.launch.driver import learner_kwargs, monitor_for, policy_folder
    from medrl.launch.recipe import RewardModelConfig
    from medrl.launch.stream import PromptStream

    rm, ln = recipe.reward_model or RewardModelConfig(), recipe.learner
    if ln.max_tokens_per_micro_batch is not None:
        raise UserError("learner.max_tokens_per_micro_batch is not used by the reward_model "
                        "stage (a micro-batch holds whole preference pairs); set "
                        "learner.micro_batch_size (pairs per micro-batch) instead.")
    train, held = reward_model_pairs(recipe, recipe.run.recipe_dir)
    if not train:
        raise UserError(f"the reward_model stage found no preference pair in the training rows "
                        f"of {recipe.data.path}; check reward_model.pairs and its fields.")
    stream = PromptStream(train, seed=recipe.run.seed, shuffle=recipe.data.shuffle,
                          load_media=False)
    stream.check_take(rm.batch_size, field="reward_model.batch_size")
    policy_dir = policy_folder(recipe, run_dir)
    # A micro-batch of learner.micro_batch_size pairs is twice as many texts.
    kwargs = dict(learner_kwargs(recipe), reference="none", kl_coef=0.0, head="value",
                  micro_batch_size=2 * ln.micro_batch_size, temperature=1.0)
    make_learner = StageLearner(recipe, policy_dir, kwargs)

    io = RewardModelIO(
        stream=stream, eval_pairs=held, make_learner=make_learner,
        tokenizer=load_tokenizer(policy_dir), policy_source=str(policy_dir),
        monitor_factory=partial(monitor_for, recipe, run_dir),
        batch_size=rm.batch_size, max_length=rm.max_length, max_steps=recipe.run.max_steps,
        epochs=rm.epochs, eval_every=rm.eval_every, checkpoint_every=recipe.checkpoint.every,
        keep_last=recipe.checkpoint.keep_last)
    try:
        return run_rm_stage(io, run_dir, resume_from=resume_from)
    finally:
        make_learner.close()
