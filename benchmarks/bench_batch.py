"""Throughput and scaling of `medil batch`: one task over a folder of N copies of the bundled example
scan, with 1 worker and with 2 workers (1 torch thread each), and with 1 worker of 2 threads, each
run a fresh `medil batch` process (Dask LocalCluster start-up included in the wall time). Baseline in
the same run: the same N scans one `medil` command after another (what a researcher's shell loop
does). Prints JSON.

    python benchmarks/bench_batch.py [--n 8] [--task superres --method fast] [--out benchmarks/results/bench_batch.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import emit

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "data" / "itk_t1_2x2x3mm.nii.gz"


def _batch(folder: Path, out: Path, task_args: list[str], workers: int, threads: int) -> dict:
    cmd = [sys.executable, "-m", "medil_backend", "batch", *task_args[:1], str(folder), str(out), *task_args[1:]]
    cmd += ["--workers", str(workers), "--threads-per-worker", str(threads), "--progress", "none", "--no-thumbnails"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"medil batch failed: {proc.stderr[-2000:]}")
    report = json.loads((out / "medil_batch_report.json").read_text())
    scans = report["scans"]
    return {
        "workers": workers,
        "threads_per_worker": threads,
        "wall_s": round(wall, 2),
        "scans_per_min": round(60 * len(scans) / wall, 2),
        "mean_scan_s": round(sum(s["seconds"] for s in scans) / len(scans), 2),
        "max_peak_memory_gb": max(s["peak_memory_gb"] for s in scans),
    }


def _loop(folder: Path, out: Path, task_args: list[str]) -> dict:
    """The baseline: one `medil` command per scan, in turn (a shell loop)."""
    out.mkdir()
    t0 = time.perf_counter()
    for f in sorted(folder.iterdir()):
        cmd = [sys.executable, "-m", "medil_backend", task_args[0], str(f), str(out / f.name), *task_args[1:], "--progress", "none"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"medil failed: {proc.stderr[-2000:]}")
    wall = time.perf_counter() - t0
    n = len(list(folder.iterdir()))
    return {"workers": "loop", "threads_per_worker": os.cpu_count(), "wall_s": round(wall, 2), "scans_per_min": round(60 * n / wall, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8, help="copies of the example scan (default 8)")
    ap.add_argument("--task", default="superres")
    ap.add_argument("--method", default="fast", help="superres method (default fast)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    task_args = [args.task] + (["--method", args.method] if args.task == "superres" else [])
    work = Path(tempfile.mkdtemp(prefix="medil-bench-batch-"))
    try:
        folder = work / "scans"
        folder.mkdir()
        for i in range(args.n):
            shutil.copyfile(EXAMPLE, folder / f"scan{i:03d}.nii.gz")
        runs = [_loop(folder, work / "loop", task_args)]
        for workers, threads in ((1, 1), (2, 1), (1, 2)):
            runs.append(_batch(folder, work / f"w{workers}t{threads}", task_args, workers, threads))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    one = next(r for r in runs if r["workers"] == 1 and r["threads_per_worker"] == 1)
    two = next(r for r in runs if r["workers"] == 2)
    result = {
        "benchmark": "bench_batch",
        "task": " ".join(task_args),
        "scans": args.n,
        "scan": f"{EXAMPLE.name} (128x128x62, 2x2x3 mm), copied",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "runs": runs,
        "speedup_2_workers_vs_1": round(one["wall_s"] / two["wall_s"], 2),
        "speedup_2_workers_vs_loop": round(runs[0]["wall_s"] / two["wall_s"], 2),
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
