"""HiFloat8 / E4M3 fake quantisation, delayed scaling, and W8A8 QAT layers on tiny Qwen2."""

from __future__ import annotations

import copy

import pytest
import torch

from medrl.align.qat import (
    DelayedScaler,
    QATLinear,
    clip_stats,
    enable_fake_quant,
    end_qat_step,
    fake_quantize,
    fake_quantize_ste,
    format_max,
    format_values,
    hif8_values,
    load_qat_state_dict,
    qat_state_dict,
    quantize,
    quantize_hif8,
    set_fake_quant,
)

HIF8_MAX = 2.0 ** 15


def _nearest_ties_away(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Brute force: distance to every value of the table; among equals the larger magnitude."""
    pos = format_values(fmt)[format_values(fmt) >= 0]  # ascending, 0 first
    mag = x.double().abs().clamp(max=format_max(fmt))
    dist = (mag[:, None] - pos[None, :]).abs()
    best = dist.min(1, keepdim=True).values
    # the last (largest) index reaching the minimum distance: ties away from zero
    idx = (dist == best).double().mul(torch.arange(len(pos), dtype=torch.float64)).argmax(1)
    return torch.copysign(pos[idx], x.double())


def _adversarial(fmt: str) -> torch.Tensor:
    """Every value, every midpoint, one float64 ulp on either side of both, powers of two,
    the underflow threshold, and values far beyond the maximum."""
    pos = format_values(fmt)[format_values(fmt) >= 0]
    mids = (pos[1:] + pos[:-1]) / 2
    points = torch.cat([pos, mids, torch.tensor([2.0 ** e for e in range(-30, 20)]),
                        torch.tensor([1e-30, 1e-9, 6e4, 1e10, 1e300])])
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    around = torch.cat([points, torch.nextafter(points, inf), torch.nextafter(points, -inf)])
    return torch.cat([around, -around])


def test_hif8_table_count_and_extremes():
    v = hif8_values()
    # 126 positive: 7 denormals; |E|<=3: 7 x 8; 4<=|E|<=7: 8 x 4; 8<=|E|<=15: 16 x 2 less 1.5*2^15.
    assert len(v) == 253 and len(v.unique()) == 253 and torch.equal(v, v.sort().values)
    pos = v[v > 0]
    assert pos.min() == 2.0 ** -22 and pos.max() == HIF8_MAX == format_max("hif8")
    assert torch.equal(v, -v.flip(0))
    assert torch.equal(pos[:8], torch.tensor([2.0 ** e for e in range(-22, -15)] + [2.0 ** -15]))
    # spacing: 3 mantissa bits around 1, 2 bits in [16, 32), 1 bit in [256, 512)
    assert set(pos[(pos >= 1) & (pos < 2)].tolist()) == {1 + k / 8 for k in range(8)}
    assert set(pos[(pos >= 16) & (pos < 32)].tolist()) == {16 + 4 * k for k in range(4)}
    assert set(pos[(pos >= 256) & (pos < 512)].tolist()) == {256.0, 384.0}


def test_e4m3_table_matches_torch_float8():
    v = format_values("e4m3")
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
    assert torch.equal(v, codes[torch.isfinite(codes)].unique().sort().values)
    assert len(v) == 253 and v.max() == 448 == format_max("e4m3")
    assert v[v > 0].min() == 2.0 ** -9


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hif8_is_nearest_with_ties_away_from_zero(dtype):
    g = torch.Generator().manual_seed(0)
    dense = torch.exp2(torch.rand(50_000, generator=g, dtype=torch.float64) * 46 - 28)
    dense = dense * torch.where(torch.rand(50_000, generator=g) < 0.5, -1.0, 1.0).double()
    for x in (dense.to(dtype), _adversarial("hif8").to(dtype)):
        q = quantize_hif8(x)
        assert q.dtype == dtype and q.shape == x.shape
        torch.testing.assert_close(q.double(), _nearest_ties_away(x, "hif8"), rtol=0, atol=0)


def test_hif8_ties_rounding_underflow_and_saturation_by_hand():
    x = torch.tensor([1.0625, -1.0625, 2.0 ** -23, 2.0 ** -23 * 0.999, 24.0 + 2.0, 40000.0,
                      float("inf"), -float("inf"), 0.0, 3e-7, 49152.0, 1.9375])
    q = quantize_hif8(x)
    expected = [1.125, -1.125, 2.0 ** -22, 0.0, 28.0, HIF8_MAX, HIF8_MAX, -HIF8_MAX, 0.0,
                2.0 ** -22, HIF8_MAX, 2.0]
    assert q.tolist() == expected
    assert torch.isnan(quantize_hif8(torch.tensor([float("nan")]))).all()


@pytest.mark.parametrize("fmt", ["hif8", "e4m3"])
def test_idempotent_sign_preserving_and_dtypes(fmt):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10_000, generator=g) * torch.exp2(torch.randint(-20, 18, (10_000,),
                                                                     generator=g).float())
    q = quantize(x, fmt)
    assert torch.equal(quantize(q, fmt), q)
    assert torch.equal(torch.sign(q)[q != 0], torch.sign(x)[q != 0])
    assert set(q.double().unique().tolist()) <= set(format_values(fmt).tolist())
    for dtype in (torch.bfloat16, torch.float16):
        xh = x.to(dtype)
        qh = quantize(xh, fmt)
        assert qh.dtype == dtype and torch.equal(qh, quantize(xh.float(), fmt).to(dtype))


def test_e4m3_rounds_like_torch_float8_ties_to_even():
    g = torch.Generator().manual_seed(2)
    x = torch.cat([torch.randn(50_000, generator=g) * 100, _adversarial("e4m3").float()])
    inside = x.abs() <= 448
    expected = x[inside].to(torch.float8_e4m3fn).float()
    assert torch.equal(quantize(x[inside], "e4m3"), expected)
    assert quantize(torch.tensor([1.0625, 1.1875, 500.0, -1e9]), "e4m3").tolist() == [
        1.0, 1.25, 448.0, -448.0]


def test_fake_quantize_and_ste():
    x = torch.tensor([0.3, -2.0, 1e-3, 50.0], dtype=torch.float64, requires_grad=True)
    scale = 448 / 2.0  # 50 * scale saturates, the others do not
    y = fake_quantize_ste(x, "e4m3", scale)
    torch.testing.assert_close(y, fake_quantize(x.detach(), "e4m3", scale))
    torch.testing.assert_close(y.detach(), quantize(x.detach() * scale, "e4m3") / scale)
    assert y[3].item() == 2.0  # saturated at 448 / scale
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 0.0]


# ---------------------------------------------------------------------------------------------
# delayed scaling


def _step(scaler, amax, n=4):
    x = torch.full((n,), float(amax))
    scale = scaler.current_scale(x)
    scaler.observe(x, scale)
    scaler.end_step()
    return scale.item()


@pytest.mark.parametrize("reduction", ["max", "most_recent"])
def test_scale_at_step_t_comes_from_earlier_steps(reduction):
    s = DelayedScaler("hif8", history=4, reduction=reduction)
    assert _step(s, 10.0) == pytest.approx(HIF8_MAX / 10)  # first step: its own amax
    assert _step(s, 20.0) == pytest.approx(HIF8_MAX / 10)  # not 20: only steps < t count
    assert _step(s, 5.0) == pytest.approx(HIF8_MAX / 20)
    expected = HIF8_MAX / 20 if reduction == "max" else HIF8_MAX / 5
    assert s.scale.item() == pytest.approx(expected)


def test_history_rolls_and_old_amax_drops_out():
    s = DelayedScaler("e4m3", history=3)
    for amax in (1.0, 2.0, 3.0, 4.0):
        _step(s, amax)
    assert s.amax_history.tolist() == [4.0, 3.0, 2.0] and int(s.filled) == 3
    assert s.scale.item() == pytest.approx(448 / 4)
    for _ in range(3):
        _step(s, 1.0)
    assert s.amax_history.tolist() == [1.0, 1.0, 1.0] and s.scale.item() == pytest.approx(448)


@pytest.mark.parametrize("bad", [0.0, float("inf"), float("nan")])
def test_non_finite_or_zero_amax_keeps_the_scale(bad):
    s = DelayedScaler("hif8", history=4)
    assert _step(s, bad) == 1.0 and int(s.filled) == 0  # first step unusable: scale 1
    _step(s, 8.0)
    before = s.state_dict()
    _step(s, bad)
    after = s.state_dict()
    assert torch.equal(after["amax_history"], before["amax_history"])
    assert after["scale"].item() == pytest.approx(HIF8_MAX / 8)
    assert int(after["skipped"]) == 2


def test_one_history_entry_per_step_whatever_its_micro_batches():
    s = DelayedScaler("hif8", history=4)
    for step_amaxes in ([3.0, 7.0, 5.0], [2.0, 1.0], [4.0]):
        scales = set()
        for amax in step_amaxes:
            x = torch.full((4,), amax)
            scale = s.current_scale(x)
            s.observe(x, scale)
            scales.add(scale.item())
        if int(s.filled):  # after the first step the scale is frozen within the step
            assert scales == {s.scale.item()}
        s.end_step()
    assert s.amax_history.tolist() == [4.0, 2.0, 7.0, 0.0] and int(s.filled) == 3
    assert s.scale.item() == pytest.approx(HIF8_MAX / 7)
    s.end_step()  # a step that observed nothing records nothing
    assert int(s.filled) == 3 and int(s.skipped) == 0
    for amax in (9.0, float("nan"), 1.0):  # one bad micro-batch: the whole step is skipped
        x = torch.full((4,), amax)
        s.observe(x, s.current_scale(x))
    s.end_step()
    assert int(s.filled) == 3 and int(s.skipped) == 1
    assert s.scale.item() == pytest.approx(HIF8_MAX / 7)


def test_clip_share_is_the_largest_of_the_step():
    s = DelayedScaler("e4m3", history=4)
    _step(s, 1.0)  # scale maps 1.0 to 448
    for x in ([0.5, 2.0, 3.0, 0.1], [0.5, 0.5, 0.5, 4.0], [0.1, 0.1, 0.1, 0.1]):
        x = torch.tensor(x)
        s.observe(x, s.current_scale(x))
    s.end_step()
    assert s.clip_share.item() == pytest.approx(0.5)


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_recompute_leaves_history_and_gradients_unchanged(reentrant):
    """A recomputed forward (gradient checkpointing) quantises with the scale of the forward
    it repeats and does not record a second amax."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    base = torch.nn.Linear(16, 8)
    plain = QATLinear(base, "e4m3", history=4)
    ckpt = QATLinear(copy.deepcopy(base), "e4m3", history=4)
    for step, amax in enumerate((10.2, 8.2, 2.2, 6.0)):
        x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(step))
        x = x / x.abs().max() * amax
        grads = []
        for layer, run in ((plain, lambda f, v: f(v)),
                           (ckpt, lambda f, v: checkpoint(f, v, use_reentrant=reentrant))):
            xi = x.clone().requires_grad_(True)
            (run(layer, xi) ** 2).sum().backward()
            end_qat_step(torch.nn.Sequential(layer))
            grads.append(xi.grad)
        assert torch.equal(grads[1], grads[0]), step
        for a, b in ((plain.input_scaler, ckpt.input_scaler),
                     (plain.weight_scaler, ckpt.weight_scaler)):
            assert torch.equal(b.amax_history, a.amax_history) and torch.equal(b.scale, a.scale)
    assert plain.input_scaler.amax_history.tolist() == pytest.approx([6.0, 2.2, 8.2, 10.2])


def test_clip_share_and_state_round_trip():
    s = DelayedScaler("hif8", history=5)
    _step(s, 10.0)
    x = torch.tensor([5.0, 15.0, 20.0, -12.0])
    s.observe(x, s.current_scale(x))  # scale maps 10 to the max: three values saturate
    assert s.clip_share.item() == pytest.approx(0.75)
    s.end_step()

    copy_ = DelayedScaler("hif8", history=5)
    copy_.load_state_dict(s.state_dict())
    for k, v in s.state_dict().items():
        assert torch.equal(copy_.state_dict()[k], v)
    for amax in (3.0, 30.0, 0.5):
        assert _step(copy_, amax) == _step(s, amax)
    with pytest.raises(ValueError, match="amax_history"):
        DelayedScaler("hif8", history=4).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="reduction"):
        DelayedScaler("hif8", reduction="mean")
    with pytest.raises(ValueError, match="fmt"):
        DelayedScaler("int8")


# ---------------------------------------------------------------------------------------------
# the model


@pytest.fixture
def qwen(tiny_qwen2):
    from medrl.align.models import load_model

    model = load_model(tiny_qwen2, dtype=torch.float32)
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(3))
    return model, ids


def test_qat_model_forward_gradients_and_switch(qwen):
    model, ids = qwen
    reference = copy.deepcopy(model)
    keys = set(model.state_dict())
    with torch.no_grad():
        full = reference(input_ids=ids).logits

    layers = enable_fake_quant(model, "hif8", history=8)
    assert len(layers) == 2 * 7 and all(isinstance(m, QATLinear) for m in layers.values())
    assert "lm_head" not in layers and set(model.state_dict()) == keys
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied

    model.train()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    for name, layer in layers.items():
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0, name
    assert not torch.equal(out.logits.detach(), full)  # quantisation really acts
    torch.testing.assert_close(out.logits.detach(), full, rtol=0.2, atol=0.2)

    stats = clip_stats(model)
    assert {"qat/clip/q_proj/input", "qat/clip/down_proj/weight", "qat/clip/max"} <= set(stats)
    assert all(0.0 <= v <= 1.0 for v in stats.values())

    set_fake_quant(model, False)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, full)
    set_fake_quant(model, True)
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, full)


def test_qat_state_round_trip_restores_outputs(qwen, tiny_qwen2):
    from medrl.align.models import load_model

    model, ids = qwen
    enable_fake_quant(model, "e4m3", history=4, reduction="most_recent")
    model.train()
    for i in range(3):
        model(input_ids=(ids + i) % 1000)
        end_qat_step(model)
    state = qat_state_dict(model)
    assert int(state["model.layers.0.mlp.up_proj.input.filled"]) == 3
    model.eval()
    before = {k: v.clone() for k, v in qat_state_dict(model).items()}
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    # eval mode reads the scales but does not update them
    assert all(torch.equal(before[k], v) for k, v in qat_state_dict(model).items())

    other = load_model(tiny_qwen2, dtype=torch.float32)
    enable_fake_quant(other, "e4m3", history=4, reduction="most_recent")
    load_qat_state_dict(other, state)
    other.eval()
    with torch.no_grad():
        assert torch.equal(other(input_ids=ids).logits, expected)
    with pytest.raises(ValueError, match="state"):
        load_qat_state_dict(other, {k: v for k, v in state.items() if "q_proj" not in k})
