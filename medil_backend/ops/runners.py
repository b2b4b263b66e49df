"""The runners of the task contract (:mod:`medil_backend.task`): each turns a run context, an input
volume (or none), a grid request, a model name and its checked options into a :class:`TaskResult`
by calling its operation (``reconstruct``, ``superres``, ``sample``). Provenance is assembled
here, in one shape for every task."""

from __future__ import annotations

import logging
from dataclasses import asdict

import numpy as np

from ..errors import MedILError
from ..geometry import Volume, output_grid
from ..methods import METHOD_FACTS
from ..task import GridRequest, ModelRef, Output, Provenance, RunContext, TaskResult


def _modality(volume: Volume, choice: str) -> tuple[str, str | None]:
    """The user's modality, or the guess (DICOM tag, Hounsfield units) and the line that says it."""
    if choice and choice != "auto":
        return choice, None
    from ..intensity import explain_modality

    modality, why = explain_modality(volume.array, volume.meta.get("dicom_modality"))
    other = "mri" if modality == "ct" else "ct"
    return modality, f"modality guessed: {modality.upper()} ({why}); set the modality to {other.upper()} if that is wrong"


def _read_notes(volume: Volume, guess: str | None) -> dict:
    """What the sidecar records of how the input was read: why its modality is what it is, and voxels read as background."""
    notes = {"modality_reason": guess or "given by the user"}
    if volume.meta.get("non_finite_voxels"):
        notes["non_finite_voxels_as_background"] = int(volume.meta["non_finite_voxels"])
    return notes


def _input_name(volume: Volume) -> str:
    import os

    return os.path.basename(str(volume.meta.get("path", "input")).rstrip("/"))


def _out_dtype(volume: Volume, dtype: str):
    return volume.array.dtype if dtype == "input" else np.float32


def run_reconstruct(ctx: RunContext, volume: Volume, request: GridRequest, model: str | None, options) -> TaskResult:
    from ..models import default_model_for, load_model
    from ..models.registry import run_model

    modality, guess = _modality(volume, options.modality)
    target = output_grid(volume.grid, like=request.like, spacing=request.spacing, orientation=request.orientation, fov=request.fov)
    name = model or default_model_for(modality)
    loaded = ctx.cached(("model", name), lambda: load_model(name))
    result = run_model(
        volume,
        target,
        loaded.net,
        device=ctx.device,
        progress=ctx.progress,
        cancel=ctx.cancel,
        max_memory_gb=ctx.max_memory_gb,
        modality=modality,
        precision=ctx.precision,
        background=options.background,
    )
    card_modality = loaded.card.get("modality")
    if card_modality and result.modality != card_modality:
        logging.getLogger("medil").warning(
            "model %r was trained on %s, the input looks like %s", loaded.name, card_modality.upper(), result.modality.upper()
        )
    meta = result.meta
    provenance = Provenance(
        task="reconstruct",
        models=[ModelRef(loaded.name, loaded.sha256)],
        grid=target,
        device=str(meta.get("device", ctx.device)),
        precision=str(meta.get("precision", ctx.precision)),
        plan={k: meta[k] for k in ("tiles", "output_on_disk", "memory") if k in meta},
        settings={
            "input": _input_name(volume),
            "modality": result.modality,
            "background": meta.get("background"),
            **_read_notes(volume, guess),
        },
    )
    out = Output(result, "output", dtype=_out_dtype(volume, options.dtype))
    summary = {"modality": result.modality, "modality_guess": guess, "overlap_fraction": meta.get("overlap_fraction")}
    return TaskResult([out], provenance, summary)


def run_superres(ctx: RunContext, volume: Volume | list[Volume], request: GridRequest, model: str | None, options) -> TaskResult:
    """One stack through :func:`~medil_backend.ops.superres.superres`, several through :func:`_run_multistack`."""
    from .superres import default_grid, superres
    from .superres_methods import SuperresOptions

    o = options
    if isinstance(volume, (list, tuple)):
        if len(volume) > 1:
            return _run_multistack(ctx, list(volume), request, o)
        volume = volume[0]
    if o.coverage or o.no_motion or o.slice_motion:
        raise MedILError(
            "the coverage map, --no-motion and --slice-motion are for several stacks; give two or more thick-slice stacks of one anatomy",
            options=("coverage",) if o.coverage else ("no_motion",) if o.no_motion else ("slice_motion",),
        )
    volume.modality, guess = _modality(volume, o.modality)
    target = None
    if request.like is not None:
        target = request.like
    elif request.given:
        spacing = request.spacing if request.spacing else list(default_grid(volume.grid).spacing)
        target = output_grid(volume.grid, spacing=spacing, orientation=request.orientation, fov=request.fov)
    if METHOD_FACTS[o.method].uses_model:  # the diffusion model (and its autoencoder) loaded once per context
        from .sample import load_sampler

        model = ctx.cached(("sampler", model), lambda: load_sampler(model))
    same = ("method", "slice_thickness", "slice_profile", "samples", "seed", "steps", "strength", "background")
    op_options = SuperresOptions(
        **{k: getattr(o, k) for k in same},
        iterations=SuperresOptions.iterations if o.iterations is None else o.iterations,
        time_budget_min=SuperresOptions.time_budget_min if o.time_budget is None else o.time_budget,
        max_memory_gb=ctx.max_memory_gb,
        model=model,
        device=ctx.device,
        precision=ctx.precision,
    )
    kept: list[Output] = []
    full = ctx.progress
    if o.preview:  # the quick result first (committed at once by a files run), then the full one
        from dataclasses import replace

        quick = superres(
            volume, target, replace(op_options, time_budget_min=0.0, samples=1), progress=_span(ctx.progress, 0.0, 0.2), cancel=ctx.cancel
        )
        record = {"preview": "the pre-trained network alone (time budget 0), written before the full result replaces it"}
        ctx.emit(Output(quick, "preview", dtype=_out_dtype(volume, o.dtype), record=record), kept)
        full = _span(ctx.progress, 0.2, 1.0)
    result = superres(volume, target, op_options, progress=full, cancel=ctx.cancel)
    meta = result.meta
    unc = result.extras.get("uncertainty")
    models = [ModelRef(*m) for m in meta.get("models", [])]
    provenance = Provenance(
        task="superres",
        models=models,
        grid=result.grid,
        device=str(meta.get("device", ctx.device)),
        precision=str(meta.get("precision", "float32")),
        seeds=[o.seed + k for k in range(o.samples)] if o.method != "fast" else [],
        plan={"memory": meta["memory"]} if "memory" in meta else {},
        settings={
            "input": _input_name(volume),
            "modality": volume.modality,
            **_read_notes(volume, guess),
            "method": {k: v for k, v in meta.items() if k not in ("adaptation", "models", "memory")},
        },
    )
    outputs = [Output(result, "output", dtype=_out_dtype(volume, o.dtype))]
    if unc is not None and o.uncertainty:
        outputs.append(Output(unc, "uncertainty", record={"map": "per-voxel standard deviation over samples"}))
    outputs += kept
    summary = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in meta.items() if k not in ("adaptation", "models", "memory")}
    summary.update(modality=volume.modality, modality_guess=guess)
    return TaskResult(outputs, provenance, summary)


def _span(progress, lo: float, hi: float):
    """``progress`` with its fractions mapped onto ``lo`` .. ``hi`` (one part of a run that reports in parts)."""
    if progress is None:
        return None
    return lambda fraction, message: progress(lo + (hi - lo) * fraction, message)


def _run_multistack(ctx: RunContext, volumes: list[Volume], request: GridRequest, o) -> TaskResult:
    """Several stacks into one volume: registered (unless ``no_motion``), then jointly data-consistent, from
    the stacks' learned upsampling (adapt) or their B-spline mean (fast)."""
    from ..methods import check_stack_count

    if o.preview:
        raise MedILError("a preview is for one stack; drop --preview with several stacks", options=("preview",))
    from .multistack import check_stacks, common_grid, multistack_superres

    check_stack_count(o.method, len(volumes))
    if o.no_motion and o.slice_motion:
        raise MedILError("--no-motion and --slice-motion contradict each other: give one", options=("slice_motion",))
    guesses = []
    for i, v in enumerate(volumes, start=1):
        v.meta.setdefault("name", _input_name(v) if v.meta.get("path") else f"stack {i}")
        v.modality, guess = _modality(v, o.modality)
        if guess:
            guesses.append(guess)
    if request.like is not None:
        target = request.like
    elif request.given:
        base = common_grid(check_stacks(volumes, o.slice_thickness))
        target = output_grid(base, spacing=request.spacing or list(base.spacing), orientation=request.orientation, fov=request.fov)
    else:
        target = None
    from .multistack import MultistackOptions

    same = ("slice_thickness", "slice_profile", "background", "method", "samples", "seed", "slice_motion")
    options = MultistackOptions(
        **{k: getattr(o, k) for k in same},
        rounds=MultistackOptions.rounds if o.iterations is None else max(1, int(o.iterations)),
        register=not o.no_motion,
        time_budget_min=o.time_budget,  # None: the several-stack default (MultistackOptions.checked)
        max_memory_gb=ctx.max_memory_gb,
        device=ctx.device,
        precision=ctx.precision,
    )
    result = multistack_superres(volumes, target, options, progress=ctx.progress, cancel=ctx.cancel)
    meta = result.meta
    count, unc = result.extras["coverage"], result.extras.get("uncertainty")
    runs = meta.pop("adaptation", None)
    provenance = Provenance(
        task="superres",
        models=[ModelRef(*m) for m in meta.pop("models", [])],
        grid=result.grid,
        device=str(meta.get("device", ctx.device)),
        precision=str(meta.get("precision", "float32")),
        seeds=[o.seed + k for k in range(o.samples)] if o.method == "adapt" else [],
        plan={"memory": meta.pop("memory")},
        settings={
            "inputs": [v.meta["name"] for v in volumes],
            "modality": result.modality,
            "modality_reason": "; ".join(dict.fromkeys(guesses)) or "given by the user",
            "method": dict(meta),
        },
    )
    outputs = [Output(result, "output", dtype=_out_dtype(volumes[0], o.dtype))]
    if unc is not None and o.uncertainty:
        outputs.append(Output(unc, "uncertainty", record={"map": "per-voxel standard deviation over samples"}))
    if o.coverage:
        outputs.append(Output(count, "coverage", record={"map": "number of stacks that constrain each voxel"}))
    summary = {
        "method": meta["method"],
        "stacks": len(volumes),
        "motions": [{k: m[k] for k in ("translation_mm", "rotation_deg")} for m in meta["motions"]],
        "residuals": meta["residuals"],
        "modality": result.modality,
        "modality_guess": "; ".join(dict.fromkeys(guesses)) or None,
    }
    if runs:
        summary["adaptation_steps"] = [r["steps"] for r in runs]
    if "slice_motion" in meta:
        summary["slices_moved"] = [d["moved"] for d in meta["slice_motion"]]
    return TaskResult(outputs, provenance, summary)


def run_sample(ctx: RunContext, volume: None, request: GridRequest, model: str | None, options) -> TaskResult:
    from .sample import DEFAULT_ETA, load_sampler, native_grid, sample

    n, seed, steps, eta, native, background = options.n, options.seed, options.steps, options.eta, options.native, options.background
    if native and (request.spacing or request.orientation is not None or request.like is not None):
        raise MedILError(
            "native spaces draw the spacing and orientation: drop the spacing, orientation and reference grid", options=("native",)
        )
    eta = DEFAULT_ETA if eta is None else eta
    sampler = ctx.cached(("sampler", model), lambda: load_sampler(model))
    steps = sampler.default_steps if steps is None else steps
    default = sampler.default_grid()
    if request.like is not None:
        targets = [request.like] * n
    elif native:
        rng = np.random.default_rng(seed)
        targets = [native_grid(sampler, rng) for _ in range(n)]
    elif request.given:
        targets = [output_grid(default, spacing=request.spacing, orientation=request.orientation, fov=request.fov)] * n
    else:
        targets = [default] * n
    kept: list[Output] = []
    device = precision = None
    refs = [ModelRef(sampler.name, sampler.sha256), ModelRef(sampler.autoencoder_name, sampler.autoencoder_sha256, "autoencoder")]
    for i, target in enumerate(targets):

        def part(fraction: float, message: str, i=i) -> None:
            if ctx.progress is not None:
                ctx.progress((i + fraction) / n, message)

        (vol,) = sample(
            sampler,
            target,
            n=1,
            seed=seed + i,
            steps=steps,
            eta=eta,
            device=ctx.device,
            progress=part,
            cancel=ctx.cancel,
            max_memory_gb=ctx.max_memory_gb,
            precision=ctx.precision,
            background=background,
        )
        meta = dict(vol.meta)
        device, precision = meta.get("device"), meta.get("precision")
        record = {
            **{k: v for k, v in meta.items() if k not in ("task",)},
            "modality": vol.modality,
            "grid": {"shape": list(target.shape), "affine_ras": target.affine.round(9).tolist()},
            "native_space": bool(native),
            "models": [asdict(m) for m in refs],
        }
        ctx.emit(Output(vol, "sample", index=i, record=record), kept)
    provenance = Provenance(
        task="sample",
        models=refs,
        grid=None,
        device=str(device or ctx.device),
        precision=str(precision or ctx.precision),
        seeds=[seed + i for i in range(n)],
        settings={"steps": int(steps), "eta": float(eta)},
    )
    summary = {"model": sampler.name, "model_sha256": sampler.sha256, "seed": seed, "steps": int(steps), "eta": float(eta)}
    summary["grids"] = [repr(t) for t in targets]
    return TaskResult(kept, provenance, summary)
