"""Evaluation inside a grpo run: the recipe's ``evaluation`` section as a driver callback.

Every ``evaluation.every`` steps and at the last step, after the new weights reached the
rollout engines, the datasets are scored by :func:`medrl.launch.evaluate.evaluate_dataset` on
those engines (no second model copy) and logged as ``eval/<dataset>/<metric>`` (the value;
its interval is in docs/eval.md's terms: ``eval/<dataset>/<metric>_low`` / ``_high``), with
``time/evaluate``. Log-likelihood scoring draws no random numbers and generation is seeded by
(run seed, step), so a run evaluates the same way resumed or not, and the training stream,
which never sees these items, is untouched.
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
    return [load_eval_dataset(dataset_spec(spec, recipe_dir), root=root,
                              max_samples=ev.max_samples, fields=dict(ev.fields))
            for spec in ev.datasets]


def training_evaluation(recipe: Recipe, run_dir: Path) -> Callable[[int, Any], dict] | None:
    """The callback ``(step, components) -> metrics`` of ``recipe.evaluation`` (None without
    one)."""
    if recipe.evaluation is None:
        return None
    from medrl.align.encode import text_tokenizer
    from medrl.align.models import load_tokenizer
    from medrl.launch.evaluate import EvalOptions, dataset_results, evaluate_dataset
    from medrl.launch.evaluate import rubric_grader

    ev, last = recipe.evaluation, recipe.run.max_steps
    recipe_dir = Path(recipe.run.recipe_dir or ".")
    datasets = load_datasets(recipe, recipe_dir)
    state: dict[str, Any] = {}

    def evaluate(step: int, c) -> dict[str, float]:
        if step % ev.every and step != last:
            return {}
        started = time.perf_counter()
        if not state:  # built on first use, from the policy the run trains
            state["tokenizer"] = text_tokenizer(load_tokenizer(c.policy_dir))
            opts = EvalOptions(mode=ev.mode, max_new_tokens=ev.max_new_tokens,
                               seed=recipe.run.seed, judge=ev.judge)
            state["opts"] = opts
            state["grader"] = (rubric_grader(opts, run_dir / "eval")
                               if any(d.kind == "rubric" for d in datasets) else None)
        opts = state["opts"]
        seeded = dataclasses.replace(opts, seed=recipe.run.seed * 1_000_003 + step)
        max_len = recipe.rollout.max_prompt_tokens + recipe.rollout.max_new_tokens
        out: dict[str, float] = {}
        for ds in datasets:
            preds, too_long = evaluate_dataset(c.rollouts, state["tokenizer"], ds, seeded,
                                               max_len, state["grader"])
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
