/* Errors are values: every fallible function returns a blip2_code and fills a
 * blip2_status with a message that names what failed (file, tensor, expected
 * vs found). The launcher maps codes to exit codes / gRPC statuses. */
#ifndef BLIP2_STATUS_H
#define BLIP2_STATUS_H

#include <stddef.h>

typedef enum {
    BLIP2_OK = 0,
    BLIP2_EINVAL,    /* bad argument or request (caller's fault) */
    BLIP2_EIO,       /* file missing / unreadable */
    BLIP2_EFORMAT,   /* malformed file contents (config, safetensors, image) */
    BLIP2_ERANGE,    /* a limit was exceeded (size, length, pixel count) */
    BLIP2_ENOMEM,    /* allocation failed */
    BLIP2_EINTERNAL, /* a bug or a backend failure */
    BLIP2_EBUSY,     /* the queue is full: try again later */
    BLIP2_EUNAVAILABLE, /* loading or shutting down */
    BLIP2_ECANCELLED,   /* the client went away */
    BLIP2_EDEADLINE,    /* the request's deadline passed */
} blip2_code;

typedef struct {
    blip2_code code;
    char msg[1024];
} blip2_status;

/* Sets st (if non-NULL) and returns code, so callers can `return blip2_fail(...)`. */
blip2_code blip2_fail(blip2_status *st, blip2_code code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Prefixes an existing message with context ("loading X: <old message>"). */
blip2_code blip2_wrap(blip2_status *st, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
const char *blip2_code_name(blip2_code code);

/* Allocation helpers that fail into a status instead of aborting. */
void *blip2_malloc(size_t n, blip2_status *st);
void *blip2_calloc(size_t count, size_t size, blip2_status *st);

/* This process's resident memory now (VmRSS), in MiB; 0 where /proc is not there. */
double blip2_rss_mib(void);

#endif
