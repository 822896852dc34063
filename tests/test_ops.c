/* Op tests, in the manner of llama.cpp's test-backend-ops: a TABLE of cases (op, shape, tolerance,
 * a setup that draws fresh random inputs and computes an independent naive double-precision
 * reference, and an exec that runs the op under test through a backend). Every case is run
 * against every backend in `backends[]`; today that is the CPU reference (kernels/cpu/ops.c). A
 * CUDA twin plugs in as one more `ops_backend` whose alloc/upload/download move the guarded
 * buffers (guards included) to and from the device, so the same guard, NaN and reference checks
 * apply to it unchanged.
 *
 * What each case checks:
 *  - the output against the double reference: relative L2 <= tol (tol 0: bitwise equal, for the
 *    ops that only move or add numbers), over every row, or over a spread sample of rows when the
 *    naive reference would be slow (--full checks every row);
 *  - no NaN or Inf anywhere in the output (NaN compares false, so it is counted explicitly; the
 *    output is pre-filled with a signalling-NaN sentinel, so an element the op forgot to write is
 *    caught the same way);
 *  - guard regions before and after every buffer still hold the sentinel (out-of-bounds writes),
 *    and every input buffer, strided padding included, is bit-for-bit unchanged. Padding columns of
 *    strided inputs and rows past the logical end of a KV buffer hold quiet NaN, so an op that reads
 *    outside its logical input puts NaN into its output and fails.
 *
 * Usage: test_ops [--perf [--reps N]] [--full] [--op NAME] [--seed N]
 *   --perf  also time each case (median of N runs; the reference is not timed) and print GFLOP/s and
 *           GB/s where meaningful. Without it the test only checks and runs in a few seconds. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "check.h"
#include "ops.h"

/* ------------------------------------------------------------------------------------------------
 * Backends: the op set by function pointer, plus the memory hooks a device backend needs.
 * alloc == NULL means the ops run on host memory directly (the CPU reference). */
typedef struct {
    const char *name;
    void *(*alloc)(size_t bytes);
    void (*release)(void *dev);
    void (*upload)(void *dev, const void *host, size_t bytes);
    void (*download)(void *host, const void *dev, size_t bytes);
    void (*sync)(void);
    void (*matmul)(float *, const float *, const float *, const float *, int, int, int);
    void (*layernorm)(float *, const float *, const float *, const float *, int, int, float);
    void (*residual_add)(float *, const float *, size_t);
    void (*gelu)(float *, size_t);
    void (*relu)(float *, size_t);
    void (*attention)(float *, const float *, const float *, const float *, float *, int, int, int, int, int, int,
                      float, int);
    void (*attention_paged)(float *, const float *, const float *, const float *, const int32_t *, int, float *, int,
                            int, int, int, int, int, float);
    void (*softmax)(float *, int, int);
    void (*im2col_patches)(float *, const float *, int, int, int, int);
    void (*embedding)(float *, const int32_t *, const float *, int, int);
    void (*add_rows)(float *, const float *, int, int, int);
    int (*argmax)(const float *, int);
} ops_backend;

static const ops_backend cpu_backend = {
    .name = "cpu",
    .matmul = blip2_matmul,
    .layernorm = blip2_layernorm,
    .residual_add = blip2_residual_add,
    .gelu = blip2_gelu,
    .relu = blip2_relu,
    .attention = blip2_attention,
    .attention_paged = blip2_attention_paged,
    .softmax = blip2_softmax,
    .im2col_patches = blip2_im2col_patches,
    .embedding = blip2_embedding,
    .add_rows = blip2_add_rows,
    .argmax = blip2_argmax,
};

/* A CUDA backend is added here (e.g. #ifdef BLIP2_HAVE_CUDA &cuda_backend). */
static const ops_backend *const backends[] = {&cpu_backend};

/* ------------------------------------------------------------------------------------------------
 * Options and random numbers. */
static int g_perf, g_full, g_reps = 7;
static const char *g_only;
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

/* ------------------------------------------------------------------------------------------------
 * Guarded buffers. Each is GUARD words, n payload words, GUARD words (a word is 4 bytes: float or
 * int32). Guards and the payload of outputs start as a signalling-NaN sentinel. After setup the
 * whole block is copied to `pristine`; that copy is what is uploaded, what guards are compared to,
 * what inputs must still equal afterwards, and what in/out buffers are reset to between timed runs. */
#define GUARD 64
#define SENTINEL 0x7FA5A5A5u /* exponent all ones, quiet bit clear, mantissa non-zero: a signalling NaN */
#define MAXBUF 8

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
    const ops_backend *be;
    uint64_t rng;
    char desc[160];
    gbuf b[MAXBUF];
    int nb;
    int a[8];            /* buffer indices and derived ints, set by setup for exec */
    int out;             /* the checked output buffer, -1 when the op returns a scalar (argmax) */
    int rows, row_len;   /* the output as rows × row_len, for sampled checking */
    int row_step;        /* rows r with r % row_step == 0, and the last row, have a reference */
    double *ref;         /* [rows × row_len], filled on the checked rows */
    int iresult, iref;   /* argmax: result and expected (-1: any index in range) */
    double flops, bytes; /* per exec, for --perf */
} op_ctx;

typedef struct op_case {
    const char *op;
    const char *note;
    void (*setup)(op_ctx *);
    void (*exec)(op_ctx *);
    void (*extra)(op_ctx *); /* optional checks beyond the generic ones (runs on the host copies) */
    int p[8];
    float f;    /* eps, scale or amplitude, per op */
    double tol; /* relative L2 bound; 0 = bitwise equal */
} op_case;

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

static int buf_new(op_ctx *x, int role, size_t n) {
    if (x->nb == MAXBUF) {
        fprintf(stderr, "test_ops: too many buffers in one case\n");
        exit(2);
    }
    gbuf *g = &x->b[x->nb];
    g->role = role;
    g->n = n;
    size_t words = n + 2 * GUARD;
    g->host = malloc(words * 4);
    if (!g->host) {
        fprintf(stderr, "test_ops: out of memory (%zu bytes)\n", words * 4);
        exit(2);
    }
    /* Inputs' payload is written in full by setup; only outputs and scratch need the sentinel. */
    int fill_payload = role == B_OUT || role == B_SCRATCH;
    for (size_t i = 0; i < words; i++)
        if (fill_payload || i < GUARD || i >= GUARD + n) g->host[i] = SENTINEL;
    return x->nb++;
}

static float *H(op_ctx *x, int i) { return (float *)(x->b[i].host + GUARD); }
static int32_t *HI(op_ctx *x, int i) { return (int32_t *)(x->b[i].host + GUARD); }
static float *D(op_ctx *x, int i) {
    return x->b[i].dev ? (float *)((uint32_t *)x->b[i].dev + GUARD) : (float *)(x->b[i].host + GUARD);
}
static int32_t *DI(op_ctx *x, int i) { return (int32_t *)D(x, i); }

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
        g->pristine = malloc(bytes);
        if (!g->pristine) {
            fprintf(stderr, "test_ops: out of memory\n");
            exit(2);
        }
        memcpy(g->pristine, g->host, bytes);
        if (x->be->alloc) g->dev = x->be->alloc(bytes);
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
}

static void be_sync(const ops_backend *be) {
    if (be->sync) be->sync();
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
static void extra_matmul(op_ctx *x) {
    int T = x->c->p[0], C = x->c->p[1], OC = x->c->p[2];
    const float *I = H(x, x->a[0]), *W = H(x, x->a[1]), *B = x->a[2] >= 0 ? H(x, x->a[2]) : NULL, *O = H(x, x->a[3]);
    double *r = malloc(sizeof(double) * OC), *u = calloc((size_t)C, sizeof(double)), br = 0, num = 0, den = 0;
    uint64_t s = x->rng ^ 0x5eedu;
    for (int o = 0; o < OC; o++) {
        r[o] = rng_normal(&s);
        if (B) br += B[o] * r[o];
        for (int c = 0; c < C; c++) u[c] += W[(size_t)o * C + c] * r[o];
    }
    for (int t = 0; t < T; t++) {
        double y = 0, z = br;
        for (int o = 0; o < OC; o++) y += O[(size_t)t * OC + o] * r[o];
        for (int c = 0; c < C; c++) z += I[(size_t)t * C + c] * u[c];
        num += (y - z) * (y - z);
        den += z * z;
    }
    double rel = den > 0 ? sqrt(num / den) : sqrt(num);
    if (isnan(rel)) rel = INFINITY;
    CHECK(rel <= x->c->tol, "[%s matmul %s] all-rows projection check: relative L2 %.3g > %.3g", x->be->name, x->desc,
          rel, x->c->tol);
    free(r);
    free(u);
}
static void exec_matmul(op_ctx *x) {
    x->be->matmul(D(x, x->a[3]), D(x, x->a[0]), D(x, x->a[1]), x->a[2] >= 0 ? D(x, x->a[2]) : NULL, x->c->p[0],
                  x->c->p[1], x->c->p[2]);
}

/* ------------------------------------------------------------------------------------------------
 * layernorm: p = {T, C, inplace, variant}, f = eps.
 * variant 0: N(0,1) rows; 1: even rows constant (variance 0: the output is exactly b), odd rows
 * random; 2: rows with a large common offset (mean 50, std 1), which a one-pass E[x²]−E[x]² in
 * float would get badly wrong; 3: rows whose variance equals eps (std √eps), where eps counts as
 * much as the data: eps outside the sqrt, or the wrong eps, is off by far more than the bound. */
static void setup_layernorm(op_ctx *x) {
    int T = x->c->p[0], C = x->c->p[1], inplace = x->c->p[2], variant = x->c->p[3];
    float eps = x->c->f;
    snprintf(x->desc, sizeof x->desc, "T=%d C=%d eps=%g%s%s", T, C, eps, inplace ? " in-place" : "",
             variant == 1 ? " constant-rows" : variant == 2 ? " offset-rows" : variant == 3 ? " variance=eps" : "");
    int in = buf_new(x, inplace ? B_INOUT : B_IN, (size_t)T * C);
    int w = buf_new(x, B_IN, C), b = buf_new(x, B_IN, C);
    int out = inplace ? in : buf_new(x, B_OUT, (size_t)T * C);
    float *X = H(x, in);
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
    fill_normal(&x->rng, H(x, w), C, 1.0f, 0.1f);
    fill_normal(&x->rng, H(x, b), C, 0.0f, 0.5f);
    x->a[0] = in, x->a[1] = w, x->a[2] = b, x->a[3] = out;
    x->out = out;
    plan_rows(x, T, C, 3.0 * C);
    const float *W = H(x, w), *B = H(x, b);
    for (int t = 0; t < T; t++) {
        const float *row = X + (size_t)t * C;
        double mean = 0, var = 0;
        for (int i = 0; i < C; i++) mean += row[i];
        mean /= C;
        for (int i = 0; i < C; i++) var += (row[i] - mean) * (row[i] - mean);
        var /= C;
        double rstd = 1.0 / sqrt(var + (double)eps);
        for (int i = 0; i < C; i++) x->ref[(size_t)t * C + i] = (row[i] - mean) * rstd * W[i] + B[i];
    }
    x->flops = 8.0 * T * C;
    x->bytes = 4.0 * (2.0 * T * C + 2.0 * C);
}
static void exec_layernorm(op_ctx *x) {
    x->be->layernorm(D(x, x->a[3]), D(x, x->a[0]), D(x, x->a[1]), D(x, x->a[2]), x->c->p[0], x->c->p[1], x->c->f);
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
 * attention: p = {Tq, Tk, NH, HS, causal, layout, pad}, f = scale (0: 1/√HS), amplitude in p[7]
 * (std of q and k; 0 means 1).
 * layout 0: separate q [Tq+2, C+pad], k and v [Tk+3, C+pad] buffers (Q-Former cross-attention, the
 *           OPT KV cache); rows past Tq / Tk and the pad columns hold NaN.
 * layout 1: one fused qkv buffer [T, 3C+pad] with k at column C and v at 2C (vision self-attention);
 *           needs Tq == Tk. */
typedef struct {
    int Tq, Tk, NH, HS, C, causal, qs, kvs;
    float scale;
} attn_shape;

static attn_shape attn_get(const op_ctx *x) {
    const int *p = x->c->p;
    attn_shape s = {p[0], p[1], p[2], p[3], p[2] * p[3], p[4], 0, 0, x->c->f};
    if (s.scale == 0) s.scale = 1.0f / sqrtf((float)s.HS);
    if (p[5] == 1) s.qs = s.kvs = 3 * s.C + p[6];
    else s.qs = s.kvs = s.C + p[6];
    return s;
}

/* Reference for one query row into ref[NH·HS]. */
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
    int fused = x->c->p[5] == 1, pad = x->c->p[6];
    float amp = x->c->p[7] ? (float)x->c->p[7] : 1.0f;
    snprintf(x->desc, sizeof x->desc, "Tq=%d Tk=%d NH=%d HS=%d%s %s pad=%d scale=%.4g%s", s.Tq, s.Tk, s.NH, s.HS,
             s.causal ? " causal" : "", fused ? "fused-qkv" : "q,k,v", pad, s.scale, amp != 1 ? " big-scores" : "");
    int qb, kb, vb;
    const float qnan = NAN;
    if (fused) {
        qb = kb = vb = buf_new(x, B_IN, (size_t)s.Tq * s.qs);
        float *Q = H(x, qb);
        for (int t = 0; t < s.Tq; t++)
            for (int c = 0; c < s.qs; c++)
                Q[(size_t)t * s.qs + c] = c < 2 * s.C ? amp * rng_normal(&x->rng) : c < 3 * s.C ? rng_uniform(&x->rng, -1, 1) : qnan;
    } else {
        qb = buf_new(x, B_IN, (size_t)(s.Tq + 2) * s.qs);
        kb = buf_new(x, B_IN, (size_t)(s.Tk + 3) * s.kvs);
        vb = buf_new(x, B_IN, (size_t)(s.Tk + 3) * s.kvs);
        for (int which = 0; which < 3; which++) {
            int b = which == 0 ? qb : which == 1 ? kb : vb, rows = which == 0 ? s.Tq : s.Tk;
            int stride = which == 0 ? s.qs : s.kvs;
            float *M = H(x, b);
            for (size_t i = 0; i < x->b[b].n; i++) {
                int t = (int)(i / stride), c = (int)(i % stride);
                M[i] = (t >= rows || c >= s.C) ? qnan : which < 2 ? amp * rng_normal(&x->rng) : rng_uniform(&x->rng, -1, 1);
            }
        }
    }
    int sc = buf_new(x, B_SCRATCH, (size_t)s.Tq * s.Tk);
    int out = buf_new(x, B_OUT, (size_t)s.Tq * s.C);
    x->a[0] = out, x->a[1] = qb, x->a[2] = kb, x->a[3] = vb, x->a[4] = sc, x->a[5] = fused;
    x->out = out;
    plan_rows(x, s.Tq, s.C, 2.0 * s.Tk * s.C);
    const float *q = H(x, qb), *k = H(x, kb) + (fused ? s.C : 0), *v = H(x, vb) + (fused ? 2 * s.C : 0);
    double keys = 0;
    for (int i = 0; i < s.Tq; i++) {
        keys += s.causal ? i + (s.Tk - s.Tq) + 1 : s.Tk;
        if (row_checked(x, i)) attn_ref_row(x->ref + (size_t)i * s.C, q, k, v, &s, i);
    }
    x->flops = 4.0 * keys * s.C;
    x->bytes = 4.0 * ((double)s.Tq * s.C * 2 + 2.0 * s.Tk * s.C);
}

static void exec_attention(op_ctx *x) {
    attn_shape s = attn_get(x);
    int fused = x->a[5];
    float *q = D(x, x->a[1]), *k = D(x, x->a[2]) + (fused ? s.C : 0), *v = D(x, x->a[3]) + (fused ? 2 * s.C : 0);
    x->be->attention(D(x, x->a[0]), q, k, v, D(x, x->a[4]), s.Tq, s.Tk, s.NH, s.HS, s.qs, s.kvs, s.scale, s.causal);
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
                         D(x, x->a[4]), 1, n_keys, s.NH, s.HS, s.qs, s.kvs, s.scale, 0);
    }
}
static void extra_attention_rel(op_ctx *x) {
    attn_shape s = attn_get(x);
    double e = check_rel_l2(H(x, x->a[6]), H(x, x->a[0]), (size_t)s.Tq * s.C);
    CHECK(e <= 1e-6, "[%s attention %s] causal rows differ from per-row calls over keys <= i+Tk-Tq: rel L2 %.3g",
          x->be->name, x->desc, e);
}

/* ------------------------------------------------------------------------------------------------
 * attention_paged: p = {Tq, Tk, NH, HS, block_size, pad}, f = scale (0: 1/√HS); always causal.
 * The pool has two more blocks than the sequence needs; the block table is a random permutation,
 * so logical order differs from pool order. Pool rows the table does not reach (the spare blocks,
 * the tail of the last block) and the pad columns hold NaN. */
static void setup_attention_paged(op_ctx *x) {
    const int *p = x->c->p;
    int Tq = p[0], Tk = p[1], NH = p[2], HS = p[3], BS = p[4], pad = p[5], C = NH * HS, stride = C + pad;
    float scale = x->c->f != 0 ? x->c->f : 1.0f / sqrtf((float)HS);
    int used = (Tk + BS - 1) / BS, nblk = used + 2;
    snprintf(x->desc, sizeof x->desc, "Tq=%d Tk=%d NH=%d HS=%d BS=%d pad=%d scale=%.4g, %d of %d blocks", Tq, Tk, NH,
             HS, BS, pad, scale, used, nblk);
    int qb = buf_new(x, B_IN, (size_t)(Tq + 2) * stride);
    int kp = buf_new(x, B_IN, (size_t)nblk * BS * stride), vp = buf_new(x, B_IN, (size_t)nblk * BS * stride);
    int tb = buf_new(x, B_IN, used), sc = buf_new(x, B_SCRATCH, Tk), out = buf_new(x, B_OUT, (size_t)Tq * C);
    int32_t *perm = malloc(sizeof(int32_t) * nblk), *table = HI(x, tb);
    for (int i = 0; i < nblk; i++) perm[i] = i;
    for (int i = nblk - 1; i > 0; i--) {
        int j = rng_int(&x->rng, i + 1);
        int32_t t = perm[i];
        perm[i] = perm[j], perm[j] = t;
    }
    for (int i = 0; i < used; i++) table[i] = perm[i];
    float *Q = H(x, qb), *K = H(x, kp), *V = H(x, vp);
    for (size_t i = 0; i < x->b[qb].n; i++)
        Q[i] = ((int)(i / stride) < Tq && (int)(i % stride) < C) ? rng_normal(&x->rng) : NAN;
    for (size_t i = 0; i < x->b[kp].n; i++) K[i] = V[i] = NAN;
    /* Contiguous copies [Tk, C] in logical order, for the reference. */
    float *kc = malloc(sizeof(float) * (size_t)Tk * C), *vc = malloc(sizeof(float) * (size_t)Tk * C);
    for (int j = 0; j < Tk; j++) {
        size_t row = ((size_t)table[j / BS] * BS + j % BS) * stride;
        for (int c = 0; c < C; c++) {
            K[row + c] = kc[(size_t)j * C + c] = rng_normal(&x->rng);
            V[row + c] = vc[(size_t)j * C + c] = rng_uniform(&x->rng, -1, 1);
        }
    }
    float *qc = malloc(sizeof(float) * (size_t)Tq * C);
    for (int i = 0; i < Tq; i++) memcpy(qc + (size_t)i * C, Q + (size_t)i * stride, sizeof(float) * C);
    x->a[0] = out, x->a[1] = qb, x->a[2] = kp, x->a[3] = vp, x->a[4] = tb, x->a[5] = sc;
    x->out = out;
    plan_rows(x, Tq, C, 2.0 * Tk * C);
    attn_shape sh = {Tq, Tk, NH, HS, C, 1, C, C, scale};
    double keys = 0;
    for (int i = 0; i < Tq; i++) {
        keys += i + (Tk - Tq) + 1;
        if (row_checked(x, i)) attn_ref_row(x->ref + (size_t)i * C, qc, kc, vc, &sh, i);
    }
    x->flops = 4.0 * keys * C;
    x->bytes = 4.0 * ((double)Tq * C * 2 + 2.0 * Tk * C);
    free(perm), free(kc), free(vc), free(qc);
}
static void exec_attention_paged(op_ctx *x) {
    const int *p = x->c->p;
    int HS = p[3], stride = p[2] * HS + p[5];
    float scale = x->c->f != 0 ? x->c->f : 1.0f / sqrtf((float)HS);
    x->be->attention_paged(D(x, x->a[0]), D(x, x->a[1]), D(x, x->a[2]), D(x, x->a[3]), DI(x, x->a[4]), p[4],
                           D(x, x->a[5]), p[0], p[1], p[2], HS, stride, stride, scale);
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
 * argmax: p = {n, variant}. The expected index comes from the documented semantics (torch.argmax:
 * lowest index on ties; here NaN never wins); the hand-made variants state it explicitly. */
enum {
    AM_RANDOM, AM_TIES, AM_ALL_EQUAL, AM_NAN_MIXED, AM_ALL_NEG_INF, AM_NAN_THEN_NEG_INF, AM_POS_INF_TIES,
    AM_ALL_NAN, AM_LAST, AM_NAN_AT_END, AM_SIGNED_ZERO, AM_NEG_INF_AND_FINITE
};
static const char *const am_names[] = {"random", "ties->lowest", "all-equal", "NaN-mixed", "all--inf",
                                       "NaN,-inf,...", "+inf-ties", "all-NaN", "max-last", "NaN-after-max",
                                       "-0,+0 tie", "-inf+one-finite"};

static int argmax_naive(const float *v, int n) {
    int best = -1;
    for (int i = 0; i < n; i++)
        if (!isnan(v[i]) && (best < 0 || v[i] > v[best])) best = i;
    return best; /* -1: all NaN, any index is accepted */
}

static void setup_argmax(op_ctx *x) {
    int n = x->c->p[0], variant = x->c->p[1];
    snprintf(x->desc, sizeof x->desc, "n=%d %s", n, am_names[variant]);
    int b = buf_new(x, B_IN, n);
    float *v = H(x, b);
    fill_normal(&x->rng, v, n, 0, 1);
    int expect = -2; /* -2: take the naive reference */
    switch (variant) {
    case AM_TIES: {
        int k = n / 3 + rng_int(&x->rng, n / 3);
        v[k] = v[k + 1] = v[n - 1] = 100.0f;
        expect = k;
        break;
    }
    case AM_ALL_EQUAL:
        for (int i = 0; i < n; i++) v[i] = 0.5f;
        expect = 0;
        break;
    case AM_NAN_MIXED: {
        int k = n / 2;
        for (int i = 0; i < n; i += 3) v[i] = NAN;
        v[0] = NAN;
        v[k] = 50.0f;
        v[k + 1] = NAN;
        expect = k;
        break;
    }
    case AM_ALL_NEG_INF:
        for (int i = 0; i < n; i++) v[i] = -INFINITY;
        expect = 0;
        break;
    case AM_NAN_THEN_NEG_INF:
        for (int i = 0; i < n; i++) v[i] = -INFINITY;
        v[0] = NAN;
        expect = 1;
        break;
    case AM_POS_INF_TIES:
        v[n / 4] = v[n / 2] = INFINITY;
        expect = n / 4;
        break;
    case AM_ALL_NAN:
        for (int i = 0; i < n; i++) v[i] = NAN;
        expect = -1;
        break;
    case AM_LAST:
        v[n - 1] = 1e6f;
        expect = n - 1;
        break;
    case AM_NAN_AT_END:
        for (int i = 0; i < n - 1; i++) v[i] = (float)i;
        v[n - 1] = NAN;
        expect = n - 2;
        break;
    case AM_SIGNED_ZERO:
        for (int i = 0; i < n; i++) v[i] = -1.0f;
        v[1] = -0.0f;
        v[2] = 0.0f;
        expect = 1;
        break;
    case AM_NEG_INF_AND_FINITE:
        for (int i = 0; i < n; i++) v[i] = -INFINITY;
        v[n - 2] = -1e30f;
        expect = n - 2;
        break;
    default: break;
    }
    int naive = argmax_naive(v, n);
    if (expect != -2) CHECK(naive == expect, "argmax test table: naive reference %d vs stated %d (%s)", naive, expect, x->desc);
    x->iref = naive;
    x->a[0] = b;
    x->out = -1;
    x->bytes = 4.0 * n;
}
static void exec_argmax(op_ctx *x) { x->iresult = x->be->argmax(D(x, x->a[0]), x->c->p[0]); }

/* ------------------------------------------------------------------------------------------------
 * The table. Model shapes: BLIP-2 OPT-2.7b (vision C 1408, mlp 6144, T 257, 16×88 heads; Q-Former C
 * 768, mlp 3072, 12×64 heads, 32 queries; OPT C 2560, ffn 10240, 32×80 heads; prompt 45 = 32 image
 * tokens + BOS + 12), then odd sizes (1, 3, 7, 13, 65). */
#define MM(T, C, OC, b, note) {"matmul", note, setup_matmul, exec_matmul, extra_matmul, {T, C, OC, b}, 0, 1e-5}
#define LN(T, C, inpl, var, eps, note) {"layernorm", note, setup_layernorm, exec_layernorm, NULL, {T, C, inpl, var}, eps, 1e-5}
#define ATT(Tq, Tk, NH, HS, causal, layout, pad, amp, scale, note) \
    {"attention", note, setup_attention, exec_attention, NULL, {Tq, Tk, NH, HS, causal, layout, pad, amp}, scale, 1e-5}
#define ATT_REL(Tq, Tk, NH, HS, note) \
    {"attention", note, setup_attention_rel, exec_attention_rel, extra_attention_rel, {Tq, Tk, NH, HS, 1, 0, 3, 0}, 0, 1e-5}
#define PAGED(Tq, Tk, NH, HS, BS, pad, scale, note) \
    {"attention_paged", note, setup_attention_paged, exec_attention_paged, NULL, {Tq, Tk, NH, HS, BS, pad}, scale, 1e-5}
#define SM(T, n, var, note) {"softmax", note, setup_softmax, exec_softmax, NULL, {T, n, var}, 0, 1e-5}
#define UN(op, n, tol, note) {#op, note, setup_##op, exec_##op, NULL, {n}, 0, tol}
#define RES(n, note) {"residual_add", note, setup_residual_add, exec_residual_add, NULL, {n}, 0, 0}
#define I2C(CH, Hh, W, PS, note) {"im2col_patches", note, setup_im2col, exec_im2col, NULL, {CH, Hh, W, PS}, 0, 0}
#define EMB(T, C, V, note) {"embedding", note, setup_embedding, exec_embedding, NULL, {T, C, V}, 0, 0}
#define ADDR(T, C, row0, R, note) {"add_rows", note, setup_add_rows, exec_add_rows, NULL, {T, C, row0, R}, 0, 0}
#define AM(n, var, note) {"argmax", note, setup_argmax, exec_argmax, NULL, {n, var}, 0, 0}

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
    LN(65, 13, 1, 0, 1e-6f, "odd"),

    ATT(257, 257, 16, 88, 0, 1, 0, 0, 0, "vision self-attention"),
    ATT(32, 32, 12, 64, 0, 1, 0, 0, 0, "Q-Former self-attention"),
    ATT(32, 257, 12, 64, 0, 0, 0, 0, 0, "Q-Former cross-attention"),
    ATT(45, 45, 32, 80, 1, 0, 0, 0, 0.11180339887f, "OPT prefill (causal)"),
    ATT(1, 45, 32, 80, 1, 0, 0, 0, 0.11180339887f, "OPT decode (causal, Tq=1)"),
    ATT(1, 1, 1, 1, 0, 0, 0, 0, 0, "odd"),
    ATT(1, 1, 1, 1, 1, 0, 2, 0, 0, "odd"),
    ATT(3, 3, 1, 7, 1, 1, 5, 0, 0, "odd"),
    ATT(7, 13, 3, 5, 1, 0, 3, 0, 1.0f, "odd, causal with a cache (Tq<Tk)"),
    ATT(13, 65, 2, 3, 0, 0, 1, 0, 0, "odd"),
    ATT(65, 65, 4, 13, 1, 1, 7, 0, 0, "odd"),
    ATT(13, 13, 2, 16, 0, 1, 0, 6, 0, "large scores"),
    ATT_REL(13, 13, 3, 7, "causal semantics"),
    ATT_REL(5, 17, 2, 9, "causal semantics with a cache"),

    PAGED(45, 45, 32, 80, 16, 0, 1.0f, "OPT prefill, 16-position blocks"),
    PAGED(1, 45, 32, 80, 16, 0, 1.0f, "OPT decode, 16-position blocks"),
    PAGED(7, 13, 3, 5, 5, 3, 0, "odd, chunk after a cache"),
    PAGED(1, 1, 1, 1, 1, 0, 0, "odd"),
    PAGED(3, 3, 1, 7, 2, 1, 0, "odd"),
    PAGED(13, 65, 2, 3, 7, 2, 0, "odd"),
    PAGED(65, 65, 4, 13, 65, 0, 0, "odd, one block"),

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

    ADDR(45, 2560, 2, 50, "OPT positions"),
    ADDR(1, 2560, 46, 50, "OPT decode position"),
    ADDR(257, 1408, 0, 257, "vision positions"),
    ADDR(3, 7, 5, 8, "odd (ends at the table end)"),

    AM(50304, AM_RANDOM, "OPT vocab"),
    AM(50304, AM_TIES, "OPT vocab"),
    AM(13, AM_ALL_EQUAL, ""),
    AM(65, AM_NAN_MIXED, ""),
    AM(7, AM_ALL_NEG_INF, ""),
    AM(7, AM_NAN_THEN_NEG_INF, ""),
    AM(65, AM_POS_INF_TIES, ""),
    AM(5, AM_ALL_NAN, ""),
    AM(65, AM_LAST, ""),
    AM(13, AM_NAN_AT_END, ""),
    AM(7, AM_SIGNED_ZERO, ""),
    AM(13, AM_NEG_INF_AND_FINITE, ""),
    AM(1, AM_RANDOM, "odd"),
    AM(3, AM_RANDOM, "odd"),
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
    if (x->out < 0) {
        if (x->iref >= 0)
            CHECK(x->iresult == x->iref, "[%s %s %s] got index %d, expected %d", be, op, x->desc, x->iresult, x->iref);
        else
            CHECK(x->iresult >= 0 && x->iresult < x->c->p[0], "[%s %s %s] index %d out of range", be, op, x->desc,
                  x->iresult);
        return;
    }
    const float *o = H(x, x->out);
    size_t n = (size_t)x->rows * x->row_len, bad = 0, first_bad = 0;
    for (size_t i = 0; i < n; i++)
        if (!isfinite(o[i]) && !bad++) first_bad = i;
    CHECK(bad == 0, "[%s %s %s] %zu non-finite outputs (first at %zu: %g)", be, op, x->desc, bad, first_bad,
          bad ? o[first_bad] : 0.0);
    double num = 0, den = 0;
    size_t mismatch = 0, checked = 0;
    for (int r = 0; r < x->rows; r++) {
        if (!row_checked(x, r)) continue;
        for (int c = 0; c < x->row_len; c++) {
            size_t i = (size_t)r * x->row_len + c;
            double d = (double)o[i] - x->ref[i];
            num += d * d;
            den += x->ref[i] * x->ref[i];
            if (o[i] != (float)x->ref[i] || isnan(o[i])) mismatch++;
            checked++;
        }
    }
    double rel = den > 0 ? sqrt(num / den) : sqrt(num);
    if (isnan(rel)) rel = INFINITY;
    if (x->c->tol == 0)
        CHECK(mismatch == 0, "[%s %s %s] %zu of %zu elements differ from the exact result", be, op, x->desc, mismatch,
              checked);
    else
        CHECK(rel <= x->c->tol, "[%s %s %s] relative L2 %.3g > %.3g", be, op, x->desc, rel, x->c->tol);
    if (getenv("TEST_OPS_VERBOSE"))
        printf("  %-4s %-15s %-58s rel L2 %.3g (%zu elements checked%s)\n", be, op, x->desc, rel, checked,
               x->row_step > 1 ? ", sampled rows" : "");
}

static void run_case(const op_case *c, const ops_backend *be, int idx) {
    op_ctx x;
    memset(&x, 0, sizeof x);
    x.c = c;
    x.be = be;
    x.rng = g_seed * 0x100000001b3ull + (uint64_t)idx * 7919u + 1;
    x.out = -1;
    c->setup(&x);
    ctx_commit(&x);
    c->exec(&x);
    be_sync(be);
    ctx_download(&x);
    verify(&x);
    if (c->extra) c->extra(&x);
    if (g_perf) {
        double *t = malloc(sizeof(double) * g_reps);
        for (int r = 0; r < g_reps; r++) {
            for (int i = 0; i < x.nb; i++)
                if (x.b[i].role == B_INOUT) buf_upload(&x, i);
            be_sync(be);
            double t0 = now_s();
            c->exec(&x);
            be_sync(be);
            t[r] = now_s() - t0;
        }
        qsort(t, g_reps, sizeof(double), cmp_double);
        double med = t[g_reps / 2];
        char gf[32] = "", gb[32] = "";
        if (x.flops > 0 && (!strcmp(c->op, "matmul") || !strcmp(c->op, "attention")))
            snprintf(gf, sizeof gf, "%8.2f GFLOP/s", x.flops / med * 1e-9);
        if (x.bytes > 0) snprintf(gb, sizeof gb, "%8.2f GB/s", x.bytes / med * 1e-9);
        printf("%-4s %-15s %-62s %-28s %10.4f ms %17s %13s\n", be->name, c->op, x.desc, c->note, med * 1e3, gf, gb);
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
        else if (!strcmp(argv[i], "--seed") && i + 1 < argc) g_seed = strtoull(argv[++i], NULL, 10);
        else {
            fprintf(stderr, "usage: test_ops [--perf [--reps N]] [--full] [--op NAME] [--seed N]\n");
            return 2;
        }
    }
    if (g_reps < 1) g_reps = 1;
    printf("test_ops: %zu cases, seed %llu%s\n", sizeof cases / sizeof cases[0], (unsigned long long)g_seed,
           g_full ? ", full reference" : "");
    if (g_perf)
        printf("%-4s %-15s %-62s %-28s %13s %17s %13s\n", "be", "op", "shape", "role", "median", "", "");
    for (size_t b = 0; b < sizeof backends / sizeof backends[0]; b++)
        for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
            if (!g_only || !strcmp(g_only, cases[i].op)) run_case(&cases[i], backends[b], (int)i);
    return check_summary();
}
