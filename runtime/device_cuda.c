/* Builds with CUDA: one context per calling thread. */
#include <stdio.h>

#include "../kernels/cuda/context.h"
#include "../kernels/cuda/device.h"
#include "device.h"

blip2_code blip2_device_open_cuda(int index, int background, blip2_device *d, blip2_status *st) {
    char err[256] = "";
    blip2_cuda_ctx *ctx = background ? blip2_cuda_ctx_create_background(index, err, sizeof err)
                                     : blip2_cuda_ctx_create(index, err, sizeof err);
    if (!ctx) return blip2_fail(st, BLIP2_EUNAVAILABLE, "--device cuda: %s", err);
    d->ops = &blip2_cuda_ops;
    d->ctx = ctx;
    d->index = index;
    char gpu[96] = "?";
    blip2_cuda_device_describe(gpu, sizeof gpu);
    snprintf(d->name, sizeof d->name, "cuda:%d (%s)", index, gpu);
    return BLIP2_OK;
}

void blip2_device_close_cuda(blip2_device *d) {
    if (d->ctx) blip2_cuda_ctx_destroy(d->ctx);
}

int blip2_device_count(void) { return blip2_cuda_device_count(); }

int blip2_device_current_index(void) {
    blip2_cuda_ctx *c = blip2_cuda_ctx_current();
    return c ? blip2_cuda_ctx_device(c) : 0;
}
const blip2_ops *blip2_device_cuda_ops(void) { return &blip2_cuda_ops; }
