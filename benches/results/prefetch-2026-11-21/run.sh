set -uo pipefail
source scripts/gpu-env.sh
export YALIS_FIXTURES=$PWD/tests/fixtures
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv > $R/gpu.txt
timeout 120 .gpu/gpu-tests --ignored --test-threads=1 --nocapture l2_prefetch engine_matches matmul_matches fused_silu > $R/gpu-tests.txt 2>&1; echo "gpu-tests rc $?"
grep -E "test .* (ok|FAILED)|panicked" $R/gpu-tests.txt | head
timeout 150 env OUT=$R/fix scripts/gpu-multi-check.sh > $R/fix.txt 2>&1; echo "multi rc $?"; tail -8 $R/fix.txt
timeout 300 env OUT=$R/ab MB="24 0" BATCHES_8B=1 ITERS=2 benches/l2_prefetch.sh > $R/ab.txt 2>&1; echo "ab rc $?"
cd $OUT && tar czf ../x.tgz r && rm -rf r && mv ../x.tgz .
