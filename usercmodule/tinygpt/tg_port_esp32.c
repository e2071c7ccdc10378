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
 *   NOT VERIFIED ON A CHIP: this project cannot build or run ESP-IDF firmware; it is written
 *   against the ESP-IDF v5 API and reviewed by hand. scripts/check-esp32 compiles it for Xtensa
 *   (clang and gcc, IDF's warnings as errors, uint32_t as long) against declaration-only IDF
 *   headers (tests/esp32_stubs/) and checks its undefined symbols; it is not linked or run.
 *
 * Review notes against the ESP-IDF v5 documentation (ESP32-S3):
 * - Flash and PSRAM share one SPI bus, MMU and cache (both cores). The weights (flash, through
 *   the mapping) and the KV cache and activations (PSRAM) compete for that bus, so the second
 *   core speeds up the memory-bound matmuls by less than 2x. While flash is erased or written
 *   (a file write to the VFS partition, NVS) IDF disables the cache and stalls the other core:
 *   inference pauses meanwhile, correctly, since neither task runs from IRAM-only code.
 * - The MMU maps external memory into a 32 MB data window shared by the app's rodata, every
 *   flash mapping and the PSRAM (when CONFIG_SPIRAM maps it there), in 64 KB pages. A model
 *   partition larger than what is left (say 16 MB flash model + 8-16 MB PSRAM) makes
 *   esp_partition_mmap fail (ESP_ERR_NO_MEM); tg_port_map then logs why and returns -1, and
 *   the caller tries `name` as a file (see tg_port_map).
 * - Task watchdog: the helper is not subscribed to it (only tasks that call esp_task_wdt_add
 *   are), and it blocks on a semaphore after every job (one matmul's rows, milliseconds), so
 *   the idle task of its core runs between jobs and CONFIG_ESP_TASK_WDT_CHECK_IDLE_TASK_CPUx
 *   (5 s by default) is never starved by it. A single job longer than the watchdog period
 *   (a matmul of seconds) would starve that idle task; none is near that.
 * - Stack: IDF's stack depths are in bytes. The helper's deepest path (matmul_part ->
 *   matmul_rows, ~150 bytes in xtensa-lx106-elf-gcc -O2 -fstack-usage) plus the windowed-ABI
 *   spill areas, the interrupt frame and the FPU save area IDF keeps on a task's stack fit in
 *   HELPER_STACK_BYTES with a wide margin; uxTaskGetStackHighWaterMark(w->helper) on a chip is
 *   the way to confirm it.
 * - Core pinning: the MicroPython task (and the threads of _thread) are pinned to one core
 *   (MP_TASK_COREID), so xPortGetCoreID() at load is the core every later tg_step runs on and
 *   the helper, pinned to the other core at the caller's priority, never shares a core with
 *   it. If a Model were created on one core and used from a task on the other, both would
 *   share a core: correct, just not faster.
 */
#include <inttypes.h>
#include <string.h>

#include "esp_err.h"
#include "esp_heap_caps.h"
#include "esp_log.h"
#include "esp_partition.h"
#include "freertos/FreeRTOS.h"
#include "freertos/semphr.h"
#include "freertos/task.h"

#include "tg_port.h"

static const char *TAG = "tinygpt";

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
        return -1; /* no such partition (or not in the partition table): the caller reads
                    * `name` as a file, and its error (no such file) is what the user sees */
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
    esp_err_t err = esp_partition_mmap(part, 0, file_size, ESP_PARTITION_MMAP_DATA, &ptr, &m->handle);
    if (err != ESP_OK) {
        /* Typically ESP_ERR_NO_MEM: not enough free pages in the 32 MB data window (see the
         * top of this file). Say so: the caller's fallback (a file named `name`) then fails
         * with a message that does not mention the partition. */
        ESP_LOGE(TAG, "cannot map partition '%s' (%" PRIu32 " bytes): %s", name, file_size,
                 esp_err_to_name(err));
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
#define HELPER_STACK_BYTES 4096 /* bytes (IDF); the matmul path needs a few hundred, see the top */

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
