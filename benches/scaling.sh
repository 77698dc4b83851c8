#!/usr/bin/env bash
# Multi-GPU benchmarks on one 4x H200 node (issue "Distributed yalis"), from the repository root
# with .gpu/ built by scripts/gpu-bundle.sh:
#   - Llama-3.1-8B strong scaling at TP 1, 2, 4, batch 1 and 32, input 1024, output 128, plotted;
#   - Llama-3.1-70B dummy bf16 at TP 4 and TP 2 x PP 2, batch 1, 8, 32, 64: decode ms per step,
#     GB/s per GPU, and the NCCL all-reduce of each step timed alone on the same ranks.
set -euo pipefail
source "$(dirname "$0")/../scripts/gpu-env.sh"
out=${OUT:-bench-logs}
mkdir -p "$out"
bin=${BIN:-.gpu/yalis}
keep='^==|decode ms/step|prefill ms|decode reads|all-reduce of|roofline|error'
"$bin" --model llama-8b --device cuda --tp 1,2,4 --batch-size 1,32 --input-len 1024 --output-len 128 \
    --num-iters-warmup 1 --num-iters 3 --output-json "$out/llama8b-scaling.jsonl" 2>&1 | tee "$out/scaling.log" | grep -E "$keep"
"$bin" --model llama-70b --device cuda --tp 4 --pp 1 --batch-size 1,8,32,64 --input-len 1024 --output-len 128 \
    --num-iters-warmup 1 --num-iters 2 --output-json "$out/llama70b.jsonl" 2>&1 | tee -a "$out/scaling.log" | grep -E "$keep" || true
"$bin" --model llama-70b --device cuda --tp 2 --pp 2 --batch-size 1,8,32,64 --input-len 1024 --output-len 128 \
    --num-iters-warmup 1 --num-iters 2 --output-json "$out/llama70b.jsonl" 2>&1 | tee -a "$out/scaling.log" | grep -E "$keep"
python3 scripts/plot_scaling.py --out-dir "$out" "$out/llama8b-scaling.jsonl"
