/*
 * printf, puts, putchar, snprintf and vsnprintf for the MCU test programs, writing through
 * semihosting (SYS_WRITE0).
 *
 * Why not newlib's: the prebuilt newlib of Debian's arm-none-eabi toolchain assumes the core
 * does misaligned accesses (its vfprintf stores a halfword at an odd stack offset), and
 * startup.c sets SCB->CCR.UNALIGN_TRP so that any misaligned access faults. These replace
 * the only libc functions the engine (tinygpt.c: vsnprintf, snprintf) and the test programs
 * format with; the linker takes them instead of newlib's.
 *
 * Supported: flags '-' and '0', a width, lengths l, ll, z, and conversions d i u x X p s c %.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "semihost.h"

typedef struct {
    char *buf;
    size_t cap; /* bytes buf can take, the terminating NUL included */
    size_t n;   /* characters produced (may exceed cap) */
} out_t;

static void emit(out_t *o, char c) {
    if (o->n + 1 < o->cap) {
        o->buf[o->n] = c;
    }
    o->n++;
}

static void emit_padded(out_t *o, const char *s, size_t len, int width, int left, char pad,
                        int sign_first) {
    size_t w = width > 0 ? (size_t)width : 0;
    if (!left && pad == '0' && sign_first && len > 0) { /* "-0012": sign before the zeros */
        emit(o, *s++);
        len--;
        w = w > 0 ? w - 1 : 0;
    }
    if (!left) {
        for (size_t i = len; i < w; i++) {
            emit(o, pad);
        }
    }
    for (size_t i = 0; i < len; i++) {
        emit(o, s[i]);
    }
    if (left) {
        for (size_t i = len; i < w; i++) {
            emit(o, ' ');
        }
    }
}

int vsnprintf(char *buf, size_t cap, const char *fmt, va_list ap) {
    out_t o = {buf, cap, 0};
    for (const char *f = fmt; *f; f++) {
        if (*f != '%') {
            emit(&o, *f);
            continue;
        }
        f++;
        int left = 0, width = 0, lng = 0;
        char pad = ' ';
        for (;; f++) {
            if (*f == '-') {
                left = 1;
            } else if (*f == '0') {
                pad = '0';
            } else {
                break;
            }
        }
        while (*f >= '0' && *f <= '9') {
            width = width * 10 + (*f++ - '0');
        }
        while (*f == 'l' || *f == 'z') {
            lng += *f == 'z' ? (sizeof(size_t) > sizeof(long) ? 2 : 1) : 1;
            f++;
        }
        char tmp[24];
        size_t len = 0;
        int neg = 0, base = 10, upper = 0;
        unsigned long long u = 0;
        switch (*f) {
            case 'd':
            case 'i': {
                long long v = lng >= 2 ? va_arg(ap, long long) : lng ? va_arg(ap, long) : va_arg(ap, int);
                neg = v < 0;
                u = neg ? 0ull - (unsigned long long)v : (unsigned long long)v;
                break;
            }
            case 'X':
                upper = 1;
                /* fall through */
            case 'x':
                base = 16;
                /* fall through */
            case 'u':
                u = lng >= 2 ? va_arg(ap, unsigned long long)
                    : lng ? va_arg(ap, unsigned long) : va_arg(ap, unsigned int);
                break;
            case 'p':
                u = (uintptr_t)va_arg(ap, void *);
                base = 16;
                emit(&o, '0');
                emit(&o, 'x');
                break;
            case 's': {
                const char *s = va_arg(ap, const char *);
                if (!s) {
                    s = "(null)";
                }
                emit_padded(&o, s, strlen(s), width, left, ' ', 0);
                continue;
            }
            case 'c':
                tmp[0] = (char)va_arg(ap, int);
                emit_padded(&o, tmp, 1, width, left, ' ', 0);
                continue;
            case '%':
                emit(&o, '%');
                continue;
            default: /* unknown conversion: print it as is */
                emit(&o, '%');
                if (!*f) {
                    f--;
                } else {
                    emit(&o, *f);
                }
                continue;
        }
        char digits[24];
        size_t nd = 0;
        do {
            unsigned d = (unsigned)(u % (unsigned)base);
            digits[nd++] = (char)(d < 10 ? '0' + d : (upper ? 'A' : 'a') + d - 10);
            u /= (unsigned)base;
        } while (u);
        if (neg) {
            tmp[len++] = '-';
        }
        while (nd) {
            tmp[len++] = digits[--nd];
        }
        emit_padded(&o, tmp, len, width, left, left ? ' ' : pad, neg);
    }
    if (cap) {
        buf[o.n < cap ? o.n : cap - 1] = 0;
    }
    return (int)o.n;
}

int snprintf(char *buf, size_t cap, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, cap, fmt, ap);
    va_end(ap);
    return n;
}

static char line[512] __attribute__((aligned(4)));

int printf(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
    semihost_write0(line);
    return n;
}

int puts(const char *s) {
    semihost_write0(s);
    semihost_write0("\n");
    return 1;
}

int putchar(int c) {
    char s[2] = {(char)c, 0};
    semihost_write0(s);
    return c;
}
