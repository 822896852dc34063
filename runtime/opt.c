/* OPT decoder (spec §3.4–3.5) over a paged KV cache, batched across sequences (continuous
 * batching). A decode step is one row per sequence: matrix-vector work bound by weight
 * bandwidth; a prefill chunk is many rows of one or more sequences. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
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

void blip2_opt_mark_image_rows(const blip2_config *c, const int32_t *ids, int n, int32_t *marked) {
    for (int t = 0; t < n; t++) marked[t] = ids[t] == c->image_token_id ? -1 : ids[t];
}

/* ---- workspace ---- */

/* Index ints one step needs on the backend: tokens, positions [T]; last rows [S]; meta [3S];
 * block tables [S · blocks of max_ctx] (block size 1 at worst). */
static size_t idx_ints(int max_tokens, int max_seqs, int max_ctx) {
    return 2 * (size_t)max_tokens + 4 * (size_t)max_seqs + (size_t)max_seqs * max_ctx;
}

blip2_code blip2_opt_ws_init(blip2_opt_ws *ws, const blip2_model *m, int max_tokens, int max_seqs, int max_ctx,
                             blip2_status *st) {
    memset(ws, 0, sizeof *ws);
    const blip2_ops *o = m->ops;
    const blip2_opt_shard *s = &m->shard;
    size_t T = (size_t)max_tokens, C = (size_t)m->cfg.opt.C, S = (size_t)max_seqs;
    ws->ops = o;
    ws->max_tokens = max_tokens;
    ws->max_seqs = max_seqs;
    ws->max_ctx = max_ctx;
    ws->idx_cap = idx_ints(max_tokens, max_seqs, max_ctx);
    ws->x = o->alloc(sizeof(float) * T * C);
    ws->h = o->alloc(blip2_wdtype_size(blip2_adtype(m)) * T * C);
    ws->qkv = o->alloc(sizeof(float) * T * 3 * s->C);
    ws->ctx = o->alloc(sizeof(float) * T * s->C);
    ws->mlp = o->alloc(sizeof(float) * T * s->ffn);
    ws->scores = o->alloc(sizeof(float) * (size_t)max_ctx);
    ws->last = o->alloc(sizeof(float) * S * C);
    ws->logits = o->alloc(sizeof(float) * S * s->V);
    ws->pick = o->alloc(sizeof(int32_t) * 2 * S);
    ws->idx = o->alloc(sizeof(int32_t) * ws->idx_cap);
    ws->host_idx = malloc(sizeof(int32_t) * ws->idx_cap);
    ws->host_pick = malloc(sizeof(int32_t) * 2 * S);
    ws->host_all = malloc(sizeof(blip2_scored_id) * S * (size_t)(s->world + 1));
    if (!ws->x || !ws->h || !ws->qkv || !ws->ctx || !ws->mlp || !ws->scores || !ws->last || !ws->logits ||
        !ws->pick || !ws->idx || !ws->host_idx || !ws->host_pick || !ws->host_all ||
        blip2_graph_cache_init(&ws->graphs, o, max_seqs, "decode step", st)) {
        blip2_opt_ws_free(ws);
        return blip2_fail(st, BLIP2_ENOMEM, "OPT workspace: out of %s memory for %d tokens per step", o->name, max_tokens);
    }
    return BLIP2_OK;
}

void blip2_opt_ws_free(blip2_opt_ws *ws) {
    const blip2_ops *o = ws->ops;
    if (o) {
        void *bufs[] = {ws->x, ws->h, ws->qkv, ws->ctx, ws->mlp, ws->scores, ws->last, ws->logits, ws->pick, ws->idx};
        for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) o->release(bufs[i]);
        blip2_graph_cache_free(&ws->graphs);
    }
    free(ws->host_idx);
    free(ws->host_pick);
    free(ws->host_all);
    memset(ws, 0, sizeof *ws);
}

/* ---- one step ---- */

/* Where the step's index arrays sit inside ws->idx (and ws->host_idx). */
typedef struct {
    int T, n_seqs, max_blocks;
    int32_t *tokens, *pos, *last, *meta, *tables; /* backend pointers */
} step_idx;

/* Packs tokens, positions (+2: OPT's learned-position offset), last rows, meta and block tables
 * (mb entries per sequence: at least the longest sequence's blocks) into host staging and
 * uploads them in one copy. */
static void upload_step(const blip2_kv_pool *kv, const blip2_seq_step *seqs, int n_seqs, const int32_t *tokens, int T,
                        int mb, blip2_opt_ws *ws, step_idx *ix) {
    int32_t *h = ws->host_idx;
    size_t o_pos = (size_t)T, o_last = 2 * (size_t)T, o_meta = o_last + n_seqs, o_tab = o_meta + 3 * (size_t)n_seqs;
    memcpy(h, tokens, sizeof(int32_t) * T);
    for (int i = 0, row = 0; i < n_seqs; row += seqs[i].n_new, i++) {
        for (int t = 0; t < seqs[i].n_new; t++) h[o_pos + row + t] = seqs[i].past + t + 2;
        h[o_last + i] = row + seqs[i].n_new - 1;
        h[o_meta + 3 * i] = row, h[o_meta + 3 * i + 1] = seqs[i].n_new, h[o_meta + 3 * i + 2] = seqs[i].past;
        int need = blip2_kv_blocks_for(seqs[i].past + seqs[i].n_new, kv->block_size);
        memcpy(h + o_tab + (size_t)i * mb, seqs[i].blocks, sizeof(int32_t) * need);
        for (int j = need; j < mb; j++) h[o_tab + (size_t)i * mb + j] = 0;
    }
    size_t n = o_tab + (size_t)n_seqs * mb;
    ws->ops->upload(ws->idx, h, sizeof(int32_t) * n);
    *ix = (step_idx){T, n_seqs, mb, ws->idx, ws->idx + o_pos, ws->idx + o_last, ws->idx + o_meta, ws->idx + o_tab};
}

/* The sum over the ranks (in place): a row-parallel matmul's partial products, the embedding's rows. */
static blip2_code reduce(const blip2_tp *tp, float *y, size_t n, blip2_status *st) {
    return tp->world > 1 ? tp->comm->ops->allreduce_sum(tp->comm, y, n, st) : BLIP2_OK;
}

/* Vocab-parallel embedding: each rank writes the rows it owns (its vocab slice; rank 0 also the
 * image rows) and zeros elsewhere, so one all-reduce assembles every row exactly (x + 0 = x).
 * Ends with x, the residual stream. */
static blip2_code opt_embed(const blip2_model *m, const blip2_tp *tp, const int32_t *tokens, const float *image_rows,
                            blip2_opt_ws *ws, const step_idx *ix, blip2_status *st) {
    const blip2_ops *o = m->ops;
    int C = m->cfg.opt.C;
    o->embedding_vp(ws->x, ix->tokens, m->opt.wte, m->wdtype, ix->T, C, m->shard.v0, m->shard.V);
    for (int t = 0, q = 0; tp->rank == 0 && image_rows && t < ix->T;) { /* runs of image rows, one upload each */
        if (tokens[t] >= 0) {
            t++;
            continue;
        }
        int run = 1;
        while (t + run < ix->T && tokens[t + run] < 0) run++;
        o->upload(ws->x + (size_t)t * C, image_rows + (size_t)q * C, sizeof(float) * run * C);
        t += run, q += run;
    }
    blip2_code rc = reduce(tp, ws->x, (size_t)ix->T * C, st);
    if (rc) return rc;
    o->add_rows_at(ws->x, m->opt.wpe, ix->pos, ix->T, C);
    return BLIP2_OK;
}

/* New keys/values into the layer's blocks, then every sequence attends over its own. A decode step
 * (one new row per sequence: T == n_seqs) hands them to the attention, which writes them itself
 * (one launch fewer a layer); a prefill chunk writes them first, so its rows can be spread over
 * blocks. */
static void opt_attention(const blip2_model *m, blip2_kv_pool *kv, int layer, const step_idx *ix, blip2_opt_ws *ws) {
    const blip2_ops *o = m->ops;
    int Cl = m->shard.C, decode = ix->T == ix->n_seqs;
    void *kp = blip2_kv_layer(kv, kv->k, layer), *vp = blip2_kv_layer(kv, kv->v, layer);
    const float *q = ws->qkv, *k = ws->qkv + Cl, *v = ws->qkv + 2 * Cl; /* rows of 3Cl */
    if (!decode)
        o->kv_write(kp, vp, kv->dtype, k, v, 3 * Cl, ix->tables, ix->max_blocks, ix->meta, ix->n_seqs, kv->block_size, Cl);
    o->attention_paged(ws->ctx, q, kp, vp, kv->dtype, decode ? k : NULL, decode ? v : NULL, ix->tables, ix->max_blocks,
                       ix->meta, ix->n_seqs, kv->block_size, ws->scores, ws->max_ctx, m->shard.NH, m->cfg.opt.HS,
                       3 * Cl, Cl, 1.0f / sqrtf((float)m->cfg.opt.HS), /* eager OPT scales q before q·kᵀ */
                       blip2_adtype(m)); /* what out_proj reads: no narrowing pass (ncu, batch 64: 3.3 µs a layer) */
}

/* A row-parallel matmul's product added into the residual stream x: rank 0 adds its partial
 * product and the bias to x, the other ranks overwrite their x with their partial product, and
 * the all-reduce sums them, so every rank holds x + Σ partials + bias with no separate add. */
static blip2_code add_row_parallel(const blip2_model *m, const blip2_tp *tp, float *x, const void *inp, int adtype,
                                   const float *w, const float *bias, int T, int C_in, int C, blip2_status *st) {
    if (tp->rank == 0) m->ops->matmul_acc_a(x, inp, w, bias, T, C_in, C, adtype, m->wdtype);
    else blip2_mm_a(m, x, inp, adtype, w, NULL, T, C_in, C, BLIP2_ACT_NONE);
    return reduce(tp, x, (size_t)T * C, st);
}

/* One pre-LN layer over all T rows of the step on this rank's heads and ffn slice, on the
 * residual stream x. Each norm is the prologue of the matmul after it (matmul_ln_a: one launch at
 * a decode step of one sequence, the norm kernel and the matmul otherwise) and each row-parallel
 * matmul adds into x itself (add_row_parallel): five launches at batch 1 (qkv, attention,
 * out_proj, fc1, fc2; a prefill chunk also writes its keys first) and two all-reduces. h (the
 * norm's output, where not fused) and fc1's output are in the activation type (blip2_adtype:
 * 16-bit on a device), which the matmuls read as they are: ncu (H100, batch 64) had the narrowing
 * before each cuBLASLt matmul at 8 % of a step. */
static blip2_code opt_layer_forward(const blip2_model *m, const blip2_tp *tp, blip2_kv_pool *kv, int layer,
                                    const step_idx *ix, blip2_opt_ws *ws, blip2_status *st) {
    const blip2_opt_config *c = &m->cfg.opt;
    const blip2_opt_shard *s = &m->shard;
    const blip2_opt_layer *L = &m->opt.layers[layer];
    int C = c->C, Cl = s->C, T = ix->T;
    blip2_mm_ln_ao(m, ws->qkv, BLIP2_W_F32, ws->h, ws->x, L->ln1_w, L->ln1_b, c->eps, L->qkv_w, L->qkv_b, NULL, T, C,
                   3 * Cl, BLIP2_ACT_NONE);
    opt_attention(m, kv, layer, ix, ws);
    blip2_code rc = add_row_parallel(m, tp, ws->x, ws->ctx, blip2_adtype(m), L->o_w, L->o_b, T, Cl, C, st);
    if (rc) return rc;
    int od = blip2_out16_type(m); /* 16-bit on a device: what fc2 reads, no narrowing pass */
    blip2_mm_ln_ao(m, ws->mlp, od, ws->h, ws->x, L->ln2_w, L->ln2_b, c->eps, L->fc1_w, L->fc1_b, L->fc1_b16, T, C, s->ffn,
                   BLIP2_ACT_RELU);
    return add_row_parallel(m, tp, ws->x, ws->mlp, od, L->fc2_w, L->fc2_b, T, s->ffn, C, st);
}

static blip2_code check_step(const blip2_model *m, const blip2_kv_pool *kv, const blip2_seq_step *seqs, int n_seqs,
                             const blip2_opt_ws *ws, int *T, int *mb, blip2_status *st) {
    *T = 0, *mb = 1;
    if (n_seqs < 1 || n_seqs > ws->max_seqs) return blip2_fail(st, BLIP2_EINTERNAL, "step of %d sequences", n_seqs);
    if (kv->ops != m->ops || ws->ops != m->ops)
        return blip2_fail(st, BLIP2_EINTERNAL, "KV cache or workspace on another backend than the model");
    if (kv->dtype != blip2_kv_dtype(m)) return blip2_fail(st, BLIP2_EINTERNAL, "KV cache of another type than the model's");
    for (int i = 0; i < n_seqs; i++) {
        int len = seqs[i].past + seqs[i].n_new;
        if (seqs[i].n_new < 1 || seqs[i].past < 0 || len > m->cfg.opt.max_pos || len > ws->max_ctx)
            return blip2_fail(st, BLIP2_ERANGE, "sequence of %d positions exceeds the limit (context %d, model %d)", len,
                              ws->max_ctx, m->cfg.opt.max_pos);
        *T += seqs[i].n_new;
        int need = blip2_kv_blocks_for(len, kv->block_size);
        *mb = need > *mb ? need : *mb;
    }
    if (*T > ws->max_tokens) return blip2_fail(st, BLIP2_EINTERNAL, "step of %d tokens > workspace %d", *T, ws->max_tokens);
    return BLIP2_OK;
}

/* Everything between the index upload and the logits: embed, the layers, the LM head. */
static blip2_code step_body(const blip2_model *m, const blip2_tp *tp, blip2_kv_pool *kv, const int32_t *tokens,
                            const float *image_rows, blip2_opt_ws *ws, const step_idx *ix, blip2_status *st) {
    const blip2_opt_config *c = &m->cfg.opt;
    blip2_code rc = opt_embed(m, tp, tokens, image_rows, ws, ix, st);
    for (int l = 0; !rc && l < c->layers; l++) rc = opt_layer_forward(m, tp, kv, l, ix, ws, st);
    if (rc) return rc;
    m->ops->gather_rows(ws->last, ws->x, ix->last, ix->n_seqs, c->C); /* only each sequence's last row needs logits */
    m->ops->layernorm(ws->last, ws->last, m->opt.ln_f_w, m->opt.ln_f_b, ix->n_seqs, c->C, c->eps); /* final norm */
    blip2_mm(m, ws->logits, ws->last, m->opt.lm_head, NULL, ix->n_seqs, c->C, m->shard.V, BLIP2_ACT_NONE); /* vocab slice */
    return BLIP2_OK;
}

/* A decode step (one new row per sequence, no image rows) whose every launch has fixed arguments
 * for a given batch size, once its block tables have a fixed stride: it can be a graph. */
static int graph_step(const blip2_tp *tp, const blip2_seq_step *seqs, int n_seqs, const int32_t *tokens,
                      const blip2_opt_ws *ws) {
    if (!ws->graphs.on || (tp->world > 1 && !tp->comm->graph_safe)) return 0;
    for (int i = 0; i < n_seqs; i++)
        if (seqs[i].n_new != 1 || tokens[i] < 0) return 0;
    return 1;
}

typedef struct {
    const blip2_model *m;
    const blip2_tp *tp;
    blip2_kv_pool *kv;
    const int32_t *tokens;
    blip2_opt_ws *ws;
    const step_idx *ix;
} step_args;

static blip2_code step_body_cb(void *ctx, blip2_status *st) {
    step_args *a = ctx;
    return step_body(a->m, a->tp, a->kv, a->tokens, NULL, a->ws, a->ix, st);
}

blip2_code blip2_opt_forward_batch(const blip2_model *m, const blip2_tp *tp, blip2_kv_pool *kv,
                                   const blip2_seq_step *seqs, int n_seqs, const int32_t *tokens,
                                   const float *image_rows, blip2_opt_ws *ws, blip2_status *st) {
    int T, mb;
    step_idx ix;
    blip2_code rc = check_step(m, kv, seqs, n_seqs, ws, &T, &mb, st);
    if (rc) return rc;
    int graph = graph_step(tp, seqs, n_seqs, tokens, ws);
    if (graph) mb = blip2_kv_blocks_for(ws->max_ctx, kv->block_size); /* a fixed table stride: fixed launches */
    upload_step(kv, seqs, n_seqs, tokens, T, mb, ws, &ix);
    if (graph) {
        step_args a = {m, tp, kv, tokens, ws, &ix};
        blip2_graph_cache_bind(&ws->graphs, kv); /* graphs hold the pool's addresses */
        if (blip2_graph_run(&ws->graphs, n_seqs, step_body_cb, &a, &rc, st)) return rc;
    }
    return step_body(m, tp, kv, tokens, image_rows, ws, &ix, st);
}

blip2_code blip2_opt_forward(const blip2_model *m, const blip2_tp *tp, blip2_kv_cache *kv, const int32_t *tokens, int T,
                             const float *image_rows, float *logits, blip2_status *st) {
    if (T < 1 || kv->T + T > kv->max_T)
        return blip2_fail(st, BLIP2_ERANGE, "sequence of %d positions exceeds the KV cache of %d", kv->T + T, kv->max_T);
    blip2_opt_ws ws;
    blip2_code rc = blip2_opt_ws_init(&ws, m, T, 1, kv->T + T, st);
    blip2_seq_step seq = {kv->table, kv->T, T};
    if (!rc) rc = blip2_opt_forward_batch(m, tp, &kv->pool, &seq, 1, tokens, image_rows, &ws, st);
    if (!rc) m->ops->download(logits, ws.logits, sizeof(float) * m->shard.V);
    if (!rc) rc = blip2_backend_check(m->ops, "OPT forward", st);
    if (!rc) kv->T += T;
    blip2_opt_ws_free(&ws);
    return rc;
}
