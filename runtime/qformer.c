/* Q-Former (spec §3.2): BERT-style post-LN layers over the Q learned queries, cross-attending to
 * the image on every cross_freq-th layer, then language_projection (§3.3). */
#include <math.h>

#include "backend.h"
#include "forward.h"

/* x = LN(x + dense(attention(x, kv_src))) for one attention block; kv_src [B·Tk, Ckv] of kv_type. */
static void qformer_attn(const blip2_model *m, const blip2_qformer_attn *A, int B, int Q, const void *kv_src, int kv_type,
                         int Tk, int Ckv, blip2_encoder_ws *ws) {
    const blip2_qformer_config *c = &m->cfg.qformer;
    const blip2_ops *o = m->ops;
    int C = c->C;
    float scale = 1.0f / sqrtf((float)c->HS); /* HF divides by sqrt(head size) */
    blip2_mm(m, ws->qq, ws->qx, A->q_w, A->q_b, B * Q, C, C, BLIP2_ACT_NONE);
    blip2_mm_a(m, ws->qk, kv_src, kv_type, A->k_w, A->k_b, B * Tk, Ckv, C, BLIP2_ACT_NONE);
    blip2_mm_a(m, ws->qv, kv_src, kv_type, A->v_w, A->v_b, B * Tk, Ckv, C, BLIP2_ACT_NONE);
    o->attention(ws->qctx, ws->qq, ws->qk, ws->qv, ws->scores, B, Q, Tk, c->NH, c->HS, C, C, scale, 0, m->wdtype,
                 BLIP2_W_F32);
    blip2_mm(m, ws->qo, ws->qctx, A->o_w, A->o_b, B * Q, C, C, BLIP2_ACT_NONE);
    o->residual_layernorm(ws->qo, ws->qx, ws->qx, NULL, A->ln_w, A->ln_b, B * Q, C, c->eps); /* o += x; x = LN(o) */
}

static void qformer_layer_forward(const blip2_model *m, const blip2_qformer_layer *L, int B, blip2_encoder_ws *ws) {
    const blip2_qformer_config *c = &m->cfg.qformer;
    int Q = m->cfg.Q, C = c->C;
    qformer_attn(m, &L->self, B, Q, ws->qx, BLIP2_W_F32, Q, C, ws);
    if (L->has_cross) qformer_attn(m, &L->cross, B, Q, ws->image_a, blip2_adtype(m), m->cfg.vision.T, c->enc_C, ws);
    blip2_mm(m, ws->qmlp, ws->qx, L->fc1_w, L->fc1_b, B * Q, C, c->mlp, BLIP2_ACT_GELU);
    blip2_mm(m, ws->qo, ws->qmlp, L->fc2_w, L->fc2_b, B * Q, c->mlp, C, BLIP2_ACT_NONE);
    m->ops->residual_layernorm(ws->qo, ws->qx, ws->qx, NULL, L->ln_w, L->ln_b, B * Q, C, c->eps);
}

void blip2_qformer_run(const blip2_model *m, blip2_encoder_ws *ws, int B) {
    const blip2_qformer_config *c = &m->cfg.qformer;
    int Q = m->cfg.Q, C = c->C;
    if (ws->image_a != ws->image) /* the image rows in the activation type, once for every cross-attention */
        m->ops->activate_a(ws->image_a, ws->image, (size_t)B * m->cfg.vision.T * m->cfg.vision.C, BLIP2_ACT_NONE,
                           blip2_adtype(m), BLIP2_W_F32);
    for (int b = 0; b < B; b++)
        m->ops->layernorm(ws->qx + (size_t)b * Q * C, m->qformer.query_tokens, m->qformer.ln_w, m->qformer.ln_b, Q, C,
                          c->eps);
    for (int l = 0; l < c->layers; l++) qformer_layer_forward(m, &m->qformer.layers[l], B, ws);
}

void blip2_project_run(const blip2_model *m, blip2_encoder_ws *ws, int B) {
    blip2_mm(m, ws->proj, ws->qx, m->qformer.proj_w, m->qformer.proj_b, B * m->cfg.Q, m->cfg.qformer.C, m->cfg.opt.C,
             BLIP2_ACT_NONE);
}
