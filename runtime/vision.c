/* EVA ViT-g/14 encoder (spec §3.1). Time goes to the four matmuls of each layer. */
#include <math.h>

#include "backend.h"
#include "forward.h"

static void vision_embed(const blip2_model *m, int B, blip2_encoder_ws *ws) {
    const blip2_vision_config *c = &m->cfg.vision;
    const blip2_vision_weights *w = &m->vision;
    const blip2_ops *o = m->ops;
    int K = c->channels * c->patch_size * c->patch_size;
    size_t img = (size_t)c->channels * c->image_size * c->image_size;
    for (int b = 0; b < B; b++) {
        float *xb = ws->x + (size_t)b * c->T * c->C;
        o->im2col_patches(ws->patches, ws->pixels + b * img, c->channels, c->image_size, c->image_size, c->patch_size);
        o->copy(xb, w->class_emb, sizeof(float) * (size_t)c->C);
        blip2_mm(m, xb + c->C, ws->patches, w->patch_w, w->patch_b, c->P, K, c->C, BLIP2_ACT_NONE);
        o->add_rows(xb, w->pos_emb, 0, c->T, c->C);
    }
}

/* One pre-LN layer over all B·T rows; attention batched over the images. */
static void vision_layer_forward(const blip2_model *m, const blip2_vision_layer *L, int B, blip2_encoder_ws *ws) {
    const blip2_vision_config *c = &m->cfg.vision;
    const blip2_ops *o = m->ops;
    int BT = B * c->T, C = c->C;
    float scale = 1.0f / sqrtf((float)c->HS); /* HF: scores · head_dim^-0.5 */
    o->layernorm(ws->a, ws->x, L->ln1_w, L->ln1_b, BT, C, c->eps);
    blip2_mm(m, ws->qkv, ws->a, L->qkv_w, L->qkv_b, BT, C, 3 * C, BLIP2_ACT_NONE);
    o->attention(ws->ctx, ws->qkv, ws->qkv + C, ws->qkv + 2 * C, ws->scores, B, c->T, c->T, c->NH, c->HS, 3 * C, 3 * C,
                 scale, 0, m->wdtype);
    blip2_mm(m, ws->a, ws->ctx, L->proj_w, L->proj_b, BT, C, C, BLIP2_ACT_NONE);
    o->residual_layernorm(ws->x, ws->a, ws->a, NULL, L->ln2_w, L->ln2_b, BT, C, c->eps); /* x += a; a = LN2(x) */
    blip2_mm(m, ws->mlp, ws->a, L->fc1_w, L->fc1_b, BT, C, c->mlp, BLIP2_ACT_GELU);
    blip2_mm(m, ws->a, ws->mlp, L->fc2_w, L->fc2_b, BT, c->mlp, C, BLIP2_ACT_NONE);
    o->residual_add(ws->x, ws->a, (size_t)BT * C);
}

void blip2_vision_run(const blip2_model *m, blip2_encoder_ws *ws, int B) {
    const blip2_vision_config *c = &m->cfg.vision;
    vision_embed(m, B, ws);
    for (int l = 0; l < c->layers; l++) vision_layer_forward(m, &m->vision.layers[l], B, ws);
    m->ops->layernorm(ws->image, ws->x, m->vision.post_ln_w, m->vision.post_ln_b, B * c->T, c->C, c->eps);
}
