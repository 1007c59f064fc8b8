"""The ``medrl`` command line.

Every user error (a bad recipe, a missing file, a bad sample) is printed as one paragraph
without a traceback and exits with code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from medrl.align.records import UserError
from medrl.launch.driver import RunFailed

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="medrl: distributed GRPO alignment for medical LLMs and VLMs.")
console = Console(stderr=True)


def user_error(exc: UserError) -> typer.Exit:
    console.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
    return typer.Exit(code=2)


@app.command()
def validate(recipe: Path = typer.Argument(..., help="recipe YAML"),
             overrides: Optional[List[str]] = typer.Argument(None, help="key.path=value ...")):
    """Check a recipe (schema, files, rewards) and print it fully resolved."""
    from medrl.launch.recipe import dump_recipe, load_recipe
    from medrl.launch.stages import check_recipe

    try:
        resolved = load_recipe(recipe, overrides or [])
        checked = check_recipe(resolved, recipe.parent)
    except UserError as exc:
        raise user_error(exc) from None
    typer.echo(dump_recipe(resolved), nl=False)
    console.print(f"[green]ok[/green]: {recipe} is valid ({'; '.join(checked)})", highlight=False)


@app.command()
def run(recipe: Path = typer.Argument(..., help="recipe YAML"),
        overrides: Optional[List[str]] = typer.Argument(None, help="key.path=value ..."),
        force: bool = typer.Option(False, "--force", help="replace a non-empty run folder")):
    """Start a run: a new folder under run.output_dir, then the recipe's stage."""
    from medrl.launch.recipe import load_recipe
    from medrl.launch.rundir import absolute_recipe, create_run_dir
    from medrl.launch.stages import check_recipe, run_stage

    try:
        resolved = load_recipe(recipe, overrides or [])
        check_recipe(resolved, recipe.parent)
        resolved = absolute_recipe(resolved, recipe.parent)
        run_dir = create_run_dir(resolved, force=force)
        run_stage(resolved, run_dir)
    except UserError as exc:
        raise user_error(exc) from None
    except RunFailed as exc:
        raise run_failed(exc) from exc


@app.command()
def resume(run_dir: Path = typer.Argument(..., help="a run folder made by `medrl run`"),
           overrides: Optional[List[str]] = typer.Argument(
               None, help="key.path=value ..., e.g. run.max_steps=200 to extend the run"),
           step: Optional[int] = typer.Option(None, "--step", help="checkpoint step (default: latest)")):
    """Continue a run from its latest (or a chosen) complete checkpoint, exactly.

    Overrides change the saved recipe for the rest of the run (and are saved back into it);
    anything but run.max_steps may make the continuation differ from an uninterrupted run.
    """
    from medrl.align.checkpoint import latest_checkpoint
    from medrl.launch.rundir import load_run_recipe
    from medrl.launch.stages import run_stage

    try:
        resolved = load_run_recipe(run_dir, overrides or [])
        ckpt = latest_checkpoint(run_dir, step=step)
        run_stage(resolved, run_dir, resume_from=ckpt)
    except UserError as exc:
        raise user_error(exc) from None
    except RunFailed as exc:
        raise run_failed(exc) from exc


def run_failed(exc: RunFailed) -> typer.Exit:
    """A component failed mid-run (not the user's fault): say so, and where to resume."""
    console.print(f"[bold red]run stopped:[/bold red] {exc}", highlight=False, soft_wrap=True)
    return typer.Exit(code=1)


@app.command()
def schema():
    """Print the recipe JSON Schema (point your editor's YAML plugin at it)."""
    from medrl.launch.recipe import json_schema

    typer.echo(json.dumps(json_schema(), indent=2))


# submit / logs / status / stop: Ray Jobs on a cluster (launch/submit.py)
from medrl.launch.submit import register as _register_job_commands  # noqa: E402

_register_job_commands(app)


def main() -> None:
    try:
        app()
    except UserError as exc:  # raised outside a command's own handler
        console.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
