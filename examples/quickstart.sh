#!/usr/bin/env bash
# One command from a fresh clone: set up a virtual environment and run the main job —
# the bundled example (a real T1 scan with 3 mm slices, never trained on) super-resolved onto a 2 mm
# isotropic grid by `medil superres` (a network adapted to this scan, then data consistency; about
# 3 minutes on 2 CPU cores), next to SimpleITK B-spline on the same grid and a labelled PNG of both; then the gain
# over B-spline measured against a truth: 6 mm slices simulated from the example and super-resolved back (3 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install --quiet "torch==2.13.0"  # CPU build; use your CUDA build on a GPU machine
python -m pip install --quiet -e .
mkdir -p out
start=$(date +%s)
medil info examples/data/itk_t1_2x2x3mm.nii.gz
medil superres examples/data/itk_t1_2x2x3mm.nii.gz out/itk_t1_superres.nii.gz --overwrite
python examples/compare_with_bspline.py examples/data/itk_t1_2x2x3mm.nii.gz out/itk_t1_superres.nii.gz \
    out/itk_t1_bspline.nii.gz out/itk_t1_compare.png --measure 6 out/itk_t1_measured.png
echo
echo "done in $(( $(date +%s) - start )) s (after set-up):"
echo "  out/itk_t1_superres.nii.gz   MedIL super-resolution (AI-generated; provenance in out/itk_t1_superres.json)"
echo "  out/itk_t1_bspline.nii.gz    SimpleITK B-spline on the same grid"
echo "  out/itk_t1_compare.png       rows: input, B-spline, MedIL; columns: axial, coronal, sagittal, the detail where they differ"
echo "  out/itk_t1_measured.png      6 mm slices simulated from the example, super-resolved back: truth, input, B-spline, MedIL"
echo "next: . .venv/bin/activate   (then the medil command is on your PATH; see medil --help)"
