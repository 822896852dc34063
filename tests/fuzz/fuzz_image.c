/* libFuzzer target: arbitrary bytes through the whole image pipeline (decode -> resize ->
 * normalise). The 4 MP / 4096-side limit keeps each input's memory small; anything larger must be
 * refused with BLIP2_ERANGE, never crash. Build:
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -I runtime runtime/status.c runtime/image.c \
 *         tests/fuzz/fuzz_image.c -ljpeg -lpng -ljansson -lm -o fuzz_image */
#include <stdint.h>
#include <stdlib.h>

#include "image.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static float pixel_values[3 * 224 * 224];
    blip2_image_config cfg = blip2_image_config_default();
    blip2_image_limits lim = {4u << 20, 4096};
    blip2_status st = {0};
    blip2_code rc = blip2_image_preprocess(data, size, &cfg, &lim, pixel_values, &st);
    if (rc != BLIP2_OK && st.msg[0] == '\0') abort(); /* every error must say what went wrong */
    return 0;
}
