"""The acquisition physics: the torch operator agrees with the numpy simulation, keeps world
geometry, and its adjoint passes the dot-product test."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import EXAMPLE

from medil_backend.acquisition import AcquisitionOperator, thick_slices
from medil_backend.errors import MedILError
from medil_backend.geometry import Grid
from medil_backend.io import read_volume


def _fine_crop():
    v = read_volume(EXAMPLE)
    v.array = np.ascontiguousarray(v.array[30:90, 30:90, 10:40], dtype=np.float32)
    v.affine = v.grid.sub_grid((30, 30, 10), (90, 90, 40)).affine
    return v


@pytest.mark.parametrize("axis,factor", [(2, 3), (0, 4)])
def test_operator_equals_block_averaging_on_a_real_volume(axis, factor):
    v = _fine_crop()
    thick, g = thick_slices(v.array, v.grid, axis, factor, "rect")
    A = AcquisitionOperator(g, v.grid)
    y = A(torch.from_numpy(v.array)[None, None])[0, 0].numpy()
    np.testing.assert_allclose(y, thick, rtol=1e-4, atol=1e-3 * float(np.abs(thick).max()))


@pytest.mark.parametrize("profile,cache", [("rect", False), ("gaussian", False), ("rect", True), ("gaussian", True)])
def test_adjoint_passes_the_dot_product_test(profile, cache):
    fine = Grid.from_parts((20, 17, 23), (1.0, 0.9, 1.1), None, (0.0, 0.0, 0.0))
    rot = np.array([[np.cos(0.3), -np.sin(0.3), 0], [np.sin(0.3), np.cos(0.3), 0], [0, 0, 1]])
    acquired = Grid.from_parts((9, 8, 4), (2.0, 2.0, 5.0), rot, (2.0, 1.0, 3.0))
    A = AcquisitionOperator(acquired, fine, thickness_mm=(None, None, 6.0), profile=profile, cache=cache)
    torch.manual_seed(0)
    x = torch.randn(1, 1, *fine.shape, dtype=torch.float64)
    y = torch.randn(1, 1, *acquired.shape, dtype=torch.float64)
    lhs = float((A(x) * y).sum())
    rhs = float((x * A.adjoint(y)).sum())
    assert abs(lhs - rhs) <= 1e-5 * max(abs(lhs), 1.0)


def test_the_cached_operator_is_the_same_operator(monkeypatch):
    """Kept sampling coordinates (one pass for every quadrature point) give the same A x, bit for bit, and the same
    A^T y to rounding, in slabs or not; the memory they take is stated; a second call reuses them."""
    import medil_backend.acquisition as acquisition

    monkeypatch.setattr(acquisition, "CHUNK_VOXELS", 200)  # several slabs per point
    fine = Grid.from_parts((20, 17, 23), (1.0, 0.9, 1.1), None, (0.0, 0.0, 0.0))
    rot = np.array([[np.cos(0.3), -np.sin(0.3), 0], [np.sin(0.3), np.cos(0.3), 0], [0, 0, 1]])
    acquired = Grid.from_parts((9, 8, 4), (2.0, 2.0, 5.0), rot, (2.0, 1.0, 3.0))
    plain = AcquisitionOperator(acquired, fine, thickness_mm=(None, None, 6.0))
    kept = AcquisitionOperator(acquired, fine, thickness_mm=(None, None, 6.0), cache=True)
    groups = min(acquisition.GROUPS, len(kept.points))
    assert len(kept.points) > 1 and kept.cache_bytes() == 12.0 * len(kept.points) * acquired.num_voxels + 4.0 * groups * fine.num_voxels
    torch.manual_seed(0)
    x = torch.randn(1, 1, *fine.shape)
    y = torch.randn(1, 1, *acquired.shape)
    assert torch.equal(plain(x), kept(x)) and torch.equal(kept(x), kept(x))
    np.testing.assert_allclose(kept.adjoint(y).numpy(), plain.adjoint(y).numpy(), rtol=1e-5, atol=1e-6)
    assert sum(g.shape[1] for g, _ in kept._cached[1]) == len(kept.points) * acquired.shape[0] and len(kept._cached[1]) == groups
    torch.set_num_threads(1)  # the groups one after another: the same results
    try:
        assert torch.equal(plain(x), kept(x)) and torch.equal(kept.adjoint(y), kept.adjoint(y))
    finally:
        torch.set_num_threads(2)
    x.requires_grad_(True)
    (g,) = torch.autograd.grad((kept(x) * y).sum(), x)  # differentiable: its gradient is the adjoint
    np.testing.assert_allclose(g.numpy(), kept.adjoint(y).numpy(), rtol=1e-5, atol=1e-6)


def test_a_thick_slice_is_centred_on_what_it_averages():
    """On a linear ramp along the slice normal, each thick voxel reads the ramp at its own centre."""
    fine = Grid.from_parts((16, 16, 60), 1.0, None, (0.0, 0.0, 0.0))
    acquired = Grid.from_parts((8, 8, 10), (2.0, 2.0, 5.0), None, (0.5, 0.5, 4.5))
    z = fine.voxel_to_world(np.stack(np.meshgrid(*[np.arange(n) for n in fine.shape], indexing="ij"), -1).reshape(-1, 3))[:, 2]
    ramp = torch.from_numpy(z.reshape(fine.shape))[None, None]
    for profile in ("rect", "gaussian"):
        y = AcquisitionOperator(acquired, fine, profile=profile)(ramp)[0, 0].numpy()
        centres = acquired.voxel_to_world(np.stack(np.meshgrid(*[np.arange(n) for n in acquired.shape], indexing="ij"), -1).reshape(-1, 3))
        inside = (centres[:, 2] > 8) & (centres[:, 2] < 50)  # away from the border clamp
        np.testing.assert_allclose(y.reshape(-1)[inside], centres[inside, 2], atol=1e-4)


def test_bad_settings():
    g = Grid.from_parts((4, 4, 4), 1.0)
    with pytest.raises(MedILError, match="slice profile"):
        AcquisitionOperator(g, g, profile="triangle")
    with pytest.raises(MedILError, match="thickness"):
        AcquisitionOperator(g, g, thickness_mm=(None, None, -1.0))
