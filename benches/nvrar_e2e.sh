#!/usr/bin/env bash
# The end-to-end A/B on one 4-GPU node (from the repository root, .gpu/ built by
# scripts/gpu-bundle.sh): Llama-3.1-70B dummy bf16 at TP 4, batch 8, 16, 32, 64, input 128,
# output 1024 (decode-heavy), with the NCCL all-reduce and with NVRAR, one after the other in one
# job. Each configuration: WARMUP warm-up iterations (default 1; the first captures the decode
# graph) and ITERS timed ones (default 1: 1023 decode steps each). Logs and JSONL go to $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu-env.sh
out=${OUT:-benches/results/nvrar-$(date +%F)}
mkdir -p "$out"
for ar in ${BACKENDS:-nccl nvrar}; do
    .gpu/yalis --model llama-70b --device cuda --tp 4 --allreduce "$ar" --batch-size 8,16,32,64 \
        --input-len 128 --output-len 1024 --num-iters-warmup "${WARMUP:-1}" --num-iters "${ITERS:-1}" ${EXTRA:-} \
        --output-json "$out/llama70b-tp4-$ar.jsonl" 2>&1 | tee "$out/llama70b-tp4-$ar.log" |
        grep -E "^==|batch latency|decode ms|all-reduce|layout|error"
done
args=()
for ar in ${BACKENDS:-nccl nvrar}; do args+=("$ar=$out/llama70b-tp4-$ar.jsonl"); done
python3 scripts/ab_table.py "${args[@]}"
