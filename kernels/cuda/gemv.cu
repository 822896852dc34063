/* The GEMV kernels: 16-bit-weight matmuls at a few rows (decode), the LayerNorm before qkv and
 * fc1 inside the one-row GEMV, and the adding epilogue of out_proj and fc2; ops.cu's matmul ops
 * take them where gemv_use() / gemv_ln_ok() say (internal.cuh). Same numerics as the cuBLASLt path
 * (inputs rounded to the weights' type, fp32 sums). Time at batch 1: the weight bytes, so
 * everything here is about keeping 16-byte loads in flight. */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>

#include <type_traits>

#include "common.cuh"

namespace {
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
            row_norm_stats(x, C, s, eps, red_d, mean, rstd);
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

} /* namespace */

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

/* Whether matmul_ln_a takes k_gemv_ln: one row, 16-bit activations of the weights' type, the row
 * in registers in one pass, 16-byte aligned rows. BLIP2_FUSED_LN=0: never (the norm kernel, then
 * the GEMV: for comparing them in one benchmark run). Read once per process. */
bool gemv_ln_ok(int T, int C, int adtype, int wdtype, const void *x, const void *lw, const void *lb, const void *w) {
    static const bool on = env_switch("BLIP2_FUSED_LN", true);
    return on && T == 1 && adtype == wdtype && gemv_use(T, C, wdtype) && C > 0 && C % 8 == 0 &&
           C <= 8 * GEMV_LN_CHUNKS * GEMV_MAX_THREADS &&
           (((uintptr_t)x | (uintptr_t)lw | (uintptr_t)lb | (uintptr_t)w) & 15) == 0;
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
