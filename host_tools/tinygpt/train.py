"""Train a tinygpt model (a Hugging Face GPT-2) on the corpus, on the CPU. nanoGPT style: one
function, read top to bottom.

    train(corpus, tokenizer_dir, out_dir, preset="hw1", epochs=..., lr=..., batch_size=16,
          seed=1337, resume=False, checkpoint_every=100, dropout=..., log=print, max_steps=None)

``tinygpt train CORPUS --tokenizer DIR -o RUN_DIR [--preset hw1] [--epochs N] ...`` runs it.

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
from seeing the entries before it. The loss is the next-token cross entropy over every token
of every entry after its first (the padding and the step from one entry into the next are
ignored).

Model and optimizer. ``transformers.GPT2LMHeadModel(make_config(preset, vocab_size=<tokenizer
size>, bos/eos=<|endoftext|>, resid/embd/attn_pdrop=dropout))``, AdamW (betas 0.9/0.95; weight
decay on matrices and embeddings only), linear warmup then cosine (or linear) decay to
``min_lr_ratio * lr``, gradient clipping at 1.0, torch/numpy/python seeded with ``seed``,
``torch.set_num_threads(threads or os.cpu_count())`` (restored on return).

Checkpoints. Every ``checkpoint_every`` steps, at the end, and when stopped by ``stop_after``,
``out_dir/checkpoint/checkpoint.pt`` is written atomically (temporary file, fsync, rename):
model, optimizer, scheduler, the torch/numpy/python RNG states, step, epoch, position in the
epoch, loss history and elapsed time. ``resume=True`` continues from it bit for bit (same
thread count assumed): a resumed run ends with exactly the weights of an uninterrupted one.
The run's settings (corpus and tokenizer hashes, preset, lr, epochs, ...) are stored with the
checkpoint, and resuming with different ones is refused.

Outputs in out_dir: ``model.safetensors`` + ``config.json`` (``save_pretrained``),
``tokenizer.json`` (copied, so ``tinygpt convert out_dir`` works directly), ``loss.png``
(loss per step and smoothed) and ``train_log.json`` (args, steps, final loss, wall time,
tokens/s, versions, loss per step).

Defaults (hw1 preset, the project's corpus of 1000 entries: ~40 tokens per entry, ~380 blocks
of 128 tokens per epoch, 24 steps per epoch at batch 16, ~1.3 s per step on 2 CPU cores):
epochs 50 (~1200 steps, ~26 min), lr 2e-3, dropout 0.1; see DEFAULTS for the measurements.
"""
from __future__ import annotations

import hashlib
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
DEFAULTS = dict(
    epochs=50,
    lr=2e-3,
    dropout=0.1,
    batch_size=16,
    warmup_steps=None,      # None: 5% of the steps, at most 100
    min_lr_ratio=0.1,
    weight_decay=0.01,
    schedule="cosine",
    checkpoint_every=100,   # a hw1 checkpoint is 75 MB (weights + AdamW moments)
)

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "checkpoint.pt"
# Files that say a directory holds a training run.
RUN_MARKERS = ("train_log.json", "config.json", "model.safetensors", CHECKPOINT_DIR)
# Settings that must be equal to resume a run (everything that changes the numbers).
IDENTITY_KEYS = ("corpus_sha256", "tokenizer_sha256", "preset", "config", "epochs", "lr", "batch_size",
                 "seed", "dropout", "max_steps", "warmup_steps", "min_lr_ratio", "weight_decay", "schedule")


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tokenizer_path(tokenizer_dir) -> Path:
    """tokenizer.json inside tokenizer_dir (or tokenizer_dir itself if it is the file)."""
    p = Path(tokenizer_dir)
    return p if p.is_file() else p / "tokenizer.json"


# ----------------------------------------------------------------------------- packing

def pack(token_lists, order, n_positions: int, eos_id: int):
    """Greedily pack whole entries (token id lists, taken in ``order``) into blocks of
    n_positions tokens. Returns numpy int64 arrays [n_blocks, n_positions]: input_ids (padding
    = eos_id), targets (next token inside the same entry, else -100), position_ids (restart at
    0 for each entry and for the padding) and segment ids (entry number in the block; padding
    gets its own), plus ``real`` (bool: not padding)."""
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
            at += n
        pos[b, at:] = np.arange(n_positions - at)
        seg[b, at:] = len(members)
    return {"input_ids": ids, "targets": tgt, "position_ids": pos, "segments": seg, "real": real}


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
    return torch.load(p, map_location="cpu", weights_only=True)


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
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("cross entropy (nats/token)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.fspath(path))


# ----------------------------------------------------------------------------- training

def train(corpus, tokenizer_dir, out_dir, preset="hw1", epochs=DEFAULTS["epochs"], lr=DEFAULTS["lr"],
          batch_size=DEFAULTS["batch_size"], seed=1337, resume=False,
          checkpoint_every=DEFAULTS["checkpoint_every"], dropout=DEFAULTS["dropout"], log=print,
          max_steps=None, *, warmup_steps=DEFAULTS["warmup_steps"], min_lr_ratio=DEFAULTS["min_lr_ratio"],
          weight_decay=DEFAULTS["weight_decay"], schedule=DEFAULTS["schedule"], threads=None,
          stop_after=None, progress=True) -> dict:
    """Train GPT-2 ``preset`` on ``corpus`` with the tokenizer in ``tokenizer_dir``; write the
    run into ``out_dir``. See the module docstring. Returns the train_log dict (plus
    ``out_dir``; ``stopped=True`` when ``stop_after`` ended it early).

    ``max_steps`` caps the total steps (the LR schedule then spans max_steps); ``stop_after``
    stops after that many steps as if interrupted (checkpoint written, no final model; the
    schedule is unchanged), to be continued with ``resume=True``. ``checkpoint_every=0``
    writes only the final checkpoint. Bad inputs raise ValueError.
    """
    import torch
    import transformers
    from tokenizers import Tokenizer
    from transformers import GPT2LMHeadModel

    from .presets import PRESETS, make_config

    log = log or (lambda *a, **k: None)

    # -- arguments --------------------------------------------------------------------------
    def need_int(name, v, lo, allow_none=False):
        if v is None and allow_none:
            return
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")

    need_int("epochs", epochs, 1)
    need_int("batch_size", batch_size, 1)
    need_int("seed", seed, 0)
    need_int("checkpoint_every", checkpoint_every, 0, allow_none=True)
    need_int("max_steps", max_steps, 1, allow_none=True)
    need_int("warmup_steps", warmup_steps, 0, allow_none=True)
    need_int("threads", threads, 1, allow_none=True)
    need_int("stop_after", stop_after, 1, allow_none=True)
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if not (isinstance(min_lr_ratio, (int, float)) and 0.0 <= min_lr_ratio <= 1.0):
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")
    if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if schedule not in ("cosine", "linear"):
        raise ValueError(f"schedule must be 'cosine' or 'linear', got {schedule!r}")
    if isinstance(preset, str) and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")

    # -- corpus -----------------------------------------------------------------------------
    corpus = Path(corpus)
    if not corpus.is_file():
        raise ValueError(f"corpus not found: {corpus}")
    problems = corpus_mod.check(corpus)
    if problems:
        shown = "\n".join(f"  {corpus}:{p.line}: {p.message}" for p in problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ValueError(f"corpus {corpus} has {len(problems)} problem(s); fix them first "
                         f"(tinygpt corpus check {corpus}):\n{shown}{more}")
    entries = corpus_mod.parse(corpus)

    # -- tokenizer --------------------------------------------------------------------------
    tok_file = tokenizer_path(tokenizer_dir)
    if not tok_file.is_file():
        raise ValueError(f"tokenizer not found: {tok_file} (train one with tinygpt.tokenizer_train)")
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
    preset_vocab = (PRESETS[preset] if isinstance(preset, str) else dict(preset)).get("vocab_size")
    if preset_vocab is not None and vocab_size > preset_vocab:
        raise ValueError(f"tokenizer {tok_file} has {vocab_size} tokens but preset {preset!r} is sized for "
                         f"{preset_vocab}; train the tokenizer with vocab_size={preset_vocab} or pick another preset")

    config = make_config(preset, vocab_size=vocab_size, bos_token_id=eos_id, eos_token_id=eos_id,
                         resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    T = config.n_positions
    token_lists = [enc.ids for enc in tok.encode_batch(corpus_mod.training_texts(entries), add_special_tokens=False)]
    for e, ids in zip(entries, token_lists):
        if len(ids) > T:
            raise ValueError(f"{corpus}:{e.line}: {e.kind} entry is {len(ids)} tokens, longer than the "
                             f"context of {T} (n_positions of preset {preset!r}); shorten it")
        if not ids or ids[-1] != eos_id:
            raise ValueError(f"{corpus}:{e.line}: entry does not end with the {corpus_mod.EOS} token once "
                             f"tokenized; is {corpus_mod.EOS} a special token of {tok_file}?")
    if not entries:
        raise ValueError(f"corpus {corpus} has no entries")

    # -- the plan: steps per epoch (packing depends on the epoch's order) and the schedule --
    n = len(entries)
    steps_per_epoch = [math.ceil(count_blocks(token_lists, epoch_order(n, seed, ep), T) / batch_size)
                       for ep in range(epochs)]
    total_steps = sum(steps_per_epoch) if max_steps is None else min(max_steps, sum(steps_per_epoch))
    if warmup_steps is None:
        warmup_steps = min(100, max(1, total_steps // 20))
    identity = {
        "corpus_sha256": _sha256(corpus), "tokenizer_sha256": _sha256(tok_file),
        "preset": preset, "config": {k: v for k, v in sorted(config.to_dict().items())
                                     if k not in ("transformers_version", "dtype", "torch_dtype")},
        "epochs": epochs, "lr": float(lr), "batch_size": batch_size, "seed": seed, "dropout": float(dropout),
        "max_steps": max_steps, "warmup_steps": warmup_steps, "min_lr_ratio": float(min_lr_ratio),
        "weight_decay": float(weight_decay), "schedule": schedule,
    }

    # -- out_dir: a fresh directory, or the same run to resume ----------------------------------
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {out_dir} exists and is not a directory")
    markers = [m for m in RUN_MARKERS if (out_dir / m).exists()]
    ckpt = None
    if resume:
        ckpt = load_checkpoint(out_dir) if out_dir.is_dir() else None
        if ckpt is None and markers:
            raise ValueError(f"cannot resume: {out_dir} holds a run ({', '.join(markers)}) but no checkpoint "
                             f"({CHECKPOINT_DIR}/{CHECKPOINT_FILE})")
        if ckpt is not None:
            old = ckpt["identity"]
            diff = [k for k in IDENTITY_KEYS if old.get(k) != identity[k]]
            if diff:
                detail = "; ".join(f"{k}: checkpoint {old.get(k)!r} vs now {identity[k]!r}"
                                   for k in diff if k != "config")
                if "config" in diff:
                    detail = (detail + "; " if detail else "") + "model config differs"
                raise ValueError(f"cannot resume {out_dir}: the checkpoint is from a different run ({detail})")
        else:
            log(f"no checkpoint in {out_dir}: starting a new run")
    elif markers:
        raise ValueError(f"out_dir {out_dir} already holds a training run ({', '.join(markers)}); "
                         f"pass resume=True to continue it, or choose another directory")
    out_dir.mkdir(parents=True, exist_ok=True)

    # -- model, optimizer, schedule ---------------------------------------------------------------
    prev_threads = torch.get_num_threads()
    n_threads = threads or os.cpu_count() or 1
    torch.set_num_threads(n_threads)
    try:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
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

        step, epoch, batch_in_epoch = 0, 0, 0
        losses: list[float] = []
        elapsed, tokens_seen, real_tokens_seen = 0.0, 0, 0
        resumed_from = None
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            _set_rng_states(ckpt["rng"])
            step, epoch, batch_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]
            losses = list(ckpt["losses"])
            elapsed, tokens_seen, real_tokens_seen = ckpt["elapsed"], ckpt["tokens"], ckpt["real_tokens"]
            resumed_from = step
            log(f"resuming {out_dir} at step {step}/{total_steps} (epoch {epoch + 1}/{epochs})")
            del ckpt

        def checkpoint():
            save_checkpoint(out_dir, {
                "version": 1, "identity": identity, "step": step, "epoch": epoch,
                "batch_in_epoch": batch_in_epoch, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": _rng_states(), "losses": losses, "elapsed": elapsed, "tokens": tokens_seen,
                "real_tokens": real_tokens_seen,
            })

        log(f"training {preset} ({n_params / 1e6:.2f}M parameters, vocab {vocab_size}, context {T}) on "
            f"{len(entries)} entries ({sum(map(len, token_lists))} tokens), {steps_per_epoch[0]} steps/epoch at "
            f"batch {batch_size}, {total_steps} steps, lr {lr:g}, dropout {dropout:g}, {n_threads} thread(s)")

        # -- the loop ---------------------------------------------------------------------------
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", file=sys.stderr,
                       dynamic_ncols=True)
        stopped = False
        t_start = time.perf_counter() - elapsed
        while step < total_steps and not stopped:
            data = pack(token_lists, epoch_order(n, seed, epoch), T, eos_id)
            n_blocks = len(data["input_ids"])
            for b in range(batch_in_epoch, math.ceil(n_blocks / batch_size)):
                sl = slice(b * batch_size, (b + 1) * batch_size)
                x = torch.from_numpy(data["input_ids"][sl])
                y = torch.from_numpy(data["targets"][sl])
                pos = torch.from_numpy(data["position_ids"][sl])
                mask = attention_mask(data["segments"][sl])
                t0 = time.perf_counter()
                logits = model(input_ids=x, position_ids=pos, attention_mask=mask).logits
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1),
                                                         ignore_index=-100)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                dt = time.perf_counter() - t0
                step += 1
                batch_in_epoch = b + 1
                losses.append(float(loss.item()))
                tokens_seen += x.numel()
                real_tokens_seen += int(data["real"][sl].sum())
                elapsed = time.perf_counter() - t_start
                if bar is not None:
                    bar.set_postfix(loss=f"{losses[-1]:.3f}", epoch=epoch + 1, lr=f"{scheduler.get_last_lr()[0]:.2e}",
                                    tok_s=f"{x.numel() / dt:.0f}")
                    bar.update(1)
                if step >= total_steps:
                    break
                if stop_after is not None and step >= stop_after:
                    stopped = True
                    break
                if checkpoint_every and step % checkpoint_every == 0:
                    checkpoint()
            else:
                epoch, batch_in_epoch = epoch + 1, 0
        if bar is not None:
            bar.close()
        checkpoint()
        if stopped:
            log(f"stopped after step {step}/{total_steps}; checkpoint in {out_dir / CHECKPOINT_DIR}, "
                f"continue with resume=True")
            return {"out_dir": str(out_dir), "steps": step, "total_steps": total_steps, "stopped": True,
                    "losses": losses}

        # -- outputs -------------------------------------------------------------------------------
        model.eval()
        with quiet_hf():
            model.save_pretrained(out_dir)
        shutil.copyfile(tok_file, out_dir / "tokenizer.json")
        plot_loss(losses, out_dir / "loss.png", title=f"tinygpt {preset}: {len(entries)} entries, {step} steps")
        tail = losses[-min(len(losses), max(1, steps_per_epoch[0])):]
        info = {
            "args": {"corpus": str(corpus), "tokenizer": str(tok_file), "out_dir": str(out_dir), "preset": preset,
                     "epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed, "dropout": dropout,
                     "checkpoint_every": checkpoint_every, "max_steps": max_steps, "warmup_steps": warmup_steps,
                     "min_lr_ratio": min_lr_ratio, "weight_decay": weight_decay, "schedule": schedule,
                     "threads": n_threads},
            "steps": step, "total_steps": total_steps,
            "epochs_completed": int(np.searchsorted(np.cumsum(steps_per_epoch), step, side="right")),
            "steps_per_epoch": steps_per_epoch[0], "entries": len(entries),
            "entry_tokens": sum(map(len, token_lists)), "n_params": n_params, "vocab_size": vocab_size,
            "final_loss": losses[-1] if losses else None,
            "final_loss_mean_last_epoch": float(np.mean(tail)) if tail else None,
            "wall_time_s": elapsed, "seconds_per_step": elapsed / max(1, step),
            "tokens_per_s": tokens_seen / elapsed if elapsed > 0 else None,
            "real_tokens_per_s": real_tokens_seen / elapsed if elapsed > 0 else None,
            "padding_fraction": 1.0 - real_tokens_seen / tokens_seen if tokens_seen else None,
            "resumed_from_step": resumed_from,
            "torch_version": torch.__version__, "transformers_version": transformers.__version__,
            "python_version": sys.version.split()[0],
            "corpus_sha256": identity["corpus_sha256"], "tokenizer_sha256": identity["tokenizer_sha256"],
            "losses": losses,
        }
        tmp = out_dir / "train_log.json.tmp"
        tmp.write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, out_dir / "train_log.json")
        log(f"done: {step} steps in {elapsed / 60:.1f} min ({elapsed / max(1, step):.2f} s/step, "
            f"{info['tokens_per_s']:.0f} tokens/s), final loss {info['final_loss_mean_last_epoch']:.4f} "
            f"(mean of the last {len(tail)} steps); model in {out_dir}")
        return {"out_dir": str(out_dir), "stopped": False, **info}
    finally:
        torch.set_num_threads(prev_threads)
