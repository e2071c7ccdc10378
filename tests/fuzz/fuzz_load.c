/*
 * libFuzzer target: the model loader, and the forward pass and sampler on whatever it accepts.
 *
 * The input is a model file. It is copied into a 16-byte aligned buffer whose bytes past the
 * input are poisoned, then loaded with the CRC check off (so mutations reach the directory,
 * value and tokenizer checks) and on. If it loads: a prefill of up to 3 tokens, a step, a
 * greedy and a top-k/top-p sample with repetition penalty, error paths (bad id, full context),
 * and tg_free. Built with -fsanitize=fuzzer,address,undefined (tests/test_fuzz.py): any memory
 * error, leak, undefined behaviour or broken invariant (FUZZ_CHECK) is a crash.
 */
#include "fuzz_common.h"
#include "tinygpt.h"

static void exercise(tg_model *m, const uint8_t *data, size_t size) {
    tg_info info;
    tg_error err;
    tg_get_info(m, &info);
    FUZZ_CHECK(info.n_ctx >= 1 && info.n_ctx <= info.n_positions, "n_ctx %u", (unsigned)info.n_ctx);
    FUZZ_CHECK(info.head_dim * info.n_head == info.n_embd, "head_dim %u", (unsigned)info.head_dim);
    FUZZ_CHECK(info.max_batch >= 1 && info.max_batch <= info.n_ctx, "max_batch %u", (unsigned)info.max_batch);
    FUZZ_CHECK(tg_logits(m) == NULL, "logits before any token");

    uint32_t tlen = 0;
    const uint8_t *tok = tg_tokenizer(m, &tlen);
    FUZZ_CHECK(tok != NULL && tok >= data && tok + tlen <= data + size, "tokenizer outside the file");
    FUZZ_CHECK(tg_check_tokenizer(tok, tlen, info.n_vocab, &err) == TG_OK, "tokenizer: %s", err.msg);

    int32_t id;
    tg_sampler greedy = {0.0f, 0, 1.0f, 1.0f};
    FUZZ_CHECK(tg_sample(m, &greedy, &id, &err) == TG_E_NO_LOGITS, "sample before logits");

    /* ids from the input's last bytes, so the fuzzer can steer them */
    int32_t ids[3];
    uint32_t n = info.n_ctx < 3 ? info.n_ctx : 3;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t b = size > i ? data[size - 1 - i] : 0;
        ids[i] = (int32_t)((b * 131u + i) % info.n_vocab);
    }
    int32_t bad = (int32_t)info.n_vocab;
    FUZZ_CHECK(tg_prefill(m, &bad, 1, &err) == TG_E_TOKEN, "id n_vocab accepted");
    FUZZ_CHECK(tg_pos(m) == 0, "failed prefill moved pos");
    FUZZ_CHECK(tg_prefill(m, ids, n, &err) == TG_OK, "prefill: %s", err.msg);
    FUZZ_CHECK(tg_pos(m) == n && tg_logits(m) != NULL, "after prefill");
    FUZZ_CHECK(tg_sample(m, &greedy, &id, &err) == TG_OK, "greedy: %s", err.msg);
    FUZZ_CHECK(id >= 0 && (uint32_t)id < info.n_vocab, "greedy id %d", (int)id);
    if (tg_pos(m) < info.n_ctx) {
        FUZZ_CHECK(tg_step(m, id, &err) == TG_OK, "step: %s", err.msg);
    } else {
        FUZZ_CHECK(tg_step(m, id, &err) == TG_E_CONTEXT, "step past n_ctx");
    }
    tg_sampler s = {0.7f, 5, 0.9f, 1.3f};
    tg_seed(m, size);
    for (int k = 0; k < 2; k++) {
        FUZZ_CHECK(tg_sample(m, &s, &id, &err) == TG_OK, "sample: %s", err.msg);
        FUZZ_CHECK(id >= 0 && (uint32_t)id < info.n_vocab, "sampled id %d", (int)id);
        s.top_k = 0;
        s.top_p = 1.0f;
        s.temperature = 1.5f;
    }
    tg_reset(m);
    FUZZ_CHECK(tg_pos(m) == 0 && tg_logits(m) == NULL, "after reset");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    size_t alloc;
    uint8_t *buf = fuzz_aligned_copy(data, size, &alloc);
    for (int skip_crc = 1; skip_crc >= 0; skip_crc--) {
        tg_options opt = {.skip_crc = skip_crc};
        tg_model *m = (tg_model *)(uintptr_t)1; /* must be set to NULL on failure */
        tg_error err;
        int rc = tg_load(buf, size, &opt, &m, &err);
        FUZZ_CHECK(rc == err.code, "rc %d, err.code %d", rc, err.code);
        if (rc != TG_OK) {
            FUZZ_CHECK(m == NULL, "failed load returned a model");
            FUZZ_CHECK(err.msg[0] != 0 && memchr(err.msg, 0, sizeof(err.msg)) != NULL, "no message");
            continue;
        }
        FUZZ_CHECK(m != NULL && err.msg[0] == 0, "load ok without model");
        exercise(m, buf, size);
        tg_free(m);
    }
    fuzz_free_copy(buf, alloc);
    return 0;
}
