"""The ``medil`` command: every task (reconstruct, superres, sample), batch, evaluate, train and export, and the
helpers that describe files, models, tasks and the device.

User mistakes end in one line on stderr (``medil: error: ...``) and exit status 1 (2 for bad
command-line syntax); no traceback, and no output file is created or replaced.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import signal
import sys
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .errors import Cancelled, Interrupted, MedILError
from .frontend import grid_request, user_message
from .methods import TIME_BUDGET_MIN

#: the output-grid defaults of each task, as its help states them
_GRID_DEFAULTS = {
    "reconstruct": "output grid (default: the input's grid)",
    "superres": "output grid (default: the input's region, isotropic at its finest spacing)",
    "sample": "output grid (default: the model's default space, 1 mm around a head at the origin)",
}


def _add_task_parser(sub, spec, batch: bool = False) -> argparse.ArgumentParser:
    """A task's subcommand, built from its spec: input/output, model, the output grid, its declared
    options and the run context (device, precision, memory), the same for every task. ``batch``: the
    same task over a dataset (``medil batch TASK INPUT OUTPUT_DIR``), with the batch's own options."""
    p = _numbers_after_options(sub.add_parser(spec.name, help=spec.help, description=spec.help))
    if batch:
        p.add_argument(
            "input", help="a BIDS dataset, a folder of volumes (NIfTI, NRRD, MHA/MHD, DICOM series folders) or a CSV/JSON manifest"
        )
        p.add_argument("output_dir", help="the BIDS-derivatives folder to write (sub-*/[ses-*/]anat/*_desc-medil<task>_*.nii.gz)")
    else:
        if spec.needs_input and spec.max_inputs > 1:
            p.add_argument(
                "input",
                nargs="+",
                metavar="INPUT",
                help=f"NIfTI, NRRD, MHA/MHD file or DICOM series folder; or 2 to {spec.max_inputs} thick-slice stacks of one anatomy",
            )
            p.add_argument("--input-name", default=None, help=argparse.SUPPRESS)
        elif spec.needs_input:
            p.add_argument("input", help="NIfTI, NRRD, MHA/MHD file or DICOM series folder")
            p.add_argument(
                "--input-name", default=None, help=argparse.SUPPRESS
            )  # how messages call the input (the Slicer module's node name)
        series = f" (with --{spec.series} N > 1: OUTPUT_000.nii.gz, ...)" if spec.series else ""
        p.add_argument("output", help=f"output file: .nii, .nii.gz, .nrrd or .mha{series}")
    if spec.model_kind == "autoencoder":
        p.add_argument(
            "--model",
            default=None,
            help="model name (see `medil models`) or path to a model card (default: medil-ct for CT, medil-brain-t1 otherwise)",
        )
    elif spec.model_kind == "diffusion":
        what = "cycles, inverse: " if spec.needs_input else ""
        p.add_argument("--model", default=None, help=f"{what}latent diffusion model name or card path (default medil-brain-t1-ldm)")
    g = p.add_argument_group(_GRID_DEFAULTS.get(spec.name, "output grid"))
    g.add_argument("--like", metavar="REF", help="exactly the grid of REF (shape, spacing, direction, origin)")
    g.add_argument("--spacing", type=float, nargs="+", metavar="S", help="output spacing in mm: one value (isotropic) or three")
    g.add_argument(
        "--orientation",
        metavar="CODE",
        help="input (default), aligned (nearest axis-aligned, de-obliqued), a code such as RAS, LPS, LIA, "
        "or a direction matrix as 9 comma-separated numbers (row-major; column n is voxel axis n in RAS)",
    )
    g.add_argument("--fov", type=float, nargs=6, metavar=("XMIN", "XMAX", "YMIN", "YMAX", "ZMIN", "ZMAX"), help="world RAS box in mm")
    t = p.add_argument_group(f"{spec.name} options")
    for o in spec.options:
        if batch and o.stacks_only:  # a batch's scan is one input
            continue
        if o.flag_only or (batch and o.path):  # in a batch, a file option writes one more derivative per scan
            what = f"{o.help} (in a batch: one more derivative per scan, desc-medil{spec.name}{o.name})" if batch and o.path else o.help
            t.add_argument(o.flag, action="store_true", help=what)
        else:
            kind = o.type if o.type in (int, float) else str
            t.add_argument(o.flag, type=kind, default=o.default, choices=list(o.choices) or None, metavar=o.metavar, help=o.help)
    from .task import CONTEXT_OPTIONS

    c = p.add_argument_group("run")
    for o in CONTEXT_OPTIONS:
        c.add_argument(o.flag, type=o.type, default=o.default, choices=list(o.choices) or None, metavar=o.metavar, help=o.help)
    if not batch:
        _add_nifti_geometry(c)
    if batch:
        _add_batch_options(p)
    else:
        c.add_argument("--overwrite", action="store_true", help="replace existing outputs (all files of the result)")
    c.add_argument(
        "--progress", default="bar", choices=["bar", "json", "none"], help="progress display (json: one JSON object a line on stdout)"
    )
    return p


def _add_nifti_geometry(group) -> None:
    group.add_argument(
        "--nifti-geometry",
        choices=["sform", "qform"],
        default=None,
        help="a NIfTI input (or --like reference) whose qform and sform disagree is placed by its sform (default, the NIfTI-1 "
        "standard) or by its qform (where Slicer shows it so)",
    )


def _add_batch_options(p: argparse.ArgumentParser) -> None:
    b = p.add_argument_group("batch")
    b.add_argument("--participant-label", nargs="+", metavar="LABEL", help="only these participants (with or without sub-)")
    b.add_argument("--resume", action="store_true", help="skip scans whose outputs are complete for these settings; redo the rest")
    b.add_argument("--overwrite", action="store_true", help="redo every scan, replacing earlier outputs")
    b.add_argument(
        "--scheduler",
        default="local",
        metavar="local|ADDRESS|slurm",
        help="local: a Dask cluster on this machine (default); tcp://HOST:PORT: an existing Dask scheduler; "
        "slurm: SLURM jobs through dask-jobqueue (pip install 'medil-backend[cluster]')",
    )
    b.add_argument("--workers", type=int, default=None, metavar="N", help="worker processes (default: what the cores and memory allow)")
    b.add_argument("--threads-per-worker", type=int, default=1, metavar="T", help="torch threads of each worker (default 1)")
    b.add_argument("--retries", type=int, default=2, metavar="R", help="runs of a scan whose worker died (default 2)")
    b.add_argument("--no-thumbnails", action="store_true", help="no three-plane pictures in the HTML report")
    b.add_argument("--slurm-queue", default=None, metavar="Q", help="slurm: the partition")
    b.add_argument("--slurm-account", default=None, metavar="A", help="slurm: the account")
    b.add_argument("--slurm-walltime", default="02:00:00", metavar="HH:MM:SS", help="slurm: each worker job's time limit")


#: what argparse takes for a negative number rather than an option (its own pattern misses 1e3 and inf)
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|nan)$", re.IGNORECASE)


def _numbers_after_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--fov -1e3 ...``: a negative number in any notation is a value, not an option."""
    if hasattr(parser, "_negative_number_matcher"):
        parser._negative_number_matcher = _NEGATIVE_NUMBER
    return parser


def build_parser() -> argparse.ArgumentParser:
    ap = _numbers_after_options(
        argparse.ArgumentParser(prog="medil", description="Resolution-free medical imaging with MedIL autoencoders.")
    )
    ap.add_argument("--version", action="version", version=f"medil {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    from .task import SUPERRES_METHODS, TASKS

    for spec in TASKS.values():
        _add_task_parser(sub, spec)
    batch = sub.add_parser(
        "batch",
        help="run a task over a whole dataset (BIDS, a folder or a manifest) on a Dask cluster into a BIDS-derivatives tree, "
        "resumable, with a JSON + HTML report",
    )
    batch_tasks = batch.add_subparsers(dest="task", required=True, metavar="TASK")
    for spec in TASKS.values():
        if spec.needs_input:
            _add_task_parser(batch_tasks, spec, batch=True)
    sub.add_parser("tasks", help="the tasks and their options (for frontends)").add_argument("--json", action="store_true")

    sub.add_parser(
        "train", help="train a model with Lightning: medil train --config CONFIG.yaml [overrides] (see training/configs)", add_help=False
    )
    sub.add_parser("models", help="list bundled and installed models").add_argument("--json", action="store_true")
    sub.add_parser("device", help="the compute devices this backend's PyTorch sees (what --device auto picks)").add_argument(
        "--json", action="store_true"
    )

    e = sub.add_parser("evaluate", help="metrics of models vs trilinear and B-spline on reconstruction and thick-slice super-resolution")
    e.add_argument("volumes", nargs="+", help="ground-truth volumes (held out from training)")
    e.add_argument(
        "--model",
        action="append",
        default=None,
        help="model name or card path (repeatable; default: medil-ct with --modality ct, else medil-brain-t1)",
    )
    e.add_argument(
        "--superres",
        action="append",
        default=[],
        choices=list(SUPERRES_METHODS),
        help="also score this super-resolution method (repeatable)",
    )
    e.add_argument(
        "--superres-samples", type=int, default=1, metavar="K", help="adapt, cycles: K seeds, and score the uncertainty map (K > 1)"
    )
    e.add_argument(
        "--superres-time-budget",
        type=float,
        default=None,
        metavar="MIN",
        help="adapt: training minutes per volume and task (default: the method's own, 3; several stacks: 0)",
    )
    e.add_argument(
        "--superres-model", default=None, metavar="LDM", help="inverse, cycles: the latent diffusion model (default: the bundled one)"
    )
    e.add_argument("--thick", type=float, nargs="+", default=[4.0, 8.0], metavar="MM", help="simulated slice thicknesses")
    e.add_argument(
        "--multistack",
        action="store_true",
        help="multi-stack super-resolution: each volume acquired as three orthogonal --thick stacks with known motion, "
        "scored against it and by leave-one-stack-out, next to B-spline and single-stack adapt",
    )
    e.add_argument("--modality", default="auto", choices=["mri", "ct", "auto"])
    e.add_argument("--device", default="auto")
    e.add_argument("--max-memory", type=float, default=None, metavar="GB", help="working-memory limit per reconstruction (default 3 GB)")
    e.add_argument("--json", metavar="FILE", help="also write the full results as JSON")
    e.add_argument("--markdown", metavar="FILE", help="also write the mean table as Markdown")
    e.add_argument("--overwrite", action="store_true", help="replace existing --json / --markdown reports")
    e.add_argument(
        "--record-in-cards", action="store_true", help="write each model's held-out metrics (and this command) into its model card"
    )

    eg = sub.add_parser(
        "evaluate-generative", help="diversity, Frechet distance on MedIL features, precision/recall and memorisation of a sampling model"
    )
    eg.add_argument("--model", default=None, help="latent diffusion model (default medil-brain-t1-ldm)")
    eg.add_argument("--train", nargs="+", required=True, metavar="PATH", help="the model's training volumes: files or data packs (.npz)")
    eg.add_argument("--held-out", nargs="+", required=True, metavar="PATH", help="real volumes the model never saw: files or packs")
    eg.add_argument("--n", type=int, default=8, help="samples to draw (default 8)")
    eg.add_argument("--seed", type=int, default=1000, help="first seed (default 1000)")
    eg.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the model card's, else 25)")
    eg.add_argument("--eta", type=float, default=None, help="DDIM stochasticity, as for sample")
    eg.add_argument("--spacing", type=float, default=2.0, metavar="MM", help="evaluation grid spacing (default 2 mm)")
    eg.add_argument("--max-memory", type=float, default=None, metavar="GB", help="peak memory of sampling (default 3 GB)")
    eg.add_argument(
        "--template", metavar="PATH", help="a head template: every volume is registered affinely to it (SimpleITK) for the realism figures"
    )
    eg.add_argument("--brain", metavar="PATH", help="a brain image in the template's space (the tissue fractions' mask)")
    eg.add_argument("--json", metavar="FILE", help="write the result as JSON")
    eg.add_argument("--markdown", metavar="FILE", help="write the table as Markdown")
    eg.add_argument("--overwrite", action="store_true", help="replace existing --json / --markdown reports")

    x = sub.add_parser("export", help="write a medil train checkpoint as safetensors + model card")
    x.add_argument("checkpoint", help="Lightning .ckpt of a medil train run (autoencoder or latent diffusion)")
    x.add_argument("--config", required=True, help="the run's YAML recipe")
    x.add_argument("--folder", default=None, help="output folder (default: the recipe's ExportWeights folder)")
    x.add_argument("--name", default=None, help="model name (default: the recipe's ExportWeights name)")
    x.add_argument("--overwrite", action="store_true", help="replace a model of that name in the folder")

    i = sub.add_parser("info", help="shape, spacing, orientation, extent and modality guess of a volume")
    i.add_argument("file")
    i.add_argument("--json", action="store_true")
    i.add_argument("--max-memory", type=float, default=None, metavar="GB", help="read the voxels only if they fit (default 3 GB)")
    _add_nifti_geometry(i)
    return ap


def _progress_callback(mode: str):
    if mode == "none":
        return None, lambda ok=True: None
    if mode == "json":

        def emit(fraction: float, message: str) -> None:
            print(json.dumps({"progress": round(fraction, 4), "message": message}), flush=True)

        return emit, lambda ok=True: None
    from tqdm import tqdm

    bars = []  # drawn at the first report, so an error found while planning prints alone

    def update(fraction: float, message: str) -> None:
        if not bars:
            bars.append(tqdm(total=100, unit="%", file=sys.stderr, bar_format="{desc} {bar} {n:.0f}% [{elapsed}<{remaining}]"))
        bars[0].set_description_str(message)
        bars[0].n = 100 * fraction
        bars[0].refresh()

    def close(ok: bool = True) -> None:
        for bar in bars:
            bar.leave = ok  # a failed run's bar is erased: the error line stands alone
            bar.close()

    return update, close


def cmd_task(args: argparse.Namespace) -> int:
    """The one handler of every task (see :mod:`medil_backend.task`): options checked, every output file
    declared, the run context resolved, all before any work; the input read; the task run; every file of
    the result committed together with one provenance record, or none."""
    from .task import RunContext, get_task
    from .task_files import run_task_to_files

    spec = get_task(args.command)
    request = grid_request(spacing=args.spacing, orientation=args.orientation, fov=args.fov, like=args.like)
    options = spec.checked_options({o.name: getattr(args, o.name) for o in spec.options}, request)
    ctx = RunContext.resolve(args.device, args.precision, args.max_memory)
    command = "medil " + shlex.join(args.argv)

    def written_one(out, path) -> None:
        if args.progress == "json":
            event = {"preview": str(path)} if out.role == "preview" else {"sampled": str(path), "seed": out.record.get("seed")}
            print(json.dumps(event), flush=True)

    update, close = _progress_callback(args.progress)
    ctx.progress = update
    try:
        run = run_task_to_files(
            spec,
            args.input if spec.needs_input else None,
            args.output,
            request,
            options,
            ctx,
            getattr(args, "model", None),
            overwrite=args.overwrite,
            command=command,
            input_name=getattr(args, "input_name", None),
            on_written=written_one,
        )
    except BaseException:
        close(ok=False)
        raise
    close()
    result, written = run.result, run.written
    prov = result.provenance.record()
    summary = {
        "output": str(written[0]) if written else None,
        "outputs": [str(p) for p in written],
        "model": prov["model"],
        "model_sha256": prov["model_sha256"],
        "version": __version__,
        "device": prov["device"],
        **{k: v for k, v in result.summary.items() if k != "grids"},
    }
    if result.outputs:
        grid = result.outputs[0].volume.grid
        summary.update(shape=list(grid.shape), spacing=[round(float(s), 6) for s in grid.spacing])
    if args.progress == "json":
        print(json.dumps({"done": True, **summary}, default=str), flush=True)
        return 0
    if result.summary.get("modality_guess"):
        print(f"medil: note: {result.summary['modality_guess']}", file=sys.stderr)
    grids = result.summary.get("grids") or [repr(o.volume.grid) for o in result.outputs]
    for path, grid in zip(written, grids):
        extra = ""
        if "consistency_residual_before" in result.summary and path == written[0]:
            extra = f"; data-consistency residual {result.summary['consistency_residual_before']:.2e} -> {result.summary['consistency_residual_after']:.2e}"
        print(f"wrote {path} {grid}{extra}{' (AI-generated)' if spec.series else ''}", file=sys.stderr)
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    from .batch.command import BatchRequest, run_batch

    return run_batch(BatchRequest.from_namespace(args))


def cmd_tasks(args: argparse.Namespace) -> int:
    from .task import tasks_json

    specs = tasks_json()
    if args.json:
        print(json.dumps(specs, indent=2))
    else:
        for spec in specs:
            print(f"{spec['name']:12s} {spec['help']}")
            for o in spec["options"]:
                print(f"    {o['flag']:18s} {o['help'][:100]}")
    return 0


def _volumes_of(paths: Sequence[str]) -> list:
    """Volumes from files, DICOM folders or data packs (``.npz``), each with its name in ``meta``."""
    from .io import read_volume

    out = []
    for p in paths:
        if str(p).endswith(".npz"):
            from .training.pack import read_pack

            for name, v, _ in read_pack(p):
                v.meta = {**(v.meta or {}), "name": f"{Path(p).name}#{name}"}
                out.append(v)
        else:
            v = read_volume(p)
            v.meta = {**(v.meta or {}), "name": Path(p).name}
            out.append(v)
    return out


def cmd_evaluate_generative(args: argparse.Namespace) -> int:
    from .evaluate_generative import evaluate_generative, markdown, write_reports

    if args.n < 2:
        raise MedILError("diversity needs at least 2 samples: --n 2 or more", options=("n",))
    from .io import check_report_path

    for out in (args.json, args.markdown):  # before minutes of sampling, not after
        check_report_path(out, args.overwrite)
    if args.json and args.markdown and os.path.realpath(args.json) == os.path.realpath(args.markdown):
        raise MedILError("--json and --markdown name the same file; give them different names")
    from .ops.runtime import check_seed

    check_seed(args.seed, args.n)
    train, held = _volumes_of(args.train), _volumes_of(args.held_out)
    if args.brain and not args.template:
        raise MedILError("--brain is the template's brain: give --template too", options=("brain",))
    template = _volumes_of([args.template])[0] if args.template else None
    brain = _volumes_of([args.brain])[0] if args.brain else None
    if template is not None:
        template.meta.setdefault("name", os.path.basename(args.template))
    update, close = _progress_callback("bar")
    try:
        same = {k: getattr(args, k) for k in ("n", "seed", "steps", "eta", "spacing")}
        result = evaluate_generative(
            args.model, train, held, **same, max_memory_gb=args.max_memory, progress=update, template=template, brain=brain
        )
    except BaseException:
        close(ok=False)
        raise
    close()
    result["command"] = "medil " + shlex.join(args.argv)
    write_reports(result, args.json, args.markdown, args.overwrite)
    print(markdown(result))
    return 0


def card_essentials(card: dict) -> dict:
    """What a user needs to choose a model: description, role, training data and time, held-out quality, licence."""
    training = card.get("training") or {}
    data = training.get("data") or {}
    held = ((card.get("metrics") or {}).get("held_out") or {}).get("mean") or {}
    name = card.get("name", "")
    quality = {task: round(float(rows[name]["psnr_mask"]), 2) for task, rows in held.items() if name in rows and "psnr_mask" in rows[name]}
    return {
        "description": card.get("description", ""),
        "role": card.get("role", "model"),
        "trained_on": {
            "volumes": len(data.get("train", [])) if isinstance(data, dict) else None,
            "synthetic": (data.get("synthetic") or {}).get("count") if isinstance(data, dict) else None,
            "minutes": training.get("minutes"),
            "hardware": training.get("hardware"),
        },
        "held_out_psnr_mask_db": quality,
        "licence": card.get("licence", "Apache-2.0 (weights); training data under their own licences (training/data_manifest.json)"),
    }


def cmd_device(args: argparse.Namespace) -> int:
    """What ``--device auto`` would use, asked of this interpreter's PyTorch (a frontend asks this instead of importing torch)."""
    try:
        import torch
    except ImportError:
        raise MedILError("PyTorch is not installed in this Python: install torch>=2.4 (in Slicer: the PyTorch extension)") from None

    cuda = torch.cuda.is_available()
    info = {
        "torch": torch.__version__,
        "cuda": cuda,
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
        "auto": "cuda" if cuda else "cpu",
        "threads": torch.get_num_threads(),
    }
    info["label"] = f"CUDA GPU ({info['cuda_device']})" if cuda else f"CPU only ({info['threads']} threads)"
    print(json.dumps(info, indent=2) if args.json else info["label"])
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models import DEFAULT_MODELS, list_models

    entries = list_models()
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "name": e.name,
                        "source": e.source,
                        "tasks": e.tasks,
                        "comparison_only": e.card.get("role") == "comparison",
                        "card": str(e.card_path),
                        "modality": e.card.get("modality"),
                        "latent": e.card.get("latent"),
                        **card_essentials(e.card),
                    }
                    for e in entries
                ],
                indent=2,
            )
        )
        return 0
    if not entries:
        print("no models found")
        return 0
    for e in entries:
        lat = e.card.get("latent", {})
        default_for = [m.upper() for m, n in DEFAULT_MODELS.items() if n == e.name]
        mark = f" (default for {', '.join(default_for)})" if default_for else ""
        if e.card.get("role") == "comparison":
            mark += " (comparison only)"
        print(
            f"{e.name}{mark}\t{e.source}\t{e.card.get('modality', '?')}\ttasks={','.join(e.tasks)}\t"
            f"latent={lat.get('channels', '?')}ch@{lat.get('spacing_mm', '?')}mm\t{e.card_path}"
        )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import numpy as np

    from .intensity import explain_modality
    from .io import read_grid, read_volume

    g = read_grid(args.file)
    lo, hi = g.extent()
    info = {
        "file": args.file,
        "shape": list(g.shape),
        "spacing_mm": [round(float(s), 6) for s in g.spacing],
        "orientation": g.orientation_code,
        "oblique": bool(not np.allclose(np.abs(g.direction), np.round(np.abs(g.direction)), atol=1e-4)),
        "origin_ras_mm": [round(float(o), 4) for o in g.origin],
        "extent_ras_mm": [[round(float(a), 3), round(float(b), 3)] for a, b in zip(lo, hi)],
        "affine_ras": [[round(float(x), 6) for x in row] for row in g.affine],
    }
    try:  # the voxels, when they fit the memory limit (a header can declare any size)
        v = read_volume(args.file, max_memory_gb=args.max_memory)
    except MedILError as exc:
        if "max_memory" not in exc.options:
            raise
        info.update(dtype=None, intensity_range=None, modality_guess=None, voxels_not_read=str(exc))
    else:
        modality, why = explain_modality(v.array, v.meta.get("dicom_modality"))
        info.update(
            dtype=str(v.array.dtype),
            intensity_range=[float(v.array.min()), float(v.array.max())],
            modality_guess=modality,
            modality_reason=why,
        )
        for key in ("non_finite_voxels", "read_as"):
            if key in v.meta:
                info[key] = v.meta[key]
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, val in info.items():
            print(f"{k:16s} {val}")
    return 0


def _evaluate_multistack(args: argparse.Namespace) -> int:
    """``medil evaluate --multistack``: simulated three-stack acquisitions with motion, and leave-one-stack-out."""
    from .evaluate_multistack import markdown, simulated
    from .io import read_volume, write_text_atomic

    result: dict = {"command": "medil " + shlex.join(args.argv), "volumes": []}
    for path in args.volumes:
        truth = read_volume(path)
        if args.modality != "auto":
            truth.modality = args.modality
        cases = [simulated(truth, t, adapt=True, budget_min=args.superres_time_budget) for t in args.thick]
        result["volumes"].append({"name": Path(path).name.split(".")[0], "shape": list(truth.array.shape), "cases": cases})
    table = markdown(result)
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=2) + "\n", args.overwrite)
    if args.markdown:
        write_text_atomic(args.markdown, table + "\n", args.overwrite)
    print(table)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate, markdown_table, target_table, to_json
    from .io import check_report_path, write_text_atomic
    from .models import default_model_for, load_model

    for out in (args.json, args.markdown):  # before any work: an existing report is kept unless --overwrite
        check_report_path(out, args.overwrite)
    if args.json and args.markdown and os.path.realpath(args.json) == os.path.realpath(args.markdown):
        raise MedILError("--json and --markdown name the same file; give them different names")
    for t in args.thick:
        if not t > 0:
            raise MedILError(f"--thick values must be positive mm, got {t}")
    if args.multistack:
        return _evaluate_multistack(args)
    specs = args.model or ([] if args.superres else [default_model_for(args.modality)])
    loaded = [load_model(m) for m in specs]
    result = evaluate(
        args.volumes,
        {m.name: m.net for m in loaded},
        args.thick,
        args.modality,
        args.device,
        max_memory_gb=args.max_memory,
        superres_methods=args.superres,
        superres_samples=args.superres_samples,
        superres_time_budget_min=TIME_BUDGET_MIN if args.superres_time_budget is None else args.superres_time_budget,
        superres_model=args.superres_model,
    )
    table = markdown_table(result)
    if loaded:
        table += "\n\n" + target_table(result, [m.name for m in loaded])
    if args.superres:
        from .evaluate import superres_table

        table += "\n\n" + superres_table(result, args.superres)
    print(table)
    if args.json:
        write_text_atomic(args.json, to_json(result) + "\n", args.overwrite)
    if args.markdown:
        write_text_atomic(args.markdown, table + "\n", args.overwrite)
    if args.record_in_cards:
        from .evaluate import record_in_card
        from .models import find_model

        command = "medil " + shlex.join(args.argv)
        for spec, m in zip(specs, loaded):
            record_in_card(find_model(spec).card_path, result, m.name, command)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    try:
        from .training.cli import export_checkpoint
    except ImportError as exc:
        raise MedILError(f"exporting needs the train extra ({exc.name} is missing): pip install 'medil-backend[train]'") from None
    path = export_checkpoint(args.checkpoint, args.config, args.folder, args.name, overwrite=args.overwrite)
    print(json.dumps({"exported": str(path)}))
    return 0


def _importing(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _raise_interrupted(signum, frame) -> None:
    """Ctrl-C raises KeyboardInterrupt, SIGTERM and SIGHUP :class:`Interrupted`; one that comes while
    a module is loading is sent again 50 ms later, until the import is done (an exception raised
    inside torch's C++ start-up is not caught there: the process aborts with no cleanup)."""
    if _importing(frame):
        resend = threading.Timer(0.05, os.kill, (os.getpid(), signum))
        resend.daemon = True
        resend.start()
        return
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Interrupted(signum)


class _StderrNotes(logging.Handler):
    """The core's notes (e.g. a re-orthonormalised header) as ``medil: note: ...`` on the current stderr,
    its warnings (e.g. an output mostly outside the input) as ``medil: warning: ...``."""

    def emit(self, record: logging.LogRecord) -> None:
        kind = "warning" if record.levelno >= logging.WARNING else "note"
        print(f"medil: {kind}: {record.getMessage()}", file=sys.stderr)


def _install_signals() -> dict:
    """Termination signals end a run the way Ctrl-C does, so every temporary file is removed (and
    are unblocked: a parent that held them while starting this process passes its mask on). None of
    them interrupts an import (see :func:`_raise_interrupted`)."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
    previous = {}
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        if hasattr(signal, name) and signal.getsignal(getattr(signal, name)) is not signal.SIG_IGN:  # nohup, a background job
            try:
                previous[name] = signal.signal(getattr(signal, name), _raise_interrupted)
            except ValueError:  # not the main thread (main() called from a library): leave signals alone
                pass
    return previous


def main(argv: Sequence[str] | None = None) -> int:
    log = logging.getLogger("medil")
    notes = _StderrNotes()
    log.addHandler(notes)
    log.setLevel(logging.INFO)
    previous = _install_signals()
    nibabel_log = logging.getLogger("nibabel.global")  # nibabel prints its header fixes through its own handler
    nibabel_level = nibabel_log.level
    nibabel_log.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # library warnings (nibabel, torch) would come before the one error line
            return _main(argv)
    except BrokenPipeError:  # the reader of stdout went away (e.g. `medil info F | head`): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt as exc:
        how = f" ({signal.Signals(exc.signum).name})" if isinstance(exc, Interrupted) else ""
        print(f"medil: interrupted{how}; no output was written", file=sys.stderr)
        return 128 + (exc.signum if isinstance(exc, Interrupted) else int(signal.SIGINT))
    finally:
        nibabel_log.setLevel(nibabel_level)
        log.removeHandler(notes)
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # LightningCLI parses its own (YAML) arguments
        try:
            from .training.cli import main as train_main
        except ImportError as exc:
            print(
                f"medil: error: training needs the train extra ({exc.name} is missing): pip install 'medil-backend[train]'", file=sys.stderr
            )
            return 1
        try:
            return train_main(argv[1:])
        except MedILError as exc:  # e.g. a data folder with no volumes
            print(f"medil: error: {exc}", file=sys.stderr)
            return 1
    args = build_parser().parse_args(argv)
    args.argv = argv
    from .task import TASKS

    handlers = {
        **dict.fromkeys(TASKS, cmd_task),  # every task has the one handler
        "tasks": cmd_tasks,
        "models": cmd_models,
        "device": cmd_device,
        "info": cmd_info,
        "evaluate": cmd_evaluate,
        "evaluate-generative": cmd_evaluate_generative,
        "export": cmd_export,
        "batch": cmd_batch,
    }
    from .io import nifti_geometry

    try:
        with nifti_geometry(getattr(args, "nifti_geometry", None)):
            return handlers[args.command](args)
    except Cancelled as exc:
        print(f"medil: {exc}", file=sys.stderr)
        return 130
    except MedILError as exc:
        if getattr(args, "progress", None) == "json":  # a frontend reads stdout: the core's words and the settings to change
            print(json.dumps({"error": str(exc), "options": list(getattr(exc, "options", ()))}), flush=True)
        print(f"medil: error: {user_message(exc)}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as exc:
        text = str(exc)
        if isinstance(exc, MemoryError) or "out of memory" in text.lower():
            print(
                "medil: error: ran out of memory; lower --max-memory, pick a coarser --spacing or a smaller --fov, or use --device cpu",
                file=sys.stderr,
            )
            return 1
        raise


if __name__ == "__main__":
    raise SystemExit(main())
