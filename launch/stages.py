"""Checks a recipe beyond its schema before anything starts, and dispatches stages.

``check_recipe`` is what ``medrl validate`` runs after the schema: the policy resolves to a
local model, the data loads with the field mapping, the rewards load and their keyword
arguments bind to their signatures. It returns a short list of what it checked.
"""

from __future__ import annotations

from pathlib import Path

from medrl.launch.recipe import Recipe, resolve_path


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

    from medrl.launch.data import load_dataset_rows

    rows = load_dataset_rows(recipe.data, recipe_dir)
    checked.append(f"data: {len(rows)} rows from {resolve_path(recipe_dir, recipe.data.path).name}")

    if recipe.rewards.functions:
        from medrl.rewards import load_rewards

        loaded = load_rewards([s.model_dump() for s in recipe.rewards.functions],
                              base_dir=recipe_dir, veto=recipe.rewards.veto)
        checked.append(f"{len(loaded)} reward(s) loaded, arguments bound")
    return checked


def run_stage(recipe: Recipe, run_dir: Path, *, resume_from: Path | None = None):
    """Dispatch on ``run.stage``; returns the last checkpoint folder."""
    stage = recipe.run.stage
    if stage == "grpo":
        from medrl.launch.driver import train

        return train(recipe, run_dir, resume_from=resume_from)
    from medrl.align.records import UserError

    raise UserError(f"run.stage: {stage!r} is not available in this version; "
                    "the stages that run are: grpo.")
