import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medil_backend.geometry import Grid, output_grid
from medil_backend.nn import LTE3d, MedILAutoencoder, MedILConfig, trilinear_sample


def _grid_sample_reference(features, q):
    """torch's grid_sample (align_corners=True, border padding) at voxel coordinates q (B, N, 3)."""
    size = torch.tensor(features.shape[2:], dtype=torch.float64)
    norm = 2 * q / (size - 1) - 1  # (x, y, z) over (X, Y, Z) dims
    grid = norm.flip(-1).float()[:, :, None, None, :]  # grid_sample wants (z, y, x) -> last dim order (W, H, D)
    out = F.grid_sample(features, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out[:, :, :, 0, 0]


def test_fresh_lte_equals_trilinear():
    torch.manual_seed(0)
    feats = torch.randn(2, 5, 7, 9, 6)
    q = torch.rand(2, 500, 3, dtype=torch.float64) * torch.tensor([8.0, 10.0, 7.0]) - 1.0  # some outside the grid
    lte = LTE3d(5, 5, frequencies=16, inr_width=16, inr_blocks=2)
    out = lte(feats, q, torch.ones(2, 3))
    ref = _grid_sample_reference(feats, q)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(trilinear_sample(feats, q), ref, atol=1e-5, rtol=1e-5)


def test_trained_lte_differs_from_trilinear_and_backpropagates():
    torch.manual_seed(0)
    feats = torch.randn(1, 4, 6, 6, 6, requires_grad=True)
    q = torch.rand(1, 300, 3, dtype=torch.float64) * 5
    lte = LTE3d(4, 4, frequencies=8, inr_width=8, inr_blocks=1)
    with torch.no_grad():
        lte.inr.tail[1].weight.normal_(0, 0.1)
    out = lte(feats, q, torch.full((1, 3), 0.5))
    assert not torch.allclose(out, trilinear_sample(feats, q), atol=1e-4)
    out.square().mean().backward()
    assert feats.grad is not None and torch.isfinite(feats.grad).all() and feats.grad.abs().sum() > 0
    for name, p in lte.named_parameters():
        assert p.grad is not None, name


def test_lte_chunking_is_invisible():
    torch.manual_seed(1)
    feats = torch.randn(1, 3, 5, 5, 5)
    q = torch.rand(1, 1000, 3, dtype=torch.float64) * 4
    a = LTE3d(3, 2, frequencies=8, inr_width=8, chunk=64)
    b = LTE3d(3, 2, frequencies=8, inr_width=8, chunk=100000)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        a.inr.tail[1].weight.normal_(0, 0.1)
        b.inr.tail[1].weight.copy_(a.inr.tail[1].weight)
    torch.testing.assert_close(a(feats, q, torch.ones(1, 3)), b(feats, q, torch.ones(1, 3)))


def test_config_json_round_trip(tiny_config):
    again = MedILConfig.from_json(tiny_config.to_json())
    assert again == tiny_config
    with pytest.raises(ValueError, match="unknown"):
        MedILConfig.from_dict({"not_a_key": 1})


@pytest.mark.parametrize("shape", [(13, 11, 9), (7, 16, 5)])
@pytest.mark.parametrize("orientation", ["input", "PIR", np.array([[0.8, -0.6, 0], [0.6, 0.8, 0], [0, 0, 1.0]])])
def test_encode_decode_shapes_odd_and_rotated(tiny_model, shape, orientation):
    g = Grid.from_parts(shape, [1.2, 0.9, 2.5], np.diag([-1.0, 1.0, 1.0]), [10, -5, 3])
    x = torch.randn(1, 1, *shape)
    zg = tiny_model.latent_grid(g)
    with torch.no_grad():
        z, _, _ = tiny_model.encode(x, g, zg)
        assert z.shape == (1, tiny_model.config.latent_channels, *zg.shape)
        target = output_grid(g, spacing=0.7, orientation=orientation)
        y = tiny_model.decode(z, zg, target, skip=(x, g))
    assert y.shape == (1, 1, *target.shape)
    assert torch.isfinite(y).all()


def test_forward_backward_all_variants(tiny_config):
    from dataclasses import replace

    g = Grid.from_parts((12, 10, 8), 1.0)
    for cfg in (tiny_config, replace(tiny_config, interp=True), replace(tiny_config, kl=True, global_skip=False)):
        torch.manual_seed(0)
        net = MedILAutoencoder(cfg)
        x = torch.randn(2, 1, *g.shape)
        zg = net.latent_grid(g)
        y, z, mean, logvar = net(x, g, zg, g, sample=cfg.kl)
        assert y.shape == x.shape
        target = x + 0.1 * torch.randn_like(x)  # (a skip model starts at exactly x: L1 to x itself has no gradient)
        loss = (y - target).abs().mean() + (0 if mean is None else 1e-3 * mean.square().mean())
        loss.backward()
        grads = [p.grad for p in net.parameters() if p.requires_grad]
        assert sum(float(gr.abs().sum()) for gr in grads if gr is not None) > 0
        assert (mean is not None) == cfg.kl


def test_per_sample_grids_in_a_batch(tiny_model):
    g1 = Grid.from_parts((10, 10, 10), 1.0)
    g2 = Grid.from_parts((10, 10, 10), 1.5, origin=(4, 2, 0))
    x = torch.randn(2, 1, 10, 10, 10)
    zg = [tiny_model.latent_grid(g1), tiny_model.latent_grid(g1)]
    zg[1] = Grid(zg[0].shape, zg[0].affine @ np.diag([1.5, 1.5, 1.5, 1.0]))
    with torch.no_grad():
        both = tiny_model(x, [g1, g2], zg, [g1, g2])[0]
        one = tiny_model(x[1:], g2, zg[1], g2)[0]
    torch.testing.assert_close(both[1:], one, atol=1e-5, rtol=1e-5)


def test_decoder_rejects_instance_norm(tiny_config):
    from dataclasses import replace

    with pytest.raises(ValueError, match="voxel-local"):
        MedILAutoencoder(replace(tiny_config, decoder_norm="instance"))


def test_channel_norm_is_layer_norm_over_channels():
    from medil_backend.nn.backbone import ChannelNorm

    torch.manual_seed(0)
    norm = ChannelNorm(6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 6, 5, 4, 3)
    mean, var = x.mean(1, keepdim=True), x.var(1, keepdim=True, unbiased=False)
    ref = (x - mean) / torch.sqrt(var + 1e-5) * norm.weight.view(1, -1, 1, 1, 1) + norm.bias.view(1, -1, 1, 1, 1)
    torch.testing.assert_close(norm(x), ref, atol=1e-5, rtol=1e-5)


def test_bspline_base_is_cubic_bspline_interpolation_on_any_grid():
    """bspline_prefilter + bspline_on_grids reproduce scipy's cubic B-spline interpolation (order 3) at oblique points,
    and carry gradients to the coefficients (the latent base of the compact generative autoencoder)."""
    from scipy.ndimage import gaussian_filter, map_coordinates

    from medil_backend.geometry import Grid, direction_from_code
    from medil_backend.nn.resample import PREFILTER_HALF, bspline_on_grids, bspline_prefilter

    rng = np.random.default_rng(0)
    a = gaussian_filter(rng.normal(size=(30, 28, 26)), 1.5).astype(np.float64)
    P = PREFILTER_HALF
    grid = Grid.from_parts((30 - 2 * P, 28 - 2 * P, 26 - 2 * P), 2.0, origin=(2.0 * P, 2.0 * P, 2.0 * P))
    coeff = bspline_prefilter(torch.tensor(a, dtype=torch.float32)[None, None])
    assert tuple(coeff.shape[2:]) == grid.shape
    query = Grid.from_parts((9, 8, 7), 1.3, direction_from_code("LIA"), origin=(30.0, 12.0, 20.0))
    coeff.requires_grad_(True)
    got = bspline_on_grids(coeff, [grid], [query])
    vox = grid.world_to_voxel(query.voxel_to_world(np.indices(query.shape).reshape(3, -1).T.astype(float))) + P
    want = map_coordinates(a, vox.T, order=3, mode="nearest")
    inside = np.all((vox >= P + 2) & (vox <= np.array(a.shape) - P - 3), axis=1)  # the borders are padded differently
    assert inside.sum() > 100
    # scipy's prefilter is exact (recursive); ours is truncated at +-4 taps: within 1 % of the signal's range
    np.testing.assert_allclose(got[0, 0].detach().numpy().ravel()[inside], want[inside], atol=1e-2 * np.ptp(a))
    got.sum().backward()
    assert coeff.grad is not None and torch.isfinite(coeff.grad).all() and coeff.grad.abs().sum() > 0
