/* A GenerateRequest (protobuf-c) → an engine job: every check a request gets before it reaches
 * the engine, kept apart from the gRPC adapter so it can be fuzzed on its own. */
#include "request.h"

#include <inttypes.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

/* Strict UTF-8 (no overlongs, surrogates or code points above U+10FFFF). Returns the offset of the
 * first bad byte, or n when the whole text is valid. */
size_t blip2_utf8_check(const unsigned char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        size_t k;
        unsigned cp, min;
        if (c < 0x80) {
            i++;
            continue;
        } else if ((c & 0xE0) == 0xC0) {
            k = 1, cp = c & 0x1F, min = 0x80;
        } else if ((c & 0xF0) == 0xE0) {
            k = 2, cp = c & 0x0F, min = 0x800;
        } else if ((c & 0xF8) == 0xF0) {
            k = 3, cp = c & 0x07, min = 0x10000;
        } else {
            return i;
        }
        if (i + k >= n) return i; /* truncated */
        for (size_t j = 1; j <= k; j++) {
            if ((s[i + j] & 0xC0) != 0x80) return i;
            cp = (cp << 6) | (s[i + j] & 0x3F);
        }
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return i;
        i += k + 1;
    }
    return n;
}

/* A valid-UTF-8 copy (bad bytes become U+FFFD): protobuf strings must be UTF-8. */
char *blip2_utf8_copy(const char *s, size_t n) {
    if (!s) s = "", n = 0;
    char *out = malloc(3 * n + 1);
    if (!out) return NULL;
    size_t o = 0, i = 0;
    while (i < n) {
        size_t ok = blip2_utf8_check((const unsigned char *)s + i, n - i);
        memcpy(out + o, s + i, ok);
        o += ok;
        i += ok;
        if (i < n) {
            memcpy(out + o, "\xEF\xBF\xBD", 3);
            o += 3;
            i++;
        }
    }
    out[o] = 0;
    return out;
}

static int u32_to_int(uint32_t v, const char *name, int *out, blip2_status *st) {
    if (v > INT_MAX) return blip2_fail(st, BLIP2_EINVAL, "%s %" PRIu32 " is out of range", name, v);
    *out = (int)v;
    return 0;
}

/* DecodingParams (zero values = defaults) → blip2_decoding. */
static blip2_code map_decoding(const Blip2__V1__GenerateRequest *r, int limit, blip2_decoding *d, blip2_status *st) {
    *d = blip2_decoding_default();
    if (r->max_new_tokens > (uint32_t)limit)
        return blip2_fail(st, BLIP2_EINVAL, "max_new_tokens %" PRIu32 " exceeds the server's limit of %d (0 = the model's default)",
                          r->max_new_tokens, limit);
    d->max_new_tokens = (int)r->max_new_tokens;
    const Blip2__V1__DecodingParams *p = r->decoding;
    if (!p) return BLIP2_OK;
    d->do_sample = p->do_sample != 0;
    if (p->temperature != 0.0f) d->temperature = p->temperature;
    if (p->disable_top_k) d->top_k = 0;
    else if (p->top_k && u32_to_int(p->top_k, "top_k", &d->top_k, st)) return BLIP2_EINVAL;
    if (p->top_p != 0.0f) d->top_p = p->top_p;
    d->seed = p->seed;
    d->has_seed = p->has_seed != 0;
    if (p->repetition_penalty != 0.0f) d->repetition_penalty = p->repetition_penalty;
    if (u32_to_int(p->min_new_tokens, "min_new_tokens", &d->min_new_tokens, st)) return BLIP2_EINVAL;
    if (p->num_beams > 1 && u32_to_int(p->num_beams, "num_beams", &d->num_beams, st)) return BLIP2_EINVAL;
    if (p->length_penalty != 0.0f) d->length_penalty = p->length_penalty;
    d->early_stopping = p->early_stopping != 0;
    if (p->num_return_sequences > 1 &&
        u32_to_int(p->num_return_sequences, "num_return_sequences", &d->num_return_sequences, st))
        return BLIP2_EINVAL;
    return blip2_decoding_validate(d, limit, st);
}

static blip2_code check_text(const char *what, const char *s, blip2_status *st) {
    size_t n = s ? strlen(s) : 0, bad = blip2_utf8_check((const unsigned char *)(s ? s : ""), n);
    if (bad != n) return blip2_fail(st, BLIP2_EINVAL, "%s is not valid UTF-8 (bad byte at offset %zu)", what, bad);
    return BLIP2_OK;
}

blip2_code blip2_request_to_job(const Blip2__V1__GenerateRequest *r, int max_new_tokens_limit, const char *prompt,
                                int64_t dl, blip2_job *job, blip2_status *st) {
    memset(job, 0, sizeof *job);
    if (!r->image.data || r->image.len == 0)
        return blip2_fail(st, BLIP2_EINVAL, "image: empty (0 bytes); send the JPEG or PNG file's bytes");
    if (check_text("prompt", prompt, st)) return BLIP2_EINVAL;
    if (r->request_id && strlen(r->request_id) > BLIP2_MAX_REQUEST_ID)
        return blip2_fail(st, BLIP2_EINVAL, "request_id is longer than %d bytes", BLIP2_MAX_REQUEST_ID);
    if (check_text("request_id", r->request_id, st)) return BLIP2_EINVAL;
    blip2_code rc = map_decoding(r, max_new_tokens_limit, &job->dec, st);
    if (rc) return rc;
    if (r->decoding) {
        if (r->decoding->n_stop > 16)
            return blip2_fail(st, BLIP2_EINVAL, "at most 16 stop strings (got %zu)", r->decoding->n_stop);
        for (size_t i = 0; i < r->decoding->n_stop; i++)
            if (check_text("a stop string", r->decoding->stop[i], st)) return BLIP2_EINVAL;
        job->stop = (const char *const *)r->decoding->stop;
        job->n_stop = (int)r->decoding->n_stop;
    }
    job->image = r->image.data;
    job->image_len = r->image.len;
    job->prompt = prompt ? prompt : "";
    job->prompt_len = strlen(job->prompt);
    job->deadline_ns = dl;
    return BLIP2_OK;
}

