"""MRML volume nodes <-> world geometry.

A volume node's voxel (i, j, k) maps to RAS through its IJKToRAS matrix and then through its
parent transform. MedIL works in world RAS, so a linear parent transform is folded into the
matrix (the node itself is not changed); a non-linear one is refused with a clear message.
"""

from __future__ import annotations

import numpy as np


class GeometryError(ValueError):
    """A node whose geometry MedIL cannot use; the message says what to do."""


def vtk_to_numpy_matrix(m) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def numpy_to_vtk_matrix(a: np.ndarray):
    import vtk

    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r, c]))
    return m


def ijk_to_ras(node) -> np.ndarray:
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return vtk_to_numpy_matrix(m)


def world_ijk_to_ras(node) -> np.ndarray:
    """IJKToRAS including the node's parent transforms (linear only)."""
    import vtk

    affine = ijk_to_ras(node)
    parent = node.GetParentTransformNode()
    if parent is None:
        return affine
    if not parent.IsTransformToWorldLinear():
        raise GeometryError(
            f"volume '{node.GetName()}' is under a non-linear transform '{parent.GetName()}'; harden it first "
            "(Data module: right-click the volume, Harden transform) and try again"
        )
    m = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(m)
    return vtk_to_numpy_matrix(m) @ affine


def check_volume_node(node) -> None:
    if node is None:
        raise GeometryError("select an input volume")
    if not node.IsA("vtkMRMLScalarVolumeNode"):
        raise GeometryError(f"'{node.GetName()}' is not a scalar volume; MedIL needs a scalar (grey-level) volume")
    image = node.GetImageData()
    if image is None:
        raise GeometryError(f"volume '{node.GetName()}' has no image data; load it again")
    dims = image.GetDimensions()
    if min(dims) < 1 or image.GetNumberOfScalarComponents() != 1:
        raise GeometryError(f"volume '{node.GetName()}' is not a 3D scalar volume (dimensions {dims})")


def roi_bounds(roi) -> list[float]:
    """World RAS bounding box (xmin, xmax, ymin, ymax, zmin, zmax) of a Markups ROI (or any node with GetRASBounds)."""
    bounds = [0.0] * 6
    roi.GetRASBounds(bounds)
    if bounds[1] <= bounds[0] or bounds[3] <= bounds[2] or bounds[5] <= bounds[4]:
        raise GeometryError(f"ROI '{roi.GetName()}' is empty; give it a size in all three directions")
    return bounds
