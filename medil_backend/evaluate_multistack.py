"""Multi-stack super-resolution, measured two ways (``medil evaluate --multistack``):

- **simulated**: each ground-truth volume (fine, held out) is acquired as three orthogonal stacks
  ``thick`` mm thick, the second and third with a known rigid motion of the anatomy (rotation and
  translation about its centre) and 1 % noise; the reconstruction is scored against the truth
  (PSNR and SSIM inside the head, intensities over the truth's 99th percentile) next to SimpleITK
  B-spline of the best single stack, the mean of the B-spline-resampled stacks, and single-stack
  ``adapt`` (the quick setting: its pre-trained network alone, and the default time budget); both
  multi-stack methods (``fast``: joint consistency from the B-spline mean; ``adapt``: from the stacks' learned
  upsampling); the recovered motions against the true ones;
- **leave-one-stack-out** (real stacks need no ground truth; the ``fast`` joint reconstruction): reconstruct from all stacks but one,
  register the left-out stack to the result, acquire the result through the left-out stack's
  operator and compare with that stack; the same for the baselines.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from .geometry import Volume
from .methods import TIME_BUDGET_MIN
from .metrics import foreground_mask, psnr, ssim

#: the rigid motions (degrees about x, y, z; mm) of the second and third simulated stacks
MOTIONS = (((3.0, -2.0, 4.0), (2.0, -3.0, 1.5)), ((-4.0, 3.0, -2.0), (-2.5, 2.0, -3.0)))


def _scores(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray, scale: float) -> dict:
    return {"psnr": round(psnr(pred / scale, ref / scale, mask), 3), "ssim": round(ssim(pred / scale, ref / scale, mask), 4)}


def motion_error(recovered: np.ndarray, true: np.ndarray, centre: np.ndarray) -> dict:
    """Rotation error (degrees) and displacement error at ``centre`` (mm) of a recovered rigid transform."""
    err = np.linalg.inv(true) @ recovered
    angle = float(np.degrees(np.arccos(np.clip((np.trace(err[:3, :3]) - 1) / 2, -1, 1))))
    c = np.append(centre, 1.0)
    return {"rotation_deg": round(angle, 3), "translation_mm": round(float(np.linalg.norm((recovered - true)[:3] @ c)), 3)}


def simulated(truth: Volume, thick: float, *, adapt: bool = True, rounds: int | None = None, budget_min: float | None = None) -> dict:
    """Three orthogonal stacks of ``truth`` with motion; every method scored against the truth. ``adapt``: also
    single-stack adapt on the best stack (its quick setting and ``budget_min`` minutes) and multi-stack adapt
    (``budget_min`` minutes); None: each one's default (:func:`~medil_backend.methods.default_time_budget`)."""
    from .ops.interpolate import resample_sitk
    from .ops.multistack import MultistackOptions, multistack_superres
    from .simulate_stacks import orthogonal_stacks, rigid

    rounds = rounds or MultistackOptions.rounds

    factor = max(2, int(round(thick / float(truth.grid.spacing.min()))))
    centre = truth.grid.voxel_to_world(np.array([(np.array(truth.grid.shape) - 1) / 2.0]))[0]
    motions = [np.eye(4)] + [rigid(a, t, centre) for a, t in MOTIONS]
    stacks = orthogonal_stacks(truth, factor, motions, noise=0.01)
    mask = foreground_mask(truth.array)
    scale = float(np.percentile(truth.array[mask], 99))
    ref = np.asarray(truth.array, np.float32)
    out: dict = {"thick_mm": round(float(stacks[0].grid.spacing.max()), 3), "methods": {}}
    singles = [resample_sitk(s, truth.grid, "bspline").array for s in stacks]
    per = [_scores(a, ref, mask, scale) for a in singles]
    best = int(np.argmax([p["psnr"] for p in per]))
    out["methods"]["bspline_best_single"] = {**per[best], "stack": best}
    out["methods"]["bspline_mean_of_stacks"] = _scores(np.mean(singles, axis=0), ref, mask, scale)
    if adapt:
        from .ops.superres import superres

        single = TIME_BUDGET_MIN if budget_min is None else budget_min
        for key, minutes in (("adapt_quick_best_single", 0.0), ("adapt_best_single", single)):
            t0 = time.perf_counter()
            a = superres(stacks[best], truth.grid, method="adapt", time_budget_min=minutes, device="cpu")
            out["methods"][key] = {**_scores(a.array, ref, mask, scale), "seconds": round(time.perf_counter() - t0, 1)}
    t0 = time.perf_counter()
    ms = multistack_superres(stacks, truth.grid, rounds=rounds, device="cpu")
    seconds = time.perf_counter() - t0
    out["methods"]["multistack"] = {**_scores(ms.array, ref, mask, scale), "seconds": round(seconds, 1)}
    if adapt:
        t0 = time.perf_counter()
        msa = multistack_superres(stacks, truth.grid, rounds=rounds, device="cpu", method="adapt", time_budget_min=budget_min)
        out["methods"]["multistack_adapt"] = {**_scores(msa.array, ref, mask, scale), "seconds": round(time.perf_counter() - t0, 1)}
    out["motion_true"] = [{"rotation_deg_xyz": list(a), "translation_mm": list(t)} for a, t in MOTIONS]
    out["motion_error"] = [motion_error(np.array(m["matrix_ras"]), true, centre) for m, true in zip(ms.meta["motions"][1:], motions[1:])]
    out["leave_one_stack_out"] = leave_one_stack_out(stacks, rounds=rounds)
    return out


def leave_one_stack_out(stacks: Sequence[Volume], rounds: int | None = None) -> list[dict]:
    """For each stack: reconstruct from the others, acquire the result through the left-out stack's operator and
    compare with that stack (PSNR/SSIM inside its foreground); the same for the others' best B-spline and the
    mean of their B-splines. Every stack's motion comes from one registration of all of them (so each
    reconstruction is in the first stack's frame and the left-out stack's place in it is known). Needs three
    stacks or more."""
    from .acquisition import AcquisitionOperator
    from .ops.interpolate import resample_sitk
    from .ops.multistack import MultistackOptions, check_stacks, common_grid, footprint_inside, multistack_superres

    rounds = rounds or MultistackOptions.rounds
    if len(stacks) < 3:
        return []
    target = common_grid(check_stacks(list(stacks)))
    full = multistack_superres(list(stacks), target, rounds=rounds, device="cpu")
    motions = [np.array(m["matrix_ras"]) for m in full.meta["motions"]]
    results = []
    for k in range(len(stacks)):
        keep = [i for i in range(len(stacks)) if i != k]
        rest = [stacks[i] for i in keep]
        recon = multistack_superres(rest, target, register=False, motions=[motions[i] for i in keep], device="cpu")
        probe = check_stacks([stacks[k]])[0]
        probe.motion = motions[k]
        thickness: list[float | None] = [None, None, None]
        thickness[probe.axis] = probe.thickness
        op = AcquisitionOperator(probe.grid, target, thickness, "rect")
        y = np.asarray(stacks[k].array, np.float32)
        with torch.no_grad():  # the left-out stack's voxels whose whole footprint the remaining stacks cover
            covered = op(torch.from_numpy((recon.extras["coverage"].array > 0).astype(np.float32))[None, None])[0, 0].numpy() > 0.999
        mask = foreground_mask(y) & footprint_inside(probe, target) & covered
        scale = float(np.percentile(y[mask], 99))

        def through(volume: np.ndarray, op=op, y=y, mask=mask) -> np.ndarray:
            """``volume`` acquired by the left-out stack, in its intensity units (a least-squares gain: the
            reconstruction is in the first remaining stack's units)."""
            with torch.no_grad():
                a = op(torch.from_numpy(np.ascontiguousarray(volume, np.float32))[None, None])[0, 0].numpy()
            return a * float((a[mask] * y[mask]).sum() / max((a[mask] ** 2).sum(), 1e-12))

        singles = [resample_sitk(Volume(stacks[i].array, motions[i] @ stacks[i].affine), target, "bspline").array for i in keep]
        row = {"left_out": k, "multistack": _scores(through(recon.array), y, mask, scale)}
        per = [_scores(through(a), y, mask, scale) for a in singles]
        row["bspline_best_single"] = max(per, key=lambda p: p["psnr"])
        row["bspline_mean_of_stacks"] = _scores(through(np.mean(singles, axis=0)), y, mask, scale)
        results.append(row)
    return results


def markdown(result: dict) -> str:
    """The simulated and leave-one-stack-out tables of ``medil evaluate --multistack``."""
    names = {
        "bspline_best_single": "B-spline, best single stack",
        "bspline_mean_of_stacks": "mean of the B-spline stacks",
        "adapt_quick_best_single": "adapt (quick), best single stack",
        "adapt_best_single": "adapt, best single stack",
        "multistack": "multi-stack, fast (joint consistency from the B-spline mean)",
        "multistack_adapt": "**multi-stack, adapt (default)**",
    }
    lines = ["| volume | stacks | method | PSNR (dB) | SSIM | seconds |", "|---|---|---|---|---|---|"]
    for v in result["volumes"]:
        for case in v["cases"]:
            for m, s in case["methods"].items():
                lines.append(
                    f"| {v['name']} | 3 x {case['thick_mm']:g} mm | {names.get(m, m)} | {s['psnr']} | {s['ssim']} | {s.get('seconds', '')} |"
                )
    lines += ["", "| volume | stacks | motion error (rotation deg / displacement mm) |", "|---|---|---|"]
    for v in result["volumes"]:
        for case in v["cases"]:
            errs = ", ".join(f"{e['rotation_deg']:.2f} / {e['translation_mm']:.2f}" for e in case["motion_error"])
            lines.append(f"| {v['name']} | 3 x {case['thick_mm']:g} mm | {errs} |")
    lines += [
        "",
        "| volume | stacks | left-out stack | multi-stack PSNR / SSIM | best single B-spline | mean of B-splines |",
        "|---|---|---|---|---|---|",
    ]
    for v in result["volumes"]:
        for case in v["cases"]:
            for r in case["leave_one_stack_out"]:
                lines.append(
                    f"| {v['name']} | 3 x {case['thick_mm']:g} mm | {r['left_out']} | {r['multistack']['psnr']} / {r['multistack']['ssim']} "
                    f"| {r['bspline_best_single']['psnr']} / {r['bspline_best_single']['ssim']} "
                    f"| {r['bspline_mean_of_stacks']['psnr']} / {r['bspline_mean_of_stacks']['ssim']} |"
                )
    return "\n".join(lines)


__all__ = ["leave_one_stack_out", "markdown", "motion_error", "simulated"]
