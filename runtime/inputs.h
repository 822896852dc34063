/* Bytes and text → model inputs: the one place that turns an image file and a prompt into
 * pixel values [3, S, S] and ids [image]*Q + [bos] + BPE(prompt). Used by the CLI and the engine;
 * safe to call from several threads at once (the tokenizer and configs are read-only). */
#ifndef BLIP2_INPUTS_H
#define BLIP2_INPUTS_H

#include <stddef.h>
#include <stdint.h>

#include "config.h"
#include "image.h"
#include "tokenizer.h"

typedef struct {
    const blip2_config *cfg;
    blip2_image_config image;
    blip2_image_limits limits;
    blip2_tokenizer *tok;
    int max_prompt_bytes; /* longer prompts are rejected before tokenising */
} blip2_inputs;

/* Loads preprocessor_config.json and the tokenizer of the model directory; the image size must
 * be the vision encoder's. */
blip2_code blip2_inputs_load(const char *model_dir, const blip2_config *cfg, blip2_inputs *in, blip2_status *st);
void blip2_inputs_free(blip2_inputs *in);

/* Image bytes → pixels [3, S, S] (malloc'd). Errors say what is wrong with the image. */
blip2_code blip2_inputs_image(const blip2_inputs *in, const uint8_t *data, size_t n, float **pixels, blip2_status *st);
/* Prompt (UTF-8, may be empty) → the model's ids (malloc'd). */
blip2_code blip2_inputs_prompt(const blip2_inputs *in, const char *prompt, size_t len, int32_t **ids, int *n,
                               blip2_status *st);
/* Generated ids → text with special tokens skipped and surrounding whitespace stripped. */
blip2_code blip2_inputs_decode(const blip2_inputs *in, const int32_t *ids, int n, char **text, size_t *len,
                               blip2_status *st);

/* Reads a whole file (at most max_bytes) into memory. */
blip2_code blip2_read_file(const char *path, size_t max_bytes, uint8_t **data, size_t *n, blip2_status *st);

#endif
