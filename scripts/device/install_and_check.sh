#!/usr/bin/env bash
# On the GPU machine, after the last part is in (append_part.sh): check the reassembled
# onnxruntime-gpu wheel against its sha256, install it, the small wheels the image lacks and
# clipedge itself into /tmp/site (offline), then run the GPU check (scripts/device/check.sh)
# with PYTHONPATH=/tmp/site, its results in $OUT.
#
#   bash scripts/device/append_part.sh 4 && bash scripts/device/install_and_check.sh
#   # carry: .device/parts/part-04, .device/meta, .device/deps, .device/photos
#
# Environment: PYTHON (default python3), OUT (the device tool's output folder; default
# $ORT_GPU_TMP/out), SITE (default /tmp/site), ORT_GPU_TMP (default /tmp/clipedge-ortgpu);
# CHECKPOINT_SIZE, BUDGET_S, BENCH, ENGINES go on to the check (check.sh has the defaults).
# INSTALL_ONLY=1 stops after the install.
# REHEARSE=1, on a machine without Python 3.12 or a GPU: the cp312 wheels are installed with
# pip's --python-version / --platform options into $SITE-cp312 (kept off PYTHONPATH: they
# cannot be imported there), clipedge into $SITE, and the check runs on the tiny checkpoint.
# Exit status: 4 when the wheel does not match (the parts to send again are named), 5 when
# the install fails, else the check's.
set -uo pipefail
cd "$(dirname "$0")/../.."

PYTHON="${PYTHON:-python3}"
DIR="${DEVICE_DIR:-.device}"
TARGET="${ORT_GPU_TMP:-/tmp/clipedge-ortgpu}"
SITE="${SITE:-/tmp/site}"
OUT="${OUT:-$TARGET/out}"
REHEARSE="${REHEARSE:-0}"
mkdir -p "$OUT" "$SITE"
exec 3>&1 4>&2 > >(tee -a "$OUT/install.log") 2>&1
started=$(date +%s)

# 1. The wheel, byte for byte.
wheel="$(cat "$DIR/meta/wheel.txt")"
total=$(awk -F'\t' '{s += $2} END {print s}' "$DIR/meta/parts.tsv")
have=$(stat -c %s "$TARGET/wheel.part" 2>/dev/null || echo 0)
[ "$have" -gt "$total" ] && truncate -s "$total" "$TARGET/wheel.part"
expected="$(cut -d' ' -f1 "$DIR/meta/wheel.sha256")"
actual="$(sha256sum "$TARGET/wheel.part" 2>/dev/null | cut -d' ' -f1)"
if [ "$actual" != "$expected" ]; then
  echo "wheel.part: $have of $total bytes, sha256 ${actual:-none}, expected $expected"
  while IFS=$'\t' read -r part size offset sha; do
    got="$(dd if="$TARGET/wheel.part" bs=4M iflag=skip_bytes,count_bytes skip="$offset" \
      count="$size" status=none 2>/dev/null | sha256sum | cut -d' ' -f1)"
    [ "$got" = "$sha" ] || echo "send again: ${part#part-} (append_part.sh ${part#part-})"
  done <"$DIR/meta/parts.tsv"
  exit 4
fi
ln -f "$TARGET/wheel.part" "$TARGET/$wheel"
echo "wheel OK: $wheel, $total bytes, sha256 $actual ($(($(date +%s) - started)) s)"

# 2. onnxruntime-gpu, then the small wheels whose import fails here (all of them when
# rehearsing, to try their install).
pip_install() { "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --upgrade \
  --disable-pip-version-check "$@"; }
if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
  # No pip there: a wheel is a zip of what goes into site-packages (these have no .data).
  echo "no pip: wheels unzipped with the standard library's zipfile"
  pip_install() {
    local target="" arg
    while [ $# -gt 0 ]; do
      arg="$1"
      shift
      case "$arg" in
        --target) target="$1" && shift ;;
        *.whl) "$PYTHON" -m zipfile -e "$arg" "$target" || return 1 ;;
      esac
    done
  }
fi
gpu_site="$SITE"
platform=()
if [ "$REHEARSE" = 1 ]; then
  gpu_site="$SITE-cp312"
  platform=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312
    --platform manylinux_2_28_x86_64)
fi
pip_install "${platform[@]}" --target "$gpu_site" "$TARGET/$wheel" || exit 5
deps=()
while IFS=$'\t' read -r module file why; do
  if [ "$REHEARSE" = 1 ] || ! "$PYTHON" -c "import $module" 2>/dev/null; then
    deps+=("$DIR/deps/$file")
    echo "installing $file ($why)"
  fi
done <"$DIR/meta/deps.txt"
if [ "${#deps[@]}" -gt 0 ]; then
  pip_install "${platform[@]}" --target "$gpu_site" "${deps[@]}" || exit 5
fi
echo "onnxruntime-gpu and ${#deps[@]} small wheels in $gpu_site ($(($(date +%s) - started)) s)"

# 3. clipedge from this checkout: a wheel built here with the image's setuptools, or where
# that cannot build it (setuptools < 77 reads no SPDX license string), the three source
# folders copied in as the package they map to (pyproject.toml's package-dir).
if "$PYTHON" -m pip install --quiet --no-build-isolation --no-deps --no-index --no-compile \
  --upgrade --disable-pip-version-check --target "$SITE" . 2>"$TARGET/clipedge-pip.err"; then
  echo "clipedge installed with pip (setuptools" \
    "$("$PYTHON" -c 'import setuptools; print(setuptools.__version__)'))"
else
  tail -3 "$TARGET/clipedge-pip.err"
  echo "pip could not build clipedge here: copying runtime/, export/, calibration/ instead"
  rm -rf "$SITE/clipedge"
  cp -r runtime "$SITE/clipedge"
  cp -r export "$SITE/clipedge/export"
  cp -r calibration "$SITE/clipedge/calibration"
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c "
import clipedge, onnxruntime
print('clipedge', clipedge.__version__, clipedge.__file__)
print('onnxruntime', onnxruntime.__version__, onnxruntime.__file__, onnxruntime.get_available_providers())
" || exit 5
echo "installed in $(($(date +%s) - started)) s"
[ "${INSTALL_ONLY:-0}" = 1 ] && exit 0

# 4. The check.
args=()
[ "$REHEARSE" = 1 ] && args=(--rehearse)
PYTHON="$PYTHON" OUT="$OUT" bash scripts/device/check.sh "${args[@]}" >&3 2>&4
