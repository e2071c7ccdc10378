"""Question variants for any corpus: the rewordings a user types, made by program.

    augment_file(in_path, out_path, per_question=8, seed=0, synonyms=None) -> report dict
    augment_entries(entries, per_question, seed=0, synonyms=None) -> (new entries, counts)
    variants(question, n, rng, synonyms, accept=None) -> [(kinds, text)]

``tinygpt corpus augment IN -o OUT [--per-question N] [--seed S] [--synonyms FILE]`` runs it.

A model trained on 4 phrasings per answer learns those 4 strings; a user types a fifth. Every
Q: line of the corpus gets up to ``per_question`` variants, each made by one transform, and in
40 % of the cases a second one on top:

    case         "What is PSRAM?" -> "what is psram?" / "What is PSRAM?" -> "what is PSRAM?"
    punctuation  drop or add the question mark, drop commas and apostrophes ("whats")
    filler       "please", "hey,", "can you tell me", "..., thanks"
    synonym      a word or phrase swapped for another of its group in the synonym table
                 (data/synonyms.txt in this package, or --synonyms FILE): RAM/memory, "how do I"/
                 "how can I", delete/remove, ...
    dropout      one function word dropped ("what is the PSRAM" -> "what is PSRAM"); never the
                 longest word (most often the keyword)
    typo         in one word of 4+ letters: two letters swapped, one dropped or one doubled

Answers, commands and prose are never touched: the output file is the input file byte for byte,
followed by the new Q/A (or Q/Do) entries, each repeating its source entry's answer line. A
variant is kept only if it is new (not the original, not another variant, and not a question
that the corpus or an earlier variant gives a different answer: ``tinygpt corpus check`` then
passes). The same input, N and seed give the same output. Short questions ("hey") have few
variants; the report says how many were made, per transform.

Augment before splitting off a validation set leaks: a variant of a held-out question would be in
training. ``tinygpt train --val-split F --augment N`` augments only the training part.
"""
from __future__ import annotations

import os
import random
import re
import tempfile
from pathlib import Path

from . import corpus as corpus_mod

KINDS = ("case", "punctuation", "filler", "synonym", "dropout", "typo")
SYNONYMS_FILE = Path(__file__).resolve().parent / "data" / "synonyms.txt"
SECOND_TRANSFORM = 0.4   # share of variants that get a second transform on top of the first
TRIES_PER_VARIANT = 12   # attempts per wanted variant before giving up on a short question
MAX_PER_QUESTION = 32    # variants asked per question at most: a short question has far fewer distinct
                         # ones, and N makes 12 * N attempts per question

FILLER_BEFORE = ("please", "hey,", "hi,", "hello,", "can you tell me", "could you tell me", "tell me,",
                 "i wonder", "quick question,")
FILLER_AFTER = (" please", ", please", " thanks", ", thanks", " thank you")
FUNCTION_WORDS = corpus_mod.FUNCTION_WORDS  # the words a variant may drop (corpus.near_duplicates ignores them)


def load_synonyms(path=None) -> list[list[str]]:
    """Synonym groups from a table: one group per line, comma-separated words or phrases, '#'
    comments and blank lines ignored; entries lower-cased. A group of fewer than two entries is
    an error naming its line."""
    p = Path(path) if path is not None else SYNONYMS_FILE
    if not p.is_file():
        raise ValueError(f"synonym table not found: {p}")
    groups = []
    for no, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        words = [" ".join(w.split()).lower() for w in line.split(",") if w.strip()]
        if len(set(words)) < 2:
            raise ValueError(f"{p}:{no}: a synonym group needs at least two different entries")
        groups.append(words)
    return groups


# ----------------------------------------------------------------------------- transforms

def _word_pattern(phrase):
    # whole words only: "esp32" must not match inside "ESP32-S3", "ram" not inside "param"
    return re.compile(r"(?<![\w-])" + re.escape(phrase).replace(r"\ ", r"\s+") + r"(?![\w-])", re.IGNORECASE)


def _lower_first(q):
    """'What is X' -> 'what is X' for 'can you tell me what is X'; 'PSRAM?' stays."""
    first = q.split(" ", 1)[0]
    if first[:1].isupper() and first[1:] == first[1:].lower():
        return q[0].lower() + q[1:]
    return q


def _case(q, rng, synonyms):
    options = [q.lower(), q[0].upper() + q[1:], _lower_first(q)]
    options = [o for o in options if o != q]
    return rng.choice(options) if options else None


def _punctuation(q, rng, synonyms):
    options = []
    stripped = q.rstrip("?!. ")
    if stripped and stripped != q:
        options.append(stripped)
    if not q.endswith("?"):
        options.append(stripped + "?")
    for ch in (",", "'"):
        if ch in q:
            options.append(" ".join(q.replace(ch, "").split()))
    options = [o for o in options if o and o != q]
    return rng.choice(options) if options else None


def _filler(q, rng, synonyms):
    if rng.random() < 0.6:
        return rng.choice(FILLER_BEFORE) + " " + _lower_first(q)
    after = rng.choice(FILLER_AFTER)
    if "please" in after:  # "What is X please?"
        end = len(q.rstrip("?!."))
        return q[:end] + after + q[end:]
    return q + after.lstrip(",")  # "What is X? thanks"


def _synonym(q, rng, synonyms):
    matches = []  # (start, end, group, matched lower-case entry)
    for group in synonyms:
        for w in group:
            for m in _word_pattern(w).finditer(q):
                matches.append((m.start(), m.end(), group, w))
    if not matches:
        return None
    start, end, group, w = rng.choice(matches)
    new = rng.choice([g for g in group if g != w])
    if q[start:start + 1].isupper() and (start == 0 or q[start:end].istitle()):
        new = new[0].upper() + new[1:]
    return q[:start] + new + q[end:]


def _dropout(q, rng, synonyms):
    words = q.split()
    if len(words) < 3:
        return None
    longest = max(range(len(words)), key=lambda i: len(words[i].strip("?!.,")))
    candidates = [i for i, w in enumerate(words) if i != longest and w.strip("?!.,").lower() in FUNCTION_WORDS]
    if not candidates:
        return None
    i = rng.choice(candidates)
    out = words[:i] + words[i + 1:]
    if i == len(words) - 1 and words[i][-1:] in "?!.":  # keep the sentence's end mark
        out[-1] += words[i][-1]
    return " ".join(out)


def _typo(q, rng, synonyms):
    spans = [m.span() for m in re.finditer(r"[A-Za-z]{4,}", q)]
    if not spans:
        return None
    s, e = rng.choice(spans)
    w = q[s:e]
    i = rng.randrange(1, len(w) - 1)  # inner letters: the word stays recognisable
    op = rng.randrange(3)
    if op == 0 and w[i] != w[i + 1]:
        w = w[:i] + w[i + 1] + w[i] + w[i + 2:]
    elif op == 1:
        w = w[:i] + w[i + 1:]
    else:
        w = w[:i] + w[i] + w[i:]
    return q[:s] + w + q[e:]


TRANSFORMS = {"case": _case, "punctuation": _punctuation, "filler": _filler, "synonym": _synonym,
              "dropout": _dropout, "typo": _typo}


def variants(question, n, rng, synonyms, accept=None) -> list[tuple[tuple[str, ...], str]]:
    """Up to n distinct variants of question: [(kinds applied, text)]. ``accept(text)`` may
    refuse a candidate (e.g. one that another answer already owns)."""
    out: list[tuple[tuple[str, ...], str]] = []
    seen = {question}
    for _ in range(n * TRIES_PER_VARIANT):
        if len(out) >= n:
            break
        kinds = [rng.choice(KINDS)]
        if rng.random() < SECOND_TRANSFORM:
            kinds.append(rng.choice([k for k in KINDS if k != kinds[0]]))
        text = question
        for k in kinds:
            text = TRANSFORMS[k](text, rng, synonyms) if text else None
            if text is None:
                break
        if not text:
            continue
        text = " ".join(text.split())
        if not text or text in seen or (accept is not None and not accept(text)):
            continue
        seen.add(text)
        out.append((tuple(kinds), text))
    return out


# ----------------------------------------------------------------------------- corpora

def augment_entries(entries, per_question, seed=0, synonyms=None):
    """New Q entries for the qa/do entries of ``entries``: (list of corpus.Entry in source order,
    each with its source's answer and line; counts {kind: n, "variants": n, "questions": n,
    "short": questions that got fewer than per_question})."""
    if isinstance(per_question, bool) or not isinstance(per_question, int) or not \
            1 <= per_question <= MAX_PER_QUESTION:
        raise ValueError(f"the number of variants per question must be an int from 1 to {MAX_PER_QUESTION}, got "
                         f"{per_question!r} (more are not distinct: a short question has only a few)")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    synonyms = load_synonyms() if synonyms is None else synonyms
    owner: dict[str, str] = {}  # normalized question -> answer (the checker's duplicate rule)
    for e in entries:
        if e.kind != "prose":
            owner.setdefault(corpus_mod._norm(e.question), " ".join(e.target.split()))
    rng = random.Random(seed)
    new, counts = [], {k: 0 for k in KINDS}
    counts.update(variants=0, questions=0, short=0, fewest=None)
    for e in entries:
        if e.kind == "prose":
            continue
        target = " ".join(e.target.split())

        def accept(text):
            return owner.get(corpus_mod._norm(text), target) == target

        made = variants(e.question, per_question, rng, synonyms, accept)
        counts["questions"] += 1
        counts["short"] += len(made) < per_question
        counts["fewest"] = len(made) if counts["fewest"] is None else min(counts["fewest"], len(made))
        for kinds, text in made:
            owner[corpus_mod._norm(text)] = target
            new.append(corpus_mod.Entry(e.kind, text, e.answer, e.line))
            counts["variants"] += 1
            for k in kinds:
                counts[k] += 1
    return new, counts


def augment_file(in_path, out_path, per_question=8, seed=0, synonyms=None) -> dict:
    """Write in_path followed by the variants of its questions to out_path; see the module
    docstring. Returns the counts of augment_entries plus ``entries_in`` and ``entries_out``."""
    src, dst = Path(in_path), Path(out_path)
    if not src.is_file():
        raise ValueError(f"corpus not found: {src}")
    if dst.exists() and (dst.resolve() == src.resolve() or _same_file(dst, src)):
        raise ValueError(f"output {dst} is the input corpus; write the augmented corpus to a new file")
    if dst.is_dir():  # before: the temp file was written beside it and left there, "[Errno 21]"
        raise ValueError(f"output {dst} is a directory; give the file to write, e.g. {dst / 'augmented.txt'}")
    problems = corpus_mod.check(src)
    if problems:
        raise ValueError(f"corpus {src} has {len(problems)} problem(s), first {src}:{problems[0]}; "
                         f"fix them first (tinygpt corpus check {src})")
    entries = corpus_mod.parse(src)
    groups = load_synonyms(synonyms) if not isinstance(synonyms, list) else synonyms
    new, counts = augment_entries(entries, per_question, seed, groups)
    text = src.read_bytes().decode("utf-8")  # check() has verified the encoding
    if not text.endswith("\n"):
        text += "\n"
    parts = [text]
    for e in new:
        answer_line = f"{corpus_mod.A_PREFIX} {e.answer}" if e.kind == "qa" else f"{corpus_mod.DO_PREFIX} {e.answer}"
        parts.append(f"\n{corpus_mod.Q_PREFIX} {e.question}\n{answer_line}\n")
    # A temp file of its own (never OUT.tmp, which may be the input itself: it was overwritten and
    # then renamed away), removed on any failure or Ctrl-C, so a failed write leaves OUT untouched.
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix="." + dst.name + ".", suffix=".tmp", dir=dst.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:  # newline="": the input's bytes as they are
            f.write("".join(parts))
        left = corpus_mod.check(tmp)
        if left:  # pragma: no cover - variants are filtered so that this cannot happen
            raise RuntimeError(f"augmented corpus fails the check: {left[0]}")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        tmp.replace(dst)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    return {**counts, "entries_in": len(entries), "entries_out": len(entries) + len(new)}


def _same_file(a, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def format_report(report, out_path) -> str:
    """The lines `tinygpt corpus augment` prints."""
    lines = [f"wrote {out_path}: {report['entries_in']} entries + {report['variants']} variants of "
             f"{report['questions']} questions = {report['entries_out']} entries"]
    lines += [f"  {k:<12} {report[k]:>7}" for k in KINDS]
    lines.append("  (a variant may combine two transforms)")
    if report["short"]:
        lines.append(f"  {report['short']} short question(s) got fewer variants than asked (the fewest: "
                     f"{report.get('fewest')}; no more distinct ones were found)")
    return "\n".join(lines)
