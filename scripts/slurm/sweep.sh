#!/usr/bin/env bash
# Runs the batch-latency benchmark over TP x PP layouts and batch sizes, appending every record
# to one JSONL file (rank 0 of each run appends; nothing is overwritten). Inside a Slurm
# allocation each layout is one srun step of TP*PP tasks, GPUS_PER_NODE per node; elsewhere
# yalis starts its own ranks on this machine.
#
#   scripts/slurm/sweep.sh                                  # the tiny model on the CPU, 3 layouts
#   MODEL=llama-405b LAYOUTS="8x1 16x1 32x1 16x2" BATCHES=1,8,32 GPUS_PER_NODE=4 \
#       OUT=results/405b.jsonl scripts/slurm/sweep.sh       # inside an allocation (sbatch/salloc)
#   python3 scripts/plot_scaling.py results/405b.jsonl      # the plots
#
# Variables: YALIS (binary), MODEL, LAYOUTS ("TPxPP ..."), BATCHES (comma list), INPUT_LEN,
# OUTPUT_LEN, ITERS, WARMUP, OUT, GPUS_PER_NODE, SRUN_FLAGS (extra srun flags, e.g.
# "--gpu-bind=none"), EXTRA (extra yalis flags, e.g. "--allreduce nvrar"), SWEEP_LOCAL=1 (no
# srun even inside an allocation).
set -euo pipefail

YALIS=${YALIS:-$(dirname "$0")/../../target/release/yalis}
MODEL=${MODEL:-tiny}
LAYOUTS=${LAYOUTS:-"1x1 2x1 2x2"}
BATCHES=${BATCHES:-1,8}
INPUT_LEN=${INPUT_LEN:-32}
OUTPUT_LEN=${OUTPUT_LEN:-32}
ITERS=${ITERS:-5}
WARMUP=${WARMUP:-1}
OUT=${OUT:-sweep-$(date +%Y%m%d-%H%M%S).jsonl}
GPUS_PER_NODE=${GPUS_PER_NODE:-4}
SRUN_FLAGS=${SRUN_FLAGS:-}
EXTRA=${EXTRA:-}

if [[ ! -x "$YALIS" ]]; then
    echo "sweep: no $YALIS; build it (cargo build --release [--features cuda]) or set YALIS" >&2
    exit 1
fi
failed=()
for layout in $LAYOUTS; do
    tp=${layout%x*}
    pp=${layout#*x}
    if ! [[ "$tp" =~ ^[0-9]+$ && "$pp" =~ ^[0-9]+$ ]]; then
        echo "sweep: layout '$layout' is not TPxPP" >&2
        exit 1
    fi
    n=$((tp * pp))
    # shellcheck disable=SC2206 # EXTRA is a list of flags
    args=(--model "$MODEL" --tp "$tp" --pp "$pp" --batch-size "$BATCHES" --input-len "$INPUT_LEN"
        --output-len "$OUTPUT_LEN" --num-iters "$ITERS" --num-iters-warmup "$WARMUP" --output-json "$OUT" $EXTRA)
    echo "== sweep: $MODEL TP $tp x PP $pp ($n ranks), batch sizes $BATCHES" >&2
    if [[ -n "${SLURM_JOB_ID:-}" && "${SWEEP_LOCAL:-0}" != 1 ]]; then
        nodes=$(((n + GPUS_PER_NODE - 1) / GPUS_PER_NODE))
        per_node=$((n < GPUS_PER_NODE ? n : GPUS_PER_NODE))
        # shellcheck disable=SC2086 # SRUN_FLAGS is a list of flags
        cmd=(srun --nodes="$nodes" --ntasks="$n" --ntasks-per-node="$per_node" --kill-on-bad-exit=1 $SRUN_FLAGS
            "$YALIS" "${args[@]}")
    else
        cmd=("$YALIS" "${args[@]}")
    fi
    if ! "${cmd[@]}"; then
        echo "sweep: TP $tp x PP $pp failed; going on with the next layout" >&2
        failed+=("$layout")
    fi
done
echo "sweep: records appended to $OUT" >&2
if ((${#failed[@]})); then
    echo "sweep: failed layouts: ${failed[*]}" >&2
    exit 1
fi
