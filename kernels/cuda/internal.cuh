/* Private to the CUDA backend (context.cu, ops.cu and the kernel files beside them): the context's
 * fields, the error-recording helpers, the launch rule, the device helpers several kernel files
 * use, and the functions one file offers another. Nothing here is part of the C API (context.h). */
#ifndef BLIP2_CUDA_INTERNAL_CUH
#define BLIP2_CUDA_INTERNAL_CUH

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <type_traits>

#include "context.h"

/* One cached cuBLASLt algorithm: the heuristic's first choice for a problem key. ok == 0 means the
 * heuristic offered nothing for the key (or cuBLASLt refused it), so the op uses cublasGemmEx. */
typedef struct {
    int T, C, OC, abtype, dtype, epilogue, bias, accumulate; /* problem (accumulate: beta = 1, C = D) */
    int align_a, align_b, align_d, align_bias; /* pointer alignments (bytes, capped at 256) the algorithm was chosen for */
} blip2_lt_key;

typedef struct {
    blip2_lt_key key;
    cublasLtMatmulAlgo_t algo;
    int used, ok;
} blip2_lt_entry;

#define BLIP2_LT_CACHE 64
#define BLIP2_LT_WORKSPACE (32u << 20)
#define BLIP2_STAGE_BYTES (4u << 20)
#define BLIP2_ERR_LEN 512

struct blip2_cuda_ctx {
    int device;
    cudaStream_t stream;
    cublasLtHandle_t lt;
    cublasHandle_t blas;
    void *lt_ws; /* BLIP2_LT_WORKSPACE bytes of device memory for cuBLASLt */
    blip2_lt_entry lt_cache[BLIP2_LT_CACHE];
    int lt_next; /* round-robin replacement slot */
    void *act16;  /* device scratch: fp32 activations converted to 16 bits before a 16-bit matmul */
    size_t act16_bytes;
    void *wide; /* device scratch: 16-bit values widened to fp32 (wide_scratch in ops.cu) */
    size_t wide_bytes;
    unsigned scratch_gen; /* bumped whenever a scratch buffer (act16, wide) moves: graphs recorded before are stale */
    int capturing;        /* a graph is being recorded on the stream */
    void *stage[2]; /* pinned staging chunks for uploads (allocated on first use) */
    cudaEvent_t stage_ev[2];
    int stage_next;
    int32_t *am_idx; /* device: one argmax result (index, value) for the scalar blip2_argmax */
    float *am_val;
    int32_t *am_host_idx; /* pinned host copies */
    float *am_host_val;
    int has_err;
    char err[BLIP2_ERR_LEN];
};

/* Records an error on ctx (the first one since the last sync wins). */
void blip2_cuda_record(blip2_cuda_ctx *ctx, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* The graph hooks of blip2_cuda_ops (graph.cu). */
int blip2_cuda_capture_begin(void);
void *blip2_cuda_capture_end(char *why, size_t n);
int blip2_cuda_graph_launch(void *graph);
void blip2_cuda_graph_free(void *graph);

/* cuBLAS status as text. */
const char *blip2_cublas_status_str(cublasStatus_t s);

/* Returns 1 when e is cudaSuccess; otherwise records "file:line: what: <error>" and returns 0. */
static inline int blip2_cuda_ck(blip2_cuda_ctx *ctx, cudaError_t e, const char *what, const char *file, int line) {
    if (e == cudaSuccess) return 1;
    blip2_cuda_record(ctx, "%s:%d: %s: %s (%s)", file, line, what, cudaGetErrorString(e), cudaGetErrorName(e));
    return 0;
}
static inline int blip2_cublas_ck(blip2_cuda_ctx *ctx, cublasStatus_t s, const char *what, const char *file,
                                  int line) {
    if (s == CUBLAS_STATUS_SUCCESS) return 1;
    blip2_cuda_record(ctx, "%s:%d: %s: %s", file, line, what, blip2_cublas_status_str(s));
    return 0;
}

#define CUDA_CK(ctx, expr) blip2_cuda_ck((ctx), (expr), #expr, __FILE__, __LINE__)
#define CUBLAS_CK(ctx, expr) blip2_cublas_ck((ctx), (expr), #expr, __FILE__, __LINE__)
/* After a kernel launch: launch-configuration errors are reported by cudaGetLastError. */
#define LAUNCH_CK(ctx, name) blip2_cuda_ck((ctx), cudaGetLastError(), "launch " name, __FILE__, __LINE__)

/* Programmatic dependent launch (sm_90). A decode step at batch 1 is ~260 short kernels, each
 * waiting for the one before to drain and then ramping up again: on an H100 (2026-11-27) the
 * per-layer GEMVs streamed at 1.8-2.2 TB/s against 2.96 for the one long LM-head GEMV. Every
 * kernel here is launched with cudaLaunchAttributeProgrammaticStreamSerialization, so its blocks
 * may start while its predecessor's last ones still run, and begins with pdl_entry():
 * launch_dependents lets the next kernel be scheduled, then griddepcontrol.wait returns once the
 * predecessor has completed and its writes are visible. Nothing is read or written before that
 * wait except immutable weights (the GEMV prefetches its rows into L2 first). Launches of other
 * libraries (cuBLASLt, NCCL) and copies keep the ordinary full dependency. BLIP2_PDL=0 launches
 * without the attribute (the waits then return at once). Emulator: the first block of a launch
 * runs up to this wait before the kernel queued before it, the rest after (tests/cudasim). */
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#elif defined(BLIP2_CUDASIM)
    blip2_sim::pdl_wait();
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_entry() {
    pdl_trigger();
    pdl_wait();
}
/* A hint that the 128-byte line at p will be read soon: into L2, no register waits on it. */
__device__ __forceinline__ void prefetch_l2(const void *p) {
#if defined(__CUDA_ARCH__)
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
#else
    (void)p;
#endif
}

/* 16-bit values (T: __half or __nv_bfloat16) as bits: rounded to nearest even from fp32, two packed
 * in a 32-bit word with the lower index in the low half, and widened back exactly. */
template <typename T> __device__ __forceinline__ uint16_t to_bits(float x) {
    uint16_t u;
    if constexpr (std::is_same<T, __half>::value) {
        const __half h = __float2half_rn(x);
        memcpy(&u, &h, 2);
    } else {
        const __nv_bfloat16 h = __float2bfloat16_rn(x);
        memcpy(&u, &h, 2);
    }
    return u;
}
template <typename T> __device__ __forceinline__ unsigned pack2(float lo, float hi) {
    unsigned u;
    if constexpr (std::is_same<T, __half>::value) {
        const __half2 h = __floats2half2_rn(lo, hi);
        memcpy(&u, &h, 4);
    } else {
        const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
        memcpy(&u, &h, 4);
    }
    return u;
}
template <typename T> __device__ __forceinline__ void widen2(unsigned u, float &lo, float &hi);
template <> __device__ __forceinline__ void widen2<__half>(unsigned u, float &lo, float &hi) {
    lo = __half2float(__ushort_as_half((unsigned short)(u & 0xffffu)));
    hi = __half2float(__ushort_as_half((unsigned short)(u >> 16)));
}
template <> __device__ __forceinline__ void widen2<__nv_bfloat16>(unsigned u, float &lo, float &hi) {
    lo = __uint_as_float(u << 16); /* bf16 is fp32's top half */
    hi = __uint_as_float(u & 0xffff0000u);
}

/* d += a·b on the tensor cores, one warp: mma.sync m16n8k16, row-major A [16×16] and column-major
 * B [16×8] in T (__half or __nv_bfloat16, two to a register, the lower index in the low half), fp32
 * D [16×8]. With g = lane / 4 and t = lane % 4 a lane holds (PTX ISA, "Matrix Fragments for
 * mma.m16n8k16 with floating point type"): a0 (row g, cols 2t, 2t+1), a1 (row g+8, same cols), a2,
 * a3 the same rows at cols 2t+8, 2t+9; b0 (k = 2t, 2t+1; n = g), b1 (k = 2t+8, 2t+9); d0, d1 (row
 * g, cols 2t, 2t+1), d2, d3 (row g+8). Every lane of the warp must call it. Emulator: the same
 * layouts, exchanged between the lanes (tests/cudasim/mma_sync.h); nvcc's host pass: nothing. */
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
#if defined(__CUDA_ARCH__)
    if constexpr (std::is_same<T, __half>::value)
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    else
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#elif defined(BLIP2_CUDASIM)
    blip2_sim::mma_m16n8k16<T>(d, a, b);
#else
    (void)d, (void)a, (void)b;
#endif
}

/* ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16 (.trans when TRANS), one warp: four 8×8
 * matrices of 16-bit values from shared memory. Lane l gives the address of row l % 8 of matrix
 * l / 8 (16 bytes, 16-byte aligned); r[i] is matrix i's (row l / 4, cols 2(l % 4), 2(l % 4) + 1),
 * or with TRANS its (rows 2(l % 4), 2(l % 4) + 1; col l / 4), the lower index in the low half. So
 * a row-major A tile or an [n][k] B tile gives mma_16816's fragments as they are, and a [k][n] B
 * tile gives them with TRANS. Every lane of the warp must call it. Emulator: the same layouts,
 * exchanged between the lanes (tests/cudasim/mma_sync.h). */
template <bool TRANS> __device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void *row) {
#if defined(__CUDA_ARCH__)
    const unsigned a = (unsigned)__cvta_generic_to_shared(row);
    if constexpr (TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(a));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(a));
#elif defined(BLIP2_CUDASIM)
    blip2_sim::ldmatrix_x4(r, row, TRANS);
#else
    (void)r, (void)row;
#endif
}

/* cp.async.cg (sm_80): 16 bytes from global src to shared dst (both 16-byte aligned) without a
 * register, through L2 only; with !full the 16 bytes are zeros and src is not read (it must still
 * be a valid address). Copies complete in commit groups: cp_async_wait<N>() returns once at most N
 * of this thread's groups are still in flight; a __syncthreads() after it makes every thread's
 * copies visible. Emulator: dst reads as NaN from the issue until the thread's wait lands the copy
 * (tests/cudasim/sim.h), so a missing wait or barrier shows. */
__device__ __forceinline__ void cp_async16(void *dst, const void *src, bool full) {
#if defined(__CUDA_ARCH__)
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(d), "l"(src), "r"(full ? 16 : 0) : "memory");
#elif defined(BLIP2_CUDASIM)
    blip2_sim::cp_async(dst, full ? src : nullptr);
#else
    (void)dst, (void)src, (void)full;
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__)
    asm volatile("cp.async.commit_group;" ::: "memory");
#elif defined(BLIP2_CUDASIM)
    blip2_sim::cp_async_commit();
#endif
}
template <int N> __device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__)
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#elif defined(BLIP2_CUDASIM)
    blip2_sim::cp_async_wait(N);
#endif
}

/* A BLIP2_* switch of the environment: on by default unless set to "0", or off by default
 * unless set to "1". Callers keep the answer in a function-local static (read once per process). */
static inline bool env_switch(const char *name, bool on_by_default) {
    const char *e = getenv(name);
    return on_by_default ? !(e && !strcmp(e, "0")) : (e && !strcmp(e, "1"));
}
/* A BLIP2_* number of the environment, or dflt where it is unset or empty (callers keep it, and
 * bound it, as for env_switch). */
static inline long long env_int(const char *name, long long dflt) {
    const char *e = getenv(name);
    return e && *e ? atoll(e) : dflt;
}

static inline bool pdl_enabled() {
    static const bool on = env_switch("BLIP2_PDL", true);
    return on;
}

/* A kernel launch (grid, block, dynamic shared memory, stream, then the kernel's arguments) with
 * the PDL attribute; errors reach cudaGetLastError (LAUNCH_CK) as with a triple-chevron launch. */
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, A &&...args) {
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    /* Positional (gridDim, blockDim, dynamicSmemBytes, stream, attrs, numAttrs): the emulator's
     * thread-coordinate macros would rewrite the first two names. */
    cudaLaunchConfig_t cfg = {grid, block, smem, stream, attr, pdl_enabled() ? 1u : 0u};
    (void)cudaLaunchKernelEx(&cfg, kernel, static_cast<A &&>(args)...);
}

/* The encoders' attention of a 16-bit model (wdtype BLIP2_W_F16 or BLIP2_W_BF16, not causal, HS <=
 * ATTN_MMA_MAX_HS) on the tensor cores (attention_mma.cu), with blip2_attention's layouts and result
 * (q, k, v and out of iodtype: fp32 or wdtype).
 * false, with nothing queued, for a type or head size it does not take; launch errors go to c. */
constexpr int ATTN_MMA_MAX_HS = 128;
bool attention_mma(blip2_cuda_ctx *c, void *out, const void *q, const void *k, const void *v, int B, int Tq, int Tk,
                   int NH, int HS, int q_stride, int kv_stride, float scale, int wdtype, int iodtype);
/* The same with 16-bit q, k, v and out (iodtype = wdtype), HS a multiple of 8 up to 112, strides
 * multiples of 8 elements, 16-byte aligned pointers, by cp.async and ldmatrix (attention_fa.cu),
 * when BLIP2_ATTN_FA=1; false, with nothing queued, otherwise. */
bool attention_fa(blip2_cuda_ctx *c, void *out, const void *q, const void *k, const void *v, int B, int Tq, int Tk,
                  int NH, int HS, int q_stride, int kv_stride, float scale, int wdtype, int iodtype);

/* BLIP2_BATCH_INVARIANT=1 (ops.cu): every matmul through cuBLASLt without split-K, so that a row's
 * sums do not depend on the batch it is in. */
bool batch_invariant_mode();

/* The GEMVs (gemv.cu): 16-bit-weight matmuls at T <= gemv_max_t() rows.
 * gemv_use: whether matmul_h / matmul_a take the GEMV for this shape; gemv16_ok: the same for
 * 16-bit inputs (of the weights' type, 16-byte aligned). gemv: out[T, OC] = act(inp[T, C] · w[OC,
 * C]ᵀ + bias), inp fp32 or (in16) 16-bit; out and bias fp32 or both of the weights' type (odtype),
 * or GEMV_OUT_ADD: out += product + bias, fp32, no activation (matmul_acc_a). gemv_ln_ok /
 * gemv_ln: out[1, OC] = act(LN(x) · wᵀ + bias), the norm done by the GEMV itself (matmul_ln_a). */
constexpr int GEMV_OUT_ADD = 0x100;
bool gemv_use(int T, int C, int wdtype);
bool gemv16_ok(int T, int C, int wdtype, const void *inp, const void *w);
void gemv(blip2_cuda_ctx *c, void *out, int odtype, const void *inp, bool in16, const uint16_t *w, const void *bias, int T,
          int C, int OC, int wdtype, int act);
bool gemv_ln_ok(int T, int C, int adtype, int wdtype, const void *x, const void *lw, const void *lb, const void *w);
void gemv_ln(blip2_cuda_ctx *c, void *out, int odtype, const float *x, const float *lw, const float *lb, float eps,
             const uint16_t *w, const void *bias, int C, int OC, int wdtype, int act);

/* The paged-KV ops (attention_paged.cu), as ops.h declares them (ops.cu's table takes them). */
namespace cuda {
void blip2_kv_write(void *k_pool, void *v_pool, int kvdtype, const float *k, const float *v, int in_stride,
                    const int32_t *tables, int max_blocks, const int32_t *meta, int n_seqs, int block_size, int C);
void blip2_attention_paged(void *out, const float *q, void *k_pool, void *v_pool, int kvdtype, const float *k_new,
                           const float *v_new, const int32_t *tables, int max_blocks, const int32_t *meta, int n_seqs,
                           int block_size, float *scratch, int max_ctx, int NH, int HS, int q_stride, int kv_stride,
                           float scale, int odtype);
} /* namespace cuda */

#endif
