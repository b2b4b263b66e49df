"""At which diffusion steps does a head's layout emerge from the noise? Prints JSON.

    python benchmarks/latent_noise_levels.py --cache runs/latents/medil-brain-t1-gen-box.npz \\
        --model medil-brain-t1-ldm --shifts 1 4 --json benchmarks/results/latent-noise-levels.json

The training latents of the cache (split ``train``), standardised as the model standardises them, less
their mean: what varies between heads. Averaged over blocks of ``p``³ latent voxels, that residual
keeps a variance ``v_p``, while the noise's falls to 1/p³; in x_t = √ᾱ z + √(1-ᾱ) ε the blocks
are seen once the SNR ᾱ/(1-ᾱ) reaches 1/(p³ v_p). For each block size: that SNR, and the step at
which the cosine schedule reaches it for each noise shift (the baseline is the unshifted schedule,
shift 1); a shift written ``LOW-HIGH`` (e.g. ``1-8``) is the shifted interpolated schedule, from LOW at low noise
to HIGH at step T (``noise_shift_low``, ``noise_shift``). A coarse layout that is decided within the last few percent of the steps gets few of the
training draws (uniform in t) and one or two DDIM steps.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medil_backend.errors import MedILError  # noqa: E402
from medil_backend.geometry import Grid  # noqa: E402
from medil_backend.models import load_model  # noqa: E402
from medil_backend.nn.diffusion import cosine_alphas_cumprod, geometry_channels  # noqa: E402
from medil_backend.training.latents import load_latents  # noqa: E402


def residuals(cache: str, net) -> torch.Tensor:
    """(N, C, n, n, n): the training latents standardised by ``net``, cropped to their common cube, less their mean."""
    items, meta = load_latents(cache)
    train = [it for it, name in zip(items, meta["names"]) if name.startswith("train:")]
    n = min(min(it["latent"].shape[1:]) for it in train)
    out = []
    for it in train:
        z = torch.from_numpy(it["latent"])[None]
        cond = geometry_channels(Grid(tuple(z.shape[2:]), it["affine"]), np.ones(3), net.config)[None]
        with torch.no_grad():
            out.append(net.standardise(z, cond)[0, :, :n, :n, :n])
    r = torch.stack(out)
    return r - r.mean(0, keepdim=True)


def step_at(snr: float, alphas_cumprod: torch.Tensor) -> int:
    """The step whose SNR is nearest ``snr`` (log scale)."""
    a = alphas_cumprod.double()
    return int(torch.argmin((torch.log(a / (1 - a)) - np.log(snr)).abs()))


def schedule(spec: str, T: int) -> torch.Tensor:
    """ᾱ of a shift given as ``S`` (constant) or ``LOW-HIGH`` (interpolated)."""
    low, _, high = spec.partition("-")
    try:
        return cosine_alphas_cumprod(T, shift=float(high or low), shift_low=float(low) if high else None)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--shifts: {spec!r} is no shift (a positive number S, or LOW-HIGH): {exc}") from None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True, help="latent cache of the diffusion recipe (runs/latents/*.npz)")
    ap.add_argument("--model", default="medil-brain-t1-ldm", help="diffusion model whose standardisation to use")
    ap.add_argument("--shifts", nargs="+", default=["1", "4"], help="noise shifts: S, or LOW-HIGH for an interpolated one")
    ap.add_argument("--blocks", type=int, nargs="+", default=[1, 2, 4, 8, 14])
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args(argv)
    if not Path(args.cache).is_file():
        ap.error(f"{args.cache} does not exist: run the diffusion recipe once (it writes its latent cache), or give its data.cache")
    try:
        model = load_model(args.model)
    except MedILError as exc:
        ap.error(str(exc))
    net = model.net
    T = net.config.timesteps
    try:  # every shift is checked before the latents are read
        schedules = {s: schedule(s, T) for s in args.shifts}
    except argparse.ArgumentTypeError as exc:
        ap.error(str(exc))
    r = residuals(args.cache, net)
    rows = []
    for p in args.blocks:
        pooled = F.avg_pool3d(r.reshape(-1, 1, *r.shape[2:]), p)
        v = float(pooled.var())
        snr = 1.0 / (p**3 * v)
        steps = {str(s): step_at(snr, a) for s, a in schedules.items()}
        rows.append({"block_mm": p * net.config.latent_spacing, "block_voxels": p, "residual_variance": v, "snr_seen": snr, "step": steps})
    result = {
        "model": args.model,
        "model_sha256": model.sha256,
        "cache": args.cache,
        "training_latents": int(r.shape[0]),
        "cube_voxels": int(r.shape[2]),
        "timesteps": T,
        "blocks": rows,
        "command": "python benchmarks/latent_noise_levels.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        part = Path(args.json + ".part")
        part.write_text(text + "\n")
        part.replace(args.json)
    return result


if __name__ == "__main__":
    main()
