/* Declaration-only stand-in for ESP-IDF's freertos/semphr.h, written from the FreeRTOS
 * semaphore API documentation for scripts/check-esp32. Not FreeRTOS code. As in FreeRTOS the
 * semaphore calls are macros over the queue functions (the documented expansions), so the
 * object's undefined symbols are the ones a real build links against. */
#ifndef TG_STUB_FREERTOS_SEMPHR_H
#define TG_STUB_FREERTOS_SEMPHR_H

#ifndef INC_FREERTOS_H
#error "include FreeRTOS.h before semphr.h"
#endif

#include "queue.h"

typedef QueueHandle_t SemaphoreHandle_t;

#define xSemaphoreCreateBinary() \
    xQueueGenericCreate((UBaseType_t)1, (UBaseType_t)0, queueQUEUE_TYPE_BINARY_SEMAPHORE)
#define xSemaphoreTake(xSemaphore, xBlockTime) xQueueSemaphoreTake((xSemaphore), (xBlockTime))
#define xSemaphoreGive(xSemaphore) \
    xQueueGenericSend((QueueHandle_t)(xSemaphore), NULL, (TickType_t)0U, queueSEND_TO_BACK)
#define vSemaphoreDelete(xSemaphore) vQueueDelete((QueueHandle_t)(xSemaphore))

#endif
