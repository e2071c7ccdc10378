"""`tinygpt deploy`: copy a model (and the on-device scripts) to a MicroPython board, verified.

    tinygpt deploy --port /dev/ttyACM0                      # the default model + py/chat.py, py/bpe.py
    tinygpt deploy --port /dev/ttyACM0 --model m.bin --no-scripts
    tinygpt deploy --port /dev/ttyACM0 --frozen             # firmware with chat/bpe frozen in

What it does, with the board's own tools (the `mpremote` of this Python, run as a subprocess:
exactly what a user would type):
  1. asks the board for its filesystem's free space (os.statvfs of the current directory, "/"
     on a board) and the size and SHA-256 of each target file already there;
  2. refuses, before copying anything, a set of files that will not fit (files it replaces count
     as free), naming the sizes and what to do instead (a model too big for the filesystem goes
     into the `model` flash partition with `tinygpt flash --model`);
  3. copies the files whose hash differs (`mpremote cp -f`; the old copy is removed first so
     littlefs can reuse its blocks);
  4. has the board hash every file again (hashlib.sha256 over 4 KiB reads) and compares with
     the local SHA-256; a failed or cut copy (mpremote error, the port vanishing, a size or hash
     mismatch) is copied again, up to `retries` times, then reported.
Files go to the board's current directory ("/" on a board): /model.bin, /chat.py, /bpe.py, where
py/chat.py looks for them (chat.DEFAULT_PATHS).
A port given as a symlink (/dev/serial/by-id/...) is resolved again for every connection, so a
board that comes back under another ttyACM number after a reset is found again.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from .board import BoardError, check_port, check_regular_file

REPO = Path(__file__).resolve().parents[2]
PY_DIR = REPO / "py"
SCRIPTS = ("chat.py", "bpe.py")
MODEL_NAME = "model.bin"
FS_BLOCK_SLACK = 2  # filesystem blocks per file for littlefs metadata, beyond its data blocks
# Default time limits per mpremote call: a board that stops answering must not hang the tool.
# Hashing the files on the board: an ESP32-S3 hashes a 6.6 MB model from flash in seconds.
QUERY_TIMEOUT = 60.0
# A copy goes through the raw REPL in base64 chunks; USB-serial boards copy 20-100 KB/s, so
# 60 s plus 10 KB/s leaves room for the slowest (6.6 MB: 11 minutes).
COPY_TIMEOUT_BASE = 60.0
COPY_BYTES_PER_S = 10_000

# Run on the board: free space and the size + SHA-256 of each file. One JSON line after a marker.
_QUERY = r"""
import os, hashlib, json
try:
    import binascii
except ImportError:
    import ubinascii as binascii
def _tg_file(p):
    try:
        n = os.stat(p)[6]
    except OSError:
        return None
    h = hashlib.sha256()
    b = bytearray(4096)
    with open(p, 'rb') as f:
        while True:
            k = f.readinto(b)
            if not k:
                break
            h.update(b if k == 4096 else b[:k])
    return [n, binascii.hexlify(h.digest()).decode()]
_tg_cwd = os.getcwd()
_tg_st = os.statvfs(_tg_cwd)
print('TGQ' + json.dumps({'cwd': _tg_cwd, 'bsize': _tg_st[0], 'frsize': _tg_st[1], 'blocks': _tg_st[2],
      'bfree': _tg_st[3], 'bavail': _tg_st[4], 'files': {n: _tg_file(n) for n in %r}}))
"""


class DeployError(BoardError):
    pass


def mpremote_command() -> list[str]:
    """mpremote of this Python (a dependency of the `device` extra)."""
    return [sys.executable, "-m", "mpremote"]


def resolve_port(port: str) -> str:
    """A symlinked port (/dev/serial/by-id/..., or a test's virtual board) -> its current device."""
    return os.path.realpath(port) if os.path.islink(port) else port


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Board:
    """The board at `port`, driven through mpremote subprocesses."""

    def __init__(self, port: str, mpremote: list[str] | None = None, timeout: float | None = None,
                 log=print, progress: bool = False):
        self.port = port
        self.mpremote = list(mpremote or mpremote_command())
        self.timeout = timeout
        self.log = log
        self.progress = progress

    def run(self, *args: str, timeout: float | None = None, show: bool = False) -> subprocess.CompletedProcess:
        """mpremote connect PORT ARGS...; show=True lets its stdout (progress bars) through.
        Time limit: the Board's own timeout if given, else `timeout`, else QUERY_TIMEOUT."""
        limit = self.timeout or timeout or QUERY_TIMEOUT
        cmd = self.mpremote + ["connect", check_port(resolve_port(self.port))] + list(args)
        try:
            return subprocess.run(cmd, stdout=None if show else subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, timeout=limit)
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(cmd, 124, "", "mpremote timed out after %.0f s" % limit)
        except FileNotFoundError:
            raise DeployError("cannot run %s: is mpremote installed? (pip install mpremote)" % self.mpremote[0])

    def query(self, names) -> dict:
        r = self.run("exec", _QUERY % (list(names),))
        for line in r.stdout.splitlines():
            if line.startswith("TGQ"):
                return json.loads(line[3:])
        raise DeployError("cannot talk to the board on %s: %s" % (self.port, _why(r)))

    def copy(self, local: Path, remote: str) -> subprocess.CompletedProcess:
        rm = "import os\ntry:\n    os.remove(%r)\nexcept OSError:\n    pass\n" % remote
        limit = COPY_TIMEOUT_BASE + local.stat().st_size / COPY_BYTES_PER_S
        return self.run("exec", rm, "+", "cp", "-f", str(local), ":" + remote, timeout=limit, show=self.progress)


def _why(r: subprocess.CompletedProcess) -> str:
    text = (r.stderr or "").strip() or (r.stdout or "").strip() or "exit status %d" % r.returncode
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else text


def plan_files(model, scripts: bool = True) -> list[tuple[Path, str]]:
    """[(local path, name on the board)] for a deploy."""
    try:
        m = check_regular_file(model)
    except BoardError as e:
        raise DeployError(str(e))
    with open(m, "rb") as f:
        if f.read(4) != b"TGPT":
            raise DeployError("%s: not a tinygpt model file (no TGPT header)" % m)
    files = [(m, MODEL_NAME)]
    if scripts:
        for s in SCRIPTS:
            p = PY_DIR / s
            if not p.exists():
                raise DeployError("%s: missing (the on-device scripts)" % p)
            files.append((p, s))
    return files


def _blocks(nbytes: int, bsize: int) -> int:
    return -(-nbytes // bsize) + FS_BLOCK_SLACK


def check_space(info: dict, todo: list[tuple[Path, str, int]]) -> None:
    """Refuse (DeployError) when the files to copy cannot fit in the board's free space plus the
    space of the files they replace."""
    bsize = info["frsize"] or info["bsize"]
    free = info["bavail"] * bsize
    reclaim = sum(_blocks(info["files"][name][0], bsize) * bsize for _p, name, _n in todo
                  if info["files"].get(name))
    need = sum(_blocks(n, bsize) * bsize for _p, _name, n in todo)
    if need > free + reclaim:
        total = info["blocks"] * bsize
        names = ", ".join("%s (%d bytes)" % (name, n) for _p, name, n in todo)
        hint = ""
        if any(name == MODEL_NAME for _p, name, _n in todo):
            hint = (" Use a smaller model, or write it into the board's 'model' flash partition with "
                    "`tinygpt flash --port PORT --model MODEL` (tinygpt firmware), which leaves the "
                    "filesystem free.")
        raise DeployError("will not fit: %s need %d bytes on the board's filesystem, which has %d bytes "
                          "free (%d with the files they replace) of %d.%s"
                          % (names, need, free, free + reclaim, total, hint))


def deploy(port: str, model, scripts: bool = True, retries: int = 3, mpremote=None,
           timeout: float | None = None, log=print, progress: bool = False) -> dict:
    """Copy and verify; returns {name on board: sha256}. Raises DeployError.
    progress=True shows mpremote's progress bar of each copy on the terminal."""
    files = plan_files(model, scripts)
    local = {name: (p, p.stat().st_size, sha256_file(p)) for p, name in files}
    board = Board(port, mpremote, timeout, log, progress)
    names = [name for _p, name in files]
    info = board.query(names)
    todo = [(p, name, n) for name, (p, n, h) in local.items()
            if not info["files"].get(name) or info["files"][name] != [n, h]]
    for name in names:
        if all(name != t[1] for t in todo):
            log("%s: up to date on the board" % name)
    check_space(info, todo)
    attempt = 0
    failures: dict = {}
    while todo:
        if attempt > retries:
            raise DeployError("giving up after %d retries: %s" % (retries, "; ".join(
                "%s: %s" % (name, why) for name, why in failures.items())))
        if attempt:
            log("retrying %s (attempt %d of %d)" % (", ".join(t[1] for t in todo), attempt + 1, retries + 1))
        failures = {}
        for p, name, n in todo:
            log("copying %s -> :%s (%d bytes)" % (p, name, n))
            r = board.copy(p, name)
            if r.returncode != 0:
                failures[name] = "copy failed: " + _why(r)
                log("%s: %s" % (name, failures[name]))
        try:
            info = board.query(names)
        except DeployError as e:
            for _p, name, _n in todo:
                failures.setdefault(name, str(e))
            info = None
        if info is not None:
            left = []
            for p, name, n in todo:
                got = info["files"].get(name)
                want = [n, local[name][2]]
                if got == want:
                    failures.pop(name, None)
                    log("%s: verified (sha256 %s)" % (name, want[1][:16]))
                    continue
                if got is None:
                    state = "missing"
                elif got[0] != n:
                    state = "%d of %d bytes" % (got[0], n)
                else:
                    state = "%d bytes but SHA-256 %s..., expected %s..." % (n, got[1][:12], want[1][:12])
                failures[name] = "%s; on the board: %s" % (failures.get(name, "copied"), state)
                log("%s: not verified (%s)" % (name, failures[name]))
                left.append((p, name, n))
            todo = left
        attempt += 1
    return {name: h for name, (_p, _n, h) in local.items()}


def add_arguments(p, default_model) -> None:
    p.add_argument("--port", required=True, help="serial port of the board (e.g. /dev/ttyACM0)")
    p.add_argument("--model", default=str(default_model), help="model file (default: the shipped model)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--no-scripts", action="store_true", help="copy only the model, not py/chat.py and py/bpe.py")
    g.add_argument("--frozen", action="store_true",
                   help="the firmware has chat.py and bpe.py frozen in (tinygpt firmware): copy only the model")
    p.add_argument("--retries", type=int, default=3, help="copies of a file that fails to verify (default 3)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds allowed per mpremote call (default: %.0f s to query the board, %.0f s + 1 s per "
                        "%d KB to copy a file)" % (QUERY_TIMEOUT, COPY_TIMEOUT_BASE, COPY_BYTES_PER_S // 1000))


def run_cli(args) -> None:
    if args.retries < 0:
        raise DeployError("--retries must be >= 0")
    if args.timeout is not None and not args.timeout > 0:
        raise DeployError("--timeout must be > 0 seconds")
    scripts = not (args.no_scripts or args.frozen)
    hashes = deploy(args.port, args.model, scripts=scripts, retries=args.retries, timeout=args.timeout,
                    progress=sys.stdout.isatty())
    print("deployed %d file(s) to %s: %s" % (len(hashes), args.port, ", ".join(hashes)))
