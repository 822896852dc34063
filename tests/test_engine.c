/* The serving engine against the goldens and against itself: greedy and beam search reproduce
 * transformers; 64 concurrent requests in random order and arrival times get exactly the ids
 * each gets alone (greedy, and seeded sampling where the backend promises batch invariance; with
 * and without a repetition penalty); a KV cache too small for everyone still serves everyone and
 * ends with no block in use, cancellations and deadlines included; a repeated image skips the
 * vision encoder. */
#include <jansson.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "device.h"
#include "engine.h"

typedef struct outcome {
    int32_t ids[64];
    int n;
    blip2_code code;
    int done, cached, finish;
    int cancel_after; /* tokens, then is_cancelled says yes (0: never) */
    int tokens_seen;
    char text[512];
    size_t streamed;
    const struct outcome *lead; /* another request: its tokens_seen when this one's first token came */
    int lead_at_first;
} outcome;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int n_done;

static void on_token(void *ctx, int32_t id, const char *piece, size_t len) {
    outcome *o = ctx;
    (void)id;
    if (__atomic_fetch_add(&o->tokens_seen, 1, __ATOMIC_RELEASE) == 0 && o->lead) /* read by a submitter thread in the overlap test */
        o->lead_at_first = __atomic_load_n(&o->lead->tokens_seen, __ATOMIC_ACQUIRE);
    if (o->streamed + len < sizeof o->text) memcpy(o->text + o->streamed, piece, len), o->streamed += len;
}

static void on_done(void *ctx, const blip2_result *res) {
    outcome *o = ctx;
    o->code = res->code;
    if (res->code == BLIP2_OK && res->n_seqs > 0) {
        o->n = res->seqs[0].n_ids < 64 ? res->seqs[0].n_ids : 64;
        memcpy(o->ids, res->seqs[0].ids, sizeof(int32_t) * o->n);
        o->cached = res->timings.image_cached;
        o->finish = res->seqs[0].finish;
    }
    pthread_mutex_lock(&mu);
    o->done = 1;
    n_done++;
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
}

static int is_cancelled(void *ctx) {
    outcome *o = ctx;
    return o->cancel_after && o->tokens_seen >= o->cancel_after;
}

static blip2_job_callbacks callbacks(outcome *o) {
    return (blip2_job_callbacks){o, on_token, on_done, is_cancelled};
}

/* ---- fixture cases ---- */

typedef struct {
    int32_t *ids;
    int n;
    int32_t greedy[12], beam[12];
    const float *pixels;
    char image[128];
} fcase;

static int load_cases(json_t *manifest, const char *name, const blip2_st_file *px, fcase *cases) {
    json_t *arr = json_object_get(json_object_get(json_object_get(manifest, "fixtures"), name), "cases");
    int n = (int)json_array_size(arr);
    for (int i = 0; i < n; i++) {
        json_t *c = json_array_get(arr, i), *ids = json_object_get(c, "input_ids");
        fcase *f = &cases[i];
        f->n = (int)json_array_size(ids);
        f->ids = malloc(sizeof(int32_t) * f->n);
        for (int j = 0; j < f->n; j++) f->ids[j] = (int32_t)json_integer_value(json_array_get(ids, j));
        json_t *g = json_object_get(c, "greedy_ids_no_eos_stop"), *b = json_object_get(c, "generate_beam3_raw");
        for (int j = 0; j < 12; j++) {
            f->greedy[j] = (int32_t)json_integer_value(json_array_get(g, j));
            f->beam[j] = (int32_t)json_integer_value(json_array_get(b, f->n + j));
        }
        const char *img = json_string_value(json_object_get(c, "image"));
        snprintf(f->image, sizeof f->image, "%s", strrchr(img, '/') + 1);
        char key[128];
        snprintf(key, sizeof key, "%s", f->image);
        *strrchr(key, '.') = 0;
        f->pixels = blip2_st_find(px, key)->data;
    }
    return n;
}

/* ---- a harness: a fresh engine on this thread, submissions from another ---- */

typedef struct {
    blip2_job *jobs;
    outcome *out;
    int n, shuffle; /* shuffle: random order and gaps; < 0: one at a time, each waits for the last */
    blip2_engine *e;
} run_arg;

static void submit_one(blip2_engine *e, const blip2_job *job, outcome *o) {
    blip2_status st = {0};
    blip2_job_callbacks cb = callbacks(o);
    blip2_code rc;
    while ((rc = blip2_engine_submit(e, job, &cb, &st)) == BLIP2_EBUSY) usleep(1000);
    CHECK(rc == BLIP2_OK, "submit: %s", st.msg);
    if (rc) on_done(o, &(blip2_result){.code = rc});
}

/* Jobs in a random order with random gaps (when shuffle), then wait for all, then stop. */
static void *submitter(void *p) {
    run_arg *a = p;
    for (int k = 0; k < a->n; k++) {
        int i = a->shuffle > 0 ? (int)((k * 7919u + 13) % (unsigned)a->n) : k;
        if (a->shuffle > 0 && rand() % 3 == 0) usleep((unsigned)(rand() % 3000));
        submit_one(a->e, &a->jobs[i], &a->out[i]);
        pthread_mutex_lock(&mu);
        while (a->shuffle < 0 && n_done < k + 1) pthread_cond_wait(&cv, &mu);
        pthread_mutex_unlock(&mu);
    }
    pthread_mutex_lock(&mu);
    while (n_done < a->n) pthread_cond_wait(&cv, &mu);
    pthread_mutex_unlock(&mu);
    blip2_engine_stop(a->e, 60000);
    return NULL;
}

typedef struct {
    const blip2_model *m;
    const blip2_inputs *in;
    blip2_tp tp;
    blip2_engine_opts o;
} env_t;

static blip2_engine *make_engine(env_t *env) {
    blip2_engine *e = NULL;
    blip2_status st = {0};
    CHECK(blip2_engine_create(env->m, &env->tp, env->in, &env->o, &e, &st) == BLIP2_OK, "create: %s", st.msg);
    return e;
}

/* Runs a fresh engine (put in *slot for `feed`) until `feed`, a thread that submits and then
 * stops it, is done; its stats at the end in *s. 0, or -1 when it could not start. */
static int drive(env_t *env, void *(*feed)(void *), void *arg, blip2_engine **slot, blip2_engine_stats *s) {
    memset(s, 0, sizeof *s);
    blip2_engine *e = make_engine(env);
    if (!e) return -1;
    *slot = e;
    n_done = 0;
    pthread_t t;
    pthread_create(&t, NULL, feed, arg);
    blip2_status st = {0};
    CHECK(blip2_engine_run(e, &st) == BLIP2_OK, "engine: %s", st.msg);
    pthread_join(t, NULL);
    blip2_engine_get_stats(e, s);
    blip2_engine_destroy(e);
    return 0;
}

/* Runs jobs [n] on a fresh engine; returns the blocks still in use afterwards (must be 0). */
static int run_jobs(env_t *env, blip2_job *jobs, outcome *out, int n, int shuffle, blip2_engine_stats *stats) {
    memset(out, 0, sizeof *out * (size_t)n);
    run_arg a = {jobs, out, n, shuffle, NULL};
    blip2_engine_stats s;
    int rc = drive(env, submitter, &a, &a.e, &s);
    if (stats) *stats = s;
    if (rc) return -1;
    return s.blocks_in_use;
}

static blip2_job case_job(const fcase *f, blip2_decoding dec) {
    return (blip2_job){.pixels = f->pixels, .input_ids = f->ids, .n_input_ids = f->n, .dec = dec};
}

static int same_ids(const outcome *a, const outcome *b) {
    return a->code == BLIP2_OK && b->code == BLIP2_OK && a->n == b->n && memcmp(a->ids, b->ids, sizeof(int32_t) * a->n) == 0;
}

/* bf16 on a device rounds activations to 8-bit mantissas before each product (the CPU keeps them
 * in fp32). Beam search prunes to 3 beams every step, and an early near-tie there can change the
 * winner: on an H100 (2026-11-27) tiny-f32-sharded case 4 found another sequence than the fp32
 * golden 11274 x12 (whose final score is 0.34 above the runner-up's: the split was in the pruning).
 * In run 5 tiny-f16 case 1 left its golden too, although that golden's beam is its greedy path.
 * So bf16 beams on a device (g_bf16_device) must match their goldens in all cases but at most one
 * per fixture; each one that differs is printed. Beam search itself is held exactly to the goldens
 * in fp32 and f16 (here and test_decoding). */
static int g_bf16_device;

static void test_goldens(env_t *env, const char *name, fcase *cases, int nc, outcome *solo) {
    blip2_job jobs[64];
    outcome out[64];
    blip2_decoding greedy = blip2_decoding_default();
    greedy.max_new_tokens = 12;
    for (int i = 0; i < nc; i++) { /* one request alone */
        jobs[0] = case_job(&cases[i], greedy);
        CHECK(run_jobs(env, jobs, &solo[i], 1, 0, NULL) == 0, "blocks left in use");
        CHECK(solo[i].code == BLIP2_OK && solo[i].n == 12 && memcmp(solo[i].ids, cases[i].greedy, sizeof(int32_t) * 12) == 0,
              "%s case %d: engine greedy differs from greedy_ids_no_eos_stop", name, i);
    }
    blip2_decoding beam = greedy;
    beam.num_beams = 3;
    for (int i = 0; i < nc; i++) jobs[i] = case_job(&cases[i], beam);
    CHECK(run_jobs(env, jobs, out, nc, 0, NULL) == 0, "blocks left in use after beams");
    int beams_off = 0;
    for (int i = 0; i < nc; i++) {
        const int same = out[i].code == BLIP2_OK && out[i].n == 12 && !memcmp(out[i].ids, cases[i].beam, sizeof(int32_t) * 12);
        if (g_bf16_device) { /* see g_bf16_device */
            CHECK(out[i].code == BLIP2_OK && out[i].n == 12, "%s case %d: beam search failed", name, i);
            if (!same)
                printf("note: %s case %d: bf16 beams differ from the golden (first ids %d %d, golden %d %d)\n", name, i,
                       out[i].ids[0], out[i].ids[1], cases[i].beam[0], cases[i].beam[1]);
            beams_off += !same;
            continue;
        }
        CHECK(same, "%s case %d: beam search differs from generate_beam3_raw", name, i);
    }
    CHECK(beams_off <= 1, "%s: bf16 beams differ from the goldens in %d of %d cases (at most 1 allowed)", name, beams_off,
          nc);
}

/* --quick (the CUDA emulator, where a step costs seconds): 16 concurrent requests instead of 64
 * (still above the GEMV's 8 rows) and 12 instead of 40 in the capacity test. */
static int g_quick;

/* Seeded samples alone vs among others: exact where the backend promises a row the same bits in
 * any batch (ops.h batch_invariant: the host reference; CUDA with BLIP2_BATCH_INVARIANT=1).
 * Elsewhere a draw near a boundary may move with the last bits of the logits, so the count is
 * printed, not checked. Plain greedy rows are checked exactly everywhere (the goldens hold no
 * near-tie). Greedy rows with a repetition penalty have no golden and no such promise: in f16 they
 * are checked exactly too, but bf16's 8-bit mantissas turn the GEMV's and cuBLASLt's different sum
 * orders into logit differences that cross their ties (run 5, H100: 12 to 17 of 21 alike), so
 * there they follow the samples' rule. */
static int exact_samples(const env_t *env, const char *name, const char *what, int same, int of) {
    const blip2_ops *o = env->m->ops;
    if (!o->batch_invariant || o->batch_invariant()) return 1;
    printf("note: %s: %d of %d %s match alone vs in a batch (batch invariance is not promised by default on %s: "
           "BLIP2_BATCH_INVARIANT=1)\n", name, same, of, what, o->name);
    return 0;
}

static void test_batch_invariance(env_t *env, const char *name, fcase *cases, int nc, const outcome *solo) {
    blip2_job jobs[64];
    outcome out[64], alone[8];
    const int many = g_quick ? 16 : 64;
    blip2_decoding greedy = blip2_decoding_default();
    greedy.max_new_tokens = 12;
    for (int i = 0; i < many; i++) jobs[i] = case_job(&cases[i % nc], greedy);
    CHECK(run_jobs(env, jobs, out, many, 1, NULL) == 0, "blocks left in use");
    int same = 0;
    for (int i = 0; i < many; i++) same += same_ids(&out[i], &solo[i % nc]);
    CHECK(same == many, "%s: %d of %d concurrent greedy requests match their solo ids", name, same, many);

    blip2_decoding samp = greedy;
    samp.do_sample = 1, samp.temperature = 0.9f, samp.top_k = 40, samp.top_p = 0.95f, samp.has_seed = 1;
    for (int i = 0; i < many; i++) {
        jobs[i] = case_job(&cases[i % nc], samp);
        jobs[i].dec.seed = 1000 + (uint64_t)i;
    }
    for (int i = 0; i < 8; i++) run_jobs(env, &jobs[i], &alone[i], 1, 0, NULL);
    CHECK(run_jobs(env, jobs, out, many, 1, NULL) == 0, "blocks left in use");
    int same_s = 0, off_greedy = 0;
    for (int i = 0; i < 8; i++) {
        if (getenv("BLIP2_TEST_VERBOSE") && !same_ids(&out[i], &alone[i])) {
            printf("%s: sample %d alone vs in the batch:\n ", name, i);
            for (int t = 0; t < alone[i].n; t++) printf(" %d", alone[i].ids[t]);
            printf("\n ");
            for (int t = 0; t < out[i].n; t++) printf(" %d", out[i].ids[t]);
            printf("\n");
        }
        same_s += same_ids(&out[i], &alone[i]);
        off_greedy += !same_ids(&alone[i], &solo[i % nc]);
    }
    if (exact_samples(env, name, "seeded samples", same_s, 8))
        CHECK(same_s == 8, "%s: %d of 8 seeded samples match alone vs among %d", name, same_s, many);
    CHECK(off_greedy > 0, "%s: sampling never left the greedy path", name);

    /* Repetition penalties go to the backend with the step (each row's distinct history ids):
     * greedy and seeded top-k sampling with a penalty, mixed with plain greedy rows, each as alone. */
    blip2_decoding pen = greedy, pen_s = samp;
    pen.repetition_penalty = 1.5f, pen_s.repetition_penalty = 1.3f;
    outcome pen_solo[8];
    for (int c = 0; c < nc; c++) {
        jobs[0] = case_job(&cases[c], pen);
        run_jobs(env, jobs, &pen_solo[c], 1, 0, NULL);
    }
    for (int i = 0; i < many; i++) {
        jobs[i] = case_job(&cases[i % nc], i % 3 == 0 ? greedy : i % 3 == 1 ? pen : pen_s);
        jobs[i].dec.seed = 2000 + (uint64_t)i;
    }
    for (int i = 2; i < 8; i += 3) run_jobs(env, &jobs[i], &alone[i], 1, 0, NULL);
    CHECK(run_jobs(env, jobs, out, many, 1, NULL) == 0, "blocks left in use");
    int same_g = 0, plain = 0, same_p = 0, penalised = 0, changed = 0, same_ps = 0, sampled = 0;
    for (int i = 0; i < many; i++) {
        if (i % 3 == 2) { /* seeded with a penalty */
            if (i < 8) sampled++, same_ps += same_ids(&out[i], &alone[i]);
        } else if (i % 3 == 1) {
            penalised++, same_p += same_ids(&out[i], &pen_solo[i % nc]);
        } else {
            plain++, same_g += same_ids(&out[i], &solo[i % nc]);
        }
    }
    for (int c = 0; c < nc; c++) changed += !same_ids(&pen_solo[c], &solo[c]);
    CHECK(same_g == plain, "%s: %d of %d plain greedy requests among penalised ones match alone", name, same_g, plain);
    if (!g_bf16_device || exact_samples(env, name, "penalised greedy requests", same_p, penalised))
        CHECK(same_p == penalised, "%s: %d of %d penalised greedy requests match alone vs in the batch", name, same_p,
              penalised);
    if (exact_samples(env, name, "penalised seeded samples", same_ps, sampled))
        CHECK(same_ps == sampled, "%s: %d of %d penalised seeded samples match alone vs in the batch", name, same_ps,
              sampled);
    CHECK(changed > 0, "%s: the repetition penalty never changed a greedy answer", name);
}

/* A cache for 3 requests at a time serves 40, with cancellations and expired deadlines mixed in,
 * and ends with every block free. */
static void test_capacity(env_t *env, const char *name, fcase *cases, const outcome *solo) {
    int per_req = blip2_kv_blocks_for(cases[0].n + 12, 16) + 1;
    env_t small = *env;
    small.o.kv_bytes = blip2_kv_block_bytes(env->m, 16) * (size_t)(3 * per_req);
    blip2_job jobs[40];
    outcome out[40];
    const int n = g_quick ? 12 : 40, n_expired = (n - 5 + 6) / 7; /* every 7th from the 6th */
    blip2_decoding greedy = blip2_decoding_default();
    greedy.max_new_tokens = 12;
    for (int i = 0; i < n; i++) jobs[i] = case_job(&cases[0], greedy);
    for (int i = 5; i < n; i += 7) jobs[i].deadline_ns = blip2_now_ns() - 1; /* already expired */
    memset(out, 0, sizeof out);
    blip2_engine_stats s;
    CHECK(run_jobs(&small, jobs, out, n, 0, &s) == 0, "%s: %d KV blocks still in use", name, s.blocks_in_use);
    int ok = 0, expired = 0;
    for (int i = 0; i < n; i++) {
        if (jobs[i].deadline_ns) expired += out[i].code == BLIP2_EDEADLINE;
        else ok += same_ids(&out[i], &solo[0]);
    }
    CHECK(expired == n_expired && ok == n - n_expired, "%s: capacity: %d correct, %d expired (of %d, %d)", name, ok,
          expired, n - n_expired, n_expired);

    /* cancelled mid-generation: stops, frees its blocks, others unaffected */
    outcome co[6];
    for (int i = 0; i < 6; i++) jobs[i] = case_job(&cases[0], greedy);
    memset(co, 0, sizeof co);
    for (int i = 0; i < 6; i += 2) co[i].cancel_after = 3;
    run_arg a = {jobs, co, 6, 0, NULL};
    drive(&small, submitter, &a, &a.e, &s);
    blip2_status st = {0};
    int cancelled = 0, fine = 0;
    for (int i = 0; i < 6; i++) {
        if (i % 2 == 0) cancelled += co[i].code == BLIP2_ECANCELLED && co[i].tokens_seen < 12;
        else fine += same_ids(&co[i], &solo[0]);
    }
    CHECK(cancelled == 3 && fine == 3 && s.blocks_in_use == 0, "%s: cancel: %d cancelled, %d fine, %d blocks in use", name,
          cancelled, fine, s.blocks_in_use);

    /* a request that can never fit is refused at once; a full queue says busy */
    blip2_engine *e2 = make_engine(&small);
    blip2_job big = case_job(&cases[0], greedy);
    big.dec.max_new_tokens = 1000;
    outcome o;
    blip2_job_callbacks cb = callbacks(&o);
    CHECK(blip2_engine_submit(e2, &big, &cb, &st) == BLIP2_ERANGE, "never-fits: %s", st.msg);
    CHECK_MSG_HAS(st.msg, "KV blocks");
    blip2_engine_destroy(e2);
}

/* The same image bytes again: the vision encoder is skipped and the answer is the same; another
 * prompt on the cached image answers as it does from a fresh encoding. */
static void test_image_cache(env_t *env, const char *name) {
    char path[512];
    snprintf(path, sizeof path, "%s/fixtures/images/chelsea.png", BLIP2_SHARED_DIR);
    uint8_t *img;
    size_t n;
    blip2_status st = {0};
    if (blip2_read_file(path, 1 << 24, &img, &n, &st)) {
        CHECK(0, "%s", st.msg);
        return;
    }
    blip2_decoding greedy = blip2_decoding_default();
    greedy.max_new_tokens = 8;
    blip2_job jobs[3], fresh;
    outcome out[3], fresh_out;
    for (int i = 0; i < 3; i++)
        jobs[i] = (blip2_job){.image = img, .image_len = n, .prompt = "Question: what? Answer:", .prompt_len = 23, .dec = greedy};
    jobs[2].prompt = "a photo of", jobs[2].prompt_len = 10;
    blip2_engine_stats s;
    CHECK(run_jobs(env, jobs, out, 3, -1, &s) == 0, "blocks in use");
    CHECK(!out[0].cached && out[1].cached && out[2].cached, "%s: cached flags %d %d %d", name, out[0].cached, out[1].cached,
          out[2].cached);
    CHECK(s.image_hits == 2 && s.image_misses == 1, "%s: cache hits %llu misses %llu", name, (unsigned long long)s.image_hits,
          (unsigned long long)s.image_misses);
    CHECK(same_ids(&out[0], &out[1]), "%s: the cached image answered differently", name);
    fresh = jobs[2];
    CHECK(run_jobs(env, &fresh, &fresh_out, 1, 0, NULL) == 0, "blocks in use");
    CHECK(same_ids(&fresh_out, &out[2]), "%s: another prompt on the cached image differs from a fresh encoding", name);
    CHECK(out[0].streamed > 0, "%s: nothing streamed", name);
    /* the same image in 4 requests sent together: encoded once, shared by the others */
    blip2_job same[4];
    outcome sout[4];
    for (int i = 0; i < 4; i++) same[i] = jobs[0];
    CHECK(run_jobs(env, same, sout, 4, 0, &s) == 0, "blocks in use");
    int encoded = 0, equal = 0;
    for (int i = 0; i < 4; i++) encoded += !sout[i].cached, equal += same_ids(&sout[i], &out[0]);
    CHECK(encoded == 1 && equal == 4, "%s: 4 requests with one image: %d encodings, %d equal answers", name, encoded, equal);
    free(img);
}

/* Images are encoded beside the steps: while a long request decodes, requests with new images
 * arrive (a few ms apart); steps go on while their images are encoded, and every answer is the
 * one it gets alone. */
typedef struct {
    blip2_engine *e;
    blip2_job *jobs;
    outcome *out;
    int n;
} overlap_arg;

static void *overlap_submitter(void *p) {
    overlap_arg *a = p;
    submit_one(a->e, &a->jobs[0], &a->out[0]);
    while (!__atomic_load_n(&a->out[0].done, __ATOMIC_ACQUIRE) && __atomic_load_n(&a->out[0].tokens_seen, __ATOMIC_ACQUIRE) < 2)
        usleep(200); /* the long one is decoding */
    for (int i = 1; i < a->n; i++) {
        submit_one(a->e, &a->jobs[i], &a->out[i]);
        usleep(2000);
    }
    pthread_mutex_lock(&mu);
    while (n_done < a->n) pthread_cond_wait(&cv, &mu);
    pthread_mutex_unlock(&mu);
    blip2_engine_stop(a->e, 60000);
    return NULL;
}

/* n greedy jobs of 12 tokens over the cases in turn, their outcomes cleared. */
static void greedy_jobs(const fcase *cases, int nc, int n, blip2_job *jobs, outcome *out) {
    blip2_decoding greedy = blip2_decoding_default();
    greedy.max_new_tokens = 12;
    memset(out, 0, sizeof *out * (size_t)n);
    for (int i = 0; i < n; i++) jobs[i] = case_job(&cases[i % nc], greedy);
}

static void test_encode_overlap(env_t *env, const char *name, fcase *cases, int nc, const outcome *solo) {
    enum { N = 9 };
    blip2_job jobs[N];
    outcome out[N];
    greedy_jobs(cases, nc, N, jobs, out);
    jobs[0].dec.max_new_tokens = 40;
    overlap_arg a = {NULL, jobs, out, N};
    blip2_engine_stats s;
    if (drive(env, overlap_submitter, &a, &a.e, &s)) return;
    int equal = 0;
    for (int i = 1; i < N; i++) equal += same_ids(&out[i], &solo[i % nc]);
    CHECK(equal == N - 1 && out[0].code == BLIP2_OK, "%s: overlap: %d of %d answers as alone", name, equal, N - 1);
    if (getenv("BLIP2_TEST_VERBOSE")) printf("%s: %llu of %llu steps while encoding\n", name, (unsigned long long)s.steps_while_encoding, (unsigned long long)s.steps);
    CHECK(s.steps_while_encoding > 0 && s.blocks_in_use == 0,
          "%s: %llu of %llu steps ran while images were encoded (want > 0), %d blocks in use", name,
          (unsigned long long)s.steps_while_encoding, (unsigned long long)s.steps, s.blocks_in_use);
    CHECK(s.host_gaps > 0 && s.host_gaps < s.steps && s.host_gap_ns > 0,
          "%s: %llu host gaps (%lld ns) measured over %llu steps", name, (unsigned long long)s.host_gaps,
          (long long)s.host_gap_ns, (unsigned long long)s.steps);
}

static void *stop_when_done(void *p) {
    blip2_engine *e = p;
    pthread_mutex_lock(&mu);
    while (n_done < 3) pthread_cond_wait(&cv, &mu);
    pthread_mutex_unlock(&mu);
    blip2_engine_stop(e, 60000);
    return NULL;
}

/* hold_for_images_ms: three requests queued before the engine runs, one image a batch. While the
 * second image is encoded one request is ready and two wait for theirs, so no step runs: the first
 * request has not decoded past its first token when the second's first token comes (both prefill
 * in the step after the hold). With hold_share_pct 0 the third image holds the steps too (one
 * waits, two are ready), so the third's first token also comes at the first's first. Answers as
 * alone, every block back. (Without the hold the first decodes beside the encoder, as
 * test_encode_overlap wants.) */
static void test_hold_for_images(env_t *env, const char *name, fcase *cases, int nc, const outcome *solo, int share) {
    enum { N = 3 };
    env_t h = *env;
    h.o.hold_for_images_ms = 60000, h.o.max_images_per_step = 1, h.o.max_step_tokens = 512;
    h.o.hold_share_pct = share;
    blip2_job jobs[N];
    outcome out[N];
    greedy_jobs(cases, nc, N, jobs, out);
    out[1].lead = out[2].lead = &out[0], out[1].lead_at_first = out[2].lead_at_first = -1;
    blip2_engine *e = make_engine(&h);
    if (!e) return;
    n_done = 0;
    for (int i = 0; i < N; i++) submit_one(e, &jobs[i], &out[i]);
    pthread_t t;
    pthread_create(&t, NULL, stop_when_done, e);
    blip2_status st = {0};
    CHECK(blip2_engine_run(e, &st) == BLIP2_OK, "engine: %s", st.msg);
    pthread_join(t, NULL);
    blip2_engine_stats s;
    blip2_engine_get_stats(e, &s);
    blip2_engine_destroy(e);
    int equal = 0;
    for (int i = 0; i < N; i++) equal += same_ids(&out[i], &solo[i % nc]);
    CHECK(equal == N && s.blocks_in_use == 0, "%s: hold: %d of %d answers as alone, %d blocks in use", name, equal, N,
          s.blocks_in_use);
    CHECK(out[1].lead_at_first == 1, "%s: hold: the first request had %d tokens when the second's first came (want 1)",
          name, out[1].lead_at_first);
    CHECK(share > 0 || out[2].lead_at_first == 1,
          "%s: hold share 0: the first request had %d tokens when the third's first came (want 1)", name,
          out[2].lead_at_first);
}

/* Stop strings are checked while the next step already runs: a request a stop string ends is in
 * that step, and its row there must be dropped. Its answer ends exactly at the token that
 * completes the stop string (as many tokens streamed as returned), the others in the batch are
 * unaffected, and every block comes back. */
static void test_stop_strings(env_t *env, const char *name, fcase *cases, const outcome *solo) {
    if (!env->in->tok) return;
    blip2_decoding greedy = blip2_decoding_default();
    greedy.max_new_tokens = 3;
    blip2_job first3 = case_job(&cases[0], greedy);
    outcome o3;
    memset(&o3, 0, sizeof o3);
    CHECK(run_jobs(env, &first3, &o3, 1, 0, NULL) == 0, "blocks in use");
    CHECK(o3.code == BLIP2_OK && o3.n == 3 && o3.streamed > 0, "%s: 3 tokens with text (got %d, %zu bytes)", name, o3.n,
          o3.streamed);
    char stop[512];
    memcpy(stop, o3.text, o3.streamed);
    stop[o3.streamed] = 0;
    const char *stops[] = {stop};
    enum { N = 6 };
    blip2_job jobs[N];
    outcome out[N];
    greedy.max_new_tokens = 12;
    for (int i = 0; i < N; i++) jobs[i] = case_job(&cases[0], greedy);
    for (int i = 0; i < N; i += 2) jobs[i].stop = stops, jobs[i].n_stop = 1;
    blip2_engine_stats s;
    CHECK(run_jobs(env, jobs, out, N, 0, &s) == 0, "%s: stop strings: %d blocks in use", name, s.blocks_in_use);
    for (int i = 0; i < N; i++) {
        if (i % 2 == 0)
            CHECK(out[i].code == BLIP2_OK && out[i].finish == BLIP2_FINISH_STOP && out[i].n == 3 &&
                      memcmp(out[i].ids, o3.ids, sizeof(int32_t) * 3) == 0 && out[i].tokens_seen == 3,
                  "%s: request %d with stop '%s': finish %d, %d ids, %d streamed (want stop, 3, 3)", name, i, stop,
                  out[i].finish, out[i].n, out[i].tokens_seen);
        else
            CHECK(same_ids(&out[i], &solo[0]) && out[i].tokens_seen == 12, "%s: request %d without stop strings differs",
                  name, i);
    }
}

/* test_engine [--device cpu|cuda] [--dtype f32|f16|bf16] [--quick]: the same checks on another backend. */
int main(int argc, char **argv) {
    const char *device = "cpu";
    int wdtype = BLIP2_W_F32;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--quick")) g_quick = 1;
        else if (!strcmp(argv[i], "--device") && i + 1 < argc) device = argv[++i];
        else if (!strcmp(argv[i], "--dtype") && i + 1 < argc) wdtype = blip2_wdtype_parse(argv[++i]);
        else return fprintf(stderr, "usage: test_engine [--device cpu|cuda] [--dtype f32|f16|bf16] [--quick]\n"), 2;
    }
    blip2_device dev;
    blip2_status dst = {0};
    if (wdtype < 0 || blip2_device_open(device, 0, &dev, &dst)) {
        if (dst.code == BLIP2_EUNAVAILABLE) return printf("skipped: no GPU (%s)\n", dst.msg), 0;
        return fprintf(stderr, "test_engine: %s\n", wdtype < 0 ? "bad --dtype" : dst.msg), 2;
    }
    printf("device %s, weights %s\n", dev.name, blip2_wdtype_name(wdtype));
    g_bf16_device = wdtype == BLIP2_W_BF16 && strcmp(device, "cpu") != 0;
    char path[512];
    snprintf(path, sizeof path, "%s/fixtures/MANIFEST.json", BLIP2_SHARED_DIR);
    json_error_t err;
    json_t *manifest = json_load_file(path, 0, &err);
    snprintf(path, sizeof path, "%s/fixtures/pixel_values.safetensors", BLIP2_SHARED_DIR);
    blip2_st_file px;
    blip2_status st = {0};
    if (!manifest || blip2_st_open(path, &px, &st)) {
        CHECK(0, "fixtures: %s", st.msg);
        return check_summary();
    }
    srand(7);
    const char *names[] = {"tiny-f32-sharded", "tiny-f16"};
    for (int k = 0; k < 2; k++) {
        char dir[512];
        snprintf(dir, sizeof dir, "%s/fixtures/%s", BLIP2_SHARED_DIR, names[k]);
        blip2_model m;
        blip2_inputs in;
        if (blip2_model_load(dir, &m, &st) || blip2_model_to_backend(&m, dev.ops, wdtype, 0, &st) ||
            blip2_inputs_load(dir, &m.cfg, &in, &st)) {
            CHECK(0, "%s: %s", names[k], st.msg);
            continue;
        }
        env_t env = {&m, &in, blip2_tp_from_comm(blip2_comm_self()), blip2_engine_opts_default()};
        env.o.kv_bytes = 64 << 20;
        env.o.max_step_tokens = 96; /* forces chunked prefill of the 45-token prompts alongside decodes */
        env.o.image_cache_bytes = 8 << 20;
        fcase cases[8];
        outcome solo[8];
        int nc = load_cases(manifest, names[k], &px, cases);
        test_goldens(&env, names[k], cases, nc, solo);
        test_batch_invariance(&env, names[k], cases, nc, solo);
        test_capacity(&env, names[k], cases, solo);
        test_image_cache(&env, names[k]);
        test_encode_overlap(&env, names[k], cases, nc, solo);
        test_hold_for_images(&env, names[k], cases, nc, solo, 100);
        test_hold_for_images(&env, names[k], cases, nc, solo, 0);
        test_stop_strings(&env, names[k], cases, solo);
        for (int i = 0; i < nc; i++) free(cases[i].ids);
        blip2_inputs_free(&in);
        blip2_model_free(&m);
    }
    blip2_st_close(&px);
    json_decref(manifest);
    blip2_device_close(&dev);
    return check_summary();
}
