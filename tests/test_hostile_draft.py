"""Drafted decoding under hostile use (issue 26): random sequences of step, prefill, verify,
rewind, sample(at=, draft=), logits and reset - valid and invalid, up to and past the context's
end - run by one script on CPython (the host binding) and on MicroPython (MICROPY_BIN; an
AddressSanitizer build catches a bad read or write).

What must hold after every call:
* it returns, or raises ValueError/RuntimeError/TypeError/OverflowError naming the problem, and a
  call that raised leaves the context as it was (pos unchanged);
* the greedy token of the current position, and of every position sample(at=) may read, equals
  the argmax of the logits of a fresh model stepped through the same tokens one by one (what the
  context holds is exactly the tokens the calls committed);
* CPython and MicroPython print the same transcript, line for line.
"""
import ast
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from test_chat import micropy_bin  # noqa: F401  (the fixture)

from tinygpt import compare
from tinygpt.engine import Model

NAME = "v509_hd16_gelunew"
N_CTX, MAX_DRAFT, N_OPS = 24, 4, 400

# The script runs unchanged on both interpreters. Its own random numbers (an LCG) make both draw
# the same calls; every line is the call, what it returned (or the error), pos and the greedy
# token of the current position (or the error that there is none).
SCRIPT = r'''
import sys
try:
    import tinygpt
    Model = tinygpt.Model
except (ImportError, AttributeError):
    from tinygpt.engine import Model
path, seed, n_ops, n_ctx, max_draft = sys.argv[-5], int(sys.argv[-4]), int(sys.argv[-3]), int(sys.argv[-2]), int(sys.argv[-1])
state = [seed * 2654435761 % 4294967296 or 1]


def rnd(n):
    state[0] = (state[0] * 1103515245 + 12345) % 2147483648
    return (state[0] >> 8) % n


def token(v):
    r = rnd(200)
    if r == 0:
        return -1
    if r == 1:
        return v
    if r == 2:
        return 2 ** 40
    if r == 3:
        return True
    return rnd(v)


def ids(v, most):
    if rnd(60) == 0:
        return "ab"
    return [token(v) for _ in range(rnd(most + 1))]


def outcome(f):
    try:
        r = f()
    except (ValueError, RuntimeError, TypeError, OverflowError) as e:
        return "E %s" % type(e).__name__
    if isinstance(r, (bytes, bytearray, memoryview)):
        return "logits %d" % len(r)
    return repr(r)


def greedy():
    return outcome(lambda: m.sample())


m = Model(path, n_ctx=n_ctx, max_draft=max_draft)
v = m.info()["n_vocab"]
for i in range(n_ops):
    kind = rnd(9)
    if kind == 0:
        t = token(v)
        call, f = "step %r" % (t,), lambda: m.step(t)
    elif kind == 1:
        x = ids(v, 6)
        call, f = "prefill %r" % (x,), lambda: m.prefill(x)
    elif kind in (2, 3):
        x = ids(v, max_draft + 1)
        call, f = "verify %r" % (x,), lambda: m.verify(x)
    elif kind == 4:
        n = rnd(m.pos + 4) - 2
        call, f = "rewind %d" % n, lambda: m.rewind(n)
    elif kind == 5:
        at, d = rnd(m.pos + 3) - 1, token(v)
        call, f = "sample at=%d draft=%r" % (at, d), lambda: m.sample(at=at, draft=d)
    elif kind == 6:
        s, d = rnd(1000), rnd(v)
        call, f = "sample t=0.8 k=3 seed=%d draft=%d" % (s, d), lambda: m.sample(temperature=0.8, top_k=3, seed=s,
                                                                                  draft=d)
    elif kind == 7:
        call, f = "logits", lambda: m.logits()
    else:
        if rnd(4):
            continue
        call, f = "reset", lambda: m.reset()
    before = m.pos
    got = outcome(f)
    print("%s | %s | %d %d | %s" % (call, got, before, m.pos, greedy()))
    if m.pos and rnd(3) == 0:  # what sample(at=) reads for an earlier position
        at = rnd(m.pos)
        print("  at %d | %s" % (at, outcome(lambda: m.sample(at=at))))
m.close()
'''


def run_script(exe, path, seed, tmp_path):
    script = tmp_path / "hostile_draft.py"
    script.write_text(SCRIPT, encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(REPO / "host_tools"), ASAN_OPTIONS="detect_leaks=0")
    r = subprocess.run([exe, str(script), str(path), str(seed), str(N_OPS), str(N_CTX), str(MAX_DRAFT)],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0 and not r.stderr.strip(), (r.returncode, r.stderr[-3000:])
    return r.stdout.splitlines()


def replay(lines, path):
    """The context each transcript line leaves, from what the calls committed; every greedy token
    checked against a fresh model stepped through it. Returns how many were checked."""
    ctx, checked = [], 0
    with Model(str(path)) as fresh:
        def argmax_at(p):
            return int(np.argmax(compare.engine_logits(fresh, ctx[:p + 1])[-1]))

        for line in lines:
            if line.startswith("  at "):
                head, got = line[5:].split(" | ")
                if not got.startswith("E "):
                    assert int(got) == argmax_at(int(head)), line
                    checked += 1
                continue
            call, got, pos, greedy = line.split(" | ")
            before, after = map(int, pos.split())
            assert before == len(ctx), line
            name, _, arg = call.partition(" ")
            if got.startswith("E "):
                assert got[2:] in ("ValueError", "RuntimeError", "TypeError", "OverflowError"), line
                assert after == before, "a refused call changed the context: " + line
            elif name == "step":
                ctx.append(int(arg))
            elif name in ("prefill", "verify"):
                ctx += ast.literal_eval(arg)
            elif name == "rewind":
                ctx = ctx[:int(arg)]
            elif name == "reset":
                ctx = []
            assert after == len(ctx) <= N_CTX, line
            if not greedy.startswith("E "):
                assert int(greedy) == argmax_at(len(ctx) - 1), line
                checked += 1
    return checked


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_drafted_calls_keep_the_context_exact_on_the_pc(converted, tmp_path, seed):
    _, path = converted(NAME)
    lines = run_script(sys.executable, path, seed, tmp_path)
    kinds = {line.split(" ")[0] for line in lines}
    assert {"step", "prefill", "verify", "rewind", "sample", "logits"} <= kinds
    assert sum(" | E " in line for line in lines) > 20  # the refusals were exercised
    ends = [line for line in lines if " | %d %d | " % (N_CTX, N_CTX) in line]
    assert sum(" | E " in line for line in ends) >= 3  # calls past the context's end were refused there
    assert replay(lines, path) > 100


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_micropython_prints_the_same_transcript(converted, tmp_path, micropy_bin, seed):  # noqa: F811
    _, path = converted(NAME)
    want = run_script(sys.executable, path, seed, tmp_path)
    got = run_script(micropy_bin, path, seed, tmp_path)
    for i, (a, b) in enumerate(zip(want, got)):
        assert a == b, "line %d differs:\n  CPython:     %s\n  MicroPython: %s" % (i, a, b)
    assert len(want) == len(got)
