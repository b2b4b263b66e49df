"""`medil superres --method fast`: B-spline, then data consistency through the input's own acquisition operator."""

import sys

import numpy as np
import pytest
from conftest import DATA, EXAMPLE, REPO

from medil_backend.acquisition import thick_slices
from medil_backend.cli import main
from medil_backend.errors import MedILError
from medil_backend.geometry import Grid, Volume
from medil_backend.io import read_volume, write_volume
from medil_backend.ops.superres import default_grid, superres


def run(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def thick_crop():
    """A real MRI crop (the bundled example, 2 x 2 x 3 mm) and its 2-slice average along the finest axis (4 mm)."""
    v = read_volume(EXAMPLE)
    lo, hi = (30, 30, 14), (90, 86, 50)
    hr = Volume(
        np.ascontiguousarray(v.array[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]).astype(np.float32), v.grid.sub_grid(lo, hi).affine
    )
    axis = int(np.argmin(hr.grid.spacing))
    arr, grid = thick_slices(hr.array, hr.grid, axis, 2)
    return hr, Volume(arr, grid.affine, modality="mri")


def test_data_consistency_reproduces_the_input_and_beats_bspline(thick_crop):
    from medil_backend.baselines import resample_sitk
    from medil_backend.metrics import psnr

    hr, thick = thick_crop
    out = superres(thick, hr.grid)
    assert out.grid.same_as(hr.grid, atol=0)
    m = out.meta
    assert m["consistency_residual_after"] < 0.5 * m["consistency_residual_before"], m
    bspline = resample_sitk(thick, hr.grid, "bspline").array
    rng = float(hr.array.max())
    assert psnr(out.array / rng, hr.array / rng) > psnr(bspline / rng, hr.array / rng)
    assert np.isfinite(out.array).all()
    none = superres(thick, hr.grid, iterations=0)  # no data consistency: the B-spline interpolant itself,
    np.testing.assert_allclose(none.array, np.maximum(bspline, 0), atol=1e-4)  # never below 0 for an MR magnitude
    assert bspline.min() < 0 and out.array.min() >= 0


def test_default_grid_is_isotropic_at_the_finest_spacing(thick_crop):
    _, thick = thick_crop
    g = default_grid(thick.grid)
    np.testing.assert_allclose(g.spacing, thick.grid.spacing.min())
    np.testing.assert_allclose(g.direction, thick.grid.direction, atol=1e-12)


def test_cli_like_is_exact_and_errors_are_one_line(thick_crop, tmp_path, capsys):
    hr, thick = thick_crop
    src, ref, out = tmp_path / "thick.nrrd", tmp_path / "ref.nii.gz", tmp_path / "sr.nii.gz"
    write_volume(thick, src)
    write_volume(hr, ref)
    rc, _, err = run(["superres", src, out, "--like", ref, "--method", "fast", "--progress", "none"], capsys)
    assert rc == 0, err
    assert read_volume(out).grid.same_as(read_volume(ref).grid, atol=1e-5)
    for extra, fragment in [
        (["--spacing", "9"], "not finer than the input's slices"),
        (["--slice-thickness", "-2"], "slice thickness must be"),
        (["--max-memory", "0.001"], "memory limit"),
    ]:
        rc, _, err = run(["superres", src, tmp_path / "x.nii.gz", "--method", "fast", *extra, "--progress", "none"], capsys)
        lines = err.strip().splitlines()
        assert rc == 1 and len(lines) == 1 and fragment in lines[0], err
    iso = tmp_path / "iso.nii.gz"
    write_volume(Volume(hr.array[:, :, :20], np.diag([1.1, 1.1, 1.0, 1.0])), iso)
    rc, _, err = run(["superres", iso, tmp_path / "x.nii.gz", "--progress", "none"], capsys)
    assert rc == 1 and "nothing to super-resolve" in err
    assert not (tmp_path / "x.nii.gz").exists()


def test_api_refuses_unknown_methods():
    v = Volume(np.ones((8, 8, 3), np.float32), Grid.from_parts((8, 8, 3), [1, 1, 4]).affine)
    with pytest.raises(MedILError, match="not available"):
        superres(v, method="dream")


def test_slice_axis_is_the_thickest_axis_the_output_refines():
    from medil_backend.ops.superres import slice_axis

    g = Grid.from_parts((40, 8, 6), [0.8, 3.9, 6.5])
    assert slice_axis(g) == 2
    assert slice_axis(g, Grid.from_parts((40, 39, 6), [0.8, 0.8, 6.5])) == 1
    with pytest.raises(MedILError, match="not finer"):
        slice_axis(g, Grid.from_parts((40, 8, 6), [0.8, 3.9, 6.5]))


def test_adapt_learns_on_the_scan_and_its_uncertainty_is_on_the_output_grid(thick_crop):
    from medil_backend.baselines import resample_sitk
    from medil_backend.metrics import psnr

    hr, thick = thick_crop
    out = superres(thick, hr.grid, method="adapt", samples=2, time_budget_min=0.5, seed=3)
    for run_info in out.meta["adaptation"]:
        assert run_info["steps"] > 10 and run_info["l1_last"] < run_info["l1_first"], run_info
    unc = out.extras["uncertainty"]
    assert unc.grid.same_as(hr.grid, atol=0) and out.grid.same_as(hr.grid, atol=0)
    assert np.isfinite(unc.array).all() and unc.array.min() >= 0 and unc.array.max() > 0
    assert out.meta["consistency_residual_after"] < out.meta["consistency_residual_before"]
    rng = float(hr.array.max())
    bspline = resample_sitk(thick, hr.grid, "bspline").array
    assert psnr(out.array / rng, hr.array / rng) > psnr(bspline / rng, hr.array / rng)


def test_cli_samples_and_uncertainty(thick_crop, tmp_path, capsys):
    hr, thick = thick_crop
    src, out, unc = tmp_path / "thick.nii.gz", tmp_path / "sr.nrrd", tmp_path / "sd.nrrd"
    write_volume(thick, src)
    rc, _, err = run(
        ["superres", src, out, "--spacing", 2, "--samples", 2, "--uncertainty", unc, "--time-budget", 0.2, "--progress", "none"], capsys
    )
    assert rc == 0, err
    assert read_volume(unc).grid.same_as(read_volume(out).grid, atol=1e-5)
    for extra, fragment in [
        (["--uncertainty", tmp_path / "u.nrrd"], "--samples"),
        (["--method", "fast", "--samples", "3"], "deterministic"),
        (["--time-budget", "-1"], "time budget"),  # (0 is the quick setting: the pre-trained network alone)
    ]:
        rc, _, err = run(["superres", src, tmp_path / "x.nrrd", *extra, "--progress", "none"], capsys)
        lines = err.strip().splitlines()
        assert rc == 1 and len(lines) == 1 and fragment in lines[0], err
    assert not (tmp_path / "x.nrrd").exists() and not (tmp_path / "u.nrrd").exists()


def test_evaluate_scores_superres_against_bspline(thick_crop, tmp_path, capsys):
    import json

    hr, _ = thick_crop
    path = tmp_path / "hr.nii.gz"
    write_volume(hr, path)
    rc, out, err = run(["evaluate", path, "--superres", "fast", "--thick", "4", "--json", tmp_path / "e.json"], capsys)
    assert rc == 0, err
    assert "superres-fast" in out and "mean gain" in out
    rows = json.loads((tmp_path / "e.json").read_text())["volumes"]["hr.nii.gz"]["sr4mm"]
    assert rows["superres-fast"]["psnr_mask"] > rows["bspline"]["psnr_mask"]


def test_evaluate_scores_a_generative_method_through_the_chosen_diffusion_model(thick_crop, tmp_path, capsys, sampler_dir):
    """--superres-model: inverse and cycles are scored through that model (recorded in the report)."""
    import json

    hr, _ = thick_crop
    path = tmp_path / "hr.nii.gz"
    write_volume(hr, path)
    report = tmp_path / "e.json"
    argv = ["evaluate", path, "--superres", "cycles", "--superres-model", "tiny-ldm", "--thick", "4", "--json", report]
    rc, _, err = run(argv, capsys)
    assert rc == 0, err
    result = json.loads(report.read_text())
    assert result["superres_model"] == "tiny-ldm" and "superres-cycles" in result["volumes"]["hr.nii.gz"]["sr4mm"]
    rc, _, err = run([*argv[:5], "no-such-ldm", *argv[6:], "--overwrite"], capsys)
    assert rc == 1 and "no-such-ldm" in err, err


def test_evaluate_scores_only_where_the_thick_input_reaches(monkeypatch):
    """The simulated thick slices leave out a last partial slab (here 2 of 18 voxels along the finest axis), which
    super-resolution fills with background, as outside any input, and SimpleITK with the nearest slab: every method
    is scored inside the input's coverage only, so that no method wins or loses on voxels no input measured."""
    from medil_backend import evaluate as ev

    rng = np.random.default_rng(0)
    arr = rng.random((18, 20, 22)).astype(np.float32) + 1.0
    grid = Grid.from_parts(arr.shape, [1.0, 1.5, 1.5])
    masks = []
    monkeypatch.setattr(ev, "read_volume", lambda path: Volume(arr.copy(), grid.affine, modality="mri"))
    monkeypatch.setattr(ev, "foreground_mask", lambda ref, modality: np.ones(ref.shape, bool))
    monkeypatch.setattr(ev, "score", lambda pred, ref, mask: masks.append(mask.copy()) or {"psnr_mask": 0.0})
    ev.evaluate(["x.nii.gz"], {}, thick_mm=(4.0,), baselines=("bspline",), superres_methods=("fast",))
    recon, bspline, fast = masks
    assert recon.all()
    for mask in (bspline, fast):
        assert mask[:16].all() and not mask[16:].any()  # 4 slabs of 4 mm cover 16 of the 18 voxels


def test_the_method_lists_agree():
    """The backend's methods, the CLI's choices and the Slicer panel's list are the same methods, `adapt` the default."""
    from medil_backend.cli import build_parser
    from medil_backend.ops.superres import METHODS

    sys.path.insert(0, str(REPO / "MedILSlicer"))
    from MedILSlicerLib.tasks import SUPERRES_METHODS

    action = next(a for a in build_parser()._subparsers._group_actions[0].choices["superres"]._actions if a.dest == "method")
    assert set(action.choices) == set(METHODS) == set(SUPERRES_METHODS)
    assert action.default == SUPERRES_METHODS[0] == "adapt"


def test_adapt_prior_pretrains_exports_and_is_checked_on_load(tmp_path, monkeypatch):
    """The adaptation network's starting weights: pre-trained on a pack's volumes, exported with their sha256,
    loaded by `adapt` for the volume's modality, refused once the weights no longer match their card."""
    import json

    from conftest import shared

    import medil_backend.ops.adapt as adapt
    from medil_backend.training.adapt_prior import PriorData, export_prior, pretrain
    from medil_backend.training.pack import write_pack

    colin = read_volume(shared("mri/colin27_t1_1mm.nii.gz"))
    crop = Volume(colin.array[40:100, 60:120, 50:90].astype(np.float32), colin.grid.sub_grid((40, 60, 50), (100, 120, 90)).affine, "mri")
    write_pack([("colin-crop", crop, "0" * 64)], tmp_path / "train.npz", crop=False)
    data = PriorData([str(tmp_path / "train.npz")], "mri")
    net, card = pretrain(data, minutes=0.05, log=lambda s: None)
    assert card["training"]["steps"] > 0 and card["data"][0]["name"] == "colin-crop"
    with pytest.raises(MedILError, match="no CT volume"):
        pretrain(PriorData([str(tmp_path / "train.npz")], "ct"), minutes=0.01)
    with pytest.raises(MedILError, match="positive number of minutes"):
        pretrain(data, minutes=0)
    monkeypatch.setattr(adapt, "PRIOR_DIR", tmp_path / "prior")
    assert adapt.load_prior("mri") is None  # none bundled: adapt starts from scratch
    export_prior(net, card, tmp_path / "prior")
    state = adapt.load_prior("mri")
    fresh = adapt.ResidualCNN2d()
    fresh.load_state_dict(state)
    assert all(np.array_equal(a.numpy(), b.detach().numpy()) for a, b in zip(fresh.state_dict().values(), net.state_dict().values()))
    card = json.loads((tmp_path / "prior" / "prior-mri.json").read_text())
    assert card["modality"] == "mri" and set(card["use"]) == {"one_stack", "several_stacks"}  # how they are used, on the card
    weights = tmp_path / "prior" / "prior-mri.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(MedILError, match="sha256"):
        adapt.load_prior("mri")
    weights.unlink()  # a card without its weights: a clear refusal, no traceback
    with pytest.raises(MedILError, match="does not exist"):
        adapt.load_prior("mri")


def test_adapt_prior_goes_on_from_its_export_with_made_heads_and_checkpoints(tmp_path, monkeypatch, capsys):
    """The longer recipe: volumes from files and new heads made from a real head, a checkpoint every refresh, and a
    second run that goes on from the export, its card counting the first run's steps and naming its weights."""
    from conftest import shared

    import medil_backend.training.adapt_prior as prior
    from medil_backend.models.cards import sha256_file

    monkeypatch.setattr(prior, "POOL", 2)
    monkeypatch.setattr(prior, "REFRESH_STEPS", 3)
    colin = read_volume(shared("mri/colin27_t1_1mm.nii.gz"))
    crop = Volume(colin.array[40:100, 60:120, 50:90].astype(np.float32), colin.grid.sub_grid((40, 60, 50), (100, 120, 90)).affine, "mri")
    write_volume(crop, tmp_path / "crop.nii.gz")
    data = prior.PriorData(files=[str(tmp_path / "crop.nii.gz")], heads=[str(shared("mri/colin27_t1_1mm.nii.gz"))], head_share=0.5)
    saved = []
    net, card = prior.pretrain(
        data, minutes=0.15, seed=1, log=lambda s: None, checkpoint=lambda n, c: saved.append(c), checkpoint_minutes=0
    )
    assert saved and saved[-1]["training"]["steps"] <= card["training"]["steps"]
    assert card["data"] == [{"name": "crop.nii.gz", "sha256": sha256_file(tmp_path / "crop.nii.gz")}]
    assert card["heads"]["made"] >= 1 and card["heads"]["sources"][0]["file"] == "colin27_t1_1mm.nii.gz"
    assert card["training"]["continued_from_sha256"] is None and card["training"]["total_steps"] == card["training"]["steps"]
    first = prior.export_prior(net, card, tmp_path / "out").with_suffix(".safetensors")
    net2, card2 = prior.pretrain(prior.PriorData(files=[str(tmp_path / "crop.nii.gz")]), minutes=0.03, init=first, log=lambda s: None)
    t = card2["training"]
    assert t["continued_from_sha256"] == sha256_file(first) and t["total_steps"] == card["training"]["steps"] + t["steps"]
    assert t["total_minutes"] > card["training"]["minutes"]
    assert prior.main(["--minutes", "1", "--out", str(tmp_path / "none")]) == 2  # no training volumes: a clear refusal
    assert "--pack, --file or --heads" in capsys.readouterr().err and not (tmp_path / "none").exists()


def test_degradation_with_a_gap_keeps_flat_signal_and_differs_from_contiguous_slices():
    """Slices 2 mm wide every 4 mm: a signal flat along the axis comes back as it was (each profile integrates to
    one), and a varying one differs from contiguous 4 mm slices (the gap loses what lies between)."""
    from medil_backend.ops.adapt import _degraded_in_plane

    grid = Grid.from_parts((64, 24, 24), (1.0, 1.0, 1.0), np.eye(3), (0.0, 0.0, 0.0))
    flat = np.ones(grid.shape, np.float32)
    flat[:, :12] = 2.0
    out = _degraded_in_plane(flat, grid, 0, 2.0, "rect", spacing=4.0)
    assert np.allclose(out[8:-8], flat[8:-8], atol=1e-3)
    ramp = np.sin(np.arange(64) / 2.3).astype(np.float32)[:, None, None] * np.ones(grid.shape, np.float32)
    gap = _degraded_in_plane(ramp, grid, 0, 2.0, "rect", spacing=4.0)
    contiguous = _degraded_in_plane(ramp, grid, 0, 4.0, "rect")
    assert gap.shape == contiguous.shape == grid.shape
    assert np.abs(gap - contiguous)[8:-8].mean() > 0.02


@pytest.mark.skipif(not (REPO / "medil_backend" / "weights" / "adapt" / "prior-mri.json").is_file(), reason="no bundled MRI prior")
def _thick_head_ct() -> Volume:
    """A crop of the held-out head CT (0.96 x 0.96 x 1.5 mm) averaged into 4.5 mm slices."""
    v = read_volume(DATA / "ct" / "head_ct_0p96x0p96x1p5mm.nrrd")
    lo = np.asarray(v.array.shape) // 2 - (40, 40, 12)
    hi = lo + (80, 80, 24)
    arr = np.ascontiguousarray(v.array[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]).astype(np.float32)
    arr, grid = thick_slices(arr, v.grid.sub_grid(tuple(lo), tuple(hi)), int(np.argmax(v.grid.spacing)), 3)
    return Volume(arr, grid.affine, modality="ct")


@pytest.mark.parametrize("modality", ["mri", "ct"])
def test_the_bundled_prior_starts_adaptation_ahead_of_scratch(thick_crop, modality):
    """On a held-out scan, the network started from the bundled prior undoes the scan's own in-plane degradation
    better, over the same first steps, than one started from scratch."""
    from medil_backend.intensity import fit_normalizer
    from medil_backend.ops.adapt import load_prior, train_adapter

    thick = thick_crop[1] if modality == "mri" else _thick_head_ct()
    yn = fit_normalizer(thick.array, modality).forward(thick.array).astype(np.float32)
    axis = int(np.argmax(thick.grid.spacing))
    runs = {}
    for name, init in [("scratch", None), ("prior", load_prior(modality))]:
        _, info = train_adapter([(yn, thick.grid, axis, float(thick.grid.spacing[axis]))], "rect", 60.0, 0, init=init, max_steps=30)
        runs[name] = info
    assert runs["prior"]["prior"] and not runs["scratch"]["prior"]
    assert runs["prior"]["l1_first"] < 0.95 * runs["scratch"]["l1_first"], runs  # scratch starts as B-spline (identity)
    assert runs["prior"]["l1_last"] < runs["scratch"]["l1_last"], runs


def test_adapt_applies_through_plane_in_both_orientations_with_its_mirror_images():
    """A scan with 0.8 mm rows, 6.5 mm columns and simulated 4 mm slices: the network runs on both kinds of plane
    that contain the slice axis (slices x rows, slices x columns), each with its mirror images, and the output is
    their average; an untrained (identity) network returns the B-spline interpolant exactly."""
    import torch

    from medil_backend.ops.adapt import MIRRORS, ResidualCNN2d, _bspline, _planes, apply_adapter, refined_along

    rng = np.random.default_rng(0)
    grid = Grid.from_parts((40, 10, 20), [0.8, 4.0, 6.5])
    x = rng.random((40, 10, 20)).astype(np.float32)
    fine = refined_along(grid, 1, 4)
    u = _bspline(x, grid, fine)
    np.testing.assert_allclose(apply_adapter(ResidualCNN2d(), x, grid, fine, 1), u, atol=1e-6)
    torch.manual_seed(0)
    net = ResidualCNN2d().eval()
    for param in net.body[-1].parameters():
        torch.nn.init.normal_(param, std=0.05)  # no longer the identity
    expected = np.zeros_like(u)
    with torch.no_grad():
        for cols in (0, 2):  # (slices, rows) and (slices, columns) planes, stacked along the other axis, and back
            planes = torch.from_numpy(_planes(u, 1, cols))
            pred = sum(net(planes.flip(f)).flip(f) if f else net(planes) for f in MIRRORS[4]) / 4
            expected += np.transpose(pred[:, 0].numpy(), np.argsort((3 - 1 - cols, 1, cols)))
    out = apply_adapter(net, x, grid, fine, 1, mirrors=4)
    assert np.abs(out - u).max() > 1e-3  # the network changes the interpolant
    np.testing.assert_allclose(out, expected / 2, atol=1e-5)


def test_adapt_with_no_time_budget_runs_the_pretrained_network_alone(small_mri, tmp_path, capsys):
    """--time-budget 0: the quick setting (no test-time steps, the bundled prior alone), deterministic."""
    v = read_volume(small_mri)
    a = superres(v, None, method="adapt", time_budget_min=0)
    b = superres(v, None, method="adapt", time_budget_min=0)
    assert a.meta["adaptation"][0]["steps"] == 0 and np.array_equal(a.array, b.array)
    assert a.meta["models"][0][0] == "prior-mri"
    for extra, fragment in ((["--method", "fast"], "setting of the adapt method"), (["--samples", "2"], "one sample")):
        rc = main(["superres", str(small_mri), str(tmp_path / "o.nii.gz"), "--time-budget", "0", *extra, "--progress", "none"])
        assert rc == 1 and fragment in capsys.readouterr().err


def test_preview_writes_the_quick_result_first_then_the_full_one(thick_crop, tmp_path, capsys):
    """--preview FILE: the quick result (the pre-trained network alone, as --time-budget 0) is in place, with its
    sidecar, before the full result is made (its progress event comes first), and equals a quick run's output."""
    import json

    _, thick = thick_crop
    src = tmp_path / "thick.nii.gz"
    write_volume(thick, src)
    args = ["superres", src, tmp_path / "full.nii.gz", "--preview", tmp_path / "preview.nii.gz", "--time-budget", "0.02"]
    rc, out, err = run([*args, "--progress", "json"], capsys)
    assert rc == 0, err
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    kinds = [next(iter(e)) for e in events]
    assert kinds.index("preview") < kinds.index("done") and events[kinds.index("preview")]["preview"].endswith("preview.nii.gz")
    assert [e["progress"] for e in events if "progress" in e] == sorted(e["progress"] for e in events if "progress" in e)
    side = json.loads((tmp_path / "preview.json").read_text())
    assert side["AIGenerated"] and "pre-trained network alone" in side["preview"]
    import SimpleITK as sitk  # what Slicer reads: the preview's voxels and grid as MedIL wrote them, to 1e-5 mm

    from medil_backend.io import from_sitk

    mine = read_volume(tmp_path / "preview.nii.gz")
    array, affine = from_sitk(sitk.ReadImage(str(tmp_path / "preview.nii.gz")))
    np.testing.assert_allclose(affine, mine.affine, atol=1e-5)
    np.testing.assert_array_equal(array, mine.array)
    rc, _, err = run(["superres", src, tmp_path / "quick.nii.gz", "--time-budget", "0", "--progress", "none"], capsys)
    assert rc == 0, err
    np.testing.assert_array_equal(read_volume(tmp_path / "preview.nii.gz").array, read_volume(tmp_path / "quick.nii.gz").array)
    full = read_volume(tmp_path / "full.nii.gz")
    assert full.shape == read_volume(tmp_path / "quick.nii.gz").shape and not np.array_equal(
        full.array, read_volume(tmp_path / "quick.nii.gz").array
    )


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--method", "fast"], "fast and a time budget of 0 are quick already"),
        (["--time-budget", "0"], "fast and a time budget of 0 are quick already"),
    ],
)
def test_preview_is_refused_where_the_result_is_quick_already(thick_crop, tmp_path, capsys, extra, words):
    _, thick = thick_crop
    src = tmp_path / "thick.nii.gz"
    write_volume(thick, src)
    rc, _, err = run(["superres", src, tmp_path / "o.nii.gz", "--preview", tmp_path / "p.nii.gz", *extra, "--progress", "none"], capsys)
    assert rc == 1 and words in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thick.nii.gz"]


def test_preview_is_refused_with_several_stacks(thick_crop, tmp_path, capsys):
    _, thick = thick_crop
    src = tmp_path / "thick.nii.gz"
    write_volume(thick, src)
    rc, _, err = run(["superres", src, src, tmp_path / "o.nii.gz", "--preview", tmp_path / "p.nii.gz", "--progress", "none"], capsys)
    assert rc == 1 and "a preview is for one stack" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thick.nii.gz"]


def test_a_run_stopped_after_its_preview_keeps_the_preview_and_writes_no_output(thick_crop, tmp_path):
    """Ctrl-C while the full result is being made: the preview stays (with its sidecar), the output is not written."""
    import json
    import signal
    import subprocess

    _, thick = thick_crop
    src = tmp_path / "thick.nii.gz"
    write_volume(thick, src)
    cmd = [sys.executable, "-m", "medil_backend", "superres", str(src), str(tmp_path / "full.nii.gz")]
    cmd += ["--preview", str(tmp_path / "preview.nii.gz"), "--time-budget", "5", "--progress", "json"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8", cwd=REPO)
    for line in p.stdout:
        if line.startswith("{") and "preview" in json.loads(line):
            break
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode in (130, -signal.SIGINT), err
    assert sorted(x.name for x in tmp_path.iterdir()) == ["preview.json", "preview.nii.gz", "thick.nii.gz"], err
    assert read_volume(tmp_path / "preview.nii.gz").array.std() > 0
