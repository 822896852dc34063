/* The image side on rank 0: the encoder workspace and the three stages run back to back on the
 * backend (vision.c, qformer.c). Only the pixels go up and the projected rows come down; the
 * workspace is allocated once per caller (the engine keeps one for its largest image batch), so a
 * request never waits on an allocation or a device-wide free. */
#include <string.h>

#include "backend.h"
#include "forward.h"

static size_t max_sz(size_t a, size_t b) { return a > b ? a : b; }

blip2_code blip2_encoder_ws_init(blip2_encoder_ws *ws, const blip2_model *m, int max_B, blip2_status *st) {
    memset(ws, 0, sizeof *ws);
    const blip2_config *c = &m->cfg;
    const blip2_ops *o = m->ops;
    size_t B = (size_t)(max_B > 0 ? max_B : 1), T = (size_t)c->vision.T, Q = (size_t)c->Q;
    size_t Cv = (size_t)c->vision.C, Cq = (size_t)c->qformer.C, TQ = max_sz(T, Q);
    size_t K = (size_t)c->vision.channels * c->vision.patch_size * c->vision.patch_size;
    size_t sv = max_sz(B, (size_t)c->vision.NH) * T * blip2_attention_ld((int)T); /* ops.h: the score scratch */
    size_t sq = max_sz(B, (size_t)c->qformer.NH) * Q * blip2_attention_ld((int)TQ);
    ws->ops = o;
    ws->max_B = (int)B;
    float **bufs[] = {&ws->pixels, &ws->patches, &ws->x,  &ws->ctx, &ws->qkv, &ws->mlp, &ws->scores, &ws->image,
                      &ws->qx,     &ws->qq,      &ws->qctx, &ws->qo, &ws->qk,  &ws->qv,  &ws->qmlp,   &ws->proj};
    size_t n[] = {B * blip2_image_floats(&c->vision),
                  (size_t)c->vision.P * K,
                  B * T * Cv,
                  B * T * Cv,
                  B * T * 3 * Cv,
                  B * T * c->vision.mlp,
                  max_sz(sv, sq),
                  B * T * Cv,
                  B * Q * Cq,
                  B * Q * Cq,
                  B * Q * Cq,
                  B * Q * Cq,
                  B * TQ * Cq,
                  B * TQ * Cq,
                  B * Q * c->qformer.mlp,
                  B * Q * c->opt.C};
    int failed = 0;
    for (size_t i = 0; i < sizeof n / sizeof n[0]; i++) failed |= !(*bufs[i] = o->alloc(sizeof(float) * n[i]));
    int ad = blip2_adtype(m);
    size_t esz = blip2_wdtype_size(ad);
    failed |= !(ws->h = o->alloc(esz * B * T * max_sz(Cv, (size_t)c->vision.mlp)));
    ws->image_a = ad == BLIP2_W_F32 ? ws->image : o->alloc(esz * B * T * Cv);
    failed |= !ws->image_a;
    if (failed || blip2_graph_cache_init(&ws->graphs, o, (int)B, "image encoder", st)) {
        blip2_encoder_ws_free(ws);
        return blip2_fail(st, BLIP2_ENOMEM, "image encoder: out of %s memory for a batch of %d images", o->name, (int)B);
    }
    return BLIP2_OK;
}

void blip2_encoder_ws_free(blip2_encoder_ws *ws) {
    if (ws->ops) {
        void *bufs[] = {ws->pixels, ws->patches, ws->x,  ws->ctx, ws->qkv, ws->mlp,  ws->scores, ws->image,
                        ws->qx,     ws->qq,      ws->qctx, ws->qo,  ws->qk,  ws->qv,   ws->qmlp,   ws->proj};
        for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) ws->ops->release(bufs[i]);
        ws->ops->release(ws->h);
        if (ws->image_a != ws->image) ws->ops->release(ws->image_a);
        blip2_graph_cache_free(&ws->graphs);
    }
    memset(ws, 0, sizeof *ws);
}

static blip2_code check_batch(const blip2_encoder_ws *ws, const blip2_model *m, int B, blip2_status *st) {
    if (ws->ops != m->ops) return blip2_fail(st, BLIP2_EINTERNAL, "image encoder workspace on another backend");
    if (B < 1 || B > ws->max_B) return blip2_fail(st, BLIP2_EINTERNAL, "%d images for a workspace of %d", B, ws->max_B);
    return BLIP2_OK;
}

typedef struct {
    const blip2_model *m;
    blip2_encoder_ws *ws;
    int B;
} encode_args;

/* The three stages: ~500 launches for one image, so at small batches a graph (one per batch size,
 * graphs.h) is what keeps the GPU busy instead of the launching thread. */
static blip2_code encode_body(void *ctx, blip2_status *st) {
    encode_args *a = ctx;
    (void)st;
    blip2_vision_run(a->m, a->ws, a->B);
    blip2_qformer_run(a->m, a->ws, a->B);
    blip2_project_run(a->m, a->ws, a->B);
    return BLIP2_OK;
}

/* The three stages on the B images already in ws->pixels, then the downloads. */
static blip2_code encode_uploaded(const blip2_model *m, blip2_encoder_ws *ws, int B, float *image, float *qout,
                                  float *projected, blip2_status *st) {
    const blip2_config *c = &m->cfg;
    const blip2_ops *o = m->ops;
    blip2_code rc = BLIP2_OK;
    encode_args a = {m, ws, B};
    if (!blip2_graph_run(&ws->graphs, B, encode_body, &a, &rc, st)) rc = encode_body(&a, st);
    if (rc) return rc;
    if (image) o->download(image, ws->image, sizeof(float) * B * c->vision.T * c->vision.C);
    if (qout) o->download(qout, ws->qx, sizeof(float) * B * c->Q * c->qformer.C);
    o->download(projected, ws->proj, sizeof(float) * B * c->Q * c->opt.C);
    return blip2_backend_check(o, "image encoder", st);
}

blip2_code blip2_encode_images(const blip2_model *m, blip2_encoder_ws *ws, const float *pixels, int B, float *image,
                               float *qout, float *projected, blip2_status *st) {
    blip2_code rc = check_batch(ws, m, B, st);
    if (rc) return rc;
    m->ops->upload(ws->pixels, pixels, sizeof(float) * blip2_image_floats(&m->cfg.vision) * B);
    return encode_uploaded(m, ws, B, image, qout, projected, st);
}

blip2_code blip2_encode_image_list(const blip2_model *m, blip2_encoder_ws *ws, const float *const *pixels, int B,
                                   float *image, float *qout, float *projected, blip2_status *st) {
    blip2_code rc = check_batch(ws, m, B, st);
    if (rc) return rc;
    size_t n = blip2_image_floats(&m->cfg.vision);
    for (int b = 0; b < B; b++) m->ops->upload(ws->pixels + n * b, pixels[b], sizeof(float) * n);
    return encode_uploaded(m, ws, B, image, qout, projected, st);
}

/* ---- one stage at a time (host in, host out) ---- */

typedef enum { STAGE_VISION, STAGE_QFORMER, STAGE_PROJECT } stage;

static blip2_code run_stage(const blip2_model *m, stage s, const float *in, int B, float *out, blip2_status *st) {
    const blip2_config *c = &m->cfg;
    blip2_encoder_ws ws;
    blip2_code rc = blip2_encoder_ws_init(&ws, m, B, st);
    if (rc) return rc;
    size_t img = (size_t)B * c->vision.T * c->vision.C, qo = (size_t)B * c->Q * c->qformer.C;
    const blip2_ops *o = m->ops;
    if (s == STAGE_VISION) {
        o->upload(ws.pixels, in, sizeof(float) * B * blip2_image_floats(&c->vision));
        blip2_vision_run(m, &ws, B);
        o->download(out, ws.image, sizeof(float) * img);
    } else if (s == STAGE_QFORMER) {
        o->upload(ws.image, in, sizeof(float) * img);
        blip2_qformer_run(m, &ws, B);
        o->download(out, ws.qx, sizeof(float) * qo);
    } else {
        o->upload(ws.qx, in, sizeof(float) * qo);
        blip2_project_run(m, &ws, B);
        o->download(out, ws.proj, sizeof(float) * B * c->Q * c->opt.C);
    }
    static const char *names[] = {"vision encoder", "Q-Former", "language projection"};
    rc = blip2_backend_check(o, names[s], st);
    blip2_encoder_ws_free(&ws);
    return rc;
}

blip2_code blip2_vision_forward(const blip2_model *m, const float *pixels, int B, float *out, blip2_status *st) {
    return run_stage(m, STAGE_VISION, pixels, B, out, st);
}

blip2_code blip2_qformer_forward(const blip2_model *m, const float *image, int B, float *out, blip2_status *st) {
    return run_stage(m, STAGE_QFORMER, image, B, out, st);
}

blip2_code blip2_project(const blip2_model *m, const float *query_out, int B, float *out, blip2_status *st) {
    return run_stage(m, STAGE_PROJECT, query_out, B, out, st);
}
