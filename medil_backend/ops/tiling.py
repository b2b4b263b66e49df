"""One tiling engine: encode and decode any volume in bounded memory, exactly.

A network is run on boxes of a grid (the *tiled grid*) that each fit a memory budget. Each box
is computed with a halo that covers the network's receptive field, and only its core is kept,
so the tiled result equals the whole-volume result (voxel-local norms only; see
:mod:`medil_backend.nn.backbone`).

- :func:`plan_tiles` splits a grid into the fewest boxes whose working memory, as the network's
  own memory model estimates it, fits the budget;
- :func:`run_tiles` computes the boxes one by one (cancel, progress with ETA, optional
  activation checkpointing) and writes each core into a destination: a numpy array (no
  gradients, e.g. the output volume) or a torch tensor (with gradients, e.g. a latent
  optimised through the decoder);
- :func:`encode_tiled` and :func:`decode_tiled` wire a MedIL autoencoder to the engine. The
  encoder is tiled over the *latent* grid (each latent box reads an input crop grown by the
  encoder's receptive radius, aligned to its stride); the decoder over the *intermediate* grid
  (the output grid coarsened by the decoder's factor). Decoding needs no input volume when the
  network has no global skip (sampling decodes a latent drawn from a diffusion model).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import MedILError
from ..geometry import Grid, inside_mask, lookup_box
from ..limits import GB
from .runtime import Progress, bound_allocator, check_cancel, format_seconds, release_free_memory, report

Box = tuple[tuple[int, int, int], tuple[int, int, int]]


@dataclass(frozen=True)
class TilePlan:
    """Boxes [lo, hi) covering a grid of ``shape``; each is computed on itself grown by ``halo`` (clipped)."""

    shape: tuple[int, int, int]
    splits: tuple[int, int, int]
    halo: int
    cores: tuple[Box, ...]
    peak_bytes: float  # the memory model's estimate for the largest box

    def __len__(self) -> int:
        return len(self.cores)

    def grown(self, core: Box) -> Box:
        lo, hi = core
        return (
            tuple(max(0, a - self.halo) for a in lo),
            tuple(min(n, b + self.halo) for b, n in zip(hi, self.shape)),
        )


def _edges(n: int, s: int) -> list[tuple[int, int]]:
    step = -(-n // s)
    return [(a, min(a + step, n)) for a in range(0, n, step)]


def _cores(shape: Sequence[int], splits: Sequence[int], picks: Sequence[Sequence[int]] | None = None) -> list[Box]:
    """The boxes of a split grid (or only those at the ``picks`` indices along each axis)."""
    edges = [_edges(n, s) for n, s in zip(shape, splits)]
    if picks is not None:
        edges = [[e[i] for i in sorted(set(p)) if i < len(e)] for e, p in zip(edges, picks)]
    return [tuple(zip(*combo)) for combo in itertools.product(*edges)]  # type: ignore[misc]


def _representatives(shape: Sequence[int], splits: Sequence[int]) -> list[Box]:
    """The first, second, middle and last box along each axis: the largest grown boxes are among them."""
    return _cores(shape, splits, [(0, 1, s // 2, s - 1) for s in splits])


#: refuse a plan whose halos would make the tiles compute more than this many times the grid's voxels
MAX_RECOMPUTE = 8.0


def recompute_factor(shape: Sequence[int], splits: Sequence[int], halo: int) -> float:
    """Voxels computed by all grown boxes over the grid's voxels (1 = no overlap)."""
    f = 1.0
    for n, s in zip(shape, splits):
        f *= sum(min(n, b + halo) - max(0, a - halo) for a, b in _edges(n, s)) / n
    return f


def plan_tiles(
    shape: Sequence[int],
    halo: int,
    box_bytes: Callable[[Box], float],
    budget_bytes: float,
    what: str,
    min_splits: Sequence[int] = (1, 1, 1),
) -> TilePlan:
    """The fewest boxes (split the longest side first) whose grown box costs at most ``budget_bytes``.

    ``box_bytes`` is the network's memory model for computing one grown box. Raises
    :class:`MedILError` only when a box of a single voxel does not fit. ``min_splits`` forces at
    least that many boxes per axis (tests use it to compare tiled with whole results).
    """
    shape = tuple(int(n) for n in shape)
    splits = [max(1, min(int(m), n)) for m, n in zip(min_splits, shape)]
    while True:
        plan = TilePlan(shape, tuple(splits), halo, (), 0.0)
        peak = max(box_bytes(plan.grown(c)) for c in _representatives(shape, splits))
        if peak <= budget_bytes:
            return TilePlan(shape, tuple(splits), halo, tuple(_cores(shape, splits)), peak)
        if recompute_factor(shape, splits, halo) > MAX_RECOMPUTE:
            raise MedILError(
                f"{what} does not fit the {max(budget_bytes, 0) / GB:.2f} GB left under the memory limit without tiles so small "
                f"that their overlaps would compute the volume more than {MAX_RECOMPUTE:g} times over: raise the memory limit",
                options=("max_memory",),
            )
        sizes = [-(-n // s) for n, s in zip(shape, splits)]
        axis = int(np.argmax(sizes))
        if sizes[axis] <= 1:
            raise MedILError(
                f"{what} needs about {peak / GB:.2f} GB of working memory for its smallest tile, more than the "
                f"{max(budget_bytes, 0) / GB:.2f} GB left under the memory limit: raise the memory limit",
                options=("max_memory",),
            )
        # the next split count that makes the box smaller along that axis
        s = splits[axis]
        while -(-shape[axis] // s) == sizes[axis]:
            s += 1
        splits[axis] = s


def check_disk_space(nbytes: float, folder: str | None = None) -> None:
    """Refuse (before any work) an output to be spilled that does not fit on the temporary folder's disk."""
    import shutil
    import tempfile

    folder = folder or tempfile.gettempdir()
    free = shutil.disk_usage(folder).free
    if free < nbytes * 1.05:
        raise MedILError(
            f"the output ({nbytes / GB:.1f} GB) is larger than the memory limit and does not fit on disk in {folder} "
            f"({free / GB:.1f} GB free): free disk space there (or point TMPDIR elsewhere), raise the memory limit, "
            "or choose a coarser spacing or a smaller field of view",
            options=("max_memory", "spacing", "fov"),
        )


class OutputArray:
    """A float32 output volume, in RAM or *spilled* to an unlinked temporary file (a memory map).

    A spilled array releases each written tile from RAM (flushed, then dropped with
    ``MADV_DONTNEED``), so an output larger than the memory limit is written with a few tiles'
    worth of RAM; the file disappears when the array does. ``transform`` (e.g. back to the
    input's intensity units) is applied to each tile as it is written, so there is no second
    pass over the output; :attr:`finite` says whether every written value was finite.
    """

    def __init__(
        self, shape: Sequence[int], spill: bool = False, folder: str | None = None, transform=None, outside: tuple | None = None
    ) -> None:
        import tempfile

        self.spill = spill
        self.transform = transform
        self.outside = outside  # (input grid, output grid, background value): voxels outside the input get the background
        self.finite = True
        if spill:  # free disk space is checked when the job is planned (check_disk_space)
            self._file = tempfile.TemporaryFile(dir=folder, prefix="medil-output-")
            self.array = np.memmap(self._file, dtype=np.float32, mode="w+", shape=tuple(shape))
        else:
            self.array = np.empty(tuple(shape), dtype=np.float32)

    def __call__(self, index: tuple[slice, ...], value: torch.Tensor) -> None:
        values = value.detach().float().cpu().numpy()
        if self.transform is not None:
            values = self.transform(values)
        if self.outside is not None:
            source, grid, value = self.outside
            values = np.where(inside_mask(source, grid, index), values, np.float32(value))
        self.finite = self.finite and bool(np.isfinite(values).all())
        self.array[index] = values
        if self.spill:
            self.release()

    def release(self) -> None:
        """Write the map's dirty pages to the file and drop them from this process's memory."""
        import mmap

        if self.spill:
            self.array.flush()
            self.array._mmap.madvise(mmap.MADV_DONTNEED)


def fill_outside(array: np.ndarray, source: Grid, grid: Grid, value: float, slab_voxels: int = 1 << 22) -> np.ndarray:
    """Set, in place, every voxel of ``array`` (on ``grid``) outside ``source``'s extent to ``value``,
    slab by slab (bounded memory, as the tiles of :class:`OutputArray` do it)."""
    step = max(1, slab_voxels // max(1, int(np.prod(grid.shape[1:]))))
    for start in range(0, grid.shape[0], step):
        index = (slice(start, min(start + step, grid.shape[0])), slice(0, grid.shape[1]), slice(0, grid.shape[2]))
        block = array[index]
        block[~inside_mask(source, grid, index)] = value
    return array


class TensorDestination:
    """Writes tile cores into a torch tensor (B, C, ...), keeping the autograd graph."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def __call__(self, index: tuple[slice, ...], value: torch.Tensor) -> None:
        self.tensor[(slice(None), slice(None), *index)] = value


def run_tiles(
    plan: TilePlan,
    compute: Callable[[Box], torch.Tensor],
    write: Callable[[tuple[slice, ...], torch.Tensor], None],
    *,
    scale: int = 1,
    out_shape: Sequence[int] | None = None,
    progress: Progress | None = None,
    cancel: Any = None,
    checkpoint: bool = False,
    label: str = "tile",
    span: tuple[float, float] = (0.0, 1.0),
    box_cost: Callable[[Box], float] | None = None,
) -> None:
    """Compute every box of ``plan`` and write its core.

    ``compute(box)`` returns (B, C, *(box size * scale)) for the grown box; the core's part of it
    is written at ``core * scale`` (cropped to ``out_shape``). Progress runs over ``span``,
    weighted by ``box_cost`` (default: the grown box's voxels), with an ETA in the message.
    """
    bound_allocator()
    out_shape = tuple(out_shape or (n * scale for n in plan.shape))
    cost = box_cost or (lambda box: float(np.prod(np.subtract(box[1], box[0]))))
    costs = [cost(plan.grown(c)) for c in plan.cores]
    total = sum(costs) or 1.0
    done = 0.0
    t0 = time.perf_counter()
    n = len(plan.cores)
    for i, (core, c) in enumerate(zip(plan.cores, costs)):
        check_cancel(cancel)
        frac = done / total
        eta = ""
        if done > 0:
            eta = f", about {format_seconds((time.perf_counter() - t0) * (total - done) / done)} left"
        report(progress, span[0] + (span[1] - span[0]) * frac, f"{label} {i + 1}/{n}{eta}")
        box = plan.grown(core)
        if checkpoint and torch.is_grad_enabled():
            y = torch.utils.checkpoint.checkpoint(compute, box, use_reentrant=False)
        else:
            y = compute(box)
        src, dst = [], []
        for a in range(3):
            f0 = core[0][a] * scale
            f1 = min(core[1][a] * scale, out_shape[a])
            off = box[0][a] * scale
            src.append(slice(f0 - off, f1 - off))
            dst.append(slice(f0, f1))
        write(tuple(dst), y[(slice(None), slice(None), *src)])
        del y
        if not torch.is_grad_enabled():
            release_free_memory()
        done += c
    report(progress, span[1], f"{label} {n}/{n} done")


# -- MedIL autoencoders on the engine ------------------------------------------------------------------


def _voxels(box: Box) -> float:
    return float(np.prod(np.subtract(box[1], box[0])))


#: latent voxels per encoding tile at most, so that progress moves while encoding (the LTE, most of
#: the encoding time, is not repeated between tiles; only the backbone's halo is)
ENCODE_TILE_LATENT_VOXELS = 1 << 19


class EncodePlan:
    """How an input is encoded: boxes of the latent grid, each reading an input crop grown by the encoder's receptive radius."""

    def __init__(self, model, x_shape: Sequence[int], x_grid: Grid, z_grid: Grid, budget_bytes: float, dtype_bytes: int, min_splits=None):
        self.model, self.x_shape, self.x_grid, self.z_grid = model, tuple(x_shape), x_grid, z_grid
        F = model.factor
        self.f_grid = model.feature_grid(x_grid, [-(-n // F) for n in self.x_shape])
        if not model.encoder.tileable:
            need = model.encode_tile_bytes(
                float(np.prod(self.x_shape)), float(self.f_grid.num_voxels), float(z_grid.num_voxels), dtype_bytes
            )
            if need > budget_bytes:
                raise MedILError(
                    f"this model's encoder (instance norm) sees the whole input at once and needs about {need / GB:.1f} GB, "
                    f"more than the {budget_bytes / GB:.1f} GB left under the memory limit: raise the memory limit or crop the input",
                    options=("max_memory",),
                )
            self.tiles = TilePlan(tuple(z_grid.shape), (1, 1, 1), 0, (((0, 0, 0), tuple(z_grid.shape)),), need)
        else:

            def box_bytes(box: Box) -> float:
                fbox, ibox = self.crop(box)
                return model.encode_tile_bytes(_voxels(ibox), _voxels(fbox), _voxels(box), dtype_bytes)

            if min_splits is None:  # the same planner, with a voxel count as the cost
                min_splits = plan_tiles(z_grid.shape, 0, _voxels, ENCODE_TILE_LATENT_VOXELS, "encoding progress").splits
            self.tiles = plan_tiles(z_grid.shape, 0, box_bytes, budget_bytes, "encoding the input", min_splits)

    def crop(self, box: Box) -> tuple[Box, Box]:
        """(feature box, input box) that the latent ``box`` reads; the input box starts on the encoder's stride."""
        _, grown = lookup_box([self.f_grid], [self.z_grid.sub_grid(*box)])
        fbox = (tuple(int(v) for v in grown[0]), tuple(int(v) for v in grown[1]))
        F, R = self.model.factor, self.model.encoder_halo(float(min(self.x_grid.spacing)))
        lo = tuple(max(0, a * F - R) // F * F for a in fbox[0])
        hi = tuple(min(n, (b - 1) * F + 1 + R) for b, n in zip(fbox[1], self.x_shape))
        return fbox, (lo, hi)  # type: ignore[return-value]

    def input_voxels(self, box: Box) -> float:
        return _voxels(self.crop(box)[1])


class DecodePlan:
    """How a latent is decoded onto a grid: boxes of the intermediate grid (the output grid coarsened by the decoder's factor)."""

    def __init__(self, model, z_grid: Grid, out_grid: Grid, budget_bytes: float, dtype_bytes: int, min_splits=(1, 1, 1)):
        self.model, self.z_grid, self.out_grid = model, z_grid, out_grid
        self.inter = out_grid.coarsened(model.factor)

        def box_bytes(box: Box) -> float:
            _, grown = lookup_box([z_grid], [self.inter.sub_grid(*box)])
            return model.decode_tile_bytes(_voxels(box) * model.factor**3, float(np.prod(grown[1] - grown[0])), dtype_bytes)

        self.tiles = plan_tiles(
            self.inter.shape, model.decoder_halo(), box_bytes, budget_bytes, f"decoding onto the output grid {out_grid.shape}", min_splits
        )


def encode_tiled(
    model,
    x: torch.Tensor,
    x_grid: Grid,
    z_grid: Grid,
    *,
    budget_bytes: float = float("inf"),
    dtype_bytes: int = 4,
    plan: EncodePlan | None = None,
    progress: Progress | None = None,
    cancel: Any = None,
    checkpoint: bool = False,
    span: tuple[float, float] = (0.0, 1.0),
    min_splits: Sequence[int] | None = None,
) -> torch.Tensor:
    """The encoder's raw output on ``z_grid`` for the input ``x`` (B, C, *x_grid.shape), computed in latent tiles.

    Equal to ``model.encode_block(x, x_grid, z_grid)`` (voxel-local encoders; an instance-norm
    encoder runs on the whole input, when it fits). With gradients enabled the result keeps the
    graph; ``checkpoint`` recomputes each tile's activations in the backward pass. ``plan``
    (from :class:`EncodePlan`) is made from ``budget_bytes`` when not given.
    """
    plan = plan or EncodePlan(model, x.shape[2:], x_grid, z_grid, budget_bytes, dtype_bytes, min_splits)
    single = len(plan.tiles) == 1

    def compute(box: Box) -> torch.Tensor:
        if single:
            return model.encode_block(x, x_grid, z_grid.sub_grid(*box))
        _, (ilo, ihi) = plan.crop(box)
        crop = x[:, :, ilo[0] : ihi[0], ilo[1] : ihi[1], ilo[2] : ihi[2]]
        return model.encode_block(crop, x_grid.sub_grid(ilo, ihi), z_grid.sub_grid(*box))

    out = torch.zeros((x.shape[0], model.encoder_lte.out_channels, *z_grid.shape), dtype=torch.float32, device=x.device)
    run_tiles(
        plan.tiles,
        compute,
        TensorDestination(out),
        progress=progress,
        cancel=cancel,
        checkpoint=checkpoint,
        label="encoding tile",
        span=span,
        box_cost=plan.input_voxels,
    )
    return out


def decode_tiled(
    model,
    z: torch.Tensor,
    z_grid: Grid,
    out_grid: Grid,
    *,
    skip: tuple[torch.Tensor, Grid] | None = None,
    budget_bytes: float = float("inf"),
    plan: DecodePlan | None = None,
    out: OutputArray | None = None,
    progress: Progress | None = None,
    cancel: Any = None,
    checkpoint: bool = False,
    span: tuple[float, float] = (0.0, 1.0),
) -> torch.Tensor | np.ndarray:
    """Decode ``z`` (B, C, *z_grid.shape) onto ``out_grid`` in tiles of the intermediate grid: ``plan``'s, or a
    float32 :class:`DecodePlan` within ``budget_bytes`` (build one for other precisions or forced splits).

    Equal to ``model.decode(z, z_grid, out_grid, skip)``. Without gradients the result goes
    into ``out`` (an :class:`OutputArray`, in RAM when not given) and its numpy array is returned; with gradients a
    (B, C, *out_grid.shape) tensor that keeps the graph is returned (``checkpoint`` keeps only
    one tile's activations alive). ``skip`` is (input, input grid) for networks with a global
    skip, ``None`` otherwise (sampling decodes a latent that no input produced).
    """
    if model.config.global_skip and skip is None:
        raise ValueError("this model has a global skip: pass skip=(input, input_grid)")
    plan = plan or DecodePlan(model, z_grid, out_grid, budget_bytes, 4)
    inter = plan.inter

    def compute(box: Box) -> torch.Tensor:
        return model.decode_block(z, z_grid, inter.sub_grid(*box), skip=skip)

    kwargs = dict(
        scale=model.factor,
        out_shape=out_grid.shape,
        progress=progress,
        cancel=cancel,
        checkpoint=checkpoint,
        label="decoding tile",
        span=span,
    )
    if torch.is_grad_enabled():
        result = torch.zeros((z.shape[0], model.config.out_channels, *out_grid.shape), dtype=torch.float32, device=z.device)
        run_tiles(plan.tiles, compute, TensorDestination(result), **kwargs)
        return result
    if z.shape[0] != 1 or model.config.out_channels != 1:
        raise ValueError("decoding into an array takes one latent and a one-channel network")
    out = out if out is not None else OutputArray(out_grid.shape)
    run_tiles(plan.tiles, compute, lambda index, value: out(index, value[0, 0]), **kwargs)
    return out.array


__all__ = [
    "DecodePlan",
    "EncodePlan",
    "OutputArray",
    "TensorDestination",
    "TilePlan",
    "decode_tiled",
    "encode_tiled",
    "fill_outside",
    "plan_tiles",
    "run_tiles",
]
