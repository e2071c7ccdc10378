/*
 * The engine's error messages under newlib-nano's printf (the libc of MicroPython's ESP32
 * build), which has no long long conversions: a message formatted with %llu loses its number
 * there ("(lu bytes)"). Linked with --specs=nano.specs instead of mini_printf.c; each line
 * "msg <what>: <text>" must equal the host engine's message for the same call
 * (tests/test_mcu.py::test_messages_under_newlib_nano).
 */
#include <stdio.h>
#include <string.h>

#include "semihost.h"
#include "tinygpt.h"

static void put_u32(uint8_t *p, uint32_t v) {
    memcpy(p, &v, 4);
}

static void show(const char *what, const tg_error *err) {
    char line[256];
    snprintf(line, sizeof(line), "msg %s: %s\n", what, err->msg); /* newlib-nano's snprintf */
    semihost_write0(line);
}

static uint8_t model[256] __attribute__((aligned(16)));

int main(void) {
    tg_error err;
    uint8_t sec[32];
    size_t n;
    tg_model *m;

    /* tokenizer counts that need more than 2^32 bytes: a 64-bit number in the message */
    memset(sec, 0, sizeof(sec));
    memcpy(sec, "TTOK", 4);
    put_u32(sec + 4, 1);
    put_u32(sec + 8, 256);
    put_u32(sec + 12, 0xFFFFFFFFu); /* merges */
    put_u32(sec + 20, 1);           /* pretokenizer */
    tg_check_tokenizer(sec, sizeof(sec), 256, &err);
    show("tokenizer counts", &err);
    put_u32(sec + 12, 0);
    put_u32(sec + 28, 7);
    tg_check_tokenizer(sec, sizeof(sec), 256, &err);
    show("tokenizer reserved", &err);

    /* a header claiming more than the file: the file length is a 64-bit count */
    memcpy(model, "TGPT", 4);
    put_u32(model + 4, 1);   /* version */
    put_u32(model + 8, 128); /* header_size */
    put_u32(model + 12, 0xFFFFFFF0u);
    tg_read_size(model, 128, 1000, &n, &err);
    show("read size", &err);

    /* %lu and %p */
    tg_load(model, 100, NULL, &m, &err);
    show("short file", &err);
    tg_load(model + 4, 100, NULL, &m, &err);
    show("misaligned", &err);
    semihost_write0("done\n");
    return 0;
}
