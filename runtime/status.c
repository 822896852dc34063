#include "status.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

blip2_code blip2_fail(blip2_status *st, blip2_code code, const char *fmt, ...) {
    if (st) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(st->msg, sizeof st->msg, fmt, ap);
        va_end(ap);
        st->code = code;
    }
    return code;
}

blip2_code blip2_wrap(blip2_status *st, const char *fmt, ...) {
    if (!st) return BLIP2_EINTERNAL;
    char prefix[512], old[sizeof st->msg];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    memcpy(old, st->msg, sizeof old);
    snprintf(st->msg, sizeof st->msg, "%.*s: %.*s", 400, prefix, 600, old);
    return st->code;
}

const char *blip2_code_name(blip2_code code) {
    switch (code) {
    case BLIP2_OK: return "ok";
    case BLIP2_EINVAL: return "invalid argument";
    case BLIP2_EIO: return "i/o error";
    case BLIP2_EFORMAT: return "bad format";
    case BLIP2_ERANGE: return "out of range";
    case BLIP2_ENOMEM: return "out of memory";
    case BLIP2_EINTERNAL: return "internal error";
    case BLIP2_EBUSY: return "busy";
    case BLIP2_EUNAVAILABLE: return "unavailable";
    case BLIP2_ECANCELLED: return "cancelled";
    case BLIP2_EDEADLINE: return "deadline exceeded";
    }
    return "unknown";
}

void *blip2_malloc(size_t n, blip2_status *st) {
    void *p = malloc(n ? n : 1);
    if (!p) blip2_fail(st, BLIP2_ENOMEM, "out of memory allocating %zu bytes", n);
    return p;
}

void *blip2_calloc(size_t count, size_t size, blip2_status *st) {
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (!p) blip2_fail(st, BLIP2_ENOMEM, "out of memory allocating %zu x %zu bytes", count, size);
    return p;
}

double blip2_rss_mib(void) {
    FILE *fp = fopen("/proc/self/status", "r");
    char line[256];
    double kb = 0;
    while (fp && fgets(line, sizeof line, fp))
        if (sscanf(line, "VmRSS: %lf kB", &kb) == 1) break;
    if (fp) fclose(fp);
    return kb / 1024.0;
}
