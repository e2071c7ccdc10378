# The tinygpt scripts to freeze into a firmware, for any port and board. A board's manifest
# includes this after the port's defaults, e.g. boards/TINYGPT_S3_N16R8/manifest.py:
#   include("$(PORT_DIR)/boards/manifest.py")   # what the port freezes by default
#   include("$(BOARD_DIR)/../../micropython_mod")
# It includes no port manifest itself: not every port has $(PORT_DIR)/boards/manifest.py
# (unix and qemu have none), and a board may want none of the port's defaults.
#
# The on-device scripts, compiled to bytecode that runs from flash (no RAM for the code, no parse
# at import): `import chat` works with an empty filesystem. A chat.py or bpe.py copied to the
# filesystem (`tinygpt deploy`) comes first on sys.path and overrides these.
# A relative path is resolved against this manifest's directory (tools/manifestfile.py changes
# into it while running a manifest), so this works whatever the board directory is.
freeze("../py", ("chat.py", "bpe.py", "sptok.py", "draft.py", "topic.py", "retrieve.py", "selftest.py"))
