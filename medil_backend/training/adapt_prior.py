"""The starting weights of ``superres --method adapt``: its 2D residual network pre-trained on the training volumes.

At test time ``adapt`` has minutes on a CPU to learn what B-spline misses in *this* scan's slices, and
within that budget its network is still learning. Starting it from weights that have already learnt
the general task (undo a thick-slice acquisition, B-spline upsampled, on 2D planes) leaves those
minutes for what is particular to the scan.

Pre-training draws, from every training volume (data packs and files) and from new heads made from
the real 1 mm heads (the generative issue's pipeline, :func:`~medil_backend.training.heads.whole_head`:
deformations, contrasts from tissue maps, bias fields), in-plane degradations as ``adapt`` makes them at
test time (:func:`~medil_backend.ops.adapt._degraded_in_plane`): a random axis, a slice spacing of 1.5 to
10 times the voxel spacing, rect or Gaussian profile, some with a gap between slices; it trains on random
planes for a fixed time, the learning rate decaying along a cosine. No held-out volume is seen: nothing is
selected on validation. It exports every ``--checkpoint-minutes``; ``--init`` goes on from an export.

    python -m medil_backend.training.adapt_prior --pack packs/brain-train.npz --minutes 30 --exclude pydeface_mean_head

(the mean head is left out: ``benchmarks/bench_superres.py`` measures ``adapt`` on it). The recipe of the
bundled MRI weights is the ``command`` on their card (``medil_backend/weights/adapt/prior-mri.json``).

writes ``medil_backend/weights/adapt/prior-MODALITY.safetensors`` and its card ``prior-MODALITY.json``
(modality, data with sha256, made heads, minutes, steps, loss, command, sha256 of the weights).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import MedILError
from ..intensity import fit_normalizer
from ..io import read_volume
from ..models.cards import sha256_file
from ..ops.adapt import PRIOR_DIR, ResidualCNN2d, _degraded_in_plane, _patch_sampler, _planes, fit_adapter
from .pack import read_pack

#: slice thickness over the degraded axis's spacing: from barely thick to 10x (0.8 mm in-plane, 8 mm slices)
RATIO_RANGE = (1.5, 10.0)
GAUSSIAN_SHARE = 0.2
#: share of degradations with a gap between slices (a slice profile narrower than the slice spacing), and the
#: range of profile width over spacing: many clinical protocols (e.g. 5 mm every 6.5 mm) leave one
GAP_SHARE = 0.25
GAP_RANGE = (0.6, 0.95)
#: degraded volumes held at once; one is replaced every REFRESH_STEPS steps
POOL = 6
REFRESH_STEPS = 200
LR = 1e-3
#: the learning rate decays along a cosine over the run's time to this share of LR
LR_FLOOR = 0.1
#: gradient-norm clipping: hours of steps over many volumes meet the rare batch that would blow the weights up
CLIP = 1.0


@dataclass
class PriorData:
    """What the starting weights learn from.

    Args:
        packs: data packs (training/pack.py); ``files``: more volumes, read from their files.
        modality: the volumes of this modality are used, but those whose names contain a string in ``exclude``.
        heads: real 1 mm heads to make new heads from (:func:`~medil_backend.training.heads.whole_head`: a
            random smooth deformation, scaling, contrast and bias field each), with ``tissue_maps``
            (``{"gm", "wm", "brain"}``) for heads of random tissue contrasts; ``head_share`` of the pool's
            refreshes draw a new made head instead of a real volume.
    """

    packs: list[str] = field(default_factory=list)
    modality: str = "mri"
    files: list[str] = field(default_factory=list)
    exclude: tuple[str, ...] = ()
    heads: list[str] = field(default_factory=list)
    tissue_maps: dict | None = None
    head_share: float = 0.5


def _load_volumes(data: PriorData) -> tuple[list[tuple[np.ndarray, object]], list[dict]]:
    """(normalised array, grid) of every real training volume, and their provenance."""
    volumes, entries = [], []

    def add(name, vol, **entry):
        if any(e in name for e in data.exclude):
            return
        array = vol.array.astype(np.float32)
        volumes.append((fit_normalizer(array, data.modality).forward(array).astype(np.float32), vol.grid))
        entries.append({"name": name, **entry})

    for pack in data.packs:
        for name, vol, entry in read_pack(pack):
            if entry["modality"] == data.modality:
                add(name, vol, sha256=entry.get("sha256"), pack=Path(pack).name)
    for path in data.files:
        add(Path(path).name, read_volume(path), sha256=sha256_file(Path(path)))
    return volumes, entries


class _Draw:
    """Training volumes for the pool: a real one, or (``head_share`` of the time) a new head made from the sources."""

    def __init__(self, data: PriorData, rng: np.random.Generator) -> None:
        self.volumes, self.entries = _load_volumes(data)
        self.rng, self.share, self.made = rng, data.head_share, 0
        self.sources = []
        if data.heads:
            from .heads import head_sources

            self.sources = head_sources(data.heads, data.tissue_maps)
        if not self.volumes and not self.sources:
            raise MedILError(f"the training data hold no {data.modality.upper()} volume to pre-train on")
        self.config = None
        if self.sources:
            from .heads import HeadConfig

            self.config = HeadConfig(spacing_mm=(1.0, 1.0))  # sharp: the planes the network learns to restore

    def volume(self):
        if self.sources and (not self.volumes or self.rng.random() < self.share):
            from .heads import whole_head

            head = whole_head(self.sources, self.config, self.rng, f"head-{self.made}")
            self.made += 1
            return head["array"], head["grid"]
        return self.volumes[int(self.rng.integers(len(self.volumes)))]

    def pair(self):
        """(degraded planes, sharp planes) of a random volume, axis, thickness, profile and gap (None when too thin)."""
        rng = self.rng
        x, grid = self.volume()
        a = int(rng.integers(3))
        b = int(rng.choice([c for c in range(3) if c != a]))
        step = float(np.exp(rng.uniform(*np.log(RATIO_RANGE)))) * float(grid.spacing[a])
        profile = "gaussian" if rng.random() < GAUSSIAN_SHARE else "rect"
        width = step * float(rng.uniform(*GAP_RANGE)) if rng.random() < GAP_SHARE else step
        deg = _degraded_in_plane(x, grid, a, width, profile, spacing=step)
        return None if deg is None else (_planes(deg, a, b), _planes(x, a, b))


def _channels_last(draw):
    def batch():
        xb, yb = draw()
        return xb.contiguous(memory_format=torch.channels_last), yb

    return batch


def pretrain(
    data: PriorData,
    minutes: float,
    seed: int = 0,
    init: str | Path | None = None,
    log=print,
    checkpoint=None,
    checkpoint_minutes: float = 10.0,
) -> tuple[ResidualCNN2d, dict]:
    """Train a :class:`ResidualCNN2d` for ``minutes`` on in-plane degradations of ``data``, from scratch or from
    the exported weights ``init`` (a ``prior-*.safetensors`` with its card beside it: training goes on, and the
    card counts its minutes and steps in). ``checkpoint(net, card)`` is called every ``checkpoint_minutes``
    (an interrupted run resumes from the last one with ``init``)."""
    if not (np.isfinite(minutes) and minutes > 0):
        raise MedILError(f"the pre-training time must be a positive number of minutes, got {minutes!r}")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    draw = _Draw(data, rng)
    net = ResidualCNN2d()
    before = {"minutes": 0.0, "steps": 0}
    if init is not None:
        state, card = _read_init(Path(init))
        net.load_state_dict(state)
        before = card.get("training") or {}
        before = {
            "minutes": float(before.get("total_minutes", before["minutes"])),
            "steps": int(before.get("total_steps", before["steps"])),
            "from_sha256": sha256_file(Path(init)),
        }
    net = net.to(memory_format=torch.channels_last)  # about 1.2x faster steps on a CPU for these 3x3 convolutions
    pool: list = []
    while len(pool) < POOL:
        pair = draw.pair()
        if pair is not None:
            pool.append(pair)
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    t0 = time.perf_counter()
    t_end = t0 + minutes * 60
    t_saved = t0
    steps, losses, restarts = 0, [], 0
    good = copy.deepcopy(net.state_dict())

    def card_now() -> dict:
        return _card(data, draw, net, seed, losses, restarts, steps, (time.perf_counter() - t0) / 60, before)

    while time.perf_counter() < t_end:
        frac = (time.perf_counter() - t0) / (minutes * 60)
        for g in opt.param_groups:
            g["lr"] = LR * (LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + np.cos(np.pi * min(1.0, frac))))
        sampler = _channels_last(_patch_sampler(pool, rng))
        info = fit_adapter(net, opt, sampler, t_end - time.perf_counter(), max_steps=REFRESH_STEPS, clip=CLIP)
        if not all(torch.isfinite(p).all() for p in net.parameters()):  # diverged: back to the last good weights
            net.load_state_dict(good)
            opt = torch.optim.Adam(net.parameters(), lr=LR)
            restarts += 1
            continue
        good = copy.deepcopy(net.state_dict())
        steps += info["steps"]
        losses.append(info["l1_last"])
        log(
            json.dumps(
                {
                    "step": steps,
                    "l1": round(info["l1_last"], 5),
                    "lr": round(opt.param_groups[0]["lr"], 6),
                    "heads_made": draw.made,
                    "minutes_left": round((t_end - time.perf_counter()) / 60, 1),
                }
            )
        )
        if checkpoint is not None and time.perf_counter() - t_saved > checkpoint_minutes * 60:
            checkpoint(net, card_now())
            t_saved = time.perf_counter()
        pair = draw.pair()
        if pair is not None:
            pool[int(rng.integers(POOL))] = pair
    return net.to(memory_format=torch.contiguous_format), card_now()


def _read_init(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Exported weights to go on from, checked against their card's sha256, and the card (read once)."""
    from ..files import read_json_file
    from ..models.cards import read_weights

    card = read_json_file(path.with_suffix(".json"), "starting weights' card")
    if not isinstance(card, dict) or not card.get("sha256") or not isinstance(card.get("training"), dict):
        raise MedILError(
            f"{path.with_suffix('.json')} is not the card of exported starting weights: give a prior-*.safetensors that export wrote"
        )
    return read_weights(path, str(card["sha256"]), path.stem), card


def _card(data: PriorData, draw: _Draw, net, seed, losses, restarts, steps, minutes, before) -> dict:
    heads = None
    if data.heads:
        heads = {
            "generator": "medil_backend.training.heads.whole_head",
            "sources": [{"file": s.name, "sha256": s.sha256} for s in draw.sources],
            "tissue_maps": {k: Path(v).name for k, v in (data.tissue_maps or {}).items()},
            "share": data.head_share,
            "made": draw.made,
            "sampler": draw.config.__dict__,
        }
    return {
        "modality": data.modality,
        "description": f"Starting weights of superres --method adapt for {data.modality.upper()} (pre-trained on in-plane "
        "thick-slice degradations of the training volumes" + (" and of heads made from them" if heads else "") + ")",
        "network": {"class": "ResidualCNN2d", "width": net.width, "depth": net.depth},
        "data": draw.entries,
        "heads": heads,
        "degradations": {
            "thickness_over_spacing": list(RATIO_RANGE),
            "gaussian_share": GAUSSIAN_SHARE,
            "gap_share": GAP_SHARE,
            "profile_over_slice_spacing_with_gap": list(GAP_RANGE),
        },
        "training": {
            "minutes": round(minutes, 2),
            "steps": steps,
            "total_minutes": round(before["minutes"] + minutes, 2),
            "total_steps": before["steps"] + steps,
            "continued_from_sha256": before.get("from_sha256"),
            "l1_last": float(np.mean(losses[-5:])) if losses else float("nan"),
            "seed": seed,
            "lr": LR,
            "lr_schedule": f"cosine over the run's minutes to {LR_FLOOR} x lr",
            "clip": CLIP,
            "restarts": restarts,
        },
        "hardware": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
    }


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
    p.add_argument("--pack", action="append", default=[], help="training data pack (training/pack.py; repeatable)")
    p.add_argument("--file", action="append", default=[], metavar="VOLUME", help="one more training volume from its file (repeatable)")
    p.add_argument("--modality", choices=["mri", "ct"], default="mri")
    p.add_argument("--minutes", type=float, default=35.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exclude", action="append", default=[], metavar="TEXT", help="leave out volumes whose names contain TEXT")
    p.add_argument("--heads", action="append", default=[], metavar="VOLUME", help="a real 1 mm head to make new heads from (repeatable)")
    p.add_argument(
        "--tissue-maps",
        nargs=3,
        metavar=("GM", "WM", "BRAIN"),
        help="grey and white matter maps and their brain, for heads of random contrasts",
    )
    p.add_argument("--head-share", type=float, default=0.5, help="share of the pool's new volumes that are made heads (default 0.5)")
    p.add_argument("--init", type=Path, help="go on training exported weights (prior-*.safetensors, card beside it)")
    p.add_argument("--checkpoint-minutes", type=float, default=10.0, help="export to --out this often (default 10)")
    p.add_argument("--out", type=Path, default=PRIOR_DIR, help="folder (default: the bundled one)")
    args = p.parse_args(argv)
    maps = dict(zip(("gm", "wm", "brain"), args.tissue_maps)) if args.tissue_maps else None
    data = PriorData(args.pack, args.modality, args.file, tuple(args.exclude), args.heads, maps, args.head_share)
    command = "python -m medil_backend.training.adapt_prior " + " ".join(argv if argv is not None else sys.argv[1:])

    def save(net, card):
        net = copy.deepcopy(net).to(memory_format=torch.contiguous_format)
        print(json.dumps({"checkpoint": str(export_prior(net, card | {"command": command}, args.out))}), flush=True)

    try:
        if not (args.pack or args.file or args.heads):
            raise MedILError("give the training volumes: --pack, --file or --heads")
        net, card = pretrain(data, args.minutes, args.seed, args.init, lambda s: print(s, flush=True), save, args.checkpoint_minutes)
    except MedILError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"exported": str(export_prior(net, card | {"command": command}, args.out))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
