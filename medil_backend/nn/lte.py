"""3D Local Texture Estimator (Lee & Jin, CVPR 2022) carried to 3D and arbitrary query grids.

The LTE resamples a feature grid ``F`` at arbitrary query points. For each query ``q`` (given
in ``F``'s continuous voxel coordinates, computed by the caller in float64) and each of its 8
corner neighbours ``c``::

    delta = q - c                          (voxel units)
    theta = pi * (freq_c . delta + phase(cell))
    h     = amp_c * [cos theta, sin theta]
    y_c   = INR(h)
    out   = sum_c w_c * y_c + trilinear(skip(F))(q)

``amp`` and ``freq`` are 3x3x3 convolutions of ``F``; ``phase`` is a bias-free linear map of the
query cell (query spacing in ``F``'s voxel units); ``w_c`` are trilinear weights. The INR's last
layer starts at zero, so a fresh LTE is trilinear interpolation of ``skip(F)`` (and ``skip`` is
the identity when the channel counts match). Corners outside ``F`` take border values. Queries
are processed in chunks, so memory is bounded by the chunk size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_CORNERS = [(a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1)]


class INR(nn.Module):
    """Residual MLP of 1x1 convolutions on (B, C, N); the last layer is zero-initialised."""

    def __init__(self, in_channels: int, width: int, blocks: int, out_channels: int) -> None:
        super().__init__()
        self.head = nn.Conv1d(in_channels, width, 1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Conv1d(width, width, 1), nn.SiLU(), nn.Conv1d(width, width, 1)) for _ in range(blocks)
        )
        self.tail = nn.Sequential(nn.SiLU(), nn.Conv1d(width, out_channels, 1))
        nn.init.zeros_(self.tail[1].weight)
        nn.init.zeros_(self.tail[1].bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.head(h)
        for block in self.blocks:
            h = h + block(h)
        return self.tail(h)


def _gather(flat: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """flat (B, C, V), index (B, n) -> (B, C, n)."""
    return torch.gather(flat, 2, index.unsqueeze(1).expand(-1, flat.shape[1], -1))


def trilinear_sample(features: torch.Tensor, query_vox: torch.Tensor, chunk: int = 262144) -> torch.Tensor:
    """Trilinear interpolation with border padding at float64 voxel coordinates.

    features (B, C, X, Y, Z); query_vox (B, N, 3) in voxel units of ``features`` -> (B, C, N).
    """
    B, C = features.shape[:2]
    size = torch.tensor(features.shape[2:], device=features.device)
    flat = features.reshape(B, C, -1)
    out = []
    for start in range(0, query_vox.shape[1], chunk):
        q = query_vox[:, start : start + chunk]
        base = torch.floor(q)
        acc = None
        for off in _CORNERS:
            c = base + torch.tensor(off, dtype=q.dtype, device=q.device)
            w = (1 - (q - c).abs()).clamp_min(0).prod(-1).to(features.dtype)
            idx = _linear_index(c, size)
            term = _gather(flat, idx) * w.unsqueeze(1)
            acc = term if acc is None else acc + term
        out.append(acc)
    return torch.cat(out, dim=2)


def _linear_index(corner: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    c = corner.long()
    c = torch.minimum(torch.maximum(c, torch.zeros_like(c)), size - 1)
    return (c[..., 0] * size[1] + c[..., 1]) * size[2] + c[..., 2]


class LTE3d(nn.Module):
    """Resample a feature grid onto arbitrary query points (see module docstring).

    With ``interp_only=True`` it is the MedIL-Interp ablation: a 1x1x1 projection followed by
    trilinear interpolation, no texture estimation.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        frequencies: int = 64,
        inr_width: int = 64,
        inr_blocks: int = 2,
        interp_only: bool = False,
        chunk: int = 65536,
    ) -> None:
        super().__init__()
        self.interp_only = interp_only
        self.chunk = chunk
        self.frequencies = frequencies
        self.skip = nn.Conv3d(in_channels, out_channels, 1)
        if in_channels == out_channels:
            with torch.no_grad():
                self.skip.weight.copy_(torch.eye(in_channels).reshape(in_channels, in_channels, 1, 1, 1))
                self.skip.bias.zero_()
        if not interp_only:
            k = frequencies
            self.amp = nn.Conv3d(in_channels, 2 * k, 3)
            self.freq = nn.Conv3d(in_channels, 3 * k, 3)
            self.phase = nn.Linear(3, k, bias=False)
            self.inr = INR(2 * k, inr_width, inr_blocks, out_channels)

    def prepare(self, features: torch.Tensor) -> torch.Tensor:
        """Per-grid work (amplitude, frequency and skip maps), done once and reused for every query chunk or slab."""
        skip = self.skip(features)
        if self.interp_only:
            return skip
        padded = F.pad(features, (1, 1, 1, 1, 1, 1), mode="replicate")  # border padding, on the fast conv path
        return torch.cat([self.amp(padded), self.freq(padded), skip], dim=1)

    def forward(self, features: torch.Tensor, query_vox: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        """features (B, C, X, Y, Z); query_vox (B, N, 3) float64 voxel coords in ``features``; cell (B, 3) -> (B, out, N)."""
        return self.query(self.prepare(features), query_vox, cell)

    def query(self, prepared: torch.Tensor, query_vox: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        """Sample a :meth:`prepare`-d grid at ``query_vox``: (B, out, N)."""
        if self.interp_only:
            return trilinear_sample(prepared, query_vox, chunk=self.chunk)
        B = prepared.shape[0]
        k = self.frequencies
        size = torch.tensor(prepared.shape[2:], device=prepared.device)
        stacked = prepared.reshape(B, prepared.shape[1], -1)
        dtype = prepared.dtype
        phase = self.phase(cell.to(dtype)).unsqueeze(-1)  # (B, k, 1)
        outputs = []
        for start in range(0, query_vox.shape[1], self.chunk):
            q = query_vox[:, start : start + self.chunk]
            n = q.shape[1]
            base = torch.floor(q)
            acc = None
            for off in _CORNERS:
                c = base + torch.tensor(off, dtype=q.dtype, device=q.device)
                delta64 = q - c
                w = (1 - delta64.abs()).clamp_min(0).prod(-1).to(dtype)  # (B, n)
                delta = delta64.to(dtype)
                g = _gather(stacked, _linear_index(c, size))
                amp, freq, sk = g[:, : 2 * k], g[:, 2 * k : 5 * k], g[:, 5 * k :]
                theta = math.pi * ((freq.reshape(B, k, 3, n) * delta.transpose(1, 2).unsqueeze(1)).sum(2) + phase)
                h = amp * torch.cat([torch.cos(theta), torch.sin(theta)], dim=1)
                term = (self.inr(h) + sk) * w.unsqueeze(1)
                acc = term if acc is None else acc + term
            outputs.append(acc)
        return torch.cat(outputs, dim=2)
