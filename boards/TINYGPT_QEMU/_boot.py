# Runs at every boot and soft reset of the TINYGPT_QEMU board (board.c): mounts the RAM
# filesystem at / (formatting it on the first boot after QEMU starts), so `tinygpt deploy` and
# mpremote's fs commands work. It lives in emulated RAM: soft resets keep it, stopping QEMU
# loses it.
import os
import uctypes
import vfs

import tinygpt_board as board


class RAMBlockDevice:
    """A block device (littlefs's extended interface) on a fixed RAM region."""

    def __init__(self, addr, size, block_size=4096):
        self.mem = memoryview(uctypes.bytearray_at(addr, size))
        self.block_size = block_size
        self.n_blocks = size // block_size

    def readblocks(self, block, buf, offset=0):
        a = block * self.block_size + offset
        buf[:] = self.mem[a:a + len(buf)]

    def writeblocks(self, block, buf, offset=0):
        a = block * self.block_size + offset
        self.mem[a:a + len(buf)] = buf

    def ioctl(self, op, arg):
        if op == 4:  # block count
            return self.n_blocks
        if op == 5:  # block size
            return self.block_size
        return 0  # init, deinit, sync, erase: nothing to do for RAM


def _mount():
    bdev = RAMBlockDevice(board.FS_ADDR, board.FS_SIZE)
    try:  # no clock on this board: no modification times
        vfs.mount(vfs.VfsLfs2(bdev, mtime=False), "/")
    except OSError:  # no filesystem yet (QEMU starts with zeroed RAM)
        vfs.VfsLfs2.mkfs(bdev)
        vfs.mount(vfs.VfsLfs2(bdev, mtime=False), "/")
    os.chdir("/")


_mount()
