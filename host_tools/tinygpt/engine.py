"""The host binding of the C engine: ``tinygpt.Model``.

The same C file (usercmodule/tinygpt/tinygpt.c) is compiled into the MicroPython module on the
board; this class has the same methods, so the device scripts in py/ run unchanged on a PC.

    m = Model("models/default/model.bin")
    m.prefill([ids...]); nxt = m.sample(); m.step(nxt); ...

Threads: each Model has a lock held around every engine call, so one model used from several
threads runs one call at a time, and close() from another thread waits for the running call.
ctypes releases the GIL while C runs, so other models (and other Python threads) run meanwhile.
The engine calls back into Python between layers (the poll: set_interrupt, Ctrl-C, close() or
reset() asked for by a callback) and at each traced intermediate; those callbacks run with the
lock held, and a callback's close()/reset() is carried out when the engine call has returned.
"""
import contextlib
import ctypes
import importlib.util
import operator
import os
import stat
import signal
import threading
import weakref

# Status codes of tinygpt.h, mapped to the Python exception a user expects.
TG_E_ARG, TG_E_NOMEM, TG_E_TOKEN, TG_E_CONTEXT, TG_E_INTERRUPTED, TG_E_NO_LOGITS = 1, 12, 13, 14, 15, 16
NO_TOKEN = 0xFFFFFFFF
U32_MAX, U64_MAX = 2**32 - 1, 2**64 - 1
HEADER_SIZE = 128


class _Error(ctypes.Structure):
    _fields_ = [("code", ctypes.c_int), ("msg", ctypes.c_char * 160)]


class _Options(ctypes.Structure):
    _fields_ = [("n_ctx", ctypes.c_uint32), ("max_batch", ctypes.c_uint32), ("skip_crc", ctypes.c_int),
                ("max_draft", ctypes.c_uint32), ("n_threads", ctypes.c_uint32)]


class _Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint32) for name in
                ("n_vocab", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "activation")] + \
               [("layer_norm_epsilon", ctypes.c_float)] + \
               [(name, ctypes.c_uint32) for name in
                ("eos_id", "bos_id", "q_id", "a_id", "do_id", "n_ctx", "max_batch", "head_dim")] + \
               [(name, ctypes.c_uint64) for name in
                ("file_bytes", "weight_bytes", "kv_bytes", "scratch_bytes")] + \
               [(name, ctypes.c_uint32) for name in ("tokenizer_bytes", "max_draft", "n_threads", "meta_bytes",
                                                     "arch", "n_kv_head")] + \
               [("rope_theta", ctypes.c_float), ("head_tied", ctypes.c_uint32)]


class _Counters(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("passes", "tokens", "weight_bytes", "macs")]


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
        "tg_meta": (ctypes.c_void_p, [ctypes.c_void_p, P(ctypes.c_uint32)]),
        "tg_verify": (ctypes.c_int, [ctypes.c_void_p, P(ctypes.c_int32), ctypes.c_uint32, ctypes.c_float,
                                     P(ctypes.c_int32), P(_Error)]),
        "tg_rewind": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_uint32, P(_Error)]),
        "tg_sample_at": (ctypes.c_int, [ctypes.c_void_p, P(_Sampler), ctypes.c_uint32, ctypes.c_int32,
                                        P(ctypes.c_int32), P(_Error)]),
        "tg_get_counters": (None, [ctypes.c_void_p, P(_Counters)]),
        "tg_reset_counters": (None, [ctypes.c_void_p]),
        "tg_read_size": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint64, P(ctypes.c_size_t),
                                         P(_Error)]),
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


def int_arg(value, name, lo, hi):
    """value as an int in lo..hi, or TypeError/ValueError naming `name` and the real value.
    Every integer that crosses into C goes through here (the MicroPython module applies the same
    rules, with the same messages): nothing wraps. A bool is refused: True is not a token id."""
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise TypeError("%s must be an int, not %s" % (name, type(value).__name__))
    value = operator.index(value)
    if not lo <= value <= hi:
        raise ValueError("%s %d is outside %d..%d" % (name, value, lo, hi))
    return value


def token_id(value, n_vocab, index):
    """A token id for the engine; the same messages as the MicroPython module."""
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise TypeError("token id at index %d must be an int, not %s" % (index, type(value).__name__))
    value = operator.index(value)
    if not 0 <= value < n_vocab:
        raise ValueError("token id %d is outside 0..%d" % (value, n_vocab - 1))
    return value


def _file_kind(mode):
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a plain file"


def read_model_file(path):
    """The bytes of a model file, read into memory (16-byte aligned, as the engine needs).

    Read, not memory-mapped: a model in use must not die (SIGBUS) because its file was truncated
    or replaced meanwhile; reading costs the file's size in memory and a few ms at load.
    Only regular files: a FIFO or a device would block or never end. The header, then the
    directory, then the header's file_size bytes are read (tg_read_size): a header claiming more
    than the file holds, or a file_size past its tensors (a sparse file), fails before the bulk.
    Returns (buffer, length of the model in it).
    """
    name = os.fspath(path)
    # O_NONBLOCK: opening a FIFO with no writer returns at once (fstat then refuses it); it
    # changes nothing for a regular file. OSError (missing, a symlink loop, unreadable) reaches
    # the caller as is, with its own message.
    fd = os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ValueError("%s: not a regular file (%s), not a tinygpt model" % (name, _file_kind(st.st_mode)))
    with os.fdopen(fd, "rb", buffering=0) as f:
        if st.st_size == 0:
            raise ValueError("%s: empty file, not a tinygpt model" % name)
        buf, have = (ctypes.c_char * 0)(), 0
        need = ctypes.c_size_t(min(st.st_size, HEADER_SIZE))
        err = _Error()
        while need.value > have:
            grown = (ctypes.c_char * max(need.value, 32))()  # > 16 bytes: malloc'd, 16-byte aligned
            ctypes.memmove(grown, buf, have)
            view = memoryview(grown).cast("B")
            while have < need.value:
                n = f.readinto(view[have:])
                if not n:
                    raise ValueError("%s: the file shrank to %d bytes while it was read" % (name, have))
                have += n
            buf = grown
            if lib().tg_read_size(buf, have, st.st_size, ctypes.byref(need), ctypes.byref(err)):
                _raise(err)
    return buf, need.value
    return buf


class Model:
    """An INT8 GPT-2 model on the C engine. Same API as the MicroPython module ``tinygpt``.

    ``path`` is a model file (read into memory) or a bytes-like object holding one.
    ``n_ctx`` shortens the KV cache (default: the model's n_positions).
    ``n_threads`` splits every large matmul's output rows between that many threads (default 1);
    the logits are bit-identical for any number.
    """

    def __init__(self, path, n_ctx=None, check_crc=True, max_batch=None, max_draft=None, n_threads=None):
        self._m = None
        self._lock = threading.RLock()
        self._deferring_sigint = False
        self._busy = False      # an engine call is running: only its callbacks can get here
        self._pending = None    # "close" or "reset", asked for by a callback during that call
        self._error = None      # an exception raised by a callback, re-raised after the call
        self._interrupt = None
        self._trace_fn = None
        if n_ctx is not None:
            n_ctx = int_arg(n_ctx, "n_ctx", 1, U32_MAX)
        if max_batch is not None:
            max_batch = int_arg(max_batch, "max_batch", 1, U32_MAX)
        if max_draft is not None:
            max_draft = int_arg(max_draft, "max_draft", 1, U32_MAX)
        if n_threads is not None:
            n_threads = int_arg(n_threads, "n_threads", 1, U32_MAX)
        if isinstance(path, (str, os.PathLike)):
            self._buf, size = read_model_file(path)
        else:
            data = memoryview(path).cast("B")
            size = len(data)
            self._buf = (ctypes.c_char * max(size, 1))()  # malloc'd: 16-byte aligned
            ctypes.memmove(self._buf, bytes(data), size)
        opts = _Options(n_ctx or 0, max_batch or 0, 0 if check_crc else 1, max_draft or 0, n_threads or 0)
        handle = ctypes.c_void_p()
        err = _Error()
        if lib().tg_load(ctypes.addressof(self._buf), size, ctypes.byref(opts), ctypes.byref(handle),
                         ctypes.byref(err)):
            self._buf = None
            _raise(err)
        self._m = handle
        info = _Info()
        lib().tg_get_info(self._m, ctypes.byref(info))
        self._info = {name: getattr(info, name) for name, _ in _Info._fields_}
        for key in ("q_id", "a_id", "do_id"):
            if self._info[key] == NO_TOKEN:
                self._info[key] = None
        self._info["activation"] = ("gelu_new", "gelu", "silu")[info.activation]
        self._info["arch"] = ("gpt2", "llama")[info.arch]
        self._info["head_tied"] = bool(info.head_tied)
        self._info["mapped"] = False  # the file is read into memory (mapped only on a board's flash)
        self._n_vocab, self._n_ctx = info.n_vocab, info.n_ctx
        # The callbacks reach the model through a weak reference: no cycle, so dropping the last
        # reference frees the engine at once.
        ref = weakref.ref(self)
        self._poll_c = POLL_FN(lambda ctx: _poll_callback(ref))
        self._trace_c = TRACE_FN(lambda *a: _trace_callback(ref, *a))
        lib().tg_set_poll(self._m, self._poll_c, None)

    # -- lifetime --------------------------------------------------------------------------
    def close(self):
        """Free the engine's memory. The object is unusable afterwards. Waits for a call running
        in another thread; from inside a callback, the running call stops and then raises
        ValueError("model is closed")."""
        with self._lock:
            if self._busy:
                self._pending = "close"
                return
            if self._m is not None:
                lib().tg_free(self._m)
                self._m = None
            self._buf = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @contextlib.contextmanager
    def _engine(self, allow_busy=False):
        """The engine handle, with the model's lock held; refused inside the model's own
        callbacks (a step inside a step), except for reads."""
        with self._lock:
            if self._m is None:
                raise ValueError("model is closed")
            if self._busy and not allow_busy:
                raise RuntimeError("the model is busy: its own interrupt or trace callback can only "
                                   "call close(), reset(), info() or pos")
            yield self._m

    # -- the API shared with the MicroPython module -----------------------------------------
    def info(self):
        """Hyperparameters and memory use: n_vocab n_ctx n_embd n_layer n_head n_inner eos_id ..."""
        with self._engine(allow_busy=True):
            return dict(self._info)

    @property
    def pos(self):
        """Number of tokens in the KV cache."""
        with self._engine(allow_busy=True) as handle:
            return lib().tg_pos(handle)

    def reset(self):
        """Empty the KV cache (start a new conversation). From inside a callback: the running
        call stops, then the model is reset and the call raises RuntimeError."""
        with self._lock:
            if self._busy and self._m is not None:
                self._pending = self._pending or "reset"
                return
            with self._engine() as handle:
                lib().tg_reset(handle)

    def prefill(self, ids):
        """Process the token ids as one batch at the next positions."""
        with self._engine() as handle:
            used = lib().tg_pos(handle)
            room = self._n_ctx - used
            if not hasattr(ids, "__len__"):  # an iterator: take what fits, and one more to know
                try:
                    it = iter(ids)
                except TypeError:
                    raise TypeError("prefill takes a sequence of token ids, got %s" % type(ids).__name__)
                ids = []
                for t in it:
                    ids.append(t)
                    if len(ids) > room:
                        raise RuntimeError("more than %d tokens do not fit: %d of the context's %d positions "
                                           "are used" % (room, used, self._n_ctx))
            n = len(ids)
            if n > room:  # before converting anything: prefill(range(10**9)) fails at once
                raise RuntimeError("%d tokens do not fit: %d of the context's %d positions are used"
                                   % (n, used, self._n_ctx))
            arr = (ctypes.c_int32 * max(n, 1))(*[token_id(t, self._n_vocab, i) for i, t in enumerate(ids)])
            self._run(lib().tg_prefill, handle, arr, n)

    def step(self, id):
        """Process one token at the next position."""
        self.prefill((id,))

    def _run(self, fn, handle, arr, n):
        """One engine call that may call back into Python; then what the callbacks asked for."""
        err = _Error()
        # Ctrl-C during the call: Python runs its SIGINT handler in the next bytecode it executes,
        # which is inside the poll or trace callback - and a KeyboardInterrupt raised there outside
        # the callback's try block is discarded by ctypes ("Exception ignored on calling ctypes
        # callback"), so the Ctrl-C could be lost. While the engine runs, the default handler is swapped for one that only notes
        # the signal; the poll then stops the engine between layers and the call raises
        # KeyboardInterrupt (the state unchanged, as for an interrupt callback).
        defer = (threading.current_thread() is threading.main_thread()
                 and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
        if defer:
            _sigint_seen[0] = False
            signal.signal(signal.SIGINT, _note_sigint)
        self._deferring_sigint = defer
        self._busy = True
        try:
            rc = fn(handle, arr, n, ctypes.byref(err))
        finally:
            self._busy = self._deferring_sigint = False
            pending, self._pending = self._pending, None
            error, self._error = self._error, None
            if defer:
                signal.signal(signal.SIGINT, signal.default_int_handler)
        if defer and _sigint_seen[0] and error is None:
            error = KeyboardInterrupt()
        if pending == "close":
            self.close()
            raise ValueError("model is closed") from error
        if pending == "reset":
            lib().tg_reset(handle)
            raise RuntimeError("reset() was called during the step: it was abandoned and the context is "
                               "empty") from error
        if error is not None:
            raise error
        if rc:
            _raise(err)

    def logits(self):
        """float32 logits of the last processed position: a memoryview of a copy (yours to keep).
        RuntimeError before any step/prefill and after reset()."""
        with self._engine() as handle:
            ptr = lib().tg_logits(handle)
            if not ptr:
                raise RuntimeError("no logits yet: prefill or step first")
            out = (ctypes.c_float * self._n_vocab)()
            ctypes.memmove(out, ptr, 4 * self._n_vocab)
        return memoryview(out).cast("B").cast("f")

    def sample(self, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=None, at=None,
               draft=None):
        """Next token id from the last logits. seed=None continues the generator; an int reseeds it.
        at: the token after that position instead (its logits kept: pos-1 or the last verify's).
        draft: a drafted token id, returned with probability p(draft), else a token drawn from p
        without it (the distribution stays p exactly)."""
        top_k = int_arg(top_k, "top_k", 0, U32_MAX)
        if seed is not None:
            seed = int_arg(seed, "seed", 0, U64_MAX)
        if at is not None:
            at = int_arg(at, "at", 0, U32_MAX)
        if draft is not None:
            draft = token_id(draft, self._n_vocab, 0)
        s = _Sampler(float(temperature), top_k, float(top_p), float(repetition_penalty))
        with self._engine() as handle:
            if seed is not None:
                lib().tg_seed(handle, seed)
            out = ctypes.c_int32()
            err = _Error()
            if at is None and draft is None:
                rc = lib().tg_sample(handle, ctypes.byref(s), ctypes.byref(out), ctypes.byref(err))
            else:
                if at is None:
                    at = lib().tg_pos(handle) - 1 if lib().tg_pos(handle) else U32_MAX
                rc = lib().tg_sample_at(handle, ctypes.byref(s), at, -1 if draft is None else draft,
                                        ctypes.byref(out), ctypes.byref(err))
            if rc:
                _raise(err)
            return out.value

    def verify(self, ids, repetition_penalty=1.0):
        """Check drafted tokens: ids (1..max_draft of them) go through the model as ONE forward pass
        at the next positions and stay in the context; returns the greedy choice after each of
        them (repetition penalty counting the tokens up to that position). The logits of every
        position are kept for sample(at=...) until the next prefill/step/verify."""
        with self._engine() as handle:
            if not isinstance(ids, (list, tuple)):
                raise TypeError("verify takes a list or tuple of token ids, got %s" % type(ids).__name__)
            n = len(ids)
            if n > self._info["max_draft"]:
                raise ValueError("verify takes at most max_draft = %d tokens, got %d" % (self._info["max_draft"], n))
            arr = (ctypes.c_int32 * max(n, 1))(*[token_id(t, self._n_vocab, i) for i, t in enumerate(ids)])
            choice = (ctypes.c_int32 * max(n, 1))()
            penalty = float(repetition_penalty)
            self._run(lambda h, a, k, e: lib().tg_verify(h, a, k, penalty, choice, e), handle, arr, n)
            return list(choice[:n])

    def rewind(self, pos):
        """Forget the tokens at positions >= pos (pos <= self.pos). The logits become position
        pos-1's if the last verify kept them, else there are none until the next step."""
        pos = int_arg(pos, "pos", 0, U32_MAX)
        with self._engine() as handle:
            err = _Error()
            if lib().tg_rewind(handle, pos, ctypes.byref(err)):
                _raise(err)

    def counters(self):
        """What the forward passes did since load or reset_counters(): passes, tokens, weight_bytes
        (model-file bytes read), macs (multiply-adds), all counted by the engine."""
        with self._engine(allow_busy=True) as handle:
            c = _Counters()
            lib().tg_get_counters(handle, ctypes.byref(c))
            return {name: getattr(c, name) for name, _ in _Counters._fields_}

    def reset_counters(self):
        with self._engine() as handle:
            lib().tg_reset_counters(handle)

    def tokenizer_blob(self):
        """The tokenizer section of the model file (bytes, a copy)."""
        with self._engine() as handle:
            n = ctypes.c_uint32()
            ptr = lib().tg_tokenizer(handle, ctypes.byref(n))
            return ctypes.string_at(ptr, n.value)

    def meta(self):
        """The meta section's text (bytes, a copy; b"" for a version 1 file): "key: value"
        lines, e.g. the abstain answer (docs/model-format.md section 8)."""
        with self._engine() as handle:
            n = ctypes.c_uint32()
            ptr = lib().tg_meta(handle, ctypes.byref(n))
            return ctypes.string_at(ptr, n.value) if n.value else b""

    # -- host-only extras -------------------------------------------------------------------
    def set_interrupt(self, fn):
        """fn() -> bool is called between layers; True abandons the step (KeyboardInterrupt).
        An exception raised by fn stops the step and propagates as itself."""
        with self._engine(allow_busy=True):
            self._interrupt = fn

    def trace(self, fn):
        """fn(name, layer, pos, value) receives every intermediate (numpy arrays); None stops.
        An exception raised by fn stops the call at the next layer and propagates as itself."""
        with self._engine(allow_busy=True) as handle:
            self._trace_fn = fn
            lib().tg_set_trace(handle, self._trace_c if fn is not None else TRACE_FN(), None)


_sigint_seen = [False]  # Ctrl-C noted while an engine call runs on the main thread (Model._run)


def _note_sigint(signum, frame):
    _sigint_seen[0] = True


def _poll_callback(ref):
    """The engine's poll, between layers: nonzero stops the running call (state unchanged)."""
    model = ref()
    if model is None or (model._deferring_sigint and _sigint_seen[0]):
        return 1
    if model._pending is not None or model._error is not None:
        return 1
    try:
        stop = model._interrupt is not None and model._interrupt()
    except BaseException as e:  # noqa: B036 (KeyboardInterrupt too: re-raised after the call)
        model._error = e
        return 1
    return 1 if stop or model._pending is not None else 0


_TRACE_DTYPES = {1: ctypes.c_int8, 2: ctypes.c_float, 3: ctypes.c_int32}


def _trace_callback(ref, ctx, name, layer, pos, data, n, dtype):
    model = ref()
    if model is None or model._trace_fn is None or model._error is not None or model._pending is not None:
        return
    try:
        import numpy as np
        arr = np.ctypeslib.as_array((_TRACE_DTYPES[dtype] * n).from_address(data)).copy()
        model._trace_fn(name.decode(), layer, pos, arr)
    except BaseException as e:  # noqa: B036
        model._error = e
