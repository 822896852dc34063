/* What each request does with its logits after a step: greedy / sampling (one sequence, with
 * streaming and stop strings) or beam search (transformers' BeamSearchScorer semantics, with
 * copy-on-write of the KV blocks beams share). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../kernels/ops.h"
#include "engine_priv.h"

static int act_index(const blip2_engine *e, const req_t *r) {
    for (int i = 0; i < e->n_act; i++)
        if (e->act[i] == r) return i;
    return -1;
}

static void finish(blip2_engine *e, req_t *r, blip2_finish f) {
    r->finish = f;
    engine_retire(e, act_index(e, r), BLIP2_OK, NULL);
}

/* prompt + a sequence's generated ids: the history repetition_penalty looks at. */
static int history(blip2_engine *e, const req_t *r, const seq_t *q) {
    memcpy(e->hist, r->prompt, sizeof(int32_t) * (size_t)r->n_prompt);
    memcpy(e->hist + r->n_prompt, q->gen, sizeof(int32_t) * (size_t)q->n_gen);
    return r->n_prompt + q->n_gen;
}

void engine_row_penalty(blip2_engine *e, const req_t *r, const seq_t *q, int mode, int row) {
    int32_t *ids = e->pen_ids + e->pen_offs[row], n = 0;
    float pen = 1.0f;
    if (mode != LOGITS_NONE && r->dec.repetition_penalty != 1.0f) {
        int V = e->m->cfg.opt.V, h = history(e, r, q);
        pen = r->dec.repetition_penalty;
        for (int i = 0; i < h; i++) {
            int32_t id = e->hist[i];
            if (id < 0 || id >= V || e->pen_seen[id]) continue;
            e->pen_seen[id] = 1;
            ids[n++] = id;
        }
        for (int i = 0; i < n; i++) e->pen_seen[ids[i]] = 0;
    }
    e->pen_vals[row] = pen;
    e->pen_offs[row + 1] = e->pen_offs[row] + n;
}

static int append_text(req_t *r, const char *piece, size_t len) {
    if (r->text_len + len + 1 > r->text_cap) {
        size_t cap = (r->text_len + len + 1) * 2;
        char *t = realloc(r->text, cap);
        if (!t) return -1;
        r->text = t;
        r->text_cap = cap;
    }
    memcpy(r->text + r->text_len, piece, len);
    r->text_len += len;
    r->text[r->text_len] = 0;
    return 0;
}

/* Streams the new text and reports whether a stop string now appears in it. */
static int stream_token(req_t *r, int32_t id) {
    if (!r->detok) return 0;
    const char *piece = "";
    size_t len = 0;
    blip2_status st;
    if (blip2_detok_push(r->detok, id, &piece, &len, &st)) len = 0;
    size_t before = r->text_len;
    if (r->n_stop && append_text(r, piece, len)) return 0;
    if (r->cb.on_token) r->cb.on_token(r->cb.ctx, id, piece, len);
    for (int i = 0; i < r->n_stop; i++) { /* only matches that end in the new piece are new */
        size_t sl = strlen(r->stop[i]);
        size_t from = before >= sl ? before - sl + 1 : 0;
        if (r->text_len >= sl && memmem(r->text + from, r->text_len - from, r->stop[i], sl)) return 1;
    }
    return 0;
}

/* The next id of a single-sequence request from its step row `i`: the argmax pick, the
 * candidates, or the full row (logits). */
static int32_t choose(blip2_engine *e, req_t *r, int i, float *logits, int32_t pick) {
    if (r->mode == LOGITS_ARGMAX) return pick;
    const blip2_config *c = &e->m->cfg;
    seq_t *q = &r->seq[0]; /* the row already holds its repetition penalty (engine_row_penalty) */
    int kn = logits_topk_n(r->mode);
    if (kn && e->x.cand_ok[i])
        return blip2_sample_candidates(&r->dec, e->x.cand_ids + (size_t)i * BLIP2_TOPK_MAX,
                                       e->x.cand_vals + (size_t)i * BLIP2_TOPK_MAX, kn, q->n_gen, c->eos_id, &r->rng);
    blip2_logits_mask_eos(&r->dec, logits, c->opt.V, q->n_gen, c->eos_id);
    if (r->dec.do_sample) return blip2_sample(&r->dec, logits, c->opt.V, &r->rng, e->scratch);
    return blip2_argmax(logits, c->opt.V);
}

/* The id and whether it ends the request (eos, length); its text and stop strings wait for
 * emit_all, which runs while the next step computes. A request that ends is left out of the next
 * step; one a stop string ends there was already in it, and its row is dropped. */
static void decide_single(blip2_engine *e, req_t *r, int i, float *logits, int32_t pick) {
    const blip2_config *c = &e->m->cfg;
    seq_t *q = &r->seq[0];
    int32_t id = choose(e, r, i, logits, pick);
    if (!r->t_first) r->t_first = blip2_now_ns();
    q->gen[q->n_gen++] = id;
    q->next = id;
    if (id == c->eos_id) r->finishing = 1 + BLIP2_FINISH_EOS;
    else if (q->n_gen >= r->max_new || q->len + 1 > c->opt.max_pos) r->finishing = 1 + BLIP2_FINISH_LENGTH;
    if (r->detok || r->finishing) e->emits[e->n_emits].r = r, e->emits[e->n_emits++].id = id;
}

void emit_all(blip2_engine *e) {
    for (int k = 0; k < e->n_emits; k++) {
        req_t *r = e->emits[k].r;
        if (!r) continue; /* retired since its step */
        int stopped = stream_token(r, e->emits[k].id), f = r->finishing - 1;
        if (f == BLIP2_FINISH_EOS) finish(e, r, BLIP2_FINISH_EOS);
        else if (stopped) finish(e, r, BLIP2_FINISH_STOP);
        else if (f == BLIP2_FINISH_LENGTH) finish(e, r, BLIP2_FINISH_LENGTH);
    }
    e->n_emits = 0;
}

/* ---- beams ---- */

typedef struct {
    float score;
    int beam;
    int32_t id;
} cand_t;

/* Candidates in the order of transformers' topk over the flattened (beam, id) scores: larger score
 * first, then the lower flat index (beam, then id). */
static int cand_order(const void *a, const void *b) {
    const cand_t *x = a, *y = b;
    if (x->score != y->score) return x->score > y->score ? -1 : 1;
    if (x->beam != y->beam) return x->beam - y->beam;
    return (x->id > y->id) - (x->id < y->id);
}

/* The best k of the n_src beams' scores (log-probability + beam score; eos excluded while it is
 * masked), from each beam row's device candidates: its 2B + 1 best log-probabilities (the backend
 * applied the penalty), enough for the 2B best over all beams with a masked eos among them. A
 * score outside a row's list ties one inside only if two different log-probabilities round to
 * the same sum: then the lower id would win in a full search and the list's order decides here. */
static int top_candidates(blip2_engine *e, const req_t *r, int row0, int n_src, int k, cand_t *out) {
    int kn = logits_beam_n(r->mode), mask_eos = r->seq[0].n_gen < r->dec.min_new_tokens, m = 0;
    int32_t eos = e->m->cfg.eos_id;
    cand_t all[MAX_BEAMS * BLIP2_TOPK_MAX];
    for (int b = 0; b < n_src; b++) {
        const int32_t *ids = e->x.cand_ids + (size_t)(row0 + b) * BLIP2_TOPK_MAX;
        const float *vals = e->x.cand_vals + (size_t)(row0 + b) * BLIP2_TOPK_MAX;
        for (int j = 0; j < kn; j++)
            if (!isnan(vals[j]) && !(mask_eos && ids[j] == eos)) all[m++] = (cand_t){vals[j] + r->seq[b].score, b, ids[j]};
    }
    qsort(all, (size_t)m, sizeof *all, cand_order);
    if (m > k) m = k;
    memcpy(out, all, sizeof *out * (size_t)m);
    return m;
}

static float beam_norm(const req_t *r, float sum_logprobs, int generated_len) {
    return sum_logprobs / powf((float)generated_len, r->dec.length_penalty);
}

/* Keeps the num_beams best finished hypotheses (transformers' BeamHypotheses.add). */
static void add_hyp(req_t *r, const int32_t *ids, int n, float score, blip2_finish f) {
    int B = r->dec.num_beams;
    if (r->n_hyps == B && score <= r->hyps[B - 1].score) return;
    int32_t *copy = malloc(sizeof(int32_t) * (size_t)(n ? n : 1));
    if (!copy) return;
    memcpy(copy, ids, sizeof(int32_t) * (size_t)n);
    if (r->n_hyps == B) free(r->hyps[--r->n_hyps].ids);
    int j = r->n_hyps++;
    while (j > 0 && r->hyps[j - 1].score < score) {
        r->hyps[j] = r->hyps[j - 1];
        j--;
    }
    r->hyps[j] = (hyp_t){copy, n, score, f};
}

/* New beam k continues parent b: full blocks are shared, a partly filled last block is copied. */
static int fork_table(blip2_engine *e, const seq_t *parent, seq_t *child) {
    int bs = e->o.block_size, full = parent->len / bs, partial = parent->len % bs != 0;
    if (engine_table_reserve(child, parent->n_blocks + 1)) return -1;
    for (int i = 0; i < full; i++) e->refs[child->blocks[i] = parent->blocks[i]]++;
    child->n_blocks = full;
    if (partial) {
        if (blip2_kv_pool_alloc(&e->x.kv, 1, &child->blocks[full])) return -1;
        e->refs[child->blocks[full]] = 1;
        e->copies[2 * e->n_copies] = parent->blocks[full];
        e->copies[2 * e->n_copies + 1] = child->blocks[full];
        e->n_copies++;
        child->n_blocks++;
    }
    child->len = parent->len;
    return 0;
}

static void finalize_beams(blip2_engine *e, req_t *r, int done) {
    if (!done)
        for (int k = 0; k < r->n_seq; k++)
            add_hyp(r, r->seq[k].gen, r->seq[k].n_gen, beam_norm(r, r->seq[k].score, r->seq[k].n_gen), BLIP2_FINISH_LENGTH);
    finish(e, r, r->n_hyps ? r->hyps[0].finish : BLIP2_FINISH_LENGTH);
}

/* Adopts the chosen candidates as the new beams (tables forked, generated ids extended). */
static int reorder_beams(blip2_engine *e, req_t *r, const cand_t *next, int n_next) {
    seq_t fresh[MAX_BEAMS];
    memset(fresh, 0, sizeof fresh);
    int rc = 0;
    for (int k = 0; k < n_next && !rc; k++) {
        const seq_t *p = &r->seq[next[k].beam];
        fresh[k].gen = malloc(sizeof(int32_t) * (size_t)r->max_new);
        rc = !fresh[k].gen || fork_table(e, p, &fresh[k]);
        if (rc) break;
        memcpy(fresh[k].gen, p->gen, sizeof(int32_t) * (size_t)p->n_gen);
        fresh[k].n_gen = p->n_gen;
        fresh[k].gen[fresh[k].n_gen++] = next[k].id;
        fresh[k].score = next[k].score;
        fresh[k].next = next[k].id;
    }
    for (int k = 0; k < MAX_BEAMS; k++) { /* old tables go only after every fork holds its blocks */
        engine_table_release(e, &r->seq[k]);
        free(r->seq[k].blocks);
        free(r->seq[k].gen);
        r->seq[k] = fresh[k];
    }
    r->n_seq = n_next;
    return rc;
}

/* One beam-search step over the step rows row0 .. row0 + n_src − 1 (one per live beam). */
static void decide_beams(blip2_engine *e, req_t *r, int row0, int n_src) {
    const blip2_config *c = &e->m->cfg;
    int B = r->dec.num_beams, cur = r->seq[0].n_gen;
    cand_t cand[2 * MAX_BEAMS], next[MAX_BEAMS];
    int n_cand = top_candidates(e, r, row0, n_src, 2 * B, cand), n_next = 0;
    if (!r->t_first) r->t_first = blip2_now_ns();
    for (int j = 0; j < n_cand && n_next < B; j++) {
        if (cand[j].id != c->eos_id) {
            next[n_next++] = cand[j];
        } else if (j < B) { /* a finished hypothesis: its ids end with eos */
            seq_t *p = &r->seq[cand[j].beam];
            p->gen[p->n_gen] = c->eos_id;
            add_hyp(r, p->gen, p->n_gen + 1, beam_norm(r, cand[j].score, cur + 1), BLIP2_FINISH_EOS);
        }
    }
    int done = r->n_hyps >= B && (r->dec.early_stopping || r->hyps[B - 1].score >= beam_norm(r, cand[0].score, cur + 1));
    if (done || n_next == 0) {
        finalize_beams(e, r, 1);
        return;
    }
    if (reorder_beams(e, r, next, n_next)) {
        engine_retire(e, act_index(e, r), BLIP2_ENOMEM, "out of KV blocks while reordering beams");
        return;
    }
    if (r->seq[0].n_gen >= r->max_new || r->seq[0].len + 1 > c->opt.max_pos) finalize_beams(e, r, 0);
}

/* Rows of one request are contiguous in a step (a beam's rows follow each other). */
void decide_all(blip2_engine *e, int n_rows) {
    size_t V = (size_t)e->m->cfg.opt.V;
    int k_arg = 0;
    for (int i = 0; i < n_rows;) {
        req_t *r = e->refs_step[i].r;
        int seq = e->refs_step[i].seq, mode = e->refs_step[i].mode;
        if (!r) { /* retired while the step ran (a stop string in the previous token) */
            k_arg += mode == LOGITS_ARGMAX;
            i++;
            continue;
        }
        float *row = e->x.full + i * V;
        if (seq < 0) { /* a prefill chunk of -seq - 1 positions */
            int chunk = -seq - 1;
            r->fed += chunk;
            r->seq[0].len = r->fed;
            i++;
            if (mode == LOGITS_NONE) continue;
            if (r->dec.num_beams > 1) decide_beams(e, r, i - 1, 1);
            else decide_single(e, r, i - 1, row, mode == LOGITS_ARGMAX ? e->x.picks[k_arg++] : -1);
            continue;
        }
        int n = 0;
        while (i + n < n_rows && e->refs_step[i + n].r == r) r->seq[e->refs_step[i + n++].seq].len++;
        if (r->dec.num_beams > 1) decide_beams(e, r, i, n);
        else decide_single(e, r, i, row, mode == LOGITS_ARGMAX ? e->x.picks[k_arg++] : -1);
        i += n;
    }
}
