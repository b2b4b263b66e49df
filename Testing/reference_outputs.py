"""Every task and super-resolution method run on one small volume, for the before/after test of refactors
(Testing/test_reference_outputs.py): the outputs are recorded once, before a change to the seams under the task
contract, and every later run must reproduce them.

    python Testing/reference_outputs.py --write   # record (only before a refactor, on purpose)

Each run is deterministic: fixed seeds, adapt at a time budget of 0 (the pre-trained network alone), inverse stopped by
its iteration count rather than by the clock, everything on the CPU in float32.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REFERENCE = HERE / "data" / "reference-outputs.npz"
EXAMPLE = HERE.parent / "examples" / "data" / "itk_t1_2x2x3mm.nii.gz"


def machine() -> str:
    """What decides the last bits of a float result: torch's version and the CPU's instruction sets."""
    import torch

    flags = ""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return f"torch {torch.__version__}; {platform.machine()}; cpu flags sha256 {hashlib.sha256(flags.encode()).hexdigest()[:16]}"


def small_inputs():
    """A 40x40x14 crop of the bundled 2x2x3 mm T1 (its middle)."""
    from medil_backend.geometry import Volume
    from medil_backend.io import read_volume

    v = read_volume(EXAMPLE)
    lo = [(n - s) // 2 for n, s in zip(v.array.shape, (40, 40, 14))]
    grid = v.grid.sub_grid(lo, [a + s for a, s in zip(lo, (40, 40, 14))])
    a = np.ascontiguousarray(v.array[lo[0] : lo[0] + 40, lo[1] : lo[1] + 40, lo[2] : lo[2] + 14])
    return Volume(a, grid.affine, modality="mri")


def run_all() -> dict[str, np.ndarray]:
    """name -> output array (and uncertainty maps under ``name/uncertainty``) of every task and method."""
    import torch

    from medil_backend import load_model
    from medil_backend.geometry import Grid, Volume
    from medil_backend.ops.multistack import multistack_superres
    from medil_backend.ops.reconstruct import reconstruct
    from medil_backend.ops.sample import sample
    from medil_backend.ops.superres import superres

    torch.set_num_threads(1)
    vol = small_inputs()
    g = vol.grid
    fine = Grid.from_parts((40, 40, 20), (2.0, 2.0, 2.0), g.direction, g.voxel_to_world(np.zeros(3)))
    out: dict[str, np.ndarray] = {}

    def keep(name: str, v: Volume) -> None:
        out[name] = np.asarray(v.array, dtype=np.float32)
        unc = v.extras.get("uncertainty")
        if unc is not None:
            out[f"{name}/uncertainty"] = np.asarray(unc.array, dtype=np.float32)

    common = dict(device="cpu", precision="float32")
    keep("reconstruct", reconstruct(vol, fine, load_model("medil-brain-t1").net, **common))
    keep("superres/fast", superres(vol, fine, method="fast", **common))
    keep("superres/adapt", superres(vol, fine, method="adapt", time_budget_min=0, **common))
    keep("superres/inverse", superres(vol, fine, method="inverse", max_iterations=2, **common))
    keep("superres/cycles", superres(vol, fine, method="cycles", samples=2, steps=2, seed=3, **common))
    # a second stack: the fast result seen with its thick axis along x (every other 2 mm row: 4 mm)
    iso = out["superres/fast"]
    g2 = Grid.from_parts((20, 40, 20), (4.0, 2.0, 2.0), fine.direction, fine.voxel_to_world(np.array([0.5, 0.0, 0.0])))
    stacks = [vol, Volume(np.ascontiguousarray(0.5 * (iso[0::2] + iso[1::2])), g2.affine, modality="mri")]
    keep("multistack/fast", multistack_superres(stacks, fine, method="fast", register=False, **common))
    keep("multistack/adapt", multistack_superres(stacks, fine, method="adapt", time_budget_min=0, register=False, **common))
    sgrid = Grid.from_parts((24, 28, 20), (4.0, 4.0, 4.0), None, np.array([-48.0, -56.0, -40.0]))
    keep("sample", sample("medil-brain-t1-ldm", sgrid, seed=5, steps=2, **common)[0])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="record the outputs (before a refactor)")
    args = ap.parse_args()
    outputs = run_all()
    if not args.write:
        print(json.dumps({k: [list(v.shape), float(v.mean())] for k, v in outputs.items()}, indent=1))
        return 0
    REFERENCE.parent.mkdir(exist_ok=True)
    meta = {"machine": machine(), "recorded_by": "python Testing/reference_outputs.py --write"}
    np.savez_compressed(REFERENCE, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **outputs)
    print(f"{REFERENCE}: {len(outputs)} outputs, {REFERENCE.stat().st_size / 1024:.0f} KiB; {meta['machine']}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    raise SystemExit(main())
