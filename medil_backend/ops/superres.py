"""Super-resolution of thick-slice scans onto a finer grid, with data consistency.

``fast`` (the one method so far): a cubic B-spline interpolant of the input on the output grid,
then back-projection until the output, acquired again through the input's own acquisition
operator ``A`` (slice profile along the thick axis, thickness from the header or the user), reproduces
the input: ``x <- x + A^T (y - A x) / (A^T A 1)`` (a diagonally preconditioned Landweber step; for
slices that do not overlap, ``A A^T`` is block diagonal and one step is already consistent).

Measured on held-out real scans (``medil evaluate --superres fast``), data consistency adds a
fraction of a dB to B-spline: the learned methods (test-time adaptation, latent optimisation,
diffusion cycles) that the project plans build on this operator and this command.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..acquisition import AcquisitionOperator
from ..errors import MedILError
from ..geometry import Grid, Volume
from ..limits import GB, check_memory_limit
from .runtime import Progress, check_cancel, report

METHODS = ("fast",)
#: an axis is a slice axis when its spacing is at least this many times the finest in-plane spacing
THICK_RATIO = 1.5
#: working copies of the output grid that one data-consistency step holds (float32: the image,
#: its preconditioner, the residual's back-projection and the sampler's intermediates)
DC_COPIES = 8


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


def superres(
    volume: Volume,
    target: Grid | None = None,
    *,
    method: str = "fast",
    slice_thickness: float | None = None,
    slice_profile: str = "rect",
    iterations: int = 2,
    max_memory_gb: float | None = None,
    progress: Progress | None = None,
    cancel=None,
) -> Volume:
    """Super-resolve ``volume`` onto ``target`` (default: :func:`default_grid`).

    The slice axis is the input's thickest; ``slice_thickness`` (mm, default: its spacing) and
    ``slice_profile`` (``rect`` or ``gaussian``, FWHM = thickness) describe how a slice averages
    the anatomy. The output's ``meta`` records the method and the data-consistency residual
    (relative RMS of ``A x - y``) before and after.
    """
    if method not in METHODS:
        raise MedILError(f"super-resolution method {method!r} is not available; choose one of {', '.join(METHODS)}", options=("method",))
    if not (isinstance(iterations, int) and 0 <= iterations <= 100):
        raise MedILError(f"iterations must be a whole number from 0 to 100, got {iterations!r}", options=("iterations",))
    name = volume.meta.get("path", "the input")
    grid = volume.grid.validate(name)
    slice_axis(grid, None, name)  # an input with no thick slices is refused before any grid is built
    target = default_grid(grid) if target is None else Grid(target.shape, target.affine).validate("the output grid")
    axis = slice_axis(grid, target, name)
    from .reconstruct import check_overlap

    check_overlap(grid, target)
    budget = check_memory_limit(max_memory_gb)
    need = DC_COPIES * 4.0 * target.num_voxels + 8.0 * grid.num_voxels
    if need > budget:
        raise MedILError(
            f"super-resolving onto {target.shape} needs about {need / GB:.1f} GB, over the memory limit ({budget / GB:.1f} GB): "
            "raise the memory limit, or choose a coarser spacing or a smaller field of view",
            options=("max_memory", "spacing", "fov"),
        )
    thickness: list[float | None] = [None, None, None]
    thickness[axis] = slice_thickness
    profiles = ["rect", "rect", "rect"]
    profiles[axis] = slice_profile
    op = AcquisitionOperator(grid, target, thickness, profiles)

    from ..baselines import resample_sitk

    t0 = time.perf_counter()
    report(progress, 0.0, "B-spline interpolant")
    x = torch.from_numpy(resample_sitk(volume, target, "bspline").array.astype(np.float32))[None, None]
    y = torch.from_numpy(np.asarray(volume.array, dtype=np.float32))[None, None]
    scale = float(y.abs().max()) or 1.0
    with torch.no_grad():
        precond = op.adjoint(op(torch.ones_like(x))).clamp_min(1e-6)

        def residual(x: torch.Tensor) -> tuple[torch.Tensor, float]:
            r = y - op(x)
            return r, float(r.pow(2).mean().sqrt()) / scale

        r, before = residual(x)
        after = before
        for k in range(iterations):
            check_cancel(cancel)
            report(progress, (k + 1) / (iterations + 1), f"data consistency {k + 1}/{iterations}")
            x = x + op.adjoint(r) / precond
            r, after = residual(x)
    out = x[0, 0].numpy()
    if not np.isfinite(out).all():
        raise MedILError("super-resolution produced non-finite values; check the input's intensities")
    report(progress, 1.0, "done")
    meta = {
        "method": method,
        "slice_axis": axis,
        "slice_thickness_mm": float(op.widths[axis]),
        "slice_profile": slice_profile,
        "iterations": iterations,
        "consistency_residual_before": before,
        "consistency_residual_after": after,
        "seconds": time.perf_counter() - t0,
    }
    return Volume(out, target.affine, modality=volume.modality, meta=meta)
