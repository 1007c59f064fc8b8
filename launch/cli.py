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


def say(text: str) -> None:
    """A note that does not stop the command."""
    console.print(f"[bold]note:[/bold] {text}", highlight=False, soft_wrap=True)


def user_error(exc: UserError) -> typer.Exit:
    console.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
    return typer.Exit(code=2)


@app.command()
def validate(recipe: Path = typer.Argument(..., help="recipe YAML, or a run folder"),
             overrides: Optional[List[str]] = typer.Argument(None, help="key.path=value ...")):
    """Check a recipe (schema, files, rewards) and print it fully resolved.

    Given a run folder, check its saved recipe.yaml (overrides are applied, not saved) and
    verify the checksums of every complete checkpoint in it.
    """
    from medrl.launch.recipe import dump_recipe, load_recipe
    from medrl.launch.rundir import load_run_recipe
    from medrl.launch.stages import check_recipe

    run_dir = recipe if recipe.is_dir() else None
    try:
        if run_dir is not None:
            resolved = load_run_recipe(run_dir, overrides or [], save=False)
            recipe = run_dir / "recipe.yaml"
            base = Path(resolved.run.recipe_dir or run_dir)
        else:
            resolved = load_recipe(recipe, overrides or [])
            base = recipe.parent
        checked = check_recipe(resolved, base)
    except UserError as exc:
        raise user_error(exc) from None
    typer.echo(dump_recipe(resolved), nl=False)
    console.print(f"[green]ok[/green]: {recipe} is valid ({'; '.join(checked)})", highlight=False)
    if run_dir is not None:
        try:
            verify_run_checkpoints(run_dir)
        except UserError as exc:
            raise user_error(exc) from None


def verify_run_checkpoints(run_dir: Path) -> None:
    """Verify every complete checkpoint of a run, one line each; UserError if any is damaged."""
    from medrl.align.checkpoint import list_checkpoints, resume_advice, verify_checkpoint

    found = list_checkpoints(run_dir)
    if not found:
        console.print(f"no complete checkpoint in {run_dir} yet", highlight=False)
    problems: dict[Path, str] = {}
    for path in found:
        try:
            files = verify_checkpoint(path)
        except UserError as exc:
            problems[path] = str(exc)
            console.print(f"[bold red]damaged[/bold red]: checkpoint {path.name}", highlight=False)
            continue
        size = sum((path / rel).stat().st_size for rel in files) / 2**20
        console.print(f"[green]ok[/green]: checkpoint {path.name} verified ({len(files)} files, "
                      f"{size:.1f} MiB)", highlight=False)
    if not problems:
        return
    good = [p for p in found if p not in problems]
    summary = " ".join(problems.values())
    if found[-1] not in problems:
        raise UserError(f"{summary} The newest checkpoint, {found[-1].name}, verifies: "
                        f"`medrl resume {run_dir}` continues from it.")
    raise UserError(f"{summary} {resume_advice(run_dir, good[-1] if good else None)}")


@app.command()
def run(recipe: Path = typer.Argument(..., help="recipe YAML"),
        overrides: Optional[List[str]] = typer.Argument(None, help="key.path=value ..."),
        force: bool = typer.Option(False, "--force", help="replace a non-empty run folder")):
    """Start a run: a new folder under run.output_dir, then the recipe's stage."""
    from medrl.launch.recipe import load_recipe
    from medrl.launch.rundir import absolute_recipe, new_run
    from medrl.launch.stages import check_recipe, run_stage

    try:
        resolved = load_recipe(recipe, overrides or [])
        check_recipe(resolved, recipe.parent)
        resolved = absolute_recipe(resolved, recipe.parent)
        with new_run(resolved, force=force, say=say) as run_dir:  # locked until the run ends
            run_stage(resolved, run_dir)
    except UserError as exc:
        raise user_error(exc) from None
    except RunFailed as exc:
        raise run_failed(exc) from exc


@app.command()
def resume(run_dir: Path = typer.Argument(..., help="a run folder made by `medrl run`"),
           overrides: Optional[List[str]] = typer.Argument(
               None, help="key.path=value ..., e.g. run.max_steps=200 to extend the run"),
           step: Optional[int] = typer.Option(None, "--step",
                                              help="checkpoint step (default: latest)")):
    """Continue a run from its latest (or a chosen) complete checkpoint, exactly.

    The checkpoint's checksums are verified first; a damaged one is refused, naming the file
    and the newest earlier checkpoint that verifies. Resuming from an earlier --step moves the
    later checkpoints to RUN_DIR/abandoned/ (kept, no longer resumed or pruned).

    Overrides change the saved recipe for the rest of the run (and are saved back into it);
    anything but run.max_steps may make the continuation differ from an uninterrupted run.
    """
    from medrl.align.checkpoint import verified_checkpoint
    from medrl.launch.rundir import (RunLock, check_run_logs, load_run_recipe, save_run_recipe,
                                     set_aside_after)
    from medrl.launch.stages import run_stage

    try:
        resolved = load_run_recipe(run_dir, overrides or [], save=False)
        with RunLock(run_dir, say=say):  # one writer per run folder, until the run ends
            ckpt = verified_checkpoint(run_dir, step=step)  # every file's checksum, first
            check_run_logs(run_dir)
            set_aside_after(run_dir, ckpt, say=say)
            if overrides:
                save_run_recipe(run_dir, resolved)
            run_stage(resolved, run_dir, resume_from=ckpt)
    except UserError as exc:
        raise user_error(exc) from None
    except RunFailed as exc:
        raise run_failed(exc) from exc


def run_failed(exc: RunFailed) -> typer.Exit:
    """A component failed mid-run (not the user's fault): say so, and where to resume."""
    console.print(f"[bold red]run stopped:[/bold red] {exc}", highlight=False, soft_wrap=True)
    return typer.Exit(code=1)


@app.command(name="eval")
def eval_(ctx: typer.Context,
          targets: List[str] = typer.Argument(..., help="run folder(s), checkpoint folder(s), "
                                              "HF model folder(s), tiny:qwen2; or one recipe "
                                              "YAML of run.stage eval, then key.path=value "
                                              "overrides"),
          datasets: Optional[str] = typer.Option(None, "--datasets", "-d",
                                                 help="comma-separated presets (medqa, medmcqa, "
                                                      "pubmedqa, pubmedqa_pqal, healthbench, "
                                                      "ct_rate_mcq) or data files"),
          data_root: Optional[Path] = typer.Option(None, "--data-root",
                                                   help="folder of the preset files "
                                                        "(default $MEDRL_DATA_DIR)"),
          max_samples: Optional[int] = typer.Option(None, "--max-samples", min=1,
                                                    help="first N items of each dataset"),
          fields: Optional[List[str]] = typer.Option(None, "--field",
                                                     help="NAME=COLUMN field mapping for "
                                                          "data files, as data.fields"),
          mode: str = typer.Option("loglik", "--mode", help="loglik or generate"),
          samples: int = typer.Option(1, "--samples", min=1,
                                      help="generate: completions per item (1 = greedy)"),
          temperature: float = typer.Option(1.0, "--temperature", min=0.0),
          max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1),
          workers: int = typer.Option(1, "--workers", min=1, help="engine actors"),
          backend: str = typer.Option("hf", "--backend", help="hf or vllm"),
          out: Optional[Path] = typer.Option(None, "--out", help="report folder (default "
                                             "RUN_DIR/eval/<checkpoint> or eval/<model>)"),
          seed: int = typer.Option(0, "--seed"),
          log_text: bool = typer.Option(False, "--log-text",
                                        help="keep completion texts in predictions.jsonl"),
          judge: Optional[str] = typer.Option(None, "--judge",
                                              help="rubric datasets: the criterion scorer's "
                                                   "model (folder, reward_model run, tiny:qwen2)"),
          judge_scorer: str = typer.Option("reward_model", "--judge-scorer",
                                           help="reward_model or judge (a generative judge LM)"),
          reward: Optional[List[str]] = typer.Option(None, "--reward",
                                                     help="a reward plugin as a metric of "
                                                          "generated items (repeatable)"),
          reward_args: Optional[List[str]] = typer.Option(
              None, "--reward-arg", help="NAME.KEY=VALUE: a keyword argument of a --reward "
              "(YAML value), e.g. mcq_letter.strict=true"),
          system_prompt: Optional[str] = typer.Option(None, "--system-prompt",
                                                      help="every prompt's system message"),
          prompt_template: Optional[str] = typer.Option(
              None, "--prompt-template", help="extraction sets: the user message, filled "
              "from the row's columns ({dialogue}); e.g. the sft recipe's sft.prompt_template"),
          checkpoints: Optional[str] = typer.Option(None, "--checkpoints",
                                                    help="a run folder's checkpoints to "
                                                         "compare: all, or steps like 100,200"),
          force: bool = typer.Option(False, "--force", help="recipe: replace a non-empty run "
                                     "folder")):
    """Score models on medical benchmarks (see docs/eval.md).

    Writes results.json (every figure with its n and 95% interval), per-item predictions,
    summary.md and plots/accuracy.png, and prints the summary. Several targets (or
    --checkpoints) are compared in one table, compare.md, and plots/compare.png.
    """
    from medrl.launch.cluster import start_cluster
    from medrl.launch.eval_data import data_root as resolve_root, load_eval_dataset
    from medrl.launch.eval_report import write_comparison
    from medrl.launch.evaluate import (EvalOptions, default_out_dir, resolve_target,
                                       run_checkpoints, run_eval)
    from medrl.launch.recipe import ClusterConfig

    try:
        if Path(targets[0]).suffix in (".yaml", ".yml") and Path(targets[0]).is_file():
            given = [f"--{n.replace('_', '-')}" for n in ctx.params
                     if n not in ("targets", "force") and ctx.get_parameter_source(n).name
                     == "COMMANDLINE"]
            if given:
                raise UserError(f"{targets[0]} is a recipe: its evaluation: section says what "
                                f"to score, so {', '.join(given)} do(es) not apply; write them "
                                "as overrides (e.g. evaluation.max_samples=50).")
            return eval_recipe(Path(targets[0]), targets[1:], force=force)
        if datasets is None:
            raise UserError("name the datasets: --datasets medqa,pubmedqa (presets) or data "
                            "files.")
        if mode not in ("loglik", "generate"):
            raise UserError(f"--mode must be loglik or generate, not {mode!r}.")
        if backend not in ("hf", "vllm"):
            raise UserError(f"--backend must be hf or vllm, not {backend!r}.")
        if judge_scorer not in ("reward_model", "judge"):
            raise UserError(f"--judge-scorer must be reward_model or judge, not {judge_scorer!r}.")
        mapping = {}
        for item in fields or []:
            name, sep, column = item.partition("=")
            if not sep or not name or not column:
                raise UserError(f"--field {item!r}: write NAME=COLUMN, e.g. answer=answer_idx.")
            mapping[name] = column
        root = resolve_root(data_root)
        loaded = [load_eval_dataset(spec.strip(), root=root, max_samples=max_samples,
                                    fields=mapping, system_prompt=system_prompt,
                                    prompt_template=prompt_template)
                  for spec in datasets.split(",") if spec]
        names = [resolve_target(t, seed=seed)[1] for t in targets]
        opts = EvalOptions(mode=mode, samples=samples, temperature=temperature,
                           max_new_tokens=max_new_tokens, seed=seed, log_text=log_text,
                           judge=judge, judge_scorer=judge_scorer,
                           rewards=reward_specs(reward or [], reward_args or []))
        if opts.rewards and mode != "generate" and all(d.kind == "mcq" for d in loaded):
            raise UserError("--reward scores generated completions: add --mode generate (or "
                            "evaluate a dataset that is always generated).")
        judged = any(d.kind == "rubric" for d in loaded)  # + one judge actor
        start_cluster(ClusterConfig(), cpus=workers + judged, resources={})
        progress = lambda ds, r: say(f"{ds}: {r['n']} items scored")  # noqa: E731
        kw = dict(workers=workers, backend=backend, progress=progress)
        if checkpoints is None and len(targets) == 1:
            out_dir = out or default_out_dir(targets[0], names[0])
            _, summary = run_eval(targets[0], loaded, out_dir, opts, **kw)
        else:  # each report where a single one would go, then one comparison
            entries = []
            for target, name in zip(targets, names):
                if checkpoints is None:
                    results, _ = run_eval(target, loaded, default_out_dir(target, name), opts,
                                          **kw)
                    entries.append({"model": name, "step": None, "results": results})
                    continue
                for ckpt in run_checkpoints(Path(target), checkpoints):
                    results, _ = run_eval(str(ckpt), loaded, Path(target) / "eval" / ckpt.name,
                                          opts, **kw)
                    entries.append({"model": Path(target).name,
                                    "step": int(ckpt.name.split("-")[1]), "results": results})
            out_dir = out or (Path(targets[0]) / "eval" if len(targets) == 1
                              else Path("eval") / "compare")
            summary = write_comparison(out_dir, entries)
    except UserError as exc:
        raise user_error(exc) from None
    typer.echo(summary, nl=False)
    console.print(f"report: {out_dir}", highlight=False)


def reward_specs(names: list[str], args: list[str]) -> tuple[dict, ...]:
    """``--reward`` names and ``--reward-arg NAME.KEY=VALUE`` -> reward specs with kwargs (the
    value read as YAML, as recipe overrides are)."""
    import yaml

    specs = {n: {"name": n, "kwargs": {}} for n in names}
    for item in args:
        head, sep, value = item.partition("=")
        name, dot, key = head.rpartition(".")
        if not sep or not dot or not key:
            raise UserError(f"--reward-arg {item!r}: write NAME.KEY=VALUE, e.g. "
                            "mcq_letter.strict=true.")
        if name not in specs:
            raise UserError(f"--reward-arg {item!r}: no --reward {name!r} to pass it to (the "
                            f"rewards are: {', '.join(specs) or 'none'}).")
        specs[name]["kwargs"][key] = yaml.safe_load(value) if value else None
    return tuple(specs.values())


def eval_recipe(recipe_path: Path, overrides: list[str], *, force: bool) -> None:
    """``medrl eval RECIPE``: a recipe of ``run.stage: eval``, run as ``medrl run`` runs it
    (a new run folder holding the report), with the summary printed."""
    from medrl.launch.recipe import load_recipe
    from medrl.launch.rundir import absolute_recipe, new_run
    from medrl.launch.stages import check_recipe, run_stage

    resolved = load_recipe(recipe_path, overrides)
    if resolved.run.stage != "eval":
        raise UserError(f"{recipe_path}: run.stage is {resolved.run.stage}; medrl eval runs a "
                        "recipe of run.stage: eval (a training recipe's evaluation: section "
                        "runs inside `medrl run`).")
    check_recipe(resolved, recipe_path.parent)
    resolved = absolute_recipe(resolved, recipe_path.parent)
    with new_run(resolved, force=force, say=say) as run_dir:
        run_stage(resolved, run_dir)
    name = "compare.md" if resolved.evaluation.checkpoints else "summary.md"
    typer.echo((run_dir / name).read_text(), nl=False)
    console.print(f"report: {run_dir}", highlight=False)


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
