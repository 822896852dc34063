/* check_dump DUMP.safetensors GOLDEN.safetensors CASE [TOL]: every tensor of the golden case
 * (vision_out, qformer_out, projected, prefill_logits) against the dump, relative L2 <= TOL
 * (default 2e-6). A dump made by a rank other than 0 has no vision tensors: only those present
 * in the dump are compared, and prefill_logits must be. Prints "N passed, M failed". */
#include <stdlib.h>

#include "check.h"
#include "safetensors.h"

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: check_dump DUMP GOLDEN CASE [TOL]\n");
        return 2;
    }
    double tol = argc > 4 ? atof(argv[4]) : 2e-6;
    blip2_st_file dump, gold;
    blip2_status st = {0};
    if (blip2_st_open(argv[1], &dump, &st) || blip2_st_open(argv[2], &gold, &st)) {
        fprintf(stderr, "%s\n", st.msg);
        return 1;
    }
    const char *names[] = {"vision_out", "qformer_out", "projected", "prefill_logits"};
    for (int i = 0; i < 4; i++) {
        char key[64];
        snprintf(key, sizeof key, "case%s.%s", argv[3], names[i]);
        const blip2_st_tensor *a = blip2_st_find(&dump, names[i]), *b = blip2_st_find(&gold, key);
        CHECK(a && b, "%s missing (dump %p, golden %p)", names[i], (void *)a, (void *)b);
        if (!a || !b) continue;
        CHECK(blip2_st_numel(a) == blip2_st_numel(b), "%s: sizes differ", names[i]);
        if (blip2_st_numel(a) != blip2_st_numel(b)) continue;
        double err = check_rel_l2(a->data, b->data, (size_t)blip2_st_numel(a));
        CHECK(err <= tol, "%s: rel L2 %.3g > %g", names[i], err, tol);
        printf("%s rel L2 %.2e\n", names[i], err);
    }
    blip2_st_close(&dump);
    blip2_st_close(&gold);
    return check_summary();
}
