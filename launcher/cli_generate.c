/* `blip2 generate`: one image + one prompt → greedy ids, optionally JSON and a tensor dump. */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "../parallel/comm.h"
#include "../runtime/forward.h"
#include "../runtime/safetensors.h"
#include "cli.h"

typedef struct {
    const char *model, *pixel_values, *input_ids, *dump, *image, *prompt;
    int max_new, json;
} gen_args;

static void generate_usage(FILE *fp) {
    fprintf(fp,
            "usage: blip2 generate --model DIR (--pixel-values FILE.safetensors:KEY --input-ids ID,ID,...\n"
            "                                  | --image FILE [--prompt TEXT])\n"
            "                      [--max-new-tokens N] [--json] [--dump DIR]\n"
            "  --input-ids     the ids the model consumes, image tokens included\n"
            "  --max-new-tokens default: the model's generation default (20)\n"
            "  --json          print {\"input_ids\", \"output_ids\", \"finish_reason\"} on stdout\n"
            "  --dump DIR      write DIR/tensors.safetensors (vision_out, qformer_out, projected, prefill_logits)\n");
}

static int parse_gen_args(int argc, char **argv, gen_args *a) {
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'},        {"pixel-values", required_argument, 0, 'p'},
        {"input-ids", required_argument, 0, 'i'},    {"max-new-tokens", required_argument, 0, 'n'},
        {"json", no_argument, 0, 'j'},               {"dump", required_argument, 0, 'd'},
        {"image", required_argument, 0, 'I'},        {"prompt", required_argument, 0, 'P'},
        {"help", no_argument, 0, 'h'},               {0, 0, 0, 0},
    };
    memset(a, 0, sizeof *a);
    a->max_new = -1;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'm': a->model = optarg; break;
        case 'p': a->pixel_values = optarg; break;
        case 'i': a->input_ids = optarg; break;
        case 'n':
            if (blip2_cli_parse_int(optarg, 1, 1 << 20, &a->max_new)) return blip2_cli_error("--max-new-tokens: '%s' is not an integer in [1, 1048576]", optarg);
            break;
        case 'j': a->json = 1; break;
        case 'd': a->dump = optarg; break;
        case 'I': a->image = optarg; break;
        case 'P': a->prompt = optarg; break;
        case 'h': generate_usage(stdout); exit(0);
        default: generate_usage(stderr); return 2;
        }
    }
    if (optind < argc) return blip2_cli_error("unexpected argument '%s'", argv[optind]);
    if (!a->model) return blip2_cli_error("--model DIR is required");
    int tensor_form = a->pixel_values || a->input_ids;
    if (tensor_form && a->image) return blip2_cli_error("use either --pixel-values/--input-ids or --image/--prompt, not both");
    if (!a->image && !(a->pixel_values && a->input_ids))
        return blip2_cli_error("give --image FILE [--prompt TEXT], or both --pixel-values FILE:KEY and --input-ids");
    return 0;
}

/* "FILE.safetensors:KEY" → [3, S, S] float32 pixels. */
static blip2_code load_pixel_values(const char *spec, const blip2_config *cfg, float **out, blip2_status *st) {
    const char *colon = strrchr(spec, ':');
    if (!colon || colon == spec || !colon[1])
        return blip2_fail(st, BLIP2_EINVAL, "--pixel-values '%s': expected FILE.safetensors:KEY", spec);
    char *path = strndup(spec, (size_t)(colon - spec));
    blip2_st_file f;
    blip2_code rc = path ? blip2_st_open(path, &f, st) : blip2_fail(st, BLIP2_ENOMEM, "out of memory");
    free(path);
    if (rc) return rc;
    const blip2_st_tensor *t = blip2_st_find(&f, colon + 1);
    int S = cfg->vision.image_size;
    size_t n = (size_t)3 * S * S;
    if (!t)
        rc = blip2_fail(st, BLIP2_EINVAL, "%s: no tensor '%s'", f.path, colon + 1);
    else if (blip2_st_numel(t) != (int64_t)n || t->shape[t->ndim - 1] != S)
        rc = blip2_fail(st, BLIP2_EINVAL, "%s: tensor '%s' must be [3, %d, %d] (or [1, 3, %d, %d])", f.path, colon + 1, S, S, S, S);
    else if (!(*out = blip2_malloc(n * sizeof(float), st)))
        rc = BLIP2_ENOMEM;
    else
        rc = blip2_st_read_f32(t, 0, n, *out, st);
    blip2_st_close(&f);
    return rc;
}

static blip2_code write_dump(const char *dir, const blip2_config *c, const blip2_trace *tr, const float *pixels,
                             blip2_status *st) {
    if (mkdir(dir, 0755) != 0 && errno != EEXIST) return blip2_fail(st, BLIP2_EIO, "--dump %s: cannot create: %s", dir, strerror(errno));
    char path[4096];
    snprintf(path, sizeof path, "%s/tensors.safetensors", dir);
    int S = c->vision.image_size;
    blip2_st_out t[] = {
        {"vision_out", BLIP2_DT_F32, 2, {c->vision.T, c->vision.C}, tr->vision_out},
        {"qformer_out", BLIP2_DT_F32, 2, {c->Q, c->qformer.C}, tr->qformer_out},
        {"projected", BLIP2_DT_F32, 2, {c->Q, c->opt.C}, tr->projected},
        {"prefill_logits", BLIP2_DT_F32, 1, {c->opt.V}, tr->prefill_logits},
        {"pixel_values", BLIP2_DT_F32, 3, {3, S, S}, pixels},
    };
    return blip2_st_write(path, t, 5, st);
}

static void print_ids(FILE *fp, const int32_t *ids, int n) {
    fputc('[', fp);
    for (int i = 0; i < n; i++) fprintf(fp, "%s%d", i ? ", " : "", ids[i]);
    fputc(']', fp);
}

static blip2_code alloc_trace(const blip2_config *c, blip2_trace *tr, blip2_status *st) {
    tr->vision_out = malloc(sizeof(float) * c->vision.T * c->vision.C);
    tr->qformer_out = malloc(sizeof(float) * c->Q * c->qformer.C);
    tr->projected = malloc(sizeof(float) * c->Q * c->opt.C);
    tr->prefill_logits = malloc(sizeof(float) * c->opt.V);
    if (!tr->vision_out || !tr->qformer_out || !tr->projected || !tr->prefill_logits)
        return blip2_fail(st, BLIP2_ENOMEM, "out of memory");
    return BLIP2_OK;
}

static void free_trace(blip2_trace *tr) {
    free(tr->vision_out);
    free(tr->qformer_out);
    free(tr->projected);
    free(tr->prefill_logits);
}

/* Rank 0 reads the image (or pixel tensor) and the ids and broadcasts the ids; every rank learns
 * whether that worked. */
static blip2_code prepare_inputs(const gen_args *a, const blip2_model *m, const blip2_tp *tp, float **pixels, int32_t **ids,
                                 int *n, blip2_status *st) {
    blip2_code rc = BLIP2_OK;
    if (tp->rank == 0 && a->image) {
        rc = blip2_cli_image_inputs(a->model, a->image, a->prompt, &m->cfg, pixels, ids, n, st);
    } else if (tp->rank == 0) {
        rc = blip2_cli_parse_ids(a->input_ids, ids, n, st);
        if (!rc) rc = load_pixel_values(a->pixel_values, &m->cfg, pixels, st);
    }
    rc = blip2_tp_agree(tp, rc, st);
    if (rc || tp->world == 1) return rc;
    blip2_comm *c = tp->comm;
    rc = c->ops->broadcast(c, n, sizeof *n, 0, st);
    if (!rc && tp->rank != 0 && !(*ids = blip2_malloc(sizeof(int32_t) * (size_t)*n, st))) rc = BLIP2_ENOMEM;
    rc = blip2_tp_agree(tp, rc, st);
    return rc ? rc : c->ops->broadcast(c, *ids, sizeof(int32_t) * (size_t)*n, 0, st);
}

static blip2_code print_result(const gen_args *a, const int32_t *ids, int n, const int32_t *out, int n_out,
                               blip2_finish finish, blip2_status *st) {
    if (!a->json) {
        print_ids(stdout, out, n_out);
        printf("\n");
        return BLIP2_OK;
    }
    printf("{\"input_ids\": ");
    print_ids(stdout, ids, n);
    printf(", \"output_ids\": ");
    print_ids(stdout, out, n_out);
    printf(", \"finish_reason\": \"%s\"", blip2_finish_name(finish));
    blip2_code rc = blip2_cli_print_text(a->model, out, n_out, st);
    printf("}\n");
    return rc;
}

static blip2_code run_generate(const gen_args *a, blip2_model *m, const blip2_tp *tp, blip2_status *st) {
    const blip2_config *c = &m->cfg;
    float *pixels = NULL;
    int32_t *ids = NULL, *out = NULL;
    int n = 0, n_out = 0;
    blip2_trace tr = {0};
    blip2_finish finish;
    int max_new = a->max_new > 0 ? a->max_new : c->max_new_tokens;
    blip2_code rc = prepare_inputs(a, m, tp, &pixels, &ids, &n, st);
    if (!rc && a->dump) rc = alloc_trace(c, &tr, st);
    if (!rc && !(out = blip2_malloc(sizeof(int32_t) * (size_t)max_new, st))) rc = BLIP2_ENOMEM;
    rc = blip2_tp_agree(tp, rc, st);
    if (!rc) rc = blip2_generate_greedy(m, tp, pixels, ids, n, max_new, out, &n_out, &finish, a->dump ? &tr : NULL, st);
    if (!rc && tp->rank == 0 && a->dump) rc = write_dump(a->dump, c, &tr, pixels, st);
    if (!rc && tp->rank == 0) rc = print_result(a, ids, n, out, n_out, finish, st);
    free_trace(&tr);
    free(pixels);
    free(ids);
    free(out);
    return rc;
}

/* Resident memory now (VmRSS), in MiB, for the per-rank load report. */
static double rss_mib(void) {
    FILE *fp = fopen("/proc/self/status", "r");
    char line[256];
    double kb = 0;
    while (fp && fgets(line, sizeof line, fp))
        if (sscanf(line, "VmRSS: %lf kB", &kb) == 1) break;
    if (fp) fclose(fp);
    return kb / 1024.0;
}

static blip2_code load_on_every_rank(const char *dir, const blip2_tp *tp, blip2_model *m, blip2_status *st) {
    blip2_code rc = blip2_model_load_shard(dir, tp->rank, tp->world, m, st);
    rc = blip2_tp_agree(tp, rc, st);
    if (!rc && tp->world > 1)
        fprintf(stderr, "blip2: rank %d/%d: OPT shard %.1f MiB (heads %d, ffn %d, vocab [%d, %d)), resident %.1f MiB\n",
                tp->rank, tp->world, m->opt_bytes / 1048576.0, m->shard.NH, m->shard.ffn, m->shard.v0,
                m->shard.v0 + m->shard.V, rss_mib());
    return rc;
}

int blip2_cli_generate(int argc, char **argv) {
    gen_args a;
    int bad = parse_gen_args(argc, argv, &a);
    if (bad) return bad;
    blip2_status st = {0};
    blip2_comm *world = blip2_comm_world(&st);
    if (!world) return blip2_cli_error("%s", st.msg);
    blip2_tp tp = blip2_tp_from_comm(world);
    blip2_model m;
    blip2_code rc = load_on_every_rank(a.model, &tp, &m, &st);
    if (!rc) {
        rc = run_generate(&a, &m, &tp, &st);
        blip2_model_free(&m);
    } else {
        memset(&m, 0, sizeof m);
    }
    if (rc && tp.rank == 0) blip2_cli_error("%s", st.msg); /* before finalize: peers may exit first */
    fflush(stderr);
    blip2_comm_world_finalize();
    return rc ? 1 : 0;
}
