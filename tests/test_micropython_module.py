"""The MicroPython module `tinygpt` (usercmodule/tinygpt/modtinygpt.c) under hostile use (issue 9),
on the unix port built with the module (MICROPY_BIN; an AddressSanitizer build of it too, with
MICROPY_ASAN_BIN):

* the same probe script runs under CPython (host binding) and MicroPython and must print the
  same lines: logits() before a step and after reset(), step(True), step(2**40), integers that
  do not fit in C, a directory, a FIFO, a symlink loop, a tiny temperature;
* what logits() and tokenizer_blob() return stays valid after close(), after the Model is
  collected and after a reload (it used to view freed engine memory).

Build: see BUILD_HINT (the ASan build adds CFLAGS_EXTRA="-fsanitize=address" LDFLAGS_EXTRA=
"-fsanitize=address" BUILD=build-asan).
"""
import os
import struct
import subprocess
import sys

import pytest

from conftest import REPO
from test_chat import BUILD_HINT, micropy_bin  # noqa: F401  (the fixture)

from tinygpt import bench
from tinygpt.presets import PRESETS

PROBES = r'''
import sys
import tinygpt
path, directory, fifo, loop, sparse, claims_more = sys.argv[-6:]


def probe(name, f):
    try:
        r = f()
    except OSError as e:  # the text differs between CPython and MicroPython, the errno does not
        r = "OSError %d %s" % (e.args[0], "symbolic links" in str(e))
    except Exception as e:
        r = "%s: %s" % (type(e).__name__, e)
    print(name, "->", r)


m = tinygpt.Model(path)
probe("logits before any step", lambda: m.logits())
probe("sample before any step", lambda: m.sample())
probe("step(True)", lambda: m.step(True))
probe("step(2**40)", lambda: m.step(2**40))
probe("step(-2**70)", lambda: m.step(-2**70))
probe("step(1.0)", lambda: m.step(1.0))
probe("prefill([1, 2**33])", lambda: m.prefill([1, 2**33]))
probe("prefill 65 tokens", lambda: m.prefill([1] * 65))
probe("pos", lambda: m.pos)
m.prefill([5, 6, 7, 8])
probe("logits after prefill", lambda: len(m.logits()))
greedy = m.sample()
for t in (1e-38, 1e-39, 1e-45):
    probe("temperature %g is greedy" % t, lambda: m.sample(temperature=t, seed=1) == greedy)
probe("penalty 1e-39", lambda: m.sample(temperature=1.0, repetition_penalty=1e-39, seed=3))
probe("top_k 2**32+1", lambda: m.sample(top_k=2**32 + 1))
probe("top_k -1", lambda: m.sample(top_k=-1))
probe("top_k True", lambda: m.sample(top_k=True))
probe("seed 2**64", lambda: m.sample(seed=2**64))
probe("seed -1", lambda: m.sample(seed=-1))
probe("seed 2**64-1", lambda: m.sample(temperature=1.0, seed=2**64 - 1))
probe("seed 2**40+3", lambda: m.sample(temperature=1.0, seed=2**40 + 3))
probe("seed 3", lambda: m.sample(temperature=1.0, seed=3))
probe("top_k 2**32-1", lambda: m.sample(top_k=2**32 - 1) == greedy)
m.step(9)
m.reset()
probe("logits after reset", lambda: m.logits())
probe("sample after reset", lambda: m.sample())
m.close()
probe("closed", lambda: m.pos)
probe("n_ctx 2**32+5", lambda: tinygpt.Model(path, n_ctx=2**32 + 5))
probe("n_ctx 0", lambda: tinygpt.Model(path, n_ctx=0))
probe("n_ctx 65", lambda: tinygpt.Model(path, n_ctx=65))
probe("max_batch 2**32", lambda: tinygpt.Model(path, max_batch=2**32))
probe("max_batch 0", lambda: tinygpt.Model(path, max_batch=0))
probe("a directory", lambda: tinygpt.Model(directory))
probe("a FIFO", lambda: tinygpt.Model(fifo))
probe("a symlink loop", lambda: tinygpt.Model(loop))
probe("a sparse file past its tensors", lambda: tinygpt.Model(sparse))
probe("a header claiming more", lambda: tinygpt.Model(claims_more))
print("done")
'''

LIFETIMES = r'''
import sys, gc
import tinygpt
import bpe
path = sys.argv[-1]


def churn():
    gc.collect()
    junk = [bytearray(4096) for _ in range(300)]  # reuse whatever was freed
    for b in junk:
        b[:] = b"\xa5" * 4096
    del junk
    gc.collect()


m = tinygpt.Model(path)
m.prefill([1, 2, 3])
lg = m.logits()
want = list(lg)
m.step(4)
print("view kept after step", list(lg) == want)
m.close()
churn()
print("view kept after close", list(lg) == want)

blob = tinygpt.Model(path).tokenizer_blob()  # the Model is garbage at once
churn()
ref = tinygpt.Model(path)
print("blob kept after collection", blob == ref.tokenizer_blob(), bytes(blob[:4]))
tok = bpe.Tokenizer(tinygpt.Model(path).tokenizer_blob())
churn()
print("tokenizer kept", tok.encode("hello world") == bpe.Tokenizer(ref.tokenizer_blob()).encode("hello world"))
dec = bpe.Decoder(tok)
ref.close()
churn()
ids = tok.encode("caf\u00e9 ok")
print("decoder after reload", "".join(dec.feed(t) for t in ids) + dec.flush() == "caf\u00e9 ok")
print("done")
'''


THREADS = r'''
import sys, time, _thread
import tinygpt
m = tinygpt.Model(sys.argv[-1])
results = []
lock = _thread.allocate_lock()


def work(k):
    ok = 0
    for i in range(40):
        try:
            m.prefill([k + 1] * 5)
            m.step(m.sample(temperature=1.0, seed=i))
            ok += 1
        except RuntimeError:  # the context filled up, or another thread reset it
            try:
                m.reset()
            except ValueError:
                break
        except ValueError as e:  # closed by the main thread
            if str(e) != "model is closed":
                raise
            break
    with lock:
        results.append(ok)


for k in range(3):
    _thread.start_new_thread(work, (k,))
time.sleep(0.2)
m.close()  # the engine holds the GIL: this runs between two engine calls, never during one
while len(results) < 3:
    time.sleep(0.05)
print("threads done", len(results))
print("done")
'''


def tiny_model(path):
    hp = dict(PRESETS["tiny"])
    hp["n_vocab"] = hp.pop("vocab_size")
    path.write_bytes(bench.random_model_bytes(hp))
    return path


@pytest.fixture()
def probe_args(tmp_path):
    model = tiny_model(tmp_path / "model.bin")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    d = tmp_path / "dir"
    d.mkdir()
    data = bytearray(model.read_bytes())
    struct.pack_into("<I", data, 12, 3 << 30)  # file_size 3 GiB
    sparse, claims_more = tmp_path / "sparse.bin", tmp_path / "claims_more.bin"
    claims_more.write_bytes(data)
    with open(sparse, "wb") as f:
        f.write(data)
        f.truncate(3 << 30)  # a sparse file: the header and the size agree, the tensors do not
    return [str(model), str(d), str(fifo), str(loop), str(sparse), str(claims_more)]


def run(cmd, script, args, tmp_path, env=None):
    src = tmp_path / "script.py"
    src.write_text(script)
    r = subprocess.run(cmd + [str(src)] + args, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, **(env or {})))
    out = r.stdout + r.stderr
    assert r.returncode == 0 and out.rstrip().endswith("done"), out[-3000:]
    assert "AddressSanitizer" not in out, out[-3000:]
    return r.stdout


def test_same_behaviour_on_pc_and_micropython(micropy_bin, probe_args, tmp_path):  # noqa: F811
    pc = run([sys.executable], PROBES, probe_args, tmp_path, env={"PYTHONPATH": str(REPO / "host_tools")})
    mp = run([micropy_bin], PROBES, probe_args, tmp_path)
    assert mp.splitlines() == pc.splitlines()
    lines = dict(line.split(" -> ", 1) for line in pc.splitlines() if " -> " in line)
    assert lines["logits before any step"] == "RuntimeError: no logits yet: prefill or step first"
    assert lines["logits after reset"] == lines["logits before any step"]
    assert lines["step(True)"] == "TypeError: token id at index 0 must be an int, not bool"
    assert lines["step(2**40)"] == "ValueError: token id 1099511627776 is outside 0..511"
    assert lines["n_ctx 2**32+5"] == "ValueError: n_ctx 4294967301 is outside 1..4294967295"
    assert lines["seed 2**64"] == "ValueError: seed 18446744073709551616 is outside 0..18446744073709551615"
    assert lines["a directory"] == "ValueError: %s: not a regular file (a directory), not a tinygpt model" % probe_args[1]
    assert lines["a FIFO"] == "ValueError: %s: not a regular file (a FIFO), not a tinygpt model" % probe_args[2]
    assert lines["a symlink loop"] == "OSError 40 True"
    size = os.path.getsize(probe_args[5])
    assert lines["a sparse file past its tensors"] == \
        "ValueError: file_size 3221225472, but the tensors end at byte %d" % size
    assert lines["a header claiming more"] == \
        "ValueError: file is %d bytes but its header says 3221225472 (truncated?)" % size
    assert all(lines["temperature %s is greedy" % t] == "True" for t in ("1e-38", "1e-39", "1e-45"))


@pytest.mark.parametrize("which", ["plain", "asan"])
def test_returned_objects_own_their_memory(micropy_bin, tmp_path, which):  # noqa: F811
    exe = micropy_bin
    if which == "asan":
        exe = os.environ.get("MICROPY_ASAN_BIN")
        if not exe:
            pytest.skip("set MICROPY_ASAN_BIN to a MicroPython unix build with the module and "
                        "-fsanitize=address (BUILD=build-asan CFLAGS_EXTRA=-fsanitize=address "
                        "LDFLAGS_EXTRA=-fsanitize=address); " + BUILD_HINT)
    model = tiny_model(tmp_path / "model.bin")
    out = run([exe], "import sys\nsys.path.insert(0, %r)\n" % str(REPO / "py") + LIFETIMES, [str(model)], tmp_path,
              env={"ASAN_OPTIONS": "detect_leaks=0"})
    assert out.count(" True") == 5 and "False" not in out, out


@pytest.mark.parametrize("which", ["plain", "asan"])
def test_threads_and_close_from_another_thread(micropy_bin, tmp_path, which):  # noqa: F811
    """MicroPython's engine calls hold the GIL: one model from three threads, closed by a fourth,
    runs one call at a time and never frees memory under a running call (issue 9 D2)."""
    exe = micropy_bin if which == "plain" else os.environ.get("MICROPY_ASAN_BIN")
    if not exe:
        pytest.skip("set MICROPY_ASAN_BIN (see test_returned_objects_own_their_memory)")
    r = subprocess.run([exe, "-c", "import _thread"], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        pytest.skip("this MicroPython build has no _thread")
    model = tiny_model(tmp_path / "model.bin")
    out = run([exe], THREADS, [str(model)], tmp_path, env={"ASAN_OPTIONS": "detect_leaks=0"})
    assert "threads done 3" in out, out
