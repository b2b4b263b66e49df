"""Per-slice motion (`medil superres ... --slice-motion`) on a whole head whose patient moved between the
interleaved packages of one stack, against one motion per stack in the same run.

A 1 mm T1 head (`pydeface_mean_head_t1`, 176x256x256; held out from `adapt`'s starting weights, and the
joint reconstruction uses no trained weights) is acquired as three orthogonal 4 mm stacks with 1 % noise;
the second and third are moved as in `medil evaluate --multistack` (about 5 degrees and 4-5 mm), and the
second stack's odd slices imaged the head a further 2-3 degrees and about 2.5 mm away from its even ones.
Both reconstructions (method fast) are scored against the head (PSNR/SSIM inside it), with SimpleITK
B-spline of the best single stack; the recovered per-slice motions of the second stack against the true
ones (its two end slices aside). Prints JSON.

    python benchmarks/bench_slice_motion.py [--out benchmarks/results/bench_slice_motion.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

from report import emit

REPO = Path(__file__).resolve().parents[1]
HEAD = REPO.parent / "shared" / "data" / "mri" / "pydeface_mean_head_t1.nii.gz"
#: the second stack's odd slices: this motion instead of the even slices' (MOTIONS[0] of the evaluation)
ODD = ((5.0, -4.0, 2.0), (3.5, -1.5, 0.5))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--thick", type=int, default=4)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    import numpy as np

    from medil_backend.evaluate_multistack import MOTIONS, _scores, motion_error
    from medil_backend.io import read_volume
    from medil_backend.metrics import foreground_mask
    from medil_backend.ops.interpolate import resample_sitk
    from medil_backend.ops.multistack import multistack_superres
    from medil_backend.simulate_stacks import rigid, stack_of

    truth = read_volume(HEAD)
    truth.modality = "mri"
    centre = truth.grid.voxel_to_world(np.array([(np.array(truth.grid.shape) - 1) / 2.0]))[0]
    even, third = (rigid(a, t, centre) for a, t in MOTIONS)
    odd = rigid(*ODD, centre)
    n = truth.grid.shape[1] // args.thick
    stacks = [
        stack_of(truth, 0, args.thick, np.eye(4), 0.01, 0),
        stack_of(truth, 1, args.thick, even, 0.01, 1, slice_motions=[even if i % 2 == 0 else odd for i in range(n)]),
        stack_of(truth, 2, args.thick, third, 0.01, 2),
    ]
    mask = foreground_mask(truth.array)
    scale = float(np.percentile(truth.array[mask], 99))
    ref = np.asarray(truth.array, np.float32)
    result: dict = {
        "benchmark": "bench_slice_motion",
        "volume": HEAD.name,
        "thick_mm": args.thick,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "motion_between_packages": {"even": list(MOTIONS[0]), "odd": list(ODD)},
        "methods": {},
    }
    result["methods"]["bspline_best_single"] = max(
        (_scores(resample_sitk(s, truth.grid, "bspline").array, ref, mask, scale) for s in stacks), key=lambda p: p["psnr"]
    )
    for key, flag in (("one_motion_per_stack", False), ("slice_motion", True)):
        t0 = time.perf_counter()
        out = multistack_superres(stacks, truth.grid, device="cpu", slice_motion=flag)
        result["methods"][key] = {**_scores(out.array, ref, mask, scale), "seconds": round(time.perf_counter() - t0, 1)}
        if flag:
            moved = out.meta["slice_motion"][1]
            base = np.array(out.meta["motions"][1]["matrix_ras"])
            rel = {d["slice"]: np.array(d["matrix_ras"]) for d in moved["per_slice"]}
            errors = [
                motion_error(base @ rel.get(i, np.eye(4)), even if i % 2 == 0 else odd, centre) for i in range(1, moved["slices"] - 1)
            ]
            rot = [e["rotation_deg"] for e in errors]
            mm = [e["translation_mm"] for e in errors]
            result["slice_motion_error"] = {
                "slices_scored": len(errors),
                "slices_moved": moved["moved"],
                "rotation_deg_median": round(float(np.median(rot)), 3),
                "rotation_deg_p90": round(float(np.percentile(rot, 90)), 3),
                "translation_mm_median": round(float(np.median(mm)), 3),
                "translation_mm_p90": round(float(np.percentile(mm, 90)), 3),
            }
    emit(result, args.out)


if __name__ == "__main__":
    main()
