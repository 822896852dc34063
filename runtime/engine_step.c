#include "engine_step.h"

#include "backend.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define HEADER STEP_DESC_HEADER

/* The penalty section: offsets [n_seqs + 1], penalties [n_seqs], ids. */
static int pen_section_len(int n_seqs, int n_ids) { return 2 * n_seqs + 1 + n_ids; }

blip2_code step_desc_init(step_desc *d, int max_batch, int max_tokens, int max_blocks_per_seq, int max_pen_ids,
                          blip2_status *st) {
    memset(d, 0, sizeof *d);
    if (max_batch > 1024) return blip2_fail(st, BLIP2_EINVAL, "max batch %d > 1024", max_batch);
    d->max_batch = max_batch;
    d->max_tokens = max_tokens;
    d->max_blocks_per_seq = max_blocks_per_seq;
    d->max_copies = max_batch; /* at most one (the last, partly filled block) per sequence */
    d->max_pen_ids = max_pen_ids;
    d->cap = HEADER + 2 * d->max_copies + max_batch * (4 + max_blocks_per_seq) + max_tokens +
             pen_section_len(max_batch, max_pen_ids);
    d->buf = blip2_malloc(sizeof(int32_t) * (size_t)d->cap, st);
    return d->buf ? BLIP2_OK : BLIP2_ENOMEM;
}

void step_desc_free(step_desc *d) {
    free(d->buf);
    memset(d, 0, sizeof *d);
}

void step_desc_begin(step_desc *d, int op) {
    d->buf[0] = op;
    d->buf[1] = d->buf[2] = d->buf[3] = d->buf[4] = 0;
    d->len = HEADER;
}

void step_desc_add_copy(step_desc *d, int32_t src, int32_t dst) {
    d->buf[d->len++] = src;
    d->buf[d->len++] = dst;
    d->buf[3]++;
}

void step_desc_add_seq(step_desc *d, int past, int n_new, int mode, const int32_t *blocks, int n_blocks) {
    int32_t *p = d->buf + d->len;
    p[0] = past, p[1] = n_new, p[2] = mode, p[3] = n_blocks;
    memcpy(p + 4, blocks, sizeof(int32_t) * (size_t)n_blocks);
    d->len += 4 + n_blocks;
    d->buf[1]++;
}

void step_desc_add_tokens(step_desc *d, const int32_t *tokens, int n) {
    memcpy(d->buf + d->len, tokens, sizeof(int32_t) * (size_t)n);
    d->len += n;
    d->buf[2] += n;
}

void step_desc_add_penalties(step_desc *d, const int32_t *offs, const float *pen, const int32_t *ids) {
    int n = d->buf[1], n_ids = offs[n];
    if (n_ids == 0) return;
    int32_t *p = d->buf + d->len;
    memcpy(p, offs, sizeof(int32_t) * (size_t)(n + 1));
    memcpy(p + n + 1, pen, sizeof(float) * (size_t)n);
    memcpy(p + 2 * n + 1, ids, sizeof(int32_t) * (size_t)n_ids);
    d->len += pen_section_len(n, n_ids);
    d->buf[4] = n_ids;
}

blip2_code step_desc_share(step_desc *d, const blip2_tp *tp, blip2_status *st) {
    if (tp->world == 1) return BLIP2_OK;
    blip2_comm *c = tp->comm;
    blip2_code rc = c->ops->broadcast(c, &d->len, sizeof d->len, 0, st);
    if (!rc && (d->len < HEADER || d->len > d->cap))
        return blip2_fail(st, BLIP2_EINTERNAL, "step descriptor of %d ints (capacity %d)", d->len, d->cap);
    return rc ? rc : c->ops->broadcast(c, d->buf, sizeof(int32_t) * (size_t)d->len, 0, st);
}

/* Offsets that start at 0, never go down and end at n_pen_ids (the ids themselves may be any
 * value: the op skips those outside a slice). */
static blip2_code check_penalties(step_view *v, const int32_t *sec, blip2_status *st) {
    int ok = sec[0] == 0 && sec[v->n_seqs] == v->n_pen_ids;
    for (int i = 0; ok && i < v->n_seqs; i++) ok = sec[i + 1] >= sec[i];
    if (!ok) return blip2_fail(st, BLIP2_EINTERNAL, "bad penalty offsets in step descriptor");
    v->pen_offs = sec;
    return BLIP2_OK;
}

/* Bounds-checked decode: a follower never trusts a length it did not check. */
blip2_code step_desc_view(const step_desc *d, step_view *v, blip2_status *st) {
    const int32_t *b = d->buf;
    v->op = b[0], v->n_seqs = b[1], v->n_tokens = b[2], v->n_copies = b[3], v->n_pen_ids = b[4];
    v->pen_offs = NULL;
    int pos = HEADER;
    if (v->n_seqs < 0 || v->n_seqs > d->max_batch || v->n_tokens < 0 || v->n_tokens > d->max_tokens ||
        v->n_copies < 0 || v->n_copies > d->max_copies || v->n_pen_ids < 0 || v->n_pen_ids > d->max_pen_ids)
        return blip2_fail(st, BLIP2_EINTERNAL, "bad step descriptor header");
    v->copies = b + pos;
    pos += 2 * v->n_copies;
    int tokens = 0;
    for (int i = 0; i < v->n_seqs; i++) {
        if (pos + 4 > d->len) return blip2_fail(st, BLIP2_EINTERNAL, "truncated step descriptor");
        int nb = b[pos + 3];
        if (nb < 0 || nb > d->max_blocks_per_seq || pos + 4 + nb > d->len)
            return blip2_fail(st, BLIP2_EINTERNAL, "bad block table in step descriptor");
        v->seqs[i] = (blip2_seq_step){b + pos + 4, b[pos], b[pos + 1]};
        v->modes[i] = b[pos + 2];
        tokens += b[pos + 1];
        pos += 4 + nb;
    }
    int pen_len = v->n_pen_ids ? pen_section_len(v->n_seqs, v->n_pen_ids) : 0;
    if (tokens != v->n_tokens || pos + v->n_tokens + pen_len != d->len)
        return blip2_fail(st, BLIP2_EINTERNAL, "inconsistent step descriptor");
    v->tokens = b + pos;
    return v->n_pen_ids ? check_penalties(v, b + pos + v->n_tokens, st) : BLIP2_OK;
}

blip2_code step_exec_init(step_exec *x, const blip2_model *m, const blip2_tp *tp, int max_batch, int max_tokens,
                          int n_blocks, int block_size, blip2_status *st) {
    memset(x, 0, sizeof *x);
    x->m = m;
    x->tp = tp;
    int max_pos = m->cfg.opt.max_pos, bps = blip2_kv_blocks_for(max_pos, block_size);
    int max_pen = max_batch * (max_pos < m->cfg.opt.V ? max_pos : m->cfg.opt.V); /* distinct ids of each history */
    blip2_code rc = blip2_kv_pool_init(&x->kv, m, n_blocks, block_size, st);
    if (!rc) rc = blip2_opt_ws_init(&x->ws, m, max_tokens, max_batch, max_pos, st);
    if (!rc) rc = step_desc_init(&x->desc, max_batch, max_tokens, bps, max_pen, st);
    if (rc) {
        step_exec_free(x);
        return rc;
    }
    size_t Vl = (size_t)m->shard.V;
    x->row = malloc(sizeof(float) * Vl);
    x->full = malloc(sizeof(float) * max_batch * (size_t)m->cfg.opt.V);
    x->picks = malloc(sizeof(int32_t) * max_batch);
    x->all_picks = malloc(sizeof(int32_t) * max_batch);
    size_t nk = (size_t)max_batch * BLIP2_TOPK_MAX;
    x->cand_ids = malloc(sizeof(int32_t) * nk);
    x->cand_vals = malloc(sizeof(float) * nk);
    x->cand_ok = malloc((size_t)max_batch);
    x->cand_dev = m->ops->alloc(sizeof(int32_t) * 2 * nk);
    x->cand_host = malloc(sizeof(int32_t) * 2 * nk);
    x->cand_all = malloc(sizeof(blip2_scored_id) * nk * (size_t)(tp->world + 1));
    x->pen_dev = m->ops->alloc(sizeof(int32_t) * (size_t)pen_section_len(max_batch, max_pen));
    x->pen_host = malloc(sizeof(int32_t) * (size_t)pen_section_len(max_batch, max_pen));
    x->beam_rows = malloc((size_t)max_batch);
    if (!x->row || !x->full || !x->picks || !x->all_picks || !x->cand_ids || !x->cand_vals || !x->cand_ok || !x->cand_dev ||
        !x->cand_host || !x->cand_all || !x->pen_dev || !x->pen_host || !x->beam_rows) {
        step_exec_free(x);
        return blip2_fail(st, BLIP2_ENOMEM, "engine: out of memory for step buffers");
    }
    return BLIP2_OK;
}

void step_exec_free(step_exec *x) {
    blip2_kv_pool_free(&x->kv);
    blip2_opt_ws_free(&x->ws);
    step_desc_free(&x->desc);
    free(x->row);
    free(x->full);
    free(x->picks);
    free(x->all_picks);
    free(x->cand_ids);
    free(x->cand_vals);
    free(x->cand_ok);
    if (x->m) x->m->ops->release(x->cand_dev);
    if (x->m) x->m->ops->release(x->pen_dev);
    free(x->pen_host);
    free(x->beam_rows);
    free(x->cand_host);
    free(x->cand_all);
    memset(x, 0, sizeof *x);
}

/* Whole-block copies (copy-on-write of a beam's partly filled last block). Destinations are
 * fresh blocks, never a source of the same step. */
static void copy_blocks(step_exec *x, const int32_t *pairs, int n) {
    blip2_kv_pool *kv = &x->kv;
    size_t bsz = blip2_kv_block_layer_bytes(kv), layer = (size_t)kv->n_blocks * bsz; /* a block's bytes in every layer */
    char *pools[2] = {kv->k, kv->v};
    for (int p = 0; p < 2; p++)
        for (int i = 0; i < n; i++)
            kv->ops->copy_rows(pools[p] + pairs[2 * i + 1] * bsz, pools[p] + pairs[2 * i] * bsz, bsz, (size_t)kv->layers, layer);
}

static blip2_code check_blocks(const step_exec *x, const step_view *v, blip2_status *st) {
    for (int i = 0; i < 2 * v->n_copies; i++)
        if (v->copies[i] < 0 || v->copies[i] >= x->kv.n_blocks) return blip2_fail(st, BLIP2_EINTERNAL, "bad block id in copy");
    for (int i = 0; i < v->n_seqs; i++) {
        int need = blip2_kv_blocks_for(v->seqs[i].past + v->seqs[i].n_new, x->kv.block_size);
        for (int j = 0; j < need; j++)
            if (v->seqs[i].blocks[j] < 0 || v->seqs[i].blocks[j] >= x->kv.n_blocks)
                return blip2_fail(st, BLIP2_EINTERNAL, "bad block id in table");
    }
    return BLIP2_OK;
}

/* The step's repetition penalties on each rank's logits slice: one small upload, one launch. Single
 * sequences' go on their logits right after the forward (beams = 0); beams' on their
 * log-probabilities (beams = 1): the other rows' penalties are set to 1 (multiplying or dividing
 * by 1 changes nothing). */
static void apply_penalties(step_exec *x, const step_view *v, int beams) {
    const blip2_model *m = x->m;
    int n = v->n_seqs, len = pen_section_len(n, v->n_pen_ids), mine = 0;
    memcpy(x->pen_host, v->pen_offs, sizeof(int32_t) * (size_t)len);
    float *pen = (float *)(x->pen_host + n + 1), one = 1.0f;
    for (int i = 0; i < n; i++) {
        if ((logits_beam_n(v->modes[i]) > 0) != beams) memcpy(&pen[i], &one, sizeof one);
        else mine += v->pen_offs[i + 1] - v->pen_offs[i];
    }
    if (!mine) return; /* every penalised row is of the other kind */
    m->ops->upload(x->pen_dev, x->pen_host, sizeof(int32_t) * (size_t)len);
    m->ops->penalize_rows(x->ws.logits, x->pen_dev + 2 * n + 1, x->pen_dev, (const float *)(x->pen_dev + n + 1), n,
                          m->shard.V, m->shard.v0);
}

/* The k best logits of every row on the backend (each rank over its vocab slice), one download,
 * one all-gather, then per LOGITS_TOPK or LOGITS_BEAM row the k best of all ranks' and (top-k)
 * whether they decide exactly (the same answer on every rank). A few hundred bytes per row
 * instead of the V floats. */
static blip2_code pick_candidates(step_exec *x, const step_view *v, int k, blip2_status *st) {
    const blip2_model *m = x->m;
    int n = v->n_seqs, Vl = m->shard.V, W = x->tp->world;
    size_t nk = (size_t)n * k;
    if (k > Vl || W > 64) return blip2_fail(st, BLIP2_EINTERNAL, "%d candidates from %d vocab slices of %d", k, W, Vl);
    m->ops->topk_rows(x->cand_dev, (float *)(x->cand_dev + nk), x->ws.logits, n, Vl, k);
    m->ops->download(x->cand_host, x->cand_dev, sizeof(int32_t) * 2 * nk);
    blip2_code rc = blip2_backend_check(m->ops, "top-k candidates", st);
    blip2_scored_id *all = x->cand_all, *mine = all + nk * W;
    for (size_t i = 0; i < nk; i++) {
        float val;
        memcpy(&val, x->cand_host + nk + i, sizeof val);
        mine[i] = rc ? (blip2_scored_id){NAN, 0} : (blip2_scored_id){val, m->shard.v0 + x->cand_host[i]};
    }
    blip2_code g = x->tp->comm->ops->allgather(x->tp->comm, mine, all, sizeof *mine * nk, st); /* joined even after rc */
    if (!rc) rc = g;
    for (int i = 0; !rc && i < n; i++) {
        int kn = logits_cand_n(v->modes[i]);
        if (!kn) continue;
        int32_t *ids = x->cand_ids + (size_t)i * BLIP2_TOPK_MAX;
        float *vals = x->cand_vals + (size_t)i * BLIP2_TOPK_MAX;
        int head[64] = {0}; /* merge: rank r's list of row i is all[(r·n + i)·k ..] */
        for (int j = 0; j < kn; j++) {
            int best = -1;
            for (int r = 0; r < W; r++)
                if (head[r] < k && (best < 0 || blip2_scored_before(all[((size_t)r * n + i) * k + head[r]],
                                                             all[((size_t)best * n + i) * k + head[best]])))
                    best = r;
            blip2_scored_id c = all[((size_t)best * n + i) * k + head[best]++];
            ids[j] = c.id, vals[j] = c.value;
        }
        x->cand_ok[i] = logits_beam_n(v->modes[i]) || blip2_candidates_exact(vals, kn); /* beams: see decide_beams */
    }
    return rc;
}

/* Argmax picks of every row in one all-gather (cheap: only (value, id) pairs leave the device),
 * kept for the LOGITS_ARGMAX rows in order; LOGITS_BEAM rows turned into penalised
 * log-probabilities; candidates for the LOGITS_TOPK and LOGITS_BEAM rows; full rows fetched and
 * gathered one by one (LOGITS_FULL, and LOGITS_TOPK rows the candidates cannot decide). */
static blip2_code pick_logits(step_exec *x, const step_view *v, blip2_status *st) {
    size_t Vl = (size_t)x->m->shard.V, V = (size_t)x->m->cfg.opt.V;
    int any_arg = 0, any_beam = 0, k = 0;
    blip2_code rc = BLIP2_OK;
    for (int i = 0; i < v->n_seqs; i++) {
        any_arg |= v->modes[i] == LOGITS_ARGMAX;
        any_beam |= x->beam_rows[i] = logits_beam_n(v->modes[i]) > 0;
        k = logits_cand_n(v->modes[i]) > k ? logits_cand_n(v->modes[i]) : k;
    }
    if (any_arg) rc = blip2_tp_argmax(x->m, x->tp, &x->ws, v->n_seqs, x->all_picks, st);
    for (int i = 0, n_arg = 0; !rc && i < v->n_seqs; i++)
        if (v->modes[i] == LOGITS_ARGMAX) x->picks[n_arg++] = x->all_picks[i];
    if (!rc && any_beam) { /* beams choose among log-probabilities, their penalty applied to those */
        rc = blip2_tp_logprobs(x->m, x->tp, &x->ws, v->n_seqs, x->beam_rows, st);
        if (!rc && v->n_pen_ids) apply_penalties(x, v, 1);
    }
    if (!rc && k) rc = pick_candidates(x, v, k, st);
    for (int i = 0; !rc && i < v->n_seqs; i++) {
        if (v->modes[i] != LOGITS_FULL && !(logits_topk_n(v->modes[i]) && !x->cand_ok[i])) continue;
        x->ws.ops->download(x->row, x->ws.logits + i * Vl, sizeof(float) * Vl);
        blip2_code d = blip2_backend_check(x->ws.ops, "logits", st);
        rc = blip2_tp_gather_logits(x->m, x->tp, x->row, x->full + i * V, st); /* collective: joined even after d */
        if (d) rc = d;
    }
    return rc;
}


blip2_code step_exec_launch(step_exec *x, const step_view *v, const float *image_rows, blip2_status *st) {
    blip2_code rc = check_blocks(x, v, st);
    if (rc) return rc;
    if (v->n_copies) copy_blocks(x, v->copies, v->n_copies);
    if (v->n_seqs == 0) return BLIP2_OK;
    rc = blip2_opt_forward_batch(x->m, x->tp, &x->kv, v->seqs, v->n_seqs, v->tokens, image_rows, &x->ws, st);
    if (!rc && v->n_pen_ids) apply_penalties(x, v, 0);
    return rc;
}

blip2_code step_exec_finish(step_exec *x, const step_view *v, blip2_status *st) {
    return v->n_seqs ? pick_logits(x, v, st) : BLIP2_OK;
}

blip2_code step_exec_run(step_exec *x, const step_view *v, const float *image_rows, blip2_status *st) {
    blip2_code rc = step_exec_launch(x, v, image_rows, st);
    return rc ? rc : step_exec_finish(x, v, st);
}
