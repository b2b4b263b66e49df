"""Test-time self-supervised super-resolution (the SMORE / ECLARE principle), ``--method adapt``.

A thick-slice scan is sharp in-plane. So: degrade the scan *in-plane* with its own through-plane
acquisition (the same slice thickness and profile, through :class:`AcquisitionOperator`), put it
back on the fine grid with cubic B-spline, and train a small 2D residual network, for a bounded
time, to undo that on in-plane slices. The network has then learnt what the B-spline interpolant
of *this* scanner's slices misses; applied to planes that contain the slice axis (B-spline
upsampled along it), it restores through-plane detail. Both planes that contain the slice axis are
processed and averaged, and data consistency with the input follows (as in ``fast``).

Each seed trains its own network (``samples`` > 1): their mean is the output and their per-voxel
standard deviation is an uncertainty map.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from ..acquisition import AcquisitionOperator
from ..errors import MedILError
from ..geometry import Grid, Volume
from .runtime import Progress, check_cancel, report

PATCH = 48
MIN_PATCH = 16
BATCH = 12
WIDTH = 32
DEPTH = 6


class ResidualCNN2d(nn.Module):
    """A plain 2D residual network: x + f(x), f a stack of 3x3 convolutions (the SMORE-size model, smaller)."""

    def __init__(self, width: int = WIDTH, depth: int = DEPTH) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(1, width, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(width, 1, 3, padding=1))
        nn.init.zeros_(layers[-1].weight)
        nn.init.zeros_(layers[-1].bias)
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def refined_along(grid: Grid, axis: int, factor: int) -> Grid:
    """``grid`` with ``factor`` voxels for each one along ``axis`` (same region: the new voxels tile the old)."""
    aff = grid.affine.copy()
    aff[:3, axis] = grid.affine[:3, axis] / factor
    aff[:3, 3] = grid.affine[:3, 3] - aff[:3, axis] * (factor - 1) / 2.0
    shape = list(grid.shape)
    shape[axis] *= factor
    return Grid(shape, aff)


def _bspline(array: np.ndarray, src: Grid, dst: Grid) -> np.ndarray:
    from ..baselines import resample_sitk

    return resample_sitk(Volume(array, src.affine), dst, "bspline").array.astype(np.float32)


def _degraded_in_plane(x: np.ndarray, grid: Grid, axis: int, thickness: float, profile: str) -> np.ndarray | None:
    """``x`` acquired along in-plane ``axis`` as the scanner acquired its slices, then B-spline back onto ``grid``."""
    sp = grid.spacing[axis]
    n = int(np.floor(grid.shape[axis] * sp / thickness))
    if n < 2 or thickness < 1.2 * sp:
        return None
    aff = grid.affine.copy()
    aff[:3, axis] *= thickness / sp
    aff[:3, 3] = grid.voxel_to_world(np.eye(3)[axis] * (thickness / sp - 1) / 2.0)
    shape = list(grid.shape)
    shape[axis] = n
    coarse = Grid(shape, aff)
    widths = [None, None, None]
    widths[axis] = thickness
    profiles = ["rect"] * 3
    profiles[axis] = profile
    # the other axes of ``coarse`` are ``grid``'s, so the operator averages along ``axis`` only
    op = AcquisitionOperator(coarse, grid, widths, profiles)
    with torch.no_grad():
        y = op(torch.from_numpy(x)[None, None])[0, 0].numpy()
    return _bspline(y, coarse, grid)


def _planes(x: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """All 2D planes of ``x`` spanned by (``rows``, ``cols``): (N, 1, n_rows, n_cols)."""
    other = 3 - rows - cols
    return np.ascontiguousarray(np.transpose(x, (other, rows, cols)))[:, None]


def _patch_sampler(pairs: list[tuple[np.ndarray, np.ndarray]], rng: np.random.Generator):
    """Random square crops (PATCH, or the planes' size if smaller, at least MIN_PATCH) of (degraded,
    sharp) planes, favouring crops with signal."""
    size = min([PATCH] + [min(d.shape[2], d.shape[3]) for d, _ in pairs])
    if size < MIN_PATCH:
        raise MedILError(f"the input's slices are smaller than {MIN_PATCH} x {MIN_PATCH} voxels: too small to adapt to; use --method fast")

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        while len(xs) < BATCH:
            d, s = pairs[int(rng.integers(len(pairs)))]
            k = int(rng.integers(d.shape[0]))
            i = int(rng.integers(d.shape[2] - size + 1))
            j = int(rng.integers(d.shape[3] - size + 1))
            target = s[k, :, i : i + size, j : j + size]
            if float(target.std()) < 0.02 and rng.random() < 0.9:  # mostly background: usually skip
                continue
            xs.append(d[k, :, i : i + size, j : j + size])
            ys.append(target)
        return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))

    return batch


def train_adapter(
    x: np.ndarray,
    grid: Grid,
    slice_axis: int,
    thickness: float,
    profile: str,
    seconds: float,
    seed: int,
    progress: Progress | None = None,
    span: tuple[float, float] = (0.0, 1.0),
    cancel=None,
) -> tuple[ResidualCNN2d, dict]:
    """Train a :class:`ResidualCNN2d` for ``seconds`` on in-plane slices of ``x`` (normalised
    intensities on ``grid``), degraded along each in-plane axis as the scanner degraded ``slice_axis``."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    pairs = []
    for a in (a for a in range(3) if a != slice_axis):
        deg = _degraded_in_plane(x, grid, a, thickness, profile)
        if deg is not None:
            b = 3 - a - slice_axis
            pairs.append((_planes(deg, a, b), _planes(x, a, b)))  # the degraded axis runs down the rows
    if not pairs:
        raise MedILError("the input's in-plane voxels are not fine enough, compared with its slices, to learn from; use --method fast")
    batch = _patch_sampler(pairs, rng)
    net = ResidualCNN2d()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    t0 = time.perf_counter()
    losses: list[float] = []
    step = 0
    while time.perf_counter() - t0 < seconds:
        check_cancel(cancel)
        xb, yb = batch()
        loss = torch.nn.functional.l1_loss(net(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 20 == 0:
            frac = min(1.0, (time.perf_counter() - t0) / seconds)
            report(progress, span[0] + (span[1] - span[0]) * frac, f"adapting to this scan: step {step}, L1 {np.mean(losses[-20:]):.4f}")
    first = float(np.mean(losses[: max(1, min(20, len(losses) // 4))])) if losses else float("nan")
    last = float(np.mean(losses[-max(1, min(20, len(losses) // 4)) :])) if losses else float("nan")
    return net.eval(), {"steps": step, "l1_first": first, "l1_last": last}


def apply_adapter(net: ResidualCNN2d, y: np.ndarray, grid: Grid, fine: Grid, slice_axis: int, cancel=None) -> np.ndarray:
    """``y`` (on ``grid``) B-spline-upsampled onto ``fine`` (``grid`` refined along ``slice_axis``), then ``net``
    applied to every plane that contains ``slice_axis`` (as rows), both orientations, averaged."""
    u = _bspline(y, grid, fine)
    out = np.zeros_like(u)
    others = [a for a in range(3) if a != slice_axis]
    with torch.no_grad():
        for b in others:
            planes = _planes(u, slice_axis, b)
            pred = np.empty_like(planes)
            for i in range(0, planes.shape[0], 8):
                check_cancel(cancel)
                pred[i : i + 8] = net(torch.from_numpy(planes[i : i + 8])).numpy()
            other = 3 - slice_axis - b
            order = np.argsort((other, slice_axis, b))
            out += np.transpose(pred[:, 0], order)
    return out / len(others)
