"""The engine on a bare Cortex-M4F, emulated: build, run, and count instructions.

The C engine (usercmodule/tinygpt/tinygpt.c) and the bare-metal harness (tests/mcu/: startup,
semihosting printf, the static-arena port layer, main.c) are compiled with arm-none-eabi-gcc
and the model file is linked in; QEMU's mps2-an386 board (one Cortex-M4F) runs the program
with `-icount shift=0`, one instruction per ns of virtual time. SysTick runs on the 25 MHz
processor clock, so each tick is 40 executed instructions (main.c calibrates this), and the
counts do not depend on the machine QEMU runs on: the same build gives the same numbers.

main.c loads the model (CRC checked), prefills N_PROMPT tokens, steps N_GREEDY greedy tokens,
then N_SAMPLED top-k/top-p tokens, printing the CRC32 of every logits vector, the token ids and
the tick counts; `host_sequence` runs the same on the host engine, which must match bit for bit.

Used by `tinygpt bench --mcu` and tests/test_mcu.py. The sources are read from the checkout
(like firmware.py's usercmodule): the harness is test code for the very engine file that the
host package and the MicroPython module compile, and copying it into the package would give a
second copy to drift. An installed package without its checkout gets a clear error.
"""
import re
import shutil
import subprocess
import tempfile
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ENGINE = REPO / "usercmodule" / "tinygpt"
HARNESS = REPO / "tests" / "mcu"

# -ffp-contract=off as on every build of the engine: the spec fixes each float32 rounding.
CFLAGS = ["-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16", "-O2", "-ffp-contract=off",
          "-std=c99", "-g", "-Wall", "-Wextra", "-Werror", "-ffunction-sections", "-fdata-sections"]
QEMU = ["qemu-system-arm", "-M", "mps2-an386", "-cpu", "cortex-m4", "-nographic", "-monitor", "none",
        "-serial", "none", "-semihosting", "-icount", "shift=0"]
INSN_PER_TICK = 40  # -icount shift=0: 1 insn/ns; SysTick at 25 MHz: 40 ns/tick (checked by main.c)
# tests/mcu/mps2_an386.ld: the model file and the engine's arena share the board's 16 MiB PSRAM;
# the arena is tg_port_arena.c's default 2 MiB (KV cache and activations: hw1 needs 1.0 MB).
PSRAM_BYTES = 16 << 20
ARENA_BYTES = 2 << 20
MAX_MODEL_BYTES = PSRAM_BYTES - ARENA_BYTES - 64 * 1024  # 64 KiB for alignment and the arena's headers
CPU = "Cortex-M4F (QEMU mps2-an386, -icount shift=0)"

# tool -> the Debian packages that provide it
PACKAGES = {
    "arm-none-eabi-gcc": "gcc-arm-none-eabi libnewlib-arm-none-eabi",
    "qemu-system-arm": "qemu-system-arm",
}
SOURCES = (ENGINE / "tinygpt.c", ENGINE / "tg_port_arena.c", HARNESS / "startup.c", HARNESS / "mini_printf.c",
           HARNESS / "main.c", HARNESS / "misaligned.c")
MAIN_OBJECTS = ("startup", "mini_printf", "main", "tg_port_arena", "tinygpt")


class McuError(RuntimeError):
    """A build or emulator run failed; the message says what and how to fix it."""


class ToolMissing(McuError):
    def __init__(self, tool):
        self.tool, self.packages = tool, PACKAGES[tool]
        super().__init__("%s not found: install the Debian packages %s (`sudo apt-get install -y "
                         "--no-install-recommends %s`, or `sudo bash scripts/install-ci-deps`)"
                         % (tool, self.packages, self.packages))


def find_tool(tool):
    """Path of a tool of PACKAGES, or ToolMissing naming the Debian packages."""
    path = shutil.which(tool)
    if not path:
        raise ToolMissing(tool)
    return path


def _run(cmd, **kw):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if r.returncode != 0:
        msg = "command failed (%d): %s\n%s%s" % (r.returncode, " ".join(map(str, cmd)), r.stdout[-3000:],
                                                 r.stderr[-3000:])
        if "No such file" in r.stderr:  # e.g. newlib's headers are not installed
            msg += "\ninstall the Debian packages %s" % PACKAGES["arm-none-eabi-gcc"]
        raise McuError(msg)
    return r


def compile_objects(workdir, defines=()):
    """The engine and harness compiled for the Cortex-M4F into workdir: {source stem: object path}."""
    missing = [str(s) for s in SOURCES if not s.is_file()]
    if missing:
        raise McuError("the MCU sources are not here (%s): run from a checkout of the tinygpt repository "
                       "(pip install -e .)" % ", ".join(missing))
    return {src.stem: compile_source(src, workdir, defines) for src in SOURCES}


def compile_source(src, workdir, defines=()):
    """One C file compiled for the Cortex-M4F (engine and harness headers on the include path)."""
    cc = find_tool("arm-none-eabi-gcc")
    o = Path(workdir) / (Path(src).stem + ".o")
    _run([cc] + CFLAGS + ["-D%s" % d for d in defines] + ["-I", ENGINE, "-I", HARNESS, "-c", src, "-o", o])
    return o


def link(workdir, name, objects, model=None):
    """An ELF of the objects, with the model file at path `model` linked into PSRAM if given."""
    cc = find_tool("arm-none-eabi-gcc")
    elf = Path(workdir) / (name + ".elf")
    extra = []
    if model is not None:
        extra = ["-DTG_MODEL_FILE=\"%s\"" % model, HARNESS / "model.S"]
    _run([cc] + CFLAGS + ["-I", HARNESS] + list(objects) + extra +
         ["--specs=nosys.specs", "-nostartfiles", "-T", HARNESS / "mps2_an386.ld", "-Wl,--gc-sections",
          "-o", elf, "-lm"])
    return elf


def run_qemu(elf, timeout=300):
    """(exit status, output) of the program on the emulated board; semihosting output is on stderr."""
    qemu = find_tool("qemu-system-arm")
    try:
        r = subprocess.run([qemu] + QEMU[1:] + ["-kernel", str(elf)], capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise McuError("QEMU did not finish %s within %d s" % (elf, timeout)) from e
    return r.returncode, r.stdout + r.stderr


def parse_run(out):
    """What main.c printed: prompt, sampler, token ids and logits CRCs, instruction counts."""
    def find(pattern):
        mt = re.search(pattern, out, re.M)
        if not mt:
            raise McuError("the MCU output has no line matching %r:\n%s" % (pattern, out[-4000:]))
        return mt

    prompt = [int(v) for v in find(r"^prompt:((?: \d+)+)$").group(1).split()]
    sm = find(r"^sampler: temperature (\S+) top_k (\d+) top_p (\S+) repetition_penalty (\S+) seed (\d+)$")
    sampler = dict(temperature=float(sm.group(1)), top_k=int(sm.group(2)), top_p=float(sm.group(3)),
                   repetition_penalty=float(sm.group(4)))
    steps = [(kind, int(k), int(t), int(c, 16)) for kind, k, t, c in
             re.findall(r"^(greedy|sampled) (\d+) id (\d+) crc ([0-9a-f]{8})$", out, re.M)]
    cal = find(r"^calibration: (\d+) instructions in (\d+) ticks$")
    insn, ticks = int(cal.group(1)), int(cal.group(2))
    if abs(insn / ticks - INSN_PER_TICK) >= 0.01 * INSN_PER_TICK:
        raise McuError("SysTick is not counting %d instructions per tick: %s" % (INSN_PER_TICK, cal.group(0)))
    # "ticks <what> <n> [<unit> <count>]": per-unit instruction counts
    counts = {mt.group(1): (int(mt.group(2)), int(mt.group(3) or 1))
              for mt in re.finditer(r"^ticks (\w+) (\d+)(?: \w+ (\d+))?$", out, re.M)}
    return {
        "prompt": prompt,
        "sampler": sampler,
        "seed": int(sm.group(5)),
        "prefill_crc": int(find(r"^crc prefill ([0-9a-f]{8})$").group(1), 16),
        "steps": steps,
        "n_greedy": sum(1 for s in steps if s[0] == "greedy"),
        "n_sampled": sum(1 for s in steps if s[0] == "sampled"),
        "instructions": {k: ticks * INSN_PER_TICK / n for k, (ticks, n) in counts.items()},
        "counted": {k: n for k, (ticks, n) in counts.items()},
        "arena": find(r"^arena: .*$").group(0),
    }


def run_model(model_bytes, workdir=None, objects=None, name="main", timeout=300):
    """Build main.c with this model file, run it on QEMU and parse its output (parse_run).
    `objects` (compile_objects of the same workdir) saves compiling again for each model."""
    if len(model_bytes) > MAX_MODEL_BYTES:
        raise McuError("the model file is %d bytes: the emulated board's 16 MiB PSRAM holds at most %d next to "
                       "the engine's %d-byte arena" % (len(model_bytes), MAX_MODEL_BYTES, ARENA_BYTES))
    with tempfile.TemporaryDirectory(prefix="tinygpt-mcu-") as tmp:
        workdir = Path(workdir or tmp)
        objects = objects or compile_objects(workdir)
        path = workdir / (name + ".model.bin")
        path.write_bytes(model_bytes)
        elf = link(workdir, name, [objects[k] for k in MAIN_OBJECTS], model=path)
        rc, out = run_qemu(elf, timeout=timeout)
    if rc != 0 or not out.rstrip().endswith("done") or "FAULT" in out or "ERROR" in out:
        raise McuError("the MCU run failed (exit status %d):\n%s" % (rc, out[-4000:]))
    r = parse_run(out)
    r["output"] = out
    return r


def host_sequence(model_bytes, prompt, n_greedy, n_sampled, sampler, seed):
    """What main.c does, on the host engine: the prefill logits CRC and [(kind, k, id, crc)]."""
    from .engine import Model

    def crc(m):
        return zlib.crc32(bytes(m.logits())) & 0xFFFFFFFF

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


def matches_host(model_bytes, run):
    """True when the host engine reproduces the MCU run's logits and tokens bit for bit."""
    first, steps = host_sequence(model_bytes, run["prompt"], run["n_greedy"], run["n_sampled"], run["sampler"],
                                 run["seed"])
    return first == run["prefill_crc"] and steps == run["steps"]


def compiler_version():
    return _run([find_tool("arm-none-eabi-gcc"), "--version"]).stdout.splitlines()[0]
