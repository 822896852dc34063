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

/* One pre-LN layer over all B·T rows; attention batched over the images. On entry ws->h holds
 * LN1(x); the last residual add is fused with the next norm: the next layer's LN1 into h, or
 * after the last layer post_layernorm into ws->image. Activations a matmul reads (h: the norms,
 * GELU) and the fc1 output GELU reads are in the model's activation type (blip2_adtype): on a
 * device 16-bit, written once (run 8, H100, 64 images: GELU 0.20 ms a layer reading 16 bits,
 * 0.32 reading fp32). qkv and ctx stay fp32 unless BLIP2_QKV16=1 (backend.h: the attention kernel
 * is slower on 16-bit inputs for now); the residual stream x and the row outputs a stay fp32. */
static void vision_layer_forward(const blip2_model *m, int l, int B, blip2_encoder_ws *ws) {
    const blip2_vision_config *c = &m->cfg.vision;
    const blip2_vision_layer *L = &m->vision.layers[l];
    const blip2_ops *o = m->ops;
    int BT = B * c->T, C = c->C, ad = blip2_adtype(m), qd = blip2_qkv16_type(m), od = blip2_out16_type(m);
    size_t es = blip2_wdtype_size(qd);
    float scale = 1.0f / sqrtf((float)c->HS); /* HF: scores · head_dim^-0.5 */
    char *qkv = (char *)ws->qkv;
    blip2_mm_ao(m, qkv, qd, ws->h, ad, L->qkv_w, L->qkv_b, L->qkv_b16, BT, C, 3 * C, BLIP2_ACT_NONE);
    o->attention(ws->ctx, qkv, qkv + C * es, qkv + 2 * C * es, ws->scores, B, c->T, c->T, c->NH, c->HS, 3 * C, 3 * C,
                 scale, 0, m->wdtype, qd);
    blip2_mm_a(m, ws->a, ws->ctx, qd, L->proj_w, L->proj_b, BT, C, C, BLIP2_ACT_NONE);
    o->residual_layernorm_a(ws->x, ws->h, ws->a, NULL, L->ln2_w, L->ln2_b, BT, C, c->eps, ad); /* x += a; h = LN2(x) */
    blip2_mm_ao(m, ws->mlp, od, ws->h, ad, L->fc1_w, L->fc1_b, L->fc1_b16, BT, C, c->mlp, BLIP2_ACT_NONE);
    o->activate_a(ws->h, ws->mlp, (size_t)BT * c->mlp, BLIP2_ACT_GELU, ad, od);
    blip2_mm_a(m, ws->a, ws->h, ad, L->fc2_w, L->fc2_b, BT, c->mlp, C, BLIP2_ACT_NONE);
    if (l + 1 < c->layers) { /* x += a; h = the next LN1(x) */
        const blip2_vision_layer *N = &m->vision.layers[l + 1];
        o->residual_layernorm_a(ws->x, ws->h, ws->a, NULL, N->ln1_w, N->ln1_b, BT, C, c->eps, ad);
    } else { /* x += a; image = post_layernorm(x) */
        o->residual_layernorm(ws->x, ws->image, ws->a, NULL, m->vision.post_ln_w, m->vision.post_ln_b, BT, C, c->eps);
    }
}

void blip2_vision_run(const blip2_model *m, blip2_encoder_ws *ws, int B) {
    const blip2_vision_config *c = &m->cfg.vision;
    vision_embed(m, B, ws); /* config: at least one layer */
    const blip2_vision_layer *L0 = &m->vision.layers[0];
    m->ops->layernorm_a(ws->h, ws->x, L0->ln1_w, L0->ln1_b, B * c->T, c->C, c->eps, blip2_adtype(m));
    for (int l = 0; l < c->layers; l++) vision_layer_forward(m, l, B, ws);
}
