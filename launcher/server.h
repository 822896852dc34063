/* blip2d's gRPC adapter (rank 0): the only place that sees grpc/grpc.h and the generated protobuf
 * code on the server side. It serves /blip2.v1.Blip2/{Generate, GenerateStream, GenerateBatch,
 * ModelInfo} and /grpc.health.v1.Health/Check, and answers UNIMPLEMENTED for anything else.
 *
 * Threads: one completion-queue thread (cheap work only: re-arming, Health, ModelInfo, handing calls
 * on) and a small worker pool that unpacks and validates requests and calls blip2_engine_submit.
 * Replies are sent from the engine's callbacks (engine thread) and from the completion handlers.
 *
 * Lifecycle: blip2_server_start (Health NOT_SERVING, Generate UNAVAILABLE) → blip2_server_set_engine
 * once every rank has loaded (SERVING) → blip2_server_begin_shutdown (no new calls) → the engine
 * drains → blip2_server_destroy. */
#ifndef BLIP2_SERVER_H
#define BLIP2_SERVER_H

#include <stddef.h>

#include "../runtime/engine.h"
#include "../runtime/status.h"

enum { BLIP2_LOG_ERROR = 0, BLIP2_LOG_WARN, BLIP2_LOG_INFO, BLIP2_LOG_DEBUG };

typedef struct {
    const char *listen;       /* "host:port"; port 0 picks a free one */
    const char *model_dir;    /* reported by ModelInfo */
    size_t max_message_bytes; /* receive limit (larger messages: RESOURCE_EXHAUSTED from gRPC) */
    int max_new_tokens_limit; /* largest max_new_tokens a request may ask for */
    int workers;              /* request threads (0: 4) */
    int log_level;            /* BLIP2_LOG_* */
    const char *tls_cert_pem; /* with tls_key_pem: serve TLS (PEM text); NULL: plaintext */
    const char *tls_key_pem;
} blip2_server_opts;

typedef struct blip2_server blip2_server;

/* Binds, starts the threads and serves Health (NOT_SERVING) at once; *port is the bound port. */
blip2_code blip2_server_start(const blip2_server_opts *o, blip2_server **out, int *port, blip2_status *st);

/* The model is loaded on every rank: Generate* go to e from now on, Health says SERVING. m and eo
 * must outlive the server; tp_degree is reported by ModelInfo. */
void blip2_server_set_engine(blip2_server *s, blip2_engine *e, const blip2_model *m, int tp_degree,
                             const blip2_engine_opts *eo);

/* Any thread (not a signal handler): stop accepting calls (new ones are refused, Health says
 * NOT_SERVING); calls in flight carry on. Idempotent. */
void blip2_server_begin_shutdown(blip2_server *s);

/* After blip2_engine_run returned (every accepted job has been answered): waits up to grace_ms for
 * the last replies to go out, cancels what is left, stops the threads and frees everything (also
 * grpc_shutdown). */
void blip2_server_destroy(blip2_server *s, int grace_ms);

#endif
