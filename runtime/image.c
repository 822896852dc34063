/* Image pipeline: bytes -> RGB8 (libjpeg-turbo / libpng, Pillow's conversions) -> Pillow bicubic
 * resize -> float32 CHW. See image.h and spec BLIP2-OPT.md §5.
 *
 * Floating point: every result must match Pillow/numpy to the bit, so no a*b+c may become an FMA.
 * Products that meet an add in the resize coefficients go through fp_product (a volatile store),
 * which holds whatever -ffp-contract the build uses; the rest has no multiply-then-add shape, or
 * multiplies by a power of two (exact), or converts to float in between (normalize). Compiling
 * this file with -ffp-contract=off as well costs nothing. */
#include "image.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>
#include <jpeglib.h>
#include <jerror.h>
#include <png.h>

/* ------------------------------------------------------------------------------------------------ */
/* config */

blip2_image_config blip2_image_config_default(void) {
    blip2_image_config c = {
        .size_h = 224,
        .size_w = 224,
        .rescale_factor = 0.00392156862745098, /* 1/255 as transformers writes it */
        .mean = {0.48145466f, 0.4578275f, 0.40821073f},
        .std = {0.26862954f, 0.26130258f, 0.27577711f},
        .do_resize = 1,
        .do_rescale = 1,
        .do_normalize = 1,
    };
    return c;
}

blip2_image_limits blip2_image_limits_default(void) {
    blip2_image_limits l = {BLIP2_IMAGE_DEFAULT_MAX_PIXELS, BLIP2_IMAGE_DEFAULT_MAX_SIDE};
    return l;
}

static blip2_code config_bool(const char *path, json_t *root, const char *key, int *dst, blip2_status *st) {
    json_t *v = json_object_get(root, key);
    if (!v) return BLIP2_OK;
    if (!json_is_boolean(v)) return blip2_fail(st, BLIP2_EFORMAT, "%s: key '%s' must be true or false", path, key);
    *dst = json_is_true(v);
    return BLIP2_OK;
}

/* image_mean / image_std: a list of 3 numbers, or one number for all channels (as transformers). */
static blip2_code config_triple(const char *path, json_t *root, const char *key, float dst[3], blip2_status *st) {
    json_t *v = json_object_get(root, key);
    if (!v) return BLIP2_OK;
    if (json_is_number(v)) {
        dst[0] = dst[1] = dst[2] = (float)json_number_value(v);
        return BLIP2_OK;
    }
    if (!json_is_array(v) || json_array_size(v) != 3)
        return blip2_fail(st, BLIP2_EFORMAT, "%s: key '%s' must be a list of 3 numbers", path, key);
    for (size_t i = 0; i < 3; i++) {
        json_t *e = json_array_get(v, i);
        if (!json_is_number(e))
            return blip2_fail(st, BLIP2_EFORMAT, "%s: key '%s'[%zu] must be a number", path, key, i);
        dst[i] = (float)json_number_value(e);
    }
    return BLIP2_OK;
}

static blip2_code config_size(const char *path, json_t *root, blip2_image_config *cfg, blip2_status *st) {
    json_t *v = json_object_get(root, "size");
    if (!v) return BLIP2_OK;
    json_t *h = json_is_object(v) ? json_object_get(v, "height") : NULL;
    json_t *w = json_is_object(v) ? json_object_get(v, "width") : NULL;
    if (!json_is_integer(h) || !json_is_integer(w))
        return blip2_fail(st, BLIP2_EFORMAT, "%s: key 'size' must be {\"height\": int, \"width\": int}", path);
    json_int_t hv = json_integer_value(h), wv = json_integer_value(w);
    if (hv < 1 || wv < 1 || hv > BLIP2_IMAGE_DEFAULT_MAX_SIDE || wv > BLIP2_IMAGE_DEFAULT_MAX_SIDE)
        return blip2_fail(st, BLIP2_EFORMAT, "%s: key 'size' is %lldx%lld, must be 1..%d", path, (long long)hv,
                          (long long)wv, BLIP2_IMAGE_DEFAULT_MAX_SIDE);
    cfg->size_h = (int)hv;
    cfg->size_w = (int)wv;
    return BLIP2_OK;
}

static blip2_code config_scalars(const char *path, json_t *root, blip2_image_config *cfg, blip2_status *st) {
    json_t *v = json_object_get(root, "rescale_factor");
    if (v) {
        if (!json_is_number(v)) return blip2_fail(st, BLIP2_EFORMAT, "%s: key 'rescale_factor' must be a number", path);
        cfg->rescale_factor = json_number_value(v);
    }
    v = json_object_get(root, "resample");
    if (v && !json_is_integer(v)) return blip2_fail(st, BLIP2_EFORMAT, "%s: key 'resample' must be an integer", path);
    if (v && json_integer_value(v) != 3)
        return blip2_fail(st, BLIP2_EFORMAT, "%s: key 'resample' is %lld; only 3 (bicubic) is supported", path,
                          (long long)json_integer_value(v));
    int convert_rgb = 1;
    return config_bool(path, root, "do_convert_rgb", &convert_rgb, st);
}

static blip2_code config_parse(const char *path, json_t *root, blip2_image_config *cfg, blip2_status *st) {
    if (!json_is_object(root)) return blip2_fail(st, BLIP2_EFORMAT, "%s: top level must be a JSON object", path);
    blip2_code rc;
    if ((rc = config_bool(path, root, "do_resize", &cfg->do_resize, st))) return rc;
    if ((rc = config_bool(path, root, "do_rescale", &cfg->do_rescale, st))) return rc;
    if ((rc = config_bool(path, root, "do_normalize", &cfg->do_normalize, st))) return rc;
    if ((rc = config_size(path, root, cfg, st))) return rc;
    if ((rc = config_scalars(path, root, cfg, st))) return rc;
    if ((rc = config_triple(path, root, "image_mean", cfg->mean, st))) return rc;
    if ((rc = config_triple(path, root, "image_std", cfg->std, st))) return rc;
    for (int c = 0; c < 3; c++)
        if (cfg->do_normalize && !(cfg->std[c] != 0.0f))
            return blip2_fail(st, BLIP2_EFORMAT, "%s: key 'image_std'[%d] must be non-zero", path, c);
    return BLIP2_OK;
}

blip2_code blip2_image_config_load(const char *model_dir, blip2_image_config *cfg, blip2_status *st) {
    *cfg = blip2_image_config_default();
    char path[4096];
    if (snprintf(path, sizeof path, "%s/preprocessor_config.json", model_dir) >= (int)sizeof path)
        return blip2_fail(st, BLIP2_EINVAL, "model directory path too long: %s", model_dir);
    FILE *f = fopen(path, "rb");
    if (!f) {
        if (errno == ENOENT) return BLIP2_OK; /* absent: the BLIP-2 defaults */
        return blip2_fail(st, BLIP2_EIO, "%s: cannot open: %s", path, strerror(errno));
    }
    json_error_t jerr;
    json_t *root = json_loadf(f, JSON_REJECT_DUPLICATES, &jerr);
    fclose(f);
    if (!root) return blip2_fail(st, BLIP2_EFORMAT, "%s:%d:%d: invalid JSON: %s", path, jerr.line, jerr.column, jerr.text);
    blip2_code rc = config_parse(path, root, cfg, st);
    json_decref(root);
    if (rc) *cfg = blip2_image_config_default();
    return rc;
}

/* ------------------------------------------------------------------------------------------------ */
/* shared decode helpers */

void blip2_rgb_image_free(blip2_rgb_image *img) {
    if (!img) return;
    free(img->rgb);
    img->rgb = NULL;
    img->width = img->height = 0;
}

static blip2_code image_check_dims(const char *fmt, uint64_t w, uint64_t h, const blip2_image_limits *lim,
                                   blip2_status *st) {
    if (w == 0 || h == 0) return blip2_fail(st, BLIP2_EFORMAT, "%s: image has zero size %llux%llu", fmt,
                                            (unsigned long long)w, (unsigned long long)h);
    if (w > (uint64_t)lim->max_side || h > (uint64_t)lim->max_side)
        return blip2_fail(st, BLIP2_ERANGE, "%s: image is %llux%llu, a side is over the limit of %d pixels", fmt,
                          (unsigned long long)w, (unsigned long long)h, lim->max_side);
    if (w * h > lim->max_pixels)
        return blip2_fail(st, BLIP2_ERANGE, "%s: image is %llux%llu = %llu pixels, over the limit of %llu", fmt,
                          (unsigned long long)w, (unsigned long long)h, (unsigned long long)(w * h),
                          (unsigned long long)lim->max_pixels);
    return BLIP2_OK;
}

static blip2_code image_alloc(blip2_rgb_image *img, int w, int h, blip2_status *st) {
    img->rgb = blip2_malloc((size_t)w * (size_t)h * 3, st);
    if (!img->rgb) return BLIP2_ENOMEM;
    img->width = w;
    img->height = h;
    return BLIP2_OK;
}

/* ------------------------------------------------------------------------------------------------ */
/* JPEG (libjpeg-turbo, library defaults = Pillow's: ISLOW IDCT, fancy upsampling) */

#define JPEG_MAX_SCANS 1000 /* progressive files with more scans are a CPU-exhaustion trick */

typedef struct {
    struct jpeg_error_mgr pub;
    jmp_buf jmp;
    char msg[JMSG_LENGTH_MAX + 64];
} jpeg_err;

typedef struct {
    struct jpeg_decompress_struct ci;
    jpeg_err err;
    struct jpeg_progress_mgr progress;
    blip2_rgb_image *out;
    uint8_t *row; /* [width, 4] CMYK scanline */
} jpeg_ctx;

/* libjpeg's default error_exit calls exit(): jump back to jpeg_run instead. */
static void jpeg_on_error(j_common_ptr ci) {
    jpeg_err *e = (jpeg_err *)ci->err;
    ci->err->format_message(ci, e->msg);
    longjmp(e->jmp, 1);
}

/* Warnings and traces are dropped (Pillow ignores them: corrupt-but-decodable data decodes), except
 * running out of data, even just before EOI, which Pillow reports as "image file is truncated". */
static void jpeg_on_message(j_common_ptr ci, int level) {
    jpeg_err *e = (jpeg_err *)ci->err;
    if (level < 0 && ci->err->msg_code == JWRN_JPEG_EOF) {
        snprintf(e->msg, sizeof e->msg, "truncated data (premature end of JPEG file)");
        longjmp(e->jmp, 1);
    }
}

static void jpeg_on_output(j_common_ptr ci) { (void)ci; }

static void jpeg_on_progress(j_common_ptr ci) {
    j_decompress_ptr d = (j_decompress_ptr)ci;
    if (d->input_scan_number > JPEG_MAX_SCANS) {
        jpeg_err *e = (jpeg_err *)ci->err;
        snprintf(e->msg, sizeof e->msg, "more than %d scans", JPEG_MAX_SCANS);
        longjmp(e->jmp, 1);
    }
}

/* Pillow reads 4-component JPEGs as Adobe-style inverted CMYK ("CMYK;I"), then cmyk2rgb. */
static void jpeg_cmyk_to_rgb(const uint8_t *in /* [w, 4] */, int w, uint8_t *out /* [w, 3] */) {
    for (int x = 0; x < w; x++, in += 4, out += 3) {
        int nk = in[3]; /* 255 - (255 - k) */
        for (int c = 0; c < 3; c++) {
            int t = (255 - in[c]) * nk + 128;
            int v = nk - (((t >> 8) + t) >> 8);
            out[c] = (uint8_t)(v < 0 ? 0 : v);
        }
    }
}

static blip2_code jpeg_read_rows(jpeg_ctx *c) {
    struct jpeg_decompress_struct *ci = &c->ci;
    while (ci->output_scanline < ci->output_height) {
        uint8_t *dst = c->out->rgb + (size_t)ci->output_scanline * ci->output_width * 3;
        JSAMPROW row = c->row ? c->row : dst;
        if (jpeg_read_scanlines(ci, &row, 1) != 1) return BLIP2_EINTERNAL; /* cannot suspend on memory */
        if (c->row) jpeg_cmyk_to_rgb(c->row, (int)ci->output_width, dst);
    }
    return BLIP2_OK;
}

static int jpeg_is_sof(uint8_t m) {
    return m >= 0xc0 && m <= 0xcf && m != 0xc4 && m != 0xc8 && m != 0xcc; /* not DHT, JPG, DAC */
}

/* Finds the frame size in the marker segments ahead of libjpeg, whose jpeg_read_header only returns
 * at the first scan: a huge image is then refused even when the rest of its header is missing.
 * Returns 0 when no SOF precedes the scan (libjpeg then decides). */
static int jpeg_peek_dims(const uint8_t *d, size_t n, unsigned *w, unsigned *h) {
    size_t i = 2;
    while (i + 4 <= n && d[i] == 0xff) {
        uint8_t m = d[i + 1];
        if (m == 0xff) { /* fill byte */
            i++;
            continue;
        }
        if (m == 0xda || m == 0xd9) return 0; /* SOS / EOI */
        size_t len = (size_t)d[i + 2] << 8 | d[i + 3];
        if (jpeg_is_sof(m)) {
            if (len < 8 || i + 9 > n) return 0;
            *h = (unsigned)d[i + 5] << 8 | d[i + 6];
            *w = (unsigned)d[i + 7] << 8 | d[i + 8];
            return 1;
        }
        i += 2 + len;
    }
    return 0;
}

/* Everything that may longjmp lives here; its state is in *c (not locals), so nothing is lost. */
static blip2_code jpeg_run(jpeg_ctx *c, const uint8_t *data, size_t n, const blip2_image_limits *lim,
                           blip2_status *st) {
    unsigned pw, ph;
    if (jpeg_peek_dims(data, n, &pw, &ph) && ph > 0) { /* height 0 (DNL) is left to libjpeg */
        blip2_code rc = image_check_dims("JPEG", pw, ph, lim, st);
        if (rc) return rc;
    }
    if (setjmp(c->err.jmp)) return blip2_fail(st, BLIP2_EFORMAT, "JPEG: %s", c->err.msg);
    jpeg_create_decompress(&c->ci);
    c->ci.progress = &c->progress;
    jpeg_mem_src(&c->ci, data, (unsigned long)n);
    jpeg_read_header(&c->ci, TRUE);
    blip2_code rc = image_check_dims("JPEG", c->ci.image_width, c->ci.image_height, lim, st);
    if (rc) return rc;
    int nc = c->ci.num_components;
    if (nc != 1 && nc != 3 && nc != 4) /* Pillow has no mode for these either */
        return blip2_fail(st, BLIP2_EFORMAT, "JPEG: unsupported %d-component image", nc);
    c->ci.out_color_space = nc == 4 ? JCS_CMYK : JCS_RGB; /* grey is replicated by libjpeg, like L->RGB */
    jpeg_start_decompress(&c->ci);
    if (c->ci.output_components != (nc == 4 ? 4 : 3))
        return blip2_fail(st, BLIP2_EINTERNAL, "JPEG: decoder gives %d components", c->ci.output_components);
    if ((rc = image_alloc(c->out, (int)c->ci.output_width, (int)c->ci.output_height, st))) return rc;
    if (nc == 4 && !(c->row = blip2_malloc((size_t)c->ci.output_width * 4, st))) return BLIP2_ENOMEM;
    if ((rc = jpeg_read_rows(c))) return blip2_fail(st, rc, "JPEG: decoder returned no scanline");
    jpeg_finish_decompress(&c->ci);
    return BLIP2_OK;
}

static blip2_code image_decode_jpeg(const uint8_t *data, size_t n, const blip2_image_limits *lim,
                                    blip2_rgb_image *out, blip2_status *st) {
    jpeg_ctx *c = blip2_calloc(1, sizeof *c, st); /* on the heap: jmp_buf + libjpeg state is large */
    if (!c) return BLIP2_ENOMEM;
    c->out = out;
    c->ci.err = jpeg_std_error(&c->err.pub);
    c->err.pub.error_exit = jpeg_on_error;
    c->err.pub.emit_message = jpeg_on_message;
    c->err.pub.output_message = jpeg_on_output;
    c->progress.progress_monitor = jpeg_on_progress;
    blip2_code rc = jpeg_run(c, data, n, lim, st);
    jpeg_destroy_decompress(&c->ci);
    free(c->row);
    free(c);
    return rc;
}

/* ------------------------------------------------------------------------------------------------ */
/* PNG (libpng) */

typedef enum { PNG_AS_RGB, PNG_AS_GREY, PNG_AS_GREY16, PNG_AS_PALETTE } png_layout;

typedef struct {
    png_structp png;
    png_infop info;
    const uint8_t *data;
    size_t n, pos;
    char msg[256];
    blip2_rgb_image *out;
    uint8_t *raw;     /* [height, rowbytes] when the rows are not RGB8 already */
    png_bytep *rows;  /* [height] */
    png_layout layout;
} png_ctx;

static void png_on_read(png_structp png, png_bytep dst, size_t len) {
    png_ctx *c = png_get_io_ptr(png);
    if (len > c->n - c->pos) png_error(png, "truncated data (unexpected end of file)");
    memcpy(dst, c->data + c->pos, len);
    c->pos += len;
}

/* libpng's default handlers print to stderr (and abort() if no jmpbuf is set). */
static void png_on_error(png_structp png, png_const_charp msg) {
    png_ctx *c = png_get_error_ptr(png);
    snprintf(c->msg, sizeof c->msg, "%s", msg);
    png_longjmp(png, 1);
}

static void png_on_warning(png_structp png, png_const_charp msg) {
    (void)png;
    (void)msg;
}

/* Transforms that equal Pillow's unpackers: 16-bit channels keep the high byte (strip_16 chops),
 * alpha is dropped, 1/2/4-bit grey is scaled to 0..255 by bit replication (x255, x85, x17).
 * Palette indices and 16-bit grey (Pillow "I;16", clipped) are converted by hand. */
static png_layout png_setup_transforms(png_structp png, int depth, int color) {
    if (color == PNG_COLOR_TYPE_PALETTE) {
        png_set_packing(png);
        return PNG_AS_PALETTE;
    }
    if (color == PNG_COLOR_TYPE_GRAY && depth == 16) return PNG_AS_GREY16;
    if (depth == 16) png_set_strip_16(png);
    if (color & PNG_COLOR_MASK_ALPHA) png_set_strip_alpha(png);
    if (color & PNG_COLOR_MASK_COLOR) return PNG_AS_RGB;
    if (depth < 8) png_set_expand_gray_1_2_4_to_8(png);
    return PNG_AS_GREY;
}

static size_t png_layout_bytes(png_layout l) {
    return l == PNG_AS_RGB ? 3 : l == PNG_AS_GREY16 ? 2 : 1;
}

static void png_convert_rows(png_ctx *c) {
    size_t w = (size_t)c->out->width, np = w * (size_t)c->out->height;
    const uint8_t *in = c->raw;
    uint8_t *o = c->out->rgb;
    if (c->layout == PNG_AS_PALETTE) {
        uint8_t lut[256][3] = {{0}}; /* indices past the PLTE read black, as in Pillow */
        png_colorp pal = NULL;
        int npal = 0;
        png_get_PLTE(c->png, c->info, &pal, &npal);
        for (int i = 0; i < npal && i < 256; i++) {
            lut[i][0] = pal[i].red;
            lut[i][1] = pal[i].green;
            lut[i][2] = pal[i].blue;
        }
        for (size_t i = 0; i < np; i++, o += 3) memcpy(o, lut[in[i]], 3);
    } else if (c->layout == PNG_AS_GREY16) {
        for (size_t i = 0; i < np; i++, o += 3) { /* Pillow I;16 -> RGB clips to 255 */
            unsigned v = (unsigned)in[2 * i] << 8 | in[2 * i + 1];
            o[0] = o[1] = o[2] = (uint8_t)(v > 255 ? 255 : v);
        }
    } else {
        for (size_t i = 0; i < np; i++, o += 3) o[0] = o[1] = o[2] = in[i];
    }
}

static blip2_code png_alloc_rows(png_ctx *c, blip2_status *st) {
    size_t w = (size_t)c->out->width, h = (size_t)c->out->height, rb = w * png_layout_bytes(c->layout);
    if (png_get_rowbytes(c->png, c->info) != rb)
        return blip2_fail(st, BLIP2_EINTERNAL, "PNG: unexpected row size %zu, wanted %zu",
                          (size_t)png_get_rowbytes(c->png, c->info), rb);
    uint8_t *base = c->out->rgb;
    if (c->layout != PNG_AS_RGB) {
        if (!(c->raw = blip2_malloc(h * rb, st))) return BLIP2_ENOMEM;
        base = c->raw;
    }
    if (!(c->rows = blip2_malloc(h * sizeof *c->rows, st))) return BLIP2_ENOMEM;
    for (size_t y = 0; y < h; y++) c->rows[y] = base + y * rb;
    return BLIP2_OK;
}

/* Everything that may longjmp lives here; its state is in *c (not locals), so nothing is lost. */
static blip2_code png_run(png_ctx *c, const blip2_image_limits *lim, blip2_status *st) {
    /* IHDR must come first: check its size before libpng reads the chunks up to IDAT */
    if (c->n >= 24 && memcmp(c->data + 12, "IHDR", 4) == 0) {
        const uint8_t *d = c->data + 16;
        uint64_t w = (uint64_t)d[0] << 24 | d[1] << 16 | d[2] << 8 | d[3];
        uint64_t h = (uint64_t)d[4] << 24 | d[5] << 16 | d[6] << 8 | d[7];
        if (w && h) {
            blip2_code rc = image_check_dims("PNG", w, h, lim, st);
            if (rc) return rc;
        }
    }
    if (setjmp(png_jmpbuf(c->png))) return blip2_fail(st, BLIP2_EFORMAT, "PNG: %s", c->msg);
    png_set_read_fn(c->png, c, png_on_read);
    png_set_user_limits(c->png, 0x7fffffff, 0x7fffffff); /* our own check below names the limit */
    png_read_info(c->png, c->info);
    png_uint_32 w = 0, h = 0;
    int depth = 0, color = 0;
    png_get_IHDR(c->png, c->info, &w, &h, &depth, &color, NULL, NULL, NULL);
    blip2_code rc = image_check_dims("PNG", w, h, lim, st);
    if (rc) return rc;
    c->layout = png_setup_transforms(c->png, depth, color);
    png_set_interlace_handling(c->png);
    png_read_update_info(c->png, c->info);
    if ((rc = image_alloc(c->out, (int)w, (int)h, st))) return rc;
    if ((rc = png_alloc_rows(c, st))) return rc;
    png_read_image(c->png, c->rows); /* trailing chunks/IEND are not needed (Pillow agrees) */
    if (c->layout != PNG_AS_RGB) png_convert_rows(c);
    return BLIP2_OK;
}

static blip2_code image_decode_png(const uint8_t *data, size_t n, const blip2_image_limits *lim,
                                   blip2_rgb_image *out, blip2_status *st) {
    png_ctx *c = blip2_calloc(1, sizeof *c, st);
    if (!c) return BLIP2_ENOMEM;
    c->data = data;
    c->n = n;
    c->out = out;
    blip2_code rc = BLIP2_ENOMEM;
    c->png = png_create_read_struct(PNG_LIBPNG_VER_STRING, c, png_on_error, png_on_warning);
    if (c->png) c->info = png_create_info_struct(c->png);
    if (c->png && c->info) rc = png_run(c, lim, st);
    else blip2_fail(st, rc, "PNG: out of memory creating the decoder");
    png_destroy_read_struct(&c->png, &c->info, NULL);
    free(c->raw);
    free(c->rows);
    free(c);
    return rc;
}

/* ------------------------------------------------------------------------------------------------ */
/* format sniffing */

static int image_has_magic(const uint8_t *d, size_t n, const char *magic, size_t len) {
    return n >= len && memcmp(d, magic, len) == 0;
}

/* Names formats we recognise but do not decode, so the error says what the file is. */
static const char *image_other_format(const uint8_t *d, size_t n) {
    if (image_has_magic(d, n, "GIF87a", 6) || image_has_magic(d, n, "GIF89a", 6)) return "GIF";
    if (image_has_magic(d, n, "BM", 2)) return "BMP";
    if (n >= 12 && image_has_magic(d, n, "RIFF", 4) && memcmp(d + 8, "WEBP", 4) == 0) return "WebP";
    if (image_has_magic(d, n, "II*\0", 4) || image_has_magic(d, n, "MM\0*", 4)) return "TIFF";
    if (n >= 12 && memcmp(d + 4, "ftyp", 4) == 0) return "HEIF/AVIF";
    if (image_has_magic(d, n, "\0\0\1\0", 4)) return "ICO";
    return NULL;
}

blip2_code blip2_image_decode(const uint8_t *data, size_t n, const blip2_image_limits *lim, blip2_rgb_image *out,
                              blip2_status *st) {
    memset(out, 0, sizeof *out);
    blip2_image_limits def = blip2_image_limits_default();
    if (!lim) lim = &def;
    if (!data || n == 0) return blip2_fail(st, BLIP2_EINVAL, "image data is empty");
    if (lim->max_side < 1) return blip2_fail(st, BLIP2_EINVAL, "image limits: max_side %d must be positive", lim->max_side);
    blip2_code rc;
    if (image_has_magic(data, n, "\xff\xd8\xff", 3)) {
        rc = image_decode_jpeg(data, n, lim, out, st);
    } else if (image_has_magic(data, n, "\x89PNG\r\n\x1a\n", 8)) {
        rc = image_decode_png(data, n, lim, out, st);
    } else {
        const char *other = image_other_format(data, n);
        if (other) return blip2_fail(st, BLIP2_EFORMAT, "unsupported image format %s (only JPEG and PNG)", other);
        return blip2_fail(st, BLIP2_EFORMAT, "not an image: %zu bytes with no JPEG or PNG signature", n);
    }
    if (rc) blip2_rgb_image_free(out);
    return rc;
}

/* ------------------------------------------------------------------------------------------------ */
/* Pillow bicubic resampling (src/libImaging/Resample.c, 8 bits per channel) */

#define RESAMPLE_PRECISION_BITS 22 /* 32 - 8 - 2 */

typedef struct {
    int ksize;       /* coefficient stride */
    int *bounds;     /* [out, 2]: first source index, number of taps */
    int32_t *coeffs; /* [out, ksize], fixed point 2^-22 */
} resample_axis;

/* Rounds a product to double before it meets an add or subtract. GCC's default in GNU mode,
 * -ffp-contract=fast, would otherwise fuse such pairs into FMAs (even across statements) on FMA
 * hardware (x86-64-v3, aarch64), which Pillow's baseline x86-64 build never does. */
static double fp_product(double p) {
    volatile double v = p;
    return v;
}

/* a = -0.5: ((a+2)x - (a+3))x*x + 1 and (((x-5)x + 8)x - 4)a, evaluated in Pillow's order. */
static double resample_bicubic_kernel(double x) {
    const double a = -0.5;
    if (x < 0.0) x = -x;
    if (x < 1.0) {
        double t = fp_product((a + 2.0) * x) - (a + 3.0);
        return fp_product(t * x * x) + 1;
    }
    if (x < 2.0) {
        double t = fp_product((x - 5) * x) + 8;
        return fp_product((fp_product(t * x) - 4) * a); /* the caller adds it up */
    }
    return 0.0;
}

static int32_t resample_fixed(double w) {
    double s = w * (1 << RESAMPLE_PRECISION_BITS); /* exact: power of two */
    return (int32_t)(w < 0 ? s - 0.5 : s + 0.5);
}

/* Pillow's precompute_coeffs + normalize_coeffs_8bpc for box [0, in]. */
static void resample_axis_init(int in, int out, resample_axis *ax, double *tmp /* [ksize] */) {
    double scale = (double)(float)in / out, fs = scale < 1.0 ? 1.0 : scale;
    double support = 2.0 * fs, ss = 1.0 / fs;
    for (int o = 0; o < out; o++) {
        double center = fp_product((o + 0.5) * scale), ww = 0.0;
        int xmin = (int)(center - support + 0.5), xmax = (int)(center + support + 0.5);
        if (xmin < 0) xmin = 0;
        if (xmax > in) xmax = in;
        int nt = xmax - xmin;
        for (int j = 0; j < nt; j++) {
            tmp[j] = resample_bicubic_kernel(fp_product((j + xmin - center + 0.5) * ss));
            ww += tmp[j];
        }
        int32_t *k = ax->coeffs + (size_t)o * ax->ksize;
        for (int j = 0; j < ax->ksize; j++) k[j] = j < nt ? resample_fixed(ww != 0.0 ? tmp[j] / ww : tmp[j]) : 0;
        ax->bounds[2 * o] = xmin;
        ax->bounds[2 * o + 1] = nt;
    }
}

static void resample_axis_free(resample_axis *ax) {
    free(ax->bounds);
    free(ax->coeffs);
    ax->bounds = NULL;
    ax->coeffs = NULL;
}

static blip2_code resample_axis_new(int in, int out, resample_axis *ax, blip2_status *st) {
    double fs = (double)(float)in / out;
    if (fs < 1.0) fs = 1.0;
    double ks = ceil(2.0 * fs) * 2 + 1;
    memset(ax, 0, sizeof *ax);
    if (ks * out > (double)(INT_MAX / 8))
        return blip2_fail(st, BLIP2_ERANGE, "resize %d -> %d needs too many coefficients", in, out);
    ax->ksize = (int)ks;
    double *tmp = blip2_malloc((size_t)ax->ksize * sizeof *tmp, st);
    ax->bounds = blip2_malloc((size_t)out * 2 * sizeof *ax->bounds, st);
    ax->coeffs = blip2_malloc((size_t)out * ax->ksize * sizeof *ax->coeffs, st);
    blip2_code rc = tmp && ax->bounds && ax->coeffs ? BLIP2_OK : BLIP2_ENOMEM;
    if (!rc) resample_axis_init(in, out, ax, tmp);
    free(tmp);
    if (rc) resample_axis_free(ax);
    return rc;
}

/* Pillow's clip8: acc >> 22 clamped to 0..255 (without shifting negative values). The accumulator
 * cannot overflow: sum |k| <= ~1.3 * 2^22, times 255, plus 2^21, is under 2^31. */
static inline uint8_t resample_clip8(int32_t acc) {
    if (acc >= (int32_t)1 << (RESAMPLE_PRECISION_BITS + 8)) return 255;
    if (acc <= 0) return 0;
    return (uint8_t)(acc >> RESAMPLE_PRECISION_BITS);
}

/* One output pixel from nt consecutive RGB source pixels. */
static inline void resample_pixel(const uint8_t *src, const int32_t *k, int nt, uint8_t *dst) {
    int32_t a0 = 1 << (RESAMPLE_PRECISION_BITS - 1), a1 = a0, a2 = a0;
    for (int j = 0; j < nt; j++, src += 3) {
        a0 += src[0] * k[j];
        a1 += src[1] * k[j];
        a2 += src[2] * k[j];
    }
    dst[0] = resample_clip8(a0);
    dst[1] = resample_clip8(a1);
    dst[2] = resample_clip8(a2);
}

/* Rows [y0, y0 + out->height) of in -> out, resampling along x. */
static void resample_horizontal(const blip2_rgb_image *in, int y0, const resample_axis *ax, blip2_rgb_image *out) {
    for (int y = 0; y < out->height; y++) {
        const uint8_t *row = in->rgb + ((size_t)(y + y0) * in->width) * 3;
        uint8_t *dst = out->rgb + (size_t)y * out->width * 3;
        for (int x = 0; x < out->width; x++) {
            const int *b = ax->bounds + 2 * x;
            resample_pixel(row + (size_t)b[0] * 3, ax->coeffs + (size_t)x * ax->ksize, b[1], dst + 3 * x);
        }
    }
}

/* Resampling along y (same width); ax->bounds are relative to in's first row. Row-major
 * accumulation over chunks of the row vectorises; integer sums are exact, so the order of the taps
 * does not change the result. */
static void resample_vertical(const blip2_rgb_image *in, const resample_axis *ax, blip2_rgb_image *out) {
    enum { CHUNK = 1024 };
    int32_t acc[CHUNK];
    size_t stride = (size_t)in->width * 3;
    for (int y = 0; y < out->height; y++) {
        const int *b = ax->bounds + 2 * y;
        const int32_t *k = ax->coeffs + (size_t)y * ax->ksize;
        uint8_t *dst = out->rgb + (size_t)y * stride;
        for (size_t x0 = 0; x0 < stride; x0 += CHUNK) {
            size_t m = stride - x0 < CHUNK ? stride - x0 : CHUNK;
            for (size_t i = 0; i < m; i++) acc[i] = 1 << (RESAMPLE_PRECISION_BITS - 1);
            for (int j = 0; j < b[1]; j++) {
                const uint8_t *src = in->rgb + (size_t)(b[0] + j) * stride + x0;
                for (size_t i = 0; i < m; i++) acc[i] += src[i] * k[j];
            }
            for (size_t i = 0; i < m; i++) dst[x0 + i] = resample_clip8(acc[i]);
        }
    }
}

static blip2_code resample_copy(const blip2_rgb_image *in, blip2_rgb_image *out, blip2_status *st) {
    blip2_code rc = image_alloc(out, in->width, in->height, st);
    if (!rc) memcpy(out->rgb, in->rgb, (size_t)in->width * in->height * 3);
    return rc;
}

/* Pillow's ImagingResampleInner: the vertical coefficients first fix the source rows needed, the
 * horizontal pass runs over only those rows, then the vertical pass; a pass whose size does not
 * change is skipped. */
static blip2_code resample_horizontal_first(const blip2_rgb_image *in, int out_w, int out_h, resample_axis *vert,
                                            blip2_rgb_image *out, blip2_status *st) {
    blip2_rgb_image tmp = {0};
    const blip2_rgb_image *src = in;
    blip2_code rc = BLIP2_OK;
    if (out_w != in->width) {
        int y_first = vert->bounds[0];
        int y_last = vert->bounds[2 * out_h - 2] + vert->bounds[2 * out_h - 1];
        resample_axis hor;
        if ((rc = resample_axis_new(in->width, out_w, &hor, st))) return rc;
        rc = image_alloc(&tmp, out_w, y_last - y_first, st);
        if (!rc) resample_horizontal(in, y_first, &hor, &tmp);
        resample_axis_free(&hor);
        if (rc) return rc;
        for (int i = 0; i < out_h; i++) vert->bounds[2 * i] -= y_first;
        src = &tmp;
    }
    if (out_h == in->height) {
        *out = tmp; /* horizontal only: the intermediate is the result */
        return BLIP2_OK;
    }
    rc = image_alloc(out, src->width, out_h, st);
    if (!rc) resample_vertical(src, vert, out);
    blip2_rgb_image_free(&tmp);
    return rc;
}

/* Pillow >= 12 runs the vertical pass first when the height shrinks much more than the width
 * (python-pillow PR #9549). The rule below was found by probing Pillow 13.0: it holds on 310 random
 * size pairs (up- and downscaling) and at boundaries such as 300xH -> 224x224, which switches
 * between H = 376 and 377. Pass order matters through the rounding between the passes. */
static int resample_vertical_goes_first(const blip2_rgb_image *in, int out_w, int out_h) {
    if (out_w == in->width || out_h == in->height) return 0; /* one pass: order is moot */
    int64_t shrink_h = (int64_t)in->height - out_h, shrink_w = (int64_t)in->width - out_w;
    return shrink_h > 0 && shrink_h > 2 * shrink_w;
}

static blip2_code resample_vertical_first(const blip2_rgb_image *in, int out_w, int out_h,
                                          const resample_axis *vert, blip2_rgb_image *out, blip2_status *st) {
    blip2_rgb_image tmp = {0};
    resample_axis hor;
    blip2_code rc = image_alloc(&tmp, in->width, out_h, st);
    if (!rc) rc = resample_axis_new(in->width, out_w, &hor, st);
    if (rc) {
        blip2_rgb_image_free(&tmp);
        return rc;
    }
    resample_vertical(in, vert, &tmp);
    rc = image_alloc(out, out_w, out_h, st);
    if (!rc) resample_horizontal(&tmp, 0, &hor, out);
    resample_axis_free(&hor);
    blip2_rgb_image_free(&tmp);
    return rc;
}

blip2_code blip2_image_resize_bicubic(const blip2_rgb_image *in, int out_w, int out_h, blip2_rgb_image *out,
                                      blip2_status *st) {
    memset(out, 0, sizeof *out);
    if (!in || !in->rgb || in->width < 1 || in->height < 1)
        return blip2_fail(st, BLIP2_EINVAL, "resize: empty input image");
    if (out_w < 1 || out_h < 1 || out_w > BLIP2_IMAGE_DEFAULT_MAX_SIDE || out_h > BLIP2_IMAGE_DEFAULT_MAX_SIDE)
        return blip2_fail(st, BLIP2_EINVAL, "resize: output size %dx%d out of range 1..%d", out_w, out_h,
                          BLIP2_IMAGE_DEFAULT_MAX_SIDE);
    if (out_w == in->width && out_h == in->height) return resample_copy(in, out, st);
    resample_axis vert;
    blip2_code rc = resample_axis_new(in->height, out_h, &vert, st);
    if (rc) return rc;
    if (resample_vertical_goes_first(in, out_w, out_h)) rc = resample_vertical_first(in, out_w, out_h, &vert, out, st);
    else rc = resample_horizontal_first(in, out_w, out_h, &vert, out, st);
    resample_axis_free(&vert);
    return rc;
}

/* ------------------------------------------------------------------------------------------------ */
/* normalise */

/* y = (float(double(u8) * rescale) - mean) / std for each of the 256 byte values; a table is exact
 * because the reference maps each byte value independently. */
static void normalize_table(const blip2_image_config *cfg, int c, float lut[256]) {
    for (int v = 0; v < 256; v++) {
        float x = cfg->do_rescale ? (float)((double)v * cfg->rescale_factor) : (float)v;
        lut[v] = cfg->do_normalize ? (x - cfg->mean[c]) / cfg->std[c] : x;
    }
}

blip2_code blip2_image_normalize(const blip2_rgb_image *img, const blip2_image_config *cfg, float *out,
                                 blip2_status *st) {
    if (!img || !img->rgb || !cfg || !out) return blip2_fail(st, BLIP2_EINVAL, "normalize: null argument");
    size_t np = (size_t)img->width * img->height;
    for (int c = 0; c < 3; c++) {
        float lut[256];
        normalize_table(cfg, c, lut);
        const uint8_t *in = img->rgb + c;
        float *o = out + (size_t)c * np;
        for (size_t i = 0; i < np; i++) o[i] = lut[in[3 * i]];
    }
    return BLIP2_OK;
}

blip2_code blip2_image_preprocess(const uint8_t *data, size_t n, const blip2_image_config *cfg,
                                  const blip2_image_limits *lim, float *pixel_values, blip2_status *st) {
    blip2_rgb_image img, sized = {0};
    blip2_code rc = blip2_image_decode(data, n, lim, &img, st);
    if (rc) return rc;
    const blip2_rgb_image *use = &img;
    if (img.width != cfg->size_w || img.height != cfg->size_h) {
        if (cfg->do_resize) rc = blip2_image_resize_bicubic(&img, cfg->size_w, cfg->size_h, &sized, st);
        else rc = blip2_fail(st, BLIP2_EINVAL, "image is %dx%d but do_resize is off and the model wants %dx%d",
                             img.width, img.height, cfg->size_w, cfg->size_h);
        use = &sized;
    }
    if (!rc) rc = blip2_image_normalize(use, cfg, pixel_values, st);
    blip2_rgb_image_free(&sized);
    blip2_rgb_image_free(&img);
    return rc;
}
