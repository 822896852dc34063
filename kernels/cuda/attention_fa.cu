/* The encoders' attention with 16-bit q, k, v and out, FlashAttention-2's forward loop
 * (BLIP2_ATTN_FA=1; blip2_attention tries it before attention_mma.cu's kernel, which takes what
 * this one does not: fp32 io, head sizes not a multiple of 8 or above 112, unaligned rows).
 *
 * Why a second kernel: attention_mma.cu's ran at 60 TFLOP/s (0.39 ms a vision layer at 64 images
 * on an H100, 15 ms of the encoder's ~90), where the products alone allow several times that. It
 * stages every tile through registers (one element or quad per load, a scattered transposed
 * store of V), reads each fragment from shared memory 32 bits at a time and Q's again for every
 * key tile. Here:
 * - the tiles go from global to shared memory by cp.async, 16 bytes a thread and instruction,
 *   no register and no conversion: q, k, v are the 16-bit output of the qkv matmul as it is;
 * - the fragments come from shared memory by ldmatrix (16 bytes a lane and instruction, four
 *   8×8 matrices at once): K's B fragments as stored ([key][dim]), V's with .trans from the same
 *   row-major [key][dim] layout, so V is copied like K, not transposed;
 * - Q's A fragments are read again at each tile (KC x4 loads beside the 8·KC of K and V): held in
 *   registers they took the head-size-88 instance to 168 registers and a spill at 3 blocks an SM,
 *   against 150 this way;
 * - 64-key tiles, V's copy in flight during S = Q·Kᵀ, the next K's during softmax and P·V
 *   (FlashAttention-2's order: two barriers a tile, one buffer each).
 * A block: 4 warps, 64 query rows (16 a warp) of one (image, head); 40 KB of shared memory at head
 * size 88. Keys and queries past Tk, Tq and dims past HS are zero-filled by the copies; scores of
 * keys past Tk are -inf; the 16-key groups wholly past Tk are skipped.
 *
 * Numerics: q, k, v as given (16-bit), S exact products with fp32 sums, scaled by scale·log2(e)
 * in fp32 (attention_mma.cu rounds q·scale to 16 bits instead), the softmax in base 2 in fp32,
 * P rounded to T, l summing P as rounded, O in fp32, out rounded once.
 *
 * Not yet timed on a GPU (written 2026-11-28 in a session without one): bench/gpu/run.sh's
 * ours_fa step and `test_ops --perf --op attention` with BLIP2_ATTN_FA=1 compare it. */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <stdint.h>

#include <type_traits>

#include "attention_tile.cuh"
#include "internal.cuh"

namespace {

constexpr int FA_WARPS = 4, FA_THREADS = 32 * FA_WARPS, FA_Q = 16 * FA_WARPS; /* query rows a block */
constexpr int FA_KT = 64, FA_NT = FA_KT / 8; /* keys a tile; 8-key C fragments of S a tile */
constexpr int FA_MAX_KC = 7; /* head sizes up to 112: three 64-row tiles in 48 KB of static shared memory */

/* Shared rows of 16·KC halves (the head size padded to the mma's k) and 8 more: RS / 8 = 2·KC + 1
 * 16-byte units, odd, so the 8 rows an ldmatrix matrix reads start in distinct bank groups. */
template <int KC> struct fa_shape {
    static constexpr int HSP = 16 * KC, RS = HSP + 8, CPR = HSP / 8; /* CPR: 16-byte chunks a padded row */
    static constexpr int MINB = KC <= 6 ? 3 : 2;                    /* blocks an SM the registers must allow */
};

/* Rows [r0, r0 + ROWS) of a [rows, HS] slice (row stride `stride` elements) into dst [ROWS][RS] by
 * cp.async: chunks past HS (up to HSP) and rows past `rows` are zeros. */
template <int ROWS, int KC>
__device__ __forceinline__ void fa_load_tile(uint16_t *dst, const uint16_t *src, int r0, int rows, int stride, int HS) {
    using S = fa_shape<KC>;
    constexpr int N = ROWS * S::CPR, P = (N + FA_THREADS - 1) / FA_THREADS;
#pragma unroll
    for (int u = 0; u < P; u++) {
        const int i = (int)threadIdx.x + FA_THREADS * u, r = i / S::CPR, ch = i % S::CPR;
        if (N % FA_THREADS != 0 && i >= N) break;
        const bool full = r0 + r < rows && ch * 8 < HS;
        cp_async16(dst + r * S::RS + ch * 8, full ? src + (size_t)(r0 + r) * stride + ch * 8 : src, full);
    }
}

/* S = Q·Kᵀ over the tile's kn keys (raw: not yet scaled), Qw the warp's 16 rows of Qs. An x4
 * ldmatrix of Qw gives the A fragment of one 16-dim step (lane l addresses row l % 16, dims
 * (l / 16)·8 on); one of Ks the B fragments of two 8-key groups for that step (lane l addresses
 * key (l / 16)·8 + l % 8, dims (l / 8 % 2)·8 on). */
template <typename T, int KC>
__device__ __forceinline__ void fa_scores(float (&s)[FA_NT][4], const uint16_t *Qw, const uint16_t *Ks, int kn) {
    using S = fa_shape<KC>;
    const int lane = (int)threadIdx.x & 31;
    const uint16_t *ql = Qw + (lane % 16) * S::RS + lane / 16 * 8;
    const uint16_t *kl = Ks + (lane / 16 * 8 + lane % 8) * S::RS + lane / 8 % 2 * 8;
#pragma unroll
    for (int n = 0; n < FA_NT; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
    for (int kc = 0; kc < KC; kc++) {
        unsigned qa[4];
        ldmatrix_x4<false>(qa, ql + kc * 16);
#pragma unroll
        for (int np = 0; np < FA_NT / 2; np++) {
            if (np * 16 >= kn) break; /* past Tk (the last tile only) */
            unsigned b[4];
            ldmatrix_x4<false>(b, kl + np * 16 * S::RS + kc * 16);
            const unsigned b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
            mma_16816<T>(s[2 * np], qa, b0);
            mma_16816<T>(s[2 * np + 1], qa, b1);
        }
    }
}

/* O += P·V over the tile's kn keys. An x4.trans ldmatrix of Vs [key][dim] gives the B fragments of
 * two 8-dim groups for one 16-key step: lane l addresses key l % 16, dims (l / 16)·8 on. */
template <typename T, int KC>
__device__ __forceinline__ void fa_pv(softmax_rows<KC> &st, const unsigned (&p)[FA_NT][2], const uint16_t *Vs, int kn, int HS) {
    using S = fa_shape<KC>;
    const int lane = (int)threadIdx.x & 31;
    const uint16_t *vl = Vs + (lane % 16) * S::RS + lane / 16 * 8;
#pragma unroll
    for (int kk = 0; kk < FA_KT / 16; kk++) {
        if (kk * 16 >= kn) break;
        const unsigned a[4] = {p[2 * kk][0], p[2 * kk][1], p[2 * kk + 1][0], p[2 * kk + 1][1]};
#pragma unroll
        for (int dp = 0; dp < KC; dp++) {
            if (dp * 16 >= HS) break;
            unsigned b[4];
            ldmatrix_x4<true>(b, vl + kk * 16 * S::RS + dp * 16);
            const unsigned b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
            mma_16816<T>(st.o[2 * dp], a, b0);
            mma_16816<T>(st.o[2 * dp + 1], a, b1);
        }
    }
}

/* O / l for the lane's rows that exist, two dims a 32-bit store, into out [Tq, NH·HS] (the
 * head's columns from ob; HS a multiple of 8). */
template <typename T, int KC>
__device__ __forceinline__ void fa_write(uint16_t *ob, softmax_rows<KC> &st, int r0, int Tq, int row_stride, int HS) {
    softmax_rows_out(st, r0, Tq, [&](int row, int col, float a, float b) {
        if (col < HS) *(unsigned *)(ob + (size_t)row * row_stride + col) = pack2<T>(a, b);
    });
}

/* grid (query tiles of FA_Q, NH, B), FA_THREADS threads; qscale = scale·log2(e). HS a multiple of 8
 * up to 16·KC, strides multiples of 8 elements, q, k, v and out 16-byte aligned (attention_fa). */
template <typename T, int KC>
__global__ void __launch_bounds__(FA_THREADS, fa_shape<KC>::MINB)
    k_attention_fa(uint16_t *out, const uint16_t *q, const uint16_t *k, const uint16_t *v, int Tq, int Tk, int NH,
                   int HS, int q_stride, int kv_stride, float qscale) {
    using S = fa_shape<KC>;
    __shared__ __align__(16) uint16_t Qs[FA_Q * S::RS];  /* [FA_Q queries][RS] */
    __shared__ __align__(16) uint16_t Ks[FA_KT * S::RS]; /* [FA_KT keys][RS] */
    __shared__ __align__(16) uint16_t Vs[FA_KT * S::RS]; /* [FA_KT keys][RS] */
    const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * FA_Q, warp = (int)threadIdx.x >> 5;
    const bool active = q0 + warp * 16 < Tq; /* the warp has query rows */
    const size_t kv0 = (size_t)b * Tk * kv_stride + (size_t)h * HS;
    const uint16_t *kb = k + kv0, *vb = v + kv0;
    pdl_entry(); /* q, k, v are the kernel before's output */
    fa_load_tile<FA_Q, KC>(Qs, q + (size_t)b * Tq * q_stride + (size_t)h * HS, q0, Tq, q_stride, HS);
    fa_load_tile<FA_KT, KC>(Ks, kb, 0, Tk, kv_stride, HS);
    cp_async_commit();
    softmax_rows<KC> st;
    softmax_rows_init(st);
    for (int k0 = 0; k0 < Tk; k0 += FA_KT) {
        const int kn = min(FA_KT, Tk - k0);
        cp_async_wait<0>();
        __syncthreads(); /* Ks (and Qs) hold this tile; every warp is done with the last tile's Vs */
        fa_load_tile<FA_KT, KC>(Vs, vb, k0, Tk, kv_stride, HS);
        cp_async_commit();
        float s[FA_NT][4];
        if (active) fa_scores<T, KC>(s, Qs + warp * 16 * S::RS, Ks, kn);
        cp_async_wait<0>();
        __syncthreads(); /* Vs holds this tile; every warp is done with Ks */
        if (k0 + FA_KT < Tk) {
            fa_load_tile<FA_KT, KC>(Ks, kb, k0 + FA_KT, Tk, kv_stride, HS);
            cp_async_commit();
        }
        if (active) {
            unsigned p[FA_NT][2];
            softmax_update<T, KC, FA_NT>(p, s, st, kn, qscale);
            fa_pv<T, KC>(st, p, Vs, kn, HS);
        }
    }
    if (active) fa_write<T, KC>(out + (size_t)b * Tq * NH * HS + (size_t)h * HS, st, q0 + warp * 16, Tq, NH * HS, HS);
}

using fa_kernel = void (*)(uint16_t *, const uint16_t *, const uint16_t *, const uint16_t *, int, int, int, int, int, int,
                           float);

/* The instance for head sizes (16·(KC−1), 16·KC]. */
template <typename T> fa_kernel fa_pick(int KC) {
    const fa_kernel table[FA_MAX_KC] = {k_attention_fa<T, 1>, k_attention_fa<T, 2>, k_attention_fa<T, 3>,
                                        k_attention_fa<T, 4>, k_attention_fa<T, 5>, k_attention_fa<T, 6>,
                                        k_attention_fa<T, 7>};
    return table[KC - 1];
}

bool fa_enabled() {
    static const bool on = env_switch("BLIP2_ATTN_FA", false);
    return on;
}

} /* namespace */

bool attention_fa(blip2_cuda_ctx *c, void *out, const void *q, const void *k, const void *v, int B, int Tq, int Tk,
                  int NH, int HS, int q_stride, int kv_stride, float scale, int wdtype, int iodtype) {
    if (!fa_enabled() || (wdtype != BLIP2_W_F16 && wdtype != BLIP2_W_BF16) || iodtype != wdtype) return false;
    if (HS < 8 || HS > 16 * FA_MAX_KC || HS % 8 || q_stride % 8 || kv_stride % 8) return false;
    if (((uintptr_t)out | (uintptr_t)q | (uintptr_t)k | (uintptr_t)v) % 16) return false;
    if (B <= 0 || Tq <= 0 || Tk <= 0 || NH <= 0) return true; /* nothing to do (Tk = 0: the caller zeroes out) */
    const fa_kernel kernel = wdtype == BLIP2_W_F16 ? fa_pick<__half>((HS + 15) / 16) : fa_pick<__nv_bfloat16>((HS + 15) / 16);
    const dim3 grid((unsigned)((Tq + FA_Q - 1) / FA_Q), (unsigned)NH, (unsigned)B);
    const float qscale = scale * 1.44269504088896340736f; /* log2(e): the softmax runs on 2^x */
    launch(kernel, grid, FA_THREADS, 0, c->stream, (uint16_t *)out, (const uint16_t *)q, (const uint16_t *)k,
           (const uint16_t *)v, Tq, Tk, NH, HS, q_stride, kv_stride, qscale);
    LAUNCH_CK(c, "k_attention_fa");
    return true;
}
