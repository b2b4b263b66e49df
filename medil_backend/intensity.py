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


def explain_modality(array: np.ndarray, dicom_modality: str | None = None) -> tuple[str, str]:
    """(``ct`` or ``mri``, the reason in a few words).

    A DICOM Modality tag (CT, MR) decides. Otherwise Hounsfield units are recognised by more than
    the air around a body (a CT cropped tight to the body has none): voxels at or near -1000 HU
    (air, lungs), or a bulk of clearly negative voxels (fat is about -100 HU), never below -3100;
    an MR magnitude image has neither (at most a little negative noise). A tight crop of a CT with
    neither still has its floor: a voxel at -1000 HU (air) or -1024 (the usual padding) is CT.
    """
    tag = (dicom_modality or "").strip().upper()
    if tag in ("CT", "MR"):
        return ("ct" if tag == "CT" else "mri"), f"DICOM Modality tag {tag}"
    sample = np.asarray(array).ravel()[:: max(1, array.size // 2_000_000)].astype(np.float64)
    if sample.size == 0:
        return "mri", "empty volume"
    low, lowest = float(np.percentile(sample, 1)), float(sample.min())
    frac_air = float(np.mean(sample < -500))
    frac_negative = float(np.mean(sample < -50))
    if lowest < -3100:
        return "mri", f"values down to {lowest:.0f}, below any Hounsfield unit"
    if low <= -500 and frac_air > 0.02:
        return "ct", f"{100 * frac_air:.0f} % of voxels at air-like values (below -500), as in Hounsfield units"
    if frac_negative >= 0.01:
        return "ct", f"{100 * frac_negative:.0f} % of voxels below -50 (fat-like Hounsfield units), down to {lowest:.0f}"
    lowest_all = float(np.min(array))  # the floor, counted over every voxel (a crop's few air or padding voxels)
    if -1100 <= lowest_all <= -900:
        return "ct", (
            f"values down to {lowest_all:.0f}, the Hounsfield unit of air or of a CT's padding (an MR image has nothing there), "
            f"up to {float(np.max(array)):.0f}"
        )
    return "mri", "no air at -1000 HU and no bulk of negative voxels"


def guess_modality(array: np.ndarray, dicom_modality: str | None = None) -> str:
    """``ct`` when the volume looks like Hounsfield units, else ``mri`` (see :func:`explain_modality`)."""
    return explain_modality(array, dicom_modality)[0]


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


def physical_floor(array: np.ndarray | None, modality: str) -> float | None:
    """The lowest value an output may take for this input (every task's one floor): CT never goes below -1024 HU,
    and an MR magnitude image (no negative voxel; a generated one, ``array`` None) never goes below 0. ``None``: no
    floor (e.g. phase or difference images with negative values)."""
    if modality == "ct":
        return CT_FLOOR_HU
    return 0.0 if array is None or float(np.min(array)) >= 0 else None


def floored(x: np.ndarray, floor: float | None) -> np.ndarray:
    """``x`` no lower than ``floor`` (in place; ``None``: unchanged)."""
    if floor is not None:
        np.maximum(x, np.float32(floor), out=x)
    return x


def background_value(modality: str, background: float | None = None) -> float:
    """What an output holds outside the input's extent: ``background`` when given, else 0 for MR and
    -1024 HU (air as scanners store it) for CT."""
    if background is not None:
        value = float(background)
        if not np.isfinite(value) or abs(value) > 1e20:
            raise MedILError(f"the background value must be a finite number, got {background!r}", options=("background",))
        return value
    return CT_FLOOR_HU if modality == "ct" else 0.0


def foreground_mask(ref: np.ndarray, modality: str = "mri", threshold: float = 0.1) -> np.ndarray:
    """Head/body mask of a normalised volume (the tissue mask of training).

    MRI: intensities above ``threshold`` (of the 99th-percentile scale). CT: above -200 HU, with
    holes filled so that the lungs and airways inside the body are included."""
    if modality == "ct":
        from scipy.ndimage import binary_fill_holes

        return binary_fill_holes(np.asarray(ref) > (-200.0 - CT_LOW) / (CT_HIGH - CT_LOW))  # -200 HU on the normalised scale
    return np.asarray(ref) > threshold


def foreground_centres(array: np.ndarray, modality: str, limit: int = 20000) -> np.ndarray:
    """Voxel indices inside the tissue mask, thinned evenly to at most about ``limit`` (patch centres, centroids)."""
    pts = np.argwhere(foreground_mask(array, modality))
    return pts[:: max(1, len(pts) // limit)]
