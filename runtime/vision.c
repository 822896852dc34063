/* EVA ViT-g/14 encoder (spec §3.1). Time goes to the four matmuls of each layer. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../kernels/ops.h"
#include "forward.h"

typedef struct {
    float *a;       /* [B·T, Cv] layer-norm output / matmul result */
    float *qkv;     /* [B·T, 3Cv] */
    float *ctx;     /* [B·T, Cv] */
    float *mlp;     /* [B·T, mlp] */
    float *patches; /* [P, 3·PS·PS] */
    float *scores;  /* [T, T] one head's attention scores */
} vision_ws;

static void vision_embed(const blip2_model *m, const float *pixels, int B, float *x, float *patches) {
    const blip2_vision_config *c = &m->cfg.vision;
    const blip2_vision_weights *w = &m->vision;
    int K = c->channels * c->patch_size * c->patch_size;
    size_t img = (size_t)c->channels * c->image_size * c->image_size;
    for (int b = 0; b < B; b++) {
        float *xb = x + (size_t)b * c->T * c->C;
        blip2_im2col_patches(patches, pixels + b * img, c->channels, c->image_size, c->image_size, c->patch_size);
        memcpy(xb, w->class_emb, sizeof(float) * (size_t)c->C);
        blip2_matmul(xb + c->C, patches, w->patch_w, w->patch_b, c->P, K, c->C);
        blip2_add_rows(xb, w->pos_emb, 0, c->T, c->C);
    }
}

static void vision_layer_forward(const blip2_vision_config *c, const blip2_vision_layer *L, float *x, int B,
                                 vision_ws *ws) {
    int BT = B * c->T, C = c->C;
    float scale = 1.0f / sqrtf((float)c->HS); /* HF: scores · head_dim^-0.5 */
    blip2_layernorm(ws->a, x, L->ln1_w, L->ln1_b, BT, C, c->eps);
    blip2_matmul(ws->qkv, ws->a, L->qkv_w, L->qkv_b, BT, C, 3 * C);
    for (int b = 0; b < B; b++) {
        const float *q = ws->qkv + (size_t)b * c->T * 3 * C;
        blip2_attention(ws->ctx + (size_t)b * c->T * C, q, q + C, q + 2 * C, ws->scores, c->T, c->T, c->NH, c->HS,
                        3 * C, 3 * C, scale, 0);
    }
    blip2_matmul(ws->a, ws->ctx, L->proj_w, L->proj_b, BT, C, C);
    blip2_residual_add(x, ws->a, (size_t)BT * C);
    blip2_layernorm(ws->a, x, L->ln2_w, L->ln2_b, BT, C, c->eps);
    blip2_matmul(ws->mlp, ws->a, L->fc1_w, L->fc1_b, BT, C, c->mlp);
    blip2_gelu(ws->mlp, (size_t)BT * c->mlp);
    blip2_matmul(ws->a, ws->mlp, L->fc2_w, L->fc2_b, BT, c->mlp, C);
    blip2_residual_add(x, ws->a, (size_t)BT * C);
}

blip2_code blip2_vision_forward(const blip2_model *m, const float *pixels, int B, float *out, blip2_status *st) {
    const blip2_vision_config *c = &m->cfg.vision;
    size_t BT = (size_t)B * c->T;
    float *x = malloc(sizeof(float) * BT * c->C);
    vision_ws ws = {
        .a = malloc(sizeof(float) * BT * c->C),
        .qkv = malloc(sizeof(float) * BT * 3 * c->C),
        .ctx = malloc(sizeof(float) * BT * c->C),
        .mlp = malloc(sizeof(float) * BT * c->mlp),
        .patches = malloc(sizeof(float) * c->P * c->channels * c->patch_size * c->patch_size),
        .scores = malloc(sizeof(float) * c->T * c->T),
    };
    blip2_code rc = BLIP2_OK;
    if (!x || !ws.a || !ws.qkv || !ws.ctx || !ws.mlp || !ws.patches || !ws.scores) {
        rc = blip2_fail(st, BLIP2_ENOMEM, "vision encoder: out of memory for a batch of %d", B);
    } else {
        vision_embed(m, pixels, B, x, ws.patches);
        for (int l = 0; l < c->layers; l++) vision_layer_forward(c, &m->vision.layers[l], x, B, &ws);
        blip2_layernorm(out, x, m->vision.post_ln_w, m->vision.post_ln_b, (int)BT, c->C, c->eps);
    }
    free(x);
    free(ws.a);
    free(ws.qkv);
    free(ws.ctx);
    free(ws.mlp);
    free(ws.patches);
    free(ws.scores);
    return rc;
}
