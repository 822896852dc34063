/* libFuzzer: the request path from protobuf bytes to model inputs — protobuf-c unpack of a
 * GenerateRequest, the server's checks (blip2_request_to_job: UTF-8, ranges, decoding parameters),
 * then the engine's preprocessing of what passed: tokenizer and image decode + resize + normalise
 * (with a 4 MP limit so the fuzzer does not spend itself on huge images). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "../../launcher/request.h"
#include "inputs.h"

static blip2_config cfg;
static blip2_inputs in;

static int setup(void) {
    const char *shared = getenv("BLIP2_SHARED_DIR") ? getenv("BLIP2_SHARED_DIR") : BLIP2_SHARED_DIR;
    char dir[1024];
    snprintf(dir, sizeof dir, "%s/fixtures/tiny-f16", shared);
    blip2_status st;
    if (blip2_config_load(dir, &cfg, &st) || blip2_inputs_load(dir, &cfg, &in, &st)) {
        fprintf(stderr, "fuzz_request: %s\n", st.msg);
        abort();
    }
    in.limits.max_pixels = 4u << 20;
    in.limits.max_side = 4096;
    return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static int ready;
    if (!ready) ready = setup();
    Blip2__V1__GenerateRequest *r = blip2__v1__generate_request__unpack(NULL, size, data);
    if (!r) return 0;
    size_t n = r->n_prompts ? r->n_prompts : 1;
    for (size_t i = 0; i < n && i < 4; i++) {
        blip2_job job;
        blip2_status st = {0};
        const char *prompt = r->n_prompts ? r->prompts[i] : r->prompt;
        if (blip2_request_to_job(r, 1024, prompt, 0, &job, &st) != BLIP2_OK) {
            if (!st.msg[0]) abort(); /* every refusal says why */
            continue;
        }
        int32_t *ids = NULL;
        int n_ids = 0;
        float *pixels = NULL;
        if (blip2_inputs_prompt(&in, job.prompt, job.prompt_len, &ids, &n_ids, &st) == BLIP2_OK &&
            (n_ids < cfg.Q + 1 || ids[cfg.Q] != cfg.bos_id))
            abort();
        free(ids);
        if (i == 0 && blip2_inputs_image(&in, job.image, job.image_len, &pixels, &st) != BLIP2_OK && !st.msg[0]) abort();
        free(pixels);
    }
    blip2__v1__generate_request__free_unpacked(r, NULL);
    return 0;
}
