/* The communicator: the few collectives tensor parallelism needs, behind one interface.
 * Backends: self (one rank, no MPI), MPI (host memory), later NCCL (device memory, bootstrapped
 * over MPI) and in-process (N shards on one device). A failing collective returns a status; the
 * MPI backend's errors are fatal for the whole job (MPI_ERRORS_ARE_FATAL), so a dead peer stops
 * every rank instead of leaving them waiting. */
#ifndef BLIP2_COMM_H
#define BLIP2_COMM_H

#include <stddef.h>

#include "../runtime/status.h"

typedef struct blip2_comm blip2_comm;

/* Two planes: allreduce_sum works on activation buffers of the backend the model runs on (host
 * memory for the CPU, device memory for NCCL and for the in-process communicator over the CUDA
 * backend); broadcast, allgather and barrier always work on host memory (step descriptors,
 * picked ids, error agreement). */
typedef struct {
    blip2_code (*allreduce_sum)(blip2_comm *c, float *buf, size_t n, blip2_status *st);
    blip2_code (*broadcast)(blip2_comm *c, void *buf, size_t bytes, int root, blip2_status *st);
    /* recv holds world × bytes: rank r's send lands at recv + r·bytes */
    blip2_code (*allgather)(blip2_comm *c, const void *send, void *recv, size_t bytes, blip2_status *st);
    blip2_code (*barrier)(blip2_comm *c, blip2_status *st);
    /* New communicator of the ranks with the same color, ordered by key (MPI_Comm_split). */
    blip2_code (*split)(blip2_comm *c, int color, int key, blip2_comm **out, blip2_status *st);
    void (*free)(blip2_comm *c);
    /* Stops every rank of the job (after an error that leaves peers inside a collective). */
    void (*abort)(blip2_comm *c, int code);
} blip2_comm_ops;

struct blip2_comm {
    const blip2_comm_ops *ops;
    int rank, world;
    const char *backend; /* "self", "mpi", "inproc", "nccl" */
    int device_memory;   /* 1: allreduce_sum takes device pointers */
    int graph_safe;      /* 1: allreduce_sum only queues work on the calling thread's stream (NCCL),
                            so a step that uses it may be recorded as a CUDA graph */
    void *impl;
};

/* One rank, no communication (collectives are identities). */
blip2_comm *blip2_comm_self(void);
/* MPI_COMM_WORLD when the process was started by mpirun (and MPI is compiled in), else self.
 * Initialises MPI on first use; blip2_comm_world_finalize() finalises it. */
blip2_comm *blip2_comm_world(blip2_status *st);
void blip2_comm_world_finalize(void);

struct blip2_ops;
/* In-process tensor parallelism: `world` communicators (out[r] for rank r) for shards running as
 * threads of one process, each thread using its own comm. The data plane goes through `ops`
 * (copy into a shared staging area, then each rank sums the slots with ops->residual_add), so the
 * same code serves host buffers (the CPU backend, tested in CI) and N shards on one GPU (the CUDA
 * backend: every thread must have made its own CUDA context current). The control plane is
 * shared host memory and a barrier. Free each with ops->free. */
blip2_code blip2_comm_inproc_create(int world, const struct blip2_ops *ops, blip2_comm **out, blip2_status *st);

/* NCCL over the ranks of `host` (normally MPI world): the unique id goes out through host's
 * broadcast; allreduce_sum runs ncclAllReduce on the current CUDA context's stream (device
 * memory), the control plane stays on `host` (which stays the caller's: free it after this one). Only in builds with
 * CUDA and MPI; elsewhere it fails with a clear message. */
blip2_code blip2_comm_nccl_create(blip2_comm *host, blip2_comm **out, blip2_status *st);

/* The tensor-parallel context, passed explicitly to everything that runs a shard. stream is the
 * device stream of GPU backends (NULL on the CPU). */
typedef struct {
    int rank, world;
    blip2_comm *comm;
    void *stream;
} blip2_tp;

blip2_tp blip2_tp_from_comm(blip2_comm *comm);

/* [begin, end) of rank's part when n items are split over world ranks (sizes differ by ≤ 1). */
static inline size_t blip2_part_begin(size_t n, int rank, int world) { return n * (size_t)rank / (size_t)world; }
static inline size_t blip2_part_size(size_t n, int rank, int world) {
    return blip2_part_begin(n, rank + 1, world) - blip2_part_begin(n, rank, world);
}

/* Makes every rank agree on the outcome of a step that may have failed on some of them:
 * returns BLIP2_OK everywhere, or on every rank the lowest failing rank's code and message
 * ("rank R: ..."). A collective: all ranks must call it. */
blip2_code blip2_tp_agree(const blip2_tp *tp, blip2_code rc, blip2_status *st);

#endif
