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
the identity when the channel counts match). Corners outside ``F`` take border values.

Speed: the prepared maps are read as channels-last rows (one contiguous row per corner), the 8
corners of a chunk of queries go through the INR as one matrix product, and the INR's 1x1
convolutions run as ``F.linear`` on the channels-last rows (same parameters as ``Conv1d``).
Memory is bounded by the chunk size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_CORNERS = [(a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1)]


def _linear(conv: nn.Conv1d, h: torch.Tensor) -> torch.Tensor:
    """A 1x1 ``Conv1d`` applied to channels-last rows ``h`` (..., C_in) -> (..., C_out)."""
    return F.linear(h, conv.weight.squeeze(-1), conv.bias)


class INR(nn.Module):
    """Residual MLP of 1x1 convolutions; the last layer is zero-initialised.

    ``forward`` takes (B, C, N) like a Conv1d stack; :meth:`rows` takes channels-last rows (..., C).
    """

    def __init__(self, in_channels: int, width: int, blocks: int, out_channels: int) -> None:
        super().__init__()
        self.head = nn.Conv1d(in_channels, width, 1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Conv1d(width, width, 1), nn.SiLU(), nn.Conv1d(width, width, 1)) for _ in range(blocks)
        )
        self.tail = nn.Sequential(nn.SiLU(), nn.Conv1d(width, out_channels, 1))
        nn.init.zeros_(self.tail[1].weight)
        nn.init.zeros_(self.tail[1].bias)

    def rows(self, h: torch.Tensor) -> torch.Tensor:
        h = _linear(self.head, h)
        for block in self.blocks:
            h = h + _linear(block[3], F.silu(_linear(block[1], F.silu(h))))
        return _linear(self.tail[1], F.silu(h))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.rows(h.transpose(1, 2)).transpose(1, 2)


def _corner_geometry(q: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For queries q (B, n, 3) float64: flat corner indices (B, 8, n), offsets q - c (B, 8, n, 3) float64, trilinear weights (B, 8, n) float64."""
    offsets = torch.tensor(_CORNERS, dtype=q.dtype, device=q.device)  # (8, 3)
    c = torch.floor(q).unsqueeze(1) + offsets[None, :, None, :]  # (B, 8, n, 3)
    delta = q.unsqueeze(1) - c
    w = (1 - delta.abs()).clamp_min(0).prod(-1)
    ci = c.long()
    ci = torch.minimum(torch.maximum(ci, torch.zeros_like(ci)), size - 1)
    idx = (ci[..., 0] * size[1] + ci[..., 1]) * size[2] + ci[..., 2]
    return idx, delta, w


def _wide_view(rows: torch.Tensor) -> torch.Tensor:
    """The same bytes seen as 8- or 4-byte words per row: index_select copies wide words much faster than bf16 ones."""
    nbytes = rows.shape[-1] * rows.element_size()
    if rows.requires_grad or not rows.is_contiguous():
        return rows
    for dtype, size in ((torch.int64, 8), (torch.int32, 4)):
        if rows.element_size() < size and nbytes % size == 0:
            return rows.view(dtype)
    return rows


def _gather_rows(rows: torch.Tensor, idx: torch.Tensor, buffer: list | None = None) -> torch.Tensor:
    """rows (B, V, C), idx (B, ...) -> (B, ..., C), one contiguous row per index.

    ``buffer`` (a one-item list, without gradients) keeps the output's memory from one call to the
    next: a fresh multi-megabyte block per chunk costs more in page faults than the copy itself.
    """
    B, V, C = rows.shape
    flat = (idx.reshape(B, -1) + torch.arange(B, device=idx.device).unsqueeze(1) * V).reshape(-1)
    wide = _wide_view(rows.reshape(B * V, C))
    if buffer is None or torch.is_grad_enabled():
        out = wide.index_select(0, flat)
    else:
        if not buffer or buffer[0].shape[0] < flat.shape[0]:
            buffer[:] = [torch.empty((flat.shape[0], wide.shape[1]), dtype=wide.dtype, device=wide.device)]
        out = torch.index_select(wide, 0, flat, out=buffer[0][: flat.shape[0]])
    if out.dtype != rows.dtype:  # (a dtype view is not differentiable: only taken without gradients)
        out = out.view(rows.dtype)
    return out.reshape(*idx.shape, C)


def channels_last_rows(features: torch.Tensor) -> torch.Tensor:
    """(B, C, X, Y, Z) -> (B, X*Y*Z, C)."""
    B, C = features.shape[:2]
    return features.permute(0, 2, 3, 4, 1).reshape(B, -1, C)


def trilinear_sample(features: torch.Tensor, query_vox: torch.Tensor, chunk: int = 131072) -> torch.Tensor:
    """Trilinear interpolation with border padding at float64 voxel coordinates.

    features (B, C, X, Y, Z); query_vox (B, N, 3) in voxel units of ``features`` -> (B, C, N).
    """
    size = torch.tensor(features.shape[2:], device=features.device)
    rows = channels_last_rows(features)
    out = []
    for start in range(0, query_vox.shape[1], chunk):
        idx, _, w = _corner_geometry(query_vox[:, start : start + chunk], size)
        g = _gather_rows(rows, idx)  # (B, 8, n, C)
        out.append((g * w.to(features.dtype).unsqueeze(-1)).sum(1).transpose(1, 2))
    return torch.cat(out, dim=2)


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
        chunk: int = 4096,
    ) -> None:
        super().__init__()
        self.interp_only = interp_only
        self.chunk = chunk
        self.frequencies = frequencies
        self.out_channels = out_channels
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

    @property
    def prepared_channels(self) -> int:
        return self.out_channels if self.interp_only else 5 * self.frequencies + self.out_channels

    def prepare(self, features: torch.Tensor) -> torch.Tensor:
        """Per-grid work (amplitude, frequency and skip maps), done once and reused for every query chunk or tile."""
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
            return trilinear_sample(prepared, query_vox)
        k = self.frequencies
        size = torch.tensor(prepared.shape[2:], device=prepared.device)
        rows = channels_last_rows(prepared)
        dtype = prepared.dtype
        phase = self.phase(cell.to(device=prepared.device, dtype=torch.float32)).to(dtype)[:, None, None, :]  # (B, 1, 1, k)
        outputs = []
        buffer: list = []
        for start in range(0, query_vox.shape[1], self.chunk):
            idx, delta64, w = _corner_geometry(query_vox[:, start : start + self.chunk], size)
            g = _gather_rows(rows, idx, buffer)  # (B, 8, n, 5k + out)
            amp, freq, sk = g[..., : 2 * k], g[..., 2 * k : 5 * k], g[..., 5 * k :]
            delta = delta64.to(dtype)
            # freq . delta per frequency (channel 3i + d holds axis d of frequency i): three multiply-adds, no tiny matmuls
            theta = freq[..., 0::3] * delta[..., 0:1]
            theta = theta.addcmul_(freq[..., 1::3], delta[..., 1:2]).addcmul_(freq[..., 2::3], delta[..., 2:3])
            theta = (theta + phase) * math.pi
            h = amp * torch.cat([torch.cos(theta), torch.sin(theta)], dim=-1)
            y = self.inr.rows(h) + sk  # (B, 8, n, out)
            acc = (y * w.to(y.dtype).unsqueeze(-1)).sum(1)  # (B, n, out)
            outputs.append(acc.transpose(1, 2))
        return torch.cat(outputs, dim=2)
