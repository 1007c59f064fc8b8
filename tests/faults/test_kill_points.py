"""The run folder as a durable record: a grpo run SIGKILLed (its whole process group) at each
phase boundary of a step, or stopped by a full disk (one fault per step, each resume faulted
again), then `medrl resume`, ends with the same record as a run that was never interrupted:
every step's metrics row exactly once with the same figures, the same prompt log, the same
final weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).resolve().parent / "fault_run.py"
STEPS = 9
SMALL = ["rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=8",
         "learner.micro_batch_size=8", "learner.zero_stage=0", "learner.lr_schedule=constant",
         "logging.progress=false", "logging.tensorboard=false", "logging.plots=true",
         "checkpoint.every=1", f"run.max_steps={STEPS}"]
# figures that are a function of the weights and the data, not of the wall clock
SAME = ("loss", "reward/mean", "kl", "grad_norm", "completion/length_mean",
        "advantage/abs_mean")


def medrl(cwd: Path, *args: str, fault: tuple[str, int] | None = None):
    env = dict(os.environ, MEDRL_CACHE=str(cwd / "cache"), RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")
    command = [sys.executable, "-m", "medrl.launch.cli", *args] if fault is None else \
        [sys.executable, str(RUNNER), fault[0], str(fault[1]), "--", *args]
    # its own process group: the fault kills the run and its Ray processes, nothing else
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600, start_new_session=True)
    return proc


def start(cwd: Path, name: str, fault=None):
    return medrl(cwd, "run", str(REPO / "recipes" / "quickstart.yaml"), f"run.name={name}",
                 f"run.output_dir={cwd / 'runs'}", *SMALL, fault=fault)


def record(run_dir: Path) -> dict:
    def rows(name):
        path = run_dir / name
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] \
            if path.exists() else []

    from safetensors.torch import load_file

    last = run_dir / "checkpoints" / f"step-{STEPS:06d}" / "policy" / "model.safetensors"
    return {"metrics": rows("metrics.jsonl"), "prompts": rows("prompts.jsonl"),
            "weights": load_file(str(last)) if last.exists() else None}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def uninterrupted(workdir) -> dict:
    proc = start(workdir, "whole")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return record(workdir / "runs" / "whole")


# One fault per step of one run: killed at step 2 after generate, its resume killed at step
# 3 after learn, and so on; the checkpoint writer of step 6 meets a full disk (a clean stop,
# exit 2); the last resume finishes the run. Each fault meets a run folder left by the
# previous resume, and the whole chain must end where an uninterrupted run ends.
CHAIN = [("after_generate", 2), ("after_learn", 3), ("after_sync", 4),
         ("checkpoint_write", 5), ("disk_full", 6), ("after_complete", 7), ("plotting", 8)]
assert STEPS == CHAIN[-1][1] + 1


def check_full_disk_stop(proc, run_dir: Path, step: int) -> None:
    """A full disk at checkpoint ``step``: exit 2, a message naming the folder and the last
    complete checkpoint, and no folder of the checkpoint that did not fit."""
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    text = " ".join(proc.stderr.split())
    assert f"checkpoint step {step} did not fit on the disk of {run_dir / 'checkpoints'}" in text
    assert f"the last complete checkpoint, step-{step - 1:06d}, is untouched" in text
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names[-1] == f"step-{step - 1:06d}", names


def test_a_run_faulted_at_every_phase_boundary_resumes_to_the_same_record(workdir,
                                                                          uninterrupted):
    import torch

    run_dir = workdir / "runs" / "killed"
    for i, fault in enumerate(CHAIN):
        proc = start(workdir, "killed", fault=fault) if i == 0 else \
            medrl(workdir, "resume", str(run_dir), fault=fault)
        if fault[0] == "disk_full":
            check_full_disk_stop(proc, run_dir, fault[1])
        else:
            assert proc.returncode == -9, (fault, proc.stderr[-4000:])  # SIGKILL, no clean stop
    resumed = medrl(workdir, "resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-4000:]

    got, want = record(run_dir), uninterrupted
    assert [r["step"] for r in got["metrics"]] == list(range(1, STEPS + 1))
    for mine, theirs in zip(got["metrics"], want["metrics"]):
        for key in SAME:
            assert mine.get(key) == theirs.get(key), (mine["step"], key)
    assert got["prompts"] == want["prompts"]  # each step's prompts, exactly once
    assert got["weights"].keys() == want["weights"].keys()
    for key, value in want["weights"].items():
        assert torch.equal(got["weights"][key], value), key


def test_a_real_full_disk_stops_the_run_clearly_and_resume_finishes_it(workdir, uninterrupted):
    """The run folder on a tmpfs that holds one checkpoint and a half: the second checkpoint
    meets ENOSPC in the learner's own writes (a real full disk, not an injected error)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; the injected ENOSPC case covers it")
    last = max((workdir / "runs" / "whole" / "checkpoints").glob("step-*"))  # keep_last prunes
    one = sum(p.stat().st_size for p in last.rglob("*") if p.is_file())
    disk = workdir / "small-disk"
    disk.mkdir()
    size = int(one * 1.6) + 4 * 2**20  # the logs, plots and the recipe beside it
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()})")
    try:
        run_dir = disk / "full"
        stopped = medrl(workdir, "run", str(REPO / "recipes" / "quickstart.yaml"),
                        "run.name=full", f"run.output_dir={disk}", *SMALL)
        assert stopped.returncode == 2 and "Traceback" not in stopped.stderr, \
            stopped.stderr[-4000:]
        text = " ".join(stopped.stderr.split())
        assert f"did not fit on the disk of {run_dir / 'checkpoints'}" in text
        complete = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
        assert complete and all((run_dir / "checkpoints" / n / "COMPLETE").is_file()
                                for n in complete)  # nothing half-written left behind
        subprocess.run(["mount", "-o", f"remount,size={one * STEPS * 2 + 8 * 2**20}", str(disk)],
                       check=True)
        resumed = medrl(workdir, "resume", str(run_dir))
        assert resumed.returncode == 0, resumed.stderr[-4000:]
        got = record(run_dir)
        assert [r["step"] for r in got["metrics"]] == list(range(1, STEPS + 1))
        assert got["prompts"] == uninterrupted["prompts"]
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
