/*
 * Port layer for a bare microcontroller without malloc: one static arena (tg_port.h).
 * MicroPython boards select it with TINYGPT_PORT = arena in their mpconfigboard.mk.
 *
 * Blocks are carved from the arena in order, each behind a 16-byte header, so every block is
 * 16-byte aligned. Freeing marks a block free; free blocks at the top are given back at once,
 * so the engine's pattern (everything at load, everything freed in reverse in tg_free) leaves
 * the arena empty again. A free block below a live one waits until the blocks above it go.
 *
 * Memory regions (a model file linked into flash, or a RAM region a debugger or emulator
 * loads it into) are registered by name with tg_port_arena_add_region and handed out by
 * tg_port_map, as the ESP32 port hands out a flash partition. As there, only the model file
 * is mapped, its length read from its header; a region without a model file maps its first
 * 128 bytes, which fail tg_load's checks with a message.
 *
 * TG_ARENA_SIZE (bytes, default 2 MiB) sizes the arena. It is a static array in the linker
 * section TG_ARENA_SECTION (default ".noinit": not zeroed at startup, the engine needs no
 * zeroes), or, when TG_ARENA_ADDR is defined, the memory at that address (external RAM that
 * the linker script does not know about, like the ESP32-S3's PSRAM).
 */
#include <stdint.h>
#include <string.h>

#include "tg_port.h"
#include "tg_port_arena.h"

#ifndef TG_ARENA_SIZE
#define TG_ARENA_SIZE (2u * 1024u * 1024u)
#endif
#ifndef TG_ARENA_SECTION
#define TG_ARENA_SECTION ".noinit"
#endif

typedef struct {
    uint32_t size;  /* payload bytes, a multiple of 16 */
    uint32_t prev;  /* offset of the previous block's header, or UINT32_MAX for the first */
    uint32_t used;  /* 1 while allocated */
    uint32_t magic; /* HDR_MAGIC: catches a free of a pointer the arena never gave out */
} hdr_t;

#define HDR_MAGIC 0x7A6E4172u

#ifdef TG_ARENA_ADDR
#define arena ((uint8_t *)(uintptr_t)(TG_ARENA_ADDR))
#else
static uint8_t arena[TG_ARENA_SIZE] __attribute__((aligned(16), section(TG_ARENA_SECTION)));
#endif
static uint32_t top;                    /* first free byte */
static uint32_t last = UINT32_MAX;      /* header offset of the topmost block */
static uint32_t peak, live_blocks, bad_frees;

void *tg_port_alloc(size_t nbytes) {
    size_t need = (nbytes + 15u) & ~(size_t)15u;
    if (nbytes > TG_ARENA_SIZE || need + sizeof(hdr_t) > (size_t)TG_ARENA_SIZE - top) {
        return NULL;
    }
    hdr_t *h = (hdr_t *)(void *)(arena + top);
    h->size = (uint32_t)need;
    h->prev = last;
    h->used = 1;
    h->magic = HDR_MAGIC;
    last = top;
    top += (uint32_t)(sizeof(hdr_t) + need);
    if (top > peak) {
        peak = top;
    }
    live_blocks++;
    return h + 1;
}

void tg_port_free(void *p) {
    if (!p) {
        return;
    }
    uint8_t *b = (uint8_t *)p;
    hdr_t *h = (hdr_t *)(void *)b - 1;
    if (b < arena + sizeof(hdr_t) || b > arena + top || ((uintptr_t)b & 15u) != 0 ||
        h->magic != HDR_MAGIC || !h->used) {
        bad_frees++;
        return;
    }
    h->used = 0;
    live_blocks--;
    while (last != UINT32_MAX) {
        hdr_t *t = (hdr_t *)(void *)(arena + last);
        if (t->used) {
            break;
        }
        t->magic = 0;
        top = last;
        last = t->prev;
    }
}

#define MAX_REGIONS 4

static struct {
    const char *name;
    const uint8_t *data;
    size_t len;
} regions[MAX_REGIONS];

int tg_port_arena_add_region(const char *name, const uint8_t *data, size_t len) {
    for (int i = 0; i < MAX_REGIONS; i++) { /* a name registered again (soft reboot) is replaced */
        if (!regions[i].name || strcmp(regions[i].name, name) == 0) {
            regions[i].name = name;
            regions[i].data = data;
            regions[i].len = len;
            return 0;
        }
    }
    return -1;
}

int tg_port_map(const char *name, const uint8_t **data, size_t *len, void **handle) {
    for (int i = 0; i < MAX_REGIONS; i++) {
        if (regions[i].name && name && strcmp(regions[i].name, name) == 0) {
            /* The file's size is in its header (bytes 12..15, little-endian). */
            const uint8_t *d = regions[i].data;
            size_t file_size = regions[i].len < 16 ? 0 :
                (size_t)d[12] | (size_t)d[13] << 8 | (size_t)d[14] << 16 | (size_t)d[15] << 24;
            if (file_size < 128 || file_size > regions[i].len || memcmp(d, "TGPT", 4) != 0) {
                file_size = regions[i].len < 128 ? regions[i].len : 128;
            }
            *data = d;
            *len = file_size;
            *handle = (void *)&regions[i]; /* nothing to undo: the region stays mapped */
            return 0;
        }
    }
    return -1;
}

void tg_port_unmap(void *handle) {
    (void)handle;
}

void tg_port_arena_stats(tg_arena_stats *s) {
    s->size = TG_ARENA_SIZE;
    s->used = top;
    s->peak = peak;
    s->live_blocks = live_blocks;
    s->bad_frees = bad_frees;
}

/* Bare metal: no threads, so the caller is the only worker (tg_port.h). */
uint32_t tg_port_max_workers(void) {
    return 1;
}

tg_workers *tg_port_workers_start(uint32_t n) {
    (void)n;
    return NULL;
}

void tg_port_workers_run(tg_workers *w, tg_work_fn fn, void *ctx, uint32_t n_parts) {
    (void)w;
    for (uint32_t i = 0; i < n_parts; i++) {
        fn(ctx, i, n_parts);
    }
}

void tg_port_workers_stop(tg_workers *w) {
    (void)w;
}
