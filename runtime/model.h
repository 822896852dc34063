/* BLIP-2 OPT weights: one struct per sub-model and per layer. Loaded, they are fp32 host memory:
 * every pointer either points into the memory-mapped checkpoint (F32 tensors) or into a buffer the
 * loader converted from F16/BF16. blip2_model_to_backend() then moves them to a backend (the GPU):
 * the pointers become device memory, and the matrices (every weight a matmul or the embedding
 * reads: blip2_weight_is_matrix) hold m->wdtype elements — float * in name only when wdtype is
 * 16-bit. Norm weights, biases and position tables stay fp32. Shapes use the config's letters: Cv/Cq/Ct vision/Q-Former/OPT
 * channels, T vision tokens, P patches, Q queries, V vocab. */
#ifndef BLIP2_MODEL_H
#define BLIP2_MODEL_H

#include "../kernels/ops.h"
#include "config.h"
#include "safetensors.h"
#include "sampling.h"
#include "status.h"

typedef struct {
    float *ln1_w, *ln1_b; /* [Cv] layer_norm1 */
    float *qkv_w;         /* [3Cv, Cv] fused q,k,v (each third h-major) */
    float *qkv_b;         /* [3Cv] fused bias as stored: [q_bias, k_bias, v_bias] */
    float *proj_w;        /* [Cv, Cv] */
    float *proj_b;        /* [Cv] */
    float *ln2_w, *ln2_b; /* [Cv] layer_norm2 */
    float *fc1_w;         /* [mlp, Cv] */
    float *fc1_b;         /* [mlp] */
    float *fc2_w;         /* [Cv, mlp] */
    float *fc2_b;         /* [Cv] */
    /* qkv_b, fc1_b in wdtype: the biases of the 16-bit qkv and fc1 outputs of a device model with
     * 16-bit activations (blip2_model_bias16; cuBLASLt's epilogue takes a bias of D's type); NULL
     * elsewhere */
    void *qkv_b16, *fc1_b16;
} blip2_vision_layer;

typedef struct {
    float *patch_w;           /* [Cv, 3, PS, PS] = [Cv, 3·PS·PS] as a matmul */
    float *patch_b;           /* [Cv] */
    float *class_emb;         /* [Cv] (stored [1, 1, Cv]) */
    float *pos_emb;           /* [T, Cv] (stored [1, T, Cv]) */
    blip2_vision_layer *layers; /* [layers] */
    float *post_ln_w, *post_ln_b; /* [Cv] */
} blip2_vision_weights;

/* One attention block of the Q-Former: BERT-style, post-LN. For cross-attention k/v read the
 * image embeddings, so their weights are [Cq, Cv]. */
typedef struct {
    float *q_w, *q_b;   /* [Cq, Cq], [Cq] */
    float *k_w, *k_b;   /* [Cq, Ckv], [Cq] (Ckv = Cq for self, Cv for cross) */
    float *v_w, *v_b;   /* [Cq, Ckv], [Cq] */
    float *o_w, *o_b;   /* [Cq, Cq], [Cq] attention.output.dense */
    float *ln_w, *ln_b; /* [Cq] attention.output.LayerNorm */
} blip2_qformer_attn;

typedef struct {
    blip2_qformer_attn self;
    blip2_qformer_attn cross; /* all NULL unless has_cross */
    int has_cross;            /* layer % cross_freq == 0 */
    float *fc1_w, *fc1_b;     /* [mlp, Cq], [mlp] intermediate_query.dense */
    float *fc2_w, *fc2_b;     /* [Cq, mlp], [Cq] output_query.dense */
    float *ln_w, *ln_b;       /* [Cq] output_query.LayerNorm */
} blip2_qformer_layer;

typedef struct {
    float *query_tokens;       /* [Q, Cq] (stored [1, Q, Cq]) */
    float *ln_w, *ln_b;        /* [Cq] qformer.layernorm, applied to the query tokens */
    blip2_qformer_layer *layers; /* [layers] */
    float *proj_w;             /* [Ct, Cq] language_projection */
    float *proj_b;             /* [Ct] */
} blip2_qformer_weights;

/* Shapes are global; under TP "Cl" is the rank's attention width and ffn its fc1 part. */
typedef struct {
    float *ln1_w, *ln1_b; /* [Ct] self_attn_layer_norm */
    float *qkv_w, *qkv_b; /* [3Cl, Ct], [3Cl]: q, k, v of this rank's heads stacked, so one matmul
                             (one weight stream in decode) makes all three; q_w.. point into it */
    float *q_w, *q_b;     /* [Cl, Ct], [Cl] = qkv_w rows [0, Cl), qkv_b [0, Cl) */
    float *k_w, *k_b;     /* [Cl, Ct], [Cl] = rows [Cl, 2Cl) */
    float *v_w, *v_b;     /* [Cl, Ct], [Cl] = rows [2Cl, 3Cl) */
    float *o_w, *o_b;     /* [Ct, Cl], [Ct] out_proj (bias whole) */
    float *ln2_w, *ln2_b; /* [Ct] final_layer_norm (the per-layer FFN pre-LN) */
    float *fc1_w, *fc1_b; /* [ffn, Ct], [ffn] */
    float *fc2_w, *fc2_b; /* [Ct, ffn], [Ct] (bias whole) */
    void *fc1_b16;        /* [ffn] fc1_b in wdtype, as the vision layer's (16-bit fc1 output) */
} blip2_opt_layer;

typedef struct {
    float *wte;                /* [V, Ct] embed_tokens (this rank's vocab rows under TP) */
    float *wpe;                /* [max_pos + 2, Ct] embed_positions (offset 2) */
    blip2_opt_layer *layers;   /* [layers] */
    float *ln_f_w, *ln_f_b;    /* [Ct] decoder final_layer_norm */
    float *lm_head;            /* [V, Ct]: = wte unless the checkpoint stores lm_head.weight */
} blip2_opt_weights;

/* The checkpoint: one or more memory-mapped safetensors files, searched by tensor name. */
typedef struct {
    blip2_st_file *files;
    int nfiles;
} blip2_checkpoint;

/* This rank's part of OPT (Megatron split), sizes computed once at load. q/k/v and fc1 are
 * column-parallel (the rank's output features), out_proj and fc2 row-parallel (its input
 * features; their biases are whole and added once, after the all-reduce), embed_tokens and the
 * tied lm_head vocab-parallel. */
typedef struct {
    int rank, world;
    int NH;  /* local heads = NH / world */
    int C;   /* local attention width = NH_local · HS */
    int ffn; /* local fc1 outputs */
    int V;   /* local vocab rows [v0, v0 + V) */
    int v0;
} blip2_opt_shard;

typedef struct {
    blip2_config cfg;
    blip2_opt_shard shard;
    size_t opt_bytes; /* bytes of this rank's OPT weights (fp32) */
    blip2_vision_weights vision;
    blip2_qformer_weights qformer;
    blip2_opt_weights opt;
    blip2_checkpoint ckpt;
    blip2_dtype dtype;  /* dtype of the checkpoint's weights (all the same) */
    void **owned;       /* buffers converted from F16/BF16, freed with the model */
    int n_owned;
    const blip2_ops *ops; /* the backend holding the weights and running the forward (CPU at load) */
    int wdtype;           /* BLIP2_W_*: element type of the matrices on ops */
    void **dev_owned;     /* backend buffers (released with ops->release) */
    int n_dev_owned;
    size_t dev_bytes;     /* bytes of weights on the backend */
} blip2_model;

/* Opens DIR/model.safetensors or the shards listed in DIR/model.safetensors.index.json. */
blip2_code blip2_checkpoint_open(const char *dir, blip2_checkpoint *ck, blip2_status *st);
const blip2_st_tensor *blip2_checkpoint_find(const blip2_checkpoint *ck, const char *name);
void blip2_checkpoint_close(blip2_checkpoint *ck);

/* One entry of the name table resolved for a config: checkpoint name, expected shape, and the
 * struct field it fills. */
enum { BLIP2_SPLIT_NONE = 0, BLIP2_SPLIT_ROWS, BLIP2_SPLIT_COLS };

typedef struct {
    char name[128];
    int ndim;
    int64_t shape[4]; /* global shape, as in the checkpoint */
    float **field;
    int optional;   /* lm_head.weight: absent means tied to embed_tokens */
    int rank0_only; /* vision, Q-Former, projection */
    int split;      /* BLIP2_SPLIT_*: which slice a tensor-parallel rank holds */
    float **group;  /* a part of a fused tensor (OPT q/k/v → qkv): the fused field, else NULL */
    int part, parts; /* this entry is part `part` (0-based) of `parts` equal, consecutive entries */
} blip2_weight_entry;

/* Where an entry's n elements of es bytes go: a new buffer from alloc(ctx, bytes) (NULL: out of
 * memory), or, for a part of a fused group, its slice of the group's buffer, which the first part
 * allocates (parts * n elements) and stores in *e->group. The caller sets *e->field. */
void *blip2_weight_storage(const blip2_weight_entry *e, size_t n, size_t es, void *(*alloc)(void *ctx, size_t bytes),
                           void *ctx);

/* Builds the table for m->cfg (fields point into m's structs; it allocates the layer arrays when
 * they are not there yet, so it can be called again on a loaded model). */
blip2_code blip2_weight_table(blip2_model *m, blip2_weight_entry **entries, int *n, blip2_status *st);

/* Config + checkpoint + weights; every missing, unexpected or mis-shaped tensor is an error that
 * names the file and the tensor. */
blip2_code blip2_model_load(const char *dir, blip2_model *m, blip2_status *st);
/* Rank `rank` of a `world`-way tensor-parallel group: only this rank's OPT slices (and, on rank 0,
 * vision + Q-Former + projection) are read from the memory-mapped checkpoint. */
blip2_code blip2_model_load_shard(const char *dir, int rank, int world, blip2_model *m, blip2_status *st);
void blip2_model_free(blip2_model *m);

/* Weights a matmul or the embedding reads (kept in the backend's wdtype): ".weight" tensors of
 * two or more dimensions except the learned positions. */
int blip2_weight_is_matrix(const blip2_weight_entry *e);
/* Elements this rank holds of an entry (its slice under tensor parallelism). */
size_t blip2_weight_local_numel(const blip2_model *m, const blip2_weight_entry *e);

/* Moves a loaded (host, fp32) model onto `ops`: every tensor this rank holds is uploaded (matrices
 * converted to wdtype through a staging buffer), the host copies and the checkpoint mapping are
 * released. progress: print a line per 10 % to stderr. A no-op for the CPU backend with F32. */
blip2_code blip2_model_to_backend(blip2_model *m, const blip2_ops *ops, int wdtype, int progress, blip2_status *st);
/* An empty model of cfg's shapes for rank `rank` of `world` (shard sizes planned, no weights). */
blip2_code blip2_model_plan(const blip2_config *cfg, int rank, int world, blip2_model *m, blip2_status *st);
/* Random weights of a config's shapes made directly in `ops` memory (no host copy): this rank's
 * slices, LayerNorm weights 1, biases 0, other weights N(0, 0.02) from blip2_fill_normal. */
blip2_code blip2_model_init_random_on(const blip2_config *cfg, int rank, int world, uint64_t seed, const blip2_ops *ops,
                                      int wdtype, blip2_model *m, blip2_status *st);

/* Random values for a checkpoint tensor by its name: LayerNorm weights 1, biases 0, others
 * N(0, 0.02) — activations stay O(1) through every layer. */
void blip2_weight_fill_random(const char *name, float *x, size_t n, blip2_rng *rng);
/* That rule as numbers: mean and standard deviation of the tensor `name` (std 0: constant). */
void blip2_weight_random_rule(const char *name, float *mean, float *std);
/* Random weights of a config's shapes in memory, no checkpoint (benchmarks): this rank's slices,
 * LayerNorm weights 1, biases 0, other weights N(0, 0.02). */
blip2_code blip2_model_init_random(const blip2_config *cfg, int rank, int world, uint64_t seed, blip2_model *m,
                                   blip2_status *st);

#endif
