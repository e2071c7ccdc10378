"""tinygpt corpus augment: question variants of any corpus, deterministic for a seed, answers and
prose never touched, the output passes the corpus check."""
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
try:
    import tinygpt  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO / "host_tools"))

from tinygpt import augment, corpus  # noqa: E402

CORPUS = """\
Q: What is PSRAM?
A: Extra RAM next to the chip, 8 MB on this board.

Q: How do I list the files on the board?
Do: mpremote ls

A paragraph of prose about the board.
It has two lines, and Q: never starts them.

Q: how much RAM does the board have
A: 512 KB of SRAM and 8 MB of PSRAM.
Q: Can you tell me how big the flash is?
A: 16 MB of flash.

Q: what is the  flash
A: 16 MB of flash.

Q: hey
A: Hello!

Q: What is the board?
A: An ESP32-S3 development board.
"""


@pytest.fixture
def src(tmp_path):
    p = tmp_path / "in.txt"
    p.write_text(CORPUS, encoding="utf-8")
    return p


def test_output_is_the_input_plus_checked_variants(src, tmp_path):
    out = tmp_path / "out.txt"
    rep = augment.augment_file(src, out, per_question=6, seed=3)
    text = out.read_text(encoding="utf-8")
    assert text.startswith(CORPUS)  # every original byte, in order: answers and prose untouched
    assert corpus.check(out) == []
    before, after = corpus.parse(src), corpus.parse(out)
    assert after[:len(before)] == before
    new = after[len(before):]
    assert len(new) == rep["variants"] == rep["entries_out"] - rep["entries_in"]
    assert rep["questions"] == 7 and all(e.kind != "prose" for e in new)
    # each variant repeats the answer of a question it was made from; at most 6 per question
    answers = {(e.kind, e.answer) for e in before if e.kind != "prose"}
    assert all((e.kind, e.answer) in answers for e in new)
    made, counts = augment.augment_entries(before, 6, seed=3)  # the file holds what the API makes
    assert [(e.question, e.answer) for e in made] == [(e.question, e.answer) for e in new]
    assert counts["variants"] == rep["variants"]
    for e in before:
        if e.kind != "prose":
            mine = [v for v in made if v.line == e.line]  # a variant carries its source's line
            assert 1 <= len(mine) <= 6 and all(v.answer == e.answer and v.kind == e.kind for v in mine)
    questions = [e.question for e in after if e.kind != "prose"]
    assert len(set(questions)) == len(questions)  # nothing repeated
    assert sum(rep[k] for k in augment.KINDS) >= rep["variants"]
    assert all(rep[k] > 0 for k in augment.KINDS), rep


def test_deterministic_for_a_seed(src, tmp_path):
    a, b, c = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.txt"
    augment.augment_file(src, a, per_question=5, seed=11)
    augment.augment_file(src, b, per_question=5, seed=11)
    augment.augment_file(src, c, per_question=5, seed=12)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()


def test_a_variant_never_takes_another_answers_question(tmp_path):
    # dropping "the" from "what is the flash" would give "what is flash", which belongs to
    # another answer: refused, so the check (duplicate questions, different answers) passes
    p = tmp_path / "in.txt"
    p.write_text("Q: what is the flash\nA: One thing.\n\nQ: what is flash\nA: Another thing.\n\n"
                 "Q: What is flash?\nA: Another thing.\n", encoding="utf-8")
    for seed in range(20):
        out = tmp_path / f"o{seed}.txt"
        augment.augment_file(p, out, per_question=8, seed=seed)
        assert corpus.check(out) == [], seed
        for e in corpus.parse(out):
            if corpus._norm(e.question) == corpus._norm("what is flash"):
                assert e.answer == "Another thing."


def test_transforms():
    rng = random.Random(0)
    groups = augment.load_synonyms()
    assert ["ram", "memory"] in groups
    seen = {augment._synonym("How much RAM does the ESP32-S3 have?", rng, groups) for _ in range(50)}
    assert "How much memory does the ESP32-S3 have?" in seen
    assert not any("board-S3" in s for s in seen)  # whole words only: ESP32-S3 is not "esp32"
    assert augment._synonym("xyzzy", rng, groups) is None
    assert augment._dropout("hey", rng, groups) is None
    for _ in range(30):
        t = augment._typo("Where is PSRAM?", rng, groups)
        assert t != "Where is PSRAM?" and t[0] == "W" and t.endswith("?")
        d = augment._dropout("What is the flash for?", rng, groups)
        assert "flash" in d and d.endswith("?") and len(d.split()) == 4
    vs = augment.variants("What is PSRAM?", 10, random.Random(1), groups)
    assert len(vs) == 10 and len({t for _, t in vs}) == 10 and "What is PSRAM?" not in {t for _, t in vs}


def test_synonym_table_errors(tmp_path):
    bad = tmp_path / "syn.txt"
    bad.write_text("# c\nram, memory\nalone\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"syn.txt:3: a synonym group needs at least two"):
        augment.load_synonyms(bad)
    with pytest.raises(ValueError, match="synonym table not found"):
        augment.load_synonyms(tmp_path / "nope.txt")


def test_cli(src, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO / "host_tools"))
    code = "import sys\nfrom tinygpt.cli import main\nsys.exit(main(sys.argv[1:]))\n"

    def run(*args):
        return subprocess.run([sys.executable, "-c", code, "corpus", *map(str, args)], capture_output=True,
                              text=True, env=env, timeout=60)

    out = tmp_path / "out.txt"
    p = run("augment", src, "-o", out, "--per-question", "3", "--seed", "7")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"wrote {out}: 8 entries + ") and "typo" in p.stdout
    assert run("check", out).returncode == 0
    p = run("augment", src)
    assert p.returncode == 2 and "needs -o OUT" in p.stderr
    p = run("augment", src, "-o", src)
    assert p.returncode == 2 and "is the input corpus" in p.stderr
    broken = tmp_path / "broken.txt"
    broken.write_text("Q: a question without an answer\n", encoding="utf-8")
    p = run("augment", broken, "-o", tmp_path / "x.txt")
    assert p.returncode == 2 and "fix them first" in p.stderr and not (tmp_path / "x.txt").exists()
