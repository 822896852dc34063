/* CPU engine benchmark: per-stage times of one image + one prompt through the fp32 forward, peak
 * RSS, and the vision encoder's matmul throughput as a fraction of this machine's own cblas_sgemm
 * peak, measured in the same run. See bench/README.md for the commands and bench/RESULTS.md for
 * numbers.
 *
 *   bench_engine --model DIR [--prompt-len N] [--new-tokens N] [--runs N] [--seed N] [--json]
 *
 * Stages (each timed on its own, median over --runs):
 *   vision    pixels [3, H, W] (random, fixed seed) → image embeddings [T, Cv]
 *   qformer   → query outputs [Q, Cq]
 *   project   → language_projection [Q, Ct]
 *   prefill   the OPT forward (input embeddings included) of the whole prompt (Q image tokens, BOS, random
 *             text ids: --prompt-len in all, default 45 = 32 + 1 + 12) → logits of the last position
 *   decode    per new token: argmax, then a 1-token OPT forward (embedding included) with the KV cache.
 *             Never stops early at eos: exactly --new-tokens steps are timed, and the mean is given. */
#include <cblas.h>
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "forward.h"
#include "model.h"
#include "ops.h"

typedef struct {
    const char *model;
    int prompt_len, new_tokens, runs, json;
    uint64_t seed;
} bench_args;

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

static uint64_t rng_next(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static float rng_uniform(uint64_t *s, float lo, float hi) {
    return lo + (hi - lo) * (float)((rng_next(s) >> 40) * (1.0 / 16777216.0));
}

static int parse_int(const char *s, int lo, int hi, int *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) return -1;
    *out = (int)v;
    return 0;
}

static void usage(FILE *f) {
    fprintf(f, "usage: bench_engine --model DIR [--prompt-len N (default 45)] [--new-tokens N (default 16)]\n"
               "                    [--runs N (default 1)] [--seed N (default 1)] [--json]\n");
}

static int parse_args(int argc, char **argv, bench_args *a) {
    *a = (bench_args){NULL, 45, 16, 1, 0, 1};
    for (int i = 1; i < argc; i++) {
        const char *o = argv[i];
        int v;
        if (!strcmp(o, "--json")) {
            a->json = 1;
            continue;
        }
        if (!strcmp(o, "--help") || !strcmp(o, "-h")) {
            usage(stdout);
            exit(0);
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "bench_engine: %s needs a value\n", o);
            return -1;
        }
        const char *val = argv[++i];
        if (!strcmp(o, "--model")) a->model = val;
        else if (!strcmp(o, "--prompt-len") && !parse_int(val, 1, 1 << 20, &v)) a->prompt_len = v;
        else if (!strcmp(o, "--new-tokens") && !parse_int(val, 1, 1 << 20, &v)) a->new_tokens = v;
        else if (!strcmp(o, "--runs") && !parse_int(val, 1, 1000, &v)) a->runs = v;
        else if (!strcmp(o, "--seed") && !parse_int(val, 0, 2147483647, &v)) a->seed = (uint64_t)v;
        else {
            fprintf(stderr, "bench_engine: bad option or value: %s %s\n", o, val);
            return -1;
        }
    }
    if (!a->model) {
        fprintf(stderr, "bench_engine: --model DIR is required\n");
        return -1;
    }
    return 0;
}

/* ---- memory ---- */
static double peak_rss_mb(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_maxrss / 1024.0; /* kB on Linux */
}

/* RssAnon / RssFile now (MiB), from /proc/self/status: what the process holds itself versus the
 * checkpoint's memory-mapped pages (page cache the kernel can drop). -1 where unavailable. */
static void rss_split_mb(double *anon, double *file) {
    *anon = *file = -1;
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return;
    char line[256];
    long kb;
    while (fgets(line, sizeof line, f)) {
        if (sscanf(line, "RssAnon: %ld kB", &kb) == 1) *anon = kb / 1024.0;
        else if (sscanf(line, "RssFile: %ld kB", &kb) == 1) *file = kb / 1024.0;
    }
    fclose(f);
}

/* ---- the machine's sgemm peak: best over sizes and repeats of C = A·Bᵀ (the layout blip2_matmul
 * uses), n×n×n, 2n³ flops. ---- */
typedef struct {
    double gflops;
    int n;
} sgemm_peak;

static sgemm_peak measure_sgemm_peak(uint64_t seed) {
    static const int sizes[] = {1024, 1536, 2048};
    sgemm_peak best = {0, 0};
    int nmax = 2048;
    float *a = malloc(sizeof(float) * nmax * nmax), *b = malloc(sizeof(float) * nmax * nmax),
          *c = malloc(sizeof(float) * nmax * nmax);
    if (!a || !b || !c) {
        free(a), free(b), free(c);
        return best;
    }
    uint64_t s = seed ^ 0xb1a52u;
    for (size_t i = 0; i < (size_t)nmax * nmax; i++) a[i] = rng_uniform(&s, -1, 1), b[i] = rng_uniform(&s, -1, 1);
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
        int n = sizes[k];
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, n, 1.0f, a, n, b, n, 0.0f, c, n); /* warm-up */
        for (int r = 0; r < 4; r++) {
            double t0 = now_ms();
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, n, 1.0f, a, n, b, n, 0.0f, c, n);
            double ms = now_ms() - t0;
            double g = 2.0 * n * n * (double)n / (ms * 1e6);
            if (g > best.gflops) best = (sgemm_peak){g, n};
        }
    }
    free(a), free(b), free(c);
    return best;
}

/* ---- FLOPs of the vision encoder from the config (a multiply-add = 2) ---- */
typedef struct {
    double linear;    /* patch embedding + qkv, proj, fc1, fc2 of every layer (sgemm) */
    double attention; /* q·kᵀ and p·v of every head of every layer */
} vision_flops;

static vision_flops count_vision_flops(const blip2_config *cfg) {
    const blip2_vision_config *v = &cfg->vision;
    double T = v->T, C = v->C, mlp = v->mlp, P = v->P, K = (double)v->channels * v->patch_size * v->patch_size;
    vision_flops f;
    f.linear = 2.0 * P * K * C + v->layers * 2.0 * T * C * (3 * C + C + mlp + mlp);
    f.attention = v->layers * 4.0 * T * T * C;
    return f;
}

/* ---- one pass: image → prompt → new tokens ---- */
typedef struct {
    double vision, qformer, project, prefill, decode_per_token;
} stage_ms;

typedef struct {
    float *pixels, *image, *query_out, *projected, *full, *logits;
    int32_t *ids, *marked;
} bufs;

static blip2_code one_pass(const blip2_model *m, const blip2_tp *tp, const bench_args *a, bufs *b, stage_ms *t,
                           int32_t *last_id, blip2_status *st) {
    const blip2_config *c = &m->cfg;
    double t0 = now_ms();
    blip2_code rc = blip2_vision_forward(m, b->pixels, 1, b->image, st);
    if (rc) return rc;
    double t1 = now_ms();
    rc = blip2_qformer_forward(m, b->image, 1, b->query_out, st);
    if (rc) return rc;
    double t2 = now_ms();
    rc = blip2_project(m, b->query_out, 1, b->projected, st);
    if (rc) return rc;
    double t3 = now_ms();
    t->vision = t1 - t0;
    t->qformer = t2 - t1;
    t->project = t3 - t2;

    blip2_kv_cache kv;
    memset(&kv, 0, sizeof kv);
    rc = blip2_kv_cache_init(&kv, m, a->prompt_len + a->new_tokens, st);
    if (rc) return rc;
    t0 = now_ms();
    blip2_opt_mark_image_rows(c, b->ids, a->prompt_len, b->marked);
    rc = blip2_opt_forward(m, tp, &kv, b->marked, a->prompt_len, b->projected, b->logits, st);
    t1 = now_ms();
    t->prefill = t1 - t0;
    int32_t id = 0;
    for (int i = 0; !rc && i < a->new_tokens; i++) {
        rc = blip2_tp_gather_logits(m, tp, b->logits, b->full, st);
        id = blip2_argmax(b->full, c->opt.V);
        if (!rc) rc = blip2_opt_forward(m, tp, &kv, &id, 1, NULL, b->logits, st);
    }
    t2 = now_ms();
    t->decode_per_token = (t2 - t1) / a->new_tokens;
    if (!rc) rc = blip2_tp_gather_logits(m, tp, b->logits, b->full, st);
    if (!rc) id = blip2_argmax(b->full, c->opt.V);
    *last_id = id;
    blip2_kv_cache_free(&kv);
    return rc;
}

static int cmp_double(const void *x, const void *y) {
    double p = *(const double *)x, q = *(const double *)y;
    return p < q ? -1 : p > q;
}
static double median(double *v, int n) {
    qsort(v, n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

int main(int argc, char **argv) {
    bench_args a;
    if (parse_args(argc, argv, &a)) {
        usage(stderr);
        return 2;
    }
    blip2_status st = {0};
    blip2_model m;
    double t0 = now_ms();
    if (blip2_model_load(a.model, &m, &st)) {
        fprintf(stderr, "bench_engine: %s\n", st.msg);
        return 1;
    }
    double load_ms = now_ms() - t0;
    double anon_load, file_load;
    rss_split_mb(&anon_load, &file_load);
    double rss_after_load = peak_rss_mb();
    const blip2_config *c = &m.cfg;

    if (a.prompt_len < c->Q + 1 || a.prompt_len + a.new_tokens > c->opt.max_pos) {
        fprintf(stderr, "bench_engine: --prompt-len must be at least %d (Q image tokens + BOS) and prompt + new tokens at most %d\n",
                c->Q + 1, c->opt.max_pos);
        blip2_model_free(&m);
        return 2;
    }

    blip2_comm *comm = blip2_comm_self();
    blip2_tp tp = blip2_tp_from_comm(comm);

    size_t npix = blip2_image_floats(&c->vision);
    bufs b = {
        .pixels = malloc(sizeof(float) * npix),
        .image = malloc(sizeof(float) * c->vision.T * c->vision.C),
        .query_out = malloc(sizeof(float) * c->Q * c->qformer.C),
        .projected = malloc(sizeof(float) * c->Q * c->opt.C),
        .full = malloc(sizeof(float) * (size_t)c->opt.V),
        .marked = malloc(sizeof(int32_t) * (size_t)a.prompt_len),
        .logits = malloc(sizeof(float) * (size_t)m.shard.V),
        .ids = malloc(sizeof(int32_t) * a.prompt_len),
    };
    if (!b.pixels || !b.image || !b.query_out || !b.projected || !b.full || !b.marked || !b.logits || !b.ids) {
        fprintf(stderr, "bench_engine: out of memory\n");
        return 1;
    }
    /* Pixels: uniform over the CLIP-normalised range; ids: Q image tokens, BOS, random text ids
     * below the special ones. */
    uint64_t s = a.seed;
    for (size_t i = 0; i < npix; i++) b.pixels[i] = rng_uniform(&s, -1.8f, 2.2f);
    int text_hi = c->opt.V < 50000 ? c->opt.V : 50000;
    for (int i = 0; i < a.prompt_len; i++) {
        if (i < c->Q) b.ids[i] = c->image_token_id;
        else if (i == c->Q) b.ids[i] = c->bos_id;
        else {
            int32_t id;
            do id = 3 + (int32_t)(rng_next(&s) % (uint64_t)(text_hi - 3));
            while (id == c->eos_id || id == c->image_token_id || id == c->pad_id || id == c->bos_id);
            b.ids[i] = id;
        }
    }

    double *tv = calloc(a.runs, sizeof(double)), *tq = calloc(a.runs, sizeof(double)), *tpj = calloc(a.runs, sizeof(double)),
           *tpf = calloc(a.runs, sizeof(double)), *tdc = calloc(a.runs, sizeof(double));
    int32_t last_id = -1;
    for (int r = 0; r < a.runs; r++) {
        stage_ms t;
        if (one_pass(&m, &tp, &a, &b, &t, &last_id, &st)) {
            fprintf(stderr, "bench_engine: run %d: %s\n", r, st.msg);
            return 1;
        }
        tv[r] = t.vision, tq[r] = t.qformer, tpj[r] = t.project, tpf[r] = t.prefill, tdc[r] = t.decode_per_token;
        if (!a.json)
            fprintf(stderr, "run %d: vision %.1f ms, qformer %.1f ms, project %.2f ms, prefill %.1f ms, decode %.1f ms/token\n",
                    r, t.vision, t.qformer, t.project, t.prefill, t.decode_per_token);
    }
    double vision_ms = median(tv, a.runs), qformer_ms = median(tq, a.runs), project_ms = median(tpj, a.runs);
    double prefill_ms = median(tpf, a.runs), decode_ms = median(tdc, a.runs);
    double vision_min = tv[0];

    vision_flops vf = count_vision_flops(c);
    double vision_gflop = (vf.linear + vf.attention) * 1e-9;
    double vision_gflops = vision_gflop / (vision_ms * 1e-3);
    double vision_linear_gflops = vf.linear * 1e-9 / (vision_ms * 1e-3);
    double anon_end, file_end;
    rss_split_mb(&anon_end, &file_end);
    double peak_rss = peak_rss_mb(); /* the engine's, read before the sgemm test's 48 MB of buffers */
    sgemm_peak peak = measure_sgemm_peak(a.seed);
    double frac = peak.gflops > 0 ? vision_gflops / peak.gflops : 0;
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    int blas_threads = openblas_get_num_threads();
    const char *dtype = blip2_dtype_name(m.dtype);

    if (a.json) {
        printf("{\"model\":\"%s\",\"dtype\":\"%s\",\"vision\":{\"C\":%d,\"layers\":%d,\"T\":%d},\"opt\":{\"C\":%d,\"layers\":%d,"
               "\"V\":%d},\"prompt_len\":%d,\"new_tokens\":%d,\"runs\":%d,\"cpus\":%ld,\"blas_threads\":%d,"
               "\"load_ms\":%.1f,\"vision_ms\":%.3f,\"qformer_ms\":%.3f,\"project_ms\":%.3f,\"prefill_ms\":%.3f,"
               "\"decode_ms_per_token\":%.3f,\"peak_rss_mb\":%.1f,\"rss_anon_mb\":%.1f,\"rss_file_mb\":%.1f,"
               "\"vision_gflop\":%.3f,\"vision_gflops\":%.3f,\"vision_linear_gflops\":%.3f,\"sgemm_peak_gflops\":%.3f,"
               "\"sgemm_peak_n\":%d,\"vision_frac_of_sgemm_peak\":%.4f,\"last_id\":%d}\n",
               a.model, dtype, c->vision.C, c->vision.layers, c->vision.T, c->opt.C, c->opt.layers, c->opt.V, a.prompt_len,
               a.new_tokens, a.runs, ncpu, blas_threads, load_ms, vision_ms, qformer_ms, project_ms, prefill_ms, decode_ms,
               peak_rss, anon_end, file_end, vision_gflop, vision_gflops, vision_linear_gflops, peak.gflops, peak.n, frac,
               last_id);
    } else {
        printf("bench_engine: %s (%s weights, fp32 compute)\n", a.model, dtype);
        printf("  vision C=%d layers=%d T=%d | Q-Former C=%d layers=%d | OPT C=%d layers=%d V=%d\n", c->vision.C,
               c->vision.layers, c->vision.T, c->qformer.C, c->qformer.layers, c->opt.C, c->opt.layers, c->opt.V);
        printf("  %ld CPUs online, OpenBLAS %d threads; prompt %d tokens (%d image + BOS + %d text), %d new tokens, %d run(s)\n",
               ncpu, blas_threads, a.prompt_len, c->Q, a.prompt_len - c->Q - 1, a.new_tokens, a.runs);
        printf("  %-34s %12s\n", "stage", a.runs > 1 ? "median" : "value");
        printf("  %-34s %12.1f ms\n", "load (incl. F16/BF16 -> fp32)", load_ms);
        printf("  %-34s %12.1f ms%s\n", "vision / image", vision_ms, a.runs > 1 ? "" : "");
        if (a.runs > 1) printf("  %-34s %12.1f ms\n", "vision / image (best)", vision_min);
        printf("  %-34s %12.2f ms\n", "Q-Former", qformer_ms);
        printf("  %-34s %12.3f ms\n", "projection", project_ms);
        printf("  %-34s %12.1f ms\n", "prefill (prompt)", prefill_ms);
        printf("  %-34s %12.2f ms\n", "decode / token", decode_ms);
        printf("  %-34s %12.1f MiB (after load %.1f; now anon %.1f + file-backed %.1f)\n", "peak RSS", peak_rss,
               rss_after_load, anon_end, file_end);
        printf("  %-34s %12.2f GFLOP (linear %.2f + attention %.2f)\n", "vision matmul work", vision_gflop, vf.linear * 1e-9,
               vf.attention * 1e-9);
        printf("  %-34s %12.2f GFLOP/s (linear layers alone: %.2f)\n", "vision achieved", vision_gflops,
               vision_linear_gflops);
        printf("  %-34s %12.2f GFLOP/s (best of n = 1024, 1536, 2048; at n = %d)\n", "cblas_sgemm peak (this run)",
               peak.gflops, peak.n);
        printf("  %-34s %12.1f %%\n", "vision / sgemm peak", 100.0 * frac);
    }

    free(tv), free(tq), free(tpj), free(tpf), free(tdc);
    free(b.pixels), free(b.image), free(b.query_out), free(b.projected), free(b.full), free(b.marked), free(b.logits), free(b.ids);
    comm->ops->free(comm);
    blip2_model_free(&m);
    return 0;
}
