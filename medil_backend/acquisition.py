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


#: the share of a task's working memory an operator's cached sampling coordinates may take
CACHE_SHARE = 0.5
#: a cached operator's quadrature points run in at most this many groups, side by side on a CPU's cores (a
#: constant: the adjoint sums the groups' splats in one order whatever the core count)
GROUPS = 4
#: the most sampling points one piece of the operator composes at a time (float64 coordinates: bounded memory)
CHUNK_VOXELS = 1 << 21


class AcquisitionOperator:
    """``A``: an image on ``fine`` (a torch tensor (B, C, *fine.shape)) -> its acquisition on ``acquired``.

    Each acquired voxel averages the image over its footprint: along each of its axes, a profile
    of the voxel's extent (``thickness_mm`` where given, e.g. a slice thicker or thinner than its
    spacing; else the spacing), rect or Gaussian (FWHM = extent), sampled at the fine grid's
    resolution and read by trilinear interpolation in world coordinates. ``A`` is linear; its
    adjoint ``A^T`` is trilinear interpolation's own adjoint (the splat of ``grid_sample``'s backward), exact to
    rounding (a dot-product test checks it).

    ``cache``: keep the sampling coordinates after the first call (:meth:`cache_bytes` of memory), for an
    operator applied many times (the data-consistency steps); composing them in float64 is most of an
    uncached call's time.
    """

    def __init__(
        self,
        acquired: Grid,
        fine: Grid,
        thickness_mm: Sequence[float | None] | None = None,
        profile: str | Sequence[str] = "rect",
        cache: bool = False,
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
        self.cache = cache
        self._cached: tuple | None = None

    def cache_bytes(self, batch: int = 1) -> float:
        """The memory caching takes: the sampling coordinates (float32, three per point and acquired voxel), and
        the groups' splats summed by the adjoint (one fine volume each)."""
        groups = min(GROUPS, len(self.points))
        return (12.0 * len(self.points) * self.acquired.num_voxels + 4.0 * groups * self.fine.num_voxels) * batch

    def _pieces(self, batch: int, device):
        """(quadrature point, weight, first and last slice along the acquired grid's first axis, grid_sample coordinates)
        of every point, a slab of at most :data:`CHUNK_VOXELS` coordinates at a time."""
        from .geometry import voxel_coords
        from .nn.resample import _normalised

        shape = self.acquired.shape
        step = max(1, CHUNK_VOXELS // max(1, shape[1] * shape[2]))
        for p, (shift, w) in enumerate(self.points):
            aff = self.acquired.affine.copy()
            aff[:3, 3] += shift
            grid = Grid(shape, aff)
            for a in range(0, shape[0], step):
                b = min(a + step, shape[0])
                sub = grid.sub_grid((a, 0, 0), (b, shape[1], shape[2]))
                q = voxel_coords([self.fine] * batch, [sub] * batch, device)
                yield p, w, a, b, _normalised(q, self.fine.shape).reshape(batch, b - a, shape[1], shape[2], 3)

    def _groups(self, batch: int, device) -> list[tuple[object, list[float]]]:
        """The points in at most :data:`GROUPS` runs, each run's coordinates as one grid (B, points x slices, rows,
        columns, 3) with its points' weights; kept (``cache``)."""
        import torch

        key = (batch, str(device))
        if self._cached is None or self._cached[0] != key:
            self._cached = None  # the old coordinates go before the new are composed
            per_point: list[list] = [[] for _ in self.points]
            for p, _, _, _, g in self._pieces(batch, device):
                per_point[p].append(g)
            runs = np.array_split(np.arange(len(self.points)), min(GROUPS, len(self.points)))
            groups = [(torch.cat([g for p in run for g in per_point[p]], dim=1), [self.points[p][1] for p in run]) for run in runs]
            self._cached = (key, groups)
        return self._cached[1]

    @staticmethod
    def _each_group(groups, work, device) -> list:
        """``work(grid, weights)`` for every group: side by side on a CPU (the CPU kernels of trilinear sampling and
        of its adjoint use one core per batch entry), in order; the results in the groups' order."""
        import torch

        threads = min(len(groups), torch.get_num_threads())
        if torch.device(device).type != "cpu" or threads < 2:
            return [work(g, w) for g, w in groups]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(lambda gw: work(*gw), groups))

    def __call__(self, x):
        """``A x``: (B, C, *acquired.shape) float32, differentiable in ``x``."""
        import torch
        import torch.nn.functional as F

        src = x.float()
        B, C = x.shape[:2]
        n = self.acquired.shape[0]
        if self.cache:  # one sampling pass per group of points, then their weighted sum in the points' order
            groups = self._groups(B, x.device)
            samples = self._each_group(
                groups, lambda g, w: F.grid_sample(src, g, mode="bilinear", padding_mode="border", align_corners=True), x.device
            )
            ys = [y[:, :, k * n : (k + 1) * n] for y, (_, w) in zip(samples, groups) for k in range(len(w))]
            out = ys[0] * self.points[0][1]
            for y, (_, w) in zip(ys[1:], self.points[1:]):
                out = out + y * w
            return out
        out = torch.empty((B, C, *self.acquired.shape), dtype=torch.float32, device=x.device)
        for p, w, a, b, g in self._pieces(B, x.device):
            y = F.grid_sample(src, g, mode="bilinear", padding_mode="border", align_corners=True) * w
            if p:  # the first point writes each slab, the others add (autograd follows either)
                out[:, :, a:b] += y
            else:
                out[:, :, a:b] = y
        return out

    def adjoint_into(self, out, y) -> None:
        """``out += A^T y`` (the joint steps' sum over operators; a slab operator adds into its part only)."""
        out += self.adjoint(y)

    def adjoint(self, y):
        """``A^T y`` on the fine grid (B, C, *fine.shape): each quadrature point's trilinear splat, weighted."""
        import torch

        y = y.float()
        shape = (y.shape[0], y.shape[1], *self.fine.shape)
        like = torch.empty(shape, dtype=torch.float32, device=y.device)  # the input's sizes, never read

        def splat(values, grid):  # the gradient of grid_sample with respect to its input: trilinear interpolation's adjoint
            return torch.ops.aten.grid_sampler_3d_backward(values.contiguous(), like, grid, 0, 1, True, [True, False])[0]

        if self.cache:  # one splat per group of points (their weighted values one after another), summed in order
            groups = self._groups(y.shape[0], y.device)
            parts = self._each_group(groups, lambda g, w: splat(torch.cat([y * v for v in w], dim=2), g), y.device)
            out = parts[0]
            for part in parts[1:]:
                out = out + part
            return out
        out = torch.zeros(shape, dtype=torch.float32, device=y.device)
        for _, w, a, b, g in self._pieces(y.shape[0], y.device):
            out += splat(y[:, :, a:b] * w, g)  # bilinear (0), border padding (1), align_corners
        return out
