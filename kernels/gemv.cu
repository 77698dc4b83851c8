// Decode GEMV: out[m, n] = sum_k x[m, k] * w[n, k] for a small batch (M = 1..8 rows of x) against
// a bf16 weight in the HF Linear layout (w [N, K] row-major), f32 accumulation. Decode at small
// batch is bound by reading every weight once per step, so the kernels are built around one
// thing: keep enough 16-byte weight loads in flight on every SM to saturate HBM, and make
// everything else (x, the multiply-adds, the reduction) cheap enough to hide behind them.
//
// Launch (both kernels): grid (ceil(N / GEMV_ROWS_PER_BLOCK)) = ceil(N / 16), block (256), no
// dynamic shared memory (static: 5 KB for gemv_bf16, 25 KB for gemv_silu_bf16).
//
// Layout of the work. A block owns 16 consecutive weight rows [n0, n0 + 16) and all of K. Its 8
// warps split K: K is cut into tiles of 32 columns, and warp wi takes tiles wi, wi + 8, wi + 16,
// ... (balanced whenever K % 256 == 0; at any moment the 8 warps read adjacent 64-byte pieces of
// the same 16 rows). Per tile a warp does two bf16 tensor-core MMAs, mma.sync m16n8k16 with f32
// accumulation: A = the 16 x 32 weight tile, B = the 32 x 8 tile of x^T (8 batch rows; rows of x
// past M are zeros), so the multiply-adds cost two instructions per 1 KB of weights, whatever M
// is (1..8), and no shuffles. The trick that lets 16-byte loads feed the MMA fragments directly:
// the order of k inside a dot product is free, so lane (g = lane / 4, t = lane % 4) loads the 8
// bf16 at k = 32 j + 8 t of rows n0 + g and n0 + g + 8 (two LDG.128, streamed with
// ld.global.nc.L1::no_allocate.L2::256B: read once, kept out of L1) and the 8 bf16 of x row g at
// the same k (one LDG.128 through L1: x is small and shared by all blocks); elements {0,1,2,3}
// of each 16-byte vector are the fragment of the first MMA, {4,5,6,7} of the second, and A and B
// agree on that permutation of k. The main loop does 4 tiles per step: 8 independent weight
// LDG.128 per lane (4 KB per warp) in flight before the first MMA, two accumulator sets to keep
// the MMA chain short; a remainder loop takes the last tiles one at a time with per-lane bounds
// checks (any K % 8 == 0). At the end each warp's 16 x 8 partial sums go through shared memory
// and 128 threads add the 8 warps in a fixed order (deterministic) and write out[m, n] (16
// consecutive n per m: coalesced), f32 or bf16 (round to nearest even).
//
// Bandwidth reasoning. Per SM, HBM needs about 3.0 TB/s / 132 = 23 GB/s (H100) or 4.3 / 132 =
// 33 GB/s (H200); with ~1 us of loaded latency that is 23 to 33 KB in flight per SM. A block has
// 8 warps x 4 KB = 32 KB in flight per main-loop step, and 2 to 3 blocks are resident per SM
// (registers below), so 64 to 96 KB: 2 to 3 times the need, which also covers the part of each
// step spent on the MMAs. Extra traffic: x is read once per block (M x K x 2 bytes against 16 x K
// x 2 of weights, so M / 16 of the weight bytes, mostly from L2/L1); nothing else. With N = 4096
// the grid is 256 blocks, about 2 per SM, all resident in one wave; the LM head (N ~ 128K) runs
// many waves. Small matrices (a few MB) are dominated by launch and first-load latency instead.
//
// Registers (ptxas, sm_90a, CUDA 13.0): gemv_bf16 ~40 registers (up to 6 blocks/SM by
// registers), gemv_silu_bf16 ~90 (2 blocks/SM); no spills, no stack. See the file's end for the
// silu cost.
//
// Fallback. K % 8 != 0 or a pointer (x / gate_up, w) not 16-byte aligned: a scalar path, each
// warp 2 rows, lanes striding k, warp-shuffle reductions (correct for any size; slow). M > 8
// (either path): the kernel loops over groups of 8 rows of x, re-reading the weights each time.
//
// gemv_silu_bf16 computes its B operand act[m, k] = bf16(silu(g) * u) (g = gate_up[m, k], u =
// gate_up[m, K + k], silu(g) = g / (1 + expf(-g)) in f32: the same expression and rounding as
// silu_mul_bf16 in norm.cu, so it sees bit for bit what silu_mul_bf16 + a GEMM would). Each act
// element is computed once per block: per step all 32 lanes of a warp compute the M x 128 act
// values of its 4 tiles (4 x M per lane, templated on M = 1..8 by a switch), stage them in a
// per-warp shared-memory buffer, and read them back as B fragments. The cost is intrinsic to
// 16 rows per block: M x K silu evaluations per 32 x K bytes of weights, ~25 instructions each;
// at M = 1..4 it hides behind the loads, at M = 8 it takes roughly two thirds of the SM's issue
// rate at full HBM speed on an H200, so there the fused kernel may fall short of the plain one by
// some percent (still no slower than silu_mul_bf16 + gemv_bf16 would be, give or take).

#include "common.cuh"

// Weight rows per block (the host's grid is ceil(N / GEMV_ROWS_PER_BLOCK)); block is 256 threads.
#define GEMV_ROWS_PER_BLOCK 16
#define GEMV_THREADS 256
#define GEMV_WARPS 8
// Tiles (32 columns of K) per main-loop step and warp.
#define GEMV_UNROLL 4
// Per-warp act staging buffer of gemv_silu_bf16: 8 rows of 128 bf16, padded to 160 (320 bytes) so
// that the B-fragment reads (16 bytes, rows g and g + 1 in one quarter-warp) hit distinct banks.
#define GEMV_ACT_STRIDE 160
// Reduction buffer: [warp][m][row], row stride padded to 20 floats (conflict-free writes).
#define GEMV_RED_STRIDE 20
#define GEMV_RED_WARP (8 * GEMV_RED_STRIDE)

namespace {

// ---------------------------------------------------------------------------------------------
// Loads and the MMA.

// Weights: read once per step; keep them out of L1 and ask L2 for 256-byte fetches.
__device__ __forceinline__ uint4 ld_stream16(const bf16* p) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
    return v;
}

// Activations: small, reused by every block; through L1.
__device__ __forceinline__ uint4 ld_cached16(const bf16* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }
__device__ __forceinline__ uint2 ld_cached8(const bf16* p) { return __ldg(reinterpret_cast<const uint2*>(p)); }

__device__ __forceinline__ uint4 lds16(const bf16* p) { return *reinterpret_cast<const uint4*>(p); }
__device__ __forceinline__ void sts8(bf16* p, uint2 v) { *reinterpret_cast<uint2*>(p) = v; }

// d += A (16 x 16, row) * B (16 x 8, col), bf16 inputs, f32 accumulators.
// a0: (row g, k 2t..2t+1), a1: (row g + 8, k 2t..), a2: (row g, k 2t+8..), a3: (row g + 8, k 2t+8..);
// b0: (k 2t..2t+1, col g), b1: (k 2t+8.., col g); d: (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1).
__device__ __forceinline__ void mma16816(float (&d)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                         unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Exactly silu_mul of norm.cu (same expression, so the same code and rounding).
__device__ __forceinline__ float silu_mul(float g, float u) { return g / (1.0f + expf(-g)) * u; }

// ---------------------------------------------------------------------------------------------
// B-fragment providers: b[u] = the 8 bf16 of batch row g at k = 32 (j0 + 8u) + 8t, or zeros where
// g is past the group's rows or k is past K (CHECK).

// gemv_bf16: straight from x.
struct XFrag {
    const bf16* xr;  // x row (m0 + g), clamped to the group's last row when !on
    bool on;         // g < rows in this group
    unsigned mask;   // on ? ~0 : 0
    int t;

    template <int U, bool CHECK>
    __device__ __forceinline__ void load(int j0, int K, uint4 (&b)[U]) const {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int k = (j0 + 8 * u) * 32 + 8 * t;
            if (CHECK) {
                if (on && k < K)
                    b[u] = ld_cached16(xr + k);
                else
                    b[u] = make_uint4(0u, 0u, 0u, 0u);
            } else {
                // Branch-free: lanes past the group's rows read the last row (same addresses as a
                // live lane, so no extra traffic) and zero it.
                const uint4 v = ld_cached16(xr + k);
                b[u] = make_uint4(v.x & mask, v.y & mask, v.z & mask, v.w & mask);
            }
        }
    }
};

// gemv_silu_bf16: act = bf16(silu(gate) * up), MB rows of this group. The warp's 32 lanes compute
// the MB x (32 U) act values of the step once (lane: tile u = lane / 8, 4 columns at 4 (lane % 8)),
// stage them in the warp's shared buffer [MB][GEMV_ACT_STRIDE], then read the fragments.
template <int MB>
struct ActFrag {
    const bf16* gu;  // gate_up row m0 (the group's first row); row stride 2K
    bf16* s;         // this warp's staging buffer
    int lane, g, t;

    template <int U, bool CHECK>
    __device__ __forceinline__ void load(int j0, int K, uint4 (&b)[U]) const {
        const int cu = lane >> 3, c = lane & 7;
        const int kc = (j0 + 8 * cu) * 32 + 4 * c;
        const bool mine = cu < U && (!CHECK || kc < K);  // K % 8 == 0: kc < K means all 4 are in
        __syncwarp();  // the previous step's fragment reads are done
        if (mine) {
            uint2 gv[MB], uv[MB];
#pragma unroll
            for (int m = 0; m < MB; ++m) {
                const bf16* row = gu + static_cast<long long>(m) * 2 * K;
                gv[m] = ld_cached8(row + kc);
                uv[m] = ld_cached8(row + K + kc);
            }
#pragma unroll
            for (int m = 0; m < MB; ++m) {
                const float a0 = silu_mul(bf16_lo(gv[m].x), bf16_lo(uv[m].x));
                const float a1 = silu_mul(bf16_hi(gv[m].x), bf16_hi(uv[m].x));
                const float a2 = silu_mul(bf16_lo(gv[m].y), bf16_lo(uv[m].y));
                const float a3 = silu_mul(bf16_hi(gv[m].y), bf16_hi(uv[m].y));
                sts8(s + m * GEMV_ACT_STRIDE + cu * 32 + 4 * c, make_uint2(pack2(a0, a1), pack2(a2, a3)));
            }
        }
        __syncwarp();
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int k = (j0 + 8 * u) * 32 + 8 * t;
            if (g < MB && (!CHECK || k < K))
                b[u] = lds16(s + g * GEMV_ACT_STRIDE + u * 32 + 8 * t);
            else
                b[u] = make_uint4(0u, 0u, 0u, 0u);
        }
    }
};

// ---------------------------------------------------------------------------------------------
// The K loop of one warp: tiles j = wi, wi + 8, ...; acc[0] takes the first MMA of each tile,
// acc[1] the second.

template <int U, bool CHECK, class Frag>
__device__ __forceinline__ void gemv_step(const bf16* wa, const bf16* wb, int j0, int t, int K, const Frag& fr,
                                          float (&acc)[2][4]) {
    uint4 a[U], c[U], b[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const int k = (j0 + 8 * u) * 32 + 8 * t;
        if (!CHECK || k < K) {
            a[u] = ld_stream16(wa + k);
            c[u] = ld_stream16(wb + k);
        } else {
            a[u] = make_uint4(0u, 0u, 0u, 0u);
            c[u] = make_uint4(0u, 0u, 0u, 0u);
        }
    }
    fr.template load<U, CHECK>(j0, K, b);
#pragma unroll
    for (int u = 0; u < U; ++u) {
        mma16816(acc[0], a[u].x, c[u].x, a[u].y, c[u].y, b[u].x, b[u].y);
        mma16816(acc[1], a[u].z, c[u].z, a[u].w, c[u].w, b[u].z, b[u].w);
    }
}

template <class Frag>
__device__ __forceinline__ void gemv_k_loop(const bf16* wa, const bf16* wb, int wi, int t, int K, const Frag& fr,
                                            float (&acc)[2][4]) {
    const int full = K >> 5;          // tiles entirely inside K
    const int tiles = (K + 31) >> 5;  // with the partial last one
    int j = wi;
    for (; j + 8 * (GEMV_UNROLL - 1) < full; j += 8 * GEMV_UNROLL)
        gemv_step<GEMV_UNROLL, false>(wa, wb, j, t, K, fr, acc);
    for (; j < tiles; j += 8) gemv_step<1, true>(wa, wb, j, t, K, fr, acc);
}

// The block's 8 partial 16 x 8 tiles -> out rows m0 .. m0 + mc - 1, columns n0 .. n0 + 15.
__device__ __forceinline__ void gemv_epilogue(const float (&acc)[2][4], float* red, int wi, int g, int t, int n0,
                                              int N, int m0, int mc, void* out, int out_f32) {
    __syncthreads();  // an earlier group may still be reading red
    float* r = red + wi * GEMV_RED_WARP;
    r[(2 * t) * GEMV_RED_STRIDE + g] = acc[0][0] + acc[1][0];
    r[(2 * t + 1) * GEMV_RED_STRIDE + g] = acc[0][1] + acc[1][1];
    r[(2 * t) * GEMV_RED_STRIDE + g + 8] = acc[0][2] + acc[1][2];
    r[(2 * t + 1) * GEMV_RED_STRIDE + g + 8] = acc[0][3] + acc[1][3];
    __syncthreads();
    if (threadIdx.x < 8 * GEMV_ROWS_PER_BLOCK) {
        const int m = threadIdx.x >> 4, row = threadIdx.x & 15, n = n0 + row;
        if (m < mc && n < N) {
            float s = 0.0f;
#pragma unroll
            for (int v = 0; v < GEMV_WARPS; ++v) s += red[v * GEMV_RED_WARP + m * GEMV_RED_STRIDE + row];
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

template <int MB>
__device__ __forceinline__ void gemv_silu_group(const bf16* gu, bf16* s, const bf16* wa, const bf16* wb, int lane,
                                                int wi, int K, float (&acc)[2][4]) {
    const ActFrag<MB> fr{gu, s, lane, lane >> 2, lane & 3};
    gemv_k_loop(wa, wb, wi, lane & 3, K, fr, acc);
}

}  // namespace

// out[m, n] = sum_k x[m, k] * w[n, k]; f32 accumulation; out f32 [M, N] when out_f32 != 0, else
// bf16 [M, N] (round to nearest even).
// x [M, K] bf16, w [N, K] bf16, any M >= 0 (fast for M <= 8), N, K.
// grid (ceil(N / GEMV_ROWS_PER_BLOCK)) = ceil(N / 16), block (256), no dynamic shared memory.
extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_bf16(const bf16* x, const bf16* w, void* out, int M,
                                                                     int N, int K, int out_f32) {
    __shared__ float red[GEMV_WARPS * GEMV_RED_WARP];
    const int n0 = blockIdx.x * GEMV_ROWS_PER_BLOCK;
    if (n0 >= N) return;  // block-uniform
    if ((K & 7) != 0 || !aligned16(x) || !aligned16(w)) {
        gemv_scalar<false>(x, w, out, M, N, K, out_f32);
        return;
    }
    const int lane = lane_id(), wi = warp_id(), g = lane >> 2, t = lane & 3;
    const bf16* wa = w + static_cast<long long>(min(n0 + g, N - 1)) * K;
    const bf16* wb = w + static_cast<long long>(min(n0 + g + 8, N - 1)) * K;
    for (int m0 = 0; m0 < M; m0 += 8) {
        const int mc = min(8, M - m0);
        const XFrag fr{x + static_cast<long long>(m0 + min(g, mc - 1)) * K, g < mc, g < mc ? ~0u : 0u, t};
        float acc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
        gemv_k_loop(wa, wb, wi, t, K, fr, acc);
        gemv_epilogue(acc, red, wi, g, t, n0, N, m0, mc, out, out_f32);
    }
}

// out[m, n] = sum_k act[m, k] * w[n, k] with act[m, k] = bf16(silu(gate_up[m, k]) * gate_up[m, K + k])
// (exactly the rows silu_mul_bf16 would write); out as gemv_bf16.
// gate_up [M, 2K] bf16, w [N, K] bf16, any M >= 0 (fast for M <= 8), N, K.
// grid (ceil(N / GEMV_ROWS_PER_BLOCK)) = ceil(N / 16), block (256), no dynamic shared memory.
extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_silu_bf16(const bf16* gate_up, const bf16* w,
                                                                          void* out, int M, int N, int K,
                                                                          int out_f32) {
    __shared__ float red[GEMV_WARPS * GEMV_RED_WARP];
    __shared__ __align__(16) bf16 act[GEMV_WARPS * 8 * GEMV_ACT_STRIDE];
    const int n0 = blockIdx.x * GEMV_ROWS_PER_BLOCK;
    if (n0 >= N) return;  // block-uniform
    if ((K & 7) != 0 || !aligned16(gate_up) || !aligned16(w)) {
        gemv_scalar<true>(gate_up, w, out, M, N, K, out_f32);
        return;
    }
    const int lane = lane_id(), wi = warp_id(), g = lane >> 2, t = lane & 3;
    const bf16* wa = w + static_cast<long long>(min(n0 + g, N - 1)) * K;
    const bf16* wb = w + static_cast<long long>(min(n0 + g + 8, N - 1)) * K;
    bf16* s = act + wi * 8 * GEMV_ACT_STRIDE;
    for (int m0 = 0; m0 < M; m0 += 8) {
        const int mc = min(8, M - m0);
        const bf16* gu = gate_up + static_cast<long long>(m0) * 2 * K;
        float acc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
        switch (mc) {
            case 1: gemv_silu_group<1>(gu, s, wa, wb, lane, wi, K, acc); break;
            case 2: gemv_silu_group<2>(gu, s, wa, wb, lane, wi, K, acc); break;
            case 3: gemv_silu_group<3>(gu, s, wa, wb, lane, wi, K, acc); break;
            case 4: gemv_silu_group<4>(gu, s, wa, wb, lane, wi, K, acc); break;
            case 5: gemv_silu_group<5>(gu, s, wa, wb, lane, wi, K, acc); break;
            case 6: gemv_silu_group<6>(gu, s, wa, wb, lane, wi, K, acc); break;
            case 7: gemv_silu_group<7>(gu, s, wa, wb, lane, wi, K, acc); break;
            default: gemv_silu_group<8>(gu, s, wa, wb, lane, wi, K, acc); break;
        }
        gemv_epilogue(acc, red, wi, g, t, n0, N, m0, mc, out, out_f32);
    }
}
