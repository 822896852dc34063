/* CUDA device discovery for the GPU backend. Compiled only when the CUDA build is on. */
#ifndef BLIP2_CUDA_DEVICE_H
#define BLIP2_CUDA_DEVICE_H

#ifdef __cplusplus
extern "C" {
#endif

/* Number of usable CUDA devices; 0 when there is no driver or no GPU (never aborts). */
int blip2_cuda_device_count(void);
/* Fills name (n bytes) with device 0's name and returns its compute capability ×10, or -1. */
int blip2_cuda_device_describe(char *name, int n);

#ifdef __cplusplus
}
#endif

#endif
