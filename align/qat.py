"""Quantisation-aware training maths: HiFloat8 / FP8 E4M3 fake quantisation, delayed scaling,
and W8A8 fake-quantised linear layers with a straight-through estimator.

Everything here computes in the input's floating dtype (half types compare in float32); no
8-bit storage is used: a fake-quantised tensor holds exactly the values an 8-bit format can
represent, scaled back. See ``docs/qat.md`` for the formats and how to read the metrics.

Formats (``fmt``):

- ``"hif8"``: HiFloat8 (Luo et al., "Ascend HiFloat8 Format for Deep Learning",
  arXiv:2409.16626). Tapered precision: 3 mantissa bits for exponents |E| <= 3, 2 bits for
  4 <= |E| <= 7, 1 bit for 8 <= |E| <= 15; denormals 2^-22 .. 2^-16 (powers of two); largest
  finite magnitude 2^15. Rounding: to nearest, ties away from zero.
- ``"e4m3"``: OCP FP8 E4M3 (``float8_e4m3fn``): bias 7, 3 mantissa bits, subnormals down to
  2^-9, largest finite 448. Rounding: to nearest, ties to even (the OCP conversion rule and
  what ``torch.float8_e4m3fn`` casts do, so it can be checked against torch).

Both saturate: any magnitude beyond the largest finite value (inf included) becomes it. NaN
stays NaN.
"""

from __future__ import annotations

import functools
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

FORMATS = ("hif8", "e4m3")
REDUCTIONS = ("max", "most_recent")


# ---------------------------------------------------------------------------------------------
# value tables


def _hif8_positive() -> list[float]:
    values = [2.0 ** e for e in range(-22, -15)]  # denormals 2^-22 .. 2^-16
    for e in range(-15, 16):
        bits = 3 if abs(e) <= 3 else 2 if abs(e) <= 7 else 1
        values += [(1 + k / 2 ** bits) * 2.0 ** e for k in range(2 ** bits)]
    return [v for v in values if v <= 2.0 ** 15]


def _e4m3_positive() -> list[float]:
    values = [k / 8 * 2.0 ** -6 for k in range(1, 8)]  # subnormals
    for e in range(-6, 9):
        values += [(1 + k / 8) * 2.0 ** e for k in range(8)]
    return [v for v in values if v <= 448.0]  # 1.875 * 2^8 is the NaN code


@functools.lru_cache(maxsize=None)
def _positive_table(fmt: str) -> tuple[float, ...]:
    """0 and the positive finite values of ``fmt``, ascending."""
    if fmt == "hif8":
        return (0.0, *sorted(_hif8_positive()))
    if fmt == "e4m3":
        return (0.0, *sorted(_e4m3_positive()))
    raise ValueError(f"fmt: {fmt!r} is not one of {', '.join(FORMATS)}.")


def format_max(fmt: str) -> float:
    """Largest finite magnitude of ``fmt`` (hif8: 32768, e4m3: 448)."""
    return _positive_table(fmt)[-1]


def format_values(fmt: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Every finite value of ``fmt``, ascending, zero once: Tensor[2 * positives + 1]."""
    pos = torch.tensor(_positive_table(fmt)[1:], dtype=dtype)
    return torch.cat([-pos.flip(0), torch.zeros(1, dtype=dtype), pos])


def hif8_values(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The 253 finite HiFloat8 values, ascending (126 positive, zero, 126 negative)."""
    return format_values("hif8", dtype)


@functools.lru_cache(maxsize=None)
def _tables(fmt: str, dtype: torch.dtype, device: torch.device):
    pos = torch.tensor(_positive_table(fmt), dtype=torch.float64)
    mids = (pos[1:] + pos[:-1]) / 2  # exact in float32: at most 5 significant bits
    return pos.to(dtype=dtype, device=device), mids.to(dtype=dtype, device=device)


def quantize(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Round ``x`` to the nearest value of ``fmt`` (same shape and dtype), saturating.

    Ties: away from zero for hif8, to even for e4m3 (see the module docstring).
    """
    if not x.is_floating_point():
        raise ValueError(f"x: expected a floating tensor, got {x.dtype}.")
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    table, mids = _tables(fmt, work.dtype, work.device)
    mag = work.abs()
    # right=True counts the midpoints <= |x|: a tie lands on the larger magnitude.
    idx = torch.bucketize(mag, mids, right=True)
    if fmt == "e4m3":
        # Table index == the 7-bit code, whose low bit is the mantissa's: at a tie step back
        # to the even code.
        tie = (idx > 0) & (mag == mids[(idx - 1).clamp(min=0)])
        idx = torch.where(tie & (idx % 2 == 1), idx - 1, idx)
    q = torch.copysign(table[idx], work)
    q = torch.where(torch.isnan(work), work, q)
    return q.to(x.dtype)


def quantize_hif8(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest HiFloat8 value, ties away from zero, saturating at +-32768."""
    return quantize(x, "hif8")


def fake_quantize(x: torch.Tensor, fmt: str, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """quantize(x * scale) / scale: the values ``x`` keeps after a round trip through ``fmt``.

    Half-precision inputs are scaled and quantised in float32 (no double rounding) and the
    result cast back to their dtype.
    """
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    if isinstance(scale, torch.Tensor):
        scale = scale.to(work.dtype)
    return (quantize(work * scale, fmt) / scale).to(x.dtype)


class _FakeQuantSTE(torch.autograd.Function):
    """Forward: fake_quantize. Backward: the gradient passes unchanged where |x * scale| is
    within the format's range and is zero where the value saturated (as for a clamp), so a
    saturated value is not pushed further out."""

    @staticmethod
    def forward(ctx, x, fmt, scale):
        ctx.save_for_backward((x.float() * scale).abs() <= format_max(fmt))
        return fake_quantize(x, fmt, scale)

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None


def fake_quantize_ste(x: torch.Tensor, fmt: str, scale: torch.Tensor | float) -> torch.Tensor:
    """:func:`fake_quantize` with the straight-through gradient described in _FakeQuantSTE."""
    return _FakeQuantSTE.apply(x, fmt, scale)


# ---------------------------------------------------------------------------------------------
# delayed scaling


class DelayedScaler:
    """Per-tensor delayed scaling: the scale used at step t comes from amaxes of steps < t.

    A step is one optimiser step, however many forward calls it holds (micro-batches, and the
    recomputed forwards of gradient checkpointing). Within a step the scale is frozen:
    :meth:`observe` only takes the running max of the step's amaxes, so a recomputed forward
    sees the same tensor, the same scale and leaves the same record as the forward it repeats.
    :meth:`end_step` (call it once per optimiser step) pushes the step's amax into the history
    (newest first, the oldest dropped) and recomputes the scale.

    scale = format_max / 2^margin / reduce(amax history), with reduce "max" (largest of the
    last ``history`` step amaxes) or "most_recent". The very first step has no history: each
    of its forwards uses the amax of the tensor being quantised (so a first batch is neither
    saturated nor crushed into the denormals, whatever its magnitude). A step whose amax is
    non-finite or zero is not recorded and keeps the previous scale (counted in ``skipped``);
    so is an amax that would give a non-finite scale.

    ``sync_amax``: under torch.distributed, :meth:`end_step` takes the max amax over all ranks
    (one collective per step; every rank must end the same steps) so ranks keep one scale.
    """

    def __init__(self, fmt: str = "hif8", history: int = 64, reduction: str = "max", *,
                 margin: int = 0, sync_amax: bool = False):
        format_max(fmt)  # validates fmt
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction: {reduction!r} is not one of {', '.join(REDUCTIONS)}.")
        if history < 1:
            raise ValueError(f"history: must be >= 1, got {history}.")
        self.fmt, self.history_len, self.reduction = fmt, int(history), reduction
        self.target = format_max(fmt) / 2.0 ** margin
        self.sync_amax = sync_amax
        self.amax_history = torch.zeros(self.history_len, dtype=torch.float32)
        self.filled = torch.zeros((), dtype=torch.int64)  # entries of the history in use
        self.scale = torch.ones((), dtype=torch.float32)
        self.skipped = torch.zeros((), dtype=torch.int64)
        # Of the step in progress (or, right after end_step, of the step just ended): the max
        # amax, and the largest clipped share over its forwards.
        self.step_amax = torch.zeros((), dtype=torch.float32)
        self.clip_share = torch.zeros((), dtype=torch.float32)
        self._step_open = False  # a forward has been observed since the last end_step

    def _to(self, device: torch.device) -> None:
        if self.scale.device != device:
            for name in ("amax_history", "filled", "scale", "skipped", "step_amax",
                         "clip_share"):
                setattr(self, name, getattr(self, name).to(device))

    def _scale_from_history(self) -> torch.Tensor:
        if self.reduction == "most_recent":
            amax = self.amax_history[0]
        else:
            amax = self.amax_history.max()  # unused entries are 0 and never win
        return self.target / amax

    def _valid(self, amax: torch.Tensor) -> torch.Tensor:
        return torch.isfinite(amax) & (amax > 0) & torch.isfinite(self.target / amax)

    def current_scale(self, x: torch.Tensor) -> torch.Tensor:
        """The scale to quantise ``x`` with now (float32 0-dim on x's device)."""
        self._to(x.device)
        amax = x.detach().abs().amax().float()
        # Without history (first step), the current tensor's own amax, if usable. Tensor ops
        # only, so no device synchronisation.
        first = torch.where(self._valid(amax), self.target / amax, self.scale)
        return torch.where(self.filled == 0, first, self.scale)

    @torch.no_grad()
    def observe(self, x: torch.Tensor, scale: torch.Tensor) -> None:
        """Record one forward of the current step: its amax and the share of ``x`` clipped
        under ``scale``, each folded into the step's max. The scale does not change."""
        self._to(x.device)
        mag = x.detach().abs().float()
        clip = (mag * scale > format_max(self.fmt)).float().mean()
        amax = mag.amax()
        if self._step_open:  # torch.maximum keeps a NaN: such a step is skipped at its end
            amax, clip = torch.maximum(self.step_amax, amax), torch.maximum(self.clip_share, clip)
        self.step_amax, self.clip_share, self._step_open = amax, clip, True

    @torch.no_grad()
    def end_step(self) -> None:
        """Push the step's amax into the history and update the scale (no-op when the step
        observed nothing)."""
        if not self._step_open:
            return
        self._step_open = False
        amax = self.step_amax.clone()
        dist = torch.distributed
        if self.sync_amax and dist.is_available() and dist.is_initialized():
            dist.all_reduce(amax, op=dist.ReduceOp.MAX)
        valid = self._valid(amax)
        pushed = torch.roll(self.amax_history, 1)
        pushed[0] = amax
        self.amax_history = torch.where(valid, pushed, self.amax_history)
        self.filled = torch.where(valid, (self.filled + 1).clamp(max=self.history_len),
                                  self.filled)
        self.scale = torch.where(valid, self._scale_from_history().float(), self.scale)
        self.skipped = self.skipped + (~valid).long()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"amax_history": self.amax_history.clone(), "filled": self.filled.clone(),
                "scale": self.scale.clone(), "skipped": self.skipped.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = {"amax_history", "filled", "scale", "skipped"}
        if set(state) != expected:
            raise ValueError(f"state: keys {sorted(state)} are not {sorted(expected)}.")
        if state["amax_history"].shape != (self.history_len,):
            raise ValueError(f"state: amax_history has {tuple(state['amax_history'].shape)} "
                             f"entries, this scaler keeps {self.history_len}.")
        device = self.scale.device
        self.amax_history = state["amax_history"].to(device, torch.float32).clone()
        self.filled = state["filled"].to(device, torch.int64).clone()
        self.scale = state["scale"].to(device, torch.float32).clone()
        self.skipped = state["skipped"].to(device, torch.int64).clone()
        self._step_open = False  # the state is saved between steps


# ---------------------------------------------------------------------------------------------
# W8A8 linear layers


class QATLinear(nn.Linear):
    """An nn.Linear whose weight and input are fake-quantised in the forward pass (W8A8).

    Built from an existing Linear, sharing its ``weight`` and ``bias`` Parameters, so the
    model's state dict, tied weights and optimiser see the same tensors as before; the
    scalers are plain attributes, saved separately (:func:`qat_state_dict`).

    ``enabled`` False gives the exact full-precision forward. In training mode the scalers
    observe every forward, on or off, so a full-precision warm-up also warms the scales; in
    eval mode they only read the current scale. Call :func:`end_qat_step` after each
    optimiser step: that is when the observed amaxes enter the histories.
    """

    def __init__(self, linear: nn.Linear, fmt: str = "hif8", history: int = 64,
                 reduction: str = "max", *, margin: int = 0, sync_amax: bool = False):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)
        self.fmt = fmt
        self.enabled = True
        self.weight_scaler = DelayedScaler(fmt, history, reduction, margin=margin,
                                           sync_amax=sync_amax)
        self.input_scaler = DelayedScaler(fmt, history, reduction, margin=margin,
                                          sync_amax=sync_amax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w_scale = self.weight_scaler.current_scale(w)
        x_scale = self.input_scaler.current_scale(x)
        if self.training:
            self.weight_scaler.observe(w, w_scale)
            self.input_scaler.observe(x, x_scale)
        if self.enabled:
            w = fake_quantize_ste(w, self.fmt, w_scale)
            x = fake_quantize_ste(x, self.fmt, x_scale)
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fmt={self.fmt}, enabled={self.enabled}"


def enable_fake_quant(model: nn.Module, fmt: str = "hif8", history: int = 64,
                      reduction: str = "max", *, exclude: tuple[str, ...] = ("lm_head",),
                      margin: int = 0, sync_amax: bool = False) -> dict[str, QATLinear]:
    """Replace every nn.Linear of ``model`` (in place) by a :class:`QATLinear`.

    exclude: modules whose name ends with one of these are left in full precision (the
    output projection by default: FP8 training keeps it in high precision). Call this before
    wrapping the model for DeepSpeed (ZeRO-3 attaches hooks to the modules it finds) or PEFT.
    Returns {module name: QATLinear}. Already wrapped layers are kept as they are.
    """
    format_max(fmt)
    wrapped: dict[str, QATLinear] = {}
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, QATLinear):
                wrapped[full] = child
            elif isinstance(child, nn.Linear) and not full.endswith(tuple(exclude)):
                qat = QATLinear(child, fmt, history, reduction, margin=margin,
                                sync_amax=sync_amax)
                qat.train(child.training)
                setattr(module, child_name, qat)
                wrapped[full] = qat
    if not wrapped:
        raise ValueError("model: has no nn.Linear layer to quantise.")
    return wrapped


def qat_layers(model: nn.Module) -> dict[str, QATLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QATLinear)}


def set_fake_quant(model: nn.Module, enabled: bool) -> None:
    """Switch fake quantisation on or off in every QATLinear (off = full precision)."""
    for layer in qat_layers(model).values():
        layer.enabled = enabled


def end_qat_step(model: nn.Module) -> None:
    """End the optimiser step for every scaler of ``model``: push the step's amaxes (the max
    over its micro-batches) into the histories and update the scales. Collective with
    ``sync_amax`` (every rank calls it once per step)."""
    for layer in qat_layers(model).values():
        layer.weight_scaler.end_step()
        layer.input_scaler.end_step()


def layer_group(name: str) -> str:
    """The group a layer's metrics go to: its last name component (q_proj, down_proj, ...),
    prefixed with ``vision/`` for layers of a vision tower."""
    leaf = name.rsplit(".", 1)[-1]
    return f"vision/{leaf}" if ".visual." in f".{name}." or "vision" in name else leaf


def clip_stats(model: nn.Module) -> dict[str, float]:
    """Clip shares of the last step (the largest over its forwards), averaged per layer group.

    Keys ``qat/clip/<group>/weight`` and ``qat/clip/<group>/input``: the mean over the group's
    layers of the share of values beyond the format's largest finite value (saturated), plus
    ``qat/clip/max`` over all layers and tensors.
    """
    sums: dict[str, list[float]] = defaultdict(list)
    for name, layer in qat_layers(model).items():
        group = layer_group(name)
        sums[f"qat/clip/{group}/weight"].append(float(layer.weight_scaler.clip_share))
        sums[f"qat/clip/{group}/input"].append(float(layer.input_scaler.clip_share))
    stats = {k: sum(v) / len(v) for k, v in sorted(sums.items())}
    stats["qat/clip/max"] = max((max(v) for v in sums.values()), default=0.0)
    return stats


def qat_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every scaler's state as ``{"<layer>.<weight|input>.<field>": tensor}`` (CPU clones),
    ready for safetensors."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in qat_layers(model).items():
        for kind, scaler in (("weight", layer.weight_scaler), ("input", layer.input_scaler)):
            for field, value in scaler.state_dict().items():
                out[f"{name}.{kind}.{field}"] = value.detach().cpu()
    return out


def load_qat_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Restore :func:`qat_state_dict` exactly; the layer sets must match."""
    layers = qat_layers(model)
    expected = set(qat_state_dict(model))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"state: does not match the model's QAT layers (missing {missing[:3]}, "
                         f"unexpected {extra[:3]}); was it saved from the same model and format?")
    for name, layer in layers.items():
        for kind, scaler in (("weight", layer.weight_scaler), ("input", layer.input_scaler)):
            prefix = f"{name}.{kind}."
            scaler.load_state_dict({k[len(prefix):]: v for k, v in state.items()
                                    if k.startswith(prefix)})
