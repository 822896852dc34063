/* EVA ViT-g/14 encoder (spec §3.1). Time goes to the four matmuls of each layer. */
#include <math.h>

#include "backend.h"
#include "forward.h"

static void vision_embed(const blip2_model *m, int B, blip2_encoder_ws *ws) {
    const blip2_vision_config *c = &m->cfg.vision;
    const blip2_vision_weights *w = &m->vision;
    const blip2_ops *o = m->ops;
    int K = c->channels * c->patch_size * c->patch_size;
    size_t img = blip2_image_floats(c);
    for (int b = 0; b < B; b++) {
        float *xb = ws->x + (size_t)b * c->T * c->C;
        o->im2col_patches(ws->patches, ws->pixels + b * img, c->channels, c->image_size, c->image_size, c->patch_size);
        o->copy(xb, w->class_emb, sizeof(float) * (size_t)c->C);
        blip2_mm(m, xb + c->C, ws->patches, w->patch_w, w->patch_b, c->P, K, c->C, BLIP2_ACT_NONE);
        o->add_rows(xb, w->pos_emb, 0, c->T, c->C);
    }
}

/* One pre-LN layer over all B·T rows on the residual stream x; attention batched over the images.
 * Each norm runs as the prologue of its matmul (matmul_ln_a: the norm kernel into h, then the
 * matmul) and proj and fc2 add into x themselves (matmul_acc_a: cuBLASLt's beta = 1), so the
 * norms read one fp32 row and write one 16-bit row, where the fused residual + norm read two and
 * wrote two (run 8, H100, 64 images: residual + LayerNorm 9.5 ms of 98). Activations a matmul
 * reads (h: the norms, GELU) and the fc1 output GELU reads are in the model's activation type
 * (blip2_adtype): on a device 16-bit, written once (run 8: GELU 0.20 ms a layer reading 16 bits,
 * 0.32 reading fp32). qkv and ctx stay fp32 unless BLIP2_QKV16=1 (backend.h: the attention kernel
 * was slower on 16-bit inputs in run 8). */
static void vision_layer_forward(const blip2_model *m, int l, int B, blip2_encoder_ws *ws) {
    const blip2_vision_config *c = &m->cfg.vision;
    const blip2_vision_layer *L = &m->vision.layers[l];
    const blip2_ops *o = m->ops;
    int BT = B * c->T, C = c->C, ad = blip2_adtype(m), qd = blip2_qkv16_type(m), od = blip2_out16_type(m);
    size_t es = blip2_wdtype_size(qd);
    float scale = 1.0f / sqrtf((float)c->HS); /* HF: scores · head_dim^-0.5 */
    char *qkv = (char *)ws->qkv;
    blip2_mm_ln_ao(m, qkv, qd, ws->h, ws->x, L->ln1_w, L->ln1_b, c->eps, L->qkv_w, L->qkv_b, L->qkv_b16, BT, C, 3 * C,
                   BLIP2_ACT_NONE);
    o->attention(ws->ctx, qkv, qkv + C * es, qkv + 2 * C * es, ws->scores, B, c->T, c->T, c->NH, c->HS, 3 * C, 3 * C,
                 scale, 0, m->wdtype, qd);
    o->matmul_acc_a(ws->x, ws->ctx, L->proj_w, L->proj_b, BT, C, C, qd, m->wdtype); /* x += proj(ctx) */
    blip2_mm_ln_ao(m, ws->mlp, od, ws->h, ws->x, L->ln2_w, L->ln2_b, c->eps, L->fc1_w, L->fc1_b, L->fc1_b16, BT, C,
                   c->mlp, BLIP2_ACT_NONE);
    o->activate_a(ws->h, ws->mlp, (size_t)BT * c->mlp, BLIP2_ACT_GELU, ad, od);
    o->matmul_acc_a(ws->x, ws->h, L->fc2_w, L->fc2_b, BT, c->mlp, C, ad, m->wdtype); /* x += fc2(GELU) */
}

void blip2_vision_run(const blip2_model *m, blip2_encoder_ws *ws, int B) {
    const blip2_vision_config *c = &m->cfg.vision;
    vision_embed(m, B, ws);
    for (int l = 0; l < c->layers; l++) vision_layer_forward(m, l, B, ws);
    m->ops->layernorm(ws->image, ws->x, m->vision.post_ln_w, m->vision.post_ln_b, B * c->T, c->C, c->eps);
}
