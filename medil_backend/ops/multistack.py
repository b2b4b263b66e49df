"""Multi-stack super-resolution: several thick-slice stacks of the same anatomy, in any orientations,
into one volume on a fine grid.

Each stack keeps its own acquisition operator (its slice axis, thickness and profile, in exact world
geometry) and a rigid motion (a 4x4 world RAS transform: the stack's voxels imaged the anatomy at
``motion @ affine``). The volume ``x`` on the output grid solves the joint data-consistency problem
``min sum_k ||A_k x - y_k||^2 + alpha ||D x||^2`` by a few preconditioned simultaneous
back-projection steps (SIRT), starting from the mean of the stacks' B-spline interpolants; the
smoothness weight ``alpha`` follows the stacks' estimated noise (none for clean stacks). Motion and volume are estimated in turn, as
slice-to-volume methods do: each round registers every stack but the first (the reference frame)
to the current volume (the first round: to the first stack's interpolant), seen at that stack's
resolution (SimpleITK, rigid, correlation), then runs the back-projection steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..acquisition import CACHE_SHARE, AcquisitionOperator
from ..errors import MedILError
from ..geometry import Grid, Volume, inside_mask
from .adapt import prior_ref
from .runtime import Progress, check_cancel, report, resolve_device, resolve_precision

#: the most stacks one reconstruction takes
MAX_STACKS = 10
#: back-projection steps per round (each round: register, then these steps from the registered interpolants)
STEPS_PER_ROUND = 4
#: the smoothness weight per unit of estimated noise (relative to the stacks' maximum): measured on simulated
#: stacks with 0, 1 and 3 % noise, where it kept within about 0.5 dB of the best fixed weight for each level
SMOOTHNESS_PER_NOISE = 4.0
#: the least intensity correlation between a stack and the first, inside the anatomy both see (blurred to the
#: slice thickness, away from its edges, before registration); between the ranges measured on simulated stacks
#: of one contrast and of a T1 against a T2 brain (benchmarks/contrast_agreement.py)
MIN_CONTRAST_AGREEMENT = 0.25
#: the grid step (mm, at least) on which that correlation is measured
CONTRAST_STEP_MM = 2.0

_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: rounds of slice-to-volume registration and joint steps with ``slice_motion``
SLICE_ROUNDS = 2
#: the least share of a slice's voxels above a tenth of its stack's peak for it to be registered on its own
SLICE_MIN_SIGNAL = 0.1
#: the share of voxels the rigid registration samples (at random, from a fixed seed) at each resolution: of a whole
#: stack (millions of voxels: 5 % registered as well as 50 % on simulated 4 mm stacks, in a third of the time), and
#: of one slice (a few thousand)
REGISTRATION_SAMPLING = 0.05
SLICE_REGISTRATION_SAMPLING = 0.5


@dataclass
class Stack:
    volume: Volume
    axis: int  # the slice axis
    thickness: float  # mm
    motion: np.ndarray  # 4x4 world RAS: where this stack's voxels imaged the anatomy, relative to their header

    @property
    def grid(self) -> Grid:
        """The stack's grid in the reference frame (its header's grid moved by its motion)."""
        return Grid(self.volume.array.shape, self.motion @ self.volume.affine)


def check_stacks(volumes: list[Volume], slice_thickness: float | None = None) -> list[Stack]:
    """Stacks from volumes: 2 to :data:`MAX_STACKS`, each with a thick axis, one modality; refuses in one line."""
    from .superres import MAX_THICKNESS_RATIO, slice_axis

    if len(volumes) > MAX_STACKS:
        raise MedILError(f"{len(volumes)} stacks given; at most {MAX_STACKS} are combined: choose the best {MAX_STACKS}")
    stacks = []
    for i, v in enumerate(volumes, start=1):
        name = v.meta.get("name") or f"stack {i}"
        v.grid.validate(name)
        axis = slice_axis(v.grid, None, what=name)
        thickness = float(slice_thickness or v.grid.spacing[axis])
        if not (np.isfinite(thickness) and 0 < thickness <= MAX_THICKNESS_RATIO * v.grid.spacing[axis]):
            raise MedILError(f"slice thickness {thickness:.4g} mm does not fit {name}'s slices", options=("slice_thickness",))
        stacks.append(Stack(v, axis, thickness, np.eye(4)))
    modalities = {s.volume.modality for s in stacks}
    if len(modalities) > 1:
        listed = ", ".join(f"{s.volume.meta.get('name') or f'stack {i + 1}'}: {s.volume.modality.upper()}" for i, s in enumerate(stacks))
        raise MedILError(
            f"the stacks are not all of one modality ({listed}); combine stacks of one modality and contrast "
            "(give --modality if the guess is wrong)",
            options=("modality",),
        )
    return stacks


def common_grid(stacks: list[Stack], spacing: float | None = None) -> Grid:
    """The default output grid: the stacks' common region (world RAS box), RAS-aligned, isotropic at their
    finest in-plane spacing (or ``spacing``); refuses stacks that do not overlap."""
    from ..geometry import affine_from_parts

    los, his = zip(*(s.grid.extent() for s in stacks))
    lo, hi = np.max(los, axis=0), np.min(his, axis=0)
    if np.any(hi - lo <= 0):
        boxes = "; ".join(f"{', '.join(f'{a:.0f}..{b:.0f}' for a, b in zip(*s.grid.extent()))}" for s in stacks)
        raise MedILError(f"the stacks do not overlap (their world RAS boxes in mm: {boxes}): give stacks of the same anatomy")
    step = float(spacing or min(float(np.delete(s.volume.grid.spacing, s.axis).min()) for s in stacks))
    shape = tuple(max(1, int(np.floor((h - l) / step + 1e-6))) for l, h in zip(lo, hi))  # noqa: E741
    origin = lo + step / 2
    return Grid(shape, affine_from_parts([step] * 3, np.eye(3), origin))


def contrast_agreement(stacks: list[Stack], ys: list[np.ndarray], target: Grid) -> list[float | None]:
    """For each stack after the first: the correlation of its intensities with the first stack's, both B-spline
    resampled onto ``target`` (at a step of at least :data:`CONTRAST_STEP_MM`), blurred to the thicker slice,
    inside the anatomy both see and away from its edges (None where too little is shared to tell). Stacks of
    one contrast correlate; a T1 and a T2 stack of the same brain anticorrelate (their tissues' order differs)."""
    from scipy.ndimage import binary_erosion, gaussian_filter

    from ..geometry import _respaced
    from ..intensity import foreground_mask
    from .interpolate import resample_sitk

    grid = _respaced(target, np.maximum(target.spacing, CONTRAST_STEP_MM))
    step = float(grid.spacing.mean())

    def seen(s: Stack, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a = resample_sitk(Volume(np.asarray(y, np.float32), s.grid.affine), grid, "bspline").array
        return a, inside_mask(s.grid, grid) & foreground_mask(a, s.volume.modality)

    ref, ref_mask = seen(stacks[0], ys[0])
    out: list[float | None] = []
    for s, y in zip(stacks[1:], ys[1:]):
        other, mask = seen(s, y)
        width = max(stacks[0].thickness, s.thickness) / step  # voxels
        both = binary_erosion(ref_mask & mask, iterations=max(1, int(round(width))))
        if both.sum() < 1000:
            out.append(None)
            continue
        a, b = (gaussian_filter(v, width / 2.355)[both] for v in (ref, other))
        r = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else None
        out.append(None if r is None or not np.isfinite(r) else r)
    return out


def _operators(stacks: list[Stack], target: Grid, profile: str, cache: bool = False) -> list[AcquisitionOperator]:
    """Each stack's acquisition from ``target`` (``cache``: keeping their sampling coordinates, for the joint steps)."""
    ops = []
    for s in stacks:
        thickness: list[float | None] = [None, None, None]
        thickness[s.axis] = s.thickness
        profiles = ["rect", "rect", "rect"]
        profiles[s.axis] = profile
        ops.append(AcquisitionOperator(s.grid, target, thickness, profiles, cache=cache))
    return ops


class SlabOperator:
    """One slice's acquisition from the slab of the output grid that its footprint reaches (with a margin): it reads
    and writes that slab only. The same operator as one built on the whole grid (its sampling points lie inside the
    slab), without a whole-volume adjoint per slice and step."""

    def __init__(self, stack: Stack, target: Grid, profile: str, cache: bool = False) -> None:
        reach = [1.0, 1.0, 1.0]  # voxels beyond each end of the slice that its footprint may reach
        reach[stack.axis] = max(1.0, stack.thickness / float(stack.grid.spacing[stack.axis]))
        lo, hi = _box(stack.grid, target, reach, 2.0)  # 2 voxels more: trilinear neighbours
        self.index = (slice(None), slice(None), *(slice(int(a), int(b)) for a, b in zip(lo, hi)))
        self.op = _operators([stack], target.sub_grid(lo, hi), profile, cache)[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x[self.index])

    def adjoint_into(self, out: torch.Tensor, y: torch.Tensor) -> None:
        """``out += A^T y``, on the slab."""
        out[self.index] += self.op.adjoint(y)


def _box(grid: Grid, target: Grid, reach, pad) -> tuple[np.ndarray, np.ndarray]:
    """The voxels of ``target`` (start, stop) that hold ``grid``'s box, widened by ``reach`` of ``grid``'s voxels at
    each end and by ``pad`` of ``target``'s (per axis or one number), clipped to ``target``."""
    ends = [(-r, n - 1 + r) for r, n in zip(np.broadcast_to(reach, 3), grid.shape)]
    corners = np.array([[i, j, k] for i in ends[0] for j in ends[1] for k in ends[2]], float)
    v = target.world_to_voxel(grid.voxel_to_world(corners))
    lo = np.clip(np.floor(v.min(axis=0) - pad), 0, target.shape).astype(int)
    hi = np.clip(np.ceil(v.max(axis=0) + pad) + 1, lo + 1, target.shape).astype(int)
    return lo, hi


def _adjoint_sum(ops: list, values, like: torch.Tensor) -> torch.Tensor:
    """``sum_k A_k^T v_k`` on ``like``'s grid (each operator adds its own part: a slice's, into its slab only)."""
    out = torch.zeros_like(like)
    for op, v in zip(ops, values):
        op.adjoint_into(out, v)
    return out


def coverage(stacks: list[Stack], target: Grid) -> np.ndarray:
    """How many stacks constrain each voxel of ``target`` (inside their extent, after their motion)."""
    count = np.zeros(target.shape, dtype=np.float32)
    for s in stacks:
        count += inside_mask(s.grid, target)
    return count


def _blur_along(x: np.ndarray, target: Grid, stack: Stack) -> np.ndarray:
    """``x`` averaged over ``stack``'s slice thickness along the output axis closest to its slice direction
    (the volume as that stack would see it, for registration): a box centred on each voxel, its partial
    end voxels weighted by how much of them it covers (an uncentred even-width box would shift it by
    half a voxel)."""
    from scipy.ndimage import convolve1d

    direction = stack.grid.direction[:, stack.axis]
    b = int(np.argmax(np.abs(target.direction.T @ direction)))
    width = stack.thickness / float(target.spacing[b])  # in voxels
    if width <= 1.0:
        return x
    half = int(np.ceil((width - 1) / 2 + 1e-9))
    offsets = np.arange(-half, half + 1, dtype=np.float64)
    kernel = np.clip((width / 2 + 0.5) - np.abs(offsets), 0.0, 1.0)  # overlap of [o - 1/2, o + 1/2] with the box
    return convolve1d(x, (kernel / kernel.sum()).astype(np.float32), axis=b, mode="nearest")


def register_rigid(
    fixed: Volume,
    moving: Volume,
    initial: np.ndarray | None = None,
    seed: int = 0,
    one_slice: bool = False,
) -> np.ndarray:
    """The rigid world RAS transform ``T`` (4x4) that maps points of ``fixed`` onto the same anatomy in
    ``moving`` (SimpleITK, correlation, three resolutions); ``initial``: a starting ``T``; ``one_slice``: ``fixed`` is a
    single slice (two resolutions, no smoothing: ITK cannot smooth across one voxel)."""
    import SimpleITK as sitk

    from ..io import to_sitk

    f = sitk.Cast(to_sitk(np.asarray(fixed.array, np.float32), fixed.affine), sitk.sitkFloat32)
    m = sitk.Cast(to_sitk(np.asarray(moving.array, np.float32), moving.affine), sitk.sitkFloat32)
    tx = sitk.Euler3DTransform()
    centre = fixed.grid.affine[:3, :3] @ ((np.array(fixed.array.shape) - 1) / 2.0) + fixed.grid.affine[:3, 3]
    tx.SetCenter(tuple(float(c) for c in (_LPS[:3, :3] @ centre)))
    if initial is not None:
        lps = _LPS @ initial @ _LPS
        tx.SetMatrix(tuple(float(v) for v in lps[:3, :3].ravel()))
        c = np.array(tx.GetCenter())
        tx.SetTranslation(tuple(float(v) for v in (lps[:3, :3] @ c + lps[:3, 3] - c)))
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsCorrelation()  # stacks of one contrast
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(SLICE_REGISTRATION_SAMPLING if one_slice else REGISTRATION_SAMPLING, seed)
    # the moving image's gradient at the sampled points only, not a gradient image of the whole volume per level
    # (measured on a head's 4 mm stacks, one core: a stack 17 s -> 7 s, a slice 7 s -> 0.6 s, the same motion)
    reg.SetMetricUseMovingImageGradientFilter(False)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=200, relaxationFactor=0.6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([2, 1] if one_slice else [4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([0.0, 0.0] if one_slice else [2.0, 1.0, 0.0])
    reg.SetSmoothingSigmasAreSpecifiedInPhysicalUnits(True)
    reg.SetInitialTransform(tx, inPlace=True)
    reg.Execute(f, m)
    lps = np.eye(4)
    lps[:3, :3] = np.array(tx.GetMatrix()).reshape(3, 3)
    c = np.array(tx.GetCenter())
    lps[:3, 3] = np.array(tx.GetTranslation()) + c - lps[:3, :3] @ c
    return _LPS @ lps @ _LPS


def slices_of(stack: Stack, y: np.ndarray) -> list[tuple[Stack, np.ndarray]]:
    """Each slice of ``stack`` as a stack of its own (same motion, to start with) with its voxels."""
    out = []
    for i in range(stack.volume.array.shape[stack.axis]):
        start, stop = [0, 0, 0], list(stack.volume.array.shape)
        start[stack.axis], stop[stack.axis] = i, i + 1
        grid = stack.volume.grid.sub_grid(start, stop)
        part = np.take(y, [i], axis=stack.axis)
        out.append(
            (Stack(Volume(part, grid.affine, modality=stack.volume.modality), stack.axis, stack.thickness, stack.motion.copy()), part)
        )
    return out


#: how far around a slice (mm) the volume is read when the slice is registered and matched to it
SLICE_SLAB_MM = 20.0


def _around(seen: Volume, s: Stack, margin_mm: float = SLICE_SLAB_MM) -> Volume:
    """The part of ``seen`` within ``margin_mm`` of the box of ``s`` (one slice, at its motion): what registering
    and matching that slice read, rather than the whole volume each time."""
    lo, hi = _box(s.grid, seen.grid, 0.0, margin_mm / seen.grid.spacing)
    if np.any(hi - lo < 2):
        return seen
    part = np.ascontiguousarray(seen.array[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]])
    return Volume(part, seen.grid.sub_grid(lo, hi).affine, modality=seen.modality)


def register_slices(
    stack: Stack, y: np.ndarray, seen: Volume, seed: int = 0, start: list[np.ndarray] | None = None
) -> tuple[list[tuple[Stack, np.ndarray]], int]:
    """Slice-to-volume registration: each slice of ``stack`` (voxels ``y``) registered on its own to ``seen`` (the
    volume as this stack sees it), from the stack's motion (or ``start``: each slice's from an earlier round).
    A slice keeps its new motion only where it matches ``seen`` better (correlation) than with the one it
    started from; slices with too little signal keep that.
    Returns the slices as stacks and how many moved."""
    from .interpolate import resample_sitk

    def match(s: Stack, part: np.ndarray, near: Volume) -> float:
        a = resample_sitk(near, s.grid, "trilinear").array.ravel()
        b = part.ravel()
        return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else -1.0

    out, moved = [], 0
    peak = float(np.abs(y).max()) or 1.0
    for i, (s, part) in enumerate(slices_of(stack, y)):
        if start is not None:
            s.motion = np.asarray(start[i], dtype=np.float64)
        if float((np.abs(part) > 0.1 * peak).mean()) >= SLICE_MIN_SIGNAL:
            near = _around(seen, s)
            before = match(s, part, near)
            try:
                found = register_rigid(s.volume, near, initial=s.motion, seed=seed + i, one_slice=True)
            except RuntimeError:  # ITK gives up on a slice (too small, or too little overlap): it keeps its motion
                found = None
            candidate = None if found is None else Stack(s.volume, s.axis, s.thickness, found)
            if candidate is not None and match(candidate, part, near) > before:
                s, moved = candidate, moved + 1
        out.append((s, part))
    return out, moved


def motion_summary(motion: np.ndarray) -> dict:
    """A rigid transform as translation (mm) and rotation angle (degrees), with its matrix."""
    angle = float(np.degrees(np.arccos(np.clip((np.trace(motion[:3, :3]) - 1) / 2, -1, 1))))
    return {
        "translation_mm": np.round(motion[:3, 3], 3).tolist(),
        "rotation_deg": round(angle, 3),
        "matrix_ras": np.round(motion, 6).tolist(),
    }


def footprint_inside(stack: Stack, target: Grid) -> np.ndarray:
    """Which of ``stack``'s voxels see only the output grid: centre at least half a slice thickness inside its
    extent (a voxel that reads beyond it would be matched against the grid's clamped border)."""
    from ..geometry import voxel_map

    m = voxel_map(target, stack.grid)
    margin = 0.5 * stack.thickness / float(target.spacing.min())
    ranges = [np.arange(n, dtype=np.float64) for n in stack.grid.shape]
    inside = np.ones(stack.grid.shape, dtype=bool)
    for a in range(3):
        coord = (m[a, 0] * ranges[0])[:, None, None] + (m[a, 1] * ranges[1])[None, :, None] + (m[a, 2] * ranges[2])[None, None, :] + m[a, 3]
        inside &= (coord >= -0.5 + margin) & (coord <= target.shape[a] - 0.5 - margin)
    return inside


def noise_level(y: np.ndarray, axis: int) -> float:
    """The noise standard deviation of a stack relative to its largest magnitude, estimated in-plane slice by
    slice (Immerkaer's Laplacian-difference estimator, the median over slices)."""
    from scipy.ndimage import convolve

    kernel = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)
    planes = np.moveaxis(np.asarray(y, np.float32), axis, 0)
    values = [float(np.abs(convolve(p, kernel, mode="reflect"))[1:-1, 1:-1].mean()) for p in planes if min(p.shape) > 2]
    sigma = np.sqrt(np.pi / 2) / 6 * float(np.median(values)) if values else 0.0
    return sigma / (float(np.abs(y).max()) or 1.0)


def _smoothness(x: torch.Tensor) -> torch.Tensor:
    """``D^T D x``: the gradient of half the squared first differences along the three axes (Neumann borders)."""
    out = torch.zeros_like(x)
    for d in (2, 3, 4):
        g = torch.diff(x, dim=d)
        lo = [slice(None)] * 5
        hi = [slice(None)] * 5
        lo[d], hi[d] = slice(0, -1), slice(1, None)
        out[tuple(lo)] -= g
        out[tuple(hi)] += g
    return out


def _sirt(x, ys, ops, weights, steps: int, alpha: float, cancel, progress, span) -> tuple[torch.Tensor, list[float]]:
    """Preconditioned gradient steps on ``sum_k ||W_k (A_k x - y_k)||^2 + alpha ||D x||^2`` over the voxels
    ``weights`` keeps (rows of ``A`` sum to 1; 12 bounds ``D^T D``'s rows)."""
    with torch.no_grad():
        precond = (_adjoint_sum(ops, weights, x) + 12.0 * alpha).clamp_min(1e-6)
        for k in range(steps):
            check_cancel(cancel)
            report(progress, span[0] + (span[1] - span[0]) * k / max(steps, 1), f"joint data consistency {k + 1}/{steps}")
            step = _adjoint_sum(ops, (w * (y - op(x)) for op, y, w in zip(ops, ys, weights)), x)
            if alpha:
                step = step - alpha * _smoothness(x)
            x = x + step / precond
        residuals = [
            float((w * (y - op(x))).pow(2).sum().div(w.sum().clamp_min(1)).sqrt()) / (float(y.abs().max()) or 1.0)
            for op, y, w in zip(ops, ys, weights)
        ]
    return x, residuals


def learned_start(
    stacks: list[Stack],
    arrays: list[np.ndarray],
    target: Grid,
    profile: str,
    time_budget_min: float,
    samples: int,
    seed: int,
    progress,
    span: tuple[float, float],
    cancel,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[np.ndarray, np.ndarray | None, list[dict]]:
    """``adapt`` on several stacks: for each seed, one network (from the bundled prior) trained on every stack's
    in-plane slices degraded as that stack's slices were acquired, applied to each stack through-plane (on its
    own grid refined along its slice axis to the output's step, in the reference frame), the results put on
    ``target`` (B-spline) and averaged where each stack holds data. Returns the mean over seeds (normalised
    intensities), their standard deviation (None for one seed) and each network's training record."""
    from .adapt import apply_adapter, refined_along, starting_weights, train_adapter
    from .interpolate import resample_sitk

    prior = starting_weights(stacks[0].volume.modality, time_budget_min)
    sources = [(a, s.volume.grid, s.axis, s.thickness) for a, s in zip(arrays, stacks)]
    inside = [inside_mask(s.grid, target).astype(np.float32) for s in stacks]
    weight = np.maximum(sum(inside), 1.0)
    step = float(target.spacing.min())
    seconds = time_budget_min * 60 * 0.8 / samples
    estimates, runs = [], []
    for k in range(samples):
        lo = span[0] + (span[1] - span[0]) * k / samples
        mid = lo + 0.7 * (span[1] - span[0]) / samples
        net, info = train_adapter(
            sources, profile, seconds, seed + k, progress, (lo, mid), cancel, prior,
            max_steps=0 if time_budget_min == 0 else None, device=device, dtype=dtype,
        )  # fmt: skip
        report(progress, mid, "applying the adapted network to each stack through-plane")
        acc = np.zeros(target.shape, np.float32)
        for s, a, w in zip(stacks, arrays, inside):
            factor = max(2, int(round(float(s.grid.spacing[s.axis]) / step)))
            fine = refined_along(s.grid, s.axis, factor)
            # no mirror images and one orientation: the stacks' average, in their different orientations, does their
            # work (measured on three 4 mm stacks of a head: the same PSNR to 0.01 dB; mirrors a quarter of the time,
            # one orientation 22 s less of 120)
            est = apply_adapter(net, a, s.grid, fine, s.axis, cancel, device=device, dtype=dtype, mirrors=1, orientations=1)
            acc += resample_sitk(Volume(est, fine.affine), target, "bspline").array * w
        estimates.append(acc / weight)
        runs.append(info)
    stack = np.stack(estimates)
    return stack.mean(axis=0), (stack.std(axis=0) if samples > 1 else None), runs


@dataclass(frozen=True)
class MultistackOptions:
    """Every option of multi-stack super-resolution (see :func:`multistack_superres`)."""

    rounds: int = 1  # a second round (registration to the first's volume) measured no better on simulated 4 and 6 mm stacks
    slice_thickness: float | None = None
    slice_profile: str = "rect"
    register: bool = True
    motions: list | None = None  # each stack's known motion (4x4 world RAS)
    max_memory_gb: float | None = None
    device: str | torch.device = "auto"
    background: float | None = None
    method: str = "fast"
    time_budget_min: float | None = None  # adapt; None: methods.default_time_budget
    samples: int = 1
    seed: int = 0
    precision: str = "auto"
    slice_motion: bool = False

    def checked(self, stacks: int) -> MultistackOptions:
        from ..methods import MULTISTACK_METHODS, check_sampling, default_time_budget

        if stacks < 2:
            raise MedILError("multi-stack super-resolution takes at least two stacks")
        if int(self.rounds) < 1 or int(self.rounds) > 20:
            raise MedILError(f"rounds of registration and reconstruction must be 1 to 20, not {self.rounds}", options=("iterations",))
        if self.method not in MULTISTACK_METHODS:
            raise MedILError(
                f"several stacks are combined by the {' or '.join(MULTISTACK_METHODS)} method, not {self.method!r}", options=("method",)
            )
        budget = default_time_budget(self.method, stacks, self.samples) if self.time_budget_min is None else self.time_budget_min
        check_sampling(self.method, self.samples, budget)
        return replace(self, time_budget_min=budget)


@dataclass
class JointProblem:
    """The stacks, the output grid and what the joint steps work with (normalised voxels on the host and the device)."""

    stacks: list[Stack]
    target: Grid
    options: MultistackOptions
    norms: list
    host: list[np.ndarray]
    ys: list[torch.Tensor]
    device: torch.device
    dtype: torch.dtype  # adapt's network
    memory: object
    agreement: list
    progress: Progress | None = None
    cancel: object = None
    cache: bool = False  # the operators keep their sampling coordinates (they fit the memory plan)

    def interpolants(self) -> np.ndarray:
        """The stacks' B-spline interpolants on the target, averaged where each lies."""
        from .interpolate import resample_sitk

        acc = np.zeros(self.target.shape, np.float32)
        weight = np.zeros(self.target.shape, np.float32)
        for s, a in zip(self.stacks, self.host):
            inside = inside_mask(s.grid, self.target).astype(np.float32)
            acc += resample_sitk(Volume(a, s.grid.affine), self.target, "bspline").array * inside
            weight += inside
        return acc / np.maximum(weight, 1.0)


def multistack_superres(
    volumes: list[Volume],
    target: Grid | None = None,
    options: MultistackOptions | None = None,
    *,
    progress: Progress | None = None,
    cancel=None,
    **overrides,
) -> Volume:
    """Super-resolve several stacks into one volume on ``target`` (default: :func:`common_grid`) with ``options`` (a
    :class:`MultistackOptions`; keyword ``overrides`` replace its fields).

    ``motions``: each stack's known motion (4x4 world RAS), kept as they are when ``register`` is False.
    ``method``: ``fast`` starts the last round's joint steps from the registered stacks' B-spline mean;
    ``adapt`` from their learned upsampling (:func:`learned_start`): one network, from the bundled prior, trained
    for ``time_budget_min`` minutes on every stack's sharp in-plane slices (0: the prior alone), applied to each
    stack through-plane. With ``samples`` > 1 each seed trains its own network, the output starts from their
    mean and ``extras["uncertainty"]`` is their per-voxel standard deviation. ``slice_motion``: then every slice
    is registered on its own to the volume (:func:`register_slices`: a patient who moved during a stack) and
    the joint steps run again with each slice's own motion.
    Returns the volume (in the first stack's intensity units, background outside every stack) with
    ``meta``: each stack's motion (``motions``) and the per-stack relative residuals, and ``extras["coverage"]``:
    a :class:`Volume` counting the stacks that constrain each voxel.
    """
    opts = replace(options or MultistackOptions(), **overrides).checked(len(volumes or []))
    t0 = time.perf_counter()
    jp = _joint_problem(volumes, target, opts, progress, cancel)
    noise = [noise_level(a, s.axis) for s, a in zip(jp.stacks, jp.host)]
    alpha = SMOOTHNESS_PER_NOISE * float(np.mean(noise))
    x, residuals, std, runs = _joint_rounds(jp, alpha)
    slice_moves = None
    if opts.slice_motion:
        x, residuals, slice_moves = _slice_motion_rounds(jp, x, alpha)
    report(progress, 1.0, "done")
    return _finished(
        jp, x, std, {"residuals": residuals, "noise": noise, "alpha": alpha, "runs": runs, "slice_moves": slice_moves, "t0": t0}
    )


def _joint_problem(volumes: list[Volume], target: Grid | None, opts: MultistackOptions, progress, cancel) -> JointProblem:
    """The checked stacks and output grid, the memory plan, the stacks' normalised voxels; stacks of different
    contrasts refused."""
    from ..intensity import fit_normalizer
    from .memory import MemoryPlan

    stacks = check_stacks(volumes, opts.slice_thickness)
    if opts.motions is not None:  # known motions (e.g. from an earlier registration): the starting point, or fixed without `register`
        for s, m in zip(stacks, opts.motions):
            s.motion = np.asarray(m, dtype=np.float64)
    target = (target or common_grid(stacks)).validate("the output grid")
    memory = MemoryPlan.start(opts.max_memory_gb, spill_allowed=False)
    # the volume, its step, the preconditioner and a copy; the stacks' interpolants; adapt: each seed's estimate,
    # their sum, one stack's refined estimate and its resampling
    memory.hold("volumes", (4 + len(stacks) + (opts.samples + 3 if opts.method == "adapt" else 0)) * 4.0 * target.num_voxels)
    memory.hold("stacks", sum(8.0 * s.volume.array.size for s in stacks))
    work = memory.working_bytes(f"the volumes of a {len(stacks)}-stack reconstruction onto {target.shape} alone")
    # the joint steps apply each stack's operator a dozen times a round: its sampling coordinates are kept where they fit
    coordinates = sum(op.cache_bytes() for op in _operators(stacks, target, opts.slice_profile))
    cache = coordinates <= CACHE_SHARE * work
    if cache:
        memory.hold("sampling coordinates", coordinates)
    dev = resolve_device(opts.device)
    norms = [fit_normalizer(np.asarray(s.volume.array, np.float32), s.volume.modality) for s in stacks]
    for s, n in zip(stacks, norms):  # an unknown modality as the normaliser guessed it (adapt's starting weights follow it)
        if s.volume.modality != n.modality:
            s.volume = replace(s.volume, modality=n.modality)
    # each stack's normalised voxels: on the host (registration, interpolants) and on the device (the joint steps)
    host = [np.ascontiguousarray(n.forward(np.asarray(s.volume.array, np.float32))) for n, s in zip(norms, stacks)]
    ys = [torch.from_numpy(a)[None, None].to(dev) for a in host]
    net_dtype = resolve_precision(opts.precision, dev, iterative=True)  # adapt's network
    report(progress, 0.0, "comparing the stacks' contrast")
    agreement = contrast_agreement(stacks, host, target)
    for k, r in enumerate(agreement, start=2):
        if r is not None and r < MIN_CONTRAST_AGREEMENT:
            name = stacks[k - 1].volume.meta.get("name") or f"stack {k}"
            first = stacks[0].volume.meta.get("name") or "stack 1"
            raise MedILError(
                f"{name} does not look like the same contrast as {first} (their intensities correlate {r:.2f} inside the "
                f"anatomy; stacks of one contrast give {MIN_CONTRAST_AGREEMENT:g} or more): combine stacks of one contrast "
                "(e.g. all T2-weighted); no volume can agree with stacks of different contrasts"
            )
    return JointProblem(stacks, target, opts, norms, host, ys, dev, net_dtype, memory, agreement, progress, cancel, cache)


def _joint_rounds(jp: JointProblem, alpha: float):
    """The rounds of registration (each stack to the volume) and joint steps; adapt's last round starts from the
    stacks' learned upsampling. Returns the volume (device tensor), the per-stack residuals, adapt's spread and runs."""
    from .interpolate import resample_sitk

    opts, stacks, target, progress, cancel = jp.options, jp.stacks, jp.target, jp.progress, jp.cancel
    rounds = int(opts.rounds)
    report(progress, 0.02, "B-spline interpolants")
    # the first round registers every stack to the reference stack's own interpolant (the mean of
    # unregistered stacks would blur the very misalignment being measured); later rounds, to the volume
    reference = resample_sitk(Volume(jp.ys[0][0, 0].cpu().numpy(), stacks[0].grid.affine), target, "bspline").array
    registers = opts.register and len(stacks) > 1
    x = None if registers else torch.from_numpy(jp.interpolants())[None, None].to(jp.device)  # else: after registering
    residuals: list[float] = []
    std, runs = None, []
    share = 0.7 if opts.slice_motion else 0.9  # of the progress bar, for the rounds (the rest: per-slice motion)
    for r in range(rounds):
        span = (0.05 + share * r / rounds, 0.05 + share * (r + 1) / rounds)
        if registers:
            current = Volume(reference if r == 0 else x[0, 0].cpu().numpy(), target.affine)
            for k, (s, a) in enumerate(zip(stacks, jp.host)):
                check_cancel(cancel)
                if k == 0:
                    continue  # the first stack is the reference frame
                report(progress, span[0], f"registering stack {k + 1}/{len(stacks)} (round {r + 1}/{rounds})")
                # the reference stack's interpolant is already blurred along its own slices; the volume is sharp
                seen = current if r == 0 else Volume(_blur_along(current.array, target, s), target.affine)
                s.motion = register_rigid(Volume(a, s.volume.affine), seen, initial=s.motion, seed=k)
            x = torch.from_numpy(jp.interpolants())[None, None].to(jp.device)  # each round starts from its registered stacks
        if opts.method == "adapt" and r == rounds - 1:  # the last round starts from the stacks' learned upsampling
            start, std, runs = learned_start(
                stacks, jp.host, target, opts.slice_profile, opts.time_budget_min, opts.samples, opts.seed, progress,
                (span[0], span[0] + 0.3 * (span[1] - span[0])), cancel, jp.device, jp.dtype,
            )  # fmt: skip
            x = torch.from_numpy(start)[None, None].to(jp.device)
        ops = _operators(stacks, target, opts.slice_profile, jp.cache)
        weights = [torch.from_numpy(footprint_inside(s, target).astype(np.float32))[None, None].to(jp.device) for s in stacks]
        x, residuals = _sirt(
            x, jp.ys, ops, weights, STEPS_PER_ROUND, alpha, cancel, progress, (span[0] + 0.3 * (span[1] - span[0]), span[1])
        )
    return x, residuals, std, runs


def _slice_motion_rounds(jp: JointProblem, x: torch.Tensor, alpha: float):
    """Every slice registered on its own to the volume, and the joint steps again with each slice's motion."""
    stacks, target, progress, cancel = jp.stacks, jp.target, jp.progress, jp.cancel
    slice_moves, previous, residuals = None, {}, []
    for r in range(SLICE_ROUNDS):
        current = x[0, 0].cpu().numpy()
        pieces, slice_moves = [], []
        lo, hi = 0.75 + 0.23 * r / SLICE_ROUNDS, 0.75 + 0.23 * (r + 1) / SLICE_ROUNDS
        for k, (s, a) in enumerate(zip(stacks, jp.host)):
            check_cancel(cancel)
            report(
                progress, lo + 0.7 * (hi - lo) * k / len(stacks), f"registering each slice of stack {k + 1}/{len(stacks)} (round {r + 1})"
            )
            seen = Volume(_blur_along(current, target, s), target.affine)
            parts, moved = register_slices(s, a, seen, seed=1000 * k, start=previous.get(k))
            previous[k] = [p.motion for p, _ in parts]
            rel = [np.linalg.inv(s.motion) @ p.motion for p, _ in parts]
            slice_moves.append(
                {
                    "slices": len(parts),
                    "moved": moved,
                    "max_rotation_deg": round(max(motion_summary(m)["rotation_deg"] for m in rel), 3),
                    "max_translation_mm": round(max(float(np.linalg.norm(m[:3, 3])) for m in rel), 3),
                    "per_slice": [motion_summary(m) | {"slice": i} for i, m in enumerate(rel) if not np.allclose(m, np.eye(4))],
                }
            )
            pieces += [(p, part, k) for p, part in parts]
        ops = [SlabOperator(p, target, jp.options.slice_profile, jp.cache) for p, _, _ in pieces]
        weights = [torch.from_numpy(footprint_inside(p, target).astype(np.float32))[None, None].to(jp.device) for p, _, _ in pieces]
        parts_y = [torch.from_numpy(np.ascontiguousarray(part))[None, None].to(jp.device) for _, part, _ in pieces]
        x, per_slice = _sirt(x, parts_y, ops, weights, STEPS_PER_ROUND, alpha, cancel, progress, (lo + 0.7 * (hi - lo), hi))
        owners = np.array([k for _, _, k in pieces])
        residuals = [float(np.sqrt(np.mean(np.square(np.array(per_slice)[owners == k])))) for k in range(len(stacks))]
    return x, residuals, slice_moves


def _finished(jp: JointProblem, x: torch.Tensor, std, run: dict) -> Volume:
    """The volume in the first stack's intensities, background outside every stack, with its metadata and maps."""
    from ..intensity import background_value, floored, physical_floor

    opts, stacks, target = jp.options, jp.stacks, jp.target
    count = coverage(stacks, target)
    ref = jp.norms[0]
    fill = background_value(ref.modality, opts.background)
    out = ref.inverse(x[0, 0].cpu().numpy()).astype(np.float32)
    out = np.where(count > 0, floored(out, physical_floor(stacks[0].volume.array, ref.modality)), np.float32(fill))
    meta = {
        "method": "multistack" if opts.method == "fast" else "multistack-adapt",
        "stacks": len(stacks),
        "slice_axes": [s.axis for s in stacks],
        "slice_thickness_mm": [round(s.thickness, 4) for s in stacks],
        "motions": [motion_summary(s.motion) for s in stacks],
        "residuals": [round(v, 6) for v in run["residuals"]],
        "noise": [round(v, 5) for v in run["noise"]],
        "contrast_agreement": [None if r is None else round(r, 3) for r in jp.agreement],
        "smoothness": round(run["alpha"], 5),
        "rounds": int(opts.rounds),
        **({"slice_motion": run["slice_moves"]} if run["slice_moves"] is not None else {}),
        "seconds": round(time.perf_counter() - run["t0"], 2),
        "memory": jp.memory.summary(),
        "device": str(jp.device),
        "background": fill,
    }
    if opts.method == "adapt":
        meta.update(
            samples=opts.samples,
            seed=opts.seed,
            time_budget_min=opts.time_budget_min,
            adaptation=run["runs"],
            precision=str(jp.dtype).replace("torch.", ""),
        )
        prior = prior_ref(ref.modality)
        meta["models"] = [prior] if prior else []
    extras = {"coverage": Volume(count, target.affine, modality=ref.modality)}
    if std is not None:
        extras["uncertainty"] = Volume(np.where(count > 0, std * ref.scale, 0).astype(np.float32), target.affine, modality=ref.modality)
    return Volume(out, target.affine, modality=ref.modality, meta=meta, extras=extras)


__all__ = [
    "MAX_STACKS",
    "MultistackOptions",
    "Stack",
    "check_stacks",
    "common_grid",
    "contrast_agreement",
    "coverage",
    "learned_start",
    "motion_summary",
    "multistack_superres",
    "register_rigid",
    "register_slices",
]
