"""Medical images and volumes -> the RGB images a vision-language model takes.

2D images (:func:`load_image`) may arrive as a path, as encoded bytes (raw, or a ``datasets``
``Image`` cell ``{"bytes", "path"}``), as a NumPy array or as a PIL image. All of them go
through one decision (DICOM, another encoded format PIL reads, or pixels already decoded)
and then one intensity mapping, so a file gives the same pixels however it is handed over:

- DICOM (a ``.dcm``/``.dicom`` name, or the ``DICM`` marker at byte 128) is read with
  ``pydicom`` (the optional ``dicom`` extra: ``pip install 'medrl[dicom]'``): grayscale values
  are rescaled (slope/intercept: Hounsfield units for CT), then the file's window (or min-max
  scaling when it has none) maps them to 8 bits; colour values are scaled from their stored
  bit depth to 8 bits.
- Other encoded images are decoded by PIL and turned upright by their EXIF orientation.
- 8-bit pixels (PIL modes ``L``, ``RGB``, ...; ``uint8`` arrays) are kept as they are; 16-bit,
  32-bit and float pixels (modes ``I;16``, ``I``, ``F``; other array dtypes) are min-max scaled
  to 8 bits (PIL's own conversion would clip them at 255).

Scaling ignores NaN and infinite values: the range comes from the finite values, NaN maps to
0 (black), +inf to 255 and -inf to 0. A 2D image with no finite value is refused.

3D volumes (:func:`load_volume`, a path or an array) come back as float32 ``[D, H, W]``:

- NIfTI (``.nii``, ``.nii.gz``, read with nibabel): the image is first reoriented to the
  closest canonical orientation (RAS+: voxel axes run towards patient Right, Anterior,
  Superior; axes are only permuted and flipped, never resampled), then laid out as
  ``D``: superior -> inferior, ``H``: anterior -> posterior, ``W``: patient right -> left.
  So ``volume[d]`` is an axial slice shown the radiological way (anterior at the top, the
  patient's right on the image's left), ``volume[:, h]`` a coronal slice (superior at the
  top) and ``volume[:, :, w]`` a sagittal slice (superior at the top, anterior on the left).
  Intensities are nibabel's scaled values (``scl_slope``/``scl_inter`` applied: Hounsfield
  units for CT).
- NumPy (``.npy``, read with ``allow_pickle=False``, or an array in the data): taken as
  ``[D, H, W]`` as stored.

A volume with no finite voxel is refused; NaN voxels elsewhere (a common NIfTI background)
come out black, and a slice that is all NaN is a black slice. :func:`volume_to_slices` turns
a volume into a fixed number of RGB slices by the rule in its docstring. Every loader raises
:class:`UserError` naming the sample (``uid``) and the path when a file is missing, unreadable
or holds no usable pixels.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from medrl.align.records import UserError

DICOM_SUFFIXES = (".dcm", ".dicom")
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".npy")
WIDE_PIL_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # more than 8 bits per pixel
EMBEDDED = "embedded in the data"
# DEFLATE shrinks data at most about 1032-fold: a .gz file of n bytes holds at most this x n
MAX_DEFLATE_RATIO = 1100


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
    240 HU and above to 255, and 40 HU to 128. NaN maps to 0 (black), +inf to 255, -inf to 0.
    Output: uint8, the shape of ``values``.
    """
    if width <= 0:
        raise UserError(f"window width must be positive, got {width}")
    lo = center - width / 2.0
    scaled = np.clip((np.asarray(values, dtype=np.float64) - lo) / width, 0.0, 1.0)
    scaled = np.where(np.isnan(scaled), 0.0, scaled)  # NaN voxels lie outside the scan
    return np.floor(scaled * 255.0 + 0.5).astype(np.uint8)


def finite_range(values: np.ndarray) -> tuple[float, float] | None:
    """The min and max over the finite values (NaN and +-inf ignored); None when there are none."""
    values = np.asarray(values)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None
    return float(finite.min()), float(finite.max())


def minmax_to_uint8(values: np.ndarray, lo: float | None = None,
                    hi: float | None = None) -> np.ndarray:
    """``[lo, hi]`` (default: the finite range of ``values``) -> 0..255 by :func:`window_to_uint8`.

    A constant array, or one with no finite value, maps to 0 everywhere. Output: uint8, the
    shape of ``values``.
    """
    values = np.asarray(values, dtype=np.float64)
    if lo is None or hi is None:
        found = finite_range(values)
        if found is None:
            return np.zeros(values.shape, dtype=np.uint8)
        lo = found[0] if lo is None else lo
        hi = found[1] if hi is None else hi
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    return window_to_uint8(values, (lo + hi) / 2.0, hi - lo)


def gray_to_rgb(gray: np.ndarray) -> Image.Image:
    """A ``[H, W]`` uint8 array -> an RGB PIL image (the gray value in all three channels)."""
    return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2))  # [H, W, 3] uint8: RGB


# --- 2D images: one loader for every source ------------------------------------------------------


def load_image(source: Any, *, uid: str | None = None) -> Image.Image:
    """Read one 2D image as an RGB PIL image, whatever form it arrives in.

    ``source``: a path (``str`` or ``Path``), encoded bytes (``bytes``/``bytearray``), a
    ``datasets`` Image cell (``{"bytes": ..., "path": ...}``; the bytes win, the path is read
    when there are none), a NumPy array (``[H, W]``, ``[H, W, 1]``, ``[H, W, 3]`` or
    ``[H, W, 4]``: alpha is dropped) or a PIL image. The module docstring gives the intensity
    mapping. Raises :class:`UserError` naming ``uid`` and the path (or that the image was
    embedded) when the image is missing, unreadable or has no finite value.
    """
    if isinstance(source, Image.Image):
        return _pil_to_rgb(source, "a PIL image", uid)
    if isinstance(source, np.ndarray):
        return array_to_rgb(source, label="an image array", uid=uid)
    data, name = _encoded(source, uid)
    if is_dicom(data, name):
        return _dicom_to_rgb(data, name, uid)
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return _pil_to_rgb(img, f"image {name}", uid)
    except Image.DecompressionBombError:  # a damaged or hostile header: billions of pixels
        raise UserError(f"{_who(uid)}image {name} claims more than {2 * Image.MAX_IMAGE_PIXELS} "
                        "pixels; the file is damaged, or far larger than a model takes.") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UserError(f"{_who(uid)}cannot read image {name} ({exc}). Use PNG, JPEG or "
                        "DICOM.") from None


def _encoded(source: Any, uid: str | None) -> tuple[bytes, str]:
    """An encoded image source -> (its bytes, the name messages use for it)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        _require_file(path, "image", uid)
        try:
            return path.read_bytes(), str(path)
        except OSError as exc:
            raise UserError(f"{_who(uid)}cannot read image {path} ({exc}).") from None
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), EMBEDDED
    if isinstance(source, dict) and set(source) <= {"bytes", "path"}:  # a datasets Image cell
        if source.get("bytes"):
            stored = source.get("path")
            return bytes(source["bytes"]), f"{stored} ({EMBEDDED})" if stored else EMBEDDED
        if source.get("path"):
            return _encoded(source["path"], uid)
        raise UserError(f"{_who(uid)}an image cell has neither bytes nor a path; fix the row's "
                        "image column or drop the row.")
    raise UserError(f"{_who(uid)}an image entry is a {type(source).__name__}; use a path, "
                    "encoded bytes, a datasets Image, a NumPy array or a PIL image.")


def is_dicom(data: bytes, name: str = "") -> bool:
    """A ``.dcm``/``.dicom`` name, or the ``DICM`` marker at byte 128 of the encoded bytes."""
    return name.lower().endswith(DICOM_SUFFIXES) or data[128:132] == b"DICM"


def _pil_to_rgb(img: Image.Image, label: str, uid: str | None) -> Image.Image:
    """A decoded PIL image -> RGB, upright by its EXIF orientation, wide modes min-max scaled."""
    img = ImageOps.exif_transpose(img)  # a copy; phones and some scanners store images turned
    if img.mode in WIDE_PIL_MODES:
        return array_to_rgb(np.asarray(img), label=label, uid=uid)
    return img.convert("RGB")


def array_to_rgb(pixels: np.ndarray, *, label: str = "an image array",
                 uid: str | None = None) -> Image.Image:
    """Decoded pixels ``[H, W]``, ``[H, W, 1]``, ``[H, W, 3]`` or ``[H, W, 4]`` -> RGB.

    ``uint8`` values are kept (alpha dropped); booleans become 0/255; any other numeric
    dtype is min-max scaled over its finite values (all channels together, so colours keep
    their balance). Raises :class:`UserError` for another shape or dtype, or no finite value.
    """
    a = np.asarray(pixels)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
        raise UserError(f"{_who(uid)}{label} has shape {a.shape}; a 2D image is [H, W], "
                        "[H, W, 1], [H, W, 3] or [H, W, 4].")
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise UserError(f"{_who(uid)}{label} has dtype {a.dtype}; a numeric image is needed.")
    a = a[..., :3] if a.ndim == 3 else a  # [H, W, 3] or [H, W]
    if a.dtype != np.uint8:
        if finite_range(a) is None:
            raise UserError(f"{_who(uid)}{label} has no finite value (all NaN or infinite); "
                            "fix or drop the image.")
        a = minmax_to_uint8(a)
    return gray_to_rgb(a) if a.ndim == 2 else Image.fromarray(np.ascontiguousarray(a), "RGB")


def load_dicom(path: str | Path, *, uid: str | None = None) -> Image.Image:
    """Read a single-frame DICOM file as RGB (the same as :func:`load_image` on a DICOM)."""
    data, name = _encoded(path, uid)
    return _dicom_to_rgb(data, name, uid)


def _dicom_to_rgb(data: bytes, name: str, uid: str | None) -> Image.Image:
    """Encoded single-frame DICOM -> RGB.

    Grayscale: stored values are rescaled (``x * RescaleSlope + RescaleIntercept``; Hounsfield
    units for CT), then the file's first ``WindowCenter``/``WindowWidth`` maps them to 0..255
    (min-max scaling when the file has none); ``MONOCHROME1`` (white = low) is inverted so that
    high values are bright. Colour (``SamplesPerPixel`` 3, converted to RGB by pydicom): values
    are scaled from ``0 .. 2**BitsStored - 1`` to 0..255, so 12- and 16-bit colour keeps its
    brightness instead of wrapping at 256.
    """
    try:
        import pydicom
    except ImportError:
        raise UserError(f"{_who(uid)}{name} is a DICOM file, and reading DICOM needs pydicom: "
                        "pip install 'medrl[dicom]'.") from None
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        pixels = np.asarray(ds.pixel_array)
    except Exception as exc:  # pydicom raises many types (InvalidDicomError, decoders, ...)
        raise UserError(f"{_who(uid)}cannot read DICOM image {name} "
                        f"({type(exc).__name__}: {exc}).") from None
    colour = int(getattr(ds, "SamplesPerPixel", 1) or 1) == 3
    if pixels.ndim != (3 if colour else 2):
        raise UserError(f"{_who(uid)}{name} holds {pixels.shape[0]} frames; a 2D image needs "
                        "one. Give a multi-frame scan as a volume (.nii.gz or .npy) instead.")
    if colour:
        top = float(2 ** int(getattr(ds, "BitsStored", 8) or 8) - 1)
        return Image.fromarray(window_to_uint8(pixels, top / 2.0, top), "RGB")
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


def load_volume(source: str | Path | np.ndarray, *, uid: str | None = None) -> np.ndarray:
    """Read a 3D volume as float32 ``[D, H, W]`` (axis convention in the module docstring).

    ``source``: a path (``.nii``, ``.nii.gz``, ``.npy``) or an array already in the data (taken
    as ``[D, H, W]``). Both go through the same checks: numeric, 3D once trailing length-1
    axes are dropped, at least one finite voxel.
    """
    if not isinstance(source, (str, Path)):  # an array (or nested lists) in the data
        try:
            array = np.asarray(source)
        except ValueError as exc:  # ragged nested lists
            raise UserError(f"{_who(uid)}the volume is not a regular array ({exc}); give a "
                            "[D, H, W] array or a path to a .nii.gz / .npy file.") from None
        return _checked_volume(array, "volume array", uid)
    path = Path(source)
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
    else:
        raise UserError(f"{_who(uid)}volume {path}: unsupported format; use "
                        f"{', '.join(VOLUME_SUFFIXES)}.")
    return _checked_volume(volume, f"volume {path}", uid)


def _checked_volume(volume: np.ndarray, label: str, uid: str | None) -> np.ndarray:
    volume = np.asarray(volume)
    if not np.issubdtype(volume.dtype, np.number):
        raise UserError(f"{_who(uid)}{label} has dtype {volume.dtype}; a numeric array is "
                        "needed.")
    volume = volume.astype(np.float32, copy=False)
    while volume.ndim > 3 and volume.shape[-1] == 1:  # [X, Y, Z, 1] time/channel axis
        volume = volume[..., 0]
    if volume.ndim != 3 or min(volume.shape) < 1:
        raise UserError(f"{_who(uid)}{label} has shape {tuple(volume.shape)}; a 3D volume "
                        "[D, H, W] is needed.")
    if not np.isfinite(volume).any():
        raise UserError(f"{_who(uid)}{label} has no finite voxel (all NaN or infinite); fix "
                        "or drop the volume.")
    return np.ascontiguousarray(volume)


def _check_nifti_size(img: Any, path: Path, uid: str | None) -> None:
    """Refuse a header whose voxels the file cannot hold, before they are allocated: a
    damaged header can claim any shape, and nibabel zero-fills the whole claim first."""
    shape = tuple(int(d) for d in img.shape)
    dtype = img.get_data_dtype()
    if not shape or min(shape) < 1:
        raise UserError(f"{_who(uid)}volume {path}: its header gives the shape {shape}; the "
                        "header is damaged.")
    needed = int(img.dataobj.offset) + math.prod(shape) * dtype.itemsize
    size = path.stat().st_size
    compressed = path.name.lower().endswith(".gz")
    if needed > (size * MAX_DEFLATE_RATIO if compressed else size):
        raise UserError(f"{_who(uid)}volume {path}: its header describes {shape} voxels of "
                        f"{dtype} ({needed} bytes), more than the file can hold ({size} bytes"
                        f"{', compressed' if compressed else ''}); the file is cut short or "
                        "its header is damaged.")


def _load_nifti(path: Path, uid: str | None) -> np.ndarray:
    import nibabel as nib

    try:
        img = nib.load(str(path))  # the header only
        _check_nifti_size(img, path, uid)
        img = nib.as_closest_canonical(img)
        data = np.asarray(img.get_fdata(dtype=np.float32))  # [X (L->R), Y (P->A), Z (I->S)]
    except UserError:
        raise
    except Exception as exc:  # nibabel raises many types on a damaged file (ImageFileError,
        # HeaderDataError, OrientationError for a singular affine, zlib.error, EOFError, ...)
        raise UserError(f"{_who(uid)}cannot read NIfTI volume {path} "
                        f"({type(exc).__name__}: {exc}).") from None
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
    :func:`window_to_uint8`; with both None, min-max scaling over the finite voxels of the whole
    volume (one scale for all slices, so their brightness stays comparable). NaN voxels are
    black either way. Setting only one window value is an error.
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
        found = finite_range(volume)  # NaN background ignored; None: every slice black
        lo, hi = found if found is not None else (0.0, 0.0)
        gray = minmax_to_uint8(chosen, lo, hi)
    else:
        gray = window_to_uint8(chosen, float(window_center), float(window_width))
    return [gray_to_rgb(g) for g in gray]
