"""Render a volume the way Slicer's 3D view shows a sample: volume rendering (VTK, offscreen) beside three
orthogonal slices, into one PNG for the README.

    python tools/render_sample.py VOLUME.nii.gz docs/sample_rendered.png [--title TEXT]

Uses VTK (from the slicer-core wheel's dependencies) and Pillow; no display is needed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def volume_rendering(array: np.ndarray, spacing, size: int = 420) -> np.ndarray:
    """A (size, size, 3) uint8 image of ``array`` (i, j, k, RAS-ish axes) rendered with a CT/MR-like ramp."""
    import vtk
    from vtk.util import numpy_support

    a = np.clip(array / max(float(np.percentile(array, 99.5)), 1e-6), 0, 1)
    data = (a * 255).astype(np.uint8)
    image = vtk.vtkImageData()
    image.SetDimensions(*data.shape)
    image.SetSpacing(*[float(s) for s in spacing])
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(data.transpose(2, 1, 0).ravel(), deep=True))
    mapper = vtk.vtkSmartVolumeMapper()
    mapper.SetInputData(image)
    opacity, colour = vtk.vtkPiecewiseFunction(), vtk.vtkColorTransferFunction()
    for v, o in ((0, 0.0), (40, 0.0), (90, 0.08), (170, 0.35), (255, 0.6)):
        opacity.AddPoint(v, o)
    for v, rgb in ((0, (0, 0, 0)), (90, (0.75, 0.45, 0.35)), (170, (0.95, 0.85, 0.75)), (255, (1, 1, 1))):
        colour.AddRGBPoint(v, *rgb)
    prop = vtk.vtkVolumeProperty()
    prop.SetScalarOpacity(opacity)
    prop.SetColor(colour)
    prop.ShadeOn()
    prop.SetInterpolationTypeToLinear()
    vol = vtk.vtkVolume()
    vol.SetMapper(mapper)
    vol.SetProperty(prop)
    ren = vtk.vtkRenderer()
    ren.AddVolume(vol)
    ren.SetBackground(0.1, 0.1, 0.15)
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(size, size)
    window.AddRenderer(ren)
    cam = ren.GetActiveCamera()
    cam.SetViewUp(0, 0, 1)
    cam.SetPosition(-1, -0.6, 0.35)  # from the left, front and above, like Slicer's default 3D view turned
    cam.SetFocalPoint(0, 0, 0)
    ren.ResetCamera()
    cam.Zoom(1.3)
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.Update()
    out = grab.GetOutput()
    w, h, _ = out.GetDimensions()
    rgb = numpy_support.vtk_to_numpy(out.GetPointData().GetScalars()).reshape(h, w, -1)[::-1, :, :3]
    return np.ascontiguousarray(rgb)


def slices(array: np.ndarray, spacing, size: int = 420) -> list[np.ndarray]:
    from PIL import Image

    a = np.clip(array / max(float(np.percentile(array, 99.5)), 1e-6), 0, 1)
    c = [n // 2 for n in a.shape]
    sp = [float(s) for s in spacing]
    # axial, coronal, sagittal (anterior / superior up), each with its physical aspect
    views = [(a[:, :, c[2]].T[::-1], sp[0], sp[1]), (a[:, c[1], :].T[::-1], sp[0], sp[2]), (a[c[0], :, :].T[::-1], sp[1], sp[2])]
    out = []
    for v, sx, sy in views:
        w_mm, h_mm = v.shape[1] * sx, v.shape[0] * sy
        scale = size / max(w_mm, h_mm)
        img = Image.fromarray((v * 255).astype(np.uint8)).convert("RGB")
        img = img.resize((max(1, round(w_mm * scale)), max(1, round(h_mm * scale))), Image.BILINEAR)
        canvas = Image.new("RGB", (size, size))
        canvas.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
        out.append(np.asarray(canvas))
    return out


def main(argv=None) -> int:
    from PIL import Image, ImageDraw

    from medil_backend.geometry import canonical_order
    from medil_backend.io import read_volume

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("volume")
    ap.add_argument("png")
    ap.add_argument("--title", default="")
    args = ap.parse_args(argv)
    v = canonical_order(read_volume(args.volume))
    tiles = [volume_rendering(v.array, v.grid.spacing), *slices(v.array, v.grid.spacing)]
    panel = Image.fromarray(np.concatenate(tiles, axis=1))
    if args.title:
        ImageDraw.Draw(panel).text((10, 8), args.title, fill=(255, 255, 120))
    Path(args.png).parent.mkdir(parents=True, exist_ok=True)
    panel.save(args.png)
    print(args.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
