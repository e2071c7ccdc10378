/*
 * tinygpt: an INT8 GPT-2 and Llama inference engine in portable C99.
 *
 * One engine for every build: the host Python module, the MicroPython user module (unix and
 * ESP32 ports) and the bare-metal test program all compile this file unchanged. The model file
 * format and every arithmetic step are specified in docs/model-format.md; the engine runs on
 * the file's bytes in place and allocates its working memory once, at load, through the port
 * layer (tg_port.h).
 *
 * Build with -ffp-contract=off and without -ffast-math: the spec fixes the order of every
 * float32 operation so that all builds and the numpy reference agree to the bit.
 */
#ifndef TINYGPT_H
#define TINYGPT_H

#include <stddef.h>
#include <stdint.h>

#define TG_FORMAT_VERSION 3u /* the newest read; versions 1 (no meta section) and 2 load too */
#define TG_ARCH_GPT2 0u      /* header arch field (format version 3; versions 1 and 2 are GPT-2) */
#define TG_ARCH_LLAMA 1u
#define TG_HEADER_SIZE 128u
#define TG_MAX_META_BYTES 262144u /* a meta section larger than this is refused */
#define TG_NO_TOKEN 0xFFFFFFFFu

/* Status codes. Every failure has its own code; tg_error.msg names the exact problem. */
typedef enum {
    TG_OK = 0,
    TG_E_ARG = 1,          /* invalid argument (NULL pointer, bad option, bad sampling setting) */
    TG_E_ALIGN = 2,        /* model buffer not 16-byte aligned */
    TG_E_TRUNCATED = 3,    /* buffer shorter than the header or than header.file_size */
    TG_E_MAGIC = 4,        /* not a tinygpt model file */
    TG_E_VERSION = 5,      /* format version this engine does not read */
    TG_E_HEADER = 6,       /* header field breaks a rule (sizes, reserved bytes, scheme) */
    TG_E_DIMS = 7,         /* hyperparameters out of range or inconsistent */
    TG_E_DIRECTORY = 8,    /* tensor directory entry wrong (id, dtype, size, offset, overlap) */
    TG_E_CRC = 9,          /* CRC32 mismatch: the file is damaged */
    TG_E_VALUE = 10,       /* a float tensor holds NaN/Inf or a negative scale */
    TG_E_TOKENIZER = 11,   /* tokenizer section breaks a rule */
    TG_E_NOMEM = 12,       /* the port layer could not allocate working memory */
    TG_E_TOKEN = 13,       /* token id out of range */
    TG_E_CONTEXT = 14,     /* the tokens do not fit in the context (n_ctx) */
    TG_E_INTERRUPTED = 15, /* the poll callback asked to stop; the model state is unchanged */
    TG_E_NO_LOGITS = 16,   /* sample() before any token was processed */
    TG_E_ENDIAN = 17       /* big-endian host: the format is little-endian */
} tg_status;

typedef struct {
    int code;       /* tg_status */
    char msg[160];  /* human-readable, names the problem; "" when code == TG_OK */
} tg_error;

typedef struct {
    uint32_t n_ctx;     /* KV cache length; 0 = n_positions. Must be <= n_positions. */
    uint32_t max_batch; /* tokens per prefill chunk; 0 = min(n_ctx, 32) */
    int skip_crc;       /* nonzero: skip the CRC32 check (faster load on a device) */
    uint32_t max_draft; /* tokens per tg_verify; 0 = min(8, max_batch). Must be <= max_batch. */
    uint32_t n_threads; /* matmul workers, the caller included; 0 or 1 = the caller only. More
                         * than the port layer runs (tg_port_max_workers) is an error. */
} tg_options;

typedef struct {
    uint32_t n_vocab, n_positions, n_embd, n_layer, n_head, n_inner, activation;
    float layer_norm_epsilon;
    uint32_t eos_id, bos_id, q_id, a_id, do_id;
    /* derived / per-load */
    uint32_t n_ctx, max_batch, head_dim;
    uint64_t file_bytes;    /* the model file (weights, scales, tokenizer) */
    uint64_t weight_bytes;  /* all tensors except the tokenizer section */
    uint64_t kv_bytes;      /* KV cache at n_ctx */
    uint64_t scratch_bytes; /* activations, logits, sampling buffers */
    uint32_t tokenizer_bytes;
    uint32_t max_draft;     /* tokens per tg_verify (their logits are in scratch_bytes) */
    uint32_t n_threads;     /* matmul workers running (1: the caller only) */
    uint32_t meta_bytes;    /* the meta section (format version 2; 0 in a version 1 file) */
    /* the architecture (format version 3; a version 1 or 2 file is GPT-2) */
    uint32_t arch;          /* TG_ARCH_GPT2 or TG_ARCH_LLAMA */
    uint32_t n_kv_head;     /* key/value heads (Llama: divides n_head; GPT-2: n_head) */
    float rope_theta;       /* Llama: the base the rope table was made with; GPT-2: 0 */
    uint32_t head_tied;     /* 1: the output head is the token embedding; 0: its own matrix */
} tg_info;

/* What the forward passes did since the load or tg_reset_counters (tg_reset keeps them). */
typedef struct {
    uint64_t passes;       /* forward passes: one per batch (prefill chunk, step, verify) */
    uint64_t tokens;       /* token positions computed */
    uint64_t weight_bytes; /* model-file bytes read: each matrix with its scales and biases and
                            * each LayerNorm once per pass, embedding rows once per token */
    uint64_t macs;         /* multiply-adds: the linear layers, the output head, attention */
} tg_counters;

typedef struct {
    float temperature;        /* 0 = greedy */
    uint32_t top_k;           /* 0 = off */
    float top_p;              /* 1 = off; (0, 1] */
    float repetition_penalty; /* 1 = off; > 0 */
} tg_sampler;

typedef struct tg_model tg_model;

/* Called between layers; return nonzero to abandon the current step/prefill. */
typedef int (*tg_poll_fn)(void *ctx);

/* Optional tracing of intermediates, for tests that compare against the reference.
 * dtype: 1 = int8, 2 = float32, 3 = int32. layer = -1 for values outside the layers. */
typedef void (*tg_trace_fn)(void *ctx, const char *name, int layer, uint32_t pos,
                            const void *data, uint32_t n, int dtype);

/* Validate the model file in buf (which must stay alive and unchanged while the model is used)
 * and allocate working memory. On success *out is the model and TG_OK is returned. */
int tg_load(const uint8_t *buf, size_t len, const tg_options *opt, tg_model **out, tg_error *err);
void tg_free(tg_model *m);

/* How a loader reads a file_len-byte model file without reading what is not a model: head holds
 * the first head_len bytes read so far; *nread is how many leading bytes it must hold next.
 * Read up to *nread and call again until *nread <= head_len, then tg_load(head, *nread): first
 * the 128 header bytes, then the directory, then the whole file. The header and the directory
 * layout are checked on the way (a header claiming more than the file holds, or a file_size
 * past the tensors, fails before the bulk is read); a file that is not a model stops at its
 * header bytes and tg_load names the problem. */
int tg_read_size(const uint8_t *head, size_t head_len, uint64_t file_len, size_t *nread,
                 tg_error *err);

void tg_get_info(const tg_model *m, tg_info *info);
uint32_t tg_pos(const tg_model *m);
void tg_reset(tg_model *m);
void tg_set_poll(tg_model *m, tg_poll_fn fn, void *ctx);
void tg_set_trace(tg_model *m, tg_trace_fn fn, void *ctx);

/* Process tokens at the next positions; afterwards tg_logits() holds the last position's logits.
 * On any error (an interruption included) nothing changes: context, position and logits stay
 * as they were. */
int tg_prefill(tg_model *m, const int32_t *ids, uint32_t n, tg_error *err);
int tg_step(tg_model *m, int32_t id, tg_error *err);
const float *tg_logits(const tg_model *m); /* NULL until a token was processed */

/* Check a draft: process ids[0..n) as ONE forward pass at the next positions (1 <= n <=
 * max_draft), keeping every position's logits. choice (NULL or n entries) gets the greedy token
 * after each position, the repetition penalty counting every token up to and including that
 * position. Afterwards the tokens are in the context (tg_rewind drops the rejected ones) and
 * tg_logits() is the last position's. On error nothing changes, as for tg_prefill. */
int tg_verify(tg_model *m, const int32_t *ids, uint32_t n, float repetition_penalty,
              int32_t *choice, tg_error *err);

/* Forget the tokens at positions >= pos (0 <= pos <= tg_pos). The logits become position
 * pos-1's when the last tg_verify computed them and it is still in the context, else there are
 * none (tg_logits NULL) until the next prefill/step/verify. */
int tg_rewind(tg_model *m, uint32_t pos, tg_error *err);

/* Forward-pass counters (cumulative; tg_reset_counters zeroes them). */
void tg_get_counters(const tg_model *m, tg_counters *c);
void tg_reset_counters(tg_model *m);

void tg_seed(tg_model *m, uint64_t seed);
int tg_sample(tg_model *m, const tg_sampler *s, int32_t *out_id, tg_error *err);

/* Sample the token after position `at` (< tg_pos; its logits must be kept: at = pos-1, or a
 * position of the last tg_verify), the repetition penalty counting tokens 0..at. With a draft
 * token (draft >= 0) the result keeps the distribution p exactly: draft with probability p(draft),
 * else a token drawn from p without the draft, renormalised. draft < 0: as tg_sample. */
int tg_sample_at(tg_model *m, const tg_sampler *s, uint32_t at, int32_t draft, int32_t *out_id,
                 tg_error *err);

const uint8_t *tg_tokenizer(const tg_model *m, uint32_t *len);

/* The meta section (spec section 8: "key: value" lines of UTF-8 text, e.g. the abstain answer);
 * NULL with *len = 0 for a version 1 file. */
const uint8_t *tg_meta(const tg_model *m, uint32_t *len);

/* Validate a tokenizer section on its own (the loader calls it too). */
int tg_check_tokenizer(const uint8_t *sec, uint32_t len, uint32_t n_vocab, tg_error *err);

uint32_t tg_crc32(uint32_t crc, const uint8_t *p, size_t n);
const char *tg_status_name(int code);

#endif
