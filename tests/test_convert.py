"""Tests for the converter (host_tools/tinygpt/convert.py, modelfile.py, presets.py).

The written files are checked against docs/model-format.md with a small independent parser
built on ``struct`` (not on the writer's own tables)."""

import json
import os
import shutil
import struct
import sys
import zlib

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "host_tools"))

from tinygpt import modelfile, presets  # noqa: E402
from tinygpt.testing import make_random_hf_model, save_vocab_merges, synthetic_text  # noqa: E402

torch = pytest.importorskip("torch")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

NO_ID = 0xFFFFFFFF

# ----------------------------------------------------------------------------- spec parser

LAYER_KINDS = [  # (kind, name, dtype, shape fn(E, I))
    (16, "ln1_g", 2, lambda E, I: (E,)), (17, "ln1_b", 2, lambda E, I: (E,)),
    (18, "attn_w", 1, lambda E, I: (3 * E, E)), (19, "attn_s", 2, lambda E, I: (3 * E,)),
    (20, "attn_b", 2, lambda E, I: (3 * E,)), (21, "proj_w", 1, lambda E, I: (E, E)),
    (22, "proj_s", 2, lambda E, I: (E,)), (23, "proj_b", 2, lambda E, I: (E,)),
    (24, "ln2_g", 2, lambda E, I: (E,)), (25, "ln2_b", 2, lambda E, I: (E,)),
    (26, "fc_w", 1, lambda E, I: (I, E)), (27, "fc_s", 2, lambda E, I: (I,)),
    (28, "fc_b", 2, lambda E, I: (I,)), (29, "mproj_w", 1, lambda E, I: (E, I)),
    (30, "mproj_s", 2, lambda E, I: (E,)), (31, "mproj_b", 2, lambda E, I: (E,)),
]
HEADER_FIELDS = ["file_size", "crc32", "quant_scheme", "n_vocab", "n_positions", "n_embd", "n_layer",
                 "n_head", "n_inner", "activation"]
HEADER_FIELDS2 = ["eos_id", "bos_id", "q_id", "a_id", "do_id", "n_tensors", "dir_offset", "flags"]


def parse_file(path):
    """Parse and check a v1 file per the spec; return (header dict, tensors dict, tokenizer bytes)."""
    data = open(path, "rb").read()
    assert data[0:4] == b"TGPT"
    version, header_size = struct.unpack_from("<II", data, 4)
    assert (version, header_size) == (1, 128)
    h = dict(zip(HEADER_FIELDS, struct.unpack_from("<10I", data, 12)))
    (h["layer_norm_epsilon"],) = struct.unpack_from("<f", data, 52)
    h.update(zip(HEADER_FIELDS2, struct.unpack_from("<8I", data, 56)))
    assert data[88:128] == bytes(40)
    assert h["file_size"] == len(data)
    assert h["crc32"] == zlib.crc32(data[20:]) & 0xFFFFFFFF
    assert h["quant_scheme"] == 1 and h["flags"] == 0
    assert h["dir_offset"] == 128
    E, I, V, P, L = h["n_embd"], h["n_inner"], h["n_vocab"], h["n_positions"], h["n_layer"]
    assert E % h["n_head"] == 0
    assert h["n_tensors"] == 6 + 16 * L
    assert h["eos_id"] < V and h["bos_id"] < V
    for k in ("q_id", "a_id", "do_id"):
        assert h[k] == NO_ID or h[k] < V

    canon = [(1, "wte_q", 1, (V, E)), (2, "wte_s", 2, (V,)), (3, "wpe", 2, (P, E))]
    for layer in range(L):
        canon += [(k + 256 * layer, f"h.{layer}.{n}", dt, fn(E, I)) for k, n, dt, fn in LAYER_KINDS]
    canon += [(4, "lnf_g", 2, (E,)), (5, "lnf_b", 2, (E,)), (6, "tokenizer", 3, None)]
    assert len(canon) == h["n_tensors"]

    tensors = {}
    prev_end = h["dir_offset"] + 16 * h["n_tensors"]
    for i, (tid, name, dt, shape) in enumerate(canon):
        e_id, e_dt, off, nb = struct.unpack_from("<4I", data, h["dir_offset"] + 16 * i)
        assert (e_id, e_dt) == (tid, dt), name
        assert off % 16 == 0 and off >= prev_end, name
        assert data[prev_end:off] == bytes(off - prev_end), f"padding before {name} not zero"
        assert off + nb <= h["file_size"]
        if shape is not None:
            assert nb == int(np.prod(shape)) * (1 if dt == 1 else 4), name
            arr = np.frombuffer(data, "<i1" if dt == 1 else "<f4", int(np.prod(shape)), off).reshape(shape)
            if dt == 2:
                assert np.all(np.isfinite(arr)), name
                if name.endswith("_s"):
                    assert np.all(arr >= 0), name
            else:
                assert arr.min() >= -127, name
            tensors[name] = arr
        else:
            tok = data[off:off + nb]
        prev_end = off + nb
    assert prev_end == h["file_size"]
    assert tok[:4] == b"TTOK"
    assert struct.unpack_from("<I", tok, 8)[0] == V
    return h, tensors, tok


def hf_state(hf_dir):
    """The HF weights keyed without 'transformer.', as float32 numpy."""
    p = os.path.join(hf_dir, "model.safetensors")
    if os.path.exists(p):
        sd = safetensors_numpy.load_file(p)
    else:
        sd = {k: v.float().numpy() for k, v in torch.load(os.path.join(hf_dir, "pytorch_model.bin"),
                                                          weights_only=True).items()}
    return {k.removeprefix("transformer."): v.astype(np.float32) for k, v in sd.items()}


def check_against_hf(path, hf_dir, *, act_code, V, E, H, L, I, P):
    from tokenizers import Tokenizer

    h, t, _ = parse_file(path)
    assert (h["n_vocab"], h["n_embd"], h["n_head"], h["n_layer"], h["n_inner"], h["n_positions"]) == (V, E, H, L, I, P)
    assert h["activation"] == act_code
    assert h["layer_norm_epsilon"] == np.float32(1e-5)
    tok = Tokenizer.from_file(os.path.join(hf_dir, "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    assert h["eos_id"] == eos and h["bos_id"] == eos
    assert (h["q_id"], h["a_id"], h["do_id"]) == tuple(tok.token_to_id(s) for s in ("Q:", "A:", "Do:"))
    sd = hf_state(hf_dir)

    def check_q(qname, sname, w):  # w: [n_out, n_in]
        q, s = t[qname].astype(np.float32), t[sname]
        assert q.shape == w.shape and s.shape == (w.shape[0],)
        np.testing.assert_allclose(s, np.abs(w).max(axis=1) / np.float32(127), rtol=1e-6)
        err = np.abs(q * s[:, None] - w).max(axis=1)
        assert np.all(err <= s * (0.5 + 1e-5) + 1e-12), qname
        assert np.abs(t[qname]).max() == 127  # the row maxima hit +-127

    check_q("wte_q", "wte_s", sd["wte.weight"])
    np.testing.assert_array_equal(t["wpe"], sd["wpe.weight"])
    for l in range(L):
        p = f"h.{l}."
        check_q(p + "attn_w", p + "attn_s", sd[p + "attn.c_attn.weight"].T)
        check_q(p + "proj_w", p + "proj_s", sd[p + "attn.c_proj.weight"].T)
        check_q(p + "fc_w", p + "fc_s", sd[p + "mlp.c_fc.weight"].T)
        check_q(p + "mproj_w", p + "mproj_s", sd[p + "mlp.c_proj.weight"].T)
        for ours, theirs in (("ln1_g", "ln_1.weight"), ("ln1_b", "ln_1.bias"), ("ln2_g", "ln_2.weight"),
                             ("ln2_b", "ln_2.bias"), ("attn_b", "attn.c_attn.bias"),
                             ("proj_b", "attn.c_proj.bias"), ("fc_b", "mlp.c_fc.bias"),
                             ("mproj_b", "mlp.c_proj.bias")):
            np.testing.assert_array_equal(t[p + ours], sd[p + theirs])
    np.testing.assert_array_equal(t["lnf_g"], sd["ln_f.weight"])
    np.testing.assert_array_equal(t["lnf_b"], sd["ln_f.bias"])
    return h, t


def reference_accepts(path):
    try:
        from tinygpt import reference
        parse_model = reference.parse_model
    except Exception:  # reference not available (yet)
        return
    with open(path, "rb") as f:
        parse_model(f.read())


def no_leftovers(directory, expect=()):
    names = sorted(os.listdir(directory))
    assert names == sorted(expect), names


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def convert_mod():
    from tinygpt import convert

    return convert


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("base") / "hf"
    make_random_hf_model(d, 509, 64, 4, 2, 96, 32, seed=3)
    return str(d)


@pytest.fixture
def model_copy(base_model, tmp_path):
    d = tmp_path / "hf"
    shutil.copytree(base_model, d)
    return str(d)


@pytest.fixture
def out_dir(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return str(d)


@pytest.fixture(scope="module")
def base_file(base_model, convert_mod, tmp_path_factory):
    p = str(tmp_path_factory.mktemp("basefile") / "m.tgpt")
    rep = convert_mod.convert(base_model, p, progress=False)
    return p, rep


# ----------------------------------------------------------------------------- shapes

SHAPES = [
    # V, E, H, L, I, P, activation (HF name), act code, save_format
    (509, 64, 4, 2, 96, 32, "gelu_new", 0, "safetensors"),      # head_dim 16, I != 4E, V % 16 != 0
    (512, 64, 2, 1, 256, 16, "gelu", 1, "safetensors"),         # head_dim 32, erf GELU, I = 4E
    (300, 32, 2, 3, 40, 24, "gelu_pytorch_tanh", 0, "bin"),     # tanh alias, pytorch_model.bin
    (271, 96, 3, 1, 160, 8, "gelu_new", 0, "bin"),              # head_dim 32, odd vocab
]


@pytest.mark.parametrize("V,E,H,L,I,P,act,code,fmt", SHAPES)
def test_convert_shapes(tmp_path, convert_mod, V, E, H, L, I, P, act, code, fmt):
    hf = str(tmp_path / "hf")
    make_random_hf_model(hf, V, E, H, L, I, P, activation=act, seed=V, save_format=fmt)
    out = str(tmp_path / "out" / "model.tgpt")  # parent does not exist yet: created
    rep = convert_mod.convert(hf, out, progress=False)
    check_against_hf(out, hf, act_code=code, V=V, E=E, H=H, L=L, I=I, P=P)
    reference_accepts(out)
    assert rep["file_size"] == os.path.getsize(out)
    assert rep["source"].endswith("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")
    # the report: every tensor, INT8 errors within half a step
    assert list(rep["tensors"])[:3] == ["wte_q", "wte_s", "wpe"]
    assert len(rep["tensors"]) == 5 + 16 * L
    for name, st in rep["tensors"].items():
        if st["dtype"] == "int8":
            assert 0 < st["rel_rms_err"] < 0.02, name
            assert st["max_abs_err"] <= st["max_abs"] / 127 * 0.5001, name
        else:
            assert st["max_abs_err"] == 0.0
    # size prediction is exact once the tokenizer section size is known
    est = presets.estimate_bytes(dict(vocab_size=V, n_embd=E, n_head=H, n_layer=L, n_inner=I, n_positions=P),
                                 tokenizer_nbytes=rep["tokenizer"]["nbytes"])
    assert est["file_size"] == rep["file_size"]
    assert est["kv_cache"] == rep["kv_cache_bytes"] == L * P * (2 * E + 8 * H)
    no_leftovers(tmp_path / "out", ["model.tgpt"])


def test_print_report(base_file, convert_mod, capsys):
    _, rep = base_file
    convert_mod.print_report(rep)
    text = capsys.readouterr().out
    assert "h.1.mproj_w" in text and "wte_q" in text and "rel RMS err" in text
    assert str(rep["file_size"]) in text


def test_progress_bar_does_not_break(base_model, convert_mod, out_dir):
    convert_mod.convert(base_model, os.path.join(out_dir, "m.tgpt"), progress=True)
    parse_file(os.path.join(out_dir, "m.tgpt"))


def test_deterministic_and_overwrite(base_model, base_file, convert_mod, out_dir):
    p = os.path.join(out_dir, "m.tgpt")
    with open(p, "wb") as f:
        f.write(b"old")
    convert_mod.convert(base_model, p, progress=False)
    assert open(p, "rb").read() == open(base_file[0], "rb").read()
    no_leftovers(out_dir, ["m.tgpt"])


# ----------------------------------------------------------------------------- input variants

def _write_state_dict(hf, sd, fmt):
    for fn in ("model.safetensors", "pytorch_model.bin"):
        if os.path.exists(os.path.join(hf, fn)):
            os.remove(os.path.join(hf, fn))
    if fmt == "safetensors":
        safetensors_numpy.save_file({k: np.ascontiguousarray(v) for k, v in sd.items()},
                                    os.path.join(hf, "model.safetensors"))
    else:
        torch.save({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, os.path.join(hf, "pytorch_model.bin"))


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("prefix", ["", "transformer."])
def test_state_dict_variants(model_copy, base_file, convert_mod, out_dir, fmt, prefix):
    """With/without 'transformer.', tied lm_head present, causal-mask buffers present: same file."""
    sd = hf_state(model_copy)
    E = sd["wte.weight"].shape[1]
    P = sd["wpe.weight"].shape[0]
    out = {prefix + k: v for k, v in sd.items()}
    out["lm_head.weight"] = sd["wte.weight"].copy()
    for l in range(2):
        out[f"{prefix}h.{l}.attn.bias"] = np.tril(np.ones((P, P), np.float32))[None, None]
        out[f"{prefix}h.{l}.attn.masked_bias"] = np.array(-1e4, np.float32)
    _write_state_dict(model_copy, out, fmt)
    p = os.path.join(out_dir, "m.tgpt")
    rep = convert_mod.convert(model_copy, p, progress=False)
    assert open(p, "rb").read() == open(base_file[0], "rb").read()
    assert rep["tensors"]["wte_q"]["shape"] == (509, E)


def test_float16_weights(model_copy, convert_mod, out_dir):
    sd = hf_state(model_copy)
    _write_state_dict(model_copy, {"transformer." + k: v.astype(np.float16) for k, v in sd.items()}, "safetensors")
    p = os.path.join(out_dir, "m.tgpt")
    convert_mod.convert(model_copy, p, progress=False)
    _, t, _ = parse_file(p)
    np.testing.assert_array_equal(t["lnf_g"], sd["ln_f.weight"].astype(np.float16).astype(np.float32))


def test_vocab_merges_tokenizer(model_copy, base_file, convert_mod, out_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(model_copy, "tokenizer.json"))
    os.remove(os.path.join(model_copy, "tokenizer.json"))
    save_vocab_merges(tok, model_copy)
    p = os.path.join(out_dir, "m.tgpt")
    convert_mod.convert(model_copy, p, progress=False)
    assert open(p, "rb").read() == open(base_file[0], "rb").read()


def test_tokenizer_argument(model_copy, base_file, convert_mod, out_dir, tmp_path):
    """tokenizer= a file path, a directory, or a tokenizers.Tokenizer; the hf_dir has none."""
    from tokenizers import Tokenizer

    tdir = tmp_path / "tok"
    tdir.mkdir()
    shutil.move(os.path.join(model_copy, "tokenizer.json"), tdir / "tokenizer.json")
    want = open(base_file[0], "rb").read()
    for i, arg in enumerate([str(tdir / "tokenizer.json"), str(tdir),
                             Tokenizer.from_file(str(tdir / "tokenizer.json"))]):
        p = os.path.join(out_dir, f"m{i}.tgpt")
        convert_mod.convert(model_copy, p, tokenizer=arg, progress=False)
        assert open(p, "rb").read() == want


def test_bos_from_config(model_copy, convert_mod, out_dir):
    cfg_path = os.path.join(model_copy, "config.json")
    cfg = json.load(open(cfg_path))
    for bos, want in ((7, 7), (50256, None), (None, None)):
        cfg["bos_token_id"] = bos
        json.dump(cfg, open(cfg_path, "w"))
        p = os.path.join(out_dir, "m.tgpt")
        convert_mod.convert(model_copy, p, progress=False)
        h, _, _ = parse_file(p)
        assert h["bos_id"] == (h["eos_id"] if want is None else want)


def test_tokenizer_without_q_a_do(tmp_path, convert_mod):
    """A tokenizer lacking Q:/A:/Do: gets 0xFFFFFFFF ids."""
    from tokenizers import ByteLevelBPETokenizer

    hf = str(tmp_path / "hf")
    make_random_hf_model(hf, 300, 32, 2, 1, 64, 16, seed=5)
    bl = ByteLevelBPETokenizer()
    bl.train_from_iterator(synthetic_text(1, 5000).splitlines(True), vocab_size=300, min_frequency=1,
                           special_tokens=["<|endoftext|>"], show_progress=False)
    assert bl.get_vocab_size() == 300
    bl.save(os.path.join(hf, "tokenizer.json"))
    out = str(tmp_path / "m.tgpt")
    convert_mod.convert(hf, out, progress=False)
    h, _, _ = parse_file(out)
    assert (h["q_id"], h["a_id"], h["do_id"]) == (NO_ID, NO_ID, NO_ID)
    assert h["eos_id"] == bl.token_to_id("<|endoftext|>")
    reference_accepts(out)


# ----------------------------------------------------------------------------- errors

def _edit_config(hf, **kv):
    p = os.path.join(hf, "config.json")
    cfg = json.load(open(p))
    for k, v in kv.items():
        if v is _DELETE:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    json.dump(cfg, open(p, "w"))


_DELETE = object()


def _drop_key(hf, key):
    sd = hf_state(hf)
    del sd[key]
    _write_state_dict(hf, {"transformer." + k: v for k, v in sd.items()}, "safetensors")


def _set_key(hf, key, value):
    sd = hf_state(hf)
    sd[key] = value
    _write_state_dict(hf, {"transformer." + k: v for k, v in sd.items()}, "safetensors")


def _untied(hf):
    sd = {"transformer." + k: v for k, v in hf_state(hf).items()}
    sd["lm_head.weight"] = sd["transformer.wte.weight"] + np.float32(0.01)
    _write_state_dict(hf, sd, "safetensors")


def _other_vocab_tokenizer(hf):
    from tinygpt.testing import make_synthetic_tokenizer

    make_synthetic_tokenizer(400, seed=1).save(os.path.join(hf, "tokenizer.json"))


def _no_eos_tokenizer(hf):
    from tokenizers import ByteLevelBPETokenizer

    bl = ByteLevelBPETokenizer()
    bl.train_from_iterator(synthetic_text(2, 20000).splitlines(True), vocab_size=509, min_frequency=1,
                           special_tokens=["<|eot|>", "Q:"], show_progress=False)
    assert bl.get_vocab_size() == 509
    bl.save(os.path.join(hf, "tokenizer.json"))


def _prefix_space_tokenizer(hf):
    p = os.path.join(hf, "tokenizer.json")
    d = json.load(open(p, encoding="utf-8"))
    d["pre_tokenizer"]["add_prefix_space"] = True
    json.dump(d, open(p, "w", encoding="utf-8"))


ERROR_CASES = [
    # (id, mutate(hf_dir), exception, substrings of the message)
    ("no-config", lambda d: os.remove(os.path.join(d, "config.json")), FileNotFoundError, ["config.json"]),
    ("bad-json", lambda d: open(os.path.join(d, "config.json"), "w").write("{not json"), ValueError,
     ["config.json"]),
    ("not-object", lambda d: open(os.path.join(d, "config.json"), "w").write("[1, 2]"), ValueError,
     ["config.json", "object"]),
    ("model-type", lambda d: _edit_config(d, model_type="llama"), ValueError, ["model_type", "llama"]),
    ("architecture", lambda d: _edit_config(d, architectures=["GPT2ForSequenceClassification"]), ValueError,
     ["GPT2ForSequenceClassification"]),
    ("activation", lambda d: _edit_config(d, activation_function="relu"), ValueError,
     ["activation_function", "relu"]),
    ("missing-n_embd", lambda d: _edit_config(d, n_embd=_DELETE), ValueError, ["n_embd"]),
    ("head-divides", lambda d: _edit_config(d, n_head=3), ValueError, ["n_head"]),
    ("eps", lambda d: _edit_config(d, layer_norm_epsilon=0), ValueError, ["layer_norm_epsilon"]),
    ("inverse-layer-idx", lambda d: _edit_config(d, scale_attn_by_inverse_layer_idx=True), ValueError,
     ["scale_attn_by_inverse_layer_idx"]),
    ("no-attn-scale", lambda d: _edit_config(d, scale_attn_weights=False), ValueError, ["scale_attn_weights"]),
    ("wrong-n_inner", lambda d: _edit_config(d, n_inner=128), ValueError,
     ["h.0.mlp.c_fc.weight", "(64, 96)", "(64, 128)"]),
    ("n_inner-default", lambda d: _edit_config(d, n_inner=None), ValueError, ["mlp.c_fc.weight", "(64, 256)"]),
    ("extra-layer", lambda d: _edit_config(d, n_layer=1), ValueError, ["unexpected", "h.1."]),
    ("missing-layer", lambda d: _edit_config(d, n_layer=3), ValueError, ["missing", "h.2.ln_1.weight"]),
    ("vocab-mismatch", lambda d: _edit_config(d, vocab_size=512), ValueError, ["512", "509", "vocab_size"]),
    ("missing-tensor", lambda d: _drop_key(d, "h.1.mlp.c_fc.bias"), ValueError, ["h.1.mlp.c_fc.bias", "missing"]),
    ("missing-wpe", lambda d: _drop_key(d, "wpe.weight"), ValueError, ["wpe.weight"]),
    ("bad-shape", lambda d: _set_key(d, "h.0.ln_2.bias", np.zeros(65, np.float32)), ValueError,
     ["h.0.ln_2.bias", "(65,)", "(64,)"]),
    ("nan", lambda d: _set_key(d, "h.1.attn.c_proj.weight", np.full((64, 64), np.nan, np.float32)), ValueError,
     ["h.1.attn.c_proj.weight", "non-finite"]),
    ("int-dtype", lambda d: _set_key(d, "ln_f.bias", np.zeros(64, np.int32)), ValueError, ["ln_f.bias", "int32"]),
    ("untied", _untied, ValueError, ["untied lm_head not supported"]),
    ("untied-config", lambda d: _edit_config(d, tie_word_embeddings=False), ValueError,
     ["untied lm_head not supported"]),
    ("no-weights", lambda d: os.remove(os.path.join(d, "model.safetensors")), FileNotFoundError,
     ["model.safetensors", "pytorch_model.bin"]),
    ("corrupt-weights", lambda d: open(os.path.join(d, "model.safetensors"), "wb").write(b"garbage" * 10),
     ValueError, ["model.safetensors"]),
    ("corrupt-bin", lambda d: (os.remove(os.path.join(d, "model.safetensors")),
                               open(os.path.join(d, "pytorch_model.bin"), "wb").write(b"garbage")),
     ValueError, ["pytorch_model.bin"]),
    ("no-tokenizer", lambda d: os.remove(os.path.join(d, "tokenizer.json")), FileNotFoundError,
     ["tokenizer.json", "vocab.json"]),
    ("bad-tokenizer", lambda d: open(os.path.join(d, "tokenizer.json"), "w").write("{}"), ValueError,
     ["tokenizer.json"]),
    ("tokenizer-vocab", _other_vocab_tokenizer, ValueError, ["400", "509", "vocab_size"]),
    ("no-eos", _no_eos_tokenizer, ValueError, ["<|endoftext|>"]),
    ("prefix-space", _prefix_space_tokenizer, ValueError, ["prefix"]),
]


@pytest.mark.parametrize("mutate,exc,words", [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_errors(model_copy, convert_mod, out_dir, mutate, exc, words):
    mutate(model_copy)
    p = os.path.join(out_dir, "m.tgpt")
    with pytest.raises(exc) as ei:
        convert_mod.convert(model_copy, p, progress=False)
    msg = str(ei.value)
    for w in words:
        assert w in msg, (w, msg)
    no_leftovers(out_dir)  # no output, no temp file


def test_missing_dir(base_model, convert_mod, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        convert_mod.convert(str(tmp_path / "nope"), str(tmp_path / "m.tgpt"), progress=False)
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        convert_mod.convert(base_model, str(tmp_path / "m.tgpt"), tokenizer=str(tmp_path / "t.json"),
                            progress=False)
    assert not os.path.exists(tmp_path / "m.tgpt")


def test_output_is_directory(base_model, convert_mod, out_dir):
    with pytest.raises(ValueError, match="directory"):
        convert_mod.convert(base_model, out_dir, progress=False)


def test_failed_write_is_atomic(base_model, convert_mod, out_dir, monkeypatch):
    """A failure while writing leaves the previous output intact and no temp file."""
    p = os.path.join(out_dir, "m.tgpt")
    with open(p, "wb") as f:
        f.write(b"previous")

    def boom(fd):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="simulated"):
        convert_mod.convert(base_model, p, progress=False)
    assert open(p, "rb").read() == b"previous"
    no_leftovers(out_dir, ["m.tgpt"])


def test_failed_conversion_keeps_previous_output(model_copy, convert_mod, out_dir):
    p = os.path.join(out_dir, "m.tgpt")
    with open(p, "wb") as f:
        f.write(b"previous")
    _edit_config(model_copy, activation_function="swish")
    with pytest.raises(ValueError, match="swish"):
        convert_mod.convert(model_copy, p, progress=False)
    assert open(p, "rb").read() == b"previous"
    no_leftovers(out_dir, ["m.tgpt"])


# ----------------------------------------------------------------------------- modelfile API

def test_quantize_rows():
    w = np.array([[0.0, 0.0, 0.0],
                  [1.0, -0.5, 0.25],
                  [-2.54, 0.01, 1.27],
                  [1e-3, -1e-3, 5e-4]], np.float32)
    q, s = modelfile.quantize_rows(w)
    assert q.dtype == np.int8 and s.dtype == np.float32
    assert q[0].tolist() == [0, 0, 0] and s[0] == 0
    assert s[1] == np.float32(1.0) / np.float32(127)
    assert q[1].tolist() == [127, -64, 32]         # -63.5 -> -64, 31.75 -> 32
    assert q[2, 0] == -127
    t = w[1:] / s[1:, None]
    np.testing.assert_array_equal(q[1:], np.clip(np.rint(t), -127, 127))
    assert np.abs(q).max() <= 127
    # exact half-way cases round to even
    q2, s2 = modelfile.quantize_rows(np.array([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5]], np.float32))
    assert s2[0] == 1.0 and q2[0].tolist() == [127, 0, 2, 2, 0, -2]
    with pytest.raises(ValueError, match="non-finite"):
        modelfile.quantize_rows(np.array([[1.0, np.inf]], np.float32))
    with pytest.raises(ValueError, match="2-D"):
        modelfile.quantize_rows(np.zeros(3, np.float32))


def _tiny_inputs(base_file):
    """hparams, tensors and tokenizer section read back from the base file."""
    h, t, tok = parse_file(base_file[0])
    hp = {k: h[k] for k in ("n_positions", "n_embd", "n_layer", "n_head", "n_inner", "activation",
                            "eos_id", "bos_id", "q_id", "a_id", "do_id")}
    hp["n_vocab"] = h["n_vocab"]
    hp["layer_norm_epsilon"] = 1e-5
    return hp, {k: np.array(v) for k, v in t.items()}, tok


def test_write_model_file_roundtrip(base_file, tmp_path):
    hp, t, tok = _tiny_inputs(base_file)
    p = str(tmp_path / "again.tgpt")
    info = modelfile.write_model_file(p, hp, t, tok)
    assert open(p, "rb").read() == open(base_file[0], "rb").read()
    assert info["file_size"] == os.path.getsize(p)
    # names accepted as the activation, vocab_size alias, float64 input
    hp2 = dict(hp, activation="gelu_new", vocab_size=hp.pop("n_vocab"))
    t2 = dict(t, wpe=t["wpe"].astype(np.float64))
    modelfile.write_model_file(p, hp2, t2, tok)
    assert open(p, "rb").read() == open(base_file[0], "rb").read()


@pytest.mark.parametrize("case,words", [
    ("shape", ["h.0.fc_w", "shape"]),
    ("dtype", ["h.1.attn_w", "int8"]),
    ("float-dtype", ["lnf_g", "float32"]),
    ("nan", ["h.0.ln1_b", "non-finite"]),
    ("overflow", ["wpe", "non-finite"]),
    ("neg-scale", ["h.1.proj_s", "negative"]),
    ("minus128", ["wte_q", "-128"]),
    ("missing", ["missing", "lnf_b"]),
    ("unknown", ["unknown", "h.2.fc_w"]),
    ("eos", ["eos_id"]),
    ("q_id", ["q_id"]),
    ("head", ["n_head"]),
    ("activation", ["activation"]),
    ("eps", ["layer_norm_epsilon"]),
    ("tok-vocab", ["n_vocab"]),
    ("tok-magic", ["magic"]),
    ("tok-size", ["bytes"]),
])
def test_write_model_file_validation(base_file, tmp_path, case, words):
    hp, t, tok = _tiny_inputs(base_file)
    if case == "shape":
        t["h.0.fc_w"] = t["h.0.fc_w"][:, :-1]
    elif case == "dtype":
        t["h.1.attn_w"] = t["h.1.attn_w"].astype(np.int16)
    elif case == "float-dtype":
        t["lnf_g"] = t["lnf_g"].astype(np.int32)
    elif case == "nan":
        t["h.0.ln1_b"][3] = np.nan
    elif case == "overflow":
        t["wpe"] = t["wpe"].astype(np.float64)
        t["wpe"][0, 0] = 1e300
    elif case == "neg-scale":
        t["h.1.proj_s"][0] = -1.0
    elif case == "minus128":
        t["wte_q"][5, 5] = -128
    elif case == "missing":
        del t["lnf_b"]
    elif case == "unknown":
        t["h.2.fc_w"] = t["h.1.fc_w"]
    elif case == "eos":
        hp["eos_id"] = hp["n_vocab"]
    elif case == "q_id":
        hp["q_id"] = 100000
    elif case == "head":
        hp["n_head"] = 3
    elif case == "activation":
        hp["activation"] = "relu"
    elif case == "eps":
        hp["layer_norm_epsilon"] = float("nan")
    elif case == "tok-vocab":
        hp["n_vocab"] += 1
    elif case == "tok-magic":
        tok = b"XXXX" + tok[4:]
    elif case == "tok-size":
        tok = tok + b"\0\0\0\0"
    p = tmp_path / "m.tgpt"
    with pytest.raises(ValueError) as ei:
        modelfile.write_model_file(str(p), hp, t, tok)
    for w in words:
        assert w in str(ei.value), (w, str(ei.value))
    no_leftovers(tmp_path)


# ----------------------------------------------------------------------------- presets

def test_presets():
    want = {"hw1": (4096, 128, 4, 22, 768, 128), "d192x12": (4096, 192, 6, 12, 768, 128),
            "d192x20": (4096, 192, 6, 20, 512, 128), "d256x8": (4096, 256, 8, 8, 768, 128),
            "tiny": (512, 64, 4, 2, 256, 64)}
    keys = ("vocab_size", "n_embd", "n_head", "n_layer", "n_inner", "n_positions")
    for name, vals in want.items():
        assert tuple(presets.PRESETS[name][k] for k in keys) == vals
        cfg = presets.make_config(name)
        assert tuple(getattr(cfg, k) for k in keys) == vals
        assert cfg.activation_function == "gelu_new" and cfg.layer_norm_epsilon == 1e-5
        assert cfg.tie_word_embeddings
        V, E, H, L, I, P = vals
        est = presets.estimate_bytes(name, tokenizer_nbytes=1000)
        weights = V * E + L * (3 * E * E + E * E + 2 * I * E)
        assert est["int8_weights"] == weights
        assert est["scales"] == 4 * (V + L * (3 * E + E + I + E))
        assert est["wpe"] == 4 * P * E
        assert est["f32_other"] == 4 * (2 * E + L * (4 * E + 3 * E + E + I + E))
        assert est["kv_cache"] == L * P * (2 * E + 8 * H)
        body = 128 + 16 * (6 + 16 * L)
        assert est["file_size"] == est["header"] + est["directory"] + est["padding"] + weights + \
            est["scales"] + est["wpe"] + est["f32_other"] + 1000
        assert body + weights + est["scales"] + est["wpe"] + est["f32_other"] + 1000 <= est["file_size"]
        assert presets.estimate_bytes(name)["tokenizer_estimated"]
    assert presets.make_config("tiny", n_layer=3).n_layer == 3
    with pytest.raises(ValueError, match="unknown preset"):
        presets.make_config("huge")
    assert presets.estimate_bytes("tiny", n_ctx=16)["kv_cache"] == 2 * 16 * (128 + 32)
