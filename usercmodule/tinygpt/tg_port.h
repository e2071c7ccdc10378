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

#endif
