#!/usr/bin/env bash
# The all-reduce A/B on one GPU node (from the repository root, .gpu/ built by
# scripts/gpu-bundle.sh): `yalis bench-allreduce` over 8 KB - 64 MB, NCCL and NVRAR on the same
# buffers in the same run, CUDA graphs on, every size checked against a reference sum first:
#   - NVRAR as one node of all the GPUs;
#   - NVRAR as virtual nodes of 2 GPUs (the inter-node recursive doubling runs between them);
#   - with 4 GPUs, virtual nodes of 1 (two doubling steps) and 3 GPUs as 3 nodes (folding).
# Logs and JSONL go to $OUT (default benches/results/nvrar-<date>). ITERS/REPS set the timing
# effort, EXTRA adds flags to every run (e.g. "--nvrar-threads 256"), GPUS=2 runs on 2 of the GPUs.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu-env.sh
out=${OUT:-benches/results/nvrar-$(date +%F)}
mkdir -p "$out"
bin=.gpu/yalis
gpus=${GPUS:-$(nvidia-smi -L | wc -l)}
common=(--min-bytes 8K --iters "${ITERS:-50}" --reps "${REPS:-10}" ${EXTRA:-})
run() {
    local name=$1; shift
    echo "### $name: $*" | tee -a "$out/$name.log"
    "$bin" bench-allreduce "${common[@]}" --output-json "$out/$name.jsonl" "$@" 2>&1 | tee -a "$out/$name.log"
}
run "allreduce-${gpus}gpu-1node" --tp "$gpus" --max-bytes "${MAX:-64M}"
run "allreduce-${gpus}gpu-nodes-of-2" --tp "$gpus" --gpus-per-node 2 --max-bytes "${MAX:-64M}"
if [ "${ALL:-1}" = 1 ] && [ "$gpus" -ge 4 ]; then
    run "allreduce-4gpu-nodes-of-1" --tp 4 --gpus-per-node 1 --backends nccl,nvrar --max-bytes 4M
    run "allreduce-3gpu-nodes-of-1" --tp 3 --gpus-per-node 1 --backends nccl,nvrar --max-bytes 4M
    run "allreduce-4gpu-nodes-of-2-put" --tp 4 --gpus-per-node 2 --nvrar-put --backends nccl,nvrar --max-bytes 4M
fi
