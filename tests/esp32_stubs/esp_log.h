/* Declaration-only stand-in for ESP-IDF's esp_log.h, written from the ESP-IDF v5 API
 * documentation (Logging library reference) for scripts/check-esp32. Not IDF code: only the
 * error/warning/info macros, with the documented "E (<ms>) <tag>: <message>" line format, so
 * that -Werror=format checks the arguments as IDF's printf-attributed esp_log_write does. */
#ifndef TG_STUB_ESP_LOG_H
#define TG_STUB_ESP_LOG_H

#include <inttypes.h>
#include <stdint.h>

typedef enum {
    ESP_LOG_NONE,
    ESP_LOG_ERROR,
    ESP_LOG_WARN,
    ESP_LOG_INFO,
    ESP_LOG_DEBUG,
    ESP_LOG_VERBOSE,
} esp_log_level_t;

uint32_t esp_log_timestamp(void);
void esp_log_write(esp_log_level_t level, const char *tag, const char *format, ...)
    __attribute__((format(printf, 3, 4)));

#define TG_STUB_LOG(level, letter, tag, format, ...) \
    esp_log_write(level, tag, letter " (%" PRIu32 ") %s: " format "\n", esp_log_timestamp(), \
                  tag, ##__VA_ARGS__)
#define ESP_LOGE(tag, format, ...) TG_STUB_LOG(ESP_LOG_ERROR, "E", tag, format, ##__VA_ARGS__)
#define ESP_LOGW(tag, format, ...) TG_STUB_LOG(ESP_LOG_WARN, "W", tag, format, ##__VA_ARGS__)
#define ESP_LOGI(tag, format, ...) TG_STUB_LOG(ESP_LOG_INFO, "I", tag, format, ##__VA_ARGS__)

#endif
