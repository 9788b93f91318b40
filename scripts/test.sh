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
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
"$VENV/bin/python" -m pip install --quiet -e ".[export,openvino,nncf,dev,tensorrt-test]"

"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
"$VENV/bin/python" -m pytest -q "$@"
