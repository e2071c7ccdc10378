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
  instructions per tick); the instructions per token are printed (`pytest -s`).

The tools come from Debian packages: `bash scripts/install-ci-deps` (as root) installs them.
Where that script could have (a Debian machine), a missing tool fails the test; elsewhere the
test is skipped.
"""
import re
import shutil
import subprocess
import zlib

import numpy as np
import pytest

from conftest import REPO

from tinygpt import bench, modelfile
from tinygpt.engine import Model
from tinygpt.presets import PRESETS

ENGINE = REPO / "usercmodule" / "tinygpt"
MCU = REPO / "tests" / "mcu"
INSTALL_HINT = "run `sudo bash scripts/install-ci-deps` (or: apt-get install -y --no-install-recommends %s)"

ARM_CFLAGS = ["-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16", "-O2", "-ffp-contract=off",
              "-std=c99", "-g", "-Wall", "-Wextra", "-Werror", "-ffunction-sections", "-fdata-sections"]
QEMU = ["qemu-system-arm", "-M", "mps2-an386", "-cpu", "cortex-m4", "-nographic", "-monitor", "none",
        "-serial", "none", "-semihosting", "-icount", "shift=0"]
INSN_PER_TICK = 40  # -icount shift=0: 1 insn/ns; SysTick at 25 MHz: 40 ns/tick (checked by main.c)
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
}


@pytest.fixture(scope="module")
def arm_objects(tmp_path_factory):
    """The C sources compiled once for the Cortex-M4F; each program links its own model."""
    cc = require("arm-none-eabi-gcc", "gcc-arm-none-eabi libnewlib-arm-none-eabi")
    d = tmp_path_factory.mktemp("arm")
    objs = {}
    for src in (ENGINE / "tinygpt.c", MCU / "startup.c", MCU / "mini_printf.c", MCU / "main.c",
                ENGINE / "tg_port_arena.c", MCU / "misaligned.c"):
        o = d / (src.stem + ".o")
        run([cc] + ARM_CFLAGS + ["-I", ENGINE, "-I", MCU, "-c", src, "-o", o], hint="libnewlib-arm-none-eabi")
        objs[src.stem] = o
    return cc, d, objs


def link(arm, name, objs, model=None):
    cc, d, _ = arm
    elf = d / (name + ".elf")
    extra = []
    if model is not None:
        extra = ["-DTG_MODEL_FILE=\"%s\"" % model, MCU / "model.S"]
    run([cc] + ARM_CFLAGS + ["-I", MCU] + list(objs) + extra +
        ["--specs=nosys.specs", "-nostartfiles", "-T", MCU / "mps2_an386.ld", "-Wl,--gc-sections",
         "-o", elf, "-lm"], hint="libnewlib-arm-none-eabi")
    return elf


def run_qemu(elf, timeout=120):
    require("qemu-system-arm", "qemu-system-arm")
    r = subprocess.run(QEMU + ["-kernel", str(elf)], capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    return r.returncode, r.stdout + r.stderr  # semihosting output arrives on stderr


def host_sequence(model_bytes, prompt, n_greedy, n_sampled, sampler, seed):
    """What main.c does, on the host engine: [(kind, k, id, crc)] and the prefill CRC."""
    crc = lambda m: zlib.crc32(bytes(m.logits())) & 0xFFFFFFFF  # noqa: E731
    out = []
    with Model(model_bytes) as m:
        m.prefill(prompt)
        first = crc(m)
        for k in range(n_greedy):
            t = m.sample()
            m.step(t)
            out.append(("greedy", k, t, crc(m)))
        for k in range(n_sampled):
            t = m.sample(seed=seed if k == 0 else None, **sampler)
            m.step(t)
            out.append(("sampled", k, t, crc(m)))
    return first, out


@pytest.mark.parametrize("name", sorted(MODELS))
def test_qemu_matches_host(arm_objects, tmp_path, name):
    model_bytes = MODELS[name]()
    path = tmp_path / "model.bin"
    path.write_bytes(model_bytes)
    objs = arm_objects[2]
    elf = link(arm_objects, "main_" + name,
               [objs[k] for k in ("startup", "mini_printf", "main", "tg_port_arena", "tinygpt")], model=path)
    rc, out = run_qemu(elf)
    assert rc == 0 and out.rstrip().endswith("done"), "MCU run failed (rc %d):\n%s" % (rc, out[-4000:])
    assert "FAULT" not in out and "ERROR" not in out, out

    prompt = [int(v) for v in re.search(r"^prompt:((?: \d+)+)$", out, re.M).group(1).split()]
    sm = re.search(r"^sampler: temperature (\S+) top_k (\d+) top_p (\S+) repetition_penalty (\S+) seed (\d+)$",
                   out, re.M)
    sampler = dict(temperature=float(sm.group(1)), top_k=int(sm.group(2)), top_p=float(sm.group(3)),
                   repetition_penalty=float(sm.group(4)))
    mcu_steps = [(kind, int(k), int(t), int(c, 16)) for kind, k, t, c in
                 re.findall(r"^(greedy|sampled) (\d+) id (\d+) crc ([0-9a-f]{8})$", out, re.M)]
    n_greedy = sum(1 for s in mcu_steps if s[0] == "greedy")
    n_sampled = len(mcu_steps) - n_greedy
    assert n_greedy >= 4 and n_sampled >= 3, out
    mcu_first = int(re.search(r"^crc prefill ([0-9a-f]{8})$", out, re.M).group(1), 16)

    host_first, host_steps = host_sequence(model_bytes, prompt, n_greedy, n_sampled, sampler, int(sm.group(5)))
    assert mcu_first == host_first, "prefill logits differ: MCU %08x, host %08x" % (mcu_first, host_first)
    assert mcu_steps == host_steps, "MCU and host differ:\nMCU  %s\nhost %s" % (mcu_steps, host_steps)

    # instruction counts (SysTick ticks x instructions per tick, calibrated in main.c)
    cal = re.search(r"^calibration: (\d+) instructions in (\d+) ticks$", out, re.M)
    insn, ticks = int(cal.group(1)), int(cal.group(2))
    assert abs(insn / ticks - INSN_PER_TICK) < 0.01 * INSN_PER_TICK, "SysTick is not counting instructions: " + cal.group(0)
    t = {m.group(1): (int(m.group(2)), int(m.group(3) or 1))
         for m in re.finditer(r"^ticks (\w+) (\d+)(?: \w+ (\d+))?$", out, re.M)}
    per = {k: v[0] * INSN_PER_TICK / v[1] for k, v in t.items()}
    arena = re.search(r"^arena: .*$", out, re.M).group(0)
    print("\n[qemu mps2-an386 Cortex-M4F -O2, %s] %d greedy + %d sampled tokens bit-identical to the host engine"
          "\n  instructions: load+CRC %d, prefill %.0f/token (%d tokens), step %.0f/token, greedy sample %.0f, "
          "top-k/top-p sample %.0f\n  %s"
          % (name, n_greedy, n_sampled, per["load"], per["prefill"], t["prefill"][1], per["step"],
             per["greedy_sample"], per["topkp_sample"], arena))
    assert 0 < per["step"] < 50e6


def test_qemu_misaligned_load_faults(arm_objects):
    """Negative control: under the same startup a misaligned word load must fault, so the clean
    runs above prove that the engine (and this harness) made only aligned accesses."""
    objs = arm_objects[2]
    elf = link(arm_objects, "misaligned", [objs[k] for k in ("startup", "mini_printf", "misaligned")])
    rc, out = run_qemu(elf, timeout=60)
    assert "misaligned: loading" in out, out
    assert "no fault" not in out, out
    assert rc == 3, "expected the fault handler's exit status 3, got %d:\n%s" % (rc, out)
    assert re.search(r"^FAULT UsageFault CFSR=\w+ .* UNALIGNED$", out, re.M), out
