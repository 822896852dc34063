/* The image encoder beside the step loop (rank 0). Vision + Q-Former + projection of newly
 * admitted requests run on a thread of their own with a backend queue of their own (on CUDA its
 * own context: stream, cuBLASLt handle, workspace), so the decode steps of running requests go
 * on while new images are encoded instead of every rank waiting for them. The engine thread
 * hands the encoder a batch (the requests' pixel buffers, request ids) when it is idle and takes the
 * projected rows back at the next turn; only the engine thread touches requests, so a request
 * retired meanwhile (cancelled, deadline) is simply not found when its rows come back. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "device.h"
#include "engine_priv.h"

enum { ENC_IDLE, ENC_BUSY, ENC_DONE };

/* Batch encoded or failed (encoder thread), or never encoded (stop): the rows' pixel buffers and
 * image bytes it was handed. */
static void encoder_release_batch(engine_encoder *x) {
    for (int b = 0; b < ENC_MAX_IMAGES; b++) {
        free(x->src[b]);
        free(x->img[b]);
        x->src[b] = NULL;
        x->img[b] = NULL;
    }
}

/* Encoder thread, batch encoded: each request's projected rows into a buffer of its own, each
 * image's into the cache (before the engine sees the batch done, so that a request for the same
 * image that waits is served from the cache at its next hand-off). */
static void encoder_hand_out(blip2_engine *e) {
    engine_encoder *x = &e->encoder;
    size_t emb = (size_t)e->m->cfg.Q * e->m->cfg.opt.C;
    for (int k = 0; k < x->n_req; k++)
        if ((x->out[k] = malloc(sizeof(float) * emb)))
            memcpy(x->out[k], x->proj + (size_t)x->req_row[k] * emb, sizeof(float) * emb);
    for (int b = 0; b < x->B; b++)
        if (x->img[b]) blip2_image_cache_put(&e->cache, x->img[b], x->img_len[b], x->img_hash[b], x->proj + (size_t)b * emb);
}

static void *encoder_main(void *arg) {
    blip2_engine *e = arg;
    engine_encoder *x = &e->encoder;
    blip2_device dev;
    blip2_status st = {0};
    blip2_code rc = blip2_device_open_background(x->device, x->device_index, &dev, &st); /* decode steps go first */
    if (!rc) {
        rc = blip2_encoder_ws_init(&x->ws, e->m, e->o.max_images_per_step, &st);
        if (rc) blip2_device_close(&dev);
    }
    pthread_mutex_lock(&x->mu);
    x->rc = rc;
    x->st = st;
    x->ready = 1;
    pthread_cond_broadcast(&x->cv);
    while (!rc) {
        while (x->state != ENC_BUSY && !x->quit) pthread_cond_wait(&x->cv, &x->mu);
        if (x->quit) break;
        pthread_mutex_unlock(&x->mu);
        int64_t t0 = blip2_now_ns();
        blip2_status est = {0};
        blip2_code erc = blip2_encode_image_list(e->m, &x->ws, (const float *const *)x->src, x->B, NULL, NULL, x->proj, &est);
        if (!erc) encoder_hand_out(e);
        encoder_release_batch(x);
        double ms = (double)(blip2_now_ns() - t0) / 1e6;
        pthread_mutex_lock(&x->mu);
        x->rc = erc, x->st = est, x->ms = ms;
        x->state = ENC_DONE;
        pthread_cond_broadcast(&x->cv);
    }
    pthread_mutex_unlock(&x->mu);
    if (!rc) {
        blip2_encoder_ws_free(&x->ws);
        blip2_device_close(&dev);
    }
    return NULL;
}

blip2_code engine_encoder_start(blip2_engine *e, blip2_status *st) {
    engine_encoder *x = &e->encoder;
    const blip2_config *c = &e->m->cfg;
    size_t B = (size_t)e->o.max_images_per_step;
    x->proj = malloc(sizeof(float) * B * c->Q * c->opt.C);
    if (!x->proj) return blip2_fail(st, BLIP2_ENOMEM, "engine: out of memory for the image batch");
    snprintf(x->device, sizeof x->device, "%s", e->m->ops->name); /* the model's backend, on the same GPU */
    x->device_index = blip2_device_current_index();
    pthread_mutex_init(&x->mu, NULL);
    pthread_cond_init(&x->cv, NULL);
    x->inited = 1;
    if (pthread_create(&x->thread, NULL, encoder_main, e))
        return blip2_fail(st, BLIP2_ENOMEM, "engine: cannot start the image encoder thread");
    x->started = 1;
    pthread_mutex_lock(&x->mu);
    while (!x->ready) pthread_cond_wait(&x->cv, &x->mu);
    blip2_code rc = x->rc;
    if (rc && st) *st = x->st;
    pthread_mutex_unlock(&x->mu);
    return rc;
}

void engine_encoder_stop(blip2_engine *e) {
    engine_encoder *x = &e->encoder;
    if (x->started) {
        pthread_mutex_lock(&x->mu);
        x->quit = 1;
        pthread_cond_broadcast(&x->cv);
        pthread_mutex_unlock(&x->mu);
        pthread_join(x->thread, NULL);
    }
    encoder_release_batch(x); /* a batch handed over but never encoded */
    for (int k = 0; k < ENC_MAX_REQS; k++) free(x->out[k]);
    if (x->inited) {
        pthread_mutex_destroy(&x->mu);
        pthread_cond_destroy(&x->cv);
    }
    free(x->proj);
    memset(x, 0, sizeof *x);
}

int engine_encoder_busy(blip2_engine *e) {
    engine_encoder *x = &e->encoder;
    pthread_mutex_lock(&x->mu);
    int busy = x->state == ENC_BUSY;
    pthread_mutex_unlock(&x->mu);
    return busy;
}

void engine_encoder_wait(blip2_engine *e, int ms) {
    engine_encoder *x = &e->encoder;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_nsec += (long)ms * 1000000;
    while (ts.tv_nsec >= 1000000000) ts.tv_sec++, ts.tv_nsec -= 1000000000;
    pthread_mutex_lock(&x->mu);
    if (x->state == ENC_BUSY) pthread_cond_timedwait(&x->cv, &x->mu, &ts);
    pthread_mutex_unlock(&x->mu);
}

/* Same image bytes (hash first, then every byte, as the cache does). */
static int same_image(const req_t *a, const req_t *b) {
    return a->img && b->img && a->hash == b->hash && a->img_len == b->img_len && memcmp(a->img, b->img, a->img_len) == 0;
}

/* An image encoded since this request was submitted: take its embedding from the cache. */
static int take_cached(blip2_engine *e, req_t *r, size_t emb) {
    if (!r->img || !(r->projected = malloc(sizeof(float) * emb))) return 0;
    if (!blip2_image_cache_retry(&e->cache, r->img, r->img_len, r->hash, r->projected)) {
        free(r->projected);
        r->projected = NULL;
        return 0;
    }
    r->cached = 1;
    free(r->pixels);
    r->pixels = NULL;
    return 1;
}

void engine_hand_images(blip2_engine *e) {
    engine_encoder *x = &e->encoder;
    pthread_mutex_lock(&x->mu);
    int idle = x->state == ENC_IDLE;
    pthread_mutex_unlock(&x->mu);
    if (!idle) return;
    size_t emb = (size_t)e->m->cfg.Q * e->m->cfg.opt.C;
    req_t *batch[ENC_MAX_REQS];
    int B = 0;
    x->n_req = 0;
    for (int i = 0; i < e->n_act && B < e->o.max_images_per_step && x->n_req < ENC_MAX_REQS; i++) {
        req_t *r = e->act[i];
        if (r->projected || r->encoding || take_cached(e, r, emb)) continue;
        int j = 0; /* an image another request of this batch brings is encoded once */
        while (j < B && !same_image(batch[j], r)) j++;
        if (j == B) { /* its pixels go to the encoder thread */
            x->src[B] = r->pixels;
            r->pixels = NULL;
            batch[B++] = r;
        }
        x->req_id[x->n_req] = r->id, x->req_row[x->n_req] = j, x->req_first[x->n_req++] = batch[j] == r;
        r->encoding = 1;
    }
    if (!B) return;
    for (int b = 0; b < B; b++) { /* the bytes go to the cache from the encoder thread */
        x->img[b] = batch[b]->img, x->img_len[b] = batch[b]->img_len, x->img_hash[b] = batch[b]->hash;
        batch[b]->img = NULL;
    }
    pthread_mutex_lock(&x->mu);
    x->B = B;
    x->state = ENC_BUSY;
    pthread_cond_broadcast(&x->cv);
    pthread_mutex_unlock(&x->mu);
}

static int find_active(const blip2_engine *e, uint64_t id) {
    for (int i = 0; i < e->n_act; i++)
        if (e->act[i]->id == id) return i;
    return -1;
}

void engine_collect_images(blip2_engine *e) {
    engine_encoder *x = &e->encoder;
    pthread_mutex_lock(&x->mu);
    int done = x->state == ENC_DONE;
    blip2_code rc = x->rc;
    blip2_status est = x->st;
    pthread_mutex_unlock(&x->mu);
    if (!done) return;
    for (int k = 0; k < x->n_req; k++) {
        float *rows = x->out[k];
        x->out[k] = NULL;
        int i = find_active(e, x->req_id[k]);
        if (i < 0) { /* retired while its image was encoded */
            free(rows);
            continue;
        }
        req_t *r = e->act[i];
        r->encoding = 0;
        if (rc) { /* this batch failed: its requests fail with the reason, the others go on */
            engine_retire(e, i, rc, est.msg);
            continue;
        }
        if (!(r->projected = rows)) {
            engine_retire(e, i, BLIP2_ENOMEM, "out of memory for the image embedding");
            continue;
        }
        r->image_ms = x->req_first[k] ? x->ms : 0;
        r->cached = !x->req_first[k]; /* shared another request's encoding */
        free(r->pixels);
        r->pixels = NULL;
    }
    pthread_mutex_lock(&x->mu);
    x->state = ENC_IDLE;
    pthread_mutex_unlock(&x->mu);
}
