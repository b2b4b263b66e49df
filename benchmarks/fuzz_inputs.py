"""Fuzz campaign over the four input families (NIfTI, NRRD, MHA/MHD, DICOM series): how many mutated
files end in each outcome, for MedIL's reader and, as the baseline of the same run, for the standard
readers alone (nibabel for NIfTI, SimpleITK for the rest, as a user without MedIL would open them).

Outcomes: ``clean_error`` (one MedILError line), ``correct_output`` (a volume that agrees with the
standard reader to 1e-4 mm and voxel for voxel, or with the NIfTI rule where nibabel ignores units),
``output_reference_refuses`` (MedIL reads what the standard reader cannot: listed for review),
``wrong_success`` (a volume that disagrees with the standard reader), ``traceback`` (any other
exception), ``hang`` (over the per-case timeout), ``crash`` (the process died: a segfault).
Each case runs in a worker process that is restarted after a hang or crash.

    python benchmarks/fuzz_inputs.py --cases 100 --seed 2026 --json benchmarks/results/fuzz_inputs.json
"""

from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "Testing"))
from report import emit  # noqa: E402 (benchmarks/, the script's own folder)

WORKER = r"""
import json, sys, warnings
warnings.simplefilter("ignore")
import numpy as np
mode = sys.argv[1]
def medil(path):
    from medil_backend.errors import MedILError
    from medil_backend.io import read_volume
    try:
        v = read_volume(path)
    except MedILError as exc:
        return {"status": "clean_error", "message": str(exc)[:200]}
    a = np.asarray(v.array, dtype=np.float64)
    return {"status": "output", "shape": list(a.shape), "affine": v.affine.tolist(), "sum": float(np.nansum(a)), "finite": bool(np.isfinite(a).all())}
def reference(path):
    import os
    try:
        if path.endswith((".nii", ".hdr")):
            import nibabel as nib
            img = nib.load(path)
            a = np.asarray(img.dataobj, dtype=np.float64)
            aff = np.asarray(img.affine, dtype=np.float64)
            units = int(img.header["xyzt_units"]) & 7
            aff[:3, :] *= {1: 1000.0, 3: 1e-3}.get(units, 1.0)
        else:
            import SimpleITK as sitk
            if os.path.isdir(path):
                r = sitk.ImageSeriesReader()
                r.SetFileNames(r.GetGDCMSeriesFileNames(path))
                img = r.Execute()
            else:
                img = sitk.ReadImage(path)
            from medil_backend.io import from_sitk
            a, aff = from_sitk(img)
            a = np.asarray(a, dtype=np.float64)
        while a.ndim > 3 and a.shape[-1] == 1:
            a = a[..., 0]
        return {"status": "output", "shape": list(a.shape), "affine": aff.tolist(), "sum": float(np.nansum(a))}
    except Exception as exc:
        return {"status": "error", "message": str(exc)[:200]}
for line in sys.stdin:
    path = line.strip()
    try:
        out = medil(path) if mode == "medil" else reference(path)
    except BaseException as exc:
        out = {"status": "traceback", "message": type(exc).__name__ + ": " + str(exc)[:200]}
    print(json.dumps(out), flush=True)
"""


class Worker:
    """A reader process fed one path at a time; restarted after a hang or a crash."""

    def __init__(self, mode: str, timeout: float) -> None:
        self.mode, self.timeout, self.proc = mode, timeout, None

    def _start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, self.mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )

    def read(self, path: str) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(path + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        if not ready:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
            return {"status": "hang"}
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            self.proc = None
            return {"status": "crash", "message": f"exit status {code}"}
        return json.loads(line)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()


def agree(a: dict, b: dict) -> bool:
    import numpy as np

    if a["shape"] != b["shape"]:
        return False
    if np.max(np.abs(np.asarray(a["affine"]) - np.asarray(b["affine"]))) > 1e-4:
        return False
    return abs(a["sum"] - b["sum"]) <= 1e-6 * max(1.0, abs(b["sum"]))


def classify(ours: dict, ref: dict) -> str:
    if ours["status"] != "output":
        return ours["status"]
    if not ours.get("finite", True):
        return "wrong_success"
    if ref["status"] != "output":
        return "output_reference_refuses"
    return "correct_output" if agree(ours, ref) else "wrong_success"


def reference_outcome(ref: dict) -> str:
    return {"output": "output", "error": "error"}.get(ref["status"], ref["status"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=100, help="mutated files per family (default 100)")
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds a case may take before it counts as a hang")
    ap.add_argument("--json", default=None, help="also write the report here")
    args = ap.parse_args()
    import numpy as np
    from mutants import FAMILIES, MUTANTS

    ours, ref = Worker("medil", args.timeout), Worker("reference", args.timeout)
    report = {"cases_per_family": args.cases, "seed": args.seed, "families": {}, "examples": {}}
    refused_readable: dict[str, int] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="medil-fuzz-") as tmp:
        for family in FAMILIES:
            rng = np.random.default_rng([args.seed, FAMILIES.index(family)])
            medil_counts: dict[str, int] = {}
            ref_counts: dict[str, int] = {}
            for n in range(args.cases):
                case = Path(tmp) / family / f"c{n}"
                case.mkdir(parents=True)
                path = str(MUTANTS[family](rng, case / "m"))
                mine, theirs = ours.read(path), ref.read(path)
                outcome = classify(mine, theirs)
                medil_counts[outcome] = medil_counts.get(outcome, 0) + 1
                r = reference_outcome(theirs)
                ref_counts[r] = ref_counts.get(r, 0) + 1
                if outcome == "clean_error" and theirs["status"] == "output":
                    refused_readable[family] = refused_readable.get(family, 0) + 1
                    report["examples"].setdefault(f"{family}:refused_where_standard_reads", []).append(
                        {"case": n, "medil": mine["message"]}
                    )
                if outcome in ("wrong_success", "traceback", "hang", "crash", "output_reference_refuses"):
                    report["examples"].setdefault(f"{family}:{outcome}", []).append(
                        {"case": n, "medil": mine.get("message", ""), "reference": theirs.get("status") + " " + theirs.get("message", "")}
                    )
            report["families"][family] = {
                "medil": dict(sorted(medil_counts.items())),
                "standard_reader": dict(sorted(ref_counts.items())),
                "medil_refuses_where_standard_reader_gives_a_volume": refused_readable.get(family, 0),
            }
    ours.close()
    ref.close()
    total: dict[str, int] = {}
    for f in report["families"].values():
        for k, v in f["medil"].items():
            total[k] = total.get(k, 0) + v
    report["total_medil"] = dict(sorted(total.items()))
    report["failures"] = sum(total.get(k, 0) for k in ("wrong_success", "traceback", "hang", "crash"))
    report["seconds"] = round(time.perf_counter() - t0, 1)
    for key in report["examples"]:
        report["examples"][key] = report["examples"][key][:8]
    emit(report, args.json)
    return 0 if report["failures"] == 0 else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    raise SystemExit(main())
