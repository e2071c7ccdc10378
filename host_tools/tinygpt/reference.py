"""Independent numpy reference for the tinygpt model file, format version 1.

Written from ``docs/model-format.md`` alone.  It has two halves:

* :func:`parse_model` / :func:`load`: read and validate a model file (sections 2, 3 and 6 of the
  spec) and expose its hyperparameters, tensors and tokenizer;
* the arithmetic of section 4 (:func:`rne`, :func:`exp32`, :func:`tanh32`, :func:`erf32`,
  :func:`gelu`, :func:`layernorm`, :func:`quant`, :func:`linear`) and the forward pass with an
  int8 KV cache (:class:`ReferenceModel`), which must be bit-identical to the C engine.

Bit-exactness rules followed here (spec section 4):

* every float value is a ``np.float32`` and every operation is a single numpy float32 ufunc
  (numpy never fuses a multiply and an add across two ufunc calls, and its float32
  add/sub/mul/div/sqrt are correctly rounded IEEE operations);
* every sequential sum ``Σ`` is ``np.cumsum(..., dtype=float32)`` along the summed axis (cumsum is
  strictly left to right), last element taken, then ``+ 0.0`` so that the result equals a loop
  that starts at +0 (only matters for the sign of an all-zero sum);
* constants are the correctly rounded f32 of the spec's decimal literals (:func:`f32_decimal`,
  exact rational arithmetic, no double rounding);
* the int32 dot products of int8 values are computed exactly: with float32 matrix products on
  blocks of at most 1024 terms (every partial sum is then an integer of magnitude
  <= 1024*127*127 < 2**24, so it is exact in float32 whatever order or FMA the BLAS uses), the
  block results summed in int64.  No float64 is used anywhere.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

__all__ = [
    "FormatError", "ModelFile", "Tokenizer", "parse_model", "load",
    "f32_decimal", "seqsum", "rne", "exp32", "tanh32", "erf32", "gelu", "layernorm", "quant",
    "linear", "int_matmul", "ReferenceModel", "TENSOR_KINDS", "tensor_layout",
]

F32 = np.float32


# --------------------------------------------------------------------------------------------
# constants
# --------------------------------------------------------------------------------------------

def f32_decimal(s: str) -> np.float32:
    """The binary32 value nearest to the decimal literal ``s`` (ties to even), computed exactly.

    This is what a C compiler makes of ``<s>f``.  (``np.float32(float(s))`` rounds twice,
    decimal -> binary64 -> binary32, and can be off by one ulp for rare literals.)
    """
    d = Fraction(s)
    c = np.float32(float(d))            # within one ulp of the answer
    best = None
    for cand in (np.nextafter(c, F32(-np.inf)), c, np.nextafter(c, F32(np.inf))):
        if not np.isfinite(cand):
            continue
        err = abs(Fraction(float(cand)) - d)
        if best is None or err < best[0] or (
                err == best[0] and (int(cand.view(np.uint32)) & 1) == 0):
            best = (err, cand)
    return F32(best[1])


def _c(s: str) -> np.float32:
    return f32_decimal(s)


_ZERO = F32(0.0)
_ONE = F32(1.0)
_TWO = F32(2.0)
_HALF = F32(0.5)
_RNE_MAGIC = _c("12582912.0")          # 1.5 * 2**23
_LOG2E = _c("1.44269502")
_LN2_HI = _c("0.693145752")
_LN2_LO = _c("1.42860677e-06")
_EXP_LO = _c("-87.0")
_EXP_HI = _c("88.0")
_INV_FACT = {k: F32(1.0) / F32(k) for k in (5040, 720, 120, 24, 6)}   # 1.0f/5040.0f etc.
_TANH_CLAMP = _c("9.0")
_ERF_P = _c("0.3275911")
_ERF_A1 = _c("0.254829592")
_ERF_A2 = _c("-0.284496736")
_ERF_A3 = _c("1.421413741")
_ERF_A4 = _c("-1.453152027")
_ERF_A5 = _c("1.061405429")
_GELU_C = _c("0.797884583")
_GELU_K = _c("0.044715")
_SQRT1_2 = _c("0.707106769")
_Q127 = _c("127.0")

#: the constants and the bits a C compiler gives them (checked by the tests)
CONSTANTS = {
    "12582912.0": _RNE_MAGIC, "1.44269502": _LOG2E, "0.693145752": _LN2_HI,
    "1.42860677e-06": _LN2_LO, "1/5040": _INV_FACT[5040], "1/720": _INV_FACT[720],
    "1/120": _INV_FACT[120], "1/24": _INV_FACT[24], "1/6": _INV_FACT[6],
    "0.3275911": _ERF_P, "0.254829592": _ERF_A1, "-0.284496736": _ERF_A2,
    "1.421413741": _ERF_A3, "-1.453152027": _ERF_A4, "1.061405429": _ERF_A5,
    "0.797884583": _GELU_C, "0.044715": _GELU_K, "0.707106769": _SQRT1_2,
}


# --------------------------------------------------------------------------------------------
# section 4.1 .. 4.4 helpers (vectorised, float32 only)
# --------------------------------------------------------------------------------------------

def _f32(x) -> np.ndarray:
    """float32 view of ``x``; Python numbers are converted, float64 arrays are refused."""
    if isinstance(x, (int, float)):
        return np.asarray(x, np.float32)
    a = np.asarray(x)
    if a.dtype != np.float32:
        if a.dtype.kind == "f" and a.dtype.itemsize > 4:
            raise TypeError("reference arithmetic takes float32 values, got %s" % a.dtype)
        a = a.astype(np.float32)
    return a


def seqsum(x, axis: int = -1) -> np.ndarray:
    """Sequential float32 sum ``s = 0; s += x[0]; s += x[1]; ...`` along ``axis``."""
    x = _f32(x)
    if x.shape[axis] == 0:
        return np.zeros(np.delete(np.array(x.shape), axis % x.ndim), np.float32)
    c = np.cumsum(x, axis=axis, dtype=np.float32)
    return np.take(c, -1, axis=axis) + _ZERO      # "+ 0": the loop starts at +0


def rne(v) -> np.ndarray:
    """Round to nearest integer, ties to even, for |v| < 2**22: ``(v + 1.5*2**23) - 1.5*2**23``."""
    v = _f32(v)
    return (v + _RNE_MAGIC) - _RNE_MAGIC


def exp32(x) -> np.ndarray:
    """Spec 4.1 ``exp32`` elementwise (float32 in, float32 out).  NaN gives NaN."""
    x = _f32(x)
    with np.errstate(invalid="ignore", over="ignore"):
        xc = np.where(x > _EXP_HI, _EXP_HI, x)
        xc = np.where(xc < _EXP_LO, _EXP_LO, xc)     # those results are replaced by 0 below
        n = rne(xc * _LOG2E)
        r = (xc - n * _LN2_HI) - n * _LN2_LO
        p = np.full_like(r, _INV_FACT[5040])
        p = p * r + _INV_FACT[720]
        p = p * r + _INV_FACT[120]
        p = p * r + _INV_FACT[24]
        p = p * r + _INV_FACT[6]
        p = p * r + _HALF
        p = p * r + _ONE
        p = p * r + _ONE
        ni = np.where(np.isnan(n), F32(0), n).astype(np.int32)
        two_n = ((ni + 127) << 23).astype(np.uint32).view(np.float32)
        y = p * two_n
        y = np.where(x < _EXP_LO, _ZERO, y)
    return y.astype(np.float32, copy=False)


def tanh32(u) -> np.ndarray:
    """``1 - 2 / (exp32(2*u) + 1)`` with u clamped to [-9, 9] first."""
    u = _f32(u)
    u = np.where(u < -_TANH_CLAMP, -_TANH_CLAMP, u)
    u = np.where(u > _TANH_CLAMP, _TANH_CLAMP, u)
    return _ONE - _TWO / (exp32(_TWO * u) + _ONE)


def erf32(z) -> np.ndarray:
    """Abramowitz & Stegun 7.1.26 in the spec's exact Horner order."""
    z = _f32(z)
    with np.errstate(over="ignore", invalid="ignore"):
        a = np.abs(z)
        t = _ONE / (_ONE + _ERF_P * a)
        k = t * _ERF_A5
        k = k + _ERF_A4
        k = k * t
        k = k + _ERF_A3
        k = k * t
        k = k + _ERF_A2
        k = k * t
        k = k + _ERF_A1
        k = k * t
        e = exp32(-(a * a))
        y = _ONE - k * e
    return np.where(z < _ZERO, -y, y)


def _activation_code(activation) -> int:
    if activation in (0, "gelu_new", "gelu_pytorch_tanh"):
        return 0
    if activation in (1, "gelu"):
        return 1
    raise ValueError("unknown activation %r" % (activation,))


def gelu(x, activation=0) -> np.ndarray:
    """activation 0 = ``gelu_new`` (tanh form), 1 = ``gelu`` (erf form), spec 4.1."""
    x = _f32(x)
    with np.errstate(over="ignore", invalid="ignore"):
        if _activation_code(activation) == 0:
            x3 = (x * x) * x
            u = _GELU_C * (x + _GELU_K * x3)
            return (_HALF * x) * (_ONE + tanh32(u))
        return (_HALF * x) * (_ONE + erf32(x * _SQRT1_2))


def layernorm(x, g, b, eps) -> np.ndarray:
    """Spec 4.2 over the last axis of ``x`` (any leading batch shape)."""
    x = _f32(x)
    g = _f32(g)
    b = _f32(b)
    eps = F32(eps)
    n = F32(x.shape[-1])                      # (float)n, exact for n <= 2**24
    mean = seqsum(x, -1) / n
    d = x - mean[..., None]
    var = seqsum(d * d, -1) / n
    inv = _ONE / np.sqrt(var + eps)
    return (d * inv[..., None]) * g + b


def rmsnorm(x, g, eps) -> np.ndarray:
    """Spec 4.7 (Llama) over the last axis: ``(x_i * (1 / sqrt(Σ x_i*x_i / n + eps))) * g_i``."""
    x = _f32(x)
    n = F32(x.shape[-1])
    inv = _ONE / np.sqrt(seqsum(x * x, -1) / n + F32(eps))
    return (x * inv[..., None]) * _f32(g)


def silu(x) -> np.ndarray:
    """Spec 4.7: ``x / (1 + exp32(-x))``."""
    x = _f32(x)
    return x / (_ONE + exp32(-x))


def rope(v, cs) -> np.ndarray:
    """Spec 4.7: turn the pairs (v[2i], v[2i+1]) of the last axis (one head) by the angle whose
    cosine and sine are cs[2i], cs[2i+1] (broadcast over the leading axes)."""
    v = _f32(v)
    x0, x1 = v[..., 0::2], v[..., 1::2]
    c, sn = cs[..., 0::2], cs[..., 1::2]
    out = np.empty_like(v)
    out[..., 0::2] = x0 * c - x1 * sn
    out[..., 1::2] = x0 * sn + x1 * c
    return out


def quant(v):
    """Spec 4.3 over the last axis: returns ``(q int8[..., n], s float32[...])``."""
    v = _f32(v)
    a = np.abs(v)
    a = np.where(np.isnan(a), _ZERO, a)       # NaN never counts
    amax = a.max(axis=-1) if v.shape[-1] else np.zeros(v.shape[:-1], np.float32)
    amax = np.asarray(amax, np.float32)
    zero = amax == _ZERO
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        s = amax / _Q127
        inv = _Q127 / amax
        t = v * inv[..., None]
        t = np.where(np.isnan(t), _ZERO, t)
        t = np.where(t > _Q127, _Q127, t)
        t = np.where(t < -_Q127, -_Q127, t)
        q = rne(t).astype(np.int8)
    q = np.where(zero[..., None], np.int8(0), q).astype(np.int8)
    s = np.where(zero, _ZERO, s).astype(np.float32)
    return q, s


_BLOCK = 1024      # 1024 * 127 * 127 < 2**24: an int8 dot product of <= 1024 terms is exact in f32


def int_matmul(a, b_t) -> np.ndarray:
    """Exact integer ``a @ b_t.T`` for int8-valued ``a [..., n]`` and ``b_t [m, n]`` -> int64 [..., m].

    Each block of <= 1024 terms is a float32 matrix product (exact, see module doc); blocks are
    summed in int64.  Also accepts float32 arrays that hold int8 values (cached weights).
    """
    a = np.asarray(a)
    b_t = np.asarray(b_t)
    n = a.shape[-1]
    if b_t.shape[-1] != n:
        raise ValueError("int_matmul: inner sizes %d and %d differ" % (n, b_t.shape[-1]))
    af = a.astype(np.float32, copy=False)
    bf = b_t.astype(np.float32, copy=False)
    out = None
    for k0 in range(0, max(n, 1), _BLOCK):
        part = np.matmul(af[..., k0:k0 + _BLOCK], np.swapaxes(bf[..., k0:k0 + _BLOCK], -1, -2))
        part = part.astype(np.int64)
        out = part if out is None else out + part
    return out


def linear(q, s_x, W, s_w, b=None, *, acc=None) -> np.ndarray:
    """Spec 4.4: ``y_o = (float)acc_o * (s_x * s_w[o]) + b_o`` for q int8 [..., n_in], W [n_out, n_in].

    ``b=None`` is the bias-free output head.  ``acc`` may pass precomputed int accumulators.
    """
    if acc is None:
        acc = int_matmul(q, W)
    accf = np.asarray(acc).astype(np.int32).astype(np.float32)
    s_x = _f32(s_x)
    y = accf * (s_x[..., None] * _f32(s_w))
    if b is not None:
        y = y + _f32(b)
    return y


# --------------------------------------------------------------------------------------------
# file format (sections 2, 3, 6)
# --------------------------------------------------------------------------------------------

class FormatError(ValueError):
    """The buffer is not a valid tinygpt model file (version 1, 2 or 3)."""


MAGIC = b"TGPT"
TOK_MAGIC = b"TTOK"
FORMAT_VERSION = 3      # versions 1-3 are read; 2 adds the meta section (kind 7), 3 the arch fields
HEADER_SIZE = 128
MAX_META_BYTES = 262144
NO_ID = 0xFFFFFFFF
DTYPE_INT8, DTYPE_F32, DTYPE_RAW = 1, 2, 3

#: kind -> (name, dtype, shape as a function of hparams); global kinds 1..6, layer kinds 16..31
TENSOR_KINDS = {
    1: ("wte_q", DTYPE_INT8, lambda h: (h["n_vocab"], h["n_embd"])),
    2: ("wte_s", DTYPE_F32, lambda h: (h["n_vocab"],)),
    3: ("wpe", DTYPE_F32, lambda h: (h["n_positions"], h["n_embd"])),
    4: ("lnf_g", DTYPE_F32, lambda h: (h["n_embd"],)),
    5: ("lnf_b", DTYPE_F32, lambda h: (h["n_embd"],)),
    6: ("tokenizer", DTYPE_RAW, None),
    7: ("meta", DTYPE_RAW, None),
    16: ("ln1_g", DTYPE_F32, lambda h: (h["n_embd"],)),
    17: ("ln1_b", DTYPE_F32, lambda h: (h["n_embd"],)),
    18: ("attn_w", DTYPE_INT8, lambda h: (3 * h["n_embd"], h["n_embd"])),
    19: ("attn_s", DTYPE_F32, lambda h: (3 * h["n_embd"],)),
    20: ("attn_b", DTYPE_F32, lambda h: (3 * h["n_embd"],)),
    21: ("proj_w", DTYPE_INT8, lambda h: (h["n_embd"], h["n_embd"])),
    22: ("proj_s", DTYPE_F32, lambda h: (h["n_embd"],)),
    23: ("proj_b", DTYPE_F32, lambda h: (h["n_embd"],)),
    24: ("ln2_g", DTYPE_F32, lambda h: (h["n_embd"],)),
    25: ("ln2_b", DTYPE_F32, lambda h: (h["n_embd"],)),
    26: ("fc_w", DTYPE_INT8, lambda h: (h["n_inner"], h["n_embd"])),
    27: ("fc_s", DTYPE_F32, lambda h: (h["n_inner"],)),
    28: ("fc_b", DTYPE_F32, lambda h: (h["n_inner"],)),
    29: ("mproj_w", DTYPE_INT8, lambda h: (h["n_embd"], h["n_inner"])),
    30: ("mproj_s", DTYPE_F32, lambda h: (h["n_embd"],)),
    31: ("mproj_b", DTYPE_F32, lambda h: (h["n_embd"],)),
    # Llama (arch 1): spec section 3.1
    8: ("rope", DTYPE_F32, lambda h: (h["n_positions"], h["n_embd"] // h["n_head"])),
    9: ("rmsf_g", DTYPE_F32, lambda h: (h["n_embd"],)),
    10: ("head_q", DTYPE_INT8, lambda h: (h["n_vocab"], h["n_embd"])),
    11: ("head_s", DTYPE_F32, lambda h: (h["n_vocab"],)),
    32: ("rms1_g", DTYPE_F32, lambda h: (h["n_embd"],)),
    33: ("qkv_w", DTYPE_INT8, lambda h: (h["n_embd"] + 2 * _kv_dim(h), h["n_embd"])),
    34: ("qkv_s", DTYPE_F32, lambda h: (h["n_embd"] + 2 * _kv_dim(h),)),
    35: ("o_w", DTYPE_INT8, lambda h: (h["n_embd"], h["n_embd"])),
    36: ("o_s", DTYPE_F32, lambda h: (h["n_embd"],)),
    37: ("rms2_g", DTYPE_F32, lambda h: (h["n_embd"],)),
    38: ("gu_w", DTYPE_INT8, lambda h: (2 * h["n_inner"], h["n_embd"])),
    39: ("gu_s", DTYPE_F32, lambda h: (2 * h["n_inner"],)),
    40: ("down_w", DTYPE_INT8, lambda h: (h["n_embd"], h["n_inner"])),
    41: ("down_s", DTYPE_F32, lambda h: (h["n_embd"],)),
}


def _kv_dim(h) -> int:
    return h["n_kv_head"] * (h["n_embd"] // h["n_head"])
_DTYPE_NAMES = {DTYPE_INT8: "int8", DTYPE_F32: "f32", DTYPE_RAW: "raw"}
_NP_DTYPES = {DTYPE_INT8: np.dtype("<i1"), DTYPE_F32: np.dtype("<f4")}


def tensor_layout(n_layer: int, version: int = 1, arch: int = 0, head_tied: bool = True):
    """Canonical directory order: list of (tensor_id, kind, layer, full name); version 2 ends
    with the meta section; arch 1 (Llama, version 3) has the order of spec section 3.1."""
    out = []
    if arch == 1:
        for kind in (1, 2, 8):
            out.append((kind, kind, 0, TENSOR_KINDS[kind][0]))
        for layer in range(n_layer):
            for kind in range(32, 42):
                out.append((kind + 256 * layer, kind, layer, "h.%d.%s" % (layer, TENSOR_KINDS[kind][0])))
        for kind in (9, 6, 7) if head_tied else (9, 10, 11, 6, 7):
            out.append((kind, kind, 0, TENSOR_KINDS[kind][0]))
        return out
    for kind in (1, 2, 3):
        out.append((kind, kind, 0, TENSOR_KINDS[kind][0]))
    for layer in range(n_layer):
        for kind in range(16, 32):
            out.append((kind + 256 * layer, kind, layer, "h.%d.%s" % (layer, TENSOR_KINDS[kind][0])))
    for kind in (4, 5, 6) if version == 1 else (4, 5, 6, 7):
        out.append((kind, kind, 0, TENSOR_KINDS[kind][0]))
    return out


@dataclass
class Tokenizer:
    """Parsed tokenizer section (spec section 6; version 2: section 6.2)."""
    vocab_bytes: list            # list[bytes], index = token id
    merges: list                 # list[tuple[int, int, int]] (left, right, result) in rank order
    special_ids: list            # list[int] (version 2: the control ids)
    pretokenizer: int = 1
    version: int = 1
    scores: list = field(default_factory=list)   # version 2
    byte_base: int = 0
    bos_id: int = -1
    flags: int = 0

    def decode(self, ids) -> bytes:
        if self.version == 1:
            return b"".join(self.vocab_bytes[i] for i in ids)
        out, prev = [], -1
        for i in ids:  # 6.2: after bos, a normal token's leading space is dropped
            b = self.vocab_bytes[i]
            if (self.flags & 2 and prev == self.bos_id and b[:1] == b" "
                    and not self.byte_base <= i < self.byte_base + 256):
                b = b[1:]
            out.append(b)
            prev = i
        return b"".join(out)


@dataclass
class DirEntry:
    name: str
    tensor_id: int
    dtype: int
    offset: int
    nbytes: int


@dataclass
class ModelFile:
    hparams: dict
    tensors: dict                # name -> np.ndarray (read-only views into the buffer)
    tokenizer_section: bytes
    tokenizer: Tokenizer
    header: dict = field(default_factory=dict)     # every raw header field
    meta: dict = field(default_factory=dict)       # the meta section's keys (version 2), else {}
    directory: list = field(default_factory=list)  # list[DirEntry]


_HEADER_FMT = "<4sIIIIIIIIIIIIfIIIIIIII40s"
_HEADER_FIELDS = (
    "magic", "format_version", "header_size", "file_size", "crc32", "quant_scheme",
    "n_vocab", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "activation",
    "layer_norm_epsilon", "eos_id", "bos_id", "q_id", "a_id", "do_id", "n_tensors",
    "dir_offset", "flags", "reserved",
)
assert struct.calcsize(_HEADER_FMT) == HEADER_SIZE

HPARAM_KEYS = ("n_vocab", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "activation",
               "layer_norm_epsilon", "eos_id", "bos_id", "q_id", "a_id", "do_id",
               "arch", "n_kv_head", "rope_theta", "head_tied")


def _pad(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def _check_header(hd: dict, mv: memoryview, check_crc: bool) -> None:
    def bad(msg):
        raise FormatError("header: " + msg)

    if hd["magic"] != MAGIC:
        bad("bad magic %r (expected b'TGPT')" % hd["magic"])
    if hd["format_version"] not in (1, 2, 3):
        bad("format_version %d is not supported (only 1, 2 and 3)" % hd["format_version"])
    if hd["header_size"] != HEADER_SIZE:
        bad("header_size %d != 128" % hd["header_size"])
    fs = hd["file_size"]
    if fs < HEADER_SIZE:
        bad("file_size %d is smaller than the header" % fs)
    buflen = len(mv)
    if fs > buflen:
        bad("file_size %d is larger than the buffer (%d bytes): truncated file" % (fs, buflen))
    if check_crc:      # before the other fields, so that corruption is reported as such
        crc = zlib.crc32(mv[20:fs]) & 0xFFFFFFFF
        if crc != hd["crc32"]:
            bad("crc32 mismatch (stored 0x%08x, computed 0x%08x over bytes [20, %d))"
                % (hd["crc32"], crc, fs))
    if hd["quant_scheme"] != 1:
        bad("quant_scheme %d is not supported (only 1)" % hd["quant_scheme"])
    for key, hi in (("n_vocab", 65536), ("n_positions", 65536), ("n_embd", 65536),
                    ("n_layer", 1024), ("n_inner", 65536)):
        if not 1 <= hd[key] <= hi:
            bad("%s %d out of range 1..%d" % (key, hd[key], hi))
    if not 1 <= hd["n_head"] <= hd["n_embd"]:
        bad("n_head %d out of range 1..n_embd (%d)" % (hd["n_head"], hd["n_embd"]))
    if hd["n_embd"] % hd["n_head"]:
        bad("n_embd %d is not divisible by n_head %d" % (hd["n_embd"], hd["n_head"]))
    # version 3: arch, n_kv_head, rope_theta, head_tied at bytes 88..103 (spec section 2)
    v3 = hd["format_version"] == 3
    arch, n_kv, theta, tied = struct.unpack("<IIfI", hd["reserved"][:16]) if v3 else (0, 0, 0.0, 0)
    if v3 and any(hd["reserved"][16:]):
        bad("reserved bytes 104..127 are not all zero")
    if not v3 and any(hd["reserved"]):
        bad("reserved bytes 88..127 are not all zero")
    if arch not in (0, 1):
        bad("arch %d unknown (0 = GPT-2, 1 = Llama)" % arch)
    if arch == 0:
        if n_kv or hd["reserved"][8:12] != bytes(4) or tied:
            bad("a GPT-2 file has n_kv_head, rope_theta and head_tied 0")
        if hd["activation"] not in (0, 1):
            bad("activation %d unknown (0 = gelu_new, 1 = gelu)" % hd["activation"])
        hd.update(arch=0, n_kv_head=hd["n_head"], rope_theta=0.0, head_tied=1)
    else:
        if hd["activation"] != 2:
            bad("a Llama file has activation 2 (SwiGLU), not %d" % hd["activation"])
        if not (1 <= n_kv <= hd["n_head"] and hd["n_head"] % n_kv == 0):
            bad("n_kv_head %d does not divide n_head %d" % (n_kv, hd["n_head"]))
        if (hd["n_embd"] // max(hd["n_head"], 1)) % 2:
            bad("head_dim %d is odd" % (hd["n_embd"] // hd["n_head"]))
        if not (math.isfinite(theta) and theta > 0):
            bad("rope_theta %r must be finite and > 0" % theta)
        if tied not in (0, 1):
            bad("head_tied %d is not 0 or 1" % tied)
        hd.update(arch=1, n_kv_head=n_kv, rope_theta=theta, head_tied=tied)
    eps = hd["layer_norm_epsilon"]
    if not (math.isfinite(eps) and eps > 0):
        bad("layer_norm_epsilon %r must be finite and > 0" % eps)
    for key in ("eos_id", "bos_id"):
        if hd[key] >= hd["n_vocab"]:
            bad("%s %d >= n_vocab %d" % (key, hd[key], hd["n_vocab"]))
    for key in ("q_id", "a_id", "do_id"):
        if hd[key] != NO_ID and hd[key] >= hd["n_vocab"]:
            bad("%s %d >= n_vocab %d (and not 0xFFFFFFFF)" % (key, hd[key], hd["n_vocab"]))
    if hd["arch"] == 1:
        n_global, per_layer = (6 if hd["head_tied"] else 8), 10
    else:
        n_global, per_layer = (6 if hd["format_version"] == 1 else 7), 16
    want = n_global + per_layer * hd["n_layer"]
    if hd["n_tensors"] != want:
        bad("n_tensors %d != %d + %d*n_layer = %d" % (hd["n_tensors"], n_global, per_layer, want))
    if hd["dir_offset"] % 16 or hd["dir_offset"] < HEADER_SIZE:
        bad("dir_offset %d must be a multiple of 16 and >= 128" % hd["dir_offset"])
    if hd["flags"] != 0:
        bad("flags 0x%x != 0 (reserved)" % hd["flags"])
    if hd["dir_offset"] + 16 * hd["n_tensors"] > fs:
        bad("tensor directory [%d, %d) runs past file_size %d"
            % (hd["dir_offset"], hd["dir_offset"] + 16 * hd["n_tensors"], fs))


def parse_tokenizer(sec: bytes, n_vocab: int) -> Tokenizer:
    """Parse and validate a tokenizer section (spec section 6)."""
    def bad(msg):
        raise FormatError("tokenizer: " + msg)

    nb = len(sec)
    if nb < 32:
        bad("section is %d bytes, shorter than its 32-byte header" % nb)
    (magic, version, tv, n_merges, n_special, pretok, bytes_size, reserved) = \
        struct.unpack_from("<4sIIIIIII", sec, 0)
    if magic != TOK_MAGIC:
        bad("bad magic %r (expected b'TTOK')" % magic)
    if version == 2:
        return _parse_tokenizer_v2(sec, n_vocab, bad)
    if version != 1:
        bad("version %d is not supported (only 1 and 2)" % version)
    if tv != n_vocab:
        bad("n_vocab %d != header n_vocab %d" % (tv, n_vocab))
    if pretok != 1:
        bad("pretokenizer %d unknown (only 1 = GPT-2 byte-level)" % pretok)
    if reserved != 0:
        bad("reserved field %d != 0" % reserved)
    want = 32 + 4 * (n_vocab + 1) + _pad(bytes_size, 4) + 12 * n_merges + 4 * n_special
    if nb != want:
        bad("nbytes %d != expected %d (32 + 4*(n_vocab+1) + pad4(bytes_size=%d) + "
            "12*n_merges(%d) + 4*n_special(%d))" % (nb, want, bytes_size, n_merges, n_special))
    off = np.frombuffer(sec, dtype="<u4", count=n_vocab + 1, offset=32).astype(np.int64)
    if off[0] != 0:
        bad("tok_off[0] = %d != 0" % off[0])
    dec = np.nonzero(np.diff(off) < 0)[0]
    if dec.size:
        t = int(dec[0])
        bad("tok_off decreases at token %d (%d -> %d)" % (t, off[t], off[t + 1]))
    if off[n_vocab] != bytes_size:
        bad("tok_off[n_vocab] = %d != bytes_size %d" % (off[n_vocab], bytes_size))
    blob_at = 36 + 4 * n_vocab
    blob = bytes(sec[blob_at:blob_at + bytes_size])
    offl = off.tolist()
    vocab = [blob[offl[t]:offl[t + 1]] for t in range(n_vocab)]
    m_at = blob_at + _pad(bytes_size, 4)
    mer = np.frombuffer(sec, dtype="<u4", count=3 * n_merges, offset=m_at).reshape(n_merges, 3)
    s_at = m_at + 12 * n_merges
    spec = np.frombuffer(sec, dtype="<u4", count=n_special, offset=s_at)
    if mer.size and int(mer.max()) >= n_vocab:
        i = int(np.nonzero((mer >= n_vocab).any(axis=1))[0][0])
        bad("merge %d %s has an id >= n_vocab %d" % (i, tuple(int(x) for x in mer[i]), n_vocab))
    merges = [tuple(int(x) for x in row) for row in mer.tolist()]
    for i, (l, r, res) in enumerate(merges):
        if vocab[res] != vocab[l] + vocab[r]:
            bad("merge %d (%d, %d -> %d): bytes %r != %r + %r"
                % (i, l, r, res, vocab[res], vocab[l], vocab[r]))
    single = {}
    for t, bts in enumerate(vocab):
        if len(bts) == 1:
            if bts in single:
                bad("byte 0x%02x is the whole text of two tokens (%d and %d)"
                    % (bts[0], single[bts], t))
            single[bts] = t
    if len(single) != 256:
        missing = [b for b in range(256) if bytes([b]) not in single]
        bad("byte 0x%02x is not the whole text of any token (%d byte values missing)"
            % (missing[0], len(missing)))
    special = [int(x) for x in spec.tolist()]
    seen = set()
    for sid in special:
        if sid >= n_vocab:
            bad("special id %d >= n_vocab %d" % (sid, n_vocab))
        if sid in seen:
            bad("special id %d appears twice" % sid)
        seen.add(sid)
        if not vocab[sid]:
            bad("special token %d has empty bytes" % sid)
    return Tokenizer(vocab_bytes=vocab, merges=merges, special_ids=special, pretokenizer=pretok)


def _parse_tokenizer_v2(sec: bytes, n_vocab: int, bad) -> Tokenizer:
    """Spec 6.2: score-ordered BPE with byte fallback (llama2.c's tokenizer)."""
    nv, bb, bos, nc, flags, bsize = struct.unpack_from("<6I", sec, 8)
    if nv != n_vocab:
        bad("n_vocab %d != header n_vocab %d" % (nv, n_vocab))
    if nv < 257 or bb + 256 > nv:
        bad("byte_base %d: 256 byte tokens do not fit %d tokens" % (bb, nv))
    if not 1 <= nc <= nv - 256:
        bad("n_control %d outside 1..%d" % (nc, nv - 256))
    if flags & ~3:
        bad("flags 0x%x has unknown bits" % flags)
    pad = (bsize + 3) // 4 * 4
    want = 32 + 4 * (nv + 1) + pad + 4 * nv + 4 * nc + 4 * (nv - 256 - nc)
    if len(sec) != want:
        bad("section is %d bytes, its counts need %d" % (len(sec), want))
    off = np.frombuffer(sec, "<u4", nv + 1, 32).astype(np.int64)
    if off[0] != 0 or off[-1] != bsize or np.any(np.diff(off) < 0):
        bad("token offsets do not rise from 0 to bytes_size")
    b0 = 32 + 4 * (nv + 1)
    blob = sec[b0:b0 + bsize]
    if any(sec[b0 + bsize:b0 + pad]):
        bad("padding after the token bytes is not zero")
    vocab = [blob[off[t]:off[t + 1]] for t in range(nv)]
    for b in range(256):
        if vocab[bb + b] != bytes([b]):
            bad("byte token %d is not the one byte 0x%02x" % (bb + b, b))
    scores = np.frombuffer(sec, "<f4", nv, b0 + pad)
    if not np.all(np.isfinite(scores)):
        bad("token %d's score is not finite" % int(np.argmin(np.isfinite(scores))))
    ctl = np.frombuffer(sec, "<u4", nc, b0 + pad + 4 * nv).tolist()
    if any(b <= a for a, b in zip(ctl, ctl[1:])) or any(c >= nv or bb <= c < bb + 256 for c in ctl):
        bad("control ids are not increasing ids outside the byte tokens")
    if bos not in ctl:
        bad("bos_id %d is not a control id" % bos)
    srt = np.frombuffer(sec, "<u4", nv - 256 - nc, b0 + pad + 4 * nv + 4 * nc).tolist()
    normal = set(range(nv)) - set(ctl) - set(range(bb, bb + 256))
    if set(srt) != normal or len(srt) != len(normal):
        bad("the sorted ids are not exactly the normal tokens")
    for a, b in zip(srt, srt[1:]):
        if not vocab[a] < vocab[b]:
            bad("sorted ids %d, %d: bytes not strictly increasing" % (a, b))
    if any(not vocab[t] for t in srt):
        bad("a normal token has no bytes")
    return Tokenizer(vocab_bytes=vocab, merges=[], special_ids=ctl, pretokenizer=0, version=2,
                     scores=scores.tolist(), byte_base=bb, bos_id=bos, flags=flags)


def parse_model(buf, check_crc: bool = True) -> ModelFile:
    """Parse and validate a model file held in ``buf`` (bytes, bytearray, memoryview, mmap).

    Raises :class:`FormatError` naming the first broken rule.  Tensors are read-only numpy views
    of ``buf`` (little-endian), except the tokenizer section which is copied to ``bytes``.
    """
    mv = memoryview(buf).cast("B")
    if len(mv) < HEADER_SIZE:
        raise FormatError("header: buffer of %d bytes is shorter than the 128-byte header"
                          % len(mv))
    hd = dict(zip(_HEADER_FIELDS, struct.unpack_from(_HEADER_FMT, mv, 0)))
    _check_header(hd, mv, check_crc)
    fs = hd["file_size"]
    hp = {k: hd[k] for k in HPARAM_KEYS}
    hp["layer_norm_epsilon"] = F32(hd["layer_norm_epsilon"])
    hp["rope_theta"] = F32(hd["rope_theta"])

    n_t = hd["n_tensors"]
    d0 = hd["dir_offset"]
    ent = np.frombuffer(mv, dtype="<u4", count=4 * n_t, offset=d0).reshape(n_t, 4).tolist()
    tensors = {}
    directory = []
    tok_sec = None
    meta_sec = b""
    prev_end = d0 + 16 * n_t
    prev_name = "the tensor directory"
    for i, ((tid, kind, layer, name), (e_id, e_dt, e_off, e_nb)) in enumerate(
            zip(tensor_layout(hd["n_layer"], hd["format_version"], hd["arch"], hd["head_tied"]), ent)):
        where = "tensor %d '%s'" % (i, name)
        if e_id != tid:
            raise FormatError("%s: tensor_id %d (0x%x) != expected %d (kind %d, layer %d)"
                              % (where, e_id, e_id, tid, kind, layer))
        _, dt, shape_fn = TENSOR_KINDS[kind]
        if e_dt != dt:
            raise FormatError("%s: dtype %d != expected %d (%s)"
                              % (where, e_dt, dt, _DTYPE_NAMES[dt]))
        shape = None
        if shape_fn is not None:
            shape = shape_fn(hp)
            want = int(np.prod(shape)) * _NP_DTYPES[dt].itemsize
            if e_nb != want:
                raise FormatError("%s: nbytes %d != expected %d (shape %s, %s)"
                                  % (where, e_nb, want, list(shape), _DTYPE_NAMES[dt]))
        if e_off % 16:
            raise FormatError("%s: offset %d is not a multiple of 16" % (where, e_off))
        if e_off < prev_end:
            raise FormatError("%s: offset %d overlaps %s (which ends at %d)"
                              % (where, e_off, prev_name, prev_end))
        end = e_off + e_nb
        if end > fs:
            raise FormatError("%s: [%d, %d) runs past file_size %d" % (where, e_off, end, fs))
        packed = (prev_end + 15) // 16 * 16  # spec section 3: no gaps beyond alignment padding
        if e_off != packed:
            raise FormatError("%s: offset %d leaves a gap after %s (packed, it starts at %d)"
                              % (where, e_off, prev_name, packed))
        prev_end, prev_name = end, "tensor '%s'" % name
        directory.append(DirEntry(name, e_id, e_dt, e_off, e_nb))
        if kind == 7:
            meta_sec = bytes(mv[e_off:end])
            continue
        if dt == DTYPE_RAW:
            tok_sec = bytes(mv[e_off:end])
            continue
        arr = np.frombuffer(mv, dtype=_NP_DTYPES[dt], count=int(np.prod(shape)),
                            offset=e_off).reshape(shape)
        if dt == DTYPE_F32:
            fin = np.isfinite(arr)
            if not fin.all():
                j = int(np.argmin(fin.reshape(-1)))
                raise FormatError("%s: value %d is not finite (%r)"
                                  % (where, j, float(arr.reshape(-1)[j])))
            if name.endswith("_s"):
                neg = arr < 0
                if neg.any():
                    j = int(np.argmax(neg.reshape(-1)))
                    raise FormatError("%s: scale %d is negative (%r)"
                                      % (where, j, float(arr.reshape(-1)[j])))
        tensors[name] = arr
    if prev_end != fs:
        raise FormatError("file_size %d is not the end of the last tensor (%d): the spec "
                          "packs the tensors up to file_size" % (fs, prev_end))
    tok = parse_tokenizer(tok_sec, hd["n_vocab"])
    if tok.version == 2 and tok.bos_id != hd["bos_id"]:
        raise FormatError("tokenizer: bos_id %d differs from the header's %d" % (tok.bos_id, hd["bos_id"]))
    return ModelFile(hparams=hp, tensors=tensors, tokenizer_section=tok_sec, tokenizer=tok,
                     header=hd, directory=directory, meta=parse_meta(meta_sec))


def parse_meta(sec: bytes) -> dict:
    """The meta section (spec section 8): UTF-8 lines "key: value", each ended by a line feed,
    no other control character, at most 256 KiB."""
    if len(sec) > MAX_META_BYTES:
        raise FormatError("meta: %d bytes, more than %d" % (len(sec), MAX_META_BYTES))
    for i, b in enumerate(sec):
        if b < 0x20 and b != 0x0A:
            raise FormatError("meta: control byte 0x%02x at %d" % (b, i))
    try:
        text = sec.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError("meta: not UTF-8 (%s)" % e) from None
    out = {}
    if text and not text.endswith("\n"):
        raise FormatError("meta: the last line has no line feed")
    for n, line in enumerate(text.split("\n")[:-1], 1):
        key, sep, value = line.partition(": ")
        if not sep or not key:
            raise FormatError("meta: line %d is not 'key: value'" % n)
        out[key] = value
    return out


def load(path) -> ModelFile:
    """Read a model file from disk and :func:`parse_model` it."""
    with open(path, "rb") as f:
        return parse_model(f.read())


# --------------------------------------------------------------------------------------------
# section 4.5 forward pass
# --------------------------------------------------------------------------------------------

class ReferenceModel:
    """Bit-exact forward pass of spec 4.5 with an int8 KV cache.

    ``forward(tokens)`` processes the tokens at positions ``pos, pos+1, ...`` (like the engine's
    prefill, or a step for one token), appends their keys and values to the cache, advances
    ``pos`` and returns float32 logits ``[len(tokens), n_vocab]``, one row per processed
    position.  ``reset()`` empties the cache.  ``n_ctx`` (default ``n_positions``) is the cache
    length; going past it raises ``ValueError``.

    Trace (``trace=True`` in the constructor, or per call ``forward(tokens, trace=True)``):
    ``self.trace`` is a dict ``{absolute position: {key: value}}`` filled for every position
    processed while tracing (reset() clears it).  Per layer ``l`` the keys are ``'h.<l>.<name>'``:

    ============  ================  =================================================
    name          dtype, shape      meaning
    ============  ================  =================================================
    ``xq1``       int8 [E]          quant(LayerNorm(h; ln1)) values
    ``xs1``       f32 scalar        its scale
    ``qkv``       f32 [3E]          attention input projection
    ``k8``        int8 [E]          key written to the cache (head h = slice h*D..h*D+D)
    ``sk``        f32 [n_head]      key scales written to the cache
    ``v8``        int8 [E]          value written to the cache
    ``sv``        f32 [n_head]      value scales written to the cache
    ``attn``      f32 [E]           attention output ``out`` before quantization (extra)
    ``aq``        int8 [E]          quant(out) values
    ``as``        f32 scalar        its scale
    ``xq2``       int8 [E]          quant(LayerNorm(h; ln2)) values
    ``xs2``       f32 scalar        its scale
    ``fc``        f32 [I]           fc linear output (before gelu)
    ``gq``        int8 [I]          quant(gelu(fc)) values
    ``gs``        f32 scalar        its scale
    ``h``         f32 [E]           residual stream after the layer
    ============  ================  =================================================

    plus ``'emb'`` f32 [E] (h before layer 0), ``'fq'`` int8 [E] and ``'fs'`` f32 scalar (final
    LayerNorm quantized) and ``'logits'`` f32 [V].
    """

    def __init__(self, modelfile: ModelFile, n_ctx: int | None = None, trace: bool = False):
        self.mf = modelfile
        hp = modelfile.hparams
        self.hp = hp
        self.V, self.P = hp["n_vocab"], hp["n_positions"]
        self.E, self.L, self.H = hp["n_embd"], hp["n_layer"], hp["n_head"]
        self.I = hp["n_inner"]
        self.D = self.E // self.H
        self.llama = hp.get("arch", 0) == 1
        self.KV = hp["n_kv_head"] if self.llama else self.H   # key/value heads
        self.KVD = self.KV * self.D
        self.act = hp["activation"]
        self.eps = F32(hp["layer_norm_epsilon"])
        self.n_ctx = self.P if n_ctx is None else int(n_ctx)
        if not 1 <= self.n_ctx <= self.P:
            raise ValueError("n_ctx %d out of range 1..n_positions (%d)" % (self.n_ctx, self.P))
        self.inv_sqrt_d = _ONE / np.sqrt(F32(self.D))   # once, as an f32
        t = modelfile.tensors
        self.t = t
        # int8 matrices as float32 (exact small integers) for the blocked BLAS products
        self._wf = {k: np.asarray(v, np.float32) for k, v in t.items() if v.dtype == np.int8}
        self.trace_enabled = trace
        self.K8 = np.zeros((self.L, self.n_ctx, self.KVD), np.int8)
        self.V8 = np.zeros((self.L, self.n_ctx, self.KVD), np.int8)
        self.sK = np.zeros((self.L, self.n_ctx, self.KV), np.float32)
        self.sV = np.zeros((self.L, self.n_ctx, self.KV), np.float32)
        self.pos = 0
        self.trace = {}

    def reset(self) -> None:
        self.pos = 0
        self.trace = {}
        self.K8[:] = 0
        self.V8[:] = 0
        self.sK[:] = 0
        self.sV[:] = 0

    def _lin(self, q, s, name, bias=True):
        return linear(q, s, None, self.t[name + "_s"], self.t[name + "_b"] if bias else None,
                      acc=int_matmul(q, self._wf[name + "_w"]))

    def _attention(self, l, q8, sq, pos0):
        """q8 int8 [T, H, D], sq [T, H] for positions pos0..pos0+T-1 -> out f32 [T, E]."""
        T, H, D = q8.shape
        P = pos0 + T
        # query head h reads key/value head h // (H / KV) (grouped-query attention, spec 4.7)
        g = np.arange(H) // (H // self.KV)
        K = self.K8[l, :P].reshape(P, self.KV, D)[:, g].transpose(1, 2, 0).astype(np.float32)  # [H, D, P]
        Vf = self.V8[l, :P].reshape(P, self.KV, D)[:, g].transpose(1, 0, 2).astype(np.float32)  # [H, P, D]
        sK = self.sK[l, :P][:, g].T                # [H, P]
        sV = self.sV[l, :P][:, g].T
        qf = q8.transpose(1, 0, 2).astype(np.float32)   # [H, T, D]
        acc = None
        for k0 in range(0, D, _BLOCK):             # exact int dot products (see int_matmul)
            part = np.matmul(qf[:, :, k0:k0 + _BLOCK], K[:, k0:k0 + _BLOCK, :]).astype(np.int64)
            acc = part if acc is None else acc + part
        accf = acc.astype(np.int32).astype(np.float32)          # [H, T, P]
        score = (accf * (sq.T[:, :, None] * sK[:, None, :])) * self.inv_sqrt_d
        tpos = pos0 + np.arange(T)
        mask = np.arange(P)[None, :] <= tpos[:, None]            # [T, P]
        m = np.where(mask, score, F32(-np.inf)).max(axis=-1)     # [H, T]
        e = np.where(mask, exp32(score - m[..., None]), _ZERO)
        # masked e are +0 at the end of each row: adding them leaves the positive sum unchanged
        inv = _ONE / seqsum(e, -1)
        w = (e * inv[..., None]) * sV[:, None, :]                # [H, T, P], masked -> +0
        # out = Σ_p w_p * V8[p], sequential over p, vectorised over (head, query, j).  The loop
        # starts at +0 like the spec's; the masked terms (p > query position) are ±0 and leave
        # the sum unchanged (x + ±0 = x for x != 0, and +0 + -0 = +0).
        wt = np.ascontiguousarray(w.transpose(2, 0, 1))          # [P, H, T]
        Vt = np.ascontiguousarray(Vf.transpose(1, 0, 2))         # [P, H, D]
        out = np.zeros((H, T, D), np.float32)
        tmp = np.empty_like(out)
        for p in range(P):
            np.multiply(wt[p][:, :, None], Vt[p][:, None, :], out=tmp)
            np.add(out, tmp, out=out)
        return out.transpose(1, 0, 2).reshape(T, H * D)

    def forward(self, tokens, trace: bool | None = None) -> np.ndarray:
        tr = self.trace_enabled if trace is None else trace
        toks = np.asarray(list(tokens), dtype=np.int64).reshape(-1)
        T = toks.size
        if T == 0:
            return np.zeros((0, self.V), np.float32)
        if toks.min() < 0 or toks.max() >= self.V:
            raise ValueError("token id out of range 0..%d" % (self.V - 1))
        pos0 = self.pos
        if pos0 + T > self.n_ctx:
            raise ValueError("context full: %d + %d tokens > n_ctx %d" % (pos0, T, self.n_ctx))
        t = self.t
        E, H, D = self.E, self.H, self.D
        rec = [dict() for _ in range(T)] if tr else None

        def put(key, arr):
            if tr:
                for i in range(T):
                    v = arr[i]
                    rec[i][key] = v.copy() if isinstance(v, np.ndarray) else F32(v)

        positions = pos0 + np.arange(T)
        if self.llama:
            return self._forward_llama(toks, positions, tr, rec, put)
        h = t["wte_q"][toks].astype(np.float32) * t["wte_s"][toks][:, None] + t["wpe"][positions]
        put("emb", h)
        for l in range(self.L):
            p = "h.%d." % l
            xq, xs = quant(layernorm(h, t[p + "ln1_g"], t[p + "ln1_b"], self.eps))
            qkv = self._lin(xq, xs, p + "attn")
            k8, sk = quant(qkv[:, E:2 * E].reshape(T, H, D))
            v8, sv = quant(qkv[:, 2 * E:].reshape(T, H, D))
            self.K8[l, positions] = k8.reshape(T, E)
            self.V8[l, positions] = v8.reshape(T, E)
            self.sK[l, positions] = sk
            self.sV[l, positions] = sv
            q8, sq = quant(qkv[:, :E].reshape(T, H, D))
            out = self._attention(l, q8, sq, pos0)
            aq, as_ = quant(out)
            h = h + self._lin(aq, as_, p + "proj")
            x2q, x2s = quant(layernorm(h, t[p + "ln2_g"], t[p + "ln2_b"], self.eps))
            f = self._lin(x2q, x2s, p + "fc")
            gq, gs = quant(gelu(f, self.act))
            h = h + self._lin(gq, gs, p + "mproj")
            if tr:
                for key, arr in (("xq1", xq), ("xs1", xs), ("qkv", qkv),
                                 ("k8", k8.reshape(T, E)), ("sk", sk),
                                 ("v8", v8.reshape(T, E)), ("sv", sv), ("attn", out),
                                 ("aq", aq), ("as", as_), ("xq2", x2q), ("xs2", x2s),
                                 ("fc", f), ("gq", gq), ("gs", gs), ("h", h)):
                    put(p + key, arr)
        fq, fs = quant(layernorm(h, t["lnf_g"], t["lnf_b"], self.eps))
        return self._head(fq, fs, "wte", tr, rec, put)

    def _head(self, fq, fs, name, tr, rec, put):
        """The output head (matrix `name`_q, scales `name`_s) on the final norm's quantized
        values; the trace of the pass is stored and pos advanced."""
        logits = linear(fq, fs, None, self.t[name + "_s"], None, acc=int_matmul(fq, self._wf[name + "_q"]))
        T, pos0 = fq.shape[0], self.pos
        if tr:
            put("fq", fq)
            put("fs", fs)
            put("logits", logits)
            for i in range(T):
                self.trace[pos0 + i] = rec[i]
        self.pos = pos0 + T
        return logits

    def _forward_llama(self, toks, positions, tr, rec, put):
        """Spec 4.7: the Llama forward pass (same trace keys; 'qkv' after the rotation, 'fc' the
        2I gate and up values)."""
        t = self.t
        T, E, H, D, KV, KVD, I = toks.size, self.E, self.H, self.D, self.KV, self.KVD, self.I
        pos0 = self.pos
        cs = t["rope"][positions][:, None, :]                      # [T, 1, D]
        h = t["wte_q"][toks].astype(np.float32) * t["wte_s"][toks][:, None]
        put("emb", h)
        for l in range(self.L):
            p = "h.%d." % l
            xq, xs = quant(rmsnorm(h, t[p + "rms1_g"], self.eps))
            qkv = linear(xq, xs, None, t[p + "qkv_s"], None, acc=int_matmul(xq, self._wf[p + "qkv_w"]))
            q = rope(qkv[:, :E].reshape(T, H, D), cs)
            k = rope(qkv[:, E:E + KVD].reshape(T, KV, D), cs)
            qkv = np.concatenate([q.reshape(T, E), k.reshape(T, KVD), qkv[:, E + KVD:]], axis=1)
            k8, sk = quant(k)
            v8, sv = quant(qkv[:, E + KVD:].reshape(T, KV, D))
            self.K8[l, positions] = k8.reshape(T, KVD)
            self.V8[l, positions] = v8.reshape(T, KVD)
            self.sK[l, positions] = sk
            self.sV[l, positions] = sv
            q8, sq = quant(q)
            out = self._attention(l, q8, sq, pos0)
            aq, as_ = quant(out)
            h = h + linear(aq, as_, None, t[p + "o_s"], None, acc=int_matmul(aq, self._wf[p + "o_w"]))
            x2q, x2s = quant(rmsnorm(h, t[p + "rms2_g"], self.eps))
            f = linear(x2q, x2s, None, t[p + "gu_s"], None, acc=int_matmul(x2q, self._wf[p + "gu_w"]))
            gq, gs = quant(silu(f[:, :I]) * f[:, I:])
            h = h + linear(gq, gs, None, t[p + "down_s"], None, acc=int_matmul(gq, self._wf[p + "down_w"]))
            if tr:
                for key, arr in (("xq1", xq), ("xs1", xs), ("qkv", qkv),
                                 ("k8", k8.reshape(T, KVD)), ("sk", sk),
                                 ("v8", v8.reshape(T, KVD)), ("sv", sv), ("attn", out),
                                 ("aq", aq), ("as", as_), ("xq2", x2q), ("xs2", x2s),
                                 ("fc", f), ("gq", gq), ("gs", gs), ("h", h)):
                    put(p + key, arr)
        fq, fs = quant(rmsnorm(h, t["rmsf_g"], self.eps))
        return self._head(fq, fs, "head" if "head_q" in t else "wte", tr, rec, put)

    __call__ = forward
