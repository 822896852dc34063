/* The decode-step graphs of runtime/opt.c, checked without a GPU. A recording backend stands in
 * for CUDA graphs: it is the CPU reference whose ops, between capture_begin and capture_end, are
 * written to a tape instead of run (pointers and scalars as given, as a CUDA graph keeps them),
 * and graph_launch runs the tape. Uploads, downloads and syncs during a recording fail it, as on
 * CUDA. Replaying a tape gives the right answer only if every launch of a decode step has the
 * same arguments at every step of that batch size — the property the CUDA graphs rely on. So:
 *  - decode steps through graphs (recorded at the second use of a batch size, replayed after)
 *    give bit for bit the logits of the same steps without graphs, across batch sizes 1, 3, 2,
 *    back to 3 (its graph reused) and with sequences at different lengths and block boundaries;
 *  - a stale graph is recorded again, a failed recording falls back to eager steps, a prefill
 *    step never uses a graph;
 *  - the image encoder, recorded per number of images, gives the plain CPU's outputs. */
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "forward.h"
#include "ops.h"

/* ---- the recording backend ---- */

enum {
    OP_EMB_VP, OP_ADD_ROWS_AT, OP_LN, OP_LNA, OP_MMA, OP_ACTA, OP_KVW, OP_ATTN, OP_RLN, OP_GATHER,
    OP_I2C, OP_COPY, OP_ADD_ROWS, OP_DENSE_ATTN, OP_MM_ACC, OP_MM_LN
};

typedef struct {
    int op;
    const void *p[10];
    int i[12];
    float f[2];
    size_t z;
} tape_op;

typedef struct {
    tape_op *ops;
    int n, cap;
} tape;

static int g_recording, g_record_failed, g_fail_next_capture, g_stale_next_launch;
static int g_launches, g_recordings;
static tape *g_tape;

static void rec(tape_op t) {
    if (g_tape->n == g_tape->cap) {
        g_tape->cap = g_tape->cap ? 2 * g_tape->cap : 256;
        g_tape->ops = realloc(g_tape->ops, sizeof(tape_op) * (size_t)g_tape->cap);
    }
    g_tape->ops[g_tape->n++] = t;
}

#define P(x) ((const void *)(x))
static void r_embedding_vp(float *out, const int32_t *ids, const void *table, int wd, int T, int C, int v0, int V) {
    if (!g_recording) return blip2_cpu_ops.embedding_vp(out, ids, table, wd, T, C, v0, V);
    rec((tape_op){OP_EMB_VP, {P(out), P(ids), table}, {wd, T, C, v0, V}, {0}, 0});
}
static void r_add_rows_at(float *x, const float *table, const int32_t *rows, int T, int C) {
    if (!g_recording) return blip2_cpu_ops.add_rows_at(x, table, rows, T, C);
    rec((tape_op){OP_ADD_ROWS_AT, {P(x), P(table), P(rows)}, {T, C}, {0}, 0});
}
static void r_layernorm(float *out, const float *inp, const float *w, const float *b, int T, int C, float eps) {
    if (!g_recording) return blip2_cpu_ops.layernorm(out, inp, w, b, T, C, eps);
    rec((tape_op){OP_LN, {P(out), P(inp), P(w), P(b)}, {T, C}, {eps}, 0});
}
static void r_layernorm_a(void *out, const float *inp, const float *w, const float *b, int T, int C, float eps, int ad) {
    if (!g_recording) return blip2_cpu_ops.layernorm_a(out, inp, w, b, T, C, eps, ad);
    rec((tape_op){OP_LNA, {out, P(inp), P(w), P(b)}, {T, C, ad}, {eps}, 0});
}
static void r_matmul_a(void *out, const void *inp, const void *w, const void *bias, int T, int C, int OC, int ad, int wd,
                       int act, int od) {
    if (!g_recording) return blip2_cpu_ops.matmul_a(out, inp, w, bias, T, C, OC, ad, wd, act, od);
    rec((tape_op){OP_MMA, {out, inp, w, bias}, {T, C, OC, ad, wd, act, od}, {0}, 0});
}
static void r_matmul_acc_a(float *out, const void *inp, const void *w, const float *bias, int T, int C, int OC, int ad,
                           int wd) {
    if (!g_recording) return blip2_cpu_ops.matmul_acc_a(out, inp, w, bias, T, C, OC, ad, wd);
    rec((tape_op){OP_MM_ACC, {P(out), inp, w, P(bias)}, {T, C, OC, ad, wd}, {0}, 0});
}
static void r_matmul_ln_a(void *out, void *h, const float *x, const float *lw, const float *lb, float eps, const void *w,
                          const void *bias, int T, int C, int OC, int ad, int wd, int act, int od) {
    if (!g_recording) return blip2_cpu_ops.matmul_ln_a(out, h, x, lw, lb, eps, w, bias, T, C, OC, ad, wd, act, od);
    rec((tape_op){OP_MM_LN, {out, h, P(x), P(lw), P(lb), w, bias}, {T, C, OC, ad, wd, act, od}, {eps}, 0});
}
static void r_activate_a(void *out, const void *x, size_t n, int act, int ad, int xd) {
    if (!g_recording) return blip2_cpu_ops.activate_a(out, x, n, act, ad, xd);
    rec((tape_op){OP_ACTA, {out, x}, {act, ad, xd}, {0}, n});
}
static void r_kv_write(void *kp, void *vp, int kvd, const float *k, const float *v, int in_stride, const int32_t *tables,
                       int mb, const int32_t *meta, int n_seqs, int bs, int C) {
    if (!g_recording) return blip2_cpu_ops.kv_write(kp, vp, kvd, k, v, in_stride, tables, mb, meta, n_seqs, bs, C);
    rec((tape_op){OP_KVW, {kp, vp, P(k), P(v), P(tables), P(meta)}, {kvd, in_stride, mb, n_seqs, bs, C}, {0}, 0});
}
static void r_attention_paged(void *out, const float *q, void *kp, void *vp, int kvd, const float *k_new,
                              const float *v_new, const int32_t *tables, int mb, const int32_t *meta, int n_seqs, int bs,
                              float *scratch, int max_ctx, int NH, int HS, int qs, int kvs, float scale, int od) {
    if (!g_recording)
        return blip2_cpu_ops.attention_paged(out, q, kp, vp, kvd, k_new, v_new, tables, mb, meta, n_seqs, bs, scratch,
                                             max_ctx, NH, HS, qs, kvs, scale, od);
    rec((tape_op){OP_ATTN, {out, P(q), kp, vp, P(tables), P(meta), P(scratch), P(k_new), P(v_new)},
                  {kvd, mb, n_seqs, bs, max_ctx, NH, HS, qs, kvs, od}, {scale}, 0});
}
static void r_residual_layernorm(float *res, float *out, const float *y, const float *bias, const float *w, const float *b,
                                 int T, int C, float eps) {
    if (!g_recording) return blip2_cpu_ops.residual_layernorm(res, out, y, bias, w, b, T, C, eps);
    rec((tape_op){OP_RLN, {P(res), P(out), P(y), P(bias), P(w), P(b)}, {T, C}, {eps}, 0});
}
static void r_gather_rows(float *out, const float *x, const int32_t *rows, int n, int C) {
    if (!g_recording) return blip2_cpu_ops.gather_rows(out, x, rows, n, C);
    rec((tape_op){OP_GATHER, {P(out), P(x), P(rows)}, {n, C}, {0}, 0});
}

static void r_im2col(float *out, const float *img, int CH, int H, int W, int PS) {
    if (!g_recording) return blip2_cpu_ops.im2col_patches(out, img, CH, H, W, PS);
    rec((tape_op){OP_I2C, {P(out), P(img)}, {CH, H, W, PS}, {0}, 0});
}
static void r_copy(void *dst, const void *src, size_t n) { /* device to device: recordable */
    if (!g_recording) return blip2_cpu_ops.copy(dst, src, n);
    rec((tape_op){OP_COPY, {dst, src}, {0}, {0}, n});
}
static void r_add_rows(float *x, const float *table, int row0, int T, int C) {
    if (!g_recording) return blip2_cpu_ops.add_rows(x, table, row0, T, C);
    rec((tape_op){OP_ADD_ROWS, {P(x), P(table)}, {row0, T, C}, {0}, 0});
}
static void r_attention(void *out, const void *q, const void *k, const void *v, float *scratch, int B, int Tq, int Tk,
                        int NH, int HS, int qs, int kvs, float scale, int causal, int wd, int iod) {
    if (!g_recording)
        return blip2_cpu_ops.attention(out, q, k, v, scratch, B, Tq, Tk, NH, HS, qs, kvs, scale, causal, wd, iod);
    rec((tape_op){OP_DENSE_ATTN, {out, q, k, v, P(scratch)}, {B, Tq, Tk, NH, HS, qs, kvs, causal, wd, iod}, {scale}, 0});
}

/* What a recording must not contain (a CUDA capture fails on them). */
static void r_upload(void *dst, const void *src, size_t n) {
    if (g_recording) g_record_failed = 1;
    else blip2_cpu_ops.upload(dst, src, n);
}
static void r_download(void *dst, const void *src, size_t n) {
    if (g_recording) g_record_failed = 1;
    else blip2_cpu_ops.download(dst, src, n);
}
static int r_sync(char *err, size_t n) {
    if (g_recording) g_record_failed = 1;
    return blip2_cpu_ops.sync(err, n);
}

#define F(x) ((float *)(x))
#define I(x) ((const int32_t *)(x))
static void play(const tape *t) {
    const blip2_ops *c = &blip2_cpu_ops;
    for (int k = 0; k < t->n; k++) {
        const tape_op *o = &t->ops[k];
        const int *i = o->i;
        switch (o->op) {
        case OP_EMB_VP: c->embedding_vp(F(o->p[0]), I(o->p[1]), o->p[2], i[0], i[1], i[2], i[3], i[4]); break;
        case OP_ADD_ROWS_AT: c->add_rows_at(F(o->p[0]), F(o->p[1]), I(o->p[2]), i[0], i[1]); break;
        case OP_LN: c->layernorm(F(o->p[0]), F(o->p[1]), F(o->p[2]), F(o->p[3]), i[0], i[1], o->f[0]); break;
        case OP_LNA: c->layernorm_a((void *)o->p[0], F(o->p[1]), F(o->p[2]), F(o->p[3]), i[0], i[1], o->f[0], i[2]); break;
        case OP_MMA:
            c->matmul_a((void *)o->p[0], o->p[1], o->p[2], o->p[3], i[0], i[1], i[2], i[3], i[4], i[5], i[6]);
            break;
        case OP_ACTA: c->activate_a((void *)o->p[0], o->p[1], o->z, i[0], i[1], i[2]); break;
        case OP_MM_ACC: c->matmul_acc_a(F(o->p[0]), o->p[1], o->p[2], F(o->p[3]), i[0], i[1], i[2], i[3], i[4]); break;
        case OP_MM_LN:
            c->matmul_ln_a((void *)o->p[0], (void *)o->p[1], F(o->p[2]), F(o->p[3]), F(o->p[4]), o->f[0], o->p[5], o->p[6],
                           i[0], i[1], i[2], i[3], i[4], i[5], i[6]);
            break;
        case OP_KVW:
            c->kv_write((void *)o->p[0], (void *)o->p[1], i[0], F(o->p[2]), F(o->p[3]), i[1], I(o->p[4]), i[2], I(o->p[5]),
                        i[3], i[4], i[5]);
            break;
        case OP_ATTN:
            c->attention_paged((void *)o->p[0], F(o->p[1]), (void *)o->p[2], (void *)o->p[3], i[0], F(o->p[7]),
                               F(o->p[8]), I(o->p[4]), i[1], I(o->p[5]), i[2], i[3], F(o->p[6]), i[4], i[5], i[6], i[7],
                               i[8], o->f[0], i[9]);
            break;
        case OP_RLN:
            c->residual_layernorm(F(o->p[0]), F(o->p[1]), F(o->p[2]), F(o->p[3]), F(o->p[4]), F(o->p[5]), i[0], i[1], o->f[0]);
            break;
        case OP_GATHER: c->gather_rows(F(o->p[0]), F(o->p[1]), I(o->p[2]), i[0], i[1]); break;
        case OP_I2C: c->im2col_patches(F(o->p[0]), F(o->p[1]), i[0], i[1], i[2], i[3]); break;
        case OP_COPY: c->copy((void *)o->p[0], o->p[1], o->z); break;
        case OP_ADD_ROWS: c->add_rows(F(o->p[0]), F(o->p[1]), i[0], i[1], i[2]); break;
        case OP_DENSE_ATTN:
            c->attention((void *)o->p[0], o->p[1], o->p[2], o->p[3], F(o->p[4]), i[0], i[1], i[2], i[3], i[4], i[5], i[6],
                         o->f[0], i[7], i[8], i[9]);
            break;
        }
    }
}

static int r_capture_begin(void) {
    g_tape = calloc(1, sizeof *g_tape);
    g_recording = 1;
    g_record_failed = 0;
    return 0;
}
static void *r_capture_end(char *why, size_t n) {
    g_recording = 0;
    g_recordings++;
    if (g_record_failed || g_fail_next_capture) {
        snprintf(why, n, "%s", g_record_failed ? "an upload, download or sync while recording" : "told to fail");
        g_fail_next_capture = 0;
        free(g_tape->ops), free(g_tape);
        return NULL;
    }
    return g_tape;
}
static int r_graph_launch(void *g) {
    if (g_stale_next_launch) {
        g_stale_next_launch = 0;
        return 1;
    }
    g_launches++;
    play(g);
    return 0;
}
static void r_graph_free(void *g) {
    tape *t = g;
    free(t->ops), free(t);
}

static blip2_ops recording_ops(void) {
    blip2_ops o = blip2_cpu_ops;
    o.name = "cpu-recording";
    o.upload = r_upload, o.download = r_download, o.sync = r_sync;
    o.capture_begin = r_capture_begin, o.capture_end = r_capture_end;
    o.graph_launch = r_graph_launch, o.graph_free = r_graph_free;
    o.embedding_vp = r_embedding_vp, o.add_rows_at = r_add_rows_at, o.layernorm = r_layernorm;
    o.layernorm_a = r_layernorm_a, o.matmul_a = r_matmul_a, o.activate_a = r_activate_a;
    o.matmul_acc_a = r_matmul_acc_a, o.matmul_ln_a = r_matmul_ln_a;
    o.kv_write = r_kv_write, o.attention_paged = r_attention_paged;
    o.residual_layernorm = r_residual_layernorm, o.gather_rows = r_gather_rows;
    o.im2col_patches = r_im2col, o.copy = r_copy, o.add_rows = r_add_rows, o.attention = r_attention;
    return o;
}

/* ---- the test ---- */

#define MAX_S 4
#define BS 4 /* small blocks: sequences cross block boundaries within a few steps */

typedef struct {
    blip2_kv_pool kv;
    blip2_opt_ws ws;
    int32_t tables[MAX_S][32];
    int len[MAX_S];
} run_state;

static void state_init(run_state *r, const blip2_model *m, int max_ctx) {
    blip2_status st = {0};
    CHECK(blip2_kv_pool_init(&r->kv, m, MAX_S * 32, BS, &st) == BLIP2_OK, "kv: %s", st.msg);
    CHECK(blip2_opt_ws_init(&r->ws, m, 64, MAX_S, max_ctx, &st) == BLIP2_OK, "ws: %s", st.msg);
    for (int s = 0; s < MAX_S; s++) blip2_kv_pool_alloc(&r->kv, 32, r->tables[s]);
    memset(r->len, 0, sizeof r->len);
}
static void state_free(run_state *r) {
    blip2_opt_ws_free(&r->ws);
    blip2_kv_pool_free(&r->kv);
}

/* One step over sequences `which` [n]: a prefill of `prefill` tokens each when > 0, else one decode
 * token each. Logits of each sequence's last row into out [n, V]. */
static blip2_code step(const blip2_model *m, const blip2_tp *tp, run_state *r, const int *which, int n, int prefill,
                       float *out) {
    blip2_seq_step seqs[MAX_S];
    int32_t tokens[64];
    int T = 0;
    for (int i = 0; i < n; i++) {
        int s = which[i], new = prefill > 0 ? prefill : 1;
        seqs[i] = (blip2_seq_step){r->tables[s], r->len[s], new};
        for (int t = 0; t < new; t++) tokens[T++] = 100 + 37 * s + 11 * (r->len[s] + t) % 997;
        r->len[s] += new;
    }
    blip2_status st = {0};
    blip2_code rc = blip2_opt_forward_batch(m, tp, &r->kv, seqs, n, tokens, NULL, &r->ws, &st);
    CHECK(rc == BLIP2_OK, "step: %s", st.msg);
    if (!rc) blip2_cpu_ops.download(out, r->ws.logits, sizeof(float) * (size_t)n * m->shard.V);
    return rc;
}

/* The image encoder as a graph per number of images: B = 1 three times, then B = 2 three times
 * (eager, recorded, replayed), new pixels every call; image, Q-Former and projected outputs equal
 * the plain CPU's bit for bit. */
static void test_encoder(blip2_model *m, const blip2_ops *rops) {
    const blip2_config *c = &m->cfg;
    size_t px = blip2_image_floats(&c->vision), ni = (size_t)c->vision.T * c->vision.C;
    size_t nq = (size_t)c->Q * c->qformer.C, np = (size_t)c->Q * c->opt.C;
    float *pix = malloc(sizeof(float) * 2 * px), *w[3], *g[3];
    size_t n[3] = {2 * ni, 2 * nq, 2 * np};
    for (int i = 0; i < 3; i++) w[i] = malloc(sizeof(float) * n[i]), g[i] = malloc(sizeof(float) * n[i]);
    blip2_encoder_ws ref, gr;
    blip2_status st = {0};
    m->ops = &blip2_cpu_ops;
    CHECK(blip2_encoder_ws_init(&ref, m, 2, &st) == BLIP2_OK, "encoder ws: %s", st.msg);
    m->ops = rops;
    CHECK(blip2_encoder_ws_init(&gr, m, 2, &st) == BLIP2_OK, "encoder ws: %s", st.msg);
    int rec0 = g_recordings, launch0 = g_launches;
    blip2_rng rng;
    blip2_rng_seed(&rng, 5);
    for (int k = 0; k < 6; k++) {
        int B = k < 3 ? 1 : 2;
        for (size_t i = 0; i < B * px; i++) pix[i] = (float)(blip2_rng_uniform(&rng) * 4.0 - 2.0);
        m->ops = &blip2_cpu_ops;
        CHECK(blip2_encode_images(m, &ref, pix, B, w[0], w[1], w[2], &st) == BLIP2_OK, "encode: %s", st.msg);
        m->ops = rops;
        CHECK(blip2_encode_images(m, &gr, pix, B, g[0], g[1], g[2], &st) == BLIP2_OK, "encode (graphs): %s", st.msg);
        for (int i = 0; i < 3; i++)
            CHECK(memcmp(w[i], g[i], sizeof(float) * n[i] / 2 * B) == 0, "encoder call %d (B %d): output %d differs", k, B, i);
    }
    CHECK(g_recordings - rec0 == 2 && g_launches - launch0 == 4, "encoder: %d recordings (want 2), %d launches (want 4)",
          g_recordings - rec0, g_launches - launch0);
    m->ops = &blip2_cpu_ops;
    blip2_encoder_ws_free(&ref);
    m->ops = rops;
    blip2_encoder_ws_free(&gr);
    m->ops = &blip2_cpu_ops;
    for (int i = 0; i < 3; i++) free(w[i]), free(g[i]);
    free(pix);
}

int main(void) {
    blip2_status st = {0};
    blip2_model m;
    if (blip2_model_load(BLIP2_SHARED_DIR "/fixtures/tiny-f16", &m, &st)) {
        CHECK(0, "model: %s", st.msg);
        return check_summary();
    }
    static blip2_ops rops;
    rops = recording_ops();
    blip2_tp tp = blip2_tp_from_comm(blip2_comm_self());
    size_t V = (size_t)m.shard.V;
    float *want = malloc(sizeof(float) * MAX_S * V), *got = malloc(sizeof(float) * MAX_S * V);
    /* The schedule: prefills, then decode steps of changing batch sizes; each row the same work
     * in both runs. */
    static const int a3[] = {0, 1, 2}, a2[] = {0, 2}, a1[] = {1}, b2[] = {1, 3};
    struct {
        const int *which;
        int n, prefill;
    } plan[] = {{a3, 3, 5}, {a1, 1, 0}, {a1, 1, 0}, {a1, 1, 0}, {a3, 3, 0}, {a3, 3, 0}, {a3, 3, 0}, {a2, 2, 0},
                {a2, 2, 0}, {b2, 2, 3}, {a3, 3, 0}, {a3, 3, 0}, {b2, 2, 0}, {b2, 2, 0}, {b2, 2, 0}, {a1, 1, 0}};
    int n_plan = (int)(sizeof plan / sizeof plan[0]);
    run_state ref, gr;
    m.ops = &blip2_cpu_ops;
    state_init(&ref, &m, 64);
    m.ops = &rops;
    state_init(&gr, &m, 64);
    CHECK(gr.ws.graphs.on, "the recording backend has graphs, so the workspace should use them");
    int mismatches = 0;
    for (int k = 0; k < n_plan; k++) {
        if (k == 11) g_stale_next_launch = 1; /* batch 3's graph is stale once: recorded again */
        m.ops = &blip2_cpu_ops;
        step(&m, &tp, &ref, plan[k].which, plan[k].n, plan[k].prefill, want);
        m.ops = &rops;
        step(&m, &tp, &gr, plan[k].which, plan[k].n, plan[k].prefill, got);
        if (memcmp(want, got, sizeof(float) * plan[k].n * V) != 0 && mismatches++ < 3)
            CHECK(0, "step %d (batch %d%s): logits through graphs differ from the eager ones", k, plan[k].n,
                  plan[k].prefill ? ", prefill" : "");
    }
    CHECK(mismatches == 0, "%d of %d steps differ", mismatches, n_plan);
    /* Each batch size runs eagerly first, is recorded at its second decode step and replayed
     * after: 1, 3 and 2 are recorded once each and 3 again when its graph went stale (4); 11
     * decode steps go through a graph (14 decode steps, 3 of them eager). */
    CHECK(g_recordings == 4 && g_launches == 11, "recordings %d (want 4), graph launches %d (want 11)", g_recordings,
          g_launches);
    /* A failed recording: graphs off for the workspace, the step still right. */
    run_state fl;
    state_init(&fl, &m, 64);
    g_fail_next_capture = 1;
    static const int one[] = {0};
    m.ops = &blip2_cpu_ops;
    state_free(&ref);
    state_init(&ref, &m, 64);
    for (int k = 0; k < 4; k++) {
        m.ops = &blip2_cpu_ops;
        step(&m, &tp, &ref, one, 1, k == 0 ? 4 : 0, want);
        m.ops = &rops;
        step(&m, &tp, &fl, one, 1, k == 0 ? 4 : 0, got);
        CHECK(memcmp(want, got, sizeof(float) * V) == 0, "after a failed recording, step %d differs", k);
    }
    CHECK(!fl.ws.graphs.on, "a failed recording must turn graphs off for the workspace");
    state_free(&fl);
    state_free(&gr);
    test_encoder(&m, &rops);
    m.ops = &blip2_cpu_ops;
    state_free(&ref);
    free(want), free(got);
    blip2_model_free(&m);
    return check_summary();
}
