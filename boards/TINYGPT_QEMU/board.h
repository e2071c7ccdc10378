/* Included into every C file of the TINYGPT_QEMU firmware (mpconfigboard.mk: -include). */
#ifndef TINYGPT_QEMU_BOARD_H
#define TINYGPT_QEMU_BOARD_H

/* Called at the end of mp_init, at every boot and soft reset (board.c). */
void tinygpt_board_init(void);
#define MICROPY_PORT_INIT_FUNC tinygpt_board_init()

#endif
