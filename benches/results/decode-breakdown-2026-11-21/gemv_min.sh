#!/usr/bin/env bash
# (Kept with its results: the size threshold was not adopted. It needs a binary built from
# commit 540fbd2 with gemv-min-bytes.patch applied (the records say 540fbd2-dirty), which read YALIS_GEMV_MIN_BYTES.)
# GEMV or cuBLAS for small matrices, A/B on one 4-GPU node (from the repository root, .gpu/ built
# by scripts/gpu-bundle.sh), in one job: the default (plain matmuls with under 48 MiB of weights
# take cuBLAS at decode) against YALIS_GEMV_MIN_BYTES=0 (the decode GEMV for every size, as
# before), for Llama-3.1-70B dummy bf16 at TP 4 (NCCL) and Llama-3.1-8B at TP 1, batch 1 and 8,
# input 1024, output 128. Logs and JSONL go to $OUT (default benches/results/gemv-min-<date>).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu-env.sh
out=${OUT:-benches/results/gemv-min-$(date +%F)}
mkdir -p "$out"
run() {  # tag, YALIS_GEMV_MIN_BYTES (empty: the default), yalis arguments
    local tag=$1 min=$2
    shift 2
    env ${min:+YALIS_GEMV_MIN_BYTES=$min} .gpu/yalis --device cuda --input-len 1024 --output-len 128 \
        --num-iters-warmup 1 --num-iters "${ITERS:-2}" --batch-size 1,8 --output-json "$out/$tag-min${min:-default}.jsonl" "$@" \
        2>&1 | tee -a "$out/$tag-min${min:-default}.log" | grep -E "^==|decode ms/step|all-reduce of|error"
}
for min in "" 0; do run llama70b-tp4 "$min" --model llama-70b --tp 4 --allreduce nccl; done
for min in "" 0; do run llama8b-tp1 "$min" --model llama-8b --tp 1; done
python3 - "$out" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
rows = {}
for path in sorted(glob.glob(f"{out}/*-min*.jsonl")):
    tag, mode = os.path.basename(path)[:-len(".jsonl")].rsplit("-min", 1)
    for line in open(path):
        r = json.loads(line)["results"]
        b = json.loads(line)["config"]["batch_size"]
        rows.setdefault((tag, b), {})[mode] = (r["decode_step_ms"]["p50"], (r.get("all_reduce") or {}).get("step_over_bound"))
print(f"{'config':14} {'batch':>5} {'cuBLAS<48M':>11} {'GEMV all':>9} {'ratio':>7} {'bound x':>8}")
for (tag, b), v in sorted(rows.items()):
    if {"default", "0"} <= v.keys():
        d, z = v["default"], v["0"]
        print(f"{tag:14} {b:>5} {d[0]:11.3f} {z[0]:9.3f} {z[0] / d[0]:6.3f}x {d[1] or 0:8.3f}")
PY
