/* What the kernel files of the CUDA backend (ops.cu, gemv.cu, attention_paged.cu) share: the block
 * size, the current context, block reductions, and the activations' loads and stores in their
 * BLIP2_W_* types. An anonymous namespace of inline functions: each file gets its own copy. */
#ifndef BLIP2_CUDA_COMMON_CUH
#define BLIP2_CUDA_COMMON_CUH

#include <math.h>
#include <stdint.h>

#include "internal.cuh"

namespace {

constexpr int NT = 256;      /* threads per block for every kernel here */
constexpr int NWARPS = NT / 32;

inline blip2_cuda_ctx *cur(const char *op) {
    blip2_cuda_ctx *c = blip2_cuda_ctx_current();
    if (!c) blip2_cuda_record(NULL, "%s: no current CUDA context on this thread", op);
    return c;
}

/* Blocks for a grid-stride loop over n elements. */
inline unsigned grid_for(size_t n) {
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

/* A LayerNorm's statistics of a row x of C fp32 values read by the block's threads in stride
 * (element i by thread i mod blockDim.x), from each thread's partial sum s of its elements: the
 * mean, then 1/√(var + eps) from a second pass over x, both summed in double as the C reference
 * does. Every thread of the block calls it; its barriers also order the block's reads of x before
 * whatever follows. */
__device__ __forceinline__ void row_norm_stats(const float *x, int C, double s, float eps, double *red, float &mean,
                                               float &rstd) {
    s = block_sum(s, red);
    mean = (float)(s / C);
    double var = 0;
    for (int i = threadIdx.x; i < C; i += blockDim.x) {
        const float d = x[i] - mean;
        var += (double)d * d;
    }
    var = block_sum(var, red);
    rstd = (float)(1.0 / sqrt(var / C + (double)eps));
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

/* Whether adtype is an activation type (BLIP2_W_*); else recorded on c as op's error. */
inline bool valid_adtype(blip2_cuda_ctx *c, const char *op, int adtype) {
    if (adtype == BLIP2_W_F32 || adtype == BLIP2_W_F16 || adtype == BLIP2_W_BF16) return true;
    blip2_cuda_record(c, "%s: unknown activation type %d", op, adtype);
    return false;
}

} /* namespace */

#endif
