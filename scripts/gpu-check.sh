#!/usr/bin/env bash
# The GPU correctness suite, run on a GPU node from the repository root after
# scripts/gpu-bundle.sh built .gpu/ here: every CUDA kernel against the CPU backend on random
# odd-sized inputs, GPU sampling against the CPU sampler, weight loading, and the bf16 engine
# on the HF fixtures (eager and with CUDA graphs). Logs go to $OUT (or ./gpu-logs).
set -euo pipefail
source "$(dirname "$0")/gpu-env.sh"
export YALIS_FIXTURES=$PWD/tests/fixtures
out=${OUT:-gpu-logs}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$out/gpu.txt"
.gpu/yalis info | tee -a "$out/gpu.txt"
.gpu/gpu-tests --ignored --test-threads=1 --nocapture 2>&1 | tee "$out/gpu-tests.log"
