// Shared device helpers of kernels/*.cu: warp and block reductions, a block-wide scan,
// 16-byte bf16 vector access with alignment checks, and the counter-based RNG of
// crates/yalis-core/src/rng.rs (bit-exact).
//
// Block helpers assume blockDim.x is a multiple of 32 (at most 1024) and that every thread of
// the block calls them (they synchronise). Each call starts with a barrier, so calls may follow
// one another without one in between.
#pragma once

#include <cuda_bf16.h>
#include <stdint.h>

// Programmatic dependent launch: the host launches kernels with programmatic stream
// serialization, so a kernel may start while the previous one drains; every kernel waits here
// for its predecessor's results before reading anything it wrote. A no-op without the attribute.
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }

typedef __nv_bfloat16 bf16;
typedef unsigned long long u64;

#define FULL_MASK 0xffffffffu

// ---------------------------------------------------------------------------------------------
// Warp reductions (all 32 lanes active; every lane gets the result).

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ u64 warp_sum(u64 v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ int warp_sum(int v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

__device__ __forceinline__ unsigned warp_max(unsigned v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

__device__ __forceinline__ unsigned warp_min(unsigned v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// (value, index) argmax: the larger value wins, equal values go to the lower index. A lane with
// nothing to offer passes (-inf, INT_MAX): any real candidate, -inf included, beats it.
struct ArgMax {
    float v;
    int i;
};

__device__ __forceinline__ ArgMax argmax_pick(ArgMax a, ArgMax b) {
    return (b.v > a.v || (b.v == a.v && b.i < a.i)) ? b : a;
}

__device__ __forceinline__ ArgMax warp_argmax(ArgMax a) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        ArgMax b = {__shfl_xor_sync(FULL_MASK, a.v, o), __shfl_xor_sync(FULL_MASK, a.i, o)};
        a = argmax_pick(a, b);
    }
    return a;
}

// ---------------------------------------------------------------------------------------------
// Block reductions: every thread gets the result.

__device__ __forceinline__ int warp_id() { return threadIdx.x >> 5; }
__device__ __forceinline__ int lane_id() { return threadIdx.x & 31; }
__device__ __forceinline__ int num_warps() { return (blockDim.x + 31) >> 5; }

template <class T, class Warp>
__device__ __forceinline__ T block_reduce(T v, T identity, Warp wop) {
    __shared__ T part[32];
    v = wop(v);
    __syncthreads();  // an earlier call may still be reading part[]
    if (lane_id() == 0) part[warp_id()] = v;
    __syncthreads();
    v = lane_id() < num_warps() ? part[lane_id()] : identity;
    return wop(v);
}

__device__ __forceinline__ float block_sum(float v) {
    return block_reduce(v, 0.0f, [](float x) { return warp_sum(x); });
}
__device__ __forceinline__ u64 block_sum(u64 v) {
    return block_reduce(v, 0ull, [](u64 x) { return warp_sum(x); });
}
__device__ __forceinline__ int block_sum(int v) {
    return block_reduce(v, 0, [](int x) { return warp_sum(x); });
}
__device__ __forceinline__ float block_max(float v) {
    return block_reduce(v, -INFINITY, [](float x) { return warp_max(x); });
}
__device__ __forceinline__ unsigned block_max(unsigned v) {
    return block_reduce(v, 0u, [](unsigned x) { return warp_max(x); });
}
__device__ __forceinline__ unsigned block_min(unsigned v) {
    return block_reduce(v, 0xffffffffu, [](unsigned x) { return warp_min(x); });
}

__device__ __forceinline__ ArgMax block_argmax(ArgMax a) {
    __shared__ ArgMax part[32];
    a = warp_argmax(a);
    __syncthreads();
    if (lane_id() == 0) part[warp_id()] = a;
    __syncthreads();
    a = lane_id() < num_warps() ? part[lane_id()] : ArgMax{-INFINITY, 0x7fffffff};
    return warp_argmax(a);
}

// Exclusive prefix sum over the block in thread order; *total gets the sum of all. Integer
// (u64) so that the result does not depend on the order of additions.
__device__ __forceinline__ u64 block_exclusive_scan(u64 v, u64* total) {
    __shared__ u64 part[32];
    const int lane = lane_id();
    u64 incl = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        u64 n = __shfl_up_sync(FULL_MASK, incl, o);
        if (lane >= o) incl += n;
    }
    __syncthreads();
    if (lane == 31) part[warp_id()] = incl;
    __syncthreads();
    u64 w = lane < num_warps() ? part[lane] : 0ull;
    u64 wincl = w;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        u64 n = __shfl_up_sync(FULL_MASK, wincl, o);
        if (lane >= o) wincl += n;
    }
    // wincl at lane j = sum of warps 0..j; warp k needs the sum of warps 0..k-1.
    u64 before = __shfl_sync(FULL_MASK, wincl - w, warp_id());
    *total = __shfl_sync(FULL_MASK, wincl, 31);
    return before + incl - v;
}

// ---------------------------------------------------------------------------------------------
// bf16 vectors: 8 bf16 = 16 bytes. Use only where aligned16() holds for every pointer involved
// and the element offsets are multiples of 8; otherwise fall back to scalar access.

__device__ __forceinline__ bool aligned16(const void* p) {
    return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// bf16 -> f32 is exact: the bf16 bits are the high half of the f32.
__device__ __forceinline__ float bf16_lo(unsigned u) { return __uint_as_float(u << 16); }
__device__ __forceinline__ float bf16_hi(unsigned u) { return __uint_as_float(u & 0xffff0000u); }

__device__ __forceinline__ void unpack8(uint4 u, float (&f)[8]) {
    f[0] = bf16_lo(u.x); f[1] = bf16_hi(u.x);
    f[2] = bf16_lo(u.y); f[3] = bf16_hi(u.y);
    f[4] = bf16_lo(u.z); f[5] = bf16_hi(u.z);
    f[6] = bf16_lo(u.w); f[7] = bf16_hi(u.w);
}

// Round to nearest even, once per element.
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&h);
}

__device__ __forceinline__ uint4 pack8(const float (&f)[8]) {
    return make_uint4(pack2(f[0], f[1]), pack2(f[2], f[3]), pack2(f[4], f[5]), pack2(f[6], f[7]));
}

__device__ __forceinline__ uint4 load8(const bf16* p) { return *reinterpret_cast<const uint4*>(p); }
__device__ __forceinline__ void store8(bf16* p, uint4 v) { *reinterpret_cast<uint4*>(p) = v; }

__device__ __forceinline__ void load8(const bf16* p, float (&f)[8]) { unpack8(load8(p), f); }
__device__ __forceinline__ void store8(bf16* p, const float (&f)[8]) { store8(p, pack8(f)); }

// Copies n bf16 from src to dst with the threads of the block (16-byte accesses when both are
// aligned).
__device__ __forceinline__ void block_copy_bf16(bf16* dst, const bf16* src, long long n) {
    long long start = 0;
    if (aligned16(dst) && aligned16(src)) {
        const long long nv = n >> 3;
        for (long long v = threadIdx.x; v < nv; v += blockDim.x) store8(dst + 8 * v, load8(src + 8 * v));
        start = nv << 3;
    }
    for (long long i = start + threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
}

// ---------------------------------------------------------------------------------------------
// The counter-based generator of crates/yalis-core/src/rng.rs, bit for bit.

// SplitMix64's finaliser (u64 arithmetic wraps).
__device__ __forceinline__ u64 mix64(u64 z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// The 24 bits behind uniform(): uniform = uniform_bits * 2^-24.
__device__ __forceinline__ unsigned uniform_bits(u64 key, u64 index) {
    return static_cast<unsigned>(mix64(key ^ mix64(index)) >> 40);
}

// Uniform in [0, 1): exact (a 24-bit integer times 2^-24).
__device__ __forceinline__ float uniform(u64 key, u64 index) {
    return static_cast<float>(uniform_bits(key, index)) * (1.0f / 16777216.0f);
}
