/*
 * tinygpt engine: load (validate) -> forward (prefill / step) -> sample.
 *
 * Sections, in reading order:
 *   1. small helpers: errors, little-endian reads, CRC32
 *   2. float32 math exactly as docs/model-format.md section 4.1 specifies (exp32, tanh32, erf32)
 *   3. kernels: LayerNorm, RMSNorm, activation quantization, int8 matmul, GELU, SiLU, RoPE
 *   4. the model struct and the loader (validates every byte it will ever read)
 *   5. the forward pass (prefill processes a batch; step is a batch of one)
 *   6. sampling
 *
 * Every float32 operation is written in the order the spec gives, one operation per rounding;
 * compile with -ffp-contract=off so the compiler does not fuse a*b+c into one rounding.
 */
#include "tinygpt.h"

#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "tg_port.h"

#ifdef __FAST_MATH__
#error "tinygpt must not be built with -ffast-math: it reorders the float32 operations the spec fixes"
#endif
#if defined(FLT_EVAL_METHOD) && FLT_EVAL_METHOD != 0 && FLT_EVAL_METHOD != -1
#error "tinygpt needs float expressions evaluated in float (FLT_EVAL_METHOD 0): use SSE2, not x87"
#endif

/* ---------------------------------------------------------------------------------------- */
/* 1. Helpers                                                                               */
/* ---------------------------------------------------------------------------------------- */

static int fail(tg_error *err, int code, const char *fmt, ...) {
    if (err) {
        va_list ap;
        err->code = code;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
        va_end(ap);
    }
    return code;
}

/* Decimal text of a 64-bit count, for messages: the engine never formats with %llu, which
 * newlib-nano's printf (the ESP32 MicroPython build) does not know. out holds >= 21 chars. */
static const char *u64_text(char *out, uint64_t v) {
    char tmp[21];
    int n = 0;
    do {
        tmp[n++] = (char)('0' + (int)(v % 10u));
        v /= 10u;
    } while (v);
    for (int i = 0; i < n; i++) {
        out[i] = tmp[n - 1 - i];
    }
    out[n] = 0;
    return out;
}

static int ok(tg_error *err) {
    if (err) {
        err->code = TG_OK;
        err->msg[0] = 0;
    }
    return TG_OK;
}

const char *tg_status_name(int code) {
    static const char *const names[] = {
        "ok", "bad argument", "misaligned buffer", "truncated", "bad magic", "unsupported version",
        "bad header", "bad dimensions", "bad directory", "crc mismatch", "bad value",
        "bad tokenizer", "out of memory", "bad token", "context full", "interrupted",
        "no logits", "big-endian host"};
    if (code < 0 || code >= (int)(sizeof(names) / sizeof(names[0]))) {
        return "unknown error";
    }
    return names[code];
}

/* Reads through memcpy: correct at any alignment, a single load where alignment is known. */
static uint32_t rd32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static float rdf32(const uint8_t *p) {
    float v;
    memcpy(&v, p, 4);
    return v;
}

static int host_is_little_endian(void) {
    const uint32_t one = 1;
    uint8_t b;
    memcpy(&b, &one, 1);
    return b == 1;
}

/* CRC-32 (ISO-HDLC, reflected 0xEDB88320), as zlib's crc32(). Table built on first use. */
static uint32_t crc_table[256];
static int crc_table_ready;

uint32_t tg_crc32(uint32_t crc, const uint8_t *p, size_t n) {
    if (!crc_table_ready) {
        for (uint32_t i = 0; i < 256; i++) {
            uint32_t c = i;
            for (int k = 0; k < 8; k++) {
                c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
            }
            crc_table[i] = c;
        }
        crc_table_ready = 1;
    }
    crc = ~crc;
    for (size_t i = 0; i < n; i++) {
        crc = crc_table[(crc ^ p[i]) & 0xFFu] ^ (crc >> 8);
    }
    return ~crc;
}

/* ---------------------------------------------------------------------------------------- */
/* 2. Float32 math of spec section 4.1                                                      */
/* ---------------------------------------------------------------------------------------- */

/* Round to nearest, ties to even, for |v| < 2^22: adding 1.5*2^23 pushes the fraction out. */
static float rne(float v) {
    float t = v + 12582912.0f;
    return t - 12582912.0f;
}

static float pow2i(int n) { /* 2^n for n in [-126, 127] */
    uint32_t bits = (uint32_t)(n + 127) << 23;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static float exp32(float x) {
    if (x != x) {
        return x; /* NaN (from inf - inf when extreme scales overflow): the steps below give NaN
                   * too, but would first convert NaN to int, which is undefined behaviour */
    }
    if (x < -87.0f) {
        return 0.0f;
    }
    if (x > 88.0f) {
        x = 88.0f;
    }
    float n = rne(x * 1.44269502f);
    float r = x - n * 0.693145752f;
    r = r - n * 1.42860677e-06f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return p * pow2i((int)n);
}

static float tanh32(float u) {
    if (u > 9.0f) {
        u = 9.0f;
    }
    if (u < -9.0f) {
        u = -9.0f;
    }
    float e = exp32(2.0f * u);
    return 1.0f - 2.0f / (e + 1.0f);
}

static float erf32(float z) {
    float a = z < 0.0f ? -z : z;
    float t = 1.0f / (1.0f + 0.3275911f * a);
    float k = t * 1.061405429f;
    k = k + -1.453152027f;
    k = k * t;
    k = k + 1.421413741f;
    k = k * t;
    k = k + -0.284496736f;
    k = k * t;
    k = k + 0.254829592f;
    k = k * t;
    float e = exp32(-(a * a));
    float y = 1.0f - k * e;
    return z < 0.0f ? -y : y;
}

/* ---------------------------------------------------------------------------------------- */
/* 3. Kernels                                                                               */
/* ---------------------------------------------------------------------------------------- */

static void layernorm(float *y, const float *x, const float *g, const float *b, uint32_t n,
                      float eps) {
    float sum = 0.0f;
    for (uint32_t i = 0; i < n; i++) {
        sum += x[i];
    }
    float mean = sum / (float)n;
    float ss = 0.0f;
    for (uint32_t i = 0; i < n; i++) {
        float d = x[i] - mean;
        ss += d * d;
    }
    float var = ss / (float)n;
    float inv = 1.0f / sqrtf(var + eps);
    for (uint32_t i = 0; i < n; i++) {
        float d = x[i] - mean;
        y[i] = (d * inv) * g[i] + b[i];
    }
}

/* RMSNorm (Llama, spec 4.7): no mean, no bias. */
static void rmsnorm(float *y, const float *x, const float *g, uint32_t n, float eps) {
    float ss = 0.0f;
    for (uint32_t i = 0; i < n; i++) {
        ss += x[i] * x[i];
    }
    float inv = 1.0f / sqrtf(ss / (float)n + eps);
    for (uint32_t i = 0; i < n; i++) {
        y[i] = (x[i] * inv) * g[i];
    }
}

/* Dynamic symmetric quantization of one vector to int8 with one scale (spec 4.3). */
static float quantize(int8_t *q, const float *v, uint32_t n) {
    float amax = 0.0f;
    for (uint32_t i = 0; i < n; i++) {
        float a = fabsf(v[i]);
        if (a > amax) {
            amax = a;
        }
    }
    if (amax == 0.0f) {
        memset(q, 0, n);
        return 0.0f;
    }
    float s = amax / 127.0f;
    float inv = 127.0f / amax;
    for (uint32_t i = 0; i < n; i++) {
        float t = v[i] * inv;
        if (t != t) {
            t = 0.0f;
        } else if (t > 127.0f) {
            t = 127.0f;
        } else if (t < -127.0f) {
            t = -127.0f;
        }
        q[i] = (int8_t)rne(t);
    }
    return s;
}

/* The int8 dot products. Their sums are exact in int32 (|x . w| <= 65536 * 128 * 128 = 2^30 for
 * the largest n_in the spec allows), so any order of the multiply-adds gives the same bits: the
 * kernels below differ in speed only, and the float32 work stays in store_outputs, in the
 * spec's order. */
static int32_t dot_i8(const int8_t *a, const int8_t *b, uint32_t n) {
    int32_t acc = 0;
    for (uint32_t i = 0; i < n; i++) {
        acc += (int32_t)a[i] * (int32_t)b[i];
    }
    return acc;
}

/* y[o] = (float)acc[o] * (xs * sw[o]) + b[o] for n outputs of one token (spec 4.4). */
static void store_outputs(float *y, const int32_t *acc, uint32_t n, float xs, const float *sw,
                          const float *b) {
    for (uint32_t o = 0; o < n; o++) {
        float scale = xs * sw[o];
        float v = (float)acc[o] * scale;
        y[o] = b ? v + b[o] : v;
    }
}

/* dot_rows(acc, x, w, n): acc[r] = x . w[r * n ...] for the DOT_ROWS weight rows that start at
 * w (row stride n), against one activation vector x of n values. It does nearly every
 * multiply-add of a token, and it is the function a port replaces with a SIMD kernel of its core
 * (ESP32-S3 PIE, Helium, ...): matmul calls only it and dot_i8, and the results must be the
 * exact int32 sums. x and the rows are 4-byte aligned whenever n and the activations' stride
 * are multiples of 4 (tensors are 16-byte aligned in the file, activations live in
 * model_alloc'ed buffers); a kernel that needs aligned words checks and falls back, as the DSP
 * one does.
 *
 * TG_DOT_KERNEL picks one of three versions; the default suits the core being compiled for:
 *   1  one row at a time (dot_i8): what auto-vectorizing compilers turn into SIMD code for a
 *      PC (SSE2, NEON); the default there.
 *   2  four rows per pass, for 32-bit cores without SIMD (Xtensa, RISC-V, Cortex-M0/M3): each
 *      activation byte is loaded once for four rows and the loop overhead is shared, leaving
 *      one load and one multiply-add per weight.
 *   3  Armv7E-M DSP (Cortex-M4/M7/M33): SMLAD, two 16-bit multiply-adds per instruction.
 * tests/test_kernel.py (tests/mcu/kernel_check.c) checks every version against a plain loop:
 * 1 and 2 on the PC, 2 and 3 on the emulated Cortex-M4F. docs/performance.md has their counts. */
#ifndef TG_DOT_KERNEL
#if defined(__ARM_FEATURE_SIMD32)
#define TG_DOT_KERNEL 3
#elif defined(__SSE2__) || defined(__ARM_NEON)
#define TG_DOT_KERNEL 1
#else
#define TG_DOT_KERNEL 2
#endif
#endif

#if TG_DOT_KERNEL == 1
#define DOT_ROWS 1
static void dot_rows(int32_t acc[DOT_ROWS], const int8_t *x, const int8_t *w, uint32_t n) {
    acc[0] = dot_i8(x, w, n);
}

#elif TG_DOT_KERNEL == 2
/* Four rows: four accumulators and four row pointers stay in registers on 16-register cores. */
#define DOT_ROWS 4
static void dot_rows(int32_t acc[DOT_ROWS], const int8_t *x, const int8_t *w, uint32_t n) {
    const int8_t *w0 = w, *w1 = w0 + n, *w2 = w1 + n, *w3 = w2 + n;
    int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    for (uint32_t i = 0; i < n; i++) {
        int32_t v = x[i];
        a0 += v * w0[i];
        a1 += v * w1[i];
        a2 += v * w2[i];
        a3 += v * w3[i];
    }
    acc[0] = a0;
    acc[1] = a1;
    acc[2] = a2;
    acc[3] = a3;
}

#elif TG_DOT_KERNEL == 3
/* Four int8 of a word go to 16-bit lanes as (b0, b2) by SXTB16 and as (b1 * 256, b3 * 256) by
 * masking the word with 0xFF00FF00; the activation word is split the other way round
 * ((a0 * 256, a2 * 256) and (a1, a3)), so every lane product is 256 times a term of the dot
 * product, and the 256-fold sum of up to DSP_CHUNK inputs (<= 2^30) is exact in an int32.
 * Three rows keep every value in a register (four spill on a Cortex-M4). */
#include <arm_acle.h>

#define DOT_ROWS 3
#define DSP_CHUNK 256u

/* The lanes of an activation word (four int8): (a0 * 256, a2 * 256) and (a1, a3). */
static int16x2_t lanes_02(uint32_t v) {
    return (int16x2_t)((v << 8) & 0xFF00FF00u);
}

static int16x2_t lanes_13(uint32_t v) {
    return __sxtb16((v >> 8) | (v << 24));
}

/* acc + 256 x (four weights at w) . (the activations of lanes x02, x13); w is 4-byte aligned. */
static int32_t smlad_word(int32_t acc, const uint8_t *w, int16x2_t x02, int16x2_t x13) {
    uint32_t u;
    memcpy(&u, w, 4); /* aligned: one LDR */
    acc = __smlad(__sxtb16(u), x02, acc);                   /* (w0, w2) */
    return __smlad((int16x2_t)(u & 0xFF00FF00u), x13, acc); /* (w1 * 256, w3 * 256) */
}

static void dot_rows(int32_t acc[DOT_ROWS], const int8_t *x, const int8_t *w, uint32_t n) {
    if (n % 4 != 0 || (((uintptr_t)x | (uintptr_t)w) & 3u) != 0) {
        for (uint32_t r = 0; r < DOT_ROWS; r++) { /* word loads would be misaligned */
            acc[r] = dot_i8(x, w + (size_t)r * n, n);
        }
        return;
    }
    const uint8_t *xp = (const uint8_t *)x, *w0 = (const uint8_t *)w, *w1 = w0 + n, *w2 = w1 + n;
    int32_t t0 = 0, t1 = 0, t2 = 0;
    for (uint32_t done = 0; done < n; done += DSP_CHUNK) {
        const uint8_t *end = xp + (n - done < DSP_CHUNK ? n - done : DSP_CHUNK);
        int32_t a0 = 0, a1 = 0, a2 = 0; /* 256 x this chunk's dot products */
        while (xp < end) {
            uint32_t v;
            memcpy(&v, xp, 4);
            int16x2_t x02 = lanes_02(v), x13 = lanes_13(v);
            a0 = smlad_word(a0, w0, x02, x13);
            a1 = smlad_word(a1, w1, x02, x13);
            a2 = smlad_word(a2, w2, x02, x13);
            xp += 4;
            w0 += 4;
            w1 += 4;
            w2 += 4;
        }
        t0 += a0 / 256; /* exact: a multiple of 256 */
        t1 += a1 / 256;
        t2 += a2 / 256;
    }
    acc[0] = t0;
    acc[1] = t1;
    acc[2] = t2;
}

/* matmul of one token (decode): the activation is split into its lanes once, on the stack, and
 * shared by all rows, which leaves 5 instructions per weight word (LDR, SXTB16, AND, 2 SMLAD).
 * Returns 0, having done nothing, where dot_rows has to do it: odd shapes, or more than
 * DSP_LANES_MAX inputs. */
#define DSP_LANES_MAX 1024u /* inputs: 2 KB of stack */

static int matvec_dsp(float *y, const int8_t *x, float xs, const int8_t *w, const float *sw,
                      const float *b, uint32_t n_in, uint32_t n_out) {
    int16x2_t lanes[DSP_LANES_MAX / 2];
    if (n_in > DSP_LANES_MAX || n_in % 4 != 0 || (((uintptr_t)x | (uintptr_t)w) & 3u) != 0) {
        return 0;
    }
    for (uint32_t i = 0; i < n_in / 4; i++) {
        uint32_t v;
        memcpy(&v, x + 4 * i, 4);
        lanes[2 * i] = lanes_02(v);
        lanes[2 * i + 1] = lanes_13(v);
    }
    uint32_t o = 0;
    for (; o + DOT_ROWS <= n_out; o += DOT_ROWS) {
        const uint8_t *w0 = (const uint8_t *)(w + (size_t)o * n_in), *w1 = w0 + n_in;
        const uint8_t *w2 = w1 + n_in;
        const int16x2_t *lp = lanes;
        int32_t acc[DOT_ROWS] = {0, 0, 0};
        for (uint32_t done = 0; done < n_in; done += DSP_CHUNK) {
            const int16x2_t *end = lp + (n_in - done < DSP_CHUNK ? n_in - done : DSP_CHUNK) / 2;
            int32_t a0 = 0, a1 = 0, a2 = 0;
            while (lp < end) {
                a0 = smlad_word(a0, w0, lp[0], lp[1]);
                a1 = smlad_word(a1, w1, lp[0], lp[1]);
                a2 = smlad_word(a2, w2, lp[0], lp[1]);
                lp += 2;
                w0 += 4;
                w1 += 4;
                w2 += 4;
            }
            acc[0] += a0 / 256;
            acc[1] += a1 / 256;
            acc[2] += a2 / 256;
        }
        store_outputs(y + o, acc, DOT_ROWS, xs, sw + o, b ? b + o : NULL);
    }
    for (; o < n_out; o++) {
        int32_t acc = dot_i8(x, w + (size_t)o * n_in, n_in);
        store_outputs(y + o, &acc, 1, xs, sw + o, b ? b + o : NULL);
    }
    return 1;
}

#else
#error "TG_DOT_KERNEL must be 1, 2 or 3"
#endif

/* One matmul: y[t][o] = (float)(xq[t] . W[o]) * (xs[t] * sw[o]) + b[o] for nb tokens (spec 4.4),
 * W being n_out rows of n_in int8. */
typedef struct {
    float *y;
    uint32_t y_stride;
    const int8_t *xq;
    uint32_t x_stride;
    const float *xs;
    uint32_t nb;
    const int8_t *w;
    const float *sw, *b;
    uint32_t n_in, n_out;
} matmul_job;

/* Output rows o0 .. o1-1 of a matmul. The weight rows are the outer loop, DOT_ROWS at a time,
 * so each row is read once for the whole batch: on the device the weights stream from PSRAM or
 * flash, the activations and the few rows in use stay in cache. */
static void matmul_rows(const matmul_job *j, uint32_t o0, uint32_t o1) {
    const uint32_t n_in = j->n_in;
    const float *b = j->b;
#if TG_DOT_KERNEL == 3
    if (j->nb == 1 && matvec_dsp(j->y + o0, j->xq, j->xs[0], j->w + (size_t)o0 * n_in, j->sw + o0,
                                 b ? b + o0 : NULL, n_in, o1 - o0)) {
        return;
    }
#endif
    uint32_t o = o0;
    for (; o + DOT_ROWS <= o1; o += DOT_ROWS) {
        const int8_t *rows = j->w + (size_t)o * n_in;
        for (uint32_t t = 0; t < j->nb; t++) {
            int32_t acc[DOT_ROWS];
            dot_rows(acc, j->xq + (size_t)t * j->x_stride, rows, n_in);
            store_outputs(j->y + (size_t)t * j->y_stride + o, acc, DOT_ROWS, j->xs[t], j->sw + o,
                          b ? b + o : NULL);
        }
    }
    for (; o < o1; o++) {
        const int8_t *row = j->w + (size_t)o * n_in;
        for (uint32_t t = 0; t < j->nb; t++) {
            int32_t acc = dot_i8(j->xq + (size_t)t * j->x_stride, row, n_in);
            store_outputs(j->y + (size_t)t * j->y_stride + o, &acc, 1, j->xs[t], j->sw + o,
                          b ? b + o : NULL);
        }
    }
}

/* Part `part` of `n_parts` of a matmul's output rows: equal shares cut at multiples of
 * DOT_ROWS, so that every row goes through the same code as in a single-threaded run (the
 * leftover rows of a shape that is not a multiple of DOT_ROWS stay with the last part). Each
 * output is computed and stored by exactly one worker, so the logits are bit-identical for
 * any number of workers. */
static void matmul_part(void *ctx, uint32_t part, uint32_t n_parts) {
    const matmul_job *j = (const matmul_job *)ctx;
    uint32_t groups = j->n_out / DOT_ROWS;
    uint32_t o0 = (uint32_t)((uint64_t)groups * part / n_parts) * DOT_ROWS;
    uint32_t o1 = (uint32_t)((uint64_t)groups * (part + 1) / n_parts) * DOT_ROWS;
    if (part + 1 == n_parts) {
        o1 = j->n_out;
    }
    matmul_rows(j, o0, o1);
}

/* Matmuls below this many multiply-adds run on the caller alone: handing a job to the workers
 * costs about as much as a few thousand multiply-adds on a PC (docs/performance.md, measured). */
#ifndef TG_PARALLEL_MIN_MACS
#define TG_PARALLEL_MIN_MACS 32768u
#endif

/* Parts per worker: a worker that finishes early (or a caller whose helper lost its core)
 * takes the next part, so a slow worker delays a job by one part at most. */
#define PARTS_PER_WORKER 4u

static void matmul(tg_workers *workers, uint32_t n_workers, matmul_job *j) {
    uint32_t groups = j->n_out / DOT_ROWS;
    if (workers && groups >= 2 && (uint64_t)j->nb * j->n_in * j->n_out >= TG_PARALLEL_MIN_MACS) {
        uint32_t n_parts = n_workers * PARTS_PER_WORKER;
        tg_port_workers_run(workers, matmul_part, j, n_parts < groups ? n_parts : groups);
    } else {
        matmul_rows(j, 0, j->n_out);
    }
}

static float gelu(float x, uint32_t activation) {
    if (activation == 0) {
        float x3 = (x * x) * x;
        float u = 0.797884583f * (x + 0.044715f * x3);
        return (0.5f * x) * (1.0f + tanh32(u));
    }
    return (0.5f * x) * (1.0f + erf32(x * 0.707106769f));
}

/* SwiGLU's gate (Llama): silu(x) = x * sigmoid(x), as x / (1 + e^-x). exp32 clamps its
 * argument, so a large negative x gives a tiny quotient, never inf/inf. */
static float silu(float x) {
    return x / (1.0f + exp32(-x));
}

/* Rotary position embedding of one head's D values in place: the pairs (v[2i], v[2i+1]) turn by
 * the angle whose cosine and sine are cs[2i], cs[2i+1] (the file's rope row of the position).
 * The converter puts Hugging Face's rotate-half pairs (i, i + D/2) into this order. */
static void rope(float *v, const float *cs, uint32_t D) {
    for (uint32_t i = 0; i < D; i += 2) {
        float x0 = v[i], x1 = v[i + 1], c = cs[i], sn = cs[i + 1];
        v[i] = x0 * c - x1 * sn;
        v[i + 1] = x0 * sn + x1 * c;
    }
}

/* ---------------------------------------------------------------------------------------- */
/* 4. Model and loader                                                                      */
/* ---------------------------------------------------------------------------------------- */

/* A quantized matrix as the file stores it (spec 4.4): int8 rows, one scale per row (output
 * channel), and a bias per output or NULL for none. */
typedef struct {
    const int8_t *w;
    const float *s, *b;
} tg_qmat;

/* One layer's tensors. A Llama layer uses the same slots: ln1_g/ln2_g are its RMSNorm gains,
 * attn its fused q/k/v rows, proj its output projection, fc its fused gate/up rows and mproj
 * its down projection; it has no biases (NULL) and no LayerNorm biases. */
typedef struct {
    const float *ln1_g, *ln1_b;
    tg_qmat attn, proj;
    const float *ln2_g, *ln2_b;
    tg_qmat fc, mproj;
} tg_layer;

struct tg_model {
    tg_info info;
    /* weights: pointers into the caller's buffer */
    const int8_t *wte_q;
    const float *wte_s, *wpe, *lnf_g, *lnf_b;
    const float *rope;    /* Llama: [P][D] (cos, sin) pairs; GPT-2: NULL (wpe instead) */
    tg_qmat head;         /* output head: wte_q/wte_s when tied; no bias */
    tg_layer *layers;
    const uint8_t *tokenizer;
    const uint8_t *meta; /* NULL in a version 1 file */
    /* KV cache: [layer][pos][kv_dim] int8 (kv_dim = n_kv_head * head_dim), scales
     * [layer][pos][n_kv_head] */
    int8_t *k8, *v8;
    float *sk, *sv;
    int32_t *tokens; /* the ids in the cache, for the repetition penalty */
    uint32_t pos;
    /* scratch, sized for max_batch tokens */
    float *x;       /* [B][E] residual stream */
    float *buf;     /* [B][wide] linear outputs: qkv (E + 2 kv_dim), then fc (I; Llama 2I) */
    float *att;     /* [B][E] attention outputs */
    int8_t *xq;     /* [B][max(E, I)] quantized activations */
    float *xs;      /* [B] their scales */
    float *scores;  /* [n_ctx] */
    int8_t *q8;     /* [head_dim] */
    float *logits;  /* [V] */
    float *draft_logits; /* [max_draft][V]: every position of the last tg_verify */
    uint32_t verify_p0, verify_n; /* its first position and how many rows are still valid */
    tg_counters counters;
    tg_workers *workers; /* NULL: the caller does every matmul alone */
    float *probs;   /* [V] sampling */
    int32_t *order; /* [V] sampling */
    int has_logits;
    uint64_t rng;
    tg_poll_fn poll;
    void *poll_ctx;
    tg_trace_fn trace;
    void *trace_ctx;
    /* every allocation, for tg_free */
    void *blocks[24];
    int n_blocks;
};

static void *model_alloc(tg_model *m, size_t nbytes) {
    if (m->n_blocks >= (int)(sizeof(m->blocks) / sizeof(m->blocks[0]))) {
        return NULL;
    }
    void *p = tg_port_alloc(nbytes);
    if (p && ((uintptr_t)p & 15u) != 0) {
        tg_port_free(p); /* the kernels assume 16-byte alignment */
        p = NULL;
    }
    if (p) {
        m->blocks[m->n_blocks++] = p;
    }
    return p;
}

void tg_free(tg_model *m) {
    if (!m) {
        return;
    }
    tg_port_workers_stop(m->workers);
    for (int i = m->n_blocks - 1; i >= 0; i--) {
        tg_port_free(m->blocks[i]);
    }
    tg_port_free(m);
}

enum { DT_I8 = 1, DT_F32 = 2, DT_RAW = 3 };

enum {
    K_WTE_Q = 1, K_WTE_S = 2, K_WPE = 3, K_LNF_G = 4, K_LNF_B = 5, K_TOKENIZER = 6, K_META = 7,
    K_ROPE = 8, K_RMSF_G = 9, K_HEAD_Q = 10, K_HEAD_S = 11, /* Llama globals */
    K_LN1_G = 16, K_LN1_B, K_ATTN_W, K_ATTN_S, K_ATTN_B, K_PROJ_W, K_PROJ_S, K_PROJ_B,
    K_LN2_G, K_LN2_B, K_FC_W, K_FC_S, K_FC_B, K_MPROJ_W, K_MPROJ_S, K_MPROJ_B,
    K_RMS1_G = 32, K_QKV_W, K_QKV_S, K_O_W, K_O_S, K_RMS2_G, K_GU_W, K_GU_S, K_DOWN_W, K_DOWN_S
};

#define GPT2_LAYER_TENSORS 16u
#define LLAMA_LAYER_TENSORS 10u

static const char *const layer_kind_names[26] = {
    "ln1_g", "ln1_b", "attn_w", "attn_s", "attn_b", "proj_w", "proj_s", "proj_b",
    "ln2_g", "ln2_b", "fc_w", "fc_s", "fc_b", "mproj_w", "mproj_s", "mproj_b",
    "rms1_g", "qkv_w", "qkv_s", "o_w", "o_s", "rms2_g", "gu_w", "gu_s", "down_w", "down_s"};

static const char *global_kind_name(uint32_t kind) {
    switch (kind) {
        case K_WTE_Q: return "wte_q";
        case K_WTE_S: return "wte_s";
        case K_WPE: return "wpe";
        case K_LNF_G: return "lnf_g";
        case K_LNF_B: return "lnf_b";
        case K_META: return "meta";
        case K_ROPE: return "rope";
        case K_RMSF_G: return "rmsf_g";
        case K_HEAD_Q: return "head_q";
        case K_HEAD_S: return "head_s";
        default: return "tokenizer";
    }
}

/* Directory slot -> (kind, layer): the canonical order of spec section 3 (GPT-2) or 3.1
 * (Llama). */
static void slot_kind(uint32_t slot, const tg_info *h, uint32_t *kind, uint32_t *layer) {
    static const uint32_t llama_pre[3] = {K_WTE_Q, K_WTE_S, K_ROPE};
    static const uint32_t llama_post[5] = {K_RMSF_G, K_HEAD_Q, K_HEAD_S, K_TOKENIZER, K_META};
    int llama = h->arch == TG_ARCH_LLAMA;
    uint32_t per_layer = llama ? LLAMA_LAYER_TENSORS : GPT2_LAYER_TENSORS;
    *layer = 0;
    if (slot < 3) {
        *kind = llama ? llama_pre[slot] : slot + 1;
    } else if (slot < 3 + per_layer * h->n_layer) {
        *kind = (llama ? K_RMS1_G : K_LN1_G) + (slot - 3) % per_layer;
        *layer = (slot - 3) / per_layer;
    } else {
        uint32_t i = slot - 3 - per_layer * h->n_layer;
        if (!llama) {
            *kind = 4 + i;
        } else {
            *kind = llama_post[i == 0 || !h->head_tied ? i : i + 2];
        }
    }
}

/* Expected dtype and element count of a tensor kind; 0 elements = any size (tokenizer, meta). */
static void kind_shape(const tg_info *h, uint32_t kind, uint32_t *dtype, uint64_t *count) {
    uint64_t E = h->n_embd, I = h->n_inner, V = h->n_vocab, P = h->n_positions;
    uint64_t KVD = (uint64_t)h->n_kv_head * h->head_dim;
    *dtype = DT_F32;
    switch (kind) {
        case K_WTE_Q: case K_HEAD_Q: *dtype = DT_I8; *count = V * E; break;
        case K_WTE_S: case K_HEAD_S: *count = V; break;
        case K_WPE: *count = P * E; break;
        case K_ROPE: *count = P * h->head_dim; break;
        case K_LNF_G: case K_LNF_B: case K_RMSF_G: *count = E; break;
        case K_TOKENIZER: case K_META: *dtype = DT_RAW; *count = 0; break;
        case K_ATTN_W: *dtype = DT_I8; *count = 3 * E * E; break;
        case K_ATTN_S: case K_ATTN_B: *count = 3 * E; break;
        case K_PROJ_W: case K_O_W: *dtype = DT_I8; *count = E * E; break;
        case K_FC_W: *dtype = DT_I8; *count = I * E; break;
        case K_FC_S: case K_FC_B: *count = I; break;
        case K_MPROJ_W: case K_DOWN_W: *dtype = DT_I8; *count = E * I; break;
        case K_QKV_W: *dtype = DT_I8; *count = (E + 2 * KVD) * E; break;
        case K_QKV_S: *count = E + 2 * KVD; break;
        case K_GU_W: *dtype = DT_I8; *count = 2 * I * E; break;
        case K_GU_S: *count = 2 * I; break;
        default: *count = E; break; /* ln*, rms*, proj_s/b, mproj_s/b, o_s, down_s */
    }
}

static int is_scale_kind(uint32_t kind) {
    return kind == K_WTE_S || kind == K_ATTN_S || kind == K_PROJ_S || kind == K_FC_S ||
           kind == K_MPROJ_S || kind == K_HEAD_S || kind == K_QKV_S || kind == K_O_S ||
           kind == K_GU_S || kind == K_DOWN_S;
}

static void tensor_name(char *out, size_t n, uint32_t kind, uint32_t layer) {
    if (kind >= 16 && kind <= K_DOWN_S) {
        snprintf(out, n, "h.%u.%s", (unsigned)layer, layer_kind_names[kind - 16]);
    } else {
        snprintf(out, n, "%s", global_kind_name(kind));
    }
}

/* memcmp order of two byte strings, a proper prefix first: <0, 0, >0 */
static int bytes_cmp(const uint8_t *a, uint32_t na, const uint8_t *b, uint32_t nb) {
    int c = memcmp(a, b, na < nb ? na : nb);
    return c ? c : (na > nb) - (na < nb);
}

/* Tokenizer section version 2 (spec 6.2: score-ordered BPE with byte fallback, llama2.c). The
 * sorted-ids rule needs no table: strictly increasing bytes make the N ids distinct, and N
 * distinct ids that are neither byte nor control tokens are exactly the normal tokens. */
static int check_tokenizer_v2(const uint8_t *sec, uint32_t len, uint32_t n_vocab, tg_error *err) {
    uint32_t nv = rd32(sec + 8), byte_base = rd32(sec + 12), bos = rd32(sec + 16);
    uint32_t n_control = rd32(sec + 20), flags = rd32(sec + 24), bytes_size = rd32(sec + 28);
    if (nv != n_vocab) {
        return fail(err, TG_E_TOKENIZER, "tokenizer has %u tokens but the model has %u",
                    (unsigned)nv, (unsigned)n_vocab);
    }
    if (nv < 257 || (uint64_t)byte_base + 256 > nv) {
        return fail(err, TG_E_TOKENIZER, "tokenizer section: byte_base %u does not fit %u tokens",
                    (unsigned)byte_base, (unsigned)nv);
    }
    if (n_control < 1 || n_control > nv - 256) {
        return fail(err, TG_E_TOKENIZER, "tokenizer section: n_control %u is outside 1..%u",
                    (unsigned)n_control, (unsigned)(nv - 256));
    }
    if (flags & ~3u) {
        return fail(err, TG_E_TOKENIZER, "tokenizer section: unknown flags 0x%x", (unsigned)flags);
    }
    uint64_t need = 36 + 12 * (uint64_t)nv - 1024 + (((uint64_t)bytes_size + 3) & ~(uint64_t)3);
    if (need != len) {
        char t[21];
        return fail(err, TG_E_TOKENIZER, "tokenizer section is %u bytes but its counts need %s",
                    (unsigned)len, u64_text(t, need));
    }
    const uint8_t *off = sec + 32;
    const uint8_t *blob = off + 4 * ((size_t)nv + 1);
    const uint8_t *scores = blob + ((bytes_size + 3u) & ~3u);
    const uint8_t *ctl = scores + 4 * (size_t)nv;
    const uint8_t *sorted = ctl + 4 * (size_t)n_control;
    uint32_t n_normal = nv - 256 - n_control;
    if (rd32(off) != 0 || rd32(off + 4 * (size_t)nv) != bytes_size) {
        return fail(err, TG_E_TOKENIZER, "tokenizer offsets do not span the byte table");
    }
    for (uint32_t i = bytes_size; i < ((bytes_size + 3u) & ~3u); i++) {
        if (blob[i] != 0) {
            return fail(err, TG_E_TOKENIZER, "tokenizer section: padding byte %u is not zero",
                        (unsigned)i);
        }
    }
    for (uint32_t t = 0; t < nv; t++) {
        uint32_t a = rd32(off + 4 * (size_t)t), b = rd32(off + 4 * (size_t)t + 4);
        if (b < a) {
            return fail(err, TG_E_TOKENIZER, "token %u: offsets decrease", (unsigned)t);
        }
        if (t >= byte_base && t < byte_base + 256 && (b - a != 1 || blob[a] != t - byte_base)) {
            return fail(err, TG_E_TOKENIZER, "byte token %u is not the one byte 0x%02x",
                        (unsigned)t, (unsigned)(t - byte_base));
        }
        uint32_t bits = rd32(scores + 4 * (size_t)t);
        if ((bits & 0x7F800000u) == 0x7F800000u) {
            return fail(err, TG_E_TOKENIZER, "token %u: score is not finite", (unsigned)t);
        }
    }
    int bos_found = 0;
    for (uint32_t i = 0; i < n_control; i++) {
        uint32_t id = rd32(ctl + 4 * (size_t)i);
        if (id >= nv || (id >= byte_base && id < byte_base + 256) ||
            (i > 0 && id <= rd32(ctl + 4 * (size_t)(i - 1)))) {
            return fail(err, TG_E_TOKENIZER, "control id %u at %u: out of range, a byte token or "
                        "not increasing", (unsigned)id, (unsigned)i);
        }
        bos_found |= id == bos;
    }
    if (!bos_found) {
        return fail(err, TG_E_TOKENIZER, "tokenizer section: bos_id %u is not a control token",
                    (unsigned)bos);
    }
    const uint8_t *prev = NULL;
    uint32_t prev_n = 0;
    for (uint32_t i = 0; i < n_normal; i++) {
        uint32_t id = rd32(sorted + 4 * (size_t)i);
        if (id >= nv || (id >= byte_base && id < byte_base + 256)) {
            return fail(err, TG_E_TOKENIZER, "sorted id %u at %u: out of range or a byte token",
                        (unsigned)id, (unsigned)i);
        }
        uint32_t lo = 0, hi = n_control; /* binary search in the increasing control ids */
        while (lo < hi) {
            uint32_t mid = (lo + hi) / 2;
            uint32_t c = rd32(ctl + 4 * (size_t)mid);
            if (c == id) {
                return fail(err, TG_E_TOKENIZER, "sorted id %u at %u is a control token",
                            (unsigned)id, (unsigned)i);
            }
            if (c < id) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        uint32_t a = rd32(off + 4 * (size_t)id), n = rd32(off + 4 * (size_t)id + 4) - a;
        if (n == 0) {
            return fail(err, TG_E_TOKENIZER, "token %u has no bytes", (unsigned)id);
        }
        if (prev && bytes_cmp(prev, prev_n, blob + a, n) >= 0) {
            return fail(err, TG_E_TOKENIZER, "sorted id %u at %u: bytes not above the previous "
                        "token's (unsorted or repeated)", (unsigned)id, (unsigned)i);
        }
        prev = blob + a;
        prev_n = n;
    }
    return ok(err);
}

int tg_check_tokenizer(const uint8_t *sec, uint32_t len, uint32_t n_vocab, tg_error *err) {
    if (!sec || len < 32) {
        return fail(err, TG_E_TOKENIZER, "tokenizer section too short (%u bytes)", (unsigned)len);
    }
    if (memcmp(sec, "TTOK", 4) != 0) {
        return fail(err, TG_E_TOKENIZER, "tokenizer section: bad magic");
    }
    if (rd32(sec + 4) == 2) {
        return check_tokenizer_v2(sec, len, n_vocab, err);
    }
    if (rd32(sec + 4) != 1) {
        return fail(err, TG_E_TOKENIZER, "tokenizer section: unsupported version %u",
                    (unsigned)rd32(sec + 4));
    }
    uint32_t nv = rd32(sec + 8), n_merges = rd32(sec + 12), n_special = rd32(sec + 16);
    uint32_t pretok = rd32(sec + 20), bytes_size = rd32(sec + 24);
    if (nv != n_vocab) {
        return fail(err, TG_E_TOKENIZER, "tokenizer has %u tokens but the model has %u",
                    (unsigned)nv, (unsigned)n_vocab);
    }
    if (pretok != 1) {
        return fail(err, TG_E_TOKENIZER, "tokenizer section: unknown pretokenizer %u",
                    (unsigned)pretok);
    }
    if (rd32(sec + 28) != 0) {
        return fail(err, TG_E_TOKENIZER, "tokenizer section: reserved field is %u, must be 0",
                    (unsigned)rd32(sec + 28));
    }
    uint64_t need = 32 + 4 * ((uint64_t)nv + 1) + (((uint64_t)bytes_size + 3) & ~(uint64_t)3) +
                    12 * (uint64_t)n_merges + 4 * (uint64_t)n_special;
    if (need != len) {
        char t[21];
        return fail(err, TG_E_TOKENIZER, "tokenizer section is %u bytes but its counts need %s",
                    (unsigned)len, u64_text(t, need));
    }
    const uint8_t *off = sec + 32;
    const uint8_t *blob = off + 4 * ((size_t)nv + 1);
    const uint8_t *merges = blob + ((bytes_size + 3u) & ~3u);
    const uint8_t *special = merges + 12 * (size_t)n_merges;
    if (rd32(off) != 0 || rd32(off + 4 * (size_t)nv) != bytes_size) {
        return fail(err, TG_E_TOKENIZER, "tokenizer offsets do not span the byte table");
    }
    uint16_t byte_token[256]; /* how many single-byte tokens spell each byte value */
    memset(byte_token, 0, sizeof(byte_token));
    for (uint32_t t = 0; t < nv; t++) {
        uint32_t a = rd32(off + 4 * (size_t)t), b = rd32(off + 4 * (size_t)t + 4);
        if (b < a) {
            return fail(err, TG_E_TOKENIZER, "token %u: offsets decrease", (unsigned)t);
        }
        if (b > bytes_size) {
            return fail(err, TG_E_TOKENIZER, "token %u: offset %u is past the %u-byte table",
                        (unsigned)t, (unsigned)b, (unsigned)bytes_size);
        }
        if (b - a == 1 && byte_token[blob[a]] < 2) {
            byte_token[blob[a]]++;
        }
    }
    for (int v = 0; v < 256; v++) {
        if (byte_token[v] != 1) {
            return fail(err, TG_E_TOKENIZER, "byte 0x%02x has %u single-byte tokens, needs 1", v,
                        (unsigned)byte_token[v]);
        }
    }
    for (uint32_t r = 0; r < n_merges; r++) {
        uint32_t l = rd32(merges + 12 * (size_t)r), rt = rd32(merges + 12 * (size_t)r + 4);
        uint32_t res = rd32(merges + 12 * (size_t)r + 8);
        if (l >= nv || rt >= nv || res >= nv) {
            return fail(err, TG_E_TOKENIZER, "merge %u: token id out of range", (unsigned)r);
        }
        uint32_t la = rd32(off + 4 * (size_t)l), lb = rd32(off + 4 * (size_t)l + 4);
        uint32_t ra = rd32(off + 4 * (size_t)rt), rb = rd32(off + 4 * (size_t)rt + 4);
        uint32_t xa = rd32(off + 4 * (size_t)res), xb = rd32(off + 4 * (size_t)res + 4);
        if (xb - xa != (lb - la) + (rb - ra) || memcmp(blob + xa, blob + la, lb - la) != 0 ||
            memcmp(blob + xa + (lb - la), blob + ra, rb - ra) != 0) {
            return fail(err, TG_E_TOKENIZER, "merge %u: token %u is not token %u + token %u",
                        (unsigned)r, (unsigned)res, (unsigned)l, (unsigned)rt);
        }
    }
    for (uint32_t i = 0; i < n_special; i++) {
        uint32_t id = rd32(special + 4 * (size_t)i);
        if (id >= nv) {
            return fail(err, TG_E_TOKENIZER, "special token %u: id %u out of range", (unsigned)i,
                        (unsigned)id);
        }
        if (rd32(off + 4 * (size_t)id + 4) == rd32(off + 4 * (size_t)id)) {
            return fail(err, TG_E_TOKENIZER, "special token %u has no text", (unsigned)id);
        }
        for (uint32_t j = 0; j < i; j++) {
            if (rd32(special + 4 * (size_t)j) == id) {
                return fail(err, TG_E_TOKENIZER, "special token %u listed twice", (unsigned)id);
            }
        }
    }
    return ok(err);
}

static int check_header(const uint8_t *buf, size_t len, tg_info *h, tg_error *err) {
    if (len < TG_HEADER_SIZE) {
        return fail(err, TG_E_TRUNCATED, "file is %lu bytes, shorter than the %u-byte header",
                    (unsigned long)len, (unsigned)TG_HEADER_SIZE);
    }
    if (memcmp(buf, "TGPT", 4) != 0) {
        return fail(err, TG_E_MAGIC, "not a tinygpt model (magic is not 'TGPT')");
    }
    uint32_t version = rd32(buf + 4);
    if (version < 1 || version > TG_FORMAT_VERSION) {
        return fail(err, TG_E_VERSION, "format version %u, this engine reads versions 1 to %u",
                    (unsigned)version, (unsigned)TG_FORMAT_VERSION);
    }
    if (rd32(buf + 8) != TG_HEADER_SIZE) {
        return fail(err, TG_E_HEADER, "header_size %u, expected %u", (unsigned)rd32(buf + 8),
                    (unsigned)TG_HEADER_SIZE);
    }
    uint32_t file_size = rd32(buf + 12);
    if (file_size < TG_HEADER_SIZE) {
        return fail(err, TG_E_HEADER, "file_size %u is smaller than the header",
                    (unsigned)file_size);
    }
    if (file_size > len) {
        return fail(err, TG_E_TRUNCATED, "file is %lu bytes but its header says %u (truncated?)",
                    (unsigned long)len, (unsigned)file_size);
    }
    if (rd32(buf + 20) != 1) {
        return fail(err, TG_E_HEADER, "unknown quantization scheme %u", (unsigned)rd32(buf + 20));
    }
    if (rd32(buf + 84) != 0) {
        return fail(err, TG_E_HEADER, "flags 0x%x set; this engine knows none",
                    (unsigned)rd32(buf + 84));
    }
    uint32_t reserved_from = version >= 3 ? 104 : 88; /* version 3: arch fields at 88..103 */
    for (uint32_t i = reserved_from; i < TG_HEADER_SIZE; i++) {
        if (buf[i] != 0) {
            return fail(err, TG_E_HEADER, "reserved header byte %u is not zero", (unsigned)i);
        }
    }
    memset(h, 0, sizeof(*h));
    h->n_vocab = rd32(buf + 24);
    h->n_positions = rd32(buf + 28);
    h->n_embd = rd32(buf + 32);
    h->n_layer = rd32(buf + 36);
    h->n_head = rd32(buf + 40);
    h->n_inner = rd32(buf + 44);
    h->activation = rd32(buf + 48);
    h->layer_norm_epsilon = rdf32(buf + 52);
    h->eos_id = rd32(buf + 56);
    h->bos_id = rd32(buf + 60);
    h->q_id = rd32(buf + 64);
    h->a_id = rd32(buf + 68);
    h->do_id = rd32(buf + 72);
    h->file_bytes = file_size;
    h->arch = version >= 3 ? rd32(buf + 88) : TG_ARCH_GPT2;
    h->n_kv_head = version >= 3 ? rd32(buf + 92) : 0;
    h->rope_theta = version >= 3 ? rdf32(buf + 96) : 0.0f;
    h->head_tied = version >= 3 ? rd32(buf + 100) : 0;
    int llama = h->arch == TG_ARCH_LLAMA;
    if (h->arch > TG_ARCH_LLAMA) {
        return fail(err, TG_E_HEADER, "unknown arch %u (0 = GPT-2, 1 = Llama)", (unsigned)h->arch);
    }
    if (!llama && (h->n_kv_head != 0 || rd32(buf + 96) != 0 || h->head_tied != 0)) {
        return fail(err, TG_E_HEADER, "a GPT-2 file has n_kv_head, rope_theta and head_tied 0");
    }
    struct { const char *name; uint32_t v, lo, hi; } dims[] = {
        {"n_vocab", h->n_vocab, 1, 65536}, {"n_positions", h->n_positions, 1, 65536},
        {"n_embd", h->n_embd, 1, 65536},   {"n_layer", h->n_layer, 1, 1024},
        {"n_head", h->n_head, 1, 65536},   {"n_inner", h->n_inner, 1, 65536},
    };
    for (size_t i = 0; i < sizeof(dims) / sizeof(dims[0]); i++) {
        if (dims[i].v < dims[i].lo || dims[i].v > dims[i].hi) {
            return fail(err, TG_E_DIMS, "%s = %u is outside %u..%u", dims[i].name,
                        (unsigned)dims[i].v, (unsigned)dims[i].lo, (unsigned)dims[i].hi);
        }
    }
    if (h->n_head > h->n_embd || h->n_embd % h->n_head != 0) {
        return fail(err, TG_E_DIMS, "n_embd %u is not divisible by n_head %u",
                    (unsigned)h->n_embd, (unsigned)h->n_head);
    }
    h->head_dim = h->n_embd / h->n_head;
    if (!llama && h->activation > 1) {
        return fail(err, TG_E_DIMS, "unknown activation %u (0 = gelu_new, 1 = gelu)",
                    (unsigned)h->activation);
    }
    if (llama) {
        if (h->activation != 2) {
            return fail(err, TG_E_DIMS, "a Llama file has activation 2 (SwiGLU), not %u",
                        (unsigned)h->activation);
        }
        if (h->n_kv_head < 1 || h->n_kv_head > h->n_head || h->n_head % h->n_kv_head != 0) {
            return fail(err, TG_E_DIMS, "n_kv_head %u does not divide n_head %u",
                        (unsigned)h->n_kv_head, (unsigned)h->n_head);
        }
        if (h->head_dim % 2 != 0) {
            return fail(err, TG_E_DIMS, "head_dim %u is odd: rotary embeddings turn pairs",
                        (unsigned)h->head_dim);
        }
        if (!(h->rope_theta > 0.0f) || !(h->rope_theta <= FLT_MAX)) {
            return fail(err, TG_E_DIMS, "rope_theta must be finite and > 0");
        }
        if (h->head_tied > 1) {
            return fail(err, TG_E_HEADER, "head_tied %u is not 0 or 1", (unsigned)h->head_tied);
        }
    } else {
        h->n_kv_head = h->n_head; /* GPT-2: one key/value head per query head */
        h->head_tied = 1;
    }
    float eps = h->layer_norm_epsilon;
    if (!(eps > 0.0f) || !(eps <= FLT_MAX)) {
        return fail(err, TG_E_DIMS, "layer_norm_epsilon must be finite and > 0");
    }
    if (h->eos_id >= h->n_vocab || h->bos_id >= h->n_vocab) {
        return fail(err, TG_E_DIMS, "eos_id %u / bos_id %u out of range for n_vocab %u",
                    (unsigned)h->eos_id, (unsigned)h->bos_id, (unsigned)h->n_vocab);
    }
    const uint32_t opt_ids[3] = {h->q_id, h->a_id, h->do_id};
    for (int i = 0; i < 3; i++) {
        if (opt_ids[i] != TG_NO_TOKEN && opt_ids[i] >= h->n_vocab) {
            return fail(err, TG_E_DIMS, "%s %u out of range for n_vocab %u",
                        i == 0 ? "q_id" : i == 1 ? "a_id" : "do_id", (unsigned)opt_ids[i],
                        (unsigned)h->n_vocab);
        }
    }
    uint32_t n_tensors = rd32(buf + 76), dir_offset = rd32(buf + 80);
    /* version 2 adds the meta section; a Llama file has rope and no wpe, an RMSNorm gain and
     * no bias, and its own output head when it is not tied */
    uint32_t n_global = version == 1 ? 6 : llama ? (h->head_tied ? 6 : 8) : 7;
    uint32_t per_layer = llama ? LLAMA_LAYER_TENSORS : GPT2_LAYER_TENSORS;
    if (n_tensors != n_global + per_layer * h->n_layer) {
        return fail(err, TG_E_DIRECTORY, "n_tensors %u, expected %u for %u layers (version %u)",
                    (unsigned)n_tensors, (unsigned)(n_global + per_layer * h->n_layer),
                    (unsigned)h->n_layer, (unsigned)version);
    }
    if (dir_offset % 16 != 0 || dir_offset < TG_HEADER_SIZE ||
        (uint64_t)dir_offset + 16 * (uint64_t)n_tensors > file_size) {
        return fail(err, TG_E_DIRECTORY, "directory at %u (%u entries) is misaligned or past "
                    "the end of the %u-byte file", (unsigned)dir_offset, (unsigned)n_tensors,
                    (unsigned)file_size);
    }
    return ok(err);
}

static int check_floats(const float *p, uint64_t n, int scale, const char *name, tg_error *err) {
    for (uint64_t i = 0; i < n; i++) {
        float v = p[i];
        char t[21];
        if (!(v >= -FLT_MAX && v <= FLT_MAX)) {
            return fail(err, TG_E_VALUE, "tensor '%s' holds a non-finite value at %s", name,
                        u64_text(t, i));
        }
        if (scale && v < 0.0f) {
            return fail(err, TG_E_VALUE, "tensor '%s' holds a negative scale at %s", name,
                        u64_text(t, i));
        }
    }
    return TG_OK;
}

/* One directory entry, after check_layout: where the tensor is and what it holds. */
typedef struct {
    uint32_t kind, layer, dtype, offset, nbytes;
    uint64_t count;
    char name[32];
} tg_entry;

static void read_entry(const uint8_t *buf, const tg_info *h, uint32_t slot, tg_entry *t) {
    const uint8_t *e = buf + rd32(buf + 80) + 16 * slot;
    slot_kind(slot, h, &t->kind, &t->layer);
    tensor_name(t->name, sizeof(t->name), t->kind, t->layer);
    kind_shape(h, t->kind, &t->dtype, &t->count);
    t->offset = rd32(e + 8);
    t->nbytes = rd32(e + 12);
}

/* The directory's structure, from the header and directory bytes only: ids, dtypes, sizes and a
 * packed layout (each tensor at the first 16-aligned offset after the previous one, the last
 * ending at file_size). Runs before the CRC and before any allocation, so a header with huge
 * dimensions or a file_size far past its tensors (a sparse file) fails at once. */
static int check_layout(const uint8_t *buf, const tg_info *h, tg_error *err) {
    uint32_t n_tensors = rd32(buf + 76), dir_offset = rd32(buf + 80);
    uint64_t end = (uint64_t)dir_offset + 16 * (uint64_t)n_tensors; /* end of previous data */
    char t1[21], t2[21];
    for (uint32_t slot = 0; slot < n_tensors; slot++) {
        const uint8_t *e = buf + dir_offset + 16 * slot;
        tg_entry t;
        read_entry(buf, h, slot, &t);
        uint32_t id = rd32(e), dt = rd32(e + 4);
        if (id != t.kind + 256 * t.layer) {
            return fail(err, TG_E_DIRECTORY, "directory entry %u has id %u, expected '%s' (%u)",
                        (unsigned)slot, (unsigned)id, t.name, (unsigned)(t.kind + 256 * t.layer));
        }
        uint64_t want = t.dtype == DT_F32 ? 4 * t.count : t.count;
        if (dt != t.dtype) {
            return fail(err, TG_E_DIRECTORY, "tensor '%s': dtype %u, expected %u", t.name,
                        (unsigned)dt, (unsigned)t.dtype);
        }
        if (t.dtype != DT_RAW && t.nbytes != want) {
            return fail(err, TG_E_DIRECTORY, "tensor '%s': nbytes %u, expected %s", t.name,
                        (unsigned)t.nbytes, u64_text(t1, want));
        }
        if (t.offset % 16 != 0) {
            return fail(err, TG_E_DIRECTORY, "tensor '%s': offset %u is not 16-byte aligned",
                        t.name, (unsigned)t.offset);
        }
        if ((uint64_t)t.offset + t.nbytes > h->file_bytes) {
            return fail(err, TG_E_DIRECTORY, "tensor '%s': bytes %u..%s are past the end of "
                        "the %s-byte file", t.name, (unsigned)t.offset,
                        u64_text(t1, (uint64_t)t.offset + t.nbytes), u64_text(t2, h->file_bytes));
        }
        if (t.offset < end) {
            return fail(err, TG_E_DIRECTORY, "tensor '%s': offset %u overlaps what precedes it",
                        t.name, (unsigned)t.offset);
        }
        if (t.offset > ((end + 15u) & ~(uint64_t)15u)) {
            return fail(err, TG_E_DIRECTORY, "tensor '%s': offset %u leaves a gap after byte %s "
                        "(tensors are packed)", t.name, (unsigned)t.offset, u64_text(t1, end));
        }
        end = (uint64_t)t.offset + t.nbytes;
    }
    if (end != h->file_bytes) {
        return fail(err, TG_E_HEADER, "file_size %s, but the tensors end at byte %s",
                    u64_text(t1, h->file_bytes), u64_text(t2, end));
    }
    return TG_OK;
}

/* The meta section is text for the scripts (spec section 8); the engine only checks that it is
 * no larger than a board reads into its heap and holds no NUL byte or other C0 control but the
 * line feed, so a script never sees binary garbage. */
static int check_meta(const uint8_t *p, uint32_t n, tg_error *err) {
    if (n > TG_MAX_META_BYTES) {
        return fail(err, TG_E_VALUE, "meta section is %u bytes, more than %u", (unsigned)n,
                    (unsigned)TG_MAX_META_BYTES);
    }
    for (uint32_t i = 0; i < n; i++) {
        if (p[i] < 0x20 && p[i] != '\n') {
            return fail(err, TG_E_VALUE, "meta section holds control byte 0x%02x at %u",
                        (unsigned)p[i], (unsigned)i);
        }
        if (p[i] >= 0x80) { /* a UTF-8 sequence: lead byte, then 1-3 continuation bytes */
            uint32_t more = (p[i] & 0xE0) == 0xC0 ? 1 : (p[i] & 0xF0) == 0xE0 ? 2 : (p[i] & 0xF8) == 0xF0 ? 3 : 0;
            int bad = more == 0 || p[i] < 0xC2 || p[i] > 0xF4 || n - i <= more;
            for (uint32_t k = 1; !bad && k <= more; k++) {
                bad = (p[i + k] & 0xC0) != 0x80;
            }
            if (bad) {
                return fail(err, TG_E_VALUE, "meta section is not UTF-8 at byte %u", (unsigned)i);
            }
            i += more;
        }
    }
    return TG_OK;
}

/* Every value the layout check did not look at: floats finite, scales >= 0, the tokenizer. */
static int check_values(const uint8_t *buf, const tg_info *h, tg_error *err) {
    uint32_t n_tensors = rd32(buf + 76);
    for (uint32_t slot = 0; slot < n_tensors; slot++) {
        tg_entry t;
        read_entry(buf, h, slot, &t);
        const uint8_t *p = buf + t.offset;
        int rc = TG_OK;
        if (t.dtype == DT_F32) {
            rc = check_floats((const float *)(const void *)p, t.count, is_scale_kind(t.kind),
                              t.name, err);
        } else if (t.kind == K_TOKENIZER) {
            rc = tg_check_tokenizer(p, t.nbytes, h->n_vocab, err);
            if (!rc && rd32(p + 4) == 2 && rd32(p + 16) != h->bos_id) {
                rc = fail(err, TG_E_TOKENIZER, "tokenizer bos_id %u differs from the header's %u",
                          (unsigned)rd32(p + 16), (unsigned)h->bos_id);
            }
        } else if (t.kind == K_META) {
            rc = check_meta(p, t.nbytes, err);
        }
        if (rc) {
            return rc;
        }
    }
    return TG_OK;
}

/* Point the model at its tensors (the file is fully checked by now). */
static void bind_tensors(tg_model *m, const uint8_t *buf) {
    tg_info *h = &m->info;
    uint32_t n_tensors = rd32(buf + 76);
    uint64_t weight_bytes = 0;
    for (uint32_t slot = 0; slot < n_tensors; slot++) {
        tg_entry t;
        read_entry(buf, h, slot, &t);
        const uint8_t *p = buf + t.offset;
        if (t.kind == K_TOKENIZER) {
            m->tokenizer = p;
            h->tokenizer_bytes = t.nbytes;
            continue;
        }
        if (t.kind == K_META) {
            m->meta = p;
            h->meta_bytes = t.nbytes;
            continue;
        }
        weight_bytes += t.nbytes;
        const float *pf = (const float *)(const void *)p;
        const int8_t *pi = (const int8_t *)(const void *)p;
        tg_layer *L = t.kind >= 16 ? &m->layers[t.layer] : NULL;
        switch (t.kind) {
            case K_WTE_Q: m->wte_q = pi; break;
            case K_WTE_S: m->wte_s = pf; break;
            case K_WPE: m->wpe = pf; break;
            case K_ROPE: m->rope = pf; break;
            case K_HEAD_Q: m->head.w = pi; break;
            case K_HEAD_S: m->head.s = pf; break;
            case K_LNF_G: case K_RMSF_G: m->lnf_g = pf; break;
            case K_LNF_B: m->lnf_b = pf; break;
            case K_LN1_G: case K_RMS1_G: L->ln1_g = pf; break;
            case K_LN1_B: L->ln1_b = pf; break;
            case K_ATTN_W: case K_QKV_W: L->attn.w = pi; break;
            case K_ATTN_S: case K_QKV_S: L->attn.s = pf; break;
            case K_ATTN_B: L->attn.b = pf; break;
            case K_PROJ_W: case K_O_W: L->proj.w = pi; break;
            case K_PROJ_S: case K_O_S: L->proj.s = pf; break;
            case K_PROJ_B: L->proj.b = pf; break;
            case K_LN2_G: case K_RMS2_G: L->ln2_g = pf; break;
            case K_LN2_B: L->ln2_b = pf; break;
            case K_FC_W: case K_GU_W: L->fc.w = pi; break;
            case K_FC_S: case K_GU_S: L->fc.s = pf; break;
            case K_FC_B: L->fc.b = pf; break;
            case K_MPROJ_W: case K_DOWN_W: L->mproj.w = pi; break;
            case K_MPROJ_S: case K_DOWN_S: L->mproj.s = pf; break;
            default: L->mproj.b = pf; break;
        }
    }
    if (!m->head.w) { /* tied: the output head is the token embedding */
        m->head.w = m->wte_q;
        m->head.s = m->wte_s;
    }
    h->weight_bytes = weight_bytes;
}

static int alloc_state(tg_model *m, tg_error *err) {
    tg_info *h = &m->info;
    uint64_t E = h->n_embd, I = h->n_inner, V = h->n_vocab, C = h->n_ctx, B = h->max_batch;
    uint64_t L = h->n_layer, KV = h->n_kv_head, KVD = KV * h->head_dim;
    uint64_t fc = h->arch == TG_ARCH_LLAMA ? 2 * I : I; /* Llama: gate and up rows together */
    uint64_t wide = E + 2 * KVD > fc ? E + 2 * KVD : fc;
    uint64_t qwide = E > I ? E : I;
    struct { void **dst; uint64_t bytes; const char *what; } plan[] = {
        {(void **)&m->layers, L * sizeof(tg_layer), "layer table"},
        {(void **)&m->k8, L * C * KVD, "KV cache (K)"},
        {(void **)&m->v8, L * C * KVD, "KV cache (V)"},
        {(void **)&m->sk, 4 * L * C * KV, "KV cache scales (K)"},
        {(void **)&m->sv, 4 * L * C * KV, "KV cache scales (V)"},
        {(void **)&m->tokens, 4 * C, "token history"},
        {(void **)&m->x, 4 * B * E, "residual stream"},
        {(void **)&m->buf, 4 * B * wide, "linear outputs"},
        {(void **)&m->att, 4 * B * E, "attention outputs"},
        {(void **)&m->xq, B * qwide + 16, "quantized activations"},
        {(void **)&m->xs, 4 * B, "activation scales"},
        {(void **)&m->scores, 4 * C, "attention scores"},
        {(void **)&m->q8, h->head_dim + 16, "query"},
        {(void **)&m->logits, 4 * V, "logits"},
        {(void **)&m->probs, 4 * V, "sampling probabilities"},
        {(void **)&m->order, 4 * V, "sampling order"},
        {(void **)&m->draft_logits, 4 * (uint64_t)h->max_draft * V, "draft logits"},
    };
    uint64_t kv = 0, scratch = 0;
    for (size_t i = 0; i < sizeof(plan) / sizeof(plan[0]); i++) {
        char t[21];
        if (plan[i].bytes > (uint64_t)(SIZE_MAX / 2)) {
            return fail(err, TG_E_NOMEM, "cannot allocate %s: %s bytes", plan[i].what,
                        u64_text(t, plan[i].bytes));
        }
        *plan[i].dst = model_alloc(m, (size_t)plan[i].bytes);
        if (!*plan[i].dst) {
            return fail(err, TG_E_NOMEM, "out of memory allocating %s (%s bytes)", plan[i].what,
                        u64_text(t, plan[i].bytes));
        }
        if (i >= 1 && i <= 4) {
            kv += plan[i].bytes;
        } else if (i >= 6) {
            scratch += plan[i].bytes;
        }
    }
    memset(m->layers, 0, (size_t)(L * sizeof(tg_layer)));
    h->kv_bytes = kv;
    h->scratch_bytes = scratch;
    return TG_OK;
}

int tg_load(const uint8_t *buf, size_t len, const tg_options *opt, tg_model **out,
            tg_error *err) {
    if (!out) {
        return fail(err, TG_E_ARG, "no output pointer");
    }
    *out = NULL;
    if (!buf) {
        return fail(err, TG_E_ARG, "no model buffer");
    }
    if (!host_is_little_endian()) {
        return fail(err, TG_E_ENDIAN, "this engine needs a little-endian CPU");
    }
    if (((uintptr_t)buf & 15u) != 0) {
        return fail(err, TG_E_ALIGN, "model buffer at %p is not 16-byte aligned",
                    (const void *)buf);
    }
    /* Everything is checked before anything is allocated: header, directory layout, then the
     * bytes (CRC, float values, tokenizer). */
    tg_info hdr;
    int rc = check_header(buf, len, &hdr, err);
    if (!rc) {
        rc = check_layout(buf, &hdr, err);
    }
    if (rc) {
        return rc;
    }
    uint32_t n_ctx = opt && opt->n_ctx ? opt->n_ctx : hdr.n_positions;
    if (n_ctx > hdr.n_positions) {
        return fail(err, TG_E_ARG, "n_ctx %u is larger than the model's n_positions %u",
                    (unsigned)n_ctx, (unsigned)hdr.n_positions);
    }
    if (!(opt && opt->skip_crc)) {
        uint32_t want = rd32(buf + 16);
        uint32_t got = tg_crc32(0, buf + 20, (size_t)hdr.file_bytes - 20);
        if (got != want) {
            return fail(err, TG_E_CRC, "CRC32 mismatch: file says %08x, contents give %08x "
                        "(damaged or incompletely copied file)", (unsigned)want, (unsigned)got);
        }
    }
    rc = check_values(buf, &hdr, err);
    if (rc) {
        return rc;
    }
    uint32_t batch = opt && opt->max_batch ? opt->max_batch : 32;
    if (batch > n_ctx) {
        batch = n_ctx;
    }
    uint32_t max_draft = opt && opt->max_draft ? opt->max_draft : (batch < 8 ? batch : 8);
    if (max_draft > batch) {
        /* say where max_batch came from: a user who never set it must see what to change */
        if (opt && opt->max_batch && opt->max_batch <= n_ctx) {
            return fail(err, TG_E_ARG, "max_draft %u is larger than max_batch %u (a draft is checked "
                        "in one batch): give max_draft <= %u or a larger max_batch",
                        (unsigned)max_draft, (unsigned)batch, (unsigned)batch);
        }
        return fail(err, TG_E_ARG, "max_draft %u is larger than max_batch %u (min(n_ctx %u, 32) by "
                    "default; a draft is checked in one batch): give max_draft <= %u or a larger n_ctx",
                    (unsigned)max_draft, (unsigned)batch, (unsigned)n_ctx, (unsigned)batch);
    }
    uint32_t n_threads = opt && opt->n_threads ? opt->n_threads : 1;
    if (n_threads > tg_port_max_workers()) {
        return fail(err, TG_E_ARG, "n_threads %u: this build runs at most %u", (unsigned)n_threads,
                    (unsigned)tg_port_max_workers());
    }
    hdr.n_ctx = n_ctx;
    hdr.max_batch = batch;
    hdr.max_draft = max_draft;
    hdr.n_threads = n_threads;

    tg_model *m = (tg_model *)tg_port_alloc(sizeof(tg_model));
    if (!m) {
        return fail(err, TG_E_NOMEM, "out of memory allocating the model struct");
    }
    memset(m, 0, sizeof(*m));
    m->info = hdr;
    rc = alloc_state(m, err);
    if (rc) {
        tg_free(m);
        return rc;
    }
    if (n_threads > 1) {
        m->workers = tg_port_workers_start(n_threads);
        if (!m->workers) {
            tg_free(m);
            return fail(err, TG_E_NOMEM, "could not start %u worker threads",
                        (unsigned)n_threads - 1);
        }
    }
    bind_tensors(m, buf);
    tg_seed(m, 0);
    *out = m;
    return ok(err);
}

int tg_read_size(const uint8_t *head, size_t head_len, uint64_t file_len, size_t *nread,
                 tg_error *err) {
    if (!head || !nread) {
        return fail(err, TG_E_ARG, "no header or output");
    }
    size_t len = file_len > SIZE_MAX ? SIZE_MAX : (size_t)file_len;
    *nread = len < TG_HEADER_SIZE ? len : TG_HEADER_SIZE;
    if (head_len < *nread || head_len < TG_HEADER_SIZE || memcmp(head, "TGPT", 4) != 0) {
        return ok(err); /* the header first; not a model file: tg_load names the problem */
    }
    tg_info h;
    int rc = check_header(head, len, &h, err); /* reads the 128 header bytes only */
    if (rc) {
        return rc;
    }
    size_t dir_end = (size_t)rd32(head + 80) + 16 * (size_t)rd32(head + 76); /* <= file_size */
    if (head_len < dir_end) {
        *nread = dir_end; /* then the directory */
        return ok(err);
    }
    rc = check_layout(head, &h, err);
    if (rc) {
        return rc;
    }
    *nread = (size_t)h.file_bytes; /* then the whole file */
    return ok(err);
}

void tg_get_info(const tg_model *m, tg_info *info) {
    *info = m->info;
}

uint32_t tg_pos(const tg_model *m) {
    return m->pos;
}

void tg_reset(tg_model *m) {
    m->pos = 0;
    m->has_logits = 0;
    m->verify_n = 0;
}

void tg_set_poll(tg_model *m, tg_poll_fn fn, void *ctx) {
    m->poll = fn;
    m->poll_ctx = ctx;
}

void tg_set_trace(tg_model *m, tg_trace_fn fn, void *ctx) {
    m->trace = fn;
    m->trace_ctx = ctx;
}

const float *tg_logits(const tg_model *m) {
    return m->has_logits ? m->logits : NULL;
}

const uint8_t *tg_tokenizer(const tg_model *m, uint32_t *len) {
    *len = m->info.tokenizer_bytes;
    return m->tokenizer;
}

const uint8_t *tg_meta(const tg_model *m, uint32_t *len) {
    *len = m->info.meta_bytes;
    return m->meta;
}

/* ---------------------------------------------------------------------------------------- */
/* 5. Forward pass                                                                          */
/* ---------------------------------------------------------------------------------------- */

#define TRACE(m, name, layer, pos, data, n, dtype)                                            \
    do {                                                                                       \
        if ((m)->trace) {                                                                      \
            (m)->trace((m)->trace_ctx, name, layer, pos, data, n, dtype);                      \
        }                                                                                      \
    } while (0)

/* Attention of one token at position p (its K and V already in the cache), head by head. Query
 * head hd reads key/value head hd / (n_head / n_kv_head): grouped-query attention (GPT-2 and
 * plain multi-head attention: n_kv_head = n_head; multi-query: n_kv_head = 1). */
static void attend(tg_model *m, uint32_t layer, uint32_t p, const float *qkv, float *out) {
    const tg_info *h = &m->info;
    uint32_t E = h->n_embd, D = h->head_dim, H = h->n_head, KV = h->n_kv_head, KVD = KV * D;
    uint32_t group = H / KV;
    const int8_t *k8 = m->k8 + (size_t)layer * h->n_ctx * KVD;
    const int8_t *v8 = m->v8 + (size_t)layer * h->n_ctx * KVD;
    const float *sk = m->sk + (size_t)layer * h->n_ctx * KV;
    const float *sv = m->sv + (size_t)layer * h->n_ctx * KV;
    float inv_sqrt_d = 1.0f / sqrtf((float)D);
    m->counters.macs += 2u * (uint64_t)E * (p + 1); /* q.k and the sum of v, over all heads */
    for (uint32_t hd = 0; hd < H; hd++) {
        uint32_t c = hd * D, g = hd / group, ckv = g * D;
        float sq = quantize(m->q8, qkv + c, D);
        float mx = -FLT_MAX;
        for (uint32_t j = 0; j <= p; j++) {
            int32_t acc = dot_i8(m->q8, k8 + (size_t)j * KVD + ckv, D);
            float s = ((float)acc * (sq * sk[(size_t)j * KV + g])) * inv_sqrt_d;
            m->scores[j] = s;
            if (s > mx) {
                mx = s;
            }
        }
        float sum = 0.0f;
        for (uint32_t j = 0; j <= p; j++) {
            m->scores[j] = exp32(m->scores[j] - mx);
            sum += m->scores[j];
        }
        float inv = 1.0f / sum;
        float *o = out + c;
        for (uint32_t i = 0; i < D; i++) {
            o[i] = 0.0f;
        }
        for (uint32_t j = 0; j <= p; j++) {
            float w = (m->scores[j] * inv) * sv[(size_t)j * KV + g];
            const int8_t *v = v8 + (size_t)j * KVD + ckv;
            for (uint32_t i = 0; i < D; i++) {
                o[i] += w * (float)v[i];
            }
        }
    }
}

/* matmul, counted: the nb rows share one read of the matrix, its scales and biases. */
static void linear(tg_model *m, float *y, uint32_t y_stride, const int8_t *xq, uint32_t x_stride,
                   const float *xs, uint32_t nb, const tg_qmat *W, uint32_t n_in, uint32_t n_out) {
    m->counters.weight_bytes += (uint64_t)n_out * n_in + 4u * (uint64_t)n_out * (W->b ? 2u : 1u);
    m->counters.macs += (uint64_t)nb * n_in * n_out;
    matmul_job job = {y, y_stride, xq, x_stride, xs, nb, W->w, W->s, W->b, n_in, n_out};
    matmul(m->workers, m->info.n_threads, &job);
}

/* The layer's normalization of one token's residual: LayerNorm (GPT-2) or RMSNorm (Llama). */
static void norm(const tg_model *m, float *y, const float *x, const float *g, const float *b) {
    const tg_info *h = &m->info;
    if (h->arch == TG_ARCH_LLAMA) {
        rmsnorm(y, x, g, h->n_embd, h->layer_norm_epsilon);
    } else {
        layernorm(y, x, g, b, h->n_embd, h->layer_norm_epsilon);
    }
}

/* One transformer layer for nb tokens at positions p0 .. p0+nb-1 (residual in m->x). GPT-2 and
 * Llama share it: they differ in the norm, the rotation of q and k (Llama), the number of
 * key/value heads and the MLP's activation (GELU of I values, or SwiGLU of 2I). */
static void layer_forward(tg_model *m, uint32_t l, uint32_t p0, uint32_t nb) {
    const tg_info *h = &m->info;
    const tg_layer *L = &m->layers[l];
    uint32_t E = h->n_embd, I = h->n_inner, D = h->head_dim;
    uint32_t KV = h->n_kv_head, KVD = KV * D, QKV = E + 2 * KVD;
    int llama = h->arch == TG_ARCH_LLAMA;
    uint32_t fc = llama ? 2 * I : I;
    uint32_t wide = QKV > fc ? QKV : fc, qwide = E > I ? E : I;
    int li = (int)l;

    /* attention block */
    for (uint32_t t = 0; t < nb; t++) {
        float *tmp = m->att + (size_t)t * E; /* att is free until attention runs */
        norm(m, tmp, m->x + (size_t)t * E, L->ln1_g, L->ln1_b);
        m->xs[t] = quantize(m->xq + (size_t)t * qwide, tmp, E);
        TRACE(m, "xq1", li, p0 + t, m->xq + (size_t)t * qwide, E, 1);
        TRACE(m, "xs1", li, p0 + t, &m->xs[t], 1, 2);
    }
    linear(m, m->buf, wide, m->xq, qwide, m->xs, nb, &L->attn, E, QKV);
    for (uint32_t t = 0; t < nb; t++) {
        uint32_t p = p0 + t;
        float *qkv = m->buf + (size_t)t * wide;
        size_t row = ((size_t)l * h->n_ctx + p);
        if (llama) {
            const float *cs = m->rope + (size_t)p * D;
            for (uint32_t c = 0; c < E + KVD; c += D) { /* every query head, then every key head */
                rope(qkv + c, cs, D);
            }
        }
        TRACE(m, "qkv", li, p, qkv, QKV, 2);
        for (uint32_t g = 0; g < KV; g++) {
            m->sk[row * KV + g] = quantize(m->k8 + row * KVD + g * D, qkv + E + g * D, D);
            m->sv[row * KV + g] = quantize(m->v8 + row * KVD + g * D, qkv + E + KVD + g * D, D);
        }
        TRACE(m, "k8", li, p, m->k8 + row * KVD, KVD, 1);
        TRACE(m, "sk", li, p, m->sk + row * KV, KV, 2);
        TRACE(m, "v8", li, p, m->v8 + row * KVD, KVD, 1);
        TRACE(m, "sv", li, p, m->sv + row * KV, KV, 2);
        float *out = m->att + (size_t)t * E;
        attend(m, l, p, qkv, out);
        m->xs[t] = quantize(m->xq + (size_t)t * qwide, out, E);
        TRACE(m, "aq", li, p, m->xq + (size_t)t * qwide, E, 1);
        TRACE(m, "as", li, p, &m->xs[t], 1, 2);
    }
    linear(m, m->att, E, m->xq, qwide, m->xs, nb, &L->proj, E, E);
    for (uint32_t t = 0; t < nb; t++) {
        float *x = m->x + (size_t)t * E, *y = m->att + (size_t)t * E;
        for (uint32_t i = 0; i < E; i++) {
            x[i] = x[i] + y[i];
        }
    }

    /* MLP block */
    for (uint32_t t = 0; t < nb; t++) {
        float *tmp = m->att + (size_t)t * E;
        norm(m, tmp, m->x + (size_t)t * E, L->ln2_g, L->ln2_b);
        m->xs[t] = quantize(m->xq + (size_t)t * qwide, tmp, E);
        TRACE(m, "xq2", li, p0 + t, m->xq + (size_t)t * qwide, E, 1);
        TRACE(m, "xs2", li, p0 + t, &m->xs[t], 1, 2);
    }
    linear(m, m->buf, wide, m->xq, qwide, m->xs, nb, &L->fc, E, fc);
    for (uint32_t t = 0; t < nb; t++) {
        float *f = m->buf + (size_t)t * wide;
        TRACE(m, "fc", li, p0 + t, f, fc, 2);
        if (llama) {
            for (uint32_t i = 0; i < I; i++) { /* SwiGLU: silu(gate) * up */
                f[i] = silu(f[i]) * f[I + i];
            }
        } else {
            for (uint32_t i = 0; i < I; i++) {
                f[i] = gelu(f[i], h->activation);
            }
        }
        m->xs[t] = quantize(m->xq + (size_t)t * qwide, f, I);
        TRACE(m, "gq", li, p0 + t, m->xq + (size_t)t * qwide, I, 1);
        TRACE(m, "gs", li, p0 + t, &m->xs[t], 1, 2);
    }
    linear(m, m->att, E, m->xq, qwide, m->xs, nb, &L->mproj, I, E);
    for (uint32_t t = 0; t < nb; t++) {
        float *x = m->x + (size_t)t * E, *y = m->att + (size_t)t * E;
        for (uint32_t i = 0; i < E; i++) {
            x[i] = x[i] + y[i];
        }
        TRACE(m, "h", li, p0 + t, x, E, 2);
    }
}

/* Final norm and the output head (tied: the token embedding) for the nb tokens whose residuals
 * are rows t0.. of m->x (positions p..), in one pass over the head's weights; logits to
 * out[nb][V]. */
static void head_forward(tg_model *m, uint32_t t0, uint32_t nb, uint32_t p, float *out) {
    const tg_info *h = &m->info;
    uint32_t E = h->n_embd, V = h->n_vocab;
    float *tmp = m->att;
    for (uint32_t t = 0; t < nb; t++) {
        norm(m, tmp, m->x + (size_t)(t0 + t) * E, m->lnf_g, m->lnf_b);
        m->xs[t] = quantize(m->xq + (size_t)t * E, tmp, E);
        TRACE(m, "fq", -1, p + t, m->xq + (size_t)t * E, E, 1);
        TRACE(m, "fs", -1, p + t, &m->xs[t], 1, 2);
    }
    m->counters.weight_bytes += (m->lnf_b ? 8u : 4u) * (uint64_t)E; /* final gain (and bias) */
    linear(m, out, V, m->xq, E, m->xs, nb, &m->head, E, V);
    for (uint32_t t = 0; t < nb; t++) {
        TRACE(m, "logits", -1, p + t, out + (size_t)t * V, V, 2);
    }
}

/* Embed nb tokens at positions p.. and run them through every layer: one forward pass, the
 * residuals left in m->x. Returns nonzero when the poll (between layers) asked to stop; the
 * model's pos, tokens and logits are not touched. */
static int forward_layers(tg_model *m, const int32_t *ids, uint32_t nb, uint32_t p) {
    const tg_info *h = &m->info;
    uint32_t E = h->n_embd;
    for (uint32_t t = 0; t < nb; t++) {
        uint32_t tok = (uint32_t)ids[t];
        const int8_t *wq = m->wte_q + (size_t)tok * E;
        float s = m->wte_s[tok];
        float *x = m->x + (size_t)t * E;
        if (m->wpe) { /* GPT-2: learned positions; Llama's are rotations, in the layers */
            const float *pe = m->wpe + (size_t)(p + t) * E;
            for (uint32_t i = 0; i < E; i++) {
                x[i] = (float)wq[i] * s + pe[i];
            }
        } else {
            for (uint32_t i = 0; i < E; i++) {
                x[i] = (float)wq[i] * s;
            }
        }
    }
    m->counters.passes++;
    m->counters.tokens += nb;
    /* per token: the wte row and scale, and the wpe row (GPT-2) or the rope row (Llama) */
    m->counters.weight_bytes += (uint64_t)nb * (E + 4u + 4u * (m->wpe ? E : h->head_dim));
    for (uint32_t l = 0; l < h->n_layer; l++) {
        if (m->poll && m->poll(m->poll_ctx)) {
            return 1;
        }
        /* the two norms' gains and biases (Llama: gains only) */
        m->counters.weight_bytes += (m->wpe ? 16u : 8u) * (uint64_t)E;
        layer_forward(m, l, p, nb);
    }
    return 0;
}

/* The checks of tg_prefill and tg_verify: n >= 1 valid ids that fit in the context. */
static int check_ids(const tg_model *m, const int32_t *ids, uint32_t n, const char *what,
                     tg_error *err) {
    if (!m || (!ids && n)) {
        return fail(err, TG_E_ARG, "no model or no token ids");
    }
    const tg_info *h = &m->info;
    if (n == 0) {
        return fail(err, TG_E_ARG, "%s needs at least one token", what);
    }
    if (n > h->n_ctx - m->pos) {
        return fail(err, TG_E_CONTEXT, "%u tokens do not fit: %u of the context's %u positions "
                    "are used", (unsigned)n, (unsigned)m->pos, (unsigned)h->n_ctx);
    }
    for (uint32_t i = 0; i < n; i++) {
        if (ids[i] < 0 || (uint32_t)ids[i] >= h->n_vocab) {
            return fail(err, TG_E_TOKEN, "token id %ld at index %u is outside 0..%u",
                        (long)ids[i], (unsigned)i, (unsigned)(h->n_vocab - 1));
        }
    }
    return TG_OK;
}

int tg_prefill(tg_model *m, const int32_t *ids, uint32_t n, tg_error *err) {
    int rc = check_ids(m, ids, n, "prefill", err);
    if (rc) {
        return rc;
    }
    const tg_info *h = &m->info;
    uint32_t p0 = m->pos;
    /* The model's pos and logits change only at the end: an interrupted prefill leaves the
     * context as it was (cache rows past pos are overwritten by the next call). */
    for (uint32_t start = 0; start < n; start += h->max_batch) {
        uint32_t nb = n - start < h->max_batch ? n - start : h->max_batch;
        uint32_t p = p0 + start;
        if (forward_layers(m, ids + start, nb, p)) {
            /* pos, tokens and logits are untouched until the head runs, after the last
             * poll: the previous logits stay valid */
            return fail(err, TG_E_INTERRUPTED, "interrupted; the context is unchanged");
        }
        if (start + nb == n) {
            head_forward(m, nb - 1, 1, p + nb - 1, m->logits);
        }
    }
    for (uint32_t i = 0; i < n; i++) {
        m->tokens[p0 + i] = ids[i];
    }
    m->pos = p0 + n;
    m->has_logits = 1;
    m->verify_n = 0;
    return ok(err);
}

int tg_step(tg_model *m, int32_t id, tg_error *err) {
    return tg_prefill(m, &id, 1, err);
}

/* ---------------------------------------------------------------------------------------- */
/* 6. Sampling (spec section 5)                                                             */
/* ---------------------------------------------------------------------------------------- */

static uint64_t splitmix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

void tg_seed(tg_model *m, uint64_t seed) {
    m->rng = splitmix64(seed);
    if (m->rng == 0) {
        m->rng = 1;
    }
}

static float rng_uniform(tg_model *m) { /* [0, 1) with 24 random bits */
    uint64_t x = m->rng;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    m->rng = x;
    uint64_t out = x * 0x2545F4914F6CDD1Dull;
    return (float)(uint32_t)(out >> 40) * (1.0f / 16777216.0f);
}

/* Order: higher probability first, smaller id first on ties; a total order, so the result
 * does not depend on the sort algorithm. */
static int before(const float *p, int32_t a, int32_t b) {
    return p[a] > p[b] || (p[a] == p[b] && a < b);
}

static void sift_down(int32_t *idx, const float *p, uint32_t root, uint32_t n) {
    for (;;) {
        uint32_t child = 2 * root + 1;
        if (child >= n) {
            return;
        }
        /* heap property: a parent comes before its children in the "before" order */
        if (child + 1 < n && before(p, idx[child + 1], idx[child])) {
            child++;
        }
        if (!before(p, idx[child], idx[root])) {
            return;
        }
        int32_t t = idx[root];
        idx[root] = idx[child];
        idx[child] = t;
        root = child;
    }
}

static void sort_by_prob(int32_t *idx, const float *p, uint32_t n) {
    /* heapsort with a min-heap of "before": repeatedly move the last-in-order to the end */
    if (n < 2) {
        return;
    }
    for (uint32_t i = n / 2; i-- > 0;) {
        sift_down(idx, p, i, n);
    }
    for (uint32_t end = n - 1; end > 0; end--) {
        int32_t t = idx[0];
        idx[0] = idx[end];
        idx[end] = t;
        sift_down(idx, p, 0, end);
    }
    /* the min-heap sort leaves the order reversed */
    for (uint32_t i = 0, j = n - 1; i < j; i++, j--) {
        int32_t t = idx[i];
        idx[i] = idx[j];
        idx[j] = t;
    }
}

/* Sample from logits, the repetition penalty counting tokens[0..n_hist); with a draft token
 * (draft >= 0), the draft-checking rule of tg_sample_at. */
/* The sampler in the steps of spec section 5, each its own function; sample_from runs them in
 * order. m->probs holds the working values, m->order the ids (and the repetition penalty's
 * "seen" marks before that). */
static int check_sampler(const tg_sampler *s, tg_error *err) {
    if (!(s->temperature >= 0.0f && s->temperature <= FLT_MAX)) {
        return fail(err, TG_E_ARG, "temperature must be finite and >= 0");
    }
    if (!(s->top_p > 0.0f && s->top_p <= 1.0f)) {
        return fail(err, TG_E_ARG, "top_p must be in (0, 1]");
    }
    if (!(s->repetition_penalty > 0.0f && s->repetition_penalty <= FLT_MAX)) {
        return fail(err, TG_E_ARG, "repetition_penalty must be finite and > 0");
    }
    return TG_OK;
}

/* Step 1: w = the logits, each distinct token of the first n_hist positions penalized once. */
static void penalize(tg_model *m, float *w, const float *logits, uint32_t n_hist, float penalty) {
    uint32_t V = m->info.n_vocab;
    memcpy(w, logits, 4 * (size_t)V);
    if (penalty == 1.0f) {
        return;
    }
    int32_t *seen = m->order;
    memset(seen, 0, 4 * (size_t)V);
    for (uint32_t i = 0; i < n_hist; i++) {
        int32_t t = m->tokens[i];
        if (!seen[t]) {
            seen[t] = 1;
            w[t] = w[t] > 0.0f ? w[t] / penalty : w[t] * penalty;
        }
    }
}

/* Step 2: the smallest id with the largest value. */
static int32_t greedy_id(const float *w, uint32_t V) {
    int32_t best = 0;
    for (uint32_t i = 1; i < V; i++) {
        if (w[i] > w[best]) {
            best = (int32_t)i;
        }
    }
    return best;
}

/* Step 3: w = softmax(w / temperature). Returns 0 when a quotient is not finite (a tiny
 * temperature or penalty overflowed float32): the distribution is then a spike on the largest
 * logit, i.e. greedy, and the softmax would give NaN. */
static int softmax_at(float *w, uint32_t V, float temperature) {
    float mx = -FLT_MAX;
    for (uint32_t i = 0; i < V; i++) {
        w[i] = w[i] / temperature;
        if (!(w[i] >= -FLT_MAX && w[i] <= FLT_MAX)) {
            return 0;
        }
        if (w[i] > mx) {
            mx = w[i];
        }
    }
    float sum = 0.0f;
    for (uint32_t i = 0; i < V; i++) {
        w[i] = exp32(w[i] - mx);
        sum += w[i];
    }
    float inv = 1.0f / sum;
    for (uint32_t i = 0; i < V; i++) {
        w[i] = w[i] * inv;
    }
    return 1;
}

/* Steps 4-5: idx = the ids (sorted by probability when top-k or top-p applies); returns how
 * many of them are kept. */
static uint32_t keep_top(int32_t *idx, const float *w, uint32_t V, const tg_sampler *s) {
    for (uint32_t i = 0; i < V; i++) {
        idx[i] = (int32_t)i;
    }
    uint32_t n = V;
    if (!((s->top_k > 0 && s->top_k < V) || s->top_p < 1.0f)) {
        return n;
    }
    sort_by_prob(idx, w, V);
    if (s->top_k > 0 && s->top_k < V) {
        n = s->top_k;
    }
    if (s->top_p < 1.0f) {
        float mass = 0.0f;
        for (uint32_t i = 0; i < n; i++) {
            mass += w[idx[i]];
        }
        float target = s->top_p * mass, cum = 0.0f;
        uint32_t keep = n;
        for (uint32_t i = 0; i < n; i++) {
            cum += w[idx[i]];
            if (cum >= target) {
                keep = i + 1;
                break;
            }
        }
        n = keep;
    }
    return n;
}

/* Steps 6-7: draw among the n kept ids; with a draft token (>= 0), accept it with probability
 * p(draft), else draw again from the kept ids without it, renormalised. */
static int32_t draw(tg_model *m, const int32_t *idx, const float *w, uint32_t n, int32_t draft) {
    float kept = 0.0f, p_draft = 0.0f;
    for (uint32_t i = 0; i < n; i++) {
        kept += w[idx[i]];
        if (idx[i] == draft) {
            p_draft = w[draft];
        }
    }
    float target = rng_uniform(m) * kept, cum = 0.0f;
    if (draft >= 0) {
        if (target < p_draft) {
            return draft;
        }
        float rest = 0.0f;
        for (uint32_t i = 0; i < n; i++) {
            rest += idx[i] == draft ? 0.0f : w[idx[i]];
        }
        target = rng_uniform(m) * rest;
    }
    int32_t pick = idx[n - 1];
    if (pick == draft && n > 1) {
        pick = idx[n - 2];
    }
    for (uint32_t i = 0; i < n; i++) {
        if (idx[i] == draft) {
            continue;
        }
        cum += w[idx[i]];
        if (cum > target) {
            return idx[i];
        }
    }
    return pick;
}

static int sample_from(tg_model *m, const float *logits, uint32_t n_hist, const tg_sampler *s,
                       int32_t draft, int32_t *out_id, tg_error *err) {
    int rc = check_sampler(s, err);
    if (rc) {
        return rc;
    }
    uint32_t V = m->info.n_vocab;
    float *w = m->probs;
    penalize(m, w, logits, n_hist, s->repetition_penalty);
    int32_t best = greedy_id(w, V);
    if (s->temperature == 0.0f || !softmax_at(w, V, s->temperature)) {
        *out_id = best;
        return ok(err);
    }
    uint32_t n = keep_top(m->order, w, V, s);
    *out_id = draw(m, m->order, w, n, draft);
    return ok(err);
}

int tg_sample(tg_model *m, const tg_sampler *s, int32_t *out_id, tg_error *err) {
    if (!m || !s || !out_id) {
        return fail(err, TG_E_ARG, "no model, sampler or output");
    }
    if (!m->has_logits) {
        return fail(err, TG_E_NO_LOGITS, "no logits yet: prefill or step first");
    }
    return sample_from(m, m->logits, m->pos, s, -1, out_id, err);
}

/* The kept logits of position at, or NULL. */
static const float *logits_at(const tg_model *m, uint32_t at) {
    if (at >= m->pos) {
        return NULL;
    }
    if (at + 1 == m->pos && m->has_logits) {
        return m->logits;
    }
    if (at >= m->verify_p0 && at - m->verify_p0 < m->verify_n) {
        return m->draft_logits + (size_t)(at - m->verify_p0) * m->info.n_vocab;
    }
    return NULL;
}

int tg_sample_at(tg_model *m, const tg_sampler *s, uint32_t at, int32_t draft, int32_t *out_id,
                 tg_error *err) {
    if (!m || !s || !out_id) {
        return fail(err, TG_E_ARG, "no model, sampler or output");
    }
    if (draft >= 0 && (uint32_t)draft >= m->info.n_vocab) {
        return fail(err, TG_E_TOKEN, "draft token id %ld is outside 0..%u", (long)draft,
                    (unsigned)(m->info.n_vocab - 1));
    }
    const float *lg = logits_at(m, at);
    if (!lg) {
        return fail(err, TG_E_NO_LOGITS, "no logits kept for position %u (the context holds %u "
                    "tokens; kept: the last one and the last verify's)", (unsigned)at,
                    (unsigned)m->pos);
    }
    return sample_from(m, lg, at + 1, s, draft < 0 ? -1 : draft, out_id, err);
}

/* ---------------------------------------------------------------------------------------- */
/* 7. Drafts: check several tokens in one pass, roll back                                   */
/* ---------------------------------------------------------------------------------------- */

int tg_verify(tg_model *m, const int32_t *ids, uint32_t n, float repetition_penalty,
              int32_t *choice, tg_error *err) {
    int rc = check_ids(m, ids, n, "verify", err);
    if (rc) {
        return rc;
    }
    if (n > m->info.max_draft) {
        return fail(err, TG_E_ARG, "verify takes at most max_draft = %u tokens, got %u",
                    (unsigned)m->info.max_draft, (unsigned)n);
    }
    if (!(repetition_penalty > 0.0f && repetition_penalty <= FLT_MAX)) {
        return fail(err, TG_E_ARG, "repetition_penalty must be finite and > 0");
    }
    uint32_t p0 = m->pos, V = m->info.n_vocab;
    if (forward_layers(m, ids, n, p0)) {
        return fail(err, TG_E_INTERRUPTED, "interrupted; the context is unchanged");
    }
    head_forward(m, 0, n, p0, m->draft_logits);
    for (uint32_t i = 0; i < n; i++) {
        m->tokens[p0 + i] = ids[i];
    }
    memcpy(m->logits, m->draft_logits + (size_t)(n - 1) * V, 4 * (size_t)V);
    m->pos = p0 + n;
    m->has_logits = 1;
    m->verify_p0 = p0;
    m->verify_n = n;
    if (choice) {
        tg_sampler greedy = {0.0f, 0, 1.0f, repetition_penalty};
        for (uint32_t i = 0; i < n; i++) {
            sample_from(m, m->draft_logits + (size_t)i * V, p0 + i + 1, &greedy, -1, &choice[i],
                        NULL);
        }
    }
    return ok(err);
}

int tg_rewind(tg_model *m, uint32_t pos, tg_error *err) {
    if (!m) {
        return fail(err, TG_E_ARG, "no model");
    }
    if (pos > m->pos) {
        return fail(err, TG_E_ARG, "cannot rewind to position %u: the context holds %u tokens",
                    (unsigned)pos, (unsigned)m->pos);
    }
    if (pos == m->pos) {
        return ok(err);
    }
    const float *lg = pos > 0 ? logits_at(m, pos - 1) : NULL;
    if (lg) {
        memcpy(m->logits, lg, 4 * (size_t)m->info.n_vocab);
    }
    m->has_logits = lg != NULL;
    m->pos = pos;
    /* rows of the last verify at or past pos are forgotten with their tokens */
    m->verify_n = pos > m->verify_p0 ? (pos - m->verify_p0 < m->verify_n
                                        ? pos - m->verify_p0 : m->verify_n) : 0;
    return ok(err);
}

void tg_get_counters(const tg_model *m, tg_counters *c) {
    *c = m->counters;
}

void tg_reset_counters(tg_model *m) {
    memset(&m->counters, 0, sizeof(m->counters));
}
