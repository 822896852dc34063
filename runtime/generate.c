/* Greedy generation for one image and one prompt, as transformers' generate() does it with the
 * checkpoint's generation config: argmax over all V logits, stop after eos (kept). Under tensor
 * parallelism every rank runs this in lock-step; rank 0 decides and broadcasts. */
#include <stdlib.h>
#include <string.h>

#include "../kernels/ops.h"
#include "forward.h"

const char *blip2_finish_name(blip2_finish f) {
    static const char *names[] = {"eos", "length", "stop", "cancelled"};
    return f >= 0 && f <= BLIP2_FINISH_CANCELLED ? names[f] : "?";
}

typedef struct {
    float *image;     /* [T, Cv] (rank 0) */
    float *query_out; /* [Q, Cq] (rank 0) */
    float *projected; /* [Q, Ct] */
    float *emb;       /* [n, Ct] */
    float *logits;    /* [V_local] */
} gen_bufs;

static blip2_code gen_bufs_alloc(const blip2_model *m, int rank, int n, gen_bufs *b, blip2_status *st) {
    const blip2_config *c = &m->cfg;
    if (rank == 0) {
        b->image = malloc(sizeof(float) * c->vision.T * c->vision.C);
        b->query_out = malloc(sizeof(float) * c->Q * c->qformer.C);
    }
    b->projected = malloc(sizeof(float) * c->Q * c->opt.C); /* read on rank 0 only */
    b->emb = malloc(sizeof(float) * (size_t)n * c->opt.C);
    b->logits = malloc(sizeof(float) * m->shard.V);
    if ((rank == 0 && (!b->image || !b->query_out)) || !b->projected || !b->emb || !b->logits)
        return blip2_fail(st, BLIP2_ENOMEM, "generate: out of memory");
    return BLIP2_OK;
}

static void gen_bufs_free(gen_bufs *b) {
    free(b->image);
    free(b->query_out);
    free(b->projected);
    free(b->emb);
    free(b->logits);
}

static void trace_copy(float *dst, const float *src, size_t n) {
    if (dst) memcpy(dst, src, sizeof(float) * n);
}

/* Image → projected query embeddings on rank 0, recording the intermediates asked for. */
static blip2_code encode_image(const blip2_model *m, const float *pixels, gen_bufs *b, blip2_trace *tr, blip2_status *st) {
    const blip2_config *c = &m->cfg;
    blip2_code rc = blip2_vision_forward(m, pixels, 1, b->image, st);
    if (!rc) rc = blip2_qformer_forward(m, b->image, 1, b->query_out, st);
    if (!rc) rc = blip2_project(m, b->query_out, 1, b->projected, st);
    if (!rc && tr) {
        trace_copy(tr->vision_out, b->image, (size_t)c->vision.T * c->vision.C);
        trace_copy(tr->qformer_out, b->query_out, (size_t)c->Q * c->qformer.C);
        trace_copy(tr->projected, b->projected, (size_t)c->Q * c->opt.C);
    }
    return rc;
}

/* Rank 0 runs vision + Q-Former and every rank learns the outcome. The projected queries reach
 * the other ranks through the embedding all-reduce (only rank 0 writes those rows). */
static blip2_code share_image(const blip2_model *m, const blip2_tp *tp, const float *pixels, gen_bufs *b, blip2_trace *tr,
                              blip2_status *st) {
    blip2_code rc = tp->rank == 0 ? encode_image(m, pixels, b, tr, st) : BLIP2_OK;
    return blip2_tp_agree(tp, rc, st);
}

/* The step command rank 0 broadcasts: the chosen id and whether generation goes on. */
typedef struct {
    int32_t id;
    int32_t go_on;
} step_cmd;

static blip2_code decide_step(const blip2_model *m, const blip2_tp *tp, const blip2_kv_cache *kv, const float *logits,
                              int n_out, int max_new, step_cmd *cmd, blip2_status *st) {
    blip2_code rc = blip2_tp_argmax(m, tp, logits, 1, &cmd->id, st);
    if (rc) return rc;
    cmd->go_on = cmd->id != m->cfg.eos_id && n_out + 1 < max_new && kv->T < kv->max_T;
    return tp->world > 1 ? tp->comm->ops->broadcast(tp->comm, cmd, sizeof *cmd, 0, st) : BLIP2_OK;
}

static blip2_code decode_loop(const blip2_model *m, const blip2_tp *tp, blip2_kv_cache *kv, gen_bufs *b, int max_new,
                              int32_t *out_ids, int *n_out, blip2_finish *finish, blip2_status *st) {
    *n_out = 0;
    *finish = BLIP2_FINISH_LENGTH;
    for (;;) {
        step_cmd cmd;
        blip2_code rc = decide_step(m, tp, kv, b->logits, *n_out, max_new, &cmd, st);
        if (rc) return rc;
        out_ids[(*n_out)++] = cmd.id;
        if (cmd.id == m->cfg.eos_id) *finish = BLIP2_FINISH_EOS;
        if (!cmd.go_on) return BLIP2_OK;
        rc = blip2_opt_embed_tokens(m, tp, &cmd.id, 1, NULL, b->emb, st);
        if (!rc) rc = blip2_opt_forward(m, tp, kv, b->emb, 1, b->logits, st);
        if (rc) return rc;
    }
}

blip2_code blip2_generate_greedy(const blip2_model *m, const blip2_tp *tp, const float *pixels, const int32_t *ids, int n,
                                 int max_new, int32_t *out_ids, int *n_out, blip2_finish *finish, blip2_trace *trace,
                                 blip2_status *st) {
    const blip2_config *c = &m->cfg;
    *n_out = 0;
    if (n < 1 || n > c->opt.max_pos)
        return blip2_fail(st, BLIP2_ERANGE, "prompt of %d tokens: must be 1..%d", n, c->opt.max_pos);
    if (max_new < 1) return blip2_fail(st, BLIP2_EINVAL, "max_new_tokens must be at least 1");
    blip2_code rc = blip2_opt_check_ids(c, ids, n, st);
    if (rc) return rc;
    int max_T = n + max_new - 1 < c->opt.max_pos ? n + max_new - 1 : c->opt.max_pos; /* last token needs no KV */
    gen_bufs b = {0};
    blip2_kv_cache kv = {0};
    rc = gen_bufs_alloc(m, tp->rank, n, &b, st);
    if (!rc) rc = blip2_kv_cache_init(&kv, m, max_T, st);
    rc = blip2_tp_agree(tp, rc, st);
    if (!rc) rc = share_image(m, tp, pixels, &b, trace, st);
    if (!rc) rc = blip2_opt_embed_inputs(m, tp, ids, n, b.projected, b.emb, st);
    if (!rc) rc = blip2_opt_forward(m, tp, &kv, b.emb, n, b.logits, st);
    if (!rc && trace && trace->prefill_logits) rc = blip2_tp_gather_logits(m, tp, b.logits, trace->prefill_logits, st);
    if (!rc) rc = decode_loop(m, tp, &kv, &b, max_new, out_ids, n_out, finish, st);
    blip2_kv_cache_free(&kv);
    gen_bufs_free(&b);
    return rc;
}
