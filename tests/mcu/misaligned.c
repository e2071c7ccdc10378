/*
 * Negative control for the alignment check: with the startup of startup.c (UNALIGN_TRP set),
 * a misaligned 32-bit load must raise a UsageFault, whose handler prints
 * "FAULT UsageFault ... UNALIGNED" and exits with status 3. If this program instead reaches
 * its "no fault" line, a clean run of main.c would prove nothing about the engine's accesses.
 */
#include <stdint.h>
#include <stdio.h>

static uint32_t words[4] = {0x03020100u, 0x07060504u, 0x0b0a0908u, 0x0f0e0d0cu};

int main(void) {
    printf("misaligned: loading a word at an odd address\n");
    volatile const uint32_t *p = (volatile const uint32_t *)(void *)((uint8_t *)words + 1);
    uint32_t v = *p;
    printf("misaligned: no fault, read 0x%08lx\n", (unsigned long)v);
    return 0;
}
