"""SynthSeg-style synthetic MRI from tissue probability maps (Billot et al., 2023, in spirit).

Labels (background, CSF, grey matter, white matter) come from GM/WM probability maps and a
brain image; each synthetic volume draws a random intensity per tissue (any contrast), a random
within-tissue spread, a random partial-volume blur, a smooth bias field and a gamma curve, so a
model trained on them does not learn one scanner's contrast.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from ..geometry import Volume


def tissue_labels(gm: np.ndarray, wm: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """0 background, 1 CSF (inside the brain image, neither GM nor WM), 2 GM, 3 WM."""
    labels = np.zeros(gm.shape, np.uint8)
    inside = brain > np.percentile(brain[brain > 0], 2) if np.any(brain > 0) else brain > 0
    labels[inside] = 1
    labels[(gm >= wm) & (gm > 0.35)] = 2
    labels[(wm > gm) & (wm > 0.35)] = 3
    return labels


def synthesize(labels: np.ndarray, affine: np.ndarray, rng: np.random.Generator) -> Volume:
    """One random-contrast image of ``labels``, scaled so its 99th percentile is 1."""
    means = np.concatenate([[rng.uniform(0.0, 0.1)], rng.uniform(0.1, 1.0, size=3)])
    spreads = rng.uniform(0.01, 0.08, size=4)
    image = means[labels] + rng.normal(size=labels.shape) * spreads[labels]
    image = gaussian_filter(image, sigma=rng.uniform(0.3, 1.0))
    coords = np.meshgrid(*[np.linspace(-1, 1, s) for s in labels.shape], indexing="ij")
    bias = np.exp(sum(rng.uniform(-0.3, 0.3) * c for c in coords))
    image = np.clip(image * bias, 0, None) ** np.exp(rng.uniform(-0.3, 0.3))
    image = image / max(np.percentile(image, 99), 1e-6)
    return Volume(image.astype(np.float32), affine, modality="mri", meta={"synthetic": True})
