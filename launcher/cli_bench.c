/* `blip2 bench`: the engine without gRPC — vision images/s, prefill tokens/s and decode tokens/s
 * by batch size, on a checkpoint or on random weights of a config's shapes (--random-weights).
 * Under mpirun the OPT numbers are tensor-parallel; the image side runs on rank 0. */
#include <getopt.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../parallel/comm.h"
#include "../runtime/device.h"
#include "../runtime/engine.h"
#include "cli.h"

typedef struct {
    const char *model, *config, *device, *dtype;
    int random, json, prompt_len, steps, engine, beams;
    int batches[16], n_batches, images[16], n_images;
    int image_batch; /* --engine: the engine's vision batch (0: min(B, 64)) */
    int hold_ms;     /* --engine: blip2_engine_opts.hold_for_images_ms */
    int hold_share;  /* --engine: blip2_engine_opts.hold_share_pct */
    int step_tokens; /* --engine: blip2_engine_opts.max_step_tokens (0: the default, at least B·beams) */
    int seed;
} bench_args;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int parse_list(const char *s, int *out, int cap) {
    int n = 0;
    for (const char *p = s; *p && n < cap;) {
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p || v < 1 || v > 1024 || (*end && *end != ',')) return -1;
        out[n++] = (int)v;
        p = *end ? end + 1 : end;
    }
    return n;
}

static int parse_bench_args(int argc, char **argv, bench_args *a) {
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'},  {"config", required_argument, 0, 'c'}, {"random-weights", no_argument, 0, 'r'},
        {"batch", required_argument, 0, 'b'},  {"images", required_argument, 0, 'i'}, {"prompt-len", required_argument, 0, 'p'},
        {"steps", required_argument, 0, 's'},  {"json", no_argument, 0, 'j'},         {"device", required_argument, 0, 'd'},
        {"seed", required_argument, 0, 'S'},   {"help", no_argument, 0, 'h'},         {"dtype", required_argument, 0, 't'},
        {"engine", no_argument, 0, 'e'},       {"num-beams", required_argument, 0, 'B'},
        {"image-batch", required_argument, 0, 'I'}, {"hold-for-images", required_argument, 0, 'H'},
        {"hold-share", required_argument, 0, 'P'}, {"max-step-tokens", required_argument, 0, 'T'}, {0, 0, 0, 0},
    };
    memset(a, 0, sizeof *a);
    a->prompt_len = 45, a->steps = 8, a->device = "cpu", a->seed = 1, a->dtype = NULL, a->beams = 1;
    a->hold_share = blip2_engine_opts_default().hold_share_pct;
    a->n_batches = parse_list("1,4,16,64", a->batches, 16);
    a->n_images = parse_list("1,8", a->images, 16);
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'm': a->model = optarg; break;
        case 'c': a->config = optarg; break;
        case 'r': a->random = 1; break;
        case 'b': if ((a->n_batches = parse_list(optarg, a->batches, 16)) < 1) return blip2_cli_error("--batch: '%s' is not a list like 1,4,16", optarg); break;
        case 'i': /* "none": text only (profiling a decode step) */
            a->n_images = strcmp(optarg, "none") ? parse_list(optarg, a->images, 16) : 0;
            if (a->n_images < 0 || (a->n_images == 0 && strcmp(optarg, "none")))
                return blip2_cli_error("--images: '%s' is not a list like 1,8 (or none)", optarg);
            break;
        case 'p': if (blip2_cli_parse_int(optarg, 2, 2048, &a->prompt_len)) return blip2_cli_error("--prompt-len: 2..2048"); break;
        case 's': if (blip2_cli_parse_int(optarg, 1, 4096, &a->steps)) return blip2_cli_error("--steps: 1..4096"); break;
        case 'j': a->json = 1; break;
        case 'e': a->engine = 1; break;
        case 'B': if (blip2_cli_parse_int(optarg, 1, 16, &a->beams)) return blip2_cli_error("--num-beams: 1..16"); break;
        case 'I': if (blip2_cli_parse_int(optarg, 1, 256, &a->image_batch)) return blip2_cli_error("--image-batch: 1..256"); break;
        case 'H': if (blip2_cli_parse_int(optarg, 0, 60000, &a->hold_ms)) return blip2_cli_error("--hold-for-images: 0..60000 ms"); break;
        case 'P': if (blip2_cli_parse_int(optarg, 0, 100, &a->hold_share)) return blip2_cli_error("--hold-share: 0..100 %%"); break;
        case 'T': if (blip2_cli_parse_int(optarg, 1, 1 << 16, &a->step_tokens)) return blip2_cli_error("--max-step-tokens: 1..65536"); break;
        case 'd': a->device = optarg; break;
        case 't': a->dtype = optarg; break;
        case 'S': if (blip2_cli_parse_int(optarg, 0, 1 << 30, &a->seed)) return blip2_cli_error("--seed: a non-negative integer"); break;
        case 'h':
            printf("usage: blip2 bench (--model DIR | --config CONFIG.json --random-weights) [--batch 1,4,16,64]\n"
                   "                   [--images 1,8|none] [--prompt-len 45] [--steps 8] [--device cpu|cuda] [--dtype f32|f16|bf16]\n"
                   "                   [--engine [--num-beams N] [--image-batch N] [--hold-for-images MS [--hold-share PCT]]\n"
                   "                   [--max-step-tokens N]] [--json]\n"
                   "  --engine: also B whole VQA requests per batch size through the serving engine (image, prompt,\n"
                   "            exactly --steps greedy tokens): requests/s, tokens/s and the decode ms per token a\n"
                   "            request sees, scheduling and sampling included, timed on a second wave of B after\n"
                   "            a first that warms the engine (the first's wall time is printed too);\n"
                   "            --num-beams: beam search instead\n"
                   "            (B requests of N beams: B·N sequences a step); --image-batch: the engine's vision\n"
                   "            batch (default min(B, 64); B encodes every image at once, as HF's generate);\n"
                   "            --hold-for-images: steps wait (at most MS at a time) while more requests wait for\n"
                   "            their images than PCT %% (default 100) of the sequences ready (blip2d\n"
                   "            --hold-for-images, --hold-share; 0: a burst is encoded whole before it decodes);\n"
                   "            --max-step-tokens: the engine's token budget a step (default 512, at least the\n"
                   "            sequences: prefills beyond it are chunked; blip2d --max-step-tokens)\n");
            exit(0);
        default: return 2;
        }
    }
    if (strcmp(a->device, "cpu") != 0 && strcmp(a->device, "cuda") != 0) return blip2_cli_error("--device: cpu or cuda");
    if (!a->dtype) a->dtype = strcmp(a->device, "cuda") == 0 ? "f16" : "f32";
    if (blip2_wdtype_parse(a->dtype) < 0) return blip2_cli_error("--dtype: f32, f16 or bf16");
    if (!!a->model == !!(a->config && a->random))
        return blip2_cli_error("give --model DIR, or --config CONFIG.json with --random-weights");
    return 0;
}

/* A checkpoint moved to the device, or random weights made there. */
static blip2_code load_model(const bench_args *a, const blip2_tp *tp, const blip2_device *dev, blip2_model *m,
                             blip2_status *st) {
    int wdtype = blip2_wdtype_parse(a->dtype);
    if (a->model) {
        blip2_code rc = blip2_model_load_shard(a->model, tp->rank, tp->world, m, st);
        return rc ? rc : blip2_model_to_backend(m, dev->ops, wdtype, dev->ops->device, st);
    }
    uint8_t *text = NULL;
    size_t len = 0;
    blip2_config cfg;
    blip2_code rc = blip2_read_file(a->config, 1 << 20, &text, &len, st);
    if (!rc) rc = blip2_config_parse((const char *)text, len, a->config, &cfg, st);
    free(text);
    return rc ? rc : blip2_model_init_random_on(&cfg, tp->rank, tp->world, (uint64_t)a->seed, dev->ops, wdtype, m, st);
}

/* Vision + Q-Former + projection of B random images (rank 0 only), with the engine's kind of
 * workspace: allocated once, outside the timing. */
static double bench_images(const blip2_model *m, int B, blip2_status *st) {
    const blip2_config *c = &m->cfg;
    size_t px = blip2_image_floats(&c->vision);
    float *pix = malloc(sizeof(float) * B * px), *pr = malloc(sizeof(float) * B * c->Q * c->opt.C);
    blip2_encoder_ws enc;
    double t = -1;
    if (pix && pr && !blip2_encoder_ws_init(&enc, m, B, st)) {
        blip2_rng rng;
        blip2_rng_seed(&rng, 7);
        for (size_t i = 0; i < B * px; i++) pix[i] = (float)(blip2_rng_uniform(&rng) * 4.0 - 2.0);
        for (int rep = 0; rep < 3; rep++) { /* the first runs eagerly (algorithm choice), the second records its graph */
            double t0 = now_s();
            if (!blip2_encode_images(m, &enc, pix, B, NULL, NULL, pr, st)) t = now_s() - t0;
        }
        blip2_encoder_ws_free(&enc);
    }
    free(pix), free(pr);
    return t;
}

/* The decode steps before the timed ones: a batch size's first step runs eagerly (cuBLASLt's
 * algorithm choices for its shapes), its second is recorded as a graph (graphs.h). Both are
 * one-time costs of a batch size, not of a step: run 6 timed them into the average, which put 8
 * steps at batch 64 ~2 ms above 32 steps. */
#define BENCH_WARM_STEPS 2

/* B sequences: one prefill step of prompt_len positions each, then BENCH_WARM_STEPS untimed and
 * `steps` timed decode steps (greedy: argmax on the device, one all-gather of the picks). Timed to
 * the picked ids on the host. */
static blip2_code bench_opt(const blip2_model *m, const blip2_tp *tp, int B, int L, int steps, double *prefill_s,
                            double *decode_s, blip2_status *st) {
    const int total = steps + BENCH_WARM_STEPS;
    int bs = 16, per = blip2_kv_blocks_for(L + total, bs);
    blip2_kv_pool kv;
    blip2_opt_ws ws;
    blip2_code rc = blip2_kv_pool_init(&kv, m, B * per, bs, st);
    if (!rc) rc = blip2_opt_ws_init(&ws, m, B * L, B, L + total, st);
    if (rc) return rc;
    int32_t *tab = malloc(sizeof(int32_t) * B * per), *ids = malloc(sizeof(int32_t) * B * L);
    blip2_seq_step *seq = malloc(sizeof *seq * B);
    blip2_kv_pool_alloc(&kv, B * per, tab);
    for (int i = 0; i < B * L; i++) ids[i] = 100 + i % 1000;
    for (int b = 0; b < B; b++) seq[b] = (blip2_seq_step){tab + b * per, 0, L};
    double t0 = now_s();
    rc = blip2_opt_forward_batch(m, tp, &kv, seq, B, ids, NULL, &ws, st);
    if (!rc) rc = blip2_tp_argmax(m, tp, &ws, B, ids, st);
    *prefill_s = now_s() - t0;
    for (int s = 0; !rc && s < total; s++) {
        if (s == BENCH_WARM_STEPS) t0 = now_s(); /* the argmax before waited for the device */
        for (int b = 0; b < B; b++) seq[b] = (blip2_seq_step){tab + b * per, L + s, 1};
        rc = blip2_opt_forward_batch(m, tp, &kv, seq, B, ids, NULL, &ws, st);
        if (!rc) rc = blip2_tp_argmax(m, tp, &ws, B, ids, st);
    }
    *decode_s = now_s() - t0;
    free(tab), free(ids), free(seq);
    blip2_kv_pool_free(&kv);
    blip2_opt_ws_free(&ws);
    return rc;
}

/* What one request needs, allocated once (as a running server holds it): the encoder workspace
 * (rank 0), a KV pool for the request and the OPT workspace. */
typedef struct {
    blip2_encoder_ws enc;
    blip2_kv_pool kv;
    blip2_opt_ws ws;
    float *pix, *rows;
    int32_t *tab, *ids;
    int L, new_tokens;
} req_bench;

static void req_bench_free(req_bench *r) {
    blip2_encoder_ws_free(&r->enc);
    blip2_kv_pool_free(&r->kv);
    blip2_opt_ws_free(&r->ws);
    free(r->pix), free(r->rows), free(r->tab), free(r->ids);
}

static blip2_code req_bench_init(req_bench *r, const blip2_model *m, const blip2_tp *tp, int L, int new_tokens,
                                 blip2_status *st) {
    const blip2_config *c = &m->cfg;
    memset(r, 0, sizeof *r);
    r->L = L, r->new_tokens = new_tokens;
    int bs = 16, per = blip2_kv_blocks_for(L + new_tokens, bs);
    size_t px = blip2_image_floats(&c->vision);
    r->pix = malloc(sizeof(float) * px), r->rows = malloc(sizeof(float) * c->Q * c->opt.C);
    r->tab = malloc(sizeof(int32_t) * per), r->ids = malloc(sizeof(int32_t) * L);
    blip2_code rc = r->pix && r->rows && r->tab && r->ids ? BLIP2_OK : blip2_fail(st, BLIP2_ENOMEM, "out of memory");
    if (!rc && tp->rank == 0) rc = blip2_encoder_ws_init(&r->enc, m, 1, st);
    if (!rc) rc = blip2_kv_pool_init(&r->kv, m, per, bs, st);
    if (!rc) rc = blip2_opt_ws_init(&r->ws, m, L, 1, L + new_tokens, st);
    if (rc) return rc;
    blip2_kv_pool_alloc(&r->kv, per, r->tab);
    for (size_t i = 0; i < px; i++) r->pix[i] = (float)((i * 7919) % 1000) / 250.0f - 2.0f;
    return BLIP2_OK;
}

/* One VQA request end to end, as the engine runs it for a lone request: encode the image (rank 0),
 * prefill the prompt with the image rows, then `new_tokens` greedy steps; ms to the last id. */
static blip2_code bench_request(const blip2_model *m, const blip2_tp *tp, req_bench *r, double *ms, blip2_status *st) {
    const blip2_config *c = &m->cfg;
    int L = r->L;
    for (int i = 0; i < L; i++) r->ids[i] = i < c->Q ? -1 : i == c->Q ? 2 : 100 + i; /* image rows, BOS, text */
    double t0 = now_s();
    blip2_code rc = tp->rank == 0 ? blip2_encode_images(m, &r->enc, r->pix, 1, NULL, NULL, r->rows, st) : BLIP2_OK;
    rc = blip2_tp_agree(tp, rc, st);
    blip2_seq_step seq = {r->tab, 0, L};
    if (!rc) rc = blip2_opt_forward_batch(m, tp, &r->kv, &seq, 1, r->ids, r->rows, &r->ws, st);
    if (!rc) rc = blip2_tp_argmax(m, tp, &r->ws, 1, r->ids, st);
    for (int s = 1; !rc && s < r->new_tokens; s++) {
        seq = (blip2_seq_step){r->tab, L + s - 1, 1};
        rc = blip2_opt_forward_batch(m, tp, &r->kv, &seq, 1, r->ids, NULL, &r->ws, st);
        if (!rc) rc = blip2_tp_argmax(m, tp, &r->ws, 1, r->ids, st);
    }
    *ms = (now_s() - t0) * 1e3;
    return rc;
}

/* ---- whole requests through the engine (--engine) ---- */

typedef struct {
    double decode_ms_sum, queue_ms_sum, image_ms_sum, prefill_ms_sum;
    double host_gap_ms; /* mean host time between back-to-back steps (blip2_engine_stats) */
    int steps, steps_encoding; /* decode/prefill steps run; of those, while the encoder was busy */
    int steps_prefill;         /* of those, steps with a prefill chunk */
    double decode_step_ms, prefill_step_ms; /* mean launch-to-results time of each kind */
    int done, failed, tokens;
    char msg[256];
} engine_tally;

static void tally_done(void *ctx, const blip2_result *res) {
    engine_tally *t = ctx;
    if (res->code != BLIP2_OK) {
        if (!t->failed++) snprintf(t->msg, sizeof t->msg, "%s", res->message ? res->message : "failed");
        return;
    }
    t->done++;
    t->tokens += res->n_seqs ? res->seqs[0].n_ids : 0;
    t->decode_ms_sum += res->timings.decode_ms;
    t->queue_ms_sum += res->timings.queue_ms;
    t->image_ms_sum += res->timings.image_ms;
    t->prefill_ms_sum += res->timings.prefill_ms;
}

/* B requests of `beams` sequences each (a beam's partly filled last block is its own). */
static blip2_engine_opts engine_opts_for(const blip2_model *m, const bench_args *a, int B) {
    const int beams = a->beams, L = a->prompt_len, steps = a->steps, step_tokens = a->step_tokens;
    blip2_engine_opts o = blip2_engine_opts_default();
    int per = blip2_kv_blocks_for(L + steps, o.block_size), seqs = B * beams;
    o.max_batch = seqs > 8 ? seqs : 8;
    o.max_queue = B;
    if (step_tokens) o.max_step_tokens = step_tokens;
    o.max_step_tokens = o.max_step_tokens > o.max_batch ? o.max_step_tokens : o.max_batch;
    o.kv_bytes = blip2_kv_block_bytes(m, o.block_size) * (size_t)(seqs * (per + 1) + 8);
    o.max_images_per_step = a->image_batch ? a->image_batch : B < 64 ? B : 64;
    o.image_cache_bytes = 0; /* every image is new, as in HF's generate */
    o.max_new_tokens_limit = steps;
    o.hold_for_images_ms = a->hold_ms;
    o.hold_share_pct = a->hold_share;
    return o;
}

/* Two waves of B requests through one engine: the first warms it (cuBLASLt's algorithm choices,
 * the decode graphs of every batch size it passes through, the image encoder's graph), the second
 * is timed, from its first submission to the drain, as a server that has been up for a while
 * serves it (HF's baseline likewise reports runs after a warm-up). The waves do not overlap: the
 * second is submitted, by this thread, once every request of the first is done. */
typedef struct {
    blip2_engine *e;
    const blip2_config *c;
    blip2_decoding dec;
    const int32_t *ids;
    float *pix;
    int B, L;
    engine_tally warm, timed;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int warm_seen;           /* first-wave requests finished (done or failed) */
    double t0, cold_s;       /* the second wave's start; the first wave's wall time */
    blip2_engine_stats at_t0; /* the engine's counters when the second wave started */
    blip2_code rc;
    blip2_status st;
} engine_waves;

static void wave_warm_done(void *ctx, const blip2_result *res) {
    engine_waves *w = ctx;
    tally_done(&w->warm, res);
    pthread_mutex_lock(&w->mu);
    w->warm_seen++;
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
}
static void wave_timed_done(void *ctx, const blip2_result *res) { tally_done(&((engine_waves *)ctx)->timed, res); }

/* Pseudo-random pixels for every request of a wave (different in the two waves), made before
 * the wave is submitted: made between submissions (~0.3 ms a request), they held back the last
 * of 256 requests by tens of ms and handed the encoder its first images a few at a time. */
static void make_wave_pixels(engine_waves *w, int wave) {
    size_t px = blip2_image_floats(&w->c->vision);
    for (int b = 0; b < w->B; b++) {
        size_t k = (size_t)wave * w->B + b;
        float *p = w->pix + (size_t)b * px;
        for (size_t i = 0; i < px; i++) p[i] = (float)(((i + 7919u * k) * 2654435761u) % 1000) / 250.0f - 2.0f;
    }
}

/* The wave's B requests: their pixels (make_wave_pixels), the same prompt. */
static blip2_code submit_wave(engine_waves *w, blip2_job_callbacks *cb) {
    size_t px = blip2_image_floats(&w->c->vision);
    for (int b = 0; b < w->B; b++) {
        blip2_job job = {.pixels = w->pix + (size_t)b * px, .input_ids = w->ids, .n_input_ids = w->L, .dec = w->dec};
        blip2_code rc = blip2_engine_submit(w->e, &job, cb, &w->st);
        if (rc) return rc;
    }
    return BLIP2_OK;
}

/* The submitting thread: wave 1, wait for it, wave 2 (timed), then ask the engine to drain. */
static void *waves_main(void *arg) {
    engine_waves *w = arg;
    blip2_job_callbacks warm = {.ctx = w, .on_done = wave_warm_done}, timed = {.ctx = w, .on_done = wave_timed_done};
    make_wave_pixels(w, 0);
    double t = now_s();
    w->rc = submit_wave(w, &warm);
    pthread_mutex_lock(&w->mu);
    while (!w->rc && w->warm_seen < w->B) pthread_cond_wait(&w->cv, &w->mu);
    pthread_mutex_unlock(&w->mu);
    w->cold_s = now_s() - t;
    make_wave_pixels(w, 1);
    blip2_engine_get_stats(w->e, &w->at_t0);
    w->t0 = now_s();
    if (!w->rc && !w->warm.failed) w->rc = submit_wave(w, &timed);
    blip2_engine_stop(w->e, 1 << 30); /* drain: the run ends when every request is done */
    return NULL;
}

/* B requests (random pixels, prompt of L ids: Q image tokens, BOS, text), each exactly `steps`
 * greedy tokens, or a beam search of `beams` (eos never ends them: the model is ours, its eos id
 * is set out of reach), after a first wave of B on the same engine (engine_waves). Rank 0 runs
 * the engine, the others follow it. */
static blip2_code bench_engine_batch(const bench_args *a, blip2_model *m, const blip2_tp *tp, int B, double *wall_s,
                                     double *cold_s, engine_tally *t, blip2_status *st) {
    const blip2_config *c = &m->cfg;
    int beams = a->beams, L = a->prompt_len, steps = a->steps;
    blip2_engine_opts o = engine_opts_for(m, a, B);
    m->cfg.eos_id = -1;
    memset(t, 0, sizeof *t);
    if (tp->rank != 0) return blip2_engine_follow(m, tp, &o, st);
    engine_waves w = {.c = c, .B = B, .L = L, .dec = blip2_decoding_default()};
    w.dec.max_new_tokens = steps;
    w.dec.num_beams = beams;
    w.pix = malloc(sizeof(float) * blip2_image_floats(&c->vision) * (size_t)B);
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)L);
    w.ids = ids;
    blip2_inputs in = {.cfg = c};
    blip2_code rc = w.pix && ids ? BLIP2_OK : blip2_fail(st, BLIP2_ENOMEM, "out of memory");
    if (!rc) rc = blip2_engine_create(m, tp, &in, &o, &w.e, st);
    if (rc) {
        blip2_engine_follow_stop(tp);
        free(w.pix), free(ids);
        return rc;
    }
    for (int i = 0; i < L; i++) ids[i] = i < c->Q ? c->image_token_id : i == c->Q ? 2 : 100 + (i * 37) % 20000;
    pthread_mutex_init(&w.mu, NULL);
    pthread_cond_init(&w.cv, NULL);
    pthread_t th;
    if (pthread_create(&th, NULL, waves_main, &w)) {
        rc = blip2_fail(st, BLIP2_EINTERNAL, "cannot start the submitting thread");
        blip2_engine_stop(w.e, 0);
    }
    blip2_code rc2 = blip2_engine_run(w.e, st); /* until waves_main's stop and the drain */
    double end = now_s();
    if (!rc) pthread_join(th, NULL);
    *wall_s = end - w.t0, *cold_s = w.cold_s, *t = w.timed;
    blip2_engine_stats es;
    blip2_engine_get_stats(w.e, &es);
    uint64_t gaps = es.host_gaps - w.at_t0.host_gaps; /* the timed wave's share of the counters */
    t->host_gap_ms = gaps ? (double)(es.host_gap_ns - w.at_t0.host_gap_ns) / (double)gaps * 1e-6 : 0;
    t->steps = (int)(es.steps - w.at_t0.steps), t->steps_encoding = (int)(es.steps_while_encoding - w.at_t0.steps_while_encoding);
    t->steps_prefill = (int)(es.steps_prefill - w.at_t0.steps_prefill);
    int n_decode = t->steps - t->steps_prefill;
    t->decode_step_ms = n_decode > 0 ? (double)(es.step_ns_decode - w.at_t0.step_ns_decode) / n_decode * 1e-6 : 0;
    t->prefill_step_ms =
        t->steps_prefill > 0 ? (double)(es.step_ns_prefill - w.at_t0.step_ns_prefill) / t->steps_prefill * 1e-6 : 0;
    blip2_engine_destroy(w.e);
    pthread_mutex_destroy(&w.mu);
    pthread_cond_destroy(&w.cv);
    free(w.pix), free(ids);
    if (!rc) rc = w.rc ? blip2_fail(st, w.rc, "submitting: %s", w.st.msg) : rc2;
    const engine_tally *bad = w.warm.failed ? &w.warm : t;
    if (!rc && bad->failed) rc = blip2_fail(st, BLIP2_EINTERNAL, "%d of %d requests failed: %s", bad->failed, B, bad->msg);
    return rc;
}

static blip2_code run_engine_bench(const bench_args *a, blip2_model *m, const blip2_tp *tp, blip2_status *st) {
    int root = tp->rank == 0, eos = m->cfg.eos_id;
    if (root && a->json) printf(", \"engine\": [");
    blip2_code rc = BLIP2_OK;
    for (int i = 0; !rc && i < a->n_batches; i++) {
        int B = a->batches[i];
        double wall = 0, cold = 0;
        engine_tally t;
        rc = blip2_tp_agree(tp, bench_engine_batch(a, m, tp, B, &wall, &cold, &t, st), st);
        if (rc || !root) continue;
        double per_token = a->steps > 1 && t.done ? t.decode_ms_sum / t.done / (a->steps - 1) : 0, n = t.done ? t.done : 1;
        if (a->json) /* where a request's time went, on average: queued (admission), image, prefill */
            printf("%s{\"batch\": %d, \"wall_ms\": %.2f, \"requests_per_s\": %.3f, \"tokens_per_s\": %.2f, "
                   "\"decode_ms_per_token\": %.3f, \"mean_queue_ms\": %.2f, \"mean_image_ms\": %.2f, "
                   "\"mean_prefill_ms\": %.2f, \"num_beams\": %d, \"host_gap_ms_per_step\": %.3f, "
                   "\"steps\": %d, \"steps_while_encoding\": %d, \"steps_prefill\": %d, \"decode_step_ms\": %.3f, "
                   "\"prefill_step_ms\": %.3f, \"cold_wall_ms\": %.2f}",
                   i ? ", " : "", B, wall * 1e3, t.done / wall, t.tokens / wall, per_token, t.queue_ms_sum / n,
                   t.image_ms_sum / n, t.prefill_ms_sum / n, a->beams, t.host_gap_ms, t.steps, t.steps_encoding,
                   t.steps_prefill, t.decode_step_ms, t.prefill_step_ms, cold * 1e3);
        else
            printf("engine batch %3d, %d beam(s): %9.1f ms for %d requests (%8.2f requests/s, %9.2f tokens/s), decode %.2f ms/token; "
                   "mean queue %.1f, image %.1f, prefill %.1f ms; host %.3f ms between steps; %d steps (%d while "
                   "encoding; %d with prefill, %.2f ms each; decode-only %.2f ms) (first wave %.1f ms)\n",
                   B, a->beams, wall * 1e3, t.done, t.done / wall, t.tokens / wall, per_token, t.queue_ms_sum / n, t.image_ms_sum / n,
                   t.prefill_ms_sum / n, t.host_gap_ms, t.steps, t.steps_encoding, t.steps_prefill, t.prefill_step_ms,
                   t.decode_step_ms, cold * 1e3);
    }
    if (root && a->json) printf("]");
    m->cfg.eos_id = eos;
    return rc;
}

static blip2_code run_bench(const bench_args *a, blip2_model *m, const blip2_tp *tp, blip2_status *st) {
    int root = tp->rank == 0;
    if (root && !a->json)
        printf("# blip2 bench: %s, %d rank(s), %s%s weights on %s, prompt %d, %d decode steps\n", a->model ? a->model : a->config,
               tp->world, a->model ? "" : "random ", blip2_wdtype_name(m->wdtype), m->ops->name, a->prompt_len, a->steps);
    if (root && a->json)
        printf("{\"ranks\": %d, \"device\": \"%s\", \"dtype\": \"%s\", \"prompt_len\": %d, \"steps\": %d, \"images\": [", tp->world,
               m->ops->name, blip2_wdtype_name(m->wdtype), a->prompt_len, a->steps);
    for (int i = 0; root && i < a->n_images; i++) {
        double t = bench_images(m, a->images[i], st);
        if (t < 0) return BLIP2_ENOMEM;
        if (a->json) printf("%s{\"batch\": %d, \"ms\": %.2f, \"images_per_s\": %.3f}", i ? ", " : "", a->images[i], t * 1e3, a->images[i] / t);
        else printf("vision+qformer  batch %3d: %9.1f ms  %8.2f images/s\n", a->images[i], t * 1e3, a->images[i] / t);
    }
    if (root && a->json) printf("], \"text\": [");
    double warm_pf, warm_dc; /* untimed: first use of every kernel and matmul shape family */
    blip2_code wrc = blip2_tp_agree(tp, bench_opt(m, tp, 1, a->prompt_len, 2, &warm_pf, &warm_dc, st), st);
    if (wrc) return wrc;
    for (int i = 0; i < a->n_batches; i++) {
        double pf = 0, dc = 0;
        int B = a->batches[i];
        blip2_code rc = bench_opt(m, tp, B, a->prompt_len, a->steps, &pf, &dc, st);
        rc = blip2_tp_agree(tp, rc, st);
        if (rc) return rc;
        double ptps = (double)B * a->prompt_len / pf, dtps = (double)B * a->steps / dc;
        if (root && a->json)
            printf("%s{\"batch\": %d, \"prefill_ms\": %.2f, \"prefill_tokens_per_s\": %.1f, \"decode_ms_per_step\": %.2f, "
                   "\"decode_tokens_per_s\": %.2f}", i ? ", " : "", B, pf * 1e3, ptps, dc / a->steps * 1e3, dtps);
        else if (root)
            printf("opt batch %3d: prefill %9.1f ms (%8.1f tokens/s)  decode %8.1f ms/step (%8.2f tokens/s)\n", B, pf * 1e3,
                   ptps, dc / a->steps * 1e3, dtps);
    }
    double req_ms[3] = {0, 0, 0};
    req_bench rb;
    blip2_code rc = blip2_tp_agree(tp, req_bench_init(&rb, m, tp, a->prompt_len, 16, st), st);
    for (int i = 0; !rc && i < 3; i++) /* the first two warm up (algorithm choice, the decode graph) */
        rc = blip2_tp_agree(tp, bench_request(m, tp, &rb, &req_ms[i], st), st);
    req_bench_free(&rb);
    if (rc) return rc;
    if (root && a->json) printf("], \"request_16_tokens_ms\": %.2f", req_ms[2]);
    else if (root) printf("one request (image, prompt %d, 16 new tokens): %.1f ms\n", a->prompt_len, req_ms[2]);
    rc = a->engine ? run_engine_bench(a, m, tp, st) : BLIP2_OK;
    if (root && a->json) printf("}\n");
    return rc;
}

int blip2_cli_bench(int argc, char **argv) {
    bench_args a;
    setvbuf(stdout, NULL, _IONBF, 0); /* each result as soon as it is measured: a later crash keeps it */
    int bad = parse_bench_args(argc, argv, &a);
    if (bad) return bad;
    blip2_status st = {0};
    blip2_comm *world = blip2_comm_world(&st);
    if (!world) return blip2_cli_error("%s", st.msg);
    blip2_tp tp = blip2_tp_from_comm(world);
    blip2_model m;
    blip2_device dev;
    blip2_comm *comm = NULL;
    blip2_code rc = blip2_device_open_tp(a.device, &tp, &dev, &comm, &st);
    if (!rc) rc = load_model(&a, &tp, &dev, &m, &st);
    rc = blip2_tp_agree(&tp, rc, &st);
    if (!rc) {
        rc = run_bench(&a, &m, &tp, &st);
        blip2_model_free(&m);
    }
    blip2_device_close_tp(&dev, comm, &tp);
    if (rc && tp.rank == 0) blip2_cli_error("%s", st.msg);
    fflush(stdout);
    blip2_comm_world_finalize();
    return rc ? 1 : 0;
}
