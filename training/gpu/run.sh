#!/usr/bin/env bash
# Run ON the GPU machine (device tool), from the repository root: start one recipe in the
# background under setsid with a wall-clock budget, and return at once (a device command runs 10
# minutes at most; the machine is held 30). Then call poll.sh until it says "finished".
#   bash training/gpu/run.sh RECIPE.yaml [MINUTES] [extra `medil train` overrides...]
set -euo pipefail
cd "$(dirname "$0")/../.."
RECIPE="$1"; MINUTES="${2:-22}"; shift $(( $# >= 2 ? 2 : 1 ))
PY="${PYTHON:-python3}"
NAME="$(basename "$RECIPE" .yaml)"
ROOT="runs/gpu/$NAME"
mkdir -p "$ROOT"
if ! "$PY" -c "import jsonargparse, docstring_parser" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --find-links .wheels "jsonargparse[signatures]" \
    || { echo "run.sh: jsonargparse is missing and .wheels/ has no wheels for it: run training/gpu/prepare.sh here and carry .wheels"; exit 1; }
fi
MAXTIME="$(printf '00:%02d:%02d:00' $((MINUTES / 60)) $((MINUTES % 60)))"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
setsid nohup "$PY" -m medil_backend train --config "$RECIPE" --trainer.max_time "$MAXTIME" \
  --trainer.default_root_dir "$ROOT" "$@" > "$ROOT/train.log" 2>&1 < /dev/null &
echo $! > "$ROOT/pid"
date +%s > "$ROOT/started"
echo "started $NAME (pid $(cat "$ROOT/pid")) with a budget of $MINUTES min; next: bash training/gpu/poll.sh $RECIPE"
