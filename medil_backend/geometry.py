"""Grids, affines and output-space construction, all in world RAS millimetres.

A :class:`Grid` is a voxel shape plus a 4x4 affine that maps voxel indices ``(i, j, k)`` (voxel
centres) to world RAS coordinates in mm. A :class:`Volume` is an array on a grid plus its
modality: the one type that crosses module boundaries, so an array never loses its geometry.

World <-> voxel maps are computed in float64: float32 round-off pushes points that lie on a
grid's edge outside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import MedILError

_AXIS_LETTERS = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


def affine_from_parts(spacing: Sequence[float], direction: np.ndarray, origin: Sequence[float]) -> np.ndarray:
    """4x4 affine whose columns are ``direction[:, a] * spacing[a]`` and whose translation is ``origin``."""
    aff = np.eye(4, dtype=np.float64)
    aff[:3, :3] = np.asarray(direction, dtype=np.float64) * np.asarray(spacing, dtype=np.float64)[None, :]
    aff[:3, 3] = np.asarray(origin, dtype=np.float64)
    return aff


def direction_from_code(code: str) -> np.ndarray:
    """Direction matrix (columns = unit axis vectors in RAS) for an orientation code like ``LPS``.

    The code names where each voxel axis *points*, as in nibabel and Slicer: ``RAS`` is the
    identity, ``LPS`` is ITK/DICOM's convention.
    """
    code = code.strip().upper()
    if len(code) != 3 or any(c not in _AXIS_LETTERS for c in code):
        raise MedILError(f"orientation code {code!r} is not valid; use three letters, one from each of R/L, A/P, S/I (e.g. RAS, LPS, LIA)")
    axes = [_AXIS_LETTERS[c][0] for c in code]
    if sorted(axes) != [0, 1, 2]:
        raise MedILError(f"orientation code {code!r} repeats an axis; use one letter from each of R/L, A/P, S/I (e.g. RAS, LPS, LIA)")
    direction = np.zeros((3, 3))
    for col, c in enumerate(code):
        axis, sign = _AXIS_LETTERS[c]
        direction[axis, col] = sign
    return direction


def code_from_direction(direction: np.ndarray) -> str:
    """The orientation code of the axis-aligned directions closest to ``direction``."""
    letters = "RAS", "LPI"
    out = []
    for col in range(3):
        v = direction[:, col]
        axis = int(np.argmax(np.abs(v)))
        out.append(letters[0][axis] if v[axis] > 0 else letters[1][axis])
    return "".join(out)


def nearest_aligned_direction(direction: np.ndarray) -> np.ndarray:
    """The axis-aligned direction matrix closest to ``direction`` (de-obliquing, keeping axis order).

    Uses nibabel's orientation logic so that each voxel axis goes to a distinct world axis.
    """
    import nibabel.orientations as nio

    ornt = nio.io_orientation(np.vstack([np.hstack([direction, np.zeros((3, 1))]), [0, 0, 0, 1]]))
    aligned = np.zeros((3, 3))
    for col, (axis, sign) in enumerate(ornt):
        aligned[int(axis), col] = sign
    return aligned


class Grid:
    """A voxel grid in world RAS mm: ``shape`` (3 ints) and ``affine`` (4x4, voxel centre -> world).

    (A plain class rather than a dataclass, so that batch-collation code such as Lightning's
    passes it through untouched.)
    """

    __slots__ = ("shape", "affine")

    def __init__(self, shape: Sequence[int], affine: np.ndarray) -> None:
        self.shape: tuple[int, ...] = tuple(int(s) for s in shape)
        self.affine: np.ndarray = np.array(affine, dtype=np.float64).reshape(4, 4)

    @classmethod
    def from_parts(
        cls,
        shape: Sequence[int],
        spacing: Sequence[float] | float,
        direction: np.ndarray | None = None,
        origin: Sequence[float] = (0.0, 0.0, 0.0),
    ) -> Grid:
        spacing = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,))
        direction = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64)
        return cls(tuple(shape), affine_from_parts(spacing, direction, origin))

    # -- parts -------------------------------------------------------------------------------
    @property
    def spacing(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def direction(self) -> np.ndarray:
        return self.affine[:3, :3] / self.spacing[None, :]

    @property
    def origin(self) -> np.ndarray:
        return self.affine[:3, 3].copy()

    @property
    def orientation_code(self) -> str:
        return code_from_direction(self.direction)

    @property
    def num_voxels(self) -> int:
        return int(np.prod(self.shape))

    # -- maps --------------------------------------------------------------------------------
    def voxel_to_world(self, ijk: np.ndarray) -> np.ndarray:
        ijk = np.asarray(ijk, dtype=np.float64)
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    def world_to_voxel(self, xyz: np.ndarray) -> np.ndarray:
        xyz = np.asarray(xyz, dtype=np.float64)
        inv = np.linalg.inv(self.affine)
        return xyz @ inv[:3, :3].T + inv[:3, 3]

    def edge_corners(self, margin_mm: float = 0.0) -> np.ndarray:
        """World coordinates of the 8 corners of the region the voxels cover (voxel edges), grown by ``margin_mm``."""
        lo = -0.5 - margin_mm / self.spacing
        hi = np.asarray(self.shape) - 0.5 + margin_mm / self.spacing
        corners = np.array([[(lo, hi)[b][a] for a, b in enumerate(bits)] for bits in np.ndindex(2, 2, 2)])
        return self.voxel_to_world(corners)

    def extent(self) -> tuple[np.ndarray, np.ndarray]:
        """World-axis bounding box (min, max) of the region the voxels cover."""
        c = self.edge_corners()
        return c.min(axis=0), c.max(axis=0)

    # -- derived grids -----------------------------------------------------------------------
    def sub_grid(self, start: Sequence[int], stop: Sequence[int]) -> Grid:
        """The grid of voxels ``start <= index < stop`` (same spacing and direction)."""
        start = np.asarray(start, dtype=np.float64)
        aff = self.affine.copy()
        aff[:3, 3] = self.voxel_to_world(start)
        return Grid(tuple(int(b) - int(a) for a, b in zip(start, stop)), aff)

    def shifted(self, offset_voxels: Sequence[float]) -> Grid:
        """The same grid moved by ``offset_voxels`` (in its own voxel units, may be fractional)."""
        aff = self.affine.copy()
        aff[:3, 3] = self.voxel_to_world(np.asarray(offset_voxels, dtype=np.float64))
        return Grid(self.shape, aff)

    def coarsened(self, factor: int) -> Grid:
        """Grid whose voxels are ``factor``^3 blocks of this grid (the decoder's intermediate grid).

        Its shape is ``ceil(shape / factor)``; upsampling it by ``factor`` with nearest neighbour
        gives a grid whose first ``shape`` voxels are exactly this grid.
        """
        shape = tuple(-(-s // factor) for s in self.shape)
        aff = self.affine.copy()
        aff[:3, :3] = self.affine[:3, :3] * factor
        aff[:3, 3] = self.voxel_to_world(np.full(3, (factor - 1) / 2.0))
        return Grid(shape, aff)

    def refined(self, factor: int) -> Grid:
        """Inverse of :meth:`coarsened`: the fine grid whose ``factor``^3 blocks are this grid's voxels."""
        aff = self.affine.copy()
        aff[:3, :3] = self.affine[:3, :3] / factor
        aff[:3, 3] = self.affine[:3, 3] - aff[:3, :3] @ np.full(3, (factor - 1) / 2.0)
        return Grid(tuple(s * factor for s in self.shape), aff)

    def strided(self, factor: int, shape: Sequence[int]) -> Grid:
        """The grid of a stride-``factor`` convolution's output (``shape``): voxel 0 keeps voxel 0's centre."""
        aff = self.affine.copy()
        aff[:3, :3] *= factor
        return Grid(tuple(shape), aff)

    def validate(self, what: str = "the image") -> Grid:
        """This grid if its geometry is sound, else a :class:`MedILError` naming the problem.

        See :func:`checked_affine`.
        """
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise MedILError(f"{what} has shape {self.shape}; a 3D volume with at least one voxel per axis is needed")
        if max(self.shape) > MAX_AXIS_VOXELS:
            raise MedILError(f"{what} has shape {self.shape}, over {MAX_AXIS_VOXELS} voxels along an axis; fix the file's header")
        checked_affine(self.affine, self.shape, what)
        return self

    def same_as(self, other: Grid, atol: float = 1e-5) -> bool:
        return self.shape == other.shape and bool(np.allclose(self.affine, other.affine, atol=atol, rtol=0))

    def __repr__(self) -> str:
        sp = ", ".join(f"{s:g}" for s in self.spacing)
        org = ", ".join(f"{o:.2f}" for o in self.origin)
        return f"Grid(shape={self.shape}, spacing=({sp}), orientation={self.orientation_code}, origin=({org}))"


#: direction cosines whose columns are orthogonal to within this (largest |D^T D - I|, D with unit
#: columns) are float rounding of an orthonormal matrix (NIfTI float32 sforms, NRRD headers printed
#: with 6-7 digits): accepted, and new grids on those axes use :func:`orthonormalised` directions.
#: Beyond it the affine is sheared and refused.
ORTHONORMAL_TOLERANCE = 1e-4
#: the range of voxel spacings accepted (1 nm to 100 m)
SPACING_RANGE_MM = (1e-6, 1e5)
#: no voxel of a grid lies farther than this from the world origin (1 km: beyond it a header is broken,
#: and float64 coordinates lose the precision exact geometry needs)
WORLD_LIMIT_MM = 1e6
#: no grid has more voxels than this along an axis
MAX_AXIS_VOXELS = 10**6


def _fmt(values) -> str:
    return "(" + ", ".join(f"{float(v):.6g}" for v in np.ravel(values)) + ")"


def checked_affine(affine: np.ndarray, shape: Sequence[int], what: str = "the image") -> np.ndarray:
    """``affine`` itself if it is a sound voxel-to-world map for ``shape``, else a :class:`MedILError`.

    Sound: finite; spacings in :data:`SPACING_RANGE_MM`; direction columns orthogonal to
    :data:`ORTHONORMAL_TOLERANCE` (no shear, not singular); the whole grid within
    :data:`WORLD_LIMIT_MM` of the world origin. One check for every grid that enters the tool:
    input volumes, reference images, output grids and Slicer nodes.
    """
    affine = np.asarray(affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        raise MedILError(f"{what} has a non-finite (NaN or infinite) spacing, origin or direction; fix the file's header")
    if not np.array_equal(affine[3], [0.0, 0.0, 0.0, 1.0]):
        raise MedILError(f"{what} has a projective affine (last row {_fmt(affine[3])}); fix the file's header")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    lo, hi = SPACING_RANGE_MM
    if np.any(spacing < lo) or np.any(spacing > hi):
        raise MedILError(f"{what} has voxel spacing {_fmt(spacing)} mm, outside {lo:g} to {hi:g} mm; fix the file's header spacing")
    direction = affine[:3, :3] / spacing[None, :]
    if abs(np.linalg.det(direction)) < 1e-6:
        raise MedILError(f"{what} has a singular direction matrix (two voxel axes point the same way); fix the file's header orientation")
    deviation = float(np.max(np.abs(direction.T @ direction - np.eye(3))))
    if deviation > ORTHONORMAL_TOLERANCE:
        angle = float(np.degrees(np.arcsin(min(1.0, deviation))))
        raise MedILError(
            f"{what} has a sheared affine (voxel axes {angle:.3g} degrees from orthogonal, tolerance "
            f"{ORTHONORMAL_TOLERANCE:g}); resample it onto an orthogonal grid first (e.g. Slicer's Resample Scalar Volume)"
        )
    corners = np.array(list(np.ndindex(2, 2, 2)), dtype=np.float64) * (np.asarray(shape, dtype=np.float64) - 1)
    reach = float(np.max(np.abs(corners @ affine[:3, :3].T + affine[:3, 3])))
    if reach > WORLD_LIMIT_MM:
        raise MedILError(
            f"{what} reaches {reach:.3g} mm from the world origin (origin {_fmt(affine[:3, 3])}), beyond "
            f"{WORLD_LIMIT_MM:g} mm; fix the file's header origin and spacing"
        )
    return affine


def orthonormalised(direction: np.ndarray, what: str = "the input") -> np.ndarray:
    """The orthonormal matrix nearest ``direction`` (polar decomposition), for building new grids on
    a file's axes; a change beyond float64 rounding is logged. A grid that is kept as it is (the
    default output grid, a reference image's) keeps its header's affine bit for bit instead.
    """
    d = np.asarray(direction, dtype=np.float64)
    deviation = float(np.max(np.abs(d.T @ d - np.eye(3))))
    if deviation <= 1e-12:
        return d
    u, _, vt = np.linalg.svd(d)
    import logging

    logging.getLogger("medil").info(
        "%s: direction cosines orthogonal to %.1e only (float rounding in the header); the new grid uses the "
        "nearest orthonormal directions (within %.1e)",
        what,
        deviation,
        float(np.max(np.abs(u @ vt - d))),
    )
    return u @ vt


@dataclass(eq=False)
class Volume:
    """A 3D array in voxel order (i, j, k) on a world grid, with its modality (``mri``, ``ct`` or ``unknown``).
    ``meta``: what made it (JSON-like); ``extras``: the named volumes an operation made with it (``uncertainty``,
    ``coverage``), each on the same grid."""

    array: np.ndarray
    affine: np.ndarray
    modality: str = "unknown"
    meta: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.affine = np.array(self.affine, dtype=np.float64).reshape(4, 4)

    @property
    def grid(self) -> Grid:
        return Grid(self.array.shape[:3], self.affine)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def spacing(self) -> np.ndarray:
        return self.grid.spacing


def canonical_order(volume: Volume) -> Volume:
    """The same volume with its voxel axes permuted and flipped to the order closest to RAS.

    A pure re-indexing (no resampling, exact geometry): two files that store the same image in
    different axis orders or directions give the same array, so a network's output does not
    depend on how a file happened to be stored.
    """
    import nibabel.orientations as nio

    ornt = nio.io_orientation(volume.affine)
    if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        return volume
    array = nio.apply_orientation(volume.array, ornt)
    affine = volume.affine @ nio.inv_ornt_aff(ornt, volume.array.shape)
    return Volume(np.ascontiguousarray(array), affine, modality=volume.modality, meta=dict(volume.meta))


def _voxel_counts(lengths: np.ndarray) -> np.ndarray:
    """ceil(lengths) (at least 1), where lengths are a grid's sides in voxels; an absurd grid is refused.

    A side within 1e-4 voxel (plus float32 rounding, 1e-6 relative) of a whole number is that
    number: headers store spacings as float32, and 12 slices of 3.0000001 mm are 36 mm, not 37 voxels.
    """
    x = np.asarray(lengths, dtype=np.float64)
    with np.errstate(all="ignore"):
        n = np.ceil(x - 1e-4 - 1e-6 * np.abs(x))
    if not np.all(np.isfinite(n)) or np.any(n > MAX_AXIS_VOXELS):
        raise MedILError(
            f"the output grid would have {_fmt(n)} voxels along its axes, over {MAX_AXIS_VOXELS} an axis; "
            "choose a coarser spacing or a smaller field of view",
            options=("spacing", "fov"),
        )
    return np.maximum(1, n).astype(np.int64)


def covering_grid(points: np.ndarray, spacing: Sequence[float] | float, direction: np.ndarray, margin_mm: float = 0.0) -> Grid:
    """The smallest grid with ``spacing`` and ``direction`` whose voxels cover ``points`` (plus a margin), centred on them."""
    spacing = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,)).copy()
    direction = np.asarray(direction, dtype=np.float64)
    points = np.asarray(points, dtype=np.float64)
    centre = points.mean(axis=0)
    u = (points - centre) @ direction  # coordinates along the new axes (direction is orthonormal)
    lo = u.min(axis=0) - margin_mm
    hi = u.max(axis=0) + margin_mm
    n = _voxel_counts((hi - lo) / spacing)
    mid = (lo + hi) / 2.0
    first = mid - (n - 1) / 2.0 * spacing
    origin = centre + direction @ first
    return Grid(tuple(int(x) for x in n), affine_from_parts(spacing, direction, origin))


def exscribed_grid(inner: Grid, spacing: Sequence[float] | float, direction: np.ndarray | None = None, margin_mm: float = 0.0) -> Grid:
    """A grid with ``spacing`` (and ``direction``, default ``inner``'s) enclosing ``inner``'s region plus ``margin_mm``."""
    direction = inner.direction if direction is None else direction
    return covering_grid(inner.edge_corners(margin_mm), spacing, direction)


def resolve_direction(orientation: str | np.ndarray | None, input_grid: Grid) -> np.ndarray:
    """Direction matrix for ``orientation``: ``None``/``"input"``, ``"aligned"``, a code such as ``"LPS"``, or a 3x3 matrix."""
    if orientation is None or (isinstance(orientation, str) and orientation.lower() == "input"):
        return orthonormalised(input_grid.direction)
    if isinstance(orientation, str):
        if orientation.lower() in ("aligned", "ras-aligned", "deoblique"):
            return nearest_aligned_direction(input_grid.direction)
        return direction_from_code(orientation)
    d = np.asarray(orientation, dtype=np.float64)
    if d.shape != (3, 3) or not np.all(np.isfinite(d)):
        raise MedILError("a direction matrix must be 3x3 and finite")
    norms = np.linalg.norm(d, axis=0)
    if np.any(norms < 1e-9):
        raise MedILError("a direction matrix has a zero column; give three orthogonal unit vectors")
    d = d / norms
    if not np.allclose(d.T @ d, np.eye(3), atol=1e-4):
        raise MedILError("a direction matrix must have orthogonal columns (a rotation, possibly with flips)")
    return d


def output_grid(
    input_grid: Grid,
    *,
    like: Grid | None = None,
    spacing: Sequence[float] | float | None = None,
    orientation: str | np.ndarray | None = None,
    fov: Sequence[float] | None = None,
) -> Grid:
    """Build the output grid of a resampling job.

    - ``like``: exactly that grid (no other option may be given);
    - otherwise the grid has ``spacing`` (one value or three; default: the input's, carried to
      the new axes), ``orientation`` (see :func:`resolve_direction`), and covers ``fov``
      (world RAS box ``xmin, xmax, ymin, ymax, zmin, zmax``; default: the input's extent),
      centred on it.
    """
    if like is not None:
        if spacing is not None or orientation is not None or fov is not None:
            raise MedILError(
                "a reference image fixes the whole output grid; give either the reference or a spacing, orientation and field of view",
                options=("like", "spacing", "orientation", "fov"),
            )
        return Grid(like.shape, like.affine.copy()).validate("the reference image")
    keep_axes = orientation is None or (isinstance(orientation, str) and orientation.lower() == "input")
    if spacing is not None:
        sp = np.asarray(spacing, dtype=np.float64).ravel()
        if sp.size == 1:
            sp = np.repeat(sp, 3)
        if sp.size != 3:
            raise MedILError(f"spacing takes one value (isotropic) or three, not {sp.size}", options=("spacing",))
        lo, hi = SPACING_RANGE_MM
        if not np.all(np.isfinite(sp)) or np.any(sp < lo) or np.any(sp > hi):
            raise MedILError(f"spacing must be positive, between {lo:g} and {hi:g} mm, got {_fmt(sp)}", options=("spacing",))
    if keep_axes and fov is None:
        if spacing is None:  # the input's own grid, bit for bit
            return Grid(input_grid.shape, input_grid.affine.copy())
        return _respaced(input_grid, sp)
    direction = resolve_direction(orientation, input_grid)
    if spacing is None:
        # carry the input spacing to the new axes (an exact permutation for axis-aligned changes)
        weights = np.abs(direction.T @ input_grid.direction)
        sp = weights @ input_grid.spacing / weights.sum(axis=1)
    if fov is None:
        points = input_grid.edge_corners()
    else:
        box = np.asarray(fov, dtype=np.float64).ravel()
        if box.size != 6 or not np.all(np.isfinite(box)):
            raise MedILError("the field of view takes six numbers: XMIN XMAX YMIN YMAX ZMIN ZMAX (world RAS mm)", options=("fov",))
        lo, hi = box[0::2], box[1::2]
        if np.any(hi <= lo):
            raise MedILError(f"the field of view box is empty: each MAX must exceed its MIN, got {_fmt(box)}", options=("fov",))
        if np.max(np.abs(box)) > WORLD_LIMIT_MM:
            raise MedILError(
                f"the field of view {_fmt(box)} reaches beyond {WORLD_LIMIT_MM:g} mm; give it in world RAS mm", options=("fov",)
            )
        points = np.array([[(lo, hi)[b][a] for a, b in enumerate(bits)] for bits in np.ndindex(2, 2, 2)])
    return covering_grid(points, sp, direction)


def _respaced(grid: Grid, spacing: np.ndarray) -> Grid:
    """``grid``'s region on its own axes with a new ``spacing``, centred on it.

    Computed in ``grid``'s voxel frame, so float rounding in its direction cosines cannot add or
    drop a voxel: the same spacing gives back the same grid.
    """
    n = _voxel_counts(np.asarray(grid.shape) * grid.spacing / spacing)
    scale = spacing / grid.spacing  # new voxel size in old voxels
    start = (np.asarray(grid.shape) - 1) / 2.0 - (n - 1) / 2.0 * scale
    aff = np.eye(4)
    aff[:3, :3] = grid.affine[:3, :3] * scale[None, :]
    aff[:3, 3] = grid.voxel_to_world(start)
    return Grid(tuple(int(x) for x in n), aff)


# -- one grid seen from another ---------------------------------------------------------------------


def voxel_map(source: Grid, query: Grid) -> np.ndarray:
    """4x4 float64 map from ``query``'s voxel indices to continuous voxel coordinates of ``source``."""
    return np.linalg.inv(source.affine) @ query.affine


def voxel_coords(source: Sequence[Grid], query: Sequence[Grid], device=None):
    """Continuous voxel coordinates in each ``source`` grid of every voxel of each ``query`` grid: torch (B, N, 3) float64.

    The map is composed in float64 (float32 round-off pushes points on a grid's edge outside it).
    """
    import torch

    shape = query[0].shape
    axes = [torch.arange(s, dtype=torch.float64, device=device) for s in shape]
    ijk = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
    mats = torch.tensor(np.stack([voxel_map(s, q) for s, q in zip(source, query)]), device=device)
    return ijk.unsqueeze(0) @ mats[:, :3, :3].transpose(1, 2) + mats[:, None, :3, 3]


def query_cell(source: Sequence[Grid], query: Sequence[Grid]) -> np.ndarray:
    """Each query grid's voxel size projected onto its source grid's axes, in source voxels: (B, 3)."""
    return np.stack([(np.abs(s.direction.T @ q.direction) @ q.spacing) / s.spacing for s, q in zip(source, query)])


def lookup_box(source: Sequence[Grid], query: Sequence[Grid]) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The voxel box [lo, hi) of the source grids that trilinear/LTE lookups at the query grids read,
    and the same box grown by one voxel (within the grid) for the 3x3x3 convolutions before the lookup.

    Lookups clamp to the grid (border padding), so the box is clamped too: preparing the grown box
    and keeping [lo, hi) equals preparing the whole grid, voxel for voxel.
    """
    shape = np.asarray(source[0].shape)
    lo, hi = np.full(3, np.iinfo(np.int64).max), np.full(3, np.iinfo(np.int64).min)
    corners = np.array(list(np.ndindex(2, 2, 2)), dtype=np.float64)
    for s, q in zip(source, query):
        vox = s.world_to_voxel(q.voxel_to_world(corners * (np.asarray(q.shape) - 1)))
        lo = np.minimum(lo, np.floor(vox.min(0)).astype(np.int64) - 1)
        hi = np.maximum(hi, np.floor(vox.max(0)).astype(np.int64) + 2)
    lo = np.clip(lo, 0, shape - 1)
    hi = np.clip(hi, lo + 1, shape)
    return (lo, hi), (np.maximum(lo - 1, 0), np.minimum(hi + 1, shape))


#: how far (in the input's voxels) outside its outer voxel faces an output voxel still counts as inside
#: (round-off of grids built to cover the input exactly)
OUTSIDE_TOLERANCE_VOXELS = 1e-3


def inside_mask(source: Grid, query: Grid, index: Sequence[slice] | None = None) -> np.ndarray:
    """Whether each voxel of ``query`` (or of its block ``index``) lies within ``source``'s extent
    (its voxel boxes, -0.5 .. n - 0.5 in voxel units): a bool array of the block's shape, computed
    axis by axis in float64 (one block-sized float array at a time)."""
    index = tuple(index) if index is not None else tuple(slice(0, n) for n in query.shape)
    ranges = [np.arange(*sl.indices(n), dtype=np.float64) for sl, n in zip(index, query.shape)]
    m = voxel_map(source, query)
    inside = np.ones(tuple(len(r) for r in ranges), dtype=bool)
    tol = OUTSIDE_TOLERANCE_VOXELS
    for a in range(3):
        coord = (m[a, 0] * ranges[0])[:, None, None] + (m[a, 1] * ranges[1])[None, :, None] + (m[a, 2] * ranges[2])[None, None, :] + m[a, 3]
        inside &= (coord >= -0.5 - tol) & (coord <= source.shape[a] - 0.5 + tol)
    return inside


def overlap_fraction(source: Grid, query: Grid, max_points: int = 128) -> float:
    """The fraction of ``query``'s voxels that lie within ``source``'s extent: exact for grids of at most
    ``max_points`` voxels an axis, else estimated on the centres of blocks of voxels (to about 1/max_points)."""
    steps = [max(1, -(-n // max_points)) for n in query.shape]
    index = tuple(slice(min(s // 2, n - 1), n, s) for s, n in zip(steps, query.shape))
    return float(np.mean(inside_mask(source, query, index)))


def rotation(angles_deg) -> np.ndarray:
    """Rotation matrix about x, then y, then z (degrees)."""
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def centred(grid: Grid, centres_ijk: np.ndarray) -> Grid:
    """``grid`` translated so that the world centroid of the voxels ``centres_ijk`` is the origin
    (the latent diffusion model's group space: every head centred at world (0, 0, 0))."""
    c = grid.voxel_to_world(np.asarray(centres_ijk, dtype=np.float64)).mean(0)
    aff = grid.affine.copy()
    aff[:3, 3] -= c
    return Grid(grid.shape, aff)
