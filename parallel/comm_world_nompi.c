/* Builds without MPI: the world is this one process. */
#include "comm.h"

blip2_comm *blip2_comm_world(blip2_status *st) {
    (void)st;
    return blip2_comm_self();
}

void blip2_comm_world_finalize(void) {}
