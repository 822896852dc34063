/* libFuzzer: config.json parsing (class defaults, type and range checks) on arbitrary bytes.
 * An accepted config must be self-consistent: heads divide the widths, dims are positive. */
#include <stdint.h>
#include <stdlib.h>

#include "config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    blip2_config c;
    blip2_status st;
    if (blip2_config_parse((const char *)data, size, "fuzz/config.json", &c, &st) != BLIP2_OK) return 0;
    if (c.vision.HS * c.vision.NH != c.vision.C || c.qformer.HS * c.qformer.NH != c.qformer.C ||
        c.opt.HS * c.opt.NH != c.opt.C || c.Q < 1 || c.vision.T != c.vision.P + 1 || c.opt.V < 1)
        abort();
    return 0;
}
