"""What a person reads and types (issue 13): paths from the environment, tables with units and
--json, progress bars only on a terminal, warnings as one plain line, eval's options."""
import os
import subprocess
import sys

from conftest import REPO


def test_relative_build_paths_resolve_against_the_users_directory(tmp_path):
    """`MICROPY_BIN=micropython/ports/unix/build-standard/micropython bash scripts/test`: scripts/test
    cds into the repository and the tests run tools in temporary directories; conftest makes the
    path absolute against the directory the user ran from."""
    probe = ("import sys, os; sys.path.insert(0, %r); import conftest; "
             "print(os.environ['MICROPY_BIN']); print(os.environ['TINYGPT_QEMU_FIRMWARE']); "
             "print(os.environ['OTHER'])" % str(REPO / "tests"))
    env = dict(os.environ, MICROPY_BIN="mp/ports/unix/build-standard/micropython",
               TINYGPT_QEMU_FIRMWARE="fw.elf", OTHER="rel/x", TINYGPT_USER_CWD="")
    r = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [str(tmp_path / "mp/ports/unix/build-standard/micropython"),
                                     str(tmp_path / "fw.elf"), "rel/x"]
    # scripts/test runs pytest from the repository and passes the user's directory on
    env["TINYGPT_USER_CWD"] = str(tmp_path / "user")
    env["MICROPY_BIN"] = "/abs/micropython"
    r = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True)
    assert r.stdout.splitlines()[:2] == ["/abs/micropython", str(tmp_path / "user" / "fw.elf")]
    text = (REPO / "scripts" / "test").read_text()
    assert text.index('export TINYGPT_USER_CWD="${TINYGPT_USER_CWD:-$PWD}"') < text.index('cd "$(dirname "$0")/.."')
