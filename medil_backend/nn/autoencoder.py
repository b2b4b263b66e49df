"""The MedIL autoencoder: conv backbone + 3D LTE on both sides of a world-space latent grid.

- ``encode``: backbone on the input's native grid (no resampling), then an LTE resamples the
  backbone features onto the latent grid C_Z (any spacing and orientation).
- ``decode``: an LTE resamples Z onto the intermediate grid (the output grid coarsened by the
  backbone factor), then the decoder backbone upsamples onto the output grid C_X̂.
- ``global_skip``: the input, trilinearly interpolated onto the output grid, is added to the
  decoder's output, so the network learns only the missing detail (fidelity models).
- ``guide_decoder`` (with ``global_skip``): the decoder's finest level also reads that
  interpolated input, so output-resolution detail (edges of a thick-slice input) reaches the
  output without passing through the latent. Fidelity models use it; it leaves the latent a
  plain MedIL latent (generative models keep it off).
- ``kl``: the encoder predicts a mean and log-variance (a well-behaved latent for diffusion).
- ``interp``: the MedIL-Interp ablation (LTEs replaced by trilinear interpolation).

Grids are :class:`~medil_backend.geometry.Grid` objects (pure geometry, no I/O); a batch may
carry one grid per sample as long as the shapes agree.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
from torch import nn

from ..geometry import Grid, exscribed_grid
from .backbone import Decoder, Encoder
from .lte import LTE3d, trilinear_sample


@dataclass
class MedILConfig:
    in_channels: int = 1
    out_channels: int = 1
    channels: Sequence[int] = (16, 32, 48)
    factors: Sequence[int] = (2, 2)
    n_units: int = 1
    encoder_norm: str = "instance"
    decoder_norm: str = "channel"
    latent_channels: int = 8
    latent_spacing: float = 2.0
    latent_margin_mm: float | None = None  # default: one latent voxel
    lte_frequencies: int = 64
    inr_width: int = 64
    inr_blocks: int = 2
    interp: bool = False
    kl: bool = False
    global_skip: bool = False
    guide_decoder: bool = False
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"], d["factors"] = list(self.channels), list(self.factors)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> MedILConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown MedIL config keys: {sorted(unknown)}")
        d = dict(d)
        for key in ("channels", "factors"):
            if key in d:
                d[key] = tuple(int(v) for v in d[key])
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> MedILConfig:
        return cls.from_dict(json.loads(text))


def _grids(grids: Grid | Sequence[Grid], batch: int) -> list[Grid]:
    grids = [grids] * batch if isinstance(grids, Grid) else list(grids)
    if len(grids) != batch or len({g.shape for g in grids}) != 1:
        raise ValueError("give one grid, or one grid per batch item with equal shapes")
    return grids


def grid_voxel_coords(source: Sequence[Grid], query: Sequence[Grid], device: torch.device) -> torch.Tensor:
    """Continuous voxel coordinates in each ``source`` grid of every voxel of each ``query`` grid: (B, N, 3) float64."""
    shape = query[0].shape
    ijk = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64, device=device) for s in shape], indexing="ij"), dim=-1).reshape(
        -1, 3
    )
    mats = torch.tensor(np.stack([np.linalg.inv(s.affine) @ q.affine for s, q in zip(source, query)]), device=device)
    return ijk.unsqueeze(0) @ mats[:, :3, :3].transpose(1, 2) + mats[:, None, :3, 3]


def query_cell(source: Sequence[Grid], query: Sequence[Grid]) -> torch.Tensor:
    """The query grid's voxel size projected onto each source axis, in source voxels: (B, 3)."""
    cells = []
    for s, q in zip(source, query):
        proj = np.abs(s.direction.T @ q.direction) @ q.spacing
        cells.append(proj / s.spacing)
    return torch.tensor(np.stack(cells), dtype=torch.float32)


def refined(grid: Grid, factor: int) -> Grid:
    """Inverse of :meth:`Grid.coarsened`: the fine grid whose ``factor``^3 blocks are ``grid``'s voxels."""
    aff = grid.affine.copy()
    aff[:3, :3] = grid.affine[:3, :3] / factor
    aff[:3, 3] = grid.affine[:3, 3] - aff[:3, :3] @ np.full(3, (factor - 1) / 2.0)
    return Grid(tuple(s * factor for s in grid.shape), aff)


def latent_crop(source: Sequence[Grid], query: Sequence[Grid]) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The voxel box [lo, hi) of the source grids that trilinear/LTE lookups at the query grids read,
    and the same box grown by one voxel (within the grid) for the 3x3x3 convolutions before the lookup.

    Lookups clamp to the grid (border padding), so the box is clamped too: preparing the grown box
    and keeping [lo, hi) equals preparing the whole grid, voxel for voxel.
    """
    shape = np.asarray(source[0].shape)
    lo, hi = np.full(3, np.iinfo(np.int64).max), np.full(3, np.iinfo(np.int64).min)
    for s, q in zip(source, query):
        vox = s.world_to_voxel(q.voxel_to_world(np.array(list(np.ndindex(2, 2, 2))) * (np.asarray(q.shape) - 1)))
        lo = np.minimum(lo, np.floor(vox.min(0)).astype(np.int64) - 1)
        hi = np.maximum(hi, np.floor(vox.max(0)).astype(np.int64) + 2)
    lo = np.clip(lo, 0, shape - 1)
    hi = np.clip(hi, lo + 1, shape)
    return (lo, hi), (np.maximum(lo - 1, 0), np.minimum(hi + 1, shape))


def sample_on_grids(x: torch.Tensor, x_grids: Sequence[Grid], targets: Sequence[Grid], chunk_voxels: int = 1 << 20) -> torch.Tensor:
    """Trilinear samples of ``x`` (on ``x_grids``) at every voxel of ``targets``: (B, C, *targets[0].shape).

    Coordinates are generated a slab of the target at a time, so memory is bounded by ``chunk_voxels``.
    """
    shape = targets[0].shape
    per_slice = max(1, shape[1] * shape[2])
    step = max(1, chunk_voxels // per_slice)
    parts = []
    for a in range(0, shape[0], step):
        b = min(a + step, shape[0])
        sub = [t.sub_grid((a, 0, 0), (b, shape[1], shape[2])) for t in targets]
        q = grid_voxel_coords(x_grids, sub, x.device)
        parts.append(trilinear_sample(x, q).reshape(x.shape[0], x.shape[1], b - a, shape[1], shape[2]))
    return torch.cat(parts, dim=2)


class MedILAutoencoder(nn.Module):
    def __init__(self, config: MedILConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or MedILConfig()
        c = config
        self.factor = int(np.prod(c.factors)) if len(c.factors) else 1
        self.encoder = Encoder(c.in_channels, c.channels, c.factors, c.n_units, c.encoder_norm)
        z_out = c.latent_channels * (2 if c.kl else 1)
        lte = dict(frequencies=c.lte_frequencies, inr_width=c.inr_width, inr_blocks=c.inr_blocks, interp_only=c.interp)
        self.encoder_lte = LTE3d(c.channels[-1], z_out, **lte)
        self.decoder_lte = LTE3d(c.latent_channels, c.channels[-1], **lte)
        if c.guide_decoder and not c.global_skip:
            raise ValueError("guide_decoder needs global_skip (the guide is the interpolated input)")
        self.decoder = Decoder(c.out_channels, c.channels, c.factors, c.n_units, c.decoder_norm, c.in_channels if c.guide_decoder else 0)
        if c.global_skip and not c.guide_decoder:  # start as exactly trilinear interpolation of the input
            nn.init.zeros_(self.decoder.head.weight)
            nn.init.zeros_(self.decoder.head.bias)
        # A guided decoder keeps the default init: a zero (or small) head starves the layers below
        # it of gradient, and the learned residual collapsed to zero in CPU training runs.

    # -- geometry ---------------------------------------------------------------------------------
    def latent_grid(self, input_grid: Grid, direction: np.ndarray | None = None) -> Grid:
        """The latent grid C_Z for an input: latent spacing, enclosing the input with a margin."""
        sp = self.config.latent_spacing
        margin = sp if self.config.latent_margin_mm is None else self.config.latent_margin_mm
        return exscribed_grid(input_grid, sp, direction, margin_mm=margin)

    def feature_grid(self, input_grid: Grid, shape: Sequence[int]) -> Grid:
        """Grid of the encoder backbone's output (strided convs keep voxel 0's centre)."""
        aff = input_grid.affine.copy()
        aff[:3, :3] *= self.factor
        return Grid(tuple(shape), aff)

    def decoder_halo(self) -> int:
        """Intermediate voxels each side that slab-wise decoding needs to match whole-volume decoding."""
        return math.ceil(self.decoder.receptive_radius() / self.factor) + 1

    # -- encode / decode ---------------------------------------------------------------------------
    def encode(
        self, x: torch.Tensor, x_grid: Grid | Sequence[Grid], z_grid: Grid | Sequence[Grid], sample: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """x (B, C, *x_grid.shape) -> (z, mean, logvar); z is (B, latent, *z_grid.shape)."""
        B = x.shape[0]
        xg, zg = _grids(x_grid, B), _grids(z_grid, B)
        feats = self.encoder(x)
        fg = [self.feature_grid(g, feats.shape[2:]) for g in xg]
        q = grid_voxel_coords(fg, zg, x.device)
        out = self.encoder_lte(feats, q, query_cell(fg, zg).to(x.device)).reshape(B, -1, *zg[0].shape)
        if not self.config.kl:
            return out, None, None
        mean, logvar = out.chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar) if sample else mean
        return z, mean, logvar

    def decode_block(
        self,
        z: torch.Tensor,
        z_grid: Grid | Sequence[Grid],
        inter_grid: Grid | Sequence[Grid],
        skip: tuple[torch.Tensor, Grid | Sequence[Grid]] | None = None,
    ) -> torch.Tensor:
        """Decode onto the fine grid of an intermediate grid: (B, out, *(inter_grid.shape * factor)).

        Only the part of the latent that the queries touch is prepared (cropped exactly, see
        :func:`latent_crop`), and the global skip is sampled in chunks, so memory follows the
        block, not the latent or the input.
        """
        B = z.shape[0]
        zg, ig = _grids(z_grid, B), _grids(inter_grid, B)
        (lo, hi), (mlo, mhi) = latent_crop(zg, ig)
        sub = [g.sub_grid(lo, hi) for g in zg]
        region = z[:, :, mlo[0] : mhi[0], mlo[1] : mhi[1], mlo[2] : mhi[2]]
        prepared = self.decoder_lte.prepare(region)
        a, b = lo - mlo, hi - mlo
        prepared = prepared[:, :, a[0] : b[0], a[1] : b[1], a[2] : b[2]]
        q = grid_voxel_coords(sub, ig, z.device)
        h = self.decoder_lte.query(prepared, q, query_cell(sub, ig).to(z.device)).reshape(B, -1, *ig[0].shape)
        if not self.config.global_skip:
            return self.decoder(h)
        if skip is None:
            raise ValueError("this model has a global skip: pass skip=(input, input_grid)")
        x, x_grid = skip
        base = sample_on_grids(x, _grids(x_grid, B), [refined(g, self.factor) for g in ig])
        return self.decoder(h, base if self.config.guide_decoder else None) + base

    def decode(
        self,
        z: torch.Tensor,
        z_grid: Grid | Sequence[Grid],
        out_grid: Grid | Sequence[Grid],
        skip: tuple[torch.Tensor, Grid | Sequence[Grid]] | None = None,
    ) -> torch.Tensor:
        """Decode onto ``out_grid`` (any shape): (B, out, *out_grid.shape)."""
        og = _grids(out_grid, z.shape[0])
        y = self.decode_block(z, z_grid, [g.coarsened(self.factor) for g in og], skip)
        s = og[0].shape
        return y[..., : s[0], : s[1], : s[2]]

    def forward(self, x: torch.Tensor, x_grid, z_grid, out_grid, sample: bool = False):
        """Encode then decode; returns (x_hat, z, mean, logvar)."""
        z, mean, logvar = self.encode(x, x_grid, z_grid, sample=sample)
        x_hat = self.decode(z, z_grid, out_grid, skip=(x, x_grid))
        return x_hat, z, mean, logvar
