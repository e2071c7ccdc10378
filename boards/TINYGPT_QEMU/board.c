/*
 * TINYGPT_QEMU board code (mpconfigboard.mk).
 *
 * 1. At every boot and soft reset (MICROPY_PORT_INIT_FUNC, the end of mp_init): register the
 *    model region with the engine's arena port layer, so Model("model") maps the file that
 *    `tinygpt emulate` loaded there, and run the frozen _boot.py, which mounts the RAM
 *    filesystem.
 * 2. Ctrl-C while code runs. The qemu port reads its UART only when it wants input, so a
 *    Ctrl-C typed during a long computation waits unseen. The SysTick interrupt (every 1 ms)
 *    is wrapped (ld --wrap) to look at the UART while an interrupt character is armed (pyexec
 *    arms it only while code runs): a Ctrl-C schedules KeyboardInterrupt, which the engine
 *    sees between layers (modtinygpt.c's poll), any other character is kept for the next
 *    read. The port's stdin functions are wrapped to hand that character out first.
 */
#include "py/runtime.h"
#include "py/mphal.h"
#include "py/stream.h"
#include "shared/runtime/interrupt_char.h"
#include "shared/runtime/pyexec.h"
#include "uart.h"

#include "tg_port_arena.h"

void tinygpt_board_init(void) {
    tg_port_arena_add_region("model", (const uint8_t *)TINYGPT_MODEL_ADDR, TINYGPT_MODEL_SIZE);
    pyexec_frozen_module("_boot.py", false);
}

/* littlefs asks for the time to stamp files; the board has no clock. _boot.py mounts with
 * mtime=False, so this is never called, but vfs_lfs.c links it. */
uint64_t mp_hal_time_ns(void) {
    return 0;
}

/* A character read by the SysTick handler that was not Ctrl-C, or -1. */
static volatile int held_char = -1;

static inline void irq_off(void) {
    __asm volatile ("cpsid i" : : : "memory");
}

static inline void irq_on(void) {
    __asm volatile ("cpsie i" : : : "memory");
}

void __real_SysTick_Handler(void);

void __wrap_SysTick_Handler(void) {
    __real_SysTick_Handler();
    if (mp_interrupt_char >= 0 && held_char < 0 && uart_rx_any()) {
        int c = uart_rx_chr();
        if (c == mp_interrupt_char) {
            mp_sched_keyboard_interrupt();
        } else {
            held_char = c;
        }
    }
}

int __wrap_mp_hal_stdin_rx_chr(void) {
    for (;;) {
        irq_off(); /* the handler must not take a character between the two checks */
        int c = held_char;
        held_char = -1;
        if (c < 0) {
            c = uart_rx_chr();
        }
        irq_on();
        if (c >= 0) {
            return c;
        }
    }
}

uintptr_t __real_mp_hal_stdio_poll(uintptr_t poll_flags);

uintptr_t __wrap_mp_hal_stdio_poll(uintptr_t poll_flags) {
    if ((poll_flags & MP_STREAM_POLL_RD) && held_char >= 0) {
        return MP_STREAM_POLL_RD;
    }
    return __real_mp_hal_stdio_poll(poll_flags);
}
