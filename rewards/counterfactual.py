"""CCR, causal counterfactual refinement (docs/rewards.md, "CCR: counterfactual region
rewards"): ``counterfactual`` scores how much the policy's own completion depends on the
diagnostic region of the image.

Published (MedSynapse-V): r_causal = (1/T) sum_t [log pi(o_t | image) - log pi(o_t | image
with the diagnostic region masked)], clipped to [-5, 5], added to the accuracy reward as
R = 1.0 r_acc + 0.5 r_causal. A completion that uses the lesion loses likelihood when the
lesion is hidden. Ours: masking in pixel space (three fills), where the region comes from
(a mask image, a box, a segmenter), the rollout's log-probs as the original term, and the
background control.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import numbers
import time
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, Sequence, runtime_checkable

import numpy as np
from PIL import Image, ImageFilter
from pydantic import Field

from medrl.align.encode import sample_image
from medrl.align.records import Sample, UserError
from medrl.rewards.api import RewardContext, RewardResult, reward

Fill = Literal["zero", "mean", "blur"]
Original = Literal["rollout", "policy"]
_MASK_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_VOLUME_SUFFIXES = (".nii", ".nii.gz")


@runtime_checkable
class Segmenter(Protocol):
    """Finds the diagnostic region of an image (a plug-in for rows without one).

    ``segment(image, sample)``: image an RGB PIL image of size (W, H), sample the sample it
    belongs to; returns a bool (or 0/1) array [H, W], True on the region.
    """

    def segment(self, image: Image.Image, sample: Sample) -> np.ndarray: ...


# --------------------------------------------------------------------------------- regions


def box_pixels(value: Any, size: tuple[int, int], *, uid: str, field: str
               ) -> tuple[int, int, int, int]:
    """A row's box ``[x0, y0, x1, y1]`` as pixel bounds, x0/y0 inclusive, x1/y1 exclusive.

    size: the image's (W, H). Pixels: 0 <= x0 < x1 <= W, 0 <= y0 < y1 <= H (the box of
    ``PIL.Image.crop``). Normalised: when all four numbers lie in [0, 1] they are read as
    shares of the width and height (a pixel box of at most one pixel is no lesion), the
    bounds rounded outward. Anything else raises :class:`UserError` naming the sample and
    the field.
    """
    W, H = size
    ok = isinstance(value, (list, tuple)) and len(value) == 4 and all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
        for v in value)
    if ok:
        x0, y0, x1, y1 = (float(v) for v in value)
        if all(0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)):
            x0, x1 = math.floor(x0 * W), math.ceil(x1 * W)
            y0, y1 = math.floor(y0 * H), math.ceil(y1 * H)
        ok = 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H
    if not ok:
        raise UserError(
            f"sample {uid}: the row's field {field!r} is not a region box of its {W}x{H} "
            "image: give [x0, y0, x1, y1] in pixels with 0 <= x0 < x1 <= width and "
            "0 <= y0 < y1 <= height (or all four in [0, 1] as shares of the size), a mask "
            "image path, or fix the data.")
    return int(x0), int(y0), int(x1), int(y1)


def region_mask(value: Any, size: tuple[int, int], *, data_dir: str | Path | None = None,
                uid: str = "?", field: str = "region") -> np.ndarray:
    """The region a row names, as a bool array [H, W] for an image of size (W, H).

    value: a mask image path (PNG/JPEG/..., relative to ``data_dir``; nonzero pixels are
    the region; resized with nearest-neighbour sampling when its size differs), a box (see
    :func:`box_pixels`), or a [H, W] array. NIfTI label volumes are refused (not supported
    yet). Raises :class:`UserError` naming ``uid`` and ``field`` on anything unreadable.
    """
    W, H = size
    if isinstance(value, np.ndarray):
        if value.shape != (H, W):
            raise UserError(f"sample {uid}: the region array of field {field!r} has shape "
                            f"{value.shape}; its image needs [{H}, {W}].")
        return value.astype(bool)
    if isinstance(value, (str, Path)):
        return _mask_file(Path(value), size, data_dir=data_dir, uid=uid, field=field)
    x0, y0, x1, y1 = box_pixels(value, size, uid=uid, field=field)
    out = np.zeros((H, W), dtype=bool)
    out[y0:y1, x0:x1] = True
    return out


def _mask_file(path: Path, size: tuple[int, int], *, data_dir, uid: str, field: str
               ) -> np.ndarray:
    name = path.name.lower()
    if name.endswith(_VOLUME_SUFFIXES):
        raise UserError(f"sample {uid}: the row's field {field!r} names a NIfTI label volume; "
                        "label volumes are not supported yet as CCR regions. Give a 2D mask "
                        "image per slice image, a box, or a segmenter.")
    if not name.endswith(_MASK_SUFFIXES):
        raise UserError(f"sample {uid}: the row's field {field!r} names {path.name!r}, which "
                        f"is not a mask image ({', '.join(_MASK_SUFFIXES)}); give a mask "
                        "image path or a box [x0, y0, x1, y1].")
    full = path.expanduser()
    if not full.is_absolute() and data_dir is not None:
        full = Path(data_dir) / full
    if not full.is_file():
        raise UserError(f"sample {uid}: the mask image {str(path)!r} of field {field!r} was "
                        f"not found (looked at {full}). Fix the path in the data file "
                        "(relative paths resolve against the data file's folder).")
    try:
        with Image.open(full) as im:
            mask = im.convert("L")
    except OSError as exc:
        raise UserError(f"sample {uid}: cannot read the mask image {str(path)!r} of field "
                        f"{field!r} ({exc}).") from None
    if mask.size != tuple(size):
        mask = mask.resize(tuple(size), Image.Resampling.NEAREST)
    return np.asarray(mask) > 0


# --------------------------------------------------------------------------------- masking


def masked_image(image: Image.Image, mask: np.ndarray, fill: Fill = "mean", *,
                 blur_radius: float = 8.0) -> Image.Image:
    """A copy of RGB ``image`` (size (W, H)) with the pixels of ``mask`` (bool [H, W])
    replaced; every other pixel is kept exactly.

    fill: ``zero`` black; ``mean`` the image's mean colour over the whole image (per
    channel, rounded; the region's own mean would leave a bright lesion's trace in a dark
    frame); ``blur`` the image under a Gaussian blur of ``blur_radius`` pixels (which
    keeps the coarse shape, so it hides less than the other two).
    """
    rgb = image.convert("RGB")
    pixels = np.asarray(rgb)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != pixels.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match the image's "
                         f"{pixels.shape[:2]} ([H, W])")
    if fill == "zero":
        filled = np.zeros_like(pixels)
    elif fill == "mean":
        mean = np.rint(pixels.reshape(-1, 3).astype(np.float64).mean(0))
        filled = np.broadcast_to(mean.astype(np.uint8), pixels.shape)
    elif fill == "blur":
        filled = np.asarray(rgb.filter(ImageFilter.GaussianBlur(blur_radius)))
    else:
        raise ValueError(f"fill must be zero, mean or blur, got {fill!r}")
    return Image.fromarray(np.where(mask[..., None], filled, pixels).astype(np.uint8), "RGB")


def background_box(mask: np.ndarray, *, seed: int, uid: str, tries: int = 256
                   ) -> np.ndarray | None:
    """An equal-area rectangle that does not touch the region: the control's patch.

    mask: bool [H, W]. The rectangle has the aspect of the region's bounding box and its
    area to within rounding; its place is drawn from a generator seeded by ``seed`` and
    ``uid`` (the same patch on a rerun); ``tries`` random places, then every place in
    order. Returns a bool [H, W] mask, or None when the region leaves no such place (or is
    empty).
    """
    H, W = mask.shape
    area = int(mask.sum())
    if area == 0:
        return None
    ys, xs = np.nonzero(mask)
    aspect = (xs.max() - xs.min() + 1) / (ys.max() - ys.min() + 1)
    w = int(min(W, max(1, round(math.sqrt(area * aspect)))))
    h = int(min(H, max(1, round(area / w))))
    # integral image: the region's pixel count in any rectangle in O(1)
    table = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    hits = table[h:, w:] - table[:-h, w:] - table[h:, :-w] + table[:-h, :-w]  # [H-h+1, W-w+1]
    digest = hashlib.sha256(f"{seed}:{uid}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    free = None
    for _ in range(tries):
        y, x = int(rng.integers(hits.shape[0])), int(rng.integers(hits.shape[1]))
        if hits[y, x] == 0:
            free = (y, x)
            break
    if free is None:
        places = np.argwhere(hits == 0)
        if not len(places):
            return None
        free = tuple(int(v) for v in places[0])
    out = np.zeros_like(mask, dtype=bool)
    out[free[0]:free[0] + h, free[1]:free[1] + w] = True
    return out




def _segmenter(ref: str, base_dir: Path | None) -> Segmenter:
    from medrl.rewards.loader import resolve

    target = resolve(ref, base_dir=base_dir, where="counterfactual: kwargs.segmenter")[0]
    segmenter = target() if isinstance(target, type) else target
    if not callable(getattr(segmenter, "segment", None)):
        raise UserError(f"counterfactual: kwargs.segmenter {ref!r} has no segment(image, "
                        "sample) method; give a Segmenter class or object.")
    return segmenter


def mean_difference(original: Sequence[float], masked: Sequence[float]) -> float:
    """(1/T) sum_t (original_t - masked_t) over T completion tokens (T >= 1)."""
    return float(np.mean(np.asarray(original, np.float64) - np.asarray(masked, np.float64)))


# ---------------------------------------------------------------------------------- reward


@reward("counterfactual")
class Counterfactual:
    """CCR's r_causal: how much the completion's log-likelihood drops when the diagnostic
    region of its image(s) is masked, clip((1/T) sum_t [lp_t(image) - lp_t(masked)], +-clip).

    Log-probs come from ``ctx.policy_logprobs`` (the current policy), called once per batch
    on edited copies of the samples (``images`` replaced by masked images of the same size).
    original: ``rollout`` takes the image term from ``sample.rollout_logprobs`` (the
    engine's, under the same weights in synchronous mode: one extra forward per step);
    ``policy`` scores the originals in the same call (2N samples). In async mode the rollout
    log-probs come from the previous weights: use ``policy`` there.

    The region of each image: a ``segmenter`` (``module:Name`` or ``file.py:Name``, a
    :class:`Segmenter`) when given, else the row's ``region_field`` (:func:`region_mask`:
    a mask image path or a box, one for all the sample's images, or a list of one per
    image). image_index: None masks every image of the sample, an int only that one.
    fill / blur_radius: :func:`masked_image`. control: also score an equal-area background
    patch (:func:`background_box`) and report ``control_gap`` = mean r_causal(region) -
    r_causal(background); the score stays the region's.

    A sample without images, a region or completion tokens scores None. info:
    ``region_area`` (pixels, over the masked images), ``region_share``, ``raw`` (unclipped),
    with control ``control_raw``. batch_metrics: ``not_applicable``, ``region_area_share``,
    ``raw_mean``, ``clipped_share``, ``hook_seconds``; with control ``control_gap``,
    ``control_unplaced`` (regions leaving no room for the patch).
    """

    def __init__(self, *, region_field: str = "region", segmenter: str | None = None,
                 image_index: int | None = None, fill: Fill = "mean",
                 blur_radius: Annotated[float, Field(gt=0)] = 8.0,
                 original: Original = "rollout", clip: Annotated[float, Field(gt=0)] = 5.0,
                 control: bool = False):
        self.field, self.segmenter_ref, self.image_index = region_field, segmenter, image_index
        self.fill, self.blur_radius, self.original = fill, blur_radius, original
        self.clip, self.control = clip, control
        self.segmenter: Segmenter | None = None
        self.hook = None
        self.seed = 0
        self.stats: dict[str, float] = {}

    def setup(self, ctx: RewardContext) -> None:
        if ctx.policy_logprobs is None:
            raise UserError("counterfactual: the run provides no policy log-probs "
                            "(ctx.policy_logprobs); it needs a GRPO run with a learner.")
        self.hook, self.seed = ctx.policy_logprobs, ctx.seed
        if self.segmenter_ref is not None:
            self.segmenter = _segmenter(self.segmenter_ref, ctx.base_dir)

    def regions(self, sample: Sample, images: list[Image.Image]) -> list[np.ndarray | None]:
        """One bool [H, W] mask per image (None: left as it is); [] when not applicable."""
        chosen = range(len(images)) if self.image_index is None else [self.image_index]
        if self.image_index is not None and not -len(images) <= self.image_index < len(images):
            raise UserError(f"sample {sample.uid}: counterfactual kwargs.image_index "
                            f"{self.image_index} but the sample has {len(images)} image(s).")
        chosen = {i % len(images) for i in chosen}
        if self.segmenter is None:
            value = sample.row.get(self.field)
            if value is None:
                return []
            # a list of regions (paths or boxes), one per image, rather than one box
            per_image = isinstance(value, (list, tuple)) and bool(value) and all(
                isinstance(v, (str, list, tuple)) for v in value)
            if per_image and len(value) != len(images):
                raise UserError(f"sample {sample.uid}: the row's field {self.field!r} lists "
                                f"{len(value)} regions for {len(images)} image(s); give one "
                                "region for all images or one per image.")
        out: list[np.ndarray | None] = [None] * len(images)
        for i in sorted(chosen):
            size = images[i].size
            if self.segmenter is not None:
                found = np.asarray(self.segmenter.segment(images[i], sample))
                if found.shape != (size[1], size[0]):
                    raise UserError(f"sample {sample.uid}: the segmenter "
                                    f"{self.segmenter_ref!r} returned a mask of shape "
                                    f"{found.shape} for a {size[0]}x{size[1]} image; it must "
                                    f"return a bool array [{size[1]}, {size[0]}].")
                out[i] = found.astype(bool)
                continue
            out[i] = region_mask(value[i] if per_image else value, size,
                                 data_dir=sample.data_dir, uid=sample.uid, field=self.field)
        return out

    def _edited(self, sample: Sample, images: list[Image.Image],
                masks: list[np.ndarray | None]) -> list[Any]:
        """The sample's images with each mask applied (an image without one as it was)."""
        return [masked_image(im, m, self.fill, blur_radius=self.blur_radius) if m is not None
                else original for im, m, original in zip(images, masks, sample.images)]

    def __call__(self, samples: list[Sample]) -> list[RewardResult]:
        results = [RewardResult(None) for _ in samples]
        todo = []  # (index, region area, pixels of the masked images)
        region_copies, control_copies, control_of = [], [], []
        unplaced = 0
        # The G completions of a prompt share its images and row: its regions are found and
        # masked once (a segmenter, which sees the sample, runs per sample).
        per_prompt: dict[str, tuple[list, list, list]] = {}
        for i, s in enumerate(samples):
            if not s.images or not s.completion_ids:
                continue
            key = s.group_id if self.segmenter is None else s.uid
            if key not in per_prompt:
                images = [sample_image(im, s) for im in s.images]
                masks = self.regions(s, images)
                per_prompt[key] = (images, masks, self._edited(s, images, masks) if masks
                                   else [])
            images, masks, masked = per_prompt[key]
            if not masks:
                continue
            if self.original == "rollout" and len(s.rollout_logprobs) != len(s.completion_ids):
                raise UserError(f"sample {s.uid}: counterfactual original: rollout needs one "
                                f"rollout log-prob per completion token ({len(s.rollout_logprobs)}"
                                f" for {len(s.completion_ids)}); set kwargs.original: policy.")
            used = [m for m in masks if m is not None]
            todo.append((i, int(sum(m.sum() for m in used)), int(sum(m.size for m in used))))
            region_copies.append(dataclasses.replace(s, images=masked))
            if self.control:
                patches = [None if m is None else background_box(m, seed=self.seed, uid=s.uid)
                           for m in masks]
                if any(m is not None and p is None for m, p in zip(masks, patches)):
                    unplaced += 1
                    control_of.append(None)
                else:
                    control_of.append(len(control_copies))
                    control_copies.append(dataclasses.replace(
                        s, images=self._edited(s, images, patches)))
        originals = [samples[i] for i, _, _ in todo] if self.original == "policy" else []
        batch = region_copies + control_copies + originals
        start = time.perf_counter()
        scored = [list(map(float, lp)) for lp in self.hook(batch)] if batch else []
        seconds = time.perf_counter() - start
        if len(scored) != len(batch):
            raise ValueError(f"ctx.policy_logprobs returned {len(scored)} rows for "
                             f"{len(batch)} samples")
        for copy, lp in zip(batch, scored):
            if len(lp) != len(copy.completion_ids):
                raise ValueError(f"ctx.policy_logprobs returned {len(lp)} log-probs for "
                                 f"{len(copy.completion_ids)} completion tokens of {copy.uid}")
        n, m = len(region_copies), len(control_copies)
        raws, clipped, shares, gaps = [], 0, [], []
        for k, (i, area, pixels) in enumerate(todo):
            s = samples[i]
            base = scored[n + m + k] if self.original == "policy" else s.rollout_logprobs
            raw = mean_difference(base, scored[k])
            value = min(max(raw, -self.clip), self.clip)
            raws.append(raw)
            clipped += int(value != raw)
            shares.append(area / pixels if pixels else 0.0)
            info = {"region_area": area, "region_share": round(shares[-1], 6),
                    "raw": round(raw, 6)}
            if self.control:
                j = control_of[k]
                control = None if j is None else mean_difference(base, scored[n + j])
                info["control_raw"] = None if control is None else round(control, 6)
                if control is not None:  # r_causal(region) - r_causal(background), clipped
                    gaps.append(value - min(max(control, -self.clip), self.clip))
            results[i] = RewardResult(value, info=info)
        self.stats = {"not_applicable": float(len(samples) - len(todo)),
                      "region_area_share": float(np.mean(shares)) if shares else 0.0,
                      "raw_mean": float(np.mean(raws)) if raws else 0.0,
                      "clipped_share": clipped / len(todo) if todo else 0.0,
                      "hook_seconds": seconds}
        if self.control:
            self.stats["control_gap"] = float(np.mean(gaps)) if gaps else 0.0
            self.stats["control_unplaced"] = float(unplaced)
        return results

    def batch_metrics(self) -> dict[str, float]:
        return dict(self.stats)
