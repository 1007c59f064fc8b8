"""The SFT stage: answer-only weighted loss, sentence weights, the stage loop, LoRA export,
a VLM step and exact resume (real tokenizer, real DeepSpeed learner on tiny models)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from medrl.align.records import Sample, UserError
from medrl.align.stages.sft import (ExampleSpec, batch_loss, batch_weight, build_example,
                             encode_weighted_text, sft_loss)

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes"
QUIET = ["logging.progress=false", "logging.tensorboard=false", "logging.plots=false"]


def recipe_for(name: str, tmp_path: Path, *overrides: str):
    from medrl.launch.recipe import load_recipe
    from medrl.launch.rundir import absolute_recipe

    recipe = load_recipe(RECIPES / name, [f"run.output_dir={tmp_path}", *QUIET, *overrides])
    return absolute_recipe(recipe, RECIPES)


def report_samples(tmp_path):
    from medrl.launch.data import load_samples

    return load_samples(recipe_for("sft_med3d_weighted.yaml", tmp_path).data)


def metrics(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def test_sentence_weights_land_on_the_abnormal_sentence_tokens(tiny_qwen2):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_qwen2)
    sentences = ["The lungs are clear.", "A 6 mm nodule is seen.", "No effusion."]
    ids, weights = encode_weighted_text(tok, sentences, [1.0, 1.1, 1.0])
    assert tok.decode(ids) == " ".join(sentences)
    heavy = [i for i, w in zip(ids, weights) if w == 1.1]
    assert tok.decode(heavy) == " A 6 mm nodule is seen."
    assert set(weights) == {1.0, 1.1}


def test_example_masks_the_prompt_and_weights_abnormal_sentences(tiny_qwen2, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_qwen2)
    sample = next(s for s in report_samples(tmp_path) if s.uid == "ct-002")
    spec = ExampleSpec(response_field="findings", weight_field="abnormal", abnormal_weight=1.1)
    ex = build_example(tok, sample, spec)
    # The prompt is exactly what a rollout renders; the completion is the report + <|im_end|>.
    from medrl.align.encode import encode_prompt

    assert ex.prompt_ids == encode_prompt(tok, sample).prompt_ids[0]
    assert tok.decode(ex.completion_ids) == " ".join(sample.row["findings"]) + "<|im_end|>"
    weights = ex.token_weights["sft"]
    assert len(weights) == len(ex.completion_ids) and weights[-1] == 1.0
    heavy = tok.decode([i for i, w in zip(ex.completion_ids, weights) if w == 1.1])
    assert heavy == " ".join(sample.row["findings"][:2])  # sentences 1 and 2 are abnormal
    with pytest.raises(UserError, match="one label per sentence"):
        bad = Sample(uid="x", group_id="x", row={**sample.row, "abnormal": [True]},
                     messages=sample.messages)
        build_example(tok, bad, spec)
    with pytest.raises(UserError, match="no room"):
        build_example(tok, sample, ExampleSpec(response_field="findings", max_length=8))


def test_answers_end_with_the_templates_end_of_turn_not_the_eos(tiny_qwen2, tmp_path):
    """A base-model tokenizer (eos <|endoftext|>, as Qwen2.5 base models ship) whose chat
    template closes turns with <|im_end|>: the answer ends as the template ends a turn."""
    from medrl.align.models import load_tokenizer

    folder = tmp_path / "base"
    shutil.copytree(tiny_qwen2, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["eos_token"] = "<|endoftext|>"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(folder)
    assert tok.eos_token == "<|endoftext|>"
    sample = Sample(uid="a1", group_id="a1", row={"response": "No acute findings."},
                    messages=[{"role": "user", "content": "Findings?"}])
    ex = build_example(tok, sample, ExampleSpec())
    assert tok.decode(ex.completion_ids) == "No acute findings.<|im_end|>"
    assert tok.eos_token_id not in ex.completion_ids


def test_sft_loss_is_the_weighted_mean_over_answer_tokens():
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(3, 5, generator=g) * 4
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float)
    w = torch.tensor([[1.1, 1, 1, 9, 9], [1, 1.1, 1.1, 1, 1], [1, 9, 9, 9, 9]])
    loss, m = sft_loss(lp, mask, w)
    num = sum(-lp[i, j] * w[i, j] for i in range(3) for j in range(5) if mask[i, j])
    den = sum(w[i, j] for i in range(3) for j in range(5) if mask[i, j])
    assert loss.item() == pytest.approx((num / den).item(), rel=1e-6)
    assert m["tokens"] == 9
    plain, _ = sft_loss(lp, mask)
    assert plain.item() == pytest.approx(-(lp * mask).sum().item() / 9, rel=1e-6)


def test_learner_step_loss_matches_a_plain_forward_over_answer_tokens(tiny_qwen2, tmp_path):
    """Three examples in micro-batches of one: the reported loss is the global weighted mean
    of -log p(answer token), recomputed here from a plain HF forward over the full sequence."""
    from transformers import AutoModelForCausalLM

    from medrl.align.learner import Learner

    learner = Learner(tiny_qwen2, zero_stage=0, micro_batch_size=1, lr=1e-3, temperature=1.0)
    spec = ExampleSpec(response_field="findings", weight_field="abnormal", abnormal_weight=1.1)
    examples = [build_example(learner.tokenizer, s, spec) for s in report_samples(tmp_path)[:3]]
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2).eval()
    num = den = 0.0
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex.prompt_ids + ex.completion_ids])
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            start = len(ex.prompt_ids)
            for k, (tok_id, w) in enumerate(zip(ex.completion_ids, ex.token_weights["sft"])):
                num += -logp[start + k - 1, tok_id].item() * w
                den += w
    out = learner.train_step_with(batch_loss, learner.collate(examples), size_fn=batch_weight)
    assert out["loss"] == pytest.approx(num / den, rel=1e-5)
    assert out["tokens"] == sum(len(e.completion_ids) for e in examples)
    assert out["lr"] == pytest.approx(1e-3) and out["grad_norm"] > 0


def test_stage_resume_is_exact(tiny_qwen2, tmp_path):
    from medrl.align.checkpoint import read_state
    from medrl.launch.rundir import create_run_dir
    from medrl.launch.stages import run_stage

    over = ["run.max_steps=4", "checkpoint.every=2", "sft.batch_size=3",
            "learner.micro_batch_size=2", "sft.eval_every=2",
            # benchmarks on the learner's own weights, sampled (2 completions per item): the
            # continuation must not see them
            "evaluation.every=2", "evaluation.datasets=[data/quickstart_mcq.jsonl]",
            "evaluation.fields={id: id}", "evaluation.max_samples=3", "evaluation.mode=generate",
            "evaluation.samples=2", "evaluation.max_new_tokens=4"]
    full = recipe_for("sft_med3d_weighted.yaml", tmp_path, "run.name=full", *over)
    last = run_stage(full, create_run_dir(full))
    full_dir = last.parent.parent
    assert sorted(p.name for p in (full_dir / "checkpoints").iterdir()) == \
        ["step-000002", "step-000004"]
    # The same run, stopped after step 2: only its first checkpoint exists; resume it.
    part = recipe_for("sft_med3d_weighted.yaml", tmp_path, "run.name=part", *over)
    part_dir = create_run_dir(part)
    shutil.copytree(full_dir / "checkpoints" / "step-000002",
                    part_dir / "checkpoints" / "step-000002")
    (part_dir / "metrics.jsonl").write_text(
        "".join(json.dumps(metrics(full_dir)[s]) + "\n" for s in (1, 2)))
    run_stage(part, part_dir, resume_from=part_dir / "checkpoints" / "step-000002")
    a, b = metrics(full_dir), metrics(part_dir)
    assert sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in ("loss", "grad_norm", "lr", "tokens", "epoch"):
            assert a[step][key] == b[step][key], (step, key)
    assert a[4]["eval/loss"] == b[4]["eval/loss"] and "eval/loss" in a[2]
    assert [s for s in a if "eval/quickstart_mcq/acc" in a[s]] == [2, 4]
    assert a[4]["eval/quickstart_mcq/n"] == 3 and "eval/quickstart_mcq/maj@2" in a[4]
    for key in ("acc", "answered", "maj@2", "pass@2"):
        assert a[4][f"eval/quickstart_mcq/{key}"] == b[4][f"eval/quickstart_mcq/{key}"], key
    assert read_state(full_dir / "checkpoints" / "step-000004")["data_cursor"] == \
        read_state(part_dir / "checkpoints" / "step-000004")["data_cursor"]


def test_lora_recipe_saves_adapters_and_merged_policy(tiny_qwen2, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from medrl.launch.rundir import create_run_dir
    from medrl.launch.stages import run_stage

    recipe = recipe_for("sft_emr_lora.yaml", tmp_path, "sft.epochs=null", "run.max_steps=2",
                        "sft.eval_every=1", "evaluation.every=2",
                        # the structuring it learns, scored field by field, prompted as trained
                        "evaluation.datasets=[data/sft_emr_dialogues.jsonl]",
                        "evaluation.fields={id: id, question: dialogue, record: record}",
                        "evaluation.max_samples=2", "evaluation.max_new_tokens=4")
    last = run_stage(recipe, create_run_dir(recipe))
    rows = metrics(last.parent.parent)
    assert rows[2]["eval/loss"] is not None and rows[2]["loss"] > 0
    # generated by the adapted model in place; its saved generation settings are its own
    assert rows[2]["eval/sft_emr_dialogues/n"] == 2 and "eval/sft_emr_dialogues/f1" in rows[2]
    assert "eval/sft_emr_dialogues/f1" not in rows[1]
    from medrl.launch.eval_hook import load_datasets

    item = load_datasets(recipe, RECIPES)[0].items[0]  # prompted as the stage trains
    assert item.messages[0]["content"] == recipe.data.system_prompt
    assert item.messages[-1]["content"].startswith("# Fill in the record")
    saved = json.loads((last / "policy" / "generation_config.json").read_text())
    start = json.loads((Path(tiny_qwen2) / "generation_config.json").read_text())
    assert {k: v for k, v in saved.items() if k != "transformers_version"} == \
        {k: v for k, v in start.items() if k != "transformers_version"}
    assert (last / "adapter" / "adapter_config.json").is_file()
    merged = load_file(str(last / "policy" / "model.safetensors"))
    base = AutoModelForCausalLM.from_pretrained(tiny_qwen2)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[name], base.state_dict()[name])  # the adapters learned
    expect = PeftModel.from_pretrained(base, last / "adapter").merge_and_unload().state_dict()
    for key, value in merged.items():
        torch.testing.assert_close(value, expect[key], rtol=0, atol=1e-6)
    # The prompt is the code-style template filled with the dialogue.
    assert recipe.sft.prompt_template.startswith("# Fill in the record")


def test_epochs_decide_the_number_of_steps():
    from medrl.align.stages.sft import total_steps

    assert total_steps(max_steps=99, epochs=3, num_train=5, batch_size=2) == 8
    assert total_steps(max_steps=7, epochs=None, num_train=5, batch_size=2) == 7


def test_vlm_step_trains_on_answer_tokens_with_the_image(tiny_qwen2_vl):
    from PIL import Image

    from medrl.align.learner import Learner
    from medrl.align.prompts import open_messages

    learner = Learner(tiny_qwen2_vl, zero_stage=0, micro_batch_size=2, lr=1e-3, temperature=1.0)
    image = Image.new("RGB", (56, 56), (120, 30, 30))
    sample = Sample(uid="v1", group_id="v1", row={"response": "A dense opacity."},
                    messages=open_messages("Describe the image.", num_images=1), images=[image])
    ex = build_example(learner.tokenizer, sample, ExampleSpec())
    image_token = learner.tokenizer.image_token_id
    assert ex.prompt_ids.count(image_token) > 0 and image_token not in ex.completion_ids
    batch = learner.collate([ex])
    assert batch.pixel_values is not None
    out = learner.train_step_with(batch_loss, batch, size_fn=batch_weight)
    assert out["tokens"] == len(ex.completion_ids) and out["loss"] > 0


def test_an_sft_recipe_without_evaluation_has_no_evaluation_hook(tmp_path):
    from medrl.launch.eval_hook import sft_evaluation

    recipe = recipe_for("sft_emr_lora.yaml", tmp_path)
    assert recipe.evaluation is None and sft_evaluation(recipe, tmp_path) is None
