#!/usr/bin/env bash
# Vocab-parallel vs replicated LM head, Llama-3.1-70B dummy bf16 at TP 4 on 4x H200, batch 1 and
# 64: the decode step with each (issue "Distributed yalis": pick by measurement).
set -euo pipefail
source "$(dirname "$0")/../scripts/gpu-env.sh"
out=${OUT:-bench-logs}
mkdir -p "$out"
for head in vocab-parallel replicated; do
    echo "== LM head: $head"
    .gpu/yalis --model llama-70b --device cuda --tp 4 --lm-head "$head" --batch-size 1,64 --input-len 1024 \
        --output-len 64 --num-iters-warmup 1 --num-iters 3 --output-json "$out/lm-head.jsonl" 2>&1 |
        tee -a "$out/lm-head.log" | grep -E "^== |decode ms/step|decode reads|error"
done
