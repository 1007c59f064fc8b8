"""Images, DICOM and CT volumes -> RGB slices: formats, axis convention, slice rule, windowing."""

from __future__ import annotations

import sys

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from medrl.align.records import UserError
from medrl.rollouts.multimodal import (load_image, load_volume, minmax_to_uint8, slice_indices,
                                       volume_to_slices, window_to_uint8)

# --- the slice rule and windowing ---------------------------------------------------------------


@pytest.mark.parametrize("depth,num,expected", [
    (128, 8, [8, 24, 40, 56, 72, 88, 104, 120]),
    (10, 4, [1, 3, 6, 8]),
    (7, 1, [3]),
    (3, 5, [0, 0, 1, 2, 2]),
    (1, 3, [0, 0, 0]),
])
def test_slice_indices_are_bin_centres(depth, num, expected):
    assert slice_indices(depth, num) == expected


@given(st.integers(1, 400), st.integers(1, 64))
def test_slice_indices_property(depth, num):
    idx = slice_indices(depth, num)
    assert len(idx) == num
    assert idx == sorted(idx)
    for i, k in enumerate(idx):  # k = floor of the centre of bin i, (i + 0.5) * D / N
        assert 0 <= k < depth
        assert k * 2 * num <= (2 * i + 1) * depth < (k + 1) * 2 * num
        assert i * depth <= (k + 1) * num and k * num < (i + 1) * depth  # inside bin i


def test_window_to_uint8_known_values():
    hu = np.array([-1000.0, -160.0, 40.0, 140.0, 240.0, 3000.0])
    assert window_to_uint8(hu, 40.0, 400.0).tolist() == [0, 0, 128, 191, 255, 255]
    lung = window_to_uint8(np.array([-1350.0, -600.0, 150.0]), -600.0, 1500.0)
    assert lung.tolist() == [0, 128, 255]


def test_minmax_constant_and_range():
    assert minmax_to_uint8(np.full((2, 2), 7.0)).tolist() == [[0, 0], [0, 0]]
    assert minmax_to_uint8(np.array([10.0, 20.0, 30.0])).tolist() == [0, 128, 255]


def hu_volume(depth=10, height=6, width=5) -> np.ndarray:
    """Slice d holds -200 + 50*d HU everywhere, plus one bright voxel per slice at [d, 1, 2]."""
    vol = np.zeros((depth, height, width), dtype=np.float32)
    vol += (-200 + 50 * np.arange(depth, dtype=np.float32))[:, None, None]
    vol[:, 1, 2] = 1000.0
    return vol


def test_volume_to_slices_axis0_window():
    vol = hu_volume()
    slices = volume_to_slices(vol, num_slices=4, axis=0, window_center=40, window_width=400)
    assert len(slices) == 4
    for img, d in zip(slices, [1, 3, 6, 8]):  # bin centres of 4 bins over 10 slices
        assert img.mode == "RGB" and img.size == (5, 6)  # PIL size is (W, H)
        arr = np.asarray(img)
        r, g, b = arr[..., 0], arr[..., 1], arr[..., 2]
        assert (r == g).all() and (g == b).all()
        hu = -200 + 50 * d
        expected = int(np.floor(np.clip((hu + 160) / 400, 0, 1) * 255 + 0.5))
        assert arr[0, 0, 0] == expected
        assert arr[1, 2, 0] == 255  # 1000 HU saturates the soft-tissue window
    assert [np.asarray(s)[0, 0, 0] for s in slices] == [6, 70, 166, 230]  # -150, -50, 100, 200 HU


def test_volume_to_slices_other_axes_and_minmax():
    vol = hu_volume()
    coronal = volume_to_slices(vol, num_slices=2, axis=1, window_center=None, window_width=None)
    assert [s.size for s in coronal] == [(5, 10), (5, 10)]  # [D, W] slices
    # min-max over the whole volume: -200 -> 0, 1000 -> 255
    sag = volume_to_slices(vol, num_slices=5, axis=2, window_center=None, window_width=None)
    assert sag[0].size == (6, 10)  # [D, H] slices
    arr = np.asarray(sag[2])[..., 0]  # w index 2 holds the bright column
    assert arr[0, 1] == 255 and arr[0, 0] == 0
    assert arr[4, 0] == int(np.floor((0 + 200) / 1200 * 255 + 0.5))


def test_volume_to_slices_needs_both_window_values():
    with pytest.raises(UserError, match="set both window_center and window_width"):
        volume_to_slices(hu_volume(), num_slices=2, window_center=40, window_width=None)
    with pytest.raises(ValueError, match=r"\[D, H, W\]"):
        volume_to_slices(np.zeros((4, 4)), num_slices=2)


# --- volumes from files -------------------------------------------------------------------------


def test_nifti_identity_affine_axis_convention(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)  # [X, Y, Z]
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "v.nii.gz")
    vol = load_volume(tmp_path / "v.nii.gz")
    assert vol.shape == (6, 5, 4) and vol.dtype == np.float32
    # D: superior->inferior, H: anterior->posterior, W: patient right->left
    np.testing.assert_array_equal(vol, data.transpose(2, 1, 0)[::-1, ::-1, ::-1])
    assert vol[0, 0, 0] == data[3, 4, 5]  # right-anterior-superior corner first


def test_nifti_lps_affine_is_reoriented(tmp_path):
    data = np.zeros((4, 5, 6), dtype=np.float32)
    data[0, 0, 5] = 7.0  # with x = -i, y = -j: most right, most anterior, most superior
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "lps.nii")
    vol = load_volume(tmp_path / "lps.nii")
    assert vol.shape == (6, 5, 4)
    assert vol[0, 0, 0] == 7.0 and vol.sum() == 7.0


def test_nifti_scaling_gives_hounsfield_units(tmp_path):
    raw = np.full((3, 3, 4), 1064, dtype=np.int16)
    raw[1, 1, :] = 0
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_slope_inter(1.0, -1024.0)
    nib.save(img, tmp_path / "ct.nii.gz")
    vol = load_volume(tmp_path / "ct.nii.gz")
    assert vol[0, 0, 0] == 40.0 and vol[2, 1, 1] == -1024.0
    sl = volume_to_slices(vol, num_slices=1, window_center=40, window_width=400)[0]
    arr = np.asarray(sl)[..., 0]
    assert arr[0, 0] == 128 and arr[1, 1] == 0


def test_npy_volume(tmp_path):
    vol = hu_volume()
    np.save(tmp_path / "v.npy", vol)
    np.testing.assert_array_equal(load_volume(tmp_path / "v.npy"), vol)


def test_volume_errors_name_sample_and_path(tmp_path):
    with pytest.raises(UserError) as err:
        load_volume(tmp_path / "nope.nii.gz", uid="ct-7")
    missing = tmp_path / "nope.nii.gz"
    assert str(err.value).startswith(f"sample ct-7: volume {missing} does not exist.")
    (tmp_path / "bad.nii.gz").write_bytes(b"not a nifti at all")
    with pytest.raises(UserError, match=r"sample ct-8: cannot read NIfTI volume .*bad\.nii\.gz"):
        load_volume(tmp_path / "bad.nii.gz", uid="ct-8")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match="no pickled objects"):
        load_volume(tmp_path / "obj.npy", uid="x")
    np.save(tmp_path / "flat.npy", np.zeros((4, 4)))
    with pytest.raises(UserError, match=r"has shape \(4, 4\); a 3D volume"):
        load_volume(tmp_path / "flat.npy", uid="x")
    (tmp_path / "v.mha").write_bytes(b"x")
    with pytest.raises(UserError, match="unsupported format"):
        load_volume(tmp_path / "v.mha", uid="x")


def nifti_with_header(path, edit) -> None:
    """A small valid .nii written with nibabel, then its header bytes changed by ``edit``."""
    import struct

    img = nib.Nifti1Image(np.arange(60, dtype=np.int16).reshape(5, 4, 3), np.eye(4))
    raw = bytearray(img.to_bytes())
    edit(struct, raw)
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("name,edit,says", [
    ("dtype.nii", lambda st, h: st.pack_into("<h", h, 70, 1234),
     "cannot read NIfTI volume {path} (HeaderDataError: data code 1234 not recognized)"),
    ("negative.nii", lambda st, h: st.pack_into("<8h", h, 40, 3, -5, 4, 3, 1, 1, 1, 1),
     "volume {path}: its header gives the shape (-5, 4, 3); the header is damaged."),
    ("huge.nii", lambda st, h: st.pack_into("<8h", h, 40, 3, 30000, 30000, 30000, 1, 1, 1, 1),
     "volume {path}: its header describes (30000, 30000, 30000) voxels of int16 "
     "(54000000000352 bytes), more than the file can hold (472 bytes)"),
    ("flat.nii", lambda st, h: (st.pack_into("<hh", h, 252, 0, 1),
                                st.pack_into("<12f", h, 280, *([0.0] * 12))),
     "cannot read NIfTI volume {path} (OrientationError:"),
])
def test_damaged_nifti_headers_are_refused_before_reading(tmp_path, name, edit, says):
    path = tmp_path / name
    nifti_with_header(path, edit)
    with pytest.raises(UserError) as err:
        load_volume(path, uid="ct-9")
    assert str(err.value).startswith("sample ct-9: " + says.format(path=path)), str(err.value)


def test_a_cut_gzip_nifti_claiming_more_than_it_can_hold_is_refused(tmp_path):
    import gzip
    import struct

    img = nib.Nifti1Image(np.zeros((5, 4, 3), dtype=np.int16), np.eye(4))
    raw = bytearray(img.to_bytes())
    struct.pack_into("<8h", raw, 40, 3, 30000, 30000, 30000, 1, 1, 1, 1)
    path = tmp_path / "huge.nii.gz"
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(UserError, match=r"more than the file can hold \(\d+ bytes, "
                                        r"compressed\); the file is cut short"):
        load_volume(path, uid="ct-9")


# --- 2D images ----------------------------------------------------------------------------------


def test_png_and_jpeg(tmp_path):
    rgb = np.zeros((8, 10, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=95)
    Image.fromarray(np.full((4, 4), 77, dtype=np.uint8)).save(tmp_path / "g.png")
    png = load_image(tmp_path / "a.png")
    assert png.mode == "RGB" and png.size == (10, 8)
    np.testing.assert_array_equal(np.asarray(png), rgb)
    jpg = load_image(tmp_path / "a.jpg")
    assert jpg.mode == "RGB" and abs(int(np.asarray(jpg)[4, 4, 0]) - 200) <= 3
    assert np.asarray(load_image(tmp_path / "g.png"))[0, 0].tolist() == [77, 77, 77]


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "x16.png")
    img = load_image(tmp_path / "x16.png")
    assert np.asarray(img)[..., 0].tolist() == [[0, 64], [128, 255]]


def test_image_errors_name_sample_and_path(tmp_path):
    with pytest.raises(UserError) as err:
        load_image(tmp_path / "missing.png", uid="q-1")
    missing = tmp_path / "missing.png"
    assert str(err.value).startswith(f"sample q-1: image {missing} does not exist.")
    (tmp_path / "junk.png").write_bytes(b"\x00" * 300)
    with pytest.raises(UserError, match=r"sample q-2: cannot read image .*junk\.png"):
        load_image(tmp_path / "junk.png", uid="q-2")


def test_an_image_claiming_billions_of_pixels_is_refused(tmp_path):
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", 100000, 100000, 8, 0, 0, 0, 0)  # 10^10 gray pixels
    path = tmp_path / "bomb.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b""))
    with pytest.raises(UserError) as err:
        load_image(path, uid="q-3")
    assert str(err.value).startswith(f"sample q-3: image {path} claims more than ")


# --- DICOM --------------------------------------------------------------------------------------


def write_dicom(path, pixels: np.ndarray, *, window=(40, 400), photometric="MONOCHROME2"):
    pydicom = pytest.importorskip("pydicom", reason="DICOM needs the optional extra medrl[dicom]")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return pydicom


def test_dicom_rescale_and_window(tmp_path):
    raw = np.array([[0, 864], [1064, 1264]])  # -1024, -160, 40, 240 HU
    write_dicom(tmp_path / "ct.dcm", raw)
    img = load_image(tmp_path / "ct.dcm")
    assert img.mode == "RGB"
    assert np.asarray(img)[..., 0].tolist() == [[0, 0], [128, 255]]


def test_dicom_without_window_and_monochrome1(tmp_path):
    raw = np.array([[0, 500], [1000, 2000]])
    write_dicom(tmp_path / "nowin", raw, window=None, photometric="MONOCHROME1")  # no suffix
    img = load_image(tmp_path / "nowin")  # found by the DICM marker
    # min-max over -1024..976 HU, then inverted (MONOCHROME1: low values are white)
    assert np.asarray(img)[..., 0].tolist() == [[255, 191], [127, 0]]  # 255 - (0, 64, 128, 255)


def test_dicom_without_pydicom_says_how_to_install(tmp_path, monkeypatch):
    # a DICOM preamble and marker (the rest does not matter: reading stops at the import)
    (tmp_path / "scan").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)
    monkeypatch.setitem(sys.modules, "pydicom", None)  # as if the extra were not installed
    with pytest.raises(UserError, match=r"sample s1: .*scan is a DICOM file.*"
                                        r"pip install 'medrl\[dicom\]'"):
        load_image(tmp_path / "scan", uid="s1")


def test_unreadable_dicom(tmp_path):
    pytest.importorskip("pydicom", reason="DICOM needs the optional extra medrl[dicom]")
    (tmp_path / "broken.dcm").write_bytes(b"garbage")
    with pytest.raises(UserError, match=r"sample s2: cannot read DICOM image .*broken\.dcm"):
        load_image(tmp_path / "broken.dcm", uid="s2")
