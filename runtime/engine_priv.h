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
    uint64_t id;  /* unique in the engine: how the image encoder's results find their request */
    int encoding; /* its image is with the encoder */
    int finishing; /* 1 + blip2_finish decided at its last step, applied once that token is streamed */
} req_t;

/* The image encoder thread and what it shares with the engine thread (engine_images.c): the
 * fields below `mu` are read and written under it. */
#define ENC_MAX_IMAGES 256 /* the largest vision batch an engine may be given */
#define ENC_MAX_REQS 256
typedef struct {
    pthread_t thread;
    int inited, started;
    char device[16];      /* backend name and GPU of the model: the thread opens its own queue there */
    int device_index;
    blip2_encoder_ws ws;  /* the thread's */
    float *proj;          /* [max_images_per_step, Q, Ct] out (host) */
    /* The batch, set by the engine thread before it marks the encoder busy and read back once it
     * is done: its requests (id, row, brought the image), the rows' pixels (each a request's own
     * buffer, handed over: the encoder thread uploads and frees it) and, once encoded, a
     * projected-rows buffer per request (malloc'd by the encoder thread, NULL if that failed;
     * the engine thread takes them). The copies, ~1 MB an image, stay off the step loop. The
     * image bytes of each row (its first request's, handed over like the pixels; NULL without
     * the cache) go into the image cache from the encoder thread too. */
    int n_req;
    uint64_t req_id[ENC_MAX_REQS];
    int req_row[ENC_MAX_REQS], req_first[ENC_MAX_REQS];
    float *src[ENC_MAX_IMAGES];
    uint8_t *img[ENC_MAX_IMAGES];
    size_t img_len[ENC_MAX_IMAGES];
    uint64_t img_hash[ENC_MAX_IMAGES];
    float *out[ENC_MAX_REQS];
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int ready, quit, state, B;
    blip2_code rc;
    blip2_status st;
    double ms;
} engine_encoder;

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
    engine_encoder encoder;                      /* vision + Q-Former beside the steps */
    uint64_t next_id;
    float *scratch;                              /* [2V] sampling */
    int32_t *tokens;                             /* [max_step_tokens] the step's ids */
    float *img_rows;                             /* [max_step_tokens, Ct] the step's image rows */
    struct { req_t *r; int seq; int mode; } *refs_step; /* what each step row belongs to (r NULL: retired since) */
    int inflight_rows;   /* rows of refs_step in the step now running (0: none) */
    int step_prefill;    /* whether the step build_step made carries a prefill chunk */
    int64_t t_results;   /* when the last step's results reached the host (0: no step since a pause) */
    int64_t hold_since;  /* when steps began to wait for images (hold_for_images_ms; 0: not waiting) */
    step_view view;      /* that step's descriptor */
    struct { req_t *r; int32_t id; } *emits; /* tokens decided at the last step, to stream (r NULL: retired) */
    int n_emits;
    int32_t *copies; /* pending copy-on-write pairs for the next step */
    int n_copies;
    int32_t *hist;   /* [max_pos] prompt + generated ids (repetition penalty) */
    /* The next step's repetition penalties (step_desc_add_penalties): per descriptor sequence an
     * offset into pen_ids and a penalty; pen_seen marks ids already listed for the current row. */
    int32_t *pen_offs; /* [max_batch + 1] */
    float *pen_vals;   /* [max_batch] */
    int32_t *pen_ids;  /* [max_batch · max_pos] */
    uint8_t *pen_seen; /* [V] */
};


/* Blocks and tables (rank 0's bookkeeping; refs count the tables holding a block). */
void engine_table_release(blip2_engine *e, seq_t *s);
int engine_table_reserve(seq_t *s, int n);
int engine_table_grow(blip2_engine *e, seq_t *s, int positions);
/* Removes admitted request act[idx]: blocks, slots and reservation return; on_done is called. */
void engine_retire(blip2_engine *e, int idx, blip2_code code, const char *msg);
/* After a step: every row that produced logits decides its request's next move (ids, beams,
 * which requests end); what single sequences produced is queued for emit_all. */
void decide_all(blip2_engine *e, int n_rows);
/* The penalty of the step row of sequence q of r that is being added to the descriptor as its
 * sequence number `row`: its distinct history ids when r has a repetition penalty and the row
 * wants logits (applied on the backend: to logits for a single sequence, to log-probabilities for
 * a beam). */
void engine_row_penalty(blip2_engine *e, const req_t *r, const seq_t *q, int mode, int row);
/* Streams the queued tokens (text, stop strings) and ends the requests whose last token it was:
 * the engine runs it while the next step computes. */
void emit_all(blip2_engine *e);

/* The image encoder (engine_images.c). start: the thread, its device queue and workspace (an
 * error if any of them fails); stop: joins it. hand: gives the idle encoder the admitted requests
 * still without image rows (pixels copied); collect: puts finished rows into their requests (a
 * failed batch fails its requests only); busy / wait: whether a batch is out, waiting up to ms
 * for it. All on the engine thread. */
blip2_code engine_encoder_start(blip2_engine *e, blip2_status *st);
void engine_encoder_stop(blip2_engine *e);
void engine_hand_images(blip2_engine *e);
void engine_collect_images(blip2_engine *e);
int engine_encoder_busy(blip2_engine *e);
void engine_encoder_wait(blip2_engine *e, int ms);

#endif
