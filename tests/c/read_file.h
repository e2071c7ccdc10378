/*
 * read_file.h: the one file reader of the C checks (engine_check.c, threads_check.c). Header-only
 * so that each check still builds from one command line (the tests compile them as they are).
 */
#ifndef TG_TESTS_READ_FILE_H
#define TG_TESTS_READ_FILE_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

/* The whole file in a 16-byte-aligned buffer (the engine's alignment for a model in memory);
 * NULL when it cannot be opened or read. *len gets its size. */
static uint8_t *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        return NULL;
    }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    if (n < 0) {
        fclose(f);
        return NULL;
    }
    uint8_t *buf = aligned_alloc(16, ((size_t)n + 15) & ~(size_t)15);
    if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    *len = (size_t)n;
    return buf;
}

#endif
