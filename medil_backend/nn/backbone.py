"""Fully convolutional residual backbones of the MedIL encoder and decoder.

Encoder: a stem convolution, then per level ``n_units`` residual units (each two subunits of
conv 3^3 -> norm -> SiLU), with strided 3^3 convolutions between levels (downscaling by the
level's factor). Decoder: the mirror image, with nearest-neighbour upsampling + convolution.

Both sides are tiled by :mod:`medil_backend.ops.tiling`, so a network must say how far it sees
(:meth:`Encoder.receptive_radius`, :meth:`Decoder.receptive_radius`) and how much working memory
a voxel costs. Tiles are exact only with voxel-local norms (``channel`` or ``none``): instance
norm over a tile is not instance norm over the volume, so it is refused in the decoder and an
instance-norm encoder runs on the whole input (:attr:`Encoder.tileable`).

Without gradients the units run in place (one live activation less per level) and a
nearest-neighbour upsampling followed by a 3^3 convolution runs as one convolution per sub-voxel
position on the coarse grid (:func:`upsample_conv`): the same numbers, a third of the
multiply-adds and no upsampled tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def live_activations(dtype_bytes: int) -> float:
    """Full-size activations alive at once at one level, in the memory model.

    Three in the code (input, convolution output, result); oneDNN's float32 convolutions on the
    CPU add about two reordered copies, bfloat16 ones (channels-last, native) none. Measured with
    a peak-RSS sampler on the bundled models (``Testing/test_tiling.py`` checks the limit holds).
    """
    return 3.0 if dtype_bytes < 4 else 5.0


class ChannelNorm(nn.Module):
    """Layer norm over the channels of each voxel (voxel-local, unlike instance or group norm)."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # layer_norm over the last dim of a channels-last view: one fused pass (2-3x faster than mean/var on dim 1)
        perm = (0, *range(2, x.dim()), 1)
        inv = (0, x.dim() - 1, *range(1, x.dim() - 1))
        return F.layer_norm(x.permute(*perm), (x.shape[1],), self.weight, self.bias, self.eps).permute(*inv)


def make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if kind == "channel":
        return ChannelNorm(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; use instance, channel or none")


class ResidualUnit(nn.Module):
    def __init__(self, channels: int, norm: str, subunits: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for s in range(subunits):
            layers += [nn.Conv3d(channels, channels, 3, padding=1), make_norm(norm, channels)]
            if s < subunits - 1:
                layers.append(nn.SiLU())
        self.body = nn.Sequential(*layers)
        self.act = nn.SiLU()
        self.convs = subunits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self.act(x + self.body(x))
        y = x
        for layer in self.body:
            y = F.silu(y, inplace=True) if isinstance(layer, nn.SiLU) else layer(y)
        y += x
        return F.silu(y, inplace=True)


def _parity_kernels(weight: torch.Tensor, factor: int) -> list[tuple[tuple[int, int, int], torch.Tensor, tuple[int, ...]]]:
    """Split a 3^3 kernel applied after nearest upsampling by ``factor`` into one small kernel per sub-voxel position.

    Fine voxel ``factor*i + a`` reads fine neighbours ``a-1..a+1``, i.e. coarse voxels
    ``floor((factor*i + a + d) / factor)``; taps that land on the same coarse voxel are summed.
    Returns (position, kernel, F.pad widths) for each of the ``factor``^3 positions.
    """
    out = []
    per_axis = []
    for a in range(factor):
        offsets = [(a + d) // factor for d in (-1, 0, 1)]  # coarse offset of each tap
        lo, hi = min(offsets), max(offsets)
        mix = torch.zeros(hi - lo + 1, 3, dtype=weight.dtype, device=weight.device)
        for tap, off in enumerate(offsets):
            mix[off - lo, tap] = 1.0
        per_axis.append((mix, -lo, hi))
    for pos in np.ndindex(factor, factor, factor):
        (mx, lx, hx), (my, ly, hy), (mz, lz, hz) = (per_axis[p] for p in pos)
        k = torch.einsum("oixyz,ax,by,cz->oiabc", weight, mx, my, mz)
        out.append((tuple(int(p) for p in pos), k, (lz, hz, ly, hy, lx, hx)))
    return out


def upsample_conv(x: torch.Tensor, conv: nn.Conv3d, factor: int) -> torch.Tensor:
    """``conv(nearest_upsample(x, factor))`` for a 3^3, padding-1 convolution, without the upsampled tensor."""
    B, _, X, Y, Z = x.shape
    out = torch.empty((B, conv.out_channels, X * factor, Y * factor, Z * factor), dtype=x.dtype, device=x.device)
    if x.is_contiguous(memory_format=torch.channels_last_3d):
        out = out.contiguous(memory_format=torch.channels_last_3d)
    for (a, b, c), kernel, pad in _parity_kernels(conv.weight, factor):
        y = F.conv3d(F.pad(x, pad), kernel.to(x.dtype), conv.bias.to(x.dtype) if conv.bias is not None else None)
        out[:, :, a::factor, b::factor, c::factor] = y
    return out


class Encoder(nn.Module):
    """Native-grid feature extractor; spatial size shrinks by ``prod(factors)`` (ceil)."""

    def __init__(self, in_channels: int, channels: Sequence[int], factors: Sequence[int], n_units: int, norm: str) -> None:
        super().__init__()
        assert len(factors) == len(channels) - 1
        self.stem = nn.Conv3d(in_channels, channels[0], 3, padding=1)
        self.levels = nn.ModuleList()
        for i, ch in enumerate(channels):
            units: list[nn.Module] = [ResidualUnit(ch, norm) for _ in range(n_units)]
            if i < len(factors):
                units.append(nn.Conv3d(ch, channels[i + 1], 3, stride=factors[i], padding=1))
            self.levels.append(nn.Sequential(*units))

        self.channels, self.factors, self.n_units, self.norm = list(channels), list(factors), n_units, norm

    @property
    def tileable(self) -> bool:
        """Whether running on overlapping tiles gives exactly the whole-input result (voxel-local norms)."""
        return self.norm != "instance"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for level in self.levels:
            x = level(x)
        return x

    def receptive_radius(self) -> int:
        """Half-width of the receptive field in input voxels (conservative)."""
        r, g = 1, 1  # stem
        for i in range(len(self.channels)):
            r += g * 2 * self.n_units
            if i < len(self.factors):
                r += g  # the strided conv reads one voxel each side at this level's resolution
                g *= self.factors[i]
        return r

    def bytes_per_input_voxel(self, dtype_bytes: int = 4) -> float:
        """Peak working bytes per input voxel: activations alive per level (see :func:`live_activations`)."""
        total, g = 0.0, 1
        for i, ch in enumerate(self.channels):
            total += live_activations(dtype_bytes) * ch / g**3
            if i < len(self.factors):
                g *= self.factors[i]
        return dtype_bytes * total + 8.0


class Decoder(nn.Module):
    """Intermediate-grid features -> output grid, upsampling by ``prod(factors)``.

    With ``guide_channels`` > 0 the finest level also reads a guide image on the output grid
    (the input interpolated there): a 3^3 convolution fuses it with the upsampled features
    before the finest residual units, so output-resolution detail does not have to pass
    through the latent.
    """

    def __init__(
        self, out_channels: int, channels: Sequence[int], factors: Sequence[int], n_units: int, norm: str, guide_channels: int = 0
    ) -> None:
        super().__init__()
        if norm == "instance":
            raise ValueError("the decoder needs a voxel-local norm (channel or none) so tiled decoding is exact")
        self.channels = list(channels)
        self.factors = list(factors)
        self.n_units = n_units
        self.levels = nn.ModuleList()
        for i in reversed(range(len(channels))):
            units: list[nn.Module] = [ResidualUnit(channels[i], norm) for _ in range(n_units)]
            if i > 0:
                units += [nn.Upsample(scale_factor=factors[i - 1], mode="nearest"), nn.Conv3d(channels[i], channels[i - 1], 3, padding=1)]
            self.levels.append(nn.Sequential(*units))
        self.guide = nn.Conv3d(channels[0] + guide_channels, channels[0], 3, padding=1) if guide_channels else None
        self.head = nn.Conv3d(channels[0], out_channels, 3, padding=1)

    def _level(self, level: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        layers = list(level)
        i = 0
        while i < len(layers):
            layer = layers[i]
            if isinstance(layer, nn.Upsample) and not torch.is_grad_enabled():
                x = upsample_conv(x, layers[i + 1], int(layer.scale_factor))
                i += 2
                continue
            x = layer(x)
            i += 1
        return x

    def forward(self, x: torch.Tensor, guide: torch.Tensor | None = None) -> torch.Tensor:
        for level in self.levels[:-1]:
            x = self._level(level, x)
        if self.guide is not None:
            if guide is None:
                raise ValueError("this decoder reads a guide image on the output grid; pass guide=")
            if torch.is_grad_enabled():
                x = x + self.guide(torch.cat([x, guide], dim=1))
            else:  # the concatenation split into two convolutions: no 17-channel copy
                c = x.shape[1]
                w = self.guide.weight.to(x.dtype)
                y = F.conv3d(x, w[:, :c], self.guide.bias.to(x.dtype), padding=1)
                y += F.conv3d(guide.to(x.dtype), w[:, c:], None, padding=1)
                x += y
                del y
        return self.head(self._level(self.levels[-1], x))

    def receptive_radius(self) -> int:
        """Half-width of the receptive field in output voxels (conservative)."""
        r = 1 + (self.guide is not None)  # head (and guide) convs at the output resolution
        g = 1  # size of one voxel of the current level, in output voxels
        for i in range(len(self.channels)):
            r += g * 2 * self.n_units  # residual units at this level (2 convs each)
            if i < len(self.factors):
                r += g  # conv after the upsampling
                g *= self.factors[i]
                r += g  # nearest-neighbour upsampling reads one coarse voxel further at most
        return r

    def bytes_per_output_voxel(self, dtype_bytes: int = 4) -> float:
        """Peak working bytes per output voxel, used to size tiles.

        :func:`live_activations` per level, plus the float32 guide, global skip and output (16
        bytes). Checked against the measured peak RSS in ``Testing/test_tiling.py``.
        """
        total, g = 0.0, 1
        for i, ch in enumerate(self.channels):
            total += live_activations(dtype_bytes) * ch / g**3
            if i < len(self.factors):
                g *= self.factors[i]
        return dtype_bytes * total + 16.0
