#include "graphs.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"

blip2_code blip2_graph_cache_init(blip2_graph_cache *c, const blip2_ops *ops, int max_key, const char *what,
                                  blip2_status *st) {
    memset(c, 0, sizeof *c);
    const char *env = getenv("BLIP2_GRAPHS");
    c->ops = ops;
    c->what = what;
    c->max_key = max_key;
    c->on = ops->capture_begin && !(env && strcmp(env, "0") == 0);
    c->graph = calloc((size_t)max_key + 1, sizeof *c->graph);
    c->used = calloc((size_t)max_key + 1, 1);
    if (c->graph && c->used) return BLIP2_OK;
    blip2_graph_cache_free(c);
    return blip2_fail(st, BLIP2_ENOMEM, "out of memory for the %s graphs", what);
}

static void drop_all(blip2_graph_cache *c) {
    for (int k = 0; c->graph && k <= c->max_key; k++) {
        if (c->graph[k]) c->ops->graph_free(c->graph[k]);
        c->graph[k] = NULL;
    }
}

void blip2_graph_cache_free(blip2_graph_cache *c) {
    drop_all(c);
    free(c->graph);
    free(c->used);
    memset(c, 0, sizeof *c);
}

void blip2_graph_cache_bind(blip2_graph_cache *c, const void *owner) {
    if (c->owner == owner) return;
    drop_all(c);
    c->owner = owner;
}

int blip2_graph_run(blip2_graph_cache *c, int key, blip2_code (*body)(void *ctx, blip2_status *st), void *ctx,
                    blip2_code *rc, blip2_status *st) {
    if (!c->on || key < 0 || key > c->max_key) return 0;
    const blip2_ops *o = c->ops;
    void **g = &c->graph[key];
    if (*g) {
        int r = o->graph_launch(*g);
        if (r <= 0) {
            *rc = r ? blip2_backend_check(o, c->what, st) : BLIP2_OK;
            return 1;
        }
        o->graph_free(*g); /* stale: record it again */
        *g = NULL;
    }
    if (!c->used[key]) {
        c->used[key] = 1;
        return 0;
    }
    if (o->capture_begin()) return 0;
    *rc = body(ctx, st);
    char why[256] = "";
    *g = o->capture_end(why, sizeof why);
    if (*rc) return 1; /* the body failed (a collective) while recording: nothing more to try */
    if (!*g || o->graph_launch(*g) != 0) {
        fprintf(stderr, "blip2: %s: recording the %s (size %d) as a graph failed (%s); it runs without graphs from now on\n",
                o->name, c->what, key, *g ? "launch" : why);
        if (*g) o->graph_free(*g);
        *g = NULL;
        c->on = 0;
        return 0;
    }
    return 1;
}
