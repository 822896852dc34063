/* Op tests, in the manner of llama.cpp's test-backend-ops: a TABLE of cases (op, shape, tolerance,
 * a setup that draws fresh random inputs and computes an independent naive double-precision
 * reference, and an exec that runs the op under test through a backend). Every case is run
 * against every backend: the CPU reference (blip2_cpu_ops, kernels/cpu/ops.c) and, in CUDA builds
 * on a machine with a GPU, blip2_cuda_ops (kernels/cuda/ops.cu). A device backend's alloc, upload
 * and download move each guarded buffer WHOLE (guards included) to the device and back, so the same
 * guard, NaN and reference checks apply to it unchanged. Without a GPU the CUDA backend prints
 * "cuda: skipped: no GPU (<reason>)" and the CPU result decides.
 *
 * What each case checks:
 *  - the output against the double reference: relative L2 <= tol (tol 0: bitwise equal, for the
 *    ops that only move or add numbers), over every row, or over a spread sample of rows when the
 *    naive reference would be slow (--full checks every row). A case may have a looser bound for
 *    device backends (tol_dev: the CUDA 16-bit matmul rounds its fp32 inputs to 16 bits);
 *  - no NaN or Inf anywhere in the output (NaN compares false, so it is counted explicitly; the
 *    output is pre-filled with a signalling-NaN sentinel, so an element the op forgot to write is
 *    caught the same way);
 *  - guard regions before and after every buffer still hold the sentinel (out-of-bounds writes),
 *    and every input buffer, strided padding included, is bit-for-bit unchanged. Padding columns of
 *    strided inputs, rows past the logical end of a KV buffer, and paged-pool rows no block table
 *    reaches hold quiet NaN, so an op that reads outside its logical input puts NaN into its
 *    output and fails;
 *  - ops with a second output (residual_layernorm's res, kv_write's v pool) check it too, and
 *    argmax_rows checks index and value per row (its all-NaN rows must give index 0 and NaN);
 *  - a backend error reported by ops->sync fails the case.
 *
 * Usage: test_ops [--perf [--reps N]] [--full] [--op NAME] [--backend NAME] [--seed N]
 *   --perf  also time each case (median of N runs, ops->sync around each; the reference is not
 *           timed) and print GFLOP/s and GB/s where meaningful (16-bit matmuls at T=1 are weight
 *           streaming: their GB/s is the GEMV bandwidth). Without it the test only checks. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "check.h"
#include "ops.h"
#ifdef BLIP2_HAVE_CUDA
#include "cuda/context.h"
#endif

/* ------------------------------------------------------------------------------------------------
 * Options and random numbers. */
static int g_perf, g_full, g_reps = 7;
static const char *g_only, *g_backend;

/* Whether --op (one name, or names separated by commas) selects op; no --op: every op. */
static int op_selected(const char *op) {
    if (!g_only) return 1;
    size_t n = strlen(op);
    for (const char *p = g_only; *p;) {
        const char *e = strchr(p, ',');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        if (len == n && !strncmp(p, op, n)) return 1;
        if (!e) break;
        p = e + 1;
    }
    return 0;
}
static uint64_t g_seed = 20240611;

static uint64_t rng_u64(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static double rng_unit(uint64_t *s) { return ((rng_u64(s) >> 11) + 0.5) * (1.0 / 9007199254740992.0); }
static float rng_uniform(uint64_t *s, float lo, float hi) { return lo + (hi - lo) * (float)rng_unit(s); }
static float rng_normal(uint64_t *s) {
    return (float)(sqrt(-2.0 * log(rng_unit(s))) * cos(6.283185307179586 * rng_unit(s)));
}
static int rng_int(uint64_t *s, int n) { return (int)(rng_u64(s) % (uint64_t)n); }

static void fill_uniform(uint64_t *s, float *x, size_t n, float lo, float hi) {
    const float k = (hi - lo) / 16777216.0f;
    for (size_t i = 0; i < n; i += 2) {
        uint64_t r = rng_u64(s);
        x[i] = lo + k * ((float)(r >> 40) + 0.5f);
        if (i + 1 < n) x[i + 1] = lo + k * ((float)((r >> 8) & 0xFFFFFF) + 0.5f);
    }
}
static void fill_normal(uint64_t *s, float *x, size_t n, float mean, float std) {
    for (size_t i = 0; i < n; i++) x[i] = mean + std * rng_normal(s);
}
static void shuffle_i32(uint64_t *s, int32_t *v, int n) {
    for (int i = n - 1; i > 0; i--) {
        int j = rng_int(s, i + 1);
        int32_t t = v[i];
        v[i] = v[j], v[j] = t;
    }
}

/* 16-bit conversions, written here independently of kernels/cpu/ops.c (round to nearest even). */
static uint16_t t_f32_to_bf16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40);
    return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1)) >> 16);
}
static uint16_t t_f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return sign | 0x7e00;
    if (ax >= 0x477ff000u) return sign | 0x7c00; /* >= 65520 rounds to infinity */
    if (ax < 0x38800000u) {                      /* below 2^-14: a multiple of 2^-24 */
        float a;
        memcpy(&a, &ax, 4);
        return sign | (uint16_t)nearbyint((double)a * 16777216.0);
    }
    return sign | (uint16_t)((ax + 0xfffu + ((ax >> 13) & 1) - (112u << 23)) >> 13);
}
static float t_f16_to_f32(uint16_t h) {
    int e = (h >> 10) & 0x1f, m = h & 0x3ff;
    float v = e == 0 ? ldexpf((float)m, -24) : e == 31 ? (m ? NAN : INFINITY) : ldexpf((float)(m | 0x400), e - 25);
    return (h & 0x8000) ? -v : v;
}
static float t_bf16_to_f32(uint16_t b) {
    uint32_t x = (uint32_t)b << 16;
    float f;
    memcpy(&f, &x, 4);
    return f;
}
static uint16_t t_to16(float f, int wdtype) { return wdtype == BLIP2_W_F16 ? t_f32_to_f16(f) : t_f32_to_bf16(f); }
static float t_from16(uint16_t h, int wdtype) { return wdtype == BLIP2_W_F16 ? t_f16_to_f32(h) : t_bf16_to_f32(h); }
static const char *wd_name(int wdtype) { return wdtype == BLIP2_W_F32 ? "f32" : wdtype == BLIP2_W_F16 ? "f16" : "bf16"; }

/* ------------------------------------------------------------------------------------------------
 * Guarded buffers. Each is GUARD words, n payload words, GUARD words (a word is 4 bytes: float or
 * int32, or two 16-bit values). Guards and the payload of outputs start as a signalling-NaN
 * sentinel. After setup the whole block is copied to `pristine`; that copy is what is uploaded,
 * what guards are compared to, what inputs must still equal afterwards, and what in/out buffers are
 * reset to between timed runs. */
#define GUARD 64
#define SENTINEL 0x7FA5A5A5u /* exponent all ones, quiet bit clear, mantissa non-zero: a signalling NaN */
#define MAXBUF 10

enum { B_IN, B_OUT, B_INOUT, B_SCRATCH };

typedef struct {
    int role;
    size_t n;
    uint32_t *host, *pristine;
    void *dev; /* device copy of the whole block (NULL on host backends) */
} gbuf;

struct op_case;

typedef struct {
    const struct op_case *c;
    const blip2_ops *be;
    uint64_t rng;
    char desc[160];
    gbuf b[MAXBUF];
    int nb;
    int a[16];           /* buffer indices and derived ints, set by setup for exec */
    int out;             /* the checked output buffer, -1 when extra does all the checking */
    int out_type;        /* its element type (BLIP2_W_*; 16-bit outputs are widened to compare) */
    int rows, row_len;   /* the output as rows × row_len, for sampled checking */
    int row_step;        /* rows r with r % row_step == 0, and the last row, have a reference */
    double *ref;         /* [rows × row_len], filled on the checked rows */
    int out2;            /* a second output (of out2_type) checked in full against ref2 (-1: none) */
    int out2_type;
    size_t n2;
    double *ref2, tol2;
    void *aux;           /* setup's data for extra (freed with the case) */
    double flops, bytes; /* per exec, for --perf */
} op_ctx;

typedef struct op_case {
    const char *op;
    const char *note;
    void (*setup)(op_ctx *);
    void (*exec)(op_ctx *);
    void (*extra)(op_ctx *); /* optional checks beyond the generic ones (runs on the host copies) */
    int p[12];
    float f;        /* eps, scale or amplitude, per op */
    double tol;     /* relative L2 bound; 0 = bitwise equal */
    double tol_dev; /* the bound on device backends, when looser (0: tol) */
    float f2;       /* a second float parameter, per op */
} op_case;

static double case_tol(const op_ctx *x) {
    return x->be->device && x->c->tol_dev > 0 ? x->c->tol_dev : x->c->tol;
}

/* Σ a[i]·b[i] in double (four partial sums: the references are not timed, but they run under ASan). */
static double dot_d(const float *a, const float *b, int n) {
    double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        s0 += (double)a[i] * b[i];
        s1 += (double)a[i + 1] * b[i + 1];
        s2 += (double)a[i + 2] * b[i + 2];
        s3 += (double)a[i + 3] * b[i + 3];
    }
    for (; i < n; i++) s0 += (double)a[i] * b[i];
    return (s0 + s1) + (s2 + s3);
}

static void *xmalloc(size_t bytes) {
    void *p = malloc(bytes ? bytes : 1);
    if (!p) {
        fprintf(stderr, "test_ops: out of memory (%zu bytes)\n", bytes);
        exit(2);
    }
    return p;
}

static int buf_new(op_ctx *x, int role, size_t n) {
    if (x->nb == MAXBUF) {
        fprintf(stderr, "test_ops: too many buffers in one case\n");
        exit(2);
    }
    gbuf *g = &x->b[x->nb];
    g->role = role;
    g->n = n;
    size_t words = n + 2 * GUARD;
    g->host = xmalloc(words * 4);
    /* Inputs' payload is written in full by setup; only outputs and scratch need the sentinel. */
    int fill_payload = role == B_OUT || role == B_SCRATCH;
    for (size_t i = 0; i < words; i++)
        if (fill_payload || i < GUARD || i >= GUARD + n) g->host[i] = SENTINEL;
    return x->nb++;
}
/* A buffer of n elements of wdtype (16-bit elements two to a word; an odd tail half is zero). */
static int buf_new_w(op_ctx *x, int role, size_t n, int wdtype) {
    size_t words = wdtype == BLIP2_W_F32 ? n : (n + 1) / 2;
    int b = buf_new(x, role, words);
    if (wdtype != BLIP2_W_F32 && (n & 1) && role != B_OUT && role != B_SCRATCH) x->b[b].host[GUARD + words - 1] = 0;
    return b;
}

static float *H(op_ctx *x, int i) { return (float *)(x->b[i].host + GUARD); }
static int32_t *HI(op_ctx *x, int i) { return (int32_t *)(x->b[i].host + GUARD); }
static uint16_t *H16(op_ctx *x, int i) { return (uint16_t *)(x->b[i].host + GUARD); }
static float *D(op_ctx *x, int i) {
    return x->b[i].dev ? (float *)((uint32_t *)x->b[i].dev + GUARD) : (float *)(x->b[i].host + GUARD);
}
static int32_t *DI(op_ctx *x, int i) { return (int32_t *)D(x, i); }
static uint16_t *D16(op_ctx *x, int i) { return (uint16_t *)D(x, i); }

/* Element i of buffer b of type wdtype, as a float. */
static float elem(op_ctx *x, int b, int wdtype, size_t i) {
    return wdtype == BLIP2_W_F32 ? H(x, b)[i] : t_from16(H16(x, b)[i], wdtype);
}

static void buf_upload(op_ctx *x, int i) {
    gbuf *g = &x->b[i];
    size_t bytes = (g->n + 2 * GUARD) * 4;
    if (g->dev) x->be->upload(g->dev, g->pristine, bytes);
    else memcpy(g->host, g->pristine, bytes);
}

static void ctx_commit(op_ctx *x) {
    for (int i = 0; i < x->nb; i++) {
        gbuf *g = &x->b[i];
        size_t bytes = (g->n + 2 * GUARD) * 4;
        g->pristine = xmalloc(bytes);
        memcpy(g->pristine, g->host, bytes);
        if (x->be->device) {
            g->dev = x->be->alloc(bytes);
            if (!g->dev) {
                fprintf(stderr, "test_ops: %s: device allocation of %zu bytes failed\n", x->be->name, bytes);
                exit(2);
            }
        }
        buf_upload(x, i);
    }
}

static void ctx_download(op_ctx *x) {
    for (int i = 0; i < x->nb; i++) {
        gbuf *g = &x->b[i];
        if (g->dev) x->be->download(g->host, g->dev, (g->n + 2 * GUARD) * 4);
    }
}

static void ctx_free(op_ctx *x) {
    for (int i = 0; i < x->nb; i++) {
        if (x->b[i].dev) x->be->release(x->b[i].dev);
        free(x->b[i].host);
        free(x->b[i].pristine);
    }
    free(x->ref);
    free(x->ref2);
    free(x->aux);
}

/* Waits for the backend; an error it reports fails the case. */
static void be_sync(op_ctx *x) {
    char err[512] = "";
    int rc = x->be->sync(err, sizeof err);
    CHECK(rc == 0, "[%s %s %s] backend error: %s", x->be->name, x->c->op, x->desc, err);
}

/* The naive reference costs about cost_per_row per output row; past the budget only a spread
 * sample of rows is computed (always including the first and the last). */
#define REF_BUDGET 1.5e7
static void plan_rows(op_ctx *x, int rows, int row_len, double cost_per_row) {
    x->rows = rows;
    x->row_len = row_len;
    x->row_step = 1;
    if (!g_full && cost_per_row * rows > REF_BUDGET) {
        int n = (int)(REF_BUDGET / cost_per_row);
        if (n < 2) n = 2;
        x->row_step = (rows + n - 1) / n;
    }
    x->ref = calloc((size_t)rows * row_len, sizeof(double));
    if (!x->ref) {
        fprintf(stderr, "test_ops: out of memory\n");
        exit(2);
    }
}
static int row_checked(const op_ctx *x, int r) { return r % x->row_step == 0 || r == x->rows - 1; }

/* A second output, compared in full (tol 0: bitwise). */
static double *plan_out2(op_ctx *x, int buf, size_t n, double tol) {
    x->out2 = buf;
    x->n2 = n;
    x->tol2 = tol;
    x->ref2 = calloc(n ? n : 1, sizeof(double));
    if (!x->ref2) {
        fprintf(stderr, "test_ops: out of memory\n");
        exit(2);
    }
    return x->ref2;
}

/* A 16-bit output's reference: the double value rounded as the op rounds its fp32 value (they
 * differ only where the two straddle a rounding boundary: ~1e-5 rel L2; an output truncated
 * instead of rounded is ~1e-3 off). */
static void round_ref(op_ctx *x, int adtype) {
    if (adtype == BLIP2_W_F32) return;
    for (int r = 0; r < x->rows; r++)
        if (row_checked(x, r))
            for (int i = 0; i < x->row_len; i++) {
                double *v = &x->ref[(size_t)r * x->row_len + i];
                *v = t_from16(t_to16((float)*v, adtype), adtype);
            }
}

/* ------------------------------------------------------------------------------------------------
 * matmul: p = {T, C, OC, bias}. out[T, OC] = inp[T, C] · W[OC, C]ᵀ + b. */
static void setup_matmul(op_ctx *x) {
    int T = x->c->p[0], C = x->c->p[1], OC = x->c->p[2], bias = x->c->p[3];
    snprintf(x->desc, sizeof x->desc, "T=%d C=%d OC=%d%s", T, C, OC, bias ? " +bias" : "");
    int in = buf_new(x, B_IN, (size_t)T * C), w = buf_new(x, B_IN, (size_t)OC * C);
    int b = bias ? buf_new(x, B_IN, OC) : -1, out = buf_new(x, B_OUT, (size_t)T * OC);
    fill_uniform(&x->rng, H(x, in), (size_t)T * C, -1, 1);
    fill_uniform(&x->rng, H(x, w), (size_t)OC * C, -1, 1);
    if (bias) fill_uniform(&x->rng, H(x, b), OC, -1, 1);
    x->a[0] = in, x->a[1] = w, x->a[2] = b, x->a[3] = out;
    x->out = out;
    plan_rows(x, T, OC, (double)C * OC);
    const float *I = H(x, in), *W = H(x, w);
    for (int t = 0; t < T; t++) {
        if (!row_checked(x, t)) continue;
        for (int o = 0; o < OC; o++) {
            x->ref[(size_t)t * OC + o] = (bias ? H(x, b)[o] : 0.0) + dot_d(I + (size_t)t * C, W + (size_t)o * C, C);
        }
    }
    x->flops = 2.0 * T * C * OC;
    x->bytes = 4.0 * ((double)T * C + (double)OC * C + (double)T * OC + (bias ? OC : 0));
}
/* Every row, cheaply (Freivalds): for random r [OC], out·r must equal inp·(Wᵀr) + b·r. A single
 * element off by more than ~1e-5·√(T·OC) of the typical output moves this past the bound, so it
 * covers the rows the sampled reference skips at O(T·OC + OC·C + T·C) cost. */
/* The check's random r [OC], u = Wᵀr [C] and b·r (both checks below). */
static double freivalds_vectors(op_ctx *x, const float *W, const float *B, int C, int OC, double **r, double **u) {
    double br = 0;
    *r = xmalloc(sizeof(double) * OC), *u = calloc((size_t)C ? (size_t)C : 1, sizeof(double));
    uint64_t s = x->rng ^ 0x5eedu;
    for (int o = 0; o < OC; o++) {
        (*r)[o] = rng_normal(&s);
        if (B) br += B[o] * (*r)[o];
        for (int c = 0; c < C; c++) (*u)[c] += W[(size_t)o * C + c] * (*r)[o];
    }
    return br;
}
/* The error is measured against the size of the terms, √Σ_t Σ_o (O[t,o]·r[o])², not against
 * Σ_o O[t,o]·r[o] itself: the same expectation, but at T = 1 that one sum is now and then near 0
 * by chance (over seeds 1 to 40 the T = 1 cases of matmul, matmul_h and matmul_a failed the old
 * bound 7 times, 1.1e-5 to 2e-4, with every element within 1e-6). A row computed from the wrong
 * inputs is still ~1/√T off. */
static void projection_check(op_ctx *x, const float *I, const float *W, const float *B, const float *O, int T, int C,
                             int OC, double tol) {
    double *r, *u, num = 0, den = 0, br = freivalds_vectors(x, W, B, C, OC, &r, &u);
    for (int t = 0; t < T; t++) {
        double y = 0, z = br;
        for (int o = 0; o < OC; o++) {
            double v = O[(size_t)t * OC + o] * r[o];
            y += v;
            den += v * v;
        }
        for (int c = 0; c < C; c++) z += I[(size_t)t * C + c] * u[c];
        num += (y - z) * (y - z);
    }
    double rel = den > 0 ? sqrt(num / den) : sqrt(num);
    if (isnan(rel)) rel = INFINITY;
    CHECK(rel <= tol, "[%s %s %s] all-rows projection check: relative L2 %.3g > %.3g", x->be->name, x->c->op, x->desc,
          rel, tol);
    free(r);
    free(u);
}
static void extra_matmul(op_ctx *x) {
    projection_check(x, H(x, x->a[0]), H(x, x->a[1]), x->a[2] >= 0 ? H(x, x->a[2]) : NULL, H(x, x->a[3]), x->c->p[0],
                     x->c->p[1], x->c->p[2], case_tol(x));
}
static void exec_matmul(op_ctx *x) {
    x->be->matmul(D(x, x->a[3]), D(x, x->a[0]), D(x, x->a[1]), x->a[2] >= 0 ? D(x, x->a[2]) : NULL, x->c->p[0],
                  x->c->p[1], x->c->p[2]);
}

/* ------------------------------------------------------------------------------------------------
 * matmul_h: p = {T, C, OC, bias, wdtype, act}. Weights uniform in [-1, 1] rounded to 16 bits; the
 * reference is the double product of the widened weights with the fp32 inputs, bias, then act. The
 * host backend widens exactly (tol 1e-5); the CUDA one also rounds the inputs to 16 bits (tol_dev).
 * Without an activation every row is also checked by projection (aux holds the widened weights). */
static double act_d(double v, int act) {
    if (act == BLIP2_ACT_GELU) return 0.5 * v * (1.0 + erf(v / sqrt(2.0)));
    if (act == BLIP2_ACT_RELU) return v > 0 ? v : 0.0;
    return v;
}
static void setup_matmul_h(op_ctx *x) {
    int T = x->c->p[0], C = x->c->p[1], OC = x->c->p[2], bias = x->c->p[3], wd = x->c->p[4], act = x->c->p[5];
    snprintf(x->desc, sizeof x->desc, "T=%d C=%d OC=%d %s%s%s", T, C, OC, wd_name(wd), bias ? " +bias" : "",
             act == BLIP2_ACT_GELU ? " +gelu" : act == BLIP2_ACT_RELU ? " +relu" : "");
    size_t nw = (size_t)OC * C;
    int in = buf_new(x, B_IN, (size_t)T * C), w = buf_new_w(x, B_IN, nw, wd);
    int b = bias ? buf_new(x, B_IN, OC) : -1, out = buf_new(x, B_OUT, (size_t)T * OC);
    fill_uniform(&x->rng, H(x, in), (size_t)T * C, -1, 1);
    float *W = xmalloc(sizeof(float) * (nw ? nw : 1));
    fill_uniform(&x->rng, W, nw, -1, 1);
    uint16_t *W16 = H16(x, w);
    for (size_t i = 0; i < nw; i++) {
        W16[i] = t_to16(W[i], wd);
        W[i] = t_from16(W16[i], wd);
    }
    if (bias) fill_uniform(&x->rng, H(x, b), OC, -1, 1);
    x->a[0] = in, x->a[1] = w, x->a[2] = b, x->a[3] = out;
    x->out = out;
    x->aux = W;
    plan_rows(x, T, OC, (double)C * OC);
    const float *I = H(x, in);
    for (int t = 0; t < T; t++) {
        if (!row_checked(x, t)) continue;
        for (int o = 0; o < OC; o++)
            x->ref[(size_t)t * OC + o] =
                act_d((bias ? H(x, b)[o] : 0.0) + dot_d(I + (size_t)t * C, W + (size_t)o * C, C), act);
    }
    x->flops = 2.0 * T * C * OC;
    x->bytes = 2.0 * OC * C + 4.0 * ((double)T * C + (double)T * OC + (bias ? OC : 0));
}
/* Batch invariance: the first row computed alone (T = 1, the device's GEMV) must equal the same row
 * computed in the case's batch (the tensor-core path above the GEMV rows) up to the order of the fp32
 * sums. Rounding the activations in one path and not the other is ~1e-3 apart: a seeded sample
 * would then depend on who else is in the batch. */
static void batch_row_check(op_ctx *x) {
    const int *p = x->c->p;
    int T = p[0], C = p[1], OC = p[2];
    if (T < 2 || OC <= 0) return;
    float *dev = x->be->alloc(sizeof(float) * OC);
    CHECK(dev != NULL, "[%s matmul_h %s] no memory for the row alone", x->be->name, x->desc);
    if (!dev) return;
    float *alone = xmalloc(sizeof(float) * OC);
    x->be->matmul_h(dev, D(x, x->a[0]), D16(x, x->a[1]), x->a[2] >= 0 ? D(x, x->a[2]) : NULL, 1, C, OC, p[4], p[5]);
    x->be->download(alone, dev, sizeof(float) * OC);
    be_sync(x);
    double e = check_rel_l2(alone, H(x, x->a[3]), (size_t)OC);
    CHECK(e <= 1e-5, "[%s matmul_h %s] row 0 alone vs in its batch of %d: rel L2 %.3g", x->be->name, x->desc, T, e);
    x->be->release(dev);
    free(alone);
}
static void extra_matmul_h(op_ctx *x) {
    batch_row_check(x);
    if (x->c->p[5] != BLIP2_ACT_NONE) return;
    projection_check(x, H(x, x->a[0]), (const float *)x->aux, x->a[2] >= 0 ? H(x, x->a[2]) : NULL, H(x, x->a[3]),
                     x->c->p[0], x->c->p[1], x->c->p[2], case_tol(x));
}
static void exec_matmul_h(op_ctx *x) {
    const int *p = x->c->p;
    x->be->matmul_h(D(x, x->a[3]), D(x, x->a[0]), D16(x, x->a[1]), x->a[2] >= 0 ? D(x, x->a[2]) : NULL, p[0], p[1],
                    p[2], p[4], p[5]);
}

/* vals [n] into buffer buf as elements of type: fp32 as they are, or rounded to 16 bits, and then
 * vals hold what was stored (the reference's exact operands). */
static void put_typed(op_ctx *x, int buf, int type, float *vals, size_t n) {
    for (size_t i = 0; i < n; i++) {
        if (type == BLIP2_W_F32) {
            H(x, buf)[i] = vals[i];
            continue;
        }
        H16(x, buf)[i] = t_to16(vals[i], type);
        vals[i] = t_from16(H16(x, buf)[i], type);
    }
}
/* The reference of act(I · Wᵀ + B) on the checked rows (B may be NULL), rounded as an od out. */
static void ref_matmul_rows(op_ctx *x, const float *I, const float *W, const float *B, int act, int od, int T, int C,
                            int OC) {
    for (int t = 0; t < T; t++) {
        if (!row_checked(x, t)) continue;
        for (int o = 0; o < OC; o++)
            x->ref[(size_t)t * OC + o] = act_d((B ? B[o] : 0.0) + dot_d(I + (size_t)t * C, W + (size_t)o * C, C), act);
    }
    round_ref(x, od);
}

/* ------------------------------------------------------------------------------------------------
 * matmul_a: p = {T, C, OC, bias, adtype, wdtype, act, odtype}. Inputs, weights and the bias uniform
 * in [-1, 1], each rounded to its type (the bias is of odtype); the reference is the double product
 * of the two (widened exactly), bias, then act, rounded as the op rounds a 16-bit out (round_ref).
 * 16-bit inputs are exact, so the bound is fp32's on every backend (a 16-bit out's: TOL_SUM16);
 * fp32 inputs with 16-bit weights are matmul_h's case (the device rounds them: tol_dev). aux holds
 * the widened weights [OC, C], then the widened inputs [T, C] and bias [OC], for the all-rows
 * projection check. */
static void setup_matmul_a(op_ctx *x) {
    int T = x->c->p[0], C = x->c->p[1], OC = x->c->p[2], bias = x->c->p[3], ad = x->c->p[4], wd = x->c->p[5];
    int act = x->c->p[6], od = x->c->p[7];
    snprintf(x->desc, sizeof x->desc, "T=%d C=%d OC=%d %s x %s%s%s -> %s", T, C, OC, wd_name(ad), wd_name(wd),
             bias ? (od == BLIP2_W_F32 ? " +bias" : od == BLIP2_W_F16 ? " +f16 bias" : " +bf16 bias") : "",
             act == BLIP2_ACT_GELU ? " +gelu" : act == BLIP2_ACT_RELU ? " +relu" : "", wd_name(od));
    size_t nw = (size_t)OC * C, ni = (size_t)T * C, nb = bias ? (size_t)OC : 0;
    int in = buf_new_w(x, B_IN, ni, ad), w = buf_new_w(x, B_IN, nw, wd);
    int b = bias ? buf_new_w(x, B_IN, OC, od) : -1, out = buf_new_w(x, B_OUT, (size_t)T * OC, od);
    float *W = xmalloc(sizeof(float) * (nw + ni + nb ? nw + ni + nb : 1)), *I = W + nw, *Bv = I + ni;
    fill_uniform(&x->rng, W, nw, -1, 1);
    fill_uniform(&x->rng, I, ni, -1, 1);
    fill_uniform(&x->rng, Bv, nb, -1, 1);
    put_typed(x, w, wd, W, nw);
    put_typed(x, in, ad, I, ni);
    if (bias) put_typed(x, b, od, Bv, nb);
    x->a[0] = in, x->a[1] = w, x->a[2] = b, x->a[3] = out;
    x->out = out;
    x->out_type = od;
    x->aux = W;
    plan_rows(x, T, OC, (double)C * OC);
    ref_matmul_rows(x, I, W, bias ? Bv : NULL, act, od, T, C, OC);
    x->flops = 2.0 * T * C * OC;
    x->bytes = (double)blip2_wdtype_size(wd) * nw + (double)blip2_wdtype_size(ad) * ni +
               (double)blip2_wdtype_size(od) * ((double)T * OC + nb);
}
/* The spacing of 16-bit values of type wdtype around v (a value of that type). */
static double ulp16(float v, int wdtype) {
    int e;
    frexp(fabs((double)v), &e); /* |v| in [2^(e-1), 2^e) */
    if (wdtype == BLIP2_W_F16) return ldexp(1.0, (e - 1 < -14 ? -14 : e - 1) - 10);
    return ldexp(1.0, (e - 1 < -126 ? -126 : e - 1) - 7);
}
/* projection_check for a 16-bit output O [T, OC] (buffer ob of type od), row by row: the rounding
 * adds to a row's out·r a noise of variance Σ (ulp²/12)·r², the product's own error (relative L2
 * tol) one of variance tol²·Σ (out·r)²; the bound is six σ of the two. A relative bound over all
 * rows would fail by chance at T = 1 (out·r of one row can be near 0) and hardly see one bad row
 * among 257 in bf16; a row computed from the wrong inputs or written to the wrong place is off by
 * some hundred σ. */
static void projection_check16(op_ctx *x, const float *I, const float *W, const float *B, int ob, int od, int T, int C,
                               int OC, double tol) {
    double *r, *u, worst = 0, br = freivalds_vectors(x, W, B, C, OC, &r, &u);
    int worst_t = 0;
    for (int t = 0; t < T; t++) {
        double y = 0, z = br, var = 0;
        for (int o = 0; o < OC; o++) {
            float v = elem(x, ob, od, (size_t)t * OC + o);
            double q = ulp16(v, od), vr = v * r[o];
            y += vr;
            var += q * q / 12 * r[o] * r[o] + tol * tol * vr * vr;
        }
        for (int c = 0; c < C; c++) z += I[(size_t)t * C + c] * u[c];
        double ratio = var > 0 ? fabs(y - z) / (6 * sqrt(var)) : fabs(y - z);
        if (isnan(ratio)) ratio = INFINITY;
        if (ratio > worst) worst = ratio, worst_t = t;
    }
    CHECK(worst <= 1, "[%s %s %s] all-rows projection check: row %d off by %.3g times the bound (6 sigma)", x->be->name,
          x->c->op, x->desc, worst_t, worst);
    free(r);
    free(u);
}
/* Every row by projection (no activation); a 16-bit out with its rounding's noise allowed. */
static void extra_matmul_a(op_ctx *x) {
    const int *p = x->c->p;
    int T = p[0], C = p[1], OC = p[2], od = p[7];
    if (p[6] != BLIP2_ACT_NONE) return;
    const float *W = x->aux, *I = W + (size_t)OC * C, *B = p[3] ? I + (size_t)T * C : NULL;
    if (od == BLIP2_W_F32) projection_check(x, I, W, B, H(x, x->a[3]), T, C, OC, case_tol(x));
    else projection_check16(x, I, W, B, x->a[3], od, T, C, OC, case_tol(x));
}
static void exec_matmul_a(op_ctx *x) {
    const int *p = x->c->p;
    x->be->matmul_a(D(x, x->a[3]), D(x, x->a[0]), D(x, x->a[1]), x->a[2] >= 0 ? D(x, x->a[2]) : NULL, p[0], p[1], p[2],
                    p[4], p[5], p[6], p[7]);
}

/* ------------------------------------------------------------------------------------------------
 * activate_a: p = {n, act, adtype, inplace, xdtype}. out = act(x) of adtype, x of xdtype uniform in
 * [-6, 6] (both tails of GELU), rounded to xdtype when 16-bit (the reference acts on the widened
 * value); in place (out = x) needs adtype == xdtype. A case with tol 0 (no GELU, out F32 or xdtype:
 * the result is exact) also starts with the type's extremes: ±0, the smallest and largest
 * subnormals, ±the largest finite value, which a widening that flushes or clamps gets wrong. */
static void setup_activate_a(op_ctx *x) {
    int n = x->c->p[0], act = x->c->p[1], ad = x->c->p[2], inplace = x->c->p[3], xd = x->c->p[4];
    snprintf(x->desc, sizeof x->desc, "n=%d %s %s -> %s%s", n, wd_name(xd),
             act == BLIP2_ACT_GELU ? "gelu" : act == BLIP2_ACT_RELU ? "relu" : "none", wd_name(ad),
             inplace ? " in-place" : "");
    if (inplace && ad != xd) {
        fprintf(stderr, "test_ops: activate_a in place needs adtype == xdtype\n");
        exit(2);
    }
    int in = buf_new_w(x, inplace ? B_INOUT : B_IN, (size_t)n, xd);
    int out = inplace ? in : buf_new_w(x, B_OUT, (size_t)n, ad);
    float *v = xmalloc(sizeof(float) * (size_t)n);
    /* Under 100 elements (TOL_ACT allows one neighbour's rounding) from -4: below it GELU is under
     * f16's smallest normal, where one rounding step is a large part of a lone value (n = 1:
     * 0.26 % off at one of seeds 1-13). */
    fill_uniform(&x->rng, v, (size_t)n, n < 100 ? -4 : -6, 6);
    if (xd == BLIP2_W_F32) {
        memcpy(H(x, in), v, sizeof(float) * (size_t)n);
    } else {
        static const uint16_t f16_ext[] = {0x0000, 0x8000, 0x0001, 0x83ff, 0x7bff, 0xfbff};
        static const uint16_t bf16_ext[] = {0x0000, 0x8000, 0x8001, 0x007f, 0x7f7f, 0xff7f};
        const uint16_t *ext = xd == BLIP2_W_F16 ? f16_ext : bf16_ext;
        for (int i = 0; i < n; i++) {
            H16(x, in)[i] = x->c->tol == 0 && i < 6 ? ext[i] : t_to16(v[i], xd);
            v[i] = t_from16(H16(x, in)[i], xd);
        }
    }
    x->a[0] = out, x->a[1] = in;
    x->out = out;
    x->out_type = ad;
    plan_rows(x, 1, n, 20.0 * n);
    for (int i = 0; i < n; i++) x->ref[i] = act_d(v[i], act);
    round_ref(x, ad);
    free(v);
    x->bytes = ((double)blip2_wdtype_size(xd) + blip2_wdtype_size(ad)) * n;
}
static void exec_activate_a(op_ctx *x) {
    const int *p = x->c->p;
    x->be->activate_a(D(x, x->a[0]), D(x, x->a[1]), (size_t)p[0], p[1], p[2], p[4]);
}

/* The double LayerNorm of rows [T, C] (biased variance, eps inside the sqrt) into ref. */
static void ln_ref_rows(double *ref, const double *rows, int T, int C, const float *W, const float *B, float eps) {
    for (int t = 0; t < T; t++) {
        const double *row = rows + (size_t)t * C;
        double mean = 0, var = 0;
        for (int i = 0; i < C; i++) mean += row[i];
        mean /= C;
        for (int i = 0; i < C; i++) var += (row[i] - mean) * (row[i] - mean);
        var /= C;
        double rstd = 1.0 / sqrt(var + (double)eps);
        for (int i = 0; i < C; i++) ref[(size_t)t * C + i] = (row[i] - mean) * rstd * W[i] + B[i];
    }
}

/* Rows X [T, C] of a norm's input in one of setup_layernorm's variants (below). */
static void fill_ln_rows(op_ctx *x, float *X, int T, int C, int variant, float eps) {
    for (int t = 0; t < T; t++) {
        float *row = X + (size_t)t * C;
        if (variant == 1 && t % 2 == 0) {
            static const float consts[] = {0.0f, 1.0f, -3.25f, 1000.5f, 1e-3f};
            float v = consts[(t / 2) % 5];
            for (int i = 0; i < C; i++) row[i] = v;
        } else if (variant == 2) {
            fill_normal(&x->rng, row, C, 50.0f, 1.0f);
        } else if (variant == 3) {
            fill_normal(&x->rng, row, C, 0.0f, sqrtf(eps));
        } else {
            fill_normal(&x->rng, row, C, 0.0f, 1.0f);
        }
    }
}

/* ------------------------------------------------------------------------------------------------
 * layernorm: p = {T, C, inplace, variant}, f = eps.
 * variant 0: N(0,1) rows; 1: even rows constant (variance 0: the output is exactly b), odd rows
 * random; 2: rows with a large common offset (mean 50, std 1), which a one-pass E[x²]−E[x]² in
 * float would get badly wrong; 3: rows whose variance equals eps (std √eps), where eps counts as
 * much as the data: eps outside the sqrt, or the wrong eps, is off by far more than the bound. */
static void setup_layernorm(op_ctx *x) {
    int T = x->c->p[0], C = x->c->p[1], inplace = x->c->p[2], variant = x->c->p[3], ad = x->c->p[4];
    float eps = x->c->f;
    snprintf(x->desc, sizeof x->desc, "T=%d C=%d eps=%g%s%s -> %s", T, C, eps, inplace ? " in-place" : "",
             variant == 1 ? " constant-rows" : variant == 2 ? " offset-rows" : variant == 3 ? " variance=eps" : "",
             wd_name(ad));
    int in = buf_new(x, inplace ? B_INOUT : B_IN, (size_t)T * C);
    int w = buf_new(x, B_IN, C), b = buf_new(x, B_IN, C);
    int out = inplace ? in : buf_new_w(x, B_OUT, (size_t)T * C, ad);
    x->out_type = ad;
    float *X = H(x, in);
    fill_ln_rows(x, X, T, C, variant, eps);
    fill_normal(&x->rng, H(x, w), C, 1.0f, 0.1f);
    fill_normal(&x->rng, H(x, b), C, 0.0f, 0.5f);
    x->a[0] = in, x->a[1] = w, x->a[2] = b, x->a[3] = out;
    x->out = out;
    plan_rows(x, T, C, 3.0 * C);
    double *rows = xmalloc(sizeof(double) * (size_t)T * C);
    for (size_t i = 0; i < (size_t)T * C; i++) rows[i] = X[i];
    ln_ref_rows(x->ref, rows, T, C, H(x, w), H(x, b), eps);
    round_ref(x, ad);
    free(rows);
    x->flops = 8.0 * T * C;
    x->bytes = (4.0 + blip2_wdtype_size(ad)) * T * C + 8.0 * C;
}
/* A row's norm is the same bits alone as among many rows (the device picks its kernel by the
 * number of rows, so the two kernels must agree): row 0 again, alone. */
static void extra_layernorm(op_ctx *x) {
    int T = x->c->p[0], C = x->c->p[1];
    if (T < 2 || x->c->p[2]) return; /* in place: the input is gone */
    float *dev = x->be->alloc(sizeof(float) * C), *alone = xmalloc(sizeof(float) * C);
    CHECK(dev != NULL, "[%s layernorm %s] no memory for the row alone", x->be->name, x->desc);
    if (dev) {
        x->be->layernorm(dev, D(x, x->a[0]), D(x, x->a[1]), D(x, x->a[2]), 1, C, x->c->f);
        x->be->download(alone, dev, sizeof(float) * C);
        be_sync(x);
        CHECK(memcmp(alone, H(x, x->a[3]), sizeof(float) * C) == 0,
              "[%s layernorm %s] row 0 alone differs from row 0 among %d rows", x->be->name, x->desc, T);
        x->be->release(dev);
    }
    free(alone);
}
static void exec_layernorm(op_ctx *x) {
    x->be->layernorm(D(x, x->a[3]), D(x, x->a[0]), D(x, x->a[1]), D(x, x->a[2]), x->c->p[0], x->c->p[1], x->c->f);
}
static void exec_layernorm_a(op_ctx *x) {
    x->be->layernorm_a(D(x, x->a[3]), D(x, x->a[0]), D(x, x->a[1]), D(x, x->a[2]), x->c->p[0], x->c->p[1], x->c->f,
                       x->c->p[4]);
}

/* ------------------------------------------------------------------------------------------------
 * residual_add: p = {n}. x += y. */
static void setup_residual_add(op_ctx *x) {
    int n = x->c->p[0];
    snprintf(x->desc, sizeof x->desc, "n=%d", n);
    int xb = buf_new(x, B_INOUT, n), yb = buf_new(x, B_IN, n);
    fill_normal(&x->rng, H(x, xb), n, 0, 1);
    fill_normal(&x->rng, H(x, yb), n, 0, 1);
    x->a[0] = xb, x->a[1] = yb;
    x->out = xb;
    plan_rows(x, 1, n, n);
    for (int i = 0; i < n; i++) x->ref[i] = (double)H(x, xb)[i] + H(x, yb)[i];
    x->flops = n;
    x->bytes = 12.0 * n;
}
static void exec_residual_add(op_ctx *x) { x->be->residual_add(D(x, x->a[0]), D(x, x->a[1]), (size_t)x->c->p[0]); }

/* ------------------------------------------------------------------------------------------------
 * gelu / relu: p = {n}, in place. Inputs uniform in [-8, 8], plus 0, -0 and ±20 at the start. */
static int setup_unary(op_ctx *x) {
    int n = x->c->p[0];
    snprintf(x->desc, sizeof x->desc, "n=%d", n);
    int b = buf_new(x, B_INOUT, n);
    float *v = H(x, b);
    fill_uniform(&x->rng, v, n, -8, 8);
    static const float special[] = {0.0f, -0.0f, 20.0f, -20.0f, 1e-30f, -1e-30f};
    for (int i = 0; i < n && i < 6; i++) v[i] = special[i];
    x->a[0] = b;
    x->out = b;
    plan_rows(x, 1, n, n);
    x->bytes = 8.0 * n;
    return b;
}
static void setup_gelu(op_ctx *x) {
    const float *v = H(x, setup_unary(x));
    for (int i = 0; i < x->c->p[0]; i++) x->ref[i] = 0.5 * v[i] * (1.0 + erf(v[i] / sqrt(2.0)));
}
static void setup_relu(op_ctx *x) {
    const float *v = H(x, setup_unary(x));
    for (int i = 0; i < x->c->p[0]; i++) x->ref[i] = v[i] > 0 ? v[i] : 0.0;
}
static void exec_gelu(op_ctx *x) { x->be->gelu(D(x, x->a[0]), (size_t)x->c->p[0]); }
static void exec_relu(op_ctx *x) { x->be->relu(D(x, x->a[0]), (size_t)x->c->p[0]); }

/* ------------------------------------------------------------------------------------------------
 * attention: p = {Tq, Tk, NH, HS, causal, layout, pad, amp, B, wdtype, iodtype}, f = scale (0: 1/√HS);
 * amp is the std of q and k (0 means 1); B sequences one after the other (0 means 1; the op loops
 * over the images or over the heads, whichever is fewer, so B > NH and B < NH are both cases).
 * iodtype 16-bit: q, k, v (NaN padding included) and out are of that type, the values drawn as for
 * fp32 and rounded to it; the reference is the double one on the widened values, rounded. aux
 * then holds the widened buffers (q, then k and v when separate).
 * layout 0: separate q [B·Tq+2, C+pad], k and v [B·Tk+3, C+pad] buffers (Q-Former cross-attention,
 *           the OPT KV cache); rows past B·Tq / B·Tk and the pad columns hold NaN.
 * layout 1: one fused qkv buffer [B·T, 3C+pad] with k at column C and v at 2C (vision
 *           self-attention); needs Tq == Tk. */
typedef struct {
    int Tq, Tk, NH, HS, C, causal, qs, kvs, B;
    float scale;
} attn_shape;

static attn_shape attn_get(const op_ctx *x) {
    const int *p = x->c->p;
    attn_shape s = {p[0], p[1], p[2], p[3], p[2] * p[3], p[4], 0, 0, p[8] > 0 ? p[8] : 1, x->c->f};
    if (s.scale == 0) s.scale = 1.0f / sqrtf((float)s.HS);
    if (p[5] == 1) s.qs = s.kvs = 3 * s.C + p[6];
    else s.qs = s.kvs = s.C + p[6];
    return s;
}

/* Reference for query row i of one sequence into ref[NH·HS]. */
static void attn_ref_row(double *ref, const float *q, const float *k, const float *v, const attn_shape *s, int i) {
    int n_keys = s->causal ? i + (s->Tk - s->Tq) + 1 : s->Tk;
    double *sc = malloc(sizeof(double) * (size_t)s->Tk);
    for (int h = 0; h < s->NH; h++) {
        const float *qi = q + (size_t)i * s->qs + h * s->HS;
        double mx = -INFINITY, sum = 0;
        for (int j = 0; j < n_keys; j++) {
            sc[j] = dot_d(qi, k + (size_t)j * s->kvs + h * s->HS, s->HS) * s->scale;
            if (sc[j] > mx) mx = sc[j];
        }
        for (int j = 0; j < n_keys; j++) sum += sc[j] = exp(sc[j] - mx);
        for (int e = 0; e < s->HS; e++) {
            double o = 0;
            for (int j = 0; j < n_keys; j++) o += sc[j] * v[(size_t)j * s->kvs + h * s->HS + e];
            ref[h * s->HS + e] = o / sum;
        }
    }
    free(sc);
}

static void setup_attention(op_ctx *x) {
    attn_shape s = attn_get(x);
    int fused = x->c->p[5] == 1, pad = x->c->p[6], rq = s.B * s.Tq, rk = s.B * s.Tk;
    float amp = x->c->p[7] ? (float)x->c->p[7] : 1.0f;
    snprintf(x->desc, sizeof x->desc, "B=%d Tq=%d Tk=%d NH=%d HS=%d%s %s pad=%d scale=%.4g%s", s.B, s.Tq, s.Tk, s.NH,
             s.HS, s.causal ? " causal" : "", fused ? "fused-qkv" : "q,k,v", pad, s.scale, amp != 1 ? " big-scores" : "");
    int qb, kb, vb, io = x->c->p[10];
    if (io != BLIP2_W_F32)
        strncat(x->desc, io == BLIP2_W_F16 ? " io f16" : " io bf16", sizeof x->desc - strlen(x->desc) - 1);
    const float qnan = NAN;
    size_t nq = fused ? (size_t)rq * s.qs : (size_t)(rq + 2) * s.qs, nkv = fused ? 0 : (size_t)(rk + 3) * s.kvs;
    /* the values as floats: the buffers themselves (fp32), or the widened copies in aux (16-bit) */
    float *Wq = NULL, *Wk = NULL, *Wv = NULL;
    if (io != BLIP2_W_F32) {
        Wq = x->aux = xmalloc(sizeof(float) * (nq + 2 * nkv));
        Wk = fused ? Wq : Wq + nq, Wv = fused ? Wq : Wk + nkv;
    }
    if (fused) {
        qb = kb = vb = buf_new_w(x, B_IN, nq, io);
        float *Q = io == BLIP2_W_F32 ? H(x, qb) : Wq;
        for (int t = 0; t < rq; t++)
            for (int c = 0; c < s.qs; c++)
                Q[(size_t)t * s.qs + c] = c < 2 * s.C ? amp * rng_normal(&x->rng) : c < 3 * s.C ? rng_uniform(&x->rng, -1, 1) : qnan;
    } else {
        qb = buf_new_w(x, B_IN, nq, io);
        kb = buf_new_w(x, B_IN, nkv, io);
        vb = buf_new_w(x, B_IN, nkv, io);
        for (int which = 0; which < 3; which++) {
            int b = which == 0 ? qb : which == 1 ? kb : vb, rows = which == 0 ? rq : rk;
            int stride = which == 0 ? s.qs : s.kvs;
            float *M = io == BLIP2_W_F32 ? H(x, b) : which == 0 ? Wq : which == 1 ? Wk : Wv;
            for (size_t i = 0; i < (which == 0 ? nq : nkv); i++) {
                int t = (int)(i / stride), c = (int)(i % stride);
                M[i] = (t >= rows || c >= s.C) ? qnan : which < 2 ? amp * rng_normal(&x->rng) : rng_uniform(&x->rng, -1, 1);
            }
        }
    }
    if (io != BLIP2_W_F32) /* rounded into the buffers, the copies widened back: exactly the op's inputs */
        for (int which = 0; which < (fused ? 1 : 3); which++) {
            int b = which == 0 ? qb : which == 1 ? kb : vb;
            float *M = which == 0 ? Wq : which == 1 ? Wk : Wv;
            for (size_t i = 0; i < (which == 0 ? nq : nkv); i++) {
                H16(x, b)[i] = t_to16(M[i], io);
                M[i] = t_from16(H16(x, b)[i], io);
            }
        }
    int most = s.B > s.NH ? s.B : s.NH;
    int sc = buf_new(x, B_SCRATCH, (size_t)most * s.Tq * blip2_attention_ld(s.Tk)); /* one batched product's scores */
    int out = buf_new_w(x, B_OUT, (size_t)rq * s.C, io);
    x->a[0] = out, x->a[1] = qb, x->a[2] = kb, x->a[3] = vb, x->a[4] = sc, x->a[5] = fused;
    x->out = out;
    x->out_type = io;
    plan_rows(x, rq, s.C, 2.0 * s.Tk * s.C);
    const float *q = io == BLIP2_W_F32 ? H(x, qb) : Wq, *k = (io == BLIP2_W_F32 ? H(x, kb) : Wk) + (fused ? s.C : 0),
                *v = (io == BLIP2_W_F32 ? H(x, vb) : Wv) + (fused ? 2 * s.C : 0);
    double keys = 0;
    for (int r = 0; r < rq; r++) {
        int b = r / s.Tq, i = r % s.Tq;
        keys += s.causal ? i + (s.Tk - s.Tq) + 1 : s.Tk;
        if (row_checked(x, r))
            attn_ref_row(x->ref + (size_t)r * s.C, q + (size_t)b * s.Tq * s.qs, k + (size_t)b * s.Tk * s.kvs,
                         v + (size_t)b * s.Tk * s.kvs, &s, i);
    }
    round_ref(x, io);
    x->flops = 4.0 * keys * s.C;
    x->bytes = (double)blip2_wdtype_size(io) * ((double)rq * s.C * 2 + 2.0 * rk * s.C);
}

static void exec_attention(op_ctx *x) {
    attn_shape s = attn_get(x);
    int fused = x->a[5], io = x->c->p[10];
    size_t ko = fused ? (size_t)s.C : 0, vo = fused ? 2 * (size_t)s.C : 0; /* in elements of io */
    const void *q = D(x, x->a[1]), *k, *v;
    if (io == BLIP2_W_F32) k = D(x, x->a[2]) + ko, v = D(x, x->a[3]) + vo;
    else k = D16(x, x->a[2]) + ko, v = D16(x, x->a[3]) + vo;
    x->be->attention(D(x, x->a[0]), q, k, v, D(x, x->a[4]), s.B, s.Tq, s.Tk, s.NH, s.HS, s.qs, s.kvs, s.scale,
                     s.causal, x->c->p[9], io);
}

/* Causal semantics from the op itself, independent of the reference: row i of a causal call must
 * equal a non-causal single-query call over exactly the keys 0 .. i + (Tk − Tq). */
static void setup_attention_rel(op_ctx *x) {
    setup_attention(x);
    attn_shape s = attn_get(x);
    x->a[6] = buf_new(x, B_OUT, (size_t)s.Tq * s.C);
    strncat(x->desc, " (vs per-row calls)", sizeof x->desc - strlen(x->desc) - 1);
}
static void exec_attention_rel(op_ctx *x) {
    exec_attention(x);
    attn_shape s = attn_get(x);
    for (int i = 0; i < s.Tq; i++) {
        int n_keys = i + (s.Tk - s.Tq) + 1;
        x->be->attention(D(x, x->a[6]) + (size_t)i * s.C, D(x, x->a[1]) + (size_t)i * s.qs, D(x, x->a[2]), D(x, x->a[3]),
                         D(x, x->a[4]), 1, 1, n_keys, s.NH, s.HS, s.qs, s.kvs, s.scale, 0, BLIP2_W_F32, BLIP2_W_F32);
    }
}
static void extra_attention_rel(op_ctx *x) {
    attn_shape s = attn_get(x);
    double e = check_rel_l2(H(x, x->a[6]), H(x, x->a[0]), (size_t)s.Tq * s.C);
    CHECK(e <= 1e-6, "[%s attention %s] causal rows differ from per-row calls over keys <= i+Tk-Tq: rel L2 %.3g",
          x->be->name, x->desc, e);
}

/* ------------------------------------------------------------------------------------------------
 * residual_layernorm: p = {T, C, alias, variant, bias}, f = eps. res += y (+ bias: y + bias first),
 * then out = LN(res); alias: out is y itself. variant 0: res and y N(0, 1); 1: even rows sum to
 * exactly 0 (a constant row: variance 0, out = b); 2: res around 50
 * (a one-pass variance in float fails). out is checked against the double LN of the float sum; res
 * (the second output) bitwise. */
static void setup_residual_layernorm(op_ctx *x) {
    int T = x->c->p[0], C = x->c->p[1], alias = x->c->p[2], variant = x->c->p[3], with_bias = x->c->p[4];
    int ad = x->c->p[5];
    float eps = x->c->f;
    snprintf(x->desc, sizeof x->desc, "T=%d C=%d eps=%g%s%s%s -> %s", T, C, eps, alias ? " out=y" : "",
             with_bias ? " +bias" : "", variant == 1 ? " zero-sum-rows" : variant == 2 ? " offset-rows" : "", wd_name(ad));
    size_t n = (size_t)T * C;
    int res = buf_new(x, B_INOUT, n), y = buf_new(x, alias ? B_INOUT : B_IN, n);
    int w = buf_new(x, B_IN, C), b = buf_new(x, B_IN, C), bias = with_bias ? buf_new(x, B_IN, C) : -1;
    int out = alias ? y : buf_new_w(x, B_OUT, n, ad);
    x->out_type = ad;
    float *R = H(x, res), *Y = H(x, y), *BI = with_bias ? H(x, bias) : NULL;
    if (BI) fill_normal(&x->rng, BI, C, 0.0f, 0.5f);
    for (int t = 0; t < T; t++) {
        float *r = R + (size_t)t * C, *yy = Y + (size_t)t * C;
        fill_normal(&x->rng, r, C, variant == 2 ? 50.0f : 0.0f, 1.0f);
        fill_normal(&x->rng, yy, C, 0.0f, variant == 2 ? 0.1f : 1.0f);
        if (variant == 1 && t % 2 == 0) /* a sum of exactly 0: y = −r, or with a bias y = 0 and r = −bias */
            for (int i = 0; i < C; i++) {
                yy[i] = BI ? 0.0f : -r[i];
                if (BI) r[i] = -BI[i];
            }
    }
    fill_normal(&x->rng, H(x, w), C, 1.0f, 0.1f);
    fill_normal(&x->rng, H(x, b), C, 0.0f, 0.5f);
    x->a[0] = res, x->a[1] = out, x->a[2] = y, x->a[3] = w, x->a[4] = b, x->a[5] = bias;
    x->out = out;
    plan_rows(x, T, C, 4.0 * C);
    double *rs = plan_out2(x, res, n, 0);
    for (size_t i = 0; i < n; i++) {
        float yb = BI ? Y[i] + BI[i % C] : Y[i]; /* one float add each: exactly rounded */
        rs[i] = (float)(R[i] + yb);
    }
    ln_ref_rows(x->ref, rs, T, C, H(x, w), H(x, b), eps);
    round_ref(x, ad);
    x->flops = 9.0 * n;
    x->bytes = (12.0 + blip2_wdtype_size(ad)) * n + 8.0 * C;
}
static void exec_residual_layernorm(op_ctx *x) {
    x->be->residual_layernorm(D(x, x->a[0]), D(x, x->a[1]), D(x, x->a[2]), x->a[5] >= 0 ? D(x, x->a[5]) : NULL,
                              D(x, x->a[3]), D(x, x->a[4]), x->c->p[0], x->c->p[1], x->c->f);
}

/* ------------------------------------------------------------------------------------------------
 * matmul_acc_a: p = {T, C, OC, bias, adtype, wdtype} (p[6] = act NONE, p[7] = odtype F32: what
 * setup_matmul_a then draws is exactly this op's inputs, an fp32 bias). out [T, OC] fp32 is in/out:
 * it starts N(0, √C/3), the spread of the product itself, so a dropped product and a dropped
 * out_before are both ~70% off; the reference is out_before + bias + inp·Wᵀ in double. The bounds
 * are matmul_a's (16-bit inputs exact: fp32's on every backend; fp32 inputs with 16-bit weights:
 * the device rounds them, tol_dev). Every row is also checked by projection of out − out_before. */
static void setup_matmul_acc_a(op_ctx *x) {
    const int *p = x->c->p;
    int T = p[0], C = p[1], OC = p[2];
    setup_matmul_a(x);
    strncat(x->desc, " (out +=)", sizeof x->desc - strlen(x->desc) - 1);
    int out = x->a[3];
    x->b[out].role = B_INOUT;
    fill_normal(&x->rng, H(x, out), (size_t)T * OC, 0.0f, C > 9 ? sqrtf((float)C) / 3 : 1.0f);
    const float *before = H(x, out);
    for (int t = 0; t < T; t++)
        if (row_checked(x, t))
            for (int o = 0; o < OC; o++) x->ref[(size_t)t * OC + o] += before[(size_t)t * OC + o];
    x->bytes += 4.0 * T * OC; /* out is read as well as written */
}
static void exec_matmul_acc_a(op_ctx *x) {
    const int *p = x->c->p;
    x->be->matmul_acc_a(D(x, x->a[3]), D(x, x->a[0]), D(x, x->a[1]), x->a[2] >= 0 ? D(x, x->a[2]) : NULL, p[0], p[1],
                        p[2], p[4], p[5]);
}
/* Every row by projection: (out − out_before)·r against inp·(Wᵀr) + b·r (the fp32 difference adds
 * ~1e-7 of the product: far below the bound). */
static void extra_matmul_acc_a(op_ctx *x) {
    const int *p = x->c->p;
    int T = p[0], C = p[1], OC = p[2], ob = x->a[3];
    size_t n = (size_t)T * OC;
    const float *W = x->aux, *I = W + (size_t)OC * C, *B = p[3] ? I + (size_t)T * C : NULL;
    const float *after = H(x, ob), *before = (const float *)(x->b[ob].pristine + GUARD);
    float *d = xmalloc(sizeof(float) * (n ? n : 1));
    for (size_t i = 0; i < n; i++) d[i] = after[i] - before[i];
    projection_check(x, I, W, B, d, T, C, OC, case_tol(x));
    free(d);
}

/* ------------------------------------------------------------------------------------------------
 * matmul_ln_a: p = {T, C, OC, bias, adtype, wdtype, act, odtype, variant}, f = eps (p[0..7] as
 * matmul_a's, aux as setup_matmul_a's with the reference h as the inputs: without an activation
 * every row is also checked by projection). x [T, C] fp32 rows as layernorm's
 * variants (0: N(0, 1); 2: mean 50, std 1: a one-pass variance in fp32 fails; 3: variance = eps,
 * where eps counts as much as the data), ln_w N(1, 0.1), ln_b N(0, 0.5); W and the bias (of
 * odtype) as matmul_a. The reference: h = LN(x) in double (ln_ref_rows), rounded to adtype as
 * layernorm_a stores it, then act(h·Wᵀ + bias) in double, rounded as a 16-bit out (round_ref).
 *
 * The op's norm is fp32 (mean rounded to float, then fp32 arithmetic: both backends, the fused GEMV
 * included); where its value and the double one straddle a midpoint of adtype they round to
 * neighbours, one element a whole 16-bit ulp off, which costs ~2e-5 (f16) or ~1e-4 (bf16) of the
 * output at C = 2560 and more at small C. So that the reference h is exact instead, setup moves
 * each such element off the midpoint (ln_x_exact16): a bound on the fp32 norm's error e per
 * element (2 float ulps of the mean, times rstd·|w|, plus 2e-6 of |x̂·w| + |b|: about four times
 * the error of its roundings), and x[c] nudged until h[c] lies at least e from every midpoint (for
 * |h| so small that its ulp is under 8e, moved to 1.5·2^k with an ulp of at least 8e). The row's
 * mean and variance move with it, so this repeats until no element is near a midpoint (a few
 * passes). With h exact the bound is matmul_a's: 1e-5 for an fp32 out (fp32 sums), TOL_SUM16 for a
 * 16-bit one. Against that, for h: an unrounded 16-bit h is ~2e-4 (f16) or ~2e-3 (bf16) off, a
 * missing ln_b ~40%, an unnormalised or un-centred row ≥ 2% (N(0, 1), C = 2560) or far more
 * (offset rows), and a wrong eps, eps outside the sqrt or eps dropped ~30% in the variance = eps
 * rows (in N(0, 1) rows eps is 1e-5 of the variance: only variant 3 tests it). h is the op's scratch
 * (the fused GEMV does not write it): never compared, but its guards are. */
/* Distance from v to the nearest rounding midpoint of adtype (the boundary between v's rounded
 * value and a neighbour), and the spacing of values at v. */
static double mid_dist16(double v, int ad, double *spacing) {
    uint16_t h = t_to16((float)v, ad), mag = h & 0x7fff, s = h & 0x8000;
    double r = t_from16(h, ad), up = t_from16((uint16_t)(s | (mag + 1)), ad);
    double dn = mag ? t_from16((uint16_t)(s | (mag - 1)), ad) : -t_from16((uint16_t)(s | 1), ad);
    *spacing = fabs(up - r) < fabs(r - dn) ? fabs(up - r) : fabs(r - dn);
    double a = fabs(v - (r + up) / 2), b = fabs(v - (r + dn) / 2);
    return a < b ? a : b;
}
/* Nudges row X [C] (see above) so that its double LN rounds to adtype unambiguously; writes that
 * LN, rounded to adtype (F32: to float), into Hr [C]. */
static void ln_x_exact16(float *X, const float *W, const float *B, int C, float eps, int ad, float *Hr) {
    double *row = xmalloc(sizeof(double) * (size_t)C), *v = xmalloc(sizeof(double) * (size_t)C);
    for (int pass = 0;; pass++) {
        double mean = 0, var = 0;
        for (int i = 0; i < C; i++) mean += row[i] = X[i];
        mean /= C;
        for (int i = 0; i < C; i++) var += (row[i] - mean) * (row[i] - mean);
        double rstd = 1.0 / sqrt(var / C + (double)eps);
        ln_ref_rows(v, row, 1, C, W, B, eps);
        if (ad == BLIP2_W_F32) {
            for (int i = 0; i < C; i++) Hr[i] = (float)v[i];
            break;
        }
        float mf = (float)mean;
        double mean_ulp = nextafterf(fabsf(mf), INFINITY) - fabsf(mf);
        int moved = 0;
        for (int i = 0; i < C; i++) {
            double sp, d = mid_dist16(v[i], ad, &sp);
            double e = 2 * mean_ulp * rstd * fabs(W[i]) + 2e-6 * (fabs(v[i] - B[i]) + fabs(B[i])) + 1e-30;
            if (d >= e && sp >= 8 * e) continue;
            double target = t_from16(t_to16((float)v[i], ad), ad);
            if (sp < 8 * e) { /* too fine here: 1.5·2^k, whose spacing is at least 8e */
                double pk = ldexp(1.0, -30);
                while (ulp16((float)pk, ad) < 8 * e) pk *= 2;
                target = (v[i] < 0 ? -1.5 : 1.5) * pk;
            }
            X[i] = (float)(X[i] + (target - v[i]) / (rstd * W[i]));
            moved++;
        }
        if (!moved) {
            for (int i = 0; i < C; i++) Hr[i] = t_from16(t_to16((float)v[i], ad), ad);
            break;
        }
        if (pass == 50) {
            fprintf(stderr, "test_ops: matmul_ln_a: could not move a row's LN off the rounding midpoints\n");
            exit(2);
        }
    }
    free(row);
    free(v);
}
static void setup_matmul_ln_a(op_ctx *x) {
    const int *p = x->c->p;
    int T = p[0], C = p[1], OC = p[2], bias = p[3], ad = p[4], wd = p[5], act = p[6], od = p[7], variant = p[8];
    float eps = x->c->f;
    snprintf(x->desc, sizeof x->desc, "T=%d C=%d OC=%d LN(eps=%g%s) %s x %s%s%s -> %s", T, C, OC, eps,
             variant == 2 ? ", offset-rows" : variant == 3 ? ", variance=eps" : "", wd_name(ad), wd_name(wd),
             bias ? (od == BLIP2_W_F32 ? " +bias" : od == BLIP2_W_F16 ? " +f16 bias" : " +bf16 bias") : "",
             act == BLIP2_ACT_GELU ? " +gelu" : act == BLIP2_ACT_RELU ? " +relu" : "", wd_name(od));
    size_t nw = (size_t)OC * C, ni = (size_t)T * C, nb = bias ? (size_t)OC : 0;
    int xb = buf_new(x, B_IN, ni), lw = buf_new(x, B_IN, C), lb = buf_new(x, B_IN, C);
    int w = buf_new_w(x, B_IN, nw, wd), b = bias ? buf_new_w(x, B_IN, OC, od) : -1;
    int h = buf_new_w(x, B_SCRATCH, ni, ad), out = buf_new_w(x, B_OUT, (size_t)T * OC, od);
    float *X = H(x, xb);
    fill_ln_rows(x, X, T, C, variant, eps);
    fill_normal(&x->rng, H(x, lw), C, 1.0f, 0.1f);
    fill_normal(&x->rng, H(x, lb), C, 0.0f, 0.5f);
    /* aux: the widened weights [OC, C], the reference h [T, C], the widened bias [OC] (matmul_a's) */
    float *W = xmalloc(sizeof(float) * (nw + ni + nb ? nw + ni + nb : 1)), *Hr = W + nw, *Bv = Hr + ni;
    fill_uniform(&x->rng, W, nw, -1, 1);
    fill_uniform(&x->rng, Bv, nb, -1, 1);
    put_typed(x, w, wd, W, nw);
    if (bias) put_typed(x, b, od, Bv, nb);
    for (int t = 0; t < T; t++)
        ln_x_exact16(X + (size_t)t * C, H(x, lw), H(x, lb), C, eps, ad, Hr + (size_t)t * C);
    x->a[0] = xb, x->a[1] = w, x->a[2] = b, x->a[3] = out, x->a[4] = lw, x->a[5] = lb, x->a[6] = h;
    x->out = out;
    x->out_type = od;
    x->aux = W;
    plan_rows(x, T, OC, (double)C * OC);
    ref_matmul_rows(x, Hr, W, bias ? Bv : NULL, act, od, T, C, OC);
    x->flops = 2.0 * T * C * OC + 8.0 * T * C;
    x->bytes = (double)blip2_wdtype_size(wd) * nw + 4.0 * ni + 8.0 * C +
               (double)blip2_wdtype_size(od) * ((double)T * OC + nb);
}
/* Every row by projection against the reference h (no activation), as extra_matmul_a. */
static void extra_matmul_ln_a(op_ctx *x) {
    const int *p = x->c->p;
    int T = p[0], C = p[1], OC = p[2], od = p[7];
    if (p[6] != BLIP2_ACT_NONE) return;
    const float *W = x->aux, *Hr = W + (size_t)OC * C, *B = p[3] ? Hr + (size_t)T * C : NULL;
    if (od == BLIP2_W_F32) projection_check(x, Hr, W, B, H(x, x->a[3]), T, C, OC, case_tol(x));
    else projection_check16(x, Hr, W, B, x->a[3], od, T, C, OC, case_tol(x));
}
static void exec_matmul_ln_a(op_ctx *x) {
    const int *p = x->c->p;
    x->be->matmul_ln_a(D(x, x->a[3]), D(x, x->a[6]), D(x, x->a[0]), D(x, x->a[4]), D(x, x->a[5]), x->c->f,
                       D(x, x->a[1]), x->a[2] >= 0 ? D(x, x->a[2]) : NULL, p[0], p[1], p[2], p[4], p[5], p[6], p[7]);
}

/* ------------------------------------------------------------------------------------------------
 * Paged KV batches: a list of sequences (n_new, past). Their rows are laid out one sequence after
 * the other (order 0) or in reverse sequence order (order 1: meta's row starts need not increase).
 * The pool has two blocks more than the sequences use; blocks are handed out from a random
 * permutation, so logical order differs from pool order and sequences interleave. Each table has
 * one entry more than its sequence needs, and every unused entry names a spare block that holds
 * NaN (attention) or must stay unchanged (kv_write). */
typedef struct {
    int n_new, past;
} seq_spec;

static const seq_spec mix_decode_prefill[] = {{1, 44}, {1, 0}, {45, 0}, {7, 13}, {1, 100}, {3, 5}};
static const seq_spec mix_decode_edges[] = {{1, 15}, {1, 16}, {1, 17}, {1, 0}, {1, 31}, {1, 32}, {1, 63}, {1, 64}};
static const seq_spec mix_chunks[] = {{13, 52}, {1, 64}, {20, 0}};
static const seq_spec mix_odd[] = {{1, 0}, {2, 1}, {5, 0}, {1, 6}};
static const seq_spec mix_prefill[] = {{45, 0}};
static const seq_spec mix_decode[] = {{1, 44}};
static const struct {
    const seq_spec *s;
    int n;
    const char *name;
} kv_mixes[] = {
    {NULL, 0, "one sequence"},
    {mix_decode_prefill, 6, "decode rows + prefill + chunks"},
    {mix_decode_edges, 8, "decode batch at block edges"},
    {mix_chunks, 3, "prefill chunks after caches"},
    {mix_odd, 4, "odd"},
    {mix_prefill, 1, "prefill"},
    {mix_decode, 1, "decode"},
    {NULL, 256, "decode batch 256 at position 61 (the big-batch KV read)"}, /* generated: 256 × {1, 60} */
};
#define KV_MAX_SEQS 256

typedef struct {
    int n_seqs, rows, max_blocks, n_blocks, max_ctx, spare;
    seq_spec s[KV_MAX_SEQS];
    int row0[KV_MAX_SEQS];
} kv_layout;

/* Fills meta [3·n_seqs] and tables [n_seqs·max_blocks]; both buffers come from kv_plan's sizes. */
static kv_layout kv_plan(op_ctx *x, int mix, int Tq, int Tk, int BS, int order) {
    kv_layout L;
    memset(&L, 0, sizeof L);
    if (mix == 0) {
        L.n_seqs = 1;
        L.s[0].n_new = Tq, L.s[0].past = Tk - Tq;
    } else {
        L.n_seqs = kv_mixes[mix].n;
        for (int i = 0; i < L.n_seqs; i++) L.s[i] = kv_mixes[mix].s ? kv_mixes[mix].s[i] : (seq_spec){1, 60};
    }
    int used = 0;
    for (int i = 0; i < L.n_seqs; i++) {
        int ctx = L.s[i].past + L.s[i].n_new, nb = (ctx + BS - 1) / BS;
        if (ctx > L.max_ctx) L.max_ctx = ctx;
        if (nb + 1 > L.max_blocks) L.max_blocks = nb + 1;
        used += nb;
        L.rows += L.s[i].n_new;
    }
    L.n_blocks = used + 2;
    for (int k = 0, r = 0; k < L.n_seqs; k++) {
        int i = order ? L.n_seqs - 1 - k : k;
        L.row0[i] = r;
        r += L.s[i].n_new;
    }
    (void)x;
    return L;
}
static void kv_fill_tables(op_ctx *x, const kv_layout *L, int BS, int32_t *meta, int32_t *tables) {
    int32_t *perm = xmalloc(sizeof(int32_t) * L->n_blocks);
    for (int i = 0; i < L->n_blocks; i++) perm[i] = i;
    shuffle_i32(&x->rng, perm, L->n_blocks);
    int next = 0, spare = perm[L->n_blocks - 1];
    for (int i = 0; i < L->n_seqs; i++) {
        int ctx = L->s[i].past + L->s[i].n_new, nb = (ctx + BS - 1) / BS;
        meta[3 * i] = L->row0[i], meta[3 * i + 1] = L->s[i].n_new, meta[3 * i + 2] = L->s[i].past;
        for (int j = 0; j < L->max_blocks; j++) tables[(size_t)i * L->max_blocks + j] = j < nb ? perm[next++] : spare;
    }
    free(perm);
}
static size_t kv_pool_row(const int32_t *table, int BS, int pos) { return (size_t)table[pos / BS] * BS + pos % BS; }

/* Element i of buffer b of type wd set to v (rounded to nearest even when 16-bit). */
static void put_elem(op_ctx *x, int b, int wd, size_t i, float v) {
    if (wd == BLIP2_W_F32) H(x, b)[i] = v;
    else H16(x, b)[i] = t_to16(v, wd);
}

/* attention_paged: p = {Tq, Tk, NH, HS, BS, pad, mix, order, kvdtype, qpad}, f = scale (0: 1/√HS).
 * mix 0 is one sequence of Tq new rows after Tk − Tq past ones; otherwise kv_mixes[mix].
 * kv_stride = NH·HS + pad, q_stride = kv_stride + qpad (OPT reads q out of the fused qkv rows). The
 * pools hold kvdtype (a 16-bit cache); the reference reads their widened values and scales q in
 * float first, as the op does. max_ctx is the longest context exactly for odd mixes and 5 more
 * otherwise. */
/* attention_paged: p = {Tq, Tk, NH, HS, BS, pad, mix, order, kvdtype, qpad, fused, odtype}. fused:
 * the new rows' keys and values come as k_new/v_new rows (q's stride) and the pool's new positions
 * start as 7s, so the op must write them (the k pool is compared in full as the second output).
 * odtype: out's type (16 bits: the reference rounded as the op rounds its fp32 values). */
static void setup_attention_paged(op_ctx *x) {
    const int *p = x->c->p;
    int NH = p[2], HS = p[3], BS = p[4], pad = p[5], mix = p[6], order = p[7], kvd = p[8], C = NH * HS,
        stride = C + pad, qstride = stride + p[9], fused = p[10], od = p[11];
    float scale = x->c->f != 0 ? x->c->f : 1.0f / sqrtf((float)HS);
    kv_layout L = kv_plan(x, mix, p[0], p[1], BS, order);
    int max_ctx = L.max_ctx + (mix % 2 ? 0 : 5);
    snprintf(x->desc, sizeof x->desc, "%s: %d seqs, %d rows, NH=%d HS=%d BS=%d pad=%d qpad=%d %s KV scale=%.4g max_ctx=%d%s",
             kv_mixes[mix].name, L.n_seqs, L.rows, NH, HS, BS, pad, p[9], wd_name(kvd), scale, max_ctx,
             order ? " rows reversed" : "");
    if (mix == 0)
        snprintf(x->desc, sizeof x->desc, "Tq=%d Tk=%d NH=%d HS=%d BS=%d pad=%d qpad=%d %s KV scale=%.4g, %d of %d blocks",
                 p[0], p[1], NH, HS, BS, pad, p[9], wd_name(kvd), scale, L.n_blocks - 2, L.n_blocks);
    size_t pool = (size_t)L.n_blocks * BS * stride;
    int qb = buf_new(x, B_IN, (size_t)(L.rows + 2) * qstride);
    int kp = buf_new_w(x, fused ? B_INOUT : B_IN, pool, kvd), vp = buf_new_w(x, fused ? B_INOUT : B_IN, pool, kvd);
    int kn = fused ? buf_new(x, B_IN, (size_t)(L.rows + 2) * qstride) : -1;
    int vn = fused ? buf_new(x, B_IN, (size_t)(L.rows + 2) * qstride) : -1;
    int tb = buf_new(x, B_IN, (size_t)L.n_seqs * L.max_blocks), mb = buf_new(x, B_IN, 3 * (size_t)L.n_seqs);
    int sc = buf_new(x, B_SCRATCH, max_ctx), out = buf_new_w(x, B_OUT, (size_t)L.rows * C, od);
    kv_fill_tables(x, &L, BS, HI(x, mb), HI(x, tb));
    float *Q = H(x, qb);
    for (size_t i = 0; i < x->b[qb].n; i++)
        Q[i] = ((int)(i / qstride) < L.rows && (int)(i % qstride) < C) ? rng_normal(&x->rng) : NAN;
    for (size_t i = 0; i < pool; i++) /* fused: finite, so the pool compares bit for bit */
        put_elem(x, kp, kvd, i, fused ? 7.0f : NAN), put_elem(x, vp, kvd, i, fused ? 7.0f : NAN);
    for (size_t i = 0; fused && i < x->b[kn].n; i++) H(x, kn)[i] = H(x, vn)[i] = NAN; /* past C: not to be read */
    x->a[0] = out, x->a[1] = qb, x->a[2] = kp, x->a[3] = vp, x->a[4] = tb, x->a[5] = mb, x->a[6] = sc;
    x->a[7] = L.n_seqs, x->a[8] = L.max_blocks, x->a[9] = max_ctx, x->a[10] = kn, x->a[11] = vn;
    x->out = out;
    x->out_type = od;
    plan_rows(x, L.rows, C, 2.0 * L.max_ctx * C);
    double keys = 0;
    for (int i = 0; i < L.n_seqs; i++) {
        int n_new = L.s[i].n_new, ctx = L.s[i].past + n_new;
        const int32_t *table = HI(x, tb) + (size_t)i * L.max_blocks;
        /* Contiguous copies in logical order (the stored values, widened), for the reference. */
        float *kc = xmalloc(sizeof(float) * (size_t)ctx * C), *vc = xmalloc(sizeof(float) * (size_t)ctx * C);
        float *qc = xmalloc(sizeof(float) * (size_t)n_new * C);
        for (int j = 0; j < ctx; j++) {
            size_t row = kv_pool_row(table, BS, j) * stride;
            for (int c = 0; c < C; c++) {
                put_elem(x, kp, kvd, row + c, rng_normal(&x->rng));
                put_elem(x, vp, kvd, row + c, rng_uniform(&x->rng, -1, 1));
                kc[(size_t)j * C + c] = elem(x, kp, kvd, row + c);
                vc[(size_t)j * C + c] = elem(x, vp, kvd, row + c);
            }
        }
        for (int r = 0; r < n_new; r++)
            for (int c = 0; c < C; c++) qc[(size_t)r * C + c] = Q[(size_t)(L.row0[i] + r) * qstride + c] * scale;
        for (int r = 0; fused && r < n_new; r++) { /* the new rows move from the pool to k_new/v_new */
            size_t row = kv_pool_row(table, BS, L.s[i].past + r) * stride, src = (size_t)(L.row0[i] + r) * qstride;
            for (int c = 0; c < C; c++) {
                H(x, kn)[src + c] = kc[(size_t)(L.s[i].past + r) * C + c];
                H(x, vn)[src + c] = vc[(size_t)(L.s[i].past + r) * C + c];
                put_elem(x, kp, kvd, row + c, 7.0f), put_elem(x, vp, kvd, row + c, 7.0f);
            }
        }
        attn_shape sh = {n_new, ctx, NH, HS, C, 1, C, C, 1, 1.0f};
        for (int r = 0; r < n_new; r++) {
            keys += L.s[i].past + r + 1;
            if (row_checked(x, L.row0[i] + r)) attn_ref_row(x->ref + (size_t)(L.row0[i] + r) * C, qc, kc, vc, &sh, r);
        }
        free(kc), free(vc), free(qc);
    }
    round_ref(x, od);
    if (fused) { /* the k pool after the op: as filled, with the new rows back */
        double *rk = plan_out2(x, kp, pool, 0);
        x->out2_type = kvd;
        for (size_t i = 0; i < pool; i++) rk[i] = elem(x, kp, kvd, i);
        for (int i = 0; i < L.n_seqs; i++)
            for (int r = 0; r < L.s[i].n_new; r++) {
                const int32_t *table = HI(x, tb) + (size_t)i * L.max_blocks;
                size_t row = kv_pool_row(table, BS, L.s[i].past + r) * stride, src = (size_t)(L.row0[i] + r) * qstride;
                for (int c = 0; c < C; c++) rk[row + c] = H(x, kn)[src + c];
            }
    }
    x->flops = 4.0 * keys * C;
    x->bytes = 4.0 * 2.0 * L.rows * C + 2.0 * keys * C * blip2_wdtype_size(kvd);
}
static void exec_attention_paged(op_ctx *x) {
    const int *p = x->c->p;
    int HS = p[3], stride = p[2] * HS + p[5];
    float scale = x->c->f != 0 ? x->c->f : 1.0f / sqrtf((float)HS);
    const float *kn = p[10] ? D(x, x->a[10]) : NULL, *vn = p[10] ? D(x, x->a[11]) : NULL; /* NULL: in the pool already */
    x->be->attention_paged(D(x, x->a[0]), D(x, x->a[1]), D(x, x->a[2]), D(x, x->a[3]), p[8], kn, vn, DI(x, x->a[4]),
                           x->a[8], DI(x, x->a[5]), x->a[7], p[4], D(x, x->a[6]), x->a[9], p[2], HS, stride + p[9], stride,
                           scale, p[11]);
}

/* kv_write: p = {mix, C, BS, order, kvdtype, pad}. k and v rows have C + pad columns (pad NaN: OPT
 * writes from the fused qkv rows). The pools (kvdtype) start with random old contents; exactly
 * the new positions of each sequence change, to the rounded values (k pool checked as the output,
 * v pool as the second). */
static void setup_kv_write(op_ctx *x) {
    const int *p = x->c->p;
    int mix = p[0], C = p[1], BS = p[2], order = p[3], kvd = p[4], in_stride = C + p[5];
    kv_layout L = kv_plan(x, mix, 0, 0, BS, order);
    snprintf(x->desc, sizeof x->desc, "%s: %d seqs, %d rows, C=%d pad=%d BS=%d %s%s", kv_mixes[mix].name, L.n_seqs, L.rows,
             C, p[5], BS, wd_name(kvd), order ? " rows reversed" : "");
    size_t pool = (size_t)L.n_blocks * BS * C, in = (size_t)L.rows * in_stride;
    int kb = buf_new(x, B_IN, in), vb = buf_new(x, B_IN, in);
    int kp = buf_new_w(x, B_INOUT, pool, kvd), vp = buf_new_w(x, B_INOUT, pool, kvd);
    int tb = buf_new(x, B_IN, (size_t)L.n_seqs * L.max_blocks), mb = buf_new(x, B_IN, 3 * (size_t)L.n_seqs);
    kv_fill_tables(x, &L, BS, HI(x, mb), HI(x, tb));
    for (size_t i = 0; i < in; i++) {
        int col = (int)(i % in_stride);
        H(x, kb)[i] = col < C ? rng_normal(&x->rng) : NAN;
        H(x, vb)[i] = col < C ? rng_normal(&x->rng) : NAN;
    }
    for (size_t i = 0; i < pool; i++) {
        put_elem(x, kp, kvd, i, 5 + rng_normal(&x->rng));
        put_elem(x, vp, kvd, i, -5 + rng_normal(&x->rng));
    }
    x->a[0] = kp, x->a[1] = vp, x->a[2] = kb, x->a[3] = vb, x->a[4] = tb, x->a[5] = mb;
    x->a[6] = L.max_blocks, x->a[7] = L.n_seqs;
    x->out = kp;
    x->out_type = kvd;
    plan_rows(x, L.n_blocks * BS, C, C);
    double *rv = plan_out2(x, vp, pool, 0);
    x->out2_type = kvd;
    for (size_t i = 0; i < pool; i++) x->ref[i] = elem(x, kp, kvd, i), rv[i] = elem(x, vp, kvd, i);
    for (int i = 0; i < L.n_seqs; i++) {
        const int32_t *table = HI(x, tb) + (size_t)i * L.max_blocks;
        for (int t = 0; t < L.s[i].n_new; t++) {
            size_t dst = kv_pool_row(table, BS, L.s[i].past + t) * C, src = (size_t)(L.row0[i] + t) * in_stride;
            for (int c = 0; c < C; c++) {
                float k = H(x, kb)[src + c], v = H(x, vb)[src + c];
                x->ref[dst + c] = kvd == BLIP2_W_F32 ? k : t_from16(t_to16(k, kvd), kvd);
                rv[dst + c] = kvd == BLIP2_W_F32 ? v : t_from16(t_to16(v, kvd), kvd);
            }
        }
    }
    x->bytes = (8.0 + 2.0 * blip2_wdtype_size(kvd)) * L.rows * C;
}
static void exec_kv_write(op_ctx *x) {
    const int *p = x->c->p;
    x->be->kv_write(D(x, x->a[0]), D(x, x->a[1]), p[4], D(x, x->a[2]), D(x, x->a[3]), p[1] + p[5], DI(x, x->a[4]),
                    x->a[6], DI(x, x->a[5]), x->a[7], p[2], p[1]);
}

/* ------------------------------------------------------------------------------------------------
 * softmax: p = {T, n, variant}. variant 0: N(0, 3); 1: values around 1000 (needs max subtraction)
 * with some -inf (masked) entries, never a whole row. */
static void setup_softmax(op_ctx *x) {
    int T = x->c->p[0], n = x->c->p[1], variant = x->c->p[2];
    snprintf(x->desc, sizeof x->desc, "T=%d n=%d%s", T, n, variant ? " large+masked" : "");
    int b = buf_new(x, B_INOUT, (size_t)T * n);
    float *X = H(x, b);
    for (size_t i = 0; i < (size_t)T * n; i++) {
        X[i] = variant ? 1000.0f + 30.0f * rng_normal(&x->rng) : 3.0f * rng_normal(&x->rng);
        if (variant && i % n != 0 && rng_int(&x->rng, 4) == 0) X[i] = -INFINITY;
    }
    x->a[0] = b;
    x->out = b;
    plan_rows(x, T, n, 3.0 * n);
    for (int t = 0; t < T; t++) {
        const float *r = X + (size_t)t * n;
        double mx = -INFINITY, sum = 0;
        for (int i = 0; i < n; i++) mx = r[i] > mx ? r[i] : mx;
        for (int i = 0; i < n; i++) sum += exp((double)r[i] - mx);
        for (int i = 0; i < n; i++) x->ref[(size_t)t * n + i] = exp((double)r[i] - mx) / sum;
    }
    x->bytes = 8.0 * T * n;
}
static void exec_softmax(op_ctx *x) { x->be->softmax(D(x, x->a[0]), x->c->p[0], x->c->p[1]); }

/* ------------------------------------------------------------------------------------------------
 * im2col_patches: p = {CH, H, W, PS}; a remainder of H or W past the last whole patch is ignored. */
static void setup_im2col(op_ctx *x) {
    int CH = x->c->p[0], Hh = x->c->p[1], W = x->c->p[2], PS = x->c->p[3];
    int PH = Hh / PS, PW = W / PS, K = CH * PS * PS;
    snprintf(x->desc, sizeof x->desc, "CH=%d H=%d W=%d PS=%d", CH, Hh, W, PS);
    int img = buf_new(x, B_IN, (size_t)CH * Hh * W), out = buf_new(x, B_OUT, (size_t)PH * PW * K);
    fill_uniform(&x->rng, H(x, img), (size_t)CH * Hh * W, -2, 2);
    x->a[0] = out, x->a[1] = img;
    x->out = out;
    plan_rows(x, PH * PW, K, K);
    const float *I = H(x, img);
    for (int py = 0; py < PH; py++)
        for (int px = 0; px < PW; px++)
            for (int c = 0; c < CH; c++)
                for (int i = 0; i < PS; i++)
                    for (int j = 0; j < PS; j++)
                        x->ref[(size_t)(py * PW + px) * K + c * PS * PS + i * PS + j] =
                            I[((size_t)c * Hh + py * PS + i) * W + px * PS + j];
    x->bytes = 8.0 * PH * PW * K;
}
static void exec_im2col(op_ctx *x) {
    x->be->im2col_patches(D(x, x->a[0]), D(x, x->a[1]), x->c->p[0], x->c->p[1], x->c->p[2], x->c->p[3]);
}

/* ------------------------------------------------------------------------------------------------
 * embedding: p = {T, C, V}; ids include 0, V-1 and repeats. */
static void setup_embedding(op_ctx *x) {
    int T = x->c->p[0], C = x->c->p[1], V = x->c->p[2];
    snprintf(x->desc, sizeof x->desc, "T=%d C=%d V=%d", T, C, V);
    int ids = buf_new(x, B_IN, T), tab = buf_new(x, B_IN, (size_t)V * C), out = buf_new(x, B_OUT, (size_t)T * C);
    int32_t *I = HI(x, ids);
    for (int t = 0; t < T; t++) I[t] = t == 0 ? V - 1 : t == 1 ? 0 : t == 2 ? I[0] : rng_int(&x->rng, V);
    fill_normal(&x->rng, H(x, tab), (size_t)V * C, 0, 1);
    x->a[0] = out, x->a[1] = ids, x->a[2] = tab;
    x->out = out;
    plan_rows(x, T, C, C);
    for (int t = 0; t < T; t++)
        for (int c = 0; c < C; c++) x->ref[(size_t)t * C + c] = H(x, tab)[(size_t)I[t] * C + c];
    x->bytes = 8.0 * T * C + 4.0 * T;
}
static void exec_embedding(op_ctx *x) {
    x->be->embedding(D(x, x->a[0]), DI(x, x->a[1]), D(x, x->a[2]), x->c->p[0], x->c->p[1]);
}

/* ------------------------------------------------------------------------------------------------
 * add_rows: p = {T, C, row0, table_rows}. x[t] += table[row0 + t]. */
static void setup_add_rows(op_ctx *x) {
    int T = x->c->p[0], C = x->c->p[1], row0 = x->c->p[2], R = x->c->p[3];
    snprintf(x->desc, sizeof x->desc, "T=%d C=%d row0=%d of %d", T, C, row0, R);
    int xb = buf_new(x, B_INOUT, (size_t)T * C), tab = buf_new(x, B_IN, (size_t)R * C);
    fill_normal(&x->rng, H(x, xb), (size_t)T * C, 0, 1);
    fill_normal(&x->rng, H(x, tab), (size_t)R * C, 0, 1);
    x->a[0] = xb, x->a[1] = tab;
    x->out = xb;
    plan_rows(x, T, C, C);
    for (int t = 0; t < T; t++)
        for (int c = 0; c < C; c++)
            x->ref[(size_t)t * C + c] = (double)H(x, xb)[(size_t)t * C + c] + H(x, tab)[(size_t)(row0 + t) * C + c];
    x->bytes = 12.0 * T * C;
    x->flops = (double)T * C;
}
static void exec_add_rows(op_ctx *x) {
    x->be->add_rows(D(x, x->a[0]), D(x, x->a[1]), x->c->p[2], x->c->p[0], x->c->p[1]);
}

/* ------------------------------------------------------------------------------------------------
 * embedding_vp: p = {T, C, V, v0, wdtype}. This rank holds table rows for ids [v0, v0 + V). ids
 * include both ends of the slice, the ids just outside it, −1 (an image row) and a large negative,
 * then random ids from half a slice below to half a slice above. Exact. */
static void setup_embedding_vp(op_ctx *x) {
    int T = x->c->p[0], C = x->c->p[1], V = x->c->p[2], v0 = x->c->p[3], wd = x->c->p[4];
    snprintf(x->desc, sizeof x->desc, "T=%d C=%d rows [%d, %d) %s", T, C, v0, v0 + V, wd_name(wd));
    size_t nt = (size_t)V * C;
    int ids = buf_new(x, B_IN, T), tab = buf_new_w(x, B_IN, nt, wd), out = buf_new(x, B_OUT, (size_t)T * C);
    int32_t *I = HI(x, ids);
    static const int special[] = {0, 1, -1, 2, -2, -3};
    for (int t = 0; t < T; t++) {
        int s = t < 6 ? special[t] : 99;
        I[t] = s == 0 ? v0 : s == 1 ? v0 + V - 1 : s == -1 ? v0 - 1 : s == 2 ? v0 + V : s == -2 ? -1 : s == -3 ? -100000
               : v0 - V / 2 + rng_int(&x->rng, 2 * V);
    }
    if (wd == BLIP2_W_F32) {
        fill_uniform(&x->rng, H(x, tab), nt, -2, 2);
    } else {
        float *f = xmalloc(sizeof(float) * (nt ? nt : 1));
        fill_uniform(&x->rng, f, nt, -2, 2);
        for (size_t i = 0; i < nt; i++) H16(x, tab)[i] = t_to16(f[i], wd);
        free(f);
    }
    x->a[0] = out, x->a[1] = ids, x->a[2] = tab;
    x->out = out;
    plan_rows(x, T, C, C);
    for (int t = 0; t < T; t++) {
        long long local = (long long)I[t] - v0;
        int in = I[t] >= 0 && local >= 0 && local < V;
        for (int c = 0; c < C; c++) x->ref[(size_t)t * C + c] = in ? elem(x, tab, wd, (size_t)local * C + c) : 0.0;
    }
    x->bytes = 4.0 * T * C + (double)blip2_wdtype_size(wd) * T * C + 4.0 * T;
}
static void exec_embedding_vp(op_ctx *x) {
    const int *p = x->c->p;
    x->be->embedding_vp(D(x, x->a[0]), DI(x, x->a[1]), D(x, x->a[2]), p[4], p[0], p[1], p[3], p[2]);
}

/* ------------------------------------------------------------------------------------------------
 * add_rows_at: p = {T, C, R}: x[t] += table[rows[t]] (rows include R−1, 0 and repeats). gather_rows:
 * p = {n, C, R}: out[i] = x[rows[i]] from x [R, C]. Both exact. */
static void fill_rows(op_ctx *x, int32_t *rows, int n, int R) {
    for (int t = 0; t < n; t++) rows[t] = t == 0 ? R - 1 : t == 1 ? 0 : t == 2 ? rows[0] : rng_int(&x->rng, R);
}
static void setup_add_rows_at(op_ctx *x) {
    int T = x->c->p[0], C = x->c->p[1], R = x->c->p[2];
    snprintf(x->desc, sizeof x->desc, "T=%d C=%d of %d table rows", T, C, R);
    int xb = buf_new(x, B_INOUT, (size_t)T * C), tab = buf_new(x, B_IN, (size_t)R * C), rb = buf_new(x, B_IN, T);
    fill_normal(&x->rng, H(x, xb), (size_t)T * C, 0, 1);
    fill_normal(&x->rng, H(x, tab), (size_t)R * C, 0, 1);
    fill_rows(x, HI(x, rb), T, R);
    x->a[0] = xb, x->a[1] = tab, x->a[2] = rb;
    x->out = xb;
    plan_rows(x, T, C, C);
    for (int t = 0; t < T; t++)
        for (int c = 0; c < C; c++)
            x->ref[(size_t)t * C + c] =
                (float)((double)H(x, xb)[(size_t)t * C + c] + H(x, tab)[(size_t)HI(x, rb)[t] * C + c]);
    x->bytes = 12.0 * T * C + 4.0 * T;
    x->flops = (double)T * C;
}
static void exec_add_rows_at(op_ctx *x) {
    x->be->add_rows_at(D(x, x->a[0]), D(x, x->a[1]), DI(x, x->a[2]), x->c->p[0], x->c->p[1]);
}

static void setup_gather_rows(op_ctx *x) {
    int n = x->c->p[0], C = x->c->p[1], R = x->c->p[2];
    snprintf(x->desc, sizeof x->desc, "n=%d C=%d of %d rows", n, C, R);
    int xb = buf_new(x, B_IN, (size_t)R * C), rb = buf_new(x, B_IN, n), out = buf_new(x, B_OUT, (size_t)n * C);
    fill_normal(&x->rng, H(x, xb), (size_t)R * C, 0, 1);
    fill_rows(x, HI(x, rb), n, R);
    x->a[0] = out, x->a[1] = xb, x->a[2] = rb;
    x->out = out;
    plan_rows(x, n, C, C);
    for (int i = 0; i < n; i++)
        for (int c = 0; c < C; c++) x->ref[(size_t)i * C + c] = H(x, xb)[(size_t)HI(x, rb)[i] * C + c];
    x->bytes = 8.0 * n * C + 4.0 * n;
}
static void exec_gather_rows(op_ctx *x) {
    x->be->gather_rows(D(x, x->a[0]), D(x, x->a[1]), DI(x, x->a[2]), x->c->p[0], x->c->p[1]);
}

/* ------------------------------------------------------------------------------------------------
 * argmax_rows: p = {T, n, mode, variant}. mode 0: row t is variant t % AM_COUNT; 1: every row
 * random; 2: every row the given variant (the old scalar argmax cases, T = 1). The expected index
 * comes from the documented semantics (torch.argmax: lowest index on ties; NaN never wins; an
 * all-NaN row gives index 0 and NaN); the hand-made variants state it explicitly. Index and value
 * are checked per row (the value bitwise); the host backend's scalar blip2_argmax too. */
enum {
    AM_RANDOM, AM_TIES, AM_ALL_EQUAL, AM_NAN_MIXED, AM_ALL_NEG_INF, AM_NAN_THEN_NEG_INF, AM_POS_INF_TIES,
    AM_ALL_NAN, AM_LAST, AM_NAN_AT_END, AM_SIGNED_ZERO, AM_NEG_INF_AND_FINITE, AM_COUNT
};
static const char *const am_names[] = {"random", "ties->lowest", "all-equal", "NaN-mixed", "all--inf",
                                       "NaN,-inf,...", "+inf-ties", "all-NaN", "max-last", "NaN-after-max",
                                       "-0,+0 tie", "-inf+one-finite"};

static int argmax_naive(const float *v, int n) {
    int best = -1;
    for (int i = 0; i < n; i++)
        if (!isnan(v[i]) && (best < 0 || v[i] > v[best])) best = i;
    return best < 0 ? 0 : best; /* all NaN: index 0 */
}

/* Fills one row of n (n >= 13 for the hand-made variants) and returns the stated answer (-2: none). */
static int am_fill(op_ctx *x, float *v, int n, int variant) {
    fill_normal(&x->rng, v, n, 0, 1);
    switch (variant) {
    case AM_TIES: {
        int k = n / 3 + rng_int(&x->rng, n / 3);
        v[k] = v[k + 1] = v[n - 1] = 100.0f;
        return k;
    }
    case AM_ALL_EQUAL:
        for (int i = 0; i < n; i++) v[i] = 0.5f;
        return 0;
    case AM_NAN_MIXED:
        for (int i = 0; i < n; i += 3) v[i] = NAN;
        v[0] = NAN;
        v[n / 2] = 50.0f;
        v[n / 2 + 1] = NAN;
        return n / 2;
    case AM_ALL_NEG_INF:
        for (int i = 0; i < n; i++) v[i] = -INFINITY;
        return 0;
    case AM_NAN_THEN_NEG_INF:
        for (int i = 0; i < n; i++) v[i] = -INFINITY;
        v[0] = NAN;
        return 1;
    case AM_POS_INF_TIES:
        v[n / 4] = v[n / 2] = INFINITY;
        return n / 4;
    case AM_ALL_NAN:
        for (int i = 0; i < n; i++) v[i] = NAN;
        return 0;
    case AM_LAST:
        v[n - 1] = 1e6f;
        return n - 1;
    case AM_NAN_AT_END:
        for (int i = 0; i < n - 1; i++) v[i] = (float)i;
        v[n - 1] = NAN;
        return n - 2;
    case AM_SIGNED_ZERO:
        for (int i = 0; i < n; i++) v[i] = -1.0f;
        v[1] = -0.0f;
        v[2] = 0.0f;
        return 1;
    case AM_NEG_INF_AND_FINITE:
        for (int i = 0; i < n; i++) v[i] = -INFINITY;
        v[n - 2] = -1e30f;
        return n - 2;
    default: return -2;
    }
}

static void setup_argmax_rows(op_ctx *x) {
    int T = x->c->p[0], n = x->c->p[1], mode = x->c->p[2], variant = x->c->p[3];
    if (mode == 2) snprintf(x->desc, sizeof x->desc, "T=%d n=%d %s", T, n, am_names[variant]);
    else snprintf(x->desc, sizeof x->desc, "T=%d n=%d %s", T, n, mode == 0 ? "a variant per row" : "random rows");
    int xb = buf_new(x, B_IN, (size_t)T * n), ib = buf_new(x, B_OUT, T), vb = buf_new(x, B_OUT, T);
    int32_t *expect = xmalloc(sizeof(int32_t) * T);
    for (int t = 0; t < T; t++) {
        float *row = H(x, xb) + (size_t)t * n;
        int var = mode == 0 ? t % AM_COUNT : mode == 1 ? AM_RANDOM : variant;
        int stated = am_fill(x, row, n, var);
        expect[t] = argmax_naive(row, n);
        if (stated != -2)
            CHECK(stated == expect[t], "argmax test table: naive reference %d vs stated %d (%s, row %d)", expect[t], stated,
                  am_names[var], t);
    }
    x->a[0] = ib, x->a[1] = vb, x->a[2] = xb;
    x->out = -1; /* extra checks index and value */
    x->aux = expect;
    x->bytes = 4.0 * T * n;
}
static void exec_argmax_rows(op_ctx *x) {
    x->be->argmax_rows(DI(x, x->a[0]), D(x, x->a[1]), D(x, x->a[2]), x->c->p[0], x->c->p[1]);
}
static void extra_argmax_rows(op_ctx *x) {
    int T = x->c->p[0], n = x->c->p[1];
    const int32_t *expect = x->aux, *idx = HI(x, x->a[0]);
    const float *val = H(x, x->a[1]), *X = H(x, x->a[2]);
    for (int t = 0; t < T; t++) {
        const float *row = X + (size_t)t * n;
        CHECK(idx[t] == expect[t], "[%s argmax_rows %s] row %d: index %d, expected %d", x->be->name, x->desc, t, idx[t],
              expect[t]);
        float want = row[expect[t]];
        CHECK(memcmp(&val[t], &want, 4) == 0 || (isnan(want) && isnan(val[t])),
              "[%s argmax_rows %s] row %d: value %g, expected %g", x->be->name, x->desc, t, val[t], want);
        if (x->be == &blip2_cpu_ops) {
            int s = blip2_argmax(row, n);
            CHECK(s == expect[t], "[cpu argmax %s] row %d: index %d, expected %d", x->desc, t, s, expect[t]);
        }
    }
}

/* ------------------------------------------------------------------------------------------------
 * penalize_rows: p = {T, n, v0, H}. Rows of logits N(0, 2) (both signs) holding the vocab slice
 * [v0, v0 + n); row t gets 0..H distinct ids drawn from [v0 − 50, v0 + n + 50) ∩ [0, ∞) (some
 * outside the slice: skipped), with the slice's first and last id in every third row; penalties
 * in [0.5, 2]. Bitwise: one float multiply or divide per element. */
static void setup_penalize_rows(op_ctx *x) {
    int T = x->c->p[0], n = x->c->p[1], v0 = x->c->p[2], maxh = x->c->p[3];
    snprintf(x->desc, sizeof x->desc, "T=%d n=%d v0=%d up to %d ids a row", T, n, v0, maxh);
    int lo = v0 > 50 ? v0 - 50 : 0, R = v0 + n + 50 - lo;
    int32_t *perm = xmalloc(sizeof(int32_t) * (size_t)R), *offs = xmalloc(sizeof(int32_t) * (size_t)(T + 1));
    offs[0] = 0;
    for (int t = 0; t < T; t++) offs[t + 1] = offs[t] + (maxh < R ? rng_int(&x->rng, maxh + 1) : R);
    int xb = buf_new(x, B_INOUT, (size_t)T * n), ib = buf_new(x, B_IN, (size_t)(offs[T] ? offs[T] : 1));
    int ob = buf_new(x, B_IN, (size_t)T + 1), pb = buf_new(x, B_IN, (size_t)T);
    float *X = H(x, xb), *P = H(x, pb);
    int32_t *ids = HI(x, ib);
    fill_normal(&x->rng, X, (size_t)T * n, 0.0f, 2.0f);
    memcpy(HI(x, ob), offs, sizeof(int32_t) * (size_t)(T + 1));
    for (int t = 0; t < T; t++) {
        int cnt = offs[t + 1] - offs[t];
        for (int i = 0; i < R; i++) perm[i] = lo + i;
        shuffle_i32(&x->rng, perm, R);
        if (t % 3 == 0 && cnt >= 2) { /* the slice's edges */
            for (int i = 0; i < R; i++)
                if (perm[i] == v0 || perm[i] == v0 + n - 1) {
                    int32_t tmp = perm[i], j = perm[i] == v0 ? 0 : 1;
                    perm[i] = perm[j], perm[j] = tmp;
                }
        }
        memcpy(ids + offs[t], perm, sizeof(int32_t) * (size_t)cnt);
        P[t] = rng_uniform(&x->rng, 0.5f, 2.0f);
    }
    x->a[0] = xb, x->a[1] = ib, x->a[2] = ob, x->a[3] = pb;
    x->out = xb;
    plan_rows(x, T, n, 0);
    x->row_step = 1;
    for (size_t i = 0; i < (size_t)T * n; i++) x->ref[i] = X[i];
    for (int t = 0; t < T; t++)
        for (int k = offs[t]; k < offs[t + 1]; k++) {
            int j = ids[k] - v0;
            if (j < 0 || j >= n) continue;
            float v = X[(size_t)t * n + j];
            x->ref[(size_t)t * n + j] = v < 0 ? v * P[t] : v / P[t];
        }
    free(perm), free(offs);
}
static void exec_penalize_rows(op_ctx *x) {
    x->be->penalize_rows(D(x, x->a[0]), DI(x, x->a[1]), DI(x, x->a[2]), D(x, x->a[3]), x->c->p[0], x->c->p[1], x->c->p[2]);
}

/* ------------------------------------------------------------------------------------------------
 * logsumexp_rows: p = {T, n, variant}. Rows N(0, 3); variant 1: every third row all −inf, the
 * others with a −inf every 7th value (a masked logit). out [T, 2] = (max, Σ exp(x − max)), (0, 0)
 * for an all −inf row, against a double reference (tol 1e-6: the sum's order is the backend's).
 * shift_rows: p = {T, n}; x − shift[t], bitwise. */
static void setup_logsumexp_rows(op_ctx *x) {
    int T = x->c->p[0], n = x->c->p[1], variant = x->c->p[2];
    snprintf(x->desc, sizeof x->desc, "T=%d n=%d%s", T, n, variant ? " with -inf values and rows" : "");
    int xb = buf_new(x, B_IN, (size_t)T * n), ob = buf_new(x, B_OUT, (size_t)T * 2);
    float *X = H(x, xb);
    fill_normal(&x->rng, X, (size_t)T * n, 0.0f, 3.0f);
    for (int t = 0; variant && t < T; t++)
        for (int j = 0; j < n; j++)
            if (t % 3 == 0 || j % 7 == 3) X[(size_t)t * n + j] = -INFINITY;
    x->a[0] = ob, x->a[1] = xb;
    x->out = ob;
    plan_rows(x, T, 2, 0);
    x->row_step = 1;
    for (int t = 0; t < T; t++) {
        const float *row = X + (size_t)t * n;
        float mx = -INFINITY;
        for (int j = 0; j < n; j++) mx = row[j] > mx ? row[j] : mx;
        double sum = 0;
        for (int j = 0; mx > -INFINITY && j < n; j++) sum += exp((double)row[j] - mx);
        x->ref[2 * t] = mx > -INFINITY ? mx : 0.0, x->ref[2 * t + 1] = sum;
    }
    x->bytes = 8.0 * T * n;
}
static void exec_logsumexp_rows(op_ctx *x) {
    x->be->logsumexp_rows(D(x, x->a[0]), D(x, x->a[1]), x->c->p[0], x->c->p[1]);
}
static void setup_shift_rows(op_ctx *x) {
    int T = x->c->p[0], n = x->c->p[1];
    snprintf(x->desc, sizeof x->desc, "T=%d n=%d", T, n);
    int xb = buf_new(x, B_INOUT, (size_t)T * n), sb = buf_new(x, B_IN, (size_t)T);
    fill_normal(&x->rng, H(x, xb), (size_t)T * n, 0.0f, 3.0f);
    fill_normal(&x->rng, H(x, sb), (size_t)T, 5.0f, 2.0f);
    x->a[0] = xb, x->a[1] = sb;
    x->out = xb;
    plan_rows(x, T, n, 0);
    x->row_step = 1;
    for (size_t i = 0; i < (size_t)T * n; i++) x->ref[i] = H(x, xb)[i] - H(x, sb)[i / (size_t)n];
    x->bytes = 8.0 * T * n;
}
static void exec_shift_rows(op_ctx *x) { x->be->shift_rows(D(x, x->a[0]), D(x, x->a[1]), x->c->p[0], x->c->p[1]); }

/* ------------------------------------------------------------------------------------------------
 * topk_rows: p = {T, n, k, quantize}. Row t is argmax variant t % AM_COUNT (ties, NaN, ±inf, all
 * equal, ...); quantize rounds random values to a 1/8 grid so ties are everywhere. The reference
 * sorts each row's indices in argmax order (NaN last, larger first, the lower index on ties) with
 * an independent comparison; indices and values are checked bitwise. */
static const float *g_topk_row; /* the row qsort compares in */
static int topk_cmp(const void *a, const void *b) {
    int i = *(const int *)a, j = *(const int *)b;
    float u = g_topk_row[i], v = g_topk_row[j];
    if (isnan(u) != isnan(v)) return isnan(u) ? 1 : -1;
    if (!isnan(u) && u != v) return u > v ? -1 : 1;
    return (i > j) - (i < j);
}
static void setup_topk_rows(op_ctx *x) {
    int T = x->c->p[0], n = x->c->p[1], k = x->c->p[2], quant = x->c->p[3];
    snprintf(x->desc, sizeof x->desc, "T=%d n=%d k=%d%s", T, n, k, quant ? " values on a 1/8 grid (many ties)" : "");
    int xb = buf_new(x, B_IN, (size_t)T * n), ib = buf_new(x, B_OUT, (size_t)T * k), vb = buf_new(x, B_OUT, (size_t)T * k);
    int32_t *expect = xmalloc(sizeof(int32_t) * (size_t)T * k), *order = xmalloc(sizeof(int32_t) * n);
    for (int t = 0; t < T; t++) {
        float *row = H(x, xb) + (size_t)t * n;
        am_fill(x, row, n, n >= 13 ? t % AM_COUNT : AM_RANDOM); /* the hand-made variants need n >= 13 */
        for (int i = 0; quant && i < n; i++)
            if (isfinite(row[i])) row[i] = roundf(row[i] * 8.0f) / 8.0f;
        for (int i = 0; i < n; i++) order[i] = i;
        g_topk_row = row;
        qsort(order, (size_t)n, sizeof *order, topk_cmp);
        memcpy(expect + (size_t)t * k, order, sizeof(int32_t) * k);
    }
    free(order);
    x->a[0] = ib, x->a[1] = vb, x->a[2] = xb;
    x->out = -1; /* extra checks indices and values */
    x->aux = expect;
    x->bytes = 4.0 * T * n * k;
}
static void exec_topk_rows(op_ctx *x) {
    x->be->topk_rows(DI(x, x->a[0]), D(x, x->a[1]), D(x, x->a[2]), x->c->p[0], x->c->p[1], x->c->p[2]);
}
static void extra_topk_rows(op_ctx *x) {
    int T = x->c->p[0], n = x->c->p[1], k = x->c->p[2], bad = 0;
    const int32_t *expect = x->aux, *idx = HI(x, x->a[0]);
    const float *val = H(x, x->a[1]), *X = H(x, x->a[2]);
    for (int t = 0; t < T; t++)
        for (int j = 0; j < k; j++) {
            size_t o = (size_t)t * k + j;
            float want = X[(size_t)t * n + expect[o]];
            int ok = idx[o] == expect[o] && (memcmp(&val[o], &want, 4) == 0 || (isnan(want) && isnan(val[o])));
            if (!ok && bad++ < 3)
                CHECK(0, "[%s topk_rows %s] row %d, rank %d: (%d, %g), expected (%d, %g)", x->be->name, x->desc, t, j, idx[o],
                      val[o], expect[o], want);
        }
    CHECK(bad == 0, "[%s topk_rows %s] %d wrong entries", x->be->name, x->desc, bad);
}

/* ------------------------------------------------------------------------------------------------
 * fill_normal: p = {n, wdtype, seed}, f = mean, f2 = std. Element i must be the documented
 * generator of (seed, i): the reference evaluates it in double (fp32: relative L2 <= 1e-6 against
 * mean + std·g in double; 16-bit: against the RNE rounding of the fp32 value, computed here with
 * the same float steps as the op, so only libm's last bits may differ). std = 0: exactly mean.
 * Large fills also check the sample mean, std and the share within one std. */
static double normal_ref(uint64_t seed, size_t i) {
    uint64_t z = seed + (uint64_t)(i + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    double u1 = ((double)(z >> 32) + 0.5) / 4294967296.0, u2 = ((double)(z & 0xffffffffu) + 0.5) / 4294967296.0;
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}
static uint64_t fill_seed(const op_ctx *x) { return g_seed * 0x2545F4914F6CDD1Dull + (uint64_t)x->c->p[2]; }

static void setup_fill_normal(op_ctx *x) {
    int n = x->c->p[0], wd = x->c->p[1];
    float mean = x->c->f, sd = x->c->f2;
    uint64_t seed = fill_seed(x);
    snprintf(x->desc, sizeof x->desc, "n=%d %s mean=%g std=%g", n, wd_name(wd), mean, sd);
    int out = buf_new_w(x, B_OUT, n, wd);
    x->a[0] = out;
    x->out = out;
    x->out_type = wd;
    plan_rows(x, 1, n, 60.0 * n);
    x->row_step = 1; /* cheap enough: always every element */
    for (int i = 0; i < n; i++) {
        double g = normal_ref(seed, (size_t)i);
        if (sd == 0.0f) {
            x->ref[i] = wd == BLIP2_W_F32 ? mean : t_from16(t_to16(mean, wd), wd);
        } else if (wd == BLIP2_W_F32) {
            x->ref[i] = (double)mean + (double)sd * g;
        } else {
            float gf = (float)g, prod = sd * gf, v = mean + prod;
            x->ref[i] = t_from16(t_to16(v, wd), wd);
        }
    }
    x->bytes = (double)blip2_wdtype_size(wd) * n;
}
static void exec_fill_normal(op_ctx *x) {
    x->be->fill_normal(D(x, x->a[0]), x->c->p[1], (size_t)x->c->p[0], fill_seed(x), x->c->f, x->c->f2);
}
static void extra_fill_normal(op_ctx *x) {
    int n = x->c->p[0], wd = x->c->p[1];
    float mean = x->c->f, sd = x->c->f2;
    if (n < 10000 || sd == 0.0f) return;
    double s = 0, ss = 0, within = 0;
    for (int i = 0; i < n; i++) {
        double v = elem(x, x->a[0], wd, (size_t)i);
        s += v;
        ss += v * v;
        within += fabs(v - mean) <= sd;
    }
    double m = s / n, var = ss / n - m * m, sdev = sqrt(var > 0 ? var : 0), frac = within / n;
    /* 6σ of the estimators, plus the 16-bit rounding of the values. */
    double q = wd == BLIP2_W_BF16 ? 1.0 / 128 : wd == BLIP2_W_F16 ? 1.0 / 1024 : 0;
    CHECK(fabs(m - mean) <= 6 * sd / sqrt(n) + q * sd, "[%s fill_normal %s] sample mean %g", x->be->name, x->desc, m);
    CHECK(fabs(sdev / sd - 1) <= 6 / sqrt(2.0 * n) + q, "[%s fill_normal %s] sample std %g", x->be->name, x->desc, sdev);
    CHECK(fabs(frac - 0.682689) <= 6 * 0.4654 / sqrt(n) + 2 * q, "[%s fill_normal %s] %.4f within one std",
          x->be->name, x->desc, frac);
}

/* ------------------------------------------------------------------------------------------------
 * The table. Model shapes: BLIP-2 OPT-2.7b (vision C 1408, mlp 6144, T 257, 16×88 heads; Q-Former C
 * 768, mlp 3072, 12×64 heads, 32 queries; OPT C 2560, ffn 10240, 32×80 heads; prompt 45 = 32 image
 * tokens + BOS + 12; KV blocks of 16 positions; a 4-way vocab split of 50272 rows), then odd sizes
 * (1, 3, 7, 13, 65, 77). */
#define MM(T, C, OC, b, note) {"matmul", note, setup_matmul, exec_matmul, extra_matmul, {T, C, OC, b}, 0, 1e-5, 0, 0}
#define MMH(T, C, OC, b, wd, act, note) \
    {"matmul_h", note, setup_matmul_h, exec_matmul_h, extra_matmul_h, {T, C, OC, b, wd, act}, 0, 1e-5, 1e-2, 0}
#define LN(T, C, inpl, var, eps, note) \
    {"layernorm", note, setup_layernorm, exec_layernorm, extra_layernorm, {T, C, inpl, var}, eps, 1e-5, 0, 0}
#define RLN(T, C, alias, var, bias, eps, note) \
    {"residual_layernorm", note, setup_residual_layernorm, exec_residual_layernorm, NULL, {T, C, alias, var, bias}, eps, 1e-5, 0, 0}
/* The _a ops: 16-bit outputs are compared to the rounded reference (tol 1e-4, see round_ref). */
#define TOL_A(ad) ((ad) == F32 ? 1e-5 : 1e-4)
#define LNA(T, C, inpl, var, eps, ad, note) \
    {"layernorm_a", note, setup_layernorm, exec_layernorm_a, NULL, {T, C, inpl, var, ad}, eps, TOL_A(ad), 0, 0}
/* GELU in fp32 on the device and in double in the reference can round to neighbouring 16-bit
 * values where the value sits at a rounding midpoint: one such element of a handful is 2^-11 (f16)
 * or 2^-8 (bf16) of the whole, so cases under 100 elements allow that much. */
#define TOL_ACT(n, ad) ((ad) == F32 || (n) >= 100 ? TOL_A(ad) : (ad) == F16 ? 1e-3 : 8e-3)
#define ACTA(n, act, ad, inpl, note) \
    {"activate_a", note, setup_activate_a, exec_activate_a, NULL, {n, act, ad, inpl}, 0, TOL_ACT(n, ad), 0, 0}
/* x of xdtype (a 16-bit matmul's output). Without GELU, into fp32 or xd's own type, the result is
 * exact: tol 0 (bitwise). */
#define ACTX(n, act, xd, ad, inpl, note) \
    {"activate_a", note, setup_activate_a, exec_activate_a, NULL, {n, act, ad, inpl, xd}, 0, \
     (act) != A_GELU && ((ad) == F32 || (ad) == (xd)) ? 0 : TOL_ACT(n, ad), 0, 0}
#define MMA(T, C, OC, b, ad, wd, act, note) \
    {"matmul_a", note, setup_matmul_a, exec_matmul_a, extra_matmul_a, {T, C, OC, b, ad, wd, act}, 0, 1e-5, \
     (ad) == F32 && (wd) != F32 ? 1e-2 : 0, 0}
/* A 16-bit result of a long fp32 sum (a matmul, attention) against the rounded reference: where
 * the fp32 value and the double one straddle a rounding midpoint they round to neighbours. With a
 * sum's fp32 error (~3e-7) that is a few elements of thousands, each a whole ulp: in bf16 (2^-8)
 * up to ~2.5e-4 over 40 seeds, so 5e-4 (rounding by truncation is ~3e-3); f16 as TOL_A. */
#define TOL_SUM16(t) ((t) == BF16 ? 5e-4 : TOL_A(t))
/* A 16-bit out and bias (od = wd); fp32 inputs with 16-bit weights keep matmul_h's device bound
 * (its inputs rounded). */
#define MMAO(T, C, OC, b, ad, wd, act, od, note) \
    {"matmul_a", note, setup_matmul_a, exec_matmul_a, extra_matmul_a, {T, C, OC, b, ad, wd, act, od}, 0, \
     TOL_SUM16(od), (ad) == F32 && (wd) != F32 ? 1e-2 : 0, 0}
/* out += the product (fp32 out and bias): matmul_a's bounds. */
#define MACC(T, C, OC, b, ad, wd, note) \
    {"matmul_acc_a", note, setup_matmul_acc_a, exec_matmul_acc_a, extra_matmul_acc_a, {T, C, OC, b, ad, wd}, 0, 1e-5, \
     (ad) == F32 && (wd) != F32 ? 1e-2 : 0, 0}
/* matmul_a of LN(x): the reference h exact (see setup_matmul_ln_a), so matmul_a's bounds. */
#define MLN(T, C, OC, b, ad, wd, act, od, var, eps, note) \
    {"matmul_ln_a", note, setup_matmul_ln_a, exec_matmul_ln_a, extra_matmul_ln_a, {T, C, OC, b, ad, wd, act, od, var}, eps, \
     TOL_SUM16(od), (ad) == F32 && (wd) != F32 ? 1e-2 : 0, 0}
#define ATT(Tq, Tk, NH, HS, causal, layout, pad, amp, scale, note) ATTB(1, Tq, Tk, NH, HS, causal, layout, pad, amp, scale, note)
#define ATTB(B, Tq, Tk, NH, HS, causal, layout, pad, amp, scale, note) \
    {"attention", note, setup_attention, exec_attention, NULL, {Tq, Tk, NH, HS, causal, layout, pad, amp, B, F32}, scale, 1e-5, 0, 0}
/* A 16-bit model's attention on the device: not causal and HS <= 128, the mma kernel
 * (kernels/cuda/attention_mma.cu: q, k, v and P in the weights' type, unless BLIP2_MMA_ATTN=0),
 * otherwise TF32 products (8 to 11 significant bits either way: 1e-2 like matmul_h). */
#define ATT16(B, Tq, Tk, NH, HS, layout, wd, note) \
    {"attention", note, setup_attention, exec_attention, NULL, {Tq, Tk, NH, HS, 0, layout, 0, 0, B, wd}, 0, 1e-5, 1e-2, 0}
/* 16-bit q, k, v and out (iodtype = wd: a 16-bit matmul's outputs read as they are). The reference
 * backend computes fp32 on the widened values (TOL_SUM16); the device's products are 16-bit or
 * TF32 as in ATT16 (1e-2). Causal, or HS > 128, is not the mma kernel's. */
#define ATTIO(B, Tq, Tk, NH, HS, causal, layout, pad, wd, note) \
    {"attention", note, setup_attention, exec_attention, NULL, {Tq, Tk, NH, HS, causal, layout, pad, 0, B, wd, wd}, 0, \
     TOL_SUM16(wd), 1e-2, 0}
#define ATT_REL(Tq, Tk, NH, HS, note) \
    {"attention", note, setup_attention_rel, exec_attention_rel, extra_attention_rel, {Tq, Tk, NH, HS, 1, 0, 3, 0}, 0, 1e-5, 0, 0}
#define PAGED(Tq, Tk, NH, HS, BS, pad, scale, note) \
    {"attention_paged", note, setup_attention_paged, exec_attention_paged, NULL, {Tq, Tk, NH, HS, BS, pad, 0, 0, F32, 0}, scale, 1e-5, 0, 0}
/* A 16-bit cache at one sequence (mix 0): the warp-per-head kernel's shapes. */
#define PAGED16(Tq, Tk, NH, HS, BS, pad, kvd, note) \
    {"attention_paged", note, setup_attention_paged, exec_attention_paged, NULL, {Tq, Tk, NH, HS, BS, pad, 0, 0, kvd, 0}, 0, 1e-5, 0, 0}
/* The same with the new rows' keys and values written by the op (k_new/v_new). */
#define PAGEDF(mix, order, NH, HS, BS, pad, kvd, qpad, note) \
    {"attention_paged", note, setup_attention_paged, exec_attention_paged, NULL, {0, 0, NH, HS, BS, pad, mix, order, kvd, qpad, 1}, 0, 1e-5, 0, 0}
#define PAGEDM(mix, order, NH, HS, BS, pad, kvd, qpad, note) \
    {"attention_paged", note, setup_attention_paged, exec_attention_paged, NULL, {0, 0, NH, HS, BS, pad, mix, order, kvd, qpad}, 0, 1e-5, 0, 0}
/* 16-bit outputs (what out_proj reads), fused KV write or not. */
#define PAGEDO(mix, order, NH, HS, BS, pad, kvd, qpad, fused, od, note) \
    {"attention_paged", note, setup_attention_paged, exec_attention_paged, NULL, {0, 0, NH, HS, BS, pad, mix, order, kvd, qpad, fused, od}, 0, TOL_SUM16(od), 0, 0}
#define KVW(mix, C, BS, order, kvd, pad, note) \
    {"kv_write", note, setup_kv_write, exec_kv_write, NULL, {mix, C, BS, order, kvd, pad}, 0, 0, 0, 0}
#define SM(T, n, var, note) {"softmax", note, setup_softmax, exec_softmax, NULL, {T, n, var}, 0, 1e-5, 0, 0}
#define UN(op, n, tol, note) {#op, note, setup_##op, exec_##op, NULL, {n}, 0, tol, 0, 0}
#define RES(n, note) {"residual_add", note, setup_residual_add, exec_residual_add, NULL, {n}, 0, 0, 0, 0}
#define I2C(CH, Hh, W, PS, note) {"im2col_patches", note, setup_im2col, exec_im2col, NULL, {CH, Hh, W, PS}, 0, 0, 0, 0}
#define EMB(T, C, V, note) {"embedding", note, setup_embedding, exec_embedding, NULL, {T, C, V}, 0, 0, 0, 0}
#define EMBVP(T, C, V, v0, wd, note) {"embedding_vp", note, setup_embedding_vp, exec_embedding_vp, NULL, {T, C, V, v0, wd}, 0, 0, 0, 0}
#define ADDR(T, C, row0, R, note) {"add_rows", note, setup_add_rows, exec_add_rows, NULL, {T, C, row0, R}, 0, 0, 0, 0}
#define ADDRAT(T, C, R, note) {"add_rows_at", note, setup_add_rows_at, exec_add_rows_at, NULL, {T, C, R}, 0, 0, 0, 0}
#define GATHER(n, C, R, note) {"gather_rows", note, setup_gather_rows, exec_gather_rows, NULL, {n, C, R}, 0, 0, 0, 0}
#define AM(n, var, note) {"argmax_rows", note, setup_argmax_rows, exec_argmax_rows, extra_argmax_rows, {1, n, 2, var}, 0, 0, 0, 0}
#define TOPK(T, n, k, q, note) {"topk_rows", note, setup_topk_rows, exec_topk_rows, extra_topk_rows, {T, n, k, q}, 0, 0, 0, 0}
#define PEN(T, n, v0, H, note) {"penalize_rows", note, setup_penalize_rows, exec_penalize_rows, NULL, {T, n, v0, H}, 0, 0, 0, 0}
#define LSE(T, n, var, note) {"logsumexp_rows", note, setup_logsumexp_rows, exec_logsumexp_rows, NULL, {T, n, var}, 0, 1e-6, 0, 0}
#define SHIFT(T, n, note) {"shift_rows", note, setup_shift_rows, exec_shift_rows, NULL, {T, n}, 0, 0, 0, 0}
#define AMR(T, n, mode, note) {"argmax_rows", note, setup_argmax_rows, exec_argmax_rows, extra_argmax_rows, {T, n, mode, 0}, 0, 0, 0, 0}
#define FILL(n, wd, seed, mean, sd, note) \
    {"fill_normal", note, setup_fill_normal, exec_fill_normal, extra_fill_normal, {n, wd, seed}, mean, (sd) == 0 ? 0 : 1e-6, 0, sd}

#define F16 BLIP2_W_F16
#define BF16 BLIP2_W_BF16
#define F32 BLIP2_W_F32
#define A_NONE BLIP2_ACT_NONE
#define A_GELU BLIP2_ACT_GELU
#define A_RELU BLIP2_ACT_RELU

static const op_case cases[] = {
    MM(257, 1408, 4224, 1, "vision qkv"),
    MM(257, 1408, 1408, 1, "vision proj"),
    MM(257, 6144, 1408, 1, "vision fc2 (K=6144)"),
    MM(256, 588, 1408, 1, "patch embedding"),
    MM(257, 1408, 768, 1, "Q-Former cross k/v"),
    MM(32, 768, 3072, 1, "Q-Former fc1"),
    MM(32, 768, 2560, 1, "language projection"),
    MM(45, 2560, 2560, 1, "OPT prefill q/k/v/o"),
    MM(45, 10240, 2560, 1, "OPT prefill fc2 (K=10240)"),
    MM(1, 2560, 10240, 1, "OPT decode fc1"),
    MM(1, 10240, 2560, 1, "OPT decode fc2 (K=10240)"),
    MM(1, 1, 1, 0, "odd"),
    MM(1, 3, 1, 1, "odd"),
    MM(3, 7, 13, 1, "odd"),
    MM(7, 13, 65, 0, "odd"),
    MM(13, 65, 3, 1, "odd"),
    MM(65, 1, 7, 1, "odd"),
    MM(65, 65, 65, 1, "odd"),

    MMH(1, 2560, 7680, 1, F16, A_NONE, "OPT decode fused qkv"),
    MMH(1, 2560, 2560, 1, BF16, A_NONE, "OPT decode out proj"),
    MMH(1, 2560, 10240, 1, F16, A_RELU, "OPT decode fc1 + ReLU"),
    MMH(1, 10240, 2560, 1, BF16, A_NONE, "OPT decode fc2 (K=10240)"),
    MMH(7, 10240, 2560, 1, F16, A_NONE, "OPT batched decode fc2"),
    MMH(7, 2560, 10240, 1, BF16, A_RELU, "OPT batched decode fc1"),
    MMH(64, 2560, 7680, 1, BF16, A_NONE, "OPT prefill chunk qkv"),
    MMH(64, 10240, 2560, 1, F16, A_NONE, "OPT prefill chunk fc2"),
    MMH(257, 1408, 6144, 1, F16, A_GELU, "vision fc1 + GELU"),
    MMH(257, 1408, 2560, 1, BF16, A_GELU, "GELU, C=1408"),
    MMH(32, 768, 3072, 1, BF16, A_GELU, "Q-Former fc1 + GELU"),
    MMH(45, 2560, 2560, 0, F16, A_RELU, "no bias + ReLU"),
    MMH(13, 1408, 2560, 0, BF16, A_GELU, "no bias + GELU"),
    MMH(1, 2560, 77, 1, BF16, A_NONE, "odd OC"),
    MMH(7, 77, 13, 0, F16, A_RELU, "odd"),
    MMH(3, 13, 77, 1, BF16, A_GELU, "odd"),
    MMH(257, 65, 7, 1, F16, A_NONE, "odd"),
    MMH(1, 1, 1, 0, F16, A_NONE, "odd"),
    MMH(1, 3, 1, 1, BF16, A_RELU, "odd"),
    MMH(8, 2560, 2560, 1, BF16, A_GELU, "GEMV T=8 + GELU"),
    MMH(8, 10240, 2560, 0, F16, A_NONE, "GEMV T=8, K=10240"),
    MMH(9, 2560, 2560, 1, F16, A_NONE, "just above the GEMV threshold"),
    MMH(2, 10240, 2560, 1, F16, A_RELU, "GEMV T=2"),
    MMH(4, 2560, 7680, 1, BF16, A_NONE, "GEMV T=4"),
    MMH(5, 2560, 77, 0, F16, A_GELU, "GEMV T=5, rows not a multiple of 4"),
    MMH(3, 1408, 77, 1, BF16, A_RELU, "GEMV T=3, odd OC"),
    MMH(6, 88, 65, 1, BF16, A_RELU, "GEMV T=6, small C"),
    MMH(1, 1410, 2560, 1, F16, A_GELU, "GEMV C % 8 != 0"),
    MMH(8, 1410, 1000, 1, BF16, A_NONE, "GEMV T=8, C % 8 != 0"),
    MMH(4, 77, 2563, 0, BF16, A_NONE, "GEMV odd C and OC"),

    LN(257, 1408, 0, 0, 1e-6f, "vision"),
    LN(32, 768, 0, 0, 1e-12f, "Q-Former"),
    LN(45, 2560, 0, 0, 1e-5f, "OPT prefill"),
    LN(1, 2560, 1, 0, 1e-5f, "OPT final LN, in place"),
    LN(13, 1408, 0, 1, 1e-5f, "variance 0"),
    LN(13, 768, 0, 1, 1e-6f, "variance 0"),
    LN(13, 65, 1, 1, 1e-12f, "variance 0, in place"),
    LN(7, 2560, 0, 2, 1e-5f, "large mean"),
    LN(5, 2560, 0, 3, 1e-5f, "OPT eps matters"),
    LN(5, 1408, 0, 3, 1e-6f, "vision eps matters"),
    LN(5, 768, 1, 3, 1e-12f, "Q-Former eps matters"),
    LN(1, 1, 0, 0, 1e-5f, "odd (C=1: variance 0)"),
    LN(3, 7, 0, 0, 1e-12f, "odd"),
    LN(3, 5000, 0, 0, 1e-5f, "C above the registers' 4096: the loop kernel"),
    LN(300, 2560, 0, 0, 1e-5f, "300 rows: the loop kernel (row 0 alone: the register kernel)"),
    LN(300, 1408, 0, 0, 1e-6f, "300 rows of vision's C: 8 a thread in registers, any number of rows"),
    LN(3, 2049, 0, 0, 1e-5f, "C just above 8 a thread: 16 in registers"),
    LN(3, 1025, 0, 3, 1e-6f, "C just above 4 a thread: 8 in registers, eps matters"),
    LN(65, 13, 1, 0, 1e-6f, "odd"),

    RLN(45, 2560, 0, 0, 1, 1e-5f, "OPT prefill: + out_proj/fc2 bias"),
    RLN(45, 2560, 1, 0, 1, 1e-5f, "OPT prefill, out aliases y"),
    RLN(1, 2560, 1, 0, 1, 1e-5f, "OPT decode, out aliases y"),
    RLN(64, 2560, 1, 0, 1, 1e-5f, "OPT decode batch 64"),
    RLN(257, 1408, 0, 0, 0, 1e-6f, "vision"),
    RLN(514, 1408, 1, 0, 0, 1e-6f, "vision, 2 images (8 a thread in registers), out aliases y"),
    RLN(32, 768, 1, 0, 0, 1e-12f, "Q-Former, out aliases y"),
    RLN(13, 2560, 0, 1, 0, 1e-5f, "variance 0 rows"),
    RLN(13, 2560, 0, 1, 1, 1e-5f, "variance 0 rows with a bias"),
    RLN(3, 4097, 1, 0, 1, 1e-5f, "C above the registers' 4096: the loop kernel, out aliases y"),
    RLN(7, 2560, 1, 2, 1, 1e-5f, "large mean, out aliases y"),
    RLN(1, 1, 0, 0, 1, 1e-5f, "odd"),
    RLN(3, 7, 1, 0, 0, 1e-12f, "odd"),
    RLN(65, 13, 0, 1, 1, 1e-6f, "odd"),

    LNA(257, 1408, 0, 0, 1e-6f, F16, "vision LN1 -> qkv input"),
    LNA(257, 1408, 0, 0, 1e-6f, BF16, "vision LN1 -> qkv input"),
    LNA(13, 1408, 0, 1, 1e-5f, F16, "variance 0"),
    LNA(7, 2560, 0, 2, 1e-5f, BF16, "large mean"),
    LNA(3, 7, 1, 0, 1e-12f, F32, "odd, fp32 in place"),
    LNA(65, 13, 0, 0, 1e-6f, F16, "odd (odd element count)"),
    ACTA(257 * 6144, A_GELU, F16, 0, "vision fc1 GELU -> fc2 input"),
    ACTA(257 * 6144, A_GELU, BF16, 0, "vision fc1 GELU -> fc2 input"),
    ACTA(257 * 1408, A_NONE, F16, 0, "image rows -> cross-attention k/v input"),
    ACTA(4099, A_RELU, BF16, 0, "odd"),
    ACTA(4099, A_GELU, F32, 1, "fp32 in place"),
    ACTA(4096, A_GELU, F32, 1, "fp32 in place, 4 a thread"),
    ACTA(4100, A_RELU, BF16, 0, "bf16, 4 a thread"),
    ACTA(64 * 2560, A_NONE, F16, 0, "decode batch 64 narrowing, 4 a thread"),
    ACTA(7, A_NONE, F32, 0, "odd fp32"),
    ACTA(1, A_GELU, F16, 0, "odd"),
    ACTX(6144 * 3, A_GELU, F16, F16, 0, "a 16-bit fc1 output's GELU -> fc2 input"),
    ACTX(257 * 6144, A_GELU, BF16, BF16, 1, "vision fc1's bf16 output, GELU in place"),
    ACTX(32 * 3072, A_GELU, BF16, F32, 0, "16-bit in, fp32 out"),
    ACTX(4099, A_RELU, F16, F32, 0, "ReLU f16 -> fp32: exact"),
    ACTX(4100, A_NONE, BF16, F32, 0, "bf16 -> fp32 widening: exact"),
    ACTX(4099, A_RELU, BF16, BF16, 1, "ReLU bf16 in place: exact"),
    ACTX(77, A_GELU, F16, F16, 1, "odd, in place"),
    ACTX(8 * 1001, A_GELU, F16, F16, 0, "8 a thread (16-byte loads), an odd number of groups"),
    ACTX(8 * 4097, A_GELU, BF16, BF16, 1, "8 a thread, in place"),
    ACTX(4100, A_GELU, F16, F16, 0, "16-bit, n % 8 == 4: 4 a thread"),
    ACTX(77, A_GELU, BF16, BF16, 0, "odd"),
    ACTX(77, A_NONE, F16, F32, 0, "odd widening: exact"),
    ACTX(77, A_RELU, F16, F16, 0, "odd: exact"),
    MMA(257, 1408, 4224, 1, F16, F16, A_NONE, "vision qkv from a 16-bit LN"),
    MMA(257, 6144, 1408, 1, BF16, BF16, A_NONE, "vision fc2 (K=6144) from 16-bit GELU"),
    MMA(257, 1408, 6144, 1, F16, F16, A_GELU, "GELU after"),
    MMA(257, 1408, 768, 1, BF16, BF16, A_RELU, "Q-Former cross k/v + ReLU"),
    MMA(3, 13, 77, 0, F16, F16, A_NONE, "odd (the GEMV's T)"),
    MMA(7, 77, 13, 1, BF16, BF16, A_GELU, "odd"),
    MMA(1, 2560, 7680, 1, F16, F16, A_NONE, "OPT qkv at decode batch 1 from a 16-bit LN: the GEMV's 16-bit inputs"),
    MMA(8, 2560, 333, 1, BF16, BF16, A_RELU, "16-bit inputs, 8 rows: the GEMV, ReLU fused"),
    MMA(5, 264, 77, 0, F16, F16, A_GELU, "16-bit inputs, 5 rows: the GEMV, GELU fused"),
    MMA(45, 2560, 2560, 1, F32, F16, A_RELU, "fp32 inputs: matmul_h"),
    MMA(1, 2560, 77, 1, F32, BF16, A_NONE, "fp32 inputs: matmul_h's GEMV"),
    MMA(13, 65, 7, 1, F32, F32, A_GELU, "all fp32: matmul + GELU"),
    MMA(7, 13, 65, 0, F32, F32, A_RELU, "all fp32: matmul + ReLU"),
    MMAO(1, 2560, 10240, 1, F16, F16, A_RELU, F16, "OPT decode fc1 + ReLU -> fc2's 16-bit input (GEMV)"),
    MMAO(1, 2560, 10240, 1, BF16, BF16, A_RELU, BF16, "OPT decode fc1 + ReLU, bf16 (GEMV)"),
    MMAO(5, 2560, 7680, 1, F16, F16, A_NONE, F16, "OPT qkv, 5 rows: the GEMV's rows"),
    MMAO(64, 2560, 2560, 1, BF16, BF16, A_NONE, BF16, "decode batch 64: cuBLASLt, 16-bit epilogue"),
    MMAO(257, 1408, 4224, 1, F16, F16, A_NONE, F16, "vision qkv -> 16-bit attention"),
    MMAO(257, 1408, 6144, 1, BF16, BF16, A_NONE, BF16, "vision fc1 -> 16-bit GELU"),
    MMAO(45, 2560, 2560, 0, F16, F16, A_NONE, F16, "no bias"),
    MMAO(3, 13, 77, 1, F16, F16, A_GELU, F16, "odd (odd element count)"),
    MMAO(3, 13, 77, 0, BF16, BF16, A_RELU, BF16, "odd, no bias"),
    MMAO(7, 77, 13, 1, BF16, BF16, A_NONE, BF16, "odd bias count"),
    MMAO(1, 2560, 2560, 1, F32, F16, A_NONE, F16, "fp32 inputs, 16-bit out: matmul_h's GEMV"),
    MMAO(9, 2560, 2560, 1, F32, BF16, A_RELU, BF16, "fp32 inputs, 16-bit out: above the GEMV"),
    MACC(1, 2560, 2560, 1, F16, F16, "OPT decode out_proj into the residual (the GEMV)"),
    MACC(1, 10240, 2560, 1, BF16, BF16, "OPT decode fc2 (K=10240) into the residual (the GEMV)"),
    MACC(2, 2560, 2560, 0, BF16, BF16, "GEMV T=2, no bias"),
    MACC(5, 100, 77, 1, F16, F16, "GEMV T=5, C % 8 != 0 (scalar GEMV / unaligned)"),
    MACC(1, 36, 13, 0, BF16, BF16, "odd, C=36: C % 8 != 0"),
    MACC(64, 2560, 2560, 1, F16, F16, "decode batch 64: cuBLASLt beta = 1"),
    MACC(257, 1408, 1408, 1, BF16, BF16, "vision proj into the residual"),
    MACC(45, 2560, 2560, 1, F32, F32, "fp32 model: OPT prefill out_proj"),
    MACC(3, 36, 100, 0, F32, F32, "odd fp32"),
    MACC(1, 2560, 2560, 1, F32, F16, "fp32 inputs, f16 weights: matmul_h's GEMV"),
    MACC(13, 100, 36, 1, F32, BF16, "fp32 inputs, bf16 weights, odd"),
    MLN(1, 2560, 7680, 1, F16, F16, A_NONE, F32, 0, 1e-5f, "OPT decode qkv: the fused LN GEMV"),
    MLN(1, 2560, 10240, 1, F16, F16, A_RELU, F16, 0, 1e-5f, "OPT decode fc1 + ReLU, 16-bit out (fused)"),
    MLN(1, 2560, 10240, 1, BF16, BF16, A_RELU, BF16, 2, 1e-5f, "OPT decode fc1, bf16, large mean (fused)"),
    MLN(1, 2560, 640, 1, BF16, BF16, A_NONE, F32, 3, 1e-5f, "eps matters (fused)"),
    MLN(1, 1408, 640, 0, BF16, BF16, A_GELU, F32, 0, 1e-6f, "C=1408, no bias, GELU (fused)"),
    MLN(1, 4096, 256, 1, F16, F16, A_NONE, F16, 2, 1e-5f, "C=4096: the fused kernel's limit, large mean"),
    MLN(1, 8, 13, 1, F16, F16, A_NONE, F16, 0, 1e-5f, "C=8: one chunk (fused)"),
    MLN(1, 4104, 333, 1, BF16, BF16, A_NONE, BF16, 0, 1e-5f, "C=4104, above the fused 4096: LN + matmul_a"),
    MLN(1, 100, 77, 1, F16, F16, A_GELU, F32, 0, 1e-5f, "C % 8 != 0: LN + matmul_a, GELU"),
    MLN(3, 2560, 640, 1, F16, F16, A_NONE, F16, 2, 1e-5f, "3 rows: LN + matmul_a, large mean"),
    MLN(5, 1408, 100, 0, F16, F16, A_RELU, F32, 3, 1e-6f, "5 rows, eps matters"),
    MLN(64, 2560, 2560, 1, BF16, BF16, A_NONE, F32, 0, 1e-5f, "decode batch 64: LN + cuBLASLt"),
    MLN(7, 100, 36, 1, F32, F32, A_RELU, F32, 2, 1e-5f, "all fp32, large mean"),
    MLN(1, 36, 13, 0, F32, F32, A_NONE, F32, 3, 1e-5f, "all fp32, odd, eps matters"),

    ATT(257, 257, 16, 88, 0, 1, 0, 0, 0, "vision self-attention"),
    ATTB(4, 257, 257, 16, 88, 0, 1, 0, 0, 0, "vision, 4 images (a loop over images)"),
    ATTB(20, 257, 257, 16, 88, 0, 1, 0, 0, 0, "vision, 20 images (a loop over heads)"),
    ATTB(3, 32, 257, 12, 64, 0, 0, 0, 0, 0, "Q-Former cross-attention, 3 images"),
    ATTB(5, 7, 13, 2, 5, 1, 0, 3, 0, 1.0f, "odd, 5 sequences over 2 heads, causal with a cache"),
    ATTB(3, 9, 9, 4, 3, 0, 1, 2, 0, 0, "odd, 3 sequences, fused"),
    ATT16(1, 257, 257, 16, 88, 1, F16, "vision of an f16 model (mma)"),
    ATT16(2, 257, 257, 16, 88, 1, BF16, "vision, 2 images, bf16 model (mma)"),
    ATT16(3, 32, 257, 12, 64, 0, F16, "Q-Former cross-attention, f16 model (mma)"),
    ATT16(2, 32, 257, 12, 64, 0, BF16, "Q-Former cross-attention, bf16 model (mma)"),
    ATT16(2, 32, 32, 12, 64, 1, F16, "Q-Former self-attention, fused qkv (mma)"),
    ATT16(3, 9, 13, 2, 20, 0, F16, "mma, odd: one partial tile each way, head size 20 (padded to 32)"),
    ATT16(2, 70, 129, 3, 88, 0, BF16, "mma: two query tiles, five key tiles (the last one key)"),
    ATT16(2, 70, 40, 3, 128, 1, F16, "mma: the largest head size"),
    ATT16(1, 40, 70, 2, 128, 0, BF16, "mma: the largest head size, a partial key tile"),
    ATT16(1, 21, 45, 2, 100, 0, F16, "mma: head size 100 (staging units not a multiple of the threads)"),
    ATT16(2, 33, 47, 3, 13, 0, F16, "mma, head size 13: odd strides (element loads)"),
    ATT16(3, 5, 37, 2, 16, 0, BF16, "mma: 5 queries (3 of 4 warps idle), head size 16"),
    ATT16(2, 3, 1, 2, 24, 0, F16, "mma: one key"),
    ATT16(1, 13, 400, 2, 16, 0, F16, "mma, 400 keys: 13 tiles, the last partial"),
    ATT16(1, 17, 600, 2, 48, 0, BF16, "mma, 600 keys: 19 tiles"),
    ATT16(1, 13, 29, 2, 136, 0, F16, "f16, head size 136: above the mma kernel's 128 (TF32 products)"),
    ATTIO(2, 257, 257, 16, 88, 0, 1, 0, F16, "vision, 2 images, the 16-bit fused qkv (mma)"),
    ATTIO(2, 257, 257, 16, 88, 0, 1, 0, BF16, "vision, 2 images, the 16-bit fused qkv (mma)"),
    ATTIO(2, 32, 257, 12, 64, 0, 0, 0, F16, "Q-Former cross-attention, 16-bit q, k, v (mma)"),
    ATTIO(3, 32, 257, 12, 64, 0, 0, 0, BF16, "Q-Former cross-attention, 16-bit q, k, v (mma)"),
    ATTIO(2, 5, 7, 3, 24, 0, 0, 0, F16, "odd, 16-bit io (mma)"),
    ATTIO(3, 7, 7, 3, 24, 0, 1, 0, BF16, "odd, fused, 16-bit io (mma)"),
    ATTIO(2, 9, 13, 2, 13, 0, 0, 1, F16, "odd strides (27 elements), head size 13: 16-bit element loads"),
    /* attention_fa.cu's shapes (with BLIP2_ATTN_FA=1: test_ops_cudasim_fa, tests/gpu/run.sh); the mma kernel's otherwise */
    ATTIO(3, 65, 257, 4, 88, 0, 0, 0, F16, "16-bit io: two query tiles (the last one row), five key tiles (the last one key)"),
    ATTIO(2, 5, 64, 3, 96, 0, 0, 0, BF16, "16-bit io: 5 queries (3 of 4 warps idle), one whole key tile, head size 96"),
    ATTIO(2, 70, 65, 2, 112, 0, 0, 0, F16, "16-bit io: head size 112 (the fa kernel's largest), 65 keys"),
    ATTIO(1, 33, 600, 2, 104, 0, 0, 0, BF16, "16-bit io: 600 keys (10 tiles), head size 104 (padded to 112)"),
    ATTIO(2, 17, 1, 3, 8, 0, 0, 0, F16, "16-bit io: one key, head size 8"),
    ATTIO(2, 64, 31, 2, 40, 0, 0, 0, BF16, "16-bit io: one whole query tile, 31 keys, head size 40"),
    ATTIO(1, 21, 45, 2, 128, 0, 0, 0, F16, "16-bit io, head size 128: above the fa kernel's 112 (the mma kernel)"),
    ATTIO(1, 45, 45, 4, 80, 1, 0, 0, F16, "causal, 16-bit io: not the mma kernel"),
    ATTIO(2, 45, 45, 4, 80, 1, 1, 0, BF16, "causal, fused, 16-bit io: not the mma kernel"),
    ATTIO(1, 13, 29, 2, 136, 0, 0, 0, F16, "head size 136, 16-bit io: not the mma kernel"),
    ATTIO(2, 29, 29, 2, 136, 0, 1, 0, BF16, "head size 136, fused, 16-bit io: not the mma kernel"),
    ATT(32, 32, 12, 64, 0, 1, 0, 0, 0, "Q-Former self-attention"),
    ATT(32, 257, 12, 64, 0, 0, 0, 0, 0, "Q-Former cross-attention"),
    ATT(45, 45, 32, 80, 1, 0, 0, 0, 0.11180339887f, "OPT prefill (causal)"),
    ATT(45, 45, 32, 80, 0, 1, 0, 0, 0.11180339887f, "OPT shape, not causal"),
    ATT(1, 45, 32, 80, 1, 0, 0, 0, 0.11180339887f, "OPT decode (causal, Tq=1)"),
    ATT(1, 1, 1, 1, 0, 0, 0, 0, 0, "odd"),
    ATT(1, 1, 1, 1, 1, 0, 2, 0, 0, "odd"),
    ATT(3, 3, 1, 7, 1, 1, 5, 0, 0, "odd"),
    ATT(7, 13, 3, 5, 1, 0, 3, 0, 1.0f, "odd, causal with a cache (Tq<Tk)"),
    ATT(7, 13, 3, 5, 0, 0, 3, 0, 1.0f, "odd, Tq<Tk not causal"),
    ATT(13, 65, 2, 3, 0, 0, 1, 0, 0, "odd"),
    ATT(65, 65, 4, 13, 1, 1, 7, 0, 0, "odd"),
    ATT(13, 13, 2, 16, 0, 1, 0, 6, 0, "large scores"),
    ATT(5, 601, 2, 16, 1, 0, 0, 0, 0, "601 keys: a block per softmax row, a tail of 1, causal with a cache"),
    ATT_REL(13, 13, 3, 7, "causal semantics"),
    ATT_REL(5, 17, 2, 9, "causal semantics with a cache"),

    PAGED(45, 45, 32, 80, 16, 0, 1.0f, "OPT prefill, 16-position blocks"),
    PAGED(1, 45, 32, 80, 16, 0, 1.0f, "OPT decode, 16-position blocks"),
    PAGED(7, 13, 3, 5, 5, 3, 0, "odd, chunk after a cache"),
    PAGED(1, 1, 1, 1, 1, 0, 0, "odd"),
    PAGED(3, 3, 1, 7, 2, 1, 0, "odd"),
    PAGED(13, 65, 2, 3, 7, 2, 0, "odd"),
    PAGED(65, 65, 4, 13, 65, 0, 0, "odd, one block"),
    PAGED(2, 300, 2, 128, 16, 4, 0, "HS=128 (the kernel's limit), long context"),
    PAGED16(2, 300, 3, 128, 16, 8, F16, "f16 cache, HS=128: two key groups, ten 32-key chunks"),
    PAGED16(3, 33, 9, 16, 5, 0, BF16, "bf16 cache, HS=16: 16 key groups, a 1-key chunk, 9 heads (two blocks)"),
    PAGED16(1, 1, 1, 8, 1, 0, F16, "f16 cache, one key, one head"),
    PAGEDM(1, 0, 32, 80, 16, 0, F32, 0, "OPT batched step"),
    PAGEDM(1, 1, 32, 80, 16, 3, F32, 0, "OPT batched step, rows reversed"),
    PAGEDM(1, 0, 32, 80, 16, 0, F16, 5120, "OPT batched step: f16 cache, q in the fused qkv rows"),
    PAGEDM(1, 1, 32, 80, 16, 0, BF16, 5120, "OPT batched step: bf16 cache, q in the fused qkv rows"),
    PAGEDM(2, 0, 32, 80, 16, 0, F32, 0, "OPT decode batch"),
    PAGEDM(2, 0, 32, 80, 16, 0, F16, 5120, "OPT decode batch, f16 cache"),
    PAGEDM(7, 0, 32, 80, 16, 0, F16, 5120, "OPT decode batch 256, f16 cache (--perf: the KV read's GB/s)"),
    PAGEDM(3, 0, 4, 64, 16, 1, F32, 0, "chunked prefill"),
    PAGEDM(3, 1, 3, 33, 5, 2, BF16, 3, "chunked prefill, odd, bf16 cache"),
    PAGEDM(4, 0, 3, 5, 2, 1, F16, 1, "odd, f16 cache"),
    PAGEDM(4, 1, 1, 1, 1, 0, F32, 0, "odd, one-position blocks"),
    PAGEDM(4, 1, 1, 1, 1, 0, BF16, 0, "odd, one-position blocks, bf16 cache"),
    PAGEDF(2, 0, 32, 80, 16, 0, F16, 5120, "fused KV write: OPT decode batch, f16 cache, fused qkv rows"),
    PAGEDF(2, 1, 32, 80, 16, 0, F32, 0, "fused KV write: decode batch, fp32 cache, rows reversed"),
    PAGEDF(7, 0, 32, 80, 16, 0, BF16, 5120, "fused KV write: decode batch 256 (the warp-per-head kernel)"),
    PAGEDF(6, 0, 32, 80, 16, 0, F16, 5120, "fused KV write: decode of one sequence"),
    PAGEDF(1, 0, 4, 64, 16, 3, F16, 7, "fused KV write: decode rows + prefill chunks (rows in order, one block)"),
    PAGEDF(3, 1, 3, 33, 5, 2, BF16, 3, "fused KV write: chunked prefill, odd, bf16 cache"),
    PAGEDF(4, 0, 3, 5, 2, 1, F32, 1, "fused KV write: odd"),
    PAGEDO(6, 0, 32, 80, 16, 0, F16, 5120, 1, F16, "16-bit out: decode of one sequence (block-per-row kernel)"),
    PAGEDO(7, 0, 32, 80, 16, 0, BF16, 5120, 1, BF16, "16-bit out: decode batch 256 (warp-per-head kernel)"),
    PAGEDO(3, 1, 4, 64, 16, 1, F16, 3, 0, F16, "16-bit out: chunked prefill, f16 cache"),
    PAGEDO(4, 0, 3, 5, 2, 1, F32, 1, 0, BF16, "16-bit out: odd, fp32 cache (the loop kernel)"),
    /* kv_write */
    KVW(1, 2560, 16, 0, F32, 0, "OPT batched step"),
    KVW(1, 2560, 16, 1, F32, 0, "OPT batched step, rows reversed"),
    KVW(1, 2560, 16, 0, F16, 5120, "OPT batched step from fused qkv rows, f16 cache"),
    KVW(1, 2560, 16, 1, BF16, 5120, "OPT batched step from fused qkv rows, bf16 cache"),
    KVW(2, 2560, 16, 0, F32, 0, "OPT decode batch"),
    KVW(5, 2560, 16, 0, F16, 5120, "OPT prefill, f16 cache"),
    KVW(6, 2560, 16, 0, F32, 0, "OPT decode"),
    KVW(3, 65, 7, 1, F32, 3, "odd"),
    KVW(3, 65, 7, 1, F16, 1, "odd, f16 cache"),
    KVW(4, 13, 1, 0, BF16, 0, "odd, one-position blocks, bf16 cache"),
    KVW(4, 1, 3, 1, F32, 0, "odd, C=1"),

    SM(2 * 257, 257, 0, "attention rows"),
    SM(45, 45, 1, "masked rows"),
    SM(1, 1, 0, "odd"),
    SM(3, 7, 0, "odd"),
    SM(13, 65, 1, "odd"),

    UN(gelu, 257 * 6144, 1e-5, "vision MLP"),
    UN(gelu, 1, 1e-5, "odd"),
    UN(gelu, 13, 1e-5, "odd"),
    UN(gelu, 65, 1e-5, "odd"),
    UN(relu, 45 * 10240, 0, "OPT FFN"),
    UN(relu, 1, 0, "odd"),
    UN(relu, 7, 0, "odd"),

    RES(257 * 1408, "vision residual"),
    RES(1, "odd"),
    RES(13, "odd"),


    I2C(3, 224, 224, 14, "vision patches"),
    I2C(1, 7, 7, 7, "odd"),
    I2C(3, 30, 44, 14, "odd (remainder ignored)"),
    I2C(2, 6, 9, 3, "odd"),

    EMB(45, 2560, 300, "OPT prompt (vocab cut)"),
    EMB(1, 7, 3, "odd"),
    EMB(13, 65, 13, "odd"),

    EMBVP(45, 2560, 12568, 12568, BF16, "OPT prompt, rank 1 of 4"),
    EMBVP(45, 2560, 12568, 0, F16, "OPT prompt, rank 0 of 4"),
    EMBVP(16, 2560, 300, 37700, F32, "decode batch, fp32 slice"),
    EMBVP(13, 65, 13, 5, F16, "odd"),
    EMBVP(7, 7, 3, 0, BF16, "odd"),
    EMBVP(9, 1, 1, 2, F32, "odd, one row"),

    ADDR(45, 2560, 2, 50, "OPT positions"),
    ADDR(1, 2560, 46, 50, "OPT decode position"),
    ADDR(257, 1408, 0, 257, "vision positions"),
    ADDR(3, 7, 5, 8, "odd (ends at the table end)"),

    ADDRAT(16, 2560, 2050, "OPT batched decode positions"),
    ADDRAT(45, 2560, 2050, "OPT batched step"),
    ADDRAT(1, 1, 1, "odd"),
    ADDRAT(13, 65, 3, "odd"),

    GATHER(8, 2560, 45, "last rows before the LM head"),
    GATHER(1, 2560, 1, "one sequence"),
    GATHER(3, 7, 13, "odd"),
    GATHER(13, 1, 2, "odd"),

    AM(50272, AM_RANDOM, "OPT vocab"),
    AM(50272, AM_TIES, "OPT vocab"),
    AM(13, AM_ALL_EQUAL, ""),
    AM(65, AM_NAN_MIXED, ""),
    AM(13, AM_ALL_NEG_INF, ""),
    AM(13, AM_NAN_THEN_NEG_INF, ""),
    AM(65, AM_POS_INF_TIES, ""),
    AM(13, AM_ALL_NAN, ""),
    AM(65, AM_LAST, ""),
    AM(13, AM_NAN_AT_END, ""),
    AM(13, AM_SIGNED_ZERO, ""),
    AM(13, AM_NEG_INF_AND_FINITE, ""),
    AM(1, AM_RANDOM, "odd"),
    AM(3, AM_RANDOM, "odd"),
    AMR(16, 50272, 1, "batched decode, full vocab"),
    AMR(24, 12568, 0, "vocab shard, every variant"),
    AMR(12, 13, 0, "odd, every variant"),
    AMR(5, 1, 1, "odd, n=1"),
    TOPK(12, 50272, 52, 0, "sampling candidates (top_k 50 + 2), full vocab, every variant"),
    TOPK(24, 12568, 64, 1, "vocab shard, k at the limit, many ties"),
    TOPK(3, 13, 13, 0, "odd, k = n"),
    TOPK(12, 13, 5, 1, "odd, ties"),
    TOPK(2, 1, 1, 0, "odd, n=1"),
    PEN(1, 50272, 0, 100, "one rank, a short history"),
    PEN(64, 12568, 12568, 300, "rank 1 of 4, batch 64"),
    PEN(8, 12568, 37704, 2000, "the last rank, long histories"),
    PEN(5, 7, 3, 40, "odd: every id of the range"),
    PEN(2, 1, 0, 3, "odd, n=1"),
    LSE(15, 12568, 0, "5 beams x 3 requests, a rank's slice"),
    LSE(16, 50272, 1, "masked values and all -inf rows"),
    LSE(3, 7, 0, "odd"),
    LSE(2, 1, 1, "odd, n=1"),
    SHIFT(15, 12568, "5 beams x 3 requests"),
    SHIFT(3, 7, "odd"),

    FILL(100000, F32, 1, 0.0f, 1.0f, "N(0, 1)"),
    FILL(100000, F16, 2, 0.0f, 0.02f, "weights"),
    FILL(100000, BF16, 3, 0.0f, 0.02f, "weights"),
    FILL(65, F32, 4, 0.5f, 3.0f, "odd"),
    FILL(1, BF16, 5, -1.0f, 2.0f, "odd"),
    FILL(13, F16, 6, 1.0f, 0.0f, "LayerNorm weight: exactly 1"),
    FILL(7, BF16, 7, 0.0f, 0.0f, "bias: exactly 0"),
    FILL(77, F32, 8, 0.25f, 0.0f, "std 0: exactly mean"),
};

/* ------------------------------------------------------------------------------------------------
 * The driver. */
static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Compares buffer buf (elements of type wdtype) with ref over rows × row_len (only the checked rows
 * when sampled), after checking every element is finite. Returns the relative L2 error. */
static double compare_out(op_ctx *x, int buf, int wdtype, const double *ref, int rows, int row_len, int sampled,
                          double tol, const char *what) {
    const char *be = x->be->name, *op = x->c->op;
    size_t n = (size_t)rows * row_len, bad = 0, first_bad = 0;
    for (size_t i = 0; i < n; i++)
        if (!isfinite(elem(x, buf, wdtype, i)) && !bad++) first_bad = i;
    CHECK(bad == 0, "[%s %s %s] %s: %zu non-finite values (first at %zu: %g)", be, op, x->desc, what, bad, first_bad,
          bad ? elem(x, buf, wdtype, first_bad) : 0.0);
    double num = 0, den = 0;
    size_t mismatch = 0, checked = 0;
    for (int r = 0; r < rows; r++) {
        if (sampled && !row_checked(x, r)) continue;
        for (int c = 0; c < row_len; c++) {
            size_t i = (size_t)r * row_len + c;
            float o = elem(x, buf, wdtype, i);
            double d = (double)o - ref[i];
            num += d * d;
            den += ref[i] * ref[i];
            if (o != (float)ref[i] || isnan(o)) mismatch++;
            checked++;
        }
    }
    double rel = den > 0 ? sqrt(num / den) : sqrt(num);
    if (isnan(rel)) rel = INFINITY;
    if (tol == 0)
        CHECK(mismatch == 0, "[%s %s %s] %s: %zu of %zu elements differ from the exact result", be, op, x->desc, what,
              mismatch, checked);
    else
        CHECK(rel <= tol, "[%s %s %s] %s: relative L2 %.3g > %.3g", be, op, x->desc, what, rel, tol);
    if (getenv("TEST_OPS_VERBOSE"))
        printf("  %-4s %-18s %-70s %s rel L2 %.3g (%zu elements checked%s)\n", be, op, x->desc, what, rel, checked,
               sampled && x->row_step > 1 ? ", sampled rows" : "");
    return rel;
}

static void verify(op_ctx *x) {
    const char *be = x->be->name, *op = x->c->op;
    for (int i = 0; i < x->nb; i++) {
        gbuf *g = &x->b[i];
        int lo = memcmp(g->host, g->pristine, GUARD * 4) != 0;
        int hi = memcmp(g->host + GUARD + g->n, g->pristine + GUARD + g->n, GUARD * 4) != 0;
        CHECK(!lo && !hi, "[%s %s %s] buffer %d: guard %s%s%s overwritten", be, op, x->desc, i, lo ? "before" : "",
              lo && hi ? " and " : "", hi ? "after" : "");
        if (g->role == B_IN)
            CHECK(memcmp(g->host + GUARD, g->pristine + GUARD, g->n * 4) == 0, "[%s %s %s] input buffer %d was modified",
                  be, op, x->desc, i);
    }
    if (x->out >= 0) compare_out(x, x->out, x->out_type, x->ref, x->rows, x->row_len, 1, case_tol(x), "output");
    if (x->out2 >= 0) compare_out(x, x->out2, x->out2_type, x->ref2, 1, (int)x->n2, 0, x->tol2, "second output");
}

static void run_case(const op_case *c, const blip2_ops *be, int idx) {
    op_ctx x;
    memset(&x, 0, sizeof x);
    x.c = c;
    x.be = be;
    x.rng = g_seed * 0x100000001b3ull + (uint64_t)idx * 7919u + 1;
    x.out = -1;
    x.out2 = -1;
    x.out2_type = BLIP2_W_F32;
    c->setup(&x);
    ctx_commit(&x);
    c->exec(&x);
    be_sync(&x);
    ctx_download(&x);
    be_sync(&x);
    verify(&x);
    if (c->extra) c->extra(&x);
    if (g_perf) {
        double *t = xmalloc(sizeof(double) * g_reps);
        for (int r = 0; r < g_reps; r++) {
            for (int i = 0; i < x.nb; i++)
                if (x.b[i].role == B_INOUT) buf_upload(&x, i);
            be_sync(&x);
            double t0 = now_s();
            c->exec(&x);
            be_sync(&x);
            t[r] = now_s() - t0;
        }
        qsort(t, g_reps, sizeof(double), cmp_double);
        double med = t[g_reps / 2];
        char gf[32] = "", gb[32] = "";
        if (x.flops > 0 && (!strcmp(c->op, "matmul") || !strcmp(c->op, "matmul_h") || !strcmp(c->op, "attention") ||
                            !strcmp(c->op, "attention_paged")))
            snprintf(gf, sizeof gf, "%8.2f GFLOP/s", x.flops / med * 1e-9);
        if (x.bytes > 0) snprintf(gb, sizeof gb, "%8.2f GB/s", x.bytes / med * 1e-9);
        printf("%-4s %-18s %-70s %-34s %10.4f ms %17s %13s\n", be->name, c->op, x.desc, c->note, med * 1e3, gf, gb);
        free(t);
    }
    ctx_free(&x);
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--perf")) g_perf = 1;
        else if (!strcmp(argv[i], "--full")) g_full = 1;
        else if (!strcmp(argv[i], "--reps") && i + 1 < argc) g_reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--op") && i + 1 < argc) g_only = argv[++i];
        else if (!strcmp(argv[i], "--backend") && i + 1 < argc) g_backend = argv[++i];
        else if (!strcmp(argv[i], "--seed") && i + 1 < argc) g_seed = strtoull(argv[++i], NULL, 10);
        else {
            fprintf(stderr, "usage: test_ops [--perf [--reps N]] [--full] [--op NAME[,NAME...]] [--backend NAME] [--seed N]\n");
            return 2;
        }
    }
    if (g_reps < 1) g_reps = 1;
    /* Every GEMV kernel (T = 1..8) is checked, although a model sends only T <= 4 to it by default. */
    setenv("BLIP2_GEMV_MAX_T", "8", 0);

    const blip2_ops *backends[2];
    int n_backends = 0;
    backends[n_backends++] = &blip2_cpu_ops;
#ifdef BLIP2_HAVE_CUDA
    blip2_cuda_ctx *cuda_ctx = NULL;
    if (!g_backend || !strcmp(g_backend, "cuda")) {
        char err[256] = "";
        cuda_ctx = blip2_cuda_ctx_create(0, err, sizeof err);
        if (cuda_ctx) backends[n_backends++] = &blip2_cuda_ops;
        else printf("cuda: skipped: no GPU (%s)\n", err);
    }
#endif

    printf("test_ops: %zu cases, seed %llu%s\n", sizeof cases / sizeof cases[0], (unsigned long long)g_seed,
           g_full ? ", full reference" : "");
    if (g_perf)
        printf("%-4s %-18s %-70s %-34s %13s %17s %13s\n", "be", "op", "shape", "role", "median", "", "");
    for (int b = 0; b < n_backends; b++) {
        if (g_backend && strcmp(g_backend, backends[b]->name)) continue;
        for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
            if (op_selected(cases[i].op)) run_case(&cases[i], backends[b], (int)i);
    }
#ifdef BLIP2_HAVE_CUDA
    blip2_cuda_ctx_destroy(cuda_ctx);
#endif
    return check_summary();
}
