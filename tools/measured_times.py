"""Write medil_backend/measured_times.json: each task's and method's seconds on a whole head, as the benchmarks measured
them (benchmarks/results/bench_*.json), with SimpleITK B-spline of the same input in the same run. The task specs'
help (``medil tasks --json``, the command's --help, the Slicer panel's tooltips) quote these, never typed figures.
``--check`` fails where the file is not what the results give.

    python tools/measured_times.py [--check]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
OUT = REPO / "medil_backend" / "measured_times.json"


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def measured() -> dict:
    rec = _load("bench_reconstruct.json")["cases"]["head1mm"]
    sr = _load("bench_superres.json")
    ms = _load("bench_multistack.json")
    sample = next(r for r in _load("bench_sample.json")["results"] if r["job"] == "medil sample")
    head = "a whole 1 mm head, 176x256x256"
    return {
        "hardware": "2 CPU cores (x86_64); GPU: not measured",
        "reconstruct": {
            "cpu_seconds": round(rec["medil_max3GB"]["seconds"], 1),
            "bspline_seconds": round(rec["baseline_bspline"]["seconds"], 1),
            "case": f"{rec['input']} onto its own 1 mm grid ({head})",
            "source": "benchmarks/results/bench_reconstruct.json",
        },
        "superres": {
            method: {
                "cpu_seconds": round(r["seconds"], 1),
                "bspline_seconds": round(sr["results"]["bspline"]["seconds"], 1),
                "gain_over_bspline_db": round(r["gain_over_bspline_db"], 2),
                "case": sr["case"],
                "source": "benchmarks/results/bench_superres.json",
            }
            for method, r in sr["results"].items()
            if method != "bspline"
        },
        "superres_several_stacks": {
            method: {
                "cpu_seconds": round(r["medil_superres_seconds"], 1),
                "bspline_seconds": ms["bspline_one_stack_seconds"],
                "case": f"three 4 mm stacks of {ms['volume']} onto its 1 mm grid",
                "source": "benchmarks/results/bench_multistack.json",
            }
            for method, r in ms["methods"].items()
        },
        "sample": {
            "cpu_seconds": round(sample["seconds"], 1),
            "case": f"one head of {'x'.join(map(str, sample['shape']))} voxels at 1 mm, {sample['steps']} steps",
            "source": "benchmarks/results/bench_sample.json",
        },
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true")
    args = p.parse_args(argv)
    text = json.dumps(measured(), indent=2, sort_keys=True) + "\n"
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT.relative_to(REPO)} is not what the benchmark results give: run python tools/measured_times.py")
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
