"""tinygpt.board (issue 5): the partition table (checked against ESP-IDF's gen_esp32part.py), the
memory budget of every preset, and the serial port check of the commands that talk to a board.

The board tools' tests, one file per module of host_tools/tinygpt/: tests/test_board.py (board),
tests/test_firmware.py (firmware), tests/test_flash.py (flash), tests/test_deploy.py (deploy),
tests/test_serial_chat.py (serial_chat); what they share is in tests/board_helpers.py.
"""
import hashlib
import json

import pytest

from board_helpers import CSV, make_model
from tinygpt import board, cli


# ---------------------------------------------------------------------------------------------
# Partition table
# ---------------------------------------------------------------------------------------------

def test_partition_table_layout():
    parts = board.load_csv(CSV)
    got = [(p.name, p.type_name(), p.subtype_name(), p.offset, p.size) for p in parts]
    assert got == [
        ("nvs", "data", "nvs", 0x9000, 0x6000),
        ("phy_init", "data", "phy", 0xF000, 0x1000),
        ("factory", "app", "factory", 0x10000, 0x2F0000),      # 2.94 MiB for a ~1.8 MB app
        ("model", "data", "undefined", 0x300000, 0x840000),    # 8.25 MiB
        ("vfs", "data", "fat", 0xB40000, 0x4C0000),            # 4.75 MiB, to the end of flash
    ]
    assert parts[-1].end == 16 * 1024 * 1024
    assert board.check_partitions(parts, 16 * 1024 * 1024) == []
    assert board.check_board("N16R8") == parts
    # the model partition holds the largest preset with headroom, and starts on an MMU page
    name, largest = board.largest_preset_bytes()
    assert (name, largest) == ("d192x20", 8_172_004)
    model = board.find_partition(parts, "model")
    assert model.offset % 0x10000 == 0
    assert model.size == 132 * 65536 and model.size - largest == 478_748
    # the firmware estimate leaves more than 1 MiB in the app partition
    assert parts[2].size - board.FIRMWARE_ESTIMATE > 1024 * 1024


# ESP-IDF's gen_esp32part.py (v1.3, from ESP-IDF 5.x; run once by hand, not shipped) turned these
# CSVs into these 3072-byte images (`gen_esp32part.py --flash-size 16MB in.csv out.bin`):
GEN_ESP32PART_SHA256 = {
    "tinygpt": "c2df1a866e1406433b0b2aca8f4cfe81b34324b15ef0c37cffeef024d3afa775",
    "defaults": "2e20959a5fb3533fdd2ef10027d5886e93ec00f8acdbbb7ff43b900f5f49893f",
}


# Empty offsets, K/M sizes, subtype names and numbers, a flag. gen_esp32part placed these at
# nvs 0x9000, otadata 0xf000, phy_init 0x11000, ota_0 0x20000, ota_1 0x1a0000, model 0x320000,
# store 0x420000 (encrypted), vfs 0x460000.
DEFAULTS_CSV = """\
# exercise defaults: empty offsets, K/M sizes, names for subtypes, a numeric subtype, a flag
nvs,      data, nvs,       ,        24K,
otadata,  data, ota,       ,        0x2000,
phy_init, data, phy,       ,        4K,
ota_0,    app,  ota_0,     ,        1536K,
ota_1,    app,  ota_1,     ,        1536K,
model,    data, undefined, ,        1M,
store,    data, 0x40,      ,        256K, encrypted
vfs,      data, fat,       ,        512K,
"""


def test_partition_binary_matches_esp_idf(tmp_path):
    ours = board.to_binary(board.load_csv(CSV))
    assert len(ours) == 0xC00
    assert hashlib.sha256(ours).hexdigest() == GEN_ESP32PART_SHA256["tinygpt"]
    parts = board.parse_csv(DEFAULTS_CSV)
    assert [(p.name, p.offset) for p in parts] == [
        ("nvs", 0x9000), ("otadata", 0xF000), ("phy_init", 0x11000), ("ota_0", 0x20000), ("ota_1", 0x1A0000),
        ("model", 0x320000), ("store", 0x420000), ("vfs", 0x460000)]
    assert hashlib.sha256(board.to_binary(parts)).hexdigest() == GEN_ESP32PART_SHA256["defaults"]
    # binary -> entries round trip, and the atomic writer
    out = tmp_path / "partition-table.bin"
    assert board.write_partition_bin(CSV, out) == ours == out.read_bytes()
    back = board.from_binary(ours)
    assert [(p.name, p.type, p.subtype, p.offset, p.size) for p in back] == \
        [(p.name, p.type, p.subtype, p.offset, p.size) for p in board.load_csv(CSV)]
    bad = bytearray(ours)
    bad[40] ^= 1
    with pytest.raises(board.BoardError, match="MD5"):
        board.from_binary(bytes(bad))


@pytest.mark.parametrize("csv, message", [
    ("nvs,data,nvs,0x9000,0x6000,\nfactory,app,factory,0x18000,0x100000,\nmodel,data,undefined,0x200000,0x840000,\n"
     "vfs,data,fat,0xA40000,0x10000,", "offset 0x18000 is not aligned to 0x10000"),
    ("nvs,data,nvs,0x9800,0x6000,\nfactory,app,factory,0x10000,0x100000,\nmodel,data,undefined,0x200000,0x840000,\n"
     "vfs,data,fat,0xA40000,0x10000,", "offset 0x9800 is not aligned to 0x1000"),
    ("nvs,data,nvs,0x9000,0x6000,\nfactory,app,factory,0x10000,0x300000,\nmodel,data,undefined,0x300000,0x840000,\n"
     "vfs,data,fat,0xB40000,0x4C0000,", "overlap"),
    ("nvs,data,nvs,0x9000,0x6000,\nfactory,app,factory,0x10000,0x2F0000,\nmodel,data,undefined,0x300000,0x840000,\n"
     "vfs,data,fat,0xB40000,0x500000,", "past the end of the 16 MiB flash"),
    ("nvs,data,nvs,0x9000,0x6000,\nfactory,app,factory,0x10000,0x2F0000,\nmodel,data,undefined,0x300000,0x7C0000,\n"
     "vfs,data,fat,0xAC0000,0x540000,", "smaller than the largest preset (d192x20, 8172004 bytes)"),
    ("nvs,data,nvs,0x9000,0x6000,\nfactory,app,factory,0x10000,0x2F0000,\nmodel,data,undefined,0x301000,0x840000,\n"
     "vfs,data,fat,0xB41000,0x4BF000,", "not aligned to 64 KiB"),
    ("nvs,data,nvs,0x9000,0x6000,\nfactory,app,factory,0x10000,0x2F0000,\nvfs,data,fat,0x300000,0xD00000,",
     "no 'model' partition"),
    ("nvs,data,nvs,0x9000,0x6000,\nnvs,data,nvs,0xF000,0x1000,\nfactory,app,factory,0x10000,0x2F0000,\n"
     "model,data,undefined,0x300000,0x840000,\nvfs,data,fat,0xB40000,0x4C0000,", "'nvs' is used 2 times"),
    ("nvs,data,nvs,0x7000,0x6000,\nfactory,app,factory,0x10000,0x2F0000,\nmodel,data,undefined,0x300000,0x840000,\n"
     "vfs,data,fat,0xB40000,0x4C0000,", "overlaps the bootloader or the partition table"),
])
def test_partition_checks_catch_mistakes(csv, message):
    problems = board.check_partitions(board.parse_csv(csv), 16 * 1024 * 1024)
    assert any(message in p for p in problems), problems


def test_partition_csv_errors_name_the_line():
    with pytest.raises(board.BoardError, match="line 2: size 'lots' is not a number"):
        board.parse_csv("nvs,data,nvs,0x9000,0x6000,\nx,data,nvs,0x10000,lots,")
    with pytest.raises(board.BoardError, match="line 1: app partition 'a' needs a subtype"):
        board.parse_csv("a,app,,0x10000,0x1000")
    with pytest.raises(board.BoardError, match="unknown flag 'shiny'"):
        board.parse_csv("a,data,nvs,0x9000,0x1000,shiny")
    with pytest.raises(board.BoardError, match="no such partition table"):
        board.load_csv("/nonexistent/p.csv")


def test_stock_boards_get_micropythons_automatic_vfs():
    # ports/esp32/main.c: with no "vfs" partition, one spans from the last partition to the end
    for name, flash in (("N8R8", 8), ("N8R2", 8)):
        parts = board.check_board(name)
        vfs = board.find_partition(parts, "vfs")
        assert (vfs.offset, vfs.end) == (0x200000, flash * 1024 * 1024)


# ---------------------------------------------------------------------------------------------
# Memory budget: every preset, by hand
# ---------------------------------------------------------------------------------------------
# On the ESP32 (32-bit), C = n_ctx = n_positions, B = min(32, C), D = E/H:
#   kv      = 2*L*C*E + 8*L*C*H                                           (tinygpt.c alloc_state)
#   scratch = 4BE + 4B*max(3E,I) + 4BE + (B*max(E,I) + 16) + 4B + 4C + (D + 16) + 12V
#   other   = 64L (layer table) + 4C (tokens) + 4C (binding ids) + 512 (struct) + 18*16 (heap)
#   tok     = 12*M + 4096, M = merges = V - 256 - 4 specials
#   total   = kv + scratch + other + tok + 65536 (Python working set) + 262144 (reserve)
#   MMU     = ceil(1_798_000 / 64K) = 28 firmware + 128 PSRAM + ceil(file / 64K) model pages
BUDGETS = {
    # every scratch below includes the draft logits, 4 * max_draft (8) * V: 131,072 (V 4096), 16,384 (tiny)
    # hw1: V 4096, E 128, I 768, L 22, H 4, C 128, B 32, D 32, file 6,758,884
    #   kv 720,896 + 90,112; scratch 16,384 + 98,304 + 16,384 + 24,592 + 128 + 512 + 48 + 49,152;
    #   other 1,408 + 512 + 512 + 512 + 288; tok 12*3836 + 4096; model pages ceil(103.13) = 104
    "hw1": dict(file=6_758_884, kv=811_008, scratch=336_576, other=3_232, tok=50_128, total=1_528_624, mmu=260),
    # d192x12: E 192, I 768, L 12, H 6, file 6,502,884
    #   kv 589,824 + 73,728; scratch 24,576 + 98,304 + 24,576 + 24,592 + 128 + 512 + 48 + 49,152;
    #   other 768 + 1,824; pages ceil(99.23) = 100
    "d192x12": dict(file=6_502_884, kv=663_552, scratch=352_960, other=2_592, tok=50_128, total=1_396_912, mmu=256),
    # d192x20: E 192, I 512, L 20, H 6, file 8,172,004
    #   kv 983,040 + 122,880; scratch 24,576 + 4*32*576 (73,728) + 24,576 + 32*512+16 (16,400)
    #   + 128 + 512 + 48 + 49,152; other 1,280 + 1,824; pages ceil(124.69) = 125
    "d192x20": dict(file=8_172_004, kv=1_105_920, scratch=320_192, other=3_104, tok=50_128, total=1_807_024, mmu=281),
    # d256x8: E 256, I 768, L 8, H 8, file 6,692,836
    #   kv 524,288 + 65,536; scratch 32,768 + 98,304 + 32,768 + 24,592 + 128 + 512 + 48 + 49,152;
    #   other 512 + 1,824; pages ceil(102.13) = 103
    "d256x8": dict(file=6_692_836, kv=589_824, scratch=369_344, other=2_336, tok=50_128, total=1_339_312, mmu=259),
    # tiny: V 512, E 64, I 256, L 2, H 4, C 64, B 32, D 16, file 168,932, M 252
    #   kv 16,384 + 4,096; scratch 8,192 + 32,768 + 8,192 + 8,208 + 128 + 256 + 32 + 6,144;
    #   other 128 + 256 + 256 + 512 + 288; tok 3,024 + 4,096; pages ceil(2.58) = 3
    "tiny": dict(file=168_932, kv=20_480, scratch=80_304, other=1_440, tok=7_120, total=437_024, mmu=159),
}


@pytest.mark.parametrize("preset", sorted(BUDGETS))
def test_budget_per_preset(preset):
    want = BUDGETS[preset]
    r = board.budget(preset)  # N16R8, model in the partition, n_ctx = n_positions
    assert r["placement"] == "partition"
    assert r["flash"]["model_file"] == want["file"]
    assert r["flash"]["model_partition"] == 8_650_752 and r["flash"]["app_partition"] == 3_080_192
    ps = r["psram"]
    assert (ps["kv_cache"], ps["scratch"], ps["engine_other"], ps["tokenizer_heap"]) == \
        (want["kv"], want["scratch"], want["other"], want["tok"])
    assert ps["model_file"] == 0  # mapped from flash, not in PSRAM
    assert ps["total"] == want["total"] == sum(v for k, v in ps.items() if k not in ("size", "total", "free"))
    assert ps["free"] == 8 * 1024 * 1024 - want["total"]
    assert r["mmu_pages"]["total"] == want["mmu"]
    assert r["fits"] and r["problems"] == []
    assert r["max_n_ctx"] == r["hparams"]["n_positions"]


def test_budget_says_what_does_not_fit():
    # hw1 as a file on N16R8: PSRAM 1,528,624 + 6,758,884 = 8,287,508 <= 8,388,608 fits, but the
    # filesystem needs ceil(6,758,884/4096) = 1651 blocks + 8 = 6,795,264 bytes > 4,980,736
    r = board.budget("hw1", placement="file")
    assert r["psram"]["total"] == 8_287_508 and r["psram"]["free"] == 101_100
    assert r["flash"]["model_fs_bytes"] == 6_795_264
    assert not r["fits"] and r["max_n_ctx"] == 0
    assert r["problems"] == ["the model file (6.45 MiB) does not fit the 4.75 MiB filesystem"]
    # N8R2: 2 MiB of PSRAM cannot hold a 6.45 MiB model
    r = board.budget("hw1", board="N8R2")
    assert r["placement"] == "file" and not r["fits"]
    assert any(p.startswith("PSRAM: needs 7.90 MiB of 2.00 MiB") for p in r["problems"])
    # a longer context: hw1 with n_positions 2048 (file 7.38 MiB still fits the partition).
    # total(C) = 6,336C (kv) + 336,064 + 4C (scratch) + 2,208 + 8C (other) + 50,128 + 65,536
    #          + 262,144 = 6,348C + 716,080 <= 8,388,608  ->  C <= 1208.6
    r = board.budget(dict(vocab_size=4096, n_embd=128, n_head=4, n_layer=22, n_inner=768, n_positions=2048))
    assert not r["fits"] and r["max_n_ctx"] == 1208
    assert r["psram"]["total"] == 6348 * 2048 + 716_080
    assert board.budget(dict(vocab_size=4096, n_embd=128, n_head=4, n_layer=22, n_inner=768, n_positions=2048),
                        n_ctx=1208)["fits"]
    assert not board.budget(dict(vocab_size=4096, n_embd=128, n_head=4, n_layer=22, n_inner=768,
                                 n_positions=2048), n_ctx=1209)["fits"]


def test_budget_of_a_file_matches_the_engine(tmp_path):
    """kv and scratch are the engine's own numbers (tg_info), for a real file."""
    from tinygpt.engine import Model

    path = make_model(tmp_path / "m.bin", seed=1)
    for n_ctx in (None, 40, 7):
        r = board.budget(str(path), n_ctx=n_ctx)
        with Model(path, n_ctx=n_ctx) as m:
            info = m.info()
        assert r["psram"]["kv_cache"] == info["kv_bytes"]
        assert r["psram"]["scratch"] == info["scratch_bytes"]
        assert r["flash"]["model_file"] == info["file_bytes"] == path.stat().st_size
        assert r["n_ctx"] == info["n_ctx"] and r["max_batch"] == info["max_batch"]
    assert r["hparams"]["n_merges"] == 300 - 256  # the synthetic tokenizer: no specials



def test_budget_counts_the_answer_index_in_the_heap(tmp_path):
    """A model file with a word index (tinygpt index) needs the index's heap on the board
    (board.INDEX_HEAP_PER_BYTE, measured on the emulated board); one without needs none."""
    from conftest import REPO
    from tinygpt.engine import Model

    plain = make_model(tmp_path / "m.bin", seed=1)
    indexed = tmp_path / "indexed.bin"
    assert cli.main(["index", str(plain), "--corpus", str(REPO / "data" / "testcorpora" / "plants" / "corpus.txt"),
                     "-o", str(indexed)]) == 0
    with Model(indexed) as m:
        meta_bytes = m.info()["meta_bytes"]
    a, b = board.budget(str(plain)), board.budget(str(indexed))
    assert a["psram"]["meta_heap"] == 0 and meta_bytes > 10_000
    assert b["psram"]["meta_heap"] == board.meta_heap_bytes(meta_bytes, True) > 4 * meta_bytes
    assert b["psram"]["total"] - a["psram"]["total"] == b["psram"]["meta_heap"]
    assert "answer index (heap)" in board.format_budget(b) and "answer index" not in board.format_budget(a)

def test_budget_cli(capsys, tmp_path):
    assert cli.main(["budget", "hw1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == board.budget("hw1")
    assert cli.main(["budget", "d192x20"]) == 0
    out = capsys.readouterr().out
    assert "fits: yes; largest n_ctx that fits: 128" in out and "MMU pages: 281 of 512" in out
    with pytest.raises(SystemExit) as e:
        cli.main(["budget", "hw1", "--board", "N8R2"])
    assert e.value.code == 1
    assert "fits: NO" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(["budget", "nonesuch"])
    assert e.value.code == 2
    assert "neither a preset" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["budget", "hw1", "--n-ctx", "999"])
    assert "n_ctx 999 is outside 1..128" in capsys.readouterr().err
    (tmp_path / "junk.bin").write_bytes(b"not a model" * 20)
    with pytest.raises(SystemExit):
        cli.main(["budget", str(tmp_path / "junk.bin")])
    assert "not a tinygpt model file" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The serial port of deploy, chat and ask
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [["deploy"], ["chat"], ["ask", "Hello?"]])
def test_a_port_that_does_not_exist_is_named(tmp_path, capsys, command):
    port = str(tmp_path / "ttyACM9")
    with pytest.raises(SystemExit) as e:
        cli.main(command + ["--port", port])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("tinygpt: error: %s does not exist: is the board plugged in? (serial ports here: " % port)
    assert "may be in use" not in err
