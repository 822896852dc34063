/* The CUDA build links and runs; on a machine without a GPU it says so and passes. */
#include <stdio.h>

#include "../kernels/cuda/device.h"

int main(void) {
    char name[256];
    int cc = blip2_cuda_device_describe(name, sizeof name);
    if (cc < 0) {
        printf("skipped: no GPU\n");
        return 0;
    }
    printf("GPU 0: %s (sm_%d), %d device(s)\n", name, cc, blip2_cuda_device_count());
    int ok = cc >= 70;
    printf("%d passed, %d failed\n", ok, !ok);
    return ok ? 0 : 1;
}
