/* NCCL communicator (device memory), bootstrapped over a host communicator (normally MPI world).
 * Compiled in builds with CUDA and MPI (parallel/CMakeLists.txt); comm_nccl_none.c elsewhere.
 *
 * allreduce_sum is ncclAllReduce in place on the stream of the calling thread's CUDA context
 * (kernels/cuda/context.h): asynchronous, ordered with the ops queued on that stream, so the next
 * op reads the sum without a host sync. broadcast, allgather and barrier (host memory) go to the
 * host communicator. blip2_comm_nccl_create leaves the host communicator to its caller (MPI world
 * is freed by blip2_comm_world_finalize); a split's host part belongs to the split. */
#include <cuda_runtime.h>
#include <nccl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../kernels/cuda/context.h"
#include "comm.h"

typedef struct {
    ncclComm_t nccl;
    blip2_comm *host; /* the control plane */
    int owns_host;    /* 1 for split communicators: host is freed with this one */
    int device;       /* the CUDA device the NCCL communicator was created on */
} nccl_impl;

static nccl_impl *impl_of(blip2_comm *c) { return c->impl; }

/* A failed NCCL call as a status naming the call and where it was made. */
static blip2_code nccl_status(ncclResult_t r, const char *expr, const char *file, int line, blip2_status *st) {
    if (r == ncclSuccess) return BLIP2_OK;
    const char *last = NULL;
#if defined(NCCL_VERSION_CODE) && NCCL_VERSION_CODE >= NCCL_VERSION(2, 13, 0)
    last = ncclGetLastError(NULL);
#endif
    return blip2_fail(st, BLIP2_EINTERNAL, "%s failed (%s:%d): %s%s%s", expr, file, line, ncclGetErrorString(r),
                      last && last[0] ? ": " : "", last && last[0] ? last : "");
}

/* Evaluates to a blip2_code: BLIP2_OK, or EINTERNAL with the call, file and line in st. */
#define NCCL_CALL(st, expr) nccl_status((expr), #expr, __FILE__, __LINE__, (st))

static blip2_code nccl_allreduce(blip2_comm *c, float *buf, size_t n, blip2_status *st) {
    nccl_impl *im = impl_of(c);
    blip2_cuda_ctx *ctx = blip2_cuda_ctx_current();
    if (!ctx) return blip2_fail(st, BLIP2_EINTERNAL, "NCCL all-reduce: no CUDA context is current on this thread");
    if (blip2_cuda_ctx_device(ctx) != im->device)
        return blip2_fail(st, BLIP2_EINTERNAL, "NCCL all-reduce: the current CUDA context is on device %d, the communicator on %d",
                          blip2_cuda_ctx_device(ctx), im->device);
    cudaStream_t stream = (cudaStream_t)blip2_cuda_ctx_stream(ctx);
    return NCCL_CALL(st, ncclAllReduce(buf, buf, n, ncclFloat, ncclSum, im->nccl, stream));
}

static blip2_code nccl_broadcast(blip2_comm *c, void *buf, size_t bytes, int root, blip2_status *st) {
    blip2_comm *h = impl_of(c)->host;
    return h->ops->broadcast(h, buf, bytes, root, st);
}

static blip2_code nccl_allgather(blip2_comm *c, const void *send, void *recv, size_t bytes, blip2_status *st) {
    blip2_comm *h = impl_of(c)->host;
    return h->ops->allgather(h, send, recv, bytes, st);
}

static blip2_code nccl_barrier(blip2_comm *c, blip2_status *st) {
    blip2_comm *h = impl_of(c)->host;
    return h->ops->barrier(h, st);
}

/* Splits the host communicator, then starts NCCL over the part (on the current CUDA context). */
static blip2_code nccl_split(blip2_comm *c, int color, int key, blip2_comm **out, blip2_status *st) {
    blip2_comm *h = impl_of(c)->host, *sub = NULL;
    blip2_code rc = h->ops->split(h, color, key, &sub, st);
    if (rc) return rc;
    rc = blip2_comm_nccl_create(sub, out, st);
    if (rc) sub->ops->free(sub);
    else impl_of(*out)->owns_host = 1;
    return rc;
}

static void nccl_free(blip2_comm *c) {
    if (!c) return;
    nccl_impl *im = impl_of(c);
    ncclCommDestroy(im->nccl);
    if (im->owns_host) im->host->ops->free(im->host);
    free(im);
    free(c);
}

static void nccl_abort(blip2_comm *c, int code) {
    nccl_impl *im = impl_of(c);
    ncclCommAbort(im->nccl);
    im->host->ops->abort(im->host, code);
    exit(code); /* in case the host communicator's abort returns */
}

static const blip2_comm_ops nccl_ops = {nccl_allreduce, nccl_broadcast, nccl_allgather, nccl_barrier,
                                        nccl_split,     nccl_free,      nccl_abort};

/* What rank 0 sends to the others: whether it could make an id, and the id. */
typedef struct {
    int ok;
    ncclUniqueId id;
} nccl_bootstrap;

blip2_code blip2_comm_nccl_create(blip2_comm *host, blip2_comm **out, blip2_status *st) {
    if (!host || !out) return blip2_fail(st, BLIP2_EINVAL, "NCCL communicator: no host communicator");
    *out = NULL;

    /* Every rank checks its own side first and the ranks agree on the outcome before the
     * collective ncclCommInitRank, so one rank's failure fails all instead of leaving peers inside it. */
    blip2_status mine = {0};
    blip2_code rc = BLIP2_OK;
    blip2_cuda_ctx *ctx = blip2_cuda_ctx_current();
    int device = -1;
    if (!ctx) {
        rc = blip2_fail(&mine, BLIP2_EINTERNAL, "NCCL communicator: no CUDA context is current on rank %d", host->rank);
    } else {
        device = blip2_cuda_ctx_device(ctx);
        cudaError_t e = cudaSetDevice(device);
        if (e != cudaSuccess)
            rc = blip2_fail(&mine, BLIP2_EINTERNAL, "NCCL communicator: cudaSetDevice(%d) on rank %d: %s", device,
                            host->rank, cudaGetErrorString(e));
    }
    blip2_comm *c = calloc(1, sizeof *c);
    nccl_impl *im = calloc(1, sizeof *im);
    if (!rc && (!c || !im)) rc = blip2_fail(&mine, BLIP2_ENOMEM, "out of memory");
    nccl_bootstrap boot;
    memset(&boot, 0, sizeof boot);
    if (!rc && host->rank == 0) rc = NCCL_CALL(&mine, ncclGetUniqueId(&boot.id));
    boot.ok = rc == BLIP2_OK;

    int *oks = calloc((size_t)host->world, sizeof *oks);
    blip2_code hrc = oks ? host->ops->allgather(host, &boot.ok, oks, sizeof boot.ok, st)
                         : blip2_fail(st, BLIP2_ENOMEM, "out of memory");
    int bad = -1;
    for (int r = 0; !hrc && r < host->world && bad < 0; r++)
        if (!oks[r]) bad = r;
    free(oks);
    if (!hrc && bad < 0) hrc = host->ops->broadcast(host, &boot, sizeof boot, 0, st);
    if (!hrc && bad < 0) hrc = NCCL_CALL(st, ncclCommInitRank(&im->nccl, host->world, boot.id, host->rank));
    if (hrc || bad >= 0) {
        free(c);
        free(im);
        if (hrc) return hrc;
        if (rc) {
            if (st) *st = mine;
            return rc;
        }
        return blip2_fail(st, BLIP2_EINTERNAL, "NCCL communicator: rank %d could not start", bad);
    }
    im->host = host;
    im->device = device;
    c->ops = &nccl_ops;
    c->rank = host->rank;
    c->world = host->world;
    c->backend = "nccl";
    c->device_memory = 1;
    c->graph_safe = 1;
    c->impl = im;
    *out = c;
    return BLIP2_OK;
}
