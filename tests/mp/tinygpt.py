"""A scripted stand-in for the `tinygpt` module (tests only): same API as tinygpt.Model.

Pure Python that runs unchanged under MicroPython and CPython, so py/chat.py can be driven
through exact scenarios under both interpreters. Put this directory first on sys.path (before
py/) so that chat.py's `import tinygpt` finds it. Never ship it.

The script
    A dict with these keys (only "section" and "answers" are required):
      section     the tokenizer section (bytes, spec section 6) that tokenizer_blob() returns
      answers     a list of answers, each a list of token ids. The k-th reset() starts answer k
                  (the last one repeats). sample() returns answer[n], n = the number of step()
                  calls since that reset, whatever the logits or the sampling settings; past the
                  end of the answer it returns eos_id.
      n_ctx       context length (default 64); Model(path, n_ctx) overrides it like the engine
      eos_id, q_id, a_id, do_id, bos_id, n_vocab   what info() reports (defaults: eos 0,
                  q 1, a 2, do 3, bos = eos, n_vocab from the section header)
      interrupts  a list of [answer_index, n]: during that answer, the step() call made after n
                  successful steps raises KeyboardInterrupt instead (n = -1: the prefill raises).
                  Each fires once; like the C binding, the state is left as it was.

How a test passes it in
    * in the same process: set tinygpt.SCRIPT = {...} before chat.load(...) (any path), or
    * across processes (what tests/test_chat.py does): write dumps(script) to a file and give
      that file's path to chat.load(path); Model(path) reads it when SCRIPT is None.
    The file: MAGIC, one JSON line (every key but the section), then the section bytes.

What the double saw
    Every Model appends to its .log: ["reset"], ["prefill", ids], ["step", id],
    ["sample", [temperature, top_k, top_p, repetition_penalty, seed], returned id], ["close"].
    The last Model made is LAST (it stays reachable after chat.close()).
"""
import json

try:
    from array import array
except ImportError:  # pragma: no cover - every MicroPython port used here has array
    array = None

MAGIC = b"TGSCRIPT1\n"
FORMAT_VERSION = 3
SCRIPT = None
LAST = None


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


class Model:
    def __init__(self, path, n_ctx=None, check_crc=True, max_batch=0):
        global LAST
        if SCRIPT is not None:
            script = SCRIPT
        else:
            if not isinstance(path, str):
                raise TypeError("path must be a str")
            with open(path, "rb") as f:  # OSError when missing, like the real module
                script = loads(f.read())
        if n_ctx is not None and (not isinstance(n_ctx, int) or n_ctx < 1):
            raise ValueError("n_ctx must be a positive int")
        self._section = bytes(script["section"])
        self._answers = [list(a) for a in script["answers"]] or [[]]
        nv = script.get("n_vocab")
        self._nv = nv if nv is not None else _header_vocab(self._section)
        n_pos = script.get("n_ctx", 64)
        if n_ctx is not None and n_ctx > n_pos:
            raise ValueError("n_ctx %d is larger than the model's n_positions %d" % (n_ctx, n_pos))
        self._n_ctx = n_ctx if n_ctx is not None else n_pos
        self._n_pos = n_pos
        eos = script.get("eos_id", 0)
        self._ids = {"eos_id": eos, "bos_id": script.get("bos_id", eos),
                     "q_id": script.get("q_id", 1), "a_id": script.get("a_id", 2),
                     "do_id": script.get("do_id", 3)}
        self._interrupts = [list(x) for x in script.get("interrupts", [])]
        self._answer = -1
        self._steps = 0
        self._pos = 0
        self._logits = None
        self._open = True
        self.log = []
        LAST = self

    # -- helpers -------------------------------------------------------------------------
    def _check(self):
        if not self._open:
            raise ValueError("model is closed")

    def _id(self, t, index):
        if not isinstance(t, int) or isinstance(t, bool):
            raise TypeError("token id at index %d is not an int" % index)
        if t < 0 or t >= self._nv:
            raise ValueError("token id %d is outside 0..%d" % (t, self._nv - 1))
        return t

    def _interrupt(self, n):
        a = self._answer if self._answer >= 0 else 0
        for k in range(len(self._interrupts)):
            if self._interrupts[k][0] == a and self._interrupts[k][1] == n:
                del self._interrupts[k]
                raise KeyboardInterrupt()

    def _scripted(self):
        a = self._answer if self._answer >= 0 else 0
        if a >= len(self._answers):
            a = len(self._answers) - 1
        ans = self._answers[a]
        return ans[self._steps] if self._steps < len(ans) else self._ids["eos_id"]

    def _set_logits(self):
        nxt = self._scripted()
        if array is not None:
            lg = array("f", [0.0] * self._nv)
        else:
            lg = [0.0] * self._nv
        if 0 <= nxt < self._nv:
            lg[nxt] = 1.0
        self._logits = lg

    # -- the API of tinygpt.Model --------------------------------------------------------
    def info(self):
        self._check()
        d = {"n_vocab": self._nv, "n_positions": self._n_pos, "n_embd": 16, "n_layer": 1,
             "n_head": 1, "n_inner": 64, "n_ctx": self._n_ctx, "max_batch": 32, "head_dim": 16,
             "activation": "gelu_new", "layer_norm_epsilon": 1e-5, "file_bytes": 0,
             "weight_bytes": 0, "kv_bytes": 0, "scratch_bytes": 0,
             "tokenizer_bytes": len(self._section), "mapped": False}
        for k in self._ids:
            d[k] = self._ids[k]
        return d

    @property
    def pos(self):
        self._check()
        return self._pos

    def reset(self):
        self._check()
        self.log.append(["reset"])
        self._answer += 1
        self._steps = 0
        self._pos = 0
        self._logits = None

    def prefill(self, ids):
        self._check()
        if not isinstance(ids, (list, tuple)):
            if array is not None and isinstance(ids, array):
                ids = list(ids)
            else:
                raise TypeError("prefill takes a list, tuple or array of token ids")
        ids = [self._id(ids[i], i) for i in range(len(ids))]
        if self._pos + len(ids) > self._n_ctx:
            raise RuntimeError("%d tokens do not fit: %d of the context's %d positions are used"
                               % (len(ids), self._pos, self._n_ctx))
        if not ids:
            raise ValueError("prefill needs at least one token")
        self.log.append(["prefill", ids])
        self._interrupt(-1)
        self._pos += len(ids)
        self._set_logits()

    def step(self, id):
        self._check()
        id = self._id(id, 0)
        if self._pos + 1 > self._n_ctx:
            raise RuntimeError("1 tokens do not fit: %d of the context's %d positions are used"
                               % (self._pos, self._n_ctx))
        self.log.append(["step", id])
        self._interrupt(self._steps)
        self._pos += 1
        self._steps += 1
        self._set_logits()

    def logits(self):
        self._check()
        if self._logits is None:
            raise RuntimeError("no logits yet: prefill or step first")
        return memoryview(self._logits) if array is not None else self._logits

    def sample(self, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=None):
        self._check()
        if self._logits is None:
            raise RuntimeError("no logits yet: prefill or step first")
        if top_k < 0:
            raise ValueError("top_k must be >= 0")
        t = self._scripted()
        self.log.append(["sample", [temperature, top_k, top_p, repetition_penalty, seed], t])
        return t

    def tokenizer_blob(self):
        self._check()
        return memoryview(self._section)

    def meta(self):
        self._check()
        return b""  # scripted models have no meta section

    def close(self):
        if self._open:
            self.log.append(["close"])
        self._open = False
