/* Tokenizer tests: manifest goldens, spec §6/§6.1 strings, extra strings
 * whose ids come from HF tokenizers (baked in below), Python-exact U+FFFD
 * replacement, streaming decode, load errors, speed of long runs, threads. */
#define _XOPEN_SOURCE 700

#include "tokenizer.h"

#include <jansson.h>
#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "check.h"

#define OPT_DIR BLIP2_SHARED_DIR "/tokenizer/opt"

/* Time bound for one long run (about 20 ms at -O2; a quadratic merge loop
 * takes minutes). ThreadSanitizer slows this code about 50x. */
#if defined(__SANITIZE_THREAD__)
#define LONG_RUN_LIMIT_S 10.0
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define LONG_RUN_LIMIT_S 10.0
#endif
#endif
#ifndef LONG_RUN_LIMIT_S
#define LONG_RUN_LIMIT_S 1.0
#endif
#define TINY_DIR BLIP2_SHARED_DIR "/fixtures/tiny-f16"

typedef struct {
    const char *text;
    size_t len;
    const int32_t *ids;
    size_t n;
} enc_case;

/* unit * reps + tail encodes to block * nblock + tail_ids. */
typedef struct {
    const char *unit;
    int reps;
    const char *tail;
    int32_t block[4];
    int nb;
    int nblock;
    int32_t tail_ids[4];
    int nt;
} long_case;

typedef struct {
    const char *in;
    size_t in_len;
    const char *out;
    size_t out_len;
} replace_case;

/* Generated with tokenizers 0.23.3 from shared/tokenizer/opt/tokenizer.json:
 *   Tokenizer.from_file(path).encode(text, add_special_tokens=False).ids
 * (none of these texts holds a special-token literal, which HF would split). */
static const enc_case k_hf_cases[] = {
    {"\341\240\216'll do", 9,
     (const int32_t[]){
        1376, 21402, 12736, 108, 890, 109},
     6},
    {"\343\200\200\343\200\200a", 7,
     (const int32_t[]){
        48516, 7471, 48516, 7471, 102},
     5},
    {"Hello\302\240world", 12,
     (const int32_t[]){
        31414, 50141, 8331},
     3},
    {"a\342\200\250b\342\200\251c\302\205d", 12,
     (const int32_t[]){
        102, 17, 11423, 428, 17, 15375, 438, 4056, 5782, 417},
     10},
    {"x\342\200\213y", 5,
     (const int32_t[]){
        1178, 13635, 219},
     3},
    {"I'M HERE 'S 'T it''s 'll've", 27,
     (const int32_t[]){
        100, 108, 448, 9443, 128, 104, 128, 565, 24, 17809, 29, 128, 890, 348},
     14},
    {"  \012  \012\011 x", 9,
     (const int32_t[]){
        1437, 1437, 50118, 1437, 1437, 50118, 50117, 3023},
     8},
    {"hello   world   ", 16,
     (const int32_t[]){
        42891, 1437, 1437, 232, 1437, 1437, 1437},
     7},
    {"\015\012\015\012line", 8,
     (const int32_t[]){
        50121, 50118, 50121, 50118, 1902},
     5},
    {"nul\000byte", 8,
     (const int32_t[]){
        282, 922, 50108, 47692},
     4},
    {"\000", 1,
     (const int32_t[]){
        50108},
     1},
    {"\305\235 \307\205 \341\276\217", 9,
     (const int32_t[]){
        1277, 46, 1437, 47040, 5782, 25974, 4726, 9357},
     8},
    {"\302\275 \302\262 \342\221\240 \331\243 \342\205\253", 16,
     (const int32_t[]){
        14989, 5505, 14292, 14333, 3602, 21402, 36963, 2469, 14333, 5782, 4958},
     11},
    {"e\314\201 caf\303\251", 9,
     (const int32_t[]){
        242, 44025, 10172, 26059},
     4},
    {"\360\237\217\263\357\270\217\342\200\215\360\237\214\210 \360\237\221\250\342\200\215\360\237\221\251\342\200\215\360\237\221\247", 33,
     (const int32_t[]){
        6569, 9357, 15264, 12605, 17, 8384, 6569, 14285, 23133, 26964, 11423, 17, 8384, 31193,
        15375, 17, 8384, 31193, 6248},
     19},
    {"\364\217\277\277 \357\277\277 \356\200\200", 12,
     (const int32_t[]){
        49820, 9357, 9470, 9470, 33549, 9470, 9470, 1437, 48466, 7471},
     10},
    {"tab\011\011x \013\014 y", 11,
     (const int32_t[]){
        34108, 50117, 50117, 1178, 1437, 50119, 50120, 1423},
     8},
    {"\341\232\200ogham \342\200\200\342\200\212\342\200\257\342\201\237 x", 23,
     (const int32_t[]){
        1376, 15113, 7471, 28552, 424, 44, 7471, 17, 27969, 17, 10965, 40669, 4333, 3023},
     14},
    {"3.14159e-10 1,000,000 $5.99 50%", 31,
     (const int32_t[]){
        246, 4, 1570, 27129, 242, 12, 698, 112, 6, 151, 6, 151, 68, 245, 4, 2831, 654, 207},
     18},
    {"\354\225\210\353\205\225\355\225\230\354\204\270\354\232\224 \331\205\330\261\330\255\330\250\330\247 \327\251\327\234\327\225\327\235 \340\244\250\340\244\256\340\244\270\340\245\215\340\244\244\340\245\207 \340\270\252\340\270\247\340\270\261\340\270\252\340\270\224\340\270\265", 73,
     (const int32_t[]){
        43998, 15722, 23133, 45209, 5782, 15722, 48589, 711, 43998, 11936, 18537, 43998, 15113,
        10674, 42620, 29434, 21593, 12410, 41117, 29438, 42455, 15375, 47759, 46174, 42358, 46,
        22214, 11423, 14238, 2840, 14238, 18537, 22919, 8384, 14238, 10470, 22919, 6382, 1437,
        24107, 10278, 24107, 6248, 24107, 15389, 24107, 10278, 24107, 10674, 24107, 8906},
     51},
    {"foo@bar.com https://example.com/a\077b=c&d=e", 41,
     (const int32_t[]){
        48359, 1039, 4901, 4, 175, 1205, 640, 46781, 4, 175, 73, 102, 116, 428, 5214, 438, 947, 417,
        5214, 242},
     20},
    {"!!!\077\077\077...,,, --- ***", 20,
     (const int32_t[]){
        16506, 38713, 734, 38581, 6, 21394, 19246},
     7},
    {"<|endoftext|> <s> <unk> <mask>", 30,
     (const int32_t[]){
        41552, 15483, 1397, 1116, 29015, 15483, 15698, 28696, 29, 15698, 28696, 6435, 15698, 28696,
        43776, 15698},
     16},
    {"The quick brown fox jumps over the lazy dog.\012\012A second paragraph, with \042quotes\042 and (parens).", 93,
     (const int32_t[]){
        133, 2119, 6219, 23602, 13855, 81, 5, 22414, 2335, 4, 50118, 50118, 250, 200, 17818, 6, 19,
        22, 2253, 17467, 113, 8, 36, 45208, 29, 322},
     26},
    {"  leading\011tabs\011\012\012\012   ", 21,
     (const int32_t[]){
        1437, 981, 50117, 34108, 29, 50117, 50140, 50118, 1437, 1437, 1437},
     11},
    {"\302\205\302\240\341\232\200\342\200\200", 10,
     (const int32_t[]){
        4056, 5782, 50141, 1376, 15113, 7471, 17, 7471},
     8},
    {"a\341\240\216b \341\240\216 \341\240\216\341\240\216", 16,
     (const int32_t[]){
        102, 1376, 21402, 12736, 428, 25974, 21402, 12736, 25974, 21402, 12736, 1376, 21402, 12736},
     14},
    {"\303\234n\303\257c\303\266d\303\251 \303\200\303\211\303\216\303\225\303\234 \303\237 \357\254\201 \307\206", 32,
     (const int32_t[]){
        3849, 48, 282, 29667, 438, 3671, 417, 1140, 952, 7471, 23791, 3849, 12736, 3849, 15722,
        3849, 48, 952, 4333, 33549, 11582, 10172, 1437, 47040, 27819},
     25},
    {"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy", 74,
     (const int32_t[]){
        42523, 42523, 42523, 42523, 1178, 1423, 33175, 33175, 33175, 33175, 33175, 33175, 33175,
        33175, 33175, 33175, 33175, 33175, 33175, 33175, 33175, 33175, 33175, 33175, 33175, 219},
     26},
    {"don'tDON'T'Twe'RE", 17,
     (const int32_t[]){
        7254, 75, 42737, 108, 565, 108, 45659, 108, 4629},
     9},
};
static const long_case k_long_cases[] = {
    {"a", 100001, "", {44172}, 1, 25000, {102}, 1},
    {" ", 20000, "a", {1437}, 1, 19999, {10}, 1},
    {"1", 30001, "", {43993}, 1, 7499, {1225, 17500}, 2},
    {"!", 30001, "", {47038}, 1, 3749, {32376, 44371}, 2},
    {"ab", 50000, "", {873}, 1, 50000, {0}, 0},
    {"\343\200\200", 10000, "a", {48516, 7471}, 2, 10000, {102}, 1},
    {"\303\251", 40000, "", {1140}, 1, 40000, {0}, 0},
    {"\360\237\232\200", 20000, "", {6569, 15113, 7471}, 3, 20000, {0}, 0},
    {"\012", 20000, "x", {50140}, 1, 9999, {50118, 50118, 1178}, 3},
    {"\341\240\216", 10000, "", {1376, 21402, 12736}, 3, 10000, {0}, 0},
};

/* Expected = bytes.decode('utf-8', errors='replace') from Python 3.11.7. */
static const replace_case k_replace_cases[] = {
    {"\200", 1, "\357\277\275", 3},
    {"\277\200", 2, "\357\277\275\357\277\275", 6},
    {"\300\257", 2, "\357\277\275\357\277\275", 6},
    {"\301\277", 2, "\357\277\275\357\277\275", 6},
    {"\302", 1, "\357\277\275", 3},
    {"\302\302\251", 3, "\357\277\275\302\251", 5},
    {"\340\200\257", 3, "\357\277\275\357\277\275\357\277\275", 9},
    {"\340\237\200", 3, "\357\277\275\357\277\275\357\277\275", 9},
    {"\340\240", 2, "\357\277\275", 3},
    {"\355\240\200", 3, "\357\277\275\357\277\275\357\277\275", 9},
    {"\355\277\277", 3, "\357\277\275\357\277\275\357\277\275", 9},
    {"\355\237\277", 3, "\355\237\277", 3},
    {"\360\200\200\200", 4, "\357\277\275\357\277\275\357\277\275\357\277\275", 12},
    {"\360\217\277\277", 4, "\357\277\275\357\277\275\357\277\275\357\277\275", 12},
    {"\364\220\200\200", 4, "\357\277\275\357\277\275\357\277\275\357\277\275", 12},
    {"\364\217\277\277", 4, "\364\217\277\277", 4},
    {"\365\200\200\200", 4, "\357\277\275\357\277\275\357\277\275\357\277\275", 12},
    {"\370\210\200\200\200", 5, "\357\277\275\357\277\275\357\277\275\357\277\275\357\277\275", 15},
    {"\376\377", 2, "\357\277\275\357\277\275", 6},
    {"\342\202", 2, "\357\277\275", 3},
    {"\342\202a", 3, "\357\277\275a", 4},
    {"\342\202\254", 3, "\342\202\254", 3},
    {"\360\237\230", 3, "\357\277\275", 3},
    {"\360\237", 2, "\357\277\275", 3},
    {"\360", 1, "\357\277\275", 3},
    {"a\360\237b\230\200c", 7, "a\357\277\275b\357\277\275\357\277\275c", 12},
    {"a\361\200\200\341\200\302b\200c\200\277d", 13, "a\357\277\275\357\277\275\357\277\275b\357\277\275c\357\277\275\357\277\275d", 22},
    {"\360\237\230\200\360\237\230", 7, "\360\237\230\200\357\277\275", 7},
    {"\341\200\342\360\221\222\361\277A", 9, "\357\277\275\357\277\275\357\277\275\357\277\275A", 13},
    {"\000\377\000", 3, "\000\357\277\275\000", 5},
    {"\357\273\277\357\277\276", 6, "\357\273\277\357\277\276", 6},
    {"\303(", 2, "\357\277\275(", 4},
    {"\240\241", 2, "\357\277\275\357\277\275", 6},
    {"\341\200\200\200", 4, "\341\200\200\357\277\275", 6},
};

static blip2_tokenizer *g_vocab; /* shared/tokenizer/opt from vocab.json + merges.txt */
static blip2_tokenizer *g_json;  /* the same from tokenizer.json alone */
static blip2_tokenizer *g_tiny;  /* fixtures/tiny-f16 (vocab + merges only) */

/* ------------------------------------------------------------------ helpers */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int ids_equal(const int32_t *a, size_t na, const int32_t *b, size_t nb) {
    return na == nb && (na == 0 || memcmp(a, b, na * sizeof *a) == 0);
}

static void print_ids(const char *what, const int32_t *ids, size_t n) {
    fprintf(stderr, "  %s (%zu):", what, n);
    for (size_t i = 0; i < n && i < 40; i++) fprintf(stderr, " %d", ids[i]);
    fprintf(stderr, n > 40 ? " ...\n" : "\n");
}

/* Streams ids one at a time and concatenates the pieces (plus finish). */
static char *stream_decode(const blip2_tokenizer *tok, const int32_t *ids, size_t n, size_t *len) {
    blip2_status st = {0};
    blip2_detok_stream *s = NULL;
    if (blip2_detok_init(tok, &s, &st)) return NULL;
    size_t cap = 64, used = 0;
    char *buf = malloc(cap);
    for (size_t i = 0; i <= n && buf; i++) {
        const char *piece;
        size_t k;
        blip2_code rc = i < n ? blip2_detok_push(s, ids[i], &piece, &k, &st) : blip2_detok_finish(s, &piece, &k, &st);
        if (rc) { free(buf); buf = NULL; break; }
        while (used + k + 1 > cap) buf = realloc(buf, cap *= 2);
        memcpy(buf + used, piece, k);
        used += k;
    }
    blip2_detok_free(s);
    if (buf) buf[used] = 0;
    *len = used;
    return buf;
}

/* decode(ids) == expected text, and the streamed pieces concatenate to it. */
static void check_decode(const blip2_tokenizer *tok, const int32_t *ids, size_t n, const char *want,
                         size_t want_len, const char *label) {
    blip2_status st = {0};
    char *text = NULL;
    size_t len = 0;
    CHECK(blip2_tokenizer_decode(tok, ids, n, &text, &len, &st) == BLIP2_OK, "%s: decode: %s", label, st.msg);
    CHECK(text && len == want_len && memcmp(text, want, len) == 0, "%s: decode gave '%.*s' (%zu bytes)", label,
          (int)len, text ? text : "", len);
    size_t slen = 0;
    char *streamed = stream_decode(tok, ids, n, &slen);
    CHECK(streamed && text && slen == len && memcmp(streamed, text, len) == 0,
          "%s: streamed pieces differ from decode()", label);
    free(streamed);
    free(text);
}

/* encode(text) == want with every tokenizer given, and decode(encode) == text. */
static void check_encode(const char *text, size_t len, const int32_t *want, size_t n_want, const char *label) {
    blip2_tokenizer *toks[] = {g_vocab, g_json, g_tiny};
    for (size_t k = 0; k < 3; k++) {
        if (!toks[k]) continue;
        blip2_status st = {0};
        int32_t *ids = NULL;
        size_t n = 0;
        blip2_code rc = blip2_tokenizer_encode(toks[k], text, len, &ids, &n, &st);
        CHECK(rc == BLIP2_OK, "%s [tok %zu]: encode: %s", label, k, st.msg);
        int same = rc == BLIP2_OK && ids_equal(ids, n, want, n_want);
        CHECK(same, "%s [tok %zu]: ids differ", label, k);
        if (!same) {
            print_ids("got", ids, n);
            print_ids("want", want, n_want);
        }
        if (k == 0 && rc == BLIP2_OK) check_decode(toks[k], ids, n, text, len, label);
        free(ids);
    }
}

static int32_t *json_ids(json_t *arr, size_t *n) {
    *n = json_array_size(arr);
    int32_t *ids = malloc((*n ? *n : 1) * sizeof *ids);
    for (size_t i = 0; i < *n; i++) ids[i] = (int32_t)json_integer_value(json_array_get(arr, i));
    return ids;
}

static json_t *load_manifest(const char *path) {
    json_error_t err;
    json_t *m = json_load_file(path, 0, &err);
    CHECK(m != NULL, "cannot load %s: %s", path, err.text);
    return m;
}

/* GPT-2 bytes_to_unicode, written independently of the tokenizer. */
static int byte_to_cp(int b) {
    if ((b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255)) return b;
    int k = 0;
    for (int c = 0; c < b; c++)
        if (!((c >= 33 && c <= 126) || (c >= 161 && c <= 172) || (c >= 174 && c <= 255))) k++;
    return 256 + k;
}

static int32_t byte_token(const blip2_tokenizer *tok, int b) {
    int cp = byte_to_cp(b);
    char s[3] = {0};
    if (cp < 0x80) s[0] = (char)cp;
    else {
        s[0] = (char)(0xC0 | (cp >> 6));
        s[1] = (char)(0x80 | (cp & 0x3F));
    }
    return blip2_tokenizer_token_id(tok, s);
}

/* -------------------------------------------------------------- temp dirs */

static char g_tmp[64];

static void tmp_write(const char *name, const char *content) {
    char p[256];
    snprintf(p, sizeof p, "%s/%s", g_tmp, name);
    FILE *f = fopen(p, "wb");
    if (f) {
        fputs(content, f);
        fclose(f);
    }
}

static void tmp_clear(void) {
    static const char *const names[] = {"vocab.json", "merges.txt", "tokenizer.json", "added_tokens.json",
                                        "special_tokens_map.json", "tokenizer_config.json"};
    char p[256];
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        snprintf(p, sizeof p, "%s/%s", g_tmp, names[i]);
        unlink(p);
    }
}

/* A vocab of the 256 byte chars (ids 0..255) plus `extra` tokens from 256. */
static json_t *tiny_vocab(const char *const *extra, size_t n_extra) {
    json_t *v = json_object();
    for (int b = 0; b < 256; b++) {
        int cp = byte_to_cp(b);
        char s[3] = {0};
        if (cp < 0x80) s[0] = (char)cp;
        else {
            s[0] = (char)(0xC0 | (cp >> 6));
            s[1] = (char)(0x80 | (cp & 0x3F));
        }
        json_object_set_new(v, s, json_integer(b));
    }
    for (size_t i = 0; i < n_extra; i++) json_object_set_new(v, extra[i], json_integer(256 + (int)i));
    return v;
}

static void tmp_write_json(const char *name, json_t *j) {
    char p[256];
    snprintf(p, sizeof p, "%s/%s", g_tmp, name);
    json_dump_file(j, p, JSON_COMPACT);
    json_decref(j);
}

static blip2_code tmp_load(blip2_tokenizer **tok, blip2_status *st) {
    *tok = NULL;
    return blip2_tokenizer_load(g_tmp, tok, st);
}

/* ------------------------------------------------------------------- tests */

static void test_load(void) {
    blip2_status st = {0};
    CHECK(blip2_tokenizer_load(OPT_DIR, &g_vocab, &st) == BLIP2_OK, "load %s: %s", OPT_DIR, st.msg);
    CHECK(blip2_tokenizer_load(TINY_DIR, &g_tiny, &st) == BLIP2_OK, "load %s: %s", TINY_DIR, st.msg);
    /* tokenizer.json alone: a directory holding only a link to it */
    char real[PATH_MAX], link[256];
    CHECK(realpath(OPT_DIR "/tokenizer.json", real) != NULL, "realpath of tokenizer.json");
    snprintf(link, sizeof link, "%s/tokenizer.json", g_tmp);
    CHECK(symlink(real, link) == 0, "symlink %s", link);
    CHECK(blip2_tokenizer_load(g_tmp, &g_json, &st) == BLIP2_OK, "load tokenizer.json: %s", st.msg);
    unlink(link);
    blip2_tokenizer *toks[] = {g_vocab, g_json, g_tiny};
    for (int k = 0; k < 3; k++) {
        const blip2_tokenizer *t = toks[k];
        if (!t) continue;
        CHECK(blip2_tokenizer_vocab_size(t) == 50266, "[tok %d] vocab size %d", k, blip2_tokenizer_vocab_size(t));
        CHECK(blip2_tokenizer_token_id(t, "\xC4\x8A") == 50118, "[tok %d] id of newline", k);
        CHECK(blip2_tokenizer_token_id(t, "\xC4\xA0the") == 5, "[tok %d] id of ' the'", k);
        CHECK(blip2_tokenizer_token_id(t, "<image>") == 50265, "[tok %d] id of <image>", k);
        CHECK(blip2_tokenizer_token_id(t, "</s>") == 2, "[tok %d] id of </s>", k);
        CHECK(blip2_tokenizer_token_id(t, "no such token") == -1, "[tok %d] missing token", k);
        CHECK(blip2_tokenizer_is_special(t, 1) && blip2_tokenizer_is_special(t, 2) &&
                  blip2_tokenizer_is_special(t, 50265),
              "[tok %d] 1, 2, 50265 special", k);
        CHECK(!blip2_tokenizer_is_special(t, 0) && !blip2_tokenizer_is_special(t, 3) &&
                  !blip2_tokenizer_is_special(t, 50264) && !blip2_tokenizer_is_special(t, 50266),
              "[tok %d] 0, 3, 50264, 50266 not special", k);
        for (int b = 0; b < 256; b++)
            if (byte_token(t, b) < 0) CHECK(0, "[tok %d] no token for byte %d", k, b);
    }
}

static void test_manifest_tokenizer(const char *path, int has_decoded) {
    json_t *m = load_manifest(path);
    json_t *list = json_object_get(m, "tokenizer"), *e;
    size_t i;
    CHECK(json_array_size(list) > 0, "%s: no tokenizer entries", path);
    json_array_foreach(list, i, e) {
        json_t *text = json_object_get(e, "text");
        size_t n;
        int32_t *ids = json_ids(json_object_get(e, "ids"), &n);
        char label[512];
        snprintf(label, sizeof label, "%s tokenizer[%zu]", path, i);
        check_encode(json_string_value(text), json_string_length(text), ids, n, label);
        json_t *dec = json_object_get(e, "decoded");
        if (has_decoded && g_vocab) check_decode(g_vocab, ids, n, json_string_value(dec), json_string_length(dec), label);
        free(ids);
    }
    json_decref(m);
}

/* fixtures.<name>.cases[].input_ids == [50265]*nq + [2] + BPE(prompt). */
static void test_fixture_prompts(void) {
    json_t *m = load_manifest(BLIP2_SHARED_DIR "/fixtures/MANIFEST.json");
    const char *name;
    json_t *fx;
    int count = 0;
    json_object_foreach(json_object_get(m, "fixtures"), name, fx) {
        int nq = (int)json_integer_value(json_object_get(fx, "nq"));
        size_t i;
        json_t *c;
        json_array_foreach(json_object_get(fx, "cases"), i, c) {
            json_t *prompt = json_object_get(c, "prompt");
            size_t n_want;
            int32_t *want = json_ids(json_object_get(c, "input_ids"), &n_want);
            blip2_tokenizer *toks[] = {g_vocab, g_json, g_tiny};
            for (int k = 0; k < 3; k++) {
                blip2_status st = {0};
                int32_t *ids = NULL;
                size_t n = 0;
                if (!toks[k]) continue;
                blip2_code rc = blip2_tokenizer_build_prompt(toks[k], json_string_value(prompt),
                                                             json_string_length(prompt), nq, 50265, 2, &ids, &n, &st);
                CHECK(rc == BLIP2_OK && ids_equal(ids, n, want, n_want), "%s case %zu [tok %d]: input_ids differ (%s)",
                      name, i, k, st.msg);
                free(ids);
            }
            /* and the prompt part alone round-trips */
            if (n_want >= (size_t)nq + 1)
                check_encode(json_string_value(prompt), json_string_length(prompt), want + nq + 1,
                             n_want - (size_t)nq - 1, name);
            free(want);
            count++;
        }
    }
    CHECK(count >= 10, "only %d fixture cases", count);
    json_decref(m);
}

static void test_spec_strings(void) {
    static const int32_t a[] = {1376, 21402, 12736, 108, 890, 109};
    static const int32_t b[] = {48516, 7471, 48516, 7471, 102};
    static const int32_t c[] = {45641, 35, 61, 343, 16, 42, 116, 31652, 35};
    static const int32_t d[] = {102, 693, 2828, 15, 5, 4105, 19, 10, 2335, 50118};
    check_encode("\xE1\xA0\x8E'll do", 9, a, 6, "spec 6.1 U+180E");
    check_encode("\xE3\x80\x80\xE3\x80\x80" "a", 7, b, 5, "spec 6.1 U+3000");
    check_encode("Question: which city is this? Answer:", 37, c, 9, "spec 6 question");
    check_encode("a woman sitting on the beach with a dog\n", 40, d, 10, "spec 6 woman");
    /* §3.4: [50265 x 32, 2] + prompt */
    blip2_status st = {0};
    int32_t *ids = NULL;
    size_t n = 0;
    CHECK(blip2_tokenizer_build_prompt(g_vocab, "Question: which city is this? Answer:", 37, 32, 50265, 2, &ids, &n,
                                       &st) == BLIP2_OK, "build_prompt: %s", st.msg);
    int ok = n == 42 && ids[31] == 50265 && ids[32] == 2 && memcmp(ids + 33, c, sizeof c) == 0;
    for (int i = 0; ok && i < 32; i++) ok = ids[i] == 50265;
    CHECK(ok, "spec 3.4 prompt ids");
    free(ids);
    CHECK(blip2_tokenizer_build_prompt(g_vocab, NULL, 0, 0, 50265, 2, &ids, &n, &st) == BLIP2_OK && n == 1 &&
              ids[0] == 2, "empty prompt, no queries -> [2]");
    free(ids);
    ids = NULL;
    CHECK(blip2_tokenizer_build_prompt(g_vocab, "x", 1, -1, 50265, 2, &ids, &n, &st) == BLIP2_EINVAL && !ids,
          "negative num_query_tokens rejected");
    CHECK(blip2_tokenizer_build_prompt(g_vocab, "x", 1, 4, -5, 2, &ids, &n, &st) == BLIP2_EINVAL,
          "negative image id rejected");
}

static void test_hf_cases(void) {
    for (size_t i = 0; i < sizeof k_hf_cases / sizeof k_hf_cases[0]; i++) {
        char label[64];
        snprintf(label, sizeof label, "hf case %zu", i);
        check_encode(k_hf_cases[i].text, k_hf_cases[i].len, k_hf_cases[i].ids, k_hf_cases[i].n, label);
    }
}

/* Long single pieces: must be fast (non-quadratic merge loop, linear regex
 * scan) and match HF. */
static void test_long_runs(void) {
    for (size_t c = 0; c < sizeof k_long_cases / sizeof k_long_cases[0]; c++) {
        const long_case *lc = &k_long_cases[c];
        size_t ul = strlen(lc->unit), tl = strlen(lc->tail), len = ul * (size_t)lc->reps + tl;
        char *text = malloc(len + 1);
        for (int r = 0; r < lc->reps; r++) memcpy(text + (size_t)r * ul, lc->unit, ul);
        memcpy(text + ul * (size_t)lc->reps, lc->tail, tl + 1);
        size_t n_want = (size_t)lc->nb * (size_t)lc->nblock + (size_t)lc->nt;
        int32_t *want = malloc(n_want * sizeof *want);
        for (int r = 0; r < lc->nblock; r++) memcpy(want + r * lc->nb, lc->block, (size_t)lc->nb * sizeof *want);
        memcpy(want + (size_t)lc->nb * (size_t)lc->nblock, lc->tail_ids, (size_t)lc->nt * sizeof *want);
        blip2_status st = {0};
        int32_t *ids = NULL;
        size_t n = 0;
        double t0 = now_s();
        blip2_code rc = blip2_tokenizer_encode(g_vocab, text, len, &ids, &n, &st);
        double dt = now_s() - t0;
        CHECK(rc == BLIP2_OK, "long case %zu: %s", c, st.msg);
        CHECK(ids_equal(ids, n, want, n_want), "long case %zu ('%s' x %d): ids differ (%zu vs %zu)", c, lc->unit,
              lc->reps, n, n_want);
        CHECK(dt < LONG_RUN_LIMIT_S, "long case %zu: %zu bytes took %.3f s", c, len, dt);
        printf("long case %zu: %zu bytes -> %zu ids in %.1f ms\n", c, len, n, dt * 1e3);
        char *back = NULL;
        size_t blen = 0;
        CHECK(blip2_tokenizer_decode(g_vocab, ids, n, &back, &blen, &st) == BLIP2_OK && blen == len &&
                  memcmp(back, text, len) == 0, "long case %zu: decode(encode) != text", c);
        free(back);
        free(ids);
        free(want);
        free(text);
    }
}

static void test_invalid_utf8(void) {
    static const struct {
        const char *s;
        size_t len, off;
    } bad[] = {
        {"ab\x80", 3, 2},         {"\xC0\xAF", 2, 0},        {"x\xED\xA0\x80y", 5, 1}, {"\xF4\x90\x80\x80", 4, 0},
        {"ok \xE2\x82", 6, 3},    {"\xF0\x9F\x98", 3, 0},    {"\xFF", 1, 0},           {"a\0\xC3(", 4, 2},
        {"\xE0\x80\xAF", 3, 0},   {"caf\xC3\xA9\xC3", 6, 5},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        blip2_status st = {0};
        int32_t *ids = (int32_t *)&st; /* must be reset to NULL */
        size_t n = 99;
        blip2_code rc = blip2_tokenizer_encode(g_vocab, bad[i].s, bad[i].len, &ids, &n, &st);
        CHECK(rc == BLIP2_EINVAL && ids == NULL && n == 0, "invalid UTF-8 case %zu accepted", i);
        CHECK_MSG_HAS(st.msg, "UTF-8");
        char off[32];
        snprintf(off, sizeof off, "offset %zu", bad[i].off);
        CHECK_MSG_HAS(st.msg, off);
        rc = blip2_tokenizer_build_prompt(g_vocab, bad[i].s, bad[i].len, 32, 50265, 2, &ids, &n, &st);
        CHECK(rc == BLIP2_EINVAL && ids == NULL, "build_prompt accepted invalid UTF-8 case %zu", i);
    }
    blip2_status st = {0};
    int32_t *ids = NULL;
    size_t n = 0;
    CHECK(blip2_tokenizer_encode(g_vocab, NULL, 3, &ids, &n, &st) == BLIP2_EINVAL, "NULL text rejected");
    CHECK(blip2_tokenizer_encode(g_vocab, NULL, 0, &ids, &n, &st) == BLIP2_OK && n == 0 && ids,
          "NULL empty text gives no ids");
    free(ids);
}

/* Decoding byte tokens that form invalid UTF-8 = Python's errors='replace'. */
static void test_replace_decoding(void) {
    for (size_t i = 0; i < sizeof k_replace_cases / sizeof k_replace_cases[0]; i++) {
        const replace_case *rc = &k_replace_cases[i];
        int32_t ids[16];
        for (size_t k = 0; k < rc->in_len; k++) ids[k] = byte_token(g_vocab, (unsigned char)rc->in[k]);
        char label[64];
        snprintf(label, sizeof label, "replace case %zu", i);
        check_decode(g_vocab, ids, rc->in_len, rc->out, rc->out_len, label);
    }
}

static void test_decode_ids(void) {
    /* specials and ids the tokenizer lacks decode to nothing */
    int32_t gone[64];
    size_t n = 0;
    for (int32_t id = 50266; id <= 50303; id++) gone[n++] = id;
    int32_t more[] = {1, 2, 50265, -1, INT32_MIN, 50304, 1 << 30, INT32_MAX};
    memcpy(gone + n, more, sizeof more);
    n += sizeof more / sizeof more[0];
    check_decode(g_vocab, gone, n, "", 0, "dropped ids");
    check_decode(g_json, gone, n, "", 0, "dropped ids (tokenizer.json)");
    check_decode(g_tiny, gone, n, "", 0, "dropped ids (tiny)");
    int32_t mixed[] = {2, 31414, 50266, 6, 1, 232, 50265, 328, 2};
    check_decode(g_vocab, mixed, 9, "Hello, world!", 13, "mixed with specials");
    /* <s>, <unk>, <mask>, <|endoftext|> are ordinary tokens here */
    int32_t plain[] = {0, 3, 50264, 50260};
    check_decode(g_vocab, plain, 4, "<s><unk><mask><|endoftext|>", 27, "non-special fairseq tokens");
    check_decode(g_vocab, NULL, 0, "", 0, "no ids");
}

static void test_streaming(void) {
    /* "🚀" = F0 9F 9A 80 pushed one byte token at a time: held back, then whole */
    const unsigned char rocket[] = {0xF0, 0x9F, 0x9A, 0x80};
    blip2_status st = {0};
    blip2_detok_stream *s = NULL;
    CHECK(blip2_detok_init(g_vocab, &s, &st) == BLIP2_OK, "detok_init: %s", st.msg);
    const char *piece;
    size_t len;
    for (int rep = 0; rep < 2 && s; rep++) {
        for (int i = 0; i < 4; i++) {
            CHECK(blip2_detok_push(s, byte_token(g_vocab, rocket[i]), &piece, &len, &st) == BLIP2_OK, "push");
            if (i < 3) CHECK(len == 0, "byte %d of the emoji emitted %zu bytes early", i, len);
            else CHECK(len == 4 && memcmp(piece, rocket, 4) == 0, "emoji not emitted whole");
            if (i == 1) { /* a special id in the middle emits nothing and keeps the held bytes */
                CHECK(blip2_detok_push(s, 2, &piece, &len, &st) == BLIP2_OK && len == 0, "special id mid-char");
            }
        }
    }
    /* an unfinished sequence is flushed as one U+FFFD by finish */
    blip2_detok_push(s, byte_token(g_vocab, 'a'), &piece, &len, &st);
    CHECK(len == 1 && piece[0] == 'a', "plain byte emitted at once");
    blip2_detok_push(s, byte_token(g_vocab, 0xF0), &piece, &len, &st);
    blip2_detok_push(s, byte_token(g_vocab, 0x9F), &piece, &len, &st);
    CHECK(len == 0, "incomplete prefix held");
    CHECK(blip2_detok_finish(s, &piece, &len, &st) == BLIP2_OK && len == 3 && memcmp(piece, "\xEF\xBF\xBD", 3) == 0,
          "finish flushes U+FFFD");
    CHECK(blip2_detok_finish(s, &piece, &len, &st) == BLIP2_OK && len == 0, "second finish is empty");
    /* an invalid continuation releases the held bytes at once */
    blip2_detok_push(s, byte_token(g_vocab, 0xE2), &piece, &len, &st);
    blip2_detok_push(s, byte_token(g_vocab, 'x'), &piece, &len, &st);
    CHECK(len == 4 && memcmp(piece, "\xEF\xBF\xBDx", 4) == 0, "broken sequence -> U+FFFD x");
    blip2_detok_free(s);
    /* the manifest's emoji ids split across tokens */
    static const int32_t emoji[] = {991, 16873, 8103, 15113, 7471, 6569, 16948, 15389, 253};
    check_decode(g_vocab, emoji, 9, "emoji \xF0\x9F\x9A\x80\xF0\x9F\x90\xB1 end", 18, "split emoji");
}

static void test_cache(void) {
    /* Same ids with the cache cold, warm and off. */
    const char *text = "the cat and the dog and the cat, again and again: the the the";
    size_t len = strlen(text);
    int32_t *first = NULL, *ids = NULL;
    size_t n1 = 0, n = 0;
    blip2_status st = {0};
    blip2_tokenizer_clear_cache(g_vocab);
    CHECK(blip2_tokenizer_encode(g_vocab, text, len, &first, &n1, &st) == BLIP2_OK, "cold");
    CHECK(blip2_tokenizer_encode(g_vocab, text, len, &ids, &n, &st) == BLIP2_OK && ids_equal(ids, n, first, n1),
          "warm cache differs");
    free(ids);
    blip2_tokenizer_set_cache(g_vocab, 0);
    CHECK(blip2_tokenizer_encode(g_vocab, text, len, &ids, &n, &st) == BLIP2_OK && ids_equal(ids, n, first, n1),
          "no cache differs");
    blip2_tokenizer_set_cache(g_vocab, 1);
    free(ids);
    free(first);
    /* hf cases without the cache too */
    blip2_tokenizer_set_cache(g_json, 0);
    for (size_t i = 0; i < sizeof k_hf_cases / sizeof k_hf_cases[0]; i++) {
        CHECK(blip2_tokenizer_encode(g_json, k_hf_cases[i].text, k_hf_cases[i].len, &ids, &n, &st) == BLIP2_OK &&
                  ids_equal(ids, n, k_hf_cases[i].ids, k_hf_cases[i].n), "hf case %zu without cache", i);
        free(ids);
    }
    blip2_tokenizer_set_cache(g_json, 1);
}

typedef struct {
    int failures;
} thread_arg;

static void *thread_main(void *p) {
    thread_arg *a = p;
    for (int rep = 0; rep < 30; rep++) {
        for (size_t i = 0; i < sizeof k_hf_cases / sizeof k_hf_cases[0]; i++) {
            size_t k = (i + (size_t)rep) % (sizeof k_hf_cases / sizeof k_hf_cases[0]);
            blip2_status st = {0};
            int32_t *ids = NULL;
            size_t n = 0;
            if (blip2_tokenizer_encode(g_vocab, k_hf_cases[k].text, k_hf_cases[k].len, &ids, &n, &st) ||
                !ids_equal(ids, n, k_hf_cases[k].ids, k_hf_cases[k].n))
                a->failures++;
            char *text = NULL;
            size_t len = 0;
            if (blip2_tokenizer_decode(g_vocab, ids, n, &text, &len, &st) || len != k_hf_cases[k].len ||
                memcmp(text, k_hf_cases[k].text, len) != 0)
                a->failures++;
            free(text);
            free(ids);
        }
        if (rep % 10 == 0) blip2_tokenizer_clear_cache(g_vocab);
    }
    return NULL;
}

static void test_threads(void) {
    enum { N = 6 };
    pthread_t th[N];
    thread_arg args[N] = {{0}};
    for (int i = 0; i < N; i++) pthread_create(&th[i], NULL, thread_main, &args[i]);
    for (int i = 0; i < N; i++) {
        pthread_join(th[i], NULL);
        CHECK(args[i].failures == 0, "thread %d: %d failures", i, args[i].failures);
    }
}

/* Synthetic tokenizer files: both merge forms, and the errors. */
static void test_synthetic_files(void) {
    static const char *const extra[] = {"ab", "abc", "\xC4\xA0\x61"}; /* Ġa */
    blip2_status st = {0};
    blip2_tokenizer *t = NULL;
    const int32_t want[] = {257, 256, 32, 256, 258}; /* abc ab | Ġ ab | Ġa */
    int32_t *ids = NULL;
    size_t n = 0;

    /* merges.txt with CRLF and trailing empty lines */
    tmp_write_json("vocab.json", tiny_vocab(extra, 3));
    tmp_write("merges.txt", "#version: 0.2\r\na b\r\nab c\r\n\xC4\xA0 a\r\n\r\n\n");
    CHECK(tmp_load(&t, &st) == BLIP2_OK, "synthetic vocab+merges: %s", st.msg);
    CHECK(t && blip2_tokenizer_encode(t, "abcab ab a", 10, &ids, &n, &st) == BLIP2_OK && ids_equal(ids, n, want, 5),
          "synthetic merges.txt encode");
    CHECK(t && blip2_tokenizer_vocab_size(t) == 259, "synthetic vocab size");
    free(ids);
    blip2_tokenizer_free(t);
    tmp_clear();

    /* tokenizer.json with "a b" strings and with [a, b] pairs */
    for (int form = 0; form < 2; form++) {
        json_t *root = json_object(), *model = json_object(), *merges = json_array();
        const char *pairs[][2] = {{"a", "b"}, {"ab", "c"}, {"\xC4\xA0", "a"}};
        for (int i = 0; i < 3; i++) {
            if (form == 0) {
                char s[16];
                snprintf(s, sizeof s, "%s %s", pairs[i][0], pairs[i][1]);
                json_array_append_new(merges, json_string(s));
            } else {
                json_array_append_new(merges, json_pack("[s, s]", pairs[i][0], pairs[i][1]));
            }
        }
        json_object_set_new(model, "type", json_string("BPE"));
        json_object_set_new(model, "vocab", tiny_vocab(extra, 3));
        json_object_set_new(model, "merges", merges);
        json_object_set_new(root, "model", model);
        json_object_set_new(root, "added_tokens", json_pack("[{s:i, s:s, s:b}]", "id", 300, "content", "<x>", "special", 1));
        tmp_write_json("tokenizer.json", root);
        CHECK(tmp_load(&t, &st) == BLIP2_OK, "synthetic tokenizer.json form %d: %s", form, st.msg);
        CHECK(t && blip2_tokenizer_encode(t, "abcab ab a", 10, &ids, &n, &st) == BLIP2_OK && ids_equal(ids, n, want, 5),
              "synthetic tokenizer.json form %d encode", form);
        CHECK(t && blip2_tokenizer_vocab_size(t) == 301 && blip2_tokenizer_is_special(t, 300), "added token 300");
        free(ids);
        blip2_tokenizer_free(t);
        tmp_clear();
    }

    /* errors name the file and the problem */
    struct {
        const char *vocab, *merges, *tokjson, *added;
        blip2_code code;
        const char *msg1, *msg2;
    } errs[] = {
        {NULL, NULL, NULL, NULL, BLIP2_EIO, "no tokenizer in", "tokenizer.json"},
        {"{\"a\": 1,", "#version: 0.2\n", NULL, NULL, BLIP2_EFORMAT, "vocab.json", "malformed JSON"},
        {"[1, 2]", "", NULL, NULL, BLIP2_EFORMAT, "vocab.json", "not a JSON object"},
        {"{\"a\": \"x\"}", "", NULL, NULL, BLIP2_EFORMAT, "vocab.json", "not an integer"},
        {"", "#version: 0.2\n", NULL, NULL, BLIP2_EIO, "vocab.json", "no such file"},
        {"V", "#version: 0.2\na b\nabc\n", NULL, NULL, BLIP2_EFORMAT, "merges.txt line 3", "one space"},
        {"V", "a b\n\nab c\n", NULL, NULL, BLIP2_EFORMAT, "merges.txt line 2", "one space"},
        {"V", "a  b\n", NULL, NULL, BLIP2_EFORMAT, "merges.txt line 1", "one space"},
        {"V", "a b\nzz q\n", NULL, NULL, BLIP2_EFORMAT, "merges.txt line 2", "'zz' is not in the vocab"},
        {"V", "a c\n", NULL, NULL, BLIP2_EFORMAT, "merges.txt line 1", "'ac' is not in the vocab"},
        {"{\"a\": 0}", "", NULL, NULL, BLIP2_EFORMAT, "vocab.json", "lacks the byte-level token"},
        {"V", "a b\n", NULL, "{\"<image>\": 7}", BLIP2_EFORMAT, "added_tokens.json", "id 7 is used by both"},
        {"V", "a b\n", NULL, "{\"ab\": 9}", BLIP2_EFORMAT, "added_tokens.json", "already has id 256"},
        {"V", "a b\n", NULL, "{\"<image>\": 12345678901}", BLIP2_EFORMAT, "added_tokens.json", "outside"},
        {"V", "a b\n", NULL, "{\"<image>\"", BLIP2_EFORMAT, "added_tokens.json", "malformed JSON"},
        {NULL, NULL, "{\"model\": {\"type\": \"WordPiece\"}}", NULL, BLIP2_EFORMAT, "tokenizer.json", "BPE"},
        {NULL, NULL, "{\"model\": {\"vocab\": {}}}", NULL, BLIP2_EFORMAT, "tokenizer.json", "lacks"},
        {NULL, NULL, "{\"model\": {\"vocab\": VV, \"merges\": [[\"a\"]]}}", NULL, BLIP2_EFORMAT,
         "tokenizer.json model.merges[0]", "expected"},
        {NULL, NULL, "{\"model\": {\"vocab\": VV, \"merges\": [\"a b\", \"ab\"]}}", NULL, BLIP2_EFORMAT,
         "tokenizer.json model.merges[1]", "one space"},
        {NULL, NULL, "{\"model\"", NULL, BLIP2_EFORMAT, "tokenizer.json", "malformed JSON"},
        {NULL, NULL, "{\"normalizer\": {\"type\": \"NFC\"}, \"model\": {\"vocab\": VV, \"merges\": []}}", NULL,
         BLIP2_EFORMAT, "tokenizer.json", "normalizer is not supported"},
        {NULL, NULL,
         "{\"pre_tokenizer\": {\"type\": \"ByteLevel\", \"add_prefix_space\": true}, \"model\": {\"vocab\": VV, "
         "\"merges\": []}}",
         NULL, BLIP2_EFORMAT, "tokenizer.json", "add_prefix_space"},
    };
    json_t *vv = tiny_vocab(extra, 3);
    char *vv_text = json_dumps(vv, JSON_COMPACT);
    json_decref(vv);
    for (size_t i = 0; i < sizeof errs / sizeof errs[0]; i++) {
        if (errs[i].vocab && *errs[i].vocab) tmp_write("vocab.json", strcmp(errs[i].vocab, "V") ? errs[i].vocab : vv_text);
        if (errs[i].merges) tmp_write("merges.txt", errs[i].merges);
        if (errs[i].added) tmp_write("added_tokens.json", errs[i].added);
        if (errs[i].tokjson) {
            const char *vvp = strstr(errs[i].tokjson, "VV");
            char buf[65536];
            if (vvp)
                snprintf(buf, sizeof buf, "%.*s%s%s", (int)(vvp - errs[i].tokjson), errs[i].tokjson, vv_text, vvp + 2);
            else
                snprintf(buf, sizeof buf, "%s", errs[i].tokjson);
            tmp_write("tokenizer.json", buf);
        }
        memset(&st, 0, sizeof st);
        t = (blip2_tokenizer *)&st;
        blip2_code rc = tmp_load(&t, &st);
        CHECK(rc == errs[i].code && t == NULL, "error case %zu: got %s (%s)", i, blip2_code_name(rc), st.msg);
        CHECK_MSG_HAS(st.msg, errs[i].msg1);
        CHECK_MSG_HAS(st.msg, errs[i].msg2);
        if (rc == BLIP2_OK) blip2_tokenizer_free(t);
        tmp_clear();
    }
    free(vv_text);
    CHECK(blip2_tokenizer_load("/nonexistent/dir", &t, &st) == BLIP2_EIO, "missing dir");
    CHECK_MSG_HAS(st.msg, "/nonexistent/dir");
}

int main(void) {
    snprintf(g_tmp, sizeof g_tmp, "/tmp/blip2_tok_test_XXXXXX");
    if (!mkdtemp(g_tmp)) {
        perror("mkdtemp");
        return 1;
    }
    test_load();
    if (!g_vocab || !g_json || !g_tiny) {
        rmdir(g_tmp);
        return check_summary();
    }
    test_manifest_tokenizer(BLIP2_SHARED_DIR "/fixtures/MANIFEST.json", 1);
    test_manifest_tokenizer(BLIP2_SHARED_DIR "/fixtures/inputs/MANIFEST.json", 0);
    test_fixture_prompts();
    test_spec_strings();
    test_hf_cases();
    test_long_runs();
    test_invalid_utf8();
    test_replace_decoding();
    test_decode_ids();
    test_streaming();
    test_cache();
    test_threads();
    test_synthetic_files();
    blip2_tokenizer_free(g_vocab);
    blip2_tokenizer_free(g_json);
    blip2_tokenizer_free(g_tiny);
    rmdir(g_tmp);
    return check_summary();
}
