"""Speed and peak memory of `reconstruct` vs SimpleITK B-spline resampling, in the same run.

Each measurement runs in a fresh process so its peak resident memory is its own. Prints JSON.

    python benchmarks/bench_reconstruct.py [--input FILE] [--spacing 1] [--model NAME] [--max-memory GB ...]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _job(kind: str, path: str, spacing: list[float], model: str | None, max_memory: float | None, queue) -> None:
    try:
        _run(kind, path, spacing, model, max_memory, queue)
    except Exception as exc:  # report, never leave the parent waiting
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def _run(kind: str, path: str, spacing: list[float], model: str | None, max_memory: float | None, queue) -> None:
    import numpy as np
    import torch

    from medil_backend import load_model, output_grid, read_volume, reconstruct
    from medil_backend.baselines import resample_sitk

    torch.set_num_threads(2)
    vol = read_volume(path)
    target = output_grid(vol.grid, spacing=spacing)
    net = load_model(model).net if kind == "medil" else None
    base = _peak_mb()
    t0 = time.perf_counter()
    if kind == "medil":
        out = reconstruct(vol, target, net, device="cpu", max_memory_gb=max_memory)
        meta = {"slab_thickness": out.meta["slab_thickness"]}
    else:
        out = resample_sitk(vol, target, "bspline")
        meta = {}
    seconds = time.perf_counter() - t0
    queue.put(
        {
            "seconds": seconds,
            "peak_rss_mb": _peak_mb(),
            "peak_rss_increase_mb": _peak_mb() - base,
            "output_shape": list(target.shape),
            "output_mb": out.array.nbytes / 2**20,
            "finite": bool(np.isfinite(out.array).all()),
            **meta,
        }
    )


def measure(kind: str, path: str, spacing, model, max_memory) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_job, args=(kind, path, spacing, model, max_memory, q))
    p.start()
    res = q.get()
    p.join()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", default=str(REPO / "examples/data/itk_t1_2x2x3mm.nii.gz"))
    ap.add_argument("--spacing", type=float, nargs="+", default=[1.0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--max-memory", type=float, nargs="+", default=[3.0, 1.0], help="MedIL memory limits to compare (GB)")
    args = ap.parse_args()
    from medil_backend.models import DEFAULT_MODEL

    bspline = measure("bspline", args.input, args.spacing, None, None)
    runs = {f"medil_max{m:g}GB": measure("medil", args.input, args.spacing, args.model, m) for m in args.max_memory}
    first = runs[next(iter(runs))]
    if "error" in first or "error" in bspline:
        print(json.dumps({"error": first.get("error") or bspline.get("error")}))
        raise SystemExit(1)
    report = {
        "benchmark": "reconstruct vs SimpleITK B-spline",
        "input": Path(args.input).name,
        "spacing": args.spacing,
        "model": args.model or DEFAULT_MODEL,
        "machine": f"{platform.machine()}, {mp.cpu_count()} cores, CPU",
        "baseline_bspline": bspline,
        **runs,
        "medil_over_bspline_time": first["seconds"] / bspline["seconds"],
        "medil_over_bspline_peak_rss_increase": first["peak_rss_increase_mb"] / max(bspline["peak_rss_increase_mb"], 1e-9),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
