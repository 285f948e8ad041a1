#!/usr/bin/env bash
# Set up .venv, build a small Qwen3-architecture model here (no Hub needed), and run the
# Spectrum scan on it: the SNR table and the 30% layer file land in work/demo/snr.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -c "
from spectrum_sm.toy import make_qwen3
make_qwen3('work/demo/model', layers=8, hidden=256, intermediate=704, vocab=4096, shard_size='2MB')
"
.venv/bin/spectrum-sm scan work/demo/model --top-percent 30 --output-dir work/demo/snr "$@"
