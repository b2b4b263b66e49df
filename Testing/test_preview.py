"""The Quick Start's side-by-side PNG: a valid PNG, one row per volume, three planes a row, true proportions."""

from __future__ import annotations

import struct
import subprocess
import sys
import zlib

import numpy as np
from conftest import EXAMPLE, REPO

from medil_backend.geometry import Volume
from medil_backend.preview import comparison_png


def _read_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, size = 8, b"", None
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])[0] == zlib.crc32(kind + body) & 0xFFFFFFFF
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    w, h = size
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, w + 1)
    assert np.all(raw[:, 0] == 0)
    return raw[:, 1:]


def test_comparison_png_has_a_row_per_volume_and_true_proportions(tmp_path):
    a = np.zeros((20, 10, 5), np.float32)
    a[5:15, 2:8, 1:4] = 100
    thin = Volume(a, np.diag([1.0, 1.0, 1.0, 1.0]))
    thick = Volume(a[:, :, ::1], np.diag([1.0, 1.0, 1.0, 1.0]))
    img = _read_png(comparison_png([thin, thick], tmp_path / "c.png", gap=2))
    # rows: 2 volumes of max(plane heights)=max(10, 5, 5) + gap; columns: 20+10+... (axial 20x10, coronal 20x5, sagittal 10x5)
    assert img.shape == (2 * (10 + 2), (20 + 2) + (20 + 2) + (10 + 2))
    assert img.max() == 255 and img.min() == 0


def test_quickstart_comparison_script(tmp_path):
    from medil_backend.io import read_volume, write_volume

    v = read_volume(EXAMPLE)
    sr = v  # any volume on the output grid will do
    write_volume(sr, tmp_path / "sr.nii.gz")
    out = subprocess.run(
        [sys.executable, str(REPO / "examples/compare_with_bspline.py"), str(EXAMPLE), str(tmp_path / "sr.nii.gz"), str(tmp_path / "b.nii.gz"),
         str(tmp_path / "c.png")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert read_volume(tmp_path / "b.nii.gz").grid.same_as(sr.grid) and _read_png(tmp_path / "c.png").shape[0] > 100


def test_the_quick_start_picture_is_labelled_enlarged_and_shows_the_detail(tmp_path):
    """Rows and columns named in the image, pixels enlarged, and a detail column: the square where the last two rows
    differ most, the same square in every row."""
    from medil_backend.geometry import Grid
    from medil_backend.preview import text_image

    rng = np.random.default_rng(0)
    a = rng.random((24, 20, 16)).astype(np.float32) * 100 + 50
    b = a.copy()
    b[2:8, 3:9, :] += 60  # where the two differ
    grid = Grid.from_parts(a.shape, 1.0)
    plain = comparison_png([Volume(a, grid.affine), Volume(b, grid.affine)], tmp_path / "p.png")
    rich = comparison_png(
        [Volume(a, grid.affine), Volume(b, grid.affine)], tmp_path / "r.png", labels=["B-SPLINE", "MEDIL"], scale=2, zoom=3
    )

    def size(path):
        raw = path.read_bytes()
        return int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:24], "big")

    (w0, h0), (w1, h1) = size(plain), size(rich)
    assert w1 > 2 * w0 and h1 > 2 * h0  # enlarged, with a label column, a header and the detail column
    assert text_image("MEDIL 29.9 DB").shape == (14, 13 * 6 * 2)
    img = _read_png(rich)
    assert img[:14].max() == 255  # the column names in the header
