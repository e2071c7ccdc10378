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
 */
#include <string.h>

#include "py/binary.h"
#include "py/builtin.h"
#include "py/mperrno.h"
#include "py/obj.h"
#include "py/objstr.h"
#include "py/runtime.h"
#include "py/stream.h"

#include "tg_port.h"
#include "tinygpt.h"

typedef struct _tinygpt_model_obj_t {
    mp_obj_base_t base;
    tg_model *model;
    uint8_t *file;     /* the model bytes, when read from a file into port memory */
    void *map_handle;  /* the model bytes, when memory-mapped by the port (flash partition) */
    int32_t *ids;      /* [n_ctx] scratch for prefill ids */
    uint32_t n_ctx, n_vocab;
} tinygpt_model_obj_t;

static void release(tinygpt_model_obj_t *self) {
    if (self->model) {
        tg_free(self->model);
        self->model = NULL;
    }
    tg_port_free(self->ids);
    self->ids = NULL;
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

/* Called by the engine between layers: a pending Ctrl-C stops the step cleanly (the engine
 * leaves the context as it was) and is raised once the engine has returned. */
static int poll_pending(void *ctx) {
    (void)ctx;
    return MP_STATE_THREAD(mp_pending_exception) != MP_OBJ_NULL;
}

/* Read a whole file through the VFS into port memory (PSRAM on the ESP32). */
static void read_file(tinygpt_model_obj_t *self, mp_obj_t path, size_t *len) {
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
        mp_raise_ValueError(MP_ERROR_TEXT("empty file, not a tinygpt model"));
    }
    self->file = tg_port_alloc((size_t)size);
    if (!self->file) {
        mp_stream_close(f);
        mp_raise_msg_varg(&mp_type_MemoryError,
                          MP_ERROR_TEXT("out of memory reading the %u-byte model file"),
                          (unsigned)size);
    }
    mp_uint_t got = mp_stream_rw(f, self->file, (mp_uint_t)size, &errcode, MP_STREAM_RW_READ);
    mp_stream_close(f);
    if (errcode != 0 || got != (mp_uint_t)size) {
        tg_port_free(self->file);
        self->file = NULL;
        if (errcode != 0) {
            mp_raise_OSError(errcode);
        }
        mp_raise_ValueError(MP_ERROR_TEXT("short read of the model file"));
    }
    *len = (size_t)size;
}

static mp_obj_t tinygpt_model_make_new(const mp_obj_type_t *type, size_t n_args, size_t n_kw,
                                       const mp_obj_t *all_args) {
    enum { ARG_path, ARG_n_ctx, ARG_check_crc, ARG_max_batch };
    static const mp_arg_t allowed[] = {
        {MP_QSTR_path, MP_ARG_REQUIRED | MP_ARG_OBJ, {.u_obj = MP_OBJ_NULL}},
        {MP_QSTR_n_ctx, MP_ARG_OBJ, {.u_obj = mp_const_none}},
        {MP_QSTR_check_crc, MP_ARG_KW_ONLY | MP_ARG_BOOL, {.u_bool = true}},
        {MP_QSTR_max_batch, MP_ARG_KW_ONLY | MP_ARG_INT, {.u_int = 0}},
    };
    mp_arg_val_t args[MP_ARRAY_SIZE(allowed)];
    mp_arg_parse_all_kw_array(n_args, n_kw, all_args, MP_ARRAY_SIZE(allowed), allowed, args);
    const char *path = mp_obj_str_get_str(args[ARG_path].u_obj);
    mp_int_t n_ctx = 0;
    if (args[ARG_n_ctx].u_obj != mp_const_none) {
        n_ctx = mp_obj_get_int(args[ARG_n_ctx].u_obj);
        if (n_ctx < 1) {
            mp_raise_ValueError(MP_ERROR_TEXT("n_ctx must be a positive int"));
        }
    }
    if (args[ARG_max_batch].u_int < 0) {
        mp_raise_ValueError(MP_ERROR_TEXT("max_batch must be >= 0"));
    }

    tinygpt_model_obj_t *self = mp_obj_malloc_with_finaliser(tinygpt_model_obj_t, type);
    self->model = NULL;
    self->file = NULL;
    self->map_handle = NULL;
    self->ids = NULL;

    const uint8_t *data;
    size_t len;
    /* A flash partition with this label (zero copy), else a file read into port memory. */
    if (tg_port_map(path, &data, &len, &self->map_handle) != 0) {
        read_file(self, args[ARG_path].u_obj, &len);
        data = self->file;
    }
    tg_options opt = {(uint32_t)n_ctx, (uint32_t)args[ARG_max_batch].u_int,
                      !args[ARG_check_crc].u_bool};
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
    if (!self->ids) {
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
static MP_DEFINE_CONST_FUN_OBJ_1(tinygpt_model_close_obj, tinygpt_model_close);

static void dict_int(mp_obj_t d, qstr key, mp_int_t v) {
    mp_obj_dict_store(d, MP_OBJ_NEW_QSTR(key), mp_obj_new_int(v));
}

static mp_obj_t tinygpt_model_info(mp_obj_t self_in) {
    tinygpt_model_obj_t *self = get_open(self_in);
    tg_info h;
    tg_get_info(self->model, &h);
    mp_obj_t d = mp_obj_new_dict(24);
    dict_int(d, MP_QSTR_n_vocab, h.n_vocab);
    dict_int(d, MP_QSTR_n_positions, h.n_positions);
    dict_int(d, MP_QSTR_n_embd, h.n_embd);
    dict_int(d, MP_QSTR_n_layer, h.n_layer);
    dict_int(d, MP_QSTR_n_head, h.n_head);
    dict_int(d, MP_QSTR_n_inner, h.n_inner);
    dict_int(d, MP_QSTR_n_ctx, h.n_ctx);
    dict_int(d, MP_QSTR_max_batch, h.max_batch);
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
                      MP_OBJ_NEW_QSTR(h.activation ? MP_QSTR_gelu : MP_QSTR_gelu_new));
    mp_obj_dict_store(d, MP_OBJ_NEW_QSTR(MP_QSTR_layer_norm_epsilon),
                      mp_obj_new_float((mp_float_t)h.layer_norm_epsilon));
    dict_int(d, MP_QSTR_file_bytes, (mp_int_t)h.file_bytes);
    dict_int(d, MP_QSTR_weight_bytes, (mp_int_t)h.weight_bytes);
    dict_int(d, MP_QSTR_kv_bytes, (mp_int_t)h.kv_bytes);
    dict_int(d, MP_QSTR_scratch_bytes, (mp_int_t)h.scratch_bytes);
    dict_int(d, MP_QSTR_tokenizer_bytes, h.tokenizer_bytes);
    mp_obj_dict_store(d, MP_OBJ_NEW_QSTR(MP_QSTR_mapped), mp_obj_new_bool(self->map_handle != NULL));
    return d;
}
static MP_DEFINE_CONST_FUN_OBJ_1(tinygpt_model_info_obj, tinygpt_model_info);

static mp_obj_t tinygpt_model_reset(mp_obj_t self_in) {
    tg_reset(get_open(self_in)->model);
    return mp_const_none;
}
static MP_DEFINE_CONST_FUN_OBJ_1(tinygpt_model_reset_obj, tinygpt_model_reset);

static void run_checked(tinygpt_model_obj_t *self, uint32_t n) {
    tg_error err;
    int rc = tg_prefill(self->model, self->ids, n, &err);
    if (rc == TG_E_INTERRUPTED) {
        mp_handle_pending(true); /* raises the pending KeyboardInterrupt */
    }
    if (rc != TG_OK) {
        raise_error(&err);
    }
}

static int32_t id_from_obj(tinygpt_model_obj_t *self, mp_obj_t o, size_t index) {
    if (!mp_obj_is_int(o)) {
        mp_raise_msg_varg(&mp_type_TypeError, MP_ERROR_TEXT("token id at index %u is not an int"),
                          (unsigned)index);
    }
    mp_int_t v = mp_obj_get_int(o);
    if (v < 0 || (mp_uint_t)v >= self->n_vocab) {
        mp_raise_msg_varg(&mp_type_ValueError, MP_ERROR_TEXT("token id %d is outside 0..%u"),
                          (int)v, (unsigned)(self->n_vocab - 1));
    }
    return (int32_t)v;
}

static mp_obj_t tinygpt_model_prefill(mp_obj_t self_in, mp_obj_t ids_in) {
    tinygpt_model_obj_t *self = get_open(self_in);
    size_t n;
    mp_buffer_info_t buf;
    if (mp_get_buffer(ids_in, &buf, MP_BUFFER_READ) && !mp_obj_is_str_or_bytes(ids_in)) {
        /* array('i'/'h'/'H'/'I'/'b'/'B') of ids: read in place */
        size_t item = mp_binary_get_size('@', buf.typecode, NULL);
        n = buf.len / item;
        if (n > self->n_ctx) {
            mp_raise_msg_varg(&mp_type_RuntimeError,
                              MP_ERROR_TEXT("%u tokens do not fit in the %u-token context"),
                              (unsigned)n, (unsigned)self->n_ctx);
        }
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
        if (n > self->n_ctx) {
            mp_raise_msg_varg(&mp_type_RuntimeError,
                              MP_ERROR_TEXT("%u tokens do not fit in the %u-token context"),
                              (unsigned)n, (unsigned)self->n_ctx);
        }
        for (size_t i = 0; i < n; i++) {
            self->ids[i] = id_from_obj(self, items[i], i);
        }
    }
    run_checked(self, (uint32_t)n);
    return mp_const_none;
}
static MP_DEFINE_CONST_FUN_OBJ_2(tinygpt_model_prefill_obj, tinygpt_model_prefill);

static mp_obj_t tinygpt_model_step(mp_obj_t self_in, mp_obj_t id_in) {
    tinygpt_model_obj_t *self = get_open(self_in);
    self->ids[0] = id_from_obj(self, id_in, 0);
    run_checked(self, 1);
    return mp_const_none;
}
static MP_DEFINE_CONST_FUN_OBJ_2(tinygpt_model_step_obj, tinygpt_model_step);

/* A memoryview of float32 over the engine's logits: no copy; valid until the next
 * step/prefill/close. */
static mp_obj_t tinygpt_model_logits(mp_obj_t self_in) {
    tinygpt_model_obj_t *self = get_open(self_in);
    const float *lg = tg_logits(self->model);
    if (!lg) {
        mp_raise_msg(&mp_type_RuntimeError, MP_ERROR_TEXT("no logits yet: prefill or step first"));
    }
    return mp_obj_new_memoryview('f', self->n_vocab, (void *)lg);
}
static MP_DEFINE_CONST_FUN_OBJ_1(tinygpt_model_logits_obj, tinygpt_model_logits);

static mp_obj_t tinygpt_model_sample(size_t n_args, const mp_obj_t *pos_args, mp_map_t *kw_args) {
    enum { ARG_temperature, ARG_top_k, ARG_top_p, ARG_repetition_penalty, ARG_seed };
    static const mp_arg_t allowed[] = {
        {MP_QSTR_temperature, MP_ARG_OBJ, {.u_obj = MP_OBJ_NULL}},
        {MP_QSTR_top_k, MP_ARG_INT, {.u_int = 0}},
        {MP_QSTR_top_p, MP_ARG_OBJ, {.u_obj = MP_OBJ_NULL}},
        {MP_QSTR_repetition_penalty, MP_ARG_OBJ, {.u_obj = MP_OBJ_NULL}},
        {MP_QSTR_seed, MP_ARG_OBJ, {.u_obj = mp_const_none}},
    };
    tinygpt_model_obj_t *self = get_open(pos_args[0]);
    mp_arg_val_t args[MP_ARRAY_SIZE(allowed)];
    mp_arg_parse_all(n_args - 1, pos_args + 1, kw_args, MP_ARRAY_SIZE(allowed), allowed, args);
    if (args[ARG_top_k].u_int < 0) {
        mp_raise_ValueError(MP_ERROR_TEXT("top_k must be >= 0"));
    }
    tg_sampler s;
    s.temperature = args[ARG_temperature].u_obj ? (float)mp_obj_get_float(args[ARG_temperature].u_obj) : 0.0f;
    s.top_k = (uint32_t)args[ARG_top_k].u_int;
    s.top_p = args[ARG_top_p].u_obj ? (float)mp_obj_get_float(args[ARG_top_p].u_obj) : 1.0f;
    s.repetition_penalty = args[ARG_repetition_penalty].u_obj
        ? (float)mp_obj_get_float(args[ARG_repetition_penalty].u_obj) : 1.0f;
    if (args[ARG_seed].u_obj != mp_const_none) {
        tg_seed(self->model, (uint64_t)mp_obj_get_int_truncated(args[ARG_seed].u_obj));
    }
    int32_t id;
    tg_error err;
    if (tg_sample(self->model, &s, &id, &err) != TG_OK) {
        raise_error(&err);
    }
    return MP_OBJ_NEW_SMALL_INT(id);
}
static MP_DEFINE_CONST_FUN_OBJ_KW(tinygpt_model_sample_obj, 1, tinygpt_model_sample);

static mp_obj_t tinygpt_model_tokenizer_blob(mp_obj_t self_in) {
    tinygpt_model_obj_t *self = get_open(self_in);
    uint32_t n;
    const uint8_t *p = tg_tokenizer(self->model, &n);
    return mp_obj_new_memoryview('B', n, (void *)p);
}
static MP_DEFINE_CONST_FUN_OBJ_1(tinygpt_model_tokenizer_blob_obj, tinygpt_model_tokenizer_blob);

/* `pos` as a read-only attribute; everything else from the locals dict. */
static void tinygpt_model_attr(mp_obj_t self_in, qstr attr, mp_obj_t *dest) {
    if (attr == MP_QSTR_pos && dest[0] == MP_OBJ_NULL) {
        dest[0] = mp_obj_new_int(tg_pos(get_open(self_in)->model));
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
    {MP_ROM_QSTR(MP_QSTR_tokenizer_blob), MP_ROM_PTR(&tinygpt_model_tokenizer_blob_obj)},
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
