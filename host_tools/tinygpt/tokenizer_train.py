"""Train the tinygpt tokenizer: a Hugging Face byte-level BPE with no prefix space.

``train_tokenizer(corpus_path, out_dir, vocab_size=4096, special_tokens_file=None,
min_frequency=2, space_variants=True) -> Path`` writes ``out_dir/tokenizer.json`` (loadable by
``tokenizers.Tokenizer.from_file`` and ``transformers.PreTrainedTokenizerFast(tokenizer_file=...)``),
``vocab.json`` + ``merges.txt`` + ``added_tokens.json`` (GPT-2 style) and a small
``tokenizer_config.json``, and returns the path of
tokenizer.json.

Added tokens, in id order from 0:
  * ``<|endoftext|>``, ``Q:``, ``A:``, ``Do:`` (ids 0..3): special tokens (``special=True``).
  * the domain words of ``special_tokens_file`` (one per line, surrounding whitespace stripped,
    ``#`` comment lines and blank lines ignored, duplicates refused; the four above may be listed
    too and are then skipped), in file order, each followed by its space-prefixed variant
    " word" unless ``space_variants=False``.

Domain words are *added* tokens: Hugging Face (and spec step 1, and py/bpe.py) split them out of
the text wherever they occur, before the pre-tokenizer, so each occurrence is exactly one token,
even inside a longer word ("thermostats" -> "thermostat" + "s") and whatever the BPE merges
learned. They are marked ``special=False`` so that ``decode(..., skip_special_tokens=True)`` keeps
them. Matching is case-sensitive ("Thermostat" is not "thermostat": list both if both matter).
Without the " word" variant, "set the thermostat" would become ... "the", " ", "thermostat"
(the space left over as a token of its own); with it, "the", " thermostat" as GPT-2 spells words.
In the model file all of them are in the section's special list (spec 6).

The BPE merges are learned from the corpus as the tokenizer will see it: each line is split
around the added tokens first and the remaining segments are what the trainer counts, so no merge
is spent on text that is always split out.

If the corpus is too small to reach ``vocab_size`` the tokenizer is smaller: a UserWarning says
so, with the size reached (``tokenizers.Tokenizer.from_file(path).get_vocab_size()``).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

from .tokenizer_section import CORE_SPECIALS, build_section


def read_special_tokens_file(path) -> list[str]:
    """Domain words of a special-tokens file: one per line; surrounding whitespace stripped;
    blank lines and lines starting with '#' ignored; the four core specials may be listed (they
    are skipped: they are always there, first). A one-byte word ("X") is skipped with a
    UserWarning: a byte-level BPE has every byte as a token already (and needs it as exactly
    one). A word listed twice raises ValueError."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"special tokens file not found: {p}")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"special tokens file {p} is not UTF-8: {e}") from None
    words: list[str] = []
    where: dict[str, int] = {}
    for no, line in enumerate(lines, 1):
        w = line.strip()
        if not w or w.startswith("#"):
            continue
        if w in where:
            raise ValueError(f"{p}:{no}: duplicate special token {w!r} (first on line {where[w]})")
        where[w] = no
        if w in CORE_SPECIALS:
            continue
        if len(w.encode("utf-8")) < 2:  # already a token: the byte-level BPE has every byte
            warnings.warn(f"{p}:{no}: skipped special token {w!r}: a single character is already one token",
                          UserWarning, stacklevel=3)
            continue
        words.append(w)
    return words


def _split_added(line: str, added: list[str]) -> list[str]:
    """The segments of line between added tokens (leftmost match, longest at the same place)."""
    out = []
    pos = 0
    n = len(line)
    while pos < n:
        best, blen = -1, 0
        for a in added:
            k = line.find(a, pos)
            if k >= 0 and (best < 0 or k < best or (k == best and len(a) > blen)):
                best, blen = k, len(a)
        if best < 0:
            out.append(line[pos:])
            break
        if best > pos:
            out.append(line[pos:best])
        pos = best + blen
    return out


def train_tokenizer(corpus_path, out_dir, vocab_size: int = 4096, special_tokens_file=None,
                    min_frequency: int = 2, space_variants: bool = True) -> Path:
    """Train a byte-level BPE tokenizer (no prefix space) on a UTF-8 text file; see the module
    docstring. Returns out_dir/tokenizer.json."""
    from tokenizers import ByteLevelBPETokenizer, Tokenizer

    corpus = Path(corpus_path)
    if not corpus.is_file():
        raise ValueError(f"corpus file not found: {corpus}")
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
        raise ValueError(f"vocab_size must be an int, got {vocab_size!r}")
    if not isinstance(min_frequency, int) or isinstance(min_frequency, bool) or min_frequency < 0:
        raise ValueError(f"min_frequency must be an int >= 0, got {min_frequency!r}")
    words = read_special_tokens_file(special_tokens_file) if special_tokens_file is not None else []
    added = list(CORE_SPECIALS)
    domain = []
    for w in words:
        domain.append(w)
        if space_variants and " " + w not in added + domain:
            domain.append(" " + w)
    added += domain
    if vocab_size < 256 + len(added):
        raise ValueError(f"vocab_size {vocab_size} is too small: 256 byte tokens + {len(added)} added "
                         f"tokens need at least {256 + len(added)}")
    if vocab_size > 65536:
        raise ValueError(f"vocab_size {vocab_size} is larger than the model format allows (65536)")
    try:
        text = corpus.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"corpus {corpus} is not valid UTF-8: {e}") from None
    if not text.strip():
        raise ValueError(f"corpus {corpus} is empty")

    def segments():
        for line in text.splitlines(keepends=True):
            yield from _split_added(line, added)

    bl = ByteLevelBPETokenizer(add_prefix_space=False)
    bl.train_from_iterator(segments(), vocab_size=vocab_size, min_frequency=min_frequency,
                           special_tokens=added, show_progress=False)
    d = json.loads(bl._tokenizer.to_str())
    dset = set(domain)
    for a in d["added_tokens"]:
        if a["content"] in dset:
            a["special"] = False
    tok = Tokenizer.from_str(json.dumps(d))
    got = [tok.token_to_id(a) for a in added]
    if got != list(range(len(added))):  # pragma: no cover - the trainer puts them first
        raise RuntimeError(f"added tokens did not get ids 0..{len(added) - 1}: {got}")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "tokenizer.json"
    tok.save(str(path))
    tok.model.save(str(out))
    # GPT-2 style files: vocab.json holds the added tokens' raw text, added_tokens.json says which
    (out / "added_tokens.json").write_text(json.dumps({a: i for i, a in enumerate(added)}, ensure_ascii=False)
                                           + "\n", encoding="utf-8")
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "add_prefix_space": False,
        "model_max_length": 1024,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    build_section(tok)  # the tokenizer must be one the device reproduces; raises otherwise
    n = tok.get_vocab_size()
    if n < vocab_size:
        warnings.warn(f"corpus {corpus} is too small for vocab_size {vocab_size}: training stopped at "
                      f"{n} tokens ({len(d['model']['merges'])} merges; min_frequency={min_frequency})",
                      UserWarning, stacklevel=2)
    return path


# ----------------------------------------------------------------------------- the command

def add_arguments(p) -> None:
    """`tinygpt tokenizer ACTION`'s actions: train (the only one)."""
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    tt = sub.add_parser("train", help="train a tokenizer (Hugging Face tokenizers, byte-level BPE)")
    tt.add_argument("corpus")
    tt.add_argument("-o", "--output", required=True, help="directory for tokenizer.json, vocab.json, merges.txt")
    tt.add_argument("--vocab-size", type=int, default=4096)
    tt.add_argument("--special-tokens", help="file of domain words that must stay one token (one per line, # comments)")
    tt.add_argument("--min-frequency", type=int, default=2)


def run_cli(args) -> None:
    """`tinygpt tokenizer train`: the tokenizer, its notices as one plain line each, its size."""
    import sys

    from .ui import existing_file

    corpus = existing_file(args.corpus, "corpus file")
    with warnings.catch_warnings(record=True) as caught:  # tinygpt's notices: one plain line each
        warnings.simplefilter("always", UserWarning)
        out = train_tokenizer(corpus, args.output, vocab_size=args.vocab_size,
                              special_tokens_file=args.special_tokens, min_frequency=args.min_frequency)
    for w in caught:
        print("tinygpt: warning: %s" % w.message, file=sys.stderr)
    from tokenizers import Tokenizer
    n = Tokenizer.from_file(str(out)).get_vocab_size()
    print("wrote %s (%d tokens)" % (out, n))
