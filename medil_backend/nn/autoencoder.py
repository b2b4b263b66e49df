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
- ``latent_base`` (a coarse latent plus a detail decoder): latent channel 0 carries the cubic
  B-spline coefficients of the input's box averages over the latent cells (plus what the encoder
  adds to them), and the decoder's output is added to that channel's cubic B-spline evaluated on
  the output grid. A fresh network so decodes the head as B-spline interpolation of its box
  averages at the latent's spacing (1 channel at 2.52 mm holds 16 times fewer numbers than 1 mm,
  and decodes a smooth head at about 32 dB), and training spends itself on the detail. Other
  channels stay free; generative models use it (the compact latent of the diffusion model).

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
from torch.profiler import record_function

from ..geometry import Grid, exscribed_grid, lookup_box, query_cell, voxel_coords
from .backbone import Decoder, Encoder
from .lte import LTE3d
from .resample import PREFILTER_HALF, bspline_on_grids, bspline_prefilter, sample_on_grids


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
    latent_base: bool = False
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"], d["factors"] = list(self.channels), list(self.factors)
        if not d["latent_base"]:  # added later: a model without it keeps the card, and the latent sha256, it had
            del d["latent_base"]
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


def lte_resample(lte: LTE3d, features: torch.Tensor, f_grids: Sequence[Grid], q_grids: Sequence[Grid]) -> torch.Tensor:
    """``lte`` applied to ``features`` (on ``f_grids``) at every voxel of ``q_grids``: (B, out, *q_grids[0].shape).

    Only the part of the features that the queries read is prepared (cropped exactly, see
    :func:`~medil_backend.geometry.lookup_box`), so memory follows the query grid, not the features.
    """
    B = features.shape[0]
    (lo, hi), (mlo, mhi) = lookup_box(f_grids, q_grids)
    sub = [g.sub_grid(lo, hi) for g in f_grids]
    region = features[:, :, mlo[0] : mhi[0], mlo[1] : mhi[1], mlo[2] : mhi[2]]
    a, b = lo - mlo, hi - mlo
    prepared = lte.prepare(region)[:, :, a[0] : b[0], a[1] : b[1], a[2] : b[2]]
    q = voxel_coords(sub, q_grids, features.device)
    cell = torch.as_tensor(query_cell(sub, q_grids), dtype=torch.float32, device=features.device)
    return lte.query(prepared, q, cell).reshape(B, -1, *q_grids[0].shape)


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
        if c.latent_base:  # start as the base: the decoder's detail and the encoder's change to channel 0 start at zero
            with torch.no_grad():
                self.decoder.head.weight.zero_()
                self.decoder.head.bias.zero_()
                self.encoder_lte.skip.weight[0].zero_()
                self.encoder_lte.skip.bias[0].zero_()

    def latent_sha256(self) -> str:
        """sha256 of what defines the latent space: the config and the encoder side's weights (encoder
        and encoder LTE). Decoder-only fine-tuning (stage 3) keeps it, and with it every latent diffusion
        model trained on this autoencoder's latents."""
        import hashlib

        h = hashlib.sha256(self.config.to_json().encode())
        for name, t in sorted(self.state_dict().items()):
            if name.startswith(("encoder.", "encoder_lte.")):
                t = t.detach().cpu().contiguous()
                h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
                h.update(t.to(torch.float32).numpy().tobytes())
        return h.hexdigest()

    # -- geometry ---------------------------------------------------------------------------------
    def latent_grid(self, input_grid: Grid, direction: np.ndarray | None = None) -> Grid:
        """The latent grid C_Z for an input: latent spacing, enclosing the input with a margin."""
        sp = self.config.latent_spacing
        margin = sp if self.config.latent_margin_mm is None else self.config.latent_margin_mm
        return exscribed_grid(input_grid, sp, direction, margin_mm=margin)

    def feature_grid(self, input_grid: Grid, shape: Sequence[int]) -> Grid:
        """Grid of the encoder backbone's output (strided convs keep voxel 0's centre)."""
        return input_grid.strided(self.factor, shape)

    def decoder_halo(self) -> int:
        """Intermediate voxels each side that a decoding tile needs to match whole-volume decoding."""
        return math.ceil(self.decoder.receptive_radius() / self.factor) + 1

    def encoder_halo(self, input_spacing: float = 1.0) -> int:
        """Input voxels (of ``input_spacing`` mm) each side that an encoding tile needs to match whole-volume encoding.

        The latent base reads the box averages of the latent cells within the B-spline prefilter's reach
        (:data:`~medil_backend.nn.resample.PREFILTER_HALF` cells) of each latent voxel, one input voxel more."""
        r = self.encoder.receptive_radius()
        if self.config.latent_base:
            r = max(r, math.ceil((PREFILTER_HALF + 1) * self.config.latent_spacing / input_spacing) + 2)
        return r

    #: sample points per axis of a latent cell in the base's box average
    BASE_POINTS = 4

    def latent_base(self, x: torch.Tensor, x_grids: Sequence[Grid], z_grids: Sequence[Grid]) -> torch.Tensor:
        """The input's average over each latent voxel's cell (a box of the latent spacing), (B, in, *z_grids[0].shape):
        the mean of trilinear samples at ``BASE_POINTS``^3 points spread evenly inside the cell."""
        k = self.BASE_POINTS
        offsets = (np.arange(k) + 0.5) / k - 0.5
        total = None
        for o in [(a, b, c) for a in offsets for b in offsets for c in offsets]:
            moved = [g.shifted(np.array(o)) for g in z_grids]
            s = sample_on_grids(x, x_grids, moved)
            total = s if total is None else total + s
        return total / k**3

    def base_coefficients(self, x: torch.Tensor, x_grids: Sequence[Grid], z_grids: Sequence[Grid]) -> torch.Tensor:
        """The cubic B-spline coefficients of the input's box averages on ``z_grids``: the averages on the grid grown by
        the prefilter's reach, then the prefilter (so a tile's base equals the whole volume's)."""
        P = PREFILTER_HALF
        grown = [g.sub_grid((-P, -P, -P), tuple(n + P for n in g.shape)) for g in z_grids]
        return bspline_prefilter(self.latent_base(x, x_grids, grown))

    def base_on(self, z: torch.Tensor, z_grids: Sequence[Grid], grids: Sequence[Grid]) -> torch.Tensor:
        """Latent channel 0 as a cubic B-spline on ``grids``: the coarse head the decoder adds its detail to."""
        return bspline_on_grids(z[:, :1], z_grids, grids)

    # -- memory model (bytes), used by the tiling engine ------------------------------------------
    def lte_query_bytes(self, lte: LTE3d, queries: float) -> float:
        """Working bytes of one LTE query chunk: 8 corners x (prepared row + INR activations + float64 geometry), float32."""
        width = lte.prepared_channels + 4 * max(self.config.inr_width, 2 * self.config.lte_frequencies) + 16
        return 8.0 * min(float(lte.chunk), queries) * 4 * width * 1.5

    def encode_tile_bytes(self, input_voxels: float, feature_voxels: float, latent_voxels: float, dtype_bytes: int = 4) -> float:
        """Peak working bytes of one encoding tile. The backbone runs first, then the LTE on its
        features (the backbone's activations are gone by then), so the peak is the larger phase."""
        lte = self.encoder_lte
        backbone = input_voxels * self.encoder.bytes_per_input_voxel(dtype_bytes)
        resample = (
            feature_voxels * dtype_bytes * (lte.prepared_channels + self.config.channels[-1])
            + latent_voxels * 4.0 * (lte.out_channels + 3 * 8)  # result + float64 query coordinates
            + self.lte_query_bytes(lte, latent_voxels)
        )
        return max(backbone, resample) + input_voxels * 4.0  # the input crop

    def decode_tile_bytes(self, output_voxels: float, latent_voxels: float, dtype_bytes: int = 4) -> float:
        """Peak working bytes of one decoding tile: the LTE phase (prepared latent region + queries),
        then the decoder phase (its activations, the guide and the skip); only their result is shared."""
        lte = self.decoder_lte
        inter = output_voxels / self.factor**3
        h = inter * dtype_bytes * lte.out_channels
        resample = latent_voxels * dtype_bytes * (lte.prepared_channels + self.config.latent_channels) + inter * 3 * 8.0
        resample += self.lte_query_bytes(lte, inter)
        decoder = output_voxels * self.decoder.bytes_per_output_voxel(dtype_bytes)
        return max(resample, decoder) + h

    # -- encode / decode ---------------------------------------------------------------------------
    def encode(
        self, x: torch.Tensor, x_grid: Grid | Sequence[Grid], z_grid: Grid | Sequence[Grid], sample: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """x (B, C, *x_grid.shape) -> (z, mean, logvar); z is (B, latent, *z_grid.shape)."""
        B = x.shape[0]
        xg, zg = _grids(x_grid, B), _grids(z_grid, B)
        return self.split_latent(self.encode_block(x, xg, zg), sample)

    def split_latent(self, out: torch.Tensor, sample: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The encoder's raw output -> (z, mean, logvar): with ``kl``, z is the mean unless ``sample``."""
        if not self.config.kl:
            return out, None, None
        mean, logvar = out.chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar) if sample else mean
        return z, mean, logvar

    def encode_block(self, x: torch.Tensor, x_grid: Grid | Sequence[Grid], z_grid: Grid | Sequence[Grid]) -> torch.Tensor:
        """The encoder's raw output (mean and log-variance stacked with ``kl``) on ``z_grid`` for the input ``x`` on ``x_grid``.

        ``x`` may be a crop of a larger input (a tile): the result equals the whole input's
        wherever the crop covers the encoder's receptive field (see :mod:`medil_backend.ops.tiling`).
        """
        B = x.shape[0]
        xg, zg = _grids(x_grid, B), _grids(z_grid, B)
        with record_function("medil.encoder"):
            feats = self.encoder(x)
        fg = [self.feature_grid(g, feats.shape[2:]) for g in xg]
        with record_function("medil.encoder_lte"):
            out = lte_resample(self.encoder_lte, feats, fg, zg)
        if not self.config.latent_base:
            return out
        with record_function("medil.latent_base"):
            base = self.base_coefficients(x, xg, zg)
        return torch.cat([out[:, :1] + base[:, :1], out[:, 1:]], dim=1)

    def decode_block(
        self,
        z: torch.Tensor,
        z_grid: Grid | Sequence[Grid],
        inter_grid: Grid | Sequence[Grid],
        skip: tuple[torch.Tensor, Grid | Sequence[Grid]] | None = None,
    ) -> torch.Tensor:
        """Decode onto the fine grid of an intermediate grid: (B, out, *(inter_grid.shape * factor)).

        Only the part of the latent that the queries touch is prepared, and the global skip is
        sampled in chunks, so memory follows the block, not the latent or the input.
        """
        B = z.shape[0]
        zg, ig = _grids(z_grid, B), _grids(inter_grid, B)
        with record_function("medil.decoder_lte"):
            h = lte_resample(self.decoder_lte, z, zg, ig)
        if not self.config.global_skip:
            with record_function("medil.decoder"):
                y = self.decoder(h)
            if not self.config.latent_base:
                return y
            with record_function("medil.latent_base"):
                base = self.base_on(z, zg, [g.refined(self.factor) for g in ig])
            if torch.is_grad_enabled():
                return y + base
            base += y
            return base
        if self.config.latent_base:
            raise ValueError("latent_base and global_skip exclude each other: the decoder adds its detail to one base")
        if skip is None:
            raise ValueError("this model has a global skip: pass skip=(input, input_grid)")
        x, x_grid = skip
        with record_function("medil.global_skip"):
            base = sample_on_grids(x, _grids(x_grid, B), [g.refined(self.factor) for g in ig])
        with record_function("medil.decoder"):
            y = self.decoder(h, base if self.config.guide_decoder else None)
        if torch.is_grad_enabled():
            return y + base
        base += y
        return base

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
