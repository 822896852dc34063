/* Tensor-parallel benchmark (run under mpirun): all-reduce bus bandwidth at the message sizes the
 * model sends (nccl-tests' definition: busbw = bytes / time · 2(n−1)/n), and, with --model, the
 * decode step time of the sharded OPT with the share of it spent inside all-reduces.
 *   mpirun -np 2 build/bench/bench_tp [--model DIR] [--steps N] [--batch B] */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../parallel/comm.h"
#include "engine.h"
#include "forward.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* A communicator that forwards to another and times its all-reduces. */
static blip2_comm *inner;
static double allreduce_s;
static long allreduce_calls;

static blip2_code timed_allreduce(blip2_comm *c, float *buf, size_t n, blip2_status *st) {
    (void)c;
    double t0 = now_s();
    blip2_code rc = inner->ops->allreduce_sum(inner, buf, n, st);
    allreduce_s += now_s() - t0;
    allreduce_calls++;
    return rc;
}
static blip2_code fwd_broadcast(blip2_comm *c, void *b, size_t n, int root, blip2_status *st) {
    (void)c;
    return inner->ops->broadcast(inner, b, n, root, st);
}
static blip2_code fwd_allgather(blip2_comm *c, const void *s, void *r, size_t n, blip2_status *st) {
    (void)c;
    return inner->ops->allgather(inner, s, r, n, st);
}
static blip2_code fwd_barrier(blip2_comm *c, blip2_status *st) {
    (void)c;
    return inner->ops->barrier(inner, st);
}
static blip2_code fwd_split(blip2_comm *c, int color, int key, blip2_comm **out, blip2_status *st) {
    (void)c;
    return inner->ops->split(inner, color, key, out, st);
}
static void fwd_free(blip2_comm *c) { (void)c; }
static void fwd_abort(blip2_comm *c, int code) {
    (void)c;
    inner->ops->abort(inner, code);
}
static const blip2_comm_ops timed_ops = {timed_allreduce, fwd_broadcast, fwd_allgather, fwd_barrier,
                                         fwd_split,       fwd_free,      fwd_abort};

static void bench_allreduce(blip2_comm *c, int C) {
    int sizes[] = {1, 8, 32, 45, 64, 256, 512}; /* rows of C floats: decode batches and prefills */
    blip2_status st;
    if (c->rank == 0) printf("# all-reduce (sum, fp32, %s, %d ranks)\n%10s %12s %10s %10s %10s\n", c->backend, c->world,
                             "rows x C", "bytes", "time us", "algbw GB/s", "busbw GB/s");
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) {
        size_t n = (size_t)sizes[i] * C;
        float *buf = calloc(n, sizeof(float));
        int iters = n < 100000 ? 200 : 40;
        for (int w = 0; w < 5; w++) c->ops->allreduce_sum(c, buf, n, &st);
        c->ops->barrier(c, &st);
        double t0 = now_s();
        for (int k = 0; k < iters; k++) c->ops->allreduce_sum(c, buf, n, &st);
        double t = (now_s() - t0) / iters, bytes = (double)n * sizeof(float), algbw = bytes / t / 1e9;
        if (c->rank == 0)
            printf("%6d x %d %12.0f %10.1f %10.3f %10.3f\n", sizes[i], C, bytes, t * 1e6, algbw,
                   algbw * 2.0 * (c->world - 1) / c->world);
        free(buf);
    }
}

/* Decode steps of B sequences through the batched step (the engine's path), timing all-reduces. */
static int bench_decode(const char *dir, blip2_comm *world, int steps, int B) {
    blip2_status st = {0};
    blip2_model m;
    double t0 = now_s();
    blip2_code rc = blip2_model_load_shard(dir, world->rank, world->world, &m, &st);
    blip2_comm timed = {.ops = &timed_ops, .rank = world->rank, .world = world->world, .backend = "timed"};
    blip2_tp tp = blip2_tp_from_comm(&timed);
    rc = blip2_tp_agree(&tp, rc, &st);
    if (rc) {
        if (world->rank == 0) fprintf(stderr, "bench_tp: %s\n", st.msg);
        return 1;
    }
    double load_s = now_s() - t0;
    int past = 45, bs = 16, per_seq = blip2_kv_blocks_for(past + steps + 1, bs);
    blip2_kv_pool kv;
    blip2_opt_ws ws;
    rc = blip2_kv_pool_init(&kv, &m, B * per_seq, bs, &st);
    if (!rc) rc = blip2_opt_ws_init(&ws, &m, B, B, past + steps + 1, &st);
    int32_t *tables = malloc(sizeof(int32_t) * B * per_seq), *ids = malloc(sizeof(int32_t) * B);
    blip2_seq_step *seqs = malloc(sizeof *seqs * B);
    blip2_kv_pool_alloc(&kv, B * per_seq, tables);
    for (int b = 0; b < B; b++) ids[b] = 100 + b;
    double step_s = 0;
    for (int s = 0; !rc && s <= steps; s++) { /* step 0 warms up (caches, first touch of the KV) */
        for (int b = 0; b < B; b++) seqs[b] = (blip2_seq_step){tables + b * per_seq, past + s, 1};
        if (s == 1) allreduce_s = 0, allreduce_calls = 0;
        double t1 = now_s();
        rc = blip2_opt_forward_batch(&m, &tp, &kv, seqs, B, ids, NULL, &ws, &st);
        if (!rc) rc = blip2_tp_argmax(&m, &tp, &ws, B, ids, &st);
        if (s > 0) step_s += now_s() - t1;
    }
    if (world->rank == 0)
        printf("# decode, %d ranks, batch %d, %d steps (after the 45-position prompt)\n"
               "load %.1f s, decode %.1f ms/step (%.1f ms/token/sequence), all-reduce %.1f ms/step = %.1f%% "
               "(%ld calls/step)\n",
               world->world, B, steps, load_s, step_s / steps * 1e3, step_s / steps * 1e3 / B, allreduce_s / steps * 1e3,
               100.0 * allreduce_s / step_s, allreduce_calls / steps);
    blip2_kv_pool_free(&kv);
    blip2_opt_ws_free(&ws);
    free(tables), free(ids), free(seqs);
    blip2_model_free(&m);
    return rc ? 1 : 0;
}

int main(int argc, char **argv) {
    const char *model = NULL;
    int steps = 16, B = 1, C = 2560, c;
    static const struct option opts[] = {{"model", required_argument, 0, 'm'}, {"steps", required_argument, 0, 's'},
                                         {"batch", required_argument, 0, 'b'}, {"hidden", required_argument, 0, 'c'},
                                         {0, 0, 0, 0}};
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (c == 'm') model = optarg;
        else if (c == 's') steps = atoi(optarg);
        else if (c == 'b') B = atoi(optarg);
        else if (c == 'c') C = atoi(optarg);
        else {
            fprintf(stderr, "usage: mpirun -np N bench_tp [--model DIR] [--steps N] [--batch B] [--hidden C]\n");
            return 2;
        }
    }
    blip2_status st = {0};
    blip2_comm *world = blip2_comm_world(&st);
    if (!world) return fprintf(stderr, "bench_tp: %s\n", st.msg), 1;
    inner = world;
    bench_allreduce(world, C);
    int rc = model ? bench_decode(model, world, steps > 0 ? steps : 1, B > 0 ? B : 1) : 0;
    blip2_comm_world_finalize();
    return rc;
}
