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
 * - Model(..., n_threads=2) on a dual-core chip (ESP32, ESP32-S3) gives each matmul's second
 *   half of output rows to a FreeRTOS task pinned to the core MicroPython does not run on (the
 *   esp32 port runs its task on core 1 unless built unicore; the helper takes the other one,
 *   found at load with xPortGetCoreID). The helper blocks on a semaphore between jobs and only
 *   runs engine code on the engine's buffers: it never calls into MicroPython, so the GIL and
 *   the GC never see it. Both cores read PSRAM and flash through the ESP32-S3's shared cache.
 *   Each job costs a semaphore hand-over (tens of microseconds), small against a matmul of a
 *   real model on the chip (milliseconds).
 *   NOT VERIFIED: this project cannot build or run ESP-IDF code; it is written against the
 *   ESP-IDF v5 FreeRTOS API and reviewed by hand only.
 */
#include <string.h>

#include "esp_heap_caps.h"
#include "esp_partition.h"
#include "freertos/FreeRTOS.h"
#include "freertos/semphr.h"
#include "freertos/task.h"

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

/* ---- workers: one helper task on the other core (see the top of this file) ---------------- */
#define HELPER_STACK_BYTES 4096 /* dot_rows and store_outputs need a few hundred bytes */

struct tg_workers {
    uint32_t n; /* 2: the caller and the helper */
    TaskHandle_t helper;
    SemaphoreHandle_t go, done; /* binary semaphores: job handed out, job (or stop) finished */
    tg_work_fn fn;
    void *ctx;
    uint32_t n_parts; /* the helper runs the odd parts, the caller the even ones */
    volatile int stop;
};

static void helper_task(void *p) {
    tg_workers *w = (tg_workers *)p;
    for (;;) {
        xSemaphoreTake(w->go, portMAX_DELAY); /* a barrier: fn, ctx and the inputs are visible */
        if (w->stop) {
            break;
        }
        for (uint32_t i = 1; i < w->n_parts; i += 2) {
            w->fn(w->ctx, i, w->n_parts);
        }
        xSemaphoreGive(w->done);
    }
    xSemaphoreGive(w->done);
    vTaskDelete(NULL);
}

uint32_t tg_port_max_workers(void) {
    return portNUM_PROCESSORS; /* 1 on single-core chips (ESP32-S2, C3): no helper */
}

tg_workers *tg_port_workers_start(uint32_t n) {
    if (n != 2 || portNUM_PROCESSORS < 2) {
        return NULL;
    }
    tg_workers *w = heap_caps_calloc(1, sizeof(tg_workers), MALLOC_CAP_INTERNAL | MALLOC_CAP_8BIT);
    if (!w) {
        return NULL;
    }
    w->n = n;
    w->go = xSemaphoreCreateBinary();
    w->done = xSemaphoreCreateBinary();
    BaseType_t other_core = xPortGetCoreID() == 0 ? 1 : 0;
    if (!w->go || !w->done ||
        xTaskCreatePinnedToCore(helper_task, "tinygpt", HELPER_STACK_BYTES, w,
                                uxTaskPriorityGet(NULL), &w->helper, other_core) != pdPASS) {
        if (w->go) {
            vSemaphoreDelete(w->go);
        }
        if (w->done) {
            vSemaphoreDelete(w->done);
        }
        heap_caps_free(w);
        return NULL;
    }
    return w;
}

void tg_port_workers_run(tg_workers *w, tg_work_fn fn, void *ctx, uint32_t n_parts) {
    w->fn = fn;
    w->ctx = ctx;
    w->n_parts = n_parts;
    xSemaphoreGive(w->go);
    for (uint32_t i = 0; i < n_parts; i += 2) {
        fn(ctx, i, n_parts);
    }
    xSemaphoreTake(w->done, portMAX_DELAY); /* a barrier: the helper's outputs are visible */
}

void tg_port_workers_stop(tg_workers *w) {
    if (!w) {
        return;
    }
    w->stop = 1;
    xSemaphoreGive(w->go);
    xSemaphoreTake(w->done, portMAX_DELAY); /* the helper has left its loop */
    vSemaphoreDelete(w->go);
    vSemaphoreDelete(w->done);
    heap_caps_free(w);
}
