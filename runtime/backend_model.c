/* Weights on a backend: uploading a loaded model (matrices converted to 16-bit on the way) and
 * random weights made directly in backend memory. Time goes to the host → device copy; the
 * conversion runs on the CPU into a staging buffer while the previous chunk is in flight. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "device.h"
#include "model.h"

#define STAGE_ELEMS ((size_t)1 << 24) /* 16 Mi elements per staging round */

int blip2_weight_is_matrix(const blip2_weight_entry *e) {
    size_t len = strlen(e->name);
    return e->ndim >= 2 && len > 7 && strcmp(e->name + len - 7, ".weight") == 0 && !strstr(e->name, "embed_positions");
}

/* Backend storage the model owns (released with it); ctx is the model. */
static void *dev_alloc(void *ctx, size_t bytes) {
    blip2_model *m = ctx;
    void *p = m->ops->alloc(bytes);
    if (p) m->dev_owned[m->n_dev_owned++] = p, m->dev_bytes += bytes;
    return p;
}

/* Storage on the backend for entry e of n elements of es bytes (a fused part: its slice). */
static blip2_code dev_storage(blip2_model *m, const blip2_weight_entry *e, size_t n, size_t es, void **dst,
                              blip2_status *st) {
    *dst = blip2_weight_storage(e, n, es, dev_alloc, m);
    if (*dst) return BLIP2_OK;
    return blip2_fail(st, BLIP2_ENOMEM, "%s: out of memory for %s (%.1f MiB; %.2f GiB of weights held so far)",
                      m->ops->name, e->name, (double)n * es * (e->group ? e->parts : 1) / 1048576.0,
                      m->dev_bytes / 1073741824.0);
}

/* One tensor: fp32 host → backend, as wdtype when it is a matrix. */
static blip2_code upload_tensor(blip2_model *m, const blip2_weight_entry *e, const float *src, size_t n, int wdtype,
                                void **dst, uint16_t *stage, blip2_status *st) {
    void *d;
    blip2_code rc = dev_storage(m, e, n, blip2_wdtype_size(wdtype), &d, st);
    if (rc) return rc;
    if (wdtype == BLIP2_W_F32) {
        m->ops->upload(d, src, n * sizeof(float));
    } else {
        for (size_t off = 0; off < n; off += STAGE_ELEMS) {
            size_t k = n - off < STAGE_ELEMS ? n - off : STAGE_ELEMS;
            for (size_t i = 0; i < k; i++)
                stage[i] = wdtype == BLIP2_W_F16 ? blip2_f32_to_f16(src[off + i]) : blip2_f32_to_bf16(src[off + i]);
            m->ops->upload((uint16_t *)d + off, stage, k * sizeof(uint16_t)); /* returns once stage may be reused */
        }
    }
    *dst = d;
    return BLIP2_OK;
}

/* The 16-bit twins of the biases whose matmuls write 16-bit outputs (model.h), in one backend
 * buffer, converted there from the fp32 biases. Only where the forward uses them: a device
 * backend with 16-bit weights (blip2_adtype). */
static blip2_code model_bias16(blip2_model *m, blip2_status *st) {
    const blip2_config *c = &m->cfg;
    if (!m->ops->device || m->wdtype == BLIP2_W_F32) return BLIP2_OK;
    int have_vision = m->vision.layers && m->vision.layers[0].qkv_b;
    size_t per_v = have_vision ? 3 * (size_t)c->vision.C + (size_t)c->vision.mlp : 0, per_o = (size_t)m->shard.ffn;
    size_t n = per_v * c->vision.layers + per_o * c->opt.layers;
    uint16_t *d = n ? dev_alloc(m, n * sizeof(uint16_t)) : NULL;
    if (n && !d) return blip2_fail(st, BLIP2_ENOMEM, "%s: out of memory for the 16-bit biases", m->ops->name);
    const blip2_ops *o = m->ops;
    int wd = m->wdtype;
    for (int l = 0; have_vision && l < c->vision.layers; l++) {
        blip2_vision_layer *L = &m->vision.layers[l];
        L->qkv_b16 = d, L->fc1_b16 = d + 3 * (size_t)c->vision.C;
        o->activate_a(L->qkv_b16, L->qkv_b, 3 * (size_t)c->vision.C, BLIP2_ACT_NONE, wd, BLIP2_W_F32);
        o->activate_a(L->fc1_b16, L->fc1_b, (size_t)c->vision.mlp, BLIP2_ACT_NONE, wd, BLIP2_W_F32);
        d += per_v;
    }
    for (int l = 0; l < c->opt.layers; l++, d += per_o) {
        m->opt.layers[l].fc1_b16 = d;
        o->activate_a(d, m->opt.layers[l].fc1_b, per_o, BLIP2_ACT_NONE, wd, BLIP2_W_F32);
    }
    return BLIP2_OK;
}

/* A tensor this rank holds and uploads (a tied lm_head is embed_tokens: it goes up once). */
static int held_here(const blip2_model *m, const blip2_weight_entry *e, int tied) {
    return *e->field && !(tied && e->field == (float **)&m->opt.lm_head);
}

/* One line per tenth of the bytes (shown: the last tenth printed, -1 at first). */
static void progress_line(const blip2_model *m, size_t done, size_t total, int *shown) {
    int pct = total ? (int)(100 * done / total) : 100;
    if (pct / 10 <= *shown) return;
    *shown = pct / 10;
    fprintf(stderr, "blip2: rank %d: weights on %s: %3d%% (%.2f GiB)\n", m->shard.rank, m->ops->name, pct,
            m->dev_bytes / 1073741824.0);
}

blip2_code blip2_model_to_backend(blip2_model *m, const blip2_ops *ops, int wdtype, int progress, blip2_status *st) {
    if (ops == m->ops && wdtype == m->wdtype) return BLIP2_OK;
    if (m->ops != &blip2_cpu_ops || m->wdtype != BLIP2_W_F32)
        return blip2_fail(st, BLIP2_EINTERNAL, "the model is already on %s", m->ops->name);
    blip2_weight_entry *e = NULL;
    int n = 0;
    blip2_code rc = blip2_weight_table(m, &e, &n, st);
    int tied = m->opt.lm_head == m->opt.wte;
    uint16_t *stage = rc ? NULL : blip2_malloc(STAGE_ELEMS * sizeof(uint16_t), st);
    if (!rc && (!stage || !(m->dev_owned = blip2_calloc((size_t)n + 1, sizeof *m->dev_owned, st)))) rc = BLIP2_ENOMEM;
    size_t total = 0, done = 0;
    for (int i = 0; !rc && i < n; i++)
        if (held_here(m, &e[i], tied)) total += blip2_weight_local_numel(m, &e[i]);
    m->ops = ops; /* from here on dev_owned holds backend buffers */
    int shown = -1;
    for (int i = 0; !rc && i < n; i++) {
        if (!held_here(m, &e[i], tied)) continue;
        size_t k = blip2_weight_local_numel(m, &e[i]);
        void *d = NULL;
        rc = upload_tensor(m, &e[i], *e[i].field, k, blip2_weight_is_matrix(&e[i]) ? wdtype : BLIP2_W_F32, &d, stage, st);
        if (!rc) *e[i].field = d;
        done += k;
        if (progress) progress_line(m, done, total, &shown);
    }
    if (tied) m->opt.lm_head = m->opt.wte;
    m->wdtype = wdtype;
    if (!rc) rc = model_bias16(m, st);
    char err[256] = "";
    if (!rc && ops->sync(err, sizeof err)) rc = blip2_fail(st, BLIP2_EINTERNAL, "uploading weights: %s", err);
    for (int i = 0; i < m->n_owned; i++) free(m->owned[i]); /* host copies are no longer read */
    m->n_owned = 0;
    blip2_checkpoint_close(&m->ckpt);
    free(stage);
    free(e);
    return rc;
}

static uint64_t name_hash(const char *s) {
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (; *s; s++) h = (h ^ (uint8_t)*s) * 1099511628211ull;
    return h;
}

blip2_code blip2_model_init_random_on(const blip2_config *cfg, int rank, int world, uint64_t seed, const blip2_ops *ops,
                                      int wdtype, blip2_model *m, blip2_status *st) {
    if (ops == &blip2_cpu_ops && wdtype == BLIP2_W_F32) return blip2_model_init_random(cfg, rank, world, seed, m, st);
    blip2_weight_entry *e = NULL;
    int n = 0;
    blip2_code rc = blip2_model_plan(cfg, rank, world, m, st);
    if (!rc) rc = blip2_weight_table(m, &e, &n, st);
    if (!rc && !(m->dev_owned = blip2_calloc((size_t)n + 1, sizeof *m->dev_owned, st))) rc = BLIP2_ENOMEM; /* + the 16-bit biases */
    m->ops = ops;
    for (int i = 0; !rc && i < n; i++) {
        if (e[i].optional || (e[i].rank0_only && rank != 0)) continue;
        size_t k = blip2_weight_local_numel(m, &e[i]);
        int dt = blip2_weight_is_matrix(&e[i]) ? wdtype : BLIP2_W_F32;
        void *d = NULL;
        rc = dev_storage(m, &e[i], k, blip2_wdtype_size(dt), &d, st);
        float mean, std;
        blip2_weight_random_rule(e[i].name, &mean, &std);
        if (!rc) ops->fill_normal(d, dt, k, seed ^ name_hash(e[i].name) ^ ((uint64_t)rank << 48), mean, std);
        if (!rc) *e[i].field = d;
        if (!rc && !e[i].rank0_only) m->opt_bytes += k * blip2_wdtype_size(dt);
    }
    m->opt.lm_head = m->opt.wte;
    m->wdtype = wdtype;
    if (!rc) rc = model_bias16(m, st);
    char err[256] = "";
    if (!rc && ops->sync(err, sizeof err)) rc = blip2_fail(st, BLIP2_EINTERNAL, "random weights: %s", err);
    free(e);
    return rc;
}

int blip2_wdtype_parse(const char *s) {
    if (!strcmp(s, "f32") || !strcmp(s, "fp32") || !strcmp(s, "float32")) return BLIP2_W_F32;
    if (!strcmp(s, "f16") || !strcmp(s, "fp16") || !strcmp(s, "float16")) return BLIP2_W_F16;
    if (!strcmp(s, "bf16") || !strcmp(s, "bfloat16")) return BLIP2_W_BF16;
    return -1;
}

const char *blip2_wdtype_name(int wdtype) {
    return wdtype == BLIP2_W_F16 ? "f16" : wdtype == BLIP2_W_BF16 ? "bf16" : "f32";
}
