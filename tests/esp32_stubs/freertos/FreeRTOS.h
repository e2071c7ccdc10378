/* Declaration-only stand-in for ESP-IDF's freertos/FreeRTOS.h (with the Xtensa port's
 * portmacro.h types and the IDF FreeRTOSConfig values it pulls in), written from the ESP-IDF
 * v5 FreeRTOS documentation for scripts/check-esp32. Not IDF or FreeRTOS code: it declares
 * only what usercmodule/tinygpt/tg_port_esp32.c uses; nothing here is linked or run. */
#ifndef INC_FREERTOS_H
#define INC_FREERTOS_H

#include <stddef.h>
#include <stdint.h>

/* Xtensa port types: BaseType_t is int; with the default 32-bit ticks TickType_t is
 * uint32_t; IDF's stack depths are in bytes. */
typedef uint8_t StackType_t;
typedef int BaseType_t;
typedef unsigned int UBaseType_t;
typedef uint32_t TickType_t;

#define portMAX_DELAY ((TickType_t)0xffffffffUL)

/* From sdkconfig: CONFIG_FREERTOS_NUMBER_OF_CORES (2 on the ESP32-S3 unless unicore). */
#ifndef CONFIG_FREERTOS_NUMBER_OF_CORES
#define CONFIG_FREERTOS_NUMBER_OF_CORES 2
#endif
#ifndef CONFIG_FREERTOS_HZ
#define CONFIG_FREERTOS_HZ 100
#endif
#define configNUMBER_OF_CORES CONFIG_FREERTOS_NUMBER_OF_CORES
#define portNUM_PROCESSORS configNUMBER_OF_CORES
#define configTICK_RATE_HZ CONFIG_FREERTOS_HZ
#define portTICK_PERIOD_MS ((TickType_t)1000 / configTICK_RATE_HZ)
#define configSTACK_DEPTH_TYPE uint32_t

#define pdFALSE ((BaseType_t)0)
#define pdTRUE ((BaseType_t)1)
#define pdPASS pdTRUE
#define pdFAIL pdFALSE
#define pdMS_TO_TICKS(ms) ((TickType_t)(((TickType_t)(ms) * (TickType_t)configTICK_RATE_HZ) / (TickType_t)1000U))

typedef void (*TaskFunction_t)(void *);

/* The core the caller runs on (0 or 1). An always-inline function in IDF's portmacro.h, a
 * plain declaration here (scripts/check-esp32's symbol list allows it). */
BaseType_t xPortGetCoreID(void);

#endif
