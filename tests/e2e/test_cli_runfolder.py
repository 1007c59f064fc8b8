"""The real `medrl` CLI keeps run folders safe: --force replaces only a run folder that nobody
is writing, one process writes a run at a time, and resuming from an earlier step sets the
later checkpoints aside instead of losing them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medrl.launch.recipe import load_recipe
from medrl.launch.rundir import LOCK_FILE, RunLock, absolute_recipe, create_run_dir

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"
MEDRL = [sys.executable, "-m", "medrl.launch.cli"]
SMALL = [  # as in test_cli_grpo.py: small enough for 2 cores
    "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=8",
    "learner.micro_batch_size=4", "learner.lr_schedule=constant", "learner.lr=1e-3",
    "logging.progress=false", "logging.plots=false", "logging.tensorboard=false",
]


def medrl(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, MEDRL_CACHE=str(cwd / "cache"), COLUMNS="400",
               RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")
    return subprocess.run([*MEDRL, *args], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=timeout)


def refused(proc: subprocess.CompletedProcess, *phrases: str) -> None:
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    text = " ".join(proc.stderr.split())
    for phrase in phrases:
        assert phrase in text, text[-2000:]


def test_force_never_deletes_what_is_not_a_run_folder(tmp_path):
    project = tmp_path / "proj"
    (project / "runs").mkdir(parents=True)
    (project / "notes.txt").write_text("mine")
    proc = medrl("run", str(QUICKSTART), f"run.output_dir={project / 'runs'}", "run.name=..",
                 "--force", cwd=tmp_path)
    refused(proc, "run.name:", "'..' is not a folder name")
    assert (project / "notes.txt").read_text() == "mine" and (project / "runs").is_dir()

    (project / "runs" / "exp").mkdir()
    (project / "runs" / "exp" / "data.csv").write_text("a,b\n")
    proc = medrl("run", str(QUICKSTART), f"run.output_dir={project / 'runs'}", "run.name=exp",
                 "--force", cwd=tmp_path)
    refused(proc, "is not a medrl run folder (it has no recipe.yaml)", "Nothing was deleted")
    assert (project / "runs" / "exp" / "data.csv").exists()


def test_a_running_run_refuses_a_second_writer(tmp_path):
    recipe = load_recipe(QUICKSTART, [f"run.output_dir={tmp_path / 'runs'}", "run.name=busy"])
    run_dir = create_run_dir(absolute_recipe(recipe, QUICKSTART.parent))
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    with RunLock(run_dir):  # this test process is the run that is writing
        owner = f"in use by process {os.getpid()}"
        refused(medrl("resume", str(run_dir), cwd=tmp_path), owner)
        refused(medrl("run", str(QUICKSTART), f"run.output_dir={tmp_path / 'runs'}",
                      "run.name=busy", "--force", cwd=tmp_path), owner)
    assert (run_dir / "metrics.jsonl").exists() and not (run_dir / LOCK_FILE).exists()


def steps_in(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line]


@pytest.mark.slow
def test_force_then_resume_from_an_earlier_step(tmp_path):
    runs = tmp_path / "runs"
    (runs / "again").mkdir(parents=True)  # an earlier run folder of that name, to replace
    (runs / "again" / "recipe.yaml").write_text("run: {name: again}\n")
    (runs / "again" / "old.txt").write_text("from the run before")
    run_dir = runs / "again"
    proc = medrl("run", str(QUICKSTART), f"run.output_dir={runs}", "run.name=again", "--force",
                 "run.max_steps=2", "checkpoint.every=1", "checkpoint.keep_last=2", *SMALL,
                 cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-8000:]
    assert not (run_dir / "old.txt").exists() and not (run_dir / LOCK_FILE).exists()
    first = (run_dir / "checkpoints" / "step-000002" / "COMPLETE").read_text()
    with (run_dir / "prompts.jsonl").open("a") as f:
        f.write('{"step": 3, "uids": ["')  # torn by a crash: resume drops it with a note

    proc = medrl("resume", str(run_dir), "--step", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-8000:]
    text = " ".join(proc.stderr.split())
    assert "resuming from step 1: the later checkpoints (steps 2) are set aside in" in text
    assert "dropped a partly written last line" in text
    [aside] = (run_dir / "abandoned").iterdir()
    assert aside.name.endswith("-from-step-000001")
    assert (aside / "step-000002" / "COMPLETE").read_text() == first  # kept as it was
    assert steps_in(aside / "metrics.jsonl") == [1, 2]
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["step-000001", "step-000002"]  # the new line, kept by keep_last: 2
    assert (run_dir / "checkpoints" / "step-000002" / "COMPLETE").read_text() != first
    assert steps_in(run_dir / "prompts.jsonl") == [1, 2]
    assert steps_in(run_dir / "metrics.jsonl") == [1, 2]
    assert not (run_dir / LOCK_FILE).exists()
