"""3D volume building blocks: sin-cos positions, the tiny encoder, the projector with residual
alignment, the placeholder-replacing LM wrapper, and saving / loading the modules."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from medrl.align.records import UserError
from medrl.align.volume_projector import (CONFIG_FILE, DEFAULT_VOLUME_TOKEN, WEIGHTS_FILE,
                                          TinyVolumeEncoder, VolumeLM, VolumeProjector,
                                          load_volume_modules, save_volume_modules, sincos_3d,
                                          template_anchor)

E = 128  # hidden size of tiny:qwen2
PROMPT_HEAD = "<|im_start|>user\n<|vision_start|>"
PROMPT_TAIL = "<|vision_end|>Is there a bright spot?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_qwen2)


def load_lm(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def small_modules(seed=0, gate="token"):
    """Encoder for 8 x 16 x 16 volumes (grid 2 x 4 x 4) and a projector to 8 tokens."""
    torch.manual_seed(seed)
    return (TinyVolumeEncoder(patch=4, dim=48),
            VolumeProjector(48, E, pool=(1, 2, 2), gate=gate))


def build_volume_lm(folder, tokenizer, encoder, projector, trainable):
    lm = load_lm(folder)
    template = tokenizer(PROMPT_HEAD + PROMPT_TAIL).input_ids
    if not bool(projector.has_anchor):
        projector.set_anchor(template_anchor(lm.get_input_embeddings(), template))
    vid = tokenizer.convert_tokens_to_ids(DEFAULT_VOLUME_TOKEN)
    return VolumeLM(lm, encoder, projector, volume_token_id=vid, trainable=trainable)


def blob_batch(tokenizer, generator, n, n_tokens=8):
    """Volumes [n, 1, 8, 16, 16] of faint noise, half with a bright 8 x 8 column somewhere;
    the answer token is "yes" for those and "no" for the others (the only target)."""
    vid = tokenizer.convert_tokens_to_ids(DEFAULT_VOLUME_TOKEN)
    yes, no = tokenizer.convert_tokens_to_ids(["yes", "no"])
    head, tail = tokenizer(PROMPT_HEAD).input_ids, tokenizer(PROMPT_TAIL).input_ids
    volume = 0.1 * torch.randn(n, 1, 8, 16, 16, generator=generator)
    bright = torch.randint(0, 2, (n,), generator=generator)
    for i in range(n):
        if bright[i]:
            y, x = torch.randint(0, 9, (2,), generator=generator).tolist()
            volume[i, 0, :, y:y + 8, x:x + 8] += 2.0
    ids = torch.tensor([head + [vid] * n_tokens + tail + [yes if b else no]
                        for b in bright.tolist()])
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]
    return ids, torch.ones_like(ids), volume, labels


def sft_step(model, optimizer, batch):
    ids, mask, volume, labels = batch
    loss = model(ids, mask, volume, labels=labels).loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


# ------------------------------------------------------------------------------ positions

def test_sincos_3d_matches_hand_values_for_dim_6():
    pos = sincos_3d(2, 3, 4, 6)
    assert pos.shape == (24, 6)
    for row, (z, y, x) in enumerate((z, y, x) for z in range(2) for y in range(3)
                                    for x in range(4)):
        want = torch.tensor([math.sin(z), math.cos(z), math.sin(y), math.cos(y),
                             math.sin(x), math.cos(x)])
        torch.testing.assert_close(pos[row], want)


@pytest.mark.parametrize("dim", [6, 48, 96, 128, 130])
def test_sincos_3d_rows_distinct_bounded_deterministic(dim):
    pos = sincos_3d(4, 8, 8, dim)
    assert pos.shape == (256, dim) and pos.dtype == torch.float32
    assert torch.unique(pos, dim=0).shape[0] == 256
    assert pos.abs().max() <= 1.0
    assert torch.equal(pos, sincos_3d(4, 8, 8, dim))
    # the depth columns depend on z only: cells with the same z share them
    depth_cols = 2 * (dim // 6) + (2 if dim % 6 else 0)
    grid = pos.reshape(4, 8, 8, dim)[..., :depth_cols]
    assert torch.equal(grid, grid[:, :1, :1].expand_as(grid))
    assert not torch.equal(grid[0], grid[1])


@pytest.mark.parametrize("args", [(2, 2, 2, 7), (2, 2, 2, 4), (2, 2, 2, 0), (0, 2, 2, 12)])
def test_sincos_3d_refuses_bad_arguments(args):
    with pytest.raises(ValueError, match="sincos_3d"):
        sincos_3d(*args)


# ------------------------------------------------------------------------ encoder, projector

@pytest.mark.parametrize("size, patch, pool, grid", [
    ((16, 32, 32), (4, 8, 8), (2, 2, 2), (4, 4, 4)),
    ((32, 64, 64), (4, 8, 8), (2, 2, 2), (8, 8, 8)),
    ((8, 32, 48), (2, 8, 8), (2, 2, 3), (4, 4, 6)),
])
@pytest.mark.parametrize("embed_dim", [E, 96])
def test_shapes_through_encoder_and_projector(size, patch, pool, grid, embed_dim):
    torch.manual_seed(0)
    encoder = TinyVolumeEncoder(patch=patch, dim=24, depth=1)
    projector = VolumeProjector(24, embed_dim, pool=pool)
    projector.set_anchor(torch.randn(embed_dim))
    features = encoder(torch.randn(2, 1, *size))
    assert features.shape == (2, *grid, 24)
    tokens = projector(features)
    n = math.prod(g // p for g, p in zip(grid, pool))
    assert tokens.shape == (2, n, embed_dim)
    assert projector.num_tokens(grid) == n
    assert torch.isfinite(tokens).all()


def test_sides_that_do_not_divide_are_refused():
    encoder, projector = small_modules()
    with pytest.raises(ValueError, match="not multiples of the patch size"):
        encoder(torch.randn(1, 1, 8, 16, 18))
    with pytest.raises(ValueError, match=r"not a multiple of pool \(1, 2, 2\)"):
        projector(torch.randn(1, 2, 4, 5, 48), anchor=torch.randn(E))
    with pytest.raises(ValueError, match="no anchor"):
        projector(torch.randn(1, 2, 4, 4, 48))


@pytest.mark.parametrize("gate", ["token", "channel"])
def test_gate_limits_through_override(gate):
    _, projector = small_modules(gate=gate)
    features, anchor = torch.randn(3, 2, 4, 4, 48), torch.randn(E)
    projector.set_anchor(anchor)
    projector.gate_override = 0.0
    torch.testing.assert_close(projector(features), projector.norm(projector.project(features)))
    projector.gate_override = 1.0
    want = projector.norm(anchor).expand(3, 8, E)
    torch.testing.assert_close(projector(features), want)
    # one anchor per row ([B, E]): every token of row b becomes LayerNorm(anchor_b)
    anchors = torch.randn(3, E)
    out = projector(features, anchor=anchors)
    torch.testing.assert_close(out, projector.norm(anchors)[:, None, :].expand(3, 8, E))


@pytest.mark.parametrize("gate", ["token", "channel"])
def test_gate_limits_through_the_gate_bias(gate):
    _, projector = small_modules(gate=gate)
    features, anchor = torch.randn(2, 2, 4, 4, 48), torch.randn(E)
    projector.set_anchor(anchor)
    last = projector.gate_mlp[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(-40.0)  # sigmoid(-40) ~ 4e-18
    torch.testing.assert_close(projector(features), projector.norm(projector.project(features)))
    with torch.no_grad():
        last.bias.fill_(40.0)
    torch.testing.assert_close(projector(features), projector.norm(anchor).expand(2, 8, E))
    with torch.no_grad():  # in between, the output is neither limit
        last.bias.fill_(0.0)
    mid = projector(features)
    assert not torch.allclose(mid, projector.norm(anchor).expand(2, 8, E), atol=1e-3)
    assert not torch.allclose(mid, projector.norm(projector.project(features)), atol=1e-3)


def test_anchor_is_detached_from_the_embedding():
    torch.manual_seed(0)
    embedding = nn.Embedding(50, E)
    ids = [3, 7, 7, 11]
    anchor = template_anchor(embedding, ids)
    assert not anchor.requires_grad
    torch.testing.assert_close(anchor, embedding.weight[ids].mean(0).detach())
    _, projector = small_modules()
    projector.set_anchor(anchor)
    projector(torch.randn(2, 2, 4, 4, 48)).square().sum().backward()
    assert embedding.weight.grad is None
    assert projector.gate_mlp[0].weight.grad.abs().sum() > 0  # the gate did get gradients
    # an anchor passed with a graph attached is cut from it as well
    live = embedding.weight[ids].mean(0)
    assert live.requires_grad
    projector(torch.randn(2, 2, 4, 4, 48), anchor=live).square().sum().backward()
    assert embedding.weight.grad is None


def test_template_anchor_refuses_empty_and_unknown_ids():
    embedding = nn.Embedding(10, 6)
    with pytest.raises(ValueError, match="no tokens"):
        template_anchor(embedding, [])
    with pytest.raises(ValueError, match=r"\[10\] are outside the vocabulary \(size 10\)"):
        template_anchor(embedding, [1, 10])


# ---------------------------------------------------------------------------- the LM wrapper

def test_volume_tokens_reach_the_lm_at_the_placeholders(tiny_qwen2, tokenizer):
    model = build_volume_lm(tiny_qwen2, tokenizer, *small_modules(), trainable="projector")
    ids, mask, volume, labels = blob_batch(tokenizer, torch.Generator().manual_seed(0), 2)
    first = int((ids[0] == model.volume_token_id).nonzero()[0])
    with torch.no_grad():
        a = model(ids, mask, volume).logits
        b = model(ids, mask, volume + torch.randn_like(volume)).logits
        # placeholders are never targets, even when the labels name them
        on_run = torch.where(ids == model.volume_token_id, ids, labels)
        assert model(ids, mask, volume, labels=on_run).loss == model(
            ids, mask, volume, labels=labels).loss
    # causal: positions before the run cannot see the volume, those from it on do
    torch.testing.assert_close(a[:, :first], b[:, :first])
    assert (a[:, first:] - b[:, first:]).abs().amax(dim=-1).min() > 1e-4


def test_placeholder_count_mismatch_names_the_counts(tiny_qwen2, tokenizer):
    model = build_volume_lm(tiny_qwen2, tokenizer, *small_modules(), trainable="projector")
    ids, mask, volume, _ = blob_batch(tokenizer, torch.Generator().manual_seed(0), 2,
                                      n_tokens=7)
    with pytest.raises(ValueError, match=r"row 0 of input_ids has 7 volume placeholder tokens "
                                         r"\(id \d+\) but the projector gives 8 tokens"):
        model(ids, mask, volume)
    ids, mask, volume, _ = blob_batch(tokenizer, torch.Generator().manual_seed(0), 2)
    where = (ids[1] == model.volume_token_id).nonzero().flatten()
    inside, after = int(where[3]), int(where[-1]) + 1  # move one placeholder out of the run
    ids[1, [inside, after]] = ids[1, [after, inside]]
    with pytest.raises(ValueError, match="row 1 of input_ids: the 8 volume placeholder tokens"
                                         r" \(id \d+\) are not one contiguous run"):
        model(ids, mask, volume)


@pytest.mark.parametrize("trainable, lm_on, encoder_on", [
    ("projector", False, False), ("projector+encoder", False, True), ("all", True, True)])
def test_trainable_parts(tiny_qwen2, tokenizer, trainable, lm_on, encoder_on):
    model = build_volume_lm(tiny_qwen2, tokenizer, *small_modules(), trainable=trainable)
    assert all(p.requires_grad == lm_on for p in model.lm.parameters())
    assert all(p.requires_grad == encoder_on for p in model.encoder.parameters())
    assert all(p.requires_grad for p in model.projector.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    sft_step(model, optimizer, blob_batch(tokenizer, torch.Generator().manual_seed(0), 4))
    for name, value in model.state_dict().items():
        moved = not torch.equal(value, before[name])
        part = name.split(".")[0]
        if part == "lm" and not lm_on or part == "encoder" and not encoder_on:
            assert not moved, name
    assert not torch.equal(model.projector.mlp[0].weight, before["projector.mlp.0.weight"])
    with pytest.raises(ValueError, match="trainable must be"):
        VolumeLM(model.lm, model.encoder, model.projector, volume_token_id=1, trainable="lm")


def test_sft_steps_learn_the_blob_answer(tiny_qwen2, tokenizer):
    model = build_volume_lm(tiny_qwen2, tokenizer, *small_modules(), trainable="all")
    generator = torch.Generator().manual_seed(1)
    held_out = blob_batch(tokenizer, generator, 32)
    share = (held_out[3][:, -1] == tokenizer.convert_tokens_to_ids("yes")).float().mean()
    # the best loss of a model that ignores the volume: the entropy of the held-out answers
    blind = float(-(share * share.log() + (1 - share) * (1 - share).log()))

    def held_out_loss():
        with torch.no_grad():
            return model(*held_out[:3], labels=held_out[3]).loss.item()

    start = held_out_loss()
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3)
    for _ in range(25):
        sft_step(model, optimizer, blob_batch(tokenizer, generator, 8))
    end = held_out_loss()
    assert start > 5.0  # a random LM over a 1024-token vocabulary
    assert end < blind / 2, (start, end, blind)


# ---------------------------------------------------------------------------- save / load

def test_save_load_round_trip(tiny_qwen2, tokenizer, tmp_path):
    encoder, projector = small_modules(seed=3, gate="channel")
    model = build_volume_lm(tiny_qwen2, tokenizer, encoder, projector, "projector+encoder")
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    sft_step(model, optimizer, blob_batch(tokenizer, torch.Generator().manual_seed(0), 4))
    config = {"volume_token_id": model.volume_token_id, "trainable": "projector+encoder"}
    save_volume_modules(tmp_path, encoder, projector, config)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([WEIGHTS_FILE, CONFIG_FILE])

    encoder2, projector2, config2 = load_volume_modules(tmp_path)
    assert config2 == config
    assert projector2.gate_kind == "channel" and projector2.pool == (1, 2, 2)
    for a, b in ((encoder, encoder2), (projector, projector2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    volume = torch.randn(2, 1, 8, 16, 16)
    with torch.no_grad():
        assert torch.equal(projector(encoder(volume)), projector2(encoder2(volume)))


def test_resumed_optimisation_matches_uninterrupted(tiny_qwen2, tokenizer, tmp_path):
    generator = torch.Generator().manual_seed(5)
    batches = [blob_batch(tokenizer, generator, 4) for _ in range(4)]

    model = build_volume_lm(tiny_qwen2, tokenizer, *small_modules(), "projector+encoder")
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    for batch in batches[:3]:
        sft_step(model, optimizer, batch)
    save_volume_modules(tmp_path, model.encoder, model.projector, {"step": 3})
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    loss = sft_step(model, optimizer, batches[3])

    encoder, projector, config = load_volume_modules(tmp_path)
    assert config == {"step": 3}
    resumed = build_volume_lm(tiny_qwen2, tokenizer, encoder, projector, "projector+encoder")
    optimizer2 = torch.optim.AdamW(resumed.trainable_parameters(), lr=1e-3)
    optimizer2.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    assert sft_step(resumed, optimizer2, batches[3]) == loss
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_load_refuses_missing_and_mismatched_files(tmp_path):
    encoder, projector = small_modules()
    projector.set_anchor(torch.randn(E))
    with pytest.raises(UserError, match=f"{CONFIG_FILE} not found"):
        load_volume_modules(tmp_path)

    save_volume_modules(tmp_path / "a", encoder, projector, {})
    (tmp_path / "a" / WEIGHTS_FILE).unlink()
    with pytest.raises(UserError, match=f"{WEIGHTS_FILE} not found"):
        load_volume_modules(tmp_path / "a")

    # weights of another save beside this config
    save_volume_modules(tmp_path / "b", encoder, projector, {})
    save_volume_modules(tmp_path / "c", encoder, VolumeProjector(48, 96, pool=2), {})
    (tmp_path / "c" / WEIGHTS_FILE).replace(tmp_path / "b" / WEIGHTS_FILE)
    with pytest.raises(UserError, match=f"{WEIGHTS_FILE} does not match .*{CONFIG_FILE}"):
        load_volume_modules(tmp_path / "b")

    # a config whose settings disagree with the weights' shapes
    save_volume_modules(tmp_path / "d", encoder, projector, {})
    meta = json.loads((tmp_path / "d" / CONFIG_FILE).read_text())
    meta["projector"]["embed_dim"] = 96
    (tmp_path / "d" / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(UserError, match=f"{WEIGHTS_FILE}: the projector tensors do not match"):
        load_volume_modules(tmp_path / "d")

    (tmp_path / "d" / CONFIG_FILE).write_text("{not json")
    with pytest.raises(UserError, match=f"{CONFIG_FILE} is not a volume module config"):
        load_volume_modules(tmp_path / "d")
