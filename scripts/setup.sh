#!/usr/bin/env bash
# Create .venv with everything the project needs, from the project's own files.
# torch goes first, pinned to the CPU wheel this dev machine carries; the project itself asks only
# for torch>=2.4, so an existing CUDA build elsewhere is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# pip's and the build backend's chatter goes to a log, shown only when something fails.
LOG=.venv/setup.log
: >"$LOG"
install() {
  if ! .venv/bin/python -m pip install -q "$@" >>"$LOG" 2>&1; then
    tail -n 40 "$LOG" >&2
    echo "setup: pip install $* failed (full log: $LOG)" >&2
    exit 1
  fi
}
echo "setup: installing into .venv (log: $LOG)" >&2
install --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || install "torch==${TORCH_VERSION:-2.13.0}"
install -e ".[dev]"
