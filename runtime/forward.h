/* The forward of BLIP-2 OPT: vision encoder → Q-Former → projection → OPT decoder over a paged KV
 * cache. Written once against the model's backend (m->ops: the CPU reference or CUDA); arguments
 * documented as host memory are copied in and out here, everything else lives on the backend.
 * Every function returns a status; none aborts. */
#ifndef BLIP2_FORWARD_H
#define BLIP2_FORWARD_H

#include <math.h>
#include <stdint.h>

#include "../parallel/comm.h"
#include "graphs.h"
#include "kv_cache.h"
#include "model.h"

/* Activations of the image stages (vision → Q-Former → projection) for up to max_B images at a
 * time, allocated once in the model's backend memory: each stage hands its output to the next
 * without leaving the device, and no call allocates. Shapes use the config's letters (T vision
 * tokens, P patches, Q queries; Cv, Cq, Ct vision / Q-Former / OPT channels). */
typedef struct {
    const blip2_ops *ops;
    int max_B;
    float *pixels;        /* [B, 3, H, W] */
    float *patches;       /* [P, 3·PS·PS] one image's patches as matmul rows */
    float *x, *ctx;       /* [B·T, Cv] residual stream (proj and fc2 add into it), attention output */
    float *qkv;           /* [B·T, 3Cv] */
    float *mlp;           /* [B·T, mlp_v] */
    float *scores;        /* attention scores: [max(B, NH)·Tq·Tk] of either encoder */
    void *h;              /* [B·T, max(Cv, mlp_v)] of blip2_adtype: the vision matmuls' own inputs (norms, GELU) */
    float *image;         /* [B·T, Cv] vision output (post-LN) */
    void *image_a;        /* image in blip2_adtype, the Q-Former's cross-attention input (image itself when fp32) */
    float *qx;            /* [B·Q, Cq] query states: the Q-Former output */
    float *qq, *qctx, *qo; /* [B·Q, Cq] */
    float *qk, *qv;       /* [B·max(Q, T), Cq] keys / values (the image's for cross-attention) */
    float *qmlp;          /* [B·Q, mlp_q] */
    float *proj;          /* [B·Q, Ct] the language projection: OPT's image rows */
    blip2_graph_cache graphs; /* the three stages by number of images (graphs.h) */
} blip2_encoder_ws;

blip2_code blip2_encoder_ws_init(blip2_encoder_ws *ws, const blip2_model *m, int max_B, blip2_status *st);
void blip2_encoder_ws_free(blip2_encoder_ws *ws);

/* The stages on the backend, B <= max_B images: ws->pixels → ws->image; ws->image → ws->qx;
 * ws->qx → ws->proj. They queue work and return (errors surface at the next backend check). */
void blip2_vision_run(const blip2_model *m, blip2_encoder_ws *ws, int B);
void blip2_qformer_run(const blip2_model *m, blip2_encoder_ws *ws, int B);
void blip2_project_run(const blip2_model *m, blip2_encoder_ws *ws, int B);

/* The three stages in a row (rank 0): pixels [B, 3, H, W] (host) → projected [B, Q, Ct] (host);
 * image [B, T, Cv] and qout [B, Q, Cq] (host, each may be NULL) receive the intermediate outputs.
 * One upload, one download per output, one wait. */
blip2_code blip2_encode_images(const blip2_model *m, blip2_encoder_ws *ws, const float *pixels, int B, float *image,
                               float *qout, float *projected, blip2_status *st);
/* The same with each image's pixels in a buffer of its own (pixels[b]: [3, H, W], host), uploaded
 * one after another: the engine hands its requests' buffers over without gathering them first. */
blip2_code blip2_encode_image_list(const blip2_model *m, blip2_encoder_ws *ws, const float *const *pixels, int B,
                                   float *image, float *qout, float *projected, blip2_status *st);

/* One stage at a time, host memory in and out, with a workspace of their own (per-stage timing in
 * bench/): pixels [B, 3, H, W] → image embeddings [B, T, Cv]; → query outputs [B, Q, Cq]; →
 * language_projection [B, Q, Ct]. */
blip2_code blip2_vision_forward(const blip2_model *m, const float *pixels, int B, float *out, blip2_status *st);
blip2_code blip2_qformer_forward(const blip2_model *m, const float *image, int B, float *out, blip2_status *st);
blip2_code blip2_project(const blip2_model *m, const float *query_out, int B, float *out, blip2_status *st);

/* The KV cache of a single sequence: a private paged pool holding max_T positions, T filled. */
typedef struct {
    blip2_kv_pool pool;
    int32_t *table; /* [blocks] */
    int max_T, T;
} blip2_kv_cache;

blip2_code blip2_kv_cache_init(blip2_kv_cache *kv, const blip2_model *m, int max_T, blip2_status *st);
void blip2_kv_cache_free(blip2_kv_cache *kv);

/* Every id inside the vocabulary and exactly Q image tokens, else a clear EINVAL. */
blip2_code blip2_opt_check_ids(const blip2_config *c, const int32_t *ids, int n, blip2_status *st);
/* marked[t] = -1 where ids[t] is the image token, else ids[t]. */
void blip2_opt_mark_image_rows(const blip2_config *c, const int32_t *ids, int n, int32_t *marked);

/* A candidate of a vocab-parallel argmax: a row's best (value, id) on one rank. */
typedef struct {
    float value;
    int32_t id;
} blip2_scored_id;

/* Argmax order (torch.argmax's): a before b when a is a number and b NaN, or a's value is larger,
 * or the values are equal (or both NaN) and a's id is lower. Merging the ranks' candidates. */
static inline int blip2_scored_before(blip2_scored_id a, blip2_scored_id b) {
    if (isnan(a.value) || isnan(b.value)) return isnan(b.value) && (!isnan(a.value) || a.id < b.id);
    return a.value > b.value || (a.value == b.value && a.id < b.id);
}

/* One sequence's part of a batched step: n_new positions after past ones, KV in `blocks`. */
typedef struct {
    const int32_t *blocks;
    int past, n_new;
} blip2_seq_step;

/* OPT activations for steps of up to max_tokens rows over max_seqs sequences of up to max_ctx
 * positions, allocated once (in the model's backend memory) so a step never allocates. */
typedef struct {
    const blip2_ops *ops;
    int max_tokens, max_seqs, max_ctx;
    float *x;                /* [max_tokens, Ct] the residual stream (the row-parallel matmuls add into it) */
    void *h;                 /* [max_tokens, Ct] of blip2_adtype: a norm's output where not fused into its matmul */
    float *qkv;              /* [max_tokens, 3Cl] q | k | v of this rank's heads (one matmul) */
    float *ctx;              /* [max_tokens, Cl] attention output, of blip2_adtype */
    float *mlp;              /* [max_tokens, ffn_local] */
    float *scores;           /* [max_ctx] (host backends) */
    float *last;             /* [max_seqs, Ct] each sequence's last row, then its final norm */
    float *logits;           /* [max_seqs, V_local]: the step's result, one row per sequence */
    int32_t *pick;           /* [2·max_seqs] per-row argmax: n ids, then n values (float bits) */
    int32_t *idx;            /* backend copy of the step's index arrays (below) */
    int32_t *host_idx;       /* host staging: tokens [T] | positions [T] | last rows [S] | meta [3S] | tables [S·mb] */
    size_t idx_cap;          /* ints in idx / host_idx */
    int32_t *host_pick;      /* [2·max_seqs] host copy of pick */
    blip2_scored_id *host_all; /* [(world + 1)·max_seqs] every rank's (value, id) per row, then this rank's */
    blip2_graph_cache graphs; /* decode steps by batch size (graphs.h), bound to the KV pool they address */
} blip2_opt_ws;

blip2_code blip2_opt_ws_init(blip2_opt_ws *ws, const blip2_model *m, int max_tokens, int max_seqs, int max_ctx,
                             blip2_status *st);
void blip2_opt_ws_free(blip2_opt_ws *ws);

/* A batched step (continuous batching): the new rows of every sequence together, tokens [Σ n_new]
 * (host, the same on every rank) in sequence order; a token < 0 is an image row and takes the next
 * row of image_rows [count, Ct] (host, read on rank 0 only). Keys/values go to each sequence's
 * blocks; the logits of each sequence's last new row land in ws->logits [n_seqs, V_local] (this
 * rank's vocab slice, backend memory). Collective. */
blip2_code blip2_opt_forward_batch(const blip2_model *m, const blip2_tp *tp, blip2_kv_pool *kv,
                                   const blip2_seq_step *seqs, int n_seqs, const int32_t *tokens,
                                   const float *image_rows, blip2_opt_ws *ws, blip2_status *st);

/* The single-sequence form over a private cache: T new tokens (marked as above) after kv->T;
 * logits [V_local] of the last one, copied to host memory. Collective. */
blip2_code blip2_opt_forward(const blip2_model *m, const blip2_tp *tp, blip2_kv_cache *kv, const int32_t *tokens, int T,
                             const float *image_rows, float *logits, blip2_status *st);

/* Greedy picks of the first n rows of ws->logits without gathering them: each row's global
 * argmax, the lowest id on ties (as torch.argmax), the same on every rank. One all-gather. */
blip2_code blip2_tp_argmax(const blip2_model *m, const blip2_tp *tp, blip2_opt_ws *ws, int n, int32_t *ids,
                           blip2_status *st);
/* Gathers the vocab slices (host memory, [V_local]) into full logits [V] on every rank. */
/* Log-probabilities in place for the rows i < n of ws->logits with which[i] set (the others are
 * left as they are): each rank's (max, Σ exp) per row (blip2_logsumexp_rows), one all-gather, then
 * every rank combines them in the same order into the row's log-sum-exp (double) and subtracts
 * it from its slice (blip2_shift_rows). Collective. */
blip2_code blip2_tp_logprobs(const blip2_model *m, const blip2_tp *tp, blip2_opt_ws *ws, int n, const uint8_t *which,
                             blip2_status *st);
blip2_code blip2_tp_gather_logits(const blip2_model *m, const blip2_tp *tp, const float *logits, float *full,
                                  blip2_status *st);

typedef enum { BLIP2_FINISH_EOS, BLIP2_FINISH_LENGTH, BLIP2_FINISH_STOP, BLIP2_FINISH_CANCELLED } blip2_finish;
const char *blip2_finish_name(blip2_finish f);

/* Intermediate tensors a caller may ask for (any pointer NULL = not wanted). */
typedef struct {
    float *vision_out;     /* [T, Cv] */
    float *qformer_out;    /* [Q, Cq] */
    float *projected;      /* [Q, Ct] */
    float *prefill_logits; /* [V] at the last prompt position */
} blip2_trace;

/* The prefill of one image and prompt with every intermediate recorded: pixels [3, H, W] (rank
 * 0), ids [n] (image tokens included; the same on every rank). The trace's vision/Q-Former
 * tensors are filled on rank 0; prefill_logits [V] on every rank. Collective. */
blip2_code blip2_trace_prefill(const blip2_model *m, const blip2_tp *tp, const float *pixels, const int32_t *ids, int n,
                               blip2_trace *tr, blip2_status *st);

#endif
