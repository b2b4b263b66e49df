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
from dataclasses import replace

import numpy as np

from ..acquisition import CACHE_SHARE, AcquisitionOperator
from ..errors import MedILError
from ..geometry import Grid, Volume
from ..methods import SUPERRES_METHODS
from .memory import MemoryPlan
from .runtime import Progress, report
from .superres_methods import ESTIMATES, Problem, SuperresOptions

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


def superres(
    volume: Volume,
    target: Grid | None = None,
    options: SuperresOptions | None = None,
    *,
    progress: Progress | None = None,
    cancel=None,
    **overrides,
) -> Volume:
    """Super-resolve ``volume`` onto ``target`` (default: :func:`default_grid`) with ``options`` (a
    :class:`~medil_backend.ops.superres_methods.SuperresOptions`; keyword ``overrides`` replace its fields).

    The slice axis is the input's thickest axis that the output refines; ``slice_thickness`` (mm,
    default: its spacing) and ``slice_profile`` (``rect`` or ``gaussian``, FWHM = thickness)
    describe how a slice averages the anatomy. ``adapt`` trains ``samples`` networks (seeds
    ``seed``, ``seed + 1``, ...) within ``time_budget_min`` minutes in all; with ``samples`` > 1 the
    output is their mean and ``extras["uncertainty"]`` a :class:`Volume` of their standard deviation
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
    steps there; ``precision`` (``runtime.resolve_precision``'s rule for iterative work: ``auto`` is bfloat16 on
    CUDA, float32 on any CPU) applies to the adapted network's and the generative networks' convolutions only:
    data consistency stays float32, so a CPU run under ``auto`` is the same whatever the CPU. Seeds draw on the CPU, so a seed gives the same noise
    on any device.
    """
    opts = replace(options or SuperresOptions(), **overrides).checked()
    problem, meta, overlap = _problem(volume, target, opts, progress, cancel)
    t0 = time.perf_counter()
    est = ESTIMATES[opts.method](problem)
    meta.update(est.meta)
    x, std = est.x, est.std
    if not np.isfinite(x).all():
        raise MedILError("super-resolution produced non-finite values; check the input's intensities")
    from ..intensity import background_value, fit_normalizer, floored, physical_floor
    from .tiling import fill_outside

    modality = fit_normalizer(problem.y, volume.modality).modality
    floored(x, physical_floor(problem.y, modality))  # no lower than physics allows (an MR magnitude >= 0; CT >= -1024 HU)
    # outside the input: background, not the edge smeared outwards
    meta["background"] = background_value(modality, opts.background)
    meta["overlap_fraction"] = round(overlap, 4)
    x = fill_outside(np.ascontiguousarray(x, dtype=np.float32), problem.grid, problem.target, meta["background"])
    if std is not None:
        std = fill_outside(np.ascontiguousarray(std, dtype=np.float32), problem.grid, problem.target, 0.0)
    report(progress, 1.0, "done")
    meta.update(
        iterations=opts.iterations,
        consistency_residual_before=est.before,
        consistency_residual_after=est.after,
        seconds=time.perf_counter() - t0,
    )
    extras = {}
    if std is not None:
        extras = {"uncertainty": Volume(std.astype(np.float32), problem.target.affine, modality=volume.modality)}
    return Volume(x.astype(np.float32), problem.target.affine, modality=volume.modality, meta=meta, extras=extras)


#: the methods whose operator keeps its sampling coordinates (no tiles to share the memory with)
CACHED_METHODS = ("fast", "adapt")


def _problem(volume: Volume, target: Grid | None, opts: SuperresOptions, progress, cancel) -> tuple[Problem, dict, float]:
    """The problem every method works on (grids, operator, device, memory plan), the run's first metadata and the
    fraction of the output the input covers; refuses what cannot work before any."""
    from .adapt import refined_along
    from .reconstruct import check_overlap
    from .runtime import resolve_device, resolve_precision

    dev = resolve_device(opts.device)
    net_dtype = resolve_precision(opts.precision, dev, iterative=True)
    name = volume.meta.get("path", "the input")
    grid = volume.grid.validate(name)
    slice_axis(grid, None, name)  # an input with no thick slices is refused before any grid is built
    target = default_grid(grid) if target is None else Grid(target.shape, target.affine).validate("the output grid")
    axis = slice_axis(grid, target, name)
    if opts.slice_thickness is not None and opts.slice_thickness > MAX_THICKNESS_RATIO * grid.spacing[axis]:
        raise MedILError(
            f"a slice thickness of {opts.slice_thickness:g} mm is more than {MAX_THICKNESS_RATIO:g} times the "
            f"{grid.spacing[axis]:.3g} mm between the input's slices; give the thickness the scan was acquired with (usually its "
            "header's spacing)",
            options=("slice_thickness",),
        )
    overlap = check_overlap(grid, target)
    # adapt works on the input's own axes, refined along the slice axis to the output's step there
    factor = max(2, int(round(grid.spacing[axis] / _steps(grid, target)[axis])))
    work = refined_along(grid, axis, factor) if opts.method == "adapt" else target
    # the whole volumes are held (no spilling): the data-consistency copies at the finer of the working and
    # output grids, the input twice (float32 and float64); what is left is the generative methods' tile memory
    memory = MemoryPlan.start(opts.max_memory_gb, spill_allowed=False)
    memory.hold("volumes", (DC_COPIES + (2 if opts.samples > 1 else 0)) * 4.0 * max(work.num_voxels, target.num_voxels))
    memory.hold("input", 8.0 * grid.num_voxels)
    budget = memory.working_bytes(f"the volumes of a super-resolution onto {target.shape} alone")
    thickness: list[float | None] = [None, None, None]
    thickness[axis] = opts.slice_thickness
    profiles = ["rect", "rect", "rect"]
    profiles[axis] = opts.slice_profile
    op = AcquisitionOperator(grid, work, thickness, profiles)
    if opts.method in CACHED_METHODS and op.cache_bytes() <= CACHE_SHARE * budget:
        # their data-consistency steps apply the operator a dozen times: its sampling coordinates are kept
        op.cache = True
        memory.hold("sampling coordinates", op.cache_bytes())
    y = np.asarray(volume.array, dtype=np.float32)
    problem = Problem(volume, y, grid, target, work, axis, op, opts, dev, net_dtype, budget, progress, cancel)
    meta: dict = {
        "method": opts.method,
        "slice_axis": axis,
        "slice_thickness_mm": problem.width,
        "slice_profile": opts.slice_profile,
        "device": str(dev),
        "precision": str(net_dtype).replace("torch.", ""),
        "memory": memory.summary(),
    }
    return problem, meta, overlap
