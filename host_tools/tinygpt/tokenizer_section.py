"""The tokenizer section of a tinygpt model file (spec section 6), host side.

* ``build_section(tokenizer) -> bytes``: the section bytes of a byte-level BPE tokenizer
  (a ``tokenizers.Tokenizer``, a transformers fast tokenizer, a tokenizer.json path, a
  directory holding tokenizer.json or GPT-2 style vocab.json + merges.txt [+ added_tokens.json],
  or the parsed tokenizer.json as a dict).
* ``special_token_ids(tokenizer) -> dict``: ``eos_id`` / ``q_id`` / ``a_id`` / ``do_id``.
* ``parse_section(buf, n_vocab=None) -> (vocab_bytes, merges, special_ids)``: read a section back,
  checking every rule of the spec.
* ``load_hf_tokenizer(tokenizer) -> tokenizers.Tokenizer``: the same inputs, as a HF tokenizer.
* ``hf_char_classes()`` / ``class_table_literal()``: the letter / number / whitespace / other class
  of every code point as Hugging Face's GPT-2 pre-tokenizer sees it, which is what the hand-written
  scanner of ``py/bpe.py`` embeds (``python -m tinygpt.tokenizer_section --class-table`` prints it).

Token bytes in the section are raw bytes: the model vocabulary's GPT-2 "bytes_to_unicode"
spelling is mapped back to bytes, and added tokens (special or not) are their ``content`` as
UTF-8. Every added token goes into the section's special list: Hugging Face splits all added
tokens out of the text before the pre-tokenizer, which is exactly spec step 1.
"""
from __future__ import annotations

import json
import os
import struct

SECTION_MAGIC = b"TTOK"
SECTION_VERSION = 1
PRETOKENIZER_GPT2 = 1
CORE_SPECIALS = ("<|endoftext|>", "Q:", "A:", "Do:")
_SPECIAL_KEYS = (("eos_id", "<|endoftext|>"), ("q_id", "Q:"), ("a_id", "A:"), ("do_id", "Do:"))
MAX_VOCAB = 65536

# character classes of the pre-tokenizer (same numbering as py/bpe.py)
CLS_OTHER, CLS_LETTER, CLS_NUMBER, CLS_SPACE = 0, 1, 2, 3


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_UNICODE_TO_BYTE = {c: b for b, c in bytes_to_unicode().items()}


def _pad4(n: int) -> int:
    return (n + 3) & ~3


# ----------------------------------------------------------------------------- loading

def _read_json(path):
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None


def _named_specials(d: str) -> list[str]:
    """Special-token texts named in special_tokens_map.json / tokenizer_config.json of a dir."""
    names: list[str] = []

    def add(v):
        if isinstance(v, str):
            names.append(v)
        elif isinstance(v, dict) and isinstance(v.get("content"), str):
            names.append(v["content"])
        elif isinstance(v, list):
            for x in v:
                add(x)

    for fn in ("special_tokens_map.json", "tokenizer_config.json"):
        p = os.path.join(d, fn)
        if not os.path.isfile(p):
            continue
        data = _read_json(p)
        if not isinstance(data, dict):
            continue
        for key in ("bos_token", "eos_token", "unk_token", "pad_token", "additional_special_tokens"):
            add(data.get(key))
        atd = data.get("added_tokens_decoder")
        if isinstance(atd, dict):
            for v in atd.values():
                add(v)
    return names


def _load_vocab_merges_dir(d: str):
    """A HF Tokenizer from GPT-2 style vocab.json + merges.txt (+ added_tokens.json). Added
    (split-out) tokens: those of added_tokens.json, plus the project's four specials and the
    tokens named in special_tokens_map.json / tokenizer_config.json that are in the vocab."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab_path, merges_path = os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt")
    vocab = _read_json(vocab_path)
    if not isinstance(vocab, dict):
        raise ValueError(f"{vocab_path}: expected a JSON object token -> id")
    try:
        tok = Tokenizer(models.BPE.from_file(vocab_path, merges_path))
    except Exception as e:
        raise ValueError(f"cannot load BPE from {vocab_path} + {merges_path}: {e}") from None
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    added_path = os.path.join(d, "added_tokens.json")
    if os.path.isfile(added_path):
        added = _read_json(added_path)
        if not isinstance(added, dict):
            raise ValueError(f"{added_path}: expected a JSON object token -> id")
        for text, tid in sorted(added.items(), key=lambda kv: kv[1]):
            tok.add_special_tokens([AddedToken(text, special=True, normalized=False)])
            if tok.token_to_id(text) != tid:
                raise ValueError(f"{added_path}: token {text!r} should have id {tid}, but the ids "
                                 f"are not contiguous after vocab.json")
    names = [s for s in dict.fromkeys(list(CORE_SPECIALS) + _named_specials(d)) if s in vocab]
    if names:
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in names])
    return tok


def load_hf_tokenizer(tokenizer):
    """A ``tokenizers.Tokenizer`` from any input ``build_section`` accepts."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if hasattr(tokenizer, "backend_tokenizer"):  # transformers PreTrainedTokenizerFast
        return tokenizer.backend_tokenizer
    if isinstance(getattr(tokenizer, "_tokenizer", None), Tokenizer):  # tokenizers implementations
        return tokenizer._tokenizer
    if not isinstance(tokenizer, (str, os.PathLike)):
        raise ValueError(f"tokenizer must be a path or a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
    p = os.fspath(tokenizer)
    if os.path.isdir(p):
        if os.path.isfile(os.path.join(p, "tokenizer.json")):
            p = os.path.join(p, "tokenizer.json")
        elif os.path.isfile(os.path.join(p, "vocab.json")) and os.path.isfile(os.path.join(p, "merges.txt")):
            return _load_vocab_merges_dir(p)
        else:
            raise ValueError(f"no tokenizer in directory {tokenizer}: expected tokenizer.json or "
                             f"vocab.json + merges.txt")
    elif not os.path.isfile(p):
        raise ValueError(f"tokenizer file not found: {tokenizer}")
    try:
        return Tokenizer.from_file(p)
    except Exception as e:
        raise ValueError(f"cannot read tokenizer {p}: {e}") from None


# ----------------------------------------------------------------------------- checking

def _overlap(x: str, y: str) -> bool:
    """Can matches of x and y overlap in some text?"""
    if x in y or y in x:
        return True
    for k in range(1, min(len(x), len(y))):
        if x.endswith(y[:k]) or y.endswith(x[:k]):
            return True
    return False


def _tokenizer_json(tokenizer) -> dict:
    """The tokenizer.json content (a dict) of any accepted input; a dict is taken as that."""
    if isinstance(tokenizer, dict):
        return tokenizer
    tok = load_hf_tokenizer(tokenizer)
    try:
        return json.loads(tok.to_str())
    except Exception as e:  # pragma: no cover - every tokenizers.Tokenizer serialises
        raise ValueError(f"cannot serialise the tokenizer: {e}") from None


def _analyse(tokenizer):
    """Check that the tokenizer is what spec section 6 describes and return
    (token_bytes list, merges [(l, r, res)], added [(id, content)])."""
    d = _tokenizer_json(tokenizer)
    model = d.get("model") or {}
    mtype = model.get("type")
    if mtype != "BPE":
        raise ValueError(f"tokenizer model is {mtype!r}; only byte-level BPE is supported")
    if model.get("dropout") not in (None, 0, 0.0):
        raise ValueError(f"BPE dropout {model.get('dropout')} is not supported (encoding must be deterministic)")
    if model.get("continuing_subword_prefix"):
        raise ValueError("BPE continuing_subword_prefix is not supported (not a GPT-2 byte-level BPE)")
    if model.get("end_of_word_suffix"):
        raise ValueError("BPE end_of_word_suffix is not supported (not a GPT-2 byte-level BPE)")
    if model.get("ignore_merges"):
        raise ValueError("BPE ignore_merges=true is not supported (spec: words are always built by merges)")

    if d.get("normalizer") is not None:
        raise ValueError(f"tokenizer has a normalizer ({d['normalizer'].get('type')!r}); the device "
                         f"tokenizer does not normalize, so none is supported")
    pre = d.get("pre_tokenizer")
    if pre is None:
        raise ValueError("tokenizer has no pre-tokenizer; expected ByteLevel (GPT-2 byte-level BPE)")
    pres = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if len(pres) != 1 or pres[0].get("type") != "ByteLevel":
        kinds = [p.get("type") for p in pres]
        raise ValueError(f"pre-tokenizer is {kinds}; only a single ByteLevel pre-tokenizer "
                         f"(GPT-2 byte-level BPE) is supported")
    if pres[0].get("add_prefix_space"):
        raise ValueError("tokenizer uses add_prefix_space=true; the tinygpt tokenizer has no prefix space")
    if pres[0].get("use_regex", True) is not True:
        raise ValueError("ByteLevel pre-tokenizer with use_regex=false is not supported "
                         "(spec: the GPT-2 split pattern)")

    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        raise ValueError("BPE model has no vocab")
    added = []
    for a in d.get("added_tokens") or []:
        content, tid = a.get("content"), a.get("id")
        if not isinstance(content, str) or not content:
            raise ValueError(f"added token {tid} has empty content")
        for opt in ("single_word", "lstrip", "rstrip"):
            if a.get(opt):
                raise ValueError(f"added token {content!r} uses {opt}=true, which is not supported "
                                 f"(spec: added tokens are split out exactly as written)")
        added.append((tid, content, bool(a.get("normalized"))))
    norm = [c for _, c, n in added if n]
    raw = [c for _, c, n in added if not n]
    for x in norm:
        for y in raw:
            if _overlap(x, y):
                raise ValueError(f"added tokens {x!r} (normalized=true) and {y!r} (normalized=false) "
                                 f"can overlap; Hugging Face matches those in two passes, the spec in one")

    id_text: dict[int, str] = {}
    for text, tid in vocab.items():
        if not isinstance(tid, int) or tid < 0:
            raise ValueError(f"vocab entry {text!r} has a bad id {tid!r}")
        if tid in id_text:
            raise ValueError(f"vocab ids are not unique: {id_text[tid]!r} and {text!r} are both {tid}")
        id_text[tid] = text
    added_ids = {}
    for tid, content, _ in added:
        if not isinstance(tid, int) or tid < 0:
            raise ValueError(f"added token {content!r} has a bad id {tid!r}")
        if tid in added_ids:
            raise ValueError(f"added tokens {added_ids[tid]!r} and {content!r} share id {tid}")
        added_ids[tid] = content
    n = len(set(id_text) | set(added_ids))
    if set(id_text) | set(added_ids) != set(range(n)):
        missing = sorted(set(range(max(set(id_text) | set(added_ids)) + 1)) - set(id_text) - set(added_ids))
        raise ValueError(f"vocab ids are not contiguous 0..{n - 1}: first missing id is {missing[0]}")
    if n > MAX_VOCAB:
        raise ValueError(f"vocab has {n} tokens; the model format allows at most {MAX_VOCAB}")

    toks: list[bytes] = [b""] * n
    for tid in range(n):
        if tid in added_ids:
            toks[tid] = added_ids[tid].encode("utf-8")
            continue
        text = id_text[tid]
        try:
            toks[tid] = bytes(_UNICODE_TO_BYTE[c] for c in text)
        except KeyError as e:
            raise ValueError(f"token {text!r} (id {tid}) is not byte-level: character {e.args[0]!r} "
                             f"is not in GPT-2's byte alphabet (not a byte-level BPE tokenizer)") from None
        if not text:
            raise ValueError(f"token id {tid} is empty")

    merges = []
    seen = {}
    for k, m in enumerate(model.get("merges") or []):
        if isinstance(m, str):
            parts = m.split(" ")
        else:
            parts = list(m)
        if len(parts) != 2 or not all(isinstance(p, str) for p in parts):
            raise ValueError(f"merge {k} ({m!r}) is not a pair of tokens")
        a, b = parts
        if a not in vocab or b not in vocab:
            missing = a if a not in vocab else b
            raise ValueError(f"merge {k} ({a!r}, {b!r}): {missing!r} is not in the vocab")
        if a + b not in vocab:
            raise ValueError(f"merge {k} ({a!r}, {b!r}): the result {a + b!r} is not in the vocab")
        l, r, res = vocab[a], vocab[b], vocab[a + b]
        if (l, r) in seen:
            raise ValueError(f"merge {k} ({a!r}, {b!r}) repeats merge {seen[(l, r)]}")
        seen[(l, r)] = k
        if toks[res] != toks[l] + toks[r]:
            raise ValueError(f"merge {k} ({a!r}, {b!r}): bytes of token {res} are not the bytes of "
                             f"{l} followed by those of {r} (an added token shadows a merge result)")
        merges.append((l, r, res))

    owner = {}
    for tid, t in enumerate(toks):
        if len(t) == 1:
            if t[0] in owner:
                raise ValueError(f"byte {t[0]:#04x} is the whole text of two tokens ({owner[t[0]]} and "
                                 f"{tid}); spec needs exactly one")
            owner[t[0]] = tid
    if len(owner) != 256:
        b = min(set(range(256)) - set(owner))
        raise ValueError(f"byte {b:#04x} has no single-byte token; a byte-level BPE needs all 256 "
                         f"({256 - len(owner)} missing)")
    specials = sorted(added_ids.items())
    return toks, merges, specials


# ----------------------------------------------------------------------------- public API

def build_section(tokenizer) -> bytes:
    """The spec section 6 bytes of a byte-level BPE tokenizer. Raises ValueError naming the
    problem when the tokenizer is not one the device tokenizer reproduces exactly."""
    toks, merges, specials = _analyse(tokenizer)
    n = len(toks)
    blob = b"".join(toks)
    offs = [0]
    for t in toks:
        offs.append(offs[-1] + len(t))
    out = bytearray()
    out += SECTION_MAGIC
    out += struct.pack("<7I", SECTION_VERSION, n, len(merges), len(specials), PRETOKENIZER_GPT2,
                       len(blob), 0)
    out += struct.pack("<%dI" % (n + 1), *offs)
    out += blob
    out += b"\0" * (_pad4(len(blob)) - len(blob))
    for m in merges:
        out += struct.pack("<3I", *m)
    out += struct.pack("<%dI" % len(specials), *(tid for tid, _ in specials))
    assert len(out) == 32 + 4 * (n + 1) + _pad4(len(blob)) + 12 * len(merges) + 4 * len(specials)
    return bytes(out)


def special_token_ids(tokenizer) -> dict:
    """{'eos_id', 'q_id', 'a_id', 'do_id'}: the ids of ``<|endoftext|>``, ``Q:``, ``A:``, ``Do:``
    (None where absent). Q:/A:/Do: count only as added (split-out) tokens; ``<|endoftext|>`` may
    also be a plain vocabulary entry (GPT-2's vocab.json has it there)."""
    d = _tokenizer_json(tokenizer)
    added = {}
    for a in d.get("added_tokens") or []:
        added.setdefault(a.get("content"), a.get("id"))
    vocab = (d.get("model") or {}).get("vocab") or {}
    out = {}
    for key, text in _SPECIAL_KEYS:
        tid = added.get(text)
        if tid is None and key == "eos_id":
            tid = vocab.get(text)
        out[key] = tid
    return out


def parse_section(buf, n_vocab: int | None = None):
    """Read a tokenizer section: (vocab_bytes: list[bytes], merges: list[(left, right, result)],
    special_ids: list[int]). Checks every rule of spec section 6 (and n_vocab when given);
    raises ValueError naming the broken rule."""
    if not isinstance(buf, (bytes, bytearray, memoryview)):
        raise ValueError(f"tokenizer section must be bytes, got {type(buf).__name__}")
    sec = bytes(buf)
    if len(sec) < 32:
        raise ValueError(f"tokenizer section is {len(sec)} bytes, shorter than its 32-byte header")
    magic, version, nv, nm, ns, pretok, bsize, reserved = struct.unpack_from("<4s7I", sec, 0)
    if magic != SECTION_MAGIC:
        raise ValueError(f"tokenizer section magic is {magic!r}, expected {SECTION_MAGIC!r}")
    if version != SECTION_VERSION:
        raise ValueError(f"tokenizer section version is {version}, expected {SECTION_VERSION}")
    if n_vocab is not None and nv != n_vocab:
        raise ValueError(f"tokenizer section n_vocab is {nv}, the model's is {n_vocab}")
    if not 256 <= nv <= MAX_VOCAB:
        raise ValueError(f"tokenizer section n_vocab is {nv}; a byte-level BPE needs 256..{MAX_VOCAB}")
    if pretok != PRETOKENIZER_GPT2:
        raise ValueError(f"tokenizer section pretokenizer is {pretok}, expected {PRETOKENIZER_GPT2}")
    if reserved != 0:
        raise ValueError(f"tokenizer section reserved field is {reserved}, expected 0")
    expect = 32 + 4 * (nv + 1) + _pad4(bsize) + 12 * nm + 4 * ns
    if len(sec) != expect:
        raise ValueError(f"tokenizer section is {len(sec)} bytes, its header implies {expect}")
    off = 32
    offs = struct.unpack_from("<%dI" % (nv + 1), sec, off)
    off += 4 * (nv + 1)
    if offs[0] != 0:
        raise ValueError(f"tokenizer section tok_off[0] is {offs[0]}, expected 0")
    if offs[nv] != bsize:
        raise ValueError(f"tokenizer section tok_off[n_vocab] is {offs[nv]}, expected bytes_size {bsize}")
    for t in range(nv):
        if offs[t + 1] < offs[t]:
            raise ValueError(f"tokenizer section tok_off decreases at token {t + 1}")
    blob = sec[off:off + bsize]
    off += _pad4(bsize)
    toks = [blob[offs[t]:offs[t + 1]] for t in range(nv)]
    flat = struct.unpack_from("<%dI" % (3 * nm), sec, off)
    off += 12 * nm
    merges = []
    for k in range(nm):
        l, r, res = flat[3 * k], flat[3 * k + 1], flat[3 * k + 2]
        if l >= nv or r >= nv or res >= nv:
            raise ValueError(f"tokenizer section merge {k} ({l}, {r}, {res}) has an id >= n_vocab {nv}")
        if toks[res] != toks[l] + toks[r]:
            raise ValueError(f"tokenizer section merge {k}: bytes({res}) != bytes({l}) + bytes({r})")
        merges.append((l, r, res))
    specials = list(struct.unpack_from("<%dI" % ns, sec, off))
    seen = set()
    for sid in specials:
        if sid >= nv:
            raise ValueError(f"tokenizer section special id {sid} is >= n_vocab {nv}")
        if sid in seen:
            raise ValueError(f"tokenizer section special id {sid} is listed twice")
        seen.add(sid)
        if not toks[sid]:
            raise ValueError(f"tokenizer section special token {sid} has empty bytes")
    count = [0] * 256
    for t in toks:
        if len(t) == 1:
            count[t[0]] += 1
    for b in range(256):
        if count[b] != 1:
            raise ValueError(f"tokenizer section: byte {b:#04x} is the whole text of {count[b]} "
                             f"tokens, expected exactly 1")
    return toks, merges, specials


# ----------------------------------------------------------------------------- character classes

def _guess_class(cp: int) -> int:
    import unicodedata

    if 0xD800 <= cp <= 0xDFFF:
        return CLS_OTHER
    c = chr(cp)
    cat = unicodedata.category(c)
    if cat[0] == "L":
        return CLS_LETTER
    if cat[0] == "N":
        return CLS_NUMBER
    if c.isspace():
        return CLS_SPACE
    return CLS_OTHER


def hf_char_classes() -> bytearray:
    """The class (CLS_*) of every code point 0..0x10FFFF under Hugging Face's GPT-2 byte-level
    pre-tokenizer (its regex engine's \\p{L}, \\p{N}, \\s). Starts from Python's unicodedata and
    verifies it against ``tokenizers`` in big batches: "<x>" + run of chars of x's class is one
    pre-token exactly when every char of the run has that class; failing batches are bisected.
    Surrogates (which no str holds) are 'other'. Takes a few seconds."""
    from tokenizers import pre_tokenizers

    pt = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    lead = {CLS_LETTER: "a", CLS_NUMBER: "1", CLS_OTHER: "!", CLS_SPACE: "\t"}
    cls = bytearray(_guess_class(cp) for cp in range(0x110000))

    def one_piece(cps, k):
        return len(pt.pre_tokenize_str(lead[k] + "".join(map(chr, cps)))) == 1

    def verify(cps, k):
        if not cps or one_piece(cps, k):
            return
        if len(cps) == 1:
            for k2 in (CLS_LETTER, CLS_NUMBER, CLS_OTHER, CLS_SPACE):
                if one_piece(cps, k2):
                    cls[cps[0]] = k2
                    return
            raise RuntimeError(f"cannot classify U+{cps[0]:04X}")  # pragma: no cover
        h = len(cps) // 2
        verify(cps[:h], k)
        verify(cps[h:], k)

    for k in (CLS_LETTER, CLS_NUMBER, CLS_OTHER, CLS_SPACE):
        members = [cp for cp in range(0x110000) if cls[cp] == k and not 0xD800 <= cp <= 0xDFFF]
        for i in range(0, len(members), 4096):
            verify(members[i:i + 4096], k)
    return cls


def class_runs(cls, start: int = 0x80) -> bytes:
    """Run-length table of code point classes from ``start`` on: 3 bytes little-endian per run,
    (first code point << 2) | class, sorted (the format py/bpe.py's _UTAB uses)."""
    out = bytearray()
    prev = None
    for cp in range(start, len(cls)):
        if cls[cp] != prev:
            prev = cls[cp]
            v = (cp << 2) | prev
            out += bytes((v & 255, (v >> 8) & 255, v >> 16))
    return bytes(out)


def class_table_literal(table: bytes | None = None, width: int = 96) -> str:
    """Python source for ``_UTAB = (...)`` as embedded in py/bpe.py."""
    if table is None:
        table = class_runs(hf_char_classes())
    lines = ["_UTAB = ("]
    cur = ""
    for b in table:
        esc = "\\x%02x" % b
        if len(cur) + len(esc) > width:
            lines.append("    b'%s'" % cur)
            cur = ""
        cur += esc
    if cur:
        lines.append("    b'%s'" % cur)
    lines.append(")")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    import sys

    if sys.argv[1:] == ["--class-table"]:
        print(class_table_literal())
    elif len(sys.argv) == 3:
        sec = build_section(sys.argv[1])
        with open(sys.argv[2], "wb") as f:
            f.write(sec)
        print(f"{sys.argv[2]}: {len(sec)} bytes")
    else:
        print("usage: python -m tinygpt.tokenizer_section TOKENIZER OUT.bin | --class-table")
        sys.exit(2)
