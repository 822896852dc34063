/* Builds without CUDA: the CPU backend only. */
#include <string.h>

#include "device.h"

blip2_code blip2_device_open(const char *name, int index, blip2_device *d, blip2_status *st) {
    memset(d, 0, sizeof *d);
    if (strcmp(name, "cpu") == 0) {
        d->ops = &blip2_cpu_ops;
        strcpy(d->name, "cpu");
        return BLIP2_OK;
    }
    (void)index;
    if (strcmp(name, "cuda") == 0)
        return blip2_fail(st, BLIP2_EINVAL, "--device cuda: this build has no CUDA backend (nvcc was not found when it was configured)");
    return blip2_fail(st, BLIP2_EINVAL, "unknown device '%s' (cpu or cuda)", name);
}

void blip2_device_close(blip2_device *d) { memset(d, 0, sizeof *d); }

int blip2_device_count(void) { return 0; }

const blip2_ops *blip2_device_ops(const char *name) {
    if (strcmp(name, "cpu") == 0) return &blip2_cpu_ops;
    return NULL;
}
