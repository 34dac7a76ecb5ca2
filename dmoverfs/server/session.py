"""One session, as the control plane sees it: NetBSD's ``dmio_state`` minus its I/O.

Reads, writes and polls of a session never come here: the transport serves
them in C, where the core keeps the queue, the waiting calls, the nonblock
attribute and the times.  What stays in Python is what the file system's
face needs: who opened it, its function (``user.dmover.function``), its open
files, and closing it when the last one is released.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass, field

from dmoverfs.server.core import CoreSession, Function
from dmoverfs.server.process import Client
from dmoverfs.wire import MAX_FUNCNAME

log = logging.getLogger(__name__)


def function_name(raw: bytes) -> str:
    """The function name in an xattr value or a ``dsf_name``: cut at NUL and at 63 bytes, as NetBSD does."""
    return raw.split(b"\0", 1)[0][: MAX_FUNCNAME - 1].decode("utf-8", "replace")


@dataclass(eq=False)
class Session:
    """A dmoverio session: its C half, its opener, its function, its open files."""

    sid: int
    core: CoreSession
    client: Client
    depth: int
    function: Function | None = None
    #: FUSE file handles of its open files.
    files: set[int] = field(default_factory=set)
    closed: bool = False
    #: The server's log said why the kernel refused EPERM (once per session).
    eperm_explained: bool = False

    def set_function(self, raw_name: bytes, functions: dict[str, Function]) -> None:
        """DMIO_SETFUNC: ESRCH for an unknown function, EBUSY once one is set."""
        # EBUSY first, whatever the name, as NetBSD's dmio_ioctl does.
        if self.function is not None:
            raise OSError(errno.EBUSY, "the session already has a function")
        name = function_name(raw_name)
        func = functions.get(name)
        if func is None:
            raise OSError(errno.ESRCH, f"no function {name!r}")
        if func.external:
            err = self.core.set_external(func.index, func.ninputs, func.has_output)
        else:
            err = self.core.setfunc(func.index)
        if err:
            raise OSError(err, f"cannot select {name!r}")
        self.function = func

    def times(self) -> tuple[int, int, int]:
        """(atime, mtime, ctime) in ns: last read, last write, open."""
        return self.core.times()

    def counts(self) -> tuple[int, int]:
        """(outstanding, ready)."""
        return (0, 0) if self.closed else self.core.counts()

    def explain_eperm(self, writer: int) -> None:
        """Say why the kernel refused access to the memory of thread *writer*, and what allows it."""
        try:
            with open("/proc/sys/kernel/yama/ptrace_scope") as f:
                yama = f.read().strip()
        except OSError:
            yama = "absent"
        log.warning(
            "session %d: may not read or write the memory of thread %d (opened by uid %d): the kernel refused ptrace access "
            "(server uid %d, kernel.yama.ptrace_scope %s). Allow it by running the server as that user or as root, "
            "or in the client with prctl(PR_SET_PTRACER, %d) (libdmoverio.so does this on EPERM).",
            self.sid,
            writer,
            self.client.uid,
            os.geteuid(),
            yama,
            os.getpid(),
        )

    def close(self) -> None:
        """The last open file was released: discard responses, let requests finish."""
        if not self.closed:
            self.closed = True
            self.core.close()
