/*
 * Port layer: the only place the engine touches the platform.
 *
 * The engine asks for all its working memory (activations, KV cache, sampling buffers) once,
 * at load, and gives it back in tg_free. A port decides where that memory lives: malloc on a
 * PC (tg_port_posix.c), PSRAM via heap_caps_malloc on the ESP32, or a static arena on a bare
 * microcontroller. Allocations must be at least 16-byte aligned.
 */
#ifndef TG_PORT_H
#define TG_PORT_H

#include <stddef.h>
#include <stdint.h>

void *tg_port_alloc(size_t nbytes); /* NULL on failure */
void tg_port_free(void *p);         /* p may be NULL */

/* Map a read-only region holding a model file, named by `name` (on the ESP32: the label of a
 * flash data partition, mapped with esp_partition_mmap, zero copy). Returns 0 and fills
 * *data, *len and *handle, or nonzero when the port has no such region (the caller then
 * reads `name` as a file). */
int tg_port_map(const char *name, const uint8_t **data, size_t *len, void **handle);
void tg_port_unmap(void *handle);

/* Workers for the matmuls (tinygpt.c splits each matrix's output rows between them).
 * tg_port_workers_start(n) starts n - 1 helpers; the caller is the n-th worker. It runs at load,
 * the helpers wait between jobs, and tg_port_workers_stop (at tg_free) ends and joins them: no
 * thread is created or memory allocated while tokens are computed. tg_port_workers_run calls
 * fn(ctx, i, n_parts) exactly once for every part i in [0, n_parts), on any of the workers (the
 * caller included), and returns when all have returned. fn touches only the engine's buffers:
 * it never calls into MicroPython. tg_port_max_workers() is how many workers the port can run
 * (1: no threads, start is never called); start returns NULL when it could not start them. */
typedef void (*tg_work_fn)(void *ctx, uint32_t part, uint32_t n_parts);
typedef struct tg_workers tg_workers;

uint32_t tg_port_max_workers(void);
tg_workers *tg_port_workers_start(uint32_t n);
void tg_port_workers_run(tg_workers *w, tg_work_fn fn, void *ctx, uint32_t n_parts);
void tg_port_workers_stop(tg_workers *w); /* w may be NULL */

#endif
