// The device half of examples/two_pe.rs: proves that nvshmemx_cumodule_init gave this module
// NVSHMEM's device state. Each PE puts its PE number into `slot` of the next PE of the ring.
// Built into a self-contained cubin (device-linked against libnvshmem_device.a): see two_pe.rs.
#include <nvshmem.h>

extern "C" __global__ void ring_put(int *slot /* [1] int, symmetric */) {
    int me = nvshmem_my_pe();
    nvshmem_int_p(slot, me, (me + 1) % nvshmem_n_pes());
}
