"""Data packs: a training set in one compact ``.npz`` that travels (numpy only to read: no nibabel, no SimpleITK).

Each volume is cropped to its body mask (plus a margin) and stored compactly with its exact
cropped affine, modality and name:

- integer sources (most CT and many MR files) keep their integer type, bit for bit;
- float sources are stored as int16 after an affine map ``stored = round((value - offset) / scale)``
  chosen to span the volume's range, so values come back within ``scale / 2``.

A pack holds ``data_<i>`` and ``affine_<i>`` arrays and one ``meta`` JSON string (format, names,
source sha256, modality, the stored map, the crop). :func:`read_pack` returns
:class:`~medil_backend.geometry.Volume` objects; :class:`~medil_backend.training.data.VolumeDataModule`
trains from a pack given as ``train:``/``val:`` (and ``tissue_maps:`` for synthetic volumes).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..errors import MedILError
from ..geometry import Grid, Volume
from ..intensity import CT_LOW

FORMAT = "medil-pack/1"
MARGIN_VOXELS = 4


def body_box(array: np.ndarray, modality: str, margin: int = MARGIN_VOXELS) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The voxel box [lo, hi) of the body (CT: above -500 HU; MR: above 5 % of the 99th percentile), grown by ``margin``."""
    from scipy import ndimage

    a = np.asarray(array, dtype=np.float32)
    if modality == "ct":
        mask = a > (CT_LOW + 500.0)
    else:
        p99 = float(np.percentile(a, 99))
        mask = a > 0.05 * p99 if p99 > 0 else a != 0
    mask = ndimage.binary_opening(mask, iterations=2) if mask.ndim == 3 and min(mask.shape) > 4 else mask
    if not mask.any():
        return (0, 0, 0), tuple(a.shape)
    idx = np.nonzero(mask)
    lo = tuple(max(0, int(i.min()) - margin) for i in idx)
    hi = tuple(min(n, int(i.max()) + 1 + margin) for i, n in zip(idx, a.shape))
    return lo, hi


def _encode(array: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(stored array, scale, offset): integers as they are, floats as int16 spanning their range."""
    if np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
        return array, 1.0, 0.0
    a = np.asarray(array, dtype=np.float64)
    lo, hi = float(a.min()), float(a.max())
    scale = (hi - lo) / 65000.0 if hi > lo else 1.0
    offset = (hi + lo) / 2.0
    return np.round((a - offset) / scale).astype(np.int16), scale, offset


def write_pack(volumes: Iterable[tuple[str, Volume, str]], path: str | Path, crop: bool = True) -> dict:
    """Write ``(name, volume, source sha256)`` items into ``path`` (.npz, compressed). Returns the meta."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    entries = []
    for i, (name, vol, sha) in enumerate(volumes):
        if vol.modality not in ("mri", "ct"):
            raise MedILError(f"{name}: a pack needs each volume's modality (mri or ct), got {vol.modality!r}")
        lo, hi = body_box(vol.array, vol.modality) if crop else ((0, 0, 0), vol.array.shape)
        cropped = np.ascontiguousarray(vol.array[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]])
        stored, scale, offset = _encode(cropped)
        arrays[f"data_{i}"] = stored
        arrays[f"affine_{i}"] = vol.grid.sub_grid(lo, hi).affine
        entries.append(
            {
                "name": name,
                "sha256": sha,
                "modality": vol.modality,
                "source_dtype": str(vol.array.dtype),
                "stored_dtype": str(stored.dtype),
                "scale": scale,
                "offset": offset,
                "crop": [list(lo), list(hi)],
                "source_shape": list(vol.array.shape),
            }
        )
    meta = {"format": FORMAT, "volumes": entries}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    with open(tmp, "wb") as fh:  # written beside and renamed: never a half-written pack
        np.savez_compressed(fh, **arrays)
    tmp.replace(path)
    return meta


def read_meta(path: str | Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(bytes(z["meta"]).decode())
    if meta.get("format") != FORMAT:
        raise MedILError(f"{path} is not a MedIL data pack ({FORMAT}); write one with training/pack.py")
    return meta


def read_pack(path: str | Path) -> list[tuple[str, Volume, dict]]:
    """The volumes of a pack: (name, Volume in the source's units (float32, or the integer type), meta entry)."""
    path = Path(path)
    if not path.is_file():
        raise MedILError(f"data pack {path} does not exist; write it with training/pack.py")
    out = []
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(bytes(z["meta"]).decode())
        if meta.get("format") != FORMAT:
            raise MedILError(f"{path} is not a MedIL data pack ({FORMAT}); write one with training/pack.py")
        for i, e in enumerate(meta["volumes"]):
            stored = z[f"data_{i}"]
            if e["scale"] == 1.0 and e["offset"] == 0.0:
                array = stored
            else:
                array = (stored.astype(np.float32) * np.float32(e["scale"]) + np.float32(e["offset"])).astype(np.float32)
            grid = Grid(stored.shape, z[f"affine_{i}"])
            out.append((e["name"], Volume(array, grid.affine, modality=e["modality"]), e))
    return out
