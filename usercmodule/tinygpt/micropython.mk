# tinygpt user C module, for Make-based MicroPython ports (unix, ...):
#   make -C ports/unix USER_C_MODULES=/path/to/tinygpt/usercmodule
TINYGPT_MOD_DIR := $(USERMOD_DIR)

SRC_USERMOD_C += $(TINYGPT_MOD_DIR)/modtinygpt.c
SRC_USERMOD_LIB_C += $(TINYGPT_MOD_DIR)/tinygpt.c $(TINYGPT_MOD_DIR)/tg_port_posix.c

# The model format fixes every float32 rounding: no fused multiply-add.
CFLAGS_USERMOD += -I$(TINYGPT_MOD_DIR) -ffp-contract=off
