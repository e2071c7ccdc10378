"""What the tinygpt command shows a person: aligned tables, progress bars only on a terminal,
warnings as one plain line, no third-party deprecation noise.

    format_rows([("entries", 1000, ""), ("tokens", "40,377", "total")]) -> aligned text
    progress_bar(total=n, desc="eval", unit="q")    tqdm on a terminal, a silent stand-in when piped
    quiet_third_party()                             called once by the CLI before any command runs
    have_matplotlib()                               False when the plots must be skipped (or refused)
    format_bytes(6_690_364) -> "6.38 MiB"           sizes as the budget and info tables show them
    quiet_hf()                                      no Hugging Face progress bars inside (save_pretrained)
    raise UserError("...")                          a problem in what the user gave: one line, exit status 2
    existing_file(path, "model file") -> Path       a regular file, else UserError (a FIFO would block)
    check_regular_file(path, what, error)           the same, raising the caller's error class (BoardError)
"""
from __future__ import annotations

import os
import stat
import sys
import warnings
from pathlib import Path


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


_FILE_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def check_regular_file(path, what: str = "file", error=None) -> Path:
    """path, if it names a regular file (symlinks followed); else `error` (an exception class,
    default UserError) saying what it is. Checked before anything opens it: open() on a FIFO
    blocks until a writer comes, a device like /dev/zero never ends."""
    error = error or UserError
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise error("%s: no such %s" % (p, what))
    except OSError as e:  # a symlink loop, a path through a file, no permission
        raise error("%s: cannot use it as a %s: %s" % (p, what, e.strerror or e))
    if stat.S_ISDIR(st.st_mode):
        raise error("%s: is a directory, expected a %s" % (p, what))
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _FILE_KINDS if test(st.st_mode)), "not a regular file")
        raise error("%s: is %s, expected a %s (a regular file)" % (p, kind, what))
    return p


def existing_file(path, what="file"):
    """path as a Path if it is a regular file (else UserError): a FIFO or a device would block or never end."""
    return check_regular_file(path, what)


def format_bytes(n: int) -> str:
    """A byte count as a person reads it: "6.38 MiB", "361.0 KiB", "12 B" (binary units)."""
    if n >= 1024 * 1024:
        return "%.2f MiB" % (n / (1024 * 1024))
    if n >= 1024:
        return "%.1f KiB" % (n / 1024)
    return "%d B" % n


MATPLOTLIB_INSTALL = "pip install matplotlib, or install tinygpt with its [train] extra"


def have_matplotlib() -> bool:
    """True when matplotlib's Agg backend can be imported. Long commands ask this before their
    work starts: a missing plotting package must never fail a run at its end."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError:
        return False
    return True


def format_rows(rows, indent: str = "  ") -> str:
    """Rows of (label, value, unit) as aligned text: labels left, values right-aligned, units after.
    A row whose value is None is a section heading (label only, no indent)."""
    body = [r for r in rows if r[1] is not None]
    wl = max((len(r[0]) for r in body), default=0)
    wv = max((len(str(r[1])) for r in body), default=0)
    out = []
    for label, value, *unit in rows:
        if value is None:
            out.append(label)
            continue
        u = unit[0] if unit else ""
        out.append(("%s%-*s  %*s  %s" % (indent, wl, label, wv, value, u)).rstrip())
    return "\n".join(out)


def is_terminal(stream=None) -> bool:
    s = sys.stderr if stream is None else stream
    try:
        return s.isatty()
    except (AttributeError, ValueError):
        return False


def progress_bar(**kw):
    """A tqdm bar on stderr when stderr is a terminal; otherwise tqdm with disable=True (all
    methods work, nothing is printed), so piped output and CI logs get no bar fragments."""
    from tqdm import tqdm

    kw.setdefault("file", sys.stderr)
    kw.setdefault("dynamic_ncols", True)
    return tqdm(disable=not is_terminal(kw["file"]), **kw)


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    """warnings.showwarning for the CLI: "tinygpt: warning: ..." instead of a source path and line."""
    out = sys.stderr if file is None else file
    try:
        out.write("tinygpt: warning: %s\n" % message)
    except (OSError, ValueError):
        pass


def quiet_third_party() -> None:
    """For the CLI: transformers' deprecation warnings and info/warning logging (e.g. about
    `past_key_values`, which tinygpt passes on purpose for transformers >= 4.45 and < 5.x alike)
    and Hugging Face's own progress bars ("Loading weights") are not shown; tinygpt's own
    warnings print as one plain line. Environment settings a user made are kept."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        for module in ("transformers", "torch", "huggingface_hub", "safetensors"):
            warnings.filterwarnings("ignore", category=category, module=module)
    if "transformers" in sys.modules:  # already imported: its logging read the environment then
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    warnings.showwarning = _one_line_warning


class quiet_hf:
    """Context manager: no Hugging Face progress bars (e.g. "Writing model shards") inside."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self._on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        return self

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging

        if self._on:
            hf_logging.enable_progress_bar()
