"""A Python client for dmoverfs sessions.

::

    from dmoverfs import client

    buf = bytearray(4096)
    client.fill8(None, buf, 0xAB)            # None: the default mount point
    with client.Session(None, "iscsi-crc32c") as s:
        s.submit(inputs=[buf])
        (result,) = s.results()
        crc = result.check().crc

A :class:`Session` is one dmoverio session with its function selected. Buffers
are any objects exporting the buffer protocol (``bytearray``, ``bytes``,
``memoryview`` and slices of it, numpy arrays, ``mmap``, ``array.array``,
ctypes arrays), or a list of them for a scatter/gather list. Their addresses go
into the requests as they are, without copying; the session holds an export of
each buffer (so a ``bytearray`` cannot be resized nor an ``mmap`` closed) and a
reference to it until the request's result has been read.

How the session is built (see the README, "From Python", for the reasons):

- Two open files of the same session: the one opened through ``func/NAME``
  (blocking; :meth:`Session.fileno`) and a second one opened through
  ``/proc/self/fd/N`` with ``O_NONBLOCK``. Non-blocking operations use the
  second, so switching between blocking and non-blocking costs nothing and
  needs no ``user.dmover.nonblock`` round trip. That attribute sets every open
  file of a session: do not set it on a session the client owns.
- Requests address the memory of the process that opened the session, so a
  session cannot be used after ``fork()`` in the child (RuntimeError).

Shared buffers (a dmoverfs extension): :meth:`Session.shared_buffer` gives
memory the server maps too. Requests whose buffers all lie in shared buffers
of their session run on that memory directly, without a copy or a system call
per transfer::

    with client.Session(None, "copy") as s:
        src, dst = s.shared_buffer(1 << 24), s.shared_buffer(1 << 24)
        s.submit(dst, inputs=[src])
        s.results()[0].check()
- It needs nothing but the standard library, so it runs from the
  client-only distribution (see the README): buffers are exported with
  ``ctypes``, or with cffi's cheaper ``from_buffer`` when cffi is installed
  (as in the full install).

Errors about the mount are :class:`DmoverfsError` subclasses naming the mount
point and what to do; each also subclasses the builtin exception code caught
before they existed (``FileNotFoundError``, ``ProcessLookupError``, ...).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import operator
import os
import select
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeAlias

from dmoverfs.paths import MOUNTPOINT_ENV, default_mountpoint
from dmoverfs.wire import BUFFER, IOVEC, REQ_SIZE, RESP_SIZE, USRREQ, USRRESP, XATTR_FUNCTION, XATTR_REGISTER, XATTR_UNREGISTER

if sys.version_info >= (3, 12):
    from collections.abc import Buffer
else:  # pragma: no cover - typing only
    Buffer: TypeAlias = Any

__all__ = [
    "BufferSpec",
    "DmoverfsError",
    "MountAccessDenied",
    "MountGone",
    "NotMounted",
    "UnknownFunction",
    "Request",
    "Result",
    "Session",
    "SubmitError",
    "SubmitWouldBlock",
    "copy",
    "crc32c",
    "fill8",
    "functions",
    "xor",
    "zero",
]

#: One buffer, or a scatter/gather list of buffers (a ``list`` or ``tuple``).
BufferSpec: TypeAlias = "Buffer | Sequence[Buffer]"
PathLike: TypeAlias = "str | os.PathLike[str] | None"

_ZERO8 = bytes(8)
_UINT32 = 1 << 32
_UINT64 = 1 << 64
#: Keep-alives of requests whose session went away before their results were
#: read (server gone, or a Session garbage collected while requests were
#: outstanding): the server might still write into those buffers, so their
#: memory is never given back.
_ABANDONED: list[object] = []


class Result(NamedTuple):
    """One ``struct dmio_usrresp``: the request's id, 0 or an errno, the response immediate."""

    id: int
    error: int
    immediate: bytes

    @property
    def ok(self) -> bool:
        """True when the request succeeded."""
        return self.error == 0

    @property
    def value(self) -> int:
        """The immediate as a little-endian unsigned 64-bit integer."""
        return int.from_bytes(self.immediate, "little")

    @property
    def crc(self) -> int:
        """The immediate's low 32 bits (little-endian): the CRC of ``iscsi-crc32c``."""
        return int.from_bytes(self.immediate[:4], "little")

    def check(self) -> Result:
        """Return this result, or raise :class:`OSError` with its errno if the request failed."""
        if self.error:
            raise OSError(self.error, f"{os.strerror(self.error)} (request {self.id})")
        return self


class Request(NamedTuple):
    """A request for :meth:`Session.submit_many` (the arguments of :meth:`Session.submit`)."""

    out: BufferSpec | None = None
    inputs: Sequence[BufferSpec] = ()
    immediate: bytes | int = b""
    req_id: int | None = None


class DmoverfsError(OSError):
    """An error about a dmoverfs mount; ``filename`` is the mount point, the message says what to do."""


class NotMounted(DmoverfsError, FileNotFoundError):
    """No dmoverfs mount answers at the mount point (ENOENT)."""


class MountGone(DmoverfsError):
    """The mount is there but its server is gone (ENOTCONN: a stale mount)."""


class MountAccessDenied(DmoverfsError, PermissionError):
    """The mount refuses this user (EACCES: another user's mount without ``--allow-other``)."""


class UnknownFunction(DmoverfsError, ProcessLookupError, LookupError):
    """The mount offers no function of that name (ESRCH, as ``DMIO_SETFUNC``); ``functions`` lists those it offers."""

    functions: list[str]


def _mount_error(exc: OSError, mountpoint: Path) -> OSError:
    """*exc*, raised opening a file of *mountpoint*, as the DmoverfsError that says what to do (or *exc*)."""
    where = str(mountpoint)
    if exc.errno == errno.ENOENT:
        return NotMounted(
            errno.ENOENT,
            f"no dmoverfs mount at {where}: mount one with 'dmoverfs mount {where}', "
            f"or name the mount point (None means ${MOUNTPOINT_ENV} or the default)",
            where,
        )
    if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED):
        return MountGone(exc.errno, f"the server of {where} is gone; 'dmoverfs unmount {where}', then mount again", where)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return MountAccessDenied(
            exc.errno, f"{where} refuses this user: another user's mount needs 'dmoverfs mount --allow-other'", where
        )
    return exc


def _unknown_function(function: str, mountpoint: Path) -> UnknownFunction:
    try:
        offered = functions(mountpoint)
    except OSError:
        offered = []
    exc = UnknownFunction(
        errno.ESRCH, f"{mountpoint} has no function {function!r}; it offers: {', '.join(offered) or 'none'}", str(mountpoint)
    )
    exc.functions = offered
    return exc


class SubmitError(OSError):
    """The server refused a request of a submission; the ones before it were accepted.

    ``errno`` is the server's (EINVAL, EFAULT, ENXIO, EAGAIN, ...). ``accepted``
    lists the ids of the requests of this call that were accepted before the
    refused one: they are outstanding, and their results must be read as
    usual. ``index`` is the refused request's position in the call (0 for
    :meth:`Session.submit`) and ``req_id`` its id; it and every request after
    it were not submitted.
    """

    accepted: list[int]
    index: int
    req_id: int


class SubmitWouldBlock(SubmitError, BlockingIOError):
    """A :class:`SubmitError` with EAGAIN: the session's queue (or the server's global cap) is full."""


def _submit_error(err: int, accepted: list[int], index: int, req_id: int) -> SubmitError:
    cls = SubmitWouldBlock if err == errno.EAGAIN else SubmitError
    exc = cls(err, f"{os.strerror(err)} (request {req_id}, #{index} of the submission)")
    exc.accepted, exc.index, exc.req_id = accepted, index, req_id
    return exc


def _mountpoint(mountpoint: PathLike) -> Path:
    return default_mountpoint() if mountpoint is None else Path(mountpoint)


def functions(mountpoint: PathLike = None) -> list[str]:
    """The functions the mount offers (the entries of ``func/``), sorted.

    Raises :class:`NotMounted`, :class:`MountGone` or :class:`MountAccessDenied` when the mount cannot be read.
    """
    where = _mountpoint(mountpoint)
    try:
        return sorted(os.listdir(where / "func"))
    except OSError as exc:
        raise _mount_error(exc, where) from None


# -- building requests ------------------------------------------------------------------


class _PyBuffer(ctypes.Structure):
    """CPython's ``Py_buffer`` (stable since Python 3.3)."""

    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


# The C API through prototypes of our own (not ctypes.pythonapi's shared function
# objects, whose argtypes any other code may set): the GIL stays held, and an
# error the exporter sets is raised. Addresses are passed as integers (cheaper than byref).
_get_buffer = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.py_object, ctypes.c_void_p, ctypes.c_int)(
    ("PyObject_GetBuffer", ctypes.pythonapi)
)
_release_buffer = ctypes.PYFUNCTYPE(None, ctypes.c_void_p)(("PyBuffer_Release", ctypes.pythonapi))
_PYBUF_WRITABLE = 0x0001
_PYBUF_C_CONTIGUOUS = 0x0038  # PyBUF_C_CONTIGUOUS: the exporter refuses a non-contiguous buffer
_PYBUF_WRITE_FLAGS = _PYBUF_C_CONTIGUOUS | _PYBUF_WRITABLE


class _Export:
    """A buffer export of an object (as ``memoryview`` holds one): its address and length, until released."""

    __slots__ = ("view", "addr", "size")

    def __init__(self, obj: object, writable: bool) -> None:
        self.view: _PyBuffer | None = None
        view = _PyBuffer()
        _get_buffer(obj, ctypes.addressof(view), _PYBUF_WRITE_FLAGS if writable else _PYBUF_C_CONTIGUOUS)
        self.view = view
        self.addr: int = view.buf or 0
        self.size: int = view.len

    def release(self) -> None:
        """Give the export back (a ``bytearray`` may be resized again); idempotent."""
        view, self.view = self.view, None
        if view is not None:
            _release_buffer(ctypes.addressof(view))

    def __del__(self) -> None:
        if _release_buffer is not None:  # None late in interpreter shutdown
            self.release()


class _Exporter(NamedTuple):
    """How buffers are exported: ``export(obj, writable)`` -> a handle, its ``span`` (address, length), ``release``."""

    name: str
    export: Callable[[object, bool], Any]
    span: Callable[[Any], tuple[int, int]]
    release: Callable[[Any], None]


#: The standard library's way, always there.
_CTYPES = _Exporter("ctypes", _Export, lambda e: (e.addr, e.size), _Export.release)


def _cffi_exporter() -> _Exporter | None:
    """cffi's ``from_buffer``, about three times cheaper per buffer, when cffi is installed (the full install)."""
    try:
        import cffi
    except ImportError:
        return None
    ffi = cffi.FFI()
    cast = ffi.cast
    return _Exporter(
        "cffi",
        lambda obj, writable: ffi.from_buffer(obj, require_writable=writable),
        lambda c: (int(cast("uintptr_t", c)), len(c)),
        ffi.release,
    )


_EXPORTER = _cffi_exporter() or _CTYPES


def _export(obj: object, writable: bool, what: str) -> Any:
    """An export of *obj*'s memory (a handle of ``_EXPORTER``), held until released."""
    try:
        return _EXPORTER.export(obj, writable)
    except TypeError:
        raise TypeError(f"{what}: {type(obj).__name__} does not support the buffer protocol") from None
    except (BufferError, ValueError) as exc:  # the exporter's words for read-only or non-contiguous
        if writable and memoryview(obj).readonly:  # type: ignore[arg-type]
            raise TypeError(f"{what}: a read-only {type(obj).__name__} cannot be written into") from None
        raise ValueError(f"{what}: {exc} (buffers must be C-contiguous)") from None


def _segments(spec: BufferSpec, writable: bool, what: str) -> list[Any]:
    if isinstance(spec, (list, tuple)):
        return [_export(part, writable, f"{what}[{i}]") for i, part in enumerate(spec)]
    return [_export(spec, writable, what)]


def _immediate(value: bytes | int) -> bytes:
    if value == b"" or value == 0:
        return _ZERO8
    if not isinstance(value, (bytes, bytearray, memoryview)):
        value = operator.index(value)  # int, bool, numpy integers
        if not 0 <= value < _UINT64:
            raise ValueError(f"immediate {value} is not an unsigned 64-bit integer")
        return value.to_bytes(8, "little")
    raw = bytes(value)
    if len(raw) > 8:
        raise ValueError(f"immediate is {len(raw)} bytes, at most 8")
    return raw.ljust(8, b"\0")


def _release(exports: list[Any]) -> None:
    release = _EXPORTER.release
    for export in exports:
        release(export)


class _Built:
    """A batch of packed requests and everything they point at."""

    __slots__ = ("payload", "ids", "keeps")

    def __init__(self, payload: bytearray, ids: list[int], keeps: list[tuple[list[Any], Any]]) -> None:
        self.payload = payload
        self.ids = ids
        self.keeps = keeps


def _build(requests: Sequence[Request], ids: list[int]) -> _Built:
    """Pack *requests*; every check that can fail is done before anything is sent."""
    parsed: list[tuple[list[Any] | None, list[list[Any]], bytes]] = []
    meta_size = 0
    try:
        for index, req in enumerate(requests):
            what = f"request #{index}"
            inputs = req.inputs
            if not isinstance(inputs, (list, tuple)):
                try:
                    memoryview(inputs)  # type: ignore[arg-type]
                except TypeError:
                    inputs = list(inputs)
                else:
                    raise TypeError(f"{what}: inputs must be a sequence of buffers; put a single input in a list")
            imm = _immediate(req.immediate)
            out = None if req.out is None else _segments(req.out, True, f"{what} out")
            parsed.append((out, [], imm))
            ins = parsed[-1][1]
            for i, spec in enumerate(inputs):
                ins.append(_segments(spec, False, f"{what} inputs[{i}]"))
            meta_size += BUFFER.size * len(ins) + IOVEC.size * ((len(out) if out else 0) + sum(len(s) for s in ins))
    except BaseException:
        # Give the exports taken so far back at once (a bytearray may be resized again).
        for out, ins, _ in parsed:
            _release(out or [])
            for segs in ins:
                _release(segs)
        raise
    # One block for every request's dmio_buffer tables and iovec arrays.
    meta = ctypes.create_string_buffer(max(meta_size, 1))
    base = ctypes.addressof(meta)
    view = memoryview(meta).cast("B")
    payload = bytearray(REQ_SIZE * len(requests))
    keeps: list[tuple[list[Any], Any]] = []
    off = 0
    span = _EXPORTER.span

    def iovecs(segs: list[Any]) -> int:
        nonlocal off
        start = base + off
        for export in segs:
            IOVEC.pack_into(view, off, *span(export))
            off += IOVEC.size
        return start

    for index, (out, ins, imm) in enumerate(parsed):
        exports: list[Any] = []
        out_ptr = out_cnt = in_ptr = 0
        if out is not None:
            exports += out
            out_ptr, out_cnt = iovecs(out), len(out)
        if ins:
            table = off
            in_ptr = base + table
            off += BUFFER.size * len(ins)
            for i, segs in enumerate(ins):
                exports += segs
                BUFFER.pack_into(view, table + BUFFER.size * i, iovecs(segs), len(segs))
        USRREQ.pack_into(payload, REQ_SIZE * index, out_ptr, out_cnt, imm, in_ptr, ids[index])
        keeps.append((exports, meta))
    return _Built(payload, ids, keeps)


# -- sessions -------------------------------------------------------------------------


def _close(fd: int) -> None:
    # Linux releases the descriptor even when close() fails (ENOTCONN once the server is gone).
    try:
        os.close(fd)
    except OSError:
        pass


def _async_library() -> str:
    try:
        import sniffio

        return sniffio.current_async_library()
    except ImportError:  # pragma: no cover - sniffio comes with trio
        import asyncio

        asyncio.get_running_loop()
        return "asyncio"


class SharedBuffer(mmap.mmap):
    """Memory shared with a session's server: a memfd this process maps ``MAP_SHARED``.

    Made by :meth:`Session.shared_buffer`. The server maps the same pages
    (``user.dmover.register``); it works on them until :meth:`close`, or
    until the session closes. Requests written by other processes (a forked
    child) are not run on it: they go the ordinary way, on their own memory.
    """

    address: int
    session: Session | None

    def __new__(cls, session: Session, nbytes: int) -> SharedBuffer:
        nbytes = operator.index(nbytes)
        if nbytes <= 0:
            raise ValueError(f"a shared buffer needs at least one byte, not {nbytes}")
        fd = os.memfd_create("dmoverfs-shared", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, nbytes)
            self = super().__new__(cls, fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            export = _EXPORTER.export(self, True)
            self.address = _EXPORTER.span(export)[0]
            _EXPORTER.release(export)
            self.session = None
            try:
                os.setxattr(session.fileno(), XATTR_REGISTER, f"{fd} 0 {self.address} {nbytes}".encode())
            except BaseException:
                mmap.mmap.close(self)
                raise
            self.session = session
        finally:
            os.close(fd)  # the mapping and the server hold the file
        return self

    def close(self) -> None:
        """Drop the registration (requests in flight keep the pages), then unmap."""
        session, self.session = self.session, None
        if session is not None and not session.closed and os.getpid() == session._pid:
            try:
                os.setxattr(session.fileno(), XATTR_UNREGISTER, f"{self.address} {len(self)}".encode())
            except OSError:
                pass  # the session is closing: its registrations go with it
        super().close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self)} bytes at {self.address:#x}"
        return f"<dmoverfs.client.SharedBuffer {state}>"


class Session:
    """One dmoverio session with *function* selected, on the mount at *mountpoint*.

    *mountpoint* None is the default mount point
    (:func:`dmoverfs.paths.default_mountpoint`). The session is opened through
    ``func/FUNCTION``, or ``dmoverio`` and the ``user.dmover.function``
    attribute for a name that is not there: an unknown function raises
    :class:`UnknownFunction` (a ``ProcessLookupError``, ESRCH) listing those
    the mount offers; a missing mount :class:`NotMounted` (a
    ``FileNotFoundError``), a stale one :class:`MountGone`. With *nonblocking*, :meth:`submit` raises
    :class:`SubmitWouldBlock` instead of waiting for room and
    :meth:`results` without a timeout returns what is ready.

    A context manager: leaving it calls :meth:`close`. :meth:`submit` and
    :meth:`results` may run in different threads at once (one submitting, one
    reading); several threads reading at once get the results in no defined
    split.

    A session holds at most its queue depth of requests (``dmoverfs mount
    --queue-depth``, 64 by default) submitted and not yet read back. Past
    that, a blocking submission waits until results are read, which only
    another thread can do: a single-threaded program reads results before
    submitting more, or uses a non-blocking session.
    """

    def __init__(self, mountpoint: PathLike, function: str, *, nonblocking: bool = False) -> None:
        self._fd = -1
        self._nbfd = -1
        self._pending: dict[int, tuple[list[Any], Any]] = {}
        self._stash: deque[Result] = deque()
        self._lock = threading.Lock()
        self._next_id = 1
        self._pid = os.getpid()
        self.mountpoint = _mountpoint(mountpoint)
        self.function = function
        self._nonblocking = bool(nonblocking)
        self._fd = self._open(function)
        try:
            # A second open file of the same session, non-blocking at open():
            # the session's O_NONBLOCK is per open file, and fcntl(F_SETFL)
            # never reaches a FUSE server.
            self._nbfd = os.open(f"/proc/self/fd/{self._fd}", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except BaseException:
            os.close(self._fd)
            self._fd = -1
            raise

    def _open(self, function: str) -> int:
        direct = function and "/" not in function and "\0" not in function and function not in (".", "..")
        if direct:
            try:
                return os.open(self.mountpoint / "func" / function, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                pass  # not listed: let the server say why (ESRCH), or that the mount is missing
            except OSError as exc:
                raise _mount_error(exc, self.mountpoint) from None
        try:
            fd = os.open(self.mountpoint / "dmoverio", os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise _mount_error(exc, self.mountpoint) from None
        try:
            os.setxattr(fd, XATTR_FUNCTION, function.encode())
        except OSError as exc:
            _close(fd)
            if exc.errno == errno.ESRCH:
                raise _unknown_function(function, self.mountpoint) from None
            raise
        except BaseException:
            _close(fd)
            raise
        return fd

    # -- the basics ---------------------------------------------------------------------

    def fileno(self) -> int:
        """The session's (blocking) descriptor, for ``select``, ``poll``, ``selectors``, trio, asyncio.

        Readiness is the session's: readable when a result is ready, writable
        when the queue has room. Reading or writing it directly bypasses the
        client's bookkeeping (ids, kept buffers).
        """
        self._check_open()
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    @property
    def nonblocking(self) -> bool:
        """Whether :meth:`submit` and :meth:`results` (without a timeout) return instead of waiting."""
        return self._nonblocking

    @nonblocking.setter
    def nonblocking(self, value: bool) -> None:
        self._nonblocking = bool(value)

    def set_blocking(self, blocking: bool) -> None:
        """As :meth:`socket.socket.setblocking`: ``set_blocking(False)`` makes the session non-blocking."""
        self._nonblocking = not blocking

    @property
    def outstanding(self) -> int:
        """Requests submitted whose results have not been returned by :meth:`results` yet."""
        return len(self._pending) + len(self._stash)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._fd}, outstanding={self.outstanding}"
        return f"<dmoverfs.client.Session {self.function!r} at {str(self.mountpoint)!r} {state}>"

    def close(self) -> None:
        """Wait for the outstanding requests (discarding their results), then close the session.

        Waiting guarantees that no request writes into a buffer after
        ``close()`` returns. If the results cannot be read (the server went
        away, or the wait was interrupted), the buffers of the unfinished
        requests are kept alive for the life of the process instead.
        """
        if self.closed:
            return
        try:
            if self._pending and os.getpid() == self._pid:
                self._stash.clear()
                while self._pending:
                    self._read(self._fd, len(self._pending))
        except OSError:
            pass
        finally:
            self._stash.clear()
            self._abandon()
            fd, nbfd, self._fd, self._nbfd = self._fd, self._nbfd, -1, -1
            _close(nbfd)
            _close(fd)

    def _abandon(self) -> None:
        if self._pending:
            _ABANDONED.append(list(self._pending.values()))
            self._pending.clear()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            # No waiting in a finalizer: keep the buffers of unread requests alive for good.
            self._abandon()
            _close(self._nbfd)
            _close(self._fd)
            self._fd = self._nbfd = -1

    def _check_open(self) -> None:
        if self._fd < 0:
            raise ValueError("I/O operation on a closed dmoverfs session")
        if os.getpid() != self._pid:
            raise RuntimeError("a dmoverfs session addresses the memory of the process that opened it; open a new one")

    # -- shared memory --------------------------------------------------------------------

    def shared_buffer(self, nbytes: int) -> SharedBuffer:
        """*nbytes* of zeroed memory shared with the server, registered with this session.

        A :class:`SharedBuffer` (an :class:`mmap.mmap` of a memfd: the buffer
        protocol, slicing, ``numpy.frombuffer``). Requests whose every buffer
        lies in this session's shared buffers run on them directly. Closing
        the buffer, or the session, drops the registration.
        OSError(ENOSPC) past the mount's limits.
        """
        self._check_open()
        return SharedBuffer(self, nbytes)

    # -- submitting ---------------------------------------------------------------------

    def submit(
        self,
        out: BufferSpec | None = None,
        inputs: Sequence[BufferSpec] = (),
        immediate: bytes | int = b"",
        req_id: int | None = None,
    ) -> int:
        """Submit one request; returns its id.

        *out* is the output buffer (None for none, as ``iscsi-crc32c`` wants),
        *inputs* a sequence of input buffers; each may be one buffer or a
        list of buffers (scatter/gather). *immediate* is up to 8 bytes, or an
        unsigned integer stored little-endian (``fill8``'s byte, a CRC seed).
        *req_id* None assigns an id unused by the session's outstanding
        requests; an explicit one must be a 32-bit unsigned integer not
        outstanding.

        Raises TypeError (a read-only output, a non-buffer) or ValueError
        (a non-contiguous buffer, a bad immediate or id) before anything is
        sent; :class:`SubmitError` when the server refuses the request
        (EINVAL for lengths that do not match, ...); :class:`SubmitWouldBlock`
        (a BlockingIOError) when the session is non-blocking and its queue is
        full. A blocking session waits for room.
        """
        ids = self.submit_many([Request(out, inputs, immediate, req_id)])
        if not ids:  # pragma: no cover - submit_many raises rather than accept nothing
            raise _submit_error(errno.EAGAIN, [], 0, -1)
        return ids[0]

    def submit_many(self, requests: Iterable[Request | dict[str, Any]]) -> list[int]:
        """Submit a batch of requests in one ``write()``; returns the ids accepted, in order.

        Each item is a :class:`Request` (or a dict of its fields). Everything
        is checked and packed before the write. Short writes are continued,
        so the outcome is one of:

        - every request accepted: all the ids;
        - a non-blocking session whose queue filled up after at least one
          request of the batch was accepted: the ids of those (a prefix of
          the batch); the others were not submitted;
        - the server refused a request: :class:`SubmitError` carrying its
          errno, its ``index`` in the batch and the ids ``accepted`` before
          it (outstanding as any other); it and the requests after it were
          not submitted. Nothing accepted in a non-blocking session with a
          full queue is :class:`SubmitWouldBlock`, ``accepted == []``.
        """
        reqs = [Request(**r) if isinstance(r, dict) else r for r in requests]
        self._check_open()
        if not reqs:
            return []
        ids = self._assign_ids(reqs)
        try:
            built = _build(reqs, ids)
        except BaseException:
            self._unassign(ids)
            raise
        return self._send(built)

    def _assign_ids(self, reqs: list[Request]) -> list[int]:
        ids: list[int] = []
        with self._lock:
            taken = self._pending
            chosen: set[int] = set()
            for index, req in enumerate(reqs):
                rid = req.req_id
                if rid is None:
                    rid = self._next_id
                    while rid in taken or rid in chosen:
                        rid = (rid + 1) % _UINT32
                    self._next_id = (rid + 1) % _UINT32
                elif not (isinstance(rid, int) and 0 <= rid < _UINT32):
                    self._unassign_locked(ids)
                    raise ValueError(f"request #{index}: id {rid!r} is not a 32-bit unsigned integer")
                elif rid in taken or rid in chosen:
                    self._unassign_locked(ids)
                    raise ValueError(f"request #{index}: id {rid} is already outstanding")
                chosen.add(rid)
                ids.append(rid)
                # Reserved now, so a concurrent submit cannot take it; filled in by _send.
                taken[rid] = ([], None)
        return ids

    def _unassign(self, ids: list[int]) -> None:
        with self._lock:
            self._unassign_locked(ids)

    def _unassign_locked(self, ids: list[int]) -> None:
        for rid in ids:
            self._pending.pop(rid, None)

    def _send(self, built: _Built) -> list[int]:
        ids = built.ids
        # Recorded before the write: a thread reading results may see them before write() returns.
        with self._lock:
            for rid, keep in zip(ids, built.keeps):
                self._pending[rid] = keep
        fd = self._nbfd if self._nonblocking else self._fd
        payload = memoryview(built.payload)
        count = len(ids)
        done = 0
        try:
            while done < count:
                try:
                    written = os.write(fd, payload[done * REQ_SIZE :])
                except OSError as exc:
                    if exc.errno == errno.EAGAIN and self._nonblocking and done:
                        break
                    raise _submit_error(exc.errno or errno.EIO, ids[:done], done, ids[done]) from None
                whole, rest = divmod(written, REQ_SIZE)
                if rest or not written:  # the server only ever accepts whole requests
                    done += whole
                    raise _submit_error(errno.EIO, ids[:done], done, ids[done] if done < count else -1)
                done += whole
        finally:
            if done < count:
                with self._lock:
                    for rid in ids[done:]:
                        exports, _ = self._pending.pop(rid)
                        _release(exports)
        return ids[:done]

    # -- results ------------------------------------------------------------------------

    def _read(self, fd: int, want: int) -> int:
        """Read up to *want* responses from *fd* into the stash; releases their buffers."""
        data = os.read(fd, RESP_SIZE * want)
        if len(data) % RESP_SIZE:
            raise OSError(errno.EIO, f"the server returned {len(data)} bytes, not whole responses")
        got = [Result(*fields) for fields in USRRESP.iter_unpack(data)]
        self._stash.extend(got)
        with self._lock:
            keeps = [self._pending.pop(res.id, None) for res in got]
        for keep in keeps:
            if keep is not None:
                _release(keep[0])
        return len(got)

    def _take(self, n: int) -> list[Result]:
        stash = self._stash
        return [stash.popleft() for _ in range(min(n, len(stash)))]

    def _poll(self, events: int, timeout: float | None) -> int:
        poller = select.poll()
        poller.register(self._fd, events)
        ms = -1 if timeout is None else max(0, int(timeout * 1000 + 0.999))
        ready = poller.poll(ms)
        return ready[0][1] if ready else 0

    def results(self, n: int | None = 1, timeout: float | None = None) -> list[Result]:
        """Results of submitted requests, in completion order (not submission order).

        *n* None means all outstanding requests.

        - ``timeout=None``, blocking session: waits until *n* results are
          ready and returns exactly *n*, counting requests that other threads
          submit meanwhile (a consumer thread may wait before its producer
          has submitted anything). With *n* larger than :attr:`outstanding`
          and no other thread submitting it waits for ever (Ctrl-C ends it).
        - ``timeout=None``, non-blocking session: returns the results ready
          now, at most *n*; raises BlockingIOError when none is.
        - ``timeout=T`` (seconds, either mode): waits until *n* results are
          ready or *T* seconds have passed, and returns what it has, at most
          *n* — fewer, possibly none (``[]``), only at the deadline. It never
          raises TimeoutError, so no result read before the deadline is lost.
          ``timeout=0`` takes what is ready without waiting.

        A result read from the server is never lost: if the call is
        interrupted (KeyboardInterrupt, cancellation of :meth:`aresults`),
        what it had read is returned by the next call. Reading a result
        releases the buffers of its request.
        """
        self._check_open()
        if n is None:
            n = self.outstanding
        if n < 0:
            raise ValueError(f"n = {n} < 0")
        if timeout is None and not self._nonblocking:
            while len(self._stash) < n:
                # A blocking read returns when its buffer is full; short only across FUSE's transfer size.
                self._read(self._fd, n - len(self._stash))
            return self._take(n)
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        while len(self._stash) < n:
            # Read first: small requests complete inside write(), so results are usually ready.
            try:
                self._read(self._nbfd, n - len(self._stash))
                continue
            except BlockingIOError:
                pass
            if deadline is None:
                if not self._stash:
                    raise BlockingIOError(errno.EAGAIN, "no result is ready")
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._poll(select.POLLIN, remaining)
        return self._take(n)

    # -- async --------------------------------------------------------------------------

    async def wait_readable(self) -> None:
        """Wait, under trio or asyncio, until a result is ready (the descriptor polls readable).

        One task at a time per session may wait (trio raises BusyResourceError
        for a second; asyncio would replace the first's callback).
        """
        await self._wait(readable=True)

    async def wait_writable(self) -> None:
        """Wait, under trio or asyncio, until the session's queue has room."""
        await self._wait(readable=False)

    async def _wait(self, readable: bool) -> None:
        self._check_open()
        fd = self._fd
        library = _async_library()
        if library == "trio":
            import trio

            await (trio.lowlevel.wait_readable(fd) if readable else trio.lowlevel.wait_writable(fd))
        elif library == "asyncio":
            import asyncio

            loop = asyncio.get_running_loop()
            future: asyncio.Future[None] = loop.create_future()

            def wake() -> None:
                if not future.done():
                    future.set_result(None)

            add, remove = (loop.add_reader, loop.remove_reader) if readable else (loop.add_writer, loop.remove_writer)
            add(fd, wake)
            try:
                await future
            finally:
                remove(fd)
        else:
            raise RuntimeError(f"unsupported async library {library!r} (trio and asyncio are)")

    async def aresults(self, n: int | None = 1) -> list[Result]:
        """Wait without blocking the event loop (trio or asyncio) until *n* results are ready; return them.

        *n* None means all outstanding. As :meth:`results`, it counts
        requests submitted meanwhile by other tasks or threads. Cancelling it
        loses nothing: results already read are returned by the next
        :meth:`results` or :meth:`aresults`.
        """
        self._check_open()
        if n is None:
            n = self.outstanding
        if n < 0:
            raise ValueError(f"n = {n} < 0")
        while len(self._stash) < n:
            try:
                self._read(self._nbfd, n - len(self._stash))
            except BlockingIOError:
                await self.wait_readable()
        return self._take(n)


# -- one-call helpers ---------------------------------------------------------------------


def _one(
    mountpoint: PathLike, function: str, out: BufferSpec | None, inputs: Sequence[BufferSpec] = (), immediate: bytes | int = b""
) -> Result:
    with Session(mountpoint, function) as session:
        session.submit(out, inputs, immediate)
        (result,) = session.results(1)
    return result.check()


def zero(mountpoint: PathLike, buf: BufferSpec) -> None:
    """Fill *buf* with zeros (``zero``). *mountpoint* None is the default mount point."""
    _one(mountpoint, "zero", buf)


def fill8(mountpoint: PathLike, buf: BufferSpec, byte: int) -> None:
    """Fill *buf* with *byte* (0..255) (``fill8``)."""
    if not 0 <= byte < 256:
        raise ValueError(f"fill byte {byte} is not in 0..255")
    _one(mountpoint, "fill8", buf, (), byte)


def copy(mountpoint: PathLike, dst: BufferSpec, src: BufferSpec) -> None:
    """Copy *src* into *dst*, of the same length (``copy``)."""
    _one(mountpoint, "copy", dst, [src])


def xor(mountpoint: PathLike, dst: BufferSpec, *srcs: BufferSpec) -> None:
    """Store the XOR of 2 to 16 buffers *srcs* into *dst* (``xor2`` ... ``xor16``)."""
    if not 2 <= len(srcs) <= 16:
        raise ValueError(f"xor takes 2 to 16 inputs, not {len(srcs)}")
    _one(mountpoint, f"xor{len(srcs)}", dst, srcs)


def crc32c(mountpoint: PathLike, data: BufferSpec, seed: int = 0) -> int:
    """The CRC32C of *data* (``iscsi-crc32c``); *seed* is a previous CRC, to chain."""
    if not 0 <= seed < _UINT32:
        raise ValueError(f"seed {seed} is not a 32-bit unsigned integer")
    return _one(mountpoint, "iscsi-crc32c", None, [data], seed).crc
