#!/usr/bin/env bash
# Run ON the GPU machine after run.sh: wait (at most WAIT seconds, default 540) while the run goes
# on, print the log's tail, and copy what it has so far into $OUT (the device tool brings $OUT back:
# at most 8 files of 16 MiB): the exported weights and card, the best and last checkpoints, the
# metrics and the log. Prints "finished" once the run has ended.
#   bash training/gpu/poll.sh RECIPE.yaml [WAIT]
set -uo pipefail
cd "$(dirname "$0")/../.."
RECIPE="$1"; WAIT="${2:-540}"
NAME="$(basename "$RECIPE" .yaml)"
ROOT="runs/gpu/$NAME"
OUT="${OUT:-$ROOT/out}"
[ -f "$ROOT/pid" ] || { echo "poll.sh: $NAME was not started (run training/gpu/run.sh first)"; exit 1; }
PID="$(cat "$ROOT/pid")"
end=$(( $(date +%s) + WAIT ))
while kill -0 "$PID" 2>/dev/null && [ "$(date +%s)" -lt "$end" ]; do sleep 5; done
tail -n 15 "$ROOT/train.log"
mkdir -p "$OUT"
cp "$ROOT/train.log" "$OUT/" 2>/dev/null
newest() { find "$ROOT" -name "$1" -printf '%T@ %p\n' 2>/dev/null | sort -n | tail -1 | cut -d' ' -f2-; }
for pattern in metrics.csv last.ckpt; do f="$(newest "$pattern")"; [ -n "$f" ] && cp "$f" "$OUT/"; done
best="$(find "$ROOT" -name 'epoch=*.ckpt' -printf '%T@ %p\n' 2>/dev/null | sort -n | tail -1 | cut -d' ' -f2-)"
[ -n "$best" ] && cp "$best" "$OUT/best.ckpt"
for f in "$ROOT"/export/*.safetensors "$ROOT"/export/*.json; do [ -e "$f" ] && cp "$f" "$OUT/"; done
ls -la "$OUT"
if kill -0 "$PID" 2>/dev/null; then
  echo "running: $(( ($(date +%s) - $(cat "$ROOT/started")) / 60 )) min so far; poll again"
else
  echo "finished"
fi
