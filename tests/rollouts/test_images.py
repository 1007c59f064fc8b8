"""One image loader for paths, bytes, dataset Image cells, arrays and PIL images.

The same file must give the same pixels however it reaches the loader; 16-bit images are
scaled, not clipped; NaN voxels are black without hiding the tissue; EXIF orientation is
honoured; DICOM is read from embedded bytes as from a path.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medrl.align.records import Sample, UserError
from medrl.launch.data import load_media, load_samples
from medrl.launch.recipe import DataConfig, VolumeConfig
from medrl.rollouts.multimodal import (load_image, load_volume, minmax_to_uint8,
                                       volume_to_slices, window_to_uint8)


def pixels(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img)


def every_source(path):
    """The ways one image file reaches the loader: path (str and Path), bytes, Image cells."""
    data = path.read_bytes()
    return {"str": str(path), "path": path, "bytes": data, "bytearray": bytearray(data),
            "cell_bytes": {"bytes": data, "path": None},
            "cell_named": {"bytes": data, "path": path.name},
            "cell_path": {"bytes": None, "path": str(path)}}


def ramp16(height=64, width=64) -> np.ndarray:
    """A 12-bit style ramp 0..4000 in a uint16 image (what a CT or X-ray export holds)."""
    return np.linspace(0, 4000, height * width).reshape(height, width).astype(np.uint16)


# --- one code path for every source -------------------------------------------------------------


def write_examples(tmp_path) -> dict:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgb).save(tmp_path / "rgb.jpg", quality=90)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    Image.fromarray(ramp16()).save(tmp_path / "ramp16.png")
    Image.fromarray(rng.normal(0, 1, (10, 9)).astype(np.float32)).save(tmp_path / "f.tiff")
    return {name: tmp_path / name for name in
            ("rgb.png", "rgb.jpg", "gray.png", "ramp16.png", "f.tiff")}


def test_path_bytes_cells_and_pil_give_identical_pixels(tmp_path):
    for name, path in write_examples(tmp_path).items():
        expected = pixels(load_image(path))
        for how, source in every_source(path).items():
            np.testing.assert_array_equal(pixels(load_image(source, uid="s")), expected,
                                          err_msg=f"{name} as {how}")
        with Image.open(path) as opened:
            np.testing.assert_array_equal(pixels(load_image(opened)), expected, err_msg=name)


def test_16bit_png_ramp_embedded_is_scaled_like_by_path(tmp_path):
    Image.fromarray(ramp16()).save(tmp_path / "ramp16.png")
    by_path = pixels(load_image(tmp_path / "ramp16.png"))[..., 0]
    assert by_path.min() == 0 and by_path.max() == 255
    assert (by_path == 255).mean() < 0.01  # a ramp, not a white image
    embedded = {"bytes": (tmp_path / "ramp16.png").read_bytes(), "path": None}
    sample = Sample(uid="r", group_id="r", images=[embedded],
                    messages=[{"role": "user", "content": [{"type": "image"}]}])
    loaded = pixels(load_media(sample).images[0])[..., 0]
    np.testing.assert_array_equal(loaded, by_path)
    with Image.open(tmp_path / "ramp16.png") as opened:  # an already decoded I;16 image
        np.testing.assert_array_equal(pixels(load_image(opened))[..., 0], by_path)
    np.testing.assert_array_equal(pixels(load_image(ramp16()))[..., 0], by_path)  # the array


def test_saved_dataset_with_an_image_column_loads_16bit_pixels(tmp_path):
    datasets = pytest.importorskip("datasets")
    Image.fromarray(ramp16()).save(tmp_path / "ramp16.png")
    data = (tmp_path / "ramp16.png").read_bytes()
    features = datasets.Features({"id": datasets.Value("string"),
                                  "question": datasets.Value("string"),
                                  "image": datasets.Image()})
    ds = datasets.Dataset.from_dict({"id": ["x1"], "question": ["Finding?"],
                                     "image": [{"bytes": data, "path": None}]}, features=features)
    ds.save_to_disk(str(tmp_path / "saved"))
    cfg = DataConfig(path=str(tmp_path / "saved"), template="open",
                     fields={"id": "id", "images": "image", "options": None, "answer": None})
    sample = load_media(load_samples(cfg)[0])
    np.testing.assert_array_equal(pixels(sample.images[0]),
                                  pixels(load_image(tmp_path / "ramp16.png")))


def test_exif_orientation_is_honoured_for_paths_bytes_and_pil(tmp_path):
    stored = np.zeros((20, 40, 3), dtype=np.uint8)  # 40 wide, 20 high as stored
    stored[:, :20] = (255, 0, 0)  # left half red
    stored[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: shown rotated 90 degrees clockwise
    Image.fromarray(stored).save(tmp_path / "phone.jpg", quality=95, exif=exif.tobytes())
    sources = every_source(tmp_path / "phone.jpg")
    with Image.open(tmp_path / "phone.jpg") as opened:
        sources["pil"] = opened
        for how, source in sources.items():
            img = load_image(source)
            assert img.size == (20, 40), how  # displayed 20 wide, 40 high
            top, bottom = pixels(img)[5, 10], pixels(img)[35, 10]
            assert top[0] > 200 and top[2] < 50, how  # the stored left half is on top
            assert bottom[2] > 200 and bottom[0] < 50, how


# --- arrays -------------------------------------------------------------------------------------


def test_arrays_scale_like_files_and_report_bad_shapes():
    gray8 = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    np.testing.assert_array_equal(pixels(load_image(gray8))[..., 1], gray8)  # uint8 as stored
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 9, 255
    assert pixels(load_image(rgba))[0, 0].tolist() == [9, 0, 0]  # alpha dropped
    floats = np.array([[np.nan, 0.0], [0.5, 1.0]], dtype=np.float32)
    assert pixels(load_image(floats))[..., 0].tolist() == [[0, 0], [128, 255]]
    with pytest.raises(UserError, match=r"sample a1: an image array has shape \(3, 4, 5\)"):
        load_image(np.zeros((3, 4, 5)), uid="a1")
    with pytest.raises(UserError, match="sample a2: .*no finite value"):
        load_image(np.full((4, 4), np.nan), uid="a2")
    with pytest.raises(UserError, match="sample a3: an image entry is a list"):
        load_image([[1, 2], [3, 4]], uid="a3")


def test_embedded_errors_name_the_sample(tmp_path):
    with pytest.raises(UserError, match=r"sample e1: cannot read image embedded in the data"):
        load_image(b"\x00" * 300, uid="e1")
    with pytest.raises(UserError, match=r"sample e2: cannot read image scan\.png \(embedded"):
        load_image({"bytes": b"not an image", "path": "scan.png"}, uid="e2")
    with pytest.raises(UserError, match="sample e3: an image cell has neither bytes nor a path"):
        load_image({"bytes": None, "path": None}, uid="e3")


# --- NaN-aware intensities ----------------------------------------------------------------------


def test_minmax_and_window_ignore_nan():
    values = np.array([np.nan, 10.0, 20.0, 30.0, np.inf, -np.inf])
    assert minmax_to_uint8(values).tolist() == [0, 0, 128, 255, 255, 0]
    assert minmax_to_uint8(np.full(3, np.nan)).tolist() == [0, 0, 0]  # documented: black
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "invalid value in cast": NaN is mapped explicitly
        assert window_to_uint8(np.array([np.nan, 40.0, 240.0]), 40, 400).tolist() == [0, 128, 255]


def nan_background_volume() -> np.ndarray:
    """[X, Y, Z] = [8, 8, 6]: NaN outside a tissue block of -100..100 HU."""
    data = np.full((8, 8, 6), np.nan, dtype=np.float32)
    data[2:6, 2:6, 1:5] = np.linspace(-100, 100, 64, dtype=np.float32).reshape(4, 4, 4)
    return data


def test_nifti_with_nan_background_gives_visible_tissue(tmp_path):
    nib.save(nib.Nifti1Image(nan_background_volume(), np.eye(4)), tmp_path / "brain.nii.gz")
    vol = load_volume(tmp_path / "brain.nii.gz")
    for window in ((None, None), (0.0, 400.0)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            slices = volume_to_slices(vol, num_slices=6, window_center=window[0],
                                      window_width=window[1])
        tissue = [pixels(s)[..., 0] for s in slices[1:5]]  # D 1..4 hold the block
        for gray in tissue:
            assert gray[2:6, 2:6].max() > 0, window  # tissue visible
            assert (gray[:2] == 0).all() and (gray[:, 6:] == 0).all()  # NaN background black
        assert (pixels(slices[0]) == 0).all()  # an all-NaN slice is black
    minmax = [pixels(s)[..., 0] for s in volume_to_slices(vol, num_slices=6, window_center=None,
                                                          window_width=None)]
    assert max(g.max() for g in minmax) == 255  # the finite range spans 0..255


def test_nan_volume_through_load_media_and_all_nan_refused(tmp_path):
    np.save(tmp_path / "v.npy", nan_background_volume().transpose(2, 1, 0))
    msgs = [{"role": "user", "content": [{"type": "image"}] * 2}]
    sample = Sample(uid="v1", group_id="v1", volume=str(tmp_path / "v.npy"), messages=msgs)
    slices = load_media(sample, VolumeConfig(num_slices=2, window_center=None,
                                             window_width=None)).images
    assert all(pixels(s).max() > 0 for s in slices)
    as_array = Sample(uid="v2", group_id="v2", volume=np.load(tmp_path / "v.npy"), messages=msgs)
    for a, b in zip(load_media(as_array, VolumeConfig(num_slices=2)).images,
                    load_media(sample, VolumeConfig(num_slices=2)).images):
        np.testing.assert_array_equal(pixels(a), pixels(b))
    np.save(tmp_path / "empty.npy", np.full((3, 4, 5), np.nan, dtype=np.float32))
    with pytest.raises(UserError, match=r"sample v3: volume .*empty\.npy has no finite voxel"):
        load_volume(tmp_path / "empty.npy", uid="v3")
    with pytest.raises(UserError, match=r"sample v4: volume array has shape \(4, 4\)"):
        load_media(Sample(uid="v4", group_id="v4", volume=np.zeros((4, 4)), messages=msgs))


# --- DICOM --------------------------------------------------------------------------------------


def pydicom_testfile(name: str) -> Path:
    """A file of pydicom's test data (never downloaded); skip when it is not installed."""
    pytest.importorskip("pydicom", reason="DICOM needs the optional extra medrl[dicom]")
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom's test file {name} is not installed")
    return Path(path)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_dicom_bytes_equal_dicom_path(name, tmp_path):
    path = pydicom_testfile(name)
    expected = pixels(load_image(path))
    assert len(np.unique(expected)) > 50  # a real picture, not a flat one
    for how, source in every_source(path).items():
        np.testing.assert_array_equal(pixels(load_image(source)), expected, err_msg=how)
    unnamed = tmp_path / "scan"  # no suffix: found by the DICM marker, as bytes too
    unnamed.write_bytes(path.read_bytes())
    np.testing.assert_array_equal(pixels(load_image(unnamed)), expected)


def test_16bit_colour_dicom_matches_its_8bit_twin():
    path16 = pydicom_testfile("SC_rgb_rle_16bit.dcm")
    path8 = pydicom_testfile("SC_rgb_rle.dcm")
    np.testing.assert_array_equal(pixels(load_image(path16)), pixels(load_image(path8)))


def test_12bit_colour_dicom_is_scaled_not_wrapped(tmp_path):
    pytest.importorskip("pydicom", reason="DICOM needs the optional extra medrl[dicom]")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    rgb = np.zeros((2, 3, 3), dtype=np.uint16)
    rgb[0, :, 0] = [0, 1000, 4095]  # red ramp over the 12 stored bits
    rgb[1, :, 2] = [256, 2048, 3000]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = rgb.tobytes()
    ds.save_as(tmp_path / "colour.dcm", enforce_file_format=True)
    out = pixels(load_image(tmp_path / "colour.dcm"))
    expected = np.floor(rgb / 4095.0 * 255 + 0.5).astype(np.uint8)  # 1000 -> 62, not 232
    np.testing.assert_array_equal(out, expected)
    as_bytes = {"bytes": (tmp_path / "colour.dcm").read_bytes(), "path": "colour.dcm"}
    np.testing.assert_array_equal(pixels(load_image(as_bytes)), expected)
