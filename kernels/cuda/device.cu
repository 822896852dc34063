#include <cuda_runtime.h>
#include <stdio.h>

#include "device.h"

extern "C" int blip2_cuda_device_count(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError(); /* clear the sticky "no driver" error */
        return 0;
    }
    return n;
}

extern "C" int blip2_cuda_device_describe(char *name, int n) {
    cudaDeviceProp p;
    if (blip2_cuda_device_count() < 1 || cudaGetDeviceProperties(&p, 0) != cudaSuccess) return -1;
    snprintf(name, (size_t)n, "%s", p.name);
    return p.major * 10 + p.minor;
}
