/* The CUDA backend's per-thread state. Ops keep the CPU reference's signatures (no stream or
 * handle arguments), so each host thread has a current context: its device, stream, cuBLASLt
 * handle and workspace, the cached matmul algorithms, and a sticky error that ops record instead
 * of aborting (blip2_cuda_ops.sync reports and clears it). Tensor-parallel shards running as
 * threads on one GPU (parallel/comm_inproc.c) each create their own context. */
#ifndef BLIP2_CUDA_CONTEXT_H
#define BLIP2_CUDA_CONTEXT_H

#include <stddef.h>

#include "../ops.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct blip2_cuda_ctx blip2_cuda_ctx;

/* Creates a context on `device` and makes it current on the calling thread; NULL with a message
 * in err (no GPU, out of memory, a library failing to start). Its stream has the device's highest
 * priority; a background context's (the image encoder's) the lowest, so the GPU schedules the
 * decode steps' blocks first when both have work queued. */
blip2_cuda_ctx *blip2_cuda_ctx_create(int device, char *err, size_t n);
blip2_cuda_ctx *blip2_cuda_ctx_create_background(int device, char *err, size_t n);
/* Makes ctx current on the calling thread (NULL: none). */
void blip2_cuda_ctx_use(blip2_cuda_ctx *ctx);
blip2_cuda_ctx *blip2_cuda_ctx_current(void);
/* The context's cudaStream_t, as void* for C callers (NCCL). */
void *blip2_cuda_ctx_stream(const blip2_cuda_ctx *ctx);
int blip2_cuda_ctx_device(const blip2_cuda_ctx *ctx);
/* Records an error on the current context (first one wins), e.g. from a NCCL call. */
void blip2_cuda_ctx_fail(const char *what);
void blip2_cuda_ctx_destroy(blip2_cuda_ctx *ctx);

/* Host memory pinned for fast uploads (staging), NULL on failure. */
void *blip2_cuda_host_alloc(size_t bytes);
void blip2_cuda_host_free(void *p);

/* The CUDA twins of kernels/cpu/ops.c. Every op runs on the current context's stream. */
extern const blip2_ops blip2_cuda_ops;

#ifdef __cplusplus
}
#endif

#endif
