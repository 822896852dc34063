/* Decoding edge cases against transformers' generate() (tests/goldens/decoding.json, made by
 * tests/goldens/make_decoding_goldens.py): eos inside greedy and beam search with length_penalty,
 * early_stopping and num_return_sequences, min_new_tokens and repetition_penalty. The fixture
 * models never emit eos 50118, so each case sets eos to a token they do emit: a model directory
 * of symlinks to the fixture with its own generation_config.json. */
#include <jansson.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "device.h"
#include "engine.h"
#include "ops.h"
#include "sampling.h"
#include <math.h>

#ifndef BLIP2_SOURCE_DIR
#define BLIP2_SOURCE_DIR "."
#endif

typedef struct {
    int n_seqs, n[16];
    int32_t ids[16][32];
    float score[16];
    blip2_code code;
} outcome;

static void on_done(void *ctx, const blip2_result *res) {
    outcome *o = ctx;
    o->code = res->code;
    o->n_seqs = res->n_seqs;
    for (int s = 0; s < res->n_seqs && s < 16; s++) {
        o->n[s] = res->seqs[s].n_ids < 32 ? res->seqs[s].n_ids : 32;
        memcpy(o->ids[s], res->seqs[s].ids, sizeof(int32_t) * o->n[s]);
        o->score[s] = res->seqs[s].score;
    }
}

/* A model directory like the fixture's, but whose generation config says eos = `eos`. */
static void make_model_dir(const char *src, const char *dst, int eos) {
    const char *files[] = {"config.json", "model.safetensors", "model-00001-of-00002.safetensors",
                           "model-00002-of-00002.safetensors", "model.safetensors.index.json", "processor_config.json",
                           "preprocessor_config.json", "vocab.json", "merges.txt", "added_tokens.json",
                           "special_tokens_map.json", "tokenizer_config.json"};
    char a[1024], b[1024];
    mkdir(dst, 0755);
    for (size_t i = 0; i < sizeof files / sizeof *files; i++) {
        snprintf(a, sizeof a, "%s/%s", src, files[i]);
        snprintf(b, sizeof b, "%s/%s", dst, files[i]);
        unlink(b);
        if (access(a, R_OK) == 0) CHECK(symlink(a, b) == 0, "symlink %s", b);
    }
    snprintf(b, sizeof b, "%s/generation_config.json", dst);
    FILE *fp = fopen(b, "w");
    fprintf(fp, "{\"bos_token_id\": 2, \"eos_token_id\": %d, \"pad_token_id\": 1}\n", eos);
    fclose(fp);
}

static blip2_decoding decoding_of(json_t *p) {
    blip2_decoding d = blip2_decoding_default();
    d.max_new_tokens = (int)json_integer_value(json_object_get(p, "max_new_tokens"));
    d.num_beams = (int)json_integer_value(json_object_get(p, "num_beams"));
    d.min_new_tokens = (int)json_integer_value(json_object_get(p, "min_new_tokens"));
    d.repetition_penalty = (float)json_number_value(json_object_get(p, "repetition_penalty"));
    d.length_penalty = (float)json_number_value(json_object_get(p, "length_penalty"));
    d.early_stopping = json_is_true(json_object_get(p, "early_stopping"));
    d.num_return_sequences = (int)json_integer_value(json_object_get(p, "num_return_sequences"));
    return d;
}

static void *stopper(void *e) {
    blip2_engine_stop(e, 1 << 30); /* drains: run() returns once the job is done */
    return NULL;
}

static const blip2_ops *g_ops; /* the backend under test (--device; fp32 weights: the goldens are fp32) */

static void run_case(json_t *c, json_t *manifest, const blip2_st_file *px, const char *tmp) {
    const char *model = json_string_value(json_object_get(c, "model")), *variant = json_string_value(json_object_get(c, "variant"));
    int case_no = (int)json_integer_value(json_object_get(c, "case")), eos = (int)json_integer_value(json_object_get(c, "eos"));
    char src[512], dir[512];
    snprintf(src, sizeof src, "%s/fixtures/%s", BLIP2_SHARED_DIR, model);
    snprintf(dir, sizeof dir, "%s/%s-eos%d", tmp, model, eos);
    make_model_dir(src, dir, eos);
    blip2_model m;
    blip2_inputs in;
    blip2_status st = {0};
    if (blip2_model_load(dir, &m, &st) || blip2_model_to_backend(&m, g_ops, BLIP2_W_F32, 0, &st) ||
        blip2_inputs_load(dir, &m.cfg, &in, &st)) {
        CHECK(0, "%s: %s", dir, st.msg);
        return;
    }
    CHECK(m.cfg.eos_id == eos, "generation_config eos %d not applied (%d)", eos, m.cfg.eos_id);
    json_t *fc = json_array_get(json_object_get(json_object_get(json_object_get(manifest, "fixtures"), model), "cases"), case_no);
    json_t *jids = json_object_get(fc, "input_ids");
    int n = (int)json_array_size(jids);
    int32_t ids[128];
    for (int i = 0; i < n; i++) ids[i] = (int32_t)json_integer_value(json_array_get(jids, i));
    char key[128];
    snprintf(key, sizeof key, "%s", strrchr(json_string_value(json_object_get(fc, "image")), '/') + 1);
    *strrchr(key, '.') = 0;
    blip2_tp tp = blip2_tp_from_comm(blip2_comm_self());
    blip2_engine_opts o = blip2_engine_opts_default();
    o.kv_bytes = 32 << 20;
    blip2_engine *e;
    CHECK(blip2_engine_create(&m, &tp, &in, &o, &e, &st) == BLIP2_OK, "%s", st.msg);
    outcome out = {0};
    blip2_job job = {.pixels = blip2_st_find(px, key)->data, .input_ids = ids, .n_input_ids = n,
                     .dec = decoding_of(json_object_get(c, "params"))};
    blip2_job_callbacks cb = {&out, NULL, on_done, NULL};
    CHECK(blip2_engine_submit(e, &job, &cb, &st) == BLIP2_OK, "%s", st.msg);
    pthread_t t;
    pthread_create(&t, NULL, stopper, e);
    pthread_join(t, NULL);
    CHECK(blip2_engine_run(e, &st) == BLIP2_OK, "%s", st.msg);
    blip2_engine_destroy(e);

    json_t *want = json_object_get(c, "new_ids"), *scores = json_object_get(c, "scores");
    int same = out.code == BLIP2_OK && out.n_seqs == (int)json_array_size(want);
    for (int s = 0; same && s < out.n_seqs; s++) {
        json_t *w = json_array_get(want, s);
        same = out.n[s] == (int)json_array_size(w);
        for (int i = 0; same && i < out.n[s]; i++) same = out.ids[s][i] == json_integer_value(json_array_get(w, i));
        if (same && json_is_array(scores)) {
            double ws = json_number_value(json_array_get(scores, s));
            same = fabs(out.score[s] - ws) <= 1e-4 * (1 + fabs(ws));
            if (!same) fprintf(stderr, "  score %d: ours %.7g, transformers %.7g\n", s, out.score[s], ws);
        }
    }
    CHECK(same, "%s case %d %s (eos %d): %d sequences, first %d ids starting %d", model, case_no, variant, eos, out.n_seqs,
          out.n[0], out.ids[0][0]);
    printf("  %-18s case %d %-16s %s\n", model, case_no, variant, same ? "same as transformers" : "DIFFERS");
    blip2_inputs_free(&in);
    blip2_model_free(&m);
}

/* Sampling from the device's candidates must pick what sampling from the whole row picks, bit
 * for bit, given the same generator state: random rows, decodings over temperature, top-k, top-p,
 * min_new_tokens (eos masked, inside and outside the candidates), greedy with min_new_tokens; rows
 * with coarse values (ties) where the exactness check must say no when a tie crosses the boundary. */
static void test_candidates_match_full_row(void) {
    enum { V = 4099, ROWS = 400 };
    float *row = malloc(sizeof(float) * V), *work = malloc(sizeof(float) * V), *scratch = malloc(sizeof(float) * 2 * V);
    blip2_rng g;
    blip2_rng_seed(&g, 11);
    const int top_ks[] = {1, 2, 5, 50, 62};
    const float top_ps[] = {1.0f, 0.9f, 0.3f}, temps[] = {1.0f, 0.7f, 1.3f};
    int compared = 0, exact = 0, inexact_ties = 0, coarse_rows = 0;
    for (int t = 0; t < ROWS; t++) {
        int coarse = t % 4 == 3; /* values on a 1/4 grid: ties everywhere */
        coarse_rows += coarse;
        for (int i = 0; i < V; i++) {
            double u = blip2_rng_uniform(&g), w = blip2_rng_uniform(&g);
            float v = (float)(sqrt(-2.0 * log(1.0 - u)) * cos(6.283185307179586 * w) * 3.0);
            row[i] = coarse ? roundf(v * 4.0f) / 4.0f : v;
        }
        int eos = t % 3 == 0 ? blip2_argmax(row, V) : (int)(blip2_rng_uniform(&g) * V); /* often the best */
        blip2_decoding d = blip2_decoding_default();
        d.do_sample = t % 5 != 0;
        d.top_k = top_ks[t % 5];
        d.top_p = top_ps[(t / 5) % 3];
        d.temperature = temps[(t / 15) % 3];
        d.min_new_tokens = t % 2 ? 3 : 0;
        if (!d.do_sample) d.min_new_tokens = 3;
        int n_gen = (t / 2) % 2 ? 1 : 5, n = blip2_decoding_candidates(&d);
        CHECK(n >= 2 && n <= BLIP2_TOPK_MAX, "candidates %d for row %d", n, t);
        if (n < 2) continue;
        int32_t ids[BLIP2_TOPK_MAX];
        float vals[BLIP2_TOPK_MAX];
        blip2_topk_rows(ids, vals, row, 1, V, n);
        if (!blip2_candidates_exact(vals, n)) {
            inexact_ties += coarse;
            continue;
        }
        blip2_rng r1, r2;
        blip2_rng_seed(&r1, 1000 + (uint64_t)t);
        r2 = r1;
        memcpy(work, row, sizeof(float) * V);
        blip2_logits_mask_eos(&d, work, V, n_gen, eos);
        int32_t full = d.do_sample ? blip2_sample(&d, work, V, &r1, scratch) : blip2_argmax(work, V);
        int32_t fromc = blip2_sample_candidates(&d, ids, vals, n, n_gen, eos, &r2);
        compared++;
        exact += full == fromc;
        if (full != fromc && compared - exact <= 3)
            CHECK(0, "row %d (sample %d top_k %d top_p %g T %g min_new %d gen %d eos %d%s): full row %d, candidates %d", t,
                  d.do_sample, d.top_k, d.top_p, d.temperature, d.min_new_tokens, n_gen, eos, coarse ? " coarse" : "", full,
                  fromc);
    }
    CHECK(compared == exact, "candidates: %d of %d draws equal the full row's", exact, compared);
    CHECK(compared >= ROWS - coarse_rows && inexact_ties > 0,
          "candidates: %d rows compared (want every fine row), %d coarse rows refused (want some)", compared, inexact_ties);
    free(row), free(work), free(scratch);
}

/* test_decoding [--device cpu|cuda] */
int main(int argc, char **argv) {
    const char *device = argc == 3 && !strcmp(argv[1], "--device") ? argv[2] : argc == 1 ? "cpu" : NULL;
    if (!device) return fprintf(stderr, "usage: test_decoding [--device cpu|cuda]\n"), 2;
    blip2_device dev;
    blip2_status dst = {0};
    if (blip2_device_open(device, 0, &dev, &dst)) return fprintf(stderr, "test_decoding: %s\n", dst.msg), 2;
    g_ops = dev.ops;
    printf("device %s\n", dev.name);
    test_candidates_match_full_row();
    json_error_t err;
    json_t *gold = json_load_file(BLIP2_SOURCE_DIR "/tests/goldens/decoding.json", 0, &err);
    json_t *manifest = json_load_file(BLIP2_SHARED_DIR "/fixtures/MANIFEST.json", 0, &err);
    blip2_st_file px;
    blip2_status st = {0};
    if (!gold || !manifest || blip2_st_open(BLIP2_SHARED_DIR "/fixtures/pixel_values.safetensors", &px, &st)) {
        CHECK(0, "inputs: %s %s", err.text, st.msg);
        return check_summary();
    }
    char tmp[] = "/tmp/blip2-test-decoding-XXXXXX";
    CHECK(mkdtemp(tmp) != NULL, "mkdtemp");
    json_t *cases = json_object_get(gold, "cases");
    for (size_t i = 0; i < json_array_size(cases); i++) run_case(json_array_get(cases, i), manifest, &px, tmp);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp);
    CHECK(system(cmd) == 0, "cleanup");
    blip2_st_close(&px);
    json_decref(gold);
    json_decref(manifest);
    blip2_device_close(&dev);
    return check_summary();
}
