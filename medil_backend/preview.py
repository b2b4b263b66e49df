"""Side-by-side previews: three orthogonal planes (axial, coronal, sagittal, through the grid's centre, in
world RAS with millimetre-true proportions) of each volume, one row per volume, written as a PNG with
no imaging library (numpy + zlib). Used by the Quick Start to show super-resolution next to B-spline."""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .geometry import Volume


def _plane(volume: Volume, axis: int, pixel_mm: float, window: tuple[float, float]) -> np.ndarray:
    """The plane through the volume's centre normal to world axis ``axis`` (0: sagittal, 1: coronal, 2: axial),
    sampled at ``pixel_mm`` (nearest voxel), grey values 0..255, rows running from superior/anterior down."""
    grid = volume.grid
    lo, hi = grid.extent()
    centre = (lo + hi) / 2
    u, v = [a for a in range(3) if a != axis]  # image columns along u, rows along v (flipped: up is +)
    nu = max(1, int(round((hi[u] - lo[u]) / pixel_mm)))
    nv = max(1, int(round((hi[v] - lo[v]) / pixel_mm)))
    cu = lo[u] + (np.arange(nu) + 0.5) * pixel_mm
    cv = hi[v] - (np.arange(nv) + 0.5) * pixel_mm
    pts = np.zeros((nv, nu, 3))
    pts[..., axis] = centre[axis]
    pts[..., u] = cu[None, :]
    pts[..., v] = cv[:, None]
    ijk = np.rint(grid.world_to_voxel(pts.reshape(-1, 3))).astype(np.int64)
    inside = np.all((ijk >= 0) & (ijk < np.asarray(grid.shape)), axis=1)
    values = np.zeros(len(ijk))
    idx = ijk[inside]
    values[inside] = np.asarray(volume.array)[idx[:, 0], idx[:, 1], idx[:, 2]]
    low, high = window
    grey = np.clip((values - low) / max(high - low, 1e-12), 0, 1) * 255
    grey[~inside] = 0
    return grey.reshape(nv, nu).astype(np.uint8)


def _window(volume: Volume) -> tuple[float, float]:
    a = np.asarray(volume.array, dtype=np.float64).ravel()[:: max(1, volume.array.size // 1_000_000)]
    return float(np.percentile(a, 1)), float(np.percentile(a, 99.5))


def _png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write an (H, W) uint8 grey image as PNG."""
    h, w = image.shape
    raw = b"".join(b"\x00" + image[r].tobytes() for r in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(raw, 6))
    from .io import write_bytes_atomic

    write_bytes_atomic(path, png + chunk(b"IEND", b""), overwrite=True)  # a preview is remade with its volumes


def comparison_png(volumes: Sequence[Volume], path: str | os.PathLike, pixel_mm: float | None = None, gap: int = 4) -> Path:
    """One row per volume: its axial, coronal and sagittal planes through the centre, each volume windowed
    like the first (so the rows compare), at ``pixel_mm`` (default: the finest spacing of them all)."""
    pixel_mm = pixel_mm or float(min(v.grid.spacing.min() for v in volumes))
    window = _window(volumes[0])
    rows = []
    for v in volumes:
        planes = [_plane(v, axis, pixel_mm, window) for axis in (2, 1, 0)]
        height = max(p.shape[0] for p in planes)
        padded = [np.pad(p, ((0, height - p.shape[0]), (0, gap))) for p in planes]
        rows.append(np.concatenate(padded, axis=1))
    width = max(r.shape[1] for r in rows)
    image = np.concatenate([np.pad(r, ((0, gap), (0, width - r.shape[1]))) for r in rows], axis=0)
    _png(path, image)
    return Path(path)


__all__ = ["comparison_png"]
