#!/usr/bin/env bash
# Installs the pinned CUDA toolchain from PyPI into a project-local folder (no sudo, no system
# CUDA): nvcc 13.0 (matches the 580 driver), NVSHMEM 3.4.5 and NCCL 2.28 (match the GPU nodes).
# build.rs of crates/yalis-cuda finds nvcc there. Idempotent: a stamp file records the pin list.
# First run (timed once, 2-core machine, fast network): 6 s, 557 MB installed (libnccl.so.2: 218 MB).
#   scripts/setup-cuda.sh            # into .cuda/
#   YALIS_CUDA_DIR=/path scripts/setup-cuda.sh
set -euo pipefail
DIR="$(realpath -m "${YALIS_CUDA_DIR:-$(dirname "$0")/../.cuda}")"
PINS=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-crt==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-cccl==13.0.85
    nvidia-nvshmem-cu13==3.4.5
    nvidia-nccl-cu13==2.28.9
)
STAMP="$DIR/.yalis-cuda-pins"
NVCC="$DIR/nvidia/cu13/bin/nvcc"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "${PINS[*]}" ]] && "$NVCC" --version >/dev/null 2>&1; then
    echo "setup-cuda: pinned toolchain already in $DIR"
else
    echo "setup-cuda: installing ${PINS[*]} into $DIR"
    mkdir -p "$DIR"
    rm -f "$STAMP"
    # --upgrade replaces the top-level folders (nvidia/) of an earlier install wholesale.
    python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
        --only-binary=:all: --upgrade --target "$DIR" "${PINS[@]}"
fi

# cudarc opens libnccl.so; the wheel ships only libnccl.so.2.
for so2 in "$DIR"/nvidia/*/lib/libnccl.so.2; do
    if [[ -e "$so2" && ! -e "${so2%.2}" ]]; then ln -s libnccl.so.2 "${so2%.2}"; fi
done

probe="$(mktemp -d)"
trap 'rm -rf "$probe"' EXIT
cat >"$probe/probe.cu" <<'EOF'
#include <cuda_bf16.h>
extern "C" __global__ void probe(__nv_bfloat16 *x) { x[threadIdx.x] = __float2bfloat16(1.0f); }
EOF
"$NVCC" -gencode=arch=compute_90a,code=sm_90a -cubin -std=c++17 -o "$probe/probe.cubin" "$probe/probe.cu"
echo "${PINS[*]}" >"$STAMP"
echo "setup-cuda: ok: $("$NVCC" --version | grep release)"
echo "setup-cuda: nvcc is $NVCC"
echo "setup-cuda: NCCL and NVSHMEM libraries:" "$DIR"/nvidia/*/lib/libnccl.so "$DIR"/nvidia/*/lib/libnvshmem_host.so.3
