/*
 * Port layer for ESP-IDF (the MicroPython esp32 port on an ESP32-S3 with PSRAM).
 *
 * - Working memory (KV cache, activations, a model read from a file) goes to PSRAM with
 *   heap_caps_aligned_alloc, outside MicroPython's GC heap. The esp32 port grows its GC heap
 *   into PSRAM on demand, so the model is best loaded early (import chat at boot) while PSRAM
 *   is still free; tg_free in Model.__del__/close() gives the memory back.
 * - Model("model") maps the flash data partition labelled "model" with esp_partition_mmap:
 *   the weights stay in flash and are read through the cache, zero copy, leaving PSRAM for
 *   the KV cache and the heap.
 */
#include <string.h>

#include "esp_heap_caps.h"
#include "esp_partition.h"

#include "tg_port.h"

void *tg_port_alloc(size_t nbytes) {
    if (nbytes == 0) {
        nbytes = 1;
    }
    void *p = heap_caps_aligned_alloc(16, nbytes, MALLOC_CAP_SPIRAM | MALLOC_CAP_8BIT);
    if (!p) { /* no PSRAM (or full): internal RAM, fine for small models */
        p = heap_caps_aligned_alloc(16, nbytes, MALLOC_CAP_8BIT);
    }
    return p;
}

void tg_port_free(void *p) {
    if (p) {
        heap_caps_free(p);
    }
}

typedef struct {
    esp_partition_mmap_handle_t handle;
} tg_map;

int tg_port_map(const char *name, const uint8_t **data, size_t *len, void **handle) {
    const esp_partition_t *part =
        esp_partition_find_first(ESP_PARTITION_TYPE_DATA, ESP_PARTITION_SUBTYPE_ANY, name);
    if (!part) {
        return -1; /* no such partition: the caller reads `name` as a file */
    }
    /* Map only the model file, whose size is in its header (bytes 12..15); an erased or
     * foreign partition maps its first 128 bytes and fails tg_load's checks with a message. */
    uint8_t hdr[16];
    if (esp_partition_read(part, 0, hdr, sizeof(hdr)) != ESP_OK) {
        return -1;
    }
    uint32_t file_size;
    memcpy(&file_size, hdr + 12, 4);
    if (memcmp(hdr, "TGPT", 4) != 0 || file_size > part->size || file_size < 128) {
        file_size = 128;
    }
    tg_map *m = heap_caps_malloc(sizeof(tg_map), MALLOC_CAP_8BIT);
    if (!m) {
        return -1;
    }
    const void *ptr;
    if (esp_partition_mmap(part, 0, file_size, ESP_PARTITION_MMAP_DATA, &ptr, &m->handle) != ESP_OK) {
        heap_caps_free(m);
        return -1;
    }
    *data = (const uint8_t *)ptr;
    *len = file_size;
    *handle = m;
    return 0;
}

void tg_port_unmap(void *handle) {
    tg_map *m = (tg_map *)handle;
    if (m) {
        esp_partition_munmap(m->handle);
        heap_caps_free(m);
    }
}
