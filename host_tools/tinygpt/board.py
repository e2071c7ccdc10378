"""Boards, partition tables and memory budgets: will this model run on that ESP32-S3?

    tinygpt budget hw1                       # a preset on the N16R8 board
    tinygpt budget model.bin --n-ctx 96 --json
    tinygpt budget d192x20 --board N8R2      # what does not fit, and the largest n_ctx that does

Python API:
    BOARDS['N16R8']                          # flash / PSRAM sizes and partition table of a board
    parse_csv(text) / load_csv(path)         # ESP-IDF partition CSV -> [Partition]
    to_binary(parts) / from_binary(data)     # the 3 KiB table ESP-IDF writes at 0x8000 (MD5 included)
    check_partitions(parts, flash_bytes)     # alignment, overlaps, flash size, required partitions
    find_partition(parts, 'model')
    budget('hw1', board='N16R8', n_ctx=None) -> dict

The partition code is written from ESP-IDF's partition-table documentation and checked against
ESP-IDF's own gen_esp32part.py in tests/test_board.py (its binary for our CSV is recorded there).

The budget's numbers come from how the code allocates, not from measurements on a board:
  * the model file: flash. Flashed into the `model` partition it is memory-mapped
    (tg_port_esp32.c: esp_partition_mmap) and the weights are read in place; loaded from a file on
    the filesystem instead (placement='file'), it is read into PSRAM (modtinygpt.c read_file).
  * KV cache and activations: PSRAM, exactly what usercmodule/tinygpt/tinygpt.c alloc_state
    allocates (the same numbers as Model.info()['kv_bytes'] / ['scratch_bytes']), plus the layer
    table (16 pointers per layer, 4 bytes each on the ESP32), the token history and the binding's
    id buffer (4 bytes per context position each), the model struct and heap block overhead.
  * the tokenizer on MicroPython (py/bpe.py): measured on the 64-bit unix port as about
    20 bytes per merge + 2 KB (vocab 512: 7.3 KB ... vocab 4096: 80 KB; bpe.py's docstring: 86 KB
    for a trained 4096-token tokenizer); every object there is pointer-sized words, so the 32-bit
    ESP32 needs half. Estimate used: 12 bytes per merge + 4 KiB (a ceiling of both).
  * MicroPython's working set while answering (the prompt's ids, strings, the decoder): 64 KiB,
    the esp32 port's initial GC heap (MICROPY_GC_INITIAL_HEAP_SIZE; it then grows into PSRAM).
  * a 256 KiB PSRAM reserve for ESP-IDF/MicroPython allocations that land there (Wi-Fi/BLE
    buffers, mbedTLS, heap fragmentation).
  * firmware: ~1.80 MB (MicroPython's generic ESP32-S3 app image ~1.75 MB + ~48 KB tinygpt), see
    boards/TINYGPT_S3_N16R8/partitions-tinygpt.csv for how it was estimated.
  * MMU: the S3 maps flash and PSRAM through 512 pages of 64 KiB shared by code, read-only data,
    PSRAM and esp_partition_mmap (ESP-IDF soc/esp32s3 ext_mem_defs.h: SOC_MMU_ENTRY_NUM 512).
"""
from __future__ import annotations

import hashlib
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from .ui import check_regular_file as ui_check_regular_file
from .ui import format_bytes as _h

REPO = Path(__file__).resolve().parents[2]
BOARD_DIR = REPO / "boards" / "TINYGPT_S3_N16R8"
PARTITIONS_CSV = BOARD_DIR / "partitions-tinygpt.csv"

KiB = 1024
MiB = 1024 * 1024


class BoardError(Exception):
    """A problem with a board, partition table, port or firmware, as one readable line."""


def serial_ports() -> list[str]:
    """The serial ports this machine has now (pyserial's list; empty without pyserial)."""
    try:
        from serial.tools import list_ports
    except ImportError:
        return []
    return sorted(p.device for p in list_ports.comports())


def check_port(port: str) -> str:
    """Refuse a serial port path that does not exist, naming the ports that do (mpremote and
    pyserial would only say "may be in use by another program" or "could not open port").
    Names that are not paths (COM3, rfc2217://..., socket://...) are left to the tool."""
    if not port or not port.strip():
        raise BoardError("empty --port: give the board's serial port, e.g. /dev/ttyACM0")
    if "://" in port or os.sep not in port:
        return port
    if not os.path.exists(port):
        found = serial_ports()
        raise BoardError("%s does not exist: is the board plugged in? (serial ports here: %s)"
                         % (port, ", ".join(found) if found else "none found"))
    return port


# ---------------------------------------------------------------------------------------------
# Boards
# ---------------------------------------------------------------------------------------------

# MicroPython's stock layout for ESP32-S3 boards with >= 4 MiB flash
# (ports/esp32/partitions-4MiBplus.csv); the esp32 port adds a "vfs" partition from the end of
# the last partition to the end of the flash at boot (ports/esp32/main.c).
STOCK_CSV = """\
nvs,      data, nvs,     0x9000,  0x6000,
phy_init, data, phy,     0xf000,  0x1000,
factory,  app,  factory, 0x10000, 0x1F0000,
"""


@dataclass(frozen=True)
class Board:
    name: str
    module: str
    flash_bytes: int
    psram_bytes: int
    psram_mode: str          # "octal" or "quad"
    partitions: Path | None  # our CSV, or None: MicroPython's stock layout (no model partition)
    firmware_board: str      # the MicroPython BOARD to build for it

    def partition_table(self) -> list[Partition]:
        """The board's partitions, including the "vfs" that MicroPython adds when the table has
        none (ports/esp32/main.c)."""
        parts = load_csv(self.partitions) if self.partitions else parse_csv(STOCK_CSV, "<stock>")
        if not any(p.name in ("vfs", "ffat") for p in parts):
            end = max(p.offset + p.size for p in parts)
            if end < self.flash_bytes:
                parts.append(Partition("vfs", DATA_TYPE, SUBTYPES[DATA_TYPE]["fat"], end,
                                       self.flash_bytes - end, 0, 0))
        return parts


BOARDS: dict[str, Board] = {
    "N16R8": Board("N16R8", "ESP32-S3-WROOM-1-N16R8", 16 * MiB, 8 * MiB, "octal", PARTITIONS_CSV,
                   "TINYGPT_S3_N16R8"),
    # Other common modules, with MicroPython's stock firmware (no model partition: a model lives
    # on the filesystem and is read into PSRAM).
    "N8R8": Board("N8R8", "ESP32-S3-WROOM-1-N8R8", 8 * MiB, 8 * MiB, "octal", None,
                  "ESP32_GENERIC_S3 (variant SPIRAM_OCT)"),
    "N8R2": Board("N8R2", "ESP32-S3-WROOM-1-N8R2", 8 * MiB, 2 * MiB, "quad", None, "ESP32_GENERIC_S3"),
}


def get_board(name: str) -> Board:
    key = name.upper()
    if key not in BOARDS:
        raise BoardError("unknown board %r (known: %s)" % (name, ", ".join(BOARDS)))
    return BOARDS[key]


# ---------------------------------------------------------------------------------------------
# Partition tables (ESP-IDF format)
# ---------------------------------------------------------------------------------------------

APP_TYPE, DATA_TYPE = 0x00, 0x01
TYPES = {"app": APP_TYPE, "data": DATA_TYPE}
SUBTYPES = {
    APP_TYPE: {"factory": 0x00, "test": 0x20, **{"ota_%d" % i: 0x10 + i for i in range(16)}},
    DATA_TYPE: {"ota": 0x00, "phy": 0x01, "nvs": 0x02, "coredump": 0x03, "nvs_keys": 0x04,
                "efuse": 0x05, "undefined": 0x06, "esphttpd": 0x80, "fat": 0x81, "spiffs": 0x82,
                "littlefs": 0x83},
}
FLAGS = {"encrypted": 0x1, "readonly": 0x2}
TABLE_OFFSET = 0x8000      # CONFIG_PARTITION_TABLE_OFFSET default
TABLE_SECTOR = 0x1000      # the table's flash sector: partitions start after it
TABLE_MAX = 0xC00          # 3 KiB of entries + MD5 + 0xFF padding, as ESP-IDF writes it
APP_ALIGN = 0x10000        # app partitions: 64 KiB (the MMU page the app is mapped with)
DATA_ALIGN = 0x1000        # data partitions: 4 KiB (the flash erase sector)
MODEL_ALIGN = 0x10000      # ours: the model partition is mmapped in 64 KiB MMU pages
ENTRY = struct.Struct("<2sBBII16sI")
MAGIC = b"\xAA\x50"
MD5_MAGIC = b"\xEB\xEB" + b"\xFF" * 14
NAME_MAX = 15              # 16 bytes with the terminating NUL


@dataclass
class Partition:
    name: str
    type: int
    subtype: int
    offset: int
    size: int
    flags: int = 0
    line: int = 0   # CSV line, 0 when not from a CSV

    @property
    def end(self) -> int:
        return self.offset + self.size

    def type_name(self) -> str:
        return {APP_TYPE: "app", DATA_TYPE: "data"}.get(self.type, "0x%02x" % self.type)

    def subtype_name(self) -> str:
        for k, v in SUBTYPES.get(self.type, {}).items():
            if v == self.subtype:
                return k
        return "0x%02x" % self.subtype


def _parse_int(text: str, what: str, line: int, names: dict | None = None) -> int:
    t = text.strip()
    if names and t in names:
        return names[t]
    mult = 1
    if t[-1:].upper() in ("K", "M"):
        mult = KiB if t[-1].upper() == "K" else MiB
        t = t[:-1]
    try:
        return int(t, 0) * mult
    except ValueError:
        known = " (known: %s)" % ", ".join(names) if names else ""
        raise BoardError("partition CSV line %d: %s %r is not a number%s" % (line, what, text.strip(), known))


def parse_csv(text: str, source: str = "<csv>") -> list[Partition]:
    """Parse an ESP-IDF partition CSV (Name, Type, SubType, Offset, Size, Flags). Empty offsets
    are filled in as ESP-IDF does (after the previous partition, aligned to 64 KiB for app and
    4 KiB for data). Raises BoardError naming the line for anything it cannot read."""
    parts: list[Partition] = []
    last_end = TABLE_OFFSET + TABLE_SECTOR
    for no, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = [f.strip() for f in (line + ",,,,,").split(",")]
        name, ptype, subtype, offset, size, flags = fields[:6]
        if not name:
            raise BoardError("%s line %d: empty partition name" % (source, no))
        if not ptype:
            raise BoardError("%s line %d: partition %r has no type" % (source, no, name))
        t = _parse_int(ptype, "type", no, TYPES)
        if not subtype:
            if t == APP_TYPE:
                raise BoardError("%s line %d: app partition %r needs a subtype" % (source, no, name))
            st = SUBTYPES[DATA_TYPE]["undefined"]
        else:
            st = _parse_int(subtype, "subtype", no, SUBTYPES.get(t, {}))
        if not size:
            raise BoardError("%s line %d: partition %r has no size" % (source, no, name))
        sz = _parse_int(size, "size", no)
        if offset:
            off = _parse_int(offset, "offset", no)
        else:
            align = APP_ALIGN if t == APP_TYPE else DATA_ALIGN
            off = (last_end + align - 1) // align * align
        fl = 0
        for f in flags.split(":"):
            f = f.strip()
            if not f:
                continue
            if f not in FLAGS:
                raise BoardError("%s line %d: unknown flag %r (known: %s)" % (source, no, f, ", ".join(FLAGS)))
            fl |= FLAGS[f]
        parts.append(Partition(name, t, st, off, sz, fl, no))
        last_end = off + sz
    if not parts:
        raise BoardError("%s: no partitions" % source)
    return parts


def load_csv(path) -> list[Partition]:
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise BoardError("%s: no such partition table" % p)
    except UnicodeDecodeError:
        raise BoardError("%s: not a text (CSV) partition table" % p)
    return parse_csv(text, str(p))


def to_binary(parts: list[Partition]) -> bytes:
    """The partition table image ESP-IDF flashes at 0x8000: 32-byte entries, an MD5 entry, 0xFF."""
    out = b""
    for p in parts:
        name = p.name.encode()
        if len(name) > NAME_MAX:
            raise BoardError("partition name %r is longer than %d bytes" % (p.name, NAME_MAX))
        out += ENTRY.pack(MAGIC, p.type, p.subtype, p.offset, p.size, name, p.flags)
    out += MD5_MAGIC + hashlib.md5(out).digest()
    if len(out) >= TABLE_MAX:
        raise BoardError("%d partitions do not fit in the %d-byte table" % (len(parts), TABLE_MAX))
    return out + b"\xFF" * (TABLE_MAX - len(out))


def from_binary(data: bytes) -> list[Partition]:
    """Read a partition table image (e.g. from firmware.bin at 0x8000); checks magic and MD5."""
    parts: list[Partition] = []
    md5 = hashlib.md5()
    for o in range(0, min(len(data), TABLE_MAX), 32):
        e = data[o:o + 32]
        if len(e) < 32:
            break
        if e == b"\xFF" * 32:
            return parts
        if e[:2] == MD5_MAGIC[:2]:
            if e[16:] != md5.digest():
                raise BoardError("partition table MD5 mismatch (damaged table)")
            continue
        magic, t, st, off, size, name, flags = ENTRY.unpack(e)
        if magic != MAGIC:
            raise BoardError("no partition table here (entry %d has magic %s)" % (o // 32, magic.hex()))
        md5.update(e)
        parts.append(Partition(name.split(b"\0", 1)[0].decode(errors="replace"), t, st, off, size, flags))
    raise BoardError("partition table has no end marker")


def find_partition(parts: list[Partition], name: str) -> Partition:
    for p in parts:
        if p.name == name:
            return p
    raise BoardError("no %r partition in the table (partitions: %s)" % (name, ", ".join(p.name for p in parts)))


def largest_preset_bytes() -> tuple[str, int]:
    """(name, model file bytes) of the largest preset (presets.estimate_bytes)."""
    from . import presets

    sizes = {n: presets.estimate_bytes(n)["file_size"] for n in presets.PRESETS}
    name = max(sizes, key=sizes.get)
    return name, sizes[name]


def check_partitions(parts: list[Partition], flash_bytes: int, model_bytes: int | None = None,
                     require_model: bool = True) -> list[str]:
    """Problems with a partition table, as sentences (empty list: fine). Checks what ESP-IDF
    checks (unique names, alignment: app 64 KiB, data 4 KiB; app sizes in 4 KiB; nothing before
    the end of the table sector; no overlaps; inside the flash) and what tinygpt needs (nvs,
    phy_init, a factory app, a `model` data partition aligned to 64 KiB that holds model_bytes,
    default: the largest preset, and a `vfs` filesystem)."""
    problems = []
    names = [p.name for p in parts]
    for n in sorted(set(x for x in names if names.count(x) > 1)):
        problems.append("partition name %r is used %d times" % (n, names.count(n)))
    for p in parts:
        if len(p.name.encode()) > NAME_MAX:
            problems.append("partition %r: name longer than %d bytes" % (p.name, NAME_MAX))
        if p.size <= 0:
            problems.append("partition %r: size must be positive" % p.name)
        align = APP_ALIGN if p.type == APP_TYPE else DATA_ALIGN
        if p.offset % align:
            problems.append("partition %r: offset 0x%x is not aligned to 0x%x (%s partitions)"
                            % (p.name, p.offset, align, p.type_name()))
        if p.type == APP_TYPE and p.size % DATA_ALIGN:
            problems.append("partition %r: app size 0x%x is not a multiple of 0x%x" % (p.name, p.size, DATA_ALIGN))
        if p.offset < TABLE_OFFSET + TABLE_SECTOR:
            problems.append("partition %r at 0x%x overlaps the bootloader or the partition table (ends 0x%x)"
                            % (p.name, p.offset, TABLE_OFFSET + TABLE_SECTOR))
        if p.end > flash_bytes:
            problems.append("partition %r ends at 0x%x, past the end of the %d MiB flash (0x%x)"
                            % (p.name, p.end, flash_bytes // MiB, flash_bytes))
    ordered = sorted(parts, key=lambda p: p.offset)
    for a, b in zip(ordered, ordered[1:]):
        if b.offset < a.end:
            problems.append("partitions %r (0x%x-0x%x) and %r (0x%x-0x%x) overlap"
                            % (a.name, a.offset, a.end, b.name, b.offset, b.end))
    by = {p.name: p for p in parts}
    if "nvs" not in by:
        problems.append("no 'nvs' partition (ESP-IDF's Wi-Fi/PHY calibration storage)")
    if not any(p.type == APP_TYPE for p in parts):
        problems.append("no app partition for the firmware")
    if "vfs" not in by and "ffat" not in by:
        problems.append("no 'vfs' partition (MicroPython's filesystem)")
    if require_model:
        m = by.get("model")
        if m is None:
            problems.append("no 'model' partition")
        else:
            if m.type != DATA_TYPE:
                problems.append("partition 'model' must be of type data, not %s" % m.type_name())
            if m.offset % MODEL_ALIGN:
                problems.append("partition 'model' offset 0x%x is not aligned to 64 KiB (0x%x), the MMU page "
                                "esp_partition_mmap maps" % (m.offset, MODEL_ALIGN))
            if model_bytes is None:
                preset, model_bytes = largest_preset_bytes()
                what = "the largest preset (%s, %d bytes)" % (preset, model_bytes)
            else:
                what = "the model file (%d bytes)" % model_bytes
            if m.size < model_bytes:
                problems.append("partition 'model' (%d bytes) is smaller than %s" % (m.size, what))
    return problems


def check_board(board: Board | str = "N16R8") -> list[Partition]:
    """The board's partition table, checked; raises BoardError listing every problem."""
    b = get_board(board) if isinstance(board, str) else board
    parts = b.partition_table()
    problems = check_partitions(parts, b.flash_bytes, require_model=b.partitions is not None)
    if problems:
        raise BoardError("%s partition table: %s" % (b.name, "; ".join(problems)))
    return parts


def write_partition_bin(csv_path, out_path) -> bytes:
    """CSV -> binary table, written atomically (what ESP-IDF's build puts at 0x8000)."""
    from .modelfile import atomic_write_bytes

    data = to_binary(load_csv(csv_path))
    atomic_write_bytes(out_path, data)
    return data


# ---------------------------------------------------------------------------------------------
# Model files
# ---------------------------------------------------------------------------------------------

def check_regular_file(path, what: str = "model file") -> Path:
    """path, if it names a regular file (symlinks followed); else BoardError saying what it is
    (ui.check_regular_file)."""
    return ui_check_regular_file(path, what, BoardError)


def read_model_header(path) -> dict:
    """Hyperparameters, file size and tokenizer merge count of a model file (header, directory and
    the tokenizer section's header only; docs/model-format.md). Raises BoardError."""
    p = check_regular_file(path)
    try:
        with open(p, "rb") as f:
            head = f.read(128)
            if len(head) < 128 or head[:4] != b"TGPT":
                raise BoardError("%s: not a tinygpt model file (no TGPT header)" % p)
            (ver, _hs, file_size, _crc, _q, n_vocab, n_pos, n_embd, n_layer, n_head, n_inner,
             _act) = struct.unpack_from("<12I", head, 4)
            if ver not in (1, 2, 3):
                raise BoardError("%s: model format version %d, this tool reads versions 1 to 3" % (p, ver))
            # version 3: arch and n_kv_head at 88 (docs/model-format.md section 2)
            arch, n_kv_head = struct.unpack_from("<2I", head, 88) if ver == 3 else (0, 0)
            n_tensors, dir_off = struct.unpack_from("<2I", head, 76)
            f.seek(dir_off)
            directory = f.read(16 * n_tensors)
            if len(directory) < 16 * n_tensors:
                raise BoardError("%s: truncated model file (tensor directory)" % p)
            n_merges = None
            meta_bytes, has_index = 0, False
            for i in range(n_tensors):
                tid, _dt, off, nbytes = struct.unpack_from("<4I", directory, 16 * i)
                if tid == 7 and 0 < nbytes <= 1 << 20:  # the meta section (spec section 8)
                    f.seek(off)
                    meta_bytes = nbytes
                    has_index = b"\nretrieval: " in b"\n" + f.read(nbytes)
                if tid == 6:
                    f.seek(off)
                    th = f.read(32)
                    if len(th) == 32 and th[:4] == b"TTOK":
                        tok_version = struct.unpack_from("<I", th, 4)[0]
                        if tok_version == 2:  # llama2.c's (spec 6.2): no merges; py/sptok.py indexes
                            n_merges, n_normal = 0, n_vocab - 256 - struct.unpack_from("<I", th, 20)[0]
                        else:
                            n_merges, n_normal = struct.unpack_from("<I", th, 12)[0], None
            actual = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise BoardError("%s: no such file" % p)
    except IsADirectoryError:
        raise BoardError("%s: is a directory, expected a model file" % p)
    if actual < file_size:
        raise BoardError("%s: truncated model file (%d of %d bytes)" % (p, actual, file_size))
    if n_merges is None:
        raise BoardError("%s: model file has no tokenizer section" % p)
    return dict(n_vocab=n_vocab, n_positions=n_pos, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                n_inner=n_inner, file_size=file_size, n_merges=n_merges, n_normal=n_normal,
                arch="llama" if arch == 1 else "gpt2", n_kv_head=n_kv_head if arch == 1 else n_head,
                meta_bytes=meta_bytes, has_index=has_index)


# ---------------------------------------------------------------------------------------------
# Memory budget
# ---------------------------------------------------------------------------------------------

FIRMWARE_BASE_BYTES = 1_750_000    # MicroPython's generic ESP32-S3 app image (1.24-1.26), estimate
TINYGPT_FIRMWARE_BYTES = 48_000    # engine + binding + frozen chat/bpe, estimate (see module doc)
FIRMWARE_ESTIMATE = FIRMWARE_BASE_BYTES + TINYGPT_FIRMWARE_BYTES
POINTER_BYTES = 4                  # ESP32-S3 (Xtensa LX7, 32-bit)
DEFAULT_MAX_BATCH = 32             # tinygpt.c tg_load: max_batch 0 -> min(n_ctx, 32)
DEFAULT_MAX_DRAFT = 8              # tinygpt.c tg_load: max_draft 0 -> min(max_batch, 8)
MODEL_STRUCT_BYTES = 512           # struct tg_model on a 32-bit target (~300 bytes), rounded up
N_ALLOCATIONS = 18                 # model struct + 16 alloc_state blocks + the binding's id buffer
HEAP_BLOCK_OVERHEAD = 16           # heap_caps header + 16-byte alignment, per allocation
TOKENIZER_BYTES_PER_MERGE = 12     # py/bpe.py on a 32-bit port (see module doc)
TOKENIZER_FIXED_BYTES = 4 * KiB
SPTOK_FIXED_BYTES = 8 * KiB  # py/sptok.py beyond its index (4.5 KB measured on the 64-bit unix port)
PYTHON_WORKING_BYTES = 64 * KiB
# The meta section in the GC heap (py/chat.py's _load_meta): its copy and key/value dict while it
# is read, and with a word index (py/retrieve.py) the index too. Measured on the emulated board
# (boards/TINYGPT_QEMU, 32-bit, MicroPython 1.29): the free heap `chat.load` plus one `chat.ask`
# needed beyond the same model without a meta section (208,984 bytes), found by bisection with a
# ballast allocation: 888,867 bytes for the shipped corpus's 181,594-byte index, 350,488 for
# plants' 73,648, 278,222 for ledgerly's 65,561 (4.89x, 4.76x, 4.24x). The budget takes 4.9x.
META_HEAP_PER_BYTE = 2
INDEX_HEAP_PER_BYTE = 4.9
PSRAM_SYSTEM_RESERVE = 256 * KiB
MMU_PAGES = 512
MMU_PAGE = 64 * KiB
FS_OVERHEAD_BLOCKS = 8             # littlefs metadata blocks a file needs besides its data
FS_BLOCK = 4 * KiB


def engine_kv_bytes(L, C, E, H, KV=None) -> int:
    """tinygpt.c alloc_state: K and V int8 [L][C][KV*D] plus f32 scales [L][C][KV] each (KV, the
    key/value heads: n_head for GPT-2)."""
    KV = H if KV is None else KV
    KVD = KV * (E // H)
    return 2 * L * C * KVD + 2 * 4 * L * C * KV


def engine_scratch_bytes(V, E, I, H, C, B, KV=None, llama=False) -> int:
    """tinygpt.c alloc_state, the blocks counted in scratch_bytes (x ... order)."""
    D = E // H
    KVD = (H if KV is None else KV) * D
    wide = max(E + 2 * KVD, 2 * I if llama else I)  # q, k, v; fc (Llama: gate and up)
    qwide = max(E, I)
    return (4 * B * E          # residual stream
            + 4 * B * wide     # linear outputs
            + 4 * B * E        # attention outputs
            + B * qwide + 16   # quantized activations
            + 4 * B            # activation scales
            + 4 * C            # attention scores
            + D + 16           # query
            + 3 * 4 * V        # logits, sampling probabilities, sampling order
            + 4 * min(B, DEFAULT_MAX_DRAFT) * V)  # draft logits: every position of a verify


def engine_other_bytes(L, C) -> int:
    """The engine's other PSRAM on a 32-bit target: layer table (16 pointers per layer), token
    history (4 per position), the binding's id buffer (4 per position), the model struct, and
    per-allocation heap overhead."""
    return (16 * POINTER_BYTES * L + 4 * C + 4 * C + MODEL_STRUCT_BYTES
            + N_ALLOCATIONS * HEAP_BLOCK_OVERHEAD)


def meta_heap_bytes(meta_bytes, has_index) -> int:
    """The GC heap py/chat.py needs for a model's meta section of meta_bytes (see
    INDEX_HEAP_PER_BYTE): with a word index, what the index takes; without, the section's copy
    and its key/value dict while it is read (the abstain answer and known_words stay)."""
    return int(math.ceil(meta_bytes * (INDEX_HEAP_PER_BYTE if has_index else META_HEAP_PER_BYTE)))


def tokenizer_heap_bytes(n_merges, n_normal=None) -> int:
    """py/bpe.py's heap for a byte-level BPE of n_merges merges; with n_normal (a llama2.c
    tokenizer, section version 2), py/sptok.py's: its hash index of the normal tokens (2 bytes
    a slot, slots the power of two >= 2 * n_normal, at least 256) plus the fixed part (measured:
    136 KB for Llama 2's 31,741 normal tokens, 128 KB of it the index)."""
    if n_normal is not None:
        slots = 256
        while slots < 2 * n_normal:
            slots <<= 1
        return 2 * slots + SPTOK_FIXED_BYTES
    return TOKENIZER_BYTES_PER_MERGE * n_merges + TOKENIZER_FIXED_BYTES


def _model_facts(model_or_preset):
    """(label, hparams with file_size and n_merges, estimated?) for a preset name or a file."""
    from . import presets

    if isinstance(model_or_preset, dict) or (isinstance(model_or_preset, str) and model_or_preset in presets.PRESETS):
        est = presets.estimate_bytes(model_or_preset)
        hp = dict(est["hparams"])
        hp["file_size"] = est["file_size"]
        hp["n_merges"] = max(0, hp["n_vocab"] - 256 - presets.N_SPECIAL_DEFAULT)
        what = "preset" if isinstance(model_or_preset, str) else "hyperparameters"
        name = model_or_preset if isinstance(model_or_preset, str) else "custom"
        return "%s (%s; tokenizer size estimated)" % (name, what), hp, True
    p = Path(model_or_preset)
    if not p.exists():
        raise BoardError("%s: neither a preset (%s) nor an existing model file"
                         % (model_or_preset, ", ".join(presets.PRESETS)))
    return str(p), read_model_header(p), False


def budget(model_or_preset, board: str = "N16R8", n_ctx: int | None = None,
           placement: str | None = None) -> dict:
    """Where every byte of a model goes on a board, and whether it fits.

    model_or_preset: a preset name, a model file path, or a dict of hyperparameters (as
    presets.estimate_bytes takes; the tokenizer size is then estimated).

    placement: 'partition' (the model flashed into the `model` partition and memory-mapped; the
    default for boards that have one) or 'file' (a file on the filesystem, read into PSRAM).
    Returns a dict (see `tinygpt budget --json`): 'flash' and 'psram' sections with every item,
    'fits', 'problems' (what does not fit, as sentences) and 'max_n_ctx' (the largest context that
    fits, 0 if none does)."""
    b = get_board(board)
    parts = b.partition_table()
    by = {p.name: p for p in parts}
    if placement is None:
        placement = "partition" if "model" in by else "file"
    if placement not in ("partition", "file"):
        raise BoardError("placement must be 'partition' or 'file', not %r" % placement)
    label, hp, estimated = _model_facts(model_or_preset)
    V, P, E, L, H, I = (hp[k] for k in ("n_vocab", "n_positions", "n_embd", "n_layer", "n_head", "n_inner"))
    KV = hp.get("n_kv_head") or H
    F = hp["file_size"]
    C = P if n_ctx is None else int(n_ctx)
    if not 1 <= C <= P:
        raise BoardError("n_ctx %d is outside 1..%d (the model's n_positions)" % (C, P))

    def psram_items(c):
        B = min(DEFAULT_MAX_BATCH, c)
        items = {
            "kv_cache": engine_kv_bytes(L, c, E, H, KV),
            "scratch": engine_scratch_bytes(V, E, I, H, c, B, KV, hp.get("arch") == "llama"),
            "engine_other": engine_other_bytes(L, c),
            "tokenizer_heap": tokenizer_heap_bytes(hp["n_merges"], hp.get("n_normal")),
            "meta_heap": meta_heap_bytes(hp.get("meta_bytes", 0), hp.get("has_index", False)),
            "python_working": PYTHON_WORKING_BYTES,
            "system_reserve": PSRAM_SYSTEM_RESERVE,
            "model_file": F if placement == "file" else 0,
        }
        return items, sum(items.values())

    items, used = psram_items(C)
    problems = []
    # -- flash
    app = next((p for p in parts if p.type == APP_TYPE), None)
    vfs = by.get("vfs") or by.get("ffat")
    flash = {
        "size": b.flash_bytes,
        "firmware_estimate": FIRMWARE_ESTIMATE,
        "app_partition": app.size if app else 0,
        "model_file": F,
        "model_partition": by["model"].size if "model" in by else 0,
        "vfs_partition": vfs.size if vfs else 0,
    }
    if FIRMWARE_ESTIMATE > flash["app_partition"]:
        problems.append("the firmware (~%s) does not fit the %s app partition" % (_h(FIRMWARE_ESTIMATE), _h(flash["app_partition"])))
    if placement == "partition":
        if "model" not in by:
            problems.append("board %s has no 'model' partition: use placement 'file'" % b.name)
        elif F > by["model"].size:
            problems.append("the model file (%s) does not fit the 'model' partition (%s)" % (_h(F), _h(by["model"].size)))
        flash["model_where"] = "model partition (memory-mapped)"
    else:
        need = -(-F // FS_BLOCK) * FS_BLOCK + FS_OVERHEAD_BLOCKS * FS_BLOCK
        flash["model_fs_bytes"] = need
        flash["model_where"] = "filesystem file (read into PSRAM)"
        if not vfs or need > vfs.size:
            problems.append("the model file (%s) does not fit the %s filesystem" % (_h(F), _h(vfs.size if vfs else 0)))
    # -- PSRAM
    psram = dict(items, size=b.psram_bytes, total=used, free=b.psram_bytes - used)
    if used > b.psram_bytes:
        problems.append("PSRAM: needs %s of %s at n_ctx %d (%s)" % (
            _h(used), _h(b.psram_bytes), C, ", ".join("%s %s" % (k, _h(v)) for k, v in items.items() if v)))
    # -- MMU pages
    pages = {"firmware": -(-FIRMWARE_ESTIMATE // MMU_PAGE), "psram": b.psram_bytes // MMU_PAGE,
             "model_mmap": -(-F // MMU_PAGE) if placement == "partition" else 0}
    mmu = dict(pages, total=sum(pages.values()), limit=MMU_PAGES)
    if mmu["total"] > MMU_PAGES:
        problems.append("MMU: %d 64-KiB pages needed, the ESP32-S3 has %d" % (mmu["total"], MMU_PAGES))
    # -- the largest context that fits (everything but the PSRAM is independent of n_ctx)
    max_ctx = 0
    for c in range(P, 0, -1):
        if psram_items(c)[1] <= b.psram_bytes:
            max_ctx = c
            break
    other_problems = [p for p in problems if not p.startswith("PSRAM")]
    if other_problems:
        max_ctx = 0
    return {
        "model": label,
        "tokenizer_estimated": estimated,
        "board": b.name,
        "module": b.module,
        "placement": placement,
        "hparams": {k: hp[k] for k in ("n_vocab", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "n_merges")},
        "n_ctx": C,
        "max_batch": min(DEFAULT_MAX_BATCH, C),
        "flash": flash,
        "psram": psram,
        "mmu_pages": mmu,
        "fits": not problems,
        "problems": problems,
        "max_n_ctx": max_ctx,
    }


def format_budget(r: dict) -> str:
    b = BOARDS[r["board"]]
    fl, ps, mmu = r["flash"], r["psram"], r["mmu_pages"]
    lines = ["%s on %s (%s: %d MiB flash, %d MiB %s PSRAM), n_ctx %d, model in the %s"
             % (r["model"], r["board"], r["module"], b.flash_bytes // MiB, b.psram_bytes // MiB, b.psram_mode,
                r["n_ctx"], fl["model_where"])]
    lines.append("flash")
    lines.append("  firmware (estimate)  %12s   app partition %s" % (_h(fl["firmware_estimate"]), _h(fl["app_partition"])))
    if r["placement"] == "partition":
        lines.append("  model file           %12s   'model' partition %s (weights read in place)"
                     % (_h(fl["model_file"]), _h(fl["model_partition"])))
    else:
        lines.append("  model file           %12s   on the %s filesystem ('vfs')" % (_h(fl["model_file"]), _h(fl["vfs_partition"])))
    lines.append("PSRAM")
    names = [("model_file", "model file (loaded)"), ("kv_cache", "KV cache"), ("scratch", "activations/scratch"),
             ("engine_other", "engine tables, ids"), ("tokenizer_heap", "tokenizer (heap)"),
             ("meta_heap", "answer index (heap)"),
             ("python_working", "Python working set"), ("system_reserve", "ESP-IDF reserve")]
    for k, text in names:
        if ps[k]:
            lines.append("  %-20s %12s" % (text, _h(ps[k])))
    lines.append("  %-20s %12s   of %s, %s %s" % ("total", _h(ps["total"]), _h(ps["size"]),
                                                  _h(abs(ps["free"])), "free" if ps["free"] >= 0 else "short"))
    lines.append("MMU pages: %d of %d" % (mmu["total"], mmu["limit"]))
    if r["fits"]:
        lines.append("fits: yes; largest n_ctx that fits: %d (n_positions %d)" % (r["max_n_ctx"], r["hparams"]["n_positions"]))
    else:
        lines.append("fits: NO")
        for p in r["problems"]:
            lines.append("  - " + p)
        if r["max_n_ctx"]:
            lines.append("largest n_ctx that fits: %d" % r["max_n_ctx"])
        else:
            lines.append("no n_ctx fits" + (": flash the model into the 'model' partition (placement 'partition')"
                                             if r["placement"] == "file" and "model" in {p.name for p in b.partition_table()}
                                             else ""))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the command

def add_arguments(p) -> None:
    """`tinygpt budget MODEL_or_PRESET`'s options."""
    p.add_argument("model", metavar="MODEL_or_PRESET", help="a model file or a preset name")
    p.add_argument("--board", default="N16R8", help="board: %s (default N16R8)" % ", ".join(BOARDS))
    p.add_argument("--n-ctx", type=int, default=None, help="context length (default: the model's n_positions)")
    p.add_argument("--placement", choices=("partition", "file"), default=None,
                   help="model in the 'model' flash partition (memory-mapped; default when the board has one) "
                        "or a file on the filesystem (read into PSRAM)")
    p.add_argument("--json", action="store_true", help="print JSON")


def run_cli(args) -> None:
    """`tinygpt budget`: the table or JSON; exit status 1 when the model does not fit."""
    import sys

    r = budget(args.model, board=args.board, n_ctx=args.n_ctx, placement=args.placement)
    if args.json:
        import json
        print(json.dumps(r, indent=2))
    else:
        print(format_budget(r))
    if not r["fits"]:
        sys.exit(1)
