"""Training data: volumes from a folder, a BIDS-style tree or a CSV/JSON manifest, in any format
and resolution, served as batches of MedIL samples (input, grids, native target).

- stage 1 (``mode="global"``): whole volumes on a standard grid (e.g. 1 mm, 160x224x160), so
  the model sees the whole field of view;
- stage 2/3 (``mode="patch"``): native-resolution patches with exscribed latent and input grids
  (:mod:`.patches`), never resampled;
- in a share of samples the input is a simulated clinical acquisition (:mod:`medil_backend.acquisition`);
- TorchIO augments whole volumes (random affine and elastic deformation, bias field, gamma,
  noise) before sampling, where ``augment=True``.

A dataset yields whole batches drawn from one volume (so shapes agree), hence
``DataLoader(batch_size=None)``.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..acquisition import add_noise, inplane_downsample, slice_gap, thick_slices
from ..errors import MedILError
from ..geometry import Grid, covering_grid
from ..intensity import fit_normalizer
from ..io import read_volume
from ..metrics import foreground_centres  # noqa: F401 (also this module's public name)
from ..models import sha256_file
from ..nn.resample import resample_to_grid  # noqa: F401 (also this module's public name)
from .patches import input_shape_for, sample_patch

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


def find_volumes(source: str | Path) -> list[Path]:
    """Volumes listed by a CSV (column ``path``) or JSON manifest (list of paths or of ``{"path": ...}``),
    or found recursively in a folder (BIDS ``anat`` trees included)."""
    source = Path(source)
    if source.is_file() and source.suffix == ".csv":
        with open(source, newline="") as fh:
            return [(source.parent / row["path"]).resolve() for row in csv.DictReader(fh)]
    if source.is_file() and source.suffix == ".json":
        entries = json.loads(source.read_text())
        entries = entries.get("files", entries) if isinstance(entries, dict) else entries
        return [(source.parent / (e["path"] if isinstance(e, dict) else e)).resolve() for e in entries]
    if source.is_dir():
        return sorted(p for p in source.rglob("*") if p.is_file() and p.name.lower().endswith(VOLUME_SUFFIXES))
    raise MedILError(f"{source} is not a folder, a .csv or a .json manifest of volumes")


def manifest_entries(paths: list[Path]) -> list[dict]:
    return [{"file": p.name, "sha256": sha256_file(p)} for p in paths]


@dataclass
class SamplerConfig:
    mode: str = "patch"  # "patch" (native) or "global" (standard grid)
    patch: int = 32
    batch: int = 4
    latent_spacing: float = 2.0
    latent_buffer_mm: float = 4.0
    global_spacing: float = 1.0
    global_shape: tuple[int, int, int] = (160, 224, 160)
    degrade_prob: float = 0.5
    thick_mm: tuple[float, float] = (2.0, 8.0)
    gap_prob: float = 0.2
    inplane_prob: float = 0.2
    noise_max: float = 0.02
    bias_prob: float = 0.2


class BatchStream(IterableDataset):
    """An endless (``steps``-long) stream of batches, each from one randomly chosen volume."""

    def __init__(self, volumes: list[dict], cfg: SamplerConfig, steps: int, seed: int, augment: bool = False) -> None:
        self.volumes, self.cfg, self.steps, self.seed, self.augment = volumes, cfg, steps, seed, augment

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
        rng = np.random.default_rng([self.seed, rank, wid])
        for _ in range(wid, self.steps, nw):
            vol = self.volumes[int(rng.integers(len(self.volumes)))]
            yield make_batch(vol, self.cfg, rng, self.augment)


def _augment(array: np.ndarray, grid: Grid, rng: np.random.Generator) -> np.ndarray:
    """TorchIO whole-volume augmentation (geometry unchanged: deformations stay inside the grid)."""
    import torchio as tio

    torch.manual_seed(int(rng.integers(2**31)))
    transform = tio.Compose(
        [
            tio.RandomAffine(scales=0.1, degrees=10, translation=4, p=0.5),
            tio.RandomElasticDeformation(num_control_points=7, max_displacement=4, p=0.25),
            tio.RandomBiasField(coefficients=0.3, p=0.3),
            tio.RandomGamma(log_gamma=0.2, p=0.3),
        ]
    )
    image = tio.ScalarImage(tensor=torch.from_numpy(array)[None], affine=grid.affine)
    return transform(image).data[0].numpy()


def make_batch(vol: dict, cfg: SamplerConfig, rng: np.random.Generator, augment: bool = False):
    """(x, x_grids, y, out_grids, z_grids) for one volume."""
    array, grid = vol["array"], vol["grid"]
    if augment:
        array = _augment(array, grid, rng)
    if cfg.mode == "global":
        centre = grid.edge_corners().mean(0)
        half = (np.asarray(cfg.global_shape) - 1) / 2 * cfg.global_spacing
        target = covering_grid(np.stack([centre - half, centre + half]), cfg.global_spacing, grid.direction)
        target = Grid(tuple(cfg.global_shape), target.affine)
        array = resample_to_grid(array, grid, target)
        grid = target
    shape = input_shape_for(grid, cfg.patch, cfg.latent_spacing, cfg.latent_buffer_mm)
    samples = [
        sample_patch(
            array,
            grid,
            rng,
            cfg.patch,
            cfg.latent_spacing,
            cfg.latent_buffer_mm,
            vol["centres"] if cfg.mode == "patch" else None,
            input_shape=shape,
        )
        for _ in range(cfg.batch)
    ]
    xs, xg = [s.x for s in samples], [s.x_grid for s in samples]
    if rng.random() < cfg.degrade_prob:
        axis = int(rng.integers(3))
        factor = max(2, int(round(rng.uniform(*cfg.thick_mm) / grid.spacing[axis])))
        profile = "gaussian" if rng.random() < 0.5 else "rect"
        gap = rng.random() < cfg.gap_prob
        pairs = [thick_slices(x, g, axis, factor, profile) for x, g in zip(xs, xg)]
        if gap:  # keep every other thick slice: a gap of one slice thickness
            pairs = [slice_gap(x, g, axis, 2) for x, g in pairs]
        xs, xg = [p[0] for p in pairs], [p[1] for p in pairs]
        if rng.random() < cfg.inplane_prob:
            other = [a for a in range(3) if a != axis][int(rng.integers(2))]
            pairs = [inplane_downsample(x, g, [other], 2) for x, g in zip(xs, xg)]
            xs, xg = [p[0] for p in pairs], [p[1] for p in pairs]
    if cfg.noise_max > 0:
        sigma = rng.uniform(0, cfg.noise_max)
        xs = [add_noise(x, rng, sigma) for x in xs]
    if rng.random() < cfg.bias_prob:
        xs = [x * _smooth_bias(x.shape, rng) for x in xs]
    x = torch.from_numpy(np.stack(xs).astype(np.float32))[:, None]
    y = torch.from_numpy(np.stack([s.target for s in samples]).astype(np.float32))[:, None]
    return x, xg, y, [s.out_grid for s in samples], [s.z_grid for s in samples]


def _smooth_bias(shape, rng: np.random.Generator, strength: float = 0.2) -> np.ndarray:
    """A smooth multiplicative field (low-order polynomial in voxel coordinates)."""
    coords = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    field = sum(rng.uniform(-strength, strength) * c for c in coords) + sum(rng.uniform(-strength, strength) / 2 * c * c for c in coords)
    return np.exp(field).astype(np.float32)


class VolumeDataModule(L.LightningDataModule):
    """Volumes for MedIL training.

    Args:
        train: folder, BIDS tree, or CSV/JSON manifest of training volumes.
        val: the same for validation volumes (held out; never trained on).
        modality: ``mri``, ``ct`` or ``auto``.
        sampler: how samples are drawn (see :class:`SamplerConfig`).
        steps_per_epoch: batches per epoch (the paper: 200).
        val_steps: validation batches (drawn with a fixed seed, so every epoch sees the same).
        augment: TorchIO whole-volume augmentation of training volumes.
        num_workers: DataLoader workers.
        seed: sampling seed.
        synthetic: how many SynthSeg-style random-contrast volumes to add to the training set,
            made from ``tissue_maps`` (``{"gm": path, "wm": path, "brain": path}``, or a data pack
            holding volumes of those names).

    ``train``/``val`` may also be data packs (``.npz`` from ``training/pack.py``): then nothing
    but numpy is needed to read the data (the GPU machine has neither nibabel nor SimpleITK).
    """

    def __init__(
        self,
        train: str,
        val: str | None = None,
        modality: str = "mri",
        sampler: SamplerConfig | None = None,
        steps_per_epoch: int = 200,
        val_steps: int = 8,
        augment: bool = True,
        num_workers: int = 0,
        seed: int = 0,
        synthetic: int = 0,
        tissue_maps: dict | str | None = None,
    ) -> None:
        super().__init__()
        self.synthetic, self.tissue_maps = synthetic, tissue_maps
        self.train_source, self.val_source = train, val
        self.modality = modality
        self.sampler = sampler or SamplerConfig()
        self.steps_per_epoch, self.val_steps = steps_per_epoch, val_steps
        self.augment, self.num_workers, self.seed = augment, num_workers, seed
        self.train_volumes: list[dict] = []
        self.val_volumes: list[dict] = []

    def _load(self, source) -> list[dict]:
        """Volumes from a folder or manifest (read with nibabel/SimpleITK) or from a data pack (``.npz``, numpy only)."""
        if isinstance(source, (list, tuple)):  # a list of volume files
            return [v for one in source for v in self._load(one)]
        if "#" in str(source) and str(source).split("#")[0].endswith(".npz"):  # one volume of a data pack
            from .pack import read_pack

            pack, name = str(source).split("#", 1)
            items = [(str(source), v, e["sha256"]) for n, v, e in read_pack(pack) if n == name]
            if not items:
                raise MedILError(f"no volume named {name} in the pack {pack}")
        elif str(source).endswith(".npz"):
            from .pack import read_pack

            items = [(f"{Path(source).name}#{name}", v, e["sha256"]) for name, v, e in read_pack(source)]
        elif Path(source).is_file() and str(source).lower().endswith(VOLUME_SUFFIXES):
            items = [(str(source), read_volume(source), sha256_file(Path(source)))]
        else:
            items = [(str(p), read_volume(p), None) for p in find_volumes(source)]
        vols = []
        for path, v, sha in items:
            norm = fit_normalizer(v.array, self.modality)
            a = norm.forward(v.array)
            vol = {"path": path, "array": a, "grid": v.grid, "centres": foreground_centres(a, norm.modality), "modality": norm.modality}
            if sha:
                vol["sha256"] = sha
            vols.append(vol)
        if not vols:
            raise MedILError(f"no volumes found in {source}")
        return vols

    def setup(self, stage: str | None = None) -> None:
        if not self.train_volumes:
            self.train_volumes = self._load(self.train_source) + self._synthetic()
            self.val_volumes = self._load(self.val_source) if self.val_source else []

    def _synthetic(self) -> list[dict]:
        if not self.synthetic:
            return []
        from .synth import synthesize, tissue_labels

        if not self.tissue_maps or (not isinstance(self.tissue_maps, str) and not {"gm", "wm", "brain"} <= set(self.tissue_maps)):
            raise MedILError("synthetic volumes need tissue_maps: gm, wm and brain images, or a data pack holding them")
        maps = self._tissue_maps()
        labels = tissue_labels(maps["gm"].array, maps["wm"].array, maps["brain"].array)
        rng = np.random.default_rng(self.seed + 999)
        out = []
        for i in range(self.synthetic):
            v = synthesize(labels, maps["brain"].affine, rng)
            out.append(
                {
                    "path": f"synthetic-{i}",
                    "array": v.array,
                    "grid": v.grid,
                    "centres": foreground_centres(v.array, "mri"),
                    "modality": "mri",
                }
            )
        return out

    def _tissue_maps(self) -> dict:
        """gm/wm/brain volumes from files, or from a data pack holding volumes of those names."""
        if isinstance(self.tissue_maps, str):
            from .pack import read_pack

            maps = {name: v for name, v, _ in read_pack(self.tissue_maps)}
            if not {"gm", "wm", "brain"} <= set(maps):
                raise MedILError(f"the tissue-map pack {self.tissue_maps} needs volumes named gm, wm and brain")
            return maps
        return {k: read_volume(v) for k, v in self.tissue_maps.items()}

    @staticmethod
    def _entries(vols: list[dict]) -> list[dict]:
        out = []
        for v in vols:
            if v["path"].startswith("synthetic-"):
                continue
            out.append({"file": v["path"], "sha256": v["sha256"]} if "sha256" in v else manifest_entries([Path(v["path"])])[0])
        return out

    def manifest(self) -> dict:
        if isinstance(self.tissue_maps, str):
            from .pack import read_meta

            maps = {
                e["name"]: {"file": f"{Path(self.tissue_maps).name}#{e['name']}", "sha256": e["sha256"]}
                for e in read_meta(self.tissue_maps)["volumes"]
            }
        else:
            maps = {k: manifest_entries([Path(p)])[0] for k, p in (self.tissue_maps or {}).items()}
        return {
            "train": self._entries(self.train_volumes),
            "synthetic": {"count": self.synthetic, "tissue_maps": maps},
            "val": self._entries(self.val_volumes),
        }

    def train_dataloader(self) -> DataLoader:
        ds = BatchStream(self.train_volumes, self.sampler, self.steps_per_epoch, self.seed, self.augment)
        return DataLoader(ds, batch_size=None, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_volumes:
            return []
        from dataclasses import replace

        cfg = replace(self.sampler, degrade_prob=0.5)
        rng = np.random.default_rng(12345)
        batches = [make_batch(self.val_volumes[i % len(self.val_volumes)], cfg, rng) for i in range(self.val_steps)]
        return DataLoader(batches, batch_size=None)
