#include "sampling.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../kernels/ops.h"

blip2_decoding blip2_decoding_default(void) {
    return (blip2_decoding){.temperature = 1.0f, .top_k = 50, .top_p = 1.0f, .repetition_penalty = 1.0f,
                            .num_beams = 1, .length_penalty = 1.0f, .num_return_sequences = 1};
}

blip2_code blip2_decoding_validate(const blip2_decoding *d, int max_new_limit, blip2_status *st) {
    if (d->max_new_tokens < 0 || d->max_new_tokens > max_new_limit)
        return blip2_fail(st, BLIP2_EINVAL, "max_new_tokens %d is out of range [0, %d] (0 = model default)",
                          d->max_new_tokens, max_new_limit);
    if (d->min_new_tokens < 0 || d->min_new_tokens > max_new_limit)
        return blip2_fail(st, BLIP2_EINVAL, "min_new_tokens %d is out of range [0, %d]", d->min_new_tokens, max_new_limit);
    if (d->do_sample && !(d->temperature > 0.0f && d->temperature <= 100.0f))
        return blip2_fail(st, BLIP2_EINVAL, "temperature %g must be in (0, 100] when sampling", d->temperature);
    if (d->top_k < 0 || d->top_k > 1000000) return blip2_fail(st, BLIP2_EINVAL, "top_k %d must be >= 0", d->top_k);
    if (!(d->top_p > 0.0f && d->top_p <= 1.0f)) return blip2_fail(st, BLIP2_EINVAL, "top_p %g must be in (0, 1]", d->top_p);
    if (!(d->repetition_penalty > 0.0f && d->repetition_penalty <= 100.0f))
        return blip2_fail(st, BLIP2_EINVAL, "repetition_penalty %g must be in (0, 100]", d->repetition_penalty);
    if (d->num_beams < 1 || d->num_beams > 16) return blip2_fail(st, BLIP2_EINVAL, "num_beams %d must be in [1, 16]", d->num_beams);
    if (d->num_beams > 1 && d->do_sample)
        return blip2_fail(st, BLIP2_EINVAL, "beam sampling (num_beams > 1 with do_sample) is not supported");
    if (d->num_return_sequences < 1 || d->num_return_sequences > d->num_beams)
        return blip2_fail(st, BLIP2_EINVAL, "num_return_sequences %d must be in [1, num_beams = %d]", d->num_return_sequences,
                          d->num_beams);
    if (!isfinite(d->length_penalty) || fabsf(d->length_penalty) > 100.0f)
        return blip2_fail(st, BLIP2_EINVAL, "length_penalty %g is out of range", d->length_penalty);
    return BLIP2_OK;
}

int blip2_decoding_needs_full_logits(const blip2_decoding *d) {
    return d->do_sample || d->num_beams > 1 || d->repetition_penalty != 1.0f || d->min_new_tokens > 0;
}

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void blip2_rng_seed(blip2_rng *r, uint64_t seed) {
    for (int i = 0; i < 4; i++) r->s[i] = splitmix64(&seed);
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t rng_next(blip2_rng *r) {
    uint64_t *s = r->s, result = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

double blip2_rng_uniform(blip2_rng *r) { return (double)(rng_next(r) >> 11) * (1.0 / 9007199254740992.0); }

void blip2_logits_process(const blip2_decoding *d, float *logits, int V, const int32_t *history, int n_hist,
                          int n_generated, int eos_id) {
    if (d->repetition_penalty != 1.0f) /* each distinct id once, as torch's gather/scatter does */
        for (int i = 0; i < n_hist; i++) {
            int32_t id = history[i];
            if (id < 0 || id >= V) continue;
            int seen = 0;
            for (int j = 0; j < i && !seen; j++) seen = history[j] == id;
            if (seen) continue;
            float s = logits[id];
            logits[id] = s < 0 ? s * d->repetition_penalty : s / d->repetition_penalty;
        }
    if (n_generated < d->min_new_tokens && eos_id >= 0 && eos_id < V) logits[eos_id] = -INFINITY;
}

static int cmp_desc(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x < y) - (x > y);
}

/* The k-th largest value (k >= 1) of x[V], via a sorted copy in scratch. */
static float kth_largest(const float *x, int V, int k, float *scratch) {
    memcpy(scratch, x, sizeof(float) * V);
    qsort(scratch, (size_t)V, sizeof(float), cmp_desc);
    return scratch[k - 1];
}

/* Top-p as transformers' TopPLogitsWarper: drop the low-probability tail whose mass is <= 1 - top_p,
 * always keeping the most likely token. */
static void apply_top_p(float *logits, int V, float top_p, float *scratch) {
    float *sorted = scratch;
    memcpy(sorted, logits, sizeof(float) * V);
    qsort(sorted, (size_t)V, sizeof(float), cmp_desc);
    float mx = sorted[0];
    double total = 0;
    for (int i = 0; i < V; i++) total += isinf(sorted[i]) ? 0.0 : exp((double)sorted[i] - mx);
    double tail = 0, limit = (1.0 - top_p) * total;
    float cutoff = -INFINITY; /* logits <= cutoff (in the dropped tail) are removed */
    for (int i = V - 1; i > 0; i--) {
        tail += isinf(sorted[i]) ? 0.0 : exp((double)sorted[i] - mx);
        if (tail > limit) break;
        cutoff = sorted[i];
    }
    if (isinf(cutoff)) return;
    for (int i = 0; i < V; i++)
        if (logits[i] <= cutoff && logits[i] != mx) logits[i] = -INFINITY;
}

int32_t blip2_sample(const blip2_decoding *d, float *logits, int V, blip2_rng *rng, float *scratch) {
    if (d->temperature != 1.0f)
        for (int i = 0; i < V; i++) logits[i] /= d->temperature;
    if (d->top_k > 0 && d->top_k < V) {
        float kth = kth_largest(logits, V, d->top_k, scratch);
        for (int i = 0; i < V; i++)
            if (logits[i] < kth) logits[i] = -INFINITY;
    }
    if (d->top_p < 1.0f) apply_top_p(logits, V, d->top_p, scratch);
    float mx = logits[blip2_argmax(logits, V)];
    double total = 0;
    for (int i = 0; i < V; i++) total += isinf(logits[i]) ? 0.0 : exp((double)logits[i] - mx);
    double u = blip2_rng_uniform(rng) * total, acc = 0;
    int32_t last = 0;
    for (int i = 0; i < V; i++) {
        if (isinf(logits[i])) continue;
        acc += exp((double)logits[i] - mx);
        last = i;
        if (u < acc) return i;
    }
    return last;
}

void blip2_log_softmax(float *logits, int V) {
    float mx = logits[blip2_argmax(logits, V)];
    float sum = 0;
    for (int i = 0; i < V; i++) sum += expf(logits[i] - mx);
    float lse = mx + logf(sum);
    for (int i = 0; i < V; i++) logits[i] -= lse;
}
