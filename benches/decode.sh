#!/usr/bin/env bash
# Single-GPU benchmarks of the CUDA backend (issue "CUDA backend"), run on a GPU node from the
# repository root with the binary that scripts/gpu-bundle.sh put in .gpu/:
#   - Llama-3.1-8B dummy bf16, input 1024, output 128, batch 1, 8, 32, 64: decode ms per step and
#     achieved GB/s against the device-to-device copy measured in the same run;
#   - prefill of 1 x 2048 and 8 x 1024 tokens: TFLOP/s against an 8192^3 cuBLAS GEMM measured in
#     the same run;
#   - CUDA graphs on vs off; programmatic dependent launch on vs off (YALIS_PDL=0).
# Every run appends to $OUT/llama8b.jsonl (argv, revision, host, GPU, time with each record).
set -euo pipefail
source "$(dirname "$0")/../scripts/gpu-env.sh"
out=${OUT:-bench-logs}
mkdir -p "$out"
bin=${BIN:-.gpu/yalis}
json="$out/llama8b.jsonl"
run() { "$bin" --model llama-8b --device cuda --output-json "$json" "$@" 2>&1 | tee -a "$out/bench.log"; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$out/bench.log"
run --batch-size 1,8,32,64 --input-len 1024 --output-len 128 --num-iters-warmup 1 --num-iters 3
run --batch-size 1 --input-len 2048 --output-len 2 --num-iters-warmup 1 --num-iters 5
run --batch-size 8 --input-len 1024 --output-len 2 --num-iters-warmup 1 --num-iters 5
run --batch-size 1,8 --input-len 1024 --output-len 128 --num-iters-warmup 1 --num-iters 3 --cuda-graphs off
YALIS_PDL=0 run --batch-size 1,8 --input-len 1024 --output-len 128 --num-iters-warmup 1 --num-iters 3
