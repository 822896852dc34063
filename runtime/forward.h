/* The fp32 CPU forward of BLIP-2 OPT: vision encoder → Q-Former → projection → OPT decoder with
 * a KV cache, and greedy generation on top. Every function returns a status; none aborts. */
#ifndef BLIP2_FORWARD_H
#define BLIP2_FORWARD_H

#include <stdint.h>

#include "model.h"

/* pixels [B, 3, H, W] → image embeddings after post_layernorm [B, T, Cv]. */
blip2_code blip2_vision_forward(const blip2_model *m, const float *pixels, int B, float *out, blip2_status *st);

/* image embeddings [B, T, Cv] → query outputs [B, Q, Cq]. */
blip2_code blip2_qformer_forward(const blip2_model *m, const float *image, int B, float *out, blip2_status *st);

/* query outputs [B, Q, Cq] → language_projection [B, Q, Ct]. */
blip2_code blip2_project(const blip2_model *m, const float *query_out, int B, float *out, blip2_status *st);

/* Contiguous KV cache for one sequence: k and v [layers, max_T, Ct]; T positions filled. */
typedef struct {
    int layers, C, max_T, T;
    float *k, *v;
} blip2_kv_cache;

blip2_code blip2_kv_cache_init(blip2_kv_cache *kv, const blip2_config *cfg, int max_T, blip2_status *st);
void blip2_kv_cache_free(blip2_kv_cache *kv);

/* Input embeddings for the model's ids: rows whose id is the image token take the projected
 * query embeddings in order (there must be exactly Q of them), the rest embed_tokens.
 * ids [n], projected [Q, Ct] → out [n, Ct]. */
blip2_code blip2_opt_embed_inputs(const blip2_model *m, const int32_t *ids, int n, const float *projected, float *out,
                                  blip2_status *st);

/* Runs T new positions (embeddings [T, Ct], positions kv->T ..) through the decoder, appending
 * to the cache; logits [V] of the last new position. */
blip2_code blip2_opt_forward(const blip2_model *m, blip2_kv_cache *kv, const float *emb, int T, float *logits,
                             blip2_status *st);

typedef enum { BLIP2_FINISH_EOS, BLIP2_FINISH_LENGTH } blip2_finish;
const char *blip2_finish_name(blip2_finish f);

/* Intermediate tensors a caller may ask for (any pointer NULL = not wanted). */
typedef struct {
    float *vision_out;     /* [T, Cv] */
    float *qformer_out;    /* [Q, Cq] */
    float *projected;      /* [Q, Ct] */
    float *prefill_logits; /* [V] at the last prompt position */
} blip2_trace;

/* Greedy decoding for one image: pixels [3, H, W], ids [n] (image tokens included); writes up
 * to max_new ids to out_ids, stopping after eos (kept) or at max_new / the position limit. */
blip2_code blip2_generate_greedy(const blip2_model *m, const float *pixels, const int32_t *ids, int n, int max_new,
                                 int32_t *out_ids, int *n_out, blip2_finish *finish, blip2_trace *trace,
                                 blip2_status *st);

#endif
