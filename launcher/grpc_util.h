/* Client-side gRPC calls over the core C API (grpc/grpc.h), shared by blip2-client and
 * blip2-bench. Messages are raw protobuf bytes (protobuf-c packs/unpacks them); methods are
 * paths like "/blip2.v1.Blip2/Generate". A channel may be used by many threads at once: every
 * call has its own completion queue. */
#ifndef BLIP2_GRPC_UTIL_H
#define BLIP2_GRPC_UTIL_H

#include <stddef.h>
#include <stdint.h>

typedef struct blip2_rpc_channel blip2_rpc_channel;

typedef struct {
    int code;      /* grpc_status_code: 0 OK, 3 INVALID_ARGUMENT, 4 DEADLINE_EXCEEDED, ... */
    char *details; /* the server's message (malloc'd, may be NULL) */
} blip2_rpc_status;

/* Calls grpc_init() once per process (thread-safe); blip2_rpc_shutdown() at exit is optional. */
void blip2_rpc_init(void);
void blip2_rpc_shutdown(void);

/* An insecure channel to "host:port" whose receive limit is max_message_bytes (0: 32 MiB).
 * NULL when the address cannot be parsed. Connecting is lazy (the first call). */
blip2_rpc_channel *blip2_rpc_connect(const char *addr, size_t max_message_bytes);
/* The same over TLS, trusting root_pem (PEM text); target_name overrides the name the server's
 * certificate must carry (NULL: the host part of addr). root_pem NULL: plaintext. */
blip2_rpc_channel *blip2_rpc_connect_tls(const char *addr, size_t max_message_bytes, const char *root_pem,
                                         const char *target_name);
void blip2_rpc_close(blip2_rpc_channel *ch);

/* Unary call. deadline_ms: relative timeout (0: none). On return status holds the call's status;
 * *reply (malloc'd, caller frees) holds the reply message when status->code == 0.
 * Returns status->code (or -1 when the call could not even be started). */
int blip2_rpc_unary(blip2_rpc_channel *ch, const char *method, const uint8_t *req, size_t req_len, int64_t deadline_ms,
                    uint8_t **reply, size_t *reply_len, blip2_rpc_status *status);

/* Server-streaming call: on_message(ctx, msg, len) for each reply message as it arrives (msg is
 * valid during the call only); a nonzero return cancels the call. Returns like blip2_rpc_unary. */
int blip2_rpc_stream(blip2_rpc_channel *ch, const char *method, const uint8_t *req, size_t req_len, int64_t deadline_ms,
                     int (*on_message)(void *ctx, const uint8_t *msg, size_t len), void *ctx, blip2_rpc_status *status);

void blip2_rpc_status_free(blip2_rpc_status *s);
const char *blip2_rpc_code_name(int code); /* "OK", "INVALID_ARGUMENT", ... */

#endif
