/* The op set. Each op has a plain C reference (kernels/cpu/) and, later, a CUDA twin
 * (kernels/cuda/) with the same name and argument order. Shapes use the project's letters:
 * T tokens (rows), C channels, OC output channels, NH heads, HS head size. All row-major fp32. */
#ifndef BLIP2_OPS_H
#define BLIP2_OPS_H

#include <stddef.h>
#include <stdint.h>

/* out[T, OC] = inp[T, C] · weight[OC, C]ᵀ + bias[OC] (bias may be NULL). PyTorch Linear layout. */
void blip2_matmul(float *out, const float *inp, const float *weight, const float *bias, int T, int C, int OC);

/* out[T, C] = LN(inp[T, C]) · w[C] + b[C]; biased variance, eps inside the sqrt. out may equal inp. */
void blip2_layernorm(float *out, const float *inp, const float *w, const float *b, int T, int C, float eps);

/* x[i] += y[i] for n elements. */
void blip2_residual_add(float *x, const float *y, size_t n);

/* In place, n elements: exact erf GELU 0.5·x·(1+erf(x/√2)); ReLU. */
void blip2_gelu(float *x, size_t n);
void blip2_relu(float *x, size_t n);

/* Multi-head attention for one sequence. q [Tq, q_stride], k and v [Tk, kv_stride]; head h reads
 * columns [h·HS, (h+1)·HS) of each. out [Tq, NH·HS] (heads concatenated h-major).
 * scores = (q·kᵀ)·scale; if causal, query i sees keys j <= i + (Tk − Tq) (its own past).
 * scratch holds Tq·Tk floats (the score matrix of one head). */
void blip2_attention(float *out, const float *q, const float *k, const float *v, float *scratch, int Tq, int Tk,
                     int NH, int HS, int q_stride, int kv_stride, float scale, int causal);

/* Causal attention of Tq new query rows over a sequence of Tk keys (the last Tq are the new ones)
 * whose keys and values live in a paged pool: k_pool and v_pool [n_blocks, BS, kv_stride]; key j
 * is row j % BS of block block_table[j / BS]. q [Tq, q_stride] → out [Tq, NH·HS]; query i sees
 * keys j <= i + (Tk − Tq). scratch holds Tk floats. */
void blip2_attention_paged(float *out, const float *q, const float *k_pool, const float *v_pool,
                           const int32_t *block_table, int block_size, float *scratch, int Tq, int Tk, int NH, int HS,
                           int q_stride, int kv_stride, float scale);

/* In place softmax over each of T rows of n values (max-subtracted). */
void blip2_softmax(float *x, int T, int n);

/* Gathers image patches as matmul rows: img [CH, H, W] → out [P, CH·PS·PS], patch p = py·(W/PS)+px,
 * column c·PS·PS + i·PS + j (Conv2d weight order). */
void blip2_im2col_patches(float *out, const float *img, int CH, int H, int W, int PS);

/* out[t, :] = table[ids[t], :] for T rows of C. */
void blip2_embedding(float *out, const int32_t *ids, const float *table, int T, int C);

/* x[t, :] += table[row0 + t, :] for T rows of C (learned positions; OPT passes row0 = pos + 2). */
void blip2_add_rows(float *x, const float *table, int row0, int T, int C);

/* Index of the maximum of x[0..n), the lowest index on ties (as torch.argmax). NaN never wins. */
int blip2_argmax(const float *x, int n);

#endif
