"""`tinygpt chat --port P`: ask the board questions over its serial REPL.

    tinygpt chat --port /dev/ttyACM0          # interactive; empty line or Ctrl-D leaves
    tinygpt ask --port /dev/ttyACM0 "What is PSRAM?"   # one question (or several), its answer
    ask_board("/dev/ttyACM0", "What is PSRAM?", timeout=60) -> answer text   (for scripts, tests)

The board runs py/chat.py (frozen into the tinygpt firmware, or copied by `tinygpt deploy`), so
the answer is computed on the board, by the same code as `tinygpt ask` on the PC. The host side
speaks MicroPython's raw REPL (Ctrl-A), the protocol mpremote and pyboard.py use: it sends
`import chat` and `chat.ask(<question>)`, and prints the answer as the board streams it.
No soft reset: the model stays loaded on the board between questions (loading checks the CRC of
megabytes of flash), so only the first answer waits for it.
Ctrl-C while an answer streams sends Ctrl-C (0x03) to the board: chat.ask stops and keeps what it
had ("[interrupted]"); a second Ctrl-C stops waiting. Leaving returns the board to its normal
(friendly) REPL.
"""
from __future__ import annotations

import ast
import codecs
import sys
import time

from .board import BoardError, check_port
from .deploy import resolve_port

RAW_PROMPT = b"raw REPL; CTRL-B to exit\r\n>"
MARK = "\x1eTGA"   # precedes the repr() of chat.ask's return value at the end of the output
ANSWER_LIMIT = 300.0   # seconds one answer may take in all (--answer-limit): a board that streams forever stops
MAX_OUTPUT = 64 * 1024  # characters of one answer's output kept: far above n_ctx tokens of text
WRITE_TIMEOUT_MAX = 1e6  # seconds: the largest write limit given to pyserial


class SerialChatError(BoardError):
    pass


FLT_MAX = 3.4028234663852886e38  # the engine samples in float32: larger values are inf there
SETTING_RANGES = {  # chat.ask's settings, the ranges tinygpt.c tg_sample / the bindings accept
    "max_new_tokens": (int, "an int >= 1", lambda v: v >= 1),
    "temperature": (float, "finite and >= 0 (0 = greedy)", lambda v: 0.0 <= v <= FLT_MAX),
    "top_k": (int, "an int in 0..4294967295 (0 = off)", lambda v: 0 <= v <= 0xFFFFFFFF),
    "top_p": (float, "in (0, 1] (1 = off)", lambda v: 0.0 < v <= 1.0),
    "repetition_penalty": (float, "finite and > 0 (1 = off)", lambda v: 0.0 < v <= FLT_MAX),
    "seed": (int, "an int in 0..2**64-1, or none", lambda v: 0 <= v <= 0xFFFFFFFFFFFFFFFF),
    "timing": (bool, "True or False", lambda v: True),
    "stream": (bool, "True or False", lambda v: True),
}


def check_settings(settings: dict | None, name=lambda key: key) -> dict:
    """chat.ask's settings checked on the PC, as the engine checks them, so that a bad value is
    named before anything reaches the board (repr(nan) is not even Python there: the board
    would answer "NameError: name 'nan' isn't defined"). None means the default. Raises
    ValueError naming the setting (name(key): e.g. its command-line option)."""
    for key, v in (settings or {}).items():
        if key not in SETTING_RANGES:
            raise ValueError("unknown setting %s (known: %s)" % (name(key), ", ".join(SETTING_RANGES)))
        if v is None:
            continue
        kind, text, ok = SETTING_RANGES[key]
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if type(v) is not kind or not ok(v):  # bool is no int here, nan fails every comparison
            raise ValueError("%s must be %s, not %r" % (name(key), text, v))
    return dict(settings or {})


class BoardChat:
    """A raw-REPL session with the board at `port` (pyserial)."""

    def __init__(self, port: str, baudrate: int = 115200, timeout: float = 60.0, n_ctx: int | None = None,
                 answer_limit: float = ANSWER_LIMIT, max_output: int = MAX_OUTPUT):
        if not (isinstance(answer_limit, (int, float)) and answer_limit > 0):
            raise SerialChatError("--answer-limit must be > 0 seconds, got %r" % (answer_limit,))
        self.answer_limit = float(answer_limit)
        self.max_output = max_output
        try:
            import serial
        except ImportError:
            raise SerialChatError("pyserial is not installed (pip install pyserial, or the `device` extra)")
        self.port = port
        self.timeout = timeout
        try:
            # write_timeout: a board that stops reading (hung, or its USB stalled) must not block a write
            # (capped: pyserial's write raises OverflowError for a limit past what select() takes,
            # e.g. --timeout 1e10 or inf)
            self.ser = serial.serial_for_url(check_port(resolve_port(port)), baudrate=baudrate, timeout=0.05,
                                             write_timeout=min(timeout, WRITE_TIMEOUT_MAX))
        except (serial.SerialException, OSError) as e:
            raise SerialChatError("cannot open %s: %s" % (port, e))
        self._serial_errors = (serial.SerialException, OSError)
        try:  # pyserial's POSIX port raises termios.error (not an OSError) on a vanished tty
            import termios
            self._serial_errors += (termios.error,)
        except ImportError:
            pass
        self._buf = b""
        self._enter_raw()
        self._loaded = False
        if n_ctx is not None:
            self._exec("import chat\nif chat._model is None:\n    chat.load(None, %d)\n" % int(n_ctx), None)
            self._loaded = True

    # -- raw REPL --------------------------------------------------------------------------
    def _read(self) -> bytes:
        try:
            n = self.ser.in_waiting
            return self.ser.read(n or 1)
        except self._serial_errors as e:
            raise SerialChatError("lost the board on %s: %s" % (self.port, e))

    def _write(self, data: bytes) -> None:
        try:
            self.ser.write(data)
            self.ser.flush()
        except self._serial_errors as e:
            raise SerialChatError("lost the board on %s: %s" % (self.port, e))

    def _read_until(self, ending: bytes, timeout: float) -> bytes:
        t_end = time.monotonic() + timeout
        while ending not in self._buf:
            if time.monotonic() > t_end:
                raise SerialChatError("no answer from the board on %s (waited %.0f s for %r; got %r)"
                                      % (self.port, timeout, ending, self._buf[-80:]))
            self._buf += self._read()
            if len(self._buf) > 2 * self.max_output:  # a board that prints without end: keep the tail only
                self._buf = self._buf[-self.max_output:]
        i = self._buf.index(ending) + len(ending)
        out, self._buf = self._buf[:i], self._buf[i:]
        return out

    def _enter_raw(self) -> None:
        self._write(b"\r\x03\x03")          # stop whatever runs
        time.sleep(0.1)
        try:
            self.ser.reset_input_buffer()
        except self._serial_errors as e:
            raise SerialChatError("lost the board on %s: %s" % (self.port, e))
        self._buf = b""
        self._write(b"\r\x01")              # Ctrl-A: raw REPL
        try:
            self._read_until(RAW_PROMPT, min(self.timeout, 10))
        except SerialChatError:
            raise SerialChatError("no MicroPython raw REPL on %s (is it the board's REPL port, and no other "
                                  "program, e.g. mpremote or a serial monitor, using it?)" % self.port)

    def interrupt(self) -> None:
        """Ctrl-C to the board: stops the running answer."""
        self._write(b"\x03")

    def _exec(self, code: str, on_text, timeout: float | None = None) -> str:
        """Run code in the raw REPL; stream its stdout to on_text(str) (None: collect only).
        Returns the whole stdout; raises SerialChatError with the board's error."""
        timeout = self.timeout if timeout is None else timeout
        data = code.encode("utf-8")
        for i in range(0, len(data), 256):  # paced like mpremote: a UART's RX buffer is small
            self._write(data[i:i + 256])
            time.sleep(0.01)
        self._write(b"\x04")
        ok = self._read_until(b"OK", min(timeout, 10))
        if not ok.endswith(b"OK"):
            raise SerialChatError("the board did not accept the code: %r" % ok)
        dec = codecs.getincrementaldecoder("utf-8")("replace")
        out = []
        n_out = 0
        interrupts = 0
        done = False
        last = t_start = time.monotonic()
        while not done:
            # the silence timeout alone never ends a board that streams output forever
            too_long = time.monotonic() - t_start > self.answer_limit
            if too_long or n_out > self.max_output:
                self.interrupt()  # stop it on the board too, so the next command finds a prompt
                why = ("took longer than %.0f s (--answer-limit)" % self.answer_limit if too_long
                       else "went past %d KB of output" % (self.max_output // 1024))
                raise SerialChatError("the board's answer %s; stopped it (%d characters received, last: %r)"
                                      % (why, n_out, "".join(out)[-60:]))
            try:
                if b"\x04" in self._buf:  # end of the program's output
                    i = self._buf.index(b"\x04")
                    chunk, self._buf, done = self._buf[:i], self._buf[i + 1:], True
                elif self._buf:
                    chunk, self._buf = self._buf, b""
                else:
                    got = self._read()
                    if got:
                        self._buf += got
                        last = time.monotonic()
                    elif time.monotonic() - last > timeout:
                        raise SerialChatError("the board stopped answering (%.0f s without output)" % timeout)
                    continue
                text = dec.decode(chunk, final=done)
                out.append(text)
                n_out += len(text)
                if on_text and text:
                    on_text(text)
            except KeyboardInterrupt:  # Ctrl-C on the PC: pass it on to the board, once
                interrupts += 1
                if interrupts > 1:
                    raise
                if not done:
                    self.interrupt()
        err = self._read_until(b"\x04", timeout)[:-1].decode("utf-8", "replace")
        self._read_until(b">", timeout)
        if err.strip():
            lines = [ln for ln in err.strip().splitlines() if ln.strip()]
            msg = lines[-1] if lines else err.strip()
            hint = ""
            if "no module named 'chat'" in msg or "no module named 'bpe'" in msg:
                hint = (" (the board has no py/ scripts: run `tinygpt deploy --port PORT`, or flash the tinygpt "
                        "firmware, which has them frozen in)")
            elif "no model found" in msg:
                hint = (" (put a model on the board: `tinygpt deploy --port PORT --model MODEL`, or "
                        "`tinygpt flash --port PORT --model MODEL` for the 'model' partition)")
            raise SerialChatError("the board says: %s%s" % (msg, hint))
        return "".join(out)

    # -- chat ------------------------------------------------------------------------------
    def ask(self, question: str, settings: dict | None = None, on_text=None) -> str:
        """chat.ask(question, **settings) on the board; the shown answer streams to on_text.
        Returns chat.ask's return value (the answer text)."""
        if not isinstance(question, str) or not question.strip():
            raise SerialChatError("empty question")
        try:
            check_settings(settings)
        except ValueError as e:
            raise SerialChatError(str(e))
        kw = "".join(", %s=%r" % (k, v) for k, v in (settings or {}).items() if v is not None)
        code = ("import chat\n_tg_r = chat.ask(%r%s)\nprint(%r + repr(_tg_r))\n" % (question, kw, MARK))
        held = [""]

        def show(text):
            # everything before MARK is the answer as chat.ask shows it; hold back only what may be
            # the start of MARK (before: everything from the first "\x1e" of the answer, which then
            # never showed although ask returned it)
            s = held[0] + text
            k = s.find(MARK)
            if k < 0:
                k = len(s)
                for j in range(max(0, len(s) - len(MARK) + 1), len(s)):
                    if MARK.startswith(s[j:]):
                        k = j
                        break
            if on_text and k:
                on_text(s[:k])
            held[0] = s[k:]

        out = self._exec(code, show)
        if MARK not in out:
            raise SerialChatError("unexpected output from the board: %r" % out[-200:])
        rep = out[out.rindex(MARK) + len(MARK):].strip()
        try:
            answer = ast.literal_eval(rep)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):  # TypeError: "{[]: 1}"
            raise SerialChatError("unexpected answer from the board: %r" % rep[:200])
        if not isinstance(answer, str):  # tinygpt's chat.ask returns the answer text, always
            raise SerialChatError("the board's chat.ask returned %s, not the answer text (%r): is the chat.py "
                                  "on the board tinygpt's? (`tinygpt deploy --port PORT` copies it)"
                                  % (type(answer).__name__, rep[:80]))
        return answer

    def close(self) -> None:
        try:
            self._write(b"\r\x02")  # back to the friendly REPL
        except SerialChatError:
            pass
        try:
            self.ser.close()
        except self._serial_errors:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def ask_board(port: str, question: str, timeout: float = 60.0, settings: dict | None = None,
              on_text=None, n_ctx: int | None = None, answer_limit: float = ANSWER_LIMIT) -> str:
    """Ask one question on the board at `port`; returns the answer (chat.ask's return value)."""
    with BoardChat(port, timeout=timeout, n_ctx=n_ctx, answer_limit=answer_limit) as b:
        return b.ask(question, settings, on_text)


def _out(s: str) -> None:
    sys.stdout.write(s)
    sys.stdout.flush()


class _LineTracker:
    """on_text that remembers whether the last text shown ended a line, so that an error after a
    partial answer goes on a line of its own instead of being glued to the answer."""

    def __init__(self, on_text):
        self.on_text, self.open_line = on_text, False

    def __call__(self, text):
        if text:
            self.on_text(text)
            self.open_line = not text.endswith("\n")

    def end_line(self):
        if self.open_line:
            self.on_text("\n")
            self.open_line = False


def ask_questions(port: str, questions, settings: dict | None = None, timeout: float = 60.0,
                  n_ctx: int | None = None, on_text=_out, answer_limit: float = ANSWER_LIMIT) -> list[str]:
    """`tinygpt ask --port`: each question to the board in one session, its answer streamed to
    on_text as the board prints it (what `tinygpt ask` prints on the PC). Returns the answers."""
    answers = []
    shown = _LineTracker(on_text)
    try:
        with BoardChat(port, timeout=timeout, n_ctx=n_ctx, answer_limit=answer_limit) as b:
            for q in questions:
                if len(questions) > 1:
                    shown("Q: %s\n" % q)
                answers.append(b.ask(q, settings, shown))
    except BaseException:
        shown.end_line()
        raise
    return answers


def interactive(port: str, settings: dict | None = None, timeout: float = 60.0, n_ctx: int | None = None,
                input_fn=input, answer_limit: float = ANSWER_LIMIT) -> None:
    with BoardChat(port, timeout=timeout, n_ctx=n_ctx, answer_limit=answer_limit) as b:
        print("tinygpt on the board at %s: ask a question (empty line or Ctrl-D to leave, "
              "Ctrl-C stops an answer)" % port)
        while True:
            try:
                q = input_fn("Q: ")
            except (EOFError, KeyboardInterrupt):
                print()
                break
            if not q.strip():
                break
            _out("A: ")
            shown = _LineTracker(_out)
            try:
                b.ask(q, settings, shown)
            except KeyboardInterrupt:
                _out("\n[stopped waiting for the board]\n")
                b._enter_raw()
            except SerialChatError as e:
                shown.end_line()
                if str(e).startswith("the board says: ValueError"):
                    print("[%s]" % str(e)[len("the board says: "):])
                else:
                    raise
