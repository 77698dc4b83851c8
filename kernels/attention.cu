// Attention kernels of yalis (bf16 in, f32 softmax/accumulation, bf16 out).
//
// Self-contained on purpose (no common.cuh): every helper lives in this file, in an anonymous
// namespace. The Rust side (crates/yalis-cuda/src/backend.rs, fn attention) launches these by
// name, so names, parameter order/types and launch shapes below are a contract.
//
// Layouts
//   qkv      bf16 [T, (q_heads + 2*kv_heads) * head_dim]   rows = [q heads | k heads | v heads]
//   k/v cache bf16 [slots, max_seq, kv_heads, head_dim]     (64-bit offsets everywhere)
//   GQA: query head h uses kv head h / (q_heads / kv_heads).
//   head_dim: even, <= 256. 16-byte loads are used when head_dim % 8 == 0 and the base pointers
//   are 16-byte aligned; otherwise 4-byte (bf16 pair) loads.
//
// Kernels
//   attn_decode_partial_bf16   grid (num_splits, kv_heads, S), block 128, no dynamic smem
//   attn_decode_combine_bf16   grid (q_heads, S),              block 128, no dynamic smem
//   attn_prefill_bf16          grid (ceil(T/4), q_heads),      block 128, no dynamic smem
//   attn_prefill_mma_bf16      grid (ceil(T/64), q_heads),     block 128, dynamic smem
//                              69,632 bytes (36,864 suffice for head_dim <= 64); needs
//                              cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES) (see below)

#include <cuda_bf16.h>
#include <stdint.h>

// Programmatic dependent launch (see kernels/common.cuh, which this file does not include).
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }

typedef __nv_bfloat16 bf16;

namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ------------------------------------------------------------------------------------------
// Small helpers
// ------------------------------------------------------------------------------------------

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// 2^x; ex2.approx(-inf) = +0, which the online softmax relies on.
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ uint32_t comp(const uint4& v, int k) {
    return k == 0 ? v.x : (k == 1 ? v.y : (k == 2 ? v.z : v.w));
}

__device__ __forceinline__ float bf_lo(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf_hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }

// Two floats -> packed bf16x2 (lo in the low half), round to nearest even.
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    uint32_t r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// Streaming 16-byte load (read-only for the kernel's lifetime; do not allocate in L1).
__device__ __forceinline__ uint4 ldg_stream16(const void* p) {
    uint4 r;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
        : "l"(p));
    return r;
}

// Cached (L1-allocating) read-only loads: data several warps of a block read.
__device__ __forceinline__ uint4 ldg16(const void* p) {
    return __ldg(reinterpret_cast<const uint4*>(p));
}

__device__ __forceinline__ uint32_t ldg4(const void* p) {
    return __ldg(reinterpret_cast<const unsigned int*>(p));
}

// 8 consecutive bf16 starting at row[d0] as a uint4, zero beyond hd. hd and d0 are even.
// VEC: hd % 8 == 0, d0 % 8 == 0 and the row is 16-byte aligned (so d0 < hd covers all 8).
template <bool VEC, bool STREAM>
__device__ __forceinline__ uint4 load8(const bf16* row, int d0, int hd) {
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (VEC) {
        if (d0 < hd) v = STREAM ? ldg_stream16(row + d0) : ldg16(row + d0);
    } else {
        // 4-byte pieces: the same sectors are read by 4 instructions, so let L1 keep them.
        if (d0 + 0 < hd) v.x = ldg4(row + d0 + 0);
        if (d0 + 2 < hd) v.y = ldg4(row + d0 + 2);
        if (d0 + 4 < hd) v.z = ldg4(row + d0 + 4);
        if (d0 + 6 < hd) v.w = ldg4(row + d0 + 6);
    }
    return v;
}

// D += A * B, m16n8k16, bf16 inputs, f32 accumulators.
__device__ __forceinline__ void mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t& r0, uint32_t& r1,
                                            uint32_t& r2, uint32_t& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t addr, uint32_t& r0, uint32_t& r1,
                                                  uint32_t& r2, uint32_t& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}

// 16-byte cp.async; src_bytes = 0 zero-fills the destination without reading src.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src),
                 "r"(src_bytes)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;" ::: "memory");
}
__device__ __forceinline__ void cp_async_wait1() {
    asm volatile("cp.async.wait_group 1;" ::: "memory");
}

__device__ __forceinline__ bool aligned16(const void* p) {
    return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// ------------------------------------------------------------------------------------------
// 1. Decode: partial attention over one split of the KV length, all query heads of a KV group.
// ------------------------------------------------------------------------------------------
//
// Block (split, g, s), 4 warps. The query heads of group g are processed in chunks of 16 (the
// M dimension of mma.m16n8k16; rows past the group are zero). Each warp streams its own
// chunks of 16*NSUB positions of the split (warp w takes start + 16*NSUB*(w + 4i) onwards;
// NSUB = 2 for head_dim <= 64, else 1, i.e. 8 KB of K+V loads in flight per warp at
// head_dim 64/128), keeps its own online-softmax state (m, l, O) for the 16 heads, and the 4
// warps are merged through shared memory at the end. Heads of a group beyond 16 re-stream
// the split (from L2) per chunk of 16.
//
// Tensor-core fragments straight from global memory (no shared-memory staging of K/V):
//  * S = Q K^T. The head_dim (reduction) index may be permuted freely as long as Q and K agree:
//    lane (r = lane/4, c = lane%4) loads 16 bytes K[p0 + 8j + r][32kc + 8c .. +7]; for k-step
//    ks (0/1) of the 32-wide chunk kc its B fragment is {x,y} (ks 0) or {z,w} (ks 1). Q's A
//    fragment uses the same map (taken from shared memory, layout [kc][16 heads][32]).
//  * O += P V. P's C->A fragment reuse gives k = position p0 + k. The O column (n) index may be
//    permuted too: n-tile nt of 64-wide chunk dc, column n <-> d = 64dc + 8n + nt. Then lane
//    (r, c) needs V[p0 + {2c, 2c+1, 2c+8, 2c+9}][64dc + 8r .. +7]: four 16-byte loads per
//    chunk, repacked into bf16 pairs with byte permutes. In O's C fragment the lane holds
//    d = 64dc + 16c + (0..15) for heads r and r+8.
// head_dim > 128 is done in two passes over d (S recomputed per pass) to bound registers.

constexpr int kDecWarps = 4;
constexpr int kDecOCols = 128;                    // O columns per pass held in shared memory
constexpr int kDecQElems = 8 * 16 * 32;           // [kc<8][16][32] bf16 = 8 KB
constexpr int kDecOElems = kDecWarps * 16 * kDecOCols;  // f32, 32 KB

// Swizzled float4 unit inside a 128-float row of the O exchange buffer (conflict-free writes
// of the C-fragment layout and conflict-free row-contiguous reads).
__device__ __forceinline__ int dec_o_unit(int row, int u) {
    return u ^ (((u >> 3) & 1) | ((row & 1) << 1));
}

template <int KC, int DC, int NSUB, bool VEC>
__device__ __noinline__ void decode_partial_impl(
    const bf16* __restrict__ qkv, const bf16* __restrict__ k_cache,
    const bf16* __restrict__ v_cache, float* __restrict__ part_out,
    float* __restrict__ part_lse, int s, int g, int split, int slot, int start, int end,
    int q_heads, int kv_heads, int hd, int max_seq, int num_splits, float scale, bf16* q_s,
    float* o_s, float* m_s, float* l_s) {
    constexpr int OW = DC * 64;  // O columns per pass
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int r = lane >> 2, c = lane & 3;
    const int G = q_heads / kv_heads;
    const size_t width = (size_t)(q_heads + 2 * kv_heads) * hd;
    const bf16* qrow = qkv + (size_t)s * width + (size_t)g * G * hd;
    const size_t pstride = (size_t)kv_heads * hd;
    const size_t base = ((size_t)slot * max_seq * kv_heads + g) * hd;
    const bf16* kb = k_cache + base;
    const bf16* vb = v_cache + base;
    const float sl2 = scale * kLog2e;
    const int npass = (hd + OW - 1) / OW;

    for (int h0 = 0; h0 < G; h0 += 16) {
        const int nh = min(16, G - h0);
        __syncthreads();  // q_s / o_s of the previous chunk are no longer read
        for (int idx = tid; idx < 16 * KC * 4; idx += blockDim.x) {
            const int row = idx / (KC * 4), ch = idx % (KC * 4);
            uint4 v = make_uint4(0u, 0u, 0u, 0u);
            if (row < nh) v = load8<VEC, false>(qrow + (size_t)(h0 + row) * hd, ch * 8, hd);
            *reinterpret_cast<uint4*>(q_s + ((ch >> 2) * 16 + row) * 32 + (ch & 3) * 8) = v;
        }
        __syncthreads();

        for (int pass = 0; pass < npass; ++pass) {
            const int dbase = pass * OW;
            float o[DC][8][4];
#pragma unroll
            for (int dc = 0; dc < DC; ++dc)
#pragma unroll
                for (int nt = 0; nt < 8; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) o[dc][nt][e] = 0.f;
            float m0 = neg_inf(), m1 = neg_inf(), l0 = 0.f, l1 = 0.f;

            // A warp takes 16*NSUB consecutive positions per iteration: all their K/V loads
            // are issued first, then each 16-position sub-step is computed.
            for (int p0 = start + warp * 16 * NSUB; p0 < end; p0 += kDecWarps * 16 * NSUB) {
                // ---- issue every load of the iteration ----
                uint4 kr[NSUB][2][KC];
                uint4 vr[NSUB][4][DC];
#pragma unroll
                for (int sub = 0; sub < NSUB; ++sub) {
#pragma unroll
                    for (int j = 0; j < 2; ++j) {
                        const int p = p0 + sub * 16 + j * 8 + r;
                        const bf16* row = kb + (size_t)p * pstride;
#pragma unroll
                        for (int kc = 0; kc < KC; ++kc) {
                            kr[sub][j][kc] = make_uint4(0u, 0u, 0u, 0u);
                            if (p < end) kr[sub][j][kc] = load8<VEC, true>(row, kc * 32 + c * 8, hd);
                        }
                    }
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        const int p = p0 + sub * 16 + 2 * c + (i & 1) + (i >> 1) * 8;
                        const bf16* row = vb + (size_t)p * pstride;
#pragma unroll
                        for (int dc = 0; dc < DC; ++dc) {
                            vr[sub][i][dc] = make_uint4(0u, 0u, 0u, 0u);
                            if (p < end)
                                vr[sub][i][dc] = load8<VEC, true>(row, dbase + dc * 64 + r * 8, hd);
                        }
                    }
                }
#pragma unroll
                for (int sub = 0; sub < NSUB; ++sub) {
                    const int ps = p0 + sub * 16;
                    if (sub > 0 && ps >= end) break;  // warp-uniform
                    // ---- S = Q K^T (16 heads x 16 positions) ----
                    float sc[2][4];
#pragma unroll
                    for (int j = 0; j < 2; ++j)
#pragma unroll
                        for (int e = 0; e < 4; ++e) sc[j][e] = 0.f;
#pragma unroll
                    for (int kc = 0; kc < KC; ++kc) {
                        if (kc * 32 < hd) {
                            const uint4 qa =
                                *reinterpret_cast<const uint4*>(q_s + (kc * 16 + r) * 32 + c * 8);
                            const uint4 qb =
                                *reinterpret_cast<const uint4*>(q_s + (kc * 16 + r + 8) * 32 + c * 8);
#pragma unroll
                            for (int j = 0; j < 2; ++j) {
                                const uint4 kv = kr[sub][j][kc];
                                mma16816(sc[j], qa.x, qb.x, qa.y, qb.y, kv.x, kv.y);
                                mma16816(sc[j], qa.z, qb.z, qa.w, qb.w, kv.z, kv.w);
                            }
                        }
                    }
                    // ---- online softmax (log2 domain) ----
#pragma unroll
                    for (int j = 0; j < 2; ++j)
#pragma unroll
                        for (int e = 0; e < 4; ++e) {
                            const int p = ps + j * 8 + 2 * c + (e & 1);
                            sc[j][e] = p < end ? sc[j][e] * sl2 : neg_inf();
                        }
                    float mx0 = fmaxf(fmaxf(sc[0][0], sc[0][1]), fmaxf(sc[1][0], sc[1][1]));
                    float mx1 = fmaxf(fmaxf(sc[0][2], sc[0][3]), fmaxf(sc[1][2], sc[1][3]));
                    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
                    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
                    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
                    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
                    const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
                    const float rf0 = mn0 == neg_inf() ? 0.f : mn0;
                    const float rf1 = mn1 == neg_inf() ? 0.f : mn1;
                    const float al0 = fast_exp2(m0 - rf0), al1 = fast_exp2(m1 - rf1);
                    m0 = mn0;
                    m1 = mn1;
#pragma unroll
                    for (int j = 0; j < 2; ++j) {
                        sc[j][0] = fast_exp2(sc[j][0] - rf0);
                        sc[j][1] = fast_exp2(sc[j][1] - rf0);
                        sc[j][2] = fast_exp2(sc[j][2] - rf1);
                        sc[j][3] = fast_exp2(sc[j][3] - rf1);
                    }
                    l0 = l0 * al0 + ((sc[0][0] + sc[0][1]) + (sc[1][0] + sc[1][1]));
                    l1 = l1 * al1 + ((sc[0][2] + sc[0][3]) + (sc[1][2] + sc[1][3]));
                    if (__any_sync(0xffffffffu, al0 != 1.f || al1 != 1.f)) {  // max moved
#pragma unroll
                        for (int dc = 0; dc < DC; ++dc)
#pragma unroll
                            for (int nt = 0; nt < 8; ++nt) {
                                o[dc][nt][0] *= al0;
                                o[dc][nt][1] *= al0;
                                o[dc][nt][2] *= al1;
                                o[dc][nt][3] *= al1;
                            }
                    }
                    // ---- O += P V ----
                    const uint32_t a0 = pack_bf16(sc[0][0], sc[0][1]);
                    const uint32_t a1 = pack_bf16(sc[0][2], sc[0][3]);
                    const uint32_t a2 = pack_bf16(sc[1][0], sc[1][1]);
                    const uint32_t a3 = pack_bf16(sc[1][2], sc[1][3]);
#pragma unroll
                    for (int dc = 0; dc < DC; ++dc) {
                        if (dbase + dc * 64 < hd) {
#pragma unroll
                            for (int k = 0; k < 4; ++k) {
                                const uint32_t w0 = comp(vr[sub][0][dc], k), w1 = comp(vr[sub][1][dc], k);
                                const uint32_t w2 = comp(vr[sub][2][dc], k), w3 = comp(vr[sub][3][dc], k);
                                mma16816(o[dc][2 * k], a0, a1, a2, a3, __byte_perm(w0, w1, 0x5410),
                                         __byte_perm(w2, w3, 0x5410));
                                mma16816(o[dc][2 * k + 1], a0, a1, a2, a3,
                                         __byte_perm(w0, w1, 0x7632), __byte_perm(w2, w3, 0x7632));
                            }
                        }
                    }
                }
            }

            // ---- merge the 4 warps ----
            l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
            l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
            l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
            l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
            __syncthreads();  // the previous pass' readers of o_s / m_s / l_s are done
            if (c == 0) {
                m_s[warp * 16 + r] = m0;
                m_s[warp * 16 + r + 8] = m1;
                l_s[warp * 16 + r] = l0;
                l_s[warp * 16 + r + 8] = l1;
            }
            float* ow = o_s + warp * 16 * kDecOCols;
#pragma unroll
            for (int dc = 0; dc < DC; ++dc)
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    const int u = dc * 16 + 4 * c + q;
                    const int pu = dec_o_unit(r, u);  // (r + 8) & 1 == r & 1
                    const int nt0 = (q & 1) * 4, e = q >> 1;
                    *reinterpret_cast<float4*>(ow + r * kDecOCols + pu * 4) =
                        make_float4(o[dc][nt0][e], o[dc][nt0 + 1][e], o[dc][nt0 + 2][e],
                                    o[dc][nt0 + 3][e]);
                    *reinterpret_cast<float4*>(ow + (r + 8) * kDecOCols + pu * 4) =
                        make_float4(o[dc][nt0][e + 2], o[dc][nt0 + 1][e + 2],
                                    o[dc][nt0 + 2][e + 2], o[dc][nt0 + 3][e + 2]);
                }
            __syncthreads();
            constexpr int UNITS = OW / 4;
            for (int idx = tid; idx < 16 * UNITS; idx += blockDim.x) {
                const int row = idx / UNITS, u = idx % UNITS;
                const int d = dbase + u * 4;
                if (row >= nh || d >= hd) continue;
                float mw[kDecWarps], M = neg_inf();
#pragma unroll
                for (int w = 0; w < kDecWarps; ++w) {
                    mw[w] = m_s[w * 16 + row];
                    M = fmaxf(M, mw[w]);
                }
                float L = 0.f;
                float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
                const int pu = dec_o_unit(row, u);
#pragma unroll
                for (int w = 0; w < kDecWarps; ++w) {
                    const float f = fast_exp2(mw[w] - M);
                    L += f * l_s[w * 16 + row];
                    const float4 v =
                        *reinterpret_cast<const float4*>(o_s + (w * 16 + row) * kDecOCols + pu * 4);
                    acc.x += f * v.x;
                    acc.y += f * v.y;
                    acc.z += f * v.z;
                    acc.w += f * v.w;
                }
                const float inv = 1.f / L;
                const int h = g * G + h0 + row;
                float* dst = part_out + ((size_t)(s * q_heads + h) * num_splits + split) * hd + d;
                *reinterpret_cast<float2*>(dst) = make_float2(acc.x * inv, acc.y * inv);
                if (d + 2 < hd) *reinterpret_cast<float2*>(dst + 2) = make_float2(acc.z * inv, acc.w * inv);
            }
            if (pass == 0) {
                for (int row = tid; row < nh; row += blockDim.x) {
                    float M = neg_inf();
#pragma unroll
                    for (int w = 0; w < kDecWarps; ++w) M = fmaxf(M, m_s[w * 16 + row]);
                    float L = 0.f;
#pragma unroll
                    for (int w = 0; w < kDecWarps; ++w)
                        L += fast_exp2(m_s[w * 16 + row] - M) * l_s[w * 16 + row];
                    const int h = g * G + h0 + row;
                    part_lse[(size_t)(s * q_heads + h) * num_splits + split] =
                        (M + __log2f(L)) * kLn2;
                }
            }
        }
    }
}

}  // namespace

// grid (num_splits, kv_heads, S), block 128, no dynamic shared memory.
extern "C" __global__ void __launch_bounds__(128)
attn_decode_partial_bf16(const bf16* __restrict__ qkv, const bf16* __restrict__ k_cache,
                         const bf16* __restrict__ v_cache, const int* __restrict__ seq_slot,
                         const int* __restrict__ seq_kv_len, float* __restrict__ part_out,
                         float* __restrict__ part_lse, int S, int q_heads, int kv_heads,
                         int head_dim, int max_seq, int split_len, int num_splits, float scale) {
    pdl_wait();
    __shared__ __align__(16) bf16 q_s[kDecQElems];
    __shared__ __align__(16) float o_s[kDecOElems];
    __shared__ float m_s[kDecWarps * 16], l_s[kDecWarps * 16];

    const int split = blockIdx.x, g = blockIdx.y, s = blockIdx.z;
    if (s >= S) return;
    const int hd = head_dim;
    const int G = q_heads / kv_heads;
    const int kv_len = min(seq_kv_len[s], max_seq);
    const int slot = seq_slot[s];
    const int start = split * split_len;
    const int end = min(start + split_len, kv_len);
    if (start >= end) {  // empty split: lse = -inf, zeros
        for (int hh = 0; hh < G; ++hh) {
            const size_t row = (size_t)(s * q_heads + g * G + hh) * num_splits + split;
            for (int d = threadIdx.x; d < hd; d += blockDim.x) part_out[row * hd + d] = 0.f;
            if (threadIdx.x == 0) part_lse[row] = neg_inf();
        }
        return;
    }
    const bool vec = (hd % 8 == 0) && aligned16(qkv) && aligned16(k_cache) && aligned16(v_cache);
#define YALIS_DEC(KC, DC, NSUB, V)                                                            \
    decode_partial_impl<KC, DC, NSUB, V>(qkv, k_cache, v_cache, part_out, part_lse, s, g, split,    \
                                   slot, start, end, q_heads, kv_heads, hd, max_seq,          \
                                   num_splits, scale, q_s, o_s, m_s, l_s)
    if (hd <= 64) {
        if (vec) YALIS_DEC(2, 1, 2, true); else YALIS_DEC(2, 1, 2, false);
    } else if (hd <= 128) {
        if (vec) YALIS_DEC(4, 2, 1, true); else YALIS_DEC(4, 2, 1, false);
    } else if (hd <= 256) {
        if (vec) YALIS_DEC(8, 2, 1, true); else YALIS_DEC(8, 2, 1, false);
    } else {
        __trap();  // head_dim > 256 unsupported
    }
#undef YALIS_DEC
}

// grid (q_heads, S), block 128, no dynamic shared memory.
// out[s, h*hd + d] = bf16( sum_k exp(lse_k - L) * part_out_k[d] ),  L = logsumexp_k lse_k.
extern "C" __global__ void __launch_bounds__(128)
attn_decode_combine_bf16(bf16* __restrict__ out, const float* __restrict__ part_out,
                         const float* __restrict__ part_lse, int S, int q_heads, int head_dim,
                         int num_splits) {
    pdl_wait();
    constexpr int CH = 256;
    __shared__ float w_s[CH];
    __shared__ float red[4];
    const int h = blockIdx.x, s = blockIdx.y;
    if (s >= S) return;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int hd = head_dim, ns = num_splits;
    const size_t rowi = (size_t)s * q_heads + h;
    const float* lse = part_lse + rowi * ns;
    const float* po = part_out + rowi * ns * hd;

    float mx = neg_inf();
    for (int k = tid; k < ns; k += blockDim.x) mx = fmaxf(mx, lse[k]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    if (lane == 0) red[warp] = mx;
    __syncthreads();
    const float M = fmaxf(fmaxf(red[0], red[1]), fmaxf(red[2], red[3]));
    __syncthreads();
    float sum = 0.f;
    if (M != neg_inf())
        for (int k = tid; k < ns; k += blockDim.x) sum += __expf(lse[k] - M);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (lane == 0) red[warp] = sum;
    __syncthreads();
    const float W = (red[0] + red[1]) + (red[2] + red[3]);
    const float invW = W > 0.f ? 1.f / W : 0.f;

    bf16* dst = out + rowi * hd;
    for (int d0 = 0; d0 < hd; d0 += 2 * blockDim.x) {  // one round for hd <= 256
        const int d = d0 + 2 * tid;
        float ax = 0.f, ay = 0.f;
        for (int k0 = 0; k0 < ns; k0 += CH) {
            __syncthreads();
            for (int k = tid; k < CH; k += blockDim.x) {
                const int kk = k0 + k;
                w_s[k] = (kk < ns && M != neg_inf()) ? __expf(lse[kk] - M) * invW : 0.f;
            }
            __syncthreads();
            const int nk = min(CH, ns - k0);
            if (d < hd) {
                const float* src = po + (size_t)k0 * hd + d;
                int k = 0;
                for (; k + 4 <= nk; k += 4) {
                    const float w0 = w_s[k], w1 = w_s[k + 1], w2 = w_s[k + 2], w3 = w_s[k + 3];
                    float2 v0 = make_float2(0.f, 0.f), v1 = v0, v2 = v0, v3 = v0;
                    if (w0 != 0.f) v0 = __ldg(reinterpret_cast<const float2*>(src + (size_t)k * hd));
                    if (w1 != 0.f) v1 = __ldg(reinterpret_cast<const float2*>(src + (size_t)(k + 1) * hd));
                    if (w2 != 0.f) v2 = __ldg(reinterpret_cast<const float2*>(src + (size_t)(k + 2) * hd));
                    if (w3 != 0.f) v3 = __ldg(reinterpret_cast<const float2*>(src + (size_t)(k + 3) * hd));
                    ax += w0 * v0.x + w1 * v1.x + w2 * v2.x + w3 * v3.x;
                    ay += w0 * v0.y + w1 * v1.y + w2 * v2.y + w3 * v3.y;
                }
                for (; k < nk; ++k) {
                    const float w = w_s[k];
                    if (w != 0.f) {
                        const float2 v = __ldg(reinterpret_cast<const float2*>(src + (size_t)k * hd));
                        ax += w * v.x;
                        ay += w * v.y;
                    }
                }
            }
        }
        if (d < hd) *reinterpret_cast<uint32_t*>(dst + d) = pack_bf16(ax, ay);
    }
}

// ------------------------------------------------------------------------------------------
// 2. Prefill, simple (CUDA cores): one warp per (query token, head).
// ------------------------------------------------------------------------------------------
//
// grid (ceil(T/4), q_heads), block 128: warp w of block (bx, h) handles token t = 4*bx + w.
// The warp is cut into NG = 32/LPR lane groups of LPR lanes; a group owns one key position at a
// time and its lanes split head_dim in 8-element chunks (lane li takes chunks li + k*LPR).
// Each iteration a group takes U positions, so a warp has NG*U positions' K and V loads in
// flight. Each group keeps its own online softmax state; the groups merge at the end.

namespace {

template <int LPR, int CPL, bool VEC>
__device__ __forceinline__ void prefill_simple_impl(
    const bf16* __restrict__ qkv, const bf16* __restrict__ k_cache,
    const bf16* __restrict__ v_cache, bf16* __restrict__ out, int t, int h, int slot, int pos,
    int q_heads, int kv_heads, int hd, int max_seq, float scale) {
    constexpr int NG = 32 / LPR;
    constexpr int U = 4 / CPL;  // positions per group per iteration
    const int lane = threadIdx.x & 31, gi = lane / LPR, li = lane % LPR;
    const int G = q_heads / kv_heads, g = h / G;
    const size_t width = (size_t)(q_heads + 2 * kv_heads) * hd;
    const int n = min(pos + 1, max_seq);
    const float sl2 = scale * kLog2e;

    float q[CPL][8], acc[CPL][8];
    const bf16* qrow = qkv + (size_t)t * width + (size_t)h * hd;
#pragma unroll
    for (int k = 0; k < CPL; ++k) {
        const uint4 v = load8<VEC, false>(qrow, (li + k * LPR) * 8, hd);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            q[k][2 * e] = bf_lo(comp(v, e)) * sl2;
            q[k][2 * e + 1] = bf_hi(comp(v, e)) * sl2;
        }
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[k][e] = 0.f;
    }
    float m = neg_inf(), l = 0.f;

    const size_t pstride = (size_t)kv_heads * hd;
    const size_t base = ((size_t)slot * max_seq * kv_heads + g) * hd;
    const bf16* kb = k_cache + base;
    const bf16* vb = v_cache + base;

    for (int p0 = 0; p0 < n; p0 += NG * U) {
        uint4 kr[U][CPL], vr[U][CPL];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int p = p0 + u * NG + gi;
            const bf16* krow = kb + (size_t)p * pstride;
            const bf16* vrow = vb + (size_t)p * pstride;
#pragma unroll
            for (int k = 0; k < CPL; ++k) {
                kr[u][k] = make_uint4(0u, 0u, 0u, 0u);
                vr[u][k] = make_uint4(0u, 0u, 0u, 0u);
                if (p < n) {
                    kr[u][k] = load8<VEC, false>(krow, (li + k * LPR) * 8, hd);
                    vr[u][k] = load8<VEC, false>(vrow, (li + k * LPR) * 8, hd);
                }
            }
        }
        float sc[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            float a = 0.f, b = 0.f;
#pragma unroll
            for (int k = 0; k < CPL; ++k)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    a = fmaf(q[k][2 * e], bf_lo(comp(kr[u][k], e)), a);
                    b = fmaf(q[k][2 * e + 1], bf_hi(comp(kr[u][k], e)), b);
                }
            sc[u] = a + b;
        }
#pragma unroll
        for (int o = LPR / 2; o > 0; o >>= 1)
#pragma unroll
            for (int u = 0; u < U; ++u) sc[u] += __shfl_xor_sync(0xffffffffu, sc[u], o);
        float mx = neg_inf();
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (p0 + u * NG + gi >= n) sc[u] = neg_inf();
            mx = fmaxf(mx, sc[u]);
        }
        const float mn = fmaxf(m, mx);
        const float rf = mn == neg_inf() ? 0.f : mn;
        const float al = fast_exp2(m - rf);
        m = mn;
        l *= al;
#pragma unroll
        for (int k = 0; k < CPL; ++k)
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[k][e] *= al;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const float p = fast_exp2(sc[u] - rf);
            l += p;
#pragma unroll
            for (int k = 0; k < CPL; ++k)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    acc[k][2 * e] = fmaf(p, bf_lo(comp(vr[u][k], e)), acc[k][2 * e]);
                    acc[k][2 * e + 1] = fmaf(p, bf_hi(comp(vr[u][k], e)), acc[k][2 * e + 1]);
                }
        }
    }
    // merge the lane groups
#pragma unroll
    for (int o = LPR; o < 32; o <<= 1) {
        const float mo = __shfl_xor_sync(0xffffffffu, m, o);
        const float lo = __shfl_xor_sync(0xffffffffu, l, o);
        const float M = fmaxf(m, mo);
        const float rf = M == neg_inf() ? 0.f : M;
        const float fa = fast_exp2(m - rf), fb = fast_exp2(mo - rf);
        l = l * fa + lo * fb;
#pragma unroll
        for (int k = 0; k < CPL; ++k)
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const float ao = __shfl_xor_sync(0xffffffffu, acc[k][e], o);
                acc[k][e] = acc[k][e] * fa + ao * fb;
            }
        m = M;
    }
    if (gi == 0) {
        const float inv = l > 0.f ? 1.f / l : 0.f;
        bf16* orow = out + (size_t)t * q_heads * hd + (size_t)h * hd;
#pragma unroll
        for (int k = 0; k < CPL; ++k) {
            const int d0 = (li + k * LPR) * 8;
            uint4 w;
            w.x = pack_bf16(acc[k][0] * inv, acc[k][1] * inv);
            w.y = pack_bf16(acc[k][2] * inv, acc[k][3] * inv);
            w.z = pack_bf16(acc[k][4] * inv, acc[k][5] * inv);
            w.w = pack_bf16(acc[k][6] * inv, acc[k][7] * inv);
            if (VEC) {
                if (d0 < hd) *reinterpret_cast<uint4*>(orow + d0) = w;
            } else {
                uint32_t* o32 = reinterpret_cast<uint32_t*>(orow);
                if (d0 + 0 < hd) o32[d0 / 2 + 0] = w.x;
                if (d0 + 2 < hd) o32[d0 / 2 + 1] = w.y;
                if (d0 + 4 < hd) o32[d0 / 2 + 2] = w.z;
                if (d0 + 6 < hd) o32[d0 / 2 + 3] = w.w;
            }
        }
    }
}

}  // namespace

// grid (ceil(T/4), q_heads), block 128, no dynamic shared memory.
// Token t (at position positions[t] of slot token_slot[t]) attends cache positions 0..=pos.
extern "C" __global__ void __launch_bounds__(128)
attn_prefill_bf16(const bf16* __restrict__ qkv, const bf16* __restrict__ k_cache,
                  const bf16* __restrict__ v_cache, const int* __restrict__ token_slot,
                  const int* __restrict__ positions, bf16* __restrict__ out, int T, int q_heads,
                  int kv_heads, int head_dim, int max_seq, float scale) {
    pdl_wait();
    const int t = blockIdx.x * 4 + (threadIdx.x >> 5);
    if (t >= T) return;
    const int h = blockIdx.y;
    const int hd = head_dim;
    const int slot = token_slot[t], pos = positions[t];
    const bool vec = (hd % 8 == 0) && aligned16(qkv) && aligned16(k_cache) &&
                     aligned16(v_cache) && aligned16(out);
#define YALIS_PRE(LPR, CPL, V)                                                                 \
    prefill_simple_impl<LPR, CPL, V>(qkv, k_cache, v_cache, out, t, h, slot, pos, q_heads,     \
                                     kv_heads, hd, max_seq, scale)
    if (hd <= 32) {
        if (vec) YALIS_PRE(4, 1, true); else YALIS_PRE(4, 1, false);
    } else if (hd <= 64) {
        if (vec) YALIS_PRE(8, 1, true); else YALIS_PRE(8, 1, false);
    } else if (hd <= 128) {
        if (vec) YALIS_PRE(16, 1, true); else YALIS_PRE(16, 1, false);
    } else if (hd <= 256) {
        if (vec) YALIS_PRE(16, 2, true); else YALIS_PRE(16, 2, false);
    } else {
        __trap();  // head_dim > 256 unsupported
    }
#undef YALIS_PRE
}

// ------------------------------------------------------------------------------------------
// 3. Prefill on tensor cores (FlashAttention-2 style, mma.sync m16n8k16 bf16 -> f32).
// ------------------------------------------------------------------------------------------
//
// Same signature as attn_prefill_bf16. Host-side launch:
//   grid  (ceil(T/64), q_heads), block 128 (4 warps), blockIdx.y = head, blockIdx.x = query
//         tile (taken last-first: block x covers tokens 64*(gridDim.x-1-x) .. +63)
//   dynamic shared memory = 512 * (HDP + 8) bytes, HDP = 64 if head_dim <= 64 else 128:
//     2 stages x {K, V} x 64 keys x (HDP + 8) bf16 (rows padded by 16 bytes: conflict-free
//     ldmatrix). Simplest: always pass 69,632 bytes. That is above 48 KB, so the host must
//     raise the limit once per loaded module:
//       cuFuncSetAttribute(f, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, 69632)
//     (36,864 bytes, no attribute needed, when head_dim <= 64). 3 blocks fit per SM.
//   Valid only when head_dim % 16 == 0 and 16 <= head_dim <= 128; otherwise use
//   attn_prefill_bf16. The kernel traps (launch error) on other head_dims or on less
//   dynamic shared memory than the above.
//
// Block (bx, h): 64 consecutive queries t0 .. t0+63 of the packed batch, warp w owns rows 16w..16w+15
// (Q fragments in registers, O and the online softmax state in registers). The 64 rows may span
// several sequences: they are processed as segments of consecutive rows with the same slot;
// for each segment the block streams that slot's key tiles 0 .. max position in the segment
// (cp.async, double-buffered) and every row is masked by (row in segment && key <= its
// position). Rows of other segments see only masked keys, so each row ends up with exactly
// keys 0..=positions[t] of its own slot. Warps skip tiles that none of their rows needs, and the
// mask is skipped for tiles below the diagonal. A tile spanning many short sequences (e.g.
// many 1-token decode rows mixed into a prefill batch) is correct but wastes tensor work: the
// kernel is meant for batches of long prompts.

namespace {

// Query tiles are taken last-first: in a packed batch later tiles tend to sit further along
// their sequence (more keys), so the longest blocks start first.
__device__ __forceinline__ int mma_tile_start() {
    return (int)(gridDim.x - 1 - blockIdx.x) * 64;
}

// HDP: compile-time bound of head_dim (register arrays); hd: the real head_dim (hd % 16 == 0,
// hd <= HDP). k-steps / n-tiles past hd are skipped by warp-uniform branches.
template <int HDP>
__device__ __forceinline__ void prefill_mma_impl(
    const bf16* __restrict__ qkv, const bf16* __restrict__ k_cache,
    const bf16* __restrict__ v_cache, bf16* __restrict__ out, int T, int q_heads, int kv_heads,
    int hd, int max_seq, float scale, unsigned char* smem, const int* s_slot, const int* s_pos) {
    constexpr int NKS = HDP / 16;  // k-steps of Q K^T
    constexpr int NNT = HDP / 8;   // n-tiles of O
    constexpr int RS = HDP + 8;    // padded shared-memory row, elements (odd number of 16 B)
    constexpr int TILE_B = 64 * RS * 2;  // bytes per K or V tile
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int r = lane >> 2, c = lane & 3;
    const int t0 = mma_tile_start(), h = blockIdx.y;
    const int G = q_heads / kv_heads, g = h / G;
    const int nrows = min(64, T - t0);
    const size_t width = (size_t)(q_heads + 2 * kv_heads) * hd;
    const int lr0 = warp * 16 + r, lr1 = lr0 + 8;
    const bool v0 = lr0 < nrows, v1 = lr1 < nrows;

    uint32_t qf[NKS][4];
    {
        const bf16* q0 = qkv + (size_t)(t0 + lr0) * width + (size_t)h * hd + 2 * c;
        const bf16* q1 = qkv + (size_t)(t0 + lr1) * width + (size_t)h * hd + 2 * c;
#pragma unroll
        for (int ks = 0; ks < NKS; ++ks) {
            const bool in = ks * 16 < hd;
            qf[ks][0] = in && v0 ? ldg4(q0 + ks * 16) : 0u;
            qf[ks][1] = in && v1 ? ldg4(q1 + ks * 16) : 0u;
            qf[ks][2] = in && v0 ? ldg4(q0 + ks * 16 + 8) : 0u;
            qf[ks][3] = in && v1 ? ldg4(q1 + ks * 16 + 8) : 0u;
        }
    }
    float o[NNT][4];
#pragma unroll
    for (int nt = 0; nt < NNT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[nt][e] = 0.f;
    float m0 = neg_inf(), m1 = neg_inf(), l0 = 0.f, l1 = 0.f;
    const float sl2 = scale * kLog2e;
    const size_t pstride = (size_t)kv_heads * hd;
    const uint32_t ks_base = smem_addr(smem);
    const uint32_t vs_base = ks_base + 2 * TILE_B;
    // ldmatrix row addresses of this lane (bytes from a tile's start)
    const uint32_t k_lane = (uint32_t)(((((lane >> 4) << 3) + (lane & 7)) * RS + ((lane >> 3) & 1) * 8) * 2);
    const uint32_t v_lane = (uint32_t)((((((lane >> 3) & 1) << 3) + (lane & 7)) * RS + (lane >> 4) * 8) * 2);

    int seg = 0;
    while (seg < nrows) {
        const int slot = s_slot[seg];
        int se = seg, kmax = -1;
        while (se < nrows && s_slot[se] == slot) {
            kmax = max(kmax, s_pos[se]);
            ++se;
        }
        const int key_end = min(kmax + 1, max_seq);
        const int ntiles = (key_end + 63) / 64;
        const int wlo = max(warp * 16, seg), whi = min(warp * 16 + 16, se);
        int wkmax = -1, wkmin = 0x7fffffff;  // over the warp's rows in this segment
        for (int i = wlo; i < whi; ++i) {
            wkmax = max(wkmax, s_pos[i]);
            wkmin = min(wkmin, s_pos[i]);
        }
        // Keys <= nomask_to are visible to all 16 rows of the warp (-1: the warp has rows
        // outside this segment, always mask). lim0/lim1: last visible key of rows lr0/lr1 in
        // this segment (-1: row not in the segment).
        const int nomask_to = (wlo == warp * 16 && whi == warp * 16 + 16) ? wkmin : -1;
        const int lim0 = (lr0 >= seg && lr0 < se) ? s_pos[lr0] : -1;
        const int lim1 = (lr1 >= seg && lr1 < se) ? s_pos[lr1] : -1;
        const size_t base = ((size_t)slot * max_seq * kv_heads + g) * hd;
        const bf16* kb = k_cache + base;
        const bf16* vb = v_cache + base;

        // Tile loader: nch threads per row, rpp rows per pass (threads past rpp*nch idle).
        const int nch = hd >> 3, rpp = 128 / nch;
        const int lrow = tid / nch, lch = tid - lrow * nch;
        auto load_tile = [&](int kt, int buf) {
            if (lrow < rpp) {
                const int key0 = kt * 64 + lrow;
                const bf16* ksrc = kb + (size_t)key0 * pstride + lch * 8;
                const bf16* vsrc = vb + (size_t)key0 * pstride + lch * 8;
                uint32_t soff = (uint32_t)(buf * TILE_B + (lrow * RS + lch * 8) * 2);
#pragma unroll 1
                for (int row = lrow; row < 64; row += rpp) {
                    const bool ok = kt * 64 + row < key_end;
                    cp_async16(ks_base + soff, ok ? ksrc : kb, ok ? 16 : 0);
                    cp_async16(vs_base + soff, ok ? vsrc : vb, ok ? 16 : 0);
                    ksrc += (size_t)rpp * pstride;
                    vsrc += (size_t)rpp * pstride;
                    soff += rpp * RS * 2;
                }
            }
        };

        load_tile(0, 0);
        cp_async_commit();
        for (int kt = 0; kt < ntiles; ++kt) {
            if (kt + 1 < ntiles) load_tile(kt + 1, (kt + 1) & 1);
            cp_async_commit();
            cp_async_wait1();
            __syncthreads();
            // Two 32-key halves per tile (fewer live registers; halves past the warp's last
            // row position are skipped).
#pragma unroll 1
            for (int half = 0; half < 2; ++half) {
                const int key0 = kt * 64 + half * 32;
                if (!(wlo < whi && key0 <= wkmax)) continue;  // warp-uniform
                const uint32_t kbuf = ks_base + (kt & 1) * TILE_B + k_lane + half * 32 * RS * 2;
                const uint32_t vbuf = vs_base + (kt & 1) * TILE_B + v_lane + half * 32 * RS * 2;
                // ---- S = Q K^T : 16 rows x 32 keys per warp ----
                float sc[4][4];
#pragma unroll
                for (int nt = 0; nt < 4; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) sc[nt][e] = 0.f;
#pragma unroll
                for (int ks = 0; ks < NKS; ++ks) {
                    if (ks * 16 >= hd) break;
#pragma unroll
                    for (int j = 0; j < 2; ++j) {
                        uint32_t b0, b1, b2, b3;
                        ldmatrix_x4(kbuf + (j * 16 * RS + ks * 16) * 2, b0, b1, b2, b3);
                        mma16816(sc[2 * j], qf[ks][0], qf[ks][1], qf[ks][2], qf[ks][3], b0, b1);
                        mma16816(sc[2 * j + 1], qf[ks][0], qf[ks][1], qf[ks][2], qf[ks][3], b2, b3);
                    }
                }
                // ---- mask, online softmax (log2 domain) ----
                const bool need_mask = key0 + 31 > nomask_to;
                if (need_mask) {
#pragma unroll
                    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
                        for (int e = 0; e < 4; ++e) {
                            const int key = key0 + nt * 8 + 2 * c + (e & 1);
                            const bool ok = key <= (e < 2 ? lim0 : lim1);
                            sc[nt][e] = ok ? sc[nt][e] * sl2 : neg_inf();
                        }
                } else {
#pragma unroll
                    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
                        for (int e = 0; e < 4; ++e) sc[nt][e] *= sl2;
                }
                float mx0 = neg_inf(), mx1 = neg_inf();
#pragma unroll
                for (int nt = 0; nt < 4; ++nt) {
                    mx0 = fmaxf(mx0, fmaxf(sc[nt][0], sc[nt][1]));
                    mx1 = fmaxf(mx1, fmaxf(sc[nt][2], sc[nt][3]));
                }
                mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
                mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
                mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
                mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
                const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
                const float rf0 = mn0 == neg_inf() ? 0.f : mn0;
                const float rf1 = mn1 == neg_inf() ? 0.f : mn1;
                const float al0 = fast_exp2(m0 - rf0), al1 = fast_exp2(m1 - rf1);
                m0 = mn0;
                m1 = mn1;
                float rs0 = 0.f, rs1 = 0.f;
#pragma unroll
                for (int nt = 0; nt < 4; ++nt) {
                    sc[nt][0] = fast_exp2(sc[nt][0] - rf0);
                    sc[nt][1] = fast_exp2(sc[nt][1] - rf0);
                    sc[nt][2] = fast_exp2(sc[nt][2] - rf1);
                    sc[nt][3] = fast_exp2(sc[nt][3] - rf1);
                    rs0 += sc[nt][0] + sc[nt][1];
                    rs1 += sc[nt][2] + sc[nt][3];
                }
                l0 = l0 * al0 + rs0;
                l1 = l1 * al1 + rs1;
                if (__any_sync(0xffffffffu, al0 != 1.f || al1 != 1.f)) {  // max moved
#pragma unroll
                    for (int nt = 0; nt < NNT; ++nt) {
                        o[nt][0] *= al0;
                        o[nt][1] *= al0;
                        o[nt][2] *= al1;
                        o[nt][3] *= al1;
                    }
                }
                // ---- O += P V ----
#pragma unroll
                for (int kk = 0; kk < 2; ++kk) {
                    const uint32_t a0 = pack_bf16(sc[2 * kk][0], sc[2 * kk][1]);
                    const uint32_t a1 = pack_bf16(sc[2 * kk][2], sc[2 * kk][3]);
                    const uint32_t a2 = pack_bf16(sc[2 * kk + 1][0], sc[2 * kk + 1][1]);
                    const uint32_t a3 = pack_bf16(sc[2 * kk + 1][2], sc[2 * kk + 1][3]);
#pragma unroll
                    for (int dp = 0; dp < NNT / 2; ++dp) {
                        if (dp * 16 >= hd) break;
                        uint32_t b0, b1, b2, b3;
                        ldmatrix_x4_trans(vbuf + (kk * 16 * RS + dp * 16) * 2, b0, b1, b2, b3);
                        mma16816(o[2 * dp], a0, a1, a2, a3, b0, b1);
                        mma16816(o[2 * dp + 1], a0, a1, a2, a3, b2, b3);
                    }
                }
            }
            __syncthreads();  // this buffer is refilled two tiles later
        }
        seg = se;
    }

    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f;
    const float inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
    bf16* o0 = out + (size_t)(t0 + lr0) * q_heads * hd + (size_t)h * hd + 2 * c;
    bf16* o1 = out + (size_t)(t0 + lr1) * q_heads * hd + (size_t)h * hd + 2 * c;
#pragma unroll
    for (int nt = 0; nt < NNT; ++nt) {
        if (nt * 8 >= hd) break;
        if (v0) *reinterpret_cast<uint32_t*>(o0 + nt * 8) = pack_bf16(o[nt][0] * inv0, o[nt][1] * inv0);
        if (v1) *reinterpret_cast<uint32_t*>(o1 + nt * 8) = pack_bf16(o[nt][2] * inv1, o[nt][3] * inv1);
    }
}

}  // namespace

// See the comment above prefill_mma_impl for the launch: grid (ceil(T/64), q_heads), block 128,
// dynamic smem 69,632 bytes (cuFuncSetAttribute), head_dim % 16 == 0 and <= 128.
extern "C" __global__ void __launch_bounds__(128, 3)
attn_prefill_mma_bf16(const bf16* __restrict__ qkv, const bf16* __restrict__ k_cache,
                      const bf16* __restrict__ v_cache, const int* __restrict__ token_slot,
                      const int* __restrict__ positions, bf16* __restrict__ out, int T,
                      int q_heads, int kv_heads, int head_dim, int max_seq, float scale) {
    pdl_wait();
    extern __shared__ __align__(128) unsigned char dyn_smem[];
    __shared__ int s_slot[64], s_pos[64];
    const int hd = head_dim;
    uint32_t dyn_bytes;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn_bytes));
    if (hd % 16 != 0 || hd < 16 || hd > 128 || dyn_bytes < 512u * (hd <= 64 ? 72u : 136u))
        __trap();
    const int t0 = mma_tile_start();
    if (t0 >= T) return;
    if (threadIdx.x < 64) {
        const int t = t0 + threadIdx.x;
        s_slot[threadIdx.x] = t < T ? token_slot[t] : -1;
        s_pos[threadIdx.x] = t < T ? positions[t] : -1;
    }
    __syncthreads();
#define YALIS_MMA(HDP)                                                                         \
    prefill_mma_impl<HDP>(qkv, k_cache, v_cache, out, T, q_heads, kv_heads, hd, max_seq, scale, \
                          dyn_smem, s_slot, s_pos)
    if (hd <= 64) YALIS_MMA(64); else YALIS_MMA(128);
#undef YALIS_MMA
}
