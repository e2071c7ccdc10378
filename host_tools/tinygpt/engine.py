"""The host binding of the C engine: ``tinygpt.Model``.

The same C file (usercmodule/tinygpt/tinygpt.c) is compiled into the MicroPython module on the
board; this class has the same methods, so the device scripts in py/ run unchanged on a PC.

    m = Model("models/default/model.bin")
    m.prefill([ids...]); nxt = m.sample(); m.step(nxt); ...
"""
import ctypes
import importlib.util
import mmap
import os

# Status codes of tinygpt.h, mapped to the Python exception a user expects.
TG_E_ARG, TG_E_NOMEM, TG_E_TOKEN, TG_E_CONTEXT, TG_E_INTERRUPTED, TG_E_NO_LOGITS = 1, 12, 13, 14, 15, 16
NO_TOKEN = 0xFFFFFFFF


class _Error(ctypes.Structure):
    _fields_ = [("code", ctypes.c_int), ("msg", ctypes.c_char * 160)]


class _Options(ctypes.Structure):
    _fields_ = [("n_ctx", ctypes.c_uint32), ("max_batch", ctypes.c_uint32), ("skip_crc", ctypes.c_int)]


class _Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint32) for name in
                ("n_vocab", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "activation")] + \
               [("layer_norm_epsilon", ctypes.c_float)] + \
               [(name, ctypes.c_uint32) for name in
                ("eos_id", "bos_id", "q_id", "a_id", "do_id", "n_ctx", "max_batch", "head_dim")] + \
               [(name, ctypes.c_uint64) for name in
                ("file_bytes", "weight_bytes", "kv_bytes", "scratch_bytes")] + \
               [("tokenizer_bytes", ctypes.c_uint32)]


class _Sampler(ctypes.Structure):
    _fields_ = [("temperature", ctypes.c_float), ("top_k", ctypes.c_uint32),
                ("top_p", ctypes.c_float), ("repetition_penalty", ctypes.c_float)]


TRACE_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint32,
                            ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int)
POLL_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)


def library_path():
    spec = importlib.util.find_spec("tinygpt._engine")
    if spec is None or not spec.origin:
        raise ImportError("the tinygpt C engine is not built: run `pip install -e .` in the repository")
    return spec.origin


def _load_library():
    lib = ctypes.CDLL(os.environ.get("TINYGPT_ENGINE_LIB") or library_path())
    P = ctypes.POINTER
    sigs = {
        "tg_load": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_size_t, P(_Options), P(ctypes.c_void_p), P(_Error)]),
        "tg_free": (None, [ctypes.c_void_p]),
        "tg_get_info": (None, [ctypes.c_void_p, P(_Info)]),
        "tg_pos": (ctypes.c_uint32, [ctypes.c_void_p]),
        "tg_reset": (None, [ctypes.c_void_p]),
        "tg_set_poll": (None, [ctypes.c_void_p, POLL_FN, ctypes.c_void_p]),
        "tg_set_trace": (None, [ctypes.c_void_p, TRACE_FN, ctypes.c_void_p]),
        "tg_prefill": (ctypes.c_int, [ctypes.c_void_p, P(ctypes.c_int32), ctypes.c_uint32, P(_Error)]),
        "tg_logits": (P(ctypes.c_float), [ctypes.c_void_p]),
        "tg_seed": (None, [ctypes.c_void_p, ctypes.c_uint64]),
        "tg_sample": (ctypes.c_int, [ctypes.c_void_p, P(_Sampler), P(ctypes.c_int32), P(_Error)]),
        "tg_tokenizer": (ctypes.c_void_p, [ctypes.c_void_p, P(ctypes.c_uint32)]),
        "tg_check_tokenizer": (ctypes.c_int, [ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32, P(_Error)]),
        "tg_crc32": (ctypes.c_uint32, [ctypes.c_uint32, ctypes.c_char_p, ctypes.c_size_t]),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


_lib = None


def lib():
    global _lib
    if _lib is None:
        _lib = _load_library()
    return _lib


def _raise(err, default=ValueError):
    msg = err.msg.decode("utf-8", "replace")
    if err.code == TG_E_NOMEM:
        raise MemoryError(msg)
    if err.code == TG_E_INTERRUPTED:
        raise KeyboardInterrupt(msg)
    if err.code in (TG_E_CONTEXT, TG_E_NO_LOGITS):
        raise RuntimeError(msg)
    raise default(msg)


class Model:
    """An INT8 GPT-2 model on the C engine. Same API as the MicroPython module ``tinygpt``.

    ``path`` is a model file (memory-mapped, never copied) or a bytes-like object holding one.
    ``n_ctx`` shortens the KV cache (default: the model's n_positions).
    """

    def __init__(self, path, n_ctx=None, check_crc=True, max_batch=None):
        self._m = None
        self._mm = None
        self._view = None
        if n_ctx is not None and (not isinstance(n_ctx, int) or isinstance(n_ctx, bool) or n_ctx < 1):
            raise ValueError("n_ctx must be a positive int, got %r" % (n_ctx,))
        if max_batch is not None and (not isinstance(max_batch, int) or max_batch < 1):
            raise ValueError("max_batch must be a positive int, got %r" % (max_batch,))
        if isinstance(path, (str, os.PathLike)):
            with open(path, "rb") as f:  # OSError (missing, unreadable) reaches the caller as is
                size = os.fstat(f.fileno()).st_size
                if size == 0:
                    raise ValueError("%s: empty file, not a tinygpt model" % os.fspath(path))
                # Copy-on-write mapping: pages come from the file on demand, nothing is copied,
                # and ctypes can take its address (it needs a writable buffer).
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self._view = (ctypes.c_char * size).from_buffer(self._mm)
        else:
            data = memoryview(path).cast("B")
            self._view = (ctypes.c_char * max(len(data), 1))()  # malloc'd: 16-byte aligned
            ctypes.memmove(self._view, bytes(data), len(data))
            size = len(data)
        opts = _Options(n_ctx or 0, max_batch or 0, 0 if check_crc else 1)
        handle = ctypes.c_void_p()
        err = _Error()
        if lib().tg_load(ctypes.addressof(self._view), size, ctypes.byref(opts), ctypes.byref(handle),
                         ctypes.byref(err)):
            self._release_buffer()
            _raise(err)
        self._m = handle
        info = _Info()
        lib().tg_get_info(self._m, ctypes.byref(info))
        self._info = {name: getattr(info, name) for name, _ in _Info._fields_}
        for key in ("q_id", "a_id", "do_id"):
            if self._info[key] == NO_TOKEN:
                self._info[key] = None
        self._info["activation"] = ("gelu_new", "gelu")[info.activation]
        self._info["mapped"] = self._mm is not None  # the file is memory-mapped, not copied
        self._n_vocab = info.n_vocab
        self._logits = (ctypes.c_float * info.n_vocab)()
        self._poll = None
        self._trace = None

    # -- lifetime --------------------------------------------------------------------------
    def _release_buffer(self):
        self._view = None
        if self._mm is not None:
            self._mm.close()
            self._mm = None

    def close(self):
        """Free the engine's memory and unmap the file. The object is unusable afterwards."""
        if self._m is not None:
            lib().tg_free(self._m)
            self._m = None
        self._release_buffer()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _handle(self):
        if self._m is None:
            raise ValueError("model is closed")
        return self._m

    # -- the API shared with the MicroPython module -----------------------------------------
    def info(self):
        """Hyperparameters and memory use: n_vocab n_ctx n_embd n_layer n_head n_inner eos_id ..."""
        self._handle()
        return dict(self._info)

    @property
    def pos(self):
        """Number of tokens in the KV cache."""
        return lib().tg_pos(self._handle())

    def reset(self):
        """Empty the KV cache (start a new conversation)."""
        lib().tg_reset(self._handle())

    def prefill(self, ids):
        """Process the token ids as one batch at the next positions."""
        handle = self._handle()
        try:
            ids = list(ids)
        except TypeError:
            raise TypeError("prefill takes a sequence of token ids, got %s" % type(ids).__name__)
        for i, t in enumerate(ids):
            if not isinstance(t, int) and not hasattr(t, "__index__"):
                raise TypeError("token id at index %d is %r, not an int" % (i, t))
        ids = [int(t) for t in ids]
        bad = [t for t in ids if not -2**31 <= t < 2**31]
        if bad:
            raise ValueError("token id %d is outside 0..%d" % (bad[0], self._n_vocab - 1))
        arr = (ctypes.c_int32 * max(len(ids), 1))(*ids)
        err = _Error()
        if lib().tg_prefill(handle, arr, len(ids), ctypes.byref(err)):
            _raise(err)
        ctypes.memmove(self._logits, lib().tg_logits(handle), 4 * self._n_vocab)

    def step(self, id):
        """Process one token at the next position."""
        if not isinstance(id, int) and not hasattr(id, "__index__"):
            raise TypeError("step takes one token id (int), got %r" % (id,))
        self.prefill([id])

    def logits(self):
        """float32 logits of the last processed position (a memoryview, valid until the next call)."""
        self._handle()
        return memoryview(self._logits).cast("B").cast("f")

    def sample(self, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=None):
        """Next token id from the last logits. seed=None continues the generator; an int reseeds it."""
        handle = self._handle()
        if seed is not None:
            if not isinstance(seed, int):
                raise TypeError("seed must be an int or None")
            lib().tg_seed(handle, seed & 0xFFFFFFFFFFFFFFFF)
        if not isinstance(top_k, int) or top_k < 0:
            raise ValueError("top_k must be an int >= 0, got %r" % (top_k,))
        s = _Sampler(float(temperature), min(top_k, 0xFFFFFFFF), float(top_p), float(repetition_penalty))
        out = ctypes.c_int32()
        err = _Error()
        if lib().tg_sample(handle, ctypes.byref(s), ctypes.byref(out), ctypes.byref(err)):
            _raise(err)
        return out.value

    def tokenizer_blob(self):
        """The tokenizer section of the model file (bytes)."""
        n = ctypes.c_uint32()
        ptr = lib().tg_tokenizer(self._handle(), ctypes.byref(n))
        return ctypes.string_at(ptr, n.value)

    # -- host-only extras -------------------------------------------------------------------
    def set_interrupt(self, fn):
        """fn() -> bool is called between layers; True abandons the step (KeyboardInterrupt)."""
        self._poll = POLL_FN(lambda ctx: 1 if fn() else 0) if fn else POLL_FN()
        lib().tg_set_poll(self._handle(), self._poll, None)

    def trace(self, fn):
        """fn(name, layer, pos, value) receives every intermediate (numpy arrays); None stops."""
        if fn is None:
            self._trace = TRACE_FN()
        else:
            import numpy as np
            dtypes = {1: (ctypes.c_int8, np.int8), 2: (ctypes.c_float, np.float32), 3: (ctypes.c_int32, np.int32)}

            def cb(ctx, name, layer, pos, data, n, dtype):
                ctype, npt = dtypes[dtype]
                arr = np.ctypeslib.as_array((ctype * n).from_address(data)).astype(npt, copy=True)
                fn(name.decode(), layer, pos, arr)
            self._trace = TRACE_FN(cb)
        lib().tg_set_trace(self._handle(), self._trace, None)
