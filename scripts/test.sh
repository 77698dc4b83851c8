#!/usr/bin/env bash
# The test suite that runs anywhere (no GPU): unit tests, the engine against the HF fixtures at
# every TP x PP layout, and the binary end to end. GPU-only suites are not part of it.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release --workspace "$@"
