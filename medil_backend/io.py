"""Read and write volumes with exact geometry.

NIfTI goes through nibabel (its affine is RAS already, and the sform is kept bit for bit);
NRRD, MHA/MHD and DICOM series go through SimpleITK, whose LPS geometry is converted to RAS
here and nowhere else. Writes go to a temporary file in the target folder, renamed into place
when complete, so a failure never leaves a half-written or overwritten output.
"""

from __future__ import annotations

import os
import re
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


#: voxel magnitudes beyond this are refused: no scanner measures them, and float32 arithmetic on
#: them overflows (float32 ends at 3.4e38)
MAX_ABS_VALUE = 1e20


def _check_3d_shape(shape: tuple[int, ...], name: str) -> None:
    """A 3D shape with more than one slice (trailing singleton axes already dropped)."""
    if len(shape) < 3 or (len(shape) == 3 and 1 in shape):
        raise MedILError(f"{name} is a 2D image (shape {tuple(int(n) for n in shape)}); MedIL needs a 3D volume with more than one slice")
    if len(shape) > 3:
        raise MedILError(
            f"{name} has {len(shape)} dimensions (shape {tuple(int(n) for n in shape)}); pick one volume of the series "
            "(e.g. with `fslroi` or Slicer's Sequences module) and save it as a 3D file"
        )


def _squeeze_to_3d(array: np.ndarray, name: str) -> np.ndarray:
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    _check_3d_shape(array.shape, name)
    return array


def _sitk():
    """SimpleITK, with ITK's own warnings off: they went to stderr ahead of the one error line, and
    what they warn about (e.g. uneven DICOM slices) is checked here and refused with the file names."""
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    return sitk


def _check_input_path(path: Path) -> None:
    if not os.path.lexists(path):
        raise MedILError(f"{path} does not exist; check the path")
    if not path.exists():
        raise MedILError(f"{path} is a broken symbolic link (its target is missing); point at the file itself")
    if not (path.is_file() or path.is_dir()):
        raise MedILError(f"{path} is not a regular file or folder (a pipe, socket or device); save the volume to a file first")


# -- declared sizes, before any voxel is read -------------------------------------------------------


def _external_data_files(header: Path) -> list[str]:
    """The data files a detached MHD / NRRD header names (empty for a self-contained file)."""
    try:
        with open(header, "rb") as fh:
            head = fh.read(1 << 16)
    except OSError as exc:
        raise MedILError(f"cannot read {header} ({exc.strerror}); check its permissions") from None
    lines = head.decode("latin-1").splitlines()
    for n, line in enumerate(lines):
        key, sep, value = line.partition("=" if _suffix(header) in (".mhd", ".mha") else ":")
        if _suffix(header) in (".nrrd", ".nhdr") and not line.strip():
            break  # end of an NRRD header
        key, value = key.strip().lower().replace(" ", ""), value.strip().lstrip("=").strip()
        if not sep or key not in ("elementdatafile", "datafile"):
            continue
        first = value.split()[0] if value.split() else ""
        if first.upper() == "LOCAL" or not first:
            return []
        if first.upper() == "LIST":
            return [ln.strip() for ln in lines[n + 1 :] if ln.strip()]
        return [first]  # a file name, or a printf-style pattern whose folder is what matters
    return []


def _check_data_files_stay_beside(header: Path) -> None:
    """Refuse a detached header whose data files lie outside its own folder (a header from elsewhere
    must not make the tool read, and hand back, arbitrary files of this machine)."""
    folder = os.path.realpath(header.parent)
    for name in _external_data_files(header):
        target = os.path.realpath(os.path.join(folder, name))
        if os.path.isabs(name) or os.path.commonpath([folder, target]) != folder:
            raise MedILError(
                f"{header} names its voxel data {name!r}, outside the header's folder; MedIL reads data files only from "
                "beside their header: move the data file next to it and name it without a folder"
            )


_ITK_ITEMSIZE = {"8-bit": 1, "16-bit": 2, "32-bit": 4, "64-bit": 8}


def _declared(path: Path) -> tuple[tuple[int, ...], int]:
    """(shape, bytes per voxel) as a file's header declares them, without reading the voxels."""
    if path.is_file() and _suffix(path) in NIFTI_SUFFIXES:
        import nibabel as nib

        img = nib.load(str(path))
        shape = tuple(int(n) for n in img.header.get_data_shape())
        itemsize = int(img.header.get_data_dtype().itemsize)
        if _suffix(path) == ".nii":
            need = int(img.header.get("vox_offset", 352)) + int(np.prod(shape, dtype=np.float64)) * itemsize
            have = path.stat().st_size
            if have < need:
                raise MedILError(
                    f"{path} is truncated: its header declares {need} bytes of image, the file has {have}; copy the file again"
                )
        return shape, itemsize
    sitk = _sitk()

    if path.is_dir():
        return (), 0  # a DICOM series: each slice is checked as it is read
    if _suffix(path) in ITK_SUFFIXES:
        _check_data_files_stay_beside(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    bits = sitk.GetPixelIDValueAsString(reader.GetPixelID())  # e.g. "16-bit signed integer"
    itemsize = next((v for k, v in _ITK_ITEMSIZE.items() if k in bits), 8)
    comps = max(1, int(reader.GetNumberOfComponents()))
    return tuple(int(n) for n in reader.GetSize()), itemsize * comps


def check_declared_size(path: Path, max_bytes: float | None) -> None:
    """Refuse, before reading, a file whose declared voxels would not fit ``max_bytes`` (read, plus
    the float32 copy every task makes)."""
    shape, itemsize = _declared(path)
    if not shape or max_bytes is None:
        return
    voxels = float(np.prod(shape, dtype=np.float64))
    need = voxels * (itemsize + 4)
    if need > max_bytes:
        dims = "x".join(str(n) for n in shape)
        raise MedILError(
            f"{path} declares {dims} voxels, which need about {need / 2**30:.1f} GB to read, over the memory limit "
            f"({max_bytes / 2**30:.1f} GB); raise the memory limit, or crop the volume first",
            options=("max_memory",),
        )


# -- reading -------------------------------------------------------------------------------------


def _read_nifti_pixdim_check(path: Path, img) -> None:
    """Geometry from the qform and pixdim: nibabel silently replaces zero pixdims by 1, so check the header as stored."""
    from nibabel.openers import ImageOpener

    with ImageOpener(str(path)) as fh:
        raw = type(img.header).from_fileobj(fh, check=False)
    _check_spacing(np.asarray(raw["pixdim"][1:4], dtype=np.float64), path)


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    img = nib.load(str(path))
    if int(img.header["sform_code"]) == 0:
        _read_nifti_pixdim_check(path, img)
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
    if dim == 4 and image.GetSize()[3] == 1:  # a singleton 4th axis, as NIfTI and NRRD allow
        image = sitk.Extract(image, list(image.GetSize()[:3]) + [0], [0, 0, 0, 0])
    _check_itk_dimension(image.GetDimension(), image.GetSize())
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # ITK arrays are (k, j, i)
    return array, _ras_affine(image.GetDirection(), image.GetSpacing(), image.GetOrigin())


def _check_itk_dimension(dim: int, size) -> None:
    if dim != 3:
        raise MedILError(f"the image has {dim} dimensions (size {tuple(size)}); MedIL needs a 3D volume (pick one 3D volume of a series)")


def _ras_affine(direction, spacing, origin) -> np.ndarray:
    """The RAS affine of ITK's LPS direction (row-major, any dimension >= 3), spacing and origin (first three axes)."""
    dim = len(spacing)
    direction = np.array(direction, dtype=np.float64).reshape(dim, dim)[:3, :3]
    spacing = np.array(spacing, dtype=np.float64)[:3]
    _check_spacing(spacing, "the image")
    lps = np.eye(4)
    lps[:3, :3] = direction * spacing[None, :]
    lps[:3, 3] = np.array(origin, dtype=np.float64)[:3]
    return _LPS @ lps


def read_grid(path: str | os.PathLike, *, name: str | None = None) -> Grid:
    """The grid of a volume file from its header alone (a DICOM series is read whole), checked as
    :func:`read_volume` checks it: for ``--like`` references and ``medil info``."""
    path = Path(path)
    name = name or str(path)
    _check_input_path(path)
    if path.is_dir():
        return read_volume(path, name=name).grid
    try:
        shape, _ = _declared(path)
        if _suffix(path) in NIFTI_SUFFIXES:
            import nibabel as nib

            img = nib.load(str(path))
            if int(img.header["sform_code"]) == 0:
                _read_nifti_pixdim_check(path, img)
            affine = np.asarray(img.affine, dtype=np.float64)
        else:
            reader = _sitk().ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            size = tuple(reader.GetSize())
            if len(size) == 4 and size[3] == 1:
                size = size[:3]
            _check_itk_dimension(len(size), reader.GetSize())
            affine = _ras_affine(reader.GetDirection(), reader.GetSpacing(), reader.GetOrigin())
    except MedILError as exc:
        text = str(exc).replace(str(path), name)
        raise MedILError(name + text[len("the image") :] if text.startswith("the image") else text, options=exc.options) from None
    except Exception as exc:
        raise MedILError(
            f"cannot read {name} ({library_message(exc).replace(str(path), name)}); check that it is a complete NIfTI, NRRD, "
            "MHA/MHD file or a DICOM series folder"
        ) from None
    shape = tuple(shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    _check_3d_shape(shape, name)
    return Grid(shape, affine).validate(name)


def _dicom_series(path: Path) -> list[str]:
    """The file names of the one DICOM series in folder ``path``, checked complete and evenly spaced."""
    sitk = _sitk()

    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(path))
    if not series:
        raise MedILError(f"{path} is a folder with no DICOM series; point at a DICOM series folder or a volume file")
    if len(series) > 1:
        raise MedILError(f"{path} holds {len(series)} DICOM series; put each series in its own folder")
    files = list(reader.GetGDCMSeriesFileNames(str(path), series[0]))
    members = {os.path.realpath(f) for f in files}
    others = sorted(
        e.name
        for e in os.scandir(path)
        if e.is_file() and not e.name.startswith(".") and e.name.upper() != "DICOMDIR" and os.path.realpath(e.path) not in members
    )
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise MedILError(
            f"{path}: {len(others)} file(s) are not readable slices of its DICOM series ({shown}): they are truncated, "
            "damaged or not DICOM; restore them from the source, or move them out of the folder"
        )
    if len(files) < 2:
        return files
    positions, normal = [], None
    info = sitk.ImageFileReader()
    for f in files:
        info.SetFileName(f)
        try:
            info.ReadImageInformation()
        except RuntimeError:
            raise MedILError(f"{path}: the slice {os.path.basename(f)} cannot be read; restore it from the source") from None
        if normal is None:
            normal = np.array(info.GetDirection(), dtype=np.float64).reshape(3, 3)[:, 2]
        positions.append(float(np.dot(info.GetOrigin(), normal)))
    order = np.argsort(positions)
    gaps = np.diff(np.asarray(positions)[order])
    step = float(np.median(gaps))
    bad = np.flatnonzero(np.abs(gaps - step) > max(0.01, 0.01 * abs(step)))
    if abs(step) < 1e-6 or bad.size:
        i = int(bad[0]) if bad.size else 0
        a, b = (os.path.basename(files[order[i]]), os.path.basename(files[order[i + 1]]))
        raise MedILError(
            f"{path}: the DICOM slices are not evenly spaced ({abs(gaps[i]):.4g} mm between {a} and {b}, {abs(step):.4g} mm elsewhere): "
            "a slice is missing or duplicated; restore the complete series"
        )
    return files


def _read_itk(path: Path) -> tuple[np.ndarray, np.ndarray]:
    sitk = _sitk()

    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(_dicom_series(path))
        image = reader.Execute()
    else:
        image = sitk.ReadImage(str(path))
    return _itk_to_ras(image)


_LIBRARY_PREFIXES = (
    re.compile(r"^Exception thrown in SimpleITK \S+:\s*"),  # SimpleITK's wrapper
    re.compile(r"^\S+\.(cxx|hxx|txx|h|cpp)(:\d+)?:?\s*"),  # an ITK source file and line
    re.compile(r"^((itk|sitk)::ERROR:|ITK ERROR:)\s*"),
    re.compile(r"^\w+\(0x[0-9a-fA-F]+\):\s*"),  # an ITK object and its address
    re.compile(r"^\[\w+\]\s*\w+:\s*"),  # a teem/NRRD function
    re.compile(r"^Description:\s*"),
)


def library_message(exc: BaseException) -> str:
    """One line of a library's exception in the user's words: ITK's source files, lines, object
    addresses and call chains dropped; its first statement kept, completed by its most specific one."""
    kept = []
    for line in str(exc).splitlines():
        line = line.strip()
        for prefix in _LIBRARY_PREFIXES:
            line = prefix.sub("", line)
        line = line.strip()
        if line and not line.startswith("trouble"):
            kept.append(line)
    if not kept:
        return type(exc).__name__
    text = kept[0].rstrip(" :")
    if kept[0].endswith(":") and len(kept) > 1:
        text += ": " + kept[-1]
    return text[:240]


def read_volume(
    path: str | os.PathLike, modality: str = "unknown", *, max_memory_gb: float | None = None, name: str | None = None
) -> Volume:
    """Read a 3D volume (NIfTI, NRRD, MHA/MHD, DICOM series folder) with its world RAS geometry.

    Every volume that enters the tool passes the same checks (and a :class:`MedILError` names what
    fails): a regular file or a complete, evenly spaced DICOM series; data files beside their
    header; declared size within ``max_memory_gb`` (default 3 GB) *before* the voxels are read; a
    3D scalar image with more than one slice; a sound geometry (:meth:`Grid.validate`); finite
    voxels within :data:`MAX_ABS_VALUE`. ``name`` is how messages call the file (default: the path).
    """
    from .limits import check_memory_limit

    path = Path(path)
    name = name or str(path)
    _check_input_path(path)
    try:
        check_declared_size(path, check_memory_limit(max_memory_gb))
        if path.is_file() and _suffix(path) in NIFTI_SUFFIXES:
            array, affine = _read_nifti(path)
        else:
            array, affine = _read_itk(path)
    except MedILError as exc:
        text = str(exc).replace(str(path), name)
        raise MedILError(name + text[len("the image") :] if text.startswith("the image") else text, options=exc.options) from None
    except MemoryError:
        raise MedILError(f"{name} is too large to read into memory on this machine; crop it or use a machine with more memory") from None
    except Exception as exc:  # nibabel / SimpleITK raise many types for corrupt files
        raise MedILError(
            f"cannot read {name} ({library_message(exc).replace(str(path), name)}); check that it is a complete NIfTI, NRRD, "
            "MHA/MHD file or a DICOM series folder"
        ) from None
    return checked_volume(np.asarray(array), affine, name, modality)


def checked_volume(array: np.ndarray, affine: np.ndarray, name: str, modality: str = "unknown") -> Volume:
    """The one validation of voxels and geometry that every volume passes (files and Slicer nodes)."""
    array = _squeeze_to_3d(array, name)
    if array.dtype.kind not in "biuf":
        raise MedILError(f"{name} holds {array.dtype} voxels; MedIL reads integer or floating-point scalar volumes")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if not array.dtype.isnative:  # big-endian data on a little-endian machine: torch would misread it
        array = array.astype(array.dtype.newbyteorder("="))
    grid = Grid(array.shape, affine).validate(name)
    if array.dtype.kind == "f":
        with np.errstate(all="ignore"):
            finite = np.isfinite(array)
            if not finite.all():
                bad = int(np.count_nonzero(~finite))
                raise MedILError(f"{name} has {bad} non-finite (NaN or infinite) voxels; replace them (e.g. with 0) and try again")
            peak = float(np.max(np.abs(array))) if array.size else 0.0
        if peak > MAX_ABS_VALUE:
            raise MedILError(
                f"{name} has voxel values up to {peak:.3g}, beyond {MAX_ABS_VALUE:g}: no scan measures that; rescale the "
                "image (e.g. to its physical units) and try again"
            )
    return Volume(array, grid.affine, modality=modality, meta={"path": name, "dtype": str(array.dtype)})


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
    check_output_path_free(path, overwrite)
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


def _write_nifti(array: np.ndarray, affine: np.ndarray, path: str, provenance: dict | None = None) -> None:
    """NIfTI-1 (float32 header geometry) when that keeps the affine to 1e-6 mm, else NIfTI-2 (float64)."""
    import nibabel as nib

    exact32 = np.max(np.abs(affine.astype(np.float32).astype(np.float64) - affine)) <= 1e-6
    img = (nib.Nifti1Image if exact32 else nib.Nifti2Image)(array, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    if provenance:
        img.header["descrip"] = provenance_line(provenance).encode("ascii", "replace")[:79]
    nib.save(img, path)


#: what every file the tool generates says about itself (NIfTI ``descrip``; NRRD/MHA ``MedIL.note``)
AI_NOTE = "AI-generated by MedIL"


def provenance_line(provenance: dict) -> str:
    """One short line: the AI-generated marking, the task, the model and the version (fits NIfTI's 80-byte descrip)."""
    return f"{AI_NOTE} {provenance.get('task', '')} {provenance.get('model', '')} v{provenance.get('version', '')}".replace("  ", " ")


def sidecar_path(path: str | os.PathLike) -> Path:
    """The JSON sidecar of an output file (BIDS style): ``out.nii.gz`` -> ``out.json``."""
    path = Path(path)
    return path.with_name(path.name[: -len(_suffix(path))] + ".json")


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


def _write_itk(array: np.ndarray, affine: np.ndarray, path: str, provenance: dict | None = None) -> None:
    import SimpleITK as sitk

    image = to_sitk(array, affine)
    for key, value in (provenance_items(provenance) if provenance else {}).items():
        image.SetMetaData(key, value)
    sitk.WriteImage(image, path, useCompression=True)


def provenance_items(provenance: dict) -> dict[str, str]:
    """NRRD / MHA key-value pairs of a provenance record (``MedIL.note`` first)."""
    import json

    items = {"MedIL.note": provenance_line(provenance), "MedIL.aiGenerated": "true"}
    for key, value in provenance.items():
        items[f"MedIL.{key}"] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return {k: v.replace("\n", " ") for k, v in items.items()}


def write_volume(
    volume: Volume,
    path: str | os.PathLike,
    *,
    dtype: str | np.dtype | None = None,
    overwrite: bool = False,
    provenance: dict | None = None,
) -> Path:
    """Write ``volume`` to NIfTI / NRRD / MHA atomically (temporary file in the same folder, then rename).

    With ``provenance`` (task, model, version, parameters, ...) the file says it is AI-generated:
    NIfTI ``descrip``, NRRD/MHA ``MedIL.*`` keys, and a JSON sidecar (:func:`sidecar_path`) with
    the whole record, written the same atomic way.
    """
    path = check_output_path(path, overwrite=overwrite)
    sidecar = sidecar_path(path) if provenance else None
    if sidecar is not None:
        check_output_path_free(sidecar, overwrite)
    array = cast_for_output(np.asarray(volume.array), dtype)
    suffix = _suffix(path)
    tmps = []
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".part{suffix}", dir=path.parent or ".")
        os.close(fd)
        tmps.append(tmp)
        if suffix in NIFTI_SUFFIXES:
            _write_nifti(array, volume.affine, tmp, provenance)
        else:
            _write_itk(array, volume.affine, tmp, provenance)
        os.chmod(tmp, _output_mode(path))
        if sidecar is not None:
            import json

            fd, side_tmp = tempfile.mkstemp(prefix=f".{sidecar.name}.", suffix=".part", dir=path.parent or ".")
            tmps.append(side_tmp)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(
                    {"AIGenerated": True, "note": provenance_line(provenance), **provenance}, fh, indent=2, sort_keys=True, default=str
                )
            os.chmod(side_tmp, _output_mode(sidecar))
        check_output_path_free(path, overwrite)  # it may have appeared while we computed
        os.replace(tmp, path)
        if sidecar is not None:
            os.replace(tmps[1], sidecar)
    except BaseException as exc:
        for t in tmps:
            if os.path.exists(t):
                os.unlink(t)
        if isinstance(exc, (MedILError, KeyboardInterrupt)):
            raise
        raise MedILError(f"could not write {path} ({library_message(exc)}); check free disk space and permissions") from None
    return path


def check_output_path_free(path: Path, overwrite: bool) -> None:
    """Nothing (not even a dangling symbolic link) is replaced without ``overwrite``: outputs and their sidecars."""
    if os.path.lexists(path) and not overwrite:
        raise MedILError(f"{path} already exists; choose another name or allow overwriting it", options=("overwrite",))


def _output_mode(path: Path) -> int:
    """The mode a new file gets under the umask (mkstemp's 0600 would hide outputs from a group), or
    the mode of the file being replaced."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask
