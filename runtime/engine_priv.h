/* Private state of the engine, shared by engine.c (queue, admission, steps) and engine_decide.c
 * (what each request does with its logits). */
#ifndef BLIP2_ENGINE_PRIV_H
#define BLIP2_ENGINE_PRIV_H

#include <pthread.h>

#include "engine.h"
#include "engine_step.h"
#include "image_cache.h"

#define MAX_BEAMS 16

typedef struct {
    int32_t *blocks; /* block table (blocks shared between beams are refcounted) */
    int n_blocks, cap;
    int len;      /* positions in the KV cache */
    int32_t *gen; /* generated ids [max_new] */
    int n_gen;
    float score;  /* beam: running sum of log-probabilities */
    int32_t next; /* the id to feed at the next step */
} seq_t;

typedef struct {
    int32_t *ids;
    int n;
    float score;
    blip2_finish finish;
} hyp_t;

typedef struct req {
    struct req *next;
    blip2_job_callbacks cb;
    blip2_decoding dec;
    int max_new, mode;
    char **stop;
    int n_stop;
    int32_t *prompt; /* the model's ids, image tokens included */
    int n_prompt;
    float *pixels;    /* [3, S, S] until encoded */
    float *projected; /* [Q, Ct] */
    uint8_t *img;     /* image bytes (for the cache) */
    size_t img_len;
    uint64_t hash;
    int cached;
    int64_t t_submit, t_admit, t_prefill, t_first, deadline;
    double image_ms;
    int fed, img_fed; /* prompt positions (and image rows) already run */
    int n_seq;        /* live sequences: 1, or num_beams once expanded */
    seq_t seq[MAX_BEAMS];
    int reserved; /* KV blocks promised at admission */
    blip2_rng rng;
    blip2_detok_stream *detok;
    char *text; /* streamed text so far (stop strings look here) */
    size_t text_len, text_cap;
    hyp_t hyps[MAX_BEAMS];
    int n_hyps;
    blip2_finish finish;
} req_t;

struct blip2_engine {
    const blip2_model *m;
    const blip2_tp *tp;
    const blip2_inputs *in;
    blip2_engine_opts o;
    step_exec x;
    int32_t *refs; /* per block: how many tables hold it */
    int reserved;  /* blocks promised to admitted requests */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    req_t *qh, *qt; /* waiting requests, first come first served */
    int qlen, stopping;
    int64_t stop_at;
    req_t **act; /* admitted requests */
    int n_act, seqs_used;
    blip2_image_cache cache;
    blip2_engine_stats stats;
    float *img_px, *img_proj;                    /* batched image encoding: pixels in, projected rows out (host) */
    blip2_encoder_ws enc;                        /* its activations on the backend */
    float *scratch;                              /* [2V] sampling */
    int32_t *tokens;                             /* [max_step_tokens] the step's ids */
    float *img_rows;                             /* [max_step_tokens, Ct] the step's image rows */
    struct { req_t *r; int seq; int mode; } *refs_step; /* what each step row belongs to */
    int32_t *copies; /* pending copy-on-write pairs for the next step */
    int n_copies;
    int32_t *hist;   /* [max_pos] prompt + generated ids (repetition penalty) */
};


/* Blocks and tables (rank 0's bookkeeping; refs count the tables holding a block). */
void engine_table_release(blip2_engine *e, seq_t *s);
int engine_table_reserve(seq_t *s, int n);
int engine_table_grow(blip2_engine *e, seq_t *s, int positions);
/* Removes admitted request act[idx]: blocks, slots and reservation return; on_done is called. */
void engine_retire(blip2_engine *e, int idx, blip2_code code, const char *msg);
/* After a step: every row that produced logits decides its request's next move. */
void decide_all(blip2_engine *e, int n_rows);

#endif
