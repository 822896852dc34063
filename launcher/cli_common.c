#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "cli.h"

int blip2_cli_error(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "blip2: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    return 1;
}

int blip2_cli_parse_int(const char *s, long lo, long hi, int *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) return 1;
    *out = (int)v;
    return 0;
}

blip2_code blip2_cli_parse_ids(const char *s, int32_t **ids, int *n, blip2_status *st) {
    size_t cap = 1;
    for (const char *p = s; *p; p++) cap += *p == ',';
    *ids = blip2_malloc(cap * sizeof(int32_t), st);
    if (!*ids) return BLIP2_ENOMEM;
    *n = 0;
    const char *p = s;
    while (*p) {
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (errno || end == p || v < 0 || v > INT32_MAX || (*end && *end != ','))
            return blip2_fail(st, BLIP2_EINVAL, "--input-ids: '%s' is not a comma-separated list of token ids", s);
        (*ids)[(*n)++] = (int32_t)v;
        p = *end ? end + 1 : end;
    }
    if (*n == 0) return blip2_fail(st, BLIP2_EINVAL, "--input-ids: empty list");
    return BLIP2_OK;
}
