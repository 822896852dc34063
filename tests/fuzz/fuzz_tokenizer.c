/* libFuzzer target for the tokenizer. Per input:
 *   1. encode it; valid UTF-8 must encode (invalid must fail with EINVAL), and
 *      decode(encode(s)) == s, streamed or not; build_prompt must agree;
 *   2. read it as 16-bit ids (including negative, huge, special and unassigned
 *      ids) and decode: output is valid UTF-8 and the streamed pieces (each
 *      valid UTF-8) concatenate to decode();
 *   3. decode its bytes as byte-level tokens: equals the input when it is
 *      valid UTF-8, else valid UTF-8 with replacements.
 * The tokenizer is loaded once from $BLIP2_TOKENIZER_DIR, else
 * $BLIP2_SHARED_DIR/tokenizer/opt, else the compiled-in BLIP2_SHARED_DIR's.
 *
 * clang -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
 *   -DBLIP2_SHARED_DIR=\"/work/shared\" -I runtime runtime/status.c runtime/tokenizer.c \
 *   tests/fuzz/fuzz_tokenizer.c -lpcre2-8 -ljansson -lpthread -o fuzz_tokenizer
 * ./fuzz_tokenizer -max_total_time=60 corpus/ */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tokenizer.h"

#ifndef BLIP2_SHARED_DIR
#define BLIP2_SHARED_DIR "../shared"
#endif

static blip2_tokenizer *g_tok;
static int32_t g_byte_id[256];

#define REQUIRE(cond)                                                          \
    do {                                                                       \
        if (!(cond)) {                                                         \
            fprintf(stderr, "%s:%d: requirement failed: %s\n", __FILE__, __LINE__, #cond); \
            abort();                                                           \
        }                                                                      \
    } while (0)

/* Strict UTF-8 check, independent of the tokenizer's own. */
static int utf8_valid(const uint8_t *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        uint8_t b = s[i];
        size_t k;
        uint32_t cp, min;
        if (b < 0x80) { i++; continue; }
        if ((b & 0xE0) == 0xC0) { k = 1; cp = b & 0x1F; min = 0x80; }
        else if ((b & 0xF0) == 0xE0) { k = 2; cp = b & 0x0F; min = 0x800; }
        else if ((b & 0xF8) == 0xF0) { k = 3; cp = b & 0x07; min = 0x10000; }
        else return 0;
        if (n - i <= k) return 0;
        for (size_t j = 1; j <= k; j++) {
            if ((s[i + j] & 0xC0) != 0x80) return 0;
            cp = (cp << 6) | (s[i + j] & 0x3F);
        }
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
        i += k + 1;
    }
    return 1;
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    const char *dir = getenv("BLIP2_TOKENIZER_DIR"), *shared = getenv("BLIP2_SHARED_DIR");
    char buf[4096];
    if (!dir && shared) {
        snprintf(buf, sizeof buf, "%s/tokenizer/opt", shared);
        dir = buf;
    }
    if (!dir) dir = BLIP2_SHARED_DIR "/tokenizer/opt";
    blip2_status st = {0};
    if (blip2_tokenizer_load(dir, &g_tok, &st)) {
        fprintf(stderr, "fuzz_tokenizer: %s\n", st.msg);
        abort();
    }
    for (int b = 0; b < 256; b++) { /* GPT-2 bytes_to_unicode */
        int same = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255), k = 0;
        for (int c = 0; c < b && !same; c++)
            k += !((c >= 33 && c <= 126) || (c >= 161 && c <= 172) || (c >= 174 && c <= 255));
        int cp = same ? b : 256 + k;
        char s[3] = {0};
        if (cp < 0x80) s[0] = (char)cp;
        else {
            s[0] = (char)(0xC0 | (cp >> 6));
            s[1] = (char)(0x80 | (cp & 0x3F));
        }
        g_byte_id[b] = blip2_tokenizer_token_id(g_tok, s);
        REQUIRE(g_byte_id[b] >= 0);
    }
    return 0;
}

/* Decodes ids both ways; returns decode()'s text (caller frees). */
static char *decode_both(const int32_t *ids, size_t n, size_t *len) {
    blip2_status st = {0};
    char *text = NULL;
    REQUIRE(blip2_tokenizer_decode(g_tok, ids, n, &text, len, &st) == BLIP2_OK);
    REQUIRE(text[*len] == 0 && utf8_valid((const uint8_t *)text, *len));
    blip2_detok_stream *s = NULL;
    REQUIRE(blip2_detok_init(g_tok, &s, &st) == BLIP2_OK);
    size_t used = 0;
    for (size_t i = 0; i <= n; i++) {
        const char *piece;
        size_t k;
        if (i < n) REQUIRE(blip2_detok_push(s, ids[i], &piece, &k, &st) == BLIP2_OK);
        else REQUIRE(blip2_detok_finish(s, &piece, &k, &st) == BLIP2_OK);
        REQUIRE(utf8_valid((const uint8_t *)piece, k));
        REQUIRE(used + k <= *len && memcmp(text + used, piece, k) == 0);
        used += k;
    }
    REQUIRE(used == *len);
    blip2_detok_free(s);
    return text;
}

static void check_encode(const uint8_t *data, size_t size) {
    blip2_status st = {0};
    int32_t *ids = NULL;
    size_t n = 0;
    blip2_code rc = blip2_tokenizer_encode(g_tok, (const char *)data, size, &ids, &n, &st);
    int valid = utf8_valid(data, size);
    REQUIRE(rc == (valid ? BLIP2_OK : BLIP2_EINVAL));
    if (rc) {
        REQUIRE(ids == NULL && strstr(st.msg, "UTF-8"));
        return;
    }
    REQUIRE(n <= size);
    for (size_t i = 0; i < n; i++)
        REQUIRE(ids[i] >= 0 && ids[i] < blip2_tokenizer_vocab_size(g_tok) && !blip2_tokenizer_is_special(g_tok, ids[i]));
    size_t len;
    char *text = decode_both(ids, n, &len);
    REQUIRE(len == size && memcmp(text, data, size) == 0);
    free(text);
    if (size > 65536) { /* build_prompt re-encodes; keep huge inputs within -timeout */
        free(ids);
        return;
    }
    int nq = (int)(size % 40);
    int32_t *p = NULL;
    size_t np = 0;
    REQUIRE(blip2_tokenizer_build_prompt(g_tok, (const char *)data, size, nq, 50265, 2, &p, &np, &st) == BLIP2_OK);
    REQUIRE(np == (size_t)nq + 1 + n && p[nq] == 2 && memcmp(p + nq + 1, ids, n * sizeof *ids) == 0);
    for (int i = 0; i < nq; i++) REQUIRE(p[i] == 50265);
    free(p);
    free(ids);
}

/* 16-bit little-endian words -> ids spanning the vocab, the unassigned ids
 * above it, negatives and huge values. */
static void check_raw_ids(const uint8_t *data, size_t size) {
    size_t n = size / 2;
    int32_t *ids = malloc((n ? n : 1) * sizeof *ids);
    for (size_t i = 0; i < n; i++) {
        uint32_t v = (uint32_t)data[2 * i] | ((uint32_t)data[2 * i + 1] << 8);
        if (v < 60000) ids[i] = (int32_t)(v % 50320);
        else if (v < 65000) ids[i] = -(int32_t)(v - 60000) - 1;
        else ids[i] = v & 1 ? INT32_MAX : INT32_MIN;
    }
    size_t len;
    free(decode_both(ids, n, &len));
    free(ids);
}

static int has_fffd(const char *s, size_t n) {
    for (size_t i = 0; i + 3 <= n; i++)
        if (memcmp(s + i, "\xEF\xBF\xBD", 3) == 0) return 1;
    return 0;
}

static void check_byte_tokens(const uint8_t *data, size_t size) {
    int32_t *ids = malloc((size ? size : 1) * sizeof *ids);
    for (size_t i = 0; i < size; i++) ids[i] = g_byte_id[data[i]];
    size_t len;
    char *text = decode_both(ids, size, &len);
    if (utf8_valid(data, size)) REQUIRE(len == size && memcmp(text, data, size) == 0);
    else REQUIRE(has_fffd(text, len));
    free(text);
    free(ids);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    check_encode(data, size);
    check_raw_ids(data, size);
    check_byte_tokens(data, size);
    return 0;
}
