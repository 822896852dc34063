/* A GenerateRequest (protobuf-c) → an engine job; the text checks the gRPC adapter needs. */
#ifndef BLIP2_REQUEST_H
#define BLIP2_REQUEST_H

#include <stddef.h>
#include <stdint.h>

#include "../runtime/engine.h"
#include "blip2.pb-c.h"

#define BLIP2_MAX_REQUEST_ID 128

/* Offset of the first byte that breaks strict UTF-8 (no overlongs, surrogates or code points
 * above U+10FFFF), or n when all of s[0..n) is valid. */
size_t blip2_utf8_check(const unsigned char *s, size_t n);
/* A valid-UTF-8 copy (each bad byte becomes U+FFFD): protobuf strings must be UTF-8. */
char *blip2_utf8_copy(const char *s, size_t n);

/* Checks one request (image present, UTF-8 texts, request id length, decoding parameters within
 * range and max_new_tokens within the server's limit, stop strings) and fills the job with
 * pointers into r; prompt is r->prompt or one of r->prompts; dl the deadline (CLOCK_MONOTONIC ns,
 * 0: none). EINVAL with a message saying what is wrong. */
blip2_code blip2_request_to_job(const Blip2__V1__GenerateRequest *r, int max_new_tokens_limit, const char *prompt,
                                int64_t dl, blip2_job *job, blip2_status *st);

#endif
