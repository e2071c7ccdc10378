# Frozen modules of the tinygpt firmware (boards/TINYGPT_S3_N16R8/mpconfigboard.cmake sets
# MICROPY_FROZEN_MANIFEST to this file). Usable for any port/board as
#   make ... FROZEN_MANIFEST=<repo>/micropython_mod/manifest.py
#
# Everything the port freezes by default (_boot.py, inisetup.py, asyncio, the networking bundle,
# ...): $(PORT_DIR) is the port being built.
include("$(PORT_DIR)/boards/manifest.py")

# The on-device scripts, compiled to bytecode that runs from flash (no RAM for the code, no parse
# at import): `import chat` works with an empty filesystem. A chat.py or bpe.py copied to the
# filesystem (`tinygpt deploy`) comes first on sys.path and overrides these.
# A relative path is resolved against this manifest's directory (tools/manifestfile.py changes
# into it while running a manifest), so this works whatever the board directory is.
freeze("../py", ("chat.py", "bpe.py"))
