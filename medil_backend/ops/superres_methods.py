"""Super-resolution's methods as strategies: one estimate per method of :mod:`medil_backend.methods`, over one problem.

:func:`medil_backend.ops.superres.superres` checks the options, builds the :class:`Problem` (input, grids, the
acquisition operator, device, precision and memory), asks the method's strategy (:data:`ESTIMATES`) for its
:class:`Estimate` and finishes every method the same way (floor, background outside the input, metadata). A
new method is a row of the facts table and one function here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from ..acquisition import AcquisitionOperator
from ..errors import MedILError
from ..geometry import Grid, Volume
from ..methods import TIME_BUDGET_MIN, check_sampling, method_facts
from .runtime import Progress, autocast, check_cancel, check_seed, report


@dataclass(frozen=True)
class SuperresOptions:
    """Every option of one-stack super-resolution (see :func:`medil_backend.ops.superres.superres`)."""

    method: str = "fast"
    slice_thickness: float | None = None
    slice_profile: str = "rect"
    iterations: int = 2
    samples: int = 1
    time_budget_min: float = TIME_BUDGET_MIN
    seed: int = 0
    max_memory_gb: float | None = None
    model: Any = None  # a model name, a card path or a loaded Sampler
    steps: int = 10
    strength: float = 0.3
    max_iterations: int = 200
    background: float | None = None
    device: str | torch.device = "auto"
    precision: str = "auto"

    def checked(self) -> SuperresOptions:
        """The options if they are sound (the seed as :func:`check_seed` returns it), else a clear refusal."""
        method_facts(self.method)
        if not (isinstance(self.iterations, int) and 0 <= self.iterations <= 100):
            raise MedILError(f"iterations must be a whole number from 0 to 100, got {self.iterations!r}", options=("iterations",))
        check_sampling(self.method, self.samples, self.time_budget_min)
        if not (isinstance(self.max_iterations, int) and 1 <= self.max_iterations <= 100000):
            raise MedILError(f"max_iterations must be a whole number from 1, got {self.max_iterations!r}", options=("iterations",))
        seed = check_seed(self.seed, self.samples)
        thickness = self.slice_thickness
        if thickness is not None and not (np.isfinite(thickness) and thickness > 0):
            raise MedILError(f"the slice thickness must be a positive number of mm, got {thickness!r}", options=("slice_thickness",))
        if self.method == "cycles" and not (0 < self.strength <= 1 and isinstance(self.steps, int) and 1 <= self.steps <= 1000):
            raise MedILError(
                f"cycles need 0 < strength <= 1 and 1 <= steps <= 1000, got {self.strength!r} and {self.steps!r}", options=("steps",)
            )
        return replace(self, seed=seed)


@dataclass
class Problem:
    """What every method's estimate works from: the input, its grids, its acquisition operator and the run's resources."""

    volume: Volume
    y: np.ndarray  # the input's voxels, float32
    grid: Grid
    target: Grid
    work: Grid  # the grid the estimate is made on (adapt: the input's axes, refined along the slice axis)
    axis: int
    op: AcquisitionOperator  # from ``work`` to the input
    options: SuperresOptions
    device: torch.device
    dtype: torch.dtype  # the networks' convolutions (data consistency stays float32)
    budget: float  # working bytes left to one tile by the memory plan
    progress: Progress | None = None
    cancel: Any = None

    @property
    def width(self) -> float:
        return float(self.op.widths[self.axis])

    def consistent(self, x: np.ndarray, y: np.ndarray, span: tuple[float, float]) -> tuple[np.ndarray, float, float]:
        return consistent(x, y, self.op, self.options.iterations, self.progress, span, self.cancel, self.device)


@dataclass
class Estimate:
    """A method's output on the problem's ``work`` grid, in the input's intensities."""

    x: np.ndarray
    std: np.ndarray | None
    before: float  # relative RMS consistency residual before and after data consistency
    after: float
    meta: dict = field(default_factory=dict)


def consistent(
    x: np.ndarray, y: np.ndarray, op: AcquisitionOperator, iterations: int, progress, span, cancel, device: torch.device | None = None
) -> tuple[np.ndarray, float, float]:
    """``iterations`` preconditioned back-projection steps towards ``A x = y`` (float32, on ``device``); the relative
    RMS residual before and after."""
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None].to(device or "cpu")
    yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))[None, None].to(device or "cpu")
    scale = float(yt.abs().max()) or 1.0
    with torch.no_grad():
        precond = op.adjoint(op(torch.ones_like(xt))).clamp_min(1e-6)
        r = yt - op(xt)
        before = after = float(r.pow(2).mean().sqrt()) / scale
        for k in range(iterations):
            check_cancel(cancel)
            report(progress, span[0] + (span[1] - span[0]) * k / max(iterations, 1), f"data consistency {k + 1}/{iterations}")
            xt = xt + op.adjoint(r) / precond
            r = yt - op(xt)
            after = float(r.pow(2).mean().sqrt()) / scale
    return xt[0, 0].cpu().numpy(), before, after


# -- fast ------------------------------------------------------------------------------------------------------------
def estimate_fast(p: Problem) -> Estimate:
    """A cubic B-spline interpolant, made consistent."""
    from .interpolate import resample_sitk

    report(p.progress, 0.0, "B-spline interpolant")
    x = resample_sitk(p.volume, p.target, "bspline").array.astype(np.float32)
    x, before, after = p.consistent(x, p.y, (0.3, 1.0))
    return Estimate(x, None, before, after)


# -- adapt -----------------------------------------------------------------------------------------------------------
#: the quick setting (time budget 0) averages the network over 2 of its 4 mirror images: half the network time (during
#: development on the held-out CTs at 4 and 8 mm this cost under 0.1 dB, one image 0.1-0.4 dB; not a committed result)
QUICK_MIRRORS = 2


def estimate_adapt(p: Problem) -> Estimate:
    """A small network adapted to the scan's own in-plane detail (from the bundled prior), applied through-plane; each
    sample its own seed; their mean made consistent, brought from the working grid onto the target."""
    from ..intensity import fit_normalizer
    from .adapt import apply_adapter, prior_ref, starting_weights, train_adapter
    from .interpolate import resample_sitk

    o = p.options
    norm = fit_normalizer(p.y, p.volume.modality)
    yn = norm.forward(p.y)
    prior = starting_weights(norm.modality, o.time_budget_min)
    meta: dict = {"models": [prior_ref(norm.modality)]} if prior is not None else {}
    estimates, runs = [], []
    seconds = o.time_budget_min * 60 * 0.8 / o.samples
    quick = o.time_budget_min == 0  # the pre-trained network alone: no test-time steps
    for k in range(o.samples):
        start, stop = 0.9 * k / o.samples, 0.9 * (k + 1) / o.samples
        mid = start + 0.8 * (stop - start)
        net, info = train_adapter(
            [(yn, p.grid, p.axis, p.width)],
            o.slice_profile,
            seconds,
            o.seed + k,
            p.progress,
            (start, mid),
            p.cancel,
            prior,
            max_steps=0 if quick else None,
            device=p.device,
            dtype=p.dtype,
        )
        report(p.progress, mid, "applying the adapted network through-plane")
        mirrors = QUICK_MIRRORS if quick else 4
        estimates.append(apply_adapter(net, yn, p.grid, p.work, p.axis, p.cancel, device=p.device, dtype=p.dtype, mirrors=mirrors))
        runs.append(info)
    stack = np.stack(estimates)
    x, before, after = p.consistent(stack.mean(axis=0), yn, (0.9, 0.97))
    std = stack.std(axis=0) * norm.scale if o.samples > 1 else None
    x = norm.inverse(x)
    if not p.work.same_as(p.target, atol=1e-6):
        x = resample_sitk(Volume(x, p.work.affine), p.target, "bspline").array.astype(np.float32)
        if std is not None:
            std = resample_sitk(Volume(std, p.work.affine), p.target, "trilinear").array.astype(np.float32)
    meta.update(samples=o.samples, seed=o.seed, time_budget_min=o.time_budget_min, adaptation=runs)
    return Estimate(x, std, before, after, meta)


# -- inverse and cycles: through a latent diffusion model --------------------------------------------------------------
def estimate_generative(p: Problem) -> Estimate:
    """The consistent B-spline interpolant, encoded by the diffusion model's autoencoder, then optimised in its latent
    (inverse) or noised and denoised (cycles); each sample made consistent; their mean and spread."""
    from ..intensity import fit_normalizer
    from .interpolate import resample_sitk

    o = p.options
    norm = fit_normalizer(p.y, p.volume.modality)
    yn = norm.forward(p.y)
    report(p.progress, 0.0, "B-spline interpolant")
    x0 = resample_sitk(Volume(yn, p.grid.affine), p.target, "bspline").array.astype(np.float32)
    x0, before, _ = p.consistent(x0, yn, (0.02, 0.1))
    sampler = _generative(o.model, norm.modality)  # loaded (and its sha256 checked) once
    meta: dict = {
        "models": [(sampler.name, sampler.sha256, "model"), (sampler.autoencoder_name, sampler.autoencoder_sha256, "autoencoder")]
    }
    if o.method == "cycles":
        stack = diffusion_cycles(p, x0, yn, sampler, norm.modality)
    else:
        stack, meta["optimisation"] = latent_optimisation(p, x0, yn, sampler, norm.modality)
    x = stack.mean(axis=0)
    with torch.no_grad():
        ax = p.op(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None].to(p.device))[0, 0].cpu().numpy()
    after = float(np.sqrt(np.mean((ax - yn) ** 2))) / (float(np.abs(yn).max()) or 1.0)
    std = stack.std(axis=0) * norm.scale if o.samples > 1 else None
    meta.update(samples=o.samples, seed=o.seed, model=sampler.name)
    if o.method == "cycles":
        meta.update(steps=o.steps, strength=o.strength)
    else:
        meta.update(time_budget_min=o.time_budget_min)
    return Estimate(norm.inverse(x), std, before, after, meta)


def _generative(model, modality: str):
    from .sample import Sampler, load_sampler

    sampler = model if isinstance(model, Sampler) else load_sampler(model)
    if sampler.modality != modality:
        raise MedILError(
            f"the diffusion model {sampler.name!r} learnt {sampler.modality.upper()}, the input is {modality.upper()}: "
            "use --method fast or adapt",
            options=("method",),
        )
    return sampler


def _encoded_estimate(p: Problem, x0: np.ndarray, sampler) -> tuple[Any, Grid, torch.Tensor]:
    """The latent grid covering the target and the posterior mean of the estimate ``x0`` on it (what both generative
    methods start from), encoded within the memory plan's tile budget."""
    from .sample import latent_grid_for
    from .tiling import encode_tiled

    ae = sampler.autoencoder.to(p.device).eval()
    z_grid = latent_grid_for(sampler, p.target)
    report(p.progress, 0.1, "encoding the estimate")
    with torch.inference_mode(), autocast(p.device, p.dtype):
        z = ae.split_latent(encode_tiled(ae, torch.from_numpy(x0)[None, None].to(p.device), p.target, z_grid, budget_bytes=p.budget))[0]
    return ae, z_grid, z.float().clone()


def latent_optimisation(p: Problem, x0: np.ndarray, yn: np.ndarray, sampler, modality: str) -> tuple[np.ndarray, list[dict]]:
    """(samples, *target.shape): InverseSR's decoder-only latent optimisation, each run made data-consistent."""
    from .tiling import decode_tiled

    o, device = p.options, p.device
    ae, z_grid, z_init = _encoded_estimate(p, x0, sampler)
    for q in ae.parameters():
        q.requires_grad_(False)
    yt = torch.from_numpy(np.ascontiguousarray(yn, dtype=np.float32))[None, None].to(device)
    seconds = o.time_budget_min * 60 * 0.9 / o.samples
    out, runs = [], []
    for k in range(o.samples):
        a, b = 0.1 + 0.85 * k / o.samples, 0.1 + 0.85 * (k + 1) / o.samples
        spread = 0.1 * float(z_init.std()) if k else 0.0  # the first run starts at the encoding, later ones near it
        noise = torch.randn(z_init.shape, generator=torch.Generator().manual_seed(o.seed + k)).to(device)
        z = (z_init + spread * noise).requires_grad_(True)
        opt = torch.optim.Adam([z], lr=0.05)
        t0, losses = time.perf_counter(), []
        for it in range(o.max_iterations):
            check_cancel(p.cancel)
            with autocast(device, p.dtype):
                x = decode_tiled(ae, z, z_grid, p.target, budget_bytes=p.budget, checkpoint=True)
            loss = (p.op(x.float()) - yt).abs().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            elapsed = time.perf_counter() - t0
            report(p.progress, a + 0.8 * (b - a) * min(1.0, elapsed / seconds), f"latent optimisation {k + 1}/{o.samples}: step {it + 1}")
            if elapsed > seconds:
                break
        with torch.inference_mode(), autocast(device, p.dtype):
            arr = np.asarray(decode_tiled(ae, z.detach(), z_grid, p.target, budget_bytes=p.budget), dtype=np.float32)
        xk, _, _ = p.consistent(arr, yn, (a + 0.8 * (b - a), b))
        out.append(xk)
        runs.append({"steps": len(losses), "l1_first": losses[0], "l1_last": losses[-1], "seconds": round(time.perf_counter() - t0, 1)})
    return np.stack(out), runs


def diffusion_cycles(p: Problem, x0: np.ndarray, yn: np.ndarray, sampler, modality: str) -> np.ndarray:
    """(samples, *target.shape): noise/denoise cycles of the normalised estimate ``x0`` through a latent diffusion model,
    each data-consistent."""
    from ..geometry import centred
    from ..intensity import foreground_centres
    from ..nn.diffusion import geometry_channels, source_spacing_along
    from .sample import SPACING_COND_RANGE_MM, denoise_windows
    from .tiling import DecodePlan, OutputArray, decode_tiled

    o, device, target = p.options, p.device, p.target
    ae, z_grid, z_mean = _encoded_estimate(p, x0, sampler)
    ldm = sampler.diffusion.to(device).eval()
    # the model knows heads centred at the origin: condition on the latent grid moved the same way
    moved = centred(target, foreground_centres(x0, modality))
    shift = moved.affine[:3, 3] - target.affine[:3, 3]
    cond_affine = z_grid.affine.copy()
    cond_affine[:3, 3] += shift
    cond_grid = Grid(z_grid.shape, cond_affine)
    spacing = np.clip(source_spacing_along(z_grid, target.direction, target.spacing), *SPACING_COND_RANGE_MM)
    cond = geometry_channels(cond_grid, spacing, ldm.config)[None].to(device)
    plan = DecodePlan(ae, z_grid, target, p.budget, 4 if p.dtype == torch.float32 else 2)
    windows = denoise_windows(sampler, z_grid.shape, p.budget)
    t_start = ldm.step_for_strength(o.strength)
    z0 = ldm.standardise(z_mean, cond)
    out = []
    for k in range(o.samples):
        check_cancel(p.cancel)
        a, b = 0.1 + 0.85 * k / o.samples, 0.1 + 0.85 * (k + 1) / o.samples
        report(p.progress, a, f"diffusion cycle {k + 1}/{o.samples}")
        noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(o.seed + k)).to(device)
        arr = OutputArray(target.shape)
        with torch.inference_mode(), autocast(device, p.dtype):
            z = ldm.destandardise(ldm.ddim(ldm.noised(z0, t_start, noise), cond, o.steps, start=t_start, windows=windows), cond)
            decode_tiled(ae, z, z_grid, target, plan=plan, out=arr, progress=p.progress, cancel=p.cancel, span=(a, a + 0.8 * (b - a)))
        # data consistency uses the operator's adjoint (autograd): outside inference mode
        xk, _, _ = p.consistent(arr.array, yn, (a + 0.8 * (b - a), b))
        out.append(xk)
    return np.stack(out)


#: each method of :data:`medil_backend.methods.METHOD_FACTS`, by name, to its estimate
ESTIMATES: dict[str, Callable[[Problem], Estimate]] = {
    "adapt": estimate_adapt,
    "fast": estimate_fast,
    "inverse": estimate_generative,
    "cycles": estimate_generative,
}
