/* Builds with CUDA: "cpu" or "cuda" (one context per calling thread). */
#include <stdio.h>
#include <string.h>

#include "../kernels/cuda/context.h"
#include "../kernels/cuda/device.h"
#include "device.h"

blip2_code blip2_device_open(const char *name, int index, blip2_device *d, blip2_status *st) {
    memset(d, 0, sizeof *d);
    if (strcmp(name, "cpu") == 0) {
        d->ops = &blip2_cpu_ops;
        strcpy(d->name, "cpu");
        return BLIP2_OK;
    }
    if (strcmp(name, "cuda") != 0) return blip2_fail(st, BLIP2_EINVAL, "unknown device '%s' (cpu or cuda)", name);
    char err[256] = "";
    blip2_cuda_ctx *ctx = blip2_cuda_ctx_create(index, err, sizeof err);
    if (!ctx) return blip2_fail(st, BLIP2_EUNAVAILABLE, "--device cuda: %s", err);
    d->ops = &blip2_cuda_ops;
    d->ctx = ctx;
    d->index = index;
    char gpu[96] = "?";
    blip2_cuda_device_describe(gpu, sizeof gpu);
    snprintf(d->name, sizeof d->name, "cuda:%d (%s)", index, gpu);
    return BLIP2_OK;
}

void blip2_device_close(blip2_device *d) {
    if (d->ctx) blip2_cuda_ctx_destroy(d->ctx);
    memset(d, 0, sizeof *d);
}

int blip2_device_count(void) { return blip2_cuda_device_count(); }

const blip2_ops *blip2_device_ops(const char *name) {
    if (strcmp(name, "cpu") == 0) return &blip2_cpu_ops;
    return strcmp(name, "cuda") == 0 ? &blip2_cuda_ops : NULL;
}
