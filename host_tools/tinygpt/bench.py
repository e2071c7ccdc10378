"""`tinygpt bench`: speed and memory of the C engine on random-weight models of every preset.

A benchmark, not a test: it prints what it measured on this machine. Timings are wall-clock
best-of-N on the host CPU; the byte counts are exact (they follow from the format).

`tinygpt bench --mcu` runs the engine on an emulated Cortex-M4F instead (mcu.py) and reports
executed instructions per token: counts that do not depend on the machine, for CI and for
estimating a microcontroller's speed (docs/performance.md).
"""
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from . import modelfile
from .presets import PRESETS


def synthetic_tokenizer_section(n_vocab):
    """A valid byte-level BPE tokenizer section with n_vocab tokens (for random models only):
    the 256 byte tokens, then each further token the merge of two earlier ones."""
    if n_vocab < 256:
        raise ValueError("a byte-level tokenizer needs at least 256 tokens, got %d" % n_vocab)
    toks = [bytes([b]) for b in range(256)]
    merges = []
    rng = np.random.default_rng(0)
    while len(toks) < n_vocab:
        a, b = (int(x) for x in rng.integers(0, len(toks), 2))
        if len(toks[a]) + len(toks[b]) > 12 or toks[a] + toks[b] in toks:
            a, b = int(rng.integers(0, 256)), int(rng.integers(0, 256))
            if toks[a] + toks[b] in toks:
                continue
        merges.append((a, b, len(toks)))
        toks.append(toks[a] + toks[b])
    blob = b"".join(toks)
    offs = np.cumsum([0] + [len(t) for t in toks]).astype("<u4")
    head = np.array([n_vocab, len(merges), 0, 1, len(blob), 0], dtype="<u4")
    pad = b"\0" * (-len(blob) % 4)
    return (b"TTOK" + np.array([1], "<u4").tobytes() + head.tobytes() + offs.tobytes() + blob + pad
            + np.array(merges, dtype="<u4").reshape(-1).tobytes())


def bench_hparams(name):
    """The hyperparameters of a bench model name: a GPT-2 preset, or "llama-" + a Llama preset."""
    from .presets import LLAMA_PRESETS

    if name.startswith("llama-") and name[6:] in LLAMA_PRESETS:
        hp = dict(LLAMA_PRESETS[name[6:]])
    elif name in PRESETS:
        hp = dict(PRESETS[name])
    else:
        raise ValueError("unknown preset %r (known: %s)" % (name, ", ".join(bench_names())))
    hp["n_vocab"] = hp.pop("vocab_size")
    return hp


def bench_names():
    from .presets import LLAMA_PRESETS

    return list(PRESETS) + ["llama-" + k for k in LLAMA_PRESETS]


# what `tinygpt bench` runs without --preset: every GPT-2 preset and the Llama of the same size
# as the default one
DEFAULT_BENCH = list(PRESETS) + ["llama-d256x8"]


def random_model_bytes(hparams, seed=0):
    """The bytes of a model file with GPT-2-like random weights (N(0, 0.02), unit LN gains); a
    Llama model for hparams with arch 'llama'."""
    rng = np.random.default_rng(seed)
    E, I, V, P, L = (hparams[k] for k in ("n_embd", "n_inner", "n_vocab", "n_positions", "n_layer"))
    if hparams.get("arch") == "llama":
        return _random_llama_bytes(hparams, rng)
    t = {}
    t["wte_q"], t["wte_s"] = modelfile.quantize_rows(rng.normal(0, 0.02, (V, E)).astype(np.float32))
    t["wpe"] = rng.normal(0, 0.01, (P, E)).astype(np.float32)
    t["lnf_g"], t["lnf_b"] = np.ones(E, np.float32), np.zeros(E, np.float32)
    for l in range(L):
        for name, (o, i) in (("attn", (3 * E, E)), ("proj", (E, E)), ("fc", (I, E)), ("mproj", (E, I))):
            w, s = modelfile.quantize_rows(rng.normal(0, 0.02, (o, i)).astype(np.float32))
            t["h.%d.%s_w" % (l, name)], t["h.%d.%s_s" % (l, name)] = w, s
            t["h.%d.%s_b" % (l, name)] = rng.normal(0, 0.01, o).astype(np.float32)
        for ln in ("ln1", "ln2"):
            t["h.%d.%s_g" % (l, ln)], t["h.%d.%s_b" % (l, ln)] = np.ones(E, np.float32), np.zeros(E, np.float32)
    hp = dict(hparams, eos_id=0)
    buf, _ = modelfile.build_model_bytes(hp, t, synthetic_tokenizer_section(V))
    return bytes(buf)


def _random_llama_bytes(hparams, rng):
    from .llama import rope_table

    E, I, V, P, L, H = (hparams[k] for k in ("n_embd", "n_inner", "n_vocab", "n_positions", "n_layer", "n_head"))
    D = E // H
    KVD = hparams["n_kv_head"] * D
    t = {"rope": rope_table(P, D, hparams.get("rope_theta", 10000.0)), "rmsf_g": np.ones(E, np.float32)}
    t["wte_q"], t["wte_s"] = modelfile.quantize_rows(rng.normal(0, 0.02, (V, E)).astype(np.float32))
    for l in range(L):
        for name, (o, i) in (("qkv", (E + 2 * KVD, E)), ("o", (E, E)), ("gu", (2 * I, E)), ("down", (E, I))):
            w, s = modelfile.quantize_rows(rng.normal(0, 0.02, (o, i)).astype(np.float32))
            t["h.%d.%s_w" % (l, name)], t["h.%d.%s_s" % (l, name)] = w, s
        t["h.%d.rms1_g" % l], t["h.%d.rms2_g" % l] = np.ones(E, np.float32), np.ones(E, np.float32)
    if not hparams.get("head_tied", True):
        t["head_q"], t["head_s"] = modelfile.quantize_rows(rng.normal(0, 0.02, (V, E)).astype(np.float32))
    buf, _ = modelfile.build_model_bytes(dict(hparams, eos_id=0), t, synthetic_tokenizer_section(V))
    return bytes(buf)


def bytes_read(info, n_tokens):
    """Weight bytes the engine reads to process n_tokens in one batch (one chunk): every layer
    matrix once, the head (wte_q, wte_s, or a Llama's own head) once for the last token, an
    embedding row and a wpe row (Llama: a rope row) per token."""
    E, V, P = info["n_embd"], info["n_vocab"], info["n_positions"]
    llama = info.get("arch") == "llama"
    row = 4 * (info["head_dim"] if llama else E)  # the position row of a token: rope or wpe
    norm_f = (4 if llama else 8) * E              # the final norm's gain (and bias)
    head = V * E + 4 * V
    own_head = head if llama and not info.get("head_tied", True) else 0
    layers = info["weight_bytes"] - head - P * row - norm_f - own_head  # wte, wpe / rope, lnf
    return layers + head + norm_f + n_tokens * (E + 4 + row)


def bench_model(model, n_prompt=16, n_decode=32, repeats=3):
    info = model.info()
    n_prompt = min(n_prompt, info["n_ctx"] - 1)
    n_decode = min(n_decode, info["n_ctx"] - n_prompt)
    prompt = [(7 * i + 3) % info["n_vocab"] for i in range(n_prompt)]
    prefill_s, decode_s = [], []
    for _ in range(repeats):
        model.reset()
        t0 = time.perf_counter()
        model.prefill(prompt)
        t1 = time.perf_counter()
        for _ in range(n_decode):
            model.step(model.sample())
        t2 = time.perf_counter()
        prefill_s.append(t1 - t0)
        decode_s.append(t2 - t1)
    return {
        "prefill_tok_s": n_prompt / min(prefill_s),
        "decode_tok_s": n_decode / min(decode_s),
        "prefill_tokens": n_prompt,
        "decode_tokens": n_decode,
        "bytes_read_per_decoded_token": bytes_read(info, 1),
        "bytes_read_per_prefill": bytes_read(info, n_prompt),
        "weights_bytes": info["weight_bytes"],
        "file_bytes": info["file_bytes"],
        "kv_bytes": info["kv_bytes"],
        "scratch_bytes": info["scratch_bytes"],
        "n_ctx": info["n_ctx"],
    }


def bench_threads(source, n_threads, n_ctx=None, rounds=3):
    """bench_model with n_threads matmul workers, and the speedup over 1 thread measured in the
    same process: the two models take turns (best of `rounds` turns each), so a machine that
    other work slows down slows both alike. Also the load average at the end: on a busy machine
    threads wait for cores and the ratio says so."""
    from .engine import Model

    runs = {1: [], n_threads: []}
    with Model(source, n_ctx=n_ctx) as one, Model(source, n_ctx=n_ctx, n_threads=n_threads) as many:
        for _ in range(rounds):
            runs[1].append(bench_model(one))
            runs[n_threads].append(bench_model(many))
    best = {n: {k: max(r[k] for r in rs) for k in ("decode_tok_s", "prefill_tok_s")} for n, rs in runs.items()}
    r = dict(runs[n_threads][0], **best[n_threads])
    r.update(threads=n_threads, decode_tok_s_1_thread=best[1]["decode_tok_s"],
             prefill_tok_s_1_thread=best[1]["prefill_tok_s"],
             decode_speedup=r["decode_tok_s"] / best[1]["decode_tok_s"],
             prefill_speedup=r["prefill_tok_s"] / best[1]["prefill_tok_s"],
             load_average=os.getloadavg()[0] if hasattr(os, "getloadavg") else None)
    return r


def run(presets=None, model_path=None, as_json=False, n_ctx=None, out=print, threads=None):
    from .engine import Model

    results = {}
    sources = {}
    if model_path:
        sources[str(model_path)] = model_path
    else:
        for name in presets or DEFAULT_BENCH:
            sources[name] = random_model_bytes(bench_hparams(name))
    for name, source in sources.items():
        if threads and threads > 1:
            results[name] = bench_threads(source, threads, n_ctx=n_ctx)
        else:
            with Model(source, n_ctx=n_ctx) as m:
                results[name] = bench_model(m)
    if as_json:
        out(json.dumps(results, indent=2))
    else:
        out("%-12s %10s %10s %12s %12s %10s %10s %9s" % (
            "model", "decode/s", "prefill/s", "read/token", "read/prefill", "weights", "kv", "scratch"))
        for name, r in results.items():
            out("%-12s %10.1f %10.1f %12s %12s %10s %10s %9s" % (
                name[-12:], r["decode_tok_s"], r["prefill_tok_s"], _mb(r["bytes_read_per_decoded_token"]),
                _mb(r["bytes_read_per_prefill"]), _mb(r["weights_bytes"]), _mb(r["kv_bytes"]),
                _mb(r["scratch_bytes"])))
        out("(host CPU, best of 3; prefill = %d-token prompt; sizes in MB = 10^6 bytes)"
            % next(iter(results.values()))["prefill_tokens"])
        if threads and threads > 1:
            out("%-10s %10s %10s %10s %10s" % ("model", "decode/s", "1 thread", "speedup", "prefill x"))
            for name, r in results.items():
                out("%-10s %10.1f %10.1f %9.2fx %9.2fx" % (
                    name[-10:], r["decode_tok_s"], r["decode_tok_s_1_thread"], r["decode_speedup"],
                    r["prefill_speedup"]))
            load = next(iter(results.values()))["load_average"]
            out("(%d threads vs 1 in this process, alternating; load average %s on %d CPUs: threads "
                "only help when cores are free)" % (threads, "%.1f" % load if load is not None else "?",
                                                    os.cpu_count() or 0))
    return results


def _mb(n):
    return "%.3f" % (n / 1e6)


# -- the emulated microcontroller ------------------------------------------------------------

# The builds `bench --mcu` measures: the engine as a Cortex-M4F port compiles it (dot_rows with
# the DSP extension's SMLAD), and the portable kernel of 32-bit cores without SIMD.
MCU_BUILDS = {"default": (), "portable": ("TG_DOT_KERNEL=2",)}


def matmul_macs(info):
    """Weight multiply-adds of one decoded token: every layer matrix and the output head
    (attention over the cache comes on top and grows with the position)."""
    E, I = info["n_embd"], info["n_inner"]
    if info.get("arch") == "llama":  # q, k, v (n_kv_head heads), o; gate, up, down
        KVD = info["n_kv_head"] * info["head_dim"]
        return info["n_layer"] * (E * (E + 2 * KVD) + E * E + 3 * E * I) + info["n_vocab"] * E
    return info["n_layer"] * (4 * E * E + 2 * E * I) + info["n_vocab"] * E


def mcu_bench_model(model_bytes, workdir, objects):
    """Instruction counts of one model file on the emulated Cortex-M4F, for each MCU_BUILDS build,
    checked bit-identical to the host engine."""
    from . import mcu
    from .engine import Model

    with Model(model_bytes) as m:
        info = m.info()
    runs = {b: mcu.run_model(model_bytes, workdir=workdir, objects=objects[b], name="bench_" + b)
            for b in MCU_BUILDS}
    first = runs["default"]
    counts = {b: {"decode": r["instructions"]["step"], "prefill": r["instructions"]["prefill"]}
              for b, r in runs.items()}
    macs = matmul_macs(info)
    return {
        "instructions_per_token": counts["default"],
        "portable_kernel_instructions_per_token": counts["portable"],
        "decode_instructions_per_mac": {b: c["decode"] / macs for b, c in counts.items()},
        "matmul_macs_per_token": macs,
        "weight_bytes_per_token": bytes_read(info, 1),
        "prefill_tokens": first["counted"]["prefill"],
        "decode_tokens": first["counted"]["step"],
        "decode_positions": [len(first["prompt"]), len(first["prompt"]) + first["counted"]["step"] - 1],
        "load_instructions": first["instructions"]["load"],
        "greedy_sample_instructions": first["instructions"]["greedy_sample"],
        "bit_identical_to_host": all(mcu.matches_host(model_bytes, r) for r in runs.values()),
        "model_bytes": len(model_bytes),
        "cpu": mcu.CPU,
        "compiler": "%s %s" % (mcu.compiler_version(), " ".join(mcu.CFLAGS[:5])),
    }


def run_mcu(presets=None, model_path=None, as_json=False, out=print):
    """`tinygpt bench --mcu`: instructions per token on the emulated Cortex-M4F (mcu.py).
    Raises mcu.McuError (ToolMissing names the Debian packages) when it cannot build or run."""
    from . import mcu

    if model_path:
        models = {str(model_path): lambda: Path(model_path).read_bytes()}
    else:
        models = {}
        for name in presets or DEFAULT_BENCH:
            models[name] = lambda hp=bench_hparams(name): random_model_bytes(hp)
    results = {}
    with tempfile.TemporaryDirectory(prefix="tinygpt-bench-mcu-") as tmp:
        objects = {}
        for build, defines in MCU_BUILDS.items():
            d = Path(tmp) / build
            d.mkdir()
            objects[build] = mcu.compile_objects(d, defines=defines)
        for name, load in models.items():
            results[name] = mcu_bench_model(load(), tmp, objects)
    if as_json:
        out(json.dumps(results, indent=2))
    else:
        out("%-12s %14s %14s %14s %9s %12s %9s" % ("model", "decode insn", "prefill insn", "portable dec",
                                                   "insn/MAC", "read/token", "identical"))
        for name, r in results.items():
            out("%-12s %14.0f %14.0f %14.0f %9.2f %12s %9s" % (
                name[-12:], r["instructions_per_token"]["decode"], r["instructions_per_token"]["prefill"],
                r["portable_kernel_instructions_per_token"]["decode"], r["decode_instructions_per_mac"]["default"],
                _mb(r["weight_bytes_per_token"]), "yes" if r["bit_identical_to_host"] else "NO"))
        first = next(iter(results.values()))
        out("(%s, %s; instructions per token: decode at positions %d-%d, prefill of %d tokens; "
            "portable dec = the kernel of cores without SIMD)" % (
                first["cpu"], first["compiler"], first["decode_positions"][0], first["decode_positions"][1],
                first["prefill_tokens"]))
    return results


# -- speculative decoding (issue 12): the same questions plainly and with drafts -------------
def _chat(model_path):
    """py/chat.py (the loop the board runs), with the model loaded."""
    import sys
    py_dir = str(Path(__file__).resolve().parents[2] / "py")
    if py_dir not in sys.path:
        sys.path.insert(0, py_dir)
    import chat
    chat.load(str(model_path))
    return chat


def question_bench(model_path, questions, out=None):
    """Every question through chat.ask greedily, plainly and with drafting. Per mode: passes,
    weight bytes and multiply-adds per generated token (the engine's own counters, the prompt's
    prefill left out: it is measured on its own and subtracted), tok/s (wall clock, the whole
    ask), and the fraction of answers identical token for token to the plain ones."""
    chat = _chat(model_path)
    m = chat._model
    generated = []

    class Recorder(chat.Decoder):  # every generated token passes through the decoder
        def feed(self, tok):
            generated.append(tok)
            return super().feed(tok)
    decoder, chat.Decoder = chat.Decoder, Recorder
    try:
        m.reset_counters()
        for q in questions:  # what ask's prefill costs, to take out of the per-token counts
            m.reset()
            m.prefill(chat.prompt_ids(q, m.info()["n_ctx"])[0])
        prefill = m.counters()
        results, plain = {}, None
        for mode in ("plain", "draft"):
            answers = []
            m.reset_counters()
            t0 = time.perf_counter()
            for q in questions:
                del generated[:]
                chat.ask(q, stream=False, draft=mode == "draft")
                answers.append(list(generated))
            dt = time.perf_counter() - t0
            c = m.counters()
            n = sum(map(len, answers))
            per = lambda key: (c[key] - prefill[key]) / n if n else None  # noqa: E731
            plain = plain or answers
            results[mode] = {"passes_per_token": per("passes"), "weight_bytes_per_token": per("weight_bytes"),
                             "macs_per_token": per("macs"), "tok_s": n / dt if dt > 0 else None,
                             "answers_identical": sum(a == b for a, b in zip(answers, plain)) / len(questions),
                             "tokens": n, "seconds": dt}
        results["questions"] = len(questions)
        return results
    finally:
        chat.Decoder = decoder
        chat.close()


def run_questions(model_path, questions_path, as_json=False, out=print):
    """`tinygpt bench MODEL --questions FILE [--json]`."""
    from . import corpus
    questions = [q for q, _ in corpus.load_questions(questions_path)]
    if not questions:
        raise ValueError("%s holds no questions (Q:/A: pairs)" % questions_path)
    r = question_bench(model_path, questions)
    r["model"], r["questions_file"] = str(model_path), str(questions_path)
    if as_json:
        out(json.dumps(r, indent=2))
        return r
    out("%s, %d questions from %s (greedy)" % (model_path, r["questions"], questions_path))
    out("%-6s %8s %14s %12s %8s %10s" % ("mode", "passes", "weight MB", "MMACs", "tok/s", "identical"))
    for mode in ("plain", "draft"):
        x = r[mode]
        out("%-6s %8.3f %14.2f %12.2f %8.1f %10.3f" % (mode, x["passes_per_token"], x["weight_bytes_per_token"] / 1e6,
                                                       x["macs_per_token"] / 1e6, x["tok_s"], x["answers_identical"]))
    out("(per generated token; passes, weight bytes and multiply-adds counted by the engine, prefill excluded)")
    return r


# ----------------------------------------------------------------------------- the command

def add_arguments(p) -> None:
    """`tinygpt bench`'s options."""
    p.add_argument("model", nargs="?", help="a model file (default: random models of the presets)")
    p.add_argument("--preset", action="append", help="only this preset (repeatable)")
    p.add_argument("--n-ctx", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="split each matmul between N threads and report the speedup over 1 thread, measured in "
                        "the same run (logits are bit-identical for any N)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--questions", metavar="FILE", help="answer FILE's questions (Q:/A: pairs) greedily, plainly and "
                   "with drafts; report passes, weight bytes and multiply-adds per token and identical answers")
    p.add_argument("--mcu", action="store_true",
                   help="instructions per token on an emulated Cortex-M4F (QEMU) instead of host speed; needs the "
                        "Debian packages gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm")


def run_cli(args) -> None:
    """`tinygpt bench`: the options checked, then run_questions, run_mcu or run."""
    from .ui import UserError, existing_file

    if args.model and args.preset:
        raise UserError("give either --preset or a MODEL file, not both")
    for p in args.preset or []:
        if p not in bench_names():
            raise UserError("unknown preset %r (known: %s)" % (p, ", ".join(bench_names())))
    model = existing_file(args.model, "model file") if args.model else None
    if args.questions:  # issue 12: plain vs drafted decoding of real questions
        if not model or args.mcu or args.preset:
            raise UserError("--questions needs a MODEL file (and no --preset or --mcu)")
        try:
            run_questions(model, existing_file(args.questions, "questions file"), as_json=args.json)
        except ValueError as e:
            raise UserError(str(e)) from e
        return
    if args.mcu:
        from .mcu import McuError

        if args.n_ctx is not None:
            raise UserError("--n-ctx does not apply to --mcu (the emulated run uses n_positions)")
        if args.threads is not None:
            raise UserError("--threads does not apply to --mcu (the emulated board has one core)")
        try:
            run_mcu(presets=args.preset, model_path=model, as_json=args.json)
        except McuError as e:
            raise UserError(str(e)) from e
        return
    if args.threads is not None and args.threads < 1:
        raise UserError("--threads must be at least 1, got %d" % args.threads)
    run(presets=args.preset, model_path=model, as_json=args.json, n_ctx=args.n_ctx, threads=args.threads)
