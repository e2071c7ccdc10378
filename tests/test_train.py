"""Training a user can plan and steer: the time estimate, --max-minutes, Ctrl-C, continuing a
run, errors before torch, --help defaults, validation split and its exact-answer accuracy,
early stopping, answer-only loss, --device. The `tiny` preset on a synthetic corpus: seconds."""
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
try:
    import tinygpt  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO / "host_tools"))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from conftest import default_sigint  # noqa: E402
from tinygpt import corpus  # noqa: E402
from tinygpt import train as train_mod  # noqa: E402

THINGS = ["board", "led", "pin", "flash", "psram", "wifi", "uart", "model"]
FACTS = ["red and small", "blue", "green and fast", "yellow", "black", "white and round", "orange", "purple"]
FORMS = ("What is the {}?", "Tell me about the {}", "{}?", "what's the {} like", "describe the {}")


def make_corpus(forms=FORMS):
    ents = []
    for th, c in zip(THINGS, FACTS):
        for tpl in forms:
            ents.append(f"Q: {tpl.format(th)}\nA: The {th} is {c}.")
    ents += ["Q: list files\nDo: ls -l", "Q: show files\nDo: ls -l", "Q: hello\nA: Hi there.",
             "The board has a red led and a blue pin.\nIt runs MicroPython."]
    return "\n\n".join(ents) + "\n"


KW = dict(preset="tiny", lr=3e-3, batch_size=4, threads=1, progress=False, loss="all", augment=0, abstain=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from tinygpt.tokenizer_train import train_tokenizer

    d = tmp_path_factory.mktemp("train")
    c = d / "corpus.txt"
    c.write_text(make_corpus(), encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the corpus is too small for 512 tokens
        train_tokenizer(c, d / "tok", vocab_size=512, min_frequency=1)
    return d, c, d / "tok"


def logged(**kw):
    lines = []
    return lines, dict(kw, log=lambda *a: lines.append(" ".join(map(str, a))))


def cli(*args, timeout=120):
    code = ("import sys, atexit\n"
            "atexit.register(lambda: print('TORCH_IMPORTED', 'torch' in sys.modules))\n"
            "from tinygpt.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    env = dict(os.environ, PYTHONPATH=str(REPO / "host_tools"))
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env=env)
    return p, time.perf_counter() - t0


# ----------------------------------------------------------------------------- arguments

@pytest.mark.parametrize("case", ["preset", "tokenizer", "corpus", "resume", "epochs"])
def test_argument_errors_come_before_torch(data, tmp_path, case):
    d, c, tok = data
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    args = {"preset": [c, "--tokenizer", tok, "-o", tmp_path / "r", "--preset", "huge"],
            "tokenizer": [c, "--tokenizer", tmp_path / "nope", "-o", tmp_path / "r"],
            "corpus": [tmp_path / "nope.txt", "--tokenizer", tok, "-o", tmp_path / "r"],
            "resume": [c, "--tokenizer", tok, "-o", tmp_path / "run", "--preset", "tiny"],
            "epochs": [c, "--tokenizer", tok, "-o", tmp_path / "r", "--epochs", "0"]}[case]
    want = {"preset": "unknown preset 'huge'", "tokenizer": "`tinygpt tokenizer train",
            "corpus": "corpus not found", "resume": "add --resume to continue it",
            "epochs": "--epochs must be an integer >= 1, got 0"}[case]
    p, _ = cli("train", *args)
    assert p.returncode == 2, p.stderr
    assert want in p.stderr and p.stderr.count("\n") == 1, p.stderr
    assert "TORCH_IMPORTED False" in p.stdout
    assert not (tmp_path / "r").exists()


def test_train_help_shows_every_default():
    from tinygpt.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["train"]
    text = " ".join(sub.format_help().split())
    for want in ("default d256x8", "default 10", "default 0.002", "default 16", "default 0.1", "default 1:",
                 "default auto", "default answer", "default 1337", "default 100", "default 8", "--val-split", "--max-minutes"):
        assert want in text, want
    for action in sub._actions:  # every option with a value says its default
        if action.option_strings and action.nargs != 0 and not action.required:
            assert "default" in (action.help or ""), action.dest



def test_train_config_is_the_one_place_of_every_setting():
    """Every `tinygpt train` option is a TrainConfig field with the same default, every setting
    with a check refuses a bad value naming its option, and an unknown name is refused."""
    import argparse
    from dataclasses import fields

    parser = argparse.ArgumentParser()
    train_mod.add_arguments(parser)
    options = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "tokenizer", "output")}
    cfg_fields = {f.name: f for f in fields(train_mod.TrainConfig)}
    with_option = {n for n, f in cfg_fields.items() if f.metadata["help"] is not None}
    assert set(options) == with_option
    for name in with_option:
        assert options[name].default == cfg_fields[name].default, name
    bad = {"epochs": 0, "max_steps": 0, "max_minutes": -1, "lr": float("nan"), "batch_size": 1.5, "dropout": 1.0,
           "weight_decay": -0.1, "label_smoothing": 1.0, "loss": "question", "val_every": 0, "early_stop": 0,
           "augment": 10_000, "abstain": -1, "fix_misses": -1, "seed": -1, "checkpoint_every": -1, "device": "tpu",
           "threads": 0, "warmup_steps": -1, "min_lr_ratio": 2.0, "schedule": "step"}
    assert set(bad) == {n for n, f in cfg_fields.items() if f.metadata["check"] is not None}
    for name, value in bad.items():
        with pytest.raises(ValueError) as e:
            train_mod.TrainConfig(**{name: value}).check()
        assert train_mod.option_name(cfg_fields[name]) in str(e.value), (name, str(e.value))
    assert train_mod.TrainConfig().check() == train_mod.TrainConfig()
    with pytest.raises(TypeError):
        train_mod.train("c", "t", "o", no_such_setting=1)


def test_an_output_folder_that_cannot_be_written_is_refused_before_training(data, tmp_path, monkeypatch):
    d, c, tok = data
    real = os.access
    monkeypatch.setattr(train_mod.os, "access", lambda p, mode: False if Path(p) == tmp_path else real(p, mode))
    with pytest.raises(ValueError, match="cannot write in"):
        train_mod.train(c, tok, tmp_path / "new" / "run", epochs=1, **dict(KW, log=None))
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        train_mod.train(c, tok, tmp_path / "afile" / "run", epochs=1, **dict(KW, log=None))


# ----------------------------------------------------------------------------- time

def test_plan_and_estimate_printed_no_1_steps(data, tmp_path):
    d, c, tok = data
    lines, kw = logged(**KW)
    res = train_mod.train(c, tok, tmp_path / "r", epochs=2, max_steps=6, **kw)
    text = "\n".join(lines)
    assert res["steps"] == 6 and not res["stopped"]
    assert "plan: 6 steps (2 epochs of ~" in text
    speed = [ln for ln in lines if ln.startswith("speed:")]
    assert len(speed) == 1 and "s/step (measured over 3 steps)" in speed[0] and "2 steps left" in speed[0]
    assert "expected total" in speed[0]
    assert "1 threads" not in text and "1 thread on cpu" in text
    lines, kw = logged(**KW)
    train_mod.train(c, tok, tmp_path / "one", epochs=1, max_steps=1, **kw)
    text = "\n".join(lines)
    assert "1 steps" not in text and "plan: 1 step (1 epoch of" in text and "done: 1 step of 1" in text


def test_max_minutes_stops_with_a_usable_model_and_checkpoint(data, tmp_path):
    import torch
    from transformers import GPT2LMHeadModel

    d, c, tok = data
    lines, kw = logged(**KW)
    res = train_mod.train(c, tok, tmp_path / "r", epochs=500, max_minutes=0.0005, fix_misses=10, **kw)
    assert res["stopped"] == "time" and 1 <= res["steps"] < res["total_steps"]
    assert res["fixed_misses"] == [] and any(ln.startswith("--fix-misses: not run") for ln in lines)
    out = tmp_path / "r"
    for f in ("config.json", "model.safetensors", "tokenizer.json", "loss.png", "train_log.json",
              "checkpoint/checkpoint.pt"):
        assert (out / f).is_file(), f
    log = json.loads((out / "train_log.json").read_text())
    assert log["stopped"] == "time" and log["steps"] == res["steps"]
    m = GPT2LMHeadModel.from_pretrained(str(out))
    with torch.no_grad():
        assert torch.isfinite(m(torch.tensor([[1, 2, 3]])).logits).all()
    assert any("--max-minutes" in ln for ln in lines) and any("--resume" in ln for ln in lines)
    # and it continues where it stopped
    res2 = train_mod.train(c, tok, out, epochs=500, max_minutes=0.0005, resume=True, **dict(KW, log=None))
    assert res2["resumed_from_step"] == res["steps"] and res2["steps"] > res["steps"]


def test_ctrl_c_saves_a_checkpoint(data, tmp_path):
    d, c, tok = data
    out = tmp_path / "r"
    code = "import sys\nfrom tinygpt.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    env = dict(os.environ, PYTHONPATH=str(REPO / "host_tools"))
    p = subprocess.Popen([sys.executable, "-u", "-c", code, "train", str(c), "--tokenizer", str(tok), "-o", str(out),
                          "--preset", "tiny", "--epochs", "5000", "--batch-size", "4", "--checkpoint-every", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in p.stdout:  # wait until it is training (the estimate comes after 4 steps)
            if line.startswith("speed:"):
                break
        assert not (out / "checkpoint").exists()  # no periodic checkpoint: only Ctrl-C writes one
        p.send_signal(signal.SIGINT)
        rest, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert (out / "checkpoint" / "checkpoint.pt").is_file() and (out / "model.safetensors").is_file()
    log = json.loads((out / "train_log.json").read_text())
    assert log["stopped"] == "SIGINT" and 4 <= log["steps"] < log["total_steps"]
    assert "interrupted (Ctrl-C)" in rest and "--resume" in rest
    assert "Traceback" not in err


def test_progress_reaches_a_pipe_while_training(data, tmp_path):
    """`tinygpt train ... | tee log`: the plan and the speed line arrive while it trains, not in
    one block at the end (stdout to a pipe is block-buffered unless the CLI asks otherwise)."""
    import queue
    import threading

    d, c, tok = data
    out = tmp_path / "r"
    code = "import sys\nfrom tinygpt.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    env = dict(os.environ, PYTHONPATH=str(REPO / "host_tools"))
    env.pop("PYTHONUNBUFFERED", None)
    p = subprocess.Popen([sys.executable, "-c", code, "train", str(c), "--tokenizer", str(tok), "-o", str(out),
                          "--preset", "tiny", "--epochs", "5000", "--batch-size", "4", "--checkpoint-every", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                         preexec_fn=default_sigint)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in p.stdout], daemon=True).start()
    try:
        deadline, seen = time.monotonic() + 90, []
        while not any(ln.startswith("speed:") for ln in seen):
            seen.append(lines.get(timeout=max(0.1, deadline - time.monotonic())))
        assert p.poll() is None, "the speed line came only when training had ended"
        assert any(ln.startswith("plan:") for ln in seen)
        p.send_signal(signal.SIGINT)
        p.wait(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130


# ----------------------------------------------------------------------------- continuing

def test_resume_with_more_epochs_continues_a_finished_run(data, tmp_path):
    d, c, tok = data
    out = tmp_path / "r"
    first = train_mod.train(c, tok, out, epochs=2, **dict(KW, log=None))
    assert not first["stopped"]
    lines, kw = logged(**KW)
    more = train_mod.train(c, tok, out, epochs=4, resume=True, **kw)
    four = train_mod.train(c, tok, tmp_path / "four", epochs=4, **dict(KW, log=None))
    assert more["resumed_from_step"] == first["steps"] and more["steps"] == four["steps"] > first["steps"]
    assert more["losses"][:first["steps"]] == first["losses"]
    assert any(ln.startswith(f"continuing {out} from step {first['steps']}") for ln in lines)
    with pytest.raises(ValueError, match="beyond the .* steps of --epochs 1; give more"):
        train_mod.train(c, tok, out, epochs=1, resume=True, **dict(KW, log=None))
    with pytest.raises(ValueError, match="different run.*--lr"):
        train_mod.train(c, tok, out, epochs=6, resume=True, **dict(KW, log=None, lr=1e-3))


# ----------------------------------------------------------------------------- validation

def test_val_split_groups_by_answer():
    entries = corpus._parse_text(make_corpus())[0]
    tr, va = train_mod.split_validation(entries, 0.25, seed=5)
    assert len(tr) + len(va) == len(entries) and not set(map(id, tr)) & set(map(id, va))
    by_answer = {}
    for e in entries:
        if e.kind != "prose":
            by_answer.setdefault(e.target, []).append(e)
    for target, group in by_answer.items():
        held = [e for e in va if e.target == target]
        k = len(group)
        want = 0 if k < 2 else min(k - 1, max(1, int(k * 0.25 + 0.5)))
        assert len(held) == want, target  # every answer with 2+ phrasings gives some; 1 phrasing stays
    assert not any(e.kind == "prose" for e in va)
    assert [e.question for e in train_mod.split_validation(entries, 0.25, seed=5)[1]] == [e.question for e in va]
    assert [e.question for e in train_mod.split_validation(entries, 0.25, seed=6)[1]] != [e.question for e in va]
    with pytest.raises(ValueError, match="--val-split"):
        train_mod.split_validation(entries, 1.5, seed=0)


def test_val_exact_is_greedy_decoding(data, tmp_path):
    """The validation accuracy during training equals greedy decoding (tinygpt eval's loop) with
    the float model, question by question; best/ and val.png are written."""
    from tokenizers import Tokenizer

    from tinygpt.evaluate import _FloatRunner, _HFTokenizer, generate

    d, c, tok = data
    out = tmp_path / "r"
    res = train_mod.train(c, tok, out, epochs=40, val_split=0.25, val_every=20, **dict(KW, log=None))
    hist = res["validation"]
    assert hist and hist[-1]["step"] == res["steps"] and res["val_entries"] == hist[-1]["val_n"] == 8 + 1
    held = train_mod.split_validation(corpus.parse(c), 0.25, seed=1337)[1]
    runner = _FloatRunner(out)
    t = _HFTokenizer(Tokenizer.from_file(str(tok / "tokenizer.json")))
    exact = sum(generate(runner, t, t.encode(corpus.prompt(e.question))) == e.target for e in held)
    assert exact == hist[-1]["val_exact_count"]
    assert 0 < exact  # the facts are learnt; a held-out phrasing of them is answered
    best = max(hist, key=lambda h: (h["val_exact_count"], -h["val_loss"]))
    assert res["best"]["step"] == best["step"] and (out / "best" / "model.safetensors").is_file()
    assert (out / "best" / "tokenizer.json").is_file()
    assert (out / "val.png").read_bytes()[:4] == b"\x89PNG"
    log = json.loads((out / "train_log.json").read_text())
    assert log["validation"] == hist and log["args"]["val_split"] == 0.25


def test_early_stop(data, tmp_path):
    d, c, tok = data
    # a learning rate too small to change a float32 weight: no evaluation is ever better
    res = train_mod.train(c, tok, tmp_path / "r", epochs=50, val_split=0.25, val_every=1, early_stop=2,
                          **dict(KW, log=None, lr=1e-15, dropout=0.0))
    assert res["stopped"] == "early_stop" and res["steps"] == 3 and len(res["validation"]) == 3
    with pytest.raises(ValueError, match="needs a validation set"):
        train_mod.train(c, tok, tmp_path / "r2", epochs=1, early_stop=2, **dict(KW, log=None))


def test_answer_loss_masks_the_question(data, tmp_path):
    from tokenizers import Tokenizer

    d, c, tok = data
    t = Tokenizer.from_file(str(tok / "tokenizer.json"))
    entries = corpus.parse(c)
    lists = [enc.ids for enc in t.encode_batch(corpus.training_texts(entries), add_special_tokens=False)]
    starts = train_mod.answer_starts(t, entries)
    p = train_mod.pack(lists, range(len(lists)), 64, t.token_to_id(corpus.EOS), starts)
    for i, e in enumerate(entries):
        sel = (p["entry"] == i) & p["answer"]
        got = t.decode(list(p["targets"][sel]), skip_special_tokens=False)
        if e.kind == "prose":
            assert starts[i] is None and not sel.any()
        else:
            assert got == " " + e.target + corpus.EOS
    res = train_mod.train(c, tok, tmp_path / "r", epochs=3, label_smoothing=0.1, weight_decay=0.0,
                          **dict(KW, log=None, loss="answer"))
    assert res["entries"] == len(entries) - 1  # the prose paragraph has no answer to learn
    assert res["args"]["loss"] == "answer" and res["args"]["label_smoothing"] == 0.1
    with pytest.raises(ValueError, match="loss must be one of all, answer"):
        train_mod.train(c, tok, tmp_path / "r2", epochs=1, **dict(KW, log=None, loss="question"))


def test_augment_in_training_leaves_validation_out(data, tmp_path):
    d, c, tok = data
    res = train_mod.train(c, tok, tmp_path / "r", epochs=1, val_split=0.25, **dict(KW, log=None, augment=3))
    n_train = len(corpus.parse(c)) - res["val_entries"]
    assert res["entries"] == n_train + res["augmented"]["variants"]
    assert res["augmented"]["questions"] == n_train - 1  # every training question but the prose


def test_device(data, tmp_path):
    import torch

    d, c, tok = data
    auto = train_mod.resolve_device("auto")
    assert auto == ("cuda" if torch.cuda.is_available() else auto)
    assert train_mod.resolve_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: torch sees no CUDA GPU"):
            train_mod.resolve_device("cuda")
    res = train_mod.train(c, tok, tmp_path / "r", epochs=1, max_steps=2, device="cpu", **dict(KW, log=None))
    assert res["args"]["device"] == "cpu"
    with pytest.raises(ValueError, match="device must be one of"):
        train_mod.train(c, tok, tmp_path / "r2", epochs=1, device="tpu", **dict(KW, log=None))


def test_fix_misses_trains_until_every_training_question_is_answered(data, tmp_path):
    """--fix-misses on a finished run (--resume): the questions it counts as wrong are the ones
    greedy decoding gets wrong, and after it greedy decoding answers every training question
    exactly; the planned steps and the schedule's record are unchanged."""
    from tokenizers import Tokenizer

    from tinygpt.evaluate import _FloatRunner, _HFTokenizer, generate

    d, c, tok = data
    out = tmp_path / "r"
    t = _HFTokenizer(Tokenizer.from_file(str(tok / "tokenizer.json")))
    questions = [e for e in corpus.parse(c) if e.kind != "prose"]

    def greedy_wrong():
        runner = _FloatRunner(out)
        return [e.question for e in questions if generate(runner, t, t.encode(corpus.prompt(e.question))) != e.target]

    first = train_mod.train(c, tok, out, epochs=60, **dict(KW, log=None))
    wrong_before = greedy_wrong()
    assert wrong_before, "the schedule alone should leave some training question wrong for this test"
    lines, kw = logged(**KW)
    res = train_mod.train(c, tok, out, epochs=60, resume=True, fix_misses=200, **kw)
    fx = res["fixed_misses"][-1]
    assert fx["before"] == len(wrong_before) and fx["questions"] == len(questions)
    assert fx["after"] == 0 and fx["still_wrong"] == [] and 0 < fx["steps"] <= 200
    assert greedy_wrong() == []
    assert res["steps"] == first["steps"] and res["losses"] == first["losses"]
    assert any(ln.startswith(f"fixing misses: {len(wrong_before)} -> 0 of {len(questions)}") for ln in lines)
    log = json.loads((out / "train_log.json").read_text())
    assert log["fixed_misses"][-1]["after"] == 0 and log["args"]["fix_misses"] == 200
    with pytest.raises(ValueError, match="--fix-misses must be"):
        train_mod.train(c, tok, tmp_path / "r2", epochs=1, fix_misses=-1, **dict(KW, log=None))


# ----------------------------------------------------------------------------- --arch llama

def test_llama_trains_converts_and_answers_like_its_float_model(data, tmp_path):
    """--arch llama: an HF LlamaForCausalLM is trained, converted to a version 3 file, and the
    engine's greedy answers equal the float model's on the training questions it has learned."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from tinygpt import compare, convert
    from tinygpt.engine import Model

    d, c, tok = data
    out = tmp_path / "llama"
    res = train_mod.train(c, tok, out, epochs=30, arch="llama", **dict(KW, log=None))
    assert res["args"]["arch"] == "llama" and not res["stopped"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_key_value_heads"] == 2 and cfg["intermediate_size"] == 192
    assert res["losses"][-1] < res["losses"][0] / 3
    rep = convert.convert(out, tmp_path / "m.bin", progress=False)
    assert rep["format_version"] == 3
    with pytest.raises(ValueError, match="has no Llama variant"):
        train_mod.train(c, tok, tmp_path / "x", arch="llama", **dict(KW, log=None, preset="hw1"))
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    from tokenizers import Tokenizer

    tk = Tokenizer.from_file(str(tok / "tokenizer.json"))
    ids = tk.encode("Q: What is the led?\nA: The led is").ids
    with torch.no_grad():
        fl = model(torch.tensor([ids])).logits[0].numpy()
    with Model(tmp_path / "m.bin") as m:
        q = compare.engine_logits(m, ids)
    r = compare.agreement(fl, q)
    assert r["cosine_min"] >= 0.999 and bool(r["top1"][-1]) and int(np.argmax(q[-1])) == int(np.argmax(fl[-1]))


@pytest.mark.parametrize("where", ["model", "plot"])
def test_ctrl_c_while_writing_the_outputs_loses_nothing(data, tmp_path, monkeypatch, where):
    """A second Ctrl-C while the model or the plots are written: the checkpoint is complete, no
    half-written model is left, the message says to resume, and --resume writes the outputs."""
    d, c, tok = data
    out = tmp_path / "r"

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    if where == "model":  # after save_pretrained wrote into the temporary folder
        monkeypatch.setattr(train_mod.shutil, "copyfile", interrupt)
    else:
        monkeypatch.setattr(train_mod, "plot_loss", interrupt)
    lines, kw = logged(**KW)
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(c, tok, out, epochs=1, max_steps=3, **kw)
    assert any("run the same command with --resume" in line for line in lines), lines
    assert (out / "checkpoint" / "checkpoint.pt").is_file()
    if where == "model":
        assert not (out / "model.safetensors").exists()  # nothing half-written in its place
    else:
        assert (out / "model.safetensors").is_file() and (out / "train_log.json").is_file()
    monkeypatch.undo()
    res = train_mod.train(c, tok, out, epochs=1, max_steps=3, resume=True, **dict(KW, log=None))
    assert res["steps"] == 3 and not res["stopped"]
    assert (out / "model.safetensors").is_file() and not (out / ".saving").exists()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)  # loads


@pytest.mark.parametrize("edit, want", [
    (lambda c: c.pop("rng"), "it lacks rng"), (lambda c: c.pop("scheduler"), "it lacks scheduler"),
    (lambda c: c.update(losses=None), "bad losses"), (lambda c: c.update(step="5"), "bad step"),
    (lambda c: c.update(step=-1), "bad step"), (lambda c: c.update(identity=[1]), "bad identity"),
    (lambda c: c.update(rng={"torch": 1}), "does not fit this run's model"),
    (lambda c: c["model"].update({k: v[:1] for k, v in list(c["model"].items())[:1]}), "does not fit this run's model"),
])
def test_an_edited_checkpoint_is_refused_in_one_line(data, tmp_path, edit, want):
    """A checkpoint that loads but whose contents are not a run's (hand-edited, another model)."""
    import torch

    d, c, tok = data
    out = tmp_path / "r"
    train_mod.train(c, tok, out, epochs=1, max_steps=4, stop_after=2, **dict(KW, log=None))
    p = out / "checkpoint" / "checkpoint.pt"
    ckpt = torch.load(p, weights_only=True)
    edit(ckpt)
    torch.save(ckpt, p)
    with pytest.raises(ValueError, match=want):
        train_mod.train(c, tok, out, epochs=1, max_steps=4, resume=True, **dict(KW, log=None))
