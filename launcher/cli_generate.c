/* `blip2 generate`: one image + one prompt → an answer through the engine (greedy, sampling or
 * beams), optionally streamed, as JSON, and with a tensor dump of the prefill. */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <jansson.h>

#include "../parallel/comm.h"
#include "../runtime/device.h"
#include "../runtime/engine.h"
#include "../runtime/forward.h"
#include "../runtime/safetensors.h"
#include "cli.h"

typedef struct {
    const char *model, *pixel_values, *input_ids, *dump, *image, *prompt;
    int json, stream;
    const char *device, *dtype;
    blip2_decoding dec;
    const char *stop[16];
    int n_stop;
} gen_args;

static void generate_usage(FILE *fp) {
    fprintf(fp,
            "usage: blip2 generate --model DIR (--image FILE [--prompt TEXT]\n"
            "                                  | --pixel-values FILE.safetensors:KEY --input-ids ID,ID,...)\n"
            "                      [--max-new-tokens N] [--json] [--stream] [--dump DIR] [decoding options]\n"
            "                      [--device cpu|cuda] [--dtype f32|f16|bf16]\n"
            "  --input-ids        the ids the model consumes, image tokens included\n"
            "  --max-new-tokens   default: the model's generation default (20)\n"
            "  --json             print {\"input_ids\", \"output_ids\", \"finish_reason\", \"text\"} on stdout\n"
            "  --stream           print the answer as it is generated\n"
            "  --device           where the model runs (default cpu); --dtype: its matrices on the device\n"
            "                     (default f32 on the CPU, f16 on CUDA)\n"
            "  --dump DIR         write DIR/tensors.safetensors (vision_out, qformer_out, projected,\n"
            "                     prefill_logits, pixel_values)\n"
            "decoding (transformers' generate() semantics; default greedy):\n"
            "  --do-sample --temperature T --top-k K --top-p P --seed S\n"
            "  --num-beams N --num-return-sequences N --length-penalty L --early-stopping\n"
            "  --repetition-penalty R --min-new-tokens N --stop TEXT (repeatable)\n");
}

static int parse_float(const char *s, double lo, double hi, float *out) {
    char *end;
    double v = strtod(s, &end);
    if (end == s || *end || !(v >= lo && v <= hi)) return 1;
    *out = (float)v;
    return 0;
}

enum { O_MODEL = 256, O_PV, O_IDS, O_MAXNEW, O_JSON, O_DUMP, O_IMAGE, O_PROMPT, O_STREAM, O_SAMPLE, O_TEMP, O_TOPK,
       O_TOPP, O_SEED, O_BEAMS, O_NRET, O_LP, O_EARLY, O_REP, O_MINNEW, O_STOP, O_HELP, O_DEVICE, O_DTYPE };

/* One decoding flag into a->dec; nonzero (after printing why) when its value is bad. */
static int parse_decoding_flag(int c, const char *name, const char *v, gen_args *a) {
    blip2_decoding *d = &a->dec;
    int bad = 0, i = 0;
    switch (c) {
    case O_MAXNEW: bad = blip2_cli_parse_int(v, 1, 1 << 20, &d->max_new_tokens); break;
    case O_SAMPLE: d->do_sample = 1; break;
    case O_TEMP: bad = parse_float(v, 1e-6, 100, &d->temperature); break;
    case O_TOPK: bad = blip2_cli_parse_int(v, 0, 1000000, &d->top_k); break;
    case O_TOPP: bad = parse_float(v, 1e-6, 1, &d->top_p); break;
    case O_SEED: bad = blip2_cli_parse_int(v, 0, 2147483647, &i), d->seed = (uint64_t)i, d->has_seed = 1; break;
    case O_BEAMS: bad = blip2_cli_parse_int(v, 1, 16, &d->num_beams); break;
    case O_NRET: bad = blip2_cli_parse_int(v, 1, 16, &d->num_return_sequences); break;
    case O_LP: bad = parse_float(v, -100, 100, &d->length_penalty); break;
    case O_EARLY: d->early_stopping = 1; break;
    case O_REP: bad = parse_float(v, 1e-6, 100, &d->repetition_penalty); break;
    case O_MINNEW: bad = blip2_cli_parse_int(v, 0, 1 << 20, &d->min_new_tokens); break;
    case O_STOP:
        if (a->n_stop == 16) return blip2_cli_error("at most 16 --stop strings");
        a->stop[a->n_stop++] = v;
        break;
    }
    return bad ? blip2_cli_error("--%s: bad value '%s' (see blip2 generate --help for the ranges)", name, v) : 0;
}

static int parse_gen_args(int argc, char **argv, gen_args *a) {
    static const struct option opts[] = {
        {"model", required_argument, 0, O_MODEL},          {"pixel-values", required_argument, 0, O_PV},
        {"input-ids", required_argument, 0, O_IDS},        {"max-new-tokens", required_argument, 0, O_MAXNEW},
        {"json", no_argument, 0, O_JSON},                  {"dump", required_argument, 0, O_DUMP},
        {"image", required_argument, 0, O_IMAGE},          {"prompt", required_argument, 0, O_PROMPT},
        {"stream", no_argument, 0, O_STREAM},              {"do-sample", no_argument, 0, O_SAMPLE},
        {"temperature", required_argument, 0, O_TEMP},     {"top-k", required_argument, 0, O_TOPK},
        {"top-p", required_argument, 0, O_TOPP},           {"seed", required_argument, 0, O_SEED},
        {"num-beams", required_argument, 0, O_BEAMS},      {"num-return-sequences", required_argument, 0, O_NRET},
        {"length-penalty", required_argument, 0, O_LP},    {"early-stopping", no_argument, 0, O_EARLY},
        {"repetition-penalty", required_argument, 0, O_REP}, {"min-new-tokens", required_argument, 0, O_MINNEW},
        {"stop", required_argument, 0, O_STOP},            {"help", no_argument, 0, O_HELP},
        {"device", required_argument, 0, O_DEVICE},        {"dtype", required_argument, 0, O_DTYPE},
        {0, 0, 0, 0},
    };
    memset(a, 0, sizeof *a);
    a->dec = blip2_decoding_default();
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case O_MODEL: a->model = optarg; break;
        case O_DEVICE: a->device = optarg; break;
        case O_DTYPE: a->dtype = optarg; break;
        case O_PV: a->pixel_values = optarg; break;
        case O_IDS: a->input_ids = optarg; break;
        case O_JSON: a->json = 1; break;
        case O_STREAM: a->stream = 1; break;
        case O_DUMP: a->dump = optarg; break;
        case O_IMAGE: a->image = optarg; break;
        case O_PROMPT: a->prompt = optarg; break;
        case O_HELP: generate_usage(stdout); exit(0);
        case '?': generate_usage(stderr); return 2;
        default: {
            const char *name = "?";
            for (const struct option *o = opts; o->name; o++)
                if (o->val == c) name = o->name;
            if (parse_decoding_flag(c, name, optarg, a)) return 1;
        }
        }
    }
    if (optind < argc) return blip2_cli_error("unexpected argument '%s'", argv[optind]);
    if (!a->model) return blip2_cli_error("--model DIR is required");
    if (!a->device) a->device = "cpu";
    if (strcmp(a->device, "cpu") && strcmp(a->device, "cuda")) return blip2_cli_error("--device '%s': cpu or cuda", a->device);
    if (!a->dtype) a->dtype = strcmp(a->device, "cuda") == 0 ? "f16" : "f32";
    if (blip2_wdtype_parse(a->dtype) < 0) return blip2_cli_error("--dtype '%s': f32, f16 or bf16", a->dtype);
    int tensor_form = a->pixel_values || a->input_ids;
    if (tensor_form && a->image) return blip2_cli_error("use either --pixel-values/--input-ids or --image/--prompt, not both");
    if (!a->image && !(a->pixel_values && a->input_ids))
        return blip2_cli_error("give --image FILE [--prompt TEXT], or both --pixel-values FILE:KEY and --input-ids");
    blip2_status st;
    if (blip2_decoding_validate(&a->dec, 1 << 20, &st)) return blip2_cli_error("%s", st.msg);
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

static void print_json_string(const char *s, size_t n) {
    json_t *js = json_stringn(s ? s : "", s ? n : 0);
    char *out = js ? json_dumps(js, JSON_ENCODE_ANY) : NULL;
    printf("%s", out ? out : "\"\"");
    free(out);
    json_decref(js);
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
static blip2_code prepare_inputs(const gen_args *a, const blip2_model *m, const blip2_inputs *in, const blip2_tp *tp,
                                 float **pixels, int32_t **ids, int *n, blip2_status *st) {
    blip2_code rc = BLIP2_OK;
    if (tp->rank == 0 && a->image) {
        rc = blip2_cli_image_inputs(in, a->image, a->prompt, pixels, ids, n, st);
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

typedef struct {
    const gen_args *a;
    const int32_t *ids;
    int n;
    blip2_code code;
    char msg[1024];
    int printed;
} gen_out;

static void on_token(void *ctx, int32_t id, const char *piece, size_t len) {
    (void)id;
    gen_out *o = ctx;
    if (!o->a->stream) return;
    fwrite(piece, 1, len, stdout);
    fflush(stdout);
}

static void print_json(const gen_out *o, const blip2_result *res) {
    const blip2_sequence_out *s = &res->seqs[0];
    printf("{\"input_ids\": ");
    print_ids(stdout, o->ids, o->n);
    printf(", \"output_ids\": ");
    print_ids(stdout, s->ids, s->n_ids);
    printf(", \"finish_reason\": \"%s\", \"text\": ", blip2_finish_name(s->finish));
    print_json_string(s->text, s->text_len);
    if (res->n_seqs > 1) {
        printf(", \"sequences\": [");
        for (int i = 0; i < res->n_seqs; i++) {
            printf("%s{\"output_ids\": ", i ? ", " : "");
            print_ids(stdout, res->seqs[i].ids, res->seqs[i].n_ids);
            printf(", \"score\": %.6g, \"text\": ", res->seqs[i].score);
            print_json_string(res->seqs[i].text, res->seqs[i].text_len);
            printf("}");
        }
        printf("]");
    }
    printf("}\n");
}

static void on_done(void *ctx, const blip2_result *res) {
    gen_out *o = ctx;
    o->code = res->code;
    if (res->code) {
        snprintf(o->msg, sizeof o->msg, "%s", res->message ? res->message : blip2_code_name(res->code));
        return;
    }
    if (o->a->json) {
        print_json(o, res);
    } else if (o->a->stream) {
        printf("\n");
    } else {
        for (int i = 0; i < res->n_seqs; i++) printf("%s\n", res->seqs[i].text ? res->seqs[i].text : "");
    }
    fflush(stdout);
}

/* A KV budget for this one request (blocks of 16 positions, beams included), on every rank alike. */
static blip2_engine_opts cli_engine_opts(const blip2_model *m, const gen_args *a, int n) {
    blip2_engine_opts o = blip2_engine_opts_default();
    int max_new = a->dec.max_new_tokens ? a->dec.max_new_tokens : m->cfg.max_new_tokens, beams = a->dec.num_beams;
    int blocks = beams * (blip2_kv_blocks_for(n + max_new, o.block_size) + 1);
    o.kv_bytes = (size_t)blocks * blip2_kv_block_bytes(m, o.block_size);
    o.max_batch = beams;
    o.max_step_tokens = n > 512 ? n : 512;
    o.max_new_tokens_limit = 1 << 20;
    o.image_cache_bytes = 0;
    o.max_images_per_step = 1;
    return o;
}

/* Rank 0 runs the engine with this one job; the other ranks follow its steps. */
static blip2_code run_engine(const gen_args *a, const blip2_model *m, const blip2_inputs *in, const blip2_tp *tp,
                             const float *pixels, const int32_t *ids, int n, blip2_status *st) {
    blip2_engine_opts o = cli_engine_opts(m, a, n);
    if (tp->rank != 0) return blip2_engine_follow(m, tp, &o, st);
    blip2_engine *e;
    blip2_code rc = blip2_engine_create(m, tp, in, &o, &e, st);
    if (rc) { /* the followers wait for a first step: tell them to stop */
        blip2_engine_follow_stop(tp);
        return rc;
    }
    gen_out out = {.a = a, .ids = ids, .n = n};
    blip2_job job = {.pixels = pixels, .input_ids = ids, .n_input_ids = n, .dec = a->dec, .stop = a->stop, .n_stop = a->n_stop};
    blip2_job_callbacks cb = {&out, on_token, on_done, NULL};
    rc = blip2_engine_submit(e, &job, &cb, st);
    blip2_engine_stop(e, 1 << 30); /* drain: the engine ends once the job is done */
    blip2_code rc2 = blip2_engine_run(e, st);
    blip2_engine_destroy(e);
    if (!rc && !rc2 && out.code) rc = blip2_fail(st, out.code, "%s", out.msg);
    return rc ? rc : rc2;
}

static blip2_code run_generate(const gen_args *a, blip2_model *m, const blip2_inputs *in, const blip2_tp *tp,
                               blip2_status *st) {
    const blip2_config *c = &m->cfg;
    float *pixels = NULL;
    int32_t *ids = NULL;
    int n = 0;
    blip2_trace tr = {0};
    blip2_code rc = prepare_inputs(a, m, in, tp, &pixels, &ids, &n, st);
    if (!rc && a->dump) {
        rc = blip2_tp_agree(tp, alloc_trace(c, &tr, st), st);
        if (!rc) rc = blip2_trace_prefill(m, tp, pixels, ids, n, &tr, st);
        if (!rc && tp->rank == 0) rc = write_dump(a->dump, c, &tr, pixels, st);
        rc = blip2_tp_agree(tp, rc, st);
    }
    if (!rc) rc = run_engine(a, m, in, tp, pixels, ids, n, st);
    free_trace(&tr);
    free(pixels);
    free(ids);
    return rc;
}

static blip2_code load_on_every_rank(const gen_args *a, const blip2_tp *tp, const blip2_device *dev, blip2_model *m,
                                     blip2_status *st) {
    blip2_code rc = blip2_model_load_shard(a->model, tp->rank, tp->world, m, st);
    if (!rc) rc = blip2_model_to_backend(m, dev->ops, blip2_wdtype_parse(a->dtype), dev->ops->device, st);
    rc = blip2_tp_agree(tp, rc, st);
    if (!rc && tp->world > 1)
        fprintf(stderr, "blip2: rank %d/%d: OPT shard %.1f MiB (heads %d, ffn %d, vocab [%d, %d)), resident %.1f MiB\n",
                tp->rank, tp->world, m->opt_bytes / 1048576.0, m->shard.NH, m->shard.ffn, m->shard.v0,
                m->shard.v0 + m->shard.V, blip2_rss_mib());
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
    blip2_model m = {0};
    blip2_inputs in = {0};
    blip2_device dev = {0};
    blip2_comm *nccl = NULL;
    blip2_code rc = blip2_tp_agree(&tp, blip2_device_open_tp(a.device, &tp, &dev, &nccl, &st), &st);
    if (!rc) rc = load_on_every_rank(&a, &tp, &dev, &m, &st);
    if (!rc && tp.rank == 0) rc = blip2_cli_load_inputs(a.model, &m.cfg, a.image != NULL, &in, &st);
    rc = blip2_tp_agree(&tp, rc, &st);
    if (!rc) rc = run_generate(&a, &m, &in, &tp, &st);
    blip2_inputs_free(&in);
    if (m.ops) blip2_model_free(&m);
    blip2_device_close_tp(&dev, nccl, &tp);
    if (rc && tp.rank == 0) blip2_cli_error("%s", st.msg); /* before finalize: peers may exit first */
    fflush(stderr);
    blip2_comm_world_finalize();
    return rc ? 1 : 0;
}
