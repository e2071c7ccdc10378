# Frozen modules of the tinygpt ESP32-S3 firmware (mpconfigboard.cmake sets
# MICROPY_FROZEN_MANIFEST to this file).
#
# Everything the esp32 port freezes by default (_boot.py, inisetup.py, asyncio, the networking
# bundle, ...), then the tinygpt scripts.
include("$(PORT_DIR)/boards/manifest.py")
include("../../micropython_mod/manifest.py")
