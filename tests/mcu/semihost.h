/*
 * Bare-metal support shared by the MCU test programs (tests/mcu/): ARM semihosting calls,
 * the SysTick-based tick counter, and the Cortex-M4 system registers startup.c sets.
 */
#ifndef TG_MCU_SEMIHOST_H
#define TG_MCU_SEMIHOST_H

#include <stdint.h>

/* System Control Block registers (ARMv7-M ARM, B3.2) */
#define SCB_CPACR (*(volatile uint32_t *)0xE000ED88u) /* coprocessor access: CP10/CP11 = FPU */
#define SCB_ICSR (*(volatile uint32_t *)0xE000ED04u)  /* interrupt control and state */
#define SCB_ICSR_PENDSTSET (1u << 26)
#define SCB_CCR (*(volatile uint32_t *)0xE000ED14u)   /* configuration and control */
#define SCB_SHCSR (*(volatile uint32_t *)0xE000ED24u) /* system handler control and state */
#define SCB_CFSR (*(volatile uint32_t *)0xE000ED28u)  /* configurable fault status */
#define SCB_HFSR (*(volatile uint32_t *)0xE000ED2Cu)  /* HardFault status */
#define SCB_MMFAR (*(volatile uint32_t *)0xE000ED34u)
#define SCB_BFAR (*(volatile uint32_t *)0xE000ED38u)
#define SCB_CCR_UNALIGN_TRP (1u << 3)
#define SCB_CCR_DIV_0_TRP (1u << 4)
#define CFSR_UNALIGNED (1u << 24) /* UFSR.UNALIGNED */
#define CFSR_DIVBYZERO (1u << 25) /* UFSR.DIVBYZERO */

#define SYST_CSR (*(volatile uint32_t *)0xE000E010u)
#define SYST_RVR (*(volatile uint32_t *)0xE000E014u)
#define SYST_CVR (*(volatile uint32_t *)0xE000E018u)

/* Semihosting operations (ARM "Semihosting for AArch32 and AArch64", v2) */
#define SYS_WRITE0 0x04
#define SYS_EXIT 0x18
#define SYS_EXIT_EXTENDED 0x20
#define ADP_Stopped_ApplicationExit 0x20026

static inline int semihost_call(int op, const void *arg) {
    register int r0 __asm__("r0") = op;
    register const void *r1 __asm__("r1") = arg;
    __asm__ volatile("bkpt 0xab" : "+r"(r0) : "r"(r1) : "memory");
    return r0;
}

/* Writes a NUL-terminated string to the debug console; safe in a fault handler (no libc). */
static inline void semihost_write0(const char *s) {
    semihost_call(SYS_WRITE0, s);
}

/* Ends the emulation; QEMU exits with `code` (SYS_EXIT_EXTENDED carries the exit status). */
void semihost_exit(int code) __attribute__((noreturn));

/* Processor clock ticks since startup (SysTick, 24 bits + wrap count): under `qemu -icount
 * shift=N` they follow executed instructions, see main.c. */
uint64_t mcu_ticks(void);

#endif
