"""Reconstruct / resample a volume onto any output grid with a MedIL autoencoder.

The input is encoded on its native grid in latent tiles and decoded onto the output grid in
intermediate-grid tiles, both by the tiling engine (:mod:`.tiling`), so the working memory
follows the memory limit, not the volume, and the tiles join exactly.

Memory: the limit covers what the call holds for its whole duration (the normalised input, its
latent and the output volume: the *resident* part) plus the largest tile's working memory, as
the network's memory model estimates it. An output that would take more than
:data:`SPILL_FRACTION` of the limit is *spilled*: written tile by tile into a memory-mapped
temporary file whose pages leave RAM as soon as they are written, so nothing that fits on disk
is refused. ``Testing/test_tiling.py`` measures the peak RSS of a subprocess against the limit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import MedILError
from ..geometry import Grid, Volume, canonical_order, overlap_fraction
from ..intensity import background_value, fit_normalizer, physical_floor
from ..limits import DEFAULT_MAX_MEMORY_GB, GB  # noqa: F401 (DEFAULT_MAX_MEMORY_GB: the public default)
from ..nn.autoencoder import MedILAutoencoder
from .memory import RUNTIME_OVERHEAD_BYTES, SPILL_FRACTION, MemoryPlan  # noqa: F401 (the shared plan's constants, re-exported)
from .runtime import Progress, autocast, check_cancel, report, resolve_device, resolve_precision
from .tiling import DecodePlan, EncodePlan, OutputArray, decode_tiled, encode_tiled

#: an output grid with less of itself inside the input than this is refused (it would be background)
MIN_OVERLAP = 0.01
#: below this, the output is written with a warning that says how much of it is background
WARN_OVERLAP = 0.1


def check_overlap(input_grid: Grid, target: Grid) -> float:
    """The fraction of the output grid inside the input's extent. Refuses an output grid that (almost)
    misses the input (under :data:`MIN_OVERLAP`: every voxel would be background); warns, saying how
    much overlaps, under :data:`WARN_OVERLAP`."""
    in_lo, in_hi = input_grid.extent()
    out_lo, out_hi = target.extent()
    box = ", ".join(f"{a:.1f}..{b:.1f}" for a, b in zip(in_lo, in_hi))
    fraction = 0.0 if (np.any(out_hi <= in_lo) or np.any(out_lo >= in_hi)) else overlap_fraction(input_grid, target)
    if fraction < MIN_OVERLAP:
        disjoint = np.any(out_hi <= in_lo) or np.any(out_lo >= in_hi)
        what = (
            "does not overlap the input"
            if disjoint
            else (f"overlaps the input by only {100 * fraction:.2g} %" if fraction >= 1e-3 else "overlaps the input by less than 0.1 %")
        )
        raise MedILError(
            f"the output grid {what} (the input covers {box} mm in world RAS; at least {100 * MIN_OVERLAP:g} % must): "
            "choose a field of view or reference grid that covers the input",
            options=("fov", "like"),
        )
    if fraction < WARN_OVERLAP:
        logging.getLogger("medil").warning(
            "only %.0f %% of the output grid lies inside the input (the input covers %s mm); the rest is background", 100 * fraction, box
        )
    return fraction


def held_by_reconstruction(model: MedILAutoencoder, input_grid: Grid, input_copy_bytes: int = 0) -> dict[str, float]:
    """What a reconstruction holds besides its output: the normalised input, its raw latent, a re-ordered input copy."""
    z_grid = model.latent_grid(input_grid)
    held = {"input": 4.0 * input_grid.num_voxels, "latent": 4.0 * model.encoder_lte.out_channels * z_grid.num_voxels}
    if input_copy_bytes:
        held["input copy"] = float(input_copy_bytes)
    return held


@dataclass
class ReconstructionPlan:
    """Everything decided before any work: the shared memory plan, tiles on both sides, the estimated peak."""

    memory: MemoryPlan
    encode: EncodePlan
    decode: DecodePlan
    dtype: torch.dtype

    @property
    def spill(self) -> bool:
        return self.memory.spill

    @property
    def resident_bytes(self) -> float:
        return self.memory.resident_bytes

    @property
    def budget_bytes(self) -> float:
        return self.memory.budget_bytes

    @property
    def peak_bytes(self) -> float:
        return self.resident_bytes + max(self.encode.tiles.peak_bytes, self.decode.tiles.peak_bytes)

    def summary(self) -> dict:
        return {
            "encode": len(self.encode.tiles),
            "decode": len(self.decode.tiles),
            "output_on_disk": self.spill,
            "estimated_peak_gb": round(self.peak_bytes / GB, 3),
            "limit_gb": round(self.budget_bytes / GB, 3),
        }


def plan_reconstruction(
    model: MedILAutoencoder,
    input_grid: Grid,
    target: Grid,
    *,
    max_memory_gb: float | None = None,
    device: torch.device | str = "cpu",
    precision: str = "auto",
    input_copy_bytes: int = 0,
) -> ReconstructionPlan:
    """Plan a reconstruction of an input on ``input_grid`` (in canonical axis order) onto ``target``; refuses before any work."""
    dev = resolve_device(device) if isinstance(device, str) else device
    dtype = resolve_precision(precision, dev)
    dtype_bytes = 2 if dtype != torch.float32 else 4
    memory = MemoryPlan.start(max_memory_gb, target.num_voxels)
    for name, nbytes in held_by_reconstruction(model, input_grid, input_copy_bytes).items():
        memory.hold(name, nbytes)
    work = memory.working_bytes("the input and its latent alone")
    z_grid = model.latent_grid(input_grid)
    enc = EncodePlan(model, input_grid.shape, input_grid, z_grid, work, dtype_bytes)
    dec = DecodePlan(model, z_grid, target, work, dtype_bytes)
    memory.tiles = {"encode": len(enc.tiles), "decode": len(dec.tiles)}
    return ReconstructionPlan(memory, enc, dec, dtype)


def reconstruct(
    volume: Volume,
    target: Grid,
    model: MedILAutoencoder,
    *,
    device: str | torch.device = "auto",
    progress: Progress | None = None,
    cancel: Any = None,
    max_memory_gb: float | None = None,
    modality: str | None = None,
    precision: str = "auto",
    background: float | None = None,
) -> Volume:
    """Encode ``volume`` on its native grid (axes re-indexed closest to RAS) and decode it onto ``target``.

    ``modality`` (``mri``/``ct``/``auto``) overrides ``volume.modality``. ``max_memory_gb``
    bounds the call's peak memory (default 3 GB); the tiles are planned, and a job that cannot
    fit is refused, before any work. ``precision``: ``auto`` (bfloat16 convolutions on CUDA and
    on CPUs with native bf16, else float32), ``float32`` or ``bfloat16``.
    Returns a float32 :class:`Volume` on ``target``, in the input's intensity units (its array is
    a memory map of a temporary file when the output was spilled to disk). Output voxels outside the
    input's extent hold ``background`` (default: 0 for MR, -1024 HU for CT), not the input's edge
    values smeared outwards.
    """
    target = Grid(target.shape, target.affine).validate("the output grid")
    volume.grid.validate("the input")
    overlap = check_overlap(volume.grid, target)
    dev = resolve_device(device)
    reordered = canonical_order(volume)  # the network sees the same array however the file was stored
    copy_bytes = reordered.array.nbytes if reordered is not volume else 0
    volume = reordered
    grid = volume.grid
    norm = fit_normalizer(volume.array, modality or volume.modality)
    plan = plan_reconstruction(
        model, grid, target, max_memory_gb=max_memory_gb, device=dev, precision=precision, input_copy_bytes=copy_bytes
    )

    model = model.to(dev).eval()
    if dev.type == "cpu":
        model = model.to(memory_format=torch.channels_last_3d)
    check_cancel(cancel)
    report(progress, 0.0, "encoding")
    # share the progress bar by the expected work: per input voxel, per latent voxel (the encoder's LTE)
    # and per output voxel, weighted as benchmarks/profile_reconstruct.py measured them
    enc_work = 0.2 * grid.num_voxels + 2.5 * plan.encode.z_grid.num_voxels
    enc_share = min(0.9, max(0.05, enc_work / (enc_work + 0.45 * target.num_voxels)))
    scale, offset = np.float32(norm.scale), np.float32(norm.offset)
    floor = physical_floor(volume.array, norm.modality)
    floor = np.float32(-np.inf if floor is None else floor)
    # back to the input's units, no lower than physics allows (an MR magnitude is never negative), per tile
    fill = background_value(norm.modality, background)
    output = OutputArray(
        target.shape,
        spill=plan.spill,
        transform=lambda a: np.maximum(a * scale + offset, floor),
        outside=(grid, target, fill),
    )
    with torch.inference_mode(), autocast(dev, plan.dtype):
        x = torch.from_numpy(norm.forward(volume.array)).to(dev)[None, None]
        raw = encode_tiled(model, x, grid, plan.encode.z_grid, plan=plan.encode, progress=progress, cancel=cancel, span=(0.0, enc_share))
        z = model.split_latent(raw)[0]
        del raw
        decode_tiled(
            model,
            z,
            plan.encode.z_grid,
            target,
            skip=(x, grid) if model.config.global_skip else None,
            plan=plan.decode,
            out=output,
            progress=progress,
            cancel=cancel,
            span=(enc_share, 1.0),
        )
        del z, x
    check_cancel(cancel)
    if not output.finite:
        raise MedILError(
            "the reconstruction is not finite (the network overflowed); use float32 precision and check the input's intensities",
            options=("precision",),
        )
    report(progress, 1.0, "done")
    meta = {
        "normalization": norm.to_dict(),
        "device": str(dev),
        "precision": str(plan.dtype).replace("torch.", ""),
        "tiles": plan.summary(),
        "memory": plan.memory.summary(),
        "output_on_disk": plan.spill,
        "overlap_fraction": round(overlap, 4),
        "background": fill,
    }
    return Volume(output.array, target.affine, modality=norm.modality, meta=meta)
