/* The in-process communicator (parallel/comm_inproc.c) with 1..4 ranks as threads, over the CPU
 * backend always and over the CUDA backend where the build has it and the machine has a GPU:
 *  - allreduce_sum of rank-dependent data (sizes 0, 1, 1000, 1<<20, and sizes growing and
 *    shrinking across calls, so the staging buffers are regrown and reused) equals the sum taken
 *    in rank order, bit for bit (integers: also the exact sum), on every rank;
 *  - broadcast from every root, allgather, 1000 barrier rounds that really hold every rank;
 *  - failing paths return a status on every rank instead of crashing or hanging (split, a bad
 *    broadcast root, ranks disagreeing on the all-reduce size), and the comm still works after;
 *  - blip2_comm_nccl_create fails cleanly without a CUDA context (or without NCCL in the build),
 *    and, with a GPU and NCCL, a 1-rank NCCL communicator all-reduces on the device. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../kernels/ops.h"
#include "../parallel/comm.h"
#include "check.h"
#ifdef BLIP2_HAVE_CUDA
#include "../kernels/cuda/context.h"
#endif

/* ------------------------------------------------------------------------------------------------
 * Per-thread checks: CHECK's counters are not thread-safe, so each rank counts its own and main
 * adds them up after the join. */
typedef struct {
    blip2_comm *comm;
    const blip2_ops *ops;
    int cuda;           /* create (and destroy) this thread's own CUDA context */
    atomic_int *shared; /* barrier test counter, one per world */
    int pass, fail;
} rank_arg;

#define TCHECK(a, cond, ...)                                                                          \
    do {                                                                                              \
        if (cond) {                                                                                   \
            (a)->pass++;                                                                              \
        } else {                                                                                      \
            (a)->fail++;                                                                              \
            char m_[2048];                                                                            \
            snprintf(m_, sizeof m_, __VA_ARGS__);                                                     \
            fprintf(stderr, "FAIL %s:%d: [%s rank %d/%d] %s: %s\n", __FILE__, __LINE__, (a)->ops->name, \
                    (a)->comm->rank, (a)->comm->world, #cond, m_);                                    \
        }                                                                                             \
    } while (0)

/* Rank r's element i: integers (exact sums) or fractions (rounding, so the order matters). */
static float value(int exact, int r, size_t i, unsigned seed) {
    uint32_t h = (uint32_t)i * 2654435761u ^ (uint32_t)(r + 1) * 0x9E3779B9u ^ seed * 0x85EBCA6Bu;
    h ^= h >> 15;
    h *= 0x2C1B3C6Du;
    h ^= h >> 12;
    if (exact) return (float)((int)(h % 2001u) - 1000);
    return ((float)(h >> 8) / 16777216.0f - 0.5f) * (float)(1 + r); /* [-0.5, 0.5)·(r+1) */
}

static uint64_t fnv1a(const void *p, size_t n) {
    const unsigned char *b = p;
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 1099511628211ull;
    return h;
}

/* One all-reduce of n floats; checks this rank's result against the in-order sum, and that every
 * rank got the same bits (hashes compared through allgather). */
static void check_allreduce(rank_arg *a, size_t n, int exact, unsigned seed) {
    blip2_comm *c = a->comm;
    const blip2_ops *ops = a->ops;
    blip2_status st = {0};
    size_t bytes = n * sizeof(float);
    float *host = malloc(bytes ? bytes : 1), *dev = ops->alloc(bytes ? bytes : 1);
    TCHECK(a, host && dev, "allocating %zu floats", n);
    if (!host || !dev) {
        free(host);
        ops->release(dev);
        return;
    }
    for (size_t i = 0; i < n; i++) host[i] = value(exact, c->rank, i, seed);
    if (n) ops->upload(dev, host, bytes);
    blip2_code rc = c->ops->allreduce_sum(c, dev, n, &st);
    TCHECK(a, rc == BLIP2_OK, "allreduce n=%zu: %s", n, st.msg);
    if (n) ops->download(host, dev, bytes);
    char err[256];
    TCHECK(a, ops->sync(err, sizeof err) == 0, "sync after allreduce n=%zu: %s", n, err);

    size_t wrong = 0, inexact = 0, first = 0;
    for (size_t i = 0; i < n; i++) {
        float want = value(exact, 0, i, seed);
        double sum = want;
        for (int r = 1; r < c->world; r++) {
            float v = value(exact, r, i, seed);
            want += v;
            sum += v;
        }
        if (memcmp(&want, &host[i], sizeof want)) {
            if (!wrong++) first = i;
        }
        if (exact && (double)host[i] != sum) inexact++;
    }
    TCHECK(a, wrong == 0, "allreduce n=%zu exact=%d: %zu elements differ from the in-order sum (first %zu: %g)", n,
           exact, wrong, first, n ? (double)host[first] : 0.0);
    if (exact) TCHECK(a, inexact == 0, "allreduce n=%zu: %zu elements differ from the exact sum", n, inexact);

    uint64_t mine = fnv1a(host, bytes), *all = calloc((size_t)c->world, sizeof *all);
    rc = c->ops->allgather(c, &mine, all, sizeof mine, &st);
    TCHECK(a, rc == BLIP2_OK, "allgather of hashes: %s", st.msg);
    int same = 1;
    for (int r = 0; r < c->world; r++) same &= all[r] == mine;
    TCHECK(a, same, "allreduce n=%zu: the ranks' results are not bit-identical", n);
    free(all);
    free(host);
    ops->release(dev);
}

static void test_allreduce(rank_arg *a) {
    unsigned seed = 1;
    const size_t sizes[] = {1, 1000, (size_t)1 << 20, 0, 7, 1000};
    for (size_t k = 0; k < sizeof sizes / sizeof *sizes; k++)
        for (int exact = 0; exact <= 1; exact++) check_allreduce(a, sizes[k], exact, seed++);
    /* growing across calls (the staging buffers grow several times), then small again */
    for (size_t n = 3; n < 300000; n = n * 5 + 1) check_allreduce(a, n, n & 1, seed++);
    for (size_t n = 100000; n > 0; n /= 10) check_allreduce(a, n, 0, seed++);
    /* a buffer all-reduced many times in a row (the usual decode pattern) */
    for (int k = 0; k < 50; k++) check_allreduce(a, 4096, 0, seed++);
}

/* All-reduces back to back, nothing in between but the upload of the next input, so a rank that
 * refilled its slot while a peer still summed the previous round would show. */
static void test_back_to_back(rank_arg *a) {
    enum { ROUNDS = 64, N = 16384 };
    blip2_comm *c = a->comm;
    const blip2_ops *ops = a->ops;
    blip2_status st = {0};
    float *in = malloc(sizeof(float) * ROUNDS * N), *out = malloc(sizeof(float) * ROUNDS * N);
    float *dev = ops->alloc(sizeof(float) * N);
    for (size_t k = 0; k < ROUNDS; k++)
        for (size_t i = 0; i < N; i++) in[k * N + i] = value(0, c->rank, i, 1000 + (unsigned)k);
    int failed = 0;
    for (size_t k = 0; k < ROUNDS; k++) {
        ops->upload(dev, in + k * N, sizeof(float) * N);
        failed += c->ops->allreduce_sum(c, dev, N, &st) != BLIP2_OK;
        ops->download(out + k * N, dev, sizeof(float) * N);
    }
    TCHECK(a, failed == 0, "back-to-back all-reduces failed %d times: %s", failed, st.msg);
    size_t wrong = 0;
    for (size_t k = 0; k < ROUNDS; k++)
        for (size_t i = 0; i < N; i++) {
            float want = value(0, 0, i, 1000 + (unsigned)k);
            for (int r = 1; r < c->world; r++) want += value(0, r, i, 1000 + (unsigned)k);
            wrong += memcmp(&want, &out[k * N + i], sizeof want) != 0;
        }
    TCHECK(a, wrong == 0, "back-to-back all-reduces: %zu of %d elements wrong", wrong, ROUNDS * N);
    ops->release(dev);
    free(in);
    free(out);
}

static void test_broadcast(rank_arg *a) {
    blip2_comm *c = a->comm;
    blip2_status st = {0};
    for (int root = 0; root < c->world; root++) {
        for (size_t bytes = 0; bytes <= 4096; bytes = bytes ? bytes * 8 : 1) {
            unsigned char *buf = malloc(bytes + 1);
            for (size_t i = 0; i <= bytes; i++)
                buf[i] = c->rank == root ? (unsigned char)(i * 7 + root) : (unsigned char)(0xA0 + c->rank);
            blip2_code rc = c->ops->broadcast(c, buf, bytes, root, &st);
            TCHECK(a, rc == BLIP2_OK, "broadcast root %d, %zu bytes: %s", root, bytes, st.msg);
            size_t bad = 0;
            for (size_t i = 0; i < bytes; i++) bad += buf[i] != (unsigned char)(i * 7 + root);
            TCHECK(a, bad == 0, "broadcast root %d, %zu bytes: %zu bytes wrong", root, bytes, bad);
            unsigned char tail = c->rank == root ? (unsigned char)(bytes * 7 + root) : (unsigned char)(0xA0 + c->rank);
            TCHECK(a, buf[bytes] == tail, "broadcast root %d wrote past %zu bytes", root, bytes);
            free(buf);
        }
    }
}

static void test_allgather(rank_arg *a) {
    blip2_comm *c = a->comm;
    blip2_status st = {0};
    for (size_t bytes = 1; bytes <= 5000; bytes = bytes * 3 + 2) {
        unsigned char *send = malloc(bytes), *recv = malloc(bytes * (size_t)c->world + 1);
        for (size_t i = 0; i < bytes; i++) send[i] = (unsigned char)(i * 13 + c->rank * 101);
        memset(recv, 0xEE, bytes * (size_t)c->world + 1);
        blip2_code rc = c->ops->allgather(c, send, recv, bytes, &st);
        TCHECK(a, rc == BLIP2_OK, "allgather %zu bytes: %s", bytes, st.msg);
        size_t bad = 0;
        for (int r = 0; r < c->world; r++)
            for (size_t i = 0; i < bytes; i++) bad += recv[(size_t)r * bytes + i] != (unsigned char)(i * 13 + r * 101);
        TCHECK(a, bad == 0, "allgather %zu bytes: %zu bytes wrong", bytes, bad);
        TCHECK(a, recv[bytes * (size_t)c->world] == 0xEE, "allgather %zu bytes wrote past the end", bytes);
        free(send);
        free(recv);
    }
}

/* Each round: everyone increments, barrier, everyone must see all increments of the round (and no
 * more: nobody can start the next round before the second barrier). */
static void test_barrier(rank_arg *a) {
    blip2_comm *c = a->comm;
    blip2_status st = {0};
    int wrong = 0, failed = 0;
    for (int k = 0; k < 1000; k++) {
        atomic_fetch_add(a->shared, 1);
        failed += c->ops->barrier(c, &st) != BLIP2_OK;
        int seen = atomic_load(a->shared);
        if (seen != (k + 1) * c->world) wrong++;
        failed += c->ops->barrier(c, &st) != BLIP2_OK;
    }
    TCHECK(a, failed == 0, "barrier failed %d times: %s", failed, st.msg);
    TCHECK(a, wrong == 0, "barrier let a rank through early in %d of 1000 rounds", wrong);
}

static void test_failures(rank_arg *a) {
    blip2_comm *c = a->comm;
    blip2_status st = {0};
    static blip2_comm sentinel;
    blip2_comm *sub = &sentinel; /* must come back NULL */
    blip2_code rc = c->ops->split(c, 0, c->rank, &sub, &st);
    TCHECK(a, rc == BLIP2_EINTERNAL && sub == NULL, "split: rc %d", (int)rc);
    TCHECK(a, strstr(st.msg, "not supported by the in-process communicator") != NULL, "split message '%s'", st.msg);

    char b[8] = {0};
    rc = c->ops->broadcast(c, b, sizeof b, c->world, &st);
    TCHECK(a, rc != BLIP2_OK && st.msg[0], "broadcast from rank %d of %d: rc %d", c->world, c->world, (int)rc);
    rc = c->ops->broadcast(c, b, sizeof b, -1, &st);
    TCHECK(a, rc != BLIP2_OK, "broadcast from rank -1: rc %d", (int)rc);

    if (c->world > 1) {
        /* the ranks disagree on the size: every rank fails, none is left waiting */
        size_t n = 100 + (size_t)c->rank;
        float *buf = a->ops->alloc(n * sizeof(float));
        a->ops->zero(buf, n * sizeof(float));
        memset(&st, 0, sizeof st);
        rc = c->ops->allreduce_sum(c, buf, n, &st);
        TCHECK(a, rc == BLIP2_EINTERNAL, "allreduce with mismatched sizes: rc %d", (int)rc);
        TCHECK(a, strstr(st.msg, "disagree") != NULL, "mismatch message '%s'", st.msg);
        a->ops->release(buf);
        /* ... and the broadcast size likewise */
        char big[16] = {0};
        rc = c->ops->broadcast(c, big, c->rank == 0 ? 16 : 8, 0, &st);
        TCHECK(a, rc == BLIP2_EINTERNAL, "broadcast with mismatched sizes: rc %d", (int)rc);
    }
    check_allreduce(a, 333, 1, 99); /* still works */
}

static void *rank_main(void *p) {
    rank_arg *a = p;
#ifdef BLIP2_HAVE_CUDA
    blip2_cuda_ctx *ctx = NULL;
    if (a->cuda) {
        char err[256];
        ctx = blip2_cuda_ctx_create(0, err, sizeof err);
        TCHECK(a, ctx != NULL, "rank thread's CUDA context: %s", err);
        if (!ctx) {
            a->comm->ops->abort(a->comm, 1); /* peers would wait for us forever */
            return NULL;
        }
    }
#endif
    test_allreduce(a);
    test_back_to_back(a);
    test_broadcast(a);
    test_allgather(a);
    test_barrier(a);
    test_failures(a);
    a->comm->ops->free(a->comm); /* releases the staging on this thread (its CUDA context) */
#ifdef BLIP2_HAVE_CUDA
    if (ctx) blip2_cuda_ctx_destroy(ctx);
#endif
    return NULL;
}

static void run_world(const blip2_ops *ops, int world, int cuda) {
    blip2_comm *comms[4];
    blip2_status st = {0};
    blip2_code rc = blip2_comm_inproc_create(world, ops, comms, &st);
    CHECK(rc == BLIP2_OK, "inproc create world %d over %s: %s", world, ops->name, st.msg);
    if (rc) return;
    for (int r = 0; r < world; r++) {
        CHECK(comms[r]->rank == r && comms[r]->world == world, "comm %d: rank %d world %d", r, comms[r]->rank,
              comms[r]->world);
        CHECK(strcmp(comms[r]->backend, "inproc") == 0, "backend '%s'", comms[r]->backend);
        CHECK(comms[r]->device_memory == ops->device, "device_memory %d", comms[r]->device_memory);
    }
    atomic_int counter = 0;
    rank_arg args[4];
    pthread_t th[4];
    for (int r = 0; r < world; r++) {
        args[r] = (rank_arg){.comm = comms[r], .ops = ops, .cuda = cuda, .shared = &counter};
        CHECK(pthread_create(&th[r], NULL, rank_main, &args[r]) == 0, "pthread_create");
    }
    int pass = 0, fail = 0;
    for (int r = 0; r < world; r++) {
        pthread_join(th[r], NULL);
        pass += args[r].pass;
        fail += args[r].fail;
    }
    check_pass_count += pass;
    check_fail_count += fail;
    printf("%s: inproc world %d: %d checks, %d failed\n", ops->name, world, pass + fail, fail);
}

static void test_create_errors(void) {
    blip2_comm *comms[2];
    blip2_status st = {0};
    CHECK(blip2_comm_inproc_create(0, &blip2_cpu_ops, comms, &st) == BLIP2_EINVAL, "world 0 accepted");
    CHECK_MSG_HAS(st.msg, "world size 0");
    CHECK(blip2_comm_inproc_create(2, NULL, comms, &st) == BLIP2_EINVAL, "NULL ops accepted");
    /* no CUDA context is current on this thread (or no NCCL in the build): a status, not a crash */
    static blip2_comm sentinel;
    blip2_comm *nc = &sentinel;
    memset(&st, 0, sizeof st);
    blip2_code rc = blip2_comm_nccl_create(blip2_comm_self(), &nc, &st);
    CHECK(rc != BLIP2_OK && nc == NULL && st.msg[0], "nccl create without a CUDA context: rc %d '%s'", (int)rc, st.msg);
}

#ifdef BLIP2_HAVE_CUDA
/* A 1-rank NCCL communicator over the self communicator: the all-reduce is an identity that runs
 * through ncclAllReduce on this thread's stream. */
static void test_nccl_self(void) {
    blip2_comm *nc = NULL;
    blip2_status st = {0};
    blip2_code rc = blip2_comm_nccl_create(blip2_comm_self(), &nc, &st);
    if (rc && strstr(st.msg, "not compiled")) {
        printf("nccl: skipped: %s\n", st.msg);
        return;
    }
    CHECK(rc == BLIP2_OK, "nccl create over self: %s", st.msg);
    if (rc) return;
    CHECK(strcmp(nc->backend, "nccl") == 0 && nc->device_memory == 1 && nc->world == 1, "nccl comm fields");
    size_t n = 12345;
    float *h = malloc(n * sizeof(float)), *d = blip2_cuda_ops.alloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) h[i] = value(0, 0, i, 7);
    blip2_cuda_ops.upload(d, h, n * sizeof(float));
    rc = nc->ops->allreduce_sum(nc, d, n, &st);
    CHECK(rc == BLIP2_OK, "nccl allreduce: %s", st.msg);
    blip2_cuda_ops.download(h, d, n * sizeof(float));
    size_t bad = 0;
    for (size_t i = 0; i < n; i++) {
        float want = value(0, 0, i, 7);
        bad += memcmp(&want, &h[i], sizeof want) != 0;
    }
    CHECK(bad == 0, "nccl 1-rank allreduce changed %zu elements", bad);
    char err[256];
    CHECK(blip2_cuda_ops.sync(err, sizeof err) == 0, "sync: %s", err);
    int x = 5;
    CHECK(nc->ops->broadcast(nc, &x, sizeof x, 0, &st) == BLIP2_OK && x == 5, "nccl broadcast: %s", st.msg);
    CHECK(nc->ops->barrier(nc, &st) == BLIP2_OK, "nccl barrier: %s", st.msg);
    blip2_cuda_ops.release(d);
    free(h);
    nc->ops->free(nc);
    printf("nccl: 1-rank communicator ok\n");
}
#endif

int main(void) {
    test_create_errors();
    for (int world = 1; world <= 4; world++) run_world(&blip2_cpu_ops, world, 0);
#ifdef BLIP2_HAVE_CUDA
    char err[512] = {0};
    blip2_cuda_ctx *ctx = blip2_cuda_ctx_create(0, err, sizeof err);
    if (!ctx) {
        printf("cuda: skipped: no GPU (%s)\n", err);
    } else {
        test_nccl_self();
        for (int world = 1; world <= 4; world++) run_world(&blip2_cuda_ops, world, 1);
        blip2_cuda_ctx_destroy(ctx);
    }
#endif
    return check_summary();
}
