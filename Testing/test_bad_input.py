"""Bad input never yields a wrong volume, a traceback or a leftover (one case per finding of the
audit, each ending in a correct output or one `medil: error:` line, non-zero exit, nothing left)."""

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import REPO, TINY_CONFIG

from medil_backend.cli import main
from medil_backend.errors import Interrupted, MedILError
from medil_backend.geometry import Grid, Volume, output_grid
from medil_backend.io import library_message, read_grid, read_volume, write_volume


def run(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(rc, err, *fragments):
    assert rc == 1, err
    assert "Traceback" not in err and "np.float64" not in err and ".cxx" not in err, err
    lines = [
        ln for ln in err.strip().splitlines() if ln and not ln.startswith(("medil: note:", "medil: warning:"))
    ]  # MedIL's own notes may precede
    assert len(lines) == 1 and lines[0].startswith("medil: error:"), err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def rotation(deg, axis=2):
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    r = np.eye(3)
    i, j = [k for k in range(3) if k != axis]
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def random_array(shape, seed=0):
    return (np.random.default_rng(seed).random(shape) * 100).astype(np.float32)


# -- wrong grids ---------------------------------------------------------------------------------


def test_oblique_float32_nifti_keeps_its_own_grid(tmp_path, model_dir, capsys):
    aff = np.eye(4)
    aff[:3, :3] = rotation(17, 0) @ rotation(17, 2) @ np.diag([2.0, 2.0, 3.0])
    aff[:3, 3] = [-97.3, 12.1, -40.7]
    path = tmp_path / "oblique.nii.gz"
    nib.save(nib.Nifti1Image(random_array((20, 18, 12)), aff), path)  # the header rounds the sform to float32
    g = read_volume(path).grid
    assert output_grid(g).same_as(g, atol=0)
    assert output_grid(g, spacing=list(g.spacing)).same_as(g, atol=1e-9)
    assert output_grid(g, spacing=1.0).shape == (40, 36, 36)
    out = tmp_path / "out.nii.gz"
    rc, _, err = run(["reconstruct", path, out, "--model", "tiny", "--progress", "none"], capsys)
    assert rc == 0, err
    assert read_volume(out).grid.same_as(g, atol=1e-5)


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz"])
def test_direction_rounding_in_headers_changes_nothing(tmp_path, suffix):
    d = rotation(30, 1) @ rotation(11, 2)
    d = d + np.random.default_rng(1).normal(0, 3e-7, (3, 3))  # what 6-7 printed digits leave
    aff = np.eye(4)
    aff[:3, :3] = d * [0.8, 0.8, 4.0]
    aff[:3, 3] = [10.0, -20.0, 30.0]
    path = tmp_path / f"rounded{suffix}"
    write_volume(Volume(random_array((30, 28, 9)), aff), path)
    g = read_volume(path).grid
    assert output_grid(g).same_as(g, atol=0)
    assert output_grid(g, spacing=[0.8, 0.8, 4.0]).shape == g.shape
    assert output_grid(g, spacing=[0.4, 0.4, 2.0]).shape == (60, 56, 18)


def test_sheared_affine_refused(tmp_path, capsys):
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    aff[0, 1] = 0.3  # shear
    path = tmp_path / "sheared.nii.gz"
    nib.save(nib.Nifti1Image(random_array((8, 8, 8)), aff), path)
    one_error_line(*run(["info", path], capsys)[::2], "sheared")


def test_singular_affine_refused(tmp_path):
    aff = np.eye(4)
    aff[:3, 1] = aff[:3, 0]
    with pytest.raises(MedILError, match="singular"):
        Grid((4, 4, 4), aff).validate()


# -- wrong values --------------------------------------------------------------------------------


def test_big_endian_nrrd_reads_its_values(tmp_path, model_dir, capsys):
    arr = random_array((10, 9, 8))
    header = (
        "NRRD0004\ntype: float\ndimension: 3\nspace: left-posterior-superior\nsizes: 10 9 8\n"
        "space directions: (1,0,0) (0,1,0) (0,0,2)\nkinds: domain domain domain\nendian: big\nencoding: raw\n"
        "space origin: (0,0,0)\n\n"
    )
    path = tmp_path / "big.nrrd"
    path.write_bytes(header.encode() + arr.transpose(2, 1, 0).astype(">f4").tobytes())
    v = read_volume(path)
    assert v.array.dtype.isnative
    np.testing.assert_array_equal(v.array, arr)
    out = tmp_path / "out.nrrd"
    rc, _, err = run(["reconstruct", path, out, "--model", "tiny", "--progress", "none"], capsys)
    assert rc == 0, err
    assert np.isfinite(read_volume(out).array).all()


def test_absurd_values_refused(tmp_path, capsys):
    path = tmp_path / "huge.nii.gz"
    nib.save(nib.Nifti1Image(random_array((8, 8, 8)).astype(np.float64) * 1e296, np.eye(4)), path)
    one_error_line(*run(["reconstruct", path, tmp_path / "o.nii.gz"], capsys)[::2], "rescale")
    assert not (tmp_path / "o.nii.gz").exists()


@pytest.mark.parametrize(
    "origin,spacing,fragment",
    [((1e30, 0, 0), 1.0, "origin"), ((0, 0, 0), 1e30, "spacing"), ((0, 0, 0), 1e-9, "spacing")],
)
def test_absurd_geometry_refused(tmp_path, capsys, origin, spacing, fragment):
    aff = np.diag([spacing, spacing, spacing, 1.0])
    aff[:3, 3] = origin
    path = tmp_path / "far.nrrd"
    write_volume(Volume(random_array((6, 6, 6)), aff), path)
    one_error_line(*run(["info", path], capsys)[::2], fragment)


@pytest.mark.parametrize(
    "extra,fragment",
    [
        (["--spacing", "1e300"], "spacing must be"),
        (["--spacing", "1e-300"], "spacing must be"),
        (["--spacing", "1e-5"], "coarser spacing"),
        (["--fov", "1000", "1100", "1000", "1100", "1000", "1100"], "does not overlap"),
        (["--fov", "-1e30", "0", "0", "1", "0", "1"], "field of view"),
    ],
)
def test_absurd_output_grids_refused(small_mri, tmp_path, model_dir, capsys, extra, fragment):
    rc, _, err = run(["reconstruct", small_mri, tmp_path / "o.nii.gz", "--model", "tiny", *extra], capsys)
    one_error_line(rc, err, fragment)
    assert not re.search(r"\([^)]*-\d[^)]*\) voxels", err), err  # never a negative shape
    assert not (tmp_path / "o.nii.gz").exists()


def test_negative_numbers_after_an_option(small_mri, tmp_path, model_dir, capsys):
    g = read_volume(small_mri).grid
    lo, hi = g.extent()
    box = [x for a, b in zip(lo, hi) for x in (a + 2, b - 2)]
    assert min(box) < 0
    out = tmp_path / "fov.nii.gz"
    rc, _, err = run(["reconstruct", small_mri, out, "--model", "tiny", "--progress", "none", "--fov", *box], capsys)
    assert rc == 0, err


# -- DICOM series with missing or damaged slices --------------------------------------------------


def write_series(folder, n=8):
    folder.mkdir()
    arr = (np.random.default_rng(0).random((n, 12, 10)) * 1000).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.0, 1.0, 2.0))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125.1.4242"
    for k in range(n):
        s = img[:, :, k]
        for tag, value in {"0020|000e": uid, "0020|0037": "1\\0\\0\\0\\1\\0", "0008|0060": "CT", "0020|0013": str(k)}.items():
            s.SetMetaData(tag, value)
        s.SetMetaData("0020|0032", "\\".join(map(str, img.TransformIndexToPhysicalPoint((0, 0, k)))))
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(s)
    return folder


def test_dicom_series_with_a_truncated_slice_refused(tmp_path, capsys):
    folder = write_series(tmp_path / "series")
    assert read_volume(folder).grid.spacing[2] == pytest.approx(2.0)
    bad = folder / "slice004.dcm"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    one_error_line(*run(["info", folder], capsys)[::2], "slice004.dcm")


def test_dicom_series_with_a_missing_slice_refused(tmp_path, capsys):
    folder = write_series(tmp_path / "series")
    (folder / "slice005.dcm").unlink()
    line = one_error_line(*run(["info", folder], capsys)[::2], "not evenly spaced")
    assert "slice004.dcm" in line and "slice006.dcm" in line


# -- tracebacks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["inf", "1e300", "0", "nan"])
def test_memory_limit_must_be_sensible(small_mri, tmp_path, capsys, value):
    one_error_line(*run(["reconstruct", small_mri, tmp_path / "o.nii.gz", "--max-memory", value], capsys)[::2], "memory limit")


def _medil(args, env=None, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "medil_backend", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        encoding="utf-8",
        errors="replace",
        cwd=REPO,
        env={**os.environ, **(env or {})},
        **kw,
    )


@pytest.mark.parametrize("delay", [0.1, 0.3, 0.8, 1.5])  # 0.1 s: while the modules load
def test_ctrl_c_at_start_up(small_mri, tmp_path, delay):
    p = _medil(["reconstruct", small_mri, tmp_path / "o.nii.gz", "--spacing", "0.25", "--progress", "none"])
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode in (130, -signal.SIGINT), err
    assert "Traceback" not in err, err
    assert os.listdir(tmp_path) == [small_mri.name]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_termination_signals_leave_nothing(small_mri, tmp_path, model_dir, sig):
    """Signals at several points of a run (start-up, reading, the network, the write)."""
    for delay in (0.5, 1.5, 2.5, 4.0):
        out = tmp_path / "out" / "o.nii.gz"
        out.parent.mkdir(exist_ok=True)
        p = _medil(["reconstruct", small_mri, out, "--model", "tiny", "--spacing", "0.5", "--progress", "none"])
        time.sleep(delay)
        p.send_signal(sig)
        _, err = p.communicate(timeout=120)
        assert "Traceback" not in err, err
        left = os.listdir(out.parent)
        if "wrote" in err:  # finished before the signal (which may then end the exiting process)
            assert sorted(left) == ["o.json", "o.nii.gz"]  # the volume and its provenance sidecar
            assert np.isfinite(read_volume(out).array).all()
            out.unlink()
            out.with_name("o.json").unlink()
        else:
            assert p.returncode == 128 + sig, err
            assert left == [], left
            assert err.strip().splitlines()[-1].startswith("medil: interrupted"), err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_during_an_import_waits_for_the_import(tmp_path, sig):
    """torch's C++ start-up aborts the process (SIGABRT, no cleanup) when a signal handler raises
    inside it: a signal that comes while any module loads must end the run after the import."""
    (tmp_path / "slow_module.py").write_text(f"import os, signal, time\nos.kill(os.getpid(), {int(sig)})\ntime.sleep(0.3)\nLOADED = True\n")
    script = (
        "import sys, time\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "from medil_backend.cli import _install_signals\n"
        "_install_signals()\n"
        "try:\n"
        "    import slow_module\n"
        "    print('loaded', slow_module.LOADED, flush=True)\n"
        "    time.sleep(10)\n"
        "except KeyboardInterrupt as exc:\n"
        "    print('interrupted', type(exc).__name__, getattr(exc, 'signum', 2), flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60)
    expected = "KeyboardInterrupt" if sig == signal.SIGINT else "Interrupted"
    assert done.stdout.split("\n")[:2] == ["loaded True", f"interrupted {expected} {int(sig)}"], done.stdout + done.stderr
    assert done.returncode == 0, done.stderr


def test_signal_during_the_write_removes_the_part_file(tmp_path, monkeypatch):
    import medil_backend.io as io

    def interrupted(*a, **k):
        raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(io, "_write_nifti", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_volume(Volume(random_array((4, 4, 4)), np.eye(4)), tmp_path / "o.nii.gz")
    assert os.listdir(tmp_path) == []


class Anything:  # any class: unpickling it would run code from this module
    pass


@pytest.mark.train  # needs the train extra (Lightning, MONAI, TorchIO)
def test_train_refuses_a_pickled_checkpoint(tmp_path, capsys):
    import pickle

    bad = tmp_path / "evil.ckpt"
    bad.write_bytes(pickle.dumps({"state_dict": Anything()}))
    one_error_line(*run(["train", "--ckpt_path", bad], capsys)[::2], "load safely")
    one_error_line(*run(["train", f"--ckpt_path={tmp_path / 'missing.ckpt'}"], capsys)[::2], "does not exist")


def _checkpoint(tmp_path, hparams, state):
    import torch

    path = tmp_path / "run.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": hparams, "global_step": 1}, path)
    return path


def _recipe(tmp_path):
    import yaml

    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": {"model": TINY_CONFIG},
                "data": {"synthetic": 2},
                "trainer": {"callbacks": [{"class_path": "x.ExportWeights", "init_args": {"folder": str(tmp_path / "m"), "name": "t"}}]},
            }
        )
    )
    return cfg


@pytest.mark.train  # needs the train extra (Lightning, MONAI, TorchIO)
def test_export_refuses_a_checkpoint_of_another_network(tmp_path, capsys):
    import torch

    ckpt = _checkpoint(tmp_path, {"model": TINY_CONFIG}, {"net.nothing.weight": torch.zeros(3)})
    one_error_line(*run(["export", ckpt, "--config", _recipe(tmp_path)], capsys)[::2], "does not match")
    ckpt = _checkpoint(tmp_path, {"model": {"channels": [4, 8]}}, {})
    one_error_line(*run(["export", ckpt, "--config", _recipe(tmp_path)], capsys)[::2], "does not describe")


@pytest.mark.train  # needs the train extra (Lightning, MONAI, TorchIO)
def test_export_imports_nothing_a_checkpoint_names(tmp_path, capsys, monkeypatch):
    import torch

    marker = tmp_path / "ran"
    (tmp_path / "evilmod.py").write_text(f"open({str(marker)!r}, 'w').write('x')\ndef loss(a, b):\n    return 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ckpt = _checkpoint(tmp_path, {"model": TINY_CONFIG, "perceptual": "evilmod:loss"}, {"net.nothing": torch.zeros(1)})
    run(["export", ckpt, "--config", _recipe(tmp_path)], capsys)
    assert not marker.exists()


# -- hangs and waste -------------------------------------------------------------------------------


def test_fifo_input_refused_at_once(tmp_path, capsys):
    fifo = tmp_path / "pipe.nii"
    os.mkfifo(fifo)
    t0 = time.perf_counter()
    one_error_line(*run(["info", fifo], capsys)[::2], "not a regular file")
    assert time.perf_counter() - t0 < 60  # reading the pipe would block for ever: a hang, not speed


def _huge_declared_nifti(path, n=1200):
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((n, n, n))
    hdr.set_data_dtype(np.uint16)
    hdr.set_sform(np.eye(4), code=1)
    raw = hdr.binaryblock + b"\0" * 4 + b"\0" * (1 << 20)
    path.write_bytes(gzip.compress(raw))


def test_a_huge_declared_size_is_refused_before_reading(tmp_path, capsys):
    path = tmp_path / "huge.nii.gz"
    _huge_declared_nifti(path)
    t0 = time.process_time()  # refused before reading: this process's CPU seconds, whatever else runs on the machine
    one_error_line(*run(["reconstruct", path, tmp_path / "o.nii.gz"], capsys)[::2], "1200x1200x1200", "--max-memory")
    rc, out, err = run(["info", path, "--json"], capsys)
    assert rc == 0, err
    info = json.loads(out)
    assert info["shape"] == [1200, 1200, 1200] and info["intensity_range"] is None and "memory limit" in info["voxels_not_read"]
    assert time.process_time() - t0 < 10


def test_a_truncated_uncompressed_nifti_says_so(tmp_path, capsys):
    path = tmp_path / "cut.nii"
    nib.save(nib.Nifti1Image(random_array((20, 20, 20)), np.eye(4)), path)
    path.write_bytes(path.read_bytes()[:5000])
    one_error_line(*run(["info", path], capsys)[::2], "truncated")


# -- paths -------------------------------------------------------------------------------------------


def test_dangling_symlink_at_the_output_is_kept(small_mri, tmp_path, model_dir, capsys):
    out = tmp_path / "o.nii.gz"
    out.symlink_to(tmp_path / "nowhere.nii.gz")
    one_error_line(*run(["reconstruct", small_mri, out, "--model", "tiny"], capsys)[::2], "already exists")
    assert out.is_symlink()


def test_outputs_respect_the_umask_and_keep_a_replaced_files_mode(tmp_path):
    v = Volume(random_array((4, 4, 4)), np.eye(4))
    old = os.umask(0o022)
    try:
        write_volume(v, tmp_path / "a.nrrd")
        assert (tmp_path / "a.nrrd").stat().st_mode & 0o777 == 0o644
        os.chmod(tmp_path / "a.nrrd", 0o640)
        write_volume(v, tmp_path / "a.nrrd", overwrite=True)
        assert (tmp_path / "a.nrrd").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


# -- untrusted files -------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", ["/etc/passwd", "../tiny.safetensors", "sub/tiny.safetensors"])
def test_card_weights_must_lie_beside_the_card(model_dir, tmp_path, capsys, weights):
    card = json.loads((model_dir / "tiny.json").read_text())
    card["weights"] = weights
    (model_dir / "tiny.json").write_text(json.dumps(card))
    one_error_line(*run(["reconstruct", tmp_path / "x.nii.gz", tmp_path / "o.nii.gz", "--model", model_dir / "tiny.json"], capsys)[::2])


def test_card_without_sha256_refused(small_mri, model_dir, tmp_path, capsys):
    card = json.loads((model_dir / "tiny.json").read_text())
    del card["sha256"]
    (model_dir / "tiny.json").write_text(json.dumps(card))
    one_error_line(*run(["reconstruct", small_mri, tmp_path / "o.nii.gz", "--model", "tiny"], capsys)[::2], "sha256")


@pytest.mark.parametrize("kind", ["mhd", "nhdr"])
@pytest.mark.parametrize("where", ["absolute", "parent"])
def test_detached_data_outside_the_header_folder_refused(tmp_path, capsys, kind, where):
    secret = tmp_path / "secret.raw"
    secret.write_bytes(random_array((4, 4, 4)).tobytes())
    folder = tmp_path / "headers"
    folder.mkdir()
    name = str(secret) if where == "absolute" else "../secret.raw"
    if kind == "mhd":
        text = (
            f"ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementSpacing = 1 1 1\nElementType = MET_FLOAT\nElementDataFile = {name}\n"
        )
    else:
        text = f"NRRD0004\ntype: float\ndimension: 3\nsizes: 4 4 4\nspacings: 1 1 1\nendian: little\nencoding: raw\ndata file: {name}\n\n"
    header = folder / f"h.{kind}"
    header.write_text(text)
    one_error_line(*run(["reconstruct", header, tmp_path / "o.nrrd", "--dtype", "input"], capsys)[::2], "outside the header's folder")
    # beside the header it reads
    (folder / "secret.raw").write_bytes(secret.read_bytes())
    header.write_text(text.replace(name, "secret.raw"))
    assert read_volume(header).shape == (4, 4, 4)


# -- messages --------------------------------------------------------------------------------------


def test_itk_failures_read_as_one_line_without_source_lines(tmp_path, capsys):
    path = tmp_path / "bad.nrrd"
    path.write_text("NRRD0004\ntype: float\ndimension: 3\nsizes: 4 4\nencoding: raw\n\n")
    one_error_line(*run(["info", path], capsys)[::2], "cannot read")
    text = "Exception thrown in SimpleITK ImageFileWriter_Execute: /src/itkNrrdImageIO.cxx:1204:\nITK ERROR: NrrdImageIO(0x55d): Write: No space\n"
    assert ".cxx" not in library_message(RuntimeError(text)) and "\n" not in library_message(RuntimeError(text))


def test_a_truncated_header_is_not_called_too_large(tmp_path, capsys):
    path = tmp_path / "cut.nii.gz"
    nib.save(nib.Nifti1Image(random_array((8, 8, 8)), np.eye(4)), path)
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:200]))
    line = one_error_line(*run(["info", path], capsys)[::2])
    assert "too large" not in line


def test_library_warnings_do_not_precede_the_error_line(tmp_path, capsys):
    # a header nibabel warns about (bad qform), then refused for its values
    arr = np.full((6, 6, 6), np.nan)
    img = nib.Nifti1Image(arr, np.eye(4))
    img.header["qform_code"] = 1
    img.header["quatern_b"] = 5.0
    path = tmp_path / "warn.nii"
    nib.save(img, path)
    one_error_line(*run(["info", path], capsys)[::2], "no finite voxel")


# -- consistency -----------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_a_single_slice_is_2d_and_refused(tmp_path, capsys, suffix):
    path = tmp_path / f"slice{suffix}"
    write_volume(Volume(random_array((16, 16, 1)), np.eye(4)), path)
    one_error_line(*run(["info", path], capsys)[::2], "2D image")


def test_singleton_fourth_axis_of_mha_accepted(tmp_path):
    arr = random_array((5, 6, 7))
    img = sitk.GetImageFromArray(arr.transpose(2, 1, 0)[None], isVector=False)  # (t=1, k, j, i)
    img.SetSpacing((1.0, 2.0, 3.0, 1.0))
    sitk.WriteImage(img, str(tmp_path / "t.mha"))
    v = read_volume(tmp_path / "t.mha")
    np.testing.assert_array_equal(v.array, arr)
    np.testing.assert_allclose(v.grid.spacing, [1, 2, 3])
    assert read_grid(tmp_path / "t.mha").same_as(v.grid, atol=0)


# -- header fuzzing --------------------------------------------------------------------------------


def _nifti_mutant(rng, path):
    """A valid NIfTI whose stored header fields are then overwritten in place (as a broken writer would)."""
    arr = (rng.random((5, 4, 3)) * 200).astype(rng.choice([np.float32, np.int16, np.uint8, np.float64]))
    aff = np.eye(4)
    aff[:3, :3] = rotation(float(rng.uniform(0, 90)), int(rng.integers(3))) * rng.uniform(0.3, 3, 3)
    nib.save(nib.Nifti1Image(arr, aff), path)
    raw = bytearray(path.read_bytes())
    h = np.frombuffer(bytes(raw[:348]), dtype=nib.nifti1.header_dtype).copy()[0]
    for _ in range(int(rng.integers(1, 4))):
        choice = int(rng.integers(9))
        special = float(rng.choice([0.0, -1.0, 1e-9, 1e30, -1e30, np.nan, np.inf, 1e-300, 3.0, 1 + 1e-7, 1e7]))
        if choice == 0:
            h["pixdim"][int(rng.integers(1, 4))] = special
        elif choice in (1, 2, 3):
            h[("srow_x", "srow_y", "srow_z")[choice - 1]][int(rng.integers(4))] = special
        elif choice == 4:
            h["sform_code"] = int(rng.choice([0, 1, 2, 5]))
            h["qform_code"] = int(rng.choice([0, 1, 2]))
        elif choice == 5:
            h["quatern_" + "bcd"[int(rng.integers(3))]] = special
        elif choice == 6:
            h["scl_slope"], h["scl_inter"] = special, float(rng.choice([0.0, 1e30, np.nan]))
        elif choice == 7:
            h["dim"][int(rng.integers(0, 5))] = int(rng.choice([0, 1, 2, 4, 7, -3, 30000]))
        else:
            h["qoffset_" + "xyz"[int(rng.integers(3))]] = special
    raw[:348] = h.tobytes()
    if rng.random() < 0.2:  # a byte of the header flipped at random
        raw[int(rng.integers(40, 348))] ^= int(rng.integers(1, 256))
    path.write_bytes(bytes(raw))


def _nrrd_mutant(rng, path):
    sitk_img = sitk.GetImageFromArray((rng.random((3, 4, 5)) * 200).astype(rng.choice([np.float32, np.int16, np.uint8])))
    sitk_img.SetDirection(rotation(float(rng.uniform(0, 90)), int(rng.integers(3))).ravel().tolist())
    sitk.WriteImage(sitk_img, str(path), useCompression=bool(rng.random() < 0.5))
    data = path.read_bytes()
    head, sep, body = data.partition(b"\n\n")
    lines = head.decode("latin-1").split("\n")
    for _ in range(int(rng.integers(1, 3))):
        geometry = [n for n, ln in enumerate(lines) if ln.startswith(("space directions", "space origin", "sizes"))]
        i = int(rng.choice(geometry)) if rng.random() < 0.7 else int(rng.integers(1, len(lines)))
        key, _, value = lines[i].partition(":")
        pick = rng.choice(
            [
                "0",
                "-1",
                "1e30",
                "nan",
                "(1e30,0,0) (0,1,0) (0,0,1)",
                "(1,0,0) (1,0,0) (0,0,1)",
                "(1,0.3,0) (0,1,0) (0,0,1)",
                "(nan,0,0) (0,1,0) (0,0,1)",
                "(1e-300,0,0) (0,1,0) (0,0,1)",
                "(1,1e30,0)",
                "big",
                "double",
                "none",
                "5 4 3 2",
                "100000 100000 100000",
                value + value,
                "",
            ]
        )
        lines[i] = f"{key}: {pick}"
    path.write_bytes("\n".join(lines).encode("latin-1") + sep + body)


@pytest.mark.parametrize("kind", ["nifti", "nrrd"])
def test_header_fuzzing(tmp_path, model_dir, capsys, kind):
    """Mutated headers end in a correct output or one clean error line: never a traceback, a hang,
    a non-finite output, or a default grid other than the input's."""
    rng = np.random.default_rng(2026)
    outcomes = {"ok": 0, "refused": 0}
    for n in range(300):
        path = tmp_path / (f"m{n}.nii" if kind == "nifti" else f"m{n}.nrrd")
        (_nifti_mutant if kind == "nifti" else _nrrd_mutant)(rng, path)
        out = tmp_path / f"o{n}.nrrd"
        cpu, wall = time.process_time(), time.perf_counter()  # a hang, not speed (see the fuzz test of test_reliability)
        rc, _, err = run(["reconstruct", path, out, "--model", "tiny", "--progress", "none"], capsys)
        assert time.process_time() - cpu < 20 and time.perf_counter() - wall < 120, (n, err)
        if rc == 0:
            outcomes["ok"] += 1
            v, r = read_volume(path), read_volume(out)
            assert np.isfinite(r.array).all(), n
            assert r.grid.same_as(v.grid, atol=1e-4), (n, r.grid, v.grid)
        else:
            outcomes["refused"] += 1
            one_error_line(rc, err)
            assert not out.exists()
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [], n
    assert outcomes["ok"] > 10 and outcomes["refused"] > 10, outcomes


@pytest.mark.parametrize("dtype,itemsize", [(np.int16, 2), (np.uint8, 1), (np.float32, 4), (np.float64, 8)])
def test_declared_size_of_itk_files_uses_their_voxel_type(tmp_path, dtype, itemsize):
    from medil_backend.io import _declared

    path = tmp_path / "v.nrrd"
    write_volume(Volume(np.ones((5, 6, 7), dtype), np.eye(4)), path, dtype=dtype)
    assert _declared(path) == ((5, 6, 7), itemsize)
