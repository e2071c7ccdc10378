"""Convert a Hugging Face GPT-2 or Llama checkpoint to a tinygpt model file (docs/model-format.md).

``convert(hf_dir, out_path, tokenizer=None, progress=True) -> dict`` reads ``config.json``,
the weights (``model.safetensors`` or ``pytorch_model.bin``, also sharded with an
``*.index.json``) and the tokenizer (``tokenizer`` argument, else ``hf_dir``: ``tokenizer.json``
or ``vocab.json`` + ``merges.txt``), quantizes the matrices per output row (spec 4.6), and
writes the file atomically. It returns a report (per-tensor quantization errors, sizes, ids);
``print_report(report)`` prints it as a table.

Input errors raise ``FileNotFoundError`` (missing directory / files) or ``ValueError`` (anything
else), with the offending file, key or field named. Nothing is written unless everything
checked out.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np

from . import llama, llama2c, modelfile

SUPPORTED_ACTIVATIONS = modelfile.ACTIVATION_CODES  # gelu_new / gelu_pytorch_tanh -> 0, gelu -> 1
SUPPORTED_ARCHITECTURES = {"GPT2LMHeadModel", "GPT2Model"}
_IGNORED_KEY = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")  # causal-mask buffers


# ----------------------------------------------------------------------------- config

def read_hf_config(hf_dir) -> dict:
    """Read and check ``config.json``; return the fields the converter uses."""
    path = os.path.join(os.fspath(hf_dir), "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in {hf_dir}")
    try:
        with open(path, "r", encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(cfg).__name__}")

    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    if model_type == "llama" or (model_type is None and set(archs) & llama.ARCHITECTURES):
        out = llama.read_config(cfg, path)
        out["arch"] = "llama"
        return _read_meta_fields(cfg, path, out)
    if model_type is not None and model_type != "gpt2":
        raise ValueError(f"{path}: model_type {model_type!r} is not supported (only 'gpt2' and 'llama')")
    if archs and not (set(archs) & SUPPORTED_ARCHITECTURES):
        raise ValueError(f"{path}: architectures {archs} not supported "
                         f"(expected one of {sorted(SUPPORTED_ARCHITECTURES)})")
    if model_type is None and not archs:
        raise ValueError(f"{path}: neither model_type nor architectures says this is a GPT-2 model")

    def get_int(key, *alts, required=True, default=None):
        for k in (key,) + alts:
            if cfg.get(k) is not None:
                v = cfg[k]
                if isinstance(v, bool) or not isinstance(v, int):
                    raise ValueError(f"{path}: {k!r} must be an integer, got {v!r}")
                return v
        if required:
            raise ValueError(f"{path}: missing {key!r}")
        return default

    out = {
        "vocab_size": get_int("vocab_size"),
        "n_embd": get_int("n_embd"),
        "n_head": get_int("n_head"),
        "n_layer": get_int("n_layer"),
        "n_positions": get_int("n_positions", "n_ctx"),
    }
    for k, v in out.items():
        if v < 1:
            raise ValueError(f"{path}: {k!r} must be >= 1, got {v}")
    n_inner = get_int("n_inner", required=False)
    out["n_inner"] = 4 * out["n_embd"] if n_inner is None else n_inner
    if out["n_embd"] % out["n_head"]:
        raise ValueError(f"{path}: n_embd {out['n_embd']} is not divisible by n_head {out['n_head']}")

    act = cfg.get("activation_function", "gelu_new")
    if act not in SUPPORTED_ACTIVATIONS:
        raise ValueError(f"{path}: activation_function {act!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_ACTIVATIONS)})")
    out["activation_function"] = act
    out["activation"] = SUPPORTED_ACTIVATIONS[act]

    eps = cfg.get("layer_norm_epsilon", 1e-5)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"{path}: layer_norm_epsilon must be a finite number > 0, got {eps!r}")
    out["layer_norm_epsilon"] = float(eps)

    # options that change the arithmetic the engine implements
    if cfg.get("scale_attn_weights", True) is not True:
        raise ValueError(f"{path}: scale_attn_weights=false is not supported (the engine always "
                         "scales attention scores by 1/sqrt(head_dim))")
    if cfg.get("scale_attn_by_inverse_layer_idx", False):
        raise ValueError(f"{path}: scale_attn_by_inverse_layer_idx=true is not supported")
    if cfg.get("add_cross_attention", False):
        raise ValueError(f"{path}: add_cross_attention=true is not supported")
    out["tie_word_embeddings"] = cfg.get("tie_word_embeddings", True) is not False
    bos = cfg.get("bos_token_id")
    out["bos_token_id"] = bos if isinstance(bos, int) and not isinstance(bos, bool) else None
    out["arch"] = "gpt2"
    return _read_meta_fields(cfg, path, out)


def _read_meta_fields(cfg: dict, path: str, out: dict) -> dict:
    """The fields `tinygpt train` adds to config.json for the meta section, checked."""
    # the answer `tinygpt train` taught for questions the corpus does not cover (None: a model
    # trained without it, or by another tool); it goes into the model file's meta section
    abst = cfg.get("abstain_answer")
    if abst is not None:
        if (not isinstance(abst, str) or not abst.strip() or abst != abst.strip() or len(abst) > 300
                or any(ord(c) < 32 or 127 <= ord(c) < 160 for c in abst)):
            raise ValueError(f"{path}: abstain_answer must be one line of text (1 to 300 characters, no control "
                             f"characters), got {abst!r}")
    out["abstain_answer"] = abst
    known = cfg.get("abstain_known_words")
    if known is not None and (abst is None or not isinstance(known, str) or len(known.encode("utf-8")) > 60000
                              or known != " ".join(sorted(set(known.split()))) or any(
                                  not ("a" <= c <= "z" or "0" <= c <= "9" or c in "' ") for c in known)):
        raise ValueError(f"{path}: abstain_known_words must be sorted lowercase ASCII words, one space between, "
                         f"at most 60000 bytes, next to an abstain_answer")
    out["abstain_known_words"] = known
    # the corpus answers' word index for py/retrieve.py (tinygpt train writes it; checked as the
    # board reads it, so that a broken one is refused here and not on the board)
    index = cfg.get("retrieval_index")
    if index is not None:
        from . import retrieval

        try:
            if not isinstance(index, dict) or retrieval.load_index(index) is None:
                raise ValueError("it has no 'retrieval' key")
            modelfile.meta_section(index)
        except ValueError as e:
            raise ValueError(f"{path}: retrieval_index is not a valid word index ({e})") from None
    out["retrieval_index"] = index
    out["path"] = path
    return out


# ----------------------------------------------------------------------------- tokenizer

def load_tokenizer(tokenizer):
    """Return a ``tokenizers.Tokenizer`` from a Tokenizer / HF fast tokenizer object, a
    tokenizer.json path, or a directory holding tokenizer.json or vocab.json + merges.txt
    (loading is ``tokenizer_section.load_hf_tokenizer``; missing paths raise FileNotFoundError)."""
    from .tokenizer_section import load_hf_tokenizer

    if isinstance(tokenizer, (str, os.PathLike)):
        p = os.fspath(tokenizer)
        if os.path.isdir(p):
            has_json = os.path.isfile(os.path.join(p, "tokenizer.json"))
            has_bpe = all(os.path.isfile(os.path.join(p, f)) for f in ("vocab.json", "merges.txt"))
            if not (has_json or has_bpe):
                raise FileNotFoundError(f"no tokenizer in {p}: expected tokenizer.json or vocab.json + merges.txt")
        elif not os.path.isfile(p):
            raise FileNotFoundError(f"tokenizer not found: {p}")
    return load_hf_tokenizer(tokenizer)


# ----------------------------------------------------------------------------- weights

def _to_numpy(v, key, path):
    if isinstance(v, np.ndarray):
        return v
    try:  # torch tensor
        import torch

        if isinstance(v, torch.Tensor):
            v = v.detach().cpu()
            if v.dtype in (torch.bfloat16, torch.float16):
                v = v.float()
            return v.numpy()
    except ImportError:  # pragma: no cover
        pass
    raise ValueError(f"{path}: entry {key!r} is not a tensor ({type(v).__name__})")


def _load_safetensors(path) -> dict:
    from safetensors import safe_open

    out = {}
    try:
        with safe_open(path, framework="np") as f:
            for k in f.keys():
                try:
                    out[k] = f.get_tensor(k)
                except (TypeError, ValueError):
                    out[k] = None  # e.g. bfloat16, which numpy cannot hold: retry with torch
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if any(v is None for v in out.values()):
        with safe_open(path, framework="pt") as f:
            for k, v in out.items():
                if v is None:
                    out[k] = _to_numpy(f.get_tensor(k), k, path)
    return out


def _load_bin(path) -> dict:
    import torch

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return {k: _to_numpy(v, k, path) for k, v in sd.items()}


def _load_index(index_path, loader) -> dict:
    try:
        with open(index_path, "r", encoding="utf-8") as f:
            wm = json.load(f)["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read {index_path}: {e}") from None
    d = os.path.dirname(index_path)
    out = {}
    for shard in sorted(set(wm.values())):
        sp = os.path.join(d, shard)
        if not os.path.isfile(sp):
            raise FileNotFoundError(f"{index_path} names shard {shard}, which is missing")
        out.update(loader(sp))
    return out


def load_hf_weights(hf_dir) -> tuple[dict, str]:
    """Raw state dict (numpy arrays, original key names) and the file it came from."""
    d = os.fspath(hf_dir)
    cands = [
        ("model.safetensors", _load_safetensors, False),
        ("model.safetensors.index.json", _load_safetensors, True),
        ("pytorch_model.bin", _load_bin, False),
        ("pytorch_model.bin.index.json", _load_bin, True),
    ]
    for fn, loader, is_index in cands:
        p = os.path.join(d, fn)
        if os.path.isfile(p):
            return (_load_index(p, loader) if is_index else loader(p)), p
    raise FileNotFoundError(f"no weights in {hf_dir}: expected model.safetensors or pytorch_model.bin")


def hf_expected_shapes(cfg: dict) -> dict:
    """HF GPT-2 key (without 'transformer.') -> shape (Conv1D weights are [n_in, n_out])."""
    E, I, V, P = cfg["n_embd"], cfg["n_inner"], cfg["vocab_size"], cfg["n_positions"]
    shapes = {"wte.weight": (V, E), "wpe.weight": (P, E), "ln_f.weight": (E,), "ln_f.bias": (E,)}
    for l in range(cfg["n_layer"]):
        p = f"h.{l}."
        shapes.update({
            p + "ln_1.weight": (E,), p + "ln_1.bias": (E,),
            p + "attn.c_attn.weight": (E, 3 * E), p + "attn.c_attn.bias": (3 * E,),
            p + "attn.c_proj.weight": (E, E), p + "attn.c_proj.bias": (E,),
            p + "ln_2.weight": (E,), p + "ln_2.bias": (E,),
            p + "mlp.c_fc.weight": (E, I), p + "mlp.c_fc.bias": (I,),
            p + "mlp.c_proj.weight": (I, E), p + "mlp.c_proj.bias": (E,),
        })
    return shapes


def normalize_state_dict(raw: dict, cfg: dict, source: str) -> dict:
    """Strip the ``transformer.`` prefix, drop mask buffers, check the lm_head and every
    expected tensor's presence, shape, dtype and finiteness. Returns key -> float32 array."""
    expected = hf_expected_shapes(cfg)
    sd = {}
    lm_head = None
    unexpected = []
    for k, v in raw.items():
        key = k[len("transformer."):] if k.startswith("transformer.") else k
        if key == "lm_head.weight":
            lm_head = v
            continue
        if _IGNORED_KEY.match(key):
            continue
        if key not in expected:
            unexpected.append(k)
            continue
        if key in sd:
            raise ValueError(f"{source}: tensor {key!r} appears both with and without the 'transformer.' prefix")
        sd[key] = v
    modelfile.check_tensor_names(expected, sd, unexpected, source)
    out = {}
    for key, shape in expected.items():
        v = np.asarray(sd[key])
        if tuple(v.shape) != shape:
            raise ValueError(f"{source}: tensor {key!r} has shape {tuple(v.shape)}, config.json implies {shape} "
                             f"(n_embd={cfg['n_embd']}, n_inner={cfg['n_inner']}, "
                             f"vocab_size={cfg['vocab_size']}, n_positions={cfg['n_positions']})")
        if not np.issubdtype(v.dtype, np.floating):
            raise ValueError(f"{source}: tensor {key!r} has dtype {v.dtype}, expected floating point")
        v32 = np.ascontiguousarray(v, dtype=np.float32)
        if not np.all(np.isfinite(v32)):
            raise ValueError(f"{source}: tensor {key!r} has non-finite values")
        out[key] = v32
    if lm_head is not None:
        lm = np.asarray(lm_head)
        if lm.shape != out["wte.weight"].shape or not np.array_equal(lm.astype(np.float32), out["wte.weight"]):
            raise ValueError(f"{source}: untied lm_head not supported (lm_head.weight differs from wte.weight)")
    elif not cfg["tie_word_embeddings"]:
        raise ValueError(f"{source}: untied lm_head not supported (config.json has tie_word_embeddings=false "
                         "and there is no lm_head.weight)")
    return out


# ----------------------------------------------------------------------------- convert

def _err_stats(ref: np.ndarray, approx: np.ndarray) -> dict:
    ref64 = ref.astype(np.float64)
    err = approx.astype(np.float64) - ref64
    rms_ref = math.sqrt(float(np.mean(ref64 * ref64))) if ref.size else 0.0
    rms_err = math.sqrt(float(np.mean(err * err))) if ref.size else 0.0
    return {"max_abs_err": float(np.max(np.abs(err))) if ref.size else 0.0,
            "rel_rms_err": rms_err / rms_ref if rms_ref > 0 else 0.0,
            "max_abs": float(np.max(np.abs(ref64))) if ref.size else 0.0}


def _progress(total, enabled, desc):
    if not enabled:
        return None
    try:
        from .ui import progress_bar

        return progress_bar(total=total, desc=desc, unit="step", leave=False)
    except ImportError:  # pragma: no cover - tqdm missing
        return None


def _put_gpt2_tensors(sd: dict, cfg: dict, put_q, put_f) -> None:
    """GPT-2's tensors (spec section 3) through put_q(qname, sname, w[out, in]) and put_f."""
    put_q("wte_q", "wte_s", sd["wte.weight"])
    put_f("wpe", sd["wpe.weight"])
    for l in range(cfg["n_layer"]):
        p = o = f"h.{l}."
        put_f(o + "ln1_g", sd[p + "ln_1.weight"])
        put_f(o + "ln1_b", sd[p + "ln_1.bias"])
        put_q(o + "attn_w", o + "attn_s", np.ascontiguousarray(sd[p + "attn.c_attn.weight"].T))
        put_f(o + "attn_b", sd[p + "attn.c_attn.bias"])
        put_q(o + "proj_w", o + "proj_s", np.ascontiguousarray(sd[p + "attn.c_proj.weight"].T))
        put_f(o + "proj_b", sd[p + "attn.c_proj.bias"])
        put_f(o + "ln2_g", sd[p + "ln_2.weight"])
        put_f(o + "ln2_b", sd[p + "ln_2.bias"])
        put_q(o + "fc_w", o + "fc_s", np.ascontiguousarray(sd[p + "mlp.c_fc.weight"].T))
        put_f(o + "fc_b", sd[p + "mlp.c_fc.bias"])
        put_q(o + "mproj_w", o + "mproj_s", np.ascontiguousarray(sd[p + "mlp.c_proj.weight"].T))
        put_f(o + "mproj_b", sd[p + "mlp.c_proj.bias"])
    put_f("lnf_g", sd["ln_f.weight"])
    put_f("lnf_b", sd["ln_f.bias"])


def _bpe_section(tokenizer, V) -> tuple[bytes, dict]:
    """A byte-level BPE tokenizer (directory or object) -> (section, special ids); checked fully
    before the weights are read."""
    from .tokenizer_section import build_section, special_token_ids

    tok = load_tokenizer(tokenizer)
    tv = tok.get_vocab_size(with_added_tokens=True)
    if tv != V:
        raise ValueError(f"tokenizer has {tv} tokens but config.json vocab_size is {V}; they must be equal")
    ids = special_token_ids(tok)
    return build_section(tok), ids


def _is_sentencepiece_json(tokenizer) -> bool:
    """A Llama-style tokenizer.json (BPE with byte fallback over sentencepiece pieces)."""
    if not isinstance(tokenizer, (str, os.PathLike)):
        return False
    path = os.path.join(os.fspath(tokenizer), "tokenizer.json") if os.path.isdir(tokenizer) else os.fspath(tokenizer)
    try:
        with open(path, "r", encoding="utf-8") as f:
            model = json.load(f).get("model") or {}
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False
    return model.get("type") == "BPE" and bool(model.get("byte_fallback"))


def _sentencepiece_section(tokenizer, V) -> tuple[bytes, dict]:
    """A Llama tokenizer.json -> (section version 2, ids): scores from its merge order (the
    sentencepiece model's), bos <s>, eos </s>."""
    from .llama2c_tokenizer import parse_section_v2, section_from_hf_tokenizer_json

    section = section_from_hf_tokenizer_json(tokenizer, exact=False)
    sec = parse_section_v2(section, V)
    texts = {bytes(b): t for t, b in enumerate(sec.token_bytes) if t in sec.control_ids}
    eos = texts.get(b"</s>")
    if eos is None:
        raise ValueError("the Llama tokenizer.json has no </s> token (needed as eos_id)")
    return section, {"bos_id": sec.bos_id, "eos_id": eos}


def _llama2c_section(path, V) -> tuple[bytes, dict]:
    """llama2.c's tokenizer.bin -> (section version 2, ids): eos 2 (</s>), bos 1 (<s>), and no
    Q:/A:/Do: tokens."""
    from .llama2c_tokenizer import LLAMA2C_SPECIAL_IDS, section_from_tokenizer_bin

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"llama2.c tokenizer not found: {path}")
    return section_from_tokenizer_bin(path, V), dict(LLAMA2C_SPECIAL_IDS)


def convert(hf_dir, out_path, tokenizer=None, progress=True, llama2c_tokenizer=None) -> dict:
    """Convert the GPT-2 or Llama checkpoint in ``hf_dir`` (a Hugging Face directory, or a
    llama2.c checkpoint file with ``tokenizer`` or ``llama2c_tokenizer`` given) to a tinygpt model
    file at ``out_path``. ``llama2c_tokenizer``: llama2.c's tokenizer.bin (spec section 6.2; eos
    2, bos 1, as llama2.c), instead of a byte-level BPE ``tokenizer``.

    Returns a report: ``out_path``, ``file_size``, ``crc32``, ``hparams`` (as written),
    ``source`` (weights file), ``tokenizer`` (counts and section size), ``tensors``
    (name -> shape, dtype, nbytes, max_abs_err, rel_rms_err, max_abs; errors are dequantized
    INT8 vs the float32 weights, 0 for tensors kept in f32), ``quantized_rel_rms_err`` (over
    all INT8 weights together) and ``worst`` (tensor with the largest rel_rms_err).
    """
    hf_dir = os.fspath(hf_dir)
    out_path = os.fspath(out_path)
    is_llama2c = llama2c.is_checkpoint(hf_dir)
    if not is_llama2c and not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"model not found: {hf_dir} (a Hugging Face model directory or a llama2.c "
                                "checkpoint file)")
    if tokenizer is not None and llama2c_tokenizer is not None:
        raise ValueError("give --tokenizer or --llama2c-tokenizer, not both")
    if is_llama2c and tokenizer is None and llama2c_tokenizer is None:
        raise ValueError(f"{hf_dir} is a llama2.c checkpoint, which holds no tokenizer: give --llama2c-tokenizer "
                         "tokenizer.bin (llama2.c's) or --tokenizer DIR (a byte-level BPE tokenizer.json)")
    if os.path.isdir(out_path):
        raise ValueError(f"output path is a directory: {out_path}")
    steps = 4
    bar = _progress(steps, progress, "convert")

    def step(msg):
        if bar is not None:
            bar.set_postfix_str(msg)
            bar.update(1)

    try:
        if is_llama2c:
            cfg, sd_llama2c, _about = llama2c.read_checkpoint(hf_dir)
            cfg.update(abstain_answer=None, abstain_known_words=None, retrieval_index=None, bos_token_id=None)
        else:
            cfg = read_hf_config(hf_dir)
        V = cfg["vocab_size"]
        if llama2c_tokenizer is not None:
            if cfg["arch"] != "llama":
                raise ValueError("--llama2c-tokenizer is for Llama models; this is a GPT-2 checkpoint")
            section, ids = _llama2c_section(llama2c_tokenizer, V)
        elif cfg["arch"] == "llama" and _is_sentencepiece_json(hf_dir if tokenizer is None else tokenizer):
            section, ids = _sentencepiece_section(hf_dir if tokenizer is None else tokenizer, V)
        else:
            section, ids = _bpe_section(hf_dir if tokenizer is None else tokenizer, V)

        def id_or_none(key):
            v = ids.get(key)
            if v is None or v == modelfile.NO_TOKEN or v < 0:
                return modelfile.NO_TOKEN
            return int(v)

        eos = id_or_none("eos_id")
        if eos == modelfile.NO_TOKEN:
            raise ValueError("tokenizer has no <|endoftext|> token (needed as eos_id)")
        bos = ids.get("bos_id", cfg["bos_token_id"])
        if bos is None or not 0 <= bos < V:
            bos = eos
        step("tokenizer")

        is_llama = cfg["arch"] == "llama"
        if is_llama2c:
            sd, source = sd_llama2c, hf_dir
            del sd_llama2c
        else:
            raw, source = load_hf_weights(hf_dir)
            sd = (llama.normalize_state_dict if is_llama else normalize_state_dict)(raw, cfg, source)
            del raw
        step("weights loaded")

        tensors: dict[str, np.ndarray] = {}
        stats: dict[str, dict] = {}
        sq_err = 0.0
        sq_ref = 0.0

        def put_q(qname, sname, w_out_in):
            nonlocal sq_err, sq_ref
            q, s = modelfile.quantize_rows(w_out_in)
            deq = modelfile.dequantize_rows(q, s)
            d = deq.astype(np.float64) - w_out_in
            sq_err += float(np.sum(d * d))
            sq_ref += float(np.sum(w_out_in.astype(np.float64) ** 2))
            tensors[qname], tensors[sname] = q, s
            stats[qname] = {**_err_stats(w_out_in, deq), "shape": tuple(q.shape), "dtype": "int8", "nbytes": q.nbytes}
            stats[sname] = {"max_abs_err": 0.0, "rel_rms_err": 0.0, "max_abs": float(s.max()),
                            "shape": tuple(s.shape), "dtype": "f32", "nbytes": s.nbytes}

        def put_f(name, v):
            tensors[name] = v
            stats[name] = {"max_abs_err": 0.0, "rel_rms_err": 0.0,
                           "max_abs": float(np.max(np.abs(v))) if v.size else 0.0,
                           "shape": tuple(v.shape), "dtype": "f32", "nbytes": v.nbytes}

        if is_llama:  # llama2.c rotates neighbouring pairs already, Hugging Face halves
            llama.put_tensors(sd, cfg, put_q, put_f, pairs_from_halves=not is_llama2c)
        else:
            _put_gpt2_tensors(sd, cfg, put_q, put_f)
        del sd
        step("quantized")

        hparams = {
            "n_vocab": V, "n_positions": cfg["n_positions"], "n_embd": cfg["n_embd"],
            "n_layer": cfg["n_layer"], "n_head": cfg["n_head"], "n_inner": cfg["n_inner"],
            "activation": cfg["activation"], "layer_norm_epsilon": cfg["layer_norm_epsilon"],
            "eos_id": eos, "bos_id": bos,
            "q_id": id_or_none("q_id"), "a_id": id_or_none("a_id"), "do_id": id_or_none("do_id"),
            **(llama.hparams(cfg) if is_llama else {}),
        }
        meta = None
        if cfg["abstain_answer"] is not None or cfg["retrieval_index"]:
            meta = {}
            if cfg["abstain_answer"] is not None:
                meta[modelfile.ABSTAIN_KEY] = cfg["abstain_answer"]
            if cfg["abstain_known_words"]:
                meta[modelfile.KNOWN_WORDS_KEY] = cfg["abstain_known_words"]
            meta.update(cfg["retrieval_index"] or {})
        buf, info = modelfile.build_model_bytes(hparams, tensors, section, meta)
        parent = os.path.dirname(os.path.abspath(out_path))
        os.makedirs(parent, exist_ok=True)
        modelfile.atomic_write_bytes(out_path, buf)
        step("written")
    finally:
        if bar is not None:
            bar.close()

    order = [row[0] for row in info["layout"] if row[0] not in ("tokenizer", "meta")]
    qnames = [n for n in order if stats[n]["dtype"] == "int8"]
    worst = max(qnames, key=lambda n: stats[n]["rel_rms_err"])
    hp = dict(info["hparams"])
    hp["activation_function"] = cfg["activation_function"]
    return {
        "out_path": out_path,
        "source": source,
        "file_size": info["file_size"],
        "crc32": info["crc32"],
        "format_version": info["format_version"],
        "abstain_answer": cfg["abstain_answer"],
        "hparams": hp,
        "tokenizer": info["tokenizer"],
        "tensors": {n: stats[n] for n in order},
        "quantized_rel_rms_err": math.sqrt(sq_err / sq_ref) if sq_ref > 0 else 0.0,
        "worst": {"name": worst, **{k: stats[worst][k] for k in ("max_abs_err", "rel_rms_err")}},
        "kv_cache_bytes": _kv_cache_bytes(hp),
    }


def _kv_cache_bytes(hp: dict) -> int:
    """The INT8 KV cache at n_positions: per layer and position, the keys and values of every
    key/value head (n_head for GPT-2) and one f32 scale each per head."""
    kv = hp.get("n_kv_head") or hp["n_head"]
    kvd = kv * (hp["n_embd"] // hp["n_head"])
    return hp["n_layer"] * hp["n_positions"] * (2 * kvd + 8 * kv)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def print_report(report: dict, file=None, all_tensors: bool = False) -> None:
    """Print a conversion report: the INT8 tensors' quantization errors (all tensors with
    ``all_tensors``), then sizes, hyperparameters and token ids."""
    file = sys.stdout if file is None else file
    rows = [(n, t) for n, t in report["tensors"].items() if all_tensors or t["dtype"] == "int8"]
    w = max([len("tensor")] + [len(n) for n, _ in rows])
    print(f"{'tensor':<{w}}  {'dtype':<5}  {'shape':<12}  {'max|w|':>9}  {'max abs err':>11}  {'rel RMS err':>11}",
          file=file)
    print("-" * (w + 60), file=file)
    for n, t in rows:
        shape = "x".join(str(x) for x in t["shape"])
        print(f"{n:<{w}}  {t['dtype']:<5}  {shape:<12}  {t['max_abs']:>9.4g}  {t['max_abs_err']:>11.3e}  "
              f"{t['rel_rms_err']:>11.3e}", file=file)
    print("-" * (w + 60), file=file)
    hp = report["hparams"]
    print(f"all INT8 weights: rel RMS err {report['quantized_rel_rms_err']:.3e}; worst "
          f"{report['worst']['name']} ({report['worst']['rel_rms_err']:.3e})", file=file)
    print(f"wrote {report['out_path']}: {report['file_size']} bytes ({_fmt_bytes(report['file_size'])}), "
          f"crc32 0x{report['crc32']:08x}, from {report['source']}", file=file)
    print(f"n_vocab {hp['n_vocab']}  n_positions {hp['n_positions']}  n_embd {hp['n_embd']}  "
          f"n_layer {hp['n_layer']}  n_head {hp['n_head']}  n_inner {hp['n_inner']}  "
          f"activation {hp['activation_function']}  eps {hp['layer_norm_epsilon']:g}", file=file)

    def tid(v):
        return "none" if v == modelfile.NO_TOKEN else str(v)

    tk = report["tokenizer"]
    print(f"eos {hp['eos_id']}  bos {hp['bos_id']}  Q: {tid(hp['q_id'])}  A: {tid(hp['a_id'])}  "
          f"Do: {tid(hp['do_id'])}  tokenizer section {tk['nbytes']} bytes ({tk['n_merges']} merges, "
          f"{tk['n_special']} special)  KV cache at n_ctx={hp['n_positions']}: "
          f"{_fmt_bytes(report['kv_cache_bytes'])}", file=file)


# ----------------------------------------------------------------------------- drafts
def run_corpus(hf_dir):
    """(corpus path, why): the corpus a training run (or its best/ directory) was trained on,
    from its train_log.json, when that file is still there and still the file trained on (its
    SHA-256 equals the one the run recorded); else (None, why not), or (None, None) when the
    directory has no train_log.json. A relative path (logs of older runs) is taken from the
    current directory, and only when its hash matches."""

    for d in (Path(hf_dir), Path(hf_dir).parent):
        log = d / "train_log.json"
        if not log.is_file():
            continue
        try:
            info = json.loads(log.read_text(encoding="utf-8"))
            corpus, want = info["args"]["corpus"], info.get("corpus_sha256")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return None, "%s cannot be read" % log
        if not isinstance(corpus, str) or not corpus:
            return None, "%s names no corpus" % log
        path = Path(corpus)
        if not path.is_file():
            return None, "the corpus the run was trained on, %s, is not there" % corpus
        if not isinstance(want, str) or modelfile.sha256_file(path) != want:
            return None, ("%s is not the file the run was trained on (its SHA-256 differs from the one in %s)"
                          % (corpus, log))
        return path, None
    return None, None


def answer_ids(model_path, corpus_path) -> list[list[int]]:
    """The token ids the model generates for each distinct corpus answer (the target after
    "A:", e.g. " PSRAM is ..."), encoded with the model file's own tokenizer by py/bpe.py:
    exactly what chat.py sees on the board. The model's abstain answer (its meta section) is
    drafted too."""
    from . import corpus
    from .engine import Model
    py_dir = str(Path(__file__).resolve().parents[2] / "py")
    if py_dir not in sys.path:
        sys.path.insert(0, py_dir)
    from bpe import Tokenizer

    with Model(model_path) as m:
        tok = Tokenizer(m.tokenizer_blob())
        abstain = modelfile.parse_meta(m.meta()).get(modelfile.ABSTAIN_KEY)
    seen, out = set(), []
    targets = [e.target for e in corpus.parse(corpus_path) if e.kind != "prose"]
    for t in targets + ([abstain] if abstain else []):
        if t in seen:
            continue
        seen.add(t)
        out.append(tok.encode(" " + t))
    return out


def add_drafts(model_path, corpus_path) -> dict:
    """Write the drafts section (docs/model-format.md section 7) of corpus_path's answers into
    the model file. Returns counts for the report."""
    from .engine import Model
    answers = answer_ids(model_path, corpus_path)
    with Model(model_path) as m:
        info = m.info()
    section = modelfile.drafts_section(answers, info["eos_id"], info["n_vocab"])
    modelfile.write_drafts(model_path, section)
    return {"answers": len(answers), "ids": sum(len(a) + 1 for a in answers), "bytes": len(section),
            "corpus": str(corpus_path)}


# ----------------------------------------------------------------------------- the command

def add_arguments(p) -> None:
    """`tinygpt convert`'s options."""
    p.add_argument("hf_dir", help="directory with config.json and model.safetensors or pytorch_model.bin, or a "
                   "llama2.c checkpoint file (its export.py versions 0, 1 and 2; needs --llama2c-tokenizer or --tokenizer)")
    p.add_argument("-o", "--output", required=True, help="model file to write")
    p.add_argument("--tokenizer", help="tokenizer directory (default: HF_DIR)")
    p.add_argument("--llama2c-tokenizer", metavar="TOKENIZER_BIN",
                   help="llama2.c's tokenizer.bin for a Llama model (instead of a byte-level BPE --tokenizer)")
    p.add_argument("--prompt", default="Q: What is PSRAM?\nA:", help="sample prompt for the float vs INT8 check")
    p.add_argument("--no-check", action="store_true", help="skip the float vs INT8 logit check")
    p.add_argument("--drafts", metavar="CORPUS", help="store CORPUS's answers in the model file for drafting "
                   "(faster answers; default: the corpus of a training run directory, if it still exists)")
    p.add_argument("--no-drafts", action="store_true", help="store no drafts, even for a training run")
    p.add_argument("-q", "--quiet", action="store_true")


def run_cli(args) -> None:
    """`tinygpt convert`: the model file, its report, its drafts, then the float vs INT8 check."""
    from .ui import UserError, existing_file, is_terminal

    hf_dir = Path(args.hf_dir)
    if not (hf_dir.is_dir() or hf_dir.is_file()):
        raise UserError("%s: not found (expected a Hugging Face model directory or a llama2.c checkpoint)" % hf_dir)
    if hf_dir.is_file():  # llama2.c: no float model of its own to compare with here, nor a corpus
        args.no_check, args.no_drafts = True, args.drafts is None
    llama2c_tok = existing_file(args.llama2c_tokenizer, "llama2.c tokenizer") if args.llama2c_tokenizer else None
    if llama2c_tok:  # the float check below reads a tokenizer.json
        args.no_check = True
    report = convert(hf_dir, args.output, tokenizer=args.tokenizer, llama2c_tokenizer=llama2c_tok,
                     progress=not args.quiet and is_terminal())  # no bar fragments in pipes/logs
    if not args.quiet:
        print_report(report)
    # drafts (issue 12): the corpus answers' token ids after the model, for speculative decoding
    corpus = None if args.no_drafts else args.drafts
    if corpus is None and not args.no_drafts:
        corpus, why_not = run_corpus(hf_dir)
        if why_not and not args.quiet:
            print("drafts: none: %s; give --drafts CORPUS to store them" % why_not)
    if corpus is not None:
        d = add_drafts(args.output, existing_file(corpus, "corpus"))
        if not args.quiet:
            print("drafts: %d answers (%d token ids, %d bytes) from %s" % (d["answers"], d["ids"], d["bytes"],
                                                                       d["corpus"]))
    if args.no_check:
        return
    _print_agreement(hf_dir, Path(args.output), args.tokenizer, args.prompt)


def _print_agreement(hf_dir, model_path, tokenizer_dir, prompt):
    """Float vs INT8 logits on a sample prompt: the number that says the conversion worked."""
    from tokenizers import ByteLevelBPETokenizer, Tokenizer

    from . import compare
    from .engine import Model

    tok_dir = Path(tokenizer_dir) if tokenizer_dir else hf_dir
    if (tok_dir / "tokenizer.json").exists():
        tk = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    else:
        tk = ByteLevelBPETokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"))
    ids = tk.encode(prompt).ids
    with Model(model_path) as m:
        n_ctx = m.info()["n_ctx"]
        ids = ids[:n_ctx] or [m.info()["eos_id"]]
        r = compare.agreement(compare.hf_logits(hf_dir, ids), compare.engine_logits(m, ids))
    print("float vs INT8 on %d prompt tokens: cosine min %.5f mean %.5f, top-1 agrees at %d/%d positions"
          % (r["positions"], r["cosine_min"], r["cosine_mean"], r["top1_agree"], r["positions"]))
