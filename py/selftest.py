# selftest.py: the first thing to run on a new board. Is tinygpt working, does it compute what
# the PC computes, and how fast?
#
#   >>> import selftest
#   >>> selftest.run()               # the model chat.load() finds (the "model" partition/region first)
#
# On the PC, `tinygpt info --selftest MODEL` runs this same file on the host engine; the two
# "bit-exact check" lines must be equal for the same model: one comparison proves the board's
# tokenizer, engine and float32 arithmetic give the PC's results to the bit.
# One file for MicroPython and CPython, like chat.py.
import gc
import sys

import tinygpt

import chat

QUESTION = "What is PSRAM?"  # the fixed prompt of the check (and the one answer shown)
N_GREEDY = 8  # greedy steps after the prompt, each one's logits in the CRC


def _crc32_py(data, crc=0):
    """zlib's CRC-32, for a MicroPython built without binascii.crc32."""
    crc ^= 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0xEDB88320 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


try:
    from binascii import crc32
except ImportError:
    crc32 = _crc32_py


def _heap():
    """(free, used) bytes of MicroPython's GC heap, or None on CPython."""
    if not hasattr(gc, "mem_free"):
        return None
    gc.collect()
    return gc.mem_free(), gc.mem_alloc()


def _kb(n):
    return "%d KB" % ((n + 512) // 1024)


def _fmt_heap(h):
    if h is None:
        return "n/a (CPython)"
    return "%s free, %s used" % (_kb(h[0]), _kb(h[1]))


def _line(name, text):
    print("%-14s %s" % (name, text))


def _board():
    """(description, where the engine's memory lives, instructions per microsecond or None)."""
    try:
        import tinygpt_board as b  # boards/TINYGPT_QEMU
        return (b.NAME,
                "arena %s at 0x%08x (PSRAM-like), model region %s at 0x%08x"
                % (_kb(b.ARENA_SIZE), b.ARENA_ADDR, _kb(b.MODEL_SIZE), b.MODEL_ADDR),
                b.INSN_PER_US if b.icount() else None)
    except ImportError:
        pass
    try:
        import esp32
        import machine
        psram_total = psram_free = int_free = 0
        for total, free, largest, min_free in esp32.idf_heap_info(esp32.HEAP_DATA):
            if total >= 1024 * 1024:  # the PSRAM heap; internal RAM heaps are a few hundred KB at most
                psram_total += total
                psram_free += free
            else:
                int_free += free
        return ("ESP32 (%s), CPU %d MHz" % (sys.platform, machine.freq() // 1000000),
                "PSRAM %s, %s free; internal RAM %s free" % (_kb(psram_total), _kb(psram_free), _kb(int_free)),
                None)
    except ImportError:
        pass
    return sys.platform, "the C library's heap (malloc)", None


def check(m, tok_ids):
    """The bit-exact check: CRC-32 over the prompt's token ids, the logits after the prompt and
    after each of N_GREEDY greedy steps (float32 bytes), and the greedy tokens; fewer steps
    when the context has no room for N_GREEDY after the prompt (before: a model of a short
    context failed with "tokens do not fit"). Returns
    (crc, greedy tokens, prefill microseconds, decode microseconds per step)."""
    n_steps = min(N_GREEDY, m.info()["n_ctx"] - len(tok_ids))
    crc = crc32(bytes(str(tok_ids), "utf-8"))
    m.reset()
    t0 = chat.ticks_us()
    m.prefill(tok_ids)
    t_prefill = chat.us_since(t0)
    crc = crc32(bytes(m.logits()), crc)
    greedy = []
    t_decode = 0
    for _ in range(n_steps):
        t = m.sample()
        greedy.append(t)
        crc = crc32(bytes(str(t), "utf-8"), crc)
        t0 = chat.ticks_us()
        m.step(t)
        t_decode += chat.us_since(t0)
        crc = crc32(bytes(m.logits()), crc)
    return crc & 0xFFFFFFFF, greedy, t_prefill, t_decode // max(n_steps, 1)


def run(path=None):
    """Print the self-test report. path: a model file (default: where chat.load() finds one).
    Returns the numbers as a dict."""
    board, where, insn_per_us = _board()
    print("tinygpt self-test")
    impl = sys.implementation
    _line("firmware", "%s %s on %s; tinygpt model format v%s" % (
        impl.name, ".".join(str(v) for v in impl.version[:3]), sys.platform, tinygpt.FORMAT_VERSION))
    _line("board", board)
    heap0 = _heap()
    m = chat.load(path)
    heap1 = _heap()
    info = m.info()
    _line("model", "%s: %s (%d bytes), %d layers, %d heads, n_embd %d, vocab %d, context %d" % (
        chat._path, "mapped, zero copy" if info["mapped"] else "read into RAM", info["file_bytes"],
        info["n_layer"], info["n_head"], info["n_embd"], info["n_vocab"], info["n_ctx"]))
    _line("GC heap", "before load %s; after %s" % (_fmt_heap(heap0), _fmt_heap(heap1)))
    _line("engine", "weights %s (%s), KV cache %s, scratch %s" % (
        _kb(info["weight_bytes"]), "in the mapped model" if info["mapped"] else "copied", _kb(info["kv_bytes"]),
        _kb(info["scratch_bytes"])))
    _line("memory", where)
    ids = chat.prompt_ids(QUESTION, info["n_ctx"])[0]
    crc, greedy, t_prefill, t_step = check(m, ids)
    _line("bit-exact", "crc32 %08x (prompt %d tokens + %d greedy steps: %s)" % (
        crc, len(ids), len(greedy), " ".join(str(t) for t in greedy)))
    speed = "prefill %d tokens in %d ms (%.1f tok/s), decode %.1f ms/token (%.1f tok/s)" % (
        len(ids), t_prefill // 1000, len(ids) * 1e6 / max(t_prefill, 1), t_step / 1000, 1e6 / max(t_step, 1))
    _line("speed", speed)
    insn = None
    if insn_per_us:
        insn = t_step * insn_per_us
        # (the speed above is then in virtual time: one instruction per nanosecond)
        _line("instructions", "%.1f M per generated token, %.1f M per prompt token (QEMU -icount)" % (
            insn / 1e6, t_prefill * insn_per_us / len(ids) / 1e6))
    answer = chat.ask(QUESTION, stream=False)
    _line("answer", "Q: %s A: %s" % (QUESTION, answer))
    heap2 = _heap()
    _line("GC heap", "after the answer %s" % _fmt_heap(heap2))
    print("self-test done")
    return {"crc": crc, "greedy": greedy, "prompt_tokens": len(ids), "prefill_us": t_prefill, "step_us": t_step,
            "insn_per_token": insn, "heap_before": heap0, "heap_after": heap1, "mapped": info["mapped"],
            "answer": answer}
