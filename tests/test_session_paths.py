"""Session reads and writes along every path a call can take: answered at once,
refused, or parked until the session changes - and woken by whoever changes it.

The edge cases of the answering rule (SPEC.md, Semantics): ENXIO before a
function is set, EINVAL for less than one struct, EFAULT at write for unreadable
iovec arrays and in the response for unreachable data, EINVAL in the
response for a function's own constraint, EAGAIN and short counts for a
non-blocking file (however O_NONBLOCK was set), a blocking read that waits
until its buffer is full, a blocking write that waits for room, pollers
woken by the change they wait for, requests that a Python back-end
completes, and the session's times. Every wait has a deadline; a server
that fails to wake someone is stopped by the fixture, which unblocks the
thread.
"""

from __future__ import annotations

import codecs
import errno
import fcntl
import os
import select
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from dmio import (
    RESP,
    XATTR_FUNCTION,
    XATTR_NONBLOCK,
    collect,
    errno_of,
    open_session,
    parse,
    raw_request,
    request,
    stats,
    submit,
    wait_for,
    whole,
)
from programs import interrupted_after

DEADLINE_S = 10.0
#: A non-blocking call returns within this (else it is interrupted and the test fails).
AT_ONCE_S = 2.0
UNMAPPED = 0x1000
DEPTH = 64  # the default queue depth, DMIO_NREQS_MAX
FUSE_WAIT = "request_wait_answer"


def zero_requests(first_id: int, bufs: list[np.ndarray]) -> list:
    return [request(first_id + i, out=whole(b)) for i, b in enumerate(bufs)]


class Blocked(threading.Thread):
    """Run *call* in a thread; ``result()`` waits for it up to the deadline."""

    def __init__(self, call: Callable[[], object]) -> None:
        super().__init__(daemon=True)
        self._call = call
        self.value: object = None
        self.error: BaseException | None = None
        self.tid: int | None = None

    def run(self) -> None:
        self.tid = threading.get_native_id()
        try:
            self.value = self._call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.error = exc

    def waiting_in_fuse(self) -> bool:
        """True while the thread sleeps waiting for the server's answer."""
        try:
            return self.tid is not None and Path(f"/proc/self/task/{self.tid}/wchan").read_text() == FUSE_WAIT
        except FileNotFoundError:
            return False

    def result(self) -> object:
        self.join(DEADLINE_S)
        assert not self.is_alive(), "the blocked call was never woken"
        if self.error is not None:
            raise self.error
        return self.value


def test_small_requests_one_per_write(mnt):
    fd = open_session(mnt, "zero")
    try:
        bufs = [np.full(4096, 0xA5, np.uint8) for _ in range(8)]
        for req in zero_requests(0, bufs):
            assert submit(fd, req) == 40
        responses = collect(fd, 8)
    finally:
        os.close(fd)
    assert sorted(r.req_id for r in responses) == list(range(8))
    assert all(r.error == 0 for r in responses)
    assert not any(b.any() for b in bufs)


def set_nonblocking(how: str, mnt: Path) -> int:
    """A second session with "zero" selected, made non-blocking the way *how* says."""
    if how == "open":
        nb = os.open(mnt / "dmoverio", os.O_RDWR | os.O_NONBLOCK)
        os.setxattr(nb, XATTR_FUNCTION, b"zero")
        return nb
    nb = open_session(mnt, "zero")
    if how == "xattr":
        os.setxattr(nb, XATTR_NONBLOCK, b"1")
    else:  # fcntl, without the preload shim
        fcntl.fcntl(nb, fcntl.F_SETFL, fcntl.fcntl(nb, fcntl.F_GETFL) | os.O_NONBLOCK)
    return nb


def outcome(call: Callable, *args) -> tuple:  # noqa: ANN001
    try:
        value = call(*args)
    except OSError as exc:
        return ("errno", errno.errorcode[exc.errno])
    return ("ok", value if isinstance(value, int) else len(value))


@pytest.mark.parametrize("nonblock", ["xattr", "open", "fcntl"])
def test_edge_cases_of_reads_and_writes(mnt, nonblock):
    fd = open_session(mnt)
    nb = set_nonblocking(nonblock, mnt)
    try:
        buf = np.ones(4096, np.uint8)
        # Before a function is set: ENXIO.
        assert outcome(submit, fd, request(1, out=whole(buf))) == ("errno", "ENXIO")
        assert outcome(os.read, fd, 16) == ("errno", "ENXIO")
        os.setxattr(fd, XATTR_FUNCTION, b"zero")
        # Not one whole request, not room for one whole response: EINVAL.
        assert outcome(os.write, fd, b"\0" * 39) == ("errno", "EINVAL")
        assert outcome(os.read, fd, 15) == ("errno", "EINVAL")
        # An iovec array that cannot be read: EFAULT at write.
        assert outcome(os.write, fd, raw_request(UNMAPPED, 1, req_id=7)) == ("errno", "EFAULT")
        # Data that cannot be written: accepted, then EFAULT in the response.
        assert outcome(submit, fd, request(2, out=[(UNMAPPED, 64)])) == ("ok", 40)
        assert [(r.req_id, r.error) for r in collect(fd, 1)] == [(2, errno.EFAULT)]
        # No output for zero: accepted, then EINVAL in the response.
        assert outcome(submit, fd, request(3, out=None)) == ("ok", 40)
        assert [(r.req_id, r.error) for r in collect(fd, 1)] == [(3, errno.EINVAL)]
        assert (buf == 1).all()  # untouched: the request that named it was refused

        # Non-blocking: EAGAIN when nothing is ready, a short count when the queue fills, then EAGAIN.
        bufs = [np.ones(64, np.uint8) for _ in range(DEPTH + 6)]
        reqs = zero_requests(100, bufs)
        with interrupted_after(AT_ONCE_S, f"a non-blocking call (O_NONBLOCK set by {nonblock})"):
            assert outcome(os.read, nb, 16) == ("errno", "EAGAIN")
            assert outcome(os.write, nb, b"".join(r.packed for r in reqs)) == ("ok", DEPTH * 40)
            assert outcome(submit, nb, request(999, out=whole(buf))) == ("errno", "EAGAIN")
            # A read returns what is ready, even when it asked for more.
            responses = parse(os.read(nb, 16 * 100))
            assert outcome(os.read, nb, 16) == ("errno", "EAGAIN")
        assert sorted(r.req_id for r in responses) == list(range(100, 100 + DEPTH))
        assert all(r.error == 0 for r in responses)
        assert sum(not b.any() for b in bufs) == DEPTH
    finally:
        os.close(fd)
        os.close(nb)


def test_a_blocked_reader_is_woken_by_later_writes(server_factory):
    mnt = server_factory().mountpoint
    fd = open_session(mnt, "zero")
    try:
        reader = Blocked(lambda: parse(os.read(fd, 4 * RESP.size)))
        reader.start()
        assert wait_for(reader.waiting_in_fuse), "the read never waited"
        bufs = [np.ones(256, np.uint8) for _ in range(4)]
        for i, req in enumerate(zero_requests(10, bufs)):
            submit(fd, req)
            if i < 3:  # a blocking read returns only once its buffer is full
                assert reader.is_alive() and wait_for(reader.waiting_in_fuse, 1.0)
        responses = reader.result()
    finally:
        os.close(fd)
    assert sorted(r.req_id for r in responses) == [10, 11, 12, 13]
    assert not any(b.any() for b in bufs)


def test_a_blocked_writer_is_woken_by_reads(server_factory):
    mnt = server_factory("--queue-depth", "4").mountpoint
    fd = open_session(mnt, "zero")
    try:
        bufs = [np.ones(256, np.uint8) for _ in range(8)]
        reqs = zero_requests(0, bufs)
        assert submit(fd, *reqs[:4]) == 4 * 40
        writer = Blocked(lambda: submit(fd, *reqs[4:]))
        writer.start()
        assert wait_for(writer.waiting_in_fuse), "the write never waited"
        first = collect(fd, 4)
        assert writer.result() == 4 * 40
        rest = collect(fd, 4)
    finally:
        os.close(fd)
    assert sorted(r.req_id for r in first + rest) == list(range(8))
    assert not any(b.any() for b in bufs)


@pytest.mark.parametrize("event", ["EPOLLIN", "EPOLLOUT"])
def test_pollers_are_woken_by_the_change_they_wait_for(server_factory, event):
    # epoll, not poll: poll(2) asks the server once more when it times out,
    # which would hide a missing notification.
    mnt = server_factory("--queue-depth", "4").mountpoint
    fd = open_session(mnt, "zero")
    ep = select.epoll()
    try:
        bufs = [np.ones(256, np.uint8) for _ in range(4)]
        reqs = zero_requests(0, bufs)
        if event == "EPOLLOUT":
            assert submit(fd, *reqs) == 4 * 40  # full: not writable
        wanted = getattr(select, event)
        ep.register(fd, wanted)
        assert ep.poll(0) == []
        waiting = Blocked(lambda: ep.poll(DEADLINE_S))
        waiting.start()
        if event == "EPOLLIN":
            submit(fd, reqs[0])
        else:
            collect(fd, 4)
        events = waiting.result()
    finally:
        ep.close()
        os.close(fd)
    assert events and events[0][1] & wanted, f"epoll returned {events!r}"


def test_function_and_nonblock_set_after_open(mnt):
    fd = open_session(mnt)
    try:
        buf = np.ones(64, np.uint8)
        assert errno_of(submit, fd, request(1, out=whole(buf))) == errno.ENXIO
        os.setxattr(fd, XATTR_FUNCTION, b"fill8")
        assert submit(fd, request(1, out=whole(buf), immediate=7)) == 40
        assert collect(fd, 1)[0].error == 0
        os.setxattr(fd, XATTR_NONBLOCK, b"1")
        with interrupted_after(AT_ONCE_S, "a read after the nonblock xattr was set"):
            assert errno_of(os.read, fd, 16) == errno.EAGAIN
        os.setxattr(fd, XATTR_NONBLOCK, b"0")
        reader = Blocked(lambda: parse(os.read(fd, 16)))
        reader.start()
        assert wait_for(reader.waiting_in_fuse), "the read did not wait once nonblock was cleared"
        assert submit(fd, request(2, out=whole(buf), immediate=9)) == 40
        assert [r.req_id for r in reader.result()] == [2]
    finally:
        os.close(fd)
    assert (buf == 9).all()


@pytest.fixture
def plugin_mount(server_factory) -> Path:  # noqa: ANN001 - pytest fixture
    """A mount with tests/backend_pkg/good: Python back-ends offering copy and rot13."""
    path = [str(Path(__file__).resolve().parent / "backend_pkg" / "good"), os.environ.get("PYTHONPATH", "")]
    return server_factory(env={"PYTHONPATH": os.pathsep.join(p for p in path if p)}).mountpoint


def rot13(data: bytes) -> bytes:
    return codecs.encode(data.decode("latin-1"), "rot13").encode("latin-1")


def test_requests_a_python_back_end_completes_wake_readers_and_pollers(plugin_mount):
    rng = np.random.default_rng(13)
    src = rng.integers(0, 256, 1 << 20, dtype=np.uint8)
    dsts = [np.zeros(1 << 20, np.uint8) for _ in range(2)]
    fd = open_session(plugin_mount, "rot13")
    ep = select.epoll()
    try:
        # A blocking read waits for the back-end's completion.
        reader = Blocked(lambda: parse(os.read(fd, RESP.size)))
        reader.start()
        assert wait_for(reader.waiting_in_fuse), "the read never waited"
        submit(fd, request(1, out=whole(dsts[0]), inputs=[whole(src)]))
        [first] = reader.result()
        # A poller is woken by it.
        ep.register(fd, select.EPOLLIN)
        submit(fd, request(2, out=whole(dsts[1]), inputs=[whole(src)]))
        assert ep.poll(DEADLINE_S), "the completion never woke the poller"
        [second] = parse(os.read(fd, RESP.size))
    finally:
        ep.close()
        os.close(fd)
    expected = rot13(src.tobytes())
    assert (first.req_id, first.error) == (1, 0) and (second.req_id, second.error) == (2, 0)
    assert {first.immediate.rstrip(b"\0"), second.immediate.rstrip(b"\0")} <= {b"fast", b"slow"}
    assert dsts[0].tobytes() == expected and dsts[1].tobytes() == expected


def test_copy_offered_by_plug_ins_too_moves_the_bytes(plugin_mount):
    src = np.arange(4096, dtype=np.uint8)
    dst = np.zeros(4096, np.uint8)
    fd = open_session(plugin_mount, "copy")
    try:
        submit(fd, request(1, out=whole(dst), inputs=[whole(src)]))
        response = collect(fd, 1)[0]
    finally:
        os.close(fd)
    assert response.error == 0 and (dst == src).all()


def test_a_session_ends_when_its_last_descriptor_is_closed(mnt):
    assert wait_for(lambda: stats(mnt)["sessions"]["open"] == 0)
    fds = [open_session(mnt, "zero") for _ in range(40)]
    dups = [os.dup(fd) for fd in fds[:10]]
    reopened = [os.open(f"/proc/self/fd/{fd}", os.O_RDWR) for fd in fds[10:20]]
    try:
        assert stats(mnt)["sessions"]["open"] == 40
        for fd in fds:
            os.close(fd)
        # The dups and the re-opened files still hold 20 of them.
        assert wait_for(lambda: stats(mnt)["sessions"]["open"] == 20), stats(mnt)["sessions"]
    finally:
        for fd in dups + reopened:
            os.close(fd)
    assert wait_for(lambda: stats(mnt)["sessions"]["open"] == 0), stats(mnt)["sessions"]


def test_times_of_reads_and_writes(mnt):
    fd = open_session(mnt, "zero")
    try:
        opened = os.fstat(fd)
        time.sleep(0.01)  # a clock step between the stamps compared
        start = time.time_ns()
        buf = np.ones(64, np.uint8)
        submit(fd, request(1, out=whole(buf)))
        written = os.fstat(fd)
        time.sleep(0.01)
        middle = time.time_ns()
        collect(fd, 1)
        read = os.fstat(fd)
    finally:
        os.close(fd)
    assert opened.st_ctime_ns == opened.st_mtime_ns == opened.st_atime_ns  # all the open time at first
    assert written.st_mtime_ns >= start > opened.st_mtime_ns
    assert written.st_atime_ns == opened.st_atime_ns
    assert read.st_atime_ns >= middle > written.st_atime_ns
    assert read.st_mtime_ns == written.st_mtime_ns
    assert read.st_ctime_ns == opened.st_ctime_ns
