/* Replaying recorded work (CUDA graphs) for the two places that repeat the same launches with the
 * same arguments: the OPT decode step of a given batch size, and the image encoder for a given
 * number of images. A cache holds one graph per key (the batch size). A key's first use runs
 * eagerly (scratch buffers grow, matmul algorithms are chosen outside any recording); its second
 * is recorded and replayed; later ones replay. Backends without graphs (the CPU), and
 * BLIP2_GRAPHS=0, run everything eagerly. A failed recording turns the cache off, with one line
 * on stderr; a stale graph (a scratch buffer it captured moved) is recorded again. */
#ifndef BLIP2_GRAPHS_H
#define BLIP2_GRAPHS_H

#include <stdint.h>

#include "../kernels/ops.h"
#include "status.h"

typedef struct {
    const blip2_ops *ops;
    const char *what;   /* for the stderr line: "decode step", "image encoder" */
    int on;             /* graphs in use */
    int max_key;
    void **graph;       /* [max_key + 1] */
    uint8_t *used;      /* [max_key + 1]: ran eagerly once */
    const void *owner;  /* the memory the graphs address beyond the cache's owner (a KV pool) */
} blip2_graph_cache;

blip2_code blip2_graph_cache_init(blip2_graph_cache *c, const blip2_ops *ops, int max_key, const char *what,
                                  blip2_status *st);
void blip2_graph_cache_free(blip2_graph_cache *c);
/* Graphs recorded against another owner are dropped. */
void blip2_graph_cache_bind(blip2_graph_cache *c, const void *owner);

/* body(ctx) as key's graph: 1 when it ran (replayed, or recorded then replayed; *rc is its
 * outcome), 0 when the caller must run body itself (first use, no graphs, failed recording).
 * body must queue backend work only: no upload, download or sync. */
int blip2_graph_run(blip2_graph_cache *c, int key, blip2_code (*body)(void *ctx, blip2_status *st), void *ctx,
                    blip2_code *rc, blip2_status *st);

#endif
