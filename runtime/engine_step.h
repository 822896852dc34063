/* A step of the engine, as every rank executes it. Rank 0 builds a descriptor (which sequences,
 * their positions and block tables, the tokens, KV block copies for beams, which logits are
 * wanted) and broadcasts it; every rank then runs exactly the same collective work. */
#ifndef BLIP2_ENGINE_STEP_H
#define BLIP2_ENGINE_STEP_H

#include <stdint.h>

#include "forward.h"
#include "kv_cache.h"

enum { STEP_OP_RUN = 1, STEP_OP_STOP = 2 };
/* What a sequence's step needs: nothing, the argmax, the whole row, (LOGITS_TOPK + n) the row's n
 * best logits (sampling with top-k, greedy with min_new_tokens: blip2_decoding_candidates), or
 * (LOGITS_BEAM + n) the row's n best log-probabilities, its penalty applied to them (a beam). */
enum { LOGITS_NONE = 0, LOGITS_ARGMAX = 1, LOGITS_FULL = 2, LOGITS_TOPK = 16, LOGITS_BEAM = 128 };
static inline int logits_topk_n(int mode) { return mode > LOGITS_TOPK && mode <= LOGITS_TOPK + BLIP2_TOPK_MAX ? mode - LOGITS_TOPK : 0; }
static inline int logits_beam_n(int mode) { return mode > LOGITS_BEAM && mode <= LOGITS_BEAM + BLIP2_TOPK_MAX ? mode - LOGITS_BEAM : 0; }
/* Candidates a mode asks for (top-k or beam), 0 for the others. */
static inline int logits_cand_n(int mode) { return logits_topk_n(mode) ? logits_topk_n(mode) : logits_beam_n(mode); }

/* Header ints: op, n_seqs, n_tokens, n_copies, n_pen_ids. */
enum { STEP_DESC_HEADER = 5 };

typedef struct {
    int max_batch, max_tokens, max_blocks_per_seq, max_copies, max_pen_ids;
    int32_t *buf; /* the encoded descriptor */
    int len, cap;
} step_desc;

/* Decoded view of a descriptor (pointers into its buffer). */
typedef struct {
    int op, n_seqs, n_tokens, n_copies;
    const int32_t *copies; /* [n_copies][2] (src block, dst block) */
    blip2_seq_step seqs[1024];
    int modes[1024];
    const int32_t *tokens; /* [n_tokens]; -1 = image row */
    /* Repetition penalties, applied on the backend to each sequence's logits row before the picks
     * (blip2_penalize_rows): pen_offs [n_seqs + 1], pen [n_seqs] (float bits; 1 = none), pen_ids
     * [n_pen_ids], contiguous from pen_offs on; all NULL when n_pen_ids is 0. */
    int n_pen_ids;
    const int32_t *pen_offs;
} step_view;

blip2_code step_desc_init(step_desc *d, int max_batch, int max_tokens, int max_blocks_per_seq, int max_pen_ids,
                          blip2_status *st);
void step_desc_free(step_desc *d);
void step_desc_begin(step_desc *d, int op);
/* Appends; rank 0 must add copies first, then sequences, then tokens, then penalties. */
void step_desc_add_copy(step_desc *d, int32_t src, int32_t dst);
void step_desc_add_seq(step_desc *d, int past, int n_new, int mode, const int32_t *blocks, int n_blocks);
void step_desc_add_tokens(step_desc *d, const int32_t *tokens, int n);
/* offs [n_seqs + 1] into ids (distinct per sequence), pen [n_seqs]; nothing to add when no
 * sequence has ids. */
void step_desc_add_penalties(step_desc *d, const int32_t *offs, const float *pen, const int32_t *ids);
/* Rank 0 sends, the others receive (then d->buf holds the same bytes everywhere). */
blip2_code step_desc_share(step_desc *d, const blip2_tp *tp, blip2_status *st);
blip2_code step_desc_view(const step_desc *d, step_view *v, blip2_status *st);

/* Everything a rank needs to execute steps, sized once. */
typedef struct {
    const blip2_model *m;
    const blip2_tp *tp;
    blip2_kv_pool kv;
    blip2_opt_ws ws;
    float *row;          /* [V_local]: one logits row brought to the host */
    float *full;         /* [max_batch, V]: gathered rows of LOGITS_FULL sequences */
    int32_t *picks;      /* [max_batch]: argmax id of each LOGITS_ARGMAX sequence (in sequence order) */
    int32_t *all_picks;  /* [max_batch]: argmax of every row of the step */
    /* LOGITS_TOPK rows: each sequence's best candidates over the whole vocabulary (ids, values in
     * argmax order) and whether they decide exactly; a row they cannot decide gets its full row
     * in `full` instead. */
    int32_t *cand_ids;   /* [max_batch, BLIP2_TOPK_MAX] */
    float *cand_vals;    /* [max_batch, BLIP2_TOPK_MAX] */
    uint8_t *cand_ok;    /* [max_batch] */
    int32_t *cand_dev;   /* backend: ids [n·k] then values [n·k] of this rank's vocab slice */
    int32_t *cand_host;  /* [2·max_batch·BLIP2_TOPK_MAX] its host copy */
    blip2_scored_id *cand_all; /* [(world + 1)·max_batch·BLIP2_TOPK_MAX] every rank's, then this rank's */
    int32_t *pen_dev;    /* backend: a step's penalty section (offsets, penalties, ids) */
    int32_t *pen_host;   /* that section as uploaded: the penalties of the other phase's rows set to 1 */
    uint8_t *beam_rows;  /* [max_batch]: which rows of the step are LOGITS_BEAM */
    step_desc desc;
} step_exec;

blip2_code step_exec_init(step_exec *x, const blip2_model *m, const blip2_tp *tp, int max_batch, int max_tokens,
                          int n_blocks, int block_size, blip2_status *st);
void step_exec_free(step_exec *x);
/* Runs the shared descriptor: block copies, embeddings (image_rows: rank 0's rows for the -1
 * tokens), the batched forward and the penalties of single sequences, then argmax picks,
 * log-probabilities and penalties of beam rows, candidates and gathered full rows (indexed by
 * sequence). launch queues the work (on a GPU it returns while the step runs); finish waits for
 * what the host needs from it; run is both. */
blip2_code step_exec_launch(step_exec *x, const step_view *v, const float *image_rows, blip2_status *st);
blip2_code step_exec_finish(step_exec *x, const step_view *v, blip2_status *st);
blip2_code step_exec_run(step_exec *x, const step_view *v, const float *image_rows, blip2_status *st);

#endif
