"""The host training pipeline: corpus checker and stats, tokenizer round trip, a tiny training
run (loss goes down, loadable HF dir, convertible, bit-exact resume) and its evaluation."""
import importlib.util
import json
import os
import random
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
try:
    import tinygpt  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO / "host_tools"))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tinygpt import corpus  # noqa: E402

HAVE_TOKENIZER_TRAIN = importlib.util.find_spec("tinygpt.tokenizer_train") is not None
HAVE_CONVERT = (importlib.util.find_spec("tinygpt.convert") is not None
                and importlib.util.find_spec("tinygpt.tokenizer_section") is not None)
SPECIALS = ["<|endoftext|>", "Q:", "A:", "Do:"]


def write(path, text, encoding="utf-8"):
    path = Path(path)
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return path


# ----------------------------------------------------------------------------- corpus

GOOD = """\
Q: What is PSRAM?
A: Extra RAM next to the chip.

Q: How do I list files?
Do: mpremote ls

Some background prose
Note: prose may contain a colon label like this.

Q: what  is psram?
A: Extra RAM next to the chip.
Q: Tell me about PSRAM
A: Extra RAM next to the chip.
"""


def test_parse_and_serialize_good_file(tmp_path):
    p = write(tmp_path / "good.txt", GOOD)
    assert corpus.check(p) == []
    entries = corpus.parse(p)
    assert [(e.kind, e.line) for e in entries] == [("qa", 1), ("do", 4), ("prose", 7), ("qa", 10), ("qa", 12)]
    assert entries[1].answer == "mpremote ls" and entries[1].target == "Do: mpremote ls"
    assert entries[2].text == "Some background prose\nNote: prose may contain a colon label like this."
    texts = corpus.training_texts(entries)
    assert texts[0] == "Q: What is PSRAM?\nA: Extra RAM next to the chip.<|endoftext|>"
    assert texts[1] == "Q: How do I list files?\nA: Do: mpremote ls<|endoftext|>"
    assert texts[2] == "Some background prose\nNote: prose may contain a colon label like this.<|endoftext|>"
    assert corpus.load_questions(p) == [
        ("What is PSRAM?", "Extra RAM next to the chip."), ("How do I list files?", "Do: mpremote ls"),
        ("what  is psram?", "Extra RAM next to the chip."), ("Tell me about PSRAM", "Extra RAM next to the chip.")]
    assert corpus.prompt("hi") == "Q: hi\nA:"


# (corpus text, line, a word of the message): each file has exactly one problem
BROKEN = {
    "unknown_prefix_B": ("Q: a\nA: b\n\nB: what\n", 4, "unknown prefix 'B:'"),
    "unknown_prefix_Question": ("Q: a\nA: b\n\nQuestion: what\nA: c\n", 4, "unknown prefix 'Question:'"),
    "unknown_prefix_in_qa": ("Q: a\nNote: b\nA: c\n", 2, "unknown prefix 'Note:'"),
    "q_without_answer": ("Q: a\nA: b\n\nQ: lonely\n\nQ: c\nA: d\n", 4, "without an answer"),
    "q_followed_by_q": ("Q: first\nQ: second\nA: b\n", 1, "without an answer"),
    "answer_without_q": ("Q: a\nA: b\n\n\nA: orphan\n", 5, "without a Q"),
    "do_without_q": ("Do: ls\n\nQ: a\nA: b\n", 1, "without a Q"),
    "empty_question": ("Q: a\nA: b\n\nQ:\nA: c\n", 4, "empty question"),
    "empty_answer": ("Q: a\nA: b\n\nQ: c\nA:   \n", 5, "empty answer"),
    "empty_command": ("Q: a\nDo:\n", 2, "empty command"),
    "two_answers": ("Q: a\nA: b\nA: c\n", 3, "second answer"),
    "two_answers_do": ("Q: a\nA: b\nDo: ls\n", 3, "second answer"),
    "prose_inside_qa": ("Q: a\nA: b\nmore text\n", 3, "without a prefix"),
    "undecodable": (b"Q: a\nA: b\n\nQ: c\nA: caf\xe9 ok\n", 5, "byte offset 22"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_check_reports_problem_with_line(tmp_path, name):
    text, line, word = BROKEN[name]
    p = write(tmp_path / f"{name}.txt", text)
    problems = corpus.check(p)
    assert [(q.line, word in q.message) for q in problems] == [(line, True)], problems


def test_a_question_repeated_with_another_answer_is_a_warning_and_training_keeps_the_first(tmp_path):
    """Issue 22 (4): a real corpus repeats a question with another answer now and then; check
    warns naming both lines (exit 0), and training keeps the first instead of refusing it all."""
    p = write(tmp_path / "dup.txt", "Q: What is X?\nA: one\n\nQ: y\nA: z\n\nQ:  what is   x ?\nA: two\n")
    assert corpus.check(p) == []
    kept, dropped = corpus.keep_first_answers(corpus.parse(p))
    assert [e.target for e in kept] == ["one", "z"]
    assert [w.line for w in dropped] == [7] and "also on line 1" in dropped[0].message
    assert "training keeps line 1's" in dropped[0].message


def test_check_same_answer_duplicates_are_fine_and_parse_refuses_bad_utf8(tmp_path):
    p = write(tmp_path / "dup.txt", "Q: What is X?\nA: one\n\nQ: what is x?\nA:  one\n")
    assert corpus.check(p) == []
    bad = write(tmp_path / "bad.txt", b"Q: a\nA: \xff\n")
    with pytest.raises(ValueError, match="line 2: undecodable UTF-8 at byte offset 8"):
        corpus.parse(bad)
    with pytest.raises(FileNotFoundError):
        corpus.check(tmp_path / "missing.txt")


def test_check_length_with_tokenizer(tmp_path):
    tok = make_tokenizer(tmp_path, GOOD + "\nQ: " + "word " * 40 + "\nA: short\n")
    p = write(tmp_path / "long.txt", "Q: a\nA: b\n\nQ: " + "word " * 40 + "\nA: short\n")
    problems = corpus.check(p, tokenizer=tok, n_ctx=30)
    assert [q.line for q in problems] == [4] and "longer than the context of 30" in problems[0].message
    assert corpus.check(p, tokenizer=tok, n_ctx=128) == []


def test_stats(tmp_path):
    p = write(tmp_path / "good.txt", GOOD)
    s = corpus.stats(p)
    assert (s["entries"], s["qa"], s["do"], s["prose"], s["distinct_answers"]) == (5, 3, 1, 1, 2)
    assert s["questions_per_answer"] == {"min": 1, "mean": 2.0, "max": 3}
    tok = make_tokenizer(tmp_path, GOOD)
    s = corpus.stats(p, tokenizer=tok)
    n = [len(tok.encode(t, add_special_tokens=False).ids) for t in corpus.training_texts(corpus.parse(p))]
    assert s["tokens_total"] == sum(n) and s["max_entry_tokens"] == max(n)


# ----------------------------------------------------------------------------- tokenizer

def make_tokenizer(tmp_path, text, vocab_size=512):
    """A byte-level BPE for text: tokenizer_train when it exists, else tokenizers directly."""
    d = Path(tmp_path) / f"tok{random.randrange(1 << 30)}"
    d.mkdir()
    src = write(d / "src.txt", text)
    from tokenizers import Tokenizer

    if HAVE_TOKENIZER_TRAIN:
        import warnings

        from tinygpt.tokenizer_train import train_tokenizer
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "corpus too small for vocab_size"
            train_tokenizer(src, d, vocab_size=vocab_size, min_frequency=1)
    else:
        from tokenizers import ByteLevelBPETokenizer
        bl = ByteLevelBPETokenizer(add_prefix_space=False)
        bl.train_from_iterator([text], vocab_size=vocab_size, min_frequency=1, special_tokens=SPECIALS,
                               show_progress=False)
        bl._tokenizer.save(str(d / "tokenizer.json"))
    return Tokenizer.from_file(str(d / "tokenizer.json"))


@pytest.mark.skipif(not HAVE_TOKENIZER_TRAIN, reason="host_tools/tinygpt/tokenizer_train.py not written yet")
def test_tokenizer_round_trip(tmp_path):
    real = REPO / "data" / "corpus.txt"
    text = real.read_text(encoding="utf-8") if real.is_file() else SYNTH
    tok = make_tokenizer(tmp_path, text, vocab_size=4096)
    lines = [line for line in text.splitlines() if line.strip()]
    for line in lines:
        ids = tok.encode(line, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == line
    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    assert None not in ids.values()
    for s, i in ids.items():
        assert tok.encode(s, add_special_tokens=False).ids == [i]
    enc = tok.encode("Q: hi there\nA: Do: ls<|endoftext|>", add_special_tokens=False).ids
    assert enc[0] == ids["Q:"] and enc[-1] == ids["<|endoftext|>"]
    assert ids["A:"] in enc and ids["Do:"] in enc
    # the prompt's tokens are a prefix of the training text's tokens
    for e in corpus.parse(write(tmp_path / "c.txt", text))[:200]:
        if e.kind == "prose":
            continue
        full = tok.encode(e.training_text(), add_special_tokens=False).ids
        pr = tok.encode(corpus.prompt(e.question), add_special_tokens=False).ids
        assert full[:len(pr)] == pr
        assert tok.decode(full[len(pr):-1], skip_special_tokens=False).strip() == e.target


# ----------------------------------------------------------------------------- training

def synthetic_corpus(seed=0):
    rng = random.Random(seed)
    things = ["board", "led", "pin", "flash", "psram", "wifi", "uart", "model"]
    facts = ["red and small", "blue", "green and fast", "yellow", "black", "white and round", "orange", "purple"]
    ents = []
    for th, c in zip(things, facts):
        for tpl in ("What is the {}?", "Tell me about the {}", "{}?"):
            ents.append(f"Q: {tpl.format(th)}\nA: The {th} is {c}.")
    ents += ["Q: list files\nDo: ls -l", "Q: show files\nDo: ls -l",
             "The board has a red led and a blue pin.\nIt runs MicroPython."]
    rng.shuffle(ents)
    return "\n\n".join(ents) + "\n"


SYNTH = synthetic_corpus()
TRAIN_KW = dict(preset="tiny", epochs=100, lr=3e-3, batch_size=16, threads=1, progress=False, log=None,
                loss="all", augment=0, abstain=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipeline")
    c = write(d / "corpus.txt", SYNTH)
    tok = make_tokenizer(d, SYNTH)
    tok_dir = d / "tok"
    tok_dir.mkdir()
    tok.save(str(tok_dir / "tokenizer.json"))
    return d, c, tok_dir


@pytest.fixture(scope="module")
def run(data):
    from tinygpt.train import train

    d, c, tok_dir = data
    res = train(c, tok_dir, d / "run", max_steps=30, checkpoint_every=10, **TRAIN_KW)
    return d / "run", res


def test_pack_keeps_entries_whole_and_isolated():
    import numpy as np
    import torch
    from transformers import GPT2LMHeadModel

    from tinygpt.presets import make_config
    from tinygpt.train import attention_mask, count_blocks, pack

    rng = np.random.default_rng(0)
    toks = [list(rng.integers(1, 500, size=k)) + [0] for k in (10, 20, 5, 30, 17, 63)]
    d = pack(toks, range(len(toks)), 64, 0)
    assert len(d["input_ids"]) == count_blocks(toks, range(len(toks)), 64) == 3
    assert d["real"].sum() == sum(map(len, toks))
    assert (d["targets"][~d["real"]] == -100).all() and (d["input_ids"][~d["real"]] == 0).all()
    assert list(d["position_ids"][0][:13]) == list(range(11)) + [0, 1]
    with pytest.raises(ValueError, match="longer than the block"):
        pack([[1] * 65], [0], 64, 0)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(make_config("tiny", bos_token_id=0, eos_token_id=0)).eval()
    with torch.no_grad():
        packed = model(input_ids=torch.from_numpy(d["input_ids"]), position_ids=torch.from_numpy(d["position_ids"]),
                       attention_mask=attention_mask(d["segments"])).logits
        for b in range(len(d["input_ids"])):
            for s in np.unique(d["segments"][b][d["real"][b]]):
                idx = np.nonzero((d["segments"][b] == s) & d["real"][b])[0]
                alone = model(input_ids=torch.from_numpy(d["input_ids"][b][idx][None])).logits[0]
                assert torch.allclose(alone, packed[b, idx], atol=1e-5)


def test_training_lowers_loss_and_writes_run(run):
    out, res = run
    losses = res["losses"]
    assert len(losses) == res["steps"] == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    for f in ("config.json", "model.safetensors", "tokenizer.json", "loss.png", "train_log.json",
              "checkpoint/checkpoint.pt"):
        assert (out / f).is_file(), f
    log = json.loads((out / "train_log.json").read_text())
    for key in ("args", "steps", "final_loss", "wall_time_s", "tokens_per_s", "torch_version"):
        assert log[key] is not None, key
    assert log["args"]["preset"] == "tiny" and log["steps"] == 30
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    import torch
    from transformers import GPT2LMHeadModel
    m = GPT2LMHeadModel.from_pretrained(str(out))
    assert m.config.n_layer == 2 and m.config.eos_token_id == m.config.bos_token_id
    with torch.no_grad():
        assert m(torch.tensor([[1, 2, 3]])).logits.shape[-1] == m.config.vocab_size


@pytest.mark.skipif(not HAVE_CONVERT, reason="host_tools/tinygpt/convert.py (or tokenizer_section.py) not written yet")
def test_run_converts(run, tmp_path):
    from tinygpt.convert import convert
    from tinygpt.engine import Model

    out, _ = run
    report = convert(out, tmp_path / "model.bin", progress=False)
    assert report["hparams"]["n_layer"] == 2
    with Model(tmp_path / "model.bin") as m:
        info = m.info()
        assert info["q_id"] is not None and info["a_id"] is not None and info["do_id"] is not None


def test_resume_is_bit_exact(data):
    import torch
    from safetensors.torch import load_file

    from tinygpt.train import train

    d, c, tok_dir = data
    kw = dict(TRAIN_KW, epochs=3, batch_size=2, dropout=0.1)
    full = train(c, tok_dir, d / "full", checkpoint_every=0, **kw)
    spe = full["steps_per_epoch"]
    assert spe >= 3 and full["steps"] == full["total_steps"] >= 3 * spe - 1
    stop = spe + 1  # inside the second epoch, after a periodic checkpoint
    part = train(c, tok_dir, d / "part", checkpoint_every=2, stop_after=stop, **kw)
    assert part["stopped"] and part["steps"] == stop and not (d / "part" / "model.safetensors").exists()
    rest = train(c, tok_dir, d / "part", checkpoint_every=2, resume=True, **kw)
    assert rest["resumed_from_step"] == stop and rest["steps"] == full["steps"]
    assert rest["losses"] == full["losses"]
    a, b = load_file(str(d / "full" / "model.safetensors")), load_file(str(d / "part" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # a different run is refused, with or without resume
    with pytest.raises(ValueError, match="already holds a training run"):
        train(c, tok_dir, d / "full", **kw)
    with pytest.raises(ValueError, match="different run.*lr"):
        train(c, tok_dir, d / "full", resume=True, **dict(kw, lr=1e-3))


def test_train_validates_inputs(data, tmp_path):
    from tinygpt.train import train

    d, c, tok_dir = data
    kw = dict(TRAIN_KW, max_steps=1)
    with pytest.raises(ValueError, match="corpus not found"):
        train(tmp_path / "nope.txt", tok_dir, tmp_path / "r1", **kw)
    with pytest.raises(ValueError, match="tokenizer not found"):
        train(c, tmp_path / "notok", tmp_path / "r2", **kw)
    with pytest.raises(ValueError, match="unknown preset"):
        train(c, tok_dir, tmp_path / "r3", **dict(kw, preset="huge"))
    big = make_tokenizer(tmp_path, SYNTH + "".join(f" w{i}x{i * 7}" for i in range(3000)), vocab_size=700)
    assert big.get_vocab_size() > 512
    big_dir = tmp_path / "bigtok"
    big_dir.mkdir()
    big.save(str(big_dir / "tokenizer.json"))
    with pytest.raises(ValueError, match="sized for 512"):
        train(c, big_dir, tmp_path / "r4", **kw)
    long = write(tmp_path / "long.txt", SYNTH + "\nQ: " + "psram " * 80 + "\nA: x\n")
    with pytest.raises(ValueError, match=r"long\.txt:\d+: qa entry is \d+ tokens, longer than the context of 64"):
        train(long, tok_dir, tmp_path / "r5", **kw)
    broken = write(tmp_path / "broken.txt", SYNTH + "\nB: oops\n")
    with pytest.raises(ValueError, match="unknown prefix"):
        train(broken, tok_dir, tmp_path / "r6", **kw)
    with pytest.raises(ValueError, match="lr must be"):
        train(c, tok_dir, tmp_path / "r7", **dict(kw, lr=-1))
    assert not any((tmp_path / f"r{i}").exists() for i in range(1, 8))


# ----------------------------------------------------------------------------- evaluation

@pytest.mark.skipif(not HAVE_CONVERT, reason="host_tools/tinygpt/convert.py (or tokenizer_section.py) not written yet")
def test_evaluate_run(run, data, tmp_path):
    from tinygpt.convert import convert
    from tinygpt.evaluate import evaluate

    out, _ = run
    _, c, _ = data
    lines = []
    res = evaluate(out, c, plot=tmp_path / "eval.png", max_new_tokens=20, log=lines.append, progress=False)
    n = len(corpus.load_questions(c))
    assert res["n"] == n == len(res["results"])
    for key in ("exact_match_float", "exact_match_int8", "int8_equals_float"):
        assert 0.0 <= res[key] <= 1.0, key
    assert (tmp_path / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = "\n".join(lines)
    assert "exact match, float" in table and "exact match, INT8" in table and "INT8 answer == float answer" in table
    for r in res["results"]:
        assert r["ok_float"] == (r["float"] == r["expected"])
    # a model file alone: INT8 only
    convert(out, tmp_path / "m.bin", progress=False)
    res2 = evaluate(tmp_path / "m.bin", c, tokenizer=out, max_new_tokens=20, log=None, progress=False)
    assert res2["exact_match_float"] is None and res2["int8_equals_float"] is None
    assert [r["int8"] for r in res2["results"]] == [r["int8"] for r in res["results"]]
    # checking the expected answer in one pass (the default) finds the answers of token-by-token stepping
    res3 = evaluate(out, c, max_new_tokens=20, log=None, progress=False, draft=False)
    assert [r["int8"] for r in res3["results"]] == [r["int8"] for r in res["results"]]
    assert [r["float"] for r in res3["results"]] == [r["float"] for r in res["results"]]


def test_evaluate_generation_stops(tmp_path):
    from tinygpt.evaluate import generate

    class Tok:
        eos_id, q_id = 0, 1

        @staticmethod
        def decode(ids):
            return "".join({2: " Do:", 3: " ls", 4: "\n", 5: "x"}[i] for i in ids)

    class Runner:
        def __init__(self, seq, n_ctx=64):
            self.seq, self.n_ctx, self.pos = list(seq), n_ctx, 0

        def prefill(self, ids):
            self.pos, self.i = len(ids), 0

        def step(self, t):
            self.pos += 1
            self.i += 1

        def argmax(self):
            return self.seq[self.i]

    assert generate(Runner([2, 3, 0, 5]), Tok, [9, 9]) == "Do: ls"
    assert generate(Runner([2, 3, 1, 5]), Tok, [9, 9]) == "Do: ls"
    assert generate(Runner([2, 3, 4, 4, 5]), Tok, [9, 9]) == "Do: ls"
    assert generate(Runner([5] * 100), Tok, [9], max_new_tokens=7) == "x" * 7
    assert generate(Runner([5] * 100, n_ctx=4), Tok, [9, 9]) == "xxx"  # positions 2, 3 fed, 3rd token not
    assert generate(Runner([5] * 100, n_ctx=4), Tok, [9] * 5) == ""


def test_evaluate_generation_with_draft():
    """A draft (eval's expected answer) checked in one pass gives the answer of plain stepping:
    a right draft, one wrong from any token on, one too long, and one past the context."""
    from tinygpt.evaluate import generate

    class Tok:
        eos_id, q_id = 0, 1

        @staticmethod
        def decode(ids):
            return "".join({2: " Do:", 3: " ls", 4: "\n", 5: "x", 6: "y"}[i] for i in ids)

    class Runner:  # the next token is seq[number of tokens after the prompt]
        def __init__(self, seq, n_plen, n_ctx=64):
            self.seq, self.n_plen, self.n_ctx, self.pos, self.calls = list(seq), n_plen, n_ctx, 0, []

        def prefill(self, ids):
            assert len(ids) <= self.n_ctx
            self.pos = len(ids)
            self.calls.append("prefill")

        def step(self, t):
            assert self.pos < self.n_ctx
            self.pos += 1
            self.calls.append("step")

        def next(self, i):  # after the sequence: x forever
            return self.seq[i] if i < len(self.seq) else 5

        def argmax(self):
            return self.next(self.pos - self.n_plen)

        def predict(self, prompt, draft):
            assert len(prompt) + len(draft) <= self.n_ctx
            self.calls.append("predict")
            return [self.next(i) for i in range(len(draft) + 1)]

    prompt = [9, 9]
    for seq in ([2, 3, 0], [5, 6, 5, 6, 0], [5, 5, 4, 4, 6], [6] * 80, [1, 5]):
        for n_ctx in (64, 6):
            want = generate(Runner(seq, 2, n_ctx), Tok, prompt, max_new_tokens=30)
            drafts = [seq[:k] for k in range(len(seq) + 1)]
            drafts += [seq[:k] + [t] + seq[k + 1:] for k in range(len(seq)) for t in (5, 6) if t != seq[k]]
            drafts += [seq + [5, 6, 5]]
            for d in drafts:
                r = Runner(seq, 2, n_ctx)
                assert generate(r, Tok, prompt, max_new_tokens=30, draft=d) == want, (seq, n_ctx, d)
    r = Runner([2, 3, 0], 2)
    generate(r, Tok, prompt, draft=[2, 3])
    assert r.calls == ["predict"]  # a right draft: one pass and nothing else
