/* libFuzzer: the safetensors header parser and dtype conversion on arbitrary bytes. */
#include <stdint.h>
#include <stdlib.h>

#include "safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    blip2_st_file f;
    blip2_status st;
    if (blip2_st_parse(data, size, "fuzz.safetensors", &f, &st) != BLIP2_OK) return 0;
    float buf[64];
    for (int i = 0; i < f.n; i++) {
        const blip2_st_tensor *t = &f.tensors[i];
        size_t n = (size_t)blip2_st_numel(t);
        if (blip2_st_find(&f, t->name) != t) abort(); /* sorted lookup must find every entry */
        blip2_st_read_f32(t, 0, n < 64 ? n : 64, buf, &st);
    }
    blip2_st_close(&f);
    return 0;
}
