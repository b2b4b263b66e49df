"""Classical interpolants (SimpleITK) in world coordinates, owned by inference: the B-spline start of
super-resolution and adaptation. Evaluation uses the same functions as its baselines
(:mod:`medil_backend.baselines`)."""

from __future__ import annotations

import numpy as np

from ..geometry import Grid, Volume
from ..io import from_sitk, to_sitk

INTERPOLATORS = {"nearest": "sitkNearestNeighbor", "trilinear": "sitkLinear", "bspline": "sitkBSpline"}


def resample_sitk(volume: Volume, target: Grid, method: str = "bspline") -> Volume:
    """Resample ``volume`` onto ``target`` with SimpleITK (``nearest``, ``trilinear`` or cubic ``bspline``).

    Points outside the input take the nearest border value, like MedIL's border padding.
    """
    import SimpleITK as sitk

    src = to_sitk(np.asarray(volume.array, dtype=np.float32), volume.affine)
    ref = to_sitk(np.zeros(target.shape, np.float32), target.affine)
    f = sitk.ResampleImageFilter()
    f.SetReferenceImage(ref)
    f.SetInterpolator(getattr(sitk, INTERPOLATORS[method]))
    f.SetUseNearestNeighborExtrapolator(True)
    array, affine = from_sitk(f.Execute(src))
    return Volume(array.astype(np.float32), affine, modality=volume.modality)
