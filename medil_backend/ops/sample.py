"""Draw new volumes onto any grid: latent diffusion on the latent grid that covers it, decoded by the tiling engine.

``sample(model, target)``:

1. the *latent grid*: the autoencoder's latent spacing, the target's orientation, covering the
   target's field of view (plus one latent voxel, which the decoder's LTE reads);
2. its geometry channels (world coordinates in the model's group space, and the spacing the
   output depicts; see :mod:`medil_backend.nn.diffusion`);
3. noise drawn from the seed (on the CPU, so a seed gives the same volume on any device),
   denoised by DDIM in ``steps`` steps;
4. decoded onto exactly ``target`` in tiles that fit the memory limit (no input volume: the
   generative autoencoder has no skip).

A latent whose one-pass denoising would exceed the memory limit (a wide field of view) is
denoised patch-wise, in the largest overlapping windows that fit (:func:`denoise_windows`).

A model's card names its autoencoder (name, weights sha256 and the latent sha256 that is checked), its group space, its default
space and its native spaces (a Gaussian mixture over the training volumes' spacings and
orientations, drawn by :func:`native_grid`).
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from ..errors import MedILError
from ..geometry import Grid, Volume, covering_grid
from ..intensity import background_value, physical_floor
from ..limits import GB
from ..models.cards import DEFAULT_SAMPLE_STEPS, LoadedModel
from ..nn.diffusion import Windows, geometry_channels, group_overlap, source_spacing_along
from .memory import MemoryPlan
from .runtime import Progress, autocast, check_cancel, check_seed, report, resolve_device, resolve_precision
from .tiling import DecodePlan, OutputArray, decode_tiled

#: the spacing channels are clamped to what the training data showed
SPACING_COND_RANGE_MM = (1.0, 10.0)
#: DDIM steps for a model whose card names none (``sampling.steps``)
DEFAULT_STEPS = DEFAULT_SAMPLE_STEPS
#: DDIM's stochasticity by default (0: deterministic; 1: DDPM-like)
DEFAULT_ETA = 0.0
#: the smallest patch-wise denoising window, latent voxels along each axis (64 mm at 4 mm; the brain model learnt crops of 24-48)
MIN_WINDOW = 16


#: a sampling model is a :class:`~medil_backend.models.LoadedModel` with its companion autoencoder
Sampler = LoadedModel


def load_sampler(name: str | None) -> Sampler:
    """The latent diffusion model ``name`` (default: the bundled brain model) and the autoencoder its card names."""
    from ..models import find_model, list_models, load_model

    name = name or DEFAULT_SAMPLER
    entry = find_model(name)
    if "sample" not in entry.tasks or entry.card.get("architecture") != "LatentDiffusionUNet":
        samplers = ", ".join(e.name for e in list_models() if e.card.get("architecture") == "LatentDiffusionUNet") or "none"
        raise MedILError(f"model {entry.name!r} does not sample (it is not a latent diffusion model); sampling models: {samplers}")
    return load_model(name)  # with its companion autoencoder, checked to be the one it was trained on


DEFAULT_SAMPLER = "medil-brain-t1-ldm"


def native_grid(sampler: Sampler, rng: np.random.Generator) -> Grid:
    """A grid drawn from the card's Gaussian mixture of native spaces (spacings and orientations of the
    training volumes), covering the model's default field of view."""
    mix = sampler.card.get("native_spaces")
    if not mix:
        raise MedILError(f"model {sampler.name!r} has no native spaces in its card; give a grid (--spacing, --like) instead")
    w = np.asarray([c["weight"] for c in mix], dtype=np.float64)
    c = mix[int(rng.choice(len(mix), p=w / w.sum()))]
    x = rng.normal(np.asarray(c["mean"]), np.sqrt(np.asarray(c["var"])))
    spacing = np.clip(np.exp(x[:3]), 0.5, 10.0)
    from ..geometry import rotation

    direction = rotation(np.rad2deg(x[3:6]))  # the card keeps angles in radians
    default = sampler.default_grid()
    return covering_grid(default.edge_corners(), spacing, direction)


def group_space_grid(config) -> Grid:
    """The model's group space (the world RAS box its training volumes were placed in) as a one-voxel grid
    whose extent is that box: what "inside the input" means for a sample."""
    lo, hi = np.asarray(config.group_lo, dtype=np.float64), np.asarray(config.group_hi, dtype=np.float64)
    aff = np.eye(4)
    aff[:3, :3], aff[:3, 3] = np.diag(hi - lo), (lo + hi) / 2
    return Grid((1, 1, 1), aff)


def latent_grid_for(sampler: Sampler, target: Grid) -> Grid:
    return sampler.autoencoder.latent_grid(target, target.direction)


def check_in_group_space(sampler: Sampler, target: Grid, min_overlap: float = 0.05) -> None:
    cfg = sampler.diffusion.config
    if group_overlap(target, cfg) < min_overlap:
        lo, hi = target.extent()
        box = ", ".join(f"{a:.0f}..{b:.0f}" for a, b in zip(lo, hi))
        gbox = ", ".join(f"{a:.0f}..{b:.0f}" for a, b in zip(cfg.group_lo, cfg.group_hi))
        raise MedILError(
            f"the requested grid ({box} mm, world RAS) lies outside the space model {sampler.name!r} was trained on "
            f"({gbox} mm, a head centred at the origin): choose a field of view that meets it",
            options=("fov", "like"),
        )


def unet_bytes(sampler: Sampler, shape) -> float:
    """Working bytes of one network pass on a latent of ``shape`` (activations and skips of the UNet, attention at the coarsest level)."""
    cfg = sampler.diffusion.config
    n = float(np.prod(shape))
    conv = sum(n / 8**i * c * 6 * 4 for i, c in enumerate(cfg.channels))
    tokens = n / 8 ** (len(cfg.channels) - 1)
    attn = tokens * tokens * 4 * 2 if cfg.attention else 0.0
    return conv + attn + n * (cfg.latent_channels * 4 + 6) * 4


def denoise_windows(sampler: Sampler, shape, work: float) -> Windows | None:
    """None when one pass over a latent of ``shape`` fits in ``work`` bytes; otherwise overlapping windows that
    do, for patch-wise denoising (a quarter of a window shared with each neighbour): of the window sizes that
    fit, the one with the fewest windows (the most context each), then the smallest (the least work). A user
    error when not even :data:`MIN_WINDOW` fits."""
    shape = tuple(int(n) for n in shape)
    blend = 4.0 * (sampler.diffusion.config.latent_channels + 1) * float(np.prod(shape))  # the blended prediction and its weights
    if unet_bytes(sampler, shape) < work:
        return None
    s = sampler.diffusion.stride
    fitting = [
        Windows(shape, size, max(s, size // 4 // s * s))
        for size in range(max(shape) // s * s, MIN_WINDOW - 1, -s)
        if size < max(shape) and unet_bytes(sampler, [min(size, n) for n in shape]) + blend < work
    ]
    if fitting:
        return min(fitting, key=lambda w: (len(w.slices()), w.size))
    need = unet_bytes(sampler, [min(MIN_WINDOW, n) for n in shape]) + blend
    raise MedILError(
        f"denoising a latent of {shape} voxels, even patch-wise in windows of {MIN_WINDOW}, needs about {need / GB:.2f} GB of "
        f"working memory, and the memory limit leaves {max(work, 0) / GB:.2f} GB: raise the memory limit, or choose a smaller field of view",
        options=("max_memory", "fov"),
    )


@dataclass(frozen=True)
class SampleOptions:
    """Every option of :func:`sample`."""

    n: int = 1
    seed: int = 0
    steps: int | None = None
    device: str | torch.device = "auto"
    max_memory_gb: float | None = None
    precision: str = "float32"
    spacing_condition: Any = None  # (3,) mm, or None: the target's spacing along the latent axes
    eta: float = DEFAULT_ETA
    background: float | None = None


def sample(
    model: Sampler | str | None,
    target_grid: Grid | None = None,
    options: SampleOptions | None = None,
    *,
    progress: Progress | None = None,
    cancel: Any = None,
    **overrides,
) -> list[Volume]:
    """Draw ``n`` volumes onto ``target_grid`` (default: the model's default space) with ``options`` (a
    :class:`SampleOptions`; keyword ``overrides`` replace its fields); sample i uses seed ``seed + i``.

    Returns :class:`Volume` objects on exactly ``target_grid`` whose ``meta`` holds the seed,
    steps, models and the latent grid. ``spacing_condition`` overrides the spacing the output
    depicts (default: the target's spacing along the latent axes, clamped to 1..10 mm). ``eta``: DDIM's
    stochasticity (0: deterministic from the first noise; 1: fresh noise at every step, as DDPM), drawn from the
    same seed. ``steps``: DDIM steps (default: the model's, :attr:`Sampler.default_steps`).
    """
    o = replace(options or SampleOptions(), **overrides)
    n, seed, steps, eta, background, spacing_condition = o.n, o.seed, o.steps, o.eta, o.background, o.spacing_condition
    sampler = model if isinstance(model, Sampler) else load_sampler(model)
    steps = sampler.default_steps if steps is None else steps
    if int(n) < 1:
        raise MedILError(f"the number of samples must be at least 1, not {n}", options=("n",))
    seed = check_seed(seed, int(n))
    if int(steps) < 1 or int(steps) > sampler.diffusion.config.timesteps:
        raise MedILError(f"steps must be between 1 and {sampler.diffusion.config.timesteps}, not {steps}", options=("steps",))
    if not 0.0 <= float(eta) <= 1.0:
        raise MedILError(f"eta must be between 0 (deterministic DDIM) and 1 (DDPM-like), not {eta}", options=("eta",))
    target = (target_grid or sampler.default_grid()).validate("the output grid")
    target = Grid(target.shape, target.affine)
    check_in_group_space(sampler, target)
    dev = resolve_device(o.device)
    dtype = resolve_precision(o.precision, dev, iterative=True)
    z_grid = latent_grid_for(sampler, target)
    ae, ldm = sampler.autoencoder.to(dev).eval(), sampler.diffusion.to(dev).eval()
    C = ldm.config.latent_channels
    memory = MemoryPlan.start(o.max_memory_gb, target.num_voxels, outputs=n)
    memory.hold("latents", 4.0 * (3 * C + 6) * z_grid.num_voxels)  # noise, latent, update and the geometry channels
    work = memory.working_bytes(f"the output grid {target.shape} and its latent alone")
    spill = memory.spill
    windows = denoise_windows(sampler, z_grid.shape, work)
    plan = DecodePlan(ae, z_grid, target, work, 2 if dtype != torch.float32 else 4)
    memory.tiles = {"decode": len(plan.tiles), "denoise_windows": len(windows.slices()) if windows else 1}
    if spacing_condition is None:
        lo, hi = SPACING_COND_RANGE_MM
        spacing_condition = np.clip(source_spacing_along(z_grid, target.direction, target.spacing), lo, hi)
    cond = geometry_channels(z_grid, spacing_condition, ldm.config)[None].to(dev)
    floor = physical_floor(None, sampler.modality)
    # outside the box the model learnt (its group space) the output is background, not made-up extrapolation
    space, fill = group_space_grid(ldm.config), background_value(sampler.modality, background)
    out: list[Volume] = []
    per = 1.0 / n
    denoise_share = 0.5
    for i in range(n):
        s = int(seed) + i
        check_cancel(cancel)
        base = i * per
        report(progress, base, f"sample {i + 1}/{n}: denoising")
        gen = torch.Generator().manual_seed(s)
        noise = torch.randn((1, C, *z_grid.shape), generator=gen).to(dev)

        def step_done(k: int, total: int, base=base, i=i) -> None:
            check_cancel(cancel)
            report(progress, base + per * denoise_share * k / total, f"sample {i + 1}/{n}: denoising step {k}/{total}")

        with torch.inference_mode(), autocast(dev, dtype):
            z = ldm.ddim(noise, cond, steps, callback=step_done, windows=windows, eta=float(eta), generator=gen)
            z = ldm.destandardise(z.float(), cond)
            array = OutputArray(
                target.shape, spill=spill, transform=lambda a: np.maximum(a, np.float32(floor)), outside=(space, target, fill)
            )
            decode_tiled(
                ae, z, z_grid, target, plan=plan, out=array, progress=progress, cancel=cancel, span=(base + per * denoise_share, base + per)
            )
        if not array.finite:
            raise MedILError("the sample is not finite (the network overflowed); use float32 precision", options=("precision",))
        meta = {
            "task": "sample",
            "seed": s,
            "steps": int(steps),
            "eta": float(eta),
            "model": sampler.name,
            "model_sha256": sampler.sha256,
            "autoencoder": sampler.autoencoder_name,
            "autoencoder_sha256": sampler.autoencoder_sha256,
            "latent_grid": {"shape": list(z_grid.shape), "affine": np.round(z_grid.affine, 6).tolist()},
            "spacing_condition_mm": [round(float(v), 4) for v in spacing_condition],
            "device": str(dev),
            "precision": str(dtype).replace("torch.", ""),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "intensity": "normalised (MR: about 0..1, the training volumes' robust range)" if sampler.modality == "mri" else "HU",
            "tiles": len(plan.tiles),
            "denoise_windows": len(windows.slices()) if windows else 1,
            "memory": memory.summary(),
            "background": fill,
        }
        out.append(Volume(array.array, target.affine, modality=sampler.modality, meta=meta))
    report(progress, 1.0, "done")
    return out
