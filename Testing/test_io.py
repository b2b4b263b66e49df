import gzip
import os

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import shared, write_dicom_series

from medil_backend.errors import MedILError
from medil_backend.geometry import Grid, Volume
from medil_backend.io import read_volume, write_volume

REAL = [
    "mri/itk_t1_2x2x3mm.nii.gz",  # LSA, NIfTI
    "mri/clinical_t1c_thick_0p78x0p78x6p5mm.nrrd",  # NRRD, flipped axis
    "mri/robex_t1_1p5mm.nii.gz",  # NIfTI with a trailing singleton 4th dimension
    "ct/head_ct_0p96x0p96x1p5mm.nrrd",
]


def _oblique(affine: np.ndarray) -> np.ndarray:
    a, b = np.deg2rad(17.0), np.deg2rad(-9.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    out = affine.copy()
    out[:3, :3] = rz @ rx @ affine[:3, :3]
    out[:3, 3] += [3.25, -7.5, 11.125]
    return out


@pytest.mark.parametrize("rel", REAL)
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
@pytest.mark.parametrize("oblique", [False, True])
def test_round_trip_real_files(rel, suffix, oblique, tmp_path):
    v = read_volume(shared(rel))
    crop = Volume(np.ascontiguousarray(v.array[::4, ::4, ::2]), v.affine @ np.diag([4.0, 4.0, 2.0, 1.0]))
    if oblique:
        crop.affine = _oblique(crop.affine)
    path = tmp_path / f"out{suffix}"
    write_volume(crop, path, dtype=crop.array.dtype)
    back = read_volume(path)
    assert back.grid.same_as(crop.grid, atol=1e-5), (back.grid, crop.grid)
    np.testing.assert_array_equal(back.array, crop.array)


def test_lps_conversion_matches_itk(tmp_path):
    """A point's ITK (LPS) physical coordinate equals our RAS coordinate with x, y negated."""
    path = shared("mri/clinical_t1c_thick_0p78x0p78x6p5mm.nrrd")
    img = sitk.ReadImage(str(path))
    v = read_volume(path)
    ijk = (10, 200, 7)
    lps = np.array(img.TransformIndexToPhysicalPoint(ijk))
    ras = v.grid.voxel_to_world(np.array(ijk, dtype=float))
    np.testing.assert_allclose(ras, lps * [-1, -1, 1], atol=1e-9)
    assert v.array[ijk] == img[ijk]


def test_dicom_series_round_trip(tmp_path):
    """Write a real volume as a DICOM series with SimpleITK and read the folder back."""
    v = read_volume(shared("mri/itk_t1_2x2x3mm.nii.gz"))
    arr = v.array[::2, ::2, ::2].astype(np.int16)
    grid = Grid(arr.shape, v.affine @ np.diag([2.0, 2.0, 2.0, 1.0]))
    folder = write_dicom_series(tmp_path / "dicom", arr, grid)
    back = read_volume(folder)
    assert back.grid.same_as(grid, atol=1e-4), (back.grid, grid)
    np.testing.assert_array_equal(back.array, arr)


def test_missing_file(tmp_path):
    with pytest.raises(MedILError, match="does not exist"):
        read_volume(tmp_path / "nope.nii.gz")


def test_corrupt_file(tmp_path):
    src = shared("mri/itk_t1_2x2x3mm.nii.gz")
    bad = tmp_path / "truncated.nii.gz"
    data = gzip.decompress(src.read_bytes())
    bad.write_bytes(gzip.compress(data[: len(data) // 3]))
    with pytest.raises(MedILError, match="cannot read"):
        read_volume(bad)
    junk = tmp_path / "junk.nrrd"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(MedILError, match="cannot read"):
        read_volume(junk)


def test_2d_and_4d_refused(tmp_path):
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((5, 6), np.float32), np.eye(4)), tmp_path / "flat.nii")
    with pytest.raises(MedILError, match="2D"):
        read_volume(tmp_path / "flat.nii")
    nib.save(nib.Nifti1Image(np.zeros((5, 6, 7, 3), np.float32), np.eye(4)), tmp_path / "series.nii")
    with pytest.raises(MedILError, match="pick one volume"):
        read_volume(tmp_path / "series.nii")


def test_a_volume_of_nan_is_refused(tmp_path):
    """NaN outside a field of view is background (Testing/test_real_files.py); a volume with no finite voxel is refused."""
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.full((4, 4, 4), np.inf, np.float32), np.eye(4)), tmp_path / "nan.nii")
    with pytest.raises(MedILError, match="no finite voxel"):
        read_volume(tmp_path / "nan.nii")


@pytest.mark.parametrize("spacing", [0.0, float("nan")])
def test_bad_spacing_in_nrrd_header(tmp_path, spacing):
    img = sitk.GetImageFromArray(np.ones((4, 4, 4), np.float32))
    path = tmp_path / "bad.nrrd"
    sitk.WriteImage(img, str(path))
    text = path.read_bytes()
    # rewrite the spacing the way a broken exporter would
    header, _, body = text.partition(b"\n\n")
    lines = [ln for ln in header.split(b"\n") if not ln.startswith(b"space directions")]
    lines.append(f"space directions: ({spacing},0,0) (0,1,0) (0,0,1)".encode())
    path.write_bytes(b"\n".join(lines) + b"\n\n" + body)
    with pytest.raises(MedILError):
        read_volume(path)


def test_write_refuses_existing_and_missing_folder(tmp_path):
    v = Volume(np.zeros((3, 3, 3), np.float32), np.eye(4))
    out = tmp_path / "a.nii.gz"
    write_volume(v, out)
    before = out.read_bytes()
    with pytest.raises(MedILError, match="already exists"):
        write_volume(Volume(np.ones((3, 3, 3), np.float32), np.eye(4)), out)
    assert out.read_bytes() == before
    with pytest.raises(MedILError, match="does not exist"):
        write_volume(v, tmp_path / "nofolder" / "a.nii.gz")
    with pytest.raises(MedILError, match="file name ending"):
        write_volume(v, tmp_path / "a.png")
    assert sorted(os.listdir(tmp_path)) == ["a.nii.gz"]  # no temporary files left


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import medil_backend.io as mio

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(mio, "_write_itk", boom)
    with pytest.raises(MedILError, match="could not write"):
        write_volume(Volume(np.zeros((3, 3, 3), np.float32), np.eye(4)), tmp_path / "x.nrrd")
    assert os.listdir(tmp_path) == []


def test_dtype_option_rounds_and_clips(tmp_path):
    v = Volume(np.array([-5.6, 0.4, 1.5, 300.2], np.float32).reshape(2, 2, 1).repeat(2, axis=2), np.eye(4))
    write_volume(v, tmp_path / "u8.nrrd", dtype=np.uint8)
    back = read_volume(tmp_path / "u8.nrrd")
    assert back.array.dtype == np.uint8
    np.testing.assert_array_equal(back.array.ravel(), [0, 0, 0, 0, 2, 2, 255, 255])


@pytest.mark.parametrize("spacing", ["0 1 1", "1 0 1"])  # ITK itself turns a negative MetaIO spacing into a flip
def test_negative_or_zero_spacing_in_mha(tmp_path, spacing):
    path = tmp_path / "n.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((4, 4, 4), np.float32)), str(path))
    path.write_bytes(path.read_bytes().replace(b"ElementSpacing = 1 1 1", f"ElementSpacing = {spacing}".encode()))
    with pytest.raises(MedILError, match="spacing"):
        read_volume(path)


def test_zero_pixdim_in_nifti(tmp_path):
    """(nibabel itself reads a negative pixdim as its absolute value, as FSL does.)"""
    import nibabel as nib

    img = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), None)
    img.header["pixdim"][1:4] = [0.0, 1.0, 1.0]
    img.header["sform_code"] = 0
    nib.save(img, tmp_path / "zero.nii")
    with pytest.raises(MedILError, match="spacing"):
        read_volume(tmp_path / "zero.nii")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_far_origins_keep_1e5_mm(tmp_path, suffix):
    """Table positions of CT scans sit hundreds of mm away: float32 NIfTI-1 headers would round them."""
    aff = np.diag([0.5703125, 0.5703125, 5.0, 1.0])
    aff[:3, 3] = [-146.123456789, -325.987654321, -777.4999999999998]
    v = Volume(np.zeros((4, 5, 6), np.int16), aff)
    write_volume(v, tmp_path / f"far{suffix}", dtype=np.int16)
    back = read_volume(tmp_path / f"far{suffix}")
    np.testing.assert_allclose(back.affine, aff, atol=1e-5, rtol=0)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_provenance_travels_in_the_file_and_a_sidecar(tmp_path, suffix):
    import json

    import nibabel as nib

    from medil_backend.io import sidecar_path

    prov = {"task": "reconstruct", "model": "medil-brain-t1", "version": "0.1.0", "command": "medil reconstruct a b"}
    path = write_volume(Volume(np.ones((4, 4, 4), np.float32), np.eye(4)), tmp_path / f"o{suffix}", provenance=prov)
    side = json.loads(sidecar_path(path).read_text())
    assert sidecar_path(path).name == "o.json" and side["AIGenerated"] is True and side["model"] == "medil-brain-t1"
    if suffix == ".nii.gz":
        descrip = nib.load(path).header["descrip"].tobytes().decode()
        assert descrip.startswith("AI-generated by MedIL reconstruct medil-brain-t1")
    else:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        assert reader.GetMetaData("MedIL.aiGenerated") == "true" and reader.GetMetaData("MedIL.model") == "medil-brain-t1"
        assert reader.GetMetaData("MedIL.note").startswith("AI-generated by MedIL")
    # the sidecar, like the volume, is never replaced without overwrite
    sidecar_path(tmp_path / f"o3{suffix}").write_text("{}")
    with pytest.raises(MedILError, match="already exists"):
        write_volume(Volume(np.ones((4, 4, 4), np.float32), np.eye(4)), tmp_path / f"o3{suffix}", provenance=prov)
    assert not (tmp_path / f"o3{suffix}").exists()
