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
    const char *backend; /* "self", "mpi", ... */
    void *impl;
};

/* One rank, no communication (collectives are identities). */
blip2_comm *blip2_comm_self(void);
/* MPI_COMM_WORLD when the process was started by mpirun (and MPI is compiled in), else self.
 * Initialises MPI on first use; blip2_comm_world_finalize() finalises it. */
blip2_comm *blip2_comm_world(blip2_status *st);
void blip2_comm_world_finalize(void);

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
