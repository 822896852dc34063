/* Opening a device by name, and device + communicator for one tensor-parallel rank (the part
 * shared by blip2 generate, blip2 bench and blip2d). */
#include <stdlib.h>
#include <string.h>

#include "device.h"

static blip2_code device_open(const char *name, int index, int background, blip2_device *d, blip2_status *st) {
    memset(d, 0, sizeof *d);
    if (strcmp(name, "cuda") == 0) return blip2_device_open_cuda(index, background, d, st);
    if (strcmp(name, "cpu") != 0) return blip2_fail(st, BLIP2_EINVAL, "unknown device '%s' (cpu or cuda)", name);
    d->ops = &blip2_cpu_ops;
    strcpy(d->name, "cpu");
    return BLIP2_OK;
}

blip2_code blip2_device_open(const char *name, int index, blip2_device *d, blip2_status *st) {
    return device_open(name, index, 0, d, st);
}

blip2_code blip2_device_open_background(const char *name, int index, blip2_device *d, blip2_status *st) {
    return device_open(name, index, 1, d, st);
}

void blip2_device_close(blip2_device *d) {
    blip2_device_close_cuda(d);
    memset(d, 0, sizeof *d);
}

const blip2_ops *blip2_device_ops(const char *name) {
    return strcmp(name, "cpu") == 0 ? &blip2_cpu_ops : strcmp(name, "cuda") == 0 ? blip2_device_cuda_ops() : NULL;
}

/* The rank among the processes of this node: which GPU it drives. */
static int local_rank(const blip2_tp *tp) {
    const char *vars[] = {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"};
    for (size_t i = 0; i < sizeof vars / sizeof vars[0]; i++)
        if (getenv(vars[i])) return atoi(getenv(vars[i]));
    return tp->rank;
}

blip2_code blip2_device_open_tp(const char *name, blip2_tp *tp, blip2_device *d, blip2_comm **nccl, blip2_status *st) {
    *nccl = NULL;
    int n = blip2_device_count(), index = n > 0 ? local_rank(tp) % n : 0;
    blip2_code rc = blip2_device_open(name, index, d, st);
    if (rc || !d->ops->device || strcmp(tp->comm->backend, "mpi") != 0) return rc;
    rc = blip2_comm_nccl_create(tp->comm, nccl, st); /* NCCL even with one rank: the same path as with four */
    if (rc) {
        blip2_device_close(d);
        return rc;
    }
    d->host_comm = tp->comm;
    tp->comm = *nccl;
    return BLIP2_OK;
}

void blip2_device_close_tp(blip2_device *d, blip2_comm *nccl, blip2_tp *tp) {
    if (nccl) {
        tp->comm = d->host_comm;
        nccl->ops->free(nccl); /* leaves the host communicator it was built over */
    }
    blip2_device_close(d);
}
