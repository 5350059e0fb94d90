#!/usr/bin/env bash
# Wheels the GPU machine lacks (it has no package index), fetched here into .gpu_wheels/ (git-
# ignored) for the device tool to carry; scripts/gpu_check.sh installs what it finds there.
#   bash scripts/fetch_gpu_wheels.sh        then: run(..., carry=[".gpu_wheels"])
# fla-core: flash-linear-attention's kernels (pure Python + Triton; needs the machine's PyTorch
# and Triton), the same-run peer of bench_ssm's SSD goal.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p .gpu_wheels
"$PY" -m pip download --no-deps --only-binary=:all: -d .gpu_wheels "fla-core==0.6.0"
ls -la .gpu_wheels
