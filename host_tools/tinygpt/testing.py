"""Helpers for tests and benchmarks: small random Hugging Face GPT-2 models with a matching
byte-level BPE tokenizer, built deterministically from a seed.

``make_random_hf_model(out_dir, vocab_size, n_embd, n_head, n_layer, n_inner, n_positions,
activation='gelu_new', seed=0, save_format='safetensors')`` writes ``config.json``, the weights
(``model.safetensors`` or ``pytorch_model.bin``) and ``tokenizer.json`` into ``out_dir``.

Initialisation (documented because other tests rely on it): Hugging Face's GPT-2 init with
``initializer_range = init_std`` (default 0.1 instead of 0.02, so logits and attention scores
are O(1) rather than near zero; HF still divides the ``c_proj`` weights' std by
sqrt(2 * n_layer)); then, drawn from a torch.Generator seeded with ``seed``, every Linear/Conv1D
bias ~ N(0, 0.02^2) (HF sets them to 0), every LayerNorm gain = 1 + N(0, 0.1^2) and bias
~ N(0, 0.05^2) (HF sets 1 and 0). So biases and LayerNorm affine terms are exercised. Torch's
global RNG is forked, so callers' random state is untouched. Nothing is cached.
"""

from __future__ import annotations

import json
import os
import random
import tempfile

SPECIAL_TOKENS = ["<|endoftext|>", "Q:", "A:", "Do:"]

_ONSETS = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w",
           "z", "br", "ch", "cl", "dr", "fl", "gr", "pl", "qu", "sh", "sk", "st", "th", "tr", "wh"]
_VOWELS = ["a", "e", "i", "o", "u", "y", "ai", "ea", "ee", "ie", "oo", "ou"]
_CODAS = ["", "", "n", "r", "s", "t", "l", "m", "ng", "st", "ck", "rd", "sh", "x"]
_PUNCT = [".", ",", "?", "!", ";", ":", "'s", "'t", "-", "(", ")", "\""]
_EXTRA = ["é", "ü", "ß", "ø", "→", "€", "日本", "ñ", "°C", "42", "3.14", "1999", "100%"]


def synthetic_text(seed: int = 0, n_words: int = 60000, lexicon_size: int = 6000) -> str:
    """Deterministic pseudo-English: Zipf-distributed random words from a random lexicon,
    some punctuation, digits, non-ASCII characters, and Q:/A:/Do: lines."""
    rng = random.Random(seed)
    lex = set()
    while len(lex) < lexicon_size:
        w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                     for _ in range(rng.randint(1, 4)))
        if w:
            lex.add(w)
    lex = sorted(lex)
    rng.shuffle(lex)
    weights = [1.0 / (i + 1) ** 0.9 for i in range(len(lex))]
    words = rng.choices(lex, weights=weights, k=n_words)
    out = []
    line: list[str] = []
    for i, w in enumerate(words):
        r = rng.random()
        if r < 0.05:
            w = w.capitalize()
        elif r < 0.08:
            w = w + rng.choice(_PUNCT)
        elif r < 0.09:
            w = rng.choice(_EXTRA) + w
        elif r < 0.10:
            w = str(rng.randint(0, 9999))
        line.append(w)
        if len(line) >= rng.randint(6, 16):
            kind = rng.random()
            text = " ".join(line)
            if kind < 0.2:
                out.append("Q: " + text + "?\nA: " + " ".join(rng.sample(words[:200], 4)) + ".")
            elif kind < 0.3:
                out.append("Do: " + text)
            else:
                out.append(text + ".")
            if rng.random() < 0.1:
                out.append("<|endoftext|>")
            line = []
    return "\n".join(out) + "\n"


def make_synthetic_tokenizer(vocab_size: int, seed: int = 0):
    """A ``tokenizers.Tokenizer`` (byte-level BPE, no prefix space) with exactly
    ``vocab_size`` tokens including SPECIAL_TOKENS. Uses the project's
    ``tokenizer_train.train_tokenizer`` when that module exists, else tokenizers directly."""
    from tokenizers import Tokenizer

    min_size = 256 + len(SPECIAL_TOKENS)
    if vocab_size < min_size + 1:
        raise ValueError(f"vocab_size {vocab_size} too small for a byte-level BPE with "
                         f"{len(SPECIAL_TOKENS)} special tokens (need > {min_size})")
    n_words = max(20000, 40 * vocab_size)
    text = synthetic_text(seed, n_words=n_words, lexicon_size=max(2000, 2 * vocab_size))
    try:
        from .tokenizer_train import train_tokenizer  # type: ignore
    except ImportError:
        train_tokenizer = None

    if train_tokenizer is not None:
        import inspect
        import warnings

        kw = {}
        if "min_frequency" in inspect.signature(train_tokenizer).parameters:
            kw["min_frequency"] = 1
        with tempfile.TemporaryDirectory(prefix="tgpt-tok-") as td:
            corpus = os.path.join(td, "corpus.txt")
            with open(corpus, "w", encoding="utf-8") as f:
                f.write(text)
            out = os.path.join(td, "tok")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a short vocabulary is reported below
                res = train_tokenizer(corpus, out, vocab_size=vocab_size, **kw)
            path = os.path.join(out, "tokenizer.json")
            if not os.path.exists(path) and isinstance(res, (str, os.PathLike)) and os.path.isfile(res):
                path = os.fspath(res)
            tok = Tokenizer.from_file(path)
    else:
        from tokenizers import ByteLevelBPETokenizer

        bl = ByteLevelBPETokenizer(add_prefix_space=False)
        bl.train_from_iterator(text.splitlines(keepends=True), vocab_size=vocab_size, min_frequency=1,
                               special_tokens=list(SPECIAL_TOKENS), show_progress=False)
        tok = bl._tokenizer  # the underlying tokenizers.Tokenizer
    got = tok.get_vocab_size(with_added_tokens=True)
    if got != vocab_size:
        raise RuntimeError(f"synthetic tokenizer has {got} tokens, wanted {vocab_size}")
    for s in SPECIAL_TOKENS:
        if tok.token_to_id(s) is None:
            raise RuntimeError(f"synthetic tokenizer lacks special token {s!r}")
    return tok


def save_vocab_merges(tokenizer, out_dir) -> tuple[str, str]:
    """Write ``vocab.json`` + ``merges.txt`` (GPT-2 style files) for a byte-level BPE Tokenizer."""
    files = tokenizer.model.save(os.fspath(out_dir))
    vocab = os.path.join(out_dir, "vocab.json")
    merges = os.path.join(out_dir, "merges.txt")
    assert os.path.exists(vocab) and os.path.exists(merges), files
    return vocab, merges


def make_random_hf_model(out_dir, vocab_size, n_embd, n_head, n_layer, n_inner, n_positions,
                         activation="gelu_new", seed=0, save_format="safetensors", *,
                         init_std=0.1, layer_norm_epsilon=1e-5, tokenizer_format="json",
                         bos_token_id=None):
    """Create a random GPT2LMHeadModel plus tokenizer in ``out_dir`` (created if needed).

    ``save_format``: 'safetensors' (``save_pretrained``) or 'bin' (``config.json`` +
    ``torch.save(state_dict)`` as ``pytorch_model.bin``, keys with the ``transformer.``
    prefix and the tied ``lm_head.weight``). ``tokenizer_format``: 'json' (tokenizer.json),
    'vocab_merges' (vocab.json + merges.txt) or 'both'. ``bos_token_id`` defaults to the
    ``<|endoftext|>`` id. Returns ``{'out_dir', 'model', 'tokenizer', 'config', 'eos_id'}``.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    if save_format not in ("safetensors", "bin"):
        raise ValueError(f"save_format must be 'safetensors' or 'bin', got {save_format!r}")
    if tokenizer_format not in ("json", "vocab_merges", "both"):
        raise ValueError(f"tokenizer_format must be 'json', 'vocab_merges' or 'both', got {tokenizer_format!r}")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)

    tok = make_synthetic_tokenizer(vocab_size, seed=seed)
    eos_id = tok.token_to_id("<|endoftext|>")
    config = GPT2Config(
        vocab_size=vocab_size, n_embd=n_embd, n_head=n_head, n_layer=n_layer, n_inner=n_inner,
        n_positions=n_positions, activation_function=activation, layer_norm_epsilon=layer_norm_epsilon,
        initializer_range=init_std, tie_word_embeddings=True,
        bos_token_id=eos_id if bos_token_id is None else bos_token_id, eos_token_id=eos_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".ln_" in name or name.startswith("transformer.ln_f"):
                    if name.endswith(".weight"):
                        p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
                    else:
                        p.copy_(0.05 * torch.randn(p.shape, generator=gen))
                elif name.endswith(".bias"):
                    p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    model.eval()

    if save_format == "safetensors":
        _save_quietly(model, out_dir)
    else:
        config.save_pretrained(out_dir)
        sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        torch.save(sd, os.path.join(out_dir, "pytorch_model.bin"))

    if tokenizer_format in ("json", "both"):
        tok.save(os.path.join(out_dir, "tokenizer.json"))
    if tokenizer_format in ("vocab_merges", "both"):
        save_vocab_merges(tok, out_dir)
        with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
            json.dump({"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
                       "additional_special_tokens": SPECIAL_TOKENS[1:]}, f)
    return {"out_dir": out_dir, "model": model, "tokenizer": tok, "config": config, "eos_id": eos_id}


def _save_quietly(model, out_dir):
    """save_pretrained without transformers' progress bar in the test output."""
    from .ui import quiet_hf

    with quiet_hf():
        model.save_pretrained(out_dir)


def make_random_hf_llama(out_dir, vocab_size, n_embd, n_head, n_layer, n_inner, n_positions, *,
                         n_kv_head=None, rope_theta=10000.0, tied=False, seed=0, init_std=0.1,
                         rms_norm_eps=1e-5):
    """Create a random LlamaForCausalLM (safetensors) plus a byte-level BPE tokenizer.json in
    ``out_dir``. The RMSNorm gains are drawn around 1 so that they matter. Returns
    ``{'out_dir', 'model', 'tokenizer', 'config', 'eos_id'}``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tok = make_synthetic_tokenizer(vocab_size, seed=seed)
    eos_id = tok.token_to_id("<|endoftext|>")
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=n_embd, num_attention_heads=n_head, num_hidden_layers=n_layer,
        num_key_value_heads=n_kv_head or n_head, intermediate_size=n_inner, max_position_embeddings=n_positions,
        rms_norm_eps=rms_norm_eps, rope_theta=rope_theta, tie_word_embeddings=tied, initializer_range=init_std,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
    model.eval()
    _save_quietly(model, out_dir)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    return {"out_dir": out_dir, "model": model, "tokenizer": tok, "config": config, "eos_id": eos_id}
