"""3D volumes into a causal LM: a patch encoder, a projector with residual alignment, a wrapper.

The path (docs/stages.md, "3D volumes through a projector (building blocks)"):

    volume [B, 1, D, H, W]
      -> encoder (any :class:`VolumeEncoder`; :class:`TinyVolumeEncoder` here)
      -> patch features [B, D', H', W', C]
      -> :class:`VolumeProjector`: strided Conv3d over (D', H', W') by ``pool``, MLP to E,
         + 3D sin-cos positions of the reduced grid, residual alignment with a text anchor,
         LayerNorm
      -> tokens [B, N, E], N = (D'/pd)(H'/ph)(W'/pw), E = the LM's hidden size
      -> :class:`VolumeLM`: they replace the embeddings of a run of N placeholder tokens.

Residual alignment (Med3D-R1's description): with x a projected token and a the anchor (the
frozen mean text embedding of the prompt template, :func:`template_anchor`),

    g = sigmoid(MLP([x; a])),   x <- g * a + (1 - g) * x

Ours: g is one scalar per token by default (``gate="token"``) or one per channel
(``gate="channel"``); the anchor is stored in the projector as a buffer, so it stays what it
was when it was taken even when the LM's embeddings train, and it is saved with the weights.

Save / load (:func:`save_volume_modules`, :func:`load_volume_modules`) write
``volume_modules.safetensors`` and ``volume_config.json`` beside a Hugging Face model folder;
safetensors only, never pickle.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Literal, Protocol, Sequence

import torch
from torch import Tensor, nn

from medrl.align.records import UserError

WEIGHTS_FILE = "volume_modules.safetensors"
CONFIG_FILE = "volume_config.json"
FORMAT_VERSION = 1
# The bundled tokenizer's video placeholder: a special token that no text prompt of a
# text-only policy contains, so a run of it marks where the volume's tokens go.
DEFAULT_VOLUME_TOKEN = "<|video_pad|>"

GateKind = Literal["token", "channel"]
Trainable = Literal["projector", "projector+encoder", "all"]
Triple = tuple[int, int, int]


def sincos_3d(d: int, h: int, w: int, dim: int) -> Tensor:
    """Fixed 3D sin-cos position embeddings of a d x h x w grid: float32 ``[d*h*w, dim]``.

    Rows are in C order (depth slowest, width fastest), as ``x.flatten(1, 3)`` of a
    ``[B, d, h, w, C]`` tensor. ``dim`` is split over the three axes in even parts: each axis
    gets ``2 * (dim // 6)`` channels and the remainder (0, 2 or 4) goes two channels each to
    depth, then height, so any even ``dim`` >= 6 works (E = 128 or 896 included). An axis of
    2m channels holds ``[sin(p * w_k), cos(p * w_k)]`` for k < m, with w_k = 10000^(-k/m) and
    p the position along the axis. Values are in [-1, 1]; w_0 = 1, so two positions never get
    the same row (sin and cos of distinct integers never both agree).

    Raises ValueError for an odd ``dim``, ``dim`` < 6 or a grid side < 1.
    """
    if dim < 6 or dim % 2:
        raise ValueError(f"sincos_3d: dim must be even and at least 6, got {dim}")
    if min(d, h, w) < 1:
        raise ValueError(f"sincos_3d: grid sides must be at least 1, got {(d, h, w)}")
    base = 2 * (dim // 6)
    extra = (dim - 3 * base) // 2  # 0, 1 or 2 axes get two more channels
    parts = []
    for axis, size in enumerate((d, h, w)):
        m = (base + (2 if axis < extra else 0)) // 2
        omega = 10000.0 ** (-torch.arange(m, dtype=torch.float64) / m)
        angle = torch.arange(size, dtype=torch.float64)[:, None] * omega[None, :]
        parts.append(torch.cat([angle.sin(), angle.cos()], dim=1))  # [size, 2m]
    zd, zh, zw = torch.meshgrid(torch.arange(d), torch.arange(h), torch.arange(w),
                                indexing="ij")
    rows = [parts[0][zd.flatten()], parts[1][zh.flatten()], parts[2][zw.flatten()]]
    return torch.cat(rows, dim=1).float()


class VolumeEncoder(Protocol):
    """What the projector needs from a vision pre-training stage's encoder.

    ``forward(volume: [B, 1, D, H, W]) -> [B, D', H', W', C]`` (patch features on a grid,
    channels last), with ``out_dim`` = C. A ``nn.Module``, so that its parameters can train.
    """

    out_dim: int

    def __call__(self, volume: Tensor) -> Tensor: ...

    def parameters(self, recurse: bool = True): ...


def _triple(value: int | Sequence[int], name: str) -> Triple:
    t = (value,) * 3 if isinstance(value, int) else tuple(int(v) for v in value)
    if len(t) != 3 or min(t) < 1:
        raise ValueError(f"{name} must be one positive int or three, got {value!r}")
    return t  # type: ignore[return-value]


class TinyVolumeEncoder(nn.Module):
    """A small 3D patch encoder standing in for a pre-trained one (:class:`VolumeEncoder`).

    Conv3d patch embedding (kernel = stride = ``patch``), fixed 3D sin-cos positions, then
    ``depth`` pre-norm transformer encoder layers (no dropout, so equal inputs give equal
    outputs in train mode too). ``forward``: ``[B, in_channels, D, H, W]`` ->
    ``[B, D/pd, H/ph, W/pw, dim]``; each side must be a multiple of its patch size.
    """

    def __init__(self, *, in_channels: int = 1, patch: int | Sequence[int] = (4, 8, 8),
                 dim: int = 48, depth: int = 2, heads: int = 2, mlp_ratio: int = 2):
        super().__init__()
        self.patch = _triple(patch, "patch")
        self.in_channels, self.out_dim = in_channels, dim
        self._config = dict(in_channels=in_channels, patch=list(self.patch), dim=dim,
                            depth=depth, heads=heads, mlp_ratio=mlp_ratio)
        self.embed = nn.Conv3d(in_channels, dim, kernel_size=self.patch, stride=self.patch)
        layer = nn.TransformerEncoderLayer(dim, heads, dim * mlp_ratio, dropout=0.0,
                                           activation="gelu", batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def config(self) -> dict[str, Any]:
        """The constructor's arguments (JSON-ready): what :func:`load_volume_modules` rebuilds."""
        return dict(self._config)

    def forward(self, volume: Tensor) -> Tensor:
        if volume.dim() != 5 or volume.shape[1] != self.in_channels:
            raise ValueError(f"volume must be [B, {self.in_channels}, D, H, W], "
                             f"got {list(volume.shape)}")
        sides = tuple(volume.shape[2:])
        if any(s % p for s, p in zip(sides, self.patch)):
            raise ValueError(f"volume sides {sides} are not multiples of the patch size "
                             f"{self.patch}")
        x = self.embed(volume)  # [B, C, D', H', W']
        b, c, d, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # [B, D'H'W', C]
        x = x + sincos_3d(d, h, w, c).to(x)
        x = self.norm(self.blocks(x))
        return x.reshape(b, d, h, w, c)


class VolumeProjector(nn.Module):
    """Patch features ``[B, D', H', W', C]`` -> tokens ``[B, N, E]`` in the LM's embedding space.

    Steps: Conv3d (kernel = stride = ``pool``, C -> C) over the grid, so N = (D'/pd)(H'/ph)
    (W'/pw); MLP C -> E -> E (GELU); + :func:`sincos_3d` of the reduced grid (E even, >= 6);
    residual alignment ``x <- g * a + (1 - g) * x`` with ``g = sigmoid(MLP([x; a]))`` (one
    scalar per token for ``gate="token"``, E per token for ``gate="channel"``); LayerNorm(E).

    The anchor a (``[E]``) is a buffer set by :meth:`set_anchor` (or passed to ``forward`` as
    ``[E]`` or ``[B, E]``); it is always detached, so no gradient reaches what it came from.
    ``gate_override`` (a float in [0, 1], or None) fixes g, for checks of the two limits.
    """

    def __init__(self, in_dim: int, embed_dim: int, *, pool: int | Sequence[int] = (2, 2, 2),
                 gate: GateKind = "token", gate_hidden: int | None = None):
        super().__init__()
        if gate not in ("token", "channel"):
            raise ValueError(f"gate must be 'token' or 'channel', got {gate!r}")
        sincos_3d(1, 1, 1, embed_dim)  # refuses an E the positions cannot be built for
        self.pool = _triple(pool, "pool")
        self.in_dim, self.embed_dim, self.gate_kind = in_dim, embed_dim, gate
        gate_hidden = gate_hidden or embed_dim
        self._config = dict(in_dim=in_dim, embed_dim=embed_dim, pool=list(self.pool),
                            gate=gate, gate_hidden=gate_hidden)
        self.conv = nn.Conv3d(in_dim, in_dim, kernel_size=self.pool, stride=self.pool)
        self.mlp = nn.Sequential(nn.Linear(in_dim, embed_dim), nn.GELU(),
                                 nn.Linear(embed_dim, embed_dim))
        self.gate_mlp = nn.Sequential(nn.Linear(2 * embed_dim, gate_hidden), nn.GELU(),
                                      nn.Linear(gate_hidden, 1 if gate == "token" else embed_dim))
        self.norm = nn.LayerNorm(embed_dim)
        self.register_buffer("anchor", torch.zeros(embed_dim))
        self.register_buffer("has_anchor", torch.zeros((), dtype=torch.bool))
        self.gate_override: float | None = None

    def config(self) -> dict[str, Any]:
        """The constructor's arguments (JSON-ready): what :func:`load_volume_modules` rebuilds."""
        return dict(self._config)

    def num_tokens(self, grid: Sequence[int]) -> int:
        """N for a feature grid (D', H', W')."""
        return math.prod(g // p for g, p in zip(grid, self.pool))

    @torch.no_grad()
    def set_anchor(self, anchor: Tensor) -> None:
        """Store the anchor ``[E]`` (detached, copied into the buffer's dtype and device)."""
        if tuple(anchor.shape) != (self.embed_dim,):
            raise ValueError(f"anchor must be [{self.embed_dim}], got {list(anchor.shape)}")
        self.anchor.copy_(anchor.detach())
        self.has_anchor.fill_(True)

    def project(self, features: Tensor) -> Tensor:
        """Features ``[B, D', H', W', C]`` -> x ``[B, N, E]`` (conv, MLP, positions; no gate)."""
        if features.dim() != 5 or features.shape[-1] != self.in_dim:
            raise ValueError(f"features must be [B, D', H', W', {self.in_dim}], "
                             f"got {list(features.shape)}")
        grid = tuple(features.shape[1:4])
        if any(g % p for g, p in zip(grid, self.pool)):
            raise ValueError(f"feature grid {grid} is not a multiple of pool {self.pool}")
        x = self.conv(features.permute(0, 4, 1, 2, 3))  # [B, C, d, h, w]
        _, _, d, h, w = x.shape
        x = self.mlp(x.flatten(2).transpose(1, 2))  # [B, N, E]
        return x + sincos_3d(d, h, w, self.embed_dim).to(x)

    def gate(self, x: Tensor, anchor: Tensor) -> Tensor:
        """g ``[B, N, 1]`` or ``[B, N, E]`` for x ``[B, N, E]`` and a broadcast anchor."""
        if self.gate_override is not None:
            shape = x.shape[:2] + ((1,) if self.gate_kind == "token" else (self.embed_dim,))
            return x.new_full(shape, float(self.gate_override))
        return torch.sigmoid(self.gate_mlp(torch.cat([x, anchor], dim=-1)))

    def forward(self, features: Tensor, anchor: Tensor | None = None) -> Tensor:
        x = self.project(features)
        if anchor is None:
            if not bool(self.has_anchor):
                raise ValueError("VolumeProjector has no anchor: call set_anchor(template_anchor"
                                 "(...)) or pass anchor=")
            anchor = self.anchor
        anchor = anchor.detach().to(x)  # frozen: no gradient into the text embeddings
        if anchor.dim() == 1:
            anchor = anchor[None, None, :]
        elif anchor.dim() == 2 and anchor.shape[0] == x.shape[0]:
            anchor = anchor[:, None, :]
        else:
            raise ValueError(f"anchor must be [E] or [B, E] with B = {x.shape[0]}, "
                             f"got {list(anchor.shape)}")
        anchor = anchor.expand_as(x)
        g = self.gate(x, anchor)
        return self.norm(g * anchor + (1 - g) * x)


@torch.no_grad()
def template_anchor(embedding: nn.Embedding, token_ids: Sequence[int]) -> Tensor:
    """The mean embedding ``[E]`` of a prompt template's tokens, detached (a frozen anchor)."""
    ids = list(token_ids)
    if not ids:
        raise ValueError("template_anchor: the template has no tokens")
    vocab = embedding.num_embeddings
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"template_anchor: token ids {bad[:5]} are outside the vocabulary "
                         f"(size {vocab})")
    rows = embedding.weight[torch.tensor(ids, device=embedding.weight.device)]
    return rows.float().mean(dim=0).detach().clone()


class VolumeLM(nn.Module):
    """A causal LM whose run of N placeholder tokens is replaced by a volume's N tokens.

    ``lm``: a transformers causal LM (``get_input_embeddings``, ``inputs_embeds=``);
    ``volume_token_id``: the placeholder (the bundled tokenizer's ``<|video_pad|>``, see
    :data:`DEFAULT_VOLUME_TOKEN`); ``trainable``: which parameters get gradients
    (``"projector"``, ``"projector+encoder"`` or ``"all"``); the rest are frozen.
    """

    def __init__(self, lm: nn.Module, encoder: nn.Module, projector: VolumeProjector, *,
                 volume_token_id: int, trainable: Trainable = "projector"):
        super().__init__()
        if trainable not in ("projector", "projector+encoder", "all"):
            raise ValueError(f"trainable must be 'projector', 'projector+encoder' or 'all', "
                             f"got {trainable!r}")
        self.lm, self.encoder, self.projector = lm, encoder, projector
        self.volume_token_id, self.trainable = int(volume_token_id), trainable
        for module, on in ((lm, trainable == "all"),
                           (encoder, trainable in ("projector+encoder", "all")),
                           (projector, True)):
            for p in module.parameters():
                p.requires_grad_(on)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters that get gradients, in a fixed order (for an optimiser)."""
        return [p for p in self.parameters() if p.requires_grad]

    def volume_tokens(self, volume: Tensor) -> Tensor:
        """``[B, 1, D, H, W]`` -> ``[B, N, E]``."""
        return self.projector(self.encoder(volume))

    def forward(self, input_ids: Tensor, attention_mask: Tensor, volume: Tensor,
                labels: Tensor | None = None):
        """``input_ids``/``attention_mask``/``labels`` ``[B, T]``, ``volume`` ``[B, 1, D, H, W]``.

        Each row must hold exactly one contiguous run of N placeholders (ValueError naming the
        counts otherwise). Labels at placeholder positions are set to -100 (never targets).
        Returns the LM's output (``.loss`` when labels are given, ``.logits`` ``[B, T, V]``).
        """
        tokens = self.volume_tokens(volume)  # [B, N, E]
        n = tokens.shape[1]
        mask = input_ids == self.volume_token_id  # [B, T]
        for row in range(input_ids.shape[0]):
            where = mask[row].nonzero().flatten()
            if len(where) != n:
                raise ValueError(f"row {row} of input_ids has {len(where)} volume placeholder "
                                 f"tokens (id {self.volume_token_id}) but the projector gives "
                                 f"{n} tokens per volume")
            if n and int(where[-1] - where[0]) != n - 1:
                raise ValueError(f"row {row} of input_ids: the {n} volume placeholder tokens "
                                 f"(id {self.volume_token_id}) are not one contiguous run")
        embeds = self.lm.get_input_embeddings()(input_ids)  # [B, T, E]
        # masked_scatter fills masked positions in row-major order: row b gets tokens[b].
        embeds = embeds.masked_scatter(mask[..., None], tokens.to(embeds.dtype))
        if labels is not None:
            labels = labels.masked_fill(mask, -100)
        return self.lm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels)


# ---------------------------------------------------------------------------- save / load

def _write_atomic(path: Path, write) -> None:
    """``write(tmp_path)`` into a temporary sibling, then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_volume_modules(folder: str | Path, encoder: TinyVolumeEncoder,
                        projector: VolumeProjector, config: dict[str, Any]) -> None:
    """Write ``volume_modules.safetensors`` and ``volume_config.json`` into ``folder``.

    ``config`` is the caller's JSON-ready settings (e.g. ``volume_token_id``, the template's
    token ids); it is stored beside the modules' own constructor arguments and the weights'
    sha256, so a config left from another save is detected at load. Each file is written to a
    temporary sibling and renamed into place (weights first).
    """
    from safetensors.torch import save_file

    if not hasattr(encoder, "config"):
        raise TypeError("save_volume_modules: the encoder must have config() (TinyVolumeEncoder)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"encoder.{k}": v.detach().cpu().contiguous()
               for k, v in encoder.state_dict().items()}
    tensors.update({f"projector.{k}": v.detach().cpu().contiguous()
                    for k, v in projector.state_dict().items()})
    weights = folder / WEIGHTS_FILE
    _write_atomic(weights, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    meta = {"format_version": FORMAT_VERSION, "encoder": encoder.config(),
            "projector": projector.config(), "config": config,
            "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    _write_atomic(folder / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text))


def load_volume_modules(folder: str | Path
                        ) -> tuple[TinyVolumeEncoder, VolumeProjector, dict[str, Any]]:
    """Rebuild (encoder, projector, config) from :func:`save_volume_modules`'s files (CPU).

    Raises UserError naming the file when a file is missing, unreadable, or does not match the
    other (another save's config, missing or unexpected tensors, other shapes).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    weights, cfg_path = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    for path in (cfg_path, weights):
        if not path.is_file():
            raise UserError(f"{path} not found: a folder with 3D volume modules holds "
                            f"{WEIGHTS_FILE} and {CONFIG_FILE} (written by save_volume_modules); "
                            "point at that folder or save the modules there first.")
    try:
        meta = json.loads(cfg_path.read_text())
        enc_args, proj_args, config = meta["encoder"], meta["projector"], meta["config"]
        sha, version = meta["weights_sha256"], meta["format_version"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"{cfg_path} is not a volume module config ({err!r}); save the "
                        "modules again with save_volume_modules.") from err
    if version != FORMAT_VERSION:
        raise UserError(f"{cfg_path} has format_version {version!r}; this medrl reads "
                        f"{FORMAT_VERSION}. Save the modules again with this version.")
    if hashlib.sha256(weights.read_bytes()).hexdigest() != sha:
        raise UserError(f"{weights} does not match {cfg_path} (its sha256 differs from the one "
                        "recorded there: the two files come from different saves, or one was "
                        "changed); save the modules again.")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise UserError(f"{weights} is not a readable safetensors file ({err}); save the "
                        "modules again.") from err
    try:
        encoder = TinyVolumeEncoder(**enc_args)
        projector = VolumeProjector(**proj_args)
    except (TypeError, ValueError) as err:
        raise UserError(f"{cfg_path}: the module settings cannot be built ({err}); save the "
                        "modules again.") from err
    for prefix, module in (("encoder.", encoder), ("projector.", projector)):
        state = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as err:
            first = " ".join(str(err).split())[:400]
            raise UserError(f"{weights}: the {prefix.rstrip('.')} tensors do not match "
                            f"{cfg_path} ({first}); save the modules again.") from err
    stray = [k for k in tensors if not k.startswith(("encoder.", "projector."))]
    if stray:
        raise UserError(f"{weights} holds tensors that are neither encoder nor projector "
                        f"({stray[:3]}); save the modules again.")
    return encoder, projector, config
