#!/usr/bin/env bash
# Builds, on this (CPU) machine, what a GPU node runs: the yalis binary with the CUDA backend and
# the GPU test binary, into .gpu/ (git-ignored; carry it to the GPU node).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-cuda.sh >/dev/null
cargo build --release --features cuda
tests=$(cargo test --release -p yalis-cuda --features yalis-cuda/kernels --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "gpu" and m.get("executable"):
        print(m["executable"])')
mkdir -p .gpu
cp target/release/yalis .gpu/yalis
cp "$tests" .gpu/gpu-tests
strip .gpu/yalis .gpu/gpu-tests  # line tables would double the size (64 MiB carry limit)
ls -la .gpu
