#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU: build the TensorRT engines (where a builder
# is installed), verify every engine / precision against fp32 with batch invariance, run the
# GPU tests, then latency / throughput per tower, precision and batch size for native
# TensorRT, onnxruntime CUDA, onnxruntime TensorRT-EP and PyTorch fp16 (eager, torch.compile).
#
#   bash scripts/gpu_check.sh [BUNDLE] [CHECKPOINT]
#
# Without BUNDLE, the tiny test checkpoint is exported and calibrated (fp16, int8) into
# $WORK/bundle: every path runs, the timings mean little. For real figures pass a full-size
# bundle (benchmarks/make_random_checkpoint.py + clipedge export + clipedge calibrate) and its
# checkpoint. Installs nothing (a GPU machine may have no network): PYTHON must have clipedge
# with onnxruntime-gpu, TensorRT (`tensorrt` for engines for this GPU, or `tensorrt_rtx`),
# cuda-bindings and, for the PyTorch rows, a CUDA torch. Every step runs even if one before it
# failed; the exit status says whether any failed.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON="$(realpath "${PYTHON:-.venv/bin/python}")"
WORK="$(realpath -m "${WORK:-/tmp/clipedge-gpu-check}")"
BUNDLE="${1:+$(realpath "$1")}"
CHECKPOINT="$(realpath "${2:-tests/fixtures/jina-clip-v2-tiny/checkpoint}")"
mkdir -p "$WORK"
status=0
step() {
  echo "=== $* ($(date +%T))"
  "$@" || { echo "=== FAILED: $*"; status=1; }
}

nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv || true
"$PYTHON" - <<'EOF'
import importlib
for name in ("onnxruntime", "tensorrt", "tensorrt_rtx", "tensorrt_lean", "cuda.bindings", "torch"):
    try:
        module = importlib.import_module(name)
        print(f"{name}: {getattr(module, '__version__', '?')}")
    except Exception as exc:
        print(f"{name}: not available ({type(exc).__name__})")
import onnxruntime
print("onnxruntime providers:", onnxruntime.get_available_providers())
from clipedge.engine.tensorrt_backend import this_machine
print("clipedge sees:", this_machine())
EOF

if [ -z "$BUNDLE" ]; then
  BUNDLE="$WORK/bundle"
  rm -rf "$BUNDLE"
  step "$PYTHON" -m clipedge.cli export "$CHECKPOINT" -o "$BUNDLE" \
    --precisions fp16,int8 --calibration-images tests/fixtures/jina-clip-v2-tiny/expected/inputs \
    --calibration-texts tests/fixtures/calibration/captions.jsonl --allow-below-target
fi

# Engines: one tower at a time (peak memory of one tower), every precision, a timing cache.
for precision in fp32 fp16 int8; do
  for tower in text vision; do
    step "$PYTHON" -m clipedge.cli build-engine "$BUNDLE" --tower "$tower" \
      --precision "$precision" --timing-cache "$WORK/timing.cache" \
      --profiles "$([ "$tower" = text ] && echo 32x128,32x512,8x2048 || echo 1,32)"
  done
done
# Ahead-of-time engines for onnxruntime's TensorRT provider (fails without that provider).
step "$PYTHON" -m clipedge.cli build-engine "$BUNDLE" --ep-context --precision fp16 --tower vision

step "$PYTHON" -m clipedge.cli verify "$BUNDLE" --batch-size 8
step "$PYTHON" -m pytest -q -rs tests/test_tensorrt.py tests/test_gpu.py
step "$PYTHON" benchmarks/bench_gpu.py --bundle "$BUNDLE" --checkpoint "$CHECKPOINT" \
  --work "$WORK/bench" --out "$WORK/bench_gpu.json"
echo "results: $WORK/bench_gpu.json and .md; exit status $status"
exit $status
