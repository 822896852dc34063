/* Plain C reference kernels (fp32). Matmuls go to OpenBLAS's cblas_sgemm: on the CPU that is
 * where nearly all the time goes; everything else here is a single pass over memory. */
#include "../ops.h"

#include <cblas.h>
#include <float.h>
#include <math.h>

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

void blip2_gelu(float *x, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] = 0.5f * x[i] * (1.0f + erff(x[i] * (float)M_SQRT1_2));
}

void blip2_relu(float *x, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] = x[i] > 0.0f ? x[i] : 0.0f;
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

/* Key/value row j of a paged pool: row j % bs of block table[j / bs]. */
static inline const float *kv_row(const float *pool, const int32_t *table, int bs, int j, int stride) {
    return pool + ((size_t)table[j / bs] * bs + j % bs) * stride;
}

/* One head of one query row: scores over the visible keys, softmax, weighted sum of values. */
static void attend_row(float *out, const float *q, const float *k, const float *v, const int32_t *table, int bs,
                       int n_keys, int HS, int kv_stride, float scale, float *scores) {
    float mx = -INFINITY;
    for (int j = 0; j < n_keys; j++) {
        const float *kj = kv_row(k, table, bs, j, kv_stride);
        float s = 0;
        for (int d = 0; d < HS; d++) s += q[d] * kj[d];
        scores[j] = s * scale;
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
        float p = scores[j] * inv;
        const float *vj = kv_row(v, table, bs, j, kv_stride);
        for (int d = 0; d < HS; d++) out[d] += p * vj[d];
    }
}

/* Paged keys (decode and prefill over the KV blocks): one query row at a time, causal. */
static void attend(float *out, const float *q, const float *k, const float *v, const int32_t *table, int bs,
                   float *scratch, int Tq, int Tk, int NH, int HS, int q_stride, int kv_stride, float scale) {
    for (int i = 0; i < Tq; i++) {
        int n_keys = i + (Tk - Tq) + 1;
        for (int h = 0; h < NH; h++)
            attend_row(out + (size_t)i * NH * HS + h * HS, q + (size_t)i * q_stride + h * HS, k + h * HS, v + h * HS,
                       table, bs, n_keys, HS, kv_stride, scale, scratch);
    }
}

/* Contiguous keys: per head, S = scale·Q·Kᵀ and O = softmax(S)·V as two sgemms, so the vision
 * encoder's 257×257 attention runs at matmul speed instead of a scalar loop. */
void blip2_attention(float *out, const float *q, const float *k, const float *v, float *scratch, int Tq, int Tk,
                     int NH, int HS, int q_stride, int kv_stride, float scale, int causal) {
    int ld_out = NH * HS;
    for (int h = 0; h < NH; h++) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, Tq, Tk, HS, scale, q + h * HS, q_stride, k + h * HS,
                    kv_stride, 0.0f, scratch, Tk);
        for (int i = 0; causal && i < Tq; i++)
            for (int j = i + (Tk - Tq) + 1; j < Tk; j++) scratch[(size_t)i * Tk + j] = -INFINITY;
        blip2_softmax(scratch, Tq, Tk);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, Tq, HS, Tk, 1.0f, scratch, Tk, v + h * HS, kv_stride, 0.0f,
                    out + h * HS, ld_out);
    }
}

void blip2_attention_paged(float *out, const float *q, const float *k_pool, const float *v_pool,
                           const int32_t *block_table, int block_size, float *scratch, int Tq, int Tk, int NH, int HS,
                           int q_stride, int kv_stride, float scale) {
    attend(out, q, k_pool, v_pool, block_table, block_size, scratch, Tq, Tk, NH, HS, q_stride, kv_stride, scale);
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
