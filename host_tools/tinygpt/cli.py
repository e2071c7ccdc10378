"""The `tinygpt` command: one entry point for the whole walk from corpus to board.

    tinygpt ask "What is PSRAM?"              answer with the shipped default model
    tinygpt convert HF_DIR -o model.bin       Hugging Face GPT-2 -> INT8 model file
    tinygpt info model.bin                    what is inside a model file
    tinygpt bench [--preset P | MODEL] [--mcu] engine speed and memory (--mcu: instructions/token)

Errors in what the user gave us (files, arguments, model files) end with one line
"tinygpt: error: ..." and exit status 2; nothing half-written is left behind.
"""
import argparse
import importlib
import os
import sys

from .board import BoardError
from .ui import UserError

# Every command, in the order `tinygpt --help` lists them: (name, help, the module that owns it).
# The module defines the command's options with add_arguments(p) and runs it with run_cli(args);
# "module:name" is a module that owns several commands: add_<name>_arguments(p), run_<name>(args).
# main() reports a command's UserError, BoardError, ValueError, OSError and MemoryError as one line
# "tinygpt: error: ..." with exit status 2.
COMMANDS = (
    ("ask", "answer questions with the model, through the on-device scripts (py/)", "chat_cli:ask"),
    ("generate", "continue plain text with the model (no Q:/A: wrapping): stories", "chat_cli:generate"),
    ("chat", "interactive questions and answers on the PC, or on a board with --port", "chat_cli:chat"),
    ("convert", "convert a Hugging Face GPT-2 or Llama directory, or a llama2.c checkpoint, to a tinygpt "
                "model file", "convert"),
    ("corpus", "check a Q&A corpus, count what is in it, or add question variants", "corpus_cli"),
    ("tokenizer", "train a byte-level BPE tokenizer on a corpus", "tokenizer_train"),
    ("train", "train a GPT-2 of a preset on a corpus (CPU or GPU)", "train"),
    ("eval", "exact-match accuracy of float and INT8 answers on Q/A pairs", "evaluate"),
    ("info", "show a model file's hyperparameters and memory use", "modelfile"),
    ("bench", "engine speed and memory on random models of every preset, or on MODEL", "bench"),
    ("budget", "will a model or preset fit a board: flash, PSRAM, largest n_ctx", "board"),
    ("deploy", "copy the model and py/ scripts to a MicroPython board, verified by SHA-256", "deploy"),
    ("flash", "write the tinygpt firmware and/or a model into the board's flash (esptool)", "flash"),
    ("firmware", "build the ESP32-S3 firmware (MicroPython + tinygpt) with ESP-IDF", "firmware"),
    ("index", "copy a model file with its corpus's word index (chat.ask checks answers with it)", "reindex"),
    ("emulate", "run the tinygpt firmware on an emulated Cortex-M7 (QEMU); prints its serial port for --port "
                "and mpremote", "emulate"),
)


def _command_functions(owner):
    """A COMMANDS owner as (add_arguments, run_cli): "module" -> its add_arguments and run_cli,
    "module:name" -> its add_<name>_arguments and run_<name>."""
    module_name, _, name = owner.partition(":")
    module = importlib.import_module("." + module_name, __package__)
    if name:
        return getattr(module, "add_%s_arguments" % name), getattr(module, "run_" + name)
    return module.add_arguments, module.run_cli


def build_parser():
    p = argparse.ArgumentParser(prog="tinygpt", description="A tiny INT8 GPT-2 for the ESP32-S3: host tools.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, help_text, owner in COMMANDS:
        add_arguments, run_cli = _command_functions(owner)
        c = sub.add_parser(name, help=help_text)
        add_arguments(c)
        c.set_defaults(func=run_cli)
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
    except (UserError, BoardError) as e:  # BoardError: the board tools' one-line messages
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
