"""Evaluation from a recipe: the ``evaluation`` section inside a grpo or sft run, or as a stage.

Inside training, every ``evaluation.every`` steps and at the last step the datasets are scored
by :func:`medrl.launch.evaluate.evaluate_dataset` on the current weights, with no second model
copy: a grpo run scores them on its rollout engines, after the new weights reached them; an
sft run on the learner's own model, wrapped as an HF engine
(:meth:`medrl.rollouts.hf_engine.HFEngine.around`). The figures are logged as
``eval/<dataset>/<metric>`` (the value; its interval as ``..._low`` / ``..._high``), with
``time/evaluate``. Log-likelihood scoring draws no random numbers and generation is seeded by
(run seed, step) under a forked RNG, so a run evaluates the same way resumed or not, and the
training stream, which never sees these items, is untouched.

``run.stage: eval`` (:func:`run_eval_stage`) scores ``model.policy`` (or each of
``evaluation.checkpoints`` of a run folder) on ``rollout.num_workers`` engines of
``rollout.backend``, with the recipe's ``rewards.functions`` (keyword arguments included) as
reward metrics, and writes the report of ``medrl eval`` into the run folder.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

from medrl.launch.recipe import Recipe


def dataset_spec(spec: str, recipe_dir: Path) -> str:
    """A preset name as it is; a data file relative to the recipe's folder when it is there."""
    path = Path(spec).expanduser()
    if not path.is_absolute() and (recipe_dir / path).is_file():
        return str(recipe_dir / path)
    return spec


def load_datasets(recipe: Recipe, recipe_dir: Path) -> list:
    """The evaluation datasets of a recipe (UserError naming the one that cannot load)."""
    from medrl.launch.eval_data import data_root, load_eval_dataset

    ev = recipe.evaluation
    root = data_root(recipe_dir / ev.data_root if ev.data_root else None)
    # an sft run's benchmarks are prompted as it trains, unless the section says otherwise
    sft = recipe.sft if recipe.run.stage == "sft" else None
    system = ev.system_prompt or (recipe.data.system_prompt if sft and recipe.data else None)
    template = ev.prompt_template or (sft.prompt_template if sft else None)
    return [load_eval_dataset(dataset_spec(spec if isinstance(spec, str) else spec.path,
                                           recipe_dir), root=root, max_samples=ev.max_samples,
                              fields={**ev.fields, **({} if isinstance(spec, str)
                                                      else spec.fields)},
                              system_prompt=system, prompt_template=template)
            for spec in ev.datasets]


def eval_options(recipe: Recipe):
    """The :class:`~medrl.launch.evaluate.EvalOptions` of ``recipe.evaluation``; the reward
    metrics are the recipe's ``rewards.functions`` (an eval stage's; a training run's rewards
    are its training signal and are already logged)."""
    from medrl.launch.evaluate import EvalOptions

    ev = recipe.evaluation
    rewards = (tuple(r.model_dump() for r in recipe.rewards.functions)
               if recipe.run.stage == "eval" else ())
    return EvalOptions(mode=ev.mode, samples=ev.samples, temperature=ev.temperature,
                       max_new_tokens=ev.max_new_tokens, seed=recipe.run.seed,
                       log_text=ev.log_text, judge=ev.judge, judge_scorer=ev.judge_scorer,
                       rewards=rewards)


def training_evaluation(recipe: Recipe, run_dir: Path,
                        engines_of: Callable[[Any], tuple[Any, Any]], max_len: int
                        ) -> Callable[[int, Any], dict] | None:
    """The callback ``(step, x) -> metrics`` of ``recipe.evaluation`` (None without one);
    ``engines_of(x) -> (engine group, tokenizer or processor)``: where the current weights are
    scored (the grpo driver's components, the sft stage's learner); ``max_len``: the tokens an
    item may take (prompt and continuation or completion); longer ones count as too long."""
    if recipe.evaluation is None:
        return None
    from medrl.launch.eval_scoring import dataset_results
    from medrl.launch.evaluate import evaluate_dataset, rubric_grader

    ev, last = recipe.evaluation, recipe.run.max_steps
    datasets = load_datasets(recipe, Path(recipe.run.recipe_dir or "."))
    opts = eval_options(recipe)
    grader: list = []  # built on first use, once Ray (the judge's cluster) is up

    def evaluate(step: int, x) -> dict[str, float]:
        if step % ev.every and step != last:
            return {}
        started = time.perf_counter()
        if not grader:
            grader.append(rubric_grader(opts, run_dir / "eval")
                          if any(d.kind == "rubric" for d in datasets) else None)
        engines, tokenizer = engines_of(x)
        seeded = dataclasses.replace(opts, seed=recipe.run.seed * 1_000_003 + step)
        out: dict[str, float] = {}
        for ds in datasets:
            preds, too_long = evaluate_dataset(engines, tokenizer, ds, seeded, max_len,
                                               grader[0])
            result = dataset_results(ds, preds, ev.mode, too_long, seeded.seed)
            for metric, m in result["metrics"].items():
                out[f"eval/{ds.name}/{metric}"] = m["value"]
                out[f"eval/{ds.name}/{metric}_low"] = m["low"]
                out[f"eval/{ds.name}/{metric}_high"] = m["high"]
            out[f"eval/{ds.name}/n"] = float(result["n"])
            out[f"eval/{ds.name}/too_long"] = float(too_long)
        out["time/evaluate"] = time.perf_counter() - started
        return out

    return evaluate


def grpo_evaluation(recipe: Recipe, run_dir: Path) -> Callable[[int, Any], dict] | None:
    """The grpo driver's callback ``(step, components)``: scored on the rollout engines."""
    from medrl.align.models import load_tokenizer

    processors: dict[Path, Any] = {}

    def engines_of(c):
        if c.policy_dir not in processors:
            processors[c.policy_dir] = load_tokenizer(c.policy_dir)
        return c.rollouts, processors[c.policy_dir]

    max_len = recipe.rollout.max_prompt_tokens + recipe.rollout.max_new_tokens
    return training_evaluation(recipe, run_dir, engines_of, max_len)


def sft_evaluation(recipe: Recipe, run_dir: Path) -> Callable[[int, Any], dict] | None:
    """The sft stage's callback ``(step, learner)``: scored on the learner's model itself,
    in eval mode (the next training step puts it back in training mode)."""
    if recipe.evaluation is None:
        return None
    from medrl.rollouts.hf_engine import HFEngine

    wrapped: list = []

    def engines_of(learner):
        if not wrapped:
            wrapped.append(HFEngine.around(learner.model, learner.tokenizer,
                                           seed=recipe.run.seed))
        learner.model.eval()
        return wrapped[0], learner.tokenizer

    from medrl.align.models import context_length, resolve_policy
    from medrl.launch.recipe import SFTConfig

    # the answers the stage trains on fit sft.max_length; generation adds max_new_tokens
    max_len = (recipe.sft or SFTConfig()).max_length + recipe.evaluation.max_new_tokens
    positions = context_length(resolve_policy(recipe.model.policy, seed=recipe.run.seed))
    return training_evaluation(recipe, run_dir, engines_of,
                               min(max_len, positions) if positions else max_len)


def run_eval_stage(recipe: Recipe, run_dir: Path) -> None:
    """``run.stage: eval``: the report of ``medrl eval`` in ``run_dir`` (module docstring);
    with ``evaluation.checkpoints``, one report per checkpoint in ``run_dir/step-N`` and the
    comparison in ``run_dir``."""
    from medrl.launch.cluster import start_ray
    from medrl.launch.eval_report import write_comparison
    from medrl.launch.evaluate import run_checkpoints, run_eval

    ev, rollout = recipe.evaluation, recipe.rollout
    datasets = load_datasets(recipe, Path(recipe.run.recipe_dir or "."))
    opts = eval_options(recipe)
    start_ray(recipe)
    engine_kwargs = dict(workers=rollout.num_workers, backend=rollout.backend,
                         cpus_per_worker=recipe.cluster.rollout_cpus,
                         max_model_len=rollout.max_prompt_tokens + ev.max_new_tokens)
    if ev.checkpoints is None:
        run_eval(recipe.model.policy, datasets, run_dir, opts, **engine_kwargs)
        return
    entries = []
    for ckpt in run_checkpoints(Path(recipe.model.policy), ev.checkpoints):
        results, _ = run_eval(str(ckpt), datasets, run_dir / ckpt.name, opts, **engine_kwargs)
        entries.append({"model": Path(recipe.model.policy).name,
                        "step": int(ckpt.name.split("-")[1]), "results": results})
    write_comparison(run_dir, entries)
