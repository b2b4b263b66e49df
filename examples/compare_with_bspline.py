"""The Quick Start's second half: the same grid by SimpleITK B-spline, and a PNG with both side by side.

    python examples/compare_with_bspline.py INPUT SUPERRES_OUTPUT BSPLINE_OUTPUT PNG

Rows of the PNG: the input (nearest voxel), B-spline, MedIL superres; columns: axial, coronal and
sagittal planes through the centre, all windowed alike."""

from __future__ import annotations

import sys

from medil_backend.baselines import resample_sitk
from medil_backend.errors import MedILError
from medil_backend.io import read_volume, write_volume
from medil_backend.preview import comparison_png


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    src, sr_path, bspline_path, png = argv
    try:
        volume, sr = read_volume(src), read_volume(sr_path)
        bspline = resample_sitk(volume, sr.grid, "bspline")
        write_volume(bspline, bspline_path, overwrite=True)
    except MedILError as exc:
        print(f"compare_with_bspline: error: {exc}", file=sys.stderr)
        return 1
    comparison_png([volume, bspline, sr], png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
