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

import random
import sys
from pathlib import Path

from . import corpus as corpus_mod

QUESTIONS_FILE = Path(__file__).parent / "data" / "abstain_questions.txt"
ON_TOPIC_SHARE = 0.5
MAX_KNOWN_WORDS_BYTES = 60000  # the meta section holds at most 64 KiB (docs/model-format.md section 8)


def py_module(name: str):
    """A module of py/, the code the board runs (topic.py: one definition of a content word for
    both; retrieve.py: one answer rule for both)."""
    import importlib

    py_dir = str(Path(__file__).resolve().parents[2] / "py")
    if py_dir not in sys.path:
        sys.path.insert(0, py_dir)
    return importlib.import_module(name)


def _topic():
    return py_module("topic")


def content_words(text: str) -> set[str]:
    """py/topic.py's content words: lowercase ASCII words that are not its COMMON_WORDS."""
    return _topic().content_words(text)


def known_words(entries) -> str:
    """The meta value `known_words` of a corpus: every content word of its questions, answers
    and prose (py/topic.py decides with it on the board)."""
    return _topic().known_words_line([t for e in entries for t in (e.question, e.answer, e.text) if t])


def read_questions(path=None) -> list[str]:
    """The questions of a list file: one per line, '#' lines and blank lines skipped."""
    return corpus_mod.load_question_lines(QUESTIONS_FILE if path is None else path, "off-topic question list")


def off_topic_entries(entries, answer: str, n: int, seed: int, path=None) -> tuple[list, int]:
    """Up to n Entry objects (kind 'qa', line 0) pairing list questions with ``answer``: those of
    which less than ON_TOPIC_SHARE of the content words occur in the corpus entries, in a seeded
    random order. Returns (entries,
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
