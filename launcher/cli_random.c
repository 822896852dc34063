/* `blip2 make-random-checkpoint`: a hub-style snapshot with random weights of a config's shapes,
 * so benchmarks of the full-size model need no download. Written tensor by tensor (the largest,
 * embed_tokens, is 0.5 GB in fp32), never the whole model in memory. */
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../runtime/inputs.h"
#include "../runtime/model.h"
#include "../runtime/safetensors.h"
#include "../runtime/sampling.h"
#include "cli.h"

typedef struct {
    const char *config, *out, *tokenizer;
    blip2_dtype dtype;
    uint64_t seed;
} rand_args;

static int parse_rand_args(int argc, char **argv, rand_args *a) {
    static const struct option opts[] = {
        {"config", required_argument, 0, 'c'}, {"out", required_argument, 0, 'o'},
        {"dtype", required_argument, 0, 'd'},  {"seed", required_argument, 0, 's'},
        {"tokenizer", required_argument, 0, 't'},
        {"help", no_argument, 0, 'h'},         {0, 0, 0, 0},
    };
    memset(a, 0, sizeof *a);
    a->dtype = BLIP2_DT_F16;
    int c, seed = 0;
    optind = 1;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'c': a->config = optarg; break;
        case 'o': a->out = optarg; break;
        case 't': a->tokenizer = optarg; break;
        case 'd':
            if (strcmp(optarg, "f16") == 0) a->dtype = BLIP2_DT_F16;
            else if (strcmp(optarg, "bf16") == 0) a->dtype = BLIP2_DT_BF16;
            else if (strcmp(optarg, "f32") == 0) a->dtype = BLIP2_DT_F32;
            else return blip2_cli_error("--dtype: '%s' is not one of f16, bf16, f32", optarg);
            break;
        case 's':
            if (blip2_cli_parse_int(optarg, 0, 2147483647, &seed)) return blip2_cli_error("--seed: '%s' is not a non-negative integer", optarg);
            a->seed = (uint64_t)seed;
            break;
        case 'h':
            printf("usage: blip2 make-random-checkpoint --config CONFIG.json --out DIR [--dtype f16|bf16|f32] [--seed N]\n"
                   "                                    [--tokenizer DIR]  (copies its tokenizer files: a snapshot the\n"
                   "                                    server and --image/--prompt can use)\n");
            exit(0);
        default: return 2;
        }
    }
    if (!a->config || !a->out) return blip2_cli_error("--config FILE and --out DIR are required");
    return 0;
}

static void *convert(float *x, size_t n, blip2_dtype dt) {
    if (dt == BLIP2_DT_F32) return x;
    uint16_t *h = (uint16_t *)x; /* in place: each 2-byte output lands before its 4-byte input is read */
    for (size_t i = 0; i < n; i++) h[i] = dt == BLIP2_DT_F16 ? blip2_f32_to_f16(x[i]) : blip2_f32_to_bf16(x[i]);
    return h;
}

static blip2_code write_weights(const char *path, const blip2_weight_entry *e, int n, const rand_args *a, blip2_status *st) {
    blip2_st_out *decl = blip2_calloc((size_t)n, sizeof *decl, st);
    if (!decl) return BLIP2_ENOMEM;
    int nd = 0;
    for (int i = 0; i < n; i++) {
        if (e[i].optional) continue; /* lm_head: tied, as in the hub checkpoint */
        decl[nd] = (blip2_st_out){e[i].name, a->dtype, e[i].ndim, {0}, NULL};
        memcpy(decl[nd].shape, e[i].shape, sizeof e[i].shape);
        nd++;
    }
    blip2_st_writer *w;
    blip2_code rc = blip2_st_writer_open(path, decl, nd, &w, st);
    blip2_rng s;
    blip2_rng_seed(&s, a->seed);
    for (int i = 0; !rc && i < nd; i++) {
        size_t numel = 1;
        for (int d = 0; d < decl[i].ndim; d++) numel *= (size_t)decl[i].shape[d];
        float *buf = blip2_malloc(numel * sizeof(float), st);
        if (!buf) {
            rc = BLIP2_ENOMEM;
            break;
        }
        blip2_weight_fill_random(decl[i].name, buf, numel, &s);
        rc = blip2_st_writer_append(w, convert(buf, numel, a->dtype), numel * blip2_dtype_size(a->dtype), st);
        free(buf);
    }
    blip2_code rc2 = w ? blip2_st_writer_close(w, st) : BLIP2_OK;
    free(decl);
    return rc ? rc : rc2;
}

static blip2_code write_text(const char *dir, const char *name, const char *text, blip2_status *st) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *fp = fopen(path, "w");
    if (!fp) return blip2_fail(st, BLIP2_EIO, "%s: cannot create: %s", path, strerror(errno));
    int ok = fputs(text, fp) >= 0;
    ok = fclose(fp) == 0 && ok;
    return ok ? BLIP2_OK : blip2_fail(st, BLIP2_EIO, "%s: write failed", path);
}

/* Copies src/name to dir/name; a file src lacks is skipped. */
static blip2_code copy_file(const char *src, const char *dir, const char *name, blip2_status *st) {
    char from[4096], to[4096];
    snprintf(from, sizeof from, "%s/%s", src, name);
    snprintf(to, sizeof to, "%s/%s", dir, name);
    uint8_t *data;
    size_t n;
    if (access(from, R_OK) != 0) return BLIP2_OK;
    blip2_code rc = blip2_read_file(from, (size_t)64 << 20, &data, &n, st);
    if (rc) return rc;
    FILE *fp = fopen(to, "wb");
    int ok = fp && fwrite(data, 1, n, fp) == n;
    if (fp) ok = fclose(fp) == 0 && ok;
    free(data);
    return ok ? BLIP2_OK : blip2_fail(st, BLIP2_EIO, "%s: write failed", to);
}

static blip2_code copy_tokenizer(const char *src, const char *dir, blip2_status *st) {
    const char *names[] = {"vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                           "added_tokens.json"};
    blip2_code rc = BLIP2_OK;
    for (size_t i = 0; !rc && i < sizeof names / sizeof *names; i++) rc = copy_file(src, dir, names[i], st);
    return rc;
}

static blip2_code copy_config(const char *src, const char *dir, blip2_status *st) {
    FILE *fp = fopen(src, "rb");
    if (!fp) return blip2_fail(st, BLIP2_EIO, "%s: cannot open: %s", src, strerror(errno));
    char *text = NULL;
    size_t cap = 0;
    FILE *mem = open_memstream(&text, &cap);
    char buf[65536];
    size_t k;
    while (mem && (k = fread(buf, 1, sizeof buf, fp)) > 0) fwrite(buf, 1, k, mem);
    fclose(fp);
    if (!mem) return blip2_fail(st, BLIP2_ENOMEM, "out of memory");
    fclose(mem);
    blip2_code rc = write_text(dir, "config.json", text, st);
    free(text);
    return rc;
}

static blip2_code write_side_files(const char *dir, const blip2_config *c, blip2_status *st) {
    char text[512];
    snprintf(text, sizeof text, "{\n  \"bos_token_id\": %d,\n  \"eos_token_id\": %d,\n  \"pad_token_id\": %d\n}\n", c->bos_id,
             c->eos_id, c->pad_id);
    blip2_code rc = write_text(dir, "generation_config.json", text, st);
    snprintf(text, sizeof text, "{\"num_query_tokens\": %d, \"processor_class\": \"Blip2Processor\"}\n", c->Q);
    if (!rc) rc = write_text(dir, "processor_config.json", text, st);
    snprintf(text, sizeof text, /* BlipImageProcessor as the hub has it, at the vision encoder's size */
             "{\"do_convert_rgb\": true, \"do_normalize\": true, \"do_rescale\": true, \"do_resize\": true,\n"
             " \"image_mean\": [0.48145466, 0.4578275, 0.40821073], \"image_std\": [0.26862954, 0.26130258, 0.27577711],\n"
             " \"resample\": 3, \"rescale_factor\": 0.00392156862745098, \"size\": {\"height\": %d, \"width\": %d}}\n",
             c->vision.image_size, c->vision.image_size);
    return rc ? rc : write_text(dir, "preprocessor_config.json", text, st);
}

int blip2_cli_make_random_checkpoint(int argc, char **argv) {
    rand_args a;
    int bad = parse_rand_args(argc, argv, &a);
    if (bad) return bad;
    blip2_status st = {0};
    FILE *fp = fopen(a.config, "rb");
    if (!fp) return blip2_cli_error("%s: cannot open: %s", a.config, strerror(errno));
    static char text[1 << 20];
    size_t len = fread(text, 1, sizeof text, fp);
    fclose(fp);
    blip2_model m;
    memset(&m, 0, sizeof m);
    blip2_code rc = blip2_config_parse(text, len, a.config, &m.cfg, &st);
    if (!rc && mkdir(a.out, 0755) != 0 && errno != EEXIST) rc = blip2_fail(&st, BLIP2_EIO, "%s: cannot create: %s", a.out, strerror(errno));
    blip2_weight_entry *e = NULL;
    int n = 0;
    if (!rc) rc = blip2_weight_table(&m, &e, &n, &st);
    char path[4096];
    snprintf(path, sizeof path, "%s/model.safetensors", a.out);
    if (!rc) rc = write_weights(path, e, n, &a, &st);
    if (!rc) rc = copy_config(a.config, a.out, &st);
    if (!rc) rc = write_side_files(a.out, &m.cfg, &st);
    if (!rc && a.tokenizer) rc = copy_tokenizer(a.tokenizer, a.out, &st);
    free(e);
    blip2_model_free(&m);
    if (rc) return blip2_cli_error("%s", st.msg);
    fprintf(stderr, "blip2: wrote %s (%d tensors, %s)\n", a.out, n, blip2_dtype_name(a.dtype));
    return 0;
}
