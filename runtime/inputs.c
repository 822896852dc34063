#include "inputs.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DEFAULT_MAX_PROMPT_BYTES (64 * 1024)

blip2_code blip2_inputs_load(const char *model_dir, const blip2_config *cfg, blip2_inputs *in, blip2_status *st) {
    memset(in, 0, sizeof *in);
    in->cfg = cfg;
    in->limits = blip2_image_limits_default();
    in->max_prompt_bytes = DEFAULT_MAX_PROMPT_BYTES;
    blip2_code rc = blip2_image_config_load(model_dir, &in->image, st);
    if (!rc && (in->image.size_h != cfg->vision.image_size || in->image.size_w != cfg->vision.image_size))
        rc = blip2_fail(st, BLIP2_EFORMAT, "%s/preprocessor_config.json: size %dx%d differs from the vision image_size %d",
                        model_dir, in->image.size_w, in->image.size_h, cfg->vision.image_size);
    if (!rc) rc = blip2_tokenizer_load(model_dir, &in->tok, st);
    if (rc) blip2_inputs_free(in);
    return rc;
}

void blip2_inputs_free(blip2_inputs *in) {
    if (in->tok) blip2_tokenizer_free(in->tok);
    memset(in, 0, sizeof *in);
}

blip2_code blip2_inputs_image(const blip2_inputs *in, const uint8_t *data, size_t n, float **pixels, blip2_status *st) {
    size_t count = (size_t)3 * in->image.size_h * in->image.size_w;
    *pixels = blip2_malloc(count * sizeof(float), st);
    if (!*pixels) return BLIP2_ENOMEM;
    blip2_code rc = blip2_image_preprocess(data, n, &in->image, &in->limits, *pixels, st);
    if (rc) {
        free(*pixels);
        *pixels = NULL;
        blip2_wrap(st, "image");
    }
    return rc;
}

blip2_code blip2_inputs_prompt(const blip2_inputs *in, const char *prompt, size_t len, int32_t **ids, int *n,
                               blip2_status *st) {
    if (len > (size_t)in->max_prompt_bytes)
        return blip2_fail(st, BLIP2_ERANGE, "prompt of %zu bytes is longer than the limit of %d bytes", len,
                          in->max_prompt_bytes);
    size_t count = 0;
    blip2_code rc = blip2_tokenizer_build_prompt(in->tok, prompt ? prompt : "", prompt ? len : 0, in->cfg->Q,
                                                 in->cfg->image_token_id, in->cfg->bos_id, ids, &count, st);
    if (rc) return blip2_wrap(st, "prompt");
    if (count >= (size_t)in->cfg->opt.max_pos) {
        free(*ids);
        *ids = NULL;
        return blip2_fail(st, BLIP2_ERANGE, "prompt of %zu tokens (image tokens included) does not fit the context of %d",
                          count, in->cfg->opt.max_pos);
    }
    *n = (int)count;
    return BLIP2_OK;
}

static int is_space(char c) { return c == ' ' || c == '\n' || c == '\t' || c == '\r' || c == '\f' || c == '\v'; }

blip2_code blip2_inputs_decode(const blip2_inputs *in, const int32_t *ids, int n, char **text, size_t *len,
                               blip2_status *st) {
    blip2_code rc = blip2_tokenizer_decode(in->tok, ids, (size_t)n, text, len, st);
    if (rc) return rc;
    size_t b = 0, e = *len;
    while (b < e && is_space((*text)[b])) b++;
    while (e > b && is_space((*text)[e - 1])) e--;
    memmove(*text, *text + b, e - b);
    (*text)[e - b] = 0;
    *len = e - b;
    return BLIP2_OK;
}

blip2_code blip2_read_file(const char *path, size_t max_bytes, uint8_t **data, size_t *n, blip2_status *st) {
    FILE *fp = fopen(path, "rb");
    if (!fp) return blip2_fail(st, BLIP2_EIO, "%s: %s", path, strerror(errno));
    size_t cap = 1 << 16, len = 0;
    uint8_t *buf = malloc(cap);
    blip2_code rc = buf ? BLIP2_OK : blip2_fail(st, BLIP2_ENOMEM, "out of memory");
    while (!rc) {
        if (len == cap) {
            uint8_t *nb = cap < max_bytes ? realloc(buf, cap * 2) : NULL;
            if (!nb) {
                rc = cap >= max_bytes ? blip2_fail(st, BLIP2_ERANGE, "%s: larger than %zu bytes", path, max_bytes)
                                      : blip2_fail(st, BLIP2_ENOMEM, "out of memory");
                break;
            }
            buf = nb;
            cap *= 2;
        }
        size_t k = fread(buf + len, 1, cap - len, fp);
        len += k;
        if (k == 0) break;
    }
    if (!rc && ferror(fp)) rc = blip2_fail(st, BLIP2_EIO, "%s: read error", path);
    if (!rc && len > max_bytes) rc = blip2_fail(st, BLIP2_ERANGE, "%s: larger than %zu bytes", path, max_bytes);
    fclose(fp);
    if (rc) {
        free(buf);
        return rc;
    }
    *data = buf;
    *n = len;
    return BLIP2_OK;
}
