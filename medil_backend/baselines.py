"""Classical resampling baselines (SimpleITK) in world coordinates, for benchmarks and evaluation: the
interpolants inference owns (:mod:`medil_backend.ops.interpolate`), under the names evaluation uses."""

from __future__ import annotations

from .ops.interpolate import INTERPOLATORS, resample_sitk

__all__ = ["INTERPOLATORS", "resample_sitk"]
