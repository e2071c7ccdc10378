"""`tinygpt deploy`: copy a model (and the on-device scripts) to a MicroPython board, verified.

    tinygpt deploy --port /dev/ttyACM0                      # the default model + the py/ scripts
    tinygpt deploy --port /dev/ttyACM0 --model m.bin --no-scripts
    tinygpt deploy --port /dev/ttyACM0 --frozen             # firmware with chat/bpe frozen in

What it does, with the board's own tools (the `mpremote` of this Python, run as a subprocess:
exactly what a user would type):
  1. asks the board for its filesystem's free space (os.statvfs of the current directory, "/"
     on a board) and the size and SHA-256 of each target file already there, and of any
     NAME.new an interrupted deploy left; says what each file on the board is;
  2. refuses, before copying anything, a set of files that will not fit next to the files they
     replace, naming the sizes and what to do instead (--in-place, or for a model too big for
     the filesystem the `model` flash partition with `tinygpt flash --model`);
  3. removes leftover NAME.new files (one that is a complete copy of the file being deployed is
     kept: only its rename was cut off), then copies each file whose hash differs to NAME.new
     (`mpremote cp -f`);
  4. has the board hash every NAME.new (hashlib.sha256 over 4 KiB reads) and compares with the
     local SHA-256; a failed or cut copy (mpremote error, the port vanishing, a size or hash
     mismatch) is copied again, up to `retries` times, then reported;
  5. renames every verified NAME.new over NAME in one call on the board, and checks the result.
So whatever stops a deploy (Ctrl-C, a kill, a cut link, retries used up), each file on the board is
complete: its previous version until the rename, its new one after it. littlefs (the ESP32
port's default filesystem) renames over a file atomically; MicroPython's FAT driver removes the
old file and renames in one C call, so only a reset inside that call can leave NAME missing and
NAME.new complete, which the next deploy renames. An interrupted deploy says which state it left;
`tinygpt deploy --check` says it any time. With --in-place (old file removed before the copy, for
when both do not fit) an interrupted copy leaves that file missing until deploy runs again.
Every mpremote call has a time limit (--timeout, or the defaults below).
Files go to the board's current directory ("/" on a board): /model.bin and the scripts (/chat.py,
/bpe.py, /sptok.py, /draft.py, /topic.py, /retrieve.py, /selftest.py: what a firmware freezes), where py/chat.py looks for them
(chat.DEFAULT_PATHS).
A port given as a symlink (/dev/serial/by-id/...) is resolved again for every connection, so a
board that comes back under another ttyACM number after a reset is found again.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from .board import BoardError, check_port, check_regular_file
from .modelfile import sha256_file

REPO = Path(__file__).resolve().parents[2]
PY_DIR = REPO / "py"
DEFAULT_MODEL = REPO / "models" / "default" / "model.bin"
SCRIPTS = ("chat.py", "bpe.py", "sptok.py", "draft.py", "topic.py", "retrieve.py", "selftest.py")  # micropython_mod/manifest.py freezes these
MODEL_NAME = "model.bin"
FS_BLOCK_SLACK = 2  # filesystem blocks per file for littlefs metadata, beyond its data blocks
TMP_SUFFIX = ".new"  # a file is copied to NAME.new, verified there, then renamed over NAME
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


class BoardSilent(DeployError):
    """The board stopped answering in the middle of a deploy (a copy and the next query timed out)."""


def mpremote_command() -> list[str]:
    """mpremote of this Python (a dependency of the `device` extra)."""
    return [sys.executable, "-m", "mpremote"]


def resolve_port(port: str) -> str:
    """A symlinked port (/dev/serial/by-id/..., or a test's virtual board) -> its current device."""
    return os.path.realpath(port) if os.path.islink(port) else port


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
            p = subprocess.Popen(cmd, stdout=None if show else subprocess.PIPE, stderr=subprocess.PIPE)
        except FileNotFoundError:
            raise DeployError("cannot run %s: is mpremote installed? (pip install mpremote)" % self.mpremote[0])
        # Read as it comes, keeping only the last OUTPUT_KEEP bytes of each stream: a board that
        # prints without end must not fill the PC's memory before the time limit (before: 4 GB in
        # 3 s from a fast port). Bytes that are not UTF-8 (line noise) become U+FFFD.
        kept = {}
        readers = [threading.Thread(target=_drain, args=(f, kept, key), daemon=True)
                   for key, f in (("out", p.stdout), ("err", p.stderr)) if f is not None]
        for t in readers:
            t.start()
        try:
            rc = p.wait(limit)
        except subprocess.TimeoutExpired:
            _stop(p)
            rc = None
        except BaseException:  # Ctrl-C reaches mpremote too: let it stop, then make sure
            _stop(p, grace=0.25)
            raise
        for t in readers:
            t.join(5)
        if rc is None:
            return subprocess.CompletedProcess(cmd, 124, "", "mpremote timed out after %.0f s" % limit)
        return subprocess.CompletedProcess(cmd, rc, kept.get("out", ""), kept.get("err", ""))

    def query(self, names) -> dict:
        r = self.run("exec", _QUERY % (list(names),))
        for line in r.stdout.splitlines():
            if line.startswith("TGQ"):
                return check_query_answer(line[3:], names, self.port)
        raise DeployError("cannot talk to the board on %s: %s" % (self.port, _why(r)))

    def copy(self, local: Path, remote: str) -> subprocess.CompletedProcess:
        rm = "import os\ntry:\n    os.remove(%r)\nexcept OSError:\n    pass\n" % remote
        limit = COPY_TIMEOUT_BASE + local.stat().st_size / COPY_BYTES_PER_S
        return self.run("exec", rm, "+", "cp", "-f", str(local), ":" + remote, timeout=limit, show=self.progress)

    def remove(self, names) -> None:
        """Remove these files on the board (missing ones are fine)."""
        r = self.run("exec", "import os\nfor n in %r:\n    try:\n        os.remove(n)\n    except OSError:\n"
                             "        pass\nprint('TGD')\n" % (list(names),))
        if "TGD" not in r.stdout:
            raise DeployError("cannot remove %s on the board: %s" % (", ".join(names), _why(r)))

    def rename(self, pairs) -> None:
        """os.rename(a, b) on the board for each (a, b), in one call. littlefs replaces b
        atomically; MicroPython's FAT driver removes b and renames a in the same C call (a reset
        in between leaves only a: the next deploy finds it complete and renames it)."""
        r = self.run("exec", "import os\nfor a, b in %r:\n    os.rename(a, b)\nprint('TGR')\n" % (list(pairs),))
        if "TGR" not in r.stdout:
            raise DeployError("renaming on the board failed: %s; %s" % (_why(r), _interrupted(
                "rename", [b for _a, b in pairs], False)))


OUTPUT_KEEP = 256 * 1024  # bytes of an mpremote call's stdout (and stderr) kept: its last lines say what happened


def _drain(f, kept, key) -> None:
    """Read the pipe f to its end, keeping its last OUTPUT_KEEP bytes, decoded, in kept[key]."""
    buf = bytearray()
    try:
        while True:
            b = f.read1(65536)
            if not b:
                break
            buf += b
            if len(buf) > 2 * OUTPUT_KEEP:
                del buf[:-OUTPUT_KEEP]
    except (OSError, ValueError):
        pass
    finally:
        kept[key] = bytes(buf[-OUTPUT_KEEP:]).decode("utf-8", "replace")


def _stop(p, grace: float = 0.0) -> None:
    """End the mpremote process p (after `grace` seconds for it to end by itself)."""
    try:
        p.wait(grace)
        return
    except subprocess.TimeoutExpired:
        pass
    p.kill()
    p.wait()


_FS_KEYS = ("bsize", "frsize", "blocks", "bfree", "bavail")


def check_query_answer(text: str, names, port: str) -> dict:
    """The board's answer to _QUERY, parsed and checked for the shape _QUERY prints: a board (or
    a program on its port) that answers something else gets a DeployError naming the problem,
    never a traceback or a deploy that trusts wrong numbers."""
    def bad(why):
        return DeployError("the board on %s answered the file query with %s, not what tinygpt's query prints "
                           "(is it running MicroPython, and no other program using the port?): %r"
                           % (port, why, text[:120]))
    try:
        info = json.loads(text)
    except (ValueError, RecursionError):
        raise bad("malformed JSON") from None
    if not isinstance(info, dict):
        raise bad("a JSON %s instead of an object" % type(info).__name__)
    for key in _FS_KEYS:
        v = info.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise bad("no filesystem number %r" % key if key not in info else "a bad %r (%r)" % (key, v))
    if not (info["frsize"] or info["bsize"]):
        raise bad("a block size of 0")
    files = info.get("files")
    if not isinstance(files, dict):
        raise bad("no 'files' object")
    for name in names:
        got = files.get(name)
        if got is None:
            continue
        if not (isinstance(got, list) and len(got) == 2 and isinstance(got[0], int) and not isinstance(got[0], bool)
                and got[0] >= 0 and isinstance(got[1], str) and len(got[1]) == 64
                and all(c in "0123456789abcdef" for c in got[1])):
            raise bad("a bad entry for %s (%r)" % (name, got))
    return info



def _why_text(text: str) -> str:
    return text.rsplit(": ", 1)[-1] if text.startswith("cannot talk to the board") else text


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


def check_space(info: dict, todo: list[tuple[Path, str, int]], stale=(), in_place: bool = False) -> None:
    """Refuse (DeployError) when the files to copy do not fit. Each copy is made next to the file
    it replaces and renamed over it once verified, so the copies need free space of their own;
    leftover temporary files (stale, removed first) count as free, and with in_place (each old
    file removed before its copy) so do the files replaced."""
    bsize = info["frsize"] or info["bsize"]
    free = info["bavail"] * bsize + sum(_blocks(info["files"][t][0], bsize) * bsize for t in stale)
    replaced = sum(_blocks(info["files"][name][0], bsize) * bsize for _p, name, _n in todo
                   if info["files"].get(name))
    need = sum(_blocks(n, bsize) * bsize for _p, _name, n in todo)
    if need <= free + (replaced if in_place else 0):
        return
    names = ", ".join("%s (%d bytes)" % (name, n) for _p, name, n in todo)
    if need <= free + replaced:
        raise DeployError("will not fit next to the files they replace: %s need %d bytes on the board's "
                          "filesystem, which has %d bytes free (%d once the old files are gone). "
                          "`tinygpt deploy --in-place` removes each old file before copying its replacement: "
                          "that fits, but an interrupted copy then leaves the board without that file until "
                          "deploy runs again." % (names, need, free, free + replaced))
    hint = ""
    if any(name == MODEL_NAME for _p, name, _n in todo):
        hint = (" Use a smaller model, or write it into the board's 'model' flash partition with "
                "`tinygpt flash --port PORT --model MODEL` (tinygpt firmware), which leaves the "
                "filesystem free.")
    raise DeployError("will not fit: %s need %d bytes on the board's filesystem, which has %d bytes "
                      "free (%d with the files they replace) of %d.%s"
                      % (names, need, free, free + replaced, info["blocks"] * bsize, hint))


def _state(got, want) -> str:
    """What a file on the board is, next to the local file it should be."""
    if got is None:
        return "missing"
    if got == want:
        return "the file being deployed (sha256 %s...)" % want[1][:16]
    if got[0] != want[0]:
        return "another file (%d bytes, the one being deployed has %d)" % (got[0], want[0])
    return "another file (sha256 %s..., the one being deployed has %s...)" % (got[1][:16], want[1][:16])


def board_state(info: dict, want: dict) -> list[str]:
    """One line per target file (and per leftover temporary file) on the board."""
    lines = []
    for name, w in want.items():
        lines.append("%s on the board: %s" % (name, _state(info["files"].get(name), w)))
        got = info["files"].get(name + TMP_SUFFIX)
        if got is not None:
            lines.append("%s%s on the board: left by an interrupted deploy (%s)"
                         % (name, TMP_SUFFIX, "a complete copy of the file being deployed" if got == w
                            else "%d bytes, not the file being deployed" % got[0]))
    return lines


def _interrupted(phase: str, names: list[str], in_place: bool, had=None) -> str:
    """What the board holds when a deploy stops in `phase` (copy, rename, done). had: the names
    the board held before the deploy (None: all of them)."""
    files = ", ".join(names)
    if phase == "copy" and in_place:
        return ("the board's old %s were removed before copying (--in-place): run `tinygpt deploy` again "
                "to put the files there" % files)
    if phase == "copy":
        kept = [n for n in names if had is None or n in had]
        new = [n for n in names if n not in kept]
        said = []
        if kept:
            said.append("it keeps its previous %s" % ", ".join(kept))
        if new:
            said.append("%s %s not on the board before and still %s not" % (
                ", ".join(new), "was" if len(new) == 1 else "were", "is" if len(new) == 1 else "are"))
        return ("nothing on the board was replaced: %s (the next deploy removes the partial %s files)"
                % ("; ".join(said) or "no file", TMP_SUFFIX))
    return ("each of %s on the board is complete, either its previous or its new version: "
            "`tinygpt deploy --check` says which" % files)


def deploy(port: str, model, scripts: bool = True, retries: int = 3, mpremote=None,
           timeout: float | None = None, log=print, progress: bool = False, in_place: bool = False) -> dict:
    """Copy and verify; returns {name on board: sha256}. Raises DeployError.
    progress=True shows mpremote's progress bar of each copy on the terminal.
    in_place=True removes a board file before copying its replacement (when both do not fit at
    once): an interrupted deploy then leaves that file missing until the next deploy."""
    files = plan_files(model, scripts)
    local = {name: (p, p.stat().st_size, sha256_file(p)) for p, name in files}
    want = {name: [n, h] for name, (_p, n, h) in local.items()}
    board = Board(port, mpremote, timeout, log, progress)
    names = [name for _p, name in files]
    temps = [name + TMP_SUFFIX for name in names]
    info = board.query(names + temps)
    for line in board_state(info, want):
        log(line)
    ready = [name for name in names if info["files"].get(name + TMP_SUFFIX) == want[name]
             and info["files"].get(name) != want[name]]  # copied and verified, the rename was cut off
    stale = [name + TMP_SUFFIX for name in names
             if info["files"].get(name + TMP_SUFFIX) is not None and name not in ready]
    todo = [(local[name][0], name, want[name][0]) for name in names
            if info["files"].get(name) != want[name] and name not in ready]
    for name in names:
        if info["files"].get(name) == want[name]:
            log("%s: up to date on the board" % name)
    check_space(info, todo, stale, in_place)
    had = {name for name in names if info["files"].get(name) is not None}
    phase = "copy"
    try:
        if stale:
            log("removing %s (left by an interrupted deploy)" % ", ".join(stale))
            board.remove(stale)
        if in_place:
            board.remove([name for _p, name, _n in todo if info["files"].get(name)])
        try:
            failures = _copy_verified(board, todo, want, retries, log)
        except BoardSilent as e:
            raise DeployError("%s; %s" % (e, _interrupted("copy", [t[1] for t in todo], in_place, had)))
        if failures:
            raise DeployError("giving up after %d retries: %s; %s" % (retries, "; ".join(
                "%s: %s" % (name, why) for name, why in failures.items()),
                _interrupted("copy", [t[1] for t in todo], in_place, had)))
        done = ready + [name for _p, name, _n in todo]
        if done:
            phase = "rename"
            board.rename([(name + TMP_SUFFIX, name) for name in done])
            info = board.query(names + temps)
            wrong = [name for name in names if info["files"].get(name) != want[name]]
            if wrong:
                raise DeployError("after renaming on the board: %s" % "; ".join(
                    "%s is %s" % (name, _state(info["files"].get(name), want[name])) for name in wrong))
            for name in done:
                log("%s: replaced by the verified copy" % name)
    except KeyboardInterrupt:
        log("deploy interrupted: " + _interrupted(phase, [t[1] for t in todo] + ready, in_place, had))
        raise
    return {name: h for name, (_p, _n, h) in local.items()}


def check(port: str, model, scripts: bool = True, mpremote=None, timeout: float | None = None,
          log=print) -> bool:
    """Say what the board holds (board_state); True when every file is the one given and no
    interrupted deploy left a temporary file."""
    files = plan_files(model, scripts)
    want = {name: [p.stat().st_size, sha256_file(p)] for p, name in files}
    info = Board(port, mpremote, timeout, log).query(list(want) + [name + TMP_SUFFIX for name in want])
    for line in board_state(info, want):
        log(line)
    return all(info["files"].get(name) == w and info["files"].get(name + TMP_SUFFIX) is None
               for name, w in want.items())


def _copy_verified(board, todo, want, retries, log) -> dict:
    """Copy each (local, name, size) of todo to name + TMP_SUFFIX on the board and check its
    SHA-256 there; a failed or cut copy is copied again, up to `retries` times. Returns
    {name: why} of what still failed ({} when every copy is verified)."""
    attempt = 0
    failures: dict = {}
    while todo:
        if attempt > retries:
            return failures
        if attempt:
            log("retrying %s (attempt %d of %d)" % (", ".join(t[1] for t in todo), attempt + 1, retries + 1))
        failures = {}
        silent = None  # the file whose copy ran out of time: the board may have stopped answering
        for p, name, n in todo:
            if silent:  # each further copy would wait its whole time limit too
                failures[name] = "not copied (the board stopped answering during the copy of %s)" % silent
                continue
            log("copying %s -> :%s%s (%d bytes)" % (p, name, TMP_SUFFIX, n))
            r = board.copy(p, name + TMP_SUFFIX)
            if r.returncode != 0:
                failures[name] = "copy failed: " + _why(r)
                log("%s: %s" % (name, failures[name]))
                if r.returncode == 124:
                    silent = name
        try:
            info = board.query([t[1] + TMP_SUFFIX for t in todo])
        except DeployError as e:
            if silent:  # a copy and then the query ran out of time: no retry would get an answer
                raise BoardSilent("the board on %s stopped answering: the copy of %s and then the file query "
                                  "ran out of time (%s), so deploy gave up without further retries"
                                  % (board.port, silent, _why_text(str(e))))
            for _p, name, _n in todo:
                failures.setdefault(name, str(e))
            info = None
        if info is not None:
            left = []
            for p, name, n in todo:
                got = info["files"].get(name + TMP_SUFFIX)
                if got == want[name]:
                    failures.pop(name, None)
                    log("%s%s: verified (sha256 %s)" % (name, TMP_SUFFIX, want[name][1][:16]))
                    continue
                if got is None:
                    state = "missing"
                elif got[0] != n:
                    state = "%d of %d bytes" % (got[0], n)
                else:
                    state = "%d bytes but SHA-256 %s..., expected %s..." % (n, got[1][:12], want[name][1][:12])
                failures[name] = "%s; on the board: %s%s %s" % (failures.get(name, "copied"), name, TMP_SUFFIX, state)
                log("%s: not verified (%s)" % (name, failures[name]))
                left.append((p, name, n))
            todo = left
        attempt += 1
    return {}


def add_arguments(p) -> None:
    p.add_argument("--port", required=True, help="serial port of the board (e.g. /dev/ttyACM0)")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="model file (default: the shipped model)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--no-scripts", action="store_true", help="copy only the model, not the py/ scripts")
    g.add_argument("--frozen", action="store_true",
                   help="the firmware has chat.py and bpe.py frozen in (tinygpt firmware): copy only the model")
    p.add_argument("--retries", type=int, default=3, help="copies of a file that fails to verify (default 3)")
    p.add_argument("--check", action="store_true",
                   help="copy nothing: say which files on the board are the ones given (exit status 1 if any is "
                        "not, or an interrupted deploy left a %s file)" % TMP_SUFFIX)
    p.add_argument("--in-place", action="store_true",
                   help="remove each old file before copying its replacement, for when both do not fit at once "
                        "(an interrupted copy then leaves the board without that file until deploy runs again)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds allowed per mpremote call (default: %.0f s to query the board, %.0f s + 1 s per "
                        "%d KB to copy a file)" % (QUERY_TIMEOUT, COPY_TIMEOUT_BASE, COPY_BYTES_PER_S // 1000))


def run_cli(args) -> None:
    if args.retries < 0:
        raise DeployError("--retries must be >= 0")
    if args.timeout is not None and not args.timeout > 0:
        raise DeployError("--timeout must be > 0 seconds")
    scripts = not (args.no_scripts or args.frozen)
    if args.check:
        if not check(args.port, args.model, scripts=scripts, timeout=args.timeout):
            sys.exit(1)
        return
    hashes = deploy(args.port, args.model, scripts=scripts, retries=args.retries, timeout=args.timeout,
                    progress=sys.stdout.isatty(), in_place=args.in_place)
    print("deployed %d file(s) to %s: %s" % (len(hashes), args.port, ", ".join(hashes)))
