"""Speed and peak memory of `medil sample` (one 1 mm brain in the model's default space), with SimpleITK
B-spline resampling of a real head onto the same grid in the same run as a yardstick; and a wide
field of view (a 320 mm cube at 1 mm, 33 M voxels) drawn in one denoising pass under a generous
memory limit and patch-wise under a tight one, from the same seed: time, peak memory against the
limit, and how far the patch-wise volume lies from the one-pass one (PSNR and correlation).

Each job runs in a fresh process; its peak resident memory is the process's high-water mark
(``VmHWM``) minus what it held after importing torch and loading the models. Prints JSON.

    python benchmarks/bench_sample.py [--steps K] [--model medil-brain-t1-ldm] [--wide-limits 8 1]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "data" / "itk_t1_2x2x3mm.nii.gz"


def _status(key: str) -> int:
    with open("/proc/self/status") as fh:
        return [int(line.split()[1]) * 1024 for line in fh if line.startswith(key)][0]


def _wide_grid():
    import numpy as np

    from medil_backend.geometry import Grid, affine_from_parts

    return Grid((320, 320, 320), affine_from_parts([1.0, 1.0, 1.0], np.eye(3), [-159.5, -159.5, -159.5]))


def _sample(model: str, steps: int | None, wide: bool = False, max_memory_gb: float | None = None, save: str | None = None) -> dict:
    import numpy as np
    import torch

    from medil_backend.ops.sample import load_sampler, sample

    sampler = load_sampler(model)
    steps = sampler.default_steps if steps is None else steps
    grid = _wide_grid() if wide else sampler.default_grid()
    base = _status("VmRSS")
    marks = {}

    def progress(fraction: float, message: str) -> None:
        if "decoding" in message and "decode_start" not in marks:
            marks["decode_start"] = time.perf_counter()

    t0 = time.perf_counter()
    (v,) = sample(sampler, grid, seed=0, steps=steps, progress=progress, max_memory_gb=max_memory_gb)
    t1 = time.perf_counter()
    if save:
        np.save(save, v.array)
    windows = v.meta["denoise_windows"]
    return {
        "job": "medil sample" + (f", wide field of view, {'patch-wise' if windows > 1 else 'one pass'}" if wide else ""),
        "max_memory_gb": max_memory_gb,
        "denoise_windows": windows,
        "shape": list(grid.shape),
        "spacing_mm": [float(s) for s in grid.spacing],
        "steps": steps,
        "latent_shape": v.meta["latent_grid"]["shape"],
        "seconds": round(t1 - t0, 2),
        "denoise_seconds": round(marks.get("decode_start", t1) - t0, 2),
        "decode_seconds": round(t1 - marks.get("decode_start", t1), 2),
        "peak_rss_increase_gb": round((_status("VmHWM") - base) / 2**30, 3),
        "threads": torch.get_num_threads(),
    }


def _bspline(model: str) -> dict:
    import numpy as np

    from medil_backend.baselines import resample_sitk
    from medil_backend.geometry import centred
    from medil_backend.io import read_volume
    from medil_backend.metrics import foreground_centres
    from medil_backend.ops.sample import load_sampler

    grid = load_sampler(model).default_grid()
    v = read_volume(EXAMPLE)
    v.affine = centred(v.grid, foreground_centres(v.array.astype(np.float32), "mri")).affine  # the head around the origin
    base = _status("VmRSS")
    t0 = time.perf_counter()
    out = resample_sitk(v, grid, "bspline")
    t1 = time.perf_counter()
    assert out.array.shape == grid.shape
    return {
        "job": "SimpleITK B-spline (a real head onto the same grid)",
        "shape": list(grid.shape),
        "seconds": round(t1 - t0, 2),
        "peak_rss_increase_gb": round((_status("VmHWM") - base) / 2**30, 3),
    }


def _job(name: str, args, queue) -> None:
    try:
        queue.put(_sample(*args) if name == "sample" else _bspline(*args))
    except Exception as exc:
        queue.put({"job": name, "error": f"{type(exc).__name__}: {exc}"})


def _agreement(one_pass: str, patch_wise: str) -> dict:
    import numpy as np

    a, b = np.load(one_pass), np.load(patch_wise)
    peak = float(np.percentile(a, 99.9))
    mse = float(np.mean((a - b) ** 2))
    return {
        "job": "patch-wise against one pass (same seed and grid)",
        "psnr_db": round(10 * np.log10(peak**2 / max(mse, 1e-20)), 2),
        "correlation": round(float(np.corrcoef(a.ravel(), b.ravel())[0, 1]), 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the model card's)")
    ap.add_argument("--model", default="medil-brain-t1-ldm")
    ap.add_argument("--wide-limits", type=float, nargs=2, default=(8.0, 1.0), metavar=("ONE_PASS_GB", "PATCH_WISE_GB"))
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        saved = [str(Path(tmp) / f"wide{i}.npy") for i in range(2)]
        jobs = [("bspline", (args.model,)), ("sample", (args.model, args.steps))]
        jobs += [("sample", (args.model, args.steps, True, limit, path)) for limit, path in zip(args.wide_limits, saved)]
        for name, jargs in jobs:
            q = ctx.Queue()
            p = ctx.Process(target=_job, args=(name, jargs, q))
            p.start()
            results.append(q.get())
            p.join()
        if all(Path(f).exists() for f in saved):
            results.append(_agreement(*saved))
    print(json.dumps({"machine": f"{platform.machine()} CPU, {mp.cpu_count()} cores", "results": results}, indent=2))


if __name__ == "__main__":
    main()
