"""scripts/check-esp32: the ESP32 build of the engine compiles for Xtensa (issue 25).

The script compiles tg_port_esp32.c and tinygpt.c with clang --target=xtensa (PyPI ziglang) and
xtensa-lx106-elf-gcc against the declaration-only IDF headers of tests/esp32_stubs/, IDF's
warnings as errors and uint32_t as long, then checks the objects' undefined symbols. Here: it
passes on the tree, and each typical ESP-IDF mistake, put into a copy of usercmodule/tinygpt,
fails it with a diagnostic naming the mutated file:line.

Never skipped: the compilers come from `bash scripts/install-ci-deps` (Debian packages) and the
test extra of pyproject.toml (ziglang); when they are missing the script says what to install
and the tests fail with that message.
"""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPT = REPO / "scripts" / "check-esp32"
ENGINE = REPO / "usercmodule" / "tinygpt"


def check(src=None):
    cmd = ["bash", str(SCRIPT)] + (["--src", str(src)] if src else [])
    env = dict(os.environ, PYTHON=sys.executable)  # the interpreter with ziglang (test extra)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def test_check_esp32_passes_on_tree():
    r = check()
    assert r.returncode == 0, "scripts/check-esp32 failed:\n%s%s" % (r.stdout, r.stderr)
    assert "check-esp32: OK" in r.stdout


# (file, text to replace, replacement, line of the diagnostic relative to the replaced text's
# first line, what the diagnostic must say); each text must occur exactly once.
MUTATIONS = {
    "mmap_arg_count": (
        "tg_port_esp32.c", "ESP_PARTITION_MMAP_DATA, &ptr, &m->handle)", "ESP_PARTITION_MMAP_DATA, &ptr)", 0,
        "too few arguments"),
    "unknown_idf_name": (
        "tg_port_esp32.c", "MALLOC_CAP_SPIRAM | MALLOC_CAP_8BIT", "MALLOC_CAP_PSRAM | MALLOC_CAP_8BIT", 0,
        "MALLOC_CAP_PSRAM"),
    "pointer_type_mismatch": (  # a semaphore handle where the task handle goes
        "tg_port_esp32.c", "uxTaskPriorityGet(NULL), &w->helper,", "uxTaskPriorityGet(NULL), &w->go,", 0,
        "incompatible pointer"),
    "percent_u_for_uint32": (  # fine where uint32_t is unsigned int (host, lx106), not on IDF
        "tinygpt.c", '"h.%u.%s", (unsigned)layer,', '"h.%u.%s", layer,', 0, "format"),
    "undeclared_function": (
        "tg_port_esp32.c", "esp_partition_munmap(m->handle);", "esp_partition_unmap(m->handle);", 0,
        "esp_partition_unmap"),
    "declared_but_not_in_idf": (  # compiles (a local prototype); the undefined-symbol check fails
        "tg_port_esp32.c", "        esp_partition_munmap(m->handle);",
        "        void esp_partition_unmap(esp_partition_mmap_handle_t);\n        esp_partition_unmap(m->handle);", 1,
        "esp_partition_unmap"),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_check_esp32_catches(tmp_path, name):
    fname, old, new, dline, what = MUTATIONS[name]
    src = (tmp_path / "tinygpt").resolve()
    shutil.copytree(ENGINE, src)
    path = src / fname
    text = path.read_text()
    assert text.count(old) == 1, "mutation %s: %r must occur once in %s" % (name, old, fname)
    line = text[: text.index(old)].count("\n") + 1 + dline
    path.write_text(text.replace(old, new))
    r = check(src)
    out = r.stdout + r.stderr
    assert r.returncode != 0, "mutation %s was not caught:\n%s" % (name, out)
    where = "%s:%d:" % (path, line)
    hits = [ln for ln in out.splitlines() if where in ln]
    assert hits, "mutation %s: no diagnostic names %s:\n%s" % (name, where, out)
    assert any(what in ln for ln in hits), "mutation %s: %s does not mention %r:\n%s" % (name, where, what, out)
    print("\n[%s] %s" % (name, hits[0]))
