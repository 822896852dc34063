/* Private to the CUDA backend (context.cu, ops.cu): the context's fields and the error-recording
 * helpers. Nothing here is part of the C API (that is context.h). */
#ifndef BLIP2_CUDA_INTERNAL_CUH
#define BLIP2_CUDA_INTERNAL_CUH

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

#include "context.h"

/* One cached cuBLASLt algorithm: the heuristic's first choice for a problem key. ok == 0 means the
 * heuristic offered nothing for the key (or cuBLASLt refused it), so the op uses cublasGemmEx. */
typedef struct {
    int T, C, OC, abtype, epilogue, bias;     /* problem */
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
    unsigned scratch_gen; /* bumped whenever a scratch buffer (act16) moves: graphs recorded before are stale */
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

#endif
