"""Modality-aware intensity normalisation and its inverse.

- MRI: divide by the volume's 99th percentile, so it maps to 1.0 (as MedIL does);
- CT: map [-1000, 2000] HU linearly to [0, 1] (values outside are kept, not clipped).

The modality comes from the user or is guessed from the intensities; the guess is recorded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import MedILError

MODALITIES = ("mri", "ct")
CT_LOW, CT_HIGH = -1000.0, 2000.0


def guess_modality(array: np.ndarray) -> str:
    """``ct`` when the volume looks like Hounsfield units (air near -1000 HU), else ``mri``."""
    sample = np.asarray(array).ravel()[:: max(1, array.size // 2_000_000)].astype(np.float64)
    low = np.percentile(sample, 1)
    frac_air = np.mean(sample < -500)
    return "ct" if low <= -500 and frac_air > 0.02 and sample.min() >= -3100 else "mri"


@dataclass(frozen=True)
class Normalizer:
    """An affine intensity map ``(x - offset) / scale`` and its inverse, with the modality it came from."""

    modality: str
    offset: float
    scale: float

    def forward(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, dtype=np.float32) - self.offset) / self.scale).astype(np.float32)

    def inverse(self, y: np.ndarray) -> np.ndarray:
        return (np.asarray(y, dtype=np.float32) * self.scale + self.offset).astype(np.float32)

    def to_dict(self) -> dict:
        return {"modality": self.modality, "offset": self.offset, "scale": self.scale}


def fit_normalizer(array: np.ndarray, modality: str = "auto") -> Normalizer:
    """Choose the normalisation of ``array`` for ``modality`` (``mri``, ``ct`` or ``auto``)."""
    modality = (modality or "auto").lower()
    if modality in ("auto", "unknown"):
        modality = guess_modality(array)
    if modality not in MODALITIES:
        raise MedILError(f"modality {modality!r} is not known; use mri, ct or auto")
    a = np.asarray(array)
    if a.size == 0 or float(a.min()) == float(a.max()):
        raise MedILError("the volume is empty (every voxel has the same value); check that the right file was given")
    if modality == "ct":
        return Normalizer("ct", CT_LOW, CT_HIGH - CT_LOW)
    p99 = float(np.percentile(a, 99))
    if p99 <= 0:  # mostly background: use the foreground's percentile
        fg = a[a > 0]
        p99 = float(np.percentile(fg, 99)) if fg.size else 0.0
    if p99 <= 0:
        raise MedILError(
            "the volume has no positive intensities; MRI normalisation needs a positive signal (is it a CT? set the modality to CT)",
            options=("modality",),
        )
    return Normalizer("mri", 0.0, p99)


#: the lowest CT value with a physical meaning (air is -1000 HU; scanners store down to -1024)
CT_FLOOR_HU = -1024.0


def physical_floor(array: np.ndarray, modality: str) -> float | None:
    """The lowest value an output may take for this input: CT never goes below -1024 HU, and an MR
    magnitude image (no negative voxel) never goes below 0. ``None``: no floor (e.g. phase or
    difference images with negative values)."""
    if modality == "ct":
        return CT_FLOOR_HU
    return 0.0 if float(np.min(array)) >= 0 else None
