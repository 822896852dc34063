/* The CPU emulator's launch machinery (tests/cudasim/README.md): what rewrite.pl's launches call.
 * A launch runs its blocks one after the other on the calling thread; the threads of a block are
 * fibers that switch only at barriers and shuffles, so a kernel that is missing a barrier, has a
 * barrier not every thread reaches, or shuffles with lanes that left, fails here as it would
 * (or worse, might not) on a GPU. Kernel pointer arguments must be device memory. */
#ifndef BLIP2_CUDASIM_SIM_H
#define BLIP2_CUDASIM_SIM_H

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

namespace blip2_sim {

/* The emulated thread running now (threadIdx and friends read it). */
struct thread_coords {
    uint3 thread_idx, block_idx;
    dim3 block_dim, grid_dim;
};
extern __thread thread_coords *tl_coords;
[[noreturn]] void outside_kernel();
inline thread_coords *current() {
    if (__builtin_expect(!tl_coords, 0)) outside_kernel();
    return tl_coords;
}

void sync_block();
/* A kernel's __launch_bounds__ maximum (rewrite.pl calls it first thing in the body): a block of more
 * threads fails the launch, as it does on a GPU. */
void block_bounds(long long most);
uint64_t shuffle_xor(unsigned mask, uint64_t bits, int lane_mask, int width);
void *dynamic_smem();
/* cp.async (internal.cuh's cp_async16 / cp_async_commit / cp_async_wait): the 16 bytes at dst read
 * as NaN (0xff bytes) from the issue on, and land (src's bytes, or zeros without src) only when the
 * issuing thread waits for the copy's group. A read before the issuing thread's wait and a barrier,
 * or a copy issued over a tile some warp still reads, shows as NaN, as it may on a GPU. */
void cp_async(void *dst, const void *src);
void cp_async_commit();
void cp_async_wait(int n);
/* griddepcontrol.wait (internal.cuh's pdl_wait): where a launch with programmatic dependent launch
 * runs early (runtime.cpp: its first block, before the kernel queued before it), the block's threads
 * stop here until that kernel has run; everywhere else it returns at once. */
void pdl_wait();

/* Whether p may be dereferenced by a kernel: NULL, device memory, or pinned host memory. */
bool device_accessible(const void *p);
/* Records a launch error (the next cudaGetLastError returns it) and says why on stderr. */
void launch_fail(cudaError_t e, const char *kernel, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* Queues or runs one launch (recorded instead while its stream is being captured). */
void launch_body(const char *kernel, const void *fn, dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                 bool pdl, std::function<void()> body);

template <typename T> bool arg_ok(const char *kernel, int i, const T &v) {
    if constexpr (std::is_pointer_v<T>) {
        if (!device_accessible((const void *)v)) {
            launch_fail(cudaErrorIllegalAddress, kernel, "argument %d (%p) is not device memory", i, (const void *)v);
            return false;
        }
    }
    (void)kernel, (void)i, (void)v;
    return true;
}

struct config {
    dim3 grid, block;
    size_t smem;
    cudaStream_t stream;
    bool pdl; /* launched with cudaLaunchAttributeProgrammaticStreamSerialization */
    config(dim3 g, dim3 b, size_t s = 0, cudaStream_t st = 0, bool p = false)
        : grid(g), block(b), smem(s), stream(st), pdl(p) {}

    template <typename... P, typename... A> void launch(void (*fn)(P...), const char *name, A &&...args) {
        static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
        std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
        bool ok = std::apply(
            [&](const auto &...v) {
                int i = 0;
                return (arg_ok(name, i++, v) && ...);
            },
            params);
        if (!ok) return;
        launch_body(name, (const void *)fn, grid, block, smem, stream, pdl, [fn, params] { std::apply(fn, params); });
    }
};

} /* namespace blip2_sim */

#endif
