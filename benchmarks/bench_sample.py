"""Speed and peak memory of `medil sample` (one 1 mm brain in the model's default space), with SimpleITK
B-spline resampling of a real head onto the same grid in the same run as a yardstick.

Each job runs in a fresh process; its peak resident memory is the process's high-water mark
(``VmHWM``) minus what it held after importing torch and loading the models. Prints JSON.

    python benchmarks/bench_sample.py [--steps 25] [--model medil-brain-t1-ldm]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "data" / "itk_t1_2x2x3mm.nii.gz"


def _status(key: str) -> int:
    with open("/proc/self/status") as fh:
        return [int(line.split()[1]) * 1024 for line in fh if line.startswith(key)][0]


def _sample(model: str, steps: int) -> dict:
    import torch

    from medil_backend.ops.sample import load_sampler, sample

    sampler = load_sampler(model)
    grid = sampler.default_grid()
    base = _status("VmRSS")
    marks = {}

    def progress(fraction: float, message: str) -> None:
        if "decoding" in message and "decode_start" not in marks:
            marks["decode_start"] = time.perf_counter()

    t0 = time.perf_counter()
    (v,) = sample(sampler, grid, seed=0, steps=steps, progress=progress)
    t1 = time.perf_counter()
    return {
        "job": "medil sample",
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--model", default="medil-brain-t1-ldm")
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    results = []
    for name, jargs in (("bspline", (args.model,)), ("sample", (args.model, args.steps))):
        q = ctx.Queue()
        p = ctx.Process(target=_job, args=(name, jargs, q))
        p.start()
        results.append(q.get())
        p.join()
    print(json.dumps({"machine": f"{platform.machine()} CPU, {mp.cpu_count()} cores", "results": results}, indent=2))


if __name__ == "__main__":
    main()
