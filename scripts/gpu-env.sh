# Sourced by the scripts that run on a GPU node: NVLink multicast stays off (it can take the
# host's GPUs out of service), and the node's cuBLAS and NCCL are found by the binary.
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
# NVSHMEM 3.4.5's host library and its plugins (the node's Python environment), for NVRAR.
for d in "${NVSHMEM_LIB:-}" /opt/torch/.venv/lib/python3.12/site-packages/nvidia/nvshmem/lib; do
    if [ -n "$d" ] && [ -f "$d/libnvshmem_host.so.3" ]; then export LD_LIBRARY_PATH=$d:$LD_LIBRARY_PATH; break; fi
done
