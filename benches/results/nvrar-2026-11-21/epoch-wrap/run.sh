set -uo pipefail
source scripts/gpu-env.sh
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/gpu.txt
echo "== fixed (.gpu/yalis)"
timeout 240 env OUT=$R/fixed scripts/gpu-nvrar-wrap.sh; echo "rc $?"
echo "== old wrap to 0 (.gpu/yalis-wrap0)"
timeout 150 env OUT=$R/wrap0 BIN=.gpu/yalis-wrap0 scripts/gpu-nvrar-wrap.sh; echo "rc $?"
grep -h -E "odd element|^ *(8K|256K|2M) " $R/fixed/start4294967295.log | head -5
cd $OUT && tar czf ../x.tgz r && rm -rf r && mv ../x.tgz .
