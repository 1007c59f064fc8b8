"""token_logprobs equals the naive full-logits computation, for a causal LM and a VLM."""

from __future__ import annotations

import pytest
import torch

from medrl.align.logprobs import token_logprobs
from medrl.align.models import load_model, load_tokenizer


def _append_completions(input_ids, attention_mask, completions, pad_id):
    """Right-pad ``completions`` (lists of ids) to T and append them after the prompts."""
    T = max(len(c) for c in completions)
    ids = torch.full((len(completions), T), pad_id, dtype=input_ids.dtype)
    mask = torch.zeros((len(completions), T), dtype=attention_mask.dtype)
    for i, c in enumerate(completions):
        ids[i, :len(c)] = torch.tensor(c)
        mask[i, :len(c)] = 1
    return torch.cat([input_ids, ids], 1), torch.cat([attention_mask, mask], 1), mask


def _naive(model, input_ids, attention_mask, T, temperature, **extra):
    """Full logits -> log_softmax -> gather; completion token j at column L-T+j."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits.float()
    L = input_ids.size(1)
    logp = torch.log_softmax(logits[:, L - T - 1:L - 1] / temperature, dim=-1)
    return logp.gather(-1, input_ids[:, L - T:].unsqueeze(-1)).squeeze(-1), logp


def assert_same_gradients(got: dict, expected: dict) -> None:
    """Parameter name -> gradient maps agree (float rounding apart), over more than a few."""
    assert got.keys() == expected.keys() and len(got) > 5
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.fixture(scope="module")
def text_batch(tiny_qwen2):
    model = load_model(tiny_qwen2, dtype=torch.float32)
    tok = load_tokenizer(tiny_qwen2)
    assert tok.padding_side == "left"
    enc = tok(["a short prompt", "a rather longer prompt about a chest x-ray"],
              padding=True, return_tensors="pt")
    assert (enc["attention_mask"][0] == 0).any()  # the first prompt is left-padded
    completions = [[11, 12, 13, 14, 15], [21, 22]]
    ids, mask, cmask = _append_completions(enc["input_ids"], enc["attention_mask"], completions,
                                           tok.pad_token_id)
    # Positions as HF generate and vLLM count them: from each row's first real token.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return model, ids, mask, cmask, {"position_ids": positions}


@pytest.fixture(scope="module")
def vl_batch(tiny_qwen2_vl):
    from PIL import Image

    model = load_model(tiny_qwen2_vl, dtype=torch.float32)
    proc = load_tokenizer(tiny_qwen2_vl)
    images = [Image.new("RGB", (56, 56), (200, 10, 10)), Image.new("RGB", (28, 42), (10, 200, 10))]
    texts = ["<|vision_start|><|image_pad|><|vision_end|>What is shown in this image?",
             "<|vision_start|><|image_pad|><|vision_end|>Describe"]
    enc = proc(text=texts, images=images, padding=True, return_tensors="pt")
    assert (enc["attention_mask"][1] == 0).any() and enc["mm_token_type_ids"].sum() > 0
    completions = [[31, 32, 33], [41, 42, 43, 44]]
    ids, mask, cmask = _append_completions(enc["input_ids"], enc["attention_mask"], completions,
                                           proc.tokenizer.pad_token_id)
    mm = torch.cat([enc["mm_token_type_ids"],
                    torch.zeros(cmask.shape, dtype=enc["mm_token_type_ids"].dtype)], 1)
    extra = {"pixel_values": enc["pixel_values"], "image_grid_thw": enc["image_grid_thw"],
             "mm_token_type_ids": mm}
    return model, ids, mask, cmask, extra


@pytest.mark.parametrize("batch", ["text_batch", "vl_batch"])
def test_matches_naive_for_chunk_sizes_and_temperature(batch, request):
    model, ids, mask, cmask, extra = request.getfixturevalue(batch)
    T = cmask.size(1)
    with torch.no_grad():
        for temperature in (1.0, 0.7):
            expected, full = _naive(model, ids, mask, T, temperature, **extra)
            for chunk in (1, 3, 1000):
                got, ent = token_logprobs(model, ids, mask, num_completion_tokens=T,
                                          temperature=temperature, chunk_size=chunk,
                                          with_entropy=True, **extra)
                assert got.shape == (ids.size(0), T) and got.dtype == torch.float32
                keep = cmask.bool()
                torch.testing.assert_close(got[keep], expected[keep], rtol=1e-5, atol=1e-5)
                ent_naive = -(full.exp() * full).sum(-1)
                torch.testing.assert_close(ent[keep], ent_naive[keep], rtol=1e-5, atol=1e-5)
        # Temperature really changes the result (it is not silently ignored).
        hot = token_logprobs(model, ids, mask, num_completion_tokens=T, temperature=2.0, **extra)
        assert not torch.allclose(hot, expected)


def test_padding_does_not_change_a_row(text_batch):
    """A left-padded row scores like the same row alone, unpadded (positions follow the mask)."""
    model, ids, mask, cmask, _ = text_batch
    T = cmask.size(1)
    with torch.no_grad():
        batched = token_logprobs(model, ids, mask, num_completion_tokens=T)
        row = mask[0].bool()
        row[-T:] = True  # keep the completion columns so T stays the same
        alone = token_logprobs(model, ids[:1, row], mask[:1, row], num_completion_tokens=T)
    keep = cmask[0].bool()
    assert mask[0, 0] == 0  # row 0 really is left-padded
    torch.testing.assert_close(batched[0, keep], alone[0, keep], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", ["text_batch", "vl_batch"])
def test_gradients_match_naive(batch, request):
    model, ids, mask, cmask, extra = request.getfixturevalue(batch)
    T = cmask.size(1)
    # An arbitrary per-token weighting so every position's gradient matters.
    weights = torch.linspace(0.5, 1.5, cmask.numel()).view_as(cmask) * cmask

    def grads(fn):
        model.zero_grad(set_to_none=True)
        (fn() * weights).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def naive_fn():
        logp, full = _naive(model, ids, mask, T, 0.8, **extra)
        return logp - 0.3 * (full.exp() * full).sum(-1)  # log-prob + 0.3 * entropy

    def chunked_fn():
        logp, ent = token_logprobs(model, ids, mask, num_completion_tokens=T, temperature=0.8,
                                   chunk_size=3, with_entropy=True, **extra)
        return logp + 0.3 * ent

    assert_same_gradients(grads(chunked_fn), grads(naive_fn))
    model.zero_grad(set_to_none=True)


def test_bad_arguments(text_batch):
    model, ids, mask, cmask, _ = text_batch
    with pytest.raises(ValueError, match="num_completion_tokens"):
        token_logprobs(model, ids, mask, num_completion_tokens=ids.size(1))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(model, ids, mask, num_completion_tokens=2, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs(model, ids, mask, num_completion_tokens=2, chunk_size=0)
    with pytest.raises(ValueError, match="attention_mask"):
        token_logprobs(model, ids, mask[:, 1:], num_completion_tokens=2)


@pytest.fixture(scope="module")
def grouped_batch(tiny_qwen2):
    """Seven rows over three distinct prompts (two left-padded), groups interleaved as a
    reordered batch would be, completions of different lengths."""
    model = load_model(tiny_qwen2, dtype=torch.float32)
    tok = load_tokenizer(tiny_qwen2)
    prompts = ["short", "a much longer prompt about a chest x-ray and its findings", "mid size"]
    order = [0, 1, 0, 2, 1, 0, 2]
    enc = tok([prompts[i] for i in order], padding=True, return_tensors="pt")
    completions = [[10 + r, 20 + r, 30 + r, 40 + r][:2 + r % 3] for r in range(len(order))]
    ids, mask, cmask = _append_completions(enc["input_ids"], enc["attention_mask"], completions,
                                           tok.pad_token_id)
    return model, ids, mask, cmask


def test_shared_prompt_pass_runs_each_prompt_once_and_matches_naive(grouped_batch):
    model, ids, mask, cmask = grouped_batch
    T = cmask.size(1)
    seen = []
    hook = model.model.register_forward_hook(
        lambda _m, _a, kwargs, _out: seen.append(tuple(kwargs["input_ids"].shape)),
        with_kwargs=True)
    try:
        with torch.no_grad():
            shared, ent = token_logprobs(model, ids, mask, num_completion_tokens=T,
                                         temperature=0.9, chunk_size=5, with_entropy=True)
    finally:
        hook.remove()
    assert seen == [(3, ids.size(1) - T), (7, T)]  # three prompts once, then seven completions
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected, full = _naive(model, ids, mask, T, 0.9, position_ids=positions)
    keep = cmask.bool()
    torch.testing.assert_close(shared[keep], expected[keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent[keep], -(full.exp() * full).sum(-1)[keep], rtol=1e-5, atol=1e-5)


def test_shared_prompt_gradients_match_the_unshared_pass(grouped_batch):
    model, ids, mask, cmask = grouped_batch
    T = cmask.size(1)
    weights = torch.linspace(0.5, 1.5, cmask.numel()).view_as(cmask) * cmask

    def grads(share: bool):
        model.zero_grad(set_to_none=True)
        logp, ent = token_logprobs(model, ids, mask, num_completion_tokens=T, with_entropy=True,
                                   share_prompt=share)
        ((logp + 0.3 * ent) * weights).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    assert_same_gradients(grads(True), grads(False))
    model.zero_grad(set_to_none=True)
