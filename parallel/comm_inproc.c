/* In-process communicator: `world` ranks that are threads of this process (tensor-parallel shards
 * on one machine, e.g. N shards on one GPU). Everything the ranks share lives in one block behind
 * a mutex: a reusable barrier (generation counter, so any number of rounds), the pointers the
 * control plane publishes, and each rank's staging buffer for the data plane.
 *
 * allreduce_sum(buf, n) on rank r:
 *   copy buf into r's own staging buffer (backend memory, grown by r with ops->alloc), ops->sync,
 *   barrier; then buf = slot[0] + slot[1] + ... + slot[world-1], summed in that order by every
 *   rank (ops->copy, then ops->residual_add), so all ranks get bit-identical results; ops->sync,
 *   barrier (nobody refills a slot while another rank still reads it).
 * A rank that fails (staging allocation, ops->sync, ranks disagreeing on n) still goes through the
 * first barrier, which also tells every rank the lowest failing rank, so all of them return an
 * error from the same call and none is left waiting.
 *
 * Every backend call happens on the calling rank's thread (on the CUDA backend each thread has
 * made its own context current; that is the caller's job), so free each comm on its rank's
 * thread too: it releases that rank's staging buffer through ops. */
#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../kernels/ops.h"
#include "comm.h"

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int world;
    int refs;          /* communicators not yet freed */
    int arrived;       /* ranks inside the current barrier round */
    unsigned long gen; /* barrier rounds completed */
    /* what the ranks of the current round bring, and the verdict of the round just completed */
    int fail_acc, fail_out; /* lowest failing rank (INT_MAX / -1: none) */
    size_t a_first, b_first;
    int differ_acc, differ_out; /* some rank brought other (a, b) than the first arrival */
    const blip2_ops *ops;
    const void **ptrs; /* control plane: what each rank publishes for the current collective */
    float **slots;     /* data plane: each rank's staging buffer for the current all-reduce */
} inproc_shared;

typedef struct {
    inproc_shared *sh;
    float *staging; /* this rank's, in backend memory */
    size_t cap;     /* floats */
} inproc_impl;

static inproc_impl *impl_of(blip2_comm *c) { return c->impl; }

typedef struct {
    int failed_rank; /* lowest rank that arrived failing, or -1 */
    int differ;      /* the ranks brought different (a, b): a caller bug, every rank fails */
} agreement;

/* Waits until all ranks arrive. `failed` (0/1) is this rank's verdict and (a, b) the arguments all
 * ranks must agree on (sizes, root). The mutex orders everything written before the barrier on any
 * rank before everything read after it on any rank. A rank that has returned cannot complete the
 * next round before every other rank has left this one, so the verdict stays valid for the ranks
 * still waking up. */
static agreement barrier_agree(inproc_shared *sh, int rank, int failed, size_t a, size_t b) {
    pthread_mutex_lock(&sh->mu);
    if (failed && rank < sh->fail_acc) sh->fail_acc = rank;
    if (sh->arrived == 0) {
        sh->a_first = a;
        sh->b_first = b;
    } else if (a != sh->a_first || b != sh->b_first) {
        sh->differ_acc = 1;
    }
    if (++sh->arrived == sh->world) {
        sh->fail_out = sh->fail_acc == INT_MAX ? -1 : sh->fail_acc;
        sh->differ_out = sh->differ_acc;
        sh->fail_acc = INT_MAX;
        sh->differ_acc = 0;
        sh->arrived = 0;
        sh->gen++;
        pthread_cond_broadcast(&sh->cv);
    } else {
        unsigned long gen = sh->gen;
        while (sh->gen == gen) pthread_cond_wait(&sh->cv, &sh->mu);
    }
    agreement out = {sh->fail_out, sh->differ_out};
    pthread_mutex_unlock(&sh->mu);
    return out;
}

static void barrier_wait(inproc_shared *sh, int rank) { (void)barrier_agree(sh, rank, 0, 0, 0); }

/* The status every rank returns after a round that went wrong somewhere (rc: this rank's own). */
static blip2_code agreed_failure(agreement ag, blip2_code rc, const char *what, blip2_comm *c, size_t a,
                                 blip2_status *st) {
    if (rc) return rc;
    if (ag.failed_rank >= 0) return blip2_fail(st, BLIP2_EINTERNAL, "in-process %s: rank %d failed", what, ag.failed_rank);
    return blip2_fail(st, BLIP2_EINTERNAL, "in-process %s: the ranks disagree on the arguments (rank %d: size %zu)",
                      what, c->rank, a);
}

/* ops->sync as a status; 0 when the queued work finished without error. */
static blip2_code sync_status(const blip2_ops *ops, int rank, const char *what, blip2_status *st) {
    char err[512] = {0};
    if (!ops->sync(err, sizeof err)) return BLIP2_OK;
    err[sizeof err - 1] = 0;
    return blip2_fail(st, BLIP2_EINTERNAL, "in-process all-reduce, rank %d, %s: %s", rank, what,
                      err[0] ? err : "backend error");
}

/* Makes this rank's staging hold n floats (the old one is released first: its contents are not
 * needed, and the peak stays at one buffer). */
static blip2_code ensure_staging(blip2_comm *c, size_t n, blip2_status *st) {
    inproc_impl *im = impl_of(c);
    if (n <= im->cap) return BLIP2_OK;
    if (n > SIZE_MAX / sizeof(float) / 2)
        return blip2_fail(st, BLIP2_EINVAL, "in-process all-reduce of %zu floats is too large", n);
    size_t cap = im->cap + im->cap / 2; /* grow geometrically when sizes creep up */
    if (cap < n) cap = n;
    cap = (cap + 1023) / 1024 * 1024;
    const blip2_ops *ops = im->sh->ops;
    ops->release(im->staging);
    im->staging = NULL;
    im->cap = 0;
    im->staging = ops->alloc(cap * sizeof(float));
    if (!im->staging)
        return blip2_fail(st, BLIP2_ENOMEM, "in-process all-reduce, rank %d: out of %s memory allocating %zu bytes",
                          c->rank, ops->name ? ops->name : "backend", cap * sizeof(float));
    im->cap = cap;
    return BLIP2_OK;
}

static blip2_code inproc_allreduce(blip2_comm *c, float *buf, size_t n, blip2_status *st) {
    if (c->world == 1) return BLIP2_OK;
    inproc_impl *im = impl_of(c);
    inproc_shared *sh = im->sh;
    const blip2_ops *ops = sh->ops;
    const int me = c->rank;

    /* Phase 1: my contribution into my slot. */
    blip2_code rc = ensure_staging(c, n, st);
    if (!rc && n) {
        ops->copy(im->staging, buf, n * sizeof(float));
        rc = sync_status(ops, me, "staging copy", st);
    }
    sh->slots[me] = im->staging;
    agreement ag = barrier_agree(sh, me, rc != BLIP2_OK, n, 0);
    if (ag.failed_rank >= 0 || ag.differ) return agreed_failure(ag, rc, "all-reduce", c, n, st);

    /* Phase 2: everyone sums the slots in the same order. */
    if (n) {
        ops->copy(buf, sh->slots[0], n * sizeof(float));
        for (int r = 1; r < c->world; r++) ops->residual_add(buf, sh->slots[r], n);
        rc = sync_status(ops, me, "sum", st);
    }
    ag = barrier_agree(sh, me, rc != BLIP2_OK, n, 0); /* nobody refills a slot another rank still reads */
    if (ag.failed_rank >= 0) return agreed_failure(ag, rc, "all-reduce", c, n, st);
    return BLIP2_OK;
}

static blip2_code inproc_broadcast(blip2_comm *c, void *buf, size_t bytes, int root, blip2_status *st) {
    if (root < 0 || root >= c->world)
        return blip2_fail(st, BLIP2_EINTERNAL, "broadcast from rank %d in a %d-rank group", root, c->world);
    if (c->world == 1) return BLIP2_OK;
    inproc_shared *sh = impl_of(c)->sh;
    if (c->rank == root) sh->ptrs[root] = buf;
    agreement ag = barrier_agree(sh, c->rank, 0, bytes, (size_t)root);
    if (ag.differ) return agreed_failure(ag, BLIP2_OK, "broadcast", c, bytes, st);
    if (c->rank != root && bytes) memcpy(buf, sh->ptrs[root], bytes);
    barrier_wait(sh, c->rank); /* the root's buffer stays untouched until everyone has copied it */
    return BLIP2_OK;
}

static blip2_code inproc_allgather(blip2_comm *c, const void *send, void *recv, size_t bytes, blip2_status *st) {
    inproc_shared *sh = impl_of(c)->sh;
    if (c->world == 1) {
        if (bytes && send != recv) memmove(recv, send, bytes);
        return BLIP2_OK;
    }
    sh->ptrs[c->rank] = send;
    agreement ag = barrier_agree(sh, c->rank, 0, bytes, 0);
    if (ag.differ) return agreed_failure(ag, BLIP2_OK, "allgather", c, bytes, st);
    for (int r = 0; r < c->world; r++) {
        char *dst = (char *)recv + (size_t)r * bytes;
        if (bytes && dst != (const char *)sh->ptrs[r]) memcpy(dst, sh->ptrs[r], bytes);
    }
    barrier_wait(sh, c->rank); /* every send buffer stays untouched until everyone has copied it */
    return BLIP2_OK;
}

static blip2_code inproc_barrier(blip2_comm *c, blip2_status *st) {
    (void)st;
    if (c->world > 1) barrier_wait(impl_of(c)->sh, c->rank);
    return BLIP2_OK;
}

static blip2_code inproc_split(blip2_comm *c, int color, int key, blip2_comm **out, blip2_status *st) {
    (void)c, (void)color, (void)key;
    if (out) *out = NULL;
    return blip2_fail(st, BLIP2_EINTERNAL, "split is not supported by the in-process communicator");
}

static void shared_free(inproc_shared *sh) {
    pthread_cond_destroy(&sh->cv);
    pthread_mutex_destroy(&sh->mu);
    free(sh->ptrs);
    free(sh->slots);
    free(sh);
}

static void inproc_free(blip2_comm *c) {
    if (!c) return;
    inproc_impl *im = impl_of(c);
    inproc_shared *sh = im->sh;
    sh->ops->release(im->staging);
    pthread_mutex_lock(&sh->mu);
    int last = --sh->refs == 0;
    pthread_mutex_unlock(&sh->mu);
    if (last) shared_free(sh);
    free(im);
    free(c);
}

static void inproc_abort(blip2_comm *c, int code) {
    fprintf(stderr, "blip2: in-process communicator: rank %d of %d aborts the process (code %d)\n", c->rank, c->world,
            code);
    fflush(stderr);
    exit(code);
}

static const blip2_comm_ops inproc_ops = {inproc_allreduce, inproc_broadcast, inproc_allgather, inproc_barrier,
                                          inproc_split,     inproc_free,      inproc_abort};

blip2_code blip2_comm_inproc_create(int world, const struct blip2_ops *ops, blip2_comm **out, blip2_status *st) {
    if (!out) return blip2_fail(st, BLIP2_EINVAL, "in-process communicator: no output array");
    if (world < 1) return blip2_fail(st, BLIP2_EINVAL, "in-process communicator: world size %d (need >= 1)", world);
    if (!ops || !ops->alloc || !ops->release || !ops->copy || !ops->sync || !ops->residual_add)
        return blip2_fail(st, BLIP2_EINVAL, "in-process communicator: backend lacks alloc/release/copy/sync/residual_add");
    for (int r = 0; r < world; r++) out[r] = NULL;

    inproc_shared *sh = calloc(1, sizeof *sh);
    if (!sh) return blip2_fail(st, BLIP2_ENOMEM, "out of memory");
    if (pthread_mutex_init(&sh->mu, NULL)) {
        free(sh);
        return blip2_fail(st, BLIP2_EINTERNAL, "in-process communicator: pthread_mutex_init failed");
    }
    if (pthread_cond_init(&sh->cv, NULL)) {
        pthread_mutex_destroy(&sh->mu);
        free(sh);
        return blip2_fail(st, BLIP2_EINTERNAL, "in-process communicator: pthread_cond_init failed");
    }
    sh->world = world;
    sh->fail_acc = INT_MAX;
    sh->fail_out = -1;
    sh->ops = ops;
    sh->ptrs = calloc((size_t)world, sizeof *sh->ptrs);
    sh->slots = calloc((size_t)world, sizeof *sh->slots);
    if (!sh->ptrs || !sh->slots) {
        shared_free(sh);
        return blip2_fail(st, BLIP2_ENOMEM, "out of memory");
    }
    for (int r = 0; r < world; r++) {
        blip2_comm *c = calloc(1, sizeof *c);
        inproc_impl *im = calloc(1, sizeof *im);
        if (!c || !im) {
            free(c);
            free(im);
            for (int q = 0; q < r; q++) {
                free(out[q]->impl);
                free(out[q]);
                out[q] = NULL;
            }
            shared_free(sh);
            return blip2_fail(st, BLIP2_ENOMEM, "out of memory");
        }
        im->sh = sh;
        c->ops = &inproc_ops;
        c->rank = r;
        c->world = world;
        c->backend = "inproc";
        c->device_memory = ops->device;
        c->impl = im;
        out[r] = c;
    }
    sh->refs = world;
    return BLIP2_OK;
}
