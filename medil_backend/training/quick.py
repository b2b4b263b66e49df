"""A short plain-PyTorch training run: native-resolution patches, optional thick-slice inputs, L1.

This is the recipe of the bundled bootstrap model (``medil-mri-quick``): small enough to train
on two CPU cores in well under an hour. It reads a JSON config (see
``training/configs/medil-mri-quick.json``) and writes safetensors + model card.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from ..intensity import fit_normalizer
from ..io import read_volume
from ..models import export_model, sha256_file
from ..nn.autoencoder import MedILAutoencoder, MedILConfig
from .degrade import add_noise, thick_slices
from .patches import input_shape_for, sample_patch


def load_training_volumes(paths: list[Path], modality: str) -> list[dict]:
    vols = []
    for p in paths:
        v = read_volume(p)
        norm = fit_normalizer(v.array, modality)
        a = norm.forward(v.array)
        fg = np.argwhere(a > 0.1)
        fg = fg[:: max(1, len(fg) // 20000)]
        vols.append({"path": p, "array": a, "grid": v.grid, "centres": fg, "sha256": sha256_file(p)})
    return vols


def make_batch(vol: dict, cfg: dict, model_cfg: MedILConfig, rng: np.random.Generator):
    patch, batch = cfg["patch"], cfg["batch"]
    buffer = cfg.get("latent_buffer_mm", model_cfg.latent_spacing)
    shape = input_shape_for(vol["grid"], patch, model_cfg.latent_spacing, buffer)
    samples = [
        sample_patch(vol["array"], vol["grid"], rng, patch, model_cfg.latent_spacing, buffer, vol["centres"], input_shape=shape)
        for _ in range(batch)
    ]
    degrade = rng.random() < cfg.get("degrade_prob", 0.0)
    axis = int(rng.integers(3))
    thick = rng.uniform(*cfg.get("thick_mm", (2.0, 8.0)))
    factor = max(2, int(round(thick / vol["grid"].spacing[axis])))
    profile = "gaussian" if rng.random() < 0.5 else "rect"
    noise = rng.uniform(0, cfg.get("noise_max", 0.0))
    xs, xg = [], []
    for s in samples:
        x, g = thick_slices(s.x, s.x_grid, axis, factor, profile) if degrade else (s.x, s.x_grid)
        xs.append(add_noise(x, rng, noise) if noise > 0 else x)
        xg.append(g)
    x = torch.from_numpy(np.stack(xs))[:, None]
    y = torch.from_numpy(np.stack([s.target for s in samples]))[:, None]
    return x, xg, y, [s.out_grid for s in samples], [s.z_grid for s in samples]


def train(config_path: Path, data_root: Path, out_dir: Path) -> Path:
    cfg = json.loads(Path(config_path).read_text())
    torch.manual_seed(cfg.get("seed", 0))
    rng = np.random.default_rng(cfg.get("seed", 0))
    model_cfg = MedILConfig.from_dict(cfg["model"])
    net = MedILAutoencoder(model_cfg)
    vols = load_training_volumes([data_root / p for p in cfg["data"]["train"]], cfg["data"]["modality"])
    opt = torch.optim.AdamW(net.parameters(), lr=cfg["lr"], betas=(0.9, 0.999), weight_decay=0.01)
    steps = cfg["steps"]
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], total_steps=steps, pct_start=0.05)
    deadline = time.time() + 60 * cfg.get("max_minutes", 1e9)
    t0, losses = time.time(), []
    step = 0
    for step in range(1, steps + 1):
        vol = vols[int(rng.integers(len(vols)))]
        x, xg, y, og, zg = make_batch(vol, cfg, model_cfg, rng)
        y_hat, _, mean, logvar = net(x, xg, zg, og, sample=model_cfg.kl)
        loss = (y_hat - y).abs().mean()
        if model_cfg.kl:
            loss = loss + cfg.get("kl_weight", 1e-6) * 0.5 * (mean**2 + logvar.exp() - 1 - logvar).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.get("grad_clip"):
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg["grad_clip"])
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % 25 == 0:
            print(json.dumps({"step": step, "l1": float(np.mean(losses[-25:])), "minutes": round((time.time() - t0) / 60, 2)}), flush=True)
        if step % 200 == 0 or time.time() > deadline:
            _export(net, cfg, vols, out_dir, step, losses, t0, partial=True)
        if time.time() > deadline:
            break
    return _export(net, cfg, vols, out_dir, step, losses, t0, partial=False)


def _export(net, cfg, vols, out_dir, step, losses, t0, partial: bool) -> Path:
    card = {
        "description": cfg.get("description", ""),
        "tasks": cfg.get("tasks", ["reconstruct", "superres"]),
        "modality": cfg["data"]["modality"],
        "training": {
            "recipe": "medil_backend.training.quick",
            "config": cfg,
            "steps_done": step,
            "final_train_l1": float(np.mean(losses[-50:])) if losses else None,
            "minutes": round((time.time() - t0) / 60, 2),
            "hardware": f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
            if not torch.cuda.is_available()
            else torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "partial": partial,
            "data": [{"file": str(Path(v["path"]).name), "sha256": v["sha256"], "shape": list(v["grid"].shape)} for v in vols],
            "held_out": cfg["data"].get("held_out", []),
        },
    }
    return export_model(net, out_dir, cfg["name"], card)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Train a small MedIL model with the quick recipe")
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--data-root", type=Path, required=True, help="folder the config's data paths are relative to")
    ap.add_argument("--out", type=Path, required=True, help="folder for NAME.safetensors + NAME.json")
    args = ap.parse_args(argv)
    print(train(args.config, args.data_root, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
