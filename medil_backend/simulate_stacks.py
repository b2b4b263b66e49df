"""Simulated multi-stack acquisitions from a fine volume (for evaluation and tests): orthogonal
thick-slice stacks, each with a known rigid motion of the anatomy, acquired by resampling the volume
at the moved positions (cubic B-spline, SimpleITK) and averaging groups of fine slices (a rect slice
profile), plus optional Gaussian noise. Each stack is stored with its nominal (unmoved) header, as a
scanner would store it; the true motions are returned for scoring the registration."""

from __future__ import annotations

import numpy as np

from .geometry import Grid, Volume, affine_from_parts, rotation


def rigid(angles_deg, translation_mm, centre) -> np.ndarray:
    """A 4x4 world RAS rigid transform: rotation (x, y, z degrees) about ``centre``, then a translation."""
    m = np.eye(4)
    r = rotation(angles_deg)
    c = np.asarray(centre, dtype=np.float64)
    m[:3, :3] = r
    m[:3, 3] = c - r @ c + np.asarray(translation_mm, dtype=np.float64)
    return m


def stack_of(
    truth: Volume,
    axis: int,
    factor: int,
    motion: np.ndarray,
    noise: float = 0.0,
    seed: int = 0,
    slice_motions: list[np.ndarray] | None = None,
) -> Volume:
    """``truth`` acquired in slices ``factor`` voxels thick along its ``axis``, the anatomy moved by ``motion``
    (``slice_motions``: one per slice instead, e.g. a patient who moved between interleaved packages)."""
    from .ops.interpolate import resample_sitk

    g = truth.grid
    n = g.shape[axis] // factor
    shape = list(g.shape)
    shape[axis] = n * factor
    fine = Grid(tuple(shape), g.affine)
    # where the moved anatomy is read: the stack's fine sampling points, carried by the motion
    if slice_motions is None:
        seen = resample_sitk(truth, Grid(fine.shape, motion @ fine.affine), "bspline").array
    else:
        parts = []
        for i, m in enumerate(slice_motions[:n]):
            start = [0, 0, 0]
            stop = list(fine.shape)
            start[axis], stop[axis] = i * factor, (i + 1) * factor
            part = fine.sub_grid(start, stop)
            parts.append(resample_sitk(truth, Grid(part.shape, m @ part.affine), "bspline").array)
        seen = np.concatenate(parts, axis=axis)
    seen = seen.reshape(*shape[:axis], n, factor, *shape[axis + 1 :]).mean(axis=axis + 1)
    spacing = g.spacing.copy()
    spacing[axis] *= factor
    origin = g.voxel_to_world(np.array([[(factor - 1) / 2.0 if a == axis else 0.0 for a in range(3)]]))[0]
    affine = affine_from_parts(spacing, g.direction, origin)
    if noise:
        seen = seen + np.random.default_rng(seed).normal(0, noise * float(np.percentile(seen, 99)), seen.shape)
    return Volume(seen.astype(np.float32), affine, modality=truth.modality)


def orthogonal_stacks(truth: Volume, factor: int, motions: list[np.ndarray], noise: float = 0.0) -> list[Volume]:
    """One stack per axis of ``truth`` (axis 0, 1, 2), with ``motions[k]`` for stack ``k``."""
    return [stack_of(truth, axis, factor, m, noise, seed=axis) for axis, m in zip(range(3), motions)]


__all__ = ["orthogonal_stacks", "rigid", "stack_of"]
