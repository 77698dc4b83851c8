#!/usr/bin/env bash
# Pipelined PP decode A/B on one 4-GPU node (from the repository root, .gpu/ built by
# scripts/gpu-bundle.sh): Llama-3.1-70B dummy bf16 at TP 2 x PP 2, batch 1, 8, 32, 64, input
# 1024, output 128, with --pp-microbatches 1 (each step runs through the stages in turn) and 2
# (two micro-batches, the stages work at once), one after the other in one job. Logs and JSONL go
# to $OUT (default benches/results/pp-<date>); ALLREDUCE picks the all-reduce (default nccl),
# EXTRA adds flags.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu-env.sh
out=${OUT:-benches/results/pp-$(date +%F)}
mkdir -p "$out"
for m in ${MICRO:-1 2}; do
    .gpu/yalis --model llama-70b --device cuda --tp 2 --pp 2 --pp-microbatches "$m" --allreduce "${ALLREDUCE:-nccl}" \
        --batch-size "${BATCHES:-1,8,32,64}" --input-len "${INPUT:-1024}" --output-len "${OUTPUT:-128}" \
        --num-iters-warmup 1 --num-iters "${ITERS:-2}" ${EXTRA:-} \
        --output-json "$out/llama70b-tp2pp2-mb$m.jsonl" 2>&1 | tee "$out/llama70b-tp2pp2-mb$m.log" |
        grep -E "^==|batch latency|decode ms|error"
done
args=()
for m in ${MICRO:-1 2}; do args+=("mb$m=$out/llama70b-tp2pp2-mb$m.jsonl"); done
python3 scripts/ab_table.py "${args[@]}"
