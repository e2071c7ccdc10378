/* Extras of the static-arena port layer (tg_port_arena.c) beyond tg_port.h. */
#ifndef TG_PORT_ARENA_H
#define TG_PORT_ARENA_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    uint32_t size;        /* arena bytes */
    uint32_t used;        /* bytes in use now, headers included */
    uint32_t peak;        /* most bytes ever in use */
    uint32_t live_blocks; /* allocations not yet freed */
    uint32_t bad_frees;   /* frees of pointers the arena never handed out (should stay 0) */
} tg_arena_stats;

/* Makes `data` (len bytes) available to tg_port_map(name, ...). Returns 0, or -1 when full. */
int tg_port_arena_add_region(const char *name, const uint8_t *data, size_t len);
void tg_port_arena_stats(tg_arena_stats *s);

#endif
