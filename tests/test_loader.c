/* Config defaults, the name table against the real 2.7b index, and every bad-model-directory
 * case: each must fail with a message that names the file, the tensor and expected vs found. */
#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "model.h"

static char tmpdir[256];

static void write_file(const char *name, const void *data, size_t n) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s", tmpdir, name);
    FILE *fp = fopen(path, "wb");
    fwrite(data, 1, n, fp);
    fclose(fp);
}

static void clear_dir(void) {
    const char *names[] = {"config.json", "model.safetensors", "model.safetensors.index.json", "a.safetensors"};
    char path[512];
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        snprintf(path, sizeof path, "%s/%s", tmpdir, names[i]);
        unlink(path);
    }
}

static char *read_text(const char *path, size_t *n) {
    FILE *fp = fopen(path, "rb");
    if (!fp) return NULL;
    fseek(fp, 0, SEEK_END);
    *n = (size_t)ftell(fp);
    fseek(fp, 0, SEEK_SET);
    char *s = malloc(*n + 1);
    *n = fread(s, 1, *n, fp);
    s[*n] = 0;
    fclose(fp);
    return s;
}

static void test_hub_defaults(void) {
    blip2_config c;
    blip2_status st = {0};
    blip2_code rc = blip2_config_load(BLIP2_SHARED_DIR "/hub/blip2-opt-2.7b", &c, &st);
    CHECK(rc == BLIP2_OK, "%s", st.msg);
    CHECK(c.vision.C == 1408 && c.vision.mlp == 6144 && c.vision.layers == 39 && c.vision.NH == 16 && c.vision.HS == 88,
          "vision %d/%d/%d/%d", c.vision.C, c.vision.mlp, c.vision.layers, c.vision.NH);
    CHECK(c.vision.T == 257 && c.vision.P == 256 && c.vision.eps == 1e-6f, "vision T %d eps %g", c.vision.T, c.vision.eps);
    CHECK(c.qformer.C == 768 && c.qformer.mlp == 3072 && c.qformer.layers == 12 && c.qformer.NH == 12 &&
              c.qformer.cross_freq == 2 && c.qformer.enc_C == 1408 && c.qformer.eps == 1e-12f,
          "qformer %d/%d/%d/%d freq %d", c.qformer.C, c.qformer.mlp, c.qformer.layers, c.qformer.NH, c.qformer.cross_freq);
    CHECK(c.opt.C == 2560 && c.opt.ffn == 10240 && c.opt.layers == 32 && c.opt.NH == 32 && c.opt.HS == 80 &&
              c.opt.V == 50304 && c.opt.max_pos == 2048 && c.opt.eps == 1e-5f,
          "opt %d/%d/%d/%d V %d", c.opt.C, c.opt.ffn, c.opt.layers, c.opt.NH, c.opt.V);
    CHECK(c.Q == 32 && c.image_token_id == 50265 && c.bos_id == 2 && c.eos_id == 50118 && c.pad_id == 1, "Q %d eos %d", c.Q,
          c.eos_id);
    CHECK(c.max_new_tokens == 20, "default max_new_tokens %d", c.max_new_tokens);
}

/* The table and the real checkpoint agree name for name; their shapes add up to the index's
 * total_size (fp32), so a wrong shape anywhere would show. */
static void test_hub_index(void) {
    blip2_model m;
    memset(&m, 0, sizeof m);
    blip2_status st = {0};
    CHECK(blip2_config_load(BLIP2_SHARED_DIR "/hub/blip2-opt-2.7b", &m.cfg, &st) == BLIP2_OK, "%s", st.msg);
    blip2_weight_entry *e;
    int n;
    CHECK(blip2_weight_table(&m, &e, &n, &st) == BLIP2_OK, "%s", st.msg);
    json_error_t err;
    json_t *idx = json_load_file(BLIP2_SHARED_DIR "/hub/blip2-opt-2.7b/model.safetensors.index.json", 0, &err);
    json_t *wm = json_object_get(idx, "weight_map");
    CHECK(json_object_size(wm) == 1247, "index has %zu tensors", json_object_size(wm));
    int required = 0, missing = 0;
    int64_t bytes = 0;
    for (int i = 0; i < n; i++) {
        if (e[i].optional) {
            CHECK(json_object_get(wm, e[i].name) == NULL, "optional %s is in the index", e[i].name);
            continue;
        }
        required++;
        if (!json_object_get(wm, e[i].name)) {
            missing++;
            fprintf(stderr, "table name not in the index: %s\n", e[i].name);
        }
        int64_t numel = 1;
        for (int d = 0; d < e[i].ndim; d++) numel *= e[i].shape[d];
        bytes += numel * 4;
    }
    CHECK(required == 1247 && missing == 0, "table has %d required names, %d not in the index", required, missing);
    json_int_t total = json_integer_value(json_object_get(json_object_get(idx, "metadata"), "total_size"));
    CHECK(bytes == total, "table shapes add up to %lld bytes, index says %lld", (long long)bytes, (long long)total);
    json_decref(idx);
    free(e);
    blip2_model_free(&m);
}

/* ---- bad model directories, built from the tiny-f32-sharded fixture ---- */

static blip2_checkpoint src;
static blip2_st_out *src_t;
static int src_n;

static void load_source(void) {
    blip2_status st = {0};
    CHECK(blip2_checkpoint_open(BLIP2_SHARED_DIR "/fixtures/tiny-f32-sharded", &src, &st) == BLIP2_OK, "%s", st.msg);
    for (int f = 0; f < src.nfiles; f++) src_n += src.files[f].n;
    src_t = calloc((size_t)src_n + 1, sizeof *src_t);
    int k = 0;
    for (int f = 0; f < src.nfiles; f++)
        for (int i = 0; i < src.files[f].n; i++) {
            const blip2_st_tensor *t = &src.files[f].tensors[i];
            src_t[k] = (blip2_st_out){t->name, t->dtype, t->ndim, {0}, t->data};
            memcpy(src_t[k].shape, t->shape, sizeof t->shape);
            k++;
        }
}

static void put_config(void) {
    size_t n;
    char *cfg = read_text(BLIP2_SHARED_DIR "/fixtures/tiny-f32-sharded/config.json", &n);
    write_file("config.json", cfg, n);
    free(cfg);
}

static void write_model(const blip2_st_out *t, int n) {
    char path[512];
    blip2_status st = {0};
    snprintf(path, sizeof path, "%s/model.safetensors", tmpdir);
    CHECK(blip2_st_write(path, t, n, &st) == BLIP2_OK, "%s", st.msg);
}

static int find_src(const char *name) {
    for (int i = 0; i < src_n; i++)
        if (strcmp(src_t[i].name, name) == 0) return i;
    return -1;
}

/* Loads tmpdir and checks the code and that the message holds each given piece. */
static void expect_load_error(const char *what, blip2_code code, const char *sub1, const char *sub2, const char *sub3) {
    blip2_model m;
    blip2_status st = {0};
    blip2_code rc = blip2_model_load(tmpdir, &m, &st);
    CHECK(rc == code, "%s: code %d (%s), want %d; message: %s", what, rc, blip2_code_name(rc), code, st.msg);
    if (rc == BLIP2_OK) {
        blip2_model_free(&m);
        return;
    }
    printf("  %-22s -> %s\n", what, st.msg);
    if (sub1) CHECK_MSG_HAS(st.msg, sub1);
    if (sub2) CHECK_MSG_HAS(st.msg, sub2);
    if (sub3) CHECK_MSG_HAS(st.msg, sub3);
}

#define QKEY "qformer.encoder.layer.0.intermediate_query.dense.weight"

static void test_bad_tensors(void) {
    put_config();
    /* the good case first: one file written from the shards loads, lm_head tied */
    write_model(src_t, src_n);
    blip2_model m;
    blip2_status st = {0};
    CHECK(blip2_model_load(tmpdir, &m, &st) == BLIP2_OK, "rewritten fixture: %s", st.msg);
    if (m.opt.wte) {
        CHECK(m.opt.lm_head == m.opt.wte, "lm_head not tied to embed_tokens");
        blip2_model_free(&m);
    }

    int qi = find_src(QKEY);
    blip2_st_out saved = src_t[qi];
    src_t[qi] = src_t[src_n - 1];
    write_model(src_t, src_n - 1);
    expect_load_error("missing tensor", BLIP2_EFORMAT, QKEY, "missing", "[64, 32]");
    src_t[qi] = saved;

    src_t[src_n] = (blip2_st_out){"vision_model.encoder.layers.0.extra.weight", BLIP2_DT_F32, 1, {4}, saved.data};
    write_model(src_t, src_n + 1);
    expect_load_error("unexpected tensor", BLIP2_EFORMAT, "vision_model.encoder.layers.0.extra.weight", "unexpected",
                      "model.safetensors");

    src_t[qi].shape[0] = saved.shape[1];
    src_t[qi].shape[1] = saved.shape[0];
    write_model(src_t, src_n);
    expect_load_error("mis-shaped tensor", BLIP2_EFORMAT, QKEY, "expected shape [64, 32]", "found [32, 64]");
    src_t[qi] = saved;

    /* an explicit lm_head.weight is used instead of the tied embedding */
    int wi = find_src("language_model.model.decoder.embed_tokens.weight");
    src_t[src_n] = src_t[wi];
    src_t[src_n].name = "language_model.lm_head.weight";
    write_model(src_t, src_n + 1);
    st.msg[0] = 0;
    CHECK(blip2_model_load(tmpdir, &m, &st) == BLIP2_OK, "with lm_head: %s", st.msg);
    if (m.opt.wte) {
        CHECK(m.opt.lm_head != NULL && m.opt.lm_head != m.opt.wte, "explicit lm_head.weight not used");
        blip2_model_free(&m);
    }
}

static void test_bad_files(void) {
    char path[512];
    snprintf(path, sizeof path, "%s/model.safetensors", tmpdir);
    write_model(src_t, src_n);
    size_t n;
    char *full = read_text(path, &n);
    write_file("model.safetensors", full, n / 2);
    expect_load_error("truncated file", BLIP2_EFORMAT, "model.safetensors", "outside the data section", "truncated");
    write_file("model.safetensors", full, 5);
    expect_load_error("file of 5 bytes", BLIP2_EFORMAT, "model.safetensors", "too short", NULL);
    write_file("model.safetensors", full, 200);
    expect_load_error("header past the end", BLIP2_EFORMAT, "model.safetensors", "header length", "exceeds");
    free(full);

    const char *hdr_past = "{\"query_tokens\":{\"dtype\":\"F32\",\"shape\":[1,8,32],\"data_offsets\":[0,1024]}}";
    const char *hdr_dtype = "{\"query_tokens\":{\"dtype\":\"F8_E4M3\",\"shape\":[1,8,32],\"data_offsets\":[0,256]}}";
    const char *hdr_json = "{\"query_tokens\":{\"dtype\":\"F32\",";
    const char *hdrs[] = {hdr_past, hdr_dtype, hdr_json};
    for (int k = 0; k < 3; k++) {
        size_t hl = strlen(hdrs[k]), total = 8 + hl + 256;
        unsigned char *buf = calloc(1, total);
        for (int i = 0; i < 8; i++) buf[i] = (unsigned char)((uint64_t)hl >> (8 * i));
        memcpy(buf + 8, hdrs[k], hl);
        write_file("model.safetensors", buf, total);
        free(buf);
        if (k == 0) expect_load_error("offsets past the end", BLIP2_EFORMAT, "'query_tokens'", "[0, 1024]", "256 bytes");
        if (k == 1) expect_load_error("unknown dtype", BLIP2_EFORMAT, "'query_tokens'", "unknown dtype 'F8_E4M3'", "model.safetensors");
        if (k == 2) expect_load_error("malformed header", BLIP2_EFORMAT, "model.safetensors", "not a JSON object", NULL);
    }
    clear_dir();
    put_config();
    const char *index = "{\"weight_map\": {\"query_tokens\": \"a.safetensors\", \"qformer.layernorm.weight\": \"b.safetensors\"}}";
    write_model(src_t, src_n);
    char from[512], to[512];
    snprintf(from, sizeof from, "%s/model.safetensors", tmpdir);
    snprintf(to, sizeof to, "%s/a.safetensors", tmpdir);
    rename(from, to);
    write_file("model.safetensors.index.json", index, strlen(index));
    expect_load_error("missing shard", BLIP2_EIO, "b.safetensors", "cannot open", NULL);
    clear_dir();
}

static void expect_config_error(const char *what, const char *json, blip2_code code, const char *sub1, const char *sub2) {
    clear_dir();
    if (json) write_file("config.json", json, strlen(json));
    expect_load_error(what, code, sub1, sub2, NULL);
}

static void test_bad_configs(void) {
    expect_config_error("no config.json", NULL, BLIP2_EIO, "config.json", "missing");
    expect_config_error("malformed config", "{\"num_query_tokens\": 32,", BLIP2_EFORMAT, "config.json", "malformed JSON");
    expect_config_error("config wrong type", "{\"num_query_tokens\": \"many\"}", BLIP2_EFORMAT, "config.json",
                        "num_query_tokens must be an integer");
    expect_config_error("config negative", "{\"vision_config\": {\"hidden_size\": -3}}", BLIP2_EFORMAT,
                        "vision_config.hidden_size", "must be an integer");
    expect_config_error("heads do not divide", "{\"text_config\": {\"hidden_size\": 100, \"num_attention_heads\": 3}}",
                        BLIP2_EFORMAT, "text_config.hidden_size 100", "num_attention_heads 3");
    expect_config_error("project_in/out", "{\"text_config\": {\"word_embed_proj_dim\": 512}}", BLIP2_EFORMAT,
                        "word_embed_proj_dim 512", "not supported");
    expect_config_error("section not object", "{\"vision_config\": [1, 2]}", BLIP2_EFORMAT, "vision_config must be an object",
                        NULL);
    expect_config_error("tanh gelu", "{\"vision_config\": {\"hidden_act\": \"gelu_new\"}}", BLIP2_EFORMAT, "gelu_new", NULL);
    clear_dir();
    put_config();
    write_model(src_t, src_n);
    const char *proc = "{\"num_query_tokens\": 16}";
    write_file("processor_config.json", proc, strlen(proc));
    expect_load_error("processor disagrees", BLIP2_EFORMAT, "processor_config.json", "num_query_tokens 16", "8");
    char path[512];
    snprintf(path, sizeof path, "%s/processor_config.json", tmpdir);
    unlink(path);
    clear_dir();
}

static void test_half_conversions(void) {
    const float vals[] = {0.0f, 1.0f, -2.5f, 65504.0f, 6.1035156e-05f, 5.9604645e-08f, 0.1f, 3.14159f};
    for (size_t i = 0; i < sizeof vals / sizeof *vals; i++) {
        float back = blip2_f16_to_f32(blip2_f32_to_f16(vals[i]));
        CHECK(fabsf(back - vals[i]) <= fabsf(vals[i]) * 4.9e-4f, "f16 round trip %g -> %g", vals[i], back);
        float bb = blip2_bf16_to_f32(blip2_f32_to_bf16(vals[i]));
        CHECK(fabsf(bb - vals[i]) <= fabsf(vals[i]) * 3.9e-3f, "bf16 round trip %g -> %g", vals[i], bb);
    }
    CHECK(blip2_f32_to_f16(1.0f) == 0x3c00 && blip2_f32_to_f16(65520.0f) == 0x7c00 && blip2_f32_to_f16(-0.0f) == 0x8000,
          "f16 encodings");
    CHECK(blip2_f16_to_f32(0x0001) == 5.9604645e-08f && blip2_f16_to_f32(0x7bff) == 65504.0f, "f16 decodings");
    CHECK(blip2_f32_to_bf16(1.00390625f) == 0x3f80 && blip2_f32_to_bf16(1.01171875f) == 0x3f82, "bf16 ties to even");
}

/* Each of N = 2 ranks holds about half of the OPT weight bytes (only LayerNorms, row-parallel
 * biases and positions are whole on both), and only rank 0 holds the vision side. */
static void test_shard_memory(void) {
    const char *dir = BLIP2_SHARED_DIR "/fixtures/tiny-f16";
    blip2_model full, r0, r1;
    blip2_status st = {0};
    CHECK(blip2_model_load(dir, &full, &st) == BLIP2_OK, "%s", st.msg);
    CHECK(blip2_model_load_shard(dir, 0, 2, &r0, &st) == BLIP2_OK, "%s", st.msg);
    CHECK(blip2_model_load_shard(dir, 1, 2, &r1, &st) == BLIP2_OK, "%s", st.msg);
    double f0 = (double)r0.opt_bytes / full.opt_bytes, f1 = (double)r1.opt_bytes / full.opt_bytes;
    printf("  OPT bytes: full %zu, rank 0 %zu (%.3f), rank 1 %zu (%.3f)\n", full.opt_bytes, r0.opt_bytes, f0, r1.opt_bytes, f1);
    CHECK(f0 > 0.49 && f0 < 0.55 && f1 > 0.49 && f1 < 0.55, "rank shares %.3f %.3f", f0, f1);
    CHECK(r0.shard.NH == 2 && r1.shard.v0 == 25152 && r1.shard.V == 25152, "shard plan");
    CHECK(r0.vision.patch_w != NULL && r1.vision.patch_w == NULL && r1.qformer.query_tokens == NULL,
          "vision/Q-Former only on rank 0");
    blip2_model bad;
    CHECK(blip2_model_load_shard(BLIP2_SHARED_DIR "/fixtures/tiny-f32-sharded", 0, 2, &bad, &st) == BLIP2_EINVAL,
          "2 ranks over 3 heads must fail");
    CHECK_MSG_HAS(st.msg, "does not divide the OPT head count 3");
    blip2_model_free(&full);
    blip2_model_free(&r0);
    blip2_model_free(&r1);
}

int main(void) {
    snprintf(tmpdir, sizeof tmpdir, "/tmp/blip2-test-loader-XXXXXX");
    if (!mkdtemp(tmpdir)) return 1;
    test_hub_defaults();
    test_hub_index();
    load_source();
    test_bad_tensors();
    test_bad_files();
    test_bad_configs();
    test_half_conversions();
    test_shard_memory();
    {
        char missing[300];
        snprintf(missing, sizeof missing, "%s/does-not-exist", tmpdir);
        blip2_model m;
        blip2_status st = {0};
        CHECK(blip2_model_load(missing, &m, &st) == BLIP2_EIO, "missing dir");
        CHECK_MSG_HAS(st.msg, "does-not-exist/config.json");
    }
    blip2_checkpoint_close(&src);
    free(src_t);
    rmdir(tmpdir);
    return check_summary();
}
