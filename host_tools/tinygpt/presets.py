"""Model size presets for tinygpt and a byte-exact size estimator.

``PRESETS[name]`` is a dict of ``transformers.GPT2Config`` keyword arguments;
``make_config(name, **overrides)`` builds the config; ``estimate_bytes(name_or_hparams)``
gives the model file size per docs/model-format.md (exact except for the tokenizer section,
which is estimated unless ``tokenizer_nbytes`` is given) and the KV cache size.
"""

from __future__ import annotations

from . import modelfile

PRESETS: dict[str, dict] = {
    # the hardware target: about 5.8 MB of INT8 weights
    "hw1": dict(vocab_size=4096, n_embd=128, n_head=4, n_layer=22, n_inner=768, n_positions=128),
    "d192x12": dict(vocab_size=4096, n_embd=192, n_head=6, n_layer=12, n_inner=768, n_positions=128),
    "d192x20": dict(vocab_size=4096, n_embd=192, n_head=6, n_layer=20, n_inner=512, n_positions=128),
    "d256x8": dict(vocab_size=4096, n_embd=256, n_head=8, n_layer=8, n_inner=768, n_positions=128),
    # a first try on a user's own corpus: trains in minutes on a laptop CPU (about 1.3M
    # parameters with a 4096-token vocabulary; the same context and vocabulary as hw1)
    "small": dict(vocab_size=4096, n_embd=128, n_head=4, n_layer=4, n_inner=512, n_positions=128),
    # for tests and smoke runs only: a 512-token vocabulary and 64-token context cannot take a
    # real corpus
    "tiny": dict(vocab_size=512, n_embd=64, n_head=4, n_layer=2, n_inner=256, n_positions=64),
}

# Fixed config fields (the engine implements exactly these).
# bos/eos default to None (GPT2Config's 50256 is outside these vocabularies); set them from the
# tokenizer (tokenizer_section.special_token_ids) when training. The converter takes eos from
# the tokenizer anyway and uses bos_token_id only when it is a valid id.
BASE_CONFIG = dict(activation_function="gelu_new", layer_norm_epsilon=1e-5, tie_word_embeddings=True,
                   bos_token_id=None, eos_token_id=None)

# Special tokens the project's tokenizer carries (see tokenizer_train.py).
N_SPECIAL_DEFAULT = 4  # <|endoftext|>, Q:, A:, Do:
# Assumed mean byte length of a learned (merged) token for the tokenizer-size estimate.
AVG_MERGED_TOKEN_BYTES = 6.0


def make_config(preset, **overrides):
    """``transformers.GPT2Config`` for a preset name (or a dict of kwargs), with overrides."""
    from transformers import GPT2Config

    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
        kw = dict(PRESETS[preset])
    elif isinstance(preset, dict):
        kw = dict(preset)
    else:
        raise ValueError(f"preset must be a name or a dict, got {type(preset).__name__}")
    kw = {**BASE_CONFIG, **kw, **overrides}
    return GPT2Config(**kw)


def estimate_tokenizer_nbytes(n_vocab: int, n_special: int = N_SPECIAL_DEFAULT,
                              avg_token_bytes: float = AVG_MERGED_TOKEN_BYTES) -> int:
    """Estimated size of the tokenizer section (spec 6) for a byte-level BPE with n_vocab
    tokens: 256 byte tokens, n_special specials, the rest merges of ~avg_token_bytes each."""
    n_merges = max(0, n_vocab - 256 - n_special)
    bytes_size = 256 + n_merges * avg_token_bytes + n_special * 6
    bytes_size = int(round(bytes_size))
    return 32 + 4 * (n_vocab + 1) + modelfile.pad4(bytes_size) + 12 * n_merges + 4 * n_special


def _hparams_from(preset_or_hparams) -> dict:
    if isinstance(preset_or_hparams, str):
        if preset_or_hparams not in PRESETS:
            raise ValueError(f"unknown preset {preset_or_hparams!r} (known: {', '.join(PRESETS)})")
        src = PRESETS[preset_or_hparams]
    elif isinstance(preset_or_hparams, dict):
        src = preset_or_hparams
    elif hasattr(preset_or_hparams, "to_dict"):  # a GPT2Config
        src = preset_or_hparams.to_dict()
    else:
        raise ValueError(f"expected a preset name, a dict or a GPT2Config, got {type(preset_or_hparams).__name__}")
    hp = {
        "n_vocab": src.get("n_vocab", src.get("vocab_size")),
        "n_positions": src.get("n_positions", src.get("n_ctx")),
        "n_embd": src.get("n_embd"),
        "n_layer": src.get("n_layer"),
        "n_head": src.get("n_head"),
        "n_inner": src.get("n_inner"),
        "activation": src.get("activation", src.get("activation_function", "gelu_new")),
        "layer_norm_epsilon": src.get("layer_norm_epsilon", 1e-5),
        "eos_id": 0,
    }
    return modelfile.normalize_hparams(hp)


def estimate_bytes(preset_or_hparams, n_ctx: int | None = None, tokenizer_nbytes: int | None = None) -> dict:
    """Sizes in bytes for a preset name / hparams dict / GPT2Config.

    Keys: ``int8_weights`` (wte_q + all layer matrices), ``scales`` (all ``*_s``), ``wpe``,
    ``f32_other`` (LayerNorm gains/biases and linear biases), ``tokenizer`` (estimated unless
    ``tokenizer_nbytes`` is given; ``tokenizer_estimated`` says which), ``header``,
    ``directory``, ``padding``, ``file_size`` (exact for that tokenizer size),
    ``params`` (float parameter count), ``n_ctx`` and ``kv_cache`` (per layer per position:
    E int8 each for K and V plus n_head f32 scales each for K and V).
    """
    hp = _hparams_from(preset_or_hparams)
    estimated = tokenizer_nbytes is None
    tok = estimate_tokenizer_nbytes(hp["n_vocab"]) if estimated else int(tokenizer_nbytes)
    layout = modelfile.plan_layout(hp, tok)
    out = {"int8_weights": 0, "scales": 0, "wpe": 0, "f32_other": 0, "tokenizer": tok}
    params = 0
    for spec, _off, nb in layout["entries"]:
        if spec.dtype == modelfile.DTYPE_RAW:
            continue
        if spec.dtype == modelfile.DTYPE_INT8:
            out["int8_weights"] += nb
            params += nb
        elif spec.is_scale:
            out["scales"] += nb
        elif spec.name == "wpe":
            out["wpe"] += nb
            params += nb // 4
        else:
            out["f32_other"] += nb
            params += nb // 4
    out["header"] = modelfile.HEADER_SIZE
    out["directory"] = modelfile.DIR_ENTRY.size * hp["n_tensors"]
    payload = sum(out[k] for k in ("int8_weights", "scales", "wpe", "f32_other", "tokenizer"))
    out["padding"] = layout["file_size"] - payload - out["header"] - out["directory"]
    out["file_size"] = layout["file_size"]
    out["tokenizer_estimated"] = estimated
    out["params"] = params
    n_ctx = hp["n_positions"] if n_ctx is None else int(n_ctx)
    out["n_ctx"] = n_ctx
    E, H, L = hp["n_embd"], hp["n_head"], hp["n_layer"]
    out["kv_cache"] = L * n_ctx * (2 * E + 2 * 4 * H)
    out["hparams"] = {k: hp[k] for k in ("n_vocab", "n_positions", "n_embd", "n_layer", "n_head", "n_inner")}
    return out
