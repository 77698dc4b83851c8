// Decode GEMV: out[m, n] = sum_k x[m, k] * w[n, k] for a small batch (M = 1..8 rows of x) against
// a bf16 weight in the HF Linear layout (w [N, K] row-major), f32 accumulation; and the same with
// the MLP's SiLU-gate fused into the input (gemv_silu_bf16, for the down projection).
//
// LAUNCH (both kernels): grid (ceil(N / GEMV_ROWS_PER_BLOCK)) = ceil(N / 16), block (256), no
// dynamic shared memory (static 5 KB for gemv_bf16, 29.7 KB for gemv_silu_bf16).
//
// Decode at small batch is bound by reading every weight once per step, so everything here serves
// one aim: keep enough 16-byte weight loads in flight on every SM to saturate HBM, and make the
// rest (x, the multiply-adds, the reduction) cheap enough to hide behind them.
//
// Work layout. A block owns 16 consecutive weight rows [n0, n0 + 16) and all of K; its 8 warps
// split K. K is cut into tiles of 32 columns and warp wi takes tiles wi, wi + 8, wi + 16, ...
// (balanced whenever K % 256 == 0; at any moment the 8 warps read adjacent 64-byte pieces of the
// same 16 rows). Per tile a warp issues two bf16 tensor-core MMAs (mma.sync m16n8k16, f32
// accumulators): A = the 16 x 32 weight tile, B = the 32 x 8 tile of x^T (the 8 batch rows; rows
// past M are zeros). So the multiply-adds cost two instructions per KB of weights whatever M is
// (1..8), with no unpacking and no shuffles, where FMAs on the CUDA cores would cost M FMAs per
// weight (at M = 8 about as many issue slots as the whole HBM stream leaves). The trick that lets
// 16-byte loads feed the fragments directly: the order of k inside a dot product is free, so lane
// (g = lane / 4, t = lane % 4) loads the 8 bf16 at k = 32 j + 8 t of rows n0 + g and n0 + g + 8
// (two LDG.128, ld.global.nc.L1::no_allocate.L2::256B: read once, kept out of L1) and of x row g
// (one LDG.128 through L1: x is small and read by every block); elements {0..3} of each vector
// are the first MMA's fragment and {4..7} the second's, and A and B agree on that permutation of
// k. The main loop takes 4 tiles per step: 8 independent weight LDG.128 per lane (4 KB per warp)
// are issued before the first MMA (checked in the SASS: LDG.E.NA.LTC256B.128.CONSTANT); two
// accumulator sets keep the MMA chain short. A remainder loop takes the last tiles one at a time with per-lane bounds checks, so any
// K % 8 == 0 works. At the end the warps' 16 x 8 partial tiles go through shared memory and 128
// threads add the 8 warps in a fixed order (deterministic) and write out[m, n], 16 consecutive n
// per m (coalesced), f32 or bf16 (round to nearest even).
//
// Bandwidth reasoning. HBM needs about 3.0 TB/s / 132 = 23 GB/s per SM (H100) or 4.3 / 132 = 33
// GB/s (H200); at ~1 us of loaded latency that is 23 to 33 KB in flight per SM. A block keeps 8
// warps x 4 KB = 32 KB in flight per step and gemv_bf16 fits 3 blocks per SM (80 registers), so
// up to 96 KB: about 3 times the need, which also covers the few MMAs between a warp's steps.
// Extra traffic: x, read once per block (M / 16 of the weight bytes; mostly L1 hits for blocks
// sharing an SM), nothing else. N = 4096 gives 256 blocks, all resident in one wave; the LM head
// (N ~ 128K) runs many waves. Matrices of a few MB are dominated by launch and first-load latency.
//
// gemv_silu_bf16. Its B operand is act[m, k] = bf16(silu(g) * u), g = gate_up[m, k], u =
// gate_up[m, K + k], silu(g) = g / (1 + expf(-g)) in f32: the same expression as silu_mul_bf16 in
// norm.cu, which compiles to the same instructions (checked in the SASS), so it sees bit for bit
// what silu_mul_bf16 + a GEMM would. Each step, the 32 lanes of a warp compute the step's M x 128
// act values once (M x 4 per lane; templated on M = 1..8 through a switch), stage them in a
// per-warp shared buffer and read them back as B fragments. That costs ~30 instructions per act
// value, and every block computes all of act[0..M, 0..K]: M x K values per 16 x K weights. At
// M = 8 a step (4 KB of weights per warp) is ~1000 SASS instructions, about what an H200's HBM
// stream leaves per 4 KB (~4 x 230 cycles), so the SiLU would bind. Hence: when M >= 5 and N >=
// 4096 the kernel works on 32 rows per block (two 16-row MMA tiles per warp sharing each B
// fragment, 2 tiles per step so that 8 weight loads per lane stay in flight; ~560 instructions
// per 4 KB at M = 8): the blocks [ceil(N / 32), ceil(N / 16)) of the same grid exit at once, and
// the SiLU work per weight byte halves. Otherwise it is the 16-row layout of gemv_bf16.
//
// Registers (ptxas, sm_90a, CUDA 13.0): gemv_bf16 80 (3 blocks per SM), gemv_silu_bf16 114 (2
// blocks per SM); no spills, no stack. Keep the minimum-blocks argument of __launch_bounds__:
// without it ptxas aimed at 64 registers and interleaved the weight loads with the MMAs (two
// memory latencies per step instead of one).
//
// Fallback. K % 8 != 0 or a pointer (x / gate_up, w) not 16-byte aligned: a scalar path, each
// warp 2 rows, lanes striding k, warp-shuffle sums (correct for any size; slow). M > 8 (either
// path): the kernel loops over groups of 8 rows of x, re-reading the weights for each group.

#include "common.cuh"

// Weight rows per block: the host's grid is ceil(N / GEMV_ROWS_PER_BLOCK) blocks of 256 threads.
#define GEMV_ROWS_PER_BLOCK 16
#define GEMV_THREADS 256
#define GEMV_WARPS 8
// Tiles (32 columns of K) per main-loop step and warp, for 16 rows per block.
#define GEMV_UNROLL 4
// gemv_silu_bf16 takes 32 rows per block when M >= GEMV_SILU_WIDE_M and N >= GEMV_SILU_WIDE_N.
#define GEMV_SILU_WIDE_M 5
#define GEMV_SILU_WIDE_N 4096
// Per-warp act staging buffer of gemv_silu_bf16: 8 rows; a step of U tiles uses a row stride of
// 32 U + 32 bf16 (so the 16-byte fragment reads of rows g and g + 1 hit distinct banks).
#define GEMV_ACT_WARP (8 * (32 * GEMV_UNROLL + 32))

namespace {

// ---------------------------------------------------------------------------------------------
// Loads and the MMA.

// Weights: read once per step; keep them out of L1 and ask L2 for 256-byte fetches.
__device__ __forceinline__ uint4 ld_stream16(const bf16* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
    return v;
}

// Activations: small and read by every block; through L1.
__device__ __forceinline__ uint4 ld_cached16(const bf16* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

__device__ __forceinline__ uint4 zero4() { return make_uint4(0u, 0u, 0u, 0u); }

// d += A (16 x 16, row-major) * B (16 x 8, col-major), bf16 inputs, f32 accumulators. Lane
// (g = lane / 4, t = lane % 4) holds a0: (row g, k 2t..2t+1), a1: (row g + 8, k 2t..2t+1),
// a2: (row g, k 2t+8..2t+9), a3: (row g + 8, k 2t+8..2t+9); b0: (k 2t..2t+1, col g),
// b1: (k 2t+8..2t+9, col g); d: (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1).
__device__ __forceinline__ void mma16816(float (&d)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                         unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Exactly silu_mul of norm.cu (same expression, so the same code and rounding).
__device__ __forceinline__ float silu_mul(float g, float u) { return g / (1.0f + expf(-g)) * u; }

// E consecutive bf16 (E = 1, 2, 4; aligned to E elements) as raw words, and back.
template <int E>
struct Raw {
    unsigned w[(E + 1) / 2];
    __device__ __forceinline__ void load(const bf16* p) {
        if (E == 4) {
            const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
            w[0] = v.x;
            w[(E + 1) / 2 - 1] = v.y;
        } else if (E == 2) {
            w[0] = __ldg(reinterpret_cast<const unsigned*>(p));
        } else {
            w[0] = __ldg(reinterpret_cast<const unsigned short*>(p));
        }
    }
    __device__ __forceinline__ float at(int i) const { return (i & 1) ? bf16_hi(w[i >> 1]) : bf16_lo(w[i >> 1]); }
};

template <int E>
__device__ __forceinline__ void store_bf16(bf16* p, const float (&f)[E]) {
    if (E == 4) {
        *reinterpret_cast<uint2*>(p) = make_uint2(pack2(f[0], f[1]), pack2(f[2], f[3 % E]));
    } else if (E == 2) {
        *reinterpret_cast<unsigned*>(p) = pack2(f[0], f[1 % E]);
    } else {
        *p = __float2bfloat16_rn(f[0]);
    }
}

// ---------------------------------------------------------------------------------------------
// B-fragment providers: b[u] = the 8 bf16 of batch row g at k = 32 (j0 + 8u) + 8t, or zeros where
// g is past the group's rows or (CHECK) k is past K.

// gemv_bf16: straight from x.
struct XFrag {
    const bf16* xr;  // x row m0 + min(g, mc - 1)
    bool on;         // g < mc
    unsigned mask;   // on ? ~0 : 0
    int t;

    template <int U, bool CHECK>
    __device__ __forceinline__ void load(int j0, int K, uint4 (&b)[U]) const {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int k = (j0 + 8 * u) * 32 + 8 * t;
            if (CHECK) {
                b[u] = on && k < K ? ld_cached16(xr + k) : zero4();
            } else {
                // Branch-free: lanes past the group's rows read its last row (the addresses of a
                // live lane: no extra traffic) and zero it.
                const uint4 v = ld_cached16(xr + k);
                b[u] = make_uint4(v.x & mask, v.y & mask, v.z & mask, v.w & mask);
            }
        }
    }
};

// gemv_silu_bf16: act rows m0 .. m0 + MB - 1. The warp's 32 lanes compute the MB x 32U act values
// of the step once (lane L: U values at column U L of the step, that is tile L / (32 / U)), stage
// them in the warp's buffer (row m at m * (32U + 32)), then read the fragments.
template <int MB>
struct ActFrag {
    const bf16* gu;  // gate_up row m0; row stride 2K
    bf16* s;         // this warp's staging buffer, GEMV_ACT_WARP bf16
    int lane, g, t;

    template <int U, bool CHECK>
    __device__ __forceinline__ void load(int j0, int K, uint4 (&b)[U]) const {
        constexpr int STR = 32 * U + 32;
        const int kc = (j0 + 8 * (lane / (32 / U))) * 32 + (lane % (32 / U)) * U;
        __syncwarp();  // the previous step's fragment reads are done
        if (!CHECK || kc < K) {  // K % 8 == 0: kc < K means all U columns are inside
            Raw<U> gv[MB], uv[MB];
#pragma unroll
            for (int m = 0; m < MB; ++m) {
                const bf16* row = gu + static_cast<long long>(m) * 2 * K;
                gv[m].load(row + kc);
                uv[m].load(row + K + kc);
            }
#pragma unroll
            for (int m = 0; m < MB; ++m) {
                float a[U];
#pragma unroll
                for (int i = 0; i < U; ++i) a[i] = silu_mul(gv[m].at(i), uv[m].at(i));
                store_bf16<U>(s + m * STR + U * lane, a);
            }
        }
        __syncwarp();
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int k = (j0 + 8 * u) * 32 + 8 * t;
            b[u] = g < MB && (!CHECK || k < K)
                       ? *reinterpret_cast<const uint4*>(s + g * STR + u * 32 + 8 * t)
                       : zero4();
        }
    }
};

// ---------------------------------------------------------------------------------------------
// The K loop of one warp over RT 16-row MMA tiles: weight row pointers p[2 r + h] = row
// n0 + 16 r + 8 h + g (clamped to N - 1); acc[r][0] takes the first MMA of each tile, acc[r][1]
// the second.

template <int RT>
struct WRows {
    const bf16* p[2 * RT];
};

template <int RT, int U, bool CHECK, class Frag>
__device__ __forceinline__ void gemv_step(const WRows<RT>& w, int j0, int t, int K, const Frag& fr,
                                          float (&acc)[RT][2][4]) {
    uint4 a[2 * RT][U], b[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const int k = (j0 + 8 * u) * 32 + 8 * t;
#pragma unroll
        for (int r = 0; r < 2 * RT; ++r) a[r][u] = !CHECK || k < K ? ld_stream16(w.p[r] + k) : zero4();
    }
    fr.template load<U, CHECK>(j0, K, b);
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int r = 0; r < RT; ++r) {
            const uint4 lo = a[2 * r][u], hi = a[2 * r + 1][u];
            mma16816(acc[r][0], lo.x, hi.x, lo.y, hi.y, b[u].x, b[u].y);
            mma16816(acc[r][1], lo.z, hi.z, lo.w, hi.w, b[u].z, b[u].w);
        }
    }
}

template <int RT, int U, class Frag>
__device__ __forceinline__ void gemv_k_loop(const WRows<RT>& w, int wi, int t, int K, const Frag& fr,
                                            float (&acc)[RT][2][4]) {
    const int full = K >> 5;          // tiles entirely inside K
    const int tiles = (K + 31) >> 5;  // with the partial last one
    int j = wi;
    for (; j + 8 * (U - 1) < full; j += 8 * U) gemv_step<RT, U, false>(w, j, t, K, fr, acc);
    for (; j < tiles; j += 8) gemv_step<RT, 1, true>(w, j, t, K, fr, acc);
}

template <int RT>
__device__ __forceinline__ WRows<RT> gemv_rows(const bf16* w, int n0, int N, int K, int g) {
    WRows<RT> r;
#pragma unroll
    for (int i = 0; i < 2 * RT; ++i) r.p[i] = w + static_cast<long long>(min(n0 + 8 * i + g, N - 1)) * K;
    return r;
}

// Reduction buffer: [warp][m (8)][16 RT rows], row stride RED_S(RT) floats (2 RED_S = 8 mod 32:
// conflict-free writes).
template <int RT>
struct Red {
    static constexpr int S = RT == 1 ? 20 : 36;
    static constexpr int WARP = 8 * S;
};
#define GEMV_RED_FLOATS (GEMV_WARPS * 8 * 36)

// The block's 8 partial (16 RT) x 8 tiles -> out rows m0 .. m0 + mc - 1, columns n0 .. n0 + 16 RT - 1.
template <int RT>
__device__ __forceinline__ void gemv_epilogue(const float (&acc)[RT][2][4], float* red, int wi, int g, int t, int n0,
                                              int N, int m0, int mc, void* out, int out_f32) {
    constexpr int S = Red<RT>::S, ROWS = 16 * RT;
    __syncthreads();  // an earlier group may still be reading red
    float* r = red + wi * Red<RT>::WARP;
#pragma unroll
    for (int q = 0; q < RT; ++q) {
        r[(2 * t) * S + 16 * q + g] = acc[q][0][0] + acc[q][1][0];
        r[(2 * t + 1) * S + 16 * q + g] = acc[q][0][1] + acc[q][1][1];
        r[(2 * t) * S + 16 * q + g + 8] = acc[q][0][2] + acc[q][1][2];
        r[(2 * t + 1) * S + 16 * q + g + 8] = acc[q][0][3] + acc[q][1][3];
    }
    __syncthreads();
    if (threadIdx.x < 8 * ROWS) {
        const int m = threadIdx.x / ROWS, row = threadIdx.x % ROWS, n = n0 + row;
        if (m < mc && n < N) {
            float s = 0.0f;
#pragma unroll
            for (int v = 0; v < GEMV_WARPS; ++v) s += red[v * Red<RT>::WARP + m * S + row];
            const long long o = static_cast<long long>(m0 + m) * N + n;
            if (out_f32)
                static_cast<float*>(out)[o] = s;
            else
                static_cast<bf16*>(out)[o] = __float2bfloat16_rn(s);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Scalar fallback (any K, any alignment): warp wi takes rows n0 + 2 wi and n0 + 2 wi + 1, lanes
// stride k, up to 8 rows of x per pass, warp-shuffle sums. SILU: x is gate_up [M, 2K].

template <bool SILU>
__device__ __forceinline__ float gemv_x_at(const bf16* x, long long m, int k, int K) {
    if (SILU) {
        const bf16* row = x + m * 2 * K;
        const float a = silu_mul(__bfloat162float(row[k]), __bfloat162float(row[K + k]));
        return __bfloat162float(__float2bfloat16_rn(a));
    }
    return __bfloat162float(x[m * K + k]);
}

template <bool SILU>
__device__ __noinline__ void gemv_scalar(const bf16* x, const bf16* w, void* out, int M, int N, int K,
                                         int out_f32) {
    const int lane = lane_id();
    const int r0 = blockIdx.x * GEMV_ROWS_PER_BLOCK + 2 * warp_id();
    if (r0 >= N) return;  // warp-uniform; no block barriers on this path
    const bool two = r0 + 1 < N;
    const bf16* wa = w + static_cast<long long>(r0) * K;
    const bf16* wb = w + static_cast<long long>(two ? r0 + 1 : r0) * K;
    for (int m0 = 0; m0 < M; m0 += 8) {
        const int mc = min(8, M - m0);
        float acc0[8], acc1[8];
#pragma unroll
        for (int m = 0; m < 8; ++m) acc0[m] = acc1[m] = 0.0f;
        for (int k = lane; k < K; k += 32) {
            const float fa = __bfloat162float(wa[k]), fb = __bfloat162float(wb[k]);
#pragma unroll
            for (int m = 0; m < 8; ++m) {
                if (m < mc) {
                    const float xv = gemv_x_at<SILU>(x, m0 + m, k, K);
                    acc0[m] = fmaf(xv, fa, acc0[m]);
                    acc1[m] = fmaf(xv, fb, acc1[m]);
                }
            }
        }
#pragma unroll
        for (int m = 0; m < 8; ++m) {
            if (m < mc) {  // warp-uniform
                const float s0 = warp_sum(acc0[m]), s1 = warp_sum(acc1[m]);
                if (lane == 0) {
                    const long long o = static_cast<long long>(m0 + m) * N + r0;
                    if (out_f32) {
                        static_cast<float*>(out)[o] = s0;
                        if (two) static_cast<float*>(out)[o + 1] = s1;
                    } else {
                        static_cast<bf16*>(out)[o] = __float2bfloat16_rn(s0);
                        if (two) static_cast<bf16*>(out)[o + 1] = __float2bfloat16_rn(s1);
                    }
                }
            }
        }
    }
}

// One group of MB (1..8) act rows, RT 16-row tiles per warp (RT = 2: 2 tiles per step, else 4).
template <int RT, int MB>
__device__ __forceinline__ void gemv_silu_group(const bf16* gu, bf16* s, const WRows<RT>& w, int lane, int wi,
                                                int K, float (&acc)[RT][2][4]) {
    const ActFrag<MB> fr{gu, s, lane, lane >> 2, lane & 3};
    gemv_k_loop<RT, GEMV_UNROLL / RT>(w, wi, lane & 3, K, fr, acc);
}

template <int RT>
__device__ __forceinline__ void gemv_silu_body(const bf16* gate_up, const bf16* w, void* out, int M, int N, int K,
                                               int out_f32, float* red, bf16* act) {
    const int n0 = blockIdx.x * 16 * RT;
    if (n0 >= N) return;  // block-uniform: with RT = 2 the upper half of the grid exits here
    const int lane = lane_id(), wi = warp_id(), g = lane >> 2, t = lane & 3;
    const WRows<RT> wr = gemv_rows<RT>(w, n0, N, K, g);
    bf16* s = act + wi * GEMV_ACT_WARP;
    for (int m0 = 0; m0 < M; m0 += 8) {
        const int mc = min(8, M - m0);
        const bf16* gu = gate_up + static_cast<long long>(m0) * 2 * K;
        float acc[RT][2][4];
#pragma unroll
        for (int q = 0; q < RT; ++q)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[q][0][i] = acc[q][1][i] = 0.0f;
        switch (mc) {
            case 1: gemv_silu_group<RT, 1>(gu, s, wr, lane, wi, K, acc); break;
            case 2: gemv_silu_group<RT, 2>(gu, s, wr, lane, wi, K, acc); break;
            case 3: gemv_silu_group<RT, 3>(gu, s, wr, lane, wi, K, acc); break;
            case 4: gemv_silu_group<RT, 4>(gu, s, wr, lane, wi, K, acc); break;
            case 5: gemv_silu_group<RT, 5>(gu, s, wr, lane, wi, K, acc); break;
            case 6: gemv_silu_group<RT, 6>(gu, s, wr, lane, wi, K, acc); break;
            case 7: gemv_silu_group<RT, 7>(gu, s, wr, lane, wi, K, acc); break;
            default: gemv_silu_group<RT, 8>(gu, s, wr, lane, wi, K, acc); break;
        }
        gemv_epilogue<RT>(acc, red, wi, g, t, n0, N, m0, mc, out, out_f32);
    }
}

}  // namespace

// out[m, n] = sum_k x[m, k] * w[n, k]; f32 accumulation; out f32 [M, N] when out_f32 != 0, else
// bf16 [M, N] (round to nearest even).
// x [M, K] bf16, w [N, K] bf16, any M >= 0 (fast for M <= 8), N, K.
// grid (ceil(N / GEMV_ROWS_PER_BLOCK)) = ceil(N / 16), block (256), no dynamic shared memory.
extern "C" __global__ void __launch_bounds__(GEMV_THREADS, 3)
    gemv_bf16(const bf16* x, const bf16* w, void* out, int M, int N, int K, int out_f32) {
    pdl_wait();
    __shared__ float red[8 * Red<1>::WARP];
    const int n0 = blockIdx.x * GEMV_ROWS_PER_BLOCK;
    if (n0 >= N) return;  // block-uniform
    if ((K & 7) != 0 || !aligned16(x) || !aligned16(w)) {
        gemv_scalar<false>(x, w, out, M, N, K, out_f32);
        return;
    }
    const int lane = lane_id(), wi = warp_id(), g = lane >> 2, t = lane & 3;
    const WRows<1> wr = gemv_rows<1>(w, n0, N, K, g);
    for (int m0 = 0; m0 < M; m0 += 8) {
        const int mc = min(8, M - m0);
        const XFrag fr{x + static_cast<long long>(m0 + min(g, mc - 1)) * K, g < mc, g < mc ? ~0u : 0u, t};
        float acc[1][2][4] = {{{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}}};
        gemv_k_loop<1, GEMV_UNROLL>(wr, wi, t, K, fr, acc);
        gemv_epilogue<1>(acc, red, wi, g, t, n0, N, m0, mc, out, out_f32);
    }
}

// out[m, n] = sum_k act[m, k] * w[n, k] with act[m, k] = bf16(silu(gate_up[m, k]) * gate_up[m, K + k])
// (exactly the rows silu_mul_bf16 would write); out as gemv_bf16.
// gate_up [M, 2K] bf16, w [N, K] bf16, any M >= 0 (fast for M <= 8), N, K.
// grid (ceil(N / GEMV_ROWS_PER_BLOCK)) = ceil(N / 16), block (256), no dynamic shared memory
// (when M >= 5 and N >= 4096 only the first ceil(N / 32) blocks work, 32 rows each).
extern "C" __global__ void __launch_bounds__(GEMV_THREADS, 2)
    gemv_silu_bf16(const bf16* gate_up, const bf16* w, void* out, int M, int N, int K, int out_f32) {
    pdl_wait();
    __shared__ float red[GEMV_RED_FLOATS];
    __shared__ __align__(16) bf16 act[GEMV_WARPS * GEMV_ACT_WARP];
    if (static_cast<long long>(blockIdx.x) * GEMV_ROWS_PER_BLOCK >= N) return;  // block-uniform
    if ((K & 7) != 0 || !aligned16(gate_up) || !aligned16(w)) {
        gemv_scalar<true>(gate_up, w, out, M, N, K, out_f32);
        return;
    }
    if (M >= GEMV_SILU_WIDE_M && N >= GEMV_SILU_WIDE_N)
        gemv_silu_body<2>(gate_up, w, out, M, N, K, out_f32, red, act);
    else
        gemv_silu_body<1>(gate_up, w, out, M, N, K, out_f32, red, act);
}
