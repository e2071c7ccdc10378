"""`tinygpt index MODEL --corpus CORPUS -o OUT`: a copy of a model file with the corpus's word index
(py/retrieve.py) and word list (py/topic.py) in its meta section.

`tinygpt train` + `convert` write both already. This is for a model file made before them (the
shipped model, or one of your own): its weights, tokenizer and drafts section are copied as they
are, so its logits are bit for bit the same; only the answers chat.ask gives change, by the rule
in py/retrieve.py. The abstain answer it records is the model's own (meta `abstain_answer`), else
the corpus's `Abstain:` line, else the built-in sentence; a model not trained to give it then
abstains only by the word checks.
"""
from __future__ import annotations

import sys
from pathlib import Path


def add_arguments(p):
    p.add_argument("model", help="a tinygpt model file (version 1 or 2)")
    p.add_argument("--corpus", required=True, help="the corpus the model was trained on")
    p.add_argument("-o", "--output", required=True, help="the new model file (not the input)")


def reindex(model_path, corpus_path, out_path, log=print) -> dict:
    from . import abstain as abstain_mod
    from . import corpus as corpus_mod
    from . import modelfile, reference, retrieval

    model_path, corpus_path, out_path = Path(model_path), Path(corpus_path), Path(out_path)
    if not model_path.is_file():
        raise ValueError(f"model file not found: {model_path}")
    if out_path.resolve() == model_path.resolve():
        raise ValueError(f"--output must be a new file, not the model itself ({out_path})")
    entries = corpus_mod.parse(corpus_path)  # names a missing or broken corpus
    mf = reference.load(model_path)          # names a broken model file
    raw = model_path.read_bytes()
    drafts = raw[mf.header["file_size"]:]  # the drafts section (spec section 7), if any, kept as it is
    meta = {modelfile.ABSTAIN_KEY: mf.meta.get(modelfile.ABSTAIN_KEY) or corpus_mod.abstain_answer(corpus_path)}
    known = abstain_mod.known_words(entries)
    if len(known.encode("utf-8")) <= abstain_mod.MAX_KNOWN_WORDS_BYTES:
        meta[modelfile.KNOWN_WORDS_KEY] = known
    meta.update(retrieval.index_meta(entries))
    meta_bytes = len(modelfile.meta_section(meta))  # names a section too large for the engine
    buf, _ = modelfile.build_model_bytes(dict(mf.hparams), dict(mf.tensors), mf.tokenizer_section, meta)
    modelfile.atomic_write_bytes(out_path, bytes(buf) + drafts)
    n_answers = sum(1 for k in meta if k.startswith("answer_"))
    log(f"wrote {out_path}: {n_answers} answers indexed, meta section {meta_bytes:,} bytes, "
        f"abstain answer {meta[modelfile.ABSTAIN_KEY]!r}")
    return {"output": str(out_path), "answers": n_answers, "abstain_answer": meta[modelfile.ABSTAIN_KEY]}


def run_cli(args):
    try:
        reindex(args.model, args.corpus, args.output)
    except ValueError as e:
        sys.exit(f"tinygpt index: {e}")
