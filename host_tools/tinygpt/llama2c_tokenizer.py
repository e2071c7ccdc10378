"""llama2.c tokenizers (sentencepiece-style BPE with byte fallback) and the tokenizer section of
format version 2 (``TTOK`` version 2, docs/model-format.md section 6.2), host side.

* ``read_tokenizer_bin(src, n_vocab) -> Llama2cVocab``: a llama2.c ``tokenizer.bin`` (path or
  bytes), every field checked; a broken file is a ValueError naming the problem.
* ``write_tokenizer_bin(pieces, scores, max_token_length=None) -> bytes``: the same file format
  (for tests and for hand-made vocabularies).
* ``section_from_tokenizer_bin(src, n_vocab) -> bytes``: the TTOK v2 section that encodes and
  decodes exactly as llama2.c's run.c does (see "Divergences" below for the inputs where run.c
  has no sane answer; those files are refused rather than converted into something else).
* ``section_from_hf_tokenizer_json(src) -> bytes``: the same section from a Hugging Face
  ``tokenizers`` sentencepiece-style BPE (Llama layout: byte_fallback, "▁" for spaces, merges),
  **only when its rank-ordered merges give exactly the score-ordered result** (see below);
  otherwise a ValueError that says which piece breaks it.
* ``build_section_v2(...)`` writes any section from token bytes, scores and the header fields;
  ``parse_section_v2(buf, n_vocab=None)`` reads one back, checking every rule of spec section 6.2.
* ``LLAMA2C_SPECIAL_IDS``: the ids a model file's header takes for a llama2.c tokenizer
  (``bos_id`` 1, ``eos_id`` 2; the section holds bos_id, the header holds eos_id).

llama2.c's tokenizer.bin: ``u32 max_token_length``, then for each of the n_vocab tokens
``f32 score, i32 len, len bytes``; the file does not say n_vocab (the model's config does). Ids
0, 1, 2 are ``<unk>``, ``<s>`` (BOS), ``</s>`` (EOS); 3 .. 258 the byte-fallback tokens, whose text
is literally ``<0x00>`` .. ``<0xFF>``; sentencepiece's "▁" is already a space in every piece.

Rank-ordered merges (Hugging Face) versus score order (sentencepiece, llama2.c)
    HF's BPE merges the adjacent pair of lowest *merge rank* (leftmost on equal rank, i.e. for
    the same pair), and only pairs listed in its merges. llama2.c merges the adjacent pair whose
    concatenation is a piece of highest *score* (leftmost on equal score), any pair of pieces.
    The two agree when (1) every pair of pieces whose concatenation is a piece is a listed merge,
    (2) every multi-character piece has exactly one split into two pieces (otherwise two
    different pairs with the same result have one score for llama2.c, leftmost first, but two
    ranks for HF, lower rank first, whatever their places: "ab|a|ba" gives "aba|ba" in llama2.c
    and, with (a, ba) ranked first, "ab|aba" in HF), and (3) ranks order like the results' scores.
    A real Llama tokenizer.json (made by transformers from the sentencepiece model) meets (1)
    and (3) but not (2), so no section can encode exactly like it; this function converts the
    tokenizer.json files that meet all three and refuses the others, naming the first piece
    that breaks a rule (for a Llama model, convert its tokenizer.bin / sentencepiece model
    instead: the section then encodes like sentencepiece, which Llama was trained with).
    Also refused: a Metaspace pre-tokenizer (it adds no "▁" to a text that already starts with
    a space; sentencepiece and llama2.c always do). Not an error but a difference: HF splits
    the added tokens' texts ("<s>") out of a text; the section never matches control tokens.

Divergences from run.c that the converter refuses (all absent from Llama 2's tokenizer.bin)
  * two tokens with the same text (run.c's bsearch picks either); a normal piece that is empty
    or holds a NUL byte (run.c reads pieces as C strings); a piece run.c would decode as a byte
    (its decode() takes any piece starting ``<0x`` + a hex digit for a byte token);
  * a piece that run.c could reach through a control or byte token's text: the text of token
    0, 1, 2 or a byte token being one UTF-8 character or the concatenation of two pieces' texts,
    or a normal piece that is the concatenation of such a text and another piece;
  * no ``" "`` piece (run.c's dummy prefix would be id -1); a normal piece with score <= -1e10
    (run.c never merges it); a non-finite score.
"""
from __future__ import annotations

import json
import math
import os
import struct
from collections import namedtuple

SECTION_MAGIC = b"TTOK"
SECTION_VERSION_SP = 2
FLAG_ADD_DUMMY_PREFIX = 1
FLAG_BOS_STRIPS_SPACE = 2
FLAGS_KNOWN = FLAG_ADD_DUMMY_PREFIX | FLAG_BOS_STRIPS_SPACE
MAX_VOCAB = 65536
HEADER_SIZE = 32

LLAMA2C_UNK_ID, LLAMA2C_BOS_ID, LLAMA2C_EOS_ID, LLAMA2C_BYTE_BASE = 0, 1, 2, 3
LLAMA2C_SPECIAL_IDS = {"bos_id": LLAMA2C_BOS_ID, "eos_id": LLAMA2C_EOS_ID}
RUNC_MIN_SCORE = -1e10  # run.c's best_score starts here and needs a strictly larger score

Llama2cVocab = namedtuple("Llama2cVocab", "max_token_length scores pieces")
SectionV2 = namedtuple("SectionV2", "n_vocab byte_base bos_id flags control_ids token_bytes scores sorted_ids")


def _pad4(n: int) -> int:
    return (n + 3) & ~3


def section_size(n_vocab: int, bytes_size: int) -> int:
    """nbytes of a TTOK v2 section: header, tok_off, blob + pad, scores, control + sorted ids."""
    return HEADER_SIZE + 4 * (n_vocab + 1) + _pad4(bytes_size) + 4 * n_vocab + 4 * (n_vocab - 256)


def _f32_finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and abs(x) <= 3.4028234663852886e38


def _as_f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def _read_source(src, what: str) -> bytes:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src)
    if isinstance(src, (str, os.PathLike)):
        try:
            with open(src, "rb") as f:
                return f.read()
        except OSError as e:
            raise ValueError(f"cannot read {what} {os.fspath(src)}: {e.strerror or e}") from None
    raise ValueError(f"{what} must be a path or bytes, got {type(src).__name__}")


# ----------------------------------------------------------------------------- tokenizer.bin

def byte_piece(b: int) -> bytes:
    """The text of byte-fallback token for byte b in a sentencepiece vocabulary: b'<0x0A>'."""
    return b"<0x%02X>" % b


def read_tokenizer_bin(src, n_vocab: int) -> Llama2cVocab:
    """Parse a llama2.c tokenizer.bin holding exactly n_vocab tokens (the count is the model's:
    the file does not record it). Checks the layout only; section_from_tokenizer_bin checks the
    vocabulary."""
    if isinstance(n_vocab, bool) or not isinstance(n_vocab, int):
        raise ValueError(f"n_vocab must be an int, got {type(n_vocab).__name__}")
    if not 1 <= n_vocab <= MAX_VOCAB:
        raise ValueError(f"n_vocab {n_vocab} is out of range 1..{MAX_VOCAB}")
    data = _read_source(src, "tokenizer.bin")
    n = len(data)
    if n < 4:
        raise ValueError(f"tokenizer.bin is {n} bytes: truncated before max_token_length (4 bytes)")
    (max_len,) = struct.unpack_from("<I", data, 0)
    pieces, scores = [], []
    p = 4
    while p < n:
        t = len(pieces)
        if n - p < 8:
            raise ValueError(f"tokenizer.bin is truncated in the header of token {t} at byte {p} "
                             f"({n - p} of 8 bytes)")
        score, ln = struct.unpack_from("<fi", data, p)
        if ln < 0:
            raise ValueError(f"tokenizer.bin token {t} has a negative length {ln} (byte {p + 4})")
        if ln > n - p - 8:
            raise ValueError(f"tokenizer.bin is truncated in token {t}: its length is {ln} but only "
                             f"{n - p - 8} bytes follow (byte {p + 8})")
        if not math.isfinite(score):
            raise ValueError(f"tokenizer.bin token {t} has a non-finite score {score}")
        scores.append(score)
        pieces.append(data[p + 8:p + 8 + ln])
        p += 8 + ln
        if len(pieces) > MAX_VOCAB:
            break
    if len(pieces) != n_vocab:
        more = "at least " if len(pieces) > MAX_VOCAB else ""
        raise ValueError(f"tokenizer.bin holds {more}{len(pieces)} tokens but n_vocab is {n_vocab}")
    longest = max((len(x) for x in pieces), default=0)
    if max_len < longest:
        raise ValueError(f"tokenizer.bin max_token_length is {max_len} but token "
                         f"{[len(x) for x in pieces].index(longest)} is {longest} bytes long "
                         f"(run.c's merge buffer would overflow)")
    return Llama2cVocab(max_len, scores, pieces)


def write_tokenizer_bin(pieces, scores, max_token_length: int | None = None) -> bytes:
    """A llama2.c tokenizer.bin: pieces (bytes, or str written as UTF-8) and their scores."""
    pieces = [p.encode("utf-8") if isinstance(p, str) else bytes(p) for p in pieces]
    if len(pieces) != len(scores):
        raise ValueError(f"{len(pieces)} pieces but {len(scores)} scores")
    if max_token_length is None:
        max_token_length = max((len(p) for p in pieces), default=0)
    out = [struct.pack("<I", max_token_length)]
    for p, s in zip(pieces, scores):
        out.append(struct.pack("<fi", s, len(p)))
        out.append(p)
    return b"".join(out)


def _parse_byte_piece(p: bytes):
    """run.c's decode() test, sscanf(piece, "<0x%02hhX>"): the byte value, or None. It accepts
    one or two hex digits (either case) after '<0x' and ignores what follows."""
    if len(p) < 4 or p[:3] != b"<0x":
        return None
    hexd = b"0123456789abcdefABCDEF"
    if p[3] not in hexd:
        return None
    k = 5 if len(p) > 4 and p[4] in hexd else 4
    return int(p[3:k], 16)


def _is_one_utf8_char(p: bytes) -> bool:
    try:
        return len(p.decode("utf-8")) == 1
    except UnicodeDecodeError:
        return False


def section_from_tokenizer_bin(src, n_vocab: int) -> bytes:
    """The TTOK v2 section of a llama2.c tokenizer.bin (path or bytes) with n_vocab tokens."""
    voc = read_tokenizer_bin(src, n_vocab)
    pieces, scores = voc.pieces, voc.scores
    nb = LLAMA2C_BYTE_BASE
    if n_vocab < nb + 256 + 1:
        raise ValueError(f"n_vocab {n_vocab} is too small for a llama2.c tokenizer: ids 0..2 are "
                         f"<unk>, <s>, </s> and 3..258 the byte tokens")
    control = (LLAMA2C_UNK_ID, LLAMA2C_BOS_ID, LLAMA2C_EOS_ID)
    text_id: dict[bytes, int] = {}
    for t, p in enumerate(pieces):
        if p in text_id:
            raise ValueError(f"tokens {text_id[p]} and {t} have the same text {p!r} "
                             f"(run.c's lookup would pick either)")
        text_id[p] = t
    for b in range(256):
        t = nb + b
        if pieces[t] != byte_piece(b):
            where = text_id.get(byte_piece(b))
            also = f"; {byte_piece(b).decode()} is token {where}" if where is not None else ""
            raise ValueError(f"token {t} is {pieces[t]!r}, expected the byte token "
                             f"{byte_piece(b).decode()} (byte tokens are ids 3..258 in order{also})")
    kind = ["n"] * n_vocab  # n normal, c control, b byte
    for t in control:
        kind[t] = "c"
    for t in range(nb, nb + 256):
        kind[t] = "b"
    for t, p in enumerate(pieces):
        if kind[t] != "n":
            continue
        if not p:
            raise ValueError(f"token {t} is empty (a normal piece needs at least one byte)")
        if 0 in p:
            raise ValueError(f"token {t} ({p!r}) holds a NUL byte (run.c reads pieces as C strings)")
        bv = _parse_byte_piece(p)
        if bv is not None:
            raise ValueError(f"token {t} ({p!r}) is not a byte token but run.c's decode would "
                             f"turn it into byte {bv:#04x}")
        if scores[t] <= RUNC_MIN_SCORE:
            raise ValueError(f"token {t} ({p!r}) has score {scores[t]:g} <= -1e10, which run.c's "
                             f"encode never merges")
    if text_id.get(b" ") is None or kind[text_id[b" "]] != "n":
        raise ValueError("no normal token is ' ' (run.c's encode needs it for the dummy prefix)")
    # Pieces run.c could reach through a control or byte token's text, which the section cannot
    # express (there, control and byte tokens never take part in a merge).
    for t, p in enumerate(pieces):
        if kind[t] != "n" and _is_one_utf8_char(p):
            raise ValueError(f"token {t} ({p!r}) is a control or byte token whose text is one "
                             f"character: run.c's encode would match it in the text")
        for k in range(1, len(p)):
            a, b = text_id.get(p[:k]), text_id.get(p[k:])
            if a is None or b is None:
                continue
            if kind[t] != "n" or kind[a] != "n" or kind[b] != "n":
                raise ValueError(f"run.c's encode could merge tokens {a} and {b} into token {t} "
                                 f"({p!r}), through a control or byte token's text")
    tb = list(pieces)
    for b in range(256):
        tb[nb + b] = bytes([b])
    return build_section_v2(tb, scores, byte_base=nb, bos_id=LLAMA2C_BOS_ID, control_ids=control,
                            flags=FLAG_ADD_DUMMY_PREFIX | FLAG_BOS_STRIPS_SPACE)


# ----------------------------------------------------------------------------- the section

def build_section_v2(token_bytes, scores, byte_base: int, bos_id: int, control_ids,
                     flags: int = FLAG_ADD_DUMMY_PREFIX | FLAG_BOS_STRIPS_SPACE) -> bytes:
    """Write a TTOK v2 section. token_bytes[t] is token t's decoded bytes (a byte token: its one
    raw byte), scores[t] its score. The result is checked with parse_section_v2 before it is
    returned, so a bad input is a ValueError naming the rule."""
    tb = [bytes(x) for x in token_bytes]
    nv = len(tb)
    if len(scores) != nv:
        raise ValueError(f"{nv} tokens but {len(scores)} scores")
    if not 257 <= nv <= MAX_VOCAB:
        raise ValueError(f"n_vocab {nv} is out of range 257..{MAX_VOCAB}")
    sc = []
    for t, s in enumerate(scores):
        if not _f32_finite(s):
            raise ValueError(f"token {t} has a score {s!r} that is not a finite f32")
        s = _as_f32(float(s))
        sc.append(0.0 if s == 0 else s)  # -0.0 is written as 0.0
    control = sorted(set(int(c) for c in control_ids))
    if len(control) != len(list(control_ids)):
        raise ValueError("control ids are listed twice")
    special = set(control)
    for c in control:
        if not 0 <= c < nv:
            raise ValueError(f"control id {c} is out of range 0..{nv - 1}")
    if not 0 <= byte_base <= nv - 256:
        raise ValueError(f"byte_base {byte_base} leaves no room for 256 byte tokens in n_vocab {nv}")
    normal = [t for t in range(nv) if t not in special and not byte_base <= t < byte_base + 256]
    normal.sort(key=lambda t: tb[t])
    blob = b"".join(tb)
    offs = [0]
    for x in tb:
        offs.append(offs[-1] + len(x))
    out = bytearray()
    out += SECTION_MAGIC
    out += struct.pack("<7I", SECTION_VERSION_SP, nv, byte_base, bos_id, len(control), flags, len(blob))
    out += struct.pack(f"<{nv + 1}I", *offs)
    out += blob + bytes(_pad4(len(blob)) - len(blob))
    out += struct.pack(f"<{nv}f", *sc)
    out += struct.pack(f"<{len(control)}I", *control)
    out += struct.pack(f"<{len(normal)}I", *normal)
    sec = bytes(out)
    parse_section_v2(sec)
    return sec


def parse_section_v2(buf, n_vocab: int | None = None) -> SectionV2:
    """Read a TTOK v2 section, checking every rule of spec section 6.2 (ValueError naming it)."""
    if not isinstance(buf, (bytes, bytearray, memoryview)):
        raise ValueError(f"tokenizer section must be bytes, got {type(buf).__name__}")
    sec = bytes(buf)
    size = len(sec)
    if size < HEADER_SIZE:
        raise ValueError(f"tokenizer section is {size} bytes, shorter than its 32-byte header")
    if sec[:4] != SECTION_MAGIC:
        raise ValueError(f"tokenizer section magic is {sec[:4]!r}, expected {SECTION_MAGIC!r}")
    version, nv, bb, bos, nc, flags, bsize = struct.unpack_from("<7I", sec, 4)
    if version != SECTION_VERSION_SP:
        raise ValueError(f"tokenizer section version is {version}, expected {SECTION_VERSION_SP}")
    if not 257 <= nv <= MAX_VOCAB:
        raise ValueError(f"tokenizer section n_vocab is {nv}; out of range 257..{MAX_VOCAB}")
    if n_vocab is not None and nv != n_vocab:
        raise ValueError(f"tokenizer section n_vocab is {nv}, the model header says {n_vocab}")
    if bb > nv - 256:
        raise ValueError(f"tokenizer section byte_base {bb} + 256 byte tokens exceeds n_vocab {nv}")
    if bos >= nv:
        raise ValueError(f"tokenizer section bos_id {bos} is >= n_vocab {nv}")
    if not 1 <= nc <= nv - 256:
        raise ValueError(f"tokenizer section n_control is {nc}; out of range 1..{nv - 256}")
    if flags & ~FLAGS_KNOWN:
        raise ValueError(f"tokenizer section flags {flags:#x} has unknown bits (allowed: {FLAGS_KNOWN:#x})")
    if bsize > size:
        raise ValueError(f"tokenizer section bytes_size {bsize} exceeds the section ({size} bytes)")
    want = section_size(nv, bsize)
    if size != want:
        raise ValueError(f"tokenizer section is {size} bytes, its header implies {want}")
    offs = struct.unpack_from(f"<{nv + 1}I", sec, HEADER_SIZE)
    if offs[0] != 0:
        raise ValueError(f"tokenizer section tok_off[0] is {offs[0]}, expected 0")
    for t in range(nv):
        if offs[t + 1] < offs[t]:
            raise ValueError(f"tokenizer section tok_off decreases at token {t + 1}")
    if offs[nv] != bsize:
        raise ValueError(f"tokenizer section tok_off[n_vocab] is {offs[nv]}, expected bytes_size {bsize}")
    boff = HEADER_SIZE + 4 * (nv + 1)
    blob = sec[boff:boff + bsize]
    if any(sec[boff + bsize:boff + _pad4(bsize)]):
        raise ValueError("tokenizer section padding after the token bytes is not zero")
    tb = [blob[offs[t]:offs[t + 1]] for t in range(nv)]
    for b in range(256):
        if tb[bb + b] != bytes([b]):
            raise ValueError(f"tokenizer section token {bb + b} (byte_base + {b:#04x}) is {tb[bb + b]!r}, "
                             f"expected the single byte {bytes([b])!r}")
    soff = boff + _pad4(bsize)
    raw = struct.unpack_from(f"<{nv}I", sec, soff)
    for t, u in enumerate(raw):
        if (u >> 23) & 0xFF == 0xFF:
            raise ValueError(f"tokenizer section score of token {t} is not finite")
    scores = struct.unpack_from(f"<{nv}f", sec, soff)
    coff = soff + 4 * nv
    control = struct.unpack_from(f"<{nc}I", sec, coff)
    prev = -1
    for c in control:
        if c >= nv:
            raise ValueError(f"tokenizer section control id {c} is >= n_vocab {nv}")
        if c <= prev:
            raise ValueError(f"tokenizer section control ids are not strictly increasing at {c}")
        if bb <= c < bb + 256:
            raise ValueError(f"tokenizer section control id {c} is a byte token")
        prev = c
    if bos not in control:
        raise ValueError(f"tokenizer section bos_id {bos} is not a control id")
    nn = nv - 256 - nc
    ids = struct.unpack_from(f"<{nn}I", sec, coff + 4 * nc)
    cset = set(control)
    seen = set()
    prevb = None
    for k, t in enumerate(ids):
        if t >= nv:
            raise ValueError(f"tokenizer section sorted id {t} (entry {k}) is >= n_vocab {nv}")
        if bb <= t < bb + 256 or t in cset:
            raise ValueError(f"tokenizer section sorted id {t} (entry {k}) is a byte or control token")
        if t in seen:
            raise ValueError(f"tokenizer section sorted id {t} is listed twice")
        seen.add(t)
        if not tb[t]:
            raise ValueError(f"tokenizer section normal token {t} has empty bytes")
        if prevb is not None and not prevb < tb[t]:
            raise ValueError(f"tokenizer section sorted ids are not in strictly increasing byte "
                             f"order at entry {k} (token {t})")
        prevb = tb[t]
    return SectionV2(nv, bb, bos, flags, tuple(control), tb, tuple(scores), tuple(ids))


# ----------------------------------------------------------------------------- Hugging Face

META = "\u2581"  # sentencepiece's space


def _hf_json(src) -> dict:
    if isinstance(src, dict):
        return src
    if hasattr(src, "to_str"):  # tokenizers.Tokenizer
        return json.loads(src.to_str())
    if isinstance(src, (str, os.PathLike)) and os.path.isdir(src):
        src = os.path.join(src, "tokenizer.json")
    data = _read_source(src, "tokenizer.json")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"tokenizer.json is not valid JSON: {e}") from None


def _hf_check_pipeline(d: dict) -> None:
    """The normalizer / pre-tokenizer must be sentencepiece Llama's: prepend one "▁" to a
    non-empty text and turn every " " into "▁", no splitting (Llama 2's tokenizer.json)."""
    norm, pre = d.get("normalizer"), d.get("pre_tokenizer")

    def steps(x):
        if x is None:
            return []
        if x.get("type") == "Sequence":
            return list(x.get("normalizers") or x.get("pretokenizers") or [])
        return [x]

    ns = steps(norm)
    ps = steps(pre)
    ok_norm = (len(ns) == 2 and ns[0].get("type") == "Prepend" and ns[0].get("prepend") == META
               and ns[1].get("type") == "Replace" and ns[1].get("pattern") == {"String": " "}
               and ns[1].get("content") == META)
    if ok_norm and not ps:
        return
    if len(ps) == 1 and ps[0].get("type") == "Metaspace":
        raise ValueError("tokenizer.json uses a Metaspace pre-tokenizer: it adds no '▁' to a text that "
                         "starts with a space (sentencepiece and llama2.c always add the dummy prefix), "
                         "so no TTOK v2 section encodes like it")
    raise ValueError("tokenizer.json is not a sentencepiece Llama-style pipeline: expected the "
                     "normalizer Sequence[Prepend('▁'), Replace(' ', '▁')] and no pre-tokenizer; got "
                     f"normalizer {[x.get('type') for x in ns]} and pre-tokenizer "
                     f"{[x.get('type') for x in ps]}")


def section_from_hf_tokenizer_json(src, bos_token: str = "<s>", exact: bool = True) -> bytes:
    """The TTOK v2 section of a sentencepiece-style Hugging Face BPE tokenizer (tokenizer.json
    path, its directory, its parsed dict or a tokenizers.Tokenizer).

    exact=True: only when its merges are exactly reproduced by score order (module doc): every
    multi-character piece has exactly one split into two pieces, that split is a listed merge,
    every listed merge is such a split, and scores are then -rank.

    exact=False (a real Llama tokenizer.json, made from a sentencepiece model): a piece's score is
    minus the rank of the first merge that makes it. Hugging Face writes a sentencepiece model's
    merges in the order of the merged pieces' scores, so this is the order sentencepiece (and
    llama2.c) merge in; where a piece has several splits, Hugging Face's ranks can order them
    differently from sentencepiece's leftmost-first rule, and then this section follows
    sentencepiece. A Metaspace pre-tokenizer is taken as sentencepiece's dummy prefix.

    Byte tokens <0x00>..<0xFF> must be contiguous; the added (special) tokens become the control
    ids."""
    d = _hf_json(src)
    model = d.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"tokenizer model is {model.get('type')!r}, expected BPE")
    if not model.get("byte_fallback"):
        raise ValueError("BPE byte_fallback is false; a TTOK v2 section needs byte fallback")
    for opt in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(opt) not in (None, ""):
            raise ValueError(f"BPE {opt}={model.get(opt)!r} is not supported")
    if model.get("ignore_merges"):
        raise ValueError("BPE ignore_merges=true is not supported")
    try:
        _hf_check_pipeline(d)
    except ValueError:
        pre = d.get("pre_tokenizer") or {}
        if (exact or d.get("normalizer") is not None or pre.get("type") != "Metaspace"
                or pre.get("replacement") != META or pre.get("split", True) is not False):
            raise
    vocab = model.get("vocab") or {}
    nv = len(vocab)
    added = {a["content"]: a["id"] for a in d.get("added_tokens") or []}
    for text, tid in added.items():
        if vocab.get(text) != tid:
            raise ValueError(f"added token {text!r} (id {tid}) is not the vocab's token of that text")
    if nv > MAX_VOCAB or sorted(vocab.values()) != list(range(nv)):
        raise ValueError(f"vocab ids are not 0..{nv - 1} (or there are more than {MAX_VOCAB})")
    text_of = [""] * nv
    for text, tid in vocab.items():
        text_of[tid] = text
    try:
        bb = vocab["<0x00>"]
    except KeyError:
        raise ValueError("vocab has no byte token <0x00>") from None
    for b in range(256):
        if vocab.get("<0x%02X>" % b) != bb + b:
            raise ValueError(f"byte token <0x{b:02X}> is not id byte_base + {b} = {bb + b}")
    if bos_token not in added:
        raise ValueError(f"bos token {bos_token!r} is not an added token")
    control = sorted(added.values())
    kind = {}
    for t in control:
        kind[t] = "c"
    for t in range(bb, bb + 256):
        kind[t] = "b"
    normal = {text_of[t]: t for t in range(nv) if t not in kind}
    if META not in normal:
        raise ValueError("vocab has no normal '▁' piece (the dummy prefix)")
    merges = model.get("merges") or []
    rank: dict[str, int] = {}
    for k, m in enumerate(merges):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        if a not in normal or b not in normal:
            raise ValueError(f"merge {k} ({a!r}, {b!r}) has a part that is not a normal piece")
        if a + b not in normal:
            raise ValueError(f"merge {k} ({a!r}, {b!r}): {a + b!r} is not a normal piece")
        if a + b in rank:
            if not exact:
                continue  # the piece's score is its first merge's
            raise ValueError(f"merge {k} ({a!r}, {b!r}) makes {a + b!r} again (merge {rank[a + b]}): "
                             f"two merges with one result rank apart in Hugging Face but tie in score "
                             f"order")
        rank[a + b] = k
    scores = [0.0] * nv
    for text, t in normal.items():
        splits = [(text[:k], text[k:]) for k in range(1, len(text))
                  if text[:k] in normal and text[k:] in normal]
        if len(splits) > 1 and exact:
            raise ValueError(f"piece {text!r} (id {t}) has {len(splits)} splits into two pieces "
                             f"({splits[0]!r}, {splits[1]!r}, ...): Hugging Face's ranks and score "
                             f"order can disagree on it")
        if splits and text not in rank:
            raise ValueError(f"piece {text!r} (id {t}) = {splits[0]!r} but that pair is no merge")
        if text in rank:
            scores[t] = -float(rank[text] + 1)
    tb = []
    for t in range(nv):
        if kind.get(t) == "b":
            tb.append(bytes([t - bb]))
        else:
            tb.append(text_of[t].replace(META, " ").encode("utf-8"))
    flags = FLAG_ADD_DUMMY_PREFIX | FLAG_BOS_STRIPS_SPACE
    return build_section_v2(tb, scores, byte_base=bb, bos_id=added[bos_token], control_ids=control,
                            flags=flags)
