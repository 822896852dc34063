/* Tokenizer throughput on a synthetic English text (~512 KB by default):
 * manifest strings, common words, syllable-built rare words, numbers,
 * punctuation, contractions and paragraphs, from a fixed-seed PRNG.
 * Prints load time, encode MB/s with the word cache cold / warm / off, and
 * decode MB/s (one call, and streaming one id at a time).
 *
 * gcc -std=c11 -O2 -DBLIP2_SHARED_DIR=\"/work/shared\" -I runtime runtime/status.c \
 *   runtime/tokenizer.c bench/bench_tokenizer.c -lpcre2-8 -ljansson -lpthread -o bench_tokenizer
 * ./bench_tokenizer [tokenizer_dir] [text_kib] */
#define _POSIX_C_SOURCE 200809L

#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "tokenizer.h"

#ifndef BLIP2_SHARED_DIR
#define BLIP2_SHARED_DIR "../shared"
#endif

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static uint64_t g_rng = 0x9E3779B97F4A7C15ULL;
static uint32_t rnd(uint32_t n) {
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (uint32_t)(g_rng % n);
}

typedef struct {
    char *p;
    size_t n, cap;
} text_buf;

static void put(text_buf *b, const char *s, size_t n) {
    while (b->n + n + 1 > b->cap) b->p = realloc(b->p, b->cap = b->cap ? 2 * b->cap : 4096);
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
}

static void puts_(text_buf *b, const char *s) { put(b, s, strlen(s)); }

static const char *const k_common[] = {
    "the", "of", "and", "to", "a", "in", "is", "that", "for", "it", "was", "on", "with", "as", "he", "be",
    "at", "by", "this", "had", "not", "are", "but", "from", "or", "have", "an", "they", "which", "one", "you",
    "were", "her", "all", "she", "there", "would", "their", "we", "him", "been", "has", "when", "who", "will",
    "more", "no", "if", "out", "so", "said", "what", "up", "its", "about", "into", "than", "them", "can",
    "only", "other", "new", "some", "could", "time", "these", "two", "may", "then", "do", "first", "any",
    "my", "now", "such", "like", "our", "over", "man", "me", "even", "most", "made", "after", "also", "did",
    "many", "before", "must", "through", "back", "years", "where", "much", "your", "way", "well", "down",
    "should", "because", "each", "just", "those", "people", "how", "too", "little", "state", "good", "very",
    "make", "world", "still", "own", "see", "men", "work", "long", "get", "here", "between", "both", "life",
    "being", "under", "never", "day", "same", "another", "know", "while", "last", "might", "us", "great",
    "old", "year", "off", "come", "since", "against", "go", "came", "right", "used", "take", "three",
    "picture", "photo", "image", "dog", "cat", "woman", "beach", "holding", "sitting", "standing", "street",
    "building", "camera", "question", "answer", "several", "colorful", "background", "foreground",
};
static const char *const k_contractions[] = {"don't", "it's", "I'm", "you're", "they'll", "we've", "she'd",
                                             "can't", "won't", "isn't"};
static const char *const k_syll[] = {"ka", "ter", "lo", "min", "gra", "vis", "ul", "pen", "dor", "shi",
                                     "qua", "bel", "tro", "nex", "ar", "ith", "mon", "zel", "ce", "ro"};
static const char *const k_punct[] = {",", ",", ".", ".", ".", ";", ":", "?", "!", " -", " (see", "\""};

static void add_word(text_buf *b) {
    uint32_t r = rnd(100);
    char w[64];
    if (r < 78) {
        snprintf(w, sizeof w, "%s", k_common[rnd(sizeof k_common / sizeof k_common[0])]);
    } else if (r < 84) {
        snprintf(w, sizeof w, "%s", k_contractions[rnd(sizeof k_contractions / sizeof k_contractions[0])]);
    } else if (r < 90) {
        snprintf(w, sizeof w, "%u", rnd(r < 87 ? 100 : 100000));
    } else {
        int n = 2 + (int)rnd(3);
        w[0] = 0;
        for (int i = 0; i < n; i++) strcat(w, k_syll[rnd(sizeof k_syll / sizeof k_syll[0])]);
    }
    if (rnd(12) == 0 && w[0] >= 'a' && w[0] <= 'z') w[0] = (char)(w[0] - 32);
    puts_(b, w);
}

static void add_manifest(text_buf *b) {
    json_error_t err;
    json_t *m = json_load_file(BLIP2_SHARED_DIR "/fixtures/MANIFEST.json", 0, &err);
    size_t i;
    json_t *e;
    json_array_foreach(json_object_get(m, "tokenizer"), i, e) {
        json_t *t = json_object_get(e, "text");
        put(b, json_string_value(t), json_string_length(t));
        puts_(b, "\n");
    }
    json_decref(m);
}

static text_buf make_text(size_t target) {
    text_buf b = {0};
    while (b.n < target) {
        if (rnd(40) == 0) add_manifest(&b);
        int words = 6 + (int)rnd(20);
        for (int i = 0; i < words; i++) {
            add_word(&b);
            if (rnd(8) == 0) puts_(&b, k_punct[rnd(sizeof k_punct / sizeof k_punct[0])]);
            puts_(&b, " ");
        }
        puts_(&b, rnd(5) ? ". " : ".\n\n");
    }
    return b;
}

static double encode_once(const blip2_tokenizer *tok, const text_buf *t, int32_t **ids, size_t *n) {
    blip2_status st = {0};
    double t0 = now_s();
    if (blip2_tokenizer_encode(tok, t->p, t->n, ids, n, &st)) {
        fprintf(stderr, "encode: %s\n", st.msg);
        exit(1);
    }
    return now_s() - t0;
}

static void bench_encode(blip2_tokenizer *tok, const text_buf *t, int reps) {
    double cold = 1e9, warm = 1e9, off = 1e9;
    size_t n = 0;
    for (int r = 0; r < reps; r++) {
        int32_t *ids;
        blip2_tokenizer_clear_cache(tok);
        double d = encode_once(tok, t, &ids, &n);
        cold = d < cold ? d : cold;
        free(ids);
        d = encode_once(tok, t, &ids, &n);
        warm = d < warm ? d : warm;
        free(ids);
        blip2_tokenizer_set_cache(tok, 0);
        d = encode_once(tok, t, &ids, &n);
        off = d < off ? d : off;
        free(ids);
        blip2_tokenizer_set_cache(tok, 1);
    }
    double mb = (double)t->n / 1e6;
    printf("text: %zu bytes -> %zu ids (%.2f bytes/id)\n", t->n, n, (double)t->n / (double)n);
    printf("encode, cache cold (cleared, fills during the pass): %8.1f MB/s\n", mb / cold);
    printf("encode, cache warm (second pass):                    %8.1f MB/s\n", mb / warm);
    printf("encode, cache off:                                   %8.1f MB/s\n", mb / off);
}

static void bench_decode(const blip2_tokenizer *tok, const text_buf *t, int reps) {
    blip2_status st = {0};
    int32_t *ids;
    size_t n;
    encode_once(tok, t, &ids, &n);
    double best = 1e9, best_stream = 1e9;
    for (int r = 0; r < reps; r++) {
        char *text;
        size_t len;
        double t0 = now_s();
        blip2_tokenizer_decode(tok, ids, n, &text, &len, &st);
        double d = now_s() - t0;
        best = d < best ? d : best;
        if (len != t->n || memcmp(text, t->p, len) != 0) fprintf(stderr, "decode mismatch!\n");
        free(text);
        blip2_detok_stream *s;
        blip2_detok_init(tok, &s, &st);
        t0 = now_s();
        size_t total = 0;
        for (size_t i = 0; i < n; i++) {
            const char *piece;
            blip2_detok_push(s, ids[i], &piece, &len, &st);
            total += len;
        }
        d = now_s() - t0;
        best_stream = d < best_stream ? d : best_stream;
        blip2_detok_free(s);
        if (total != t->n) fprintf(stderr, "stream mismatch!\n");
    }
    double mb = (double)t->n / 1e6;
    printf("decode, one call:                                    %8.1f MB/s (of text)\n", mb / best);
    printf("decode, streaming one id per push:                   %8.1f MB/s (%.0f ns/id)\n", mb / best_stream,
           best_stream * 1e9 / (double)n);
    free(ids);
}

int main(int argc, char **argv) {
    const char *dir = argc > 1 ? argv[1] : BLIP2_SHARED_DIR "/tokenizer/opt";
    size_t kib = argc > 2 ? (size_t)strtoul(argv[2], NULL, 10) : 512;
    blip2_status st = {0};
    blip2_tokenizer *tok;
    double t0 = now_s();
    if (blip2_tokenizer_load(dir, &tok, &st)) {
        fprintf(stderr, "load: %s\n", st.msg);
        return 1;
    }
    printf("load %s: %.1f ms\n", dir, (now_s() - t0) * 1e3);
    text_buf t = make_text(kib * 1024);
    bench_encode(tok, &t, 5);
    bench_decode(tok, &t, 5);
    free(t.p);
    blip2_tokenizer_free(tok);
    return 0;
}
