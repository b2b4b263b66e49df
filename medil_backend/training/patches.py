"""Native-resolution patch sampling with exscribed grids (MedIL's stage 2).

For each sample the output patch C_X̂ is a crop of the volume's own grid (never resampled); the
latent grid C_Z encloses C_X̂ with a buffer; the input grid C_X is the crop of the native grid
that encloses C_Z with a margin, so every prediction has spatial context. Optionally the input
is degraded (thick slices) while the target stays native: the model learns super-resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..geometry import Grid, exscribed_grid


@dataclass
class PatchSample:
    x: np.ndarray  # input, on x_grid
    x_grid: Grid
    target: np.ndarray  # native patch, on out_grid
    out_grid: Grid
    z_grid: Grid


def crop_with_padding(array: np.ndarray, start: np.ndarray, stop: np.ndarray, fill: float = 0.0) -> np.ndarray:
    """array[start:stop] for any integer box, padding outside the array with ``fill``."""
    out = np.full(tuple(int(b - a) for a, b in zip(start, stop)), fill, dtype=array.dtype)
    src_lo = np.maximum(start, 0)
    src_hi = np.minimum(stop, array.shape)
    if np.any(src_hi <= src_lo):
        return out
    dst_lo = src_lo - start
    dst_hi = dst_lo + (src_hi - src_lo)
    out[tuple(slice(a, b) for a, b in zip(dst_lo, dst_hi))] = array[tuple(slice(a, b) for a, b in zip(src_lo, src_hi))]
    return out


def enclosing_index_box(grid: Grid, inner: Grid, margin_vox: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Integer voxel box of ``grid`` whose voxels cover ``inner``'s region, plus ``margin_vox`` voxels."""
    vox = grid.world_to_voxel(inner.edge_corners())
    lo = np.floor(vox.min(axis=0) + 0.5).astype(int) - margin_vox
    hi = np.ceil(vox.max(axis=0) - 0.5).astype(int) + 1 + margin_vox
    return lo, hi


def sample_patch(
    array: np.ndarray,
    grid: Grid,
    rng: np.random.Generator,
    patch: int,
    latent_spacing: float,
    latent_buffer_mm: float,
    centres: np.ndarray | None = None,
    fill: float = 0.0,
    input_shape: tuple[int, int, int] | None = None,
) -> PatchSample:
    """One training sample. ``centres`` (K, 3) are candidate patch centres (e.g. foreground voxels).

    ``input_shape`` fixes the input crop's shape (centred on the needed box) so that samples of
    one volume stack into a batch.
    """
    size = np.asarray(grid.shape)
    p = np.minimum(patch, size)
    if centres is not None and len(centres):
        c = centres[rng.integers(len(centres))]
    else:
        c = rng.integers(0, size)
    start = np.clip(c - p // 2, 0, size - p)
    out_grid = grid.sub_grid(start, start + p)
    target = array[tuple(slice(a, a + n) for a, n in zip(start, p))]
    z_grid = exscribed_grid(out_grid, latent_spacing, margin_mm=latent_buffer_mm)
    lo, hi = enclosing_index_box(grid, z_grid, margin_vox=1)
    if input_shape is not None:
        mid = (lo + hi) // 2
        lo = mid - np.asarray(input_shape) // 2
        hi = lo + np.asarray(input_shape)
    x = crop_with_padding(array, lo, hi, fill)
    return PatchSample(x, grid.sub_grid(lo, hi), np.ascontiguousarray(target), out_grid, z_grid)


def input_shape_for(grid: Grid, patch: int, latent_spacing: float, latent_buffer_mm: float) -> tuple[int, int, int]:
    """The largest input crop shape :func:`sample_patch` can need for this volume (for batching)."""
    p = np.minimum(patch, np.asarray(grid.shape))
    probe = grid.sub_grid(np.zeros(3, int), p)
    z_grid = exscribed_grid(probe, latent_spacing, margin_mm=latent_buffer_mm)
    lo, hi = enclosing_index_box(grid, z_grid, margin_vox=1)
    return tuple(int(v) + 2 for v in (hi - lo))  # slack for sub-voxel shifts of the latent grid
