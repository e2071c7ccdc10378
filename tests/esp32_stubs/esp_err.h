/* Declaration-only stand-in for ESP-IDF's esp_err.h, written from the ESP-IDF v5 API
 * documentation (Error Codes reference) for scripts/check-esp32. Not IDF code: it declares
 * only what usercmodule/tinygpt/tg_port_esp32.c uses; nothing here is ever linked or run. */
#ifndef TG_STUB_ESP_ERR_H
#define TG_STUB_ESP_ERR_H

#include <stdint.h>

typedef int esp_err_t; /* documented: esp_err_t is a signed int */

#define ESP_OK 0
#define ESP_FAIL -1
#define ESP_ERR_NO_MEM 0x101
#define ESP_ERR_INVALID_ARG 0x102
#define ESP_ERR_INVALID_SIZE 0x104
#define ESP_ERR_NOT_FOUND 0x105

const char *esp_err_to_name(esp_err_t code);

#endif
