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

# Llama variants (`tinygpt train --arch llama --preset NAME`): the GPT-2 preset's width, depth,
# heads, vocabulary and context, half as many key/value heads (grouped-query attention), and an
# intermediate size that gives about the same model-file bytes (SwiGLU has three matrices where
# GPT-2's MLP has two; the smaller KV projections give some of it back).
LLAMA_PRESETS: dict[str, dict] = {
    "d256x8": dict(PRESETS["d256x8"], n_kv_head=4, n_inner=600, arch="llama"),
    "small": dict(PRESETS["small"], n_kv_head=2, n_inner=384, arch="llama"),
    "tiny": dict(PRESETS["tiny"], n_kv_head=2, n_inner=192, arch="llama"),
}
LLAMA_BASE_CONFIG = dict(rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
                         bos_token_id=None, eos_token_id=None)

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


def preset_hparams(preset, arch: str = "gpt2") -> dict:
    """The hyperparameters of a preset name (or a dict) for an architecture ('gpt2', 'llama')."""
    if arch not in ("gpt2", "llama"):
        raise ValueError(f"unknown architecture {arch!r} (known: gpt2, llama)")
    if isinstance(preset, dict):
        return dict(preset, arch=preset.get("arch", arch))
    if not isinstance(preset, str):
        raise ValueError(f"preset must be a name or a dict, got {type(preset).__name__}")
    table = LLAMA_PRESETS if arch == "llama" else PRESETS
    if preset not in table:
        if arch == "llama" and preset in PRESETS:
            raise ValueError(f"preset {preset!r} has no Llama variant (Llama presets: {', '.join(LLAMA_PRESETS)})")
        raise ValueError(f"unknown preset {preset!r} (known: {', '.join(table)})")
    return dict(table[preset], arch=arch)


def make_config(preset, arch: str = "gpt2", **overrides):
    """``transformers.GPT2Config`` (or ``LlamaConfig`` for arch 'llama' or a dict with
    arch='llama') for a preset name or a dict of kwargs, with overrides. The GPT-2 dropout
    overrides map to Llama's one attention dropout (resid_pdrop and embd_pdrop have no Llama
    counterpart and are dropped)."""
    kw = preset_hparams(preset, arch)
    if kw.pop("arch") == "llama":
        from transformers import LlamaConfig

        drop = overrides.pop("attn_pdrop", 0.0)
        overrides.pop("resid_pdrop", None)
        overrides.pop("embd_pdrop", None)
        shape = dict(vocab_size=kw["vocab_size"], hidden_size=kw["n_embd"], num_attention_heads=kw["n_head"],
                     num_key_value_heads=kw.get("n_kv_head") or kw["n_head"], num_hidden_layers=kw["n_layer"],
                     intermediate_size=kw["n_inner"], max_position_embeddings=kw["n_positions"])
        return LlamaConfig(**{**LLAMA_BASE_CONFIG, **shape, **overrides}, attention_dropout=drop,
                           hidden_act="silu", attention_bias=False, mlp_bias=False)
    from transformers import GPT2Config

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
    if src.get("arch") in ("llama", modelfile.ARCH_LLAMA) or src.get("model_type") == "llama":
        hp.update(arch="llama", activation="silu", n_kv_head=src.get("n_kv_head", src.get("num_key_value_heads")),
                  head_tied=bool(src.get("head_tied", src.get("tie_word_embeddings", True))))
        for key, hf in (("n_embd", "hidden_size"), ("n_layer", "num_hidden_layers"),
                        ("n_head", "num_attention_heads"), ("n_inner", "intermediate_size"),
                        ("n_positions", "max_position_embeddings")):
            if hp[key] is None:
                hp[key] = src.get(hf)
    return modelfile.normalize_hparams(hp)


def estimate_bytes(preset_or_hparams, n_ctx: int | None = None, tokenizer_nbytes: int | None = None) -> dict:
    """Sizes in bytes for a preset name / hparams dict / GPT2Config.

    Keys: ``int8_weights`` (wte_q + all layer matrices), ``scales`` (all ``*_s``), ``wpe``,
    ``f32_other`` (LayerNorm gains/biases and linear biases), ``tokenizer`` (estimated unless
    ``tokenizer_nbytes`` is given; ``tokenizer_estimated`` says which), ``header``,
    ``directory``, ``padding``, ``file_size`` (exact for that tokenizer size),
    ``params`` (float parameter count), ``n_ctx`` and ``kv_cache`` (per layer per position:
    n_kv_head * head_dim int8 each for K and V plus n_kv_head f32 scales each for K and V;
    GPT-2's n_kv_head is n_head).
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
    KV = hp.get("n_kv_head") or H  # key/value heads (Llama); GPT-2: n_head
    out["kv_cache"] = L * n_ctx * (2 * KV * (E // H) + 2 * 4 * KV)
    out["hparams"] = {k: hp[k] for k in ("n_vocab", "n_positions", "n_embd", "n_layer", "n_head", "n_inner")}
    out["hparams"]["arch"] = "llama" if hp.get("arch") == modelfile.ARCH_LLAMA else "gpt2"
    out["hparams"]["n_kv_head"] = KV
    return out
