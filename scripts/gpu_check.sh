#!/usr/bin/env bash
# The GPU check, one command for a machine with an NVIDIA GPU: build a bundle (fp32, then
# fp16 + int8 Q/DQ calibrated), run the GPU tests, `clipedge verify` (every engine / precision
# this machine runs against the fp32 CPU graph, with batch invariance), then the GPU
# benchmark: images/s and texts/s per tower, precision and batch size for onnxruntime CUDA,
# native TensorRT and onnxruntime's TensorRT provider (where TensorRT is installed) and
# PyTorch fp16 (eager, torch.compile), side by side, with the GPU memory each one held.
#
#   bash scripts/gpu_check.sh [BUNDLE [CHECKPOINT]]
#
# Without BUNDLE one is built in $WORK/bundle from the checkpoint CHECKPOINT_SIZE names:
#   tiny (default)  the test fixture's (tests/fixtures/jina-clip-v2-tiny/checkpoint): every path
#                   runs in about two minutes, the timings mean little (the CPU rehearsal);
#   full            benchmarks/make_random_checkpoint.py: real sizes, random weights (the GPU).
# With BUNDLE (already exported and calibrated), CHECKPOINT is the one for the PyTorch rows.
# On a machine without a GPU every step still runs: GPU tests and rows skip with their reason,
# verify runs the CPU provider. scripts/device/ runs this on the lent GPU machine.
#
# Environment:
#   PYTHON        interpreter with clipedge (default .venv/bin/python, else python3); the
#                 GPU rows need onnxruntime-gpu (cuda-bindings, TensorRT and a CUDA torch for
#                 the others). Installs nothing: a GPU machine may have no network.
#   WORK          scratch folder (default /tmp/clipedge-gpu-check; emptied first)
#   OUT           results (default $WORK/out), at most 7 files: summary.md (rewritten after
#                 every step, so a run cut short still reports), check.log, pytest.log,
#                 bench_gpu.json / .md (every engine merged), gpu_mem.csv (nvidia-smi samples)
#   BUDGET_S      the whole check's time in seconds, 0 = none (default). Every step runs
#                 under `timeout`: its own cap, cut to what is left, less what the steps
#                 after it are promised. A step that fails or times out does not stop the
#                 rest; the exit status says whether any failed.
#   TESTS         the GPU tests (default tests/test_gpu.py, and tests/test_tensorrt.py where
#                 TensorRT is installed)
#   BENCH         the benchmark, after $PYTHON (default: -m benchmarks.gpu)
#   ENGINES       benchmark engines (default: ort-cuda, then trt-native
#                 and ort-trt where TensorRT is installed, torch-eager-fp16,
#                 torch-compile-fp16)
#   CALIBRATION_IMAGES  images for the fp16 / int8 calibration (default: the 5 fixture
#                 images; scripts/device/ carries 23 photographs). Texts: the fixture captions.
#                 Always --allow-below-target (verify then judges each graph).
#   CALIBRATION_SEARCH  1: per-block float fallback where int8 misses its target (default
#                 for tiny), 0: --no-search, the whole tower int8 (default for full).
#   TOWERS        benchmark towers, each its own call per engine (default: text vision)
#   BENCH_ARGS    extra benchmark options (default none: batches 1,8,32, texts of 128 tokens)
set -uo pipefail
cd "$(dirname "$0")/.."
REPO="$(pwd)"

# -s: a virtual environment's python is a link to the base interpreter; keep the link.
resolve() { if [[ "$1" == */* ]]; then realpath -ms "$1"; else command -v "$1"; fi; }
PYTHON="$(resolve "${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}")"
WORK="$(realpath -m "${WORK:-/tmp/clipedge-gpu-check}")"
OUT="$(realpath -m "${OUT:-$WORK/out}")"
CHECKPOINT_SIZE="${CHECKPOINT_SIZE:-tiny}"
BUDGET_S="${BUDGET_S:-0}"
read -r -a BENCH_CMD <<<"${BENCH:--m benchmarks.gpu}"
read -r -a BENCH_EXTRA <<<"${BENCH_ARGS:-}"
BUNDLE="${1:+$(realpath "$1")}"
CHECKPOINT="${2:+$(realpath "$2")}"
FIXTURE="$REPO/tests/fixtures/jina-clip-v2-tiny"
CALIBRATION=(--calibration-images "${CALIBRATION_IMAGES:-$FIXTURE/expected/inputs}"
  --calibration-texts "$REPO/tests/fixtures/calibration/captions.jsonl" --allow-below-target)
# The per-block float fallback costs seconds on the tiny towers (whose vision int8 needs it)
# and up to 14 min on the full-size ones (whose int8 passes whole): off for those.
[ "${CALIBRATION_SEARCH:-$([ "$CHECKPOINT_SIZE" = full ] && echo 0 || echo 1)}" = 1 ] \
  || CALIBRATION+=(--no-search)

case "$WORK" in / | "$HOME" | "$REPO") echo "WORK=$WORK would be emptied: refused" >&2 && exit 2 ;; esac
rm -rf "$WORK"
mkdir -p "$WORK/logs" "$OUT"
: >"$WORK/steps.tsv"
exec > >(tee -a "$OUT/check.log") 2>&1
START=$(date +%s)
status=0
echo "=== GPU check $(date -Is): python $PYTHON, checkpoint ${CHECKPOINT:-$CHECKPOINT_SIZE}," \
  "budget ${BUDGET_S}s, results in $OUT"

summary() {
  "$PYTHON" "$REPO/scripts/device/summary.py" --work "$WORK" --out "$OUT" \
    >/dev/null 2>>"$WORK/logs/summary.err" || true
}

# step NAME CAP RESERVE COMMAND...: runs COMMAND under `timeout` for at most CAP seconds,
# and where there is a budget, at most what is left of it less RESERVE (promised to the steps
# after it; all that is left once the promise cannot be kept).
# Its output goes to the log and to $WORK/logs/NAME.log; a line goes to $WORK/steps.tsv.
step() {
  local name="$1" cap="$2" reserve="$3" limit rc began ended result
  shift 3
  limit="$cap"
  if [ "$BUDGET_S" -gt 0 ]; then
    local left=$((START + BUDGET_S - $(date +%s)))
    local share=$((left - reserve))
    # Too late to keep the promise: steps run in order of importance, this one comes first.
    [ "$share" -lt 5 ] && share="$left"
    [ "$share" -lt "$limit" ] && limit="$share"
  fi
  began=$(date +%s.%N)
  if [ "$limit" -lt 5 ]; then
    echo "=== $name: skipped, no time left of the budget"
    printf '%s\tskipped\t0\t%s\t%s\tno time left\n' "$name" "$began" "$began" >>"$WORK/steps.tsv"
    status=1
    summary
    return 1
  fi
  echo "=== $name ($(date +%T), limit ${limit}s): $*"
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$WORK/logs/$name.log"
  rc=${PIPESTATUS[0]}
  ended=$(date +%s.%N)
  case "$rc" in
    0) result=pass ;;
    124 | 137) result=timeout ;;
    *) result=FAIL ;;
  esac
  [ "$rc" -eq 0 ] || status=1
  printf '%s\t%s\t%s\t%s\t%s\texit %s, limit %ss\n' "$name" "$result" \
    "$(awk "BEGIN {print $ended - $began}")" "$began" "$ended" "$rc" "$limit" >>"$WORK/steps.tsv"
  echo "=== $name: $result in $(awk "BEGIN {printf \"%.0f\", $ended - $began}") s (exit $rc)"
  summary
  return "$rc"
}

# GPU memory, sampled every 0.5 s for the whole check (the summary takes each step's peak).
sampler=""
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv
  nvidia-smi --query-gpu=timestamp,memory.used,memory.total,utilization.gpu \
    --format=csv,nounits -lms 500 >"$OUT/gpu_mem.csv" 2>/dev/null &
  sampler=$!
fi
stop_sampler() { [ -n "$sampler" ] && kill "$sampler" 2>/dev/null; sampler=""; }
trap stop_sampler EXIT

step environment 60 0 "$PYTHON" - <<'EOF'
import importlib
import sys

print("python", sys.version.split()[0], sys.executable)
for name in ("clipedge", "onnxruntime", "torch", "tensorrt", "tensorrt_rtx", "cuda.bindings"):
    try:
        module = importlib.import_module(name)
        print(f"{name}: {getattr(module, '__version__', '?')} ({module.__file__})")
    except Exception as exc:
        print(f"{name}: not available ({type(exc).__name__}: {exc})")
import onnxruntime

print("onnxruntime providers:", onnxruntime.get_available_providers())
try:
    import torch

    print("torch CUDA:", torch.cuda.is_available(), torch.version.cuda)
except ImportError:
    pass
from clipedge.engine.tensorrt_backend import this_machine

print("clipedge sees:", this_machine())
EOF
HAVE_TRT=$("$PYTHON" -c "
from clipedge.engine.tensorrt_backend import this_machine
print(1 if this_machine().flavours else 0)" 2>/dev/null || echo 0)

# The GPU tests export the tiny bundle themselves: in the background, beside the CPU-bound
# export below (waited for before anything is timed on the GPU).
read -r -a tests <<<"${TESTS:-tests/test_gpu.py $([ "$HAVE_TRT" = 1 ] && echo tests/test_tensorrt.py)}"
(step gpu-tests 240 0 "$PYTHON" -m pytest -q -rs -p no:cacheprovider "${tests[@]}" \
  >"$OUT/pytest.log" 2>&1) &
tests_pid=$!

if [ -z "$BUNDLE" ]; then
  BUNDLE="$WORK/bundle"
  if [ -z "$CHECKPOINT" ] && [ "$CHECKPOINT_SIZE" = full ]; then
    CHECKPOINT="$WORK/checkpoint"
    step checkpoint 150 0 "$PYTHON" benchmarks/make_random_checkpoint.py "$CHECKPOINT" --seed 0
  fi
  CHECKPOINT="${CHECKPOINT:-$FIXTURE/checkpoint}"
  step export 240 0 "$PYTHON" -m clipedge.cli export "$CHECKPOINT" -o "$BUNDLE"
  # A calibration cut short leaves the fp32 bundle as it was (its graphs are staged).
  step calibrate 240 150 "$PYTHON" -m clipedge.cli calibrate "$BUNDLE" \
    --precisions fp16,int8 "${CALIBRATION[@]}"
fi

if [ "$HAVE_TRT" = 1 ]; then
  # Engines one tower at a time (peak memory of one tower), every precision, a timing cache.
  for precision in fp32 fp16 int8; do
    for tower in text vision; do
      step "engine-$tower-$precision" 300 150 "$PYTHON" -m clipedge.cli build-engine \
        "$BUNDLE" --tower "$tower" --precision "$precision" \
        --timing-cache "$WORK/timing.cache" \
        --profiles "$([ "$tower" = text ] && echo 32x128,32x512,8x2048 || echo 1,32)"
    done
  done
  # Ahead-of-time engines for onnxruntime's TensorRT provider.
  step engine-ep-context 300 150 "$PYTHON" -m clipedge.cli build-engine "$BUNDLE" \
    --ep-context --precision fp16 --tower vision
else
  echo "=== TensorRT engines: skipped, no TensorRT here"
fi

echo "=== waiting for the GPU tests ($(date +%T))"
wait "$tests_pid" || status=1
cat "$OUT/pytest.log"
summary

step verify 150 90 "$PYTHON" -m clipedge.cli verify "$BUNDLE" --batch-size 8

# The benchmark, one call per engine and tower into one work folder (cosines against ort-cuda
# fp32 of the same tower): a call cut short by its time guard loses only its own rows, and
# the GPU memory is per engine and tower. The summary merges them into bench_gpu.json / .md.
if [ -n "${ENGINES:-}" ]; then
  read -r -a engines <<<"${ENGINES//,/ }"
elif [ "$HAVE_TRT" = 1 ]; then
  engines=(ort-cuda trt-native ort-trt torch-eager-fp16 torch-compile-fp16)
else
  engines=(ort-cuda torch-eager-fp16 torch-compile-fp16)
fi
read -r -a towers <<<"${TOWERS:-text vision}"
calls=()
for engine in "${engines[@]}"; do
  for tower in "${towers[@]}"; do calls+=("$engine:$tower"); done
done
for i in "${!calls[@]}"; do
  engine="${calls[$i]%:*}" tower="${calls[$i]#*:}"
  rest=$(((${#calls[@]} - i - 1) * 20)) # promised to each call after this one
  step "bench-$engine-$tower" 300 "$rest" "$PYTHON" "${BENCH_CMD[@]}" --bundle "$BUNDLE" \
    ${CHECKPOINT:+--checkpoint "$CHECKPOINT"} --work "$WORK/bench" --engines "$engine" \
    --towers "$tower" --out "$WORK/bench-$engine-$tower.json" "${BENCH_EXTRA[@]}"
done

stop_sampler
summary
echo "=== done in $(($(date +%s) - START)) s, exit status $status; results in $OUT:"
ls -l "$OUT"
cat "$OUT/summary.md"
exit $status
