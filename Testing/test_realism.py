"""Realism measures that do not rest on the project's encoder (medil_backend/realism.py): affine registration to a
head template, correlation there, tissue fractions, and the classifier two-sample test."""

from __future__ import annotations

import numpy as np
from conftest import shared

from medil_backend.geometry import Grid, Volume, rotation
from medil_backend.io import read_volume
from medil_backend.ops.interpolate import resample_sitk
from medil_backend.realism import affine_to_template, block_features, c2st_accuracy, template_correlation, tissue_fractions


def _template():
    """A real head at 4 mm (the MNI template), for speed."""
    v = read_volume(shared("mri/mni152nlin6asym_t1w_1mm.nii.gz"))
    grid = Grid.from_parts([46, 55, 46], 4.0, None, v.grid.voxel_to_world(np.zeros(3)))
    return resample_sitk(v, grid, "trilinear")


def test_a_moved_and_scaled_head_registers_back_to_the_template_and_noise_does_not():
    t = _template()
    mask = t.array > 0.2 * t.array.max()
    # the same head turned by about 10 degrees, 8 % larger about its centre and shifted by 15 mm, on another grid
    c = t.grid.voxel_to_world(np.array([(np.array(t.grid.shape) - 1) / 2]))[0]
    r = rotation([10.0, -6.0, 4.0])
    move = np.eye(4)
    move[:3, :3], move[:3, 3] = 1.08 * r, c - 1.08 * r @ c + np.array([12.0, -8.0, 5.0])
    moved_grid = Grid.from_parts((80, 90, 80), 3.0, None, c - 3.0 * np.array([40, 45, 40]))
    moved = resample_sitk(Volume(t.array, move @ t.affine), moved_grid, "trilinear")
    back = affine_to_template(moved.array, moved_grid, t)
    assert back.shape == t.array.shape
    assert template_correlation(back, t.array, mask) > 0.9
    noise = np.random.default_rng(0).random(moved_grid.shape).astype(np.float32)
    assert template_correlation(affine_to_template(noise, moved_grid, t), t.array, mask) < 0.3


def test_tissue_fractions_find_three_classes_in_their_shares():
    rng = np.random.default_rng(1)
    a = np.concatenate([np.full(200, 0.2), np.full(500, 0.6), np.full(300, 1.0)]) + rng.normal(0, 0.03, 1000)
    f = tissue_fractions(a.reshape(10, 10, 10), np.ones((10, 10, 10), bool))
    assert abs(f["csf"] - 0.2) < 0.02 and abs(f["gm"] - 0.5) < 0.02 and abs(f["wm"] - 0.3) < 0.02


def test_the_two_sample_classifier_is_at_chance_on_one_distribution_and_sure_on_two():
    rng = np.random.default_rng(2)
    mask = np.ones((8, 8, 8), bool)
    same = [block_features(rng.random((8, 8, 8)) + 1, mask) for _ in range(16)]
    other = [block_features(rng.random((8, 8, 8)) + 1 + np.linspace(0, 2, 8)[:, None, None], mask) for _ in range(8)]
    assert c2st_accuracy(same[:8], same[8:]) <= 0.7
    assert c2st_accuracy(same[:8], other) == 1.0


def test_a_volume_that_cannot_be_registered_is_a_clear_error():
    import pytest

    from medil_backend.errors import MedILError

    t = _template()
    with pytest.raises(MedILError, match="could not be registered"):
        affine_to_template(np.zeros((20, 20, 20), np.float32), Grid.from_parts((20, 20, 20), 4.0), t)
