/* Image file + prompt → model inputs, and ids → text, for the CLI. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../runtime/inputs.h"
#include "cli.h"

#define MAX_IMAGE_FILE_BYTES ((size_t)256 << 20)

blip2_code blip2_cli_image_inputs(const char *model_dir, const char *image, const char *prompt, const blip2_config *cfg,
                                  float **pixels, int32_t **ids, int *n, blip2_status *st) {
    blip2_inputs in;
    blip2_code rc = blip2_inputs_load(model_dir, cfg, &in, st);
    if (rc) return rc;
    uint8_t *data = NULL;
    size_t len = 0;
    rc = blip2_read_file(image, MAX_IMAGE_FILE_BYTES, &data, &len, st);
    if (!rc) rc = blip2_inputs_image(&in, data, len, pixels, st);
    if (!rc) rc = blip2_inputs_prompt(&in, prompt, prompt ? strlen(prompt) : 0, ids, n, st);
    free(data);
    blip2_inputs_free(&in);
    return rc;
}

blip2_code blip2_cli_print_text(const char *model_dir, const int32_t *ids, int n, blip2_status *st) {
    blip2_tokenizer *tok;
    if (blip2_tokenizer_load(model_dir, &tok, st) != BLIP2_OK) return BLIP2_OK; /* no tokenizer: ids only */
    blip2_inputs in = {.tok = tok};
    char *text = NULL;
    size_t len = 0;
    blip2_code rc = blip2_inputs_decode(&in, ids, n, &text, &len, st);
    if (!rc) {
        json_t *js = json_stringn(text, len);
        char *s = js ? json_dumps(js, JSON_ENCODE_ANY) : NULL;
        printf(", \"text\": %s", s ? s : "\"\"");
        free(s);
        json_decref(js);
    }
    free(text);
    blip2_tokenizer_free(tok);
    return rc;
}
