// tinygpt: ESP32-S3 with 16 MiB flash and 8 MiB octal PSRAM (N16R8).
#define MICROPY_HW_BOARD_NAME               "tinygpt ESP32-S3 N16R8"
#define MICROPY_HW_MCU_NAME                 "ESP32-S3"

// As the generic ESP32-S3 board: the REPL on native USB (TinyUSB CDC) and on UART0, for
// DevKitC-style boards whose second USB port is a USB-UART bridge.
#define MICROPY_HW_ENABLE_UART_REPL         (1)

#define MICROPY_HW_I2C0_SCL                 (9)
#define MICROPY_HW_I2C0_SDA                 (8)
