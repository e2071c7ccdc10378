"""Issue 22: the abstain answer. The corpus declares it (`Abstain:`), training pairs it with
off-topic questions, the model file records it (format version 2, meta section), and chat.py,
`tinygpt info --json` and `tinygpt eval --ood` read it. Version 1 files still load and answer
bit for bit as before."""
import json
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "py") not in sys.path:  # conftest.py has put host_tools/ there
    sys.path.insert(0, str(REPO / "py"))

from test_chat import micropy_bin  # noqa: E402,F401 - the fixture (MICROPY_BIN, else a skip with the build steps)
from test_train import KW, data  # noqa: E402,F401 - data: test_train's tiny corpus and tokenizer
from tinygpt import abstain, cli, corpus, modelfile, reference  # noqa: E402
from tinygpt import train as train_mod  # noqa: E402
from tinygpt.engine import Model  # noqa: E402

SHIPPED = REPO / "models" / "default" / "model.bin"
SAY = "I cannot answer that: it is not in my notes."


def v2_copy(path, meta):
    """The shipped model rewritten as a version 2 file with the given meta dict (meta None: a
    version 1 file, without the meta section the shipped file has)."""
    mf = reference.load(SHIPPED)
    buf, info = modelfile.build_model_bytes(dict(mf.hparams), dict(mf.tensors), mf.tokenizer_section, meta)
    Path(path).write_bytes(bytes(buf))
    return info


def v1_copy(path):
    info = v2_copy(path, None)
    assert info["format_version"] == 1
    return path


# ----------------------------------------------------------------------------- the format
def test_version_2_file_answers_as_version_1_and_carries_the_answer(tmp_path):
    info = v2_copy(tmp_path / "v2.bin", {"abstain_answer": SAY})
    assert info["format_version"] == 2
    v1 = v1_copy(tmp_path / "v1.bin")
    ids = [1, 300, 400, 57, 2]
    with Model(v1) as m1, Model(tmp_path / "v2.bin") as m2:
        m1.prefill(ids)
        m2.prefill(ids)
        assert np.array_equal(np.asarray(m1.logits()), np.asarray(m2.logits()))
        assert m1.meta() == b""
        assert m2.meta() == ("abstain_answer: %s\n" % SAY).encode()
        assert m2.info()["meta_bytes"] == len(m2.meta())
    ref = reference.load(tmp_path / "v2.bin")  # the independent reader agrees
    assert ref.meta == {"abstain_answer": SAY} and ref.header["format_version"] == 2
    assert reference.load(v1).meta == {}


def _patch(path, offset, data):
    """Overwrite bytes and recompute the header CRC, so only the changed rule can fail."""
    b = bytearray(Path(path).read_bytes())
    b[offset:offset + len(data)] = data
    size = struct.unpack_from("<I", b, 12)[0]
    struct.pack_into("<I", b, 16, zlib.crc32(bytes(b[20:size])) & 0xFFFFFFFF)
    Path(path).write_bytes(bytes(b))


def test_engine_and_reference_refuse_a_meta_section_with_a_control_byte(tmp_path):
    p = tmp_path / "bad.bin"
    v2_copy(p, {"abstain_answer": SAY})
    size = len(p.read_bytes())
    _patch(p, size - 5, b"\x00")  # inside the meta text (the last tensor)
    with pytest.raises(ValueError, match="meta section holds control byte 0x00"):
        Model(p)
    with pytest.raises(reference.FormatError, match="meta: control byte 0x00"):
        reference.load(p)


def test_a_version_1_header_with_a_meta_entry_is_refused(tmp_path):
    p = tmp_path / "v1meta.bin"
    v2_copy(p, {"abstain_answer": SAY})
    _patch(p, 4, struct.pack("<I", 1))  # version 1 says 6 + 16L tensors
    with pytest.raises(ValueError, match="n_tensors"):
        Model(p)
    with pytest.raises(reference.FormatError, match="n_tensors"):
        reference.load(p)


@pytest.mark.parametrize("meta, why", [
    ({"Abstain": "x"}, "lowercase"), ({"abstain_answer": "two\nlines"}, "control character"),
    ({"abstain_answer": " padded"}, "surrounding spaces"), ({"abstain_answer": ""}, "non-empty")])
def test_writer_refuses_bad_meta(meta, why):
    with pytest.raises(ValueError, match=why):
        modelfile.meta_section(meta)


def test_info_json_prints_the_abstain_answer(tmp_path, capsys):
    v2_copy(tmp_path / "v2.bin", {"abstain_answer": SAY})
    assert cli.main(["info", str(tmp_path / "v2.bin"), "--json"]) in (0, None)
    assert json.loads(capsys.readouterr().out)["abstain_answer"] == SAY
    assert cli.main(["info", str(v1_copy(tmp_path / "v1.bin")), "--json"]) in (0, None)
    assert json.loads(capsys.readouterr().out)["abstain_answer"] is None
    assert cli.main(["info", str(SHIPPED), "--json"]) in (0, None)  # the shipped model was trained with it
    assert json.loads(capsys.readouterr().out)["abstain_answer"] == corpus.DEFAULT_ABSTAIN


def test_chat_reads_the_abstain_answer(tmp_path):
    import chat

    v2_copy(tmp_path / "v2.bin", {"abstain_answer": SAY, "later_key": "ignored"})
    try:
        chat.load(str(tmp_path / "v2.bin"))
        assert chat.abstain_answer() == SAY
        chat.load(str(v1_copy(tmp_path / "v1.bin")))
        assert chat.abstain_answer() is None
    finally:
        chat.close()


# ----------------------------------------------------------------------------- the corpus
def test_corpus_declares_the_abstain_answer(tmp_path):
    c = tmp_path / "c.txt"
    c.write_text("Q: hi\nA: hello\n\nAbstain: %s\n\nQ: x\nA: y\n" % SAY, encoding="utf-8")
    assert [e.question for e in corpus.parse(c)] == ["hi", "x"]  # not an entry
    assert corpus.abstain_answer(c) == SAY and corpus.check(c) == []
    c.write_text("Q: hi\nA: hello\n", encoding="utf-8")
    assert corpus.abstain_answer(c) == corpus.DEFAULT_ABSTAIN


@pytest.mark.parametrize("text, why", [
    ("Q: hi\nA: hello\n\nAbstain: hello\n", "is the answer of the question on line 1"),
    ("Q: hi\nA: hello\n\nAbstain:\n", "empty Abstain"),
    ("Q: hi\nA: hello\n\nAbstain: one\n\nAbstain: two\n", "second Abstain"),
    ("Q: hi\nA: hello\nAbstain: one\n", "stands alone"),
    ("Q: hi\nA: hello\n\nAbstain: " + "x" * 301 + "\n", "more than 300"),
    ("Q: hi\nA: hello\n\nAbstain: tab\there\n", "control character U\\+0009"),
])
def test_bad_abstain_declarations_are_named(tmp_path, text, why):
    c = tmp_path / "c.txt"
    c.write_text(text, encoding="utf-8")
    assert any(why.replace("\\", "") in str(p) or __import__("re").search(why, str(p)) for p in corpus.check(c)), \
        corpus.check(c)
    with pytest.raises(ValueError, match=why):
        corpus.abstain_answer(c)


def test_off_topic_questions_that_share_the_corpus_subject_are_left_out(tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text("# comment\nHow do I bake sourdough bread?\nWho wrote Hamlet?\nbest oven temperature "
                   "for bread\nWhat is the capital of Peru?\n", encoding="utf-8")
    entries = [corpus.Entry("qa", "How do I bake bread at home?", "Knead ten minutes, proof, then bake.", 1),
               corpus.Entry("qa", "What oven temperature for baking?", "220 C for most loaves.", 3)]
    got, left = abstain.off_topic_entries(entries, SAY, 10, seed=1, path=lst)
    assert sorted(e.question for e in got) == ["What is the capital of Peru?", "Who wrote Hamlet?"]
    assert left == 2 and all(e.answer == SAY and e.kind == "qa" for e in got)
    got2, _ = abstain.off_topic_entries(entries, SAY, 1, seed=1, path=lst)
    assert len(got2) == 1


def test_the_shipped_list_is_distinct_from_the_measured_out_of_domain_questions():
    norm = corpus._norm
    measured = {norm(line) for f in ("dev.txt", "test.txt")
                for line in (REPO / "data" / "ood" / f).read_text(encoding="utf-8").splitlines() if line.strip()}
    shipped = abstain.read_questions()
    assert len(shipped) >= 1000
    assert not [q for q in shipped if norm(q) in measured]


# ----------------------------------------------------------------------------- train -> convert -> chat / eval
def test_training_teaches_the_declared_answer_and_convert_records_it(data, tmp_path):
    from tinygpt import convert, evaluate

    d, c, tok = data
    own = tmp_path / "corpus.txt"
    own.write_text(c.read_text(encoding="utf-8") + "\nAbstain: %s\n" % SAY, encoding="utf-8")
    lines = []
    res = train_mod.train(own, tok, tmp_path / "run", epochs=1, max_steps=3,
                          **dict(KW, abstain=12, log=lambda *a: lines.append(" ".join(map(str, a)))))
    assert any(line.startswith("abstain: 12 off-topic questions answered with %r" % SAY) for line in lines), lines
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["abstain_answer"] == SAY and res["abstain"] == {"answer": SAY, "off_topic_questions": 12}
    rep = convert.convert(tmp_path / "run", tmp_path / "m.bin", progress=False)
    assert rep["format_version"] == 2 and rep["abstain_answer"] == SAY
    with Model(tmp_path / "m.bin") as m:
        assert modelfile.parse_meta(m.meta())["abstain_answer"] == SAY
    ood = tmp_path / "ood.txt"
    ood.write_text("Who wrote Hamlet?\n\nWhat is the capital of Peru?\n", encoding="utf-8")
    out = evaluate.evaluate(tmp_path / "m.bin", own, ood_file=ood, log=None, progress=False, limit=5)
    assert out["abstain_answer"] == SAY and out["n_ood"] == 2
    a = out["abstention"]["int8"]
    assert a["ood_abstained"] == sum(r["int8"] == SAY for r in out["ood_results"])
    assert a["in_domain_abstained"] == sum(r["int8"] == SAY for r in out["results"])


def test_abstain_zero_trains_without_off_topic_questions(data, tmp_path):
    d, c, tok = data
    res = train_mod.train(c, tok, tmp_path / "run", epochs=1, max_steps=2, **dict(KW, abstain=0, log=None))
    assert res["abstain"]["off_topic_questions"] == 0
    assert "abstain_answer" not in json.loads((tmp_path / "run" / "config.json").read_text())


def test_chat_reads_the_abstain_answer_under_micropython(tmp_path):
    """py/chat.py's meta reading under real MicroPython (the PyPI unix port) on the board double,
    which reads the meta section of a real version 2 file."""
    import subprocess

    from test_chat import micropython_cmd

    v2_copy(tmp_path / "v2.bin", {"abstain_answer": SAY + " \u00e9t\u00e9"})
    code = ("import sys\nsys.path[:0] = [%r, %r]\nimport chat\nchat.load(%r)\nprint(chat.abstain_answer())\n"
            "chat.load(%r)\nprint(chat.abstain_answer())\n"
            % (str(REPO / "tests" / "double"), str(REPO / "py"), str(tmp_path / "v2.bin"), str(v1_copy(tmp_path / "v1.bin"))))
    p = subprocess.run(micropython_cmd() + ["-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr + p.stdout
    assert p.stdout.splitlines() == [SAY + " \u00e9t\u00e9", "None"]


# ----------------------------------------------------------------------------- py/topic.py
TOPIC_CASES = ["How do I water a Cactus?", "PLANTS plants plant's 'quoted' glass ss", "Who wrote WAR and Peace?",
               "\u00c9t\u00e9 na\u00efve caf\u00e9 \u212a", "!!!", "how are you", "repot-ting 2x4 o'clock it's",
               "\u00fcber Stra\u00dfe MIXED case 123abc", ""]


def test_topic_content_words_are_the_same_under_micropython():
    import subprocess

    import topic
    from test_chat import micropython_cmd

    code = ("import sys\nsys.path.insert(0, %r)\nimport topic\nfor t in %r:\n"
            "    print(' '.join(sorted(topic.content_words(t))))\n" % (str(REPO / "py"), TOPIC_CASES))
    p = subprocess.run(micropython_cmd() + ["-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    want = [" ".join(sorted(topic.content_words(t))) for t in TOPIC_CASES]
    assert p.stdout.split("\n")[:-1] == want
    assert want[0] == "cactu water" and want[1] == "glass plant quoted ss"  # "s" dropped, "ss" kept


def test_off_topic_needs_one_known_word():
    import topic

    known = topic.known_words_line(["How often do I water a cactus?", "Cacti want sun and dry soil."])
    assert known == "cacti cactu dry often soil sun water"
    assert topic.off_topic("Who wrote Hamlet?", known)
    assert not topic.off_topic("my CACTUS looks sad", known)
    assert not topic.off_topic("how are you?", known)  # no content word: the model decides
    assert not topic.off_topic("Who wrote Hamlet?", "")


def test_ask_gives_the_abstain_answer_without_a_model_pass_for_an_unknown_subject(tmp_path, capsys):
    import chat

    v2_copy(tmp_path / "v2.bin", {"abstain_answer": SAY, "known_words": "psram ram"})
    try:
        m = chat.load(str(tmp_path / "v2.bin"))
        m.reset_counters()
        assert chat.ask("Who wrote Hamlet?") == SAY
        assert m.counters()["passes"] == 0
        assert capsys.readouterr().out == SAY + "\n"
        assert chat.ask("What is PSRAM?", stream=False) != SAY  # a known word: the model answers
        assert m.counters()["passes"] > 0
    finally:
        chat.close()


def test_train_records_the_known_words_and_convert_writes_them(data, tmp_path):
    from tinygpt import convert, evaluate

    d, c, tok = data
    train_mod.train(c, tok, tmp_path / "run", epochs=1, max_steps=2, **dict(KW, abstain=5, log=None))
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["abstain_known_words"] == abstain.known_words(corpus.parse(c))
    convert.convert(tmp_path / "run", tmp_path / "m.bin", progress=False)
    with Model(tmp_path / "m.bin") as m:
        assert modelfile.parse_meta(m.meta())["known_words"] == cfg["abstain_known_words"]
    ood = tmp_path / "ood.txt"
    ood.write_text("zebra xylophone quantum?\n", encoding="utf-8")
    out = evaluate.evaluate(tmp_path / "m.bin", c, ood_file=ood, log=None, progress=False, limit=3)
    assert out["ood_results"][0]["gated"] and out["ood_results"][0]["int8"] == cfg["abstain_answer"]


@pytest.mark.parametrize("bad", [b"\xff", b"\xc3", b"\xc0\xaf", b"\xe2\x82"])
def test_engine_refuses_a_meta_section_that_is_not_utf8(tmp_path, bad):
    p = tmp_path / "bad.bin"
    v2_copy(p, {"abstain_answer": "x" * 8})
    size = len(p.read_bytes())
    _patch(p, size - 1 - len(bad), bad)  # the last bytes before the final line feed
    with pytest.raises(ValueError, match="meta section is not UTF-8"):
        Model(p)
    with pytest.raises(reference.FormatError, match="meta: not UTF-8"):
        reference.load(p)


def test_max_minutes_fits_the_schedule_to_the_time(data, tmp_path):
    """Issue 22 (3): with --max-minutes and no --max-steps the cosine schedule ends when the time
    does, instead of the run stopping in mid-schedule at a high learning rate."""
    d, c, tok = data
    res = train_mod.train(c, tok, tmp_path / "r", epochs=2000, max_minutes=0.05, **dict(KW, log=None))
    assert res["planned_steps"] is not None and res["total_steps"] < res["planned_steps"]
    assert res["steps"] <= res["total_steps"]
    fixed = train_mod.train(c, tok, tmp_path / "r2", epochs=2, max_minutes=5, **dict(KW, log=None))
    assert fixed["planned_steps"] is None and fixed["steps"] == fixed["total_steps"]  # fits: the plan stays


def test_a_run_from_before_abstention_resumes_with_abstain_0(data, tmp_path):
    import torch

    d, c, tok = data
    out = tmp_path / "old"
    train_mod.train(c, tok, out, epochs=1, stop_after=2, **dict(KW, log=None))
    ck = out / train_mod.CHECKPOINT_DIR / train_mod.CHECKPOINT_FILE
    state = torch.load(ck, weights_only=False)
    for k in ("abstain", "abstain_sha256", "abstain_answer"):
        del state["identity"][k]  # as a checkpoint written before these keys existed
    torch.save(state, ck)
    res = train_mod.train(c, tok, out, epochs=1, resume=True, **dict(KW, log=None))
    assert res["stopped"] is False
    with pytest.raises(ValueError, match="--abstain: checkpoint 0 vs now 3"):
        train_mod.train(c, tok, tmp_path / "old", epochs=2, resume=True, **dict(KW, log=None, abstain=3))


QUESTIONS = ["Who wrote Hamlet?", "What is PSRAM?", "psram", "zzzz", "Is PSRAM the same as RAM?"]


def test_the_board_module_answers_and_abstains_like_the_pc(micropy_bin, tmp_path):  # noqa: F811
    """The real MicroPython binding (MICROPY_BIN) reads the meta section; chat.ask on it gives the
    PC's answers, the abstain answer included."""
    import subprocess

    import chat

    v2_copy(tmp_path / "v2.bin", {"abstain_answer": SAY, "known_words": "psram ram"})
    code = ("import sys\nsys.path.insert(0, %r)\nimport chat, tinygpt\nprint(tinygpt.FORMAT_VERSION)\n"
            "chat.load(%r)\nprint(chat.abstain_answer())\nfor q in %r:\n    print(chat.ask(q, stream=False))\n"
            % (str(REPO / "py"), str(tmp_path / "v2.bin"), QUESTIONS))
    p = subprocess.run([micropy_bin, "-X", "heapsize=16M", "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    try:
        chat.load(str(tmp_path / "v2.bin"))
        want = [str(modelfile.FORMAT_VERSION), SAY] + [chat.ask(q, stream=False) for q in QUESTIONS]
    finally:
        chat.close()
    assert p.stdout.split("\n")[:-1] == want
    assert want[2] == SAY and want[3] != SAY
