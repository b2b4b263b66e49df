"""Write the README's measured tables from the JSON results in benchmarks/results/.

    python benchmarks/readme_tables.py          # rewrites the marked sections of README.md

Sections: ``quality-brain`` / ``quality-ct`` (``medil evaluate`` mean tables and the issue's
targets, from ``eval-brain.json`` / ``eval-ct.json``) and ``speed`` (``bench_reconstruct.json``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def quality(name: str) -> str:
    from medil_backend.evaluate import markdown_table, target_table

    res = json.loads((RESULTS / f"eval-{name}.json").read_text())
    models = [m for m in res["mean"]["recon"] if m not in ("trilinear", "bspline")]
    return markdown_table(res) + "\n\nTargets of the training issue (mean over the held-out volumes):\n\n" + target_table(res, models)


def speed() -> str:
    d = json.loads((RESULTS / "bench_reconstruct.json").read_text())
    model = d.get("model", "?")
    rows = [
        "| method | memory limit | seconds | peak RSS increase (MB) | decoding slab (intermediate voxels) |",
        "|---|---|---|---|---|",
    ]
    b = d["baseline_bspline"]
    rows.append(f"| SimpleITK B-spline | – | {b['seconds']:.1f} | {b['peak_rss_increase_mb']:.0f} | – |")
    for key, v in d.items():
        if not key.startswith("medil_max"):
            continue
        limit = key[len("medil_max") :]
        if "error" in v:
            rows.append(f"| MedIL `{model}` | {limit} | refused before any work: one slab does not fit | – | – |")
        else:
            rows.append(f"| MedIL `{model}` | {limit} | {v['seconds']:.1f} | {v['peak_rss_increase_mb']:.0f} | {v['slab_thickness']} |")
    rows.append("")
    rows.append(
        f"Output grid {d['baseline_bspline']['output_shape']} on {d['machine']}; MedIL took "
        f"{d['medil_over_bspline_time']:.1f}x the time of B-spline at the first limit."
    )
    return "\n".join(rows)


def main() -> None:
    readme = (REPO / "README.md").read_text()
    sections = (("quality-brain", quality("brain")), ("quality-ct", quality("ct")), ("speed", speed()))
    for name, text in sections:
        pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.S)
        if not pattern.search(readme):
            raise SystemExit(f"README.md has no <!-- {name}:start --> ... <!-- {name}:end --> section")
        readme = pattern.sub(lambda m, text=text: m.group(1) + text + "\n" + m.group(2), readme)
    (REPO / "README.md").write_text(readme)


if __name__ == "__main__":
    main()
