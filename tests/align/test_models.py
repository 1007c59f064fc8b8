"""Policies without a model hub: tiny models from configs, local folders, run folders."""

from __future__ import annotations

import json

import pytest

from medrl.align.models import (is_vision_model, load_model, load_tokenizer,
                                resolve_policy)
from medrl.align.records import UserError
from medrl.align.tiny_tokenizer import VOCAB_SIZE


def test_tiny_models_are_hf_folders_with_the_bundled_tokenizer(tiny_qwen2, tiny_qwen2_vl):
    text = json.loads((tiny_qwen2 / "config.json").read_text())
    assert text["model_type"] == "qwen2"
    assert text["hidden_size"] // text["num_attention_heads"] == 64  # vLLM CPU kernels need >= 64
    assert not is_vision_model(tiny_qwen2) and is_vision_model(tiny_qwen2_vl)
    assert (tiny_qwen2_vl / "preprocessor_config.json").exists()
    tok = load_tokenizer(tiny_qwen2)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert len(tok) == text["vocab_size"] == VOCAB_SIZE
    for special in ("<|im_start|>", "<|image_pad|>", "<|vision_start|>"):
        assert tok.convert_tokens_to_ids(special) < 16  # reserved ahead of the BPE merges


def test_tiny_models_generate_offline(tiny_qwen2):
    import torch

    tok = load_tokenizer(tiny_qwen2)
    model = load_model(tiny_qwen2)
    ids = tok.apply_chat_template([{"role": "user", "content": "Which drug?"}],
                                  add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    torch.manual_seed(0)
    out = model.generate(**ids, max_new_tokens=5, min_new_tokens=5, do_sample=True)
    assert out.shape[1] == ids["input_ids"].shape[1] + 5


def test_tiny_weights_depend_only_on_the_seed(tmp_path):
    import torch
    from safetensors.torch import load_file

    a = resolve_policy("tiny:qwen2", cache_dir=tmp_path / "a", seed=3)
    b = resolve_policy("tiny:qwen2", cache_dir=tmp_path / "b", seed=3)
    c = resolve_policy("tiny:qwen2", cache_dir=tmp_path / "c", seed=4)
    wa, wb, wc = (load_file(p / "model.safetensors") for p in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


@pytest.mark.parametrize("spec, message", [
    ("tiny:llama", "unknown tiny architecture 'llama'"),
    ("Qwen/Qwen2-0.5B", "no model hub is reachable"),
    ("./nowhere", "is not a local folder"),
])
def test_unusable_policies_say_what_to_do(spec, message, tmp_path):
    with pytest.raises(UserError, match=message):
        resolve_policy(spec, cache_dir=tmp_path)


def test_run_folders_resolve_to_their_latest_complete_checkpoint(tmp_path, tiny_qwen2):
    import shutil

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(UserError, match="no complete checkpoint"):
        resolve_policy(str(run))
    for step, complete in ((2, True), (4, True), (6, False)):
        policy = run / "checkpoints" / f"step-{step:06d}" / "policy"
        shutil.copytree(tiny_qwen2, policy)
        if complete:
            (policy.parent / "COMPLETE").write_text("{}")
    assert resolve_policy(str(run)) == run / "checkpoints" / "step-000004" / "policy"
    assert resolve_policy(str(run / "checkpoints" / "step-000002")).parent.name == "step-000002"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="holds no config.json"):
        resolve_policy(str(empty))
