// Rotary embedding on the fused qkv activation, and the copy of k and v into the cache.
//
// qkv row t is [q heads | k heads | v heads], each head_dim wide: width
// (q_heads + 2 * kv_heads) * head_dim bf16. head_dim is even; any other size works (16-byte
// accesses only where alignment and divisibility allow). Reference: crates/yalis-engine/src/cpu.rs.

#include "common.cuh"

// x1' = x1 c - x2 s, x2' = x2 c + x1 s, as the CPU computes them (two products, then one add,
// each rounded: no FMA), so the f32 results match it bit for bit before the bf16 rounding.
__device__ __forceinline__ void rotate(float& x1, float& x2, float c, float s) {
    const float a = x1, b = x2;
    x1 = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
    x2 = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
}

// In place, for the q and k heads of token t (v untouched), half = head_dim / 2, i < half:
// (h[i], h[i + half]) rotated by cos_t/sin_t[pos * half + i], pos = positions[t]. A token whose
// position is outside [0, max_pos) is left unchanged.
// qkv [T, (q_heads + 2 kv_heads) * head_dim] bf16; positions [T] i32;
// cos_t, sin_t [max_pos, head_dim / 2] f32.
// grid (T), block (128), no shared memory.
// The rotation of token t's q and k heads, by the threads of one block.
__device__ __forceinline__ void rope_row(bf16* qkv, const int* positions, const float* cos_t, const float* sin_t,
                                         int t, int q_heads, int kv_heads, int head_dim, int max_pos) {
    const int pos = positions[t];
    if (pos < 0 || pos >= max_pos) return;
    const int half = head_dim >> 1;
    const int heads = q_heads + kv_heads;
    bf16* row = qkv + static_cast<long long>(t) * (q_heads + 2 * kv_heads) * head_dim;
    const float* cr = cos_t + static_cast<long long>(pos) * half;
    const float* sr = sin_t + static_cast<long long>(pos) * half;
    if ((half & 7) == 0 && aligned16(qkv) && aligned16(cos_t) && aligned16(sin_t)) {
        // 8 pairs per item: head h, pairs 8j .. 8j + 7.
        const int per_head = half >> 3;
        for (int p = threadIdx.x; p < heads * per_head; p += blockDim.x) {
            const int h = p / per_head;
            const int i0 = (p - h * per_head) << 3;
            bf16* x = row + static_cast<long long>(h) * head_dim + i0;
            float x1[8], x2[8];
            load8(x, x1);
            load8(x + half, x2);
            const float4 c0 = *reinterpret_cast<const float4*>(cr + i0);
            const float4 c1 = *reinterpret_cast<const float4*>(cr + i0 + 4);
            const float4 s0 = *reinterpret_cast<const float4*>(sr + i0);
            const float4 s1 = *reinterpret_cast<const float4*>(sr + i0 + 4);
            const float c[8] = {c0.x, c0.y, c0.z, c0.w, c1.x, c1.y, c1.z, c1.w};
            const float s[8] = {s0.x, s0.y, s0.z, s0.w, s1.x, s1.y, s1.z, s1.w};
#pragma unroll
            for (int j = 0; j < 8; ++j) rotate(x1[j], x2[j], c[j], s[j]);
            store8(x, x1);
            store8(x + half, x2);
        }
    } else {
        for (int p = threadIdx.x; p < heads * half; p += blockDim.x) {
            const int h = p / half;
            const int i = p - h * half;
            bf16* x = row + static_cast<long long>(h) * head_dim + i;
            float x1 = __bfloat162float(x[0]), x2 = __bfloat162float(x[half]);
            rotate(x1, x2, cr[i], sr[i]);
            x[0] = __float2bfloat16_rn(x1);
            x[half] = __float2bfloat16_rn(x2);
        }
    }
}

extern "C" __global__ void __launch_bounds__(128) rope_bf16(bf16* qkv, const int* positions, const float* cos_t,
                                                            const float* sin_t, int T, int q_heads, int kv_heads,
                                                            int head_dim, int max_pos) {
    pdl_wait();
    const int t = blockIdx.x;
    if (t >= T) return;
    rope_row(qkv, positions, cos_t, sin_t, t, q_heads, kv_heads, head_dim, max_pos);
}

// Token t's k heads (qkv columns q_heads * hd .. (q_heads + kv_heads) * hd) and v heads (the
// next kv_heads * hd columns) go to k_cache / v_cache at (token_slot[t], positions[t]). A token
// whose slot is negative or whose position is outside [0, max_seq) writes nothing (the host checks
// slot < slots).
// qkv [T, (q_heads + 2 kv_heads) * hd] bf16; k_cache, v_cache [slots, max_seq, kv_heads, hd] bf16;
// token_slot, positions [T] i32.
// grid (T), block (128), no shared memory.
__device__ __forceinline__ void write_kv_row(const bf16* qkv, bf16* k_cache, bf16* v_cache, const int* token_slot,
                                             const int* positions, int t, int q_heads, int kv_heads, int head_dim,
                                             int max_seq) {
    const int slot = token_slot[t], pos = positions[t];
    if (slot < 0 || pos < 0 || pos >= max_seq) return;
    const long long kv_w = static_cast<long long>(kv_heads) * head_dim;
    const bf16* k = qkv + static_cast<long long>(t) * (q_heads + 2 * kv_heads) * head_dim +
                    static_cast<long long>(q_heads) * head_dim;
    const long long dst = (static_cast<long long>(slot) * max_seq + pos) * kv_w;
    block_copy_bf16(k_cache + dst, k, kv_w);
    block_copy_bf16(v_cache + dst, k + kv_w, kv_w);
}

extern "C" __global__ void __launch_bounds__(128) write_kv_bf16(const bf16* qkv, bf16* k_cache, bf16* v_cache,
                                                                const int* token_slot, const int* positions,
                                                                int T, int q_heads, int kv_heads, int head_dim,
                                                                int max_seq) {
    pdl_wait();
    const int t = blockIdx.x;
    if (t >= T) return;
    write_kv_row(qkv, k_cache, v_cache, token_slot, positions, t, q_heads, kv_heads, head_dim, max_seq);
}

// rope_bf16 then write_kv_bf16 in one launch (decode runs both in every layer).
// grid (T), block (128), no shared memory. The barrier makes the block's rotated k heads
// visible to the threads that copy them into the cache.
extern "C" __global__ void __launch_bounds__(128) rope_write_kv_bf16(bf16* qkv, const int* positions,
                                                                     const float* cos_t, const float* sin_t,
                                                                     bf16* k_cache, bf16* v_cache,
                                                                     const int* token_slot, int T, int q_heads,
                                                                     int kv_heads, int head_dim, int max_pos,
                                                                     int max_seq) {
    pdl_wait();
    const int t = blockIdx.x;
    if (t >= T) return;
    rope_row(qkv, positions, cos_t, sin_t, t, q_heads, kv_heads, head_dim, max_pos);
    __syncthreads();
    write_kv_row(qkv, k_cache, v_cache, token_slot, positions, t, q_heads, kv_heads, head_dim, max_seq);
}
