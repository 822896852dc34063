/* safetensors: memory-mapped reading (only touched pages are read) and writing.
 * Format: u64-LE header length N, N bytes of JSON {name: {dtype, shape, data_offsets:[b,e]}},
 * then the data; offsets are relative to the end of the header. */
#ifndef BLIP2_SAFETENSORS_H
#define BLIP2_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"
#include "../kernels/ops.h"

typedef enum { BLIP2_DT_F32, BLIP2_DT_F16, BLIP2_DT_BF16, BLIP2_DT_U8, BLIP2_DT_I32, BLIP2_DT_I64 } blip2_dtype;

#define BLIP2_ST_MAX_DIMS 8

typedef struct {
    char *name;
    blip2_dtype dtype;
    int ndim;
    int64_t shape[BLIP2_ST_MAX_DIMS];
    const void *data; /* points into the mapping */
    size_t nbytes;
    const char *file; /* path of the file that holds it (owned by the file) */
} blip2_st_tensor;

typedef struct {
    char *path;
    void *map;
    size_t size;
    int owns_map;             /* 1 when opened from a path (unmapped on close) */
    blip2_st_tensor *tensors; /* sorted by name */
    int n;
} blip2_st_file;

size_t blip2_dtype_size(blip2_dtype dt);
const char *blip2_dtype_name(blip2_dtype dt);
int64_t blip2_st_numel(const blip2_st_tensor *t);

/* Maps the file and validates the header: JSON well-formed, known dtypes, offsets inside the
 * file, sizes consistent with shapes. Errors name the file and the tensor. */
blip2_code blip2_st_open(const char *path, blip2_st_file *f, blip2_status *st);
/* Same checks on a buffer already in memory (the fuzz target uses this); buf must outlive f. */
blip2_code blip2_st_parse(const void *buf, size_t size, const char *name, blip2_st_file *f, blip2_status *st);
const blip2_st_tensor *blip2_st_find(const blip2_st_file *f, const char *name);
void blip2_st_close(blip2_st_file *f);

/* Decodes n elements starting at element `offset` of a F32/F16/BF16 tensor to float32. */
blip2_code blip2_st_read_f32(const blip2_st_tensor *t, size_t offset, size_t n, float *out, blip2_status *st);

/* Hints that the mapped pages fully inside [p, p + n) are no longer needed (after a tensor was
 * converted to fp32): the page cache keeps the file, but they stop counting as resident. */
void blip2_st_drop_pages(const void *p, size_t n);

/* blip2_f16_to_f32 and friends live with the kernels (kernels/ops.h). */

/* Writing: tensors are given in any order; written sorted by name. `data` holds numel elements
 * of `dtype`. */
typedef struct {
    const char *name;
    blip2_dtype dtype;
    int ndim;
    int64_t shape[BLIP2_ST_MAX_DIMS];
    const void *data;
} blip2_st_out;

blip2_code blip2_st_write(const char *path, const blip2_st_out *ts, int n, blip2_status *st);

/* Streaming writer for files too large to hold in memory: declare every tensor first (fixes the
 * header), then append the data of each in declaration order. */
typedef struct blip2_st_writer blip2_st_writer;
blip2_code blip2_st_writer_open(const char *path, const blip2_st_out *decl, int n, blip2_st_writer **w,
                                blip2_status *st);
blip2_code blip2_st_writer_append(blip2_st_writer *w, const void *data, size_t nbytes, blip2_status *st);
blip2_code blip2_st_writer_close(blip2_st_writer *w, blip2_status *st);

#endif
