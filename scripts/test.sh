#!/usr/bin/env bash
# The project's one test command: builds its own virtual environment, installs everything the
# tests need (torch first, as the CPU build, so the [export] extra does not pull a CUDA build),
# then lints and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${CLIPEDGE_TEST_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# PyTorch's CPU wheel index gives the CPU build on any Linux machine (the default index would
# bring the multi-gigabyte CUDA build there); machines that see only a package mirror fall back
# to the default index within seconds.
"$VENV/bin/python" -m pip install --quiet --timeout 15 --retries 0 \
    --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0" 2>/dev/null \
  || { echo "PyTorch's CPU index failed: torch from the default index" >&2
       "$VENV/bin/python" -m pip install --quiet "torch==2.13.0"; }
"$VENV/bin/python" -m pip install --quiet -e ".[export,openvino,nncf,serve,batch,ray,dev,tensorrt-test]"

"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
"$VENV/bin/python" -m pytest -q "$@"
