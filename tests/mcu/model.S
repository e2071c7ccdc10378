/* The model file, linked in as bytes. TG_MODEL_FILE (a quoted path) is set by the build
 * (tests/test_mcu.py); the .model section lies in PSRAM (mps2_an386.ld), 16-byte aligned. */
    .section .model, "a"
    .balign 16
    .global tg_model_start
tg_model_start:
    .incbin TG_MODEL_FILE
    .global tg_model_end
tg_model_end:
    .balign 16
