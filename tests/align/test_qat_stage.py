"""The QAT stage: warm-up then fake quantisation, the lr switch, clip-rate metrics and warning,
the knowledge probe, scaling state in checkpoints, fake-quant export and exact resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes"
QUIET = ["logging.progress=false", "logging.tensorboard=false", "logging.plots=false"]
SMALL = ["run.max_steps=4", "qat.warmup_steps=2", "checkpoint.every=2", "sft.batch_size=2",
         "learner.micro_batch_size=2", "learner.lr_schedule=constant", "learner.lr=1e-3",
         "qat.qat_lr=2e-4", "qat.probe_every=2", "qat.probe_max_samples=4"]


def recipe_for(tmp_path: Path, *overrides: str):
    from medrl.launch.recipe import load_recipe
    from medrl.launch.rundir import absolute_recipe

    recipe = load_recipe(RECIPES / "qat_hif8.yaml",
                         [f"run.output_dir={tmp_path}", *QUIET, *SMALL, *overrides])
    return absolute_recipe(recipe, RECIPES)


def metrics(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


@pytest.fixture(scope="module")
def full_run(tiny_qwen2, tmp_path_factory) -> Path:
    from medrl.launch.rundir import create_run_dir
    from medrl.launch.stages import run_stage

    recipe = recipe_for(tmp_path_factory.mktemp("qat"), "run.name=full")
    return run_stage(recipe, create_run_dir(recipe)).parent.parent


def test_schedule_clip_metrics_and_probe(full_run):
    rows = metrics(full_run)
    assert sorted(rows) == [0, 1, 2, 3, 4]
    assert [rows[s]["qat/enabled"] for s in (1, 2, 3, 4)] == [0.0, 0.0, 1.0, 1.0]
    # Constant schedule: learner.lr during the warm-up, qat.qat_lr once quantisation is on.
    assert [rows[s]["lr"] for s in (1, 2, 3, 4)] == pytest.approx([1e-3, 1e-3, 2e-4, 2e-4])
    for group in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        for kind in ("weight", "input"):
            assert 0.0 <= rows[3][f"qat/clip/{group}/{kind}"] <= rows[3]["qat/clip/max"]
    assert "qat/clip/lm_head/weight" not in rows[3]  # the LM head stays in full precision
    start = rows[0]["qat/probe/accuracy_start"]
    assert 0.0 <= start <= 1.0 and "qat/probe/accuracy" not in rows[1]
    for step in (2, 4):
        assert rows[step]["qat/probe/accuracy_drop"] == pytest.approx(
            start - rows[step]["qat/probe/accuracy"])
        assert rows[step]["qat/probe/gold_logprob_drop"] == pytest.approx(
            rows[0]["qat/probe/gold_logprob_start"] - rows[step]["qat/probe/gold_logprob"])


def test_checkpoint_holds_scales_and_fake_quant_export(full_run):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from medrl.align.qat import fake_quantize

    last = full_run / "checkpoints" / "step-000004"
    state = load_file(str(last / "learner" / "qat_state.safetensors"))
    assert torch.equal(state["model.layers.0.self_attn.q_proj.weight.scale"],
                       load_file(str(last / "policy" / "qat" / "scales.safetensors"))[
                           "model.layers.0.self_attn.q_proj.weight.scale"])
    assert int(state["model.layers.0.mlp.down_proj.input.filled"]) == 4  # observed every step
    assert json.loads((last / "policy" / "qat" / "qat.json").read_text())["format"] == "hif8"
    full = load_file(str(last / "policy" / "model.safetensors"))
    fq = load_file(str(last / "policy_fake_quant" / "model.safetensors"))
    name = "model.layers.1.mlp.up_proj.weight"
    scale = state["model.layers.1.mlp.up_proj.weight.scale"]
    assert torch.equal(fq[name], fake_quantize(full[name], "hif8", scale))
    assert not torch.equal(fq[name], full[name])
    assert torch.equal(fq["model.embed_tokens.weight"], full["model.embed_tokens.weight"])
    AutoModelForCausalLM.from_pretrained(last / "policy_fake_quant")  # loads as it is


def test_resume_is_exact(full_run, tmp_path):
    from safetensors.torch import load_file

    from medrl.launch.rundir import create_run_dir
    from medrl.launch.stages import run_stage

    recipe = recipe_for(tmp_path, "run.name=part")
    part = create_run_dir(recipe)
    shutil.copytree(full_run / "checkpoints" / "step-000002", part / "checkpoints" / "step-000002")
    rows = metrics(full_run)
    (part / "metrics.jsonl").write_text("".join(json.dumps(rows[s]) + "\n" for s in (0, 1, 2)))
    run_stage(recipe, part, resume_from=part / "checkpoints" / "step-000002")
    resumed = metrics(part)
    for step in (3, 4):
        for key in ("loss", "grad_norm", "lr", "qat/clip/max", "qat/clip/q_proj/input",
                    "qat/probe/accuracy_drop", "qat/probe/gold_logprob"):
            if key in rows[step]:
                assert resumed[step][key] == rows[step][key], (step, key)
    a = load_file(str(full_run / "checkpoints" / "step-000004" / "learner" / "qat_state.safetensors"))
    b = load_file(str(part / "checkpoints" / "step-000004" / "learner" / "qat_state.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_saturation_is_reported_and_warned(tiny_qwen2, tmp_path):
    """Scales set far too large: nearly every input saturates; the warning metric fires."""
    import io

    from rich.console import Console

    from medrl.align.learner import Learner
    from medrl.align.qat import qat_layers
    from medrl.align.stages.qat import QATHooks
    from medrl.align.stages.sft import ExampleSpec, batch_loss, batch_weight, build_example
    from medrl.launch.data import load_samples

    out = io.StringIO()
    hooks = QATHooks(warmup_steps=0, qat_lr=1e-4, clip_warn_threshold=0.01,
                     console=Console(file=out, width=200))
    learner = Learner(tiny_qwen2, zero_stage=0, micro_batch_size=2, lr=1e-3, temperature=1.0,
                      prepare_model=hooks.prepare_model)
    hooks.start(learner, None, None)
    for layer in qat_layers(learner.model).values():
        layer.input_scaler.scale = torch.tensor(1e9)
        layer.input_scaler.filled = torch.tensor(1)
    recipe = recipe_for(tmp_path)
    spec = ExampleSpec(response_field="findings", weight_field="abnormal")
    examples = [build_example(learner.tokenizer, s, spec) for s in load_samples(recipe.data)[:2]]
    hooks.before_step(1)
    assert learner.scheduler.get_last_lr()[0] == pytest.approx(1e-4)
    step = learner.train_step_with(batch_loss, learner.collate(examples), size_fn=batch_weight)
    hooks.after_step(1, step)
    assert step["qat/clip/max"] > 0.5 and step["qat/clip/q_proj/input"] > 0.5
    assert step["qat/clip/warn"] == 1.0
    assert "clipped at the hif8 maximum" in out.getvalue()


# ------------------------------------------------------------- the step the scalers record


def qat_learner(tiny_qwen2, hooks, **kwargs):
    from medrl.align.learner import Learner

    options = dict(zero_stage=0, micro_batch_size=1, lr=1e-3, lr_schedule="constant",
                   temperature=1.0, prepare_model=hooks.prepare_model)
    learner = Learner(tiny_qwen2, **{**options, **kwargs})
    hooks.start(learner, None, None)
    return learner


def sft_examples(learner, tmp_path, n: int):
    from medrl.align.stages.sft import ExampleSpec, build_example
    from medrl.launch.data import load_samples

    spec = ExampleSpec(response_field="findings", weight_field="abnormal")
    samples = load_samples(recipe_for(tmp_path).data)[:n]
    return [build_example(learner.tokenizer, s, spec) for s in samples]


def train(learner, hooks, examples, batch_size: int) -> list[dict]:
    """The stage loop's step sequence: before_step, one optimiser step, after_step."""
    from medrl.align.stages.sft import batch_loss, batch_weight

    rows = []
    for step, i in enumerate(range(0, len(examples), batch_size), start=1):
        hooks.before_step(step)
        batch = learner.collate(examples[i:i + batch_size])
        metrics = learner.train_step_with(batch_loss, batch, size_fn=batch_weight)
        hooks.after_step(step, metrics)
        rows.append(metrics)
    return rows


@pytest.fixture(scope="module")
def checkpointing_runs(tiny_qwen2, tmp_path_factory):
    """Three quantised steps of two micro-batches each, with and without gradient
    checkpointing; the inputs of one layer are recorded on every training forward."""
    from medrl.align.qat import qat_layers, qat_state_dict
    from medrl.align.stages.qat import QATHooks

    runs = {}
    for checkpointing in (False, True):
        hooks = QATHooks(fmt="e4m3", warmup_steps=1, qat_lr=1e-3, history=4)
        learner = qat_learner(tiny_qwen2, hooks, gradient_checkpointing=checkpointing)
        layer = qat_layers(learner.model)["model.layers.0.self_attn.q_proj"]
        seen: list[float] = []

        def record(module, args, seen=seen):
            if module.training:
                seen.append(args[0].detach().abs().amax().item())

        layer.register_forward_pre_hook(record)
        examples = sft_examples(learner, tmp_path_factory.mktemp("ckpt"), 6)
        rows = train(learner, hooks, examples, batch_size=2)
        weights = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
        runs[checkpointing] = dict(rows=rows, state=qat_state_dict(learner.model), seen=seen,
                                   weights=weights)
    return runs


def test_gradient_checkpointing_records_each_step_once(checkpointing_runs):
    plain, ckpt = checkpointing_runs[False], checkpointing_runs[True]
    assert len(ckpt["seen"]) == 2 * len(plain["seen"])  # each forward ran again in backward
    assert plain["state"].keys() == ckpt["state"].keys()
    for key, value in plain["state"].items():
        assert torch.equal(ckpt["state"][key], value), key
    for a, b in zip(plain["rows"], ckpt["rows"], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-6)
    for name, value in plain["weights"].items():
        torch.testing.assert_close(ckpt["weights"][name], value, rtol=1e-6, atol=1e-7)


def test_amax_history_counts_optimiser_steps(checkpointing_runs):
    """Two micro-batches per step: one history entry per step, the larger of its two amaxes."""
    run = checkpointing_runs[False]
    seen = run["seen"]
    assert len(seen) == 6  # three steps of two micro-batches
    prefix = "model.layers.0.self_attn.q_proj.input"
    assert int(run["state"][f"{prefix}.filled"]) == 3
    expected = [max(seen[4:6]), max(seen[2:4]), max(seen[0:2]), 0.0]
    torch.testing.assert_close(run["state"][f"{prefix}.amax_history"],
                               torch.tensor(expected), rtol=1e-6, atol=0)
    assert int(run["state"]["model.layers.1.mlp.down_proj.weight.filled"]) == 3


def test_fake_quant_export_under_partitioned_zero3(tiny_qwen2, tmp_path):
    """ZeRO-3 with no persistent parameters: every weight is partitioned (empty on the rank)
    when the checkpoint is written; the export gathers them."""
    from safetensors.torch import load_file

    from medrl.align.checkpoint import save_checkpoint
    from medrl.align.qat import fake_quantize, qat_layers
    from medrl.align.stages.qat import QATHooks

    hooks = QATHooks(warmup_steps=0, qat_lr=1e-4, export_fake_quant=True)
    learner = qat_learner(tiny_qwen2, hooks, zero_stage=3, micro_batch_size=2,
                          zero3_param_persistence_threshold=0)
    train(learner, hooks, sft_examples(learner, tmp_path, 2), batch_size=2)
    layer = qat_layers(learner.model)["model.layers.1.mlp.up_proj"]
    assert layer.weight.numel() == 0  # partitioned: the test exercises the gather

    def write(tmp: Path) -> None:
        learner.save(tmp)
        hooks.write(tmp)

    ckpt = save_checkpoint(tmp_path / "run", 1, write=write, state={})
    assert (ckpt / "COMPLETE").is_file()
    full = load_file(str(ckpt / "policy" / "model.safetensors"))
    fq = load_file(str(ckpt / "policy_fake_quant" / "model.safetensors"))
    name = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(fq[name], fake_quantize(full[name], "hif8", layer.weight_scaler.scale))
    assert not torch.equal(fq[name], full[name])
