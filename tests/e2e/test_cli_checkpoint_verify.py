"""The real `medrl` CLI on a run folder whose checkpoints are checked before use:
`medrl validate RUN_DIR` verifies every checkpoint, `medrl resume` refuses a damaged one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from medrl.align.checkpoint import save_checkpoint
from medrl.launch.recipe import load_recipe
from medrl.launch.rundir import absolute_recipe, create_run_dir

REPO = Path(__file__).resolve().parents[2]
MEDRL = [sys.executable, "-m", "medrl.launch.cli"]


def medrl(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, MEDRL_CACHE=str(cwd / "cache"), COLUMNS="400")
    return subprocess.run([*MEDRL, *args], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=300)


def write_policy(tmp: Path) -> None:
    (tmp / "policy").mkdir()
    save_file({"w": torch.arange(64.0)}, str(tmp / "policy" / "model.safetensors"))
    (tmp / "learner").mkdir()
    (tmp / "learner" / "optim.json").write_text('{"lr": 0.001}')


def make_run(tmp_path: Path) -> Path:
    """A run folder as `medrl run` leaves it: the resolved quickstart recipe, two checkpoints."""
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml",
                         [f"run.output_dir={tmp_path / 'runs'}", "run.name=verify"])
    run_dir = create_run_dir(absolute_recipe(recipe, REPO / "recipes"))
    for step in (2, 4):
        save_checkpoint(run_dir, step, write=write_policy, state={"policy_version": step})
    return run_dir


def test_validate_and_resume_check_the_checkpoints(tmp_path):
    run_dir = make_run(tmp_path)
    ok = medrl("validate", str(run_dir), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "stage: grpo" in ok.stdout  # the saved recipe, resolved
    assert f"ok: {run_dir / 'recipe.yaml'} is valid" in ok.stderr
    assert "ok: checkpoint step-000002 verified (3 files" in ok.stderr
    assert "ok: checkpoint step-000004 verified (3 files" in ok.stderr

    weights = run_dir / "checkpoints" / "step-000004" / "policy" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    weights.write_bytes(bytes(raw))
    recipe_before = (run_dir / "recipe.yaml").read_text()
    expected = (f"error: {weights}: checksum does not match the one in COMPLETE (the file "
                "changed after the save), so checkpoint step-000004 is damaged. The newest "
                "earlier checkpoint that verifies is step 2; resume from it with "
                f"`medrl resume {run_dir} --step 2`.")
    for args in (["validate", str(run_dir)], ["resume", str(run_dir)],
                 ["resume", str(run_dir), "--step", "4", "run.max_steps=8"]):
        proc = medrl(*args, cwd=tmp_path)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert expected in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
    # nothing started and nothing was written: the run folder is as it was
    assert (run_dir / "recipe.yaml").read_text() == recipe_before
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "recipe.yaml"]
