/* The serving engine: a bounded queue, continuous batching over a paged KV cache, per-request
 * decoding (greedy, sampling, beams) and an image-embedding cache. Rank 0 runs blip2_engine_run()
 * on the thread that owns the communicator; the other ranks run blip2_engine_follow() and execute
 * the step descriptors rank 0 broadcasts, so they can never diverge. Submissions come from any
 * thread (the gRPC workers); results come back through callbacks on the engine thread. */
#ifndef BLIP2_ENGINE_H
#define BLIP2_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#include "../parallel/comm.h"
#include "forward.h"
#include "inputs.h"
#include "sampling.h"

typedef struct {
    int max_batch;            /* sequences in one step (a beam counts num_beams) */
    int max_queue;            /* waiting requests; more are refused with BLIP2_EBUSY */
    int max_step_tokens;      /* token budget of a step: long prefills are chunked */
    int block_size;           /* KV positions per block */
    size_t kv_bytes;          /* KV memory budget of this rank (blocks = kv_bytes / block bytes) */
    int max_new_tokens_limit; /* largest max_new_tokens a request may ask for */
    size_t image_cache_bytes; /* projected query embeddings kept for repeated images (0: off) */
    int max_images_per_step;  /* vision encoder batch, 1..256 */
    /* > 0: while the image encoder is busy and more admitted requests wait for their images than
     * sequences could step, run no step, for at most this many ms at a time (a burst is then
     * encoded with the GPU to itself and decoded in one batch, as HF's generate runs it, instead
     * of small batches decoding beside the encoder; the decoding sequences pause meanwhile).
     * 0: steps never wait for images. */
    int hold_for_images_ms;
    /* The hold's trigger, in percent: it holds while the requests waiting for their images are more
     * than this share of the sequences ready to step (default 100: more than them; 0: any request
     * waiting, so that a burst is encoded whole before it decodes, for offline jobs and
     * benchmarks: with requests arriving all the time, steps then run once every hold). */
    int hold_share_pct;
} blip2_engine_opts;

blip2_engine_opts blip2_engine_opts_default(void);

typedef struct {
    double queue_ms, image_ms, prefill_ms, decode_ms, total_ms;
    int image_cached; /* the vision encoder and Q-Former were skipped */
} blip2_timings;

typedef struct {
    int32_t *ids; /* generated ids (eos kept) */
    int n_ids;
    char *text; /* decoded, special tokens skipped, whitespace stripped */
    size_t text_len;
    float score; /* beam score (0 otherwise) */
    blip2_finish finish;
} blip2_sequence_out;

typedef struct {
    blip2_code code;     /* BLIP2_OK, or what went wrong (ECANCELLED, EDEADLINE, EUNAVAILABLE, ...) */
    const char *message; /* for errors */
    blip2_sequence_out *seqs; /* num_return_sequences of them (1 without beams) */
    int n_seqs;
    int prompt_tokens; /* image tokens + BOS + prompt */
    blip2_timings timings;
} blip2_result;

typedef struct {
    void *ctx;
    /* Streaming (single-sequence decoding): each generated id and the text it completed (may be
     * empty while a UTF-8 character is incomplete). Engine thread; may be NULL. */
    void (*on_token)(void *ctx, int32_t id, const char *piece, size_t len);
    /* Exactly once for every accepted job, on the engine thread; res lives for the call only. */
    void (*on_done)(void *ctx, const blip2_result *res);
    /* Polled between steps: nonzero stops the job with BLIP2_ECANCELLED. May be NULL. */
    int (*is_cancelled)(void *ctx);
} blip2_job_callbacks;

typedef struct {
    const uint8_t *image; /* JPEG/PNG bytes ... */
    size_t image_len;
    const float *pixels;  /* ... or ready pixel values [3, S, S] */
    const char *prompt;   /* UTF-8, may be empty (caption) ... */
    size_t prompt_len;
    const int32_t *input_ids; /* ... or the model's ids (image tokens included) */
    int n_input_ids;
    blip2_decoding dec;
    const char *const *stop; /* stop strings: generation ends once the text contains one */
    int n_stop;
    int64_t deadline_ns; /* CLOCK_MONOTONIC; 0: none */
} blip2_job;

typedef struct {
    int queued, active;
    int blocks_total, blocks_in_use;
    uint64_t image_hits, image_misses;
    size_t image_cache_bytes;
    uint64_t completed, failed;
    uint64_t steps, steps_while_encoding; /* steps run; of those, while the image encoder was busy */
    /* Host time between steps: from a step's results on the host (its picks downloaded) to the
     * launch of the next step, over the back-to-back pairs (the device waits on it: decisions,
     * admission, the next descriptor). */
    uint64_t host_gaps;
    int64_t host_gap_ns;
    /* Steps by kind, with their time from launch to results on the host: decode-only steps (one
     * row per sequence: graphs where they apply) and steps that carry a prefill chunk. */
    uint64_t steps_prefill;
    int64_t step_ns_decode, step_ns_prefill;
} blip2_engine_stats;

typedef struct blip2_engine blip2_engine;

blip2_code blip2_engine_create(const blip2_model *m, const blip2_tp *tp, const blip2_inputs *in,
                               const blip2_engine_opts *o, blip2_engine **out, blip2_status *st);
void blip2_engine_destroy(blip2_engine *e);

/* Validates and preprocesses in the caller's thread (image decode, tokenizer), then queues.
 * BLIP2_OK: on_done will be called exactly once. Otherwise nothing is called: EINVAL/ERANGE bad
 * input (the message says what), EBUSY queue full, EUNAVAILABLE stopping. */
blip2_code blip2_engine_submit(blip2_engine *e, const blip2_job *job, const blip2_job_callbacks *cb, blip2_status *st);

/* Rank 0: serves until blip2_engine_stop() and the drain that follows; then tells the other
 * ranks to stop. Must run on the thread that uses the communicator. */
blip2_code blip2_engine_run(blip2_engine *e, blip2_status *st);
/* Any thread, async-signal-unsafe: stop accepting; in-flight requests get grace_ms to finish,
 * then are cancelled. */
void blip2_engine_stop(blip2_engine *e, int grace_ms);
/* Ranks 1..N-1: execute rank 0's steps until it says stop. */
blip2_code blip2_engine_follow(const blip2_model *m, const blip2_tp *tp, const blip2_engine_opts *o, blip2_status *st);

/* Rank 0 without an engine (it failed to start): releases the followers waiting for a step. */
void blip2_engine_follow_stop(const blip2_tp *tp);

void blip2_engine_get_stats(blip2_engine *e, blip2_engine_stats *s);

int64_t blip2_now_ns(void); /* CLOCK_MONOTONIC */

#endif
