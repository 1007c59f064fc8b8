"""The dpo stage through the real CLI: the bundled MedCausalX recipe on two DeepSpeed ranks as
Ray actors, a checkpoint, and a resume that repeats a step exactly and extends the run."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from test_stage_chain import RECIPES, medrl, rows

pytestmark = pytest.mark.slow

QUIET = ["logging.progress=false", "logging.tensorboard=false", "logging.plots=false"]


def test_two_rank_dpo_checkpoints_and_resumes_exactly(tmp_path):
    from safetensors.torch import load_file

    runs = tmp_path / "runs"
    # A constant learning rate: the resumed run below is extended to 3 steps, and a cosine
    # schedule over 3 steps would give its step 2 another rate than the 2-step run's.
    medrl("run", str(RECIPES / "dpo_medcausalx.yaml"), f"run.output_dir={runs}",
          "dpo.epochs=null", "run.max_steps=2", "checkpoint.every=1", "dpo.eval_every=2",
          "learner.num_workers=2", "dpo.batch_size=4", "learner.micro_batch_size=1",
          "learner.lr_schedule=constant", "learner.warmup_steps=0", *QUIET, cwd=tmp_path)
    run = runs / "dpo_medcausalx"
    m = rows(run)
    assert sorted(m) == [1, 2]
    assert m[1]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy = reference
    assert m[2]["margin"] > 0  # one step of DPO moved the policy towards the chosen chains
    assert {"eval/loss", "eval/accuracy", "eval/margin"} <= set(m[2])
    final = run / "checkpoints" / "step-000002"
    assert (final / "COMPLETE").is_file()
    assert json.loads((final / "learner" / "learner.json").read_text())["world_size"] == 2
    assert json.loads((final / "state.json").read_text())["stage"] == "dpo"

    # Resume a copy from step 1 and extend it to step 3: its step 2 is the original's.
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / "step-000002")
    lines = (copy / "metrics.jsonl").read_text().splitlines()
    (copy / "metrics.jsonl").write_text(lines[0] + "\n")
    medrl("resume", str(copy), "run.max_steps=3", cwd=tmp_path)
    resumed = rows(copy)
    assert sorted(resumed) == [1, 2, 3]
    for key in ("loss", "margin", "accuracy", "eval/loss"):
        assert resumed[2][key] == pytest.approx(m[2][key], rel=1e-6, abs=1e-9)
    a = load_file(final / "policy" / "model.safetensors")
    b = load_file(copy / "checkpoints" / "step-000002" / "policy" / "model.safetensors")
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    assert (copy / "checkpoints" / "step-000003" / "COMPLETE").is_file()
