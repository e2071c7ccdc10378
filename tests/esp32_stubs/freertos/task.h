/* Declaration-only stand-in for ESP-IDF's freertos/task.h (with the IDF additions it pulls
 * in, e.g. xTaskCreatePinnedToCore), written from the ESP-IDF v5 FreeRTOS documentation for
 * scripts/check-esp32. Not IDF or FreeRTOS code: it declares only what
 * usercmodule/tinygpt/tg_port_esp32.c uses; nothing here is linked or run. */
#ifndef TG_STUB_FREERTOS_TASK_H
#define TG_STUB_FREERTOS_TASK_H

#ifndef INC_FREERTOS_H
#error "include FreeRTOS.h before task.h"
#endif

typedef struct tskTaskControlBlock *TaskHandle_t;

#define tskNO_AFFINITY ((BaseType_t)0x7FFFFFFF)
#define tskIDLE_PRIORITY ((UBaseType_t)0U)

/* usStackDepth is in bytes on IDF (StackType_t is uint8_t). */
BaseType_t xTaskCreatePinnedToCore(TaskFunction_t pxTaskCode, const char *const pcName,
                                   const uint32_t ulStackDepth, void *const pvParameters,
                                   UBaseType_t uxPriority, TaskHandle_t *const pxCreatedTask,
                                   const BaseType_t xCoreID);
void vTaskDelete(TaskHandle_t xTaskToDelete);
void vTaskDelay(const TickType_t xTicksToDelay);
UBaseType_t uxTaskPriorityGet(const TaskHandle_t xTask);
TaskHandle_t xTaskGetCurrentTaskHandle(void);
UBaseType_t uxTaskGetStackHighWaterMark(TaskHandle_t xTask);

#endif
