"""Issue 26, a hostile pass over the newest surfaces: a board (or a program on its port) that
lies, stalls or prints garbage during `tinygpt deploy`, `ask --port` and `chat --port`; the
on-board self-test; `tinygpt emulate` with bad models and a misbehaving QEMU; `corpus augment`
with hostile corpora and outputs. Each test failed (a traceback, a hang, lost data or a wrong
result) before its fix. `--resume` with a damaged checkpoint is in tests/test_defects.py (D2).

The deploy tests run a fake `mpremote` (a small Python script, FAKE_MPREMOTE below) in place of
the real one, so the board can do what no virtual board does; the serial tests use
tests/test_defects.py's ScriptedBoard, a serial port whose raw REPL answers as a test says."""
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO, default_sigint
from test_defects import ScriptedBoard, scripted  # noqa: F401 - the fixture
from tinygpt import augment, bench, cli, corpus, deploy, emulate, modelfile, serial_chat
from tinygpt.board import BoardError

CORPUS = ("Q: What is a board?\nA: A board is a small computer.\n\n"
          "Q: How do I reset it?\nA: Press the reset button.\n")


def small_model(path, n_positions=128):
    hp = modelfile.normalize_hparams(dict(n_vocab=300, n_positions=n_positions, n_embd=32, n_head=2, n_layer=1,
                                          n_inner=64, eos_id=0))
    modelfile.atomic_write_bytes(path, bench.random_model_bytes(hp, seed=1))
    return path


# ----------------------------------------------------------------------------- corpus augment

def test_augment_to_a_directory_is_refused_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    """Before: "[Errno 21] Is a directory: 'out.tmp' -> 'out'" with out.tmp left beside it, and
    for -o . "PosixPath('.') has an empty name"."""
    src = tmp_path / "c.txt"
    src.write_text(CORPUS)
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path)
    for out in ("out", ".", str(tmp_path) + "/"):
        with pytest.raises(SystemExit) as e:
            cli.main(["corpus", "augment", "c.txt", "-o", out])
        assert e.value.code == 2
        assert "is a directory; give the file to write" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt", "out"] and src.read_text() == CORPUS


def test_augment_never_writes_over_an_input_named_like_its_temp_file(tmp_path):
    """Before: augmenting c.txt.tmp into c.txt wrote the temp file OUT.tmp, the input itself,
    then renamed it away: the input was gone."""
    src = tmp_path / "c.txt.tmp"
    src.write_text(CORPUS)
    augment.augment_file(src, tmp_path / "c.txt", per_question=2)
    assert src.read_text() == CORPUS
    assert (tmp_path / "c.txt").read_text().startswith(CORPUS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt", "c.txt.tmp"]


def test_augment_refuses_a_hard_link_to_the_input_and_keeps_crlf_bytes(tmp_path):
    src = tmp_path / "c.txt"
    src.write_bytes(CORPUS.replace("\n", "\r\n").encode())
    os.link(src, tmp_path / "same.txt")
    with pytest.raises(ValueError, match="is the input corpus"):
        augment.augment_file(src, tmp_path / "same.txt")
    augment.augment_file(src, tmp_path / "out.txt", per_question=2)
    assert (tmp_path / "out.txt").read_bytes().startswith(src.read_bytes())  # byte for byte, CRs kept
    assert (tmp_path / "out.txt").stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


def test_a_utf16_corpus_is_one_problem_that_says_so(tmp_path):
    """Before: one "undecodable UTF-8" problem per line, none saying why."""
    p = tmp_path / "c.txt"
    p.write_bytes(CORPUS.encode("utf-16"))
    problems = corpus.check(p)
    assert len(problems) == 1 and "is UTF-16 (little-endian byte order mark FF FE), not UTF-8" in problems[0].message
    with pytest.raises(ValueError, match="UTF-16"):
        augment.augment_file(p, tmp_path / "o.txt")


# ----------------------------------------------------------------------------- deploy: a fake mpremote

FAKE_MPREMOTE = r'''
import ast, hashlib, json, os, re, sys, time
mode, state_path = os.environ["FAKE_MODE"], os.environ["FAKE_STATE"]
state = json.load(open(state_path)) if os.path.exists(state_path) else {}
args = sys.argv[3:]  # after "connect PORT"
out = sys.stdout.buffer
def save():
    json.dump(state, open(state_path, "w"))
if state.get("_dead"):
    time.sleep(3600)
code, rest = args[1], args[2:]
if "TGQ" in code:
    if mode == "endless":  # 200 MB as fast as the pipe takes them, then nothing more, never an answer
        for _ in range(200 * 16):
            out.write(b"x" * 65536)
        out.flush()
        time.sleep(3600)
    if mode == "garbage":
        out.write(b"\xff\xfe\x00line noise \x80\r\n")
    names = ast.literal_eval(re.search(r"for n in (\[.*?\])\}", code).group(1))
    out.write(("TGQ" + json.dumps({"cwd": "/", "bsize": 4096, "frsize": 4096, "blocks": 10000, "bfree": 9000,
                                   "bavail": 9000, "files": {n: state.get(n) for n in names}})).encode() + b"\r\n")
elif "TGD" in code:
    for n in ast.literal_eval(re.search(r"for n in (\[.*?\]):", code).group(1)):
        state.pop(n, None)
    out.write(b"TGD\r\n")
elif "TGR" in code:
    for a, b in ast.literal_eval(re.search(r"for a, b in (\[.*?\]):", code).group(1)):
        state[b] = state.pop(a)
    out.write(b"TGR\r\n")
if rest:  # + cp -f LOCAL :REMOTE
    if mode == "dies":
        state["_dead"] = True
        save()
        time.sleep(3600)
    if mode == "garbage":
        out.write(b"\x80\x81 copy noise\r\n")
    data = open(rest[3], "rb").read()
    state[rest[4][1:]] = [len(data), hashlib.sha256(data).hexdigest()]
save()
'''


@pytest.fixture
def fake_board(tmp_path, monkeypatch):
    script = tmp_path / "fake_mpremote.py"
    script.write_text(FAKE_MPREMOTE)
    port = tmp_path / "ttyFAKE"
    port.write_bytes(b"")
    monkeypatch.setattr(deploy, "mpremote_command", lambda: [sys.executable, str(script)])
    monkeypatch.setenv("FAKE_STATE", str(tmp_path / "state.json"))

    def make(mode):
        monkeypatch.setenv("FAKE_MODE", mode)
        return str(port)
    return make


def test_deploy_takes_line_noise_from_the_board(fake_board, tmp_path, capsys):
    """Before: "tinygpt: error: 'utf-8' codec can't decode byte 0xff in position 0" (mpremote's
    output was decoded strictly), and no deploy through a noisy link."""
    port = fake_board("garbage")
    model = small_model(tmp_path / "m.bin")
    assert cli.main(["deploy", "--port", port, "--model", str(model), "--no-scripts", "--timeout", "20"]) == 0
    assert "model.bin.new: verified" in capsys.readouterr().out


def test_deploy_from_a_board_that_prints_without_end_keeps_little(fake_board, tmp_path):
    """Before: every byte was kept until the time limit (4 GB in 3 s from a fast port; here the
    board stops after 200 MB)."""
    import resource

    port = fake_board("endless")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB
    t0 = time.monotonic()
    with pytest.raises(deploy.DeployError, match="cannot talk to the board on .*: mpremote timed out after 5 s"):
        deploy.deploy(port, small_model(tmp_path / "m.bin"), scripts=False, timeout=5, log=lambda s: None)
    assert time.monotonic() - t0 < 20
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 100 * 1024


def test_deploy_gives_up_at_once_on_a_board_that_stops_answering(fake_board, tmp_path):
    """A board that goes silent in the middle of a copy: one copy and one query run out of time,
    then deploy stops. Before: every file of every retry waited its whole time limit (8 files x
    4 tries: 100 s with --timeout 3; with the default limits more than an hour)."""
    port = fake_board("dies")
    t0 = time.monotonic()
    with pytest.raises(deploy.DeployError, match=r"stopped answering: the copy of model.bin and then the file query "
                                                 r"ran out of time \(mpremote timed out after 2 s\), so deploy gave "
                                                 r"up without further retries; nothing on the board was replaced"):
        deploy.deploy(port, small_model(tmp_path / "m.bin"), timeout=2, log=lambda s: None)
    assert time.monotonic() - t0 < 12


# ----------------------------------------------------------------------------- ask --port / chat --port

def _answer(text, rep):
    def behaviour(code):
        return (text + serial_chat.MARK + rep + "\r\n").encode() + b"\x04\x04>"
    return behaviour


@pytest.mark.parametrize("rep", ["{[]: 1}", "{{}}"])
def test_an_answer_that_is_no_literal_is_an_error(scripted, rep, capsys):  # noqa: F811
    """Before: TypeError (unhashable type) from ast.literal_eval, a traceback."""
    port, _board = scripted(_answer("A: x ", rep))
    with pytest.raises(SystemExit) as e:
        cli.main(["ask", "--port", port, "--timeout", "5", "What is it?"])
    assert e.value.code == 2 and "unexpected answer from the board" in capsys.readouterr().err


def test_an_answer_with_a_record_separator_is_shown_whole(scripted, capsys):  # noqa: F811
    """Before: everything from the answer's first "\\x1e" (the first character of the end
    marker) was held back and never shown, though ask returned it."""
    port, _board = scripted(_answer("A: a \x1e b\r\n", repr("a \x1e b")))
    assert cli.main(["ask", "--port", port, "--timeout", "5", "What is it?"]) == 0
    assert capsys.readouterr().out == "A: a \x1e b\r\n"
    shown = []
    port, _board = scripted(_answer("A: split ", repr("split")))
    assert serial_chat.ask_board(port, "What is it?", timeout=5, on_text=shown.append) == "split"
    assert "".join(shown) == "A: split "


def test_an_error_that_never_ends_is_kept_short(scripted):  # noqa: F811
    def behaviour(code):
        def gen():
            yield b"A: x\x04"  # the end of the output; then an error text without end
            while True:
                yield b"E" * 65536
        return gen()
    port, board = scripted(behaviour)
    b = serial_chat.BoardChat(port, timeout=2)
    with pytest.raises(serial_chat.SerialChatError, match="no answer from the board"):
        b.ask("What is it?")
    assert len(b._buf) <= 2 * b.max_output + 65536


def test_a_huge_timeout_is_no_overflow_error():
    """Before: --timeout 1e10 (or inf) became pyserial's write timeout: OverflowError, a traceback."""
    master, slave = os.openpty()
    import tty
    tty.setraw(slave)
    stop = threading.Event()

    def board():  # answers Ctrl-A with the raw REPL prompt
        while not stop.is_set():
            try:
                data = os.read(master, 1024)
            except OSError:
                return
            if b"\x01" in data:
                os.write(master, serial_chat.RAW_PROMPT)
    t = threading.Thread(target=board, daemon=True)
    t.start()
    try:
        for timeout in (1e10, float("inf")):
            serial_chat.BoardChat(os.ttyname(slave), timeout=timeout).close()
    finally:
        stop.set()
        os.close(slave)
        os.close(master)


# ----------------------------------------------------------------------------- the self-test

def test_selftest_of_a_short_context_model(tmp_path, capsys):
    """Before: a model of 8 or 16 positions failed the self-test with a traceback ("1 tokens do
    not fit"): the prompt and 8 greedy steps did not fit its context."""
    for n in (8, 16):
        m = small_model(tmp_path / ("ctx%d.bin" % n), n_positions=n)
        assert cli.main(["info", "--selftest", str(m)]) == 0
        out = capsys.readouterr().out
        assert "+ 1 greedy steps" in out and "self-test done" in out


def test_selftest_of_the_shipped_model_is_unchanged(capsys):
    assert cli.main(["info", "--selftest", str(REPO / "models" / "default" / "model.bin")]) == 0
    assert "crc32 5f6df490 (prompt 7 tokens + 8 greedy steps: 11 341 2240 66 2283 1078 79 1476)" \
        in capsys.readouterr().out  # the README's line: the board's CRC is compared with it


# ----------------------------------------------------------------------------- tinygpt emulate

def fake_qemu(tmp_path, body, monkeypatch):
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    q = d / "qemu-system-arm"
    q.write_text("#!/bin/sh\n" + body)
    q.chmod(0o755)
    monkeypatch.setenv("PATH", "%s:%s" % (d, os.environ["PATH"]))
    elf = tmp_path / "firmware.elf"
    elf.write_bytes(b"\x7fELF" + bytes(60))
    return elf


def test_emulate_refuses_a_model_that_only_starts_like_one(tmp_path, monkeypatch):
    """Before: "TGPT" and then anything was loaded; the board failed only at Model("model")."""
    elf = fake_qemu(tmp_path, "exit 1\n", monkeypatch)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"TGPT" + bytes(range(256)) * 20)
    with pytest.raises(BoardError, match="model format version"):
        emulate.Emulator(elf, junk)


def test_emulate_survives_a_pty_line_without_a_path(tmp_path, monkeypatch):
    """Before: IndexError in QEMU's output reader ("Exception in thread", a traceback)."""
    monkeypatch.setattr(emulate, "PTY_TIMEOUT", 2.0)
    crashed = []
    monkeypatch.setattr(threading, "excepthook", crashed.append)
    elf = fake_qemu(tmp_path, 'printf "char device redirected to \\n" >&2\nexec sleep 30\n', monkeypatch)
    with pytest.raises(emulate.EmulateError, match="did not start"):
        emulate.Emulator(elf, None)
    assert not crashed, crashed[0].exc_value


def test_emulate_noise_is_one_short_line_and_qemu_children_stop(tmp_path, monkeypatch):
    """A firmware that prints binary noise without a newline and a QEMU whose child holds the
    output pipe: the error is one printable line, and it comes at the time limit (before: 10 s
    more waiting for the pipe to close, and the whole noise kept in memory)."""
    monkeypatch.setattr(emulate, "PTY_TIMEOUT", 2.0)
    elf = fake_qemu(tmp_path, "head -c 300000 /dev/urandom | tr -d '\\n' >&2\nsleep 30\n", monkeypatch)
    t0 = time.monotonic()
    with pytest.raises(emulate.EmulateError, match="did not start") as e:
        emulate.Emulator(elf, None)
    assert time.monotonic() - t0 < 8
    msg = str(e.value)
    assert msg.isprintable() and len(msg) < 2000


def test_ctrl_c_while_qemu_starts_stops_qemu(tmp_path, monkeypatch):
    """Before: Ctrl-C while waiting for QEMU's pty left QEMU running (it has a session of its own)."""
    pid_file = tmp_path / "qemu.pid"
    elf = fake_qemu(tmp_path, "echo $$ > %s\nexec sleep 300\n" % pid_file, monkeypatch)
    p = subprocess.Popen([sys.executable, "-m", "tinygpt.cli", "emulate", "--firmware", str(elf)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                         preexec_fn=default_sigint)
    try:
        t0 = time.monotonic()
        while not pid_file.exists() or not pid_file.read_text().strip():
            assert time.monotonic() - t0 < 15, "fake QEMU did not start"
            time.sleep(0.1)
        time.sleep(0.5)
        p.send_signal(signal.SIGINT)
        assert p.wait(20) == 130
        assert "tinygpt: interrupted" in p.stdout.read()
    finally:
        if p.poll() is None:
            p.kill()
    qemu = int(pid_file.read_text())
    for _ in range(50):
        try:
            os.kill(qemu, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(qemu, signal.SIGKILL)
        pytest.fail("QEMU was left running after Ctrl-C")
