"""Llama models (format version 3, docs/model-format.md sections 3.1 and 4.7): random Hugging Face
LlamaForCausalLM checkpoints of shapes unlike any preset, converted, against transformers' float
logits and, bit for bit, against the numpy reference written from the spec."""
import json
import struct
import zlib

import numpy as np
import pytest

from tinygpt import cli, compare, convert, llama, modelfile, reference, testing
from tinygpt.engine import Model

# grouped-query (6 query / 2 key-value heads), multi-query, plain multi-head; theta 1e4 and
# 5e5; tied and untied heads; head dims 16 and 12; odd sizes for the MLP and vocabulary
LLAMA_SHAPES = {
    "gqa6x2_untied": dict(vocab_size=300, n_embd=96, n_head=6, n_kv_head=2, n_layer=2, n_inner=160,
                          n_positions=64, rope_theta=10000.0, tied=False),
    "mqa4_tied_theta5e5": dict(vocab_size=277, n_embd=64, n_head=4, n_kv_head=1, n_layer=2, n_inner=136,
                               n_positions=64, rope_theta=500000.0, tied=True),
    "mha4_untied_hd12": dict(vocab_size=300, n_embd=48, n_head=4, n_kv_head=4, n_layer=3, n_inner=100,
                             n_positions=48, rope_theta=10000.0, tied=False),
}
SEQ = 48


@pytest.fixture(scope="session")
def llama_converted(tmp_path_factory):
    """name -> (hf_dir, model_file), each made once per session and converted by the CLI."""
    cache = {}

    def get(name):
        if name not in cache:
            d = tmp_path_factory.mktemp(name)
            testing.make_random_hf_llama(d / "hf", seed=2, init_std=0.05, **LLAMA_SHAPES[name])
            out = d / "model.bin"
            assert cli.main(["convert", str(d / "hf"), "-o", str(out), "--quiet", "--no-check"]) == 0
            cache[name] = (d / "hf", out)
        return cache[name]
    return get


def seq_ids(n_vocab, n=SEQ, seed=0):
    return [int(i) for i in np.random.default_rng(seed).integers(0, n_vocab, n)]


# -- against Hugging Face float ----------------------------------------------------------
@pytest.mark.parametrize("name", sorted(LLAMA_SHAPES))
def test_logits_match_hf_float(llama_converted, name):
    hf_dir, path = llama_converted(name)
    ids = seq_ids(LLAMA_SHAPES[name]["vocab_size"])
    fl = compare.hf_logits(hf_dir, ids)
    with Model(path) as m:
        q = compare.engine_logits(m, ids)
    r = compare.agreement(fl, q)
    assert r["cosine_min"] >= 0.999, "cosine per position: %s" % np.round(r["cosine"], 5)
    srt = np.sort(fl, axis=1)
    decided = (srt[:, -1] - srt[:, -2]) >= 0.05
    assert decided.sum() >= SEQ // 2
    assert r["top1"][decided].all(), "top-1 differs at decided positions %s" % np.where(decided & ~r["top1"])[0]


# -- against the numpy reference, bit for bit ----------------------------------------------
@pytest.mark.parametrize("name", sorted(LLAMA_SHAPES))
def test_intermediates_match_reference_bitwise(llama_converted, name):
    _, path = llama_converted(name)
    ids = seq_ids(LLAMA_SHAPES[name]["vocab_size"], n=20, seed=3)
    ref = reference.ReferenceModel(reference.load(path), trace=True)
    ref_logits = np.concatenate([ref.forward(ids[:9]), ref.forward(ids[9:10]), ref.forward(ids[10:])])
    seen = {}
    with Model(path, max_batch=4) as m:  # prefill chunks and single steps
        m.trace(lambda key, layer, pos, v: seen.__setitem__(
            (pos, key if layer < 0 else "h.%d.%s" % (layer, key)), v))
        m.prefill(ids[:9])
        m.step(ids[9])
        m.prefill(ids[10:])
        last = np.frombuffer(m.logits(), np.float32).copy()
    n_compared = 0
    for (pos, key), v in seen.items():
        want = np.asarray(ref.trace[pos][key]).reshape(-1)
        got = v.reshape(-1)
        assert got.dtype == want.dtype and got.shape == want.shape, (pos, key)
        assert np.array_equal(got.view(np.uint8), want.view(np.uint8)), \
            "%s at position %d differs: max |diff| %g" % (key, pos, np.abs(got.astype(float) - want).max())
        n_compared += 1
    assert n_compared >= len(ids) * LLAMA_SHAPES[name]["n_layer"] * 15
    assert np.array_equal(last.view(np.uint32), ref_logits[-1].view(np.uint32))


@pytest.mark.parametrize("threads", [1, 2])
def test_every_position_bitwise_any_batch_and_threads(llama_converted, threads):
    _, path = llama_converted("gqa6x2_untied")
    ids = seq_ids(300, n=30, seed=5)
    ref = reference.ReferenceModel(reference.load(path))
    want = ref.forward(ids)
    with Model(path, n_threads=threads) as m:
        got = compare.engine_logits(m, ids)
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
        m.reset()
        m.prefill(ids)  # one batch of 30 (max_batch 32)
        assert bytes(m.logits()) == want[-1].tobytes()


def test_verify_and_rewind_match_steps(llama_converted):
    _, path = llama_converted("mqa4_tied_theta5e5")
    ids = seq_ids(277, n=14, seed=7)
    with Model(path) as m:
        steps = compare.engine_logits(m, ids)
        m.reset()
        m.prefill(ids[:6])
        choice = m.verify(ids[6:14])
        assert choice == [int(np.argmax(steps[k])) for k in range(6, 14)]
        m.rewind(10)
        assert bytes(m.logits()) == steps[9].tobytes()
        m.step(ids[10])
        assert bytes(m.logits()) == steps[10].tobytes()


# -- what the file and the engine say -------------------------------------------------------
def test_info_and_sizes(llama_converted):
    for name, shp in LLAMA_SHAPES.items():
        _, path = llama_converted(name)
        D = shp["n_embd"] // shp["n_head"]
        with Model(path, n_ctx=32) as m:
            info = m.info()
        assert info["arch"] == "llama" and info["activation"] == "silu"
        assert info["n_kv_head"] == shp["n_kv_head"] and info["head_tied"] == shp["tied"]
        assert info["rope_theta"] == np.float32(shp["rope_theta"])
        kvd, L = shp["n_kv_head"] * D, shp["n_layer"]
        assert info["kv_bytes"] == L * 32 * (2 * kvd + 8 * shp["n_kv_head"])
        mf = reference.load(path)
        assert mf.header["format_version"] == 3 and ("head_q" in mf.tensors) == (not shp["tied"])
        assert mf.tensors["rope"].shape == (shp["n_positions"], D)
        weights = sum(e.nbytes for e in mf.directory if e.name not in ("tokenizer", "meta"))
        assert info["weight_bytes"] == weights


def test_counters(llama_converted):
    _, path = llama_converted("gqa6x2_untied")
    s = LLAMA_SHAPES["gqa6x2_untied"]
    E, I, V, L, D = s["n_embd"], s["n_inner"], s["vocab_size"], s["n_layer"], s["n_embd"] // s["n_head"]
    QKV = E + 2 * s["n_kv_head"] * D
    with Model(path) as m:
        m.prefill([1, 2, 3])
        c = m.counters()
    per_layer_macs = QKV * E + E * E + 2 * I * E + E * I
    attention = sum(2 * E * (p + 1) for p in range(3)) * L
    assert c["macs"] == 3 * L * per_layer_macs + attention + V * E  # the head for the last token only
    mats = QKV * (E + 4) + E * (E + 4) + 2 * I * (E + 4) + E * (I + 4)
    assert c["weight_bytes"] == 3 * (E + 4 + 4 * D) + L * (8 * E + mats) + 4 * E + V * (E + 4)


def test_rope_table_and_pair_order():
    t = llama.rope_table(5, 8, 10000.0)
    assert t.dtype == np.float32 and t.shape == (5, 8)
    ang = 3 * 10000.0 ** (-np.arange(0, 8, 2) / 8)
    assert np.array_equal(t[3, 0::2], np.cos(ang).astype(np.float32))
    assert np.array_equal(t[3, 1::2], np.sin(ang).astype(np.float32))
    w = np.arange(2 * 6 * 3, dtype=np.float32).reshape(12, 3)  # 2 heads of D = 6
    p = llama.rotate_half_to_pairs(w, 2)
    assert [int(r[0]) // 3 for r in p] == [0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11]


# -- bad files: the engine and the reference refuse them, naming the field ----------------
def _fix_crc(buf):
    size = struct.unpack_from("<I", buf, 12)[0]
    struct.pack_into("<I", buf, 16, zlib.crc32(bytes(buf[20:size])) & 0xFFFFFFFF)
    return bytes(buf)


def _patched(data, offset, fmt, value):
    buf = bytearray(data)
    struct.pack_into(fmt, buf, offset, value)
    return _fix_crc(buf)


@pytest.mark.parametrize("offset,fmt,value,engine_says,reference_says", [
    (88, "<I", 2, "unknown arch 2", "arch 2 unknown"),
    (92, "<I", 4, "n_kv_head 4 does not divide n_head 6", "n_kv_head 4 does not divide"),
    (92, "<I", 0, "n_kv_head 0 does not divide", "n_kv_head 0 does not divide"),
    (92, "<I", 12, "n_kv_head 12 does not divide", "n_kv_head 12 does not divide"),
    (96, "<f", float("nan"), "rope_theta must be finite", "rope_theta"),
    (96, "<f", 0.0, "rope_theta must be finite", "rope_theta"),
    (100, "<I", 2, "head_tied 2", "head_tied 2"),
    (100, "<I", 1, "n_tensors", "n_tensors"),  # tied, but the head tensors are there
    (48, "<I", 0, "activation 2 (SwiGLU)", "activation 2 (SwiGLU)"),
    (104, "<I", 1, "reserved header byte 104", "reserved bytes 104..127"),
    (4, "<I", 2, "reserved header byte 88", "reserved bytes 88..127"),  # version 2 has no arch fields
])
def test_bad_headers_refused(llama_converted, offset, fmt, value, engine_says, reference_says):
    _, path = llama_converted("gqa6x2_untied")
    bad = _patched(path.read_bytes(), offset, fmt, value)
    with pytest.raises(ValueError) as e:
        Model(bad)
    assert engine_says in str(e.value)
    with pytest.raises(reference.FormatError) as e:
        reference.parse_model(bad)
    assert reference_says in str(e.value)


def test_gpt2_fields_must_be_zero_in_version_3(converted):
    """A GPT-2 file given the version 3 header (arch 0) loads only with its Llama fields zero."""
    _, path = converted("v300_hd32_gelu")
    mf = reference.load(path)
    hp = {k: v for k, v in mf.hparams.items() if k not in ("arch", "n_kv_head", "rope_theta", "head_tied")}
    data, info = modelfile.build_model_bytes(hp, dict(mf.tensors), mf.tokenizer_section, meta={})
    assert info["format_version"] == 2  # GPT-2 is still written as version 2 (1 without meta)
    v3 = _patched(data, 4, "<I", 3)
    with Model(v3) as m3, Model(data) as m2:
        m3.prefill([1, 2, 3])
        m2.prefill([1, 2, 3])
        assert m3.info()["arch"] == "gpt2" and bytes(m3.logits()) == bytes(m2.logits())
    with pytest.raises(ValueError, match="GPT-2 file has n_kv_head"):
        Model(_patched(v3, 92, "<I", 2))
    with pytest.raises(reference.FormatError, match="GPT-2 file has n_kv_head"):
        reference.parse_model(_patched(v3, 92, "<I", 2))


# -- conversion: what it refuses -------------------------------------------------------------
@pytest.fixture()
def hf_copy(llama_converted, tmp_path):
    import shutil

    hf_dir, _ = llama_converted("mqa4_tied_theta5e5")
    d = tmp_path / "hf"
    shutil.copytree(hf_dir, d)
    return d


def _edit_config(d, **changes):
    p = d / "config.json"
    cfg = json.loads(p.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    p.write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes,says", [
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}), "rope type 'llama3'"),
    (dict(rope_parameters=None, rope_scaling={"type": "linear", "factor": 2.0}), "rope type 'linear'"),
    (dict(attention_bias=True), "attention_bias=true"),
    (dict(mlp_bias=True), "mlp_bias=true"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(head_dim=32), "head_dim 32"),
    (dict(num_key_value_heads=3), "num_key_value_heads 3 does not divide"),
    (dict(rms_norm_eps=-1.0), "rms_norm_eps"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 0}), "rope_theta"),
    (dict(num_hidden_layers=3), "missing tensor"),
    (dict(intermediate_size=100), "has shape"),
])
def test_convert_refuses(hf_copy, tmp_path, changes, says):
    _edit_config(hf_copy, **changes)
    out = tmp_path / "m.bin"
    with pytest.raises(ValueError) as e:
        convert.convert(hf_copy, out, progress=False)
    assert says in str(e.value)
    assert not out.exists()


def test_convert_untied_head_needs_lm_head(hf_copy, tmp_path):
    """The tied model has no lm_head.weight in its safetensors: declared untied, it is refused."""
    _edit_config(hf_copy, tie_word_embeddings=False)
    with pytest.raises(ValueError, match="no lm_head.weight"):
        convert.convert(hf_copy, tmp_path / "m.bin", progress=False)


def test_writer_checks_llama_hparams():
    base = dict(arch="llama", n_vocab=10, n_positions=4, n_embd=8, n_layer=1, n_head=2, n_inner=8, eos_id=0)
    assert modelfile.normalize_hparams(base)["n_kv_head"] == 2
    for bad, says in ((dict(n_kv_head=3), "n_kv_head"), (dict(n_head=8), "odd"), (dict(rope_theta=0), "rope_theta"),
                      (dict(activation="gelu"), "silu"), (dict(head_tied=1), "head_tied"),
                      (dict(arch="mamba"), "unsupported arch")):
        with pytest.raises(ValueError, match=says):
            modelfile.normalize_hparams({**base, **bad})


# -- the tools around the engine -------------------------------------------------------------
def test_budget_of_a_llama_file_matches_the_engine(llama_converted):
    from tinygpt import board

    for name in LLAMA_SHAPES:
        _, path = llama_converted(name)
        for n_ctx in (None, 17):
            r = board.budget(str(path), n_ctx=n_ctx)
            with Model(path, n_ctx=n_ctx) as m:
                info = m.info()
            assert r["psram"]["kv_cache"] == info["kv_bytes"]
            assert r["psram"]["scratch"] == info["scratch_bytes"]
            assert r["flash"]["model_file"] == info["file_bytes"]


def test_estimate_of_llama_hparams_is_the_written_size(llama_converted):
    from tinygpt import presets

    _, path = llama_converted("gqa6x2_untied")
    mf = reference.load(path)
    hp = {k: v for k, v in mf.hparams.items() if k != "arch"}
    est = presets.estimate_bytes({**hp, "arch": "llama"}, tokenizer_nbytes=len(mf.tokenizer_section))
    assert est["file_size"] == path.stat().st_size
    with Model(path) as m:
        assert est["kv_cache"] == m.info()["kv_bytes"]


def test_info_cli_names_the_architecture(llama_converted, capsys):
    _, path = llama_converted("gqa6x2_untied")
    assert cli.main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Llama" in out and "2 key/value heads" in out and "rope theta 10000" in out
    assert cli.main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["arch"] == "llama" and info["n_kv_head"] == 2 and info["head_tied"] is False


# -- generate: plain text continued ----------------------------------------------------------
def test_generate_cli_is_the_greedy_chain(llama_converted, capsys):
    """`tinygpt generate --ids ... --json` gives the greedy chain the reference computes."""
    _, path = llama_converted("gqa6x2_untied")
    ids = [5, 17, 42]
    assert cli.main(["generate", "--model", str(path), "--ids", ",".join(map(str, ids)), "-n", "6", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    ref = reference.ReferenceModel(reference.load(path))
    logits, chain, eos = ref.forward(ids), [], reference.load(path).hparams["eos_id"]
    for _ in range(6):
        t = int(np.argmax(logits[-1]))
        if t == eos:
            break
        chain.append(t)
        logits = ref.forward([t])
    assert got["ids"] == chain
    tok = reference.load(path).tokenizer
    assert got["text"] == tok.decode(chain).decode("utf-8", "replace")
    assert cli.main(["generate", "--model", str(path), "--prompt", "hello", "-n", "4"]) == 0
    assert capsys.readouterr().out.endswith("\n")


@pytest.mark.parametrize("args,says", [
    (["--ids", "1,x"], "comma-separated token ids"),
    (["--ids", "1,300"], "token id 300 is outside 0..299"),
    (["--ids", ",".join(["1"] * 64)], "the prompt is 64 tokens"),
    (["--ids", "1", "-n", "0"], "max-new-tokens"),
    (["--ids", "1", "--n-ctx", "1"], "at least 2 tokens"),
])
def test_generate_cli_refuses(llama_converted, capsys, args, says):
    _, path = llama_converted("gqa6x2_untied")
    with pytest.raises(SystemExit):
        cli.main(["generate", "--model", str(path)] + args)
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


GENERATE_SCRIPT = r'''
import sys
sys.path.insert(0, sys.argv[2])
sys.path.insert(1, sys.argv[3])
import chat
out = []
chat._out = out.append
chat.load(sys.argv[1])
text = chat.generate("Once upon a time", 50)
print(repr(text))
print(repr("".join(out)))
ids, stopped = chat.generate_ids([7, 8, 9], 4)
print(ids, stopped)
print([e[1] for e in chat._model.log if e[0] == "prefill"])
text = chat.generate("", 3, stream=False)
print(repr(text))
print([e[1] for e in chat._model.log if e[0] == "prefill"][-1])
'''


def test_generate_same_under_micropython_and_cpython(tmp_path):
    """py/chat.py's generate on the scripted stand-in module, under real MicroPython and CPython:
    the prompt goes in as it is (no Q:/A:), the text streams, eos and -n stop it."""
    import subprocess
    import sys

    from conftest import REPO
    from test_chat import double, micropython_bin

    from tinygpt.tokenizer_section import load_hf_tokenizer

    section = reference.load(REPO / "models" / "default" / "model.bin").tokenizer_section
    tk = load_hf_tokenizer(REPO / "models" / "default" / "tokenizer")
    story = tk.encode(" there was a small board with a blue led.", add_special_tokens=False).ids
    script = tmp_path / "m.script"
    script.write_bytes(double.dumps({"section": section, "answers": [story + [0], story * 3, [0]]}))
    prog = tmp_path / "gen.py"
    prog.write_text(GENERATE_SCRIPT)
    outs = []
    for cmd in ([micropython_bin(), "-X", "heapsize=16M"], [sys.executable]):
        p = subprocess.run(cmd + [str(prog), str(script), str(REPO / "tests" / "double"), str(REPO / "py")],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        outs.append(p.stdout)
    assert outs[0] == outs[1]
    lines = outs[0].split("\n")
    assert lines[0] == repr(" there was a small board with a blue led.")
    assert lines[1] == repr(" there was a small board with a blue led.\n")
    assert lines[2] == "%s False" % story[:4]
    bos = 0  # the shipped tokenizer's <|endoftext|>: the double's default bos_id
    assert lines[3] == str([tk.encode("Once upon a time", add_special_tokens=False).ids, [7, 8, 9]])
    assert lines[4] == repr("") and lines[5] == str([bos])  # an empty prompt starts from bos


# -- bench: its byte and multiply-add formulas are the engine's counts ------------------------
@pytest.mark.parametrize("which", ["tiny", "llama-tiny", "llama-untied"])
def test_bench_formulas_are_the_engines_counts(llama_converted, which):
    from tinygpt import bench

    if which == "llama-untied":
        source = llama_converted("gqa6x2_untied")[1]
    else:
        source = bench.random_model_bytes(bench.bench_hparams(which))
    with Model(source) as m:
        info = m.info()
        m.prefill([3, 4, 5, 6, 7])
        assert m.counters()["weight_bytes"] == bench.bytes_read(info, 5)
        m.reset_counters()
        m.step(8)  # position 5
        c = m.counters()
    assert c["weight_bytes"] == bench.bytes_read(info, 1)
    assert c["macs"] == bench.matmul_macs(info) + info["n_layer"] * 2 * info["n_embd"] * 6


MP_GENERATE = r'''
import sys
sys.path.insert(0, sys.argv[2])
import chat
chat.load(sys.argv[1])
print(chat.generate_ids([5, 17, 42], 8)[0])
out = []
chat._out = out.append
print(repr(chat.generate(sys.argv[3], 8)))
print(repr("".join(out)))
print(chat._model.info()["arch"], chat._model.info()["n_kv_head"])
'''


def test_llama_in_real_micropython(llama_converted, tmp_path):
    """The MicroPython binding (MICROPY_BIN: the unix port built with usercmodule/) runs Llama
    models, BPE and llama2.c tokenizers alike, with the PC's tokens and text."""
    import os
    import subprocess
    import sys

    from conftest import REPO
    from test_chat import BUILD_HINT
    from test_llama2c import SHAPES as C_SHAPES, random_weights, tokenizer_bin, write_checkpoint

    exe = os.environ.get("MICROPY_BIN")
    if not exe:
        pytest.skip(BUILD_HINT)
    ckpt, tokbin, l2c = tmp_path / "ckpt.bin", tmp_path / "tokenizer.bin", tmp_path / "l2c.bin"
    write_checkpoint(ckpt, C_SHAPES["gqa"], random_weights(C_SHAPES["gqa"], seed=4), 2, False)
    tokenizer_bin(tokbin)
    assert cli.main(["convert", str(ckpt), "--llama2c-tokenizer", str(tokbin), "-o", str(l2c), "--quiet"]) == 0
    prog = tmp_path / "gen.py"
    prog.write_text(MP_GENERATE)
    for path, prompt in ((llama_converted("gqa6x2_untied")[1], "hello there"),
                         (llama_converted("mqa4_tied_theta5e5")[1], "a b c"), (l2c, "the hat and the ant")):
        outs = []
        for cmd in ([exe, "-X", "heapsize=16M"], [sys.executable]):
            env = dict(os.environ, PYTHONPATH=str(REPO / "host_tools"))
            p = subprocess.run(cmd + [str(prog), str(path), str(REPO / "py"), prompt], capture_output=True,
                               text=True, timeout=300, env=env)
            assert p.returncode == 0, p.stderr
            outs.append(p.stdout)
        assert outs[0] == outs[1], (path, outs)
        assert outs[0].split("\n")[3].startswith("llama ")


def test_generate_stops_when_the_context_is_full(llama_converted, capsys):
    _, path = llama_converted("gqa6x2_untied")  # n_positions 64
    assert cli.main(["generate", "--model", str(path), "--ids", "5,6,7", "-n", "100000", "--json",
                     "--temperature", "1.0", "--seed", "3"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert 1 <= len(got["ids"]) <= 64 - 3 + 1
    assert cli.main(["generate", "--model", str(path), "--n-ctx", "4", "--prompt", "a long prompt of many words",
                     "-n", "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("[prompt cut to its last 3 of ")
    assert cli.main(["generate", "--model", str(path), "--n-ctx", "4", "--prompt", "a long prompt of many words",
                     "-n", "5", "--json"]) == 0
    cap = capsys.readouterr()
    assert "prompt was cut to its last 3 of" in cap.err and json.loads(cap.out)["ids"]
