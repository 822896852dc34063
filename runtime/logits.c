/* Decisions over vocab-parallel logits: each rank holds ids [v0, v0 + V_local). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../kernels/ops.h"
#include "forward.h"

typedef struct {
    float value;
    int32_t id;
} scored_id;

/* a beats b: larger value; on equal values the lower id; NaN never wins. */
static int beats(scored_id a, scored_id b) {
    if (isnan(a.value)) return 0;
    if (isnan(b.value)) return 1;
    return a.value > b.value || (a.value == b.value && a.id < b.id);
}

blip2_code blip2_tp_argmax(const blip2_model *m, const blip2_tp *tp, const float *logits, int32_t *id, blip2_status *st) {
    const blip2_opt_shard *s = &m->shard;
    int local = blip2_argmax(logits, s->V);
    scored_id mine = {logits[local], s->v0 + local};
    if (tp->world == 1) {
        *id = mine.id;
        return BLIP2_OK;
    }
    scored_id *all = blip2_malloc(sizeof *all * (size_t)tp->world, st);
    if (!all) return BLIP2_ENOMEM;
    blip2_code rc = tp->comm->ops->allgather(tp->comm, &mine, all, sizeof mine, st);
    scored_id best = all[0];
    for (int r = 1; !rc && r < tp->world; r++)
        if (beats(all[r], best)) best = all[r];
    free(all);
    *id = best.id;
    return rc;
}

blip2_code blip2_tp_gather_logits(const blip2_model *m, const blip2_tp *tp, const float *logits, float *full,
                                  blip2_status *st) {
    int V = m->cfg.opt.V, W = tp->world;
    if (W == 1) {
        memcpy(full, logits, sizeof(float) * V);
        return BLIP2_OK;
    }
    size_t slot = blip2_part_size((size_t)V, W - 1, W); /* the largest part: parts grow with rank */
    float *send = blip2_calloc(slot, sizeof(float), st), *recv = blip2_malloc(sizeof(float) * slot * W, st);
    blip2_code rc = send && recv ? BLIP2_OK : BLIP2_ENOMEM;
    if (!rc) {
        memcpy(send, logits, sizeof(float) * m->shard.V);
        rc = tp->comm->ops->allgather(tp->comm, send, recv, sizeof(float) * slot, st);
    }
    for (int r = 0; !rc && r < W; r++)
        memcpy(full + blip2_part_begin((size_t)V, r, W), recv + slot * r, sizeof(float) * blip2_part_size((size_t)V, r, W));
    free(send);
    free(recv);
    return rc;
}
