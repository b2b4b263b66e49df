"""Write the README's measured tables from the JSON results in benchmarks/results/.

    python benchmarks/readme_tables.py          # rewrites the marked sections of README.md
"""

from __future__ import annotations

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def quality() -> str:
    res = json.loads((RESULTS / "eval-medil-mri-quick.json").read_text())
    from medil_backend.evaluate import markdown_table

    return markdown_table(res)


def speed() -> str:
    d = json.loads((RESULTS / "bench_reconstruct.json").read_text())
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
            rows.append(f"| MedIL `medil-mri-quick` | {limit} | refused before any work: one slab does not fit | – | – |")
        else:
            rows.append(f"| MedIL `medil-mri-quick` | {limit} | {v['seconds']:.1f} | {v['peak_rss_increase_mb']:.0f} | {v['slab_thickness']} |")
    rows.append("")
    rows.append(
        f"Output grid {d['baseline_bspline']['output_shape']} on {d['machine']}; MedIL took "
        f"{d['medil_over_bspline_time']:.1f}x the time of B-spline at the first limit."
    )
    return "\n".join(rows)


def main() -> None:
    readme = (REPO / "README.md").read_text()
    for name, text in (("quality", quality()), ("speed", speed())):
        pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.S)
        if not pattern.search(readme):
            raise SystemExit(f"README.md has no <!-- {name}:start --> ... <!-- {name}:end --> section")
        readme = pattern.sub(lambda m, text=text: m.group(1) + text + "\n" + m.group(2), readme)
    (REPO / "README.md").write_text(readme)


if __name__ == "__main__":
    main()
