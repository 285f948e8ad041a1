#!/usr/bin/env bash
# Build .venv-image: the Python packages of the default training image (images/*.txt), for the
# tests that run our container-side entrypoints the way the image would (tests/test_image_env.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
PINS=images/huggingface-pytorch-training-gpu.txt
STAMP=.venv-image/pins.txt
# Rebuilt when the pins or this script change.
WANT="$(cat "$PINS" "$0")"
if [ -x .venv-image/bin/python ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$WANT" ]; then exit 0; fi
rm -rf .venv-image
"$PYTHON" -m venv .venv-image
.venv-image/bin/python -m pip install -q --upgrade pip >/dev/null
# torch first (this machine's CPU wheel), then the image's pins; boto3, pyyaml, tqdm, pyarrow
# and tokenizers come with the image too (their versions follow the pins' requirements;
# pyarrow 22+ needs numpy 2, so numpy<2 implies pyarrow<22 in the image as well).
.venv-image/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
.venv-image/bin/python -m pip install -q -r "$PINS" safetensors tokenizers pyyaml tqdm boto3 "pyarrow<22"
printf '%s' "$WANT" > "$STAMP"
