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


#: a 5x7 pixel font for the labels (rows of 5 bits, most significant bit left): digits, capitals and a few signs
_FONT = {
    "0": "0E 11 13 15 19 11 0E",
    "1": "04 0C 04 04 04 04 0E",
    "2": "0E 11 01 02 04 08 1F",
    "3": "1F 02 04 02 01 11 0E",
    "4": "02 06 0A 12 1F 02 02",
    "5": "1F 10 1E 01 01 11 0E",
    "6": "06 08 10 1E 11 11 0E",
    "7": "1F 01 02 04 08 08 08",
    "8": "0E 11 11 0E 11 11 0E",
    "9": "0E 11 11 0F 01 02 0C",
    "A": "0E 11 11 1F 11 11 11",
    "B": "1E 11 11 1E 11 11 1E",
    "C": "0E 11 10 10 10 11 0E",
    "D": "1C 12 11 11 11 12 1C",
    "E": "1F 10 10 1E 10 10 1F",
    "F": "1F 10 10 1E 10 10 10",
    "G": "0E 11 10 17 11 11 0F",
    "H": "11 11 11 1F 11 11 11",
    "I": "0E 04 04 04 04 04 0E",
    "J": "07 02 02 02 02 12 0C",
    "K": "11 12 14 18 14 12 11",
    "L": "10 10 10 10 10 10 1F",
    "M": "11 1B 15 15 11 11 11",
    "N": "11 11 19 15 13 11 11",
    "O": "0E 11 11 11 11 11 0E",
    "P": "1E 11 11 1E 10 10 10",
    "Q": "0E 11 11 11 15 12 0D",
    "R": "1E 11 11 1E 14 12 11",
    "S": "0F 10 10 0E 01 01 1E",
    "T": "1F 04 04 04 04 04 04",
    "U": "11 11 11 11 11 11 0E",
    "V": "11 11 11 11 11 0A 04",
    "W": "11 11 11 15 15 15 0A",
    "X": "11 11 0A 04 0A 11 11",
    "Y": "11 11 0A 04 04 04 04",
    "Z": "1F 01 02 04 08 10 1F",
    " ": "00 00 00 00 00 00 00",
    ".": "00 00 00 00 00 0C 0C",
    "+": "00 04 04 1F 04 04 00",
    "-": "00 00 00 1F 00 00 00",
    "(": "02 04 08 08 08 04 02",
    ")": "08 04 02 02 02 04 08",
    ":": "00 0C 0C 00 0C 0C 00",
    "/": "01 01 02 04 08 10 10",
}


def text_image(text: str, scale: int = 2) -> np.ndarray:
    """``text`` (upper-cased; letters, digits and ``.+-():/``) drawn white on black, 7 * ``scale`` pixels high."""
    glyphs = []
    for ch in text.upper():
        rows = [int(h, 16) for h in _FONT.get(ch, _FONT[" "]).split()]
        glyph = np.array([[(r >> (4 - c)) & 1 for c in range(5)] for r in rows], dtype=np.uint8) * 255
        glyphs.append(np.pad(glyph, ((0, 0), (0, 1))))
    image = np.concatenate(glyphs, axis=1) if glyphs else np.zeros((7, 1), np.uint8)
    return np.kron(image, np.ones((scale, scale), np.uint8))


def _put(canvas: np.ndarray, image: np.ndarray, top: int, left: int) -> None:
    h, w = image.shape
    canvas[top : top + h, left : left + w] = np.maximum(
        canvas[top : top + h, left : left + w], image[: canvas.shape[0] - top, : canvas.shape[1] - left]
    )


def _zoom_box(a: np.ndarray, b: np.ndarray, size: int) -> tuple[int, int]:
    """Top-left corner of the ``size`` square where two same-shaped planes differ most."""
    d = np.abs(a.astype(np.float64) - b.astype(np.float64)) * ((a > 25) & (b > 25))  # inside the head, not its edge to air
    if d.shape[0] <= size or d.shape[1] <= size:
        return 0, 0
    c = np.cumsum(np.cumsum(np.pad(d, ((1, 0), (1, 0))), 0), 1)
    sums = c[size:, size:] - c[:-size, size:] - c[size:, :-size] + c[:-size, :-size]
    i, j = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(i), int(j)


def comparison_png(
    volumes: Sequence[Volume],
    path: str | os.PathLike,
    pixel_mm: float | None = None,
    gap: int = 4,
    labels: Sequence[str] | None = None,
    scale: int = 1,
    zoom: int = 0,
) -> Path:
    """One row per volume: its axial, coronal and sagittal planes through the centre, each volume windowed
    like the first (so the rows compare), at ``pixel_mm`` (default: the finest spacing of them all).

    ``labels`` names the rows (written left of them) and the columns are named; ``scale`` enlarges every
    pixel; ``zoom`` > 1 adds a column with the axial square where the last two rows differ most (e.g. MedIL
    against B-spline), enlarged ``zoom`` times, the same square in every row."""
    pixel_mm = pixel_mm or float(min(v.grid.spacing.min() for v in volumes))
    window = _window(volumes[0])
    planes = [[_plane(v, axis, pixel_mm, window) for axis in (2, 1, 0)] for v in volumes]
    columns = ["AXIAL", "CORONAL", "SAGITTAL"]
    if zoom > 1 and len(volumes) >= 2:
        a, b = planes[-1][0], planes[-2][0]
        size = max(8, min(a.shape) // 4)
        i, j = _zoom_box(a, b, size) if a.shape == b.shape else (0, 0)
        for row in planes:
            crop = row[0][i : i + size, j : j + size]
            row.append(np.kron(crop, np.ones((zoom, zoom), np.uint8)))
        columns.append(f"DETAIL X{zoom}")
    rows = []
    for row in planes:
        row = [np.kron(p, np.ones((scale, scale), np.uint8)) for p in row]
        height = max(p.shape[0] for p in row)
        rows.append([np.pad(p, ((0, height - p.shape[0]), (0, gap))) for p in row])
    header = [text_image(c).shape[1] + gap if labels is not None else 0 for c in columns]  # a named column fits its name
    widths = [max(max(r[c].shape[1] for r in rows), header[c]) for c in range(len(rows[0]))]
    rows = [np.concatenate([np.pad(p, ((0, 0), (0, w - p.shape[1]))) for p, w in zip(r, widths)], axis=1) for r in rows]
    image = np.concatenate([np.pad(r, ((0, gap), (0, 0))) for r in rows], axis=0)
    if labels is None:
        _png(path, image)
        return Path(path)
    names = [text_image(str(n)) for n in labels]
    left = max(n.shape[1] for n in names) + 8
    head = text_image("A")[:, :1].shape[0] + 8
    canvas = np.zeros((image.shape[0] + head, image.shape[1] + left), np.uint8)
    canvas[head:, left:] = image
    x = left
    for name, w in zip(columns, widths):
        _put(canvas, text_image(name), 2, x)
        x += w
    y = head
    for name, r in zip(names, rows):
        _put(canvas, name, y + max(0, (r.shape[0] - name.shape[0]) // 2), 2)
        y += r.shape[0] + gap
    _png(path, canvas)
    return Path(path)


__all__ = ["comparison_png", "text_image"]
