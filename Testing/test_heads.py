"""Heads made on the fly (medil_backend/training/heads.py): grids, deformations, contrasts, and a real
`medil train` run of a heads recipe through export."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO, shared

from medil_backend.geometry import Grid

pytest.importorskip("lightning", reason="needs the train extra")
pytestmark = pytest.mark.train

from medil_backend.nn.resample import sample_on_grids  # noqa: E402
from medil_backend.training.heads import Deformation, HeadConfig, HeadSource, make_head_batch  # noqa: E402


def _inside(inner: Grid, outer: Grid, tol: float = 1e-6) -> bool:
    vox = outer.world_to_voxel(inner.edge_corners())
    return bool(np.all(vox >= -0.5 - tol) and np.all(vox <= np.asarray(outer.shape) - 0.5 + tol))


@pytest.fixture(scope="module")
def sources():
    path = shared("mri/colin27_t1_1mm.nii.gz")
    img = nib.load(path)
    a = np.asarray(img.dataobj, dtype=np.float32)[40:140, 50:170, 40:140]  # a crop: the head's middle, quick to filter
    grid = Grid(img.shape[:3], img.affine).sub_grid((40, 50, 40), (140, 170, 140))
    return [HeadSource.from_volume("colin27-crop", a, grid)]


@pytest.mark.parametrize("native", [0.0, 1.0])
def test_a_batch_has_consistent_grids_and_the_input_sees_the_target(sources, native):
    cfg = HeadConfig(patch=24, batch=2, native_prob=native, thick_prob=0.0, noise_max=0.0)
    rng = np.random.default_rng(3)
    x, xg, y, og, zg = make_head_batch(sources, cfg, rng)
    assert x.shape[:2] == (2, 1) and y.shape == (2, 1, 24, 24, 24)
    for b in range(2):
        assert x.shape[2:] == xg[b].shape and og[b].shape == (24, 24, 24) and np.allclose(og[b].spacing, 1.0)
        assert _inside(og[b], zg[b]) and _inside(zg[b], xg[b], tol=0.6)  # the latent covers the target, the input the latent
        seen = sample_on_grids(x[b : b + 1], [xg[b]], [og[b]])[0, 0].numpy()
        r = np.corrcoef(seen.ravel(), y[b, 0].numpy().ravel())[0, 1]
        assert r > (0.999 if native == 0.0 else 0.9), r  # the input shows the target's head (on its own grid)
    if native == 0.0:  # the 1 mm input grid the target is cut from
        assert np.allclose(xg[0].spacing, 1.0) and np.allclose(xg[0].direction, og[0].direction)


def test_heads_are_reproducible_from_the_seed_and_differ_between_draws(sources):
    cfg = HeadConfig(patch=16, batch=2)
    a = make_head_batch(sources, cfg, np.random.default_rng(7))
    b = make_head_batch(sources, cfg, np.random.default_rng(7))
    c = make_head_batch(sources, cfg, np.random.default_rng(8))
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[2], b[2])
    assert a[2].shape != c[2].shape or not torch.equal(a[2], c[2])


def test_deformations_are_smooth_and_invertible():
    cfg = HeadConfig(deform_prob=1.0, deform_mm=6.0)
    for seed in range(5):
        d = Deformation(np.random.default_rng(seed), np.zeros(3), 40.0, cfg)
        # the map's Jacobian on a fine set of points: positive determinant everywhere (no fold)
        pts = np.stack(np.meshgrid(*[np.linspace(-35, 35, 15)] * 3, indexing="ij"), -1).reshape(-1, 3)
        h = 0.5
        jac = np.stack([(d(pts + h * e) - d(pts - h * e)) / (2 * h) for e in np.eye(3)], axis=-1)
        det = np.linalg.det(jac)
        assert det.min() > 0.2, (seed, det.min())
        assert np.abs(d(pts) - pts).max() < 40  # a head stays a head


def test_tissue_map_heads_take_random_contrasts():
    gm = np.zeros((30, 30, 30), np.float32)
    wm = np.zeros_like(gm)
    gm[8:22, 8:22, 8:22] = 1.0
    wm[12:18, 12:18, 12:18] = 1.0
    gm[12:18, 12:18, 12:18] = 0.0
    brain = ((gm + wm) > 0).astype(np.float32) * 100 + 1
    src = HeadSource.from_tissue_maps(gm, wm, brain, Grid.from_parts((30, 30, 30), 1.0))
    cfg = HeadConfig(patch=12, batch=1, native_prob=0.0, deform_prob=0.0, noise_max=0.0, bias=0.0, latent_buffer_mm=0.0, max_tilt_deg=0.0)
    means = []
    for seed in range(4):
        _, _, y, og, _ = make_head_batch([src], replace(cfg), np.random.default_rng(seed))
        means.append(float(y.mean()))
    assert np.ptp(means) > 0.05  # every head a new contrast


def test_medil_train_on_heads_runs_and_exports_a_card_with_the_generator(tmp_path):
    """A heads recipe through LightningCLI: real forward/backward passes on made heads, validation, export."""
    recipe = tmp_path / "heads.yaml"
    colin = shared("mri/colin27_t1_1mm.nii.gz")
    recipe.write_text(
        f"""
model:
  stage: 2
  lr: 0.001
  kl_weight: 0.000001
  posterior_sample: false
  model:
    channels: [4, 8]
    factors: [2]
    n_units: 1
    encoder_norm: channel
    decoder_norm: channel
    latent_channels: 4
    latent_spacing: 4.0
    lte_frequencies: 8
    inr_width: 8
    inr_blocks: 1
    kl: true
    latent_base: true
data:
  heads: [{colin}]
  val: [{colin}]
  steps_per_epoch: 3
  val_steps: 1
  sampler: {{patch: 12, batch: 1, latent_buffer_mm: 4.0}}
trainer:
  accelerator: cpu
  devices: 1
  max_epochs: 1
  logger: false
  enable_progress_bar: false
  default_root_dir: {tmp_path / "runs"}
  callbacks:
    - class_path: medil_backend.training.cli.ExportWeights
      init_args: {{folder: {tmp_path / "export"}, name: heads-tiny, tasks: [reconstruct]}}
"""
    )
    r = subprocess.run([sys.executable, "-m", "medil_backend", "train", "--config", str(recipe)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    card = json.loads((tmp_path / "export" / "heads-tiny.json").read_text())
    assert card["config"]["latent_base"] is True
    data = card["training"]["data"]
    assert data["synthetic"]["generator"] == "medil_backend.training.heads" and data["train"][0]["file"] == colin.name
    assert card["training"]["steps_done"] == 3


def test_the_gpu_recipe_trains_the_same_network_from_packs():
    import yaml

    cpu = yaml.safe_load((REPO / "training/configs/cpu/medil-brain-t1-heads.yaml").read_text())
    gpu = yaml.safe_load((REPO / "training/configs/gpu/medil-brain-t1-heads.yaml").read_text())
    assert gpu["model"]["model"] == cpu["model"]["model"]
    assert all(str(p).startswith("packs/") for p in gpu["data"]["heads"] + gpu["data"]["val"] + list(gpu["data"]["tissue_maps"].values()))
    held_out = ("pydeface", "itk_t1", "clinical_t1c_thick")  # the evaluation heads stay out of both
    for recipe in (cpu, gpu):
        names = [str(p) for p in recipe["data"]["heads"] + recipe["data"]["val"]]
        assert not any(h in n for n in names for h in held_out), names


def test_workers_share_the_epochs_steps_and_draw_different_heads(sources):
    from medil_backend.training.heads import HeadStream

    stream = HeadStream(sources, HeadConfig(patch=12, batch=1), steps=4, seed=0)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
    batches = list(loader)
    assert len(batches) == 4
    assert not torch.equal(batches[0][2], batches[1][2])


def test_whole_heads_are_new_heads_on_acquisition_grids(sources):
    """The latent diffusion model's training heads: a whole head at a random 1-2 mm spacing, reproducible, new each draw."""
    from medil_backend.training.heads import whole_head

    cfg = replace(HeadConfig(), spacing_mm=(1.0, 2.0), maps_prob=0.0)
    a = whole_head(sources, cfg, np.random.default_rng(3), "head-0")
    again = whole_head(sources, cfg, np.random.default_rng(3), "head-0")
    other = whole_head(sources, cfg, np.random.default_rng(4), "head-1")
    assert a["array"].shape == a["grid"].shape and np.array_equal(a["array"], again["array"])
    assert np.all(a["grid"].spacing >= 1.0) and np.all(a["grid"].spacing <= 2.0)
    assert np.allclose(a["grid"].direction, sources[0].grid.direction)
    # the grid covers the source's head: its extent in mm is the source's foreground box and a margin
    src_mm = np.ptp(sources[0].centres, axis=0)
    assert np.all(np.asarray(a["grid"].shape) * a["grid"].spacing >= src_mm)
    assert len(a["centres"]) > 1000 and a["array"].max() > 0.5 and a["array"][0, 0, 0] < 0.05  # a head in air
    assert a["grid"].shape != other["grid"].shape or not np.allclose(a["array"], other["array"])


def test_the_latent_diffusion_recipes_share_one_network_and_hold_out_the_evaluation_heads():
    """The CPU and GPU recipes of the diffusion model on the compact latent: one network on one autoencoder, the GPU's
    data from packs (numpy only), and neither trains or validates on the evaluation heads."""
    import yaml

    cpu = yaml.safe_load((REPO / "training/configs/cpu/medil-brain-t1-heads-ldm.yaml").read_text())
    gpu = yaml.safe_load((REPO / "training/configs/gpu/medil-brain-t1-heads-ldm.yaml").read_text())
    assert gpu["model"]["model"] == cpu["model"]["model"] and gpu["data"]["autoencoder"] == cpu["data"]["autoencoder"]
    assert (REPO / cpu["data"]["autoencoder"]).exists() and cpu["model"]["model"]["latent_spacing"] == 2.52
    assert all(str(p).startswith("packs/brain-train.npz#") for p in gpu["data"]["heads"]["sources"] + gpu["data"]["val"])
    held_out = ("pydeface", "itk_t1", "clinical_t1c_thick")
    for recipe in (cpu, gpu):
        names = [str(p) for p in recipe["data"]["heads"]["sources"] + recipe["data"]["val"]]
        assert not any(h in n for n in names for h in held_out), names
