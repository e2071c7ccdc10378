"""`tinygpt flash`: write the tinygpt firmware and/or a model into an ESP32-S3's flash (esptool).

    tinygpt flash --port /dev/ttyACM0          # the built firmware + the shipped model (README step 5)
    tinygpt flash --port /dev/ttyACM0 --firmware build-TINYGPT_S3_N16R8/firmware.bin --model m.bin
    tinygpt flash --port /dev/ttyACM0 --model m.bin          # only the model (firmware unchanged)
    tinygpt flash --port /dev/ttyACM0 --firmware build-TINYGPT_S3_N16R8   # a build directory
    ... --dry-run                                              # print the esptool command only

Where things go (decided here, from the partition table, never guessed):
  * --firmware FILE, a merged image (MicroPython's `make` writes build-<BOARD>/firmware.bin:
    bootloader + partition table + app, starting at the bootloader offset, which is 0x0 on the
    ESP32-S3): written at 0x0. Recognised by the ESP image magic (0xE9) at 0 and a partition
    table at 0x8000.
  * --firmware FILE, an app image only (build-<BOARD>/micropython.bin: magic 0xE9, no table at
    0x8000): written at the app partition's offset (0x10000); bootloader and table must already
    be tinygpt's.
  * --firmware DIR, an ESP-IDF build directory: the files and offsets of its flasher_args.json
    (what `idf.py flash` writes), else bootloader/bootloader.bin at 0x0,
    partition_table/partition-table.bin at 0x8000 and micropython.bin at the app offset.
  * --model FILE: at the offset of the `model` partition of the partition table
    (--partitions CSV, default boards/TINYGPT_S3_N16R8/partitions-tinygpt.csv), where
    py/chat.py finds it (chat.load() tries the partition "model" first) and the engine maps it.
With neither --firmware nor --model, both are flashed: the firmware that `tinygpt firmware
build` / README step 4 writes (micropython/ports/esp32/build-TINYGPT_S3_N16R8/firmware.bin, under
the current directory or this repository) and the shipped model (models/default/model.bin).
Refused before anything is written: a model bigger than the `model` partition or not a tinygpt
model file (or truncated), a firmware whose own partition table differs from the CSV (the
model would land somewhere the firmware does not look), an app bigger than its partition.
esptool verifies every write (MD5 of the flash region) and resets the board afterwards.
"""
from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

from . import board as boardmod
from .board import BoardError, check_port

CHIP = "esp32s3"
BOOTLOADER_OFFSET = 0x0    # ESP32-S3 (0x1000 on the original ESP32)
IMAGE_MAGIC = 0xE9
DEFAULT_BAUD = 921600
REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = REPO / "models" / "default" / "model.bin"
# Where README step 4 (`make -C micropython/ports/esp32 BOARD_DIR=...`, run in the repository) and
# `tinygpt firmware build --micropython micropython` write the merged image.
BUILT_FIRMWARE = Path("micropython") / "ports" / "esp32" / "build-TINYGPT_S3_N16R8" / "firmware.bin"


class FlashError(BoardError):
    pass


def esptool_version() -> tuple[int, ...]:
    try:
        import esptool
    except ImportError:
        raise FlashError("esptool is not installed (pip install esptool, or the `device` extra)")
    return tuple(int(x) for x in esptool.__version__.split(".")[:2] if x.isdigit())


def _table_entries(parts):
    return [(p.name, p.type, p.subtype, p.offset, p.size) for p in parts]


def inspect_firmware(path, parts) -> list[tuple[int, Path]]:
    """[(offset, file)] to write for a firmware file or build directory; checks it against the
    partition table `parts`. Raises FlashError."""
    p = Path(path)
    app = next((x for x in parts if x.type == boardmod.APP_TYPE), None)
    if app is None:
        raise FlashError("the partition table has no app partition")
    if p.is_dir():
        return _inspect_build_dir(p, parts, app)
    try:
        boardmod.check_regular_file(p, "firmware file")
    except BoardError as e:
        raise FlashError(str(e))
    data = p.read_bytes()
    if len(data) < 24 or data[0] != IMAGE_MAGIC:
        raise FlashError("%s: not an ESP32 firmware image (no 0xE9 image header at the start)" % p)
    t = boardmod.TABLE_OFFSET
    if len(data) > t + 32 and data[t:t + 2] == boardmod.MAGIC:
        try:
            fw_parts = boardmod.from_binary(data[t:t + boardmod.TABLE_MAX])
        except BoardError as e:
            raise FlashError("%s: partition table inside the image: %s" % (p, e))
        _same_table(fw_parts, parts, p)
        if len(data) > app.offset and data[app.offset] != IMAGE_MAGIC:
            raise FlashError("%s: no app image at 0x%x inside the merged image" % (p, app.offset))
        app_bytes = len(data) - app.offset
        if app_bytes > app.size:
            raise FlashError("%s: the app (%d bytes) is larger than the %r partition (%d bytes)"
                             % (p, app_bytes, app.name, app.size))
        return [(BOOTLOADER_OFFSET, p)]
    if len(data) > app.size:
        raise FlashError("%s: the app image (%d bytes) is larger than the %r partition (%d bytes)"
                         % (p, len(data), app.name, app.size))
    return [(app.offset, p)]


def _same_table(fw_parts, parts, where) -> None:
    if _table_entries(fw_parts) != _table_entries(parts):
        def show(ps):
            return ", ".join("%s@0x%x+0x%x" % (x.name, x.offset, x.size) for x in ps)
        raise FlashError("%s was built with another partition table (%s) than the one given (%s): "
                         "rebuild the firmware, or pass --partitions with the table it was built with"
                         % (where, show(fw_parts), show(parts)))


def _inspect_build_dir(d: Path, parts, app) -> list[tuple[int, Path]]:
    fa = d / "flasher_args.json"
    if fa.exists():
        try:
            files = json.loads(fa.read_text())["flash_files"]
        except (ValueError, KeyError) as e:
            raise FlashError("%s: unreadable (%s)" % (fa, e))
        out = sorted((int(off, 0), d / name) for off, name in files.items())
    else:
        out = [(BOOTLOADER_OFFSET, d / "bootloader" / "bootloader.bin"),
               (boardmod.TABLE_OFFSET, d / "partition_table" / "partition-table.bin"),
               (app.offset, d / "micropython.bin")]
    for off, f in out:
        if not f.exists():
            raise FlashError("%s: missing in the build directory %s (run the firmware build first)" % (f.name, d))
    table = [f for off, f in out if off == boardmod.TABLE_OFFSET]
    if table:
        _same_table(boardmod.from_binary(table[0].read_bytes()), parts, table[0])
    for off, f in out:
        if off == app.offset and f.stat().st_size > app.size:
            raise FlashError("%s (%d bytes) is larger than the %r partition (%d bytes)"
                             % (f, f.stat().st_size, app.name, app.size))
    return out


def check_model(path, parts) -> tuple[int, Path]:
    """(offset, file) for a model; refuses one that is not a complete tinygpt model file or is
    bigger than the `model` partition."""
    p = Path(path)
    try:
        model_part = boardmod.find_partition(parts, "model")
    except BoardError as e:
        raise FlashError("%s: this partition table cannot take a model" % e)
    try:  # a FIFO would block open() for ever, a device never end
        boardmod.check_regular_file(p, "model file")
    except BoardError as e:
        raise FlashError(str(e))
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(16)
    if len(head) < 16 or head[:4] != b"TGPT":
        raise FlashError("%s: not a tinygpt model file (no TGPT header)" % p)
    file_size = struct.unpack_from("<I", head, 12)[0]
    if size < file_size:
        raise FlashError("%s: truncated model file (%d of %d bytes)" % (p, size, file_size))
    if size > model_part.size:
        raise FlashError("%s (%d bytes) does not fit the 'model' partition (%d bytes at 0x%x); use a smaller "
                         "model or a partition table with a larger 'model' partition"
                         % (p, size, model_part.size, model_part.offset))
    return model_part.offset, p


def build_command(port: str, writes: list[tuple[int, Path]], baud: int = DEFAULT_BAUD,
                  version: tuple[int, ...] | None = None) -> list[str]:
    """The esptool command line (esptool >= 5 spells commands and options with '-', older with '_')."""
    v = esptool_version() if version is None else version
    dash = v >= (5,)
    cmd = [sys.executable, "-m", "esptool", "--chip", CHIP, "--port", port, "--baud", str(baud)]
    if dash:
        cmd += ["write-flash", "--flash-mode", "keep", "--flash-freq", "keep", "--flash-size", "keep"]
    else:
        cmd += ["write_flash", "--flash_mode", "keep", "--flash_freq", "keep", "--flash_size", "keep"]
    for off, f in sorted(writes):
        cmd += ["0x%x" % off, str(f)]
    return cmd


def plan(port: str, firmware=None, model=None, partitions=None, baud: int = DEFAULT_BAUD,
         version: tuple[int, ...] | None = None) -> list[str]:
    """Check everything and return the esptool command (nothing is run)."""
    if firmware is None and model is None:
        raise FlashError("nothing to flash: give --firmware and/or --model")
    csv = Path(partitions) if partitions else boardmod.PARTITIONS_CSV
    parts = boardmod.load_csv(csv)
    problems = boardmod.check_partitions(parts, boardmod.BOARDS["N16R8"].flash_bytes, require_model=model is not None,
                                         model_bytes=Path(model).stat().st_size if model and Path(model).exists() else None)
    problems = [x for x in problems if "smaller than the model file" not in x]  # check_model says it better
    if problems:
        raise FlashError("%s: %s" % (csv, "; ".join(problems)))
    writes = []
    if firmware is not None:
        writes += inspect_firmware(firmware, parts)
    if model is not None:
        writes.append(check_model(model, parts))
    writes.sort()
    for (o1, f1), (o2, f2) in zip(writes, writes[1:]):
        if o1 + f1.stat().st_size > o2:
            raise FlashError("%s at 0x%x would overwrite %s at 0x%x" % (f1, o1, f2, o2))
    return build_command(port, writes, baud, version)


def add_arguments(p) -> None:
    p.add_argument("--port", required=True, help="serial port of the board (e.g. /dev/ttyACM0)")
    p.add_argument("--firmware", help="merged firmware.bin (at 0x0), an app image, or an ESP-IDF build directory "
                                      "(default, when --model is not given either: %s)" % BUILT_FIRMWARE)
    p.add_argument("--model", help="model file, written into the 'model' partition (default, when --firmware is "
                                   "not given either: the shipped model)")
    p.add_argument("--partitions", help="partition table CSV (default: boards/TINYGPT_S3_N16R8/partitions-tinygpt.csv)")
    p.add_argument("--baud", type=int, default=DEFAULT_BAUD, help="baud rate (default %d)" % DEFAULT_BAUD)
    p.add_argument("--dry-run", action="store_true", help="print the esptool command, do not run it")


def flash_timeout(cmd) -> float:
    """Seconds allowed for an esptool run: 60 s to connect, erase and reset, plus the image bytes
    at 20 KB/s (esptool writes compressed at 921600 baud several times faster; the margin is for
    slow USB-serial bridges and --baud 115200)."""
    nbytes = sum(Path(f).stat().st_size for off, f in zip(cmd, cmd[1:]) if off.startswith("0x"))
    return 60.0 + nbytes / 20_000


def default_firmware(cwd=None) -> Path:
    """The firmware at the documented build location, under the current directory or this
    repository; FlashError naming where it looked and how to build it."""
    places = []
    for root in (Path.cwd() if cwd is None else Path(cwd), REPO):
        p = root / BUILT_FIRMWARE
        if p not in places:
            places.append(p)
    for p in places:
        if p.is_file():
            return p
    raise FlashError("no firmware to flash: %s does not exist. Build it (README step 4: `tinygpt firmware build "
                     "--micropython micropython`, needs ESP-IDF), or give --firmware FILE; to flash only the "
                     "model, give --model FILE" % " or ".join(str(p) for p in places))


def run_cli(args) -> None:
    if args.firmware is None and args.model is None:  # the README's "firmware + model" line
        args.firmware, args.model = default_firmware(), DEFAULT_MODEL
        print("flashing %s and the shipped model %s" % (args.firmware, args.model))
    if not args.dry_run:
        check_port(args.port)
    cmd = plan(args.port, args.firmware, args.model, args.partitions, args.baud)
    print(" ".join(cmd))
    if args.dry_run:
        return
    limit = flash_timeout(cmd)
    try:
        r = subprocess.run(cmd, timeout=limit)
    except subprocess.TimeoutExpired:
        raise FlashError("esptool did not finish in %.0f s: the board stopped answering? Reset it into download "
                         "mode (hold BOOT, press RESET) and flash again" % limit)
    if r.returncode != 0:
        raise FlashError("esptool failed (exit status %d): see its output above; is the board in download "
                         "mode (hold BOOT, press RESET) and the port right?" % r.returncode)
