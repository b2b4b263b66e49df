"""Write the licence block of every bundled model card: the weights' licence (the project's, Apache-2.0) and the
licence of each training volume (from training/data_manifest.json). ``--check`` fails if a card's block is stale.

    python tools/card_licences.py [--check]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "medil_backend" / "weights"
WEIGHTS_LICENCE = "Apache-2.0 (the project's licence; see LICENSE)"


def manifest_licences() -> dict[str, str]:
    files = json.loads((REPO / "training" / "data_manifest.json").read_text())["files"]
    return {Path(f["path"]).name: f["licence"] for f in files} | {f["path"]: f["licence"] for f in files}


def training_files(card: dict) -> list[str]:
    """The names of the real volumes a card says its weights were trained on (a recipe's data, or an adapt prior's)."""
    data = card.get("training", {}).get("data") if isinstance(card.get("training"), dict) else None
    entries = data.get("train", []) if isinstance(data, dict) else []
    if not entries and isinstance(card.get("data"), list):  # adapt priors: their volumes, and the heads they made theirs from
        heads = card.get("heads") or {}
        entries = card["data"] + [e for e in heads.get("sources", []) if e.get("file") != "tissue-maps"]
        entries += [{"file": f} for f in (heads.get("tissue_maps") or {}).values()]
    names = []
    for e in entries:
        name = e.get("file") or e.get("name") if isinstance(e, dict) else str(e)
        names.append(name.split("#", 1)[-1])
    return names


def licence_block(card: dict, licences: dict[str, str]) -> dict:
    files = training_files(card)
    return {
        "weights": WEIGHTS_LICENCE,
        "training_data": {f: licences.get(f, licences.get(Path(f).name, "unknown")) for f in files},
        "training_data_sources": "../shared/data/SOURCES.md and training/data_manifest.json (package, version and path of each volume)",
    }


def cards() -> list[Path]:
    return sorted(list(WEIGHTS.glob("*.json")) + list((WEIGHTS / "adapt").glob("*.json")))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true")
    args = p.parse_args(argv)
    licences, stale = manifest_licences(), []
    for path in cards():
        card = json.loads(path.read_text())
        block = licence_block(card, licences)
        if card.get("licence") != block:
            stale.append(path.name)
            if not args.check:
                card["licence"] = block
                path.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    if args.check and stale:
        print("stale licence blocks: " + ", ".join(stale) + " (run python tools/card_licences.py)")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
