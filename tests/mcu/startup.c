/*
 * Startup for the Cortex-M4F test programs on QEMU mps2-an386: vector table, Reset_Handler,
 * fault handlers, SysTick tick counter, semihosting exit.
 *
 * Reset_Handler enables the FPU (CPACR CP10/CP11 full access), copies .data from its load
 * address, zeroes .bss, sets SCB->CCR.UNALIGN_TRP (every misaligned LDR/STR/LDRH/STRH then
 * raises a UsageFault instead of being done by the core, so a clean run proves the code under
 * test only makes aligned accesses) and DIV_0_TRP (integer division by zero faults), enables
 * the UsageFault/BusFault/MemManage handlers, starts SysTick, calls main and exits through
 * semihosting with main's return value. Output goes through semihosting too (mini_printf.c:
 * newlib's printf itself makes misaligned accesses, see there).
 *
 * A fault prints "FAULT <kind> CFSR=... HFSR=... PC=..." (plus "UNALIGNED" when that is the
 * cause) through semihosting and exits with status 3.
 */
#include <stdint.h>

#include "semihost.h"

extern uint32_t _sidata[], _sdata[], _edata[], _sbss[], _ebss[], _estack[];
extern int main(void);

void Reset_Handler(void) __attribute__((noreturn));
void Default_Handler(void);
void HardFault_Handler(void) __attribute__((naked));
void MemManage_Handler(void) __attribute__((naked));
void BusFault_Handler(void) __attribute__((naked));
void UsageFault_Handler(void) __attribute__((naked));
void SysTick_Handler(void);
void fault_report(const uint32_t *frame, uint32_t kind) __attribute__((noreturn));

typedef void (*vector_fn)(void);

/* Cortex-M4 core vectors; the board's interrupts are never enabled, so none are listed. */
__attribute__((section(".vectors"), used)) const vector_fn vector_table[16] = {
    (vector_fn)(uintptr_t)_estack, /* 0: initial SP */
    Reset_Handler,                 /* 1 */
    Default_Handler,               /* 2: NMI */
    HardFault_Handler,             /* 3 */
    MemManage_Handler,             /* 4 */
    BusFault_Handler,              /* 5 */
    UsageFault_Handler,            /* 6 */
    0, 0, 0, 0,                    /* 7-10 reserved */
    Default_Handler,               /* 11: SVCall */
    Default_Handler,               /* 12: debug monitor */
    0,                             /* 13 reserved */
    Default_Handler,               /* 14: PendSV */
    SysTick_Handler,               /* 15 */
};

static volatile uint32_t systick_wraps;

void SysTick_Handler(void) {
    systick_wraps++;
}

uint64_t mcu_ticks(void) {
    uint32_t hi, lo, pending;
    do {
        hi = systick_wraps;
        lo = SYST_CVR;
        pending = SCB_ICSR & SCB_ICSR_PENDSTSET;
    } while (hi != systick_wraps);
    /* The counter wrapped but its interrupt is not taken yet (QEMU delivers interrupts between
     * translation blocks): lo already counts down from the reload value. A small lo with the
     * flag set means the wrap came after lo was read. */
    if (pending && lo > 0x800000u) {
        hi++;
    }
    return ((uint64_t)hi << 24) + (0xFFFFFFu - lo);
}

void semihost_exit(int code) {
    uint32_t block[2] = {ADP_Stopped_ApplicationExit, (uint32_t)code};
    semihost_call(SYS_EXIT_EXTENDED, block);
    /* a debugger without SYS_EXIT_EXTENDED: plain exit (status 0 or 1 only) */
    semihost_call(SYS_EXIT, (const void *)(uintptr_t)(code == 0 ? ADP_Stopped_ApplicationExit : 0x20023));
    for (;;) {
    }
}

/* newlib's exit() ends in _exit. */
void _exit(int code) {
    semihost_exit(code);
}

void Reset_Handler(void) {
    /* FPU first: the compiler may use FP registers anywhere after this. */
    SCB_CPACR |= 0xFu << 20;
    __asm__ volatile("dsb\n\tisb" ::: "memory");
    for (uint32_t *src = _sidata, *dst = _sdata; dst < _edata;) {
        *dst++ = *src++;
    }
    for (uint32_t *dst = _sbss; dst < _ebss;) {
        *dst++ = 0;
    }
#ifdef TG_ALLOW_UNALIGNED /* messages.c: links newlib-nano's printf, which makes them */
    SCB_CCR |= SCB_CCR_DIV_0_TRP;
#else
    SCB_CCR |= SCB_CCR_UNALIGN_TRP | SCB_CCR_DIV_0_TRP;
#endif
    SCB_SHCSR |= (1u << 16) | (1u << 17) | (1u << 18); /* MEMFAULTENA, BUSFAULTENA, USGFAULTENA */
    __asm__ volatile("dsb\n\tisb" ::: "memory");
    /* SysTick on the processor clock, full 24-bit range, interrupt on every wrap */
    SYST_RVR = 0xFFFFFFu;
    SYST_CVR = 0;
    SYST_CSR = 7u; /* ENABLE | TICKINT | CLKSOURCE=processor */
    while (SYST_CVR == 0) {
        /* the first reload (from the 0 written above) is not a wrap: wait for it, so that
         * mcu_ticks() counts from here */
    }
    semihost_exit(main());
}

void Default_Handler(void) {
    semihost_write0("FAULT unexpected exception\n");
    semihost_exit(3);
}

static void put_hex(char *p, uint32_t v) {
    for (int i = 7; i >= 0; i--) {
        p[i] = "0123456789abcdef"[v & 15u];
        v >>= 4;
    }
}

/* frame: the exception stack frame (r0-r3, r12, lr, pc, xpsr) */
__attribute__((used, noreturn)) void fault_report(const uint32_t *frame, uint32_t kind) {
    static const char *const names[] = {"HardFault", "MemManage", "BusFault", "UsageFault"};
    static char line[160];
    uint32_t cfsr = SCB_CFSR, hfsr = SCB_HFSR;
    const char *name = names[kind & 3u];
    char *p = line;
    const char *parts[] = {"FAULT ", name, " CFSR=", 0, " HFSR=", 0, " PC=", 0, " BFAR=", 0};
    uint32_t vals[] = {cfsr, hfsr, frame[6], SCB_BFAR};
    int vi = 0;
    for (unsigned i = 0; i < sizeof(parts) / sizeof(parts[0]); i++) {
        if (parts[i]) {
            for (const char *s = parts[i]; *s;) {
                *p++ = *s++;
            }
        } else {
            put_hex(p, vals[vi++]);
            p += 8;
        }
    }
    const char *tail = (cfsr & CFSR_UNALIGNED) ? " UNALIGNED\n" : (cfsr & CFSR_DIVBYZERO) ? " DIVBYZERO\n" : "\n";
    while (*tail) {
        *p++ = *tail++;
    }
    *p = 0;
    semihost_write0(line);
    semihost_exit(3);
}

/* The naked handlers pick the stack the exception frame was pushed on (EXC_RETURN bit 2). */
#define FAULT_ENTRY(fn, kind)                                                                  \
    void fn(void) {                                                                            \
        __asm__ volatile("tst lr, #4\n\t"                                                      \
                         "ite eq\n\t"                                                          \
                         "mrseq r0, msp\n\t"                                                   \
                         "mrsne r0, psp\n\t"                                                   \
                         "movs r1, #" #kind "\n\t"                                             \
                         "b fault_report\n");                                                  \
    }

FAULT_ENTRY(HardFault_Handler, 0)
FAULT_ENTRY(MemManage_Handler, 1)
FAULT_ENTRY(BusFault_Handler, 2)
FAULT_ENTRY(UsageFault_Handler, 3)
