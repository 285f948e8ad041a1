#!/usr/bin/env bash
# Set up .venv and run the whole Spectrum pipeline on this machine: a small Qwen3 model and chat
# data are built in work/demo, S3 is an embedded moto server (or whatever AWS_ENDPOINT_URL points
# at), and the analysis and training jobs run in local mode. Extra arguments go to the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/spectrum-sm demo --workdir work/demo "$@"
