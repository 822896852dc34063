/* OPT decoder (spec §3.4–3.5) over a contiguous KV cache. Prefill runs all prompt positions at
 * once; each decode step is one position (matrix-vector work, bound by weight bandwidth). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../kernels/ops.h"
#include "forward.h"

blip2_code blip2_kv_cache_init(blip2_kv_cache *kv, const blip2_model *m, int max_T, blip2_status *st) {
    memset(kv, 0, sizeof *kv);
    kv->layers = m->cfg.opt.layers;
    kv->C = m->shard.C; /* this rank's heads only */
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

blip2_code blip2_opt_check_ids(const blip2_config *c, const int32_t *ids, int n, blip2_status *st) {
    int count = 0;
    for (int t = 0; t < n; t++) {
        if (ids[t] < 0 || ids[t] >= c->opt.V)
            return blip2_fail(st, BLIP2_EINVAL, "input id %d at position %d is outside the vocabulary [0, %d)", ids[t], t,
                              c->opt.V);
        count += ids[t] == c->image_token_id;
    }
    if (count != c->Q)
        return blip2_fail(st, BLIP2_EINVAL, "the input has %d image tokens (%d) but the model has num_query_tokens = %d",
                          count, c->image_token_id, c->Q);
    return BLIP2_OK;
}

/* Vocab-parallel: each rank writes the rows it owns (its vocab slice; rank 0 the image rows) and
 * zeros elsewhere, so one all-reduce assembles every row exactly (x + 0 = x). */
blip2_code blip2_opt_embed_tokens(const blip2_model *m, const blip2_tp *tp, const int32_t *ids, int n,
                                  const float *projected, float *out, blip2_status *st) {
    const blip2_opt_shard *s = &m->shard;
    int C = m->cfg.opt.C, q = 0;
    memset(out, 0, sizeof(float) * (size_t)n * C);
    for (int t = 0; t < n; t++) {
        float *row = out + (size_t)t * C;
        if (projected && ids[t] == m->cfg.image_token_id) {
            if (tp->rank == 0) memcpy(row, projected + (size_t)q * C, sizeof(float) * C);
            q++;
        } else if (ids[t] >= s->v0 && ids[t] < s->v0 + s->V) {
            int32_t local = ids[t] - s->v0;
            blip2_embedding(row, &local, m->opt.wte, 1, C);
        }
    }
    return tp->comm->ops->allreduce_sum(tp->comm, out, (size_t)n * C, st);
}

blip2_code blip2_opt_embed_inputs(const blip2_model *m, const blip2_tp *tp, const int32_t *ids, int n,
                                  const float *projected, float *out, blip2_status *st) {
    blip2_code rc = blip2_opt_check_ids(&m->cfg, ids, n, st);
    return rc ? rc : blip2_opt_embed_tokens(m, tp, ids, n, projected, out, st);
}

typedef struct {
    float *x;      /* [T, Ct] residual stream */
    float *a;      /* [T, Ct] */
    float *q;      /* [T, Ct] */
    float *ctx;    /* [T, Ct] */
    float *mlp;    /* [T, ffn] */
    float *scores; /* [kv T after this step] */
} opt_ws;

/* y = all-reduce(partial) + bias: the row-parallel matmul's bias is added once, after the sum. */
static blip2_code reduce_bias(const blip2_tp *tp, float *y, const float *bias, int T, int C, blip2_status *st) {
    blip2_code rc = tp->comm->ops->allreduce_sum(tp->comm, y, (size_t)T * C, st);
    for (int t = 0; !rc && t < T; t++) blip2_residual_add(y + (size_t)t * C, bias, (size_t)C);
    return rc;
}

/* One pre-LN layer on this rank's heads and ffn slice; two all-reduces (after out_proj, fc2). */
static blip2_code opt_layer_forward(const blip2_model *m, const blip2_tp *tp, const blip2_opt_layer *L, float *kc,
                                    float *vc, int past, int T, opt_ws *ws, blip2_status *st) {
    const blip2_opt_config *c = &m->cfg.opt;
    const blip2_opt_shard *s = &m->shard;
    int C = c->C, Cl = s->C;
    float scaling = 1.0f / sqrtf((float)c->HS); /* eager OPT scales q before q·kᵀ */
    float *k_new = kc + (size_t)past * Cl, *v_new = vc + (size_t)past * Cl;
    blip2_layernorm(ws->a, ws->x, L->ln1_w, L->ln1_b, T, C, c->eps);
    blip2_matmul(ws->q, ws->a, L->q_w, L->q_b, T, C, Cl);
    blip2_matmul(k_new, ws->a, L->k_w, L->k_b, T, C, Cl);
    blip2_matmul(v_new, ws->a, L->v_w, L->v_b, T, C, Cl);
    for (size_t i = 0; i < (size_t)T * Cl; i++) ws->q[i] *= scaling;
    blip2_attention(ws->ctx, ws->q, kc, vc, ws->scores, T, past + T, s->NH, c->HS, Cl, Cl, 1.0f, 1);
    blip2_matmul(ws->a, ws->ctx, L->o_w, NULL, T, Cl, C);
    blip2_code rc = reduce_bias(tp, ws->a, L->o_b, T, C, st);
    if (rc) return rc;
    blip2_residual_add(ws->x, ws->a, (size_t)T * C);
    blip2_layernorm(ws->a, ws->x, L->ln2_w, L->ln2_b, T, C, c->eps);
    blip2_matmul(ws->mlp, ws->a, L->fc1_w, L->fc1_b, T, C, s->ffn);
    blip2_relu(ws->mlp, (size_t)T * s->ffn);
    blip2_matmul(ws->a, ws->mlp, L->fc2_w, NULL, T, s->ffn, C);
    rc = reduce_bias(tp, ws->a, L->fc2_b, T, C, st);
    if (!rc) blip2_residual_add(ws->x, ws->a, (size_t)T * C);
    return rc;
}

blip2_code blip2_opt_forward(const blip2_model *m, const blip2_tp *tp, blip2_kv_cache *kv, const float *emb, int T,
                             float *logits, blip2_status *st) {
    const blip2_opt_config *c = &m->cfg.opt;
    const blip2_opt_shard *s = &m->shard;
    if (T < 1 || kv->T + T > kv->max_T || kv->T + T > c->max_pos)
        return blip2_fail(st, BLIP2_ERANGE, "sequence of %d positions exceeds the limit (KV cache %d, model %d)", kv->T + T,
                          kv->max_T, c->max_pos);
    size_t TC = (size_t)T * c->C;
    opt_ws ws = {
        .x = malloc(sizeof(float) * TC),
        .a = malloc(sizeof(float) * TC),
        .q = malloc(sizeof(float) * T * s->C),
        .ctx = malloc(sizeof(float) * T * s->C),
        .mlp = malloc(sizeof(float) * T * s->ffn),
        .scores = malloc(sizeof(float) * (kv->T + T)),
    };
    blip2_code rc = BLIP2_OK;
    if (!ws.x || !ws.a || !ws.q || !ws.ctx || !ws.mlp || !ws.scores) {
        rc = blip2_fail(st, BLIP2_ENOMEM, "OPT: out of memory for %d positions", T);
    } else {
        memcpy(ws.x, emb, sizeof(float) * TC);
        blip2_add_rows(ws.x, m->opt.wpe, kv->T + 2, T, c->C); /* learned positions, offset 2 */
        size_t layer_stride = (size_t)kv->max_T * s->C;
        for (int l = 0; !rc && l < c->layers; l++)
            rc = opt_layer_forward(m, tp, &m->opt.layers[l], kv->k + l * layer_stride, kv->v + l * layer_stride, kv->T, T,
                                   &ws, st);
        if (!rc) {
            kv->T += T;
            float *last = ws.x + (size_t)(T - 1) * c->C;
            blip2_layernorm(last, last, m->opt.ln_f_w, m->opt.ln_f_b, 1, c->C, c->eps);
            blip2_matmul(logits, last, m->opt.lm_head, NULL, 1, c->C, s->V); /* this rank's vocab slice */
        }
    }
    free(ws.x);
    free(ws.a);
    free(ws.q);
    free(ws.ctx);
    free(ws.mlp);
    free(ws.scores);
    return rc;
}
