# scripts/chat_glue.py: time chat.ask spends outside the engine (tokenizer, UTF-8 decoding,
# streaming, drafting, the loop), summed over the questions of a Q:/A: file, as a share of the
# engine's own time (docs/performance.md, "Glue"). Runs unchanged on MicroPython and CPython:
#   MICROPYPATH=py micropython -X heapsize=16M scripts/chat_glue.py MODEL data/heldout.txt 20 1 >/dev/null
#   PYTHONPATH=py .venv/bin/python scripts/chat_glue.py MODEL data/heldout.txt 20 1 >/dev/null
# (last argument: 1 = drafting, 0 = plain; the answers stream to stdout, the numbers go to stderr)
import sys
import time

try:
    ticks_us, ticks_diff = time.ticks_us, time.ticks_diff
except AttributeError:  # CPython
    ticks_us = lambda: int(time.perf_counter() * 1e6)
    ticks_diff = lambda a, b: a - b

import chat

ENGINE_CALLS = ("prefill", "step", "verify", "sample", "rewind", "reset")


class Timed:
    """The model, with the time spent in its engine calls summed in .us."""

    def __init__(self, m):
        self.m = m
        self.us = 0
        self.calls = 0
        for name in ENGINE_CALLS:
            if hasattr(m, name):
                setattr(self, name, self._timed(getattr(m, name)))

    def _timed(self, f):
        def call(*a, **kw):
            t = ticks_us()
            try:
                return f(*a, **kw)
            finally:
                self.us += ticks_diff(ticks_us(), t)
                self.calls += 1
        return call

    def __getattr__(self, name):  # pos, info, logits, ...
        return getattr(self.m, name)


def questions(path, limit):
    out = []
    for line in open(path):
        if line.startswith("Q: "):
            out.append(line[3:].strip())
            if len(out) >= limit:
                break
    return out


def main(model_path, qpath, limit, draft):
    chat.load(model_path)
    timed = Timed(chat._model)
    chat._model = timed
    qs = questions(qpath, limit)
    total = 0
    tokens = 0
    for q in qs:
        t = ticks_us()
        ans = chat.ask(q, stream=True, draft=draft)
        total += ticks_diff(ticks_us(), t)
        tokens += len(chat._tok.encode(ans)) if hasattr(chat._tok, "encode") else 0
    glue = total - timed.us
    sys.stderr.write("draft=%s questions=%d engine_us=%d total_us=%d glue_us=%d glue_pct=%.2f calls=%d "
                     "answer_tokens~%d glue_us_per_token=%.0f\n"
                     % (draft, len(qs), timed.us, total, glue, 100.0 * glue / timed.us, timed.calls, tokens,
                        glue / tokens if tokens else 0))


main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1")
