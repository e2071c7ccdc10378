/*
 * threads_check MODEL N_THREADS ID...: the model's logits after a prefill of the ids, then after
 * each of 4 greedy steps, and after a verify, computed with 1 and with N_THREADS matmul workers,
 * must be bit-identical; then the threaded model is freed while its workers wait. Built with
 * ThreadSanitizer by tests/test_threads.py (a data race aborts it), also with TG_DOT_KERNEL=2
 * (four rows per dot_rows call, so row counts that are not multiples of 4 are exercised).
 * Prints "threads_check: identical" on success.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "read_file.h"
#include "tinygpt.h"

static tg_model *load(const uint8_t *buf, size_t len, uint32_t n_threads) {
    tg_options opt = {.n_threads = n_threads};
    tg_model *m = NULL;
    tg_error err;
    if (tg_load(buf, len, &opt, &m, &err) != TG_OK) {
        fprintf(stderr, "threads_check: load with %u threads: %s\n", (unsigned)n_threads, err.msg);
        exit(1);
    }
    return m;
}

static void same_logits(tg_model *a, tg_model *b, uint32_t n_vocab, const char *what) {
    if (memcmp(tg_logits(a), tg_logits(b), 4 * (size_t)n_vocab) != 0) {
        fprintf(stderr, "threads_check: logits differ after %s\n", what);
        exit(1);
    }
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: threads_check MODEL N_THREADS ID...\n");
        return 2;
    }
    size_t len;
    uint8_t *buf = read_file(argv[1], &len);
    if (!buf) {
        fprintf(stderr, "threads_check: cannot read %s\n", argv[1]);
        return 2;
    }
    uint32_t n_threads = (uint32_t)atoi(argv[2]);
    int32_t ids[64];
    uint32_t n = 0;
    for (int i = 3; i < argc && n < 64; i++) {
        ids[n++] = (int32_t)atoi(argv[i]);
    }
    tg_model *one = load(buf, len, 1), *many = load(buf, len, n_threads);
    tg_info info;
    tg_get_info(many, &info);
    if (info.n_threads != n_threads) {
        fprintf(stderr, "threads_check: info.n_threads %u, asked for %u\n",
                (unsigned)info.n_threads, (unsigned)n_threads);
        return 1;
    }
    tg_error err;
    tg_model *both[2] = {one, many};
    for (int k = 0; k < 2; k++) {
        if (tg_prefill(both[k], ids, n, &err) != TG_OK) {
            fprintf(stderr, "threads_check: prefill: %s\n", err.msg);
            return 1;
        }
    }
    same_logits(one, many, info.n_vocab, "prefill");
    tg_sampler greedy = {0.0f, 0, 1.0f, 1.0f};
    for (int s = 0; s < 4; s++) {
        int32_t id;
        tg_sample(one, &greedy, &id, &err);
        for (int k = 0; k < 2; k++) {
            if (tg_step(both[k], id, &err) != TG_OK) {
                fprintf(stderr, "threads_check: step: %s\n", err.msg);
                return 1;
            }
        }
        same_logits(one, many, info.n_vocab, "a step");
    }
    uint32_t nv = info.max_draft < n ? info.max_draft : n;
    for (int k = 0; k < 2; k++) {
        if (tg_verify(both[k], ids, nv, 1.0f, NULL, &err) != TG_OK) {
            fprintf(stderr, "threads_check: verify: %s\n", err.msg);
            return 1;
        }
    }
    same_logits(one, many, info.n_vocab, "verify");
    tg_free(many); /* workers waiting for the next job */
    tg_free(one);
    free(buf);
    printf("threads_check: identical\n");
    return 0;
}
