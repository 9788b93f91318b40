#!/usr/bin/env bash
# On the GPU machine, one call per part: write the carried part N into the wheel being
# reassembled under /tmp, at its own offset, after checking its sha256 (meta/parts.tsv).
#
#   bash scripts/device/append_part.sh N        # carry: .device/parts/part-0N, .device/meta
#
# Idempotent: re-running N rewrites the same bytes at the same place. Refuses (exit 2) when
# a part before N is missing there (the machine was given back and /tmp is empty: start again
# from part 0) and (exit 3) when the carried part is absent or damaged (re-run the call).
# Prints the size so far and which parts are in.
set -euo pipefail
cd "$(dirname "$0")/../.."

N="$(printf '%02d' "$((10#${1:?usage: append_part.sh N}))")"
DIR="${DEVICE_DIR:-.device}"
TARGET="${ORT_GPU_TMP:-/tmp/clipedge-ortgpu}"
part="$DIR/parts/part-$N"
mkdir -p "$TARGET"

line="$(grep -P "^part-$N\t" "$DIR/meta/parts.tsv")" || { echo "no part-$N in $DIR/meta/parts.tsv" >&2; exit 3; }
IFS=$'\t' read -r _ size offset sha <<<"$line"
[ -f "$part" ] || { echo "part-$N was not carried ($part missing)" >&2; exit 3; }
actual="$(sha256sum "$part" | cut -d' ' -f1)"
if [ "$(stat -c %s "$part")" != "$size" ] || [ "$actual" != "$sha" ]; then
  echo "part-$N damaged in transfer: $(stat -c %s "$part") bytes, sha256 $actual" >&2
  exit 3
fi
have=$(stat -c %s "$TARGET/wheel.part" 2>/dev/null || echo 0)
if [ "$have" -lt "$offset" ]; then
  echo "wheel.part has $have bytes, part-$N starts at $offset: an earlier part is missing" \
    "(machine given back?): run again from the first missing part" >&2
  exit 2
fi
dd if="$part" of="$TARGET/wheel.part" bs=4M oflag=seek_bytes seek="$offset" conv=notrunc \
  status=none
touch "$TARGET/in-$N"
echo "part-$N in: wheel.part $(stat -c %s "$TARGET/wheel.part") of $(awk -F'\t' '{s+=$2} END {print s}' "$DIR/meta/parts.tsv") bytes; parts in: $(cd "$TARGET" && ls in-* | sed 's/in-//' | tr '\n' ' ')"
