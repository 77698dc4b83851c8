#!/usr/bin/env bash
# A/B of two yalis binaries (a kernel change needs a rebuild, so its variants are two builds) on
# one node of 4 GPUs (or 2, with TP70=2), from the repository root, one job: every configuration runs with binary A
# (default .gpu/yalis) then B (default .gpu/yalis-base):
#   - Llama-3.1-8B at TP 1, batch 1, 8, 32 (BATCHES_8B);
#   - Llama-3.1-70B dummy bf16 at TP 4 (TP70; 2 fits 2x H200), batch 1, 8, 32, 64 (BATCHES),
#     with each all-reduce of ALLREDUCE (default "nccl auto");
# input 1024, output 128; then one A/B table per configuration (scripts/ab_table.py: latency,
# step, step over the bound of weights at the copy rate + all-reduces timed alone, and A over
# B). Logs and JSONL go to $OUT (default benches/results/ab-<date>); ITERS sets the timed
# iterations (default 2), EXTRA adds flags, LABEL_A / LABEL_B name the variants.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu-env.sh
out=${OUT:-benches/results/ab-$(date +%F)}
mkdir -p "$out"
declare -A bin=([${LABEL_A:-a}]=${A:-.gpu/yalis} [${LABEL_B:-b}]=${B:-.gpu/yalis-base})
labels=("${LABEL_A:-a}" "${LABEL_B:-b}")
keep='^==|decode ms/step|all-reduce of|error'
run() {  # tag, label, yalis arguments
    local tag=$1 label=$2
    shift 2
    "${bin[$label]}" --device cuda --input-len "${INPUT:-1024}" --output-len "${OUTPUT:-128}" --num-iters-warmup 1 \
        --num-iters "${ITERS:-2}" ${EXTRA:-} --output-json "$out/$tag-$label.jsonl" "$@" 2>&1 |
        tee -a "$out/$tag-$label.log" | grep -E "$keep"
}
tags=()
if [ -n "${BATCHES_8B-1,8,32}" ]; then
    tags+=(llama8b-tp1)
    for l in "${labels[@]}"; do run llama8b-tp1 "$l" --model llama-8b --tp 1 --batch-size "${BATCHES_8B-1,8,32}"; done
fi
for ar in ${ALLREDUCE:-nccl auto}; do
    tp=${TP70:-4}
    tags+=("llama70b-tp$tp-$ar")
    for l in "${labels[@]}"; do
        run "llama70b-tp$tp-$ar" "$l" --model llama-70b --tp "$tp" --allreduce "$ar" --batch-size "${BATCHES:-1,8,32,64}"
    done
done
for tag in "${tags[@]}"; do
    echo "== $tag"
    python3 scripts/ab_table.py "${labels[0]}=$out/$tag-${labels[0]}.jsonl" "${labels[1]}=$out/$tag-${labels[1]}.jsonl"
done
