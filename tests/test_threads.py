"""Matmul workers (issue 12 part 3): each matmul's output rows are split between n_threads
workers through the port layer (tg_port_posix.c: POSIX threads). Every output row is computed
by the same code whatever the split, so the logits must be bit-identical for any thread count;
the workers start at load and stop at close. Speed is a benchmark (`tinygpt bench --threads N`),
not a test."""
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import REPO, default_sigint
from test_chat import micropy_bin  # noqa: F401  (the fixture)

from tinygpt.bench import random_model_bytes
from tinygpt.engine import Model

ENGINE = REPO / "usercmodule" / "tinygpt"

# Odd row counts (vocabularies, n_inner) and matrices on both sides of the engine's
# TG_PARALLEL_MIN_MACS (32768): at decode the small ones run on the caller alone, in a prefill
# of 12 tokens every matmul is split.
SHAPES = {
    "odd_small": dict(n_vocab=301, n_embd=36, n_head=3, n_layer=2, n_inner=77, n_positions=32),
    "odd_wide": dict(n_vocab=1001, n_embd=96, n_head=4, n_layer=2, n_inner=387, n_positions=32),
    "hw1_like": dict(n_vocab=4096, n_embd=128, n_head=4, n_layer=1, n_inner=768, n_positions=32),
}


@pytest.fixture(scope="module")
def models():
    return {name: random_model_bytes(hp, seed=3) for name, hp in SHAPES.items()}


def run(model_bytes, n_threads, ids):
    """The logits (bytes) after a prefill, 4 greedy steps and a verify, and the greedy choices."""
    out = []
    with Model(model_bytes, n_threads=n_threads) as m:
        assert m.info()["n_threads"] == n_threads
        m.prefill(ids)
        out.append(bytes(m.logits()))
        for _ in range(4):
            m.step(m.sample())
            out.append(bytes(m.logits()))
        choices = m.verify(ids[:4])
        out.append(bytes(m.logits()))
    return out, list(choices)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_logits_bit_identical_for_any_thread_count(models, name):
    ids = [int(i) for i in np.random.default_rng(5).integers(0, SHAPES[name]["n_vocab"], 12)]
    one, one_choices = run(models[name], 1, ids)
    for n in (2, 3):
        many, many_choices = run(models[name], n, ids)
        for k, (a, b) in enumerate(zip(one, many)):
            assert a == b, "%s: logits differ with %d threads at checkpoint %d" % (name, n, k)
        assert many_choices == one_choices


def test_close_and_free_with_workers_waiting(models):
    b = models["odd_wide"]
    for _ in range(20):  # workers started and stopped over and over, right after a job
        m = Model(b, n_threads=3)
        m.prefill([1, 2, 3])
        m.close()
        with pytest.raises(ValueError, match="closed"):
            m.step(1)
    m = Model(b, n_threads=2)
    m.prefill([4, 5])
    del m  # the last reference: the engine and its workers go at once
    gc.collect()
    # models used from several Python threads at once, each with its own workers
    errors = []

    def use():
        try:
            with Model(b, n_threads=2) as m:
                m.prefill([1, 2, 3, 4])
                for _ in range(3):
                    m.step(m.sample())
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=use) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_n_threads_checked(models):
    b = models["odd_small"]
    with Model(b) as m:
        assert m.info()["n_threads"] == 1
    with pytest.raises(ValueError, match="n_threads 0 is outside 1.."):
        Model(b, n_threads=0)
    with pytest.raises(TypeError, match="n_threads must be an int"):
        Model(b, n_threads=True)
    with pytest.raises(ValueError, match="n_threads 65: this build runs at most 64"):
        Model(b, n_threads=65)


@pytest.mark.parametrize("kernel", ["default", "TG_DOT_KERNEL=2"])
def test_threads_under_thread_sanitizer(models, tmp_path, kernel):
    """threads_check (tests/c) built with -fsanitize=thread: a data race between the caller and
    the workers aborts it; with kernel 2 (four rows per dot_rows) odd row counts split at
    multiples of 4."""
    cc = shutil.which("gcc") or shutil.which("cc")
    exe = tmp_path / "threads_check"
    defines = [] if kernel == "default" else ["-D" + kernel]
    r = subprocess.run([cc, "-std=c99", "-D_ISOC11_SOURCE", "-O1", "-g", "-Wall", "-Wextra", "-Werror",
                        "-ffp-contract=off", "-fsanitize=thread", *defines, "-I", str(ENGINE),
                        str(REPO / "tests" / "c" / "threads_check.c"), str(ENGINE / "tinygpt.c"),
                        str(ENGINE / "tg_port_posix.c"), "-o", str(exe), "-lm", "-lpthread"],
                       capture_output=True, text=True)
    assert r.returncode == 0, "ThreadSanitizer build failed:\n" + r.stderr
    for name in ("odd_small", "odd_wide"):
        path = tmp_path / (name + ".bin")
        path.write_bytes(models[name])
        ids = [str(i) for i in np.random.default_rng(6).integers(0, SHAPES[name]["n_vocab"], 12)]
        r = subprocess.run([str(exe), str(path), "3"] + ids, capture_output=True, text=True, timeout=600,
                           env={"TSAN_OPTIONS": "halt_on_error=1"})
        if r.returncode != 0 and "unexpected memory mapping" in r.stderr:
            pytest.skip("ThreadSanitizer cannot run on this kernel's memory layout: " + r.stderr[:200])
        out = r.stdout + r.stderr
        assert r.returncode == 0, out[-4000:]
        assert "threads_check: identical" in r.stdout
        assert "ThreadSanitizer" not in out


def test_bench_threads_json(capsys):
    """`tinygpt bench --threads N` measures 1 and N threads in one run and reports the ratio of
    the two (its value is a benchmark: docs/performance.md)."""
    from tinygpt import cli

    assert cli.main(["bench", "--preset", "tiny", "--threads", "2", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)["tiny"]
    assert r["threads"] == 2
    assert r["decode_tok_s"] > 0 and r["decode_tok_s_1_thread"] > 0
    assert r["decode_speedup"] == pytest.approx(r["decode_tok_s"] / r["decode_tok_s_1_thread"])
    assert r["prefill_speedup"] == pytest.approx(r["prefill_tok_s"] / r["prefill_tok_s_1_thread"])
    for bad, msg in ((["--threads", "0"], "--threads must be at least 1"),
                     (["--threads", "2", "--mcu"], "--threads does not apply to --mcu")):
        with pytest.raises(SystemExit) as e:
            cli.main(["bench", "--preset", "tiny"] + bad)
        assert e.value.code == 2
        assert msg in capsys.readouterr().err


MP_SCRIPT = r'''
import sys
import tinygpt
path = sys.argv[-1]


def logits_after(n_threads):
    m = tinygpt.Model(path, n_threads=n_threads)
    print("n_threads", m.info()["n_threads"])
    m.prefill([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])
    out = [bytes(m.logits())]
    for _ in range(3):
        m.step(m.sample())
        out.append(bytes(m.logits()))
    m.close()
    return out


one = logits_after(1)
print("identical", logits_after(2) == one, logits_after(3) == one)
for bad in (0, True, 65):
    try:
        tinygpt.Model(path, n_threads=bad)
    except Exception as e:
        print("%s: %s" % (type(e).__name__, e))
print("done")
'''


def test_micropython_module_threads_like_the_pc(micropy_bin, models, tmp_path):  # noqa: F811
    """The MicroPython module's n_threads (POSIX threads on the unix port, which never call into
    MicroPython): the same logits and the same errors as the host binding."""
    path = tmp_path / "model.bin"
    path.write_bytes(models["odd_wide"])
    script = tmp_path / "threads.py"
    script.write_text(MP_SCRIPT)
    outs = []
    for cmd, env in (([micropy_bin], {}), ([sys.executable], {"PYTHONPATH": str(REPO / "host_tools")})):
        r = subprocess.run(cmd + [str(script), str(path)], capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, **env))
        assert r.returncode == 0 and r.stdout.rstrip().endswith("done"), (r.stdout + r.stderr)[-3000:]
        outs.append(r.stdout.splitlines())
    assert outs[0] == outs[1]
    assert "identical True True" in outs[0]
    assert "n_threads 3" in outs[0]
    assert "ValueError: n_threads 65: this build runs at most 64" in outs[0]


CTRL_C_SCRIPT = r'''
import sys
import tinygpt
m = tinygpt.Model(sys.argv[-1], n_threads=2)
print("ready")
try:
    for _ in range(1000000):
        m.reset()
        m.prefill([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])
except KeyboardInterrupt:
    print("interrupted at pos", m.pos)
m.close()
print("done")
'''


@pytest.mark.parametrize("python", ["cpython", "micropython"])
def test_ctrl_c_with_workers_running(request, models, tmp_path, python):
    """SIGINT while the workers compute: the interpreter's thread gets KeyboardInterrupt, the
    model is left consistent (no prefill half done) and closes, its workers with it."""
    if python == "micropython":
        cmd, env = [request.getfixturevalue("micropy_bin")], {}
    else:
        cmd, env = [sys.executable], {"PYTHONPATH": str(REPO / "host_tools")}
    path = tmp_path / "model.bin"
    path.write_bytes(models["odd_wide"])
    script = tmp_path / "ctrl_c.py"
    script.write_text(CTRL_C_SCRIPT)
    p = subprocess.Popen(cmd + [str(script), str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=dict(os.environ, **env), preexec_fn=default_sigint)
    try:
        assert p.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, out + err
    lines = out.splitlines()
    assert lines[-1] == "done" and lines[-2] in ("interrupted at pos 0", "interrupted at pos 12"), out + err
