/* Small helpers the forward files share for talking to the model's backend (m->ops). */
#ifndef BLIP2_BACKEND_H
#define BLIP2_BACKEND_H

#include <stddef.h>
#include <stdlib.h>

#include "model.h"

/* The element type of the matmul inputs the encoders hand from op to op (ops.h, the "_a" ops):
 * on a device, the weights' 16-bit type, which its tensor cores read anyway (written once, half
 * the bytes); on the CPU reference fp32, as it keeps activations exact. */
static inline int blip2_adtype(const blip2_model *m) { return m->ops->device ? m->wdtype : BLIP2_W_F32; }

/* Whether environment variable name is set to exactly "1" (on = 1) or "0" (on = 0). */
static inline int blip2_env_is(const char *name, int on) {
    const char *e = getenv(name);
    return e && e[0] == (on ? '1' : '0') && !e[1];
}

/* The element type of the outputs of the matmuls whose only readers take 16 bits (vision fc1 for
 * GELU, OPT fc1 for fc2): the activation type, or fp32 with BLIP2_OUT16=0 (the earlier path, for
 * comparing them in one benchmark run). */
static inline int blip2_out16_type(const blip2_model *m) {
    static int off = -1;
    if (off < 0) off = blip2_env_is("BLIP2_OUT16", 0);
    return off ? BLIP2_W_F32 : blip2_adtype(m);
}

/* The same for the vision qkv output, which the encoder attention reads: fp32 unless
 * BLIP2_QKV16=1. Run 8 (H100, ncu, 64 images): the mma attention kernel took 0.67 ms a layer
 * reading 16-bit q, k, v against 0.39 reading fp32 (it widens and re-narrows them on the way to
 * shared memory; issue-bound, so half the bytes bought nothing), which cancelled the rest of the
 * 16-bit path's gain (vision 99.9 vs 99.3 ms). */
static inline int blip2_qkv16_type(const blip2_model *m) {
    static int on = -1;
    if (on < 0) on = blip2_env_is("BLIP2_QKV16", 1);
    return on ? blip2_out16_type(m) : BLIP2_W_F32;
}

/* The bias a matmul op takes for an out of odtype: the fp32 bias, or with a 16-bit out bias16, the
 * layer's 16-bit twin of it (model.h; the ops take a bias of their out's type). */
static inline const void *blip2_bias_for(int odtype, const float *bias, const void *bias16) {
    return odtype == BLIP2_W_F32 ? (const void *)bias : bias16;
}

/* out = act(inp · wᵀ + bias) with inp of adtype (fp32 or the model's 16-bit type), w in the
 * model's wdtype and out of odtype (fp32, or the 16-bit adtype), bias as blip2_bias_for. */
static inline void blip2_mm_ao(const blip2_model *m, void *out, int odtype, const void *inp, int adtype, const float *w,
                               const float *bias, const void *bias16, int T, int C, int OC, int act) {
    m->ops->matmul_a(out, inp, w, blip2_bias_for(odtype, bias, bias16), T, C, OC, adtype, m->wdtype, act, odtype);
}

/* blip2_mm_ao of LN(x) (ops.h matmul_ln_a): the norm into h [T, C] of the activation type unless
 * the backend fuses it into the matmul. */
static inline void blip2_mm_ln_ao(const blip2_model *m, void *out, int odtype, void *h, const float *x, const float *ln_w,
                                  const float *ln_b, float eps, const float *w, const float *bias, const void *bias16,
                                  int T, int C, int OC, int act) {
    m->ops->matmul_ln_a(out, h, x, ln_w, ln_b, eps, w, blip2_bias_for(odtype, bias, bias16), T, C, OC, blip2_adtype(m),
                        m->wdtype, act, odtype);
}

/* The same with an fp32 out. */
static inline void blip2_mm_a(const blip2_model *m, float *out, const void *inp, int adtype, const float *w,
                              const float *bias, int T, int C, int OC, int act) {
    blip2_mm_ao(m, out, BLIP2_W_F32, inp, adtype, w, bias, NULL, T, C, OC, act);
}

/* The same with fp32 inp. */
static inline void blip2_mm(const blip2_model *m, float *out, const float *inp, const float *w, const float *bias, int T,
                            int C, int OC, int act) {
    blip2_mm_a(m, out, inp, BLIP2_W_F32, w, bias, T, C, OC, act);
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
