/* Q-Former (spec §3.2): BERT-style post-LN layers over the Q learned queries, cross-attending to
 * the image on every cross_freq-th layer, then language_projection (§3.3). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../kernels/ops.h"
#include "forward.h"

typedef struct {
    float *q, *k, *v; /* [B·Q, Cq]; k and v [B·T, Cq] for cross-attention */
    float *ctx, *o;   /* [B·Q, Cq] */
    float *mlp;       /* [B·Q, mlp] */
    float *scores;    /* [Q, max(Q, T)] one head's attention scores */
} qformer_ws;

/* x = LN(x + dense(attention(x, kv_src))) for one attention block; kv_src [B·Tk, Ckv]. */
static void qformer_attn(const blip2_qformer_config *c, const blip2_qformer_attn *A, float *x, int B, int Q,
                         const float *kv_src, int Tk, int Ckv, qformer_ws *ws) {
    int C = c->C;
    float scale = 1.0f / sqrtf((float)c->HS); /* HF divides by sqrt(head size) */
    blip2_matmul(ws->q, x, A->q_w, A->q_b, B * Q, C, C);
    blip2_matmul(ws->k, kv_src, A->k_w, A->k_b, B * Tk, Ckv, C);
    blip2_matmul(ws->v, kv_src, A->v_w, A->v_b, B * Tk, Ckv, C);
    for (int b = 0; b < B; b++)
        blip2_attention(ws->ctx + (size_t)b * Q * C, ws->q + (size_t)b * Q * C, ws->k + (size_t)b * Tk * C,
                        ws->v + (size_t)b * Tk * C, ws->scores, Q, Tk, c->NH, c->HS, C, C, scale, 0);
    blip2_matmul(ws->o, ws->ctx, A->o_w, A->o_b, B * Q, C, C);
    blip2_residual_add(ws->o, x, (size_t)B * Q * C);
    blip2_layernorm(x, ws->o, A->ln_w, A->ln_b, B * Q, C, c->eps);
}

static void qformer_layer_forward(const blip2_model *m, const blip2_qformer_layer *L, float *x, int B,
                                  const float *image, qformer_ws *ws) {
    const blip2_qformer_config *c = &m->cfg.qformer;
    int Q = m->cfg.Q, C = c->C;
    qformer_attn(c, &L->self, x, B, Q, x, Q, C, ws);
    if (L->has_cross) qformer_attn(c, &L->cross, x, B, Q, image, m->cfg.vision.T, c->enc_C, ws);
    blip2_matmul(ws->mlp, x, L->fc1_w, L->fc1_b, B * Q, C, c->mlp);
    blip2_gelu(ws->mlp, (size_t)B * Q * c->mlp);
    blip2_matmul(ws->o, ws->mlp, L->fc2_w, L->fc2_b, B * Q, c->mlp, C);
    blip2_residual_add(ws->o, x, (size_t)B * Q * C);
    blip2_layernorm(x, ws->o, L->ln_w, L->ln_b, B * Q, C, c->eps);
}

blip2_code blip2_qformer_forward(const blip2_model *m, const float *image, int B, float *out, blip2_status *st) {
    const blip2_qformer_config *c = &m->cfg.qformer;
    int Q = m->cfg.Q, T = m->cfg.vision.T, C = c->C;
    size_t rows = (size_t)B * (Q > T ? Q : T); /* k/v rows: the image for cross-attention */
    qformer_ws ws = {
        .q = malloc(sizeof(float) * B * Q * C),
        .k = malloc(sizeof(float) * rows * C),
        .v = malloc(sizeof(float) * rows * C),
        .ctx = malloc(sizeof(float) * B * Q * C),
        .o = malloc(sizeof(float) * B * Q * C),
        .mlp = malloc(sizeof(float) * B * Q * c->mlp),
        .scores = malloc(sizeof(float) * Q * (Q > T ? Q : T)),
    };
    blip2_code rc = BLIP2_OK;
    if (!ws.q || !ws.k || !ws.v || !ws.ctx || !ws.o || !ws.mlp || !ws.scores) {
        rc = blip2_fail(st, BLIP2_ENOMEM, "Q-Former: out of memory for a batch of %d", B);
    } else {
        for (int b = 0; b < B; b++)
            blip2_layernorm(out + (size_t)b * Q * C, m->qformer.query_tokens, m->qformer.ln_w, m->qformer.ln_b, Q, C, c->eps);
        for (int l = 0; l < c->layers; l++) qformer_layer_forward(m, &m->qformer.layers[l], out, B, image, &ws);
    }
    free(ws.q);
    free(ws.k);
    free(ws.v);
    free(ws.ctx);
    free(ws.o);
    free(ws.mlp);
    free(ws.scores);
    return rc;
}

blip2_code blip2_project(const blip2_model *m, const float *query_out, int B, float *out, blip2_status *st) {
    (void)st;
    blip2_matmul(out, query_out, m->qformer.proj_w, m->qformer.proj_b, B * m->cfg.Q, m->cfg.qformer.C, m->cfg.opt.C);
    return BLIP2_OK;
}
