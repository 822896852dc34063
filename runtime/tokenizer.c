/* OPT byte-level BPE (spec §6, §6.1). Layout:
 *   - loading: vocab.json + merges.txt, or tokenizer.json; side files for
 *     added/special tokens. Merges are resolved to (left id, right id) ->
 *     (rank, merged id) so BPE works on ids, never on strings.
 *   - encoding: strict UTF-8 check once, GPT-2 regex (PCRE2, UTF|UCP, with
 *     \p{White_Space} for \s), then per piece: word cache, else a linked list
 *     of symbols + min-heap of candidate merges keyed by (rank, position),
 *     the same algorithm (and tie-breaks) as HF tokenizers' Word::merge_all.
 *   - decoding: id -> raw bytes (precomputed), then UTF-8 with U+FFFD per
 *     maximal invalid subpart (Python's errors='replace'). */
#define _POSIX_C_SOURCE 200809L
#define PCRE2_CODE_UNIT_WIDTH 8

#include "tokenizer.h"

#include <errno.h>
#include <jansson.h>
#include <pcre2.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define MAX_TOKEN_ID ((1 << 22) - 1) /* bounds the id tables a file can make us allocate */
#define MAX_QUERY_TOKENS 65536

/* GPT-2 pre-tokenizer. \p{White_Space} instead of \s: PCRE2's UCP \s also
 * matches U+180E, which the reference's engine does not (spec §6.1). */
static const char k_pattern[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\p{White_Space}\\p{L}\\p{N}]+"
    "|\\p{White_Space}+(?!\\P{White_Space})|\\p{White_Space}+";

/* ---------------------------------------------------------------- word cache */

/* Direct-mapped, bounded (about 1 MiB), shared by all threads. Each slot is
 * guarded by one of CACHE_SHARDS mutexes (slot index mod shards), so threads
 * rarely contend; a hit copies the ids out while holding the lock. */
#define CACHE_SLOTS 8192
#define CACHE_SHARDS 64
#define CACHE_KEY_MAX 24

typedef struct {
    uint32_t hash;
    uint8_t klen; /* 0 = empty (pieces are never empty) */
    uint8_t nids;
    char key[CACHE_KEY_MAX];
    int32_t ids[CACHE_KEY_MAX]; /* each id covers >= 1 byte, so nids <= klen */
} cache_slot;

typedef struct {
    pthread_mutex_t locks[CACHE_SHARDS];
    cache_slot slots[CACHE_SLOTS];
} word_cache;

/* ----------------------------------------------------------------- tokenizer */

typedef struct {
    uint32_t name_off, name_len; /* byte-level string (vocab key or added content) */
    int32_t id;
} tok_entry;

typedef struct {
    uint32_t hash;
    int32_t entry; /* -1 = empty */
} name_slot;

typedef struct {
    uint64_t pair; /* (left id << 32) | right id */
    int32_t rank;  /* -1 = empty */
    int32_t new_id;
} merge_slot;

enum { ID_PRESENT = 1, ID_SPECIAL = 2 };

struct blip2_tokenizer {
    /* names: arena of byte-level strings, hashed for string -> entry */
    char *names;
    size_t names_len, names_cap;
    tok_entry *entries;
    size_t n_entries, entries_cap;
    name_slot *name_tab;
    size_t name_mask;
    /* id -> entry index (-1 none), flags and raw bytes; n_ids = max id + 1 */
    int32_t *id_entry;
    uint8_t *id_flags;
    size_t n_ids, id_cap;
    uint32_t *id_off, *id_len;
    char *bytes;
    /* merges */
    merge_slot *merge_tab;
    size_t merge_mask, n_merges;
    int32_t byte_id[256];
    uint16_t byte_to_cp[256];
    int16_t cp_to_byte[0x144];
    pcre2_code *re;
    word_cache *cache;
    bool cache_on;
};

/* ------------------------------------------------------------------- helpers */

static uint32_t hash_bytes(const void *p, size_t n) {
    const unsigned char *s = p;
    uint32_t h = 2166136261u; /* FNV-1a */
    for (size_t i = 0; i < n; i++) h = (h ^ s[i]) * 16777619u;
    return h;
}

static uint64_t hash_pair(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    return x;
}

static size_t pow2_at_least(size_t n) {
    size_t p = 16;
    while (p < n) p <<= 1;
    return p;
}

static int put_utf8(uint32_t cp, char *out) {
    if (cp < 0x80) { out[0] = (char)cp; return 1; }
    if (cp < 0x800) {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* Examines the UTF-8 sequence starting at s[0] (n >= 1). Returns its length
 * when valid. Otherwise returns -(length of the maximal subpart), >= 1, which
 * is what one U+FFFD replaces; *truncated says the subpart is a valid prefix
 * cut off by the end of input (a stream may still complete it). */
static int utf8_seq(const uint8_t *s, size_t n, bool *truncated) {
    uint8_t b = s[0];
    int need;
    uint8_t lo = 0x80, hi = 0xBF;
    *truncated = false;
    if (b < 0x80) return 1;
    if (b >= 0xC2 && b <= 0xDF) need = 1;
    else if (b == 0xE0) { need = 2; lo = 0xA0; }            /* no overlongs */
    else if (b == 0xED) { need = 2; hi = 0x9F; }            /* no surrogates */
    else if (b >= 0xE1 && b <= 0xEF) need = 2;
    else if (b == 0xF0) { need = 3; lo = 0x90; }            /* no overlongs */
    else if (b == 0xF4) { need = 3; hi = 0x8F; }            /* <= U+10FFFF */
    else if (b >= 0xF1 && b <= 0xF3) need = 3;
    else return -1; /* 80..C1, F5..FF never start a sequence */
    for (int k = 1; k <= need; k++) {
        if ((size_t)k >= n) { *truncated = true; return -k; }
        uint8_t c = s[k];
        if (c < (k == 1 ? lo : 0x80) || c > (k == 1 ? hi : 0xBF)) return -k;
    }
    return need + 1;
}

/* Replace-decodes s[0..n) into out (room for 3n bytes). Unless final, stops
 * before an incomplete trailing sequence. Returns the bytes consumed. */
static size_t utf8_replace(const uint8_t *s, size_t n, char *out, size_t *out_len, bool final) {
    size_t i = 0, o = 0;
    while (i < n) {
        bool trunc;
        int k = utf8_seq(s + i, n - i, &trunc);
        if (k > 0) {
            memcpy(out + o, s + i, (size_t)k);
            o += (size_t)k;
            i += (size_t)k;
            continue;
        }
        if (trunc && !final) break;
        memcpy(out + o, "\xEF\xBF\xBD", 3);
        o += 3;
        i += (size_t)-k;
    }
    *out_len = o;
    return i;
}

/* Offset of the first invalid UTF-8 byte, or n when s is valid. */
static size_t utf8_invalid_at(const uint8_t *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        if (s[i] < 0x80) { i++; continue; }
        bool trunc;
        int k = utf8_seq(s + i, n - i, &trunc);
        if (k < 0) return i;
        i += (size_t)k;
    }
    return n;
}

static const char *path_join(char *buf, size_t cap, const char *dir, const char *name) {
    snprintf(buf, cap, "%s/%s", dir, name);
    return buf;
}

static bool file_exists(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0 && S_ISREG(sb.st_mode);
}

static blip2_code read_file(const char *path, char **data, size_t *len, blip2_status *st) {
    FILE *f = fopen(path, "rb");
    if (!f) return blip2_fail(st, BLIP2_EIO, "cannot open %s: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fileno(f), &sb) != 0 || sb.st_size < 0) {
        fclose(f);
        return blip2_fail(st, BLIP2_EIO, "cannot stat %s: %s", path, strerror(errno));
    }
    size_t n = (size_t)sb.st_size;
    char *buf = blip2_malloc(n + 1, st);
    if (!buf) { fclose(f); return BLIP2_ENOMEM; }
    size_t got = fread(buf, 1, n, f);
    fclose(f);
    if (got != n) {
        free(buf);
        return blip2_fail(st, BLIP2_EIO, "short read on %s (%zu of %zu bytes)", path, got, n);
    }
    buf[n] = 0;
    *data = buf;
    *len = n;
    return BLIP2_OK;
}

/* flags: JSON_DECODE_INT_AS_REAL for config files, whose model_max_length
 * (1e30 written as an integer) overflows jansson's json_int_t. */
static blip2_code load_json(const char *path, size_t flags, json_t **out, blip2_status *st) {
    json_error_t err;
    if (!file_exists(path)) return blip2_fail(st, BLIP2_EIO, "cannot open %s: no such file", path);
    *out = json_load_file(path, flags, &err);
    if (!*out)
        return blip2_fail(st, BLIP2_EFORMAT, "%s: malformed JSON at line %d, column %d: %s", path,
                          err.line, err.column, err.text);
    return BLIP2_OK;
}

/* ------------------------------------------------------- names and id tables */

static blip2_code grow(void **p, size_t *cap, size_t need, size_t elem, blip2_status *st) {
    if (need <= *cap) return BLIP2_OK;
    size_t nc = *cap ? *cap : 64;
    while (nc < need) nc *= 2;
    void *q = realloc(*p, nc * elem);
    if (!q) return blip2_fail(st, BLIP2_ENOMEM, "out of memory growing a table to %zu entries", nc);
    *p = q;
    *cap = nc;
    return BLIP2_OK;
}

static int32_t name_find(const blip2_tokenizer *t, const char *s, size_t n) {
    if (!t->name_tab) return -1;
    uint32_t h = hash_bytes(s, n);
    for (size_t i = h & t->name_mask;; i = (i + 1) & t->name_mask) {
        const name_slot *sl = &t->name_tab[i];
        if (sl->entry < 0) return -1;
        const tok_entry *e = &t->entries[sl->entry];
        if (sl->hash == h && e->name_len == n && memcmp(t->names + e->name_off, s, n) == 0)
            return sl->entry;
    }
}

static void name_insert_slot(name_slot *tab, size_t mask, uint32_t h, int32_t entry) {
    size_t i = h & mask;
    while (tab[i].entry >= 0) i = (i + 1) & mask;
    tab[i].hash = h;
    tab[i].entry = entry;
}

static blip2_code name_tab_reserve(blip2_tokenizer *t, size_t count, blip2_status *st) {
    size_t want = pow2_at_least(count * 2);
    if (t->name_tab && want <= t->name_mask + 1) return BLIP2_OK;
    name_slot *tab = blip2_malloc(want * sizeof *tab, st);
    if (!tab) return BLIP2_ENOMEM;
    for (size_t i = 0; i < want; i++) tab[i].entry = -1;
    if (t->name_tab) {
        for (size_t i = 0; i <= t->name_mask; i++)
            if (t->name_tab[i].entry >= 0)
                name_insert_slot(tab, want - 1, t->name_tab[i].hash, t->name_tab[i].entry);
        free(t->name_tab);
    }
    t->name_tab = tab;
    t->name_mask = want - 1;
    return BLIP2_OK;
}

static blip2_code id_reserve(blip2_tokenizer *t, size_t n_ids, blip2_status *st) {
    if (n_ids <= t->n_ids) return BLIP2_OK;
    if (n_ids > t->id_cap) {
        size_t old = t->id_cap, cap = old;
        blip2_code rc = grow((void **)&t->id_entry, &cap, n_ids, sizeof *t->id_entry, st);
        cap = old;
        if (!rc) rc = grow((void **)&t->id_flags, &cap, n_ids, sizeof *t->id_flags, st);
        if (rc) return rc;
        t->id_cap = cap;
    }
    for (size_t i = t->n_ids; i < n_ids; i++) {
        t->id_entry[i] = -1;
        t->id_flags[i] = 0;
    }
    t->n_ids = n_ids;
    return BLIP2_OK;
}

/* Registers name <-> id. A repeat of the same pair is fine (added tokens
 * restate <pad>, </s>); a conflicting one is an error naming `src`. */
static blip2_code token_add(blip2_tokenizer *t, const char *name, size_t n, long long id,
                            const char *src, blip2_status *st) {
    if (id < 0 || id > MAX_TOKEN_ID)
        return blip2_fail(st, BLIP2_EFORMAT, "%s: token '%.*s' has id %lld, outside 0..%d", src,
                          (int)(n > 100 ? 100 : n), name, id, MAX_TOKEN_ID);
    int32_t e = name_find(t, name, n);
    if (e >= 0) {
        if (t->entries[e].id == id) return BLIP2_OK;
        return blip2_fail(st, BLIP2_EFORMAT, "%s: token '%.*s' has id %lld but already has id %d",
                          src, (int)(n > 100 ? 100 : n), name, id, t->entries[e].id);
    }
    if (t->names_len + n + 1 > UINT32_MAX)
        return blip2_fail(st, BLIP2_ERANGE, "%s: token strings exceed 4 GiB in total", src);
    blip2_code rc = id_reserve(t, (size_t)id + 1, st);
    if (rc) return rc;
    if (t->id_entry[id] >= 0) {
        const tok_entry *o = &t->entries[t->id_entry[id]];
        return blip2_fail(st, BLIP2_EFORMAT, "%s: id %lld is used by both '%.*s' and '%.*s'", src,
                          id, (int)(o->name_len > 100 ? 100 : o->name_len), t->names + o->name_off,
                          (int)(n > 100 ? 100 : n), name);
    }
    if ((rc = grow((void **)&t->entries, &t->entries_cap, t->n_entries + 1, sizeof *t->entries, st)) ||
        (rc = grow((void **)&t->names, &t->names_cap, t->names_len + n + 1, 1, st)) ||
        (rc = name_tab_reserve(t, t->n_entries + 1, st)))
        return rc;
    tok_entry *ne = &t->entries[t->n_entries];
    ne->name_off = (uint32_t)t->names_len;
    ne->name_len = (uint32_t)n;
    ne->id = (int32_t)id;
    memcpy(t->names + t->names_len, name, n);
    t->names_len += n;
    t->names[t->names_len++] = 0;
    name_insert_slot(t->name_tab, t->name_mask, hash_bytes(name, n), (int32_t)t->n_entries);
    t->id_entry[id] = (int32_t)t->n_entries++;
    t->id_flags[id] |= ID_PRESENT;
    return BLIP2_OK;
}

static void mark_special_name(blip2_tokenizer *t, const char *name, size_t n) {
    int32_t e = name_find(t, name, n);
    if (e >= 0) t->id_flags[t->entries[e].id] |= ID_SPECIAL;
}

/* Raw bytes of a token name: each char through the inverse byte map; a name
 * with any char outside the map keeps its UTF-8 bytes whole (HF ByteLevel
 * decoder). Added tokens go through the same path, as in HF's fast decoder.
 * Writes at most n bytes; returns the count. */
static size_t name_to_bytes(const blip2_tokenizer *t, const uint8_t *s, size_t n, char *out) {
    size_t o = 0;
    for (size_t i = 0; i < n;) {
        bool trunc;
        int k = utf8_seq(s + i, n - i, &trunc);
        uint32_t cp = k == 1 ? s[i] : k == 2 ? ((s[i] & 0x1Fu) << 6) | (s[i + 1] & 0x3Fu) : 0x144;
        if (cp >= 0x144 || t->cp_to_byte[cp] < 0) {
            memcpy(out, s, n);
            return n;
        }
        out[o++] = (char)t->cp_to_byte[cp];
        i += (size_t)k;
    }
    return o;
}

/* Fills the raw bytes of every id (raw bytes never outgrow the names). */
static blip2_code build_id_bytes(blip2_tokenizer *t, blip2_status *st) {
    t->id_off = blip2_calloc(t->n_ids, sizeof *t->id_off, st);
    t->id_len = blip2_calloc(t->n_ids, sizeof *t->id_len, st);
    t->bytes = blip2_malloc(t->names_len + 1, st);
    if (!t->id_off || !t->id_len || !t->bytes) return BLIP2_ENOMEM;
    size_t o = 0;
    for (size_t id = 0; id < t->n_ids; id++) {
        if (t->id_entry[id] < 0) continue;
        const tok_entry *e = &t->entries[t->id_entry[id]];
        t->id_off[id] = (uint32_t)o;
        t->id_len[id] = (uint32_t)name_to_bytes(t, (const uint8_t *)t->names + e->name_off, e->name_len,
                                                t->bytes + o);
        o += t->id_len[id];
    }
    return BLIP2_OK;
}

static void byte_tables_init(blip2_tokenizer *t) {
    for (int i = 0; i < 0x144; i++) t->cp_to_byte[i] = -1;
    int extra = 0;
    for (int b = 0; b < 256; b++) {
        bool same = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
        uint16_t cp = same ? (uint16_t)b : (uint16_t)(256 + extra++);
        t->byte_to_cp[b] = cp;
        t->cp_to_byte[cp] = (int16_t)b;
    }
}

static blip2_code byte_ids_init(blip2_tokenizer *t, const char *src, blip2_status *st) {
    for (int b = 0; b < 256; b++) {
        char u[4];
        int k = put_utf8(t->byte_to_cp[b], u);
        int32_t e = name_find(t, u, (size_t)k);
        if (e < 0)
            return blip2_fail(st, BLIP2_EFORMAT, "%s: vocab lacks the byte-level token '%.*s' for byte 0x%02X",
                              src, k, u, b);
        t->byte_id[b] = t->entries[e].id;
    }
    return BLIP2_OK;
}

/* -------------------------------------------------------------------- merges */

static const merge_slot *merge_find(const blip2_tokenizer *t, int32_t a, int32_t b) {
    uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
    for (size_t i = hash_pair(key) & t->merge_mask;; i = (i + 1) & t->merge_mask) {
        const merge_slot *m = &t->merge_tab[i];
        if (m->rank < 0) return NULL;
        if (m->pair == key) return m;
    }
}

static blip2_code merge_tab_init(blip2_tokenizer *t, size_t count, blip2_status *st) {
    size_t cap = pow2_at_least(count * 2 + 1);
    t->merge_tab = blip2_malloc(cap * sizeof *t->merge_tab, st);
    if (!t->merge_tab) return BLIP2_ENOMEM;
    for (size_t i = 0; i < cap; i++) t->merge_tab[i].rank = -1;
    t->merge_mask = cap - 1;
    return BLIP2_OK;
}

/* A later duplicate of a pair overrides the earlier rank, as in HF. */
static void merge_insert(blip2_tokenizer *t, int32_t a, int32_t b, int32_t rank, int32_t new_id) {
    uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
    size_t i = hash_pair(key) & t->merge_mask;
    while (t->merge_tab[i].rank >= 0 && t->merge_tab[i].pair != key) i = (i + 1) & t->merge_mask;
    t->merge_tab[i].pair = key;
    t->merge_tab[i].rank = rank;
    t->merge_tab[i].new_id = new_id;
}

/* Where a merge came from; formatted only when reporting an error. */
typedef struct {
    const char *path;
    size_t n;  /* line number (merges.txt) or array index (tokenizer.json) */
    bool json;
} merge_loc;

static const char *loc_str(const merge_loc *l, char *buf, size_t cap) {
    snprintf(buf, cap, l->json ? "%.900s model.merges[%zu]" : "%.900s line %zu", l->path, l->n);
    return buf;
}

/* Resolves the merge (a, b) of the given rank to ids. */
static blip2_code merge_add(blip2_tokenizer *t, const char *a, size_t na, const char *b, size_t nb,
                            int32_t rank, const merge_loc *loc, blip2_status *st) {
    char where[1000];
    int32_t ea = name_find(t, a, na), eb = name_find(t, b, nb);
    if (ea < 0 || eb < 0) {
        const char *m = ea < 0 ? a : b;
        size_t nm = ea < 0 ? na : nb;
        return blip2_fail(st, BLIP2_EFORMAT, "%s: merge part '%.*s' is not in the vocab",
                          loc_str(loc, where, sizeof where), (int)(nm > 100 ? 100 : nm), m);
    }
    char small[256], *cat = na + nb <= sizeof small ? small : malloc(na + nb);
    if (!cat) return blip2_fail(st, BLIP2_ENOMEM, "out of memory");
    memcpy(cat, a, na);
    memcpy(cat + na, b, nb);
    int32_t ec = name_find(t, cat, na + nb);
    if (cat != small) free(cat);
    if (ec < 0)
        return blip2_fail(st, BLIP2_EFORMAT, "%s: merge result '%.*s%.*s' is not in the vocab",
                          loc_str(loc, where, sizeof where), (int)(na > 100 ? 100 : na), a,
                          (int)(nb > 100 ? 100 : nb), b);
    merge_insert(t, t->entries[ea].id, t->entries[eb].id, rank, t->entries[ec].id);
    return BLIP2_OK;
}

/* "a b" with exactly one space, as HF requires. */
static blip2_code merge_add_line(blip2_tokenizer *t, const char *s, size_t n, int32_t rank,
                                 const merge_loc *loc, blip2_status *st) {
    const char *sp = memchr(s, ' ', n);
    if (!sp || sp == s || sp == s + n - 1 || memchr(sp + 1, ' ', (size_t)(s + n - sp - 1))) {
        char where[1000];
        return blip2_fail(st, BLIP2_EFORMAT, "%s: expected two tokens separated by one space, got '%.*s'",
                          loc_str(loc, where, sizeof where), (int)(n > 100 ? 100 : n), s);
    }
    return merge_add(t, s, (size_t)(sp - s), sp + 1, (size_t)(s + n - sp - 1), rank, loc, st);
}

static blip2_code load_merges_txt(blip2_tokenizer *t, const char *path, blip2_status *st) {
    char *data = NULL;
    size_t len = 0;
    blip2_code rc = read_file(path, &data, &len, st);
    if (rc) return rc;
    size_t lines = 1;
    for (size_t i = 0; i < len; i++) lines += data[i] == '\n';
    rc = merge_tab_init(t, lines, st);
    int32_t rank = 0;
    size_t pos = 0, line_no = 0;
    while (!rc && pos < len) {
        const char *s = data + pos, *nl = memchr(s, '\n', len - pos);
        size_t n = nl ? (size_t)(nl - s) : len - pos;
        pos += n + (nl ? 1 : 0);
        line_no++;
        if (n && s[n - 1] == '\r') n--;
        if (n >= 8 && memcmp(s, "#version", 8) == 0) continue;
        if (n == 0) {
            size_t rest = pos;
            while (rest < len && (data[rest] == '\n' || data[rest] == '\r')) rest++;
            if (rest == len) break; /* trailing empty lines */
        }
        merge_loc loc = {path, line_no, false};
        rc = merge_add_line(t, s, n, rank++, &loc, st);
    }
    t->n_merges = (size_t)rank;
    free(data);
    return rc;
}

/* -------------------------------------------------------------- JSON loading */

static blip2_code vocab_from_json(blip2_tokenizer *t, json_t *vocab, const char *src, blip2_status *st) {
    if (!json_is_object(vocab)) return blip2_fail(st, BLIP2_EFORMAT, "%s: vocab is not a JSON object", src);
    blip2_code rc = name_tab_reserve(t, json_object_size(vocab), st);
    if (rc) return rc;
    const char *key;
    size_t klen;
    json_t *val;
    json_object_keylen_foreach(vocab, key, klen, val) {
        if (!json_is_integer(val))
            return blip2_fail(st, BLIP2_EFORMAT, "%s: id of token '%.*s' is not an integer", src,
                              (int)(klen > 100 ? 100 : klen), key);
        if ((rc = token_add(t, key, klen, json_integer_value(val), src, st))) return rc;
    }
    return BLIP2_OK;
}

static blip2_code merges_from_json(blip2_tokenizer *t, json_t *merges, const char *src, blip2_status *st) {
    if (!json_is_array(merges)) return blip2_fail(st, BLIP2_EFORMAT, "%s: model.merges is not an array", src);
    blip2_code rc = merge_tab_init(t, json_array_size(merges), st);
    if (rc) return rc;
    size_t i;
    json_t *m;
    json_array_foreach(merges, i, m) {
        merge_loc loc = {src, i, true};
        if (json_is_string(m)) {
            rc = merge_add_line(t, json_string_value(m), json_string_length(m), (int32_t)i, &loc, st);
        } else if (json_is_array(m) && json_array_size(m) == 2 && json_is_string(json_array_get(m, 0)) &&
                   json_is_string(json_array_get(m, 1))) {
            json_t *a = json_array_get(m, 0), *b = json_array_get(m, 1);
            rc = merge_add(t, json_string_value(a), json_string_length(a), json_string_value(b),
                           json_string_length(b), (int32_t)i, &loc, st);
        } else {
            rc = blip2_fail(st, BLIP2_EFORMAT, "%s model.merges[%zu]: expected \"a b\" or [\"a\", \"b\"]", src, i);
        }
        if (rc) return rc;
    }
    t->n_merges = json_array_size(merges);
    return BLIP2_OK;
}

/* Rejects tokenizer.json pipelines this encoder does not implement (it
 * assumes no normalizer and a plain ByteLevel pre-tokenizer). */
static blip2_code check_pipeline(json_t *root, const char *path, blip2_status *st) {
    json_t *norm = json_object_get(root, "normalizer"), *pre = json_object_get(root, "pre_tokenizer");
    if (norm && !json_is_null(norm))
        return blip2_fail(st, BLIP2_EFORMAT, "%s: a normalizer is not supported", path);
    if (pre && !json_is_null(pre)) {
        json_t *type = json_object_get(pre, "type");
        if (!json_is_string(type) || strcmp(json_string_value(type), "ByteLevel") != 0 ||
            json_is_true(json_object_get(pre, "add_prefix_space")) ||
            json_is_false(json_object_get(pre, "use_regex")))
            return blip2_fail(st, BLIP2_EFORMAT,
                              "%s: pre_tokenizer must be ByteLevel without add_prefix_space", path);
    }
    return BLIP2_OK;
}

/* tokenizer.json's added_tokens: [{"id": 50265, "content": "<image>", "special": true}, ...]. */
static blip2_code added_from_json(blip2_tokenizer *t, json_t *added, const char *path, blip2_status *st) {
    size_t i;
    json_t *a;
    json_array_foreach(added, i, a) {
        json_t *id = json_object_get(a, "id"), *content = json_object_get(a, "content");
        if (!json_is_integer(id) || !json_is_string(content))
            return blip2_fail(st, BLIP2_EFORMAT, "%s: added_tokens[%zu] lacks an integer id or a string content",
                              path, i);
        blip2_code rc = token_add(t, json_string_value(content), json_string_length(content),
                                  json_integer_value(id), path, st);
        if (rc) return rc;
        if (json_is_true(json_object_get(a, "special"))) t->id_flags[json_integer_value(id)] |= ID_SPECIAL;
    }
    return BLIP2_OK;
}

/* tokenizer.json: model.vocab, model.merges and added_tokens[]. */
static blip2_code load_tokenizer_json(blip2_tokenizer *t, const char *path, blip2_status *st) {
    json_t *root;
    blip2_code rc = load_json(path, 0, &root, st);
    if (rc) return rc;
    json_t *model = json_object_get(root, "model");
    json_t *type = json_object_get(model, "type");
    if (!json_is_object(model))
        rc = blip2_fail(st, BLIP2_EFORMAT, "%s: no \"model\" object", path);
    else if (type && !(json_is_string(type) && strcmp(json_string_value(type), "BPE") == 0))
        rc = blip2_fail(st, BLIP2_EFORMAT, "%s: model.type is not \"BPE\"", path);
    else if (!json_object_get(model, "vocab") || !json_object_get(model, "merges"))
        rc = blip2_fail(st, BLIP2_EFORMAT, "%s: model lacks \"vocab\" or \"merges\"", path);
    else
        rc = check_pipeline(root, path, st);
    if (!rc) rc = vocab_from_json(t, json_object_get(model, "vocab"), path, st);
    if (!rc) rc = merges_from_json(t, json_object_get(model, "merges"), path, st);
    if (!rc) rc = added_from_json(t, json_object_get(root, "added_tokens"), path, st);
    json_decref(root);
    return rc;
}

static blip2_code load_vocab_json(blip2_tokenizer *t, const char *path, blip2_status *st) {
    json_t *root;
    blip2_code rc = load_json(path, 0, &root, st);
    if (rc) return rc;
    rc = vocab_from_json(t, root, path, st);
    json_decref(root);
    return rc;
}

/* added_tokens.json: {"<image>": 50265}. All are special (skipped by decode). */
static blip2_code load_added_tokens(blip2_tokenizer *t, const char *path, blip2_status *st) {
    json_t *root;
    blip2_code rc = load_json(path, 0, &root, st);
    if (rc) return rc;
    if (!json_is_object(root)) rc = blip2_fail(st, BLIP2_EFORMAT, "%s: not a JSON object", path);
    const char *key;
    size_t klen;
    json_t *val;
    if (!rc) {
        json_object_keylen_foreach(root, key, klen, val) {
            if (!json_is_integer(val)) {
                rc = blip2_fail(st, BLIP2_EFORMAT, "%s: id of '%.*s' is not an integer", path,
                                (int)(klen > 100 ? 100 : klen), key);
                break;
            }
            if ((rc = token_add(t, key, klen, json_integer_value(val), path, st))) break;
            t->id_flags[json_integer_value(val)] |= ID_SPECIAL;
        }
    }
    json_decref(root);
    return rc;
}

/* A special-token value: "</s>" or {"content": "</s>", ...}. */
static void mark_special_value(blip2_tokenizer *t, json_t *v) {
    if (json_is_object(v)) v = json_object_get(v, "content");
    if (json_is_string(v)) mark_special_name(t, json_string_value(v), json_string_length(v));
}

static void mark_special_keys(blip2_tokenizer *t, json_t *root) {
    static const char *const keys[] = {"bos_token", "eos_token", "unk_token", "pad_token",
                                       "sep_token", "cls_token", "mask_token"};
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++)
        mark_special_value(t, json_object_get(root, keys[i]));
    size_t i;
    json_t *v;
    json_array_foreach(json_object_get(root, "additional_special_tokens"), i, v) mark_special_value(t, v);
}

/* special_tokens_map.json or tokenizer_config.json (the latter may also hold
 * added_tokens_decoder: {"50265": {"content": "<image>", "special": true}}). */
static blip2_code load_special_file(blip2_tokenizer *t, const char *path, blip2_status *st) {
    json_t *root;
    blip2_code rc = load_json(path, JSON_DECODE_INT_AS_REAL, &root, st);
    if (rc) return rc;
    if (!json_is_object(root)) rc = blip2_fail(st, BLIP2_EFORMAT, "%s: not a JSON object", path);
    const char *key;
    json_t *val;
    json_t *dec = json_object_get(root, "added_tokens_decoder");
    if (!rc && json_is_object(dec)) {
        json_object_foreach(dec, key, val) {
            json_t *content = json_object_get(val, "content");
            char *end;
            long long id = strtoll(key, &end, 10);
            if (*end || end == key || !json_is_string(content)) {
                rc = blip2_fail(st, BLIP2_EFORMAT, "%s: bad added_tokens_decoder entry '%s'", path, key);
                break;
            }
            if ((rc = token_add(t, json_string_value(content), json_string_length(content), id, path,
                                st)))
                break;
            if (json_is_true(json_object_get(val, "special"))) t->id_flags[id] |= ID_SPECIAL;
        }
    }
    if (!rc) mark_special_keys(t, root);
    json_decref(root);
    return rc;
}

/* ---------------------------------------------------------------------- load */

static blip2_code load_model_files(blip2_tokenizer *t, const char *dir, blip2_status *st) {
    char vp[4096], mp[4096], tp[4096];
    path_join(vp, sizeof vp, dir, "vocab.json");
    path_join(mp, sizeof mp, dir, "merges.txt");
    path_join(tp, sizeof tp, dir, "tokenizer.json");
    bool hv = file_exists(vp), hm = file_exists(mp);
    if (hv && hm) {
        blip2_code rc = load_vocab_json(t, vp, st);
        if (!rc) rc = byte_ids_init(t, vp, st);
        return rc ? rc : load_merges_txt(t, mp, st);
    }
    if (file_exists(tp)) {
        blip2_code rc = load_tokenizer_json(t, tp, st);
        return rc ? rc : byte_ids_init(t, tp, st);
    }
    if (hv || hm)
        return blip2_fail(st, BLIP2_EIO, "cannot open %s: no such file (and no tokenizer.json in %s)",
                          hv ? mp : vp, dir);
    return blip2_fail(st, BLIP2_EIO, "no tokenizer in %s: need vocab.json + merges.txt or tokenizer.json", dir);
}

static blip2_code load_side_files(blip2_tokenizer *t, const char *dir, blip2_status *st) {
    static const char *const names[] = {"added_tokens.json", "special_tokens_map.json",
                                        "tokenizer_config.json"};
    char p[4096];
    for (size_t i = 0; i < 3; i++) {
        path_join(p, sizeof p, dir, names[i]);
        if (!file_exists(p)) continue;
        blip2_code rc = i == 0 ? load_added_tokens(t, p, st) : load_special_file(t, p, st);
        if (rc) return rc;
    }
    return BLIP2_OK;
}

static blip2_code compile_regex(blip2_tokenizer *t, blip2_status *st) {
    int err;
    PCRE2_SIZE off;
    t->re = pcre2_compile((PCRE2_SPTR)k_pattern, PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP, &err, &off, NULL);
    if (!t->re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(err, msg, sizeof msg);
        return blip2_fail(st, BLIP2_EINTERNAL, "compiling the GPT-2 regex at offset %zu: %s", (size_t)off,
                          (const char *)msg);
    }
    (void)pcre2_jit_compile(t->re, PCRE2_JIT_COMPLETE); /* optional: same results, faster */
    return BLIP2_OK;
}

static blip2_code cache_create(blip2_tokenizer *t, blip2_status *st) {
    t->cache = blip2_calloc(1, sizeof *t->cache, st);
    if (!t->cache) return BLIP2_ENOMEM;
    for (int i = 0; i < CACHE_SHARDS; i++) pthread_mutex_init(&t->cache->locks[i], NULL);
    t->cache_on = true;
    return BLIP2_OK;
}

blip2_code blip2_tokenizer_load(const char *dir, blip2_tokenizer **out, blip2_status *st) {
    if (!dir || !out) return blip2_fail(st, BLIP2_EINVAL, "blip2_tokenizer_load: NULL argument");
    *out = NULL;
    blip2_tokenizer *t = blip2_calloc(1, sizeof *t, st);
    if (!t) return BLIP2_ENOMEM;
    byte_tables_init(t);
    blip2_code rc = load_model_files(t, dir, st);
    if (!rc) rc = load_side_files(t, dir, st);
    if (!rc) rc = build_id_bytes(t, st);
    if (!rc) rc = compile_regex(t, st);
    if (!rc) rc = cache_create(t, st);
    if (rc) {
        blip2_tokenizer_free(t);
        return rc;
    }
    *out = t;
    return BLIP2_OK;
}

void blip2_tokenizer_free(blip2_tokenizer *t) {
    if (!t) return;
    if (t->cache) {
        for (int i = 0; i < CACHE_SHARDS; i++) pthread_mutex_destroy(&t->cache->locks[i]);
        free(t->cache);
    }
    pcre2_code_free(t->re);
    free(t->names);
    free(t->entries);
    free(t->name_tab);
    free(t->id_entry);
    free(t->id_flags);
    free(t->id_off);
    free(t->id_len);
    free(t->bytes);
    free(t->merge_tab);
    free(t);
}

int blip2_tokenizer_vocab_size(const blip2_tokenizer *t) { return t ? (int)t->n_ids : 0; }

int32_t blip2_tokenizer_token_id(const blip2_tokenizer *t, const char *token) {
    if (!t || !token) return -1;
    int32_t e = name_find(t, token, strlen(token));
    return e < 0 ? -1 : t->entries[e].id;
}

int blip2_tokenizer_is_special(const blip2_tokenizer *t, int32_t id) {
    return t && id >= 0 && (size_t)id < t->n_ids && (t->id_flags[id] & ID_SPECIAL);
}

void blip2_tokenizer_set_cache(blip2_tokenizer *t, int enabled) {
    if (t) t->cache_on = enabled != 0;
}

void blip2_tokenizer_clear_cache(const blip2_tokenizer *t) {
    if (!t || !t->cache) return;
    for (size_t i = 0; i < CACHE_SLOTS; i++) {
        pthread_mutex_t *m = &t->cache->locks[i % CACHE_SHARDS];
        pthread_mutex_lock(m);
        t->cache->slots[i].klen = 0;
        pthread_mutex_unlock(m);
    }
}

/* ------------------------------------------------------------------ encoding */

typedef struct {
    int32_t *v;
    size_t n, cap;
} id_vec;

static blip2_code vec_push(id_vec *v, const int32_t *ids, size_t n, blip2_status *st) {
    blip2_code rc = grow((void **)&v->v, &v->cap, v->n + n, sizeof *v->v, st);
    if (rc) return rc;
    memcpy(v->v + v->n, ids, n * sizeof *ids);
    v->n += n;
    return BLIP2_OK;
}

typedef struct {
    int32_t id, prev, next, len; /* len 0 = merged into its left neighbour */
} bpe_sym;

/* A candidate merge; key = rank << 32 | position, so one compare orders by
 * (rank, position) like HF's Merge. */
typedef struct {
    uint64_t key;
    int32_t new_id;
} bpe_cand;

/* Per-call scratch, grown as needed. */
typedef struct {
    bpe_sym *sym;
    size_t sym_cap;
    bpe_cand *heap;
    size_t heap_cap, heap_n;
    int32_t *out;
    size_t out_cap;
} bpe_work;

static void heap_push(bpe_work *w, bpe_cand c) {
    size_t i = w->heap_n++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (w->heap[p].key <= c.key) break;
        w->heap[i] = w->heap[p];
        i = p;
    }
    w->heap[i] = c;
}

/* Bottom-up pop: move the hole to a leaf along the smaller children, then
 * sift the last element up from there (about half the compares, and the
 * last element rarely climbs far). */
static bpe_cand heap_pop(bpe_work *w) {
    bpe_cand top = w->heap[0], last = w->heap[--w->heap_n];
    size_t i = 0, n = w->heap_n, c;
    if (n == 0) return top;
    while ((c = 2 * i + 1) < n) {
        if (c + 1 < n && w->heap[c + 1].key < w->heap[c].key) c++;
        w->heap[i] = w->heap[c];
        i = c;
    }
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (w->heap[p].key <= last.key) break;
        w->heap[i] = w->heap[p];
        i = p;
    }
    w->heap[i] = last;
    return top;
}

static void push_pair(const blip2_tokenizer *t, bpe_work *w, int32_t pos) {
    const bpe_sym *s = &w->sym[pos];
    if (s->next < 0) return;
    const merge_slot *m = merge_find(t, s->id, w->sym[s->next].id);
    if (m) heap_push(w, (bpe_cand){((uint64_t)(uint32_t)m->rank << 32) | (uint32_t)pos, m->new_id});
}

/* Applies one candidate merge unless it is stale (same checks as HF). */
static void apply_merge(const blip2_tokenizer *t, bpe_work *w, bpe_cand c) {
    int32_t pos = (int32_t)(uint32_t)c.key;
    bpe_sym *s = &w->sym[pos];
    if (s->len == 0 || s->next < 0) return;
    bpe_sym *r = &w->sym[s->next];
    const merge_slot *m = merge_find(t, s->id, r->id);
    if (!m || m->new_id != c.new_id) return;
    s->id = c.new_id;
    s->len += r->len;
    r->len = 0;
    s->next = r->next;
    if (s->next >= 0) w->sym[s->next].prev = pos;
    if (s->prev >= 0) push_pair(t, w, s->prev);
    push_pair(t, w, pos);
}

/* BPE of one piece into w->out; returns the id count. O(n log n). */
static blip2_code bpe_run(const blip2_tokenizer *t, bpe_work *w, const uint8_t *p, size_t n, size_t *n_out,
                          blip2_status *st) {
    if (n > (size_t)INT32_MAX / 4) return blip2_fail(st, BLIP2_ERANGE, "a pre-token of %zu bytes is too long", n);
    blip2_code rc;
    if ((rc = grow((void **)&w->sym, &w->sym_cap, n, sizeof *w->sym, st)) ||
        (rc = grow((void **)&w->heap, &w->heap_cap, 2 * n, sizeof *w->heap, st)) || /* n-1 + 1 per merge */
        (rc = grow((void **)&w->out, &w->out_cap, n, sizeof *w->out, st)))
        return rc;
    for (size_t i = 0; i < n; i++)
        w->sym[i] = (bpe_sym){t->byte_id[p[i]], (int32_t)i - 1, i + 1 < n ? (int32_t)i + 1 : -1, 1};
    w->heap_n = 0;
    for (size_t i = 0; i + 1 < n; i++) push_pair(t, w, (int32_t)i);
    while (w->heap_n) apply_merge(t, w, heap_pop(w));
    size_t k = 0;
    for (int32_t i = 0; i >= 0; i = w->sym[i].next) w->out[k++] = w->sym[i].id;
    *n_out = k;
    return BLIP2_OK;
}

static bool cache_get(const blip2_tokenizer *t, const uint8_t *p, size_t n, uint32_t h, id_vec *out,
                      blip2_status *st, blip2_code *rc) {
    size_t i = h & (CACHE_SLOTS - 1);
    cache_slot *s = &t->cache->slots[i];
    int32_t ids[CACHE_KEY_MAX];
    size_t nids = 0;
    pthread_mutex_lock(&t->cache->locks[i % CACHE_SHARDS]);
    bool hit = s->klen == n && s->hash == h && memcmp(s->key, p, n) == 0;
    if (hit) {
        nids = s->nids;
        memcpy(ids, s->ids, nids * sizeof *ids);
    }
    pthread_mutex_unlock(&t->cache->locks[i % CACHE_SHARDS]);
    if (hit) *rc = vec_push(out, ids, nids, st);
    return hit;
}

static void cache_put(const blip2_tokenizer *t, const uint8_t *p, size_t n, uint32_t h, const int32_t *ids,
                      size_t nids) {
    size_t i = h & (CACHE_SLOTS - 1);
    cache_slot *s = &t->cache->slots[i];
    pthread_mutex_lock(&t->cache->locks[i % CACHE_SHARDS]);
    s->hash = h;
    s->klen = (uint8_t)n;
    s->nids = (uint8_t)nids;
    memcpy(s->key, p, n);
    memcpy(s->ids, ids, nids * sizeof *ids);
    pthread_mutex_unlock(&t->cache->locks[i % CACHE_SHARDS]);
}

static blip2_code encode_piece(const blip2_tokenizer *t, bpe_work *w, const uint8_t *p, size_t n, id_vec *out,
                               blip2_status *st) {
    if (n == 1) return vec_push(out, &t->byte_id[p[0]], 1, st);
    bool cacheable = t->cache_on && n <= CACHE_KEY_MAX;
    uint32_t h = cacheable ? hash_bytes(p, n) : 0;
    blip2_code rc = BLIP2_OK;
    if (cacheable && cache_get(t, p, n, h, out, st, &rc)) return rc;
    size_t k = 0;
    if ((rc = bpe_run(t, w, p, n, &k, st))) return rc;
    if (cacheable) cache_put(t, p, n, h, w->out, k);
    return vec_push(out, w->out, k, st);
}

static blip2_code regex_error(int rc, size_t off, blip2_status *st) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(rc, msg, sizeof msg);
    return blip2_fail(st, BLIP2_EINTERNAL, "pre-tokenizer regex failed at byte %zu: %s", off, (const char *)msg);
}

/* Splits with the GPT-2 regex and BPEs every piece. Every char is a letter,
 * number, white space or other, so matches tile the text; a gap (which
 * would be a bug) is still encoded rather than dropped. */
static blip2_code encode_valid(const blip2_tokenizer *t, const uint8_t *s, size_t len, id_vec *out,
                               blip2_status *st) {
    pcre2_match_data *md = pcre2_match_data_create(1, NULL);
    if (!md) return blip2_fail(st, BLIP2_ENOMEM, "out of memory creating PCRE2 match data");
    bpe_work w = {0};
    blip2_code rc = BLIP2_OK;
    size_t off = 0;
    while (!rc && off < len) {
        /* Validated once up front: NO_UTF_CHECK keeps the loop linear. */
        int m = pcre2_match(t->re, s, len, off, PCRE2_NO_UTF_CHECK, md, NULL);
        size_t b = len, e = len;
        if (m >= 0) {
            PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
            b = ov[0];
            e = ov[1];
        } else if (m != PCRE2_ERROR_NOMATCH) {
            rc = regex_error(m, off, st);
            break;
        }
        if (b > off) rc = encode_piece(t, &w, s + off, b - off, out, st);
        if (!rc && e > b) rc = encode_piece(t, &w, s + b, e - b, out, st);
        if (e == b && b < len) { /* cannot happen (no empty alternative); never loop */
            bool trunc;
            int k = utf8_seq(s + b, len - b, &trunc);
            e = b + (size_t)(k > 0 ? k : 1);
            if (!rc) rc = encode_piece(t, &w, s + b, e - b, out, st);
        }
        off = e;
    }
    free(w.sym);
    free(w.heap);
    free(w.out);
    pcre2_match_data_free(md);
    return rc;
}

static blip2_code encode_append(const blip2_tokenizer *t, const char *text, size_t len, id_vec *out,
                                blip2_status *st) {
    if (!text && len) return blip2_fail(st, BLIP2_EINVAL, "encode: NULL text with length %zu", len);
    const uint8_t *s = (const uint8_t *)text;
    size_t bad = len ? utf8_invalid_at(s, len) : 0;
    if (bad < len)
        return blip2_fail(st, BLIP2_EINVAL, "text is not valid UTF-8: bad byte 0x%02X at offset %zu of %zu",
                          s[bad], bad, len);
    return encode_valid(t, s, len, out, st);
}

static blip2_code vec_finish(id_vec *v, blip2_code rc, int32_t **ids, size_t *n, blip2_status *st) {
    if (!rc && !v->v && !(v->v = blip2_malloc(sizeof *v->v, st))) rc = BLIP2_ENOMEM;
    if (rc) {
        free(v->v);
        return rc;
    }
    *ids = v->v;
    *n = v->n;
    return BLIP2_OK;
}

blip2_code blip2_tokenizer_encode(const blip2_tokenizer *t, const char *text, size_t len, int32_t **ids,
                                  size_t *n_ids, blip2_status *st) {
    if (!t || !ids || !n_ids) return blip2_fail(st, BLIP2_EINVAL, "blip2_tokenizer_encode: NULL argument");
    *ids = NULL;
    *n_ids = 0;
    id_vec v = {0};
    return vec_finish(&v, encode_append(t, text, len, &v, st), ids, n_ids, st);
}

blip2_code blip2_tokenizer_build_prompt(const blip2_tokenizer *t, const char *prompt, size_t len,
                                        int num_query_tokens, int image_token_id, int bos_id, int32_t **ids,
                                        size_t *n, blip2_status *st) {
    if (!t || !ids || !n) return blip2_fail(st, BLIP2_EINVAL, "blip2_tokenizer_build_prompt: NULL argument");
    *ids = NULL;
    *n = 0;
    if (num_query_tokens < 0 || num_query_tokens > MAX_QUERY_TOKENS)
        return blip2_fail(st, BLIP2_EINVAL, "num_query_tokens %d outside 0..%d", num_query_tokens,
                          MAX_QUERY_TOKENS);
    if (image_token_id < 0 || bos_id < 0)
        return blip2_fail(st, BLIP2_EINVAL, "negative token id (image %d, bos %d)", image_token_id, bos_id);
    id_vec v = {0};
    blip2_code rc = grow((void **)&v.v, &v.cap, (size_t)num_query_tokens + 1 + len / 4, sizeof *v.v, st);
    for (int i = 0; !rc && i < num_query_tokens; i++) v.v[v.n++] = image_token_id;
    if (!rc) v.v[v.n++] = bos_id;
    if (!rc) rc = encode_append(t, prompt, len, &v, st);
    return vec_finish(&v, rc, ids, n, st);
}

/* ------------------------------------------------------------------ decoding */

/* Raw bytes of an id, or NULL when decode drops it (special / unknown). */
static const char *id_bytes(const blip2_tokenizer *t, int32_t id, size_t *n) {
    if (id < 0 || (size_t)id >= t->n_ids || t->id_flags[id] != ID_PRESENT) return NULL;
    *n = t->id_len[id];
    return t->bytes + t->id_off[id];
}

blip2_code blip2_tokenizer_decode(const blip2_tokenizer *t, const int32_t *ids, size_t n, char **text,
                                  size_t *len, blip2_status *st) {
    if (!t || (!ids && n) || !text || !len)
        return blip2_fail(st, BLIP2_EINVAL, "blip2_tokenizer_decode: NULL argument");
    *text = NULL;
    *len = 0;
    size_t total = 0, k;
    for (size_t i = 0; i < n; i++)
        if (id_bytes(t, ids[i], &k)) total += k;
    if (total > (SIZE_MAX - 1) / 3) return blip2_fail(st, BLIP2_ERANGE, "decoded text too long");
    uint8_t *raw = blip2_malloc(total, st);
    char *out = raw ? blip2_malloc(3 * total + 1, st) : NULL;
    if (!out) {
        free(raw);
        return BLIP2_ENOMEM;
    }
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        const char *b = id_bytes(t, ids[i], &k);
        if (b) {
            memcpy(raw + o, b, k);
            o += k;
        }
    }
    utf8_replace(raw, total, out, len, true);
    out[*len] = 0;
    free(raw);
    *text = out;
    return BLIP2_OK;
}

/* ----------------------------------------------------------------- streaming */

struct blip2_detok_stream {
    const blip2_tokenizer *tok;
    uint8_t *in; /* held-back bytes (< 4) followed by the newest token's bytes */
    size_t in_len, in_cap;
    char *out;
    size_t out_cap;
};

blip2_code blip2_detok_init(const blip2_tokenizer *t, blip2_detok_stream **out, blip2_status *st) {
    if (!t || !out) return blip2_fail(st, BLIP2_EINVAL, "blip2_detok_init: NULL argument");
    blip2_detok_stream *s = blip2_calloc(1, sizeof *s, st);
    if (!s) return BLIP2_ENOMEM;
    s->tok = t;
    blip2_code rc = grow((void **)&s->in, &s->in_cap, 64, 1, st);
    if (!rc) rc = grow((void **)&s->out, &s->out_cap, 3 * 64 + 1, 1, st);
    if (rc) {
        blip2_detok_free(s);
        return rc;
    }
    *out = s;
    return BLIP2_OK;
}

/* Emits what is final in s->in (all of it when `final`), keeps the rest. */
static blip2_code detok_flush(blip2_detok_stream *s, bool final, const char **piece, size_t *len,
                              blip2_status *st) {
    blip2_code rc = grow((void **)&s->out, &s->out_cap, 3 * s->in_len + 1, 1, st);
    if (rc) return rc;
    size_t used = utf8_replace(s->in, s->in_len, s->out, len, final);
    memmove(s->in, s->in + used, s->in_len - used);
    s->in_len -= used;
    s->out[*len] = 0;
    *piece = s->out;
    return BLIP2_OK;
}

blip2_code blip2_detok_push(blip2_detok_stream *s, int32_t id, const char **piece, size_t *len,
                            blip2_status *st) {
    if (!s || !piece || !len) return blip2_fail(st, BLIP2_EINVAL, "blip2_detok_push: NULL argument");
    size_t k = 0;
    const char *b = id_bytes(s->tok, id, &k);
    if (b) {
        blip2_code rc = grow((void **)&s->in, &s->in_cap, s->in_len + k, 1, st);
        if (rc) return rc;
        memcpy(s->in + s->in_len, b, k);
        s->in_len += k;
    }
    return detok_flush(s, false, piece, len, st);
}

blip2_code blip2_detok_finish(blip2_detok_stream *s, const char **piece, size_t *len, blip2_status *st) {
    if (!s || !piece || !len) return blip2_fail(st, BLIP2_EINVAL, "blip2_detok_finish: NULL argument");
    return detok_flush(s, true, piece, len, st);
}

void blip2_detok_free(blip2_detok_stream *s) {
    if (!s) return;
    free(s->in);
    free(s->out);
    free(s);
}
