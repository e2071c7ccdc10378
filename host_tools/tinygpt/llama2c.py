"""llama2.c checkpoints (the ``.bin`` files of its export.py) -> the state dict of llama.py.

Three layouts, all little-endian, read here from their description in llama2.c's export.py:

* version 0 ("legacy"): 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
  max_seq_len; a negative vocab_size means the classifier is not shared with the embedding),
  then float32: token embedding, per-layer groups (attention norms, wq, wk, wv, wo, ffn norms,
  w1, w2, w3), the final norm, freqs_cos and freqs_sin [max_seq_len, head_size/2] (ignored: the
  model file gets its own rope table), and the classifier when not shared.
* version 1: magic 0x616b3432 ("ak42"), int32 version 1, the 7 int32, uint8 shared_classifier,
  zero padding to 256 bytes; float32 attention norms, ffn norms, final norm, embedding, wq, wk,
  wv, wo, w1, w2, w3 (each over all layers), classifier when not shared.
* version 2 (Q8_0): as version 1 with version 2 and an int32 group_size after the flag; float32
  norms (attention, ffn, final), then int8 values of embedding, wq, wk, wv, wo, w1, w2, w3
  (classifier), then their float32 group scales in the same order: weight = q * scale of its
  group of group_size consecutive values.

llama2.c's model: RMSNorm epsilon 1e-5, rope theta 10000 over neighbouring pairs (2i, 2i+1),
so its q and k rows need no reordering (llama.put_tensors(..., pairs_from_halves=False)). Its
token ids: 0 <unk>, 1 <s> (BOS), 2 </s> (EOS).
"""

from __future__ import annotations

import os
import struct

import numpy as np

MAGIC = 0x616B3432
HEADER_BYTES = 256
RMS_NORM_EPS = 1e-5
ROPE_THETA = 10000.0
BOS_ID, EOS_ID = 1, 2


def is_checkpoint(path) -> bool:
    """A regular file (a directory is a Hugging Face model)."""
    return os.path.isfile(path)


def _params(vals, path):
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq = vals
    for name, v in (("dim", dim), ("hidden_dim", hidden), ("n_layers", n_layers), ("n_heads", n_heads),
                    ("n_kv_heads", n_kv), ("max_seq_len", seq)):
        if not 1 <= v <= 65536:
            raise ValueError(f"{path}: {name} = {v} in the header is outside 1..65536 (not a llama2.c checkpoint?)")
    if not 1 <= abs(vocab) <= 65536:
        raise ValueError(f"{path}: vocab_size = {vocab} in the header is outside 1..65536")
    if dim % n_heads or n_heads % n_kv:
        raise ValueError(f"{path}: dim {dim}, n_heads {n_heads}, n_kv_heads {n_kv}: n_heads must divide dim "
                         "and n_kv_heads must divide n_heads")
    if (dim // n_heads) % 2:
        raise ValueError(f"{path}: head size {dim // n_heads} is odd; rotary embeddings turn pairs")
    return dict(n_embd=dim, n_inner=hidden, n_layer=n_layers, n_head=n_heads, n_kv_head=n_kv,
                vocab_size=abs(vocab), n_positions=seq)


def read_checkpoint(path) -> tuple[dict, dict, dict]:
    """(cfg, state dict, about): cfg as llama.read_config returns it, the state dict with
    llama.expected_shapes keys (float32; Q8_0 weights dequantized), about = {'version',
    'group_size', 'shared_classifier', 'bytes'}. Every size is checked against the file's
    length before anything is read into memory; ValueError names what is wrong."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < 28:
        raise ValueError(f"{path}: {size} bytes, too short for a llama2.c checkpoint header")
    magic, = struct.unpack_from("<I", head, 0)
    if magic == MAGIC:
        if len(head) < HEADER_BYTES:
            raise ValueError(f"{path}: truncated 256-byte header")
        version, = struct.unpack_from("<i", head, 4)
        if version not in (1, 2):
            raise ValueError(f"{path}: llama2.c checkpoint version {version}; versions 0 (legacy), 1 (float32) "
                             "and 2 (Q8_0) are read")
        cfg = _params(struct.unpack_from("<7i", head, 8), path)
        shared = head[36]
        if shared not in (0, 1):
            raise ValueError(f"{path}: shared_classifier flag {shared} is not 0 or 1")
        group = struct.unpack_from("<i", head, 37)[0] if version == 2 else 0
        if version == 2 and not 1 <= group <= 65536:
            raise ValueError(f"{path}: group_size {group} is outside 1..65536")
        offset = HEADER_BYTES
    else:
        version = 0
        vals = struct.unpack_from("<7i", head, 0)
        cfg = _params(vals, path)
        shared = int(vals[5] > 0)
        group = 0
        offset = 28
    shared = bool(shared)
    E, I, L, V, P = cfg["n_embd"], cfg["n_inner"], cfg["n_layer"], cfg["vocab_size"], cfg["n_positions"]
    D = E // cfg["n_head"]
    KVD = cfg["n_kv_head"] * D
    norms = [("input_layernorm", (E,)), ("post_attention_layernorm", (E,))]
    mats = [("self_attn.q_proj", (E, E)), ("self_attn.k_proj", (KVD, E)), ("self_attn.v_proj", (KVD, E)),
            ("self_attn.o_proj", (E, E)), ("mlp.gate_proj", (I, E)), ("mlp.down_proj", (E, I)),
            ("mlp.up_proj", (I, E))]  # llama2.c's w1, w2, w3
    # the tensors in file order: (key, shape, stored as Q8_0?)
    order = []
    if version == 0:
        order.append(("embed_tokens.weight", (V, E)))
        groups = [norms[0]] + mats[:4] + [norms[1]] + mats[4:]
        for name, shape in groups:
            order += [(f"layers.{l}.{name}.weight", shape) for l in range(L)]
        order += [("norm.weight", (E,)), ("freqs_cos", (P, D // 2)), ("freqs_sin", (P, D // 2))]
    else:
        for name, shape in norms:
            order += [(f"layers.{l}.{name}.weight", shape) for l in range(L)]
        order.append(("norm.weight", (E,)))
        order.append(("embed_tokens.weight", (V, E)))
        for name, shape in mats:
            order += [(f"layers.{l}.{name}.weight", shape) for l in range(L)]
    if not shared:
        order.append(("lm_head.weight", (V, E)))
    n_norms = 2 * L + 1
    if version == 2:
        fp32 = order[:n_norms]
        quant = order[n_norms:]
        for key, shape in quant:
            if int(np.prod(shape)) % group:
                raise ValueError(f"{path}: {key} has {int(np.prod(shape))} values, not a multiple of "
                                 f"group_size {group}")
        n_q = sum(int(np.prod(s)) for _, s in quant)
        need = offset + 4 * sum(int(np.prod(s)) for _, s in fp32) + n_q + 4 * (n_q // group)
    else:
        need = offset + 4 * sum(int(np.prod(s)) for _, s in order)
    if size != need:
        raise ValueError(f"{path}: {size} bytes, but a version {version} checkpoint of these dimensions "
                         f"(dim {E}, hidden_dim {I}, {L} layers, vocab {V}, max_seq_len {P}, "
                         f"{'shared' if shared else 'separate'} classifier) has {need}"
                         + (" (truncated?)" if size < need else ""))
    data = np.memmap(path, dtype=np.uint8, mode="r")
    sd = {}
    pos = offset

    def take_f32(shape):
        nonlocal pos
        n = int(np.prod(shape))
        v = np.frombuffer(data, dtype="<f4", count=n, offset=pos).reshape(shape).astype(np.float32)
        pos += 4 * n
        return v

    if version == 2:
        for key, shape in order[:n_norms]:
            sd[key] = take_f32(shape)
        qs = []
        for key, shape in order[n_norms:]:
            n = int(np.prod(shape))
            qs.append(np.frombuffer(data, dtype=np.int8, count=n, offset=pos))
            pos += n
        for (key, shape), q in zip(order[n_norms:], qs):
            s = take_f32((q.size // group,))
            sd[key] = (q.reshape(-1, group).astype(np.float32) * s[:, None]).reshape(shape)
    else:
        for key, shape in order:
            sd[key] = take_f32(shape)
        sd.pop("freqs_cos", None)
        sd.pop("freqs_sin", None)
    del data
    for key, v in sd.items():
        if not np.all(np.isfinite(v)):
            raise ValueError(f"{path}: tensor {key} has non-finite values")
    cfg.update(layer_norm_epsilon=RMS_NORM_EPS, rope_theta=ROPE_THETA, tie_word_embeddings=shared,
               head_tied=shared, bos_token_id=BOS_ID, activation_function="silu", activation=2, arch="llama")
    return cfg, sd, {"version": version, "group_size": group, "shared_classifier": shared, "bytes": size}

