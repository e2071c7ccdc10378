# tinygpt user C module, for Make-based MicroPython ports (unix, qemu, ...):
#   make -C ports/unix USER_C_MODULES=/path/to/tinygpt/usercmodule
TINYGPT_MOD_DIR := $(USERMOD_DIR)

# The port layer (tg_port.h): where the engine's working memory comes from and how a model is
# mapped. A board picks one in its mpconfigboard.mk:
#   posix  malloc, models read from files (the unix port; the default)
#   arena  a static arena, models mapped from memory regions (bare-metal boards without a C
#          library heap, e.g. boards/TINYGPT_QEMU, which also sets TG_ARENA_ADDR/TG_ARENA_SIZE)
# (The ESP32's heap_caps + partition layer is chosen by micropython.cmake: the esp32 port
# builds with CMake.)
TINYGPT_PORT ?= posix
ifeq ($(wildcard $(TINYGPT_MOD_DIR)/tg_port_$(TINYGPT_PORT).c),)
$(error TINYGPT_PORT=$(TINYGPT_PORT): no port layer $(TINYGPT_MOD_DIR)/tg_port_$(TINYGPT_PORT).c (use posix or arena))
endif

SRC_USERMOD_C += $(TINYGPT_MOD_DIR)/modtinygpt.c
SRC_USERMOD_LIB_C += $(TINYGPT_MOD_DIR)/tinygpt.c $(TINYGPT_MOD_DIR)/tg_port_$(TINYGPT_PORT).c

# The model format fixes every float32 rounding: no fused multiply-add.
CFLAGS_USERMOD += -I$(TINYGPT_MOD_DIR) -ffp-contract=off
