/* The one-rank communicator: every collective is an identity. */
#include <stdlib.h>
#include <string.h>

#include "comm.h"

static blip2_code self_allreduce(blip2_comm *c, float *buf, size_t n, blip2_status *st) {
    (void)c, (void)buf, (void)n, (void)st;
    return BLIP2_OK;
}

static blip2_code self_broadcast(blip2_comm *c, void *buf, size_t bytes, int root, blip2_status *st) {
    (void)c, (void)buf, (void)bytes;
    return root == 0 ? BLIP2_OK : blip2_fail(st, BLIP2_EINTERNAL, "broadcast from rank %d in a 1-rank group", root);
}

static blip2_code self_allgather(blip2_comm *c, const void *send, void *recv, size_t bytes, blip2_status *st) {
    (void)c, (void)st;
    if (send != recv) memmove(recv, send, bytes);
    return BLIP2_OK;
}

static blip2_code self_barrier(blip2_comm *c, blip2_status *st) {
    (void)c, (void)st;
    return BLIP2_OK;
}

static blip2_code self_split(blip2_comm *c, int color, int key, blip2_comm **out, blip2_status *st) {
    (void)c, (void)color, (void)key, (void)st;
    *out = blip2_comm_self();
    return BLIP2_OK;
}

static void self_free(blip2_comm *c) { (void)c; }

static void self_abort(blip2_comm *c, int code) {
    (void)c;
    exit(code);
}

static const blip2_comm_ops self_ops = {self_allreduce, self_broadcast, self_allgather, self_barrier,
                                        self_split,     self_free,      self_abort};

blip2_comm *blip2_comm_self(void) {
    static blip2_comm self = {.ops = &self_ops, .rank = 0, .world = 1, .backend = "self"};
    return &self;
}

blip2_tp blip2_tp_from_comm(blip2_comm *comm) { return (blip2_tp){comm->rank, comm->world, comm, NULL}; }

blip2_code blip2_tp_agree(const blip2_tp *tp, blip2_code rc, blip2_status *st) {
    if (tp->world == 1) return rc;
    int *codes = calloc((size_t)tp->world, sizeof *codes);
    int mine = (int)rc;
    blip2_status tmp = {0};
    if (!codes || tp->comm->ops->allgather(tp->comm, &mine, codes, sizeof mine, &tmp)) {
        free(codes);
        tp->comm->ops->abort(tp->comm, 1); /* cannot even agree: stop the whole job */
        return BLIP2_EINTERNAL;
    }
    int bad = -1;
    for (int r = 0; r < tp->world && bad < 0; r++)
        if (codes[r]) bad = r;
    blip2_code out = bad < 0 ? BLIP2_OK : (blip2_code)codes[bad];
    free(codes);
    if (bad < 0) return BLIP2_OK;
    char msg[sizeof st->msg];
    memcpy(msg, st->msg, sizeof msg);
    if (tp->comm->ops->broadcast(tp->comm, msg, sizeof msg, bad, &tmp)) tp->comm->ops->abort(tp->comm, 1);
    msg[sizeof msg - 1] = 0;
    return blip2_fail(st, out, "rank %d: %s", bad, msg);
}
