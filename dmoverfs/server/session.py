"""One session: NetBSD's ``dmio_state``, on trio.

A session owns a :class:`~dmoverfs.core.CoreSession` (decoding, execution and
the response ring live in C) and adds what needs the event loop: blocking
reads and writes, non-blocking EAGAIN, poll readiness and its notifications,
and waking everyone when the server goes away. Nothing here knows about FUSE.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import trio

from dmoverfs.core import CoreSession, Function
from dmoverfs.process import Client
from dmoverfs.wire import MAX_FUNCNAME, REQ_SIZE, RESP_SIZE

log = logging.getLogger(__name__)

POLL_IN = select.POLLIN | select.POLLRDNORM
POLL_OUT = select.POLLOUT | select.POLLWRNORM

#: A transfer whose length is not a multiple of the struct size is taken as a
#: piece of a larger one split by the kernel (1 MiB transfer size, less the
#: offset of the buffer in its page) when it is at least this long: the whole
#: structs in it are served and the rest is left to the client's next call.
SPLIT_MIN = (1 << 20) - 4096


class PollHandle(Protocol):
    """What :meth:`Session.poll` stores: pyfuse3's handle, or a test double."""

    def notify(self) -> None: ...


@dataclass
class Counters:
    """Server-wide counters the sessions update."""

    sessions_total: int = 0
    queue_waits: int = 0
    read_waits: int = 0


class Waiter:
    """One read or write that may block.

    The FUSE layer ties it to its request: :meth:`interrupt` (the kernel's
    FUSE_INTERRUPT, i.e. the client got a signal) makes the wait fail with
    EINTR. *on_first_wait* runs once, just before the call first blocks, so
    calls that never block cost nothing extra.
    """

    __slots__ = ("interrupted", "_wake", "_on_first_wait")

    def __init__(self, on_first_wait: Callable[[Waiter], None] | None = None) -> None:
        self.interrupted = False
        self._wake: Callable[[], None] | None = None
        self._on_first_wait = on_first_wait

    def interrupt(self) -> None:
        self.interrupted = True
        if self._wake is not None:
            self._wake()

    def before_wait(self, wake: Callable[[], None]) -> None:
        if self._on_first_wait is not None:
            callback, self._on_first_wait = self._on_first_wait, None
            callback(self)
        self._wake = wake


@dataclass(eq=False)
class Handle:
    """One open file of a session (one ``open()``; dup'd descriptors share it)."""

    session: Session
    nonblock: bool
    #: The FUSE file handle (0 outside a mount).
    fh: int = 0
    poll_handle: PollHandle | None = field(default=None, repr=False)


def _now() -> int:
    return time.time_ns()


def function_name(raw: bytes) -> str:
    """The function name in an xattr value or a ``dsf_name``: cut at NUL and at 63 bytes, as NetBSD does."""
    return raw.split(b"\0", 1)[0][: MAX_FUNCNAME - 1].decode("utf-8", "replace")


def _whole(length: int, unit: int) -> int:
    """How many whole structs of *unit* bytes a transfer of *length* serves (EINVAL if none may be)."""
    count, rest = divmod(length, unit)
    if rest and (length < SPLIT_MIN or count == 0):
        raise OSError(errno.EINVAL, f"length {length} is not a multiple of {unit}")
    return count


class Session:
    """A dmoverio session: a function, a queue of requests, its waiters."""

    def __init__(
        self,
        sid: int,
        core: CoreSession,
        client: Client,
        depth: int,
        functions: dict[str, Function],
        counters: Counters,
        dispatch: Callable[[], None] | None = None,
    ) -> None:
        self.sid = sid
        self.client = client
        self.depth = depth
        self.function: Function | None = None
        self.handles: set[Handle] = set()
        self.created_ns = self.atime_ns = self.mtime_ns = _now()
        self._core = core
        self._functions = functions
        self._counters = counters
        #: Assigns accepted requests of external functions to back-ends (dmoverfs.backends).
        self._dispatch = dispatch
        self._readers = trio.lowlevel.ParkingLot()
        self._writers = trio.lowlevel.ParkingLot()
        self._down = False
        self._closed = False
        self._eperm_logged = False
        #: The core announces the fast path's submissions and takes (see _watch).
        self._watching = False

    # -- configuration (the ioctl equivalents) -------------------------------------------

    def set_function(self, raw_name: bytes) -> None:
        """DMIO_SETFUNC: ESRCH for an unknown function, EBUSY once one is set."""
        # EBUSY first, whatever the name, as NetBSD's dmio_ioctl does.
        if self.function is not None:
            raise OSError(errno.EBUSY, "the session already has a function")
        name = function_name(raw_name)
        func = self._functions.get(name)
        if func is None:
            raise OSError(errno.ESRCH, f"no function {name!r}")
        if func.external:
            err = self._core.set_external(func.index, func.ninputs, func.has_output)
        else:
            err = self._core.setfunc(func.index)
        if err:
            raise OSError(err, f"cannot select {name!r}")
        self.function = func

    # -- the data path -----------------------------------------------------------------

    async def write(self, handle: Handle, data: bytes, waiter: Waiter | None = None) -> int:
        """Accept requests; returns the bytes of the requests accepted (short on error/full)."""
        count = _whole(len(data), REQ_SIZE)
        self._check_usable()
        if count == 0:
            return 0
        self.mtime_ns = _now()
        done = 0
        while True:
            accepted, err = self._core.submit(data, done, count - done)
            if accepted:
                done += accepted
                if self._dispatch is not None and self.function is not None and self.function.external:
                    self._dispatch()
                self._after_submit()
            if err:
                if err == errno.EPERM:
                    self._explain_eperm()
                if done == 0:
                    raise OSError(err, os.strerror(err))
                break
            if done == count:
                break
            # Full: the session has depth requests outstanding.
            if handle.nonblock:
                if done == 0:
                    raise OSError(errno.EAGAIN, "the session's queue is full")
                break
            if self._watch():
                continue
            self._counters.queue_waits += 1
            try:
                await self._wait(self._writers, waiter)
            except OSError:
                if done == 0:
                    raise
                break
        return done * REQ_SIZE

    async def read(self, handle: Handle, size: int, waiter: Waiter | None = None) -> bytes:
        """Return responses; a blocking read waits until its buffer is full.

        A blocking read takes responses only once all it asks for (or a whole
        queue's worth) are ready, so an interrupted read never holds
        responses it could lose.
        """
        want = _whole(size, RESP_SIZE)
        self._check_usable()
        if want == 0:
            return b""
        self.atime_ns = _now()
        chunks: list[bytes] = []
        got = 0
        while got < want:
            _, ready = self._core.counts()
            if ready and (handle.nonblock or ready >= min(want - got, self.depth)):
                data = self._core.take(want - got)
                got += len(data) // RESP_SIZE
                chunks.append(data)
                self._after_take()
                continue
            if handle.nonblock:
                if got == 0:
                    raise OSError(errno.EAGAIN, "no response is ready")
                break
            if self._watch():
                continue
            self._counters.read_waits += 1
            try:
                await self._wait(self._readers, waiter)
            except OSError:
                # Only a read longer than the queue can hold responses here: deliver them.
                if got == 0:
                    raise
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def poll(self, handle: Handle, poll_handle: PollHandle | None) -> int:
        """Current readiness; keeps *poll_handle* to notify when it changes."""
        if poll_handle is not None:
            handle.poll_handle = poll_handle
            self._watch()
        if self._down:
            return POLL_IN | POLL_OUT
        outstanding, ready = self._core.counts()
        events = POLL_IN if ready else 0
        if outstanding < self.depth:
            events |= POLL_OUT
        return events

    # -- events from the core and the server ---------------------------------------------

    def changed(self) -> None:
        """Workers completed requests, or the fast path took responses or
        accepted requests: wake readers, writers and pollers to look again."""
        self._readers.unpark_all()
        self._writers.unpark_all()
        self._notify_pollers()

    def shut_down(self) -> None:
        """The server is going away: every waiter fails with ENXIO, pollers see all events."""
        self._down = True
        self._readers.unpark_all()
        self._writers.unpark_all()
        self._notify_pollers()

    def close(self) -> None:
        """The last open file was released: discard responses, let requests finish."""
        if not self._closed:
            self._closed = True
            self._down = True
            self._readers.unpark_all()
            self._writers.unpark_all()
            self._core.close()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def core(self) -> CoreSession:
        """The C half (for the fast path's registry)."""
        return self._core

    def counts(self) -> tuple[int, int]:
        """(outstanding, ready)."""
        return (0, 0) if self._closed else self._core.counts()

    # -- internals ----------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._down:
            raise OSError(errno.ENXIO, "the server is shutting down")
        if self.function is None:
            raise OSError(errno.ENXIO, "no function selected")

    async def _wait(self, lot: trio.lowlevel.ParkingLot, waiter: Waiter | None) -> None:
        if waiter is not None:
            waiter.before_wait(lot.unpark_all)
            if waiter.interrupted:
                raise OSError(errno.EINTR, "interrupted")
        try:
            await lot.park()
        finally:
            self._unwatch_if_idle()
        if self._down:
            raise OSError(errno.ENXIO, "the server is shutting down")
        if waiter is not None and waiter.interrupted:
            raise OSError(errno.EINTR, "interrupted")

    def _explain_eperm(self) -> None:
        """Say once per session why the kernel refused access to the client's memory, and what allows it."""
        if self._eperm_logged:
            return
        self._eperm_logged = True
        try:
            yama = open("/proc/sys/kernel/yama/ptrace_scope").read().strip()
        except OSError:
            yama = "absent"
        log.warning(
            "session %d: may not read or write the memory of process %d (uid %d): the kernel refused ptrace access "
            "(server uid %d, kernel.yama.ptrace_scope %s). Allow it by running the server as that user or as root, "
            "or in the client with prctl(PR_SET_PTRACER, %d) (libdmoverio.so does this on EPERM).",
            self.sid,
            self.client.pid,
            self.client.uid,
            os.geteuid(),
            yama,
            os.getpid(),
        )

    def _watch(self) -> bool:
        """Have the fast path's changes announced before waiting on them.

        True when the watch is new: the caller looks at the counts once more,
        since the fast path may have changed them before it saw the watch.
        """
        if self._watching or self._closed:
            return False
        self._watching = True
        self._core.watch(True)
        return True

    def _unwatch_if_idle(self) -> None:
        if self._watching and not self._closed and not self._readers and not self._writers:
            if not any(h.poll_handle for h in self.handles):
                self._watching = False
                self._core.watch(False)

    def _after_submit(self) -> None:
        # Small requests completed inline: a concurrent reader or poller may proceed.
        if self._readers or any(h.poll_handle for h in self.handles):
            _, ready = self._core.counts()
            if ready:
                self.changed()

    def _after_take(self) -> None:
        # Room was freed: a blocked writer or a POLLOUT poller may proceed.
        self._writers.unpark_all()
        self._notify_pollers()

    def _notify_pollers(self) -> None:
        for handle in self.handles:
            ph = handle.poll_handle
            if ph is not None:
                handle.poll_handle = None
                ph.notify()
        self._unwatch_if_idle()
