/* OPT's GPT-2 byte-level BPE tokenizer (spec BLIP2-OPT.md §6, §6.1).
 *
 * Encoding never adds BOS and never splits special-token literals: "<image>",
 * "</s>", "<pad>" in user text are plain text (user text must not be able to
 * inject image or control tokens). Decoding has skip_special_tokens semantics.
 *
 * Thread-safety: after blip2_tokenizer_load returns, every function taking a
 * `const blip2_tokenizer *` may be called concurrently from several threads.
 * The word cache is shared by all threads and guarded by striped mutexes
 * (a hit copies the ids out under the lock), so callers need no locking.
 * Functions taking a non-const tokenizer (free, set_cache) must not run
 * concurrently with anything else on the same tokenizer.
 *
 * Memory: arrays and strings returned through out-parameters are malloc'd
 * and owned by the caller (free()); they are non-NULL on success, even when
 * empty, and decoded text is NUL-terminated (it may also contain NULs). */
#ifndef BLIP2_TOKENIZER_H
#define BLIP2_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"

typedef struct blip2_tokenizer blip2_tokenizer;

/* Loads from dir/vocab.json + dir/merges.txt when both exist, else from
 * dir/tokenizer.json (model.vocab, model.merges as "a b" strings or [a, b]
 * pairs). Special tokens (skipped by decode) come from whichever of
 * special_tokens_map.json, added_tokens.json, tokenizer_config.json and
 * tokenizer.json's added_tokens are present. */
blip2_code blip2_tokenizer_load(const char *dir, blip2_tokenizer **out, blip2_status *st);
void blip2_tokenizer_free(blip2_tokenizer *tok);

/* Largest token id + 1 over vocab and added tokens (50266 for OPT). */
int blip2_tokenizer_vocab_size(const blip2_tokenizer *tok);
/* Id of a token given as its byte-level string (e.g. "Ċ" -> 50118, "<image>"
 * -> 50265), or -1 when absent. */
int32_t blip2_tokenizer_token_id(const blip2_tokenizer *tok, const char *token);
/* 1 when `id` is a special token that decode drops (pad, </s>, <image>, ...). */
int blip2_tokenizer_is_special(const blip2_tokenizer *tok, int32_t id);

/* BPE(text[0..len)) without BOS. Invalid UTF-8 -> BLIP2_EINVAL. */
blip2_code blip2_tokenizer_encode(const blip2_tokenizer *tok, const char *text, size_t len,
                                  int32_t **ids, size_t *n_ids, blip2_status *st);

/* [image_token_id]*num_query_tokens + [bos_id] + BPE(prompt). */
blip2_code blip2_tokenizer_build_prompt(const blip2_tokenizer *tok, const char *prompt, size_t len,
                                        int num_query_tokens, int image_token_id, int bos_id,
                                        int32_t **ids, size_t *n, blip2_status *st);

/* skip_special_tokens decode: drops special ids and ids the tokenizer lacks
 * (negative, >= vocab size, or unassigned such as 50266..50303), maps
 * byte-level chars back to bytes, and replaces invalid UTF-8 with U+FFFD per
 * maximal invalid subsequence, exactly like Python's
 * bytes.decode('utf-8', errors='replace'). */
blip2_code blip2_tokenizer_decode(const blip2_tokenizer *tok, const int32_t *ids, size_t n,
                                  char **text, size_t *len, blip2_status *st);

/* Streaming decoder: push ids one at a time; each push yields the new text
 * that is now final. An incomplete trailing UTF-8 sequence is held back until
 * a later token completes it; finish() flushes what is held (as U+FFFD).
 * The concatenation of all pieces equals blip2_tokenizer_decode(all ids).
 * A stream is used by one thread at a time; the tokenizer must outlive it. */
typedef struct blip2_detok_stream blip2_detok_stream;

blip2_code blip2_detok_init(const blip2_tokenizer *tok, blip2_detok_stream **out, blip2_status *st);
/* *piece points into the stream and stays valid until the next push/finish/free. */
blip2_code blip2_detok_push(blip2_detok_stream *s, int32_t id, const char **piece, size_t *len,
                            blip2_status *st);
blip2_code blip2_detok_finish(blip2_detok_stream *s, const char **piece, size_t *len,
                              blip2_status *st);
void blip2_detok_free(blip2_detok_stream *s);

/* Word cache control (benchmarks, tests). set_cache is not thread-safe: call
 * it before sharing the tokenizer. clear_cache is thread-safe. */
void blip2_tokenizer_set_cache(blip2_tokenizer *tok, int enabled);
void blip2_tokenizer_clear_cache(const blip2_tokenizer *tok);

#endif
