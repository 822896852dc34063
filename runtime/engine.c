/* The serving engine on rank 0: queue → admission (by KV blocks and batch slots) → batched image
 * encoding → continuous-batching steps (decode rows first, then prefill chunks within the step's
 * token budget) → per-request decisions. Every step is a descriptor the other ranks execute too.
 * Where time goes: the step's matmuls (all rows together) and, for new images, the vision
 * encoder; everything here is bookkeeping. */
#include "engine.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../kernels/ops.h"
#include "engine_priv.h"


int64_t blip2_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static double ms_between(int64_t a, int64_t b) { return (double)(b - a) / 1e6; }

blip2_engine_opts blip2_engine_opts_default(void) {
    return (blip2_engine_opts){.max_batch = 64,
                               .max_queue = 1024,
                               .max_step_tokens = 512,
                               .block_size = 16,
                               .kv_bytes = (size_t)2 << 30,
                               .max_new_tokens_limit = 1024,
                               .image_cache_bytes = (size_t)256 << 20,
                               .max_images_per_step = 8,
                               .hold_share_pct = 100};
}

/* ---------------------------------------------------------------- requests */

static void req_free(req_t *r) {
    if (!r) return;
    for (int i = 0; i < MAX_BEAMS; i++) {
        free(r->seq[i].blocks);
        free(r->seq[i].gen);
    }
    for (int i = 0; i < r->n_hyps; i++) free(r->hyps[i].ids);
    for (int i = 0; i < r->n_stop; i++) free(r->stop[i]);
    free(r->stop);
    free(r->prompt);
    free(r->pixels);
    free(r->projected);
    free(r->img);
    free(r->text);
    if (r->detok) blip2_detok_free(r->detok);
    free(r);
}

static blip2_code copy_stops(req_t *r, const blip2_job *job, blip2_status *st) {
    if (job->n_stop < 0 || job->n_stop > 16) return blip2_fail(st, BLIP2_EINVAL, "at most 16 stop strings (got %d)", job->n_stop);
    r->stop = blip2_calloc((size_t)job->n_stop + 1, sizeof *r->stop, st);
    if (!r->stop) return BLIP2_ENOMEM;
    for (int i = 0; i < job->n_stop; i++) {
        size_t n = job->stop[i] ? strlen(job->stop[i]) : 0;
        if (n == 0 || n > 256) return blip2_fail(st, BLIP2_EINVAL, "stop string %d must be 1..256 bytes", i);
        r->stop[i] = strdup(job->stop[i]);
        if (!r->stop[i]) return blip2_fail(st, BLIP2_ENOMEM, "out of memory");
        r->n_stop++;
    }
    return BLIP2_OK;
}

static int blocks_needed(const blip2_engine *e, const req_t *r) {
    int len = r->n_prompt + r->max_new, beams = r->dec.num_beams;
    return beams * (blip2_kv_blocks_for(len, e->o.block_size) + (beams > 1));
}

/* Ids (given or tokenised) and their limits. */
static blip2_code prepare_ids(blip2_engine *e, const blip2_job *job, req_t *r, blip2_status *st) {
    const blip2_config *c = &e->m->cfg;
    blip2_code rc;
    if (job->input_ids) {
        r->n_prompt = job->n_input_ids;
        if (r->n_prompt < 1 || r->n_prompt >= c->opt.max_pos)
            return blip2_fail(st, BLIP2_ERANGE, "%d input ids: must be 1..%d", r->n_prompt, c->opt.max_pos - 1);
        r->prompt = blip2_malloc(sizeof(int32_t) * (size_t)r->n_prompt, st);
        if (!r->prompt) return BLIP2_ENOMEM;
        memcpy(r->prompt, job->input_ids, sizeof(int32_t) * (size_t)r->n_prompt);
        rc = blip2_opt_check_ids(c, r->prompt, r->n_prompt, st);
    } else {
        rc = blip2_inputs_prompt(e->in, job->prompt, job->prompt_len, &r->prompt, &r->n_prompt, st);
    }
    if (rc) return rc;
    int room = c->opt.max_pos - r->n_prompt; /* positions left for new tokens */
    if (r->max_new > room) r->max_new = room;
    if (r->max_new < 1)
        return blip2_fail(st, BLIP2_ERANGE, "prompt of %d tokens leaves no room in the context of %d", r->n_prompt,
                          c->opt.max_pos);
    return BLIP2_OK;
}

/* Image: the cache (by content), or pixels now (decode + resize happen here, off the engine). */
static blip2_code prepare_image(blip2_engine *e, const blip2_job *job, req_t *r, blip2_status *st) {
    const blip2_config *c = &e->m->cfg;
    size_t emb = (size_t)c->Q * c->opt.C, px = blip2_image_floats(&c->vision);
    if (job->pixels) {
        r->pixels = blip2_malloc(sizeof(float) * px, st);
        if (!r->pixels) return BLIP2_ENOMEM;
        memcpy(r->pixels, job->pixels, sizeof(float) * px);
        return BLIP2_OK;
    }
    if (!job->image || job->image_len == 0) return blip2_fail(st, BLIP2_EINVAL, "image: empty (0 bytes)");
    r->projected = blip2_malloc(sizeof(float) * emb, st);
    if (!r->projected) return BLIP2_ENOMEM;
    r->hash = blip2_image_hash(job->image, job->image_len);
    if (blip2_image_cache_get(&e->cache, job->image, job->image_len, r->hash, r->projected)) {
        r->cached = 1;
        return BLIP2_OK;
    }
    free(r->projected);
    r->projected = NULL;
    if (e->o.image_cache_bytes) {
        r->img = blip2_malloc(job->image_len, st);
        if (!r->img) return BLIP2_ENOMEM;
        memcpy(r->img, job->image, job->image_len);
        r->img_len = job->image_len;
    }
    return blip2_inputs_image(e->in, job->image, job->image_len, &r->pixels, st);
}

static blip2_code prepare(blip2_engine *e, const blip2_job *job, req_t *r, blip2_status *st) {
    r->dec = job->dec;
    blip2_code rc = blip2_decoding_validate(&r->dec, e->o.max_new_tokens_limit, st);
    if (rc) return rc;
    r->max_new = r->dec.max_new_tokens ? r->dec.max_new_tokens : e->m->cfg.max_new_tokens;
    int cand = blip2_decoding_candidates(&r->dec); /* the device's top-k instead of the whole row, when it decides exactly */
    r->mode = !blip2_decoding_needs_full_logits(&r->dec) ? LOGITS_ARGMAX : cand ? LOGITS_TOPK + cand : LOGITS_FULL;
    if (r->dec.num_beams > 1) r->mode = LOGITS_BEAM + 2 * r->dec.num_beams + 1; /* 2B per beam, and a masked eos */
    if (r->dec.num_beams > e->o.max_batch)
        return blip2_fail(st, BLIP2_ERANGE, "num_beams %d exceeds the server's batch of %d", r->dec.num_beams, e->o.max_batch);
    rc = copy_stops(r, job, st);
    if (!rc) rc = prepare_ids(e, job, r, st);
    if (!rc && blocks_needed(e, r) > e->x.kv.n_blocks)
        rc = blip2_fail(st, BLIP2_ERANGE,
                        "request needs %d KV blocks (%d prompt + %d new tokens, %d beams) but the cache has %d: lower "
                        "max_new_tokens or num_beams",
                        blocks_needed(e, r), r->n_prompt, r->max_new, r->dec.num_beams, e->x.kv.n_blocks);
    if (!rc) rc = prepare_image(e, job, r, st);
    for (int i = 0; !rc && i < r->dec.num_beams; i++)
        if (!(r->seq[i].gen = blip2_malloc(sizeof(int32_t) * (size_t)r->max_new, st))) rc = BLIP2_ENOMEM;
    if (!rc && (r->cb.on_token || r->n_stop) && r->dec.num_beams == 1 && e->in->tok)
        rc = blip2_detok_init(e->in->tok, &r->detok, st);
    blip2_rng_seed(&r->rng, r->dec.has_seed ? r->dec.seed : (uint64_t)blip2_now_ns() ^ (uint64_t)(uintptr_t)r);
    r->n_seq = 1;
    return rc;
}

blip2_code blip2_engine_submit(blip2_engine *e, const blip2_job *job, const blip2_job_callbacks *cb, blip2_status *st) {
    req_t *r = blip2_calloc(1, sizeof *r, st);
    if (!r) return BLIP2_ENOMEM;
    r->cb = *cb;
    r->t_submit = blip2_now_ns();
    r->deadline = job->deadline_ns;
    blip2_code rc = prepare(e, job, r, st);
    if (rc) {
        req_free(r);
        return rc;
    }
    pthread_mutex_lock(&e->mu);
    if (e->stopping)
        rc = blip2_fail(st, BLIP2_EUNAVAILABLE, "the server is shutting down");
    else if (e->qlen >= e->o.max_queue)
        rc = blip2_fail(st, BLIP2_EBUSY, "the queue is full (%d requests waiting): try again later", e->qlen);
    if (!rc) {
        r->id = ++e->next_id;
        if (e->qt) e->qt->next = r; else e->qh = r;
        e->qt = r;
        e->qlen++;
        pthread_cond_signal(&e->cv);
    }
    pthread_mutex_unlock(&e->mu);
    if (rc) req_free(r);
    return rc;
}

/* ---------------------------------------------------------------- blocks */

void engine_table_release(blip2_engine *e, seq_t *s) {
    for (int i = 0; i < s->n_blocks; i++)
        if (--e->refs[s->blocks[i]] == 0) blip2_kv_pool_release(&e->x.kv, &s->blocks[i], 1);
    s->n_blocks = 0;
}

int engine_table_reserve(seq_t *s, int n) {
    if (s->cap >= n) return 0;
    int32_t *nb = realloc(s->blocks, sizeof(int32_t) * (size_t)n);
    if (!nb) return -1;
    s->blocks = nb;
    s->cap = n;
    return 0;
}

/* Grows a table to hold `positions`; the admission reservation guarantees the blocks exist. */
int engine_table_grow(blip2_engine *e, seq_t *s, int positions) {
    int need = blip2_kv_blocks_for(positions, e->o.block_size);
    if (engine_table_reserve(s, need)) return -1;
    while (s->n_blocks < need) {
        if (blip2_kv_pool_alloc(&e->x.kv, 1, &s->blocks[s->n_blocks])) return -1;
        e->refs[s->blocks[s->n_blocks++]] = 1;
    }
    return 0;
}

/* ---------------------------------------------------------------- finishing */

static void result_seq_from(blip2_engine *e, blip2_sequence_out *o, const int32_t *ids, int n, float score,
                            blip2_finish f) {
    o->ids = (int32_t *)ids;
    o->n_ids = n;
    o->score = score;
    o->finish = f;
    blip2_status st;
    if (!e->in->tok || blip2_inputs_decode(e->in, ids, n, &o->text, &o->text_len, &st)) o->text = NULL, o->text_len = 0;
}

static void finish_req(blip2_engine *e, req_t *r, blip2_code code, const char *msg) {
    int64_t now = blip2_now_ns();
    blip2_result res = {.code = code, .message = msg, .prompt_tokens = r->n_prompt};
    blip2_sequence_out outs[MAX_BEAMS];
    memset(outs, 0, sizeof outs);
    if (code == BLIP2_OK && r->dec.num_beams > 1) {
        res.n_seqs = r->dec.num_return_sequences < r->n_hyps ? r->dec.num_return_sequences : r->n_hyps;
        for (int i = 0; i < res.n_seqs; i++)
            result_seq_from(e, &outs[i], r->hyps[i].ids, r->hyps[i].n, r->hyps[i].score, r->hyps[i].finish);
    } else if (code == BLIP2_OK) {
        res.n_seqs = 1;
        result_seq_from(e, &outs[0], r->seq[0].gen, r->seq[0].n_gen, 0, r->finish);
    }
    res.seqs = outs;
    blip2_timings *t = &res.timings;
    t->queue_ms = r->t_admit ? ms_between(r->t_submit, r->t_admit) : ms_between(r->t_submit, now);
    t->image_ms = r->image_ms;
    t->image_cached = r->cached;
    t->prefill_ms = r->t_prefill && r->t_first ? ms_between(r->t_prefill, r->t_first) : 0;
    t->decode_ms = r->t_first ? ms_between(r->t_first, now) : 0;
    t->total_ms = ms_between(r->t_submit, now);
    if (r->cb.on_done) r->cb.on_done(r->cb.ctx, &res);
    for (int i = 0; i < res.n_seqs; i++) free(outs[i].text);
    pthread_mutex_lock(&e->mu); /* read by get_stats from other threads */
    if (code == BLIP2_OK) e->stats.completed++; else e->stats.failed++;
    pthread_mutex_unlock(&e->mu);
    req_free(r);
}

/* Removes an admitted request: its blocks, slots and reservation return at once. */
void engine_retire(blip2_engine *e, int idx, blip2_code code, const char *msg) {
    req_t *r = e->act[idx];
    for (int i = 0; i < e->inflight_rows; i++) /* the running step's rows and the queued tokens forget it */
        if (e->refs_step[i].r == r) e->refs_step[i].r = NULL;
    for (int i = 0; i < e->n_emits; i++)
        if (e->emits[i].r == r) e->emits[i].r = NULL;
    for (int i = 0; i < MAX_BEAMS; i++) engine_table_release(e, &r->seq[i]);
    e->reserved -= r->reserved;
    e->seqs_used -= r->dec.num_beams;
    e->act[idx] = e->act[--e->n_act];
    finish_req(e, r, code, msg);
}


/* ---------------------------------------------------------------- the loop */

/* Expired or cancelled requests leave the queue (under the lock) into `out`. */
static req_t *sweep_queue(blip2_engine *e, int64_t now, int cancel_all) {
    req_t *out = NULL, **pp = &e->qh;
    e->qt = NULL;
    while (*pp) {
        req_t *r = *pp;
        int drop = cancel_all || (r->deadline && now > r->deadline) || (r->cb.is_cancelled && r->cb.is_cancelled(r->cb.ctx));
        if (drop) {
            *pp = r->next;
            r->next = out;
            out = r;
            e->qlen--;
        } else {
            e->qt = r;
            pp = &r->next;
        }
    }
    return out;
}

static void fail_list(blip2_engine *e, req_t *list, int64_t now, int cancel_all) {
    while (list) {
        req_t *r = list;
        list = r->next;
        if (cancel_all) finish_req(e, r, BLIP2_EUNAVAILABLE, "the server shut down before the request ran");
        else if (r->deadline && now > r->deadline) finish_req(e, r, BLIP2_EDEADLINE, "deadline exceeded while queued");
        else finish_req(e, r, BLIP2_ECANCELLED, "cancelled while queued");
    }
}

/* First come first served: the head waits until it fits (no overtaking). */
static void admit(blip2_engine *e, int64_t now) {
    while (e->qh) {
        req_t *r = e->qh;
        int need = blocks_needed(e, r);
        if (e->seqs_used + r->dec.num_beams > e->o.max_batch || e->reserved + need > e->x.kv.n_blocks) break;
        e->qh = r->next;
        if (!e->qh) e->qt = NULL;
        e->qlen--;
        r->next = NULL;
        r->reserved = need;
        r->t_admit = now;
        e->reserved += need;
        e->seqs_used += r->dec.num_beams;
        e->act[e->n_act++] = r;
    }
}

static void check_active(blip2_engine *e, int64_t now, int cancel_all) {
    for (int i = e->n_act - 1; i >= 0; i--) {
        req_t *r = e->act[i];
        if (r->finishing && !cancel_all) continue; /* done: it ends once its last token is streamed */
        if (cancel_all) engine_retire(e, i, BLIP2_EUNAVAILABLE, "the server shut down during the request");
        else if (r->deadline && now > r->deadline) engine_retire(e, i, BLIP2_EDEADLINE, "deadline exceeded");
        else if (r->cb.is_cancelled && r->cb.is_cancelled(r->cb.ctx)) engine_retire(e, i, BLIP2_ECANCELLED, "cancelled by the client");
    }
}

static int ready(const req_t *r) { return r->projected != NULL && !r->finishing; }

/* Decode rows first (one per live sequence), then prefill chunks within the token budget. */
static int build_step(blip2_engine *e) {
    step_desc *d = &e->x.desc;
    int n_tok = 0, n_img = 0, n_rows = 0, budget = e->o.max_step_tokens;
    size_t C = (size_t)e->m->cfg.opt.C;
    step_desc_begin(d, STEP_OP_RUN);
    e->step_prefill = 0;
    for (int i = 0; i < e->n_copies; i++) step_desc_add_copy(d, e->copies[2 * i], e->copies[2 * i + 1]);
    e->n_copies = 0;
    for (int i = 0; i < e->n_act; i++) {
        req_t *r = e->act[i];
        if (!ready(r) || r->fed < r->n_prompt) continue;
        for (int s = 0; s < r->n_seq; s++) {
            seq_t *q = &r->seq[s];
            if (engine_table_grow(e, q, q->len + 1)) return -1;
            engine_row_penalty(e, r, q, r->mode, d->buf[1]);
            step_desc_add_seq(d, q->len, 1, r->mode, q->blocks, q->n_blocks);
            e->tokens[n_tok++] = q->next;
            e->refs_step[n_rows].r = r, e->refs_step[n_rows].seq = s, e->refs_step[n_rows++].mode = r->mode;
            budget--;
        }
    }
    for (int i = 0; i < e->n_act && budget > 0; i++) {
        req_t *r = e->act[i];
        if (!ready(r) || r->fed >= r->n_prompt) continue;
        int chunk = r->n_prompt - r->fed < budget ? r->n_prompt - r->fed : budget;
        int done = r->fed + chunk == r->n_prompt;
        seq_t *q = &r->seq[0];
        if (engine_table_grow(e, q, r->fed + chunk)) return -1;
        int mode = done ? r->mode : LOGITS_NONE;
        engine_row_penalty(e, r, q, mode, d->buf[1]);
        step_desc_add_seq(d, r->fed, chunk, mode, q->blocks, q->n_blocks);
        for (int t = r->fed; t < r->fed + chunk; t++) {
            int is_img = r->prompt[t] == e->m->cfg.image_token_id && r->img_fed < e->m->cfg.Q;
            e->tokens[n_tok++] = is_img ? -1 : r->prompt[t];
            if (is_img) memcpy(e->img_rows + n_img++ * C, r->projected + (size_t)r->img_fed++ * C, sizeof(float) * C);
        }
        if (!r->t_prefill) r->t_prefill = blip2_now_ns();
        e->step_prefill = 1;
        e->refs_step[n_rows].r = r, e->refs_step[n_rows].seq = -1 - chunk, e->refs_step[n_rows++].mode = mode;
        budget -= chunk;
    }
    step_desc_add_tokens(d, e->tokens, n_tok);
    step_desc_add_penalties(d, e->pen_offs, e->pen_vals, e->pen_ids);
    return n_rows;
}

/* A step in two halves. launch: share the descriptor, queue the step (a GPU runs it while the
 * host goes on: emit_all streams the previous step's tokens meanwhile). finish: wait for its
 * picks, then decide for every row that produced logits. */
static blip2_code launch_step(blip2_engine *e, int n_rows, blip2_status *st) {
    blip2_code rc = step_desc_share(&e->x.desc, e->tp, st);
    if (!rc) rc = step_desc_view(&e->x.desc, &e->view, st);
    if (!rc) rc = step_exec_launch(&e->x, &e->view, e->img_rows, st);
    e->inflight_rows = rc ? 0 : n_rows;
    return rc;
}

static blip2_code finish_step(blip2_engine *e, blip2_status *st) {
    blip2_code rc = step_exec_finish(&e->x, &e->view, st);
    e->t_results = blip2_now_ns();
    int n_rows = e->inflight_rows;
    e->inflight_rows = 0;
    if (!rc) decide_all(e, n_rows);
    return rc;
}

static int wait_for_work(blip2_engine *e) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_nsec += 20 * 1000000;
    if (ts.tv_nsec >= 1000000000) ts.tv_sec++, ts.tv_nsec -= 1000000000;
    return pthread_cond_timedwait(&e->cv, &e->mu, &ts);
}

/* hold_for_images_ms: whether this turn runs no step, leaving the GPU to the image encoder —
 * while it is busy, more requests wait for images than hold_share_pct % of the sequences ready
 * to step, and the hold has lasted less than the limit (the decoding sequences' longest pause). */
static int hold_for_images(blip2_engine *e, int64_t now) {
    if (e->o.hold_for_images_ms <= 0 || !engine_encoder_busy(e)) return e->hold_since = 0, 0;
    int waiting = 0, ready_seqs = 0;
    for (int i = 0; i < e->n_act; i++) {
        const req_t *r = e->act[i];
        if (ready(r)) ready_seqs += r->n_seq;
        else if (!r->projected && !r->finishing) waiting++;
    }
    if ((int64_t)waiting * 100 <= (int64_t)e->o.hold_share_pct * ready_seqs) return e->hold_since = 0, 0;
    if (!e->hold_since) e->hold_since = now;
    if (now - e->hold_since < (int64_t)e->o.hold_for_images_ms * 1000000) return 1;
    e->hold_since = 0; /* one step, then hold again */
    return 0;
}

/* One turn of the loop; returns 0 when the engine is done. */
static int engine_turn(blip2_engine *e, blip2_status *st, blip2_code *rc) {
    int64_t now = blip2_now_ns();
    pthread_mutex_lock(&e->mu);
    e->stats.blocks_in_use = e->x.kv.n_blocks - e->x.kv.n_free; /* published for get_stats */
    e->stats.active = e->n_act;
    int cancel_all = e->stopping && now >= e->stop_at;
    req_t *dropped = sweep_queue(e, now, cancel_all);
    if (!dropped && e->n_act == 0 && e->qlen == 0) {
        int stop = e->stopping;
        if (!stop) wait_for_work(e);
        pthread_mutex_unlock(&e->mu);
        return !stop;
    }
    admit(e, now);
    pthread_mutex_unlock(&e->mu);
    fail_list(e, dropped, now, cancel_all);
    check_active(e, now, cancel_all);
    engine_collect_images(e); /* rows encoded while the last step ran */
    engine_hand_images(e);    /* new images go to the encoder; the step below does not wait for them */
    if (hold_for_images(e, now)) {
        e->t_results = 0; /* a pause, not a host gap */
        emit_all(e);
        engine_encoder_wait(e, 2);
        return 1;
    }
    int n_rows = build_step(e);
    if (n_rows < 0) {
        *rc = blip2_fail(st, BLIP2_EINTERNAL, "KV block accounting failed");
        return 0;
    }
    int encoding = engine_encoder_busy(e), launched = n_rows > 0 || e->x.desc.buf[3] > 0;
    if (launched && e->t_results) { /* back to back: the device has waited on the host since */
        pthread_mutex_lock(&e->mu);
        e->stats.host_gaps++, e->stats.host_gap_ns += blip2_now_ns() - e->t_results;
        pthread_mutex_unlock(&e->mu);
    }
    e->t_results = 0;
    int64_t t_launch = blip2_now_ns();
    if (launched) *rc = launch_step(e, n_rows, st);
    emit_all(e); /* the last step's tokens, while this one computes */
    if (launched && !*rc) {
        *rc = finish_step(e, st);
        int64_t dt = e->t_results - t_launch; /* to the results, before the decisions */
        pthread_mutex_lock(&e->mu);
        e->stats.steps++, e->stats.steps_while_encoding += encoding;
        e->stats.steps_prefill += e->step_prefill;
        *(e->step_prefill ? &e->stats.step_ns_prefill : &e->stats.step_ns_decode) += dt;
        pthread_mutex_unlock(&e->mu);
    } else if (!launched && encoding) {
        engine_encoder_wait(e, 20); /* nothing to run until images arrive */
    }
    return *rc == BLIP2_OK;
}

blip2_code blip2_engine_run(blip2_engine *e, blip2_status *st) {
    blip2_code rc = BLIP2_OK;
    while (engine_turn(e, st, &rc)) {
    }
    if (rc) { /* a failed step leaves the ranks' state unknown: fail everything, stop the group */
        pthread_mutex_lock(&e->mu);
        e->stopping = 1;
        req_t *dropped = sweep_queue(e, 0, 1);
        pthread_mutex_unlock(&e->mu);
        fail_list(e, dropped, 0, 1);
        while (e->n_act) engine_retire(e, e->n_act - 1, BLIP2_EINTERNAL, st->msg);
    }
    pthread_mutex_lock(&e->mu);
    e->stats.blocks_in_use = e->x.kv.n_blocks - e->x.kv.n_free;
    e->stats.active = e->n_act;
    pthread_mutex_unlock(&e->mu);
    step_desc_begin(&e->x.desc, STEP_OP_STOP);
    blip2_status ignore;
    step_desc_share(&e->x.desc, e->tp, &ignore);
    return rc;
}

void blip2_engine_stop(blip2_engine *e, int grace_ms) {
    pthread_mutex_lock(&e->mu);
    if (!e->stopping) {
        e->stopping = 1;
        e->stop_at = blip2_now_ns() + (int64_t)grace_ms * 1000000;
    }
    pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
}

/* ---------------------------------------------------------------- setup */

static int kv_blocks(const blip2_model *m, const blip2_engine_opts *o) {
    size_t n = o->kv_bytes / blip2_kv_block_bytes(m, o->block_size);
    return n > (1u << 30) ? 1 << 30 : (int)n;
}

static blip2_code check_opts(const blip2_engine_opts *o, blip2_status *st) {
    if (o->max_batch < 1 || o->max_batch > 1024) return blip2_fail(st, BLIP2_EINVAL, "max batch %d must be 1..1024", o->max_batch);
    if (o->max_step_tokens < o->max_batch)
        return blip2_fail(st, BLIP2_EINVAL, "the step token budget %d must be >= the max batch %d", o->max_step_tokens, o->max_batch);
    if (o->block_size < 1 || o->max_queue < 1 || o->max_images_per_step < 1 || o->max_images_per_step > ENC_MAX_IMAGES)
        return blip2_fail(st, BLIP2_EINVAL, "bad engine options");
    if (o->hold_share_pct < 0 || o->hold_share_pct > 100)
        return blip2_fail(st, BLIP2_EINVAL, "the hold share %d must be 0..100 %%", o->hold_share_pct);
    return BLIP2_OK;
}

static blip2_code alloc_buffers(blip2_engine *e, blip2_status *st) {
    const blip2_config *c = &e->m->cfg;
    size_t T = (size_t)e->o.max_step_tokens;
    e->refs = calloc((size_t)e->x.kv.n_blocks, sizeof *e->refs);
    e->act = calloc((size_t)e->o.max_batch, sizeof *e->act);
    e->scratch = malloc(sizeof(float) * 2 * (size_t)c->opt.V);
    e->tokens = malloc(sizeof(int32_t) * T);
    e->img_rows = malloc(sizeof(float) * T * c->opt.C);
    e->refs_step = malloc(sizeof *e->refs_step * (size_t)e->o.max_batch);
    e->emits = malloc(sizeof *e->emits * (size_t)e->o.max_batch);
    e->copies = malloc(sizeof(int32_t) * 2 * (size_t)e->o.max_batch);
    e->hist = malloc(sizeof(int32_t) * (size_t)c->opt.max_pos);
    e->pen_offs = calloc((size_t)e->o.max_batch + 1, sizeof(int32_t));
    e->pen_vals = malloc(sizeof(float) * (size_t)e->o.max_batch);
    e->pen_ids = malloc(sizeof(int32_t) * (size_t)e->o.max_batch * (size_t)c->opt.max_pos);
    e->pen_seen = calloc((size_t)c->opt.V, 1);
    if (!e->hist || !e->pen_offs || !e->pen_vals || !e->pen_ids || !e->pen_seen || !e->refs || !e->act || !e->scratch ||
        !e->tokens || !e->img_rows || !e->refs_step || !e->copies || !e->emits)
        return blip2_fail(st, BLIP2_ENOMEM, "engine: out of memory");
    return engine_encoder_start(e, st); /* the engine runs on rank 0 */
}

blip2_code blip2_engine_create(const blip2_model *m, const blip2_tp *tp, const blip2_inputs *in,
                               const blip2_engine_opts *o, blip2_engine **out, blip2_status *st) {
    *out = NULL;
    blip2_code rc = check_opts(o, st);
    if (rc) return rc;
    int n_blocks = kv_blocks(m, o);
    if (n_blocks < 1) return blip2_fail(st, BLIP2_EINVAL, "KV budget of %zu bytes holds no block", o->kv_bytes);
    blip2_engine *e = blip2_calloc(1, sizeof *e, st);
    if (!e) return BLIP2_ENOMEM;
    e->m = m, e->tp = tp, e->in = in, e->o = *o;
    pthread_mutex_init(&e->mu, NULL);
    pthread_cond_init(&e->cv, NULL);
    blip2_image_cache_init(&e->cache, o->image_cache_bytes, (size_t)m->cfg.Q * m->cfg.opt.C);
    rc = step_exec_init(&e->x, m, tp, o->max_batch, o->max_step_tokens, n_blocks, o->block_size, st);
    if (!rc) rc = alloc_buffers(e, st);
    if (rc) {
        blip2_engine_destroy(e);
        return rc;
    }
    *out = e;
    return BLIP2_OK;
}

void blip2_engine_destroy(blip2_engine *e) {
    if (!e) return;
    engine_encoder_stop(e); /* first: it reads the model and the batch buffers */
    while (e->qh) {
        req_t *r = e->qh;
        e->qh = r->next;
        req_free(r);
    }
    for (int i = 0; i < e->n_act; i++) req_free(e->act[i]);
    step_exec_free(&e->x);
    blip2_image_cache_free(&e->cache);
    free(e->refs);
    free(e->act);
    free(e->scratch);
    free(e->tokens);
    free(e->img_rows);
    free(e->refs_step);
    free(e->emits);
    free(e->copies);
    free(e->hist);
    free(e->pen_offs);
    free(e->pen_vals);
    free(e->pen_ids);
    free(e->pen_seen);
    pthread_mutex_destroy(&e->mu);
    pthread_cond_destroy(&e->cv);
    free(e);
}

void blip2_engine_get_stats(blip2_engine *e, blip2_engine_stats *s) {
    pthread_mutex_lock(&e->mu);
    *s = e->stats;
    s->queued = e->qlen;
    s->blocks_total = e->x.kv.n_blocks;
    pthread_mutex_unlock(&e->mu);
    pthread_mutex_lock(&e->cache.mu);
    s->image_hits = e->cache.hits;
    s->image_misses = e->cache.misses;
    s->image_cache_bytes = e->cache.bytes;
    pthread_mutex_unlock(&e->cache.mu);
}

/* ---------------------------------------------------------------- followers */

void blip2_engine_follow_stop(const blip2_tp *tp) {
    int32_t buf[STEP_DESC_HEADER] = {STEP_OP_STOP};
    step_desc d = {.max_batch = 0, .buf = buf, .len = STEP_DESC_HEADER, .cap = STEP_DESC_HEADER};
    blip2_status ignore;
    step_desc_share(&d, tp, &ignore);
}

blip2_code blip2_engine_follow(const blip2_model *m, const blip2_tp *tp, const blip2_engine_opts *o, blip2_status *st) {
    step_exec x;
    blip2_code rc = check_opts(o, st);
    if (!rc) rc = step_exec_init(&x, m, tp, o->max_batch, o->max_step_tokens, kv_blocks(m, o), o->block_size, st);
    if (rc) return rc;
    for (;;) {
        step_view v;
        rc = step_desc_share(&x.desc, tp, st);
        if (!rc) rc = step_desc_view(&x.desc, &v, st);
        if (rc || v.op == STEP_OP_STOP) break;
        rc = step_exec_run(&x, &v, NULL, st);
        if (rc) break;
    }
    step_exec_free(&x);
    if (rc && tp->world > 1) { /* rank 0 waits in the next collective: stop the whole group */
        fprintf(stderr, "blip2: rank %d: %s; stopping all ranks\n", tp->rank, st->msg);
        tp->comm->ops->abort(tp->comm, 1);
    }
    return rc;
}
