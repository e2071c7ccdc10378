"""Writer for the tinygpt model file, format versions 1 to 3 (docs/model-format.md).

Public API:

* ``write_model_file(path, hparams, tensors, tokenizer_section, meta=None) -> dict``
  writes header, directory (canonical order), 16-aligned tensors and the CRC, after
  validating every input against the spec; the output appears atomically (temp file in the
  same directory, then ``os.replace``) or not at all.
* ``quantize_rows(w) -> (q int8 [n_out, n_in], s float32 [n_out])`` (spec 4.6).
* ``tensor_specs(hparams)`` / ``plan_layout(hparams, tokenizer_nbytes)``: the canonical tensor
  list and the exact byte layout (used by ``presets.estimate_bytes`` too).
* ``check_tokenizer_section(section, n_vocab)``: the rules of spec section 6.
* ``add_arguments(p)`` / ``run_cli(args)``: ``tinygpt info MODEL`` (what is inside a model file).

``hparams`` keys (all ints unless noted): ``n_vocab`` (alias ``vocab_size``), ``n_positions``,
``n_embd``, ``n_layer``, ``n_head``, ``n_inner`` (None -> 4*n_embd), ``activation`` (0/1 or
'gelu_new'/'gelu_pytorch_tanh'/'gelu'), ``layer_norm_epsilon`` (float), ``eos_id``,
``bos_id`` (default eos_id), ``q_id``/``a_id``/``do_id`` (default/None -> 0xFFFFFFFF).
A Llama model (format version 3) adds ``arch='llama'``, ``n_kv_head`` (default n_head),
``rope_theta`` (default 10000.0), ``head_tied`` (default True); its activation is 'silu' (SwiGLU)
and ``layer_norm_epsilon`` is the RMSNorm epsilon.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
import tempfile
import zlib
from typing import NamedTuple

import numpy as np

MAGIC = b"TGPT"
FORMAT_VERSION = 3  # the newest read; version 3 adds the architecture fields (Llama)
GPT2_FORMAT_VERSION = 2  # what a GPT-2 file is written as (version 1 without a meta section)
HEADER_SIZE = 128
QUANT_SCHEME = 1
NO_TOKEN = 0xFFFFFFFF
ALIGN = 16

DTYPE_INT8 = 1
DTYPE_F32 = 2
DTYPE_RAW = 3
DTYPE_NAMES = {DTYPE_INT8: "int8", DTYPE_F32: "f32", DTYPE_RAW: "raw"}

ACT_GELU_NEW = 0  # tanh form
ACT_GELU = 1  # erf form
ACT_SILU = 2  # Llama's SwiGLU
ACTIVATION_CODES = {"gelu_new": ACT_GELU_NEW, "gelu_pytorch_tanh": ACT_GELU_NEW, "gelu": ACT_GELU}
ARCH_GPT2 = 0
ARCH_LLAMA = 1
ARCH_CODES = {"gpt2": ARCH_GPT2, "llama": ARCH_LLAMA}

TOKENIZER_MAGIC = b"TTOK"
TOKENIZER_KIND = 6
META_KIND = 7          # format version 2: "key: value" text lines after the tokenizer (spec section 8)
MAX_META_BYTES = 262144
ABSTAIN_KEY = "abstain_answer"
KNOWN_WORDS_KEY = "known_words"  # the corpus's content words (py/topic.py)

# header layout (spec section 2): "<4s5I" at 0 (magic .. quant_scheme), "<7I" at 24
# (n_vocab .. activation), "<f" at 52 (layer_norm_epsilon), "<9I" at 56 (eos_id .. flags,
# plus the first reserved word), zeros to 128.
DIR_ENTRY = struct.Struct("<4I")

# (kind, suffix, dtype, shape(E, I, V, P) ) for global tensors before the layers
_GLOBAL_PRE = [
    (1, "wte_q", DTYPE_INT8, lambda E, I, V, P: (V, E)),
    (2, "wte_s", DTYPE_F32, lambda E, I, V, P: (V,)),
    (3, "wpe", DTYPE_F32, lambda E, I, V, P: (P, E)),
]
_LAYER = [
    (16, "ln1_g", DTYPE_F32, lambda E, I, V, P: (E,)),
    (17, "ln1_b", DTYPE_F32, lambda E, I, V, P: (E,)),
    (18, "attn_w", DTYPE_INT8, lambda E, I, V, P: (3 * E, E)),
    (19, "attn_s", DTYPE_F32, lambda E, I, V, P: (3 * E,)),
    (20, "attn_b", DTYPE_F32, lambda E, I, V, P: (3 * E,)),
    (21, "proj_w", DTYPE_INT8, lambda E, I, V, P: (E, E)),
    (22, "proj_s", DTYPE_F32, lambda E, I, V, P: (E,)),
    (23, "proj_b", DTYPE_F32, lambda E, I, V, P: (E,)),
    (24, "ln2_g", DTYPE_F32, lambda E, I, V, P: (E,)),
    (25, "ln2_b", DTYPE_F32, lambda E, I, V, P: (E,)),
    (26, "fc_w", DTYPE_INT8, lambda E, I, V, P: (I, E)),
    (27, "fc_s", DTYPE_F32, lambda E, I, V, P: (I,)),
    (28, "fc_b", DTYPE_F32, lambda E, I, V, P: (I,)),
    (29, "mproj_w", DTYPE_INT8, lambda E, I, V, P: (E, I)),
    (30, "mproj_s", DTYPE_F32, lambda E, I, V, P: (E,)),
    (31, "mproj_b", DTYPE_F32, lambda E, I, V, P: (E,)),
]
_GLOBAL_POST = [
    (4, "lnf_g", DTYPE_F32, lambda E, I, V, P: (E,)),
    (5, "lnf_b", DTYPE_F32, lambda E, I, V, P: (E,)),
]
# Llama (spec section 3.1): shapes as functions of (E, I, V, P, D, KVD)
_LLAMA_PRE = [
    (1, "wte_q", DTYPE_INT8, lambda E, I, V, P, D, K: (V, E)),
    (2, "wte_s", DTYPE_F32, lambda E, I, V, P, D, K: (V,)),
    (8, "rope", DTYPE_F32, lambda E, I, V, P, D, K: (P, D)),
]
_LLAMA_LAYER = [
    (32, "rms1_g", DTYPE_F32, lambda E, I, V, P, D, K: (E,)),
    (33, "qkv_w", DTYPE_INT8, lambda E, I, V, P, D, K: (E + 2 * K, E)),
    (34, "qkv_s", DTYPE_F32, lambda E, I, V, P, D, K: (E + 2 * K,)),
    (35, "o_w", DTYPE_INT8, lambda E, I, V, P, D, K: (E, E)),
    (36, "o_s", DTYPE_F32, lambda E, I, V, P, D, K: (E,)),
    (37, "rms2_g", DTYPE_F32, lambda E, I, V, P, D, K: (E,)),
    (38, "gu_w", DTYPE_INT8, lambda E, I, V, P, D, K: (2 * I, E)),
    (39, "gu_s", DTYPE_F32, lambda E, I, V, P, D, K: (2 * I,)),
    (40, "down_w", DTYPE_INT8, lambda E, I, V, P, D, K: (E, I)),
    (41, "down_s", DTYPE_F32, lambda E, I, V, P, D, K: (E,)),
]
_LLAMA_POST = [
    (9, "rmsf_g", DTYPE_F32, lambda E, I, V, P, D, K: (E,)),
    (10, "head_q", DTYPE_INT8, lambda E, I, V, P, D, K: (V, E)),  # untied heads only
    (11, "head_s", DTYPE_F32, lambda E, I, V, P, D, K: (V,)),
]


class TensorSpec(NamedTuple):
    order: int
    name: str  # 'wte_q', 'h.3.fc_w', 'tokenizer', ...
    kind: int
    layer: int
    tensor_id: int  # kind + 256 * layer
    dtype: int  # DTYPE_*
    shape: tuple | None  # None for the raw tokenizer section

    @property
    def is_scale(self) -> bool:
        return self.name.endswith("_s")


def sha256_file(path) -> str:
    """The SHA-256 of a file, read in 1 MiB chunks (models, corpora, tokenizers)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pad16(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def pad4(n: int) -> int:
    return (n + 3) // 4 * 4


def _as_int(hp: dict, key: str, lo: int, hi: int) -> int:
    v = hp.get(key)
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise ValueError(f"hparams[{key!r}] must be an integer, got {v!r}")
    v = int(v)
    if not lo <= v <= hi:
        raise ValueError(f"hparams[{key!r}] = {v} is outside {lo} .. {hi}")
    return v


def _positive_f32(value, key: str, label: str) -> float:
    """value as an f32 that is finite and > 0 (the header's rule), else ValueError."""
    try:
        v32 = float(np.float32(value))
    except (TypeError, ValueError):
        raise ValueError(f"hparams[{key!r}] must be a number, got {value!r}") from None
    if not (math.isfinite(v32) and v32 > 0):
        raise ValueError(f"{label} must be finite and > 0 as f32, got {value!r}")
    return v32


def check_tensor_names(expected, found, unexpected, source: str) -> None:
    """A checkpoint's tensor names: `unexpected` (names not in `expected`) and the expected ones
    missing from `found` raise one ValueError naming the first five."""
    def listed(names):
        more = f" (and {len(names) - 5} more)" if len(names) > 5 else ""
        return ", ".join(map(repr, names[:5])) + more

    if unexpected:
        raise ValueError(f"{source}: unexpected tensor(s) {listed(list(unexpected))}; does config.json match "
                         "the weights?")
    missing = [k for k in expected if k not in found]
    if missing:
        raise ValueError(f"{source}: missing tensor(s) {listed(missing)}")


def normalize_hparams(hparams: dict) -> dict:
    """Validate ``hparams`` against the header rules; return a dict of plain ints/floats."""
    if not isinstance(hparams, dict):
        raise ValueError(f"hparams must be a dict, got {type(hparams).__name__}")
    hp = dict(hparams)
    if "n_vocab" not in hp and "vocab_size" in hp:
        hp["n_vocab"] = hp["vocab_size"]
    for key in ("n_vocab", "n_positions", "n_embd", "n_layer", "n_head"):
        if key not in hp:
            raise ValueError(f"hparams is missing {key!r}")
    out = {}
    out["n_vocab"] = _as_int(hp, "n_vocab", 1, 65536)
    out["n_positions"] = _as_int(hp, "n_positions", 1, 65536)
    out["n_embd"] = _as_int(hp, "n_embd", 1, 65536)
    out["n_layer"] = _as_int(hp, "n_layer", 1, 1024)
    out["n_head"] = _as_int(hp, "n_head", 1, out["n_embd"])
    if out["n_embd"] % out["n_head"]:
        raise ValueError(f"n_embd {out['n_embd']} is not divisible by n_head {out['n_head']}")
    if hp.get("n_inner") is None:
        hp["n_inner"] = 4 * out["n_embd"]
    out["n_inner"] = _as_int(hp, "n_inner", 1, 65536)

    arch = hp.get("arch", ARCH_GPT2)
    if isinstance(arch, str):
        if arch not in ARCH_CODES:
            raise ValueError(f"unsupported arch {arch!r} (supported: {', '.join(ARCH_CODES)})")
        arch = ARCH_CODES[arch]
    if arch not in ARCH_CODES.values():
        raise ValueError(f"hparams['arch'] must be 'gpt2' or 'llama', got {arch!r}")
    out["arch"] = arch
    if arch == ARCH_LLAMA:
        return _normalize_llama(hp, out)
    act = hp.get("activation", ACT_GELU_NEW)
    if isinstance(act, str):
        if act not in ACTIVATION_CODES:
            raise ValueError(
                f"unsupported activation {act!r} (supported: {', '.join(sorted(ACTIVATION_CODES))})")
        act = ACTIVATION_CODES[act]
    elif isinstance(act, (bool, np.bool_)) or not isinstance(act, (int, np.integer)) or int(act) not in (0, 1):
        raise ValueError(f"hparams['activation'] must be 0 (gelu_new), 1 (gelu) or a name, got {act!r}")
    out["activation"] = int(act)

    out["layer_norm_epsilon"] = _positive_f32(hp.get("layer_norm_epsilon", 1e-5), "layer_norm_epsilon",
                                              "layer_norm_epsilon")
    _normalize_ids(hp, out)
    out["n_tensors"] = 6 + 16 * out["n_layer"]
    return out


def _normalize_llama(hp: dict, out: dict) -> dict:
    """The Llama fields of normalize_hparams (header version 3)."""
    act = hp.get("activation", ACT_SILU)
    if act not in (ACT_SILU, "silu", "swiglu"):
        raise ValueError(f"a Llama model's activation is 'silu' (SwiGLU), got {act!r}")
    out["activation"] = ACT_SILU
    out["layer_norm_epsilon"] = _positive_f32(hp.get("layer_norm_epsilon", hp.get("rms_norm_eps", 1e-5)),
                                              "layer_norm_epsilon", "the RMSNorm epsilon")
    H = out["n_head"]
    if hp.get("n_kv_head") is None:
        hp["n_kv_head"] = H
    out["n_kv_head"] = _as_int(hp, "n_kv_head", 1, H)
    if H % out["n_kv_head"]:
        raise ValueError(f"n_kv_head {out['n_kv_head']} does not divide n_head {H}")
    if (out["n_embd"] // H) % 2:
        raise ValueError(f"head_dim {out['n_embd'] // H} is odd: rotary embeddings turn pairs")
    out["rope_theta"] = _positive_f32(hp.get("rope_theta", 10000.0), "rope_theta", "rope_theta")
    tied = hp.get("head_tied", True)
    if not isinstance(tied, (bool, np.bool_)):
        raise ValueError(f"hparams['head_tied'] must be True or False, got {tied!r}")
    out["head_tied"] = bool(tied)
    _normalize_ids(hp, out)
    # without the meta section, which a version 3 file always has
    out["n_tensors"] = 3 + 10 * out["n_layer"] + 1 + (0 if tied else 2) + 1
    return out


def _normalize_ids(hp: dict, out: dict) -> None:
    V = out["n_vocab"]
    if hp.get("eos_id") is None:
        raise ValueError("hparams is missing 'eos_id'")
    out["eos_id"] = _as_int(hp, "eos_id", 0, V - 1)
    if hp.get("bos_id") is None:
        hp["bos_id"] = out["eos_id"]
    out["bos_id"] = _as_int(hp, "bos_id", 0, V - 1)
    for key in ("q_id", "a_id", "do_id"):
        v = hp.get(key)
        if v is None or (isinstance(v, (int, np.integer)) and not isinstance(v, bool) and int(v) in (NO_TOKEN, -1)):
            out[key] = NO_TOKEN
        else:
            out[key] = _as_int(hp, key, 0, V - 1)


def tensor_specs(hparams: dict, with_meta: bool = False) -> list[TensorSpec]:
    """The canonical directory order (spec section 3); with_meta: a version 2 file, whose last
    entry is the meta section."""
    hp = normalize_hparams(hparams) if "n_tensors" not in hparams else hparams
    E, I, V, P, L = hp["n_embd"], hp["n_inner"], hp["n_vocab"], hp["n_positions"], hp["n_layer"]
    specs: list[TensorSpec] = []

    def add(kind, name, dtype, shape, layer=0):
        specs.append(TensorSpec(len(specs), name, kind, layer, kind + 256 * layer, dtype, shape))

    if hp["arch"] == ARCH_LLAMA:
        D = E // hp["n_head"]
        dims = (E, I, V, P, D, hp["n_kv_head"] * D)
        for kind, name, dt, shp in _LLAMA_PRE:
            add(kind, name, dt, shp(*dims))
        for layer in range(L):
            for kind, name, dt, shp in _LLAMA_LAYER:
                add(kind, f"h.{layer}.{name}", dt, shp(*dims), layer)
        for kind, name, dt, shp in _LLAMA_POST[:1 if hp["head_tied"] else 3]:
            add(kind, name, dt, shp(*dims))
    else:
        for kind, name, dt, shp in _GLOBAL_PRE:
            add(kind, name, dt, shp(E, I, V, P))
        for layer in range(L):
            for kind, name, dt, shp in _LAYER:
                add(kind, f"h.{layer}.{name}", dt, shp(E, I, V, P), layer)
        for kind, name, dt, shp in _GLOBAL_POST:
            add(kind, name, dt, shp(E, I, V, P))
    add(TOKENIZER_KIND, "tokenizer", DTYPE_RAW, None)
    if with_meta:
        add(META_KIND, "meta", DTYPE_RAW, None)
    assert len(specs) == hp["n_tensors"] + with_meta
    return specs


def spec_nbytes(spec: TensorSpec, tokenizer_nbytes: int | None = None, meta_nbytes: int = 0) -> int:
    if spec.kind == META_KIND:
        return int(meta_nbytes)
    if spec.dtype == DTYPE_RAW:
        if tokenizer_nbytes is None:
            raise ValueError("tokenizer section size needed")
        return int(tokenizer_nbytes)
    n = int(np.prod(spec.shape))
    return n * (1 if spec.dtype == DTYPE_INT8 else 4)


def plan_layout(hparams: dict, tokenizer_nbytes: int, meta_nbytes: int | None = None) -> dict:
    """Exact byte layout of a file: ``{'dir_offset', 'entries': [(spec, offset, nbytes)],
    'file_size'}``; meta_nbytes None: a version 1 file (no meta section). Tensors are packed in
    directory order, each at the next 16-aligned offset."""
    hp = normalize_hparams(hparams) if "n_tensors" not in hparams else hparams
    if meta_nbytes is None and hp["arch"] == ARCH_LLAMA:
        meta_nbytes = 0  # a version 3 file always has the meta section
    specs = tensor_specs(hp, with_meta=meta_nbytes is not None)
    dir_offset = HEADER_SIZE
    pos = dir_offset + DIR_ENTRY.size * len(specs)
    entries = []
    for spec in specs:
        pos = pad16(pos)
        nb = spec_nbytes(spec, tokenizer_nbytes, meta_nbytes or 0)
        entries.append((spec, pos, nb))
        pos += nb
    return {"dir_offset": dir_offset, "entries": entries, "file_size": pos}


def quantize_rows(w) -> tuple[np.ndarray, np.ndarray]:
    """Per-row symmetric INT8 quantization (spec 4.6).

    For each row o: ``amax = max|w[o]|``, ``s_o = amax / 127`` (f32; 0 if amax is 0),
    ``q[o, i] = round_half_even(w[o, i] / s_o)`` (f32 division) clamped to [-127, 127].
    A row whose scale underflows to 0 quantizes to all zeros.
    """
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"quantize_rows expects a 2-D matrix, got shape {w.shape}")
    if not np.issubdtype(w.dtype, np.floating):
        raise ValueError(f"quantize_rows expects a floating-point matrix, got {w.dtype}")
    w = w.astype(np.float32, copy=False)
    if not np.all(np.isfinite(w)):
        raise ValueError("quantize_rows: matrix has non-finite values")
    if w.shape[1] == 0:
        return np.zeros(w.shape, np.int8), np.zeros(w.shape[0], np.float32)
    amax = np.max(np.abs(w), axis=1)
    s = (amax / np.float32(127.0)).astype(np.float32)
    nz = s > 0
    div = np.where(nz, s, np.float32(1.0)).astype(np.float32)
    t = w / div[:, None]
    q = np.clip(np.rint(t), -127, 127)
    q[~nz, :] = 0
    return q.astype(np.int8), s


def dequantize_rows(q: np.ndarray, s: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * s.astype(np.float32)[:, None]


def check_tokenizer_section(section: bytes, n_vocab: int) -> dict:
    """Check a tokenizer section against every rule of spec section 6 (the checks live in
    tokenizer_section.parse_section); return its counts. Raises ValueError naming the rule."""
    from .tokenizer_section import parse_section

    if bytes(section[4:8]) == struct.pack("<I", 2):  # version 2: llama2.c's tokenizer (spec 6.2)
        from .llama2c_tokenizer import parse_section_v2

        v2 = parse_section_v2(section, n_vocab)
        return {"n_vocab": v2.n_vocab, "n_merges": 0, "n_special": len(v2.control_ids),
                "bytes_size": sum(map(len, v2.token_bytes)), "nbytes": len(section), "version": 2,
                "bos_id": v2.bos_id}
    vocab, merges, specials = parse_section(section, n_vocab)
    return {"n_vocab": len(vocab), "n_merges": len(merges), "n_special": len(specials),
            "bytes_size": sum(map(len, vocab)), "nbytes": len(section)}


def _check_tensor(spec: TensorSpec, arr) -> np.ndarray:
    name = spec.name
    if not isinstance(arr, np.ndarray):
        try:
            arr = np.asarray(arr)
        except Exception:  # pragma: no cover - defensive
            raise ValueError(f"tensor {name!r} is not an array") from None
    shape = tuple(int(x) for x in arr.shape)
    if shape != spec.shape:
        raise ValueError(f"tensor {name!r} has shape {shape}, expected {spec.shape}")
    if spec.dtype == DTYPE_INT8:
        if arr.dtype != np.int8:
            raise ValueError(f"tensor {name!r} has dtype {arr.dtype}, expected int8")
        if arr.size and int(arr.min()) < -127:
            raise ValueError(f"tensor {name!r} contains -128; quantized weights must be in [-127, 127]")
        return np.ascontiguousarray(arr)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"tensor {name!r} has dtype {arr.dtype}, expected float32")
    with np.errstate(over="ignore"):
        a32 = np.ascontiguousarray(arr, dtype="<f4")
    if not np.all(np.isfinite(a32)):
        bad = int(np.count_nonzero(~np.isfinite(a32)))
        raise ValueError(f"tensor {name!r} has {bad} non-finite value(s) (as float32)")
    if spec.is_scale and a32.size and float(a32.min()) < 0:
        raise ValueError(f"tensor {name!r} has a negative scale ({float(a32.min())})")
    return a32


def atomic_write_bytes(path, data) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory and ``os.replace``.
    On any failure the temp file is removed and ``path`` is left untouched."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise FileNotFoundError(f"output directory does not exist: {d}")
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def meta_section(meta: dict) -> bytes:
    """The meta section (spec section 8) of a dict of str -> str: one "key: value" line each, in
    the dict's order. Keys are lowercase ASCII letters, digits and '_', starting with a letter;
    values one line of text without control characters (they travel to the board as they are)."""
    if not isinstance(meta, dict):
        raise ValueError(f"meta must be a dict of str -> str, got {type(meta).__name__}")
    lines = []
    for k, v in meta.items():
        if not (isinstance(k, str) and k and "a" <= k[0] <= "z"
                and all("a" <= c <= "z" or "0" <= c <= "9" or c == "_" for c in k)):
            raise ValueError(f"meta key {k!r} must be lowercase ASCII letters, digits and '_', starting with a letter")
        if not isinstance(v, str) or v != v.strip() or not v:
            raise ValueError(f"meta value of {k!r} must be a non-empty str without surrounding spaces")
        bad = [c for c in v if ord(c) < 32 or 127 <= ord(c) < 160]
        if bad:
            raise ValueError(f"meta value of {k!r} holds control character U+{ord(bad[0]):04X}")
        lines.append(f"{k}: {v}\n")
    data = "".join(lines).encode("utf-8")
    if len(data) > MAX_META_BYTES:
        raise ValueError(f"meta section is {len(data)} bytes, more than {MAX_META_BYTES}")
    return data


def parse_meta(data: bytes) -> dict:
    """The dict a meta section holds (spec section 8). Raises ValueError naming the problem."""
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"meta section is not UTF-8 ({e})") from None
    if text and not text.endswith("\n"):
        raise ValueError("meta section: the last line has no line feed")
    out = {}
    for n, line in enumerate(text.split("\n")[:-1], 1):
        key, sep, value = line.partition(": ")
        if not sep or not key:
            raise ValueError(f"meta section line {n} is not 'key: value': {line[:60]!r}")
        out[key] = value
    return out


def build_model_bytes(hparams: dict, tensors: dict, tokenizer_section: bytes,
                      meta: dict | None = None) -> tuple[bytearray, dict]:
    """Validate everything and return ``(file bytes, info)`` without touching the disk.
    meta None: a version 1 file; a dict (e.g. {"abstain_answer": ...}): version 2 with a meta
    section."""
    hp = normalize_hparams(hparams)
    llama = hp["arch"] == ARCH_LLAMA
    if llama and meta is None:
        meta = {}  # a version 3 file always has the meta section, even empty
    meta_bytes = None if meta is None else meta_section(meta)
    if not isinstance(tensors, dict):
        raise ValueError(f"tensors must be a dict of name -> array, got {type(tensors).__name__}")
    tok_info = check_tokenizer_section(tokenizer_section, hp["n_vocab"])
    if tok_info.get("version") == 2 and tok_info["bos_id"] != hp["bos_id"]:
        raise ValueError(f"the tokenizer's bos_id {tok_info['bos_id']} differs from hparams bos_id {hp['bos_id']}")
    layout = plan_layout(hp, tok_info["nbytes"], None if meta_bytes is None else len(meta_bytes))
    specs = [e[0] for e in layout["entries"]]
    expected = {s.name for s in specs if s.dtype != DTYPE_RAW}
    unknown = sorted(set(tensors) - expected)
    if unknown:
        raise ValueError(f"unknown tensor name(s): {', '.join(map(repr, unknown[:5]))}"
                         + (" ..." if len(unknown) > 5 else ""))
    missing = [s.name for s in specs if s.dtype != DTYPE_RAW and s.name not in tensors]
    if missing:
        raise ValueError(f"missing tensor(s): {', '.join(map(repr, missing[:5]))}"
                         + (" ..." if len(missing) > 5 else ""))
    file_size = layout["file_size"]
    if file_size > 0xFFFFFFFF:
        raise ValueError(f"model file would be {file_size} bytes, more than a u32 file_size allows")

    buf = bytearray(file_size)
    for spec, offset, nbytes in layout["entries"]:
        if spec.kind == META_KIND:
            data = meta_bytes
        elif spec.dtype == DTYPE_RAW:
            data = bytes(tokenizer_section)
        else:
            data = _check_tensor(spec, tensors[spec.name]).tobytes()
        assert len(data) == nbytes, (spec.name, len(data), nbytes)
        buf[offset:offset + nbytes] = data
        DIR_ENTRY.pack_into(buf, layout["dir_offset"] + DIR_ENTRY.size * spec.order,
                            spec.tensor_id, spec.dtype, offset, nbytes)

    version = 1 if meta_bytes is None else 3 if llama else GPT2_FORMAT_VERSION
    struct.pack_into("<4s5I", buf, 0, MAGIC, version, HEADER_SIZE, file_size, 0, QUANT_SCHEME)
    struct.pack_into("<7I", buf, 24, hp["n_vocab"], hp["n_positions"], hp["n_embd"], hp["n_layer"],
                     hp["n_head"], hp["n_inner"], hp["activation"])
    struct.pack_into("<f", buf, 52, hp["layer_norm_epsilon"])
    struct.pack_into("<9I", buf, 56, hp["eos_id"], hp["bos_id"], hp["q_id"], hp["a_id"], hp["do_id"],
                     len(layout["entries"]), layout["dir_offset"], 0, 0)
    if llama:  # version 3: arch, n_kv_head, rope_theta, head_tied at 88..103
        struct.pack_into("<2IfI", buf, 88, ARCH_LLAMA, hp["n_kv_head"], hp["rope_theta"], int(hp["head_tied"]))
    # the rest of the header (reserved) stays zero
    crc = zlib.crc32(memoryview(buf)[20:]) & 0xFFFFFFFF
    struct.pack_into("<I", buf, 16, crc)
    info = {"hparams": hp, "file_size": file_size, "crc32": crc, "tokenizer": tok_info,
            "format_version": version, "meta": None if meta is None else dict(meta),
            "layout": [(s.name, s.tensor_id, DTYPE_NAMES[s.dtype], off, nb)
                       for s, off, nb in layout["entries"]]}
    return buf, info


def write_model_file(path, hparams: dict, tensors: dict, tokenizer_section: bytes,
                     meta: dict | None = None) -> dict:
    """Validate and write a model file atomically (version 1, or 2 with a meta dict). Returns
    info (hparams as written, file_size, crc32, tokenizer counts, layout rows (name, id, dtype,
    offset, nbytes))."""
    buf, info = build_model_bytes(hparams, tensors, tokenizer_section, meta)
    atomic_write_bytes(path, buf)
    info["path"] = os.fspath(path)
    return info


def format_info(info: dict, path=None) -> str:
    """`tinygpt info`: Model.info() as an aligned table with units (`--json` prints the dict)."""
    from .ui import format_bytes as _h
    from .ui import format_rows

    def ids():
        named = [("eos", info["eos_id"]), ("bos", info["bos_id"]), ("Q:", info["q_id"]), ("A:", info["a_id"]),
                 ("Do:", info["do_id"])]
        return ", ".join("%s %s" % (k, "-" if v in (None, NO_TOKEN) else v) for k, v in named)

    def size(n):
        return _h(n), "(%d bytes)" % n

    llama = info.get("arch") == "llama"
    rows = [("%s" % path if path is not None else "model", None),
            ("architecture", "", "Llama (RMSNorm, SwiGLU, rope theta %g, %s output head)"
             % (info["rope_theta"], "tied" if info["head_tied"] else "own") if llama else "GPT-2"),
            ("vocabulary", info["n_vocab"], "tokens"),
            ("positions", info["n_positions"], "tokens (n_positions)"),
            ("embedding", info["n_embd"], "(n_embd)"),
            ("layers", info["n_layer"], ""),
            ("heads", info["n_head"], "of %d dimensions each" % info["head_dim"]
             + ("" if info.get("arch") != "llama" else ", %d key/value heads" % info["n_kv_head"])),
            ("feed-forward", info["n_inner"], "(n_inner)"),
            ("activation", "", info["activation"] + (" (SwiGLU)" if info["activation"] == "silu" else "")),
            ("layer norm epsilon" if info.get("arch") != "llama" else "RMSNorm epsilon",
             "%g" % info["layer_norm_epsilon"], ""),
            ("token ids", "", ids()),
            ("abstain answer", "", repr(info[ABSTAIN_KEY]) if info.get(ABSTAIN_KEY) else
             "none (a model trained without one answers every question from its corpus)"),
            ("memory at n_ctx %d (prefill batches of %d)" % (info["n_ctx"], info["max_batch"]), None),
            ("file", *size(info["file_bytes"])),
            ("weights", *size(info["weight_bytes"])),
            ("tokenizer", *size(info["tokenizer_bytes"])),
            ("KV cache", *size(info["kv_bytes"])),
            ("scratch", *size(info["scratch_bytes"])),
            ("weights are", "mapped" if info.get("mapped") else "loaded",
             "(read in place from the file)" if info.get("mapped") else "(copied into memory)")]
    return format_rows(rows)


# ----------------------------------------------------------------------------- drafts section
# Optional, after the model's file_size bytes (docs/model-format.md section 7): engines and
# readers that do not know it read only file_size bytes and never see it. py/draft.py reads it.
DRAFTS_MAGIC = b"TDRF"
DRAFTS_VERSION = 1
DRAFTS_HEADER = struct.Struct("<4s5I")  # magic, version, n_answers, n_ids, crc32, reserved


def drafts_section(answers, eos_id: int, n_vocab: int) -> bytes:
    """The drafts section for answers (lists of token ids): each answer's ids then eos_id, as
    u16 little-endian, after the 24-byte header."""
    ids = []
    for i, a in enumerate(answers):
        for t in list(a) + [eos_id]:
            if not (isinstance(t, (int, np.integer)) and 0 <= t < n_vocab and t < 65536):
                raise ValueError(f"answer {i}: token id {t!r} is outside 0..{min(n_vocab, 65536) - 1}")
            ids.append(int(t))
    data = np.asarray(ids, dtype="<u2").tobytes()
    return DRAFTS_HEADER.pack(DRAFTS_MAGIC, DRAFTS_VERSION, len(answers), len(ids),
                              zlib.crc32(data) & 0xFFFFFFFF, 0) + data


def model_file_size(data: bytes) -> int:
    if len(data) < HEADER_SIZE or bytes(data[:4]) != MAGIC:
        raise ValueError("not a tinygpt model file")
    size = struct.unpack_from("<I", data, 12)[0]
    if size > len(data):
        raise ValueError(f"model file is {len(data)} bytes but its header says {size} (truncated?)")
    return size


def write_drafts(path, section: bytes | None) -> None:
    """Put the drafts section after the model in the file at path (replacing one that is
    there; None removes it), atomically. The model's bytes and CRC are unchanged."""
    with open(path, "rb") as f:
        data = f.read()
    size = model_file_size(data)
    atomic_write_bytes(path, bytes(data[:size]) + (section or b""))


def read_drafts(path) -> tuple[int, list[int]] | None:
    """(n_answers, ids) of the drafts section of the model file at path, or None without one."""
    with open(path, "rb") as f:
        data = f.read()
    rest = data[model_file_size(data):]
    if not rest:
        return None
    if len(rest) < DRAFTS_HEADER.size or rest[:4] != DRAFTS_MAGIC:
        raise ValueError(f"{path}: {len(rest)} bytes after the model are not a drafts section")
    _, version, n_answers, n_ids, crc, reserved = DRAFTS_HEADER.unpack_from(rest)
    body = rest[DRAFTS_HEADER.size:]
    if version != DRAFTS_VERSION or reserved:
        raise ValueError(f"{path}: drafts section version {version}, this reader knows {DRAFTS_VERSION}")
    if len(body) != 2 * n_ids:
        raise ValueError(f"{path}: drafts section says {n_ids} ids but holds {len(body)} bytes")
    if zlib.crc32(body) & 0xFFFFFFFF != crc:
        raise ValueError(f"{path}: drafts section CRC32 mismatch (damaged file)")
    return n_answers, np.frombuffer(body, dtype="<u2").astype(int).tolist()


# ----------------------------------------------------------------------------- the command

def add_arguments(p) -> None:
    """`tinygpt info MODEL`'s options."""
    p.add_argument("model")
    p.add_argument("--n-ctx", type=int, default=None, help="KV cache length to size (default: n_positions)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--selftest", action="store_true",
                   help="run the board self-test (py/selftest.py) on the PC: compare its bit-exact CRC with a "
                        "board's `import selftest; selftest.run()`")


def run_cli(args) -> None:
    """`tinygpt info`: the engine's numbers for the file (format_info), as text or JSON."""
    from .engine import Model
    from .ui import UserError, existing_file

    path = existing_file(args.model, "model file")
    if args.selftest:
        return _selftest(path)
    with Model(path, n_ctx=args.n_ctx) as m:
        info = m.info()
        try:
            info[ABSTAIN_KEY] = parse_meta(m.meta()).get(ABSTAIN_KEY)
        except ValueError as e:
            raise UserError(f"{path}: {e}") from None
    if args.json:
        import json
        print(json.dumps(info, indent=2))
        return
    print(format_info(info, path))


def _selftest(path):
    """py/selftest.py on the host engine: its "bit-exact" line must equal the board's."""
    import sys
    from pathlib import Path

    py_dir = str(Path(__file__).resolve().parents[2] / "py")
    if py_dir not in sys.path:
        sys.path.insert(0, py_dir)
    import selftest

    selftest.run(str(path))
