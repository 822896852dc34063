/* MPI communicator (host memory). Compiled when BLIP2_MPI is on; MPI_ERRORS_ARE_FATAL stays in
 * force, so a peer that died or failed makes mpirun stop the whole job. */
#include <mpi.h>
#include <stdlib.h>
#include <string.h>

#include "comm.h"

typedef struct {
    MPI_Comm comm;
    int owned; /* split communicators are freed; MPI_COMM_WORLD is not */
} mpi_impl;

static MPI_Comm mpi_of(blip2_comm *c) { return ((mpi_impl *)c->impl)->comm; }

static blip2_code mpi_check(int err, const char *what, blip2_status *st) {
    if (err == MPI_SUCCESS) return BLIP2_OK;
    char s[MPI_MAX_ERROR_STRING];
    int n = 0;
    MPI_Error_string(err, s, &n);
    return blip2_fail(st, BLIP2_EINTERNAL, "MPI %s failed: %s", what, s);
}

/* MPI counts are int: large messages go in chunks. */
#define MPI_CHUNK ((size_t)1 << 28)

static blip2_code mpi_allreduce(blip2_comm *c, float *buf, size_t n, blip2_status *st) {
    for (size_t off = 0; off < n; off += MPI_CHUNK) {
        int k = (int)(n - off < MPI_CHUNK ? n - off : MPI_CHUNK);
        blip2_code rc = mpi_check(MPI_Allreduce(MPI_IN_PLACE, buf + off, k, MPI_FLOAT, MPI_SUM, mpi_of(c)), "allreduce", st);
        if (rc) return rc;
    }
    return BLIP2_OK;
}

static blip2_code mpi_broadcast(blip2_comm *c, void *buf, size_t bytes, int root, blip2_status *st) {
    for (size_t off = 0; off < bytes; off += MPI_CHUNK) {
        int k = (int)(bytes - off < MPI_CHUNK ? bytes - off : MPI_CHUNK);
        blip2_code rc = mpi_check(MPI_Bcast((char *)buf + off, k, MPI_BYTE, root, mpi_of(c)), "broadcast", st);
        if (rc) return rc;
    }
    return BLIP2_OK;
}

static blip2_code mpi_allgather(blip2_comm *c, const void *send, void *recv, size_t bytes, blip2_status *st) {
    if (bytes > MPI_CHUNK) return blip2_fail(st, BLIP2_EINTERNAL, "allgather of %zu bytes per rank is too large", bytes);
    return mpi_check(MPI_Allgather(send, (int)bytes, MPI_BYTE, recv, (int)bytes, MPI_BYTE, mpi_of(c)), "allgather", st);
}

static blip2_code mpi_barrier(blip2_comm *c, blip2_status *st) { return mpi_check(MPI_Barrier(mpi_of(c)), "barrier", st); }

static const blip2_comm_ops mpi_ops;

static blip2_comm *mpi_wrap(MPI_Comm comm, int owned) {
    blip2_comm *c = calloc(1, sizeof *c);
    mpi_impl *impl = calloc(1, sizeof *impl);
    if (!c || !impl) {
        free(c);
        free(impl);
        return NULL;
    }
    impl->comm = comm;
    impl->owned = owned;
    MPI_Comm_rank(comm, &c->rank);
    MPI_Comm_size(comm, &c->world);
    c->ops = &mpi_ops;
    c->backend = "mpi";
    c->impl = impl;
    return c;
}

static blip2_code mpi_split(blip2_comm *c, int color, int key, blip2_comm **out, blip2_status *st) {
    MPI_Comm sub;
    blip2_code rc = mpi_check(MPI_Comm_split(mpi_of(c), color, key, &sub), "comm split", st);
    if (rc) return rc;
    *out = mpi_wrap(sub, 1);
    return *out ? BLIP2_OK : blip2_fail(st, BLIP2_ENOMEM, "out of memory");
}

static void mpi_free(blip2_comm *c) {
    mpi_impl *impl = c->impl;
    if (impl->owned) MPI_Comm_free(&impl->comm);
    free(impl);
    free(c);
}

static void mpi_abort(blip2_comm *c, int code) { MPI_Abort(mpi_of(c), code); }

static const blip2_comm_ops mpi_ops = {mpi_allreduce, mpi_broadcast, mpi_allgather, mpi_barrier,
                                       mpi_split,     mpi_free,      mpi_abort};

static blip2_comm *world;

/* Started by mpirun (Open MPI, PMIx or a PMI launcher)? A plain process stays MPI-free. */
static int launched_by_mpi(void) {
    return getenv("OMPI_COMM_WORLD_SIZE") || getenv("PMIX_RANK") || getenv("PMI_RANK") || getenv("PMI_SIZE");
}

blip2_comm *blip2_comm_world(blip2_status *st) {
    if (world) return world;
    if (!launched_by_mpi()) return world = blip2_comm_self();
    int provided;
    if (MPI_Init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS) {
        blip2_fail(st, BLIP2_EINTERNAL, "MPI_Init_thread failed");
        return NULL;
    }
    world = mpi_wrap(MPI_COMM_WORLD, 0);
    if (!world) blip2_fail(st, BLIP2_ENOMEM, "out of memory");
    return world;
}

void blip2_comm_world_finalize(void) {
    if (world && world->impl) {
        mpi_free(world);
        MPI_Finalize();
    }
    world = NULL;
}
