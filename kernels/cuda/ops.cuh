/* The CUDA twins of the ops in ../ops.h, for C++/CUDA callers that want them by name rather than
 * through blip2_cuda_ops: same names and argument order, device pointers, queued on the calling
 * thread's current context's stream (context.h). Definitions in ops.cu. */
#ifndef BLIP2_CUDA_OPS_CUH
#define BLIP2_CUDA_OPS_CUH

#include <stddef.h>
#include <stdint.h>

#include "../ops.h"

namespace cuda {

void blip2_matmul(float *out, const float *inp, const float *weight, const float *bias, int T, int C, int OC);
void blip2_matmul_h(float *out, const float *inp, const uint16_t *weight, const float *bias, int T, int C, int OC,
                    int wdtype, int act);
void blip2_layernorm(float *out, const float *inp, const float *w, const float *b, int T, int C, float eps);
void blip2_residual_layernorm(float *res, float *out, const float *y, const float *bias, const float *w, const float *b,
                              int T, int C, float eps);
void blip2_residual_add(float *x, const float *y, size_t n);
void blip2_add_bias(float *x, const float *bias, int T, int C);
void blip2_scale(float *x, float s, size_t n);
void blip2_gelu(float *x, size_t n);
void blip2_relu(float *x, size_t n);
void blip2_attention(float *out, const float *q, const float *k, const float *v, float *scratch, int B, int Tq, int Tk,
                     int NH, int HS, int q_stride, int kv_stride, float scale, int causal, int wdtype);
/* scratch is ignored (the scores live in shared memory: max_ctx floats per block); HS <= 128. */
void blip2_attention_paged(float *out, const float *q, const void *k_pool, const void *v_pool, int kvdtype,
                           const int32_t *tables, int max_blocks, const int32_t *meta, int n_seqs, int block_size,
                           float *scratch, int max_ctx, int NH, int HS, int q_stride, int kv_stride, float scale);
void blip2_kv_write(void *k_pool, void *v_pool, int kvdtype, const float *k, const float *v, int in_stride,
                    const int32_t *tables, int max_blocks, const int32_t *meta, int n_seqs, int block_size, int C);
void blip2_softmax(float *x, int T, int n);
void blip2_im2col_patches(float *out, const float *img, int CH, int H, int W, int PS);
void blip2_embedding(float *out, const int32_t *ids, const float *table, int T, int C);
void blip2_embedding_vp(float *out, const int32_t *ids, const void *table, int wdtype, int T, int C, int v0, int V);
void blip2_add_rows(float *x, const float *table, int row0, int T, int C);
void blip2_add_rows_at(float *x, const float *table, const int32_t *rows, int T, int C);
void blip2_gather_rows(float *out, const float *x, const int32_t *rows, int n, int C);
/* Waits for the stream (the result comes back to the host); 0 on error (recorded in the context). */
int blip2_argmax(const float *x, int n);
void blip2_argmax_rows(int32_t *idx, float *val, const float *x, int T, int n);
void blip2_topk_rows(int32_t *idx, float *val, const float *x, int T, int n, int k);
void blip2_fill_normal(void *x, int wdtype, size_t n, uint64_t seed, float mean, float std);

} /* namespace cuda */

#endif
