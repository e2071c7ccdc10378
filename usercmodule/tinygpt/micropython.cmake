# tinygpt user C module, for CMake-based MicroPython ports (esp32, rp2):
#   make -C ports/esp32 USER_C_MODULES=/path/to/tinygpt/usercmodule/micropython.cmake
add_library(usermod_tinygpt INTERFACE)

# The port layer (tg_port.h), chosen per port; a board may force one with
# set(TINYGPT_PORT arena|posix|esp32) in its mpconfigboard.cmake:
#   esp32  ESP-IDF: buffers in PSRAM (heap_caps), models mapped from a flash partition
#   arena  a static arena, models mapped from memory regions (bare metal, e.g. rp2; the board
#          sizes it with target_compile_definitions(usermod_tinygpt INTERFACE TG_ARENA_SIZE=...))
#   posix  malloc, models read from files
if(NOT TINYGPT_PORT)
    if(IDF_TARGET)
        set(TINYGPT_PORT esp32)
    else()
        set(TINYGPT_PORT arena)
    endif()
endif()
if(NOT EXISTS ${CMAKE_CURRENT_LIST_DIR}/tg_port_${TINYGPT_PORT}.c)
    message(FATAL_ERROR "TINYGPT_PORT=${TINYGPT_PORT}: no port layer tg_port_${TINYGPT_PORT}.c (use esp32, arena or posix)")
endif()

target_sources(usermod_tinygpt INTERFACE
    ${CMAKE_CURRENT_LIST_DIR}/modtinygpt.c
    ${CMAKE_CURRENT_LIST_DIR}/tinygpt.c
    ${CMAKE_CURRENT_LIST_DIR}/tg_port_${TINYGPT_PORT}.c
)
target_include_directories(usermod_tinygpt INTERFACE ${CMAKE_CURRENT_LIST_DIR})
# The model format fixes every float32 rounding: no fused multiply-add.
target_compile_options(usermod_tinygpt INTERFACE -ffp-contract=off)
target_link_libraries(usermod INTERFACE usermod_tinygpt)
