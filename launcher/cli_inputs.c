/* Image file + prompt → model inputs, and ids → text, for the CLI. */
#include "cli.h"

blip2_code blip2_cli_image_inputs(const char *model_dir, const char *image, const char *prompt, const blip2_config *cfg,
                                  float **pixels, int32_t **ids, int *n, blip2_status *st) {
    (void)model_dir; (void)image; (void)prompt; (void)cfg; (void)pixels; (void)ids; (void)n;
    return blip2_fail(st, BLIP2_EINVAL, "--image is not available in this build yet");
}

blip2_code blip2_cli_print_text(const char *model_dir, const int32_t *ids, int n, blip2_status *st) {
    (void)model_dir; (void)ids; (void)n; (void)st;
    return BLIP2_OK;
}
