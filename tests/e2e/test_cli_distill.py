"""The distill stage through the real CLI: the bundled IMT recipe for two steps on one
DeepSpeed rank as a Ray actor, a checkpoint, and a resume that repeats step 2 exactly."""

from __future__ import annotations

import json
import shutil

import pytest
from test_stage_chain import RECIPES, medrl, rows

pytestmark = pytest.mark.slow

QUIET = ["logging.progress=false", "logging.tensorboard=false", "logging.plots=false"]


def test_distill_checkpoints_and_resumes_exactly(tmp_path):
    from safetensors.torch import load_file

    runs = tmp_path / "runs"
    medrl("run", str(RECIPES / "distill_imt.yaml"), f"run.output_dir={runs}",
          "distill.epochs=null", "run.max_steps=2", "checkpoint.every=1", "distill.eval_every=2",
          "learner.lr_schedule=constant", *QUIET, cwd=tmp_path)
    run = runs / "distill_imt"
    m = rows(run)
    assert sorted(m) == [1, 2]
    assert m[1]["jsd"] > 0 and m[1]["loss"] == pytest.approx(m[1]["jsd"], rel=1e-6)
    assert 0.0 <= m[2]["agreement"] <= 1.0 and m[2]["eval/nll"] > 0
    final = run / "checkpoints" / "step-000002"
    assert (final / "COMPLETE").is_file()
    assert json.loads((final / "state.json").read_text())["stage"] == "distill"

    # Resume a copy from step 1: its step 2 is the original's, weights and metrics alike.
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / "step-000002")
    lines = (copy / "metrics.jsonl").read_text().splitlines()
    (copy / "metrics.jsonl").write_text(lines[0] + "\n")
    medrl("resume", str(copy), cwd=tmp_path)
    resumed = rows(copy)
    assert sorted(resumed) == [1, 2]
    for key in ("loss", "jsd", "agreement", "eval/nll"):
        assert resumed[2][key] == pytest.approx(m[2][key], rel=1e-6, abs=1e-9)
    a = load_file(final / "policy" / "model.safetensors")
    b = load_file(copy / "checkpoints" / "step-000002" / "policy" / "model.safetensors")
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
