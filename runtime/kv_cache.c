#include "kv_cache.h"

#include <stdlib.h>
#include <string.h>

size_t blip2_kv_block_bytes(const blip2_model *m, int block_size) {
    return (size_t)2 * m->cfg.opt.layers * block_size * m->shard.C * blip2_wdtype_size(blip2_kv_dtype(m));
}

blip2_code blip2_kv_pool_init(blip2_kv_pool *p, const blip2_model *m, int n_blocks, int block_size, blip2_status *st) {
    memset(p, 0, sizeof *p);
    if (n_blocks < 1 || block_size < 1)
        return blip2_fail(st, BLIP2_EINVAL, "KV cache: %d blocks of %d positions is not a cache", n_blocks, block_size);
    p->ops = m->ops;
    p->layers = m->cfg.opt.layers;
    p->C = m->shard.C;
    p->block_size = block_size;
    p->n_blocks = n_blocks;
    p->dtype = blip2_kv_dtype(m);
    size_t n = (size_t)p->layers * n_blocks * block_size * p->C * blip2_wdtype_size(p->dtype); /* bytes */
    p->k = p->ops->alloc(n);
    p->v = p->ops->alloc(n);
    p->free_ids = malloc(sizeof(int32_t) * (size_t)n_blocks);
    if (!p->k || !p->v || !p->free_ids) {
        blip2_kv_pool_free(p);
        return blip2_fail(st, BLIP2_ENOMEM, "KV cache: out of %s memory for %d blocks (%.1f MiB)", m->ops->name,
                          n_blocks, 2.0 * n / 1048576.0);
    }
    for (int i = 0; i < n_blocks; i++) p->free_ids[i] = n_blocks - 1 - i; /* pop order 0, 1, 2, ... */
    p->n_free = n_blocks;
    return BLIP2_OK;
}

void blip2_kv_pool_free(blip2_kv_pool *p) {
    if (p->ops) p->ops->release(p->k), p->ops->release(p->v);
    free(p->free_ids);
    memset(p, 0, sizeof *p);
}

int blip2_kv_pool_alloc(blip2_kv_pool *p, int n, int32_t *blocks) {
    if (n > p->n_free) return -1;
    for (int i = 0; i < n; i++) blocks[i] = p->free_ids[--p->n_free];
    return 0;
}

void blip2_kv_pool_release(blip2_kv_pool *p, const int32_t *blocks, int n) {
    for (int i = 0; i < n; i++) p->free_ids[p->n_free++] = blocks[i];
}
