#!/usr/bin/env bash
# (Kept with its results: the folded norm was reverted after this run. It needs a binary built
# from commit bfddb14, which had gemv_norm_bf16 and read YALIS_FUSE_NORM.)
# The folded norm (gemv_norm_bf16: a layer's residual add + RMSNorm inside the decode GEMV after
# it) A/B on one 4-GPU node (from the repository root, .gpu/ built by scripts/gpu-bundle.sh), in
# one job, folded (YALIS_FUSE_NORM=1, the default) then unfused (0) for each configuration:
#   - Llama-3.1-8B at TP 1, batch 1 and 8;
#   - Llama-3.1-70B dummy bf16 at TP 4, batch 1, 8, 32, 64 (the GEMV takes batches of up to 8;
#     32 and 64 run cuBLAS either way), with the NCCL all-reduce and with `auto` (NVRAR);
# input 1024, output 128. Every record carries the step / (weights at the copy rate + the step's
# all-reduces timed alone) ratio. Logs and JSONL go to $OUT (default
# benches/results/fuse-norm-<date>); ITERS sets the timed iterations (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu-env.sh
out=${OUT:-benches/results/fuse-norm-$(date +%F)}
mkdir -p "$out"
keep='^==|decode ms/step|decode reads|all-reduce of|error'
run() {  # tag, YALIS_FUSE_NORM, yalis arguments
    local tag=$1 fuse=$2
    shift 2
    YALIS_FUSE_NORM=$fuse .gpu/yalis --device cuda --input-len 1024 --output-len 128 --num-iters-warmup 1 \
        --num-iters "${ITERS:-2}" --output-json "$out/$tag-fuse$fuse.jsonl" "$@" 2>&1 |
        tee -a "$out/$tag-fuse$fuse.log" | grep -E "$keep"
}
for fuse in 1 0; do run llama8b-tp1 "$fuse" --model llama-8b --tp 1 --batch-size 1,8; done
for ar in ${ALLREDUCE:-nccl auto}; do
    for fuse in 1 0; do run "llama70b-tp4-$ar" "$fuse" --model llama-70b --tp 4 --allreduce "$ar" --batch-size 1,8,32,64; done
done
python3 - "$out" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
rows = {}
for path in sorted(glob.glob(f"{out}/*-fuse[01].jsonl")):
    tag, fuse = os.path.basename(path)[:-len(".jsonl")].rsplit("-fuse", 1)
    for line in open(path):
        r = json.loads(line)
        res = r["results"]
        bound = (res.get("all_reduce") or {}).get("step_over_bound")
        rows.setdefault((tag, r["config"]["batch_size"]), {})[fuse] = (res["decode_step_ms"]["p50"], bound)
print(f"{'config':22} {'batch':>5} {'folded ms':>10} {'unfolded':>10} {'unf/fold':>9} {'fold/bound':>11} {'unf/bound':>10}")
for (tag, b), v in sorted(rows.items()):
    if {"0", "1"} <= v.keys():
        f, u = v["1"], v["0"]
        fmt = lambda x: f"{x:.3f}" if x else "-"
        print(f"{tag:22} {b:>5} {f[0]:10.3f} {u[0]:10.3f} {u[0] / f[0]:8.3f}x {fmt(f[1]):>11} {fmt(u[1]):>10}")
PY
