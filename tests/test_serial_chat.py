"""tinygpt.serial_chat (issue 5): `tinygpt chat --port` and `tinygpt ask --port`, questions in and
answers out over the board's raw REPL, against a virtual board: settings, errors, Ctrl-C, time
limits, a board that goes away.

The virtual board and what the board tests share: tests/board_helpers.py.
"""
import os
import subprocess
import sys

import pytest

from board_helpers import BOARD_TIMEOUT, REAL_MODULE, models, need_micropython, vboard  # noqa: F401
from double.vboard import VirtualBoard
from tinygpt import board, deploy, serial_chat


@BOARD_TIMEOUT
def test_board_chat_write_has_a_time_limit(tmp_path):
    """A board that answers the raw REPL, then stops reading: sending a question fails after the
    timeout with a message (before: the write blocked for ever once the tty buffer was full)."""
    import threading
    import time

    master, slave = os.openpty()
    import tty
    tty.setraw(slave)
    port = tmp_path / "ttyHUNG"
    os.symlink(os.ttyname(slave), port)

    def board():  # answer Ctrl-A with the raw REPL prompt, then read nothing more
        buf = b""
        while b"\x01" not in buf:
            buf += os.read(master, 1024)
        os.write(master, serial_chat.RAW_PROMPT)

    threading.Thread(target=board, daemon=True).start()
    try:
        b = serial_chat.BoardChat(str(port), timeout=2)
        t0 = time.monotonic()
        with pytest.raises(serial_chat.SerialChatError, match="lost the board on .*ttyHUNG: Write timeout"):
            b.ask("x" * 1000000)
        assert time.monotonic() - t0 < 30
    finally:
        os.close(master)
        os.close(slave)


def expected_answer(model, question, max_new_tokens=80):
    """The double echoes (one byte per token); the real module answers what the PC's engine
    answers (greedy, same model: bit-exact)."""
    if not REAL_MODULE:
        return (" echo: " + question).encode()[:max_new_tokens].decode().strip()
    r = subprocess.run([sys.executable, "-m", "tinygpt.cli", "ask", "--model", str(model),
                        "--max-new-tokens", str(max_new_tokens), question],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@BOARD_TIMEOUT
def test_ask_board_question_in_answer_out(vboard, models):
    deploy.deploy(vboard.port, models[0], log=lambda s: None)
    q = "What is PSRAM? \u00e9t\u00e9"
    streamed = []
    answer = serial_chat.ask_board(vboard.port, q, timeout=60, on_text=streamed.append)
    assert answer == expected_answer(models[0], q)
    assert "".join(streamed).strip() == answer
    # settings reach chat.ask on the board; its errors come back as one line
    with serial_chat.BoardChat(vboard.port, timeout=60) as b:
        assert b.ask("What is flash?", {"max_new_tokens": 4}) == expected_answer(models[0], "What is flash?", 4)
        with pytest.raises(serial_chat.SerialChatError, match="the board says: ValueError: empty question"):
            b.ask("\x00\x07")  # control characters only: chat.ask on the board refuses it
        assert b.ask("Still there?") == expected_answer(models[0], "Still there?")
        # issue 9 D13: settings the board cannot take are refused on the PC (before: the board said
        # "NameError: name 'nan' isn't defined"), and the session goes on
        for bad, msg in (({"temperature": float("nan")}, "temperature must be finite and >= 0"),
                         ({"top_p": float("inf")}, r"top_p must be in \(0, 1\]"),
                         ({"repetition_penalty": -1.0}, "repetition_penalty must be finite and > 0"),
                         ({"top_k": True}, "top_k must be an int"), ({"color": 1}, "unknown setting color"),
                         ({"max_new_tokens": 0}, "max_new_tokens must be an int >= 1, not 0")):
            with pytest.raises(serial_chat.SerialChatError, match=msg):
                b.ask("x", bad)
        assert b.ask("Still there?") == expected_answer(models[0], "Still there?")


@BOARD_TIMEOUT
@pytest.mark.skipif(REAL_MODULE, reason="the double's slow answer is what gets interrupted")
def test_ctrl_c_stops_the_answer_on_the_board(vboard, models):
    deploy.deploy(vboard.port, models[0], log=lambda s: None)
    with serial_chat.BoardChat(vboard.port, timeout=60) as b:
        seen = []

        def on_text(s):  # the user presses Ctrl-C once the answer is streaming
            seen.append(s)
            if len(seen) == 3:
                raise KeyboardInterrupt
        answer = b.ask("please answer slowly, slow", None, on_text)
        assert set(answer) == {"."} and len(answer) < 40  # 80 dots unless interrupted
        assert "[interrupted]" in "".join(seen)
        assert b.ask("And now?") == "echo: And now?"  # the board's REPL is fine


@BOARD_TIMEOUT
def test_chat_port_cli(vboard, models):
    deploy.deploy(vboard.port, models[0], log=lambda s: None)
    r = subprocess.run([sys.executable, "-m", "tinygpt.cli", "chat", "--port", vboard.port, "--max-new-tokens", "60"],
                       input="Hello board\nWhere is the model?\n\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "A: %s\n" % expected_answer(models[0], "Hello board", 60) in r.stdout
    assert "A: %s\n" % expected_answer(models[0], "Where is the model?", 60) in r.stdout
    r = subprocess.run([sys.executable, "-m", "tinygpt.cli", "chat", "--port", vboard.port, "--model", "x.bin"],
                       input="", capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "with --port the board answers with its own model" in r.stderr
    r = subprocess.run([sys.executable, "-m", "tinygpt.cli", "chat", "--port", "/nonexistent/tty"],
                       input="", capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "/nonexistent/tty does not exist" in r.stderr


@BOARD_TIMEOUT
def test_ask_port_cli(vboard, models):
    """`tinygpt ask --port P "question"`: the board's answer, printed as `tinygpt ask` prints the PC's."""
    deploy.deploy(vboard.port, models[0], log=lambda s: None)
    r = subprocess.run([sys.executable, "-m", "tinygpt.cli", "ask", "--port", vboard.port, "--max-new-tokens", "60",
                        "Hello board"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == expected_answer(models[0], "Hello board", 60)
    r = subprocess.run([sys.executable, "-m", "tinygpt.cli", "ask", "--port", vboard.port, "One?", "Two?"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "Q: One?" and lines[2] == "Q: Two?"
    assert lines[1].strip() == expected_answer(models[0], "One?") and lines[3].strip() == expected_answer(models[0], "Two?")
    # the board's refusal of a setting is one line, as on the PC
    r = subprocess.run([sys.executable, "-m", "tinygpt.cli", "ask", "--port", vboard.port, "--max-new-tokens", "0", "x"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip() == "tinygpt: error: --max-new-tokens must be an int >= 1, not 0"


@BOARD_TIMEOUT
def test_a_virtual_board_that_fails_closes_its_port(tmp_path, models):
    """If the virtual board's relay fails (e.g. the interpreter does not come back from a soft
    reset), the tools on its port fail at once instead of waiting forever."""
    need_micropython()
    with VirtualBoard(tmp_path / "vb", fs_size=64 * 1024) as b:
        def broken(data):
            raise RuntimeError("virtual board did not come back: test")
        b._from_board = broken
        import time
        t0 = time.monotonic()
        with pytest.raises(board.BoardError):  # the port is gone, or is lost while we talk
            serial_chat.ask_board(b.port, "Anyone there?", timeout=30)
        assert time.monotonic() - t0 < 20
        b._thread.join(5)
        assert isinstance(b.error, RuntimeError) and not os.path.exists(b.port)


def test_a_tty_that_vanishes_is_a_lost_board(tmp_path, monkeypatch):
    """pyserial's POSIX port raises termios.error (not an OSError) when the tty goes away under it."""
    import termios

    import serial

    class Vanished:
        in_waiting = 0

        def write(self, data):
            return len(data)

        def flush(self):
            pass

        def read(self, n=1):
            return b""

        def reset_input_buffer(self):
            raise termios.error(5, "Input/output error")

        def close(self):
            pass
    monkeypatch.setattr(serial, "serial_for_url", lambda *a, **k: Vanished())
    port = tmp_path / "ttyACM0"
    port.write_bytes(b"")
    with pytest.raises(serial_chat.SerialChatError, match=r"lost the board on .*ttyACM0: .*Input/output error"):
        serial_chat.ask_board(str(port), "Anyone there?", timeout=5)
