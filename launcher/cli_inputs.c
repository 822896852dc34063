/* Image file + prompt → model inputs, and ids → text, for the CLI. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../runtime/inputs.h"
#include "cli.h"

#define MAX_IMAGE_FILE_BYTES ((size_t)256 << 20)

blip2_code blip2_cli_load_inputs(const char *model_dir, const blip2_config *cfg, int need_tokenizer, blip2_inputs *in,
                                 blip2_status *st) {
    blip2_code rc = blip2_inputs_load(model_dir, cfg, in, st);
    if (!rc || need_tokenizer) return rc;
    memset(in, 0, sizeof *in); /* ids given: answers are printed as ids only */
    in->cfg = cfg;
    in->image = blip2_image_config_default();
    in->limits = blip2_image_limits_default();
    return BLIP2_OK;
}

blip2_code blip2_cli_image_inputs(const blip2_inputs *in, const char *image, const char *prompt, float **pixels,
                                  int32_t **ids, int *n, blip2_status *st) {
    uint8_t *data = NULL;
    size_t len = 0;
    blip2_code rc = blip2_read_file(image, MAX_IMAGE_FILE_BYTES, &data, &len, st);
    if (!rc) rc = blip2_inputs_image(in, data, len, pixels, st);
    if (!rc) rc = blip2_inputs_prompt(in, prompt, prompt ? strlen(prompt) : 0, ids, n, st);
    free(data);
    return rc;
}
