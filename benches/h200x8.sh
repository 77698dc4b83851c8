#!/usr/bin/env bash
# Issue 6's runs on one 8x H200 node (from the repository root, .gpu/ built by
# scripts/gpu-bundle.sh), in one job; logs and JSONL go to $OUT (default benches/results/x8-<date>):
#   1. all-reduce sweep 8 KB - 64 MB: NCCL; NVRAR as 1 node of 8, 2 virtual nodes of 4, 4 of 2;
#   2. Llama-3.1-405B dummy bf16 at TP 8, batch 1, 4, 16, 64, input 1024 / output 128 and input
#      128 / output 1024, with NCCL and with NVRAR;
#   3. Llama-3.1-70B at TP 8 and TP 4 x PP 2, batch 1 and 32 (strong scaling, with the 4-GPU
#      results of benches/scaling.sh), then scripts/plot_scaling.py.
# On a 4-GPU node the same script runs what fits there: GPUS=4 MODEL=llama-70b (the sweep as 1 node
# of 4, 2 of 2, 4 of 1; the model at TP 4). STEPS picks parts ("1 2 3"); SWEEP replaces the
# sweep's size flags (e.g. "--sizes 8K,1M --iters 10 --reps 3").
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu-env.sh
out=${OUT:-benches/results/x8-$(date +%F)}
mkdir -p "$out"
gpus=${GPUS:-$(nvidia-smi -L | wc -l)}
model=${MODEL:-llama-405b}
bin=.gpu/yalis
nvidia-smi topo -m > "$out/topo.txt" 2>&1 || true
for step in ${STEPS:-1 2 3}; do
    case $step in
    1)
        for g in "$gpus" $((gpus / 2)) $((gpus / 4)); do
            [ "$g" -ge 1 ] || continue
            "$bin" bench-allreduce --tp "$gpus" --gpus-per-node "$g" ${SWEEP:---min-bytes 8K --max-bytes 64M} \
                --output-json "$out/allreduce-${gpus}gpu-nodes-of-$g.jsonl" 2>&1 | tee "$out/allreduce-${gpus}gpu-nodes-of-$g.log"
        done
        ;;
    2)
        for ar in nccl nvrar; do
            for io in "1024 128" "128 1024"; do
                set -- $io
                "$bin" --model "$model" --device cuda --tp "$gpus" --allreduce "$ar" --batch-size 1,4,16,64 \
                    --input-len "$1" --output-len "$2" --num-iters-warmup 1 --num-iters "${ITERS:-2}" \
                    --output-json "$out/$model-tp$gpus-$ar.jsonl" 2>&1 | tee -a "$out/$model-tp$gpus-$ar.log" |
                    grep -E "^==|batch latency|decode ms|all-reduce|error"
            done
        done
        ;;
    3)
        for l in "$gpus 1" "$((gpus / 2)) 2"; do
            set -- $l
            "$bin" --model llama-70b --device cuda --tp "$1" --pp "$2" --batch-size 1,32 --input-len 1024 \
                --output-len 128 --num-iters-warmup 1 --num-iters "${ITERS:-2}" \
                --output-json "$out/llama70b-scaling.jsonl" 2>&1 | tee -a "$out/llama70b-scaling.log" |
                grep -E "^==|decode ms|error"
        done
        python3 scripts/plot_scaling.py --out-dir "$out" "$out/llama70b-scaling.jsonl"
        ;;
    esac
done
