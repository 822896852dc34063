/* Decode attention over the paged KV cache (kv_cache.h's block tables): the new keys and values
 * written into their pool rows (k_kv_write, or fused into the attention), then, per (head, row),
 * q·k over every cached position, the softmax and p·V, three kernels for three regimes (a block
 * per row with fp32 caches, a block per row with 16-byte loads, a warp per row with an online
 * softmax from PW_MIN_WARPS (head, sequence) pairs up). Time goes to streaming the cached keys
 * and values once per (head, row). */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <stdint.h>

#include <type_traits>

#include "common.cuh"

namespace {

constexpr int PAGED_MAX_HS = 128;
/* k_attention_paged's static shared memory (q, per-warp partial sums, reduction scratch): well under
 * the 8 KiB the opt-in threshold below leaves it. */
static_assert(PAGED_MAX_HS * 4 * (1 + NWARPS) + 32 * 4 + 32 * 8 < 8 * 1024, "paged attention static smem");

/* ------------------------------------------------------------------------------------------------
 * Paged KV. Sequence s owns rows [meta[3s], meta[3s] + meta[3s+1]) and has meta[3s+2] past
 * positions; position j lives at row j % BS of block tables[s·max_blocks + j / BS]. The host does
 * not know how many rows a step has (meta is device memory), so blocks are laid out per sequence
 * and each walks that sequence's rows with a stride of gridDim (rows past n_new do nothing). */
__device__ __forceinline__ size_t pool_row(const int32_t *tbl, int BS, int pos) {
    return (size_t)tbl[pos / BS] * BS + (size_t)(pos % BS);
}

/* Before the PDL wait (internal.cuh): the lines of head h's keys and values at the positions
 * before this step (j < past) into L2, so that their fetch overlaps the kernel before (the qkv
 * matmul) instead of following it. Those rows are final (earlier steps wrote them), and tables
 * and meta were uploaded before the step's first kernel; this step's new rows are not touched.
 * kh, vh: the head's slice of row 0; each row's slice of HS elements is fetched whole. */
template <typename KT>
__device__ __forceinline__ void paged_prefetch_past(const KT *kh, const KT *vh, const int32_t *tbl, int BS, int past,
                                                    int max_ctx, int kv_stride, int HS, int tid, int nt) {
    const int bytes = HS * (int)sizeof(KT), lines = (bytes + 127) / 128 + 1; /* a slice may straddle one more */
    const int n = (past < max_ctx ? past : max_ctx) * lines;
    for (int i = tid; i < n; i += nt) {
        const int j = i / lines, l = i % lines, off = min(l * 128, bytes - 1); /* inside the slice */
        const size_t r = pool_row(tbl, BS, j) * (size_t)kv_stride;
        prefetch_l2(reinterpret_cast<const char *>(kh + r) + off);
        prefetch_l2(reinterpret_cast<const char *>(vh + r) + off);
    }
}

/* KV cache elements: fp32, or 16-bit (a 16-bit model keeps a 16-bit cache: half the bytes that
 * decode attention streams). Round to nearest even on store, exact widening on load. */
__device__ __forceinline__ float kv_load(const float *p) { return *p; }
__device__ __forceinline__ float kv_load(const __half *p) { return __half2float(*p); }
__device__ __forceinline__ float kv_load(const __nv_bfloat16 *p) { return __bfloat162float(*p); }
__device__ __forceinline__ void kv_store(float *p, float v) { *p = v; }
__device__ __forceinline__ void kv_store(__half *p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void kv_store(__nv_bfloat16 *p, float v) { *p = __float2bfloat16_rn(v); }

/* grid (n_seqs, Z), NT threads: block (s, z) copies rows z, z + Z, ... of sequence s, KVW_PER
 * elements a thread per round, loaded together (one at a time, a decode row's copy took 11 µs). */
constexpr int KVW_PER = 8;
template <typename KT>
__global__ void __launch_bounds__(NT) k_kv_write(KT *kp, KT *vp, const float *k, const float *v, int in_stride,
                                                 const int32_t *tables, int max_blocks, const int32_t *meta, int BS,
                                                 int C) {
    pdl_entry();
    int s = blockIdx.x;
    int row0 = meta[3 * s], n_new = meta[3 * s + 1], past = meta[3 * s + 2];
    const int32_t *tbl = tables + (size_t)s * max_blocks;
    for (int r = blockIdx.y; r < n_new; r += gridDim.y) {
        size_t dst = pool_row(tbl, BS, past + r) * C, src = (size_t)(row0 + r) * in_stride;
        for (int c0 = 0; c0 < C; c0 += NT * KVW_PER) { /* every load of the round before the first store */
            float kk[KVW_PER], vv[KVW_PER];
#pragma unroll
            for (int u = 0; u < KVW_PER; u++) {
                const int c = c0 + (int)threadIdx.x + u * NT;
                kk[u] = c < C ? k[src + c] : 0.0f, vv[u] = c < C ? v[src + c] : 0.0f;
            }
#pragma unroll
            for (int u = 0; u < KVW_PER; u++) {
                const int c = c0 + (int)threadIdx.x + u * NT;
                if (c < C) kv_store(kp + dst + c, kk[u]), kv_store(vp + dst + c, vv[u]);
            }
        }
    }
}

/* Fused KV write (blip2_attention_paged with k_new): head h's slice of row `row`'s new key and
 * value (fp32, row stride q_stride: the qkv matmul's output) into its pool row at position pos,
 * by threads i0, i0 + step, ... of the block or warp that then attends that row, which is why only
 * one block (z = 1) may take a sequence's rows: they go in order, each row's keys written before
 * it reads them. The caller's barrier publishes the writes. Saves the k_kv_write launch (ncu,
 * H100: 4.7 µs a layer at batch 1, 5.4 at 64). */
template <typename KT>
__device__ __forceinline__ void paged_put_new(KT *kp, KT *vp, const float *kn, const float *vn, const int32_t *tbl,
                                              int BS, int pos, size_t row, int q_stride, int kv_stride, int h, int HS,
                                              int i0, int step) {
    const size_t src = row * q_stride + (size_t)h * HS, dst = pool_row(tbl, BS, pos) * kv_stride + (size_t)h * HS;
    for (int d = i0; d < HS; d += step) kv_store(kp + dst + d, kn[src + d]), kv_store(vp + dst + d, vn[src + d]);
}

/* The softmax of a row's nk scores sc (lmax: this thread's largest): sc becomes exp(s − max) and
 * the return value is 1 / their sum (accumulated in double). Its barriers publish sc. */
__device__ __forceinline__ float paged_softmax(float *sc, int nk, float lmax, float *shf, double *shd) {
    const float mx = block_max(lmax, shf);
    double lsum = 0;
    for (int j = threadIdx.x; j < nk; j += blockDim.x) {
        const float e = expf(sc[j] - mx);
        sc[j] = e;
        lsum += e;
    }
    return (float)(1.0 / block_sum(lsum, shd));
}

/* grid (NH, n_seqs, Z), NT threads, dynamic shared memory max_ctx floats (the scores of one row).
 * Block (h, s, z) handles head h of rows z, z + Z, ... of sequence s: warp w takes keys w, w + 8,
 * ..., its lanes split the head dimension (HS <= 128: four per lane at most). q is scaled as it is
 * loaded (q·scale, then q·kᵀ, as OPT). A row that would need more than max_ctx keys is written as
 * NaN instead of overflowing shared memory. Time goes to streaming the keys and values: one pass
 * over each, read once per (head, row). Tried and measured slower (H100, 2026-11-27): four keys
 * per warp with their loads in flight together took 57 registers instead of 32, halved the blocks
 * per SM, and the decode batch 256 case went from 0.162 to 0.274 ms. */
template <typename KT>
__global__ void __launch_bounds__(NT) k_attention_paged(void *out, int odtype, const float *q, KT *k_pool, KT *v_pool,
                                                        const float *kn, const float *vn, const int32_t *tables,
                                                        int max_blocks, const int32_t *meta, int BS, int max_ctx,
                                                        int NH, int HS, int q_stride, int kv_stride, float scale) {
    pdl_entry();
    extern __shared__ float sc[];
    __shared__ float qs[PAGED_MAX_HS];
    __shared__ float part[NWARPS][PAGED_MAX_HS];
    __shared__ float shf[32];
    __shared__ double shd[32];
    int h = blockIdx.x, s = blockIdx.y;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int row0 = meta[3 * s], n_new = meta[3 * s + 1], past = meta[3 * s + 2];
    const int32_t *tbl = tables + (size_t)s * max_blocks;
    const KT *kh = k_pool + (size_t)h * HS, *vh = v_pool + (size_t)h * HS;
    for (int r = blockIdx.z; r < n_new; r += gridDim.z) { /* uniform over the block */
        size_t row = (size_t)(row0 + r);
        const size_t o = row * NH * HS + (size_t)h * HS; /* out[o + d]: store_act */
        int nk = past + r + 1;
        if (kn) paged_put_new(k_pool, v_pool, kn, vn, tbl, BS, past + r, row, q_stride, kv_stride, h, HS, threadIdx.x, NT);
        if (nk < 1 || nk > max_ctx) {
            for (int d = threadIdx.x; d < HS; d += blockDim.x) store_act(out, odtype, o + d, __int_as_float(0x7fc00000));
            continue;
        }
        __syncthreads(); /* the previous row is done with qs, sc and part */
        for (int d = threadIdx.x; d < HS; d += blockDim.x) qs[d] = q[row * q_stride + (size_t)h * HS + d] * scale;
        __syncthreads();
        float lmax = -INFINITY;
        for (int j = warp; j < nk; j += NWARPS) { /* uniform over the warp */
            const KT *kr = kh + pool_row(tbl, BS, j) * kv_stride;
            float p = 0.0f;
            for (int d = lane; d < HS; d += 32) p += qs[d] * kv_load(kr + d);
            p = warp_sum(p);
            if (lane == 0) sc[j] = p;
            lmax = fmaxf(lmax, p);
        }
        const float inv = paged_softmax(sc, nk, lmax, shf, shd);
        float acc[PAGED_MAX_HS / 32] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int j = warp; j < nk; j += NWARPS) {
            const KT *vr = vh + pool_row(tbl, BS, j) * kv_stride;
            float p = sc[j] * inv;
#pragma unroll
            for (int u = 0; u < PAGED_MAX_HS / 32; u++) {
                int d = lane + 32 * u;
                if (d < HS) acc[u] += p * kv_load(vr + d);
            }
        }
#pragma unroll
        for (int u = 0; u < PAGED_MAX_HS / 32; u++) {
            int d = lane + 32 * u;
            if (d < HS) part[warp][d] = acc[u];
        }
        __syncthreads();
        for (int d = threadIdx.x; d < HS; d += blockDim.x) {
            float t = 0.0f;
            for (int w = 0; w < NWARPS; w++) t += part[w][d];
            store_act(out, odtype, o + d, t);
        }
    }
}

/* Sixteen bytes of a KV row widened: 8 half / bf16 or 4 fp32 values. */
template <typename KT> struct kv_vec {
    static constexpr int n = 8;
    static __device__ __forceinline__ void widen(const uint4 &u, float (&f)[8]) { widen8<KT>(u, f); }
};
template <> struct kv_vec<float> {
    static constexpr int n = 4;
    static __device__ __forceinline__ void widen(const uint4 &u, float (&f)[4]) {
        f[0] = __uint_as_float(u.x), f[1] = __uint_as_float(u.y), f[2] = __uint_as_float(u.z), f[3] = __uint_as_float(u.w);
    }
};

/* k_attention_paged with 16-byte loads (HS and kv_stride multiples of kv_vec<KT>::n, the pools
 * 16-byte aligned), same grid, rows and NaN rule. ncu (H100, 2026-11-27) had the warp-per-key
 * kernel at 38 % of a batch-64 decode step, ~5x the time its KV bytes take to stream: each
 * warp walked its keys one after another, a 2-byte load per lane then a 5-shuffle sum per key.
 * Here a thread owns a key for q·k (its HS/n loads issued together, no shuffles: every key of a
 * decode row is in flight at once), and for p·V groups of G = HS/n threads own a key each, one
 * 16-byte load per thread and key, NT/G keys at a time; the slots' partial outputs are summed in
 * shared memory in a fixed order. 40 registers (six blocks an SM; the fp32 cache's variant spills
 * 8 bytes at that bound, 48 without it). Run 5 (H100): decode 5.56 → 4.13 ms a step at batch 64,
 * 10.20 → 7.43 at 256 against the warp-per-key kernel (BLIP2_PAGED_VEC=0). 16-bit caches now take
 * k_attention_paged_online below; this one keeps fp32 caches and BLIP2_PAGED_ONLINE=0. */
constexpr int PV_LOADS = 4; /* 16-byte K loads in flight per thread */

/* q·k of one cached key row kr (G chunks of 16 bytes), L loads in flight at a time; qs holds
 * q·scale in fp32. */
template <typename KT, int L>
__device__ __forceinline__ float key_dot(const uint4 *kr, const float *qs, int G) {
    constexpr int VN = kv_vec<KT>::n;
    float p = 0.0f;
    for (int c0 = 0; c0 < G; c0 += L) {
        uint4 u[L];
#pragma unroll
        for (int c = 0; c < L; c++) u[c] = c0 + c < G ? kr[c0 + c] : make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
        for (int c = 0; c < L; c++) {
            if (c0 + c >= G) break;
            float f[VN];
            kv_vec<KT>::widen(u[c], f);
#pragma unroll
            for (int i = 0; i < VN; i++) p = fmaf(qs[(c0 + c) * VN + i], f[i], p);
        }
    }
    return p;
}
template <typename KT>
__global__ void __launch_bounds__(NT, 6) k_attention_paged_v(void *out, int odtype, const float *q, KT *k_pool, KT *v_pool,
                                                          const float *kn, const float *vn, const int32_t *tables,
                                                          int max_blocks, const int32_t *meta, int BS, int max_ctx,
                                                          int NH, int HS, int q_stride, int kv_stride, float scale) {
    pdl_trigger();
    constexpr int VN = kv_vec<KT>::n;
    extern __shared__ float sc[];
    __shared__ float qs[PAGED_MAX_HS];
    __shared__ float part[NT * VN]; /* slots × HS <= NT·VN */
    __shared__ float shf[32];
    __shared__ double shd[32];
    const int h = blockIdx.x, s = blockIdx.y, tid = threadIdx.x;
    const int G = HS / VN, slots = NT / G, slot = tid / G, g = tid % G;
    const int row0 = meta[3 * s], n_new = meta[3 * s + 1], past = meta[3 * s + 2];
    const int32_t *tbl = tables + (size_t)s * max_blocks;
    const KT *kh = k_pool + (size_t)h * HS, *vh = v_pool + (size_t)h * HS;
    if (blockIdx.z == 0) paged_prefetch_past(kh, vh, tbl, BS, past, max_ctx, kv_stride, HS, tid, NT);
    pdl_wait();
    for (int r = blockIdx.z; r < n_new; r += gridDim.z) { /* uniform over the block */
        const size_t row = (size_t)(row0 + r);
        const size_t o = row * NH * HS + (size_t)h * HS; /* out[o + d]: store_act */
        const int nk = past + r + 1;
        if (kn) paged_put_new(k_pool, v_pool, kn, vn, tbl, BS, past + r, row, q_stride, kv_stride, h, HS, tid, NT);
        if (nk < 1 || nk > max_ctx) {
            for (int d = tid; d < HS; d += NT) store_act(out, odtype, o + d, __int_as_float(0x7fc00000));
            continue;
        }
        __syncthreads(); /* the previous row is done with qs, sc and part */
        for (int d = tid; d < HS; d += NT) qs[d] = q[row * q_stride + (size_t)h * HS + d] * scale;
        __syncthreads();
        float lmax = -INFINITY;
        for (int j = tid; j < nk; j += NT) {
            const uint4 *kr = reinterpret_cast<const uint4 *>(kh + pool_row(tbl, BS, j) * kv_stride);
            const float p = key_dot<KT, PV_LOADS>(kr, qs, G);
            sc[j] = p;
            lmax = fmaxf(lmax, p);
        }
        const float inv = paged_softmax(sc, nk, lmax, shf, shd);
        float acc[VN];
#pragma unroll
        for (int i = 0; i < VN; i++) acc[i] = 0.0f;
        if (slot < slots) {
#pragma unroll 4
            for (int j = slot; j < nk; j += slots) {
                const uint4 u = reinterpret_cast<const uint4 *>(vh + pool_row(tbl, BS, j) * kv_stride)[g];
                float f[VN];
                kv_vec<KT>::widen(u, f);
                const float p = sc[j] * inv;
#pragma unroll
                for (int i = 0; i < VN; i++) acc[i] = fmaf(p, f[i], acc[i]);
            }
#pragma unroll
            for (int i = 0; i < VN; i++) part[slot * HS + g * VN + i] = acc[i];
        }
        __syncthreads();
        const int used = nk < slots ? nk : slots;
        for (int d = tid; d < HS; d += NT) {
            float t = 0.0f;
            for (int k = 0; k < used; k++) t += part[k * HS + d];
            store_act(out, odtype, o + d, t);
        }
    }
}

/* Paged attention, a warp per (head, row): PW_WARPS heads of one sequence per block, no block
 * barrier. Run 5 (H100) had k_attention_paged_v at 1.57 TB/s for decode batch 256 (0.105 ms a
 * layer, the largest cost of that step after the matmuls): its blocks are one (head, row) each, a
 * few KB of keys, and wait at five block barriers; at 61 keys three quarters of its threads sit out
 * the q·k pass. Here each warp streams its row's keys in chunks of 32 with an online softmax:
 *   1. lane i takes key c0 + i: its HS/VN 16-byte loads in flight together, q from shared memory;
 *   2. chunk max and sum by shuffles; the running output rescaled by exp(m_old − m_new);
 *   3. p·V: lane (kg, g) of KG = 32 / G key groups × G = HS/VN column groups adds keys kg,
 *      kg + KG, ... of the chunk, one 16-byte V load each, all issued together;
 *   4. after the last chunk the KG partial rows are summed in shared memory, in a fixed order.
 * Shared memory is fixed (no max_ctx-sized score row), so the decode graphs' max_ctx of 2048
 * costs no occupancy. Same rows, scale and NaN rule as k_attention_paged. */
constexpr int PW_WARPS = 8, PW_KL = 6, PW_VL = 4; /* heads per block; K and V loads in flight per lane */
constexpr long long PW_MIN_WARPS = 4096;           /* (head, sequence) pairs for this kernel: ~32 warps an SM */
/* Element i of out: fp32, or (O16) the cache's own 16-bit type; a compile-time choice, so the
 * kernel holds no output type (a runtime one made ptxas spill). */
template <typename KT, bool O16> __device__ __forceinline__ void paged_store(void *out, size_t i, float v) {
    if constexpr (O16) kv_store(reinterpret_cast<KT *>(out) + i, v);
    else reinterpret_cast<float *>(out)[i] = v;
}

template <typename KT, bool O16>
__global__ void __launch_bounds__(PW_WARPS * 32) k_attention_paged_online(void *out, const float *q, KT *k_pool,
                                                                    KT *v_pool, const float *kn, const float *vn,
                                                                    const int32_t *tables, int max_blocks,
                                                                    const int32_t *meta, int BS, int max_ctx, int NH,
                                                                    int HS, int q_stride, int kv_stride, float scale) {
    pdl_entry(); /* no paged_prefetch_past: from 4096 (head, sequence) pairs most blocks start late
                  * anyway, and with it ptxas spilled in this kernel's loop */
    constexpr int VN = kv_vec<KT>::n;
    static_assert(VN == 8, "16-bit caches: G = HS/8 <= 16 column groups, so at least two key groups");
    __shared__ float qs[PW_WARPS][PAGED_MAX_HS];     /* the row's q·scale, per warp */
    __shared__ float ps[PW_WARPS][32];               /* the chunk's exp(s − m), per warp */
    __shared__ float part[PW_WARPS][32 * VN];        /* KG partial output rows [KG][HS], per warp */
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31, h = blockIdx.x * PW_WARPS + w, s = blockIdx.y;
    if (h >= NH) return; /* whole warps only: nothing below synchronises the block */
    const int G = HS / VN, KG = 32 / G, kg = lane / G, g = lane % G;
    const int row0 = meta[3 * s], n_new = meta[3 * s + 1], past = meta[3 * s + 2];
    const int32_t *tbl = tables + (size_t)s * max_blocks;
    const KT *kh = k_pool + (size_t)h * HS, *vh = v_pool + (size_t)h * HS;
    for (int r = blockIdx.z; r < n_new; r += gridDim.z) {
        const size_t row = (size_t)(row0 + r);
        const size_t o = row * NH * HS + (size_t)h * HS; /* out[o + d]: store_act */
        const int nk = past + r + 1;
        if (kn) paged_put_new(k_pool, v_pool, kn, vn, tbl, BS, past + r, row, q_stride, kv_stride, h, HS, lane, 32);
        if (nk < 1 || nk > max_ctx) {
            for (int d = lane; d < HS; d += 32) paged_store<KT, O16>(out, o + d, __int_as_float(0x7fc00000));
            continue;
        }
        __syncwarp(); /* the previous row is done with qs and part */
        for (int d = lane; d < HS; d += 32) qs[w][d] = q[row * q_stride + (size_t)h * HS + d] * scale;
        __syncwarp();
        float m = -INFINITY, l = 0.0f, acc[VN];
#pragma unroll
        for (int i = 0; i < VN; i++) acc[i] = 0.0f;
        for (int c0 = 0; c0 < nk; c0 += 32) {
            const int j = c0 + lane;
            float sj = -INFINITY;
            if (j < nk) { /* 1: PW_KL loads at a time, one round for HS <= 96 */
                const uint4 *kr = reinterpret_cast<const uint4 *>(kh + pool_row(tbl, BS, j) * kv_stride);
                sj = key_dot<KT, PW_KL>(kr, qs[w], G);
            }
            const float m_new = fmaxf(m, warp_max(sj)); /* 2 */
            const float pj = j < nk ? expf(sj - m_new) : 0.0f, alpha = expf(m - m_new);
            l = l * alpha + warp_sum(pj);
            m = m_new;
            ps[w][lane] = pj;
            __syncwarp();
            const int n = min(32, nk - c0); /* 3 */
            if (kg < KG) { /* PW_VL loads at a time: two rounds for a chunk at KG = 3 (HS = 80) */
#pragma unroll
                for (int i = 0; i < VN; i++) acc[i] *= alpha;
                for (int jj0 = kg; jj0 < n; jj0 += PW_VL * KG) {
                    uint4 u[PW_VL];
#pragma unroll
                    for (int t = 0; t < PW_VL; t++) {
                        const int jj = jj0 + t * KG;
                        if (jj < n) u[t] = reinterpret_cast<const uint4 *>(vh + pool_row(tbl, BS, c0 + jj) * kv_stride)[g];
                    }
#pragma unroll
                    for (int t = 0; t < PW_VL; t++) {
                        const int jj = jj0 + t * KG;
                        if (jj >= n) break;
                        float f[VN];
                        kv_vec<KT>::widen(u[t], f);
#pragma unroll
                        for (int i = 0; i < VN; i++) acc[i] = fmaf(ps[w][jj], f[i], acc[i]);
                    }
                }
            }
            __syncwarp(); /* ps is read before the next chunk writes it */
        }
        if (kg < KG) /* 4 */
#pragma unroll
            for (int i = 0; i < VN; i++) part[w][kg * HS + g * VN + i] = acc[i];
        __syncwarp();
        const float inv = 1.0f / l;
        for (int d = lane; d < HS; d += 32) {
            float t = 0.0f;
            for (int k = 0; k < KG; k++) t += part[w][k * HS + d];
            paged_store<KT, O16>(out, o + d, t * inv);
        }
    }
}

/* Dynamic shared memory for a paged attention kernel at max_ctx: checked against the device, and
 * the opt-in above 48 KiB set to the device's largest value (so contexts on other threads never
 * lower it under a launch). 0 when it does not fit (recorded). */
template <typename F> size_t paged_smem(blip2_cuda_ctx *c, F *kernel, int max_ctx) {
    size_t smem = (size_t)max_ctx * sizeof(float);
    if (smem <= 32 * 1024) return smem; /* static (at most 9 KiB) + dynamic under 48 KiB: no opt-in needed */
    int optin = 0;
    if (!CUDA_CK(c, cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, c->device))) return 0;
    cudaFuncAttributes fa;
    if (!CUDA_CK(c, cudaFuncGetAttributes(&fa, kernel))) return 0;
    if (smem + fa.sharedSizeBytes > (size_t)optin) {
        blip2_cuda_record(c, "attention_paged: max_ctx %d needs %zu bytes of shared memory, the device has %d", max_ctx,
                          smem + fa.sharedSizeBytes, optin);
        return 0;
    }
    int most = optin - (int)fa.sharedSizeBytes;
    if (!CUDA_CK(c, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, most)))
        return 0;
    return smem;
}

/* BLIP2_PAGED_VEC=0 keeps the warp-per-key kernel for every shape, BLIP2_PAGED_ONLINE=0 the
 * block-per-row k_attention_paged_v for 16-bit caches (for comparing them). */
bool paged_vec_enabled() {
    static const bool on = env_switch("BLIP2_PAGED_VEC", true);
    return on;
}
bool paged_online_enabled() {
    static const bool on = env_switch("BLIP2_PAGED_ONLINE", true);
    return on;
}
/* The fewest (head, sequence) pairs that take k_attention_paged_online: PW_MIN_WARPS, or
 * BLIP2_PAGED_ONLINE_MIN=n (1: every shape it can take, as the op tests check it). */
long long paged_online_min() {
    static const long long most = env_int("BLIP2_PAGED_ONLINE_MIN", PW_MIN_WARPS);
    return most;
}

/* Blocks along z (rows of a sequence) for an (x, y) grid: enough blocks in all for a prefill
 * chunk, few empty ones for a large decode batch (one row per sequence). */
unsigned paged_rows_z(long long xy, int max_ctx) {
    long long z = (2048 + xy - 1) / xy;
    if (z > 16) z = 16;
    if (z > max_ctx) z = max_ctx;
    return (unsigned)(z < 1 ? 1 : z);
}

/* kn, vn: the fused KV write (NULL: none); then one block or warp takes all rows of a (head,
 * sequence), z = 1. */
template <typename KT>
void attention_paged_t(blip2_cuda_ctx *c, void *out, int odtype, const float *q, void *k_pool, void *v_pool, const float *kn,
                       const float *vn, const int32_t *tables, int max_blocks, const int32_t *meta, int n_seqs,
                       int block_size, int max_ctx, int NH, int HS, int q_stride, int kv_stride, float scale) {
    constexpr int VN = kv_vec<KT>::n;
    const bool vec = HS % VN == 0 && kv_stride % VN == 0 && (((uintptr_t)k_pool | (uintptr_t)v_pool) & 15) == 0 &&
                     paged_vec_enabled();
    if constexpr (kv_vec<KT>::n == 8) {
        /* A warp per (head, row) only where there are enough of them: run 6 (H100) had it at 17 µs a
         * layer for one sequence (4 blocks) and 0.025 vs 0.015 ms for 8, but 0.093 vs 0.105 ms for
         * 256 sequences (decode step 6.87 vs 7.43 ms). */
        const int own16 = std::is_same<KT, __half>::value ? BLIP2_W_F16 : BLIP2_W_BF16; /* the cache's type */
        if (vec && paged_online_enabled() && (long long)NH * n_seqs >= paged_online_min() &&
            (odtype == BLIP2_W_F32 || odtype == own16)) {
            const unsigned x = (unsigned)((NH + PW_WARPS - 1) / PW_WARPS);
            dim3 grid(x, (unsigned)n_seqs, kn ? 1u : paged_rows_z((long long)x * n_seqs, max_ctx));
            auto *kernel = odtype == BLIP2_W_F32 ? k_attention_paged_online<KT, false> : k_attention_paged_online<KT, true>;
            launch(kernel, grid, PW_WARPS * 32, 0, c->stream, out, q, (KT *)k_pool, (KT *)v_pool, kn, vn, tables,
                   max_blocks, meta, block_size, max_ctx, NH, HS, q_stride, kv_stride, scale);
            LAUNCH_CK(c, "k_attention_paged_online");
            return;
        }
    }
    auto *kernel = vec ? k_attention_paged_v<KT> : k_attention_paged<KT>;
    size_t smem = paged_smem(c, kernel, max_ctx);
    if (!smem) return;
    dim3 grid((unsigned)NH, (unsigned)n_seqs, kn ? 1u : paged_rows_z((long long)NH * n_seqs, max_ctx));
    launch(kernel, grid, NT, smem, c->stream, out, odtype, q, (KT *)k_pool, (KT *)v_pool, kn, vn, tables, max_blocks, meta,
           block_size, max_ctx, NH, HS, q_stride, kv_stride, scale);
    LAUNCH_CK(c, "k_attention_paged(_v)");
}

/* BLIP2_FUSED_KV=0: the new keys and values through k_kv_write first, as before the fusion (for
 * comparing them). */
bool fused_kv_enabled() {
    static const bool on = env_switch("BLIP2_FUSED_KV", true);
    return on;
}

} /* namespace */

namespace cuda {

void blip2_kv_write(void *k_pool, void *v_pool, int kvdtype, const float *k, const float *v, int in_stride,
                    const int32_t *tables, int max_blocks, const int32_t *meta, int n_seqs, int block_size, int C) {
    blip2_cuda_ctx *c = cur("kv_write");
    if (!c || n_seqs <= 0 || C <= 0) return;
    if (block_size <= 0 || kvdtype < BLIP2_W_F32 || kvdtype > BLIP2_W_BF16) {
        blip2_cuda_record(c, "kv_write: block_size %d, KV type %d", block_size, kvdtype);
        return;
    }
    long long z = (1024 + n_seqs - 1) / n_seqs;
    if (z > 64) z = 64;
    if (z < 1) z = 1;
    dim3 grid((unsigned)n_seqs, (unsigned)z);
    if (kvdtype == BLIP2_W_F32)
        launch(k_kv_write<float>, grid, NT, 0, c->stream, (float *)k_pool, (float *)v_pool, k, v, in_stride, tables,
               max_blocks, meta, block_size, C);
    else if (kvdtype == BLIP2_W_F16)
        launch(k_kv_write<__half>, grid, NT, 0, c->stream, (__half *)k_pool, (__half *)v_pool, k, v, in_stride, tables,
               max_blocks, meta, block_size, C);
    else
        launch(k_kv_write<__nv_bfloat16>, grid, NT, 0, c->stream, (__nv_bfloat16 *)k_pool, (__nv_bfloat16 *)v_pool, k,
               v, in_stride, tables, max_blocks, meta, block_size, C);
    LAUNCH_CK(c, "k_kv_write");
}

void blip2_attention_paged(void *out, const float *q, void *k_pool, void *v_pool, int kvdtype, const float *k_new,
                           const float *v_new, const int32_t *tables, int max_blocks, const int32_t *meta, int n_seqs,
                           int block_size, float *scratch, int max_ctx, int NH, int HS, int q_stride, int kv_stride,
                           float scale, int odtype) {
    (void)scratch; /* the scores live in shared memory */
    blip2_cuda_ctx *c = cur("attention_paged");
    if (!c || n_seqs <= 0 || NH <= 0 || HS <= 0 || !valid_adtype(c, "attention_paged", odtype)) return;
    if (HS > PAGED_MAX_HS || block_size <= 0 || max_ctx <= 0) {
        blip2_cuda_record(c, "attention_paged: unsupported HS %d / block_size %d / max_ctx %d (HS <= %d)", HS,
                          block_size, max_ctx, PAGED_MAX_HS);
        return;
    }
    if (k_new && !fused_kv_enabled() && kv_stride == NH * HS) { /* kv_write's rows are as wide as they are apart */
        cuda::blip2_kv_write(k_pool, v_pool, kvdtype, k_new, v_new, q_stride, tables, max_blocks, meta, n_seqs,
                             block_size, NH * HS);
        k_new = v_new = NULL;
    }
    if (kvdtype == BLIP2_W_F32)
        attention_paged_t<float>(c, out, odtype, q, k_pool, v_pool, k_new, v_new, tables, max_blocks, meta, n_seqs, block_size,
                                 max_ctx, NH, HS, q_stride, kv_stride, scale);
    else if (kvdtype == BLIP2_W_F16)
        attention_paged_t<__half>(c, out, odtype, q, k_pool, v_pool, k_new, v_new, tables, max_blocks, meta, n_seqs, block_size,
                                  max_ctx, NH, HS, q_stride, kv_stride, scale);
    else if (kvdtype == BLIP2_W_BF16)
        attention_paged_t<__nv_bfloat16>(c, out, odtype, q, k_pool, v_pool, k_new, v_new, tables, max_blocks, meta, n_seqs,
                                         block_size, max_ctx, NH, HS, q_stride, kv_stride, scale);
    else
        blip2_cuda_record(c, "attention_paged: unknown KV type %d", kvdtype);
}

} /* namespace cuda */
