#!/usr/bin/env bash
# The GPU check as the lent GPU machine runs it: scripts/gpu_check.sh on the full-size random
# checkpoint (made there), every step under a time guard, the whole within BUDGET_S
# (default 470 s: under 8 minutes), results in $OUT (summary.md, check.log, pytest.log,
# bench_gpu.json / .md, gpu_mem.csv). install_and_check.sh calls it with PYTHONPATH set.
#
#   OUT=/path bash scripts/device/check.sh              # on the GPU machine
#   OUT=/path bash scripts/device/check.sh --rehearse   # here: tiny checkpoint, CPU
#
# --rehearse changes the checkpoint only; the provider is whatever onnxruntime has: CUDA
# there, the CPU here.
set -uo pipefail
cd "$(dirname "$0")/../.."

size=full
[ "${1:-}" = --rehearse ] && size=tiny
export PYTHON="${PYTHON:-python3}" OUT="${OUT:?set OUT to the results folder}"
export CHECKPOINT_SIZE="${CHECKPOINT_SIZE:-$size}" BUDGET_S="${BUDGET_S:-470}"
export WORK="${WORK:-/tmp/clipedge-gpu-check}"
# The carried photographs (fetch_ort_gpu.sh), for the int8 calibration and the GPU tests.
if compgen -G ".device/photos/*.jpg" >/dev/null; then
  export CALIBRATION_IMAGES="${CALIBRATION_IMAGES:-$PWD/.device/photos}"
  export CLIPEDGE_TEST_PHOTOS="${CLIPEDGE_TEST_PHOTOS:-$PWD/.device/photos}"
fi
exec bash scripts/gpu_check.sh
