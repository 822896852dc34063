/* `blip2`: the engine's command line (no server): generate, make-random-checkpoint. */
#include <stdio.h>
#include <string.h>

#include "cli.h"

static void usage(FILE *fp) {
    fprintf(fp,
            "usage: blip2 <command> [options]\n"
            "commands:\n"
            "  generate                answer a prompt about an image (greedy), see `blip2 generate --help`\n"
            "  make-random-checkpoint  write a hub-style snapshot with random weights for a config\n"
            "  bench                   engine throughput: vision images/s, prefill and decode tokens/s by batch\n");
}

int main(int argc, char **argv) {
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (strcmp(argv[1], "generate") == 0) return blip2_cli_generate(argc - 1, argv + 1);
    if (strcmp(argv[1], "bench") == 0) return blip2_cli_bench(argc - 1, argv + 1);
    if (strcmp(argv[1], "make-random-checkpoint") == 0) return blip2_cli_make_random_checkpoint(argc - 1, argv + 1);
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        usage(stdout);
        return 0;
    }
    fprintf(stderr, "blip2: unknown command '%s'\n", argv[1]);
    usage(stderr);
    return 2;
}
