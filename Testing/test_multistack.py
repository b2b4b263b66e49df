"""Multi-stack super-resolution: the joint operator and its adjoint over oblique stacks, motion recovered on
a real volume, leave-one-stack-out, the command with several stacks and its refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import shared

from medil_backend.cli import main
from medil_backend.geometry import Grid, Volume, affine_from_parts, rotation
from medil_backend.io import read_volume, sidecar_path, write_volume
from medil_backend.metrics import foreground_mask, psnr
from medil_backend.ops.interpolate import resample_sitk
from medil_backend.ops.multistack import MAX_STACKS, SlabOperator, Stack, _operators, multistack_superres, slices_of
from medil_backend.simulate_stacks import orthogonal_stacks, rigid


def test_the_joint_operator_and_its_adjoint_pass_the_dot_product_test_over_oblique_stacks():
    rng = np.random.default_rng(0)
    target = Grid((20, 18, 16), affine_from_parts([1.0, 1.1, 0.9], rotation([4, -3, 7]), [-10, -9, -8]))
    stacks = []
    for axis, angles in zip(range(3), ([10, 0, 5], [-8, 12, 0], [3, -6, 20])):
        spacing = [1.0, 1.0, 1.0]
        spacing[axis] = 3.5
        shape = [16, 16, 16]
        shape[axis] = 5
        grid = Grid(tuple(shape), affine_from_parts(spacing, rotation(angles), [-8, -8, -7]))
        v = Volume(np.zeros(grid.shape, np.float32), grid.affine)
        motion = rigid([1, -2, 2], [0.5, -1, 0.7], [0, 0, 0])
        stacks.append(Stack(v, axis, 4.0, motion))
    ops = _operators(stacks, target, "gaussian")
    x = torch.from_numpy(rng.standard_normal(target.shape).astype(np.float64))[None, None]
    ys = [torch.from_numpy(rng.standard_normal(s.grid.shape))[None, None] for s in stacks]
    lhs = sum(float((op(x) * y).sum()) for op, y in zip(ops, ys))
    rhs = float((x * sum(op.adjoint(y) for op, y in zip(ops, ys))).sum())
    assert abs(lhs - rhs) <= 1e-6 * max(abs(lhs), 1.0), (lhs, rhs)  # the sampler computes its weights in float32


@pytest.mark.parametrize("profile", ["rect", "gaussian"])
def test_a_slice_on_its_slab_is_the_same_operator_as_on_the_whole_grid(profile):
    """Each moved, oblique slice (gaussian profile wider than its spacing) acquired from its slab of the output grid:
    the same values as from the whole grid, and its adjoint the same volume (zero outside the slab)."""
    rng = np.random.default_rng(1)
    target = Grid((30, 28, 26), affine_from_parts([1.0, 1.1, 0.9], rotation([4, -3, 7]), [-15, -14, -12]))
    grid = Grid((16, 6, 16), affine_from_parts([1.0, 3.5, 1.0], rotation([-8, 12, 0]), [-8, -9, -7]))
    stack = Stack(
        Volume(rng.standard_normal(grid.shape).astype(np.float32), grid.affine), 1, 4.0, rigid([1, -2, 2], [0.5, -1, 0.7], [0, 0, 0])
    )
    x = torch.from_numpy(rng.standard_normal(target.shape).astype(np.float32))[None, None]
    slabs = 0
    for piece, part in slices_of(stack, stack.volume.array):
        whole = _operators([piece], target, profile)[0]
        slab = SlabOperator(piece, target, profile)
        slabs += int(np.prod([s.stop - s.start for s in slab.index[2:]]) < np.prod(target.shape))
        torch.testing.assert_close(slab(x), whole(x), rtol=0, atol=1e-5)
        y = torch.from_numpy(part)[None, None]
        out = torch.zeros_like(x)
        slab.adjoint_into(out, y)
        torch.testing.assert_close(out, whole.adjoint(y), rtol=0, atol=1e-5)
    assert slabs == stack.volume.array.shape[1]  # every slice reads less than the whole grid


@pytest.fixture(scope="module")
def head():
    """A 64 mm cube of a real 1 mm T1 head (the centre of the pydeface mean head)."""
    v = read_volume(shared("mri/pydeface_mean_head_t1.nii.gz"))
    s = [(n - 64) // 2 for n in v.array.shape]
    return Volume(
        np.ascontiguousarray(v.array[s[0] : s[0] + 64, s[1] : s[1] + 64, s[2] : s[2] + 64]).astype(np.float32),
        v.grid.sub_grid(s, [a + 64 for a in s]).affine,
        modality="mri",
    )


def _centre(v: Volume) -> np.ndarray:
    return v.grid.voxel_to_world(np.array([(np.array(v.grid.shape) - 1) / 2.0]))[0]


def test_a_known_rigid_motion_is_recovered_and_the_stacks_beat_each_one_alone(head):
    from medil_backend.evaluate_multistack import motion_error

    c = _centre(head)
    motions = [np.eye(4), rigid([3, -2, 4], [2, -3, 1.5], c), rigid([-4, 3, -2], [-2.5, 2, -3], c)]
    stacks = orthogonal_stacks(head, 4, motions, noise=0.01)
    out = multistack_superres(stacks, head.grid, device="cpu")
    for m, true in zip(out.meta["motions"][1:], motions[1:]):
        err = motion_error(np.array(m["matrix_ras"]), true, c)
        assert err["rotation_deg"] <= 0.5 and err["translation_mm"] <= 0.5, err
    mask = foreground_mask(head.array)
    scale = float(np.percentile(head.array[mask], 99))
    best_single = max(psnr(resample_sitk(s, head.grid, "bspline").array / scale, head.array / scale, mask) for s in stacks)
    ours = psnr(out.array / scale, head.array / scale, mask)
    assert ours > best_single + 1.0, (ours, best_single)
    cover = out.extras["coverage"].array
    assert cover.max() == 3 and cover.min() >= 0 and out.grid.same_as(head.grid, atol=0)


def test_slice_motion_recovers_a_patient_who_moved_between_interleaved_packages(head):
    """One stack's odd slices imaged the head 3 degrees / 2 mm away from its even ones: each slice registered on its
    own finds its motion, and the volume is better than with one motion per stack."""
    from medil_backend.evaluate_multistack import motion_error
    from medil_backend.simulate_stacks import stack_of

    c = _centre(head)
    even, odd = rigid([3, -2, 4], [2, -3, 1.5], c), rigid([5, -4, 2], [3.5, -1.5, 0.5], c)
    stacks = [
        stack_of(head, 0, 4, np.eye(4), 0.01, 0),
        stack_of(head, 1, 4, even, 0.01, 1, slice_motions=[even if i % 2 == 0 else odd for i in range(16)]),
        stack_of(head, 2, 4, rigid([-4, 3, -2], [-2.5, 2, -3], c), 0.01, 2),
    ]
    mask = foreground_mask(head.array)
    scale = float(np.percentile(head.array[mask], 99))
    stackwise = multistack_superres(stacks, head.grid, device="cpu")
    slicewise = multistack_superres(stacks, head.grid, device="cpu", slice_motion=True)
    gain = psnr(slicewise.array / scale, head.array / scale, mask) - psnr(stackwise.array / scale, head.array / scale, mask)
    assert gain > 0.5, gain
    moved = slicewise.meta["slice_motion"][1]
    assert moved["slices"] == 16 and moved["moved"] >= 12, moved
    base = np.array(slicewise.meta["motions"][1]["matrix_ras"])
    errors = [
        motion_error(base @ np.array(d["matrix_ras"]), even if d["slice"] % 2 == 0 else odd, c)
        for d in moved["per_slice"]
        if 0 < d["slice"] < 15  # the end slices see the least anatomy
    ]
    # a 64 mm slice gives rotation little leverage: here the median is about 0.55 degrees (about 0.2 on a 112 mm crop)
    assert np.median([e["rotation_deg"] for e in errors]) <= 1.0 and np.median([e["translation_mm"] for e in errors]) <= 0.5, errors


def test_leave_one_stack_out_scores_every_stack(head):
    from medil_backend.evaluate_multistack import leave_one_stack_out

    c = _centre(head)
    stacks = orthogonal_stacks(head, 4, [np.eye(4), rigid([2, 0, 0], [1, 0, 0], c), np.eye(4)], noise=0.01)
    rows = leave_one_stack_out(stacks)
    assert [r["left_out"] for r in rows] == [0, 1, 2]
    for r in rows:
        for key in ("multistack", "bspline_best_single", "bspline_mean_of_stacks"):
            assert np.isfinite(r[key]["psnr"]) and 0 < r[key]["ssim"] <= 1
    assert np.mean([r["multistack"]["psnr"] for r in rows]) > np.mean([r["bspline_mean_of_stacks"]["psnr"] for r in rows])


@pytest.fixture
def stack_files(tmp_path, head):
    c = _centre(head)
    stacks = orthogonal_stacks(head, 4, [np.eye(4), rigid([2, -1, 0], [1, -1, 0], c), rigid([0, 1, -2], [-1, 0, 1], c)])
    paths = []
    for k, s in enumerate(stacks):
        path = tmp_path / f"stack{k}.nii.gz"
        write_volume(s, path)
        paths.append(path)
    return paths


def test_superres_with_several_stacks_writes_one_volume_its_coverage_and_the_motions(stack_files, tmp_path, capsys):
    out, cov = tmp_path / "sr.nii.gz", tmp_path / "cov.nrrd"
    code = main(["superres", *map(str, stack_files), str(out), "--method", "fast", "--coverage", str(cov), "--progress", "none"])
    assert code == 0, capsys.readouterr().err
    v, c = read_volume(out), read_volume(cov)
    assert v.grid.same_as(c.grid, atol=1e-5) and np.allclose(v.grid.spacing, v.grid.spacing[0])
    assert set(np.unique(c.array)) <= {0.0, 1.0, 2.0, 3.0} and c.array.max() == 3
    record = json.loads(sidecar_path(out).read_text())
    assert record["inputs"] == [p.name for p in stack_files] and record["method"]["method"] == "multistack"
    assert len(record["method"]["motions"]) == 3 and record["method"]["motions"][0]["rotation_deg"] == 0
    assert record["method"]["motions"][1]["rotation_deg"] > 1  # the second stack's 2.2 degrees, found
    import SimpleITK as sitk

    from medil_backend.io import from_sitk

    for path, ours in ((out, v), (cov, c)):  # what Slicer reads (SimpleITK): the same voxels on the same grid
        arr, aff = from_sitk(sitk.ReadImage(str(path)))
        assert arr.shape == ours.array.shape and np.array_equal(arr, ours.array), path.name
        assert np.max(np.abs(aff - ours.affine)) < 1e-5, path.name
        assert sidecar_path(path).exists(), path.name


def test_adapt_on_several_stacks_learns_from_all_of_them_and_maps_its_uncertainty(stack_files, tmp_path, capsys):
    out, unc, cov = tmp_path / "sr.nii.gz", tmp_path / "unc.nrrd", tmp_path / "cov.nii.gz"
    args = ["--time-budget", "0.05", "--samples", "2", "--uncertainty", str(unc), "--coverage", str(cov), "--progress", "none"]
    code = main(["superres", *map(str, stack_files), str(out), *args])
    assert code == 0, capsys.readouterr().err
    v, u, c = read_volume(out), read_volume(unc), read_volume(cov)
    assert v.grid.same_as(u.grid, atol=1e-5) and v.grid.same_as(c.grid, atol=1e-5)
    assert np.all(u.array >= 0) and u.array.max() > 0 and np.all(u.array[c.array == 0] == 0)
    record = json.loads(sidecar_path(out).read_text())
    assert record["method"]["method"] == "multistack-adapt" and record["seeds"] == [0, 1]
    assert [m["name"] for m in record["models"]] == ["prior-mri"]  # the bundled starting weights, by sha256
    assert record["method"]["samples"] == 2 and len(record["method"]["motions"]) == 3
    import SimpleITK as sitk

    from medil_backend.io import from_sitk

    for path, ours in ((out, v), (unc, u), (cov, c)):  # what Slicer reads (SimpleITK): the same voxels on the same grid
        arr, aff = from_sitk(sitk.ReadImage(str(path)))
        assert arr.shape == ours.array.shape and np.array_equal(arr, ours.array), path.name
        assert np.max(np.abs(aff - ours.affine)) < 1e-5 and np.max(np.abs(aff - v.affine)) < 1e-5, path.name
        assert sidecar_path(path).exists(), path.name


def test_adapt_adds_learned_detail_to_the_joint_reconstruction(head):
    """adapt's default on several stacks (one sample): the pre-trained network alone (no test-time steps), applied
    to each stack, then the joint steps: better than the joint steps from the B-spline mean, on a held-out head.
    Stacks of unknown modality get the starting weights of the modality their normaliser guesses."""
    c = _centre(head)
    motions = [np.eye(4), rigid([3, -2, 4], [2, -3, 1.5], c), rigid([-4, 3, -2], [-2.5, 2, -3], c)]
    stacks = orthogonal_stacks(head, 4, motions, noise=0.01)
    for s in stacks:
        s.modality = "unknown"
    mask = foreground_mask(head.array)
    scale = float(np.percentile(head.array[mask], 99))
    fast = multistack_superres(stacks, head.grid, device="cpu")
    learned = multistack_superres(stacks, head.grid, device="cpu", method="adapt")
    gain = psnr(learned.array / scale, head.array / scale, mask) - psnr(fast.array / scale, head.array / scale, mask)
    assert gain > 0.3, gain
    assert learned.meta["method"] == "multistack-adapt" and learned.meta["time_budget_min"] == 0
    assert learned.meta["adaptation"][0]["steps"] == 0 and learned.meta["adaptation"][0]["prior"]
    assert learned.meta["models"][0][0] == "prior-mri" and all(s.modality == "unknown" for s in stacks)  # the caller's kept


def _one_error(code, err, fragment):
    lines = [ln for ln in err.splitlines() if ln.startswith("medil: error:")]
    assert code == 1 and len(lines) == 1 and fragment in lines[0] and "Traceback" not in err, err


@pytest.mark.parametrize(
    "case,fragment",
    [
        ("apart", "do not overlap"),
        ("isotropic", "no thick slices"),
        ("ct", "not all of one modality"),
        ("contrast", "same contrast"),
        ("eleven", f"at most {MAX_STACKS}"),
        ("coverage-one", "for several stacks"),
        ("slice-motion-one", "for several stacks"),
        ("slice-and-no-motion", "contradict"),
        ("inverse", "takes one stack"),
        ("samples-fast", "deterministic"),
    ],
)
def test_bad_stacks_are_refused_in_one_line_and_nothing_is_written(stack_files, tmp_path, capsys, case, fragment):
    files = [str(p) for p in stack_files]
    extra: list[str] = []
    if case == "apart":
        v = read_volume(stack_files[2])
        v.affine = v.affine.copy()
        v.affine[:3, 3] += 500.0
        write_volume(v, tmp_path / "far.nii.gz")
        files[2] = str(tmp_path / "far.nii.gz")
    elif case == "isotropic":
        v = read_volume(stack_files[0])
        iso = resample_sitk(v, Grid((16, 16, 16), affine_from_parts([4.0] * 3, v.grid.direction, v.grid.affine[:3, 3])), "trilinear")
        write_volume(iso, tmp_path / "iso.nii.gz")
        files[1] = str(tmp_path / "iso.nii.gz")
    elif case == "ct":
        v = read_volume(stack_files[1])
        v.array = (v.array / v.array.max() * 1500 - 1024).astype(np.float32)
        write_volume(v, tmp_path / "ct.nii.gz")
        files[1] = str(tmp_path / "ct.nii.gz")
    elif case == "contrast":  # the tissues' order reversed inside the head: a T2-like stack of the same anatomy
        v = read_volume(stack_files[2])
        inside = v.array > 0.1 * np.percentile(v.array, 99)
        v.array = np.where(inside, v.array.max() - v.array, 0).astype(np.float32)
        write_volume(v, tmp_path / "t2.nii.gz")
        files[2] = str(tmp_path / "t2.nii.gz")
    elif case == "eleven":
        files = files * 4  # 12
    elif case == "coverage-one":
        files = files[:1]
        extra = ["--coverage", str(tmp_path / "cov.nii.gz")]
    elif case == "slice-motion-one":
        files = files[:1]
        extra = ["--slice-motion"]
    elif case == "slice-and-no-motion":
        extra = ["--slice-motion", "--no-motion"]
    elif case == "inverse":
        extra = ["--method", "inverse"]
    elif case == "samples-fast":
        extra = ["--method", "fast", "--samples", "2"]
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(["superres", *files, str(tmp_path / "out.nii.gz"), "--progress", "none", *extra])
    _one_error(code, capsys.readouterr().err, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_batch_takes_one_input_per_scan_and_no_stack_options(capsys):
    with pytest.raises(SystemExit):
        main(["batch", "superres", "--help"])
    text = capsys.readouterr().out
    assert "--coverage" not in text and "--no-motion" not in text and "--slice-motion" not in text and "--uncertainty" in text


def test_ct_stacks_keep_the_floor_every_task_keeps(head):
    """One floor for every task (intensity.physical_floor): a CT made of several stacks never goes below -1024 HU, as
    a super-resolved or reconstructed CT does not (the joint steps overshoot at the edge of air)."""
    ct = Volume(np.where(head.array > 0.2 * head.array.max(), 1000.0, -1024.0).astype(np.float32), head.affine, modality="ct")
    stacks = orthogonal_stacks(ct, 4, [np.eye(4)] * 3, noise=0.0)
    for s in stacks:
        s.modality = "ct"
    out = multistack_superres(stacks, head.grid, device="cpu", register=False, rounds=1)
    assert out.modality == "ct" and float(out.array.min()) >= -1024.0
    assert np.any(out.array == -1024.0)  # the floor was reached: without it the joint steps go below
