#!/usr/bin/env bash
# L2 prefetch A/B on one 4-GPU node (from the repository root, .gpu/ built by
# scripts/gpu-bundle.sh), one job: each configuration with --l2-prefetch-mb at every value of MB
# (default "24 0"), one after the other:
#   - Llama-3.1-8B at TP 1, batch 1, 8, 32;
#   - Llama-3.1-70B dummy bf16 at TP 4, batch 1, 8, 32, 64, with ALLREDUCE (default nccl);
# input 1024, output 128. Then one A/B table per configuration (scripts/ab_table.py: latency,
# step, step over the weights-at-copy-rate + all-reduce bound). Logs and JSONL go to $OUT
# (default benches/results/prefetch-<date>); ITERS sets the timed iterations (default 2), EXTRA
# adds flags.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu-env.sh
out=${OUT:-benches/results/prefetch-$(date +%F)}
mkdir -p "$out"
mbs=${MB:-24 0}
keep='^==|decode ms/step|decode reads|all-reduce of|error'
run() {  # tag, MB, yalis arguments
    local tag=$1 mb=$2
    shift 2
    .gpu/yalis --device cuda --input-len "${INPUT:-1024}" --output-len "${OUTPUT:-128}" --num-iters-warmup 1 \
        --num-iters "${ITERS:-2}" --l2-prefetch-mb "$mb" ${EXTRA:-} --output-json "$out/$tag-pf$mb.jsonl" "$@" 2>&1 |
        tee -a "$out/$tag-pf$mb.log" | grep -E "$keep"
}
ar=${ALLREDUCE:-nccl}
for mb in $mbs; do run llama8b-tp1 "$mb" --model llama-8b --tp 1 --batch-size "${BATCHES_8B:-1,8,32}"; done
for mb in $mbs; do run "llama70b-tp4-$ar" "$mb" --model llama-70b --tp 4 --allreduce "$ar" --batch-size "${BATCHES:-1,8,32,64}"; done
for tag in llama8b-tp1 "llama70b-tp4-$ar"; do
    echo "== $tag"
    args=()
    for mb in $mbs; do args+=("pf$mb=$out/$tag-pf$mb.jsonl"); done
    python3 scripts/ab_table.py "${args[@]}"
done
