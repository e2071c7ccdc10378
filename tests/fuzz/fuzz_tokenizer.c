/*
 * libFuzzer target: tg_check_tokenizer, the tokenizer section validator (spec section 6).
 *
 * Input: a u32 (little-endian) n_vocab, then the section. The section is checked against that
 * n_vocab and also against the n_vocab the section itself claims (bytes 8..11), so mutations get
 * past the "tokenizer has N tokens but the model has M" check without the fuzzer having to keep
 * two fields equal. The section lies in a 16-byte aligned buffer with its tail poisoned.
 */
#include "fuzz_common.h"
#include "tinygpt.h"

static void check(const uint8_t *sec, size_t len, uint32_t n_vocab) {
    tg_error err;
    int rc = tg_check_tokenizer(sec, (uint32_t)len, n_vocab, &err);
    FUZZ_CHECK(rc == TG_OK || rc == TG_E_TOKENIZER, "rc %d", rc);
    FUZZ_CHECK(rc == err.code, "rc %d, err.code %d", rc, err.code);
    FUZZ_CHECK((rc == TG_OK) == (err.msg[0] == 0), "message");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 4 || size - 4 > UINT32_MAX) {
        return 0;
    }
    uint32_t n_vocab = (uint32_t)data[0] | (uint32_t)data[1] << 8 | (uint32_t)data[2] << 16 |
                       (uint32_t)data[3] << 24;
    size_t alloc, len = size - 4;
    uint8_t *sec = fuzz_aligned_copy(data + 4, len, &alloc);
    check(sec, len, n_vocab);
    if (len >= 12) {
        uint32_t own = (uint32_t)sec[8] | (uint32_t)sec[9] << 8 | (uint32_t)sec[10] << 16 |
                       (uint32_t)sec[11] << 24;
        check(sec, len, own);
    }
    fuzz_free_copy(sec, alloc);
    return 0;
}
