"""Training heads by the thousand from a few real ones: every batch is a new head, made on the fly.

A head is a source volume (a real T1 head, or random-contrast tissue maps) seen through

- a random smooth **diffeomorphic deformation** (a stationary velocity field on a coarse lattice,
  integrated by scaling and squaring) and a random scaling and shear;
- a random **contrast**: a gamma curve of the T1 intensities, or (SynthSeg-style) a random
  intensity per tissue drawn over tissue probability maps, or a random curve through the
  intensity classes of a real head;
- a smooth multiplicative **bias field** and, on the input only, Rician **noise**;
- the **grid of a real acquisition**: the input is sampled at its own (native) spacing and
  orientation — 1 mm, anisotropic 0.8-1.6 mm, or with one thick axis (2-6 mm, box profile, the
  voxels averaged from a fine grid) — while the target is a 1 mm patch at a random orientation
  (the MedIL premise: encode heterogeneous native grids, decode onto any grid).

Only the region a sample needs is ever computed (the deformation on its lattice, the source
sampled at the sample's points), so a batch costs a fraction of a training step. Everything is
drawn from one ``numpy`` generator, so a seed reproduces every head. Batches have the layout of
:func:`medil_backend.training.data.make_batch`: ``(x, x_grids, y, out_grids, z_grids)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
from scipy.ndimage import gaussian_filter, map_coordinates, spline_filter
from torch.utils.data import DataLoader, IterableDataset

from ..errors import MedILError
from ..geometry import Grid, affine_from_parts, exscribed_grid
from ..intensity import fit_normalizer, foreground_mask
from ..io import read_volume
from ..models import sha256_file


@dataclass
class HeadConfig:
    """How heads and their grids are drawn (see the module docstring)."""

    patch: int = 40  # target patch, voxels of 1 mm
    batch: int = 2
    latent_spacing: float = 4.0
    latent_buffer_mm: float = 4.0
    native_prob: float = 0.4  # input on its own grid (else: the 1 mm grid the target is cut from)
    thick_prob: float = 0.3  # of native inputs: one axis of thick slices
    thick_mm: tuple[float, float] = (2.0, 6.0)
    spacing_mm: tuple[float, float] = (0.8, 1.6)
    max_tilt_deg: float = 20.0  # tilt of a grid away from the nearest axis-aligned orientation
    deform_prob: float = 0.8
    deform_mm: float = 4.0  # largest displacement of the velocity field before integration
    lattice_mm: float = 12.0
    scale: tuple[float, float] = (0.9, 1.1)
    shear: float = 0.05
    maps_prob: float = 0.15  # a head from the tissue maps (random tissue contrasts), where the maps are given
    contrast_prob: float = 0.3  # a random contrast instead of a T1 gamma curve
    gamma: float = 0.3  # log-gamma range of T1 heads
    bias: float = 0.3
    noise_max: float = 0.03


@dataclass
class HeadSource:
    """One volume heads are made from: intensities (99th percentile 1) or tissue probability maps, on ``grid``."""

    name: str
    grid: Grid
    coeffs: np.ndarray  # cubic B-spline coefficients of the intensities (or a (K, ...) stack of maps, linear)
    centres: np.ndarray  # world points inside the head (patch centres)
    maps: bool = False
    levels: np.ndarray = field(default_factory=lambda: np.zeros(0))  # intensity classes (quantiles inside the head)
    sha256: str = ""

    @classmethod
    def from_volume(cls, name: str, array: np.ndarray, grid: Grid, sha256: str = "") -> HeadSource:
        a = fit_normalizer(array, "mri").forward(np.asarray(array, dtype=np.float32)).astype(np.float32)
        m = foreground_mask(a, "mri")
        levels = np.percentile(a[m], [2, 20, 40, 60, 80, 98]) if m.any() else np.zeros(0)
        return cls(name, grid, spline_filter(a, order=3, output=np.float32), _world_centres(m, grid), False, levels, sha256)

    @classmethod
    def from_tissue_maps(cls, gm: np.ndarray, wm: np.ndarray, brain: np.ndarray, grid: Grid, sha256: str = "") -> HeadSource:
        """Partial-volume maps of background, CSF, grey and white matter (sum 1) from GM/WM probabilities and a brain image."""
        gm, wm = np.clip(gm, 0, 1).astype(np.float32), np.clip(wm, 0, 1).astype(np.float32)
        inside = brain > np.percentile(brain[brain > 0], 2) if np.any(brain > 0) else brain > 0
        inside = gaussian_filter(inside.astype(np.float32), 0.7)
        tissue = np.minimum(gm + wm, 1.0)
        csf = np.clip(inside - tissue, 0, 1)
        bg = np.clip(1 - csf - tissue, 0, 1)
        maps = np.stack([bg, csf, gm, wm]).astype(np.float32)
        return cls("tissue-maps", grid, maps, _world_centres(inside > 0.5, grid), True, np.zeros(0), sha256)


def _world_centres(mask: np.ndarray, grid: Grid, limit: int = 20000) -> np.ndarray:
    pts = np.argwhere(mask)
    pts = pts[:: max(1, len(pts) // limit)]
    return grid.voxel_to_world(pts.astype(np.float64))


def random_rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """A rotation of at most ``max_deg`` about a random axis."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    a = np.radians(rng.uniform(0, max_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def random_direction(rng: np.random.Generator, max_tilt_deg: float) -> np.ndarray:
    """An acquisition orientation: a random axis-aligned one (axes permuted and flipped), tilted by up to ``max_tilt_deg``."""
    perm = np.eye(3)[rng.permutation(3)] * rng.choice([-1.0, 1.0], size=3)[:, None]
    return random_rotation(rng, max_tilt_deg) @ perm


class Deformation:
    """A smooth invertible map of world points: ``p -> centre + M (p - centre) + u(p)``, ``u`` from a
    stationary velocity field on a lattice around ``centre``, integrated by scaling and squaring."""

    def __init__(self, rng: np.random.Generator, centre: np.ndarray, half_extent_mm: float, cfg: HeadConfig) -> None:
        self.centre = np.asarray(centre, dtype=np.float64)
        s = rng.uniform(*cfg.scale, size=3)
        shear = np.eye(3) + np.triu(rng.uniform(-cfg.shear, cfg.shear, size=(3, 3)), 1)
        self.M = random_rotation(rng, 10.0) @ np.diag(s) @ shear
        self.step = cfg.lattice_mm
        n = int(math.ceil(2 * half_extent_mm / self.step)) + 3
        self.lo = self.centre - (n - 1) / 2 * self.step
        self.u = None
        if rng.random() < cfg.deform_prob and cfg.deform_mm > 0:
            v = np.stack([gaussian_filter(rng.normal(size=(n, n, n)), 1.0) for _ in range(3)])
            v *= cfg.deform_mm * rng.uniform(0.3, 1.0) / (np.abs(v).max() + 1e-9)
            self.u = self._integrate(v / self.step)  # lattice voxel units

    @staticmethod
    def _integrate(v: np.ndarray, squarings: int = 6) -> np.ndarray:
        u = v / 2**squarings
        grid = np.indices(u.shape[1:], dtype=np.float64)
        for _ in range(squarings):
            at = grid + u
            u = u + np.stack([map_coordinates(c, at, order=1, mode="nearest") for c in u])
        return u

    def __call__(self, p: np.ndarray) -> np.ndarray:
        """World points (N, 3) -> source world points (N, 3)."""
        q = (p - self.centre) @ self.M.T + self.centre
        if self.u is not None:
            lat = ((p - self.lo) / self.step).T
            q = q + np.stack([map_coordinates(c, lat, order=1, mode="nearest") for c in self.u], axis=1) * self.step
        return q


def _points(grid: Grid) -> np.ndarray:
    idx = np.indices(grid.shape, dtype=np.float64).reshape(3, -1).T
    return grid.voxel_to_world(idx)


def _bias(rng: np.random.Generator, centre: np.ndarray, strength: float):
    """A smooth multiplicative field over world points: exp of a random quadratic in (p - centre) / 100 mm."""
    if strength <= 0:
        return lambda p: 1.0
    a = rng.uniform(-strength, strength, size=3)
    b = rng.uniform(-strength, strength, size=3) / 2
    return lambda p: np.exp(((p - centre) / 100.0) @ a + (((p - centre) / 100.0) ** 2) @ b)


class Head:
    """One random head: a source, a deformation, a contrast and a bias field; sampled at any world points."""

    def __init__(self, source: HeadSource, rng: np.random.Generator, centre: np.ndarray, half_extent_mm: float, cfg: HeadConfig) -> None:
        self.source = source
        self.deform = Deformation(rng, centre, half_extent_mm, cfg)
        self.bias = _bias(rng, centre, rng.uniform(0, cfg.bias))
        self.gain = rng.uniform(0.9, 1.1)
        if source.maps:
            means = np.concatenate([[rng.uniform(0.0, 0.15)], rng.uniform(0.1, 1.0, size=3)])
            self.curve = ("maps", means / max(means.max(), 1e-3))
        elif rng.random() < cfg.contrast_prob and len(source.levels):
            knots = np.concatenate([[0.0], source.levels, [source.levels[-1] * 1.5]])
            values = np.concatenate(
                [
                    [0.0],
                    np.sort(rng.uniform(0.05, 1.0, size=len(knots) - 1))
                    if rng.random() < 0.5
                    else rng.uniform(0.05, 1.0, size=len(knots) - 1),
                ]
            )
            self.curve = ("knots", knots, values / max(values.max(), 1e-3))
        else:
            self.curve = ("gamma", math.exp(rng.uniform(-cfg.gamma, cfg.gamma)))

    def sample(self, points: np.ndarray) -> np.ndarray:
        """Intensities at world points (N, 3): float32 (N,)."""
        src = self.source
        vox = src.grid.world_to_voxel(self.deform(points)).T
        if src.maps:
            probs = np.stack([map_coordinates(m, vox, order=1, mode="constant", cval=float(k == 0)) for k, m in enumerate(src.coeffs)])
            a = self.curve[1] @ probs
        else:
            a = np.clip(map_coordinates(src.coeffs, vox, order=3, mode="constant", cval=0.0, prefilter=False), 0, None)
            if self.curve[0] == "gamma":
                a = a ** self.curve[1]
            else:
                a = np.interp(a, self.curve[1], self.curve[2])
        return (a * self.bias(points) * self.gain).astype(np.float32)


def _fine_grid(grid: Grid, factors: np.ndarray) -> Grid:
    """The grid whose ``factors`` (per axis) blocks are ``grid``'s voxels."""
    spacing, direction = grid.spacing / factors, grid.direction
    origin = grid.voxel_to_world(-(factors - 1) / (2 * factors))
    return Grid(tuple(int(s * f) for s, f in zip(grid.shape, factors)), affine_from_parts(spacing, direction, origin))


def _block_mean(a: np.ndarray, factors: np.ndarray) -> np.ndarray:
    f = [int(v) for v in factors]
    s = [n // k for n, k in zip(a.shape, f)]
    return a.reshape(s[0], f[0], s[1], f[1], s[2], f[2]).mean(axis=(1, 3, 5))


def _rician(a: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return a
    return np.sqrt((a + rng.normal(0, sigma, a.shape)) ** 2 + rng.normal(0, sigma, a.shape) ** 2).astype(np.float32)


def centred(grid: Grid, centre: np.ndarray) -> Grid:
    """``grid`` moved so that its centre is at the world point ``centre``."""
    aff = grid.affine.copy()
    aff[:3, 3] += centre - grid.voxel_to_world((np.asarray(grid.shape) - 1) / 2.0)
    return Grid(grid.shape, aff)


def make_head_batch(sources: list[HeadSource], cfg: HeadConfig, rng: np.random.Generator):
    """One batch ``(x, x_grids, y, out_grids, z_grids)`` of ``cfg.batch`` new heads on one pair of grid shapes."""
    P = cfg.patch
    out0 = Grid.from_parts((P, P, P), 1.0, random_direction(rng, cfg.max_tilt_deg))
    z0 = exscribed_grid(out0, cfg.latent_spacing, margin_mm=cfg.latent_buffer_mm)
    native = rng.random() < cfg.native_prob
    if native:
        spacing = rng.uniform(*cfg.spacing_mm, size=3)
        if rng.random() < cfg.thick_prob:
            spacing[int(rng.integers(3))] = rng.uniform(*cfg.thick_mm)
        in0 = exscribed_grid(z0, spacing, random_direction(rng, cfg.max_tilt_deg), margin_mm=float(spacing.max()))
        factors = np.maximum(1, np.round(spacing / 1.0)).astype(int)
    else:  # the 1 mm grid the target is cut from, reaching the latent grid's edge
        lo = np.floor(out0.world_to_voxel(z0.edge_corners()).min(axis=0)) - 1
        hi = np.ceil(out0.world_to_voxel(z0.edge_corners()).max(axis=0)) + 2
        in0 = out0.sub_grid(lo.astype(int), hi.astype(int))
        cut = (-lo).astype(int)
    half = float(np.linalg.norm(np.asarray(in0.shape) * in0.spacing)) / 2 + cfg.lattice_mm
    xs, xg, ys, og, zg = [], [], [], [], []
    real = [s for s in sources if not s.maps] or sources
    maps = [s for s in sources if s.maps]
    for _ in range(cfg.batch):
        pool = maps if maps and rng.random() < cfg.maps_prob else real
        src = pool[int(rng.integers(len(pool)))]
        centre = src.centres[int(rng.integers(len(src.centres)))] + rng.uniform(-2, 2, size=3)
        head = Head(src, rng, centre, half, cfg)
        out_g, z_g, in_g = centred(out0, centre), None, None
        shift = out_g.affine[:3, 3] - out0.affine[:3, 3]
        z_g, in_g = _moved(z0, shift), _moved(in0, shift)
        if native:
            fine = _fine_grid(in_g, factors)
            x = _block_mean(head.sample(_points(fine)).reshape(fine.shape), factors)
            y = head.sample(_points(out_g)).reshape(out_g.shape)
        else:
            x = head.sample(_points(in_g)).reshape(in_g.shape)
            y = x[cut[0] : cut[0] + P, cut[1] : cut[1] + P, cut[2] : cut[2] + P].copy()
        sigma = rng.uniform(0, cfg.noise_max) if rng.random() < 0.7 else 0.0
        xs.append(_rician(x, rng, sigma))
        ys.append(y)
        xg.append(in_g)
        og.append(out_g)
        zg.append(z_g)
    x = torch.from_numpy(np.stack(xs).astype(np.float32))[:, None]
    y = torch.from_numpy(np.stack(ys).astype(np.float32))[:, None]
    return x, xg, y, og, zg


def whole_head(sources: list[HeadSource], cfg: HeadConfig, rng: np.random.Generator, name: str, margin_mm: float = 12.0) -> dict:
    """One new whole head about its source's head (a training volume of the latent diffusion model): a
    random source, deformation, contrast and bias field, as in :func:`make_head_batch`, on an
    acquisition grid of random spacing (``cfg.spacing_mm`` per axis) along the source's axes; no noise
    (encode_augmented draws thick slices and the latent's orientation). Sampled in slabs, so the points
    of a head never sit in memory at once. Returns the layout of a
    :class:`~medil_backend.training.data.VolumeDataModule` volume."""
    from ..intensity import foreground_centres

    real = [s for s in sources if not s.maps] or sources
    maps = [s for s in sources if s.maps]
    src = maps[int(rng.integers(len(maps)))] if maps and rng.random() < cfg.maps_prob else real[int(rng.integers(len(real)))]
    lo = src.grid.world_to_voxel(src.centres).min(axis=0)
    hi = src.grid.world_to_voxel(src.centres).max(axis=0)
    pad = margin_mm / np.asarray(src.grid.spacing)
    box = src.grid.sub_grid(np.floor(lo - pad).astype(int), np.ceil(hi + pad).astype(int) + 1)
    spacing = rng.uniform(*cfg.spacing_mm, size=3)
    grid = Grid.from_parts(
        tuple(int(math.ceil(n * s / t)) for n, s, t in zip(box.shape, box.spacing, spacing)),
        spacing,
        box.direction,
        box.voxel_to_world(np.zeros(3)),
    )
    centre = src.centres.mean(axis=0)
    half = float(np.linalg.norm(np.asarray(grid.shape, dtype=float))) / 2 + cfg.lattice_mm
    head = Head(src, rng, centre, half, cfg)
    out = np.empty(grid.shape, dtype=np.float32)
    for i in range(0, grid.shape[0], 16):
        slab = grid.sub_grid((i, 0, 0), (min(i + 16, grid.shape[0]), *grid.shape[1:]))
        out[i : i + slab.shape[0]] = head.sample(_points(slab)).reshape(slab.shape)
    a = fit_normalizer(out, "mri").forward(out).astype(np.float32)
    return {"path": name, "array": a, "grid": grid, "centres": foreground_centres(a, "mri"), "modality": "mri"}


def _moved(grid: Grid, shift: np.ndarray) -> Grid:
    aff = grid.affine.copy()
    aff[:3, 3] += shift
    return Grid(grid.shape, aff)


class HeadStream(IterableDataset):
    """``steps`` batches of new heads; the generator is seeded by (seed, epoch), so a resumed run draws new heads."""

    def __init__(self, sources: list[HeadSource], cfg: HeadConfig, steps: int, seed: int, epoch_of=lambda: 0) -> None:
        self.sources, self.cfg, self.steps, self.seed, self.epoch_of = sources, cfg, steps, seed, epoch_of

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        rng = np.random.default_rng([self.seed, int(self.epoch_of()), wid])
        for _ in range(wid, self.steps, nw):  # the workers share the epoch's steps
            yield make_head_batch(self.sources, self.cfg, rng)


def _read(path: str) -> tuple[np.ndarray, Grid, str]:
    """A volume from a file, or ``pack.npz#name`` from a data pack."""
    if "#" in path and path.split("#")[0].endswith(".npz"):
        from .pack import read_pack

        pack, name = path.split("#", 1)
        for n, v, e in read_pack(pack):
            if n == name:
                return v.array, v.grid, e["sha256"]
        raise MedILError(f"no volume named {name} in the pack {pack}")
    v = read_volume(path)
    return v.array, v.grid, sha256_file(Path(path))


def head_sources(heads: list[str], tissue_maps: dict | None = None) -> list[HeadSource]:
    """The sources heads are made from: each real head (a file or ``pack.npz#name``), and the tissue maps
    (``gm``, ``wm``, ``brain``) as one more source when given."""
    sources = []
    for path in heads:
        a, g, sha = _read(path)
        sources.append(HeadSource.from_volume(Path(path).name, a, g, sha))
    if tissue_maps:
        maps = {k: _read(v) for k, v in tissue_maps.items()}
        if not {"gm", "wm", "brain"} <= set(maps):
            raise MedILError("tissue_maps needs gm, wm and brain")
        sha = ",".join(maps[k][2] for k in ("gm", "wm", "brain"))
        sources.append(HeadSource.from_tissue_maps(maps["gm"][0], maps["wm"][0], maps["brain"][0], maps["brain"][1], sha))
    return sources


class HeadDataModule(L.LightningDataModule):
    """Heads made on the fly (:func:`make_head_batch`) for training; fixed 1 mm patches of held-out heads for validation.

    Args:
        heads: real head volumes (files, or ``pack.npz#name``), any resolution, intensities of one contrast.
        tissue_maps: ``{"gm": ..., "wm": ..., "brain": ...}``: probability maps for SynthSeg-style random contrasts (optional).
        val: held-out volumes for validation (never trained on): 1 mm patches cut from their own grid, no augmentation.
        sampler: :class:`HeadConfig`.
        steps_per_epoch, val_steps, seed, num_workers: as in :class:`~medil_backend.training.data.VolumeDataModule`
            (each DataLoader worker makes its own heads from its own generator: on a GPU machine the heads keep up).
    """

    def __init__(
        self,
        heads: list[str],
        tissue_maps: dict | None = None,
        val: list[str] | None = None,
        sampler: HeadConfig | None = None,
        steps_per_epoch: int = 200,
        val_steps: int = 8,
        seed: int = 0,
        modality: str = "mri",
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if modality != "mri":
            raise MedILError("heads are T1-like MRI; train CT models with VolumeDataModule")
        self.heads, self.tissue_maps, self.val, self.modality = list(heads), tissue_maps, list(val or []), modality
        self.sampler = sampler or HeadConfig()
        self.steps_per_epoch, self.val_steps, self.seed, self.num_workers = steps_per_epoch, val_steps, seed, num_workers
        self.sources: list[HeadSource] = []
        self.val_batches: list = []

    def setup(self, stage: str | None = None) -> None:
        if self.sources:
            return
        self.sources = head_sources(self.heads, self.tissue_maps)
        self.val_batches = self._val_batches()

    def _val_batches(self) -> list:
        from dataclasses import replace

        if not self.val:
            return []
        sources = [HeadSource.from_volume(Path(p).name, *_read(p)[:2]) for p in self.val]
        cfg = replace(
            self.sampler,
            native_prob=0.0,
            deform_prob=0.0,
            scale=(1.0, 1.0),
            shear=0.0,
            contrast_prob=0.0,
            gamma=0.0,
            bias=0.0,
            noise_max=0.0,
        )
        rng = np.random.default_rng(12345)
        return [make_head_batch([sources[i % len(sources)]], cfg, rng) for i in range(self.val_steps)]

    def manifest(self) -> dict:
        return {
            "train": [{"file": s.name, "sha256": s.sha256} for s in self.sources],
            "val": [{"file": Path(p).name} for p in self.val],
            "synthetic": {"generator": "medil_backend.training.heads", "seed": self.seed, "sampler": self.sampler.__dict__},
        }

    def train_dataloader(self) -> DataLoader:
        epoch_of = lambda: self.trainer.current_epoch if self.trainer is not None else 0  # noqa: E731
        stream = HeadStream(self.sources, self.sampler, self.steps_per_epoch, self.seed, epoch_of)
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        return DataLoader(self.val_batches, batch_size=None) if self.val_batches else []
