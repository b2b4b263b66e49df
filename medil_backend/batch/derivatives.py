"""The BIDS-derivatives tree a batch writes, and what makes it safe to resume and to share.

- ``dataset_description.json`` (``DatasetType: derivative``, ``GeneratedBy``) and ``.bidsignore``;
- a scan is *complete* when its every output and sidecar are in place, each sidecar's checksum
  matches its image, the sidecar records this run's key (task, options, output grid, model, version)
  and every model it names still has the recorded sha256; anything else is redone;
- a scan is worked on under a per-scan lock file (created exclusively, holding the owner's host
  and process id), so two runs into one folder never write the same scan at once; a lock whose
  process has died on this host is taken over.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
from pathlib import Path

from .. import __version__
from ..errors import MedILError

#: the folder of a batch's own state inside the output folder (locks), hidden from BIDS tools
STATE_DIR = ".medil-batch"
REPORT_STEM = "medil_batch_report"


def run_key(task: str, options: dict, request: dict, model: str | None) -> str:
    """What must match for an earlier output to count as this run's: task, options, grid, model, version."""
    text = json.dumps(
        {"task": task, "options": options, "grid": request, "model": model, "version": __version__}, sort_keys=True, default=str
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_dataset_description(out_dir: Path, task: str, source: str) -> None:
    """``dataset_description.json`` of the derivatives (kept if there is one, with medil added to its ``GeneratedBy``)."""
    from ..files import read_json_file
    from ..io import write_text_atomic

    path = out_dir / "dataset_description.json"
    entry = {"Name": "medil", "Version": __version__, "Description": f"MedIL {task} (medil batch)"}
    if path.exists():
        desc = read_json_file(path, what="dataset description")
        if not isinstance(desc, dict):
            raise MedILError(f"{path} is not a BIDS dataset description; choose an empty output folder")
        generated = desc.setdefault("GeneratedBy", [])
        if any(isinstance(g, dict) and g.get("Name") == "medil" and g.get("Description") == entry["Description"] for g in generated):
            return
        generated.append(entry)
    else:
        desc = {
            "Name": f"MedIL {task} derivatives",
            "BIDSVersion": "1.9.0",
            "DatasetType": "derivative",
            "GeneratedBy": [entry],
            "SourceDatasets": [{"URL": Path(source).resolve().as_uri()}],
        }
    write_text_atomic(path, json.dumps(desc, indent=2) + "\n", overwrite=True)
    ignore = out_dir / ".bidsignore"
    if not ignore.exists():
        write_text_atomic(ignore, f"{REPORT_STEM}*\n{STATE_DIR}/\n")


def incomplete_reason(images: list[Path], key: str) -> str | None:
    """Why these outputs are not a complete result of the run with ``key`` (None: complete)."""
    from ..io import _file_sha256, sidecar_path

    for image in images:
        side = sidecar_path(image)
        if not image.is_file() or not side.is_file():
            return "missing"
        try:
            record = json.loads(side.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            return "unreadable sidecar"
        if not isinstance(record, dict) or (record.get("batch") or {}).get("key") != key:
            return "other settings"
        if record.get("file_bytes") != image.stat().st_size or record.get("file_sha256") != _file_sha256(image):
            return "image does not match its sidecar"
        for m in record.get("models", []):
            if not isinstance(m, dict) or current_sha256(m) != m.get("sha256"):
                return "model changed"
    return None


def current_sha256(model: dict) -> str | None:
    """The sha256 a model recorded in a sidecar has now (a registry model's card, or adapt's bundled prior)."""
    from ..files import read_json_file
    from ..models.cards import find_model

    try:
        if model.get("role") == "prior":
            card = Path(__file__).resolve().parents[1] / "weights" / "adapt" / f"{model['name']}.json"
            return str(read_json_file(card, "model card").get("sha256"))
        return find_model(model["name"]).card.get("sha256")
    except (MedILError, KeyError, TypeError, AttributeError):
        return None


class ScanLock:
    """An exclusive per-scan lock file under ``OUT/.medil-batch/locks/`` (context manager).
    ``acquire`` returns False when a live process holds it."""

    def __init__(self, out_dir: Path, scan_id: str) -> None:
        self.path = out_dir / STATE_DIR / "locks" / f"{scan_id}.lock"
        self.held = False

    def owner(self) -> dict | None:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def _stale(self) -> bool:
        owner = self.owner()
        if owner is None:  # being written, or garbage: stale only once it is old
            with contextlib.suppress(OSError):
                return time.time() - self.path.stat().st_mtime > 60
            return False
        if owner.get("host") != socket.gethostname():
            return False  # another machine's process: cannot tell, so it is alive
        try:
            os.kill(int(owner.get("pid", -1)), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError, OverflowError):
            return False
        return False

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._stale():
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.path)
                    continue
                return False
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}, fh)
            self.held = True
            return True
        return False

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self.held = False


__all__ = ["REPORT_STEM", "STATE_DIR", "ScanLock", "incomplete_reason", "run_key", "write_dataset_description"]
