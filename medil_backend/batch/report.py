"""A batch's report: ``OUTPUT_DIR/medil_batch_report.json`` (every scan's record) and ``.html`` (a
table with each output's three-plane thumbnail above its input's, to scan a cohort by eye)."""

from __future__ import annotations

import datetime as _dt
import html
import json
from pathlib import Path

from .. import __version__
from .derivatives import REPORT_STEM

STATUS_ORDER = {"failed": 0, "busy": 1, "done": 2, "skipped": 3}


def counts(records: list[dict]) -> dict:
    out = {"done": 0, "skipped": 0, "failed": 0, "busy": 0}
    for r in records:
        out[r.get("status", "failed")] = out.get(r.get("status", "failed"), 0) + 1
    return out


def write_report(out_dir: Path, records: list[dict], run: dict) -> tuple[Path, Path]:
    """Write the JSON and HTML reports (atomically, replacing an earlier run's); returns their paths."""
    from ..io import write_text_atomic

    records = sorted(records, key=lambda r: (STATUS_ORDER.get(r.get("status"), 0), r.get("id", "")))
    report = {
        "medil_version": __version__,
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **run,
        "counts": counts(records),
        "scans": records,
    }
    js = write_text_atomic(out_dir / f"{REPORT_STEM}.json", json.dumps(report, indent=2, default=str) + "\n", overwrite=True)
    page = write_text_atomic(out_dir / f"{REPORT_STEM}.html", _html(report), overwrite=True)
    return js, page


def _cell(value) -> str:
    return html.escape("" if value is None else str(value))


def _html(report: dict) -> str:
    c = report["counts"]
    rows = []
    for r in report["scans"]:
        status = r.get("status", "")
        residual = r.get("residual") or {}
        unc = r.get("uncertainty") or {}
        detail = []
        if residual:
            detail.append(f"residual {residual.get('before', 0):.2e} &rarr; {residual.get('after', 0):.2e}")
        if unc:
            detail.append(f"uncertainty mean {unc['mean']:.3g}, p95 {unc['p95']:.3g}")
        if r.get("message"):
            detail.append(_cell(r["message"]))
        thumb = f'<img src="{_cell(r["thumbnail"])}" alt="output above input">' if r.get("thumbnail") else ""
        outputs = "<br>".join(_cell(Path(p).name) for p in r.get("outputs", []))
        rows.append(
            f'<tr class="{_cell(status)}"><td>{_cell(r.get("id"))}<br><small>{_cell(r.get("input"))}</small></td>'
            f"<td>{_cell(status)}</td><td>{_cell(r.get('seconds'))}</td><td>{_cell(r.get('peak_memory_gb'))}</td>"
            f"<td>{outputs}<br>{'<br>'.join(detail)}</td><td>{thumb}</td></tr>"
        )
    title = f"medil batch {_cell(report.get('task'))}: {c['done'] + c['skipped']} done, {c['failed']} failed"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }} table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: 4px; vertical-align: top; }} img {{ max-width: 600px; image-rendering: pixelated; }}
tr.failed {{ background: #fdd; }} tr.busy {{ background: #ffd; }} tr.skipped {{ color: #666; }}
</style></head><body>
<h1>{title}</h1>
<p>{_cell(report.get("command"))}<br>{_cell(report.get("finished"))}; medil {_cell(report.get("medil_version"))};
{c["done"]} run, {c["skipped"]} already done (skipped), {c["failed"]} failed, {c["busy"]} held by another run;
{_cell(report.get("seconds"))} s with {_cell(report.get("workers"))} worker(s).
Each thumbnail: the output (top row) and its input (bottom row), axial, coronal and sagittal planes through the centre.</p>
<table><tr><th>scan</th><th>status</th><th>seconds</th><th>peak memory (GB)</th><th>outputs / notes</th><th>output above input</th></tr>
{chr(10).join(rows)}
</table></body></html>
"""


__all__ = ["counts", "write_report"]
