# tinygpt board: an ESP32-S3 module with 16 MiB quad flash and 8 MiB octal PSRAM
# (ESP32-S3-WROOM-1-N16R8 / DevKitC-1 N16R8), MicroPython's esp32 port + the tinygpt C module.
#
# Out-of-tree board for ports/esp32 (MicroPython >= 1.24):
#   make -C <micropython>/ports/esp32 BOARD_DIR=<repo>/boards/TINYGPT_S3_N16R8 \
#        USER_C_MODULES=<repo>/usercmodule/micropython.cmake
# or `tinygpt firmware build --micropython <micropython>`, which checks the tree and ESP-IDF first.

# Start from the port's own generic ESP32-S3 board: it sets IDF_TARGET and the SDKCONFIG_DEFAULTS
# list of this MicroPython version (sdkconfig.base, BLE, USB, quad SPIRAM support, ...), whose
# names changed between releases (1.24: spiram_sx + usb; later: mpconfigboard_esp32s3_common.cmake
# + spiram_quad). Our fragments come after it and win where they set the same option.
include(${CMAKE_CURRENT_SOURCE_DIR}/boards/ESP32_GENERIC_S3/mpconfigboard.cmake)

# ESP-IDF resolves a relative CONFIG_PARTITION_TABLE_CUSTOM_FILENAME against ports/esp32, which
# cannot reach an out-of-tree board, and the sdkconfig fragments are copied verbatim (no CMake
# variables). So this one line is generated with the absolute path of our table.
set(TINYGPT_PARTITION_FRAGMENT ${CMAKE_BINARY_DIR}/sdkconfig.tinygpt_partitions)
file(WRITE ${TINYGPT_PARTITION_FRAGMENT}
    "CONFIG_PARTITION_TABLE_CUSTOM=y\nCONFIG_PARTITION_TABLE_CUSTOM_FILENAME=\"${MICROPY_BOARD_DIR}/partitions-tinygpt.csv\"\n")

list(APPEND SDKCONFIG_DEFAULTS
    boards/sdkconfig.240mhz
    boards/sdkconfig.spiram_oct
    ${MICROPY_BOARD_DIR}/sdkconfig.board
    ${TINYGPT_PARTITION_FRAGMENT}
)

# Freeze the port's default modules and the tinygpt scripts (py/).
set(MICROPY_FROZEN_MANIFEST ${MICROPY_BOARD_DIR}/manifest.py)

# The tinygpt C module. Normally given on the make command line (USER_C_MODULES=...); this
# default makes `make BOARD_DIR=<repo>/boards/TINYGPT_S3_N16R8` alone build the same firmware.
if(NOT USER_C_MODULES)
    set(USER_C_MODULES ${MICROPY_BOARD_DIR}/../../usercmodule/micropython.cmake)
endif()
