/* Per-request decoding as transformers' generate() does it: logits processors in its order
 * (repetition penalty, min_new_tokens), then for sampling the warpers (temperature, top-k,
 * top-p), softmax and a draw from the request's own seeded generator, so the same seed and inputs
 * give the same tokens whatever else is in the batch. */
#ifndef BLIP2_SAMPLING_H
#define BLIP2_SAMPLING_H

#include <stdint.h>

#include "status.h"

typedef struct {
    int max_new_tokens;       /* 0: the model's default */
    int min_new_tokens;       /* eos is masked until this many tokens exist */
    int do_sample;            /* 0: greedy (or beam search) */
    float temperature;        /* > 0 (sampling only) */
    int top_k;                /* 0: off */
    float top_p;              /* (0, 1]; 1: off */
    uint64_t seed;            /* with has_seed; otherwise drawn per request */
    int has_seed;
    float repetition_penalty; /* 1: off; HF: over prompt and generated ids */
    int num_beams;            /* 1: no beam search */
    float length_penalty;     /* beam score = sum logprob / generated_len ** length_penalty */
    int early_stopping;       /* beams: stop as soon as num_beams hypotheses are finished */
    int num_return_sequences; /* beams: how many hypotheses to return (<= num_beams) */
} blip2_decoding;

/* transformers' defaults: greedy, temperature 1, top_k 50 when sampling, top_p 1, no penalty. */
blip2_decoding blip2_decoding_default(void);
/* Range checks with messages saying what is wrong (EINVAL). */
blip2_code blip2_decoding_validate(const blip2_decoding *d, int max_new_limit, blip2_status *st);
/* Whether decisions need more than the argmax (sampling, beams, min_new_tokens). A single
 * sequence's repetition penalty does not count: the engine applies it to the row on the backend
 * first (blip2_penalize_rows). */
int blip2_decoding_needs_full_logits(const blip2_decoding *d);

/* xoshiro256** seeded by splitmix64: a request's private random stream. */
typedef struct {
    uint64_t s[4];
} blip2_rng;
void blip2_rng_seed(blip2_rng *r, uint64_t seed);
double blip2_rng_uniform(blip2_rng *r); /* [0, 1) with 53 bits */

/* In place over logits [V]: eos masked (−inf) while n_generated < min_new_tokens. (The repetition
 * penalty is applied on the backend, before the row leaves it: blip2_penalize_rows.) */
void blip2_logits_mask_eos(const blip2_decoding *d, float *logits, int V, int n_generated, int eos_id);
/* Sampling from processed logits [V] (modified: warpers applied): temperature, top-k, top-p,
 * softmax, one draw. scratch holds 2·V floats. */
int32_t blip2_sample(const blip2_decoding *d, float *logits, int V, blip2_rng *rng, float *scratch);
/* Candidates instead of the full row: how many of a row's best logits (argmax order) decide a
 * single-sequence request exactly, or 0 when it needs the whole row (top-k off or above
 * BLIP2_TOPK_MAX − 2) or is a beam search (the engine's beam candidates: LOGITS_BEAM). A
 * repetition penalty must already be in the row (the engine applies it on the backend) and is not
 * applied again to the candidates. Greedy with min_new_tokens:
 * 2 (the best, and the next in case the best is a masked eos). Sampling with top-k: top_k + 2
 * (a spare for a masked eos, and one to see that no tie crosses the top-k boundary). */
int blip2_decoding_candidates(const blip2_decoding *d);
/* Whether n candidate values (argmax order) decide exactly: for n > 2 the values at the possible
 * top-k boundaries (n−3 | n−2 and n−2 | n−1) are far enough apart that a temperature division
 * cannot make them equal. Depends on the values alone, so every rank answers the same. */
int blip2_candidates_exact(const float *vals, int n);
/* blip2_logits_mask_eos + the choice over candidates ids/vals [n] (a row's n best logits, argmax
 * order; n = blip2_decoding_candidates(d), blip2_candidates_exact true): the id the full row
 * would give, bit for bit (same arithmetic in the same order; the draw walks ids in increasing
 * order as blip2_sample does). */
int32_t blip2_sample_candidates(const blip2_decoding *d, const int32_t *ids, const float *vals, int n, int n_generated,
                                int eos_id, blip2_rng *rng);

#endif
