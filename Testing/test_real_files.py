"""The files real users bring, read as the field's own readers read them.

Third-party files come from the test data inside installed wheels, named where used:
nibabel's ``nibabel/tests/data`` (MIT licence) and pydicom's ``pydicom/data/test_files`` (MIT
licence; the files' own provenance is in that folder's README). Where no such file exists, a file
is made to match with the library that defines the format (nibabel).
"""

from __future__ import annotations

import gzip
import json
import logging
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medil_backend.errors import MedILError
from medil_backend.intensity import explain_modality
from medil_backend.io import read_grid, read_volume

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
NICOM_DATA = Path(nib.__file__).parent / "nicom" / "tests" / "data"


def _pydicom_file(name: str) -> Path:
    pydicom = pytest.importorskip("pydicom")
    path = Path(pydicom.__file__).parent / "data" / "test_files" / name
    if not path.exists():
        pytest.skip(f"pydicom's test file {name} is not installed")
    return path


def _info(path, capsys) -> dict:
    from medil_backend.cli import main

    assert main(["info", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _affine_of_info(info: dict) -> np.ndarray:
    return np.asarray(info["affine_ras"], dtype=np.float64)


# -- NaN outside the field of view ----------------------------------------------------------------


def test_nan_outside_the_field_of_view_is_background_with_a_note(caplog):
    """nibabel's ``resampled_anat_moved.nii``: a volume resampled by SPM, NaN outside its field of view (153 voxels)."""
    path = NIBABEL_DATA / "resampled_anat_moved.nii"
    img = nib.load(path)
    raw = np.asarray(img.dataobj, dtype=np.float64)
    nan = ~np.isfinite(raw)
    assert nan.sum() == 153
    with caplog.at_level(logging.WARNING, logger="medil"):
        v = read_volume(path)
    assert v.meta["non_finite_voxels"] == 153
    assert np.all(np.isfinite(v.array))
    np.testing.assert_array_equal(v.array[nan], min(0.0, np.nanmin(raw)))
    np.testing.assert_array_equal(v.array[~nan], raw[~nan].astype(v.array.dtype))
    assert any("153 voxel(s)" in r.getMessage() and "background" in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(v.affine, img.affine, atol=1e-4)


def test_nan_volume_super_resolves_end_to_end(tmp_path, capsys):
    from medil_backend.cli import main

    out = tmp_path / "out.nii.gz"
    assert main(["superres", str(NIBABEL_DATA / "resampled_anat_moved.nii"), str(out), "--method", "fast", "--spacing", "2"]) == 0
    err = capsys.readouterr().err
    assert "NaN or infinite" in err and "Traceback" not in err
    assert np.all(np.isfinite(nib.load(out).get_fdata()))
    import SimpleITK as sitk  # what Slicer reads: the same voxels on the same grid

    img = sitk.ReadImage(str(out))
    np.testing.assert_allclose(_sitk_affine(out), read_grid(out).affine, atol=1e-5)
    np.testing.assert_allclose(sitk.GetArrayFromImage(img).transpose(2, 1, 0), read_volume(out).array, atol=1e-6)
    from medil_backend.io import sidecar_path

    settings = json.loads(sidecar_path(out).read_text())
    assert settings["non_finite_voxels_as_background"] == 153
    assert "no air at -1000 HU" in settings["modality_reason"]


# -- Analyze 7.5 -------------------------------------------------------------------------------


def _analyze_pair(tmp_path, cls=nib.Spm2AnalyzeImage, origin=(46, 64, 37)) -> tuple[Path, np.ndarray]:
    """An Analyze 7.5 pair as SPM writes it (SPM origin field set), made with nibabel."""
    a = (np.arange(20 * 18 * 16, dtype=np.int16) % 251).reshape(20, 18, 16)
    img = cls(a, None)
    img.header.set_zooms((2.0, 2.0, 2.5))
    if origin is not None and "origin" in img.header:
        img.header["origin"][:3] = origin
    path = tmp_path / "spm.hdr"
    img.to_filename(path)
    assert (tmp_path / "spm.img").exists()
    return path, a


def test_analyze_pair_is_read_with_nibabels_geometry_and_a_note(tmp_path, caplog, capsys):
    path, a = _analyze_pair(tmp_path)
    with caplog.at_level(logging.WARNING, logger="medil"):
        v = read_volume(path)
    np.testing.assert_array_equal(v.array, a)
    ref = nib.load(path).affine
    np.testing.assert_allclose(v.affine, ref, atol=1e-4)
    assert any("Analyze 7.5" in r.getMessage() and "no orientation" in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(read_grid(path).affine, ref, atol=1e-4)
    np.testing.assert_allclose(_affine_of_info(_info(path, capsys)), ref, atol=1e-4)


def test_nibabels_own_analyze_header_is_read(tmp_path):
    """nibabel's ``analyze.hdr`` (an SPM2 Analyze header, 91x109x91x1 at 2 mm), with an image file made to match."""
    shutil.copy(NIBABEL_DATA / "analyze.hdr", tmp_path / "analyze.hdr")
    hdr = nib.load(tmp_path / "analyze.hdr").header
    shape = hdr.get_data_shape()
    (tmp_path / "analyze.img").write_bytes(bytes(int(np.prod(shape)) * hdr.get_data_dtype().itemsize))
    v = read_volume(tmp_path / "analyze.hdr")
    assert v.array.shape == tuple(shape[:3])
    np.testing.assert_allclose(v.affine, nib.load(tmp_path / "analyze.hdr").affine, atol=1e-4)


# -- FreeSurfer ------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".mgz", ".mgh"])
def test_freesurfer_volume_is_read_with_its_vox2ras(tmp_path, suffix, capsys):
    a = np.random.default_rng(0).random((12, 10, 9)).astype(np.float32)
    affine = np.array([[-1.0, 0, 0, 5.5], [0, 0, 1.2, -20.0], [0, -0.9, 0, 14.0], [0, 0, 0, 1]])  # LIA-like, as FreeSurfer conforms
    path = tmp_path / f"brain{suffix}"
    nib.MGHImage(a, affine).to_filename(path)
    v = read_volume(path)
    np.testing.assert_array_equal(v.array, a)
    np.testing.assert_allclose(v.affine, nib.load(path).affine, atol=1e-4)
    np.testing.assert_allclose(_affine_of_info(_info(path, capsys)), nib.load(path).affine, atol=1e-4)


def test_nibabels_four_frame_mgz_is_refused_by_name(capsys):
    """nibabel's ``test.mgz``: 3x4x5 with 2 frames."""
    with pytest.raises(MedILError, match="4 dimensions.*pick one volume"):
        read_volume(NIBABEL_DATA / "test.mgz")


def test_truncated_mgh_is_refused(tmp_path):
    path = tmp_path / "cut.mgh"
    nib.MGHImage(np.ones((8, 8, 8), np.float32), np.eye(4)).to_filename(path)
    path.write_bytes(path.read_bytes()[:600])
    with pytest.raises(MedILError, match="truncated"):
        read_volume(path)


# -- headers that ITK reads differently ---------------------------------------------------------


def test_nifti_with_a_wrong_sizeof_hdr_is_refused(tmp_path):
    path = tmp_path / "bad.nii"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), path)
    raw = bytearray(path.read_bytes())
    raw[0:4] = np.int32(350).tobytes()
    path.write_bytes(bytes(raw))
    with pytest.raises(MedILError, match="sizeof_hdr 350 where its format requires 348"):
        read_volume(path)


# -- the modality guess -----------------------------------------------------------------------


def test_a_head_ct_crop_with_little_air_is_ct():
    """A crop of the shared head CT inside the skull: almost no air or fat, bone above +1000, the floor at -1024 (guessed MRI before)."""
    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "ct" / "head_ct_0p96x0p96x1p5mm.nrrd"
    if not path.exists():
        pytest.skip("../shared/data is not beside the repository")
    a = read_volume(path).array
    crop = a[95:161, 65:165, 40:90]  # inside the skull: 0.2 % air, 0.4 % below -50 HU
    assert np.mean(crop < -500) < 0.02 and np.mean(crop < -50) < 0.01 and crop.min() == -1024 and crop.max() > 1000
    modality, why = explain_modality(crop)
    assert modality == "ct", why
    assert "-1024" in why


def test_mri_is_still_mri():
    rng = np.random.default_rng(0)
    a = np.abs(rng.normal(300, 80, (40, 40, 40))).astype(np.int16)
    assert explain_modality(a)[0] == "mri"
    a[:3] = 0
    assert explain_modality(a)[0] == "mri"


def _gunzip(src: Path, dst: Path) -> Path:
    dst.write_bytes(gzip.decompress(src.read_bytes()))
    return dst


def test_metaimage_field_that_itk_reads_past_is_refused(tmp_path):
    import SimpleITK as sitk

    path = tmp_path / "cor.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((5, 6, 7), np.float32)), str(path))
    raw = path.read_bytes()
    raw = raw.replace(b"CenterOfRotation = 0 0 0", b"CenterOfRotation = 0")
    assert b"CenterOfRotation = 0\n" in raw
    path.write_bytes(raw)
    with pytest.raises(MedILError, match="CenterOfRotation.*ITK .and Slicer. would read the next header lines"):
        read_volume(path)


# -- DICOM files ------------------------------------------------------------------------------


def _sitk_affine(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path))
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(img.GetDirection()).reshape(3, 3) * np.asarray(img.GetSpacing())[None, :]
    lps[:3, 3] = img.GetOrigin()
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


@pytest.mark.parametrize(
    "source",
    [
        "nibabel:philips_mprage.dcm.gz",  # nibabel's nicom test data: an Enhanced MR multi-frame file (Philips MPRAGE, 176 frames)
        "pydicom:rtdose.dcm",  # pydicom's test data: an RT dose, 15 frames
    ],
)
def test_a_multi_frame_dicom_file_is_one_volume(tmp_path, source, capsys):
    lib, name = source.split(":")
    if lib == "nibabel":
        path = _gunzip(NICOM_DATA / name, tmp_path / name.removesuffix(".gz"))
    else:
        path = shutil.copy(_pydicom_file(name), tmp_path / name)
    path = Path(path)
    v = read_volume(path)
    import SimpleITK as sitk

    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).transpose(2, 1, 0)
    assert v.array.shape == ref.shape and ref.shape[2] > 1
    np.testing.assert_array_equal(v.array, ref)
    np.testing.assert_allclose(v.affine, _sitk_affine(path), atol=1e-4)
    assert "multi-frame" in v.meta["read_as"]
    info = _info(path, capsys)
    np.testing.assert_allclose(_affine_of_info(info), _sitk_affine(path), atol=1e-4)
    assert info["read_as"].startswith("one multi-frame DICOM file")


def test_one_file_of_a_series_reads_its_series_with_a_note(tmp_path, caplog):
    from conftest import write_dicom_series

    from medil_backend.geometry import Grid

    arr = (np.arange(12 * 10 * 6) % 97).reshape(12, 10, 6).astype(np.int16)
    grid = Grid.from_parts(arr.shape, (0.9, 0.9, 2.5), origin=(10.0, -20.0, 5.0))
    folder = write_dicom_series(tmp_path / "series", arr, grid)
    with caplog.at_level(logging.WARNING, logger="medil"):
        v = read_volume(folder / "003.dcm")
    np.testing.assert_array_equal(v.array, arr)
    assert v.grid.same_as(grid, atol=1e-4)
    assert "whole series, 6 slices" in v.meta["read_as"]
    assert any("003.dcm is one slice of a series" in r.getMessage() for r in caplog.records)


def test_a_lone_dicom_slice_is_refused_by_name(tmp_path):
    """pydicom's ``MR_small.dcm``: one 64x64 MR slice."""
    path = Path(shutil.copy(_pydicom_file("MR_small.dcm"), tmp_path / "MR_small.dcm"))
    with pytest.raises(MedILError, match="MR_small.dcm is a single DICOM slice"):
        read_volume(path)


def test_a_dicom_file_without_suffix_is_recognised(tmp_path):
    """pydicom's DICOMDIR test tree names its files by number (``77654033/CT2/17106``): recognised by the DICM preamble,
    read as its series, which is refused for its uneven slices (as ITK warns)."""
    src = _pydicom_file("dicomdirtests/77654033/CT2/17106").parent
    folder = Path(shutil.copytree(src, tmp_path / "CT2"))
    with pytest.raises(MedILError, match="not evenly spaced"):
        read_volume(folder / "17106")


def test_a_folder_gdcm_cannot_sort_names_the_file(tmp_path):
    """pydicom's ``rtdose.dcm`` beside ``rtdose_1frame.dcm`` (whose header GDCM cannot parse): GDCM's own text was the message."""
    for name in ("rtdose.dcm", "rtdose_1frame.dcm"):
        shutil.copy(_pydicom_file(name), tmp_path / name)
    with pytest.raises(MedILError) as err:
        read_volume(tmp_path)
    text = str(err.value)
    assert "rtdose_1frame.dcm cannot be parsed as DICOM" in text and "Tag(Group" not in text and "invalid logic" not in text


def test_duplicate_slices_are_named(tmp_path):
    """pydicom's ``MR_small.dcm`` and ``MR_small_bigendian.dcm``: the same slice in two encodings."""
    for name in ("MR_small.dcm", "MR_small_bigendian.dcm"):
        shutil.copy(_pydicom_file(name), tmp_path / name)
    with pytest.raises(MedILError, match="lie at the same position"):
        read_volume(tmp_path)


def test_a_siemens_mosaic_is_unpacked(tmp_path, capsys):
    """nibabel's ``siemens_dwi_1000.dcm.gz``: a Siemens diffusion mosaic, 896x896 tiles of 48 slices of 128x128."""
    pydicom = pytest.importorskip("pydicom")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nibabel calls its DICOM readers experimental
        from nibabel.nicom.dicomreaders import mosaic_to_nii

    path = _gunzip(NICOM_DATA / "siemens_dwi_1000.dcm.gz", tmp_path / "dwi.dcm")
    v = read_volume(path)
    ref = mosaic_to_nii(pydicom.dcmread(str(path)))
    assert v.array.shape == (128, 128, 48)
    np.testing.assert_array_equal(v.array, np.asanyarray(ref.dataobj))
    np.testing.assert_allclose(v.affine, ref.affine, atol=1e-4)
    np.testing.assert_allclose(v.grid.spacing, [1.796875, 1.796875, 3.0], atol=1e-4)
    assert v.meta["dicom_modality"] == "MR"
    np.testing.assert_allclose(_affine_of_info(_info(path, capsys)), ref.affine, atol=1e-4)


def test_two_mosaics_in_a_folder_are_refused(tmp_path):
    pytest.importorskip("pydicom")
    folder = tmp_path / "run"
    folder.mkdir()
    _gunzip(NICOM_DATA / "siemens_dwi_0.dcm.gz", folder / "b0.dcm")
    _gunzip(NICOM_DATA / "siemens_dwi_1000.dcm.gz", folder / "b1000.dcm")
    with pytest.raises(MedILError, match="Siemens mosaics, each a whole volume"):
        read_volume(folder)


# -- a sform that disagrees with the qform --------------------------------------------------------


def _disagreeing_nifti(tmp_path, sform_code: int = 1) -> tuple[Path, np.ndarray, np.ndarray]:
    sform = np.array([[1.0, 0, 0, -10.0], [0, 1.0, 0, -12.0], [0, 0, 1.5, -8.0], [0, 0, 0, 1]])
    qform = sform.copy()
    qform[:3, 3] += [4.0, -3.0, 2.0]  # the qform 5.4 mm away
    img = nib.Nifti1Image(np.random.default_rng(0).random((10, 9, 8)).astype(np.float32), sform)
    img.set_sform(sform, code=sform_code)
    img.set_qform(qform, code=1)
    path = tmp_path / "two.nii.gz"
    img.to_filename(path)
    return path, sform, qform


@pytest.mark.parametrize("sform_code", [1, 2, 3, 4])  # scanner: ITK places the file by its sform; aligned, Talairach, MNI: by its qform
def test_a_qform_that_disagrees_with_the_sform_says_what_slicer_shows_and_offers_the_choice(tmp_path, caplog, capsys, sform_code):
    from medil_backend.io import nifti_geometry

    path, sform, qform = _disagreeing_nifti(tmp_path, sform_code)
    with caplog.at_level(logging.WARNING, logger="medil"):
        v = read_volume(path)
    np.testing.assert_allclose(v.affine, sform, atol=1e-5)
    text = " ".join(r.getMessage() for r in caplog.records)
    itk = _sitk_affine(path)
    itk_uses = "qform" if np.allclose(itk, qform, atol=1e-3) else "sform"
    assert "disagree by up to 5.39 mm" in text and "--nifti-geometry qform" in text
    assert ("Slicer and other ITK-based tools place this file by its qform" in text) == (itk_uses == "qform")
    assert itk_uses == ("sform" if sform_code == 1 else "qform")  # SimpleITK's own choice, which the message reports
    with nifti_geometry("qform"):
        np.testing.assert_allclose(read_volume(path).affine, qform, atol=1e-5)
        np.testing.assert_allclose(read_grid(path).affine, qform, atol=1e-5)
    np.testing.assert_allclose(read_volume(path).affine, sform, atol=1e-5)  # the choice ends with the block
    from medil_backend.cli import main

    assert main(["info", str(path), "--json", "--nifti-geometry", "qform"]) == 0
    np.testing.assert_allclose(_affine_of_info(json.loads(capsys.readouterr().out)), qform, atol=1e-5)
    out = tmp_path / "out.nrrd"
    assert main(["superres", str(path), str(out), "--method", "fast", "--nifti-geometry", "qform", "--progress", "none"]) == 0
    g = read_grid(out)
    np.testing.assert_allclose(_sitk_affine(out), g.affine, atol=1e-5)  # Slicer (SimpleITK) reads the same grid
    lo = g.voxel_to_world(np.zeros(3))
    assert np.linalg.norm(lo - qform[:3, 3]) < 1.0  # the output lies where the qform puts the input


# -- what is not a volume, refused by name ----------------------------------------------------------


@pytest.mark.parametrize(
    "name, words",
    [
        ("rtstruct.dcm", "DICOM RT Structure Set Storage object, not an image"),  # pydicom's test data
        ("test-SR.dcm", "not an image"),
        ("rtplan.dcm", "DICOM RT Plan Storage object, not an image"),
    ],
)
def test_a_dicom_object_that_is_not_an_image_is_named(tmp_path, name, words, capsys):
    from medil_backend.cli import main

    path = Path(shutil.copy(_pydicom_file(name), tmp_path / name))
    assert main(["info", str(path)]) == 1
    err = capsys.readouterr().err
    assert words in err and "ImageIO" not in err and str(tmp_path) not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "name, words",
    [("T1.PAR", "Philips PAR/REC"), ("tiny.mnc", "a MINC file"), ("example4d+orig.HEAD", "an AFNI dataset")],  # nibabel's test data
)
def test_other_volume_formats_are_refused_by_name_with_the_converter(name, words, capsys):
    from medil_backend.cli import main

    assert main(["info", str(NIBABEL_DATA / name)]) == 1
    err = capsys.readouterr().err
    assert words in err and "convert it to NIfTI" in err
