"""Off-topic questions for training the abstain answer.

A model trained only on its corpus answers every question with one of its answers: "What is the
capital of France?" gets the closest one it knows. So ``tinygpt train`` adds questions from
other fields (``data/abstain_questions.txt``, hand-written: history, science, programming,
cooking, nonsense, ...) to the training entries, each with the corpus's abstain answer
(``corpus.abstain_answer``). The model itself then decides, on the board as on the PC, with no
extra code or memory: its answer to an uncovered question is that sentence.

A list question that is about the corpus's own subject would teach the model to refuse what it
should answer, so ``off_topic_entries`` leaves out every list question of which at least half
the content words (words that are not one of the small question words below) occur in the
corpus's questions and answers (ON_TOPIC_SHARE). Any shared word was too strict: a 6,600-question
corpus uses so many everyday words that 260 of the 1,156 shipped questions were left.
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path

from . import corpus as corpus_mod

QUESTIONS_FILE = Path(__file__).parent / "data" / "abstain_questions.txt"
# Words too common to say what a question is about ("how do i ... ?"): sharing only these with the
# corpus does not make a list question on-topic.
COMMON_WORDS = frozenset("""
a about after all also am an and any anyone are as at be been before best better between but by can
could did do does doing don't else ever every for from get gets getting give go going good got had has
have how i i'm if in into is isn't it it's its just know like long make many me more most much my need
new no not now of off on one or other our out over please really right should so some something still
tell than thank thanks that that's the their them then there these they thing things this those to too
up us use used using very want was way we well were what what's whats when where which who why will
with without work would yes you your
""".split())
ON_TOPIC_SHARE = 0.5
_WORD = re.compile(r"[a-z0-9']+")


def content_words(text: str) -> set[str]:
    """The lowercase words of text that are not COMMON_WORDS (a trailing 's' dropped, so that
    "plants" and "plant" are one word)."""
    out = set()
    for w in _WORD.findall(text.lower()):
        w = w.strip("'")
        if not w or w in COMMON_WORDS:
            continue
        if len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
            w = w[:-1]
        out.add(w)
    return out


def read_questions(path=None) -> list[str]:
    """The questions of a list file: one per line, '#' lines and blank lines skipped."""
    p = QUESTIONS_FILE if path is None else Path(path)
    if not p.is_file():
        raise ValueError(f"off-topic question list not found: {os.fspath(p)}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{os.fspath(p)} is not UTF-8 text ({e})") from None
    out = []
    for no, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if any(corpus_mod._is_control(ch) for ch in line):
            raise ValueError(f"{os.fspath(p)}:{no}: control character in the question")
        out.append(line)
    if not out:
        raise ValueError(f"off-topic question list {os.fspath(p)} holds no question")
    return out


def off_topic_entries(entries, answer: str, n: int, seed: int, path=None) -> tuple[list, int]:
    """Up to n Entry objects (kind 'qa', line 0) pairing list questions with ``answer``: those that
    share no content word with the corpus entries, in a seeded random order. Returns (entries,
    number of list questions left out as on-topic)."""
    vocab = set()
    for e in entries:
        vocab |= content_words(e.question or "") | content_words(e.answer or "") | content_words(e.text or "")
    asked = {corpus_mod._norm(e.question) for e in entries if e.question}
    questions = read_questions(path)
    def on_topic(q):
        words = content_words(q)
        return len(words & vocab) >= ON_TOPIC_SHARE * max(1, len(words))

    kept = [q for q in questions if not on_topic(q) and corpus_mod._norm(q) not in asked]
    random.Random(seed).shuffle(kept)
    return [corpus_mod.Entry("qa", q, answer, 0) for q in kept[:n]], len(questions) - len(kept)
