#!/usr/bin/env bash
# Rehearse the device calls here, on the CPU: each call gets a fresh copy of the working tree
# with only what that call carries (.device/meta and one part), as the device tool sends it;
# /tmp there is a scratch folder here. Also tries the failure paths: a part sent twice, a
# damaged part, a part before its predecessor. The last call installs with REHEARSE=1 (the
# cp312 wheels through pip's --python-version / --platform options) and runs the check on the
# tiny checkpoint with the CPU provider.
#
#   PYTHON=/work/main/.venv/bin/python bash scripts/device/rehearse.sh [SCRATCH]
#
# Run scripts/device/fetch_ort_gpu.sh first. SCRATCH defaults to /tmp/clipedge-rehearse
# (emptied first); the check's results land in SCRATCH/out.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO="$(pwd)"
SCRATCH="$(realpath -m "${1:-/tmp/clipedge-rehearse}")"
PYTHON="${PYTHON:-python3}"
rm -rf "$SCRATCH"
mkdir -p "$SCRATCH"
export ORT_GPU_TMP="$SCRATCH/tmp/clipedge-ortgpu" SITE="$SCRATCH/tmp/site"
export WORK="$SCRATCH/tmp/clipedge-gpu-check"
mapfile -t parts < <(cut -f1 .device/meta/parts.tsv)

# tree NAME PATH...: the working tree as a call sends it, plus the carried PATHs.
tree() {
  local dest="$SCRATCH/call-$1"
  shift
  mkdir -p "$dest"
  git ls-files -z -co --exclude-standard | tar -C "$REPO" --null -T - -cf - | tar -C "$dest" -xf -
  for path in "$@"; do
    mkdir -p "$dest/$(dirname "$path")"
    cp -r "$REPO/$path" "$dest/$path"
  done
  echo "$dest"
}
timed() { # timed LABEL COMMAND...: runs COMMAND, prints its exit status and seconds
  local label="$1" began rc
  shift
  began=$(date +%s.%N)
  "$@" && rc=0 || rc=$?
  echo "--- $label: exit $rc, $(awk "BEGIN {printf \"%.1f\", $(date +%s.%N) - $began}") s"
  return 0
}

last=$((${#parts[@]} - 1))
for n in $(seq 0 $((last - 1))); do
  dir="$(tree "$n" ".device/parts/${parts[$n]}" .device/meta)"
  timed "call $n: append_part.sh $n" bash "$dir/scripts/device/append_part.sh" "$n"
done

echo "--- failure paths"
dir="$(tree again .device/parts/part-01 .device/meta)"
timed "part 1 sent again (same bytes, same place)" bash "$dir/scripts/device/append_part.sh" 1
dir="$(tree damaged .device/parts/part-02 .device/meta)"
printf 'x' | dd of="$dir/.device/parts/part-02" bs=1 seek=1000 conv=notrunc status=none
timed "part 2 damaged in transfer (expect exit 3)" bash "$dir/scripts/device/append_part.sh" 2
dir="$(tree missing .device/meta)"
timed "part 3 not carried (expect exit 3)" bash "$dir/scripts/device/append_part.sh" 3
dir="$(tree early ".device/parts/${parts[$last]}" .device/meta)"
mv "$ORT_GPU_TMP/wheel.part" "$ORT_GPU_TMP/wheel.keep"
timed "part $last onto an empty /tmp (expect exit 2)" \
  bash "$dir/scripts/device/append_part.sh" "$last"
mv "$ORT_GPU_TMP/wheel.keep" "$ORT_GPU_TMP/wheel.part"

echo "--- call $last: the last part, install, check"
dir="$(tree "$last" ".device/parts/${parts[$last]}" .device/meta .device/deps .device/photos)"
timed "append_part.sh $last" bash "$dir/scripts/device/append_part.sh" "$last"
timed "install_and_check.sh (REHEARSE=1)" env REHEARSE=1 PYTHON="$PYTHON" OUT="$SCRATCH/out" \
  bash "$dir/scripts/device/install_and_check.sh"
echo "--- results in $SCRATCH/out:"
ls -l "$SCRATCH/out"
du -sh "$SITE" "$SITE-cp312" 2>/dev/null || true
