/* The CUDA twins of kernels/cpu/ops.c (namespace cuda::, same names and argument order as ops.h)
 * and the blip2_cuda_ops table. The table is what keeps the twins' signatures equal to the C
 * reference's: each cuda:: function is assigned to the blip2_ops member of its name, whose type
 * ops.h declares once, so a differing parameter list does not compile. Every op is queued on the
 * calling thread's current context's stream (context.h) and records failures in that context
 * instead of aborting; nothing here synchronises except download, sync, blip2_argmax and the rare
 * growth of a scratch buffer.
 *
 * Numerics: fp32 matmuls use cuBLASLt with CUBLAS_COMPUTE_32F (no TF32; a 16-bit model's encoder
 * attention runs in its weights' type on the tensor cores, attention_mma.cu); 16-bit-weight
 * matmuls round the fp32 activations to the weight's type (RNE) and accumulate in fp32, on the
 * tensor cores or, at T <= gemv_max_t(), in a GEMV kernel
 * that rounds the activations the same way (so a row's products do not depend on its batch's
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

#include "internal.cuh"

namespace {

constexpr int NT = 256;      /* threads per block for every kernel here */
constexpr int NWARPS = NT / 32;
constexpr int PAGED_MAX_HS = 128;
/* k_attention_paged's static shared memory (q, per-warp partial sums, reduction scratch): well under
 * the 8 KiB the opt-in threshold below leaves it. */
static_assert(PAGED_MAX_HS * 4 * (1 + NWARPS) + 32 * 4 + 32 * 8 < 8 * 1024, "paged attention static smem");

blip2_cuda_ctx *cur(const char *op) {
    blip2_cuda_ctx *c = blip2_cuda_ctx_current();
    if (!c) blip2_cuda_record(NULL, "%s: no current CUDA context on this thread", op);
    return c;
}

/* Blocks for a grid-stride loop over n elements. */
unsigned grid_for(size_t n) {
    size_t b = (n + NT - 1) / NT;
    if (b < 1) b = 1;
    if (b > 8192) b = 8192;
    return (unsigned)b;
}

#define GRID_STRIDE(i, n) \
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (size_t)gridDim.x * blockDim.x)

/* ------------------------------------------------------------------------------------------------
 * Block reductions. Every thread of the block must call them (no early exit), blockDim.x a multiple
 * of 32. The result is returned to every thread. sh holds 32 values; it may be reused by the next
 * call (the leading barrier keeps a fast warp from overwriting it while others still read). */
template <typename T> __device__ T warp_sum(T v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
template <typename T> __device__ T block_sum(T v, T *sh) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    T r = 0;
    for (int i = 0; i < nw; i++) r += sh[i];
    return r;
}
__device__ float block_max(float v, float *sh) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    float r = -INFINITY;
    for (int i = 0; i < nw; i++) r = fmaxf(r, sh[i]);
    return r;
}

/* ------------------------------------------------------------------------------------------------
 * Elementwise kernels. */
__global__ void __launch_bounds__(NT) k_residual_add(float *x, const float *y, size_t n) {
    pdl_entry();
    GRID_STRIDE(i, n) x[i] += y[i];
}
__device__ __forceinline__ float gelu_erf(float v) { return 0.5f * v * (1.0f + erff(v * 0.70710678118654752440f)); }
/* Element i of out of adtype (BLIP2_W_*) = v, rounded to nearest even when 16-bit: the _a ops
 * hand their output to a matmul in the type its tensor cores read. adtype is uniform per launch. */
__device__ __forceinline__ void store_act(void *out, int adtype, size_t i, float v) {
    if (adtype == BLIP2_W_F32) ((float *)out)[i] = v;
    else if (adtype == BLIP2_W_F16) ((__half *)out)[i] = __float2half_rn(v);
    else ((__nv_bfloat16 *)out)[i] = __float2bfloat16_rn(v);
}

__device__ __forceinline__ float act_of(float v, int act) {
    return act == BLIP2_ACT_GELU ? gelu_erf(v) : act == BLIP2_ACT_RELU ? (v > 0.0f ? v : 0.0f) : v;
}
/* Element i of x of xdtype (BLIP2_W_*), widened exactly; xdtype is uniform per launch. */
__device__ __forceinline__ float load_act(const void *x, int xdtype, size_t i) {
    if (xdtype == BLIP2_W_F32) return ((const float *)x)[i];
    const unsigned short u = ((const unsigned short *)x)[i];
    return xdtype == BLIP2_W_F16 ? __half2float(__ushort_as_half(u)) : __uint_as_float((unsigned)u << 16);
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
    s = block_sum(s, red);
    float mean = (float)(s / C);
    double var = 0;
    for (int i = threadIdx.x; i < C; i += blockDim.x) {
        float d = x[i] - mean;
        var += (double)d * d;
    }
    var = block_sum(var, red); /* its barriers also order every read of x before any write of y */
    float rstd = (float)(1.0 / sqrt(var / C + (double)eps));
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
    s = block_sum(s, red);
    float mean = (float)(s / C);
    double var = 0;
    for (int i = threadIdx.x; i < C; i += blockDim.x) {
        float d = r[i] - mean;
        var += (double)d * d;
    }
    var = block_sum(var, red);
    float rstd = (float)(1.0 / sqrt(var / C + (double)eps));
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

/* ------------------------------------------------------------------------------------------------
 * GEMV: 16-bit-weight matmuls at small T (decode, one row per sequence of a small batch).
 * out[t, o] = act(Σ_c inp[t, c]·W[o, c] + bias[o]) for t < T <= GEMV_MAX_T. The cost is streaming
 * W once, so W is read at 16 bytes a lane with an evict-first hint, and the fp32 inputs are read
 * through the read-only path / L1, where they stay: every block reads all T·C of them, which is
 * small. Each input is rounded to the weights' type as it is loaded, as the tensor-core path rounds
 * it: a request then gets the same products decoded alone (here) as in a large batch (cuBLASLt),
 * up to the order of the fp32 sums, and its seeded samples do not depend on who else is in the
 * batch. fp32 accumulation (FMA); bias and activation are applied in the same kernel, so it is
 * one launch.
 *
 * Work split: block b computes rows o0 = b·R .. o0 + R − 1, R = gemv_rows(T) (1, 2 or 4: each
 * input value loaded serves R rows, which keeps the input reads within 4× the weight bytes even
 * at T = 8), and all its threads split C between them (block-level split-K: few enough rows per
 * block that OC = 2560 still gives hundreds of blocks). Each thread keeps T·R partial sums in
 * registers; a warp-shuffle then a shared-memory reduction over the warps in a fixed order
 * (deterministic for a given shape) ends in T·R threads adding the bias, applying act and writing.
 * The rows of the last block past OC load row OC − 1 instead (valid memory, no divergence) and
 * are not written.
 *
 * k_gemv_v8 (C % 8 == 0 and W 16-byte aligned, so every row is): thread i takes the 8-column
 * chunks i, i + bs, i + 2·bs, ...; U = GEMV_LOADS / R chunks per iteration, whose U·R 16-byte
 * weight loads are all issued before any arithmetic (64 bytes in flight per thread). The inputs
 * are read as float4 when inp is 16-byte aligned (VIN), else one float at a time. k_gemv_s takes
 * anything else (any C, any alignment) one column per thread and iteration. */
constexpr int GEMV_MAX_T = 8;         /* the kernels' ceiling; matmul_h uses them up to gemv_max_t() rows */
constexpr int GEMV_MAX_THREADS = 256; /* block size ceiling (multiples of 32 below it are chosen per C) */
constexpr int GEMV_LOADS = 4;         /* 16-byte weight loads in flight per thread and iteration */
__host__ __device__ constexpr int gemv_rows(int T) { return T <= 2 ? 1 : T <= 4 ? 2 : 4; }
/* Blocks of GEMV_MAX_THREADS per SM the register allocation must allow (at most 64 registers at
 * T <= 4, 128 above): without it ptxas picks 80 registers and spills at T = 5. */
__host__ __device__ constexpr int gemv_min_blocks(int T) { return T <= 4 ? 4 : 2; }
static_assert(GEMV_MAX_T * gemv_rows(GEMV_MAX_T) <= 32, "the epilogue uses one thread per (t, row) of the first warp");

template <typename WT> __device__ __forceinline__ float widen1(unsigned short u);
template <> __device__ __forceinline__ float widen1<__half>(unsigned short u) { return __half2float(__ushort_as_half(u)); }
template <> __device__ __forceinline__ float widen1<__nv_bfloat16>(unsigned short u) {
    return __uint_as_float((unsigned)u << 16);
}
template <typename WT> __device__ __forceinline__ void widen8(const uint4 &q, float (&f)[8]) {
    widen2<WT>(q.x, f[0], f[1]);
    widen2<WT>(q.y, f[2], f[3]);
    widen2<WT>(q.z, f[4], f[5]);
    widen2<WT>(q.w, f[6], f[7]);
}

/* An activation rounded to the weights' type (RNE) and widened back: what the tensor-core path multiplies. */
template <typename WT> __device__ __forceinline__ float round_act(float x);
template <> __device__ __forceinline__ float round_act<__half>(float x) { return __half2float(__float2half_rn(x)); }
template <> __device__ __forceinline__ float round_act<__nv_bfloat16>(float x) {
    return __bfloat162float(__float2bfloat16_rn(x));
}

/* Eight consecutive fp32 values from p (16-byte aligned), through the read-only path. */
__device__ __forceinline__ void ldg8(float (&f)[8], const float *p) {
    const float4 a = __ldg(reinterpret_cast<const float4 *>(p)), b = __ldg(reinterpret_cast<const float4 *>(p) + 1);
    f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w, f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
}

/* Eight consecutive inputs, rounded as round_act; p is 16-byte aligned when VIN. 16-bit inputs
 * (IT = WT, always VIN) are already rounded: one 16-byte load, widened exactly. */
template <typename WT, typename IT, bool VIN> __device__ __forceinline__ void load_x8(float (&x)[8], const IT *p) {
    if constexpr (!std::is_same<IT, float>::value) {
        static_assert(std::is_same<IT, WT>::value && VIN, "16-bit inputs are of the weights' type, 16-byte aligned");
        widen8<WT>(__ldg(reinterpret_cast<const uint4 *>(p)), x);
    } else {
        if constexpr (VIN) {
            ldg8(x, p);
        } else {
#pragma unroll
            for (int j = 0; j < 8; j++) x[j] = __ldg(p + j);
        }
#pragma unroll
        for (int j = 0; j < 8; j++) x[j] = round_act<WT>(x[j]);
    }
}

/* The GEMV's odtype for out += product + bias (matmul_acc_a): fp32 out and bias, no activation. */
constexpr int GEMV_OUT_ADD = 0x100;

/* Output (t, o) of a GEMV from its product s: bias, act, the store in odtype. */
__device__ __forceinline__ void gemv_store(void *__restrict__ out, int odtype, const void *__restrict__ bias, int t, int o,
                                           int OC, float s, int act) {
    if (odtype == GEMV_OUT_ADD) { /* the residual stream: x + (product + bias), as the reference */
        float *p = (float *)out + (size_t)t * OC + o;
        *p = *p + (bias ? s + ((const float *)bias)[o] : s);
    } else {
        if (bias) s += load_act(bias, odtype, o); /* fp32, or 16-bit with a 16-bit out */
        store_act(out, odtype, (size_t)t * OC + o, act_of(s, act));
    }
}

/* The block's reduction and epilogue. Every thread calls it (it has a barrier); red holds
 * (blockDim.x / 32)·T·R floats. */
template <int T, int R>
__device__ __forceinline__ void gemv_finish(float (&acc)[T][R], float *red, void *__restrict__ out, int odtype,
                                            const void *__restrict__ bias, int o0, int OC, int act) {
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
    for (int t = 0; t < T; t++)
#pragma unroll
        for (int r = 0; r < R; r++) {
            const float v = warp_sum(acc[t][r]);
            if (lane == 0) red[wid * (T * R) + t * R + r] = v;
        }
    __syncthreads();
    const int i = threadIdx.x;
    if (i < T * R) {
        const int t = i / R, o = o0 + i % R;
        if (o < OC) {
            float s = 0.0f;
            for (int k = 0; k < nw; k++) s += red[k * (T * R) + i];
            gemv_store(out, odtype, bias, t, o, OC, s, act);
        }
    }
}

/* Before the PDL wait (internal.cuh): the block's R weight rows into L2, while the kernel before
 * finishes. Weights never change during a step, so this is the one thing a GEMV may touch early. */
__device__ __forceinline__ void gemv_prefetch(const uint16_t *w, int o0, int R, int OC, int C) {
    const int lines = (int)(((long long)C * 2 + 127) / 128);
    for (int i = (int)threadIdx.x; i < R * lines; i += (int)blockDim.x) {
        const int r = min(o0 + i / lines, OC - 1);
        prefetch_l2(reinterpret_cast<const char *>(w + (size_t)r * C) + (size_t)(i % lines) * 128);
    }
}

template <int T, typename WT, typename IT, bool VIN>
__global__ void __launch_bounds__(GEMV_MAX_THREADS, gemv_min_blocks(T))
    k_gemv_v8(void *__restrict__ out, int odtype, const IT *__restrict__ inp, const uint16_t *__restrict__ w,
              const void *__restrict__ bias, int C, int OC, int act) {
    pdl_trigger();
    gemv_prefetch(w, (int)blockIdx.x * gemv_rows(T), gemv_rows(T), OC, C);
    pdl_wait();
    constexpr int R = gemv_rows(T), U = GEMV_LOADS / R;
    __shared__ float red[GEMV_MAX_THREADS / 32 * T * R];
    const int o0 = (int)blockIdx.x * R, nk = C >> 3, bs = (int)blockDim.x;
    const uint4 *wr[R];
#pragma unroll
    for (int r = 0; r < R; r++) wr[r] = reinterpret_cast<const uint4 *>(w + (size_t)min(o0 + r, OC - 1) * C);
    float acc[T][R];
#pragma unroll
    for (int t = 0; t < T; t++)
#pragma unroll
        for (int r = 0; r < R; r++) acc[t][r] = 0.0f;
    for (int k0 = (int)threadIdx.x; k0 < nk; k0 += U * bs) {
        uint4 q[U][R];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int k = k0 + u * bs;
#pragma unroll
            for (int r = 0; r < R; r++) q[u][r] = k < nk ? __ldcs(wr[r] + k) : make_uint4(0u, 0u, 0u, 0u);
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int k = k0 + u * bs;
            if (k < nk) {
                float wf[R][8];
#pragma unroll
                for (int r = 0; r < R; r++) widen8<WT>(q[u][r], wf[r]);
#pragma unroll
                for (int t = 0; t < T; t++) {
                    float x[8];
                    load_x8<WT, IT, VIN>(x, inp + (size_t)t * C + (size_t)k * 8);
#pragma unroll
                    for (int r = 0; r < R; r++)
#pragma unroll
                        for (int j = 0; j < 8; j++) acc[t][r] = fmaf(x[j], wf[r][j], acc[t][r]);
                }
            }
        }
    }
    gemv_finish<T, R>(acc, red, out, odtype, bias, o0, OC, act);
}

template <int T, typename WT>
__global__ void __launch_bounds__(GEMV_MAX_THREADS, gemv_min_blocks(T))
    k_gemv_s(void *__restrict__ out, int odtype, const float *__restrict__ inp, const uint16_t *__restrict__ w,
             const void *__restrict__ bias, int C, int OC, int act) {
    pdl_trigger();
    gemv_prefetch(w, (int)blockIdx.x * gemv_rows(T), gemv_rows(T), OC, C);
    pdl_wait();
    constexpr int R = gemv_rows(T);
    __shared__ float red[GEMV_MAX_THREADS / 32 * T * R];
    const int o0 = (int)blockIdx.x * R, bs = (int)blockDim.x;
    const unsigned short *wr[R];
#pragma unroll
    for (int r = 0; r < R; r++) wr[r] = w + (size_t)min(o0 + r, OC - 1) * C;
    float acc[T][R];
#pragma unroll
    for (int t = 0; t < T; t++)
#pragma unroll
        for (int r = 0; r < R; r++) acc[t][r] = 0.0f;
#pragma unroll 4
    for (int c = (int)threadIdx.x; c < C; c += bs) {
        float wf[R];
#pragma unroll
        for (int r = 0; r < R; r++) wf[r] = widen1<WT>(__ldcs(wr[r] + c));
#pragma unroll
        for (int t = 0; t < T; t++) {
            const float x = round_act<WT>(__ldg(inp + (size_t)t * C + c));
#pragma unroll
            for (int r = 0; r < R; r++) acc[t][r] = fmaf(x, wf[r], acc[t][r]);
        }
    }
    gemv_finish<T, R>(acc, red, out, odtype, bias, o0, OC, act);
}

/* Columns 8k .. 8k + 7 of LN(x) from their raw values v: (v − mean)·rstd·w + b, each rounded to WT
 * as layernorm_a stores it (lw, lb 16-byte aligned). */
template <typename WT>
__device__ __forceinline__ void ln_round8(float (&xn)[8], const float (&v)[8], const float *__restrict__ lw,
                                          const float *__restrict__ lb, int k, float mean, float rstd) {
    float gw[8], gb[8];
    ldg8(gw, lw + (size_t)k * 8);
    ldg8(gb, lb + (size_t)k * 8);
#pragma unroll
    for (int j = 0; j < 8; j++) xn[j] = round_act<WT>((v[j] - mean) * rstd * gw[j] + gb[j]);
}

/* k_gemv_ln: the one-row GEMV of LN(x) (matmul_ln_a at T = 1, a decode step's qkv and fc1): the
 * norm that would be its own launch (a 2560-float row: ~5.6 µs under ncu on an H100, twice a
 * layer) is done by every block on the row it reads anyway. Each thread holds its 8-column chunks
 * k = i, i + bs (U = GEMV_LN_CHUNKS, one pass: C <= 8·U·GEMV_MAX_THREADS) of the row and of R
 * weight rows in registers; the weights are loaded before the PDL wait (immutable), so they
 * stream while the kernel before finishes and while the block sums the row. The mean and
 * variance are the LN kernels' (double sums, two passes, the same formulas; only the order of
 * the double sums differs), each normalised value is rounded to the weights' type as layernorm_a
 * stores it, so the products are those of the unfused pair. R rows a block share the row's
 * loads and sums (R = BLIP2_GEMV_LN_ROWS: 1, 2 or 4, default 4). x, ln_w and ln_b are read as
 * float4 (16-byte aligned, C % 8 == 0: gemv_ln_ok). */
constexpr int GEMV_LN_CHUNKS = 2;
template <typename WT, int R>
__global__ void __launch_bounds__(GEMV_MAX_THREADS)
    k_gemv_ln(void *__restrict__ out, int odtype, const float *__restrict__ x, const float *__restrict__ lw,
              const float *__restrict__ lb, float eps, const uint16_t *__restrict__ w, const void *__restrict__ bias,
              int C, int OC, int act) {
    constexpr int U = GEMV_LN_CHUNKS;
    pdl_trigger();
    const int o0 = (int)blockIdx.x * R, nk = C >> 3, bs = (int)blockDim.x, tid = (int)threadIdx.x;
    uint4 q[U][R];
#pragma unroll
    for (int u = 0; u < U; u++) {
        const int k = tid + u * bs;
#pragma unroll
        for (int r = 0; r < R; r++)
            q[u][r] = k < nk ? __ldcs(reinterpret_cast<const uint4 *>(w + (size_t)min(o0 + r, OC - 1) * C) + k)
                             : make_uint4(0u, 0u, 0u, 0u);
    }
    pdl_wait();
    __shared__ double red_d[32];
    __shared__ float red[GEMV_MAX_THREADS / 32 * R];
    float v[U][8];
    double s = 0;
#pragma unroll
    for (int u = 0; u < U; u++) {
        const int k = tid + u * bs;
        if (k < nk) {
            ldg8(v[u], x + (size_t)k * 8);
#pragma unroll
            for (int j = 0; j < 8; j++) s += v[u][j];
        } else {
#pragma unroll
            for (int j = 0; j < 8; j++) v[u][j] = 0.0f;
        }
    }
    s = block_sum(s, red_d);
    const float mean = (float)(s / C);
    double var = 0;
#pragma unroll
    for (int u = 0; u < U; u++)
        if (tid + u * bs < nk)
#pragma unroll
            for (int j = 0; j < 8; j++) {
                const float d = v[u][j] - mean;
                var += (double)d * d;
            }
    var = block_sum(var, red_d);
    const float rstd = (float)(1.0 / sqrt(var / C + (double)eps));
    float acc[1][R];
#pragma unroll
    for (int r = 0; r < R; r++) acc[0][r] = 0.0f;
#pragma unroll
    for (int u = 0; u < U; u++) {
        const int k = tid + u * bs;
        if (k < nk) {
            float xn[8];
            ln_round8<WT>(xn, v[u], lw, lb, k, mean, rstd);
#pragma unroll
            for (int r = 0; r < R; r++) {
                float wf[8];
                widen8<WT>(q[u][r], wf);
#pragma unroll
                for (int j = 0; j < 8; j++) acc[0][r] = fmaf(xn[j], wf[j], acc[0][r]);
            }
        }
    }
    gemv_finish<1, R>(acc, red, out, odtype, bias, o0, OC, act);
}

/* k_gemv_w: the one-row GEMV as warps over weight rows (BLIP2_GEMV_WARP=1; not yet timed on a GPU).
 * The block-per-row kernels above launch OC / R blocks (2560 to 10240 a decode matmul), each
 * ending in a block barrier, and read the input row again in every block; run 8's ncu had the
 * GEMVs at 1.2 (out_proj) to 2.2 (fc1) TB/s. Here a block first stages the input row once in
 * shared memory, in the weights' type (rounded as round_act, or with LN: normalised by the
 * k_gemv_ln formulas, then rounded), with one barrier; then each of the grid's W warps takes a
 * run of OC / W consecutive rows (rounded down or up: every SM gets as many; gemv_w_blocks). A
 * warp reads a row in 16-byte chunks, lane l the chunks l, l + 32, ..., GW_LOADS of them issued
 * before any arithmetic (a 2560-column row in one round), sums by shuffles, and its lane 0 stores
 * (gemv_store). No barrier after the staging; the weights stream with an evict-first hint. */
constexpr int GW_WARPS = 8, GW_THREADS = 32 * GW_WARPS, GW_LOADS = 10;
/* Blocks an SM: the first round's 40 registers are held across the staging and its LayerNorm (at
 * three blocks an SM that instance spilled); 16 warps an SM keep 80 KB of loads in flight. */
constexpr int GW_BLOCKS_PER_SM = 2;
constexpr int GW_MAX_C = 16384; /* the staged row: 2·C bytes of shared memory */

/* The input row into xs as C / 8 chunks of WT: x of IT (fp32, 16-byte aligned; or WT, copied), or
 * with LN (fp32 x) LN(x) rounded as k_gemv_ln rounds it. Ends with the block's barrier. */
template <typename WT, typename IT, bool LN>
__device__ __forceinline__ void gemv_w_stage(uint4 *xs, const IT *__restrict__ x, const float *__restrict__ lw,
                                             const float *__restrict__ lb, float eps, int C) {
    const int nk = C >> 3, tid = (int)threadIdx.x;
    if constexpr (!std::is_same<IT, float>::value) {
        for (int k = tid; k < nk; k += GW_THREADS) xs[k] = __ldg(reinterpret_cast<const uint4 *>(x) + k);
    } else {
        float mean = 0.0f, rstd = 1.0f;
        if constexpr (LN) {
            __shared__ double red_d[32];
            double s = 0;
            for (int i = tid; i < C; i += GW_THREADS) s += __ldg(x + i);
            s = block_sum(s, red_d);
            mean = (float)(s / C);
            double var = 0;
            for (int i = tid; i < C; i += GW_THREADS) {
                const float d = __ldg(x + i) - mean;
                var += (double)d * d;
            }
            var = block_sum(var, red_d);
            rstd = (float)(1.0 / sqrt(var / C + (double)eps));
        }
        for (int k = tid; k < nk; k += GW_THREADS) {
            float v[8];
            if constexpr (LN) {
                float raw[8];
                ldg8(raw, x + (size_t)k * 8);
                ln_round8<WT>(v, raw, lw, lb, k, mean, rstd);
            } else {
                load_x8<WT, float, true>(v, x + (size_t)k * 8); /* rounded as round_act */
            }
            xs[k] = make_uint4(pack2<WT>(v[0], v[1]), pack2<WT>(v[2], v[3]), pack2<WT>(v[4], v[5]), pack2<WT>(v[6], v[7]));
        }
    }
    __syncthreads();
}

/* One round of a warp's loads: chunks k0, k0 + 32, ... (GW_LOADS of them) of weight row o, zeros
 * past the row or past OC; evict-first (the weights are read once a step). */
__device__ __forceinline__ void gemv_w_round(uint4 (&q)[GW_LOADS], const uint16_t *__restrict__ w, int o, int OC, int C,
                                             int k0) {
    const uint4 *wr = reinterpret_cast<const uint4 *>(w + (size_t)min(o, OC - 1) * C);
#pragma unroll
    for (int u = 0; u < GW_LOADS; u++) {
        const int k = k0 + 32 * u;
        q[u] = o < OC && k < C >> 3 ? __ldcs(wr + k) : make_uint4(0u, 0u, 0u, 0u);
    }
}

template <typename WT, typename IT, bool LN>
__global__ void __launch_bounds__(GW_THREADS, GW_BLOCKS_PER_SM)
    k_gemv_w(void *__restrict__ out, int odtype, const IT *__restrict__ x, const float *__restrict__ lw,
             const float *__restrict__ lb, float eps, const uint16_t *__restrict__ w, const void *__restrict__ bias,
             int C, int OC, int act) {
    extern __shared__ uint4 xs[]; /* [C / 8] chunks of the row in WT */
    const int lane = (int)threadIdx.x & 31, nk = C >> 3;
    const long long g = (long long)blockIdx.x * GW_WARPS + ((int)threadIdx.x >> 5), W = (long long)gridDim.x * GW_WARPS;
    const int first = (int)(g * OC / W), end = (int)((g + 1) * OC / W); /* the warp's rows [first, end) */
    uint4 q[GW_LOADS];
    pdl_trigger();
    /* Before the wait (weights are immutable): the first round of the warp's first row into
     * registers, the rest of that row into L2, so the staging's latency (the LayerNorm's sums
     * too) overlaps the weights' first bytes. */
    gemv_w_round(q, w, first < end ? first : OC, OC, C, lane);
    if (first < end)
        for (int i = lane + 32 * GW_LOADS * 16 / 128; i < (C * 2 + 127) / 128; i += 32)
            prefetch_l2(reinterpret_cast<const char *>(w + (size_t)first * C) + (size_t)i * 128);
    pdl_wait();
    gemv_w_stage<WT, IT, LN>(xs, x, lw, lb, eps, C);
    for (int o = first; o < end; o++) {
        float acc = 0.0f;
        for (int k0 = lane; k0 < nk; k0 += 32 * GW_LOADS) {
            if (o != first || k0 != lane) gemv_w_round(q, w, o, OC, C, k0);
#pragma unroll
            for (int u = 0; u < GW_LOADS; u++) {
                const int k = k0 + 32 * u;
                if (k < nk) {
                    float wf[8], xf[8];
                    widen8<WT>(q[u], wf);
                    widen8<WT>(xs[k], xf);
#pragma unroll
                    for (int j = 0; j < 8; j++) acc = fmaf(xf[j], wf[j], acc);
                }
            }
        }
        acc = warp_sum(acc);
        if (lane == 0) gemv_store(out, odtype, bias, 0, o, OC, acc, act);
    }
}

/* Whether one-row GEMVs take k_gemv_w (BLIP2_GEMV_WARP=1), for C % 8 == 0 up to GW_MAX_C and 16-byte
 * aligned rows (the caller checks the pointers). Read once per process. */
bool gemv_warp_ok(int C) {
    static const bool on = env_switch("BLIP2_GEMV_WARP", false);
    return on && C > 0 && C % 8 == 0 && C <= GW_MAX_C;
}

/* Blocks of k_gemv_w for OC rows: as many as are resident at once (GW_BLOCKS_PER_SM an SM, a
 * multiple of the SMs, so that each SM's warps take as many rows), fewer only when OC leaves warps
 * without a row. */
unsigned gemv_w_blocks(blip2_cuda_ctx *c, int OC) {
    static int sms = 0;
    if (!sms && cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c->device) != cudaSuccess) sms = 132;
    const long long need = ((long long)OC + GW_WARPS - 1) / GW_WARPS, most = (long long)sms * GW_BLOCKS_PER_SM;
    return (unsigned)(need < most ? need : most);
}

template <typename WT, typename IT, bool LN>
void gemv_w_launch(blip2_cuda_ctx *c, void *out, int odtype, const IT *x, const float *lw, const float *lb, float eps,
                   const uint16_t *w, const void *bias, int C, int OC, int act) {
    launch(k_gemv_w<WT, IT, LN>, gemv_w_blocks(c, OC), GW_THREADS, (size_t)C * 2, c->stream, out, odtype, x, lw, lb, eps,
           w, bias, C, OC, act);
    LAUNCH_CK(c, "k_gemv_w");
}

/* Threads per block: of the multiples of 32 up to GEMV_MAX_THREADS, the smallest that covers n
 * work items (per per thread and iteration) in the fewest iterations. */
unsigned gemv_threads(long long n, int per) {
    int best = 32;
    long long best_it = (n + 32LL * per - 1) / (32LL * per);
    for (int bs = 64; bs <= GEMV_MAX_THREADS; bs += 32) {
        long long it = (n + (long long)bs * per - 1) / ((long long)bs * per);
        if (it < best_it) best_it = it, best = bs;
    }
    return (unsigned)best;
}

/* The most rows the GEMV takes: GEMV_DEFAULT_T, or BLIP2_GEMV_MAX_T=n (0..GEMV_MAX_T) for comparing
 * it with cuBLASLt row count by row count. BLIP2_GEMV=0 (0 rows) sends every 16-bit matmul to
 * cuBLASLt; so does the batch-invariant mode. Read once per process.
 * Why 1: at T >= 2 each block reads all T input rows for its weight rows, several times the
 * weights' bytes through L2. Decode ms a step on an H100 (run 6, same run, 32 steps), GEMV up to
 * 8 rows vs cuBLASLt for all: 3.07 / 3.21 at batch 1, 3.36 / 3.29 at 2, 3.62 / 3.33 at 4, 3.89 /
 * 3.33 at 6, 4.41 / 3.33 at 8. */
constexpr int GEMV_DEFAULT_T = 1;
int gemv_max_t() {
    static const int most = [] {
        if (!env_switch("BLIP2_GEMV", true) || batch_invariant_mode()) return 0;
        const long long n = env_int("BLIP2_GEMV_MAX_T", GEMV_DEFAULT_T);
        return n < 0 ? 0 : n > GEMV_MAX_T ? GEMV_MAX_T : (int)n;
    }();
    return most;
}

/* Whether matmul_h takes the GEMV path. The bound on C keeps the kernels' int loop indices (which
 * run past C by less than 8·GEMV_LOADS·GEMV_MAX_THREADS) from overflowing. */
bool gemv_use(int T, int C, int wdtype) {
    return (wdtype == BLIP2_W_F16 || wdtype == BLIP2_W_BF16) && T >= 1 && T <= gemv_max_t() && C >= 0 &&
           C <= INT_MAX - 8 * GEMV_LOADS * GEMV_MAX_THREADS;
}

/* Whether 16-bit inputs can take the GEMV (its 16-byte path only; elsewhere cuBLASLt). */
bool gemv16_ok(int T, int C, int wdtype, const void *inp, const void *w) {
    return gemv_use(T, C, wdtype) && C % 8 == 0 && (((uintptr_t)inp | (uintptr_t)w) & 15) == 0;
}

/* inp is fp32, or of the weights' type when in16 (then gemv16_ok holds). */
template <int T, typename WT>
void gemv_launch(blip2_cuda_ctx *c, void *out, int odtype, const void *inp, bool in16, const uint16_t *w,
                 const void *bias, int C, int OC, int act) {
    constexpr int R = gemv_rows(T);
    const unsigned grid = (unsigned)(((long long)OC + R - 1) / R);
    const float *in32 = (const float *)inp;
    if constexpr (T == 1)
        if (gemv_warp_ok(C) && (((uintptr_t)w | (uintptr_t)inp) & 15) == 0) {
            if (in16) gemv_w_launch<WT, WT, false>(c, out, odtype, (const WT *)inp, NULL, NULL, 0.0f, w, bias, C, OC, act);
            else gemv_w_launch<WT, float, false>(c, out, odtype, in32, NULL, NULL, 0.0f, w, bias, C, OC, act);
            return;
        }
    if (C % 8 == 0 && ((uintptr_t)w & 15) == 0) {
        const unsigned bs = gemv_threads(C / 8, GEMV_LOADS / R);
        if (in16)
            launch(k_gemv_v8<T, WT, WT, true>, grid, bs, 0, c->stream, out, odtype, (const WT *)inp, w, bias, C, OC, act);
        else if (((uintptr_t)inp & 15) == 0)
            launch(k_gemv_v8<T, WT, float, true>, grid, bs, 0, c->stream, out, odtype, in32, w, bias, C, OC, act);
        else
            launch(k_gemv_v8<T, WT, float, false>, grid, bs, 0, c->stream, out, odtype, in32, w, bias, C, OC, act);
    } else {
        launch(k_gemv_s<T, WT>, grid, gemv_threads(C, 1), 0, c->stream, out, odtype, in32, w, bias, C, OC, act);
    }
    LAUNCH_CK(c, "k_gemv");
}

template <int T>
void gemv_launch_wd(blip2_cuda_ctx *c, void *out, int odtype, const void *inp, bool in16, const uint16_t *w,
                    const void *bias, int C, int OC, int wdtype, int act) {
    if (wdtype == BLIP2_W_F16) gemv_launch<T, __half>(c, out, odtype, inp, in16, w, bias, C, OC, act);
    else gemv_launch<T, __nv_bfloat16>(c, out, odtype, inp, in16, w, bias, C, OC, act);
}

/* Whether matmul_ln_a takes k_gemv_ln: one row, 16-bit activations of the weights' type, the row
 * in registers in one pass, 16-byte aligned rows. BLIP2_FUSED_LN=0: never (the norm kernel, then
 * the GEMV: for comparing them in one benchmark run). Read once per process. */
bool gemv_ln_ok(int T, int C, int adtype, int wdtype, const void *x, const void *lw, const void *lb, const void *w) {
    static const bool on = env_switch("BLIP2_FUSED_LN", true);
    return on && T == 1 && adtype == wdtype && gemv_use(T, C, wdtype) && C > 0 && C % 8 == 0 &&
           C <= 8 * GEMV_LN_CHUNKS * GEMV_MAX_THREADS &&
           (((uintptr_t)x | (uintptr_t)lw | (uintptr_t)lb | (uintptr_t)w) & 15) == 0;
}

/* Rows of W a k_gemv_ln block takes: BLIP2_GEMV_LN_ROWS = 1, 2 or 4 (default 4: the row's loads
 * and sums serve four outputs). Read once per process. */
int gemv_ln_rows() {
    static const int rows = [] {
        const long long n = env_int("BLIP2_GEMV_LN_ROWS", 4);
        return n == 1 || n == 2 ? (int)n : 4;
    }();
    return rows;
}

template <typename WT, int R>
void gemv_ln_launch(blip2_cuda_ctx *c, void *out, int odtype, const float *x, const float *lw, const float *lb, float eps,
                    const uint16_t *w, const void *bias, int C, int OC, int act) {
    const unsigned grid = (unsigned)(((long long)OC + R - 1) / R), bs = gemv_threads(C / 8, GEMV_LN_CHUNKS);
    launch(k_gemv_ln<WT, R>, grid, bs, 0, c->stream, out, odtype, x, lw, lb, eps, w, bias, C, OC, act);
    LAUNCH_CK(c, "k_gemv_ln");
}

/* out[1, OC] = act(LN(x) · wᵀ + bias) for gemv_ln_ok shapes; out and bias as gemv's. */
void gemv_ln(blip2_cuda_ctx *c, void *out, int odtype, const float *x, const float *lw, const float *lb, float eps,
             const uint16_t *w, const void *bias, int C, int OC, int wdtype, int act) {
    if (gemv_warp_ok(C)) { /* gemv_ln_ok checked the alignment */
        if (wdtype == BLIP2_W_F16) gemv_w_launch<__half, float, true>(c, out, odtype, x, lw, lb, eps, w, bias, C, OC, act);
        else gemv_w_launch<__nv_bfloat16, float, true>(c, out, odtype, x, lw, lb, eps, w, bias, C, OC, act);
        return;
    }
    const int R = gemv_ln_rows();
    if (wdtype == BLIP2_W_F16) {
        if (R == 1) gemv_ln_launch<__half, 1>(c, out, odtype, x, lw, lb, eps, w, bias, C, OC, act);
        else if (R == 2) gemv_ln_launch<__half, 2>(c, out, odtype, x, lw, lb, eps, w, bias, C, OC, act);
        else gemv_ln_launch<__half, 4>(c, out, odtype, x, lw, lb, eps, w, bias, C, OC, act);
    } else {
        if (R == 1) gemv_ln_launch<__nv_bfloat16, 1>(c, out, odtype, x, lw, lb, eps, w, bias, C, OC, act);
        else if (R == 2) gemv_ln_launch<__nv_bfloat16, 2>(c, out, odtype, x, lw, lb, eps, w, bias, C, OC, act);
        else gemv_ln_launch<__nv_bfloat16, 4>(c, out, odtype, x, lw, lb, eps, w, bias, C, OC, act);
    }
}

/* out[T, OC] = act(inp[T, C] · w[OC, C]ᵀ + bias), 16-bit w, for gemv_use shapes; inp fp32, or
 * 16-bit of the weights' type (in16, for gemv16_ok shapes); out and bias fp32, or both of the
 * weights' type (odtype). */
void gemv(blip2_cuda_ctx *c, void *out, int odtype, const void *inp, bool in16, const uint16_t *w, const void *bias, int T,
          int C, int OC, int wdtype, int act) {
    static_assert(GEMV_MAX_T == 8, "the switch below covers T = 1 .. 8");
    switch (T) {
    case 1: gemv_launch_wd<1>(c, out, odtype, inp, in16, w, bias, C, OC, wdtype, act); break;
    case 2: gemv_launch_wd<2>(c, out, odtype, inp, in16, w, bias, C, OC, wdtype, act); break;
    case 3: gemv_launch_wd<3>(c, out, odtype, inp, in16, w, bias, C, OC, wdtype, act); break;
    case 4: gemv_launch_wd<4>(c, out, odtype, inp, in16, w, bias, C, OC, wdtype, act); break;
    case 5: gemv_launch_wd<5>(c, out, odtype, inp, in16, w, bias, C, OC, wdtype, act); break;
    case 6: gemv_launch_wd<6>(c, out, odtype, inp, in16, w, bias, C, OC, wdtype, act); break;
    case 7: gemv_launch_wd<7>(c, out, odtype, inp, in16, w, bias, C, OC, wdtype, act); break;
    case 8: gemv_launch_wd<8>(c, out, odtype, inp, in16, w, bias, C, OC, wdtype, act); break;
    default: blip2_cuda_record(c, "matmul_h: GEMV path called with T %d", T); break;
    }
}

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

bool valid_adtype(blip2_cuda_ctx *c, const char *op, int adtype) {
    if (adtype == BLIP2_W_F32 || adtype == BLIP2_W_F16 || adtype == BLIP2_W_BF16) return true;
    blip2_cuda_record(c, "%s: unknown activation type %d", op, adtype);
    return false;
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

void blip2_kv_write(void *k_pool, void *v_pool, int kvdtype, const float *k, const float *v, int in_stride,
                    const int32_t *tables, int max_blocks, const int32_t *meta, int n_seqs, int block_size, int C);

/* BLIP2_FUSED_KV=0: the new keys and values through k_kv_write first, as before the fusion (for
 * comparing them). */
bool fused_kv_enabled() {
    static const bool on = env_switch("BLIP2_FUSED_KV", true);
    return on;
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
