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
    return d->do_sample || d->num_beams > 1 || d->min_new_tokens > 0;
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

void blip2_logits_mask_eos(const blip2_decoding *d, float *logits, int V, int n_generated, int eos_id) {
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

/* TopPLogitsWarper's cutoff over values sorted in decreasing order (−inf entries add exactly 0):
 * the largest value of the dropped tail, whose mass is <= 1 − top_p; −inf when nothing drops. */
static float top_p_cutoff(const float *sorted, int n, float top_p) {
    float mx = sorted[0];
    double total = 0;
    for (int i = 0; i < n; i++) total += isinf(sorted[i]) ? 0.0 : exp((double)sorted[i] - mx);
    double tail = 0, limit = (1.0 - top_p) * total;
    float cutoff = -INFINITY;
    for (int i = n - 1; i > 0; i--) {
        tail += isinf(sorted[i]) ? 0.0 : exp((double)sorted[i] - mx);
        if (tail > limit) break;
        cutoff = sorted[i];
    }
    return cutoff;
}

/* Top-p as transformers' TopPLogitsWarper: drop the low-probability tail whose mass is <= 1 - top_p,
 * always keeping the most likely token. */
static void apply_top_p(float *logits, int V, float top_p, float *scratch) {
    float *sorted = scratch;
    memcpy(sorted, logits, sizeof(float) * V);
    qsort(sorted, (size_t)V, sizeof(float), cmp_desc);
    float mx = sorted[0], cutoff = top_p_cutoff(sorted, V, top_p);
    if (isinf(cutoff)) return;
    for (int i = 0; i < V; i++)
        if (logits[i] <= cutoff && logits[i] != mx) logits[i] = -INFINITY;
}

/* One draw from softmax(v [n]) (−inf entries excluded), walking in order: ids[i] (i when ids is
 * NULL) of the first entry whose running mass passes the uniform draw. mx: the largest value. */
static int32_t draw(const float *v, const int32_t *ids, int n, float mx, blip2_rng *rng) {
    double total = 0;
    for (int i = 0; i < n; i++) total += isinf(v[i]) ? 0.0 : exp((double)v[i] - mx);
    double u = blip2_rng_uniform(rng) * total, acc = 0;
    int32_t last = 0;
    for (int i = 0; i < n; i++) {
        if (isinf(v[i])) continue;
        acc += exp((double)v[i] - mx);
        last = ids ? ids[i] : i;
        if (u < acc) return last;
    }
    return last;
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
    return draw(logits, NULL, V, logits[blip2_argmax(logits, V)], rng);
}

/* ---- candidates (the device's top-k of a row) instead of the full row ---- */

int blip2_decoding_candidates(const blip2_decoding *d) {
    if (d->num_beams != 1) return 0;
    if (!d->do_sample) return d->min_new_tokens > 0 ? 2 : 0;
    return d->top_k >= 1 && d->top_k <= BLIP2_TOPK_MAX - 2 ? d->top_k + 2 : 0;
}

/* a > b with room: b moved up 4 ulps is still below a (a division rounds each by half an ulp). */
static int apart(float a, float b) {
    if (isnan(a) || isnan(b)) return 0;
    if (isinf(b) && b < 0) return !(isinf(a) && a < 0);
    float up = b;
    for (int i = 0; i < 4; i++) up = nextafterf(up, INFINITY);
    return a > up;
}

int blip2_candidates_exact(const float *vals, int n) {
    if (n <= 2) return n >= 1; /* greedy: argmax order is already the answer */
    return apart(vals[n - 3], vals[n - 2]) && apart(vals[n - 2], vals[n - 1]);
}

typedef struct {
    int32_t id;
    float v;
} cand;

static int cand_by_value(const void *a, const void *b) { /* argmax order: larger first, then the lower id */
    const cand *x = a, *y = b;
    if (x->v != y->v) return x->v > y->v ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}
static int cand_by_id(const void *a, const void *b) {
    const cand *x = a, *y = b;
    return (x->id > y->id) - (x->id < y->id);
}

int32_t blip2_sample_candidates(const blip2_decoding *d, const int32_t *ids, const float *vals, int n, int n_generated,
                                int eos_id, blip2_rng *rng) {
    cand c[BLIP2_TOPK_MAX];
    if (n > BLIP2_TOPK_MAX) n = BLIP2_TOPK_MAX;
    if (n < 1) return eos_id; /* no candidates: not called so (blip2_decoding_candidates >= 2) */
    for (int i = 0; i < n; i++) c[i] = (cand){ids[i], vals[i]};
    if (n_generated < d->min_new_tokens) /* eos masked: it leaves the top (to the end) */
        for (int i = 0; i < n; i++)
            if (c[i].id == eos_id) c[i].v = -INFINITY;
    qsort(c, (size_t)n, sizeof *c, cand_by_value);
    if (!d->do_sample) return c[0].id;
    if (d->temperature != 1.0f)
        for (int i = 0; i < n; i++) c[i].v /= d->temperature;
    int m = d->top_k >= 1 && d->top_k < n ? d->top_k : n; /* the exactness check keeps ties off this boundary */
    float kth = c[m - 1].v;
    while (m < n && c[m].v >= kth) m++;
    float v[BLIP2_TOPK_MAX];
    int32_t id[BLIP2_TOPK_MAX];
    for (int i = 0; i < m; i++) v[i] = c[i].v;
    float mx = v[0], cutoff = d->top_p < 1.0f ? top_p_cutoff(v, m, d->top_p) : -INFINITY; /* as apply_top_p */
    for (int i = 0; i < m; i++)
        if (c[i].v <= cutoff && c[i].v != mx) c[i].v = -INFINITY;
    qsort(c, (size_t)m, sizeof *c, cand_by_id); /* the draw walks ids in increasing order, as over the full row */
    for (int i = 0; i < m; i++) v[i] = c[i].v, id[i] = c[i].id;
    return draw(v, id, m, mx, rng);
}
