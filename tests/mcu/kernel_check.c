/*
 * The engine's matmul (whichever dot_rows kernel TG_DOT_KERNEL selects) against a plain loop,
 * bit for bit, on shapes and alignments the models do not cover: every n_in from 1 to 67 and
 * some past the DSP kernel's 256-input chunk and 1024-input lane buffer, n_out 1 to 7 (rows
 * left over after the kernel's groups), batches of 1 to 5 tokens, activation rows at odd
 * strides and offsets, weights at every offset modulo 4, int8 values over the whole range;
 * each case computed whole or (at random) in the three row ranges of three matmul workers.
 *
 * Built on the PC (tests/test_kernel.py, kernels 1 and 2, with sanitizers) and for the
 * Cortex-M4F under QEMU (kernels 2 and 3), where startup.c makes every misaligned word access
 * fault: a kernel that loads words without checking their alignment fails there.
 * Prints "kernel_check: <n> cases, all equal" and returns 0, or the first difference and 1.
 */
#include "tinygpt.c" /* matmul_part and dot_rows are static */

#define MAX_IN 1100
#define MAX_OUT 7
#define MAX_NB 5

static int8_t xbuf[MAX_NB * (MAX_IN + 20) + 16] __attribute__((aligned(16)));
static int8_t wbuf[MAX_OUT * MAX_IN + 16] __attribute__((aligned(16)));
static float y[MAX_NB * (MAX_OUT + 1)], y_ref[MAX_NB * (MAX_OUT + 1)];
static float xs[MAX_NB], sw[MAX_OUT], bias[MAX_OUT];

static uint32_t rng_state = 12345u;

static uint32_t rnd(void) { /* xorshift32 */
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 17;
    rng_state ^= rng_state << 5;
    return rng_state;
}

/* spec 4.4 written out plainly */
static void matmul_ref(float *out, uint32_t y_stride, const int8_t *xq, uint32_t x_stride,
                       uint32_t nb, const int8_t *w, const float *b, uint32_t n_in, uint32_t n_out) {
    for (uint32_t t = 0; t < nb; t++) {
        for (uint32_t o = 0; o < n_out; o++) {
            int32_t acc = 0;
            for (uint32_t i = 0; i < n_in; i++) {
                acc += (int32_t)xq[(size_t)t * x_stride + i] * (int32_t)w[(size_t)o * n_in + i];
            }
            float scale = xs[t] * sw[o];
            float v = (float)acc * scale;
            out[(size_t)t * y_stride + o] = b ? v + b[o] : v;
        }
    }
}

static int check(uint32_t n_in, uint32_t n_out, uint32_t nb, uint32_t x_extra, uint32_t x_off,
                 uint32_t w_off, int with_bias) {
    uint32_t x_stride = n_in + x_extra, y_stride = n_out + 1;
    int8_t *xq = xbuf + x_off, *w = wbuf + w_off;
    for (size_t i = 0; i < (size_t)nb * x_stride; i++) {
        xq[i] = (int8_t)(rnd() >> 24);
    }
    for (size_t i = 0; i < (size_t)n_out * n_in; i++) {
        w[i] = (int8_t)(rnd() >> 24);
    }
    if ((rnd() & 7u) == 0) { /* extremes: the largest products, both signs */
        for (size_t i = 0; i < (size_t)n_out * n_in; i++) {
            w[i] = (i & 1u) ? 127 : -128;
        }
        for (size_t i = 0; i < (size_t)nb * x_stride; i++) {
            xq[i] = -128;
        }
    }
    for (uint32_t t = 0; t < nb; t++) {
        xs[t] = (float)(rnd() % 1000u + 1u) / 65536.0f;
    }
    for (uint32_t o = 0; o < n_out; o++) {
        sw[o] = (float)(rnd() % 1000u + 1u) / 32768.0f;
        bias[o] = (float)((int32_t)(rnd() % 2001u) - 1000) / 4096.0f;
    }
    const float *b = with_bias ? bias : NULL;
    memset(y, 0, sizeof(y));
    memset(y_ref, 0, sizeof(y_ref));
    /* n_parts 1 is a single-threaded matmul; 3 cuts the rows as three workers would
     * (tinygpt.c matmul_part), run one after another here */
    uint32_t n_parts = (rnd() & 1u) ? 3 : 1;
    matmul_job job = {y, y_stride, xq, x_stride, xs, nb, w, sw, b, n_in, n_out};
    for (uint32_t part = 0; part < n_parts; part++) {
        matmul_part(&job, part, n_parts);
    }
    matmul_ref(y_ref, y_stride, xq, x_stride, nb, w, b, n_in, n_out);
    if (memcmp(y, y_ref, sizeof(y)) != 0) {
        for (size_t i = 0; i < sizeof(y) / sizeof(y[0]); i++) {
            if (memcmp(&y[i], &y_ref[i], sizeof(float)) != 0) {
                printf("DIFFERENT n_in %u n_out %u nb %u x_stride %u x_off %u w_off %u bias %d "
                       "parts %u: output %u\n", (unsigned)n_in, (unsigned)n_out, (unsigned)nb,
                       (unsigned)x_stride, (unsigned)x_off, (unsigned)w_off, with_bias,
                       (unsigned)n_parts, (unsigned)i);
                break;
            }
        }
        return 1;
    }
    return 0;
}

int main(void) {
    static const uint32_t big[] = {128, 252, 256, 260, 512, 516, 768, 1020, 1024, 1028, 1100};
    uint32_t cases = 0;
    for (uint32_t n_in = 1; n_in <= 67 + sizeof(big) / sizeof(big[0]); n_in++) {
        uint32_t n = n_in <= 67 ? n_in : big[n_in - 68];
        for (uint32_t n_out = 1; n_out <= MAX_OUT; n_out++) {
            for (uint32_t nb = 1; nb <= MAX_NB; nb += 2) {
                for (uint32_t off = 0; off < 4; off++) {
                    uint32_t x_extra = (off + n) % 3 ? 16 - (n % 16) : 0; /* stride mod 16 == 0 or not */
                    if (check(n, n_out, nb, x_extra + (off & 1u), off, (off * 3u) & 3u, (int)(off & 1u)) ||
                        check(n, n_out, nb, 0, 0, 0, 1)) {
                        return 1;
                    }
                    cases += 2;
                }
            }
        }
    }
    printf("kernel_check: TG_DOT_KERNEL %d, DOT_ROWS %d: %lu cases, all equal\n", TG_DOT_KERNEL,
           DOT_ROWS, (unsigned long)cases);
    return 0;
}
