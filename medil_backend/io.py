"""Read and write volumes with exact geometry.

NIfTI goes through nibabel (its affine is RAS already, and the sform is kept bit for bit);
NRRD, MHA/MHD and DICOM series go through SimpleITK, whose LPS geometry is converted to RAS
here and nowhere else. Writes go to a temporary file in the target folder, renamed into place
when complete, so a failure never leaves a half-written or overwritten output.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from contextvars import ContextVar
from pathlib import Path

import numpy as np

from .errors import MedILError
from .geometry import Grid, Volume

_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS (its own inverse)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
WRITE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha")
MGH_SUFFIXES = (".mgh", ".mgz")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")


#: volume formats of the field that MedIL does not read, named in the refusal with the usual converter
_OTHER_FORMATS = (
    ((".par", ".rec"), "a Philips PAR/REC file", "dcm2niix, or nibabel's parrec2nii"),
    ((".mnc", ".mnc.gz"), "a MINC file", "mnc2nii, or nibabel"),
    ((".head", ".brik", ".brik.gz"), "an AFNI dataset", "AFNI's 3dAFNItoNIFTI"),
    ((".v",), "an ECAT file", "nibabel, or the scanner's export"),
    ((".dcm.gz", ".ima.gz"), "a gzipped DICOM file", "gunzip it first"),
    ((".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"), "a 2D picture, not a volume", "save the scan itself, e.g. in Slicer"),
)


def _has_dicom_preamble(path: Path) -> bool:
    """A DICOM Part 10 file: 128 bytes of preamble, then ``DICM`` (the files of a DICOMDIR tree have no suffix)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


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


def _format(path: Path) -> str:
    """``nifti`` (.nii, .nii.gz, .hdr/.img pairs), ``metaio`` (.mha, .mhd), ``nrrd`` (.nrrd, .nhdr) or
    ``dicom`` (a folder); any other file is refused before a library parses it."""
    if path.is_dir():
        return "dicom"
    s = _suffix(path)
    if s in DICOM_SUFFIXES or (s not in NIFTI_SUFFIXES + ITK_SUFFIXES + MGH_SUFFIXES and _has_dicom_preamble(path)):
        return "dicom-file"
    if s in NIFTI_SUFFIXES or s in (".hdr", ".img") or path.name.lower().endswith((".hdr.gz", ".img.gz")):
        return "nifti"
    if s in (".mha", ".mhd"):
        return "metaio"
    if s in (".nrrd", ".nhdr"):
        return "nrrd"
    if s in MGH_SUFFIXES:
        return "mgh"
    lower = path.name.lower()
    for suffixes, what, how in _OTHER_FORMATS:
        if lower.endswith(suffixes):
            raise MedILError(f"{path.name} is {what}, which MedIL does not read; convert it to NIfTI ({how}) and give that file")
    raise MedILError(
        f"{path.name}: MedIL reads NIfTI (.nii, .nii.gz), Analyze 7.5 (.hdr/.img), FreeSurfer (.mgh, .mgz), NRRD (.nrrd, .nhdr), "
        "MetaImage (.mha, .mhd) and DICOM (a series folder, or a file); convert the file to one of these (e.g. in Slicer: Save as .nrrd)"
    )


def _declared(path: Path) -> tuple[tuple[int, ...], int]:
    """(shape, bytes per voxel) as a file's header declares them, without reading the voxels; every
    header is parsed and validated here (:mod:`medil_backend.headers`) before a C library sees it."""
    kind = _format(path)
    if kind in ("dicom", "dicom-file"):
        return (), 0  # DICOM: each file is checked as it is read
    if kind == "nifti":
        img = _nifti_image(path)
        shape = tuple(int(n) for n in img.header.get_data_shape())
        itemsize = int(img.header.get_data_dtype().itemsize)
        data = _nifti_data_file(img, path)
        if not str(data).endswith(".gz"):
            offset = int(img.header.get("vox_offset", 352)) if data == path else 0
            need = offset + int(np.prod(shape, dtype=np.float64)) * itemsize
            have = data.stat().st_size
            if have < need:
                raise MedILError(
                    f"{path} is truncated: its header declares {need} bytes of image, the file has {have}; copy the file again"
                )
        return shape, itemsize
    if kind == "metaio":
        from .headers import parse_metaio

        header = parse_metaio(path)
        return header.shape, header.dtype.itemsize
    if kind == "mgh":
        img = _mgh_image(path)
        return tuple(int(n) for n in img.header.get_data_shape()), int(img.header.get_data_dtype().itemsize)
    from .headers import parse_nrrd

    header = parse_nrrd(path)
    shape = header.shape
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape, header.itemsize


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


#: how far (mm, anywhere in the volume) the qform and the sform of one NIfTI header may disagree
#: before MedIL says which one it used
QFORM_SFORM_TOLERANCE_MM = 1e-3
#: which NIfTI transform places a volume whose qform and sform disagree: ``None`` or ``"sform"`` (the NIfTI-1
#: standard's choice, nibabel's) or ``"qform"`` (``--nifti-geometry qform``); set for a run with :func:`nifti_geometry`
NIFTI_GEOMETRY: ContextVar[str | None] = ContextVar("medil_nifti_geometry", default=None)
NIFTI_GEOMETRIES = ("sform", "qform")


@contextlib.contextmanager
def nifti_geometry(choice: str | None):
    """Within the block, NIfTI files whose qform and sform disagree are placed by ``choice`` (``sform``, ``qform``, or None)."""
    if choice not in (None, *NIFTI_GEOMETRIES):
        raise MedILError(f"the NIfTI geometry is sform or qform, not {choice!r}")
    token = NIFTI_GEOMETRY.set(choice)
    try:
        yield
    finally:
        NIFTI_GEOMETRY.reset(token)


def _corner_gap(a: np.ndarray, b: np.ndarray, shape) -> float:
    """The largest distance (mm) between the positions two affines give a volume's corner voxels."""
    corners = np.array(np.meshgrid(*[[0.0, max(float(n) - 1.0, 0.0)] for n in shape], indexing="ij")).reshape(3, -1)
    corners = np.vstack([corners, np.ones(corners.shape[1])])
    return float(np.max(np.linalg.norm((np.asarray(a) - np.asarray(b))[:3] @ corners, axis=0)))


def _itk_nifti_choice(sform: np.ndarray, sform_code: int, pixdim: np.ndarray) -> str:
    """Which of the two transforms ITK (and so Slicer) places a NIfTI file with both by, from the header alone (no C
    parser sees an untrusted header for it): the sform when its code is 1 (scanner) and it is a rotation times the
    pixdims, else the qform (ITK 5.4's NiftiImageIO, checked against SimpleITK in Testing/test_real_files.py)."""
    if sform_code != 1:
        return "qform"
    scales = np.linalg.norm(np.asarray(sform, dtype=np.float64)[:3, :3], axis=0)
    rigid = np.allclose(scales, np.abs(pixdim), rtol=1e-4, atol=1e-6)
    return "sform" if rigid else "qform"


#: NIfTI-1 spatial unit codes (``xyzt_units & 7``) -> millimetres; 0 ("unknown") is read as mm, as every reader does
_NIFTI_UNIT_MM = {0: 1.0, 1: 1000.0, 2: 1.0, 3: 1e-3}
_NIFTI_UNIT_NAME = {1: "metres", 3: "micrometres"}
#: NIfTI-1 transform codes: unknown, scanner, aligned, Talairach, MNI-152, template (NIfTI-1.1)
_NIFTI_XFORM_CODES = (0, 1, 2, 3, 4, 5)


#: ``sizeof_hdr`` of each header nibabel may read a .nii / .hdr file as (NIfTI-1 and Analyze 7.5: 348; NIfTI-2: 540)
_SIZEOF_HDR = {"Nifti2": 540}


def _nifti_image(path: Path):
    """The nibabel image of a .nii / .nii.gz file or a .hdr/.img pair (NIfTI-1, NIfTI-2 or Analyze 7.5), whose
    two files are checked to be regular files side by side (an .img that links out of the folder is refused),
    and whose ``sizeof_hdr`` is the one its format defines (ITK refuses any other; nibabel reads past it)."""
    import nibabel as nib

    from .headers import regular_file_beside

    img = nib.load(str(path))
    if not isinstance(img, (nib.Nifti1Pair, nib.Nifti2Pair, nib.AnalyzeImage)):
        raise MedILError(f"{path} is not a NIfTI or Analyze 7.5 file ({type(img).__name__}); convert it to NIfTI")
    raw = _nifti_raw_header(path, img)
    want = next((v for k, v in _SIZEOF_HDR.items() if type(img).__name__.startswith(k)), 348)
    if int(raw["sizeof_hdr"]) != want:
        raise MedILError(
            f"{path} has sizeof_hdr {int(raw['sizeof_hdr'])} where its format requires {want}: the header is damaged, and ITK-based "
            "tools such as Slicer refuse it; export the volume again"
        )
    for role in ("header", "image"):
        fm = img.file_map.get(role)
        if fm is not None and fm.filename and os.path.abspath(fm.filename) != os.path.abspath(path):
            regular_file_beside(path, os.path.basename(fm.filename), "image file" if role == "image" else "header")
    return img


def _nifti_data_file(img, path: Path) -> Path:
    img_map = img.file_map.get("image")
    return Path(img_map.filename) if img_map is not None and img_map.filename else path


def _nifti_raw_header(path: Path, img):
    """The header as stored (nibabel's loaded header has some fields repaired, e.g. zero pixdims)."""
    from nibabel.openers import ImageOpener

    fm = img.file_map.get("header") or img.file_map.get("image")
    header_file = (fm.filename if fm is not None else None) or str(path)
    with ImageOpener(header_file) as fh:
        return type(img.header).from_fileobj(fh, check=False)


def nifti_affine(img, path: Path) -> np.ndarray:
    """The one geometry rule for every NIfTI file (NIfTI-1 standard, nibabel's documented choice):

    - the sform when ``sform_code > 0``; else the qform when ``qform_code > 0``; else the pixdims
      (ANALYZE-style, method 1 of the standard);
    - the qform and the pixdim method need positive ``pixdim[1..3]`` (the standard's requirement; ITK
      and nibabel read negative ones differently): a negative one is refused;
    - both set and disagreeing by more than :data:`QFORM_SFORM_TOLERANCE_MM` anywhere in the volume:
      the sform is used and a note says so (ITK-based readers may choose the qform);
    - ``xyzt_units`` in metres or micrometres scales the affine to millimetres.
    """
    import nibabel as nib
    from nibabel.spatialimages import HeaderDataError

    hdr = img.header
    if not isinstance(img, (nib.Nifti1Pair, nib.Nifti2Pair)):
        return _analyze_affine(img, path)
    raw = _nifti_raw_header(path, img)
    exact = _exact_affine(hdr)
    sform_code, qform_code = int(raw["sform_code"]), int(raw["qform_code"])
    for name, code in (("sform_code", sform_code), ("qform_code", qform_code)):
        if code not in _NIFTI_XFORM_CODES:  # readers disagree on what an unknown code means (nibabel drops it)
            raise MedILError(f"{path} has {name} {code}, not a NIfTI-1 transform code (0 to 5); fix the header")
    pixdim = np.asarray(raw["pixdim"][1:4], dtype=np.float64)
    log = logging.getLogger("medil")
    choice = NIFTI_GEOMETRY.get()
    if sform_code > 0:
        affine = np.asarray(hdr.get_sform(), dtype=np.float64)
        if exact is not None and np.max(np.abs(exact - affine)) <= EXACT_AFFINE_MATCH_MM:
            affine = exact  # the float64 affine MedIL stored beside the float32 sform it rounds to
        if qform_code > 0:
            try:
                qform = np.asarray(hdr.get_qform(), dtype=np.float64)
            except Exception:  # an invalid qform (nibabel raises several types): the sform alone counts
                qform = None
            shape = hdr.get_data_shape()[:3]
            gap = _corner_gap(affine, qform, shape) if qform is not None else 0.0
            if qform is not None and (not np.isfinite(gap) or gap > QFORM_SFORM_TOLERANCE_MM):
                if choice == "qform":
                    _check_spacing(pixdim, path)
                    log.info(
                        "%s: placed by its NIfTI qform, as asked (--nifti-geometry qform); its sform differs by up to %.3g mm",
                        path.name,
                        gap,
                    )
                    return _in_mm(qform, raw, path)
                if choice is None:
                    itk = _itk_nifti_choice(affine, sform_code, pixdim)
                    seen = (
                        "Slicer and other ITK-based tools place this file by its qform, so there the input and MedIL's output will "
                        "not overlay; pass --nifti-geometry qform to work on the grid Slicer shows"
                        if itk == "qform"
                        else "Slicer (ITK) uses the sform too; tools that use the qform place the volume elsewhere "
                        "(--nifti-geometry qform uses the qform)"
                    )
                    log.warning(
                        "%s: its NIfTI qform and sform disagree by up to %.3g mm; MedIL used the sform (the NIfTI-1 standard); %s",
                        path.name,
                        gap,
                        seen,
                    )
    else:
        _check_spacing(pixdim, path)
        if np.any(pixdim < 0):
            raise MedILError(
                f"{path} has negative voxel spacing in pixdim ({', '.join(f'{p:g}' for p in pixdim)}) and no sform: the NIfTI-1 "
                "standard requires positive pixdims here and readers disagree on what a negative one means; fix the header "
                "(store the flip in the qform's qfac, or set an sform)"
            )
        try:
            affine = np.asarray(hdr.get_qform() if qform_code > 0 else hdr.get_base_affine(), dtype=np.float64)
        except (HeaderDataError, ValueError, ArithmeticError) as exc:
            raise MedILError(f"{path} has an invalid qform ({str(exc)[:120]}); fix the header") from None
    return _in_mm(affine, raw, path)


def _in_mm(affine: np.ndarray, raw, path: Path) -> np.ndarray:
    """A NIfTI affine scaled to millimetres by the header's ``xyzt_units``."""
    log = logging.getLogger("medil")
    units = int(raw["xyzt_units"]) & 0x07
    if units not in _NIFTI_UNIT_MM:
        raise MedILError(f"{path} declares spatial unit code {units} in xyzt_units, not one of the NIfTI-1 units; fix the header")
    if _NIFTI_UNIT_MM[units] != 1.0:
        affine = affine.copy()
        affine[:3, :] *= _NIFTI_UNIT_MM[units]
        log.info("%s: its header gives lengths in %s; converted to millimetres", path.name, _NIFTI_UNIT_NAME[units])
    return affine


def _analyze_affine(img, path: Path) -> np.ndarray:
    """An Analyze 7.5 pair's affine as nibabel (and SPM) read it: the voxel sizes, the SPM origin field where it is set
    (else the centre), an SPM ``.mat`` beside the header where there is one, and the first axis stored right to left
    (radiological), the Analyze convention. The format itself has no orientation: a note says so."""
    _check_spacing(np.asarray(img.header.get_zooms()[:3], dtype=np.float64), path)
    affine = np.asarray(img.affine, dtype=np.float64)
    logging.getLogger("medil").warning(
        "%s is an Analyze 7.5 file, which stores no orientation: read as nibabel and SPM read it (first axis right to left%s); "
        "check left and right against a landmark, or convert the file to NIfTI with its true orientation",
        path.name,
        ", with the SPM .mat beside it" if Path(path).with_suffix(".mat").is_file() else "",
    )
    return affine


def _mgh_image(path: Path):
    """The nibabel image of a FreeSurfer .mgh / .mgz file (its header is parsed by nibabel in Python)."""
    import nibabel as nib

    img = nib.MGHImage.from_filename(str(path))
    shape = tuple(int(n) for n in img.header.get_data_shape())
    if path.name.lower().endswith(".mgh"):
        need = 284 + int(np.prod(shape, dtype=np.float64)) * int(img.header.get_data_dtype().itemsize)
        have = path.stat().st_size
        if have < need:
            raise MedILError(f"{path} is truncated: its header declares {need} bytes, the file has {have}; copy the file again")
    return img


def _read_mgh(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A FreeSurfer volume and its vox2ras (RAS, mm), as nibabel and Slicer read it."""
    img = _mgh_image(path)
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=np.float64)
    _check_spacing(zooms, path)
    return np.asanyarray(img.dataobj), np.asarray(img.affine, dtype=np.float64)


#: the float64 affine MedIL keeps in a NIfTI-1 header extension is used only while the file's sform is
#: still its float32 rounding (a tool that edited the sform makes the extension stale: then the sform counts)
EXACT_AFFINE_MATCH_MM = 1e-4
_EXACT_KEY = "MedIL.affine_ras"
_ECODE_COMMENT = 6


def _exact_affine(hdr) -> np.ndarray | None:
    import json

    for ext in getattr(hdr, "extensions", []) or []:
        try:
            if ext.get_code() != _ECODE_COMMENT:
                continue
            content = ext.get_content()
            text = content.decode("utf-8", "replace") if isinstance(content, bytes) else str(content)
            if _EXACT_KEY not in text[:40]:
                continue
            value = np.asarray(json.loads(text.rstrip("\x00"))[_EXACT_KEY], dtype=np.float64)
        except Exception:
            continue
        if value.shape == (4, 4) and np.all(np.isfinite(value)):
            return value
    return None


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = _nifti_image(path)
    affine = nifti_affine(img, path)
    array = np.asanyarray(img.dataobj)
    return array, affine


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
    if path.is_dir() or _format(path) == "dicom-file":
        return read_volume(path, name=name).grid
    try:
        shape, _ = _declared(path)
        kind = _format(path)
        if kind == "nifti":
            affine = nifti_affine(_nifti_image(path), path)
        elif kind == "metaio":
            from .headers import parse_metaio

            affine = parse_metaio(path).affine
        elif kind == "mgh":
            affine = np.asarray(_mgh_image(path).affine, dtype=np.float64)
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
    series = _gdcm_series_ids(path)
    if not series:
        raise MedILError(f"{path} is a folder with no DICOM series; point at a DICOM series folder or a volume file")
    if len(series) > 1:
        raise MedILError(f"{path} holds {len(series)} DICOM series; put each series in its own folder")
    files = list(reader.GetGDCMSeriesFileNames(str(path), series[0]))
    _check_folder_members(path, files)
    return _checked_series(path, files)


def _gdcm_series_ids(folder: Path) -> tuple[str, ...]:
    """GDCM's series of a folder, or a message naming the file GDCM cannot parse (instead of GDCM's internal text)."""
    sitk = _sitk()
    try:
        return tuple(sitk.ImageSeriesReader().GetGDCMSeriesIDs(str(folder)))
    except RuntimeError as exc:
        bad = []
        info = sitk.ImageFileReader()
        for e in sorted(os.scandir(folder), key=lambda e: e.name):
            if not e.is_file() or e.name.startswith("."):
                continue
            info.SetFileName(e.path)
            try:
                info.ReadImageInformation()
            except RuntimeError:
                bad.append(e.name)
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        cause = (
            f"{shown} cannot be parsed as DICOM images (damaged, or a DICOM object that is not an image)"
            if bad
            else (f"GDCM cannot sort its files into series ({library_message(exc)[:80]})")
        )
        raise MedILError(f"{folder}: {cause}; move such files out of the folder, or give one DICOM file of the series") from None


def _check_folder_members(path: Path, files: list[str]) -> None:
    """Every file of a series folder is a slice of its series."""
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


def _checked_series(path: Path, files: list[str]) -> list[str]:
    """``files`` of one series (in folder ``path``), checked to lie on one evenly spaced grid of single-frame slices."""
    sitk = _sitk()
    if len(files) > 1:
        tags = _dicom_tags(Path(files[0]))
        if "MOSAIC" in tags.get("0008|0008", "").upper():
            raise MedILError(
                f"{path}: its {len(files)} files are Siemens mosaics, each a whole volume (one time point or direction of an fMRI or "
                "diffusion series), not the slices of one; give one of the files"
            )
    if len(files) < 2:
        return files
    positions, first = [], None
    info = sitk.ImageFileReader()
    for f in files:
        info.SetFileName(f)
        try:
            info.ReadImageInformation()
        except RuntimeError:
            raise MedILError(f"{path}: the slice {os.path.basename(f)} cannot be read; restore it from the source") from None
        frames = info.GetMetaData("0028|0008").strip() if info.HasMetaDataKey("0028|0008") else "1"
        if frames not in ("", "1"):
            raise MedILError(
                f"{path}: {os.path.basename(f)} is a multi-frame DICOM file (a whole volume, {frames} frames) beside {len(files) - 1} "
                "other file(s) of its series; give the multi-frame file itself, or move it to its own folder"
            )
        direction = np.array(info.GetDirection(), dtype=np.float64).reshape(3, 3)
        spacing = np.array(info.GetSpacing(), dtype=np.float64)[:2]
        size = tuple(info.GetSize())[:2]
        if first is None:
            first = (direction, spacing, size, os.path.basename(f))
        else:  # one grid for the series: the same orientation, pixel spacing and matrix in every slice
            d0, s0, n0, name0 = first
            what = None
            if np.max(np.abs(direction[:, :2] - d0[:, :2])) > 1e-4:
                what = "orientation (ImageOrientationPatient)"
            elif np.max(np.abs(spacing - s0)) > 1e-4 * max(1.0, float(np.max(s0))):
                what = f"pixel spacing ({spacing[0]:.4g} x {spacing[1]:.4g} mm, not {s0[0]:.4g} x {s0[1]:.4g})"
            elif size != n0:
                what = f"matrix size ({size[0]} x {size[1]}, not {n0[0]} x {n0[1]})"
            if what:
                raise MedILError(
                    f"{path}: the slice {os.path.basename(f)} has another {what} than {name0}: the folder mixes acquisitions; "
                    "put the slices of one acquisition in their own folder"
                )
        positions.append(np.array(info.GetOrigin(), dtype=np.float64)[:3])
    direction, spacing, _, _ = first
    row, col = direction[:, 0], direction[:, 1]
    normal = np.cross(row, col)
    pos = np.asarray(positions)
    along = pos @ normal
    order = np.argsort(along)
    pos, along = pos[order], along[order]
    # gantry tilt: slice positions that move within the slice plane (sheared stack); a grid built from the
    # first slice's orientation would misplace every later slice
    inplane = (pos - pos[0]) - np.outer(along - along[0], normal)
    drift = float(np.max(np.linalg.norm(inplane, axis=1)))
    if drift > max(0.01, 0.05 * float(np.min(spacing))):
        total = float(along[-1] - along[0])
        tilt = float(np.degrees(np.arctan2(drift, abs(total)))) if total else 90.0
        raise MedILError(
            f"{path}: the slices are sheared (gantry tilt of about {tilt:.1f} degrees: their positions move {drift:.1f} mm within "
            "the slice plane across the series), so they do not lie on one grid; MedIL does not de-shear: load the series in "
            "Slicer's DICOM module (which applies the acquisition transform) or convert it with dcm2niix, then use that volume"
        )
    gaps = np.diff(along)
    same = np.flatnonzero(np.abs(gaps) < 1e-6)
    if same.size:
        a, b = (os.path.basename(files[order[same[0]]]), os.path.basename(files[order[same[0] + 1]]))
        raise MedILError(
            f"{path}: {a} and {b} lie at the same position: the folder holds one slice twice (a copy, or a second acquisition of the "
            "same place); keep one acquisition per folder"
        )
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


def _dicom_tags(path: Path) -> dict[str, str]:
    """A DICOM file's header tags as GDCM reads them (``"gggg|eeee"`` keys), or a message naming the file."""
    info = _sitk().ImageFileReader()
    info.SetFileName(str(path))
    try:
        info.ReadImageInformation()
    except RuntimeError:
        raise MedILError(_not_an_image(path)) from None
    return {k: info.GetMetaData(k).strip() for k in info.GetMetaDataKeys()}


def _not_an_image(path: Path) -> str:
    """Why GDCM reads no image from a DICOM file, by name: the object's kind (its SOP class, read by pydicom), or damage."""
    try:
        import pydicom

        ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=True)  # force: old files have no preamble
        kind = getattr(getattr(ds, "SOPClassUID", None), "name", None)
        has_pixels = (0x0028, 0x0010) in ds  # Rows: an image's pixel description
    except Exception:
        kind, has_pixels = None, False
    if kind is None and not has_pixels:
        return f"{path.name} cannot be read as a DICOM image: it is damaged, truncated or not DICOM; restore it from the source"
    if not has_pixels:
        return f"{path.name} is a DICOM {kind} object, not an image; give the image series it refers to"
    return f"{path.name} is a DICOM {kind} image that GDCM cannot decode (its encoding or header is damaged); convert it with dcm2niix"


def _frames(path: Path) -> int:
    try:
        return max(1, int(float(_dicom_tags(path).get("0028|0008", "1") or 1)))
    except ValueError:
        return 1


def _dicom_file_series(path: Path, meta: dict | None) -> list[str] | None:
    """The files to read for one DICOM file: itself if it holds a volume (multi-frame), its whole series if it is one slice
    of one (found in its folder, with a note), ``None`` for a Siemens mosaic (unpacked by :func:`_read_mosaic`)."""
    tags = _dicom_tags(path)
    if "MOSAIC" in tags.get("0008|0008", "").upper():
        return None
    frames = _frames(path)
    if frames > 1:
        if meta is not None:
            meta["read_as"] = f"one multi-frame DICOM file ({frames} frames)"
        return [str(path)]
    folder = path.parent if str(path.parent) else Path(".")
    reader = _sitk().ImageSeriesReader()
    files = None
    for sid in _gdcm_series_ids(folder):
        names = list(reader.GetGDCMSeriesFileNames(str(folder), sid))
        if os.path.realpath(path) in {os.path.realpath(f) for f in names}:
            files = names
            break
    if not files or len(files) < 2:
        raise MedILError(
            f"{path.name} is a single DICOM slice (a 2D image), and its folder holds no other slice of its series; give the folder "
            "of the whole series (or a multi-frame file)"
        )
    files = _checked_series(folder, files)
    note = f"one slice of a series: read its whole series, {len(files)} slices in {folder}"
    logging.getLogger("medil").warning("%s is %s", path.name, note)
    if meta is not None:
        meta["read_as"] = note
    return files


def _read_mosaic(path: Path, meta: dict | None) -> tuple[np.ndarray, np.ndarray]:
    """A Siemens mosaic (the slices of one volume tiled in one image) unpacked into its volume, as nibabel's ``nicom`` does."""
    try:
        import warnings

        import pydicom
        from nibabel.nicom.dicomreaders import mosaic_to_nii
    except ImportError:
        raise MedILError(f"{path.name} is a Siemens mosaic; unpacking it needs pydicom: pip install pydicom") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nibabel calls its DICOM readers experimental
        try:
            img = mosaic_to_nii(pydicom.dcmread(str(path)))
        except Exception as exc:
            raise MedILError(
                f"{path.name} is a Siemens mosaic that cannot be unpacked ({library_message(exc)[:100]}); convert it with dcm2niix"
            ) from None
    if meta is not None:
        meta["read_as"] = f"a Siemens mosaic unpacked into {img.shape[2]} slices"
        meta["dicom_modality"] = "MR"
    logging.getLogger("medil").warning("%s is a Siemens mosaic: unpacked into its %d slices", path.name, img.shape[2])
    return np.asanyarray(img.dataobj), np.asarray(img.affine, dtype=np.float64)


def _dicom_modality(files: list[str]) -> str | None:
    """The DICOM Modality tag (0008,0060) of a series' first slice, if it has one."""
    info = _sitk().ImageFileReader()
    info.SetFileName(files[0])
    try:
        info.ReadImageInformation()
        return info.GetMetaData("0008|0060").strip() if info.HasMetaDataKey("0008|0060") else None
    except RuntimeError:
        return None


def _read_itk(path: Path, meta: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A DICOM series folder or a validated NRRD file through SimpleITK; MetaImage files through
    MedIL's own reader (:func:`medil_backend.headers.read_metaio`). ``meta`` receives the DICOM
    Modality tag (``dicom_modality``)."""
    sitk = _sitk()

    if path.is_dir() or _format(path) == "dicom-file":
        if path.is_dir():
            files = _dicom_series(path)
            if len(files) == 1 and "MOSAIC" in _dicom_tags(Path(files[0])).get("0008|0008", "").upper():
                return _read_mosaic(Path(files[0]), meta)
        else:
            files = _dicom_file_series(path, meta)
            if files is None:
                return _read_mosaic(path, meta)
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        image = reader.Execute()
        if meta is not None:
            meta["dicom_modality"] = _dicom_modality(files)
    elif _format(path) == "metaio":
        from .headers import parse_metaio, read_metaio

        header = parse_metaio(path)
        return read_metaio(header), header.affine
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
    """Read a 3D volume (NIfTI, Analyze 7.5, FreeSurfer MGH/MGZ, NRRD, MHA/MHD, DICOM) with its world RAS geometry.

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
        extra: dict = {}
        kind = _format(path)
        if kind == "nifti":
            array, affine = _read_nifti(path)
        elif kind == "mgh":
            array, affine = _read_mgh(path)
        else:
            array, affine = _read_itk(path, extra)
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
    volume = checked_volume(np.asarray(array), affine, name, modality)
    for key in ("dicom_modality", "read_as"):
        if extra.get(key):
            volume.meta[key] = extra[key]
    return volume


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
    meta: dict = {}
    if array.dtype.kind == "f":
        with np.errstate(all="ignore"):
            finite = np.isfinite(array)
            if not finite.all():
                array, meta["non_finite_voxels"] = _non_finite_as_background(array, finite, name)
            peak = float(np.max(np.abs(array))) if array.size else 0.0
        if peak > MAX_ABS_VALUE:
            raise MedILError(
                f"{name} has voxel values up to {peak:.3g}, beyond {MAX_ABS_VALUE:g}: no scan measures that; rescale the "
                "image (e.g. to its physical units) and try again"
            )
    return Volume(array, grid.affine, modality=modality, meta={"path": name, "dtype": str(array.dtype), **meta})


def _non_finite_as_background(array: np.ndarray, finite: np.ndarray, name: str) -> tuple[np.ndarray, int]:
    """NaN and infinite voxels set to the volume's background (0, or its lowest value where that is negative), with a note.

    SPM, FSL and AFNI write NaN outside the field of view of a resampled volume, as a matter of course."""
    bad = int(np.count_nonzero(~finite))
    if bad == array.size:
        raise MedILError(f"{name} has no finite voxel (every voxel is NaN or infinite); check that the right file was given")
    background = min(0.0, float(np.min(array[finite])))  # no signal (0), or the floor of a signed image (air in a CT)
    array = np.where(finite, array, np.asarray(background, dtype=array.dtype))
    logging.getLogger("medil").warning(
        "%s: %d voxel(s) (%.1f %%) are NaN or infinite (outside the field of view of a resampled volume, as SPM and FSL write it); "
        "read as background (%g)",
        os.path.basename(name.rstrip("/")) or name,
        bad,
        100.0 * bad / array.size,
        background,
    )
    return array, bad


def _check_target(path: Path, overwrite: bool, what: str) -> Path:
    """A file about to be written: its folder exists and is writable, it is not a folder, and it is free
    (or ``overwrite``)."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise MedILError(f"the folder of {path} does not exist; create it first")
    if path.is_dir():
        raise MedILError(f"{path} is a folder; give {what} file name")
    check_output_path_free(path, overwrite)
    if not os.access(parent, os.W_OK):
        raise MedILError(f"the output folder {parent} is not writable; choose another place")
    return path


def check_output_path(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Fail early, before any computation, if ``path`` cannot be written."""
    path = Path(path)
    if _suffix(path) not in WRITE_SUFFIXES:
        raise MedILError(f"cannot write {path.name}: use a file name ending in {', '.join(WRITE_SUFFIXES)}")
    return _check_target(path, overwrite, "an output")


def cast_for_output(array: np.ndarray, dtype: str | np.dtype | None) -> np.ndarray:
    """float32 by default; an integer dtype is rounded and clipped to its range (in float64, so the
    top of int32/uint32 does not overflow and wrap as it did through float32)."""
    dtype = np.dtype(np.float32 if dtype is None else dtype)
    if dtype.kind == "b":
        return np.asarray(array) > 0.5
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        out = np.rint(np.asarray(array, dtype=np.float64))
        low, high = float(info.min), float(info.max)
        if int(high) > info.max:  # 2**63-1 and 2**64-1 are not float64 numbers: the largest one below
            high = float(np.nextafter(high, 0.0))
        return np.clip(out, low, high).astype(dtype)
    return np.asarray(array).astype(dtype)


#: NIfTI-1 stores each axis length as a 16-bit integer; only a larger volume is written as NIfTI-2
NIFTI1_MAX_AXIS = 32767


def _write_nifti(array: np.ndarray, affine: np.ndarray, path: str, provenance: dict | None = None) -> None:
    """NIfTI-1, which every viewer opens (SimpleITK/ITK, and so Slicer, cannot read NIfTI-2), unless an
    axis is longer than NIfTI-1 can store. Its sform is float32: each affine entry is kept to half a
    float32 step (at most 7.7e-6 mm for coordinates within 256 mm of the world origin, 1.6e-5 mm
    within 512 mm, 3.1e-5 mm within 1024 mm) for every other reader; the float64 affine is kept in a
    header extension, so MedIL reads its own files back exactly. NRRD and MHA keep float64 for all."""
    import json

    import nibabel as nib

    fits = max(array.shape) <= NIFTI1_MAX_AXIS
    img = (nib.Nifti1Image if fits else nib.Nifti2Image)(array, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    if np.any(affine.astype(np.float32).astype(np.float64) != affine):  # MedIL reads its float64 affine back exactly
        text = json.dumps({_EXACT_KEY: affine.tolist()})
        img.header.extensions.append(nib.nifti1.Nifti1Extension(_ECODE_COMMENT, text.encode("utf-8")))
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
    the whole record; the image and its sidecar are committed together or not at all
    (:class:`OutputSet`).
    """
    with OutputSet(overwrite) as out:
        out.declare(path, sidecar=provenance is not None)
        out.stage(volume, path, dtype=dtype, provenance=provenance)
    return out.written[0]


_PART = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.(?P<kind>part|bak)")
_OLD_PART = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.part")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def remove_stale_parts(folder: Path, names: set[str] | None = None) -> list[str]:
    """Remove the temporary files a killed MedIL run left in ``folder`` (``.NAME.PID.XXXX.part*`` of a
    process that no longer runs; older ``.NAME.XXXX.part*`` ones for the ``names`` about to be
    written). A stale ``.bak`` (a run killed while replacing files) is put back if its file is
    missing, else removed."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        m = _PART.match(e.name)
        stale = m is not None and not _pid_alive(int(m.group("pid")))
        if m is None:
            old = _OLD_PART.match(e.name)
            stale = old is not None and names is not None and old.group("name") in names
        if not stale or not e.is_file(follow_symlinks=False):
            continue
        try:
            if m is not None and m.group("kind") == "bak" and not os.path.lexists(folder / m.group("name")):
                os.replace(e.path, folder / m.group("name"))
            else:
                os.unlink(e.path)
            removed.append(e.name)
        except OSError:
            pass
    return removed


def _file_sha256(path: str | os.PathLike) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class OutputSet:
    """Every file of one result (images, their JSON sidecars, an uncertainty map, a ``--n`` series),
    all checked before any work and committed together or not at all.

    ``declare`` each output first (before computing: names, folders, clashes and existing files are
    checked then); ``stage`` writes an image and its sidecar to hidden temporary files beside their
    targets as soon as it is computed; leaving the ``with`` block normally commits every staged file
    (each replaced file is kept aside until all are in place, and put back if any rename fails);
    leaving it by an exception, Ctrl-C or a termination signal removes every temporary file and
    changes nothing.
    """

    def __init__(self, overwrite: bool = False) -> None:
        self.overwrite = overwrite
        self._declared: dict[Path, Path | None] = {}  # image -> its sidecar
        self._owner: dict[str, Path] = {}  # every target (resolved) -> the image it belongs to
        self._staged: list[tuple[str, Path]] = []  # (temporary file, target)
        self.written: list[Path] = []

    def __enter__(self) -> OutputSet:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.commit()
        else:
            self.abort()
        return False

    def _claim(self, target: Path, image: Path) -> None:
        key = os.path.realpath(target)
        if key in self._owner:
            other = self._owner[key]
            what = "the same file" if other == image == target else f"the file {target.name}"
            raise MedILError(f"{image} and {other} would both write {what}; give the outputs names that differ before the extension")
        self._owner[key] = image

    def declare(self, path: str | os.PathLike, *, sidecar: bool = True) -> Path:
        """Check an output name (and its sidecar's) before any work; returns the path."""
        path = check_output_path(path, overwrite=self.overwrite)
        side = sidecar_path(path) if sidecar else None
        self._claim(path, path)
        if side is not None:
            if os.path.isdir(side):
                raise MedILError(f"{side} (the output's JSON sidecar) is a folder; move it away or choose another output name")
            check_output_path_free(side, self.overwrite)
            self._claim(side, path)
        self._declared[path] = side
        return path

    def stage(
        self, volume: Volume, path: str | os.PathLike, *, dtype: str | np.dtype | None = None, provenance: dict | None = None
    ) -> Path:
        """Write one declared image (and its sidecar, with ``provenance``) to temporary files."""
        path = Path(path)
        if path not in self._declared:
            path = self.declare(path, sidecar=provenance is not None)
        if len(self._staged) == 0:
            remove_stale_parts(
                path.parent if str(path.parent) else Path("."),
                {p.name for p in self._declared} | {s.name for s in self._declared.values() if s is not None},
            )
        array = cast_for_output(np.asarray(volume.array), dtype)
        suffix = _suffix(path)
        folder = path.parent if str(path.parent) else Path(".")
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=f".part{suffix}", dir=folder)
            os.close(fd)
            self._staged.append((tmp, path))
            if suffix in NIFTI_SUFFIXES:
                _write_nifti(array, volume.affine, tmp, provenance)
            else:
                _write_itk(array, volume.affine, tmp, provenance)
            os.chmod(tmp, _output_mode(path))
            side = self._declared.get(path)
            if provenance is not None and side is not None:
                import json

                fd, side_tmp = tempfile.mkstemp(prefix=f".{side.name}.{os.getpid()}.", suffix=".part", dir=folder)
                self._staged.append((side_tmp, side))
                # the image's own checksum: a sidecar vouches for exactly this file (a resumed batch redoes any other)
                written = {"file_sha256": _file_sha256(tmp), "file_bytes": os.path.getsize(tmp)}
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    json.dump(
                        {"AIGenerated": True, "note": provenance_line(provenance), **provenance, **written},
                        fh,
                        indent=2,
                        sort_keys=True,
                        default=str,
                    )
                os.chmod(side_tmp, _output_mode(side))
        except BaseException as exc:
            self.abort()
            if isinstance(exc, (MedILError, KeyboardInterrupt)):
                raise
            raise MedILError(f"could not write {path} ({library_message(exc)}); check free disk space and permissions") from None
        return path

    def commit(self) -> list[Path]:
        """Put every staged file in place, or none of them."""
        for _, target in self._staged:  # a file may have appeared while we computed
            check_output_path_free(target, self.overwrite)
            if os.path.isdir(target):
                self.abort()
                raise MedILError(f"{target} is now a folder; no output was written: move it away and run again")
        backups: list[tuple[str, Path]] = []
        done: list[Path] = []
        try:
            for tmp, target in self._staged:
                if os.path.lexists(target):
                    fd, bak = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".bak", dir=target.parent)
                    os.close(fd)
                    os.replace(target, bak)
                    backups.append((bak, target))
                os.replace(tmp, target)
                done.append(target)
        except BaseException as exc:
            for target in done:
                with contextlib.suppress(OSError):
                    os.unlink(target)
            for bak, target in backups:
                with contextlib.suppress(OSError):
                    os.replace(bak, target)
            self.abort()
            if isinstance(exc, (MedILError, KeyboardInterrupt)):
                raise
            raise MedILError(
                f"could not write {target} ({library_message(exc)}); nothing was changed: check free disk space and permissions"
            ) from None
        for bak, _ in backups:
            with contextlib.suppress(OSError):
                os.unlink(bak)
        self.written = [t for _, t in self._staged if t in self._declared]
        self._staged = []
        return self.written

    def abort(self) -> None:
        """Remove every temporary file; nothing that existed is changed."""
        for tmp, _ in self._staged:
            with contextlib.suppress(OSError):
                if os.path.lexists(tmp):
                    os.unlink(tmp)
        self._staged = []


def check_report_path(path: str | os.PathLike | None, overwrite: bool = False) -> Path | None:
    """A report file (JSON, Markdown, HTML) checked before any work, as an output is (:func:`_check_target`)."""
    return _check_target(Path(path), overwrite, "a report") if path else None


def write_bytes_atomic(path: str | os.PathLike, data: bytes, overwrite: bool = False) -> Path:
    """Write a report or picture beside its target and rename it into place (never half-written; an
    existing file is replaced only with ``overwrite``)."""
    path = check_report_path(path, overwrite)
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".part", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, _output_mode(path))
        check_output_path_free(path, overwrite)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str, overwrite: bool = False) -> Path:
    """:func:`write_bytes_atomic` for text (UTF-8)."""
    return write_bytes_atomic(path, text.encode("utf-8"), overwrite)


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
