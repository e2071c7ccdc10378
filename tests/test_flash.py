"""tinygpt.flash (issue 5): esptool command lines, offsets from the partition table, refusals,
merged images, time limits.

The board tools' tests, one file per module of host_tools/tinygpt/: tests/test_board.py (board),
tests/test_firmware.py (firmware), tests/test_flash.py (flash), tests/test_deploy.py (deploy),
tests/test_serial_chat.py (serial_chat); what they share is in tests/board_helpers.py.
"""
import json
import os
import shutil
import struct
import subprocess
import sys

import pytest

from board_helpers import CSV, make_model
from tinygpt import board, cli, flash


# ---------------------------------------------------------------------------------------------
# tinygpt flash: esptool command lines, offsets, refusals, merged images
# ---------------------------------------------------------------------------------------------

def fake_image(size, fill=0x00):
    """Bytes that start like an ESP32 app/bootloader image (magic 0xE9)."""
    return bytes([0xE9, 3, 2, 0x4F]) + bytes([fill]) * (size - 4)


def test_flash_model_offset_and_command(tmp_path):
    model = make_model(tmp_path / "m.bin", seed=1)
    cmd = flash.plan("/dev/ttyACM0", model=model, version=(5, 6))
    assert cmd[1:] == ["-m", "esptool", "--chip", "esp32s3", "--port", "/dev/ttyACM0", "--baud", "921600",
                       "write-flash", "--flash-mode", "keep", "--flash-freq", "keep", "--flash-size", "keep",
                       "0x300000", str(model)]
    cmd4 = flash.plan("/dev/ttyACM0", model=model, baud=460800, version=(4, 8))
    assert cmd4[8:17] == ["460800", "write_flash", "--flash_mode", "keep", "--flash_freq", "keep", "--flash_size",
                          "keep", "0x300000"]
    # the offset comes from the table given
    other = tmp_path / "p.csv"
    other.write_text(CSV.read_text().replace("0x300000, 0x840000", "0x400000, 0x740000"))
    assert flash.plan("P", model=model, partitions=other, version=(5,))[-2] == "0x400000"
    with pytest.raises(flash.FlashError, match="nothing to flash"):
        flash.plan("P")


def test_flash_refuses_a_model_bigger_than_the_partition(tmp_path):
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:  # a sparse file 1 byte bigger than the partition, header consistent
        f.write(b"TGPT" + struct.pack("<3I", 1, 128, 0x840001))
        f.truncate(0x840001)
    with pytest.raises(flash.FlashError, match=r"does not fit the 'model' partition \(8650752 bytes at 0x300000\)"):
        flash.plan("P", model=big, version=(5,))
    with open(big, "r+b") as f:
        f.truncate(0x840000)  # exactly the partition: fine as far as size goes, but now truncated
    with pytest.raises(flash.FlashError, match="truncated model file"):
        flash.plan("P", model=big, version=(5,))
    (tmp_path / "x.bin").write_bytes(b"hello")
    with pytest.raises(flash.FlashError, match="not a tinygpt model file"):
        flash.plan("P", model=tmp_path / "x.bin", version=(5,))
    with pytest.raises(flash.FlashError, match="no such model file"):
        flash.plan("P", model=tmp_path / "none.bin", version=(5,))
    # a FIFO would block open() for ever: refused before anything opens it
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(flash.FlashError, match="is a FIFO|not a regular file"):
        flash.plan("P", model=tmp_path / "fifo", version=(5,))
    with pytest.raises(flash.FlashError, match="is a FIFO|not a regular file"):
        flash.plan("P", firmware=tmp_path / "fifo", version=(5,))


def test_eval_refuses_a_fifo_before_opening_it(tmp_path, capsys):
    os.mkfifo(tmp_path / "q.fifo")
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", str(tmp_path), "--questions", str(tmp_path / "q.fifo")])
    assert e.value.code == 2 and "q.fifo: is a FIFO" in capsys.readouterr().err


def test_flash_firmware_forms(tmp_path):
    """Merged image (made by esptool merge-bin, read back by us), app-only image, build dir."""
    boot = tmp_path / "bootloader.bin"
    boot.write_bytes(fake_image(20000))
    table = tmp_path / "partition-table.bin"
    board.write_partition_bin(CSV, table)
    app = tmp_path / "micropython.bin"
    app.write_bytes(fake_image(300000, 0x11))
    merged = tmp_path / "firmware.bin"
    r = subprocess.run([sys.executable, "-m", "esptool", "--chip", "esp32s3", "merge-bin", "-o", str(merged),
                        "0x0", str(boot), "0x8000", str(table), "0x10000", str(app)], capture_output=True, text=True)
    if r.returncode != 0:  # esptool 4 spells it merge_bin
        r = subprocess.run([sys.executable, "-m", "esptool", "--chip", "esp32s3", "merge_bin", "-o", str(merged),
                            "0x0", str(boot), "0x8000", str(table), "0x10000", str(app)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    data = merged.read_bytes()
    assert data[0x8000:0x8C00] == table.read_bytes() and len(data) == 0x10000 + 300000

    model = make_model(tmp_path / "m.bin", seed=1)
    cmd = flash.plan("P", firmware=merged, model=model, version=(5,))
    assert cmd[-4:] == ["0x0", str(merged), "0x300000", str(model)]
    assert flash.plan("P", firmware=app, version=(5,))[-2:] == ["0x10000", str(app)]

    # a firmware built with another partition table is refused: the model would be lost
    stock = tmp_path / "stock.csv"
    stock.write_text(board.STOCK_CSV + "vfs, data, fat, 0x200000, 0x600000,\n")
    other = bytearray(data)
    other[0x8000:0x8C00] = board.to_binary(board.load_csv(stock))
    (tmp_path / "other.bin").write_bytes(bytes(other))
    with pytest.raises(flash.FlashError, match="built with another partition table"):
        flash.plan("P", firmware=tmp_path / "other.bin", model=model, version=(5,))
    # an app too big for its partition
    (tmp_path / "huge.bin").write_bytes(fake_image(0x2F0000 + 1))
    with pytest.raises(flash.FlashError, match="larger than the 'factory' partition"):
        flash.plan("P", firmware=tmp_path / "huge.bin", version=(5,))
    (tmp_path / "notimg.bin").write_bytes(b"\0" * 100)
    with pytest.raises(flash.FlashError, match="not an ESP32 firmware image"):
        flash.plan("P", firmware=tmp_path / "notimg.bin", version=(5,))

    # an ESP-IDF build directory: the offsets of its flasher_args.json
    build = tmp_path / "build-TINYGPT_S3_N16R8"
    (build / "bootloader").mkdir(parents=True)
    (build / "partition_table").mkdir()
    shutil.copy(boot, build / "bootloader" / "bootloader.bin")
    shutil.copy(table, build / "partition_table" / "partition-table.bin")
    shutil.copy(app, build / "micropython.bin")
    assert flash.plan("P", firmware=build, version=(5,))[-6:] == [
        "0x0", str(build / "bootloader" / "bootloader.bin"), "0x8000",
        str(build / "partition_table" / "partition-table.bin"), "0x10000", str(build / "micropython.bin")]
    (build / "flasher_args.json").write_text(json.dumps({"flash_files": {
        "0x0": "bootloader/bootloader.bin", "0x8000": "partition_table/partition-table.bin",
        "0x10000": "micropython.bin"}}))
    assert flash.plan("P", firmware=build, model=model, version=(5,))[-2:] == ["0x300000", str(model)]
    os.remove(build / "micropython.bin")
    with pytest.raises(flash.FlashError, match="micropython.bin: missing"):
        flash.plan("P", firmware=build, version=(5,))


def test_flash_cli_dry_run(tmp_path, capsys):
    model = make_model(tmp_path / "m.bin", seed=1)
    assert cli.main(["flash", "--port", "/dev/ttyUSB7", "--model", str(model), "--dry-run"]) == 0
    out = capsys.readouterr().out.split()
    assert "--port" in out and out[out.index("--port") + 1] == "/dev/ttyUSB7"
    assert out[-2:] == ["0x300000", str(model)]


def test_flash_port_alone_writes_built_firmware_and_shipped_model(tmp_path, capsys, monkeypatch):
    """README step 5: `tinygpt flash --port P` is "firmware + model"."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(flash, "REPO", tmp_path / "repo")  # no firmware in this checkout either
    with pytest.raises(SystemExit) as e:
        cli.main(["flash", "--port", "/dev/ttyUSB7", "--dry-run"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "no firmware to flash: %s" % (tmp_path / flash.BUILT_FIRMWARE) in err
    assert "tinygpt firmware build --micropython micropython" in err and "--model FILE" in err
    # a merged image where README step 4 builds it
    image = bytearray(fake_image(0x10000 + 4096))
    image[0x8000:0x8C00] = board.to_binary(board.load_csv(CSV))
    image[0x10000] = 0xE9
    fw = tmp_path / flash.BUILT_FIRMWARE
    fw.parent.mkdir(parents=True)
    fw.write_bytes(bytes(image))
    assert cli.main(["flash", "--port", "/dev/ttyUSB7", "--dry-run"]) == 0
    cmd = capsys.readouterr().out.splitlines()[-1].split()
    assert cmd[-4:] == ["0x0", str(fw), "0x300000", str(flash.DEFAULT_MODEL)]
    # without --dry-run a port that is not there is refused before esptool runs
    with pytest.raises(SystemExit):
        cli.main(["flash", "--port", str(tmp_path / "ttyNONE")])
    assert "ttyNONE does not exist: is the board plugged in?" in capsys.readouterr().err


def test_flash_has_a_time_limit(tmp_path, monkeypatch, capsys):
    model = make_model(tmp_path / "m.bin", seed=1)
    cmd = flash.plan("P", model=model, version=(5,))
    assert flash.flash_timeout(cmd) == 60.0 + model.stat().st_size / 20_000
    seen = {}

    def hung_esptool(cmd, timeout=None):
        seen["timeout"] = timeout
        raise subprocess.TimeoutExpired(cmd, timeout)
    monkeypatch.setattr(flash.subprocess, "run", hung_esptool)
    port = tmp_path / "ttyUSB0"
    port.write_bytes(b"")  # a port that exists
    with pytest.raises(SystemExit):
        cli.main(["flash", "--port", str(port), "--model", str(model)])
    assert seen["timeout"] == flash.flash_timeout(cmd)
    assert "esptool did not finish in 62 s: the board stopped answering?" in capsys.readouterr().err
