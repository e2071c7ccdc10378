"""The dot-product kernels (dot_rows in usercmodule/tinygpt/tinygpt.c, chosen by TG_DOT_KERNEL)
against a plain loop, bit for bit, on odd sizes, batches and alignments: tests/mcu/kernel_check.c.

On the PC: kernel 1 (the PC default) and kernel 2 (32-bit cores without SIMD), under ASan and
UBSan. On the emulated Cortex-M4F (QEMU, every misaligned word access faults): kernel 3 (the
default there, Armv7E-M DSP) and kernel 2. The model-level tests (test_engine, test_mcu) only
see the shapes of their models; this one covers what they do not.
"""
import shutil
import subprocess

import pytest

from conftest import REPO

from tinygpt import mcu
from test_mcu import require_mcu_tools

ENGINE = REPO / "usercmodule" / "tinygpt"
CHECK = REPO / "tests" / "mcu" / "kernel_check.c"


def expect_pass(out, rc, kernel):
    assert rc == 0, out[-3000:]
    assert "kernel_check: TG_DOT_KERNEL %d," % kernel in out and "all equal" in out, out[-3000:]


@pytest.mark.parametrize("kernel", [1, 2])
def test_kernel_on_pc(tmp_path, kernel):
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        pytest.skip("no C compiler (cc/gcc)")
    exe = tmp_path / "kernel_check"
    r = subprocess.run([cc, "-std=c99", "-O2", "-g", "-Wall", "-Wextra", "-Werror", "-ffp-contract=off",
                        "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-DTG_DOT_KERNEL=%d" % kernel,
                        "-I", str(ENGINE), str(CHECK), str(ENGINE / "tg_port_posix.c"), "-o", str(exe), "-lm"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    expect_pass(r.stdout + r.stderr, r.returncode, kernel)


@pytest.mark.parametrize("kernel", [3, 2])
def test_kernel_on_cortex_m4f(tmp_path, kernel):
    require_mcu_tools()
    defines = ("TG_DOT_KERNEL=%d" % kernel,)
    objs = [mcu.compile_source(src, tmp_path, defines) for src in
            (mcu.HARNESS / "startup.c", mcu.HARNESS / "mini_printf.c", ENGINE / "tg_port_arena.c", CHECK)]
    elf = mcu.link(tmp_path, "kernel_check", objs)
    rc, out = mcu.run_qemu(elf, timeout=300)
    expect_pass(out, rc, kernel)
