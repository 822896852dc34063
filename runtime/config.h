/* Model configuration: config.json + generation_config.json + processor_config.json of a hub
 * snapshot, with transformers' class defaults applied for every absent key (spec §1). */
#ifndef BLIP2_CONFIG_H
#define BLIP2_CONFIG_H

#include <stddef.h>

#include "status.h"

typedef struct {
    int C;          /* hidden_size */
    int mlp;        /* intermediate_size */
    int layers;     /* num_hidden_layers */
    int NH, HS;     /* heads, head size = C / NH */
    int channels;   /* num_channels (3) */
    int image_size; /* 224 */
    int patch_size; /* 14 */
    int P;          /* patches = (image_size / patch_size)^2 */
    int T;          /* tokens = P + 1 (class token) */
    float eps;      /* layer_norm_eps */
} blip2_vision_config;

typedef struct {
    int C, mlp, layers, NH, HS;
    int cross_freq; /* cross_attention_frequency: layer i has cross-attention iff i % cross_freq == 0 */
    int enc_C;      /* encoder_hidden_size, forced to the vision hidden size */
    float eps;
} blip2_qformer_config;

typedef struct {
    int C, ffn, layers, NH, HS;
    int V;       /* vocab_size (model rows; the tokenizer has fewer) */
    int max_pos; /* max_position_embeddings; the table has max_pos + 2 rows */
    float eps;   /* 1e-5: nn.LayerNorm default, OPT never overrides it */
} blip2_opt_config;

typedef struct {
    blip2_vision_config vision;
    blip2_qformer_config qformer;
    blip2_opt_config opt;
    int Q;              /* num_query_tokens */
    int image_token_id; /* 50265 */
    int bos_id, eos_id, pad_id;
    int max_new_tokens;  /* generation default: generation_config max_new_tokens, else 20 */
    int max_length;      /* generation_config max_length when set (0: unset) */
} blip2_config;

/* Floats of one image's pixel values [channels, image_size, image_size]. */
static inline size_t blip2_image_floats(const blip2_vision_config *v) {
    return (size_t)v->channels * v->image_size * v->image_size;
}

/* Loads DIR/config.json (required), DIR/generation_config.json and DIR/processor_config.json
 * (optional). Errors name the file and the key. */
blip2_code blip2_config_load(const char *dir, blip2_config *cfg, blip2_status *st);
/* Parses config.json text only (no generation/processor files); used by the loader tests and fuzzing. */
blip2_code blip2_config_parse(const char *text, size_t len, const char *fname, blip2_config *cfg, blip2_status *st);

#endif
