"""Evaluate models against classical resampling on real volumes.

Tasks, for each volume (taken as the ground truth on its native grid):

- ``recon``: the volume itself in, its native grid out;
- ``sr{T}mm``: thick slices of T mm simulated along the volume's finest axis (rect profile),
  super-resolved back onto the native grid.

Methods: each given model (through :func:`~medil_backend.ops.reconstruct.reconstruct`) and the
SimpleITK trilinear and B-spline baselines on the same input. Metrics (L1, PSNR, SSIM inside
the foreground mask and over the whole volume, MS-SSIM) are computed on intensities normalised
as in training (the ground truth's normaliser).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .acquisition import thick_slices
from .baselines import resample_sitk
from .geometry import Volume, inside_mask
from .intensity import fit_normalizer
from .io import read_volume
from .methods import METHOD_FACTS
from .metrics import foreground_mask, l1, ms_ssim, psnr, ssim
from .ops import run_model


def degraded_inputs(volume: Volume, thick_mm: Sequence[float]) -> dict[str, Volume]:
    sp = volume.grid.spacing
    axis = int(np.flatnonzero(sp == sp.min())[-1])
    inputs = {"recon": volume}
    for t in thick_mm:
        factor = max(2, int(round(t / sp[axis])))
        arr, grid = thick_slices(volume.array.astype(np.float32), volume.grid, axis, factor, "rect")
        inputs[f"sr{t:g}mm"] = Volume(arr, grid.affine, modality=volume.modality)
    return inputs


def score(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    return {
        "psnr_mask": psnr(pred, ref, mask),
        "ssim_mask": ssim(pred, ref, mask),
        "l1_mask": l1(pred, ref, mask),
        "psnr": psnr(pred, ref),
        "ssim": ssim(pred, ref),
        "ms_ssim": ms_ssim(pred, ref),
        "l1": l1(pred, ref),
    }


def evaluate(
    paths: Sequence[str | Path],
    models: dict[str, object],
    thick_mm: Sequence[float] = (4.0, 8.0),
    modality: str = "auto",
    device: str = "auto",
    baselines: Sequence[str] = ("trilinear", "bspline"),
    max_memory_gb: float | None = None,
    superres_methods: Sequence[str] = (),
    superres_samples: int = 1,
    superres_time_budget_min: float = 3.0,
    superres_model: str | None = None,
) -> dict:
    """Metrics per volume, task and method, plus their means over volumes.

    ``superres_methods`` (``fast``, ``adapt``) are scored on the thick-slice tasks as
    ``superres-METHOD``; ``adapt`` with ``superres_samples`` > 1 also scores its uncertainty map
    (:func:`uncertainty_calibration`).
    """
    per_volume: dict[str, dict] = {}
    for path in paths:
        hr = read_volume(path)
        norm = fit_normalizer(hr.array, modality)
        hr.modality = norm.modality
        ref = norm.forward(hr.array)
        head = foreground_mask(ref, norm.modality)
        rows: dict[str, dict] = {}
        for task, inp in degraded_inputs(hr, thick_mm).items():
            rows[task] = {}
            # scored where the input reaches: the thick slices leave out a last partial slab, which every method
            # fills by its own rule (super-resolution: background, as outside any input; SimpleITK: the nearest slab)
            mask = head & inside_mask(inp.grid, hr.grid)
            for name, net in models.items():
                t0 = time.perf_counter()
                out = run_model(inp, hr.grid, net, device=device, modality=norm.modality, max_memory_gb=max_memory_gb)
                rows[task][name] = score(norm.forward(out.array), ref, mask) | {"seconds": time.perf_counter() - t0}
            for method in baselines:
                t0 = time.perf_counter()
                out = resample_sitk(inp, hr.grid, method)
                rows[task][method] = score(norm.forward(out.array), ref, mask) | {"seconds": time.perf_counter() - t0}
            for method in superres_methods if task != "recon" else ():
                from .ops.superres import superres

                t0 = time.perf_counter()
                k = superres_samples if method != "fast" else 1
                generative = {"model": superres_model} if superres_model and METHOD_FACTS[method].uses_model else {}
                out = superres(
                    inp,
                    hr.grid,
                    method=method,
                    samples=k,
                    time_budget_min=superres_time_budget_min,
                    max_memory_gb=max_memory_gb,
                    **generative,
                )
                pred = norm.forward(out.array)
                row = score(pred, ref, mask) | {"seconds": time.perf_counter() - t0}
                if "uncertainty" in out.extras:
                    std = out.extras["uncertainty"].array / norm.scale
                    row["uncertainty_error_r"] = uncertainty_calibration(std, np.abs(pred - ref), mask, hr.grid.spacing)
                rows[task][f"superres-{method}"] = row
        per_volume[Path(path).name] = rows
    mean: dict[str, dict] = {}
    for rows in per_volume.values():
        for task, methods in rows.items():
            for method, m in methods.items():
                acc = mean.setdefault(task, {}).setdefault(method, {})
                for k, v in m.items():
                    acc.setdefault(k, []).append(v)
    mean = {t: {m: {k: float(np.mean(v)) for k, v in d.items()} for m, d in ms.items()} for t, ms in mean.items()}
    out = {"volumes": per_volume, "mean": mean, "thick_mm": list(thick_mm)}
    if superres_methods:
        out.update(superres_samples=superres_samples, superres_time_budget_min=superres_time_budget_min)
        if superres_model:
            out["superres_model"] = superres_model
    return out


def markdown_table(result: dict, keys: Sequence[str] = ("psnr_mask", "ssim_mask", "psnr", "ms_ssim"), volume: str | None = None) -> str:
    """The mean table (or one volume's, by file name) as Markdown."""
    rows = result["mean"] if volume is None else result["volumes"][volume]
    lines = ["| task | method | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for task, methods in rows.items():
        for method, m in methods.items():
            lines.append(f"| {task} | {method} | " + " | ".join(f"{m[k]:.3f}" if "ssim" in k else f"{m[k]:.2f}" for k in keys) + " |")
    return "\n".join(lines)


#: The training issue's targets: reconstruction PSNR inside the mask, and super-resolution gain over B-spline.
RECON_TARGET_DB = 32.0
SR_GAIN_TARGET_DB = 3.0


def target_table(result: dict, models: Sequence[str]) -> str:
    """Markdown: for each model, the mean masked PSNR of reconstruction and each SR task's gain over
    B-spline, against the targets (reached / missed)."""
    mean = result["mean"]
    sr_tasks = [t for t in mean if t.startswith("sr")]
    head = (
        f"| model | recon psnr_mask (target >= {RECON_TARGET_DB:g}) | "
        + " | ".join(f"{t} gain over B-spline (target >= {SR_GAIN_TARGET_DB:g})" for t in sr_tasks)
        + " |"
    )
    lines = [head, "|---|---|" + "---|" * len(sr_tasks)]
    for name in models:
        rec = mean["recon"][name]["psnr_mask"]
        cells = [f"{rec:.2f} dB ({'reached' if rec >= RECON_TARGET_DB else 'missed'})"]
        for t in sr_tasks:
            gain = mean[t][name]["psnr_mask"] - mean[t]["bspline"]["psnr_mask"]
            cells.append(f"{gain:+.2f} dB ({'reached' if gain >= SR_GAIN_TARGET_DB else 'missed'})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: the super-resolution issue's targets: mean gain over B-spline (dB) per simulated slice thickness
SUPERRES_TARGETS_DB = {4.0: 1.0, 8.0: 0.5}


def uncertainty_calibration(std: np.ndarray, abs_error: np.ndarray, mask: np.ndarray, spacing, window_mm: float = 5.0) -> float:
    """Pearson correlation, inside ``mask``, between the uncertainty map and the absolute error, each
    averaged over a ~``window_mm`` box (a map is useful if it is high where errors are large)."""
    from scipy.ndimage import uniform_filter

    size = [max(1, int(round(window_mm / s))) for s in spacing]
    a = uniform_filter(np.asarray(std, dtype=np.float64), size)[mask]
    b = uniform_filter(np.asarray(abs_error, dtype=np.float64), size)[mask]
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def superres_table(result: dict, methods: Sequence[str]) -> str:
    """Markdown: each super-resolution method's masked-PSNR gain over B-spline per thick-slice task,
    the mean against its target and the worst volume (the target: never below B-spline)."""
    tasks = [t for t in result["mean"] if t.startswith("sr")]
    lines = ["| method | " + " | ".join(f"{t} mean gain (target) | {t} worst volume" for t in tasks) + " |"]
    lines.append("|---|" + "---|---|" * len(tasks))
    for m in methods:
        key = f"superres-{m}"
        cells = []
        for t in tasks:
            gains = [rows[t][key]["psnr_mask"] - rows[t]["bspline"]["psnr_mask"] for rows in result["volumes"].values()]
            target = SUPERRES_TARGETS_DB.get(float(t[2:-2]), 1.0)
            mean = float(np.mean(gains))
            cells += [f"{mean:+.2f} dB (>= {target:+g}: {'reached' if mean >= target else 'missed'})", f"{min(gains):+.2f} dB"]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    rs = {
        t: [
            rows[t][f"superres-{m}"]["uncertainty_error_r"]
            for rows in result["volumes"].values()
            for m in methods
            if "uncertainty_error_r" in rows[t].get(f"superres-{m}", {})
        ]
        for t in tasks
    }
    if any(rs.values()):
        lines.append("")
        lines.append("| uncertainty vs error (Pearson r, 5 mm boxes; target >= 0.4) | " + " | ".join(tasks) + " |")
        lines.append("|---|" + "---|" * len(tasks))
        lines.append("| mean over volumes | " + " | ".join(f"{np.mean(rs[t]):.2f}" if rs[t] else "-" for t in tasks) + " |")
    return "\n".join(lines)


def record_in_card(card_path: Path, result: dict, model: str, command: str) -> None:
    """Write a model's held-out metrics (mean and per volume, next to trilinear and B-spline) into its card.

    Only the card changes; the weights and their sha256 stay as they are."""
    card = json.loads(Path(card_path).read_text())

    def pick(rows: dict) -> dict:
        return {task: {m: rows[task][m] for m in (model, "trilinear", "bspline") if m in rows[task]} for task in rows}

    card.setdefault("metrics", {})["held_out"] = {
        "command": command,
        "thick_mm": result["thick_mm"],
        "mean": pick(result["mean"]),
        "volumes": {name: pick(rows) for name, rows in result["volumes"].items()},
    }
    tmp = Path(card_path).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    tmp.replace(card_path)


def to_json(result: dict) -> str:
    return json.dumps(result, indent=2, sort_keys=True)
