#!/usr/bin/env bash
# NVRAR's 32-bit epoch wrap-around, on one node of 2 or more GPUs, from the repository root with
# .gpu/ built by scripts/gpu-bundle.sh. `bench-allreduce` starts NVRAR's call counter just before
# 2^32 (--nvrar-start-epoch), so the wrap lands on the first call, on later odd-count calls, on
# the first call of a new size (lines never written before) and inside the timed calls; every
# call's output is checked against the reference sum and bench-allreduce exits non-zero on a
# wrong one. Each start runs as one node and as nodes of 1 (the inter-node LL path). BIN picks
# the binary (default .gpu/yalis), TP the GPUs (default 2); logs go to $OUT (or ./gpu-logs).
# Prints one line per run and exits non-zero if any run failed.
set -uo pipefail
source "$(dirname "$0")/gpu-env.sh"
out=${OUT:-gpu-logs}
mkdir -p "$out"
bin=${BIN:-.gpu/yalis}
fail=0
for start in 4294967295 4294967294 4294967293 4294967291 4294967270; do
    for layout in "" "--gpus-per-node 1"; do
        tag="start$start${layout:+-nodes-of-1}"
        if "$bin" bench-allreduce --tp "${TP:-2}" --backends nvrar --odd-counts 1,3,1001,65537 --sizes 8K,256K,2M \
            --iters 8 --reps 2 --nvrar-start-epoch "$start" $layout --comm-timeout 60 >"$out/$tag.log" 2>&1; then
            echo "$tag: ok"
        else
            echo "$tag: FAILED ($(grep -m1 -E 'wrong sums|^yalis: error' "$out/$tag.log"))"
            fail=1
        fi
    done
done
exit $fail
