/* OPT decoder (spec §3.4–3.5) over a contiguous KV cache. Prefill runs all prompt positions at
 * once; each decode step is one position (matrix-vector work, bound by weight bandwidth). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../kernels/ops.h"
#include "forward.h"

#define SINGLE_BLOCK_SIZE 16

blip2_code blip2_kv_cache_init(blip2_kv_cache *kv, const blip2_model *m, int max_T, blip2_status *st) {
    memset(kv, 0, sizeof *kv);
    int n = blip2_kv_blocks_for(max_T, SINGLE_BLOCK_SIZE);
    kv->max_T = max_T;
    kv->table = blip2_malloc(sizeof(int32_t) * (size_t)n, st);
    blip2_code rc = kv->table ? blip2_kv_pool_init(&kv->pool, m, n, SINGLE_BLOCK_SIZE, st) : BLIP2_ENOMEM;
    if (!rc) blip2_kv_pool_alloc(&kv->pool, n, kv->table);
    if (rc) blip2_kv_cache_free(kv);
    return rc;
}

void blip2_kv_cache_free(blip2_kv_cache *kv) {
    blip2_kv_pool_free(&kv->pool);
    free(kv->table);
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
                                  const float *image_rows, float *out, blip2_status *st) {
    const blip2_opt_shard *s = &m->shard;
    int C = m->cfg.opt.C, q = 0;
    memset(out, 0, sizeof(float) * (size_t)n * C);
    for (int t = 0; t < n; t++) {
        float *row = out + (size_t)t * C;
        if (ids[t] < 0) {
            if (tp->rank == 0) memcpy(row, image_rows + (size_t)q * C, sizeof(float) * C);
            q++;
        } else if (ids[t] >= s->v0 && ids[t] < s->v0 + s->V) {
            int32_t local = ids[t] - s->v0;
            blip2_embedding(row, &local, m->opt.wte, 1, C);
        }
    }
    return tp->comm->ops->allreduce_sum(tp->comm, out, (size_t)n * C, st);
}

void blip2_opt_mark_image_rows(const blip2_config *c, const int32_t *ids, int n, int32_t *marked) {
    for (int t = 0; t < n; t++) marked[t] = ids[t] == c->image_token_id ? -1 : ids[t];
}

blip2_code blip2_opt_embed_inputs(const blip2_model *m, const blip2_tp *tp, const int32_t *ids, int n,
                                  const float *projected, float *out, blip2_status *st) {
    blip2_code rc = blip2_opt_check_ids(&m->cfg, ids, n, st);
    int32_t *marked = rc ? NULL : blip2_malloc(sizeof(int32_t) * (size_t)n, st);
    if (!rc && !marked) rc = BLIP2_ENOMEM;
    if (!rc) {
        blip2_opt_mark_image_rows(&m->cfg, ids, n, marked);
        rc = blip2_opt_embed_tokens(m, tp, marked, n, projected, out, st);
    }
    free(marked);
    return rc;
}

blip2_code blip2_opt_ws_init(blip2_opt_ws *ws, const blip2_model *m, int max_tokens, int max_seqs, int max_ctx,
                             blip2_status *st) {
    memset(ws, 0, sizeof *ws);
    const blip2_opt_shard *s = &m->shard;
    size_t T = (size_t)max_tokens, C = (size_t)m->cfg.opt.C;
    ws->max_tokens = max_tokens;
    ws->max_seqs = max_seqs;
    ws->max_ctx = max_ctx;
    ws->x = malloc(sizeof(float) * T * C);
    ws->a = malloc(sizeof(float) * T * C);
    ws->q = malloc(sizeof(float) * T * s->C);
    ws->k = malloc(sizeof(float) * T * s->C);
    ws->v = malloc(sizeof(float) * T * s->C);
    ws->ctx = malloc(sizeof(float) * T * s->C);
    ws->mlp = malloc(sizeof(float) * T * s->ffn);
    ws->scores = malloc(sizeof(float) * (size_t)max_ctx);
    ws->last = malloc(sizeof(float) * (size_t)max_seqs * C);
    if (!ws->x || !ws->a || !ws->q || !ws->k || !ws->v || !ws->ctx || !ws->mlp || !ws->scores || !ws->last) {
        blip2_opt_ws_free(ws);
        return blip2_fail(st, BLIP2_ENOMEM, "OPT workspace: out of memory for %d tokens per step", max_tokens);
    }
    return BLIP2_OK;
}

void blip2_opt_ws_free(blip2_opt_ws *ws) {
    free(ws->x);
    free(ws->a);
    free(ws->q);
    free(ws->k);
    free(ws->v);
    free(ws->ctx);
    free(ws->mlp);
    free(ws->scores);
    free(ws->last);
    memset(ws, 0, sizeof *ws);
}

/* y = all-reduce(partial) + bias: the row-parallel matmul's bias is added once, after the sum. */
static blip2_code reduce_bias(const blip2_tp *tp, float *y, const float *bias, int T, int C, blip2_status *st) {
    blip2_code rc = tp->comm->ops->allreduce_sum(tp->comm, y, (size_t)T * C, st);
    for (int t = 0; !rc && t < T; t++) blip2_residual_add(y + (size_t)t * C, bias, (size_t)C);
    return rc;
}

/* New keys/values of every sequence into its blocks, then each sequence attends over its own. */
static void opt_attention(const blip2_model *m, blip2_kv_pool *kv, int layer, const blip2_seq_step *seqs, int n_seqs,
                          blip2_opt_ws *ws) {
    const blip2_opt_shard *s = &m->shard;
    int Cl = s->C;
    size_t layer_off = (size_t)layer * kv->n_blocks * kv->block_size * Cl;
    float scaling = 1.0f / sqrtf((float)m->cfg.opt.HS); /* eager OPT scales q before q·kᵀ */
    int off = 0;
    for (int i = 0; i < n_seqs; i++) {
        const blip2_seq_step *q = &seqs[i];
        for (int t = 0; t < q->n_new; t++) {
            memcpy(blip2_kv_row(kv, kv->k, layer, q->blocks, q->past + t), ws->k + (size_t)(off + t) * Cl, sizeof(float) * Cl);
            memcpy(blip2_kv_row(kv, kv->v, layer, q->blocks, q->past + t), ws->v + (size_t)(off + t) * Cl, sizeof(float) * Cl);
        }
        float *qi = ws->q + (size_t)off * Cl;
        for (size_t j = 0; j < (size_t)q->n_new * Cl; j++) qi[j] *= scaling;
        blip2_attention_paged(ws->ctx + (size_t)off * Cl, qi, kv->k + layer_off, kv->v + layer_off, q->blocks,
                              kv->block_size, ws->scores, q->n_new, q->past + q->n_new, s->NH, m->cfg.opt.HS, Cl, Cl, 1.0f);
        off += q->n_new;
    }
}

/* One pre-LN layer over all T rows of the step on this rank's heads and ffn slice; two
 * all-reduces (after out_proj and fc2). */
static blip2_code opt_layer_forward(const blip2_model *m, const blip2_tp *tp, blip2_kv_pool *kv, int layer,
                                    const blip2_seq_step *seqs, int n_seqs, int T, blip2_opt_ws *ws, blip2_status *st) {
    const blip2_opt_config *c = &m->cfg.opt;
    const blip2_opt_shard *s = &m->shard;
    const blip2_opt_layer *L = &m->opt.layers[layer];
    int C = c->C, Cl = s->C;
    blip2_layernorm(ws->a, ws->x, L->ln1_w, L->ln1_b, T, C, c->eps);
    blip2_matmul(ws->q, ws->a, L->q_w, L->q_b, T, C, Cl);
    blip2_matmul(ws->k, ws->a, L->k_w, L->k_b, T, C, Cl);
    blip2_matmul(ws->v, ws->a, L->v_w, L->v_b, T, C, Cl);
    opt_attention(m, kv, layer, seqs, n_seqs, ws);
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

static blip2_code check_step(const blip2_model *m, const blip2_kv_pool *kv, const blip2_seq_step *seqs, int n_seqs,
                             const blip2_opt_ws *ws, int *T, blip2_status *st) {
    *T = 0;
    if (n_seqs < 1 || n_seqs > ws->max_seqs) return blip2_fail(st, BLIP2_EINTERNAL, "step of %d sequences", n_seqs);
    for (int i = 0; i < n_seqs; i++) {
        int len = seqs[i].past + seqs[i].n_new;
        if (seqs[i].n_new < 1 || len > m->cfg.opt.max_pos || len > ws->max_ctx)
            return blip2_fail(st, BLIP2_ERANGE, "sequence of %d positions exceeds the limit (context %d, model %d)", len,
                              ws->max_ctx, m->cfg.opt.max_pos);
        (void)kv;
        *T += seqs[i].n_new;
    }
    if (*T > ws->max_tokens) return blip2_fail(st, BLIP2_EINTERNAL, "step of %d tokens > workspace %d", *T, ws->max_tokens);
    return BLIP2_OK;
}

blip2_code blip2_opt_forward_batch(const blip2_model *m, const blip2_tp *tp, blip2_kv_pool *kv,
                                   const blip2_seq_step *seqs, int n_seqs, const float *emb, blip2_opt_ws *ws,
                                   float *logits, blip2_status *st) {
    const blip2_opt_config *c = &m->cfg.opt;
    int T;
    blip2_code rc = check_step(m, kv, seqs, n_seqs, ws, &T, st);
    if (rc) return rc;
    memcpy(ws->x, emb, sizeof(float) * (size_t)T * c->C);
    for (int i = 0, off = 0; i < n_seqs; off += seqs[i].n_new, i++) /* learned positions, offset 2 */
        blip2_add_rows(ws->x + (size_t)off * c->C, m->opt.wpe, seqs[i].past + 2, seqs[i].n_new, c->C);
    for (int l = 0; !rc && l < c->layers; l++) rc = opt_layer_forward(m, tp, kv, l, seqs, n_seqs, T, ws, st);
    if (rc) return rc;
    for (int i = 0, off = 0; i < n_seqs; i++) { /* only each sequence's last new row needs logits */
        off += seqs[i].n_new;
        memcpy(ws->last + (size_t)i * c->C, ws->x + (size_t)(off - 1) * c->C, sizeof(float) * c->C);
    }
    blip2_layernorm(ws->last, ws->last, m->opt.ln_f_w, m->opt.ln_f_b, n_seqs, c->C, c->eps);
    blip2_matmul(logits, ws->last, m->opt.lm_head, NULL, n_seqs, c->C, m->shard.V); /* this rank's vocab slice */
    return BLIP2_OK;
}

blip2_code blip2_opt_forward(const blip2_model *m, const blip2_tp *tp, blip2_kv_cache *kv, const float *emb, int T,
                             float *logits, blip2_status *st) {
    if (T < 1 || kv->T + T > kv->max_T)
        return blip2_fail(st, BLIP2_ERANGE, "sequence of %d positions exceeds the KV cache of %d", kv->T + T, kv->max_T);
    blip2_opt_ws ws;
    blip2_code rc = blip2_opt_ws_init(&ws, m, T, 1, kv->T + T, st);
    blip2_seq_step seq = {kv->table, kv->T, T};
    if (!rc) rc = blip2_opt_forward_batch(m, tp, &kv->pool, &seq, 1, emb, &ws, logits, st);
    if (!rc) kv->T += T;
    blip2_opt_ws_free(&ws);
    return rc;
}
