"""Trilinear resampling of a tensor on one world grid onto another (border padding).

Voxel coordinates are composed in float64 (:func:`medil_backend.geometry.voxel_coords`) and
handed to ``F.grid_sample`` in float32, one slab of the target at a time, so memory is bounded
by ``chunk_voxels`` and not by the target's size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..geometry import Grid, voxel_coords


def _normalised(q: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """float64 voxel coordinates (B, N, 3) -> grid_sample's [-1, 1] coordinates (x = last axis first), float32."""
    s = torch.tensor([max(int(n) - 1, 1) for n in size], dtype=torch.float64, device=q.device)
    g = q / s * 2 - 1
    return g.flip(-1).to(torch.float32)


def sample_on_grids(x: torch.Tensor, x_grids: Sequence[Grid], targets: Sequence[Grid], chunk_voxels: int = 1 << 21) -> torch.Tensor:
    """Trilinear samples of ``x`` (B, C, *x_grids[0].shape) at every voxel of ``targets``: (B, C, *targets[0].shape) float32."""
    shape = targets[0].shape
    B, C = x.shape[:2]
    per_slice = max(1, shape[1] * shape[2])
    step = max(1, chunk_voxels // per_slice)
    src = x.float()
    out = torch.empty((B, C, *shape), dtype=torch.float32, device=x.device)
    for a in range(0, shape[0], step):
        b = min(a + step, shape[0])
        sub = [t.sub_grid((a, 0, 0), (b, shape[1], shape[2])) for t in targets]
        g = _normalised(voxel_coords(x_grids, sub, x.device), x.shape[2:]).reshape(B, b - a, shape[1], shape[2], 3)
        out[:, :, a:b] = F.grid_sample(src, g, mode="bilinear", padding_mode="border", align_corners=True)
    return out


def resample_to_grid(array, grid: Grid, target: Grid):
    """A numpy volume on ``grid`` resampled trilinearly onto ``target`` (border values outside): float32 numpy."""
    import numpy as np

    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    return sample_on_grids(x, [grid], [target])[0, 0].numpy()


def _cubic_weights(t: torch.Tensor) -> list[torch.Tensor]:
    """Cubic B-spline weights of the 4 neighbours at offsets -1, 0, 1, 2 for fractional positions ``t`` in [0, 1)."""
    t2, t3 = t * t, t * t * t
    return [(1 - t) ** 3 / 6, (3 * t3 - 6 * t2 + 4) / 6, (-3 * t3 + 3 * t2 + 3 * t + 1) / 6, t3 / 6]


def bspline_on_grids(c: torch.Tensor, c_grids: Sequence[Grid], targets: Sequence[Grid], chunk_voxels: int = 1 << 18) -> torch.Tensor:
    """The cubic B-spline with coefficients ``c`` (B, C, *c_grids[0].shape) evaluated at every voxel of ``targets``:
    (B, C, *targets[0].shape) float32, differentiable in ``c``. Coefficients beyond the grid repeat its border (as the
    other resamplers here). With coefficients prefiltered from samples (:data:`BSPLINE_PREFILTER`), this is cubic
    B-spline interpolation (SimpleITK's and scipy's ``order=3``)."""
    shape = targets[0].shape
    B, C = c.shape[:2]
    size = [int(n) for n in c.shape[2:]]
    flat = c.float().reshape(B, C, -1)
    out = []
    per_slice = max(1, shape[1] * shape[2])
    step = max(1, chunk_voxels // per_slice)
    for a in range(0, shape[0], step):
        b = min(a + step, shape[0])
        sub = [t.sub_grid((a, 0, 0), (b, shape[1], shape[2])) for t in targets]
        q = voxel_coords(c_grids, sub, c.device)  # (B, N, 3) float64
        base = torch.floor(q)
        w = [_cubic_weights((q[..., k] - base[..., k]).to(torch.float32)) for k in range(3)]
        i = [base[..., k].long() for k in range(3)]
        acc = None
        for o0 in range(4):
            i0 = (i[0] + (o0 - 1)).clamp(0, size[0] - 1)
            for o1 in range(4):
                i1 = (i[1] + (o1 - 1)).clamp(0, size[1] - 1)
                w01 = w[0][o0] * w[1][o1]
                row = (i0 * size[1] + i1) * size[2]
                for o2 in range(4):
                    idx = row + (i[2] + (o2 - 1)).clamp(0, size[2] - 1)
                    term = torch.gather(flat, 2, idx.unsqueeze(1).expand(B, C, -1)) * (w01 * w[2][o2]).unsqueeze(1)
                    acc = term if acc is None else acc + term
        out.append(acc.reshape(B, C, b - a, shape[1], shape[2]))
    return torch.cat(out, dim=2)


#: the cubic B-spline prefilter (samples -> coefficients, the inverse of [1, 4, 1] / 6), truncated to +-4 taps and
#: normalised to a gain of 1: h[k] = sqrt(3) (sqrt(3) - 2)^|k| (Unser, Aldroubi & Eden 1991)
_POLE = 3**0.5 - 2
_TAPS = [3**0.5 * _POLE ** abs(k) for k in range(-4, 5)]
BSPLINE_PREFILTER = [v / sum(_TAPS) for v in _TAPS]
PREFILTER_HALF = 4


def bspline_prefilter(samples: torch.Tensor) -> torch.Tensor:
    """Cubic B-spline coefficients from samples (B, C, X, Y, Z) that extend :data:`PREFILTER_HALF` voxels beyond the
    wanted grid on every side: the result is that grid's coefficients, (B, C, X - 8, Y - 8, Z - 8) (no padding: the
    margin holds the real neighbours, so a tile's coefficients equal the whole volume's)."""
    h = torch.tensor(BSPLINE_PREFILTER, dtype=samples.dtype, device=samples.device)
    B, C = samples.shape[:2]
    x = samples.reshape(B * C, 1, *samples.shape[2:])
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = len(BSPLINE_PREFILTER)
        x = F.conv3d(x, h.reshape(shape))
    return x.reshape(B, C, *x.shape[2:])
