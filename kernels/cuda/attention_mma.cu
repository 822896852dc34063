/* The encoders' attention of a 16-bit model on the tensor cores, FlashAttention-2 style
 * (blip2_attention sends the non-causal calls with HS <= 128 here; BLIP2_MMA_ATTN=0 keeps the
 * strided-batched TF32 products, which write and read [B·NH, Tq, Tk] fp32 scores three times:
 * 1.0 ms a vision layer at 64 images on an H100). Here the scores never leave registers.
 *
 * A block: 4 warps, 64 query rows (16 a warp) of one (image, head); Q in shared memory. Per tile
 * of 32 keys: S = Q·Kᵀ with mma.sync m16n8k16 (A fragments from Qs, B from Ks), the online softmax
 * on S in registers, then O += P·V with P taken straight from S's accumulators (two adjacent 8-key
 * C fragments are one 16-key A fragment) and V's B fragments from a transposed copy Vt[dim][key].
 * q, k and v are fp32 or T in global memory (IT; T when the model's qkv matmul writes 16 bits,
 * half the bytes of fp32) and become T (half or bf16, the weights' type) on their way into shared
 * memory; out is of the same IT. The loads are the latency: the next tile's K is loaded into registers while
 * this tile's scores are computed, its V while this tile's P·V is, each stored (narrowed) after
 * the next barrier, and nothing reads the loaded registers before then (a read waits for the load).
 * 16-bit K and V are staged as they are, with no conversion (am_stage); Q is widened, scaled and
 * narrowed, once a block. Keys past Tk: zero K and V rows, scores -inf, the 8-key groups wholly past Tk
 * skipped. Query rows past Tq are zeros and not written; a warp with none skips the arithmetic.
 * Head size padded with zeros to 16·KC for Q·Kᵀ; P·V in 8-wide chunks up to HS.
 *
 * Measured on an H100 (test_ops --perf, f16 vision attention, 2026-11-27): 0.39 ms at 64 images
 * (60 TFLOP/s; products 1.02 ms), 0.033 ms at one (0.043). What was tried: 64-key tiles (216
 * registers, 2 blocks an SM) took 0.54 ms; 8 warps a block 0.39 ms at 64 images but slower at one
 * image and for the Q-Former. The first version spent its issue slots on 64-bit address arithmetic
 * of guarded scalar loads (273 M instructions at 64 images, now 160 M); what is left is the fp32
 * loads' conversion and the shared-memory traffic of 16-row warps. 16-bit q, k, v (BLIP2_QKV16)
 * took 0.67 ms: they were widened as loaded (so each tile waited for its loads, the likely cause)
 * and narrowed again. Staged as they are (2026-11-27, not yet timed on a GPU), the loop issues 13%
 * fewer instructions than before (sm_90 SASS, a full tile, HS 88) and 7% fewer than for fp32.
 *
 * Numerics: q·scale·log2(e), k, v and P rounded to T (8 or 11 significant bits), products exact,
 * sums fp32; the softmax in base 2, in fp32; l sums P as rounded, so the weights that multiply v
 * add up to the divisor. Values must stay within T's range, as a 16-bit model's do. */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>

#include "attention_tile.cuh"
#include "internal.cuh"

namespace {

constexpr int AM_WARPS = 4, AM_THREADS = 32 * AM_WARPS, AM_Q = 16 * AM_WARPS; /* query rows per block */
constexpr int AM_KT = 32, AM_NT = AM_KT / 8; /* keys per tile; 8-key groups (C fragments of S) per tile */
/* Halves added to each shared row: a row stride of 4 (mod 8) words puts the 8 rows one fragment
 * read touches on distinct banks. */
constexpr int AM_PAD = 8;

/* The sizes of the instance for head sizes up to 16·KC. Three blocks an SM (168 registers) where
 * ptxas fits it without spilling: one more block's warps hide more of the load latency than the
 * 64-key tiles of 2 blocks an SM did. */
template <int KC> struct am_shape {
    static constexpr int HSP = 16 * KC, MINB = KC < 8 ? 3 : 1;
    static constexpr int RS = HSP + AM_PAD, VS = AM_KT + AM_PAD; /* row strides of Qs, Ks and of Vt, in halves */
};

/* How a tile of ROWS rows × HSP dims is spread over the block's threads for loading: as units of one
 * dim × 8 rows (any layout; a warp's lanes read consecutive dims of a row, so each load instruction
 * is one 128-byte line, and a unit is one 16-byte store of 8 keys into Vt), or as quads of 4 dims
 * of one row (float4 loads, where HS, the row stride and the pointer allow). A thread holds SP
 * float4 of a staged tile: its unit u is SP[2u], SP[2u+1]; its quad u is SP[u]. */
template <int ROWS, int KC> struct am_tile {
    static constexpr int HSP = 16 * KC, UNITS = HSP * ROWS / 8, QUADS = HSP / 4 * ROWS, NTH = AM_THREADS;
    static constexpr int PU = (UNITS + NTH - 1) / NTH, PQ = (QUADS + NTH - 1) / NTH;
    static constexpr int SP = 2 * PU > PQ ? 2 * PU : PQ;
};

/* Component c of v (c a compile-time constant after unrolling). */
__device__ __forceinline__ float &comp(float4 &v, int c) { return c == 0 ? v.x : c == 1 ? v.y : c == 2 ? v.z : v.w; }
__device__ __forceinline__ float comp(const float4 &v, int c) { return c == 0 ? v.x : c == 1 ? v.y : c == 2 ? v.z : v.w; }

/* Global q, k, v and out elements: fp32 (IT = float), or 16-bit of the weights' type T (IT =
 * uint16_t: a 16-bit matmul's output read as it is, half the bytes), widened to fp32 for staging. */
template <typename IT, typename T> struct am_io;
template <typename T> struct am_io<float, T> {
    static __device__ __forceinline__ float get(const float *p) { return *p; }
    static __device__ __forceinline__ float4 get4(const float *p) { return *(const float4 *)p; }
    static __device__ __forceinline__ void put(float *p, float v) { *p = v; }
};
template <typename T> struct am_io<uint16_t, T> {
    static __device__ __forceinline__ float get(const uint16_t *p) {
        float lo, hi;
        widen2<T>((unsigned)*p, lo, hi);
        return lo;
    }
    static __device__ __forceinline__ float4 get4(const uint16_t *p) { /* 8-byte aligned */
        const uint2 u = *(const uint2 *)p;
        float4 f;
        widen2<T>(u.x, f.x, f.y);
        widen2<T>(u.y, f.z, f.w);
        return f;
    }
    static __device__ __forceinline__ void put(uint16_t *p, float v) { *p = to_bits<T>(v); }
};

/* Rows [r0, r0 + ROWS) of a [rows, HS] slice (row stride `stride`) as units, zeros past `rows` or HS. */
template <int ROWS, int KC, typename IO, typename IT, typename L = am_tile<ROWS, KC>>
__device__ __forceinline__ void load_units(float4 (&st)[L::SP], const IT *__restrict__ src, int r0, int rows,
                                           int stride, int HS) {
#pragma unroll
    for (int u = 0; u < L::PU; u++) {
        const int i = (int)threadIdx.x + L::NTH * u, d = i % L::HSP, r = r0 + i / L::HSP * 8;
        const bool in = (L::UNITS % L::NTH == 0 || i < L::UNITS) && d < HS;
        const IT *p = src + (size_t)r * stride + d;
        float v[8];
        if (in && r + 8 <= rows) { /* every tile but the last */
#pragma unroll
            for (int e = 0; e < 8; e++) v[e] = IO::get(p + (size_t)e * stride);
        } else {
#pragma unroll
            for (int e = 0; e < 8; e++) v[e] = in && r + e < rows ? IO::get(p + (size_t)e * stride) : 0.0f;
        }
#pragma unroll
        for (int e = 0; e < 8; e++) comp(st[2 * u + e / 4], e % 4) = v[e];
    }
}

/* The same rows as quads (HS, stride and src multiples of 4 elements). */
template <int ROWS, int KC, typename IO, typename IT, typename L = am_tile<ROWS, KC>>
__device__ __forceinline__ void load_quads(float4 (&st)[L::SP], const IT *__restrict__ src, int r0, int rows,
                                           int stride, int HS) {
#pragma unroll
    for (int u = 0; u < L::PQ; u++) {
        const int i = (int)threadIdx.x + L::NTH * u, d = i % (L::HSP / 4) * 4, r = r0 + i / (L::HSP / 4);
        const bool in = (L::QUADS % L::NTH == 0 || i < L::QUADS) && d < HS && r < rows;
        st[u] = in ? IO::get4(src + (size_t)r * stride + d) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
}

/* Q or K rows, as quads where vec allows (the value tile is always units: Vt wants 8 keys a dim). */
template <int ROWS, int KC, typename IO, typename IT>
__device__ __forceinline__ void load_rows(float4 (&st)[am_tile<ROWS, KC>::SP], bool quads, const IT *src, int r0,
                                          int rows, int stride, int HS) {
    if (quads) load_quads<ROWS, KC, IO>(st, src, r0, rows, stride, HS);
    else load_units<ROWS, KC, IO>(st, src, r0, rows, stride, HS);
}

/* A staged tile, times mul, into dst [ROWS][RS] (row-major: a fragment register is 2 dims of a row). */
template <typename T, int ROWS, int KC, typename L = am_tile<ROWS, KC>>
__device__ __forceinline__ void store_rows(uint16_t *dst, const float4 (&st)[L::SP], bool quads, float mul) {
    constexpr int RS = am_shape<KC>::RS;
    if (quads) {
#pragma unroll
        for (int u = 0; u < L::PQ; u++) {
            const int i = (int)threadIdx.x + L::NTH * u, d = i % (L::HSP / 4) * 4, r = i / (L::HSP / 4);
            const uint2 w = {pack2<T>(st[u].x * mul, st[u].y * mul), pack2<T>(st[u].z * mul, st[u].w * mul)};
            if (L::QUADS % L::NTH == 0 || i < L::QUADS) *(uint2 *)(dst + r * RS + d) = w;
        }
        return;
    }
#pragma unroll
    for (int u = 0; u < L::PU; u++) {
        const int i = (int)threadIdx.x + L::NTH * u, d = i % L::HSP, r = i / L::HSP * 8;
        if (L::UNITS % L::NTH == 0 || i < L::UNITS)
#pragma unroll
            for (int e = 0; e < 8; e++) dst[(r + e) * RS + d] = to_bits<T>(comp(st[2 * u + e / 4], e % 4) * mul);
    }
}

/* A staged value tile (units) into Vt [HSP][VS] (dim-major: a B fragment of P·V is 2 keys of a dim). */
template <typename T, int KC, typename S = am_shape<KC>, typename L = am_tile<AM_KT, KC>>
__device__ __forceinline__ void store_cols(uint16_t *Vt, const float4 (&st)[L::SP]) {
#pragma unroll
    for (int u = 0; u < L::PU; u++) {
        const int i = (int)threadIdx.x + L::NTH * u, d = i % S::HSP, key = i / S::HSP * 8;
        const float4 a = st[2 * u], b = st[2 * u + 1];
        const uint4 w = {pack2<T>(a.x, a.y), pack2<T>(a.z, a.w), pack2<T>(b.x, b.y), pack2<T>(b.z, b.w)};
        if (L::UNITS % L::NTH == 0 || i < L::UNITS) *(uint4 *)(Vt + d * S::VS + key) = w;
    }
}

/* The K and V tiles' staging. fp32 inputs: float4, narrowed to T on the store. 16-bit inputs: the
 * elements as they are (already T: copying the bits is what widening and narrowing again did), no
 * conversion either way, in as many registers (SP uint4). A K chunk u (8 dims of one row: 16-byte
 * loads and stores) is st[u], quads 2u, 2u+1 are st[u]'s halves; a unit's 8 values (K or V) are the
 * 8 words of st[2u], st[2u+1], one each, packed only when stored: an instruction that reads a loaded
 * register waits for the load, and the loads are meant to land during the tile's mma (packing them
 * at once, as widening them did, stalled each tile on its loads). */
template <typename IT, int KC> struct am_stage { using type = float4[am_tile<AM_KT, KC>::SP]; };
template <int KC> struct am_stage<uint16_t, KC> { using type = uint4[am_tile<AM_KT, KC>::SP]; };

/* Word c of w (c a compile-time constant after unrolling). */
__device__ __forceinline__ unsigned &word(uint4 &w, int c) {
    return c == 0 ? w.x : c == 1 ? w.y : c == 2 ? w.z : w.w;
}
__device__ __forceinline__ unsigned word(const uint4 &w, int c) {
    return c == 0 ? w.x : c == 1 ? w.y : c == 2 ? w.z : w.w;
}

/* The low halves of lo and hi as one word: one PRMT (a shift and an or otherwise). */
__device__ __forceinline__ unsigned pack_lo(unsigned lo, unsigned hi) {
#if defined(__CUDA_ARCH__)
    return __byte_perm(lo, hi, 0x5410);
#else
    return (lo & 0xffffu) | hi << 16;
#endif
}

/* load_units for 16-bit inputs: a unit's 8 rows into st[2u], st[2u+1], a word each, as they are. */
template <int ROWS, int KC, typename IO, typename L = am_tile<ROWS, KC>>
__device__ __forceinline__ void load_units(uint4 (&st)[L::SP], const uint16_t *__restrict__ src, int r0, int rows,
                                           int stride, int HS) {
#pragma unroll
    for (int u = 0; u < L::PU; u++) {
        const int i = (int)threadIdx.x + L::NTH * u, d = i % L::HSP, r = r0 + i / L::HSP * 8;
        const bool in = (L::UNITS % L::NTH == 0 || i < L::UNITS) && d < HS;
        const uint16_t *p = src + (size_t)r * stride + d;
        if (in && r + 8 <= rows) { /* every tile but the last */
#pragma unroll
            for (int e = 0; e < 8; e++) word(st[2 * u + e / 4], e % 4) = p[(size_t)e * stride];
        } else {
#pragma unroll
            for (int e = 0; e < 8; e++)
                word(st[2 * u + e / 4], e % 4) = in && r + e < rows ? p[(size_t)e * stride] : 0u;
        }
    }
}

/* K rows [r0, r0 + AM_KT) of 16-bit inputs as pieces of W dims of one row: W = 8, chunks (16-byte
 * loads: HS, stride and src multiples of 8 elements, src 16-byte aligned), or W = 4, quads (8-byte).
 * A piece is wholly in or past HS (a multiple of W); zeros past HS or rows. */
template <int W, int KC, typename L = am_tile<AM_KT, KC>>
__device__ __forceinline__ void load_pieces(uint4 (&st)[L::SP], const uint16_t *__restrict__ src, int r0, int rows,
                                            int stride, int HS) {
    constexpr int PR = L::HSP / W, N = PR * AM_KT, P = (N + L::NTH - 1) / L::NTH; /* pieces a row, a tile, a thread */
#pragma unroll
    for (int u = 0; u < P; u++) {
        const int i = (int)threadIdx.x + L::NTH * u, d = i % PR * W, r = r0 + i / PR;
        const bool in = (N % L::NTH == 0 || i < N) && d < HS && r < rows;
        const uint16_t *p = src + (size_t)r * stride + d;
        if constexpr (W == 8) {
            st[u] = in ? *(const uint4 *)p : make_uint4(0u, 0u, 0u, 0u);
        } else {
            const uint2 w = in ? *(const uint2 *)p : make_uint2(0u, 0u);
            word(st[u / 2], u % 2 * 2) = w.x, word(st[u / 2], u % 2 * 2 + 1) = w.y;
        }
    }
}

/* Staged pieces into Ks [AM_KT][RS] (RS·2 bytes = 32·KC + 16: a chunk's store is 16-byte aligned). Indexed in
 * pieces, not halves, so that the compiler sees the alignment (else it splits the first store into words). */
template <int W, int KC, typename L = am_tile<AM_KT, KC>>
__device__ __forceinline__ void store_pieces(uint16_t *Ks, const uint4 (&st)[L::SP]) {
    constexpr int RS = am_shape<KC>::RS, PR = L::HSP / W, N = PR * AM_KT, P = (N + L::NTH - 1) / L::NTH;
#pragma unroll
    for (int u = 0; u < P; u++) {
        const int i = (int)threadIdx.x + L::NTH * u, j = i / PR * (RS / W) + i % PR; /* in pieces */
        if (N % L::NTH == 0 || i < N) {
            if constexpr (W == 8) ((uint4 *)Ks)[j] = st[u];
            else ((uint2 *)Ks)[j] = make_uint2(word(st[u / 2], u % 2 * 2), word(st[u / 2], u % 2 * 2 + 1));
        }
    }
}

/* store_cols for 16-bit inputs: a unit's 8 words packed into its 16-byte store. */
template <typename T, int KC, typename S = am_shape<KC>, typename L = am_tile<AM_KT, KC>>
__device__ __forceinline__ void store_cols(uint16_t *Vt, const uint4 (&st)[L::SP]) {
#pragma unroll
    for (int u = 0; u < L::PU; u++) {
        const int i = (int)threadIdx.x + L::NTH * u, d = i % S::HSP, key = i / S::HSP * 8;
        const uint4 a = st[2 * u], b = st[2 * u + 1];
        const uint4 w = {pack_lo(a.x, a.y), pack_lo(a.z, a.w), pack_lo(b.x, b.y), pack_lo(b.z, b.w)};
        if (L::UNITS % L::NTH == 0 || i < L::UNITS) *(uint4 *)(Vt + d * S::VS + key) = w;
    }
}

/* A K tile into the stage and from it into Ks. fp32: as Q (quads where vec allows, else units). 16-bit:
 * chunks where vec16 allows, else quads where vec does, else units (stored an element at a time). */
template <int KC, typename IO, typename IT>
__device__ __forceinline__ void load_keys(float4 (&st)[am_tile<AM_KT, KC>::SP], bool vec, bool /* vec16 */,
                                          const IT *src, int r0, int rows, int stride, int HS) {
    load_rows<AM_KT, KC, IO>(st, vec, src, r0, rows, stride, HS);
}
template <int KC, typename IO>
__device__ __forceinline__ void load_keys(uint4 (&st)[am_tile<AM_KT, KC>::SP], bool vec, bool vec16,
                                          const uint16_t *src, int r0, int rows, int stride, int HS) {
    if (vec16) load_pieces<8, KC>(st, src, r0, rows, stride, HS);
    else if (vec) load_pieces<4, KC>(st, src, r0, rows, stride, HS);
    else load_units<AM_KT, KC, IO>(st, src, r0, rows, stride, HS);
}
template <typename T, int KC>
__device__ __forceinline__ void store_keys(uint16_t *Ks, const float4 (&st)[am_tile<AM_KT, KC>::SP], bool vec,
                                           bool /* vec16 */) {
    store_rows<T, AM_KT, KC>(Ks, st, vec, 1.0f);
}
template <typename T, int KC, typename L = am_tile<AM_KT, KC>>
__device__ __forceinline__ void store_keys(uint16_t *Ks, const uint4 (&st)[L::SP], bool vec, bool vec16) {
    constexpr int RS = am_shape<KC>::RS;
    if (vec16) {
        store_pieces<8, KC>(Ks, st);
    } else if (vec) {
        store_pieces<4, KC>(Ks, st);
    } else {
#pragma unroll
        for (int u = 0; u < L::PU; u++) {
            const int i = (int)threadIdx.x + L::NTH * u, d = i % L::HSP, r = i / L::HSP * 8;
            if (L::UNITS % L::NTH == 0 || i < L::UNITS)
#pragma unroll
                for (int e = 0; e < 8; e++) Ks[(r + e) * RS + d] = (uint16_t)word(st[2 * u + e / 4], e % 4);
        }
    }
}

/* S = Q·Kᵀ over the tile's kn keys: Q's A fragments from the warp's rows of Qs, K's B fragments from Ks. */
template <typename T, int KC, typename S = am_shape<KC>>
__device__ __forceinline__ void scores(float (&s)[AM_NT][4], const uint16_t *Qw, const uint16_t *Ks, int kn) {
    const int lane = (int)threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const uint32_t *qr = (const uint32_t *)(Qw + g * S::RS) + t; /* row g, dims 2t, 2t+1; row g+8 is 4·RS words on */
#pragma unroll
    for (int n = 0; n < AM_NT; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
    for (int kc = 0; kc < KC; kc++) {
        const unsigned a[4] = {qr[8 * kc], qr[8 * kc + 4 * S::RS], qr[8 * kc + 4], qr[8 * kc + 4 * S::RS + 4]};
#pragma unroll
        for (int n = 0; n < AM_NT; n++) {
            if (n * 8 >= kn) break; /* past Tk (the last tile only): masked by the caller */
            const uint32_t *kr = (const uint32_t *)(Ks + (n * 8 + g) * S::RS) + t; /* key n·8+g, dims 2t, 2t+1 */
            const unsigned b[2] = {kr[8 * kc], kr[8 * kc + 4]};
            mma_16816<T>(s[n], a, b);
        }
    }
}

/* O += P·V over the tile's kn keys, the dims in 8-wide chunks up to HS. */
template <typename T, int KC, typename S = am_shape<KC>>
__device__ __forceinline__ void accumulate_pv(softmax_rows<KC> &st, const unsigned (&p)[AM_NT][2], const uint16_t *Vt,
                                              int kn, int HS) {
    const int lane = (int)threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int kk = 0; kk < AM_KT / 16; kk++) {
        if (kk * 16 >= kn) break;
        const unsigned a[4] = {p[2 * kk][0], p[2 * kk][1], p[2 * kk + 1][0], p[2 * kk + 1][1]};
#pragma unroll
        for (int d = 0; d < 2 * KC; d++) {
            if (d * 8 >= HS) break;
            const uint32_t *vr = (const uint32_t *)(Vt + (d * 8 + g) * S::VS + 16 * kk) + t; /* dim d·8+g, keys 2t, 2t+1 */
            const unsigned b[2] = {vr[0], vr[4]};
            mma_16816<T>(st.o[d], a, b);
        }
    }
}

/* O / l for the lane's rows that exist, into out [Tq, NH·HS] (the head's columns from ob). */
template <int KC, typename IO, typename IT>
__device__ __forceinline__ void write_out(IT *ob, softmax_rows<KC> &st, int r0, int Tq, int row_stride, int HS) {
    softmax_rows_out(st, r0, Tq, [&](int row, int col, float a, float b) {
        IT *p = ob + (size_t)row * row_stride + col;
        if (col < HS) IO::put(p, a);
        if (col + 1 < HS) IO::put(p + 1, b);
    });
}

/* grid (query tiles of AM_Q, NH, B), AM_THREADS threads; qscale = scale·log2(e); vec: q and k may be
 * read as quads (HS, the strides and the pointers multiples of 4 elements); vec16 (16-bit IT only): k
 * as chunks of 8 (HS, kv_stride multiples of 8, k 16-byte aligned); q, k, v and out of IT. */
template <typename T, int KC, typename IT>
__global__ void __launch_bounds__(AM_THREADS, am_shape<KC>::MINB)
    k_attention_mma(void *out_, const void *q_, const void *k_, const void *v_, int Tq, int Tk, int NH, int HS,
                    int q_stride, int kv_stride, float qscale, bool vec, bool vec16) {
    pdl_entry();
    using S = am_shape<KC>;
    using IO = am_io<IT, T>;
    IT *out = (IT *)out_;
    const IT *q = (const IT *)q_, *k = (const IT *)k_, *v = (const IT *)v_;
    __shared__ __align__(16) uint16_t Qs[AM_Q * S::RS];   /* [AM_Q queries][HSP + AM_PAD] in T, times qscale */
    __shared__ __align__(16) uint16_t Ks[AM_KT * S::RS];  /* [AM_KT keys][HSP + AM_PAD] in T */
    __shared__ __align__(16) uint16_t Vt[S::HSP * S::VS]; /* [HSP dims][AM_KT + AM_PAD] in T */
    const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * AM_Q, warp = (int)threadIdx.x >> 5;
    const bool active = q0 + warp * 16 < Tq; /* the warp has query rows */
    const size_t kv0 = (size_t)b * Tk * kv_stride + (size_t)h * HS;
    const IT *kb = k + kv0, *vb = v + kv0;
    typename am_stage<IT, KC>::type stage; /* the next K or V tile on its way to shared memory */
    {
        float4 qst[am_tile<AM_Q, KC>::SP]; /* Q is widened whatever IT: it is scaled, once a block */
        load_keys<KC, IO>(stage, vec, vec16, kb, 0, Tk, kv_stride, HS);
        load_rows<AM_Q, KC, IO>(qst, vec, q + (size_t)b * Tq * q_stride + (size_t)h * HS, q0, Tq, q_stride, HS);
        store_rows<T, AM_Q, KC>(Qs, qst, vec, qscale);
        store_keys<T, KC>(Ks, stage, vec, vec16);
        load_units<AM_KT, KC, IO>(stage, vb, 0, Tk, kv_stride, HS);
    }
    softmax_rows<KC> st;
    softmax_rows_init(st);
    for (int k0 = 0; k0 < Tk; k0 += AM_KT) {
        const int kn = min(AM_KT, Tk - k0);
        const bool more = k0 + AM_KT < Tk;
        __syncthreads(); /* Qs, Ks hold this tile; every warp is done with the last tile's Vt */
        store_cols<T, KC>(Vt, stage);
        if (more) load_keys<KC, IO>(stage, vec, vec16, kb, k0 + AM_KT, Tk, kv_stride, HS);
        unsigned p[AM_NT][2];
        if (active) {
            float s[AM_NT][4];
            scores<T, KC>(s, Qs + warp * 16 * S::RS, Ks, kn);
            softmax_update<T, KC, AM_NT>(p, s, st, kn, 1.0f); /* q came scaled */
        }
        __syncthreads(); /* Vt holds this tile; every warp is done with Ks */
        if (more) {
            store_keys<T, KC>(Ks, stage, vec, vec16);
            load_units<AM_KT, KC, IO>(stage, vb, k0 + AM_KT, Tk, kv_stride, HS);
        }
        if (active) accumulate_pv<T, KC>(st, p, Vt, kn, HS);
    }
    if (active)
        write_out<KC, IO>(out + (size_t)b * Tq * NH * HS + (size_t)h * HS, st, q0 + warp * 16, Tq, NH * HS, HS);
}

using am_kernel = void (*)(void *, const void *, const void *, const void *, int, int, int, int, int, int, float, bool,
                           bool);

/* The instance for head sizes (16·(KC−1), 16·KC]. */
template <typename T, typename IT> am_kernel am_pick(int KC) {
    const am_kernel table[ATTN_MMA_MAX_HS / 16] = {
        k_attention_mma<T, 1, IT>, k_attention_mma<T, 2, IT>, k_attention_mma<T, 3, IT>, k_attention_mma<T, 4, IT>,
        k_attention_mma<T, 5, IT>, k_attention_mma<T, 6, IT>, k_attention_mma<T, 7, IT>, k_attention_mma<T, 8, IT>};
    return table[KC - 1];
}

} /* namespace */

bool attention_mma(blip2_cuda_ctx *c, void *out, const void *q, const void *k, const void *v, int B, int Tq, int Tk,
                   int NH, int HS, int q_stride, int kv_stride, float scale, int wdtype, int iodtype) {
    if ((wdtype != BLIP2_W_F16 && wdtype != BLIP2_W_BF16) || HS < 1 || HS > ATTN_MMA_MAX_HS) return false;
    if (iodtype != BLIP2_W_F32 && iodtype != wdtype) return false;
    if (B <= 0 || Tq <= 0 || Tk <= 0 || NH <= 0) return true; /* nothing to do (Tk = 0: the caller zeroes out) */
    const int KC = (HS + 15) / 16;
    const bool io16 = iodtype != BLIP2_W_F32;
    const am_kernel kernel = wdtype == BLIP2_W_F16 ? (io16 ? am_pick<__half, uint16_t>(KC) : am_pick<__half, float>(KC))
                                                   : (io16 ? am_pick<__nv_bfloat16, uint16_t>(KC)
                                                           : am_pick<__nv_bfloat16, float>(KC));
    const dim3 grid((unsigned)((Tq + AM_Q - 1) / AM_Q), (unsigned)NH, (unsigned)B);
    const float qscale = scale * 1.44269504088896340736f; /* log2(e): the softmax runs on 2^x */
    const uintptr_t quad_bytes = io16 ? 8 : 16; /* a quad's load: 4 elements */
    const bool vec = HS % 4 == 0 && q_stride % 4 == 0 && kv_stride % 4 == 0 &&
                     ((uintptr_t)q | (uintptr_t)k) % quad_bytes == 0;
    /* 16-bit k as chunks of 8: every row's and head's start (kv_stride, HS multiples of 8) 16-byte aligned */
    const bool vec16 = io16 && HS % 8 == 0 && kv_stride % 8 == 0 && (uintptr_t)k % 16 == 0;
    launch(kernel, grid, AM_THREADS, 0, c->stream, out, q, k, v, Tq, Tk, NH, HS, q_stride, kv_stride, qscale, vec,
           vec16);
    LAUNCH_CK(c, "k_attention_mma");
    return true;
}
