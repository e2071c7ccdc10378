/*
 * engine_check: drives the C engine through its whole API on one model file, in plain C, so
 * the same checks run under AddressSanitizer + UndefinedBehaviorSanitizer (tests/test_engine_c.py
 * builds it with -fsanitize=address,undefined and runs it on converted test models).
 *
 *   engine_check MODEL_FILE [ids...]
 *
 * Prints one line per check ("PASS name" / "FAIL name: why") and a last line
 * "engine_check: N passed, M failed"; exits 1 if anything failed. Also prints
 * "greedy: id id ..." and "logits_crc: xxxxxxxx" so a test can compare with the Python build.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "read_file.h"
#include "tinygpt.h"

extern int tg_port_fail_after; /* tg_port_posix.c: inject an allocation failure */

static int passed, failed;

static void check(int cond, const char *name, const char *why) {
    if (cond) {
        passed++;
        printf("PASS %s\n", name);
    } else {
        failed++;
        printf("FAIL %s: %s\n", name, why);
    }
}

/* Load a copy of buf[0:len] (so ASan sees reads past the end) and run one step if it loads. */
static int load_copy(const uint8_t *buf, size_t len, int skip_crc, tg_error *err) {
    uint8_t *copy = aligned_alloc(16, (len + 15) & ~(size_t)15);
    memcpy(copy, buf, len);
    tg_options opt = {.skip_crc = skip_crc};
    tg_model *m = NULL;
    int rc = tg_load(copy, len, &opt, &m, err);
    if (rc == TG_OK) {
        tg_error e2;
        tg_step(m, 0, &e2);
        int32_t id;
        tg_sampler s = {0.8f, 5, 0.9f, 1.1f};
        tg_sample(m, &s, &id, &e2);
        tg_free(m);
    }
    free(copy);
    return rc;
}

static int poll_countdown;
static int poll_fn(void *ctx) {
    (void)ctx;
    return poll_countdown-- == 0;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: engine_check MODEL_FILE [ids...]\n");
        return 2;
    }
    size_t len;
    uint8_t *buf = read_file(argv[1], &len);
    if (!buf) {
        fprintf(stderr, "engine_check: cannot read %s\n", argv[1]);
        return 2;
    }
    tg_error err;
    tg_model *m = NULL;
    int rc = tg_load(buf, len, NULL, &m, &err);
    check(rc == TG_OK, "load", err.msg);
    if (rc) {
        printf("engine_check: %d passed, %d failed\n", passed, failed);
        return 1;
    }
    tg_info info;
    tg_get_info(m, &info);
    int32_t ids[256];
    uint32_t n = 0;
    for (int i = 2; i < argc && n < 256; i++) {
        ids[n++] = (int32_t)atoi(argv[i]);
    }
    if (n == 0) {
        for (n = 0; n < 12 && n < info.n_ctx; n++) {
            ids[n] = (int32_t)((n * 37 + 5) % info.n_vocab);
        }
    }
    if (n > info.n_ctx) {
        n = info.n_ctx;
    }
    size_t vb = 4 * (size_t)info.n_vocab;
    float *ref = malloc(vb);

    /* prefill == the same tokens one step at a time, bit for bit */
    rc = tg_prefill(m, ids, n, &err);
    check(rc == TG_OK && tg_pos(m) == n, "prefill", err.msg);
    memcpy(ref, tg_logits(m), vb);
    printf("logits_crc: %08x\n", (unsigned)tg_crc32(0, (const uint8_t *)ref, vb));
    tg_reset(m);
    check(tg_logits(m) == NULL && tg_pos(m) == 0, "reset clears", "logits or pos survive reset");
    for (uint32_t i = 0; i < n; i++) {
        tg_step(m, ids[i], &err);
    }
    check(memcmp(ref, tg_logits(m), vb) == 0, "prefill == steps", "logits differ");

    /* batch size does not change a bit */
    for (uint32_t b = 1; b <= 3; b++) {
        tg_options opt = {.max_batch = b};
        tg_model *mb;
        tg_load(buf, len, &opt, &mb, &err);
        tg_prefill(mb, ids, n, &err);
        check(memcmp(ref, tg_logits(mb), vb) == 0, "max_batch invariance", "logits differ");
        tg_free(mb);
    }

    /* greedy == argmax, and a greedy continuation for comparison with the host build */
    int32_t tok;
    tg_sampler greedy = {0.0f, 0, 1.0f, 1.0f};
    tg_sample(m, &greedy, &tok, &err);
    int32_t best = 0;
    for (uint32_t i = 1; i < info.n_vocab; i++) {
        if (ref[i] > ref[best]) {
            best = (int32_t)i;
        }
    }
    check(tok == best, "greedy == argmax", "sampled id is not the argmax");
    printf("greedy:");
    for (int i = 0; i < 6 && tg_pos(m) < info.n_ctx; i++) {
        tg_sample(m, &greedy, &tok, &err);
        printf(" %d", (int)tok);
        tg_step(m, tok, &err);
    }
    printf("\n");

    /* seeded sampling is reproducible; top-k never leaves the k best */
    tg_sampler s = {1.0f, 3, 1.0f, 1.0f};
    int32_t a[8], b2[8];
    tg_seed(m, 42);
    for (int i = 0; i < 8; i++) tg_sample(m, &s, &a[i], &err);
    tg_seed(m, 42);
    for (int i = 0; i < 8; i++) tg_sample(m, &s, &b2[i], &err);
    check(memcmp(a, b2, sizeof(a)) == 0, "seeded sampling reproducible", "sequences differ");

    /* bad input leaves the model as it was */
    uint32_t pos = tg_pos(m);
    int32_t bad[2] = {0, (int32_t)info.n_vocab};
    check(tg_prefill(m, bad, 2, &err) == TG_E_TOKEN && tg_pos(m) == pos, "token out of range",
          err.msg);
    check(tg_step(m, -1, &err) == TG_E_TOKEN && tg_pos(m) == pos, "negative token", err.msg);
    check(tg_prefill(m, ids, 0, &err) == TG_E_ARG, "empty prefill", err.msg);
    tg_sampler bad_s = {-1.0f, 0, 1.0f, 1.0f};
    check(tg_sample(m, &bad_s, &tok, &err) == TG_E_ARG, "negative temperature", err.msg);
    bad_s.temperature = 1.0f;
    bad_s.top_p = 0.0f;
    check(tg_sample(m, &bad_s, &tok, &err) == TG_E_ARG, "top_p 0", err.msg);
    while (tg_pos(m) < info.n_ctx) {
        tg_step(m, 1, &err);
    }
    check(tg_step(m, 1, &err) == TG_E_CONTEXT && tg_pos(m) == info.n_ctx, "context full",
          err.msg);
    tg_reset(m);
    check(tg_sample(m, &greedy, &tok, &err) == TG_E_NO_LOGITS, "sample before logits", err.msg);

    /* interrupt between layers: context unchanged, and the next run gives the same logits */
    tg_set_poll(m, poll_fn, NULL);
    poll_countdown = (int)info.n_layer / 2;
    check(tg_prefill(m, ids, n, &err) == TG_E_INTERRUPTED && tg_pos(m) == 0 && !tg_logits(m),
          "interrupt leaves context unchanged", err.msg);
    poll_countdown = -1;
    tg_prefill(m, ids, n, &err);
    check(memcmp(ref, tg_logits(m), vb) == 0, "run after interrupt", "logits differ");
    tg_free(m);

    /* load options */
    tg_options big = {.n_ctx = info.n_positions + 1};
    check(tg_load(buf, len, &big, &m, &err) == TG_E_ARG, "n_ctx > n_positions", err.msg);
    uint8_t *shifted = malloc(len + 16);
    memcpy(shifted + 4, buf, len);
    check(tg_load(shifted + 4, len, NULL, &m, &err) == TG_E_ALIGN, "misaligned buffer", err.msg);
    free(shifted);

    /* allocation failure at every allocation of the load */
    int nomem_ok = 1;
    for (int k = 0; k < 40; k++) {
        tg_port_fail_after = k;
        rc = tg_load(buf, len, NULL, &m, &err);
        int injected = tg_port_fail_after == -1;
        tg_port_fail_after = -1;
        if (rc == TG_OK) {
            tg_free(m);
            if (!injected) {
                break; /* every allocation has been failed once */
            }
            nomem_ok = 0; /* the failure was injected but the load succeeded */
        } else if (rc != TG_E_NOMEM) {
            nomem_ok = 0;
        }
    }
    check(nomem_ok, "allocation failure -> TG_E_NOMEM", "wrong status");

    /* truncation at every header byte and at every directory entry and tensor boundary */
    int trunc_ok = 1;
    for (size_t cut = 0; cut < 128 + 16 * (6 + 16 * (size_t)info.n_layer) && cut < len; cut++) {
        if (load_copy(buf, cut, 0, &err) == TG_OK) trunc_ok = 0;
    }
    for (uint32_t e = 0; e < 6 + 16 * info.n_layer; e++) {
        uint32_t off, nb;
        memcpy(&off, buf + 128 + 16 * e + 8, 4);
        memcpy(&nb, buf + 128 + 16 * e + 12, 4);
        size_t cuts[3] = {off, (size_t)off + nb / 2, (size_t)off + nb - 1};
        for (int c = 0; c < 3; c++) {
            if (cuts[c] < len && load_copy(buf, cuts[c], 0, &err) == TG_OK) trunc_ok = 0;
        }
    }
    check(trunc_ok, "truncated files are refused", "a truncated file loaded");

    /* single-byte corruption: with the CRC on, refused; with it off, never a crash */
    int crc_ok = 1;
    uint32_t n_tensors_here;
    memcpy(&n_tensors_here, buf + 76, 4);
    size_t layout_end = 128 + 16 * (size_t)n_tensors_here; /* header and directory */
    uint8_t *bad_buf = aligned_alloc(16, (len + 15) & ~(size_t)15);
    unsigned rng = 12345;
    for (int i = 0; i < 300; i++) {
        memcpy(bad_buf, buf, len);
        rng = rng * 1103515245u + 12345u;
        size_t at = i < 128 ? (size_t)i : 20 + (size_t)(rng >> 4) % (len - 20);
        bad_buf[at] ^= (uint8_t)(1u + (rng >> 24) % 255u);
        rc = load_copy(bad_buf, len, 0, &err);
        /* the header and the directory layout are checked before the CRC, so they may fail
         * with their own error */
        if (at >= layout_end ? rc != TG_E_CRC : rc == TG_OK) crc_ok = 0;
        load_copy(bad_buf, len, 1, &err);
    }
    free(bad_buf);
    check(crc_ok, "corruption -> CRC error", "a corrupted file passed the CRC check");

    free(ref);
    free(buf);
    printf("engine_check: %d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
