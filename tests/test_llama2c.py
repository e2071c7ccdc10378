"""llama2.c checkpoints: random ones written here in the layouts of llama2.c's export.py (legacy
float32 version 0, version 1, Q8_0 version 2; shared and separate classifier; grouped-query
attention), converted by `tinygpt convert CHECKPOINT --tokenizer DIR`, and compared with an
independent numpy implementation of the float forward pass of llama2.c's run.c (written here
from run.c's arithmetic: RMSNorm with eps 1e-5, rope over neighbouring pairs with base 10000,
SwiGLU, softmax attention; none of it shared with the project's reference)."""
import json
import struct

import numpy as np
import pytest

from tinygpt import cli, compare, reference, testing
from tinygpt.engine import Model

SHAPES = {
    "gqa": dict(dim=96, hidden=160, n_layers=2, n_heads=6, n_kv=2, vocab=300, seq=48),
    "mha": dict(dim=64, hidden=128, n_layers=2, n_heads=4, n_kv=4, vocab=300, seq=40),
}


# -- a llama2.c checkpoint writer, from export.py's description ----------------------------
def random_weights(s, seed):
    rng = np.random.default_rng(seed)
    dim, hid, L, V = s["dim"], s["hidden"], s["n_layers"], s["vocab"]
    kv_dim = s["n_kv"] * dim // s["n_heads"]

    def m(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    w = {"tok": m(V, dim), "norm": (1 + 0.1 * rng.standard_normal(dim)).astype(np.float32), "cls": m(V, dim)}
    w["att_norm"] = (1 + 0.1 * rng.standard_normal((L, dim))).astype(np.float32)
    w["ffn_norm"] = (1 + 0.1 * rng.standard_normal((L, dim))).astype(np.float32)
    w["wq"], w["wk"], w["wv"], w["wo"] = m(L, dim, dim), m(L, kv_dim, dim), m(L, kv_dim, dim), m(L, dim, dim)
    w["w1"], w["w2"], w["w3"] = m(L, hid, dim), m(L, dim, hid), m(L, hid, dim)
    return w


def q80(a, gs):
    """export.py's Q8_0: per group of gs values, scale = max|w| / 127, q = round(w / scale)."""
    g = a.reshape(-1, gs).astype(np.float32)
    scale = (np.abs(g).max(axis=1) / np.float32(127)).astype(np.float32)
    q = np.round(g / scale[:, None]).astype(np.int8)
    return q, scale, (q.astype(np.float32) * scale[:, None]).reshape(a.shape)


def write_checkpoint(path, s, w, version, shared, gs=32):
    """Returns the weights the file holds (Q8_0: dequantized)."""
    params = [s["dim"], s["hidden"], s["n_layers"], s["n_heads"], s["n_kv"], s["vocab"], s["seq"]]
    held = dict(w)
    if shared:
        held["cls"] = w["tok"]
    with open(path, "wb") as f:
        if version == 0:
            if not shared:
                params[5] = -params[5]
            f.write(struct.pack("<7i", *params))
            hs = s["dim"] // s["n_heads"]
            freq = 1.0 / 10000.0 ** (np.arange(0, hs, 2) / hs)
            ang = np.arange(s["seq"])[:, None] * freq[None, :]
            for a in [w["tok"], w["att_norm"], w["wq"], w["wk"], w["wv"], w["wo"], w["ffn_norm"], w["w1"],
                      w["w2"], w["w3"], w["norm"], np.cos(ang), np.sin(ang)] + ([] if shared else [w["cls"]]):
                f.write(np.asarray(a, "<f4").tobytes())
            return held
        head = struct.pack("<Ii7iB", 0x616B3432, version, *params, int(shared))
        if version == 2:
            head += struct.pack("<i", gs)
        f.write(head + bytes(256 - len(head)))
        norms = [w["att_norm"], w["ffn_norm"], w["norm"]]
        mats = ["tok", "wq", "wk", "wv", "wo", "w1", "w2", "w3"] + ([] if shared else ["cls"])
        if version == 1:
            for a in norms + [w[k] for k in mats]:
                f.write(np.asarray(a, "<f4").tobytes())
            return held
        for a in norms:
            f.write(np.asarray(a, "<f4").tobytes())
        scales = []
        for k in mats:
            q, sc, deq = q80(w[k], gs)
            f.write(q.tobytes())
            scales.append(sc)
            held[k] = deq
        if shared:
            held["cls"] = held["tok"]
        for sc in scales:
            f.write(sc.astype("<f4").tobytes())
    return held


# -- run.c's forward pass in float32 numpy ----------------------------------------------------
def run_c_logits(s, w, tokens):
    dim, L, H, KV = s["dim"], s["n_layers"], s["n_heads"], s["n_kv"]
    hs = dim // H
    kv_dim, kv_mul = KV * hs, H // KV
    f32 = np.float32

    def rmsnorm(x, g):
        ss = np.sum(x * x, dtype=f32) / f32(x.size) + f32(1e-5)
        return g * (x * (f32(1) / np.sqrt(ss)))

    def rope(vec, pos, n):
        vec = vec.copy()
        for i in range(0, n, 2):
            freq = f32(1.0) / np.power(f32(10000.0), f32(i % hs) / f32(hs))
            val = f32(pos) * freq
            c, si = np.cos(val), np.sin(val)
            v0, v1 = vec[i], vec[i + 1]
            vec[i], vec[i + 1] = v0 * c - v1 * si, v0 * si + v1 * c
        return vec

    kc = np.zeros((L, len(tokens), kv_dim), f32)
    vc = np.zeros((L, len(tokens), kv_dim), f32)
    out = []
    for pos, tok in enumerate(tokens):
        x = w["tok"][tok].astype(f32)
        for l in range(L):
            xb = rmsnorm(x, w["att_norm"][l])
            q = rope(w["wq"][l] @ xb, pos, dim)
            kc[l, pos] = rope(w["wk"][l] @ xb, pos, kv_dim)
            vc[l, pos] = w["wv"][l] @ xb
            att_out = np.zeros(dim, f32)
            for h in range(H):
                qh = q[h * hs:(h + 1) * hs]
                g = h // kv_mul
                k = kc[l, :pos + 1, g * hs:(g + 1) * hs]
                att = (k @ qh) / np.sqrt(f32(hs))
                att = np.exp(att - att.max())
                att = att / att.sum()
                att_out[h * hs:(h + 1) * hs] = att @ vc[l, :pos + 1, g * hs:(g + 1) * hs]
            x = x + w["wo"][l] @ att_out
            xb = rmsnorm(x, w["ffn_norm"][l])
            hb = w["w1"][l] @ xb
            hb = hb * (f32(1) / (f32(1) + np.exp(-hb))) * (w["w3"][l] @ xb)
            x = x + w["w2"][l] @ hb
        out.append(w["cls"] @ rmsnorm(x, w["norm"]))
    return np.array(out, f32)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    testing.make_synthetic_tokenizer(300, seed=0).save(str(d / "tokenizer.json"))
    return d


@pytest.mark.parametrize("version,shared,shape", [
    (0, True, "gqa"), (0, False, "mha"), (1, False, "gqa"), (1, True, "mha"), (2, True, "gqa"), (2, False, "mha"),
])
def test_checkpoint_matches_run_c(tmp_path, tokenizer_dir, version, shared, shape):
    s = SHAPES[shape]
    w = random_weights(s, seed=version * 2 + shared)
    ckpt = tmp_path / "model.bin"
    held = write_checkpoint(ckpt, s, w, version, shared)
    out = tmp_path / "tg.bin"
    assert cli.main(["convert", str(ckpt), "--tokenizer", str(tokenizer_dir), "-o", str(out), "--quiet"]) == 0
    ids = [int(i) for i in np.random.default_rng(1).integers(0, s["vocab"], 32)]
    want = run_c_logits(s, held, ids)
    with Model(out) as m:
        info = m.info()
        got = compare.engine_logits(m, ids)
    assert info["arch"] == "llama" and info["head_tied"] == shared and info["n_kv_head"] == s["n_kv"]
    r = compare.agreement(want, got)
    assert r["cosine_min"] >= 0.999, np.round(r["cosine"], 5)
    srt = np.sort(want, axis=1)
    decided = (srt[:, -1] - srt[:, -2]) >= 0.05
    assert decided.sum() >= 16 and r["top1"][decided].all()
    ref = reference.ReferenceModel(reference.load(out))  # and the engine is the spec's, to the bit
    assert np.array_equal(ref.forward(ids).view(np.uint32), got.view(np.uint32))


def _v1_bytes(tmp_path):
    s = SHAPES["mha"]
    p = tmp_path / "v1.bin"
    write_checkpoint(p, s, random_weights(s, 0), 1, True)
    return p.read_bytes()


@pytest.mark.parametrize("edit,says", [
    (lambda b: b[:-4], "truncated?"),
    (lambda b: b + b"\0" * 4, "bytes, but a version 1 checkpoint"),
    (lambda b: b[:4] + struct.pack("<i", 3) + b[8:], "version 3"),
    (lambda b: b[:8] + struct.pack("<i", 0) + b[12:], "dim = 0"),
    (lambda b: b[:20] + struct.pack("<i", 3) + b[24:], "n_kv_heads must divide n_heads"),
    (lambda b: b[:36] + b"\x07" + b[37:], "shared_classifier flag 7"),
    (lambda b: b[:256] + struct.pack("<f", float("inf")) + b[260:], "non-finite"),
    (lambda b: b[:10], "too short"),
])
def test_bad_checkpoints_refused(tmp_path, tokenizer_dir, edit, says, capsys):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(edit(_v1_bytes(tmp_path)))
    out = tmp_path / "out.bin"
    with pytest.raises(SystemExit) as e:
        cli.main(["convert", str(bad), "--tokenizer", str(tokenizer_dir), "-o", str(out), "--quiet"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err
    assert not out.exists()


def test_checkpoint_needs_a_tokenizer(tmp_path, capsys):
    p = tmp_path / "v1.bin"
    p.write_bytes(_v1_bytes(tmp_path))
    with pytest.raises(SystemExit):
        cli.main(["convert", str(p), "-o", str(tmp_path / "o.bin"), "--quiet"])
    assert "holds no tokenizer" in capsys.readouterr().err


# -- with llama2.c's own tokenizer.bin (tokenizer section version 2) -------------------------
PIECES = [" "] + list("abcdefghijklmnopqrstuvwxyz") + [" t", "th", " th", "he", " the", "in", "an", " a", "er",
                                                       "on", "re", "ed", "nd", "ha"]


def tokenizer_bin(path):
    """A 300-token llama2.c tokenizer.bin: <unk>, <s>, </s>, the 256 byte tokens <0x00>.., then
    PIECES with distinct scores (the longer, the higher)."""
    from tinygpt import llama2c_tokenizer as lt

    texts = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [lt.byte_piece(b) for b in range(256)]
    texts += [p.encode() for p in PIECES]
    scores = [0.0] * 259 + [-100.0 + len(p) * 10 - i * 0.25 for i, p in enumerate(PIECES)]
    path.write_bytes(lt.write_tokenizer_bin(texts, scores))
    return texts, scores


def test_checkpoint_with_its_tokenizer_bin(tmp_path, capsys):
    from test_llama_tokenizer import runc_decode, runc_encode

    s = SHAPES["mha"]
    ckpt, tokbin, out = tmp_path / "model.bin", tmp_path / "tokenizer.bin", tmp_path / "tg.bin"
    write_checkpoint(ckpt, s, random_weights(s, seed=9), 1, True)
    texts, scores = tokenizer_bin(tokbin)
    assert cli.main(["convert", str(ckpt), "--llama2c-tokenizer", str(tokbin), "-o", str(out), "--quiet"]) == 0
    mf = reference.load(out)  # the reference's reading of section 6.2
    assert mf.tokenizer.version == 2 and mf.hparams["bos_id"] == 1 and mf.hparams["eos_id"] == 2
    assert mf.hparams["q_id"] == 0xFFFFFFFF
    prompt = "the hat and the ant"
    assert cli.main(["generate", "--model", str(out), "--prompt", prompt, "-n", "8", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    ids = runc_encode(texts, scores, prompt.encode(), bos=True)  # llama2.c prepends BOS
    ref = reference.ReferenceModel(mf)
    logits, chain = ref.forward(ids), []
    for _ in range(8):
        t = int(np.argmax(logits[-1]))
        if t == 2:
            break
        chain.append(t)
        logits = ref.forward([t])
    assert got["ids"] == chain
    prev, text = ids[-1], b""
    for t in chain:
        text += runc_decode(texts, prev, t)
        prev = t
    assert got["text"] == text.decode("utf-8", "replace")
    from tinygpt import board

    assert board.read_model_header(out)["n_normal"] == len(PIECES)  # not BPE merges
    assert board.budget(str(out))["psram"]["tokenizer_heap"] == board.tokenizer_heap_bytes(0, len(PIECES))


def test_llama2c_tokenizer_damaged_in_the_file_is_refused(tmp_path):
    """The engine (C) and the reference check section 6.2 in the model file: a section whose
    byte token or sort order is broken does not load."""
    s = SHAPES["mha"]
    ckpt, tokbin, out = tmp_path / "model.bin", tmp_path / "tokenizer.bin", tmp_path / "tg.bin"
    write_checkpoint(ckpt, s, random_weights(s, seed=9), 1, True)
    tokenizer_bin(tokbin)
    assert cli.main(["convert", str(ckpt), "--llama2c-tokenizer", str(tokbin), "-o", str(out), "--quiet"]) == 0
    data = out.read_bytes()
    mf = reference.load(out)
    sec_off = next(e.offset for e in mf.directory if e.name == "tokenizer")
    nv = 300
    blob = sec_off + 36 + 4 * nv
    off = np.frombuffer(data, "<u4", nv + 1, sec_off + 32)
    import zlib

    def damaged(pos, value):
        buf = bytearray(data)
        buf[pos] = value
        struct.pack_into("<I", buf, 16, zlib.crc32(bytes(buf[20:len(buf)])) & 0xFFFFFFFF)
        return bytes(buf)

    cases = [(blob + int(off[3 + 0x41]), ord("B"), "byte token 68 is not the one byte 0x41"),
             (blob + int(off[259 + 5]), ord("z"), "sorted id"),   # 'e' becomes 'z': out of order
             (sec_off + 16, 0, "bos_id 0 differs")]
    for pos, value, says in cases:
        bad = damaged(pos, value)
        with pytest.raises(ValueError, match=says):
            Model(bad)
        with pytest.raises(reference.FormatError):
            reference.parse_model(bad)


def test_tokenizer_options_refused_together_or_for_gpt2(tmp_path, tokenizer_dir, converted, capsys):
    s = SHAPES["mha"]
    ckpt, tokbin = tmp_path / "model.bin", tmp_path / "tokenizer.bin"
    write_checkpoint(ckpt, s, random_weights(s, seed=1), 1, True)
    tokenizer_bin(tokbin)
    for args, says in (([str(ckpt), "--tokenizer", str(tokenizer_dir), "--llama2c-tokenizer", str(tokbin)], "not both"),
                       ([str(converted("v300_hd32_gelu")[0]), "--llama2c-tokenizer", str(tokbin)], "for Llama models"),
                       ([str(ckpt), "--llama2c-tokenizer", str(tmp_path / "nope.bin")], "no such")):
        with pytest.raises(SystemExit):
            cli.main(["convert", *args, "-o", str(tmp_path / "o.bin"), "--quiet"])
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, err
    assert not (tmp_path / "o.bin").exists()


def test_damaged_checkpoints_and_tokenizers_only_raise_value_errors(tmp_path):
    """400 random corruptions (bytes flipped, header fields set to extremes, truncations) of a
    llama2.c checkpoint and of a tokenizer.bin: each converts or is refused with ValueError,
    never another exception."""
    from tinygpt import llama2c, llama2c_tokenizer

    rng = np.random.default_rng(5)
    s = SHAPES["mha"]
    ck = tmp_path / "c.bin"
    write_checkpoint(ck, s, random_weights(s, 0), 2, False)
    good = ck.read_bytes()
    tb = tmp_path / "t.bin"
    tokenizer_bin(tb)
    good_tok = tb.read_bytes()
    refused = 0
    for i in range(400):
        data = bytearray(good if i % 2 == 0 else good_tok)
        kind = rng.integers(3)
        if kind == 0:
            for _ in range(rng.integers(1, 4)):
                data[int(rng.integers(0, min(len(data), 300)))] = int(rng.integers(256))
        elif kind == 1:
            at = int(rng.integers(0, 40)) // 4 * 4
            data[at:at + 4] = struct.pack("<i", int(rng.choice([0, -1, 1, 2**31 - 1, -2**31, 65537, 3])))
        else:
            data = data[:int(rng.integers(0, len(data)))]
        p = tmp_path / "x.bin"
        p.write_bytes(bytes(data))
        try:
            if i % 2 == 0:
                llama2c.read_checkpoint(p)
            else:
                llama2c_tokenizer.section_from_tokenizer_bin(p, 300)
        except ValueError:
            refused += 1
    assert refused >= 200  # most corruptions are caught; the rest still read as valid files
