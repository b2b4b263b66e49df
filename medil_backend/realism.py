"""Realism of generated heads measured without the project's own encoder: each volume registered affinely
(SimpleITK) to a head template and compared there with real held-out heads.

- :func:`affine_to_template`: a volume moved onto the template's grid by an affine registration (Mattes mutual
  information, three resolutions), so that heads of any pose and size are compared where their parts lie;
- :func:`template_correlation`: Pearson correlation with the template inside the template's head;
- :func:`tissue_fractions`: the shares of CSF, grey and white matter inside the template's brain (three intensity
  classes, k-means, ordered dark to bright as in T1);
- :func:`c2st_accuracy`: a classifier two-sample test: a nearest-centroid classifier on coarse block means, scored
  leave-one-out; 0.5 is chance (the samples cannot be told from real heads), 1.0 tells every one apart.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .geometry import Grid, Volume


def affine_to_template(moving: np.ndarray, grid: Grid, template: Volume, seed: int = 0) -> np.ndarray:
    """``moving`` (on ``grid``) registered affinely to ``template`` and resampled onto its grid (linear)."""
    import SimpleITK as sitk

    from .io import from_sitk, to_sitk

    fixed = to_sitk(np.asarray(template.array, dtype=np.float32), template.affine)
    mov = to_sitk(np.asarray(moving, dtype=np.float32), grid.affine)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.2, seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-4, 200, relaxationFactor=0.6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
    try:  # an empty volume has no centre of mass, nor samples for the metric
        init = sitk.CenteredTransformInitializer(fixed, mov, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.MOMENTS)
        reg.SetInitialTransform(init, inPlace=False)
        transform = reg.Execute(fixed, mov)
    except RuntimeError as exc:
        from .errors import MedILError

        raise MedILError(f"a volume could not be registered to the template ({str(exc).strip().splitlines()[-1][:160]}); "
                         "check that the template is a head of the same contrast") from None  # fmt: skip
    return from_sitk(sitk.Resample(mov, fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32))[0]


def template_correlation(aligned: np.ndarray, template: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation of a registered volume with the template inside ``mask`` (the template's head)."""
    a, b = aligned[mask].astype(np.float64), template[mask].astype(np.float64)
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (np.sqrt((a @ a) * (b @ b)) or 1.0))


def tissue_fractions(aligned: np.ndarray, brain: np.ndarray, iters: int = 30) -> dict[str, float]:
    """CSF, grey and white matter shares of the brain mask ``brain``: three intensity classes by k-means (1-D),
    dark to bright as a T1 image orders them."""
    v = np.sort(aligned[brain].astype(np.float64))
    if v.size < 3:
        return {"csf": float("nan"), "gm": float("nan"), "wm": float("nan")}
    centres = np.percentile(v, [15, 50, 85])
    for _ in range(iters):
        label = np.argmin(np.abs(v[:, None] - centres[None]), axis=1)
        new = np.array([v[label == k].mean() if np.any(label == k) else centres[k] for k in range(3)])
        if np.allclose(new, centres):
            break
        centres = new
    label = np.argmin(np.abs(v[:, None] - np.sort(centres)[None]), axis=1)
    shares = np.bincount(label, minlength=3) / v.size
    return {"csf": round(float(shares[0]), 4), "gm": round(float(shares[1]), 4), "wm": round(float(shares[2]), 4)}


def block_features(aligned: np.ndarray, mask: np.ndarray, block: int = 4) -> np.ndarray:
    """Mean intensity of each ``block``^3 region of the template grid (outside ``mask``: 0), as a flat vector scaled by
    the volume's mean inside the mask (so contrast scale does not decide)."""
    a = np.where(mask, aligned, 0.0).astype(np.float64)
    a = a / (a[mask].mean() or 1.0)
    s = [n // block * block for n in a.shape]
    a = a[: s[0], : s[1], : s[2]]
    return a.reshape(s[0] // block, block, s[1] // block, block, s[2] // block, block).mean(axis=(1, 3, 5)).ravel()


def c2st_accuracy(real: Sequence[np.ndarray], fake: Sequence[np.ndarray]) -> float:
    """Leave-one-out accuracy of a nearest-centroid classifier telling ``fake`` feature vectors from ``real`` ones:
    0.5 is chance (realistic), 1.0 tells every one apart."""
    x = np.stack(list(real) + list(fake)).astype(np.float64)
    y = np.array([0] * len(real) + [1] * len(fake))
    right = 0
    for i in range(len(x)):
        keep = np.arange(len(x)) != i
        xs, ys = x[keep], y[keep]
        if not (np.any(ys == 0) and np.any(ys == 1)):
            continue
        mu, sd = xs.mean(0), xs.std(0) + 1e-6
        z, zi = (xs - mu) / sd, (x[i] - mu) / sd
        c0, c1 = z[ys == 0].mean(0), z[ys == 1].mean(0)
        guess = int(np.sum((zi - c1) ** 2) < np.sum((zi - c0) ** 2))
        right += guess == y[i]
    return right / len(x)


__all__ = ["affine_to_template", "block_features", "c2st_accuracy", "template_correlation", "tissue_fractions"]
