"""``medil evaluate-generative``: how diverse, how realistic and how original a sampling model's volumes are.

N samples are drawn onto an evaluation grid (the model's default space, coarsened to
``spacing`` mm to keep the metrics cheap); real volumes are put on the same grid the way the
diffusion model saw them in training (translated so that their foreground centroid is the
origin, trilinear, normalised per volume). Then:

- **diversity**: mean pairwise MS-SSIM among the samples, and among the real volumes (lower is
  more diverse; MedIL reports 0.81 for its samples against 0.68 for real brains); for reference,
  also among the training volumes alone and among the real volumes encoded and decoded by the
  autoencoder (a sample is a decoded latent: the autoencoder's blur is in every one); and the
  mean pairwise correlation, which weighs the heads' layout (size, pose, shape) more than detail;
- **Fréchet distance and precision/recall on MedIL features** (``fd_medil``): features are our own
  generative encoder's latent (posterior mean) averaged over 2x2x2 regions of the grid, per
  channel (mean and standard deviation). It is *not* comparable with the papers' Med3D FID;
  with a handful of volumes it is a coarse, noisy figure. Precision/recall follow Kynkäänniemi et
  al. (k-nearest-neighbour balls, k=3);
- **a head in air**: the share of the grid that is head (foreground), and of its outer shell
  (``shell_mm`` from each face): a real head leaves air around it; a model that never learnt
  where a head ends fills the field of view with tissue;
- **speckle**: the share of the signal inside the head (less its border) that lies above a Gaussian smoothing of
  ``HF_SIGMA_MM`` (high-frequency energy), for the samples, the real volumes and the real volumes
  through the autoencoder. A sample is a decoded latent: its fair reference is the last one;
- **memorisation**: each sample's highest Pearson correlation (inside the head) with any training
  volume, next to the same figure for held-out real volumes. A sample far above the held-out
  figures is a copy of a training volume.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Sequence

import numpy as np

from .geometry import Grid, Volume
from .intensity import fit_normalizer
from .metrics import foreground_mask, ms_ssim


def evaluation_grid(default: Grid, spacing: float) -> Grid:
    """``default``'s region on its own axes at ``spacing`` mm (same centre)."""
    from .geometry import output_grid

    return output_grid(default, spacing=[spacing] * 3)


def on_grid(volume: Volume, grid: Grid, modality: str) -> np.ndarray:
    """A real volume the way the diffusion model saw it: centroid at the origin, normalised, trilinear onto ``grid``."""
    from .geometry import centred
    from .metrics import foreground_centres
    from .nn.resample import resample_to_grid

    norm = fit_normalizer(volume.array, modality)
    a = norm.forward(volume.array).astype(np.float32)
    moved = centred(volume.grid, foreground_centres(a, norm.modality))
    return resample_to_grid(a, moved, grid)


def encoded(ae, a: np.ndarray, grid: Grid) -> tuple[np.ndarray, Grid]:
    """``a``'s latent (posterior mean) on the latent grid of ``grid``."""
    import torch

    from .ops.tiling import encode_tiled

    z_grid = ae.latent_grid(grid, grid.direction)
    x = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]
    with torch.inference_mode():
        return ae.split_latent(encode_tiled(ae, x, grid, z_grid, budget_bytes=1.5 * 2**30))[0][0].numpy(), z_grid


def decoded(ae, z: np.ndarray, z_grid: Grid, grid: Grid) -> np.ndarray:
    """The latent ``z`` on ``z_grid`` decoded onto ``grid``."""
    import torch

    from .ops.tiling import decode_tiled

    with torch.inference_mode():
        return np.asarray(decode_tiled(ae, torch.from_numpy(z)[None], z_grid, grid, budget_bytes=1.5 * 2**30), dtype=np.float32)


def latent_features(z: np.ndarray) -> np.ndarray:
    """A latent's mean and std per channel over 2x2x2 regions of its grid."""
    feats = []
    for block in itertools.product(*[np.array_split(np.arange(n), 2) for n in z.shape[1:]]):
        region = z[:, block[0][:, None, None], block[1][None, :, None], block[2][None, None, :]].reshape(z.shape[0], -1)
        feats += [region.mean(1), region.std(1)]
    return np.concatenate(feats)


def features(ae, arrays: Sequence[np.ndarray], grid: Grid) -> np.ndarray:
    """Our generative encoder's features of volumes on ``grid`` (:func:`latent_features` of each one's latent)."""
    return np.stack([latent_features(encoded(ae, a, grid)[0]) for a in arrays])


def frechet_distance(a: np.ndarray, b: np.ndarray, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (rows are samples)."""
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1 = np.atleast_2d(np.cov(a, rowvar=False)) + eps * np.eye(a.shape[1])
    s2 = np.atleast_2d(np.cov(b, rowvar=False)) + eps * np.eye(a.shape[1])
    covmean = linalg.sqrtm(s1 @ s2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Kynkäänniemi et al.: the share of samples inside the real data's k-NN balls, and the reverse."""

    def inside(ref: np.ndarray, query: np.ndarray) -> float:
        kk = min(k, len(ref) - 1)
        if kk < 1:
            return float("nan")
        d_ref = np.linalg.norm(ref[:, None] - ref[None], axis=-1)
        radii = np.sort(d_ref, axis=1)[:, kk]
        d = np.linalg.norm(query[:, None] - ref[None], axis=-1)
        return float(np.mean(np.any(d <= radii[None], axis=1)))

    scale = real.std(0) + 1e-8  # features on one scale
    r, f = real / scale, fake / scale
    return inside(r, f), inside(f, r)


def mean_pairwise_ms_ssim(arrays: Sequence[np.ndarray]) -> float:
    vals = [ms_ssim(np.clip(a, 0, None), np.clip(b, 0, None), data_range=1.0, levels=3) for a, b in itertools.combinations(arrays, 2)]
    return float(np.mean(vals)) if vals else float("nan")


def mean_pairwise_correlation(arrays: Sequence[np.ndarray]) -> float:
    """Mean Pearson correlation over pairs (whole grid): how much volumes share their layout (size, pose, shape)."""
    vals = [float(np.corrcoef(a.ravel(), b.ravel())[0, 1]) for a, b in itertools.combinations(arrays, 2)]
    return float(np.mean(vals)) if vals else float("nan")


def max_correlation(a: np.ndarray, others: Sequence[np.ndarray]) -> float:
    """The highest Pearson correlation of ``a`` with any of ``others``, inside the union of their head masks."""
    best = -1.0
    for o in others:
        m = foreground_mask(a, "mri") | foreground_mask(o, "mri")
        if m.sum() < 10:
            continue
        best = max(best, float(np.corrcoef(a[m], o[m])[0, 1]))
    return best


#: the smoothing whose residual counts as high-frequency energy (speckle), mm
HF_SIGMA_MM = 2.0


def high_frequency_energy(a: np.ndarray, grid: Grid, sigma_mm: float = HF_SIGMA_MM) -> float:
    """The share of ``a``'s variance inside the head that a Gaussian smoothing of ``sigma_mm`` removes.

    Inside the head less its outer ``2 * sigma_mm``: the step from head to air would otherwise count as speckle."""
    from scipy.ndimage import binary_erosion, gaussian_filter

    m = binary_erosion(foreground_mask(a, "mri"), iterations=int(np.ceil(2 * sigma_mm / min(grid.spacing))))
    if m.sum() < 10:
        return float("nan")
    residual = a - gaussian_filter(a, [sigma_mm / s for s in grid.spacing])
    return float(np.mean(residual[m] ** 2) / (np.var(a[m]) + 1e-12))


def head_in_air(a: np.ndarray, grid: Grid, shell_mm: float = 10.0) -> tuple[float, float]:
    """(share of the grid that is head, share of its outer ``shell_mm`` shell that is head)."""
    m = foreground_mask(a, "mri")
    k = [max(1, int(round(shell_mm / s))) for s in grid.spacing]
    inner = np.zeros_like(m)
    inner[k[0] : -k[0], k[1] : -k[1], k[2] : -k[2]] = True
    return float(m.mean()), float(m[~inner].mean())


def evaluate_generative(
    model: str | None,
    train: Sequence[Volume],
    held_out: Sequence[Volume],
    *,
    n: int = 8,
    seed: int = 1000,
    steps: int | None = None,
    eta: float | None = None,
    spacing: float = 2.0,
    max_memory_gb: float | None = None,
    progress=None,
    template: Volume | None = None,
    brain: Volume | None = None,
) -> dict:
    from .ops.sample import DEFAULT_ETA, load_sampler, sample

    eta = DEFAULT_ETA if eta is None else float(eta)
    sampler = load_sampler(model)
    steps = sampler.default_steps if steps is None else int(steps)
    grid = evaluation_grid(sampler.default_grid(), spacing)
    t0 = time.perf_counter()
    samples = [
        v.array.astype(np.float32)
        for v in sample(sampler, grid, n=n, seed=seed, steps=steps, eta=eta, max_memory_gb=max_memory_gb, progress=progress)
    ]
    seconds_per_sample = (time.perf_counter() - t0) / n
    modality = sampler.modality
    train_arrays = [on_grid(v, grid, modality) for v in train]
    held_arrays = [on_grid(v, grid, modality) for v in held_out]
    real = train_arrays + held_arrays
    ae = sampler.autoencoder.cpu().eval()
    real_latents = [encoded(ae, a, grid) for a in real]  # each real volume encoded once: features and its decoding
    f_real, f_fake = np.stack([latent_features(z) for z, _ in real_latents]), features(ae, samples, grid)
    precision, recall = precision_recall(f_real, f_fake)
    mem_samples = [max_correlation(s, train_arrays) for s in samples]
    mem_held = [max_correlation(h, train_arrays) for h in held_arrays]
    # two more references: how close two distinct real training heads get (each against the others), and how close a
    # sample is to the training heads' mean (a sample nearer the mean than any one head is no copy of one)
    mem_train = (
        [max_correlation(a, train_arrays[:i] + train_arrays[i + 1 :]) for i, a in enumerate(train_arrays)] if len(train_arrays) > 1 else []
    )
    train_mean = np.mean(train_arrays, axis=0)
    corr_mean = [max_correlation(s, [train_mean]) for s in samples]
    real_ae = [decoded(ae, z, z_grid, grid) for z, z_grid in real_latents]
    air = {name: np.array([head_in_air(a, grid) for a in arrays]) for name, arrays in (("samples", samples), ("real", real))}
    groups = (("samples", samples), ("real", real), ("real_through_autoencoder", real_ae))
    speckle = {name: float(np.nanmean([high_frequency_energy(a, grid) for a in arrays])) for name, arrays in groups}
    result = {
        "model": sampler.name,
        "model_sha256": sampler.sha256,
        "autoencoder": sampler.autoencoder_name,
        "n_samples": n,
        "seed": seed,
        "steps": steps,
        "eta": eta,
        "grid": {"shape": list(grid.shape), "spacing_mm": spacing},
        "real": {"train": [v.meta.get("name", "") for v in train], "held_out": [v.meta.get("name", "") for v in held_out]},
        "seconds_per_sample": round(seconds_per_sample, 2),
        "diversity_ms_ssim": {
            "samples": mean_pairwise_ms_ssim(samples),
            "real": mean_pairwise_ms_ssim(real),
            # two references for the samples: the training volumes alone (whole heads, where the held-out ones are
            # partial or thick-sliced), and every real volume through the autoencoder (its blur makes volumes alike)
            "real_train": mean_pairwise_ms_ssim(train_arrays),
            "real_through_autoencoder": mean_pairwise_ms_ssim(real_ae),
        },
        # the same question on the whole layout: MS-SSIM weighs detail, a correlation the head's size, pose and shape
        "pairwise_correlation": {
            "samples": mean_pairwise_correlation(samples),
            "real": mean_pairwise_correlation(real),
            "real_train": mean_pairwise_correlation(train_arrays),
            "real_through_autoencoder": mean_pairwise_correlation(real_ae),
        },
        "fd_medil": frechet_distance(f_real, f_fake),
        "fd_medil_real_split": frechet_distance(np.stack(f_real[: len(train_arrays)]), np.stack(f_real[len(train_arrays) :]))
        if len(held_arrays) > 1
        else None,
        "head_fraction": {k: round(float(v[:, 0].mean()), 4) for k, v in air.items()},
        "head_fraction_in_outer_10mm": {k: round(float(v[:, 1].mean()), 4) for k, v in air.items()},
        "high_frequency_energy": speckle,
        "precision": precision,
        "recall": recall,
        "memorisation": {
            "sample_max_corr_with_train": [round(v, 4) for v in mem_samples],
            "held_out_max_corr_with_train": [round(v, 4) for v in mem_held],
            "samples_above_every_held_out": int(sum(v > max(mem_held, default=1.0) for v in mem_samples)),
            "train_max_corr_with_other_train": [round(v, 4) for v in mem_train],
            "samples_above_every_train_pair": int(sum(v > max(mem_train, default=1.0) for v in mem_samples)),
            "sample_corr_with_train_mean": [round(v, 4) for v in corr_mean],
        },
        "feature_note": "fd_medil: Frechet distance on medil generative-encoder latent statistics (2x2x2 regions); not Med3D FID",
    }
    if template is not None:
        result["realism"] = realism_figures(samples, held_arrays, train_arrays, grid, template, brain, speckle)
    return result


def realism_figures(samples, held, train, grid: Grid, template: Volume, brain: Volume | None, speckle: dict) -> dict:
    """The figures that do not rest on our encoder: every volume registered affinely to ``template`` (SimpleITK),
    its correlation with the template inside the template's head, its tissue fractions inside ``brain`` (a brain
    image on the template's grid or any grid), a two-sample classifier's leave-one-out accuracy (samples against
    every real volume), each sample's nearest training head there, and the issue's checks against the held-out heads."""
    from .ops.interpolate import resample_sitk
    from .realism import affine_to_template, block_features, c2st_accuracy, template_correlation, tissue_fractions

    t = np.asarray(template.array, dtype=np.float32)
    head = t > 0.2 * float(np.percentile(t, 99.5))
    mask_b = head
    if brain is not None:
        b = resample_sitk(brain, template.grid, "trilinear").array
        mask_b = b > 0.2 * float(np.percentile(b[b > 0], 99)) if np.any(b > 0) else head
    aligned = {name: [affine_to_template(a, grid, template, seed=i) for i, a in enumerate(arrays)] for name, arrays in
               (("samples", samples), ("held_out", held), ("train", train))}  # fmt: skip
    corr = {name: [round(template_correlation(a, t, head), 4) for a in arrays] for name, arrays in aligned.items()}
    fractions = {name: [tissue_fractions(a, mask_b) for a in arrays] for name, arrays in aligned.items()}
    feats = {name: [block_features(a, head) for a in arrays] for name, arrays in aligned.items()}
    c2st = c2st_accuracy(feats["held_out"] + feats["train"], feats["samples"])
    nearest = [max((template_correlation(s, tr, head) for tr in aligned["train"]), default=float("nan")) for s in aligned["samples"]]
    ratio = float(np.median(corr["samples"]) / np.median(corr["held_out"])) if corr["held_out"] else float("nan")
    hf = speckle.get("samples", float("nan")) / (speckle.get("real") or float("nan"))
    return {
        "template": template.meta.get("name", ""),
        "template_correlation": corr,
        "template_correlation_ratio": round(ratio, 4),
        "tissue_fractions": {
            k: {c: round(float(np.mean([f[c] for f in v])), 4) for c in ("csf", "gm", "wm")} for k, v in fractions.items() if v
        },
        "c2st_accuracy": round(c2st, 4),
        "nearest_training_head_correlation": [round(float(v), 4) for v in nearest],
        "checks": {
            "template_correlation_ratio_at_least_0.9": bool(ratio >= 0.9),
            "high_frequency_share_at_least_half_of_real": bool(hf >= 0.5),
            "no_sample_above_0.95_with_a_training_head": bool(max(nearest, default=0.0) <= 0.95),
            "classifier_near_chance_(at_most_0.7)": bool(c2st <= 0.7),
        },
    }


def markdown(result: dict) -> str:
    d, m = result["diversity_ms_ssim"], result["memorisation"]
    h, hs = result["head_fraction"], result["head_fraction_in_outer_10mm"]
    rows = [
        "| figure | samples | real volumes |",
        "|---|---|---|",
        f"| diversity: mean pairwise MS-SSIM (lower = more diverse) | {d['samples']:.3f} | {d['real']:.3f} |",
        *(
            [
                f"| diversity of the training volumes alone | - | {d['real_train']:.3f} |",
                f"| diversity of the real volumes through the autoencoder (encoded and decoded) | - | {d['real_through_autoencoder']:.3f} |",
            ]
            if "real_through_autoencoder" in d  # results written before these references existed lack them
            else []
        ),
        *(
            [
                "| layout: mean pairwise correlation (lower = more diverse) | "
                f"{c['samples']:.3f} | {c['real']:.3f} (training alone {c['real_train']:.3f}, through the autoencoder "
                f"{c['real_through_autoencoder']:.3f}) |"
            ]
            if (c := result.get("pairwise_correlation"))
            else []
        ),
        f"| memorisation: highest correlation with a training volume (median) | {np.median(m['sample_max_corr_with_train']):.3f} "
        f"| {np.median(m['held_out_max_corr_with_train']):.3f} (held-out) |",
        f"| samples more similar to a training volume than any held-out volume is | {m['samples_above_every_held_out']} of "
        f"{result['n_samples']} | - |",
        *(
            [
                f"| samples more similar to a training volume than any training volume is to another | {m['samples_above_every_train_pair']} of "
                f"{result['n_samples']} | {max(m['train_max_corr_with_other_train'], default=float('nan')):.3f} (highest training pair) |",
                f"| correlation with the training volumes' mean (median) | {np.median(m['sample_corr_with_train_mean']):.3f} | - |",
            ]
            if "samples_above_every_train_pair" in m  # results written before these references existed lack them
            else []
        ),
        f"| share of the grid that is head (mean) | {h['samples']:.2f} | {h['real']:.2f} |",
        f"| share of the outer 10 mm shell that is head (mean; a head in air leaves it empty) | {hs['samples']:.2f} | {hs['real']:.2f} |",
        *(
            [
                f"| speckle: share of the head's variance above a {HF_SIGMA_MM:g} mm Gaussian smoothing | {hf['samples']:.3f} | "
                f"{hf['real']:.3f} (through the autoencoder {hf['real_through_autoencoder']:.3f}) |"
            ]
            if (hf := result.get("high_frequency_energy"))
            else []
        ),
        f"| Fréchet distance on MedIL features (fd_medil) | {result['fd_medil']:.3f} | - |",
        f"| precision / recall (k-NN, MedIL features) | {result['precision']:.2f} / {result['recall']:.2f} | - |",
        *(_realism_rows(r) if (r := result.get("realism")) else []),
        f"| seconds per sample ({result['grid']['spacing_mm']} mm grid {tuple(result['grid']['shape'])}, {result['steps']} steps) "
        f"| {result['seconds_per_sample']} | - |",
    ]
    return "\n".join(rows) + "\n"


def _realism_rows(r: dict) -> list[str]:
    c, f = r["template_correlation"], r["tissue_fractions"]
    frac = {k: " / ".join(f"{v[t]:.2f}" for t in ("csf", "gm", "wm")) for k, v in f.items()}
    checks = ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in r["checks"].items())
    return [
        f"| correlation with the template after affine registration (median; ratio to held-out {r['template_correlation_ratio']:.2f}) "
        f"| {np.median(c['samples']):.3f} | {np.median(c['held_out']):.3f} (held-out) |",
        f"| tissue fractions CSF / GM / WM in the template's brain | {frac.get('samples', '-')} | {frac.get('held_out', '-')} (held-out) |",
        f"| two-sample classifier, leave-one-out accuracy (0.5: chance) | {r['c2st_accuracy']:.2f} | - |",
        f"| nearest training head after registration (highest correlation) | {max(r['nearest_training_head_correlation']):.3f} | - |",
        f"| checks | {checks} | - |",
    ]


def write_reports(result: dict, json_path: str | None, md_path: str | None, overwrite: bool = False) -> None:
    """JSON and Markdown reports, each written beside its target and renamed into place (never half-written;
    an existing report is replaced only with ``overwrite``)."""
    from .io import write_text_atomic

    for path, text in ((json_path, json.dumps(result, indent=2, default=float) + "\n"), (md_path, markdown(result))):
        if path:
            write_text_atomic(path, text, overwrite)
