"""Latent diffusion sampling: the denoiser learns, its conditioning carries the geometry, samples land
exactly on the requested grid, seeds reproduce, and the CLI refuses what it cannot do."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import DEFAULT_SPACE, EXAMPLE, TINY_LDM

from medil_backend.geometry import Grid, affine_from_parts, direction_from_code
from medil_backend.nn.diffusion import DiffusionConfig, LatentDiffusionUNet, geometry_channels, source_spacing_along


def test_a_tiny_diffusion_model_learns_a_fixed_batch():
    torch.manual_seed(0)
    net = LatentDiffusionUNet(DiffusionConfig.from_dict(TINY_LDM))
    grid = Grid((12, 12, 8), affine_from_parts([4, 4, 4], np.eye(3), [-20, -20, -10]))
    cond = geometry_channels(grid, [1, 1, 1], net.config)[None].expand(2, -1, -1, -1, -1)
    z0 = torch.sin(cond[:, :2] * 6.0)  # a smooth, position-dependent "latent"
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    g = torch.Generator().manual_seed(0)

    def loss() -> float:
        with torch.no_grad():
            return float(np.mean([net.training_loss(z0, cond, generator=torch.Generator().manual_seed(k)).item() for k in range(8)]))

    before = loss()
    for _ in range(60):
        opt.zero_grad()
        net.training_loss(z0, cond, generator=g).backward()
        opt.step()
    assert loss() < 0.7 * before


@pytest.mark.train  # needs the train extra (Lightning, MONAI, TorchIO)
def test_a_noise_shift_divides_the_schedules_signal_to_noise_ratio_and_a_continued_run_takes_its_own(tmp_path):
    from safetensors.torch import save_file

    from medil_backend.nn.diffusion import cosine_alphas_cumprod
    from medil_backend.training.diffusion_lit import DiffusionLitModule

    plain, shifted = cosine_alphas_cumprod(1000), cosine_alphas_cumprod(1000, shift=4.0)
    snr = lambda a: a / (1 - a)  # noqa: E731
    torch.testing.assert_close(snr(shifted), snr(plain) / 16, rtol=1e-9, atol=0)
    assert torch.all(shifted[1:] < shifted[:-1]) and 0 < float(shifted[-1]) < float(plain[-1])
    with pytest.raises(ValueError, match="noise shift"):
        cosine_alphas_cumprod(10, shift=0.0)
    # the network's buffer is its config's schedule; weights trained with another schedule continue with this run's
    net = LatentDiffusionUNet(DiffusionConfig.from_dict({**TINY_LDM, "noise_shift": 3.0}))
    torch.testing.assert_close(net.alphas_cumprod, cosine_alphas_cumprod(TINY_LDM["timesteps"], shift=3.0).float())
    old = LatentDiffusionUNet(DiffusionConfig.from_dict(TINY_LDM))
    save_file(old.state_dict(), str(tmp_path / "old.safetensors"))
    lit = DiffusionLitModule(model={**TINY_LDM, "noise_shift": 3.0}, init_weights=str(tmp_path / "old.safetensors"))
    torch.testing.assert_close(lit.net.alphas_cumprod, net.alphas_cumprod)
    torch.testing.assert_close(lit.ema.alphas_cumprod, net.alphas_cumprod)
    torch.testing.assert_close(lit.net.stem.weight, old.stem.weight)
    assert DiffusionConfig.from_dict(TINY_LDM).noise_shift == 1.0  # cards written before the option read as unshifted
    # "noise to strength s" (super-resolution cycles) corrupts as much whatever the shift: an earlier step when shifted
    assert [old.step_for_strength(s) for s in (0.0, 0.3, 1.0)] == [1, round(0.3 * 99), 99]
    t = net.step_for_strength(0.3)
    assert t < old.step_for_strength(0.3)
    reference = float(cosine_alphas_cumprod(100)[round(0.3 * 99)])
    assert abs(float(net.alphas_cumprod[t]) - reference) <= min(abs(float(net.alphas_cumprod[t + d]) - reference) for d in (-1, 1))


def test_an_interpolated_shift_runs_from_its_low_noise_shift_to_its_high_noise_one():
    """Hoogeboom et al.'s shifted interpolated schedule: log-SNR shifted by -2 log(shift) where log(shift) runs linearly
    in t from noise_shift_low (low noise: a voxel's detail, as unshifted) to noise_shift (at T: the layout)."""
    from medil_backend.nn.diffusion import cosine_alphas_cumprod

    T = 1000
    plain, interp = cosine_alphas_cumprod(T), cosine_alphas_cumprod(T, shift=8.0, shift_low=1.0)
    log_ratio = torch.log(interp / (1 - interp)) - torch.log(plain / (1 - plain))
    torch.testing.assert_close(log_ratio, -2 * math.log(8.0) * torch.arange(1, T + 1, dtype=torch.float64) / T, rtol=0, atol=1e-9)
    assert torch.all(interp[1:] < interp[:-1])  # still a schedule: more noise at every step
    torch.testing.assert_close(cosine_alphas_cumprod(T, shift=8.0, shift_low=8.0), cosine_alphas_cumprod(T, shift=8.0))
    with pytest.raises(ValueError, match="noise shift"):
        cosine_alphas_cumprod(10, shift=8.0, shift_low=-1.0)
    net = LatentDiffusionUNet(DiffusionConfig.from_dict({**TINY_LDM, "noise_shift": 8.0, "noise_shift_low": 1.0}))
    torch.testing.assert_close(net.alphas_cumprod, cosine_alphas_cumprod(TINY_LDM["timesteps"], shift=8.0, shift_low=1.0).float())
    # weights of the constant shift are not those of the interpolated one
    constant = LatentDiffusionUNet(DiffusionConfig.from_dict({**TINY_LDM, "noise_shift": 8.0}))
    with pytest.raises(ValueError, match="noise_shift 8.0 \\(from 1.0 at low noise\\)"):
        net.load_state_dict(constant.state_dict())


def test_a_card_whose_noise_shift_disagrees_with_its_weights_is_refused(sampler_dir):
    from medil_backend.errors import MedILError
    from medil_backend.models import load_model

    assert load_model(sampler_dir / "tiny-ldm.json").net.config.noise_shift == 1.0
    card_path = sampler_dir / "tiny-ldm.json"
    card = json.loads(card_path.read_text())
    card["config"]["noise_shift"] = 8.0  # the weights were trained (and their schedule stored) unshifted
    card_path.write_text(json.dumps(card))
    with pytest.raises(MedILError, match="card and weights disagree"):
        load_model(card_path)


def test_a_card_whose_step_count_is_no_number_is_refused_in_one_line(sampler_dir, tmp_path, capsys):
    card_path = sampler_dir / "tiny-ldm.json"
    card = json.loads(card_path.read_text())
    card["sampling"] = {"steps": "many"}
    card_path.write_text(json.dumps(card))
    rc, _, err = run(["sample", tmp_path / "s.nii.gz", "--model", "tiny-ldm", "--progress", "none"], capsys)
    assert rc != 0 and "sampling.steps" in err and "--steps" in err and "Traceback" not in err
    assert not list(tmp_path.glob("s*"))


def test_position_standardisation_reads_the_maps_where_each_latent_voxel_lies():
    """The mean and std maps are read at each latent voxel's place in the group space, whatever the latent grid's
    orientation and field of view, and standardising round-trips."""
    cfg = DiffusionConfig.from_dict({**TINY_LDM, "standardise": "position", "group_lo": [-20, -24, -16], "group_hi": [20, 24, 16]})
    assert cfg.map_shape() == (11, 13, 9)
    net = LatentDiffusionUNet(cfg)
    with torch.no_grad():
        net.mean_map.normal_()
        net.std_map.uniform_(0.5, 2.0)
    # a grid whose voxels are the maps' voxels reads them exactly, along the right axes
    grid = Grid(cfg.map_shape(), affine_from_parts([4, 4, 4], np.eye(3), cfg.group_lo))
    mean, std = net.latent_statistics(geometry_channels(grid, [1, 1, 1], cfg)[None])
    torch.testing.assert_close(mean[0], net.mean_map, atol=1e-5, rtol=0)
    torch.testing.assert_close(std[0], net.std_map, atol=1e-5, rtol=0)
    # a partial, flipped (LPS) field of view reads the same values where it meets
    lps = Grid((4, 5, 3), affine_from_parts([4, 4, 4], direction_from_code("LPS"), [8, 4, -8]))
    mean_lps, _ = net.latent_statistics(geometry_channels(lps, [1, 1, 1], cfg)[None])
    i0, j0, k0 = np.rint(grid.world_to_voxel(lps.voxel_to_world(np.zeros((1, 3))))[0]).astype(int)
    torch.testing.assert_close(mean_lps[0], net.mean_map[:, i0 - 3 : i0 + 1, j0 - 4 : j0 + 1, k0 : k0 + 3].flip(1, 2), atol=1e-5, rtol=0)
    z = torch.randn(1, 2, 4, 5, 3)
    cond = geometry_channels(lps, [1, 1, 1], cfg)[None]
    torch.testing.assert_close(net.destandardise(net.standardise(z, cond), cond), z, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="geometry channels"):
        net.standardise(z)


@pytest.mark.train  # needs the train extra (Lightning, MONAI, TorchIO)
def test_position_maps_are_the_training_latents_statistics_where_they_lie():
    from medil_backend.training.latents import MAP_SIGMA, STD_FLOOR, position_maps

    cfg = DiffusionConfig.from_dict({**TINY_LDM, "standardise": "position", "group_lo": [-20, -20, -20], "group_hi": [20, 20, 20]})
    grid = Grid((11, 11, 11), affine_from_parts([4, 4, 4], np.eye(3), [-20, -20, -20]))
    rng = np.random.default_rng(0)
    head = np.zeros((2, 11, 11, 11), np.float32)
    head[:, 3:8, 3:8, 3:8] = 5.0  # a "head" in the middle, air around it
    items = [{"latent": head + rng.normal(0, 1, head.shape).astype(np.float32) * (head > 0), "affine": grid.affine} for _ in range(6)]
    mean, std = position_maps(items, cfg)
    assert mean.shape == (2, *cfg.map_shape()) and MAP_SIGMA > 0
    assert float(mean[:, 5, 5, 5].min()) > 4.0 and float(mean[:, 0, 0, 0].max()) < 0.5  # the mean head, and air
    overall = np.concatenate([it["latent"].reshape(2, -1) for it in items], 1).std(1)
    np.testing.assert_allclose(std[:, 0, 0, 0].numpy(), STD_FLOOR * overall, rtol=1e-5)  # air varies by nothing: the floor
    assert float(std[:, 5, 5, 5].min()) > 0.6  # the heads vary by about 1 there


@pytest.mark.train  # needs the train extra (Lightning, MONAI, TorchIO)
def test_native_mixture_has_no_duplicate_components():
    from medil_backend.training.latents import fit_native_mixture

    a, b = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.4, 0.4, 1.0, 0.0, 0.0, 0.0]
    mix = fit_native_mixture(np.array([a] * 5 + [b] * 3), k=4)
    means = [tuple(np.round(c["mean"], 4)) for c in mix]
    assert len(means) == len(set(means)) <= 2
    assert abs(sum(c["weight"] for c in mix) - 1) < 1e-5


def test_conditioning_follows_field_of_view_and_orientation():
    cfg = DiffusionConfig.from_dict(TINY_LDM)
    full = Grid((10, 10, 10), affine_from_parts([4, 4, 4], np.eye(3), [-18, -18, -18]))
    part = full.sub_grid((2, 2, 2), (7, 7, 7))
    c_full, c_part = geometry_channels(full, [1, 1, 1], cfg), geometry_channels(part, [1, 1, 1], cfg)
    # a smaller field of view is a smaller coordinate range, the same values where the grids meet
    assert torch.allclose(c_full[:, 2:7, 2:7, 2:7], c_part)
    assert float(c_part[0].max() - c_part[0].min()) < float(c_full[0].max() - c_full[0].min())
    lo, hi = np.array(cfg.group_lo), np.array(cfg.group_hi)
    centre = c_full[:3, 4, 4, 4].numpy() * (hi - lo) + lo
    np.testing.assert_allclose(centre, full.voxel_to_world(np.array([[4, 4, 4]]))[0], atol=1e-4)
    # an orientation is a rotated coordinate field
    lps = Grid((10, 10, 10), affine_from_parts([4, 4, 4], direction_from_code("LPS"), [18, 18, -18]))
    c_lps = geometry_channels(lps, [1, 1, 1], cfg)
    assert torch.allclose(c_lps[0], c_full[0].flip(0), atol=1e-6)
    # the spacing channels carry the acquisition's spacing along the latent axes (blended when rotated)
    np.testing.assert_allclose(source_spacing_along(full, np.eye(3), [1, 1, 6]), [1, 1, 6])
    rot = np.array([[1, 0, 0], [0, np.cos(0.5), -np.sin(0.5)], [0, np.sin(0.5), np.cos(0.5)]])
    blended = source_spacing_along(Grid((4, 4, 4), affine_from_parts([4, 4, 4], rot, [0, 0, 0])), np.eye(3), [1, 1, 6])
    assert 1 < blended[1] < 6 and 1 < blended[2] < 6
    # and the network's output changes with each
    torch.manual_seed(0)
    net = LatentDiffusionUNet(cfg).eval()
    with torch.no_grad():
        net.head[-1].weight.normal_(0, 0.1)
        z, t = torch.randn(1, 2, 5, 5, 5), torch.tensor([50])
        outs = [
            net(z, t, geometry_channels(g, sp, cfg)[None])
            for g, sp in ((part, [1, 1, 1]), (full.sub_grid((3, 3, 3), (8, 8, 8)), [1, 1, 1]), (part, [1, 1, 6]))
        ]
        outs.append(net(z, t, geometry_channels(lps.sub_grid((2, 2, 2), (7, 7, 7)), [1, 1, 1], cfg)[None]))
    for other in outs[1:]:
        assert (outs[0] - other).abs().max() > 1e-4


def test_ddim_with_more_steps_is_deterministic_and_finite():
    torch.manual_seed(0)
    net = LatentDiffusionUNet(DiffusionConfig.from_dict(TINY_LDM)).eval()
    grid = Grid((8, 8, 8), affine_from_parts([4, 4, 4], np.eye(3), [-14, -14, -14]))
    cond = geometry_channels(grid, [1, 1, 1], net.config)[None]
    noise = torch.randn(1, 2, 8, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = net.ddim(noise, cond, 5), net.ddim(noise, cond, 5)
        c = net.ddim(noise, cond, 1)
    assert torch.equal(a, b) and torch.isfinite(a).all() and c.shape == a.shape
    # eta > 0 adds fresh noise at every step: reproducible from its generator, different from eta = 0 and between seeds
    with torch.no_grad():
        s1, s2, s3 = (net.ddim(noise, cond, 5, eta=1.0, generator=torch.Generator().manual_seed(k)) for k in (7, 7, 8))
    assert torch.equal(s1, s2) and not torch.equal(s1, s3) and (s1 - a).abs().max() > 1e-3 and torch.isfinite(s1).all()
    with pytest.raises(ValueError, match="eta"):
        net.ddim(noise, cond, 5, eta=1.5)


@pytest.mark.parametrize(
    "grid",
    [
        Grid((17, 13, 11), affine_from_parts([1.7, 2.1, 2.9], direction_from_code("LIA"), [10.0, -5.0, 3.0])),  # partial FOV, flips
        Grid(
            (15, 15, 9),
            affine_from_parts(
                [2.0, 2.0, 3.3],
                np.array([[np.cos(0.4), -np.sin(0.4), 0], [np.sin(0.4), np.cos(0.4), 0], [0, 0, 1]]) @ np.diag([1, -1, 1]),
                [-12.0, 14.0, -6.0],
            ),
        ),  # oblique
    ],
)
def test_sample_lands_exactly_on_the_requested_grid(sampler_dir, grid):
    from medil_backend.ops.sample import sample

    (v,) = sample("tiny-ldm", grid, seed=1, steps=3)
    assert v.array.shape == grid.shape
    np.testing.assert_allclose(v.affine, grid.affine, atol=1e-9)
    assert np.isfinite(v.array).all() and v.array.min() >= 0  # an MR magnitude is never negative
    assert v.meta["seed"] == 1 and v.meta["steps"] == 3 and v.meta["autoencoder"] == "tiny-gen"


def test_same_seed_same_volume_other_seed_other_volume(sampler_dir):
    from medil_backend.ops.sample import sample

    a, b = sample("tiny-ldm", n=2, seed=5, steps=2)
    (a2,) = sample("tiny-ldm", n=1, seed=5, steps=2)
    assert np.array_equal(a.array, a2.array)
    assert not np.array_equal(a.array, b.array) and b.meta["seed"] == 6
    assert a.array.shape == tuple(DEFAULT_SPACE["shape"])
    # stochastic DDIM draws its noise from the same seed: reproducible, and recorded
    s1, s2 = (sample("tiny-ldm", n=1, seed=5, steps=2, eta=1.0)[0] for _ in range(2))
    assert np.array_equal(s1.array, s2.array) and s1.meta["eta"] == 1.0 and a.meta["eta"] == 0.0


def test_sample_progress_and_cancel(sampler_dir):
    from medil_backend.errors import Cancelled
    from medil_backend.ops.sample import sample

    seen = []
    sample("tiny-ldm", steps=3, progress=lambda f, m: seen.append(f))
    assert seen[-1] == 1.0 and seen == sorted(seen)
    with pytest.raises(Cancelled):
        sample("tiny-ldm", steps=3, cancel=lambda: True)


def run(argv, capsys):
    from medil_backend.cli import main

    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_sample_writes_marked_files_with_sidecars(sampler_dir, tmp_path, capsys):
    import nibabel as nib

    out = tmp_path / "s.nii.gz"
    rc, _, err = run(["sample", out, "--model", "tiny-ldm", "--n", "2", "--seed", "7", "--steps", "2", "--progress", "none"], capsys)
    assert rc == 0, err
    for i, seed in enumerate((7, 8)):
        path = tmp_path / f"s_{i:03d}.nii.gz"
        img = nib.load(path)
        assert b"AI-generated by MedIL" in img.header["descrip"].tobytes()
        side = json.loads((tmp_path / f"s_{i:03d}.json").read_text())
        assert side["AIGenerated"] is True and side["seed"] == seed and side["steps"] == 2
        assert side["model"] == "tiny-ldm" and len(side["model_sha256"]) == 64 and len(side["autoencoder_sha256"]) == 64
        assert side["grid"]["shape"] == DEFAULT_SPACE["shape"] and "date" in side
        assert side["denoise_windows"] == 1  # a small latent: one denoising pass
        # the shape of every sidecar (Provenance.record): both models by sha256, version, device, precision
        assert [m["role"] for m in side["models"]] == ["model", "autoencoder"] and side["models"][0]["sha256"] == side["model_sha256"]
        assert side["task"] == "sample" and side["version"] and side["device"] == "cpu" and side["precision"]
    # never replaced by surprise: a second run refuses before any work, and leaves the files as they were
    before = (tmp_path / "s_000.nii.gz").read_bytes()
    rc, _, err = run(["sample", out, "--model", "tiny-ldm", "--n", "2", "--progress", "none"], capsys)
    assert rc != 0 and "--overwrite" in err and "Traceback" not in err
    assert (tmp_path / "s_000.nii.gz").read_bytes() == before
    # without --steps, the model card's step count (sampling.steps), recorded in the sidecar
    rc, _, err = run(["sample", tmp_path / "d.nii.gz", "--model", "tiny-ldm", "--progress", "none"], capsys)
    assert rc == 0, err
    assert json.loads((tmp_path / "d.json").read_text())["steps"] == 2


def test_cli_sample_like_a_reference_is_exact(sampler_dir, tmp_path, capsys):
    from medil_backend.io import read_grid, read_volume, write_volume

    ref = read_volume(EXAMPLE)
    sub = ref.grid.sub_grid((30, 30, 10), (60, 62, 30))
    ref.array, ref.affine = np.ascontiguousarray(ref.array[30:60, 30:62, 10:30]), sub.affine
    ref.affine[:3, 3] -= ref.grid.voxel_to_world(np.array([[15, 16, 10]]))[0]  # near the group space's centre
    rpath = tmp_path / "ref.nrrd"
    write_volume(ref, rpath)
    out = tmp_path / "s.nrrd"
    rc, _, err = run(["sample", out, "--model", "tiny-ldm", "--like", rpath, "--steps", "2", "--progress", "none"], capsys)
    assert rc == 0, err
    a, b = read_grid(out), read_grid(rpath)
    assert a.shape == b.shape and np.allclose(a.affine, b.affine, atol=1e-5)


def test_cli_sample_native_spaces_and_fov(sampler_dir, tmp_path, capsys):
    from medil_backend.io import read_grid

    rc, _, err = run(
        ["sample", tmp_path / "n.nii.gz", "--model", "tiny-ldm", "--native", "--n", "2", "--steps", "1", "--progress", "none"], capsys
    )
    assert rc == 0, err
    grids = [read_grid(tmp_path / f"n_{i:03d}.nii.gz") for i in range(2)]
    assert all(g.num_voxels > 0 for g in grids)
    rc, _, err = run(
        [
            "sample",
            tmp_path / "f.nii.gz",
            "--model",
            "tiny-ldm",
            "--spacing",
            "3",
            "--fov",
            "-10",
            "10",
            "-12",
            "12",
            "-6",
            "6",
            "--orientation",
            "LPS",
            "--steps",
            "1",
            "--progress",
            "none",
        ],
        capsys,
    )
    assert rc == 0, err
    g = read_grid(tmp_path / "f.nii.gz")
    np.testing.assert_allclose(g.spacing, 3.0)
    assert g.orientation_code == "LPS"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "nope"], "unknown model"),
        (["--model", "tiny-gen"], "does not sample"),
        (["--model", "tiny-ldm", "--n", "0"], "at least 1"),
        (["--model", "tiny-ldm", "--fov", "5000", "5100", "0", "10", "0", "10"], "outside the space"),
        (["--model", "tiny-ldm", "--steps", "0"], "steps"),
        (["--model", "tiny-ldm", "--native", "--spacing", "1"], "--native"),
        (["--model", "tiny-ldm", "--eta", "2"], "eta must be between 0"),
    ],
)
def test_cli_sample_errors_are_one_line(sampler_dir, tmp_path, capsys, extra, message):
    rc, _, err = run(["sample", tmp_path / "s.nii.gz", *extra, "--progress", "none"], capsys)
    assert rc != 0 and message in err and "Traceback" not in err
    assert not any(tmp_path.glob("s*"))


def test_reconstruct_refuses_a_diffusion_model(sampler_dir, small_mri, tmp_path, capsys):
    rc, _, err = run(["reconstruct", small_mri, tmp_path / "o.nii.gz", "--model", "tiny-ldm", "--progress", "none"], capsys)
    assert rc != 0 and "medil sample" in err and "Traceback" not in err


@pytest.mark.train  # needs the train extra (Lightning, MONAI, TorchIO)
@pytest.mark.train
def test_latents_of_made_heads_are_cached_with_their_generator(sampler_dir, tmp_path):
    """data.heads: the latent diffusion model's training volumes are whole heads made from real ones, each encoded,
    and the cache's manifest names the generator and the real sources; the validation head is a real file."""
    from conftest import REPO, shared

    from medil_backend.errors import MedILError
    from medil_backend.training.latents import LatentDataModule, load_latents

    colin = str(shared("mri/colin27_t1_1mm.nii.gz"))
    dm = LatentDataModule(
        str(sampler_dir / "tiny-gen.json"),
        heads={"sources": [colin], "count": 2, "sampler": {"spacing_mm": [2.5, 3.0]}},
        val=[str(REPO / "examples/data/itk_t1_2x2x3mm.nii.gz")],
        cache=str(tmp_path / "latents.npz"),
        encodings=1,
        val_encodings=1,
        thick_prob=0.0,
        max_rotation_deg=0.0,
    )
    dm.setup()
    items, meta = load_latents(tmp_path / "latents.npz")
    assert [it["name"] for it in items] == ["train:head-0", "train:head-1", f"val:{REPO / 'examples/data/itk_t1_2x2x3mm.nii.gz'}"]
    assert meta["manifest"]["synthetic"]["generator"] == "medil_backend.training.heads.whole_head"
    assert meta["manifest"]["train"][0]["file"] == "colin27_t1_1mm.nii.gz" and len(meta["manifest"]["train"][0]["sha256"]) == 64
    assert len(dm.train_items) == 2 and len(dm.val_items) == 1 and all(np.isfinite(it["latent"]).all() for it in items)
    with pytest.raises(MedILError, match="train or as heads"):
        LatentDataModule(str(sampler_dir / "tiny-gen.json"), train="examples/data", heads={"sources": [colin], "count": 1})


def test_diffusion_recipe_trains_exports_and_samples(sampler_dir, tmp_path, capsys):
    """medil train on a diffusion recipe: latents cached, the moving average exported with a card that names the
    autoencoder and the native spaces, and the exported model samples."""
    from conftest import REPO

    from medil_backend.training.cli import main as train_main
    from medil_backend.training.latents import STD_FLOOR

    cache, out = tmp_path / "latents.npz", tmp_path / "export"
    callbacks = (
        '[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"monitor": "val/loss", "dirpath": "'
        + str(tmp_path / "ckpt")
        + '"}}, {"class_path": "medil_backend.training.cli.ExportWeights", "init_args": {"folder": "'
        + str(out)
        + '", "name": "tiny-ldm2", "tasks": ["sample"]}}]'
    )
    argv = ["--config", str(REPO / "training/configs/tiny-diffusion.yaml"), f"--data.cache={cache}", f"--trainer.callbacks={callbacks}"]
    argv.append(f"--trainer.default_root_dir={tmp_path}")
    cwd = __import__("os").getcwd()
    __import__("os").chdir(REPO)
    try:
        assert train_main(argv) == 0
    finally:
        __import__("os").chdir(cwd)
    assert cache.exists()
    card = json.loads((out / "tiny-ldm2.json").read_text())
    assert card["architecture"] == "LatentDiffusionUNet" and card["tasks"] == ["sample"]
    assert card["autoencoder"]["name"] == "tiny-gen" and len(card["autoencoder"]["sha256"]) == 64
    assert card["native_spaces"] and "val_loss_best" in card["metrics"] and card["sampling"] == {"steps": 3}
    from medil_backend.models import load_model
    from medil_backend.ops.sample import sample

    net = load_model(out / "tiny-ldm2.json").net
    assert float(net.latent_std.min()) > 0 and not torch.all(net.latent_std == 1)  # standardised by the training latents
    # ... by position: a mean head and its spread over the group space, floored where every head agrees
    assert net.config.standardise == "position" and net.mean_map.std() > 0 and net.std_map.std() > 0
    assert float(net.std_map.min()) >= 0.99 * STD_FLOOR * float(net.latent_std.min())
    grid = Grid((20, 24, 10), affine_from_parts([2.0, 2.0, 3.0], np.eye(3), [-20.0, -24.0, -15.0]))
    (v,) = sample(str(out / "tiny-ldm2.json"), grid)
    assert v.array.shape == grid.shape and np.isfinite(v.array).all() and v.meta["steps"] == 3  # the card's step count
    # medil export of the run's best checkpoint (a run stopped early) writes the same model and card
    import yaml

    recipe = yaml.safe_load((REPO / "training/configs/tiny-diffusion.yaml").read_text())
    recipe["data"]["cache"] = str(cache)
    for key in ("train", "val"):
        recipe["data"][key] = str(REPO / recipe["data"][key])
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (ckpt,) = (tmp_path / "ckpt").glob("*.ckpt")
    rc, _, err = run(["export", ckpt, "--config", tmp_path / "recipe.yaml", "--folder", tmp_path / "exp", "--name", "tiny-ldm3"], capsys)
    assert rc == 0, err
    again = load_model(tmp_path / "exp" / "tiny-ldm3.json")
    for key, value in net.state_dict().items():
        torch.testing.assert_close(again.net.state_dict()[key], value, rtol=0, atol=0)
    card3 = json.loads((tmp_path / "exp" / "tiny-ldm3.json").read_text())
    for key in ("autoencoder", "native_spaces", "group_space", "default_space", "tasks", "metrics", "sampling"):
        assert card3[key] == card[key], key
    assert card3["training"]["exported_from"] == ckpt.name
    # the card's step count is the run's optimiser steps (the checkpoint's), not the sampler's DDIM step count
    assert (
        card3["training"]["steps_done"]
        == torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]
        != card3["sampling"]["steps"]
    )
    # a recipe whose step count is no step count: one line, nothing written
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**recipe, "model": {**recipe["model"], "sample_steps": 0}}))
    rc, _, err = run(["export", ckpt, "--config", tmp_path / "bad.yaml", "--folder", tmp_path / "exp5", "--name", "x"], capsys)
    assert rc != 0 and "sample_steps" in err and "Traceback" not in err and not (tmp_path / "exp5").exists()
    # ... refused before any training, too
    rc, _, err = run(["train", "--config", tmp_path / "bad.yaml", f"--trainer.default_root_dir={tmp_path / 'bad'}"], capsys)
    assert rc != 0 and "sample_steps" in err and "Traceback" not in err and not (tmp_path / "bad" / "lightning_logs").exists()
    # without the run's latent cache there is nothing to name the autoencoder by: one line, nothing written
    cache.unlink()
    rc, _, err = run(["export", ckpt, "--config", tmp_path / "recipe.yaml", "--folder", tmp_path / "exp4", "--name", "x"], capsys)
    assert rc != 0 and "latent cache" in err and "Traceback" not in err and not (tmp_path / "exp4").exists()


def test_evaluate_generative_reports_every_figure(sampler_dir, tmp_path, capsys):
    from medil_backend.geometry import Volume
    from medil_backend.io import read_volume, write_volume

    v = read_volume(EXAMPLE)
    paths = []
    for i, lo in enumerate(((30, 30, 10), (40, 36, 14), (36, 44, 12), (44, 40, 8))):
        hi = tuple(a + b for a, b in zip(lo, (24, 28, 20)))
        arr = np.ascontiguousarray(v.array[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]])
        paths.append(tmp_path / f"real{i}.nii.gz")
        write_volume(Volume(arr, v.grid.sub_grid(lo, hi).affine), paths[-1], dtype=arr.dtype)
    js, md = tmp_path / "g.json", tmp_path / "g.md"
    argv = ["evaluate-generative", "--model", "tiny-ldm", "--train", *paths[:2], "--held-out", *paths[2:], "--n", "3", "--steps", "2"]
    rc, out, err = run([*argv, "--spacing", "4", "--json", js, "--markdown", md], capsys)
    assert rc == 0, err
    r = json.loads(js.read_text())
    assert r["n_samples"] == 3 and np.isfinite(r["fd_medil"]) and 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1
    assert -1 <= r["diversity_ms_ssim"]["samples"] <= 1 and -1 <= r["diversity_ms_ssim"]["real"] <= 1
    assert len(r["memorisation"]["sample_max_corr_with_train"]) == 3 and len(r["memorisation"]["held_out_max_corr_with_train"]) == 2
    m = r["memorisation"]
    assert len(m["train_max_corr_with_other_train"]) == 2 and len(m["sample_corr_with_train_mean"]) == 3
    assert 0 <= m["samples_above_every_train_pair"] <= 3 and "than any training volume is to another" in md.read_text()
    assert "MS-SSIM" in md.read_text() and "not Med3D FID" in r["feature_note"]
    d = r["diversity_ms_ssim"]
    assert -1 <= d["real_train"] <= 1 and -1 <= d["real_through_autoencoder"] <= 1 and d["real_through_autoencoder"] != d["real"]
    assert "training volumes alone" in md.read_text() and "through the autoencoder" in md.read_text()
    c = r["pairwise_correlation"]
    assert all(-1 <= c[k] <= 1 for k in ("samples", "real", "real_train", "real_through_autoencoder"))
    assert "mean pairwise correlation" in md.read_text()
    for figure in ("head_fraction", "head_fraction_in_outer_10mm"):
        assert all(0 <= r[figure][k] <= 1 for k in ("samples", "real")) and "outer 10 mm shell" in md.read_text()
    hf = r["high_frequency_energy"]
    assert all(0 <= hf[k] <= 2 for k in ("samples", "real", "real_through_autoencoder")) and "speckle" in md.read_text()
    rc, _, err = run([*argv[:-4], "--n", "1"], capsys)
    assert rc != 0 and "at least 2" in err
    # the realism figures that do not rest on our encoder: registered to a template (here one real volume)
    js2 = tmp_path / "g2.json"
    rc, _, err = run([*argv, "--spacing", "4", "--template", paths[0], "--brain", paths[0], "--json", js2], capsys)
    assert rc == 0, err
    real = json.loads(js2.read_text())["realism"]
    assert len(real["template_correlation"]["samples"]) == 3 and len(real["template_correlation"]["held_out"]) == 2
    assert 0 <= real["c2st_accuracy"] <= 1 and len(real["nearest_training_head_correlation"]) == 3
    assert set(real["tissue_fractions"]["samples"]) == {"csf", "gm", "wm"} and set(real["checks"]) >= {
        "no_sample_above_0.95_with_a_training_head"
    }
    assert all(-1 <= v <= 1 for vs in real["template_correlation"].values() for v in vs)  # registration itself: test_realism.py
    assert "two-sample classifier" in run([*argv, "--spacing", "4", "--template", paths[0], "--markdown", tmp_path / "g2.md"], capsys)[1]
    rc, _, err = run([*argv, "--brain", paths[0]], capsys)
    assert rc != 0 and "--template" in err


def test_encoded_then_decoded_is_the_posterior_mean_decoded_on_the_same_grid():
    from conftest import TINY_AE

    from medil_backend.evaluate_generative import decoded, encoded
    from medil_backend.nn import MedILAutoencoder, MedILConfig

    torch.manual_seed(0)
    ae = MedILAutoencoder(MedILConfig.from_dict({**TINY_AE, "kl": True})).eval()
    a = np.random.default_rng(0).random((18, 20, 14)).astype(np.float32)
    grid = Grid(a.shape, affine_from_parts([2.0, 2.0, 3.0], direction_from_code("LPS"), [5.0, -3.0, 1.0]))
    z_grid = ae.latent_grid(grid, grid.direction)
    with torch.inference_mode():
        z, mean, _ = ae.encode(torch.from_numpy(a)[None, None], grid, z_grid)
        expected = ae.decode(mean, z_grid, grid)[0, 0].numpy()
    out = decoded(ae, *encoded(ae, a, grid), grid)  # what evaluate-generative's "through the autoencoder" row measures
    assert out.shape == a.shape
    np.testing.assert_allclose(out, expected, atol=1e-4)


def test_pairwise_correlation_tells_alike_from_opposite_volumes():
    from medil_backend.evaluate_generative import mean_pairwise_correlation

    a = np.random.default_rng(0).random((6, 7, 8))
    assert mean_pairwise_correlation([a, 2 * a + 1, a]) == pytest.approx(1.0)
    assert mean_pairwise_correlation([a, -a]) == pytest.approx(-1.0)
    assert np.isnan(mean_pairwise_correlation([a]))


def test_head_in_air_tells_a_head_from_a_field_of_tissue():
    from medil_backend.evaluate_generative import head_in_air

    grid = Grid((40, 40, 40), affine_from_parts([2.0] * 3, np.eye(3), [0.0] * 3))
    ijk = np.indices(grid.shape) - 19.5
    head = (np.sqrt((ijk**2).sum(0)) < 14).astype(np.float32) * 0.8  # a ball in air
    share, shell = head_in_air(head, grid)
    assert 0.15 < share < 0.25 and shell == 0.0
    share, shell = head_in_air(np.full(grid.shape, 0.7, np.float32), grid)  # tissue to the border
    assert share == 1.0 and shell == 1.0


def test_high_frequency_energy_tells_a_speckled_head_from_a_smooth_one():
    from scipy.ndimage import gaussian_filter

    from medil_backend.evaluate_generative import high_frequency_energy

    grid = Grid((40, 40, 40), affine_from_parts([2.0] * 3, np.eye(3), [0.0] * 3))
    ijk = np.indices(grid.shape) - 19.5
    ball = np.sqrt((ijk**2).sum(0)) < 14
    rng = np.random.default_rng(0)
    texture = gaussian_filter(rng.standard_normal(grid.shape), 4)
    smooth = np.where(ball, 0.6 + 0.2 * texture / texture.std(), 0.0).astype(np.float32)
    speckled = np.where(ball, smooth + 0.1 * rng.standard_normal(grid.shape), 0.0).astype(np.float32)
    hf_smooth, hf_speckled = high_frequency_energy(smooth, grid), high_frequency_energy(speckled, grid)
    assert 0 <= hf_smooth < 0.5 * hf_speckled <= 1.5
    assert np.isnan(high_frequency_energy(np.zeros(grid.shape, np.float32), grid))  # no head, no figure


def test_superres_cycles_gives_a_consistent_mean_and_an_uncertainty_map(sampler_dir, tmp_path, capsys):
    """Patel's noise/denoise cycles through the latent diffusion model, each made data-consistent; K cycles give a std map."""
    from medil_backend.acquisition import thick_slices
    from medil_backend.geometry import Volume
    from medil_backend.io import read_grid, read_volume, write_volume

    v = read_volume(EXAMPLE)
    arr = np.ascontiguousarray(v.array[30:54, 30:58, 10:30]).astype(np.float32)
    sub = v.grid.sub_grid((30, 30, 10), (54, 58, 30))
    aff = sub.affine.copy()
    aff[:3, 3] -= sub.voxel_to_world(np.array([[12, 14, 10]]))[0]  # near the group space's centre
    thick, tgrid = thick_slices(arr, Grid(arr.shape, aff), 2, 2)
    src = tmp_path / "thick.nii.gz"
    write_volume(Volume(thick, tgrid.affine), src)
    out, unc = tmp_path / "sr.nii.gz", tmp_path / "sd.nii.gz"
    argv = ["superres", src, out, "--method", "cycles", "--model", "tiny-ldm", "--samples", "2", "--uncertainty", unc]
    rc, _, err = run([*argv, "--steps", "2", "--spacing", "2", "--progress", "none"], capsys)
    assert rc == 0, err
    sr, sd = read_volume(out), read_volume(unc)
    assert read_grid(out).same_as(read_grid(unc)) and sr.array.shape == sd.array.shape
    assert np.isfinite(sr.array).all() and sr.array.min() >= 0 and sd.array.max() > 0
    side = json.loads((tmp_path / "sr.json").read_text())
    assert side["method"]["method"] == "cycles" and side["method"]["samples"] == 2
    # data consistency: the mean, acquired again, is closer to the input than before the cycles
    assert side["method"]["consistency_residual_after"] < 0.5


def test_bundled_sampler_draws_a_head_patch_near_the_origin():
    """The bundled medil-brain-t1-ldm and its autoencoder load (sha256-checked) and sample a small oblique grid."""
    from medil_backend.ops.sample import load_sampler, sample

    sampler = load_sampler("medil-brain-t1-ldm")
    assert sampler.autoencoder_name == "medil-brain-t1-gen"
    rot = np.array([[np.cos(0.3), 0, np.sin(0.3)], [0, 1, 0], [-np.sin(0.3), 0, np.cos(0.3)]])
    grid = Grid((20, 24, 16), affine_from_parts([3.0, 3.0, 3.0], rot, [-30.0, -36.0, -24.0]))
    (v,) = sample(sampler, grid, seed=3, steps=3)
    assert v.array.shape == grid.shape and np.isfinite(v.array).all() and v.array.max() > 0
    np.testing.assert_allclose(v.affine, grid.affine, atol=1e-9)


def thick_head_patch():
    """A patch of the example head centred on the origin (as the diffusion model's group space has it), in thick slices."""
    from medil_backend.acquisition import thick_slices
    from medil_backend.io import read_volume

    v = read_volume(EXAMPLE)
    arr = np.ascontiguousarray(v.array[30:54, 30:58, 10:30]).astype(np.float32)
    sub = v.grid.sub_grid((30, 30, 10), (54, 58, 30))
    aff = sub.affine.copy()
    aff[:3, 3] -= sub.voxel_to_world(np.array([[12, 14, 10]]))[0]
    return thick_slices(arr, Grid(arr.shape, aff), 2, 2)


def test_superres_inverse_lowers_its_data_loss(sampler_dir, tmp_path, capsys):
    """InverseSR (decoder only): the latent is optimised through the tiling engine with checkpointing; its L1 falls."""
    from medil_backend.geometry import Volume
    from medil_backend.ops.superres import superres

    thick, tgrid = thick_head_patch()
    out = superres(
        Volume(thick, tgrid.affine, modality="mri"), method="inverse", model="tiny-ldm", max_iterations=15, samples=2, time_budget_min=5
    )
    runs = out.meta["optimisation"]
    assert len(runs) == 2 and all(r["l1_last"] < r["l1_first"] for r in runs)
    assert "uncertainty" in out.extras and out.extras["uncertainty"].array.shape == out.array.shape
    assert np.isfinite(out.array).all() and out.array.min() >= 0


def test_sampling_and_generative_superres_need_no_training_extra(sampler_dir, tmp_path):
    """medil sample (with --native), superres cycles and evaluate-generative's helpers run without Lightning installed."""
    import os
    import subprocess
    import sys

    from medil_backend.geometry import Volume
    from medil_backend.io import write_volume

    thick, tgrid = thick_head_patch()
    write_volume(Volume(thick, tgrid.affine), tmp_path / "thick.nii.gz")
    code = (
        "import sys; sys.modules['lightning'] = None; sys.modules['torchio'] = None; sys.modules['monai'] = None\n"
        "from medil_backend.cli import main\n"
        f"rc = main(['sample', r'{tmp_path / 'n.nii.gz'}', '--model', 'tiny-ldm', '--native', '--steps', '1', '--progress', 'none'])\n"
        f"rc = rc or main(['superres', r'{tmp_path / 'thick.nii.gz'}', r'{tmp_path / 'sr.nii.gz'}', '--method', 'cycles', "
        "'--model', 'tiny-ldm', '--steps', '1', '--spacing', '2', '--progress', 'none'])\n"
        "import medil_backend.evaluate_generative\n"
        "assert 'lightning' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "raise SystemExit(rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "n.nii.gz").exists() and (tmp_path / "sr.nii.gz").exists()


def test_evaluate_generative_checks_its_report_folders_first(sampler_dir, tmp_path, capsys):
    rc, _, err = run(
        ["evaluate-generative", "--model", "tiny-ldm", "--train", EXAMPLE, "--held-out", EXAMPLE, "--json", tmp_path / "no" / "g.json"],
        capsys,
    )
    assert rc != 0 and "does not exist" in err and "Traceback" not in err


@pytest.mark.train  # needs the train extra (Lightning, MONAI, TorchIO)
def test_training_latents_see_each_head_in_air():
    """With pad/box, a head that fills its volume to the border is encoded as if surrounded by air, and its latent
    is extended to a cube about its centroid with the background's own latent."""
    from conftest import TINY_AE

    from medil_backend.nn import MedILAutoencoder, MedILConfig
    from medil_backend.training.latents import encode_augmented, far_field_latent

    torch.manual_seed(0)
    ae = MedILAutoencoder(MedILConfig.from_dict(TINY_AE)).eval()
    rng = np.random.default_rng(0)
    array = (0.5 + 0.4 * rng.random((30, 28, 26))).astype(np.float32)  # "tissue" to every border
    grid = Grid((30, 28, 26), affine_from_parts([2.0, 2.0, 2.0], direction_from_code("RAS"), [0.0, 0.0, 0.0]))
    vol = {"array": array, "grid": grid, "centres": np.array([[14.5, 13.5, 12.5]]), "path": "blob"}
    aug = dict(thick_prob=0.0, thick_mm=(3.0, 7.0), max_rotation_deg=0.0)

    it = encode_augmented(ae, vol, np.random.default_rng(1), pad_mm=16.0, box_mm=120.0, **aug)
    z, z_grid = it["latent"].astype(np.float32), Grid(it["latent"].shape[1:], it["affine"])
    centre = z_grid.world_to_voxel(np.zeros((1, 3)))[0]
    assert np.all(centre - 15 >= -0.5) and np.all(centre + 15 <= np.asarray(z_grid.shape) - 0.5)  # the 120 mm cube
    # the background's latent fills everything away from the head ...
    fill = far_field_latent(ae, grid.spacing, np.eye(3)).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(z[:, 0, 0, 0], fill)
    np.testing.assert_array_equal(z[:, -1, -1, -1], fill)
    # ... and next to it the latent is that of the head in plenty of air (not of a volume's border)
    wide = encode_augmented(ae, vol, np.random.default_rng(1), pad_mm=64.0, box_mm=120.0, **aug)
    assert np.allclose(wide["affine"], it["affine"]) and wide["latent"].shape == it["latent"].shape
    from medil_backend.geometry import centred

    # the latent voxels over the scanned volume and just outside it (the volume moved to its centroid, as encoded)
    ijk = centred(grid, vol["centres"]).world_to_voxel(z_grid.voxel_to_world(np.indices(z_grid.shape).reshape(3, -1).T))
    over = ((ijk >= -2) & (ijk <= np.asarray(grid.shape) + 1)).all(1).reshape(z_grid.shape)
    assert over.sum() > 100
    np.testing.assert_allclose(z[:, over], wide["latent"].astype(np.float32)[:, over], atol=2e-3)
    plain = encode_augmented(ae, vol, np.random.default_rng(1), **aug)  # without: the volume's border shows
    assert plain["latent"].shape[1:] != it["latent"].shape[1:]


@pytest.mark.train  # needs the train extra (Lightning, MONAI, TorchIO)
def test_a_mirrored_head_is_the_mirror_image_about_its_centroid():
    from medil_backend.geometry import centred
    from medil_backend.training.latents import mirrored

    array = np.zeros((10, 12, 14), np.float32)
    array[2:8, 3:9, 4:12] = 1.0  # the head
    array[2, 4, 6] = 5.0  # a marker on one side
    direction = direction_from_code("ASL")  # voxel axis 2 runs along world x (L)
    grid = Grid(array.shape, affine_from_parts([1.0, 1.2, 0.8], direction, [3.0, -4.0, 7.0]))
    centres = np.argwhere(array > 0).astype(np.float64)
    flipped, flipped_centres = mirrored(array, grid, centres)
    before = centred(grid, centres).voxel_to_world(np.argwhere(array == 5.0).astype(float))[0]
    after = centred(grid, flipped_centres).voxel_to_world(np.argwhere(flipped == 5.0).astype(float))[0]
    np.testing.assert_allclose(after, before * [-1, 1, 1], atol=1e-9)
    assert np.abs(before[0]) > 1  # the marker is off the mid-sagittal plane
    np.testing.assert_array_equal(np.flip(flipped, 2), array)  # voxels flipped, not resampled


@pytest.mark.train  # needs the train extra (Lightning, MONAI, TorchIO)
def test_a_latent_cache_of_other_augmentation_is_refused(sampler_dir, tmp_path):
    from medil_backend.errors import MedILError
    from medil_backend.models import sha256_file
    from medil_backend.training.latents import LatentDataModule, save_latents

    item = {"latent": np.zeros((2, 4, 4, 4), np.float16), "affine": np.eye(4), "spacing": np.ones(3), "name": "train:x"}
    meta = {"autoencoder": {"name": "tiny-gen", "sha256": sha256_file(sampler_dir / "tiny-gen.safetensors")}, "augmentation": {}}
    save_latents(tmp_path / "cache.npz", [item], meta)
    LatentDataModule("tiny-gen", "unused", cache=str(tmp_path / "cache.npz")).setup()  # as encoded: no pad, no box
    with pytest.raises(MedILError, match="delete the cache file or name another"):
        LatentDataModule("tiny-gen", "unused", cache=str(tmp_path / "cache.npz"), pad_mm=20.0, box_mm=224.0).setup()
    with pytest.raises(MedILError, match="delete the cache file or name another"):
        LatentDataModule("tiny-gen", "unused", cache=str(tmp_path / "cache.npz"), mirror_prob=0.5).setup()


def test_a_decoder_fine_tuned_autoencoder_keeps_its_diffusion_model(sampler_dir):
    """A diffusion model depends on its autoencoder's encoder side: new decoder weights (stage 3) still sample,
    new encoder weights are refused."""
    from medil_backend.errors import MedILError
    from medil_backend.models import export_model, load_model
    from medil_backend.ops.sample import load_sampler, sample

    grid = Grid((12, 14, 10), affine_from_parts([3.0, 3.0, 3.0], np.eye(3), [-18.0, -21.0, -15.0]))
    before = sample("tiny-ldm", grid, steps=2, seed=1)[0].array
    ae = load_model("tiny-gen")
    with torch.no_grad():
        ae.net.decoder.head.bias.add_(0.25)
    export_model(ae.net, sampler_dir, "tiny-gen", {k: v for k, v in ae.card.items() if k != "latent"})
    after = sample("tiny-ldm", grid, steps=2, seed=1)[0].array
    assert not np.allclose(before, after)  # the new decoder drew the same latent
    with torch.no_grad():
        next(ae.net.encoder.parameters()).add_(0.25)
    export_model(ae.net, sampler_dir, "tiny-gen", {k: v for k, v in ae.card.items() if k != "latent"})
    with pytest.raises(MedILError, match="another 'tiny-gen' encoder"):
        load_sampler("tiny-ldm")


def test_patch_wise_denoising_covers_the_latent_and_blends_window_predictions():
    from medil_backend.nn.diffusion import Windows

    torch.manual_seed(0)
    net = LatentDiffusionUNet(DiffusionConfig.from_dict(TINY_LDM)).eval()
    with torch.no_grad():
        net.head[-1].weight.normal_(0, 0.1)
    shape = (20, 22, 9)
    z_grid = Grid(shape, affine_from_parts([4.0, 4.0, 4.0], np.eye(3), [-40.0, -44.0, -18.0]))
    cond = geometry_channels(z_grid, [1.0, 1.0, 1.0], net.config)[None]
    z = torch.randn((1, 2, *shape))
    w = Windows(shape, 8, 2)
    cover = torch.zeros(shape)
    for sl in w.slices():
        assert all(s.stop - s.start <= 8 for s in sl)
        cover[sl] += 1
    assert cover.min() >= 1 and len(w.slices()) == 3 * 4 * 2
    weight = w.weight((8, 8, 8))
    assert float(weight.min()) > 0 and float(weight[0, 0, 2:6, 2:6, 2:6].min()) == 1.0
    with torch.no_grad():
        whole = net.predict(z, 40, cond)
        assert torch.equal(net.predict(z, 40, cond, Windows(shape, 22, 0)), whole)  # one window: the one pass
        blended = net.predict(z, 40, cond, w)
        first = net(z[:, :, :8, :8, :8], torch.full((1,), 40), cond[:, :, :8, :8, :8])
    assert blended.shape == z.shape and torch.isfinite(blended).all()
    # voxel (0, 0, 0) lies in one window only: its prediction is that window's
    torch.testing.assert_close(blended[:, :, 0, 0, 0], first[:, :, 0, 0, 0])
    assert not torch.allclose(blended, whole)  # each window sees only its own context


def test_sample_denoises_patch_wise_when_one_pass_exceeds_the_memory_limit(sampler_dir):
    from medil_backend.errors import MedILError
    from medil_backend.limits import GB
    from medil_backend.ops.memory import RUNTIME_OVERHEAD_BYTES
    from medil_backend.ops.sample import MIN_WINDOW, denoise_windows, latent_grid_for, load_sampler, sample, unet_bytes

    sampler = load_sampler("tiny-ldm")
    grid = Grid((36, 36, 36), affine_from_parts([4.0, 4.0, 4.0], np.eye(3), [-70.0, -70.0, -70.0]))
    z_shape = latent_grid_for(sampler, grid).shape
    whole = unet_bytes(sampler, z_shape)
    assert denoise_windows(sampler, z_shape, 1.01 * whole) is None
    windows = denoise_windows(sampler, z_shape, 0.3 * whole)
    assert MIN_WINDOW <= windows.size < max(z_shape) and len(windows.slices()) > 1
    with pytest.raises(MedILError, match="raise the memory limit"):
        denoise_windows(sampler, z_shape, 0.5 * unet_bytes(sampler, [MIN_WINDOW] * 3))
    # the memory limit that leaves 30 % of one pass's working memory once the output and the latent are held
    resident = RUNTIME_OVERHEAD_BYTES + 4.0 * grid.num_voxels + 4.0 * (3 * 2 + 6) * np.prod(z_shape)
    limit = (resident + 0.3 * whole) / GB
    a, b = sample(sampler, grid, n=2, seed=3, steps=2, max_memory_gb=limit)
    assert a.meta["denoise_windows"] == len(windows.slices()) > 1
    assert a.array.shape == grid.shape and np.allclose(a.affine, grid.affine) and np.isfinite(a.array).all()
    (a2,) = sample(sampler, grid, seed=3, steps=2, max_memory_gb=limit)
    assert np.array_equal(a.array, a2.array) and not np.array_equal(a.array, b.array)
    (one,) = sample(sampler, grid, seed=3, steps=2, max_memory_gb=64)
    assert one.meta["denoise_windows"] == 1
