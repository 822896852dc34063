#include "config.h"

#include <jansson.h>
#include <stdio.h>
#include <string.h>

/* Upper bound for any single dimension: keeps a hostile config from asking for absurd buffers. */
#define MAX_DIM (1 << 20)

typedef struct {
    const char *fname;
    const char *section; /* "vision_config", ... for messages */
    blip2_status *st;
    blip2_code rc;
} cfg_ctx;

static int get_int(cfg_ctx *c, json_t *obj, const char *key, int def, int lo, int hi) {
    json_t *v = obj ? json_object_get(obj, key) : NULL;
    if (!v || json_is_null(v)) return def;
    if (!json_is_integer(v) || json_integer_value(v) < lo || json_integer_value(v) > hi) {
        if (!c->rc)
            c->rc = blip2_fail(c->st, BLIP2_EFORMAT, "%s: %s%s%s must be an integer in [%d, %d]", c->fname,
                               c->section, *c->section ? "." : "", key, lo, hi);
        return def;
    }
    return (int)json_integer_value(v);
}

static float get_float(cfg_ctx *c, json_t *obj, const char *key, double def) {
    json_t *v = obj ? json_object_get(obj, key) : NULL;
    if (!v || json_is_null(v)) return (float)def;
    if (!json_is_number(v) || json_number_value(v) <= 0 || json_number_value(v) > 1) {
        if (!c->rc)
            c->rc = blip2_fail(c->st, BLIP2_EFORMAT, "%s: %s.%s must be a number in (0, 1]", c->fname, c->section, key);
        return (float)def;
    }
    return (float)json_number_value(v);
}

static const char *get_str(cfg_ctx *c, json_t *obj, const char *key, const char *def) {
    json_t *v = obj ? json_object_get(obj, key) : NULL;
    if (!v || json_is_null(v)) return def;
    if (!json_is_string(v)) {
        if (!c->rc)
            c->rc = blip2_fail(c->st, BLIP2_EFORMAT, "%s: %s.%s must be a string", c->fname, c->section, key);
        return def;
    }
    return json_string_value(v);
}

static int get_bool(cfg_ctx *c, json_t *obj, const char *key, int def) {
    json_t *v = obj ? json_object_get(obj, key) : NULL;
    if (!v || json_is_null(v)) return def;
    if (!json_is_boolean(v)) {
        if (!c->rc)
            c->rc = blip2_fail(c->st, BLIP2_EFORMAT, "%s: %s.%s must be true or false", c->fname, c->section, key);
        return def;
    }
    return json_is_true(v);
}

static json_t *get_section(cfg_ctx *c, json_t *root, const char *key) {
    json_t *v = json_object_get(root, key);
    if (v && !json_is_object(v) && !json_is_null(v) && !c->rc)
        c->rc = blip2_fail(c->st, BLIP2_EFORMAT, "%s: %s must be an object", c->fname, key);
    return json_is_object(v) ? v : NULL;
}

static void check_heads(cfg_ctx *c, const char *what, int C, int NH, int *HS) {
    if (!c->rc && C % NH != 0)
        c->rc = blip2_fail(c->st, BLIP2_EFORMAT, "%s: %s.hidden_size %d is not divisible by num_attention_heads %d",
                           c->fname, what, C, NH);
    *HS = C / NH;
}

/* Blip2VisionConfig defaults: EVA ViT-g/14. */
static void parse_vision(cfg_ctx *c, json_t *j, blip2_vision_config *v) {
    c->section = "vision_config";
    v->C = get_int(c, j, "hidden_size", 1408, 1, MAX_DIM);
    v->mlp = get_int(c, j, "intermediate_size", 6144, 1, MAX_DIM);
    v->layers = get_int(c, j, "num_hidden_layers", 39, 1, 1024);
    v->NH = get_int(c, j, "num_attention_heads", 16, 1, 1024);
    v->channels = get_int(c, j, "num_channels", 3, 3, 3);
    v->image_size = get_int(c, j, "image_size", 224, 1, 4096);
    v->patch_size = get_int(c, j, "patch_size", 14, 1, 4096);
    v->eps = get_float(c, j, "layer_norm_eps", 1e-6);
    const char *act = get_str(c, j, "hidden_act", "gelu");
    if (!c->rc && strcmp(act, "gelu") != 0)
        c->rc = blip2_fail(c->st, BLIP2_EFORMAT, "%s: vision_config.hidden_act '%s' is not supported (only 'gelu')", c->fname, act);
    if (!c->rc && !get_bool(c, j, "qkv_bias", 1))
        c->rc = blip2_fail(c->st, BLIP2_EFORMAT, "%s: vision_config.qkv_bias false is not supported", c->fname);
    if (!c->rc && v->image_size % v->patch_size != 0)
        c->rc = blip2_fail(c->st, BLIP2_EFORMAT, "%s: vision_config.image_size %d is not a multiple of patch_size %d",
                           c->fname, v->image_size, v->patch_size);
    int side = v->image_size / v->patch_size;
    v->P = side * side;
    v->T = v->P + 1;
    check_heads(c, "vision_config", v->C, v->NH, &v->HS);
}

/* Blip2QFormerConfig defaults: BERT-base-like; encoder_hidden_size is overwritten by the vision width. */
static void parse_qformer(cfg_ctx *c, json_t *j, int vision_C, blip2_qformer_config *q) {
    c->section = "qformer_config";
    q->C = get_int(c, j, "hidden_size", 768, 1, MAX_DIM);
    q->mlp = get_int(c, j, "intermediate_size", 3072, 1, MAX_DIM);
    q->layers = get_int(c, j, "num_hidden_layers", 12, 1, 1024);
    q->NH = get_int(c, j, "num_attention_heads", 12, 1, 1024);
    q->cross_freq = get_int(c, j, "cross_attention_frequency", 2, 1, 1024);
    q->eps = get_float(c, j, "layer_norm_eps", 1e-12);
    q->enc_C = vision_C;
    const char *act = get_str(c, j, "hidden_act", "gelu");
    if (!c->rc && strcmp(act, "gelu") != 0)
        c->rc = blip2_fail(c->st, BLIP2_EFORMAT, "%s: qformer_config.hidden_act '%s' is not supported (only 'gelu')", c->fname, act);
    if (!c->rc && get_bool(c, j, "use_qformer_text_input", 0))
        c->rc = blip2_fail(c->st, BLIP2_EFORMAT, "%s: qformer_config.use_qformer_text_input true is not supported", c->fname);
    check_heads(c, "qformer_config", q->C, q->NH, &q->HS);
}

/* OPTConfig defaults (opt-350m-like class defaults); BLIP-2 OPT checkpoints never use project_in/out. */
static void parse_opt(cfg_ctx *c, json_t *j, blip2_opt_config *o, int *bos, int *eos, int *pad) {
    c->section = "text_config";
    const char *mt = get_str(c, j, "model_type", "opt");
    if (!c->rc && strcmp(mt, "opt") != 0)
        c->rc = blip2_fail(c->st, BLIP2_EFORMAT, "%s: text_config.model_type '%s' is not supported (only 'opt')", c->fname, mt);
    o->C = get_int(c, j, "hidden_size", 768, 1, MAX_DIM);
    o->ffn = get_int(c, j, "ffn_dim", 3072, 1, MAX_DIM);
    o->layers = get_int(c, j, "num_hidden_layers", 12, 1, 1024);
    o->NH = get_int(c, j, "num_attention_heads", 12, 1, 1024);
    o->V = get_int(c, j, "vocab_size", 50272, 1, 1 << 24);
    o->max_pos = get_int(c, j, "max_position_embeddings", 2048, 1, 1 << 20);
    o->eps = 1e-5f;
    *bos = get_int(c, j, "bos_token_id", 2, 0, o->V - 1);
    *eos = get_int(c, j, "eos_token_id", 2, 0, o->V - 1);
    *pad = get_int(c, j, "pad_token_id", 1, 0, o->V - 1);
    int proj = get_int(c, j, "word_embed_proj_dim", o->C, 1, MAX_DIM);
    const char *act = get_str(c, j, "activation_function", "relu");
    if (c->rc) return;
    if (proj != o->C)
        c->rc = blip2_fail(c->st, BLIP2_EFORMAT, "%s: text_config.word_embed_proj_dim %d != hidden_size %d (project_in/out) is not supported",
                           c->fname, proj, o->C);
    else if (strcmp(act, "relu") != 0)
        c->rc = blip2_fail(c->st, BLIP2_EFORMAT, "%s: text_config.activation_function '%s' is not supported (only 'relu')", c->fname, act);
    else if (!get_bool(c, j, "do_layer_norm_before", 1) || get_bool(c, j, "_remove_final_layer_norm", 0) ||
             !get_bool(c, j, "enable_bias", 1) || !get_bool(c, j, "layer_norm_elementwise_affine", 1))
        c->rc = blip2_fail(c->st, BLIP2_EFORMAT, "%s: text_config: only pre-LN OPT with biases and affine layer norms is supported", c->fname);
    if (!c->rc) check_heads(c, "text_config", o->C, o->NH, &o->HS);
}

static blip2_code parse_root(cfg_ctx *c, json_t *root, blip2_config *cfg) {
    c->section = "";
    cfg->Q = get_int(c, root, "num_query_tokens", 32, 1, 4096);
    json_t *iti = json_object_get(root, "image_token_index");
    cfg->image_token_id = (iti && !json_is_null(iti)) ? get_int(c, root, "image_token_index", 50265, 0, 1 << 24) : 50265;
    parse_vision(c, get_section(c, root, "vision_config"), &cfg->vision);
    parse_qformer(c, get_section(c, root, "qformer_config"), cfg->vision.C, &cfg->qformer);
    parse_opt(c, get_section(c, root, "text_config"), &cfg->opt, &cfg->bos_id, &cfg->eos_id, &cfg->pad_id);
    cfg->max_new_tokens = 20; /* transformers' default when max_length is not configured */
    cfg->max_length = 0;
    return c->rc;
}

blip2_code blip2_config_parse(const char *text, size_t len, const char *fname, blip2_config *cfg, blip2_status *st) {
    memset(cfg, 0, sizeof *cfg);
    json_error_t err;
    json_t *root = json_loadb(text, len, 0, &err);
    if (!root) return blip2_fail(st, BLIP2_EFORMAT, "%s: malformed JSON at line %d: %s", fname, err.line, err.text);
    if (!json_is_object(root)) {
        json_decref(root);
        return blip2_fail(st, BLIP2_EFORMAT, "%s: top level is not a JSON object", fname);
    }
    cfg_ctx c = {.fname = fname, .section = "", .st = st, .rc = BLIP2_OK};
    blip2_code rc = parse_root(&c, root, cfg);
    json_decref(root);
    return rc;
}

static json_t *load_json_file(const char *dir, const char *name, int required, char *path, size_t pathsz,
                              blip2_code *rc, blip2_status *st) {
    snprintf(path, pathsz, "%s/%s", dir, name);
    FILE *fp = fopen(path, "rb");
    if (!fp) {
        if (required) *rc = blip2_fail(st, BLIP2_EIO, "%s: missing (is '%s' a model directory?)", path, dir);
        return NULL;
    }
    json_error_t err;
    json_t *root = json_loadf(fp, 0, &err);
    fclose(fp);
    if (!root || !json_is_object(root)) {
        *rc = blip2_fail(st, BLIP2_EFORMAT, "%s: malformed JSON at line %d: %s", path, err.line,
                         root ? "top level is not an object" : err.text);
        json_decref(root);
        return NULL;
    }
    return root;
}

/* generation_config.json: bos/eos/pad and length limits override the model config's. */
static blip2_code apply_generation(const char *dir, blip2_config *cfg, blip2_status *st) {
    char path[4096];
    blip2_code rc = BLIP2_OK;
    json_t *g = load_json_file(dir, "generation_config.json", 0, path, sizeof path, &rc, st);
    if (!g) return rc;
    cfg_ctx c = {.fname = path, .section = "", .st = st, .rc = BLIP2_OK};
    cfg->bos_id = get_int(&c, g, "bos_token_id", cfg->bos_id, 0, cfg->opt.V - 1);
    cfg->eos_id = get_int(&c, g, "eos_token_id", cfg->eos_id, 0, cfg->opt.V - 1);
    cfg->pad_id = get_int(&c, g, "pad_token_id", cfg->pad_id, 0, cfg->opt.V - 1);
    cfg->max_new_tokens = get_int(&c, g, "max_new_tokens", cfg->max_new_tokens, 1, 1 << 20);
    cfg->max_length = get_int(&c, g, "max_length", 0, 0, 1 << 20);
    json_decref(g);
    return c.rc;
}

/* processor_config.json: num_query_tokens must agree with the model's. */
static blip2_code apply_processor(const char *dir, blip2_config *cfg, blip2_status *st) {
    char path[4096];
    blip2_code rc = BLIP2_OK;
    json_t *p = load_json_file(dir, "processor_config.json", 0, path, sizeof path, &rc, st);
    if (!p) return rc;
    cfg_ctx c = {.fname = path, .section = "", .st = st, .rc = BLIP2_OK};
    int q = get_int(&c, p, "num_query_tokens", cfg->Q, 1, 4096);
    json_decref(p);
    if (!c.rc && q != cfg->Q)
        c.rc = blip2_fail(st, BLIP2_EFORMAT, "%s: num_query_tokens %d disagrees with config.json's %d", path, q, cfg->Q);
    return c.rc;
}

blip2_code blip2_config_load(const char *dir, blip2_config *cfg, blip2_status *st) {
    char path[4096];
    blip2_code rc = BLIP2_OK;
    memset(cfg, 0, sizeof *cfg);
    json_t *root = load_json_file(dir, "config.json", 1, path, sizeof path, &rc, st);
    if (!root) return rc;
    cfg_ctx c = {.fname = path, .section = "", .st = st, .rc = BLIP2_OK};
    rc = parse_root(&c, root, cfg);
    json_decref(root);
    if (!rc) rc = apply_generation(dir, cfg, st);
    if (!rc) rc = apply_processor(dir, cfg, st);
    return rc;
}
