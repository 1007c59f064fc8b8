"""Medical images and volumes -> the RGB images a vision-language model takes.

2D images (:func:`load_image`): PNG, JPEG and anything else PIL reads; DICOM through
``pydicom`` (the optional ``dicom`` extra: ``pip install 'medrl[dicom]'``), with the stored
rescale slope/intercept applied (raw values -> Hounsfield units for CT) and the file's own
window (or min-max scaling when it has none) mapped to 8 bits.

3D volumes (:func:`load_volume`) come back as a float32 array ``[D, H, W]``:

- NIfTI (``.nii``, ``.nii.gz``, read with nibabel): the image is first reoriented to the
  closest canonical orientation (RAS+: voxel axes run towards patient Right, Anterior,
  Superior; axes are only permuted and flipped, never resampled), then laid out as
  ``D``: superior -> inferior, ``H``: anterior -> posterior, ``W``: patient right -> left.
  So ``volume[d]`` is an axial slice shown the radiological way (anterior at the top, the
  patient's right on the image's left), ``volume[:, h]`` a coronal slice (superior at the
  top) and ``volume[:, :, w]`` a sagittal slice (superior at the top, anterior on the left).
  Intensities are nibabel's scaled values (``scl_slope``/``scl_inter`` applied: Hounsfield
  units for CT).
- NumPy (``.npy``, read with ``allow_pickle=False``): taken as ``[D, H, W]`` as stored.

:func:`volume_to_slices` turns a volume into a fixed number of RGB slices by the rule in its
docstring. Every loader raises :class:`UserError` naming the sample (``uid``) and the path
when a file is missing or unreadable.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from medrl.align.records import UserError

DICOM_SUFFIXES = (".dcm", ".dicom")
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".npy")


def _who(uid: str | None) -> str:
    return f"sample {uid}: " if uid is not None else ""


def _require_file(path: Path, kind: str, uid: str | None) -> None:
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise UserError(f"{_who(uid)}{kind} {path} {what}. Relative media paths are read from "
                        "the data file's folder; fix the path in the data or move the file.")


# --- intensity mapping -------------------------------------------------------------------------


def window_to_uint8(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """Window/level: ``[center - width/2, center + width/2]`` -> 0..255, clipped outside.

    ``v8 = floor(clip((x - lo) / width, 0, 1) * 255 + 0.5)`` with ``lo = center - width/2``
    (round half up). E.g. the soft-tissue window (40, 400) sends -160 HU and below to 0,
    240 HU and above to 255, and 40 HU to 128.
    """
    if width <= 0:
        raise UserError(f"window width must be positive, got {width}")
    lo = center - width / 2.0
    scaled = np.clip((np.asarray(values, dtype=np.float64) - lo) / width, 0.0, 1.0)
    return np.floor(scaled * 255.0 + 0.5).astype(np.uint8)


def minmax_to_uint8(values: np.ndarray, lo: float | None = None,
                    hi: float | None = None) -> np.ndarray:
    """``[lo, hi]`` (default: the array's own min and max) -> 0..255; a constant array -> 0."""
    values = np.asarray(values, dtype=np.float64)
    lo = float(values.min()) if lo is None else lo
    hi = float(values.max()) if hi is None else hi
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    return window_to_uint8(values, (lo + hi) / 2.0, hi - lo)


def gray_to_rgb(gray: np.ndarray) -> Image.Image:
    """A ``[H, W]`` uint8 array -> an RGB PIL image (the gray value in all three channels)."""
    return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2))  # [H, W, 3] uint8: RGB


# --- 2D images ----------------------------------------------------------------------------------


def is_dicom(path: str | Path) -> bool:
    """A ``.dcm``/``.dicom`` suffix, or the ``DICM`` marker at byte 128 of the file."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with path.open("rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False  # unreadable: load_image reports it with the sample and path


def load_image(path: str | Path, *, uid: str | None = None) -> Image.Image:
    """Read one 2D image as an RGB PIL image.

    PIL formats: 8-bit images are converted to RGB; 16-bit and float gray images are min-max
    scaled to 8 bits first (PIL's own conversion would clip them at 255). DICOM: see
    :func:`load_dicom`. Raises :class:`UserError` naming ``uid`` and the path when the file is
    missing or unreadable.
    """
    path = Path(path)
    _require_file(path, "image", uid)
    if is_dicom(path):
        return load_dicom(path, uid=uid)
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                return gray_to_rgb(minmax_to_uint8(np.asarray(img)))
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UserError(f"{_who(uid)}cannot read image {path} ({exc}). Use PNG, JPEG or "
                        "DICOM.") from None


def load_dicom(path: str | Path, *, uid: str | None = None) -> Image.Image:
    """Read a single-frame DICOM image as RGB.

    Stored values are rescaled (``x * RescaleSlope + RescaleIntercept``; Hounsfield units for
    CT), then the file's first ``WindowCenter``/``WindowWidth`` maps them to 0..255 (min-max
    scaling when the file has no window). ``MONOCHROME1`` images (white = low) are inverted so
    that high values are bright. Colour DICOMs (``SamplesPerPixel`` 3) are returned as stored.
    """
    path = Path(path)
    _require_file(path, "image", uid)
    try:
        import pydicom
    except ImportError:
        raise UserError(f"{_who(uid)}{path} is a DICOM file, and reading DICOM needs pydicom: "
                        "pip install 'medrl[dicom]'.") from None
    try:
        ds = pydicom.dcmread(path)
        pixels = np.asarray(ds.pixel_array)
    except Exception as exc:  # pydicom raises many types (InvalidDicomError, decoders, ...)
        raise UserError(f"{_who(uid)}cannot read DICOM image {path} "
                        f"({type(exc).__name__}: {exc}).") from None
    if int(getattr(ds, "SamplesPerPixel", 1)) == 3:
        return Image.fromarray(pixels.astype(np.uint8)).convert("RGB")
    if pixels.ndim != 2:
        raise UserError(f"{_who(uid)}{path} holds {pixels.shape[0]} frames; a 2D image needs "
                        "one. Give a multi-frame scan as a volume (.nii.gz or .npy) instead.")
    values = pixels.astype(np.float64) * float(getattr(ds, "RescaleSlope", 1) or 1) \
        + float(getattr(ds, "RescaleIntercept", 0) or 0)
    center = _first(getattr(ds, "WindowCenter", None))
    width = _first(getattr(ds, "WindowWidth", None))
    if center is not None and width is not None and width > 0:
        gray = window_to_uint8(values, center, width)
    else:
        gray = minmax_to_uint8(values)
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        gray = 255 - gray
    return gray_to_rgb(gray)


def _first(value) -> float | None:
    """A DICOM number that may be multi-valued (several windows): its first value."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return float(value[0]) if len(value) else None
    return float(value)


# --- 3D volumes ---------------------------------------------------------------------------------


def load_volume(path: str | Path, *, uid: str | None = None) -> np.ndarray:
    """Read a 3D volume as float32 ``[D, H, W]`` (axis convention in the module docstring)."""
    path = Path(path)
    _require_file(path, "volume", uid)
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        volume = _load_nifti(path, uid)
    elif name.endswith(".npy"):
        try:
            volume = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise UserError(f"{_who(uid)}cannot read volume {path} ({exc}). A .npy volume "
                            "must be a plain numeric array (no pickled objects).") from None
        if not np.issubdtype(volume.dtype, np.number):
            raise UserError(f"{_who(uid)}volume {path} has dtype {volume.dtype}; a numeric "
                            "array is needed.")
    else:
        raise UserError(f"{_who(uid)}volume {path}: unsupported format; use "
                        f"{', '.join(VOLUME_SUFFIXES)}.")
    volume = np.asarray(volume, dtype=np.float32)
    while volume.ndim > 3 and volume.shape[-1] == 1:  # [X, Y, Z, 1] time/channel axis
        volume = volume[..., 0]
    if volume.ndim != 3 or min(volume.shape) < 1:
        raise UserError(f"{_who(uid)}volume {path} has shape {tuple(volume.shape)}; a 3D "
                        "volume [D, H, W] is needed.")
    return np.ascontiguousarray(volume)


def _load_nifti(path: Path, uid: str | None) -> np.ndarray:
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    try:
        img = nib.as_closest_canonical(nib.load(str(path)))
        data = np.asarray(img.get_fdata(dtype=np.float32))  # [X (L->R), Y (P->A), Z (I->S)]
    except (ImageFileError, OSError, ValueError, EOFError, zlib.error) as exc:
        raise UserError(f"{_who(uid)}cannot read NIfTI volume {path} ({exc}).") from None
    if data.ndim < 3:
        raise UserError(f"{_who(uid)}volume {path} has shape {data.shape}; a 3D volume is "
                        "needed.")
    # [X, Y, Z, ...] -> [Z, Y, X, ...], then flip so D runs S->I, H runs A->P, W runs R->L.
    data = np.swapaxes(data, 0, 2)
    return data[::-1, ::-1, ::-1]


def slice_indices(depth: int, num_slices: int) -> list[int]:
    """The centres of ``num_slices`` equal bins over ``[0, depth)``.

    ``index_i = floor((i + 0.5) * depth / num_slices)`` for ``i = 0 .. num_slices - 1``
    (integer arithmetic, no rounding drift). E.g. depth 128, 8 slices -> 8, 24, 40, ..., 120;
    depth 10, 4 slices -> 1, 3, 6, 8. With fewer voxels than slices indices repeat, so the
    number of slices (and of image parts in the prompt) is always ``num_slices``.
    """
    if depth < 1 or num_slices < 1:
        raise ValueError(f"depth and num_slices must be >= 1, got {depth}, {num_slices}")
    return [((2 * i + 1) * depth) // (2 * num_slices) for i in range(num_slices)]


def volume_to_slices(volume: np.ndarray, *, num_slices: int, axis: int = 0,
                     window_center: float | None = 40.0,
                     window_width: float | None = 400.0) -> list[Image.Image]:
    """``num_slices`` RGB slices of a ``[D, H, W]`` volume, in index order along ``axis``.

    Indices: :func:`slice_indices` over the volume's whole extent along ``axis``. Each slice
    is the 2D array left after taking that index (axis 0 -> ``[H, W]``, 1 -> ``[D, W]``,
    2 -> ``[D, H]``), with no resizing. Intensities: with both ``window_center`` and
    ``window_width`` set (Hounsfield units for CT, e.g. 40/400 soft tissue, -600/1500 lung),
    :func:`window_to_uint8`; with both None, min-max scaling over the whole volume (one scale
    for all slices, so their brightness stays comparable). Setting only one is an error.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"a volume must be [D, H, W], got shape {volume.shape}")
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
    if (window_center is None) != (window_width is None):
        raise UserError("data.volume: set both window_center and window_width (a CT window "
                        "in Hounsfield units), or both to null for min-max scaling.")
    indices = slice_indices(volume.shape[axis], num_slices)
    chosen = np.take(volume, indices, axis=axis)
    chosen = np.moveaxis(chosen, axis, 0)  # [num_slices, rows, cols]
    if window_center is None:
        lo, hi = float(volume.min()), float(volume.max())
        gray = minmax_to_uint8(chosen, lo, hi)
    else:
        gray = window_to_uint8(chosen, float(window_center), float(window_width))
    return [gray_to_rgb(g) for g in gray]
