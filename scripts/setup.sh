#!/usr/bin/env bash
# Create .venv with everything the project needs, from the project's own files.
# torch goes first, pinned to the CPU wheel this dev machine carries; the project itself asks only
# for torch>=2.4, so an existing CUDA build elsewhere is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e ".[dev]"
