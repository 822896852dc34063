/* The op set. Each op has a plain C reference (kernels/cpu/ops.c) and a CUDA twin (kernels/cuda/
 * ops.cu and the files beside it, namespace cuda::) with the same name and argument order; both
 * are reached through one table, blip2_ops, so the forward code (runtime/) is written once.
 * Shapes use the project's letters: T tokens (rows), C channels, OC output channels, NH heads, HS
 * head size, V vocab. Activations are row-major fp32 everywhere; matmul weights may be 16-bit (wdtype).
 * On the CUDA backend every pointer is device memory and ops are queued on the calling thread's
 * stream (see kernels/cuda/context.h); on the CPU every pointer is host memory. */
#ifndef BLIP2_OPS_H
#define BLIP2_OPS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Element type of a weight tensor held by a backend. */
enum { BLIP2_W_F32 = 0, BLIP2_W_F16 = 1, BLIP2_W_BF16 = 2 };
/* Activation fused after a matmul's bias. GELU is the exact erf form (cuBLASLt's is tanh). */
enum { BLIP2_ACT_NONE = 0, BLIP2_ACT_GELU = 1, BLIP2_ACT_RELU = 2 };

/* out[T, OC] = inp[T, C] · weight[OC, C]ᵀ + bias[OC] (bias may be NULL). PyTorch Linear layout. */
void blip2_matmul(float *out, const float *inp, const float *weight, const float *bias, int T, int C, int OC);

/* The same with 16-bit weights (wdtype BLIP2_W_F16 or BLIP2_W_BF16; raw IEEE half / bfloat16
 * bits), fp32 accumulation, then act. The reference widens the weights exactly, so its result is
 * the fp32 matmul of the rounded weights. CUDA: up to 8 rows a hand-written GEMV reads the fp32
 * inputs as they are (decode: weight bandwidth is the whole cost); above that cuBLASLt, for which
 * the activations are rounded to the weights' type (f16: beyond ±65504 they become inf). */
void blip2_matmul_h(float *out, const float *inp, const uint16_t *weight, const float *bias, int T, int C, int OC,
                    int wdtype, int act);

/* out[T, C] = LN(inp[T, C]) · w[C] + b[C]; biased variance, eps inside the sqrt. out may equal inp. */
void blip2_layernorm(float *out, const float *inp, const float *w, const float *b, int T, int C, float eps);

/* res[T, C] += y[T, C] + bias[C] (bias may be NULL: the bias of a row-parallel matmul, added once
 * after its all-reduce, as (y + bias) first), then out = LN(res): the residual add fused with the
 * next norm. out may equal y (not res). */
void blip2_residual_layernorm(float *res, float *out, const float *y, const float *bias, const float *w, const float *b,
                              int T, int C, float eps);

/* Matmul inputs kept in 16 bits ("_a" ops, adtype = an activation's element type). cuBLASLt's
 * tensor cores read their inputs in the weights' 16-bit type; a device backend with 16-bit weights
 * therefore has the op that produces a matmul input (a norm, an activation) write it rounded, once,
 * instead of writing fp32 that the matmul reads and narrows again: half the bytes, one pass fewer,
 * the same numbers. adtype is BLIP2_W_F32 (plain floats: each op is exactly its fp32 twin) or a
 * 16-bit type (values rounded to nearest even, as blip2_f32_to_f16 / _bf16). */

/* blip2_layernorm with out [T, C] of adtype (it must not overlap inp unless adtype is F32). */
void blip2_layernorm_a(void *out, const float *inp, const float *w, const float *b, int T, int C, float eps, int adtype);

/* out[i] = act(x[i]) for n elements, x of xdtype (F32, or a 16-bit type: widened exactly), out of
 * adtype (ACT_NONE: a plain conversion). out may equal x only when adtype == xdtype. */
void blip2_activate_a(void *out, const void *x, size_t n, int act, int adtype, int xdtype);

/* out[T, OC] = act(inp[T, C] · weight[OC, C]ᵀ + bias[OC]) with inp of adtype and weight of wdtype;
 * adtype is F32 or wdtype. F32 inputs: blip2_matmul (+ act) or blip2_matmul_h. 16-bit inputs are
 * widened exactly, so the result is the fp32 product of the two rounded operands (CUDA: cuBLASLt
 * at every T; the GEMV of blip2_matmul_h reads fp32 inputs). out is of odtype: F32, or wdtype
 * (16 bits: what the next matmul or a 16-bit kernel reads, written once instead of fp32 that is
 * narrowed again). bias [OC] (may be NULL) is fp32 with an fp32 out, and of odtype with a 16-bit
 * one (cuBLASLt's epilogue takes a bias of D's type; a 16-bit HF model holds its biases so),
 * widened exactly; act's result is rounded once (nearest even). */
void blip2_matmul_a(void *out, const void *inp, const void *weight, const void *bias, int T, int C, int OC, int adtype,
                    int wdtype, int act, int odtype);

/* out[T, OC] += inp[T, C] · weight[OC, C]ᵀ + bias[OC]: a matmul that adds into the fp32 residual
 * stream (the last matmul of a pre-LN block), so no separate pass adds its result. inp of adtype,
 * weight of wdtype, as blip2_matmul_a; bias fp32 (may be NULL). The reference adds (product +
 * bias) to out; a device may add out first (cuBLASLt's beta = 1, then its bias epilogue): the
 * order of the two fp32 additions is the backend's. out must not overlap inp. */
void blip2_matmul_acc_a(float *out, const void *inp, const void *weight, const float *bias, int T, int C, int OC,
                        int adtype, int wdtype);

/* out = blip2_matmul_a(LN(x)): h [T, C] of adtype receives blip2_layernorm_a(x, ln_w, ln_b, eps),
 * then out[T, OC] = act(h · weightᵀ + bias) of odtype. A device may fuse the norm into the matmul
 * (CUDA: the one-row GEMV, which then saves a launch and a round trip of the row), and then h is
 * not written: h is the op's scratch, not a result. out must not overlap x or h. */
void blip2_matmul_ln_a(void *out, void *h, const float *x, const float *ln_w, const float *ln_b, float eps,
                       const void *weight, const void *bias, int T, int C, int OC, int adtype, int wdtype, int act,
                       int odtype);

/* x[i] += y[i] for n elements. */
void blip2_residual_add(float *x, const float *y, size_t n);

/* In place, n elements: exact erf GELU 0.5·x·(1+erf(x/√2)); ReLU. */
void blip2_gelu(float *x, size_t n);
void blip2_relu(float *x, size_t n);

/* The row stride of attention's score scratch: Tk rounded up to 8 floats, so that the device's
 * products see aligned matrices (with rows of 257, cuBLAS ran them on alignment-1 kernels). */
static inline int blip2_attention_ld(int Tk) { return (Tk + 7) & ~7; }

/* Multi-head attention for B sequences of equal length (a batch of images). Sequence b has q
 * [Tq, q_stride] at q + b·Tq·q_stride, k and v [Tk, kv_stride] at k, v + b·Tk·kv_stride, out
 * [Tq, NH·HS] at out + b·Tq·NH·HS (heads concatenated h-major); head h reads columns
 * [h·HS, (h+1)·HS). scores = (q·kᵀ)·scale; if causal, query i sees keys j <= i + (Tk − Tq) (its
 * own past). scratch holds max(B, NH)·Tq·blip2_attention_ld(Tk) floats (score matrices: the
 * device batches over heads or over sequences, whichever is more). wdtype is the model's weight
 * type: with 16-bit weights the device may compute in them (not causal: q, k, v and the softmax
 * weights rounded to the weights' type, fp32 sums, no scratch used) or run the two products on TF32
 * tensor cores (10-bit mantissa); the reference always computes in fp32. q, k, v and out are of
 * iodtype: F32, or wdtype (16 bits: a 16-bit matmul's output read as it is, widened exactly; out
 * rounded to nearest even), strides and offsets counted in elements of that type. */
void blip2_attention(void *out, const void *q, const void *k, const void *v, float *scratch, int B, int Tq, int Tk,
                     int NH, int HS, int q_stride, int kv_stride, float scale, int causal, int wdtype, int iodtype);

/* Causal attention of a batched step over paged keys/values. Sequence i (of n_seqs) owns rows
 * [meta[3i], meta[3i] + meta[3i+1]) of q and out (n_new rows, in order) and has meta[3i+2] = past
 * positions before them; its keys are positions 0 .. past + n_new − 1, position j at row j % BS of
 * block tables[i·max_blocks + j / BS] in k_pool / v_pool [n_blocks, BS, kv_stride] of kvdtype
 * (BLIP2_W_*: a 16-bit cache is widened on read; one layer's pool; the new rows are already
 * written). Row r of sequence i sees keys j <= past + r. q [rows, q_stride] → out [rows, NH·HS].
 * Each q element is multiplied by scale (rounded to fp32) before the dot products, as eager OPT
 * scales its q projection. scratch holds max_ctx floats (host backends only).
 * k_new, v_new (NULL: the new rows are already written): the new keys and values, rows as q's
 * (row stride q_stride, NH·HS columns), written into the pools first, as blip2_kv_write would; a
 * device then writes each (head, sequence)'s rows from the block that attends them, in one launch.
 * For decode steps (one new row per sequence): a sequence's rows then go one after another.
 * out is of odtype: F32, or the 16-bit type out_proj reads (values rounded to nearest even, once:
 * no narrowing pass before that matmul). */
void blip2_attention_paged(void *out, const float *q, void *k_pool, void *v_pool, int kvdtype, const float *k_new,
                           const float *v_new, const int32_t *tables, int max_blocks, const int32_t *meta, int n_seqs,
                           int block_size, float *scratch, int max_ctx, int NH, int HS, int q_stride, int kv_stride,
                           float scale, int odtype);

/* Writes the new keys/values of a batched step into one layer's paged pool: row meta[3i] + t of
 * k and v [rows, in_stride] (the first C columns) goes to position meta[3i+2] + t of sequence i
 * (t < meta[3i+1]), addressed as in blip2_attention_paged. k_pool, v_pool [n_blocks, BS, C] of
 * kvdtype (rounded to nearest even when 16-bit). */
void blip2_kv_write(void *k_pool, void *v_pool, int kvdtype, const float *k, const float *v, int in_stride,
                    const int32_t *tables, int max_blocks, const int32_t *meta, int n_seqs, int block_size, int C);

/* In place softmax over each of T rows of n values (max-subtracted). */
void blip2_softmax(float *x, int T, int n);

/* Gathers image patches as matmul rows: img [CH, H, W] → out [P, CH·PS·PS], patch p = py·(W/PS)+px,
 * column c·PS·PS + i·PS + j (Conv2d weight order). */
void blip2_im2col_patches(float *out, const float *img, int CH, int H, int W, int PS);

/* out[t, :] = table[ids[t], :] for T rows of C. */
void blip2_embedding(float *out, const int32_t *ids, const float *table, int T, int C);

/* Vocab-parallel embedding: out[t, :] = table[ids[t] − v0, :] where v0 <= ids[t] < v0 + V (this
 * rank's rows), else zeros (other ranks' ids and ids < 0, the image rows). table [V, C] of wdtype
 * (any BLIP2_W_*), widened to fp32. */
void blip2_embedding_vp(float *out, const int32_t *ids, const void *table, int wdtype, int T, int C, int v0, int V);

/* x[t, :] += table[row0 + t, :] for T rows of C (learned positions; OPT passes row0 = pos + 2). */
void blip2_add_rows(float *x, const float *table, int row0, int T, int C);

/* x[t, :] += table[rows[t], :] for T rows of C (the positions of a batched step, one per row). */
void blip2_add_rows_at(float *x, const float *table, const int32_t *rows, int T, int C);

/* out[i, :] = x[rows[i], :] for n rows of C (each sequence's last row before the LM head). */
void blip2_gather_rows(float *out, const float *x, const int32_t *rows, int n, int C);

/* Index of the maximum of x[0..n), the lowest index on ties (as torch.argmax). NaN never wins. */
int blip2_argmax(const float *x, int n);

/* Per row of x [T, n]: idx[t] = blip2_argmax(row t), val[t] = that value (NaN only if the whole
 * row is NaN). */
void blip2_argmax_rows(int32_t *idx, float *val, const float *x, int T, int n);

/* Per row of x [T, n]: the k best (value, index) pairs in argmax order (larger value first, the
 * lower index on ties, NaN after every number), 1 <= k <= min(n, BLIP2_TOPK_MAX): idx and val
 * [T, k]. Sampling with top-k needs only these from the device (and from each vocab slice). */
#define BLIP2_TOPK_MAX 64
void blip2_topk_rows(int32_t *idx, float *val, const float *x, int T, int n, int k);

/* Repetition penalty (transformers' RepetitionPenaltyLogitsProcessor) on rows x [T, n] that hold
 * the vocab slice [v0, v0 + n): for row t, each id of ids[offs[t] .. offs[t+1]) (distinct within
 * the row) inside the slice turns s = x[t, id − v0] into s·pen[t] if s < 0, else s / pen[t]. Ids
 * outside the slice (another rank's) are skipped. Lets a penalised request take the device's
 * argmax or top-k instead of downloading its whole row. */
void blip2_penalize_rows(float *x, const int32_t *ids, const int32_t *offs, const float *pen, int T, int n, int v0);

/* Per row of x [T, n] (each rank's vocab slice of a row): out[2t] = the row's maximum and
 * out[2t+1] = Σ exp(x − max) over the row, summed in double (an all −inf row: 0 and 0). The
 * ranks' pairs give each row's log-sum-exp; beam search then needs only log-probabilities
 * (blip2_shift_rows) and each row's best few, not the 50272-float row. */
void blip2_logsumexp_rows(float *out, const float *x, int T, int n);

/* x[t, j] −= shift[t] for T rows of n (log-probabilities: a row minus its log-sum-exp). */
void blip2_shift_rows(float *x, const float *shift, int T, int n);

/* x[0..n) of wdtype = mean + std·N(0, 1), element i drawn from a counter-based generator of
 * (seed, i) alone, so any backend and any split of the work gives the same numbers up to the last
 * bit of the libm used. std = 0 fills the constant mean (LayerNorm weights 1, biases 0). */
void blip2_fill_normal(void *x, int wdtype, size_t n, uint64_t seed, float mean, float std);

/* Host conversions (round to nearest even; NaN stays NaN). */
uint16_t blip2_f32_to_f16(float f);
uint16_t blip2_f32_to_bf16(float f);
float blip2_f16_to_f32(uint16_t h);
float blip2_bf16_to_f32(uint16_t h);

/* ------------------------------------------------------------------------------------------------
 * A backend: memory hooks and the ops above by function pointer. */
typedef struct blip2_ops {
    const char *name; /* "cpu", "cuda" */
    int device;       /* 0: pointers are host memory; 1: device memory */
    void *(*alloc)(size_t bytes); /* NULL when out of memory; contents undefined */
    void (*release)(void *p);     /* NULL is fine */
    void (*upload)(void *dst, const void *src, size_t bytes);   /* host → backend (ordered on the stream) */
    void (*download)(void *dst, const void *src, size_t bytes); /* backend → host; returns when the data is there */
    void (*copy)(void *dst, const void *src, size_t bytes);     /* backend → backend */
    /* backend → backend: `height` rows of `width` bytes, `pitch` bytes apart in both (one block
     * of every layer of a KV pool in one call) */
    void (*copy_rows)(void *dst, const void *src, size_t width, size_t height, size_t pitch);
    void (*zero)(void *p, size_t bytes);
    /* Waits for the queued work; 0, or non-zero with the first error since the last call in err. */
    int (*sync)(char *err, size_t n);
    /* Step graphs (CUDA graphs; all NULL on backends without them). capture_begin: from here on
     * the calling thread's ops are recorded, not run (0, or non-zero when it cannot record).
     * capture_end: stops and returns a replayable graph, or NULL with the reason in why (the
     * recorded work is dropped and the errors it raised cleared: run it again without a graph).
     * graph_launch: replays it on the stream; 0, 1 when the graph is stale (a scratch buffer it
     * recorded was reallocated since: free it and record again), -1 on error (recorded). Uploads
     * from pageable memory, downloads and syncs must stay outside a recording. */
    int (*capture_begin)(void);
    void *(*capture_end)(char *why, size_t n);
    int (*graph_launch)(void *graph);
    void (*graph_free)(void *graph);
    /* Whether a row's results are promised to be the same bits whatever other rows share its
     * calls (a request's seeded samples then do not depend on who else is in the batch). NULL:
     * yes (the host reference). CUDA: only with BLIP2_BATCH_INVARIANT=1 (kernels/cuda/ops.cu). */
    int (*batch_invariant)(void);

    void (*matmul)(float *, const float *, const float *, const float *, int, int, int);
    void (*matmul_h)(float *, const float *, const uint16_t *, const float *, int, int, int, int, int);
    void (*layernorm)(float *, const float *, const float *, const float *, int, int, float);
    void (*residual_layernorm)(float *, float *, const float *, const float *, const float *, const float *, int, int,
                               float);
    void (*layernorm_a)(void *, const float *, const float *, const float *, int, int, float, int);
    void (*activate_a)(void *, const void *, size_t, int, int, int);
    void (*matmul_a)(void *, const void *, const void *, const void *, int, int, int, int, int, int, int);
    void (*matmul_acc_a)(float *, const void *, const void *, const float *, int, int, int, int, int);
    void (*matmul_ln_a)(void *, void *, const float *, const float *, const float *, float, const void *, const void *,
                        int, int, int, int, int, int, int);
    void (*residual_add)(float *, const float *, size_t);
    void (*gelu)(float *, size_t);
    void (*relu)(float *, size_t);
    void (*attention)(void *, const void *, const void *, const void *, float *, int, int, int, int, int, int,
                      int, float, int, int, int);
    void (*attention_paged)(void *, const float *, void *, void *, int, const float *, const float *, const int32_t *,
                            int, const int32_t *, int, int, float *, int, int, int, int, int, float, int);
    void (*kv_write)(void *, void *, int, const float *, const float *, int, const int32_t *, int, const int32_t *, int,
                     int, int);
    void (*softmax)(float *, int, int);
    void (*im2col_patches)(float *, const float *, int, int, int, int);
    void (*embedding)(float *, const int32_t *, const float *, int, int);
    void (*embedding_vp)(float *, const int32_t *, const void *, int, int, int, int, int);
    void (*add_rows)(float *, const float *, int, int, int);
    void (*add_rows_at)(float *, const float *, const int32_t *, int, int);
    void (*gather_rows)(float *, const float *, const int32_t *, int, int);
    void (*argmax_rows)(int32_t *, float *, const float *, int, int);
    void (*topk_rows)(int32_t *, float *, const float *, int, int, int);
    void (*penalize_rows)(float *, const int32_t *, const int32_t *, const float *, int, int, int);
    void (*logsumexp_rows)(float *, const float *, int, int);
    void (*shift_rows)(float *, const float *, int, int);
    void (*fill_normal)(void *, int, size_t, uint64_t, float, float);
} blip2_ops;

/* The CPU reference backend (always present). */
extern const blip2_ops blip2_cpu_ops;

/* Bytes of one element of a BLIP2_W_* type. */
static inline size_t blip2_wdtype_size(int wdtype) { return wdtype == BLIP2_W_F32 ? 4 : 2; }

#ifdef __cplusplus
}
#endif

#endif
