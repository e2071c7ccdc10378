"""The tinygpt firmware on an emulated microcontroller (boards/TINYGPT_QEMU, `tinygpt emulate`).

Unit tests (always run): `tinygpt emulate`'s argument errors and QEMU handling against a fake
qemu-system-arm, and the board files agreeing with each other.

Integration tests: run when TINYGPT_QEMU_FIRMWARE names a built firmware.elf, e.g. (MicroPython
cloned at ./micropython, no submodules needed):
    make -C micropython/ports/qemu BOARD_DIR=$PWD/boards/TINYGPT_QEMU USER_C_MODULES=$PWD/usercmodule
    TINYGPT_QEMU_FIRMWARE=micropython/ports/qemu/build-TINYGPT_QEMU/firmware.elf pytest tests/test_qemu_board.py
One QEMU (with -icount, so the self-test reports instructions per token) serves all of them;
every exchange with the board has a timeout.
"""
import ast
import io
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from conftest import REPO

from tinygpt import bench, emulate
from tinygpt import board as board_mod
from tinygpt.board import BoardError
from tinygpt.engine import Model
from tinygpt.serial_chat import BoardChat

BOARD = REPO / "boards" / "TINYGPT_QEMU"
PY_DIR = REPO / "py"
SHIPPED = REPO / "models" / "default" / "model.bin"
TOKENIZER_JSON = REPO / "models" / "default" / "tokenizer" / "tokenizer.json"
BOARD_TIMEOUT = 120  # seconds for any one exchange with the emulated board
QUESTIONS = ["What is PSRAM?", "what does mpremote exec do", "How do I reset the board?", "What is WiFi?",
             "Do I need a heatsink?", "how much flash does the board have"]
EXTRA_LINES = ["Café crème ünïcödé — naïve", "日本語のテキスト", "emoji 🙂🚀 and tabs\tand  spaces",
               "  leading and trailing  ", "x" * 60, "1234567890 3.14159 -42"]


# -- unit tests: no firmware needed --------------------------------------------------------

def fake_qemu(tmp_path, body):
    """A qemu-system-arm on PATH that runs `body` (sh)."""
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    q = d / "qemu-system-arm"
    q.write_text("#!/bin/sh\n" + body)
    q.chmod(0o755)
    return d


def fake_elf(tmp_path):
    f = tmp_path / "firmware.elf"
    f.write_bytes(b"\x7fELF" + bytes(60))
    return f


def run_cli(args, env=None, timeout=30):
    return subprocess.run([sys.executable, "-m", "tinygpt.cli", "emulate"] + args, capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def test_missing_firmware_says_how_to_build(tmp_path):
    r = run_cli(["--firmware", str(tmp_path / "nope.elf")])
    assert r.returncode == 2
    assert "not found" in r.stderr and emulate.BUILD_COMMAND in r.stderr


@pytest.mark.parametrize("content,why", [(b"not an elf", "not an ELF file")])
def test_firmware_must_be_an_elf(tmp_path, content, why):
    f = tmp_path / "firmware.bin"
    f.write_bytes(content)
    r = run_cli(["--firmware", str(f)])
    assert r.returncode == 2 and why in r.stderr, r.stderr


def test_model_errors(tmp_path):
    elf = fake_elf(tmp_path)
    cases = {"missing.bin": (None, "no such model file"), "junk.bin": (b"junk" * 40, "not a tinygpt model"),
             "big.bin": (b"TGPT" + bytes(emulate.MODEL_SIZE), "holds %d" % emulate.MODEL_SIZE)}
    for name, (data, why) in cases.items():
        p = tmp_path / name
        if data is not None:
            p.write_bytes(data)
        with pytest.raises(BoardError, match=why):
            emulate.Emulator(elf, p)
    with pytest.raises(BoardError, match="is a directory"):
        emulate.Emulator(elf, tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(BoardError, match="FIFO|regular file"):  # would block QEMU's loader
        emulate.Emulator(elf, fifo)


def test_missing_qemu_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(emulate.EmulateError, match="apt-get install qemu-system-arm"):
        emulate.Emulator(fake_elf(tmp_path), SHIPPED)


def test_qemu_command_line():
    cmd = emulate.qemu_command("qemu-system-arm", "fw.elf", "m.bin", icount=True)
    s = " ".join(cmd)
    assert "-machine mps2-an500" in s and "-serial pty" in s and "-kernel fw.elf" in s
    assert "loader,file=m.bin,addr=0x60800000,force-raw=on" in s
    assert "-icount shift=0" in s and "loader,addr=0x203ffffc,data=0x49434e54,data-len=4" in s
    assert "-icount" not in emulate.qemu_command("q", "fw.elf", "m.bin")


def test_board_files_agree_on_the_memory_map():
    """emulate.py, tinygpt_board.py (the board's Python) and mpconfigboard.mk (its C) must place
    the model, arena and flags at the same addresses."""
    g = {}
    src = (BOARD / "tinygpt_board.py").read_text().replace("import uctypes", "")
    exec(compile(src, "tinygpt_board.py", "exec"), g)
    mk = dict(re.findall(r"^(TINYGPT_\w+) = (\S+)$", (BOARD / "mpconfigboard.mk").read_text(), re.M))
    assert g["MODEL_ADDR"] == emulate.MODEL_ADDR == int(mk["TINYGPT_MODEL_ADDR"], 16)
    assert g["MODEL_SIZE"] == emulate.MODEL_SIZE == int(mk["TINYGPT_MODEL_SIZE"], 16)
    assert g["ARENA_ADDR"] == int(mk["TINYGPT_ARENA_ADDR"], 16) and g["ARENA_SIZE"] == int(mk["TINYGPT_ARENA_SIZE"], 16)
    assert g["FLAGS_ADDR"] == emulate.FLAGS_ADDR and g["ICOUNT_FLAG"] == emulate.ICOUNT_FLAG
    assert g["FS_ADDR"] + g["FS_SIZE"] <= g["FLAGS_ADDR"]  # the filesystem stops short of the flags word
    assert g["ARENA_ADDR"] + g["ARENA_SIZE"] <= g["MODEL_ADDR"]
    assert SHIPPED.stat().st_size <= emulate.MODEL_SIZE


def test_board_manifest_freezes_files_that_exist():
    from board_helpers import DEVICE_SCRIPTS
    from test_firmware import run_manifest

    calls = run_manifest(BOARD / "manifest.py")
    assert all(c[0] in ("freeze", "include") for c in calls), calls  # no require(): no micropython-lib
    frozen = [c for c in calls if c[0] == "freeze"]
    for _, base, scripts in frozen:
        for s in scripts:
            assert (Path(base) / s).is_file(), s
    inc = [c[1] for c in calls if c[0] == "include"]
    assert [(BOARD / p).resolve() for p in inc] == [REPO / "micropython_mod" / "manifest.py"]
    assert DEVICE_SCRIPTS == sorted(run_manifest(REPO / "micropython_mod" / "manifest.py")[0][2])
    assert (BOARD / "no-micropython-lib" / "README.md").is_file()  # MPY_LIB_DIR's stand-in


def test_emulate_prints_the_pty_first_and_stops_qemu_on_sigterm(tmp_path):
    """Against a fake QEMU: the first line is the pty, SIGTERM stops QEMU and exits 0."""
    marker = tmp_path / "qemu-stopped"
    args_file = tmp_path / "qemu-args"
    bindir = fake_qemu(tmp_path, 'echo "$@" > %s\ntrap \'touch %s; exit 0\' TERM\n'
                                 'echo "char device redirected to /dev/pts/77 (label serial0)" >&2\n'
                                 'while true; do sleep 0.1; done\n' % (args_file, marker))
    env = dict(os.environ, PATH="%s:%s" % (bindir, os.environ["PATH"]))
    p = subprocess.Popen([sys.executable, "-m", "tinygpt.cli", "emulate", "--firmware", str(fake_elf(tmp_path))],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        first = p.stdout.readline().strip()
        assert first == "/dev/pts/77"
        p.send_signal(signal.SIGTERM)
        assert p.wait(20) == 0, p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
    assert marker.exists(), "QEMU was not stopped"
    assert "loader,file=%s,addr=0x60800000" % SHIPPED in args_file.read_text()


def test_qemu_that_fails_to_start_is_reported(tmp_path, monkeypatch):
    bindir = fake_qemu(tmp_path, 'echo "qemu-system-arm: -machine mps2-an500: unsupported machine" >&2\nexit 1\n')
    monkeypatch.setenv("PATH", "%s:%s" % (bindir, os.environ["PATH"]))
    with pytest.raises(emulate.EmulateError, match="did not start.*unsupported machine"):
        emulate.Emulator(fake_elf(tmp_path), SHIPPED)


# -- integration: the real firmware on QEMU ---------------------------------------------------

FIRMWARE = os.environ.get("TINYGPT_QEMU_FIRMWARE")
needs_firmware = pytest.mark.skipif(
    not FIRMWARE, reason="set TINYGPT_QEMU_FIRMWARE to a TINYGPT_QEMU firmware.elf; build one with MicroPython at "
                         "./micropython: `%s` (then micropython/ports/qemu/build-TINYGPT_QEMU/firmware.elf)"
                         % emulate.BUILD_COMMAND)


@pytest.fixture(scope="module")
def board():
    """A running emulated board with the shipped model in its region and instruction counting."""
    with emulate.Emulator(FIRMWARE, SHIPPED, icount=True) as emu:
        yield emu


def board_exec(emu, code, timeout=BOARD_TIMEOUT):
    """Run code on the board (raw REPL); returns its output. Raises with the board's error."""
    with BoardChat(emu.pty, timeout=timeout) as b:
        return b._exec(code, None, timeout)


def board_eval(emu, expr_code, timeout=BOARD_TIMEOUT):
    """Run code whose last line prints repr(result) after a marker; returns the result."""
    out = board_exec(emu, expr_code, timeout)
    return ast.literal_eval(out[out.rindex("\x1e") + 1:].strip())


def mpremote(emu, *args):
    """Run the unmodified mpremote against the board; checks it succeeded."""
    r = subprocess.run([sys.executable, "-m", "mpremote", "connect", emu.pty] + list(args),
                       capture_output=True, text=True, timeout=BOARD_TIMEOUT)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def host_chat():
    if str(PY_DIR) not in sys.path:
        sys.path.insert(0, str(PY_DIR))
    import chat
    return chat


@needs_firmware
def test_shipped_model_answers_like_the_pc(board):
    chat = host_chat()
    chat.load(str(SHIPPED))
    want = [chat.ask(q, stream=False) for q in QUESTIONS]
    got = board_eval(board, "import chat\nr = [chat.ask(q, stream=False) for q in %r]\nprint('\\x1e' + repr(r))\n"
                     % QUESTIONS, timeout=600)
    assert got == want


@needs_firmware
def test_model_partition_is_mapped(board):
    info = board_eval(board, "import tinygpt\nm = tinygpt.Model('model')\nprint('\\x1e' + repr(m.info()))\n"
                             "m.close()\n")
    with Model(SHIPPED) as m:
        host = m.info()
    assert info["mapped"] is True
    assert info["file_bytes"] == host["file_bytes"]  # the header's file_size (drafts may follow it)
    for k in ("n_vocab", "n_layer", "n_embd", "weight_bytes", "kv_bytes", "scratch_bytes"):
        assert info[k] == host[k], k


@needs_firmware
def test_tokenizer_matches_hf(board):
    tokenizers = pytest.importorskip("tokenizers")
    lines = [ln for ln in (REPO / "data" / "corpus.txt").read_text(encoding="utf-8").splitlines() if ln][:40]
    lines += EXTRA_LINES
    hf = tokenizers.Tokenizer.from_file(str(TOKENIZER_JSON))
    want = [e.ids for e in hf.encode_batch(lines, add_special_tokens=False)]
    got = []
    for i in range(0, len(lines), 8):  # a few lines per exchange: a short raw-REPL exchange each
        got += board_eval(board, "import chat\nif chat._tok is None:\n    chat.load()\n"
                                 "print('\\x1e' + repr([chat._tok.encode(s) for s in %r]))\n" % lines[i:i + 8])
    assert len(got) == len(lines)
    for line, g, w in zip(lines, got, want):
        assert g == w, line


@needs_firmware
def test_selftest_crc_equals_the_pc(board):
    # The self-test is what a user runs at first boot. After the tests above (a model and its
    # tokenizer loaded, 40 corpus lines tokenized) the GC heap can be too fragmented for a second
    # 4,096-token tokenizer: a 38 KB block failed with the shipped model of 2026-12-02 while
    # 121 KB of a 256 KB heap were free. A soft reset gives the self-test the heap a user has.
    mpremote(board, "soft-reset")
    out = board_exec(board, "import selftest\nselftest.run()\n", timeout=600)
    print("\n[board self-test]\n" + out)
    chat = host_chat()
    import selftest
    buf = io.StringIO()
    with redirect_stdout(buf):
        selftest.run(str(SHIPPED))
    host_out = buf.getvalue()

    def line(text, name):
        return re.search(r"^%s\s+(.*)$" % name, text, re.M).group(1).strip()
    assert line(out, "bit-exact") == line(host_out, "bit-exact")
    assert line(out, "answer") == line(host_out, "answer")
    assert "mapped, zero copy" in line(out, "model")
    assert re.search(r"^instructions\s+\d+\.\d M per generated token", out, re.M)  # --icount
    assert "0x60000000" in line(out, "memory")
    heap = re.findall(r"(\d+) KB used", line(out, "GC heap"))
    # the loaded model takes under 256 KB of GC heap, plus what `tinygpt budget` counts for its
    # meta section (the word index)
    head = board_mod.read_model_header(SHIPPED)
    index_heap = board_mod.meta_heap_bytes(head["meta_bytes"], head["has_index"])
    assert len(heap) == 2 and int(heap[1]) * 1024 < 256 * 1024 + index_heap, (heap, index_heap)
    chat.close()


@needs_firmware
def test_deploy_round_trip(board, tmp_path):
    """`tinygpt deploy` to the board's RAM filesystem: a small model read from the file computes
    bit for bit what the PC computes."""
    from tinygpt import deploy
    from test_mcu import tiny_hparams

    path = tmp_path / "tiny.bin"
    # small: the emulated UART takes ~3 KB/s of mpremote's copy traffic
    path.write_bytes(bench.random_model_bytes(tiny_hparams(n_vocab=300, n_embd=32, n_inner=64, n_layer=1,
                                                           n_positions=32, n_head=2)))
    hashes = deploy.deploy(board.pty, path, scripts=True, log=lambda *a: None, timeout=BOARD_TIMEOUT)
    try:
        assert set(hashes) >= {"model.bin", "chat.py", "bpe.py"}
        ids = [5, 17, 3, 99, 42]
        code = ("import tinygpt, selftest\nm = tinygpt.Model('/model.bin')\n"
                "r = selftest.check(m, %r)\nprint('\\x1e' + repr([r[0], r[1], m.info()['mapped']]))\nm.close()\n" % ids)
        crc, greedy, mapped = board_eval(board, code)
        host_chat()
        import selftest
        with Model(path) as m:
            want = selftest.check(m, ids)
        assert (crc, greedy) == (want[0], want[1]) and mapped is False
        # and the deployed scripts are what the board imports (the filesystem comes before .frozen)
        assert board_eval(board, "import chat\nprint('\\x1e' + repr(chat.__file__))\n") == "chat.py"
    finally:  # back to the frozen scripts (compiled from source they take GC heap the later tests need)
        board_exec(board, "import os\nfor n in ('chat.py', 'bpe.py', 'model.bin'):\n    os.remove(n)\n")
        mpremote(board, "soft-reset")  # the filesystem survives it


@needs_firmware
def test_llama_model_on_the_board(board, tmp_path):
    """A Llama model (format version 3: grouped-query attention, own head) deployed to the
    board's filesystem gives the PC's logits CRC, greedy tokens and generate() ids."""
    from tinygpt import deploy

    path = tmp_path / "llama.bin"
    path.write_bytes(bench.random_model_bytes(dict(
        n_vocab=300, n_embd=32, n_inner=48, n_layer=1, n_positions=32, n_head=4, n_kv_head=2, arch="llama",
        head_tied=False)))
    deploy.deploy(board.pty, path, scripts=False, log=lambda *a: None, timeout=BOARD_TIMEOUT)
    try:
        ids = [5, 17, 3, 99, 42]
        code = ("import tinygpt, selftest, chat\nm = tinygpt.Model('/model.bin')\nr = selftest.check(m, %r)\n"
                "info = m.info()\nm.close()\nchat.load('/model.bin')\ng = chat.generate_ids(%r, 6)[0]\n"
                "chat.close()\nprint('\\x1e' + repr([r[0], r[1], info['arch'], info['n_kv_head'], g]))\n"
                % (ids, ids))
        crc, greedy, arch, kv, gen = board_eval(board, code)
        chat = host_chat()
        import selftest
        with Model(path) as m:
            want = selftest.check(m, ids)
        chat.load(str(path))
        want_gen = chat.generate_ids(ids, 6)[0]
        chat.close()
        assert (crc, greedy, arch, kv, gen) == (want[0], want[1], "llama", 2, want_gen)
    finally:
        board_exec(board, "import os\nos.remove('model.bin')\n")
        mpremote(board, "soft-reset")


@needs_firmware
def test_engine_errors_read_like_the_pcs(board, tmp_path):
    """Error messages with numbers: the board's (MicroPython's vsnprintf) equal the PC's."""
    data = SHIPPED.read_bytes()
    cases = {"short.bin": data[:50], "trunc.bin": data[:1000]}  # small: the code must fit the GC heap
    code = ["import tinygpt\nr = {}\n"]
    for name, blob in cases.items():
        code.append("with open(%r, 'wb') as f:\n    f.write(%r)\n" % ("/" + name, blob))
        code.append("try:\n    tinygpt.Model(%r)\nexcept Exception as e:\n    r[%r] = str(e)\n" % ("/" + name, name))
    code.append("print('\\x1e' + repr(r))\n")
    got = board_eval(board, "".join(code))
    for name, blob in cases.items():
        p = tmp_path / name
        p.write_bytes(blob)
        with pytest.raises(Exception) as e:
            Model(p)
        assert got[name].startswith("file is %d bytes" % len(blob)), got[name]
        assert not re.search(r"\blu\b", got[name]), got[name]
        if name == "trunc.bin":
            assert got[name] == str(e.value)
        # (a file shorter than the header: the PC checks the header's size against the file's
        # first and names both; the board's loader says "shorter than the 128-byte header")


@needs_firmware
def test_ctrl_c_stops_an_answer(board):
    with BoardChat(board.pty, timeout=BOARD_TIMEOUT) as b:
        # The shipped model checks its answers against its word index and shows them whole once
        # decided; without the index (as for a model file that has none) the answer streams, and
        # Ctrl-C as soon as it starts stops it.
        b._exec("import chat\nchat.load()\nchat._index = None\n", None)
        seen = []

        def on_text(text):
            if not seen:
                b.interrupt()  # Ctrl-C as soon as the answer starts streaming
            seen.append(text)
        t0 = time.monotonic()
        out = b._exec("chat.ask('What is PSRAM?', max_new_tokens=80)\n", on_text)
        assert "[interrupted]" in out
        assert time.monotonic() - t0 < BOARD_TIMEOUT


@needs_firmware
def test_unmodified_mpremote(board):
    r = mpremote(board, "exec", "import tinygpt; print(tinygpt.Model('model').info()['n_layer'])")
    with Model(SHIPPED) as m:
        assert r.stdout.strip() == str(m.info()["n_layer"])


@needs_firmware
def test_tinygpt_ask_and_chat_with_port(board):
    """The host CLI against the emulated board, as a user runs it."""
    chat = host_chat()
    chat.load(str(SHIPPED))
    want = chat.ask("What is WiFi?", stream=False)
    cli = [sys.executable, "-m", "tinygpt.cli"]
    r = subprocess.run(cli + ["ask", "--port", board.pty, "What is WiFi?"], capture_output=True, text=True,
                       timeout=BOARD_TIMEOUT, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert want in r.stdout
    r = subprocess.run(cli + ["chat", "--port", board.pty], input="What is WiFi?\n\n", capture_output=True,
                       text=True, timeout=BOARD_TIMEOUT, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert want in r.stdout


@needs_firmware
def test_indexed_shipped_model_answers_and_abstains_like_the_pc(tmp_path):
    """The shipped model with its corpus's word index (tinygpt index; 182 KB of meta) loads in the
    board's GC heap and checks its answers as the PC does: the same answers, the abstain answer
    for off-topic questions included."""
    from tinygpt import cli

    indexed = tmp_path / "indexed.bin"
    assert cli.main(["index", str(SHIPPED), "--corpus", str(REPO / "data" / "corpus.txt"), "-o", str(indexed)]) == 0
    questions = QUESTIONS + ["Who wrote Hamlet?", "How do I bake sourdough bread?", "purple monkey dishwasher"]
    chat = host_chat()
    chat.load(str(indexed))
    want = [chat.ask(q, stream=False) for q in questions]
    abstain = chat.abstain_answer()
    chat.close()
    assert abstain and abstain in want  # the off-topic questions are refused on the PC
    import selftest
    buf = io.StringIO()
    with redirect_stdout(buf):
        selftest.run(str(indexed))
    host_crc = re.search(r"^bit-exact\s+(.*)$", buf.getvalue(), re.M).group(1)
    with emulate.Emulator(FIRMWARE, indexed) as emu:
        # first, as a user does: the self-test, whose 16 KB logits() copies need a heap that
        # loading the 182 KB index left unfragmented (it failed with MemoryError before)
        out = board_exec(emu, "import selftest\nselftest.run()\n", timeout=600)
        assert re.search(r"^bit-exact\s+(.*)$", out, re.M).group(1).strip() == host_crc.strip(), out
        mpremote(emu, "soft-reset")
        got = board_eval(emu, "import gc, chat\nchat.load('model')\ngc.collect()\n"
                              "r = [chat.ask(q, stream=False) for q in %r]\n"
                              "print('\\x1e' + repr([r, chat._index is not None, gc.mem_free()]))\n" % questions,
                         timeout=900)
    answers, has_index, free = got
    assert has_index and answers == want
    print("\n[indexed model on the board] GC heap free after chat.load: %d bytes" % free)
