#!/usr/bin/env bash
# Run HERE (a machine with registries), before a GPU session: build the data packs and fetch the
# wheels the GPU machine lacks (jsonargparse for LightningCLI). Both are git-ignored and travel
# with the device tool's `carry` (64 MiB in all, the repository included).
#   bash training/gpu/prepare.sh [DATA_DIR]        # DATA_DIR: build_data.py's --out (default data/)
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA="${1:-data}"
PY="${PYTHON:-python}"
if [ ! -f "$DATA/brain-train.json" ]; then
  "$PY" training/build_data.py --out "$DATA"
fi
"$PY" training/pack.py --data "$DATA" --out packs --lists brain-train brain-val ct-train ct-val tissue
mkdir -p .wheels
"$PY" -m pip download -q -d .wheels --only-binary :all: --python-version 3.12 --platform manylinux2014_x86_64 \
  --implementation cp "jsonargparse[signatures]>=4.27"
du -sh packs .wheels
git ls-files -z | xargs -0 du -cb | tail -1 | awk '{printf "repository: %.1f MB\n", $1 / 1048576}'
