// Row-wise and element-wise bf16 kernels: embedding, RMSNorm (plain and fused with the residual
// add), add, SiLU-gate, row gather, f32 -> bf16, and the dummy-weight generator.
//
// All activations are row-major bf16; math is f32 and each output is rounded to bf16 once
// (round to nearest even). Any size works: 16-byte accesses are taken only where every pointer
// is 16-byte aligned and the row width is a multiple of 8, otherwise a scalar path runs.
// The reference is the CPU backend, crates/yalis-engine/src/cpu.rs.

#include "common.cuh"

// Widest row that add_rms_norm_bf16 / rms_norm_bf16 keep in registers: NORM_VECS bf16x8 vectors
// per thread (16384 elements with 256 threads); wider rows are read twice.
#define NORM_VECS 8

// out[t, :] = table[ids[t] - vocab_start, :] when that row is in [0, rows), else zeros (the
// rows of other vocab shards).
// out [T, H] bf16, ids [T] u32, table [rows, H] bf16.
// grid (T), block (256), no shared memory.
extern "C" __global__ void __launch_bounds__(256) embedding_bf16(bf16* out, const unsigned int* ids,
                                                                 const bf16* table, int T, int H,
                                                                 int vocab_start, int rows) {
    pdl_wait();
    const int t = blockIdx.x;
    if (t >= T) return;
    const long long local = static_cast<long long>(ids[t]) - static_cast<long long>(vocab_start);
    bf16* o = out + static_cast<long long>(t) * H;
    if (local >= 0 && local < rows) {
        block_copy_bf16(o, table + local * H, H);
    } else {
        const bf16 zero = __float2bfloat16_rn(0.0f);
        for (int i = threadIdx.x; i < H; i += blockDim.x) o[i] = zero;
    }
}

// One row of RMSNorm, with the residual add fused in when ADD: r = bf16(residual + delta) is
// written back to residual, and the norm is taken over the rounded r. HF order:
// out = bf16(w * (r * rsqrt(mean(r^2) + eps))).
template <bool ADD>
__device__ __forceinline__ void rms_norm_row(bf16* res, const bf16* delta, const bf16* w, bf16* out,
                                             int H, float eps) {
    const int tid = threadIdx.x, nt = blockDim.x;
    const bool vec = (H & 7) == 0 && aligned16(res) && aligned16(w) && aligned16(out) &&
                     (!ADD || aligned16(delta));
    const int nv = H >> 3;
    if (vec && nv <= NORM_VECS * nt) {
        // The row in registers: vector k of this thread is tid + k * nt.
        uint4 r[NORM_VECS];
        float ss = 0.0f;
#pragma unroll
        for (int k = 0; k < NORM_VECS; ++k) {
            const int v = tid + k * nt;
            if (v < nv) {
                r[k] = load8(res + 8 * v);
                if (ADD) {
                    float a[8], d[8];
                    unpack8(r[k], a);
                    load8(delta + 8 * v, d);
#pragma unroll
                    for (int j = 0; j < 8; ++j) a[j] += d[j];
                    r[k] = pack8(a);
                    store8(res + 8 * v, r[k]);
                }
                float a[8];
                unpack8(r[k], a);
#pragma unroll
                for (int j = 0; j < 8; ++j) ss = fmaf(a[j], a[j], ss);
            }
        }
        const float inv = rsqrtf(block_sum(ss) / static_cast<float>(H) + eps);
#pragma unroll
        for (int k = 0; k < NORM_VECS; ++k) {
            const int v = tid + k * nt;
            if (v < nv) {
                float a[8], g[8];
                unpack8(r[k], a);
                load8(w + 8 * v, g);
#pragma unroll
                for (int j = 0; j < 8; ++j) a[j] = g[j] * (a[j] * inv);
                store8(out + 8 * v, a);
            }
        }
    } else if (vec) {
        // Too wide for registers: a second read of the row (this thread's own writes).
        float ss = 0.0f;
        for (int v = tid; v < nv; v += nt) {
            float a[8];
            load8(res + 8 * v, a);
            if (ADD) {
                float d[8];
                load8(delta + 8 * v, d);
#pragma unroll
                for (int j = 0; j < 8; ++j) a[j] += d[j];
                const uint4 p = pack8(a);
                store8(res + 8 * v, p);
                unpack8(p, a);
            }
#pragma unroll
            for (int j = 0; j < 8; ++j) ss = fmaf(a[j], a[j], ss);
        }
        const float inv = rsqrtf(block_sum(ss) / static_cast<float>(H) + eps);
        for (int v = tid; v < nv; v += nt) {
            float a[8], g[8];
            load8(res + 8 * v, a);
            load8(w + 8 * v, g);
#pragma unroll
            for (int j = 0; j < 8; ++j) a[j] = g[j] * (a[j] * inv);
            store8(out + 8 * v, a);
        }
    } else {
        float ss = 0.0f;
        for (int i = tid; i < H; i += nt) {
            float a = __bfloat162float(res[i]);
            if (ADD) {
                const bf16 b = __float2bfloat16_rn(a + __bfloat162float(delta[i]));
                res[i] = b;
                a = __bfloat162float(b);
            }
            ss = fmaf(a, a, ss);
        }
        const float inv = rsqrtf(block_sum(ss) / static_cast<float>(H) + eps);
        for (int i = tid; i < H; i += nt) {
            const float a = __bfloat162float(res[i]);
            out[i] = __float2bfloat16_rn(__bfloat162float(w[i]) * (a * inv));
        }
    }
}

// out = bf16(w * (x * rsqrt(mean(x^2) + eps))) per row.
// out, x [rows, H] bf16; w [H] bf16.
// grid (rows), block (256), no shared memory (128 bytes static for the reduction).
extern "C" __global__ void __launch_bounds__(256) rms_norm_bf16(bf16* out, const bf16* x, const bf16* w,
                                                                int rows, int H, float eps) {
    pdl_wait();
    const int r = blockIdx.x;
    if (r >= rows) return;
    const long long off = static_cast<long long>(r) * H;
    // x is only read: the ADD=false path never writes through the first pointer.
    rms_norm_row<false>(const_cast<bf16*>(x) + off, nullptr, w, out + off, H, eps);
}

// residual = bf16(residual + delta) in place, then out = rms_norm(residual) * w over the
// rounded residual.
// residual, delta, out [rows, H] bf16; w [H] bf16. residual and out must not overlap.
// grid (rows), block (256), no shared memory (128 bytes static).
extern "C" __global__ void __launch_bounds__(256) add_rms_norm_bf16(bf16* residual, const bf16* delta,
                                                                    const bf16* w, bf16* out, int rows,
                                                                    int H, float eps) {
    pdl_wait();
    const int r = blockIdx.x;
    if (r >= rows) return;
    const long long off = static_cast<long long>(r) * H;
    rms_norm_row<true>(residual + off, delta + off, w, out + off, H, eps);
}

// acc = bf16(acc + x), n elements; a grid-stride loop, so any grid covers n.
// acc, x [n] bf16.
// grid (max(1, ceil(n / 2048))), block (256): 8 elements per thread per iteration.
extern "C" __global__ void __launch_bounds__(256) add_bf16(bf16* acc, const bf16* x, long long n) {
    pdl_wait();
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    const long long g = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    long long start = 0;
    if (aligned16(acc) && aligned16(x)) {
        const long long nv = n >> 3;
        for (long long v = g; v < nv; v += stride) {
            float a[8], b[8];
            load8(acc + 8 * v, a);
            load8(x + 8 * v, b);
#pragma unroll
            for (int j = 0; j < 8; ++j) a[j] += b[j];
            store8(acc + 8 * v, a);
        }
        start = nv << 3;
    }
    for (long long i = start + g; i < n; i += stride)
        acc[i] = __float2bfloat16_rn(__bfloat162float(acc[i]) + __bfloat162float(x[i]));
}

__device__ __forceinline__ float silu_mul(float g, float u) { return g / (1.0f + expf(-g)) * u; }

// gate_up row r = [gate (I) | up (I)]; out[r, j] = bf16(silu(gate[j]) * up[j]).
// out [rows, I] bf16; gate_up [rows, 2I] bf16.
// grid (rows), block (256), no shared memory.
extern "C" __global__ void __launch_bounds__(256) silu_mul_bf16(bf16* out, const bf16* gate_up, int rows,
                                                                int I) {
    pdl_wait();
    const int r = blockIdx.x;
    if (r >= rows) return;
    const bf16* g = gate_up + static_cast<long long>(r) * 2 * I;
    const bf16* u = g + I;
    bf16* o = out + static_cast<long long>(r) * I;
    int start = 0;
    if ((I & 7) == 0 && aligned16(gate_up) && aligned16(out)) {
        const int nv = I >> 3;
        for (int v = threadIdx.x; v < nv; v += blockDim.x) {
            float a[8], b[8];
            load8(g + 8 * v, a);
            load8(u + 8 * v, b);
#pragma unroll
            for (int j = 0; j < 8; ++j) a[j] = silu_mul(a[j], b[j]);
            store8(o + 8 * v, a);
        }
        start = I;
    }
    for (int i = start + threadIdx.x; i < I; i += blockDim.x)
        o[i] = __float2bfloat16_rn(silu_mul(__bfloat162float(g[i]), __bfloat162float(u[i])));
}

// out[i, :] = x[rows[i], :].
// out [n, cols] bf16; x [*, cols] bf16; rows [n] i32.
// grid (n), block (256), no shared memory.
extern "C" __global__ void __launch_bounds__(256) gather_rows_bf16(bf16* out, const bf16* x, const int* rows,
                                                                   int n, int cols) {
    pdl_wait();
    const int i = blockIdx.x;
    if (i >= n) return;
    block_copy_bf16(out + static_cast<long long>(i) * cols, x + static_cast<long long>(rows[i]) * cols, cols);
}

// out = bf16(in), n elements; a grid-stride loop.
// out [n] bf16; in [n] f32.
// grid (max(1, ceil(n / 2048))), block (256): 8 elements per thread per iteration.
extern "C" __global__ void __launch_bounds__(256) f32_to_bf16(bf16* out, const float* in, long long n) {
    pdl_wait();
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    const long long g = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    long long start = 0;
    if (aligned16(out) && aligned16(in)) {
        const long long nv = n >> 3;
        const float4* in4 = reinterpret_cast<const float4*>(in);
        for (long long v = g; v < nv; v += stride) {
            const float4 a = in4[2 * v], b = in4[2 * v + 1];
            store8(out + 8 * v, make_uint4(pack2(a.x, a.y), pack2(a.z, a.w), pack2(b.x, b.y), pack2(b.z, b.w)));
        }
        start = nv << 3;
    }
    for (long long i = start + g; i < n; i += stride) out[i] = __float2bfloat16_rn(in[i]);
}

// Dummy weights, bit-exact with DummyGen::value (crates/yalis-core/src/weights.rs): the slice
// [row0, row0 + out_rows) x [col0, col0 + out_cols) of a tensor with full_cols columns, element
// i = (row0 + r) * full_cols + (col0 + c) (u64, wrapping) of the full tensor being
// bf16(mean + a * (2 * uniform(key, i) - 1)), f32 with one rounding per operation (no FMA).
// out [out_rows, out_cols] bf16, contiguous.
// grid (max(1, ceil(out_rows * out_cols / 2048))), block (256); a grid-stride loop over chunks of
// 8 consecutive elements, so any grid covers the slice.
extern "C" __global__ void __launch_bounds__(256) dummy_fill_bf16(bf16* out, int out_rows, int out_cols,
                                                                  long long full_cols, long long row0,
                                                                  long long col0, unsigned long long key,
                                                                  float mean, float a) {
    pdl_wait();
    const long long total = static_cast<long long>(out_rows) * out_cols;
    const long long nchunks = (total + 7) >> 3;
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    const bool vec = aligned16(out);
    for (long long ch = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; ch < nchunks;
         ch += stride) {
        const long long e0 = ch << 3;
        long long r = e0 / out_cols;
        long long c = e0 - r * out_cols;
        float f[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const u64 i = static_cast<u64>(row0 + r) * static_cast<u64>(full_cols) + static_cast<u64>(col0 + c);
            const float u = uniform(key, i);
            f[j] = __fadd_rn(mean, __fmul_rn(a, __fsub_rn(__fmul_rn(2.0f, u), 1.0f)));
            if (++c == out_cols) {
                c = 0;
                ++r;
            }
        }
        if (vec && e0 + 8 <= total) {
            store8(out + e0, f);
        } else {
#pragma unroll
            for (int j = 0; j < 8; ++j)
                if (e0 + j < total) out[e0 + j] = __float2bfloat16_rn(f[j]);
        }
    }
}
