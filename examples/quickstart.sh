#!/usr/bin/env bash
# One command from a fresh clone: set up a virtual environment and run the main job —
# the bundled example (a real 2x2x3 mm T1 scan, never trained on) reconstructed onto a 1 mm grid.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install --quiet "torch==2.13.0"  # CPU build; use your CUDA build on a GPU machine
python -m pip install --quiet -e .
mkdir -p out
medil info examples/data/itk_t1_2x2x3mm.nii.gz
medil reconstruct examples/data/itk_t1_2x2x3mm.nii.gz out/itk_t1_1mm.nii.gz --spacing 1 --overwrite
medil info out/itk_t1_1mm.nii.gz
