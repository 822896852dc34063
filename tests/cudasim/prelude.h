/* Force-included (g++ -include) at the top of every kernels/cuda source that the CPU emulator
 * builds (tests/cudasim/README.md). The real CUDA headers are used in their host mode, so every
 * type, enum and API prototype is NVIDIA's own; this file only supplies what exists on the device
 * side: the thread coordinates, barriers, warp shuffles and the few intrinsics kernels/cuda uses.
 * A source that uses an intrinsic missing here fails to compile, which is the point. */
#ifndef BLIP2_CUDASIM_PRELUDE_H
#define BLIP2_CUDASIM_PRELUDE_H

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>

#include "sim.h"

/* Sources that must tell the emulator from nvcc's host pass (where device code is never run) test
 * this: internal.cuh's mma_16816 calls the emulated instruction here and does nothing there. */
#define BLIP2_CUDASIM 1

/* cudaLaunchKernelEx (kernels/cuda's launch helper) as a <<<>>> launch that keeps its attribute,
 * programmatic dependent launch: such a launch's first block runs up to its griddepcontrol.wait before
 * the kernel queued before it (runtime.cpp). Defined before the thread-coordinate macros below, which
 * would rewrite cfg's gridDim and blockDim. */
template <typename... P, typename... A>
inline cudaError_t blip2_sim_launch_ex(const cudaLaunchConfig_t *cfg, void (*kernel)(P...), A &&...args) {
    bool pdl = false;
    for (unsigned i = 0; i < cfg->numAttrs; i++)
        pdl |= cfg->attrs[i].id == cudaLaunchAttributeProgrammaticStreamSerialization &&
               cfg->attrs[i].val.programmaticStreamSerializationAllowed;
    blip2_sim::config(cfg->gridDim, cfg->blockDim, cfg->dynamicSmemBytes, cfg->stream, pdl)
        .launch(kernel, "cudaLaunchKernelEx", std::forward<A>(args)...);
    return cudaSuccess; /* a failed launch is reported by cudaGetLastError, as the library does */
}
#define cudaLaunchKernelEx blip2_sim_launch_ex

/* Device memory spaces: a __shared__ variable is one per block. Blocks of a launch run one after
 * the other on the launching thread, so a thread_local static is exactly that. */
#undef __shared__
#define __shared__ static thread_local
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __forceinline__
#define __forceinline__ inline

#define threadIdx (blip2_sim::current()->thread_idx)
#define blockIdx (blip2_sim::current()->block_idx)
#define blockDim (blip2_sim::current()->block_dim)
#define gridDim (blip2_sim::current()->grid_dim)

inline void __syncthreads() { blip2_sim::sync_block(); }
/* A warp barrier: the shuffle rendezvous (full warps only, as shuffles). */
inline void __syncwarp(unsigned mask = 0xffffffffu) { blip2_sim::shuffle_xor(mask, 0, 0, 32); }

template <typename T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    static_assert(sizeof(T) <= 8, "shuffle of more than 8 bytes");
    uint64_t bits = 0;
    memcpy(&bits, &v, sizeof v);
    bits = blip2_sim::shuffle_xor(mask, bits, lane_mask, width);
    T r;
    memcpy(&r, &bits, sizeof r);
    return r;
}

/* Loads through the read-only / streaming caches are plain loads here. */
template <typename T> inline T __ldg(const T *p) { return *p; }
template <typename T> inline T __ldcs(const T *p) { return *p; }

/* Round-to-nearest float/double operations that nvcc must not contract: g++ builds these sources
 * with -ffp-contract=off, so a plain operation is already what they mean. */
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __int_as_float(int i) {
    float f;
    memcpy(&f, &i, sizeof f);
    return f;
}
inline float __uint_as_float(unsigned u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
/* The typed overloads cuda_runtime.h declares for nvcc only. */
template <typename T> inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes *attr, T *entry) {
    return ::cudaFuncGetAttributes(attr, (const void *)entry);
}
template <typename T> inline cudaError_t cudaFuncSetAttribute(T *entry, cudaFuncAttribute attr, int value) {
    return ::cudaFuncSetAttribute((const void *)entry, attr, value);
}
using std::max;
using std::min;

#include "mma_sync.h" /* mma.sync m16n8k16, for internal.cuh's mma_16816 */

#endif
