"""Training data of the latent diffusion model: MedIL latents of the training volumes, under random
resolutions, orientations and fields of view (Patel et al.), served as random crops with their
geometry channels.

Each training volume is encoded ``encodings`` times by the generative autoencoder (posterior
means, never mean + σε), each time:

- moved into the **group space**: translated so that its foreground centroid lies at world (0, 0, 0)
  (the training heads are not registered to each other; the centroid is the one landmark all share);
- at a random **resolution**: with probability ``thick_prob`` as thick slices (``thick_mm``) along a
  random axis, else at its native spacing; the acquisition's spacing along the latent axes becomes
  the spacing channels;
- on a latent grid of random **orientation** (rotations up to ``max_rotation_deg`` about each axis);
- **in air** (``pad_mm``, ``box_mm``): training volumes are cropped to their body, often to the
  skin, so without this the model never sees where a head ends and fills every field of view with
  tissue. The volume is padded with background before encoding, and its latent is extended with
  the background's own latent to a cube about the centroid;
- **mirrored** left-right with probability ``mirror_prob`` (a head's mirror image is another
  plausible head; on the 8 training heads it did not make the samples more diverse: see the README).

The latents are computed once and kept in a cache file (``cache``, float16) that later runs and
the GPU machine reuse. Batches are random crops (``crop`` latent voxels a side; a smaller field of
view is a smaller coordinate range), so one model learns every FOV.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..acquisition import thick_slices
from ..errors import MedILError
from ..geometry import Grid, centred, nearest_aligned_direction, rotation
from ..nn.diffusion import DiffusionConfig, geometry_channels, source_spacing_along


def far_field_latent(ae, spacing, direction: np.ndarray) -> np.ndarray:
    """The latent of empty background (a zero volume) at this input spacing and latent orientation,
    far from any edge: the value every latent voxel outside a head takes."""
    from ..ops.tiling import encode_tiled

    sp = np.asarray(spacing, dtype=np.float64)
    shape = tuple(int(math.ceil(6 * ae.config.latent_spacing / s)) + 2 * ae.encoder_halo() for s in sp)
    grid = Grid(shape, np.diag([*sp, 1.0]))
    z_grid = ae.latent_grid(grid, direction)
    device = next(ae.parameters()).device
    with torch.inference_mode():
        raw = encode_tiled(ae, torch.zeros((1, 1, *shape), device=device), grid, z_grid, budget_bytes=2**30)
        z = ae.split_latent(raw)[0][0]
    return z[:, z.shape[1] // 2, z.shape[2] // 2, z.shape[3] // 2].float().cpu().numpy()


def padded_to_box(z: np.ndarray, z_grid: Grid, box_mm: float, fill: np.ndarray) -> tuple[np.ndarray, Grid]:
    """``z`` extended with ``fill`` so that its grid covers a cube of side ``box_mm`` about the world
    origin, in the latent's own axes (it is never cropped)."""
    centre = z_grid.world_to_voxel(np.zeros((1, 3)))[0]
    half = box_mm / 2 / np.asarray(z_grid.spacing)
    lo = np.minimum(np.floor(centre - half).astype(int), 0)
    hi = np.maximum(np.ceil(centre + half).astype(int) + 1, z_grid.shape)
    out = np.empty((z.shape[0], *(hi - lo)), dtype=z.dtype)
    out[:] = fill[:, None, None, None]
    a = -lo
    out[:, a[0] : a[0] + z.shape[1], a[1] : a[1] + z.shape[2], a[2] : a[2] + z.shape[3]] = z
    return out, z_grid.sub_grid(lo, hi)


def mirrored(array: np.ndarray, grid: Grid, centres_ijk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The head mirrored left-right on the same grid: voxels flipped along the axis nearest the world's
    x, and its foreground voxels ``centres_ijk`` with them (centred on them, world x becomes -x)."""
    axis = int(np.argmax(np.abs(grid.direction[0])))
    centres = np.array(centres_ijk, dtype=np.float64)
    centres[:, axis] = array.shape[axis] - 1 - centres[:, axis]
    return np.flip(array, axis), centres


def encode_augmented(
    ae,
    vol: dict,
    rng: np.random.Generator,
    *,
    thick_prob: float,
    thick_mm,
    max_rotation_deg: float,
    pad_mm: float = 0.0,
    box_mm: float = 0.0,
    mirror_prob: float = 0.0,
) -> dict:
    """One latent of a (normalised) training volume under a random resolution and orientation.

    With probability ``mirror_prob`` the head is first mirrored left-right (its voxels flipped
    along the axis nearest the world's x): another plausible head for a model that has few.

    With ``pad_mm`` > 0 the volume is surrounded by empty background before encoding (so that the
    latent at its edge is that of a head in air, not of a volume's border), and with
    ``box_mm`` > 0 the latent is extended with the background's own latent to a cube of that side
    about the head's centroid: the model then learns where a head ends.
    """
    from ..ops.tiling import encode_tiled

    array, centres = vol["array"], vol["centres"]
    if mirror_prob > 0 and rng.random() < mirror_prob:
        array, centres = mirrored(array, vol["grid"], centres)
    grid = centred(vol["grid"], centres)
    if rng.random() < thick_prob:
        axis = int(rng.integers(3))
        factor = max(2, int(round(rng.uniform(*thick_mm) / grid.spacing[axis])))
        array, grid = thick_slices(array, grid, axis, factor, "gaussian" if rng.random() < 0.5 else "rect")
    direction = nearest_aligned_direction(grid.direction)
    if max_rotation_deg > 0:
        direction = rotation(rng.uniform(-max_rotation_deg, max_rotation_deg, 3)) @ direction
    z_grid = ae.latent_grid(grid, direction)
    # the encoder's reach is a number of voxels, whatever their size: pad as many voxels along every axis
    # as pad_mm makes at the finest spacing (a thick-slice axis gets as many thick slices)
    pad = int(math.ceil(pad_mm / min(grid.spacing))) if pad_mm > 0 else 0
    if pad:
        array = np.pad(array, pad)
        grid = grid.sub_grid([-pad] * 3, [n + pad for n in grid.shape])
    device = next(ae.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None].to(device)
    with torch.inference_mode():
        raw = encode_tiled(ae, x, grid, z_grid, budget_bytes=1.5 * 2**30)
        z = ae.split_latent(raw)[0][0].float().cpu().numpy()  # the posterior mean
    if box_mm > 0:
        fill = far_field_latent(ae, grid.spacing, direction)
        # a rotated latent grid reaches past the padded volume; its voxels within pad / 2 voxels of that volume's
        # border see the border, not air (medil-brain-t1-gen: the error falls to 0.02 at 10 voxels), so they take the
        # background's latent: they lie outside the scanned volume, where a head in air has air
        ijk = grid.world_to_voxel(z_grid.voxel_to_world(np.indices(z_grid.shape).reshape(3, -1).T))
        inside = ((ijk >= pad / 2) & (ijk <= np.asarray(grid.shape) - 1 - pad / 2)).all(1).reshape(z_grid.shape)
        z[:, ~inside] = fill[:, None]
        z, z_grid = padded_to_box(z, z_grid, box_mm, fill)
    spacing = source_spacing_along(z_grid, grid.direction, grid.spacing)
    return {"latent": z.astype(np.float16), "affine": z_grid.affine, "spacing": spacing, "name": vol["path"]}


def euler_angles(r: np.ndarray) -> np.ndarray:
    """The angles (degrees) that :func:`rotation` turns into ``r``."""
    ay = -math.asin(float(np.clip(r[2, 0], -1, 1)))
    return np.rad2deg([math.atan2(r[2, 1], r[2, 2]), ay, math.atan2(r[1, 0], r[0, 0])])


def native_space(grid: Grid) -> np.ndarray:
    """A volume's acquisition space as 6 numbers: log spacing along the world R, A, S axes, and the rotation (degrees)
    from its nearest axis-aligned orientation."""
    world = Grid((1, 1, 1), np.eye(4))
    spacing = source_spacing_along(world, grid.direction, grid.spacing)
    aligned = nearest_aligned_direction(grid.direction)
    return np.concatenate([np.log(spacing), euler_angles(grid.direction @ aligned.T)])


def fit_native_mixture(points: np.ndarray, k: int = 4, seed: int = 0, iters: int = 100) -> list[dict]:
    """A Gaussian mixture (diagonal covariances, at most ``k`` components) over native spaces, by EM.

    Variances are floored (log spacing 0.01, angles 1 degree squared) so that a component fitted to
    a handful of volumes still draws nearby spaces rather than copies.
    """
    x = np.asarray(points, dtype=np.float64)
    k = max(1, min(k, len(x)))
    floor = np.array([0.01] * 3 + [1.0] * 3)
    rng = np.random.default_rng(seed)
    means = x[rng.choice(len(x), k, replace=False)]
    var = np.tile(np.maximum(x.var(0), floor), (k, 1))
    w = np.full(k, 1.0 / k)
    for _ in range(iters):
        logp = -0.5 * (((x[:, None] - means[None]) ** 2) / var[None] + np.log(2 * np.pi * var[None])).sum(-1) + np.log(w)[None]
        resp = np.exp(logp - logp.max(1, keepdims=True))
        resp /= resp.sum(1, keepdims=True)
        nk = resp.sum(0) + 1e-9
        w = nk / nk.sum()
        means = (resp.T @ x) / nk[:, None]
        var = np.maximum((resp.T @ x**2) / nk[:, None] - means**2, floor)
    # components that converged onto the same volumes are one component (EM started from duplicate points)
    merged: dict[tuple, list] = {}
    for wi, m, s in zip(w, means, var):
        key = tuple(np.round(np.concatenate([m, s]), 4))
        merged.setdefault(key, [0.0, m, s])[0] += wi
    # the mixture's angles are in degrees; native_grid takes radians
    return [
        {
            "weight": round(float(wi), 6),
            "mean": [round(float(v), 6) for v in np.concatenate([m[:3], np.deg2rad(m[3:])])],
            "var": [round(float(v), 8) for v in np.concatenate([s[:3], np.deg2rad(np.sqrt(s[3:])) ** 2])],
        }
        for wi, m, s in merged.values()
        if wi > 1e-3
    ]


def save_latents(path: str | Path, items: list[dict], meta: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for i, it in enumerate(items):
        arrays[f"latent_{i}"] = it["latent"]
        arrays[f"affine_{i}"] = it["affine"]
        arrays[f"spacing_{i}"] = it["spacing"]
    meta = dict(meta, names=[it["name"] for it in items])
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    tmp = path.with_name(path.name + ".part.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def load_latents(path: str | Path) -> tuple[list[dict], dict]:
    with np.load(path, allow_pickle=False) as d:
        meta = json.loads(bytes(d["meta"]).decode())
        items = [
            {
                "latent": d[f"latent_{i}"].astype(np.float32),
                "affine": d[f"affine_{i}"],
                "spacing": d[f"spacing_{i}"],
                "name": name,
            }
            for i, name in enumerate(meta["names"])
        ]
    return items, meta


#: the std maps' floor, as a fraction of each channel's overall std: where every training head agrees (air), a
#: latent's residual is still measured against a spread that noise in the data cannot blow up
STD_FLOOR = 0.2
#: smoothing of the maps (map voxels): a handful of heads leave a mean with each head's edges in it
MAP_SIGMA = 1.0


def position_maps(items: list[dict], config: DiffusionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std), each (C, *config.map_shape()): the statistics of the latents' voxels binned by where they lie
    in the group space (nearest map voxel), smoothed by :data:`MAP_SIGMA`; map voxels no latent reaches take
    their nearest reached neighbour's; std is floored at :data:`STD_FLOOR` of each channel's overall std."""
    from scipy import ndimage

    shape = config.map_shape()
    lo, hi = np.asarray(config.group_lo, dtype=np.float64), np.asarray(config.group_hi, dtype=np.float64)
    C = items[0]["latent"].shape[0]
    n = int(np.prod(shape))
    total, total_sq, count = np.zeros((C, n)), np.zeros((C, n)), np.zeros(n)
    for it in items:
        z = it["latent"].reshape(C, -1).astype(np.float64)
        grid = Grid(it["latent"].shape[1:], it["affine"])
        world = grid.voxel_to_world(np.indices(grid.shape).reshape(3, -1).T)
        ijk = np.rint((world - lo) / (hi - lo) * (np.asarray(shape) - 1)).astype(np.int64)
        keep = ((ijk >= 0) & (ijk < np.asarray(shape))).all(1)
        flat = np.ravel_multi_index(ijk[keep].T, shape)
        count += np.bincount(flat, minlength=n)
        for c in range(C):
            total[c] += np.bincount(flat, weights=z[c, keep], minlength=n)
            total_sq[c] += np.bincount(flat, weights=z[c, keep] ** 2, minlength=n)
    if not count.any():
        raise MedILError("no training latent lies in the diffusion model's group space")
    reached = (count > 0).reshape(shape)
    nearest = ndimage.distance_transform_edt(~reached, return_distances=False, return_indices=True)
    safe = np.maximum(count, 1)
    flat_all = np.concatenate([it["latent"].reshape(C, -1) for it in items], axis=1).astype(np.float64)
    floor = STD_FLOOR * flat_all.std(1)
    mean_map, std_map = np.empty((C, *shape)), np.empty((C, *shape))
    for c in range(C):
        mean = (total[c] / safe).reshape(shape)[tuple(nearest)]
        var = np.maximum((total_sq[c] / safe).reshape(shape)[tuple(nearest)] - mean**2, 0.0)
        mean_map[c] = ndimage.gaussian_filter(mean, MAP_SIGMA, mode="nearest")
        std_map[c] = np.maximum(np.sqrt(ndimage.gaussian_filter(var, MAP_SIGMA, mode="nearest")), floor[c])
    return torch.from_numpy(mean_map).float(), torch.from_numpy(std_map).float()


def crop_batch(items: list[dict], config: DiffusionConfig, crop: int, batch: int, rng: np.random.Generator):
    """(z0, cond): ``batch`` random crops of ``crop`` voxels a side (at most each latent's size) with their geometry channels."""
    picks = [items[int(rng.integers(len(items)))] for _ in range(batch)]
    size = [min([crop] + [it["latent"].shape[1 + a] for it in picks]) for a in range(3)]
    zs, conds = [], []
    for it in picks:
        shape = it["latent"].shape[1:]
        lo = [int(rng.integers(0, n - s + 1)) for n, s in zip(shape, size)]
        hi = [a + s for a, s in zip(lo, size)]
        grid = Grid(shape, it["affine"]).sub_grid(lo, hi)
        zs.append(torch.from_numpy(it["latent"][:, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].copy()))
        conds.append(geometry_channels(grid, it["spacing"], config))
    return torch.stack(zs), torch.stack(conds)


class CropStream(IterableDataset):
    def __init__(self, items, config: DiffusionConfig, crops: tuple[int, int], batch: int, steps: int, seed: int) -> None:
        self.items, self.config, self.crops, self.batch, self.steps, self.seed = items, config, crops, batch, steps, seed

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        rng = np.random.default_rng([self.seed, wid, int(torch.initial_seed() % 2**31)])
        lo, hi = self.crops
        for _ in range(wid, self.steps, nw):
            crop = int(rng.integers(lo // 4, hi // 4 + 1)) * 4
            # the same voxels per batch whatever the crop: small crops come in larger batches
            batch = max(1, int(round(self.batch * (lo / crop) ** 3)))
            yield crop_batch(self.items, self.config, crop, batch, rng)


class LatentDataModule(L.LightningDataModule):
    """Latents of the training volumes for the latent diffusion model.

    Args:
        autoencoder: the generative autoencoder (model name or card path) whose latents are learnt.
        train, val, modality, synthetic, tissue_maps: the volumes, as for the autoencoder
            (:class:`~medil_backend.training.data.VolumeDataModule`; packs need numpy only).
        cache: ``.npz`` file holding the encoded latents (built on first use, reused after).
        encodings: latents per training volume (random resolution and orientation each).
        val_encodings: latents per validation volume.
        thick_prob, thick_mm, max_rotation_deg: the augmentation (see the module docstring).
        mirror_prob: the share of encodings of a head mirrored left-right first.
        pad_mm, box_mm: background around each head before encoding, and the cube its latent is
            extended to with the background's latent (see :func:`encode_augmented`); 0: neither.
        crop: (smallest, largest) crop side in latent voxels; batch: crops per batch at the smallest side.
        steps_per_epoch, val_steps, num_workers, seed: as usual.
        heads: instead of ``train``, new whole heads made from these real heads (and ``tissue_maps``,
            a dict) by :func:`~medil_backend.training.heads.whole_head`: ``{"sources": [paths],
            "count": N, "sampler": {HeadConfig fields}}``; each is encoded ``encodings`` times.
    """

    def __init__(
        self,
        autoencoder: str,
        train: str | None = None,
        val: str | list[str] | None = None,
        modality: str = "mri",
        synthetic: int = 0,
        tissue_maps: dict | str | None = None,
        cache: str = "runs/latents/latents.npz",
        encodings: int = 8,
        val_encodings: int = 2,
        thick_prob: float = 0.3,
        thick_mm: tuple[float, float] = (3.0, 7.0),
        max_rotation_deg: float = 15.0,
        pad_mm: float = 0.0,
        box_mm: float = 0.0,
        mirror_prob: float = 0.0,
        crop: tuple[int, int] = (24, 32),
        batch: int = 4,
        steps_per_epoch: int = 200,
        val_steps: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        heads: dict | None = None,
    ) -> None:
        super().__init__()
        if (train is None) == (heads is None):
            raise MedILError("give the latent diffusion model's training volumes as train or as heads, not both")
        self.heads = heads
        self.autoencoder, self.train_source, self.val_source = autoencoder, train, val
        self.modality, self.synthetic, self.tissue_maps = modality, synthetic, tissue_maps
        self.cache, self.encodings, self.val_encodings = Path(cache), encodings, val_encodings
        self.thick_prob, self.thick_mm, self.max_rotation_deg = thick_prob, tuple(thick_mm), max_rotation_deg
        self.pad_mm, self.box_mm, self.mirror_prob = pad_mm, box_mm, mirror_prob
        self.crop, self.batch = tuple(crop), batch
        self.steps_per_epoch, self.val_steps, self.num_workers, self.seed = steps_per_epoch, val_steps, num_workers, seed
        self.train_items: list[dict] = []
        self.val_items: list[dict] = []
        self.meta: dict = {}
        self.config = DiffusionConfig()

    def build_cache(self) -> None:
        from ..models import latent_space_ref, load_model
        from .data import VolumeDataModule

        ae = load_model(self.autoencoder)
        ae.net.to("cuda" if torch.cuda.is_available() else "cpu")  # encoding on the GPU machine takes seconds, not minutes
        vdm = VolumeDataModule(
            self.train_source, self.val_source, self.modality, synthetic=self.synthetic, tissue_maps=self.tissue_maps, seed=self.seed
        )
        if self.heads is None:
            vdm.setup()
            train_vols, val_vols, manifest = vdm.train_volumes, vdm.val_volumes, vdm.manifest()
        else:
            train_vols, manifest = self._made_heads()
            val_vols = vdm._load(self.val_source) if self.val_source else []
            manifest["val"] = [{"file": v["path"]} for v in val_vols]
        rng = np.random.default_rng(self.seed)
        aug = self.augmentation
        items = []
        for split, vols, n in (("train", train_vols, self.encodings), ("val", val_vols, self.val_encodings)):
            for vol in vols:
                for _ in range(n):
                    it = encode_augmented(ae.net, vol, rng, **aug)
                    it["name"] = f"{split}:{it['name']}"
                    items.append(it)
            print(json.dumps({"encoded": split, "latents": sum(it["name"].startswith(split) for it in items)}), flush=True)
        real = [v for v in train_vols if not v["path"].startswith(("synthetic-", "head-"))] or train_vols
        meta = {
            "native_spaces": fit_native_mixture(np.stack([native_space(v["grid"]) for v in real])),
            "autoencoder": latent_space_ref(ae),
            "modality": self.modality,
            "manifest": manifest,
            "augmentation": dict(aug, thick_mm=list(self.thick_mm), encodings=self.encodings),
        }
        save_latents(self.cache, items, meta)

    def _made_heads(self) -> tuple[list[dict], dict]:
        """``heads["count"]`` whole heads made from ``heads["sources"]`` (and the tissue maps), and their manifest."""
        from .heads import HeadConfig, head_sources, whole_head

        cfg = HeadConfig(**dict(self.heads.get("sampler") or {}))
        sources = head_sources(self.heads["sources"], self.tissue_maps if isinstance(self.tissue_maps, dict) else None)
        rng = np.random.default_rng([self.seed, 7])
        vols = [whole_head(sources, cfg, rng, f"head-{i}") for i in range(int(self.heads["count"]))]
        manifest = {
            "train": [{"file": s.name, "sha256": s.sha256} for s in sources],
            "synthetic": {
                "generator": "medil_backend.training.heads.whole_head",
                "seed": self.seed,
                "count": len(vols),
                "sampler": cfg.__dict__,
            },
        }
        return vols, manifest

    def setup(self, stage: str | None = None) -> None:
        if self.train_items:
            return
        if not self.cache.exists():
            self.build_cache()
        items, self.meta = load_latents(self.cache)
        from ..models import load_model, same_latent_space

        if not same_latent_space(self.meta["autoencoder"], load_model(self.autoencoder)):
            raise MedILError(
                f"the latents in {self.cache} were encoded by another encoder than {self.autoencoder}'s; delete the cache file"
            )
        cached = {k: self.meta.get("augmentation", {}).get(k, 0.0) for k in ("pad_mm", "box_mm", "mirror_prob")}
        if cached != {"pad_mm": self.pad_mm, "box_mm": self.box_mm, "mirror_prob": self.mirror_prob}:
            raise MedILError(
                f"the latents in {self.cache} were encoded with {cached}, not the recipe's; delete the cache file or name another"
            )
        self.train_items = [it for it in items if it["name"].startswith("train:")]
        self.val_items = [it for it in items if it["name"].startswith("val:")]
        if not self.train_items:
            raise MedILError(f"{self.cache} holds no training latents")

    @property
    def augmentation(self) -> dict:
        return {k: getattr(self, k) for k in ("thick_prob", "thick_mm", "max_rotation_deg", "pad_mm", "box_mm", "mirror_prob")}

    @property
    def autoencoder_ref(self) -> dict:
        return dict(self.meta["autoencoder"])

    def latent_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and standard deviation over every training latent voxel."""
        flat = np.concatenate([it["latent"].reshape(it["latent"].shape[0], -1) for it in self.train_items], axis=1)
        return torch.from_numpy(flat.mean(1)).float(), torch.from_numpy(flat.std(1)).float().clamp_min(1e-6)

    def position_maps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std maps of the training latents over the group space (see :func:`position_maps`)."""
        return position_maps(self.train_items, self.config)

    def manifest(self) -> dict:
        return dict(self.meta.get("manifest", {}), latents={"cache": self.cache.name, **self.meta.get("augmentation", {})})

    def train_dataloader(self) -> DataLoader:
        ds = CropStream(self.train_items, self.config, self.crop, self.batch, self.steps_per_epoch, self.seed)
        return DataLoader(ds, batch_size=None, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_items:
            return []
        rng = np.random.default_rng(12345)
        batches = [crop_batch(self.val_items, self.config, self.crop[0], self.batch, rng) for _ in range(self.val_steps)]
        return DataLoader(batches, batch_size=None)
