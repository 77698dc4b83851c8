// Next-token sampling on the GPU, one block per sequence: greedy, or temperature, top-k and
// top-p, reproducing the CPU sampler (crates/yalis-core/src/sampling.rs) without sorting.
//
// Reference semantics, row = logits[s * ld .. s * ld + vocab), NaN logits dropped:
//   temperature == 0: argmax (ties to the lowest id; all NaN: 0).
//   order O = larger logit first (total order: -0 < +0), ties by lower id; w = logit / T.
//   top-k (0 < k < number of non-NaN logits): keep the first k of O. p_i = exp(w_i - max).
//   top-p (p < 1): keep the shortest prefix of O (within the top-k) whose cumulative p reaches
//   top_p * total (at least one). Then u = uniform(keys[s], counters[s]) and the kept tokens are
//   walked in id order: the first whose cumulative p exceeds u * (sum of kept p) is drawn.
//   A max that is not finite (+inf logit, no finite logit) falls back to argmax.
//
// How, exactly: logits map to u32 keys whose order is the float order above (keys compare like
// Rust's total_cmp; the CPU's f64 w = x / T keeps that order exactly). Probabilities are held as
// fixed-point integers m = round(2^((x - max) * log2(e) / T + S)) (one ex2.approx, f32), with
// S = 63 - floor(log2(vocab)) so that every sum fits a u64 and does not depend on the order of the
// additions: the kernel is deterministic and its CDF comparisons (cum >= target, cum > u * total)
// are exact in that fixed point. It differs from the f64 CPU only where a cumulative sum lies
// within f32 rounding (~1e-6 relative) of a threshold, and by never drawing tokens with
// p < 2^-(S+1) (~1e-14 for a 128K vocab; the CPU draws them with that probability).
//   The kept set is always a prefix of O: all keys > tau plus the first e tokens (in id order)
// whose key == tau. tau comes from a radix select over the keys (11-bit digits, a 2048-bin
// histogram of u64 weights in shared memory per pass, at most 3 passes, the third usually over a
// list of the second pass's keys in shared memory): counts for top-k, masses for top-p. If fewer
// than all the ties at tau are kept, the id of the e-th tie is found by a counting pass. The draw
// is a block-wide prefix scan in id order: per-warp segment sums, then a scan of the one segment
// where the CDF crosses the target.
//
// Cost per row (V = vocab; each pass reads the row, 4V bytes, once; one block = one SM, so a pass
// is bound by the SM's instruction issue, not by memory): greedy 1 pass; temperature only 2;
// + 2 to 3 with top-k, + 2 to 3 with top-p, + 1 when the ties at the threshold are split.
// Measured on an H200, V = 128256, one row or 64 rows alike (a block per row): greedy 7 us,
// temperature only 23 us, top-k 50: 56 us, top-p 0.9: 95 us, top-k 50 + top-p 0.9: 79 us.

#include <float.h>

#include "common.cuh"

#define SAMPLE_THREADS 1024
#define RADIX_BITS 11
#define RADIX_BINS (1 << RADIX_BITS)
#define SELECT_LIST 6144  // keys listed by a select's second pass (24 KB)

// Monotone map of non-NaN floats to u32: a < b in total_cmp order <=> key(a) < key(b).
__device__ __forceinline__ unsigned float_key(float x) {
    const unsigned b = __float_as_uint(x);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float key_float(unsigned k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

__device__ __forceinline__ bool is_nan(float x) { return x != x; }

// Calls f(x, id) for id in [a, b), thread t of nt taking its share in increasing id order;
// 16-byte loads when the row and a allow it, B of them in flight per thread (one block per row:
// a pass is bound by the latency of its loads; B is what the registers allow).
template <int B = 4, class F>
__device__ __forceinline__ void for_range(const float* row, int a, int b, int t, int nt, F&& f) {
    int i = a + t;
    if (aligned16(row + a) && b > a) {
        const int nv = (b - a) >> 2;
        const float4* p = reinterpret_cast<const float4*>(row + a);
        int v = t;
        for (; v + (B - 1) * nt < nv; v += B * nt) {
            float4 q[B];
#pragma unroll
            for (int j = 0; j < B; ++j) q[j] = __ldg(p + v + j * nt);
#pragma unroll
            for (int j = 0; j < B; ++j) {
                const int id = a + 4 * (v + j * nt);
                f(q[j].x, id);
                f(q[j].y, id + 1);
                f(q[j].z, id + 2);
                f(q[j].w, id + 3);
            }
        }
        for (; v < nv; v += nt) {
            const float4 q = __ldg(p + v);
            const int id = a + 4 * v;
            f(q.x, id);
            f(q.y, id + 1);
            f(q.z, id + 2);
            f(q.w, id + 3);
        }
        i = a + 4 * nv + t;
    }
    for (; i < b; i += nt) f(__ldg(row + i), i);
}

// A histogram of u64 weights in shared memory as two u32 words per bin, with native 32-bit
// atomics (64-bit shared atomics are compare-and-swap loops on sm_90): the low word's carry is
// seen by the one thread whose add wrapped it. Exact, so the sums do not depend on order.
struct Hist {
    unsigned lo[RADIX_BINS];
    unsigned hi[RADIX_BINS];
    __device__ __forceinline__ void add(int b, u64 w) {
        const unsigned wl = static_cast<unsigned>(w);
        const unsigned old = atomicAdd(&lo[b], wl);
        const unsigned wh = static_cast<unsigned>(w >> 32) + (old + wl < old ? 1u : 0u);
        if (wh) atomicAdd(&hi[b], wh);
    }
    __device__ __forceinline__ u64 get(int b) const { return (static_cast<u64>(hi[b]) << 32) | lo[b]; }
};

// The fixed-point probability of logit x (key = float_key(x)): round(2^((x - max) * log2(e) / T + S))
// with one ex2.approx (relative error ~2^-22; the sum of all stays below 2^64), and 0 below the
// cut, where it would round to 0 anyway. The same value for the same x wherever it is computed.
struct Mass {
    float xmax, c, s_bits;
    unsigned kcut;
    __device__ __forceinline__ u64 operator()(float x, unsigned key) const {
        if (key < kcut) return 0;
        float p;
        asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(p) : "f"(fmaf(x - xmax, c, s_bits)));
        return __float2ull_rn(p);
    }
};

struct Select {
    unsigned key;  // tau: the key where the cumulative weight (from the top) reaches the target
    u64 w_gt;      // weight of the keys > tau
    u64 w_eq;      // weight of the keys == tau
    u64 total;     // weight of everything counted
    u64 target;
};

struct SelectState {
    u64 above, weq;
    unsigned digit;
    int listed;  // elements put in the list by the second pass (may exceed SELECT_LIST)
};

// Largest key tau in [lo, hi] whose weight from the top, W(key >= tau), reaches target, by radix
// select on rel = key - lo, 11 bits a pass from the top bit of hi - lo. weight(x, key) is called for
// the x whose key is in [lo, hi] and matches the digits decided so far (NaN never: its key falls
// outside); a virtual group of weight vw at key vkey (ties counted but not in the row) is added.
// With frac > 0 the target is ceil(frac * total), taken after the first pass, at least 1.
// The second pass also lists the keys it counts in shared memory; when they fit, a third pass
// reads that list instead of the row. Needs all threads; blockDim.x divides RADIX_BINS.
template <class W>
__device__ Select radix_select(const float* row, int n, unsigned lo, unsigned hi, W weight, unsigned vkey, u64 vw,
                               u64 target, float frac, Hist* hist, unsigned* list, SelectState* st) {
    const int tid = threadIdx.x, nt = blockDim.x;
    const int per = RADIX_BINS / nt;  // bins per thread in the scan, highest first
    const int top = RADIX_BINS - 1 - per * tid;
    const unsigned range = hi - lo;
    int hs = range ? 32 - __clz(range) : 1;  // bits [0, hs) of rel are still to decide
    unsigned pfx = 0;                        // the decided bits of rel, in place
    u64 above = 0, total = 0, weq = 0;
    int in_list = -1;  // >= 0: the list holds every counted element of the current prefix
    for (int pass = 0;; ++pass) {
        const int ls = max(hs - RADIX_BITS, 0);
        const unsigned himask = hs >= 32 ? 0u : (0xffffffffu << hs);
        const bool fill = pass == 1 && ls > 0;
        __syncthreads();  // the previous pass has finished reading hist and *st
        for (int b = tid; b < RADIX_BINS; b += nt) hist->lo[b] = hist->hi[b] = 0;
        if (tid == 0) st->listed = 0;
        __syncthreads();
        auto visit = [&](float x, unsigned key) {
            const unsigned rel = key - lo;  // wraps for key < lo
            if (rel > range || (rel & himask) != pfx) return;
            const u64 w = weight(x, key);
            if (!w) return;
            hist->add(static_cast<int>((rel >> ls) & (RADIX_BINS - 1)), w);
            if (fill) {
                const int slot = atomicAdd(&st->listed, 1);
                if (slot < SELECT_LIST) list[slot] = key;
            }
        };
        if (in_list >= 0) {
            for (int i = tid; i < in_list; i += nt) visit(key_float(list[i]), list[i]);
        } else {
            for_range<4>(row, 0, n, tid, nt, [&](float x, int) { visit(x, float_key(x)); });
        }
        if (tid == 0) {
            const unsigned rel = vkey - lo;
            if (vw && rel <= range && (rel & himask) == pfx) hist->add(static_cast<int>((rel >> ls) & (RADIX_BINS - 1)), vw);
            // Unreached unless nothing is counted: then tau = the top of this bin range.
            st->digit = 0;
            st->above = above;
            st->weq = 0;
        }
        __syncthreads();
        u64 local = 0;
        for (int j = 0; j < per; ++j) local += hist->get(top - j);
        u64 tot;
        const u64 excl = block_exclusive_scan(local, &tot);
        if (pass == 0) {
            total = tot;
            if (frac > 0.0f) {
                // ceil(frac * total), exactly, with frac taken to 2^-40.
                const u64 q = static_cast<u64>(frac * 1099511627776.0f);
                const u64 plo = q * tot, phi = __umul64hi(q, tot);
                target = (phi << 24) | (plo >> 40);
                if (plo & ((1ull << 40) - 1)) ++target;
            }
            target = max(target, 1ull);
        }
        target = min(target, above + tot);
        u64 acc = above + excl;
        if (acc < target && acc + local >= target) {
            for (int j = 0; j < per; ++j) {
                const u64 h = hist->get(top - j);
                if (acc + h >= target) {
                    st->digit = top - j;
                    st->above = acc;
                    st->weq = h;
                    break;
                }
                acc += h;
            }
        }
        __syncthreads();
        pfx |= st->digit << ls;
        above = st->above;
        weq = st->weq;
        if (fill) in_list = st->listed <= SELECT_LIST ? st->listed : -1;
        hs = ls;
        if (hs == 0) break;
    }
    return Select{lo + pfx, above, weq, total, target};
}

struct CrossState {
    u64 seg[32];
    u64 base, target, total;
    int warp, found;
};

// The smallest id whose inclusive prefix sum of weight(x, id) (in id order) exceeds
// target_of(total of all weights); -1 if none. *total_out gets the total. weight must give 0 for
// NaN. Pass 1: each warp sums one contiguous segment; pass 2: the block scans the segment where
// the sum crosses the target, 4 consecutive ids per thread.
template <class W, class Tgt>
__device__ int first_crossing(const float* row, int n, W weight, Tgt target_of, u64* total_out, CrossState* st) {
    const int tid = threadIdx.x, nt = blockDim.x, lane = lane_id(), nw = num_warps();
    const int seg = ((n + nw * 128 - 1) / (nw * 128)) * 128;
    __syncthreads();  // *st may still be read by an earlier call
    {
        const int a = min(n, warp_id() * seg), b = min(n, a + seg);
        u64 sum = 0;
        for_range<4>(row, a, b, lane, 32, [&](float x, int id) { sum += weight(x, id); });
        sum = warp_sum(sum);
        if (lane == 0) st->seg[warp_id()] = sum;
    }
    __syncthreads();
    if (warp_id() == 0) {
        const u64 v = lane < nw ? st->seg[lane] : 0ull;
        u64 incl = v;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const u64 up = __shfl_up_sync(FULL_MASK, incl, o);
            if (lane >= o) incl += up;
        }
        const u64 total = __shfl_sync(FULL_MASK, incl, 31);
        const u64 target = target_of(total);
        const unsigned over = __ballot_sync(FULL_MASK, incl > target);
        const int w = over ? __ffs(over) - 1 : -1;
        const u64 base = __shfl_sync(FULL_MASK, incl - v, max(w, 0));
        if (lane == 0) {
            st->warp = w;
            st->base = base;
            st->target = target;
            st->total = total;
            st->found = -1;
        }
    }
    __syncthreads();
    *total_out = st->total;
    const int w = st->warp;
    if (w < 0) return -1;
    const u64 r = st->target - st->base;  // crossing within the segment: its prefix sum > r
    const int a = w * seg, b = min(n, a + seg);
    u64 carry = 0;
    for (int c0 = a; c0 < b; c0 += 4 * nt) {
        const int i0 = c0 + 4 * tid;
        u64 wt[4], local = 0;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            wt[j] = i0 + j < b ? weight(__ldg(row + i0 + j), i0 + j) : 0ull;
            local += wt[j];
        }
        u64 ctot;
        const u64 excl = carry + block_exclusive_scan(local, &ctot);
        if (excl <= r && r < excl + local) {
            u64 acc = excl;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                acc += wt[j];
                if (acc > r) {
                    st->found = i0 + j;
                    break;
                }
            }
        }
        __syncthreads();
        const int found = st->found;
        if (found >= 0) return found;
        carry += ctot;
    }
    return -1;
}

// One token id per row of logits.
// logits [S, ld] f32 (the first vocab columns are read); out_ids [S] u32; keys, counters [S] u64
// (draw counters[s] of stream keys[s]; the host advances the counters). temperature == 0:
// greedy; top_k <= 0: off; top_p >= 1 (or NaN): off.
// grid (S), block (1024), no dynamic shared memory (41 KB static).
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS) sample_tokens_f32(
    const float* logits, int ld, int vocab, unsigned int* out_ids, const unsigned long long* keys,
    const unsigned long long* counters, int S, float temperature, int top_k, float top_p) {
    pdl_wait();
    __shared__ Hist hist;
    __shared__ unsigned list[SELECT_LIST];
    __shared__ SelectState sel_st;
    __shared__ CrossState cross_st;
    const int s = blockIdx.x;
    if (s >= S) return;
    const int n = max(vocab, 0);
    const float* row = logits + static_cast<long long>(s) * ld;

    // Pass 1: argmax (NaN never compares greater; ties keep the lower id) and the smallest logit
    // (fminf skips NaN). A row with no logit above -inf has no argmax yet: see below.
    ArgMax best = {-INFINITY, 0x7fffffff};
    float xmin = NAN;
    for_range<8>(row, 0, n, threadIdx.x, blockDim.x, [&](float x, int id) {
        const bool gt = x > best.v;
        best.v = gt ? x : best.v;
        best.i = gt ? id : best.i;
        xmin = fminf(xmin, x);
    });
    best = block_argmax(best);
    xmin = block_reduce(xmin, NAN, [](float v) {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(FULL_MASK, v, o));
        return v;
    });
    if (best.i == 0x7fffffff) {
        // All NaN or -inf (or empty): the CPU's argmax is the first non-NaN id, else 0; its
        // sampler falls back to that argmax too (no finite max).
        u64 unused;
        const int id = first_crossing(
            row, n, [](float x, int) { return is_nan(x) ? 0ull : 1ull; }, [](u64) { return 0ull; }, &unused,
            &cross_st);
        if (threadIdx.x == 0) out_ids[s] = id >= 0 ? static_cast<unsigned>(id) : 0u;
        return;
    }
    const unsigned argmax = static_cast<unsigned>(best.i);
    const float xmax = best.v;
    if (!(temperature > 0.0f) || !isfinite(xmax)) {
        if (threadIdx.x == 0) out_ids[s] = argmax;
        return;
    }
    // The key range of the non-NaN logits (-0 and +0 compare equal above but not as keys).
    const unsigned kmax = xmax == 0.0f ? 0x80000000u : float_key(xmax);
    const unsigned kmin = xmin == 0.0f ? 0x7fffffffu : float_key(xmin);

    const int S_bits = 32 + __clz(n);  // (number of non-NaN logits) * 2^S < 2^64
    Mass mass;
    mass.xmax = xmax;
    mass.c = static_cast<float>(fmin(1.4426950408889634 / static_cast<double>(temperature), static_cast<double>(FLT_MAX)));
    mass.s_bits = static_cast<float>(S_bits);
    mass.kcut = float_key(xmax - static_cast<float>(S_bits + 2) / mass.c);

    // The kept set: keys > tau, and the first e ties (key == tau) of ties_all; filter = false: all.
    bool filter = false;
    unsigned tau = 0;
    u64 e = 0, ties_all = 0;

    // Top-k binds when top_k < the number of non-NaN logits (the select's total).
    bool k_on = false;
    unsigned tau_k = 0;
    u64 e_k = 0;
    if (top_k > 0 && top_k < n) {
        const Select k = radix_select(
            row, n, kmin, kmax, [](float, unsigned) { return 1ull; }, 0u, 0ull,
            static_cast<u64>(top_k), 0.0f, &hist, list, &sel_st);
        if (static_cast<u64>(top_k) < k.total) {
            k_on = true;
            tau_k = k.key;
            e_k = static_cast<u64>(top_k) - k.w_gt;
            filter = true;
            tau = tau_k;
            e = e_k;
            ties_all = k.w_eq;
        }
    }
    if (top_p < 1.0f) {
        // Within the top-k: keys > tau_k from the row, plus its e_k kept ties as a virtual group.
        unsigned lo = max(mass.kcut, kmin);
        if (k_on) lo = max(lo, tau_k);
        const u64 vw = k_on ? e_k * mass(key_float(tau_k), tau_k) : 0ull;
        const Select p = radix_select(
            row, n, lo, kmax,
            [&](float x, unsigned key) { return (k_on && key <= tau_k) ? 0ull : mass(x, key); }, tau_k, vw,
            0ull, fmaxf(top_p, 1e-30f), &hist, list, &sel_st);
        const u64 m = mass(key_float(p.key), p.key);
        if (p.w_eq == 0 || m == 0) {  // unreachable: the max always counts
            if (threadIdx.x == 0) out_ids[s] = argmax;
            return;
        }
        const u64 avail = p.w_eq / m;
        const u64 need = p.target > p.w_gt ? (p.target - p.w_gt + m - 1) / m : 1ull;
        const bool at_tau_k = k_on && p.key == tau_k;
        filter = true;
        tau = p.key;
        e = min(max(need, 1ull), avail);
        ties_all = at_tau_k ? ties_all : avail;
    }

    // The last kept tie's id, when only some of the ties at tau are kept.
    int tie_id = 0x7fffffff;
    if (filter && e < ties_all) {
        u64 unused;
        tie_id = first_crossing(
            row, n, [&](float x, int) { return (!is_nan(x) && float_key(x) == tau) ? 1ull : 0ull; },
            [&](u64) { return e - 1; }, &unused, &cross_st);
    }

    // The draw: first kept id (in id order) whose cumulative mass exceeds u * total.
    const u64 bits = uniform_bits(keys[s], counters[s]);
    u64 total;
    const int id = first_crossing(
        row, n,
        [&](float x, int i) {
            if (is_nan(x)) return 0ull;
            const unsigned key = float_key(x);
            if (filter && (key < tau || (key == tau && i > tie_id))) return 0ull;
            return mass(x, key);
        },
        [&](u64 t) {
            // floor(u * t) with u = bits / 2^24: the first cum > that is the first cum > u * t.
            const u64 plo = bits * t, phi = __umul64hi(bits, t);
            return (phi << 40) | (plo >> 24);
        },
        &total, &cross_st);
    if (threadIdx.x == 0) out_ids[s] = id >= 0 ? static_cast<unsigned>(id) : argmax;
}
