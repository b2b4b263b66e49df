"""One scan of a batch, as a Dask worker runs it: lock, run the task from file to files, thumbnail, record.

A user error (a bad file, a grid that misses the scan) is recorded as the scan's failure and the
batch goes on; only a worker that dies (out of memory, killed) makes Dask run the scan again.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import MedILError
from .scans import Scan


@dataclass
class ScanJob:
    """Everything a worker needs for one scan (plain data: it travels to the worker)."""

    scan: Scan
    task: str
    out_dir: str
    output: str  # the main output file
    options: dict  # the task's checked options, with this scan's path options filled in
    request: dict  # spacing, orientation, fov, like (a path)
    model: str | None
    device: str
    precision: str
    max_memory_gb: float | None
    threads: int
    key: str  # the run key recorded in every sidecar (resume)
    command: str = ""
    thumbnail: str | None = None  # where the three-plane thumbnail goes (None: none)


class PeakMemory:
    """The peak resident memory of this process while the block runs (sampled every 50 ms)."""

    def __enter__(self) -> PeakMemory:
        import psutil

        self._proc = psutil.Process()
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def _uncertainty_summary(result) -> dict | None:
    import numpy as np

    for out in result.outputs:
        if out.role == "uncertainty":
            a = np.asarray(out.volume.array, dtype=np.float32)
            return {"mean": float(a.mean()), "p95": float(np.percentile(a, 95)), "max": float(a.max())}
    return None


#: the models this worker process has loaded, kept across its scans (RunContext.cached)
_MODELS: dict = {}


def run_scan(job: ScanJob) -> dict:
    """Run one scan; returns its record for the report (never raises for a user error)."""
    from ..frontend import user_message
    from ..io import read_grid
    from ..task import GridRequest, RunContext, get_task
    from ..task_files import run_task_to_files
    from .derivatives import ScanLock

    record: dict = {"id": job.scan.id, "input": job.scan.input, "subject": job.scan.subject, "session": job.scan.session}
    out_dir = Path(job.out_dir)
    lock = ScanLock(out_dir, job.scan.id)
    if not lock.acquire():
        owner = lock.owner() or {}
        record.update(status="busy", message=f"another run (process {owner.get('pid', '?')} on {owner.get('host', '?')}) is working on it")
        return record
    t0 = time.perf_counter()
    try:
        import torch

        torch.set_num_threads(max(1, int(job.threads)))
        spec = get_task(job.task)
        with PeakMemory() as mem:
            try:
                req = dict(job.request)
                like = req.pop("like", None)
                if isinstance(req.get("orientation"), list):  # a direction matrix travels as nested lists
                    import numpy as np

                    req["orientation"] = np.asarray(req["orientation"], dtype=np.float64)
                request = GridRequest(like=read_grid(like) if like else None, **req).check()
                ctx = RunContext.resolve(job.device, job.precision, job.max_memory_gb)
                ctx.models = _MODELS  # this worker's models, loaded at its first scan that needs each
                Path(job.output).parent.mkdir(parents=True, exist_ok=True)
                run = run_task_to_files(
                    spec,
                    job.scan.input,
                    job.output,
                    request,
                    job.options,
                    ctx,
                    job.model,
                    overwrite=True,  # the batch owns its derivatives: an incomplete or outdated one is replaced
                    command=job.command,
                    input_name=Path(job.scan.input).name,
                    record={"batch": {"key": job.key, "scan": job.scan.id, "source": job.scan.input}},
                )
            except MedILError as exc:
                record.update(status="failed", message=user_message(exc))
                return record
        summary = run.result.summary
        record.update(status="done", outputs=[str(p) for p in run.written])
        if "consistency_residual_after" in summary:
            record["residual"] = {
                "before": summary.get("consistency_residual_before"),
                "after": summary.get("consistency_residual_after"),
            }
        unc = _uncertainty_summary(run.result)
        if unc is not None:
            record["uncertainty"] = unc
        if summary.get("modality"):
            record["modality"] = summary["modality"]
        if job.thumbnail and run.volume is not None:
            try:
                from ..preview import comparison_png

                Path(job.thumbnail).parent.mkdir(parents=True, exist_ok=True)
                pixel = max(1.0, float(min(run.volume.grid.spacing.min(), run.result.outputs[0].volume.grid.spacing.min())))
                comparison_png([run.result.outputs[0].volume, run.volume], job.thumbnail, pixel_mm=pixel)
                record["thumbnail"] = os.path.relpath(job.thumbnail, out_dir)
            except (MedILError, OSError, ValueError) as exc:  # a picture is not worth a scan's result
                record["thumbnail_error"] = str(exc)
        return record
    finally:
        record["seconds"] = round(time.perf_counter() - t0, 2)
        if "mem" in locals():
            record["peak_memory_gb"] = round(mem.peak / 2**30, 3)
        lock.release()


__all__ = ["PeakMemory", "ScanJob", "run_scan"]
