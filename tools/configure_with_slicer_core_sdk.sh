#!/usr/bin/env bash
# Try to configure the extension against the slicer-core-sdk wheel (PyPI) instead of a Slicer build tree,
# and say what is missing. Usage: bash tools/configure_with_slicer_core_sdk.sh [WORKDIR]
# (docs/slicer.md records the outcome: the SDK needs the vtk-sdk wheel, and it defines none of the
# scripted-module and extension-packaging macros a Slicer extension uses.)
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${1:-$(mktemp -d)}"
mkdir -p "$WORK/wheel" "$WORK/sdk" "$WORK/build"
python3 -m pip download --no-deps -q -d "$WORK/wheel" slicer-core-sdk || { echo "could not download slicer-core-sdk"; exit 1; }
python3 -m zipfile -e "$WORK"/wheel/slicer_core_sdk-*.whl "$WORK/sdk"
SDK="$WORK/sdk/slicer_core_sdk"
echo "== what a scripted Slicer extension needs, and whether the SDK defines it"
for name in Slicer_USE_FILE slicerMacroBuildScriptedModule Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR Slicer_EXTENSION_CPACK; do
  if grep -rqs "$name" "$SDK"; then echo "  $name: found"; else echo "  $name: MISSING"; fi
done
echo "== vtk-sdk (the VTK CMake package the SDK finds):"
python3 -m pip download --no-deps -q -d "$WORK/wheel" "vtk-sdk" >/dev/null 2>&1 && echo "  available" || echo "  MISSING from the package index"
echo "== cmake configure (last lines)"
cmake -S "$REPO" -B "$WORK/build" -DSlicer_DIR="$SDK/cmake" 2>&1 | tail -8
