// NVRAR: the hierarchical recursive-doubling all-reduce of shared/DESIGN.md, in one kernel.
//
// The group is N nodes of G GPUs (PE of node n, local index i: the host's table; on one machine
// `--gpus-per-node` makes virtual nodes). A message of n elements is cut into 8-byte packs (4 bf16
// or f16, 2 f32) and the packs into G shards of S packs; GPU i of a node owns shard i.
//   1. reduce-scatter in the node: every GPU sends shard s of its input to GPU s, which sums the
//      G contributions in f32 in local-index order (so every node's result is the same bits);
//   2. recursive doubling among the GPUs of the same local index across nodes: at step s the
//      partner is the node at distance 2^s; both send their shard and add (a + b is commutative,
//      so both ends round the same value). Nodes beyond the largest power of two N2 <= N first
//      fold their shard into node (n - N2) and get the result back at the end;
//   3. all-gather in the node: the owner sends its finished shard to every GPU of the node.
//
// Across nodes (step 2) data travels as NCCL-"LL"-style lines: a 16-byte line is {data0, flag,
// data1, flag}, written with one 16-byte volatile store, and the flags are this call's epoch. A
// receiver polls the line itself until both flags equal the epoch (8-byte words are never torn),
// so there is no separate signal, fence or barrier, and no buffer is ever cleared: a stale line
// carries an older epoch (the buffers start zeroed and epoch 0 is never used: after 2^32 calls
// the 32-bit epoch wraps to 2, see next_epoch). Inside the node (steps 1 and 3) data goes plain, over NVLink, and each
// block then releases one flag per destination holding the epoch; the receiving block acquires
// it before reading (half the bytes of LL, one fence per block and phase). Every slot and flag
// exists twice (epoch parity). A GPU writes a parity-p slot of a peer again only in
// call e + 2, after it has received the peer's data of call e + 1, which the peer sent after its
// whole call-e kernel (and so every read of that slot) had finished: a fast rank can never
// overwrite data a slow peer has not read. The epoch lives on the device (ctrl[0]; the last block
// to finish a call advances it), so a call can be captured in a CUDA graph and replayed.
//
// Peers of the node are written through their NVLink addresses (nvshmem_ptr, found by the host).
// A recursive-doubling partner without such an address (another node) gets its lines by
// nvshmemx_putmem_nbi_warp from a staging slot of this PE's own symmetric buffer; the 8-byte words
// of a put arrive whole, which is all the LL check needs. `--nvrar-put` forces that path on one
// machine so that it is exercised there.
//
// One-shot (one node, small messages): instead of reduce-scatter + all-gather (two trips over
// NVLink), every GPU sends its whole input to every other GPU and each sums all G inputs in
// local-index order, so every GPU rounds the same value. Half the latency, G/2 times the bytes.
// The smallest messages go as LL lines (no fence, no block barrier); larger ones as plain data
// with one release flag per (block, source), half the bytes.
//
// Wide packs (`wide`, `--nvrar-pack-bytes 16`, one node only): the plain one-shot and the reduce-
// scatter / all-gather move 16-byte packs (8 bf16 or f16, 4 f32), one per thread: each load and
// store carries 16 bytes instead of 8, and a call needs half the threads (the host sizes the grid
// so). The LL paths (LL one-shot, recursive doubling, fold) are unchanged. Only for N == 1: with
// several nodes the recursive doubling reads the shard in `out` as 8-byte packs, each in the
// thread that stored it, and 16-byte packs would give pack 2q + 1 to another thread (another
// block, even) with no barrier between. With one node nothing but the plain phases touches the
// shard, so wide mode cuts the message into W = ceil(n / elements-per-16-bytes) packs and shards
// of SW = ceil(W / G) packs (its own shard boundaries, used by every GPU alike). Slots: a plain
// slot is addressed as a uint4 array, index < SW <= ceil(max_bytes / 16 / G) <= slot_lines (one-
// shot: < ceil(oneshot bytes / 16) <= os_lines), so 16-byte packs use at most half of a slot, as
// 8-byte packs do. `in`/`out` need only be 8-byte aligned: the kernel tests each pointer itself
// and, where one is not 16-byte aligned (or for the pack holding the end of the message), loads
// and stores it as two 8-byte packs with the same tail masks as `Pack`. The decision is per GPU
// and does not change which thread or block handles a pack, so GPUs whose buffers differ in
// alignment still agree on the grid and the flags. Sums are the same f32 additions in local-index
// order, rounded once: the same bits as 8-byte packs.
//
// Launch: grid = blocks (at most one wave: <= the SM count), block = threads (multiple of 32,
// <= 512), no dynamic shared memory. Block b, thread t handles packs j = (k * grid + b) * threads + t
// of every shard, in every phase (8-byte packs, or 16-byte ones in every phase of a wide call), so
// each dependency is within one thread. A thread that waits longer than `timeout_ns` for a line or
// flag prints which one and traps (the host sees a launch failure and ends the job).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <nvshmem.h>
#include <nvshmemx.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "common.cuh"

#define NVRAR_MAX_G 8
#define NVRAR_MAX_STEPS 16
// Flags per (parity, phase, source): one per block, so at most this many blocks.
#define NVRAR_FLAG_BLOCKS 256
#define NVRAR_PHASES 3

// Must match `NvrarArgs` in crates/yalis-cuda/src/nvrar.rs field for field (repr(C)).
struct NvrarArgs {
    const void *in;      // [n] elements, 8-byte aligned (16: wide calls use 16-byte accesses)
    void *out;           // [n] elements, 8-byte aligned; may equal `in`
    u64 n;               // elements
    uint4 *ll;           // this PE's LL buffer (symmetric): 2 parities x nslots x slot_lines lines
    u64 slot_lines;      // lines per slot (>= S)
    u64 local_peer[NVRAR_MAX_G];   // LL buffer of each GPU of the node, as this GPU addresses it
    u64 rd_peer[NVRAR_MAX_STEPS];  // LL buffer of the step-s partner, 0: through nvshmem puts
    int rd_pe[NVRAR_MAX_STEPS];    // its PE
    u64 fold_peer;       // LL buffer of the fold partner (node +- N2), 0: through puts
    int fold_pe;         // its PE (-1: none)
    int G, g;            // GPUs per node, this GPU's local index
    int N, node;         // nodes, this GPU's node
    int oneshot;         // one node, small message: 1 one-shot in LL lines, 2 one-shot plain (below)
    int wide;            // 1: the plain paths move 16-byte packs (one node only; ignored with N > 1)
    unsigned *ctrl;      // [2] device words, zeroed once: the last finished epoch, arrivals
    u64 timeout_ns;
    u64 os_lines;        // lines per one-shot slot (after the 2 parities of the main slots)
};
// `wide` takes 4 bytes and 4 of padding before `ctrl`: 360 bytes (the Rust side checks the same).
static_assert(sizeof(NvrarArgs) == 360, "NvrarArgs layout changed: update crates/yalis-cuda/src/nvrar.rs");
static_assert(offsetof(NvrarArgs, wide) == 328 && offsetof(NvrarArgs, ctrl) == 336, "NvrarArgs layout changed");

// Slots of one parity (each slot_lines lines). L = log2(N2).
__device__ __forceinline__ int slot_rs(int src) { return src; }
__device__ __forceinline__ int slot_rd(int G, int s) { return G + s; }
__device__ __forceinline__ int slot_fold_in(int G, int L) { return G + L; }
__device__ __forceinline__ int slot_fold_out(int G, int L) { return G + L + 1; }
__device__ __forceinline__ int slot_ag(int G, int L, int src) { return G + L + 2 + src; }
// Staging slots for puts: RD step s, fold in (L), fold out (L + 1).
__device__ __forceinline__ int slot_stage(int G, int L, int k) { return 2 * G + L + 2 + k; }
__device__ __forceinline__ int nslots(int G, int L) { return 2 * G + 2 * L + 4; }
// One-shot slots (one per source, os_lines lines each) follow the main slots of both parities.

__device__ __forceinline__ void st_line(uint4 *p, uint2 v, unsigned f) {
    asm volatile("st.volatile.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x), "r"(f), "r"(v.y), "r"(f)
                 : "memory");
}

__device__ __forceinline__ u64 now_ns() {
    u64 t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

struct Waiter {
    u64 start, timeout;
    const char *what;
};

// Polls the line until both flags are `f`; returns its 8 data bytes. Out of line: it is the slow
// path (the data was not there at the first look), and its timeout report is large.
__device__ __noinline__ uint2 ld_line(const uint4 *p, unsigned f, const Waiter &w, int from, u64 j) {
    uint4 x;
    unsigned spins = 0;
    while (true) {
        asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];"
                     : "=r"(x.x), "=r"(x.y), "=r"(x.z), "=r"(x.w)
                     : "l"(p)
                     : "memory");
        if (x.y == f && x.w == f) break;
        if ((++spins & 1023) == 0 && now_ns() - w.start > w.timeout) {
            printf("yalis nvrar: PE %d timed out after %llu ms waiting for %s data from peer %d (pack %llu, epoch %u, "
                   "line has %u/%u): a peer rank died, hung, or runs a different sequence of all-reduces\n",
                   nvshmem_my_pe(), (unsigned long long)(w.timeout / 1000000), w.what, from, (unsigned long long)j, f,
                   x.y, x.w);
            __trap();
        }
    }
    return make_uint2(x.x, x.z);
}

__device__ __forceinline__ uint4 ld_volatile(const uint4 *p) {
    uint4 x;
    asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(x.x), "=r"(x.y), "=r"(x.z), "=r"(x.w)
                 : "l"(p)
                 : "memory");
    return x;
}

// Line j of slot `s` (slot0 + s * slot_lines) for every source s != g: all loads are issued
// before any wait, then each late line is polled on its own.
__device__ __forceinline__ void ld_lines(uint2 (&v)[NVRAR_MAX_G], const uint4 *slot0, u64 slot_lines, u64 j, int G,
                                         int g, unsigned f, const Waiter &w) {
    uint4 x[NVRAR_MAX_G];
#pragma unroll
    for (int s = 0; s < NVRAR_MAX_G; s++)
        if (s < G && s != g) x[s] = ld_volatile(slot0 + s * slot_lines + j);
#pragma unroll
    for (int s = 0; s < NVRAR_MAX_G; s++) {
        if (s < G && s != g) {
            if (x[s].y != f || x[s].w != f) {
                const uint2 got = ld_line(slot0 + s * slot_lines + j, f, w, s, j);
                x[s].x = got.x;
                x[s].z = got.y;
            }
            v[s] = make_uint2(x[s].x, x[s].z);
        }
    }
}

__device__ __forceinline__ void st_release_sys(unsigned *p, unsigned v) {
    asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

// Waits until the flag is `f` (acquire: the data stored before its release is visible after).
__device__ __noinline__ void wait_flag(const unsigned *p, unsigned f, const Waiter &w, const char *what, int from) {
    unsigned spins = 0;
    while (true) {
        unsigned v;
        asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
        if (v == f) return;
        if ((++spins & 1023) == 0 && now_ns() - w.start > w.timeout) {
            printf("yalis nvrar: PE %d timed out after %llu ms waiting for the %s flag of local GPU %d (epoch %u, flag "
                   "%u): a peer rank died, hung, or runs a different sequence of all-reduces\n",
                   nvshmem_my_pe(), (unsigned long long)(w.timeout / 1000000), what, from, f, v);
            __trap();
        }
    }
}

// Element types as raw bits: 0 bf16, 1 f16, 2 f32.
template <int DT> struct Elem;
template <> struct Elem<0> {
    typedef unsigned short bits;
    static __device__ __forceinline__ float to_f(bits b) { return __uint_as_float((unsigned)b << 16); }
    static __device__ __forceinline__ bits from_f(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
};
template <> struct Elem<1> {
    typedef unsigned short bits;
    static __device__ __forceinline__ float to_f(bits b) { return __half2float(__ushort_as_half(b)); }
    static __device__ __forceinline__ bits from_f(float f) { return __half_as_ushort(__float2half_rn(f)); }
};
template <> struct Elem<2> {
    typedef unsigned bits;
    static __device__ __forceinline__ float to_f(bits b) { return __uint_as_float(b); }
    static __device__ __forceinline__ bits from_f(float f) { return __float_as_uint(f); }
};

// A raw vector U (uint2 or uint4) of E elements of type DT: added into f32 accumulators, and
// f32 accumulators rounded into one.
template <int DT, int E, class U> __device__ __forceinline__ void add_raw(float (&acc)[E], U u) {
    typename Elem<DT>::bits v[E];
    static_assert(sizeof(v) == sizeof(U), "E elements fill U");
    memcpy(v, &u, sizeof(U));
#pragma unroll
    for (int i = 0; i < E; i++) acc[i] += Elem<DT>::to_f(v[i]);
}
template <int DT, int E, class U> __device__ __forceinline__ U round_raw(const float (&acc)[E]) {
    typename Elem<DT>::bits v[E];
    static_assert(sizeof(v) == sizeof(U), "E elements fill U");
#pragma unroll
    for (int i = 0; i < E; i++) v[i] = Elem<DT>::from_f(acc[i]);
    U u;
    memcpy(&u, v, sizeof(U));
    return u;
}

template <int DT> struct Pack {
    typedef typename Elem<DT>::bits bits;
    static constexpr int E = 8 / sizeof(bits);
    // Pack p of x[0..n): elements beyond n read as zero.
    static __device__ __forceinline__ uint2 load(const void *x, u64 p, u64 n) {
        const bits *e = static_cast<const bits *>(x) + p * E;
        if ((p + 1) * E <= n) return *reinterpret_cast<const uint2 *>(e);
        bits v[E];
#pragma unroll
        for (int i = 0; i < E; i++) v[i] = p * E + i < n ? e[i] : bits(0);
        uint2 u;
        memcpy(&u, v, 8);
        return u;
    }
    static __device__ __forceinline__ void store(void *x, u64 p, u64 n, uint2 u) {
        bits *e = static_cast<bits *>(x) + p * E;
        if ((p + 1) * E <= n) {
            *reinterpret_cast<uint2 *>(e) = u;
            return;
        }
        bits v[E];
        memcpy(v, &u, 8);
#pragma unroll
        for (int i = 0; i < E; i++)
            if (p * E + i < n) e[i] = v[i];
    }
    static __device__ __forceinline__ void add(float (&acc)[E], uint2 u) { add_raw<DT, E>(acc, u); }
    static __device__ __forceinline__ uint2 round(const float (&acc)[E]) { return round_raw<DT, E, uint2>(acc); }
    // a + b in f32, rounded once (commutative: both ends of an exchange get the same bits).
    static __device__ __forceinline__ uint2 sum2(uint2 a, uint2 b) {
        float acc[E];
#pragma unroll
        for (int i = 0; i < E; i++) acc[i] = 0.f;
        add(acc, a);
        add(acc, b);
        return round(acc);
    }
};

// 16-byte packs of the plain paths (wide calls): pack q is the 8-byte packs 2q and 2q + 1.
template <int DT> struct Wide {
    typedef Pack<DT> P;
    typedef typename P::bits bits;
    static constexpr int E = 2 * P::E;
    // Pack q of x[0..n): elements beyond n read as zero. One 16-byte load where x is 16-byte
    // aligned and the pack is whole, else two 8-byte packs (masked at the end as Pack::load).
    static __device__ __forceinline__ uint4 load(const void *x, u64 q, u64 n, bool aligned) {
        if (aligned && (q + 1) * E <= n) return *reinterpret_cast<const uint4 *>(static_cast<const bits *>(x) + q * E);
        const uint2 lo = P::load(x, 2 * q, n), hi = P::load(x, 2 * q + 1, n);
        return make_uint4(lo.x, lo.y, hi.x, hi.y);
    }
    // Stores the elements of pack q below n (as Pack::store).
    static __device__ __forceinline__ void store(void *x, u64 q, u64 n, bool aligned, uint4 u) {
        if (aligned && (q + 1) * E <= n) {
            *reinterpret_cast<uint4 *>(static_cast<bits *>(x) + q * E) = u;
            return;
        }
        P::store(x, 2 * q, n, make_uint2(u.x, u.y));
        P::store(x, 2 * q + 1, n, make_uint2(u.z, u.w));
    }
    static __device__ __forceinline__ void add(float (&acc)[E], uint4 u) { add_raw<DT, E>(acc, u); }
    static __device__ __forceinline__ uint4 round(const float (&acc)[E]) { return round_raw<DT, E, uint4>(acc); }
};

// One LL line (pack j of a slot) to a peer: a direct store when the peer's buffer has an
// address here, else staged in this PE's own buffer and put by the warp (every lane of the warp
// calls this together; `ok` says whether this lane has a line).
struct Sender {
    uint4 *direct;   // the peer's slot (parity applied), or null
    uint4 *stage;    // this PE's staging slot
    uint4 *sym_dst;  // the slot's symmetric address (this PE's own), for the put
    int pe;
    u64 S;
    __device__ __forceinline__ void send(u64 j, bool ok, uint2 v, unsigned f) const {
        if (direct) {
            if (ok) st_line(direct + j, v, f);
            return;
        }
        if (ok) stage[j] = make_uint4(v.x, f, v.y, f);
        __syncwarp();
        u64 j0 = j - (threadIdx.x & 31);
        if (j0 < S) {
            u64 count = S - j0 < 32 ? S - j0 : 32;
            __threadfence();
            nvshmemx_putmem_nbi_warp(sym_dst + j0, stage + j0, count * sizeof(uint4), pe);
        }
    }
};

// The epoch after `last`. Lines and flags start zeroed, so epoch 0 would take a line or flag that
// was never written for one sent in this call: after 2^32 calls the counter wraps from
// 0xffffffff to 2, which keeps the parity alternating (slot reuse stays two calls apart).
// YALIS_NVRAR_SKIP_ZERO=0 builds the old wrap (to 0), for the test that shows the difference.
#ifndef YALIS_NVRAR_SKIP_ZERO
#define YALIS_NVRAR_SKIP_ZERO 1
#endif
__device__ __forceinline__ unsigned next_epoch(unsigned last) {
    const unsigned e = last + 1;
    return (YALIS_NVRAR_SKIP_ZERO && e == 0) ? 2u : e;
}

// The last block to finish makes epoch `e` the finished one (every block read it first).
__device__ __forceinline__ void finish(const NvrarArgs &a, unsigned e) {
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        if (atomicAdd(&a.ctrl[1], 1u) == gridDim.x - 1) {
            a.ctrl[1] = 0;
            *(volatile unsigned *)&a.ctrl[0] = e;
            __threadfence();
        }
    }
}

template <int DT> __device__ __forceinline__ void nvrar(const NvrarArgs &a) {
    typedef Pack<DT> P;
    typedef Wide<DT> W;
    const u64 packs = (a.n + P::E - 1) / P::E;
    const int G = a.G, g = a.g, N = a.N, node = a.node;
    const int L = 31 - __clz(N), N2 = 1 << L, extra = N - N2;
    const u64 S = (packs + G - 1) / G;
    const u64 first = (u64)blockIdx.x * blockDim.x;
    const u64 stride = (u64)gridDim.x * blockDim.x;

    __shared__ unsigned s_epoch;
    if (threadIdx.x == 0) s_epoch = next_epoch(*(volatile unsigned *)&a.ctrl[0]);
    __syncthreads();
    const unsigned e = s_epoch;
    const u64 parity = (u64)(e & 1) * nslots(G, L) * a.slot_lines;
    uint4 *const mine = a.ll + parity;
    auto slot = [&](uint4 *base, int i) { return base + (u64)i * a.slot_lines; };
    auto peer = [&](u64 addr) { return addr ? reinterpret_cast<uint4 *>(addr) + parity : nullptr; };
    auto valid = [&](int s, u64 j) { return j < S && (u64)s * S + j < packs; };
    Waiter w{now_ns(), a.timeout_ns, ""};
    // 16-byte packs in the plain paths (one node only: see the top of the file). Whether this
    // GPU's `in` / `out` take 16-byte accesses is its own business (it changes no thread's packs).
    const bool wide = a.wide && N == 1;
    const bool in16 = ((uintptr_t)a.in & 15) == 0, out16 = ((uintptr_t)a.out & 15) == 0;
    // Sum, in local-index order, of `own` (this GPU's pack) and line j of every other source's slot.
    auto sum_sources = [&](const uint4 *slot0, u64 lines, u64 j, uint2 own) {
        uint2 v[NVRAR_MAX_G];
        ld_lines(v, slot0, lines, j, G, g, e, w);
        float acc[P::E];
#pragma unroll
        for (int i = 0; i < P::E; i++) acc[i] = 0.f;
#pragma unroll
        for (int s = 0; s < NVRAR_MAX_G; s++)
            if (s < G) P::add(acc, s == g ? own : v[s]);
        return P::round(acc);
    };

    // Block flags of the node phases (after the one-shot slots): [parity][phase][source][block];
    // phases: 0 reduce-scatter, 1 all-gather, 2 plain one-shot.
    unsigned *const flags0 = reinterpret_cast<unsigned *>(a.ll + 2 * ((u64)nslots(G, L) * a.slot_lines + G * a.os_lines));
    auto flag = [&](unsigned *base, int phase, int src) {
        return base + ((u64)((e & 1) * NVRAR_PHASES + phase) * G + src) * NVRAR_FLAG_BLOCKS + blockIdx.x;
    };
    auto peer_flags = [&](int s) {
        return reinterpret_cast<unsigned *>(reinterpret_cast<uint4 *>(a.local_peer[s]) +
                                            2 * ((u64)nslots(G, L) * a.slot_lines + G * a.os_lines));
    };
    // After this block's data for a phase is stored to the node's GPUs: thread s tells GPU s.
    auto signal = [&](int phase) {
        __syncthreads();
        const int s = threadIdx.x;
        if (s < G && s != g) st_release_sys(flag(peer_flags(s), phase, g), e);
    };
    // Before this block reads a phase's data: thread s waits for GPU s's flag of this block.
    auto await = [&](int phase, const char *what) {
        const int s = threadIdx.x;
        if (s < G && s != g) wait_flag(flag(flags0, phase, s), e, w, what, s);
        __syncthreads();
    };
    // Pack j of source s's plain data in this GPU's slot `i` / in GPU d's.
    auto plain = [&](uint4 *base, int i) { return reinterpret_cast<uint2 *>(slot(base, i)); };

    if (a.oneshot) {
        // Every pack of the input to every GPU of the node, then the sum of all of them:
        // as LL lines (oneshot 1), or as plain data and a flag per block (oneshot 2).
        uint4 *const os = a.ll + 2 * (u64)nslots(G, L) * a.slot_lines;
        const u64 os_parity = (u64)(e & 1) * G * a.os_lines;
        auto os_peer = [&](int s) {
            return reinterpret_cast<uint4 *>(a.local_peer[s]) + 2 * (u64)nslots(G, L) * a.slot_lines + os_parity;
        };
        if (a.oneshot == 2 && wide) {
            // Plain, in 16-byte packs: the same steps as below.
            const u64 wpacks = (a.n + W::E - 1) / W::E;
            for (u64 q0 = first; q0 < wpacks; q0 += stride) {
                const u64 q = q0 + threadIdx.x;
                if (q >= wpacks) continue;
                const uint4 v = W::load(a.in, q, a.n, in16);
                for (int d = 1; d < G; d++) os_peer((g + d) % G)[(u64)g * a.os_lines + q] = v;
            }
            w.what = "one-shot";
            signal(2);
            await(2, "one-shot");
            for (u64 q0 = first; q0 < wpacks; q0 += stride) {
                const u64 q = q0 + threadIdx.x;
                if (q >= wpacks) continue;
                const uint4 own = W::load(a.in, q, a.n, in16);
                float acc[W::E];
#pragma unroll
                for (int i = 0; i < W::E; i++) acc[i] = 0.f;
                for (int s = 0; s < G; s++)
                    W::add(acc, s == g ? own : __ldcg(os + os_parity + (u64)s * a.os_lines + q));
                W::store(a.out, q, a.n, out16, W::round(acc));
            }
            finish(a, e);
            return;
        }
        const bool ll = a.oneshot == 1;
        for (u64 j0 = first; j0 < packs; j0 += stride) {
            const u64 j = j0 + threadIdx.x;
            if (j >= packs) continue;
            const uint2 v = P::load(a.in, j, a.n);
            for (int d = 1; d < G; d++) {
                uint4 *dst = os_peer((g + d) % G) + (u64)g * a.os_lines;
                if (ll)
                    st_line(dst + j, v, e);
                else
                    reinterpret_cast<uint2 *>(dst)[j] = v;
            }
        }
        w.what = "one-shot";
        if (!ll) {
            signal(2);
            await(2, "one-shot");
        }
        for (u64 j0 = first; j0 < packs; j0 += stride) {
            const u64 j = j0 + threadIdx.x;
            if (j >= packs) continue;
            const uint2 own = P::load(a.in, j, a.n);
            uint2 r;
            if (ll) {
                r = sum_sources(os + os_parity, a.os_lines, j, own);
            } else {
                float acc[P::E];
#pragma unroll
                for (int i = 0; i < P::E; i++) acc[i] = 0.f;
                for (int s = 0; s < G; s++)
                    P::add(acc, s == g ? own : __ldcg(reinterpret_cast<const uint2 *>(os + os_parity + (u64)s * a.os_lines) + j));
                r = P::round(acc);
            }
            P::store(a.out, j, a.n, r);
        }
        finish(a, e);
        return;
    }

    if (wide) {
        // One node in 16-byte packs: steps 1 and 3 below on wpacks packs in shards of SW.
        const u64 wpacks = (a.n + W::E - 1) / W::E;
        const u64 SW = (wpacks + G - 1) / G;
        auto wvalid = [&](int s, u64 q) { return q < SW && (u64)s * SW + q < wpacks; };
        if (G > 1) {
            for (u64 q0 = first; q0 < SW; q0 += stride) {
                const u64 q = q0 + threadIdx.x;
                for (int d = 1; d < G; d++) {
                    const int s = (g + d) % G;
                    if (wvalid(s, q)) slot(peer(a.local_peer[s]), slot_rs(g))[q] = W::load(a.in, s * SW + q, a.n, in16);
                }
            }
            signal(0);
            await(0, "reduce-scatter");
        }
        for (u64 q0 = first; q0 < SW; q0 += stride) {
            const u64 q = q0 + threadIdx.x;
            if (!wvalid(g, q)) continue;
            float acc[W::E];
#pragma unroll
            for (int i = 0; i < W::E; i++) acc[i] = 0.f;
            for (int s = 0; s < G; s++)
                W::add(acc, s == g ? W::load(a.in, g * SW + q, a.n, in16) : __ldcg(slot(mine, slot_rs(s)) + q));
            const uint4 r = W::round(acc);
            W::store(a.out, g * SW + q, a.n, out16, r);
            for (int d = 1; d < G; d++) slot(peer(a.local_peer[(g + d) % G]), slot_ag(G, L, g))[q] = r;
        }
        if (G > 1) {
            signal(1);
            await(1, "all-gather");
            for (u64 q0 = first; q0 < SW; q0 += stride) {
                const u64 q = q0 + threadIdx.x;
                for (int d = 1; d < G; d++) {
                    const int s = (g + d) % G;
                    if (wvalid(s, q)) W::store(a.out, s * SW + q, a.n, out16, __ldcg(slot(mine, slot_ag(G, L, s)) + q));
                }
            }
        }
        finish(a, e);
        return;
    }

    // 1. Reduce-scatter: shard s of the input to GPU s, as plain data, then a flag per block.
    if (G > 1) {
        for (u64 j0 = first; j0 < S; j0 += stride) {
            const u64 j = j0 + threadIdx.x;
            for (int d = 1; d < G; d++) {
                const int s = (g + d) % G;
                if (valid(s, j)) plain(peer(a.local_peer[s]), slot_rs(g))[j] = P::load(a.in, s * S + j, a.n);
            }
        }
        signal(0);
        await(0, "reduce-scatter");
    }
    for (u64 j0 = first; j0 < S; j0 += stride) {
        const u64 j = j0 + threadIdx.x;
        if (!valid(g, j)) continue;
        float acc[P::E];
#pragma unroll
        for (int i = 0; i < P::E; i++) acc[i] = 0.f;
        for (int s = 0; s < G; s++)
            P::add(acc, s == g ? P::load(a.in, g * S + j, a.n) : __ldcg(plain(mine, slot_rs(s)) + j));
        const uint2 r = P::round(acc);
        P::store(a.out, g * S + j, a.n, r);
        if (N == 1)  // one node: the all-gather data goes out as soon as a pack is summed
            for (int d = 1; d < G; d++) plain(peer(a.local_peer[(g + d) % G]), slot_ag(G, L, g))[j] = r;
    }

    // 2. Recursive doubling across nodes, on this GPU's shard (kept in `out` between steps).
    if (N > 1) {
        // Every exchange carries at least line 0, even when this GPU's shard is empty (tiny
        // messages): the slot-reuse argument needs every call to hear from every partner.
        auto dummy = [&](u64 j) { return j == 0 && !valid(g, 0); };
        auto receive = [&](int from_slot, int from, bool add, const char *what) {
            w.what = what;
            for (u64 j0 = first; j0 < S; j0 += stride) {
                const u64 j = j0 + threadIdx.x;
                if (!valid(g, j) && !dummy(j)) continue;
                const uint2 got = ld_line(slot(mine, from_slot) + j, e, w, from, j);
                if (dummy(j)) continue;
                P::store(a.out, g * S + j, a.n, add ? P::sum2(P::load(a.out, g * S + j, a.n), got) : got);
            }
        };
        // This GPU's shard to a peer's slot `dst_slot` (through staging slot `stage` if it has
        // no address here).
        auto send = [&](u64 addr, int pe, int dst_slot, int stage) {
            const Sender to{addr ? slot(peer(addr), dst_slot) : nullptr, slot(mine, slot_stage(G, L, stage)),
                            slot(mine, dst_slot), pe, S};
            for (u64 j0 = first; j0 < S; j0 += stride) {
                const u64 j = j0 + threadIdx.x;
                const bool ok = valid(g, j);
                to.send(j, ok || dummy(j), ok ? P::load(a.out, g * S + j, a.n) : make_uint2(0, 0), e);
            }
        };
        if (node >= N2) {
            // Folded: give the shard to node - N2, take the result back.
            send(a.fold_peer, a.fold_pe, slot_fold_in(G, L), L);
            receive(slot_fold_out(G, L), a.fold_pe, false, "fold-out");
        } else {
            if (node < extra) receive(slot_fold_in(G, L), a.fold_pe, true, "fold-in");
            for (int s = 0; s < L; s++) {
                send(a.rd_peer[s], a.rd_pe[s], slot_rd(G, s), s);
                receive(slot_rd(G, s), a.rd_pe[s], true, "recursive-doubling");
            }
            if (node < extra) send(a.fold_peer, a.fold_pe, slot_fold_out(G, L), L + 1);
        }
        // 3a. All-gather: the finished shard to every GPU of the node.
        for (u64 j0 = first; j0 < S && G > 1; j0 += stride) {
            const u64 j = j0 + threadIdx.x;
            if (!valid(g, j)) continue;
            const uint2 r = P::load(a.out, g * S + j, a.n);
            for (int d = 1; d < G; d++) plain(peer(a.local_peer[(g + d) % G]), slot_ag(G, L, g))[j] = r;
        }
    }

    // 3b. All-gather: every other shard from its owner.
    if (G > 1) {
        signal(1);
        await(1, "all-gather");
        for (u64 j0 = first; j0 < S; j0 += stride) {
            const u64 j = j0 + threadIdx.x;
            for (int d = 1; d < G; d++) {
                const int s = (g + d) % G;
                if (valid(s, j)) P::store(a.out, s * S + j, a.n, __ldcg(plain(mine, slot_ag(G, L, s)) + j));
            }
        }
    }
    finish(a, e);
}

// The next kernel may be scheduled now (its blocks wait in their own pdl_wait for this grid to
// finish and flush): the launch latency hides behind the all-reduce.
__device__ __forceinline__ void pdl_launch_dependents() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }

// nvrar_<type>(NvrarArgs): see the top of this file for the launch.
extern "C" __global__ void __launch_bounds__(512) nvrar_bf16(const NvrarArgs a) {
    pdl_wait();
    pdl_launch_dependents();
    nvrar<0>(a);
}
extern "C" __global__ void __launch_bounds__(512) nvrar_f16(const NvrarArgs a) {
    pdl_wait();
    pdl_launch_dependents();
    nvrar<1>(a);
}
extern "C" __global__ void __launch_bounds__(512) nvrar_f32(const NvrarArgs a) {
    pdl_wait();
    pdl_launch_dependents();
    nvrar<2>(a);
}
