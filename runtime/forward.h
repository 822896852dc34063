/* The fp32 CPU forward of BLIP-2 OPT: vision encoder → Q-Former → projection → OPT decoder with
 * a KV cache, and greedy generation on top. Every function returns a status; none aborts. */
#ifndef BLIP2_FORWARD_H
#define BLIP2_FORWARD_H

#include <stdint.h>

#include "../parallel/comm.h"
#include "model.h"

/* pixels [B, 3, H, W] → image embeddings after post_layernorm [B, T, Cv]. */
blip2_code blip2_vision_forward(const blip2_model *m, const float *pixels, int B, float *out, blip2_status *st);

/* image embeddings [B, T, Cv] → query outputs [B, Q, Cq]. */
blip2_code blip2_qformer_forward(const blip2_model *m, const float *image, int B, float *out, blip2_status *st);

/* query outputs [B, Q, Cq] → language_projection [B, Q, Ct]. */
blip2_code blip2_project(const blip2_model *m, const float *query_out, int B, float *out, blip2_status *st);

/* Contiguous KV cache for one sequence: k and v [layers, max_T, Cl] (this rank's heads);
 * T positions filled. */
typedef struct {
    int layers, C, max_T, T;
    float *k, *v;
} blip2_kv_cache;

blip2_code blip2_kv_cache_init(blip2_kv_cache *kv, const blip2_model *m, int max_T, blip2_status *st);
void blip2_kv_cache_free(blip2_kv_cache *kv);

/* Every id inside the vocabulary and exactly Q image tokens, else a clear EINVAL. */
blip2_code blip2_opt_check_ids(const blip2_config *c, const int32_t *ids, int n, blip2_status *st);

/* Embeddings of ids [n] → out [n, Ct] on every rank; with projected [Q, Ct] non-NULL, the image
 * token's rows take the projected queries in order (generated ids never do). Collective. */
blip2_code blip2_opt_embed_tokens(const blip2_model *m, const blip2_tp *tp, const int32_t *ids, int n,
                                  const float *projected, float *out, blip2_status *st);

/* Checked input embeddings for the model's ids: rows whose id is the image token take the projected
 * query embeddings in order (there must be exactly Q of them), the rest embed_tokens.
 * ids [n], projected [Q, Ct] (read on rank 0 only) → out [n, Ct] on every rank. Collective. */
blip2_code blip2_opt_embed_inputs(const blip2_model *m, const blip2_tp *tp, const int32_t *ids, int n,
                                  const float *projected, float *out, blip2_status *st);

/* Runs T new positions (embeddings [T, Ct], positions kv->T ..) through the decoder shard,
 * appending to the cache; logits of the last new position for this rank's vocab slice
 * [shard.V] (ids shard.v0 ..). Collective. */
blip2_code blip2_opt_forward(const blip2_model *m, const blip2_tp *tp, blip2_kv_cache *kv, const float *emb, int T,
                             float *logits, blip2_status *st);

/* Greedy pick over vocab-parallel logits without gathering them: the global argmax, the lowest
 * id on ties (as torch.argmax), the same on every rank. Collective. */
blip2_code blip2_tp_argmax(const blip2_model *m, const blip2_tp *tp, const float *logits, int32_t *id, blip2_status *st);
/* Gathers the vocab slices into full logits [V] on every rank (for dumps and samplers). */
blip2_code blip2_tp_gather_logits(const blip2_model *m, const blip2_tp *tp, const float *logits, float *full,
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

/* Greedy decoding for one image: pixels [3, H, W] (rank 0), ids [n] (image tokens included; the
 * same on every rank); writes up to max_new ids to out_ids, stopping after eos (kept) or at
 * max_new / the position limit. Under TP every rank calls it: rank 0 runs vision + Q-Former and
 * broadcasts the projected queries, and decides each step (next id, stop) for all. The trace's
 * vision/Q-Former tensors are filled on rank 0 only. */
blip2_code blip2_generate_greedy(const blip2_model *m, const blip2_tp *tp, const float *pixels, const int32_t *ids, int n,
                                 int max_new, int32_t *out_ids, int *n_out, blip2_finish *finish, blip2_trace *trace,
                                 blip2_status *st);

#endif
