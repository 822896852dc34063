/* The CUDA backend's per-thread context (context.h): device, stream, cuBLAS(Lt) handles and
 * workspace, the 16-bit activation scratch, the cuBLASLt algorithm cache, upload staging and a
 * sticky error. Creating one never aborts: without a driver or a GPU it returns NULL with a reason. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.cuh"

static thread_local blip2_cuda_ctx *g_current;

void blip2_cuda_record(blip2_cuda_ctx *ctx, const char *fmt, ...) {
    if (!ctx) {
        /* No context on this thread: nowhere to keep it, so say it once here. */
        va_list ap;
        va_start(ap, fmt);
        fprintf(stderr, "blip2 cuda (no current context): ");
        vfprintf(stderr, fmt, ap);
        fprintf(stderr, "\n");
        va_end(ap);
        return;
    }
    if (ctx->has_err) return; /* the first error wins */
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ctx->err, sizeof ctx->err, fmt, ap);
    va_end(ap);
    ctx->has_err = 1;
}

const char *blip2_cublas_status_str(cublasStatus_t s) {
    const char *name = cublasGetStatusName(s);
    return name ? name : "unknown cuBLAS status";
}

static void set_err(char *err, size_t n, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void set_err(char *err, size_t n, const char *fmt, ...) {
    if (!err || n == 0) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, n, fmt, ap);
    va_end(ap);
}

extern "C" void blip2_cuda_ctx_destroy(blip2_cuda_ctx *ctx) {
    if (!ctx) return;
    cudaSetDevice(ctx->device);
    if (ctx->stream) cudaStreamSynchronize(ctx->stream);
    if (ctx->blas) cublasDestroy(ctx->blas);
    if (ctx->lt) cublasLtDestroy(ctx->lt);
    if (ctx->lt_ws) cudaFree(ctx->lt_ws);
    if (ctx->act16) cudaFree(ctx->act16);
    if (ctx->wide) cudaFree(ctx->wide);
    for (int i = 0; i < 2; i++) {
        if (ctx->stage_ev[i]) cudaEventDestroy(ctx->stage_ev[i]);
        if (ctx->stage[i]) cudaFreeHost(ctx->stage[i]);
    }
    if (ctx->am_idx) cudaFree(ctx->am_idx);
    if (ctx->am_val) cudaFree(ctx->am_val);
    if (ctx->am_host_idx) cudaFreeHost(ctx->am_host_idx);
    if (ctx->am_host_val) cudaFreeHost(ctx->am_host_val);
    if (ctx->stream) cudaStreamDestroy(ctx->stream);
    cudaGetLastError(); /* nothing left to report to */
    if (g_current == ctx) g_current = NULL;
    free(ctx);
}

static blip2_cuda_ctx *ctx_create(int device, int background, char *err, size_t n);

extern "C" blip2_cuda_ctx *blip2_cuda_ctx_create(int device, char *err, size_t n) { return ctx_create(device, 0, err, n); }

extern "C" blip2_cuda_ctx *blip2_cuda_ctx_create_background(int device, char *err, size_t n) {
    return ctx_create(device, 1, err, n);
}

static blip2_cuda_ctx *ctx_create(int device, int background, char *err, size_t n) {
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess) {
        cudaGetLastError(); /* clear the "no driver" error */
        set_err(err, n, "no CUDA device: %s", cudaGetErrorString(e));
        return NULL;
    }
    if (count < 1) {
        set_err(err, n, "no CUDA device: none found");
        return NULL;
    }
    if (device < 0 || device >= count) {
        set_err(err, n, "no CUDA device: device %d requested, %d present", device, count);
        return NULL;
    }
    blip2_cuda_ctx *ctx = (blip2_cuda_ctx *)calloc(1, sizeof *ctx);
    if (!ctx) {
        set_err(err, n, "CUDA context: out of host memory");
        return NULL;
    }
    ctx->device = device;

#define STEP_CUDA(expr)                                                                                  \
    do {                                                                                                 \
        cudaError_t e_ = (expr);                                                                         \
        if (e_ != cudaSuccess) {                                                                         \
            cudaGetLastError();                                                                          \
            set_err(err, n, "CUDA context on device %d: %s: %s", device, #expr, cudaGetErrorString(e_)); \
            blip2_cuda_ctx_destroy(ctx);                                                                 \
            return NULL;                                                                                 \
        }                                                                                                \
    } while (0)
#define STEP_BLAS(expr)                                                                                         \
    do {                                                                                                        \
        cublasStatus_t s_ = (expr);                                                                             \
        if (s_ != CUBLAS_STATUS_SUCCESS) {                                                                      \
            set_err(err, n, "CUDA context on device %d: %s: %s", device, #expr, blip2_cublas_status_str(s_)); \
            blip2_cuda_ctx_destroy(ctx);                                                                        \
            return NULL;                                                                                        \
        }                                                                                                       \
    } while (0)

    int least = 0, greatest = 0;
    STEP_CUDA(cudaSetDevice(device));
    STEP_CUDA(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    STEP_CUDA(cudaStreamCreateWithPriority(&ctx->stream, cudaStreamNonBlocking, background ? least : greatest));
    STEP_BLAS(cublasLtCreate(&ctx->lt));
    STEP_BLAS(cublasCreate(&ctx->blas));
    STEP_BLAS(cublasSetStream(ctx->blas, ctx->stream));
    /* Default math: no TF32 for the fp32 routines (the attention gemms stay within 1e-5). */
    STEP_BLAS(cublasSetMathMode(ctx->blas, CUBLAS_DEFAULT_MATH));
    STEP_CUDA(cudaMalloc(&ctx->lt_ws, BLIP2_LT_WORKSPACE));
    /* cuBLAS (the fallback of gemm, the attention gemms) shares it: one stream orders them, and a
     * handle with its own workspace never allocates while a graph is recorded. */
    STEP_BLAS(cublasSetWorkspace(ctx->blas, ctx->lt_ws, BLIP2_LT_WORKSPACE));
    STEP_CUDA(cudaMalloc((void **)&ctx->am_idx, sizeof(int32_t)));
    STEP_CUDA(cudaMalloc((void **)&ctx->am_val, sizeof(float)));
    STEP_CUDA(cudaMallocHost((void **)&ctx->am_host_idx, sizeof(int32_t)));
    STEP_CUDA(cudaMallocHost((void **)&ctx->am_host_val, sizeof(float)));
    STEP_CUDA(cudaEventCreateWithFlags(&ctx->stage_ev[0], cudaEventDisableTiming));
    STEP_CUDA(cudaEventCreateWithFlags(&ctx->stage_ev[1], cudaEventDisableTiming));
#undef STEP_CUDA
#undef STEP_BLAS

    g_current = ctx;
    return ctx;
}

extern "C" void blip2_cuda_ctx_use(blip2_cuda_ctx *ctx) {
    g_current = ctx;
    if (ctx) CUDA_CK(ctx, cudaSetDevice(ctx->device));
}

extern "C" blip2_cuda_ctx *blip2_cuda_ctx_current(void) { return g_current; }

extern "C" void *blip2_cuda_ctx_stream(const blip2_cuda_ctx *ctx) { return ctx ? (void *)ctx->stream : NULL; }

extern "C" int blip2_cuda_ctx_device(const blip2_cuda_ctx *ctx) { return ctx ? ctx->device : -1; }

extern "C" void blip2_cuda_ctx_fail(const char *what) { blip2_cuda_record(g_current, "%s", what ? what : "(failure)"); }

extern "C" void *blip2_cuda_host_alloc(size_t bytes) {
    void *p = NULL;
    if (cudaMallocHost(&p, bytes ? bytes : 1) != cudaSuccess) {
        cudaGetLastError();
        return NULL;
    }
    return p;
}

extern "C" void blip2_cuda_host_free(void *p) {
    if (p) cudaFreeHost(p);
}
