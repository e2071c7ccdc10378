"""Regression tests for the defects of issue 27 (D1-D10 and the minor ones) and issue 26's
"never a traceback after the work": each failed on the main it was found on. Training runs use
the `tiny` preset on test_train.py's synthetic corpus (seconds); the serial tests talk to a
scripted board that speaks MicroPython's raw REPL."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
try:
    import tinygpt  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO / "host_tools"))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from test_train import KW, data  # noqa: E402,F401 - data: test_train's tiny corpus and tokenizer
from tinygpt import augment, cli, convert, corpus, deploy, serial_chat  # noqa: E402
from tinygpt import train as train_mod  # noqa: E402


@pytest.fixture(scope="module")
def run(data):
    """A finished tiny run (20 steps)."""
    d, c, tok = data
    out = d / "run"
    train_mod.train(c, tok, out, epochs=1, max_steps=20, **dict(KW, log=None))
    return out


def tinygpt_cli(*args, cwd=None, env_extra=None, timeout=300):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO / "host_tools")] + ([env_extra.pop("PYTHONPATH")] if env_extra and "PYTHONPATH" in env_extra
                                      else [])))
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "tinygpt.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


# ----------------------------------------------------------------------------- D1 threads

def test_d1_threads_has_an_upper_bound_before_anything_is_written(data, tmp_path):
    d, c, tok = data
    p = tinygpt_cli("train", c, "--tokenizer", tok, "-o", tmp_path / "r", "--preset", "tiny", "--threads", 100000)
    assert p.returncode == 2, p.stderr
    assert "--threads 100000 is more than this machine can use: at most" in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "r").exists()
    with pytest.raises(ValueError, match="--threads 100000 is more than"):
        from tinygpt import evaluate
        evaluate.evaluate(tmp_path / "nope", c, threads=100000)


# ----------------------------------------------------------------------------- D2 checkpoint

@pytest.mark.parametrize("damage", ["random", "empty", "truncated"])
def test_d2_damaged_checkpoint_is_named(data, tmp_path, damage):
    d, c, tok = data
    out = tmp_path / "r"
    train_mod.train(c, tok, out, epochs=1, max_steps=20, stop_after=5, **dict(KW, log=None))
    ck = out / "checkpoint" / "checkpoint.pt"
    good = ck.read_bytes()
    ck.write_bytes({"random": os.urandom(4096), "empty": b"", "truncated": good[:len(good) // 2]}[damage])
    p = tinygpt_cli("train", c, "--tokenizer", tok, "-o", out, "--preset", "tiny", "--lr", KW["lr"],
                    "--batch-size", KW["batch_size"], "--epochs", 1, "--max-steps", 20, "--resume")
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    assert f"the checkpoint {ck} is damaged" in p.stderr and "another directory (-o NEW_DIR)" in p.stderr, p.stderr


# ----------------------------------------------------------------------------- D3 / issue 26: no matplotlib

@pytest.fixture
def no_matplotlib(tmp_path):
    site = tmp_path / "hide"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['matplotlib'] = None\n")
    return {"PYTHONPATH": str(site)}


def test_d3_train_without_matplotlib_finishes_with_a_complete_run(data, tmp_path, no_matplotlib):
    d, c, tok = data
    out = tmp_path / "r"
    p = tinygpt_cli("train", c, "--tokenizer", tok, "-o", out, "--preset", "tiny", "--lr", KW["lr"],
                    "--batch-size", 4, "--epochs", 1, "--val-split", 0.25, env_extra=no_matplotlib)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr + p.stdout
    assert "matplotlib is not installed" in p.stdout.splitlines()[0], p.stdout  # said at the start
    assert "loss.png and val.png not drawn: matplotlib is not installed" in p.stdout
    for f in ("config.json", "model.safetensors", "train_log.json", "checkpoint/checkpoint.pt"):
        assert (out / f).is_file(), f
    assert not (out / "loss.png").exists()
    first = json.loads((out / "train_log.json").read_text())["steps"]
    # the finished run continues like any other (before: "already holds a training run", and
    # --resume died in the plot again)
    p = tinygpt_cli("train", c, "--tokenizer", tok, "-o", out, "--preset", "tiny", "--lr", KW["lr"],
                    "--batch-size", 4, "--epochs", 2, "--val-split", 0.25, "--resume", env_extra=no_matplotlib)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    assert json.loads((out / "train_log.json").read_text())["steps"] == 2 * first


def test_a_plot_that_fails_is_a_warning_after_a_complete_run(data, tmp_path, monkeypatch):
    d, c, tok = data

    def broken(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(train_mod, "plot_loss", broken)
    lines = []
    res = train_mod.train(c, tok, tmp_path / "r", epochs=1, max_steps=4, **dict(KW, log=lines.append))
    assert res["stopped"] is False and (tmp_path / "r" / "train_log.json").is_file()
    assert "warning: loss.png not drawn (OSError: disk full)" in lines


def test_eval_plot_without_matplotlib_refuses_at_once(run, data, tmp_path, no_matplotlib):
    d, c, tok = data
    t0 = time.monotonic()
    p = tinygpt_cli("eval", run, "--questions", c, "--plot", tmp_path / "e.png", env_extra=no_matplotlib)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip() == ("tinygpt: error: --plot needs matplotlib, which is not installed (pip install "
                                "matplotlib, or install tinygpt with its [train] extra); or leave out --plot")
    assert "eval" not in p.stdout  # no evaluation ran
    assert time.monotonic() - t0 < 60


def test_eval_plot_to_a_missing_folder_refuses_before_the_evaluation(run, data, tmp_path):
    d, c, tok = data
    p = tinygpt_cli("eval", run, "--questions", c, "--plot", tmp_path / "no" / "e.png")
    assert p.returncode == 2 and "--plot %s: folder" % (tmp_path / "no" / "e.png") in p.stderr
    assert "exact" not in p.stdout


# ----------------------------------------------------------------------------- D7 corpus path

def test_d7_convert_from_another_folder_finds_the_corpus_and_checks_its_hash(data, tmp_path, run):
    d, c, tok = data
    log = json.loads((run / "train_log.json").read_text())
    assert Path(log["args"]["corpus"]).is_absolute() and Path(log["args"]["corpus"]) == c.resolve()
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / c.name).write_text("Q: unrelated\nA: other corpus\n")  # same name, different file
    p = tinygpt_cli("convert", run, "-o", tmp_path / "m.bin", "--no-check", cwd=other)
    assert p.returncode == 0, p.stderr
    assert "drafts: %d answers" % len({e.target for e in corpus.parse(c) if e.kind != "prose"}) in p.stdout
    assert str(c.resolve()) in p.stdout
    # a log whose corpus changed since training: no drafts, and the reason
    log["args"]["corpus"] = str(other / c.name)
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in run.iterdir():
        if f.is_file():
            (moved / f.name).write_bytes(f.read_bytes())
    (moved / "train_log.json").write_text(json.dumps(log))
    path, why = convert.run_corpus(moved)
    assert path is None and "is not the file the run was trained on (its SHA-256 differs" in why
    p = tinygpt_cli("convert", moved, "-o", tmp_path / "m2.bin", "--no-check")
    assert p.returncode == 0 and "drafts: none: " in p.stdout and "give --drafts CORPUS" in p.stdout, p.stdout


# ----------------------------------------------------------------------------- D8 control characters

@pytest.mark.parametrize("ch", ["\x00", "\t", "\x1b", "\x7f", "\x85"])
def test_d8_control_characters_are_refused_with_a_line_number(tmp_path, ch):
    f = tmp_path / "c.txt"
    f.write_text(f"Q: fine\nA: fine.\n\nQ: what{ch}is it\nA: It is.\n\nQ: and\nA: an{ch}swer\n", encoding="utf-8")
    problems = corpus.check(f)
    assert [p.line for p in problems] == [4, 8], problems
    assert all(f"control character U+{ord(ch):04X}" in p.message for p in problems)
    p = tinygpt_cli("corpus", "check", f)
    assert p.returncode == 1 and f"{f}:4: control character U+{ord(ch):04X} at column 8" in p.stdout
    with pytest.raises(ValueError, match=f"{f.name}:4: control character"):  # eval's questions too
        corpus.load_questions(f)


def test_d8_crlf_and_tabs_in_prose_are_fine(tmp_path):
    f = tmp_path / "c.txt"
    f.write_bytes(b"Q: what is it\r\nA: It is.\r\n\r\nSome prose\twith a tab.\r\n")
    assert corpus.check(f) == []


# ----------------------------------------------------------------------------- D9 augment bound

def test_d9_augment_is_bounded_and_says_how_many_variants_there_were(tmp_path, data):
    d, c, tok = data
    out = tmp_path / "a.txt"
    p = tinygpt_cli("corpus", "augment", c, "-o", out, "--per-question", 1000000)
    assert p.returncode == 2 and "--per-question must be from 1 to %d" % augment.MAX_PER_QUESTION in p.stderr
    p = tinygpt_cli("train", c, "--tokenizer", tok, "-o", tmp_path / "r", "--preset", "tiny", "--augment", 1000000)
    assert p.returncode == 2 and "--augment must be at most %d" % augment.MAX_PER_QUESTION in p.stderr
    assert not (tmp_path / "r").exists()
    short = tmp_path / "short.txt"
    short.write_text("Q: ?\nA: Yes.\n\nQ: What is the board?\nA: A board.\n")
    t0 = time.monotonic()
    p = tinygpt_cli("corpus", "augment", short, "-o", out, "--per-question", augment.MAX_PER_QUESTION)
    assert p.returncode == 0, p.stderr
    assert "1 short question(s) got fewer variants than asked (the fewest: " in p.stdout, p.stdout
    assert time.monotonic() - t0 < 120


# ----------------------------------------------------------------------------- D10 n_ctx

@pytest.mark.parametrize("n", ["-1", "0", "1"])
def test_d10_corpus_check_n_ctx_must_be_a_context(data, n):
    d, c, tok = data
    p = tinygpt_cli("corpus", "check", c, "--tokenizer", tok, "--n-ctx", n)
    assert p.returncode == 2 and f"--n-ctx must be an integer >= 2 (the model's context in tokens), got {n}" \
        in p.stderr, p.stderr


# ----------------------------------------------------------------------------- eval: minor ones

def test_eval_warns_about_a_question_asked_twice_with_two_answers(run, tmp_path):
    q = tmp_path / "q.txt"
    q.write_text("Q: What is the board?\nA: The board is red and small.\n\nQ: what is the  BOARD?\nA: Blue.\n")
    p = tinygpt_cli("eval", run, "--questions", q, "--no-int8")
    assert p.returncode == 0, p.stderr
    assert f"warning: {q}:4: question 'what is the  BOARD?' is also on line 1 with a different answer" in p.stdout


def test_eval_cuts_a_long_question_as_the_board_does(run, tmp_path):
    """eval answered "" for a question longer than the context, while chat.py on the board cuts
    it: the prompt ids now equal chat.prompt_ids' for the same question."""
    sys.path.insert(0, str(REPO / "py"))
    import bpe
    import chat

    from tinygpt import evaluate
    from tinygpt.engine import Model

    m_path = tmp_path / "m.bin"
    convert.convert(run, m_path, progress=False)
    long_q = "What is the board " + "and the pin " * 200 + "?"
    with Model(m_path) as m:
        tok = bpe.Tokenizer(m.tokenizer_blob())
        n_ctx = m.info()["n_ctx"]
    saved = chat._tok
    chat._tok = tok
    try:
        want, cut, _more = chat.prompt_ids(long_q, n_ctx)
    finally:
        chat._tok = saved
    assert cut > 0
    assert evaluate.board_prompt_ids(tok, long_q, n_ctx) == want
    short = "What is the board?"
    assert evaluate.board_prompt_ids(tok, short, n_ctx) == tok.encode(corpus.prompt(short))
    q = tmp_path / "q.txt"
    q.write_text(f"Q: {long_q}\nA: The board is red and small.\n")
    res = evaluate.evaluate(m_path, q, tokenizer=run, log=lambda *a: None, progress=False)
    assert res["results"][0]["prompt_tokens"] == len(want)  # before: the whole question, answered ""


# ----------------------------------------------------------------------------- D4 deploy: a board that lies

def test_d4_a_file_query_answer_of_the_wrong_shape_is_a_clear_error():
    names = ["model.bin"]
    good = {"cwd": "/", "bsize": 4096, "frsize": 4096, "blocks": 100, "bfree": 50, "bavail": 50,
            "files": {"model.bin": [10, "ab" * 32]}}
    assert deploy.check_query_answer(json.dumps(good), names, "P") == good
    for text, why in ((json.dumps({"files": []}), "no filesystem number 'bsize'"),
                      ("{not json", "malformed JSON"),
                      ("[1, 2]", "a JSON list instead of an object"),
                      (json.dumps(dict(good, files=[])), "no 'files' object"),
                      (json.dumps(dict(good, bavail=-1)), "a bad 'bavail'"),
                      (json.dumps(dict(good, bsize=0, frsize=0)), "a block size of 0"),
                      (json.dumps(dict(good, files={"model.bin": "yes"})), "a bad entry for model.bin"),
                      (json.dumps(dict(good, files={"model.bin": [10, "zz"]})), "a bad entry for model.bin")):
        with pytest.raises(deploy.DeployError, match="the board on P answered the file query with " + why):
            deploy.check_query_answer(text, names, "P")


def test_d4_deploy_to_a_board_that_answers_the_wrong_shape(tmp_path, monkeypatch, capsys):
    model = REPO / "models" / "default" / "model.bin"
    port = tmp_path / "ttyACM0"
    port.write_bytes(b"")

    def lying_run(self, *args, timeout=None, show=False):
        return subprocess.CompletedProcess(args, 0, 'TGQ{"files": []}\n', "")
    monkeypatch.setattr(deploy.Board, "run", lying_run)
    with pytest.raises(SystemExit) as e:
        cli.main(["deploy", "--port", str(port), "--model", str(model), "--no-scripts"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "answered the file query with no filesystem number 'bsize'" in err and "Traceback" not in err


def test_deploy_failure_does_not_claim_a_previous_file_the_board_never_had():
    text = deploy._interrupted("copy", ["model.bin", "chat.py"], False, had={"chat.py"})
    assert "it keeps its previous chat.py" in text and "model.bin was not on the board before" in text
    assert "previous model.bin" not in text


# ----------------------------------------------------------------------------- D5, D6: boards that stream or lie

class ScriptedBoard:
    """A serial port whose board answers the raw REPL, then runs `behaviour(code)` for each
    program: it returns the bytes the board prints (a generator for an endless stream)."""

    def __init__(self, behaviour):
        self.behaviour, self.out, self.code, self.stream = behaviour, b"", b"", None
        self.in_waiting = 0
        self.interrupted = 0

    def write(self, data):
        for b in data:
            ch = bytes([b])
            if ch == b"\x01":
                self.out += serial_chat.RAW_PROMPT
                self.code = b""
            elif ch == b"\x03":
                self.interrupted += 1
                self.stream = None
            elif ch == b"\x04":
                self.out += b"OK"
                got = self.behaviour(self.code.decode())
                self.code = b""
                if isinstance(got, bytes):
                    self.out += got
                else:
                    self.stream = got
            elif ch not in b"\r\x02":
                self.code += ch
        return len(data)

    def flush(self):
        pass

    def read(self, n=1):
        if not self.out and self.stream is not None:
            self.out = next(self.stream)
        data, self.out = self.out[:4096], self.out[4096:]
        return data

    def reset_input_buffer(self):
        self.out = b""

    def close(self):
        pass


@pytest.fixture
def scripted(tmp_path, monkeypatch):
    import serial

    port = tmp_path / "ttyACM0"
    port.write_bytes(b"")

    def make(behaviour):
        board = ScriptedBoard(behaviour)
        monkeypatch.setattr(serial, "serial_for_url", lambda *a, **k: board)
        return str(port), board
    return make


def _endless(code):
    def gen():
        while True:
            yield b"the same words again and again " * 8
    return gen()


def test_d5_a_board_that_streams_forever_is_stopped_by_the_answer_limit(scripted):
    port, board = scripted(_endless)
    t0 = time.monotonic()
    with pytest.raises(serial_chat.SerialChatError, match=r"the board's answer (took longer than 2 s "
                                                          r"\(--answer-limit\)|went past 64 KB of output); stopped it"):
        serial_chat.ask_board(port, "What is it?", timeout=5, answer_limit=2)
    assert time.monotonic() - t0 < 30 and board.interrupted >= 1


def test_d5_the_output_kept_is_capped(scripted):
    port, board = scripted(_endless)
    with pytest.raises(serial_chat.SerialChatError, match="went past 64 KB of output; stopped it"):
        serial_chat.ask_board(port, "What is it?", timeout=5, answer_limit=600)


def test_d5_cli_answer_limit(scripted, capsys):
    port, _board = scripted(_endless)
    with pytest.raises(SystemExit) as e:
        cli.main(["ask", "--port", port, "--answer-limit", "1", "What is it?"])
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert "tinygpt: error: the board's answer" in err and "stopped it" in err
    assert out.endswith("\n")  # the partial answer's line is ended before the error
    with pytest.raises(SystemExit):
        cli.main(["ask", "--port", port, "--answer-limit", "0", "What is it?"])
    assert "--answer-limit must be > 0 seconds" in capsys.readouterr().err


def _answers_with(rep):
    def behaviour(code):
        return ("A: partial " + serial_chat.MARK + rep + "\r\n").encode() + b"\x04\x04>"
    return behaviour


@pytest.mark.parametrize("rep", ["42", "None", "['a']", "b'x'"])
def test_d6_a_non_string_answer_is_an_error(scripted, rep, capsys):
    port, _board = scripted(_answers_with(rep))
    with pytest.raises(serial_chat.SerialChatError, match="the board's chat.ask returned .*, not the answer text"):
        serial_chat.ask_board(port, "What is it?", timeout=5)
    with pytest.raises(SystemExit) as e:
        cli.main(["ask", "--port", port, "What is it?"])
    assert e.value.code == 2 and "not the answer text" in capsys.readouterr().err
    port, _board = scripted(_answers_with("'It is.'"))
    assert serial_chat.ask_board(port, "What is it?", timeout=5) == "It is."


def test_a_board_silent_mid_answer_puts_its_error_on_a_line_of_its_own(scripted, capsys):
    def silent(code):
        def gen():
            yield b"A: The board is"
            while True:
                time.sleep(0.01)
                yield b""
        return gen()
    port, _board = scripted(silent)
    with pytest.raises(SystemExit):
        cli.main(["ask", "--port", port, "--timeout", "1", "What is it?"])
    out, err = capsys.readouterr()
    assert out == "A: The board is\n", out
    assert "the board stopped answering" in err


# ----------------------------------------------------------------------------- issue 22 (4): repeated questions

def test_train_keeps_the_first_answer_of_a_repeated_question(data, tmp_path):
    d, c, tok = data
    dup = tmp_path / "dup.txt"
    dup.write_text(c.read_text() + "\nQ: what is the BOARD?\nA: Something else.\n")
    line = len(c.read_text().splitlines()) + 2
    p = tinygpt_cli("corpus", "check", dup)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"{dup}:{line}: warning: question 'what is the BOARD?' is also on line 1 with a different answer" \
        in p.stdout
    lines = []
    res = train_mod.train(dup, tok, tmp_path / "r", epochs=1, max_steps=2, **dict(KW, log=lines.append))
    assert res["stopped"] is False
    assert any(ln.startswith(f"warning: {dup}:{line}: ") and "training keeps line 1's" in ln for ln in lines), lines
    assert res["entries"] == len(corpus.parse(c))  # the repeated question left out


def test_train_refuses_a_disk_too_small_before_the_first_step(data, tmp_path, monkeypatch):
    """Issue 26: a full disk is found before training, not at the first checkpoint."""
    import collections
    import shutil

    d, c, tok = data
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 ** 9, 10 ** 9 - 1000, 1000))
    lines = []
    with pytest.raises(ValueError, match=r"not enough disk space for the run in .*: it writes about \d+ MB "
                                         r"\(checkpoint, model\), and the disk has 0 MB free"):
        train_mod.train(c, tok, tmp_path / "r", epochs=1, max_steps=2, **dict(KW, log=lines.append))
    assert not (tmp_path / "r" / "checkpoint").exists()
    assert not any(ln.startswith("plan:") for ln in lines)
    monkeypatch.undo()
    res = train_mod.train(c, tok, tmp_path / "r", epochs=1, max_steps=2, **dict(KW, log=None))
    assert res["stopped"] is False
