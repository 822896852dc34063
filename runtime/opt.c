/* OPT decoder (spec §3.4–3.5) over a contiguous KV cache. Prefill runs all prompt positions at
 * once; each decode step is one position (matrix-vector work, bound by weight bandwidth). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../kernels/ops.h"
#include "forward.h"

blip2_code blip2_kv_cache_init(blip2_kv_cache *kv, const blip2_config *cfg, int max_T, blip2_status *st) {
    memset(kv, 0, sizeof *kv);
    kv->layers = cfg->opt.layers;
    kv->C = cfg->opt.C;
    kv->max_T = max_T;
    size_t n = (size_t)kv->layers * max_T * kv->C;
    kv->k = malloc(sizeof(float) * n);
    kv->v = malloc(sizeof(float) * n);
    if (!kv->k || !kv->v) {
        blip2_kv_cache_free(kv);
        return blip2_fail(st, BLIP2_ENOMEM, "KV cache: out of memory for %d positions", max_T);
    }
    return BLIP2_OK;
}

void blip2_kv_cache_free(blip2_kv_cache *kv) {
    free(kv->k);
    free(kv->v);
    memset(kv, 0, sizeof *kv);
}

blip2_code blip2_opt_embed_inputs(const blip2_model *m, const int32_t *ids, int n, const float *projected, float *out,
                                  blip2_status *st) {
    int C = m->cfg.opt.C, q = 0;
    for (int t = 0; t < n; t++) {
        if (ids[t] == m->cfg.image_token_id) {
            if (q == m->cfg.Q) break;
            memcpy(out + (size_t)t * C, projected + (size_t)q++ * C, sizeof(float) * C);
        } else if (ids[t] < 0 || ids[t] >= m->cfg.opt.V) {
            return blip2_fail(st, BLIP2_EINVAL, "input id %d at position %d is outside the vocabulary [0, %d)", ids[t], t,
                              m->cfg.opt.V);
        } else {
            blip2_embedding(out + (size_t)t * C, &ids[t], m->opt.wte, 1, C);
        }
    }
    int count = 0;
    for (int t = 0; t < n; t++) count += ids[t] == m->cfg.image_token_id;
    if (count != m->cfg.Q)
        return blip2_fail(st, BLIP2_EINVAL, "the input has %d image tokens (%d) but the model has num_query_tokens = %d",
                          count, m->cfg.image_token_id, m->cfg.Q);
    return BLIP2_OK;
}

typedef struct {
    float *x;      /* [T, Ct] residual stream */
    float *a;      /* [T, Ct] */
    float *q;      /* [T, Ct] */
    float *ctx;    /* [T, Ct] */
    float *mlp;    /* [T, ffn] */
    float *scores; /* [kv T after this step] */
} opt_ws;

static void opt_layer_forward(const blip2_opt_config *c, const blip2_opt_layer *L, float *kc, float *vc, int past, int T,
                              opt_ws *ws) {
    int C = c->C;
    float scaling = 1.0f / sqrtf((float)c->HS); /* eager OPT scales q before q·kᵀ */
    float *k_new = kc + (size_t)past * C, *v_new = vc + (size_t)past * C;
    blip2_layernorm(ws->a, ws->x, L->ln1_w, L->ln1_b, T, C, c->eps);
    blip2_matmul(ws->q, ws->a, L->q_w, L->q_b, T, C, C);
    blip2_matmul(k_new, ws->a, L->k_w, L->k_b, T, C, C);
    blip2_matmul(v_new, ws->a, L->v_w, L->v_b, T, C, C);
    for (size_t i = 0; i < (size_t)T * C; i++) ws->q[i] *= scaling;
    blip2_attention(ws->ctx, ws->q, kc, vc, ws->scores, T, past + T, c->NH, c->HS, C, C, 1.0f, 1);
    blip2_matmul(ws->a, ws->ctx, L->o_w, L->o_b, T, C, C);
    blip2_residual_add(ws->x, ws->a, (size_t)T * C);
    blip2_layernorm(ws->a, ws->x, L->ln2_w, L->ln2_b, T, C, c->eps);
    blip2_matmul(ws->mlp, ws->a, L->fc1_w, L->fc1_b, T, C, c->ffn);
    blip2_relu(ws->mlp, (size_t)T * c->ffn);
    blip2_matmul(ws->a, ws->mlp, L->fc2_w, L->fc2_b, T, c->ffn, C);
    blip2_residual_add(ws->x, ws->a, (size_t)T * C);
}

blip2_code blip2_opt_forward(const blip2_model *m, blip2_kv_cache *kv, const float *emb, int T, float *logits,
                             blip2_status *st) {
    const blip2_opt_config *c = &m->cfg.opt;
    if (T < 1 || kv->T + T > kv->max_T || kv->T + T > c->max_pos)
        return blip2_fail(st, BLIP2_ERANGE, "sequence of %d positions exceeds the limit (KV cache %d, model %d)", kv->T + T,
                          kv->max_T, c->max_pos);
    size_t TC = (size_t)T * c->C;
    opt_ws ws = {
        .x = malloc(sizeof(float) * TC),
        .a = malloc(sizeof(float) * TC),
        .q = malloc(sizeof(float) * TC),
        .ctx = malloc(sizeof(float) * TC),
        .mlp = malloc(sizeof(float) * T * c->ffn),
        .scores = malloc(sizeof(float) * (kv->T + T)),
    };
    blip2_code rc = BLIP2_OK;
    if (!ws.x || !ws.a || !ws.q || !ws.ctx || !ws.mlp || !ws.scores) {
        rc = blip2_fail(st, BLIP2_ENOMEM, "OPT: out of memory for %d positions", T);
    } else {
        memcpy(ws.x, emb, sizeof(float) * TC);
        blip2_add_rows(ws.x, m->opt.wpe, kv->T + 2, T, c->C); /* learned positions, offset 2 */
        size_t layer_stride = (size_t)kv->max_T * c->C;
        for (int l = 0; l < c->layers; l++)
            opt_layer_forward(c, &m->opt.layers[l], kv->k + l * layer_stride, kv->v + l * layer_stride, kv->T, T, &ws);
        kv->T += T;
        float *last = ws.x + (size_t)(T - 1) * c->C;
        blip2_layernorm(last, last, m->opt.ln_f_w, m->opt.ln_f_b, 1, c->C, c->eps);
        blip2_matmul(logits, last, m->opt.lm_head, NULL, 1, c->C, c->V);
    }
    free(ws.x);
    free(ws.a);
    free(ws.q);
    free(ws.ctx);
    free(ws.mlp);
    free(ws.scores);
    return rc;
}
