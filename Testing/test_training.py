"""Training: sampling invariants, degradations, the three stages, DDP on gloo, export -> registry -> reconstruct."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import EXAMPLE, REPO, TINY_CONFIG

from medil_backend.acquisition import slice_gap, thick_slices
from medil_backend.geometry import Grid
from medil_backend.training.patches import input_shape_for, sample_patch

pytest.importorskip("lightning", reason="needs the train extra")
pytestmark = pytest.mark.train  # the whole file needs the train extra


def _grid_inside(inner_pts, outer: Grid, tol=1e-6):
    vox = outer.world_to_voxel(inner_pts)
    return np.all(vox >= -0.5 - tol) and np.all(vox <= np.array(outer.shape) - 0.5 + tol)


@pytest.mark.parametrize("seed", range(5))
def test_sampling_grids_are_exscribed(seed):
    rng = np.random.default_rng(seed)
    rot = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    grid = Grid.from_parts((60, 50, 40), rng.uniform(0.5, 3, 3), rot, rng.uniform(-50, 50, 3))
    array = rng.random(grid.shape).astype(np.float32)
    buffer = 5.0
    shape = input_shape_for(grid, 16, 3.0, buffer)
    s = sample_patch(array, grid, rng, 16, 3.0, buffer, input_shape=shape)
    # the output patch is a crop of the native grid: same spacing and direction, voxels unchanged
    np.testing.assert_allclose(s.out_grid.affine[:3, :3], grid.affine[:3, :3])
    start = np.rint(grid.world_to_voxel(s.out_grid.origin[None])[0]).astype(int)
    np.testing.assert_array_equal(s.target, array[tuple(slice(a, a + 16) for a in start)])
    # C_Z encloses C_X̂ with the buffer; C_X encloses C_Z
    assert _grid_inside(s.out_grid.edge_corners(buffer), s.z_grid)
    assert _grid_inside(s.z_grid.edge_corners(), s.x_grid)
    assert s.x.shape == shape == s.x_grid.shape


def test_thick_slice_centre_is_the_centre_of_its_voxels():
    grid = Grid.from_parts((8, 6, 30), [0.8, 0.9, 1.0], np.diag([-1.0, 1, 1]), [10, 20, 30])
    array = np.random.default_rng(0).random(grid.shape).astype(np.float32)
    for profile in ("rect", "gaussian"):
        out, g = thick_slices(array, grid, axis=2, factor=5, profile=profile)
        assert out.shape == (8, 6, 6) and np.allclose(g.spacing, [0.8, 0.9, 5.0])
        for k in range(6):
            centre = grid.voxel_to_world(np.array([0, 0, 5 * k + 2.0]))
            np.testing.assert_allclose(g.voxel_to_world(np.array([0, 0, float(k)])), centre, atol=1e-9)
        if profile == "rect":
            np.testing.assert_allclose(out[..., 1], array[..., 5:10].mean(-1), rtol=1e-5)
    gapped, gg = slice_gap(out, g, 2, 2)
    np.testing.assert_allclose(gg.voxel_to_world(np.array([0, 0, 1.0])), g.voxel_to_world(np.array([0, 0, 2.0])))
    assert gapped.shape[2] == 3


def _module(stage, **kw):
    from medil_backend.training.lit import MedILLitModule

    cfg = TINY_CONFIG | {"decoder_norm": "none"}
    return MedILLitModule(model=cfg | kw.pop("model", {}), stage=stage, lr=3e-3, **kw)


def _fixed_batch(mode):
    from medil_backend.intensity import fit_normalizer
    from medil_backend.io import read_volume
    from medil_backend.training.data import SamplerConfig, foreground_centres, make_batch

    v = read_volume(EXAMPLE)
    a = fit_normalizer(v.array, "mri").forward(v.array)
    vol = {"array": a, "grid": v.grid, "centres": foreground_centres(a, "mri")}
    cfg = SamplerConfig(
        mode=mode,
        patch=12,
        batch=2,
        latent_spacing=4.0,
        latent_buffer_mm=4.0,
        global_spacing=6.0,
        global_shape=(16, 16, 16),
        degrade_prob=1.0,
        noise_max=0.0,
        bias_prob=0.0,
    )
    return make_batch(vol, cfg, np.random.default_rng(0))


@pytest.mark.parametrize(
    "stage,mode,extra", [(1, "global", {}), (2, "patch", {}), (3, "patch", {}), (2, "patch", {"model": {"kl": True, "global_skip": False}})]
)
def test_a_few_steps_lower_the_loss(stage, mode, extra):
    torch.manual_seed(0)
    extra = dict(extra)
    extra["model"] = {"global_skip": False} | extra.get("model", {})  # start far from the optimum, so progress shows
    lit = _module(stage, **extra)
    batch = _fixed_batch(mode)
    opts = lit.configure_optimizers()
    opt = opts[0]
    first = None
    frozen = {n: p.detach().clone() for n, p in lit.net.encoder.named_parameters()}
    latent_sha = lit.net.latent_sha256()
    for _ in range(12):
        parts, y_hat = lit.losses(batch, sample=False)
        loss = parts["l1"] + 1e-6 * parts.get("kl", 0.0)
        first = float(parts["l1"].detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(lit.losses(batch, sample=False)[0]["l1"].detach()) < 0.9 * first
    if stage == 3:  # decoder-only: the encoder did not move, and the latent space (its sha256) is the same
        for n, p in lit.net.encoder.named_parameters():
            torch.testing.assert_close(p, frozen[n])
    assert (lit.net.latent_sha256() == latent_sha) == (stage == 3)


def test_guided_fidelity_model_trains_without_starving_its_decoder():
    """A global-skip model with a guided decoder starts near trilinear, and every decoder layer gets gradient
    from the first step (a zero-initialised head would starve them: the residual collapsed to zero)."""
    torch.manual_seed(0)
    lit = _module(2, model={"guide_decoder": True})
    batch = _fixed_batch("patch")
    opt = lit.configure_optimizers()[0]
    first = float(lit.losses(batch, sample=False)[0]["l1"].detach())
    for step in range(15):
        loss = lit.losses(batch, sample=False)[0]["l1"]
        opt.zero_grad()
        loss.backward()
        if step == 0:
            for name, p in lit.net.decoder.named_parameters():
                assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
        opt.step()
    assert float(lit.losses(batch, sample=False)[0]["l1"].detach()) < first


def test_fixed_grid_baseline_trains_on_the_same_batches():
    """The conv baseline (fixed 1 mm-style grid) is trained by the same Lightning module and data."""
    from medil_backend.nn.fixed_grid import FixedGridAutoencoder
    from medil_backend.training.lit import MedILLitModule

    torch.manual_seed(0)
    lit = MedILLitModule(
        fixed_grid={"spacing": 2.0, "channels": [8, 8], "latent_channels": 2, "norm_num_groups": 4}, lr=1e-2, kl_weight=1e-6
    )
    assert isinstance(lit.net, FixedGridAutoencoder)
    batch = _fixed_batch("patch")
    opt = lit.configure_optimizers()[0]
    first = None
    for _ in range(12):
        parts, y_hat = lit.losses(batch, sample=False)
        assert y_hat.shape == batch[2].shape and "kl" in parts
        first = float(parts["l1"].detach()) if first is None else first
        opt.zero_grad()
        (parts["l1"] + 1e-6 * parts["kl"]).backward()
        opt.step()
    assert float(lit.losses(batch, sample=False)[0]["l1"].detach()) < 0.9 * first


def test_cosine_schedule_ends_at_five_percent():
    lit = _module(2, cosine_steps=10)
    opts, scheds = lit.configure_optimizers()
    lrs = []
    for _ in range(15):
        opts[0].step()
        scheds[0].step()
        lrs.append(opts[0].param_groups[0]["lr"])
    assert lrs[0] < 3e-3 and all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lrs[-1] == pytest.approx(0.05 * 3e-3)


def test_datamodule_reads_folder_and_manifests(tmp_path):
    from medil_backend.training.data import find_volumes

    (tmp_path / "sub-01" / "anat").mkdir(parents=True)
    target = tmp_path / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    target.write_bytes(EXAMPLE.read_bytes())
    assert find_volumes(tmp_path) == [target]
    (tmp_path / "m.csv").write_text("path\nsub-01/anat/sub-01_T1w.nii.gz\n")
    assert find_volumes(tmp_path / "m.csv") == [target.resolve()]
    (tmp_path / "m.json").write_text(json.dumps({"files": [{"path": "sub-01/anat/sub-01_T1w.nii.gz"}]}))
    assert find_volumes(tmp_path / "m.json") == [target.resolve()]


def train_command(root) -> list[str]:
    """`medil train` on the tiny recipe and the bundled example volume, logging under ``root``."""
    config = str(REPO / "training/configs/tiny-test.yaml")
    data = str(EXAMPLE.parent)
    return [
        sys.executable,
        "-m",
        "medil_backend",
        "train",
        "--config",
        config,
        "--data.train",
        data,
        "--data.val",
        data,
        "--trainer.default_root_dir",
        str(root),
    ]


@pytest.mark.slow  # about 40 s on 2 cores
def test_fit_export_registry_reconstruct(tmp_path, small_mri):
    """`medil train` (LightningCLI) -> ExportWeights -> $MEDIL_MODELS -> `medil reconstruct`."""
    out = tmp_path / "models"
    cmd = [
        *train_command(tmp_path / "runs"),
        "--model.adv_weight",
        "0.01",  # the adversarial path runs too
        "--trainer.callbacks+=medil_backend.training.cli.ExportWeights",
        "--trainer.callbacks.folder",
        str(out),
        "--trainer.callbacks.name",
        "tiny-trained",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = json.loads((out / "tiny-trained.json").read_text())
    assert card["training"]["data"]["train"][0]["sha256"] and card["metrics"]["val_l1_best"] is not None
    env = dict(os.environ, MEDIL_MODELS=str(out))
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "medil_backend",
            "reconstruct",
            str(small_mri),
            str(tmp_path / "r.nii.gz"),
            "--model",
            "tiny-trained",
            "--spacing",
            "1.5",
            "--progress",
            "none",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert res.returncode == 0, res.stderr
    # `medil export` turns a run's checkpoint (e.g. of a run stopped early) into the same model
    ckpt = sorted((tmp_path / "runs").rglob("epoch=*.ckpt"))[-1]
    medil = [sys.executable, "-m", "medil_backend", "export"]
    cfg = str(REPO / "training/configs/tiny-test.yaml")
    exp = subprocess.run(
        [*medil, str(ckpt), "--config", cfg, "--folder", str(out), "--name", "tiny-exported"], capture_output=True, text=True, cwd=REPO
    )
    assert exp.returncode == 0, exp.stderr[-3000:]
    again = json.loads((out / "tiny-exported.json").read_text())
    assert again["sha256"] == card["sha256"] and again["training"]["steps_done"] == card["training"]["steps_done"]
    bad = subprocess.run([*medil, str(tmp_path / "no.ckpt"), "--config", cfg], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 1 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr
    # an existing model is not replaced without --overwrite; a corrupt checkpoint is a one-line error
    before = (out / "tiny-exported.json").read_bytes()
    again_cmd = [*medil, str(ckpt), "--config", cfg, "--folder", str(out), "--name", "tiny-exported"]
    twice = subprocess.run(again_cmd, capture_output=True, text=True, cwd=REPO)
    assert twice.returncode == 1 and "--overwrite" in twice.stderr and (out / "tiny-exported.json").read_bytes() == before
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    corrupt = subprocess.run(
        [*medil, str(junk), "--config", cfg, "--folder", str(out), "--name", "x"], capture_output=True, text=True, cwd=REPO
    )
    assert corrupt.returncode == 1 and "not a Lightning checkpoint" in corrupt.stderr and "Traceback" not in corrupt.stderr
    assert not (out / "x.json").exists() and not list(out.glob(".*.part"))


def test_ddp_on_gloo_with_two_processes(tmp_path):
    cmd = [
        *train_command(tmp_path),
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "lightning.pytorch.strategies.DDPStrategy",
        "--trainer.strategy.process_group_backend",
        "gloo",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert "distributed_backend=gloo" in text and "All distributed processes registered" in text
    assert "max_epochs=1` reached" in text


def test_evaluate_returns_finite_metrics(tiny_model, small_mri):
    from medil_backend.evaluate import evaluate, markdown_table, target_table

    res = evaluate([small_mri], {"tiny": tiny_model, "tiny-interp": tiny_model}, thick_mm=(4.0, 8.0), device="cpu")
    mean = res["mean"]
    assert set(mean) == {"recon", "sr4mm", "sr8mm"}
    for task in mean.values():
        assert set(task) == {"tiny", "tiny-interp", "trilinear", "bspline"}
        for m in task.values():
            assert all(np.isfinite(v) or k.startswith("psnr") for k, v in m.items())
    assert "| sr8mm | bspline |" in markdown_table(res)
    assert "| recon | tiny |" in markdown_table(res, volume=Path(small_mri).name)
    targets = target_table(res, ["tiny"])
    gain = res["mean"]["sr4mm"]["tiny"]["psnr_mask"] - res["mean"]["sr4mm"]["bspline"]["psnr_mask"]
    assert f"{gain:+.2f} dB" in targets and targets.count("| tiny |") == 1


def test_fixed_grid_baseline_trains_exports_and_evaluates(tmp_path, small_mri, monkeypatch):
    """The paper's fixed-grid conv autoencoder (MONAI AutoencoderKL on a 1 mm grid) as a registry model."""
    from medil_backend.evaluate import evaluate
    from medil_backend.io import read_volume
    from medil_backend.models import export_model, load_model
    from medil_backend.nn.fixed_grid import FixedGridAutoencoder, FixedGridConfig
    from medil_backend.ops import run_model
    from medil_backend.ops.fixed_grid import fixed_grid_for

    torch.manual_seed(0)
    net = FixedGridAutoencoder(FixedGridConfig(spacing=2.0, channels=(8, 8), latent_channels=2, norm_num_groups=4))
    x = torch.rand(2, 1, 8, 8, 8)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    first = None
    for _ in range(15):
        y, mu, sigma = net(x, sample=False)
        loss = (y - x).abs().mean()
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float((net(x)[0] - x).abs().mean().detach()) < first
    export_model(net, tmp_path / "m", "conv-baseline", {"tasks": ["reconstruct"], "modality": "mri"})
    monkeypatch.setenv("MEDIL_MODELS", str(tmp_path / "m"))
    loaded = load_model("conv-baseline")
    assert isinstance(loaded.net, FixedGridAutoencoder) and loaded.card["latent"]["spacing_mm"] == 4.0
    v = read_volume(small_mri)
    work = fixed_grid_for(v.grid, 2.0, 2)
    assert all(s % 2 == 0 for s in work.shape)
    np.testing.assert_allclose(work.edge_corners().mean(0), v.grid.edge_corners().mean(0), atol=1e-6)  # centred
    out = run_model(v, v.grid, loaded.net, device="cpu")
    assert out.grid.same_as(v.grid) and np.isfinite(out.array).all()
    res = evaluate([small_mri], {"conv": loaded.net}, thick_mm=(4.0,), device="cpu", baselines=("trilinear",))
    assert np.isfinite(res["mean"]["sr4mm"]["conv"]["psnr"])
    # held-out metrics go into the card; the weights (and their checked sha256) are untouched
    from medil_backend.evaluate import record_in_card

    record_in_card(tmp_path / "m" / "conv-baseline.json", res, "conv", "medil evaluate x")
    card = load_model("conv-baseline").card
    assert card["metrics"]["held_out"]["command"] == "medil evaluate x"
    assert card["metrics"]["held_out"]["mean"]["sr4mm"]["trilinear"] == res["mean"]["sr4mm"]["trilinear"]


def test_synthetic_volumes_from_tissue_maps():
    from conftest import shared

    from medil_backend.io import read_volume
    from medil_backend.training.synth import synthesize, tissue_labels

    gm, wm, brain = (read_volume(shared(f"mri/mni152_2009a_{n}_1mm.nii.gz")) for n in ("gm", "wm", "t1_brain"))
    sl = (slice(60, 130), slice(80, 150), slice(70, 110))
    labels = tissue_labels(gm.array[sl], wm.array[sl], brain.array[sl])
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    rng = np.random.default_rng(0)
    a, b = synthesize(labels, brain.affine, rng), synthesize(labels, brain.affine, rng)
    assert a.shape == labels.shape and np.isfinite(a.array).all()
    assert abs(np.percentile(a.array, 99) - 1) < 1e-3
    # different contrasts: grey/white ordering or ratio changes between draws
    ratio = [v.array[labels == 2].mean() / v.array[labels == 3].mean() for v in (a, b)]
    assert abs(ratio[0] - ratio[1]) > 0.01


@pytest.mark.parametrize("config", sorted(p.relative_to(REPO).as_posix() for p in (REPO / "training" / "configs").rglob("*.yaml")))
def test_every_recipe_parses(config):
    proc = subprocess.run(
        [sys.executable, "-m", "medil_backend", "train", "--config", config, "--print_config"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "class_path: medil_backend.training" in proc.stdout or "model:" in proc.stdout


def test_train_with_no_volumes_is_a_user_error(tmp_path):
    proc = subprocess.run([*train_command(tmp_path), "--data.train", str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "no volumes found" in proc.stderr
