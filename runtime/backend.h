/* Small helpers the forward files share for talking to the model's backend (m->ops). */
#ifndef BLIP2_BACKEND_H
#define BLIP2_BACKEND_H

#include <stddef.h>

#include "model.h"

/* out = act(inp · wᵀ + bias) with w in the model's wdtype (fp32 or 16-bit). */
static inline void blip2_mm(const blip2_model *m, float *out, const float *inp, const float *w, const float *bias, int T,
                            int C, int OC, int act) {
    const blip2_ops *o = m->ops;
    if (m->wdtype != BLIP2_W_F32) {
        o->matmul_h(out, inp, (const uint16_t *)(const void *)w, bias, T, C, OC, m->wdtype, act);
        return;
    }
    o->matmul(out, inp, w, bias, T, C, OC);
    if (act == BLIP2_ACT_GELU) o->gelu(out, (size_t)T * OC);
    if (act == BLIP2_ACT_RELU) o->relu(out, (size_t)T * OC);
}

/* Backend buffers taken together and released together (a forward's workspace). */
#define BLIP2_BUFS_MAX 16
typedef struct {
    const blip2_ops *ops;
    void *p[BLIP2_BUFS_MAX];
    int n, failed;
} blip2_bufs;

static inline void *blip2_bufs_get(blip2_bufs *b, size_t bytes) {
    void *p = b->n < BLIP2_BUFS_MAX ? b->ops->alloc(bytes) : NULL;
    if (!p) b->failed = 1;
    else b->p[b->n++] = p;
    return p;
}

static inline void blip2_bufs_release(blip2_bufs *b) {
    for (int i = 0; i < b->n; i++) b->ops->release(b->p[i]);
    b->n = 0;
}

/* Waits for the backend and turns a device error into a status naming `what`. */
blip2_code blip2_backend_check(const blip2_ops *ops, const char *what, blip2_status *st);

#endif
