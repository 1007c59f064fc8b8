"""The run folder: created once, never silently overwritten, resumable from what it holds.

```
RUN_DIR/recipe.yaml      the fully resolved recipe, paths made absolute (what resume reads)
RUN_DIR/prompts.jsonl    per step: the uids of the prompts used (no text) - proves that no
                         prompt was lost or repeated across retries and resumes
RUN_DIR/metrics.jsonl, tensorboard/, plots/, checkpoints/
```
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from medrl.align.records import UserError
from medrl.launch.recipe import Recipe, dump_recipe, resolve_path


def absolute_recipe(recipe: Recipe, recipe_dir: Path) -> Recipe:
    """A copy with every local path made absolute, so the saved recipe works from anywhere."""
    r = recipe.model_copy(deep=True)
    r.run.recipe_dir = str(recipe_dir.resolve())
    r.data.path = str(resolve_path(recipe_dir, r.data.path).resolve())
    if r.data.eval_path:
        r.data.eval_path = str(resolve_path(recipe_dir, r.data.eval_path).resolve())
    if not r.model.policy.startswith("tiny:") and resolve_path(recipe_dir, r.model.policy).exists():
        r.model.policy = str(resolve_path(recipe_dir, r.model.policy).resolve())
    for spec in r.rewards.functions:  # path/to/file.py:function plugins
        file, sep, fn = spec.name.rpartition(":")
        if sep and file.endswith(".py"):
            spec.name = f"{resolve_path(recipe_dir, file).resolve()}:{fn}"
    if r.qat and r.qat.probe_path:
        r.qat.probe_path = str(resolve_path(recipe_dir, r.qat.probe_path).resolve())
    return r


def create_run_dir(recipe: Recipe, *, force: bool = False) -> Path:
    """``run.output_dir / run.name``; refuses a non-empty folder unless ``force``."""
    run_dir = Path(recipe.run.output_dir).expanduser() / recipe.run.name
    if run_dir.exists() and any(run_dir.iterdir()):
        if not force:
            raise UserError(
                f"run folder {run_dir} already exists and is not empty. Resume it with "
                f"`medrl resume {run_dir}`, pick another name (run.name=...), or pass --force "
                "to delete it and start again.")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))
    return run_dir


def load_run_recipe(run_dir: Path, overrides: list[str] = (), *, save: bool = True) -> Recipe:
    """The recipe saved in a run folder (validated again: it may have been edited).

    Overrides given on resume are written back (``save``), so the folder always holds the
    recipe that its latest steps ran with; ``save=False`` leaves the file as it is (``medrl
    validate RUN_DIR``, and ``medrl resume`` until the checkpoint has verified).
    """
    from medrl.launch.recipe import load_recipe

    if not (run_dir / "recipe.yaml").exists():
        raise UserError(f"{run_dir} is not a medrl run folder (no recipe.yaml). Pass the folder "
                        "that `medrl run` created, e.g. runs/quickstart.")
    recipe = load_recipe(run_dir / "recipe.yaml", list(overrides))
    if overrides and save:
        save_run_recipe(run_dir, recipe)
    return recipe


def save_run_recipe(run_dir: Path, recipe: Recipe) -> None:
    """Write ``recipe`` as the run folder's recipe.yaml (what the next resume reads)."""
    (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))


class PromptLog:
    """Appends the uids each step trained on; truncated to the resume point on resume."""

    def __init__(self, run_dir: Path, *, resume_step: int | None = None):
        self.path = run_dir / "prompts.jsonl"
        if resume_step is not None:
            for path in (self.path, run_dir / "completions.jsonl"):
                if path.exists():
                    kept = [line for line in path.read_text().splitlines()
                            if line and json.loads(line)["step"] <= resume_step]
                    path.write_text("".join(line + "\n" for line in kept))

    def write(self, step: int, uids: list[str]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "uids": uids}) + "\n")

    def write_completions(self, step: int, samples) -> None:
        """Prompts and completions with their rewards, for a recipe that asks to log text."""
        with (self.path.parent / "completions.jsonl").open("a") as f:
            for s in samples:
                f.write(json.dumps({"step": step, **s.to_log(include_text=True)}) + "\n")

    def read(self) -> list[dict]:
        return [json.loads(x) for x in self.path.read_text().splitlines() if x]
