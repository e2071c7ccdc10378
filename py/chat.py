# chat.py: ask the tinygpt model a question, on the board or on a PC.
#
#   >>> import chat
#   >>> chat.ask("What is WiFi?")        # streams the answer, returns it
#   >>> chat.chat()                      # type questions; an empty line or Ctrl-D leaves
#   >>> chat.generate("Once upon a time", 100)   # plain text continued (story models)
#
# One file for MicroPython and CPython: the heavy math is the C module `tinygpt` (built into
# the firmware, or the host package on a PC), the tokenizer is bpe.py beside this file.
# The prompt is exactly what the model was trained on: "Q: {question}\nA:".
import sys
import time

import tinygpt
from bpe import Decoder, Tokenizer

from topic import off_topic

try:
    from draft import Drafter, read_section
except ImportError:  # a board deployed without draft.py: answers come without drafting
    Drafter = None
try:
    from retrieve import RETRIEVAL_KEY, Index
except ImportError:  # a board deployed without retrieve.py: the model's answers as they come
    Index = None

MAX_NEW_TOKENS = 80
MIN_ANSWER_ROOM = 16  # context positions kept free for the answer when a question is cut
DO_PREFIX = "Do:"
# What strip() removes, spelled out: MicroPython's str.strip() knows only ASCII whitespace,
# CPython's also U+00A0, U+3000, ...; the board and the PC must see the same prompt and answer.
_WS = " \t\n\r\x0b\x0c"
# Where the model is looked for when load() gets no path: the flash partition labelled
# "model" (ESP32 firmware), then files.
DEFAULT_PATHS = ("model", "/model.bin", "model.bin", "models/default/model.bin")

_model = None
_tok = None
_path = None
_answers = b""  # the corpus answers' ids from the model file's drafts section (draft.py)
_abstain = None  # the model's abstain answer (its meta section), None if it has none
_known = None    # the corpus's content words (meta known_words, topic.py), None if none
_index = None    # the corpus answers' word index (meta retrieval, retrieve.py), None if none
ABSTAIN_KEY = "abstain_answer"
KNOWN_WORDS_KEY = "known_words"


def load(path=None, n_ctx=None, n_threads=None):
    """Load the model (and the tokenizer stored inside it). Returns the model.
    n_threads: cores the engine splits each matrix product over (default: the engine's, 1;
    2 on an ESP32-S3 uses its second core; answers are bit for bit the same)."""
    global _model, _tok, _path
    close()
    if path is None:
        last = None
        for p in DEFAULT_PATHS:
            try:
                return load(p, n_ctx, n_threads)
            except OSError as e:  # not there: try the next place
                last = e
        raise OSError("no model found (tried %s): %s" % (", ".join(DEFAULT_PATHS), last))
    if n_threads is None:
        _model = tinygpt.Model(path) if n_ctx is None else tinygpt.Model(path, n_ctx)
    else:
        _model = tinygpt.Model(path, n_ctx, n_threads=n_threads)
    _tok = _tokenizer(_model.tokenizer_blob())
    _path = path
    _load_answers(path)
    _load_meta()
    return _model


def _tokenizer(blob):
    """The model's tokenizer: byte-level BPE (bpe.py, section version 1) or llama2.c's
    score-ordered BPE (sptok.py, version 2)."""
    if bytes(blob[4:8]) == b"\x02\x00\x00\x00":
        from sptok import Tokenizer as ScoreTokenizer

        return ScoreTokenizer(blob)
    return Tokenizer(blob)


def _decoder(prev=-1):
    """A streaming decoder for the model's tokenizer; prev: the id before the first one fed
    (llama2.c's tokenizer drops the space a token after bos starts with)."""
    if isinstance(_tok, Tokenizer):
        return Decoder(_tok)
    return _tok.decoder(prev)


def generate_prompt_ids(prompt):
    """The ids generate() starts from: the text as it is (llama2.c's tokenizer: bos first, as
    its run.c does); an empty prompt is the bos token alone."""
    if not prompt:
        return [_model.info()["bos_id"]]
    if isinstance(_tok, Tokenizer):
        return _tok.encode(prompt)
    return _tok.encode(prompt, True)


def _load_meta():
    """The meta section's "key: value" lines (docs/model-format.md section 8): the abstain answer."""
    global _abstain, _known, _index
    _abstain = _known = _index = None
    meta = {}
    raw = bytes(_model.meta())
    view = memoryview(raw)
    # Line by line from a view of the copy, not raw.decode().split(): a word index is ~180 KB, and
    # the whole text and its list of lines next to the copy would need three such blocks of the
    # board's heap at once. The copy is kept until the index is built: freed before, its block
    # would fill with the index's objects among short-lived ones, and the heap left so fragmented
    # that a 16 KB logits() copy found no room (the shipped corpus's index on a 1.5 MB heap).
    start, end = 0, len(raw)
    while start < end:
        stop = raw.find(b"\n", start)
        if stop < 0:
            stop = end
        i = raw.find(b": ", start, stop)  # not str.partition: optional in MicroPython builds
        if i > start:
            meta[str(view[start:i], "utf-8")] = str(view[i + 2:stop], "utf-8")
        start = stop + 1
    _abstain = meta.get(ABSTAIN_KEY)
    _known = meta.get(KNOWN_WORDS_KEY)
    if Index is not None and RETRIEVAL_KEY in meta:
        _index = Index(meta)
    del view, raw, meta


def abstain_answer():
    """The answer the model was trained to give to a question its corpus does not cover (what
    ask() returns for it), or None for a model trained without one."""
    if _model is None:
        load()
    return _abstain


def _load_answers(path):
    """The drafts section of the model file, if it has one (a flash partition label is not a
    file: then drafts come from the question only)."""
    global _answers
    _answers = b""
    if Drafter is None:
        return
    try:
        found = read_section(path)
    except OSError:
        return
    if found is not None:
        _answers = found[1]


def close():
    global _model, _tok, _answers, _abstain, _known, _index
    if _model is not None:
        _model.close()
    _model = None
    _tok = None
    _answers = b""
    _abstain = _known = _index = None


def _clean(question, limit):
    """The question as one line of text: control characters become spaces, ends stripped, at
    most `limit` characters kept. Returns (text, more): more is True when text was left out
    (other than whitespace; the kept part then keeps its trailing whitespace, so it is still
    `limit` characters). Only the kept part is copied: a 100,000-character question costs no
    more memory than a short one."""
    if not isinstance(question, str):
        raise TypeError("the question must be a str")
    out = []
    more = False
    for ch in question:
        o = ord(ch)
        if o < 32 or 127 <= o < 160:  # C0, DEL and C1 controls
            ch = " "
        if len(out) >= limit:
            if ch not in _WS:
                more = True
                break
        elif out or ch not in _WS:  # leading whitespace is dropped as it comes
            out.append(ch)
    q = "".join(out)
    if not more:
        q = q.rstrip(_WS)
    if not q:
        raise ValueError("empty question: type a question, e.g. chat.ask('What is PSRAM?')")
    return q, more


def prompt_ids(question, n_ctx):
    """Token ids of "Q: {question}\nA:", the question cut so that the prompt leaves
    MIN_ANSWER_ROOM positions for the answer. Returns (ids, n_question_tokens_cut, more).

    A question too long to fit is cut before it is tokenized, so that the tokenizer's time and
    memory depend on n_ctx, not on the question: no token is longer than max_token_bytes, so
    (budget + 1) * max_token_bytes characters always make more tokens than the budget. more is
    True when that happened; the count is then of the tokens cut from the tokenized part."""
    budget = n_ctx - MIN_ANSWER_ROOM
    if budget < 8:
        budget = n_ctx - 1
    q, more = _clean(question, (budget + 1) * _tok.max_token_bytes)
    ids = _tok.encode("Q: " + q + "\nA:")
    if len(ids) <= budget:
        return ids, 0, False
    head = _tok.encode("Q:")  # not "Q: ": the space belongs to the question's first token
    tail = _tok.encode("\nA:")
    body = ids[len(head):len(ids) - len(tail)]
    keep = budget - len(head) - len(tail)
    if keep < 1:
        raise ValueError("the context (%d tokens) is too short for any question" % n_ctx)
    return head + body[:keep] + tail, len(body) - keep, more


def ticks_us():
    """A microsecond counter for timing: time.ticks_us on MicroPython (where time.time() may
    not exist, e.g. the qemu port), time.perf_counter on CPython."""
    if hasattr(time, "ticks_us"):
        return time.ticks_us()
    return int(time.perf_counter() * 1000000)


def us_since(t0):
    """Microseconds since ticks_us() returned t0 (ticks_diff handles the counter's wrap)."""
    if hasattr(time, "ticks_diff"):
        return time.ticks_diff(time.ticks_us(), t0)
    return ticks_us() - t0


def _out(s):
    sys.stdout.write(s)
    if hasattr(sys.stdout, "flush"):
        sys.stdout.flush()


def _show(text, printed):
    """Stream the answer: text is everything decoded so far, printed how much of it is on the
    console. Whitespace at either end is held back (the answer is returned stripped), so the
    console shows exactly the returned text. Returns the new count."""
    shown = text.strip(_WS)
    if printed == 0 and shown.startswith(DO_PREFIX):
        _out("[suggested command, not run] ")
    if len(shown) > printed:
        _out(shown[printed:])
        printed = len(shown)
    return printed


def _check_draft(m, drafter, tok, k, sampling):
    """Speculative step: tok (the model's next token, not yet in the context) and up to k
    drafted tokens after it go through the model in ONE pass; the drafted tokens are accepted
    while the model agrees (greedy: its own choice; sampling: draft d kept with probability
    p(d), which keeps the distribution exact), the rest rolled back. Returns the accepted tokens
    followed by the model's own next token, and the number of drafted tokens."""
    temperature, top_k, top_p, penalty = sampling
    drafter.add(tok)
    guess = drafter.propose(k) if k > 0 else []
    p0 = m.pos
    if temperature == 0.0:
        choice = m.verify([tok] + guess, penalty)
        j = 0
        while j < len(guess) and guess[j] == choice[j]:
            j += 1
        nxt = choice[j]
    else:
        m.verify([tok] + guess, penalty)
        j = 0
        nxt = None
        while j < len(guess):
            x = m.sample(temperature, top_k, top_p, penalty, at=p0 + j, draft=guess[j])
            if x != guess[j]:
                nxt = x
                break
            j += 1
        if nxt is None:
            nxt = m.sample(temperature, top_k, top_p, penalty, at=p0 + j)
    m.rewind(p0 + 1 + j)
    for t in guess[:j]:
        drafter.add(t)
    return guess[:j] + [nxt], len(guess)


def ask(question, max_new_tokens=MAX_NEW_TOKENS, temperature=0.0, top_k=0, top_p=1.0,
        repetition_penalty=1.0, seed=None, stream=True, timing=False, draft=True):
    """Answer one question. Streams the answer to the console when stream is True and returns
    the answer text. A command suggestion comes back starting with "Do:"; it is never run.
    Ctrl-C stops the answer; what was generated so far is returned.
    draft: guess the next tokens from the corpus answers and the question, and let the model
    check several in one pass (the same answer as without, token for token when greedy; the
    same distribution when sampling); False: one pass per token.
    A model file with a word index (retrieve.py) has its answer checked against the corpus
    answers before it is shown: the answer then appears whole, once decided."""
    if _model is None:
        load()
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError("max_new_tokens must be an int >= 1")
    n_ctx = _model.info()["n_ctx"]
    ids, cut, more = prompt_ids(question, n_ctx)
    text = _clean(question, n_ctx * _tok.max_token_bytes)[0]
    if _abstain is not None and _known and off_topic(text, _known):
        # no word of the question is in the corpus: the abstain answer, without a model pass
        if stream:
            _out(_abstain + "\n")
        return _abstain
    if cut and stream:
        _out("[question cut by %s%d tokens to fit the %d-token context]\n"
             % ("more than " if more else "", cut, n_ctx))
    sampling = (temperature, top_k, top_p, repetition_penalty)
    if _index is None:
        return _generate(ids, max_new_tokens, sampling, seed, stream, timing, draft)[0]
    answer, interrupted = _generate(ids, max_new_tokens, sampling, seed, False, timing, draft)
    if not interrupted:
        answer = _index.choose(text, answer, _abstain)[0]
    if stream:
        _out(answer + (" [interrupted]\n" if interrupted else "\n"))
    return answer


def _generate(ids, max_new_tokens, sampling, seed, stream, timing, draft):
    """The model's answer to the prompt ids: (text, interrupted by Ctrl-C)."""
    m = _model
    info = m.info()
    n_ctx = info["n_ctx"]
    eos, q_id = info["eos_id"], info["q_id"]
    temperature, top_k, top_p, repetition_penalty = sampling
    dec = _decoder()
    text = ""
    printed = 0
    n_new = 0
    t0 = ticks_us()
    stop = -1
    interrupted = False
    drafter = None
    if draft and Drafter is not None:
        drafter = Drafter(_answers, eos)
        drafter.start(ids)
        k_max = info["max_draft"] - 1
        k = k_max // 2
    known = []  # tokens already checked by the model, not yet shown (accepted drafts)
    m.reset()
    try:
        m.prefill(ids)
        tok = m.sample(temperature, top_k, top_p, repetition_penalty, seed)
        while True:
            if tok == eos or tok == q_id:
                break
            n_new += 1
            text += dec.feed(tok)
            stop = text.find("\n\n")
            if stop >= 0:
                text = text[:stop]
            if stream:
                printed = _show(text, printed)
            # no pass for the last token: its logits would never be used. The token just shown
            # takes position len(ids) + n_new - 1 (drafting may have processed it already).
            if stop >= 0 or n_new >= max_new_tokens or len(ids) + n_new - 1 >= n_ctx:
                break
            if known:
                tok = known.pop(0)
            elif drafter is None:
                m.step(tok)
                tok = m.sample(temperature, top_k, top_p, repetition_penalty)
            else:
                # at most what the answer and the context can still use
                room = min(k, max_new_tokens - n_new - 1, n_ctx - m.pos - 1)
                known, n_drafted = _check_draft(m, drafter, tok, room, sampling)
                # adaptive: a fully accepted draft grows the next one, a rejection shrinks it
                # to what was accepted (a wrong drafted token costs a full token's compute)
                if n_drafted and len(known) > n_drafted:
                    k = k + 2 if k + 2 < k_max else k_max
                elif n_drafted:
                    k = len(known) - 1 if len(known) > 1 else 1
                tok = known.pop(0)
    except KeyboardInterrupt:
        interrupted = True
    if stop < 0:
        text += dec.flush()  # an unfinished UTF-8 character at the end becomes U+FFFD
    text = text.strip(_WS)
    if stream:
        _show(text, printed)
        if interrupted:
            _out(" [interrupted]")
        _out("\n")
        if timing:
            dt = us_since(t0) / 1e6
            _out("(%d prompt + %d answer tokens, %.1f tok/s)\n" % (len(ids), n_new, n_new / dt if dt > 0 else 0))
    return text, interrupted


def generate(prompt, max_new_tokens=MAX_NEW_TOKENS, temperature=0.0, top_k=0, top_p=1.0,
             repetition_penalty=1.0, seed=None, stream=True):
    """Continue plain text (a story model, say: no Q:/A: wrapping) by up to max_new_tokens tokens,
    greedy by default. Streams the text as it comes when stream is True; returns the
    continuation. It stops at the end-of-text token or when the context is full; Ctrl-C stops
    it and keeps what came. An empty prompt starts from the model's bos token. A prompt longer
    than the context keeps its last tokens (and says so)."""
    if _model is None:
        load()
    if not isinstance(prompt, str):
        raise TypeError("prompt must be a str")
    info = _model.info()
    n_ctx = info["n_ctx"]
    if n_ctx < 2:
        raise ValueError("generate needs a context of at least 2 tokens (n_ctx is %d)" % n_ctx)
    ids = generate_prompt_ids(prompt)
    if len(ids) > n_ctx - 1:
        if stream:
            _out("[prompt cut to its last %d of %d tokens to fit the %d-token context]\n"
                 % (n_ctx - 1, len(ids), n_ctx))
        ids = ids[len(ids) - (n_ctx - 1):]
    dec = _decoder(ids[-1])
    parts = []

    def shown(tok):
        s = dec.feed(tok)
        parts.append(s)
        if stream:
            _out(s)

    generate_ids(ids, max_new_tokens, (temperature, top_k, top_p, repetition_penalty), seed, shown)
    s = dec.flush()
    parts.append(s)
    if stream:
        _out(s + "\n")
    return "".join(parts)


def generate_ids(ids, max_new_tokens, sampling=(0.0, 0, 1.0, 1.0), seed=None, on_token=None):
    """The token ids that follow ids (a list the context holds): up to max_new_tokens, stopping
    after the end-of-text id (not included) or when the context is full. on_token(id) sees each
    id as it comes. Returns (ids, interrupted by Ctrl-C)."""
    if _model is None:
        load()
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError("max_new_tokens must be an int >= 1")
    m = _model
    info = m.info()
    if not ids or len(ids) > info["n_ctx"]:
        raise ValueError("the prompt must be 1 to n_ctx = %d tokens, got %d" % (info["n_ctx"], len(ids)))
    temperature, top_k, top_p, repetition_penalty = sampling
    out = []
    interrupted = False
    m.reset()
    try:
        m.prefill(ids)
        while True:
            tok = m.sample(temperature, top_k, top_p, repetition_penalty, seed if not out else None)
            if tok == info["eos_id"]:
                break
            out.append(tok)
            if on_token is not None:
                on_token(tok)
            # no pass for the last token: its logits would never be used
            if len(out) >= max_new_tokens or m.pos >= info["n_ctx"]:
                break
            m.step(tok)
    except KeyboardInterrupt:
        interrupted = True
    return out, interrupted


def is_command(answer):
    """True when ask() returned a command suggestion (shown to the user, never executed)."""
    return answer.startswith(DO_PREFIX)


def chat(**settings):
    """Interactive questions and answers. An empty line or Ctrl-D leaves; Ctrl-C stops an answer."""
    if _model is None:
        load()
    print("tinygpt: ask a question (empty line or Ctrl-D to leave)")
    while True:
        try:
            q = input("Q: ")
        except EOFError:
            print()
            break
        except KeyboardInterrupt:
            print()
            break
        if not q.strip(_WS):
            break
        _out("A: ")
        try:
            ask(q, **settings)
        except ValueError as e:
            print("[%s]" % e)
