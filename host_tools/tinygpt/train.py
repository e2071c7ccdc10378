"""Train a tinygpt model (a Hugging Face GPT-2) on the corpus, on the CPU (or a GPU). nanoGPT
style: one function, read top to bottom.

    train(corpus, tokenizer_dir, out_dir, preset="hw1", epochs=..., lr=..., batch_size=16,
          seed=1337, resume=False, checkpoint_every=100, dropout=..., log=print, max_steps=None,
          *, max_minutes=None, loss="all", label_smoothing=0.0, weight_decay=0.01,
          val_split=None, val_file=None, val_every=None, early_stop=None, augment=0,
          device="auto", threads=1, fix_misses=0, ...)

``tinygpt train CORPUS --tokenizer DIR -o RUN_DIR [--preset hw1] [--epochs N] ...`` runs it;
``tinygpt train --help`` lists every option with its default.

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
``threads``: torch's CPU threads (see DEFAULTS for why 1).

Outputs in out_dir: ``model.safetensors`` + ``config.json`` (``save_pretrained``),
``tokenizer.json`` (copied, so ``tinygpt convert out_dir`` works directly), ``loss.png``
(loss per step and smoothed), ``val.png`` (validation accuracy and loss, with a validation
set), ``best/`` (with a validation set) and ``train_log.json`` (args, steps, why it stopped,
final loss, validation history and best, wall time, tokens/s, versions, loss per step).

Defaults (hw1 preset, the project's corpus of 1000 entries: ~40 tokens per entry, ~380 blocks
of 128 tokens per epoch, 24 steps per epoch at batch 16, ~1.3 s per step on 2 CPU cores):
epochs 50 (~1200 steps, ~26 min), lr 2e-3, dropout 0.1; see DEFAULTS for the measurements.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from . import corpus as corpus_mod
from .modelfile import sha256_file

# Chosen for the hw1 preset and the project's corpus (data/corpus.txt: 1000 entries, 217 distinct
# answers, ~40 tokens per entry with its 2914-token tokenizer -> 374-387 blocks of 128 tokens,
# 24 steps per epoch at batch 16): 50 epochs = ~1200 steps, ~26 min at ~1.3 s/step on 2 cores.
# Measured (1 thread, shared machine, ~4.4 s/step for hw1 at 16 x 128):
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
# The recipe for a user's own corpus (issue 22, docs/recipes.md): the 8 x 256 shape, the loss on the
# answer tokens, 8 programmatic variants of every question and off-topic questions for the abstain
# answer (train(abstain=None): as many as the corpus has questions). With --max-minutes the
# learning-rate schedule is fitted to the time (TIME_FIT_SHARE), so a time budget ends at the low
# final rate instead of in mid-schedule.
DEFAULTS = dict(
    preset="d256x8",
    arch="gpt2",
    augment=8,
    epochs=10,
    lr=2e-3,
    dropout=0.1,
    batch_size=16,
    seed=1337,
    warmup_steps=None,      # None: 5% of the steps, at most 100
    min_lr_ratio=0.1,
    weight_decay=0.01,
    schedule="cosine",
    checkpoint_every=100,   # a hw1 checkpoint is 75 MB (weights + AdamW moments)
    loss="answer",
    label_smoothing=0.0,
    device="auto",
    # One thread. Measured on this 2-core machine while other work shared it (4 layers x 128 wide,
    # vocab 4096, 16 x 128 tokens per step, forward + backward + AdamW, 4 interleaved rounds of 5
    # steps, nice 15): 1 thread 2.03 / 2.27 / 1.14 / 0.85 s/step, 2 threads 5.79 / 6.52 / 0.63 /
    # 2.19 s/step: 2 threads won one round by 1.8x (when the other cores' load paused) and lost
    # three by 2.6-2.9x. A thread that waits for a busy core stalls every step, so 1 is the safe
    # default; on idle cores --threads N is faster.
    threads=1,
)
LOSSES = ("all", "answer")
DEVICES = ("auto", "cpu", "cuda", "mps")
ESTIMATE_STEPS = 3   # steps timed (after the first) for the time estimate
TIME_FIT_SHARE = 0.93  # of --max-minutes planned for steps; the rest: the final validation, saving
TIME_FIT_MARGIN = 1.05  # seconds per step planned, over the measured ones (validations come on top)
BEST_DIR = "best"    # the model of the best validation, save_pretrained layout

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "checkpoint.pt"
# Files that say a directory holds a training run.
RUN_MARKERS = ("train_log.json", "config.json", "model.safetensors", CHECKPOINT_DIR)
# Settings that must be equal to resume a run (everything that changes the numbers).
IDENTITY_KEYS = ("corpus_sha256", "tokenizer_sha256", "preset", "config", "epochs", "lr", "batch_size",
                 "seed", "dropout", "max_steps", "warmup_steps", "min_lr_ratio", "weight_decay", "schedule",
                 "loss", "label_smoothing", "val_split", "val_file_sha256", "augment", "abstain", "abstain_sha256",
                 "abstain_answer")


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
    missing = [k for k in ("identity", "step", "model", "optimizer") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"cannot resume: the checkpoint {p} is not a tinygpt training checkpoint (it lacks "
                         f"{', '.join(missing)}); start the run again in another directory (-o NEW_DIR), or "
                         f"delete {out_dir} and start it there")
    return ckpt


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


def train(corpus, tokenizer_dir, out_dir, preset=DEFAULTS["preset"], epochs=DEFAULTS["epochs"], lr=DEFAULTS["lr"],
          batch_size=DEFAULTS["batch_size"], seed=DEFAULTS["seed"], resume=False,
          checkpoint_every=DEFAULTS["checkpoint_every"], dropout=DEFAULTS["dropout"], log=print,
          max_steps=None, *, warmup_steps=DEFAULTS["warmup_steps"], min_lr_ratio=DEFAULTS["min_lr_ratio"],
          weight_decay=DEFAULTS["weight_decay"], schedule=DEFAULTS["schedule"], threads=DEFAULTS["threads"],
          stop_after=None, progress=True, max_minutes=None, loss=DEFAULTS["loss"],
          label_smoothing=DEFAULTS["label_smoothing"], val_split=None, val_file=None, val_every=None,
          early_stop=None, augment=DEFAULTS["augment"], device=DEFAULTS["device"], fix_misses=0, abstain=None,
          abstain_questions=None, arch=DEFAULTS["arch"]) -> dict:
    """Train GPT-2 (or, with arch='llama', Llama) ``preset`` on ``corpus`` with the tokenizer in ``tokenizer_dir``; write the
    run into ``out_dir``. See the module docstring. Returns the train_log dict (plus
    ``out_dir``; ``stopped`` is False for a complete run, else why it stopped: "stop_after",
    "time", "early_stop", "SIGINT" or "SIGTERM").

    ``max_steps`` caps the total steps (the LR schedule then spans max_steps); ``stop_after``
    stops after that many steps as if interrupted (checkpoint written, no final model; the
    schedule is unchanged), to be continued with ``resume=True``. ``checkpoint_every=0``
    writes only the final checkpoint. Bad inputs raise ValueError before torch is imported.
    """
    log = log or (lambda *a, **k: None)

    # -- arguments (no torch yet: a mistake is reported in a fraction of a second) --------------
    _need_int("--epochs", epochs, 1)
    _need_int("--batch-size", batch_size, 1)
    _need_int("--seed", seed, 0)
    _need_int("--checkpoint-every", checkpoint_every, 0, allow_none=True)
    _need_int("--max-steps", max_steps, 1, allow_none=True)
    _need_int("--warmup-steps", warmup_steps, 0, allow_none=True)
    check_threads(threads)
    _need_int("stop_after", stop_after, 1, allow_none=True)
    _need_int("--val-every", val_every, 1, allow_none=True)
    _need_int("--early-stop", early_stop, 1, allow_none=True)
    _need_int("--augment", augment, 0)
    from .augment import MAX_PER_QUESTION

    if augment > MAX_PER_QUESTION:
        raise ValueError(f"--augment must be at most {MAX_PER_QUESTION}, got {augment} (more variants per question "
                         f"are not distinct: a short question has only a few)")
    _need_int("--fix-misses", fix_misses, 0)
    _need_int("--abstain", abstain, 0, allow_none=True)
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"--lr must be a positive number, got {lr!r}")
    if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
        raise ValueError(f"--dropout must be in [0, 1), got {dropout!r}")
    if not (isinstance(min_lr_ratio, (int, float)) and 0.0 <= min_lr_ratio <= 1.0):
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")
    if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
        raise ValueError(f"--weight-decay must be >= 0, got {weight_decay!r}")
    if not (isinstance(label_smoothing, (int, float)) and 0.0 <= label_smoothing < 1.0):
        raise ValueError(f"--label-smoothing must be in [0, 1), got {label_smoothing!r}")
    if max_minutes is not None and not (isinstance(max_minutes, (int, float)) and max_minutes > 0):
        raise ValueError(f"--max-minutes must be a positive number, got {max_minutes!r}")
    if schedule not in ("cosine", "linear"):
        raise ValueError(f"schedule must be 'cosine' or 'linear', got {schedule!r}")
    if loss not in LOSSES:
        raise ValueError(f"--loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if device not in DEVICES:
        raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    from .presets import preset_hparams

    preset_hp = preset_hparams(preset, arch)  # ValueError names an unknown preset or architecture
    if val_split is not None and val_file is not None:
        raise ValueError("give --val-split or --val-file, not both")
    if early_stop is not None and val_split is None and val_file is None:
        raise ValueError("early stopping needs a validation set: add --val-split F or --val-file FILE")

    from .ui import MATPLOTLIB_INSTALL, have_matplotlib

    can_plot = have_matplotlib()  # asked now: the plots come at the end, after all the work
    if not can_plot:
        log(f"note: matplotlib is not installed, so loss.png and val.png will not be drawn ({MATPLOTLIB_INSTALL}); "
            f"the model, checkpoint and train_log.json are written as usual")

    # -- corpus -----------------------------------------------------------------------------
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
    val_entries = []
    if val_split is not None:
        entries, val_entries = split_validation(entries, val_split, seed)
        if not val_entries:
            raise ValueError(f"--val-split {val_split}: no answer of {corpus} has two phrasings, so no question "
                             f"can be held out; use --val-file FILE")
    elif val_file is not None:
        val_file = Path(val_file)
        if not val_file.is_file():
            raise ValueError(f"validation file not found: {val_file}")
        val_entries = [e for e in corpus_mod.parse(val_file) if e.kind != "prose"]
        if not val_entries:
            raise ValueError(f"validation file {val_file} has no Q/A or Q/Do entries")
    fit_entries = [e for e in entries if e.kind != "prose"]  # the questions --fix-misses answers exactly
    abstain_text = corpus_mod.abstain_answer(corpus)
    n_abstain, abstain_sha, known_words = 0, None, None
    if abstain != 0:
        from . import abstain as abstain_mod

        want = len(fit_entries) if abstain is None else abstain
        off_topic, n_on_topic = abstain_mod.off_topic_entries(entries, abstain_text, want, seed,
                                                               abstain_questions)
        n_abstain = len(off_topic)
        known_words = abstain_mod.known_words(entries)  # py/topic.py's check on the board
        if len(known_words.encode("utf-8")) > abstain_mod.MAX_KNOWN_WORDS_BYTES:
            log(f"abstain: the corpus has {len(known_words.split())} distinct content words, more than the model "
                f"file's meta section holds; the model alone decides when to abstain")
            known_words = None
        abstain_sha = sha256_file(abstain_questions or abstain_mod.QUESTIONS_FILE)
        log(f"abstain: {n_abstain} off-topic questions answered with {abstain_text!r} "
            f"({n_on_topic} of the list left out as on-topic for this corpus)")
        entries = entries + off_topic
    from . import retrieval

    # the corpus answers and their words, for py/retrieve.py's check of the model's answers on the
    # board (not the off-topic entries: their answer is the abstain answer, which it knows apart)
    retrieval_index = retrieval.index_meta(fit_entries) if fit_entries else None  # prose only: none
    if retrieval_index is not None:
        from . import modelfile

        size = sum(len(f"{k}: {v}\n".encode("utf-8")) for k, v in retrieval_index.items())
        size += len((known_words or "").encode("utf-8")) + 400  # + the word list and the abstain answer
        if size > modelfile.MAX_META_BYTES:  # found now, not by convert after the training
            log(f"retrieval: the corpus's word index ({size:,} bytes with the word list) is more than the model "
                f"file's meta section holds ({modelfile.MAX_META_BYTES:,}); answers are not checked against it")
            retrieval_index = None
    augment_counts = None
    if augment:
        from . import augment as augment_mod

        extra, augment_counts = augment_mod.augment_entries(entries, augment, seed)
        entries = entries + extra

    # -- tokenizer --------------------------------------------------------------------------
    from tokenizers import Tokenizer

    tok_file = tokenizer_path(tokenizer_dir)
    if not tok_file.is_file():
        raise ValueError(f"tokenizer not found: {tok_file} (make one with `tinygpt tokenizer train {corpus} "
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
    preset_vocab = preset_hp.get("vocab_size")
    if preset_vocab is not None and vocab_size > preset_vocab:
        raise ValueError(f"tokenizer {tok_file} has {vocab_size} tokens but preset {preset!r} is sized for "
                         f"{preset_vocab}; train the tokenizer with `--vocab-size {preset_vocab}` or pick another "
                         f"preset")
    T = preset_hp["n_positions"]

    def tokenize(ents, where):
        lists = [enc.ids for enc in tok.encode_batch(corpus_mod.training_texts(ents), add_special_tokens=False)]
        for e, ids in zip(ents, lists):
            if len(ids) > T:
                raise ValueError(f"{where}:{e.line}: {e.kind} entry is {len(ids)} tokens, longer than the "
                                 f"context of {T} (n_positions of preset {preset!r}); shorten it")
            if not ids or ids[-1] != eos_id:
                raise ValueError(f"{where}:{e.line}: entry does not end with the {corpus_mod.EOS} token once "
                                 f"tokenized; is {corpus_mod.EOS} a special token of {tok_file}?")
        return lists

    # off-topic questions (line 0, augmented variants too) that do not fit the context are left out
    off = [e for e in entries if e.line == 0]
    too_long = {id(e) for e, enc in zip(off, tok.encode_batch(corpus_mod.training_texts(off), add_special_tokens=False))
                if len(enc.ids) > T}
    if too_long:
        entries = [e for e in entries if id(e) not in too_long]
    token_lists = tokenize(entries, corpus)
    starts = answer_starts(tok, entries)
    val_lists = tokenize(val_entries, val_file or corpus)
    val_starts = answer_starts(tok, val_entries)
    fit_lists = tokenize(fit_entries, corpus) if fix_misses else []
    fit_starts = answer_starts(tok, fit_entries) if fix_misses else []
    if loss == "answer":
        keep = [i for i, s in enumerate(starts) if s is not None]
        if len(keep) < len(entries):
            log(f"--loss answer: {_plural(len(entries) - len(keep), 'prose entry', 'prose entries')} left out (no answer to learn)")
        entries, token_lists, starts = ([entries[i] for i in keep], [token_lists[i] for i in keep],
                                        [starts[i] for i in keep])
        if not entries:
            raise ValueError(f"--loss answer: corpus {corpus} has no Q/A or Q/Do entries")

    # -- the plan: steps per epoch (packing depends on the epoch's order) and the schedule --
    n = len(entries)
    steps_per_epoch = [math.ceil(count_blocks(token_lists, epoch_order(n, seed, ep), T) / batch_size)
                       for ep in range(epochs)]
    total_steps = sum(steps_per_epoch) if max_steps is None else min(max_steps, sum(steps_per_epoch))
    if val_every is None:
        val_every = steps_per_epoch[0]
    identity = {
        "corpus_sha256": sha256_file(corpus), "tokenizer_sha256": sha256_file(tok_file),
        "preset": preset, "arch": arch, "n_positions": T,
        "epochs": epochs, "lr": float(lr), "batch_size": batch_size, "seed": seed, "dropout": float(dropout),
        "max_steps": max_steps, "warmup_steps": warmup_steps, "min_lr_ratio": float(min_lr_ratio),
        "weight_decay": float(weight_decay), "schedule": schedule, "loss": loss,
        "label_smoothing": float(label_smoothing), "val_split": val_split,
        "val_file_sha256": sha256_file(val_file) if val_file is not None else None, "augment": augment,
        "abstain": n_abstain, "abstain_sha256": abstain_sha, "abstain_answer": abstain_text,
    }

    # -- out_dir: a fresh directory, or the same run to resume ----------------------------------
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

    # -- torch from here on ---------------------------------------------------------------------
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from .presets import make_config

    device = resolve_device(device)
    config = make_config(preset, arch, vocab_size=vocab_size, bos_token_id=eos_id, eos_token_id=eos_id,
                         resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    if n_abstain:  # save_pretrained keeps them in config.json; convert writes them to the model file
        config.abstain_answer = abstain_text
        config.abstain_known_words = known_words
    config.retrieval_index = retrieval_index
    identity["config"] = {k: v for k, v in sorted(config.to_dict().items())
                          if k not in ("transformers_version", "dtype", "torch_dtype",
                                       "retrieval_index")}  # derived from the corpus, whose hash is in it
    ckpt = None
    extended_from = None
    if resume:
        ckpt = load_checkpoint(out_dir) if out_dir.is_dir() else None
        if ckpt is not None:
            old = dict(ckpt["identity"])
            if "abstain" not in old and identity["abstain"] == 0:  # a run from before abstention, resumed
                old.update(abstain=0, abstain_sha256=None, abstain_answer=identity["abstain_answer"])  # with --abstain 0
            # epochs / max_steps may grow: that continues a run (see the module docstring)
            diff = [k for k in IDENTITY_KEYS if k not in ("epochs", "max_steps", "warmup_steps")
                    and old.get(k) != identity.get(k)]
            if warmup_steps is not None and old.get("warmup_steps") != warmup_steps:
                diff.append("warmup_steps")
            if diff:
                flag = {k: "--" + k.replace("_", "-") for k in IDENTITY_KEYS}
                detail = "; ".join(f"{flag.get(k, k)}: checkpoint {old.get(k)!r} vs now {identity.get(k)!r}"
                                   for k in diff if k not in ("config", "corpus_sha256", "tokenizer_sha256"))
                for k, what in (("corpus_sha256", "the corpus file changed"),
                                ("tokenizer_sha256", "the tokenizer changed"), ("config", "model config differs")):
                    if k in diff:
                        detail = (detail + "; " if detail else "") + what
                raise ValueError(f"cannot resume {out_dir}: the checkpoint is from a different run ({detail})")
            if ckpt["step"] > total_steps:
                raise ValueError(f"cannot resume {out_dir}: its checkpoint is at step {ckpt['step']}, beyond the "
                                 f"{total_steps} steps of --epochs {epochs}"
                                 + (f" --max-steps {max_steps}" if max_steps else "") + "; give more")
            warmup_steps = old["warmup_steps"] if warmup_steps is None else warmup_steps
            if old.get("planned_steps") == total_steps:  # fitted to --max-minutes: finish that schedule
                total_steps = old["total_steps"]
                identity["planned_steps"] = old["planned_steps"]
            if old.get("total_steps", total_steps) != total_steps:
                extended_from = old.get("total_steps")
        else:
            log(f"no checkpoint in {out_dir}: starting a new run")
    if warmup_steps is None:
        warmup_steps = min(100, max(1, total_steps // 20))
    identity["warmup_steps"] = warmup_steps
    identity["total_steps"] = total_steps
    out_dir.mkdir(parents=True, exist_ok=True)

    # -- model, optimizer, schedule ---------------------------------------------------------------
    prev_threads = torch.get_num_threads()
    n_threads = threads or os.cpu_count() or 1
    torch.set_num_threads(n_threads)
    try:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)  # GPT2LMHeadModel or LlamaForCausalLM
        model.to(device)
        model.train()
        decay = [p for name, p in model.named_parameters() if p.dim() >= 2]
        no_decay = [p for name, p in model.named_parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}],
                                      lr=lr, betas=(0.9, 0.95), eps=1e-8)

        def lr_lambda(step):  # multiplier of lr for the update number step (0-based)
            if step < warmup_steps:
                return (step + 1) / (warmup_steps + 1)
            frac = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
            shape = 0.5 * (1.0 + math.cos(math.pi * frac)) if schedule == "cosine" else 1.0 - frac
            return min_lr_ratio + (1.0 - min_lr_ratio) * shape

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        n_params = sum(p.numel() for p in model.parameters())
        check_disk_space(out_dir, n_params, with_best=bool(val_entries))

        step, epoch, batch_in_epoch = 0, 0, 0
        losses: list[float] = []
        val_history: list[dict] = []
        best, evals_since_best = None, 0
        elapsed, tokens_seen, real_tokens_seen = 0.0, 0, 0
        resumed_from = None
        fixes: list[dict] = []  # one record per --fix-misses phase run on this model
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            for group in optimizer.param_groups:  # the new plan's lr at this step (same unless extended)
                group["lr"] = group["initial_lr"] * lr_lambda(ckpt["step"])
            _set_rng_states(ckpt["rng"])
            step, epoch, batch_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]
            losses = list(ckpt["losses"])
            val_history = list(ckpt.get("val_history", []))
            best, evals_since_best = ckpt.get("best"), ckpt.get("evals_since_best", 0)
            fixes = list(ckpt.get("fixes", []))
            elapsed, tokens_seen, real_tokens_seen = ckpt["elapsed"], ckpt["tokens"], ckpt["real_tokens"]
            resumed_from = step
            if extended_from is not None:
                log(f"continuing {out_dir} from step {step}: the run is now planned for {total_steps} steps "
                    f"(was {extended_from}); the learning rate follows the new schedule from here")
            else:
                log(f"resuming {out_dir} at step {step}/{total_steps} (epoch {epoch + 1}/{epochs})")
            del ckpt

        def checkpoint():
            save_checkpoint(out_dir, {
                "version": 2, "identity": identity, "step": step, "epoch": epoch,
                "batch_in_epoch": batch_in_epoch, "model": {k: v.cpu() for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": _rng_states(), "losses": losses, "elapsed": elapsed, "tokens": tokens_seen,
                "real_tokens": real_tokens_seen, "val_history": val_history, "best": best,
                "evals_since_best": evals_since_best, "fixes": fixes,
            })

        def loss_of(logits, targets):
            return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                                     ignore_index=-100, label_smoothing=float(label_smoothing))

        def update(packed, sl):
            """One optimizer step on the blocks packed[sl]; returns the loss."""
            x = torch.from_numpy(packed["input_ids"][sl]).to(device)
            y_np = packed["targets"][sl] if loss == "all" else np.where(packed["answer"][sl], packed["targets"][sl],
                                                                       -100)
            logits = model(input_ids=x, position_ids=torch.from_numpy(packed["position_ids"][sl]).to(device),
                           attention_mask=attention_mask(packed["segments"][sl]).to(device)).logits
            loss_t = loss_of(logits, torch.from_numpy(y_np).to(device))
            optimizer.zero_grad(set_to_none=True)
            loss_t.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            return float(loss_t.item())

        # validation data: packed once, in file order; the loss and exactness on answer tokens only
        val_data = pack(val_lists, range(len(val_lists)), T, eos_id, val_starts) if val_entries else None

        def score(packed, n_entries):
            """(loss per answer token, wrong) over packed entries; wrong[i] is True unless the
            argmax at every answer position of entry i is the target token, i.e. unless greedy
            decoding of "Q: ...\\nA:" yields exactly the answer and then <|endoftext|>."""
            model.eval()
            wrong = np.zeros(n_entries, dtype=bool)
            nll, count = 0.0, 0
            with torch.no_grad():
                for s in range(0, len(packed["input_ids"]), batch_size):
                    sl = slice(s, s + batch_size)
                    ans = packed["answer"][sl]
                    y = np.where(ans, packed["targets"][sl], -100)
                    logits = model(input_ids=torch.from_numpy(packed["input_ids"][sl]).to(device),
                                   position_ids=torch.from_numpy(packed["position_ids"][sl]).to(device),
                                   attention_mask=attention_mask(packed["segments"][sl]).to(device)).logits
                    yt = torch.from_numpy(y).to(device)
                    nll += float(torch.nn.functional.cross_entropy(
                        logits.reshape(-1, logits.size(-1)), yt.reshape(-1), ignore_index=-100, reduction="sum"))
                    count += int(ans.sum())
                    miss = (logits.argmax(-1).cpu().numpy() != packed["targets"][sl]) & ans
                    np.logical_or.at(wrong, packed["entry"][sl][miss], True)
            model.train()
            return nll / max(1, count), wrong

        def validate():
            """(loss per answer token, exact answers, count) on the validation questions."""
            vl, wrong = score(val_data, len(val_lists))
            return vl, int((~wrong).sum()), len(val_lists)

        def save_model(where):
            model.eval()
            with quiet_hf():
                model.save_pretrained(where)
            model.train()
            shutil.copyfile(tok_file, Path(where) / "tokenizer.json")

        def run_validation(after_fix=False):
            nonlocal best, evals_since_best
            vl, exact, nv = validate()
            rec = {"step": step, "epoch": epoch + (batch_in_epoch > 0), "val_loss": vl, "val_exact": exact / nv,
                   "val_exact_count": exact, "val_n": nv, "train_loss": float(np.mean(losses[-val_every:]))}
            if after_fix:
                rec["after_fix"] = True
            val_history.append(rec)
            better = best is None or (exact, -vl) > (best["val_exact_count"], -best["val_loss"])
            if better:
                best, evals_since_best = dict(rec), 0
                save_model(out_dir / BEST_DIR)
            else:
                evals_since_best += 1
            say(f"step {step}/{total_steps}{' + fixing misses' if after_fix else ''}: validation {exact}/{nv} exact "
                f"({100 * exact / nv:.1f} %), loss {vl:.3f}"
                + (" (best so far)" if better else f" (best {best['val_exact_count']}/{nv} at step {best['step']})"))

        def fix_training_misses(signals, t_session):
            """--fix-misses (see the module docstring). Ctrl-C or --max-minutes end it early (the run
            itself is complete). Returns its record for train_log.json."""
            fit_data = pack(fit_lists, range(len(fit_lists)), T, eos_id, fit_starts)
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * min_lr_ratio * FIX_LR_SCALE
            rng = np.random.default_rng([seed, FIX_SEED, len(fixes)])
            t0 = time.perf_counter()
            wrong = np.flatnonzero(score(fit_data, len(fit_lists))[1])
            rec = {"questions": len(fit_lists), "before": len(wrong), "steps": 0,
                   "lr": lr * min_lr_ratio * FIX_LR_SCALE, "rounds": [], "interrupted": False, "losses": []}
            say(f"fixing misses: {len(wrong)} of {len(fit_lists)} training questions not answered exactly (greedy, "
                f"float); up to {_plural(fix_misses, 'more step')} at lr {rec['lr']:.2e}")
            hard = set(wrong.tolist())  # every question found wrong so far: a fix can break its rival

            def snapshot():
                return {"wrong": wrong, "steps": rec["steps"],
                        "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}

            kept = snapshot()  # the weights with the fewest misses (the latest among equals)
            while len(wrong) and rec["steps"] < fix_misses and not rec["interrupted"]:
                train_on = sorted(hard)
                lists = [fit_lists[i] for i in train_on] * FIX_REPEAT
                ans = [fit_starts[i] for i in train_on] * FIX_REPEAT
                n_others = max(FIX_OTHERS * len(lists), FIX_MIN_OTHERS)
                others = rng.choice(len(token_lists), size=min(len(token_lists), n_others), replace=False)
                lists += [token_lists[j] for j in others]
                ans += [starts[j] for j in others]
                packed = pack(lists, rng.permutation(len(lists)), T, eos_id, ans)
                for b in range(math.ceil(len(packed["input_ids"]) / batch_size)):
                    rec["losses"].append(update(packed, slice(b * batch_size, (b + 1) * batch_size)))
                    rec["steps"] += 1
                    if signals.received:
                        rec["interrupted"] = signals.received
                    elif max_minutes is not None and time.perf_counter() - t_session >= 60 * max_minutes:
                        rec["interrupted"] = "time"
                    if rec["interrupted"] or rec["steps"] >= fix_misses:
                        break
                wrong = np.flatnonzero(score(fit_data, len(fit_lists))[1])
                hard.update(wrong.tolist())
                rec["rounds"].append({"steps": rec["steps"], "wrong": len(wrong), "trained_on": len(train_on),
                                      "seconds": time.perf_counter() - t0})
                say(f"fixing misses: after {_plural(rec['steps'], 'step')}, {len(wrong)} of {len(fit_lists)} "
                    f"training questions not answered exactly")
                if len(wrong) <= len(kept["wrong"]):
                    kept = snapshot()
            rec["kept_after_steps"] = kept["steps"]
            if kept["steps"] != rec["steps"]:  # a later round ended worse: go back to the best one
                model.load_state_dict(kept["state"])
                wrong = kept["wrong"]
                say(f"fixing misses: keeping the weights after {_plural(kept['steps'], 'step')} ({len(wrong)} wrong)")
            del kept
            rec.update(after=len(wrong), seconds=time.perf_counter() - t0,
                       still_wrong=[{"line": fit_entries[i].line, "question": fit_entries[i].question} for i in wrong])
            return rec

        settings = (f"lr {lr:g}, dropout {dropout:g}, loss on {'answer tokens' if loss == 'answer' else 'all tokens'}"
                    + (f", label smoothing {label_smoothing:g}" if label_smoothing else "")
                    + f", weight decay {weight_decay:g}, {_plural(n_threads, 'thread')} on {device}")
        log(f"training {preset} ({n_params / 1e6:.2f}M parameters, vocab {vocab_size}, context {T}) on "
            f"{_plural(len(entries), 'entry', 'entries')} ({sum(map(len, token_lists))} tokens"
            + (f", {augment_counts['variants']} of them augmented variants" if augment_counts else "") + ")"
            + (f", validating on {len(val_entries)} held-out questions" if val_entries else "") + f"; {settings}")
        left = total_steps - step
        log(f"plan: {_plural(total_steps, 'step')} ({_plural(epochs, 'epoch')} of ~{steps_per_epoch[0]} at batch "
            f"{batch_size}" + (f", capped by --max-steps {max_steps}" if max_steps and max_steps < sum(steps_per_epoch)
                               else "") + ")" + (f", {left} to go" if step else "")
            + (f"; stopping after {max_minutes:g} min (--max-minutes)" if max_minutes else ""))

        # -- the loop ---------------------------------------------------------------------------
        resume_hint = f"continue with `tinygpt train ... -o {out_dir} --resume` (the same arguments)"
        bar = None
        if progress and sys.stderr.isatty():
            from .ui import progress_bar

            bar = progress_bar(total=total_steps, initial=step, desc="train", unit="step")

        def say(msg):  # a line that does not break the progress bar
            if bar is not None:
                bar.write(msg, file=sys.stderr)
            else:
                log(msg)

        log_every = max(1, total_steps // 20)
        # --max-minutes without --max-steps on a new run: fit the schedule to the time
        fit_to_time = bool(max_minutes) and max_steps is None and resumed_from is None
        stopped = False
        step_times: list[float] = []
        speed = None  # measured seconds per step
        t_session = time.perf_counter()
        t_start = t_session - elapsed
        with _StopSignals() as signals:
            while step < total_steps and not stopped:
                data = pack(token_lists, epoch_order(n, seed, epoch), T, eos_id, starts)
                n_blocks = len(data["input_ids"])
                for b in range(batch_in_epoch, math.ceil(n_blocks / batch_size)):
                    sl = slice(b * batch_size, (b + 1) * batch_size)
                    t0 = time.perf_counter()
                    losses.append(update(data, sl))
                    scheduler.step()
                    step += 1
                    batch_in_epoch = b + 1
                    step_times.append(time.perf_counter() - t0)
                    tokens_seen += data["input_ids"][sl].size
                    real_tokens_seen += int(data["real"][sl].sum())
                    elapsed = time.perf_counter() - t_start
                    # the estimate: the first step of a session pays one-off costs; time the next ones
                    if speed is None and len(step_times) == 1 + ESTIMATE_STEPS:
                        speed = float(np.mean(step_times[1:]))
                        left = total_steps - step
                        say(f"speed: {speed:.2f} s/step (measured over {ESTIMATE_STEPS} steps) -> "
                            f"{_plural(left, 'step')} left, about {_minutes(left * speed)}, expected total "
                            f"{_minutes(elapsed + left * speed)}")
                    if speed is not None and len(step_times) % 50 == 0:  # follow the machine's load
                        speed = float(np.mean(step_times[-50:]))
                    if fit_to_time and speed is not None and (len(step_times) == 1 + ESTIMATE_STEPS
                                                              or len(step_times) % 50 == 0):
                        # the schedule ends when the budget does: the last steps run at the low rate
                        # that a stop by --max-minutes in mid-schedule never reaches. The rate per
                        # step includes the validations so far (and the first step's one-off cost).
                        # The recent speed (last 50 steps), so that the plan follows the machine's load both
                        # ways: a busy spell shortens it, and it grows back (up to the plan) when it ends.
                        spent = time.perf_counter() - t_session
                        fit = step + int((max_minutes * 60 * TIME_FIT_SHARE - spent) / (speed * TIME_FIT_MARGIN))
                        fit = min(fit, identity.get("planned_steps") or total_steps)
                        if step < fit != total_steps:
                            if identity.get("planned_steps") is None:
                                identity["planned_steps"] = total_steps
                                say(f"--max-minutes {max_minutes:g}: about {_plural(fit, 'step')} fit in the time, so "
                                    f"the learning-rate schedule now ends there (planned: {total_steps})")
                            total_steps = fit
                            identity["total_steps"] = total_steps
                            log_every = max(1, total_steps // 20)
                            if bar is not None:
                                bar.total = total_steps
                    if bar is not None:
                        post = dict(loss=f"{losses[-1]:.3f}", epoch=epoch + 1, lr=f"{scheduler.get_last_lr()[0]:.2e}")
                        if speed is not None:
                            post.update(s_step=f"{speed:.2f}", total=_minutes(elapsed + (total_steps - step) * speed))
                        if best is not None:
                            post["val"] = f"{100 * val_history[-1]['val_exact']:.0f}%"
                        bar.set_postfix(post)
                        bar.update(1)
                    elif progress and (step % log_every == 0 or step == total_steps):
                        est = f", ~{_minutes((total_steps - step) * speed)} left" if speed else ""
                        log(f"step {step}/{total_steps} (epoch {epoch + 1}): loss {np.mean(losses[-log_every:]):.4f}, "
                            f"lr {scheduler.get_last_lr()[0]:.2e}{est}")
                    if val_data is not None and (step % val_every == 0 or step == total_steps):
                        run_validation()
                        if early_stop is not None and evals_since_best >= early_stop:
                            stopped = "early_stop"
                    if not stopped and signals.received:
                        stopped = signals.received
                    if not stopped and max_minutes is not None and time.perf_counter() - t_session >= 60 * max_minutes:
                        stopped = "time"
                    if not stopped and stop_after is not None and step >= stop_after:
                        stopped = "stop_after"
                    if stopped or step >= total_steps:
                        break
                    if checkpoint_every and step % checkpoint_every == 0:
                        checkpoint()
                else:
                    epoch, batch_in_epoch = epoch + 1, 0
            if bar is not None:
                bar.close()
                bar = None
            if fix_misses and (not stopped and step >= total_steps or stopped == "early_stop"):
                fixes.append(fix_training_misses(signals, t_session))
                if val_data is not None:
                    run_validation(after_fix=True)
            elif fix_misses and stopped != "stop_after":
                log(f"--fix-misses: not run, the run stopped before its planned steps; {resume_hint} and it runs "
                    f"at the end")
            if val_data is not None and stopped in ("time", "SIGINT", "SIGTERM") and \
                    (not val_history or val_history[-1]["step"] != step):
                run_validation()
            checkpoint()
        if stopped == "stop_after":
            log(f"stopped after step {step}/{total_steps}; checkpoint in {out_dir / CHECKPOINT_DIR}; {resume_hint}")
            return {"out_dir": str(out_dir), "steps": step, "total_steps": total_steps, "stopped": stopped,
                    "losses": losses}

        # -- outputs: also when stopped early, so that the run directory always holds a model ---------
        save_model(out_dir)
        tail = losses[-min(len(losses), max(1, steps_per_epoch[0])):]
        info = {
            # absolute paths: `tinygpt convert RUN` from another folder finds the same corpus (for drafts)
            "args": {"corpus": str(corpus.resolve()), "tokenizer": str(tok_file.resolve()),
                     "out_dir": str(out_dir.resolve()), "preset": preset, "arch": arch,
                     "epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed, "dropout": dropout,
                     "checkpoint_every": checkpoint_every, "max_steps": max_steps, "warmup_steps": warmup_steps,
                     "min_lr_ratio": min_lr_ratio, "weight_decay": weight_decay, "schedule": schedule,
                     "threads": n_threads, "device": device, "loss": loss, "label_smoothing": label_smoothing,
                     "val_split": val_split, "val_file": str(val_file.resolve()) if val_file else None,
                     "val_every": val_every, "early_stop": early_stop, "augment": augment,
                     "max_minutes": max_minutes, "fix_misses": fix_misses, "abstain": abstain,
                     "abstain_questions": str(Path(abstain_questions).resolve()) if abstain_questions else None},
            "abstain": {"answer": abstain_text, "off_topic_questions": n_abstain},
            "planned_steps": identity.get("planned_steps"),
            "stopped": stopped, "steps": step, "total_steps": total_steps,
            "epochs_completed": int(np.searchsorted(np.cumsum(steps_per_epoch), step, side="right")),
            "steps_per_epoch": steps_per_epoch[0], "entries": len(entries), "val_entries": len(val_entries),
            "augmented": augment_counts,
            "entry_tokens": sum(map(len, token_lists)), "n_params": n_params, "vocab_size": vocab_size,
            "final_loss": losses[-1] if losses else None,
            "final_loss_mean_last_epoch": float(np.mean(tail)) if tail else None,
            "wall_time_s": elapsed, "seconds_per_step": elapsed / max(1, step),
            "tokens_per_s": tokens_seen / elapsed if elapsed > 0 else None,
            "real_tokens_per_s": real_tokens_seen / elapsed if elapsed > 0 else None,
            "padding_fraction": 1.0 - real_tokens_seen / tokens_seen if tokens_seen else None,
            "resumed_from_step": resumed_from,
            "validation": val_history, "best": best, "fixed_misses": fixes,
            "torch_version": torch.__version__, "transformers_version": transformers.__version__,
            "python_version": sys.version.split()[0],
            "corpus_sha256": identity["corpus_sha256"], "tokenizer_sha256": identity["tokenizer_sha256"],
            "losses": losses,
        }
        tmp = out_dir / "train_log.json.tmp"
        tmp.write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, out_dir / "train_log.json")
        # the plots last: the model and the log are complete whatever happens to them
        plots = [("loss.png", lambda p: plot_loss(losses, p, title=f"tinygpt {preset}: "
                  f"{_plural(len(entries), 'entry', 'entries')}, {_plural(step, 'step')}"))]
        if val_history:
            plots.append(("val.png", lambda p: plot_validation(
                val_history, p, title=f"tinygpt {preset}: validation on {len(val_entries)} held-out questions")))
        for name, draw in plots if can_plot else []:
            try:
                draw(out_dir / name)
            except Exception as e:  # a plot is cosmetic: say so, never fail the finished run
                log(f"warning: {name} not drawn ({type(e).__name__}: {e})")
        if not can_plot:
            log(f"{' and '.join(n for n, _ in plots)} not drawn: matplotlib is not installed ({MATPLOTLIB_INSTALL})")
        why = {False: "done", "time": f"stopped at the --max-minutes {max_minutes:g} limit" if max_minutes else "",
               "early_stop": f"stopped early: no better validation in {early_stop} evaluations",
               "SIGINT": "interrupted (Ctrl-C)", "SIGTERM": "terminated (SIGTERM)"}[stopped]
        log(f"{why}: {_plural(step, 'step')} of {total_steps} in {_minutes(elapsed)} "
            f"({elapsed / max(1, step):.2f} s/step, {info['tokens_per_s'] or 0:.0f} tokens/s), final loss "
            f"{info['final_loss_mean_last_epoch']:.4f} (mean of the last {_plural(len(tail), 'step')}); model in {out_dir}")
        for fx in fixes[-1:] if fix_misses else []:
            still = ", ".join(f"{w['question']!r} (line {w['line']})" for w in fx["still_wrong"][:10])
            log(f"fixing misses: {fx['before']} -> {fx['after']} of {fx['questions']} training questions answered "
                f"wrong, {_plural(fx['steps'], 'more step')} in {_minutes(fx['seconds'])}"
                + (f" ({'interrupted' if fx['interrupted'] != 'time' else 'stopped at --max-minutes'})"
                   if fx["interrupted"] else "")
                + (f"; still wrong: {still}" + (" ..." if fx["after"] > 10 else "") if still else ""))
        if best is not None:
            log(f"best validation: {best['val_exact_count']}/{best['val_n']} exact ({100 * best['val_exact']:.1f} %) "
                f"at step {best['step']}: model in {out_dir / BEST_DIR} (tinygpt convert {out_dir / BEST_DIR} -o ...)")
        if stopped:
            log(f"checkpoint in {out_dir / CHECKPOINT_DIR}; {resume_hint}")
        return {"out_dir": str(out_dir), **info}
    finally:
        torch.set_num_threads(prev_threads)
