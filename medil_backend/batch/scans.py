"""The scans of a batch: found in a BIDS dataset, a folder of volumes, or a CSV/JSON manifest.

A :class:`Scan` carries the BIDS names its derivatives are written under: participant and session
labels, the other entities of its file name (``acq``, ``run``, ...) and its suffix (``T1w``).
Scans of a plain folder or a manifest get a participant label from their file name (letters and
digits only, as BIDS requires), the suffix ``scan`` unless the manifest names one.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import MedILError

#: the volume files a batch reads (DICOM series are folders of slices)
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
#: BIDS datatypes whose images a batch takes
DATATYPES = ("anat",)
_LABEL = re.compile(r"^[A-Za-z0-9]+$")
_ENTITY = re.compile(r"^([a-z]+)-([A-Za-z0-9]+)$")
_MANIFEST_KEYS = {"input", "participant", "subject", "session", "suffix"}


@dataclass(frozen=True)
class Scan:
    input: str  # a volume file or a DICOM series folder
    subject: str  # the participant label, without "sub-"
    session: str | None = None  # without "ses-"
    entities: tuple[tuple[str, str], ...] = ()  # the file name's other entities, in order (acq, run, ...)
    suffix: str = "scan"  # BIDS suffix (T1w, T2w, ...)
    datatype: str = "anat"

    @property
    def id(self) -> str:
        """A name unique within a dataset: the BIDS file name's entities and suffix."""
        return "_".join(self._name_parts() + [self.suffix])

    def _name_parts(self, desc: str | None = None) -> list[str]:
        parts = [f"sub-{self.subject}"] + ([f"ses-{self.session}"] if self.session else [])
        parts += [f"{k}-{v}" for k, v in self.entities if k != "desc"]
        return parts + ([f"desc-{desc}"] if desc else [])

    def derivative(self, out_dir: str | Path, desc: str, extension: str = ".nii.gz") -> Path:
        """This scan's derivative under ``out_dir``: ``sub-X/[ses-Y/]anat/sub-X_[ses-Y_]..._desc-DESC_SUFFIX.nii.gz``."""
        folder = Path(out_dir) / f"sub-{self.subject}"
        if self.session:
            folder = folder / f"ses-{self.session}"
        return folder / self.datatype / ("_".join(self._name_parts(desc) + [self.suffix]) + extension)


def volume_suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in VOLUME_SUFFIXES if name.endswith(s)), None)


def _is_dicom_folder(path: Path) -> bool:
    """A folder whose first regular file has the DICOM preamble's ``DICM`` marker."""
    try:
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    except OSError:
        return False
    for f in files[:1]:
        try:
            with open(f, "rb") as fh:
                return fh.read(132)[128:132] == b"DICM"
        except OSError:
            return False
    return False


def label_of(name: str) -> str:
    """A BIDS label (letters and digits) made from a file name."""
    stem = name
    suffix = volume_suffix(Path(name))
    if suffix:
        stem = name[: -len(suffix)]
    label = re.sub(r"[^A-Za-z0-9]", "", stem)
    if not label:
        raise MedILError(f"cannot make a participant label from the file name {name!r}; rename it or list it in a manifest")
    return label


def parse_bids_name(path: Path) -> tuple[dict[str, str], list[tuple[str, str]], str] | None:
    """``sub-01_ses-1_acq-x_T1w.nii.gz`` -> ({sub, ses}, [(acq, x)], "T1w"); None if not a BIDS name."""
    suffix = volume_suffix(path)
    if suffix is None:
        return None
    parts = path.name[: -len(suffix)].split("_")
    if len(parts) < 2 or not _LABEL.match(parts[-1]):
        return None
    entities = []
    for part in parts[:-1]:
        m = _ENTITY.match(part)
        if not m:
            return None
        entities.append((m.group(1), m.group(2)))
    keys = dict(entities)
    if entities[0][0] != "sub":
        return None
    return keys, [(k, v) for k, v in entities if k not in ("sub", "ses")], parts[-1]


def from_bids(root: Path) -> list[Scan]:
    """Every volume under ``sub-*/[ses-*/]anat/`` of a BIDS dataset (``derivatives/`` and ``sourcedata/`` are not read)."""
    scans = []
    for sub in sorted(root.glob("sub-*")):
        if not sub.is_dir():
            continue
        folders = [sub] + sorted(p for p in sub.glob("ses-*") if p.is_dir())
        for folder in folders:
            for datatype in DATATYPES:
                data = folder / datatype
                if not data.is_dir():
                    continue
                for f in sorted(data.iterdir()):
                    parsed = parse_bids_name(f)
                    if parsed is None or f.name.startswith("."):
                        continue
                    keys, entities, suffix = parsed
                    scans.append(Scan(str(f), keys["sub"], keys.get("ses"), tuple(entities), suffix, datatype))
    if not scans:
        raise MedILError(f"{root} is a BIDS dataset with no images under sub-*/[ses-*/]anat/; point at a dataset that has some")
    return scans


def from_folder(root: Path, skip: Path | None = None) -> list[Scan]:
    """Every volume file (and DICOM series folder) under ``root``, its participant label from its name."""
    scans = []
    skip_resolved = skip.resolve() if skip is not None else None
    for f in sorted(root.rglob("*")):
        if any(part.startswith(".") for part in f.relative_to(root).parts):
            continue
        if skip_resolved is not None and (f.resolve() == skip_resolved or skip_resolved in f.resolve().parents):
            continue
        if f.is_file() and volume_suffix(f) and not f.name.lower().endswith(".json"):
            scans.append(Scan(str(f), label_of(f.name)))
        elif f.is_dir() and _is_dicom_folder(f):
            scans.append(Scan(str(f), label_of(f.name)))
    if not scans:
        raise MedILError(
            f"{root} holds no volumes (NIfTI, NRRD, MetaImage files or DICOM series folders); point at a folder of scans, "
            "a BIDS dataset or a manifest"
        )
    return scans


def from_manifest(path: Path) -> list[Scan]:
    """A CSV (header row) or JSON (a list of objects) manifest: ``input`` (relative to the manifest's folder),
    optional ``participant``, ``session`` and ``suffix``."""
    from ..files import read_json_file

    try:
        if path.suffix.lower() == ".json":
            rows = read_json_file(path, what="manifest", max_bytes=64 * 2**20)
        else:
            with open(path, newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error, json.JSONDecodeError) as exc:
        raise MedILError(f"cannot read the manifest {path} ({exc}); give a CSV with a header row or a JSON list of objects") from None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise MedILError(f"the manifest {path} lists no scans; give one row (CSV) or object (JSON) per scan with an 'input' column")
    scans = []
    for i, row in enumerate(rows, start=1):
        row = {str(k).strip().lower(): (str(v).strip() if v is not None else "") for k, v in row.items() if k is not None}
        unknown = set(row) - _MANIFEST_KEYS
        if unknown:
            raise MedILError(f"the manifest {path} has unknown columns {sorted(unknown)}; use {sorted(_MANIFEST_KEYS)}")
        if not row.get("input"):
            raise MedILError(f"row {i} of the manifest {path} has no input; every row needs the path of a scan")
        source = Path(row["input"]).expanduser()
        source = source if source.is_absolute() else path.parent / source
        subject = row.get("participant") or row.get("subject") or label_of(source.name)
        subject = subject[4:] if subject.startswith("sub-") else subject
        session = row.get("session") or None
        session = session[4:] if session and session.startswith("ses-") else session
        suffix = row.get("suffix") or "scan"
        for what, value in (("participant", subject), ("session", session), ("suffix", suffix)):
            if value is not None and not _LABEL.match(value):
                raise MedILError(f"row {i} of the manifest {path}: the {what} {value!r} must be letters and digits only (BIDS labels)")
        scans.append(Scan(str(source), subject, session, (), suffix))
    return scans


def find_scans(source: str | Path, participant_labels: list[str] | None = None, skip: Path | None = None) -> list[Scan]:
    """The scans of ``source`` (a BIDS dataset, a folder, or a .csv/.json manifest), optionally only some participants."""
    path = Path(source).expanduser()
    if not path.exists():
        raise MedILError(f"{path} does not exist; give a BIDS dataset, a folder of volumes or a CSV/JSON manifest")
    if path.is_file():
        if path.suffix.lower() not in (".csv", ".json"):
            raise MedILError(f"{path} is a file but not a manifest (.csv or .json); give a folder of scans, a BIDS dataset or a manifest")
        scans = from_manifest(path)
    elif (path / "dataset_description.json").is_file():
        scans = from_bids(path)
    else:
        scans = from_folder(path, skip)
    seen: dict[str, str] = {}
    for s in scans:
        if s.id in seen:
            raise MedILError(
                f"{s.input} and {seen[s.id]} would both be written as {s.id}; rename one, or list them in a manifest with "
                "participant, session or suffix columns that tell them apart"
            )
        seen[s.id] = s.input
    if participant_labels:
        wanted = {p[4:] if p.startswith("sub-") else p for p in participant_labels}
        missing = wanted - {s.subject for s in scans}
        if missing:
            known = ", ".join(sorted({s.subject for s in scans})[:20])
            raise MedILError(f"no scans of participant(s) {', '.join(sorted(missing))} in {path}; its participants: {known}")
        scans = [s for s in scans if s.subject in wanted]
    return scans


__all__ = ["Scan", "find_scans", "from_bids", "from_folder", "from_manifest", "label_of", "parse_bids_name"]
