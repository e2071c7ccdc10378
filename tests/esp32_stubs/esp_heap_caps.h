/* Declaration-only stand-in for ESP-IDF's esp_heap_caps.h, written from the ESP-IDF v5 API
 * documentation (Heap Memory Allocation reference) for scripts/check-esp32. Not IDF code: it
 * declares only what usercmodule/tinygpt/tg_port_esp32.c uses; nothing here is linked or run. */
#ifndef TG_STUB_ESP_HEAP_CAPS_H
#define TG_STUB_ESP_HEAP_CAPS_H

#include <stddef.h>
#include <stdint.h>

/* Capability bits (the caps argument of heap_caps_*). */
#define MALLOC_CAP_EXEC (1 << 0)
#define MALLOC_CAP_32BIT (1 << 1)
#define MALLOC_CAP_8BIT (1 << 2)
#define MALLOC_CAP_DMA (1 << 3)
#define MALLOC_CAP_SPIRAM (1 << 10)
#define MALLOC_CAP_INTERNAL (1 << 11)
#define MALLOC_CAP_DEFAULT (1 << 12)

void *heap_caps_malloc(size_t size, uint32_t caps);
void *heap_caps_calloc(size_t n, size_t size, uint32_t caps);
void *heap_caps_aligned_alloc(size_t alignment, size_t size, uint32_t caps);
void heap_caps_free(void *ptr);
size_t heap_caps_get_free_size(uint32_t caps);
size_t heap_caps_get_largest_free_block(uint32_t caps);

#endif
