"""The word index that py/retrieve.py checks the model's answers against on the board.

`tinygpt train` builds it from the corpus (its questions and answers, not the augmented or
off-topic ones) and writes it into the run's config.json; `tinygpt convert` puts it into the
model file's meta section (docs/model-format.md section 8). The weights are TF-IDF, computed here
in floats and stored as integers, so that the board's integer arithmetic is the same as the PC's.
"""
from __future__ import annotations

import math

from . import abstain as abstain_mod  # py/topic.py's content words, the same on the board

_retrieve = abstain_mod.py_module("retrieve")

# The rule's thresholds (scores in 1/10000; py/retrieve.py says what each does). Measured on the
# two few-phrasing test corpora and the shipped model (docs/recipes.md, "Retrieval on the device").
OVERRIDE = 3000
ACCEPT = 1000
MARGIN = 1000
SUPPORT = 1000
WEIGHT_SCALE = 100  # weights are round(100 * tf-idf)


def idf(n_docs: int, df: int) -> float:
    return math.log((n_docs + 1) / (df + 0.5))


def index_meta(entries, unknown_words: bool = True, thresholds=(OVERRIDE, ACCEPT, MARGIN, SUPPORT)) -> dict:
    """The meta keys of the index of Q/A entries (prose is skipped): answer_<i> and terms_<i> for
    every distinct answer in first-seen order, idf, idf_unknown and retrieval."""
    docs: dict[str, dict[str, int]] = {}
    for e in entries:
        if e.kind == "prose":
            continue
        doc = docs.setdefault(e.target, {})
        for w in abstain_mod.content_words(e.question):
            doc[w] = doc.get(w, 0) + 1
    for target, doc in docs.items():
        for w in abstain_mod.content_words(target):
            doc[w] = doc.get(w, 0) + 1
    if not docs:
        raise ValueError("the corpus has no Q/A entries to index")
    n = len(docs)
    df: dict[str, int] = {}
    for doc in docs.values():
        for w in doc:
            df[w] = df.get(w, 0) + 1
    q_weight = {w: max(1, round(WEIGHT_SCALE * idf(n, d))) for w, d in df.items()}
    meta = {_retrieve.RETRIEVAL_KEY: "1 %d %d %d %d" % tuple(thresholds),
            _retrieve.IDF_KEY: " ".join(f"{w}:{q_weight[w]}" for w in sorted(q_weight)),
            _retrieve.UNKNOWN_KEY: str(round(WEIGHT_SCALE * idf(n, 0)) if unknown_words else 0)}
    for i, (target, doc) in enumerate(docs.items()):
        meta[f"{_retrieve.ANSWER_PREFIX}{i}"] = _retrieve.escape(target)
        meta[f"{_retrieve.TERMS_PREFIX}{i}"] = " ".join(
            f"{w}:{max(1, round(WEIGHT_SCALE * (1 + math.log(tf)) * idf(n, df[w])))}" for w, tf in sorted(doc.items()))
    return meta


def load_index(meta: dict):
    """py/retrieve.py's Index of a meta dict, or None when it has no index."""
    if _retrieve.RETRIEVAL_KEY not in meta:
        return None
    return _retrieve.Index(meta)
