set -uo pipefail
source scripts/gpu-env.sh
export YALIS_FIXTURES=$PWD/tests/fixtures
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv > $R/gpu.txt
timeout 150 .gpu/gpu-tests --ignored --test-threads=1 --skip breakdown > $R/gpu-tests.txt 2>&1; echo "gpu-tests rc $?"
grep -E "test result|FAILED|panicked" $R/gpu-tests.txt | head
timeout 100 env OUT=$R/fix scripts/gpu-multi-check.sh > $R/fix.txt 2>&1; echo "multi nccl rc $?"; grep -c "agree with transformers" $R/fix.txt; grep -v "agree with transformers" $R/fix.txt | tail -3
timeout 100 env OUT=$R/fixnv ALLREDUCE=nvrar scripts/gpu-multi-check.sh > $R/fixnv.txt 2>&1; echo "multi nvrar rc $?"; grep -c "agree with transformers" $R/fixnv.txt; grep -v "agree with transformers" $R/fixnv.txt | tail -3
timeout 330 env OUT=$R/ab LABEL_A=early LABEL_B=base TP70=2 ALLREDUCE=nccl benches/binary_ab.sh > $R/ab.txt 2>&1; echo "ab rc $?"
sed -n '/^== llama8b-tp1$/,$p' $R/ab.txt
cd $OUT && tar czf ../x.tgz r && rm -rf r && mv ../x.tgz .
