/* Client-side gRPC calls over the core C API: one completion queue per call (pluck), so a channel
 * can be shared by many threads. See grpc_util.h. */
#include "grpc_util.h"

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>
#include <limits.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

struct blip2_rpc_channel {
    grpc_channel *ch;
};

static pthread_mutex_t init_mu = PTHREAD_MUTEX_INITIALIZER;
static int init_count;

void blip2_rpc_init(void) {
    pthread_mutex_lock(&init_mu);
    if (!init_count) { /* once per process; blip2_rpc_shutdown undoes it */
        grpc_init();
        init_count = 1;
    }
    pthread_mutex_unlock(&init_mu);
}

void blip2_rpc_shutdown(void) {
    pthread_mutex_lock(&init_mu);
    if (init_count > 0) {
        init_count = 0;
        grpc_shutdown();
    }
    pthread_mutex_unlock(&init_mu);
}

/* "host:port" with a numeric port (also "[v6]:port"); scheme targets (dns:, unix:, ipv4:, ...) are
 * left to gRPC's resolver. */
static int addr_ok(const char *a) {
    if (!a || !*a) return 0;
    if (strstr(a, ":///") || !strncmp(a, "unix:", 5) || !strncmp(a, "ipv4:", 5) || !strncmp(a, "ipv6:", 5) ||
        !strncmp(a, "dns:", 4))
        return 1;
    const char *colon = strrchr(a, ':');
    if (!colon || !colon[1]) return 0;
    long port = 0;
    for (const char *p = colon + 1; *p; p++) {
        if (*p < '0' || *p > '9') return 0;
        port = port * 10 + (*p - '0');
        if (port > 65535) return 0;
    }
    return port > 0;
}

blip2_rpc_channel *blip2_rpc_connect(const char *addr, size_t max_message_bytes) {
    return blip2_rpc_connect_tls(addr, max_message_bytes, NULL, NULL);
}

blip2_rpc_channel *blip2_rpc_connect_tls(const char *addr, size_t max_message_bytes, const char *root_pem,
                                         const char *target_name) {
    if (!addr_ok(addr)) return NULL;
    blip2_rpc_init();
    blip2_rpc_channel *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    size_t lim = max_message_bytes ? max_message_bytes : (size_t)32 << 20;
    grpc_arg args[2];
    args[0].type = GRPC_ARG_INTEGER;
    args[0].key = (char *)GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
    args[0].value.integer = lim > INT_MAX ? INT_MAX : (int)lim;
    args[1].type = GRPC_ARG_STRING;
    args[1].key = (char *)GRPC_SSL_TARGET_NAME_OVERRIDE_ARG;
    args[1].value.string = (char *)target_name;
    grpc_channel_args cargs = {target_name ? 2 : 1, args};
    grpc_channel_credentials *creds = root_pem ? grpc_ssl_credentials_create(root_pem, NULL, NULL, NULL)
                                               : grpc_insecure_credentials_create();
    c->ch = creds ? grpc_channel_create(addr, creds, &cargs) : NULL;
    if (creds) grpc_channel_credentials_release(creds);
    if (!c->ch) {
        free(c);
        return NULL;
    }
    return c;
}

void blip2_rpc_close(blip2_rpc_channel *ch) {
    if (!ch) return;
    grpc_channel_destroy(ch->ch);
    free(ch);
}

void blip2_rpc_status_free(blip2_rpc_status *s) {
    if (!s) return;
    free(s->details);
    s->details = NULL;
}

const char *blip2_rpc_code_name(int code) {
    static const char *names[] = {"OK",
                                  "CANCELLED",
                                  "UNKNOWN",
                                  "INVALID_ARGUMENT",
                                  "DEADLINE_EXCEEDED",
                                  "NOT_FOUND",
                                  "ALREADY_EXISTS",
                                  "PERMISSION_DENIED",
                                  "RESOURCE_EXHAUSTED",
                                  "FAILED_PRECONDITION",
                                  "ABORTED",
                                  "OUT_OF_RANGE",
                                  "UNIMPLEMENTED",
                                  "INTERNAL",
                                  "UNAVAILABLE",
                                  "DATA_LOSS",
                                  "UNAUTHENTICATED"};
    if (code >= 0 && code < (int)(sizeof names / sizeof names[0])) return names[code];
    return code < 0 ? "NOT_STARTED" : "UNKNOWN_CODE";
}

/* ---------------------------------------------------------------- one call */

typedef struct {
    grpc_completion_queue *cq;
    grpc_call *call;
    grpc_metadata_array md_initial, md_trailing;
    grpc_status_code code;
    grpc_slice details;
    const char *error_string;
    int have_status_ops;
} rpc_call;

static int call_start(blip2_rpc_channel *ch, const char *method, int64_t deadline_ms, rpc_call *c) {
    memset(c, 0, sizeof *c);
    grpc_metadata_array_init(&c->md_initial);
    grpc_metadata_array_init(&c->md_trailing);
    c->details = grpc_empty_slice();
    if (!ch || !method) return -1;
    c->cq = grpc_completion_queue_create_for_pluck(NULL);
    gpr_timespec deadline = deadline_ms > 0 ? gpr_time_add(gpr_now(GPR_CLOCK_REALTIME),
                                                           gpr_time_from_millis(deadline_ms, GPR_TIMESPAN))
                                            : gpr_inf_future(GPR_CLOCK_REALTIME);
    grpc_slice m = grpc_slice_from_copied_string(method);
    c->call = grpc_channel_create_call(ch->ch, NULL, GRPC_PROPAGATE_DEFAULTS, c->cq, m, NULL, deadline, NULL);
    grpc_slice_unref(m);
    return c->call ? 0 : -1;
}

static grpc_event call_wait(rpc_call *c, void *tag) {
    return grpc_completion_queue_pluck(c->cq, tag, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
}

static char *slice_to_malloc(grpc_slice s) {
    size_t n = GRPC_SLICE_LENGTH(s);
    char *out = malloc(n + 1);
    if (!out) return NULL;
    memcpy(out, GRPC_SLICE_START_PTR(s), n);
    out[n] = 0;
    return out;
}

/* Fills status from the received status (or a local failure when code < 0). */
static int call_finish(rpc_call *c, int code_override, const char *why, blip2_rpc_status *status) {
    status->code = code_override >= 0 ? (int)c->code : code_override;
    status->details = NULL;
    if (code_override < 0) {
        status->details = why ? strdup(why) : NULL;
    } else if (GRPC_SLICE_LENGTH(c->details) > 0) {
        status->details = slice_to_malloc(c->details);
    } else if (status->code != 0 && c->error_string) {
        status->details = strdup(c->error_string);
    }
    if (c->error_string) gpr_free((void *)c->error_string);
    grpc_slice_unref(c->details);
    grpc_metadata_array_destroy(&c->md_initial);
    grpc_metadata_array_destroy(&c->md_trailing);
    if (c->call) grpc_call_unref(c->call);
    if (c->cq) {
        grpc_completion_queue_shutdown(c->cq);
        while (grpc_completion_queue_pluck(c->cq, NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
               GRPC_QUEUE_SHUTDOWN) {
        }
        grpc_completion_queue_destroy(c->cq);
    }
    return status->code;
}

static grpc_byte_buffer *make_bb(const uint8_t *req, size_t len) {
    grpc_slice s = grpc_slice_from_copied_buffer((const char *)req, len);
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1);
    grpc_slice_unref(s);
    return bb;
}

/* Copies a received message into one malloc'd buffer. */
static int read_bb(grpc_byte_buffer *bb, uint8_t **out, size_t *len) {
    grpc_byte_buffer_reader r;
    *out = NULL;
    *len = 0;
    if (!grpc_byte_buffer_reader_init(&r, bb)) return -1;
    grpc_slice s = grpc_byte_buffer_reader_readall(&r);
    grpc_byte_buffer_reader_destroy(&r);
    size_t n = GRPC_SLICE_LENGTH(s);
    uint8_t *buf = malloc(n ? n : 1);
    if (buf) memcpy(buf, GRPC_SLICE_START_PTR(s), n);
    grpc_slice_unref(s);
    if (!buf) return -1;
    *out = buf;
    *len = n;
    return 0;
}

int blip2_rpc_unary(blip2_rpc_channel *ch, const char *method, const uint8_t *req, size_t req_len, int64_t deadline_ms,
                    uint8_t **reply, size_t *reply_len, blip2_rpc_status *status) {
    rpc_call c;
    *reply = NULL;
    *reply_len = 0;
    if (call_start(ch, method, deadline_ms, &c)) return call_finish(&c, -1, "cannot create the call", status);
    grpc_byte_buffer *send = make_bb(req, req_len), *recv = NULL;
    grpc_op ops[6];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = send;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &c.md_initial;
    ops[4].op = GRPC_OP_RECV_MESSAGE;
    ops[4].data.recv_message.recv_message = &recv;
    ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[5].data.recv_status_on_client.trailing_metadata = &c.md_trailing;
    ops[5].data.recv_status_on_client.status = &c.code;
    ops[5].data.recv_status_on_client.status_details = &c.details;
    ops[5].data.recv_status_on_client.error_string = &c.error_string;
    static int tag;
    grpc_call_error err = grpc_call_start_batch(c.call, ops, 6, &tag, NULL);
    if (err != GRPC_CALL_OK) {
        grpc_byte_buffer_destroy(send);
        return call_finish(&c, -1, "grpc_call_start_batch failed", status);
    }
    call_wait(&c, &tag);
    grpc_byte_buffer_destroy(send);
    if (recv) {
        if (c.code == GRPC_STATUS_OK && read_bb(recv, reply, reply_len)) {
            c.code = GRPC_STATUS_INTERNAL;
            grpc_slice_unref(c.details);
            c.details = grpc_slice_from_static_string("client: out of memory reading the reply");
        }
        grpc_byte_buffer_destroy(recv);
    } else if (c.code == GRPC_STATUS_OK) { /* OK without a message: an empty reply */
        *reply = malloc(1);
    }
    return call_finish(&c, 0, NULL, status);
}

int blip2_rpc_stream(blip2_rpc_channel *ch, const char *method, const uint8_t *req, size_t req_len, int64_t deadline_ms,
                     int (*on_message)(void *ctx, const uint8_t *msg, size_t len), void *ctx, blip2_rpc_status *status) {
    rpc_call c;
    if (call_start(ch, method, deadline_ms, &c)) return call_finish(&c, -1, "cannot create the call", status);
    static int tag_start, tag_msg, tag_status;
    grpc_byte_buffer *send = make_bb(req, req_len);
    grpc_op ops[4];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = send;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &c.md_initial;
    if (grpc_call_start_batch(c.call, ops, 4, &tag_start, NULL) != GRPC_CALL_OK) {
        grpc_byte_buffer_destroy(send);
        return call_finish(&c, -1, "grpc_call_start_batch failed", status);
    }
    /* The status op runs alongside the reads; it completes when the call ends. */
    grpc_op sop;
    memset(&sop, 0, sizeof sop);
    sop.op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    sop.data.recv_status_on_client.trailing_metadata = &c.md_trailing;
    sop.data.recv_status_on_client.status = &c.code;
    sop.data.recv_status_on_client.status_details = &c.details;
    sop.data.recv_status_on_client.error_string = &c.error_string;
    if (grpc_call_start_batch(c.call, &sop, 1, &tag_status, NULL) != GRPC_CALL_OK) {
        grpc_call_cancel(c.call, NULL);
        call_wait(&c, &tag_start);
        grpc_byte_buffer_destroy(send);
        return call_finish(&c, -1, "grpc_call_start_batch failed", status);
    }
    grpc_event ev = call_wait(&c, &tag_start);
    grpc_byte_buffer_destroy(send);
    int local_err = 0;
    while (ev.success) {
        grpc_byte_buffer *recv = NULL;
        grpc_op rop;
        memset(&rop, 0, sizeof rop);
        rop.op = GRPC_OP_RECV_MESSAGE;
        rop.data.recv_message.recv_message = &recv;
        if (grpc_call_start_batch(c.call, &rop, 1, &tag_msg, NULL) != GRPC_CALL_OK) break;
        ev = call_wait(&c, &tag_msg);
        if (!recv) break; /* end of stream (or failure: the status says which) */
        uint8_t *msg = NULL;
        size_t len = 0;
        int rc = read_bb(recv, &msg, &len);
        grpc_byte_buffer_destroy(recv);
        if (rc) local_err = 1;
        int stop = rc || (on_message && on_message(ctx, msg, len));
        free(msg);
        if (stop) {
            grpc_call_cancel(c.call, NULL);
            break;
        }
    }
    call_wait(&c, &tag_status);
    if (local_err && c.code == GRPC_STATUS_CANCELLED) {
        c.code = GRPC_STATUS_INTERNAL;
        grpc_slice_unref(c.details);
        c.details = grpc_slice_from_static_string("client: out of memory reading a message");
    }
    return call_finish(&c, 0, NULL, status);
}
