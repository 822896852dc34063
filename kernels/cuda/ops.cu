/* The CUDA twins of kernels/cpu/ops.c (namespace cuda::, same names and argument order as ops.h)
 * and the blip2_cuda_ops table; the GEMVs are in gemv.cu, the paged-KV ops in attention_paged.cu,
 * the encoders' tensor-core attention in attention_mma.cu and attention_fa.cu. The table is what
 * keeps the twins' signatures equal to the C reference's: each cuda:: function is assigned to the
 * blip2_ops member of its name, whose type ops.h declares once, so a differing parameter list
 * does not compile. Every op is queued on the
 * calling thread's current context's stream (context.h) and records failures in that context
 * instead of aborting; nothing here synchronises except download, sync, blip2_argmax and the rare
 * growth of a scratch buffer.
 *
 * Numerics: fp32 matmuls use cuBLASLt with CUBLAS_COMPUTE_32F (no TF32; a 16-bit model's encoder
 * attention runs in its weights' type on the tensor cores, attention_mma.cu); 16-bit-weight
 * matmuls round the fp32 activations to the weight's type (RNE) and accumulate in fp32, on the
 * tensor cores or, at T <= gemv_max_t(), in a GEMV kernel (gemv.cu) that rounds the activations
 * the same way (so a row's products do not depend on its batch's
 * size; BLIP2_GEMV=0 sends those to cuBLASLt too). The _a ops write that rounding where the input
 * is produced (a norm, GELU, or a matmul with a 16-bit out: cuBLASLt's D in the weights' type,
 * bias of that type, one rounding after the epilogue) and matmul_a, activate_a and attention take
 * it as it is: the same numbers, one pass fewer. Row reductions (layernorm, softmax) accumulate in
 * double like the C reference. No fast-math. */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <type_traits>

#include "common.cuh"

namespace {

/* ------------------------------------------------------------------------------------------------
 * Elementwise kernels. */
__global__ void __launch_bounds__(NT) k_residual_add(float *x, const float *y, size_t n) {
    pdl_entry();
    GRID_STRIDE(i, n) x[i] += y[i];
}
/* out = act(x) of adtype, x of xdtype: GELU and the narrowing for the next matmul in one pass (in
 * place when out is x and the types are equal: each element is read before it is written, by the
 * same thread). */
__global__ void __launch_bounds__(NT) k_activate(void *out, int adtype, const void *x, int xdtype, size_t n, int act) {
    pdl_entry();
    GRID_STRIDE(i, n) store_act(out, adtype, i, act_of(load_act(x, xdtype, i), act));
}
/* Two values rounded as store_act to the 16-bit adtype, packed for one 4-byte store. */
__device__ __forceinline__ unsigned pack_act2(int adtype, float lo, float hi) {
    return adtype == BLIP2_W_F16 ? pack2<__half>(lo, hi) : pack2<__nv_bfloat16>(lo, hi);
}
/* Element i of a 4-element group of x (16-byte fp32 or 8-byte 16-bit loads), widened. */
__device__ __forceinline__ float4 load_act4(const void *x, int xdtype, size_t i) {
    if (xdtype == BLIP2_W_F32) return reinterpret_cast<const float4 *>(x)[i];
    const uint2 u = reinterpret_cast<const uint2 *>(x)[i];
    float4 f;
    if (xdtype == BLIP2_W_F16) widen2<__half>(u.x, f.x, f.y), widen2<__half>(u.y, f.z, f.w);
    else widen2<__nv_bfloat16>(u.x, f.x, f.y), widen2<__nv_bfloat16>(u.y, f.z, f.w);
    return f;
}
/* The same, four elements a thread and iteration: one 16- or 8-byte load, one 16- or 8-byte store
 * (n a multiple of 4, x and out aligned to that). At vision batch 64 the GELU + narrowing of
 * [16 448, 6144] took 0.32 ms a layer (ncu, H100), ~1.7x its bytes at the copy rate. */
__global__ void __launch_bounds__(NT) k_activate_v4(void *out, int adtype, const void *x, int xdtype, size_t n4,
                                                    int act) {
    pdl_entry();
    GRID_STRIDE(i, n4) {
        const float4 v = load_act4(x, xdtype, i);
        const float a = act_of(v.x, act), b = act_of(v.y, act), c = act_of(v.z, act), d = act_of(v.w, act);
        if (adtype == BLIP2_W_F32) reinterpret_cast<float4 *>(out)[i] = make_float4(a, b, c, d);
        else reinterpret_cast<uint2 *>(out)[i] = make_uint2(pack_act2(adtype, a, b), pack_act2(adtype, c, d));
    }
}
/* Eight 16-bit values of xdtype through act, rounded to the 16-bit adtype: one 16-byte load's worth. */
__device__ __forceinline__ uint4 act8_16(uint4 u, int xdtype, int adtype, int act) {
    unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int k = 0; k < 4; k++) {
        float lo, hi;
        if (xdtype == BLIP2_W_F16) widen2<__half>(w[k], lo, hi);
        else widen2<__nv_bfloat16>(w[k], lo, hi);
        w[k] = pack_act2(adtype, act_of(lo, act), act_of(hi, act));
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
}
/* 16-bit x and out (vision's GELU between fc1 and fc2): eight elements a thread and step by 16-byte
 * loads and stores, and two steps' loads issued before either's arithmetic, 32 bytes a thread in
 * flight where k_activate_v4 has 8 (run 8, H100, 64 images: 0.20 ms a layer for 404 MB, ~1.5x
 * its bytes at the copy rate). n8 groups of 8; x and out 16-byte aligned; in place as k_activate. */
__global__ void __launch_bounds__(NT) k_activate_v8(void *out, int adtype, const void *x, int xdtype, size_t n8,
                                                    int act) {
    pdl_entry();
    const uint4 *xi = reinterpret_cast<const uint4 *>(x);
    uint4 *o = reinterpret_cast<uint4 *>(out);
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n8; i += 2 * stride) {
        const size_t j = i + stride;
        const uint4 a = xi[i], b = j < n8 ? xi[j] : make_uint4(0u, 0u, 0u, 0u);
        o[i] = act8_16(a, xdtype, adtype, act);
        if (j < n8) o[j] = act8_16(b, xdtype, adtype, act);
    }
}
/* out[t, o] += bias[o] (bias may be NULL, else of x's type), then ReLU if relu: the epilogue when
 * cuBLASLt is not used. */
__global__ void __launch_bounds__(NT) k_bias_act(void *x, int xdtype, const void *bias, size_t n, int C, int relu) {
    pdl_entry();
    GRID_STRIDE(i, n) {
        float v = load_act(x, xdtype, i);
        if (bias) v += load_act(bias, xdtype, i % (size_t)C);
        if (relu) v = v > 0.0f ? v : 0.0f;
        store_act(x, xdtype, i, v);
    }
}

__global__ void __launch_bounds__(NT) k_im2col(float *out, const float *img, int CH, int H, int W, int PS) {
    pdl_entry();
    int PW = W / PS, PH = H / PS, K = CH * PS * PS;
    size_t n = (size_t)PH * PW * K;
    GRID_STRIDE(e, n) {
        int p = (int)(e / (size_t)K), col = (int)(e % (size_t)K);
        int c = col / (PS * PS), i = (col / PS) % PS, j = col % PS;
        int py = p / PW, px = p % PW;
        out[e] = img[((size_t)c * H + (size_t)py * PS + i) * W + (size_t)px * PS + j];
    }
}

__global__ void __launch_bounds__(NT) k_embedding(float *out, const int32_t *ids, const float *table, int T, int C) {
    pdl_entry();
    size_t n = (size_t)T * C;
    GRID_STRIDE(e, n) {
        size_t t = e / (size_t)C, c = e % (size_t)C;
        out[e] = table[(size_t)ids[t] * C + c];
    }
}

/* Widening of one table element of wdtype (exact). */
__device__ __forceinline__ float load_w(const void *table, int wdtype, size_t k) {
    if (wdtype == BLIP2_W_F32) return ((const float *)table)[k];
    unsigned short u = ((const unsigned short *)table)[k];
    if (wdtype == BLIP2_W_F16) return __half2float(__ushort_as_half(u));
    return __uint_as_float((unsigned int)u << 16); /* bfloat16 */
}

__global__ void __launch_bounds__(NT) k_embedding_vp(float *out, const int32_t *ids, const void *table, int wdtype,
                                                     int T, int C, int v0, int V) {
    pdl_entry();
    size_t n = (size_t)T * C;
    GRID_STRIDE(e, n) {
        size_t t = e / (size_t)C, c = e % (size_t)C;
        long long id = ids[t], local = id - (long long)v0;
        float v = 0.0f;
        if (id >= 0 && local >= 0 && local < (long long)V) v = load_w(table, wdtype, (size_t)local * C + c);
        out[e] = v;
    }
}

__global__ void __launch_bounds__(NT) k_add_rows(float *x, const float *table, int row0, int T, int C) {
    pdl_entry();
    size_t n = (size_t)T * C;
    const float *src = table + (size_t)row0 * C;
    GRID_STRIDE(e, n) x[e] += src[e];
}

__global__ void __launch_bounds__(NT) k_add_rows_at(float *x, const float *table, const int32_t *rows, int T, int C) {
    pdl_entry();
    size_t n = (size_t)T * C;
    GRID_STRIDE(e, n) {
        size_t t = e / (size_t)C, c = e % (size_t)C;
        x[e] += table[(size_t)rows[t] * C + c];
    }
}

__global__ void __launch_bounds__(NT) k_gather_rows(float *out, const float *x, const int32_t *rows, int n_rows, int C) {
    pdl_entry();
    size_t n = (size_t)n_rows * C;
    GRID_STRIDE(e, n) {
        size_t i = e / (size_t)C, c = e % (size_t)C;
        out[e] = x[(size_t)rows[i] * C + c];
    }
}

/* The counter-based normal generator of ops.h, element i. The float steps use __fmul_rn/__fadd_rn
 * so nvcc cannot contract them into an FMA (the C reference rounds the product, then the sum). */
__global__ void __launch_bounds__(NT) k_fill_normal(void *x, int wdtype, size_t n, uint64_t seed, float mean, float sd) {
    pdl_entry();
    GRID_STRIDE(i, n) {
        float v;
        if (sd == 0.0f) {
            v = mean;
        } else {
            uint64_t z = seed + (uint64_t)(i + 1) * 0x9E3779B97F4A7C15ull;
            z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
            z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
            z ^= z >> 31;
            double u1 = ((double)(z >> 32) + 0.5) / 4294967296.0;
            double u2 = ((double)(z & 0xffffffffu) + 0.5) / 4294967296.0;
            double g = __dmul_rn(sqrt(__dmul_rn(-2.0, log(u1))), cos(__dmul_rn(6.283185307179586, u2)));
            v = __fadd_rn(mean, __fmul_rn(sd, (float)g));
        }
        if (wdtype == BLIP2_W_F32) ((float *)x)[i] = v;
        else if (wdtype == BLIP2_W_F16) ((unsigned short *)x)[i] = __half_as_ushort(__float2half_rn(v));
        else ((unsigned short *)x)[i] = __bfloat16_as_ushort(__float2bfloat16_rn(v));
    }
}

/* ------------------------------------------------------------------------------------------------
 * Row kernels: one block of NT threads per row. */
__global__ void __launch_bounds__(NT) k_layernorm(void *out, int adtype, const float *inp, const float *w, const float *b,
                                                  int C, float eps) {
    pdl_entry();
    __shared__ double red[32];
    const float *x = inp + (size_t)blockIdx.x * C;
    size_t y0 = (size_t)blockIdx.x * C;
    double s = 0;
    for (int i = threadIdx.x; i < C; i += blockDim.x) s += x[i];
    float mean, rstd;
    row_norm_stats(x, C, s, eps, red, mean, rstd); /* its barriers order every read of x before any write of y */
    for (int i = threadIdx.x; i < C; i += blockDim.x) store_act(out, adtype, y0 + i, (x[i] - mean) * rstd * w[i] + b[i]);
}

/* res += y + bias (bias may be NULL), then out = LN(res) of adtype; an fp32 out may alias y. */
__global__ void __launch_bounds__(NT) k_residual_layernorm(float *res, void *out, int adtype, const float *y,
                                                           const float *bias, const float *w, const float *b, int C,
                                                           float eps) {
    pdl_entry();
    __shared__ double red[32];
    float *r = res + (size_t)blockIdx.x * C;
    const float *yy = y + (size_t)blockIdx.x * C;
    size_t o0 = (size_t)blockIdx.x * C;
    double s = 0;
    for (int i = threadIdx.x; i < C; i += blockDim.x) {
        float v = r[i] + (bias ? yy[i] + bias[i] : yy[i]);
        r[i] = v;
        s += v;
    }
    float mean, rstd;
    row_norm_stats(r, C, s, eps, red, mean, rstd);
    __syncthreads(); /* the row of res is complete and y fully read before out (maybe y) is written */
    for (int i = threadIdx.x; i < C; i += blockDim.x) store_act(out, adtype, o0 + i, (r[i] - mean) * rstd * w[i] + b[i]);
}

/* The same two kernels with the row in registers (C <= NT·PER): every load of a row is issued
 * before the first sum, where the loops above wait out the memory latency element by element (a
 * decode row, one block: 13.6 µs a call under ncu on an H100, for 2560 floats; in the residual
 * loop each load also waits for the store before it, which may alias). The same operations in
 * the same order, so the same bits. */
constexpr int LN_REG_T = 256;
/* Elements per thread of the register kernel for a norm of T rows of C, or 0 for the loop kernel.
 * PER = 16 (C <= 4096, the OPT rows) takes 101 registers: only for few rows (decode, small
 * prefills), where latency is what counts; with many (a batch-64 prefill) the loop kernel
 * measured better (H100, run 3). PER = 4 or 8 (the Q-Former's 768, vision's 1408) holds a third
 * of that, so it serves any number of rows (vision at 64 images: 16 448). Every choice gives the
 * same bits, so a row's norm does not depend on its batch. */
inline int ln_per(int T, int C) {
    if (C <= NT * 4) return 4;
    if (C <= NT * 8) return 8;
    return C <= NT * 16 && T <= LN_REG_T ? 16 : 0;
}
/* The rest of both: this thread's partial sum s of its elements v (i = threadIdx.x + u·NT < C) to
 * the mean, the variance in the loop kernels' order, then out = (v − mean)·rstd·w + b of adtype. */
template <int LN_PER>
__device__ __forceinline__ void ln_regs_finish(const float (&v)[LN_PER], const float (&wv)[LN_PER],
                                               const float (&bv)[LN_PER], double s, double *red, void *out,
                                               int adtype, size_t o0, int C, float eps) {
    s = block_sum(s, red); /* its barriers also order every read of the row before any write of out */
    const float mean = (float)(s / C);
    double var = 0;
#pragma unroll
    for (int u = 0; u < LN_PER; u++)
        if ((int)threadIdx.x + u * NT < C) {
            const float d = v[u] - mean;
            var += (double)d * d;
        }
    var = block_sum(var, red);
    const float rstd = (float)(1.0 / sqrt(var / C + (double)eps));
#pragma unroll
    for (int u = 0; u < LN_PER; u++) {
        const int i = (int)threadIdx.x + u * NT;
        if (i < C) store_act(out, adtype, o0 + i, (v[u] - mean) * rstd * wv[u] + bv[u]);
    }
}

template <int LN_PER>
__global__ void __launch_bounds__(NT) k_layernorm_r(void *out, int adtype, const float *inp, const float *w,
                                                    const float *b, int C, float eps) {
    pdl_entry();
    __shared__ double red[32];
    const float *x = inp + (size_t)blockIdx.x * C;
    float v[LN_PER], wv[LN_PER], bv[LN_PER];
#pragma unroll
    for (int u = 0; u < LN_PER; u++) {
        const int i = (int)threadIdx.x + u * NT;
        v[u] = i < C ? x[i] : 0.0f, wv[u] = i < C ? w[i] : 0.0f, bv[u] = i < C ? b[i] : 0.0f;
    }
    double s = 0;
#pragma unroll
    for (int u = 0; u < LN_PER; u++)
        if ((int)threadIdx.x + u * NT < C) s += v[u];
    ln_regs_finish(v, wv, bv, s, red, out, adtype, (size_t)blockIdx.x * C, C, eps);
}

template <int LN_PER>
__global__ void __launch_bounds__(NT) k_residual_layernorm_r(float *res, void *out, int adtype, const float *y,
                                                             const float *bias, const float *w, const float *b, int C,
                                                             float eps) {
    pdl_entry();
    __shared__ double red[32];
    float *r = res + (size_t)blockIdx.x * C;
    const float *yy = y + (size_t)blockIdx.x * C;
    float v[LN_PER], wv[LN_PER], bv[LN_PER];
#pragma unroll
    for (int u = 0; u < LN_PER; u++) {
        const int i = (int)threadIdx.x + u * NT;
        v[u] = i < C ? r[i] + (bias ? yy[i] + bias[i] : yy[i]) : 0.0f;
        wv[u] = i < C ? w[i] : 0.0f, bv[u] = i < C ? b[i] : 0.0f;
    }
    double s = 0;
#pragma unroll
    for (int u = 0; u < LN_PER; u++) {
        const int i = (int)threadIdx.x + u * NT;
        if (i < C) r[i] = v[u], s += v[u];
    }
    ln_regs_finish(v, wv, bv, s, red, out, adtype, (size_t)blockIdx.x * C, C, eps);
}

/* Softmax of the first lim values of a row of n (max-subtracted, double sum); the rest become 0.
 * lim == 0 gives a row of zeros. */
__device__ void softmax_row(float *row, int n, int lim, float *shf, double *shd) {
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < lim; j += blockDim.x) mx = fmaxf(mx, row[j]);
    mx = block_max(mx, shf);
    double s = 0;
    for (int j = threadIdx.x; j < lim; j += blockDim.x) {
        float e = expf(row[j] - mx);
        row[j] = e;
        s += e;
    }
    s = block_sum(s, shd);
    float inv = lim > 0 ? (float)(1.0 / s) : 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) row[j] = j < lim ? row[j] * inv : 0.0f;
}

__global__ void __launch_bounds__(NT) k_softmax(float *x, int n) {
    pdl_entry();
    __shared__ float shf[32];
    __shared__ double shd[32];
    softmax_row(x + (size_t)blockIdx.x * n, n, n, shf, shd);
}

/* Scores [batch, Tq, ld] (Tk used of each row of ld): row blockIdx.x = n·Tq + i; causal rows see
 * keys j <= i + (Tk − Tq). */
__global__ void __launch_bounds__(NT) k_attn_softmax(float *scores, int Tq, int Tk, int ld, int causal) {
    pdl_entry();
    __shared__ float shf[32];
    __shared__ double shd[32];
    int i = (int)(blockIdx.x % (unsigned)Tq);
    long long lim = causal ? (long long)i + (Tk - Tq) + 1 : Tk;
    if (lim < 0) lim = 0;
    if (lim > Tk) lim = Tk;
    softmax_row(scores + (size_t)blockIdx.x * ld, Tk, (int)lim, shf, shd);
}

/* The same, one warp per row, for rows of at most SMW_KEYS keys (the encoders' 257 and 32): the
 * row stays in registers, two warp reductions, no barriers. The block-per-row kernel above is
 * latency-bound there: at 64 images a vision layer has 263k rows of 257, each a block of 256
 * threads with four barriers. */
constexpr int SMW_PER_LANE = 16, SMW_KEYS = 32 * SMW_PER_LANE;
__global__ void __launch_bounds__(NT) k_attn_softmax_warp(float *scores, long long rows, int Tq, int Tk, int ld,
                                                          int causal) {
    pdl_entry();
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * (NT / 32) + (threadIdx.x >> 5);
    if (row >= rows) return; /* a whole warp leaves: no reduction below misses a lane */
    float *r = scores + (size_t)row * ld;
    const int i = (int)(row % Tq);
    long long lim = causal ? (long long)i + (Tk - Tq) + 1 : Tk;
    lim = lim < 0 ? 0 : lim > Tk ? Tk : lim;
    float x[SMW_PER_LANE], mx = -INFINITY;
#pragma unroll
    for (int u = 0; u < SMW_PER_LANE; u++) {
        const int j = lane + 32 * u;
        x[u] = j < lim ? r[j] : -INFINITY;
        mx = fmaxf(mx, x[u]);
    }
    mx = warp_max(mx);
    double s = 0;
#pragma unroll
    for (int u = 0; u < SMW_PER_LANE; u++)
        if (lane + 32 * u < lim) x[u] = expf(x[u] - mx), s += x[u];
    s = warp_sum(s);
    const float inv = lim > 0 ? (float)(1.0 / s) : 0.0f;
#pragma unroll
    for (int u = 0; u < SMW_PER_LANE; u++) {
        const int j = lane + 32 * u;
        if (j < Tk) r[j] = j < lim ? x[u] * inv : 0.0f;
    }
}

/* Argmax order: does (va, ia) beat (vb, ib)? A real index beats "none" (INT_MAX); a number beats NaN;
 * the larger value wins; ties (and two NaNs) go to the lower index. A total order, so the
 * reduction's grouping does not matter. */
__device__ __forceinline__ bool am_better(float va, int ia, float vb, int ib) {
    if (ia == INT_MAX) return false;
    if (ib == INT_MAX) return true;
    bool na = isnan(va), nb = isnan(vb);
    if (na != nb) return nb;
    if (!na && va != vb) return va > vb;
    return ia < ib;
}

/* One block of AM_NT threads per row, AM_PER loads in flight a thread. The row's time is its
 * rounds of loads, each a memory latency: one load a round took 90 µs a 50k row; 8 a round with
 * 256 threads (25 rounds) still 32 µs under ncu (run 8, a decode step's only row at batch 1), so
 * a block now has 1024 threads (7 rounds). am_better is a total order: the same pick for any
 * split of the row. */
constexpr int AM_PER = 8, AM_NT = 1024;
/* This thread's best (bv, bi) of row r [n] among the elements ranked after (pv, pi) (pi INT_MAX:
 * all of them), AM_PER loads in flight. */
__device__ __forceinline__ void am_scan(const float *r, int n, float pv, int pi, float &bv, int &bi) {
    for (int i0 = threadIdx.x; i0 < n; i0 += AM_PER * AM_NT) {
        float v[AM_PER];
#pragma unroll
        for (int u = 0; u < AM_PER; u++) v[u] = i0 + u * AM_NT < n ? r[i0 + u * AM_NT] : 0.0f;
#pragma unroll
        for (int u = 0; u < AM_PER; u++) {
            const int i = i0 + u * AM_NT;
            if (i < n && (pi == INT_MAX || am_better(pv, pi, v[u], i)) && am_better(v[u], i, bv, bi)) bv = v[u], bi = i;
        }
    }
}

__global__ void __launch_bounds__(AM_NT) k_argmax_rows(int32_t *idx, float *val, const float *x, int n) {
    pdl_entry();
    __shared__ float sv[32];
    __shared__ int si[32];
    const float *r = x + (size_t)blockIdx.x * n;
    float bv = 0.0f;
    int bi = INT_MAX;
    am_scan(r, n, 0.0f, INT_MAX, bv, bi);
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (am_better(ov, oi, bv, bi)) bv = ov, bi = oi;
    }
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    if (lane == 0) sv[w] = bv, si[w] = bi;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int k = 1; k < nw; k++)
            if (am_better(sv[k], si[k], bv, bi)) bv = sv[k], bi = si[k];
        idx[blockIdx.x] = bi == INT_MAX ? 0 : bi;
        val[blockIdx.x] = bi == INT_MAX ? __int_as_float(0x7fc00000) : bv;
    }
}

/* One block per row: the max, then Σ exp(x − max) in double (as the reference; the row is in L2
 * by the second pass). */
__global__ void __launch_bounds__(NT) k_logsumexp_rows(float *out, const float *x, int n) {
    pdl_entry();
    __shared__ float shf[32];
    __shared__ double shd[32];
    const float *row = x + (size_t)blockIdx.x * n;
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < n; j += blockDim.x) mx = fmaxf(mx, row[j]);
    mx = block_max(mx, shf);
    double s = 0;
    if (mx > -INFINITY)
        for (int j = threadIdx.x; j < n; j += blockDim.x) s += exp((double)(row[j] - mx));
    s = block_sum(s, shd);
    if (threadIdx.x == 0) out[2 * blockIdx.x] = mx > -INFINITY ? mx : 0.0f, out[2 * blockIdx.x + 1] = (float)s;
}

__global__ void __launch_bounds__(NT) k_shift_rows(float *x, const float *shift, int T, int n) {
    pdl_entry();
    GRID_STRIDE(i, (size_t)T * n) x[i] -= shift[i / (size_t)n];
}

/* One block per row; the row's ids are distinct, so no two threads touch one element. */
__global__ void __launch_bounds__(NT) k_penalize_rows(float *x, const int32_t *ids, const int32_t *offs, const float *pen,
                                                      int n, int v0) {
    pdl_entry();
    int t = blockIdx.x;
    float p = pen[t];
    for (int k = offs[t] + threadIdx.x; k < offs[t + 1]; k += blockDim.x) {
        long long j = (long long)ids[k] - v0;
        if (j < 0 || j >= n) continue;
        float *s = x + (size_t)t * n + j;
        *s = *s < 0 ? *s * p : *s / p;
    }
}

/* One block per row, k rounds: round j finds the best element ranked after round j−1's winner
 * (a full pass over the row each, which stays in L1/L2: k <= 64 passes over 200 KB at most), so no
 * element is marked and ties resolve exactly as argmax does. Each pass is k_argmax_rows' scan
 * (am_scan: 7 rounds of loads for 50 272 logits, where 256 threads and one load at a time took
 * 197). */
__global__ void __launch_bounds__(AM_NT) k_topk_rows(int32_t *idx, float *val, const float *x, int n, int k) {
    pdl_entry();
    __shared__ float sv[32];
    __shared__ int si[32];
    __shared__ float wv;
    __shared__ int wi;
    const float *r = x + (size_t)blockIdx.x * n;
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    float pv = 0.0f;
    int pi = INT_MAX; /* the previous winner; INT_MAX: none yet */
    for (int j = 0; j < k; j++) {
        float bv = 0.0f;
        int bi = INT_MAX;
        am_scan(r, n, pv, pi, bv, bi);
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (am_better(ov, oi, bv, bi)) bv = ov, bi = oi;
        }
        if (lane == 0) sv[w] = bv, si[w] = bi;
        __syncthreads();
        if (threadIdx.x == 0) {
            for (int q = 1; q < nw; q++)
                if (am_better(sv[q], si[q], bv, bi)) bv = sv[q], bi = si[q];
            wv = bv, wi = bi;
            idx[(size_t)blockIdx.x * k + j] = bi == INT_MAX ? 0 : bi;
            val[(size_t)blockIdx.x * k + j] = bi == INT_MAX ? __int_as_float(0x7fc00000) : bv;
        }
        __syncthreads();
        pv = wv, pi = wi; /* k <= n: every round has a winner */
        __syncthreads(); /* wv, wi and sv are rewritten by the next round */
    }
}

} /* namespace */

/* ------------------------------------------------------------------------------------------------
 * Batch invariance. By default a row's matmul sums run in an order that depends on how many rows
 * share the call: at T <= gemv_max_t() the GEMV's, above it cuBLASLt's, whose heuristic may also
 * pick split-K for some shapes. The logits then differ in their last bits between a request
 * decoded alone and among others, and a seeded draw near a boundary can move (H100, 2026-11-27:
 * 7 of 8 seeded samples alike in test_engine; greedy 64 of 64). BLIP2_BATCH_INVARIANT=1 sends
 * every matmul to cuBLASLt with algorithms that reduce without split-K
 * (CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK = NONE): each output's sum should then run along
 * K in the same tensor-core steps whatever M is (with BLIP2_GEMV=0 alone, run 4 already gave 8 of
 * 8); tests/gpu/run.sh's engine_*_invariant steps check it on the card. The cost is the GEMV's
 * advantage at small batches. Read once per process. */
bool batch_invariant_mode() {
    static const bool on = env_switch("BLIP2_BATCH_INVARIANT", false);
    return on;
}
int be_batch_invariant() { return batch_invariant_mode() ? 1 : 0; }

namespace {

/* ------------------------------------------------------------------------------------------------
 * Matmuls through cuBLASLt, with cublasGemmEx as the fallback when the heuristic offers nothing. */
int align_of(const void *p) {
    uintptr_t a = (uintptr_t)p;
    if (a == 0) return 256;
    uintptr_t low = a & (~a + 1);
    return low >= 256 ? 256 : (int)low;
}

/* Finds or fills the cache entry for key; NULL only when the heuristic call itself failed. */
blip2_lt_entry *lt_algo(blip2_cuda_ctx *c, const blip2_lt_key *key, cublasLtMatmulDesc_t desc,
                        cublasLtMatrixLayout_t la, cublasLtMatrixLayout_t lb, cublasLtMatrixLayout_t ld) {
    for (int i = 0; i < BLIP2_LT_CACHE; i++)
        if (c->lt_cache[i].used && !memcmp(&c->lt_cache[i].key, key, sizeof *key)) return &c->lt_cache[i];
    blip2_lt_entry *e = &c->lt_cache[c->lt_next];
    c->lt_next = (c->lt_next + 1) % BLIP2_LT_CACHE;
    memset(e, 0, sizeof *e);
    e->key = *key;
    cublasLtMatmulPreferenceOpaque_t po;
    cublasLtMatmulPreference_t pref = &po;
    uint64_t ws = BLIP2_LT_WORKSPACE;
    uint32_t aa = (uint32_t)key->align_a, ab = (uint32_t)key->align_b, ad = (uint32_t)key->align_d;
    const uint32_t no_split = CUBLASLT_REDUCTION_SCHEME_NONE; /* the batch-invariant mode's only scheme */
    if (!CUBLAS_CK(c, cublasLtMatmulPreferenceInit(pref)) ||
        !CUBLAS_CK(c, cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws)) ||
        !CUBLAS_CK(c, cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &aa, sizeof aa)) ||
        !CUBLAS_CK(c, cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &ab, sizeof ab)) ||
        !CUBLAS_CK(c, cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &ad, sizeof ad)) ||
        !CUBLAS_CK(c, cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &ad, sizeof ad)) ||
        (batch_invariant_mode() && !CUBLAS_CK(c, cublasLtMatmulPreferenceSetAttribute(
                                                     pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &no_split,
                                                     sizeof no_split)))) {
        e->used = 0;
        return NULL;
    }
    cublasLtMatmulHeuristicResult_t res;
    memset(&res, 0, sizeof res);
    int nres = 0;
    cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(c->lt, desc, la, lb, ld, ld, pref, 1, &res, &nres);
    e->used = 1;
    e->ok = st == CUBLAS_STATUS_SUCCESS && nres > 0 && res.state == CUBLAS_STATUS_SUCCESS &&
            res.workspaceSize <= BLIP2_LT_WORKSPACE;
    if (e->ok) e->algo = res.algo;
    return e;
}

/* The BLIP2_W_* type of a cuBLAS data type (fp32, f16, bf16). */
static int w_of(cudaDataType_t t) { return t == CUDA_R_16F ? BLIP2_W_F16 : t == CUDA_R_16BF ? BLIP2_W_BF16 : BLIP2_W_F32; }

/* out[T, OC] = in[T, C] · w[OC, C]ᵀ (+ bias) (ReLU if relu), A/B of type ab, C/D and the bias of
 * type dt (fp32, or ab: a 16-bit out), fp32 compute; with acc, out += the same (beta = 1, C = D:
 * cuBLASLt adds out to the product, then the bias).
 * Column-major: D[OC × T] = op(A)·B with A = w as C × OC (lda C) transposed, B = in as C × T (ldb C). */
void gemm(blip2_cuda_ctx *c, void *out, cudaDataType_t dt, const void *w, const void *in, cudaDataType_t ab,
          const void *bias, int T, int C, int OC, int relu, bool acc = false) {
    size_t n_out = (size_t)T * OC;
    const int od = w_of(dt);
    if (C == 0) { /* no products: out = act(bias or 0), or out += bias */
        if (!acc && !CUDA_CK(c, cudaMemsetAsync(out, 0, n_out * blip2_wdtype_size(od), c->stream))) return;
        if (acc && !bias) return;
        launch(k_bias_act, grid_for(n_out), NT, 0, c->stream, out, od, bias, n_out, OC, relu);
        LAUNCH_CK(c, "k_bias_act");
        return;
    }
    const float alpha = 1.0f, beta = acc ? 1.0f : 0.0f;
    cublasLtMatmulDescOpaque_t dop;
    cublasLtMatmulDesc_t desc = &dop;
    cublasLtMatrixLayoutOpaque_t lao, lbo, ldo;
    cublasLtMatrixLayout_t la = &lao, lb = &lbo, ld = &ldo;
    int32_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N, bias_type = dt; /* cuBLASLt: a bias of D's type */
    uint32_t epi = bias ? (relu ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_BIAS)
                        : (relu ? CUBLASLT_EPILOGUE_RELU : CUBLASLT_EPILOGUE_DEFAULT);
    int ok = CUBLAS_CK(c, cublasLtMatmulDescInit(desc, CUBLAS_COMPUTE_32F, CUDA_R_32F)) &&
             CUBLAS_CK(c, cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta)) &&
             CUBLAS_CK(c, cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb)) &&
             CUBLAS_CK(c, cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof epi));
    if (ok && bias)
        ok = CUBLAS_CK(c, cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias)) &&
             CUBLAS_CK(c, cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type,
                                                         sizeof bias_type));
    ok = ok && CUBLAS_CK(c, cublasLtMatrixLayoutInit(la, ab, (uint64_t)C, (uint64_t)OC, C)) &&
         CUBLAS_CK(c, cublasLtMatrixLayoutInit(lb, ab, (uint64_t)C, (uint64_t)T, C)) &&
         CUBLAS_CK(c, cublasLtMatrixLayoutInit(ld, dt, (uint64_t)OC, (uint64_t)T, OC));
    if (!ok) return;
    blip2_lt_key key;
    memset(&key, 0, sizeof key);
    key.T = T, key.C = C, key.OC = OC, key.abtype = (int)ab, key.dtype = (int)dt, key.epilogue = (int)epi;
    key.bias = bias != NULL, key.accumulate = acc;
    key.align_a = align_of(w), key.align_b = align_of(in), key.align_d = align_of(out);
    key.align_bias = bias ? align_of(bias) : 0;
    blip2_lt_entry *e = lt_algo(c, &key, desc, la, lb, ld);
    if (!e) return;
    if (e->ok) {
        cublasStatus_t st = cublasLtMatmul(c->lt, desc, &alpha, w, la, in, lb, &beta, out, ld, out, ld, &e->algo,
                                           c->lt_ws, BLIP2_LT_WORKSPACE, c->stream);
        if (st == CUBLAS_STATUS_SUCCESS) return;
        if (st != CUBLAS_STATUS_NOT_SUPPORTED && st != CUBLAS_STATUS_INVALID_VALUE) {
            blip2_cublas_ck(c, st, "cublasLtMatmul", __FILE__, __LINE__);
            return;
        }
        e->ok = 0; /* refused before launching anything: use the fallback from now on */
    }
    /* a 16-bit out is rounded here before the bias is added: one more rounding than the epilogue */
    if (!CUBLAS_CK(c, cublasGemmEx(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, OC, T, C, &alpha, w, ab, C, in, ab, C, &beta, out,
                                   dt, OC, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT)))
        return;
    if (bias || relu) {
        launch(k_bias_act, grid_for(n_out), NT, 0, c->stream, out, od, bias, n_out, OC, relu);
        LAUNCH_CK(c, "k_bias_act");
    }
}

/* A device scratch buffer (*buf, *cap bytes), grown on demand. Growing waits for the stream (the old
 * buffer may still be read by queued work); it happens a handful of times per context. */
static void *scratch_grow(blip2_cuda_ctx *c, void **buf, size_t *cap, size_t bytes, const char *what) {
    if (bytes <= *cap) return *buf;
    size_t want = bytes < ((size_t)1 << 20) ? ((size_t)1 << 20) : bytes + bytes / 4;
    if (c->capturing) { /* a recorded graph must not see the buffer move under it */
        blip2_cuda_record(c, "%s: its scratch must grow to %zu bytes while a graph is recorded", what, bytes);
        return NULL;
    }
    if (!CUDA_CK(c, cudaStreamSynchronize(c->stream))) return NULL;
    if (*buf) cudaFree(*buf);
    *buf = NULL;
    *cap = 0;
    c->scratch_gen++;
    if (!CUDA_CK(c, cudaMalloc(buf, want))) {
        *buf = NULL;
        return NULL;
    }
    *cap = want;
    return *buf;
}

/* The 16-bit activation scratch: fp32 inputs narrowed for a 16-bit matmul. */
void *act16_scratch(blip2_cuda_ctx *c, size_t bytes) { return scratch_grow(c, &c->act16, &c->act16_bytes, bytes, "matmul_h"); }

/* The fp32 scratch: a 16-bit op's values widened for an fp32 path (a GELU out before its rounding,
 * the fallbacks of 16-bit attention). */
void *wide_scratch(blip2_cuda_ctx *c, size_t bytes) { return scratch_grow(c, &c->wide, &c->wide_bytes, bytes, "wide"); }


/* out = act(x) of adtype, x of xdtype, on the context's stream. */
void activate(blip2_cuda_ctx *c, void *out, int adtype, const void *x, int xdtype, size_t n, int act) {
    if (n == 0) return;
    const uintptr_t out_align = adtype == BLIP2_W_F32 ? 15 : 7, in_align = xdtype == BLIP2_W_F32 ? 15 : 7;
    if (adtype != BLIP2_W_F32 && xdtype != BLIP2_W_F32 && n % 8 == 0 && (((uintptr_t)x | (uintptr_t)out) & 15) == 0)
        launch(k_activate_v8, grid_for((n / 8 + 1) / 2), NT, 0, c->stream, out, adtype, x, xdtype, n / 8, act);
    else if (n % 4 == 0 && ((uintptr_t)x & in_align) == 0 && ((uintptr_t)out & out_align) == 0)
        launch(k_activate_v4, grid_for(n / 4), NT, 0, c->stream, out, adtype, x, xdtype, n / 4, act);
    else
        launch(k_activate, grid_for(n), NT, 0, c->stream, out, adtype, x, xdtype, n, act);
    LAUNCH_CK(c, "k_activate");
}

bool valid_act(blip2_cuda_ctx *c, const char *op, int act) {
    if (act == BLIP2_ACT_NONE || act == BLIP2_ACT_GELU || act == BLIP2_ACT_RELU) return true;
    blip2_cuda_record(c, "%s: unknown activation %d", op, act);
    return false;
}

/* A 16-bit input (already in the weights' type) through cuBLASLt into out of odtype (fp32 or the
 * weights' type; bias of odtype); ReLU in the epilogue, the exact erf GELU after it (cuBLASLt's
 * GELU epilogue is the tanh approximation), on fp32 values: a 16-bit out then goes through the
 * fp32 scratch, so it is rounded once. */
void gemm16(blip2_cuda_ctx *c, void *out, int odtype, const void *inp16, const uint16_t *weight, const void *bias, int T,
            int C, int OC, int wdtype, int act) {
    const cudaDataType_t ab = wdtype == BLIP2_W_F16 ? CUDA_R_16F : CUDA_R_16BF;
    const size_t n = (size_t)T * OC;
    if (act != BLIP2_ACT_GELU) {
        gemm(c, out, odtype == BLIP2_W_F32 ? CUDA_R_32F : ab, weight, inp16, ab, bias, T, C, OC, act == BLIP2_ACT_RELU);
        return;
    }
    float *y = odtype == BLIP2_W_F32 ? (float *)out : (float *)wide_scratch(c, n * sizeof(float) + sizeof(float) * OC);
    if (!y) return;
    const void *b32 = bias;
    if (bias && odtype != BLIP2_W_F32) { /* the 16-bit bias widened (exactly) after the product rows */
        activate(c, y + n, BLIP2_W_F32, bias, odtype, (size_t)OC, BLIP2_ACT_NONE);
        b32 = y + n;
    }
    gemm(c, y, CUDA_R_32F, weight, inp16, ab, b32, T, C, OC, 0);
    activate(c, out, odtype, y, BLIP2_W_F32, n, BLIP2_ACT_GELU);
}



} /* namespace */

/* ------------------------------------------------------------------------------------------------
 * The ops. */
namespace cuda {

void blip2_matmul(float *out, const float *inp, const float *weight, const float *bias, int T, int C, int OC) {
    blip2_cuda_ctx *c = cur("matmul");
    if (!c || T <= 0 || OC <= 0) return;
    gemm(c, out, CUDA_R_32F, weight, inp, CUDA_R_32F, bias, T, C, OC, 0);
}

/* fp32 matmul inputs [n] narrowed to the weights' 16-bit type wdtype in the activation scratch
 * (what cuBLASLt's tensor cores read); NULL when the scratch cannot grow (recorded). */
static const void *narrow16(blip2_cuda_ctx *c, const float *inp, size_t n, int wdtype) {
    void *a16 = act16_scratch(c, (n ? n : 1) * 2);
    if (a16) activate(c, a16, wdtype, inp, BLIP2_W_F32, n, BLIP2_ACT_NONE);
    return a16;
}

/* out (of odtype: fp32, or the 16-bit wdtype) = act(inp · weightᵀ + bias) for fp32 inp. */
static void matmul_f32_in(blip2_cuda_ctx *c, void *out, int odtype, const float *inp, const uint16_t *weight,
                          const void *bias, int T, int C, int OC, int wdtype, int act) {
    if (wdtype != BLIP2_W_F32 && gemv_use(T, C, wdtype)) { /* small T: hand-written GEMV, bias and act fused */
        gemv(c, out, odtype, inp, false, weight, bias, T, C, OC, wdtype, act);
    } else if (wdtype == BLIP2_W_F32) {
        gemm(c, out, CUDA_R_32F, weight, inp, CUDA_R_32F, bias, T, C, OC, act == BLIP2_ACT_RELU);
        if (act == BLIP2_ACT_GELU) activate(c, out, BLIP2_W_F32, out, BLIP2_W_F32, (size_t)T * OC, BLIP2_ACT_GELU);
    } else if (wdtype == BLIP2_W_F16 || wdtype == BLIP2_W_BF16) {
        const void *a16 = narrow16(c, inp, (size_t)T * C, wdtype);
        if (a16) gemm16(c, out, odtype, a16, weight, bias, T, C, OC, wdtype, act);
    } else {
        blip2_cuda_record(c, "matmul_h: unknown weight type %d", wdtype);
    }
}

void blip2_matmul_h(float *out, const float *inp, const uint16_t *weight, const float *bias, int T, int C, int OC,
                    int wdtype, int act) {
    blip2_cuda_ctx *c = cur("matmul_h");
    if (!c || T <= 0 || OC <= 0 || !valid_act(c, "matmul_h", act)) return;
    matmul_f32_in(c, out, BLIP2_W_F32, inp, weight, bias, T, C, OC, wdtype, act);
}

void blip2_matmul_a(void *out, const void *inp, const void *weight, const void *bias, int T, int C, int OC, int adtype,
                    int wdtype, int act, int odtype) {
    blip2_cuda_ctx *c = cur("matmul_a");
    if (!c || T <= 0 || OC <= 0 || !valid_act(c, "matmul_a", act)) return;
    const bool w16 = wdtype == BLIP2_W_F16 || wdtype == BLIP2_W_BF16;
    if ((adtype != BLIP2_W_F32 && (adtype != wdtype || !w16)) || (odtype != BLIP2_W_F32 && (odtype != wdtype || !w16))) {
        blip2_cuda_record(c, "matmul_a: %d-type inputs and %d-type outputs with %d-type weights", adtype, odtype, wdtype);
    } else if (adtype == BLIP2_W_F32) {
        matmul_f32_in(c, out, odtype, (const float *)inp, (const uint16_t *)weight, bias, T, C, OC, wdtype, act);
    } else if (gemv16_ok(T, C, wdtype, inp, weight)) {
        gemv(c, out, odtype, inp, true, (const uint16_t *)weight, bias, T, C, OC, wdtype, act);
    } else {
        gemm16(c, out, odtype, inp, (const uint16_t *)weight, bias, T, C, OC, wdtype, act);
    }
}

/* out += inp · weightᵀ + bias into the fp32 residual stream: the GEMV with an adding epilogue at
 * small T, else cuBLASLt with beta = 1 (C = D = out), so no kernel adds the rows afterwards. */
void blip2_matmul_acc_a(float *out, const void *inp, const void *weight, const float *bias, int T, int C, int OC,
                        int adtype, int wdtype) {
    blip2_cuda_ctx *c = cur("matmul_acc_a");
    if (!c || T <= 0 || OC <= 0) return;
    const bool w16 = wdtype == BLIP2_W_F16 || wdtype == BLIP2_W_BF16;
    const uint16_t *w = (const uint16_t *)weight;
    if ((adtype != BLIP2_W_F32 && (adtype != wdtype || !w16)) || (!w16 && wdtype != BLIP2_W_F32)) {
        blip2_cuda_record(c, "matmul_acc_a: %d-type inputs with %d-type weights", adtype, wdtype);
    } else if (!w16) {
        gemm(c, out, CUDA_R_32F, weight, inp, CUDA_R_32F, bias, T, C, OC, 0, true);
    } else if (adtype == BLIP2_W_F32 ? gemv_use(T, C, wdtype) : gemv16_ok(T, C, wdtype, inp, weight)) {
        gemv(c, out, GEMV_OUT_ADD, inp, adtype != BLIP2_W_F32, w, bias, T, C, OC, wdtype, BLIP2_ACT_NONE);
    } else {
        const void *in16 = adtype == BLIP2_W_F32 ? narrow16(c, (const float *)inp, (size_t)T * C, wdtype) : inp;
        if (in16)
            gemm(c, out, CUDA_R_32F, weight, in16, wdtype == BLIP2_W_F16 ? CUDA_R_16F : CUDA_R_16BF, bias, T, C, OC, 0, true);
    }
}

void blip2_layernorm_a(void *out, const float *inp, const float *w, const float *b, int T, int C, float eps, int adtype);

/* matmul_a(LN(x)): at one row the fused GEMV (h untouched), else the norm into h and the matmul. */
void blip2_matmul_ln_a(void *out, void *h, const float *x, const float *ln_w, const float *ln_b, float eps,
                       const void *weight, const void *bias, int T, int C, int OC, int adtype, int wdtype, int act,
                       int odtype) {
    blip2_cuda_ctx *c = cur("matmul_ln_a");
    if (!c || T <= 0 || OC <= 0 || !valid_act(c, "matmul_ln_a", act)) return;
    const bool o_ok = odtype == BLIP2_W_F32 || odtype == wdtype;
    if (o_ok && gemv_ln_ok(T, C, adtype, wdtype, x, ln_w, ln_b, weight)) {
        gemv_ln(c, out, odtype, x, ln_w, ln_b, eps, (const uint16_t *)weight, bias, C, OC, wdtype, act);
        return;
    }
    blip2_layernorm_a(h, x, ln_w, ln_b, T, C, eps, adtype);
    blip2_matmul_a(out, h, weight, bias, T, C, OC, adtype, wdtype, act, odtype);
}

void blip2_layernorm_a(void *out, const float *inp, const float *w, const float *b, int T, int C, float eps, int adtype) {
    blip2_cuda_ctx *c = cur("layernorm");
    if (!c || T <= 0 || C <= 0 || !valid_adtype(c, "layernorm", adtype)) return;
    const int per = ln_per(T, C);
    auto *kernel = per == 4    ? k_layernorm_r<4>
                   : per == 8  ? k_layernorm_r<8>
                   : per == 16 ? k_layernorm_r<16>
                               : k_layernorm;
    launch(kernel, T, NT, 0, c->stream, out, adtype, inp, w, b, C, eps);
    LAUNCH_CK(c, "k_layernorm");
}

void blip2_layernorm(float *out, const float *inp, const float *w, const float *b, int T, int C, float eps) {
    cuda::blip2_layernorm_a(out, inp, w, b, T, C, eps, BLIP2_W_F32);
}

void blip2_residual_layernorm(float *res, float *out, const float *y, const float *bias, const float *w, const float *b,
                              int T, int C, float eps) {
    blip2_cuda_ctx *c = cur("residual_layernorm");
    if (!c || T <= 0 || C <= 0) return;
    const int per = ln_per(T, C);
    auto *kernel = per == 4    ? k_residual_layernorm_r<4>
                   : per == 8  ? k_residual_layernorm_r<8>
                   : per == 16 ? k_residual_layernorm_r<16>
                               : k_residual_layernorm;
    launch(kernel, T, NT, 0, c->stream, res, (void *)out, (int)BLIP2_W_F32, y, bias, w, b, C, eps);
    LAUNCH_CK(c, "k_residual_layernorm");
}

void blip2_activate_a(void *out, const void *x, size_t n, int act, int adtype, int xdtype) {
    blip2_cuda_ctx *c = cur("activate");
    if (!c || !valid_act(c, "activate", act) || !valid_adtype(c, "activate", adtype) ||
        !valid_adtype(c, "activate", xdtype))
        return;
    activate(c, out, adtype, x, xdtype, n, act);
}

void blip2_residual_add(float *x, const float *y, size_t n) {
    blip2_cuda_ctx *c = cur("residual_add");
    if (!c || n == 0) return;
    launch(k_residual_add, grid_for(n), NT, 0, c->stream, x, y, n);
    LAUNCH_CK(c, "k_residual_add");
}

void blip2_gelu(float *x, size_t n) {
    blip2_cuda_ctx *c = cur("gelu");
    if (c) activate(c, x, BLIP2_W_F32, x, BLIP2_W_F32, n, BLIP2_ACT_GELU);
}

void blip2_relu(float *x, size_t n) {
    blip2_cuda_ctx *c = cur("relu");
    if (c) activate(c, x, BLIP2_W_F32, x, BLIP2_W_F32, n, BLIP2_ACT_RELU);
}

/* Softmax of `rows` score rows [rows, ld] of Tk keys (row n·Tq + i is query i): a warp per row
 * where the row fits its registers, a block per row otherwise. */
static bool attn_softmax(blip2_cuda_ctx *c, float *scores, long long rows, int Tq, int Tk, int ld, int causal) {
    if (Tk <= SMW_KEYS) {
        const unsigned blocks = (unsigned)((rows + NT / 32 - 1) / (NT / 32));
        launch(k_attn_softmax_warp, blocks, NT, 0, c->stream, scores, rows, Tq, Tk, ld, causal);
        return LAUNCH_CK(c, "k_attn_softmax_warp");
    }
    launch(k_attn_softmax, (unsigned)rows, NT, 0, c->stream, scores, Tq, Tk, ld, causal);
    return LAUNCH_CK(c, "k_attn_softmax");
}

/* BLIP2_MMA_ATTN=0 sends a 16-bit model's encoder attention to the strided-batched products below
 * instead of the tensor-core kernel (bench/gpu/run.sh's ours_products times that way). */
static bool mma_attention_enabled() {
    static const bool on = env_switch("BLIP2_MMA_ATTN", true);
    return on;
}

/* One strided-batched product on the context's stream: C = alpha·op(A)·B + beta·C, column-major,
 * fp32 matrices, compute type ct. */
struct sb_mat {
    const float *p;
    int ld;
    long long stride;
};
static bool sb_gemm(blip2_cuda_ctx *c, cublasOperation_t ta, int m, int n, int k, float alpha, sb_mat a, sb_mat b,
                    float beta, float *cp, int ldc, long long sc, int batch, cublasComputeType_t ct) {
    return CUBLAS_CK(c, cublasGemmStridedBatchedEx(c->blas, ta, CUBLAS_OP_N, m, n, k, &alpha, a.p, CUDA_R_32F, a.ld,
                                                   a.stride, b.p, CUDA_R_32F, b.ld, b.stride, &beta, cp, CUDA_R_32F, ldc,
                                                   sc, batch, ct, CUBLAS_GEMM_DEFAULT));
}

/* Row-major S_h[Tq, Tk] = scale·Q_h·K_hᵀ is, column-major, S_hᵀ[Tk × Tq] = K_h(HS × Tk, ld kv_stride)ᵀ ·
 * Q_h(HS × Tq, ld q_stride); O_h[Tq, HS] (ld NH·HS) is O_hᵀ[HS × Tq] = V_h(HS × Tk, ld kv_stride) · P_hᵀ(Tk × Tq).
 * Head h is the batch index: stride HS in q, k, v and out, Tq·ld in the scores (ld =
 * blip2_attention_ld(Tk)).
 *
 * Alignment: with Tk = 257 as the scores' row count (first product) and as the inner dimension
 * (second), cuBLAS ran both on alignment-1 TF32 kernels at ~19 TFLOP/s (ncu, H100, 2026-11-27:
 * 1.14 ms a vision layer at 64 images); padding only the row stride did not change its choice.
 * So the keys split into Tk8 = Tk rounded down to 8, every matrix of those products aligned, and
 * a tail of Tk − Tk8 < 8 keys: a sliver of a product, whose PV part is added to the first
 * (beta = 1). The padding columns [Tk, ld) of the scores are never read. */
struct attn_half {
    const float *k, *v; /* the first key/value row of this part (the head's column offset included) */
    int keys, col;      /* keys in the part, its first column in the score rows */
};
static void attention_f32(blip2_cuda_ctx *c, float *out, const float *q, const float *k, const float *v, float *scratch,
                          int B, int Tq, int Tk, int NH, int HS, int q_stride, int kv_stride, float scale, int causal,
                          int wdtype);

/* 16-bit q, k, v for a path that reads fp32 (causal, HS above the mma kernel's, BLIP2_MMA_ATTN=0):
 * widened into the fp32 scratch, attended there, out narrowed. Not the encoders' path on a device. */
static void attention_widened(blip2_cuda_ctx *c, void *out, const void *q, const void *k, const void *v, float *scratch,
                              int B, int Tq, int Tk, int NH, int HS, int q_stride, int kv_stride, float scale, int causal,
                              int wdtype, int iodtype) {
    const size_t nq = (size_t)(B * Tq - 1) * q_stride + (size_t)NH * HS; /* up to the last row's last head */
    const size_t nkv = (size_t)(B * Tk - 1) * kv_stride + (size_t)NH * HS, no = (size_t)B * Tq * NH * HS;
    float *w = (float *)wide_scratch(c, sizeof(float) * (nq + 2 * nkv + no));
    if (!w) return;
    float *qf = w, *kf = qf + nq, *vf = kf + nkv, *of = vf + nkv;
    activate(c, qf, BLIP2_W_F32, q, iodtype, nq, BLIP2_ACT_NONE);
    activate(c, kf, BLIP2_W_F32, k, iodtype, nkv, BLIP2_ACT_NONE);
    activate(c, vf, BLIP2_W_F32, v, iodtype, nkv, BLIP2_ACT_NONE);
    attention_f32(c, of, qf, kf, vf, scratch, B, Tq, Tk, NH, HS, q_stride, kv_stride, scale, causal, wdtype);
    activate(c, out, iodtype, of, BLIP2_W_F32, no, BLIP2_ACT_NONE);
}

void blip2_attention(void *out, const void *q, const void *k, const void *v, float *scratch, int B, int Tq, int Tk,
                     int NH, int HS, int q_stride, int kv_stride, float scale, int causal, int wdtype, int iodtype) {
    blip2_cuda_ctx *c = cur("attention");
    if (!c || B <= 0 || Tq <= 0 || NH <= 0 || HS <= 0 || !valid_adtype(c, "attention", iodtype)) return;
    if (Tk <= 0) {
        CUDA_CK(c, cudaMemsetAsync(out, 0, (size_t)B * Tq * NH * HS * blip2_wdtype_size(iodtype), c->stream));
        return;
    }
    if (!causal && mma_attention_enabled() &&
        (attention_fa(c, out, q, k, v, B, Tq, Tk, NH, HS, q_stride, kv_stride, scale, wdtype, iodtype) ||
         attention_mma(c, out, q, k, v, B, Tq, Tk, NH, HS, q_stride, kv_stride, scale, wdtype, iodtype)))
        return; /* a 16-bit model's encoders; each block's sums are the same in any batch (batch-invariant) */
    if (iodtype != BLIP2_W_F32)
        attention_widened(c, out, q, k, v, scratch, B, Tq, Tk, NH, HS, q_stride, kv_stride, scale, causal, wdtype, iodtype);
    else
        attention_f32(c, (float *)out, (const float *)q, (const float *)k, (const float *)v, scratch, B, Tq, Tk, NH, HS,
                      q_stride, kv_stride, scale, causal, wdtype);
}

/* The strided-batched products (fp32 q, k, v, out). */
static void attention_f32(blip2_cuda_ctx *c, float *out, const float *q, const float *k, const float *v, float *scratch,
                          int B, int Tq, int Tk, int NH, int HS, int q_stride, int kv_stride, float scale, int causal,
                          int wdtype) {
    /* Per outer step: the two products (each in up to two parts) and a softmax per image (batched
     * over its heads) or per head (batched over the images), whichever loop is shorter. A 16-bit
     * model runs the products on TF32 tensor cores (at vision batch 64 they are ~1 TFLOP: fp32
     * SIMT would add tens of ms); an fp32 model keeps fp32. */
    const cublasComputeType_t ct = wdtype == BLIP2_W_F32 ? CUBLAS_COMPUTE_32F : CUBLAS_COMPUTE_32F_FAST_TF32;
    const bool per_image = B <= NH || batch_invariant_mode(); /* the same calls for an image in any batch */
    const int outer = per_image ? B : NH, batch = per_image ? NH : B, ld = blip2_attention_ld(Tk), Tk8 = Tk & ~7;
    const long long sq = per_image ? HS : (long long)Tq * q_stride, skv = per_image ? HS : (long long)Tk * kv_stride;
    const long long so = per_image ? HS : (long long)Tq * NH * HS, st_s = (long long)Tq * ld;
    for (int i = 0; i < outer; i++) {
        size_t oq = per_image ? (size_t)i * Tq * q_stride : (size_t)i * HS;
        size_t okv = per_image ? (size_t)i * Tk * kv_stride : (size_t)i * HS;
        size_t oo = per_image ? (size_t)i * Tq * NH * HS : (size_t)i * HS;
        const attn_half parts[2] = {{k + okv, v + okv, Tk8, 0},
                                    {k + okv + (size_t)Tk8 * kv_stride, v + okv + (size_t)Tk8 * kv_stride, Tk - Tk8, Tk8}};
        for (const attn_half &p : parts)
            if (p.keys > 0 && !sb_gemm(c, CUBLAS_OP_T, p.keys, Tq, HS, scale, {p.k, kv_stride, skv},
                                       {q + oq, q_stride, sq}, 0.0f, scratch + p.col, ld, st_s, batch, ct))
                return;
        if (!attn_softmax(c, scratch, (long long)batch * Tq, Tq, Tk, ld, causal)) return;
        for (const attn_half &p : parts)
            if (p.keys > 0 && !sb_gemm(c, CUBLAS_OP_N, HS, Tq, p.keys, 1.0f, {p.v, kv_stride, skv},
                                       {scratch + p.col, ld, st_s}, p.col > 0 ? 1.0f : 0.0f, out + oo, NH * HS, so,
                                       batch, ct))
                return;
    }
}

void blip2_softmax(float *x, int T, int n) {
    blip2_cuda_ctx *c = cur("softmax");
    if (!c || T <= 0 || n <= 0) return;
    launch(k_softmax, T, NT, 0, c->stream, x, n);
    LAUNCH_CK(c, "k_softmax");
}

void blip2_im2col_patches(float *out, const float *img, int CH, int H, int W, int PS) {
    blip2_cuda_ctx *c = cur("im2col_patches");
    if (!c || CH <= 0 || PS <= 0 || H < PS || W < PS) return;
    size_t n = (size_t)(H / PS) * (W / PS) * CH * PS * PS;
    launch(k_im2col, grid_for(n), NT, 0, c->stream, out, img, CH, H, W, PS);
    LAUNCH_CK(c, "k_im2col");
}

void blip2_embedding(float *out, const int32_t *ids, const float *table, int T, int C) {
    blip2_cuda_ctx *c = cur("embedding");
    if (!c || T <= 0 || C <= 0) return;
    launch(k_embedding, grid_for((size_t)T * C), NT, 0, c->stream, out, ids, table, T, C);
    LAUNCH_CK(c, "k_embedding");
}

void blip2_embedding_vp(float *out, const int32_t *ids, const void *table, int wdtype, int T, int C, int v0, int V) {
    blip2_cuda_ctx *c = cur("embedding_vp");
    if (!c || T <= 0 || C <= 0) return;
    if (wdtype != BLIP2_W_F32 && wdtype != BLIP2_W_F16 && wdtype != BLIP2_W_BF16) {
        blip2_cuda_record(c, "embedding_vp: unknown weight type %d", wdtype);
        return;
    }
    launch(k_embedding_vp, grid_for((size_t)T * C), NT, 0, c->stream, out, ids, table, wdtype, T, C, v0, V);
    LAUNCH_CK(c, "k_embedding_vp");
}

void blip2_add_rows(float *x, const float *table, int row0, int T, int C) {
    blip2_cuda_ctx *c = cur("add_rows");
    if (!c || T <= 0 || C <= 0) return;
    launch(k_add_rows, grid_for((size_t)T * C), NT, 0, c->stream, x, table, row0, T, C);
    LAUNCH_CK(c, "k_add_rows");
}

void blip2_add_rows_at(float *x, const float *table, const int32_t *rows, int T, int C) {
    blip2_cuda_ctx *c = cur("add_rows_at");
    if (!c || T <= 0 || C <= 0) return;
    launch(k_add_rows_at, grid_for((size_t)T * C), NT, 0, c->stream, x, table, rows, T, C);
    LAUNCH_CK(c, "k_add_rows_at");
}

void blip2_gather_rows(float *out, const float *x, const int32_t *rows, int n, int C) {
    blip2_cuda_ctx *c = cur("gather_rows");
    if (!c || n <= 0 || C <= 0) return;
    launch(k_gather_rows, grid_for((size_t)n * C), NT, 0, c->stream, out, x, rows, n, C);
    LAUNCH_CK(c, "k_gather_rows");
}

void blip2_argmax_rows(int32_t *idx, float *val, const float *x, int T, int n) {
    blip2_cuda_ctx *c = cur("argmax_rows");
    if (!c || T <= 0) return;
    if (n < 0) n = 0;
    launch(k_argmax_rows, T, AM_NT, 0, c->stream, idx, val, x, n);
    LAUNCH_CK(c, "k_argmax_rows");
}

void blip2_topk_rows(int32_t *idx, float *val, const float *x, int T, int n, int k) {
    blip2_cuda_ctx *c = cur("topk_rows");
    if (!c || T <= 0) return;
    if (k < 1 || k > BLIP2_TOPK_MAX || k > n) {
        blip2_cuda_record(c, "topk_rows: k %d must be in [1, min(n %d, %d)]", k, n, BLIP2_TOPK_MAX);
        return;
    }
    launch(k_topk_rows, T, AM_NT, 0, c->stream, idx, val, x, n, k);
    LAUNCH_CK(c, "k_topk_rows");
}

/* Scalar result from device memory: runs the rows kernel on one row and waits for it. 0 on error. */
int blip2_argmax(const float *x, int n) {
    blip2_cuda_ctx *c = cur("argmax");
    if (!c || n <= 0) return 0;
    launch(k_argmax_rows, 1, AM_NT, 0, c->stream, c->am_idx, c->am_val, x, n);
    if (!LAUNCH_CK(c, "k_argmax_rows")) return 0;
    if (!CUDA_CK(c, cudaMemcpyAsync(c->am_host_idx, c->am_idx, sizeof(int32_t), cudaMemcpyDeviceToHost, c->stream)))
        return 0;
    if (!CUDA_CK(c, cudaStreamSynchronize(c->stream))) return 0;
    return *c->am_host_idx;
}

void blip2_penalize_rows(float *x, const int32_t *ids, const int32_t *offs, const float *pen, int T, int n, int v0) {
    blip2_cuda_ctx *c = cur("penalize_rows");
    if (!c || T <= 0 || n <= 0) return;
    launch(k_penalize_rows, T, NT, 0, c->stream, x, ids, offs, pen, n, v0);
    LAUNCH_CK(c, "k_penalize_rows");
}

void blip2_logsumexp_rows(float *out, const float *x, int T, int n) {
    blip2_cuda_ctx *c = cur("logsumexp_rows");
    if (!c || T <= 0) return;
    launch(k_logsumexp_rows, T, NT, 0, c->stream, out, x, n);
    LAUNCH_CK(c, "k_logsumexp_rows");
}

void blip2_shift_rows(float *x, const float *shift, int T, int n) {
    blip2_cuda_ctx *c = cur("shift_rows");
    if (!c || T <= 0 || n <= 0) return;
    launch(k_shift_rows, grid_for((size_t)T * n), NT, 0, c->stream, x, shift, T, n);
    LAUNCH_CK(c, "k_shift_rows");
}

void blip2_fill_normal(void *x, int wdtype, size_t n, uint64_t seed, float mean, float std) {
    blip2_cuda_ctx *c = cur("fill_normal");
    if (!c || n == 0) return;
    if (wdtype != BLIP2_W_F32 && wdtype != BLIP2_W_F16 && wdtype != BLIP2_W_BF16) {
        blip2_cuda_record(c, "fill_normal: unknown weight type %d", wdtype);
        return;
    }
    launch(k_fill_normal, grid_for(n), NT, 0, c->stream, x, wdtype, n, seed, mean, std);
    LAUNCH_CK(c, "k_fill_normal");
}

} /* namespace cuda */

/* ------------------------------------------------------------------------------------------------
 * Memory hooks. */
namespace {

void *mem_alloc(size_t bytes) {
    void *p = NULL;
    if (cudaMalloc(&p, bytes ? bytes : 1) != cudaSuccess) {
        cudaGetLastError(); /* out of memory is an answer, not an error */
        return NULL;
    }
    return p;
}

void mem_release(void *p) {
    if (!p) return;
    blip2_cuda_ctx *c = blip2_cuda_ctx_current();
    if (c) CUDA_CK(c, cudaStreamSynchronize(c->stream)); /* queued work may still use p */
    cudaError_t e = cudaFree(p);
    if (c) blip2_cuda_ck(c, e, "cudaFree", __FILE__, __LINE__);
}

/* Host → device, ordered on the stream; src may be reused on return. Small copies from pageable
 * memory go straight to cudaMemcpyAsync (the driver stages them before returning); large ones, and
 * any from pinned memory (which cudaMemcpyAsync would read later), go through two pinned chunks so
 * the host copy into one overlaps the DMA out of the other. */
void mem_upload(void *dst, const void *src, size_t bytes) {
    blip2_cuda_ctx *c = cur("upload");
    if (!c || bytes == 0) return;
    if (bytes <= BLIP2_STAGE_BYTES) {
        cudaPointerAttributes a;
        int pageable = 0;
        if (cudaPointerGetAttributes(&a, src) == cudaSuccess) pageable = a.type == cudaMemoryTypeUnregistered;
        else cudaGetLastError();
        if (pageable) {
            CUDA_CK(c, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, c->stream));
            return;
        }
    }
    if (!c->stage[0]) {
        for (int i = 0; i < 2; i++)
            if (cudaMallocHost(&c->stage[i], BLIP2_STAGE_BYTES) != cudaSuccess) {
                cudaGetLastError();
                c->stage[i] = NULL;
            }
        if (!c->stage[0] || !c->stage[1]) { /* no pinned memory: a copy that completes before returning */
            for (int i = 0; i < 2; i++)
                if (c->stage[i]) cudaFreeHost(c->stage[i]);
            c->stage[0] = c->stage[1] = NULL;
            if (CUDA_CK(c, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, c->stream)))
                CUDA_CK(c, cudaStreamSynchronize(c->stream));
            return;
        }
    }
    for (size_t off = 0; off < bytes; off += BLIP2_STAGE_BYTES) {
        size_t len = bytes - off < BLIP2_STAGE_BYTES ? bytes - off : BLIP2_STAGE_BYTES;
        int k = c->stage_next;
        c->stage_next ^= 1;
        if (!CUDA_CK(c, cudaEventSynchronize(c->stage_ev[k]))) return; /* the chunk's previous copy is done */
        memcpy(c->stage[k], (const char *)src + off, len);
        if (!CUDA_CK(c, cudaMemcpyAsync((char *)dst + off, c->stage[k], len, cudaMemcpyHostToDevice, c->stream))) return;
        if (!CUDA_CK(c, cudaEventRecord(c->stage_ev[k], c->stream))) return;
    }
}

void mem_download(void *dst, const void *src, size_t bytes) {
    blip2_cuda_ctx *c = cur("download");
    if (!c || bytes == 0) return;
    if (CUDA_CK(c, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, c->stream)))
        CUDA_CK(c, cudaStreamSynchronize(c->stream));
}

void mem_copy(void *dst, const void *src, size_t bytes) {
    blip2_cuda_ctx *c = cur("copy");
    if (!c || bytes == 0) return;
    CUDA_CK(c, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, c->stream));
}

void mem_copy_rows(void *dst, const void *src, size_t width, size_t height, size_t pitch) {
    blip2_cuda_ctx *c = cur("copy_rows");
    if (!c || width == 0 || height == 0) return;
    CUDA_CK(c, cudaMemcpy2DAsync(dst, pitch, src, pitch, width, height, cudaMemcpyDeviceToDevice, c->stream));
}

void mem_zero(void *p, size_t bytes) {
    blip2_cuda_ctx *c = cur("zero");
    if (!c || bytes == 0) return;
    CUDA_CK(c, cudaMemsetAsync(p, 0, bytes, c->stream));
}

int be_sync(char *err, size_t n) {
    blip2_cuda_ctx *c = blip2_cuda_ctx_current();
    if (!c) {
        if (err && n) snprintf(err, n, "no current CUDA context on this thread");
        return 1;
    }
    CUDA_CK(c, cudaStreamSynchronize(c->stream));
    if (!c->has_err) return 0;
    if (err && n) snprintf(err, n, "%s", c->err);
    c->has_err = 0;
    c->err[0] = 0;
    cudaGetLastError(); /* clear a non-sticky error so the next op starts clean */
    return 1;
}

} /* namespace */

namespace {
/* Filled member by member (C++17 has no designated initialisers); a constant expression, so the
 * table is constant-initialised, before any code runs. */
constexpr blip2_ops make_cuda_ops() {
    blip2_ops t{};
    t.name = "cuda";
    t.device = 1;
    t.alloc = mem_alloc;
    t.release = mem_release;
    t.upload = mem_upload;
    t.download = mem_download;
    t.copy = mem_copy;
    t.copy_rows = mem_copy_rows;
    t.zero = mem_zero;
    t.sync = be_sync;
    t.capture_begin = blip2_cuda_capture_begin;
    t.capture_end = blip2_cuda_capture_end;
    t.graph_launch = blip2_cuda_graph_launch;
    t.graph_free = blip2_cuda_graph_free;
    t.batch_invariant = be_batch_invariant;
    t.matmul = cuda::blip2_matmul;
    t.matmul_h = cuda::blip2_matmul_h;
    t.layernorm = cuda::blip2_layernorm;
    t.residual_layernorm = cuda::blip2_residual_layernorm;
    t.layernorm_a = cuda::blip2_layernorm_a;
    t.activate_a = cuda::blip2_activate_a;
    t.matmul_a = cuda::blip2_matmul_a;
    t.matmul_acc_a = cuda::blip2_matmul_acc_a;
    t.matmul_ln_a = cuda::blip2_matmul_ln_a;
    t.residual_add = cuda::blip2_residual_add;
    t.gelu = cuda::blip2_gelu;
    t.relu = cuda::blip2_relu;
    t.attention = cuda::blip2_attention;
    t.attention_paged = cuda::blip2_attention_paged;
    t.kv_write = cuda::blip2_kv_write;
    t.softmax = cuda::blip2_softmax;
    t.im2col_patches = cuda::blip2_im2col_patches;
    t.embedding = cuda::blip2_embedding;
    t.embedding_vp = cuda::blip2_embedding_vp;
    t.add_rows = cuda::blip2_add_rows;
    t.add_rows_at = cuda::blip2_add_rows_at;
    t.gather_rows = cuda::blip2_gather_rows;
    t.argmax_rows = cuda::blip2_argmax_rows;
    t.topk_rows = cuda::blip2_topk_rows;
    t.penalize_rows = cuda::blip2_penalize_rows;
    t.logsumexp_rows = cuda::blip2_logsumexp_rows;
    t.shift_rows = cuda::blip2_shift_rows;
    t.fill_normal = cuda::blip2_fill_normal;
    return t;
}
} /* namespace */

extern "C" const blip2_ops blip2_cuda_ops = make_cuda_ops();
