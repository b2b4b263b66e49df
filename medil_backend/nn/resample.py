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
