"""Super-resolution of thick-slice scans onto a finer grid, with data consistency.

Methods (:mod:`medil_backend.methods` names them): ``adapt`` (the default: a small network adapted to the scan's own
in-plane detail, applied through-plane), ``fast`` (a cubic B-spline interpolant), ``inverse`` (latent optimisation
through a diffusion model's decoder) and ``cycles`` (noise/denoise cycles of a latent diffusion model). Each estimate
is then made consistent with the input: the output, acquired again through the input's own acquisition operator
``A`` (slice profile along the thick axis, thickness from the header or the user), reproduces the input:
``x <- x + A^T (y - A x) / (A^T A 1)`` (a diagonally preconditioned Landweber step; for slices that do not overlap,
``A A^T`` is block diagonal and one step is already consistent). Several stacks go through
:mod:`medil_backend.ops.multistack`. Measured quality and speed: docs/superres.md.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..acquisition import AcquisitionOperator
from ..errors import MedILError
from ..geometry import Grid, Volume
from ..methods import SUPERRES_METHODS
from .memory import MemoryPlan
from .runtime import Progress, autocast, check_cancel, report

METHODS = SUPERRES_METHODS  # one list: the task spec's, the default first
#: an axis is a slice axis when its spacing is at least this many times the finest in-plane spacing
THICK_RATIO = 1.5
#: working copies of the output grid that one data-consistency step holds (float32: the image,
#: its preconditioner, the residual's back-projection and the sampler's intermediates)
DC_COPIES = 8


#: a slice may be at most this many times thicker than the spacing between slices (overlapping slices
#: are at most about twice as thick); beyond it the thickness is a mistake
MAX_THICKNESS_RATIO = 4.0


def slice_axis(grid: Grid, target: Grid | None = None, what: str = "the input") -> int:
    """The input's slice axis: of its thick axes (spacing at least :data:`THICK_RATIO` times the
    finest), the thickest that ``target`` samples more finely. Refuses an input with no thick axis,
    and an output grid that is not finer than the input along any of them."""
    sp = grid.spacing
    thick = [a for a in range(3) if sp[a] >= THICK_RATIO * sp.min()]
    if not thick:
        raise MedILError(
            f"{what} has no thick slices (spacing {', '.join(f'{s:.3g}' for s in sp)} mm): there is nothing to super-resolve; "
            "`medil reconstruct` resamples it onto any grid"
        )
    if target is None:
        return max(thick, key=lambda a: sp[a])
    proj = np.abs(grid.direction.T @ target.direction)  # |cos| between input axis a and output axis b
    steps = proj @ target.spacing / np.maximum(proj.sum(axis=1), 1e-9)
    refined = [a for a in thick if steps[a] < sp[a] * (1 - 1e-6)]
    if not refined:
        a = max(thick, key=lambda a: sp[a])
        raise MedILError(
            f"the output grid is not finer than the input's slices ({steps[a]:.3g} mm along the slice direction, the slices are "
            f"{sp[a]:.3g} mm apart): super-resolution makes slices thinner; choose a finer spacing, or use "
            "`medil reconstruct` to resample",
            options=("spacing", "like"),
        )
    return max(refined, key=lambda a: sp[a])


def default_grid(grid: Grid) -> Grid:
    """The natural target: the input's region on its own axes, isotropic at its finest spacing."""
    from ..geometry import output_grid

    return output_grid(grid, spacing=float(grid.spacing.min()))


def _steps(grid: Grid, target: Grid) -> np.ndarray:
    """``target``'s step (mm) along each of ``grid``'s axes."""
    proj = np.abs(grid.direction.T @ target.direction)
    return proj @ target.spacing / np.maximum(proj.sum(axis=1), 1e-9)


def _consistent(
    x: np.ndarray, y: np.ndarray, op: AcquisitionOperator, iterations: int, progress, span, cancel, device: torch.device | None = None
) -> tuple[np.ndarray, float, float]:
    """``iterations`` preconditioned back-projection steps towards ``A x = y`` (float32, on ``device``); the relative
    RMS residual before and after."""
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None].to(device or "cpu")
    yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))[None, None].to(device or "cpu")
    scale = float(yt.abs().max()) or 1.0
    with torch.no_grad():
        precond = op.adjoint(op(torch.ones_like(xt))).clamp_min(1e-6)
        r = yt - op(xt)
        before = after = float(r.pow(2).mean().sqrt()) / scale
        for k in range(iterations):
            check_cancel(cancel)
            report(progress, span[0] + (span[1] - span[0]) * k / max(iterations, 1), f"data consistency {k + 1}/{iterations}")
            xt = xt + op.adjoint(r) / precond
            r = yt - op(xt)
            after = float(r.pow(2).mean().sqrt()) / scale
    return xt[0, 0].cpu().numpy(), before, after


def check_sampling(method: str, samples: int, time_budget_min: float) -> None:
    """The rules on samples and the time budget shared by one stack and several: 1 to 50 samples, several only for
    a method that draws; a budget of 0 to 1440 minutes, 0 (the pre-trained network alone: one deterministic
    sample) only for ``adapt``."""
    if not (isinstance(samples, int) and 1 <= samples <= 50):
        raise MedILError(f"samples must be a whole number from 1 to 50, got {samples!r}", options=("samples",))
    if samples > 1 and method == "fast":
        raise MedILError("the fast method is deterministic: several samples need --method adapt or cycles", options=("samples", "method"))
    if not (np.isfinite(time_budget_min) and 0 <= time_budget_min <= 24 * 60):
        raise MedILError(f"the time budget must be 0 to 1440 minutes, got {time_budget_min!r}", options=("time_budget",))
    if time_budget_min == 0 and method != "adapt":
        raise MedILError("a time budget of 0 (no test-time training) is a setting of the adapt method", options=("time_budget", "method"))
    if time_budget_min == 0 and samples > 1:
        raise MedILError(
            "with a time budget of 0 the pre-trained network alone runs: it is deterministic, one sample", options=("samples",)
        )


def superres(
    volume: Volume,
    target: Grid | None = None,
    *,
    method: str = "fast",
    slice_thickness: float | None = None,
    slice_profile: str = "rect",
    iterations: int = 2,
    samples: int = 1,
    time_budget_min: float = 3.0,
    seed: int = 0,
    max_memory_gb: float | None = None,
    progress: Progress | None = None,
    cancel=None,
    model: str | None = None,
    steps: int = 10,
    strength: float = 0.3,
    max_iterations: int = 200,
    background: float | None = None,
    device: str | torch.device = "auto",
    precision: str = "auto",
) -> Volume:
    """Super-resolve ``volume`` onto ``target`` (default: :func:`default_grid`).

    The slice axis is the input's thickest axis that the output refines; ``slice_thickness`` (mm,
    default: its spacing) and ``slice_profile`` (``rect`` or ``gaussian``, FWHM = thickness)
    describe how a slice averages the anatomy. ``adapt`` trains ``samples`` networks (seeds
    ``seed``, ``seed + 1``, ...) within ``time_budget_min`` minutes in all; with ``samples`` > 1 the
    output is their mean and ``meta["uncertainty"]`` a :class:`Volume` of their standard deviation
    on the output grid. ``meta`` also records the method and the data-consistency residual
    (relative RMS of ``A x - y``) before and after.

    ``cycles`` (Patel et al.): the ``fast`` result is encoded by the generative autoencoder of the
    latent diffusion ``model``, noised to ``strength`` x T (of an unshifted cosine schedule, see
    :meth:`~medil_backend.nn.diffusion.LatentDiffusionUNet.step_for_strength`), denoised by DDIM in ``steps`` steps,
    decoded onto ``target`` and made data-consistent; each of ``samples`` cycles draws its own
    noise (seeds ``seed``, ``seed + 1``, ...).

    ``inverse`` (InverseSR, decoder-only): the generative latent z, initialised by encoding the
    ``fast`` result, is optimised with Adam so that ``A(decode(z))`` matches the input (L1), with
    gradients through the tiling engine (activation checkpointing: one tile's activations alive),
    for at most ``max_iterations`` steps or ``time_budget_min`` minutes; then data consistency.
    With ``samples`` > 1 each run starts from z plus seeded noise.

    ``device`` (``auto``: CUDA when present) runs every method's networks and the data-consistency
    steps there; ``precision`` (``auto``: bfloat16 on CUDA) applies to the adapted network's and the
    generative networks' convolutions only: data consistency and everything on the CPU stay float32,
    so a CPU run is the same whatever the CPU. Seeds draw on the CPU, so a seed gives the same noise
    on any device.
    """
    if method not in METHODS:
        raise MedILError(f"super-resolution method {method!r} is not available; choose one of {', '.join(METHODS)}", options=("method",))
    if not (isinstance(iterations, int) and 0 <= iterations <= 100):
        raise MedILError(f"iterations must be a whole number from 0 to 100, got {iterations!r}", options=("iterations",))
    check_sampling(method, samples, time_budget_min)
    if not (isinstance(max_iterations, int) and 1 <= max_iterations <= 100000):
        raise MedILError(f"max_iterations must be a whole number from 1, got {max_iterations!r}", options=("iterations",))
    from .runtime import check_seed

    seed = check_seed(seed, samples)
    if slice_thickness is not None and not (np.isfinite(slice_thickness) and slice_thickness > 0):
        raise MedILError(f"the slice thickness must be a positive number of mm, got {slice_thickness!r}", options=("slice_thickness",))
    if method == "cycles" and not (0 < strength <= 1 and isinstance(steps, int) and 1 <= steps <= 1000):
        raise MedILError(f"cycles need 0 < strength <= 1 and 1 <= steps <= 1000, got {strength!r} and {steps!r}", options=("steps",))
    from .runtime import resolve_device, resolve_precision

    dev = resolve_device(device)
    net_dtype = resolve_precision(precision, dev) if dev.type == "cuda" else torch.float32
    name = volume.meta.get("path", "the input")
    grid = volume.grid.validate(name)
    slice_axis(grid, None, name)  # an input with no thick slices is refused before any grid is built
    target = default_grid(grid) if target is None else Grid(target.shape, target.affine).validate("the output grid")
    axis = slice_axis(grid, target, name)
    if slice_thickness is not None and slice_thickness > MAX_THICKNESS_RATIO * grid.spacing[axis]:
        raise MedILError(
            f"a slice thickness of {slice_thickness:g} mm is more than {MAX_THICKNESS_RATIO:g} times the {grid.spacing[axis]:.3g} mm "
            "between the input's slices; give the thickness the scan was acquired with (usually its header's spacing)",
            options=("slice_thickness",),
        )
    from .reconstruct import check_overlap

    overlap = check_overlap(grid, target)
    # adapt works on the input's own axes, refined along the slice axis to the output's step there
    factor = max(2, int(round(grid.spacing[axis] / _steps(grid, target)[axis])))
    from .adapt import refined_along

    work = refined_along(grid, axis, factor) if method == "adapt" else target
    # the whole volumes are held (no spilling): the data-consistency copies at the finer of the working and
    # output grids, the input twice (float32 and float64); what is left is the generative methods' tile memory
    memory = MemoryPlan.start(max_memory_gb, spill_allowed=False)
    memory.hold("volumes", (DC_COPIES + (2 if samples > 1 else 0)) * 4.0 * max(work.num_voxels, target.num_voxels))
    memory.hold("input", 8.0 * grid.num_voxels)
    budget = memory.working_bytes(f"the volumes of a super-resolution onto {target.shape} alone")
    thickness: list[float | None] = [None, None, None]
    thickness[axis] = slice_thickness
    profiles = ["rect", "rect", "rect"]
    profiles[axis] = slice_profile
    op = AcquisitionOperator(grid, work, thickness, profiles)
    width = float(op.widths[axis])

    from .interpolate import resample_sitk

    t0 = time.perf_counter()
    meta: dict = {
        "method": method,
        "slice_axis": axis,
        "slice_thickness_mm": width,
        "slice_profile": slice_profile,
        "device": str(dev),
        "precision": str(net_dtype).replace("torch.", ""),
        "memory": memory.summary(),
    }
    y = np.asarray(volume.array, dtype=np.float32)
    std = None
    if method == "fast":
        report(progress, 0.0, "B-spline interpolant")
        x = resample_sitk(volume, target, "bspline").array.astype(np.float32)
        x, before, after = _consistent(x, y, op, iterations, progress, (0.3, 1.0), cancel, dev)
    elif method in ("cycles", "inverse"):
        from ..intensity import fit_normalizer

        norm = fit_normalizer(y, volume.modality)
        yn = norm.forward(y)
        report(progress, 0.0, "B-spline interpolant")
        x0 = resample_sitk(Volume(yn, grid.affine), target, "bspline").array.astype(np.float32)
        x0, before, _ = _consistent(x0, yn, op, iterations, progress, (0.02, 0.1), cancel, dev)
        sampler = _generative(model, norm.modality)  # loaded (and its sha256 checked) once
        meta["models"] = [
            (sampler.name, sampler.sha256, "model"),
            (sampler.autoencoder_name, sampler.autoencoder_sha256, "autoencoder"),
        ]
        model_name, model = sampler.name, sampler
        if method == "cycles":
            stack = diffusion_cycles(
                x0,
                yn,
                target,
                op,
                model,
                samples,
                seed,
                steps,
                strength,
                iterations,
                budget,
                norm.modality,
                progress,
                cancel,
                dev,
                net_dtype,
            )
        else:
            stack, runs = latent_optimisation(
                x0,
                yn,
                target,
                op,
                model,
                samples,
                seed,
                max_iterations,
                time_budget_min,
                iterations,
                budget,
                norm.modality,
                progress,
                cancel,
                dev,
                net_dtype,
            )
            meta["optimisation"] = runs
        x = stack.mean(axis=0)
        with torch.no_grad():
            ax = op(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None].to(dev))[0, 0].cpu().numpy()
        after = float(np.sqrt(np.mean((ax - yn) ** 2))) / (float(np.abs(yn).max()) or 1.0)
        std = stack.std(axis=0) * norm.scale if samples > 1 else None
        x = norm.inverse(x)
        meta.update(samples=samples, seed=seed, model=model_name)
        if method == "cycles":
            meta.update(steps=steps, strength=strength)
        else:
            meta.update(time_budget_min=time_budget_min)
    else:
        from ..intensity import fit_normalizer
        from .adapt import apply_adapter, prior_ref, starting_weights, train_adapter

        norm = fit_normalizer(y, volume.modality)
        yn = norm.forward(y)
        prior = starting_weights(norm.modality, time_budget_min)
        if prior is not None:
            meta["models"] = [prior_ref(norm.modality)]
        estimates, runs = [], []
        seconds = time_budget_min * 60 * 0.8 / samples
        quick = time_budget_min == 0  # the pre-trained network alone: no test-time steps
        for k in range(samples):
            start, stop = 0.9 * k / samples, 0.9 * (k + 1) / samples
            mid = start + 0.8 * (stop - start)
            net, info = train_adapter(
                yn,
                grid,
                axis,
                width,
                slice_profile,
                seconds,
                seed + k,
                progress,
                (start, mid),
                cancel,
                prior,
                max_steps=0 if quick else None,
                device=dev,
                dtype=net_dtype,
            )
            report(progress, mid, "applying the adapted network through-plane")
            est = apply_adapter(net, yn, grid, work, axis, info["columns"], cancel, device=dev, dtype=net_dtype)
            estimates.append(est)
            runs.append(info)
        stack = np.stack(estimates)
        x = stack.mean(axis=0)
        x, before, after = _consistent(x, yn, op, iterations, progress, (0.9, 0.97), cancel, dev)
        if samples > 1:
            std = stack.std(axis=0) * norm.scale
        x = norm.inverse(x)
        if not work.same_as(target, atol=1e-6):
            x = resample_sitk(Volume(x, work.affine), target, "bspline").array.astype(np.float32)
            if std is not None:
                std = resample_sitk(Volume(std, work.affine), target, "trilinear").array.astype(np.float32)
        meta.update(samples=samples, seed=seed, time_budget_min=time_budget_min, adaptation=runs)
    if not np.isfinite(x).all():
        raise MedILError("super-resolution produced non-finite values; check the input's intensities")
    from ..intensity import fit_normalizer, physical_floor

    modality = fit_normalizer(y, volume.modality).modality
    floor = physical_floor(y, modality)
    if floor is not None:  # no lower than physics allows (an MR magnitude is never negative; CT >= -1024 HU)
        np.maximum(x, np.float32(floor), out=x)
    # outside the input: background, not the edge smeared outwards
    from ..intensity import background_value
    from .tiling import fill_outside

    meta["background"] = background_value(modality, background)
    meta["overlap_fraction"] = round(overlap, 4)
    x = fill_outside(np.ascontiguousarray(x, dtype=np.float32), grid, target, meta["background"])
    if std is not None:
        std = fill_outside(np.ascontiguousarray(std, dtype=np.float32), grid, target, 0.0)
    report(progress, 1.0, "done")
    meta.update(
        iterations=iterations, consistency_residual_before=before, consistency_residual_after=after, seconds=time.perf_counter() - t0
    )
    if std is not None:
        meta["uncertainty"] = Volume(std.astype(np.float32), target.affine, modality=volume.modality)
    return Volume(x.astype(np.float32), target.affine, modality=volume.modality, meta=meta)


def _generative(model, modality: str):
    from .sample import Sampler, load_sampler

    sampler = model if isinstance(model, Sampler) else load_sampler(model)
    if sampler.modality != modality:
        raise MedILError(
            f"the diffusion model {sampler.name!r} learnt {sampler.modality.upper()}, the input is {modality.upper()}: "
            "use --method fast or adapt",
            options=("method",),
        )
    return sampler


def _encoded_estimate(x0: np.ndarray, target: Grid, model: str | None, modality: str, budget: float, progress, device=None, dtype=None):
    """The generative model for ``modality``, the latent grid covering ``target``, the posterior mean of the
    estimate ``x0`` on it, and the working-memory budget of one tile (what both generative methods start from)."""
    from .sample import latent_grid_for
    from .tiling import encode_tiled

    sampler = _generative(model, modality)
    device = device or torch.device("cpu")
    ae = sampler.autoencoder.to(device).eval()
    z_grid = latent_grid_for(sampler, target)
    work = budget  # what the memory plan left once the volumes this call holds are counted
    report(progress, 0.1, "encoding the estimate")
    with torch.inference_mode(), autocast(device, dtype or torch.float32):
        z = ae.split_latent(encode_tiled(ae, torch.from_numpy(x0)[None, None].to(device), target, z_grid, budget_bytes=work))[0]
    return sampler, z_grid, z.float().clone(), work


def latent_optimisation(
    x0: np.ndarray,
    yn: np.ndarray,
    target: Grid,
    op: AcquisitionOperator,
    model: str | None,
    samples: int,
    seed: int,
    max_iterations: int,
    time_budget_min: float,
    iterations: int,
    budget: float,
    modality: str,
    progress,
    cancel,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[np.ndarray, list[dict]]:
    """(samples, *target.shape): InverseSR's decoder-only latent optimisation, each run made data-consistent."""
    from .tiling import decode_tiled

    device = device or torch.device("cpu")
    sampler, z_grid, z_init, work = _encoded_estimate(x0, target, model, modality, budget, progress, device, dtype)
    ae = sampler.autoencoder
    for p in ae.parameters():
        p.requires_grad_(False)
    yt = torch.from_numpy(np.ascontiguousarray(yn, dtype=np.float32))[None, None].to(device)
    seconds = time_budget_min * 60 * 0.9 / samples
    out, runs = [], []
    for k in range(samples):
        a, b = 0.1 + 0.85 * k / samples, 0.1 + 0.85 * (k + 1) / samples
        spread = 0.1 * float(z_init.std()) if k else 0.0  # the first run starts at the encoding, later ones near it
        noise = torch.randn(z_init.shape, generator=torch.Generator().manual_seed(seed + k)).to(device)
        z = (z_init + spread * noise).requires_grad_(True)
        opt = torch.optim.Adam([z], lr=0.05)
        t0, losses = time.perf_counter(), []
        for it in range(max_iterations):
            check_cancel(cancel)
            with autocast(device, dtype or torch.float32):
                x = decode_tiled(ae, z, z_grid, target, budget_bytes=work, checkpoint=True)
            loss = (op(x.float()) - yt).abs().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss))
            elapsed = time.perf_counter() - t0
            report(progress, a + 0.8 * (b - a) * min(1.0, elapsed / seconds), f"latent optimisation {k + 1}/{samples}: step {it + 1}")
            if elapsed > seconds:
                break
        with torch.inference_mode(), autocast(device, dtype or torch.float32):
            arr = np.asarray(decode_tiled(ae, z.detach(), z_grid, target, budget_bytes=work), dtype=np.float32)
        xk, _, _ = _consistent(arr, yn, op, iterations, progress, (a + 0.8 * (b - a), b), cancel, device)
        out.append(xk)
        runs.append({"steps": len(losses), "l1_first": losses[0], "l1_last": losses[-1], "seconds": round(time.perf_counter() - t0, 1)})
    return np.stack(out), runs


def diffusion_cycles(
    x0: np.ndarray,
    yn: np.ndarray,
    target: Grid,
    op: AcquisitionOperator,
    model: str | None,
    samples: int,
    seed: int,
    steps: int,
    strength: float,
    iterations: int,
    budget: float,
    modality: str,
    progress,
    cancel,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> np.ndarray:
    """(samples, *target.shape): noise/denoise cycles of the normalised estimate ``x0`` through a latent diffusion model, each data-consistent."""
    from ..geometry import centred
    from ..intensity import foreground_centres
    from ..nn.diffusion import geometry_channels, source_spacing_along
    from .sample import SPACING_COND_RANGE_MM, denoise_windows
    from .tiling import DecodePlan, OutputArray, decode_tiled

    device = device or torch.device("cpu")
    sampler, z_grid, z_mean, work = _encoded_estimate(x0, target, model, modality, budget, progress, device, dtype)
    ae, ldm = sampler.autoencoder, sampler.diffusion.to(device).eval()
    # the model knows heads centred at the origin: condition on the latent grid moved the same way
    moved = centred(target, foreground_centres(x0, modality))
    shift = moved.affine[:3, 3] - target.affine[:3, 3]
    cond_affine = z_grid.affine.copy()
    cond_affine[:3, 3] += shift
    cond_grid = Grid(z_grid.shape, cond_affine)
    spacing = np.clip(source_spacing_along(z_grid, target.direction, target.spacing), *SPACING_COND_RANGE_MM)
    cond = geometry_channels(cond_grid, spacing, ldm.config)[None].to(device)
    plan = DecodePlan(ae, z_grid, target, work, 4 if (dtype or torch.float32) == torch.float32 else 2)
    windows = denoise_windows(sampler, z_grid.shape, work)
    t_start = ldm.step_for_strength(strength)
    z0 = ldm.standardise(z_mean, cond)
    out = []
    for k in range(samples):
        check_cancel(cancel)
        a, b = 0.1 + 0.85 * k / samples, 0.1 + 0.85 * (k + 1) / samples
        report(progress, a, f"diffusion cycle {k + 1}/{samples}")
        noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed + k)).to(device)
        arr = OutputArray(target.shape)
        with torch.inference_mode(), autocast(device, dtype or torch.float32):
            z = ldm.destandardise(ldm.ddim(ldm.noised(z0, t_start, noise), cond, steps, start=t_start, windows=windows), cond)
            decode_tiled(ae, z, z_grid, target, plan=plan, out=arr, progress=progress, cancel=cancel, span=(a, a + 0.8 * (b - a)))
        # data consistency uses the operator's adjoint (autograd): outside inference mode
        xk, _, _ = _consistent(arr.array, yn, op, iterations, progress, (a + 0.8 * (b - a), b), cancel, device)
        out.append(xk)
    return np.stack(out)
