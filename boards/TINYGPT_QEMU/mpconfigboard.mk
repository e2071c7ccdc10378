# tinygpt on an emulated microcontroller: MicroPython's qemu port on QEMU's mps2-an500 board
# (Arm Cortex-M7, single-precision FPU like the ESP32-S3's), with the tinygpt C module, the py/
# scripts frozen, and a RAM filesystem. From the tinygpt repository, with MicroPython (v1.24 or
# newer, no submodules needed) cloned at ./micropython:
#   make -C micropython/ports/qemu BOARD_DIR=$PWD/boards/TINYGPT_QEMU USER_C_MODULES=$PWD/usercmodule
# then `tinygpt emulate` (firmware: micropython/ports/qemu/build-TINYGPT_QEMU/firmware.elf).
#
# Memory map (QEMU mps2-an500):
#   0x00000000  4 MiB  ZBT SSRAM1: firmware, GC heap (MICROPY_HEAP_SIZE), stack
#   0x20000000  4 MiB  ZBT SSRAM2/3: RAM filesystem (littlefs, 4 MiB - 4 KiB), last word: flags
#                      set by `tinygpt emulate` (tinygpt_board.py)
#   0x60000000 16 MiB  PSRAM: the engine's arena (8 MiB, like the ESP32-S3's PSRAM), then the
#                      model region (8 MiB at 0x60800000), which `tinygpt emulate` fills with
#                      the model file and Model("model") maps, like the ESP32's "model" partition
# The RAM filesystem lives as long as QEMU runs: soft resets keep it, stopping QEMU loses it.

BOARD = TINYGPT_QEMU
QEMU_ARCH = arm
QEMU_MACHINE = mps2-an500

CFLAGS += -mthumb -mcpu=cortex-m7 -mfloat-abi=hard -mfpu=fpv5-sp-d16
CFLAGS += -DQEMU_SOC_MPS2
CFLAGS += -DMICROPY_HW_MCU_NAME='"Cortex-M7"'
LDSCRIPT = mcu/arm/mps2.ld
SRC_BOARD_O = shared/runtime/gchelper_native.o shared/runtime/gchelper_thumb2.o
MPY_CROSS_FLAGS += -march=armv7emsp

# Single-precision floats and sqrtf in hardware, as on the ESP32-S3 (the stock MPS2_AN500 board
# uses doubles).
MICROPY_FLOAT_IMPL = float
SUPPORTS_HARDWARE_FP_SINGLE = 1

# A 1.5 MiB GC heap, as MicroPython gets from a board's PSRAM (megabytes; the ESP32 port puts its
# heap there). The model and the engine's buffers live outside it. 256 KB was enough until a model
# file carried its corpus's word index (py/retrieve.py): the shipped corpus's 182 KB index needs
# about 0.8 MB of free heap while chat.load reads it (measured by bisection, host_tools/tinygpt/
# board.py INDEX_HEAP_PER_BYTE), and a smaller heap cannot show that a model fits.
MICROPY_HEAP_SIZE = 1572864

# The engine: static-arena port layer (usercmodule/tinygpt/tg_port_arena.c) in the PSRAM.
TINYGPT_PORT = arena
TINYGPT_ARENA_ADDR = 0x60000000
TINYGPT_ARENA_SIZE = 0x00800000
TINYGPT_MODEL_ADDR = 0x60800000
TINYGPT_MODEL_SIZE = 0x00800000
CFLAGS += -DTG_ARENA_ADDR=$(TINYGPT_ARENA_ADDR) -DTG_ARENA_SIZE=$(TINYGPT_ARENA_SIZE)
CFLAGS += -DTINYGPT_MODEL_ADDR=$(TINYGPT_MODEL_ADDR) -DTINYGPT_MODEL_SIZE=$(TINYGPT_MODEL_SIZE)
# (The engine's messages use vsnprintf: MicroPython's shared/libc/printf.c, over mp_vprintf.)

# board.c: registers the model region and mounts the filesystem at every boot
# (MICROPY_PORT_INIT_FUNC), and delivers Ctrl-C while Python or the engine runs (the port polls
# the UART only when it reads input, so it wraps the SysTick interrupt and the stdin functions).
SRC_C += $(BOARD_DIR)/board.c
CFLAGS += -include $(BOARD_DIR)/board.h -I$(TOP)/ports/qemu
LDFLAGS += --wrap=SysTick_Handler --wrap=mp_hal_stdin_rx_chr --wrap=mp_hal_stdio_poll

# littlefs (in MicroPython's tree, not a submodule) for the RAM filesystem.
MICROPY_VFS_LFS2 = 1

# Frozen: the board's boot code and the tinygpt scripts, nothing from micropython-lib. The port's
# default manifest require()s unittest, and the frozen-content rule insists on the micropython-lib
# submodule even when nothing is required; pointing MPY_LIB_DIR at a directory of our own keeps
# the build working on a tree without submodules (and out of `make submodules`).
FROZEN_MANIFEST = $(BOARD_DIR)/manifest.py
MPY_LIB_DIR = $(BOARD_DIR)/no-micropython-lib
