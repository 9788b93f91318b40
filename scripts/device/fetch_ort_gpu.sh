#!/usr/bin/env bash
# Here (a machine that reaches PyPI): download onnxruntime-gpu for the GPU machine's image
# (CPython 3.12, x86_64, CUDA 13) and the small wheels it needs there, then cut the big wheel
# into parts small enough to carry, one per device call.
#
#   bash scripts/device/fetch_ort_gpu.sh            # -> .device/ (git-ignored)
#
# Writes under .device/:
#   onnxruntime_gpu-<version>-cp312-...whl  the wheel as PyPI serves it (never carried)
#   parts/part-00 ...                       50 MiB parts (`split -b 50M -d`), one per call
#   meta/wheel.txt                          the wheel's file name
#   meta/wheel.sha256                       `sha256sum` line of the whole wheel
#   meta/parts.tsv                          part, bytes, offset, sha256 (one line per part)
#   meta/deps.txt                           import name <TAB> wheel, and why each is carried
#   deps/*.whl                              those small wheels (1.9 MB), installed there only
#                                           where the import fails; carried by the last call
#   photos/*.jpg                            23 sample photographs (scikit-image's and
#                                           scikit-learn's, short side 512 px, 1.4 MB) for the
#                                           int8 calibration and the GPU tests there (the
#                                           image has no scikit-image); carried by the last call
# meta/ (a few kB) goes with every call: append_part.sh checks each part against it.
set -euo pipefail
cd "$(dirname "$0")/../.."

VERSION="${ORT_GPU_VERSION:-1.31.1}"
DIR="${DEVICE_DIR:-.device}"
PYTHON="${PYTHON:-python3}"
# Needs scikit-image and scikit-learn (the [dev] extra) for the photographs.
PHOTO_PYTHON="${PHOTO_PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
PART_SIZE=50M
rm -rf "$DIR/deps"
mkdir -p "$DIR/parts" "$DIR/meta" "$DIR/deps"

# The device image's platform: manylinux tags newest first; pip picks the best one it finds.
platforms=()
for tag in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 \
  manylinux_2_27 manylinux_2_17 manylinux2014; do
  platforms+=(--platform "${tag}_x86_64")
done
download() { # download DEST REQUIREMENT...
  local dest="$1"
  shift
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --abi cp312 --abi abi3 --abi none "${platforms[@]}" \
    --platform any -d "$dest" "$@"
}

start=$(date +%s)
download "$DIR" "onnxruntime-gpu==$VERSION"
wheel="$(cd "$DIR" && ls onnxruntime_gpu-"$VERSION"-cp312-*.whl | head -1)"
echo "wheel: $wheel ($(stat -c %s "$DIR/$wheel") bytes, $(($(date +%s) - start)) s)"

# What the wheel asks for. The image has numpy, protobuf (onnx), sympy (torch), packaging
# (onnxscript); flatbuffers is the one onnxruntime needs that no package there brings.
echo "Requires-Dist of $wheel:"
unzip -p "$DIR/$wheel" '*/METADATA' | grep '^Requires-Dist' | sed 's/^/  /'

# Small wheels for what the image may lack, each installed there only when its import fails
# (install_and_check.sh): onnxruntime's own needs, clipedge's (tqdm), and pytest for the
# GPU tests. Pure-Python wheels, pinned to the versions the project's own tests run with.
DEPS=(
  "flatbuffers	flatbuffers==25.12.19	onnxruntime-gpu: Requires-Dist, no image package brings it"
  "coloredlogs	coloredlogs==15.0.1	onnxruntime-gpu < 1.21 only (not listed by 1.31)"
  "humanfriendly	humanfriendly==10.0	coloredlogs' dependency"
  "tqdm	tqdm==4.70.1	clipedge: a dependency (progress bars)"
  "pytest	pytest==9.2.0	tests/test_gpu.py"
  "pluggy	pluggy==1.7.0	pytest's dependency"
  "iniconfig	iniconfig==2.3.1	pytest's dependency"
  "pygments	pygments==2.21.0	pytest's dependency"
  "packaging	packaging==26.4	pytest's and onnxruntime's dependency (the image has it via onnxscript)"
)
requires="$(unzip -p "$DIR/$wheel" '*/METADATA' | grep '^Requires-Dist' | sed 's/^Requires-Dist: *//')"
: >"$DIR/meta/deps.txt"
for entry in "${DEPS[@]}"; do
  IFS=$'\t' read -r module requirement why <<<"$entry"
  name="${requirement%%==*}"
  # coloredlogs and humanfriendly only where the wheel still asks for coloredlogs.
  if [ "$module" = coloredlogs ] || [ "$module" = humanfriendly ]; then
    grep -qi '^coloredlogs' <<<"$requires" || continue
  fi
  download "$DIR/deps" "$requirement"
  file="$(cd "$DIR/deps" && ls | grep -i "^${name//-/_}-" | head -1)"
  printf '%s\t%s\t%s\n' "$module" "$file" "$why" >>"$DIR/meta/deps.txt"
done
# Anything the wheel requires that is neither in the image's known set nor carried: say so.
# (Requirements behind an extra, e.g. the nvidia-* CUDA wheels of [cuda], are not installed.)
for requirement in $(grep -v 'extra *==' <<<"$requires" | sed 's/[ ;<>=!~(\[].*//' | tr 'A-Z' 'a-z'); do
  case "$requirement" in
    numpy | protobuf | sympy) ;;
    *) grep -qi "^${requirement}	" "$DIR/meta/deps.txt" \
      || echo "WARNING: $wheel requires $requirement, neither in the image nor carried" ;;
  esac
done
echo "carried small wheels ($(du -sh "$DIR/deps" | cut -f1)):"
sed 's/^/  /' "$DIR/meta/deps.txt"

# Parts: same names every time (old ones removed first), with sizes, offsets and hashes.
rm -f "$DIR"/parts/part-*
split -b "$PART_SIZE" -d "$DIR/$wheel" "$DIR/parts/part-"
echo "$wheel" >"$DIR/meta/wheel.txt"
(cd "$DIR" && sha256sum "$wheel") >"$DIR/meta/wheel.sha256"
offset=0
: >"$DIR/meta/parts.tsv"
for part in "$DIR"/parts/part-*; do
  size=$(stat -c %s "$part")
  printf '%s\t%s\t%s\t%s\n' "$(basename "$part")" "$size" "$offset" \
    "$(sha256sum "$part" | cut -d' ' -f1)" >>"$DIR/meta/parts.tsv"
  offset=$((offset + size))
done
[ "$offset" -eq "$(stat -c %s "$DIR/$wheel")" ] || { echo "parts do not add up" >&2; exit 1; }
echo "sha256: $(cut -d' ' -f1 "$DIR/meta/wheel.sha256")"
echo "parts (name, bytes, offset, sha256):"
sed 's/^/  /' "$DIR/meta/parts.tsv"
echo "meta/ to carry with every call: $(du -sb "$DIR/meta" | cut -f1) bytes; done in $(($(date +%s) - start)) s"

# Photographs: the pictures benchmarks/photos.py cuts its crops from, whole, as JPEG.
rm -rf "$DIR/photos"
mkdir -p "$DIR/photos"
"$PHOTO_PYTHON" - "$DIR/photos" <<'PY' || echo "WARNING: no photographs (needs scikit-image" \
  "and scikit-learn): calibration there uses the 5 fixture images"
import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, "benchmarks")
from photos import source_pictures  # noqa: E402

folder = Path(sys.argv[1])
for stem, picture in source_pictures().items():
    scale = 512 / min(picture.size)
    if scale < 1:
        size = (round(picture.width * scale), round(picture.height * scale))
        picture = picture.resize(size, Image.Resampling.LANCZOS)
    picture.save(folder / f"{stem}.jpg", quality=90)
PY
echo "photos: $(ls "$DIR/photos" | wc -l) in $DIR/photos ($(du -sh "$DIR/photos" | cut -f1))"
