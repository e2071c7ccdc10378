/*
 * The engine on a bare Cortex-M4F (QEMU mps2-an386): load the linked-in model file with the
 * CRC check on, prefill a fixed prompt, run greedy steps, then a seeded top-k/top-p
 * continuation, and print everything a host run must reproduce bit for bit:
 *
 *   prompt: <ids>                     the prefill ids (fixed formula, see below)
 *   crc prefill <hex>                 CRC32 (zlib) of the float32 logits' bytes after the prefill
 *   greedy <k> id <id> crc <hex>      greedy token k, and the logits CRC after stepping it
 *   sampled <k> id <id> crc <hex>     the same for the sampled continuation
 *   sampler: temperature .. top_k .. top_p .. repetition_penalty .. seed ..
 *
 * and the instruction counts ("ticks ..." lines, see mcu_ticks below), the arena use, and
 * "done" as the last line. tests/test_mcu.py runs the same sequence on the host engine.
 */
#include <stdio.h>
#include <string.h>

#include "semihost.h"
#include "tg_port.h"
#include "tg_port_arena.h"
#include "tinygpt.h"

extern const uint8_t tg_model_start[], tg_model_end[];

#define N_PROMPT 8
#define N_GREEDY 6
#define N_SAMPLED 4
#define SEED 1234u

static uint32_t logits_crc(const tg_model *m, uint32_t n_vocab) {
    return tg_crc32(0, (const uint8_t *)tg_logits(m), 4 * (size_t)n_vocab);
}

/* 2*n + 3 instructions (mov, n x (subs, bne), and the surrounding call), for calibrating
 * ticks against executed instructions. */
static void __attribute__((noinline)) spin(uint32_t n) {
    __asm__ volatile("1: subs %0, %0, #1\n\tbne 1b" : "+r"(n)::"cc");
}

static int die(const char *what, const tg_error *err) {
    printf("ERROR %s: %s (%s)\n", what, err->msg, tg_status_name(err->code));
    return 1;
}

int main(void) {
    tg_error err;
    tg_model *m = NULL;
    const uint8_t *data;
    size_t len;
    void *handle;

    /* Calibration: SysTick runs on the processor clock; under `-icount shift=0` QEMU executes
     * one instruction per ns of virtual time, so ticks * (insn per tick) = instructions. */
    const uint32_t n_spin = 1000000;
    uint64_t c0 = mcu_ticks();
    spin(n_spin);
    uint64_t c1 = mcu_ticks();
    printf("calibration: %lu instructions in %lu ticks\n", (unsigned long)(2 * n_spin),
           (unsigned long)(c1 - c0));

    tg_port_arena_add_region("model", tg_model_start, (size_t)(tg_model_end - tg_model_start));
    if (tg_port_map("model", &data, &len, &handle) != 0) {
        printf("ERROR no model region\n");
        return 1;
    }
    printf("model: %lu bytes at 0x%08lx\n", (unsigned long)len, (unsigned long)(uintptr_t)data);

    tg_options opt;
    memset(&opt, 0, sizeof(opt)); /* n_ctx = n_positions, defaults, CRC checked */
    uint64_t t0 = mcu_ticks();
    if (tg_load(data, len, &opt, &m, &err) != TG_OK) {
        return die("tg_load", &err);
    }
    uint64_t t1 = mcu_ticks();
    tg_info info;
    tg_get_info(m, &info);
    printf("info: n_vocab %lu n_ctx %lu n_embd %lu n_layer %lu n_head %lu n_inner %lu\n",
           (unsigned long)info.n_vocab, (unsigned long)info.n_ctx, (unsigned long)info.n_embd,
           (unsigned long)info.n_layer, (unsigned long)info.n_head, (unsigned long)info.n_inner);
    printf("ticks load %lu\n", (unsigned long)(t1 - t0));

    int32_t prompt[N_PROMPT];
    printf("prompt:");
    for (uint32_t i = 0; i < N_PROMPT; i++) {
        prompt[i] = (int32_t)((37u * i + 11u) % info.n_vocab);
        printf(" %ld", (long)prompt[i]);
    }
    printf("\n");

    t0 = mcu_ticks();
    if (tg_prefill(m, prompt, N_PROMPT, &err) != TG_OK) {
        return die("tg_prefill", &err);
    }
    t1 = mcu_ticks();
    printf("crc prefill %08lx\n", (unsigned long)logits_crc(m, info.n_vocab));
    printf("ticks prefill %lu tokens %u\n", (unsigned long)(t1 - t0), N_PROMPT);

    tg_sampler greedy = {0.0f, 0, 1.0f, 1.0f};
    uint64_t step_ticks = 0, sample_ticks = 0;
    for (int k = 0; k < N_GREEDY; k++) {
        int32_t id;
        t0 = mcu_ticks();
        if (tg_sample(m, &greedy, &id, &err) != TG_OK) {
            return die("tg_sample", &err);
        }
        t1 = mcu_ticks();
        if (tg_step(m, id, &err) != TG_OK) {
            return die("tg_step", &err);
        }
        uint64_t t2 = mcu_ticks();
        sample_ticks += t1 - t0;
        step_ticks += t2 - t1;
        printf("greedy %d id %ld crc %08lx\n", k, (long)id, (unsigned long)logits_crc(m, info.n_vocab));
    }
    printf("ticks step %lu tokens %u\n", (unsigned long)step_ticks, N_GREEDY);
    printf("ticks greedy_sample %lu samples %u\n", (unsigned long)sample_ticks, N_GREEDY);

    tg_sampler topkp = {0.8f, 40, 0.9f, 1.1f};
    printf("sampler: temperature 0.8 top_k 40 top_p 0.9 repetition_penalty 1.1 seed %u\n", SEED);
    tg_seed(m, SEED);
    sample_ticks = 0;
    for (int k = 0; k < N_SAMPLED; k++) {
        int32_t id;
        t0 = mcu_ticks();
        if (tg_sample(m, &topkp, &id, &err) != TG_OK) {
            return die("tg_sample", &err);
        }
        t1 = mcu_ticks();
        sample_ticks += t1 - t0;
        if (tg_step(m, id, &err) != TG_OK) {
            return die("tg_step", &err);
        }
        printf("sampled %d id %ld crc %08lx\n", k, (long)id, (unsigned long)logits_crc(m, info.n_vocab));
    }
    printf("ticks topkp_sample %lu samples %u\n", (unsigned long)sample_ticks, N_SAMPLED);

    tg_arena_stats st;
    tg_port_arena_stats(&st);
    printf("arena: peak %lu of %lu bytes (kv %lu scratch %lu)\n", (unsigned long)st.peak,
           (unsigned long)st.size, (unsigned long)info.kv_bytes, (unsigned long)info.scratch_bytes);
    tg_free(m);
    tg_port_unmap(handle);
    tg_port_arena_stats(&st);
    if (st.used != 0 || st.live_blocks != 0 || st.bad_frees != 0) {
        printf("ERROR arena not empty after tg_free: used %lu live %lu bad frees %lu\n",
               (unsigned long)st.used, (unsigned long)st.live_blocks, (unsigned long)st.bad_frees);
        return 1;
    }
    printf("done\n");
    return 0;
}
