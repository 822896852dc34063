/* Paged KV cache: fixed-size blocks of BS positions in one pool per rank; a sequence owns a
 * block table. Nothing is copied when a sequence joins or leaves: its blocks go back to the free
 * list. Rank 0 allocates; the other ranks mirror its tables through the step descriptors. */
#ifndef BLIP2_KV_CACHE_H
#define BLIP2_KV_CACHE_H

#include <stddef.h>
#include <stdint.h>

#include "model.h"

typedef struct {
    const blip2_ops *ops; /* the model's backend: k and v live in its memory */
    int layers, C;    /* C: this rank's attention width (its heads × HS) */
    int block_size;   /* BS positions per block */
    int n_blocks;
    int dtype;        /* BLIP2_W_* of k and v: the model's wdtype (a 16-bit model keeps a 16-bit cache) */
    void *k, *v;      /* [layers, n_blocks, BS, C] of dtype */
    int32_t *free_ids; /* stack of free block ids [n_blocks] */
    int n_free;
} blip2_kv_pool;

/* The element type of a model's KV cache: fp32 for fp32 weights, else the weights' 16-bit type. */
static inline int blip2_kv_dtype(const blip2_model *m) { return m->wdtype; }
/* Bytes one block takes on this rank (k and v, all layers). */
size_t blip2_kv_block_bytes(const blip2_model *m, int block_size);
blip2_code blip2_kv_pool_init(blip2_kv_pool *p, const blip2_model *m, int n_blocks, int block_size, blip2_status *st);
void blip2_kv_pool_free(blip2_kv_pool *p);
/* Takes n blocks (all or none): 0 on success, -1 when fewer are free. */
int blip2_kv_pool_alloc(blip2_kv_pool *p, int n, int32_t *blocks);
void blip2_kv_pool_release(blip2_kv_pool *p, const int32_t *blocks, int n);
static inline int blip2_kv_blocks_for(int positions, int block_size) { return (positions + block_size - 1) / block_size; }

/* Layer l's part of a pool [n_blocks, BS, C]; bytes of one block of one layer. */
static inline size_t blip2_kv_block_layer_bytes(const blip2_kv_pool *p) {
    return (size_t)p->block_size * p->C * blip2_wdtype_size(p->dtype);
}
static inline void *blip2_kv_layer(const blip2_kv_pool *p, void *base, int layer) {
    return (char *)base + (size_t)layer * p->n_blocks * blip2_kv_block_layer_bytes(p);
}

#endif
