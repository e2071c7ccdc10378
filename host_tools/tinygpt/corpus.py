"""The training corpus: parse it, check it, count it, and turn it into training texts.

Corpus format (UTF-8 text; entries are separated by blank lines)::

    Q: What is PSRAM?
    A: External RAM on the ESP32-S3 module, 8 MB on this board.

    Q: How do I list the files?
    Do: ls

    A paragraph of free prose, one or more lines
    without a prefix.

* a ``Q: <question>`` line followed by one ``A: <answer>`` line -> a ``qa`` entry;
* a ``Q: <question>`` line followed by one ``Do: <command>`` line -> a ``do`` entry (the model
  answers with a command suggestion);
* a paragraph of lines without a prefix -> a ``prose`` entry (the lines are kept, joined by
  ``\\n``);
* at most one ``Abstain: <answer>`` line, alone in its block: the answer the model gives to a
  question the corpus does not cover (``abstain_answer``; without one, ``DEFAULT_ABSTAIN``).
  It is not an entry: ``parse`` leaves it out, and training pairs it with off-topic questions.

Several Q/answer pairs may follow each other without a blank line; each pair is an entry.

Training serialization (what the model sees; ``training_texts``)::

    qa     ->  "Q: {question}\\nA: {answer}<|endoftext|>"
    do     ->  "Q: {question}\\nA: Do: {command}<|endoftext|>"
    prose  ->  "{text}<|endoftext|>"

At inference the prompt is ``"Q: {question}\\nA:"`` (``prompt(question)``) and the answer is
what the model generates after it, up to ``<|endoftext|>`` (or a ``Q:`` token, a blank line
``"\\n\\n"``, the token limit or a full context). An answer starting with ``Do:`` is a command
suggestion. Exact match: the generated answer with surrounding whitespace stripped equals the
expected answer, which is ``Entry.target``: the answer, or ``"Do: {command}"`` for ``do``
entries.

API
    parse(path) -> list[Entry]                       (ValueError on undecodable UTF-8)
    abstain_answer(path) -> str                      (the declared abstain answer, or the default)
    check(path, tokenizer=None, n_ctx=128) -> list[Problem]   (never raises for bad content)
    keep_first_answers(entries) -> (entries, warnings)   (a question asked again with another answer)
    conflicting_duplicates(path) -> list[Problem]   (those warnings for a file)
    near_duplicates(path) -> list[Problem]   (warnings: nearly equal questions, different answers)
    stats(path, tokenizer=None) -> dict
    training_texts(entries) -> list[str]
    load_questions(path) -> list[(question, expected_answer)]
    prompt(question) -> str

``tinygpt corpus check|stats CORPUS [--tokenizer DIR] [--n-ctx N]`` runs the checker
(exit status 1 if it found problems; repeated questions with another answer and near duplicates
are printed as warnings) or prints the
statistics.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

EOS = "<|endoftext|>"
# Small words that carry little of a question's meaning: `corpus augment` may drop one to make a
# variant, and near_duplicates ignores one in each question for the same reason.
FUNCTION_WORDS = {"the", "a", "an", "is", "are", "do", "does", "i", "me", "my", "to", "of", "in", "on", "for",
                  "you", "can", "please", "it", "this", "that", "there", "with", "about"}
Q_PREFIX, A_PREFIX, DO_PREFIX = "Q:", "A:", "Do:"
ABSTAIN_PREFIX = "Abstain:"
# The answer to a question the corpus does not cover, when the corpus declares none.
DEFAULT_ABSTAIN = "Sorry, I don't know that. It is not in what I was trained on."
MAX_ABSTAIN_CHARS = 300

# A line that looks like "Word: ..." at its start. Such a line is reported as an unknown prefix
# when the word is short (1-2 letters: "B:", "QA:"), is a known Q/A-ish label in any case
# ("Question:", "answer:", "q:", "DO:"), or stands inside a Q/A entry. Other "Note: ..." lines
# in prose paragraphs are prose.
_PREFIX_RE = re.compile(r"^([A-Za-z][A-Za-z_-]{0,15}):(\s|$)")
_QA_LABELS = {"q", "a", "do", "question", "answer", "command", "cmd", "response", "reply", "user",
              "assistant", "bot", "human", "ai", "prompt", "input", "output", "instruction", "query",
              "ans", "quest"}


@dataclass(frozen=True)
class Entry:
    """One corpus entry. ``kind`` is 'qa', 'do' or 'prose'; ``line`` is the 1-based line of its
    first line. For 'qa' ``answer`` is the answer text, for 'do' the command (without "Do:");
    for 'prose' question and answer are None and ``text`` holds the paragraph."""
    kind: str
    question: str | None
    answer: str | None
    line: int
    text: str | None = None

    @property
    def target(self) -> str | None:
        """What the model should generate after the prompt (stripped): the answer, or
        "Do: {command}"; None for prose."""
        if self.kind == "qa":
            return self.answer
        if self.kind == "do":
            return f"{DO_PREFIX} {self.answer}"
        return None

    def training_text(self) -> str:
        if self.kind == "prose":
            return f"{self.text}{EOS}"
        return f"{Q_PREFIX} {self.question}\n{A_PREFIX} {self.target}{EOS}"


@dataclass(frozen=True)
class Problem:
    line: int
    message: str

    def __str__(self):
        return f"line {self.line}: {self.message}"


def prompt(question: str) -> str:
    """The inference prompt for a question."""
    return f"{Q_PREFIX} {question}\n{A_PREFIX}"


def training_texts(entries) -> list[str]:
    """The serialized training text of each entry (see the module docstring)."""
    return [e.training_text() for e in entries]


# ----------------------------------------------------------------------------- reading

def _utf8_errors(data: bytes) -> list[tuple[int, int, str]]:
    """(byte offset, line, reason) of every undecodable UTF-8 sequence in data."""
    out = []
    pos = 0
    while True:
        try:
            data[pos:].decode("utf-8")
            return out
        except UnicodeDecodeError as e:
            off = pos + e.start
            out.append((off, data.count(b"\n", 0, off) + 1, e.reason))
            pos = pos + max(e.end, e.start + 1)


def _read(path) -> tuple[str, list[Problem]]:
    """The text of the corpus (bad bytes replaced by U+FFFD) and one Problem per bad sequence."""
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise FileNotFoundError(f"corpus not found: {p}")
    with open(p, "rb") as f:
        data = f.read()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):  # one clear problem, not one per line of UTF-8 errors
        order = "little" if data[:2] == b"\xff\xfe" else "big"
        return "", [Problem(1, f"the file is UTF-16 ({order}-endian byte order mark {data[:2].hex(' ').upper()}), "
                               f"not UTF-8: save it as UTF-8")]
    problems = [Problem(line, f"undecodable UTF-8 at byte offset {off} ({reason})")
                for off, line, reason in _utf8_errors(data)]
    return data.decode("utf-8", errors="replace"), problems


def _is_control(ch: str) -> bool:
    """C0 controls, DEL and C1 controls: the characters py/chat.py turns into spaces."""
    o = ord(ch)
    return o < 32 or 127 <= o < 160


def control_char_problems(text: str) -> list[Problem]:
    """One Problem per line holding a control character (NUL, TAB, ESC, DEL, ...; a line's
    closing CR of a CRLF file is no problem): on the board, chat.py turns them into spaces in a
    question, so a model trained on them learns a question nobody can ask, and an evaluation
    would count answers the board cannot give. A TAB in prose is allowed (prose is never asked)."""
    problems = []
    for block in _blocks(text):
        prose = not any(_role(line)[0] or line.startswith(ABSTAIN_PREFIX) for _, line in block)
        for no, line in block:
            bad = [ch for ch in line if _is_control(ch) and not (prose and ch == "\t")]
            if bad:
                col = line.index(bad[0]) + 1
                problems.append(Problem(no, f"control character U+{ord(bad[0]):04X} at column {col} of the "
                                            f"line ({len(bad)} on the line): the board turns it into a space, "
                                            f"so remove it or write a space"))
    return problems


# Misspelled prefixes are reported, then treated as the prefix they stand for, so that one
# "Question:" line gives one problem and not a cascade of "answer without a Q".
_STANDS_FOR = {"q": Q_PREFIX, "question": Q_PREFIX, "query": Q_PREFIX, "quest": Q_PREFIX,
               "a": A_PREFIX, "answer": A_PREFIX, "ans": A_PREFIX, "response": A_PREFIX, "reply": A_PREFIX,
               "do": DO_PREFIX, "command": DO_PREFIX, "cmd": DO_PREFIX}


def _split_prefix(line: str):
    """(prefix, rest) for the known prefixes Q:/A:/Do:, else (None, line)."""
    for pre in (Q_PREFIX, A_PREFIX, DO_PREFIX):
        if line.startswith(pre):
            return pre, line[len(pre):].strip()
    return None, line


def _role(line: str):
    """(prefix, rest, unknown label or None): like _split_prefix, but a misspelled Q/A/Do label
    ("Question:", "a:", "DO:") takes the role of the prefix it stands for."""
    pre, rest = _split_prefix(line)
    if pre:
        return pre, rest, None
    label = _unknown_prefix(line)
    if label and label[:-1].lower() in _STANDS_FOR:
        return _STANDS_FOR[label[:-1].lower()], line[len(label):].strip(), label
    return None, line, label


def _unknown_prefix(line: str) -> str | None:
    m = _PREFIX_RE.match(line)
    return m.group(1) + ":" if m else None


def _suspicious(label: str) -> bool:
    word = label[:-1]
    return len(word) <= 2 or word.lower() in _QA_LABELS


def _blocks(text: str):
    """Yield (first line number, [(line number, line)]) for each blank-line separated block."""
    block: list[tuple[int, str]] = []
    for no, raw in enumerate(text.split("\n"), 1):
        line = raw.rstrip("\r").rstrip()
        if not line.strip():
            if block:
                yield block
            block = []
        else:
            block.append((no, line.lstrip()))
    if block:
        yield block


def _abstain_lines(text: str):
    """(line number, answer text, block) of every line starting with "Abstain:"."""
    for block in _blocks(text):
        for no, line in block:
            if line.startswith(ABSTAIN_PREFIX):
                yield no, line[len(ABSTAIN_PREFIX):].strip(), block


def _abstain_problems(text: str, entries) -> list[Problem]:
    problems = []
    found = list(_abstain_lines(text))
    for i, (no, answer, block) in enumerate(found):
        if len(block) != 1:
            problems.append(Problem(no, "an Abstain: line stands alone in its block (a blank line before "
                                        "and after it)"))
        elif not answer:
            problems.append(Problem(no, "empty Abstain: answer"))
        elif len(answer) > MAX_ABSTAIN_CHARS:
            problems.append(Problem(no, f"the Abstain: answer is {len(answer)} characters, more than "
                                        f"{MAX_ABSTAIN_CHARS}"))
        elif i > 0:
            problems.append(Problem(no, f"second Abstain: line (the first is on line {found[0][0]}; a corpus "
                                        f"declares one abstain answer)"))
        else:
            same = [e for e in entries if e.target is not None and _norm(e.target) == _norm(answer)]
            if same:
                problems.append(Problem(no, f"the Abstain: answer is the answer of the question on line "
                                            f"{same[0].line}: the model could not tell knowing from not "
                                            f"knowing; word it differently"))
    return problems


def abstain_answer(path) -> str:
    """The corpus's declared abstain answer (its ``Abstain:`` line), or DEFAULT_ABSTAIN. Raises
    ValueError naming the line when the declaration breaks a rule (``check`` lists them)."""
    text, enc = _read(path)
    if enc:
        raise ValueError(f"{os.fspath(path)}: {enc[0]}")
    entries = _parse_text(text)[0]
    bad = _abstain_problems(text, entries) + [p for p in control_char_problems(text)
                                               if p.line in {no for no, _, _ in _abstain_lines(text)}]
    if bad:
        raise ValueError(f"{os.fspath(path)}: {bad[0]}")
    for _, answer, _ in _abstain_lines(text):
        return answer
    return DEFAULT_ABSTAIN


def _parse_text(text: str) -> tuple[list[Entry], list[Problem]]:
    """The entries of a corpus text and the structural problems (everything but lengths,
    duplicates and encoding). An Abstain: line is no entry (``abstain_answer`` reads it)."""
    entries: list[Entry] = []
    problems: list[Problem] = []
    for block in _blocks(text):
        if len(block) == 1 and block[0][1].startswith(ABSTAIN_PREFIX):
            continue
        has_prefix = any(_role(line)[0] for _, line in block)
        if not has_prefix:  # prose paragraph
            for no, line in block:
                label = _unknown_prefix(line)
                if label and _suspicious(label):
                    problems.append(Problem(no, f"unknown prefix {label!r} (expected Q:, A: or Do:)"))
            entries.append(Entry("prose", None, None, block[0][0], "\n".join(line for _, line in block)))
            continue
        q = None  # [line, question, answered?, misspelled prefix?]
        for no, line in block:
            pre, rest, label = _role(line)
            if label:
                problems.append(Problem(no, f"unknown prefix {label!r} (expected Q:, A: or Do:)"))
            if pre == Q_PREFIX:
                if q is not None and not q[2]:
                    problems.append(Problem(q[0], "Q without an answer (expected an A: or Do: line after it)"))
                if not rest:
                    problems.append(Problem(no, "empty question"))
                q = [no, rest, False, bool(label)]
            elif pre in (A_PREFIX, DO_PREFIX):
                what = "answer" if pre == A_PREFIX else "command"
                if q is None:
                    problems.append(Problem(no, f"{pre} {what} without a Q: line before it"))
                elif q[2]:
                    problems.append(Problem(no, f"second answer for the Q: on line {q[0]} "
                                                f"(one A: or Do: line per question)"))
                elif not rest:
                    problems.append(Problem(no, f"empty {what}"))
                    q[2] = True
                else:
                    q[2] = True
                    if q[1] and not q[3] and not label:  # broken pairs stay out of the entries
                        entries.append(Entry("qa" if pre == A_PREFIX else "do", q[1], rest, q[0]))
            elif not label:
                problems.append(Problem(no, "line without a prefix inside a Q/A entry (answers are one "
                                            "line; separate prose from Q/A entries with a blank line)"))
        if q is not None and not q[2]:
            problems.append(Problem(q[0], "Q without an answer (expected an A: or Do: line after it)"))
    return entries, problems


def parse(path) -> list[Entry]:
    """The entries of a corpus file, in file order. Broken Q/A pairs (see ``check``) are left
    out; undecodable UTF-8 raises ValueError naming the byte offset and line."""
    text, enc = _read(path)
    if enc:
        raise ValueError(f"{os.fspath(path)}: {enc[0]}" + (f" (and {len(enc) - 1} more)" if len(enc) > 1 else ""))
    return _parse_text(text)[0]


# ----------------------------------------------------------------------------- checking

def _load_tokenizer(tokenizer):
    """A tokenizers.Tokenizer from an object, a tokenizer.json path or a directory holding one."""
    if tokenizer is None:
        return None
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if hasattr(tokenizer, "backend_tokenizer"):
        return tokenizer.backend_tokenizer
    p = os.fspath(tokenizer)
    if os.path.isdir(p):
        p = os.path.join(p, "tokenizer.json")
    if not os.path.isfile(p):
        raise FileNotFoundError(f"tokenizer not found: {p}")
    return Tokenizer.from_file(p)


def _norm(s: str) -> str:
    """Question key for duplicate detection: case- and whitespace-insensitive."""
    return "".join(s.split()).casefold()


def conflicting_duplicates(path) -> list[Problem]:
    """Warnings for a corpus file: each question (case/whitespace-insensitive) asked again with
    a different answer, at the later line. Training keeps the first (``keep_first_answers``).
    Like near_duplicates, it never raises for bad content (bad bytes are check's problems)."""
    text, _ = _read(path)
    return keep_first_answers(_parse_text(text)[0])[1]


def keep_first_answers(entries) -> tuple[list[Entry], list[Problem]]:
    """(entries without the later ones of a question asked again with a different answer, one
    Problem per entry left out). A model cannot learn two answers to one question: it would
    learn one of them, or a blend. Real corpora repeat a question now and then; refusing the
    whole corpus made the user edit it by hand, so training keeps the first and names both lines."""
    kept, dropped = [], []
    first: dict[str, Entry] = {}
    for e in entries:
        if e.kind != "prose":
            key = _norm(e.question)
            prev = first.get(key)
            if prev is None:
                first[key] = e
            elif " ".join(prev.target.split()) != " ".join(e.target.split()):
                dropped.append(Problem(e.line, f"question {e.question!r} is also on line {prev.line} with a different "
                                               f"answer ({prev.target!r} vs {e.target!r}); training keeps line "
                                               f"{prev.line}'s and leaves this one out (reword one to keep both)"))
                continue
        kept.append(e)
    return kept, dropped


def check(path, tokenizer=None, n_ctx: int = 128) -> list[Problem]:
    """Problems of a corpus file, sorted by line: undecodable UTF-8 (byte offset and line),
    unknown prefixes, a Q without an answer, an answer without a Q, empty questions/answers,
    two answers for one Q, control characters in a line (``control_char_problems``), and, when a
    tokenizer is given, entries whose serialized text is longer than
    n_ctx tokens. An empty list means the corpus is fine. A missing file raises
    FileNotFoundError."""
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 2:
        raise ValueError(f"--n-ctx must be an integer >= 2 (the model's context in tokens), got {n_ctx!r}")
    text, problems = _read(path)
    entries, structural = _parse_text(text)
    problems += structural + control_char_problems(text) + _abstain_problems(text, entries)
    tok = _load_tokenizer(tokenizer)
    if tok is not None:
        for e, n in zip(entries, _token_counts(tok, entries)):
            if n > n_ctx:
                problems.append(Problem(e.line, f"{e.kind} entry is {n} tokens once serialized, longer "
                                                f"than the context of {n_ctx}"))
    if not entries and not problems:
        problems.append(Problem(1, "no entries"))
    return sorted(problems, key=lambda p: p.line)


def _question_words(q: str) -> list[str]:
    """Lower-case words of a question, surrounding punctuation and apostrophes removed."""
    words = (w.strip(".,?!;:\"'").replace("'", "") for w in q.casefold().split())
    return [w for w in words if w]


def near_duplicates(path) -> list[Problem]:
    """Pairs of questions with different answers that are the same question once case,
    punctuation and at most one function word in each ("a", "the", "my", "on", ...: the words
    ``corpus augment`` may drop) are ignored: "What is my serial port?" vs "What is a serial
    port?", "ble on" vs "BLE?". Such a pair gives the model nearly the same input with two
    targets; it learns one of them, or neither, and augmentation can turn one into the other.
    They are warnings, not errors (the two may be meant): reword one so it names what it asks.
    One Problem per pair, at the later question's line."""
    text, _ = _read(path)
    entries, _ = _parse_text(text)
    owner: dict[tuple, dict[str, Entry]] = {}
    for e in entries:
        if e.kind == "prose":
            continue
        words = _question_words(e.question)
        keys = {tuple(words)}
        if len(words) > 1:
            keys |= {tuple(words[:i] + words[i + 1:]) for i, w in enumerate(words) if w in FUNCTION_WORDS}
        for k in keys:
            owner.setdefault(k, {}).setdefault(" ".join(e.target.split()), e)
    pairs: dict[tuple[int, int], tuple[Entry, Entry]] = {}
    for by_answer in owner.values():
        found = sorted(by_answer.values(), key=lambda e: e.line)
        for i, a in enumerate(found):
            for b in found[i + 1:]:
                pairs.setdefault((a.line, b.line), (a, b))
    return [Problem(b.line, f"question {b.question!r} is nearly question {a.question!r} of line {a.line}, "
                            f"which has a different answer: reword one so it names what it asks")
            for a, b in sorted(pairs.values(), key=lambda ab: (ab[1].line, ab[0].line))]


def _token_counts(tok, entries) -> list[int]:
    return [len(enc.ids) for enc in tok.encode_batch(training_texts(entries), add_special_tokens=False)]


def stats(path, tokenizer=None) -> dict:
    """Counts for a corpus: entries, qa, do, prose, distinct_answers (distinct targets of qa/do
    entries), questions_per_answer {min, mean, max}; with a tokenizer also tokens_total and
    max_entry_tokens (serialized entries) and tokens_mean."""
    entries = parse(path)
    kinds = {k: sum(e.kind == k for e in entries) for k in ("qa", "do", "prose")}
    per_answer: dict[str, int] = {}
    for e in entries:
        if e.kind != "prose":
            per_answer[e.target] = per_answer.get(e.target, 0) + 1
    counts = list(per_answer.values())
    out = {
        "entries": len(entries), **kinds,
        "distinct_answers": len(per_answer),
        "questions_per_answer": {
            "min": min(counts) if counts else 0,
            "mean": (sum(counts) / len(counts)) if counts else 0.0,
            "max": max(counts) if counts else 0,
        },
    }
    tok = _load_tokenizer(tokenizer)
    if tok is not None:
        n = _token_counts(tok, entries)
        out["tokens_total"] = sum(n)
        out["max_entry_tokens"] = max(n) if n else 0
        out["tokens_mean"] = (sum(n) / len(n)) if n else 0.0
    return out


def load_questions(path) -> list[tuple[str, str]]:
    """(question, expected answer) for every qa and do entry, in file order; the expected
    answer of a do entry is "Do: {command}"."""
    text, enc = _read(path)
    bad = enc + control_char_problems(text)
    if bad:
        raise ValueError(f"{os.fspath(path)}:{bad[0].line}: {bad[0].message}"
                         + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
    return [(e.question, e.target) for e in _parse_text(text)[0] if e.kind != "prose"]


def load_question_lines(path, what="questions file") -> list[str]:
    """Questions one per line (blank lines and '#' lines skipped), or the Q: lines of a file in
    the corpus format. Raises ValueError naming the file and line of a problem."""
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise ValueError(f"{what} not found: {p}")
    with open(p, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{p} is not UTF-8 text ({e})") from None
    if any(line.startswith(Q_PREFIX) for line in text.splitlines()):
        return [q for q, _ in load_questions(p)]
    out = []
    for no, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if any(_is_control(ch) for ch in line):
            raise ValueError(f"{p}:{no}: control character in the question")
        out.append(line)
    if not out:
        raise ValueError(f"{what} {p} holds no question")
    return out


def format_stats(st: dict, path=None, tokenizer=None) -> str:
    """`tinygpt corpus stats`: the stats dict as an aligned table (`--json` prints the dict)."""
    from .ui import format_rows

    qpa = st["questions_per_answer"]
    rows = [(str(path) if path is not None else "corpus", None),
            ("entries", st["entries"], ""),
            ("  Q/A", st["qa"], "Q: + A: pairs"),
            ("  Q/Do", st["do"], "Q: + Do: command suggestions"),
            ("  prose", st["prose"], "paragraphs"),
            ("distinct answers", st["distinct_answers"], "(of Q/A and Q/Do entries)"),
            ("questions per answer", "%.2f" % qpa["mean"], "mean (min %d, max %d)" % (qpa["min"], qpa["max"]))]
    if "tokens_total" in st:
        rows += [("tokens (%s)" % tokenizer if tokenizer else "tokens", None),
                 ("total", "{:,}".format(st["tokens_total"]), "tokens, entries serialized for training"),
                 ("per entry", "%.1f" % st["tokens_mean"], "tokens, mean"),
                 ("longest entry", st["max_entry_tokens"], "tokens")]
    else:
        rows.append(("tokens: not counted (give --tokenizer DIR to count them)", None))
    return format_rows(rows)
