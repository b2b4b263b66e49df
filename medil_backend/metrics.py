"""Image-quality metrics on normalised intensities: L1, PSNR, SSIM, MS-SSIM (3D), optionally inside a mask."""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter, zoom

from .intensity import foreground_centres, foreground_mask  # noqa: F401 (tissue masks live with the intensities)


def l1(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None) -> float:
    d = np.abs(np.asarray(pred, np.float64) - np.asarray(ref, np.float64))
    return float(d[mask].mean() if mask is not None else d.mean())


def psnr(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None, data_range: float = 1.0) -> float:
    d = (np.asarray(pred, np.float64) - np.asarray(ref, np.float64)) ** 2
    mse = float(d[mask].mean() if mask is not None else d.mean())
    return float("inf") if mse == 0 else float(10 * np.log10(data_range**2 / mse))


def _ssim_maps(x: np.ndarray, y: np.ndarray, data_range: float, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = gaussian_filter(x, sigma), gaussian_filter(y, sigma)
    vx = gaussian_filter(x * x, sigma) - mx * mx
    vy = gaussian_filter(y * y, sigma) - my * my
    cxy = gaussian_filter(x * y, sigma) - mx * my
    cs = (2 * cxy + c2) / (vx + vy + c2)
    return (2 * mx * my + c1) / (mx * mx + my * my + c1) * cs, cs


def ssim(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None, data_range: float = 1.0, sigma: float = 1.5) -> float:
    """Structural similarity with a Gaussian window (Wang et al. 2004), averaged over the volume or the mask."""
    s, _ = _ssim_maps(np.asarray(pred, np.float64), np.asarray(ref, np.float64), data_range, sigma)
    return float(s[mask].mean() if mask is not None else s.mean())


def ms_ssim(pred: np.ndarray, ref: np.ndarray, data_range: float = 1.0, levels: int = 3, sigma: float = 1.5) -> float:
    """Multi-scale SSIM (Wang et al. 2003) with the standard weights renormalised to ``levels`` scales."""
    weights = np.array([0.0448, 0.2856, 0.3001, 0.2363, 0.1333][:levels])
    weights = weights / weights.sum()
    x, y = np.asarray(pred, np.float64), np.asarray(ref, np.float64)
    vals = []
    for level in range(levels):
        s, cs = _ssim_maps(x, y, data_range, sigma)
        vals.append(max(float((s if level == levels - 1 else cs).mean()), 1e-6))
        if level < levels - 1:
            if min(x.shape) < 8:
                break
            x, y = zoom(x, 0.5, order=1), zoom(y, 0.5, order=1)
    w = weights[: len(vals)] / weights[: len(vals)].sum()
    return float(np.prod(np.array(vals) ** w))
