"""Reconstruct / resample a volume onto any output grid with a MedIL autoencoder.

The input is encoded once on its native grid; the output is decoded slab by slab along its
longest axis, each slab with a halo that covers the decoder's receptive field, so the working
memory depends on the slab size, not on the output size, and the slabs join exactly.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import MedILError
from ..geometry import Grid, Volume, canonical_order
from ..intensity import fit_normalizer
from ..nn.autoencoder import MedILAutoencoder
from .common import Progress, check_cancel, report, resolve_device

DEFAULT_MAX_MEMORY_GB = 3.0


def _encoder_bytes(model: MedILAutoencoder, n_voxels: int) -> float:
    # the encoder's activations mirror the decoder's, level for level
    return n_voxels * model.decoder.block_bytes_per_output_voxel()


def plan_slabs(model: MedILAutoencoder, target: Grid, budget_bytes: float, slab: int | None = None) -> tuple[int, int]:
    """(axis, thickness in intermediate voxels) of the decoding slabs that fit ``budget_bytes``."""
    inter = target.coarsened(model.factor)
    axis = int(np.argmax(inter.shape))
    halo = model.decoder_halo()
    per_slice = float(np.prod([s for a, s in enumerate(inter.shape) if a != axis])) * model.factor**3
    per_slice *= model.decoder.block_bytes_per_output_voxel()
    if slab is None:
        fit = int(budget_bytes // per_slice) - 2 * halo
        if fit < 1:
            need = (1 + 2 * halo) * per_slice / 2**30
            raise MedILError(
                f"the output grid {target.shape} is too big for the memory limit "
                f"({budget_bytes / 2**30:.2f} GB; one slab needs {need:.2f} GB): raise --max-memory or choose a coarser spacing or smaller --fov"
            )
        slab = fit
    return axis, max(1, min(int(slab), inter.shape[axis]))


def reconstruct(
    volume: Volume,
    target: Grid,
    model: MedILAutoencoder,
    *,
    device: str | torch.device = "auto",
    progress: Progress | None = None,
    cancel: Any = None,
    max_memory_gb: float | None = None,
    slab: int | None = None,
    modality: str | None = None,
) -> Volume:
    """Encode ``volume`` on its native grid (axes re-indexed closest to RAS) and decode it onto ``target``.

    ``modality`` (``mri``/``ct``/``auto``) overrides ``volume.modality``. ``slab`` forces the slab
    thickness (intermediate voxels); by default it is the largest that fits ``max_memory_gb``.
    Returns a float32 :class:`Volume` on ``target``, in the input's intensity units.
    """
    target = Grid(target.shape, target.affine).validate("the output grid")
    volume.grid.validate("the input")
    volume = canonical_order(volume)  # the network sees the same array however the file was stored
    grid = volume.grid
    if max_memory_gb is not None and not max_memory_gb > 0:
        raise MedILError("--max-memory must be a positive number of GB")
    dev = resolve_device(device)
    budget = (max_memory_gb or DEFAULT_MAX_MEMORY_GB) * 2**30
    norm = fit_normalizer(volume.array, modality or volume.modality)

    need = _encoder_bytes(model, grid.num_voxels)
    if need > budget:
        raise MedILError(
            f"encoding the input {grid.shape} needs about {need / 2**30:.1f} GB, over the memory limit "
            f"({budget / 2**30:.1f} GB): raise --max-memory or crop the input"
        )
    # the encoder's activations are freed before decoding; the input and the latent stay
    resident = 4.0 * grid.num_voxels + 4.0 * model.config.latent_channels * model.latent_grid(grid).num_voxels
    axis, thick = plan_slabs(model, target, budget - resident, slab)
    model = model.to(dev).eval()
    report(progress, 0.0, "encoding")
    check_cancel(cancel)
    with torch.inference_mode():
        x = torch.from_numpy(norm.forward(volume.array)).to(dev)[None, None]
        z_grid = model.latent_grid(grid)
        z = model.encode(x, grid, z_grid)[0]
        out = np.empty(target.shape, dtype=np.float32)
        inter = target.coarsened(model.factor)
        halo, F, M = model.decoder_halo(), model.factor, inter.shape[axis]
        starts = list(range(0, M, thick))
        for n, a in enumerate(starts):
            check_cancel(cancel)
            report(progress, n / len(starts), f"decoding slab {n + 1}/{len(starts)}")
            b = min(a + thick, M)
            lo, hi = max(0, a - halo), min(M, b + halo)
            start = [0, 0, 0]
            stop = list(inter.shape)
            start[axis], stop[axis] = lo, hi
            y = model.decode_block(z, z_grid, inter.sub_grid(start, stop), skip=(x, grid))[0, 0]
            f0, f1 = a * F, min(b * F, target.shape[axis])
            index = [slice(0, s) for s in target.shape]
            index[axis] = slice(f0 - lo * F, f1 - lo * F)
            dest = [slice(None)] * 3
            dest[axis] = slice(f0, f1)
            out[tuple(dest)] = y[tuple(index)].float().cpu().numpy()
    check_cancel(cancel)
    report(progress, 1.0, "done")
    meta = {"normalization": norm.to_dict(), "slab_axis": axis, "slab_thickness": thick, "device": str(dev)}
    return Volume(norm.inverse(out), target.affine, modality=norm.modality, meta=meta)
