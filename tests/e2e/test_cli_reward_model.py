"""The reward_model stage through the real CLI: two DeepSpeed ranks as Ray actors, an exported
folder that transformers loads as a classifier, and an exact resume."""

from __future__ import annotations

import json
import shutil

import pytest
from test_stage_chain import RECIPES, medrl, rows

pytestmark = pytest.mark.slow

QUIET = ["logging.progress=false", "logging.tensorboard=false", "logging.plots=false"]


def test_two_rank_reward_model_exports_a_classifier_and_resumes_exactly(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    runs = tmp_path / "runs"
    args = ["run", str(RECIPES / "reward_model_promedical.yaml"), f"run.output_dir={runs}",
            "reward_model.epochs=null", "run.max_steps=4", "checkpoint.every=2",
            "reward_model.eval_every=2", "learner.num_workers=2", "reward_model.batch_size=6",
            "learner.micro_batch_size=2", *QUIET]
    medrl(*args, cwd=tmp_path)
    run = runs / "reward_model_promedical"
    m = rows(run)
    assert sorted(m) == [1, 2, 3, 4]
    for step in (2, 4):  # held-out pairs of main and veto criteria
        assert {"eval/accuracy", "eval/accuracy/main", "eval/accuracy/veto",
                "eval/margin"} <= set(m[step])
    final = run / "checkpoints" / "step-000004"
    model = AutoModelForSequenceClassification.from_pretrained(final / "policy")
    assert model.config.num_labels == 1
    assert json.loads((final / "learner" / "learner.json").read_text())["world_size"] == 2

    # Resume a copy from step 2: the same batches, the same losses, the same weights.
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    for step in ("step-000003", "step-000004"):
        shutil.rmtree(copy / "checkpoints" / step, ignore_errors=True)
    lines = (copy / "metrics.jsonl").read_text().splitlines()
    (copy / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")
    medrl("resume", str(copy), cwd=tmp_path)
    resumed = rows(copy)
    for step in (3, 4):
        assert resumed[step]["loss"] == pytest.approx(m[step]["loss"], rel=1e-5)
    a = load_file(final / "policy" / "model.safetensors")
    b = load_file(copy / "checkpoints" / "step-000004" / "policy" / "model.safetensors")
    assert a.keys() == b.keys() and "score.weight" in a
    assert all((a[k] - b[k]).abs().max() < 1e-6 for k in a)

    # The rubric reward names the run folder as its model and scores with its last checkpoint.
    import torch
    from transformers import AutoTokenizer

    from medrl.align.records import Sample
    from medrl.rewards import RewardContext
    from medrl.rewards.rubric import RubricReward
    from medrl.rewards.rubric_scorers import rm_input

    reward = RubricReward(model=str(run))
    reward.setup(RewardContext())
    sample = Sample(uid="s", group_id="s", messages=[{"role": "user", "content": "Dose?"}],
                    row={"rubric": [{"criterion": "names the dose", "tier": "main",
                                     "weight": 1.0}]}, completion_text="Take 5 mg.")
    (result,) = reward([sample])
    tok = AutoTokenizer.from_pretrained(final / "policy")
    with torch.no_grad():
        logit = model(**tok(rm_input("user: Dose?", "names the dose", "Take 5 mg."),
                            return_tensors="pt")).logits[0, 0]
    assert result.info["verdicts"][0] == pytest.approx(torch.sigmoid(logit).item(), abs=1e-5)
