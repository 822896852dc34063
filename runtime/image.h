/* Image preprocessing: encoded bytes (JPEG/PNG) -> pixel_values [3, H, W] float32, bit-exact with
 * the transformers 4.x PIL path (spec BLIP2-OPT.md §5.1/§5.3): Pillow decode + convert("RGB"),
 * Pillow bicubic resize, rescale, normalise.
 *
 * Decoding follows Pillow, not the libraries' own conversions: no EXIF rotation, no gamma, alpha is
 * dropped (no compositing), 16-bit channels keep their high byte, except 16-bit greyscale PNG
 * which Pillow opens as "I;16" and clips to 0..255 when converting to RGB; CMYK JPEGs are read
 * with Adobe (inverted) conventions. A JPEG or PNG whose image data ends early is an error (Pillow:
 * "image file is truncated"); trailing chunks/markers after the image data are not required. */
#ifndef BLIP2_IMAGE_H
#define BLIP2_IMAGE_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"

typedef struct {
    int width, height;
    uint8_t *rgb; /* [height, width, 3], row-major, no padding; owned */
} blip2_rgb_image;

typedef struct {
    int size_h, size_w;    /* output size (resize target) */
    double rescale_factor; /* applied in double, then rounded to float32 */
    float mean[3], std[3]; /* float32 as the reference rounds them */
    int do_resize, do_rescale, do_normalize;
} blip2_image_config;

/* Decoder limits, checked against the header before any pixel buffer is allocated. */
typedef struct {
    uint64_t max_pixels; /* width * height */
    int max_side;        /* max(width, height) */
} blip2_image_limits;

/* 64 megapixels in the camera sense (64 * 10^6), about 192 MB of RGB. */
#define BLIP2_IMAGE_DEFAULT_MAX_PIXELS 64000000u
#define BLIP2_IMAGE_DEFAULT_MAX_SIDE 16384

/* 224x224, rescale 1/255, OPENAI_CLIP mean/std, all steps on. */
blip2_image_config blip2_image_config_default(void);
blip2_image_limits blip2_image_limits_default(void);

/* Reads <model_dir>/preprocessor_config.json over the defaults. A missing file gives the defaults;
 * malformed JSON, a wrong type or an unsupported value (resample != 3, size without
 * height/width) is BLIP2_EFORMAT naming the file and the key. Unknown keys are ignored. */
blip2_code blip2_image_config_load(const char *model_dir, blip2_image_config *cfg, blip2_status *st);

/* Decodes a JPEG or PNG from memory into RGB8 as Pillow's open(...).convert("RGB") would.
 * lim may be NULL (defaults). The limits are checked on the first header bytes that give the size
 * (PNG IHDR, JPEG SOFn), before anything is allocated for pixels. Errors: BLIP2_EINVAL empty input
 * or max_side < 1; BLIP2_EFORMAT not an image, unsupported format (GIF, BMP, WebP, ... are named),
 * corrupt or truncated data; BLIP2_ERANGE dimensions over the limits; BLIP2_ENOMEM.
 * On error *out is zeroed. */
blip2_code blip2_image_decode(const uint8_t *data /* [n] */, size_t n, const blip2_image_limits *lim,
                              blip2_rgb_image *out, blip2_status *st);

/* Pillow's ImagingResample with the BICUBIC filter (a = -0.5), 8 bits per channel, as Pillow 13.0
 * does it, including its pass order (vertical first when the height shrinks much more than the
 * width; see image.c). Same size gives a copy. out_w/out_h in 1..16384. */
blip2_code blip2_image_resize_bicubic(const blip2_rgb_image *in, int out_w, int out_h, blip2_rgb_image *out,
                                      blip2_status *st);

/* out[c, y, x] = ((float)(u8 * rescale_factor) - mean[c]) / std[c], float32, CHW. */
blip2_code blip2_image_normalize(const blip2_rgb_image *img, const blip2_image_config *cfg,
                                 float *out /* [3, img->height, img->width] */, blip2_status *st);

/* decode -> resize to cfg size (when do_resize; otherwise the image must already be that size)
 * -> normalise. */
blip2_code blip2_image_preprocess(const uint8_t *data /* [n] */, size_t n, const blip2_image_config *cfg,
                                  const blip2_image_limits *lim,
                                  float *pixel_values /* [3, cfg->size_h, cfg->size_w] */, blip2_status *st);

void blip2_rgb_image_free(blip2_rgb_image *img);

#endif
