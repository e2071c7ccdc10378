"""Exact-match evaluation of a trained model: the float Hugging Face model and the INT8 engine.

    evaluate(run_dir_or_model, questions_file, tokenizer=None, int8_model=None, plot=None,
             max_new_tokens=80, log=print, progress=True, limit=None, threads=1, draft=True) -> dict

``run_dir_or_model`` is a training run directory (Hugging Face GPT-2: config.json, weights,
tokenizer.json) or a tinygpt model file. ``questions_file`` is in the corpus format; every
Q/A and Q/Do entry is a question with its expected answer (tinygpt.corpus.load_questions);
prose paragraphs are not questions and are skipped. ``limit=N`` takes the first N questions.

Speed: the float model (PyTorch, one token per forward call) is much slower than the INT8
engine (README, "Convert, evaluate, measure", has the measurement). ``threads`` is torch's CPU
threads for the float model (default 1, as in training: on a busy 2-core machine 2 threads made
a float eval 10x slower; None: all cores), restored afterwards.

For each question the prompt ``"Q: {question}\\nA:"`` is tokenized with the Hugging Face
tokenizer (``tokenizer``, else tokenizer.json of the run directory; for a model file alone,
tokenizer.json next to it, else the tokenizer inside the model file via py/bpe.py) and the
answer is generated greedily

* with the float model (run directory only): ``GPT2LMHeadModel`` with eager attention,
  KV-cached (``past_key_values``), one token per step;
* with the INT8 C engine (``tinygpt.engine.Model``) on ``int8_model`` if given, else on a
  temporary file converted from the run directory by ``tinygpt.convert.convert``
  (``int8_model=False`` skips INT8).

With ``draft=True`` (the default) the expected answer is the draft of ``generate``: its tokens
are checked in one forward pass and the answer is generated token by token only from where the
model departs from it, so a right answer costs one pass instead of one per token (3,610 training
questions of the shipped model: see models/default/README.md). For the INT8 engine the answer
is bit for bit the one of plain stepping (its verify is tested identical); for the float model
a full pass and one-token steps round differently in the last bits, so an answer could differ
where two tokens tie to the last bit. ``draft=False`` (``--no-draft``) steps token by token.

Both use the same loop and stop rules: stop before an ``<|endoftext|>`` or ``Q:`` token, at a
blank line ("\\n\\n", the text from it on is dropped), after ``max_new_tokens`` tokens, or when
the context is full. The answer is the decoded text (special tokens kept, so a ``Do:``
command suggestion reads "Do: ...") with surrounding whitespace stripped; it is an exact match
when it equals the expected answer.

The result dict has ``n``, ``exact_match_float`` (None without a float model),
``exact_match_int8`` (None without INT8), ``int8_equals_float`` (share of questions where the
two answers are identical; None unless both ran), the matching counts (``*_count``),
``results`` (one dict per question: question, expected, float, int8, ok_float, ok_int8),
``mismatches`` (the results where anything differs), ``hf_dir``, ``model_file``, ``plot`` and
``seconds``. A table is printed through ``log`` (then the first 20 mismatches, each answer in
full with the character where it first differs from the expected one) and with ``plot=PATH`` a
bar chart of the three numbers is saved as PNG. The progress bar (``progress=True``) is shown
only when stderr is a terminal.

``tinygpt eval RUN_DIR_OR_MODEL --questions FILE [--int8 MODEL] [--plot PNG] [--limit N]`` runs it.
"""
from __future__ import annotations

import importlib.util
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

from . import corpus as corpus_mod

MIN_ANSWER_ROOM = 16  # as py/chat.py: context positions kept for the answer when a question is cut

REPO = Path(__file__).resolve().parents[2]
SHOW_MISMATCHES = 20


# ----------------------------------------------------------------------------- tokenizers

class _SectionTokenizer:
    """The tokenizer inside a model file, through the device tokenizer (py/bpe.py)."""

    def __init__(self, model):
        path = REPO / "py" / "bpe.py"
        if not path.is_file():
            raise ValueError("no tokenizer given and none found next to the model file; pass tokenizer=")
        spec = importlib.util.spec_from_file_location("_tinygpt_device_bpe", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        self._tok = mod.Tokenizer(model.tokenizer_blob())
        info = model.info()
        self.eos_id, self.q_id = info["eos_id"], info["q_id"]

    def encode(self, text):
        return list(self._tok.encode(text))

    def decode(self, ids):
        return bytes(self._tok.decode(ids)).decode("utf-8", "replace")


class _HFTokenizer:
    def __init__(self, tok):
        self._tok = tok
        self.eos_id = tok.token_to_id(corpus_mod.EOS)
        self.q_id = tok.token_to_id(corpus_mod.Q_PREFIX)

    def encode(self, text):
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self._tok.decode(list(ids), skip_special_tokens=False)


def _load_hf_tokenizer(tokenizer):
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if hasattr(tokenizer, "backend_tokenizer"):
        return tokenizer.backend_tokenizer
    p = Path(tokenizer)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise ValueError(f"tokenizer not found: {p}")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:
        raise ValueError(f"cannot read tokenizer {p}: {e}") from None


# ----------------------------------------------------------------------------- generation

class _FloatRunner:
    """Greedy KV-cached decoding with the Hugging Face model (eager attention)."""

    def __init__(self, hf_dir, threads=1):
        import torch
        from transformers import GPT2LMHeadModel

        self.torch = torch
        self.prev_threads = torch.get_num_threads()
        torch.set_num_threads(threads or os.cpu_count() or 1)
        from .ui import quiet_hf

        with quiet_hf():
            self.model = GPT2LMHeadModel.from_pretrained(str(hf_dir), attn_implementation="eager",
                                                         dtype=torch.float32)
        self.model.eval()
        self.n_ctx = self.model.config.n_positions
        self.pos = 0
        self._past = None
        self._logits = None

    def prefill(self, ids):
        self._past = None
        self.pos = 0
        self._feed(ids)

    def step(self, t):
        self._feed([t])

    def _feed(self, ids):
        # past_key_values is the cache argument of every transformers version this supports;
        # 5.x calls it deprecated (a FutureWarning per call), which is not the user's concern.
        with self.torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            out = self.model(input_ids=self.torch.tensor([list(ids)], dtype=self.torch.long),
                             past_key_values=self._past, use_cache=True)
        self._past = out.past_key_values
        self._logits = out.logits[0, -1]
        self.pos += len(ids)

    def argmax(self):
        return int(self.torch.argmax(self._logits))

    def predict(self, prompt_ids, draft):
        """Greedy choice after prompt_ids + draft[:i] for i = 0..len(draft), in one forward pass."""
        ids = list(prompt_ids) + list(draft)
        with self.torch.no_grad():
            logits = self.model(input_ids=self.torch.tensor([ids], dtype=self.torch.long)).logits[0]
        self._past, self._logits, self.pos = None, None, 0
        return [int(t) for t in self.torch.argmax(logits[len(prompt_ids) - 1:], dim=-1)]


class _Int8Runner:
    def __init__(self, model):
        self.m = model
        self.n_ctx = model.info()["n_ctx"]

    @property
    def pos(self):
        return self.m.pos

    def prefill(self, ids):
        self.m.reset()
        self.m.prefill(ids)

    def step(self, t):
        self.m.step(t)

    def argmax(self):
        return self.m.sample(temperature=0.0)

    def predict(self, prompt_ids, draft):
        """Greedy choice after prompt_ids + draft[:i] for i = 0..len(draft): the engine's verify,
        bit-identical to stepping (tests/test_draft.py); None when the model cannot verify."""
        k = self.m.info()["max_draft"]
        if k < 1:
            return None
        self.prefill(prompt_ids)
        out = [self.argmax()]
        for s in range(0, len(draft), k):
            out += self.m.verify(list(draft[s:s + k]))
        return out


def board_prompt_ids(tok, question, n_ctx):
    """The prompt's token ids as py/chat.py's prompt_ids makes them on the board: a question too
    long for the context keeps its first tokens, leaving chat.MIN_ANSWER_ROOM positions for the
    answer (so eval answers a long question as the board does, instead of not at all)."""
    ids = tok.encode(corpus_mod.prompt(question))
    budget = n_ctx - MIN_ANSWER_ROOM if n_ctx - MIN_ANSWER_ROOM >= 8 else n_ctx - 1
    if len(ids) <= budget:
        return ids
    head, tail = tok.encode(corpus_mod.Q_PREFIX), tok.encode("\n" + corpus_mod.A_PREFIX)
    keep = budget - len(head) - len(tail)
    if keep < 1:
        raise ValueError(f"the context ({n_ctx} tokens) is too short for any question")
    return head + ids[len(head):len(ids) - len(tail)][:keep] + tail


def generate(runner, tok, prompt_ids, max_new_tokens=80, draft=None) -> str:
    """Greedy answer text for prompt_ids with the stop rules of the module docstring.

    draft: token ids the answer probably starts with (eval passes the expected answer). They are
    checked in one forward pass (runner.predict); the answer follows them as far as the greedy
    choice agrees and is generated token by token only from where it departs. The result is the
    same greedy answer, found in one pass when the model answers as expected."""
    if not prompt_ids or len(prompt_ids) > runner.n_ctx:
        return ""
    known = None  # known[i]: the greedy token after prompt_ids + gen[:i]
    if draft and hasattr(runner, "predict"):
        d = list(draft)[:runner.n_ctx - len(prompt_ids)]
        known = runner.predict(prompt_ids, d)  # len(d) + 1 greedy choices, or None
    if known:
        agree = next((i for i, t in enumerate(d) if known[i] != t), len(d))
        known = known[:agree + 1]
    else:
        known = []
        runner.prefill(prompt_ids)
    stepping = not known  # the runner's state is prompt_ids + gen[:-1], ready for step(gen[-1])
    stop = {t for t in (tok.eos_id, tok.q_id) if t is not None}
    gen: list[int] = []
    text = ""
    while len(gen) < max_new_tokens:
        if len(gen) < len(known):
            t = known[len(gen)]
        else:
            if not stepping:  # left the draft: continue from prompt + what was generated
                runner.prefill(list(prompt_ids) + gen)
                stepping = True
            t = runner.argmax()
        if t in stop:
            break
        gen.append(t)
        text = tok.decode(gen)
        if "\n\n" in text:
            text = text[:text.index("\n\n")]
            break
        if len(prompt_ids) + len(gen) - 1 >= runner.n_ctx:  # context full: t cannot be fed
            break
        if stepping:
            runner.step(t)
    return text.strip()


# ----------------------------------------------------------------------------- evaluation

def load_ood_questions(path) -> list[str]:
    """Out-of-domain questions: one per line ('#' lines and blank lines skipped), or the Q: lines
    of a corpus-format file."""
    return corpus_mod.load_question_lines(path, "out-of-domain questions file")


def abstain_answer_of(hf_dir, model_file):
    """(abstain answer, known_words) the model was trained with: the run's config.json, else the
    model file's meta section; (None, None) when it has none."""
    abstain, known, _ = answer_checks_of(hf_dir, model_file)
    return abstain, known


def answer_checks_of(hf_dir, model_file):
    """(abstain answer, known_words, py/retrieve.py Index or None): what chat.ask checks an answer
    with on the board. From the model file's meta section (what the board reads), else the run's
    config.json."""
    from .modelfile import ABSTAIN_KEY, KNOWN_WORDS_KEY, parse_meta
    from .retrieval import load_index

    meta = {}
    if model_file is not None:
        from .engine import Model

        with Model(model_file) as m:
            meta = parse_meta(m.meta())
    elif hf_dir is not None:
        try:
            cfg = json.loads((Path(hf_dir) / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            cfg = {}
        if cfg.get("abstain_answer"):
            meta[ABSTAIN_KEY] = cfg["abstain_answer"]
            if cfg.get("abstain_known_words"):
                meta[KNOWN_WORDS_KEY] = cfg["abstain_known_words"]
        if isinstance(cfg.get("retrieval_index"), dict):
            meta.update(cfg["retrieval_index"])
    return meta.get(ABSTAIN_KEY), meta.get(KNOWN_WORDS_KEY), load_index(meta)


def evaluate(run_dir_or_model, questions_file, tokenizer=None, int8_model=None, plot=None,
             max_new_tokens=80, log=print, progress=True, limit=None, threads=1, draft=True,
             ood_file=None) -> dict:
    """Exact-match accuracy of the float model and the INT8 engine on questions_file, and how
    often the two answer alike; with ood_file, how many of its (out-of-domain) questions get the
    model's abstain answer, next to the in-domain questions that get it wrongly. See the
    module docstring."""
    from .train import check_threads

    check_threads(threads)
    log = log or (lambda *a, **k: None)
    t0 = time.perf_counter()
    src = Path(run_dir_or_model)
    hf_dir, int8_model = _check_model_args(src, int8_model, max_new_tokens, limit)
    qfile, questions, n_all, ood = _read_questions(questions_file, limit, ood_file, log)
    hf_tok = _pick_hf_tokenizer(tokenizer, hf_dir, src)

    with tempfile.TemporaryDirectory(prefix="tinygpt-eval-") as tmp:
        model_file = _int8_model_file(tmp, hf_dir, int8_model, hf_tok if tokenizer is not None else None, log)
        abstain, known, index = answer_checks_of(hf_dir, model_file)
        from .abstain import _topic

        topic = _topic()
        int8 = None
        if model_file is not None:
            from .engine import Model
            int8 = Model(model_file)
        runners = {}
        try:
            tok = _HFTokenizer(hf_tok) if hf_tok is not None else _SectionTokenizer(int8)
            if hf_dir is not None:
                runners["float"] = _FloatRunner(hf_dir, threads)
            if int8 is not None:
                runners["int8"] = _Int8Runner(int8)
            results, ood_results = _answer_all(runners, tok, questions, ood, (abstain, known, index), topic,
                                               max_new_tokens, draft, progress)
        finally:
            if int8 is not None:
                int8.close()
            if "float" in runners:
                runners["float"].torch.set_num_threads(runners["float"].prev_threads)

    model_label = None
    if model_file is not None:
        model_label = str(model_file) if int8_model not in (None, False) else "converted from the run directory"
    out = _summary(results, ood_results, ood, runners, (abstain, known, index), n_in_file=n_all, qfile=qfile,
                   hf_dir=hf_dir, model_label=model_label, ood_file=ood_file)
    _print_table(out, log)
    if plot:
        plot_metrics(out, plot)
        out["plot"] = str(plot)
        log(f"plot: {plot}")
    out["seconds"] = time.perf_counter() - t0
    return out


# evaluate()'s steps, in the order it takes them

def _check_model_args(src, int8_model, max_new_tokens, limit):
    """(hf_dir or None, int8_model): a run directory, or a model file that is then the INT8 model."""
    if not src.exists():
        raise ValueError(f"model not found: {src}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be an int >= 1, got {limit!r}")
    hf_dir = src if src.is_dir() else None
    if hf_dir is not None and not (hf_dir / "config.json").is_file():
        raise ValueError(f"{hf_dir} is not a Hugging Face model directory (no config.json)")
    if hf_dir is None:
        if int8_model not in (None, False) and Path(int8_model) != src:
            raise ValueError("int8_model is only used with a run directory")
        int8_model = src
    return hf_dir, int8_model


def _read_questions(questions_file, limit, ood_file, log):
    """(qfile, the first `limit` (question, expected) pairs, how many the file has, ood questions)."""
    qfile = Path(questions_file)
    if not qfile.is_file():
        raise ValueError(f"questions file not found: {qfile}")
    questions = corpus_mod.load_questions(qfile)
    if not questions:
        raise ValueError(f"{qfile} has no Q/A or Q/Do entries (eval needs questions with their expected "
                         f"answers: 'Q: ...' lines each followed by an 'A: ...' or 'Do: ...' line)")
    n_all = len(questions)
    questions = questions[:limit]
    for pr in corpus_mod.conflicting_duplicates(qfile):
        log(f"warning: {qfile}:{pr.line}: {pr.message}; at most one of the two can be counted right")
    ood = load_ood_questions(ood_file)[:limit] if ood_file is not None else []
    return qfile, questions, n_all, ood


def _pick_hf_tokenizer(tokenizer, hf_dir, src):
    """The Hugging Face tokenizer: `tokenizer`, the run's, the one next to a model file, else None
    (then the model file's own section, through py/bpe.py)."""
    if tokenizer is not None:
        return _load_hf_tokenizer(tokenizer)
    if hf_dir is not None:
        return _load_hf_tokenizer(hf_dir)
    if (src.parent / "tokenizer.json").is_file():
        return _load_hf_tokenizer(src.parent)
    return None


def _int8_model_file(tmp, hf_dir, int8_model, convert_tokenizer, log):
    """The INT8 model file: int8_model, else the run directory converted into tmp; None for
    int8_model=False."""
    if int8_model is None and hf_dir is not None:
        from .convert import convert

        model_file = Path(tmp) / "model.bin"
        log(f"converting {hf_dir} to INT8 ({model_file.name} in a temporary directory)")
        convert(hf_dir, model_file, tokenizer=convert_tokenizer, progress=False)
        return model_file
    if int8_model not in (None, False):
        model_file = Path(int8_model)
        if not model_file.is_file():
            raise ValueError(f"INT8 model file not found: {model_file}")
        return model_file
    return None


def _checked(index, abstain, q, answer, r, name):
    """chat.ask's check of the model's answer against the corpus answers (py/retrieve.py)."""
    if index is None:
        return answer
    chosen, how = index.choose(q, answer, abstain)
    r["model_" + name], r["how_" + name] = answer, how
    return chosen


def _answer_all(runners, tok, questions, ood, checks, topic, max_new_tokens, draft, progress):
    """Every question (then every out-of-domain one) asked of every runner as chat.ask asks it:
    (results, ood_results), one dict per question."""
    abstain, known, index = checks
    results, ood_results = [], []
    bar = None
    if progress:
        from .ui import progress_bar
        bar = progress_bar(total=len(questions), desc="eval", unit="q")
    n_ctx = min((r.n_ctx for r in runners.values()), default=1 << 30)
    if bar is not None:
        bar.total = len(questions) + len(ood)
    for q, expected in questions + [(q, None) for q in ood]:
        ids = board_prompt_ids(tok, q, n_ctx)
        guess = None
        # chat.ask's first check: no word of the question in the corpus -> the abstain answer
        gated = bool(abstain and known and topic.off_topic(q, known))
        if expected is None:  # out of domain: no expected answer to draft from
            r = {"question": q, "expected": None, "ood": True, "prompt_tokens": len(ids), "gated": gated}
            for name, runner in runners.items():
                r[name] = abstain if gated else _checked(index, abstain, q,
                                                         generate(runner, tok, ids, max_new_tokens), r, name)
            ood_results.append(r)
            if bar is not None:
                bar.update(1)
            continue
        if draft:  # the expected answer's tokens, when the prompt's tokens are their prefix
            full = tok.encode(corpus_mod.prompt(q) + " " + expected.strip())
            guess = full[len(ids):] if full[:len(ids)] == ids else None
        r = {"question": q, "expected": expected, "prompt_tokens": len(ids), "gated": gated}
        for name, runner in runners.items():
            ans = abstain if gated else _checked(index, abstain, q,
                                                 generate(runner, tok, ids, max_new_tokens, draft=guess), r, name)
            r[name] = ans
            r["ok_" + name] = ans == expected.strip()
        results.append(r)
        if bar is not None:
            bar.update(1)
            bar.set_postfix({k: f"{sum(x['ok_' + k] for x in results) / len(results):.3f}" for k in runners})
    if bar is not None:
        bar.close()
    return results, ood_results


def _summary(results, ood_results, ood, runners, checks, *, n_in_file, qfile, hf_dir, model_label, ood_file):
    """evaluate()'s result but "seconds": exact matches, agreement, mismatches, abstentions and
    what the corpus check changed."""
    abstain, known, index = checks
    n = len(results)

    def share(key):
        if not results or key not in results[0]:
            return None, None
        c = sum(bool(r[key]) for r in results)
        return c / n, c

    em_f, c_f = share("ok_float")
    em_i, c_i = share("ok_int8")
    agree = None
    c_a = None
    if "float" in runners and "int8" in runners:
        for r in results:
            r["int8_equals_float"] = r["int8"] == r["float"]
        agree, c_a = share("int8_equals_float")
    mismatches = [r for r in results if not r.get("ok_float", True) or not r.get("ok_int8", True)
                  or not r.get("int8_equals_float", True)]
    abst = {}
    for name in runners:
        refused = sum(r[name] == abstain for r in results) if abstain else 0
        got = sum(r[name] == abstain for r in ood_results) if abstain else 0
        abst[name] = {"in_domain_abstained": refused, "in_domain_abstained_share": refused / n if n else None,
                      "ood_abstained": got if ood else None,
                      "ood_abstained_share": (got / len(ood_results)) if ood else None}
    return {
        "n": n, "n_in_file": n_in_file, "questions_file": str(qfile),
        "exact_match_float": em_f, "exact_match_int8": em_i, "int8_equals_float": agree,
        "exact_match_float_count": c_f, "exact_match_int8_count": c_i, "int8_equals_float_count": c_a,
        "hf_dir": str(hf_dir) if hf_dir is not None else None,
        "model_file": model_label,
        "results": results, "mismatches": mismatches, "plot": None,
        "abstain_answer": abstain, "abstention": abst, "known_words": len(known.split()) if known else None, "ood_file": str(ood_file) if ood_file else None,
        "n_ood": len(ood_results), "ood_results": ood_results,
        "retrieval": None if index is None else {name: {
            "answers": len(index.answers),
            "replaced": sum(r.get("how_" + name, "model") != "model" for r in results),
            "model_alone_exact": sum(r.get("model_" + name, r[name]) == r["expected"].strip() for r in results),
        } for name in runners},
    }


# ----------------------------------------------------------------------------- reporting

def _shown(s):
    """An answer on one line, in full (a newline shows as \\n)."""
    return "" if s is None else s.replace("\n", "\\n")


def _differs_at(got, expected):
    """Where got first differs from expected, as words for the mismatch list."""
    got, expected = got or "", expected or ""
    i = next((k for k, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
    if i == len(got) == len(expected):
        return ""
    if i == len(got):
        return "  (stops at character %d of %d)" % (i, len(expected))
    if i == len(expected):
        return "  (goes on after character %d)" % i
    return "  (differs from character %d)" % (i + 1)


def _print_table(res, log):
    n = res["n"]
    limited = f" (the first {n} of {res['n_in_file']})" if res.get("n_in_file", n) > n else ""
    log(f"{n} question{'' if n == 1 else 's'}{limited} from {res['questions_file']}"
        + (f"; float: {res['hf_dir']}" if res["hf_dir"] else "")
        + (f"; INT8: {res['model_file']}" if res["model_file"] else ""))
    log(f"{'metric':<32} {'value':>7} {'count':>11}")
    log("-" * 52)
    for label, key in (("exact match, float", "exact_match_float"), ("exact match, INT8", "exact_match_int8"),
                       ("INT8 answer == float answer", "int8_equals_float")):
        v, c = res[key], res[key + "_count"]
        log(f"{label:<32} {'-' if v is None else f'{v:.3f}':>7} {'-' if c is None else f'{c}/{n}':>11}")
    ab = res.get("abstention") or {}
    for name, a in (res.get("retrieval") or {}).items():
        label = "float" if name == "float" else "INT8"
        log(f"{'model alone exact, ' + label:<32} {a['model_alone_exact'] / n if n else 0:>7.3f} "
            f"{str(a['model_alone_exact']) + '/' + str(n):>11}   (answers replaced by the word check: {a['replaced']})")
    if res.get("abstain_answer") is None:
        if res.get("n_ood"):
            log("abstention: the model has no abstain answer (trained without one), so none is counted")
    else:
        for name, a in ab.items():
            label = "float" if name == "float" else "INT8"
            log(f"{'abstained in domain (wrong), ' + label:<32} {a['in_domain_abstained_share']:>7.3f} "
                f"{str(a['in_domain_abstained']) + '/' + str(n):>11}")
            if a["ood_abstained"] is not None:
                log(f"{'abstained out of domain, ' + label:<32} {a['ood_abstained_share']:>7.3f} "
                    f"{str(a['ood_abstained']) + '/' + str(res['n_ood']):>11}")
    mm = res["mismatches"]
    if mm:
        log(f"\nmismatches ({min(len(mm), SHOW_MISMATCHES)} of {len(mm)} shown):")
        for i, r in enumerate(mm[:SHOW_MISMATCHES], 1):
            log(f"{i:3d}. Q: {_shown(r['question'])}")
            log(f"     expected: {_shown(r['expected'])}")
            if "float" in r:
                ok = r["ok_float"]
                log(f"     float{' ok' if ok else '   '}: {_shown(r['float'])}"
                    + ("" if ok else _differs_at(r["float"], r["expected"])))
            if "int8" in r:
                ok = r["ok_int8"]
                log(f"     INT8{' ok ' if ok else '    '}: {_shown(r['int8'])}"
                    + ("" if ok else _differs_at(r["int8"], r["expected"])))


def plot_metrics(res, path):
    """Bar chart PNG of the three numbers (those that exist)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    items = [(lbl, res[k]) for lbl, k in (("exact match\nfloat", "exact_match_float"),
                                           ("exact match\nINT8", "exact_match_int8"),
                                           ("INT8 == float", "int8_equals_float")) if res[k] is not None]
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    bars = ax.bar([lbl for lbl, _ in items], [v for _, v in items], color=["#4c72b0", "#dd8452", "#55a868"][:len(items)])
    for b, (_, v) in zip(bars, items):
        ax.text(b.get_x() + b.get_width() / 2, v + 0.01, f"{v:.3f}", ha="center", va="bottom")
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("share of questions")
    ax.set_title(f"{res['n']} questions: {Path(res['questions_file']).name}")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.fspath(path))


# ----------------------------------------------------------------------------- the command

def add_arguments(p) -> None:
    """`tinygpt eval`'s options."""
    p.description = ("Asks every question of a file of Q/A pairs (corpus format: a 'Q: ...' line, "
                     "then its expected 'A: ...' or 'Do: ...' line; prose is skipped) and counts "
                     "the answers that equal the expected one exactly. A run directory gives float "
                     "and INT8 answers; a model file gives INT8 only, which is about 10x faster "
                     "(measured on 20 questions, hw1 preset: 5 s instead of 56 s of CPU time; "
                     "the float model runs in PyTorch, one token per call).")
    p.add_argument("model", help="training run directory (float + INT8) or a model file (INT8 only, ~10x faster)")
    p.add_argument("--questions", required=True,
                   help="Q/A pairs in the corpus format (Q: + A: or Do: lines), e.g. data/heldout.txt")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N questions (default: all)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads of the float model (default 1: on a busy 2-core machine 2 threads were "
                        "10x slower; raise it on idle cores)")
    p.add_argument("--tokenizer")
    p.add_argument("--int8", help="INT8 model file (default: convert the run directory)")
    p.add_argument("--no-int8", action="store_true", help="float model only")
    p.add_argument("--plot", help="write a bar chart PNG here")
    p.add_argument("--json", metavar="FILE", help="write every question's expected, float and INT8 answers and "
                                                  "the totals to FILE as JSON (the table shows only the first "
                                                  "20 mismatches)")
    p.add_argument("--max-new-tokens", type=int, default=80)
    p.add_argument("--ood", metavar="FILE",
                   help="out-of-domain questions (one per line): report how many get the model's abstain answer, "
                        "next to the in-domain questions that get it wrongly")
    p.add_argument("--no-draft", action="store_true",
                   help="generate every answer token by token (default: check the expected answer's tokens in "
                        "one forward pass and generate only from where the model departs from it; the same "
                        "greedy answers, INT8 bit for bit, in a fraction of the time)")


def _check_output_file(flag, path):
    """An output file of a long command, checked before the work: a result must not be lost at
    the end for a path that cannot be written."""
    from .ui import UserError

    if not path:
        return
    p = Path(path)
    if p.is_dir():
        raise UserError("%s %s is a directory; give a file name" % (flag, path))
    if not p.absolute().parent.is_dir():
        raise UserError("%s %s: folder %s does not exist" % (flag, path, p.absolute().parent))
    if (p.exists() and not os.access(p, os.W_OK)) or not os.access(p.absolute().parent, os.W_OK | os.X_OK):
        raise UserError("%s %s: cannot write there (permission denied)" % (flag, path))


def run_cli(args) -> None:
    """`tinygpt eval`: the arguments and files checked first, then evaluate(), then --json."""
    from .ui import UserError, existing_file

    if args.limit is not None and args.limit < 1:
        raise UserError("--limit must be >= 1")
    if args.threads is not None and args.threads < 1:
        raise UserError("--threads must be >= 1")
    questions = existing_file(args.questions, "questions file")
    int8 = existing_file(args.int8, "model file") if args.int8 and not args.no_int8 else args.int8
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        _check_output_file(flag, path)
    if args.plot:
        from .ui import MATPLOTLIB_INSTALL, have_matplotlib

        if not have_matplotlib():
            raise UserError("--plot needs matplotlib, which is not installed (%s); or leave out --plot"
                            % MATPLOTLIB_INSTALL)
    res = evaluate(args.model, questions, tokenizer=args.tokenizer,
                   int8_model=False if args.no_int8 else int8, plot=args.plot,
                   max_new_tokens=args.max_new_tokens, limit=args.limit, threads=args.threads,
                   draft=not args.no_draft,
                   ood_file=existing_file(args.ood, "out-of-domain questions file") if args.ood else None)
    if args.json:  # every question's answers, not only the first mismatches the table shows
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1, ensure_ascii=False)
        print("results: %s (%d questions, %d with a mismatch)" % (args.json, res["n"], len(res["mismatches"])))
