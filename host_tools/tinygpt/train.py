"""Train a tinygpt model (a Hugging Face GPT-2 or Llama) on the corpus, on the CPU (or a GPU).
nanoGPT style: the settings in one config object, named stages, one loop in a fixed order.

    train(corpus, tokenizer_dir, out_dir, TrainConfig(epochs=3), log=print)   or
    train(corpus, tokenizer_dir, out_dir, epochs=3, lr=1e-3, ...)            (TrainConfig's names)

``tinygpt train CORPUS --tokenizer DIR -o RUN_DIR [--preset d256x8] [--epochs N] ...`` runs it
(add_arguments / run_cli); ``tinygpt train --help`` lists every option with its default.

Reading order: TrainConfig (every setting: default, option, help, check, identity); the stages
train() calls in turn (load_entries, load_tokenizer, tokenize, make_plan, check_out_dir,
build_config, check_resume); Trainer (model, optimizer and schedule; restore, checkpoint,
update, score, validate; loop; finish with --fix-misses; write_outputs); train() itself.

Data. The corpus (see tinygpt.corpus) is serialized per entry::

    Q/A    "Q: {question}\\nA: {answer}<|endoftext|>"
    Q/Do   "Q: {question}\\nA: Do: {command}<|endoftext|>"
    prose  "{text}<|endoftext|>"

and tokenized with the tokenizer's tokenizer.json (the Hugging Face ``tokenizers`` library).
Every epoch the entry order is reshuffled (numpy ``default_rng([seed, epoch])``, so the order
depends only on the seed and the epoch) and whole entries are packed greedily into blocks of
``n_positions`` tokens: an entry is never split across blocks (one longer than a block is an
error naming its corpus line); the rest of a block is padding (``<|endoftext|>``) that is
masked out of the loss. Each entry in a block is trained exactly as if it were alone, which is
how it is used at inference (the prompt ``Q: ...\\nA:`` starts at position 0 with an empty
KV cache): its position ids restart at 0 and a block-diagonal causal attention mask stops it
from seeing the entries before it. The loss (default ``loss="all"``) is the next-token cross
entropy over every token of every entry after its first (the padding and the step from one
entry into the next are ignored).

Model and optimizer. ``transformers.GPT2LMHeadModel(make_config(preset, vocab_size=<tokenizer
size>, bos/eos=<|endoftext|>, resid/embd/attn_pdrop=dropout))``, AdamW (betas 0.9/0.95; weight
decay on matrices and embeddings only), linear warmup then cosine (or linear) decay to
``min_lr_ratio * lr``, gradient clipping at 1.0, torch/numpy/python seeded with ``seed``,
``torch.set_num_threads(threads or os.cpu_count())`` (restored on return).

Checkpoints. Every ``checkpoint_every`` steps, at the end, and whenever the run stops,
``out_dir/checkpoint/checkpoint.pt`` is written atomically (temporary file, fsync, rename):
model, optimizer, scheduler, the torch/numpy/python RNG states, step, epoch, position in the
epoch, loss history and elapsed time. ``resume=True`` continues from it bit for bit (same
thread count assumed): a resumed run ends with exactly the weights of an uninterrupted one.
The run's settings (corpus and tokenizer hashes, preset, lr, epochs, ...) are stored with the
checkpoint, and resuming with different ones is refused (but see Continuing).

Loss. ``loss="all"``: every token of every entry after its first (the question too);
``loss="answer"``: only the answer tokens and the closing <|endoftext|> (the question is context,
not something to predict; prose entries are left out). ``label_smoothing`` is passed to the
cross entropy; ``weight_decay`` applies to matrices and embeddings.

Validation. ``val_split=F`` holds out, for every answer with k >= 2 phrasings (grouped by answer
text), min(k - 1, max(1, round(k * F))) of its questions (seeded); answers with one phrasing and
prose stay in training (``split_validation``). ``val_file=PATH`` validates on the questions of
another file instead. Every ``val_every`` steps (default: once per epoch) and at the end the
validation loss (cross entropy per answer token) and the exact-answer accuracy are measured
with the float model: a question is exact when the argmax at every answer position, fed the
answer so far, is the answer's token - exactly when greedy decoding of "Q: ...\nA:" generates
the answer and then <|endoftext|> (``tinygpt eval``'s exact match, which compares text, can
only count more). The best evaluation (most exact, then lowest loss) is saved in
``out_dir/best`` (convertible like the run itself); ``early_stop=N`` ends the run after N
evaluations without a better one. ``augment=N`` adds N programmatic variants of every training
question (tinygpt.augment) after the split, so no variant of a held-out question is trained on.

Fixing misses. ``fix_misses=N``: when the planned steps are done (also on a finished run picked
up with ``resume=True``), the training questions - the corpus's own, not their augmented
variants - that greedy decoding answers wrong (the exactness test of Validation), and every one
found wrong in an earlier round (fixing one question can break its rival), are trained on, each
FIX_REPEAT times among FIX_OTHERS times as many (at least FIX_MIN_OTHERS) other training
entries so that what is right stays right, at FIX_LR_SCALE times the schedule's final rate;
after each such round every question is checked again, until none is wrong or N steps are
spent; the weights of the round with the fewest misses are kept (the latest among equals). The
step count and the schedule are untouched (a later resume sees a finished run); train_log.json
records the misses before and after, the rounds and the questions still wrong. It also runs
after an early stop, not after a stop by time or signal (resume the run to finish it first).
Why: a corpus of thousands of short questions leaves a few dozen wrong after a schedule that
fits the rest (keyword questions that two answers fit, a command next to its explanation), and
more epochs for all of them move the misses around at the cost of a whole run.

Time. After the first step of a session, ESTIMATE_STEPS steps are timed and the remaining and
total time printed (and kept in the progress bar, which shows only on a terminal; otherwise a
line every 5 % of the steps). ``max_minutes=M`` stops after M minutes of this session's
training; SIGINT (Ctrl-C) and SIGTERM stop after the current step. Every such stop writes the
checkpoint and a usable model (config, weights, tokenizer, log, plots) of where the run is.

Continuing. ``resume=True`` picks up the checkpoint: with the same arguments it finishes the
planned run bit for bit; with a larger ``epochs`` (or ``max_steps``) it continues a finished or
stopped run for more steps - the learning-rate schedule is then the new run's (cosine over the
new total, so the rate rises from where the old schedule had taken it; that is the price of
not knowing the length in advance).

Device. ``device="auto"`` trains on a CUDA (or Apple MPS) GPU when torch sees one, else the CPU.
``threads``: torch's CPU threads (see TrainConfig for why 1).

Outputs in out_dir: ``model.safetensors`` + ``config.json`` (``save_pretrained``),
``tokenizer.json`` (copied, so ``tinygpt convert out_dir`` works directly), ``loss.png``
(loss per step and smoothed), ``val.png`` (validation accuracy and loss, with a validation
set), ``best/`` (with a validation set) and ``train_log.json`` (args, steps, why it stopped,
final loss, validation history and best, wall time, tokens/s, versions, loss per step).

Defaults (hw1 preset, the project's corpus of 1000 entries: ~40 tokens per entry, ~380 blocks
of 128 tokens per epoch, 24 steps per epoch at batch 16, ~1.3 s per step on 2 CPU cores):
epochs 50 (~1200 steps, ~26 min), lr 2e-3, dropout 0.1; see TrainConfig for the measurements.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from . import corpus as corpus_mod
from .modelfile import sha256_file
from .ui import quiet_hf

LOSSES = ("all", "answer")
DEVICES = ("auto", "cpu", "cuda", "mps")
ARCHS = ("gpt2", "llama")
SCHEDULES = ("cosine", "linear")
ESTIMATE_STEPS = 3   # steps timed (after the first) for the time estimate
TIME_FIT_SHARE = 0.93  # of --max-minutes planned for steps; the rest: the final validation, saving
TIME_FIT_MARGIN = 1.05  # seconds per step planned, over the measured ones (validations come on top)
BEST_DIR = "best"    # the model of the best validation, save_pretrained layout

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "checkpoint.pt"
# Files that say a directory holds a training run.
RUN_MARKERS = ("train_log.json", "config.json", "model.safetensors", CHECKPOINT_DIR)


# --fix-misses: each missed question FIX_REPEAT times per round, among FIX_OTHERS times as many
# other training entries; FIX_SEED separates its random draws from the epochs' orders.
# At the schedule's final rate, or training only on the current misses, each round broke about as
# many questions as it fixed (measured: 51 -> 75 -> 46 -> 62 -> 74 misses); a tenth of that rate
# on every question found wrong so far converged (51 -> 27 -> 11 -> ... -> 1 in 150 steps).
# A round has at least FIX_MIN_OTHERS other entries (~13 steps): checking every question of a
# 6,628-question corpus costs as much as ~45 steps, so a round of 1 step per check would crawl.
FIX_REPEAT, FIX_OTHERS, FIX_MIN_OTHERS, FIX_SEED, FIX_LR_SCALE = 4, 3, 600, 7_919, 0.1


def tokenizer_path(tokenizer_dir) -> Path:
    """tokenizer.json inside tokenizer_dir (or tokenizer_dir itself if it is the file)."""
    p = Path(tokenizer_dir)
    return p if p.is_file() else p / "tokenizer.json"


# ----------------------------------------------------------------------------- packing

def pack(token_lists, order, n_positions: int, eos_id: int, answer_starts=None):
    """Greedily pack whole entries (token id lists, taken in ``order``) into blocks of
    n_positions tokens. Returns numpy arrays [n_blocks, n_positions]: input_ids (int64, padding
    = eos_id), targets (next token inside the same entry, else -100), position_ids (restart at
    0 for each entry and for the padding), segments (entry number in the block; padding gets its
    own), ``real`` (bool: not padding), ``entry`` (the entry's index into token_lists, -1 for
    padding) and ``answer`` (bool: the target is an answer token or the entry's final
    <|endoftext|>; ``answer_starts[i]`` is the position in entry i whose target is the first
    answer token, i.e. prompt length - 1, or None for an entry without an answer)."""
    blocks: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        n = len(token_lists[i])
        if n > n_positions:
            raise ValueError(f"entry {i} is {n} tokens, longer than the block of {n_positions}")
        if sum(len(token_lists[j]) for j in cur) + n > n_positions:
            blocks.append(cur)
            cur = []
        cur.append(i)
    if cur:
        blocks.append(cur)
    B = len(blocks)
    ids = np.full((B, n_positions), eos_id, dtype=np.int64)
    tgt = np.full((B, n_positions), -100, dtype=np.int64)
    pos = np.zeros((B, n_positions), dtype=np.int64)
    seg = np.zeros((B, n_positions), dtype=np.int64)
    real = np.zeros((B, n_positions), dtype=bool)
    entry = np.full((B, n_positions), -1, dtype=np.int64)
    answer = np.zeros((B, n_positions), dtype=bool)
    for b, members in enumerate(blocks):
        at = 0
        for s, i in enumerate(members):
            t = token_lists[i]
            n = len(t)
            ids[b, at:at + n] = t
            tgt[b, at:at + n - 1] = t[1:]
            pos[b, at:at + n] = np.arange(n)
            seg[b, at:at + n] = s
            real[b, at:at + n] = True
            entry[b, at:at + n] = i
            if answer_starts is not None and answer_starts[i] is not None:
                answer[b, at + answer_starts[i]:at + n - 1] = True
            at += n
        pos[b, at:] = np.arange(n_positions - at)
        seg[b, at:] = len(members)
    return {"input_ids": ids, "targets": tgt, "position_ids": pos, "segments": seg, "real": real,
            "entry": entry, "answer": answer}


def count_blocks(token_lists, order, n_positions: int) -> int:
    """Number of blocks pack() makes (without building them)."""
    n_blocks, fill = 0, n_positions + 1
    for i in order:
        n = len(token_lists[i])
        if fill + n > n_positions:
            n_blocks, fill = n_blocks + 1, 0
        fill += n
    return n_blocks


def epoch_order(n_entries: int, seed: int, epoch: int) -> np.ndarray:
    """The entry order of an epoch: depends only on (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n_entries)


def attention_mask(segments):
    """Additive float mask [B, 1, T, T]: 0 where a token may attend (same segment, not in the
    future), the float32 minimum elsewhere."""
    import torch

    seg = torch.as_tensor(segments)
    T = seg.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    allowed = (seg[:, :, None] == seg[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=torch.float32)
    mask.masked_fill_(~allowed, torch.finfo(torch.float32).min)
    return mask[:, None]


# ----------------------------------------------------------------------------- checkpoints

def _rng_states():
    import torch

    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": (name, keys.tolist(), int(pos), int(has_gauss), float(cached)),
            "python": random.getstate()}


def _set_rng_states(st):
    import torch

    torch.set_rng_state(st["torch"])
    name, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def save_checkpoint(out_dir, state: dict) -> Path:
    """Write out_dir/checkpoint/checkpoint.pt atomically."""
    import torch

    d = Path(out_dir) / CHECKPOINT_DIR
    d.mkdir(parents=True, exist_ok=True)
    final = d / CHECKPOINT_FILE
    tmp = d / (CHECKPOINT_FILE + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    try:  # make the rename itself durable
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - not every platform can fsync a directory
        pass
    return final


def load_checkpoint(out_dir):
    """The checkpoint dict of out_dir, or None if it has none."""
    import torch

    p = Path(out_dir) / CHECKPOINT_DIR / CHECKPOINT_FILE
    if not p.is_file():
        return None
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and I/O errors of a cut or overwritten file all land here
        raise ValueError(f"cannot resume: the checkpoint {p} is damaged ({type(e).__name__}: {e}). It cannot be "
                         f"repaired: start the run again in another directory (-o NEW_DIR), or delete {out_dir} and "
                         f"start it there (without --resume)") from None
    keys = ("identity", "step", "model", "optimizer", "scheduler", "rng", "epoch", "batch_in_epoch", "losses",
            "elapsed", "tokens", "real_tokens")
    missing = [k for k in keys if not isinstance(ckpt, dict) or k not in ckpt]
    bad = [] if missing else [k for k, ok in (
        ("identity", isinstance(ckpt["identity"], dict)), ("losses", isinstance(ckpt["losses"], list)),
        *((k, isinstance(ckpt[k], int) and not isinstance(ckpt[k], bool) and ckpt[k] >= 0)
          for k in ("step", "epoch", "batch_in_epoch", "tokens", "real_tokens"))) if not ok]
    if missing or bad:
        what = f"it lacks {', '.join(missing)}" if missing else f"it has a bad {', '.join(bad)}"
        raise ValueError(f"cannot resume: the checkpoint {p} is not a tinygpt training checkpoint ({what}); start "
                         f"the run again in another directory (-o NEW_DIR), or delete {out_dir} and start it there")
    return ckpt


# ----------------------------------------------------------------------------- plots

def _smooth(values, half_window=None):
    """Centered moving average (no lag); the window shrinks at the ends. Default half window:
    1% of the steps, at least 1."""
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    if n == 0:
        return v
    h = max(1, n // 100) if half_window is None else half_window
    c = np.concatenate([[0.0], np.cumsum(v)])
    i = np.arange(n)
    lo, hi = np.maximum(0, i - h), np.minimum(n, i + h + 1)
    return (c[hi] - c[lo]) / (hi - lo)


def plot_loss(losses, path, title="training loss"):
    """loss.png: the loss of every step and its moving average (matplotlib Agg, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, lw=0.7, alpha=0.4, label="loss per step")
    ax.plot(steps, _smooth(losses), lw=1.8, label=f"moving average ({2 * max(1, len(losses) // 100) + 1} steps)")
    if losses and min(losses) > 0:
        from matplotlib.ticker import FuncFormatter, NullFormatter

        ax.set_yscale("log")
        # plain numbers on the log axis ("6", "0.5"), not matplotlib's default "6x10^0"; the
        # 2..9 ticks get numbers too unless the losses span more than 30x (they would crowd)
        plain = FuncFormatter(lambda v, _pos: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain if max(losses) / min(losses) < 30 else NullFormatter())
    ax.set_xlabel("step")
    ax.set_ylabel("cross entropy (nats/token)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.fspath(path))


# ----------------------------------------------------------------------------- validation

def split_validation(entries, fraction, seed):
    """(training entries, validation entries): for every answer with k >= 2 phrasings (grouped
    by answer text, whitespace-normalized) min(k - 1, max(1, round(k * fraction))) phrasings,
    drawn with numpy ``default_rng([seed, 1])``, go to validation; answers with one phrasing and
    prose stay in training. Both lists keep the corpus order."""
    if not (isinstance(fraction, (int, float)) and 0.0 < fraction < 1.0):
        raise ValueError(f"--val-split must be a fraction between 0 and 1 (e.g. 0.25), got {fraction!r}")
    groups: dict[str, list[int]] = {}
    for i, e in enumerate(entries):
        if e.kind != "prose":
            groups.setdefault(" ".join(e.target.split()), []).append(i)
    rng = np.random.default_rng([seed, 1])
    held = set()
    for members in groups.values():
        k = len(members)
        if k < 2:
            continue
        n_val = min(k - 1, max(1, int(math.floor(k * fraction + 0.5))))
        held.update(members[j] for j in rng.choice(k, size=n_val, replace=False))
    return ([e for i, e in enumerate(entries) if i not in held], [e for i, e in enumerate(entries) if i in held])


def answer_starts(tok, entries):
    """Per entry, the position whose next-token target is the first answer token: the length of
    the prompt "Q: {question}\\nA:" in tokens, minus 1 (None for prose). The prompt's tokens are
    a prefix of the entry's (the tokenizer's Q:/A: are added tokens); checked."""
    out = []
    prompts = [corpus_mod.prompt(e.question) for e in entries if e.kind != "prose"]
    encoded = iter(tok.encode_batch(prompts, add_special_tokens=False)) if prompts else iter(())
    for e in entries:
        out.append(None if e.kind == "prose" else len(next(encoded).ids) - 1)
    return out


def plot_validation(history, path, title="validation"):
    """val.png: validation exact-answer accuracy and validation loss per evaluation."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    fixed = [h for h in history if h.get("after_fix")]  # after --fix-misses: same step, drawn apart
    history = [h for h in history if not h.get("after_fix")]
    steps = [h["step"] for h in history]
    ax.plot(steps, [100.0 * h["val_exact"] for h in history], "o-", color="tab:green", label="exact answers (%)")
    if fixed:
        ax.plot([h["step"] for h in fixed], [100.0 * h["val_exact"] for h in fixed], "*", color="tab:blue",
                markersize=12, label=f"exact answers after --fix-misses ({fixed[-1]['val_exact_count']})")
    ax.set_xlabel("step")
    ax.set_ylabel("validation exact answers (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(steps, [h["val_loss"] for h in history], "s--", color="tab:red", label="loss (answer tokens)")
    ax2.set_ylabel("validation loss (nats/answer token)")
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [ln.get_label() for ln in lines], loc="center right")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(os.fspath(path))


# ----------------------------------------------------------------------------- training

def resolve_device(device):
    """'auto' -> 'cuda' if torch sees a CUDA GPU, else 'mps' if available, else 'cpu'. Asking for
    a device torch does not see is an error."""
    import torch

    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA GPU (torch %s)" % torch.__version__)
    if device == "mps" and not has_mps:
        raise ValueError("--device mps: torch sees no Apple GPU (MPS)")
    return device


def _plural(n, word, plural=None):
    return f"{n} {word}" if n == 1 else f"{n} {plural or word + 's'}"


def _minutes(seconds):
    return f"{seconds / 60:.1f} min" if seconds < 5940 else f"{seconds / 3600:.2f} h"


class _StopSignals:
    """Turn SIGINT (Ctrl-C) and SIGTERM into a flag the loop checks after each step, so the run
    stops with a checkpoint; a second signal interrupts at once (the last checkpoint, written
    atomically, stays intact). Only in the main thread; handlers restored on exit."""

    def __enter__(self):
        import signal
        import threading

        self.received = None
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        import signal

        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)


def check_disk_space(out_dir, n_params, with_best=False):
    """Refuse (ValueError) before the first step when out_dir's disk cannot hold what the run
    writes: the checkpoint (float32 weights + AdamW's two moments, 12 bytes a parameter) twice
    while it is replaced atomically, model.safetensors and, with validation, best/ (4 bytes a
    parameter each). What an earlier run left there is counted as free: it is replaced."""
    need = n_params * (12 * 2 + 4 + (4 if with_best else 0))
    out_dir = Path(out_dir)
    old = sum(f.stat().st_size for f in (out_dir / CHECKPOINT_DIR / CHECKPOINT_FILE, out_dir / "model.safetensors",
                                         out_dir / BEST_DIR / "model.safetensors") if f.is_file())
    free = shutil.disk_usage(out_dir).free
    if free + old < need:
        raise ValueError(f"not enough disk space for the run in {out_dir}: it writes about {need / 1e6:.0f} MB "
                         f"(checkpoint, model" + (", best/" if with_best else "") + f"), and the disk has "
                         f"{free / 1e6:.0f} MB free; free some space or train into a directory on another disk")


def check_threads(threads, flag="--threads"):
    """torch's CPU threads: an int from 1 to 4 x this machine's CPUs (torch crashed with a
    segmentation fault at 100,000 instead of refusing). None = every CPU."""
    if threads is None:
        return
    _need_int(flag, threads, 1)
    most = 4 * (os.cpu_count() or 1)
    if threads > most:
        raise ValueError(f"{flag} {threads} is more than this machine can use: at most {most} (4 x its "
                         f"{os.cpu_count() or 1} CPUs)")


def _need_int(name, v, lo, allow_none=False):
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")


# ----------------------------------------------------------------------------- the settings
# Every setting of a run lives in TrainConfig: its default, its `tinygpt train` option and help
# text, its check, and whether resuming with another value is refused (identity). train() takes
# one, cli builds the options from it (add_arguments), train_log.json records it.
#
# Why these defaults. The recipe for a user's own corpus (issue 22, docs/recipes.md): the 8 x 256
# shape, the loss on the answer tokens, 8 programmatic variants of every question and off-topic
# questions for the abstain answer (abstain=None: as many as the corpus has questions). With
# --max-minutes the learning-rate schedule is fitted to the time (TIME_FIT_SHARE), so a time
# budget ends at the low final rate instead of in mid-schedule.
# The rate and dropout were chosen for the hw1 preset and the project's corpus (data/corpus.txt:
# 1000 entries, 217 distinct answers, ~40 tokens per entry with its 2914-token tokenizer -> 374-387
# blocks of 128 tokens, 24 steps per epoch at batch 16): 50 epochs = ~1200 steps, ~26 min at
# ~1.3 s/step on 2 cores. Measured (1 thread, shared machine, ~4.4 s/step for hw1 at 16 x 128):
#  * proxy for memorisation: 40 answers / 177 entries of the corpus at batch 2 (31 steps/epoch,
#    the same number of updates per epoch as the full run), 48 epochs = 1528 steps, lr 2e-3:
#    dropout 0.0 -> loss 7.2 (epoch 1) 1.10 (9) 0.26 (19) 0.18 (30) 0.147 (48); exact match on
#    the training questions 100% float, 100% INT8; held-out paraphrases 4/40, INT8 == float 34/40.
#    dropout 0.1 -> loss 7.2 / 1.58 / 0.38 / 0.22 / 0.158, 100% / 100% on the training questions,
#    held-out 6/40, INT8 == float 39/40. (The loss floor of ~0.15 is the question wording,
#    which cannot be predicted from "Q:"; the answers are memorised.)
#  * the full corpus at batch 16 with these defaults, first 150 steps: loss 7.65 (steps 1-10),
#    4.88 (51-60), 3.11 (141-150), i.e. the same per-step progress as the proxy (3.15); no
#    instability at lr 2e-3 with 22 layers.
# One thread: measured on this 2-core machine while other work shared it (4 layers x 128 wide,
# vocab 4096, 16 x 128 tokens per step, forward + backward + AdamW, 4 interleaved rounds of 5
# steps, nice 15): 1 thread 2.03 / 2.27 / 1.14 / 0.85 s/step, 2 threads 5.79 / 6.52 / 0.63 /
# 2.19 s/step: 2 threads won one round by 1.8x (when the other cores' load paused) and lost
# three by 2.6-2.9x. A thread that waits for a busy core stalls every step, so 1 is the safe
# default; on idle cores --threads N is faster.

def _int_from(lo, allow_none=False):
    """The check of an integer setting: an int >= lo (or None where allowed)."""
    return lambda name, v: _need_int(name, v, lo, allow_none)


def _number_in(lo, hi, lo_open=False, hi_open=False, words=None, allow_none=False):
    """The check of a number setting in [lo, hi] (either end open; hi None: no upper end)."""
    def check(name, v):
        if v is None and allow_none:
            return
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ok = ok and (v > lo if lo_open else v >= lo) and (hi is None or (v < hi if hi_open else v <= hi))
        if not ok:
            raise ValueError(f"{name} must be {words}, got {v!r}")
    return check


def _one_of(choices, words=None):
    def check(name, v):
        if v not in choices:
            raise ValueError(f"{name} must be {words or 'one of ' + ', '.join(choices)}, got {v!r}")
    return check


def _augment_count(name, v):
    from .augment import MAX_PER_QUESTION

    _need_int(name, v, 0)
    if v > MAX_PER_QUESTION:
        raise ValueError(f"{name} must be at most {MAX_PER_QUESTION}, got {v} (more variants per question "
                         f"are not distinct: a short question has only a few)")


def _setting(default, help=None, check=None, *, type=None, metavar=None, choices=None, identity=False,
             error_name=None):
    """A TrainConfig field. help=None: no `tinygpt train` option (library use only); help may be a
    function of nothing, for a text that needs a lookup. check(name, value) raises ValueError
    naming the option. identity: part of the run's identity (a resume with another value is
    refused, see IDENTITY_KEYS)."""
    return field(default=default, metadata=dict(help=help, check=check, type=type, metavar=metavar, choices=choices,
                                                identity=identity, error_name=error_name))


def _preset_help():
    from .presets import PRESETS

    return ("model size: %s (default %%(default)s; `small` trains in minutes for a first try, `tiny` is for tests "
            "only)" % ", ".join(PRESETS))


def _arch_help():
    from .presets import LLAMA_PRESETS

    return ("architecture (default %%(default)s); llama: RMSNorm, SwiGLU, rotary positions and half as many key/value "
            "heads, at about the preset's model-file size (presets %s)" % ", ".join(LLAMA_PRESETS))


def _abstain_questions_help():
    from .abstain import read_questions

    try:
        n = len(read_questions())
    except ValueError:
        n = 0
    return "off-topic questions, one per line (default: the shipped list of %d)" % n


@dataclass(frozen=True)
class TrainConfig:
    """The settings of a training run (see the module docstring); fields in `tinygpt train
    --help`'s order. ``TrainConfig(epochs=3).check()`` raises ValueError naming a bad one."""
    preset: str = _setting("d256x8", _preset_help, identity=True)
    arch: str = _setting("gpt2", _arch_help, choices=ARCHS, identity=True)  # checked with the preset
    epochs: int = _setting(10, "passes over the corpus (default %(default)s); with --resume, a larger number "
                               "continues a finished run", _int_from(1), type=int, identity=True)
    max_steps: int | None = _setting(None, "cap the total steps (default: no cap)", _int_from(1, True), type=int,
                                     identity=True)
    max_minutes: float | None = _setting(
        None, "stop after this many minutes with a checkpoint and a usable model (default: no limit)",
        _number_in(0, None, lo_open=True, words="a positive number", allow_none=True), type=float)
    lr: float = _setting(2e-3, "peak learning rate (default %(default)g)",
                         _number_in(0, None, lo_open=True, words="a positive number"), type=float, identity=True)
    batch_size: int = _setting(16, "blocks per step (default %(default)s)", _int_from(1), type=int, identity=True)
    dropout: float = _setting(0.1, "dropout (default %(default)g)",
                              _number_in(0.0, 1.0, hi_open=True, words="in [0, 1)"), type=float, identity=True)
    weight_decay: float = _setting(0.01, "AdamW weight decay on matrices and embeddings (default %(default)g)",
                                   _number_in(0, None, words=">= 0"), type=float, identity=True)
    label_smoothing: float = _setting(0.0, "label smoothing of the cross entropy (default %(default)g)",
                                      _number_in(0.0, 1.0, hi_open=True, words="in [0, 1)"), type=float,
                                      identity=True)
    loss: str = _setting("answer", "train on all tokens or on the answer tokens only (default %(default)s)",
                         _one_of(LOSSES), choices=LOSSES, identity=True)
    val_split: float | None = _setting(
        None, "hold out this fraction of the phrasings of every answer (e.g. 0.25) and report validation loss and "
              "exact answers as it trains; best model in RUN_DIR/best (default: no validation)",
        type=float, metavar="F", identity=True)
    val_file: str | None = _setting(
        None, "validate on the questions of this corpus-format file instead of a split (default: none)")
    val_every: int | None = _setting(None, "validate every N steps (default: once per epoch)", _int_from(1, True),
                                     type=int)
    early_stop: int | None = _setting(None, "stop after N validations without a better one (default: off)",
                                      _int_from(1, True), type=int, metavar="N")
    augment: int = _setting(8, "add N variants of every training question (as `tinygpt corpus augment`; after "
                               "--val-split, so held-out questions do not leak) (default %(default)s)",
                            _augment_count, type=int, metavar="N", identity=True)
    abstain: int | None = _setting(
        None, "train N off-topic questions (from --abstain-questions, those unlike the corpus) with the corpus's "
              "Abstain: answer, so that the model says it does not know; 0: none (default: as many as the corpus "
              "has questions, at most the list's)", _int_from(0, True), type=int, metavar="N")
    abstain_questions: str | None = _setting(None, _abstain_questions_help, metavar="FILE")
    fix_misses: int = _setting(0, "after the planned steps, up to N more steps on the training questions greedy "
                                  "decoding still answers wrong, mixed with others, until none is (works with "
                                  "--resume on a finished run) (default %(default)s: off)",
                               _int_from(0), type=int, metavar="N")
    seed: int = _setting(1337, "random seed (default %(default)s)", _int_from(0), type=int, identity=True)
    checkpoint_every: int | None = _setting(  # a hw1 checkpoint is 75 MB (weights + AdamW moments)
        100, "steps between checkpoints; 0 = only at the end (default %(default)s)", _int_from(0, True), type=int)
    device: str = _setting("auto", "auto: a GPU when torch sees one, else the CPU (default %(default)s)",
                           _one_of(DEVICES), choices=DEVICES)
    threads: int | None = _setting(
        1, "CPU threads (default %(default)s: on a 2-core machine shared with other work, 2 threads measured "
           "2.6-3x slower; raise it on idle cores); --resume bit for bit needs the same",
        lambda name, v: check_threads(v, name), type=int)
    resume: bool = _setting(False, "continue the run in --output from its checkpoint (same arguments; a larger "
                                   "--epochs or --max-steps trains further)")
    # library settings, no option
    warmup_steps: int | None = _setting(None, check=_int_from(0, True), identity=True)  # None: 5% of the steps, <= 100
    min_lr_ratio: float = _setting(0.1, check=_number_in(0.0, 1.0, words="in [0, 1]"), identity=True,
                                   error_name="min_lr_ratio")
    schedule: str = _setting("cosine", check=_one_of(SCHEDULES, "'cosine' or 'linear'"), identity=True,
                             error_name="schedule")

    def check(self):
        """ValueError naming the first bad setting; run before torch is imported, so a mistake is
        reported in a fraction of a second."""
        for f in fields(self):
            if f.metadata["check"] is not None:
                f.metadata["check"](option_name(f), getattr(self, f.name))
        from .presets import preset_hparams

        preset_hparams(self.preset, self.arch)  # ValueError names an unknown preset or architecture
        if self.val_split is not None and self.val_file is not None:
            raise ValueError("give --val-split or --val-file, not both")
        if self.early_stop is not None and self.val_split is None and self.val_file is None:
            raise ValueError("early stopping needs a validation set: add --val-split F or --val-file FILE")
        return self


def option_name(f) -> str:
    """The name a setting has in messages: its option, --max-steps for max_steps."""
    return f.metadata["error_name"] or "--" + f.name.replace("_", "-")


# The run's identity: the settings that must be equal to resume a run (everything that changes the
# numbers), plus what is derived from the files. epochs, max_steps and warmup_steps may grow.
IDENTITY_KEYS = (("corpus_sha256", "tokenizer_sha256", "config")
                 + tuple(f.name for f in fields(TrainConfig) if f.metadata["identity"])
                 + ("val_file_sha256", "abstain", "abstain_sha256", "abstain_answer"))
GROWING_KEYS = ("epochs", "max_steps", "warmup_steps")


# ----------------------------------------------------------------------------- the command

def add_arguments(p):
    """`tinygpt train`'s options, one for every TrainConfig setting that has a help text."""
    p.description = ("Train a model on a corpus. Prints the plan and, after a few steps, the measured time per step and "
                     "the expected total. Ctrl-C stops with a checkpoint and a usable model; --resume continues.")
    p.add_argument("corpus")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory (from `tinygpt tokenizer train`)")
    p.add_argument("-o", "--output", required=True, help="run directory (Hugging Face save_pretrained layout)")
    for f in fields(TrainConfig):
        m = f.metadata
        if m["help"] is None:
            continue
        help_text = m["help"]() if callable(m["help"]) else m["help"]
        if isinstance(f.default, bool):
            p.add_argument(option_name(f), action="store_true", help=help_text)
            continue
        kw = {k: m[k] for k in ("type", "metavar", "choices") if m[k] is not None}
        p.add_argument(option_name(f), default=f.default, help=help_text, **kw)


def run_cli(args):
    from .ui import existing_file

    settings = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.metadata["help"] is not None}
    if args.abstain_questions:
        settings["abstain_questions"] = existing_file(args.abstain_questions, "off-topic question list")
    res = train(args.corpus, args.tokenizer, args.output, TrainConfig(**settings))
    if res.get("stopped") in ("SIGINT", "SIGTERM"):
        sys.exit(130 if res["stopped"] == "SIGINT" else 143)


# ----------------------------------------------------------------------------- the run, in stages
# train() calls these in order: load_entries, load_tokenizer, tokenize, make_plan, check_out_dir,
# then (torch from here on) build_config, check_resume, Trainer (model, optimizer, schedule;
# restore), Trainer.loop, Trainer.fix_misses, Trainer.write_outputs.

@dataclass
class TrainData:
    """What the corpus gives the run: its entries (with the off-topic and augmented ones) as
    token lists, the validation and --fix-misses questions, the tokenizer and the abstain
    answer and word index the model file will carry."""
    corpus: Path
    entries: list
    val_entries: list
    fit_entries: list               # the corpus's own questions: what --fix-misses answers exactly
    abstain_text: str
    n_abstain: int = 0
    abstain_sha: str | None = None
    known_words: str | None = None  # py/topic.py's check on the board
    retrieval_index: dict | None = None
    augment_counts: dict | None = None
    val_file: Path | None = None
    tok: object = None
    tok_file: Path | None = None
    vocab_size: int = 0
    eos_id: int = 0
    T: int = 0                      # the context (n_positions)
    token_lists: list = field(default_factory=list)
    starts: list = field(default_factory=list)
    val_lists: list = field(default_factory=list)
    val_starts: list = field(default_factory=list)
    fit_lists: list = field(default_factory=list)
    fit_starts: list = field(default_factory=list)


def load_entries(cfg: TrainConfig, corpus, log) -> TrainData:
    """The corpus checked and parsed; the validation questions; the off-topic questions for the
    abstain answer; the word index for py/retrieve.py; the augmented variants."""
    corpus = Path(corpus)
    if not corpus.is_file():
        raise ValueError(f"corpus not found: {corpus}")
    problems = corpus_mod.check(corpus)
    if problems:
        shown = "\n".join(f"  {corpus}:{p.line}: {p.message}" for p in problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ValueError(f"corpus {corpus} has {_plural(len(problems), 'problem')}; fix them first "
                         f"(tinygpt corpus check {corpus}):\n{shown}{more}")
    entries, repeated = corpus_mod.keep_first_answers(corpus_mod.parse(corpus))
    for pr in repeated:
        log(f"warning: {corpus}:{pr.line}: {pr.message}")
    if not entries:
        raise ValueError(f"corpus {corpus} has no entries")
    val_entries, val_file = [], None
    if cfg.val_split is not None:
        entries, val_entries = split_validation(entries, cfg.val_split, cfg.seed)
        if not val_entries:
            raise ValueError(f"--val-split {cfg.val_split}: no answer of {corpus} has two phrasings, so no question "
                             f"can be held out; use --val-file FILE")
    elif cfg.val_file is not None:
        val_file = Path(cfg.val_file)
        if not val_file.is_file():
            raise ValueError(f"validation file not found: {val_file}")
        val_entries = [e for e in corpus_mod.parse(val_file) if e.kind != "prose"]
        if not val_entries:
            raise ValueError(f"validation file {val_file} has no Q/A or Q/Do entries")
    data = TrainData(corpus=corpus, entries=entries, val_entries=val_entries, val_file=val_file,
                     fit_entries=[e for e in entries if e.kind != "prose"],
                     abstain_text=corpus_mod.abstain_answer(corpus))
    if cfg.abstain != 0:
        add_off_topic(cfg, data, log)
    data.retrieval_index = retrieval_index(data, log)
    if cfg.augment:
        from . import augment as augment_mod

        extra, data.augment_counts = augment_mod.augment_entries(data.entries, cfg.augment, cfg.seed)
        data.entries = data.entries + extra
    return data


def add_off_topic(cfg, data, log):
    """Off-topic questions answered with the abstain answer, and the corpus's content words."""
    from . import abstain as abstain_mod

    want = len(data.fit_entries) if cfg.abstain is None else cfg.abstain
    off_topic, n_on_topic = abstain_mod.off_topic_entries(data.entries, data.abstain_text, want, cfg.seed,
                                                           cfg.abstain_questions)
    data.n_abstain = len(off_topic)
    data.known_words = abstain_mod.known_words(data.entries)
    if len(data.known_words.encode("utf-8")) > abstain_mod.MAX_KNOWN_WORDS_BYTES:
        log(f"abstain: the corpus has {len(data.known_words.split())} distinct content words, more than the model "
            f"file's meta section holds; the model alone decides when to abstain")
        data.known_words = None
    data.abstain_sha = sha256_file(cfg.abstain_questions or abstain_mod.QUESTIONS_FILE)
    log(f"abstain: {data.n_abstain} off-topic questions answered with {data.abstain_text!r} "
        f"({n_on_topic} of the list left out as on-topic for this corpus)")
    data.entries = data.entries + off_topic


def retrieval_index(data, log):
    """The corpus answers and their words, for py/retrieve.py's check of the model's answers on
    the board (not the off-topic entries: their answer is the abstain answer, which it knows
    apart). None for a corpus of prose only, or one whose index the meta section cannot hold
    (found now, not by convert after the training)."""
    from . import modelfile, retrieval

    if not data.fit_entries:
        return None
    index = retrieval.index_meta(data.fit_entries)
    size = sum(len(f"{k}: {v}\n".encode("utf-8")) for k, v in index.items())
    size += len((data.known_words or "").encode("utf-8")) + 400  # + the word list and the abstain answer
    if size > modelfile.MAX_META_BYTES:
        log(f"retrieval: the corpus's word index ({size:,} bytes with the word list) is more than the model "
            f"file's meta section holds ({modelfile.MAX_META_BYTES:,}); answers are not checked against it")
        return None
    return index


def load_tokenizer(cfg, data, tokenizer_dir, log):
    """The tokenizer of tokenizer_dir, checked against the corpus's special tokens and the preset."""
    from tokenizers import Tokenizer

    from .presets import preset_hparams

    tok_file = tokenizer_path(tokenizer_dir)
    if not tok_file.is_file():
        raise ValueError(f"tokenizer not found: {tok_file} (make one with `tinygpt tokenizer train {data.corpus} "
                         f"-o DIR`)")
    try:
        tok = Tokenizer.from_file(str(tok_file))
    except Exception as e:
        raise ValueError(f"cannot read tokenizer {tok_file}: {e}") from None
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    eos_id = tok.token_to_id(corpus_mod.EOS)
    if eos_id is None:
        raise ValueError(f"tokenizer {tok_file} has no {corpus_mod.EOS} token")
    for special in (corpus_mod.Q_PREFIX, corpus_mod.A_PREFIX, corpus_mod.DO_PREFIX):
        if tok.token_to_id(special) is None:
            log(f"warning: tokenizer {tok_file} has no {special!r} token; the engine's stop rules need it")
    preset_hp = preset_hparams(cfg.preset, cfg.arch)
    preset_vocab = preset_hp.get("vocab_size")
    if preset_vocab is not None and vocab_size > preset_vocab:
        raise ValueError(f"tokenizer {tok_file} has {vocab_size} tokens but preset {cfg.preset!r} is sized for "
                         f"{preset_vocab}; train the tokenizer with `--vocab-size {preset_vocab}` or pick another "
                         f"preset")
    data.tok, data.tok_file, data.vocab_size, data.eos_id = tok, tok_file, vocab_size, eos_id
    data.T = preset_hp["n_positions"]


def tokenize(cfg, data, log):
    """Token ids of every entry (training, validation, and the questions --fix-misses checks);
    off-topic questions too long for the context left out; --loss answer leaves out prose."""
    tok, T = data.tok, data.T

    def ids_of(ents, where):
        lists = [enc.ids for enc in tok.encode_batch(corpus_mod.training_texts(ents), add_special_tokens=False)]
        for e, ids in zip(ents, lists):
            if len(ids) > T:
                raise ValueError(f"{where}:{e.line}: {e.kind} entry is {len(ids)} tokens, longer than the "
                                 f"context of {T} (n_positions of preset {cfg.preset!r}); shorten it")
            if not ids or ids[-1] != data.eos_id:
                raise ValueError(f"{where}:{e.line}: entry does not end with the {corpus_mod.EOS} token once "
                                 f"tokenized; is {corpus_mod.EOS} a special token of {data.tok_file}?")
        return lists

    # off-topic questions (line 0, augmented variants too) that do not fit the context are left out
    off = [e for e in data.entries if e.line == 0]
    too_long = {id(e) for e, enc in zip(off, tok.encode_batch(corpus_mod.training_texts(off), add_special_tokens=False))
                if len(enc.ids) > T}
    if too_long:
        data.entries = [e for e in data.entries if id(e) not in too_long]
    data.token_lists = ids_of(data.entries, data.corpus)
    data.starts = answer_starts(tok, data.entries)
    data.val_lists = ids_of(data.val_entries, data.val_file or data.corpus)
    data.val_starts = answer_starts(tok, data.val_entries)
    data.fit_lists = ids_of(data.fit_entries, data.corpus) if cfg.fix_misses else []
    data.fit_starts = answer_starts(tok, data.fit_entries) if cfg.fix_misses else []
    if cfg.loss == "answer":
        keep = [i for i, s in enumerate(data.starts) if s is not None]
        if len(keep) < len(data.entries):
            log(f"--loss answer: {_plural(len(data.entries) - len(keep), 'prose entry', 'prose entries')} left out "
                f"(no answer to learn)")
        data.entries, data.token_lists, data.starts = ([data.entries[i] for i in keep],
                                                       [data.token_lists[i] for i in keep],
                                                       [data.starts[i] for i in keep])
        if not data.entries:
            raise ValueError(f"--loss answer: corpus {data.corpus} has no Q/A or Q/Do entries")


@dataclass
class TrainPlan:
    """Steps per epoch (packing depends on the epoch's order), the total and the run's identity."""
    steps_per_epoch: list
    total_steps: int
    val_every: int
    identity: dict


def make_plan(cfg, data) -> TrainPlan:
    n = len(data.entries)
    steps_per_epoch = [math.ceil(count_blocks(data.token_lists, epoch_order(n, cfg.seed, ep), data.T) / cfg.batch_size)
                       for ep in range(cfg.epochs)]
    total = sum(steps_per_epoch) if cfg.max_steps is None else min(cfg.max_steps, sum(steps_per_epoch))
    identity = {"corpus_sha256": sha256_file(data.corpus), "tokenizer_sha256": sha256_file(data.tok_file)}
    for f in fields(cfg):
        if f.metadata["identity"]:
            v = getattr(cfg, f.name)
            identity[f.name] = float(v) if f.metadata["type"] is float and v is not None else v
    identity.update(n_positions=data.T,
                    val_file_sha256=sha256_file(data.val_file) if data.val_file is not None else None,
                    abstain=data.n_abstain, abstain_sha256=data.abstain_sha, abstain_answer=data.abstain_text)
    return TrainPlan(steps_per_epoch, total, steps_per_epoch[0] if cfg.val_every is None else cfg.val_every, identity)


def check_out_dir(out_dir, resume) -> Path:
    """out_dir: a fresh directory, or the same run to resume."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output {out_dir} exists and is not a directory")
    markers = [m for m in RUN_MARKERS if (out_dir / m).exists()]
    if not resume and markers:
        raise ValueError(f"{out_dir} already holds a training run ({', '.join(markers)}); add --resume to "
                         f"continue it, or choose another output directory")
    if resume and markers and not (out_dir / CHECKPOINT_DIR / CHECKPOINT_FILE).is_file():
        raise ValueError(f"cannot resume: {out_dir} holds a run ({', '.join(markers)}) but no checkpoint "
                         f"({CHECKPOINT_DIR}/{CHECKPOINT_FILE})")
    # the first checkpoint comes after checkpoint_every steps: a folder that cannot be written is
    # refused now, not then
    there = out_dir.absolute()
    while not there.exists():
        there = there.parent
    if not there.is_dir():
        raise ValueError(f"output {out_dir}: {there} is a file, not a folder; choose another output directory")
    if not os.access(there, os.W_OK | os.X_OK):
        raise ValueError(f"output {out_dir}: cannot write in {there} (permission denied); choose another "
                         f"output directory")
    return out_dir


def build_config(cfg, data, plan):
    """The Hugging Face config of the preset, sized to the tokenizer; it carries the abstain
    answer and the word index into config.json, where convert finds them."""
    from .presets import make_config

    config = make_config(cfg.preset, cfg.arch, vocab_size=data.vocab_size, bos_token_id=data.eos_id,
                         eos_token_id=data.eos_id, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
                         attn_pdrop=cfg.dropout)
    if data.n_abstain:  # save_pretrained keeps them in config.json; convert writes them to the model file
        config.abstain_answer = data.abstain_text
        config.abstain_known_words = data.known_words
    config.retrieval_index = data.retrieval_index
    plan.identity["config"] = {k: v for k, v in sorted(config.to_dict().items())
                               if k not in ("transformers_version", "dtype", "torch_dtype",
                                            "retrieval_index")}  # derived from the corpus, whose hash is in it
    return config


def check_resume(cfg, out_dir, plan, log):
    """With --resume: the checkpoint of out_dir, refused when it is of another run (its identity
    differs) or beyond the plan; a run fitted to --max-minutes keeps its fitted schedule. Sets the
    plan's warmup and total steps. Returns (checkpoint or None, the old total when extended)."""
    identity = plan.identity
    ckpt, extended_from, warmup_steps = None, None, cfg.warmup_steps
    if cfg.resume:
        ckpt = load_checkpoint(out_dir) if out_dir.is_dir() else None
        if ckpt is not None:
            old = dict(ckpt["identity"])
            if "abstain" not in old and identity["abstain"] == 0:  # a run from before abstention, resumed
                old.update(abstain=0, abstain_sha256=None, abstain_answer=identity["abstain_answer"])  # with --abstain 0
            old.setdefault("arch", "gpt2")  # a run from before Llama
            diff = [k for k in IDENTITY_KEYS if k not in GROWING_KEYS and old.get(k) != identity.get(k)]
            if warmup_steps is not None and old.get("warmup_steps") != warmup_steps:
                diff.append("warmup_steps")
            if diff:
                raise ValueError(f"cannot resume {out_dir}: the checkpoint is from a different run "
                                 f"({_identity_diff(diff, old, identity)})")
            if ckpt["step"] > plan.total_steps:
                raise ValueError(f"cannot resume {out_dir}: its checkpoint is at step {ckpt['step']}, beyond the "
                                 f"{plan.total_steps} steps of --epochs {cfg.epochs}"
                                 + (f" --max-steps {cfg.max_steps}" if cfg.max_steps else "") + "; give more")
            warmup_steps = old["warmup_steps"] if warmup_steps is None else warmup_steps
            if old.get("planned_steps") == plan.total_steps:  # fitted to --max-minutes: finish that schedule
                plan.total_steps = old["total_steps"]
                identity["planned_steps"] = old["planned_steps"]
            if old.get("total_steps", plan.total_steps) != plan.total_steps:
                extended_from = old.get("total_steps")
        else:
            log(f"no checkpoint in {out_dir}: starting a new run")
    if warmup_steps is None:
        warmup_steps = min(100, max(1, plan.total_steps // 20))
    identity["warmup_steps"] = warmup_steps
    identity["total_steps"] = plan.total_steps
    return ckpt, extended_from


def _identity_diff(diff, old, identity):
    """What differs between a checkpoint's identity and this run's, as the options name it."""
    flag = {k: "--" + k.replace("_", "-") for k in IDENTITY_KEYS}
    detail = "; ".join(f"{flag.get(k, k)}: checkpoint {old.get(k)!r} vs now {identity.get(k)!r}"
                       for k in diff if k not in ("config", "corpus_sha256", "tokenizer_sha256"))
    for k, what in (("corpus_sha256", "the corpus file changed"),
                    ("tokenizer_sha256", "the tokenizer changed"), ("config", "model config differs")):
        if k in diff:
            detail = (detail + "; " if detail else "") + what
    return detail


def lr_multiplier(step, warmup_steps, total_steps, schedule, min_lr_ratio):
    """The multiplier of lr for the update number step (0-based): linear warmup, then cosine (or
    linear) decay to min_lr_ratio."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    frac = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    shape = 0.5 * (1.0 + math.cos(math.pi * frac)) if schedule == "cosine" else 1.0 - frac
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


class Trainer:
    """The model, its optimizer and schedule, and the state of the loop (step, epoch, losses,
    validations) that the checkpoint saves and restores."""

    def __init__(self, cfg, data, plan, hf_config, out_dir, device, n_threads, log, progress):
        import torch
        from transformers import AutoModelForCausalLM

        self.cfg, self.data, self.plan, self.out_dir, self.device = cfg, data, plan, out_dir, device
        self.n_threads, self.log, self.progress = n_threads, log, progress
        self.identity = plan.identity
        self.total_steps = plan.total_steps
        self.warmup_steps = plan.identity["warmup_steps"]
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.model = model = AutoModelForCausalLM.from_config(hf_config)  # GPT2LMHeadModel or LlamaForCausalLM
        model.to(device)
        model.train()
        decay = [p for name, p in model.named_parameters() if p.dim() >= 2]
        no_decay = [p for name, p in model.named_parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}],
                                           lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)

        def lr_lambda(step):  # a plain function: LambdaLR's state_dict then stores nothing of it
            return lr_multiplier(step, self.warmup_steps, self.total_steps, cfg.schedule, cfg.min_lr_ratio)

        self.lr_lambda = lr_lambda
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)
        self.n_params = sum(p.numel() for p in model.parameters())
        check_disk_space(out_dir, self.n_params, with_best=bool(data.val_entries))
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.losses: list[float] = []
        self.val_history: list[dict] = []
        self.best, self.evals_since_best = None, 0
        self.elapsed, self.tokens_seen, self.real_tokens_seen = 0.0, 0, 0
        self.resumed_from = None
        self.fixes: list[dict] = []  # one record per --fix-misses phase run on this model
        self.bar = None
        # validation data: packed once, in file order; the loss and exactness on answer tokens only
        self.val_data = (pack(data.val_lists, range(len(data.val_lists)), data.T, data.eos_id, data.val_starts)
                         if data.val_entries else None)
        self.resume_hint = f"continue with `tinygpt train ... -o {out_dir} --resume` (the same arguments)"

    # -- the checkpoint ----------------------------------------------------------------------------
    def restore(self, ckpt, extended_from):
        """Continue from a checkpoint of check_resume (bit for bit: weights, optimizer, schedule, RNGs)."""
        if ckpt is None:
            return
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            _set_rng_states(ckpt["rng"])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:  # a checkpoint edited or of
            p = self.out_dir / CHECKPOINT_DIR / CHECKPOINT_FILE                    # another model
            raise ValueError(f"cannot resume: the checkpoint {p} does not fit this run's model ({type(e).__name__}: "
                             f"{str(e)[:300]}); start the run again in another directory (-o NEW_DIR)") from None
        for group in self.optimizer.param_groups:  # the new plan's lr at this step (same unless extended)
            group["lr"] = group["initial_lr"] * self.lr_lambda(ckpt["step"])
        self.step, self.epoch, self.batch_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]
        self.losses = list(ckpt["losses"])
        self.val_history = list(ckpt.get("val_history", []))
        self.best, self.evals_since_best = ckpt.get("best"), ckpt.get("evals_since_best", 0)
        self.fixes = list(ckpt.get("fixes", []))
        self.elapsed, self.tokens_seen, self.real_tokens_seen = ckpt["elapsed"], ckpt["tokens"], ckpt["real_tokens"]
        self.resumed_from = self.step
        if extended_from is not None:
            self.log(f"continuing {self.out_dir} from step {self.step}: the run is now planned for {self.total_steps} "
                     f"steps (was {extended_from}); the learning rate follows the new schedule from here")
        else:
            self.log(f"resuming {self.out_dir} at step {self.step}/{self.total_steps} (epoch {self.epoch + 1}/"
                     f"{self.cfg.epochs})")

    def checkpoint(self):
        save_checkpoint(self.out_dir, {
            "version": 2, "identity": self.identity, "step": self.step, "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "model": {k: v.cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "rng": _rng_states(), "losses": self.losses, "elapsed": self.elapsed, "tokens": self.tokens_seen,
            "real_tokens": self.real_tokens_seen, "val_history": self.val_history, "best": self.best,
            "evals_since_best": self.evals_since_best, "fixes": self.fixes,
        })

    def save_model(self, where):
        """save_pretrained and the tokenizer into where/.saving, then each file moved into place:
        a Ctrl-C in the middle leaves no half-written model.safetensors behind."""
        where = Path(where)
        tmp = where / ".saving"
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.eval()
        with quiet_hf():
            self.model.save_pretrained(tmp)
        self.model.train()
        shutil.copyfile(self.data.tok_file, tmp / "tokenizer.json")
        for f in sorted(tmp.iterdir()):
            os.replace(f, where / f.name)
        tmp.rmdir()

    # -- one step, and the scores ----------------------------------------------------------------
    def _logits(self, packed, sl):
        import torch

        return self.model(input_ids=torch.from_numpy(packed["input_ids"][sl]).to(self.device),
                          position_ids=torch.from_numpy(packed["position_ids"][sl]).to(self.device),
                          attention_mask=attention_mask(packed["segments"][sl]).to(self.device)).logits

    def update(self, packed, sl):
        """One optimizer step on the blocks packed[sl]; returns the loss."""
        import torch

        y_np = packed["targets"][sl] if self.cfg.loss == "all" else np.where(packed["answer"][sl],
                                                                            packed["targets"][sl], -100)
        logits = self._logits(packed, sl)
        loss_t = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                                   torch.from_numpy(y_np).to(self.device).reshape(-1),
                                                   ignore_index=-100, label_smoothing=float(self.cfg.label_smoothing))
        self.optimizer.zero_grad(set_to_none=True)
        loss_t.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        return float(loss_t.item())

    def score(self, packed, n_entries):
        """(loss per answer token, wrong) over packed entries; wrong[i] is True unless the
        argmax at every answer position of entry i is the target token, i.e. unless greedy
        decoding of "Q: ...\\nA:" yields exactly the answer and then <|endoftext|>."""
        import torch

        self.model.eval()
        wrong = np.zeros(n_entries, dtype=bool)
        nll, count = 0.0, 0
        bs = self.cfg.batch_size
        with torch.no_grad():
            for s in range(0, len(packed["input_ids"]), bs):
                sl = slice(s, s + bs)
                ans = packed["answer"][sl]
                y = np.where(ans, packed["targets"][sl], -100)
                logits = self._logits(packed, sl)
                yt = torch.from_numpy(y).to(self.device)
                nll += float(torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.size(-1)), yt.reshape(-1), ignore_index=-100, reduction="sum"))
                count += int(ans.sum())
                miss = (logits.argmax(-1).cpu().numpy() != packed["targets"][sl]) & ans
                np.logical_or.at(wrong, packed["entry"][sl][miss], True)
        self.model.train()
        return nll / max(1, count), wrong

    def say(self, msg):  # a line that does not break the progress bar
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            self.log(msg)

    def validate(self, after_fix=False):
        """Loss and exact answers on the validation questions; the best so far saved in best/."""
        vl, wrong = self.score(self.val_data, len(self.data.val_lists))
        exact, nv = int((~wrong).sum()), len(self.data.val_lists)
        rec = {"step": self.step, "epoch": self.epoch + (self.batch_in_epoch > 0), "val_loss": vl,
               "val_exact": exact / nv, "val_exact_count": exact, "val_n": nv,
               "train_loss": float(np.mean(self.losses[-self.plan.val_every:]))}
        if after_fix:
            rec["after_fix"] = True
        self.val_history.append(rec)
        best = self.best
        better = best is None or (exact, -vl) > (best["val_exact_count"], -best["val_loss"])
        if better:
            self.best, self.evals_since_best = dict(rec), 0
            self.save_model(self.out_dir / BEST_DIR)
        else:
            self.evals_since_best += 1
        self.say(f"step {self.step}/{self.total_steps}{' + fixing misses' if after_fix else ''}: validation {exact}/"
                 f"{nv} exact ({100 * exact / nv:.1f} %), loss {vl:.3f}"
                 + (" (best so far)" if better
                    else f" (best {self.best['val_exact_count']}/{nv} at step {self.best['step']})"))

    # -- the loop ----------------------------------------------------------------------------------
    def report_plan(self):
        cfg, data = self.cfg, self.data
        settings = (f"lr {cfg.lr:g}, dropout {cfg.dropout:g}, loss on "
                    f"{'answer tokens' if cfg.loss == 'answer' else 'all tokens'}"
                    + (f", label smoothing {cfg.label_smoothing:g}" if cfg.label_smoothing else "")
                    + f", weight decay {cfg.weight_decay:g}, {_plural(self.n_threads, 'thread')} on {self.device}")
        self.log(f"training {cfg.preset} ({self.n_params / 1e6:.2f}M parameters, vocab {data.vocab_size}, context "
                 f"{data.T}) on {_plural(len(data.entries), 'entry', 'entries')} ({sum(map(len, data.token_lists))} "
                 f"tokens" + (f", {data.augment_counts['variants']} of them augmented variants"
                              if data.augment_counts else "") + ")"
                 + (f", validating on {len(data.val_entries)} held-out questions" if data.val_entries else "")
                 + f"; {settings}")
        spe = self.plan.steps_per_epoch
        left = self.total_steps - self.step
        self.log(f"plan: {_plural(self.total_steps, 'step')} ({_plural(cfg.epochs, 'epoch')} of ~{spe[0]} at batch "
                 f"{cfg.batch_size}" + (f", capped by --max-steps {cfg.max_steps}"
                                        if cfg.max_steps and cfg.max_steps < sum(spe) else "") + ")"
                 + (f", {left} to go" if self.step else "")
                 + (f"; stopping after {cfg.max_minutes:g} min (--max-minutes)" if cfg.max_minutes else ""))

    def loop(self, signals, stop_after):
        """The planned steps, epoch by epoch; returns False when done, else why it stopped."""
        cfg, data = self.cfg, self.data
        if self.progress and sys.stderr.isatty():
            from .ui import progress_bar

            self.bar = progress_bar(total=self.total_steps, initial=self.step, desc="train", unit="step")
        self.log_every = max(1, self.total_steps // 20)
        # --max-minutes without --max-steps on a new run: fit the schedule to the time
        fit_to_time = bool(cfg.max_minutes) and cfg.max_steps is None and self.resumed_from is None
        stopped = False
        self.step_times: list[float] = []
        self.speed = None  # measured seconds per step
        self.t_session = time.perf_counter()
        t_start = self.t_session - self.elapsed
        n = len(data.entries)
        while self.step < self.total_steps and not stopped:
            packed = pack(data.token_lists, epoch_order(n, cfg.seed, self.epoch), data.T, data.eos_id, data.starts)
            n_blocks = len(packed["input_ids"])
            for b in range(self.batch_in_epoch, math.ceil(n_blocks / cfg.batch_size)):
                sl = slice(b * cfg.batch_size, (b + 1) * cfg.batch_size)
                t0 = time.perf_counter()
                self.losses.append(self.update(packed, sl))
                self.scheduler.step()
                self.step += 1
                self.batch_in_epoch = b + 1
                self.step_times.append(time.perf_counter() - t0)
                self.tokens_seen += packed["input_ids"][sl].size
                self.real_tokens_seen += int(packed["real"][sl].sum())
                self.elapsed = time.perf_counter() - t_start
                self._measure_speed(fit_to_time)
                self._show_progress()
                if self.val_data is not None and (self.step % self.plan.val_every == 0
                                                  or self.step == self.total_steps):
                    self.validate()
                    if cfg.early_stop is not None and self.evals_since_best >= cfg.early_stop:
                        stopped = "early_stop"
                if not stopped and signals.received:
                    stopped = signals.received
                if not stopped and cfg.max_minutes is not None and \
                        time.perf_counter() - self.t_session >= 60 * cfg.max_minutes:
                    stopped = "time"
                if not stopped and stop_after is not None and self.step >= stop_after:
                    stopped = "stop_after"
                if stopped or self.step >= self.total_steps:
                    break
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.checkpoint()
            else:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        return stopped

    def _measure_speed(self, fit_to_time):
        """The time estimate, and with --max-minutes the schedule fitted to the time left."""
        cfg, times = self.cfg, self.step_times
        # the estimate: the first step of a session pays one-off costs; time the next ones
        if self.speed is None and len(times) == 1 + ESTIMATE_STEPS:
            self.speed = float(np.mean(times[1:]))
            left = self.total_steps - self.step
            self.say(f"speed: {self.speed:.2f} s/step (measured over {ESTIMATE_STEPS} steps) -> "
                     f"{_plural(left, 'step')} left, about {_minutes(left * self.speed)}, expected total "
                     f"{_minutes(self.elapsed + left * self.speed)}")
        if self.speed is not None and len(times) % 50 == 0:  # follow the machine's load
            self.speed = float(np.mean(times[-50:]))
        if fit_to_time and self.speed is not None and (len(times) == 1 + ESTIMATE_STEPS or len(times) % 50 == 0):
            # the schedule ends when the budget does: the last steps run at the low rate that a
            # stop by --max-minutes in mid-schedule never reaches. The rate per step includes the
            # validations so far (and the first step's one-off cost). The recent speed (last 50
            # steps), so that the plan follows the machine's load both ways: a busy spell shortens
            # it, and it grows back (up to the plan) when it ends.
            spent = time.perf_counter() - self.t_session
            fit = self.step + int((cfg.max_minutes * 60 * TIME_FIT_SHARE - spent) / (self.speed * TIME_FIT_MARGIN))
            fit = min(fit, self.identity.get("planned_steps") or self.total_steps)
            if self.step < fit != self.total_steps:
                if self.identity.get("planned_steps") is None:
                    self.identity["planned_steps"] = self.total_steps
                    self.say(f"--max-minutes {cfg.max_minutes:g}: about {_plural(fit, 'step')} fit in the time, so "
                             f"the learning-rate schedule now ends there (planned: {self.total_steps})")
                self.total_steps = fit
                self.identity["total_steps"] = fit
                self.log_every = max(1, fit // 20)
                if self.bar is not None:
                    self.bar.total = fit

    def _show_progress(self):
        step, total = self.step, self.total_steps
        lr = self.scheduler.get_last_lr()[0]
        if self.bar is not None:
            post = dict(loss=f"{self.losses[-1]:.3f}", epoch=self.epoch + 1, lr=f"{lr:.2e}")
            if self.speed is not None:
                post.update(s_step=f"{self.speed:.2f}", total=_minutes(self.elapsed + (total - step) * self.speed))
            if self.best is not None:
                post["val"] = f"{100 * self.val_history[-1]['val_exact']:.0f}%"
            self.bar.set_postfix(post)
            self.bar.update(1)
        elif self.progress and (step % self.log_every == 0 or step == total):
            est = f", ~{_minutes((total - step) * self.speed)} left" if self.speed else ""
            self.log(f"step {step}/{total} (epoch {self.epoch + 1}): loss "
                     f"{np.mean(self.losses[-self.log_every:]):.4f}, lr {lr:.2e}{est}")

    def finish(self, signals, stopped):
        """After the loop: --fix-misses on a complete run, a last validation of a stopped one, the
        checkpoint."""
        cfg = self.cfg
        if cfg.fix_misses and (not stopped and self.step >= self.total_steps or stopped == "early_stop"):
            self.fixes.append(self.fix_misses(signals))
            if self.val_data is not None:
                self.validate(after_fix=True)
        elif cfg.fix_misses and stopped != "stop_after":
            self.log(f"--fix-misses: not run, the run stopped before its planned steps; {self.resume_hint} and it "
                     f"runs at the end")
        if self.val_data is not None and stopped in ("time", "SIGINT", "SIGTERM") and \
                (not self.val_history or self.val_history[-1]["step"] != self.step):
            self.validate()
        self.checkpoint()

    # -- fixing misses -----------------------------------------------------------------------------
    def fix_misses(self, signals):
        """--fix-misses (see the module docstring). Ctrl-C or --max-minutes end it early (the run
        itself is complete). Returns its record for train_log.json."""
        cfg, data = self.cfg, self.data
        fit_data = pack(data.fit_lists, range(len(data.fit_lists)), data.T, data.eos_id, data.fit_starts)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * cfg.min_lr_ratio * FIX_LR_SCALE
        rng = np.random.default_rng([cfg.seed, FIX_SEED, len(self.fixes)])
        t0 = time.perf_counter()
        n_fit = len(data.fit_lists)
        wrong = np.flatnonzero(self.score(fit_data, n_fit)[1])
        rec = {"questions": n_fit, "before": len(wrong), "steps": 0,
               "lr": cfg.lr * cfg.min_lr_ratio * FIX_LR_SCALE, "rounds": [], "interrupted": False, "losses": []}
        self.say(f"fixing misses: {len(wrong)} of {n_fit} training questions not answered exactly (greedy, "
                 f"float); up to {_plural(cfg.fix_misses, 'more step')} at lr {rec['lr']:.2e}")
        hard = set(wrong.tolist())  # every question found wrong so far: a fix can break its rival

        def snapshot():
            return {"wrong": wrong, "steps": rec["steps"],
                    "state": {k: v.detach().clone() for k, v in self.model.state_dict().items()}}

        kept = snapshot()  # the weights with the fewest misses (the latest among equals)
        while len(wrong) and rec["steps"] < cfg.fix_misses and not rec["interrupted"]:
            train_on = sorted(hard)
            self._fix_round(rng, train_on, rec, signals)
            wrong = np.flatnonzero(self.score(fit_data, n_fit)[1])
            hard.update(wrong.tolist())
            rec["rounds"].append({"steps": rec["steps"], "wrong": len(wrong), "trained_on": len(train_on),
                                  "seconds": time.perf_counter() - t0})
            self.say(f"fixing misses: after {_plural(rec['steps'], 'step')}, {len(wrong)} of {n_fit} "
                     f"training questions not answered exactly")
            if len(wrong) <= len(kept["wrong"]):
                kept = snapshot()
        rec["kept_after_steps"] = kept["steps"]
        if kept["steps"] != rec["steps"]:  # a later round ended worse: go back to the best one
            self.model.load_state_dict(kept["state"])
            wrong = kept["wrong"]
            self.say(f"fixing misses: keeping the weights after {_plural(kept['steps'], 'step')} ({len(wrong)} wrong)")
        del kept
        rec.update(after=len(wrong), seconds=time.perf_counter() - t0,
                   still_wrong=[{"line": data.fit_entries[i].line, "question": data.fit_entries[i].question}
                                for i in wrong])
        return rec

    def _fix_round(self, rng, train_on, rec, signals):
        """One round: each question still to fix FIX_REPEAT times among others, shuffled."""
        cfg, data = self.cfg, self.data
        lists = [data.fit_lists[i] for i in train_on] * FIX_REPEAT
        ans = [data.fit_starts[i] for i in train_on] * FIX_REPEAT
        n_others = max(FIX_OTHERS * len(lists), FIX_MIN_OTHERS)
        others = rng.choice(len(data.token_lists), size=min(len(data.token_lists), n_others), replace=False)
        lists += [data.token_lists[j] for j in others]
        ans += [data.starts[j] for j in others]
        packed = pack(lists, rng.permutation(len(lists)), data.T, data.eos_id, ans)
        for b in range(math.ceil(len(packed["input_ids"]) / cfg.batch_size)):
            rec["losses"].append(self.update(packed, slice(b * cfg.batch_size, (b + 1) * cfg.batch_size)))
            rec["steps"] += 1
            if signals.received:
                rec["interrupted"] = signals.received
            elif cfg.max_minutes is not None and time.perf_counter() - self.t_session >= 60 * cfg.max_minutes:
                rec["interrupted"] = "time"
            if rec["interrupted"] or rec["steps"] >= cfg.fix_misses:
                break

    # -- outputs -----------------------------------------------------------------------------------
    def write_outputs(self, stopped, can_plot):
        """The model (also when stopped early, so that the run directory always holds one),
        train_log.json, the plots, and the closing lines. Returns the train_log dict."""
        import torch
        import transformers

        cfg, data, step = self.cfg, self.data, self.step
        self.save_model(self.out_dir)
        spe, losses, elapsed = self.plan.steps_per_epoch, self.losses, self.elapsed
        tail = losses[-min(len(losses), max(1, spe[0])):]
        # absolute paths: `tinygpt convert RUN` from another folder finds the same corpus (for drafts)
        args = {"corpus": str(data.corpus.resolve()), "tokenizer": str(data.tok_file.resolve()),
                "out_dir": str(self.out_dir.resolve())}
        args.update((f.name, getattr(cfg, f.name)) for f in fields(cfg) if f.name != "resume")
        args.update(threads=self.n_threads, device=self.device, val_every=self.plan.val_every,
                    warmup_steps=self.warmup_steps, val_file=str(data.val_file.resolve()) if data.val_file else None,
                    abstain_questions=str(Path(cfg.abstain_questions).resolve()) if cfg.abstain_questions else None)
        info = {
            "args": args,
            "abstain": {"answer": data.abstain_text, "off_topic_questions": data.n_abstain},
            "planned_steps": self.identity.get("planned_steps"),
            "stopped": stopped, "steps": step, "total_steps": self.total_steps,
            "epochs_completed": int(np.searchsorted(np.cumsum(spe), step, side="right")),
            "steps_per_epoch": spe[0], "entries": len(data.entries), "val_entries": len(data.val_entries),
            "augmented": data.augment_counts,
            "entry_tokens": sum(map(len, data.token_lists)), "n_params": self.n_params, "vocab_size": data.vocab_size,
            "final_loss": losses[-1] if losses else None,
            "final_loss_mean_last_epoch": float(np.mean(tail)) if tail else None,
            "wall_time_s": elapsed, "seconds_per_step": elapsed / max(1, step),
            "tokens_per_s": self.tokens_seen / elapsed if elapsed > 0 else None,
            "real_tokens_per_s": self.real_tokens_seen / elapsed if elapsed > 0 else None,
            "padding_fraction": 1.0 - self.real_tokens_seen / self.tokens_seen if self.tokens_seen else None,
            "resumed_from_step": self.resumed_from,
            "validation": self.val_history, "best": self.best, "fixed_misses": self.fixes,
            "torch_version": torch.__version__, "transformers_version": transformers.__version__,
            "python_version": sys.version.split()[0],
            "corpus_sha256": self.identity["corpus_sha256"], "tokenizer_sha256": self.identity["tokenizer_sha256"],
            "losses": losses,
        }
        tmp = self.out_dir / "train_log.json.tmp"
        tmp.write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, self.out_dir / "train_log.json")
        self.draw_plots(can_plot)
        self.report_end(stopped, info, tail)
        return {"out_dir": str(self.out_dir), **info}

    def draw_plots(self, can_plot):
        """The plots last: the model and the log are complete whatever happens to them."""
        from .ui import MATPLOTLIB_INSTALL

        preset, data = self.cfg.preset, self.data
        plots = [("loss.png", lambda p: plot_loss(self.losses, p, title=f"tinygpt {preset}: "
                  f"{_plural(len(data.entries), 'entry', 'entries')}, {_plural(self.step, 'step')}"))]
        if self.val_history:
            plots.append(("val.png", lambda p: plot_validation(
                self.val_history, p, title=f"tinygpt {preset}: validation on {len(data.val_entries)} held-out "
                                           f"questions")))
        for name, draw in plots if can_plot else []:
            try:
                draw(self.out_dir / name)
            except Exception as e:  # a plot is cosmetic: say so, never fail the finished run
                self.log(f"warning: {name} not drawn ({type(e).__name__}: {e})")
        if not can_plot:
            self.log(f"{' and '.join(n for n, _ in plots)} not drawn: matplotlib is not installed ({MATPLOTLIB_INSTALL})")

    def report_end(self, stopped, info, tail):
        cfg, step, elapsed, log = self.cfg, self.step, self.elapsed, self.log
        why = {False: "done", "time": f"stopped at the --max-minutes {cfg.max_minutes:g} limit" if cfg.max_minutes else "",
               "early_stop": f"stopped early: no better validation in {cfg.early_stop} evaluations",
               "SIGINT": "interrupted (Ctrl-C)", "SIGTERM": "terminated (SIGTERM)"}[stopped]
        log(f"{why}: {_plural(step, 'step')} of {self.total_steps} in {_minutes(elapsed)} "
            f"({elapsed / max(1, step):.2f} s/step, {info['tokens_per_s'] or 0:.0f} tokens/s), final loss "
            f"{info['final_loss_mean_last_epoch']:.4f} (mean of the last {_plural(len(tail), 'step')}); model in "
            f"{self.out_dir}")
        for fx in self.fixes[-1:] if cfg.fix_misses else []:
            still = ", ".join(f"{w['question']!r} (line {w['line']})" for w in fx["still_wrong"][:10])
            log(f"fixing misses: {fx['before']} -> {fx['after']} of {fx['questions']} training questions answered "
                f"wrong, {_plural(fx['steps'], 'more step')} in {_minutes(fx['seconds'])}"
                + (f" ({'interrupted' if fx['interrupted'] != 'time' else 'stopped at --max-minutes'})"
                   if fx["interrupted"] else "")
                + (f"; still wrong: {still}" + (" ..." if fx["after"] > 10 else "") if still else ""))
        best = self.best
        if best is not None:
            log(f"best validation: {best['val_exact_count']}/{best['val_n']} exact ({100 * best['val_exact']:.1f} %) "
                f"at step {best['step']}: model in {self.out_dir / BEST_DIR} (tinygpt convert {self.out_dir / BEST_DIR} "
                f"-o ...)")
        if stopped:
            log(f"checkpoint in {self.out_dir / CHECKPOINT_DIR}; {self.resume_hint}")


# ----------------------------------------------------------------------------- train

def train(corpus, tokenizer_dir, out_dir, config: TrainConfig | None = None, *, log=print, progress=True,
          stop_after=None, **settings) -> dict:
    """Train GPT-2 (or, with arch='llama', Llama) on ``corpus`` with the tokenizer in
    ``tokenizer_dir``; write the run into ``out_dir``. See the module docstring. The settings are
    ``config`` (a TrainConfig; default: every default) with ``settings`` (TrainConfig's field
    names) put over it. Returns the train_log dict (plus ``out_dir``; ``stopped`` is False for a
    complete run, else why it stopped: "stop_after", "time", "early_stop", "SIGINT" or "SIGTERM").

    ``stop_after`` stops after that many steps as if interrupted (checkpoint written, no final
    model; the schedule is unchanged), to be continued with ``resume=True``. Bad inputs raise
    ValueError before torch is imported.
    """
    cfg = replace(config or TrainConfig(), **settings).check()
    log = log or (lambda *a, **k: None)
    _need_int("stop_after", stop_after, 1, allow_none=True)
    from .ui import MATPLOTLIB_INSTALL, have_matplotlib

    can_plot = have_matplotlib()  # asked now: the plots come at the end, after all the work
    if not can_plot:
        log(f"note: matplotlib is not installed, so loss.png and val.png will not be drawn ({MATPLOTLIB_INSTALL}); "
            f"the model, checkpoint and train_log.json are written as usual")
    data = load_entries(cfg, corpus, log)
    load_tokenizer(cfg, data, tokenizer_dir, log)
    tokenize(cfg, data, log)
    plan = make_plan(cfg, data)
    out_dir = check_out_dir(out_dir, cfg.resume)

    import torch  # from here on

    device = resolve_device(cfg.device)
    hf_config = build_config(cfg, data, plan)
    ckpt, extended_from = check_resume(cfg, out_dir, plan, log)
    out_dir.mkdir(parents=True, exist_ok=True)
    prev_threads = torch.get_num_threads()
    n_threads = cfg.threads or os.cpu_count() or 1
    torch.set_num_threads(n_threads)
    try:
        trainer = Trainer(cfg, data, plan, hf_config, out_dir, device, n_threads, log, progress)
        trainer.restore(ckpt, extended_from)
        del ckpt
        trainer.report_plan()
        with _StopSignals() as signals:
            stopped = trainer.loop(signals, stop_after)
            trainer.finish(signals, stopped)
        if stopped == "stop_after":
            log(f"stopped after step {trainer.step}/{trainer.total_steps}; checkpoint in {out_dir / CHECKPOINT_DIR}; "
                f"{trainer.resume_hint}")
            return {"out_dir": str(out_dir), "steps": trainer.step, "total_steps": trainer.total_steps,
                    "stopped": stopped, "losses": trainer.losses}
        try:
            return trainer.write_outputs(stopped, can_plot)
        except KeyboardInterrupt:  # a second Ctrl-C, while the model, the log or the plots were written
            log(f"interrupted while writing the outputs; the checkpoint in {out_dir / CHECKPOINT_DIR} is complete: "
                f"run the same command with --resume to write them")
            raise
    finally:
        torch.set_num_threads(prev_threads)

