/*
 * Port layer for hosted C (Linux, macOS, the MicroPython unix port): plain malloc.
 *
 * tg_port_fail_after lets tests inject allocation failure: when it is >= 0, that many further
 * allocations succeed and the next one fails (then it goes back to -1).
 */
#include <stdlib.h>

#include "tg_port.h"

int tg_port_fail_after = -1;

void *tg_port_alloc(size_t nbytes) {
    if (tg_port_fail_after == 0) {
        tg_port_fail_after = -1;
        return NULL;
    }
    if (tg_port_fail_after > 0) {
        tg_port_fail_after--;
    }
    /* glibc and most hosted libcs return 16-byte aligned blocks on 64-bit systems; the engine
     * checks alignment of what it gets and fails cleanly otherwise. */
    return malloc(nbytes ? nbytes : 1);
}

void tg_port_free(void *p) {
    free(p);
}

/* A PC has no flash partitions: model files are read or memory-mapped by the caller. */
int tg_port_map(const char *name, const uint8_t **data, size_t *len, void **handle) {
    (void)name;
    (void)data;
    (void)len;
    (void)handle;
    return -1;
}

void tg_port_unmap(void *handle) {
    (void)handle;
}
