#include "image_cache.h"

#include <stdlib.h>
#include <string.h>

struct cache_entry {
    cache_entry *prev, *next;
    uint64_t hash;
    size_t n;
    uint8_t *data; /* the image bytes */
    float *emb;    /* [Q, Ct] */
};

void blip2_image_cache_init(blip2_image_cache *c, size_t budget_bytes, size_t emb_floats) {
    memset(c, 0, sizeof *c);
    pthread_mutex_init(&c->mu, NULL);
    c->budget = budget_bytes;
    c->emb_floats = emb_floats;
}

static size_t entry_bytes(const blip2_image_cache *c, const cache_entry *e) {
    return e->n + c->emb_floats * sizeof(float) + sizeof *e;
}

static void unlink_entry(blip2_image_cache *c, cache_entry *e) {
    if (e->prev) e->prev->next = e->next; else c->head = e->next;
    if (e->next) e->next->prev = e->prev; else c->tail = e->prev;
    e->prev = e->next = NULL;
}

static void push_front(blip2_image_cache *c, cache_entry *e) {
    e->next = c->head;
    e->prev = NULL;
    if (c->head) c->head->prev = e; else c->tail = e;
    c->head = e;
}

static void drop(blip2_image_cache *c, cache_entry *e) {
    unlink_entry(c, e);
    c->bytes -= entry_bytes(c, e);
    free(e->data);
    free(e->emb);
    free(e);
}

void blip2_image_cache_free(blip2_image_cache *c) {
    while (c->head) drop(c, c->head);
    pthread_mutex_destroy(&c->mu);
}

uint64_t blip2_image_hash(const uint8_t *data, size_t n) { /* FNV-1a, 64 bit */
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) h = (h ^ data[i]) * 0x100000001b3ull;
    return h ^ n;
}

static cache_entry *find(blip2_image_cache *c, const uint8_t *data, size_t n, uint64_t hash) {
    for (cache_entry *e = c->head; e; e = e->next)
        if (e->hash == hash && e->n == n && memcmp(e->data, data, n) == 0) return e;
    return NULL;
}

static int lookup(blip2_image_cache *c, const uint8_t *data, size_t n, uint64_t hash, float *out, int retry) {
    if (!c->budget) return 0;
    pthread_mutex_lock(&c->mu);
    cache_entry *e = find(c, data, n, hash);
    if (e) {
        memcpy(out, e->emb, sizeof(float) * c->emb_floats);
        unlink_entry(c, e);
        push_front(c, e);
        c->hits++;
        c->misses -= retry != 0; /* the same request's first look was counted as a miss */
    } else if (!retry) {
        c->misses++;
    }
    pthread_mutex_unlock(&c->mu);
    return e != NULL;
}

int blip2_image_cache_get(blip2_image_cache *c, const uint8_t *data, size_t n, uint64_t hash, float *out) {
    return lookup(c, data, n, hash, out, 0);
}

int blip2_image_cache_retry(blip2_image_cache *c, const uint8_t *data, size_t n, uint64_t hash, float *out) {
    return lookup(c, data, n, hash, out, 1);
}

void blip2_image_cache_put(blip2_image_cache *c, const uint8_t *data, size_t n, uint64_t hash, const float *emb) {
    size_t need = n + c->emb_floats * sizeof(float) + sizeof(cache_entry);
    if (!c->budget || need > c->budget) return;
    cache_entry *e = calloc(1, sizeof *e);
    if (e) {
        e->data = malloc(n ? n : 1);
        e->emb = malloc(sizeof(float) * c->emb_floats);
    }
    if (!e || !e->data || !e->emb) {
        if (e) free(e->data), free(e->emb);
        free(e);
        return; /* a cache may always decline */
    }
    memcpy(e->data, data, n);
    memcpy(e->emb, emb, sizeof(float) * c->emb_floats);
    e->n = n;
    e->hash = hash;
    pthread_mutex_lock(&c->mu);
    cache_entry *old = find(c, data, n, hash);
    if (old) drop(c, old);
    while (c->bytes + need > c->budget && c->tail) drop(c, c->tail);
    push_front(c, e);
    c->bytes += need;
    pthread_mutex_unlock(&c->mu);
}
