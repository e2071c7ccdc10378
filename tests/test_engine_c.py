"""The C engine on its own, built with AddressSanitizer + UndefinedBehaviorSanitizer.

tests/c/engine_check.c drives the whole C API (load, prefill, step, sample, every error path,
truncations, corruption, allocation failure, interrupts) on a converted model; any invalid
memory access, leak or undefined behaviour aborts it. Its logits and greedy tokens must equal
those of the normally built host module.
"""
import re
import shutil
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, SHAPES

from tinygpt.engine import Model

ENGINE = REPO / "usercmodule" / "tinygpt"


@pytest.fixture(scope="module")
def engine_check(tmp_path_factory):
    cc = shutil.which("gcc") or shutil.which("cc")
    assert cc, "a C compiler is needed (gcc)"
    exe = tmp_path_factory.mktemp("asan") / "engine_check"
    cmd = [cc, "-std=c99", "-D_ISOC11_SOURCE", "-O1", "-g", "-Wall", "-Wextra", "-Werror", "-ffp-contract=off",
           "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer",
           "-I", str(ENGINE), str(REPO / "tests" / "c" / "engine_check.c"), str(ENGINE / "tinygpt.c"),
           str(ENGINE / "tg_port_posix.c"), "-o", str(exe), "-lm"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, "sanitizer build failed:\n" + r.stderr
    return exe


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_engine_under_sanitizers(engine_check, converted, name):
    _, path = converted(name)
    ids = [int(i) for i in np.random.default_rng(2).integers(0, SHAPES[name]["vocab_size"], 12)]
    r = subprocess.run([str(engine_check), str(path)] + [str(i) for i in ids], capture_output=True, text=True,
                       timeout=600, env={"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0",
                                         "UBSAN_OPTIONS": "print_stacktrace=1"})
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert re.search(r"^engine_check: \d+ passed, 0 failed$", r.stdout, re.M), out[-2000:]
    assert "runtime error" not in out and "AddressSanitizer" not in out

    # the sanitizer build computes exactly what the host module computes
    with Model(path) as m:
        m.prefill(ids)
        crc = zlib.crc32(bytes(m.logits())) & 0xFFFFFFFF
        greedy = []
        for _ in range(6):
            greedy.append(m.sample())
            m.step(greedy[-1])
    assert "logits_crc: %08x" % crc in r.stdout
    assert "greedy: " + " ".join(map(str, greedy)) in r.stdout


def test_engine_compiles_warning_free_as_c99(tmp_path):
    """-std=c99 -pedantic with strict warnings: the engine is plain portable C."""
    cc = shutil.which("gcc") or shutil.which("cc")
    for src in ("tinygpt.c", "tg_port_posix.c"):
        r = subprocess.run([cc, "-std=c99", "-pedantic", "-Wall", "-Wextra", "-Wshadow", "-Wconversion",
                            "-Wcast-align=strict", "-Werror", "-ffp-contract=off", "-O2", "-c",
                            str(ENGINE / src), "-o", str(tmp_path / (src + ".o"))],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
