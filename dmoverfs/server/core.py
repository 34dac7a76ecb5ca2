"""Python face of the C core (in ``dmoverfs._server``, built with cffi).

The control plane decides *what* exists (sessions, their functions); the
core decodes, validates and moves the bytes, and decides every session read,
write and poll the transport (``dmoverfs.server.transport``) brings it.
Every method here is one C call; none loops over request bytes.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from dmoverfs._server import ffi, lib
from dmoverfs.tunables import Tunables
from dmoverfs.wire import REQ_SIZE, RESP_SIZE


@dataclass(frozen=True)
class Function:
    """One function of the function table (index -1: one only plug-in back-ends perform)."""

    index: int
    name: str
    ninputs: int
    has_output: bool
    #: Its requests go through Python's scheduler (a plug-in back-end offers it too).
    external: bool = False


def functions() -> list[Function]:
    """The functions the C core performs, in table order."""
    table = []
    for index in range(lib.dm_func_count()):
        table.append(
            Function(
                index=index,
                name=ffi.string(lib.dm_func_name(index)).decode(),
                ninputs=lib.dm_func_ninputs(index),
                has_output=bool(lib.dm_func_has_output(index)),
            )
        )
    return table


class Core:
    """The worker pool, bounce buffers and counters of one mount.

    With *transport* the sessions are served by the server's data plane:
    worker completions wake its parked calls, and the eventfd announces only
    external requests and EPERM (see :meth:`drain`).
    """

    def __init__(self, tunables: Tunables, *, transport: bool = True) -> None:
        cfg = ffi.new(
            "struct dm_config *",
            {
                "workers": tunables.workers,
                "chunk_bytes": tunables.chunk_bytes,
                "inline_bytes": tunables.inline_bytes,
                "max_requests": tunables.max_requests,
                "max_meta_bytes": tunables.max_meta_bytes,
                "max_sessions": tunables.max_sessions,
                "max_user_sessions": tunables.max_user_sessions,
                "max_user_requests": tunables.max_user_requests,
                "max_user_meta_bytes": tunables.max_user_meta_bytes,
                "slice_bytes": tunables.slice_bytes,
                "transport": int(transport),
            },
        )
        err = ffi.new("int *")
        ptr = lib.dm_core_new(cfg, err)
        if ptr == ffi.NULL:
            raise OSError(err[0], f"cannot start the C core: {os.strerror(err[0])}")
        self._ptr = ptr
        self.functions = functions()
        self._drain_ids = ffi.new("uint64_t[]", 4096)
        # One response buffer serves every take(): only the event-loop thread calls it.
        self._resp_buf = ffi.new("char[]", tunables.queue_depth * RESP_SIZE)
        self._resp_cap = tunables.queue_depth
        self._taken = ffi.new("dm_req *[]", 1024)
        self._info = ffi.new("struct dm_req_info *")

    @property
    def ptr(self):  # noqa: ANN201 - a cffi pointer
        """The C core (for the transport)."""
        return self._ptr

    @property
    def eventfd(self) -> int:
        """Readable when :meth:`drain` or :meth:`take_external` has something."""
        return lib.dm_core_eventfd(self._ptr)

    @property
    def kernels(self) -> str:
        """The CRC32C and XOR kernels in use."""
        return ffi.string(lib.dm_core_kernels(self._ptr)).decode()

    def drain(self) -> list[int]:
        """Ids of sessions announced since the last call: a write met EPERM
        (see :meth:`CoreSession.take_eperm`), or, without the transport,
        workers completed requests."""
        ids: list[int] = []
        while True:
            n = lib.dm_core_drain(self._ptr, self._drain_ids, len(self._drain_ids))
            ids.extend(self._drain_ids[0:n])
            if n < len(self._drain_ids):
                return ids

    def io_stats(self) -> dict[str, int]:
        """What the sessions' reads, writes, polls and interrupts did."""
        out = ffi.new("struct dm_io_stats *")
        lib.dm_core_io_stats(self._ptr, out)
        return {name: getattr(out, name) for name, _ in ffi.typeof("struct dm_io_stats").fields}

    def shutdown(self) -> None:
        """Answer every waiting call with ENXIO and wake every poller; later calls fail with ENXIO."""
        lib.dm_core_shutdown(self._ptr)

    def stats(self) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
        """Core-wide counters and per-function counters."""
        total = ffi.new("struct dm_core_stats *")
        per = ffi.new("struct dm_func_stats[]", len(self.functions))
        lib.dm_core_stats(self._ptr, total, per, len(self.functions))
        core = {name: getattr(total, name) for name, _ in ffi.typeof("struct dm_core_stats").fields}
        funcs = {
            f.name: {k: getattr(per[f.index], k) for k in ("submitted", "completed", "failed", "bytes")} for f in self.functions
        }
        return core, funcs

    def session(self, sid: int, depth: int, uid: int, pid: int = 0, pidfd: int = -1) -> CoreSession:
        """A new session opened by user *uid*; takes ownership of *pidfd*.

        Raises OSError ENFILE when the global or the user's cap on sessions
        is reached. Requests written through the transport act on their
        writer's memory. *pid* (with its *pidfd*) is whom
        :meth:`CoreSession.submit` acts for: the benchmark's pyfuse3 floor,
        which writes from Python."""
        if depth > self._resp_cap:
            raise ValueError("session depth exceeds the core's response buffer")
        err = ffi.new("int *")
        ptr = lib.dm_sess_open(self._ptr, sid, pid, pidfd, uid, depth, err)
        if ptr == ffi.NULL:
            if pidfd >= 0:
                os.close(pidfd)
            if err[0] == errno.ENFILE:
                raise OSError(errno.ENFILE, f"too many sessions open (uid {uid} or all users at their cap)")
            raise OSError(err[0], f"cannot open a session: {os.strerror(err[0])}")
        return CoreSession(self, ptr)

    def users(self, limit: int) -> tuple[list[dict[str, int]], int]:
        """Up to *limit* users with sessions open (most outstanding first), and how many there are."""
        out = ffi.new("struct dm_user_stats[]", max(limit, 1))
        total = ffi.new("size_t *")
        n = lib.dm_core_users(self._ptr, out, limit, total)
        fields = [name for name, _ in ffi.typeof("struct dm_user_stats").fields]
        return [{name: getattr(out[i], name) for name in fields} for i in range(n)], total[0]

    def take_into(self, sess_ptr, max_resps: int) -> bytes:
        n = lib.dm_sess_take(sess_ptr, self._resp_buf, min(max_resps, self._resp_cap))
        return ffi.unpack(self._resp_buf, n * RESP_SIZE) if n else b""

    # -- requests of external sessions (see dmoverfs.backends) --------------------------

    @property
    def executing_bytes(self) -> int:
        """Bytes of the requests queued to or running on the core's workers."""
        total = ffi.new("struct dm_core_stats *")
        lib.dm_core_stats(self._ptr, total, ffi.NULL, 0)
        return total.executing_bytes

    def take_external(self) -> list:
        """The requests external sessions have had accepted, oldest first."""
        out = []
        while True:
            n = lib.dm_core_take_external(self._ptr, self._taken, len(self._taken))
            out.extend(self._taken[0:n])
            if n < len(self._taken):
                return out

    def req_info(self, req) -> dict:
        info = self._info
        lib.dm_req_info(req, info)
        return {
            "session": info.session,
            "id": info.id,
            "func": info.func,
            "err": info.err,
            "ninputs": info.ninputs,
            "has_output": info.has_output,
            "total": info.total,
            "immediate": bytes(ffi.buffer(info.immediate)),
        }

    @staticmethod
    def req_read(req, i: int, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0:
            raise OSError(errno.EINVAL, "negative offset or size")
        buf = bytearray(size)
        err = lib.dm_req_read(req, i, offset, ffi.from_buffer(buf), size) if size else 0
        if err:
            raise OSError(err, f"reading input {i}: {os.strerror(err)}")
        return bytes(buf)

    @staticmethod
    def req_write(req, offset: int, data) -> None:
        if offset < 0:
            raise OSError(errno.EINVAL, "negative offset")
        view = memoryview(data).cast("B")
        err = lib.dm_req_write(req, offset, ffi.from_buffer(view), len(view))
        if err:
            raise OSError(err, f"writing the output: {os.strerror(err)}")

    @staticmethod
    def req_run(req) -> None:
        """Hand the request to the C back-end."""
        lib.dm_req_run(req)

    @staticmethod
    def req_complete(req, err: int, imm: bytes | None) -> None:
        lib.dm_req_complete(req, err, ffi.NULL if imm is None else ffi.from_buffer(imm))

    def close(self) -> None:
        """Stop the workers and free everything."""
        if self._ptr is not None:
            lib.dm_core_free(self._ptr)
            self._ptr = None


class CoreSession:
    """The C half of a session: request decoding, response ring, waiting calls, counters."""

    __slots__ = ("_core", "_ptr", "_counts", "_err", "_times")

    def __init__(self, core: Core, ptr) -> None:
        self._core = core
        self._ptr = ptr
        self._counts = ffi.new("unsigned[3]")
        self._err = ffi.new("int *")  # reused: submit is on every write
        self._times = ffi.new("int64_t[3]")

    @property
    def ptr(self):  # noqa: ANN201 - a cffi pointer
        """The C session (for the transport)."""
        return self._ptr

    def setfunc(self, index: int) -> int:
        """0, ESRCH or EBUSY."""
        return lib.dm_sess_setfunc(self._ptr, index)

    def set_external(self, index: int, ninputs: int, has_output: bool) -> int:
        """Select a function performed outside the C core (index -1 when the table lacks it)."""
        return lib.dm_sess_set_external(self._ptr, index, ninputs, int(has_output))

    def submit(self, data: bytes, first: int, count: int) -> tuple[int, int]:
        """Start requests ``first .. first+count`` of *data*; (accepted, errno or 0).

        For the pyfuse3 floor of the benchmark: the server's sessions are
        written to through the transport only."""
        buf = ffi.from_buffer(data)
        accepted = lib.dm_sess_submit(self._ptr, buf + first * REQ_SIZE, count, self._err)
        return accepted, self._err[0]

    def take(self, max_resps: int) -> bytes:
        """Up to *max_resps* ready responses, packed (the benchmark's pyfuse3 floor)."""
        return self._core.take_into(self._ptr, max_resps)

    @property
    def nonblock(self) -> bool:
        """The nonblock attribute (FIONBIO): every call of the session is non-blocking."""
        return bool(lib.dm_sess_nonblock(self._ptr))

    @nonblock.setter
    def nonblock(self, on: bool) -> None:
        lib.dm_sess_set_nonblock(self._ptr, int(on))

    def times(self) -> tuple[int, int, int]:
        """(last read, last write, open) in ns since the epoch."""
        t = self._times
        lib.dm_sess_times(self._ptr, t)
        return t[0], t[1], t[2]

    def stats(self) -> dict[str, int]:
        """The session's state and counters: outstanding, ready, nonblock, completed, failed, bytes, times (ns)."""
        out = ffi.new("struct dm_sess_stats *")
        lib.dm_sess_stats(self._ptr, out)
        names = ("outstanding", "ready", "nonblock", "completed", "failed", "bytes", "atime_ns", "mtime_ns", "ctime_ns")
        return {name: int(getattr(out, name)) for name in names}

    def take_eperm(self) -> int:
        """Once after a write of this session met EPERM: the writing thread's id (else 0)."""
        return max(0, lib.dm_sess_take_eperm(self._ptr))

    def counts(self) -> tuple[int, int]:
        """(outstanding, ready)."""
        c = self._counts
        lib.dm_sess_counts(self._ptr, c, c + 1)
        return c[0], c[1]

    def waiting(self) -> tuple[int, int, int]:
        """Calls waiting now: (reads, writes, poll handles)."""
        c = self._counts
        lib.dm_sess_waiting(self._ptr, c)
        return c[0], c[1], c[2]

    def register(self, tid: int, uid: int, gid: int, fd: int, offset: int, addr: int, length: int) -> None:
        """Register shared memory of thread *tid*'s process (see dm_sess_register); OSError on refusal."""
        if fd > 0x7FFFFFFF:
            raise OSError(errno.EBADF, "no such descriptor")
        err = lib.dm_sess_register(self._ptr, tid, uid, gid, fd, offset, addr, length)
        if err:
            raise OSError(err, os.strerror(err))

    def unregister(self, tid: int, addr: int, length: int) -> None:
        """Drop a registration of thread *tid*'s process; OSError(ENOENT) when it has none there."""
        err = lib.dm_sess_unregister(self._ptr, tid, addr, length)
        if err:
            raise OSError(err, os.strerror(err))

    def shared(self) -> tuple[int, int]:
        """Registrations of the session: (count, bytes)."""
        out = ffi.new("uint64_t[2]")
        lib.dm_sess_shared(self._ptr, out)
        return out[0], out[1]

    def close(self) -> None:
        """Drop the server's reference; in-flight requests finish harmlessly."""
        if self._ptr is not None:
            lib.dm_sess_close(self._ptr)
            self._ptr = None
