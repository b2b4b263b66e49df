"""Read and write volumes with exact geometry.

NIfTI goes through nibabel (its affine is RAS already, and the sform is kept bit for bit);
NRRD, MHA/MHD and DICOM series go through SimpleITK, whose LPS geometry is converted to RAS
here and nowhere else. Writes go to a temporary file in the target folder, renamed into place
when complete, so a failure never leaves a half-written or overwritten output.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from .errors import MedILError
from .geometry import Grid, Volume

_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS (its own inverse)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
WRITE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in (".nii.gz",) + NIFTI_SUFFIXES + ITK_SUFFIXES:
        if name.endswith(s):
            return s
    return path.suffix.lower()


def _squeeze_to_3d(array: np.ndarray, path: Path) -> np.ndarray:
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim < 3:
        raise MedILError(f"{path} is a {array.ndim}D image; MedIL needs a 3D volume")
    if array.ndim > 3:
        raise MedILError(
            f"{path} has {array.ndim} dimensions (shape {array.shape}); pick one volume of the series "
            "(e.g. with `fslroi` or Slicer's Sequences module) and save it as a 3D file"
        )
    return array


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib
    from nibabel.openers import ImageOpener

    img = nib.load(str(path))
    if int(img.header["sform_code"]) == 0:  # geometry comes from the qform and pixdim
        # nibabel silently replaces zero pixdims by 1: check the header as stored
        with ImageOpener(str(path)) as fh:
            raw = type(img.header).from_fileobj(fh, check=False)
        _check_spacing(np.asarray(raw["pixdim"][1:4], dtype=np.float64), path)
    array = np.asanyarray(img.dataobj)
    return array, np.asarray(img.affine, dtype=np.float64)


def _check_spacing(spacing: np.ndarray, path) -> None:
    # (a negative spacing is read as a flip by both nibabel and ITK, their documented convention)
    if not np.all(np.isfinite(spacing)) or np.any(spacing == 0):
        raise MedILError(
            f"{path} has voxel spacing {tuple(float(s) for s in spacing)}; spacing must be non-zero and finite: fix the file's header"
        )


def _itk_to_ras(image) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    if image.GetNumberOfComponentsPerPixel() != 1:
        raise MedILError(
            f"the image has {image.GetNumberOfComponentsPerPixel()} components per voxel (colour or vector); MedIL needs a scalar volume"
        )
    dim = image.GetDimension()
    if dim != 3:
        raise MedILError(f"the image has {dim} dimensions; MedIL needs a 3D volume (pick one 3D volume of a series)")
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # ITK arrays are (k, j, i)
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.array(image.GetSpacing(), dtype=np.float64)
    _check_spacing(spacing, "the image")
    lps = np.eye(4)
    lps[:3, :3] = direction * spacing[None, :]
    lps[:3, 3] = image.GetOrigin()
    return array, _LPS @ lps


def _read_itk(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        series = reader.GetGDCMSeriesIDs(str(path))
        if not series:
            raise MedILError(f"{path} is a folder with no DICOM series; point at a DICOM series folder or a volume file")
        if len(series) > 1:
            raise MedILError(f"{path} holds {len(series)} DICOM series; put each series in its own folder")
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path), series[0]))
        image = reader.Execute()
    else:
        image = sitk.ReadImage(str(path))
    return _itk_to_ras(image)


def read_volume(path: str | os.PathLike, modality: str = "unknown") -> Volume:
    """Read a 3D volume (NIfTI, NRRD, MHA/MHD, DICOM series folder) with its world RAS geometry.

    Raises :class:`MedILError` for a missing, unreadable or corrupt file, an image that is not
    3D, bad spacing, or non-finite voxels.
    """
    path = Path(path)
    if not path.exists():
        raise MedILError(f"{path} does not exist; check the path")
    try:
        if path.is_file() and _suffix(path) in NIFTI_SUFFIXES:
            array, affine = _read_nifti(path)
        else:
            array, affine = _read_itk(path)
    except MedILError:
        raise
    except MemoryError:
        raise MedILError(f"{path} is too large to read into memory on this machine") from None
    except Exception as exc:  # nibabel / SimpleITK raise many types for corrupt files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MedILError(
            f"cannot read {path} ({first[:200]}); check that it is a complete NIfTI, NRRD, MHA/MHD file or a DICOM series folder"
        ) from None
    array = _squeeze_to_3d(np.asarray(array), path)
    if array.dtype.kind not in "biuf":
        raise MedILError(f"{path} holds {array.dtype} voxels; MedIL reads integer or floating-point scalar volumes")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    grid = Grid(array.shape, affine).validate(str(path))
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise MedILError(f"{path} has {bad} non-finite (NaN or infinite) voxels; replace them (e.g. with 0) and try again")
    return Volume(array, grid.affine, modality=modality, meta={"path": str(path), "dtype": str(array.dtype)})


def check_output_path(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Fail early, before any computation, if ``path`` cannot be written."""
    path = Path(path)
    if _suffix(path) not in WRITE_SUFFIXES:
        raise MedILError(f"cannot write {path.name}: use a file name ending in {', '.join(WRITE_SUFFIXES)}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise MedILError(f"the output folder {parent} does not exist; create it first")
    if path.is_dir():
        raise MedILError(f"{path} is a folder; give an output file name")
    if path.exists() and not overwrite:
        raise MedILError(f"{path} already exists; choose another name or allow overwriting it", options=("overwrite",))
    if not os.access(parent, os.W_OK):
        raise MedILError(f"the output folder {parent} is not writable; choose another place")
    return path


def cast_for_output(array: np.ndarray, dtype: str | np.dtype | None) -> np.ndarray:
    """float32 by default; an integer dtype is rounded and clipped to its range."""
    dtype = np.dtype(np.float32 if dtype is None else dtype)
    if dtype.kind in "iub":
        info = np.iinfo(dtype) if dtype.kind != "b" else None
        out = np.rint(array)
        if info is not None:
            out = np.clip(out, info.min, info.max)
        return out.astype(dtype)
    return array.astype(dtype)


def _write_nifti(array: np.ndarray, affine: np.ndarray, path: str) -> None:
    """NIfTI-1 (float32 header geometry) when that keeps the affine to 1e-6 mm, else NIfTI-2 (float64)."""
    import nibabel as nib

    exact32 = np.max(np.abs(affine.astype(np.float32).astype(np.float64) - affine)) <= 1e-6
    img = (nib.Nifti1Image if exact32 else nib.Nifti2Image)(array, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, path)


def to_sitk(array: np.ndarray, affine: np.ndarray):
    """A SimpleITK image (LPS geometry) of an array on a RAS grid."""
    import SimpleITK as sitk

    grid = Grid(array.shape, _LPS @ affine)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetSpacing([float(s) for s in grid.spacing])
    image.SetDirection([float(d) for d in grid.direction.ravel()])
    image.SetOrigin([float(o) for o in grid.origin])
    return image


def from_sitk(image) -> tuple[np.ndarray, np.ndarray]:
    """(array in (i, j, k) order, RAS affine) of a SimpleITK image."""
    return _itk_to_ras(image)


def _write_itk(array: np.ndarray, affine: np.ndarray, path: str) -> None:
    import SimpleITK as sitk

    sitk.WriteImage(to_sitk(array, affine), path, useCompression=True)


def write_volume(volume: Volume, path: str | os.PathLike, *, dtype: str | np.dtype | None = None, overwrite: bool = False) -> Path:
    """Write ``volume`` to NIfTI / NRRD / MHA atomically (temporary file in the same folder, then rename)."""
    path = check_output_path(path, overwrite=overwrite)
    array = cast_for_output(np.asarray(volume.array), dtype)
    suffix = _suffix(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".part{suffix}", dir=path.parent or ".")
    os.close(fd)
    try:
        if suffix in NIFTI_SUFFIXES:
            _write_nifti(array, volume.affine, tmp)
        else:
            _write_itk(array, volume.affine, tmp)
        if path.exists() and not overwrite:  # appeared while we computed
            raise MedILError(f"{path} already exists; choose another name or allow overwriting it", options=("overwrite",))
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, (MedILError, KeyboardInterrupt)):
            raise
        raise MedILError(f"could not write {path} ({exc}); check free disk space and permissions") from None
    return path
