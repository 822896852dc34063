/* Parity with HF transformers on the golden fixtures (fixtures/README.md): every intermediate
 * within relative L2 2e-6, the 12 greedy ids identical; and cached decoding equals a full
 * re-forward. */
#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "forward.h"
#include "ops.h"

#define TOL 2e-6
#define N_GREEDY 12

static int32_t *json_ids(json_t *arr, int *n) {
    *n = (int)json_array_size(arr);
    int32_t *ids = malloc(sizeof(int32_t) * (*n ? *n : 1));
    for (int i = 0; i < *n; i++) ids[i] = (int32_t)json_integer_value(json_array_get(arr, i));
    return ids;
}

static void compare(const blip2_st_file *golden, int case_no, const char *what, const float *ours, size_t n,
                    const char *model) {
    char key[64];
    snprintf(key, sizeof key, "case%d.%s", case_no, what);
    const blip2_st_tensor *t = blip2_st_find(golden, key);
    CHECK(t && (size_t)blip2_st_numel(t) == n, "%s: golden %s missing or of another size", model, key);
    if (!t || (size_t)blip2_st_numel(t) != n) return;
    double err = check_rel_l2(ours, t->data, n);
    CHECK(err <= TOL, "%s %s: rel L2 %.3g > %g", model, key, err, TOL);
    printf("  %-24s rel L2 %.2e\n", key, err);
}

/* Logits after prefill(n) + one cached step must equal a fresh forward over n+1 positions. */
static void check_kv_cache(const blip2_model *m, const float *emb_all, int n, const char *model) {
    const blip2_config *c = &m->cfg;
    blip2_status st = {0};
    blip2_tp tp = blip2_tp_from_comm(blip2_comm_self());
    blip2_kv_cache kv;
    float *a = malloc(sizeof(float) * c->opt.V), *b = malloc(sizeof(float) * c->opt.V);
    CHECK(blip2_kv_cache_init(&kv, m, n + 1, &st) == BLIP2_OK, "%s", st.msg);
    CHECK(blip2_opt_forward(m, &tp, &kv, emb_all, n, a, &st) == BLIP2_OK, "%s", st.msg);
    CHECK(blip2_opt_forward(m, &tp, &kv, emb_all + (size_t)n * c->opt.C, 1, a, &st) == BLIP2_OK, "%s", st.msg);
    blip2_kv_cache_free(&kv);
    CHECK(blip2_kv_cache_init(&kv, m, n + 1, &st) == BLIP2_OK, "%s", st.msg);
    CHECK(blip2_opt_forward(m, &tp, &kv, emb_all, n + 1, b, &st) == BLIP2_OK, "%s", st.msg);
    blip2_kv_cache_free(&kv);
    double err = check_rel_l2(a, b, (size_t)c->opt.V);
    CHECK(err <= 1e-6, "%s: cached decode vs full re-forward logits rel L2 %.3g", model, err);
    printf("  kv-cache vs re-forward   rel L2 %.2e\n", err);
    free(a);
    free(b);
}

/* The goldens' greedy_ids_no_eos_stop: N_GREEDY argmax steps with the KV cache, no eos stop. */
static blip2_code greedy_no_eos_stop(const blip2_model *m, const blip2_tp *tp, const int32_t *ids, int n,
                                     const float *projected, int32_t *out, int *n_out, blip2_status *st) {
    const blip2_config *c = &m->cfg;
    float *emb = malloc(sizeof(float) * (size_t)n * c->opt.C), *logits = malloc(sizeof(float) * c->opt.V);
    blip2_kv_cache kv;
    blip2_code rc = blip2_kv_cache_init(&kv, m, n + N_GREEDY, st);
    if (!rc) rc = blip2_opt_embed_inputs(m, tp, ids, n, projected, emb, st);
    if (!rc) rc = blip2_opt_forward(m, tp, &kv, emb, n, logits, st);
    for (*n_out = 0; !rc && *n_out < N_GREEDY; (*n_out)++) {
        rc = blip2_tp_argmax(m, tp, logits, 1, &out[*n_out], st);
        if (!rc) rc = blip2_opt_embed_tokens(m, tp, &out[*n_out], 1, NULL, emb, st);
        if (!rc && *n_out + 1 < N_GREEDY) rc = blip2_opt_forward(m, tp, &kv, emb, 1, logits, st);
    }
    blip2_kv_cache_free(&kv);
    free(emb);
    free(logits);
    return rc;
}

static void run_case(const blip2_model *m, const blip2_st_file *golden, const blip2_st_file *pixels, json_t *jc,
                     const char *model, int kv_check) {
    const blip2_config *c = &m->cfg;
    int case_no = (int)json_integer_value(json_object_get(jc, "case")), n, n_want, n_out;
    int32_t *ids = json_ids(json_object_get(jc, "input_ids"), &n);
    int32_t *want = json_ids(json_object_get(jc, "greedy_ids_no_eos_stop"), &n_want);
    char key[256];
    const char *img = json_string_value(json_object_get(jc, "image"));
    snprintf(key, sizeof key, "%s", strrchr(img, '/') + 1);
    *strrchr(key, '.') = 0;
    const blip2_st_tensor *pv = blip2_st_find(pixels, key);
    CHECK(pv != NULL, "pixel values '%s' missing", key);
    if (!pv) return;
    blip2_trace tr = {
        .vision_out = malloc(sizeof(float) * c->vision.T * c->vision.C),
        .qformer_out = malloc(sizeof(float) * c->Q * c->qformer.C),
        .projected = malloc(sizeof(float) * c->Q * c->opt.C),
        .prefill_logits = malloc(sizeof(float) * c->opt.V),
    };
    int32_t out[N_GREEDY];
    blip2_status st = {0};
    printf("%s case %d (%s, %d input ids)\n", model, case_no, key, n);
    blip2_tp tp = blip2_tp_from_comm(blip2_comm_self());
    blip2_code rc = blip2_trace_prefill(m, &tp, pv->data, ids, n, &tr, &st);
    CHECK(rc == BLIP2_OK, "%s case %d: %s", model, case_no, st.msg);
    rc = greedy_no_eos_stop(m, &tp, ids, n, tr.projected, out, &n_out, &st);
    CHECK(rc == BLIP2_OK, "%s case %d: %s", model, case_no, st.msg);
    compare(golden, case_no, "vision_out", tr.vision_out, (size_t)c->vision.T * c->vision.C, model);
    compare(golden, case_no, "qformer_out", tr.qformer_out, (size_t)c->Q * c->qformer.C, model);
    compare(golden, case_no, "projected", tr.projected, (size_t)c->Q * c->opt.C, model);
    compare(golden, case_no, "prefill_logits", tr.prefill_logits, (size_t)c->opt.V, model);
    CHECK(n_out == n_want && memcmp(out, want, sizeof(int32_t) * n_want) == 0, "%s case %d: greedy ids differ", model, case_no);
    if (kv_check) {
        float *emb = malloc(sizeof(float) * (size_t)(n + 1) * c->opt.C);
        CHECK(blip2_opt_embed_inputs(m, &tp, ids, n, tr.projected, emb, &st) == BLIP2_OK, "%s", st.msg);
        blip2_embedding(emb + (size_t)n * c->opt.C, &out[0], m->opt.wte, 1, c->opt.C);
        check_kv_cache(m, emb, n, model);
        free(emb);
    }
    free(tr.vision_out);
    free(tr.qformer_out);
    free(tr.projected);
    free(tr.prefill_logits);
    free(ids);
    free(want);
}

static void run_model(const char *name, json_t *manifest, const blip2_st_file *pixels) {
    char dir[1024], path[1200];
    snprintf(dir, sizeof dir, "%s/fixtures/%s", BLIP2_SHARED_DIR, name);
    blip2_status st = {0};
    blip2_model m;
    blip2_code rc = blip2_model_load(dir, &m, &st);
    CHECK(rc == BLIP2_OK, "load %s: %s", name, st.msg);
    if (rc) return;
    snprintf(path, sizeof path, "%s/golden.safetensors", dir);
    blip2_st_file golden;
    rc = blip2_st_open(path, &golden, &st);
    CHECK(rc == BLIP2_OK, "%s", st.msg);
    if (!rc) {
        json_t *cases = json_object_get(json_object_get(json_object_get(manifest, "fixtures"), name), "cases");
        CHECK(json_array_size(cases) == 5, "%s: expected 5 cases", name);
        for (size_t i = 0; i < json_array_size(cases); i++) run_case(&m, &golden, pixels, json_array_get(cases, i), name, i < 2);
        blip2_st_close(&golden);
    }
    blip2_model_free(&m);
}

int main(void) {
    char path[1024];
    snprintf(path, sizeof path, "%s/fixtures/MANIFEST.json", BLIP2_SHARED_DIR);
    json_error_t err;
    json_t *manifest = json_load_file(path, 0, &err);
    CHECK(manifest != NULL, "%s: %s", path, err.text);
    if (!manifest) return check_summary();
    snprintf(path, sizeof path, "%s/fixtures/pixel_values.safetensors", BLIP2_SHARED_DIR);
    blip2_st_file pixels;
    blip2_status st = {0};
    CHECK(blip2_st_open(path, &pixels, &st) == BLIP2_OK, "%s", st.msg);
    run_model("tiny-f16", manifest, &pixels);
    run_model("tiny-f32-sharded", manifest, &pixels);
    blip2_st_close(&pixels);
    json_decref(manifest);
    return check_summary();
}
