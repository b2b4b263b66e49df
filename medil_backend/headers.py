"""Untrusted MetaImage (MHA/MHD) and NRRD headers, parsed here before any C parser sees them.

MetaImage files are read here entirely (header and voxels, raw or zlib-compressed): ITK's MetaIO
crashed on hostile headers (``NDims = -3``, printf patterns in ``ElementDataFile``) and returned
uninitialised memory for a wrong ``CompressedDataSize``. NRRD headers are parsed and every field
validated here, and every data file they name is resolved; only a header that passed reaches
ITK's NRRD reader. Both parsers read the *whole* header the way the libraries do (``=`` or ``:``
separators in MetaIO, ``field: value`` in NRRD), so a check cannot be bypassed by padding,
spacing or decoy lines: a field spelled two ways, or given twice, is refused.
"""

from __future__ import annotations

import os
import stat
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import MedILError

#: a header longer than this is refused (real headers are a few hundred bytes)
MAX_HEADER_BYTES = 1 << 20
#: the longest header line MedIL reads (ITK's MetaIO cannot read longer ones: readers would disagree)
MAX_LINE_BYTES = 8192
#: the most voxels along one axis (as for output grids)
MAX_AXIS = 10**6

_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def regular_file_beside(header: Path, name: str, what: str = "voxel data") -> Path:
    """The data file ``name`` that ``header`` names, checked to be a regular file in the header's own
    folder after every symbolic link is resolved (a header from elsewhere must not make the tool read,
    and hand back, other files of this machine; a pipe or device would hang it)."""
    folder = os.path.realpath(header.parent)
    if not name or "\x00" in name or os.path.isabs(name) or "%" in name:
        raise MedILError(
            f"{header} names its {what} {name!r}, outside the header's folder or as a pattern: MedIL reads data files named "
            "plainly (no folder, no printf-style pattern) from beside their header; move the data file next to it and name it "
            "without a folder"
        )
    target = os.path.realpath(os.path.join(folder, name))
    if os.path.commonpath([folder, target]) != folder or os.path.dirname(target) != folder:
        raise MedILError(
            f"{header} names its {what} {name!r}, which resolves outside the header's folder; MedIL reads data files only "
            "from beside their header: copy the data file next to it (not a link to elsewhere)"
        )
    try:
        st = os.stat(target)
    except OSError:
        raise MedILError(f"{header} names its {what} {name!r}, which does not exist beside it; copy the data file next to it") from None
    if not stat.S_ISREG(st.st_mode):
        raise MedILError(
            f"{header} names its {what} {name!r}, which is not a regular file (a pipe, device or folder); save the data to a file"
        )
    return Path(target)


def _head(path: Path) -> bytes:
    """The first MAX_HEADER_BYTES + 1 bytes of a header file (one more than a header may have)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(MAX_HEADER_BYTES + 1)
    except OSError as exc:
        raise MedILError(f"cannot read {path} ({exc.strerror}); check its permissions") from None


def _number_list(value: str, n: int, key: str, path: Path, *, integer: bool = False) -> list[float]:
    parts = value.replace(",", " ").split()
    if len(parts) != n:
        raise MedILError(f"cannot read {path}: header field {key} has {len(parts)} values, the image has {n} dimensions; fix the header")
    out = []
    for p in parts:
        try:
            v = int(p) if integer else float(p)
        except ValueError:
            kind = "whole numbers" if integer else "numbers"
            raise MedILError(
                f"cannot read {path}: header field {key} must hold {kind}, got {value.strip()[:60]!r}; fix the header"
            ) from None
        if not integer and not np.isfinite(v):
            raise MedILError(f"cannot read {path}: header field {key} holds a non-finite value ({p}); fix the header")
        out.append(v)
    return out


def _whole(value: str, key: str, path: Path, low: int, high: int) -> int:
    try:
        v = int(value.strip())
    except ValueError:
        raise MedILError(f"cannot read {path}: header field {key} = {value.strip()[:40]!r} is not a whole number; fix the header") from None
    if not low <= v <= high:
        raise MedILError(f"cannot read {path}: header field {key} = {v} is outside {low}..{high}; fix the header")
    return v


def _boolean(value: str, key: str, path: Path) -> bool:
    v = value.strip().lower()
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no"):
        return False
    raise MedILError(f"cannot read {path}: header field {key} = {value.strip()[:40]!r} is not True or False; fix the header")


def _check_sizes(sizes: list[int], path: Path) -> None:
    for s in sizes:
        if not 1 <= s <= MAX_AXIS:
            raise MedILError(f"cannot read {path}: the header declares {s} voxels along an axis (1..{MAX_AXIS} allowed); fix the header")


# -- MetaImage (.mha / .mhd) ------------------------------------------------------------------------

_MET_TYPES = {
    "MET_CHAR": np.int8,
    "MET_UCHAR": np.uint8,
    "MET_SHORT": np.int16,
    "MET_USHORT": np.uint16,
    "MET_INT": np.int32,
    "MET_UINT": np.uint32,
    "MET_LONG": np.int32,  # MetaIO's MET_LONG is 4 bytes
    "MET_ULONG": np.uint32,
    "MET_LONG_LONG": np.int64,
    "MET_ULONG_LONG": np.uint64,
    "MET_FLOAT": np.float32,
    "MET_DOUBLE": np.float64,
}

#: MetaIO's field names (case-sensitive, as MetaIO matches them), with the aliases it accepts
_MET_FIELDS = {
    "Comment", "ObjectType", "ObjectSubType", "TransformType", "NDims", "Name", "ID", "ParentID", "CompressedData",
    "CompressedDataSize", "BinaryData", "BinaryDataByteOrderMSB", "ElementByteOrderMSB", "Color", "Position", "Origin",
    "Offset", "Orientation", "Rotation", "TransformMatrix", "CenterOfRotation", "AnatomicalOrientation", "ElementSpacing",
    "DimSize", "HeaderSize", "HeaderSizesPerSlice", "Modality", "SequenceID", "ElementMin", "ElementMax",
    "ElementNumberOfChannels", "ElementSize", "ElementType", "ElementDataFile", "AcquisitionDate", "Acquisition Date",
}  # fmt: skip
_MET_ALIASES = {"Origin": "Offset", "Position": "Offset", "Orientation": "TransformMatrix", "Rotation": "TransformMatrix",
                "ElementByteOrderMSB": "BinaryDataByteOrderMSB"}  # fmt: skip
_MET_LOWER = {k.lower().replace(" ", ""): k for k in _MET_FIELDS}


@dataclass
class MetaHeader:
    path: Path
    shape: tuple[int, ...]
    dtype: np.dtype
    affine: np.ndarray  # RAS
    data_file: Path
    data_offset: int  # bytes before the voxels in data_file (-1: at the end of the file)
    compressed: bool
    compressed_size: int | None
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def parse_metaio(path: Path) -> MetaHeader:
    """Parse and validate a MetaImage header (every field MedIL uses, the whole header)."""
    head = _head(path)
    fields: dict[str, str] = {}
    pos, end_of_header = 0, None
    while pos < len(head):
        nl = head.find(b"\n", pos)
        line_end = len(head) if nl < 0 else nl + 1
        line = head[pos:line_end].decode("latin-1").rstrip("\r\n")
        pos = line_end
        if len(line) > MAX_LINE_BYTES:
            raise MedILError(f"cannot read {path}: a header line is longer than {MAX_LINE_BYTES} bytes; this is not a MetaImage header")
        if not line.strip():
            continue
        cuts = [i for i in (line.find("="), line.find(":")) if i >= 0]
        if not cuts:
            raise MedILError(
                f"cannot read {path}: header line {line.strip()[:60]!r} is not 'Field = value'; this is not a MetaImage header"
            )
        cut = min(cuts)
        key, value = line[:cut].strip(), line[cut + 1 :].strip()
        known = _MET_LOWER.get(key.lower().replace(" ", ""))
        if known is not None and known != key:
            raise MedILError(
                f"cannot read {path}: header field {key!r} is spelled unlike MetaIO's {known!r} (readers disagree on such lines); fix the header"
            )
        canon = _MET_ALIASES.get(key, key)
        if canon in fields:
            raise MedILError(f"cannot read {path}: header field {canon} is given twice (readers disagree on which counts); fix the header")
        fields[canon] = value
        if key == "ElementDataFile":
            end_of_header = pos if nl >= 0 else len(head)
            break
    if end_of_header is None:
        if len(head) > MAX_HEADER_BYTES:
            raise MedILError(
                f"cannot read {path}: no ElementDataFile line in the first {MAX_HEADER_BYTES} bytes; this is not a MetaImage header"
            )
        raise MedILError(f"cannot read {path}: the header has no ElementDataFile line; the file is truncated or not a MetaImage file")
    if fields.get("ObjectType", "Image").strip() != "Image":
        raise MedILError(f"cannot read {path}: ObjectType is {fields['ObjectType'][:40]!r}, not Image; MedIL reads image volumes")
    if "NDims" not in fields or "DimSize" not in fields or "ElementType" not in fields:
        raise MedILError(f"cannot read {path}: the header lacks NDims, DimSize or ElementType; fix the header")
    ndims = _whole(fields["NDims"], "NDims", path, 1, 16)
    sizes = [int(v) for v in _number_list(fields["DimSize"], ndims, "DimSize", path, integer=True)]
    _check_sizes(sizes, path)
    etype = fields["ElementType"].strip()
    if etype not in _MET_TYPES:
        raise MedILError(
            f"cannot read {path}: ElementType {etype[:40]!r} is not a MetaIO scalar type ({', '.join(_MET_TYPES)}); fix the header"
        )
    channels = _whole(fields.get("ElementNumberOfChannels", "1"), "ElementNumberOfChannels", path, 1, 1 << 16)
    if channels != 1:
        raise MedILError(f"the image has {channels} components per voxel (colour or vector); MedIL needs a scalar volume")
    if not _boolean(fields.get("BinaryData", "True"), "BinaryData", path):
        raise MedILError(f"{path} stores its voxels as text (BinaryData = False); save it as binary MetaImage, NRRD or NIfTI")
    msb = _boolean(fields.get("BinaryDataByteOrderMSB", "False"), "BinaryDataByteOrderMSB", path)
    dtype = np.dtype(_MET_TYPES[etype]).newbyteorder(">" if msb else "<")
    compressed = _boolean(fields.get("CompressedData", "False"), "CompressedData", path)
    csize = None
    if "CompressedDataSize" in fields:
        csize = _whole(fields["CompressedDataSize"], "CompressedDataSize", path, 0, 1 << 62)
    spacing = _number_list(fields.get("ElementSpacing", fields.get("ElementSize", " ".join(["1"] * ndims))), ndims, "ElementSpacing", path)
    origin = _number_list(fields.get("Offset", " ".join(["0"] * ndims)), ndims, "Offset", path)
    # fields MedIL does not use but ITK's MetaIO parses as NDims numbers: with fewer values, MetaIO reads on into the next
    # lines (so ITK, and Slicer, take another spacing or origin than the header shows); refuse what would read two ways
    for key in ("CenterOfRotation",):
        if key in fields:
            try:
                _number_list(fields[key], ndims, key, path)
            except MedILError:
                raise MedILError(
                    f"cannot read {path}: header field {key} = {fields[key].strip()[:40]!r} does not hold {ndims} numbers; ITK (and "
                    f"Slicer) would read the next header lines as its values and so another geometry than MedIL: fix the field "
                    f"(e.g. {key} = {' '.join(['0'] * ndims)}) or remove it"
                ) from None
    eye = np.eye(ndims).T.ravel()
    tm = _number_list(fields.get("TransformMatrix", " ".join(str(v) for v in eye)), ndims * ndims, "TransformMatrix", path)
    # TransformMatrix lists the direction of voxel axis 0, then of axis 1, ... (ITK's MetaImageIO)
    direction = np.asarray(tm, dtype=np.float64).reshape(ndims, ndims).T
    shape = tuple(sizes)
    if ndims == 4 and sizes[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        dims = "x".join(str(s) for s in sizes)
        raise MedILError(f"the image has {ndims} dimensions (size {dims}); MedIL needs a 3D volume (pick one 3D volume of a series)")
    lps = np.eye(4)
    lps[:3, :3] = direction[:3, :3] * np.asarray(spacing[:3])[None, :]
    lps[:3, 3] = origin[:3]
    if np.any(np.asarray(spacing[:3]) == 0):
        raise MedILError(f"{path} has voxel spacing {tuple(spacing[:3])}; spacing must be non-zero and finite: fix the file's header")
    name = fields["ElementDataFile"].strip()
    header_size = _whole(fields.get("HeaderSize", "0"), "HeaderSize", path, -1, 1 << 62)
    if name.split()[:1] == ["LOCAL"] and name.strip() == "LOCAL":
        data_file, offset = path, end_of_header
        if header_size > 0:
            offset += header_size
    elif "%" in name:
        raise MedILError(
            f"{path} names its voxel data with a printf-style file-name pattern ({name[:60]!r}); MedIL reads MetaImage files "
            "whose voxels are LOCAL or in one plainly named data file: convert the series to one .mha, .nrrd or .nii.gz file"
        )
    elif name.split()[:1] == ["LIST"] or len(name.split()) > 1:
        raise MedILError(
            f"{path} spreads its voxels over several files ({name[:60]!r}); MedIL reads MetaImage files whose voxels are LOCAL "
            "or in one data file: convert the series to one .mha, .nrrd or .nii.gz file"
        )
    else:
        data_file = regular_file_beside(path, name)
        offset = header_size
    return MetaHeader(path, shape, dtype, _LPS @ lps, data_file, offset, compressed, csize, fields)


def read_metaio(header: MetaHeader) -> np.ndarray:
    """The voxels of a parsed MetaImage, as an (i, j, k) array; a data size that does not match the header is refused."""
    need = header.nbytes
    path = header.path
    try:
        with open(header.data_file, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            offset = header.data_offset
            if header.compressed:
                if offset < 0:
                    raise MedILError(f"cannot read {path}: HeaderSize = -1 cannot be used with compressed data; fix the header")
                fh.seek(offset)
                have = size - offset
                if header.compressed_size is not None and header.compressed_size != have:
                    raise MedILError(
                        f"{path} declares CompressedDataSize = {header.compressed_size} but holds {have} bytes of compressed data: "
                        "the file is damaged or its header wrong; export it again"
                    )
                raw = _inflate(fh, need, path)
            else:
                if offset < 0:
                    offset = size - need
                if offset < 0 or size - offset < need:
                    raise MedILError(
                        f"{path} is truncated: its header declares {need} bytes of voxels, the data file has "
                        f"{max(0, size - max(offset, 0))}; copy the file again"
                    )
                fh.seek(offset)
                raw = fh.read(need)
    except OSError as exc:
        raise MedILError(f"cannot read {header.data_file} ({exc.strerror}); check its permissions") from None
    if len(raw) != need:
        raise MedILError(f"{path} is truncated: its header declares {need} bytes of voxels, {len(raw)} could be read; copy the file again")
    array = np.frombuffer(raw, dtype=header.dtype).reshape(header.shape[::-1]).transpose(2, 1, 0)
    return array.astype(header.dtype.newbyteorder("="))


def _inflate(fh, need: int, path: Path) -> bytes:
    """Exactly ``need`` bytes from a zlib or gzip stream (MetaIO writes either), never more (a bomb stops at ``need``)."""
    d = zlib.decompressobj(47)  # 32 + 15: zlib or gzip header, detected
    out = bytearray()
    try:
        while len(out) <= need:
            chunk = fh.read(1 << 20)
            if not chunk:
                break
            out += d.decompress(chunk, need + 1 - len(out))
            while d.unconsumed_tail and len(out) <= need:
                out += d.decompress(d.unconsumed_tail, need + 1 - len(out))
            if d.eof:
                break
    except zlib.error:
        raise MedILError(
            f"{path} says its voxels are compressed (CompressedData = True) but they cannot be decompressed: the file is "
            "damaged, or its header wrong; export it again"
        ) from None
    if len(out) != need or not d.eof:
        raise MedILError(
            f"cannot read {path}: its compressed voxels hold {'more than ' if len(out) > need else ''}{min(len(out), need)} bytes, its header "
            f"declares {need}; the file is damaged or its header wrong: export it again"
        )
    return bytes(out)


# -- NRRD (.nrrd / .nhdr) ----------------------------------------------------------------------------

_NRRD_TYPES = {
    "signed char": "int8", "int8": "int8", "int8_t": "int8", "uchar": "uint8", "unsigned char": "uint8", "uint8": "uint8",
    "uint8_t": "uint8", "short": "int16", "short int": "int16", "signed short": "int16", "signed short int": "int16",
    "int16": "int16", "int16_t": "int16", "ushort": "uint16", "unsigned short": "uint16", "unsigned short int": "uint16",
    "uint16": "uint16", "uint16_t": "uint16", "int": "int32", "signed int": "int32", "int32": "int32", "int32_t": "int32",
    "uint": "uint32", "unsigned int": "uint32", "uint32": "uint32", "uint32_t": "uint32", "longlong": "int64",
    "long long": "int64", "long long int": "int64", "signed long long": "int64", "signed long long int": "int64",
    "int64": "int64", "int64_t": "int64", "ulonglong": "uint64", "unsigned long long": "uint64",
    "unsigned long long int": "uint64", "uint64": "uint64", "uint64_t": "uint64", "float": "float32", "double": "float64",
}  # fmt: skip
_NRRD_ENCODINGS = {"raw", "gzip", "gz", "bzip2", "bz2", "ascii", "text", "txt", "hex"}
_NRRD_FIELDS = {
    "dimension", "type", "encoding", "sizes", "endian", "space", "spacedimension", "spacedirections", "spaceorigin",
    "spaceunits", "spacings", "thicknesses", "axismins", "axismaxs", "centerings", "centers", "labels", "units", "kinds",
    "datafile", "byteskip", "lineskip", "content", "min", "max", "oldmin", "oldmax", "measurementframe", "sampleunits",
    "blocksize", "number",
}  # fmt: skip
_NRRD_SYNONYMS = {"centers": "centerings"}
#: NRRD's space names (teem's airEnum, case-insensitive)
_NRRD_SPACES = {
    "right-anterior-superior", "ras", "left-anterior-superior", "las", "left-posterior-superior", "lps",
    "right-anterior-superior-time", "rast", "left-anterior-superior-time", "last", "left-posterior-superior-time",
    "lpst", "scanner-xyz", "scanner-xyz-time", "3d-right-handed", "3d-left-handed", "3d-right-handed-time",
    "3d-left-handed-time",
}  # fmt: skip
_NRRD_KINDS = {
    "domain", "space", "time", "list", "point", "vector", "covariant-vector", "normal", "stub", "scalar", "complex",
    "2-vector", "3-color", "rgb-color", "hsv-color", "xyz-color", "4-color", "rgba-color", "3-vector", "3-gradient",
    "3-normal", "4-vector", "quaternion", "2d-symmetric-matrix", "2d-masked-symmetric-matrix", "2d-matrix",
    "2d-masked-matrix", "3d-symmetric-matrix", "3d-masked-symmetric-matrix", "3d-matrix", "3d-masked-matrix", "none", "???",
}  # fmt: skip


@dataclass
class NrrdHeader:
    path: Path
    shape: tuple[int, ...]
    itemsize: int
    encoding: str
    data_files: list[Path]
    data_offset: int  # where attached data start (bytes)


def parse_nrrd(path: Path) -> NrrdHeader:
    """Parse and validate an NRRD header (attached or detached) and every data file it names."""
    head = _head(path)
    if not head.startswith(b"NRRD000"):
        raise MedILError(f"cannot read {path}: it does not start with an NRRD magic line (NRRD000X), so it is not an NRRD file")
    fields: dict[str, str] = {}
    pos = head.find(b"\n") + 1 if b"\n" in head else len(head)
    end_of_header, list_files = None, []
    lines_after_list = False
    while pos < len(head):
        nl = head.find(b"\n", pos)
        if nl < 0 and len(head) > MAX_HEADER_BYTES:
            break
        line_end = len(head) if nl < 0 else nl + 1
        line = head[pos:line_end].decode("latin-1").rstrip("\r\n")
        pos = line_end
        if len(line) > MAX_LINE_BYTES and not line.startswith("#"):  # (teem crashed on a long field value)
            raise MedILError(f"cannot read {path}: a header line is longer than {MAX_LINE_BYTES} bytes; fix the header")
        if lines_after_list:
            if not line.strip():
                end_of_header = pos
                break
            list_files.append(line.strip())
            continue
        if not line.strip():
            end_of_header = pos
            break
        if line.startswith("#") or (":=" in line and (": " not in line or line.index(":=") < line.index(": "))):
            continue  # a comment, or a key:=value pair (free text, not read by ITK for geometry)
        key, sep, value = line.partition(": ")
        if not sep:
            raise MedILError(f"cannot read {path}: header line {line.strip()[:60]!r} is not 'field: value'; fix the header")
        norm = key.strip().lower().replace(" ", "")
        norm = _NRRD_SYNONYMS.get(norm, norm)
        if norm not in _NRRD_FIELDS:
            raise MedILError(f"cannot read {path}: header field {key.strip()[:40]!r} is not an NRRD field; fix the header")
        if norm in fields:
            raise MedILError(
                f"cannot read {path}: header field {key.strip()!r} is given twice (readers disagree on which counts); fix the header"
            )
        fields[norm] = value.strip()
        if norm == "datafile" and value.strip().split()[:1] == ["LIST"]:
            lines_after_list = True
    if end_of_header is None:
        if lines_after_list or path.suffix.lower() == ".nhdr":
            end_of_header = len(head)
        if len(head) > MAX_HEADER_BYTES or end_of_header is None:
            raise MedILError(
                f"cannot read {path}: the NRRD header does not end (no blank line in its first {MAX_HEADER_BYTES} bytes); fix the file"
            )
    for required in ("dimension", "type", "encoding", "sizes"):
        if required not in fields:
            raise MedILError(f"cannot read {path}: the NRRD header lacks its {required!r} field; fix the header")
    dim = _whole(fields["dimension"], "dimension", path, 1, 16)
    sizes = [int(v) for v in _number_list(fields["sizes"], dim, "sizes", path, integer=True)]
    _check_sizes(sizes, path)
    type_name = " ".join(fields["type"].lower().split())
    if type_name not in _NRRD_TYPES:
        raise MedILError(f"cannot read {path}: NRRD type {fields['type'][:40]!r} is not a scalar type MedIL reads; fix the header")
    itemsize = np.dtype(_NRRD_TYPES[type_name]).itemsize
    encoding = fields["encoding"].strip().lower()
    if encoding not in _NRRD_ENCODINGS:
        raise MedILError(
            f"cannot read {path}: NRRD encoding {fields['encoding'][:40]!r} is not one MedIL reads ({', '.join(sorted(_NRRD_ENCODINGS))})"
        )
    if "endian" in fields and fields["endian"].strip().lower() not in ("little", "big"):
        raise MedILError(f"cannot read {path}: NRRD endian {fields['endian'][:40]!r} is neither little nor big; fix the header")
    for key in ("byteskip", "lineskip"):
        if key in fields:
            low = -1 if key == "byteskip" else 0
            skip = _whole(fields[key], key, path, low, 1 << 40)
            if skip == -1 and encoding != "raw":
                raise MedILError(f"cannot read {path}: 'byte skip: -1' is only allowed with raw encoding; fix the header")
    if "space" in fields and fields["space"].strip().lower() not in _NRRD_SPACES:
        raise MedILError(f"cannot read {path}: NRRD space {fields['space'][:40]!r} is not an NRRD space name; fix the header")
    if "kinds" in fields:
        kinds = fields["kinds"].split()
        if len(kinds) != dim or any(k.lower() not in _NRRD_KINDS for k in kinds):
            raise MedILError(f"cannot read {path}: NRRD kinds {fields['kinds'][:60]!r} are not {dim} NRRD kind names; fix the header")
    if "spacedimension" in fields:
        _whole(fields["spacedimension"], "space dimension", path, 1, 16)
    if "spacedirections" in fields:
        _check_nrrd_vectors(fields["spacedirections"], dim, "space directions", path)
    if "spaceorigin" in fields:
        _check_nrrd_vectors(fields["spaceorigin"], 1, "space origin", path, allow_none=False)
    for key in ("spacings", "thicknesses", "axismins", "axismaxs"):
        if key in fields:
            parts = fields[key].split()
            if len(parts) != dim:
                raise MedILError(f"cannot read {path}: NRRD field {key} has {len(parts)} values for {dim} axes; fix the header")
            for p in parts:
                if p.lower() != "nan":
                    _number_list(p, 1, key, path)
    data_files: list[Path] = []
    if "datafile" in fields:
        words = fields["datafile"].split()
        if words[:1] == ["LIST"]:
            data_files = [regular_file_beside(path, name) for name in list_files]
            if not data_files:
                raise MedILError(f"cannot read {path}: 'data file: LIST' names no files; fix the header")
        elif len(words) != 1 or "%" in fields["datafile"]:
            raise MedILError(
                f"{path} names its data with a file-name pattern ({fields['datafile'][:60]!r}); MedIL reads NRRD data from one "
                "file or a LIST of files beside the header: convert the series to one .nrrd file"
            )
        else:
            data_files = [regular_file_beside(path, words[0])]
    header = NrrdHeader(path, tuple(sizes), itemsize, encoding, data_files, end_of_header)
    if encoding in ("ascii", "text", "txt", "hex"):
        _check_text_data(header)
    return header


def _check_nrrd_vectors(value: str, count: int, key: str, path: Path, allow_none: bool = True) -> None:
    items = value.split()
    if len(items) != count:
        raise MedILError(f"cannot read {path}: NRRD field {key} has {len(items)} entries for {count}; fix the header")
    for item in items:
        if allow_none and item == "none":
            continue
        if not (item.startswith("(") and item.endswith(")")):
            raise MedILError(f"cannot read {path}: NRRD field {key} entry {item[:40]!r} is not a vector '(x,y,z)'; fix the header")
        parts = item[1:-1].split(",")
        _number_list(" ".join(parts), len(parts), key, path)


_TEXT_BYTES = frozenset(b"0123456789+-.eEinfaINFAx \t\r\n,")
_HEX_BYTES = frozenset(b"0123456789abcdefABCDEF \t\r\n")


def _check_text_data(header: NrrdHeader) -> None:
    """Text-encoded voxels must be text and hold every declared voxel (teem's parser crashed on binary data)."""
    allowed = _HEX_BYTES if header.encoding == "hex" else _TEXT_BYTES
    voxels = int(np.prod(header.shape, dtype=np.int64))
    limit = voxels * 64 + (1 << 16)
    sources = header.data_files or [header.path]
    tokens = 0
    for n, source in enumerate(sources):
        with open(source, "rb") as fh:
            if not header.data_files and n == 0:
                fh.seek(header.data_offset)
            data = fh.read(limit + 1)
        if len(data) > limit:
            raise MedILError(
                f"cannot read {header.path}: its text-encoded voxel data are far longer than {voxels} voxels need; fix the file"
            )
        if not set(data) <= allowed:
            raise MedILError(
                f"{header.path} says its voxels are {header.encoding} text, but its data hold other bytes (binary data?): "
                "fix the header's encoding field"
            )
        tokens += (
            len(data.replace(b",", b" ").split()) if header.encoding != "hex" else len(b"".join(data.split())) // (2 * header.itemsize)
        )
    if tokens < voxels:
        raise MedILError(
            f"{header.path} is truncated: its header declares {voxels} voxels, its text data hold {tokens}; copy the file again"
        )
