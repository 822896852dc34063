/* The name table and the loader. The table below is the single place that maps checkpoint names
 * to struct fields and shapes (symbolic dims resolved from the config). */
#define _POSIX_C_SOURCE 200809L
#include <jansson.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "../parallel/comm.h"
#include "model.h"
#include "sampling.h"

/* Symbolic dimensions, resolved by dim_value(). */
enum { D_END = 0, D_1, D_VC, D_V3C, D_VMLP, D_VT, D_VCH, D_VPS, D_QC, D_QMLP, D_Q, D_TC, D_TFFN, D_TV, D_TPOS };

static int64_t dim_value(const blip2_config *c, int d) {
    switch (d) {
    case D_1: return 1;
    case D_VC: return c->vision.C;
    case D_V3C: return 3 * (int64_t)c->vision.C;
    case D_VMLP: return c->vision.mlp;
    case D_VT: return c->vision.T;
    case D_VCH: return c->vision.channels;
    case D_VPS: return c->vision.patch_size;
    case D_QC: return c->qformer.C;
    case D_QMLP: return c->qformer.mlp;
    case D_Q: return c->Q;
    case D_TC: return c->opt.C;
    case D_TFFN: return c->opt.ffn;
    case D_TV: return c->opt.V;
    case D_TPOS: return (int64_t)c->opt.max_pos + 2;
    }
    return -1;
}

typedef struct {
    const char *name; /* printf pattern; %d is the layer index where the group is per-layer */
    size_t offset;    /* of the float * field within the group's struct */
    int dims[4];
    int split;        /* tensor-parallel slicing: BLIP2_SPLIT_* */
} tmpl;

/* Tensors stored stacked as parts of one fused field (same struct as the tmpl group). */
typedef struct {
    size_t field, fused; /* offsets */
    int part, parts;
} fused_part;

#define F(type, field) offsetof(type, field)
#define VEC(d) {d}
#define MAT(a, b) {a, b}
#define NONE BLIP2_SPLIT_NONE /* whole on every rank that holds it */
#define ROWS BLIP2_SPLIT_ROWS /* column-parallel: this rank's output features */
#define COLS BLIP2_SPLIT_COLS /* row-parallel: this rank's input features */

static const tmpl vision_top[] = {
    {"vision_model.embeddings.patch_embedding.weight", F(blip2_vision_weights, patch_w), {D_VC, D_VCH, D_VPS, D_VPS}, NONE},
    {"vision_model.embeddings.patch_embedding.bias", F(blip2_vision_weights, patch_b), VEC(D_VC), NONE},
    {"vision_model.embeddings.class_embedding", F(blip2_vision_weights, class_emb), {D_1, D_1, D_VC}, NONE},
    {"vision_model.embeddings.position_embedding", F(blip2_vision_weights, pos_emb), {D_1, D_VT, D_VC}, NONE},
    {"vision_model.post_layernorm.weight", F(blip2_vision_weights, post_ln_w), VEC(D_VC), NONE},
    {"vision_model.post_layernorm.bias", F(blip2_vision_weights, post_ln_b), VEC(D_VC), NONE},
};

static const tmpl vision_layer[] = {
    {"vision_model.encoder.layers.%d.layer_norm1.weight", F(blip2_vision_layer, ln1_w), VEC(D_VC), NONE},
    {"vision_model.encoder.layers.%d.layer_norm1.bias", F(blip2_vision_layer, ln1_b), VEC(D_VC), NONE},
    {"vision_model.encoder.layers.%d.self_attn.qkv.weight", F(blip2_vision_layer, qkv_w), MAT(D_V3C, D_VC), NONE},
    {"vision_model.encoder.layers.%d.self_attn.qkv.bias", F(blip2_vision_layer, qkv_b), VEC(D_V3C), NONE},
    {"vision_model.encoder.layers.%d.self_attn.projection.weight", F(blip2_vision_layer, proj_w), MAT(D_VC, D_VC), NONE},
    {"vision_model.encoder.layers.%d.self_attn.projection.bias", F(blip2_vision_layer, proj_b), VEC(D_VC), NONE},
    {"vision_model.encoder.layers.%d.layer_norm2.weight", F(blip2_vision_layer, ln2_w), VEC(D_VC), NONE},
    {"vision_model.encoder.layers.%d.layer_norm2.bias", F(blip2_vision_layer, ln2_b), VEC(D_VC), NONE},
    {"vision_model.encoder.layers.%d.mlp.fc1.weight", F(blip2_vision_layer, fc1_w), MAT(D_VMLP, D_VC), NONE},
    {"vision_model.encoder.layers.%d.mlp.fc1.bias", F(blip2_vision_layer, fc1_b), VEC(D_VMLP), NONE},
    {"vision_model.encoder.layers.%d.mlp.fc2.weight", F(blip2_vision_layer, fc2_w), MAT(D_VC, D_VMLP), NONE},
    {"vision_model.encoder.layers.%d.mlp.fc2.bias", F(blip2_vision_layer, fc2_b), VEC(D_VC), NONE},
};

static const tmpl qformer_top[] = {
    {"query_tokens", F(blip2_qformer_weights, query_tokens), {D_1, D_Q, D_QC}, NONE},
    {"qformer.layernorm.weight", F(blip2_qformer_weights, ln_w), VEC(D_QC), NONE},
    {"qformer.layernorm.bias", F(blip2_qformer_weights, ln_b), VEC(D_QC), NONE},
    {"language_projection.weight", F(blip2_qformer_weights, proj_w), MAT(D_TC, D_QC), NONE},
    {"language_projection.bias", F(blip2_qformer_weights, proj_b), VEC(D_TC), NONE},
};

#define QL(field) F(blip2_qformer_layer, field)
static const tmpl qformer_layer[] = {
    {"qformer.encoder.layer.%d.attention.attention.query.weight", QL(self.q_w), MAT(D_QC, D_QC), NONE},
    {"qformer.encoder.layer.%d.attention.attention.query.bias", QL(self.q_b), VEC(D_QC), NONE},
    {"qformer.encoder.layer.%d.attention.attention.key.weight", QL(self.k_w), MAT(D_QC, D_QC), NONE},
    {"qformer.encoder.layer.%d.attention.attention.key.bias", QL(self.k_b), VEC(D_QC), NONE},
    {"qformer.encoder.layer.%d.attention.attention.value.weight", QL(self.v_w), MAT(D_QC, D_QC), NONE},
    {"qformer.encoder.layer.%d.attention.attention.value.bias", QL(self.v_b), VEC(D_QC), NONE},
    {"qformer.encoder.layer.%d.attention.output.dense.weight", QL(self.o_w), MAT(D_QC, D_QC), NONE},
    {"qformer.encoder.layer.%d.attention.output.dense.bias", QL(self.o_b), VEC(D_QC), NONE},
    {"qformer.encoder.layer.%d.attention.output.LayerNorm.weight", QL(self.ln_w), VEC(D_QC), NONE},
    {"qformer.encoder.layer.%d.attention.output.LayerNorm.bias", QL(self.ln_b), VEC(D_QC), NONE},
    {"qformer.encoder.layer.%d.intermediate_query.dense.weight", QL(fc1_w), MAT(D_QMLP, D_QC), NONE},
    {"qformer.encoder.layer.%d.intermediate_query.dense.bias", QL(fc1_b), VEC(D_QMLP), NONE},
    {"qformer.encoder.layer.%d.output_query.dense.weight", QL(fc2_w), MAT(D_QC, D_QMLP), NONE},
    {"qformer.encoder.layer.%d.output_query.dense.bias", QL(fc2_b), VEC(D_QC), NONE},
    {"qformer.encoder.layer.%d.output_query.LayerNorm.weight", QL(ln_w), VEC(D_QC), NONE},
    {"qformer.encoder.layer.%d.output_query.LayerNorm.bias", QL(ln_b), VEC(D_QC), NONE},
};

/* Only on layers with i % cross_attention_frequency == 0. */
static const tmpl qformer_cross[] = {
    {"qformer.encoder.layer.%d.crossattention.attention.query.weight", QL(cross.q_w), MAT(D_QC, D_QC), NONE},
    {"qformer.encoder.layer.%d.crossattention.attention.query.bias", QL(cross.q_b), VEC(D_QC), NONE},
    {"qformer.encoder.layer.%d.crossattention.attention.key.weight", QL(cross.k_w), MAT(D_QC, D_VC), NONE},
    {"qformer.encoder.layer.%d.crossattention.attention.key.bias", QL(cross.k_b), VEC(D_QC), NONE},
    {"qformer.encoder.layer.%d.crossattention.attention.value.weight", QL(cross.v_w), MAT(D_QC, D_VC), NONE},
    {"qformer.encoder.layer.%d.crossattention.attention.value.bias", QL(cross.v_b), VEC(D_QC), NONE},
    {"qformer.encoder.layer.%d.crossattention.output.dense.weight", QL(cross.o_w), MAT(D_QC, D_QC), NONE},
    {"qformer.encoder.layer.%d.crossattention.output.dense.bias", QL(cross.o_b), VEC(D_QC), NONE},
    {"qformer.encoder.layer.%d.crossattention.output.LayerNorm.weight", QL(cross.ln_w), VEC(D_QC), NONE},
    {"qformer.encoder.layer.%d.crossattention.output.LayerNorm.bias", QL(cross.ln_b), VEC(D_QC), NONE},
};

#define OD "language_model.model.decoder."
static const tmpl opt_top[] = {
    {OD "embed_tokens.weight", F(blip2_opt_weights, wte), MAT(D_TV, D_TC), ROWS}, /* vocab-parallel */
    {OD "embed_positions.weight", F(blip2_opt_weights, wpe), MAT(D_TPOS, D_TC), NONE},
    {OD "final_layer_norm.weight", F(blip2_opt_weights, ln_f_w), VEC(D_TC), NONE},
    {OD "final_layer_norm.bias", F(blip2_opt_weights, ln_f_b), VEC(D_TC), NONE},
};
static const tmpl opt_lm_head = {"language_model.lm_head.weight", F(blip2_opt_weights, lm_head), MAT(D_TV, D_TC), ROWS};

#define OL(field) F(blip2_opt_layer, field)
static const tmpl opt_layer[] = {
    {OD "layers.%d.self_attn_layer_norm.weight", OL(ln1_w), VEC(D_TC), NONE},
    {OD "layers.%d.self_attn_layer_norm.bias", OL(ln1_b), VEC(D_TC), NONE},
    {OD "layers.%d.self_attn.q_proj.weight", OL(q_w), MAT(D_TC, D_TC), ROWS},
    {OD "layers.%d.self_attn.q_proj.bias", OL(q_b), VEC(D_TC), ROWS},
    {OD "layers.%d.self_attn.k_proj.weight", OL(k_w), MAT(D_TC, D_TC), ROWS},
    {OD "layers.%d.self_attn.k_proj.bias", OL(k_b), VEC(D_TC), ROWS},
    {OD "layers.%d.self_attn.v_proj.weight", OL(v_w), MAT(D_TC, D_TC), ROWS},
    {OD "layers.%d.self_attn.v_proj.bias", OL(v_b), VEC(D_TC), ROWS},
    {OD "layers.%d.self_attn.out_proj.weight", OL(o_w), MAT(D_TC, D_TC), COLS},
    {OD "layers.%d.self_attn.out_proj.bias", OL(o_b), VEC(D_TC), NONE},
    {OD "layers.%d.final_layer_norm.weight", OL(ln2_w), VEC(D_TC), NONE},
    {OD "layers.%d.final_layer_norm.bias", OL(ln2_b), VEC(D_TC), NONE},
    {OD "layers.%d.fc1.weight", OL(fc1_w), MAT(D_TFFN, D_TC), ROWS},
    {OD "layers.%d.fc1.bias", OL(fc1_b), VEC(D_TFFN), ROWS},
    {OD "layers.%d.fc2.weight", OL(fc2_w), MAT(D_TC, D_TFFN), COLS},
    {OD "layers.%d.fc2.bias", OL(fc2_b), VEC(D_TC), NONE},
};

/* Each rank's q, k and v slices stacked into qkv_w / qkv_b: one matmul (one weight stream). */
static const fused_part opt_qkv[] = {
    {OL(q_w), OL(qkv_w), 0, 3}, {OL(k_w), OL(qkv_w), 1, 3}, {OL(v_w), OL(qkv_w), 2, 3},
    {OL(q_b), OL(qkv_b), 0, 3}, {OL(k_b), OL(qkv_b), 1, 3}, {OL(v_b), OL(qkv_b), 2, 3},
};

#define COUNT(a) ((int)(sizeof(a) / sizeof((a)[0])))
enum { OPTIONAL = 1, RANK0 = 2 }; /* add_group flags */

typedef struct {
    blip2_weight_entry *e;
    int n, cap;
} table_builder;

static void mark_fused(blip2_weight_entry *e, const tmpl *t, void *base, const fused_part *fp, int nfp) {
    for (int j = 0; j < nfp; j++)
        if (fp[j].field == t->offset) {
            e->group = (float **)((char *)base + fp[j].fused);
            e->part = fp[j].part;
            e->parts = fp[j].parts;
        }
}

static int add_group(table_builder *tb, const blip2_config *cfg, const tmpl *t, int nt, void *base, int layer, int flags,
                     const fused_part *fp, int nfp) {
    for (int i = 0; i < nt; i++) {
        if (tb->n == tb->cap) {
            int cap = tb->cap ? 2 * tb->cap : 256;
            blip2_weight_entry *ne = realloc(tb->e, sizeof *ne * (size_t)cap);
            if (!ne) return 0;
            tb->e = ne;
            tb->cap = cap;
        }
        blip2_weight_entry *e = &tb->e[tb->n++];
        memset(e, 0, sizeof *e);
        snprintf(e->name, sizeof e->name, t[i].name, layer);
        for (e->ndim = 0; e->ndim < 4 && t[i].dims[e->ndim]; e->ndim++) e->shape[e->ndim] = dim_value(cfg, t[i].dims[e->ndim]);
        e->field = (float **)((char *)base + t[i].offset);
        e->optional = (flags & OPTIONAL) != 0;
        e->rank0_only = (flags & RANK0) != 0;
        e->split = t[i].split;
        mark_fused(e, &t[i], base, fp, nfp);
    }
    return 1;
}

void *blip2_weight_storage(const blip2_weight_entry *e, size_t n, size_t es, void *(*alloc)(void *ctx, size_t bytes),
                           void *ctx) {
    if (!e->group) return alloc(ctx, n * es);
    if (e->part == 0) *e->group = alloc(ctx, (size_t)e->parts * n * es);
    return *e->group ? (char *)*e->group + (size_t)e->part * n * es : NULL;
}

blip2_code blip2_weight_table(blip2_model *m, blip2_weight_entry **entries, int *n, blip2_status *st) {
    const blip2_config *c = &m->cfg;
    if (!m->vision.layers) m->vision.layers = blip2_calloc((size_t)c->vision.layers, sizeof *m->vision.layers, st);
    if (!m->qformer.layers) m->qformer.layers = blip2_calloc((size_t)c->qformer.layers, sizeof *m->qformer.layers, st);
    if (!m->opt.layers) m->opt.layers = blip2_calloc((size_t)c->opt.layers, sizeof *m->opt.layers, st);
    if (!m->vision.layers || !m->qformer.layers || !m->opt.layers) return BLIP2_ENOMEM;
    table_builder tb = {0};
    /* vision, Q-Former and projection run on rank 0 alone */
    int ok = add_group(&tb, c, vision_top, COUNT(vision_top), &m->vision, 0, RANK0, NULL, 0);
    for (int l = 0; ok && l < c->vision.layers; l++)
        ok = add_group(&tb, c, vision_layer, COUNT(vision_layer), &m->vision.layers[l], l, RANK0, NULL, 0);
    ok = ok && add_group(&tb, c, qformer_top, COUNT(qformer_top), &m->qformer, 0, RANK0, NULL, 0);
    for (int l = 0; ok && l < c->qformer.layers; l++) {
        blip2_qformer_layer *L = &m->qformer.layers[l];
        L->has_cross = l % c->qformer.cross_freq == 0;
        ok = add_group(&tb, c, qformer_layer, COUNT(qformer_layer), L, l, RANK0, NULL, 0);
        if (ok && L->has_cross) ok = add_group(&tb, c, qformer_cross, COUNT(qformer_cross), L, l, RANK0, NULL, 0);
    }
    ok = ok && add_group(&tb, c, opt_top, COUNT(opt_top), &m->opt, 0, 0, NULL, 0);
    ok = ok && add_group(&tb, c, &opt_lm_head, 1, &m->opt, 0, OPTIONAL, NULL, 0);
    for (int l = 0; ok && l < c->opt.layers; l++) ok = add_group(&tb, c, opt_layer, COUNT(opt_layer), &m->opt.layers[l], l, 0, opt_qkv, COUNT(opt_qkv));
    if (!ok) {
        free(tb.e);
        return blip2_fail(st, BLIP2_ENOMEM, "out of memory building the weight table");
    }
    *entries = tb.e;
    *n = tb.n;
    return BLIP2_OK;
}

/* ---- checkpoint: one file or the shards named by the index ---- */

static int file_exists(const char *p) {
    struct stat sb;
    return stat(p, &sb) == 0;
}

/* Collects the distinct shard file names of index.json's weight_map. */
static blip2_code index_shards(const char *path, char ***names, int *n, blip2_status *st) {
    json_error_t err;
    json_t *root = json_load_file(path, 0, &err);
    json_t *wm = root ? json_object_get(root, "weight_map") : NULL;
    if (!json_is_object(wm)) {
        json_decref(root);
        return blip2_fail(st, BLIP2_EFORMAT, "%s: %s", path, root ? "no weight_map object" : err.text);
    }
    *names = calloc(json_object_size(wm) + 1, sizeof **names);
    *n = 0;
    const char *key;
    json_t *v;
    blip2_code rc = *names ? BLIP2_OK : blip2_fail(st, BLIP2_ENOMEM, "out of memory");
    json_object_foreach(wm, key, v) {
        if (rc) break;
        const char *f = json_string_value(v);
        if (!f || strchr(f, '/') || strcmp(f, "..") == 0) {
            rc = blip2_fail(st, BLIP2_EFORMAT, "%s: weight_map['%s'] is not a file name in the model directory", path, key);
            break;
        }
        int seen = 0;
        for (int i = 0; i < *n && !seen; i++) seen = strcmp((*names)[i], f) == 0;
        if (!seen) (*names)[(*n)++] = strdup(f);
    }
    json_decref(root);
    return rc;
}

blip2_code blip2_checkpoint_open(const char *dir, blip2_checkpoint *ck, blip2_status *st) {
    memset(ck, 0, sizeof *ck);
    char path[4096];
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    char **names = NULL;
    int n = 0;
    blip2_code rc = BLIP2_OK;
    if (file_exists(path)) {
        rc = index_shards(path, &names, &n, st);
    } else {
        names = calloc(1, sizeof *names);
        if (names) names[n++] = strdup("model.safetensors");
    }
    if (!rc && (!names || n == 0)) rc = blip2_fail(st, BLIP2_EFORMAT, "%s: no weight files listed", path);
    if (!rc) ck->files = calloc((size_t)n, sizeof *ck->files);
    if (!rc && !ck->files) rc = blip2_fail(st, BLIP2_ENOMEM, "out of memory");
    for (int i = 0; !rc && i < n; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        rc = blip2_st_open(path, &ck->files[i], st);
        if (!rc) ck->nfiles++;
    }
    for (int i = 0; names && i < n; i++) free(names[i]);
    free(names);
    if (rc) blip2_checkpoint_close(ck);
    return rc;
}

const blip2_st_tensor *blip2_checkpoint_find(const blip2_checkpoint *ck, const char *name) {
    for (int i = 0; i < ck->nfiles; i++) {
        const blip2_st_tensor *t = blip2_st_find(&ck->files[i], name);
        if (t) return t;
    }
    return NULL;
}

void blip2_checkpoint_close(blip2_checkpoint *ck) {
    for (int i = 0; i < ck->nfiles; i++) blip2_st_close(&ck->files[i]);
    free(ck->files);
    memset(ck, 0, sizeof *ck);
}

/* ---- weights ---- */

static void shape_str(char *buf, size_t n, int ndim, const int64_t *shape) {
    size_t k = (size_t)snprintf(buf, n, "[");
    for (int i = 0; i < ndim && k < n; i++) k += (size_t)snprintf(buf + k, n - k, "%s%lld", i ? ", " : "", (long long)shape[i]);
    if (k < n) snprintf(buf + k, n - k, "]");
}

static blip2_code check_shape(const blip2_weight_entry *e, const blip2_st_tensor *t, blip2_status *st) {
    int same = e->ndim == t->ndim;
    for (int i = 0; same && i < e->ndim; i++) same = e->shape[i] == t->shape[i];
    if (same) return BLIP2_OK;
    char want[128], got[128];
    shape_str(want, sizeof want, e->ndim, e->shape);
    shape_str(got, sizeof got, t->ndim, t->shape);
    return blip2_fail(st, BLIP2_EFORMAT, "%s: tensor '%s': expected shape %s, found %s", t->file, e->name, want, got);
}

/* Host fp32 storage the model owns (freed with it); ctx is the model. */
static void *own_alloc(void *ctx, size_t bytes) {
    blip2_model *m = ctx;
    void *buf = malloc(bytes ? bytes : 1);
    if (buf) m->owned[m->n_owned++] = buf;
    return buf;
}

static float *own_buffer(blip2_model *m, const blip2_weight_entry *e, size_t n, blip2_status *st) {
    float *buf = blip2_weight_storage(e, n, sizeof(float), own_alloc, m);
    if (!buf) blip2_fail(st, BLIP2_ENOMEM, "out of memory for %s (%zu floats)", e->name, n);
    return buf;
}

/* This rank's rows [r0, r0 + nr) of a [rows, cols] tensor (a vector is [rows, 1]): contiguous,
 * so F32 tensors aligned for float access are used in place (zero copy) unless they are part of a
 * fused tensor; others are converted. */
static blip2_code bind_rows(blip2_model *m, const blip2_weight_entry *e, const blip2_st_tensor *t, size_t r0, size_t nr,
                            size_t cols, blip2_status *st) {
    const float *p = (const float *)t->data + r0 * cols;
    if (t->dtype == BLIP2_DT_F32 && ((uintptr_t)p % sizeof(float)) == 0 && !e->group) {
        *e->field = (float *)p;
        return BLIP2_OK;
    }
    float *buf = own_buffer(m, e, nr * cols, st);
    if (!buf) return BLIP2_ENOMEM;
    *e->field = buf;
    blip2_code rc = blip2_st_read_f32(t, r0 * cols, nr * cols, buf, st);
    size_t es = blip2_dtype_size(t->dtype);
    blip2_st_drop_pages((const char *)t->data + r0 * cols * es, nr * cols * es); /* the fp32 copy replaces them */
    return rc;
}

/* This rank's columns [c0, c0 + nc) of every row: gathered into a buffer. */
static blip2_code bind_cols(blip2_model *m, const blip2_weight_entry *e, const blip2_st_tensor *t, size_t c0, size_t nc,
                            blip2_status *st) {
    size_t rows = (size_t)t->shape[0], cols = (size_t)t->shape[1];
    float *buf = own_buffer(m, e, rows * nc, st);
    if (!buf) return BLIP2_ENOMEM;
    *e->field = buf;
    for (size_t r = 0; r < rows; r++) {
        blip2_code rc = blip2_st_read_f32(t, r * cols + c0, nc, buf + r * nc, st);
        if (rc) return rc;
    }
    blip2_st_drop_pages(t->data, t->nbytes); /* other ranks' columns are not needed here either */
    return BLIP2_OK;
}

static blip2_code bind_tensor(blip2_model *m, const blip2_weight_entry *e, const blip2_st_tensor *t, blip2_status *st) {
    if (t->dtype != BLIP2_DT_F32 && t->dtype != BLIP2_DT_F16 && t->dtype != BLIP2_DT_BF16)
        return blip2_fail(st, BLIP2_EFORMAT, "%s: tensor '%s': dtype %s is not a weight dtype (F32, F16, BF16)", t->file,
                          e->name, blip2_dtype_name(t->dtype));
    size_t numel = (size_t)blip2_st_numel(t), rows = (size_t)t->shape[0], cols = numel / (rows ? rows : 1);
    int r = m->shard.rank, w = m->shard.world;
    blip2_code rc;
    if (e->split == BLIP2_SPLIT_COLS) {
        rc = bind_cols(m, e, t, blip2_part_begin(cols, r, w), blip2_part_size(cols, r, w), st);
        cols = blip2_part_size(cols, r, w);
    } else if (e->split == BLIP2_SPLIT_ROWS) {
        rc = bind_rows(m, e, t, blip2_part_begin(rows, r, w), blip2_part_size(rows, r, w), cols, st);
        rows = blip2_part_size(rows, r, w);
    } else {
        rc = bind_rows(m, e, t, 0, rows, cols, st);
    }
    if (!e->rank0_only) m->opt_bytes += rows * cols * sizeof(float);
    return rc;
}

/* Every tensor in the checkpoint must be claimed by the table. */
static blip2_code check_unexpected(const blip2_model *m, const blip2_weight_entry *e, int n, blip2_status *st) {
    for (int f = 0; f < m->ckpt.nfiles; f++) {
        const blip2_st_file *file = &m->ckpt.files[f];
        for (int i = 0; i < file->n; i++) {
            int known = 0;
            for (int j = 0; j < n && !known; j++) known = strcmp(e[j].name, file->tensors[i].name) == 0;
            if (!known)
                return blip2_fail(st, BLIP2_EFORMAT, "%s: unexpected tensor '%s' (not part of BLIP-2 OPT with this config)",
                                  file->path, file->tensors[i].name);
        }
    }
    return BLIP2_OK;
}

static blip2_code bind_all(blip2_model *m, const char *dir, blip2_weight_entry *e, int n, blip2_status *st) {
    m->owned = blip2_calloc((size_t)n, sizeof *m->owned, st);
    if (!m->owned) return BLIP2_ENOMEM;
    for (int i = 0; i < n; i++) {
        const blip2_st_tensor *t = blip2_checkpoint_find(&m->ckpt, e[i].name);
        if (!t) {
            if (e[i].optional) continue;
            char want[128];
            shape_str(want, sizeof want, e[i].ndim, e[i].shape);
            return blip2_fail(st, BLIP2_EFORMAT, "%s: tensor '%s' %s is missing from the checkpoint", dir, e[i].name, want);
        }
        blip2_code rc = check_shape(&e[i], t, st);
        if (!rc && !(e[i].rank0_only && m->shard.rank != 0)) rc = bind_tensor(m, &e[i], t, st);
        if (rc) return rc;
        if (i == 0) m->dtype = t->dtype;
    }
    if (!m->opt.lm_head) m->opt.lm_head = m->opt.wte; /* tie_word_embeddings */
    return check_unexpected(m, e, n, st);
}

/* Local sizes, computed once: heads split evenly (a clear error otherwise), ffn and vocab split
 * into near-equal parts. */
static blip2_code plan_shard(blip2_model *m, int rank, int world, blip2_status *st) {
    const blip2_opt_config *o = &m->cfg.opt;
    if (world < 1 || rank < 0 || rank >= world) return blip2_fail(st, BLIP2_EINTERNAL, "bad rank %d of %d", rank, world);
    if (o->NH % world != 0)
        return blip2_fail(st, BLIP2_EINVAL,
                          "tensor-parallel degree %d does not divide the OPT head count %d: run with a divisor of %d ranks",
                          world, o->NH, o->NH);
    blip2_opt_shard *s = &m->shard;
    s->rank = rank;
    s->world = world;
    s->NH = o->NH / world;
    s->C = s->NH * o->HS;
    s->ffn = (int)blip2_part_size((size_t)o->ffn, rank, world);
    s->V = (int)blip2_part_size((size_t)o->V, rank, world);
    s->v0 = (int)blip2_part_begin((size_t)o->V, rank, world);
    return BLIP2_OK;
}

blip2_code blip2_model_load(const char *dir, blip2_model *m, blip2_status *st) {
    return blip2_model_load_shard(dir, 0, 1, m, st);
}

blip2_code blip2_model_load_shard(const char *dir, int rank, int world, blip2_model *m, blip2_status *st) {
    memset(m, 0, sizeof *m);
    m->ops = &blip2_cpu_ops;
    m->wdtype = BLIP2_W_F32;
    blip2_code rc = blip2_config_load(dir, &m->cfg, st);
    if (!rc) rc = plan_shard(m, rank, world, st);
    if (!rc) rc = blip2_checkpoint_open(dir, &m->ckpt, st);
    blip2_weight_entry *e = NULL;
    int n = 0;
    if (!rc) rc = blip2_weight_table(m, &e, &n, st);
    if (!rc) rc = bind_all(m, dir, e, n, st);
    free(e);
    if (rc) blip2_model_free(m);
    return rc;
}

/* ---- random weights (benchmarks without a checkpoint) ---- */

static void fill_normal(float *x, size_t n, float std, blip2_rng *rng) {
    for (size_t i = 0; i < n; i += 2) { /* Box-Muller */
        double u = 1.0 - blip2_rng_uniform(rng); /* (0, 1]: log stays finite */
        double r = sqrt(-2.0 * log(u)), th = 6.283185307179586 * blip2_rng_uniform(rng);
        x[i] = (float)(r * cos(th)) * std;
        if (i + 1 < n) x[i + 1] = (float)(r * sin(th)) * std;
    }
}

void blip2_weight_random_rule(const char *name, float *mean, float *std) {
    size_t len = strlen(name);
    int is_ln_w = (strstr(name, "norm") && len > 7 && strcmp(name + len - 7, ".weight") == 0) || strstr(name, "LayerNorm.weight");
    int is_bias = len > 5 && strcmp(name + len - 5, ".bias") == 0;
    *mean = is_ln_w ? 1.0f : 0.0f;
    *std = is_ln_w || is_bias ? 0.0f : 0.02f;
}

void blip2_weight_fill_random(const char *name, float *x, size_t n, blip2_rng *rng) {
    float mean, std;
    blip2_weight_random_rule(name, &mean, &std);
    if (std == 0.0f)
        for (size_t i = 0; i < n; i++) x[i] = mean;
    else
        fill_normal(x, n, std, rng);
}

/* This rank's shape of an entry: rows or columns split as the loader would slice them. */
size_t blip2_weight_local_numel(const blip2_model *m, const blip2_weight_entry *e) {
    size_t rows = (size_t)e->shape[0], cols = 1;
    for (int d = 1; d < e->ndim; d++) cols *= (size_t)e->shape[d];
    if (e->split == BLIP2_SPLIT_ROWS) rows = blip2_part_size(rows, m->shard.rank, m->shard.world);
    if (e->split == BLIP2_SPLIT_COLS) cols = blip2_part_size(cols, m->shard.rank, m->shard.world);
    return rows * cols;
}

blip2_code blip2_model_plan(const blip2_config *cfg, int rank, int world, blip2_model *m, blip2_status *st) {
    memset(m, 0, sizeof *m);
    m->cfg = *cfg;
    m->dtype = BLIP2_DT_F32;
    m->ops = &blip2_cpu_ops;
    m->wdtype = BLIP2_W_F32;
    return plan_shard(m, rank, world, st);
}

blip2_code blip2_model_init_random(const blip2_config *cfg, int rank, int world, uint64_t seed, blip2_model *m,
                                   blip2_status *st) {
    blip2_weight_entry *e = NULL;
    int n = 0;
    blip2_code rc = blip2_model_plan(cfg, rank, world, m, st);
    if (!rc) rc = blip2_weight_table(m, &e, &n, st);
    if (!rc && !(m->owned = blip2_calloc((size_t)n, sizeof *m->owned, st))) rc = BLIP2_ENOMEM;
    blip2_rng rng;
    blip2_rng_seed(&rng, seed ^ ((uint64_t)rank << 32));
    for (int i = 0; !rc && i < n; i++) {
        if (e[i].optional || (e[i].rank0_only && rank != 0)) continue;
        size_t k = blip2_weight_local_numel(m, &e[i]);
        float *buf = own_buffer(m, &e[i], k, st);
        if (!buf) rc = BLIP2_ENOMEM;
        else blip2_weight_fill_random(e[i].name, buf, k, &rng), *e[i].field = buf;
        if (!e[i].rank0_only) m->opt_bytes += k * sizeof(float);
    }
    if (!rc) m->opt.lm_head = m->opt.wte;
    free(e);
    if (rc) blip2_model_free(m);
    return rc;
}

void blip2_model_free(blip2_model *m) {
    for (int i = 0; i < m->n_dev_owned; i++) m->ops->release(m->dev_owned[i]);
    free(m->dev_owned);
    for (int i = 0; i < m->n_owned; i++) free(m->owned[i]);
    free(m->owned);
    free(m->vision.layers);
    free(m->qformer.layers);
    free(m->opt.layers);
    blip2_checkpoint_close(&m->ckpt);
    memset(m, 0, sizeof *m);
}
