# tinygpt user C module, for CMake-based MicroPython ports (esp32, rp2):
#   make -C ports/esp32 USER_C_MODULES=/path/to/tinygpt/usercmodule/micropython.cmake
add_library(usermod_tinygpt INTERFACE)

if(IDF_TARGET)
    # ESP-IDF: buffers in PSRAM, models mapped from a flash partition.
    set(TINYGPT_PORT ${CMAKE_CURRENT_LIST_DIR}/tg_port_esp32.c)
else()
    set(TINYGPT_PORT ${CMAKE_CURRENT_LIST_DIR}/tg_port_posix.c)
endif()

target_sources(usermod_tinygpt INTERFACE
    ${CMAKE_CURRENT_LIST_DIR}/modtinygpt.c
    ${CMAKE_CURRENT_LIST_DIR}/tinygpt.c
    ${TINYGPT_PORT}
)
target_include_directories(usermod_tinygpt INTERFACE ${CMAKE_CURRENT_LIST_DIR})
# The model format fixes every float32 rounding: no fused multiply-add.
target_compile_options(usermod_tinygpt INTERFACE -ffp-contract=off)
target_link_libraries(usermod INTERFACE usermod_tinygpt)
