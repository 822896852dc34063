/* Plain C reference kernels (fp32). Matmuls go to OpenBLAS's cblas_sgemm: on the CPU that is
 * where nearly all the time goes; everything else here is a single pass over memory. */
#include "../ops.h"

#include <cblas.h>
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

void blip2_matmul(float *out, const float *inp, const float *weight, const float *bias, int T, int C, int OC) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, OC, C, 1.0f, inp, C, weight, C, 0.0f, out, OC);
    if (!bias) return;
    for (int t = 0; t < T; t++) {
        float *row = out + (size_t)t * OC;
        for (int o = 0; o < OC; o++) row[o] += bias[o];
    }
}

void blip2_layernorm(float *out, const float *inp, const float *w, const float *b, int T, int C, float eps) {
    for (int t = 0; t < T; t++) {
        const float *x = inp + (size_t)t * C;
        float *y = out + (size_t)t * C;
        /* Two-pass in double: the fixtures' 2e-6 bound leaves no room for a sloppy variance. */
        double sum = 0;
        for (int i = 0; i < C; i++) sum += x[i];
        float mean = (float)(sum / C);
        double var = 0;
        for (int i = 0; i < C; i++) {
            float d = x[i] - mean;
            var += (double)d * d;
        }
        float rstd = (float)(1.0 / sqrt(var / C + (double)eps));
        for (int i = 0; i < C; i++) y[i] = (x[i] - mean) * rstd * w[i] + b[i];
    }
}

void blip2_residual_add(float *x, const float *y, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] += y[i];
}

static inline float gelu1(float v) { return 0.5f * v * (1.0f + erff(v * (float)M_SQRT1_2)); }
static inline float relu1(float v) { return v > 0.0f ? v : 0.0f; }
static inline float act1(float v, int act) {
    return act == BLIP2_ACT_GELU ? gelu1(v) : act == BLIP2_ACT_RELU ? relu1(v) : v;
}

void blip2_gelu(float *x, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] = gelu1(x[i]);
}

void blip2_relu(float *x, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] = relu1(x[i]);
}

void blip2_softmax(float *x, int T, int n) {
    for (int t = 0; t < T; t++) {
        float *row = x + (size_t)t * n;
        float mx = -INFINITY;
        for (int i = 0; i < n; i++) mx = row[i] > mx ? row[i] : mx;
        double sum = 0;
        for (int i = 0; i < n; i++) {
            row[i] = expf(row[i] - mx);
            sum += row[i];
        }
        float inv = (float)(1.0 / sum);
        for (int i = 0; i < n; i++) row[i] *= inv;
    }
}

/* Element i of x of wdtype (any BLIP2_W_*), as fp32 (exact). */
static inline float widen(const void *x, int wdtype, size_t i) {
    if (wdtype == BLIP2_W_F32) return ((const float *)x)[i];
    uint16_t h = ((const uint16_t *)x)[i];
    return wdtype == BLIP2_W_F16 ? blip2_f16_to_f32(h) : blip2_bf16_to_f32(h);
}

/* Key/value row j of a paged pool: row j % bs of block table[j / bs]. */
static inline size_t kv_offset(const int32_t *table, int bs, int j, int stride) {
    return ((size_t)table[j / bs] * bs + j % bs) * stride;
}

/* One head of one query row: scores over the visible keys, softmax, weighted sum of values. k and
 * v point at the head's first column of a pool of kvdtype (off: that column's element offset). */
typedef struct {
    const void *k, *v;
    size_t off;
    int kvdtype, bs, HS, stride;
} head_pool;

static void attend_row(float *out, const float *q, const head_pool *p, const int32_t *table, int n_keys, float scale,
                       float *scores) {
    int HS = p->HS;
    float qs[HS > 0 ? HS : 1];
    for (int d = 0; d < HS; d++) qs[d] = q[d] * scale; /* as OPT: q · scaling, then q·kᵀ */
    float mx = -INFINITY;
    for (int j = 0; j < n_keys; j++) {
        size_t kj = kv_offset(table, p->bs, j, p->stride) + p->off;
        float s = 0;
        for (int d = 0; d < HS; d++) s += qs[d] * widen(p->k, p->kvdtype, kj + d);
        scores[j] = s;
        mx = scores[j] > mx ? scores[j] : mx;
    }
    double sum = 0;
    for (int j = 0; j < n_keys; j++) {
        scores[j] = expf(scores[j] - mx);
        sum += scores[j];
    }
    float inv = (float)(1.0 / sum);
    for (int d = 0; d < HS; d++) out[d] = 0;
    for (int j = 0; j < n_keys; j++) {
        float pj = scores[j] * inv;
        size_t vj = kv_offset(table, p->bs, j, p->stride) + p->off;
        for (int d = 0; d < HS; d++) out[d] += pj * widen(p->v, p->kvdtype, vj + d);
    }
}

static void store_row(void *pool, int kvdtype, size_t dst, const float *x, int n);

/* The new rows' keys and values (NH·HS columns of rows like q's) into their pool rows. */
static void put_new_rows(void *k_pool, void *v_pool, int kvdtype, const float *k_new, const float *v_new,
                         const int32_t *tables, int max_blocks, const int32_t *meta, int n_seqs, int block_size,
                         int C, int q_stride, int kv_stride) {
    for (int i = 0; i < n_seqs; i++)
        for (int t = 0; t < meta[3 * i + 1]; t++) {
            size_t dst = kv_offset(tables + (size_t)i * max_blocks, block_size, meta[3 * i + 2] + t, kv_stride);
            size_t src = (size_t)(meta[3 * i] + t) * q_stride;
            store_row(k_pool, kvdtype, dst, k_new + src, C);
            store_row(v_pool, kvdtype, dst, v_new + src, C);
        }
}

void blip2_attention_paged(void *out, const float *q, void *k_pool, void *v_pool, int kvdtype, const float *k_new,
                           const float *v_new, const int32_t *tables, int max_blocks, const int32_t *meta, int n_seqs,
                           int block_size, float *scratch, int max_ctx, int NH, int HS, int q_stride, int kv_stride,
                           float scale, int odtype) {
    if (k_new)
        put_new_rows(k_pool, v_pool, kvdtype, k_new, v_new, tables, max_blocks, meta, n_seqs, block_size, NH * HS,
                     q_stride, kv_stride);
    (void)max_ctx;
    for (int i = 0; i < n_seqs; i++) {
        int row0 = meta[3 * i], n_new = meta[3 * i + 1], past = meta[3 * i + 2];
        const int32_t *table = tables + (size_t)i * max_blocks;
        for (int r = 0; r < n_new; r++)
            for (int h = 0; h < NH; h++) {
                head_pool p = {k_pool, v_pool, (size_t)h * HS, kvdtype, block_size, HS, kv_stride};
                size_t o = (size_t)(row0 + r) * NH * HS + (size_t)h * HS;
                float row[HS > 0 ? HS : 1]; /* an fp32 out is written in place, a 16-bit one rounded from here */
                float *dst = odtype == BLIP2_W_F32 ? (float *)out + o : row;
                attend_row(dst, q + (size_t)(row0 + r) * q_stride + h * HS, &p, table, past + r + 1, scale, scratch);
                if (odtype != BLIP2_W_F32) store_row(out, odtype, o, row, HS);
            }
    }
}

/* Stores n values of a row as kvdtype at element offset dst of pool (16 bits: nearest even). */
static void store_row(void *pool, int kvdtype, size_t dst, const float *x, int n) {
    if (kvdtype == BLIP2_W_F32) {
        memcpy((float *)pool + dst, x, sizeof(float) * n);
        return;
    }
    uint16_t *h = (uint16_t *)pool + dst;
    for (int i = 0; i < n; i++) h[i] = kvdtype == BLIP2_W_F16 ? blip2_f32_to_f16(x[i]) : blip2_f32_to_bf16(x[i]);
}

void blip2_kv_write(void *k_pool, void *v_pool, int kvdtype, const float *k, const float *v, int in_stride,
                    const int32_t *tables, int max_blocks, const int32_t *meta, int n_seqs, int block_size, int C) {
    for (int i = 0; i < n_seqs; i++) {
        const int32_t *table = tables + (size_t)i * max_blocks;
        for (int t = 0; t < meta[3 * i + 1]; t++) {
            size_t dst = kv_offset(table, block_size, meta[3 * i + 2] + t, C), src = (size_t)(meta[3 * i] + t) * in_stride;
            store_row(k_pool, kvdtype, dst, k + src, C);
            store_row(v_pool, kvdtype, dst, v + src, C);
        }
    }
}

/* Contiguous keys: per sequence and head, S = scale·Q·Kᵀ and O = softmax(S)·V as two sgemms, so
 * the vision encoder's 257×257 attention runs at matmul speed instead of a scalar loop. */
static void attention_f32(float *out, const float *q, const float *k, const float *v, float *scratch, int B, int Tq,
                          int Tk, int NH, int HS, int q_stride, int kv_stride, float scale, int causal) {
    int ld_out = NH * HS;
    for (int b = 0; b < B; b++) {
        const float *qb = q + (size_t)b * Tq * q_stride, *kb = k + (size_t)b * Tk * kv_stride;
        const float *vb = v + (size_t)b * Tk * kv_stride;
        float *ob = out + (size_t)b * Tq * ld_out;
        for (int h = 0; h < NH; h++) { /* one head's Tq·Tk of the scratch is enough here */
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, Tq, Tk, HS, scale, qb + h * HS, q_stride, kb + h * HS,
                        kv_stride, 0.0f, scratch, Tk);
            for (int i = 0; causal && i < Tq; i++)
                for (int j = i + (Tk - Tq) + 1; j < Tk; j++) scratch[(size_t)i * Tk + j] = -INFINITY;
            blip2_softmax(scratch, Tq, Tk);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, Tq, HS, Tk, 1.0f, scratch, Tk, vb + h * HS, kv_stride,
                        0.0f, ob + h * HS, ld_out);
        }
    }
}

/* n elements of x (of xdtype) widened into a new fp32 array; NULL for n == 0. The reference's
 * 16-bit attention: not a request path (the CPU backend's activations are fp32). */
static float *widened_copy(const void *x, int xdtype, size_t n) {
    if (!n) return NULL;
    float *f = malloc(sizeof(float) * n);
    if (!f) abort();
    for (size_t i = 0; i < n; i++) f[i] = widen(x, xdtype, i);
    return f;
}

void blip2_attention(void *out, const void *q, const void *k, const void *v, float *scratch, int B, int Tq, int Tk,
                     int NH, int HS, int q_stride, int kv_stride, float scale, int causal, int wdtype, int iodtype) {
    (void)wdtype; /* the reference is fp32 whatever the weights */
    if (iodtype == BLIP2_W_F32) {
        attention_f32(out, q, k, v, scratch, B, Tq, Tk, NH, HS, q_stride, kv_stride, scale, causal);
        return;
    }
    if (B <= 0 || Tq <= 0 || NH <= 0 || HS <= 0) return;
    /* the elements the op reads: up to the last row's last head */
    size_t nq = (size_t)(B * Tq - 1) * q_stride + (size_t)NH * HS;
    size_t nkv = Tk > 0 ? (size_t)(B * Tk - 1) * kv_stride + (size_t)NH * HS : 0, no = (size_t)B * Tq * NH * HS;
    float *qf = widened_copy(q, iodtype, nq), *kf = widened_copy(k, iodtype, nkv), *vf = widened_copy(v, iodtype, nkv);
    float *of = malloc(sizeof(float) * no);
    if (!of) abort();
    if (Tk > 0) attention_f32(of, qf, kf, vf, scratch, B, Tq, Tk, NH, HS, q_stride, kv_stride, scale, causal);
    else memset(of, 0, sizeof(float) * no);
    store_row(out, iodtype, 0, of, (int)no);
    free(qf), free(kf), free(vf), free(of);
}

void blip2_im2col_patches(float *out, const float *img, int CH, int H, int W, int PS) {
    int PW = W / PS, PH = H / PS, K = CH * PS * PS;
    for (int py = 0; py < PH; py++)
        for (int px = 0; px < PW; px++) {
            float *row = out + (size_t)(py * PW + px) * K;
            for (int c = 0; c < CH; c++)
                for (int i = 0; i < PS; i++)
                    for (int j = 0; j < PS; j++)
                        row[c * PS * PS + i * PS + j] = img[((size_t)c * H + py * PS + i) * W + px * PS + j];
        }
}

void blip2_embedding(float *out, const int32_t *ids, const float *table, int T, int C) {
    for (int t = 0; t < T; t++) {
        const float *src = table + (size_t)ids[t] * C;
        for (int i = 0; i < C; i++) out[(size_t)t * C + i] = src[i];
    }
}

void blip2_add_rows(float *x, const float *table, int row0, int T, int C) {
    blip2_residual_add(x, table + (size_t)row0 * C, (size_t)T * C);
}

int blip2_argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best] || (isnan(x[best]) && !isnan(x[i]))) best = i;
    return best;
}

/* ---- 16-bit weights ---- */

float blip2_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man) { /* subnormal: normalise */
        int e = -1;
        do { man <<= 1; e++; } while (!(man & 0x400));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ff) << 13);
    } else {
        bits = sign;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

float blip2_bf16_to_f32(uint16_t b) {
    uint32_t bits = (uint32_t)b << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

uint16_t blip2_f32_to_bf16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40); /* quiet NaN */
    x += 0x7fff + ((x >> 16) & 1);
    return (uint16_t)(x >> 16);
}

uint16_t blip2_f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000, ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return (uint16_t)(sign | 0x7e00);
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00); /* rounds to >= 65520: inf */
    if (ax < 0x38800000u) { /* subnormal half (or zero): round |f| * 2^24 to nearest even */
        float a;
        memcpy(&a, &ax, 4);
        float scaled = a * 16777216.0f; /* exact: power of two */
        uint32_t q = (uint32_t)scaled;
        float rem = scaled - (float)q;
        if (rem > 0.5f || (rem == 0.5f && (q & 1))) q++;
        return (uint16_t)(sign | q);
    }
    uint32_t r = ax + 0xfff + ((ax >> 13) & 1) - (112u << 23);
    return (uint16_t)(sign | (r >> 13));
}

static void apply_act(float *x, size_t n, int act) {
    if (act == BLIP2_ACT_GELU) blip2_gelu(x, n);
    if (act == BLIP2_ACT_RELU) blip2_relu(x, n);
}

/* Widens a slab of weight rows at a time and hands it to sgemm: exact, and the slab stays in cache. */
void blip2_matmul_h(float *out, const float *inp, const uint16_t *weight, const float *bias, int T, int C, int OC,
                    int wdtype, int act) {
    enum { SLAB = 64 };
    float *w = malloc(sizeof(float) * SLAB * (size_t)C);
    if (!w) abort(); /* 64 rows of weights: not a request-sized allocation */
    for (int o0 = 0; o0 < OC; o0 += SLAB) {
        int n = OC - o0 < SLAB ? OC - o0 : SLAB;
        for (size_t i = 0; i < (size_t)n * C; i++) w[i] = widen(weight, wdtype, (size_t)o0 * C + i);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, n, C, 1.0f, inp, C, w, C, 0.0f, out + o0, OC);
    }
    free(w);
    for (int t = 0; bias && t < T; t++) blip2_residual_add(out + (size_t)t * OC, bias, (size_t)OC);
    apply_act(out, (size_t)T * OC, act);
}

void blip2_residual_layernorm(float *res, float *out, const float *y, const float *bias, const float *w, const float *b,
                              int T, int C, float eps) {
    for (int t = 0; t < T; t++) {
        float *r = res + (size_t)t * C;
        const float *yy = y + (size_t)t * C;
        if (bias)
            for (int i = 0; i < C; i++) r[i] += yy[i] + bias[i];
        else
            blip2_residual_add(r, yy, (size_t)C);
        blip2_layernorm(out + (size_t)t * C, res + (size_t)t * C, w, b, 1, C, eps);
    }
}

void blip2_penalize_rows(float *x, const int32_t *ids, const int32_t *offs, const float *pen, int T, int n, int v0) {
    for (int t = 0; t < T; t++)
        for (int k = offs[t]; k < offs[t + 1]; k++) {
            int64_t j = (int64_t)ids[k] - v0;
            if (j < 0 || j >= n) continue;
            float *s = x + (size_t)t * n + j;
            *s = *s < 0 ? *s * pen[t] : *s / pen[t];
        }
}

void blip2_logsumexp_rows(float *out, const float *x, int T, int n) {
    for (int t = 0; t < T; t++) {
        const float *row = x + (size_t)t * n;
        float mx = -INFINITY;
        for (int j = 0; j < n; j++) mx = row[j] > mx ? row[j] : mx;
        double sum = 0;
        if (mx > -INFINITY)
            for (int j = 0; j < n; j++) sum += exp((double)(row[j] - mx));
        out[2 * t] = mx > -INFINITY ? mx : 0.0f; /* no mass: (0, 0) */
        out[2 * t + 1] = (float)sum;
    }
}

void blip2_shift_rows(float *x, const float *shift, int T, int n) {
    for (int t = 0; t < T; t++)
        for (int j = 0; j < n; j++) x[(size_t)t * n + j] -= shift[t];
}

/* ---- 16-bit matmul inputs (the _a ops) ---- */

void blip2_layernorm_a(void *out, const float *inp, const float *w, const float *b, int T, int C, float eps, int adtype) {
    if (adtype == BLIP2_W_F32) {
        blip2_layernorm(out, inp, w, b, T, C, eps);
        return;
    }
    float row[C > 0 ? C : 1];
    for (int t = 0; t < T; t++) {
        blip2_layernorm(row, inp + (size_t)t * C, w, b, 1, C, eps);
        store_row(out, adtype, (size_t)t * C, row, C); /* rounded to nearest even */
    }
}

void blip2_activate_a(void *out, const void *x, size_t n, int act, int adtype, int xdtype) {
    enum { CHUNK = 256 };
    float v[CHUNK];
    for (size_t i0 = 0; i0 < n; i0 += CHUNK) { /* a chunk is read whole before it is stored: out may be x */
        size_t k = n - i0 < CHUNK ? n - i0 : CHUNK;
        for (size_t i = 0; i < k; i++) v[i] = act1(widen(x, xdtype, i0 + i), act);
        store_row(out, adtype, i0, v, (int)k);
    }
}

/* 16-bit inputs: widened 64 rows at a time (exact), then the fp32-input path. */
static void matmul_a_f32(float *out, const void *inp, const void *weight, const float *bias, int T, int C, int OC,
                         int adtype, int wdtype, int act);

/* A 16-bit out: 64 rows at a time into fp32 (with the bias of odtype widened), then rounded. */
static void matmul_a_16(void *out, const void *inp, const void *weight, const void *bias, int T, int C, int OC, int adtype,
                        int wdtype, int act, int odtype) {
    enum { SLAB = 64 };
    float *y = malloc(sizeof(float) * SLAB * (size_t)(OC > 0 ? OC : 1)), *b = bias ? malloc(sizeof(float) * OC) : NULL;
    if (!y || (bias && !b)) abort(); /* 64 rows of outputs: not a request-sized allocation */
    for (int o = 0; bias && o < OC; o++) b[o] = widen(bias, odtype, (size_t)o);
    size_t in_row = (size_t)C * blip2_wdtype_size(adtype);
    for (int t0 = 0; t0 < T; t0 += SLAB) {
        int n = T - t0 < SLAB ? T - t0 : SLAB;
        matmul_a_f32(y, (const char *)inp + (size_t)t0 * in_row, weight, b, n, C, OC, adtype, wdtype, act);
        store_row(out, odtype, (size_t)t0 * OC, y, n * OC);
    }
    free(y);
    free(b);
}

void blip2_matmul_a(void *out, const void *inp, const void *weight, const void *bias, int T, int C, int OC, int adtype,
                    int wdtype, int act, int odtype) {
    if (odtype == BLIP2_W_F32) matmul_a_f32(out, inp, weight, bias, T, C, OC, adtype, wdtype, act);
    else matmul_a_16(out, inp, weight, bias, T, C, OC, adtype, wdtype, act, odtype);
}

static void matmul_a_f32(float *out, const void *inp, const void *weight, const float *bias, int T, int C, int OC,
                         int adtype, int wdtype, int act) {
    if (adtype == BLIP2_W_F32 && wdtype != BLIP2_W_F32) {
        blip2_matmul_h(out, inp, weight, bias, T, C, OC, wdtype, act);
    } else if (adtype == BLIP2_W_F32) {
        blip2_matmul(out, inp, weight, bias, T, C, OC);
        apply_act(out, (size_t)T * OC, act);
    } else {
        enum { SLAB = 64 };
        float *x = malloc(sizeof(float) * SLAB * (size_t)(C > 0 ? C : 1));
        if (!x) abort(); /* 64 rows of inputs: not a request-sized allocation */
        for (int t0 = 0; t0 < T; t0 += SLAB) {
            int n = T - t0 < SLAB ? T - t0 : SLAB;
            for (size_t i = 0; i < (size_t)n * C; i++) x[i] = widen(inp, adtype, (size_t)t0 * C + i);
            matmul_a_f32(out + (size_t)t0 * OC, x, weight, bias, n, C, OC, BLIP2_W_F32, wdtype, act);
        }
        free(x);
    }
}

/* 64 rows at a time: the product plus bias into a slab, then added to out (the order the fused
 * residual + norm used: x + (y + bias)). */
void blip2_matmul_acc_a(float *out, const void *inp, const void *weight, const float *bias, int T, int C, int OC,
                        int adtype, int wdtype) {
    enum { SLAB = 64 };
    float *y = malloc(sizeof(float) * SLAB * (size_t)(OC > 0 ? OC : 1));
    if (!y) abort(); /* 64 rows of outputs: not a request-sized allocation */
    size_t in_row = (size_t)C * blip2_wdtype_size(adtype);
    for (int t0 = 0; t0 < T; t0 += SLAB) {
        int n = T - t0 < SLAB ? T - t0 : SLAB;
        matmul_a_f32(y, (const char *)inp + (size_t)t0 * in_row, weight, bias, n, C, OC, adtype, wdtype, BLIP2_ACT_NONE);
        blip2_residual_add(out + (size_t)t0 * OC, y, (size_t)n * OC);
    }
    free(y);
}

void blip2_matmul_ln_a(void *out, void *h, const float *x, const float *ln_w, const float *ln_b, float eps,
                       const void *weight, const void *bias, int T, int C, int OC, int adtype, int wdtype, int act,
                       int odtype) {
    blip2_layernorm_a(h, x, ln_w, ln_b, T, C, eps, adtype);
    blip2_matmul_a(out, h, weight, bias, T, C, OC, adtype, wdtype, act, odtype);
}

void blip2_embedding_vp(float *out, const int32_t *ids, const void *table, int wdtype, int T, int C, int v0, int V) {
    for (int t = 0; t < T; t++) {
        float *row = out + (size_t)t * C;
        int local = ids[t] - v0;
        if (ids[t] < 0 || local < 0 || local >= V) memset(row, 0, sizeof(float) * C);
        else for (int i = 0; i < C; i++) row[i] = widen(table, wdtype, (size_t)local * C + i);
    }
}

void blip2_add_rows_at(float *x, const float *table, const int32_t *rows, int T, int C) {
    for (int t = 0; t < T; t++) blip2_residual_add(x + (size_t)t * C, table + (size_t)rows[t] * C, (size_t)C);
}

void blip2_gather_rows(float *out, const float *x, const int32_t *rows, int n, int C) {
    for (int i = 0; i < n; i++) memcpy(out + (size_t)i * C, x + (size_t)rows[i] * C, sizeof(float) * C);
}

/* Argmax order: (va, ia) before (vb, ib)? Numbers before NaN, larger first, then the lower index. */
static int am_before(float va, int ia, float vb, int ib) {
    int na = isnan(va), nb = isnan(vb);
    if (na != nb) return nb;
    if (!na && va != vb) return va > vb;
    return ia < ib;
}

void blip2_topk_rows(int32_t *idx, float *val, const float *x, int T, int n, int k) {
    if (k < 1 || k > n) return; /* the caller's contract (the CUDA twin records an error) */
    for (int t = 0; t < T; t++) { /* insertion into a sorted list of k: most elements fail the first compare */
        const float *r = x + (size_t)t * n;
        int32_t *oi = idx + (size_t)t * k;
        float *ov = val + (size_t)t * k;
        int m = 0;
        for (int i = 0; i < n; i++) {
            if (m == k && !am_before(r[i], i, ov[k - 1], oi[k - 1])) continue;
            int j = m < k ? m++ : k - 1;
            while (j > 0 && am_before(r[i], i, ov[j - 1], oi[j - 1])) ov[j] = ov[j - 1], oi[j] = oi[j - 1], j--;
            ov[j] = r[i], oi[j] = i;
        }
    }
}

void blip2_argmax_rows(int32_t *idx, float *val, const float *x, int T, int n) {
    for (int t = 0; t < T; t++) {
        idx[t] = blip2_argmax(x + (size_t)t * n, n);
        val[t] = x[(size_t)t * n + idx[t]];
    }
}

/* Counter-based normal: splitmix64 of (seed, i), Box-Muller on its two 32-bit halves. */
static float normal_at(uint64_t seed, size_t i) {
    uint64_t z = seed + (uint64_t)(i + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    double u1 = ((double)(z >> 32) + 0.5) / 4294967296.0, u2 = ((double)(z & 0xffffffffu) + 0.5) / 4294967296.0;
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

void blip2_fill_normal(void *x, int wdtype, size_t n, uint64_t seed, float mean, float std) {
    for (size_t i = 0; i < n; i++) {
        float v = std == 0.0f ? mean : mean + std * normal_at(seed, i);
        if (wdtype == BLIP2_W_F32) ((float *)x)[i] = v;
        else ((uint16_t *)x)[i] = wdtype == BLIP2_W_F16 ? blip2_f32_to_f16(v) : blip2_f32_to_bf16(v);
    }
}

/* ---- the CPU backend table: host memory, the functions above ---- */

static void *host_alloc(size_t bytes) { return malloc(bytes ? bytes : 1); }
static void host_copy(void *dst, const void *src, size_t bytes) {
    if (bytes) memmove(dst, src, bytes);
}
static void host_zero(void *p, size_t bytes) { memset(p, 0, bytes); }

static void host_copy_rows(void *dst, const void *src, size_t width, size_t height, size_t pitch) {
    for (size_t r = 0; r < height; r++) memcpy((char *)dst + r * pitch, (const char *)src + r * pitch, width);
}
static int host_sync(char *err, size_t n) {
    (void)err, (void)n;
    return 0;
}

const blip2_ops blip2_cpu_ops = {
    .name = "cpu",
    .device = 0,
    .alloc = host_alloc,
    .release = free,
    .upload = host_copy,
    .download = host_copy,
    .copy = host_copy,
    .copy_rows = host_copy_rows,
    .zero = host_zero,
    .sync = host_sync,
    .matmul = blip2_matmul,
    .matmul_h = blip2_matmul_h,
    .layernorm = blip2_layernorm,
    .residual_layernorm = blip2_residual_layernorm,
    .layernorm_a = blip2_layernorm_a,
    .activate_a = blip2_activate_a,
    .matmul_a = blip2_matmul_a,
    .matmul_acc_a = blip2_matmul_acc_a,
    .matmul_ln_a = blip2_matmul_ln_a,
    .residual_add = blip2_residual_add,
    .gelu = blip2_gelu,
    .relu = blip2_relu,
    .attention = blip2_attention,
    .attention_paged = blip2_attention_paged,
    .kv_write = blip2_kv_write,
    .softmax = blip2_softmax,
    .im2col_patches = blip2_im2col_patches,
    .embedding = blip2_embedding,
    .embedding_vp = blip2_embedding_vp,
    .add_rows = blip2_add_rows,
    .add_rows_at = blip2_add_rows_at,
    .gather_rows = blip2_gather_rows,
    .argmax_rows = blip2_argmax_rows,
    .topk_rows = blip2_topk_rows,
    .penalize_rows = blip2_penalize_rows,
    .logsumexp_rows = blip2_logsumexp_rows,
    .shift_rows = blip2_shift_rows,
    .fill_normal = blip2_fill_normal,
};
