#define _DEFAULT_SOURCE /* madvise, strdup */
#include "safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* Header JSON larger than this is rejected (the real 2.7b shards have ~100 KB headers). */
#define ST_MAX_HEADER (100u << 20)

static const struct {
    const char *name;
    blip2_dtype dt;
    size_t size;
} dtype_table[] = {
    {"F32", BLIP2_DT_F32, 4}, {"F16", BLIP2_DT_F16, 2}, {"BF16", BLIP2_DT_BF16, 2},
    {"U8", BLIP2_DT_U8, 1},   {"I32", BLIP2_DT_I32, 4}, {"I64", BLIP2_DT_I64, 8},
};
#define N_DTYPES (sizeof dtype_table / sizeof dtype_table[0])

size_t blip2_dtype_size(blip2_dtype dt) {
    for (size_t i = 0; i < N_DTYPES; i++)
        if (dtype_table[i].dt == dt) return dtype_table[i].size;
    return 0;
}

const char *blip2_dtype_name(blip2_dtype dt) {
    for (size_t i = 0; i < N_DTYPES; i++)
        if (dtype_table[i].dt == dt) return dtype_table[i].name;
    return "?";
}

static int dtype_from_name(const char *s, blip2_dtype *dt) {
    for (size_t i = 0; i < N_DTYPES; i++)
        if (strcmp(dtype_table[i].name, s) == 0) {
            *dt = dtype_table[i].dt;
            return 1;
        }
    return 0;
}

int64_t blip2_st_numel(const blip2_st_tensor *t) {
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
    return n;
}

static int cmp_tensor_name(const void *a, const void *b) {
    return strcmp(((const blip2_st_tensor *)a)->name, ((const blip2_st_tensor *)b)->name);
}

/* Fills t from one header entry; errors name the file and the tensor. */
static blip2_code parse_entry(const char *fname, const char *key, json_t *v, const uint8_t *data, size_t data_size,
                              blip2_st_tensor *t, blip2_status *st) {
    if (!json_is_object(v)) return blip2_fail(st, BLIP2_EFORMAT, "%s: tensor '%s': header entry is not an object", fname, key);
    json_t *jd = json_object_get(v, "dtype"), *js = json_object_get(v, "shape"), *jo = json_object_get(v, "data_offsets");
    if (!json_is_string(jd) || !json_is_array(js) || !json_is_array(jo) || json_array_size(jo) != 2)
        return blip2_fail(st, BLIP2_EFORMAT, "%s: tensor '%s': header entry needs dtype, shape and data_offsets[2]", fname, key);
    if (!dtype_from_name(json_string_value(jd), &t->dtype))
        return blip2_fail(st, BLIP2_EFORMAT, "%s: tensor '%s': unknown dtype '%s' (supported: F32, F16, BF16, U8, I32, I64)",
                          fname, key, json_string_value(jd));
    size_t nd = json_array_size(js);
    if (nd > BLIP2_ST_MAX_DIMS) return blip2_fail(st, BLIP2_EFORMAT, "%s: tensor '%s': %zu dims (max %d)", fname, key, nd, BLIP2_ST_MAX_DIMS);
    t->ndim = (int)nd;
    uint64_t numel = 1;
    for (size_t i = 0; i < nd; i++) {
        json_t *d = json_array_get(js, i);
        if (!json_is_integer(d) || json_integer_value(d) < 0 || json_integer_value(d) > ((int64_t)1 << 40))
            return blip2_fail(st, BLIP2_EFORMAT, "%s: tensor '%s': shape[%zu] is not a valid size", fname, key, i);
        t->shape[i] = json_integer_value(d);
        if (t->shape[i] && numel > (UINT64_MAX >> 8) / (uint64_t)t->shape[i])
            return blip2_fail(st, BLIP2_EFORMAT, "%s: tensor '%s': shape overflows", fname, key);
        numel *= (uint64_t)t->shape[i];
    }
    json_t *jb = json_array_get(jo, 0), *je = json_array_get(jo, 1);
    if (!json_is_integer(jb) || !json_is_integer(je))
        return blip2_fail(st, BLIP2_EFORMAT, "%s: tensor '%s': data_offsets are not integers", fname, key);
    json_int_t b = json_integer_value(jb), e = json_integer_value(je);
    if (b < 0 || e < b || (uint64_t)e > data_size)
        return blip2_fail(st, BLIP2_EFORMAT,
                          "%s: tensor '%s': data_offsets [%lld, %lld] point outside the data section of %zu bytes "
                          "(truncated file?)", fname, key, (long long)b, (long long)e, data_size);
    uint64_t want = numel * blip2_dtype_size(t->dtype);
    if ((uint64_t)(e - b) != want)
        return blip2_fail(st, BLIP2_EFORMAT, "%s: tensor '%s': %lld data bytes but dtype %s x shape needs %llu", fname, key,
                          (long long)(e - b), blip2_dtype_name(t->dtype), (unsigned long long)want);
    t->data = data + b;
    t->nbytes = (size_t)want;
    t->file = fname;
    t->name = strdup(key);
    if (!t->name) return blip2_fail(st, BLIP2_ENOMEM, "out of memory");
    return BLIP2_OK;
}

static blip2_code parse_header(blip2_st_file *f, blip2_status *st) {
    const uint8_t *buf = f->map;
    if (f->size < 8) return blip2_fail(st, BLIP2_EFORMAT, "%s: file of %zu bytes is too short for a safetensors header", f->path, f->size);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | buf[i];
    if (hlen > ST_MAX_HEADER || hlen > f->size - 8)
        return blip2_fail(st, BLIP2_EFORMAT, "%s: header length %llu exceeds the file size %zu (truncated or not safetensors)",
                          f->path, (unsigned long long)hlen, f->size);
    json_error_t jerr;
    json_t *root = json_loadb((const char *)buf + 8, (size_t)hlen, JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL, &jerr);
    if (!root || !json_is_object(root)) {
        json_decref(root);
        return blip2_fail(st, BLIP2_EFORMAT, "%s: header is not a JSON object (%s)", f->path, root ? "wrong type" : jerr.text);
    }
    size_t cap = json_object_size(root);
    f->tensors = calloc(cap ? cap : 1, sizeof *f->tensors);
    if (!f->tensors) {
        json_decref(root);
        return blip2_fail(st, BLIP2_ENOMEM, "out of memory");
    }
    const uint8_t *data = buf + 8 + hlen;
    size_t data_size = f->size - 8 - (size_t)hlen;
    const char *key;
    json_t *v;
    blip2_code rc = BLIP2_OK;
    json_object_foreach(root, key, v) {
        if (strcmp(key, "__metadata__") == 0) continue;
        rc = parse_entry(f->path, key, v, data, data_size, &f->tensors[f->n], st);
        if (rc) break;
        f->n++;
    }
    json_decref(root);
    if (rc) return rc;
    qsort(f->tensors, (size_t)f->n, sizeof *f->tensors, cmp_tensor_name);
    return BLIP2_OK;
}

blip2_code blip2_st_parse(const void *buf, size_t size, const char *name, blip2_st_file *f, blip2_status *st) {
    memset(f, 0, sizeof *f);
    f->path = strdup(name ? name : "<memory>");
    if (!f->path) return blip2_fail(st, BLIP2_ENOMEM, "out of memory");
    f->map = (void *)buf;
    f->size = size;
    blip2_code rc = parse_header(f, st);
    if (rc) blip2_st_close(f);
    return rc;
}

blip2_code blip2_st_open(const char *path, blip2_st_file *f, blip2_status *st) {
    memset(f, 0, sizeof *f);
    int fd = open(path, O_RDONLY);
    if (fd < 0) return blip2_fail(st, BLIP2_EIO, "%s: cannot open: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        close(fd);
        return blip2_fail(st, BLIP2_EIO, "%s: not a regular file", path);
    }
    size_t size = (size_t)sb.st_size;
    void *map = size ? mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0) : NULL;
    close(fd);
    if (size && map == MAP_FAILED) return blip2_fail(st, BLIP2_EIO, "%s: mmap failed: %s", path, strerror(errno));
    blip2_code rc = blip2_st_parse(map, size, path, f, st);
    if (rc) {
        if (map) munmap(map, size);
        return rc;
    }
    f->owns_map = 1; /* unmapped by close */
    return BLIP2_OK;
}

const blip2_st_tensor *blip2_st_find(const blip2_st_file *f, const char *name) {
    blip2_st_tensor key = {.name = (char *)name};
    return bsearch(&key, f->tensors, (size_t)f->n, sizeof *f->tensors, cmp_tensor_name);
}

/* Only files opened by blip2_st_open own their mapping; parsed buffers belong to the caller. */
void blip2_st_close(blip2_st_file *f) {
    for (int i = 0; i < f->n; i++) free(f->tensors[i].name);
    free(f->tensors);
    if (f->owns_map && f->map) munmap(f->map, f->size);
    free(f->path);
    memset(f, 0, sizeof *f);
}

blip2_code blip2_st_read_f32(const blip2_st_tensor *t, size_t offset, size_t n, float *out, blip2_status *st) {
    if (offset + n > (size_t)blip2_st_numel(t))
        return blip2_fail(st, BLIP2_EINTERNAL, "%s: tensor '%s': read of [%zu, %zu) past its %lld elements", t->file, t->name,
                          offset, offset + n, (long long)blip2_st_numel(t));
    switch (t->dtype) {
    case BLIP2_DT_F32: memcpy(out, (const float *)t->data + offset, n * 4); break;
    case BLIP2_DT_F16: {
        const uint8_t *p = (const uint8_t *)t->data + 2 * offset;
        for (size_t i = 0; i < n; i++) out[i] = blip2_f16_to_f32((uint16_t)(p[2 * i] | p[2 * i + 1] << 8));
        break;
    }
    case BLIP2_DT_BF16: {
        const uint8_t *p = (const uint8_t *)t->data + 2 * offset;
        for (size_t i = 0; i < n; i++) out[i] = blip2_bf16_to_f32((uint16_t)(p[2 * i] | p[2 * i + 1] << 8));
        break;
    }
    default:
        return blip2_fail(st, BLIP2_EFORMAT, "%s: tensor '%s': dtype %s is not a floating-point weight type", t->file,
                          t->name, blip2_dtype_name(t->dtype));
    }
    return BLIP2_OK;
}

void blip2_st_drop_pages(const void *p, size_t n) {
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE), b = ((uintptr_t)p + page - 1) & ~(page - 1),
              e = ((uintptr_t)p + n) & ~(page - 1);
    if (e > b) madvise((void *)b, e - b, MADV_DONTNEED);
}

/* ---- writing ---- */

struct blip2_st_writer {
    FILE *fp;
    char *path;
};

static int cmp_out_name(const void *a, const void *b) {
    return strcmp((*(const blip2_st_out *const *)a)->name, (*(const blip2_st_out *const *)b)->name);
}

static size_t out_nbytes(const blip2_st_out *t) {
    size_t n = blip2_dtype_size(t->dtype);
    for (int i = 0; i < t->ndim; i++) n *= (size_t)t->shape[i];
    return n;
}

/* Builds the header for tensors in the order given (data is appended in that order). */
static char *build_header(const blip2_st_out *const *ts, int n, size_t *hlen) {
    json_t *root = json_object();
    size_t off = 0;
    for (int i = 0; i < n; i++) {
        json_t *shape = json_array();
        for (int d = 0; d < ts[i]->ndim; d++) json_array_append_new(shape, json_integer(ts[i]->shape[d]));
        size_t nb = out_nbytes(ts[i]);
        json_object_set_new(root, ts[i]->name,
                            json_pack("{s:s, s:o, s:[I,I]}", "dtype", blip2_dtype_name(ts[i]->dtype), "shape", shape,
                                      "data_offsets", (json_int_t)off, (json_int_t)(off + nb)));
        off += nb;
    }
    char *s = json_dumps(root, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(root);
    if (!s) return NULL;
    size_t len = strlen(s), padded = (len + 7) & ~(size_t)7; /* 8-byte aligned data, as HF writes */
    char *h = realloc(s, padded + 1);
    if (!h) {
        free(s);
        return NULL;
    }
    memset(h + len, ' ', padded - len);
    h[padded] = 0;
    *hlen = padded;
    return h;
}

blip2_code blip2_st_writer_open(const char *path, const blip2_st_out *decl, int n, blip2_st_writer **w, blip2_status *st) {
    *w = NULL;
    size_t hlen = 0;
    const blip2_st_out **order = malloc(sizeof *order * (size_t)(n ? n : 1));
    if (!order) return blip2_fail(st, BLIP2_ENOMEM, "out of memory");
    for (int i = 0; i < n; i++) order[i] = &decl[i];
    char *h = build_header(order, n, &hlen);
    free(order);
    if (!h) return blip2_fail(st, BLIP2_ENOMEM, "%s: cannot build the header", path);
    FILE *fp = fopen(path, "wb");
    if (!fp) {
        free(h);
        return blip2_fail(st, BLIP2_EIO, "%s: cannot create: %s", path, strerror(errno));
    }
    uint8_t lenb[8];
    for (int i = 0; i < 8; i++) lenb[i] = (uint8_t)((uint64_t)hlen >> (8 * i));
    int ok = fwrite(lenb, 1, 8, fp) == 8 && fwrite(h, 1, hlen, fp) == hlen;
    free(h);
    if (!ok) {
        fclose(fp);
        return blip2_fail(st, BLIP2_EIO, "%s: write failed", path);
    }
    *w = calloc(1, sizeof **w);
    if (!*w) {
        fclose(fp);
        return blip2_fail(st, BLIP2_ENOMEM, "out of memory");
    }
    (*w)->fp = fp;
    (*w)->path = strdup(path);
    return BLIP2_OK;
}

blip2_code blip2_st_writer_append(blip2_st_writer *w, const void *data, size_t nbytes, blip2_status *st) {
    if (nbytes && fwrite(data, 1, nbytes, w->fp) != nbytes)
        return blip2_fail(st, BLIP2_EIO, "%s: write failed: %s", w->path, strerror(errno));
    return BLIP2_OK;
}

blip2_code blip2_st_writer_close(blip2_st_writer *w, blip2_status *st) {
    if (!w) return BLIP2_OK;
    int bad = fclose(w->fp) != 0;
    blip2_code rc = bad ? blip2_fail(st, BLIP2_EIO, "%s: close failed", w->path) : BLIP2_OK;
    free(w->path);
    free(w);
    return rc;
}

blip2_code blip2_st_write(const char *path, const blip2_st_out *ts, int n, blip2_status *st) {
    const blip2_st_out **order = malloc(sizeof *order * (size_t)(n ? n : 1));
    blip2_st_out *sorted = malloc(sizeof *sorted * (size_t)(n ? n : 1));
    if (!order || !sorted) {
        free(order);
        free(sorted);
        return blip2_fail(st, BLIP2_ENOMEM, "out of memory");
    }
    for (int i = 0; i < n; i++) order[i] = &ts[i];
    qsort(order, (size_t)n, sizeof *order, cmp_out_name);
    for (int i = 0; i < n; i++) sorted[i] = *order[i];
    blip2_st_writer *w;
    blip2_code rc = blip2_st_writer_open(path, sorted, n, &w, st);
    for (int i = 0; !rc && i < n; i++) rc = blip2_st_writer_append(w, sorted[i].data, out_nbytes(&sorted[i]), st);
    blip2_code rc2 = w ? blip2_st_writer_close(w, st) : BLIP2_OK;
    free(order);
    free(sorted);
    return rc ? rc : rc2;
}
