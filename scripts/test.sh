#!/usr/bin/env bash
# Set up .venv and run the whole test suite (unit + integration; `gpu` tests skip without CUDA,
# `aws` tests only run with -m aws). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
