/*
 * Port layer for hosted C (Linux, macOS, the MicroPython unix port): plain malloc, and POSIX
 * threads as the matmul workers.
 *
 * tg_port_fail_after lets tests inject allocation failure: when it is >= 0, that many further
 * allocations succeed and the next one fails (then it goes back to -1).
 */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>

#include "tg_port.h"

int tg_port_fail_after = -1;

void *tg_port_alloc(size_t nbytes) {
    if (tg_port_fail_after == 0) {
        tg_port_fail_after = -1;
        return NULL;
    }
    if (tg_port_fail_after > 0) {
        tg_port_fail_after--;
    }
    /* glibc and most hosted libcs return 16-byte aligned blocks on 64-bit systems; the engine
     * checks alignment of what it gets and fails cleanly otherwise. */
    return malloc(nbytes ? nbytes : 1);
}

void tg_port_free(void *p) {
    free(p);
}

/* A PC has no flash partitions: model files are read or memory-mapped by the caller. */
int tg_port_map(const char *name, const uint8_t **data, size_t *len, void **handle) {
    (void)name;
    (void)data;
    (void)len;
    (void)handle;
    return -1;
}

void tg_port_unmap(void *handle) {
    (void)handle;
}

/* ---- workers ------------------------------------------------------------------------------
 * A decoded token of a small model is ~90 matmuls of a few microseconds each, so handing out a
 * job must cost far less than waking a sleeping thread (tens of microseconds). The helpers
 * therefore poll for a while after each job and only then sleep on a condition variable.
 *
 * A job is n_parts parts that every worker, the caller included, takes one at a time from one
 * atomic word (job number << 32 | next part << 16 | n_parts). When a helper has lost its core
 * (a busy machine, fewer free cores than threads) the caller simply takes every part itself and
 * waits only for parts a helper has started: a descheduled helper costs time, never a stall.
 * The job number in the same word makes a late helper's claim fail once its job has moved on.
 * Atomics are the GCC/Clang __atomic builtins (C99 has none). */
#define MAX_WORKERS 64u
#define SPIN_ROUNDS 100000u /* polls (each a CPU pause) before a helper sleeps */

#if defined(__x86_64__) || defined(__i386__)
#define CPU_RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__) || (defined(__arm__) && __ARM_ARCH >= 7)
#define CPU_RELAX() __asm__ __volatile__("yield")
#else
#define CPU_RELAX() ((void)0)
#endif

#define PART_SHIFT 16
#define PART_MASK 0xFFFFull
#define JOB_SHIFT 32

struct tg_workers {
    uint32_t n;          /* workers, the caller included */
    uint32_t n_started;  /* helper threads running */
    pthread_t threads[MAX_WORKERS];
    pthread_mutex_t lock;
    pthread_cond_t wake;
    tg_work_fn fn;       /* atomic: the current job, stored before `state` publishes it */
    void *ctx;           /* atomic */
    uint64_t state;      /* atomic: job number, next part, n_parts */
    uint32_t done;       /* atomic: parts of the current job finished */
    uint32_t sleeping;   /* atomic: helpers blocked (or about to block) on wake */
    uint32_t stop;       /* atomic: tg_port_workers_stop was called */
};

/* Take the next part of the current job and run it; 0 when it has none left. */
static int run_one_part(tg_workers *w) {
    uint64_t s = __atomic_load_n(&w->state, __ATOMIC_ACQUIRE);
    for (;;) {
        uint32_t next = (uint32_t)((s >> PART_SHIFT) & PART_MASK);
        uint32_t n_parts = (uint32_t)(s & PART_MASK);
        if (next >= n_parts) {
            return 0;
        }
        /* Read before the claim: if the claim succeeds the job was still this one, and the
         * caller cannot move on (and overwrite fn and ctx) before this part is done. */
        tg_work_fn fn = __atomic_load_n(&w->fn, __ATOMIC_ACQUIRE);
        void *ctx = __atomic_load_n(&w->ctx, __ATOMIC_ACQUIRE);
        if (__atomic_compare_exchange_n(&w->state, &s, s + (1ull << PART_SHIFT), 0,
                                        __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            fn(ctx, next, n_parts);
            __atomic_add_fetch(&w->done, 1, __ATOMIC_RELEASE);
            return 1;
        }
    }
}

static int has_parts(tg_workers *w) {
    uint64_t s = __atomic_load_n(&w->state, __ATOMIC_ACQUIRE);
    return ((s >> PART_SHIFT) & PART_MASK) < (s & PART_MASK) ||
           __atomic_load_n(&w->stop, __ATOMIC_ACQUIRE);
}

static void *helper_main(void *p) {
    tg_workers *w = (tg_workers *)p;
    for (;;) {
        for (uint32_t i = 0; !has_parts(w) && i < SPIN_ROUNDS; i++) {
            CPU_RELAX();
        }
        if (!has_parts(w)) {
            /* Sleep. The caller publishes a job and then reads sleeping (both sequentially
             * consistent): either it sees this helper sleeping and signals under the lock, or
             * this helper's has_parts below already sees the job. */
            pthread_mutex_lock(&w->lock);
            __atomic_add_fetch(&w->sleeping, 1, __ATOMIC_SEQ_CST);
            while (!has_parts(w)) {
                pthread_cond_wait(&w->wake, &w->lock);
            }
            __atomic_sub_fetch(&w->sleeping, 1, __ATOMIC_SEQ_CST);
            pthread_mutex_unlock(&w->lock);
        }
        if (__atomic_load_n(&w->stop, __ATOMIC_ACQUIRE)) {
            return NULL;
        }
        while (run_one_part(w)) {
        }
    }
}

uint32_t tg_port_max_workers(void) {
    return MAX_WORKERS;
}

tg_workers *tg_port_workers_start(uint32_t n) {
    if (n < 2 || n > MAX_WORKERS) {
        return NULL;
    }
    tg_workers *w = (tg_workers *)tg_port_alloc(sizeof(tg_workers));
    if (!w) {
        return NULL;
    }
    memset(w, 0, sizeof(*w));
    w->n = n;
    if (pthread_mutex_init(&w->lock, NULL) != 0) {
        tg_port_free(w);
        return NULL;
    }
    if (pthread_cond_init(&w->wake, NULL) != 0) {
        pthread_mutex_destroy(&w->lock);
        tg_port_free(w);
        return NULL;
    }
    /* The helpers block every signal (they inherit the mask): a Ctrl-C meant for the
     * interpreter must not run its handler, MicroPython's or Python's, on a helper. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    for (uint32_t i = 1; i < n; i++) {
        if (pthread_create(&w->threads[i], NULL, helper_main, w) != 0) {
            pthread_sigmask(SIG_SETMASK, &old, NULL);
            tg_port_workers_stop(w);
            return NULL;
        }
        w->n_started = i;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return w;
}

void tg_port_workers_run(tg_workers *w, tg_work_fn fn, void *ctx, uint32_t n_parts) {
    if (n_parts > PART_MASK) {
        n_parts = (uint32_t)PART_MASK; /* the engine asks for a few per worker */
    }
    __atomic_store_n(&w->fn, fn, __ATOMIC_RELAXED);
    __atomic_store_n(&w->ctx, ctx, __ATOMIC_RELAXED);
    __atomic_store_n(&w->done, 0, __ATOMIC_RELAXED);
    uint64_t job = (__atomic_load_n(&w->state, __ATOMIC_RELAXED) >> JOB_SHIFT) + 1;
    __atomic_store_n(&w->state, job << JOB_SHIFT | n_parts, __ATOMIC_SEQ_CST); /* publishes */
    if (__atomic_load_n(&w->sleeping, __ATOMIC_SEQ_CST)) {
        pthread_mutex_lock(&w->lock);
        pthread_cond_broadcast(&w->wake);
        pthread_mutex_unlock(&w->lock);
    }
    while (run_one_part(w)) {
    }
    /* Every part is taken; wait for those a helper is still running. */
    for (uint32_t i = 1; __atomic_load_n(&w->done, __ATOMIC_ACQUIRE) != n_parts; i++) {
        CPU_RELAX();
        if (i % 256u == 0) {
            sched_yield(); /* that helper may be waiting for this core */
        }
    }
}

void tg_port_workers_stop(tg_workers *w) {
    if (!w) {
        return;
    }
    pthread_mutex_lock(&w->lock);
    __atomic_store_n(&w->stop, 1, __ATOMIC_SEQ_CST);
    pthread_cond_broadcast(&w->wake);
    pthread_mutex_unlock(&w->lock);
    for (uint32_t i = 1; i <= w->n_started; i++) {
        pthread_join(w->threads[i], NULL);
    }
    pthread_cond_destroy(&w->wake);
    pthread_mutex_destroy(&w->lock);
    tg_port_free(w);
}
