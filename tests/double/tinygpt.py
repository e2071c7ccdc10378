"""The test double of the C module `tinygpt` (usercmodule/tinygpt/modtinygpt.c). Tests only; never ship it.

Pure Python that runs unchanged under MicroPython and CPython, with the whole API of the module:
Model(path, n_ctx=None, *, check_crc, max_batch, max_draft, n_threads), FORMAT_VERSION, and
Model.info() reset() pos prefill(ids) step(id) logits() sample(..., at=, draft=) verify(ids)
rewind(pos) counters() reset_counters() tokenizer_blob() meta() close(), with the module's
argument checks and error types. So py/chat.py runs on it as it runs on the engine, drafting
included. Put this directory first on sys.path (before py/) so that chat.py's `import tinygpt`
finds it, or copy this file to a (virtual) board as tinygpt.py (tests/double/vboard.py).

The model computes nothing: the token after each position is given by an answer (a list of
ids): the n-th token generated since the prompt (fed by step() or verify(), not by prefill()) is
followed by answer[n]; past the end of the answer it is eos_id. sample() returns that token,
whatever the sampling settings; verify() returns it after each of its tokens; logits() are 1.0
at it and 0.0 elsewhere. What Model(path) reads says where the answers come from:

A script (tests/test_chat.py, tests/test_llama.py)
    A dict with these keys (only "section" and "answers" are required):
      section     the tokenizer section (bytes, spec section 6) that tokenizer_blob() returns
      answers     a list of answers, each a list of token ids. The k-th reset() starts answer k
                  (the last one repeats).
      n_ctx       context length (default 64); Model(path, n_ctx) overrides it like the engine
      eos_id, q_id, a_id, do_id, bos_id, n_vocab   what info() reports (defaults: eos 0,
                  q 1, a 2, do 3, bos = eos, n_vocab from the section header)
      interrupts  a list of [answer_index, n]: during that answer, the forward pass for step n
                  (the step() or verify() fed after n generated tokens) raises KeyboardInterrupt
                  instead (n = -1: the prefill raises). Each fires once; like the C binding, the
                  state is left as it was.
    How a test passes it in
    * in the same process: set tinygpt.SCRIPT = {...} before chat.load(...) (any path), or
    * across processes: write dumps(script) to a file and give that file's path to
      chat.load(path); Model(path) reads it when SCRIPT is None.
    The file: MAGIC, one JSON line (every key but the section), then the section bytes.

A model file (the virtual board of tests/test_deploy.py and tests/test_serial_chat.py)
    A real model file (header, tensor directory, tokenizer and meta sections;
    docs/model-format.md); its weights are not used. The answer to a prompt "Q: {question}\\nA:"
    is the text " echo: {question}", as single-byte tokens, then eos. A question containing
    "slow" gets an endless answer of dots, one every 50 ms, to test Ctrl-C. So a test sees a
    question go in and come back out through chat.ask(), the tokenizer and the serial link,
    without the engine.

What the double saw
    Every Model appends to its .log: ["reset"], ["prefill", ids], ["step", id],
    ["sample", [temperature, top_k, top_p, repetition_penalty, seed], returned id] (with at and
    draft appended to that list when given), ["verify", ids], ["rewind", pos], ["close"].
    The last Model made is LAST (it stays reachable after chat.close()).
"""
import json
import struct
import time

try:
    from array import array
except ImportError:  # pragma: no cover - every MicroPython port used here has array
    array = None

MAGIC = b"TGSCRIPT1\n"
FORMAT_VERSION = 3
SCRIPT = None
LAST = None

U32_MAX = 0xFFFFFFFF
U64_MAX = 0xFFFFFFFFFFFFFFFF
_NO_TOKEN = 0xFFFFFFFF
_TOKENIZER_KIND = 6
_META_KIND = 7
SLOW_S = 0.05  # seconds per token of a slow answer


def dumps(script):
    """The bytes of a script file for Model(path)."""
    head = {}
    for k in script:
        if k != "section":
            head[k] = script[k]
    return MAGIC + json.dumps(head).encode() + b"\n" + bytes(script["section"])


def loads(data):
    """The script dict of the bytes of a script file (ValueError when it is not one)."""
    data = bytes(data)
    if data[:len(MAGIC)] != MAGIC:
        raise ValueError("not a tinygpt test script (magic)")
    nl = data.find(b"\n", len(MAGIC))
    if nl < 0:
        raise ValueError("not a tinygpt test script (no header line)")
    script = json.loads(data[len(MAGIC):nl])
    script["section"] = data[nl + 1:]
    return script


def _header_vocab(section):
    mv = memoryview(section)
    if len(mv) < 12 or bytes(mv[0:4]) != b"TTOK":
        raise ValueError("tokenizer section: bad magic")
    return mv[8] | (mv[9] << 8) | (mv[10] << 16) | (mv[11] << 24)


def _int_arg(value, name, lo, hi):
    """The binding's int_arg: TypeError for what is no int (a bool included), ValueError outside lo..hi."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("%s must be an int, not %s" % (name, type(value).__name__))
    if value < lo or value > hi:
        raise ValueError("%s %d is outside %d..%d" % (name, value, lo, hi))
    return value


def _opt_id(v):
    return None if v == _NO_TOKEN else v


class Model:
    def __init__(self, path, n_ctx=None, check_crc=True, max_batch=None, max_draft=None, n_threads=None):
        global LAST
        self._open = False  # until loaded: close() and __del__ have nothing to do
        if n_ctx is not None:
            n_ctx = _int_arg(n_ctx, "n_ctx", 1, U32_MAX)
        if max_batch is not None:
            max_batch = _int_arg(max_batch, "max_batch", 1, U32_MAX)
        if max_draft is not None:
            max_draft = _int_arg(max_draft, "max_draft", 1, U32_MAX)
        if n_threads is not None:
            n_threads = _int_arg(n_threads, "n_threads", 1, U32_MAX)
        self._script = None
        self._interrupts = []
        self._meta = b""
        if SCRIPT is not None:
            self._load_script(SCRIPT)
        else:
            if not isinstance(path, str):
                raise TypeError("path must be a str")
            # A flash partition label on a board; here every name is a file, and a missing one is
            # OSError like the real module's open().
            with open(path, "rb") as f:
                data = f.read()
            if data[:len(MAGIC)] == MAGIC:
                self._load_script(loads(data))
            else:
                self._load_model_file(data)
        n_pos = self._n_pos
        if n_ctx is None:
            n_ctx = n_pos
        elif n_ctx > n_pos:
            raise ValueError("n_ctx %d is larger than the model's n_positions %d" % (n_ctx, n_pos))
        batch = max_batch if max_batch is not None else 32
        if batch > n_ctx:
            batch = n_ctx
        draft = max_draft if max_draft is not None else (batch if batch < 8 else 8)
        if draft > batch:
            raise ValueError("max_draft %d is larger than max_batch %d (a draft is checked in one batch)"
                             % (draft, batch))
        self._n_ctx = n_ctx
        self._max_draft = draft
        self._info["n_ctx"] = n_ctx
        self._info["max_batch"] = batch
        self._info["max_draft"] = draft
        self._info["n_threads"] = n_threads if n_threads is not None else 1
        self._info["tokenizer_bytes"] = len(self._section)
        self._info["meta_bytes"] = len(self._meta)
        self._info["mapped"] = False
        self._info["double"] = True
        self._eos = self._info["eos_id"]
        self._answer_no = -1   # scripts: the reset() count, which answer is running
        # the ids that follow the prompt (a script's first answer until the first reset)
        self._answer = self._answers[0] if self._script is not None else []
        self._slow = False
        self._ctx = []         # the ids in the context
        self._gen = []         # per position: True when step() or verify() fed it (not prefill)
        self._has_logits = False
        self._verify_p0 = 0    # the last verify's positions, whose logits are kept
        self._verify_n = 0
        self._counters = [0, 0]
        self._open = True
        self.log = []
        LAST = self

    # -- loading -------------------------------------------------------------------------
    def _load_script(self, script):
        self._script = script
        self._section = bytes(script["section"])
        self._answers = [list(a) for a in script["answers"]] or [[]]
        nv = script.get("n_vocab")
        self._nv = nv if nv is not None else _header_vocab(self._section)
        self._n_pos = script.get("n_ctx", 64)
        eos = script.get("eos_id", 0)
        self._interrupts = [list(x) for x in script.get("interrupts", [])]
        self._info = {"n_vocab": self._nv, "n_positions": self._n_pos, "n_embd": 16, "n_layer": 1,
                      "n_head": 1, "n_inner": 64, "head_dim": 16, "activation": "gelu_new", "arch": "gpt2",
                      "n_kv_head": 0, "rope_theta": 0.0, "head_tied": False, "layer_norm_epsilon": 1e-5,
                      "file_bytes": 0, "weight_bytes": 0, "kv_bytes": 0, "scratch_bytes": 0,
                      "eos_id": eos, "bos_id": script.get("bos_id", eos), "q_id": script.get("q_id", 1),
                      "a_id": script.get("a_id", 2), "do_id": script.get("do_id", 3)}

    def _load_model_file(self, data):
        if len(data) < 128 or data[:4] != b"TGPT":
            raise ValueError("not a tinygpt model file (bad magic)")
        (ver, _hs, size, _crc, _q, n_vocab, n_pos, n_embd, n_layer, n_head, n_inner,
         act) = struct.unpack_from("<12I", data, 4)
        if size > len(data):
            raise ValueError("truncated model file: %d of %d bytes" % (len(data), size))
        eps = struct.unpack_from("<f", data, 52)[0]
        eos, bos, q_id, a_id, do_id, n_tensors, dir_off = struct.unpack_from("<7I", data, 56)
        arch, n_kv_head, rope_theta, head_tied = 0, 0, 0.0, 0
        if ver >= 3:
            arch, n_kv_head = struct.unpack_from("<2I", data, 88)
            rope_theta = struct.unpack_from("<f", data, 96)[0]
            head_tied = struct.unpack_from("<I", data, 100)[0]
        tok = None
        for i in range(n_tensors):
            tid, _dtype, off, nbytes = struct.unpack_from("<4I", data, dir_off + 16 * i)
            if tid == _TOKENIZER_KIND:
                tok = (off, nbytes)
            elif tid == _META_KIND:
                self._meta = bytes(data[off:off + nbytes])
        if tok is None:
            raise ValueError("model file has no tokenizer section")
        t_off, t_n = tok
        self._section = bytes(data[t_off:t_off + t_n])
        self._nv = n_vocab
        self._n_pos = n_pos
        self._info = {"n_vocab": n_vocab, "n_positions": n_pos, "n_embd": n_embd, "n_layer": n_layer,
                      "n_head": n_head, "n_inner": n_inner, "head_dim": n_embd // n_head if n_head else 0,
                      "activation": ("gelu_new", "gelu", "silu")[act] if act < 3 else act,
                      "arch": "llama" if arch == 1 else "gpt2", "n_kv_head": n_kv_head, "rope_theta": rope_theta,
                      "head_tied": bool(head_tied), "layer_norm_epsilon": eps, "file_bytes": size,
                      "weight_bytes": 0, "kv_bytes": 0, "scratch_bytes": 0, "eos_id": eos, "bos_id": bos,
                      "q_id": _opt_id(q_id), "a_id": _opt_id(a_id), "do_id": _opt_id(do_id)}
        # byte value -> id of the single-byte token (every byte has exactly one; spec 6)
        sec = self._section
        self._byte_id = [0] * 256
        for t in range(n_vocab):
            a, b = struct.unpack_from("<2I", sec, 32 + 4 * t)
            if b - a == 1:
                self._byte_id[sec[36 + 4 * n_vocab + a]] = t

    # -- helpers -------------------------------------------------------------------------
    def _check(self):
        if not self._open:
            raise ValueError("model is closed")

    def _id(self, t, index):
        if isinstance(t, bool) or not isinstance(t, int):
            raise TypeError("token id at index %d must be an int, not %s" % (index, type(t).__name__))
        if t < 0 or t >= self._nv:
            raise ValueError("token id %d is outside 0..%d" % (t, self._nv - 1))
        return t

    def _room(self, n):
        if n > self._n_ctx - len(self._ctx):
            raise RuntimeError("%d tokens do not fit: %d of the context's %d positions are used"
                               % (n, len(self._ctx), self._n_ctx))

    def _steps(self):
        """Tokens generated since the prompt (fed by step() or verify()) in the context."""
        n = 0
        for g in self._gen:
            if g:
                n += 1
        return n

    def _interrupt(self, n):
        a = self._answer_no if self._answer_no >= 0 else 0
        for k in range(len(self._interrupts)):
            if self._interrupts[k][0] == a and self._interrupts[k][1] == n:
                del self._interrupts[k]
                raise KeyboardInterrupt()

    def _token_bytes(self, t):
        sec = self._section
        a, b = struct.unpack_from("<2I", sec, 32 + 4 * t)
        base = 36 + 4 * self._nv
        return bytes(sec[base + a:base + b])

    def _echo(self, ids):
        """A model file's answer to the prompt ids (see the module docstring)."""
        q = b"".join([self._token_bytes(t) for t in ids])
        i = q.find(b"Q: ")
        if i >= 0:
            q = q[i + 3:]
        j = q.find(b"\nA:")
        if j >= 0:
            q = q[:j]
        self._slow = b"slow" in q
        answer = b"." if self._slow else b" echo: " + q
        self._answer = [self._byte_id[c] for c in answer]

    def _after(self, at):
        """The token that follows position at (0 <= at < pos)."""
        if self._slow:
            return self._byte_id[ord(".")]
        n = 0
        for k in range(at + 1):
            if self._gen[k]:
                n += 1
        return self._answer[n] if n < len(self._answer) else self._eos

    def _kept(self, at):
        """Whether the logits of position at are kept (the engine's logits_at)."""
        pos = len(self._ctx)
        if at >= pos:
            return False
        if at + 1 == pos and self._has_logits:
            return True
        return self._verify_p0 <= at < self._verify_p0 + self._verify_n

    def _feed(self, ids, generated):
        for t in ids:
            self._ctx.append(t)
            self._gen.append(generated)
        self._has_logits = True
        self._counters[0] += 1
        self._counters[1] += len(ids)

    def _pace(self, n):
        if self._slow:
            time.sleep(SLOW_S * n)

    # -- the API of tinygpt.Model --------------------------------------------------------
    def info(self):
        self._check()
        return dict(self._info)

    @property
    def pos(self):
        self._check()
        return len(self._ctx)

    def reset(self):
        self._check()
        self.log.append(["reset"])
        if self._script is not None:
            self._answer_no += 1
            a = self._answer_no if self._answer_no < len(self._answers) else len(self._answers) - 1
            self._answer = self._answers[a]
        else:
            self._answer = []
            self._slow = False
        self._ctx = []
        self._gen = []
        self._has_logits = False
        self._verify_n = 0

    def prefill(self, ids):
        self._check()
        if not isinstance(ids, (list, tuple)):
            if array is not None and isinstance(ids, array):
                ids = list(ids)
            else:
                raise TypeError("prefill takes a list, tuple or array of token ids")
        self._room(len(ids))
        ids = [self._id(ids[i], i) for i in range(len(ids))]
        if not ids:
            raise ValueError("prefill needs at least one token")
        self.log.append(["prefill", ids])
        self._interrupt(-1)
        if self._script is None:
            self._echo(ids)
        self._verify_n = 0
        self._feed(ids, False)

    def step(self, id):
        self._check()
        self._room(1)
        id = self._id(id, 0)
        self.log.append(["step", id])
        self._interrupt(self._steps())
        self._verify_n = 0
        self._feed([id], True)

    def logits(self):
        self._check()
        if not self._has_logits:
            raise RuntimeError("no logits yet: prefill or step first")
        nxt = self._after(len(self._ctx) - 1)
        if array is not None:
            lg = array("f", [0.0] * self._nv)
        else:
            lg = [0.0] * self._nv
        if 0 <= nxt < self._nv:
            lg[nxt] = 1.0
        return memoryview(lg) if array is not None else lg

    def sample(self, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=None, at=None, draft=None):
        self._check()
        _int_arg(top_k, "top_k", 0, U32_MAX)
        if seed is not None:
            _int_arg(seed, "seed", 0, U64_MAX)
        if at is not None:
            at = _int_arg(at, "at", 0, U32_MAX)
        if draft is not None:
            draft = self._id(draft, 0)
        pos = len(self._ctx)
        if at is None and draft is None:
            if not self._has_logits:
                raise RuntimeError("no logits yet: prefill or step first")
            where = pos - 1
        else:
            where = at if at is not None else pos - 1
            if where < 0 or not self._kept(where):
                raise RuntimeError("no logits kept for position %d (the context holds %d tokens; kept: the last "
                                   "one and the last verify's)" % (where if where >= 0 else U32_MAX, pos))
        t = self._after(where)
        args = [temperature, top_k, top_p, repetition_penalty, seed]
        if at is not None or draft is not None:
            args += [at, draft]
        self.log.append(["sample", args, t])
        self._pace(1)
        return t

    def verify(self, ids, repetition_penalty=1.0):
        self._check()
        if not isinstance(ids, (list, tuple)):
            raise TypeError("verify takes a list or tuple of token ids, got %s" % type(ids).__name__)
        n = len(ids)
        if n > self._max_draft:
            raise ValueError("verify takes at most max_draft = %d tokens, got %d" % (self._max_draft, n))
        ids = [self._id(ids[i], i) for i in range(n)]
        penalty = float(repetition_penalty)
        if n == 0:
            raise ValueError("verify needs at least one token")
        self._room(n)
        if not (penalty > 0.0 and penalty <= 3.4028234663852886e38):
            raise ValueError("repetition_penalty must be finite and > 0")
        self.log.append(["verify", ids])
        s = self._steps()
        for k in range(n):
            self._interrupt(s + k)
        p0 = len(self._ctx)
        self._feed(ids, True)
        self._verify_p0, self._verify_n = p0, n
        self._pace(n)
        return [self._after(p0 + i) for i in range(n)]

    def rewind(self, pos):
        self._check()
        pos = _int_arg(pos, "pos", 0, U32_MAX)
        cur = len(self._ctx)
        if pos > cur:
            raise ValueError("cannot rewind to position %d: the context holds %d tokens" % (pos, cur))
        if pos == cur:
            return
        self.log.append(["rewind", pos])
        self._has_logits = pos > 0 and self._kept(pos - 1)
        self._ctx = self._ctx[:pos]
        self._gen = self._gen[:pos]
        if pos > self._verify_p0:
            if pos - self._verify_p0 < self._verify_n:
                self._verify_n = pos - self._verify_p0
        else:
            self._verify_n = 0

    def counters(self):
        self._check()
        return {"passes": self._counters[0], "tokens": self._counters[1], "weight_bytes": 0, "macs": 0}

    def reset_counters(self):
        self._check()
        self._counters = [0, 0]

    def tokenizer_blob(self):
        self._check()
        return memoryview(self._section)

    def meta(self):
        self._check()
        return self._meta  # b"" for a script: it has no meta section

    def close(self):
        if self._open:
            self.log.append(["close"])
        self._open = False

    def __del__(self):
        self.close()
