"""Speed, peak memory and quality of `medil superres` against SimpleITK B-spline, in the same run.

The case the super-resolution issue names: a 4 mm -> 1 mm head. A whole 1 mm T1 head
(`pydeface_mean_head_t1`, 176x256x256; ``fast`` uses no trained weights, and ``adapt``'s
pre-trained starting weights leave this head out: ``--exclude`` in their card's command) is averaged into 4 mm slices along its superior-inferior axis (rect
profile), then brought back to its own 1 mm grid by B-spline,
``fast`` and ``adapt`` (default settings). Each method runs in a fresh process; its peak resident
memory is the process's high-water mark (``VmHWM``) after reading. PSNR is inside the head mask,
on intensities divided by the 99th percentile (as in ``medil evaluate``). Prints JSON.

    python benchmarks/bench_superres.py [--methods bspline fast quick adapt] [--time-budget 3] [--json FILE]

``quick`` is ``adapt`` at a time budget of 0 (the pre-trained network alone). Each method's
``process_seconds`` is its whole process (start, imports, reading, the run) timed by the parent, and
``time_ratio_vs_bspline`` that against B-spline's own process in the same run.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import sys
import time
from pathlib import Path

from report import emit

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
HEAD = DATA / "mri" / "pydeface_mean_head_t1.nii.gz"


def _status(key: str) -> int:
    with open("/proc/self/status") as fh:
        return [int(line.split()[1]) * 1024 for line in fh if line.startswith(key)][0]


def _job(method: str, budget: float, queue) -> None:
    try:
        queue.put(_run(method, budget))
    except Exception as exc:  # report, never leave the parent waiting
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def _case():
    import numpy as np

    from medil_backend.acquisition import thick_slices
    from medil_backend.geometry import Volume
    from medil_backend.io import read_volume

    hr = read_volume(HEAD)
    axis = int(np.argmax(np.abs(hr.grid.direction[2])))  # the superior-inferior axis
    arr, grid = thick_slices(hr.array.astype(np.float32), hr.grid, axis, 4)
    return hr, Volume(arr, grid.affine, modality="mri")


def _run(method: str, budget: float) -> dict:
    import numpy as np
    import torch

    from medil_backend.baselines import resample_sitk
    from medil_backend.intensity import fit_normalizer
    from medil_backend.metrics import foreground_mask, psnr
    from medil_backend.ops.superres import superres

    torch.set_num_threads(2)
    hr, thick = _case()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    base = _status("VmRSS")
    t0 = time.perf_counter()
    if method == "bspline":
        out = resample_sitk(thick, hr.grid, "bspline")
    elif method == "quick":
        out = superres(thick, hr.grid, method="adapt", time_budget_min=0)
    else:
        out = superres(thick, hr.grid, method=method, time_budget_min=budget)
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM")
    norm = fit_normalizer(hr.array, "mri")
    ref = norm.forward(hr.array)
    return {
        "seconds": seconds,
        "peak_rss_increase_mb": (peak - base) / 2**20,
        "psnr_mask": psnr(norm.forward(out.array), ref, foreground_mask(ref, "mri")),
        "input_shape": list(thick.shape),
        "output_shape": list(out.shape),
        "finite": bool(np.isfinite(out.array).all()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["bspline", "fast", "quick", "adapt"])
    ap.add_argument("--json", default=None, help="also write the result here")
    ap.add_argument("--time-budget", type=float, default=3.0, help="adapt: training minutes (the CLI's default)")
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    results: dict = {}
    for method in args.methods:
        q = ctx.Queue()
        t0 = time.perf_counter()
        p = ctx.Process(target=_job, args=(method, args.time_budget, q))
        p.start()
        results[method] = q.get()
        p.join()
        results[method]["process_seconds"] = time.perf_counter() - t0
    base = results.get("bspline", {})
    for m in args.methods:
        if m != "bspline" and "psnr_mask" in results.get(m, {}) and "psnr_mask" in base:
            results[m]["gain_over_bspline_db"] = results[m]["psnr_mask"] - base["psnr_mask"]
            results[m]["time_ratio_vs_bspline"] = results[m]["process_seconds"] / base["process_seconds"]
    result = {
        "case": f"{HEAD.name}: 4 mm slices -> its 1 mm grid",
        "machine": {"cpu_count": mp.cpu_count(), "processor": platform.processor(), "torch_threads": 2, "device": "cpu"},
        "time_budget_min": args.time_budget,
        "results": results,
        "command": "python benchmarks/bench_superres.py " + " ".join(sys.argv[1:]),
    }
    emit(result, args.json)


if __name__ == "__main__":
    main()
