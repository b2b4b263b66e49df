"""The starting weights of ``superres --method adapt``: its 2D residual network pre-trained on the training volumes.

At test time ``adapt`` has minutes on a CPU to learn what B-spline misses in *this* scan's slices, and
within that budget its network is still learning. Starting it from weights that have already learnt
the general task (undo a thick-slice acquisition, B-spline upsampled, on 2D planes) leaves those
minutes for what is particular to the scan.

Pre-training draws, from every training volume of a pack, in-plane degradations exactly as ``adapt``
makes them at test time (:func:`~medil_backend.ops.adapt._degraded_in_plane`): a random axis, a slice
thickness of 1.5 to 10 times its spacing, rect or Gaussian profile; it trains on random planes for a
fixed time. No held-out volume is seen: nothing is selected on validation.

    python -m medil_backend.training.adapt_prior --pack packs/brain-train.npz --minutes 30 --exclude pydeface_mean_head

(the mean head is left out: ``benchmarks/bench_superres.py`` measures ``adapt`` on it)

writes ``medil_backend/weights/adapt/prior-mri.safetensors`` and its card ``prior-mri.json``
(modality, data with sha256, minutes, steps, loss, command, sha256 of the weights).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import MedILError
from ..intensity import fit_normalizer
from ..ops.adapt import PRIOR_DIR, ResidualCNN2d, _degraded_in_plane, _patch_sampler, _planes, fit_adapter
from .pack import read_pack

#: slice thickness over the degraded axis's spacing: from barely thick to 10x (0.8 mm in-plane, 8 mm slices)
RATIO_RANGE = (1.5, 10.0)
GAUSSIAN_SHARE = 0.2
#: degraded volumes held at once; one is replaced every REFRESH_STEPS steps
POOL = 6
REFRESH_STEPS = 200
LR = 1e-3
#: gradient-norm clipping: hours of steps over many volumes meet the rare batch that would blow the weights up
CLIP = 1.0


def _random_pair(volumes: list[tuple[np.ndarray, object]], rng: np.random.Generator):
    """(degraded planes, sharp planes) of a random volume, axis, thickness and profile (None when too thin to degrade)."""
    x, grid = volumes[int(rng.integers(len(volumes)))]
    a = int(rng.integers(3))
    b = int(rng.choice([c for c in range(3) if c != a]))
    ratio = float(np.exp(rng.uniform(*np.log(RATIO_RANGE))))
    profile = "gaussian" if rng.random() < GAUSSIAN_SHARE else "rect"
    deg = _degraded_in_plane(x, grid, a, ratio * float(grid.spacing[a]), profile)
    return None if deg is None else (_planes(deg, a, b), _planes(x, a, b))


def pretrain(
    packs: list[str], modality: str, minutes: float, seed: int = 0, exclude: tuple[str, ...] = (), log=print
) -> tuple[ResidualCNN2d, dict]:
    """Train a :class:`ResidualCNN2d` for ``minutes`` on in-plane degradations of the ``modality`` volumes of
    ``packs`` (but those whose names contain a string in ``exclude``)."""
    if not (np.isfinite(minutes) and minutes > 0):
        raise MedILError(f"the pre-training time must be a positive number of minutes, got {minutes!r}")
    volumes, data = [], []
    for pack in packs:
        for name, vol, entry in read_pack(pack):
            if entry["modality"] != modality or any(e in name for e in exclude):
                continue
            array = vol.array.astype(np.float32)
            volumes.append((fit_normalizer(array, modality).forward(array).astype(np.float32), vol.grid))
            data.append({"name": name, "sha256": entry.get("sha256"), "pack": Path(pack).name})
    if not volumes:
        raise MedILError(f"the packs {', '.join(packs)} hold no {modality.upper()} volume to pre-train on")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    pool: list = []
    while len(pool) < POOL:
        pair = _random_pair(volumes, rng)
        if pair is not None:
            pool.append(pair)
    net = ResidualCNN2d()
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    t_end = time.perf_counter() + minutes * 60
    steps, losses, restarts = 0, [], 0
    good = copy.deepcopy(net.state_dict())
    while time.perf_counter() < t_end:
        info = fit_adapter(net, opt, _patch_sampler(pool, rng), t_end - time.perf_counter(), max_steps=REFRESH_STEPS, clip=CLIP)
        if not all(torch.isfinite(p).all() for p in net.parameters()):  # diverged: back to the last good weights
            net.load_state_dict(good)
            opt = torch.optim.Adam(net.parameters(), lr=LR)
            restarts += 1
            continue
        good = copy.deepcopy(net.state_dict())
        steps += info["steps"]
        losses.append(info["l1_last"])
        log(json.dumps({"step": steps, "l1": round(info["l1_last"], 5), "minutes_left": round((t_end - time.perf_counter()) / 60, 1)}))
        pair = _random_pair(volumes, rng)
        if pair is not None:
            pool[int(rng.integers(POOL))] = pair
    card = {
        "modality": modality,
        "description": f"Starting weights of superres --method adapt for {modality.upper()} (pre-trained on in-plane thick-slice degradations of the training volumes)",
        "network": {"class": "ResidualCNN2d", "width": net.width, "depth": net.depth},
        "data": data,
        "degradations": {"thickness_over_spacing": list(RATIO_RANGE), "gaussian_share": GAUSSIAN_SHARE},
        "training": {
            "minutes": round(minutes, 2),
            "steps": steps,
            "l1_last": float(np.mean(losses[-5:])),
            "seed": seed,
            "lr": LR,
            "clip": CLIP,
            "restarts": restarts,
        },
        "hardware": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
    }
    return net, card


#: how the starting weights are used, written into every card
USE = {
    "one_stack": "superres --method adapt: trained further for --time-budget minutes on the scan's own in-plane slices, "
    "applied through-plane, then data consistency with the scan",
    "several_stacks": "superres STACK1 STACK2 ... (adapt): one network trained further on every stack's in-plane slices "
    "(each degraded as that stack was acquired), applied to each stack through-plane; their average starts the joint "
    "data-consistency steps with every stack, which keep the detail no stack measures",
}


def export_prior(net: ResidualCNN2d, card: dict, folder: Path = PRIOR_DIR) -> Path:
    """Write ``prior-MODALITY.safetensors`` and its card (with the weights' sha256), each renamed into place."""
    from safetensors.torch import save_file

    from ..models.cards import sha256_file

    folder.mkdir(parents=True, exist_ok=True)
    name = f"prior-{card['modality']}"
    wtmp, ctmp = folder / f".{name}.safetensors.part", folder / f".{name}.json.part"
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(wtmp))
    card = card | {"weights": f"{name}.safetensors", "sha256": sha256_file(wtmp), "use": USE}
    ctmp.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    os.replace(wtmp, folder / f"{name}.safetensors")
    os.replace(ctmp, folder / f"{name}.json")
    return folder / f"{name}.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m medil_backend.training.adapt_prior", description=__doc__.split("\n\n")[0])
    p.add_argument("--pack", action="append", required=True, help="training data pack (training/pack.py; repeatable)")
    p.add_argument("--modality", choices=["mri", "ct"], default="mri")
    p.add_argument("--minutes", type=float, default=35.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exclude", action="append", default=[], metavar="TEXT", help="leave out volumes whose names contain TEXT")
    p.add_argument("--out", type=Path, default=PRIOR_DIR, help="folder (default: the bundled one)")
    args = p.parse_args(argv)
    try:
        net, card = pretrain(args.pack, args.modality, args.minutes, args.seed, tuple(args.exclude), log=lambda s: print(s, flush=True))
    except MedILError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    card["command"] = "python -m medil_backend.training.adapt_prior " + " ".join(argv if argv is not None else sys.argv[1:])
    print(json.dumps({"exported": str(export_prior(net, card, args.out))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
