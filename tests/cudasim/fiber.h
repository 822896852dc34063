/* The emulator's block runner (fiber.cpp): runs one block of a kernel, its threads as fibers. */
#ifndef BLIP2_CUDASIM_FIBER_H
#define BLIP2_CUDASIM_FIBER_H

#include <cuda_runtime.h>

#include <cstddef>
#include <functional>

#include "sim.h"

namespace blip2_sim {

/* Runs body once per thread of block bid (threadIdx etc. set for each); smem is the dynamic
 * shared memory. false, with why filled, when the block got stuck or misused a primitive. */
bool run_block(const std::function<void()> &body, dim3 grid, dim3 block, uint3 bid, void *smem, char *why,
               size_t why_n);

} /* namespace blip2_sim */

#endif
