"""Simulated clinical acquisitions of a high-resolution patch, with exact world geometry.

A thick slice averages ``factor`` native voxels along one axis; its centre lies at the centre
of the voxels it averages, so the degraded grid's origin moves by half the block.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter1d

from ..geometry import Grid


def thick_slices(array: np.ndarray, grid: Grid, axis: int, factor: int, profile: str = "rect") -> tuple[np.ndarray, Grid]:
    """Average blocks of ``factor`` voxels along ``axis`` (rect profile, or Gaussian with FWHM = slice thickness)."""
    if factor <= 1:
        return array, grid
    a = np.asarray(array, dtype=np.float32)
    if profile == "gaussian":
        a = gaussian_filter1d(a, sigma=factor / 2.3548, axis=axis, mode="nearest")
    n = a.shape[axis] // factor
    a = np.take(a, np.arange(n * factor), axis=axis)
    shape = list(a.shape)
    shape[axis : axis + 1] = [n, factor]
    a = a.reshape(shape).mean(axis=axis + 1)
    aff = grid.affine.copy()
    aff[:3, axis] *= factor
    aff[:3, 3] = grid.voxel_to_world(np.eye(3)[axis] * (factor - 1) / 2.0)
    return a.astype(np.float32), Grid(a.shape, aff)


def add_noise(array: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    return (array + rng.normal(0.0, sigma, size=array.shape)).astype(np.float32)


def slice_gap(array: np.ndarray, grid: Grid, axis: int, stride: int = 2) -> tuple[np.ndarray, Grid]:
    """Keep every ``stride``-th slice along ``axis`` (an acquisition with gaps between slices)."""
    a = np.take(array, np.arange(0, array.shape[axis], stride), axis=axis)
    aff = grid.affine.copy()
    aff[:3, axis] *= stride
    return a, Grid(a.shape, aff)
