"""``medil batch TASK INPUT OUTPUT_DIR``: one task over a whole dataset, each scan one Dask task.

Everything is checked before a worker starts: the task's options (from its spec), the output grid,
the scans found, the output folder. Scans whose outputs are complete for these settings are skipped
with ``--resume``; an output folder holding earlier results needs ``--resume`` or ``--overwrite``.
The report is written at the end, also after Ctrl-C (what finished is kept).
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..errors import MedILError
from .derivatives import REPORT_STEM, incomplete_reason, run_key, write_dataset_description
from .report import counts, write_report
from .scans import find_scans
from .worker import ScanJob


@dataclass(frozen=True)
class BatchRequest:
    """One batch run, as the command line (or any front end) asks for it: the task, the dataset, the output folder,
    the task's options by name (checked against its spec before any work), the output grid and the cluster."""

    task: str
    input: str
    output_dir: str
    options: dict = field(default_factory=dict)
    model: str | None = None
    spacing: list | None = None
    orientation: str | None = None
    fov: list | None = None
    like: str | None = None
    device: str = "auto"
    precision: str = "auto"
    max_memory: float | None = None
    participant_label: list | None = None
    resume: bool = False
    overwrite: bool = False
    scheduler: str = "local"
    workers: int | None = None
    threads_per_worker: int = 1
    retries: int = 2
    no_thumbnails: bool = False
    slurm_queue: str | None = None
    slurm_account: str | None = None
    slurm_walltime: str = "02:00:00"
    progress: str = "bar"
    argv: tuple = ()  # the command's words, recorded in the report and each sidecar

    @classmethod
    def from_namespace(cls, args) -> BatchRequest:
        """The request an argparse namespace of ``medil batch`` holds (its task's options by their spec's names)."""
        from ..task import get_task

        spec = get_task(args.task)
        given = {f.name: getattr(args, f.name) for f in fields(cls) if f.name != "options" and hasattr(args, f.name)}
        given["argv"] = tuple(given.get("argv") or ())
        return cls(**given, options={o.name: getattr(args, o.name) for o in spec.options if hasattr(args, o.name)})


def _grid_request(args: BatchRequest) -> dict:
    """The command line's output-grid request (checked as for one volume) as plain data for the workers."""
    from ..frontend import grid_request

    request = grid_request(spacing=args.spacing, orientation=args.orientation, fov=args.fov, like=args.like)  # refused now, not per scan
    if args.like:
        return {"like": str(Path(args.like).resolve())}
    out: dict = {}
    if request.spacing:
        out["spacing"] = list(request.spacing)
    if request.orientation is not None:
        o = request.orientation
        out["orientation"] = o.tolist() if hasattr(o, "tolist") else o
    if request.fov:
        out["fov"] = list(request.fov)
    return out


def _eta(done: int, remaining: int, elapsed: float) -> str:
    from ..ops.runtime import format_seconds

    return format_seconds(elapsed / done * remaining) if done else "?"


def plan_jobs(args: BatchRequest, spec, out_dir: Path) -> tuple[list[ScanJob], list[dict]]:
    """The scans to run and the records of those skipped as already done; refuses what cannot run."""
    options_in = {o.name: args.options.get(o.name, o.default) for o in spec.options}
    path_options = [o.name for o in spec.options if o.path and not o.stacks_only]
    for name in path_options:  # a batch writes these per scan: the flag says whether
        options_in[name] = "PLACEHOLDER.nii.gz" if options_in[name] else None
    request = _grid_request(args)
    from ..task import GridRequest

    checked = spec.checked_options(options_in, GridRequest(spacing=request.get("spacing"), fov=request.get("fov")))
    key_options = {k: (bool(v) if k in path_options else v) for k, v in checked.items()}
    key = run_key(spec.name, key_options, request, args.model)
    scans = find_scans(args.input, args.participant_label, skip=out_dir)
    command = "medil " + shlex.join(args.argv)
    jobs, skipped, existing = [], [], []
    for scan in scans:
        output = scan.derivative(out_dir, f"medil{spec.name}")
        options = dict(checked)
        images = [output]
        for name in path_options:
            if checked.get(name):
                extra = scan.derivative(out_dir, f"medil{spec.name}{name}")
                options[name] = str(extra)
                images.append(extra)
        job = ScanJob(
            scan,
            spec.name,
            str(out_dir),
            str(output),
            options,
            request,
            args.model,
            args.device,
            args.precision,
            args.max_memory,
            args.threads_per_worker,
            key,
            command,
            None if args.no_thumbnails else str(out_dir / f"{REPORT_STEM}_files" / f"{scan.id}.png"),
        )
        if any(p.exists() for p in images):
            if args.resume and incomplete_reason(images, key) is None:
                skipped.append({"id": scan.id, "input": scan.input, "subject": scan.subject, "session": scan.session,
                                "status": "skipped", "outputs": [str(p) for p in images], "message": "complete from an earlier run"})  # fmt: skip
                continue
            existing.append(output)
        jobs.append(job)
    if existing and not (args.resume or args.overwrite):
        raise MedILError(
            f"{out_dir} already holds outputs of {len(existing)} scan(s) (e.g. {existing[0]}); add --resume to skip the complete "
            "ones and redo the rest, or --overwrite to redo them all",
            options=("resume",),
        )
    return jobs, skipped


def run_batch(args: BatchRequest) -> int:
    """Run ``args`` (a :class:`BatchRequest`) over its dataset; the exit status."""
    from ..limits import DEFAULT_MAX_MEMORY_GB
    from ..task import RunContext, get_task

    spec = get_task(args.task)
    if args.resume and args.overwrite:
        raise MedILError("--resume keeps complete outputs and --overwrite redoes them: choose one", options=("resume",))
    RunContext.resolve(args.device, args.precision, args.max_memory)  # a bad device or memory limit is refused before any worker starts
    from .cluster import check_cluster_options

    check_cluster_options(args.scheduler, args.workers, args.threads_per_worker, args.retries)
    out_dir = Path(args.output_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise MedILError(f"{out_dir} is a file; the batch's output is a folder: give a folder name")
    source = Path(args.input).expanduser()
    if source.is_dir() and out_dir.resolve() == source.resolve():
        raise MedILError(
            f"the output folder is the input dataset {source}; write derivatives to their own folder (e.g. {source}/derivatives/medil)"
        )
    jobs_planned, skipped = plan_jobs(args, spec, out_dir)  # everything checked before the folder is made
    out_dir.mkdir(parents=True, exist_ok=True)
    write_dataset_description(out_dir, spec.name, args.input)
    records: list[dict] = list(skipped)
    total = len(jobs_planned) + len(skipped)
    t0 = time.perf_counter()
    run_info = {"task": spec.name, "command": "medil " + shlex.join(args.argv), "input": str(source), "scans": total}
    show = _progress(args.progress, total)
    show(records, t0)
    cluster = None
    interrupted = False
    try:
        if jobs_planned:
            from .cluster import Cluster, SlurmResources

            memory = args.max_memory or DEFAULT_MAX_MEMORY_GB
            slurm = SlurmResources(args.slurm_queue, args.slurm_account, args.slurm_walltime)
            cluster = Cluster(args.scheduler, args.workers, args.threads_per_worker, memory, args.retries, slurm)
            run_info["workers"] = cluster.workers
            run_info["scheduler"] = args.scheduler
            records += _run_on(cluster, jobs_planned, records, show, t0)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if cluster is not None:
            cluster.close()
        done_ids = {r["id"] for r in records}
        for job in jobs_planned:
            if job.scan.id not in done_ids:
                records.append({"id": job.scan.id, "input": job.scan.input, "status": "failed", "message": "not run (interrupted)"})
        run_info["seconds"] = round(time.perf_counter() - t0, 1)
        js, page = write_report(out_dir, records, run_info)
    c = counts(records)
    if args.progress == "json":
        print(json.dumps({"done": True, **c, "report": str(js)}), flush=True)
    print(
        f"medil batch: {c['done']} run, {c['skipped']} already done, {c['failed']} failed, {c['busy']} held by another run "
        f"({run_info['seconds']:.0f} s); report: {page}",
        file=sys.stderr,
    )
    if interrupted:
        print("medil: interrupted; run again with --resume to finish the rest", file=sys.stderr)
        return 130
    if c["failed"] or c["busy"]:
        bad = [r for r in records if r["status"] in ("failed", "busy")]
        names = "; ".join(f"{r['id']}: {r.get('message', '')}" for r in bad[:5]) + ("; ..." if len(bad) > 5 else "")
        print(
            f"medil: error: {len(bad)} of {total} scans were not done ({names}); see {page}, fix them and run again with --resume",
            file=sys.stderr,
        )
        return 1
    return 0


def _run_on(cluster, jobs: list[ScanJob], records: list[dict], show, t0: float) -> list[dict]:
    from distributed import as_completed

    from .worker import run_scan

    futures = {cluster.client.submit(run_scan, job, key=f"medil-{job.scan.id}-{time.time_ns()}", pure=False): job for job in jobs}
    new: list[dict] = []
    try:
        for future in as_completed(futures):
            job = futures[future]
            try:
                record = future.result()
            except Exception as exc:  # the worker died (out of memory, killed) more often than allowed
                name = type(exc).__name__
                why = (
                    "its worker process died each time it ran (out of memory? lower --max-memory or --workers)"
                    if name == "KilledWorker"
                    else f"{name}: {exc}"
                )
                record = {"id": job.scan.id, "input": job.scan.input, "status": "failed", "message": why}
            new.append(record)
            show(records + new, t0)
    except BaseException:  # Ctrl-C: keep what finished (the caller records the rest as not run)
        for f in futures:
            f.cancel()
        records.extend(new)
        raise
    return new


def _progress(mode: str, total: int):
    """A one-line progress display (done / failed / remaining, ETA) on stderr, or JSON lines on stdout."""
    last = {"n": -1}

    def show(records: list[dict], t0: float) -> None:
        c = counts(records)
        finished = sum(c.values())
        if finished == last["n"]:
            return
        last["n"] = finished
        remaining = total - finished
        elapsed = time.perf_counter() - t0
        ran = c["done"] + c["failed"] + c["busy"]
        if mode == "json":
            latest = records[-1] if records else {}
            print(json.dumps({"scan": latest.get("id"), "status": latest.get("status"), **c, "remaining": remaining}), flush=True)
        elif mode == "bar":
            end = "\n" if remaining == 0 else ""
            sys.stderr.write(
                f"\rmedil batch: {c['done'] + c['skipped']}/{total} done, {c['failed']} failed, {remaining} remaining, "
                f"ETA {_eta(ran, remaining, elapsed)}   {end}"
            )
            sys.stderr.flush()

    return show


__all__ = ["plan_jobs", "run_batch"]
