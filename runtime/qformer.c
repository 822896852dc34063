/* Q-Former (spec §3.2): BERT-style post-LN layers over the Q learned queries, cross-attending to
 * the image on every cross_freq-th layer, then language_projection (§3.3). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "forward.h"

typedef struct {
    float *x;         /* [B·Q, Cq] the query states */
    float *image;     /* [B·T, Cv] */
    float *q, *k, *v; /* [B·Q, Cq]; k and v [B·T, Cq] for cross-attention */
    float *ctx, *o;   /* [B·Q, Cq] */
    float *mlp;       /* [B·Q, mlp] */
    float *scores;    /* [NH, Q, max(Q, T)] attention scores of all heads */
} qformer_ws;

/* x = LN(x + dense(attention(x, kv_src))) for one attention block; kv_src [B·Tk, Ckv]. */
static void qformer_attn(const blip2_model *m, const blip2_qformer_attn *A, int B, int Q, const float *kv_src, int Tk,
                         int Ckv, qformer_ws *ws) {
    const blip2_qformer_config *c = &m->cfg.qformer;
    const blip2_ops *o = m->ops;
    int C = c->C;
    float scale = 1.0f / sqrtf((float)c->HS); /* HF divides by sqrt(head size) */
    blip2_mm(m, ws->q, ws->x, A->q_w, A->q_b, B * Q, C, C, BLIP2_ACT_NONE);
    blip2_mm(m, ws->k, kv_src, A->k_w, A->k_b, B * Tk, Ckv, C, BLIP2_ACT_NONE);
    blip2_mm(m, ws->v, kv_src, A->v_w, A->v_b, B * Tk, Ckv, C, BLIP2_ACT_NONE);
    for (int b = 0; b < B; b++)
        o->attention(ws->ctx + (size_t)b * Q * C, ws->q + (size_t)b * Q * C, ws->k + (size_t)b * Tk * C,
                     ws->v + (size_t)b * Tk * C, ws->scores, Q, Tk, c->NH, c->HS, C, C, scale, 0);
    blip2_mm(m, ws->o, ws->ctx, A->o_w, A->o_b, B * Q, C, C, BLIP2_ACT_NONE);
    o->residual_layernorm(ws->o, ws->x, ws->x, NULL, A->ln_w, A->ln_b, B * Q, C, c->eps); /* o += x; x = LN(o) */
}

static void qformer_layer_forward(const blip2_model *m, const blip2_qformer_layer *L, int B, qformer_ws *ws) {
    const blip2_qformer_config *c = &m->cfg.qformer;
    int Q = m->cfg.Q, C = c->C;
    qformer_attn(m, &L->self, B, Q, ws->x, Q, C, ws);
    if (L->has_cross) qformer_attn(m, &L->cross, B, Q, ws->image, m->cfg.vision.T, c->enc_C, ws);
    blip2_mm(m, ws->mlp, ws->x, L->fc1_w, L->fc1_b, B * Q, C, c->mlp, BLIP2_ACT_GELU);
    blip2_mm(m, ws->o, ws->mlp, L->fc2_w, L->fc2_b, B * Q, c->mlp, C, BLIP2_ACT_NONE);
    m->ops->residual_layernorm(ws->o, ws->x, ws->x, NULL, L->ln_w, L->ln_b, B * Q, C, c->eps);
}

blip2_code blip2_qformer_forward(const blip2_model *m, const float *image, int B, float *out, blip2_status *st) {
    const blip2_qformer_config *c = &m->cfg.qformer;
    int Q = m->cfg.Q, T = m->cfg.vision.T, C = c->C, Tmax = Q > T ? Q : T;
    size_t rows = (size_t)B * Tmax, img = (size_t)B * T * c->enc_C; /* k/v rows: the image for cross-attention */
    blip2_bufs bufs = {.ops = m->ops};
    qformer_ws ws = {
        .x = blip2_bufs_get(&bufs, sizeof(float) * B * Q * C),
        .image = blip2_bufs_get(&bufs, sizeof(float) * img),
        .q = blip2_bufs_get(&bufs, sizeof(float) * B * Q * C),
        .k = blip2_bufs_get(&bufs, sizeof(float) * rows * C),
        .v = blip2_bufs_get(&bufs, sizeof(float) * rows * C),
        .ctx = blip2_bufs_get(&bufs, sizeof(float) * B * Q * C),
        .o = blip2_bufs_get(&bufs, sizeof(float) * B * Q * C),
        .mlp = blip2_bufs_get(&bufs, sizeof(float) * B * Q * c->mlp),
        .scores = blip2_bufs_get(&bufs, sizeof(float) * c->NH * Q * Tmax),
    };
    blip2_code rc = BLIP2_OK;
    if (bufs.failed) {
        rc = blip2_fail(st, BLIP2_ENOMEM, "Q-Former: out of %s memory for a batch of %d", m->ops->name, B);
    } else {
        m->ops->upload(ws.image, image, sizeof(float) * img);
        for (int b = 0; b < B; b++)
            m->ops->layernorm(ws.x + (size_t)b * Q * C, m->qformer.query_tokens, m->qformer.ln_w, m->qformer.ln_b, Q, C, c->eps);
        for (int l = 0; l < c->layers; l++) qformer_layer_forward(m, &m->qformer.layers[l], B, &ws);
        m->ops->download(out, ws.x, sizeof(float) * B * Q * C);
        rc = blip2_backend_check(m->ops, "Q-Former", st);
    }
    blip2_bufs_release(&bufs);
    return rc;
}

blip2_code blip2_project(const blip2_model *m, const float *query_out, int B, float *out, blip2_status *st) {
    size_t in = (size_t)B * m->cfg.Q * m->cfg.qformer.C, n = (size_t)B * m->cfg.Q * m->cfg.opt.C;
    blip2_bufs bufs = {.ops = m->ops};
    float *x = blip2_bufs_get(&bufs, sizeof(float) * in), *y = blip2_bufs_get(&bufs, sizeof(float) * n);
    blip2_code rc = BLIP2_OK;
    if (bufs.failed) {
        rc = blip2_fail(st, BLIP2_ENOMEM, "language projection: out of %s memory", m->ops->name);
    } else {
        m->ops->upload(x, query_out, sizeof(float) * in);
        blip2_mm(m, y, x, m->qformer.proj_w, m->qformer.proj_b, B * m->cfg.Q, m->cfg.qformer.C, m->cfg.opt.C, BLIP2_ACT_NONE);
        m->ops->download(out, y, sizeof(float) * n);
        rc = blip2_backend_check(m->ops, "language projection", st);
    }
    blip2_bufs_release(&bufs);
    return rc;
}
