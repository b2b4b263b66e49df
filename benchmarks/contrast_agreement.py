"""The multi-stack contrast check's evidence: the correlation `ops.multistack.contrast_agreement` measures
between stacks of one contrast and between a T1 and a T2 stack of the same brain, against the threshold
it refuses below (`MIN_CONTRAST_AGREEMENT`).

Simulated three orthogonal stacks (4 and 6 mm, 1 % noise, the second and third moved as in
`medil evaluate --multistack`, about 5 degrees and 4-5 mm) of: three real T1 heads (pydeface mean head,
Colin27) and the MNI 2009a T1 brain; a T2-weighted brain made from the MNI 2009a tissue maps (white matter
0.35, grey matter 0.6, CSF 1.0); and the T1 stacks with the T2 brain's second and third stacks (and the
other way round). Prints JSON.

    python benchmarks/contrast_agreement.py [--out benchmarks/results/contrast_agreement.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from report import emit

REPO = Path(__file__).resolve().parents[1]
MRI = REPO.parent / "shared" / "data" / "mri"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    import numpy as np

    from medil_backend.evaluate_multistack import MOTIONS
    from medil_backend.geometry import Volume
    from medil_backend.intensity import fit_normalizer
    from medil_backend.io import read_volume
    from medil_backend.ops.multistack import MIN_CONTRAST_AGREEMENT, check_stacks, common_grid, contrast_agreement
    from medil_backend.simulate_stacks import orthogonal_stacks, rigid

    def agreement(vols: list[Volume]) -> list[float]:
        stacks = check_stacks(vols)
        host = [fit_normalizer(np.asarray(v.array, np.float32), "mri").forward(np.asarray(v.array, np.float32)) for v in vols]
        return [round(float(r), 3) for r in contrast_agreement(stacks, host, common_grid(stacks))]

    def stacks_of(truth: Volume, thick: int) -> list[Volume]:
        c = truth.grid.voxel_to_world(np.array([(np.array(truth.grid.shape) - 1) / 2.0]))[0]
        return orthogonal_stacks(truth, thick, [np.eye(4)] + [rigid(a, t, c) for a, t in MOTIONS], noise=0.01)

    t1 = read_volume(MRI / "mni152_2009a_t1_brain_1mm.nii.gz")
    gm = read_volume(MRI / "mni152_2009a_gm_1mm.nii.gz").array
    wm = read_volume(MRI / "mni152_2009a_wm_1mm.nii.gz").array
    csf = np.clip((t1.array > 0.05 * t1.array.max()) - gm - wm, 0, 1)
    t2 = Volume(((0.35 * wm + 0.6 * gm + 1.0 * csf) * 100).astype(np.float32), t1.affine, modality="mri")
    t1.modality = "mri"
    cases: list[dict] = []
    for thick in (4, 6):
        s1, s2 = stacks_of(t1, thick), stacks_of(t2, thick)
        cases += [
            {"pair": "T1 / T1", "volume": "mni152_2009a_t1_brain", "thick_mm": thick, "r": agreement(s1)},
            {"pair": "T2 / T2", "volume": "mni152_2009a tissue-map T2", "thick_mm": thick, "r": agreement(s2)},
            {"pair": "T1 / T2", "volume": "mni152_2009a", "thick_mm": thick, "r": agreement([s1[0], s2[1], s2[2]])},
            {"pair": "T2 / T1", "volume": "mni152_2009a", "thick_mm": thick, "r": agreement([s2[0], s1[1], s1[2]])},
        ]
        for name in ("pydeface_mean_head_t1", "colin27_t1_1mm"):
            head = read_volume(MRI / f"{name}.nii.gz")
            head.modality = "mri"
            cases.append({"pair": "T1 / T1", "volume": name, "thick_mm": thick, "r": agreement(stacks_of(head, thick))})
    same = [r for c in cases if c["pair"] in ("T1 / T1", "T2 / T2") for r in c["r"]]
    mixed = [r for c in cases if c["pair"] in ("T1 / T2", "T2 / T1") for r in c["r"]]
    result = {
        "benchmark": "contrast_agreement",
        "threshold": MIN_CONTRAST_AGREEMENT,
        "cases": cases,
        "one_contrast": [min(same), max(same)],
        "different_contrast": [min(mixed), max(mixed)],
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
