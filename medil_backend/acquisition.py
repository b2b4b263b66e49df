"""The physics of a clinical acquisition: thick slices (rect or Gaussian profile, gaps), in-plane
downsampling and noise, with exact world geometry.

One module for everything that simulates or inverts an acquisition:

- numpy functions that *simulate* one (training pairs, evaluation inputs): a thick slice averages
  ``factor`` native voxels along one axis, and its centre lies at the centre of the voxels it
  averages, so the degraded grid's origin moves by half the block;
- :class:`AcquisitionOperator`, the same physics as a differentiable torch operator ``A`` from a
  fine grid to an acquired grid, with its exact adjoint ``A^T`` (data consistency in
  super-resolution: the output, acquired again, must reproduce the input).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.ndimage import gaussian_filter1d

from .errors import MedILError
from .geometry import Grid

PROFILES = ("rect", "gaussian")
FWHM_TO_SIGMA = 1.0 / 2.3548200450309493


# -- simulation (numpy) ---------------------------------------------------------------------------------


def thick_slices(array: np.ndarray, grid: Grid, axis: int, factor: int, profile: str = "rect") -> tuple[np.ndarray, Grid]:
    """Average blocks of ``factor`` voxels along ``axis`` (rect profile, or Gaussian with FWHM = slice thickness)."""
    if factor <= 1:
        return array, grid
    a = np.asarray(array, dtype=np.float32)
    if profile == "gaussian":
        a = gaussian_filter1d(a, sigma=factor * FWHM_TO_SIGMA, axis=axis, mode="nearest")
    n = a.shape[axis] // factor
    a = np.take(a, np.arange(n * factor), axis=axis)
    shape = list(a.shape)
    shape[axis : axis + 1] = [n, factor]
    a = a.reshape(shape).mean(axis=axis + 1)
    aff = grid.affine.copy()
    aff[:3, axis] *= factor
    aff[:3, 3] = grid.voxel_to_world(np.eye(3)[axis] * (factor - 1) / 2.0)
    return a.astype(np.float32), Grid(a.shape, aff)


def inplane_downsample(array: np.ndarray, grid: Grid, axes: Sequence[int], factor: int) -> tuple[np.ndarray, Grid]:
    """Average ``factor`` voxels along each of ``axes`` (a coarser in-plane matrix)."""
    for a in axes:
        array, grid = thick_slices(array, grid, a, factor, "rect")
    return array, grid


def add_noise(array: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    return (array + rng.normal(0.0, sigma, size=array.shape)).astype(np.float32)


def slice_gap(array: np.ndarray, grid: Grid, axis: int, stride: int = 2) -> tuple[np.ndarray, Grid]:
    """Keep every ``stride``-th slice along ``axis`` (an acquisition with gaps between slices)."""
    a = np.take(array, np.arange(0, array.shape[axis], stride), axis=axis)
    aff = grid.affine.copy()
    aff[:3, axis] *= stride
    return a, Grid(a.shape, aff)


# -- the operator (torch, differentiable) -----------------------------------------------------------------


#: the most quadrature points one axis of a slice profile may take (a bound on every derived size)
MAX_PROFILE_POINTS = 256


def _profile_points(width_mm: float, step_mm: float, profile: str) -> tuple[np.ndarray, np.ndarray]:
    """Quadrature of a slice profile of ``width_mm`` (rect width, or Gaussian FWHM): offsets in mm and weights summing to 1.

    Symmetric about 0, so a thick slice's centre is the centre of what it averages.
    """
    if profile not in PROFILES:
        raise MedILError(f"slice profile {profile!r} is not known; use rect or gaussian", options=("slice_profile",))
    if width_mm <= step_mm * (1 + 1e-6):
        return np.zeros(1), np.ones(1)
    count = width_mm / step_mm * (1.0 if profile == "rect" else 3 * FWHM_TO_SIGMA * 2)
    if not np.isfinite(count) or count > MAX_PROFILE_POINTS:
        raise MedILError(
            f"a slice profile {width_mm:.4g} mm wide sampled every {step_mm:.3g} mm needs {count:.3g} points (at most "
            f"{MAX_PROFILE_POINTS}): the slice thickness is far larger than the slices; give the real thickness",
            options=("slice_thickness",),
        )
    if profile == "rect":
        n = int(np.ceil(width_mm / step_mm - 1e-6))
        offsets = (np.arange(n) - (n - 1) / 2.0) * (width_mm / n)
        weights = np.full(n, 1.0 / n)
    else:
        sigma = width_mm * FWHM_TO_SIGMA
        half = int(np.ceil(3 * sigma / step_mm))
        offsets = np.arange(-half, half + 1) * step_mm
        weights = np.exp(-0.5 * (offsets / sigma) ** 2)
        weights /= weights.sum()
    return offsets, weights


class AcquisitionOperator:
    """``A``: an image on ``fine`` (a torch tensor (B, C, *fine.shape)) -> its acquisition on ``acquired``.

    Each acquired voxel averages the image over its footprint: along each of its axes, a profile
    of the voxel's extent (``thickness_mm`` where given, e.g. a slice thicker or thinner than its
    spacing; else the spacing), rect or Gaussian (FWHM = extent), sampled at the fine grid's
    resolution and read by trilinear interpolation in world coordinates. ``A`` is linear, so its
    adjoint is the vector-Jacobian product, exact to rounding (a dot-product test checks it).
    """

    def __init__(
        self,
        acquired: Grid,
        fine: Grid,
        thickness_mm: Sequence[float | None] | None = None,
        profile: str | Sequence[str] = "rect",
    ) -> None:
        self.acquired, self.fine = acquired, fine
        widths = list(acquired.spacing)
        for a, t in enumerate(thickness_mm or (None, None, None)):
            if t is not None:
                if not (np.isfinite(t) and t > 0):
                    raise MedILError(f"slice thickness must be a positive number of mm, got {t}", options=("slice_thickness",))
                widths[a] = float(t)
        profiles = [profile] * 3 if isinstance(profile, str) else list(profile)
        # the fine grid's step along each acquired axis: the quadrature resolves the fine image
        proj = np.abs(fine.direction.T @ acquired.direction)  # |cos| between fine axis i and acquired axis a
        step = (proj * fine.spacing[:, None]).sum(0) / np.maximum(proj.sum(0), 1e-9)
        axes = [_profile_points(widths[a], max(float(step[a]), 1e-3), profiles[a]) for a in range(3)]
        self.points: list[tuple[np.ndarray, float]] = []
        for ox, wx in zip(*axes[0]):
            for oy, wy in zip(*axes[1]):
                for oz, wz in zip(*axes[2]):
                    shift = acquired.direction @ np.array([ox, oy, oz])  # mm, along the acquired axes
                    self.points.append((shift, float(wx * wy * wz)))
        self.widths = widths

    def __call__(self, x):
        from .nn.resample import sample_on_grids

        out = None
        for shift, w in self.points:
            aff = self.acquired.affine.copy()
            aff[:3, 3] += shift
            y = sample_on_grids(x, [self.fine] * x.shape[0], [Grid(self.acquired.shape, aff)] * x.shape[0]) * w
            out = y if out is None else out + y
        return out

    def adjoint(self, y):
        """``A^T y`` on the fine grid (B, C, *fine.shape)."""
        import torch

        x0 = torch.zeros((y.shape[0], y.shape[1], *self.fine.shape), dtype=y.dtype, device=y.device, requires_grad=True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self(x0), x0, grad_outputs=y)
        return g
