/* Builds without CUDA: asking for it is a clear error. */
#include "device.h"

blip2_code blip2_device_open_cuda(int index, int background, blip2_device *d, blip2_status *st) {
    (void)index, (void)background, (void)d;
    return blip2_fail(st, BLIP2_EINVAL, "--device cuda: this build has no CUDA backend (nvcc was not found when it was configured)");
}

void blip2_device_close_cuda(blip2_device *d) { (void)d; }
int blip2_device_count(void) { return 0; }
int blip2_device_current_index(void) { return 0; }
const blip2_ops *blip2_device_cuda_ops(void) { return NULL; }
