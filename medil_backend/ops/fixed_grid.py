"""Reconstruct with the fixed-grid baseline: resample to its grid, autoencode, resample to the target."""

from __future__ import annotations

import numpy as np
import torch

from ..geometry import Grid, Volume, covering_grid
from ..intensity import fit_normalizer
from ..nn.autoencoder import sample_on_grids
from ..nn.fixed_grid import FixedGridAutoencoder
from .common import Progress, report, resolve_device


def fixed_grid_for(volume_grid: Grid, spacing: float, multiple: int) -> Grid:
    """The baseline's working grid: isotropic ``spacing``, the input's orientation, covering it, sizes padded to ``multiple``."""
    g = covering_grid(volume_grid.edge_corners(), spacing, volume_grid.direction)
    shape = np.asarray(g.shape)
    padded = -(-shape // multiple) * multiple
    return Grid(tuple(int(s) for s in padded), g.affine).sub_grid(-(padded - shape) // 2, padded - (padded - shape) // 2)


def fixed_grid_reconstruct(
    volume: Volume,
    target: Grid,
    model: FixedGridAutoencoder,
    *,
    device: str = "auto",
    progress: Progress | None = None,
    modality: str | None = None,
) -> Volume:
    dev = resolve_device(device)
    norm = fit_normalizer(volume.array, modality or volume.modality)
    work = fixed_grid_for(volume.grid, model.config.spacing, model.config.multiple)
    model = model.to(dev).eval()
    report(progress, 0.0, "resampling to the model's grid")
    with torch.inference_mode():
        x = torch.from_numpy(norm.forward(volume.array)).to(dev)[None, None]
        x1 = sample_on_grids(x, [volume.grid], [work])
        report(progress, 0.3, "autoencoding")
        y1 = model(x1)[0]
        report(progress, 0.7, "resampling to the output grid")
        y = sample_on_grids(y1, [work], [target])[0, 0].float().cpu().numpy()
    report(progress, 1.0, "done")
    return Volume(norm.inverse(y), target.affine, modality=norm.modality, meta={"normalization": norm.to_dict(), "work_grid": repr(work)})
