/* Image pipeline timing: decode + bicubic resize to 224x224 + normalise, for a 640x480 and a
 * 4000x3000 JPEG made in memory (libjpeg, quality 90, 4:2:0, synthetic content). Prints the median
 * of several runs for each stage and for the whole preprocess call. */
#define _POSIX_C_SOURCE 199309L

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <jpeglib.h>

#include "image.h"

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* Gradients plus a little texture, so the entropy coder has photo-like work. */
static void synth_row(int w, int y, int h, uint8_t *row) {
    for (int x = 0; x < w; x++) {
        uint32_t n = (uint32_t)x * 2654435761u ^ (uint32_t)y * 40503u;
        row[3 * x + 0] = (uint8_t)(255 * x / w + (n >> 28));
        row[3 * x + 1] = (uint8_t)(255 * y / h);
        row[3 * x + 2] = (uint8_t)(128 + ((x / 16 + y / 16) % 2) * 64 + (n >> 29));
    }
}

/* Default error handling (exit on error) is fine for a benchmark's own encoder. */
static uint8_t *make_jpeg(int w, int h, unsigned long *n) {
    struct jpeg_compress_struct ci;
    struct jpeg_error_mgr err;
    unsigned char *buf = NULL;
    uint8_t *row = malloc((size_t)w * 3);
    ci.err = jpeg_std_error(&err);
    jpeg_create_compress(&ci);
    jpeg_mem_dest(&ci, &buf, n);
    ci.image_width = (JDIMENSION)w;
    ci.image_height = (JDIMENSION)h;
    ci.input_components = 3;
    ci.in_color_space = JCS_RGB;
    jpeg_set_defaults(&ci); /* YCbCr, luma 2x2 sampling = 4:2:0 */
    jpeg_set_quality(&ci, 90, TRUE);
    jpeg_start_compress(&ci, TRUE);
    while (ci.next_scanline < ci.image_height) {
        synth_row(w, (int)ci.next_scanline, h, row);
        JSAMPROW r = row;
        jpeg_write_scanlines(&ci, &r, 1);
    }
    jpeg_finish_compress(&ci);
    jpeg_destroy_compress(&ci);
    free(row);
    return buf;
}

enum { MAX_RUNS = 31 };

static int bench(int w, int h, int runs) {
    unsigned long n = 0;
    uint8_t *jpg = make_jpeg(w, h, &n);
    blip2_image_config cfg = blip2_image_config_default();
    float *pv = malloc(3 * 224 * 224 * sizeof *pv);
    double t_dec[MAX_RUNS], t_rsz[MAX_RUNS], t_norm[MAX_RUNS], t_all[MAX_RUNS];
    blip2_status st = {0};
    for (int r = 0; r < runs; r++) {
        blip2_rgb_image img, small;
        double t0 = now_ms();
        if (blip2_image_decode(jpg, n, NULL, &img, &st)) return fprintf(stderr, "decode: %s\n", st.msg), 1;
        double t1 = now_ms();
        if (blip2_image_resize_bicubic(&img, 224, 224, &small, &st)) return fprintf(stderr, "resize: %s\n", st.msg), 1;
        double t2 = now_ms();
        blip2_image_normalize(&small, &cfg, pv, &st);
        double t3 = now_ms();
        blip2_rgb_image_free(&small);
        blip2_rgb_image_free(&img);
        if (blip2_image_preprocess(jpg, n, &cfg, NULL, pv, &st)) return fprintf(stderr, "preprocess: %s\n", st.msg), 1;
        double t4 = now_ms();
        t_dec[r] = t1 - t0, t_rsz[r] = t2 - t1, t_norm[r] = t3 - t2, t_all[r] = t4 - t3;
    }
    printf("%4dx%-4d JPEG q90 4:2:0 (%7lu bytes), median of %2d: decode %8.3f ms  resize %7.3f ms  "
           "normalize %6.3f ms  preprocess total %8.3f ms\n",
           w, h, n, runs, median(t_dec, runs), median(t_rsz, runs), median(t_norm, runs), median(t_all, runs));
    free(pv);
    free(jpg);
    return 0;
}

int main(void) {
    return bench(640, 480, 31) || bench(4000, 3000, 9);
}
