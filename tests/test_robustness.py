"""Hostile use of the host binding and the engine (issue 9): threads, callbacks that close or reset
the model or raise, a model file changed while in use, non-regular files, integers that do not
fit in C, extreme sampling settings, corrupt headers. Nothing may crash, hang, wrap or lose the
model; every refusal names the problem.

What could crash the interpreter before the fix (use-after-free, SIGBUS) or hang it (a FIFO)
runs in a subprocess, so a regression fails the test instead of killing pytest.
The same behaviours on the MicroPython module: tests/test_micropython_module.py.
"""
import ctypes
import itertools
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import tracemalloc
import zlib

import pytest

from tinygpt import bench, engine
from tinygpt.engine import Model
from tinygpt.presets import PRESETS

TINY = dict(PRESETS["tiny"], n_vocab=PRESETS["tiny"]["vocab_size"])
del TINY["vocab_size"]


def model_bytes(**over):
    return bench.random_model_bytes(dict(TINY, **over))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random model file (vocab 512, 2 layers, 64 positions)."""
    p = tmp_path_factory.mktemp("robust") / "model.bin"
    p.write_bytes(model_bytes())
    return p


@pytest.fixture(scope="module")
def bigger(tmp_path_factory):
    """A model whose prefill takes long enough for another thread to act during it."""
    p = tmp_path_factory.mktemp("robust_big") / "model.bin"
    p.write_bytes(model_bytes(n_embd=128, n_layer=6, n_inner=512, n_positions=256))
    return p


def run_python(code, timeout=120, **fmt):
    """Run code in a fresh interpreter (a crash there fails the test, not pytest itself)."""
    package_dir = os.path.dirname(os.path.dirname(engine.__file__))  # the tinygpt this test imported
    src = "import sys; sys.path.insert(0, %r)\n" % package_dir + textwrap.dedent(code) % fmt
    r = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, timeout=timeout)
    if r.returncode < 0:
        pytest.fail("the interpreter died of %s\n%s%s" % (signal.Signals(-r.returncode).name, r.stdout, r.stderr))
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


# -- D1, D19, D16: what an interrupt or trace callback does to its own model ---------------------
def test_close_inside_interrupt_callback_stops_the_call(tiny):
    out = run_python("""
        from tinygpt.engine import Model
        m = Model(%(path)r)
        m.set_interrupt(lambda: m.close())
        try:
            m.prefill(list(range(40)))
        except ValueError as e:
            print("raised:", e)
        try:
            m.pos
        except ValueError as e:
            print("after:", e)
        m.close()  # closing twice is fine
    """, path=str(tiny))
    assert "raised: model is closed" in out and "after: model is closed" in out, out


def test_close_inside_trace_callback(tiny):
    out = run_python("""
        from tinygpt.engine import Model
        m = Model(%(path)r)
        m.trace(lambda *a: m.close())
        try:
            m.prefill([1, 2, 3])
        except ValueError as e:
            print("raised:", e)
    """, path=str(tiny))
    assert "raised: model is closed" in out, out


def test_reset_inside_interrupt_callback_is_not_undone(tiny):
    with Model(tiny) as m:
        m.prefill([1, 2, 3])
        calls = [0]

        def poll():
            calls[0] += 1
            if calls[0] == 2:
                m.reset()
            return False
        m.set_interrupt(poll)
        with pytest.raises(RuntimeError, match="reset"):
            m.prefill([4, 5, 6])
        assert m.pos == 0
        with pytest.raises(RuntimeError, match="no logits yet"):
            m.logits()
        m.set_interrupt(None)
        m.prefill([7, 8])
        assert m.pos == 2


def test_exception_in_callback_propagates_as_itself(tiny):
    with Model(tiny) as m:
        m.prefill([1, 2, 3])
        before = bytes(m.logits())

        class Boom(Exception):
            pass

        def poll():
            raise Boom("from the poll")
        m.set_interrupt(poll)
        with pytest.raises(Boom, match="from the poll"):
            m.step(4)
        assert m.pos == 3 and bytes(m.logits()) == before  # the step was abandoned cleanly
        m.set_interrupt(None)

        m.trace(lambda *a: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            m.step(4)
        assert m.pos == 3
        m.trace(None)
        m.step(4)
        assert m.pos == 4
        m.set_interrupt(lambda: True)  # a plain interrupt is still KeyboardInterrupt
        with pytest.raises(KeyboardInterrupt):
            m.step(5)
        assert m.pos == 4 and m.logits() is not None


def test_ctrl_c_during_a_call_is_not_lost_in_a_callback(tiny):
    """Ctrl-C arriving while the engine runs: Python would run its SIGINT handler inside the poll or
    trace callback, where ctypes discards a KeyboardInterrupt raised outside the callback's try block
    ("Exception ignored on calling ctypes callback"), so the Ctrl-C could be lost. Now the signal is
    noted, the engine stops at the next poll, and the call raises
    KeyboardInterrupt with the model as it was; the default handler is back afterwards."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # pytest may run with it ignored
    try:
        _ctrl_c_in_callback(tiny)
    finally:
        signal.signal(signal.SIGINT, previous)


def _ctrl_c_in_callback(tiny):
    with Model(tiny) as m:
        m.prefill([1, 2, 3])
        handlers = []

        def trace(*a):
            if not handlers:
                handlers.append(signal.getsignal(signal.SIGINT))
                signal.raise_signal(signal.SIGINT)  # the handler runs here, inside the callback
        m.trace(trace)
        with pytest.raises(KeyboardInterrupt):
            m.prefill([4, 5, 6])
        assert handlers and handlers[0] is not signal.default_int_handler
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        m.trace(None)
        assert m.pos == 3  # the prefill was abandoned between layers
        m.prefill([4, 5, 6])
        assert m.pos == 6


def test_model_is_busy_inside_its_own_callback(tiny):
    with Model(tiny) as m:
        seen = []

        def poll():
            seen.append((m.pos, m.info()["n_ctx"]))  # reads are fine
            m.step(1)  # a step inside a step is not
        m.set_interrupt(poll)
        with pytest.raises(RuntimeError, match="busy"):
            m.prefill([1, 2])
        assert seen == [(0, 64)] and m.pos == 0


# -- D2: threads --------------------------------------------------------------------------------
def test_ctypes_releases_the_gil():
    lib = engine.lib()
    assert type(lib) is ctypes.CDLL and not lib._func_flags_ & ctypes._FUNCFLAG_PYTHONAPI


def test_one_model_four_threads(bigger):
    out = run_python("""
        import threading
        from tinygpt.engine import Model
        m = Model(%(path)r, n_ctx=128)
        errors = []
        def work(k):
            try:
                for i in range(25):
                    try:
                        m.prefill([k + 1] * 20)
                        m.step(m.sample(temperature=1.0, seed=i))
                        bytes(m.logits())
                    except RuntimeError as e:  # another thread filled the context, or reset it
                        assert "do not fit" in str(e) or "no logits yet" in str(e), e
                        m.reset()
            except Exception as e:
                errors.append(repr(e))
        ts = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        [t.start() for t in ts]
        [t.join() for t in ts]
        print("errors:", errors, "pos", m.pos)
    """, path=str(bigger))
    assert "errors: []" in out, out


def test_close_from_another_thread_waits_for_the_running_call(bigger):
    out = run_python("""
        import threading, time
        from tinygpt.engine import Model
        for trial in range(5):
            m = Model(%(path)r)
            started = threading.Event()
            m.set_interrupt(lambda: started.set() or time.sleep(0.001))
            result = []
            def work():
                try:
                    m.prefill(list(range(200)))
                    result.append("done %%d" %% m.pos)
                except ValueError as e:
                    result.append(str(e))
            t = threading.Thread(target=work)
            t.start()
            started.wait()
            m.close()  # waits for the prefill, then frees
            t.join()
            print(trial, result)
            try:
                m.step(1)
            except ValueError as e:
                assert "closed" in str(e)
    """, path=str(bigger))
    assert out.count("['done 200']") + out.count("['model is closed']") == 5, out


# -- D3: the file changes while the model is in use ----------------------------------------------
def test_model_survives_its_file_being_truncated_and_overwritten(tiny, tmp_path):
    path = tmp_path / "model.bin"
    shutil.copy(tiny, path)
    other = tmp_path / "other.bin"
    other.write_bytes(model_bytes(n_layer=1))
    out = run_python("""
        import os, shutil
        from tinygpt.engine import Model
        m = Model(%(path)r)
        print("mapped", m.info()["mapped"])
        m.prefill([1, 2, 3])
        first = bytes(m.logits())
        os.truncate(%(path)r, 0)
        m.reset(); m.prefill([1, 2, 3])
        assert bytes(m.logits()) == first
        shutil.copy(%(other)r, %(path)r)  # what `cp` over the model does
        os.truncate(%(path)r, 1000)
        m.reset(); m.prefill([1, 2, 3])
        for _ in range(5):
            m.step(m.sample())
        print("ok", bytes(m.logits()) != first)
    """, path=str(path), other=str(other))
    assert "mapped False" in out and "ok True" in out, out


# -- D7, D14, D17: paths that are not model files ------------------------------------------------
def test_non_regular_files_are_refused(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    out = run_python("""
        from tinygpt.engine import Model
        for p in %(paths)r:
            try:
                Model(p)
            except (ValueError, OSError) as e:
                print(type(e).__name__, e)
    """, paths=[str(fifo), str(tmp_path)], timeout=30)  # before the fix: blocked in open() forever
    assert "ValueError %s: not a regular file (a FIFO)" % fifo in out, out
    assert "ValueError %s: not a regular file (a directory)" % tmp_path in out, out
    if os.path.exists("/dev/zero"):
        with pytest.raises(ValueError, match="a character device"):
            Model("/dev/zero")


def test_symlink_loop_is_reported_as_a_loop(tmp_path):
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    with pytest.raises(OSError, match="symbolic links") as e:
        Model(loop)
    assert e.value.errno == 40 or e.value.errno == getattr(os, "ELOOP", 40)


# -- D9: integers that do not fit in C ----------------------------------------------------------
def test_integers_crossing_into_c_are_range_checked(tiny):
    for kw, msg in ((dict(n_ctx=2**32 + 5), "n_ctx 4294967301 is outside 1..4294967295"),
                    (dict(n_ctx=0), "n_ctx 0 is outside"),
                    (dict(max_batch=2**32 + 1), "max_batch 4294967297 is outside 1..4294967295"),
                    (dict(max_batch=-1), "max_batch -1 is outside")):
        with pytest.raises(ValueError, match=msg):
            Model(tiny, **kw)
    with pytest.raises(TypeError, match="n_ctx must be an int, not bool"):
        Model(tiny, n_ctx=True)
    with Model(tiny) as m:
        for bad, msg in ((2**40, "token id 1099511627776 is outside 0..511"), (2**32 + 1, "4294967297"),
                         (-2**63, "-9223372036854775808"), (512, "token id 512 is outside")):
            with pytest.raises(ValueError, match=msg):
                m.step(bad)
            with pytest.raises(ValueError, match=msg):
                m.prefill([1, bad])
        with pytest.raises(TypeError, match="token id at index 0 must be an int, not bool"):
            m.step(True)
        with pytest.raises(TypeError, match="token id at index 1 must be an int, not float"):
            m.prefill([1, 2.0])
        assert m.pos == 0
        m.prefill([1, 2])
        for kw, msg in ((dict(top_k=2**32 + 1), "top_k 4294967297 is outside 0..4294967295"),
                        (dict(top_k=-1), "top_k -1 is outside"),
                        (dict(seed=2**64), "seed 18446744073709551616 is outside 0..18446744073709551615"),
                        (dict(seed=-1), "seed -1 is outside")):
            with pytest.raises(ValueError, match=msg):
                m.sample(**kw)
        assert m.sample(temperature=1.0, seed=2**64 - 1) == m.sample(temperature=1.0, seed=2**64 - 1)
        assert m.sample(top_k=2**32 - 1) == m.sample()


def test_prefill_checks_the_length_first(tiny):
    with Model(tiny) as m:
        m.prefill([1])
        for ids, msg in ((range(10**7), "10000000 tokens do not fit: 1 of the context's 64"),
                         ((i % 7 for i in range(10**7)), "more than 63 tokens do not fit: 1 of the context's 64")):
            tracemalloc.start()
            try:
                with pytest.raises(RuntimeError, match=msg):
                    m.prefill(ids)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert peak < 1 << 20, "prefill allocated %d bytes before refusing" % peak
        with pytest.raises(RuntimeError, match="more than 63 tokens do not fit"):
            m.prefill(itertools.count())
        with pytest.raises(RuntimeError, match="1 tokens do not fit"):
            m.prefill(range(1, 64))
            m.step(1)
        assert m.pos == 64


# -- D6: extreme sampling settings degrade to greedy ----------------------------------------------
def test_tiny_temperature_or_penalty_is_greedy(tiny):
    with Model(tiny) as m:
        m.prefill([5, 6, 7, 8])
        greedy = m.sample()
        assert greedy != TINY["n_vocab"] - 1  # the symptom was: always the last id
        for t in (1e-38, 1e-39, 1e-45, 5e-324):
            assert m.sample(temperature=t, seed=1) == greedy, t
        for pen in (1e-39, 1e-45):
            assert m.sample(temperature=1.0, repetition_penalty=pen, seed=1) == m.sample(repetition_penalty=pen)
            assert m.sample(temperature=1e-39, repetition_penalty=pen) == m.sample(repetition_penalty=pen)


# -- D15: logits() before a step, after reset, after an interruption ----------------------------
def test_logits_lifecycle(tiny):
    with Model(tiny) as m:
        with pytest.raises(RuntimeError, match="no logits yet"):
            m.logits()
        m.prefill([1, 2, 3])
        a = m.logits()
        first = bytes(a)
        m.step(4)
        assert bytes(a) == first  # a copy, not a view of the engine's buffer
        m.set_interrupt(lambda: True)
        with pytest.raises(KeyboardInterrupt):
            m.step(5)
        m.set_interrupt(None)
        assert m.pos == 4 and bytes(m.logits()) != first  # the interrupted step kept the logits
        m.reset()
        with pytest.raises(RuntimeError, match="no logits yet"):
            m.logits()
        with pytest.raises(RuntimeError, match="no logits yet"):
            m.sample()


# -- loader: corrupt headers fail early and name the problem -------------------------------------
def _fix_crc(buf):
    struct.pack_into("<I", buf, 16, zlib.crc32(bytes(buf[20:])) & 0xFFFFFFFF)
    return bytes(buf)


def test_tokenizer_reserved_field_is_named():
    data = bytearray(model_bytes())
    n_tensors, dir_offset = struct.unpack_from("<II", data, 76)
    tok_off = struct.unpack_from("<I", data, dir_offset + 16 * (n_tensors - 1) + 8)[0]
    struct.pack_into("<I", data, tok_off + 28, 1)
    with pytest.raises(ValueError, match="tokenizer section: reserved field is 1, must be 0"):
        Model(_fix_crc(data))


def test_huge_dims_fail_on_the_directory_before_allocating():
    data = bytearray(model_bytes())
    struct.pack_into("<II", data, 28, 65536, 65536)  # n_positions, n_embd: a 16 GiB KV cache
    with pytest.raises(ValueError, match="nbytes .* expected"):
        Model(_fix_crc(data))


def test_file_size_past_the_tensors_fails_before_the_crc(tmp_path):
    """A header claiming 3 GiB on a sparse file: refused from the directory, nothing CRC'd."""
    data = bytearray(model_bytes())
    real = len(data)
    struct.pack_into("<I", data, 12, 3 << 30)
    p = tmp_path / "sparse.bin"
    with open(p, "wb") as f:
        f.write(data)
        f.truncate(3 << 30)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="file_size 3221225472, but the tensors end at byte %d" % real):
            Model(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, "%d bytes allocated: the file was read before its layout was checked" % peak
    with open(p, "r+b") as f:
        f.truncate(real)  # the header claims more than the file holds: nothing is read
    with pytest.raises(ValueError, match="file is %d bytes but its header says 3221225472" % real):
        Model(p)


def test_gap_between_tensors_is_refused():
    data = bytearray(model_bytes())
    dir_offset = struct.unpack_from("<I", data, 80)[0]
    off, nb = struct.unpack_from("<II", data, dir_offset + 8)  # wte_q
    struct.pack_into("<I", data, dir_offset + 16 + 8, off + nb + 16)  # wte_s 16 bytes later
    with pytest.raises(ValueError, match="wte_s': offset .* leaves a gap"):
        Model(_fix_crc(data))


def test_allocation_failure_message_has_the_number(tiny):
    fail_after = ctypes.c_int.in_dll(engine.lib(), "tg_port_fail_after")
    fail_after.value = 2  # the model struct and the layer table succeed, the K cache fails
    try:
        with pytest.raises(MemoryError, match=r"KV cache \(K\) \(%d bytes\)" % (2 * 64 * 64)):
            Model(tiny)
    finally:
        fail_after.value = -1


def test_concurrent_models_in_threads_match_serial(tiny):
    """Two models in two threads compute exactly what they compute one after the other."""
    ids = [3, 1, 4, 1, 5, 9, 2, 6]

    def run(m, out):
        m.prefill(ids)
        for _ in range(10):
            m.step(m.sample())
        out.append(bytes(m.logits()))
    serial = []
    with Model(tiny) as m:
        run(m, serial)
    outs = [[], []]
    with Model(tiny) as a, Model(tiny) as b:
        ts = [threading.Thread(target=run, args=(x, o)) for x, o in ((a, outs[0]), (b, outs[1]))]
        [t.start() for t in ts]
        [t.join() for t in ts]
    assert outs == [serial, serial]
