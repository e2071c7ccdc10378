/*
 * MicroPython binding of the tinygpt engine: module `tinygpt`, type `Model`.
 *
 * A thin layer: argument conversion, error mapping and object lifetime. Everything else is the
 * portable engine (tinygpt.c). The API is the one of the host package (host_tools/tinygpt/
 * engine.py), so py/chat.py runs unchanged on the board and on a PC:
 *
 *   m = tinygpt.Model(path, n_ctx=None)   path: a flash partition label (ESP32) or a file
 *   m.info(); m.reset(); m.pos; m.prefill(ids); m.step(id); m.logits(); m.sample(...)
 *   m.tokenizer_blob(); m.close()
 *
 * The multi-megabyte buffers (the model file when it is not memory-mapped, the KV cache,
 * activations) come from the port layer (tg_port.h: PSRAM on the ESP32, malloc on unix), not
 * from the GC heap, so the collector never scans them; __del__ gives them back.
 *
 * What Python gets back owns its memory: logits() is a memoryview of a fresh GC copy and
 * tokenizer_blob() is bytes (a copy: on the ESP32 the section may lie in a flash mapping that
 * close() unmaps), so nothing handed out reads engine memory after close() or a collection.
 * Every integer crossing into C is range-checked with the messages of the host binding
 * (host_tools/tinygpt/engine.py): nothing wraps, on a 32-bit board or a 64-bit PC.
 */
#include <errno.h>
#include <string.h>

#include "extmod/vfs.h"
#include "py/binary.h"
#include "py/builtin.h"
#include "py/mperrno.h"
#include "py/obj.h"
#include "py/objstr.h"
#include "py/nlr.h"
#include "py/runtime.h"
#include "py/stream.h"

#include "tg_port.h"
#include "tinygpt.h"

/* Ports whose threads run without a GIL (unix) need a lock per model; with a GIL (ESP32) every
 * call, the engine's included, already runs alone. */
#define MODEL_LOCKS (MICROPY_PY_THREAD && !MICROPY_PY_THREAD_GIL)
#if MODEL_LOCKS
#include "py/mpthread.h"
#endif

/* Where MicroPython raises KeyboardInterrupt straight from the SIGINT handler (the unix port
 * without a GIL: MICROPY_ASYNC_KBD_INTR), a Ctrl-C would longjmp out of the engine at any
 * instruction - out of a matmul whose rows the worker threads are still computing, with the
 * job on the abandoned stack (a crash), or with a half-updated model. So SIGINT is blocked while
 * a method runs: the engine's poll sees it pending and stops cleanly between layers, and the
 * signal is delivered, as KeyboardInterrupt, once the method has returned. */
#if MICROPY_ASYNC_KBD_INTR
#include <signal.h>
#if MICROPY_PY_THREAD
#include <pthread.h>
#define SIGMASK pthread_sigmask
#else
#define SIGMASK sigprocmask
#endif
typedef sigset_t kbd_state_t;
static void kbd_defer(kbd_state_t *old) {
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, SIGINT);
    SIGMASK(SIG_BLOCK, &s, old);
}
static void kbd_restore(const kbd_state_t *old) {
    SIGMASK(SIG_SETMASK, old, NULL); /* a pending Ctrl-C is raised here */
}
static int kbd_pending(void) {
    sigset_t p;
    return sigpending(&p) == 0 && sigismember(&p, SIGINT) == 1;
}
#else
typedef int kbd_state_t;
static void kbd_defer(kbd_state_t *old) {
    (void)old;
}
static void kbd_restore(const kbd_state_t *old) {
    (void)old;
}
static int kbd_pending(void) {
    return 0;
}
#endif

typedef struct _tinygpt_model_obj_t {
    mp_obj_base_t base;
    tg_model *model;
    uint8_t *file;     /* the model bytes, when read from a file into port memory */
    void *map_handle;  /* the model bytes, when memory-mapped by the port (flash partition) */
    int32_t *ids;      /* [n_ctx] scratch for prefill ids */
    int32_t *choices;  /* [max_draft] greedy choices of verify() */
    uint32_t n_ctx, n_vocab;
    #if MODEL_LOCKS
    mp_thread_mutex_t lock; /* one call at a time: see run_locked */
    #endif
} tinygpt_model_obj_t;

static void release(tinygpt_model_obj_t *self) {
    if (self->model) {
        tg_free(self->model);
        self->model = NULL;
    }
    tg_port_free(self->ids);
    self->ids = NULL;
    tg_port_free(self->choices);
    self->choices = NULL;
    tg_port_free(self->file);
    self->file = NULL;
    if (self->map_handle) {
        tg_port_unmap(self->map_handle);
        self->map_handle = NULL;
    }
}

static NORETURN void raise_error(const tg_error *err) {
    if (err->code == TG_E_NOMEM) {
        mp_raise_msg_varg(&mp_type_MemoryError, MP_ERROR_TEXT("%s"), err->msg);
    }
    if (err->code == TG_E_CONTEXT || err->code == TG_E_NO_LOGITS) {
        mp_raise_msg_varg(&mp_type_RuntimeError, MP_ERROR_TEXT("%s"), err->msg);
    }
    mp_raise_msg_varg(&mp_type_ValueError, MP_ERROR_TEXT("%s"), err->msg);
}

static tinygpt_model_obj_t *get_open(mp_obj_t self_in) {
    tinygpt_model_obj_t *self = MP_OBJ_TO_PTR(self_in);
    if (!self->model) {
        mp_raise_ValueError(MP_ERROR_TEXT("model is closed"));
    }
    return self;
}

/* Every method runs through here: with the model's lock held where threads run without a GIL,
 * so a model used from several threads runs one call at a time and close() from another thread
 * waits for the running step instead of freeing memory under it (issue 9 D2). An exception
 * unlocks and propagates. */
typedef mp_obj_t (*model_call_fn)(mp_obj_t self_in, size_t n_args, const mp_obj_t *args, mp_map_t *kw);

static mp_obj_t run_locked(model_call_fn fn, mp_obj_t self_in, size_t n_args, const mp_obj_t *args,
                           mp_map_t *kw) {
    kbd_state_t kbd;
    kbd_defer(&kbd);
    #if MODEL_LOCKS
    tinygpt_model_obj_t *self = MP_OBJ_TO_PTR(self_in);
    mp_thread_mutex_lock(&self->lock, 1);
    #endif
    nlr_buf_t nlr;
    if (nlr_push(&nlr) == 0) {
        mp_obj_t result = fn(self_in, n_args, args, kw);
        nlr_pop();
        #if MODEL_LOCKS
        mp_thread_mutex_unlock(&self->lock);
        #endif
        kbd_restore(&kbd);
        return result;
    }
    #if MODEL_LOCKS
    mp_thread_mutex_unlock(&self->lock);
    #endif
    kbd_restore(&kbd);
    nlr_jump(nlr.ret_val);
}

/* The method objects: `fn` wrapped by run_locked, for each calling convention. */
#define LOCKED_METHOD_1(fn)                                                                     \
    static mp_obj_t fn##_call(mp_obj_t self_in, size_t n, const mp_obj_t *args, mp_map_t *kw) { \
        (void)n;                                                                                \
        (void)args;                                                                             \
        (void)kw;                                                                               \
        return fn(self_in);                                                                     \
    }                                                                                           \
    static mp_obj_t fn##_locked(mp_obj_t self_in) {                                             \
        return run_locked(fn##_call, self_in, 0, NULL, NULL);                                   \
    }                                                                                           \
    static MP_DEFINE_CONST_FUN_OBJ_1(fn##_obj, fn##_locked)

#define LOCKED_METHOD_2(fn)                                                                     \
    static mp_obj_t fn##_call(mp_obj_t self_in, size_t n, const mp_obj_t *args, mp_map_t *kw) { \
        (void)n;                                                                                \
        (void)kw;                                                                               \
        return fn(self_in, args[0]);                                                            \
    }                                                                                           \
    static mp_obj_t fn##_locked(mp_obj_t self_in, mp_obj_t arg) {                               \
        return run_locked(fn##_call, self_in, 1, &arg, NULL);                                   \
    }                                                                                           \
    static MP_DEFINE_CONST_FUN_OBJ_2(fn##_obj, fn##_locked)

#define LOCKED_METHOD_KW(fn, n_min)                                                             \
    static mp_obj_t fn##_call(mp_obj_t self_in, size_t n, const mp_obj_t *args, mp_map_t *kw) { \
        (void)self_in;                                                                          \
        return fn(n, args, kw);                                                                 \
    }                                                                                           \
    static mp_obj_t fn##_locked(size_t n, const mp_obj_t *args, mp_map_t *kw) {                 \
        return run_locked(fn##_call, args[0], n, args, kw);                                     \
    }                                                                                           \
    static MP_DEFINE_CONST_FUN_OBJ_KW(fn##_obj, n_min, fn##_locked)

/* Called by the engine between layers: a pending Ctrl-C stops the step cleanly (the engine
 * leaves the context as it was) and is raised once the engine has returned. */
static int poll_pending(void *ctx) {
    (void)ctx;
    return MP_STATE_THREAD(mp_pending_exception) != MP_OBJ_NULL || kbd_pending();
}

/* Raise exc_type with a message built by the caller in vstr. */
static NORETURN void raise_vstr(const mp_obj_type_t *exc_type, vstr_t *vstr) {
    nlr_raise(mp_obj_new_exception_arg1(exc_type, mp_obj_new_str_from_vstr(vstr)));
}

static void print_u64(const mp_print_t *print, uint64_t v) {
    mp_obj_print_helper(print, mp_obj_new_int_from_ull(v), PRINT_STR);
}

/* An integer argument in lo..hi (lo is 0 or 1), or TypeError/ValueError naming `what` and the
 * real value however large: engine.py int_arg, same rules and messages. A bool is refused. */
static uint64_t int_arg(mp_obj_t o, const char *what, uint64_t lo, uint64_t hi) {
    vstr_t vstr;
    mp_print_t print;
    if (!mp_obj_is_int(o)) {
        vstr_init_print(&vstr, 48, &print);
        mp_printf(&print, "%s must be an int, not %s", what, mp_obj_get_type_str(o));
        raise_vstr(&mp_type_TypeError, &vstr);
    }
    bool outside;
    if (mp_obj_is_small_int(o)) {
        mp_int_t v = MP_OBJ_SMALL_INT_VALUE(o);
        outside = v < 0 || (uint64_t)v < lo || (uint64_t)v > hi;
    } else { /* a big int: compare as Python does */
        outside = mp_obj_is_true(mp_binary_op(MP_BINARY_OP_LESS, o, mp_obj_new_int_from_ull(lo))) ||
                  mp_obj_is_true(mp_binary_op(MP_BINARY_OP_MORE, o, mp_obj_new_int_from_ull(hi)));
    }
    if (outside) {
        vstr_init_print(&vstr, 64, &print);
        mp_printf(&print, "%s ", what);
        mp_obj_print_helper(&print, o, PRINT_STR);
        mp_printf(&print, " is outside ");
        print_u64(&print, lo);
        mp_printf(&print, "..");
        print_u64(&print, hi);
        raise_vstr(&mp_type_ValueError, &vstr);
    }
    if (mp_obj_is_small_int(o)) {
        return (uint64_t)MP_OBJ_SMALL_INT_VALUE(o);
    }
    /* in 0..2^64-1 but not a small int: two 32-bit halves, right on 32- and 64-bit ports */
    mp_obj_t low = mp_binary_op(MP_BINARY_OP_AND, o, mp_obj_new_int_from_uint(0xFFFFFFFFu));
    mp_obj_t high = mp_binary_op(MP_BINARY_OP_RSHIFT, o, MP_OBJ_NEW_SMALL_INT(32));
    return ((uint64_t)(uint32_t)mp_obj_get_int_truncated(high) << 32) |
           (uint32_t)mp_obj_get_int_truncated(low);
}

static const char *file_kind(mp_int_t mode) {
    switch (mode & 0xF000) {
        case 0x4000: return "a directory";
        case 0x1000: return "a FIFO";
        case 0x2000: return "a character device";
        case 0x6000: return "a block device";
        case 0xC000: return "a socket";
        default: return "not a plain file";
    }
}

/* Read a model file through the VFS into port memory (PSRAM on the ESP32): only a regular file
 * (a FIFO would block in open(), a directory has no size), and only the header's file_size
 * bytes, after checking that the file holds them (engine.py read_model_file does the same). */
static void read_file(tinygpt_model_obj_t *self, mp_obj_t path, size_t *len) {
    const char *name = mp_obj_str_get_str(path);
    mp_obj_t st;
    nlr_buf_t nlr;
    if (nlr_push(&nlr) == 0) {
        st = mp_vfs_stat(path);
        nlr_pop();
    } else { /* say which file: a symlink loop (ELOOP) or a missing file, by name */
        mp_obj_t exc = MP_OBJ_FROM_PTR(nlr.ret_val);
        if (mp_obj_is_subclass_fast(MP_OBJ_FROM_PTR(mp_obj_get_type(exc)), MP_OBJ_FROM_PTR(&mp_type_OSError))) {
            mp_obj_t errno_obj = mp_load_attr(exc, MP_QSTR_errno);
            #ifdef ELOOP
            if (errno_obj == MP_OBJ_NEW_SMALL_INT(ELOOP)) { /* MicroPython has no name for it */
                vstr_t vstr;
                vstr_init(&vstr, 64);
                vstr_printf(&vstr, "%s: too many levels of symbolic links (a symlink loop)", name);
                mp_obj_t exc_args[2] = {errno_obj, mp_obj_new_str_from_vstr(&vstr)};
                nlr_raise(mp_obj_exception_make_new(&mp_type_OSError, 2, 0, exc_args));
            }
            #endif
            if (mp_obj_is_small_int(errno_obj)) {
                mp_raise_OSError_with_filename(MP_OBJ_SMALL_INT_VALUE(errno_obj), name);
            }
        }
        nlr_jump(nlr.ret_val);
    }
    size_t n_items;
    mp_obj_t *items;
    mp_obj_get_array(st, &n_items, &items);
    mp_int_t mode = mp_obj_get_int(items[0]);
    vstr_t vstr;
    mp_print_t print;
    if ((mode & 0xF000) != 0x8000) {
        vstr_init_print(&vstr, 64, &print);
        mp_printf(&print, "%s: not a regular file (%s), not a tinygpt model", name, file_kind(mode));
        raise_vstr(&mp_type_ValueError, &vstr);
    }
    mp_obj_t args[2] = {path, MP_OBJ_NEW_QSTR(MP_QSTR_rb)};
    mp_obj_t f = mp_builtin_open(2, args, (mp_map_t *)&mp_const_empty_map);
    int errcode = 0;
    mp_off_t size = mp_stream_seek(f, 0, MP_SEEK_END, &errcode);
    if (errcode == 0) {
        mp_stream_seek(f, 0, MP_SEEK_SET, &errcode);
    }
    if (errcode != 0 || size <= 0) {
        mp_stream_close(f);
        if (errcode) {
            mp_raise_OSError(errcode);
        }
        vstr_init_print(&vstr, 64, &print);
        mp_printf(&print, "%s: empty file, not a tinygpt model", name);
        raise_vstr(&mp_type_ValueError, &vstr);
    }
    /* the header, then the directory, then the whole file: tg_read_size checks each first */
    size_t have = 0, need = (uint64_t)size < TG_HEADER_SIZE ? (size_t)size : TG_HEADER_SIZE;
    tg_error err;
    while (need > have) {
        uint8_t *grown = tg_port_alloc(need);
        if (!grown) {
            mp_stream_close(f);
            release(self);
            mp_raise_msg_varg(&mp_type_MemoryError,
                              MP_ERROR_TEXT("out of memory reading the %u-byte model file"),
                              (unsigned)need);
        }
        if (self->file) {
            memcpy(grown, self->file, have);
            tg_port_free(self->file);
        }
        self->file = grown;
        mp_uint_t got = mp_stream_rw(f, grown + have, (mp_uint_t)(need - have), &errcode,
                                     MP_STREAM_RW_READ);
        if (errcode != 0 || got != need - have) {
            mp_stream_close(f);
            release(self);
            if (errcode != 0) {
                mp_raise_OSError(errcode);
            }
            mp_raise_ValueError(MP_ERROR_TEXT("short read of the model file"));
        }
        have = need;
        if (tg_read_size(grown, have, (uint64_t)size, &need, &err) != TG_OK) {
            mp_stream_close(f);
            release(self);
            raise_error(&err);
        }
    }
    mp_stream_close(f);
    *len = need;
}

static mp_obj_t tinygpt_model_make_new(const mp_obj_type_t *type, size_t n_args, size_t n_kw,
                                       const mp_obj_t *all_args) {
    enum { ARG_path, ARG_n_ctx, ARG_check_crc, ARG_max_batch, ARG_max_draft, ARG_n_threads };
    static const mp_arg_t allowed[] = {
        {MP_QSTR_path, MP_ARG_REQUIRED | MP_ARG_OBJ, {.u_obj = MP_OBJ_NULL}},
        {MP_QSTR_n_ctx, MP_ARG_OBJ, {.u_obj = mp_const_none}},
        {MP_QSTR_check_crc, MP_ARG_KW_ONLY | MP_ARG_BOOL, {.u_bool = true}},
        {MP_QSTR_max_batch, MP_ARG_KW_ONLY | MP_ARG_OBJ, {.u_obj = mp_const_none}},
        {MP_QSTR_max_draft, MP_ARG_KW_ONLY | MP_ARG_OBJ, {.u_obj = mp_const_none}},
        {MP_QSTR_n_threads, MP_ARG_KW_ONLY | MP_ARG_OBJ, {.u_obj = mp_const_none}},
    };
    mp_arg_val_t args[MP_ARRAY_SIZE(allowed)];
    mp_arg_parse_all_kw_array(n_args, n_kw, all_args, MP_ARRAY_SIZE(allowed), allowed, args);
    const char *path = mp_obj_str_get_str(args[ARG_path].u_obj);
    uint32_t n_ctx = 0, max_batch = 0, max_draft = 0, n_threads = 0; /* 0: the engine's default */
    if (args[ARG_n_ctx].u_obj != mp_const_none) {
        n_ctx = (uint32_t)int_arg(args[ARG_n_ctx].u_obj, "n_ctx", 1, 0xFFFFFFFFu);
    }
    if (args[ARG_max_batch].u_obj != mp_const_none) {
        max_batch = (uint32_t)int_arg(args[ARG_max_batch].u_obj, "max_batch", 1, 0xFFFFFFFFu);
    }
    if (args[ARG_max_draft].u_obj != mp_const_none) {
        max_draft = (uint32_t)int_arg(args[ARG_max_draft].u_obj, "max_draft", 1, 0xFFFFFFFFu);
    }
    if (args[ARG_n_threads].u_obj != mp_const_none) {
        /* matmul workers (the ESP32's second core); they run engine code only, never Python */
        n_threads = (uint32_t)int_arg(args[ARG_n_threads].u_obj, "n_threads", 1, 0xFFFFFFFFu);
    }

    tinygpt_model_obj_t *self = mp_obj_malloc_with_finaliser(tinygpt_model_obj_t, type);
    #if MODEL_LOCKS
    mp_thread_mutex_init(&self->lock);
    #endif
    self->model = NULL;
    self->file = NULL;
    self->map_handle = NULL;
    self->ids = NULL;
    self->choices = NULL;

    const uint8_t *data;
    size_t len;
    /* A flash partition with this label (zero copy), else a file read into port memory. */
    if (tg_port_map(path, &data, &len, &self->map_handle) != 0) {
        read_file(self, args[ARG_path].u_obj, &len);
        data = self->file;
    }
    tg_options opt = {.n_ctx = n_ctx, .max_batch = max_batch, .skip_crc = !args[ARG_check_crc].u_bool,
                      .max_draft = max_draft, .n_threads = n_threads}; /* others stay 0: their default */
    tg_error err;
    if (tg_load(data, len, &opt, &self->model, &err) != TG_OK) {
        release(self);
        raise_error(&err);
    }
    tg_info info;
    tg_get_info(self->model, &info);
    self->n_ctx = info.n_ctx;
    self->n_vocab = info.n_vocab;
    self->ids = tg_port_alloc(4 * (size_t)info.n_ctx);
    self->choices = tg_port_alloc(4 * (size_t)info.max_draft);
    if (!self->ids || !self->choices) {
        release(self);
        mp_raise_msg(&mp_type_MemoryError, MP_ERROR_TEXT("out of memory allocating token ids"));
    }
    tg_set_poll(self->model, poll_pending, NULL);
    return MP_OBJ_FROM_PTR(self);
}

static mp_obj_t tinygpt_model_close(mp_obj_t self_in) {
    release(MP_OBJ_TO_PTR(self_in));
    return mp_const_none;
}
LOCKED_METHOD_1(tinygpt_model_close);

static void dict_int(mp_obj_t d, qstr key, mp_int_t v) {
    mp_obj_dict_store(d, MP_OBJ_NEW_QSTR(key), mp_obj_new_int(v));
}

static mp_obj_t tinygpt_model_info(mp_obj_t self_in) {
    tinygpt_model_obj_t *self = get_open(self_in);
    tg_info h;
    tg_get_info(self->model, &h);
    mp_obj_t d = mp_obj_new_dict(30);
    dict_int(d, MP_QSTR_n_vocab, h.n_vocab);
    dict_int(d, MP_QSTR_n_positions, h.n_positions);
    dict_int(d, MP_QSTR_n_embd, h.n_embd);
    dict_int(d, MP_QSTR_n_layer, h.n_layer);
    dict_int(d, MP_QSTR_n_head, h.n_head);
    dict_int(d, MP_QSTR_n_inner, h.n_inner);
    dict_int(d, MP_QSTR_n_ctx, h.n_ctx);
    dict_int(d, MP_QSTR_max_batch, h.max_batch);
    dict_int(d, MP_QSTR_max_draft, h.max_draft);
    dict_int(d, MP_QSTR_n_threads, h.n_threads);
    dict_int(d, MP_QSTR_head_dim, h.head_dim);
    dict_int(d, MP_QSTR_eos_id, h.eos_id);
    dict_int(d, MP_QSTR_bos_id, h.bos_id);
    const uint32_t opt_ids[3] = {h.q_id, h.a_id, h.do_id};
    const qstr opt_keys[3] = {MP_QSTR_q_id, MP_QSTR_a_id, MP_QSTR_do_id};
    for (int i = 0; i < 3; i++) {
        mp_obj_dict_store(d, MP_OBJ_NEW_QSTR(opt_keys[i]),
                          opt_ids[i] == TG_NO_TOKEN ? mp_const_none : mp_obj_new_int(opt_ids[i]));
    }
    mp_obj_dict_store(d, MP_OBJ_NEW_QSTR(MP_QSTR_activation),
                      MP_OBJ_NEW_QSTR(h.activation == 2 ? MP_QSTR_silu
                                      : h.activation ? MP_QSTR_gelu : MP_QSTR_gelu_new));
    mp_obj_dict_store(d, MP_OBJ_NEW_QSTR(MP_QSTR_arch),
                      MP_OBJ_NEW_QSTR(h.arch == TG_ARCH_LLAMA ? MP_QSTR_llama : MP_QSTR_gpt2));
    dict_int(d, MP_QSTR_n_kv_head, h.n_kv_head);
    mp_obj_dict_store(d, MP_OBJ_NEW_QSTR(MP_QSTR_rope_theta), mp_obj_new_float((mp_float_t)h.rope_theta));
    mp_obj_dict_store(d, MP_OBJ_NEW_QSTR(MP_QSTR_head_tied), mp_obj_new_bool(h.head_tied));
    mp_obj_dict_store(d, MP_OBJ_NEW_QSTR(MP_QSTR_layer_norm_epsilon),
                      mp_obj_new_float((mp_float_t)h.layer_norm_epsilon));
    dict_int(d, MP_QSTR_file_bytes, (mp_int_t)h.file_bytes);
    dict_int(d, MP_QSTR_weight_bytes, (mp_int_t)h.weight_bytes);
    dict_int(d, MP_QSTR_kv_bytes, (mp_int_t)h.kv_bytes);
    dict_int(d, MP_QSTR_scratch_bytes, (mp_int_t)h.scratch_bytes);
    dict_int(d, MP_QSTR_tokenizer_bytes, h.tokenizer_bytes);
    dict_int(d, MP_QSTR_meta_bytes, h.meta_bytes);
    mp_obj_dict_store(d, MP_OBJ_NEW_QSTR(MP_QSTR_mapped), mp_obj_new_bool(self->map_handle != NULL));
    return d;
}
LOCKED_METHOD_1(tinygpt_model_info);

static mp_obj_t tinygpt_model_reset(mp_obj_t self_in) {
    tg_reset(get_open(self_in)->model);
    return mp_const_none;
}
LOCKED_METHOD_1(tinygpt_model_reset);

/* An engine call's result: a Ctrl-C that stopped it is raised as KeyboardInterrupt. */
static void raise_if_failed(int rc, const tg_error *err) {
    if (rc == TG_E_INTERRUPTED) {
        mp_handle_pending(true); /* raises the pending KeyboardInterrupt */
        if (kbd_pending()) {     /* a deferred Ctrl-C (see kbd_defer) */
            nlr_raise(MP_OBJ_FROM_PTR(&MP_STATE_VM(mp_kbd_exception)));
        }
    }
    if (rc != TG_OK) {
        raise_error(err);
    }
}

static void run_checked(tinygpt_model_obj_t *self, uint32_t n) {
    tg_error err;
    int rc = tg_prefill(self->model, self->ids, n, &err);
    raise_if_failed(rc, &err);
}

/* A token id: engine.py token_id, same rules and messages (a bool is refused). */
static int32_t id_from_obj(tinygpt_model_obj_t *self, mp_obj_t o, size_t index) {
    vstr_t vstr;
    mp_print_t print;
    if (!mp_obj_is_int(o)) {
        vstr_init_print(&vstr, 48, &print);
        mp_printf(&print, "token id at index %u must be an int, not %s", (unsigned)index,
                  mp_obj_get_type_str(o));
        raise_vstr(&mp_type_TypeError, &vstr);
    }
    if (!mp_obj_is_small_int(o) || MP_OBJ_SMALL_INT_VALUE(o) < 0 ||
        (mp_uint_t)MP_OBJ_SMALL_INT_VALUE(o) >= self->n_vocab) {
        vstr_init_print(&vstr, 48, &print);
        mp_printf(&print, "token id ");
        mp_obj_print_helper(&print, o, PRINT_STR); /* the real value, however large */
        mp_printf(&print, " is outside 0..%u", (unsigned)(self->n_vocab - 1));
        raise_vstr(&mp_type_ValueError, &vstr);
    }
    return (int32_t)MP_OBJ_SMALL_INT_VALUE(o);
}

/* Checked before any id is converted; the engine's wording (tg_prefill checks again). */
static void check_room(tinygpt_model_obj_t *self, size_t n) {
    uint32_t used = tg_pos(self->model);
    if (n > self->n_ctx - used) {
        mp_raise_msg_varg(&mp_type_RuntimeError,
                          MP_ERROR_TEXT("%u tokens do not fit: %u of the context's %u positions are used"),
                          (unsigned)n, (unsigned)used, (unsigned)self->n_ctx);
    }
}

static mp_obj_t tinygpt_model_prefill(mp_obj_t self_in, mp_obj_t ids_in) {
    tinygpt_model_obj_t *self = get_open(self_in);
    size_t n;
    mp_buffer_info_t buf;
    if (mp_get_buffer(ids_in, &buf, MP_BUFFER_READ) && !mp_obj_is_str_or_bytes(ids_in)) {
        /* array('i'/'h'/'H'/'I'/'b'/'B') of ids: read in place */
        size_t item = mp_binary_get_size('@', buf.typecode, NULL);
        n = buf.len / item;
        check_room(self, n);
        for (size_t i = 0; i < n; i++) {
            self->ids[i] = id_from_obj(self, mp_binary_get_val_array(buf.typecode, buf.buf, i), i);
        }
    } else {
        size_t len;
        mp_obj_t *items;
        if (!mp_obj_is_type(ids_in, &mp_type_list) && !mp_obj_is_type(ids_in, &mp_type_tuple)) {
            mp_raise_TypeError(MP_ERROR_TEXT("prefill takes a list, tuple or array of token ids"));
        }
        mp_obj_get_array(ids_in, &len, &items);
        n = len;
        check_room(self, n);
        for (size_t i = 0; i < n; i++) {
            self->ids[i] = id_from_obj(self, items[i], i);
        }
    }
    run_checked(self, (uint32_t)n);
    return mp_const_none;
}
LOCKED_METHOD_2(tinygpt_model_prefill);

static mp_obj_t tinygpt_model_step(mp_obj_t self_in, mp_obj_t id_in) {
    tinygpt_model_obj_t *self = get_open(self_in);
    check_room(self, 1);
    self->ids[0] = id_from_obj(self, id_in, 0);
    run_checked(self, 1);
    return mp_const_none;
}
LOCKED_METHOD_2(tinygpt_model_step);

/* A memoryview of float32 over a copy of the logits in the GC heap: it keeps its memory alive
 * after the next step, close() or the collection of the Model. */
static mp_obj_t tinygpt_model_logits(mp_obj_t self_in) {
    tinygpt_model_obj_t *self = get_open(self_in);
    const float *lg = tg_logits(self->model);
    if (!lg) {
        mp_raise_msg(&mp_type_RuntimeError, MP_ERROR_TEXT("no logits yet: prefill or step first"));
    }
    float *copy = m_new(float, self->n_vocab);
    memcpy(copy, lg, 4 * (size_t)self->n_vocab);
    return mp_obj_new_memoryview('f', self->n_vocab, copy);
}
LOCKED_METHOD_1(tinygpt_model_logits);

static mp_obj_t tinygpt_model_sample(size_t n_args, const mp_obj_t *pos_args, mp_map_t *kw_args) {
    enum { ARG_temperature, ARG_top_k, ARG_top_p, ARG_repetition_penalty, ARG_seed, ARG_at, ARG_draft };
    static const mp_arg_t allowed[] = {
        {MP_QSTR_temperature, MP_ARG_OBJ, {.u_obj = MP_OBJ_NULL}},
        {MP_QSTR_top_k, MP_ARG_OBJ, {.u_obj = MP_OBJ_NEW_SMALL_INT(0)}},
        {MP_QSTR_top_p, MP_ARG_OBJ, {.u_obj = MP_OBJ_NULL}},
        {MP_QSTR_repetition_penalty, MP_ARG_OBJ, {.u_obj = MP_OBJ_NULL}},
        {MP_QSTR_seed, MP_ARG_OBJ, {.u_obj = mp_const_none}},
        {MP_QSTR_at, MP_ARG_KW_ONLY | MP_ARG_OBJ, {.u_obj = mp_const_none}},
        {MP_QSTR_draft, MP_ARG_KW_ONLY | MP_ARG_OBJ, {.u_obj = mp_const_none}},
    };
    tinygpt_model_obj_t *self = get_open(pos_args[0]);
    mp_arg_val_t args[MP_ARRAY_SIZE(allowed)];
    mp_arg_parse_all(n_args - 1, pos_args + 1, kw_args, MP_ARRAY_SIZE(allowed), allowed, args);
    tg_sampler s;
    s.top_k = (uint32_t)int_arg(args[ARG_top_k].u_obj, "top_k", 0, 0xFFFFFFFFu);
    s.temperature = args[ARG_temperature].u_obj ? (float)mp_obj_get_float(args[ARG_temperature].u_obj) : 0.0f;
    s.top_p = args[ARG_top_p].u_obj ? (float)mp_obj_get_float(args[ARG_top_p].u_obj) : 1.0f;
    s.repetition_penalty = args[ARG_repetition_penalty].u_obj
        ? (float)mp_obj_get_float(args[ARG_repetition_penalty].u_obj) : 1.0f;
    if (args[ARG_seed].u_obj != mp_const_none) {
        tg_seed(self->model, int_arg(args[ARG_seed].u_obj, "seed", 0, UINT64_MAX));
    }
    /* at: the token after that position (its logits kept); draft: engine.py sample() */
    mp_obj_t at_obj = args[ARG_at].u_obj, draft_obj = args[ARG_draft].u_obj;
    uint32_t at = 0;
    if (at_obj != mp_const_none) {
        at = (uint32_t)int_arg(at_obj, "at", 0, 0xFFFFFFFFu);
    }
    int32_t draft = draft_obj == mp_const_none ? -1 : id_from_obj(self, draft_obj, 0);
    int32_t id;
    tg_error err;
    int rc;
    if (at_obj == mp_const_none && draft < 0) {
        rc = tg_sample(self->model, &s, &id, &err);
    } else {
        uint32_t pos = tg_pos(self->model);
        rc = tg_sample_at(self->model, &s, at_obj != mp_const_none ? at : pos ? pos - 1 : 0xFFFFFFFFu,
                          draft, &id, &err);
    }
    if (rc != TG_OK) {
        raise_error(&err);
    }
    return MP_OBJ_NEW_SMALL_INT(id);
}
LOCKED_METHOD_KW(tinygpt_model_sample, 1);

/* verify(ids, repetition_penalty=1.0): engine.py Model.verify, same checks and messages. */
static mp_obj_t tinygpt_model_verify(size_t n_args, const mp_obj_t *pos_args, mp_map_t *kw_args) {
    enum { ARG_ids, ARG_repetition_penalty };
    static const mp_arg_t allowed[] = {
        {MP_QSTR_ids, MP_ARG_REQUIRED | MP_ARG_OBJ, {.u_obj = MP_OBJ_NULL}},
        {MP_QSTR_repetition_penalty, MP_ARG_OBJ, {.u_obj = MP_OBJ_NULL}},
    };
    tinygpt_model_obj_t *self = get_open(pos_args[0]);
    mp_arg_val_t args[MP_ARRAY_SIZE(allowed)];
    mp_arg_parse_all(n_args - 1, pos_args + 1, kw_args, MP_ARRAY_SIZE(allowed), allowed, args);
    mp_obj_t ids_in = args[ARG_ids].u_obj;
    if (!mp_obj_is_type(ids_in, &mp_type_list) && !mp_obj_is_type(ids_in, &mp_type_tuple)) {
        mp_raise_msg_varg(&mp_type_TypeError, MP_ERROR_TEXT("verify takes a list or tuple of token ids, got %s"),
                          mp_obj_get_type_str(ids_in));
    }
    size_t n;
    mp_obj_t *items;
    mp_obj_get_array(ids_in, &n, &items);
    tg_info h;
    tg_get_info(self->model, &h);
    if (n > h.max_draft) {
        mp_raise_msg_varg(&mp_type_ValueError, MP_ERROR_TEXT("verify takes at most max_draft = %u tokens, got %u"),
                          (unsigned)h.max_draft, (unsigned)n);
    }
    for (size_t i = 0; i < n; i++) {
        self->ids[i] = id_from_obj(self, items[i], i);
    }
    float penalty = args[ARG_repetition_penalty].u_obj
        ? (float)mp_obj_get_float(args[ARG_repetition_penalty].u_obj) : 1.0f;
    tg_error err;
    raise_if_failed(tg_verify(self->model, self->ids, (uint32_t)n, penalty, self->choices, &err), &err);
    mp_obj_t out = mp_obj_new_list(n, NULL);
    for (size_t i = 0; i < n; i++) {
        mp_obj_list_store(out, MP_OBJ_NEW_SMALL_INT(i), MP_OBJ_NEW_SMALL_INT(self->choices[i]));
    }
    return out;
}
LOCKED_METHOD_KW(tinygpt_model_verify, 2);

static mp_obj_t tinygpt_model_rewind(mp_obj_t self_in, mp_obj_t pos_in) {
    tinygpt_model_obj_t *self = get_open(self_in);
    uint32_t pos = (uint32_t)int_arg(pos_in, "pos", 0, 0xFFFFFFFFu);
    tg_error err;
    if (tg_rewind(self->model, pos, &err) != TG_OK) {
        raise_error(&err);
    }
    return mp_const_none;
}
LOCKED_METHOD_2(tinygpt_model_rewind);

/* counters(): the engine's forward-pass counts, a dict (engine.py Model.counters). */
static mp_obj_t tinygpt_model_counters(mp_obj_t self_in) {
    tg_counters c;
    tg_get_counters(get_open(self_in)->model, &c);
    mp_obj_t d = mp_obj_new_dict(4);
    const uint64_t values[4] = {c.passes, c.tokens, c.weight_bytes, c.macs};
    const qstr keys[4] = {MP_QSTR_passes, MP_QSTR_tokens, MP_QSTR_weight_bytes, MP_QSTR_macs};
    for (int i = 0; i < 4; i++) {
        mp_obj_dict_store(d, MP_OBJ_NEW_QSTR(keys[i]), mp_obj_new_int_from_ull(values[i]));
    }
    return d;
}
LOCKED_METHOD_1(tinygpt_model_counters);

static mp_obj_t tinygpt_model_reset_counters(mp_obj_t self_in) {
    tg_reset_counters(get_open(self_in)->model);
    return mp_const_none;
}
LOCKED_METHOD_1(tinygpt_model_reset_counters);

/* bytes, a copy: on the ESP32 the section may be in a flash mapping that close() unmaps. */
static mp_obj_t tinygpt_model_tokenizer_blob(mp_obj_t self_in) {
    tinygpt_model_obj_t *self = get_open(self_in);
    uint32_t n;
    const uint8_t *p = tg_tokenizer(self->model, &n);
    return mp_obj_new_bytes(p, n);
}
LOCKED_METHOD_1(tinygpt_model_tokenizer_blob);

/* The meta section's text (bytes, a copy; b"" for a version 1 file): chat.py reads the abstain
 * answer from it. */
static mp_obj_t tinygpt_model_meta(mp_obj_t self_in) {
    tinygpt_model_obj_t *self = get_open(self_in);
    uint32_t n;
    const uint8_t *p = tg_meta(self->model, &n);
    return mp_obj_new_bytes(p ? p : (const uint8_t *)"", n);
}
LOCKED_METHOD_1(tinygpt_model_meta);

static mp_obj_t tinygpt_model_pos_call(mp_obj_t self_in, size_t n, const mp_obj_t *args, mp_map_t *kw) {
    (void)n;
    (void)args;
    (void)kw;
    return mp_obj_new_int(tg_pos(get_open(self_in)->model));
}

/* `pos` as a read-only attribute; everything else from the locals dict. */
static void tinygpt_model_attr(mp_obj_t self_in, qstr attr, mp_obj_t *dest) {
    if (attr == MP_QSTR_pos && dest[0] == MP_OBJ_NULL) {
        dest[0] = run_locked(tinygpt_model_pos_call, self_in, 0, NULL, NULL);
        return;
    }
    dest[1] = MP_OBJ_SENTINEL;
}

static const mp_rom_map_elem_t tinygpt_model_locals_table[] = {
    {MP_ROM_QSTR(MP_QSTR___del__), MP_ROM_PTR(&tinygpt_model_close_obj)},
    {MP_ROM_QSTR(MP_QSTR_close), MP_ROM_PTR(&tinygpt_model_close_obj)},
    {MP_ROM_QSTR(MP_QSTR_info), MP_ROM_PTR(&tinygpt_model_info_obj)},
    {MP_ROM_QSTR(MP_QSTR_reset), MP_ROM_PTR(&tinygpt_model_reset_obj)},
    {MP_ROM_QSTR(MP_QSTR_prefill), MP_ROM_PTR(&tinygpt_model_prefill_obj)},
    {MP_ROM_QSTR(MP_QSTR_step), MP_ROM_PTR(&tinygpt_model_step_obj)},
    {MP_ROM_QSTR(MP_QSTR_logits), MP_ROM_PTR(&tinygpt_model_logits_obj)},
    {MP_ROM_QSTR(MP_QSTR_sample), MP_ROM_PTR(&tinygpt_model_sample_obj)},
    {MP_ROM_QSTR(MP_QSTR_verify), MP_ROM_PTR(&tinygpt_model_verify_obj)},
    {MP_ROM_QSTR(MP_QSTR_rewind), MP_ROM_PTR(&tinygpt_model_rewind_obj)},
    {MP_ROM_QSTR(MP_QSTR_counters), MP_ROM_PTR(&tinygpt_model_counters_obj)},
    {MP_ROM_QSTR(MP_QSTR_reset_counters), MP_ROM_PTR(&tinygpt_model_reset_counters_obj)},
    {MP_ROM_QSTR(MP_QSTR_tokenizer_blob), MP_ROM_PTR(&tinygpt_model_tokenizer_blob_obj)},
    {MP_ROM_QSTR(MP_QSTR_meta), MP_ROM_PTR(&tinygpt_model_meta_obj)},
};
static MP_DEFINE_CONST_DICT(tinygpt_model_locals, tinygpt_model_locals_table);

MP_DEFINE_CONST_OBJ_TYPE(
    tinygpt_type_Model,
    MP_QSTR_Model,
    MP_TYPE_FLAG_NONE,
    make_new, tinygpt_model_make_new,
    attr, tinygpt_model_attr,
    locals_dict, &tinygpt_model_locals
    );

static const mp_rom_map_elem_t tinygpt_module_globals_table[] = {
    {MP_ROM_QSTR(MP_QSTR___name__), MP_ROM_QSTR(MP_QSTR_tinygpt)},
    {MP_ROM_QSTR(MP_QSTR_Model), MP_ROM_PTR(&tinygpt_type_Model)},
    {MP_ROM_QSTR(MP_QSTR_FORMAT_VERSION), MP_ROM_INT(TG_FORMAT_VERSION)},
};
static MP_DEFINE_CONST_DICT(tinygpt_module_globals, tinygpt_module_globals_table);

const mp_obj_module_t tinygpt_user_cmodule = {
    .base = {&mp_type_module},
    .globals = (mp_obj_dict_t *)&tinygpt_module_globals,
};

MP_REGISTER_MODULE(MP_QSTR_tinygpt, tinygpt_user_cmodule);
