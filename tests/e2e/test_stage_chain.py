"""SFT -> QAT -> GRPO through the real `medrl` CLI: each run folder is the next stage's
model.policy, and each stage starts from the weights the previous one finished with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes"
SHARED_MEDQA = REPO.parent / "shared" / "data" / "medqa" / "test.jsonl"
MEDRL = [sys.executable, "-m", "medrl.launch.cli"]
QUIET = ["logging.progress=false", "logging.tensorboard=false"]


def medrl(*args: str, cwd: Path):
    env = dict(os.environ, MEDRL_CACHE=str(cwd / "cache"), RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")
    proc = subprocess.run([*MEDRL, *args], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"medrl {' '.join(args)} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-8000:]}")
    return proc


def rows(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def test_sft_then_qat_then_grpo(tmp_path):
    from safetensors.torch import load_file

    runs = tmp_path / "runs"
    medrl("run", str(RECIPES / "sft_med3d_weighted.yaml"), f"run.output_dir={runs}",
          "run.max_steps=3", "checkpoint.every=3", "sft.eval_every=3", *QUIET, cwd=tmp_path)
    sft = runs / "sft_med3d_weighted"
    assert rows(sft)[3]["eval/loss"] is not None

    # The knowledge probe: MedQA through the ordinary loader when the shared data is there.
    probe = SHARED_MEDQA if SHARED_MEDQA.is_file() else RECIPES / "data" / "quickstart_mcq.jsonl"
    medrl("run", str(RECIPES / "qat_hif8.yaml"), f"run.output_dir={runs}",
          f"model.policy={sft}", f"qat.probe_path={probe}", "qat.probe_max_samples=8",
          "run.max_steps=4", "qat.warmup_steps=2", "qat.probe_every=2", "checkpoint.every=4",
          *QUIET, cwd=tmp_path)
    qat = runs / "qat_hif8"
    q = rows(qat)
    assert [q[s]["qat/enabled"] for s in (1, 2, 3, 4)] == [0.0, 0.0, 1.0, 1.0]
    assert "qat/probe/accuracy_start" in q[0] and "qat/probe/accuracy_drop" in q[4]
    qat_ckpt = qat / "checkpoints" / "step-000004"
    assert json.loads((qat_ckpt / "state.json").read_text())["policy_source"] == \
        str(sft / "checkpoints" / "step-000003" / "policy")
    assert (qat_ckpt / "policy_fake_quant" / "model.safetensors").is_file()

    medrl("run", str(RECIPES / "quickstart.yaml"), f"run.output_dir={runs}",
          f"model.policy={qat}", "run.max_steps=2", "rollout.prompts_per_step=2",
          "rollout.group_size=2", "rollout.max_new_tokens=4", "learner.micro_batch_size=4",
          "checkpoint.every=2", *QUIET, cwd=tmp_path)
    grpo = runs / "quickstart"
    assert sorted(rows(grpo)) == [1, 2]
    grpo_ckpt = grpo / "checkpoints" / "step-000002"
    assert json.loads((grpo_ckpt / "state.json").read_text())["policy_source"] == \
        str(qat_ckpt / "policy")
    # GRPO trained the QAT weights (full precision), not the random starting model.
    start = load_file(str(qat_ckpt / "policy" / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    assert not (grpo_ckpt / "policy" / "qat").exists()
    assert start[name].shape == load_file(str(grpo_ckpt / "policy" / "model.safetensors"))[name].shape
