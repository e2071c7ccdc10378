"""Tests of host_tools/tinygpt/reference.py against docs/model-format.md and the outside world.

The reference is checked against: float64 math (accuracy of exp32/tanh32/erf32/gelu), bits a C
compiler gives (constants; a C transcription of the section 4.1-4.3 helpers compiled with
-ffp-contract=off, when gcc/cc is available), a scalar loop transcription of section 4.5 written
here from the spec, Hugging Face's GPT-2 in float (via a file this module writes itself from the
spec, `make_model_bytes`), and hand-made files that break each format rule.
"""

import ctypes
import math
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

# The package is pip-installed later; until then import it from the source tree.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "host_tools"))

from tinygpt import reference as ref  # noqa: E402
from tinygpt.reference import FormatError  # noqa: E402

F32 = np.float32


def bits(x):
    return int(np.asarray(x, np.float32).view(np.uint32))


# ============================================================================================
# test scaffolding: a model file writer that follows the spec
# ============================================================================================

KIND_NAMES = {1: "wte_q", 2: "wte_s", 3: "wpe", 4: "lnf_g", 5: "lnf_b", 6: "tokenizer"}
LAYER_KIND_NAMES = ["ln1_g", "ln1_b", "attn_w", "attn_s", "attn_b", "proj_w", "proj_s", "proj_b",
                    "ln2_g", "ln2_b", "fc_w", "fc_s", "fc_b", "mproj_w", "mproj_s", "mproj_b"]


def canonical_order(n_layer):
    """(tensor_id, name, dtype) in the spec's directory order."""
    out = [(1, "wte_q", 1), (2, "wte_s", 2), (3, "wpe", 2)]
    for l in range(n_layer):
        for k, nm in enumerate(LAYER_KIND_NAMES):
            out.append((16 + k + 256 * l, "h.%d.%s" % (l, nm), 1 if nm.endswith("_w") else 2))
    out += [(4, "lnf_g", 2), (5, "lnf_b", 2), (6, "tokenizer", 3)]
    return out


def pad(n, a):
    return (n + a - 1) // a * a


def make_tokenizer_section(vocab_bytes, merges, special_ids, **ov):
    """Spec section 6.  ``ov`` overrides header fields (magic, version, n_vocab, n_merges,
    n_special, pretokenizer, bytes_size, reserved), ``tok_off`` or appends ``extra`` bytes."""
    blob = b"".join(vocab_bytes)
    tok_off = [0]
    for b in vocab_bytes:
        tok_off.append(tok_off[-1] + len(b))
    tok_off = ov.get("tok_off", tok_off)
    head = struct.pack("<4sIIIIIII", ov.get("magic", b"TTOK"), ov.get("version", 1),
                       ov.get("n_vocab", len(vocab_bytes)), ov.get("n_merges", len(merges)),
                       ov.get("n_special", len(special_ids)), ov.get("pretokenizer", 1),
                       ov.get("bytes_size", len(blob)), ov.get("reserved", 0))
    sec = head + struct.pack("<%dI" % len(tok_off), *tok_off)
    sec += blob + b"\0" * (pad(len(blob), 4) - len(blob))
    for m in merges:
        sec += struct.pack("<3I", *m)
    sec += struct.pack("<%dI" % len(special_ids), *special_ids)
    return sec + ov.get("extra", b"")


def make_model_bytes(hparams, tensors, tokenizer, *, header_overrides=None, tok_section=None,
                     dir_offset=128, gap=0, fix_crc=True):
    """Write a format-v1 file per the spec.

    hparams: dict with the header's hyperparameter fields; tensors: name -> array (names as in
    the spec, layer tensors 'h.<l>.<name>'); tokenizer: dict(vocab_bytes, merges, special_ids).
    ``gap`` extra bytes (multiple of 16) are left between tensors; ``header_overrides`` replace
    raw header fields before the CRC is computed.
    """
    hp = dict(hparams)
    L = hp["n_layer"]
    order = canonical_order(L)
    if tok_section is None:
        tok_section = make_tokenizer_section(tokenizer["vocab_bytes"], tokenizer["merges"],
                                             tokenizer["special_ids"])
    n_t = len(order)
    pos = pad(dir_offset + 16 * n_t, 16) + gap
    entries, chunks = [], []
    for tid, name, dt in order:
        if dt == 3:
            data = bytes(tok_section)
        elif dt == 1:
            data = np.ascontiguousarray(tensors[name], dtype=np.int8).tobytes()
        else:
            data = np.ascontiguousarray(tensors[name], dtype="<f4").tobytes()
        entries.append((tid, dt, pos, len(data)))
        chunks.append((pos, data))
        pos = pad(pos + len(data), 16) + gap
    file_size = chunks[-1][0] + len(chunks[-1][1])
    fields = dict(
        magic=b"TGPT", format_version=1, header_size=128, file_size=file_size, crc32=0,
        quant_scheme=1, n_vocab=hp["n_vocab"], n_positions=hp["n_positions"],
        n_embd=hp["n_embd"], n_layer=L, n_head=hp["n_head"], n_inner=hp["n_inner"],
        activation=hp["activation"], layer_norm_epsilon=hp["layer_norm_epsilon"],
        eos_id=hp["eos_id"], bos_id=hp["bos_id"], q_id=hp.get("q_id", 0xFFFFFFFF),
        a_id=hp.get("a_id", 0xFFFFFFFF), do_id=hp.get("do_id", 0xFFFFFFFF), n_tensors=n_t,
        dir_offset=dir_offset, flags=0, reserved=b"\0" * 40)
    fields.update(header_overrides or {})
    buf = bytearray(file_size)
    struct.pack_into("<4sIIIIIIIIIIIIfIIIIIIII40s", buf, 0, *(fields[k] for k in (
        "magic", "format_version", "header_size", "file_size", "crc32", "quant_scheme",
        "n_vocab", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "activation",
        "layer_norm_epsilon", "eos_id", "bos_id", "q_id", "a_id", "do_id", "n_tensors",
        "dir_offset", "flags", "reserved")))
    for i, e in enumerate(entries):
        struct.pack_into("<4I", buf, dir_offset + 16 * i, *e)
    for p, data in chunks:
        buf[p:p + len(data)] = data
    if fix_crc:
        refix_crc(buf)
    return bytes(buf)


def refix_crc(buf):
    """Recompute the header CRC in place (bytearray) over [20, file_size)."""
    fs = struct.unpack_from("<I", buf, 12)[0]
    struct.pack_into("<I", buf, 16, zlib.crc32(bytes(buf[20:fs])) & 0xFFFFFFFF)
    return buf


def byte_tokenizer(n_vocab):
    """256 single-byte tokens, merges up to n_vocab-1 (including 'Q:', 'A:', 'Do:'), then one
    special token '<|endoftext|>' as the last id."""
    vocab = [bytes([b]) for b in range(256)]
    merges = []

    def add(l, r):
        merges.append((l, r, len(vocab)))
        vocab.append(vocab[l] + vocab[r])
        return len(vocab) - 1

    assert n_vocab >= 261, "256 bytes + Q:, A:, Do, Do: + <|endoftext|>"
    ids = {}
    ids["q"] = add(ord("Q"), ord(":"))
    ids["a"] = add(ord("A"), ord(":"))
    do = add(ord("D"), ord("o"))
    ids["do"] = add(do, ord(":"))
    k = 0
    while len(vocab) < n_vocab - 1:
        add(ord("a") + k % 26, ord("a") + (k // 26) % 26)
        k += 1
    eos = len(vocab)
    vocab.append(b"<|endoftext|>")
    return dict(vocab_bytes=vocab, merges=merges, special_ids=[eos]), ids, eos


def quantize_rows(w):
    """Spec 4.6 converter quantization, per output row, in float32."""
    w = np.asarray(w, np.float32)
    amax = np.abs(w).max(axis=1)
    s = (amax / F32(127)).astype(np.float32)
    safe = np.where(s == 0, F32(1), s)
    q = np.clip(np.rint(w / safe[:, None]), -127, 127).astype(np.int8)
    q[s == 0] = 0
    return q, s


def random_model(E=8, H=2, L=2, I=12, V=264, P=8, act=0, seed=0):
    rng = np.random.default_rng(seed)
    tok, ids, eos = byte_tokenizer(V)
    hp = dict(n_vocab=V, n_positions=P, n_embd=E, n_layer=L, n_head=H, n_inner=I,
              activation=act, layer_norm_epsilon=1e-5, eos_id=eos, bos_id=eos,
              q_id=ids["q"], a_id=ids["a"], do_id=ids["do"])

    def f(*shape, sc=1.0, off=0.0):
        return (off + sc * rng.standard_normal(shape)).astype(np.float32)

    t = {}
    t["wte_q"], t["wte_s"] = quantize_rows(f(V, E, sc=0.5))
    t["wpe"] = f(P, E, sc=0.3)
    for l in range(L):
        p = "h.%d." % l
        t[p + "ln1_g"], t[p + "ln1_b"] = f(E, sc=0.2, off=1), f(E, sc=0.1)
        t[p + "attn_w"], t[p + "attn_s"] = quantize_rows(f(3 * E, E, sc=0.5))
        t[p + "attn_b"] = f(3 * E, sc=0.1)
        t[p + "proj_w"], t[p + "proj_s"] = quantize_rows(f(E, E, sc=0.3))
        t[p + "proj_b"] = f(E, sc=0.1)
        t[p + "ln2_g"], t[p + "ln2_b"] = f(E, sc=0.2, off=1), f(E, sc=0.1)
        t[p + "fc_w"], t[p + "fc_s"] = quantize_rows(f(I, E, sc=0.5))
        t[p + "fc_b"] = f(I, sc=0.1)
        t[p + "mproj_w"], t[p + "mproj_s"] = quantize_rows(f(E, I, sc=0.3))
        t[p + "mproj_b"] = f(E, sc=0.1)
    t["lnf_g"], t["lnf_b"] = f(E, sc=0.2, off=1), f(E, sc=0.1)
    return hp, t, tok


@pytest.fixture(scope="module")
def small():
    hp, t, tok = random_model()
    return hp, t, tok, make_model_bytes(hp, t, tok)


# ============================================================================================
# constants and helper arithmetic
# ============================================================================================

# Bits gcc gives the literals (`1.44269502f`, `1.0f/5040.0f`, ...), recorded once.
C_BITS = {
    "12582912.0": 0x4b400000, "1.44269502": 0x3fb8aa3b, "0.693145752": 0x3f317200,
    "1.42860677e-06": 0x35bfbe8e, "1/5040": 0x39500d01, "1/720": 0x3ab60b61,
    "1/120": 0x3c088889, "1/24": 0x3d2aaaab, "1/6": 0x3e2aaaab, "0.3275911": 0x3ea7ba05,
    "0.254829592": 0x3e827906, "-0.284496736": 0xbe91a98e, "1.421413741": 0x3fb5f0e3,
    "-1.453152027": 0xbfba00e3, "1.061405429": 0x3f87dc22, "0.797884583": 0x3f4c422a,
    "0.044715": 0x3d372713, "0.707106769": 0x3f3504f3,
}


def test_constants_match_c_compiler_bits():
    got = {k: bits(v) for k, v in ref.CONSTANTS.items()}
    assert got == C_BITS


def test_f32_decimal_avoids_double_rounding():
    # 1 + 2**-24 + 1e-30: decimal -> double gives exactly the f32 midpoint 1 + 2**-24, which then
    # ties to even (1.0); the correctly rounded f32 (what gcc gives, 0x3f800001) is above it.
    s = "1.000000059604644775390625000001"
    assert bits(np.float32(float(s))) == 0x3f800000
    assert bits(ref.f32_decimal(s)) == 0x3f800001
    assert bits(ref.f32_decimal("0.1")) == 0x3dcccccd


def test_rne_is_round_half_even():
    rng = np.random.default_rng(1)
    halves = (np.arange(-4096, 4096) + F32(0.5)).astype(np.float32)
    rnd = (rng.uniform(-4e6, 4e6, 200000)).astype(np.float32)
    small_ = rng.uniform(-3, 3, 200000).astype(np.float32)
    near = (np.arange(-300, 300).astype(np.float32)[:, None]
            + np.array([-0.5, 0.5, 0.49999997, -0.49999997, 0.50000006], np.float32)).ravel()
    pow2 = (F32(2) ** np.arange(21, dtype=np.float32) + F32(0.5)).astype(np.float32)
    for x in (halves, rnd, small_, near, pow2, -pow2):
        x = x.astype(np.float32)
        got = ref.rne(x)
        assert got.dtype == np.float32
        want = np.rint(x)
        bad = np.nonzero(got != want)[0]
        assert bad.size == 0, "rne(%r) = %r, rint %r" % (x[bad[0]], got[bad[0]], want[bad[0]])
    assert list(ref.rne(np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5], np.float32))) == \
        [0, 2, 2, 0, -2, -2]


def test_exp32_accuracy():
    x = np.concatenate([np.linspace(-87, 88, 2_000_001, dtype=np.float32),
                        np.random.default_rng(2).uniform(-87, 88, 500_000).astype(np.float32),
                        np.array([-87, 88, 0, -0.0, 1e-30, -1e-30], np.float32)])
    y = ref.exp32(x)
    assert y.dtype == np.float32
    ex = np.exp(x.astype(np.float64))
    rel = np.abs(y.astype(np.float64) - ex) / ex
    i = int(np.argmax(rel))
    assert rel.max() < 3e-7, "exp32 max rel err %.3g at x=%r" % (rel.max(), x[i])
    assert ref.exp32(F32(0)) == 1.0
    # saturation: below -87 -> 0, above 88 -> exp32(88)
    z = ref.exp32(np.array([-87.0001, -100, -np.inf, 88.5, 1000, np.inf], np.float32))
    assert list(z[:3]) == [0, 0, 0]
    assert np.all(z[3:] == ref.exp32(F32(88)))
    assert np.isfinite(z).all()


def test_tanh32_accuracy():
    u = np.concatenate([np.linspace(-12, 12, 1_000_001, dtype=np.float32),
                        np.float32(10.0) ** np.linspace(-8, 1, 10001, dtype=np.float32)])
    y = ref.tanh32(u)
    err = np.abs(y.astype(np.float64) - np.tanh(u.astype(np.float64)))
    # observed 1.78e-7 (near |u| ~ 4.3: 2/(e+1) is close to 2, whose ulp is 2.4e-7)
    assert err.max() < 2.5e-7, "tanh32 max abs err %.3g at u=%r" % (err.max(), u[np.argmax(err)])


def test_erf32_accuracy():
    z = np.linspace(-6, 6, 1_000_001, dtype=np.float32)
    y = ref.erf32(z)
    ex = np.array([math.erf(v) for v in z.astype(np.float64)])
    err = np.abs(y.astype(np.float64) - ex)
    # A&S 7.1.26 itself has |error| < 1.5e-7; evaluated in float32 the Horner sum (terms ~1.4)
    # and the cancellation in 1 - k*e (k*e ~ 1 for small |z|) add a few ulp of 1.
    # Observed: 5.7e-7 at z ~ -0.047; 1.7e-7 for |z| >= 2.
    msg = "erf32 max abs err %.3g at z=%r" % (err.max(), z[np.argmax(err)])
    assert err.max() < 7e-7, msg
    assert err[np.abs(z) >= 2].max() < 2.5e-7, msg
    assert np.array_equal(ref.erf32(-z), -ref.erf32(z))


def _gelu_exact(x, act):
    x = x.astype(np.float64)
    if act == 0:
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    return np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x])


@pytest.mark.parametrize("act", [0, 1])
def test_gelu_accuracy(act):
    x = np.linspace(-12, 12, 240_001, dtype=np.float32)
    y = ref.gelu(x, act)
    assert y.dtype == np.float32
    err = np.abs(y.astype(np.float64) - _gelu_exact(x, act))
    rel = err / np.maximum(np.abs(_gelu_exact(x, act)), 1e-3)
    msg = "gelu act=%d max abs err %.3g at x=%r, max rel err (|y|>1e-3) %.3g" % (
        act, err.max(), x[np.argmax(err)], rel.max())
    # observed over [-12, 12]: act 0 (gelu_new) 4.3e-7 at x ~ 4.7, act 1 (gelu) 4.6e-7 at x ~ 3.05
    # (a few ulp of y: for large |x| the result is ~x and its ulp is 2.4e-7 .. 9.5e-7)
    assert err.max() < 6e-7, msg
    mid = np.abs(x) < 2
    assert err[mid].max() < 3e-7, msg
    # also the string spellings of the activation
    assert np.array_equal(ref.gelu(x, "gelu_new" if act == 0 else "gelu"), y)


def test_quant_properties():
    rng = np.random.default_rng(3)
    v = (rng.standard_normal((500, 37)) * rng.uniform(1e-3, 1e3, (500, 1))).astype(np.float32)
    q, s = ref.quant(v)
    assert q.dtype == np.int8 and s.dtype == np.float32 and s.shape == (500,)
    assert q.min() >= -127 and q.max() <= 127
    am = np.argmax(np.abs(v), axis=1)
    assert np.all(np.abs(q[np.arange(500), am]) == 127)
    assert np.all(np.sign(q[np.arange(500), am]) == np.sign(v[np.arange(500), am]))
    # reconstruction within half a step
    assert np.all(np.abs(q * s[:, None].astype(np.float64) - v) <= s[:, None] * 0.5 * 1.0001)
    # zero vector, -0, NaN handling, ±inf
    q0, s0 = ref.quant(np.zeros(5, np.float32))
    assert s0 == 0 and not q0.any()
    q0, s0 = ref.quant(np.array([-0.0, 0.0, np.nan], np.float32))
    assert s0 == 0 and not q0.any()
    qn, sn = ref.quant(np.array([np.nan, 2.0, -1.0, np.nan], np.float32))
    assert list(qn) == [0, 127, -64, 0] and sn == F32(2) / F32(127)   # -63.5 ties to even
    qi, si = ref.quant(np.array([np.inf, 1.0, -np.inf], np.float32))
    assert qi.min() >= -127 and qi.max() <= 127
    # spec: s = amax / 127 and inv = 127 / amax, t = v * inv (not v / s)
    x = np.array([3.0, 1.0, -0.1], np.float32)
    q, s = ref.quant(x)
    inv = F32(127) / F32(3)
    assert s == F32(3) / F32(127)
    assert list(q) == [int(np.rint(F32(v) * inv)) for v in x]


# --------------------------------------------------------------------------------------------
# scalar loop transcriptions of the spec (test oracles for the vectorised code)
# --------------------------------------------------------------------------------------------

def s_layernorm(x, g, b, eps):
    n = F32(len(x))
    acc = F32(0)
    for v in x:
        acc = F32(acc + v)
    mean = F32(acc / n)
    d = [F32(v - mean) for v in x]
    acc = F32(0)
    for v in d:
        acc = F32(acc + F32(v * v))
    var = F32(acc / n)
    inv = F32(F32(1) / np.sqrt(F32(var + F32(eps))))
    return np.array([F32(F32(F32(d[i] * inv) * g[i]) + b[i]) for i in range(len(x))], np.float32)


def s_quant(v):
    amax = F32(0)
    for x in v:
        if abs(x) > amax:
            amax = F32(abs(x))
    if amax == 0:
        return np.zeros(len(v), np.int8), F32(0)
    s = F32(amax / F32(127))
    inv = F32(F32(127) / amax)
    q = []
    for x in v:
        t = F32(x * inv)
        if np.isnan(t):
            t = F32(0)
        t = min(max(t, F32(-127)), F32(127))
        q.append(int(F32(F32(t + F32(12582912.0)) - F32(12582912.0))))
    return np.array(q, np.int8), s


def s_linear(q, sx, W, sw, b):
    out = []
    for o in range(W.shape[0]):
        acc = 0
        for i in range(len(q)):
            acc += int(q[i]) * int(W[o, i])
        y = F32(F32(acc) * F32(sx * sw[o]))
        out.append(y if b is None else F32(y + b[o]))
    return np.array(out, np.float32)


def s_forward(mf, tokens):
    """Section 4.5 literally, one token at a time, scalar loops (exp32/gelu are elementwise)."""
    hp, t = mf.hparams, mf.tensors
    E, H, L = hp["n_embd"], hp["n_head"], hp["n_layer"]
    D = E // H
    eps = hp["layer_norm_epsilon"]
    K8, V8, sK, sV = ({} for _ in range(4))
    isd = F32(F32(1) / np.sqrt(F32(D)))
    logits_all = []
    for pos, tok in enumerate(tokens):
        h = [F32(F32(F32(int(t["wte_q"][tok, i])) * t["wte_s"][tok]) + t["wpe"][pos, i])
             for i in range(E)]
        for l in range(L):
            p = "h.%d." % l
            xq, xs = s_quant(s_layernorm(h, t[p + "ln1_g"], t[p + "ln1_b"], eps))
            qkv = s_linear(xq, xs, t[p + "attn_w"], t[p + "attn_s"], t[p + "attn_b"])
            out = [F32(0)] * E
            for hd in range(H):
                c = hd * D
                K8[l, pos, hd], sK[l, pos, hd] = s_quant(qkv[E + c:E + c + D])
                V8[l, pos, hd], sV[l, pos, hd] = s_quant(qkv[2 * E + c:2 * E + c + D])
                q8, sq = s_quant(qkv[c:c + D])
                score = []
                for pp in range(pos + 1):
                    acc = sum(int(q8[j]) * int(K8[l, pp, hd][j]) for j in range(D))
                    score.append(F32(F32(F32(acc) * F32(sq * sK[l, pp, hd])) * isd))
                m = score[0]
                for sc in score:
                    if sc > m:
                        m = sc
                e = [F32(ref.exp32(F32(sc - m))) for sc in score]
                tot = F32(0)
                for v in e:
                    tot = F32(tot + v)
                inv = F32(F32(1) / tot)
                w = [F32(F32(e[pp] * inv) * sV[l, pp, hd]) for pp in range(pos + 1)]
                for j in range(D):
                    acc = F32(0)
                    for pp in range(pos + 1):
                        acc = F32(acc + F32(w[pp] * F32(int(V8[l, pp, hd][j]))))
                    out[c + j] = acc
            aq, as_ = s_quant(out)
            y = s_linear(aq, as_, t[p + "proj_w"], t[p + "proj_s"], t[p + "proj_b"])
            h = [F32(h[i] + y[i]) for i in range(E)]
            xq, xs = s_quant(s_layernorm(h, t[p + "ln2_g"], t[p + "ln2_b"], eps))
            f = s_linear(xq, xs, t[p + "fc_w"], t[p + "fc_s"], t[p + "fc_b"])
            gq, gs = s_quant([F32(ref.gelu(F32(v), hp["activation"])) for v in f])
            y = s_linear(gq, gs, t[p + "mproj_w"], t[p + "mproj_s"], t[p + "mproj_b"])
            h = [F32(h[i] + y[i]) for i in range(E)]
        xq, xs = s_quant(s_layernorm(h, t["lnf_g"], t["lnf_b"], eps))
        logits_all.append(s_linear(xq, xs, t["wte_q"], t["wte_s"], None))
    return np.array(logits_all, np.float32)


def test_layernorm_quant_linear_match_scalar_spec():
    rng = np.random.default_rng(4)
    for n in (1, 2, 7, 64, 300):
        x = (rng.standard_normal((4, n)) * 10 + 3).astype(np.float32)
        g = rng.standard_normal(n).astype(np.float32)
        b = rng.standard_normal(n).astype(np.float32)
        y = ref.layernorm(x, g, b, F32(1e-5))
        for r in range(4):
            assert np.array_equal(y[r].view(np.uint32),
                                  s_layernorm(x[r], g, b, F32(1e-5)).view(np.uint32))
            q, s = ref.quant(x[r])
            q2, s2 = s_quant(x[r])
            assert np.array_equal(q, q2) and bits(s) == bits(s2)
    q = rng.integers(-127, 128, (3, 50)).astype(np.int8)
    W = rng.integers(-127, 128, (20, 50)).astype(np.int8)
    sx = rng.uniform(0, 1, 3).astype(np.float32)
    sw = rng.uniform(0, 1, 20).astype(np.float32)
    b = rng.standard_normal(20).astype(np.float32)
    y = ref.linear(q, sx, W, sw, b)
    for r in range(3):
        assert np.array_equal(y[r].view(np.uint32), s_linear(q[r], sx[r], W, sw, b).view(np.uint32))


def test_int_matmul_exact_long_rows():
    rng = np.random.default_rng(5)
    for n in (1, 1024, 1025, 5000):
        a = rng.choice(np.array([-127, 127], np.int8), (3, n))
        w = rng.integers(-127, 128, (7, n)).astype(np.int8)
        w[0] = 127
        w[1] = a[0]          # maximal positive sum 127*127*n
        want = a.astype(np.int64) @ w.astype(np.int64).T
        assert np.array_equal(ref.int_matmul(a, w), want)


def test_layernorm_sum_is_sequential():
    # pairwise (np.sum) and sequential float32 sums of this vector differ; the spec wants
    # sequential: 1e8 + 1 + 1 + ... stays 1e8 in float32 when added one at a time.
    x = np.array([1e8] + [1.0] * 15 + [-1e8], np.float32)
    seq = ref.seqsum(x)
    assert seq == 0.0
    assert bits(seq) == 0          # +0, like a loop that starts at +0
    assert bits(ref.seqsum(np.array([-0.0, -0.0], np.float32))) == 0


# --------------------------------------------------------------------------------------------
# the helpers against a C transcription compiled with -ffp-contract=off
# --------------------------------------------------------------------------------------------

C_SRC = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>
static float rne(float v) { return (v + 12582912.0f) - 12582912.0f; }
static float exp32(float x) {
    if (x < -87.0f) return 0.0f;
    if (x > 88.0f) x = 88.0f;
    float n = rne(x * 1.44269502f);
    float r = (x - n * 0.693145752f) - n * 1.42860677e-06f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f; p = p * r + 1.0f / 120.0f; p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f; p = p * r + 0.5f; p = p * r + 1.0f; p = p * r + 1.0f;
    uint32_t b = (uint32_t)((int32_t)n + 127) << 23; float s; memcpy(&s, &b, 4);
    return p * s;
}
static float tanh32(float u) {
    if (u < -9.0f) u = -9.0f;
    if (u > 9.0f) u = 9.0f;
    return 1.0f - 2.0f / (exp32(2.0f * u) + 1.0f);
}
static float erf32(float z) {
    float a = fabsf(z);
    float t = 1.0f / (1.0f + 0.3275911f * a);
    float k = t * 1.061405429f; k = k + -1.453152027f; k = k * t; k = k + 1.421413741f;
    k = k * t; k = k + -0.284496736f; k = k * t; k = k + 0.254829592f; k = k * t;
    float e = exp32(-(a * a));
    float y = 1.0f - k * e;
    return z < 0.0f ? -y : y;
}
static float gelu(float x, int act) {
    if (act == 0) {
        float x3 = (x * x) * x;
        float u = 0.797884583f * (x + 0.044715f * x3);
        return (0.5f * x) * (1.0f + tanh32(u));
    }
    return (0.5f * x) * (1.0f + erf32(x * 0.707106769f));
}
void run(int fn, const float *x, float *y, int n) {
    for (int i = 0; i < n; i++) {
        float v = x[i];
        y[i] = fn == 0 ? exp32(v) : fn == 1 ? tanh32(v) : fn == 2 ? erf32(v)
             : fn == 3 ? gelu(v, 0) : fn == 4 ? gelu(v, 1) : rne(v);
    }
}
void layernorm(const float *x, const float *g, const float *b, float eps, float *y, int n) {
    float s = 0.0f;
    for (int i = 0; i < n; i++) s += x[i];
    float mean = s / (float)n;
    s = 0.0f;
    for (int i = 0; i < n; i++) { float d = x[i] - mean; s += d * d; }
    float var = s / (float)n;
    float inv = 1.0f / sqrtf(var + eps);
    for (int i = 0; i < n; i++) y[i] = ((x[i] - mean) * inv) * g[i] + b[i];
}
float quant(const float *v, int8_t *q, int n) {
    float amax = 0.0f;
    for (int i = 0; i < n; i++) if (fabsf(v[i]) > amax) amax = fabsf(v[i]);
    if (amax == 0.0f) { memset(q, 0, n); return 0.0f; }
    float s = amax / 127.0f, inv = 127.0f / amax;
    for (int i = 0; i < n; i++) {
        float t = v[i] * inv;
        if (t != t) t = 0.0f;
        if (t > 127.0f) t = 127.0f;
        if (t < -127.0f) t = -127.0f;
        q[i] = (int8_t)rne(t);
    }
    return s;
}
"""


@pytest.fixture(scope="module")
def clib(tmp_path_factory):
    cc = shutil.which("gcc") or shutil.which("cc")
    if not cc:
        pytest.skip("no C compiler")
    d = tmp_path_factory.mktemp("cref")
    (d / "h.c").write_text(C_SRC)
    so = d / "h.so"
    subprocess.run([cc, "-O2", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC",
                    str(d / "h.c"), "-o", str(so), "-lm"], check=True)
    lib = ctypes.CDLL(str(so))
    lib.quant.restype = ctypes.c_float
    return lib


def _ptr(a):
    return a.ctypes.data_as(ctypes.c_void_p)


def test_helpers_bit_identical_to_c(clib):
    rng = np.random.default_rng(6)
    x = np.concatenate([
        np.linspace(-100, 100, 400_001, dtype=np.float32),
        rng.standard_normal(200_000).astype(np.float32) * 3,
        (rng.standard_normal(100_000) * 1e-4).astype(np.float32),
        np.array([0, -0.0, -87, -87.00001, 88, 88.00001, 9, -9, 1e30, -1e30, 1e-40, 4e6],
                 np.float32)])
    y = np.empty_like(x)
    fns = [("exp32", ref.exp32), ("tanh32", ref.tanh32), ("erf32", ref.erf32),
           ("gelu0", lambda v: ref.gelu(v, 0)), ("gelu1", lambda v: ref.gelu(v, 1)),
           ("rne", ref.rne)]
    for k, (name, fn) in enumerate(fns):
        xs = x if name != "rne" else x[np.abs(x) < 2 ** 22]
        xs = np.ascontiguousarray(xs)
        y = np.empty_like(xs)
        clib.run(k, _ptr(xs), _ptr(y), len(xs))
        with np.errstate(all="ignore"):
            got = fn(xs)
        diff = np.nonzero(got.view(np.uint32) != y.view(np.uint32))[0]
        assert diff.size == 0, "%s differs from C at x=%r: %r vs %r" % (
            name, xs[diff[0]], got[diff[0]], y[diff[0]])


def test_layernorm_quant_bit_identical_to_c(clib):
    rng = np.random.default_rng(7)
    for n in (1, 3, 64, 768, 3072):
        x = (rng.standard_normal((5, n)) * rng.uniform(0.01, 100) + rng.uniform(-5, 5))
        x = x.astype(np.float32)
        g = rng.standard_normal(n).astype(np.float32)
        b = rng.standard_normal(n).astype(np.float32)
        y = ref.layernorm(x, g, b, F32(1e-5))
        q, s = ref.quant(y)
        for r in range(5):
            yc = np.empty(n, np.float32)
            xr = np.ascontiguousarray(x[r])
            clib.layernorm(_ptr(xr), _ptr(g), _ptr(b), ctypes.c_float(1e-5), _ptr(yc), n)
            assert np.array_equal(y[r].view(np.uint32), yc.view(np.uint32)), n
            qc = np.empty(n, np.int8)
            sc = clib.quant(_ptr(yc), _ptr(qc), n)
            assert np.array_equal(q[r], qc) and bits(s[r]) == bits(F32(sc)), n


# ============================================================================================
# file format
# ============================================================================================

def test_parse_round_trip(small):
    hp, t, tok, buf = small
    mf = ref.parse_model(buf)
    for k, v in hp.items():
        assert mf.hparams[k] == (F32(v) if k == "layer_norm_epsilon" else v), k
    assert set(mf.hparams) == set(ref.HPARAM_KEYS)
    assert set(mf.tensors) == set(t)
    for k, v in t.items():
        assert mf.tensors[k].dtype == v.dtype and mf.tensors[k].shape == v.shape, k
        assert np.array_equal(mf.tensors[k], v), k
    assert mf.tokenizer.vocab_bytes == tok["vocab_bytes"]
    assert mf.tokenizer.merges == [tuple(m) for m in tok["merges"]]
    assert mf.tokenizer.special_ids == tok["special_ids"]
    assert mf.tokenizer_section == make_tokenizer_section(
        tok["vocab_bytes"], tok["merges"], tok["special_ids"])
    assert mf.tokenizer.decode([mf.hparams["q_id"], ord(" ")]) == b"Q: "
    # a memoryview, a buffer longer than file_size, and a directory further out also parse
    ref.parse_model(memoryview(buf))
    ref.parse_model(buf + b"\xff" * 100)
    buf2 = make_model_bytes(hp, t, tok, dir_offset=256)
    mf2 = ref.parse_model(buf2)
    assert all(np.array_equal(mf2.tensors[k], v) for k, v in t.items())
    # the spec packs the tensors: a gap between them, or bytes after the last one inside
    # file_size, is an error (the engine refuses both, so a sparse file is caught early)
    _raises(make_model_bytes(hp, t, tok, gap=48), "leaves a gap")
    tail = bytearray(buf + b"\0" * 16)
    struct.pack_into("<I", tail, 12, len(tail))
    _raises(bytes(refix_crc(tail)), "not the end of the last tensor")


def test_load(tmp_path, small):
    p = tmp_path / "m.tgpt"
    p.write_bytes(small[3])
    assert ref.load(p).hparams["n_embd"] == 8


def _u32(buf, off, val, crc=True):
    b = bytearray(buf)
    struct.pack_into("<I", b, off, val)
    return bytes(refix_crc(b) if crc else b)


def _raises(buf, match, **kw):
    with pytest.raises(FormatError, match=match):
        ref.parse_model(buf, **kw)


HEADER_CASES = [
    (dict(magic=b"TGPX"), "magic"),
    (dict(format_version=4), "format_version 4"),
    (dict(format_version=0), "format_version"),
    (dict(header_size=64), "header_size 64"),
    (dict(quant_scheme=2), "quant_scheme"),
    (dict(n_vocab=0), "n_vocab 0"),
    (dict(n_vocab=65537), "n_vocab 65537"),
    (dict(n_positions=0), "n_positions"),
    (dict(n_positions=70000), "n_positions"),
    (dict(n_embd=0), "n_embd"),
    (dict(n_embd=65537), "n_embd"),
    (dict(n_head=3), "divisible"),
    (dict(n_head=0), "n_head"),
    (dict(n_head=16), "n_head"),
    (dict(n_layer=0), "n_layer"),
    (dict(n_layer=1025), "n_layer"),
    (dict(n_inner=0), "n_inner"),
    (dict(n_inner=65537), "n_inner"),
    (dict(activation=2), "activation"),
    (dict(layer_norm_epsilon=0.0), "layer_norm_epsilon"),
    (dict(layer_norm_epsilon=-1e-5), "layer_norm_epsilon"),
    (dict(layer_norm_epsilon=float("nan")), "layer_norm_epsilon"),
    (dict(layer_norm_epsilon=float("inf")), "layer_norm_epsilon"),
    (dict(eos_id=264), "eos_id 264 >= n_vocab 264"),
    (dict(bos_id=1000), "bos_id"),
    (dict(q_id=264), "q_id"),
    (dict(a_id=0xFFFFFFFE), "a_id"),
    (dict(do_id=999), "do_id"),
    (dict(n_tensors=37), "n_tensors"),
    (dict(dir_offset=136), "dir_offset"),
    (dict(dir_offset=112), "dir_offset"),
    (dict(flags=1), "flags"),
    (dict(reserved=b"\0" * 39 + b"\1"), "reserved"),
    (dict(file_size=100), "file_size"),
]


@pytest.mark.parametrize("ov,match", HEADER_CASES, ids=[m + str(i) for i, (o, m) in
                                                         enumerate(HEADER_CASES)])
def test_header_rules(small, ov, match):
    hp, t, tok, _ = small
    buf = make_model_bytes(hp, t, tok, header_overrides=ov)
    _raises(buf, match)


def test_optional_ids_may_be_absent(small):
    hp, t, tok, _ = small
    buf = make_model_bytes(hp, t, tok, header_overrides=dict(q_id=0xFFFFFFFF, a_id=0xFFFFFFFF,
                                                             do_id=0xFFFFFFFF))
    mf = ref.parse_model(buf)
    assert mf.hparams["q_id"] == 0xFFFFFFFF


def test_file_size_and_crc(small):
    hp, t, tok, buf = small
    fs = len(buf)
    _raises(_u32(buf, 12, fs + 16), "file_size %d is larger than the buffer" % (fs + 16))
    # any flipped byte after the crc field is caught
    for off in (20, 24, 52, 100, 128 + 5, fs // 2, fs - 1):
        b = bytearray(buf)
        b[off] ^= 0x40
        _raises(bytes(b), "crc32 mismatch")
    b = bytearray(buf)
    b[16] ^= 1
    _raises(bytes(b), "crc32")
    # check_crc=False skips only the crc
    ref.parse_model(bytes(b), check_crc=False)


def test_truncated(small):
    hp, t, tok, buf = small
    for n in (0, 3, 4, 20, 127):
        _raises(buf[:n], "shorter than the 128-byte header")
    for n in (128, 129, 200, 128 + 16 * 38, len(buf) // 2, len(buf) - 1):
        _raises(buf[:n], "file_size %d is larger than the buffer \\(%d bytes\\)" % (len(buf), n))
    # truncated and file_size rewritten to match (crc fixed): the tensors no longer fit
    for n in (128 + 16 * 38, len(buf) // 2, len(buf) - 4):
        b = bytearray(buf[:n])
        struct.pack_into("<I", b, 12, n)
        refix_crc(b)
        _raises(bytes(b), "runs past file_size")
    b = bytearray(buf[:128 + 16 * 10])
    struct.pack_into("<I", b, 12, len(b))
    _raises(bytes(refix_crc(b)), "directory")


def _entry(i):
    return 128 + 16 * i


def test_directory_rules(small):
    hp, t, tok, buf = small
    mf = ref.parse_model(buf)
    d = mf.directory
    # wrong id (layer 1's ln1_g in layer 0's slot)
    _raises(_u32(buf, _entry(3), 16 + 256), "tensor 3 'h.0.ln1_g': tensor_id 272")
    _raises(_u32(buf, _entry(0), 2), "tensor 0 'wte_q': tensor_id 2")
    # wrong dtype
    _raises(_u32(buf, _entry(1) + 4, 1), "tensor 1 'wte_s': dtype 1 != expected 2")
    _raises(_u32(buf, _entry(len(d) - 1) + 4, 1), "'tokenizer': dtype 1")
    # misaligned offset
    _raises(_u32(buf, _entry(5) + 8, d[5].offset + 4), "offset %d is not a multiple of 16"
            % (d[5].offset + 4))
    # overlap with the previous tensor, with the directory
    _raises(_u32(buf, _entry(5) + 8, d[4].offset), "overlaps tensor 'h.0.ln1_b'")
    _raises(_u32(buf, _entry(0) + 8, 128), "overlaps the tensor directory")
    # wrong nbytes
    _raises(_u32(buf, _entry(13) + 12, 100), r"tensor 13 'h.0.fc_w': nbytes 100 != expected 96")
    _raises(_u32(buf, _entry(2) + 12, d[2].nbytes + 4), "'wpe': nbytes")
    # tensor past file_size: last tensor pushed out
    _raises(_u32(buf, _entry(len(d) - 1) + 8, pad(len(buf), 16)), "runs past file_size")


def test_value_rules(small):
    hp, t, tok, _ = small
    for name, idx, val, match in [
            ("h.1.fc_s", 3, np.nan, "tensor 30 'h.1.fc_s': value 3 is not finite"),
            ("wte_s", 0, np.inf, "'wte_s': value 0 is not finite"),
            ("wpe", (2, 3), -np.inf, "'wpe': value 19 is not finite"),
            ("h.0.ln2_b", 1, np.nan, "'h.0.ln2_b': value 1 is not finite"),
            ("lnf_g", 0, np.nan, "'lnf_g'"),
            ("h.0.attn_s", 5, -1e-3, "'h.0.attn_s': scale 5 is negative"),
            ("h.1.mproj_s", 0, -1.0, "'h.1.mproj_s': scale 0 is negative"),
            ("wte_s", 7, -2.0, "'wte_s': scale 7 is negative")]:
        t2 = {k: v.copy() for k, v in t.items()}
        t2[name][idx] = val
        _raises(make_model_bytes(hp, t2, tok), match)
    # a negative bias or gain is fine; -0.0 scale is >= 0
    t2 = {k: v.copy() for k, v in t.items()}
    t2["h.0.attn_b"][0] = -5
    t2["lnf_g"][1] = -1
    t2["h.0.proj_s"][0] = -0.0
    ref.parse_model(make_model_bytes(hp, t2, tok))


def _tok_case(small, match, vocab=None, merges=None, special=None, **ov):
    hp, t, tok, _ = small
    vocab = list(tok["vocab_bytes"]) if vocab is None else vocab
    merges = list(tok["merges"]) if merges is None else merges
    special = list(tok["special_ids"]) if special is None else special
    sec = make_tokenizer_section(vocab, merges, special, **ov)
    _raises(make_model_bytes(hp, t, tok, tok_section=sec), match)


def test_tokenizer_rules(small):
    hp, t, tok, _ = small
    V = hp["n_vocab"]
    voc = tok["vocab_bytes"]
    eos = tok["special_ids"][0]
    _tok_case(small, "tokenizer: bad magic", magic=b"TTOX")
    _tok_case(small, "tokenizer: version 3", version=3)
    _tok_case(small, "tokenizer: n_vocab 265 != header n_vocab 264", n_vocab=V + 1)
    _tok_case(small, "tokenizer: n_vocab 263 != header n_vocab 264",
              vocab=voc[:-1], special=[])
    _tok_case(small, "pretokenizer 2", pretokenizer=2)
    _tok_case(small, "reserved", reserved=7)
    _tok_case(small, "nbytes .* != expected", extra=b"\0" * 4)
    _tok_case(small, "nbytes .* != expected", n_special=2)
    _tok_case(small, "nbytes .* != expected", bytes_size=len(b"".join(voc)) + 5)
    off = [0]
    for b in voc:
        off.append(off[-1] + len(b))
    _tok_case(small, r"tok_off\[0\] = 1", tok_off=[1] + off[1:])
    o2 = list(off)
    o2[100] = o2[102]
    _tok_case(small, "tok_off decreases at token 100", tok_off=o2)
    _tok_case(small, r"tok_off\[n_vocab\] = %d != bytes_size" % (off[-1] - 1),
              tok_off=off[:-1] + [off[-1] - 1])
    # merges
    m = list(tok["merges"])
    m[2] = (m[2][0], V, m[2][2])
    _tok_case(small, "merge 2 .* has an id >= n_vocab", merges=m)
    m = list(tok["merges"])
    m[0] = (ord("Q"), ord(";"), m[0][2])
    _tok_case(small, r"merge 0 \(81, 59 -> 256\): bytes b'Q:' != b'Q' \+ b';'", merges=m)
    # byte-level coverage
    v2 = list(voc)
    v2[0] = b"\0\0"
    _tok_case(small, "byte 0x00 is not the whole text of any token", vocab=v2)
    v2 = list(voc)
    v2[eos] = b"a"
    _tok_case(small, "byte 0x61 is the whole text of two tokens", vocab=v2)
    # specials
    _tok_case(small, "special id 264 >= n_vocab", special=[V])
    _tok_case(small, "special id %d appears twice" % eos, special=[eos, eos])
    v2 = list(voc)
    v2[eos] = b""
    _tok_case(small, "special token %d has empty bytes" % eos, vocab=v2)
    # tokenizer tensor shorter than its own header
    _raises(make_model_bytes(hp, t, tok, tok_section=b"TTOK" + b"\0" * 20),
            "shorter than its 32-byte header")


# ============================================================================================
# forward pass
# ============================================================================================

@pytest.mark.parametrize("act", [0, 1])
def test_forward_matches_scalar_spec(act):
    hp, t, tok = random_model(E=8, H=2, L=2, I=12, V=264, P=8, act=act, seed=10 + act)
    mf = ref.parse_model(make_model_bytes(hp, t, tok))
    toks = [5, 100, 257, 7, 7, 263]
    want = s_forward(mf, toks)
    got = ref.ReferenceModel(mf).forward(toks)
    assert got.dtype == np.float32 and got.shape == (6, 264)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_incremental_equals_prefill_bitwise():
    hp, t, tok = random_model(E=32, H=4, L=3, I=48, V=300, P=24, seed=3)
    mf = ref.parse_model(make_model_bytes(hp, t, tok))
    toks = list(np.random.default_rng(0).integers(0, 300, 24))
    a = ref.ReferenceModel(mf, trace=True)
    la = a.forward(toks)
    b = ref.ReferenceModel(mf, trace=True)
    lb = np.concatenate([b.forward([x]) for x in toks])
    c = ref.ReferenceModel(mf, trace=True)
    lc = np.concatenate([c.forward(toks[:5]), c.forward(toks[5:6]), c.forward(toks[6:])])
    assert a.pos == b.pos == c.pos == 24
    for other in (lb, lc):
        assert np.array_equal(la.view(np.uint32), other.view(np.uint32))
    for p in range(24):
        for key, va in a.trace[p].items():
            for m in (b, c):
                vb = m.trace[p][key]
                assert np.array_equal(np.atleast_1d(va).view(np.uint8),
                                      np.atleast_1d(vb).view(np.uint8)), (p, key)
    # the cache holds what the trace says was written
    for l in range(3):
        assert np.array_equal(a.K8[l, 7], a.trace[7]["h.%d.k8" % l])
        assert np.array_equal(a.sV[l, 7], a.trace[7]["h.%d.sv" % l])
    assert np.array_equal(a.trace[23]["logits"], la[23])
    keys = {"emb", "fq", "fs", "logits"} | {"h.%d.%s" % (l, k) for l in range(3) for k in (
        "xq1", "xs1", "qkv", "k8", "sk", "v8", "sv", "attn", "aq", "as", "xq2", "xs2", "fc",
        "gq", "gs", "h")}
    assert set(a.trace[0]) == keys
    for key, v in a.trace[5].items():       # no float64 anywhere
        assert v.dtype == (np.int8 if key.endswith(("q", "q1", "q2", "k8", "v8")) else
                           np.float32), key
    assert a.trace[5]["h.1.k8"].shape == (32,) and a.trace[5]["h.1.sk"].shape == (4,)
    assert a.trace[5]["h.1.fc"].shape == (48,) and a.trace[5]["h.1.xs1"].shape == ()
    # reset, context limit
    a.reset()
    assert a.pos == 0 and a.trace == {}
    assert np.array_equal(a.forward(toks[:3]).view(np.uint32), la[:3].view(np.uint32))
    with pytest.raises(ValueError):
        a.forward(toks)
    small_ctx = ref.ReferenceModel(mf, n_ctx=4)
    small_ctx.forward(toks[:4])
    with pytest.raises(ValueError):
        small_ctx.forward(toks[:1])
    with pytest.raises(ValueError):
        ref.ReferenceModel(mf).forward([300])


# --------------------------------------------------------------------------------------------
# float sanity against Hugging Face GPT-2
# --------------------------------------------------------------------------------------------

def _hf_model(activation, seed):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=300, n_positions=32, n_embd=64, n_layer=2, n_head=4, n_inner=96,
        activation_function=activation, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        layer_norm_epsilon=1e-5, initializer_range=0.1, attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(cfg).to(torch.float32).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():       # make biases and LayerNorms non-trivial too
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif ".ln_" in name or name.startswith("transformer.ln_f"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
    return torch, model


def _hf_to_file(model, activation):
    sd = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    cfg = model.config
    E, L = cfg.n_embd, cfg.n_layer
    tok, ids, eos = byte_tokenizer(cfg.vocab_size)
    hp = dict(n_vocab=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=E, n_layer=L,
              n_head=cfg.n_head, n_inner=cfg.n_inner, activation=0 if activation == "gelu_new"
              else 1, layer_norm_epsilon=cfg.layer_norm_epsilon, eos_id=eos, bos_id=eos,
              q_id=ids["q"], a_id=ids["a"], do_id=ids["do"])
    t = {}
    t["wte_q"], t["wte_s"] = quantize_rows(sd["transformer.wte.weight"])
    t["wpe"] = sd["transformer.wpe.weight"]
    for l in range(L):
        s, p = "transformer.h.%d." % l, "h.%d." % l
        t[p + "ln1_g"], t[p + "ln1_b"] = sd[s + "ln_1.weight"], sd[s + "ln_1.bias"]
        t[p + "ln2_g"], t[p + "ln2_b"] = sd[s + "ln_2.weight"], sd[s + "ln_2.bias"]
        for ours, theirs in (("attn", "attn.c_attn"), ("proj", "attn.c_proj"),
                             ("fc", "mlp.c_fc"), ("mproj", "mlp.c_proj")):
            # Conv1D weight is [n_in, n_out]: transpose to one row per output channel
            t[p + ours + "_w"], t[p + ours + "_s"] = quantize_rows(sd[s + theirs + ".weight"].T)
            t[p + ours + "_b"] = sd[s + theirs + ".bias"]
    t["lnf_g"], t["lnf_b"] = sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"]
    return make_model_bytes(hp, t, tok)


@pytest.mark.parametrize("activation", ["gelu_new", "gelu"])
def test_against_huggingface_float(activation):
    torch, model = _hf_model(activation, seed=1234)
    buf = _hf_to_file(model, activation)
    mf = ref.parse_model(buf)
    toks = [int(x) for x in np.random.default_rng(42).integers(0, 300, 32)]
    with torch.no_grad():
        hf = model(torch.tensor([toks])).logits[0].numpy().astype(np.float64)
    ours = ref.ReferenceModel(mf).forward(toks).astype(np.float64)
    cos = (ours * hf).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(hf, axis=1))
    top1 = float(np.mean(ours.argmax(1) == hf.argmax(1)))
    maxdiff = float(np.abs(ours - hf).max())
    msg = "%s: cosine min %.5f mean %.5f, top-1 agreement %.3f, max |dlogit| %.3g (logit std %.3g)" \
        % (activation, cos.min(), cos.mean(), top1, maxdiff, hf.std())
    print(msg)
    assert cos.min() >= 0.999, msg
    assert top1 >= 0.9, msg
