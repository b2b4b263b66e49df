"""Write the training set as data packs that travel to a GPU machine with the repository.

    python training/pack.py --data ../shared/data --out packs/          # every list below
    python training/pack.py --data data/ --out packs/ --lists brain-train brain-val

Reads ``training/data_manifest.json`` (split and region of every file, sha256 checked), crops each
volume to its body mask and writes ``packs/<list>.npz`` (see ``medil_backend/training/pack.py``):
``brain-{train,val}`` (head MR), ``ct-{train,val}`` (every CT), ``mr-train`` (every MR) and
``tissue`` (the MNI tissue maps for synthetic volumes, uncropped: they share one grid). The device tool carries at most 64 MiB
with the repository: the sizes are printed, and a pack over ``--max-mb`` is an error.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from build_data import LISTS  # noqa: E402

from medil_backend.io import read_volume  # noqa: E402
from medil_backend.training.pack import write_pack  # noqa: E402

MANIFEST = HERE / "data_manifest.json"
TISSUE = {"gm": "mri/mni152_2009a_gm_1mm.nii.gz", "wm": "mri/mni152_2009a_wm_1mm.nii.gz", "brain": "mri/mni152_2009a_t1_brain_1mm.nii.gz"}
DEFAULT_LISTS = ["brain-train", "brain-val", "ct-train", "ct-val", "tissue"]


def list_files(manifest: dict, name: str) -> list[tuple[str, str]]:
    """(pack entry name, manifest path) of a list such as ``brain-train``; ``tissue`` names the maps gm/wm/brain."""
    if name == "tissue":
        return list(TISSUE.items())
    kind, suffix = name.rsplit("-", 1)
    prefix, regions = LISTS[kind]
    split = {"train": "train", "val": "test"}[suffix]
    return [
        (p, p)
        for p, f in manifest.items()
        if p.startswith(prefix) and f["split"] == split and (regions is None or f.get("region") in regions)
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="folder of the volumes (e.g. ../shared/data or build_data.py's --out)")
    ap.add_argument("--out", type=Path, default=Path("packs"))
    ap.add_argument("--lists", nargs="+", default=DEFAULT_LISTS)
    ap.add_argument("--max-mb", type=float, default=48.0, help="refuse a pack larger than this (the device tool carries 64 MiB in all)")
    ap.add_argument(
        "--allow-missing",
        action="store_true",
        help="pack the volumes that are there and name the missing ones (a data folder of an older manifest)",
    )
    args = ap.parse_args()
    manifest = {f["path"]: f for f in json.loads(MANIFEST.read_text())["files"]}
    for name in args.lists:
        items = []
        for entry, rel in list_files(manifest, name):
            path = args.data / rel
            if not path.is_file() and args.allow_missing:
                print(f"pack: {path} is missing; {name} is packed without it", file=sys.stderr)
                continue
            if not path.is_file():
                print(
                    f"pack: error: {path} is missing; rebuild the data folder with training/build_data.py --out {args.data}",
                    file=sys.stderr,
                )
                return 1
            data = path.read_bytes()
            sha = hashlib.sha256(data).hexdigest()
            if sha != manifest[rel]["sha256"]:
                print(
                    f"pack: error: {path} does not match its sha256 in {MANIFEST.name}; rebuild it with training/build_data.py",
                    file=sys.stderr,
                )
                return 1
            vol = read_volume(path, modality="ct" if rel.startswith("ct/") else "mri")
            items.append((entry, vol, sha))
        out = args.out / f"{name}.npz"
        write_pack(items, out, crop=name != "tissue")  # the tissue maps must keep one common grid
        mb = out.stat().st_size / 2**20
        print(f"{out}: {len(items)} volumes, {mb:.1f} MB")
        if mb > args.max_mb:
            print(f"pack: error: {out} is {mb:.1f} MB, over --max-mb {args.max_mb:g}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
