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

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="medrl: distributed GRPO alignment for medical LLMs and VLMs.")
console = Console(stderr=True)
out = Console()


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
    out.print(dump_recipe(resolved), end="", highlight=False, markup=False)
    console.print(f"[green]ok[/green]: {recipe} is valid ({'; '.join(checked)})", highlight=False)


@app.command()
def schema():
    """Print the recipe JSON Schema (point your editor's YAML plugin at it)."""
    from medrl.launch.recipe import json_schema

    out.print(json.dumps(json_schema(), indent=2), highlight=False, markup=False)


def main() -> None:
    try:
        app()
    except UserError as exc:  # raised outside a command's own handler
        console.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
