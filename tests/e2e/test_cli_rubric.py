"""The ProMedical recipe through the real `medrl` CLI: it validates as shipped, and a GRPO
run with the rubric reward on real HealthBench rows logs the tier scores, finishes with a
complete checkpoint and writes no rubric or patient text anywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "grpo_promedical.yaml"
MEDRL = [sys.executable, "-m", "medrl.launch.cli"]


def test_the_promedical_recipe_validates_with_the_papers_settings():
    from medrl.launch.cli import app
    from medrl.launch.data import load_dataset_rows
    from medrl.launch.recipe import load_recipe
    from medrl.rewards.rubric import sample_rubric

    result = CliRunner().invoke(app, ["validate", str(RECIPE)])
    assert result.exit_code == 0, result.output
    assert "1 reward(s) loaded" in " ".join(result.output.split())  # wrapped to the width

    recipe = load_recipe(RECIPE)
    assert (recipe.rollout.group_size, recipe.learner.lr, recipe.algorithm.kl.coef) == \
        (8, 1e-6, 0.04)
    assert recipe.rewards.veto == []  # the veto tier (-lambda * S3) is the safety veto
    rows = load_dataset_rows(recipe.data, RECIPE.parent)
    for sample in rows:  # every bundled consultation has main criteria and a veto item
        tiers = {c.tier for c in sample_rubric(sample).criteria}
        assert {"main", "veto"} <= tiers, sample.uid
        assert sample.messages[-1]["role"] == "user"


def texts_of(healthbench: Path, rows: int) -> list[str]:
    """Every criterion and every message (40-character pieces) of the first ``rows`` rows."""
    out = []
    for line in healthbench.read_text().splitlines()[:rows]:
        row = json.loads(line)
        out += [item["criterion"] for item in row["rubrics"]]
        out += [m["content"][i:i + 40] for m in row["prompt"]
                for i in range(0, max(len(m["content"]) - 39, 1), 200)]
    return [t for t in out if len(t) >= 30]


@pytest.mark.slow
def test_grpo_with_the_rubric_reward_on_healthbench_rows(shared_data, tmp_path):
    healthbench = shared_data / "healthbench" / "oss_eval_sample.jsonl"
    rows = 15  # the first 15 fit tiny:qwen2's 2048 positions with the completion
    env = dict(os.environ, MEDRL_CACHE=str(tmp_path / "cache"), RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")
    proc = subprocess.run(
        [*MEDRL, "run", str(RECIPE), "run.name=promedical", f"run.output_dir={tmp_path / 'runs'}",
         f"data.path={healthbench}", f"data.max_samples={rows}", "logging.progress=false",
         "logging.plots=false"],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-8000:]}"
    run_dir = tmp_path / "runs" / "promedical"

    last = run_dir / "checkpoints" / "step-000003"
    assert (last / "COMPLETE").is_file()
    assert json.loads((last / "state.json").read_text())["step"] == 3
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps] == [1, 2, 3]
    criteria = {json.loads(x)["prompt_id"]: len(json.loads(x)["rubrics"])
                for x in healthbench.read_text().splitlines()}
    drawn = [json.loads(x)["uids"] for x in (run_dir / "prompts.jsonl").read_text().splitlines()]
    for m, uids in zip(steps, drawn):  # every criterion of every prompt, once per completion
        assert m["rewards/rubric/judge_pairs"] == 8 * sum(criteria[u] for u in uids)
        for dim in ("s1", "s2", "s3"):
            assert f"rewards/rubric/{dim}/mean" in m, (m["step"], dim)
        assert m["rewards/rubric/s2/mean"] == 0.0  # HealthBench rubrics have no bonus tier
        assert 0.0 <= m["rewards/rubric/s1/mean"] <= 1.0
        assert m["rewards/rubric/s3/mean"] >= 0.0
        assert any(k.startswith("rewards/rubric/axis:") for k in m)
        # no runner veto: the combined reward is the rubric's, -lambda * S3 included
        assert m["rewards/combined/mean"] == pytest.approx(m["rewards/rubric/mean"])
        assert m["rewards/vetoed"] == 0.0
    assert not (run_dir / "completions.jsonl").exists()

    secrets = texts_of(healthbench, rows)
    assert len(secrets) > 100
    logs = proc.stdout + proc.stderr
    files = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    for text in secrets:
        assert text not in logs, "rubric or prompt text in the CLI output"
        for path, data in files.items():
            assert text.encode() not in data, f"rubric or prompt text in {path}"
