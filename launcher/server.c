/* blip2d's gRPC adapter: gRPC core (grpc/grpc.h) + protobuf-c on one side, the engine
 * (runtime/engine.h) on the other. See server.h for the threads and the lifecycle.
 *
 * Every call is a call_ctx holding tags (small state machines run by the completion-queue thread)
 * and a reference count: one reference for the request's own path (dropped once the final status
 * is queued), one for the RECV_CLOSE_ON_SERVER op, one for each send batch in flight. Sends go
 * through a per-call queue, so at most one send batch is outstanding per call (streaming). */
#include "server.h"

#include "grpc_util.h"
#include "request.h"

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../runtime/model.h"
#include "../runtime/safetensors.h"
#include "blip2.pb-c.h"
#include "health.pb-c.h"

#define CONTAINER_OF(p, type, member) ((type *)(void *)((char *)(p)-offsetof(type, member)))
#define MAX_PROMPTS 64
#define MAX_BATCH_ITEMS 256

typedef struct tag {
    void (*fn)(struct tag *t, int ok);
} tag_t;

enum { M_GENERATE, M_STREAM, M_BATCH, M_INFO, M_HEALTH, M_COUNT };
static const char *const method_path[M_COUNT] = {"/blip2.v1.Blip2/Generate", "/blip2.v1.Blip2/GenerateStream",
                                                  "/blip2.v1.Blip2/GenerateBatch", "/blip2.v1.Blip2/ModelInfo",
                                                  "/grpc.health.v1.Health/Check"};
static const char *const method_name[M_COUNT] = {"Generate", "GenerateStream", "GenerateBatch", "ModelInfo",
                                                 "Health.Check"};
static const int method_armed[M_COUNT] = {16, 16, 4, 2, 4}; /* requests kept armed per method */
#define GENERIC_ARMED 2

enum { ST_LOADING, ST_SERVING, ST_STOPPING };

typedef struct call_ctx call_ctx;

struct blip2_server {
    blip2_server_opts o;
    char *listen, *model_dir;
    grpc_server *srv;
    grpc_completion_queue *cq;
    void *mreg[M_COUNT];
    pthread_t cq_thread;
    int cq_started;
    pthread_t *workers;
    int n_workers;
    atomic_int state;
    /* set once by blip2_server_set_engine, before state becomes SERVING */
    blip2_engine *engine;
    const blip2_model *m;
    int tp_degree;
    blip2_engine_opts eo;
    /* arming stops once shutdown has started */
    pthread_mutex_t arm_mu;
    int shutdown_started;
    tag_t t_shutdown;
    pthread_mutex_t sd_mu;
    pthread_cond_t sd_cv;
    int shutdown_done;
    /* the workers' queue */
    pthread_mutex_t wq_mu;
    pthread_cond_t wq_cv;
    call_ctx *wq_head, *wq_tail;
    int wq_stop;
    atomic_uint_fast64_t next_id;
};

/* ---------------------------------------------------------------- logging */

static void slog(const blip2_server *s, int level, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void slog(const blip2_server *s, int level, const char *fmt, ...) {
    if (level > s->o.log_level) return;
    char buf[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    for (char *p = buf; *p; p++) /* one line per event, whatever the client sent */
        if ((unsigned char)*p < 0x20) *p = ' ';
    fprintf(stderr, "blip2d: %s\n", buf);
}

/* ---------------------------------------------------------------- text helpers */

/* ---------------------------------------------------------------- byte buffers */

static grpc_byte_buffer *pack_msg(const ProtobufCMessage *m) {
    size_t n = protobuf_c_message_get_packed_size(m);
    uint8_t *buf = malloc(n ? n : 1);
    if (!buf) return NULL;
    protobuf_c_message_pack(m, buf);
    grpc_slice sl = grpc_slice_new(buf, n, free);
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&sl, 1);
    grpc_slice_unref(sl);
    return bb;
}

/* Unpacks the request message; NULL when there is none or it does not parse. */
static ProtobufCMessage *unpack_msg(const ProtobufCMessageDescriptor *d, grpc_byte_buffer *bb) {
    if (!bb) return NULL;
    grpc_byte_buffer_reader r;
    if (!grpc_byte_buffer_reader_init(&r, bb)) return NULL;
    grpc_slice sl = grpc_byte_buffer_reader_readall(&r);
    grpc_byte_buffer_reader_destroy(&r);
    ProtobufCMessage *m = protobuf_c_message_unpack(d, NULL, GRPC_SLICE_LENGTH(sl), GRPC_SLICE_START_PTR(sl));
    grpc_slice_unref(sl);
    return m;
}

/* ---------------------------------------------------------------- calls */

typedef struct send_item {
    struct send_item *next;
    grpc_byte_buffer *msg; /* may be NULL */
    int final;             /* carries the status */
    grpc_status_code code;
    grpc_slice details;
} send_item;

typedef struct {
    uint32_t *ids;
    int n_ids;
    char *text; /* valid UTF-8 */
    float score;
    blip2_finish finish;
} seq_copy;

typedef struct {
    call_ctx *c;
    int index;
    blip2_code code;
    char *message;
    seq_copy *seqs;
    int n_seqs;
    int prompt_tokens;
    blip2_timings t;
} job_slot;

struct call_ctx {
    tag_t t_new, t_close, t_send;
    blip2_server *s;
    int method;
    grpc_call *call;
    gpr_timespec deadline;
    grpc_metadata_array md;
    grpc_byte_buffer *payload;
    int close_cancelled;
    atomic_int cancelled;
    atomic_int refs;
    int64_t t_recv, deadline_ns;
    /* sends */
    pthread_mutex_t mu;
    send_item *sq_head, *sq_tail, *in_flight;
    int sent_md, dead, final_queued;
    /* work */
    call_ctx *wnext;
    int phase;
    /* request */
    Blip2__V1__GenerateRequest *greq;
    Blip2__V1__GenerateBatchRequest *breq;
    char rid[BLIP2_MAX_REQUEST_ID + 32];
    job_slot *slots;
    int n_slots;
    atomic_int remaining;
    int n_streamed; /* engine thread only */
};

static void on_new_call(tag_t *t, int ok);
static void on_close(tag_t *t, int ok);
static void on_send(tag_t *t, int ok);

static call_ctx *ctx_new(blip2_server *s, int method) {
    call_ctx *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->t_new.fn = on_new_call;
    c->t_close.fn = on_close;
    c->t_send.fn = on_send;
    c->s = s;
    c->method = method;
    grpc_metadata_array_init(&c->md);
    pthread_mutex_init(&c->mu, NULL);
    atomic_init(&c->refs, 1);
    atomic_init(&c->cancelled, 0);
    atomic_init(&c->remaining, 0);
    return c;
}

static void item_free(send_item *it) {
    if (!it) return;
    if (it->msg) grpc_byte_buffer_destroy(it->msg);
    grpc_slice_unref(it->details);
    free(it);
}

static void ctx_free(call_ctx *c) {
    while (c->sq_head) {
        send_item *it = c->sq_head;
        c->sq_head = it->next;
        item_free(it);
    }
    item_free(c->in_flight);
    for (int i = 0; i < c->n_slots; i++) {
        job_slot *j = &c->slots[i];
        free(j->message);
        for (int k = 0; k < j->n_seqs; k++) {
            free(j->seqs[k].ids);
            free(j->seqs[k].text);
        }
        free(j->seqs);
    }
    free(c->slots);
    if (c->greq) blip2__v1__generate_request__free_unpacked(c->greq, NULL);
    if (c->breq) blip2__v1__generate_batch_request__free_unpacked(c->breq, NULL);
    if (c->payload) grpc_byte_buffer_destroy(c->payload);
    grpc_metadata_array_destroy(&c->md);
    if (c->call) grpc_call_unref(c->call);
    pthread_mutex_destroy(&c->mu);
    free(c);
}

static void ctx_ref(call_ctx *c) { atomic_fetch_add(&c->refs, 1); }
static void ctx_unref(call_ctx *c) {
    if (atomic_fetch_sub(&c->refs, 1) == 1) ctx_free(c);
}

/* Starts the next queued send when none is in flight. Caller holds c->mu and a reference that
 * outlives the lock (so the failure path never frees c here). */
static void pump_locked(call_ctx *c) {
    while (!c->in_flight && c->sq_head && !c->dead) {
        send_item *it = c->sq_head;
        c->sq_head = it->next;
        if (!c->sq_head) c->sq_tail = NULL;
        grpc_op ops[3];
        memset(ops, 0, sizeof ops);
        size_t n = 0;
        if (!c->sent_md) ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
        if (it->msg) {
            ops[n].op = GRPC_OP_SEND_MESSAGE;
            ops[n++].data.send_message.send_message = it->msg;
        }
        if (it->final) {
            ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
            ops[n].data.send_status_from_server.status = it->code;
            ops[n++].data.send_status_from_server.status_details = &it->details;
        }
        c->in_flight = it;
        ctx_ref(c);
        grpc_call_error err = grpc_call_start_batch(c->call, ops, n, &c->t_send, NULL);
        if (err != GRPC_CALL_OK) {
            slog(c->s, BLIP2_LOG_WARN, "req %s: grpc_call_start_batch failed (%d)", c->rid, (int)err);
            c->in_flight = NULL;
            c->dead = 1;
            item_free(it);
            atomic_fetch_sub(&c->refs, 1); /* never the last: the caller holds one */
            break;
        }
        c->sent_md = 1;
    }
}

/* Queues a message and/or the final status (msg is owned from here on). */
static void call_send(call_ctx *c, grpc_byte_buffer *msg, int final, grpc_status_code code, const char *details) {
    send_item *it = calloc(1, sizeof *it);
    if (!it) {
        if (msg) grpc_byte_buffer_destroy(msg);
        return;
    }
    it->msg = msg;
    it->final = final;
    it->code = code;
    it->details = details && *details ? grpc_slice_from_copied_string(details) : grpc_empty_slice();
    pthread_mutex_lock(&c->mu);
    if (c->dead || c->final_queued) {
        pthread_mutex_unlock(&c->mu);
        item_free(it);
        return;
    }
    if (c->sq_tail) c->sq_tail->next = it;
    else c->sq_head = it;
    c->sq_tail = it;
    if (final) c->final_queued = 1;
    pump_locked(c);
    pthread_mutex_unlock(&c->mu);
}

static void on_send(tag_t *t, int ok) {
    call_ctx *c = CONTAINER_OF(t, call_ctx, t_send);
    pthread_mutex_lock(&c->mu);
    send_item *done = c->in_flight;
    c->in_flight = NULL;
    if (!ok) { /* the call is gone (cancelled, deadline, connection): stop its work */
        c->dead = 1;
        atomic_store(&c->cancelled, 1);
    } else {
        pump_locked(c);
    }
    pthread_mutex_unlock(&c->mu);
    item_free(done);
    ctx_unref(c);
}

static void on_close(tag_t *t, int ok) {
    call_ctx *c = CONTAINER_OF(t, call_ctx, t_close);
    if (!ok || c->close_cancelled) atomic_store(&c->cancelled, 1);
    ctx_unref(c);
}

static grpc_status_code map_code(blip2_code rc) {
    switch (rc) {
    case BLIP2_OK: return GRPC_STATUS_OK;
    case BLIP2_EINVAL:
    case BLIP2_ERANGE:
    case BLIP2_EFORMAT: return GRPC_STATUS_INVALID_ARGUMENT;
    case BLIP2_EBUSY: return GRPC_STATUS_RESOURCE_EXHAUSTED;
    case BLIP2_EUNAVAILABLE: return GRPC_STATUS_UNAVAILABLE;
    case BLIP2_EDEADLINE: return GRPC_STATUS_DEADLINE_EXCEEDED;
    case BLIP2_ECANCELLED: return GRPC_STATUS_CANCELLED;
    default: return GRPC_STATUS_INTERNAL;
    }
}


static double ms_since(int64_t t0) { return (double)(blip2_now_ns() - t0) / 1e6; }

/* The request's path ends: queue the final status (and message) and drop its reference. */
static void call_finish(call_ctx *c, grpc_byte_buffer *msg, grpc_status_code code, const char *details) {
    call_send(c, msg, 1, code, details);
    ctx_unref(c);
}

/* An error reply for the request path, logged. */
static void call_fail(call_ctx *c, grpc_status_code code, const char *details) {
    slog(c->s, BLIP2_LOG_INFO, "req %s %s %s total_ms=%.1f: %s",
         c->rid[0] ? c->rid : "-", method_name[c->method], blip2_rpc_code_name((int)code), ms_since(c->t_recv), details);
    call_finish(c, NULL, code, details);
}

/* ---------------------------------------------------------------- arming */

static void arm(blip2_server *s, int method) {
    pthread_mutex_lock(&s->arm_mu);
    if (!s->shutdown_started) {
        call_ctx *c = ctx_new(s, method);
        if (c) {
            grpc_call_error err = grpc_server_request_registered_call(s->srv, s->mreg[method], &c->call, &c->deadline,
                                                                      &c->md, &c->payload, s->cq, s->cq, &c->t_new);
            if (err != GRPC_CALL_OK) {
                slog(s, BLIP2_LOG_ERROR, "cannot arm %s (%d)", method_path[method], (int)err);
                ctx_free(c);
            }
        }
    }
    pthread_mutex_unlock(&s->arm_mu);
}

typedef struct {
    tag_t t_new, t_done;
    blip2_server *s;
    grpc_call *call;
    grpc_call_details details;
    grpc_metadata_array md;
    int cancelled;
    grpc_slice msg;
} generic_ctx;

static void on_generic_new(tag_t *t, int ok);
static void on_generic_done(tag_t *t, int ok);

static void generic_free(generic_ctx *g) {
    grpc_slice_unref(g->msg);
    grpc_call_details_destroy(&g->details);
    grpc_metadata_array_destroy(&g->md);
    if (g->call) grpc_call_unref(g->call);
    free(g);
}

static void arm_generic(blip2_server *s) {
    pthread_mutex_lock(&s->arm_mu);
    if (!s->shutdown_started) {
        generic_ctx *g = calloc(1, sizeof *g);
        if (g) {
            g->t_new.fn = on_generic_new;
            g->t_done.fn = on_generic_done;
            g->s = s;
            g->msg = grpc_empty_slice();
            grpc_call_details_init(&g->details);
            grpc_metadata_array_init(&g->md);
            if (grpc_server_request_call(s->srv, &g->call, &g->details, &g->md, s->cq, s->cq, &g->t_new) != GRPC_CALL_OK)
                generic_free(g);
        }
    }
    pthread_mutex_unlock(&s->arm_mu);
}

/* Any method we do not serve: UNIMPLEMENTED at once (without this the call would hang). */
static void on_generic_new(tag_t *t, int ok) {
    generic_ctx *g = CONTAINER_OF(t, generic_ctx, t_new);
    blip2_server *s = g->s;
    if (!ok) {
        generic_free(g);
        return;
    }
    arm_generic(s);
    char *method = grpc_slice_to_c_string(g->details.method);
    char text[512];
    snprintf(text, sizeof text, "unknown method %.400s", method ? method : "?");
    slog(s, BLIP2_LOG_INFO, "req - %.400s UNIMPLEMENTED", method ? method : "?");
    gpr_free(method);
    g->msg = grpc_slice_from_copied_string(text);
    grpc_op ops[3];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[1].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    ops[1].data.send_status_from_server.status = GRPC_STATUS_UNIMPLEMENTED;
    ops[1].data.send_status_from_server.status_details = &g->msg;
    ops[2].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    ops[2].data.recv_close_on_server.cancelled = &g->cancelled;
    if (grpc_call_start_batch(g->call, ops, 3, &g->t_done, NULL) != GRPC_CALL_OK) generic_free(g);
}

static void on_generic_done(tag_t *t, int ok) {
    (void)ok;
    generic_free(CONTAINER_OF(t, generic_ctx, t_done));
}

/* ---------------------------------------------------------------- work queue */

static void wq_push(blip2_server *s, call_ctx *c) {
    pthread_mutex_lock(&s->wq_mu);
    c->wnext = NULL;
    if (s->wq_tail) s->wq_tail->wnext = c;
    else s->wq_head = c;
    s->wq_tail = c;
    pthread_cond_signal(&s->wq_cv);
    pthread_mutex_unlock(&s->wq_mu);
}

/* ---------------------------------------------------------------- engine callbacks */

static int cb_is_cancelled(void *ctx) {
    job_slot *j = ctx;
    return atomic_load(&j->c->cancelled);
}

static void cb_on_token(void *ctx, int32_t id, const char *piece, size_t len) {
    job_slot *j = ctx;
    call_ctx *c = j->c;
    Blip2__V1__GenerateStreamReply m = BLIP2__V1__GENERATE_STREAM_REPLY__INIT;
    uint32_t tid = (uint32_t)id;
    char *text = blip2_utf8_copy(piece, len);
    m.text = text ? text : (char *)"";
    m.n_token_ids = 1;
    m.token_ids = &tid;
    grpc_byte_buffer *bb = pack_msg(&m.base);
    free(text);
    c->n_streamed++;
    if (bb) call_send(c, bb, 0, GRPC_STATUS_OK, NULL);
}

static void slot_store(job_slot *j, const blip2_result *res) {
    j->code = res->code;
    j->prompt_tokens = res->prompt_tokens;
    j->t = res->timings;
    if (res->code != BLIP2_OK) {
        j->message = strdup(res->message ? res->message : blip2_code_name(res->code));
        return;
    }
    j->seqs = calloc(res->n_seqs > 0 ? (size_t)res->n_seqs : 1, sizeof *j->seqs);
    if (!j->seqs) {
        j->code = BLIP2_ENOMEM;
        j->message = strdup("out of memory copying the result");
        return;
    }
    j->n_seqs = res->n_seqs;
    for (int i = 0; i < res->n_seqs; i++) {
        const blip2_sequence_out *o = &res->seqs[i];
        seq_copy *q = &j->seqs[i];
        q->ids = malloc(sizeof(uint32_t) * (o->n_ids > 0 ? (size_t)o->n_ids : 1));
        q->text = blip2_utf8_copy(o->text, o->text ? o->text_len : 0);
        if (!q->ids || !q->text) {
            j->code = BLIP2_ENOMEM;
            j->message = strdup("out of memory copying the result");
            return;
        }
        for (int k = 0; k < o->n_ids; k++) q->ids[k] = (uint32_t)o->ids[k];
        q->n_ids = o->n_ids;
        q->score = o->score;
        q->finish = o->finish;
    }
}

static void slot_fail(job_slot *j, blip2_code code, const char *msg) {
    j->code = code;
    free(j->message);
    j->message = strdup(msg);
}

static Blip2__V1__FinishReason finish_reason(blip2_finish f) {
    switch (f) {
    case BLIP2_FINISH_EOS: return BLIP2__V1__FINISH_REASON__FINISH_REASON_EOS;
    case BLIP2_FINISH_LENGTH: return BLIP2__V1__FINISH_REASON__FINISH_REASON_LENGTH;
    case BLIP2_FINISH_STOP: return BLIP2__V1__FINISH_REASON__FINISH_REASON_STOP;
    case BLIP2_FINISH_CANCELLED: return BLIP2__V1__FINISH_REASON__FINISH_REASON_CANCELLED;
    }
    return BLIP2__V1__FINISH_REASON__FINISH_REASON_UNSPECIFIED;
}

static const char *finish_str(blip2_finish f) {
    switch (f) {
    case BLIP2_FINISH_EOS: return "eos";
    case BLIP2_FINISH_LENGTH: return "length";
    case BLIP2_FINISH_STOP: return "stop";
    case BLIP2_FINISH_CANCELLED: return "cancelled";
    }
    return "?";
}

/* Fills a GenerateReply from slots[0..n) (answers: one per slot when n > 1, or one per returned
 * sequence). Everything it allocates is freed by reply_free. */
typedef struct {
    Blip2__V1__GenerateReply r;
    Blip2__V1__Usage usage;
    Blip2__V1__Timings timings;
    Blip2__V1__Answer *answers;
    Blip2__V1__Usage *ausage;
    Blip2__V1__Answer **aptr;
} reply_buf;

static int reply_fill(reply_buf *b, const job_slot *slots, int n, const char *rid, int64_t t_recv) {
    memset(b, 0, sizeof *b);
    blip2__v1__generate_reply__init(&b->r);
    blip2__v1__usage__init(&b->usage);
    blip2__v1__timings__init(&b->timings);
    const seq_copy *first = &slots[0].seqs[0];
    b->r.text = first->text;
    b->r.n_token_ids = (size_t)first->n_ids;
    b->r.token_ids = first->ids;
    b->r.finish_reason = finish_reason(first->finish);
    b->r.request_id = (char *)rid;
    uint32_t gen = 0;
    for (int i = 0; i < n; i++) gen += (uint32_t)slots[i].seqs[0].n_ids;
    b->usage.prompt_tokens = (uint32_t)slots[0].prompt_tokens;
    b->usage.generated_tokens = gen;
    b->r.usage = &b->usage;
    for (int i = 0; i < n; i++) {
        b->timings.queue_ms += slots[i].t.queue_ms;
        b->timings.image_ms += slots[i].t.image_ms;
        b->timings.prefill_ms += slots[i].t.prefill_ms;
        b->timings.decode_ms += slots[i].t.decode_ms;
    }
    b->timings.total_ms = ms_since(t_recv);
    b->timings.image_cached = slots[0].t.image_cached != 0;
    b->r.timings = &b->timings;
    int na = n > 1 ? n : (slots[0].n_seqs > 1 ? slots[0].n_seqs : 0);
    if (!na) return 0;
    b->answers = calloc((size_t)na, sizeof *b->answers);
    b->ausage = calloc((size_t)na, sizeof *b->ausage);
    b->aptr = calloc((size_t)na, sizeof *b->aptr);
    if (!b->answers || !b->ausage || !b->aptr) return -1;
    for (int i = 0; i < na; i++) {
        const job_slot *j = n > 1 ? &slots[i] : &slots[0];
        const seq_copy *q = n > 1 ? &j->seqs[0] : &j->seqs[i];
        Blip2__V1__Answer *a = &b->answers[i];
        blip2__v1__answer__init(a);
        blip2__v1__usage__init(&b->ausage[i]);
        a->text = q->text;
        a->n_token_ids = (size_t)q->n_ids;
        a->token_ids = q->ids;
        a->finish_reason = finish_reason(q->finish);
        a->score = q->score;
        b->ausage[i].prompt_tokens = (uint32_t)j->prompt_tokens;
        b->ausage[i].generated_tokens = (uint32_t)q->n_ids;
        a->usage = &b->ausage[i];
        b->aptr[i] = a;
    }
    b->r.n_answers = (size_t)na;
    b->r.answers = b->aptr;
    return 0;
}

static void reply_free(reply_buf *b) {
    free(b->answers);
    free(b->ausage);
    free(b->aptr);
}

static void log_done(call_ctx *c, const job_slot *j, int n, grpc_status_code code, const char *msg) {
    int gen = 0;
    for (int i = 0; i < n; i++)
        if (j[i].code == BLIP2_OK && j[i].n_seqs > 0) gen += j[i].seqs[0].n_ids;
    const blip2_timings *t = &j[0].t;
    if (code != GRPC_STATUS_OK && t->total_ms == 0) { /* refused before it ran */
        slog(c->s, BLIP2_LOG_INFO, "req %s %s %s total_ms=%.1f: %s", c->rid, method_name[c->method], blip2_rpc_code_name((int)code),
             ms_since(c->t_recv), msg ? msg : "");
        return;
    }
    char extra[32] = "";
    if (n > 1) snprintf(extra, sizeof extra, " prompts=%d", n);
    const char *fin = code == GRPC_STATUS_OK && j[0].n_seqs > 0 ? finish_str(j[0].seqs[0].finish) : NULL;
    slog(c->s, BLIP2_LOG_INFO,
         "req %s %s %s prompt_tokens=%d generated=%d%s queue_ms=%.1f image_ms=%.1f%s prefill_ms=%.1f decode_ms=%.1f "
         "total_ms=%.1f%s%s%s",
         c->rid, method_name[c->method], blip2_rpc_code_name((int)code), j[0].prompt_tokens, gen, extra, t->queue_ms, t->image_ms,
         t->image_cached ? " (cached)" : "", t->prefill_ms, t->decode_ms, ms_since(c->t_recv),
         fin ? " finish=" : (msg ? ": " : ""), fin ? fin : "", !fin && msg ? msg : "");
}

/* Every job of a Generate / GenerateStream call is done: the reply. */
static void finalize_generate(call_ctx *c) {
    int n = c->n_slots;
    for (int i = 0; i < n; i++)
        if (c->slots[i].code != BLIP2_OK) {
            grpc_status_code code = map_code(c->slots[i].code);
            const char *msg = c->slots[i].message ? c->slots[i].message : "failed";
            log_done(c, &c->slots[i], 1, code, msg);
            call_finish(c, NULL, code, msg);
            return;
        }
    grpc_byte_buffer *bb = NULL;
    if (c->method == M_STREAM) {
        const job_slot *j = &c->slots[0];
        const seq_copy *q = &j->seqs[0];
        Blip2__V1__GenerateStreamReply m = BLIP2__V1__GENERATE_STREAM_REPLY__INIT;
        Blip2__V1__Usage u = BLIP2__V1__USAGE__INIT;
        Blip2__V1__Timings t = BLIP2__V1__TIMINGS__INIT;
        m.final = 1;
        m.finish_reason = finish_reason(q->finish);
        u.prompt_tokens = (uint32_t)j->prompt_tokens;
        u.generated_tokens = (uint32_t)q->n_ids;
        m.usage = &u;
        t.queue_ms = j->t.queue_ms, t.image_ms = j->t.image_ms, t.prefill_ms = j->t.prefill_ms;
        t.decode_ms = j->t.decode_ms, t.total_ms = ms_since(c->t_recv), t.image_cached = j->t.image_cached != 0;
        m.timings = &t;
        m.request_id = c->rid;
        m.full_text = q->text;
        m.text = (char *)"";
        if (c->n_streamed == 0 && q->n_ids > 0) { /* nothing was streamed (beam search): all of it now */
            m.text = q->text;
            m.n_token_ids = (size_t)q->n_ids;
            m.token_ids = q->ids;
        }
        bb = pack_msg(&m.base);
    } else {
        reply_buf b;
        if (!reply_fill(&b, c->slots, n, c->rid, c->t_recv)) bb = pack_msg(&b.r.base);
        reply_free(&b);
    }
    if (!bb) {
        log_done(c, c->slots, n, GRPC_STATUS_INTERNAL, "out of memory");
        call_finish(c, NULL, GRPC_STATUS_INTERNAL, "out of memory building the reply");
        return;
    }
    log_done(c, c->slots, n, GRPC_STATUS_OK, NULL);
    call_finish(c, bb, GRPC_STATUS_OK, NULL);
}

static void finalize_batch(call_ctx *c) {
    int n = c->n_slots, n_ok = 0;
    Blip2__V1__GenerateBatchReply rep = BLIP2__V1__GENERATE_BATCH_REPLY__INIT;
    Blip2__V1__BatchItem *items = calloc(n ? (size_t)n : 1, sizeof *items);
    Blip2__V1__BatchItem **iptr = calloc(n ? (size_t)n : 1, sizeof *iptr);
    reply_buf *bufs = calloc(n ? (size_t)n : 1, sizeof *bufs);
    char (*rids)[BLIP2_MAX_REQUEST_ID + 48] = calloc(n ? (size_t)n : 1, sizeof *rids);
    grpc_byte_buffer *bb = NULL;
    int bad = !items || !iptr || !bufs || !rids;
    for (int i = 0; !bad && i < n; i++) {
        job_slot *j = &c->slots[i];
        Blip2__V1__BatchItem *it = &items[i];
        blip2__v1__batch_item__init(it);
        iptr[i] = it;
        const Blip2__V1__GenerateRequest *rq = c->breq->requests[i];
        if (rq && rq->request_id && *rq->request_id) snprintf(rids[i], sizeof rids[i], "%s", rq->request_id);
        else snprintf(rids[i], sizeof rids[i], "%s.%d", c->rid, i);
        if (j->code != BLIP2_OK) {
            it->code = (uint32_t)map_code(j->code);
            it->message = j->message ? j->message : (char *)"failed";
            continue;
        }
        if (reply_fill(&bufs[i], j, 1, rids[i], c->t_recv)) {
            bad = 1;
            break;
        }
        it->reply = &bufs[i].r;
        n_ok++;
    }
    if (!bad) {
        rep.n_items = (size_t)n;
        rep.items = iptr;
        bb = pack_msg(&rep.base);
    }
    for (int i = 0; bufs && i < n; i++) reply_free(&bufs[i]);
    free(items);
    free(iptr);
    free(bufs);
    free(rids);
    if (!bb) {
        slog(c->s, BLIP2_LOG_INFO, "req %s GenerateBatch INTERNAL: out of memory", c->rid);
        call_finish(c, NULL, GRPC_STATUS_INTERNAL, "out of memory building the reply");
        return;
    }
    slog(c->s, BLIP2_LOG_INFO, "req %s GenerateBatch OK items=%d ok=%d failed=%d total_ms=%.1f", c->rid, n, n_ok,
         n - n_ok, ms_since(c->t_recv));
    call_finish(c, bb, GRPC_STATUS_OK, NULL);
}

static void finalize(call_ctx *c) {
    if (c->method == M_BATCH) finalize_batch(c);
    else finalize_generate(c);
}

static void slot_release(call_ctx *c) {
    if (atomic_fetch_sub(&c->remaining, 1) == 1) finalize(c);
}

static void cb_on_done(void *ctx, const blip2_result *res) {
    job_slot *j = ctx;
    call_ctx *c = j->c;
    slot_store(j, res);
    if (c->method == M_GENERATE && c->n_slots > 1 && j->index == 0) {
        /* The first prompt encoded the image; the others now find it in the image cache. */
        if (j->code != BLIP2_OK) {
            finalize(c);
        } else {
            c->phase = 2;
            wq_push(c->s, c);
        }
        return;
    }
    slot_release(c);
}

/* ---------------------------------------------------------------- requests → jobs */

static int64_t deadline_ns(gpr_timespec d) {
    if (d.clock_type == GPR_TIMESPAN || gpr_time_cmp(d, gpr_inf_future(d.clock_type)) == 0) return 0;
    gpr_timespec left = gpr_time_sub(d, gpr_now(d.clock_type));
    if (left.tv_sec > 365 * 86400) return 0;
    int64_t ns = (int64_t)left.tv_sec * 1000000000 + left.tv_nsec;
    return blip2_now_ns() + (ns > 0 ? ns : -1); /* already expired: in the past */
}

static blip2_engine *serving_engine(call_ctx *c) {
    blip2_server *s = c->s;
    int st = atomic_load(&s->state);
    if (st == ST_SERVING) return s->engine;
    call_fail(c, GRPC_STATUS_UNAVAILABLE,
              st == ST_LOADING ? "the model is still loading: try again later" : "the server is shutting down");
    return NULL;
}

static void set_rid(call_ctx *c, const char *given) {
    if (given && *given) snprintf(c->rid, sizeof c->rid, "%s", given);
    else snprintf(c->rid, sizeof c->rid, "r%" PRIuFAST64, atomic_fetch_add(&c->s->next_id, 1));
}

static void submit_slot(blip2_engine *e, call_ctx *c, int i, const blip2_job *job) {
    blip2_job_callbacks cb = {.ctx = &c->slots[i],
                              .on_token = c->method == M_STREAM ? cb_on_token : NULL,
                              .on_done = cb_on_done,
                              .is_cancelled = cb_is_cancelled};
    blip2_status st = {0};
    blip2_code rc = blip2_engine_submit(e, job, &cb, &st);
    if (rc) { /* nothing will be called back: account for it here */
        slot_fail(&c->slots[i], rc, st.msg);
        if (c->method == M_GENERATE && c->n_slots > 1 && i == 0) finalize(c);
        else slot_release(c);
    }
}

/* Slot i's job as blip2_request_to_job left it: refused with its message, or submitted. */
static void submit_checked(blip2_engine *e, call_ctx *c, int i, blip2_code rc, const blip2_job *job,
                           const blip2_status *st) {
    if (rc) {
        slot_fail(&c->slots[i], rc, st->msg);
        slot_release(c);
    } else {
        submit_slot(e, c, i, job);
    }
}

static int alloc_slots(call_ctx *c, int n) {
    c->slots = calloc(n ? (size_t)n : 1, sizeof *c->slots);
    if (!c->slots) return -1;
    c->n_slots = n;
    for (int i = 0; i < n; i++) c->slots[i].c = c, c->slots[i].index = i;
    return 0;
}

static int gone(call_ctx *c) { /* cancelled while it waited for a worker: skip the work */
    if (!atomic_load(&c->cancelled)) return 0;
    call_fail(c, GRPC_STATUS_CANCELLED, "cancelled before it started");
    return 1;
}

static void start_generate(call_ctx *c) {
    blip2_engine *e = serving_engine(c);
    if (!e || gone(c)) return;
    c->greq = (Blip2__V1__GenerateRequest *)unpack_msg(&blip2__v1__generate_request__descriptor, c->payload);
    if (!c->greq) {
        set_rid(c, NULL);
        call_fail(c, GRPC_STATUS_INVALID_ARGUMENT,
                  c->payload ? "the request is not a valid blip2.v1.GenerateRequest message" : "no request message");
        return;
    }
    Blip2__V1__GenerateRequest *r = c->greq;
    set_rid(c, r->request_id && strlen(r->request_id) <= BLIP2_MAX_REQUEST_ID ? r->request_id : NULL);
    blip2_status st = {0};
    int n = r->n_prompts ? (int)(r->n_prompts > MAX_PROMPTS + 1 ? MAX_PROMPTS + 1 : r->n_prompts) : 1;
    if (c->method == M_STREAM && r->n_prompts) {
        call_fail(c, GRPC_STATUS_INVALID_ARGUMENT, "prompts (several questions) is for Generate, not GenerateStream");
        return;
    }
    if (n > MAX_PROMPTS) {
        snprintf(st.msg, sizeof st.msg, "at most %d prompts per request (got %zu)", MAX_PROMPTS, r->n_prompts);
        call_fail(c, GRPC_STATUS_INVALID_ARGUMENT, st.msg);
        return;
    }
    if (alloc_slots(c, n)) {
        call_fail(c, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
        return;
    }
    /* Check every prompt before running any. */
    blip2_job job;
    for (int i = n - 1; i >= 0; i--) {
        blip2_code rc = blip2_request_to_job(r, c->s->o.max_new_tokens_limit, r->n_prompts ? r->prompts[i] : r->prompt, c->deadline_ns, &job, &st);
        if (rc) {
            if (r->n_prompts) blip2_wrap(&st, "prompts[%d]", i);
            call_fail(c, map_code(rc), st.msg);
            return;
        }
    }
    /* job now describes slot 0 */
    atomic_store(&c->remaining, 2); /* slot 0 + this function (n == 1) */
    submit_slot(e, c, 0, &job);
    if (n == 1) slot_release(c);
}

/* Generate with several prompts, after the first answered: the rest together. */
static void continue_prompts(call_ctx *c) {
    blip2_engine *e = c->s->engine;
    Blip2__V1__GenerateRequest *r = c->greq;
    atomic_store(&c->remaining, c->n_slots); /* slots 1..n-1 + this function */
    for (int i = 1; i < c->n_slots; i++) {
        blip2_job job;
        blip2_status st = {0};
        blip2_code rc = blip2_request_to_job(r, c->s->o.max_new_tokens_limit, r->prompts[i], c->deadline_ns, &job, &st);
        submit_checked(e, c, i, rc, &job, &st);
    }
    slot_release(c);
}

static void start_batch(call_ctx *c) {
    blip2_engine *e = serving_engine(c);
    if (!e || gone(c)) return;
    c->breq = (Blip2__V1__GenerateBatchRequest *)unpack_msg(&blip2__v1__generate_batch_request__descriptor, c->payload);
    set_rid(c, NULL);
    if (!c->breq) {
        call_fail(c, GRPC_STATUS_INVALID_ARGUMENT,
                  c->payload ? "the request is not a valid blip2.v1.GenerateBatchRequest message" : "no request message");
        return;
    }
    int n = c->breq->n_requests > MAX_BATCH_ITEMS ? MAX_BATCH_ITEMS + 1 : (int)c->breq->n_requests;
    if (n > MAX_BATCH_ITEMS) {
        char msg[128];
        snprintf(msg, sizeof msg, "at most %d requests per batch (got %zu)", MAX_BATCH_ITEMS, c->breq->n_requests);
        call_fail(c, GRPC_STATUS_INVALID_ARGUMENT, msg);
        return;
    }
    if (alloc_slots(c, n)) {
        call_fail(c, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
        return;
    }
    atomic_store(&c->remaining, n + 1);
    for (int i = 0; i < n; i++) {
        const Blip2__V1__GenerateRequest *r = c->breq->requests[i];
        blip2_job job;
        blip2_status st = {0};
        blip2_code rc;
        if (r->n_prompts) rc = blip2_fail(&st, BLIP2_EINVAL, "prompts is not supported inside GenerateBatch");
        else rc = blip2_request_to_job(r, c->s->o.max_new_tokens_limit, r->prompt, c->deadline_ns, &job, &st);
        submit_checked(e, c, i, rc, &job, &st);
    }
    slot_release(c);
}

static void *worker_main(void *arg) {
    blip2_server *s = arg;
    for (;;) {
        pthread_mutex_lock(&s->wq_mu);
        while (!s->wq_head && !s->wq_stop) pthread_cond_wait(&s->wq_cv, &s->wq_mu);
        call_ctx *c = s->wq_head;
        if (c) {
            s->wq_head = c->wnext;
            if (!s->wq_head) s->wq_tail = NULL;
        }
        pthread_mutex_unlock(&s->wq_mu);
        if (!c) break; /* stopping and drained */
        if (c->phase == 2) continue_prompts(c);
        else if (c->method == M_BATCH) start_batch(c);
        else start_generate(c);
    }
    return NULL;
}

/* ---------------------------------------------------------------- cheap methods (CQ thread) */

static void do_health(call_ctx *c) {
    blip2_server *s = c->s;
    Grpc__Health__V1__HealthCheckRequest *q =
        (Grpc__Health__V1__HealthCheckRequest *)unpack_msg(&grpc__health__v1__health_check_request__descriptor, c->payload);
    if (!q) {
        call_fail(c, GRPC_STATUS_INVALID_ARGUMENT, "the request is not a valid grpc.health.v1.HealthCheckRequest");
        return;
    }
    int known = !q->service || !*q->service || !strcmp(q->service, "blip2.v1.Blip2");
    grpc__health__v1__health_check_request__free_unpacked(q, NULL);
    if (!known) {
        call_fail(c, GRPC_STATUS_NOT_FOUND, "unknown service");
        return;
    }
    Grpc__Health__V1__HealthCheckResponse rep = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
    rep.status = atomic_load(&s->state) == ST_SERVING ? GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING
                                                       : GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING;
    grpc_byte_buffer *bb = pack_msg(&rep.base);
    slog(s, BLIP2_LOG_DEBUG, "req - Health.Check OK %s", rep.status == 1 ? "SERVING" : "NOT_SERVING");
    call_finish(c, bb, bb ? GRPC_STATUS_OK : GRPC_STATUS_INTERNAL, bb ? NULL : "out of memory");
}

static void do_info(call_ctx *c) {
    blip2_server *s = c->s;
    int state = atomic_load(&s->state);
    if (state != ST_SERVING) {
        call_fail(c, GRPC_STATUS_UNAVAILABLE, state == ST_LOADING ? "the model is still loading" : "the server is shutting down");
        return;
    }
    ProtobufCMessage *q = unpack_msg(&blip2__v1__model_info_request__descriptor, c->payload);
    if (!q) {
        call_fail(c, GRPC_STATUS_INVALID_ARGUMENT, "the request is not a valid blip2.v1.ModelInfoRequest");
        return;
    }
    protobuf_c_message_free_unpacked(q, NULL);
    const blip2_config *cfg = &s->m->cfg;
    blip2_engine_stats es;
    blip2_engine_get_stats(s->engine, &es);
    Blip2__V1__ModelInfoReply r = BLIP2__V1__MODEL_INFO_REPLY__INIT;
    r.model_dir = s->model_dir;
    r.dtype = (char *)blip2_dtype_name(s->m->dtype);
    r.device = (char *)"cpu";
    r.tp_degree = (uint32_t)s->tp_degree;
    r.num_query_tokens = (uint32_t)cfg->Q;
    r.vision_hidden = (uint32_t)cfg->vision.C;
    r.vision_layers = (uint32_t)cfg->vision.layers;
    r.qformer_hidden = (uint32_t)cfg->qformer.C;
    r.qformer_layers = (uint32_t)cfg->qformer.layers;
    r.text_hidden = (uint32_t)cfg->opt.C;
    r.text_layers = (uint32_t)cfg->opt.layers;
    r.vocab_size = (uint32_t)cfg->opt.V;
    r.max_position_embeddings = (uint32_t)cfg->opt.max_pos;
    r.eos_token_id = (uint32_t)cfg->eos_id;
    r.default_max_new_tokens = (uint32_t)cfg->max_new_tokens;
    r.max_new_tokens_limit = (uint32_t)s->o.max_new_tokens_limit;
    r.max_batch = (uint32_t)s->eo.max_batch;
    r.max_queue = (uint32_t)s->eo.max_queue;
    r.max_message_bytes = s->o.max_message_bytes;
    r.kv_blocks_total = (uint32_t)es.blocks_total;
    r.kv_blocks_in_use = (uint32_t)es.blocks_in_use;
    r.kv_block_size = (uint32_t)s->eo.block_size;
    r.queued = (uint32_t)es.queued;
    r.active = (uint32_t)es.active;
    r.image_cache_hits = es.image_hits;
    r.image_cache_misses = es.image_misses;
    r.image_cache_bytes = es.image_cache_bytes;
    r.requests_completed = es.completed;
    r.requests_failed = es.failed;
    grpc_byte_buffer *bb = pack_msg(&r.base);
    slog(s, BLIP2_LOG_DEBUG, "req - ModelInfo OK active=%d queued=%d", es.active, es.queued);
    call_finish(c, bb, bb ? GRPC_STATUS_OK : GRPC_STATUS_INTERNAL, bb ? NULL : "out of memory");
}

/* ---------------------------------------------------------------- the completion-queue thread */

static void on_new_call(tag_t *t, int ok) {
    call_ctx *c = CONTAINER_OF(t, call_ctx, t_new);
    blip2_server *s = c->s;
    if (!ok) { /* shutting down: the armed request was never matched */
        ctx_free(c);
        return;
    }
    arm(s, c->method);
    c->t_recv = blip2_now_ns();
    c->deadline_ns = deadline_ns(c->deadline);
    /* Learn about cancellation (client, deadline, dead connection) as soon as it happens. */
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    op.data.recv_close_on_server.cancelled = &c->close_cancelled;
    ctx_ref(c);
    if (grpc_call_start_batch(c->call, &op, 1, &c->t_close, NULL) != GRPC_CALL_OK) {
        atomic_fetch_sub(&c->refs, 1);
        atomic_store(&c->cancelled, 1);
    }
    switch (c->method) {
    case M_HEALTH: do_health(c); break;
    case M_INFO: do_info(c); break;
    default:
        if (atomic_load(&s->state) != ST_SERVING) serving_engine(c); /* UNAVAILABLE at once */
        else wq_push(s, c);
    }
}

static void on_shutdown(tag_t *t, int ok) {
    (void)ok;
    blip2_server *s = CONTAINER_OF(t, blip2_server, t_shutdown);
    pthread_mutex_lock(&s->sd_mu);
    s->shutdown_done = 1;
    pthread_cond_broadcast(&s->sd_cv);
    pthread_mutex_unlock(&s->sd_mu);
}

static void *cq_main(void *arg) {
    blip2_server *s = arg;
    for (;;) {
        grpc_event ev = grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
        if (ev.type == GRPC_QUEUE_SHUTDOWN) break;
        if (ev.type != GRPC_OP_COMPLETE) continue;
        tag_t *t = ev.tag;
        t->fn(t, ev.success);
    }
    return NULL;
}

/* ---------------------------------------------------------------- lifecycle */

/* The last of a server, once its completion queue is drained (failed start or destroy). */
static void server_free(blip2_server *s) {
    grpc_completion_queue_destroy(s->cq);
    grpc_shutdown();
    pthread_mutex_destroy(&s->arm_mu);
    pthread_mutex_destroy(&s->sd_mu);
    pthread_cond_destroy(&s->sd_cv);
    pthread_mutex_destroy(&s->wq_mu);
    pthread_cond_destroy(&s->wq_cv);
    free(s->workers);
    free(s->listen);
    free(s->model_dir);
    free(s);
}

blip2_code blip2_server_start(const blip2_server_opts *o, blip2_server **out, int *port, blip2_status *st) {
    *out = NULL;
    blip2_server *s = calloc(1, sizeof *s);
    if (!s) return blip2_fail(st, BLIP2_ENOMEM, "out of memory");
    s->o = *o;
    if (!s->o.workers) s->o.workers = 4;
    if (!s->o.max_message_bytes) s->o.max_message_bytes = (size_t)32 << 20;
    s->listen = strdup(o->listen ? o->listen : "127.0.0.1:50051");
    s->model_dir = strdup(o->model_dir ? o->model_dir : "");
    atomic_init(&s->state, ST_LOADING);
    atomic_init(&s->next_id, 1);
    s->t_shutdown.fn = on_shutdown;
    pthread_mutex_init(&s->arm_mu, NULL);
    pthread_mutex_init(&s->sd_mu, NULL);
    pthread_cond_init(&s->sd_cv, NULL);
    pthread_mutex_init(&s->wq_mu, NULL);
    pthread_cond_init(&s->wq_cv, NULL);
    grpc_init();

    grpc_arg args[3];
    memset(args, 0, sizeof args);
    args[0].type = GRPC_ARG_INTEGER;
    args[0].key = (char *)GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
    args[0].value.integer = s->o.max_message_bytes > INT_MAX ? INT_MAX : (int)s->o.max_message_bytes;
    args[1].type = GRPC_ARG_INTEGER;
    args[1].key = (char *)GRPC_ARG_ALLOW_REUSEPORT; /* a second server on the port must fail, not share it */
    args[1].value.integer = 0;
    args[2].type = GRPC_ARG_INTEGER;
    args[2].key = (char *)GRPC_ARG_MAX_SEND_MESSAGE_LENGTH;
    args[2].value.integer = -1;
    grpc_channel_args cargs = {3, args};
    s->srv = grpc_server_create(&cargs, NULL);
    s->cq = grpc_completion_queue_create_for_next(NULL);
    grpc_server_register_completion_queue(s->srv, s->cq, NULL);
    for (int m = 0; m < M_COUNT; m++)
        s->mreg[m] = grpc_server_register_method(s->srv, method_path[m], NULL, GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER, 0);
    grpc_ssl_pem_key_cert_pair pair = {s->o.tls_key_pem, s->o.tls_cert_pem};
    grpc_server_credentials *creds = s->o.tls_cert_pem
                                         ? grpc_ssl_server_credentials_create(NULL, &pair, 1, 0, NULL)
                                         : grpc_insecure_server_credentials_create();
    int p = creds ? grpc_server_add_http2_port(s->srv, s->listen, creds) : 0;
    if (creds) grpc_server_credentials_release(creds);
    s->o.tls_cert_pem = s->o.tls_key_pem = NULL; /* gRPC keeps its own copies */
    if (p == 0) {
        blip2_fail(st, BLIP2_EIO, "cannot listen on %s (address in use, not a valid host:port%s)", s->listen,
                   s->o.tls_cert_pem ? ", or a certificate/key gRPC does not accept" : "");
        grpc_server_destroy(s->srv);
        grpc_completion_queue_shutdown(s->cq);
        while (grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type != GRPC_QUEUE_SHUTDOWN) {
        }
        server_free(s);
        return BLIP2_EIO;
    }
    *port = p;
    grpc_server_start(s->srv);
    for (int m = 0; m < M_COUNT; m++)
        for (int i = 0; i < method_armed[m]; i++) arm(s, m);
    for (int i = 0; i < GENERIC_ARMED; i++) arm_generic(s);
    s->workers = calloc((size_t)s->o.workers, sizeof *s->workers);
    int threads_ok = s->workers != NULL && pthread_create(&s->cq_thread, NULL, cq_main, s) == 0;
    s->cq_started = threads_ok;
    for (int i = 0; threads_ok && i < s->o.workers; i++) {
        if (pthread_create(&s->workers[i], NULL, worker_main, s) != 0) break;
        s->n_workers++;
    }
    *out = s;
    if (!threads_ok || s->n_workers == 0) {
        blip2_server_destroy(s, 0);
        *out = NULL;
        return blip2_fail(st, BLIP2_EINTERNAL, "cannot start the server threads");
    }
    return BLIP2_OK;
}

void blip2_server_set_engine(blip2_server *s, blip2_engine *e, const blip2_model *m, int tp_degree,
                             const blip2_engine_opts *eo) {
    s->engine = e;
    s->m = m;
    s->tp_degree = tp_degree;
    s->eo = *eo;
    int expect = ST_LOADING;
    atomic_compare_exchange_strong(&s->state, &expect, ST_SERVING); /* not if already stopping */
}

void blip2_server_begin_shutdown(blip2_server *s) {
    atomic_store(&s->state, ST_STOPPING);
    pthread_mutex_lock(&s->arm_mu);
    if (!s->shutdown_started) {
        s->shutdown_started = 1;
        grpc_server_shutdown_and_notify(s->srv, s->cq, &s->t_shutdown);
    }
    pthread_mutex_unlock(&s->arm_mu);
}

/* Waits for the shutdown tag until `until` (CLOCK_REALTIME; NULL: forever). 1 when it came. */
static int wait_shutdown(blip2_server *s, const struct timespec *until) {
    pthread_mutex_lock(&s->sd_mu);
    while (!s->shutdown_done) {
        if (!until) pthread_cond_wait(&s->sd_cv, &s->sd_mu);
        else if (pthread_cond_timedwait(&s->sd_cv, &s->sd_mu, until) != 0) break;
    }
    int done = s->shutdown_done;
    pthread_mutex_unlock(&s->sd_mu);
    return done;
}

void blip2_server_destroy(blip2_server *s, int grace_ms) {
    if (!s) return;
    blip2_server_begin_shutdown(s);
    if (!s->cq_started) { /* no completion-queue thread: run the events here until shutdown is done */
        while (!s->shutdown_done) {
            grpc_event ev = grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
            if (ev.type == GRPC_OP_COMPLETE) ((tag_t *)ev.tag)->fn(ev.tag, ev.success);
        }
    } else {
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        int64_t ns = until.tv_nsec + (int64_t)(grace_ms > 0 ? grace_ms : 0) * 1000000;
        until.tv_sec += ns / 1000000000;
        until.tv_nsec = ns % 1000000000;
        if (!wait_shutdown(s, &until)) {
            slog(s, BLIP2_LOG_WARN, "calls still open after the %d ms grace period: cancelling them", grace_ms);
            grpc_server_cancel_all_calls(s->srv);
            wait_shutdown(s, NULL);
        }
    }
    pthread_mutex_lock(&s->wq_mu);
    s->wq_stop = 1;
    pthread_cond_broadcast(&s->wq_cv);
    pthread_mutex_unlock(&s->wq_mu);
    for (int i = 0; i < s->n_workers; i++) pthread_join(s->workers[i], NULL);
    grpc_server_destroy(s->srv);
    grpc_completion_queue_shutdown(s->cq);
    if (s->cq_started) pthread_join(s->cq_thread, NULL);
    else
        cq_main(s);
    server_free(s);
}
