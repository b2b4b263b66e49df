"""The `medil` command: the main job, --like exactness across formats, and every error path."""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from conftest import EXAMPLE, REPO, shared

from medil_backend.cli import main
from medil_backend.geometry import Volume
from medil_backend.io import read_volume, write_volume


def run(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_user_error(rc, err, *fragments):
    assert rc == 1
    assert "Traceback" not in err
    lines = [
        ln for ln in err.strip().splitlines() if ln and not ln.startswith(("medil: note:", "medil: warning:"))
    ]  # MedIL's own notes may precede
    assert len(lines) == 1 and lines[0].startswith("medil: error:"), err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def test_reconstruct_spacing(small_mri, tmp_path, model_dir, capsys):
    out = tmp_path / "out.nii.gz"
    rc, _, err = run(["reconstruct", small_mri, out, "--model", "tiny", "--spacing", "1.5", "--progress", "none"], capsys)
    assert rc == 0, err
    v, r = read_volume(small_mri), read_volume(out)
    np.testing.assert_allclose(r.grid.spacing, 1.5, atol=1e-5)
    assert r.grid.orientation_code == v.grid.orientation_code
    # covers the input's extent, centred on it
    lo_in, hi_in = v.grid.extent()
    lo, hi = r.grid.extent()
    assert np.all(lo <= lo_in + 1e-4) and np.all(hi >= hi_in - 1e-4)
    np.testing.assert_allclose((lo + hi) / 2, (lo_in + hi_in) / 2, atol=1e-4)
    assert r.array.dtype == np.float32 and np.isfinite(r.array).all()


@pytest.mark.parametrize(
    "in_fmt,ref_fmt,out_fmt", [(".nii.gz", ".nrrd", ".mha"), (".nrrd", ".nii.gz", ".nrrd"), (".mha", ".mha", ".nii.gz")]
)
def test_like_is_exact_across_formats(small_mri, tmp_path, model_dir, capsys, in_fmt, ref_fmt, out_fmt):
    v = read_volume(small_mri)
    src = tmp_path / f"in{in_fmt}"
    write_volume(v, src, dtype=v.array.dtype)
    # an oblique, flipped reference on another grid
    a = np.deg2rad(20)
    rot = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]]) @ np.diag([-1.0, 1, -1])
    aff = np.eye(4)
    aff[:3, :3] = rot * [1.7, 2.1, 1.3]
    aff[:3, 3] = v.grid.edge_corners().mean(0) + [1.25, -2.5, 0.75]
    ref = tmp_path / f"ref{ref_fmt}"
    write_volume(Volume(np.zeros((21, 17, 19), np.float32), aff), ref)
    out = tmp_path / f"out{out_fmt}"
    rc, _, err = run(["reconstruct", src, out, "--model", "tiny", "--like", ref, "--progress", "none"], capsys)
    assert rc == 0, err
    r, g = read_volume(out).grid, read_volume(ref).grid
    assert r.shape == g.shape
    np.testing.assert_allclose(r.spacing, g.spacing, atol=1e-5)
    np.testing.assert_allclose(r.direction, g.direction, atol=1e-5)
    np.testing.assert_allclose(r.origin, g.origin, atol=1e-5)


def test_dtype_input_and_overwrite(small_mri, tmp_path, model_dir, capsys):
    out = tmp_path / "out.nrrd"
    assert run(["reconstruct", small_mri, out, "--model", "tiny", "--progress", "none"], capsys)[0] == 0
    rc, _, err = run(["reconstruct", small_mri, out, "--model", "tiny", "--dtype", "input", "--overwrite", "--progress", "json"], capsys)
    assert rc == 0, err
    assert read_volume(out).array.dtype == np.int16


def test_json_progress_lines(small_mri, tmp_path, model_dir, capsys):
    rc, out, _ = run(["reconstruct", small_mri, tmp_path / "o.nii", "--model", "tiny", "--progress", "json"], capsys)
    assert rc == 0
    msgs = [json.loads(line) for line in out.strip().splitlines()]
    assert msgs[0]["progress"] == 0.0 and msgs[-1]["done"] is True
    assert all(0 <= m["progress"] <= 1 for m in msgs[:-1])


def test_info_and_models(small_mri, model_dir, capsys):
    rc, out, _ = run(["info", small_mri, "--json"], capsys)
    info = json.loads(out)
    assert rc == 0 and info["shape"] == [32, 30, 24] and info["orientation"] == "LSA" and info["modality_guess"] == "mri"
    np.testing.assert_allclose(info["spacing_mm"], [2, 2, 3])
    rc, out, _ = run(["models", "--json"], capsys)
    names = {m["name"]: m for m in json.loads(out)}
    assert rc == 0 and names["tiny"]["source"] == "user"


# -- error paths: one line, exit 1, no traceback, no output ------------------------------------------------


def _bad_inputs(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((5, 6), np.float32), np.eye(4)), tmp_path / "flat.nii")
    nib.save(nib.Nifti1Image(np.zeros((5, 6, 7, 2), np.float32), np.eye(4)), tmp_path / "series.nii")
    nan = np.full((6, 6, 6), np.nan, np.float32)  # NaN outside a field of view is background; a volume of NaN is refused
    nib.save(nib.Nifti1Image(nan, np.eye(4)), tmp_path / "nan.nii")
    nib.save(nib.Nifti1Image(np.zeros((6, 6, 6), np.float32), np.eye(4)), tmp_path / "empty.nii")
    (tmp_path / "corrupt.nii.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    img = nib.Nifti1Image(np.ones((6, 6, 6), np.float32), None)
    img.header["pixdim"][1:4] = [0.0, 1.0, 1.0]
    nib.save(img, tmp_path / "zero_spacing.nii")
    import SimpleITK as sitk

    path = tmp_path / "nan_spacing.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((6, 6, 6), np.float32)), str(path))
    header, _, body = path.read_bytes().partition(b"\n\n")
    lines = [ln for ln in header.split(b"\n") if not ln.startswith(b"space directions")]
    path.write_bytes(b"\n".join(lines + [b"space directions: (nan,0,0) (0,1,0) (0,0,1)"]) + b"\n\n" + body)


BAD = [
    ("missing.nii.gz", [], ["does not exist"]),
    ("corrupt.nii.gz", [], ["cannot read"]),
    ("flat.nii", [], ["2D"]),
    ("series.nii", [], ["pick one volume"]),
    ("nan.nii", [], ["no finite voxel"]),
    ("empty.nii", [], ["empty"]),
    ("zero_spacing.nii", [], ["spacing"]),
    ("nan_spacing.nrrd", [], ["spacing"]),
    (None, ["--model", "no-such-model"], ["unknown model", "medil models"]),
    (None, ["--spacing", "0.01", "--max-memory", "0.05"], ["over the memory limit", "--max-memory"]),
    (None, ["--spacing", "1", "2"], ["one value", "three"]),
    (None, ["--spacing", "-1"], ["positive"]),
    (None, ["--max-memory", "0"], ["--max-memory", "positive"]),
    (None, ["--orientation", "XYZ"], ["orientation code"]),
    (None, ["--like", "LIKE", "--spacing", "1"], ["--like"]),
    (None, ["--fov", "0", "-1", "0", "1", "0", "1"], ["empty"]),
    (None, ["--modality", "ct", "--device", "tpu"], ["device"]),
]


@pytest.mark.parametrize("name,extra,fragments", BAD, ids=[f"{n or ''}{' '.join(e)}" for n, e, _ in BAD])
def test_error_paths(small_mri, tmp_path, model_dir, capsys, name, extra, fragments):
    _bad_inputs(tmp_path)
    src = small_mri if name is None else tmp_path / name
    extra = [str(small_mri) if e == "LIKE" else e for e in extra]
    if "--model" not in extra:
        extra += ["--model", "tiny"]
    out = tmp_path / "result.nii.gz"
    before = set(os.listdir(tmp_path))
    rc, _, err = run(["reconstruct", src, out, "--progress", "none", *extra], capsys)
    assert_user_error(rc, err, *fragments)
    assert set(os.listdir(tmp_path)) == before  # nothing written, no temporary left


def test_existing_output_is_kept(small_mri, tmp_path, model_dir, capsys):
    out = tmp_path / "exists.nii.gz"
    out.write_bytes(b"precious")
    rc, _, err = run(["reconstruct", small_mri, out, "--model", "tiny"], capsys)
    assert_user_error(rc, err, "already exists", "--overwrite")
    assert out.read_bytes() == b"precious"


def test_missing_output_folder(small_mri, tmp_path, model_dir, capsys):
    rc, _, err = run(["reconstruct", small_mri, tmp_path / "no" / "out.nii.gz", "--model", "tiny"], capsys)
    assert_user_error(rc, err, "does not exist", "create it")


def test_pickle_checkpoint_refused(small_mri, tmp_path, capsys):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x04pickle")
    rc, _, err = run(["reconstruct", small_mri, tmp_path / "o.nii", "--model", ckpt], capsys)
    assert_user_error(rc, err, "pickle")


def test_tampered_weights_refused(small_mri, tmp_path, model_dir, capsys):
    w = model_dir / "tiny.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    rc, _, err = run(["reconstruct", small_mri, tmp_path / "o.nii", "--model", "tiny"], capsys)
    assert_user_error(rc, err, "sha256")


def test_subprocess_exit_status_and_no_traceback(tmp_path):
    """The installed entry point, as a user runs it."""
    proc = subprocess.run(
        [sys.executable, "-m", "medil_backend", "reconstruct", str(tmp_path / "nope.nii.gz"), str(tmp_path / "o.nii.gz")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "does not exist" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "medil_backend", "reconstruct"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_bundled_model_on_real_thick_slices(tmp_path, capsys):
    """The default bundled model reconstructs a real held-out scan (cropped to keep the test quick)."""
    v = read_volume(shared("mri/clinical_t1c_thick_0p78x0p78x6p5mm.nrrd"))
    crop = Volume(np.ascontiguousarray(v.array[100:140, 100:140, 8:16]), v.grid.sub_grid((100, 100, 8), (140, 140, 16)).affine)
    src = tmp_path / "crop.nrrd"
    write_volume(crop, src, dtype=crop.array.dtype)
    out = tmp_path / "sr.nii.gz"
    rc, _, err = run(["reconstruct", src, out, "--spacing", "0.78125", "0.78125", "1.625", "--progress", "none"], capsys)
    assert rc == 0, err
    r = read_volume(out)
    assert r.shape == (40, 40, 32)
    assert np.isfinite(r.array).all() and 0.2 < r.array.mean() / crop.array.mean() < 5


def test_default_model_follows_the_modality(tmp_path, capsys):
    """Without --model, a CT scan is reconstructed by medil-ct and an MRI by medil-brain-t1."""
    v = read_volume(shared("ct/head_ct_0p96x0p96x1p5mm.nrrd"))
    crop = Volume(np.ascontiguousarray(v.array[40:72, 112:144, 50:66]), v.grid.sub_grid((40, 112, 50), (72, 144, 66)).affine)
    src = tmp_path / "ct.nrrd"
    write_volume(crop, src, dtype=crop.array.dtype)
    rc, out, err = run(["reconstruct", src, tmp_path / "ct.nii.gz", "--progress", "json"], capsys)
    assert rc == 0, err
    assert json.loads(out.strip().splitlines()[-1])["model"] == "medil-ct"
    rc, out, err = run(["reconstruct", src, tmp_path / "as-mri.nii.gz", "--modality", "mri", "--progress", "json"], capsys)
    assert rc == 0 and json.loads(out.strip().splitlines()[-1])["model"] == "medil-brain-t1"


@pytest.mark.parametrize(
    "name", ["medil-brain-t1", "medil-ct", "medil-interp-brain-t1", pytest.param("conv-baseline-brain-t1", marks=pytest.mark.train)]
)
def test_bundled_model_cards_say_how_they_were_made(name):
    """Each bundled model: <= 50 MB, card with recipe, data manifest (sha256), time, hardware and held-out metrics."""
    from medil_backend.models import find_model, load_model

    entry = find_model(name)
    assert entry.source == "bundled" and entry.weights_path.stat().st_size <= 50 * 2**20
    card = load_model(name).card
    training = card["training"]
    assert training["reproduce"].startswith("medil train --config training/configs/cpu/")
    assert (REPO / training["reproduce"].split("--config ")[1]).exists()
    assert training["minutes"] > 0 and training["steps_done"] > 0 and training["hardware"]
    assert all(len(f["sha256"]) == 64 for f in training["data"]["train"])
    held = card["metrics"]["held_out"]
    assert held["command"].startswith("medil evaluate") and {"recon", "sr4mm", "sr8mm"} <= set(held["mean"])
    assert card["latent"]["spacing_mm"] <= 2.0 and card["latent"]["channels"] >= 8


def test_backend_errors_reach_the_panel_in_its_own_words(tmp_path):
    """The core names settings, the CLI adds its flags on stderr, and the panel gets the core's words plus its field names."""
    import sys

    sys.path.insert(0, str(REPO / "MedILSlicer"))
    from MedILSlicerLib.jobs import BackendJob

    job = BackendJob(
        ["reconstruct", str(EXAMPLE), str(tmp_path / "o.nii.gz"), "--spacing", "0.05", "--max-memory", "0.3", "--progress", "json"]
    )
    job.start()
    job.process.wait(timeout=120)
    for t in job._threads:
        t.join(timeout=10)
    assert job.process.returncode == 1
    message = job.error_message()
    assert "memory limit" in message and "--" not in message
    assert "(panel: Memory limit" in message and message.endswith(")")
    assert any(line.startswith("medil: error:") and "(--max-memory" in line for line in job.stderr_lines)
    assert not (tmp_path / "o.nii.gz").exists()


def test_outputs_say_they_are_ai_generated(small_mri, tmp_path, model_dir, capsys):
    out = tmp_path / "o.nrrd"
    rc, _, err = run(["reconstruct", small_mri, out, "--model", "tiny", "--progress", "none"], capsys)
    assert rc == 0, err
    side = json.loads((tmp_path / "o.json").read_text())
    assert side["AIGenerated"] and side["model"] == "tiny" and len(side["model_sha256"]) == 64 and side["input"] == "small.nii.gz"
    # an existing sidecar is never replaced without --overwrite, and is checked before any work
    (tmp_path / "p.json").write_text("mine")
    rc, _, err = run(["reconstruct", small_mri, tmp_path / "p.nii.gz", "--model", "tiny", "--progress", "none"], capsys)
    assert rc == 1 and "p.json already exists" in err and (tmp_path / "p.json").read_text() == "mine"


def test_every_measured_table_in_the_documents_is_what_the_results_render():
    """README.md, SECURITY.md and docs/: each marked section equals what benchmarks/readme_tables.py renders from
    benchmarks/results/*.json (no figure typed in by hand, no result left unrendered)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "readme_tables.py"), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
