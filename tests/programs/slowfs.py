"""A FUSE file system of the tests' own whose reads are slow: pyfuse3 on trio.

usage: python slowfs.py MOUNTPOINT SIZE MAX_WAIT_S

One regular file, ``slow``, of SIZE bytes; byte *i* is ``(i * 131 + 7) % 251``.
A READ prints "read OFFSET SIZE" and is answered only once the file system
is released (SIGUSR1, which prints "released") or MAX_WAIT_S seconds after
it arrived. Prints "ready" once mounted; SIGTERM or SIGINT unmounts and
exits. Pages are cached normally (no direct I/O), so the file can be mapped.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys

import pyfuse3
import trio

ROOT = pyfuse3.ROOT_INODE
FILE_INO = ROOT + 1
NAME = b"slow"


def pattern(size: int) -> bytes:
    """The file's contents: a sequence of period 251, so no page equals the next."""
    period = bytes((i * 131 + 7) % 251 for i in range(251))
    return (period * (size // 251 + 1))[:size]


class SlowFS(pyfuse3.Operations):
    def __init__(self, size: int, max_wait: float) -> None:
        super().__init__()
        self.size = size
        self.data = pattern(size)
        self.max_wait = max_wait
        self.released = trio.Event()

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = inode
        attrs.st_uid, attrs.st_gid = os.getuid(), os.getgid()
        attrs.entry_timeout = attrs.attr_timeout = 3600
        if inode == ROOT:
            attrs.st_mode, attrs.st_nlink = stat.S_IFDIR | 0o755, 2
        elif inode == FILE_INO:
            attrs.st_mode, attrs.st_nlink, attrs.st_size = stat.S_IFREG | 0o444, 1, self.size
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attrs.st_blksize = 4096
        return attrs

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        return self._attrs(inode)

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        if parent_inode != ROOT or name != NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(FILE_INO)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode != FILE_INO:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EACCES)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        print(f"read {off} {size}", flush=True)
        with trio.move_on_after(self.max_wait):
            await self.released.wait()
        return self.data[off : off + size]

    async def release(self, fh: int) -> None:
        return None


async def serve(fs: SlowFS) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pyfuse3.main)
        with trio.open_signal_receiver(signal.SIGUSR1, signal.SIGTERM, signal.SIGINT) as signals:
            print("ready", flush=True)
            async for signum in signals:
                if signum == signal.SIGUSR1:
                    fs.released.set()
                    print("released", flush=True)
                else:
                    fs.released.set()
                    nursery.cancel_scope.cancel()
                    return


def main() -> int:
    if len(sys.argv) != 4:
        print("usage: slowfs.py MOUNTPOINT SIZE MAX_WAIT_S", file=sys.stderr)
        return 2
    mountpoint, size, max_wait = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    fs = SlowFS(size, max_wait)
    options = set(pyfuse3.default_options) | {"fsname=slowfs", "ro"}
    pyfuse3.init(fs, mountpoint, options)
    try:
        trio.run(serve, fs)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
