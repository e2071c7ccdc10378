"""Hugging Face ``LlamaForCausalLM`` checkpoints -> the tensors of a Llama model file.

docs/model-format.md section 3.1 names the tensors. What a Llama checkpoint needs beyond GPT-2:

* the rotary embedding becomes a table in the file (``rope``: per position the cosine and sine
  of each pair's angle, computed here in float64 and rounded once), so the engine needs no
  trigonometry and every build agrees to the bit;
* Hugging Face rotates the halves of a head (pairs ``i, i + D/2``); the engine, like llama2.c,
  rotates neighbours (``2i, 2i + 1``). The query and key rows of each head are reordered here,
  which changes no attention score (q and k get the same order);
* q, k and v are one matrix (``qkv_w``: E + 2 * n_kv_head * D rows), gate and up another
  (``gu_w``: 2 * intermediate rows), so each is one pass over the activations.

``convert.convert`` calls :func:`read_config` and :func:`put_tensors`.
"""

from __future__ import annotations

import math
import re

import numpy as np

from .modelfile import check_tensor_names

ARCHITECTURES = {"LlamaForCausalLM"}
# rotary buffers some exporters save; the engine has its own table
_IGNORED_KEY = re.compile(r"^(model\.)?layers\.\d+\.self_attn\.rotary_emb\.inv_freq$|^(model\.)?rotary_emb\.inv_freq$")


def read_config(cfg: dict, path: str) -> dict:
    """The fields of a Llama ``config.json`` (already parsed) the converter uses, checked."""
    archs = cfg.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    if archs and not (set(archs) & ARCHITECTURES):
        raise ValueError(f"{path}: architectures {archs} not supported for model_type 'llama' "
                         f"(expected {sorted(ARCHITECTURES)})")

    def get_int(key, default=None):
        v = cfg.get(key, default)
        if v is None:
            raise ValueError(f"{path}: missing {key!r}")
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{path}: {key!r} must be an integer >= 1, got {v!r}")
        return v

    out = {
        "vocab_size": get_int("vocab_size"),
        "n_embd": get_int("hidden_size"),
        "n_head": get_int("num_attention_heads"),
        "n_layer": get_int("num_hidden_layers"),
        "n_positions": get_int("max_position_embeddings"),
        "n_inner": get_int("intermediate_size"),
    }
    out["n_kv_head"] = get_int("num_key_value_heads", out["n_head"])
    E, H, KV = out["n_embd"], out["n_head"], out["n_kv_head"]
    if E % H:
        raise ValueError(f"{path}: hidden_size {E} is not divisible by num_attention_heads {H}")
    if H % KV:
        raise ValueError(f"{path}: num_key_value_heads {KV} does not divide num_attention_heads {H}")
    head_dim = cfg.get("head_dim")
    if head_dim is not None and head_dim != E // H:
        raise ValueError(f"{path}: head_dim {head_dim} is not hidden_size / num_attention_heads = {E // H}; "
                         "the engine needs head_dim * num_attention_heads == hidden_size")
    if (E // H) % 2:
        raise ValueError(f"{path}: head_dim {E // H} is odd; rotary embeddings turn pairs")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{path}: hidden_act {act!r} is not supported (Llama's SwiGLU uses 'silu')")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key, False):
            raise ValueError(f"{path}: {key}=true is not supported (the engine's Llama layers have no biases)")
    if cfg.get("pretraining_tp", 1) not in (1, None):
        raise ValueError(f"{path}: pretraining_tp {cfg.get('pretraining_tp')!r} is not supported (only 1)")
    eps = cfg.get("rms_norm_eps", 1e-6)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"{path}: rms_norm_eps must be a finite number > 0, got {eps!r}")
    out["layer_norm_epsilon"] = float(eps)

    # the rotary base: transformers 5 writes rope_parameters, older versions rope_theta and
    # rope_scaling. Only the plain rotation ('default') is converted.
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict):
        theta, kind = rope.get("rope_theta", cfg.get("rope_theta", 10000.0)), rope.get("rope_type", "default")
    elif rope is None:
        theta = cfg.get("rope_theta", 10000.0)
        scaling = cfg.get("rope_scaling")
        kind = "default" if scaling is None else (scaling.get("rope_type") or scaling.get("type")
                                                  if isinstance(scaling, dict) else scaling)
    else:
        raise ValueError(f"{path}: rope_parameters must be an object, got {rope!r}")
    if kind != "default":
        raise ValueError(f"{path}: rope type {kind!r} is not supported (only the plain rotation, 'default')")
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not (math.isfinite(theta) and theta > 0):
        raise ValueError(f"{path}: rope_theta must be a finite number > 0, got {theta!r}")
    out["rope_theta"] = float(theta)
    out["tie_word_embeddings"] = cfg.get("tie_word_embeddings", False) is True
    bos = cfg.get("bos_token_id")
    out["bos_token_id"] = bos if isinstance(bos, int) and not isinstance(bos, bool) else None
    out["activation_function"] = "silu"
    out["activation"] = 2
    return out


def expected_shapes(cfg: dict) -> dict:
    """HF Llama key (without 'model.') -> shape (nn.Linear weights are [n_out, n_in])."""
    E, I, V = cfg["n_embd"], cfg["n_inner"], cfg["vocab_size"]
    KVD = cfg["n_kv_head"] * (E // cfg["n_head"])
    shapes = {"embed_tokens.weight": (V, E), "norm.weight": (E,)}
    for l in range(cfg["n_layer"]):
        p = f"layers.{l}."
        shapes.update({
            p + "input_layernorm.weight": (E,),
            p + "self_attn.q_proj.weight": (E, E), p + "self_attn.k_proj.weight": (KVD, E),
            p + "self_attn.v_proj.weight": (KVD, E), p + "self_attn.o_proj.weight": (E, E),
            p + "post_attention_layernorm.weight": (E,),
            p + "mlp.gate_proj.weight": (I, E), p + "mlp.up_proj.weight": (I, E),
            p + "mlp.down_proj.weight": (E, I),
        })
    return shapes


def normalize_state_dict(raw: dict, cfg: dict, source: str) -> dict:
    """Strip 'model.', check every tensor's presence, shape, dtype and finiteness; decide the
    head: cfg['head_tied'] is set here (True when the config ties it, or lm_head.weight is
    absent or equal to the embedding)."""
    expected = expected_shapes(cfg)
    sd, unexpected, lm_head = {}, [], None
    for k, v in raw.items():
        if k == "lm_head.weight":
            lm_head = v
            continue
        if _IGNORED_KEY.match(k):
            continue
        key = k[len("model."):] if k.startswith("model.") else k
        if key not in expected:
            unexpected.append(k)
            continue
        sd[key] = v
    check_tensor_names(expected, sd, unexpected, source)
    out = {key: _checked(sd[key], key, shape, source) for key, shape in expected.items()}
    emb = out["embed_tokens.weight"]
    if lm_head is None:
        if not cfg["tie_word_embeddings"]:
            raise ValueError(f"{source}: no lm_head.weight and config.json does not tie it to the embedding "
                             "(tie_word_embeddings is false)")
        cfg["head_tied"] = True
    else:
        lm = _checked(lm_head, "lm_head.weight", emb.shape, source)
        if cfg["tie_word_embeddings"] and not np.array_equal(lm, emb):
            raise ValueError(f"{source}: config.json ties the output head to the embedding, but lm_head.weight "
                             "differs from embed_tokens.weight")
        cfg["head_tied"] = bool(np.array_equal(lm, emb))
        if not cfg["head_tied"]:
            out["lm_head.weight"] = lm
    return out


def _checked(v, key, shape, source) -> np.ndarray:
    v = np.asarray(v)
    if tuple(v.shape) != tuple(shape):
        raise ValueError(f"{source}: tensor {key!r} has shape {tuple(v.shape)}, config.json implies {tuple(shape)}")
    if not np.issubdtype(v.dtype, np.floating):
        raise ValueError(f"{source}: tensor {key!r} has dtype {v.dtype}, expected floating point")
    v32 = np.ascontiguousarray(v, dtype=np.float32)
    if not np.all(np.isfinite(v32)):
        raise ValueError(f"{source}: tensor {key!r} has non-finite values")
    return v32


def rope_table(n_positions: int, head_dim: int, theta: float) -> np.ndarray:
    """[P, D] float32: row p holds cos(p * f_i), sin(p * f_i) for each pair i, f_i = theta^(-2i/D)
    (computed in float64, rounded once)."""
    inv_freq = 1.0 / (float(theta) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    angle = np.arange(n_positions, dtype=np.float64)[:, None] * inv_freq[None, :]
    out = np.empty((n_positions, head_dim), np.float64)
    out[:, 0::2] = np.cos(angle)
    out[:, 1::2] = np.sin(angle)
    return out.astype(np.float32)


def rotate_half_to_pairs(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder each head's rows from Hugging Face's halves (i pairs with i + D/2) to neighbouring
    pairs (2i, 2i + 1): new row 2i = old row i, new row 2i + 1 = old row i + D/2."""
    rows, n_in = w.shape
    D = rows // n_heads
    perm = np.stack([np.arange(D // 2), np.arange(D // 2) + D // 2], axis=1).reshape(-1)
    return np.ascontiguousarray(w.reshape(n_heads, D, n_in)[:, perm, :].reshape(rows, n_in))


def put_tensors(sd: dict, cfg: dict, put_q, put_f, pairs_from_halves: bool = True) -> None:
    """Quantize the state dict into the file's tensors through put_q(qname, sname, w[out, in])
    and put_f(name, v). pairs_from_halves: the checkpoint rotates halves (Hugging Face); False
    for one that already rotates neighbouring pairs (llama2.c)."""
    H, KV = cfg["n_head"], cfg["n_kv_head"]
    D = cfg["n_embd"] // H
    put_q("wte_q", "wte_s", sd["embed_tokens.weight"])
    put_f("rope", rope_table(cfg["n_positions"], D, cfg["rope_theta"]))
    for l in range(cfg["n_layer"]):
        p, o = f"layers.{l}.", f"h.{l}."
        wq, wk = sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"]
        if pairs_from_halves:
            wq, wk = rotate_half_to_pairs(wq, H), rotate_half_to_pairs(wk, KV)
        put_f(o + "rms1_g", sd[p + "input_layernorm.weight"])
        put_q(o + "qkv_w", o + "qkv_s", np.concatenate([wq, wk, sd[p + "self_attn.v_proj.weight"]]))
        put_q(o + "o_w", o + "o_s", sd[p + "self_attn.o_proj.weight"])
        put_f(o + "rms2_g", sd[p + "post_attention_layernorm.weight"])
        put_q(o + "gu_w", o + "gu_s", np.concatenate([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]]))
        put_q(o + "down_w", o + "down_s", sd[p + "mlp.down_proj.weight"])
    put_f("rmsf_g", sd["norm.weight"])
    if not cfg["head_tied"]:
        put_q("head_q", "head_s", sd["lm_head.weight"])


def hparams(cfg: dict) -> dict:
    """The Llama header fields from a read_config dict (after normalize_state_dict)."""
    return {"arch": "llama", "n_kv_head": cfg["n_kv_head"], "rope_theta": cfg["rope_theta"],
            "head_tied": cfg["head_tied"]}
