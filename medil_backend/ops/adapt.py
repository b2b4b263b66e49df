"""Test-time self-supervised super-resolution (the SMORE / ECLARE principle), ``--method adapt``.

A thick-slice scan is sharp in-plane. So: degrade the scan *in-plane* with its own through-plane
acquisition (the same slice thickness and profile, through :class:`AcquisitionOperator`), put it
back on the fine grid with cubic B-spline, and train a small 2D residual network, for a bounded
time, to undo that on in-plane slices. The network has then learnt what the B-spline interpolant
of *this* scanner's slices misses; applied to planes that contain the slice axis (B-spline
upsampled along it), it restores through-plane detail. Both planes that contain the slice axis are
processed and averaged, with the network's mirror images averaged too, and data consistency with the input
follows (as in ``fast``).

The network starts from bundled weights pre-trained on the same task over the training volumes
(:func:`load_prior`; ``medil_backend/training/adapt_prior.py``), so the minutes at test time go
to what is particular to this scan; with none for the modality it starts from scratch.

Each seed trains its own network (``samples`` > 1): their mean is the output and their per-voxel
standard deviation is an uncertainty map.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..acquisition import AcquisitionOperator
from ..errors import MedILError
from ..geometry import Grid, Volume
from .runtime import Progress, autocast, check_cancel, report

PATCH = 48
MIN_PATCH = 16
BATCH = 12
WIDTH = 32
DEPTH = 6
#: where the pre-trained starting weights live (``prior-mri``, ``prior-ct``: medil_backend/training/adapt_prior.py)
PRIOR_DIR = Path(__file__).resolve().parents[1] / "weights" / "adapt"
LR = 1e-3  # constant: within minutes the network is still learning (a cosine decay to zero lost 0.2 dB, 2e-3 diverged)


class ResidualCNN2d(nn.Module):
    """A plain 2D residual network: x + f(x), f a stack of 3x3 convolutions (the SMORE-size model, smaller)."""

    def __init__(self, width: int = WIDTH, depth: int = DEPTH) -> None:
        super().__init__()
        self.width, self.depth = width, depth
        layers: list[nn.Module] = [nn.Conv2d(1, width, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(width, 1, 3, padding=1))
        nn.init.zeros_(layers[-1].weight)
        nn.init.zeros_(layers[-1].bias)
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def refined_along(grid: Grid, axis: int, factor: int) -> Grid:
    """``grid`` with ``factor`` voxels for each one along ``axis`` (same region: the new voxels tile the old)."""
    aff = grid.affine.copy()
    aff[:3, axis] = grid.affine[:3, axis] / factor
    aff[:3, 3] = grid.affine[:3, 3] - aff[:3, axis] * (factor - 1) / 2.0
    shape = list(grid.shape)
    shape[axis] *= factor
    return Grid(shape, aff)


def _bspline(array: np.ndarray, src: Grid, dst: Grid) -> np.ndarray:
    from .interpolate import resample_sitk

    return resample_sitk(Volume(array, src.affine), dst, "bspline").array.astype(np.float32)


def _degraded_in_plane(
    x: np.ndarray, grid: Grid, axis: int, thickness: float, profile: str, spacing: float | None = None
) -> np.ndarray | None:
    """``x`` acquired along in-plane ``axis`` as the scanner acquired its slices (``thickness`` wide, one every
    ``spacing`` mm: the thickness when not given; larger leaves gaps), then B-spline back onto ``grid``."""
    sp = grid.spacing[axis]
    step = thickness if spacing is None else spacing
    n = int(np.floor(grid.shape[axis] * sp / step))
    if n < 2 or step < 1.2 * sp:
        return None
    aff = grid.affine.copy()
    aff[:3, axis] *= step / sp
    aff[:3, 3] = grid.voxel_to_world(np.eye(3)[axis] * (step / sp - 1) / 2.0)
    shape = list(grid.shape)
    shape[axis] = n
    coarse = Grid(shape, aff)
    widths = [None, None, None]
    widths[axis] = thickness
    profiles = ["rect"] * 3
    profiles[axis] = profile
    # the other axes of ``coarse`` are ``grid``'s, so the operator averages along ``axis`` only
    op = AcquisitionOperator(coarse, grid, widths, profiles)
    with torch.no_grad():
        y = op(torch.from_numpy(x)[None, None])[0, 0].numpy()
    return _bspline(y, coarse, grid)


def _planes(x: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """All 2D planes of ``x`` spanned by (``rows``, ``cols``): (N, 1, n_rows, n_cols)."""
    other = 3 - rows - cols
    return np.ascontiguousarray(np.transpose(x, (other, rows, cols)))[:, None]


def _patch_sampler(pairs: list[tuple[np.ndarray, np.ndarray]], rng: np.random.Generator):
    """Random square crops (PATCH, or the planes' size if smaller, at least MIN_PATCH) of (degraded,
    sharp) planes, favouring crops with signal."""
    size = min([PATCH] + [min(d.shape[2], d.shape[3]) for d, _ in pairs])
    if size < MIN_PATCH:
        raise MedILError(f"the input's slices are smaller than {MIN_PATCH} x {MIN_PATCH} voxels: too small to adapt to; use --method fast")

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        while len(xs) < BATCH:
            d, s = pairs[int(rng.integers(len(pairs)))]
            k = int(rng.integers(d.shape[0]))
            i = int(rng.integers(d.shape[2] - size + 1))
            j = int(rng.integers(d.shape[3] - size + 1))
            target = s[k, :, i : i + size, j : j + size]
            if float(target.std()) < 0.02 and rng.random() < 0.9:  # mostly background: usually skip
                continue
            xs.append(d[k, :, i : i + size, j : j + size])
            ys.append(target)
        return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))

    return batch


def train_adapter(
    scans: list[tuple[np.ndarray, Grid, int, float]],
    profile: str,
    seconds: float,
    seed: int,
    progress: Progress | None = None,
    span: tuple[float, float] = (0.0, 1.0),
    cancel=None,
    init: dict[str, torch.Tensor] | None = None,
    max_steps: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[ResidualCNN2d, dict]:
    """Train a :class:`ResidualCNN2d` (from ``init``, e.g. :func:`load_prior`, or from scratch) for ``seconds`` on
    in-plane slices of ``scans``: ``(x, grid, slice_axis, thickness)`` each, normalised intensities on ``grid``, degraded
    along each in-plane axis as the scanner degraded ``slice_axis`` (``max_steps``: stop sooner). The first scan is
    the one the network is for; the others are further scans of the same anatomy (e.g. the other stacks of a
    multi-stack acquisition), whose in-plane slices are drawn from as well. With ``max_steps`` 0 it is ``init`` as it
    is, and no slices are degraded. The network trains on ``device``, its convolutions in ``dtype`` (bfloat16 autocast; the weights and the optimiser stay float32); patches are drawn on
    the CPU from the seed, so a seed draws the same patches on any device."""
    torch.manual_seed(seed)
    if max_steps == 0:  # the pre-trained network alone: nothing to train on, and no orientation it was fitted to
        if init is None:
            raise MedILError("there is no pre-trained network to run without test-time training; give a time budget")
        net = ResidualCNN2d()
        net.load_state_dict(init)
        info = {"steps": 0, "l1_first": float("nan"), "l1_last": float("nan"), "prior": True}
        return net.to(torch.device(device)).eval(), info
    rng = np.random.default_rng(seed)
    pairs = []
    for xs, gs, axis, width in scans:
        for a in (a for a in range(3) if a != axis):
            deg = _degraded_in_plane(xs, gs, a, width, profile)
            if deg is not None:
                b = 3 - a - axis
                pairs.append((_planes(deg, a, b), _planes(xs, a, b)))  # the degraded axis runs down the rows
    if not pairs:
        raise MedILError("the input's in-plane voxels are not fine enough, compared with its slices, to learn from; use --method fast")
    draw = _patch_sampler(pairs, rng)
    device = torch.device(device)

    def batch():
        xb, yb = draw()
        return xb.to(device), yb.to(device)

    net = ResidualCNN2d()
    if init is not None:
        net.load_state_dict(init)
    net = net.to(device)
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    info = fit_adapter(net, opt, batch, seconds, max_steps, cancel, progress, span, dtype=dtype)
    return net.eval(), info | {"prior": init is not None}


def fit_adapter(
    net,
    opt,
    batch,
    seconds: float,
    max_steps: int | None = None,
    cancel=None,
    progress=None,
    span=(0.0, 1.0),
    clip: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Train ``net`` with ``opt`` (L1; gradient norm clipped to ``clip``) on ``batch()`` for ``seconds`` (or
    ``max_steps``): steps and the mean L1 of the first and last steps. A step whose loss is not finite is skipped."""
    t0 = time.perf_counter()
    losses: list[float] = []
    step = 0
    while time.perf_counter() - t0 < seconds and (max_steps is None or step < max_steps):
        check_cancel(cancel)
        xb, yb = batch()
        with autocast(xb.device, dtype):
            pred = net(xb)
        loss = torch.nn.functional.l1_loss(pred.float(), yb)
        opt.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            continue
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 20 == 0:
            frac = min(1.0, (time.perf_counter() - t0) / seconds)
            report(progress, span[0] + (span[1] - span[0]) * frac, f"adapting to this scan: step {step}, L1 {np.mean(losses[-20:]):.4f}")
    k = max(1, min(20, len(losses) // 4))
    first = float(np.mean(losses[:k])) if losses else float("nan")
    last = float(np.mean(losses[-k:])) if losses else float("nan")
    return {"steps": step, "l1_first": first, "l1_last": last}


def load_prior(modality: str) -> dict[str, torch.Tensor] | None:
    """The bundled starting weights of the adaptation network for ``modality``, checked against their card's sha256
    (None when there are none: the network then starts from scratch)."""
    card_path = PRIOR_DIR / f"prior-{modality}.json"
    if not card_path.is_file():
        return None
    from ..files import read_json_file
    from ..models.cards import read_weights

    card = read_json_file(card_path, "model card")
    name = card.get("weights") if isinstance(card, dict) else None
    if not isinstance(name, str) or name != Path(name).name or not card.get("sha256"):
        raise MedILError(f"the adaptation starting weights' card {card_path} is damaged: reinstall MedIL")
    return read_weights(PRIOR_DIR / name, str(card["sha256"]), f"prior-{modality}")


def starting_weights(modality: str, time_budget_min: float) -> dict[str, torch.Tensor] | None:
    """:func:`load_prior`, refusing a time budget of 0 (the pre-trained network alone) when there is none."""
    prior = load_prior(modality)
    if prior is None and time_budget_min == 0:
        raise MedILError(
            f"there is no pre-trained {modality.upper()} network to run without test-time training; give a time budget",
            options=("time_budget",),
        )
    return prior


def prior_ref(modality: str) -> tuple[str, str, str] | None:
    """(name, sha256, "prior") of the bundled starting weights for ``modality``, for provenance."""
    card_path = PRIOR_DIR / f"prior-{modality}.json"
    if not card_path.is_file():
        return None
    from ..files import read_json_file

    card = read_json_file(card_path, "model card")
    return (f"prior-{modality}", str(card.get("sha256")), "prior")


#: the mirror images the network is averaged over, by how many are used: the degradation is symmetric under both flips
MIRRORS = {1: ((),), 2: ((), (2, 3)), 4: ((), (2,), (3,), (2, 3))}


def _predict(net: ResidualCNN2d, planes: np.ndarray, device, dtype, mirrors: int) -> np.ndarray:
    """``net`` on ``planes`` (N, 1, rows, cols) and on ``mirrors`` - 1 of their mirror images, averaged; channels-last
    (faster than the default layout for these 3x3 convolutions on a CPU; bench_superres.py times the whole path)."""
    with autocast(device, dtype):
        x = torch.from_numpy(planes).to(device).contiguous(memory_format=torch.channels_last)
        out = sum(net(x.flip(f)).flip(f) if f else net(x) for f in MIRRORS[mirrors]) / mirrors
    return out.float().cpu().numpy()


def apply_adapter(
    net: ResidualCNN2d,
    y: np.ndarray,
    grid: Grid,
    fine: Grid,
    slice_axis: int,
    cancel=None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    mirrors: int = 4,
    orientations: int = 2,
) -> np.ndarray:
    """``y`` (on ``grid``) B-spline-upsampled onto ``fine`` (``grid`` refined along ``slice_axis``), then ``net``
    applied to the planes that contain ``slice_axis`` (as rows), averaged over ``orientations`` of them (2: both;
    1: those whose columns run along the finer other axis) and over ``mirrors`` mirror images (1, 2 or 4). Both
    orientations, even where the network adapted on planes of one column spacing only (a scan whose other in-plane
    axis is too coarse to degrade): from its pre-trained start it serves both, and both measured better on a
    held-out 0.78 x 0.78 x 6.5 mm T1 seen as 4 mm slices."""
    u = _bspline(y, grid, fine)
    out = np.zeros_like(u)
    device = torch.device(device) if device is not None else next(net.parameters()).device
    net = net.to(device).to(memory_format=torch.channels_last)
    others = [a for a in range(3) if a != slice_axis]
    if orientations == 1:  # the planes whose columns are the finest (the first such axis on a tie)
        others = [min(others, key=lambda b: (fine.spacing[b], b))]
    with torch.no_grad():
        for b in others:
            planes = _planes(u, slice_axis, b)
            pred = np.empty_like(planes)
            for i in range(0, planes.shape[0], 8):
                check_cancel(cancel)
                pred[i : i + 8] = _predict(net, planes[i : i + 8], device, dtype, mirrors)
            other = 3 - slice_axis - b
            order = np.argsort((other, slice_axis, b))
            out += np.transpose(pred[:, 0], order)
    return out / len(others)
