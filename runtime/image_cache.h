/* Projected query embeddings of recently seen images, keyed by the image bytes themselves (a
 * 64-bit hash finds the entry, a full byte comparison confirms it, so another image's embedding
 * can never come back). Bounded by bytes (image bytes + embedding), least recently used out.
 * Thread-safe. */
#ifndef BLIP2_IMAGE_CACHE_H
#define BLIP2_IMAGE_CACHE_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

typedef struct cache_entry cache_entry;

typedef struct {
    pthread_mutex_t mu;
    size_t budget, bytes;
    size_t emb_floats; /* Q · Ct per entry */
    cache_entry *head, *tail; /* most recently used first */
    uint64_t hits, misses;
} blip2_image_cache;

void blip2_image_cache_init(blip2_image_cache *c, size_t budget_bytes, size_t emb_floats);
void blip2_image_cache_free(blip2_image_cache *c);
uint64_t blip2_image_hash(const uint8_t *data, size_t n);
/* Copies the embedding [Q, Ct] into out on a hit (1), else 0. */
int blip2_image_cache_get(blip2_image_cache *c, const uint8_t *data, size_t n, uint64_t hash, float *out);
/* A second look for a request whose get() missed (the image may have been encoded since): a hit
 * turns that request's miss into a hit; a miss is not counted again. */
int blip2_image_cache_retry(blip2_image_cache *c, const uint8_t *data, size_t n, uint64_t hash, float *out);
void blip2_image_cache_put(blip2_image_cache *c, const uint8_t *data, size_t n, uint64_t hash, const float *emb);

#endif
