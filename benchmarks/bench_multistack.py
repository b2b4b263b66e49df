"""Speed and peak memory of multi-stack super-resolution on a whole head, against SimpleITK B-spline of
one stack in the same run.

A 1 mm T1 head (`pydeface_mean_head_t1`, 176x256x256, a volume `adapt`'s starting weights leave out;
the joint reconstruction itself uses no trained weights) is acquired as three orthogonal 4 mm stacks,
the second and third moved by about 5 degrees and 4-5 mm, with 1 % noise; `medil superres` then runs
on the three stack files in a fresh process (the command a user runs: reading, registration, the
joint reconstruction, writing), onto the head's own 1 mm grid, once per method: `fast` (the joint
reconstruction from the B-spline mean), `adapt` (the default: the pre-trained network's upsampling of each
stack, then the joint reconstruction) and `adapt-3min` (`adapt --time-budget 3`: the network adapted to the
stacks for 3 minutes first, what the default skips). Peak memory is the process's high-water mark.
Each method's time is also given as a multiple of B-spline of one stack as a whole process (SimpleITK reading the
stack and the grid, resampling and writing the same format: what ``medil superres`` does besides its own work;
the resampling alone is ``bspline_one_stack_seconds``), and its output is scored as ``medil evaluate
--multistack`` scores it (PSNR inside the head against the truth): the gain in dB over B-spline of the best stack.
Prints JSON.

    python benchmarks/bench_multistack.py [--method fast] [--out benchmarks/results/bench_multistack.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import emit

REPO = Path(__file__).resolve().parents[1]
HEAD = REPO.parent / "shared" / "data" / "mri" / "pydeface_mean_head_t1.nii.gz"
#: each measured run: its name and the options it gives `medil superres` (adapt: the default time budget)
RUNS = {"fast": ["--method", "fast"], "adapt": ["--method", "adapt"], "adapt-3min": ["--method", "adapt", "--time-budget", "3"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--method", action="append", choices=tuple(RUNS), help="repeatable (default: all three)")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    import numpy as np

    from medil_backend.evaluate_multistack import MOTIONS
    from medil_backend.io import read_volume, write_volume
    from medil_backend.ops.interpolate import resample_sitk
    from medil_backend.simulate_stacks import orthogonal_stacks, rigid

    truth = read_volume(HEAD)
    centre = truth.grid.voxel_to_world(np.array([(np.array(truth.grid.shape) - 1) / 2.0]))[0]
    motions = [np.eye(4)] + [rigid(a, t, centre) for a, t in MOTIONS]
    work = Path(tempfile.mkdtemp(prefix="medil-bench-ms-"))
    stacks = orthogonal_stacks(truth, 4, motions, noise=0.01)
    paths = []
    for k, s in enumerate(stacks):
        paths.append(work / f"stack{k}.nii.gz")
        write_volume(s, paths[-1])
    write_volume(truth, work / "grid.nii.gz")
    t0 = time.perf_counter()
    resample_sitk(stacks[0], truth.grid, "bspline")
    bspline = time.perf_counter() - t0
    # the held-out protocol's score (medil evaluate --multistack): PSNR inside the head, against B-spline of the best stack
    from medil_backend.metrics import foreground_mask, psnr

    mask = foreground_mask(truth.array)
    scale = float(np.percentile(truth.array[mask], 99))

    def score(array) -> float:
        return psnr(np.asarray(array, np.float32) / scale, truth.array / scale, mask)

    best_single = max(score(resample_sitk(s, truth.grid, "bspline").array) for s in stacks)
    # B-spline of one stack as a user runs it, a whole process (start, reading, resampling, writing), as medil's below
    bspline_cmd = [sys.executable, "-c", "import sys, SimpleITK as sitk; im = sitk.ReadImage(sys.argv[1]); ref = sitk.ReadImage(sys.argv[2]); "
                   "sitk.WriteImage(sitk.Resample(im, ref, sitk.Transform(), sitk.sitkBSpline, 0.0, sitk.sitkFloat32), sys.argv[3])",
                   str(paths[0]), str(work / "grid.nii.gz"), str(work / "bspline.nii.gz")]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(bspline_cmd, check=True, capture_output=True)
    bspline_process = time.perf_counter() - t0
    result = {
        "benchmark": "bench_multistack",
        "volume": HEAD.name,
        "output_shape": list(truth.array.shape),
        "stacks": [list(s.array.shape) for s in stacks],
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "device": args.device,
        "bspline_one_stack_seconds": round(bspline, 2),
        "bspline_one_stack_process_seconds": round(bspline_process, 2),
        "bspline_best_stack_psnr": round(best_single, 3),
        "methods": {},
    }
    for method in args.method or list(RUNS):
        out = work / f"out-{method}.nii.gz"
        cmd = [sys.executable, "-c", "import resource, sys; from medil_backend.cli import main; rc = main(sys.argv[1:]); "
               "print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(rc)",
               "superres", *map(str, paths), str(out), "--like", str(work / "grid.nii.gz"), *RUNS[method],
               "--device", args.device, "--progress", "none"]  # fmt: skip
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-2000:])
        peak_kb = int(next(line.split()[1] for line in proc.stderr.splitlines() if line.startswith("PEAK_KB")))
        record = json.loads((work / f"out-{method}.json").read_text())
        result["methods"][method] = {
            "medil_superres_seconds": round(seconds, 1),
            "inside_seconds": record["method"]["seconds"],
            "peak_memory_gb": round(peak_kb / 2**20, 2),
            "rounds": record["method"]["rounds"],
            "times_bspline_one_stack": round(seconds / bspline_process, 1),
            "psnr": round(score(read_volume(out).array), 3),
            "gain_over_bspline_best_stack_db": round(score(read_volume(out).array) - best_single, 2),
        }
    emit(result, args.out)


if __name__ == "__main__":
    main()
