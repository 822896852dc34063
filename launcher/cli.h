/* The `blip2` command line: one file per subcommand, shared helpers here. */
#ifndef BLIP2_CLI_H
#define BLIP2_CLI_H

#include <stdint.h>

#include "../runtime/config.h"
#include "../runtime/inputs.h"
#include "../runtime/status.h"

int blip2_cli_generate(int argc, char **argv);
int blip2_cli_make_random_checkpoint(int argc, char **argv);
int blip2_cli_bench(int argc, char **argv);

/* Prints "blip2: <message>" on stderr and returns the exit code 1 (2 for usage errors is the caller's). */
int blip2_cli_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Strict integer parse: the whole string, within [lo, hi]; 0 on success. */
int blip2_cli_parse_int(const char *s, long lo, long hi, int *out);
/* "1,2,3" → ids. */
blip2_code blip2_cli_parse_ids(const char *s, int32_t **ids, int *n, blip2_status *st);
/* The model directory's preprocessing config and tokenizer; without need_tokenizer a directory
 * lacking tokenizer files still loads (answers then come as ids only). */
blip2_code blip2_cli_load_inputs(const char *model_dir, const blip2_config *cfg, int need_tokenizer, blip2_inputs *in,
                                 blip2_status *st);
/* Image file + prompt text → pixels [3, S, S] and the model's input ids ([image]*Q + [bos] + BPE). */
blip2_code blip2_cli_image_inputs(const blip2_inputs *in, const char *image, const char *prompt, float **pixels,
                                  int32_t **ids, int *n, blip2_status *st);

#endif
