import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medil_backend.errors import MedILError
from medil_backend.geometry import (
    Grid,
    code_from_direction,
    covering_grid,
    direction_from_code,
    exscribed_grid,
    output_grid,
)

finite = st.floats(-300, 300, allow_nan=False)
spacing_st = st.floats(0.2, 8.0, allow_nan=False)


@st.composite
def rotations(draw):
    q = np.array([draw(st.floats(-1, 1)) for _ in range(4)])
    if np.linalg.norm(q) < 1e-3:
        q = np.array([1.0, 0, 0, 0])
    w, x, y, z = q / np.linalg.norm(q)
    r = np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )
    flips = np.diag([draw(st.sampled_from([-1.0, 1.0])) for _ in range(3)])
    return r @ flips


@st.composite
def grids(draw):
    shape = tuple(draw(st.integers(1, 60)) for _ in range(3))
    spacing = [draw(spacing_st) for _ in range(3)]
    origin = [draw(finite) for _ in range(3)]
    return Grid.from_parts(shape, spacing, draw(rotations()), origin)


@given(grids())
def test_affine_parts_round_trip(g):
    again = Grid.from_parts(g.shape, g.spacing, g.direction, g.origin)
    np.testing.assert_allclose(again.affine, g.affine, atol=1e-9)
    np.testing.assert_allclose(g.direction.T @ g.direction, np.eye(3), atol=1e-9)


@given(grids(), st.lists(st.tuples(finite, finite, finite), min_size=1, max_size=20))
def test_world_voxel_round_trip(g, pts):
    pts = np.array(pts)
    np.testing.assert_allclose(g.voxel_to_world(g.world_to_voxel(pts)), pts, atol=1e-8)


@settings(max_examples=60)
@given(
    grids(),
    st.one_of(spacing_st, st.tuples(spacing_st, spacing_st, spacing_st)),
    st.sampled_from(["input", "RAS", "LPS", "LIA", "aligned"]),
)
def test_output_space_covers_input_extent(g, spacing, orientation):
    out = output_grid(g, spacing=spacing, orientation=orientation)
    # every corner of the input's covered region lies inside the output's covered region
    vox = out.world_to_voxel(g.edge_corners())
    # up to half the snap of _voxel_counts (a side within 1e-4 voxel + 1e-6 relative of a whole number is that
    # number, for float32 headers) may stay outside each face: a near-axis rotation leaves such float noise
    snap = (1e-4 + 1e-6 * np.array(out.shape)) / 2 + 1e-9
    assert np.all(vox >= -0.5 - snap) and np.all(vox <= np.array(out.shape) - 0.5 + snap)
    # and the output is tight: one voxel fewer along any axis would not cover it
    span = vox.max(axis=0) - vox.min(axis=0)
    assert np.all(np.array(out.shape) < span + 1 + 1e-6)
    # centred on the input
    np.testing.assert_allclose(out.edge_corners().mean(0), g.edge_corners().mean(0), atol=1e-6)


@given(grids())
def test_default_output_space_is_the_input_grid(g):
    out = output_grid(g)
    assert out.same_as(g, atol=1e-6)


@given(grids(), grids())
def test_like_is_exact(g, ref):
    out = output_grid(g, like=ref)
    assert out.shape == ref.shape
    np.testing.assert_array_equal(out.affine, ref.affine)


def test_like_conflicts_with_spacing():
    g = Grid.from_parts((4, 4, 4), 1.0)
    with pytest.raises(MedILError, match="reference image fixes the whole output grid") as err:
        output_grid(g, like=g, spacing=2.0)
    # the core names the settings, not a frontend's flags; the CLI adds its flags
    assert "--" not in str(err.value) and "like" in err.value.options

    from medil_backend.frontend import user_message

    assert user_message(err.value).endswith("(--like, --spacing, --orientation, --fov)")


@given(grids(), spacing_st, st.floats(0, 20))
def test_exscribed_grid_encloses_with_margin(inner, spacing, margin):
    outer = exscribed_grid(inner, spacing, margin_mm=margin)
    vox = outer.world_to_voxel(inner.edge_corners(margin))
    # a side within 1e-4 voxel (+ 1e-6 relative) of a whole number counts as that number (geometry._voxel_counts):
    # the enclosure may fall short by that much, shared between the two ends
    tol = 1e-4 + 1e-6 * np.array(outer.shape) + 1e-9
    assert np.all(vox >= -0.5 - tol) and np.all(vox <= np.array(outer.shape) - 0.5 + tol)


@pytest.mark.parametrize("code", ["RAS", "LPS", "LIA", "PSR", "IPL"])
def test_orientation_codes_round_trip(code):
    d = direction_from_code(code)
    assert code_from_direction(d) == code
    assert abs(abs(np.linalg.det(d)) - 1) < 1e-12


@pytest.mark.parametrize("bad", ["RAR", "XYZ", "RA", "RASS"])
def test_bad_orientation_code(bad):
    with pytest.raises(MedILError, match="orientation code"):
        direction_from_code(bad)


def test_fov_grid():
    g = Grid.from_parts((10, 10, 10), 1.0)
    out = output_grid(g, spacing=0.5, fov=[0, 4, 0, 3, 0, 2])
    assert out.shape == (8, 6, 4)
    lo, hi = out.extent()
    np.testing.assert_allclose(lo, [0, 0, 0], atol=1e-9)
    np.testing.assert_allclose(hi, [4, 3, 2], atol=1e-9)
    with pytest.raises(MedILError, match="empty"):
        output_grid(g, fov=[0, -1, 0, 1, 0, 1])


@pytest.mark.parametrize("spacing", [[0.0], [-1.0], [float("nan")], [1.0, 2.0]])
def test_bad_spacing(spacing):
    with pytest.raises(MedILError, match="spacing"):
        output_grid(Grid.from_parts((4, 4, 4), 1.0), spacing=spacing)


@given(grids(), st.integers(1, 4))
def test_coarsened_grid_refines_back(g, f):

    fine = g.coarsened(f).refined(f)
    # the first g.shape voxels of the refined grid are exactly g
    assert fine.sub_grid((0, 0, 0), g.shape).same_as(g, atol=1e-6)


def test_covering_grid_of_points():
    pts = np.array([[0, 0, 0], [10, 5, 2.5]])
    g = covering_grid(pts, 2.5, np.eye(3))
    assert g.shape == (4, 2, 1)


def test_grid_validation():
    with pytest.raises(MedILError, match="voxel spacing .*outside"):
        Grid.from_parts((2, 2, 2), [1, 0, 1]).validate()
    with pytest.raises(MedILError, match="non-finite"):
        Grid.from_parts((2, 2, 2), [1, float("nan"), 1]).validate()


@given(grids())
def test_canonical_order_is_an_exact_reindexing(g):
    from medil_backend.geometry import Volume, canonical_order

    arr = np.arange(np.prod(g.shape), dtype=np.float32).reshape(g.shape)
    v = canonical_order(Volume(arr, g.affine))
    assert v.grid.orientation_code == "RAS" or not np.allclose(np.abs(g.direction), np.round(np.abs(g.direction)))
    # every voxel keeps its world position
    for idx in [(0, 0, 0), tuple(s - 1 for s in v.array.shape)]:
        value = v.array[idx]
        orig = np.argwhere(arr == value)[0]
        np.testing.assert_allclose(v.grid.voxel_to_world(np.array(idx, float)), g.voxel_to_world(orig.astype(float)), atol=1e-6)
