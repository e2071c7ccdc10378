"""Fuzzing the C engine's loader and tokenizer validator with libFuzzer (issue 6).

tests/fuzz/fuzz_load.c and fuzz_tokenizer.c are built with clang -fsanitize=fuzzer,address,
undefined and run for a bounded time on a seed corpus written here (valid model files of the
tiny preset and of a few small shapes, a model with a trained tokenizer, and truncations). Any
crash, memory error, leak or undefined behaviour fails the test. Inputs that once crashed are
kept, minimized, in tests/fuzz/regressions/<target>/ and replayed:
  fuzz_tokenizer/offset-past-byte-table   tok_off[t] > bytes_size with later offsets coming back
      down: tg_check_tokenizer read blob[tok_off[t]] out of bounds before noticing (fixed: each
      offset is checked against bytes_size as it is read).
  fuzz_load/exp32-nan-from-overflowing-scales   finite but huge scales/biases (1e31) overflow
      activations to inf; attention then computes inf - inf = NaN and exp32 converted NaN to int
      (undefined behaviour; fixed: exp32 returns NaN for NaN, what its steps give anyway).

A long run by hand (the seed corpus is written by `python tests/test_fuzz.py CORPUS_DIR`):
    clang -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -ffp-contract=off \
        -I usercmodule/tinygpt tests/fuzz/fuzz_load.c usercmodule/tinygpt/tinygpt.c \
        usercmodule/tinygpt/tg_port_posix.c -o /tmp/fuzz_load -lm
    /tmp/fuzz_load -runs=1000000 -rss_limit_mb=2048 /tmp/corpus/load

Also: py/bpe.py's Tokenizer must reject any corrupted tokenizer section with ValueError only
(hypothesis).

The fuzzers need clang and its runtimes (`bash scripts/install-ci-deps` as root installs them);
where that script could have installed them, their absence fails the tests.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

if __name__ != "__main__":
    from conftest import REPO
else:  # `python tests/test_fuzz.py DIR`: write the seed corpus
    REPO = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(REPO / "host_tools"))

from tinygpt import bench, modelfile
from tinygpt.presets import PRESETS

ENGINE = REPO / "usercmodule" / "tinygpt"
FUZZ = REPO / "tests" / "fuzz"
REGRESSIONS = FUZZ / "regressions"
TARGETS = ("fuzz_load", "fuzz_tokenizer")
CFLAGS = ["-g", "-O1", "-fsanitize=fuzzer,address,undefined", "-fno-sanitize-recover=all", "-ffp-contract=off",
          "-std=c99", "-D_ISOC11_SOURCE", "-Wall", "-Wextra", "-Werror"]
FUZZ_SECONDS = int(os.environ.get("TG_FUZZ_SECONDS", "20"))
INSTALL_HINT = ("run `sudo bash scripts/install-ci-deps` (or: apt-get install -y --no-install-recommends "
                "clang libclang-rt-14-dev)")

# Small shapes for the seed corpus: fast to run, so the fuzzer spends its time on mutations.
SMALL_SHAPES = [
    dict(n_vocab=256, n_embd=8, n_head=2, n_layer=1, n_inner=16, n_positions=4),
    dict(n_vocab=259, n_embd=12, n_head=3, n_layer=2, n_inner=8, n_positions=6, activation="gelu",
         layer_norm_epsilon=1e-6),
    dict(n_vocab=300, n_embd=4, n_head=1, n_layer=1, n_inner=4, n_positions=2),
]


def model_with_tokenizer(hp, section, seed=0):
    """A random model of shape hp around the given tokenizer section."""
    rng = np.random.default_rng(seed)
    E, I, V, P, L = (hp[k] for k in ("n_embd", "n_inner", "n_vocab", "n_positions", "n_layer"))
    f32 = np.float32
    t = {"wpe": rng.normal(0, 0.05, (P, E)).astype(f32), "lnf_g": np.ones(E, f32), "lnf_b": np.zeros(E, f32)}
    t["wte_q"], t["wte_s"] = modelfile.quantize_rows(rng.normal(0, 0.1, (V, E)).astype(f32))
    for l in range(L):
        for name, (o, i) in (("attn", (3 * E, E)), ("proj", (E, E)), ("fc", (I, E)), ("mproj", (E, I))):
            w, s = modelfile.quantize_rows(rng.normal(0, 0.1, (o, i)).astype(f32))
            t["h.%d.%s_w" % (l, name)], t["h.%d.%s_s" % (l, name)] = w, s
            t["h.%d.%s_b" % (l, name)] = rng.normal(0, 0.02, o).astype(f32)
        for ln in ("ln1", "ln2"):
            t["h.%d.%s_g" % (l, ln)], t["h.%d.%s_b" % (l, ln)] = np.ones(E, f32), np.zeros(E, f32)
    buf, _ = modelfile.build_model_bytes(dict(hp, eos_id=0), t, section)
    return bytes(buf)


def trained_tokenizer_section(n_vocab=600):
    """A tokenizer section of a BPE trained on synthetic text (has special tokens and merges
    of every length), or None where the training dependencies are missing."""
    try:
        from tinygpt import testing, tokenizer_section
        return tokenizer_section.build_section(testing.make_synthetic_tokenizer(n_vocab))
    except ImportError:
        return None


def seed_models():
    """name -> bytes of valid model files."""
    tiny = dict(PRESETS["tiny"])
    tiny["n_vocab"] = tiny.pop("vocab_size")
    models = {"tiny": bench.random_model_bytes(tiny)}
    for i, hp in enumerate(SMALL_SHAPES):
        models["small%d" % i] = bench.random_model_bytes(hp, seed=i)
    sec = trained_tokenizer_section()
    if sec is not None:
        models["trained_tok"] = model_with_tokenizer(dict(n_vocab=600, n_embd=8, n_head=2, n_layer=1, n_inner=8,
                                                          n_positions=4), sec)
    return models


def write_seed_corpus(root):
    """Write the seed corpora: root/load (model files and truncations) and root/tokenizer
    (u32 n_vocab + a tokenizer section)."""
    root = Path(root)
    (root / "load").mkdir(parents=True, exist_ok=True)
    (root / "tokenizer").mkdir(parents=True, exist_ok=True)
    models = seed_models()
    for name, data in models.items():
        (root / "load" / (name + ".bin")).write_bytes(data)
        n_tensors = int.from_bytes(data[76:80], "little")
        dir_end = 128 + 16 * n_tensors
        first = int.from_bytes(data[128 + 8:128 + 12], "little")
        cuts = {0, 4, 64, 127, 128, 129, dir_end - 1, dir_end, first + 1, len(data) // 2, len(data) - 1}
        if name != "tiny":  # the tiny model's truncations would only slow the fuzzer down
            for c in sorted(cuts):
                if 0 <= c < len(data):
                    (root / "load" / ("%s_trunc%d.bin" % (name, c))).write_bytes(data[:c])
        # the tokenizer section: the last directory entry
        e = 128 + 16 * (n_tensors - 1)
        off, nb = (int.from_bytes(data[e + k:e + k + 4], "little") for k in (8, 12))
        sec = data[off:off + nb]
        (root / "tokenizer" / (name + ".bin")).write_bytes(data[24:28] + sec)
        (root / "tokenizer" / (name + "_trunc.bin")).write_bytes(data[24:28] + sec[:len(sec) // 3])
    return models


# -- libFuzzer ---------------------------------------------------------------------------------

def require_clang():
    clang = shutil.which("clang")
    if not clang:
        msg = "clang not found: " + INSTALL_HINT
        if shutil.which("apt-get") and shutil.which("dpkg"):
            pytest.fail(msg)
        pytest.skip(msg + " (not a Debian machine)")
    return clang


@pytest.fixture(scope="module")
def fuzzers(tmp_path_factory):
    """target name -> built executable."""
    clang = require_clang()
    d = tmp_path_factory.mktemp("fuzz")
    exes = {}
    for t in TARGETS:
        exe = d / t
        r = subprocess.run([clang] + CFLAGS + ["-I", str(ENGINE), str(FUZZ / (t + ".c")), str(ENGINE / "tinygpt.c"),
                            str(ENGINE / "tg_port_posix.c"), "-o", str(exe), "-lm"], capture_output=True, text=True)
        if r.returncode != 0 and ("fuzzer" in r.stderr and ("cannot find" in r.stderr or "No such file" in r.stderr)):
            pytest.fail("clang has no libFuzzer runtime: " + INSTALL_HINT + "\n" + r.stderr[-2000:])
        assert r.returncode == 0, "building %s failed:\n%s" % (t, r.stderr[-4000:])
        exes[t] = exe
    return exes


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_seed_corpus(root)
    return root


def sanitizer_env():
    env = dict(os.environ)
    env["ASAN_OPTIONS"] = "detect_leaks=1:abort_on_error=0:allocator_may_return_null=1"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    return env


@pytest.mark.parametrize("target", TARGETS)
def test_regressions_replay(fuzzers, target):
    """Every input that once crashed a target runs clean now."""
    files = sorted(p for p in (REGRESSIONS / target).glob("*") if p.is_file()) if (REGRESSIONS / target).is_dir() else []
    if not files:
        return
    r = subprocess.run([str(fuzzers[target])] + [str(f) for f in files], capture_output=True, text=True,
                       timeout=300, env=sanitizer_env())
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    print("\n[%s] %d regression inputs replayed clean" % (target, len(files)))


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz(fuzzers, corpus, tmp_path, target):
    sub = {"fuzz_load": "load", "fuzz_tokenizer": "tokenizer"}[target]
    work = tmp_path / "corpus"
    shutil.copytree(corpus / sub, work)
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    r = subprocess.run([str(fuzzers[target]), "-max_total_time=%d" % FUZZ_SECONDS, "-rss_limit_mb=2048",
                        "-timeout=30", "-print_final_stats=1", "-artifact_prefix=%s/" % artifacts, str(work)],
                       capture_output=True, text=True, timeout=FUZZ_SECONDS + 300, env=sanitizer_env())
    out = r.stdout + r.stderr
    crashes = sorted(p.name for p in artifacts.iterdir())
    assert r.returncode == 0 and not crashes, "%s crashed; inputs in %s: %s\n%s" % (target, artifacts, crashes,
                                                                                    out[-8000:])
    execs = int(re.search(r"stat::number_of_executed_units:\s*(\d+)", out).group(1))
    last = [l for l in out.splitlines() if re.match(r"#\d+\s", l)]
    cov = re.search(r"cov: (\d+) ft: (\d+)", last[-1]) if last else None
    print("\n[%s] %d runs in %ds, %s, corpus %d files" % (
        target, execs, FUZZ_SECONDS, "cov %s ft %s" % cov.groups() if cov else "no coverage line",
        len(list(work.iterdir()))))
    assert execs > 100, out[-4000:]


# -- py/bpe.py on corrupted sections -----------------------------------------------------------

BPE = REPO / "py" / "bpe.py"


@pytest.fixture(scope="module")
def bpe_and_section():
    if not BPE.exists():
        pytest.skip("py/bpe.py does not exist yet")
    sec = trained_tokenizer_section()
    if sec is None:
        pytest.skip("tokenizers (the train extra) is not installed")
    import importlib.util
    spec = importlib.util.spec_from_file_location("tg_device_bpe", BPE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.Tokenizer(sec)  # the valid section loads
    return mod, sec


def test_bpe_rejects_corrupted_sections_with_valueerror_only(bpe_and_section):
    from hypothesis import HealthCheck, given, settings, strategies as st

    mod, sec = bpe_and_section
    n = len(sec)
    u32 = st.integers(0, 2**32 - 1)
    edit = st.one_of(
        st.tuples(st.just("byte"), st.integers(0, n - 1), st.integers(0, 255)),
        # a u32 field anywhere, with values near the interesting boundaries
        st.tuples(st.just("u32"), st.integers(0, n // 4 - 1),
                  st.one_of(u32, st.integers(0, 700), st.sampled_from([0xFFFFFFFF, 0x80000000, n, n // 4]))),
        st.tuples(st.just("truncate"), st.integers(0, n - 1), st.just(0)),
        st.tuples(st.just("extend"), st.integers(1, 64), st.integers(0, 255)),
    )

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(st.lists(edit, min_size=1, max_size=4), st.booleans())
    def check(edits, checked):
        b = bytearray(sec)
        for kind, a, v in edits:
            if kind == "byte" and a < len(b):
                b[a] = v
            elif kind == "u32" and 4 * a + 4 <= len(b):
                b[4 * a:4 * a + 4] = v.to_bytes(4, "little")
            elif kind == "truncate":
                del b[a:]
            elif kind == "extend":
                b += bytes([v]) * a
        try:
            tok = mod.Tokenizer(bytes(b), check=checked)
        except ValueError:
            return
        # accepted: it must then work without anything but ValueError escaping
        try:
            ids = tok.encode("Q: what is the time? A: 42 é→日本")
            tok.decode(ids)
            d = tok.decoder()
            for i in ids:
                d.feed(i)
            d.flush()
        except ValueError:
            pass

    check()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/test_fuzz.py CORPUS_DIR  (writes CORPUS_DIR/load and CORPUS_DIR/tokenizer)")
    ms = write_seed_corpus(sys.argv[1])
    print("seed corpus in %s: %d models (%s)" % (sys.argv[1], len(ms), ", ".join(ms)))
