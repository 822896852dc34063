/* Greedy generation for one image and one prompt, as transformers' generate() does it with the
 * checkpoint's generation config: argmax over all V logits, stop after eos (kept). */
#include <stdlib.h>
#include <string.h>

#include "../kernels/ops.h"
#include "forward.h"

const char *blip2_finish_name(blip2_finish f) { return f == BLIP2_FINISH_EOS ? "eos" : "length"; }

typedef struct {
    float *image;     /* [T, Cv] */
    float *query_out; /* [Q, Cq] */
    float *projected; /* [Q, Ct] */
    float *emb;       /* [n, Ct] */
    float *logits;    /* [V] */
} gen_bufs;

static blip2_code gen_bufs_alloc(const blip2_config *c, int n, gen_bufs *b, blip2_status *st) {
    b->image = malloc(sizeof(float) * c->vision.T * c->vision.C);
    b->query_out = malloc(sizeof(float) * c->Q * c->qformer.C);
    b->projected = malloc(sizeof(float) * c->Q * c->opt.C);
    b->emb = malloc(sizeof(float) * (size_t)n * c->opt.C);
    b->logits = malloc(sizeof(float) * c->opt.V);
    if (!b->image || !b->query_out || !b->projected || !b->emb || !b->logits)
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

/* Image → projected query embeddings, recording the intermediates the caller asked for. */
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

static blip2_code decode_loop(const blip2_model *m, blip2_kv_cache *kv, gen_bufs *b, int max_new, int32_t *out_ids,
                              int *n_out, blip2_finish *finish, blip2_status *st) {
    const blip2_config *c = &m->cfg;
    *n_out = 0;
    *finish = BLIP2_FINISH_LENGTH;
    while (*n_out < max_new) {
        int32_t next = blip2_argmax(b->logits, c->opt.V);
        out_ids[(*n_out)++] = next;
        if (next == c->eos_id) {
            *finish = BLIP2_FINISH_EOS;
            break;
        }
        if (*n_out == max_new || kv->T >= kv->max_T) break;
        blip2_embedding(b->emb, &next, m->opt.wte, 1, c->opt.C);
        blip2_code rc = blip2_opt_forward(m, kv, b->emb, 1, b->logits, st);
        if (rc) return rc;
    }
    return BLIP2_OK;
}

blip2_code blip2_generate_greedy(const blip2_model *m, const float *pixels, const int32_t *ids, int n, int max_new,
                                 int32_t *out_ids, int *n_out, blip2_finish *finish, blip2_trace *trace,
                                 blip2_status *st) {
    const blip2_config *c = &m->cfg;
    *n_out = 0;
    if (n < 1 || n > c->opt.max_pos)
        return blip2_fail(st, BLIP2_ERANGE, "prompt of %d tokens: must be 1..%d", n, c->opt.max_pos);
    if (max_new < 1) return blip2_fail(st, BLIP2_EINVAL, "max_new_tokens must be at least 1");
    int max_T = n + max_new - 1 < c->opt.max_pos ? n + max_new - 1 : c->opt.max_pos; /* last token needs no KV */
    gen_bufs b = {0};
    blip2_kv_cache kv = {0};
    blip2_code rc = gen_bufs_alloc(c, n, &b, st);
    if (!rc) rc = blip2_kv_cache_init(&kv, c, max_T, st);
    if (!rc) rc = encode_image(m, pixels, &b, trace, st);
    if (!rc) rc = blip2_opt_embed_inputs(m, ids, n, b.projected, b.emb, st);
    if (!rc) rc = blip2_opt_forward(m, &kv, b.emb, n, b.logits, st);
    if (!rc && trace) trace_copy(trace->prefill_logits, b.logits, (size_t)c->opt.V);
    if (!rc) rc = decode_loop(m, &kv, &b, max_new, out_ids, n_out, finish, st);
    blip2_kv_cache_free(&kv);
    gen_bufs_free(&b);
    return rc;
}
