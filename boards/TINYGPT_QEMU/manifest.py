# Frozen modules of the TINYGPT_QEMU firmware (FROZEN_MANIFEST in mpconfigboard.mk). No port
# manifest: the qemu port's default freezes test modules and require()s micropython-lib.
freeze(".", ("_boot.py", "tinygpt_board.py"))
include("../../micropython_mod/manifest.py")
