# The TINYGPT_QEMU board's memory map (mpconfigboard.mk has the same numbers) and what
# `tinygpt emulate` tells the board. selftest.py prints these; _boot.py mounts the filesystem.
import uctypes

NAME = "TINYGPT_QEMU (QEMU mps2-an500, Cortex-M7)"
ARENA_ADDR = 0x60000000  # the engine's arena, in the PSRAM-like region
ARENA_SIZE = 0x00800000
MODEL_ADDR = 0x60800000  # Model("model") maps the file loaded here
MODEL_SIZE = 0x00800000
FS_ADDR = 0x20000000  # littlefs on RAM: lost when QEMU stops
FS_SIZE = 0x00400000 - 0x1000
FLAGS_ADDR = 0x203FFFFC  # written by `tinygpt emulate` (QEMU -device loader,data=...)
ICOUNT_FLAG = 0x49434E54  # "ICNT": QEMU runs with -icount shift=0 (one instruction per ns)
INSN_PER_US = 1000  # under -icount shift=0, time.ticks_us() counts thousands of instructions


def _flags():
    return int.from_bytes(uctypes.bytearray_at(FLAGS_ADDR, 4), "little")


def icount():
    """True when QEMU counts instructions (`tinygpt emulate --icount`)."""
    return _flags() == ICOUNT_FLAG
