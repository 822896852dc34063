/* The emulator's block runner (fiber.cpp): runs one block of a kernel, its threads as fibers. */
#ifndef BLIP2_CUDASIM_FIBER_H
#define BLIP2_CUDASIM_FIBER_H

#include <cuda_runtime.h>

#include <cstddef>
#include <functional>

#include "sim.h"

namespace blip2_sim {

/* Runs body once per thread of block bid (threadIdx etc. set for each); smem is the dynamic
 * shared memory. false, with why filled, when the block got stuck or misused a primitive.
 * With at_pdl_wait, threads that reach pdl_wait() stop there; once no thread can go on, it is
 * called (once: the kernel before runs in it) and they go on. Without, pdl_wait() returns at once.
 * If no thread waits, it is called when the block ends. */
bool run_block(const std::function<void()> &body, dim3 grid, dim3 block, uint3 bid, void *smem, char *why,
               size_t why_n, const std::function<void()> *at_pdl_wait = nullptr);

} /* namespace blip2_sim */

#endif
