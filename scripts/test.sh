#!/usr/bin/env bash
# Set up .venv (and .venv-image, the training image's packages) and run the whole test suite
# (unit + integration; `gpu` tests skip without CUDA, `aws` tests only run with -m aws).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/image-env.sh
export SPECTRUM_SM_REQUIRE_IMAGE_ENV=1
exec .venv/bin/python -m pytest "$@"
