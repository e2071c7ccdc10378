"""The `tinygpt` command: one entry point for the whole walk from corpus to board.

    tinygpt ask "What is PSRAM?"              answer with the shipped default model
    tinygpt convert HF_DIR -o model.bin       Hugging Face GPT-2 -> INT8 model file
    tinygpt info model.bin                    what is inside a model file
    tinygpt bench [--preset P | MODEL] [--mcu] engine speed and memory (--mcu: instructions/token)

Errors in what the user gave us (files, arguments, model files) end with one line
"tinygpt: error: ..." and exit status 2; nothing half-written is left behind.
"""
import argparse
import os
import sys
from pathlib import Path

from .ui import is_terminal

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = REPO / "models" / "default" / "model.bin"


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


def _existing_file(path, what="file"):
    """path as a Path if it is a regular file: a FIFO or a device would block or never end."""
    from .board import BoardError, check_regular_file

    try:
        return check_regular_file(path, what)
    except BoardError as e:
        raise UserError(str(e))


# -- ask / chat: the same py/ scripts the board runs ---------------------------------------
PY_DIR = REPO / "py"


def _device_chat(model_path, n_ctx):
    """Import py/chat.py (the on-device loop) and load the model into it."""
    if str(PY_DIR) not in sys.path:
        sys.path.insert(0, str(PY_DIR))
    import chat

    path = _existing_file(model_path, "model file")
    chat.load(str(path), n_ctx)
    return chat


def _settings(args):
    """The generation options as chat.ask settings, checked here (for the PC and for a board)."""
    from .serial_chat import check_settings

    settings = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                    timing=args.timing)
    try:
        return check_settings(settings, name=lambda key: "--" + key.replace("_", "-"))
    except ValueError as e:
        raise UserError(str(e))


NOT_UTF8_NOTE = ("tinygpt: note: the question is not UTF-8 text; the bytes that are not were replaced "
                 "by U+FFFD (\ufffd)")


def _question_text(q):
    """A question from the command line as text. Bytes that are not UTF-8 reach Python as lone
    surrogates (surrogateescape), which no encoder takes: they become U+FFFD, as
    bytes.decode('utf-8', 'replace') does, with a note on stderr."""
    try:
        q.encode("utf-8")
        return q
    except UnicodeEncodeError:
        import os

        print(NOT_UTF8_NOTE, file=sys.stderr)
        return os.fsencode(q).decode("utf-8", "replace")


def cmd_ask(args):
    args.question = [_question_text(q) for q in args.question]
    if args.port:
        return _board_ask(args)
    chat = _device_chat(args.model, args.n_ctx)
    settings = _settings(args)
    for q in args.question:
        if len(args.question) > 1:
            print("Q: " + q)
        try:
            chat.ask(q, **settings)
        except (ValueError, TypeError) as e:
            raise UserError(str(e))


def cmd_generate(args):
    """Plain text continued (no Q:/A: wrapping), through py/chat.py's generate."""
    import json

    chat = _device_chat(args.model, args.n_ctx)
    settings = _settings(args)
    sampling = tuple(settings[k] for k in ("temperature", "top_k", "top_p", "repetition_penalty"))
    info = chat._model.info()
    if info["n_ctx"] < 2:
        raise UserError("generate needs a context of at least 2 tokens (--n-ctx %d)" % info["n_ctx"])
    if args.ids is not None:
        ids = _parse_ids(args.ids, info["n_vocab"])
    else:
        prompt = _question_text(args.prompt)
        if args.json:
            ids = chat.generate_prompt_ids(prompt)
            if len(ids) > info["n_ctx"] - 1:  # as chat.generate: the last tokens, said on stderr
                print("tinygpt: note: the prompt was cut to its last %d of %d tokens to fit the %d-token context"
                      % (info["n_ctx"] - 1, len(ids), info["n_ctx"]), file=sys.stderr)
                ids = ids[len(ids) - (info["n_ctx"] - 1):]
        else:
            chat.generate(prompt, **{k: settings[k] for k in ("max_new_tokens", "temperature", "top_k", "top_p",
                                                               "repetition_penalty", "seed")})
            return
    if len(ids) > info["n_ctx"] - 1:
        raise UserError("the prompt is %d tokens; the context (n_ctx %d) holds at most %d before the first new one"
                        % (len(ids), info["n_ctx"], info["n_ctx"] - 1))
    if args.json:
        new, _ = chat.generate_ids(ids, settings["max_new_tokens"], sampling, settings["seed"])
        dec = chat._decoder(ids[-1])
        text = "".join(dec.feed(t) for t in new) + dec.flush()
        print(json.dumps({"ids": new, "text": text}, ensure_ascii=False))
        return
    dec = chat._decoder(ids[-1])
    chat.generate_ids(ids, settings["max_new_tokens"], sampling, settings["seed"],
                      lambda t: print(dec.feed(t), end="", flush=True))
    print(dec.flush())


def _parse_ids(text, n_vocab):
    """--ids 1,2,3: token ids, each in 0..n_vocab-1."""
    ids = []
    for part in text.split(","):
        part = part.strip()
        if not part.lstrip("-").isdigit():
            raise UserError("--ids takes comma-separated token ids, got %r" % part)
        v = int(part)
        if not 0 <= v < n_vocab:
            raise UserError("--ids: token id %d is outside 0..%d (the model's vocabulary)" % (v, n_vocab - 1))
        ids.append(v)
    return ids


def cmd_chat(args):
    if hasattr(sys.stdin, "reconfigure"):  # typed bytes that are not UTF-8 become U+FFFD, as in `ask`
        sys.stdin.reconfigure(errors="replace")
    if getattr(args, "port", None):
        return _board_chat(args)
    _device_chat(args.model, args.n_ctx).chat(**_settings(args))


def _add_generation_args(p):
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="model file (default: the shipped model)")
    p.add_argument("--n-ctx", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--max-new-tokens", type=int, default=80)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--timing", action="store_true", help="print tokens and tok/s after each answer")


def _add_port_args(p, port_help):
    p.add_argument("--port", help=port_help)
    p.add_argument("--timeout", type=float, default=120.0,
                   help="with --port: seconds without output from the board before giving up (default 120)")
    p.add_argument("--answer-limit", type=float, default=300.0, metavar="SECONDS",
                   help="with --port: seconds one answer may take in all, however much the board prints, "
                        "before it is stopped (default 300)")


# -- convert -------------------------------------------------------------------------------
def cmd_convert(args):
    from . import convert

    hf_dir = Path(args.hf_dir)
    if not (hf_dir.is_dir() or hf_dir.is_file()):
        raise UserError("%s: not found (expected a Hugging Face model directory or a llama2.c checkpoint)" % hf_dir)
    if hf_dir.is_file():  # llama2.c: no float model of its own to compare with here, nor a corpus
        args.no_check, args.no_drafts = True, args.drafts is None
    llama2c_tok = _existing_file(args.llama2c_tokenizer, "llama2.c tokenizer") if args.llama2c_tokenizer else None
    if llama2c_tok:  # the float check below reads a tokenizer.json
        args.no_check = True
    report = convert.convert(hf_dir, args.output, tokenizer=args.tokenizer, llama2c_tokenizer=llama2c_tok,
                             progress=not args.quiet and is_terminal())  # no bar fragments in pipes/logs
    if not args.quiet:
        convert.print_report(report)
    # drafts (issue 12): the corpus answers' token ids after the model, for speculative decoding
    corpus = None if args.no_drafts else args.drafts
    if corpus is None and not args.no_drafts:
        corpus, why_not = convert.run_corpus(hf_dir)
        if why_not and not args.quiet:
            print("drafts: none: %s; give --drafts CORPUS to store them" % why_not)
    if corpus is not None:
        d = convert.add_drafts(args.output, _existing_file(corpus, "corpus"))
        if not args.quiet:
            print("drafts: %d answers (%d token ids, %d bytes) from %s" % (d["answers"], d["ids"], d["bytes"],
                                                                       d["corpus"]))
    if args.no_check:
        return
    _print_agreement(hf_dir, Path(args.output), args.tokenizer, args.prompt)


def _print_agreement(hf_dir, model_path, tokenizer_dir, prompt):
    """Float vs INT8 logits on a sample prompt: the number that says the conversion worked."""
    from tokenizers import ByteLevelBPETokenizer, Tokenizer

    from . import compare
    from .engine import Model

    tok_dir = Path(tokenizer_dir) if tokenizer_dir else hf_dir
    if (tok_dir / "tokenizer.json").exists():
        tk = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    else:
        tk = ByteLevelBPETokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"))
    ids = tk.encode(prompt).ids
    with Model(model_path) as m:
        n_ctx = m.info()["n_ctx"]
        ids = ids[:n_ctx] or [m.info()["eos_id"]]
        r = compare.agreement(compare.hf_logits(hf_dir, ids), compare.engine_logits(m, ids))
    print("float vs INT8 on %d prompt tokens: cosine min %.5f mean %.5f, top-1 agrees at %d/%d positions"
          % (r["positions"], r["cosine_min"], r["cosine_mean"], r["top1_agree"], r["positions"]))


# -- info ----------------------------------------------------------------------------------
def _n_abstain_questions():
    from .abstain import read_questions

    try:
        return len(read_questions())
    except ValueError:
        return 0


def cmd_info(args):
    from .engine import Model

    path = _existing_file(args.model, "model file")
    if args.selftest:
        return _selftest(path)
    from .modelfile import ABSTAIN_KEY, parse_meta

    with Model(path, n_ctx=args.n_ctx) as m:
        info = m.info()
        try:
            info[ABSTAIN_KEY] = parse_meta(m.meta()).get(ABSTAIN_KEY)
        except ValueError as e:
            raise UserError(f"{path}: {e}") from None
    if args.json:
        import json
        print(json.dumps(info, indent=2))
        return
    from .modelfile import format_info
    print(format_info(info, path))


def _selftest(path):
    """py/selftest.py on the host engine: its "bit-exact" line must equal the board's."""
    if str(PY_DIR) not in sys.path:
        sys.path.insert(0, str(PY_DIR))
    import selftest

    selftest.run(str(path))


# -- bench ---------------------------------------------------------------------------------
def cmd_bench(args):
    from . import bench

    if args.model and args.preset:
        raise UserError("give either --preset or a MODEL file, not both")
    for p in args.preset or []:
        if p not in bench.bench_names():
            raise UserError("unknown preset %r (known: %s)" % (p, ", ".join(bench.bench_names())))
    model = _existing_file(args.model, "model file") if args.model else None
    if args.questions:  # issue 12: plain vs drafted decoding of real questions
        if not model or args.mcu or args.preset:
            raise UserError("--questions needs a MODEL file (and no --preset or --mcu)")
        try:
            bench.run_questions(model, _existing_file(args.questions, "questions file"), as_json=args.json)
        except ValueError as e:
            raise UserError(str(e)) from e
        return
    if args.mcu:
        from .mcu import McuError

        if args.n_ctx is not None:
            raise UserError("--n-ctx does not apply to --mcu (the emulated run uses n_positions)")
        if args.threads is not None:
            raise UserError("--threads does not apply to --mcu (the emulated board has one core)")
        try:
            bench.run_mcu(presets=args.preset, model_path=model, as_json=args.json)
        except McuError as e:
            raise UserError(str(e)) from e
        return
    if args.threads is not None and args.threads < 1:
        raise UserError("--threads must be at least 1, got %d" % args.threads)
    bench.run(presets=args.preset, model_path=model, as_json=args.json, n_ctx=args.n_ctx, threads=args.threads)


# -- corpus, tokenizer, train, eval: from a Q&A text file to a model ------------------------
def cmd_corpus(args):
    from . import corpus

    if args.action == "augment":
        return cmd_corpus_augment(args)
    path = _existing_file(args.corpus, "corpus file")
    if args.action == "check":
        problems = corpus.check(path, args.tokenizer, args.n_ctx)
        for pr in problems:
            print("%s:%d: %s" % (path, pr.line, pr.message))
        # not errors: training keeps the first of a repeated question, and near duplicates may be meant
        warnings = sorted(corpus.conflicting_duplicates(path) + corpus.near_duplicates(path), key=lambda p: p.line)
        for pr in warnings:
            print("%s:%d: warning: %s" % (path, pr.line, pr.message))
        if not args.tokenizer:
            print("%s: length check skipped: give --tokenizer DIR (the tokenizer you train on this corpus) to "
                  "check that every entry fits %d tokens" % (path, args.n_ctx), file=sys.stderr)
        status = "%d problem(s)" % len(problems) if problems else "ok"
        if warnings:
            status += ", %d warning(s)" % len(warnings)
        print("%s: %s" % (path, status), file=sys.stderr)
        if problems:
            sys.exit(1)
        return
    st = corpus.stats(path, args.tokenizer)
    if args.json:
        import json
        print(json.dumps(st, indent=2))
    else:
        print(corpus.format_stats(st, path, args.tokenizer))


def cmd_tokenizer_train(args):
    import warnings

    from .tokenizer_train import train_tokenizer

    corpus = _existing_file(args.corpus, "corpus file")
    with warnings.catch_warnings(record=True) as caught:  # tinygpt's notices: one plain line each
        warnings.simplefilter("always", UserWarning)
        out = train_tokenizer(corpus, args.output, vocab_size=args.vocab_size,
                              special_tokens_file=args.special_tokens, min_frequency=args.min_frequency)
    for w in caught:
        print("tinygpt: warning: %s" % w.message, file=sys.stderr)
    from tokenizers import Tokenizer
    n = Tokenizer.from_file(str(out)).get_vocab_size()
    print("wrote %s (%d tokens)" % (out, n))


def cmd_train(args):
    from . import train  # torch is imported only after the arguments and files are checked

    res = train.train(args.corpus, args.tokenizer, args.output, preset=args.preset, epochs=args.epochs,
                      lr=args.lr, batch_size=args.batch_size, seed=args.seed, resume=args.resume,
                      checkpoint_every=args.checkpoint_every, dropout=args.dropout, max_steps=args.max_steps,
                      threads=args.threads, max_minutes=args.max_minutes, loss=args.loss,
                      label_smoothing=args.label_smoothing, weight_decay=args.weight_decay,
                      val_split=args.val_split, val_file=args.val_file, val_every=args.val_every,
                      early_stop=args.early_stop, augment=args.augment, device=args.device,
                      fix_misses=args.fix_misses, abstain=args.abstain,
                      abstain_questions=_existing_file(args.abstain_questions, "off-topic question list")
                      if args.abstain_questions else None, arch=args.arch)
    if res.get("stopped") in ("SIGINT", "SIGTERM"):
        sys.exit(130 if res["stopped"] == "SIGINT" else 143)


def cmd_corpus_augment(args):
    from . import augment

    if not args.output:
        raise UserError("corpus augment needs -o OUT (the file to write)")
    if not 1 <= args.per_question <= augment.MAX_PER_QUESTION:
        raise UserError("--per-question must be from 1 to %d, got %d (more are not distinct: a short question "
                        "has only a few variants)" % (augment.MAX_PER_QUESTION, args.per_question))
    path = _existing_file(args.corpus, "corpus file")
    report = augment.augment_file(path, args.output, per_question=args.per_question, seed=args.seed,
                                  synonyms=args.synonyms)
    print(augment.format_report(report, args.output))


def _check_output_file(flag, path):
    """An output file of a long command, checked before the work: a result must not be lost at
    the end for a path that cannot be written."""
    if not path:
        return
    p = Path(path)
    if p.is_dir():
        raise UserError("%s %s is a directory; give a file name" % (flag, path))
    if not p.absolute().parent.is_dir():
        raise UserError("%s %s: folder %s does not exist" % (flag, path, p.absolute().parent))
    if (p.exists() and not os.access(p, os.W_OK)) or not os.access(p.absolute().parent, os.W_OK | os.X_OK):
        raise UserError("%s %s: cannot write there (permission denied)" % (flag, path))


def cmd_eval(args):
    from . import evaluate

    if args.limit is not None and args.limit < 1:
        raise UserError("--limit must be >= 1")
    if args.threads is not None and args.threads < 1:
        raise UserError("--threads must be >= 1")
    questions = _existing_file(args.questions, "questions file")
    int8 = _existing_file(args.int8, "model file") if args.int8 and not args.no_int8 else args.int8
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        _check_output_file(flag, path)
    if args.plot:
        from .ui import MATPLOTLIB_INSTALL, have_matplotlib

        if not have_matplotlib():
            raise UserError("--plot needs matplotlib, which is not installed (%s); or leave out --plot"
                            % MATPLOTLIB_INSTALL)
    res = evaluate.evaluate(args.model, questions, tokenizer=args.tokenizer,
                            int8_model=False if args.no_int8 else int8, plot=args.plot,
                            max_new_tokens=args.max_new_tokens, limit=args.limit, threads=args.threads,
                            draft=not args.no_draft,
                            ood_file=_existing_file(args.ood, "out-of-domain questions file") if args.ood else None)
    if args.json:  # every question's answers, not only the first mismatches the table shows
        import json
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1, ensure_ascii=False)
        print("results: %s (%d questions, %d with a mismatch)" % (args.json, res["n"], len(res["mismatches"])))


# -- the board: budget, deploy, flash, firmware, chat --port --------------------------------
def _board_errors(fn):
    """Board tools raise board.BoardError subclasses with one-line messages: report as ours."""
    def wrapped(args):
        from .board import BoardError

        try:
            return fn(args)
        except BoardError as e:
            raise UserError(str(e))
    return wrapped


def _board_settings(args):
    if args.model != str(DEFAULT_MODEL):
        raise UserError("--model names a file on this PC; with --port the board answers with its own model "
                        "(put one there with `tinygpt deploy` or `tinygpt flash --model`)")
    if not args.timeout > 0:
        raise UserError("--timeout must be > 0 seconds")
    if not args.answer_limit > 0:
        raise UserError("--answer-limit must be > 0 seconds")
    return _settings(args)


@_board_errors
def _board_chat(args):
    from . import serial_chat

    serial_chat.interactive(args.port, _board_settings(args), timeout=args.timeout, n_ctx=args.n_ctx,
                            answer_limit=args.answer_limit)


@_board_errors
def _board_ask(args):
    from . import serial_chat

    settings = _board_settings(args)
    try:
        serial_chat.ask_questions(args.port, args.question, settings, timeout=args.timeout, n_ctx=args.n_ctx,
                                  answer_limit=args.answer_limit)
    except serial_chat.SerialChatError as e:
        if str(e).startswith("the board says: ValueError: "):  # as `tinygpt ask` reports chat.ask's ValueError
            raise UserError(str(e)[len("the board says: ValueError: "):])
        raise


@_board_errors
def cmd_budget(args):
    from . import board

    r = board.budget(args.model, board=args.board, n_ctx=args.n_ctx, placement=args.placement)
    if args.json:
        import json
        print(json.dumps(r, indent=2))
    else:
        print(board.format_budget(r))
    if not r["fits"]:
        sys.exit(1)


@_board_errors
def cmd_deploy(args):
    from . import deploy

    deploy.run_cli(args)


@_board_errors
def cmd_flash(args):
    from . import flash

    flash.run_cli(args)


@_board_errors
def cmd_firmware(args):
    from . import firmware

    firmware.run_cli(args)


@_board_errors
def cmd_emulate(args):
    from . import emulate

    emulate.run_cli(args)


def _add_board_parsers(sub):
    from . import board, deploy, emulate, firmware, flash, reindex

    bu = sub.add_parser("budget", help="will a model or preset fit a board: flash, PSRAM, largest n_ctx")
    bu.add_argument("model", metavar="MODEL_or_PRESET", help="a model file or a preset name")
    bu.add_argument("--board", default="N16R8", help="board: %s (default N16R8)" % ", ".join(board.BOARDS))
    bu.add_argument("--n-ctx", type=int, default=None, help="context length (default: the model's n_positions)")
    bu.add_argument("--placement", choices=("partition", "file"), default=None,
                    help="model in the 'model' flash partition (memory-mapped; default when the board has one) "
                         "or a file on the filesystem (read into PSRAM)")
    bu.add_argument("--json", action="store_true", help="print JSON")
    bu.set_defaults(func=cmd_budget)

    de = sub.add_parser("deploy", help="copy the model and py/ scripts to a MicroPython board, verified by SHA-256")
    deploy.add_arguments(de, DEFAULT_MODEL)
    de.set_defaults(func=cmd_deploy)

    fl = sub.add_parser("flash", help="write the tinygpt firmware and/or a model into the board's flash (esptool)")
    flash.add_arguments(fl)
    fl.set_defaults(func=cmd_flash)

    fw = sub.add_parser("firmware", help="build the ESP32-S3 firmware (MicroPython + tinygpt) with ESP-IDF")
    firmware.add_arguments(fw)
    fw.set_defaults(func=cmd_firmware)

    ix = sub.add_parser("index", help="copy a model file with its corpus's word index (chat.ask checks answers with it)")
    reindex.add_arguments(ix)
    ix.set_defaults(func=lambda args: reindex.run_cli(args))

    em = sub.add_parser("emulate", help="run the tinygpt firmware on an emulated Cortex-M7 (QEMU); prints its "
                                        "serial port for --port and mpremote")
    emulate.add_arguments(em)
    em.set_defaults(func=cmd_emulate)


def build_parser():
    p = argparse.ArgumentParser(prog="tinygpt", description="A tiny INT8 GPT-2 for the ESP32-S3: host tools.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    a = sub.add_parser("ask", help="answer questions with the model, through the on-device scripts (py/)")
    a.add_argument("question", nargs="+",
                   help="the question (UTF-8; bytes that are not UTF-8 become U+FFFD, with a note)")
    _add_generation_args(a)
    _add_port_args(a, "ask the board on this serial port instead (its model, its chat.py)")
    a.set_defaults(func=cmd_ask)

    g = sub.add_parser("generate", help="continue plain text with the model (no Q:/A: wrapping): stories",
                       description="Greedy by default; the sampling options are those of ask. Stops at the "
                                   "end-of-text token, after -n tokens, or when the context is full.")
    what = g.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="the text to continue (\"\" starts from the model's bos token)")
    what.add_argument("--ids", help="the prompt as token ids, comma-separated: 1,2,3")
    g.add_argument("-n", dest="max_new_tokens", type=int, default=80, help="at most this many new tokens (default 80)")
    g.add_argument("--json", action="store_true", help='print {"ids": [...], "text": ...} of the continuation')
    g.add_argument("--model", default=str(DEFAULT_MODEL), help="model file (default: the shipped model)")
    g.add_argument("--n-ctx", type=int, default=None, help="context length (default: the model's)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.set_defaults(func=cmd_generate, timing=False)

    ch = sub.add_parser("chat", help="interactive questions and answers on the PC, or on a board with --port")
    _add_generation_args(ch)
    _add_port_args(ch, "chat with the board on this serial port instead (its model, its chat.py)")
    ch.set_defaults(func=cmd_chat)

    c = sub.add_parser("convert", help="convert a Hugging Face GPT-2 or Llama directory, or a llama2.c "
                       "checkpoint, to a tinygpt model file")
    c.add_argument("hf_dir", help="directory with config.json and model.safetensors or pytorch_model.bin, or a "
                   "llama2.c checkpoint file (its export.py versions 0, 1 and 2; needs --llama2c-tokenizer or --tokenizer)")
    c.add_argument("-o", "--output", required=True, help="model file to write")
    c.add_argument("--tokenizer", help="tokenizer directory (default: HF_DIR)")
    c.add_argument("--llama2c-tokenizer", metavar="TOKENIZER_BIN",
                   help="llama2.c's tokenizer.bin for a Llama model (instead of a byte-level BPE --tokenizer)")
    c.add_argument("--prompt", default="Q: What is PSRAM?\nA:", help="sample prompt for the float vs INT8 check")
    c.add_argument("--no-check", action="store_true", help="skip the float vs INT8 logit check")
    c.add_argument("--drafts", metavar="CORPUS", help="store CORPUS's answers in the model file for drafting "
                   "(faster answers; default: the corpus of a training run directory, if it still exists)")
    c.add_argument("--no-drafts", action="store_true", help="store no drafts, even for a training run")
    c.add_argument("-q", "--quiet", action="store_true")
    c.set_defaults(func=cmd_convert)

    co = sub.add_parser("corpus", help="check a Q&A corpus, count what is in it, or add question variants",
                        description="check: report problems (exit 1 if any); stats: counts; augment: write "
                                    "CORPUS plus programmatic variants of every question to -o OUT "
                                    "(answers and prose untouched)")
    co.add_argument("action", choices=("check", "stats", "augment"))
    co.add_argument("corpus")
    co.add_argument("--tokenizer", help="tokenizer dir or tokenizer.json: enables token counts and the length check "
                                        "(use the tokenizer you train on this corpus: another one counts other tokens)")
    co.add_argument("--n-ctx", type=int, default=128, help="context length for the length check (default 128)")
    co.add_argument("--json", action="store_true", help="stats as JSON")
    co.add_argument("-o", "--output", help="augment: the corpus file to write")
    co.add_argument("--per-question", type=int, default=8, help="augment: variants per question (default 8)")
    co.add_argument("--seed", type=int, default=0, help="augment: random seed; same seed, same output (default 0)")
    co.add_argument("--synonyms", help="augment: synonym table (default: the shipped tinygpt/data/synonyms.txt)")
    co.set_defaults(func=cmd_corpus)

    tk = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on a corpus")
    tk_sub = tk.add_subparsers(dest="action", metavar="ACTION")
    tk_sub.required = True
    tt = tk_sub.add_parser("train", help="train a tokenizer (Hugging Face tokenizers, byte-level BPE)")
    tt.add_argument("corpus")
    tt.add_argument("-o", "--output", required=True, help="directory for tokenizer.json, vocab.json, merges.txt")
    tt.add_argument("--vocab-size", type=int, default=4096)
    tt.add_argument("--special-tokens", help="file of domain words that must stay one token (one per line, # comments)")
    tt.add_argument("--min-frequency", type=int, default=2)
    tt.set_defaults(func=cmd_tokenizer_train)

    from .presets import LLAMA_PRESETS, PRESETS
    from .train import DEFAULTS, DEVICES, LOSSES
    tr = sub.add_parser("train", help="train a GPT-2 of a preset on a corpus (CPU or GPU)",
                        description="Train a model on a corpus. Prints the plan and, after a few steps, the "
                                    "measured time per step and the expected total. Ctrl-C stops with a "
                                    "checkpoint and a usable model; --resume continues.")
    tr.add_argument("corpus")
    tr.add_argument("--tokenizer", required=True, help="tokenizer directory (from `tinygpt tokenizer train`)")
    tr.add_argument("-o", "--output", required=True, help="run directory (Hugging Face save_pretrained layout)")
    tr.add_argument("--preset", default=DEFAULTS["preset"],
                    help="model size: %s (default %%(default)s; `small` trains in minutes for a first try, "
                         "`tiny` is for tests only)" % ", ".join(PRESETS))
    tr.add_argument("--arch", choices=("gpt2", "llama"), default=DEFAULTS["arch"],
                    help="architecture (default %%(default)s); llama: RMSNorm, SwiGLU, rotary positions and half "
                         "as many key/value heads, at about the preset's model-file size (presets %s)"
                    % ", ".join(LLAMA_PRESETS))
    tr.add_argument("--epochs", type=int, default=DEFAULTS["epochs"],
                    help="passes over the corpus (default %(default)s); with --resume, a larger number "
                         "continues a finished run")
    tr.add_argument("--max-steps", type=int, help="cap the total steps (default: no cap)")
    tr.add_argument("--max-minutes", type=float,
                    help="stop after this many minutes with a checkpoint and a usable model (default: no limit)")
    tr.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="peak learning rate (default %(default)g)")
    tr.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"],
                    help="blocks per step (default %(default)s)")
    tr.add_argument("--dropout", type=float, default=DEFAULTS["dropout"], help="dropout (default %(default)g)")
    tr.add_argument("--weight-decay", type=float, default=DEFAULTS["weight_decay"],
                    help="AdamW weight decay on matrices and embeddings (default %(default)g)")
    tr.add_argument("--label-smoothing", type=float, default=DEFAULTS["label_smoothing"],
                    help="label smoothing of the cross entropy (default %(default)g)")
    tr.add_argument("--loss", choices=LOSSES, default=DEFAULTS["loss"],
                    help="train on all tokens or on the answer tokens only (default %(default)s)")
    tr.add_argument("--val-split", type=float, metavar="F",
                    help="hold out this fraction of the phrasings of every answer (e.g. 0.25) and report "
                         "validation loss and exact answers as it trains; best model in RUN_DIR/best "
                         "(default: no validation)")
    tr.add_argument("--val-file", help="validate on the questions of this corpus-format file instead of a split (default: none)")
    tr.add_argument("--val-every", type=int, help="validate every N steps (default: once per epoch)")
    tr.add_argument("--early-stop", type=int, metavar="N",
                    help="stop after N validations without a better one (default: off)")
    tr.add_argument("--augment", type=int, default=DEFAULTS["augment"], metavar="N",
                    help="add N variants of every training question (as `tinygpt corpus augment`; after "
                         "--val-split, so held-out questions do not leak) (default %(default)s)")
    tr.add_argument("--abstain", type=int, default=None, metavar="N",
                    help="train N off-topic questions (from --abstain-questions, those unlike the corpus) with the "
                         "corpus's Abstain: answer, so that the model says it does not know; 0: none (default: as "
                         "many as the corpus has questions, at most the list's)")
    tr.add_argument("--abstain-questions", metavar="FILE",
                    help="off-topic questions, one per line (default: the shipped list of %d)" % _n_abstain_questions())
    tr.add_argument("--fix-misses", type=int, default=0, metavar="N",
                    help="after the planned steps, up to N more steps on the training questions greedy decoding "
                         "still answers wrong, mixed with others, until none is (works with --resume on a "
                         "finished run) (default %(default)s: off)")
    tr.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="random seed (default %(default)s)")
    tr.add_argument("--checkpoint-every", type=int, default=DEFAULTS["checkpoint_every"],
                    help="steps between checkpoints; 0 = only at the end (default %(default)s)")
    tr.add_argument("--device", choices=DEVICES, default=DEFAULTS["device"],
                    help="auto: a GPU when torch sees one, else the CPU (default %(default)s)")
    tr.add_argument("--threads", type=int, default=DEFAULTS["threads"],
                    help="CPU threads (default %(default)s: on a 2-core machine shared with other work, 2 "
                         "threads measured 2.6-3x slower; raise it on idle cores); --resume bit for bit needs "
                         "the same")
    tr.add_argument("--resume", action="store_true",
                    help="continue the run in --output from its checkpoint (same arguments; a larger --epochs "
                         "or --max-steps trains further)")
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="exact-match accuracy of float and INT8 answers on Q/A pairs",
                        description="Asks every question of a file of Q/A pairs (corpus format: a 'Q: ...' line, "
                                    "then its expected 'A: ...' or 'Do: ...' line; prose is skipped) and counts "
                                    "the answers that equal the expected one exactly. A run directory gives float "
                                    "and INT8 answers; a model file gives INT8 only, which is about 10x faster "
                                    "(measured on 20 questions, hw1 preset: 5 s instead of 56 s of CPU time; "
                                    "the float model runs in PyTorch, one token per call).")
    ev.add_argument("model", help="training run directory (float + INT8) or a model file (INT8 only, ~10x faster)")
    ev.add_argument("--questions", required=True,
                    help="Q/A pairs in the corpus format (Q: + A: or Do: lines), e.g. data/heldout.txt")
    ev.add_argument("--limit", type=int, metavar="N", help="only the first N questions (default: all)")
    ev.add_argument("--threads", type=int, default=1,
                    help="CPU threads of the float model (default 1: on a busy 2-core machine 2 threads were "
                         "10x slower; raise it on idle cores)")
    ev.add_argument("--tokenizer")
    ev.add_argument("--int8", help="INT8 model file (default: convert the run directory)")
    ev.add_argument("--no-int8", action="store_true", help="float model only")
    ev.add_argument("--plot", help="write a bar chart PNG here")
    ev.add_argument("--json", metavar="FILE", help="write every question's expected, float and INT8 answers and "
                                                   "the totals to FILE as JSON (the table shows only the first "
                                                   "20 mismatches)")
    ev.add_argument("--max-new-tokens", type=int, default=80)
    ev.add_argument("--ood", metavar="FILE",
                    help="out-of-domain questions (one per line): report how many get the model's abstain answer, "
                         "next to the in-domain questions that get it wrongly")
    ev.add_argument("--no-draft", action="store_true",
                    help="generate every answer token by token (default: check the expected answer's tokens in "
                         "one forward pass and generate only from where the model departs from it; the same "
                         "greedy answers, INT8 bit for bit, in a fraction of the time)")
    ev.set_defaults(func=cmd_eval)

    i = sub.add_parser("info", help="show a model file's hyperparameters and memory use")
    i.add_argument("model")
    i.add_argument("--n-ctx", type=int, default=None, help="KV cache length to size (default: n_positions)")
    i.add_argument("--json", action="store_true")
    i.add_argument("--selftest", action="store_true",
                   help="run the board self-test (py/selftest.py) on the PC: compare its bit-exact CRC with a "
                        "board's `import selftest; selftest.run()`")
    i.set_defaults(func=cmd_info)

    b = sub.add_parser("bench", help="engine speed and memory on random models of every preset, or on MODEL")
    b.add_argument("model", nargs="?", help="a model file (default: random models of the presets)")
    b.add_argument("--preset", action="append", help="only this preset (repeatable)")
    b.add_argument("--n-ctx", type=int, default=None)
    b.add_argument("--threads", type=int, default=None, metavar="N",
                   help="split each matmul between N threads and report the speedup over 1 thread, measured in "
                        "the same run (logits are bit-identical for any N)")
    b.add_argument("--json", action="store_true", help="print JSON")
    b.add_argument("--questions", metavar="FILE", help="answer FILE's questions (Q:/A: pairs) greedily, plainly and "
                   "with drafts; report passes, weight bytes and multiply-adds per token and identical answers")
    b.add_argument("--mcu", action="store_true",
                   help="instructions per token on an emulated Cortex-M4F (QEMU) instead of host speed; needs the "
                        "Debian packages gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm")
    b.set_defaults(func=cmd_bench)

    _add_board_parsers(sub)
    return p


def main(argv=None):
    from .ui import quiet_third_party

    quiet_third_party()
    # Long commands (train, eval) print progress lines; with stdout a pipe or a file
    # (`| tee train.log`, `> log`) Python would hold them in 8 KB blocks until the end.
    try:
        sys.stdout.reconfigure(line_buffering=True)
    except (AttributeError, ValueError):  # replaced or closed stdout: leave it as it is
        pass
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        parser.exit(2, "tinygpt: error: %s\n" % e)
    except BrokenPipeError as e:
        if not _stdout_is_broken():  # a serial port or a tool's pipe: an error worth naming
            parser.exit(2, "tinygpt: error: %s\n" % e)
        # the reader of our output left (`tinygpt corpus stats ... | head`): stop quietly, as
        # Unix tools do, and keep Python from failing again when it flushes stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it
    except (ValueError, OSError, MemoryError) as e:
        # Loader and converter errors carry messages that name the problem.
        parser.exit(2, "tinygpt: error: %s\n" % e)
    except KeyboardInterrupt:
        parser.exit(130, "\ntinygpt: interrupted\n")
    return 0


def _stdout_is_broken() -> bool:
    """True when stdout is a pipe whose reader has gone (poll reports an error on it)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), or stdout replaced/closed
        return False


if __name__ == "__main__":
    sys.exit(main())
