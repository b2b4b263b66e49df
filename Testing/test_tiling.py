"""The tiling engine: tiled == whole for encode and decode (odd sizes, oblique grids, with and
without gradients, with and without an input volume), planning against a budget, and the
peak memory of a real process against the memory limit."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import REPO

from medil_backend.errors import MedILError
from medil_backend.geometry import Grid, direction_from_code
from medil_backend.nn import MedILAutoencoder
from medil_backend.ops.tiling import DecodePlan, EncodePlan, decode_tiled, encode_tiled, plan_tiles


def _rotation(deg_x: float, deg_z: float) -> np.ndarray:
    a, c = np.radians(deg_x), np.radians(deg_z)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ rx


def _net(tiny_config, **changes) -> MedILAutoencoder:
    torch.manual_seed(3)
    net = MedILAutoencoder(replace(tiny_config, **changes))
    with torch.no_grad():  # wake the zero-initialised parts so every path carries signal
        for lte in (net.encoder_lte, net.decoder_lte):
            lte.inr.tail[1].weight.normal_(0, 0.1)
        net.decoder.head.weight.normal_(0, 0.1)
        if net.decoder.guide is not None:
            net.decoder.guide.weight.normal_(0, 0.2)
    return net.eval()


# odd shapes, anisotropic spacing, an oblique input grid and an oblique latent/output grid
X_GRID = Grid.from_parts((23, 19, 13), (1.1, 0.9, 2.3), _rotation(17, 8), (3.0, -5.0, 2.0))
Z_DIRECTION = _rotation(-11, 25)


def _case(net):
    torch.manual_seed(0)
    x = torch.rand(1, 1, *X_GRID.shape)
    z_grid = net.latent_grid(X_GRID, Z_DIRECTION)
    out_grid = Grid.from_parts(
        (29, 17, 21), (0.8, 1.3, 0.9), direction_from_code("LIA") @ _rotation(5, 3), X_GRID.voxel_to_world([11, 9, 6]) - 8
    )
    return x, z_grid, out_grid


@pytest.mark.parametrize(
    "changes", [{}, {"guide_decoder": True}, {"kl": True}, {"kl": True, "global_skip": False, "latent_base": True, "latent_spacing": 3.0}]
)
def test_tiled_encode_and_decode_equal_whole(tiny_config, changes):
    net = _net(tiny_config, **changes)
    x, z_grid, out_grid = _case(net)
    with torch.no_grad():
        z_whole = net.encode_block(x, X_GRID, z_grid)
        y_whole = net.decode(net.split_latent(z_whole)[0], z_grid, out_grid, skip=(x, X_GRID))[0, 0].numpy()
        enc = EncodePlan(net, X_GRID.shape, X_GRID, z_grid, 1e9, 4, min_splits=(3, 2, 2))
        dec = DecodePlan(net, z_grid, out_grid, 1e9, 4, min_splits=(3, 2, 2))
        assert len(enc.tiles) == 12 and len(dec.tiles) == 12
        z_tiled = encode_tiled(net, x, X_GRID, z_grid, plan=enc)
        y_tiled = decode_tiled(net, net.split_latent(z_tiled)[0], z_grid, out_grid, skip=(x, X_GRID), plan=dec)
    torch.testing.assert_close(z_tiled, z_whole, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(y_tiled, y_whole, atol=1e-5 * max(1.0, float(np.abs(y_whole).max())))


def test_decode_without_an_input_volume(tiny_config):
    """Sampling decodes a latent that no input produced: a network without a global skip needs none."""
    net = _net(tiny_config, global_skip=False)
    _, z_grid, out_grid = _case(net)
    torch.manual_seed(1)
    z = torch.randn(1, net.config.latent_channels, *z_grid.shape)
    with torch.no_grad():
        whole = net.decode(z, z_grid, out_grid)[0, 0].numpy()
        tiled = decode_tiled(net, z, z_grid, out_grid, plan=DecodePlan(net, z_grid, out_grid, 1e9, 4, min_splits=(2, 3, 2)))
    np.testing.assert_allclose(tiled, whole, atol=1e-5 * max(1.0, float(np.abs(whole).max())))
    with pytest.raises(ValueError, match="global skip"):
        decode_tiled(_net(tiny_config), z, z_grid, out_grid, budget_bytes=1e9)


@pytest.mark.parametrize("checkpoint", [False, True])
def test_tiled_decode_with_gradients(tiny_config, checkpoint):
    """Super-resolution optimises a latent through the decoder: tiled gradients equal whole-volume gradients."""
    net = _net(tiny_config, global_skip=False)
    _, z_grid, out_grid = _case(net)
    torch.manual_seed(2)
    z0 = torch.randn(1, net.config.latent_channels, *z_grid.shape)
    target = torch.rand(1, 1, *out_grid.shape)

    def loss_and_grad(fn):
        z = z0.clone().requires_grad_(True)
        loss = (fn(z) - target).abs().mean()
        loss.backward()
        return loss.detach(), z.grad

    l_whole, g_whole = loss_and_grad(lambda z: net.decode(z, z_grid, out_grid))
    l_tiled, g_tiled = loss_and_grad(
        lambda z: decode_tiled(
            net, z, z_grid, out_grid, checkpoint=checkpoint, plan=DecodePlan(net, z_grid, out_grid, 1e9, 4, min_splits=(2, 2, 3))
        )
    )
    torch.testing.assert_close(l_tiled, l_whole, atol=1e-6, rtol=1e-5)
    assert g_whole is not None and g_tiled is not None and float(g_whole.abs().sum()) > 0
    torch.testing.assert_close(g_tiled, g_whole, atol=1e-7, rtol=1e-4)


def test_tiled_encode_with_gradients(tiny_config):
    net = _net(tiny_config)
    x, z_grid, _ = _case(net)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    net.encode_block(xs[0], X_GRID, z_grid).square().mean().backward()
    encode_tiled(net, xs[1], X_GRID, z_grid, budget_bytes=1e9, checkpoint=True, min_splits=(2, 3, 2)).square().mean().backward()
    assert xs[0].grad is not None and xs[1].grad is not None and float(xs[0].grad.abs().sum()) > 0
    torch.testing.assert_close(xs[1].grad, xs[0].grad, atol=1e-7, rtol=1e-4)


def test_instance_norm_encoder_is_not_tiled(tiny_config):
    net = _net(tiny_config, encoder_norm="instance")
    x, z_grid, _ = _case(net)
    with torch.no_grad():
        plan = EncodePlan(net, X_GRID.shape, X_GRID, z_grid, 1e9, 4, min_splits=(2, 2, 2))
        assert len(plan.tiles) == 1
        torch.testing.assert_close(encode_tiled(net, x, X_GRID, z_grid, plan=plan), net.encode_block(x, X_GRID, z_grid))
        with pytest.raises(MedILError, match="whole input at once"):
            encode_tiled(net, x, X_GRID, z_grid, budget_bytes=1e6)


def test_plan_fits_the_budget_and_refuses_only_the_impossible():
    shape, halo = (300, 200, 100), 3
    cost = lambda box: float(np.prod(np.subtract(box[1], box[0]))) * 10.0  # noqa: E731
    plan = plan_tiles(shape, halo, cost, 2e6, "test")
    assert len(plan) > 1 and plan.peak_bytes <= 2e6
    covered = np.zeros(shape, bool)
    for lo, hi in plan.cores:
        assert not covered[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].any()  # cores do not overlap
        covered[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
    assert covered.all()
    assert len(plan_tiles(shape, halo, cost, 1e12, "test")) == 1
    with pytest.raises(MedILError, match="(smallest tile|times over).*raise the memory limit"):
        plan_tiles(shape, halo, cost, 100.0, "test")


_MEASURE = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch
    torch.set_num_threads(2)
    from medil_backend import load_model
    from medil_backend.geometry import Grid, Volume
    from medil_backend.ops.reconstruct import reconstruct
    shape, spacing, limit, precision = json.loads(sys.argv[1])
    rng = np.random.default_rng(0)
    vol = Volume(rng.random(shape, dtype=np.float32) * 100, Grid.from_parts(shape, spacing).affine, modality="mri")
    target = Grid.from_parts([int(n * s) for n, s in zip(shape, spacing)], 1.0, None, vol.grid.voxel_to_world(np.zeros(3)))
    net = load_model("medil-brain-t1").net
    def status(key):
        return [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key)][0]
    # ru_maxrss would carry the parent's peak over fork + exec: reset this process's high-water mark instead
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    rss0 = status("VmRSS")
    out = reconstruct(vol, target, net, device="cpu", max_memory_gb=limit, precision=precision)
    peak = status("VmHWM")
    print(json.dumps({"increase": peak - rss0, "tiles": out.meta["tiles"], "finite": bool(np.isfinite(out.array).all())}))
    """
)


def _measure(shape, spacing, limit: float, precision: str, timeout: int) -> dict:
    """Reconstruct a random volume in a fresh process; its peak RSS increase, tiles and finiteness."""
    res = subprocess.run(
        [sys.executable, "-c", _MEASURE, json.dumps([shape, spacing, limit, precision])],
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        cwd=REPO,
        timeout=timeout,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_peak_memory_of_a_process_stays_under_the_limit(precision):
    """A volume whose whole-volume decoder activations (several GB) would not fit a 0.75 GB limit."""
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/status")
    limit = 0.75
    info = _measure([96, 96, 40], [2.0, 2.0, 3.0], limit, precision, timeout=600)
    assert info["finite"] and info["tiles"]["decode"] > 1
    assert info["increase"] <= 1.1 * limit * 2**30, info


@pytest.mark.parametrize(
    "shape,spacing,out_spacing,spilled",
    [
        ((179, 256, 251), (1.0, 1.0, 1.0), None, False),  # a whole 1 mm head at defaults
        ((512, 512, 500), (0.57, 0.57, 0.48), 1.0, False),  # a 512x512x500 CT -> 1 mm
        ((195, 195, 160), (1.5, 1.5, 1.5), 0.7, False),  # a 1.5 mm chest CT -> 0.7 mm (about 417x417x343)
        ((512, 512, 512), (1.0, 1.0, 1.0), 0.5, True),  # 1024^3 output: 4 GiB, spilled to disk
    ],
)
def test_nothing_that_fits_on_disk_is_refused_at_the_default_limit(shape, spacing, out_spacing, spilled):
    from medil_backend import load_model
    from medil_backend.geometry import output_grid
    from medil_backend.ops.reconstruct import DEFAULT_MAX_MEMORY_GB, plan_reconstruction

    net = load_model("medil-brain-t1").net
    grid = Grid.from_parts(shape, spacing)
    target = output_grid(grid, spacing=out_spacing) if out_spacing else grid
    plan = plan_reconstruction(net, grid, target, precision="float32")
    assert plan.peak_bytes <= DEFAULT_MAX_MEMORY_GB * 2**30
    assert plan.spill == spilled


@pytest.mark.slow
def test_a_512_cubed_volume_at_the_default_limit():
    """512^3 in, 512^3 out, at the default 3 GB limit: a few minutes on 2 cores."""
    info = _measure([512, 512, 512], [1.0, 1.0, 1.0], 3.0, "auto", timeout=3600)
    assert info["finite"] and info["tiles"]["encode"] > 1
    assert info["increase"] <= 1.1 * 3.0 * 2**30, info


def test_bfloat16_on_a_cpu_without_native_bf16_runs_in_float32(monkeypatch):
    """Emulated bf16 is slower and larger than float32 on such a CPU: an explicit bfloat16 runs in float32 there."""
    import torch

    from medil_backend.ops import runtime

    for native, want in ((False, torch.float32), (True, torch.bfloat16)):
        monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda native=native: native)
        assert runtime.resolve_precision("bfloat16", torch.device("cpu")) == want
        assert runtime.resolve_precision("auto", torch.device("cpu")) == want
    assert runtime.resolve_precision("bfloat16", torch.device("cuda")) == torch.bfloat16
    assert runtime.resolve_precision("float32", torch.device("cpu")) == torch.float32


def test_one_precision_rule_for_every_task(monkeypatch):
    """Iterative work (adapt's training, diffusion steps) stays float32 under auto on a CPU, even one with native
    bf16; an explicit bfloat16 is honoured where the CPU has it; CUDA takes bf16 under auto for every task."""
    import torch

    from medil_backend.ops import runtime

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: True)
    assert runtime.resolve_precision("auto", cpu, iterative=True) == torch.float32
    assert runtime.resolve_precision("auto", cpu) == torch.bfloat16
    assert runtime.resolve_precision("bfloat16", cpu, iterative=True) == torch.bfloat16
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: False)
    assert runtime.resolve_precision("bfloat16", cpu, iterative=True) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert runtime.resolve_precision("auto", cuda, iterative=True) == torch.bfloat16
