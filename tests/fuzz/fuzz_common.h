/* Helpers shared by the libFuzzer targets in tests/fuzz/. */
#ifndef TG_FUZZ_COMMON_H
#define TG_FUZZ_COMMON_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <sanitizer/asan_interface.h>

/* A 16-byte aligned copy of data[0:size] whose bytes past `size` (up to the 16-byte round-up)
 * are poisoned, so AddressSanitizer reports a read even one byte past the input. */
static uint8_t *fuzz_aligned_copy(const uint8_t *data, size_t size, size_t *alloc) {
    *alloc = (size + 15u) & ~(size_t)15u;
    if (*alloc == 0) {
        *alloc = 16;
    }
    uint8_t *buf = (uint8_t *)aligned_alloc(16, *alloc);
    if (!buf) {
        abort();
    }
    if (size) {
        memcpy(buf, data, size);
    }
    ASAN_POISON_MEMORY_REGION(buf + size, *alloc - size);
    return buf;
}

static void fuzz_free_copy(uint8_t *buf, size_t alloc) {
    ASAN_UNPOISON_MEMORY_REGION(buf, alloc);
    free(buf);
}

/* An engine invariant broke: report and abort (libFuzzer saves the input as a crash). */
#define FUZZ_CHECK(cond, ...)                                                                 \
    do {                                                                                       \
        if (!(cond)) {                                                                         \
            fprintf(stderr, "FUZZ_CHECK failed at %s:%d: %s: ", __FILE__, __LINE__, #cond);   \
            fprintf(stderr, __VA_ARGS__);                                                      \
            fprintf(stderr, "\n");                                                             \
            abort();                                                                           \
        }                                                                                      \
    } while (0)

#endif
