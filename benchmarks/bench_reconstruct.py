"""Speed and peak memory of `reconstruct` against SimpleITK B-spline resampling, in the same run.

Cases (each measurement in a fresh process, so its peak resident memory is its own):

- ``main``: the README's main job, the bundled 2x2x3 mm T1 example -> 1 mm, at several memory limits;
- ``head1mm``: a whole 1 mm T1 head (``pydeface_mean_head_t1``, 176x256x256) onto its own grid, at the default limit;
- ``ct512``: a 512x512x500 CT (the chest CT resampled onto 0.57x0.57x0.48 mm with B-spline) -> 1 mm, at the default limit;
- ``chest0p7``: a 1.5 mm chest CT (the same CT resampled to 1.5 mm) -> 0.7 mm, at the default limit.

Peak memory is the process's high-water mark (``VmHWM``, reset with ``/proc/self/clear_refs``
after the input is read and the model loaded), so ``peak_rss_increase_mb`` is what the job
itself added. Prints JSON.

    python benchmarks/bench_reconstruct.py [--cases main head1mm ct512 chest0p7] [--max-memory 3 1 0.75]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def _status(key: str) -> int:
    with open("/proc/self/status") as fh:
        return [int(line.split()[1]) * 1024 for line in fh if line.startswith(key)][0]


def _job(kind: str, path: str, spacing, max_memory, device, queue) -> None:
    try:
        queue.put(_run(kind, path, spacing, max_memory, device))
    except Exception as exc:  # report, never leave the parent waiting
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def _run(kind: str, path: str, spacing, max_memory, device: str = "cpu") -> dict:
    import numpy as np
    import torch

    from medil_backend import load_model, output_grid, read_volume
    from medil_backend.baselines import resample_sitk
    from medil_backend.intensity import guess_modality
    from medil_backend.models import default_model_for
    from medil_backend.ops import run_model

    torch.set_num_threads(2)
    vol = read_volume(path)
    target = output_grid(vol.grid, spacing=spacing) if spacing else vol.grid
    modality = guess_modality(vol.array)
    model = load_model(default_model_for(modality)) if kind == "medil" else None
    before = _status("VmHWM")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the high-water mark: measure what the job adds
    base = _status("VmRSS")
    t0 = time.perf_counter()
    meta: dict = {}
    if kind == "medil":
        out = run_model(vol, target, model.net, device=device, max_memory_gb=max_memory, modality=modality)
        if device != "cpu":
            torch.cuda.synchronize()
        meta = {
            "model": model.name,
            "tiles": out.meta["tiles"],
            "precision": out.meta["precision"],
            "output_on_disk": out.meta["output_on_disk"],
        }
    else:
        out = resample_sitk(vol, target, "bspline")
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM")
    return {
        "seconds": seconds,
        "peak_rss_increase_mb": (peak - base) / 2**20,
        "peak_rss_mb": max(peak, before) / 2**20,
        "input_shape": list(vol.grid.shape),
        "output_shape": list(target.shape),
        "finite": bool(np.isfinite(np.asarray(out.array)).all()),
        **meta,
    }


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"


def measure(kind: str, path: str, spacing, max_memory=None, device: str = "cpu") -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_job, args=(kind, path, spacing, max_memory, device, q))
    p.start()
    res = q.get()
    p.join()
    return res


def _prepare(case: str, folder: Path) -> tuple[str, list[float] | None]:
    """The input file and output spacing of a case (derived inputs are made once, outside the timing)."""
    import numpy as np

    from medil_backend.baselines import resample_sitk
    from medil_backend.geometry import Grid, Volume
    from medil_backend.io import read_volume, write_volume

    if case == "main":
        return str(REPO / "examples/data/itk_t1_2x2x3mm.nii.gz"), [1.0]
    if case == "head1mm":
        return str(DATA / "mri/pydeface_mean_head_t1.nii.gz"), None
    chest = read_volume(DATA / "ct/chest_ct_0p57x0p57x5mm.nrrd")
    lo, hi = chest.grid.extent()
    if case == "ct512":
        sp = np.array([chest.grid.spacing[0], chest.grid.spacing[1], (hi[2] - lo[2]) / 500])
        shape = (512, 512, 500)
        out_spacing = [1.0]
    elif case == "chest0p7":
        sp = np.full(3, 1.5)
        shape = tuple(int(round((h - lo_) / 1.5)) for lo_, h in zip(lo, hi))
        out_spacing = [0.7]
    else:
        raise SystemExit(f"unknown case {case}")
    g = Grid.from_parts(
        shape,
        sp,
        chest.grid.direction,
        chest.grid.voxel_to_world(np.zeros(3)) - chest.grid.direction @ (chest.grid.spacing / 2) + chest.grid.direction @ (sp / 2),
    )
    v = resample_sitk(Volume(chest.array.astype(np.float32), chest.affine, modality="ct"), g, "bspline")
    path = folder / f"{case}.nii"
    write_volume(Volume(np.round(v.array).astype(np.int16), g.affine, modality="ct"), path, dtype=np.int16)
    return str(path), out_spacing


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", nargs="+", default=["main", "head1mm", "ct512", "chest0p7"])
    ap.add_argument("--max-memory", type=float, nargs="+", default=[3.0, 1.0, 0.75], help="memory limits of the main job (GB)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (MedIL only; B-spline runs on the CPU)")
    args = ap.parse_args()
    report: dict = {
        "benchmark": "reconstruct vs SimpleITK B-spline",
        "machine": f"{platform.machine()}, {mp.cpu_count()} cores, " + ("CPU" if args.device == "cpu" else _gpu_name()),
        "cases": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            path, spacing = _prepare(case, Path(tmp))
            bspline = measure("bspline", path, spacing)
            limits = args.max_memory if case == "main" else [3.0]
            runs = {f"medil_max{m:g}GB": measure("medil", path, spacing, m, args.device) for m in limits}
            first = runs[next(iter(runs))]
            entry = {"input": Path(path).name, "spacing": spacing, "baseline_bspline": bspline, **runs}
            if "error" not in first and "error" not in bspline:
                entry["medil_over_bspline_time"] = first["seconds"] / bspline["seconds"]
            report["cases"][case] = entry
            print(json.dumps({case: entry}), flush=True, file=sys.stderr)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
