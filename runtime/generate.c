/* The reference prefill: image → vision → Q-Former → projection → OPT over the prompt, with every
 * intermediate recorded. `blip2 generate --dump` and the parity tests use it; generation itself
 * goes through the engine. Collective under tensor parallelism: rank 0 runs the image side. */
#include <stdlib.h>
#include <string.h>

#include "forward.h"

const char *blip2_finish_name(blip2_finish f) {
    static const char *names[] = {"eos", "length", "stop", "cancelled"};
    return f >= 0 && f <= BLIP2_FINISH_CANCELLED ? names[f] : "?";
}

/* Image → projected query embeddings on rank 0, recording the intermediates asked for. */
static blip2_code encode_image(const blip2_model *m, const float *pixels, float *projected, blip2_trace *tr,
                               blip2_status *st) {
    blip2_encoder_ws ws;
    blip2_code rc = blip2_encoder_ws_init(&ws, m, 1, st);
    if (!rc) rc = blip2_encode_images(m, &ws, pixels, 1, tr->vision_out, tr->qformer_out, projected, st);
    if (!rc && tr->projected) memcpy(tr->projected, projected, sizeof(float) * m->cfg.Q * m->cfg.opt.C);
    blip2_encoder_ws_free(&ws);
    return rc;
}

blip2_code blip2_trace_prefill(const blip2_model *m, const blip2_tp *tp, const float *pixels, const int32_t *ids, int n,
                               blip2_trace *tr, blip2_status *st) {
    const blip2_config *c = &m->cfg;
    if (n < 1 || n > c->opt.max_pos) return blip2_fail(st, BLIP2_ERANGE, "prompt of %d tokens: must be 1..%d", n, c->opt.max_pos);
    blip2_code rc = blip2_opt_check_ids(c, ids, n, st);
    if (rc) return rc;
    float *projected = malloc(sizeof(float) * c->Q * c->opt.C), *logits = malloc(sizeof(float) * m->shard.V);
    int32_t *marked = malloc(sizeof(int32_t) * (size_t)n);
    blip2_kv_cache kv = {0};
    rc = projected && marked && logits ? BLIP2_OK : blip2_fail(st, BLIP2_ENOMEM, "out of memory");
    if (!rc) rc = blip2_kv_cache_init(&kv, m, n, st);
    if (!rc && tp->rank == 0) rc = encode_image(m, pixels, projected, tr, st);
    rc = blip2_tp_agree(tp, rc, st); /* the projection reaches the others through the embedding all-reduce */
    if (!rc) blip2_opt_mark_image_rows(c, ids, n, marked);
    if (!rc) rc = blip2_opt_forward(m, tp, &kv, marked, n, projected, logits, st);
    if (!rc && tr->prefill_logits) rc = blip2_tp_gather_logits(m, tp, logits, tr->prefill_logits, st);
    blip2_kv_cache_free(&kv);
    free(projected);
    free(marked);
    free(logits);
    return rc;
}
