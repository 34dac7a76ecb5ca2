"""The pyfuse3 floor of ``dmoverfs bench``: dmoverfs's C core behind the thinnest pyfuse3 handlers.

It serves ``zero`` on the same wire format as ``csrc/bench/floor.c`` (a clone
file with a fresh inode per lookup, the function set by xattr, direct_io and
FOPEN_STREAM opens), but through pyfuse3 and trio, with each read and write
handler a single call into the C core. Measured next to the C floor and
dmoverfs, it splits the small-request gap in two: what pyfuse3 and trio cost
(C floor to this), and what dmoverfs's own Python layers cost (this to
dmoverfs).

It is a measuring aid, not a server: it assumes a read's responses are ready
(true of small requests, which the core runs at once) and otherwise polls; a
write the queue cannot take whole returns short.

    python -m dmoverfs.tools.bench_pyfloor [--ready-fd FD] MOUNTPOINT
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import stat
import time

import pyfuse3
import trio

from dmoverfs.server.core import Core, CoreSession
from dmoverfs.server.process import open_pidfd, thread_group
from dmoverfs.tunables import Tunables
from dmoverfs.wire import REQ_SIZE, RESP_SIZE, XATTR_FUNCTION

FSTYPE = "fuse.dmoverfs-pyfloor"
CLONE_NAME = b"dmoverio"
FIRST_INO = 16


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, core: Core, ready_fd: int | None) -> None:
        super().__init__()
        self.core = core
        self.zero = next(f.index for f in core.functions if f.name == "zero")
        self.depth = Tunables().queue_depth
        self.ready_fd = ready_fd
        self.next_ino = FIRST_INO
        self.sessions: dict[int, CoreSession] = {}
        self.now_ns = time.time_ns()

    def init(self) -> None:
        if self.ready_fd is not None:
            os.write(self.ready_fd, b"ready\n")
            os.close(self.ready_fd)
            self.ready_fd = None

    def _attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = ino
        attrs.st_mode = (stat.S_IFDIR | 0o755) if ino == pyfuse3.ROOT_INODE else (stat.S_IFREG | 0o666)
        attrs.st_uid, attrs.st_gid = os.getuid(), os.getgid()
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = self.now_ns
        attrs.entry_timeout = attrs.attr_timeout = 0
        return attrs

    async def lookup(self, parent_inode, name, ctx):
        if parent_inode != pyfuse3.ROOT_INODE or name != CLONE_NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        self.next_ino += 1
        return self._attrs(self.next_ino)

    async def getattr(self, inode, ctx):
        return self._attrs(inode)

    async def forget(self, inode_list):
        return None

    async def open(self, inode, flags, ctx):
        if inode == pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        pid = thread_group(ctx.pid)
        self.sessions[inode] = self.core.session(inode, self.depth, ctx.uid, pid, open_pidfd(pid))
        return pyfuse3.FileInfo(fh=inode, direct_io=True, keep_cache=False, nonseekable=True)

    async def setxattr(self, inode, name, value, ctx):
        session = self.sessions.get(inode)
        if session is None or name != XATTR_FUNCTION.encode():
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        if value.split(b"\0", 1)[0] != b"zero":
            raise pyfuse3.FUSEError(errno.ESRCH)
        err = session.setfunc(self.zero)
        if err:
            raise pyfuse3.FUSEError(err)

    async def write(self, fh, off, buf):
        accepted, err = self.sessions[fh].submit(buf, 0, len(buf) // REQ_SIZE)
        if accepted == 0 and err:
            raise pyfuse3.FUSEError(err)
        return accepted * REQ_SIZE

    async def read(self, fh, off, size):
        session = self.sessions[fh]
        want = size // RESP_SIZE
        data = session.take(want)
        while len(data) < want * RESP_SIZE:  # not in the figures: small requests are done at once
            await trio.sleep(0.0002)
            data += session.take(want - len(data) // RESP_SIZE)
        return data

    async def release(self, fh):
        session = self.sessions.pop(fh, None)
        if session is not None:
            session.close()


async def _run() -> None:
    async with trio.open_nursery() as nursery:

        async def stop_on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                async for _ in signals:
                    pyfuse3.terminate()
                    return

        nursery.start_soon(stop_on_signal)
        # As dmoverfs's server runs it.
        await pyfuse3.main(min_tasks=4, max_tasks=2 * Tunables().max_sessions + 64)
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dmoverfs.tools.bench_pyfloor")
    parser.add_argument("--ready-fd", type=int)
    parser.add_argument("mountpoint")
    args = parser.parse_args(argv)
    core = Core(Tunables(), transport=False)
    ops = Operations(core, args.ready_fd)
    options = set(pyfuse3.default_options) | {"fsname=dmoverfs-pyfloor", "subtype=dmoverfs-pyfloor"}
    pyfuse3.init(ops, args.mountpoint, options)
    try:
        trio.run(_run)
    finally:
        pyfuse3.close(unmount=True)
        for session in ops.sessions.values():
            session.close()
        core.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
