"""`tinygpt ask`, `tinygpt generate` and `tinygpt chat`: the on-device scripts (py/chat.py,
py/bpe.py) on the host build of the engine, or with --port (ask, chat) a board's own.

    tinygpt ask "What is PSRAM?"                 answer with the shipped default model
    tinygpt generate --prompt "Once upon a time"  continue plain text (no Q:/A: wrapping)
    tinygpt chat [--port /dev/ttyACM0]           questions and answers, typed

Each command has add_<command>_arguments(p) (its options) and run_<command>(args) (the command),
the table of cli.py names them.
"""
import sys
from pathlib import Path

from .ui import UserError, existing_file

REPO = Path(__file__).resolve().parents[2]
PY_DIR = REPO / "py"
DEFAULT_MODEL = REPO / "models" / "default" / "model.bin"

NOT_UTF8_NOTE = ("tinygpt: note: the question is not UTF-8 text; the bytes that are not were replaced "
                 "by U+FFFD (\ufffd)")


# -- the options ---------------------------------------------------------------------------
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


def add_ask_arguments(p):
    p.add_argument("question", nargs="+",
                   help="the question (UTF-8; bytes that are not UTF-8 become U+FFFD, with a note)")
    _add_generation_args(p)
    _add_port_args(p, "ask the board on this serial port instead (its model, its chat.py)")


def add_generate_arguments(p):
    p.description = ("Greedy by default; the sampling options are those of ask. Stops at the "
                     "end-of-text token, after -n tokens, or when the context is full.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="the text to continue (\"\" starts from the model's bos token)")
    what.add_argument("--ids", help="the prompt as token ids, comma-separated: 1,2,3")
    p.add_argument("-n", dest="max_new_tokens", type=int, default=80, help="at most this many new tokens (default 80)")
    p.add_argument("--json", action="store_true", help='print {"ids": [...], "text": ...} of the continuation')
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="model file (default: the shipped model)")
    p.add_argument("--n-ctx", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(timing=False)


def add_chat_arguments(p):
    _add_generation_args(p)
    _add_port_args(p, "chat with the board on this serial port instead (its model, its chat.py)")


# -- on the PC: py/chat.py -----------------------------------------------------------------
def _device_chat(model_path, n_ctx):
    """Import py/chat.py (the on-device loop) and load the model into it."""
    if str(PY_DIR) not in sys.path:
        sys.path.insert(0, str(PY_DIR))
    import chat

    path = existing_file(model_path, "model file")
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


def run_ask(args):
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


def run_generate(args):
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


def run_chat(args):
    if hasattr(sys.stdin, "reconfigure"):  # typed bytes that are not UTF-8 become U+FFFD, as in `ask`
        sys.stdin.reconfigure(errors="replace")
    if getattr(args, "port", None):
        return _board_chat(args)
    _device_chat(args.model, args.n_ctx).chat(**_settings(args))


# -- on a board: --port (serial_chat; its BoardErrors are reported by cli.main) ----------------
def _board_settings(args):
    if args.model != str(DEFAULT_MODEL):
        raise UserError("--model names a file on this PC; with --port the board answers with its own model "
                        "(put one there with `tinygpt deploy` or `tinygpt flash --model`)")
    if not args.timeout > 0:
        raise UserError("--timeout must be > 0 seconds")
    if not args.answer_limit > 0:
        raise UserError("--answer-limit must be > 0 seconds")
    return _settings(args)


def _board_chat(args):
    from . import serial_chat

    serial_chat.interactive(args.port, _board_settings(args), timeout=args.timeout, n_ctx=args.n_ctx,
                            answer_limit=args.answer_limit)


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
