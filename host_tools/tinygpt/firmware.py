"""`tinygpt firmware build`: build MicroPython for the tinygpt board, with the tinygpt C module.

    tinygpt firmware build --micropython ~/src/micropython            # runs the build
    tinygpt firmware build --micropython ~/src/micropython --dry-run  # prints the command only

It checks first, with a message that says what to do:
  * DIR is a MicroPython source tree (py/mpconfig.h and ports/esp32/ exist) of version >= 1.24
    (read from MICROPY_VERSION_MAJOR/MINOR in py/mpconfig.h; out-of-tree BOARD_DIR boards and the
    esp32 port's ESP-IDF 5.x builds this board relies on);
  * ESP-IDF is active: IDF_PATH is set to an existing directory and idf.py is on PATH (what
    `. $IDF_PATH/export.sh` does);
then runs, from anywhere:
    make -C DIR/ports/esp32 BOARD_DIR=<repo>/boards/TINYGPT_S3_N16R8 \\
         USER_C_MODULES=<repo>/usercmodule/micropython.cmake
which writes DIR/ports/esp32/build-TINYGPT_S3_N16R8/firmware.bin (flash it with
`tinygpt flash --port P --firmware .../firmware.bin`). A first build of a fresh clone also needs
`make -C DIR/mpy-cross` and `make -C DIR/ports/esp32 BOARD_DIR=... submodules`; the hint is printed.

The PC build of the same module (MicroPython's unix port; no ESP-IDF needed), e.g. for
tests/test_micropython_module.py and tests/test_chat.py with MICROPY_BIN=DIR/ports/unix/build-standard/micropython:
    make -C DIR/ports/unix USER_C_MODULES=<repo>/usercmodule
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from .board import BoardError

REPO = Path(__file__).resolve().parents[2]
BOARDS_DIR = REPO / "boards"
USER_C_MODULES_CMAKE = REPO / "usercmodule" / "micropython.cmake"
USER_C_MODULES_MAKE = REPO / "usercmodule"
MIN_VERSION = (1, 24)
DEFAULT_BOARD = "TINYGPT_S3_N16R8"


class FirmwareError(BoardError):
    pass


def micropython_version(mpy_dir) -> tuple[int, int, int]:
    """(major, minor, micro) of a MicroPython source tree; FirmwareError if it is not one."""
    d = Path(mpy_dir).expanduser()
    if not d.exists():
        raise FirmwareError("%s: no such directory (give --micropython the root of a MicroPython "
                            "source clone)" % d)
    if not d.is_dir():
        raise FirmwareError("%s: not a directory (give --micropython the root of a MicroPython source clone)" % d)
    h = d / "py" / "mpconfig.h"
    if not h.exists() or not (d / "ports" / "esp32").is_dir():
        raise FirmwareError("%s: not a MicroPython source tree (no py/mpconfig.h and ports/esp32/); clone it with "
                            "`git clone https://github.com/micropython/micropython` and give its root" % d)
    text = h.read_text(errors="replace")
    got = {}
    for part in ("MAJOR", "MINOR", "MICRO"):
        m = re.search(r"^#define\s+MICROPY_VERSION_%s\s+\(?(\d+)\)?" % part, text, re.M)
        if m:
            got[part] = int(m.group(1))
    if "MAJOR" not in got or "MINOR" not in got:
        raise FirmwareError("%s: cannot read MICROPY_VERSION_MAJOR/MINOR; not a MicroPython source tree?" % h)
    return got["MAJOR"], got["MINOR"], got.get("MICRO", 0)


def check_micropython(mpy_dir) -> tuple[int, int, int]:
    v = micropython_version(mpy_dir)
    if v[:2] < MIN_VERSION:
        raise FirmwareError("MicroPython %d.%d.%d in %s is too old: the tinygpt board needs >= %d.%d "
                            "(check out a newer release, e.g. `git checkout v1.24.1`)"
                            % (v + (mpy_dir,) + MIN_VERSION))
    return v


def check_idf(env=None) -> tuple[Path, str]:
    """(IDF_PATH, idf.py path) when ESP-IDF is active; FirmwareError saying how to activate it."""
    env = os.environ if env is None else env
    how = ("install ESP-IDF 5.x (the version your MicroPython's ports/esp32/README.md names) and "
           "run `. <esp-idf>/export.sh` in this shell")
    idf = env.get("IDF_PATH")
    if not idf:
        raise FirmwareError("ESP-IDF is not active: IDF_PATH is not set; " + how)
    if not Path(idf).is_dir():
        raise FirmwareError("ESP-IDF is not active: IDF_PATH=%s is not a directory; %s" % (idf, how))
    idf_py = shutil.which("idf.py", path=env.get("PATH", ""))
    if not idf_py:
        raise FirmwareError("ESP-IDF is not active: idf.py is not on PATH (IDF_PATH=%s); %s" % (idf, how))
    return Path(idf), idf_py


def idf_version(idf_path) -> str | None:
    f = Path(idf_path) / "tools" / "cmake" / "version.cmake"
    try:
        text = f.read_text()
    except OSError:
        return None
    parts = [re.search(r"IDF_VERSION_%s\s+(\d+)" % k, text) for k in ("MAJOR", "MINOR", "PATCH")]
    if not all(parts):
        return None
    return ".".join(m.group(1) for m in parts)


def board_dir(board: str) -> Path:
    d = BOARDS_DIR / board
    if not (d / "mpconfigboard.cmake").exists():
        known = sorted(p.name for p in BOARDS_DIR.iterdir() if (p / "mpconfigboard.cmake").exists())
        raise FirmwareError("unknown board %r (boards in %s: %s)" % (board, BOARDS_DIR, ", ".join(known)))
    return d


def build_command(mpy_dir, board: str = DEFAULT_BOARD) -> list[str]:
    d = Path(mpy_dir).expanduser().resolve()
    return ["make", "-C", str(d / "ports" / "esp32"), "BOARD_DIR=%s" % board_dir(board),
            "USER_C_MODULES=%s" % USER_C_MODULES_CMAKE]


def unix_command(mpy_dir) -> list[str]:
    d = Path(mpy_dir).expanduser().resolve()
    return ["make", "-C", str(d / "ports" / "unix"), "USER_C_MODULES=%s" % USER_C_MODULES_MAKE]


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    b = sub.add_parser("build", help="build the ESP32-S3 firmware (MicroPython + tinygpt) with ESP-IDF")
    b.add_argument("--micropython", required=True, metavar="DIR", help="MicroPython source tree (>= 1.24)")
    b.add_argument("--board", default=DEFAULT_BOARD, help="board directory name under boards/ (default %s)" % DEFAULT_BOARD)
    b.add_argument("--dry-run", action="store_true", help="print the build command, do not run it")


def run_cli(args, env=None, run=subprocess.run) -> None:
    v = check_micropython(args.micropython)
    cmd = build_command(args.micropython, args.board)
    line = " ".join(cmd)
    if args.dry_run:
        print(line)
        try:
            check_idf(env)
        except FirmwareError as e:
            print("note: %s" % e)
        return
    idf, _ = check_idf(env)
    print("MicroPython %d.%d.%d, ESP-IDF %s (%s)" % (v + (idf_version(idf) or "?", idf)))
    print(line)
    r = run(cmd)
    if r.returncode != 0:
        d = Path(args.micropython).expanduser().resolve()
        raise FirmwareError("the build failed (exit status %d). A fresh MicroPython clone first needs "
                            "`make -C %s` and `make -C %s BOARD_DIR=%s submodules`"
                            % (r.returncode, d / "mpy-cross", d / "ports" / "esp32", board_dir(args.board)))
    out = Path(args.micropython).expanduser().resolve() / "ports" / "esp32" / ("build-" + args.board) / "firmware.bin"
    print("built %s; flash it with: tinygpt flash --port PORT --firmware %s" % (out, out))
