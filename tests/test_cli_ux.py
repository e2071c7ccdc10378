"""What a person reads and types (issue 13): paths from the environment, tables with units and
--json, progress bars only on a terminal, warnings as one plain line, eval's options."""
import os
import subprocess
import sys

from conftest import REPO


def test_relative_build_paths_resolve_against_the_users_directory(tmp_path):
    """`MICROPY_BIN=micropython/ports/unix/build-standard/micropython bash scripts/test`: scripts/test
    cds into the repository and the tests run tools in temporary directories; conftest makes the
    path absolute against the directory the user ran from."""
    probe = ("import sys, os; sys.path.insert(0, %r); import conftest; "
             "print(os.environ['MICROPY_BIN']); print(os.environ['TINYGPT_QEMU_FIRMWARE']); "
             "print(os.environ['OTHER'])" % str(REPO / "tests"))
    env = dict(os.environ, MICROPY_BIN="mp/ports/unix/build-standard/micropython",
               TINYGPT_QEMU_FIRMWARE="fw.elf", OTHER="rel/x", TINYGPT_USER_CWD="")
    r = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [str(tmp_path / "mp/ports/unix/build-standard/micropython"),
                                     str(tmp_path / "fw.elf"), "rel/x"]
    # scripts/test runs pytest from the repository and passes the user's directory on
    env["TINYGPT_USER_CWD"] = str(tmp_path / "user")
    env["MICROPY_BIN"] = "/abs/micropython"
    r = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True)
    assert r.stdout.splitlines()[:2] == ["/abs/micropython", str(tmp_path / "user" / "fw.elf")]
    text = (REPO / "scripts" / "test").read_text()
    assert text.index('export TINYGPT_USER_CWD="${TINYGPT_USER_CWD:-$PWD}"') < text.index('cd "$(dirname "$0")/.."')


# -- tables with units, --json for machines ---------------------------------------------------

def test_info_is_a_table_with_units_and_json(converted, capsys):
    from tinygpt import cli
    from tinygpt.engine import Model

    _hf, model = converted("v512_e128_hd32")
    assert cli.main(["info", str(model)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == str(model)
    rows = {ln.split("  ")[1].strip(): ln for ln in lines if ln.startswith("  ")}
    assert rows["vocabulary"].split()[-2:] == ["512", "tokens"]
    assert rows["layer norm epsilon"].split()[-1] == "1e-06"            # not 9.999999974752427e-07
    assert rows["KV cache"].endswith("KiB  (%d bytes)" % Model(model).info()["kv_bytes"])
    assert rows["file"].endswith("(%d bytes)" % model.stat().st_size)
    assert "{" not in out and "e-07" not in out
    # the numbers line up: the values end, and the units start, in one column
    assert len({rows[k].index(" bytes)") - len(rows[k].split("(")[1]) for k in ("file", "KV cache", "scratch")}) == 1
    assert len({rows[k].index("tokens") for k in ("vocabulary", "positions")}) == 1
    import json
    assert cli.main(["info", str(model), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == dict(Model(model).info(), abstain_answer=None)


CORPUS = "Q: What is PSRAM?\nA: Extra RAM.\n\nQ: Tell me about PSRAM\nA: Extra RAM.\n\n" \
         "Q: What is WiFi?\nA: Radio.\n\nQ: How do I list files?\nDo: mpremote ls\n\nSome prose.\n"


def test_corpus_stats_is_a_table_and_json(tmp_path, capsys):
    import json

    from tinygpt import cli

    c = tmp_path / "c.txt"
    c.write_text(CORPUS)
    assert cli.main(["corpus", "stats", str(c)]) == 0
    out = capsys.readouterr().out
    assert "{" not in out
    rows = [ln.split() for ln in out.splitlines()]
    assert ["entries", "5"] in rows and ["Q/A", "3", "Q:", "+", "A:", "pairs"] in rows
    assert ["questions", "per", "answer", "1.33", "mean", "(min", "1,", "max", "2)"] in rows   # 4 questions, 3 answers
    assert out.splitlines()[-1] == "tokens: not counted (give --tokenizer DIR to count them)"
    assert cli.main(["corpus", "stats", str(c), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["entries"] == 5 and st["questions_per_answer"] == {"min": 1, "mean": 4 / 3, "max": 2}


def test_corpus_check_says_when_the_length_check_was_skipped(tmp_path, capsys):
    from tinygpt import cli

    c = tmp_path / "c.txt"
    c.write_text(CORPUS)
    assert cli.main(["corpus", "check", str(c)]) == 0
    err = capsys.readouterr().err
    assert "length check skipped: give --tokenizer DIR" in err and err.endswith("c.txt: ok\n")
    assert cli.main(["corpus", "check", str(c), "--tokenizer", str(REPO / "models" / "default" / "tokenizer")]) == 0
    assert "skipped" not in capsys.readouterr().err


def test_corpus_check_warns_about_nearly_equal_questions_with_different_answers(tmp_path, capsys):
    """Questions that differ only in case, punctuation and a dropped function word but have
    different answers are reported as warnings (exit status 0, line numbers of both); different
    questions, and near-equal questions of one answer, are not."""
    from tinygpt import cli, corpus

    c = tmp_path / "c.txt"
    c.write_text("Q: What is my serial port?\nA: Usually /dev/ttyACM0.\n\n"
                 "Q: What is a serial port?\nA: A UART.\n\n"
                 "Q: ble on\nDo: ble.active(True)\n\n"
                 "Q: BLE?\nA: Bluetooth Low Energy.\n\n"
                 "Q: what is BLE\nA: Bluetooth Low Energy.\n\n"
                 "Q: what is wifi\nA: A radio network.\n\n"
                 "Q: what is psram\nA: Extra memory.\n")
    found = corpus.near_duplicates(c)
    assert [(p.line, p.message.split(" is nearly")[0]) for p in found] == [
        (4, "question 'What is a serial port?'"), (10, "question 'BLE?'")]
    assert "of line 1, which has a different answer" in found[0].message
    assert "of line 7, which has a different answer" in found[1].message
    assert cli.main(["corpus", "check", str(c)]) == 0
    out, err = capsys.readouterr()
    assert out.count(": warning: ") == 2 and f"{c}:4: warning:" in out
    assert err.endswith("c.txt: ok, 2 warning(s)\n")
    # the shipped corpus has none
    assert corpus.near_duplicates(REPO / "data" / "corpus.txt") == []


def test_output_piped_into_a_reader_that_leaves_stops_quietly(tmp_path):
    """`tinygpt corpus stats data/corpus.txt | head -1`: when the reader closes the pipe, the
    command stops without a traceback or an error line, with the shell's SIGPIPE status."""
    r, w = os.pipe()
    os.close(r)  # the reader is gone before the command writes its first line
    p = subprocess.run([sys.executable, "-m", "tinygpt.cli", "corpus", "stats", str(REPO / "data" / "corpus.txt")],
                       stdout=w, stderr=subprocess.PIPE, text=True, timeout=120, cwd=tmp_path)
    os.close(w)
    assert p.returncode == 141 and p.stderr == ""


# -- progress bars only on a terminal; warnings as one plain line ------------------------------

def test_progress_bar_only_on_a_terminal():
    import io

    from tinygpt.ui import progress_bar

    pipe = io.StringIO()
    bar = progress_bar(total=3, desc="eval", file=pipe)
    bar.update(3)
    bar.close()
    assert pipe.getvalue() == ""
    master, slave = os.openpty()
    import fcntl
    import struct
    import termios
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("4H", 24, 80, 0, 0))  # an 80-column terminal
    try:
        with open(slave, "w", closefd=False) as tty:
            bar = progress_bar(total=3, desc="eval", file=tty)
            bar.update(3)
            bar.close()
        assert b"eval" in os.read(master, 4096)
    finally:
        os.close(master)
        os.close(slave)


def test_warnings_are_one_plain_line():
    code = ("import warnings; from tinygpt import ui; ui.quiet_third_party(); "
            "warnings.warn('the corpus is small'); "
            "warnings.warn_explicit('`past_key_values` is deprecated', FutureWarning, 'generic.py', 1, "
            "module='transformers.utils.generic')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == "tinygpt: warning: the corpus is small\n"


def _cli(args, cwd):
    return subprocess.run([sys.executable, "-m", "tinygpt.cli"] + args, cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_convert_and_eval_piped_show_no_bars_or_library_warnings(converted, tmp_path):
    import json

    from tinygpt import corpus

    hf, _model = converted("v509_hd16_gelunew")
    r = _cli(["convert", str(hf), "-o", str(tmp_path / "m.bin"), "-q"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "" and r.stdout.startswith("float vs INT8 on ")
    q = tmp_path / "q.txt"
    q.write_text(CORPUS)
    r = _cli(["eval", str(hf), "--questions", str(q), "--limit", "2", "--max-new-tokens", "4"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "", r.stderr     # no FutureWarning, no "[transformers] ... deprecated", no bar
    assert r.stdout.splitlines()[1].startswith("2 questions (the first 2 of 4) from ")
    r = _cli(["eval", str(hf), "--questions", str(q), "--limit", "3", "--max-new-tokens", "4",
              "--json", "res.json"], tmp_path)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "res.json").read_text())
    assert [x["question"] for x in res["results"]] == [qa[0] for qa in corpus.load_questions(q)][:3]
    assert res["exact_match_int8_count"] == sum(x["ok_int8"] for x in res["results"])
    assert r.stdout.rstrip().endswith("results: res.json (3 questions, %d with a mismatch)" % len(res["mismatches"]))
    r = _cli(["eval", str(hf), "--questions", str(q), "--json", str(tmp_path)], tmp_path)
    assert r.returncode == 2 and "is a directory" in r.stderr
    r = _cli(["eval", str(hf), "--questions", str(q), "--json", "nowhere/res.json"], tmp_path)
    assert r.returncode == 2 and "nowhere does not exist" in r.stderr
    r = _cli(["eval", str(hf), "--questions", str(q), "--limit", "0"], tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == "tinygpt: error: --limit must be >= 1"
    r = _cli(["eval", str(hf), "--questions", str(q), "--threads", "0"], tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == "tinygpt: error: --threads must be >= 1"
    r = _cli(["eval", "--help"], tmp_path)
    text = " ".join(r.stdout.split())
    assert "Q/A pairs" in text and "INT8 only, which is about 10x faster" in text and "--limit N" in text
    assert "--threads THREADS CPU threads of the float model (default 1" in text


def test_eval_float_threads_are_restored(converted, tmp_path):
    import torch

    from tinygpt import evaluate

    hf, _model = converted("v509_hd16_gelunew")
    q = tmp_path / "q.txt"
    q.write_text(CORPUS)
    before = torch.get_num_threads()
    seen = []
    real = evaluate.generate
    evaluate.generate = lambda *a, **k: (seen.append(torch.get_num_threads()), real(*a, **k))[1]
    try:
        evaluate.evaluate(hf, q, int8_model=False, limit=1, max_new_tokens=2, log=None, progress=False, threads=1)
    finally:
        evaluate.generate = real
    assert seen == [1] and torch.get_num_threads() == before


def test_eval_shows_mismatches_in_full():
    from tinygpt import evaluate

    expected = "The ESP32-S3 has 8 MB of PSRAM on this board, next to 16 MB of flash, and 512 KB of SRAM."
    got = expected.replace("512 KB", "520 KB")
    res = {"n": 1, "n_in_file": 1, "questions_file": "q.txt", "hf_dir": None, "model_file": "m.bin",
           "exact_match_float": None, "exact_match_float_count": None, "exact_match_int8": 0.0,
           "exact_match_int8_count": 0, "int8_equals_float": None, "int8_equals_float_count": None,
           "mismatches": [{"question": "How much memory?", "expected": expected, "int8": got, "ok_int8": False}]}
    lines = []
    evaluate._print_table(res, lines.append)
    assert "     expected: " + expected in lines
    assert "     INT8    : %s  (differs from character %d)" % (got, expected.index("512") + 2) in lines
    assert evaluate._differs_at("abc", "abcd") == "  (stops at character 3 of 4)"
    assert evaluate._differs_at("abcde", "abcd") == "  (goes on after character 4)"


def test_loss_plot_has_plain_numbers_on_its_log_axis(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from tinygpt import train

    saved = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (saved.append(self), real(self, *a, **k)))
    for top, bottom in ((6.5, 2.0), (8.0, 0.05)):  # a short run, a long one (two decades)
        losses = [bottom + (top - bottom) * 0.997 ** i for i in range(2000)]
        train.plot_loss(losses, tmp_path / "loss.png")
        fig = saved[-1]
        fig.canvas.draw()
        ax = fig.axes[0]
        assert ax.get_yscale() == "log"
        lo, hi = ax.get_ylim()
        labels = [t.get_text() for t in ax.get_yticklabels(which="both")
                  if t.get_text() and lo <= t.get_position()[1] <= hi]
        assert labels and all(float(s) > 0 for s in labels), labels   # "6", "0.1": no 6x10^0, no 1e-01
        if top / bottom < 30:
            assert {"2", "3", "4", "5", "6"} <= set(labels)
        else:
            assert {"0.1", "1"} <= set(labels)


def test_setup_shows_pip_progress_readably_in_a_log(tmp_path):
    """scripts/setup's pip step, with a stand-in pip: its lines reach the log (no -q silence), a
    rerun's "Requirement already satisfied" lines become one count, the index warning is dropped,
    and a pip failure stops the script."""
    import re

    text = (REPO / "scripts" / "setup").read_text()
    fn = re.search(r"^pip_install\(\) \{\n.*?^\}\n", text, re.S | re.M).group(0)
    venv = tmp_path / ".venv" / "bin"
    venv.mkdir(parents=True)
    fake = venv / "python"
    fake.write_text("#!/bin/sh\necho 'Collecting torch==2.13.0'\necho '  Downloading torch.whl (200.1 MB)'\n"
                    "echo 'Requirement already satisfied: numpy'\necho 'Requirement already satisfied: tqdm'\n"
                    "echo \"WARNING: Location 'file:///opt/x/' is ignored\" >&2\necho 'ERROR: real problem' >&2\n"
                    "exit ${FAKE_PIP_STATUS:-0}\n")
    fake.chmod(0o755)
    script = "set -euo pipefail\n%s\npip_install torch\necho after\n" % fn
    r = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert r.returncode == 0
    assert r.stdout == ("Collecting torch==2.13.0\n  Downloading torch.whl (200.1 MB)\n"
                        "  (2 requirements already satisfied)\nafter\n")
    assert "WARNING: Location" not in r.stderr and "ERROR: real problem" in r.stderr
    r = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                       env=dict(os.environ, FAKE_PIP_STATUS="1"))
    assert r.returncode == 1 and "after" not in r.stdout
    assert " -q " not in text
