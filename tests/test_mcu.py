"""The engine on microcontroller toolchains (issue 6).

* Xtensa: tinygpt.c compiles warning-free with xtensa-lx106-elf-gcc (the ESP8266 core; the
  ESP32-S3's LX7 compiler is not packaged by Debian) and its code size is reported.
* Cortex-M4F, bare metal, on QEMU's mps2-an386 board: tests/mcu/ has the startup (FPU on,
  SCB->CCR.UNALIGN_TRP set, so any misaligned access faults), a static-arena port layer, and
  main.c, which loads a linked-in model file (CRC checked), prefills, steps greedily, samples
  with top-k/top-p, and prints the CRC32 of every logits vector and every token id. They must
  equal the host engine's exactly: the format spec fixes every float32 operation.
  QEMU runs with `-icount shift=0` (one instruction per ns of virtual time) and SysTick on the
  25 MHz processor clock, so SysTick ticks count executed instructions (main.c calibrates: 40
  instructions per tick); the instructions per token are printed (`pytest -s`). The build and
  run logic is tinygpt.mcu's, shared with `tinygpt bench --mcu`. Both dot-product kernels a
  Cortex-M4F can get are run: the default (Armv7E-M DSP) and the portable one (TG_DOT_KERNEL=2).

The tools come from Debian packages: `bash scripts/install-ci-deps` (as root) installs them.
Where that script could have (a Debian machine), a missing tool fails the test; elsewhere the
test is skipped.
"""
import ctypes
import re
import shutil
import struct
import subprocess

import numpy as np
import pytest

from conftest import REPO

from tinygpt import bench, engine, mcu, modelfile
from tinygpt.presets import PRESETS

ENGINE = REPO / "usercmodule" / "tinygpt"
INSTALL_HINT = "run `sudo bash scripts/install-ci-deps` (or: apt-get install -y --no-install-recommends %s)"
XTENSA_TEXT_LIMIT = 64 * 1024


def require(tool, package):
    """Path of `tool`; a missing tool fails the test where install-ci-deps could install it."""
    path = shutil.which(tool)
    if path:
        return path
    msg = "%s not found: %s" % (tool, INSTALL_HINT % package)
    if shutil.which("apt-get") and shutil.which("dpkg"):
        pytest.fail(msg)
    pytest.skip(msg + " (not a Debian machine)")


def require_mcu_tools():
    for tool, packages in mcu.PACKAGES.items():
        require(tool, packages)


def run(cmd, hint=None, **kw):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    msg = "command failed (%d): %s\n%s%s" % (r.returncode, " ".join(map(str, cmd)), r.stdout[-3000:], r.stderr[-3000:])
    if hint and "No such file" in r.stderr:  # e.g. the C library's headers are not installed
        msg += "\n" + INSTALL_HINT % hint
    assert r.returncode == 0, msg
    return r


# -- Xtensa -----------------------------------------------------------------------------------

def test_xtensa_compile(tmp_path):
    cc = require("xtensa-lx106-elf-gcc", "gcc-xtensa-lx106 picolibc-xtensa-lx106-elf")
    size = require("xtensa-lx106-elf-size", "binutils-xtensa-lx106")
    obj = tmp_path / "tinygpt.o"
    run([cc, "-std=c99", "-Os", "-Wall", "-Wextra", "-Werror", "-mlongcalls", "-ffp-contract=off",
         "-I", ENGINE, "-c", ENGINE / "tinygpt.c", "-o", obj], hint="picolibc-xtensa-lx106-elf")
    out = run([size, obj]).stdout
    text, data, bss = (int(v) for v in out.splitlines()[1].split()[:3])
    print("\n[xtensa-lx106-elf-gcc -Os] tinygpt.o: .text %d bytes, .data %d, .bss %d" % (text, data, bss))
    assert 0 < text < XTENSA_TEXT_LIMIT, out


# -- Cortex-M4F on QEMU mps2-an386 ------------------------------------------------------------

def tiny_hparams(**over):
    hp = dict(PRESETS["tiny"])
    hp["n_vocab"] = hp.pop("vocab_size")
    hp.update(over)
    return hp


def spread_model_bytes(hp, seed=1, std=0.08):
    """A model with weights spread like a trained one (logits O(1), LayerNorm gains != 1,
    nonzero biases), unlike bench.random_model_bytes' N(0, 0.02) whose greedy output is flat."""
    rng = np.random.default_rng(seed)
    E, I, V, P, L = (hp[k] for k in ("n_embd", "n_inner", "n_vocab", "n_positions", "n_layer"))
    f32 = np.float32
    t = {}
    t["wte_q"], t["wte_s"] = modelfile.quantize_rows(rng.normal(0, std, (V, E)).astype(f32))
    t["wpe"] = rng.normal(0, 0.05, (P, E)).astype(f32)
    t["lnf_g"], t["lnf_b"] = (1 + rng.normal(0, 0.1, E)).astype(f32), rng.normal(0, 0.05, E).astype(f32)
    for l in range(L):
        for name, (o, i) in (("attn", (3 * E, E)), ("proj", (E, E)), ("fc", (I, E)), ("mproj", (E, I))):
            w, s = modelfile.quantize_rows(rng.normal(0, std, (o, i)).astype(f32))
            t["h.%d.%s_w" % (l, name)], t["h.%d.%s_s" % (l, name)] = w, s
            t["h.%d.%s_b" % (l, name)] = rng.normal(0, 0.02, o).astype(f32)
        for ln in ("ln1", "ln2"):
            t["h.%d.%s_g" % (l, ln)] = (1 + rng.normal(0, 0.1, E)).astype(f32)
            t["h.%d.%s_b" % (l, ln)] = rng.normal(0, 0.05, E).astype(f32)
    buf, _ = modelfile.build_model_bytes(dict(hp, eos_id=0), t, bench.synthetic_tokenizer_section(V))
    return bytes(buf)


MODELS = {
    # the tiny preset exactly as `tinygpt bench` makes it (gelu_new)
    "tiny_random": lambda: bench.random_model_bytes(tiny_hparams()),
    # tiny shape, trained-like spread, erf GELU, non-default epsilon
    "tiny_spread_gelu": lambda: spread_model_bytes(tiny_hparams(activation="gelu", layer_norm_epsilon=1e-6)),
    # Llama (format version 3): the tiny Llama preset, grouped-query attention, tied head; and
    # multi-query attention with an own output head and rope theta 500000
    "tiny_llama": lambda: bench.random_model_bytes(bench.bench_hparams("llama-tiny")),
    "tiny_llama_mqa_untied": lambda: bench.random_model_bytes(dict(bench.bench_hparams("llama-tiny"), n_kv_head=1,
                                                                 head_tied=False, rope_theta=500000.0)),
}


@pytest.fixture(scope="module")
def arm_builds(tmp_path_factory):
    """The C sources compiled once per kernel for the Cortex-M4F: {build: (dir, objects)};
    each program links its own model."""
    require_mcu_tools()
    builds = {}
    for build, defines in bench.MCU_BUILDS.items():
        d = tmp_path_factory.mktemp("arm_" + build)
        builds[build] = d, mcu.compile_objects(d, defines=defines)
    return builds


@pytest.mark.parametrize("build", sorted(bench.MCU_BUILDS))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_qemu_matches_host(arm_builds, name, build):
    model_bytes = MODELS[name]()
    workdir, objects = arm_builds[build]
    r = mcu.run_model(model_bytes, workdir=workdir, objects=objects, name="main_" + name)
    assert r["n_greedy"] >= 4 and r["n_sampled"] >= 3, r["output"]

    host_first, host_steps = mcu.host_sequence(model_bytes, r["prompt"], r["n_greedy"], r["n_sampled"],
                                               r["sampler"], r["seed"])
    assert r["prefill_crc"] == host_first, "prefill logits differ: MCU %08x, host %08x" % (r["prefill_crc"],
                                                                                        host_first)
    assert r["steps"] == host_steps, "MCU and host differ:\nMCU  %s\nhost %s" % (r["steps"], host_steps)

    # instruction counts (SysTick ticks x instructions per tick, calibrated in main.c: parse_run
    # refuses a run whose calibration is off)
    per = r["instructions"]
    print("\n[qemu mps2-an386 Cortex-M4F -O2, %s, %s kernel] %d greedy + %d sampled tokens bit-identical to the "
          "host engine\n  instructions: load+CRC %d, prefill %.0f/token (%d tokens), step %.0f/token, greedy "
          "sample %.0f, top-k/top-p sample %.0f\n  %s"
          % (name, build, r["n_greedy"], r["n_sampled"], per["load"], per["prefill"], r["counted"]["prefill"],
             per["step"], per["greedy_sample"], per["topkp_sample"], r["arena"]))
    assert 0 < per["step"] < 50e6


def test_qemu_misaligned_load_faults(arm_builds):
    """Negative control: under the same startup a misaligned word load must fault, so the clean
    runs above prove that the engine (and this harness) made only aligned accesses."""
    workdir, objects = arm_builds["default"]
    elf = mcu.link(workdir, "misaligned", [objects[k] for k in ("startup", "mini_printf", "misaligned")])
    rc, out = mcu.run_qemu(elf, timeout=60)
    assert "misaligned: loading" in out, out
    assert "no fault" not in out, out
    assert rc == 3, "expected the fault handler's exit status 3, got %d:\n%s" % (rc, out)
    assert re.search(r"^FAULT UsageFault CFSR=\w+ .* UNALIGNED$", out, re.M), out


def test_messages_under_newlib_nano(tmp_path):
    """The engine's messages keep their numbers under newlib-nano's printf (the ESP32 build's
    libc, no %llu): tests/mcu/messages.c, linked with --specs=nano.specs, must print exactly
    what the host engine says for the same calls."""
    require_mcu_tools()
    cc = mcu.find_tool("arm-none-eabi-gcc")
    harness = REPO / "tests" / "mcu"
    objects = [mcu.compile_source(harness / "startup.c", tmp_path, defines=["TG_ALLOW_UNALIGNED"])]
    objects += [mcu.compile_source(src, tmp_path) for src in
                (harness / "messages.c", ENGINE / "tinygpt.c", ENGINE / "tg_port_arena.c")]
    elf = tmp_path / "messages.elf"
    run([cc] + mcu.CFLAGS + objects + ["--specs=nano.specs", "--specs=nosys.specs", "-nostartfiles", "-T",
                                       harness / "mps2_an386.ld", "-Wl,--gc-sections", "-o", elf, "-lm"])
    rc, out = mcu.run_qemu(elf, timeout=60)
    assert rc == 0 and out.rstrip().endswith("done"), out
    got = dict(re.findall(r"^msg ([^:]+): (.*)$", out, re.M))

    lib = engine.lib()
    err = engine._Error()

    def msg():
        return err.msg.decode()
    sec = bytearray(32)
    sec[:4] = b"TTOK"
    struct.pack_into("<IIIIII", sec, 4, 1, 256, 0xFFFFFFFF, 0, 1, 0)
    lib.tg_check_tokenizer(bytes(sec), 32, 256, ctypes.byref(err))
    want = {"tokenizer counts": msg()}
    struct.pack_into("<II", sec, 12, 0, 0)
    struct.pack_into("<I", sec, 28, 7)
    lib.tg_check_tokenizer(bytes(sec), 32, 256, ctypes.byref(err))
    want["tokenizer reserved"] = msg()
    head = b"TGPT" + struct.pack("<III", 1, 128, 0xFFFFFFF0) + bytes(112)
    lib.tg_read_size(head, 128, 1000, ctypes.byref(ctypes.c_size_t()), ctypes.byref(err))
    want["read size"] = msg()
    buf = (ctypes.c_char * 256)()
    ctypes.memmove(buf, head, 16)
    lib.tg_load(ctypes.addressof(buf), 100, None, ctypes.byref(ctypes.c_void_p()), ctypes.byref(err))
    want["short file"] = msg()

    assert want["tokenizer counts"] == "tokenizer section is 32 bytes but its counts need 51539608600"
    assert want["read size"] == "file is 1000 bytes but its header says 4294967280 (truncated?)"
    assert want["short file"] == "file is 100 bytes, shorter than the 128-byte header"
    for k, v in want.items():
        assert got.get(k) == v, (k, got.get(k), v)
    assert re.fullmatch(r"model buffer at 0x[0-9a-f]+ is not 16-byte aligned", got["misaligned"]), got
