/* Decisions over vocab-parallel logits: each rank holds ids [v0, v0 + V_local). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "forward.h"

typedef blip2_scored_id scored_id;

blip2_code blip2_tp_argmax(const blip2_model *m, const blip2_tp *tp, blip2_opt_ws *ws, int n, int32_t *ids,
                           blip2_status *st) {
    const blip2_opt_shard *s = &m->shard;
    if (n < 1 || n > ws->max_seqs) return blip2_fail(st, BLIP2_EINTERNAL, "argmax of %d rows", n);
    /* each row's local winner on the backend; only (id, value) pairs come back, in one copy */
    ws->ops->argmax_rows(ws->pick, (float *)(ws->pick + n), ws->logits, n, s->V);
    ws->ops->download(ws->host_pick, ws->pick, sizeof(int32_t) * 2 * (size_t)n);
    blip2_code rc = blip2_backend_check(ws->ops, "argmax", st);
    scored_id *all = ws->host_all, *mine = all + (size_t)n * tp->world;
    for (int i = 0; i < n; i++) {
        float v;
        memcpy(&v, ws->host_pick + n + i, sizeof v);
        mine[i] = rc ? (scored_id){NAN, 0} : (scored_id){v, s->v0 + ws->host_pick[i]};
    }
    blip2_code g = tp->comm->ops->allgather(tp->comm, mine, all, sizeof *mine * (size_t)n, st); /* even after a local
                                                                     failure: the peers are waiting in it */
    if (!rc) rc = g;
    for (int i = 0; !rc && i < n; i++) {
        scored_id best = all[i];
        for (int r = 1; r < tp->world; r++)
            if (blip2_scored_before(all[(size_t)r * n + i], best)) best = all[(size_t)r * n + i];
        ids[i] = best.id;
    }
    return rc;
}

blip2_code blip2_tp_logprobs(const blip2_model *m, const blip2_tp *tp, blip2_opt_ws *ws, int n, const uint8_t *which,
                             blip2_status *st) {
    const blip2_ops *o = ws->ops;
    int W = tp->world;
    if (n < 1 || n > ws->max_seqs) return blip2_fail(st, BLIP2_EINTERNAL, "log-probabilities of %d rows", n);
    float *dev = (float *)ws->pick, *host = (float *)ws->host_pick; /* [2n]: (max, sum) per row, then the shifts */
    o->logsumexp_rows(dev, ws->logits, n, m->shard.V);
    o->download(host, dev, sizeof(float) * 2 * (size_t)n);
    blip2_code rc = blip2_backend_check(o, "log-sum-exp", st);
    float *all = (float *)ws->host_all, *mine = all + (size_t)2 * n * W; /* host_all holds (W + 1)·n pairs */
    for (int i = 0; i < 2 * n; i++) mine[i] = rc ? NAN : host[i];
    blip2_code g = tp->comm->ops->allgather(tp->comm, mine, all, sizeof(float) * 2 * (size_t)n, st); /* joined even after rc */
    if (!rc) rc = g;
    if (rc) return rc;
    for (int i = 0; i < n; i++) { /* the same arithmetic in the same order on every rank */
        double mx = -INFINITY, sum = 0;
        for (int r = 0; r < W; r++)
            if (all[2 * ((size_t)r * n + i) + 1] > 0) mx = fmax(mx, all[2 * ((size_t)r * n + i)]);
        for (int r = 0; r < W; r++) {
            const float *p = all + 2 * ((size_t)r * n + i);
            if (p[1] > 0) sum += p[1] * exp(p[0] - mx);
        }
        host[i] = which[i] && sum > 0 ? (float)(mx + log(sum)) : 0.0f;
    }
    o->upload(dev, host, sizeof(float) * (size_t)n);
    o->shift_rows(ws->logits, dev, n, m->shard.V);
    return BLIP2_OK;
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

blip2_code blip2_backend_check(const blip2_ops *ops, const char *what, blip2_status *st) {
    char err[256] = "";
    if (!ops->sync(err, sizeof err)) return BLIP2_OK;
    return blip2_fail(st, BLIP2_EINTERNAL, "%s on %s: %s", what, ops->name, err);
}
