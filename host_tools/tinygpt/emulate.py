"""`tinygpt emulate`: the tinygpt firmware on an emulated microcontroller.

Runs the TINYGPT_QEMU firmware (boards/TINYGPT_QEMU: MicroPython's qemu port + the tinygpt
module on QEMU's mps2-an500, a Cortex-M7) in qemu-system-arm, with a model file in the board's
model region (where Model("model") maps it, as the ESP32 maps its "model" partition) and the
board's serial port on a pseudo-terminal. The first line printed is that pty's path; the board
is then a serial device like a real one:

    tinygpt emulate &                       # prints e.g. /dev/pts/5
    tinygpt chat --port /dev/pts/5
    mpremote connect /dev/pts/5 exec "import selftest; selftest.run()"

It runs until Ctrl-C or SIGTERM and then stops QEMU. The board's filesystem (littlefs in
emulated RAM, where `tinygpt deploy` copies files) is lost when QEMU stops.

With --icount, QEMU executes one instruction per nanosecond of virtual time (-icount shift=0),
so the board's time.ticks_us() counts thousands of instructions and the self-test reports
instructions per token; the board learns this from a flag word the loader writes.
"""
import collections
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

from .board import BoardError, check_regular_file, read_model_header

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = REPO / "models" / "default" / "model.bin"
BUILD_COMMAND = ("make -C micropython/ports/qemu BOARD_DIR=$PWD/boards/TINYGPT_QEMU "
                 "USER_C_MODULES=$PWD/usercmodule")
# Where that command leaves the firmware, from the repository root.
DEFAULT_FIRMWARE = Path("micropython") / "ports" / "qemu" / "build-TINYGPT_QEMU" / "firmware.elf"

QEMU = "qemu-system-arm"
MACHINE = "mps2-an500"
# The board's memory map (boards/TINYGPT_QEMU/tinygpt_board.py and mpconfigboard.mk).
MODEL_ADDR = 0x60800000
MODEL_SIZE = 0x00800000
FLAGS_ADDR = 0x203FFFFC
ICOUNT_FLAG = 0x49434E54  # "ICNT"
PTY_TIMEOUT = 20.0  # seconds for QEMU to start and name its pty


class EmulateError(BoardError):
    """A missing tool or file, or QEMU failing to start: one line that says what to do."""


def find_qemu():
    path = shutil.which(QEMU)
    if not path:
        raise EmulateError("%s not found: install QEMU's Arm system emulator (Debian/Ubuntu: "
                           "sudo apt-get install qemu-system-arm; or sudo bash scripts/install-ci-deps)" % QEMU)
    return path


def check_firmware(path):
    """The firmware ELF, or an error that says how to build it."""
    if not Path(path).exists():
        raise EmulateError("firmware %s not found: build it from the repository root (MicroPython cloned at "
                           "./micropython) with `%s`, or give --firmware" % (path, BUILD_COMMAND))
    p = check_regular_file(path, "firmware file")
    with open(p, "rb") as f:
        if f.read(4) != b"\x7fELF":
            raise EmulateError("firmware %s is not an ELF file (give the firmware.elf that the qemu port's make "
                               "writes, not firmware.bin)" % path)
    return p


def check_model(path):
    """The model file, checked to fit the board's model region."""
    p = check_regular_file(path, "model file")
    size = p.stat().st_size
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != b"TGPT":
        raise EmulateError("model %s is not a tinygpt model file (no TGPT magic)" % path)
    if size > MODEL_SIZE:
        raise EmulateError("model %s is %d bytes; the board's model region holds %d (%d MiB): put it on the "
                           "board's filesystem with `tinygpt deploy` instead, or use a smaller model"
                           % (path, size, MODEL_SIZE, MODEL_SIZE >> 20))
    # The header, tensor directory and tokenizer section: "TGPT" and then anything else would
    # start the board and fail only at Model("model") (BoardError naming what is wrong).
    read_model_header(p)
    return p


def _printable(line):
    """A line of QEMU's output fit for one error line: control bytes and line noise as '?'."""
    return "".join(c if c.isprintable() else "?" for c in line)[:200]


def qemu_command(qemu, firmware, model, icount=False):
    """The qemu-system-arm command line: the board's UART on a new pty, the model in its region."""
    cmd = [qemu, "-machine", MACHINE, "-nographic", "-monitor", "none", "-semihosting",
           "-serial", "pty", "-kernel", str(firmware)]
    if model is not None:
        cmd += ["-device", "loader,file=%s,addr=0x%08x,force-raw=on" % (model, MODEL_ADDR)]
    if icount:
        cmd += ["-icount", "shift=0",
                "-device", "loader,addr=0x%08x,data=0x%08x,data-len=4" % (FLAGS_ADDR, ICOUNT_FLAG)]
    return cmd


class Emulator:
    """A running QEMU with the board; `pty` is its serial port. Use as a context manager, or
    call stop()."""

    def __init__(self, firmware=DEFAULT_FIRMWARE, model=DEFAULT_MODEL, icount=False, log=None):
        qemu = find_qemu()
        firmware = check_firmware(firmware)
        model = check_model(model) if model is not None else None
        self.cmd = qemu_command(qemu, firmware, model, icount)
        # A session of its own: Ctrl-C in the terminal reaches us, and we stop QEMU.
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.pty = None
        self._log = log
        lines = collections.deque(maxlen=20)  # the last lines, for an error (a long session prints on)
        found = threading.Event()

        def read_output():
            # lines of at most 4 KB: a firmware printing without newlines must not fill memory
            for raw in iter(lambda: self.proc.stdout.readline(4096), b""):
                line = raw.decode("utf-8", "replace").rstrip("\n")
                words = line.split("char device redirected to ", 1)[1].split() if (
                    self.pty is None and "char device redirected to " in line) else []
                if words:  # (a line with no path after it is QEMU's noise, not its pty)
                    self.pty = words[0]
                    found.set()
                elif "terminating on signal" in line:
                    continue  # our own stop()
                else:
                    lines.append(line)
                    if self._log is not None and found.is_set():
                        self._log.write(line + "\n")
                        self._log.flush()
            found.set()

        self._reader = threading.Thread(target=read_output, daemon=True)
        self._reader.start()
        try:
            found.wait(PTY_TIMEOUT)
        except BaseException:  # Ctrl-C while QEMU starts: before, QEMU (a session of its own) ran on
            self.stop()
            raise
        if self.pty is None:
            self.stop()
            raise EmulateError("%s did not start (%s): %s" % (QEMU, " ".join(self.cmd),
                                                            " | ".join(_printable(ln) for ln in list(lines)[-5:])
                                                            or "no output"))

    def stop(self, timeout=10):
        """Stop QEMU (SIGTERM, then SIGKILL if it does not go). Returns its exit status."""
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait()
        self._reader.join(timeout)
        return self.proc.returncode

    def _signal(self, sig):
        """sig to QEMU's session (QEMU and anything it started, which may hold its output pipe)."""
        try:
            os.killpg(self.proc.pid, sig)
        except OSError:
            self.proc.send_signal(sig)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def add_arguments(p):
    p.add_argument("--firmware", default=str(DEFAULT_FIRMWARE),
                   help="the TINYGPT_QEMU firmware.elf (default: %s, what `%s` builds)" % (DEFAULT_FIRMWARE,
                                                                                          BUILD_COMMAND))
    p.add_argument("--model", default=str(DEFAULT_MODEL),
                   help="model file for the board's model region, mapped by Model(\"model\") (default: the "
                        "shipped model)")
    p.add_argument("--icount", action="store_true",
                   help="count instructions (QEMU -icount shift=0): the self-test prints instructions per token")


def run_cli(args):
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    emu = Emulator(args.firmware, args.model, args.icount, log=sys.stderr)
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(emu.pty, flush=True)
        print("tinygpt board on %s (QEMU %s%s): connect with `tinygpt chat --port %s` or `mpremote connect %s`; "
              "Ctrl-C stops it (its RAM filesystem is lost)"
              % (emu.pty, MACHINE, ", -icount shift=0" if args.icount else "", emu.pty, emu.pty), flush=True)
        while not stop.is_set() and emu.proc.poll() is None:
            stop.wait(0.5)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        rc = emu.stop()
    if not stop.is_set():
        raise EmulateError("%s exited by itself (status %s)" % (QEMU, rc))
