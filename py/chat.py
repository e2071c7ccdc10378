# chat.py: ask the tinygpt model a question, on the board or on a PC.
#
#   >>> import chat
#   >>> chat.ask("What is WiFi?")        # streams the answer, returns it
#   >>> chat.chat()                      # type questions; an empty line or Ctrl-D leaves
#
# One file for MicroPython and CPython: the heavy math is the C module `tinygpt` (built into
# the firmware, or the host package on a PC), the tokenizer is bpe.py beside this file.
# The prompt is exactly what the model was trained on: "Q: {question}\nA:".
import sys
import time

import tinygpt
from bpe import Decoder, Tokenizer

MAX_NEW_TOKENS = 80
MIN_ANSWER_ROOM = 16  # context positions kept free for the answer when a question is cut
DO_PREFIX = "Do:"
# What strip() removes, spelled out: MicroPython's str.strip() knows only ASCII whitespace,
# CPython's also U+00A0, U+3000, ...; the board and the PC must see the same prompt and answer.
_WS = " \t\n\r\x0b\x0c"
# Where the model is looked for when load() gets no path: the flash partition labelled
# "model" (ESP32 firmware), then files.
DEFAULT_PATHS = ("model", "/model.bin", "model.bin", "models/default/model.bin")

_model = None
_tok = None
_path = None


def load(path=None, n_ctx=None):
    """Load the model (and the tokenizer stored inside it). Returns the model."""
    global _model, _tok, _path
    close()
    if path is None:
        last = None
        for p in DEFAULT_PATHS:
            try:
                return load(p, n_ctx)
            except OSError as e:  # not there: try the next place
                last = e
        raise OSError("no model found (tried %s): %s" % (", ".join(DEFAULT_PATHS), last))
    _model = tinygpt.Model(path) if n_ctx is None else tinygpt.Model(path, n_ctx)
    _tok = Tokenizer(_model.tokenizer_blob())
    _path = path
    return _model


def close():
    global _model, _tok
    if _model is not None:
        _model.close()
    _model = None
    _tok = None


def _clean(question, limit):
    """The question as one line of text: control characters become spaces, ends stripped, at
    most `limit` characters kept. Returns (text, more): more is True when text was left out
    (other than whitespace; the kept part then keeps its trailing whitespace, so it is still
    `limit` characters). Only the kept part is copied: a 100,000-character question costs no
    more memory than a short one."""
    if not isinstance(question, str):
        raise TypeError("the question must be a str")
    out = []
    more = False
    for ch in question:
        o = ord(ch)
        if o < 32 or 127 <= o < 160:  # C0, DEL and C1 controls
            ch = " "
        if len(out) >= limit:
            if ch not in _WS:
                more = True
                break
        elif out or ch not in _WS:  # leading whitespace is dropped as it comes
            out.append(ch)
    q = "".join(out)
    if not more:
        q = q.rstrip(_WS)
    if not q:
        raise ValueError("empty question: type a question, e.g. chat.ask('What is PSRAM?')")
    return q, more


def prompt_ids(question, n_ctx):
    """Token ids of "Q: {question}\nA:", the question cut so that the prompt leaves
    MIN_ANSWER_ROOM positions for the answer. Returns (ids, n_question_tokens_cut, more).

    A question too long to fit is cut before it is tokenized, so that the tokenizer's time and
    memory depend on n_ctx, not on the question: no token is longer than max_token_bytes, so
    (budget + 1) * max_token_bytes characters always make more tokens than the budget. more is
    True when that happened; the count is then of the tokens cut from the tokenized part."""
    budget = n_ctx - MIN_ANSWER_ROOM
    if budget < 8:
        budget = n_ctx - 1
    q, more = _clean(question, (budget + 1) * _tok.max_token_bytes)
    ids = _tok.encode("Q: " + q + "\nA:")
    if len(ids) <= budget:
        return ids, 0, False
    head = _tok.encode("Q:")  # not "Q: ": the space belongs to the question's first token
    tail = _tok.encode("\nA:")
    body = ids[len(head):len(ids) - len(tail)]
    keep = budget - len(head) - len(tail)
    if keep < 1:
        raise ValueError("the context (%d tokens) is too short for any question" % n_ctx)
    return head + body[:keep] + tail, len(body) - keep, more


def ticks_us():
    """A microsecond counter for timing: time.ticks_us on MicroPython (where time.time() may
    not exist, e.g. the qemu port), time.perf_counter on CPython."""
    if hasattr(time, "ticks_us"):
        return time.ticks_us()
    return int(time.perf_counter() * 1000000)


def us_since(t0):
    """Microseconds since ticks_us() returned t0 (ticks_diff handles the counter's wrap)."""
    if hasattr(time, "ticks_diff"):
        return time.ticks_diff(time.ticks_us(), t0)
    return ticks_us() - t0


def _out(s):
    sys.stdout.write(s)
    if hasattr(sys.stdout, "flush"):
        sys.stdout.flush()


def _show(text, printed):
    """Stream the answer: text is everything decoded so far, printed how much of it is on the
    console. Whitespace at either end is held back (the answer is returned stripped), so the
    console shows exactly the returned text. Returns the new count."""
    shown = text.strip(_WS)
    if printed == 0 and shown.startswith(DO_PREFIX):
        _out("[suggested command, not run] ")
    if len(shown) > printed:
        _out(shown[printed:])
        printed = len(shown)
    return printed


def ask(question, max_new_tokens=MAX_NEW_TOKENS, temperature=0.0, top_k=0, top_p=1.0,
        repetition_penalty=1.0, seed=None, stream=True, timing=False):
    """Answer one question. Streams the answer to the console when stream is True and returns
    the answer text. A command suggestion comes back starting with "Do:"; it is never run.
    Ctrl-C stops the answer; what was generated so far is returned."""
    if _model is None:
        load()
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError("max_new_tokens must be an int >= 1")
    m = _model
    info = m.info()
    n_ctx = info["n_ctx"]
    eos, q_id = info["eos_id"], info["q_id"]
    ids, cut, more = prompt_ids(question, n_ctx)
    if cut and stream:
        _out("[question cut by %s%d tokens to fit the %d-token context]\n"
             % ("more than " if more else "", cut, n_ctx))
    dec = Decoder(_tok)
    text = ""
    printed = 0
    n_new = 0
    t0 = ticks_us()
    stop = -1
    interrupted = False
    m.reset()
    try:
        m.prefill(ids)
        first = True
        while n_new < max_new_tokens:
            tok = m.sample(temperature, top_k, top_p, repetition_penalty, seed if first else None)
            first = False
            if tok == eos or tok == q_id:
                break
            n_new += 1
            text += dec.feed(tok)
            stop = text.find("\n\n")
            if stop >= 0:
                text = text[:stop]
            if stream:
                printed = _show(text, printed)
            # no step for the last token: its logits would never be used
            if stop >= 0 or n_new >= max_new_tokens or m.pos >= n_ctx:
                break
            m.step(tok)
    except KeyboardInterrupt:
        interrupted = True
    if stop < 0:
        text += dec.flush()  # an unfinished UTF-8 character at the end becomes U+FFFD
    text = text.strip(_WS)
    if stream:
        _show(text, printed)
        if interrupted:
            _out(" [interrupted]")
        _out("\n")
        if timing:
            dt = us_since(t0) / 1e6
            _out("(%d prompt + %d answer tokens, %.1f tok/s)\n" % (len(ids), n_new, n_new / dt if dt > 0 else 0))
    return text


def is_command(answer):
    """True when ask() returned a command suggestion (shown to the user, never executed)."""
    return answer.startswith(DO_PREFIX)


def chat(**settings):
    """Interactive questions and answers. An empty line or Ctrl-D leaves; Ctrl-C stops an answer."""
    if _model is None:
        load()
    print("tinygpt: ask a question (empty line or Ctrl-D to leave)")
    while True:
        try:
            q = input("Q: ")
        except EOFError:
            print()
            break
        except KeyboardInterrupt:
            print()
            break
        if not q.strip(_WS):
            break
        _out("A: ")
        try:
            ask(q, **settings)
        except ValueError as e:
            print("[%s]" % e)
