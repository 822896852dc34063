/* Builds without NCCL (no CUDA or no MPI): the NCCL communicator cannot be created. */
#include <stddef.h>

#include "comm.h"

blip2_code blip2_comm_nccl_create(blip2_comm *host, blip2_comm **out, blip2_status *st) {
    (void)host;
    if (out) *out = NULL;
    return blip2_fail(st, BLIP2_EINTERNAL, "NCCL is not compiled into this build (needs CUDA and MPI)");
}
