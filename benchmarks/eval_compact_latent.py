"""The compact generative latent on held-out heads: how well it reconstructs, and how sharp its heads are.

For each autoencoder (the bundled one, and any card or checkpoint export given) and each held-out
head, in one run:

- the head is encoded on its own grid and decoded onto that grid (MedIL reconstruct);
- masked PSNR / SSIM inside the head (intensities normalised as in training, 99th percentile 1);
- the high-frequency share of the decoded head against the real one (the share of the head's
  variance above a 2 mm Gaussian smoothing, ``evaluate_generative.high_frequency_energy``);
- the latent's size against the 1 mm volume (numbers per number);
- two references with as few numbers: the head block-averaged onto the latent's grid spacing
  (one number per latent voxel, 64x fewer at 4 mm) and brought back with SimpleITK B-spline, and
  the same at the spacing that holds as many numbers as the latent (4 channels at 4 mm: 2.52 mm).

Goals (the generative issue): >= 30 dB masked PSNR at 1 mm, high-frequency share within a factor 2
of real. Prints JSON; ``--json FILE`` writes it.

    python benchmarks/eval_compact_latent.py [--models medil-brain-t1-gen runs/.../export/medil-brain-t1-gen.json] [--json F]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from report import emit

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
#: held out of every autoencoder's training (and of the new recipe's validation)
HELD_OUT = [DATA / "mri" / "pydeface_mean_head_t1.nii.gz", REPO / "examples" / "data" / "itk_t1_2x2x3mm.nii.gz"]


def _downsampled_reference(volume, spacing_mm: float, ref: np.ndarray, norm, mask) -> dict:
    """The head averaged onto a grid of ``spacing_mm`` and brought back with SimpleITK B-spline (as few numbers as that grid)."""
    from medil_backend.baselines import resample_sitk
    from medil_backend.geometry import Volume, exscribed_grid
    from medil_backend.metrics import psnr

    coarse = exscribed_grid(volume.grid, spacing_mm)
    fine = coarse.refined(max(1, int(round(spacing_mm / float(min(volume.grid.spacing))))))
    dense = resample_sitk(volume, fine, "trilinear")
    f = fine.shape[0] // coarse.shape[0]
    a = dense.array[: coarse.shape[0] * f, : coarse.shape[1] * f, : coarse.shape[2] * f]
    a = a.reshape(coarse.shape[0], f, coarse.shape[1], f, coarse.shape[2], f).mean(axis=(1, 3, 5))
    back = resample_sitk(Volume(a.astype(np.float32), coarse.affine, modality="mri"), volume.grid, "bspline")
    return {"spacing_mm": spacing_mm, "psnr_mask": psnr(norm.forward(back.array), ref, mask), "numbers_vs_1mm": float(spacing_mm**3)}


def _untrained(card: str):
    """The architecture of ``card`` with fresh weights (seed 0): what its design gives before any training (with
    ``latent_base``, the B-spline of the latent cells' box averages)."""
    import types

    import torch

    from medil_backend.models import load_model
    from medil_backend.nn.autoencoder import MedILAutoencoder

    trained = load_model(card)
    torch.manual_seed(0)
    net = MedILAutoencoder(trained.net.config).eval()
    return types.SimpleNamespace(net=net, name=f"{trained.name} (untrained)", sha256=None, card={"training": {}})


def evaluate(models: list[str], volumes: list[Path], device: str = "cpu") -> dict:
    from medil_backend.evaluate_generative import high_frequency_energy
    from medil_backend.intensity import fit_normalizer
    from medil_backend.io import read_volume
    from medil_backend.metrics import foreground_mask, psnr, ssim
    from medil_backend.models import load_model
    from medil_backend.ops import run_model

    loaded = {m: _untrained(m[len("untrained:") :]) if m.startswith("untrained:") else load_model(m) for m in models}
    out: dict = {"models": {}, "volumes": {}}
    for name, lm in loaded.items():
        c = lm.net.config
        out["models"][name] = {
            "card": lm.name,
            "sha256": lm.sha256,
            "latent": f"{c.latent_channels} channel{'s' if c.latent_channels > 1 else ''} at {c.latent_spacing:g} mm",
            "compression_vs_1mm": float(c.latent_spacing**3 / c.latent_channels),
            "training": {k: lm.card.get("training", {}).get(k) for k in ("steps_done", "minutes", "hardware")},
        }
    for path in volumes:
        v = read_volume(path)
        norm = fit_normalizer(v.array, "mri")
        ref = norm.forward(v.array)
        mask = foreground_mask(ref, "mri")
        row: dict = {"shape": list(v.grid.shape), "spacing_mm": [round(float(s), 4) for s in v.grid.spacing]}
        row["real"] = {"hf_share": high_frequency_energy(ref, v.grid)}
        for name, lm in loaded.items():
            t0 = time.perf_counter()
            rec = run_model(v, v.grid, lm.net, device=device, modality="mri")
            pred = norm.forward(rec.array)
            hf = high_frequency_energy(pred, v.grid)
            row[name] = {
                "psnr_mask": psnr(pred, ref, mask),
                "ssim_mask": ssim(pred, ref, mask),
                "hf_share": hf,
                "hf_ratio_to_real": hf / row["real"]["hf_share"],
                "seconds": time.perf_counter() - t0,
            }
        spacings = sorted({float(lm.net.config.latent_spacing) for lm in loaded.values()})
        for sp in spacings:
            row[f"block_average_{sp:g}mm_bspline"] = _downsampled_reference(v, sp, ref, norm, mask)
            channels = max(lm.net.config.latent_channels for lm in loaded.values() if lm.net.config.latent_spacing == sp)
            same = round(sp / channels ** (1 / 3), 2)
            row[f"block_average_{same:g}mm_bspline"] = _downsampled_reference(v, same, ref, norm, mask)
        out["volumes"][path.name] = row
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--models",
        nargs="+",
        default=["medil-brain-t1-gen"],
        help="model names or card paths; untrained:CARD for its design with fresh weights",
    )
    p.add_argument("--volumes", nargs="+", type=Path, default=HELD_OUT)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    result = evaluate(args.models, args.volumes, args.device)
    rel = [str(a).replace(str(REPO.parent), "..") for a in (argv if argv is not None else sys.argv[1:])]
    result["command"] = "python benchmarks/eval_compact_latent.py " + shlex.join(rel)
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
